//! The rooms one connection is subscribed to: one broadcast receiver per
//! room, polled in place. A wake takes the ready frame and every frame queued
//! behind it before the receiver waits again, so each delivery pays one
//! registration with the room, not one per poll.

use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::sync::broadcast::{error::RecvError, Receiver};
use tokio_util::sync::ReusableBoxFuture;

use crate::protocol::ChatId;

/// What a receive future resolves to: the outcome and the receiver back.
type Received = (Result<Bytes, RecvError>, Receiver<Bytes>);

async fn receive(mut rx: Receiver<Bytes>) -> Received {
    let result = rx.recv().await;
    (result, rx)
}

struct Sub {
    chat: ChatId,
    /// Owns the receiver while it waits. Boxed once per subscription and
    /// reused for every frame.
    next: ReusableBoxFuture<'static, Received>,
}

/// A room stopped serving this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// The connection fell more than the room's buffer behind.
    Lagged { chat: ChatId, missed: u64 },
    /// The room's sender is gone (cannot happen while a receiver exists).
    Closed { chat: ChatId },
}

#[derive(Default)]
pub(crate) struct Subscriptions {
    subs: Vec<Sub>,
}

impl Subscriptions {
    pub(crate) fn len(&self) -> usize {
        self.subs.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    pub(crate) fn contains(&self, chat: ChatId) -> bool {
        self.subs.iter().any(|s| s.chat == chat)
    }

    pub(crate) fn chats(&self) -> Vec<ChatId> {
        self.subs.iter().map(|s| s.chat).collect()
    }

    pub(crate) fn insert(&mut self, chat: ChatId, rx: Receiver<Bytes>) {
        if self.subs.capacity() == 0 {
            // Most connections watch one room: don't reserve four.
            self.subs.reserve_exact(1);
        }
        self.subs.push(Sub { chat, next: ReusableBoxFuture::new(receive(rx)) });
    }

    /// Drops the subscription (and its receiver); returns whether there was one.
    pub(crate) fn remove(&mut self, chat: ChatId) -> bool {
        match self.subs.iter().position(|s| s.chat == chat) {
            Some(i) => {
                self.subs.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// Takes up to `budget` ready frames from every room, in each room's
    /// order, handing them to `push`. Ready with the count when any was
    /// taken; pending (every receiver registered with `cx`) when none was.
    pub(crate) fn poll_take(
        &mut self,
        cx: &mut Context<'_>,
        budget: usize,
        mut push: impl FnMut(Bytes),
    ) -> Poll<Result<usize, Stopped>> {
        let mut taken = 0;
        for sub in &mut self.subs {
            while taken < budget {
                match sub.next.poll(cx) {
                    Poll::Pending => break,
                    Poll::Ready((Ok(frame), rx)) => {
                        push(frame);
                        taken += 1;
                        sub.next.set(receive(rx));
                    }
                    Poll::Ready((Err(RecvError::Lagged(missed)), _)) => {
                        return Poll::Ready(Err(Stopped::Lagged { chat: sub.chat, missed }))
                    }
                    Poll::Ready((Err(RecvError::Closed), _)) => {
                        return Poll::Ready(Err(Stopped::Closed { chat: sub.chat }))
                    }
                }
            }
        }
        if taken > 0 {
            Poll::Ready(Ok(taken))
        } else {
            Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::task::noop_waker_ref;
    use tokio::sync::broadcast;

    fn take(subs: &mut Subscriptions, budget: usize) -> Poll<Result<Vec<Bytes>, Stopped>> {
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut got = Vec::new();
        subs.poll_take(&mut cx, budget, |b| got.push(b)).map(|r| r.map(|_| got))
    }

    #[test]
    fn takes_everything_ready_in_order_within_the_budget() {
        let (tx_a, rx_a) = broadcast::channel(8);
        let (tx_b, rx_b) = broadcast::channel(8);
        let mut subs = Subscriptions::default();
        subs.insert(ChatId::from_u128(1), rx_a);
        subs.insert(ChatId::from_u128(2), rx_b);
        assert!(take(&mut subs, 10).is_pending());
        for i in 0..3u8 {
            tx_a.send(Bytes::from(vec![i])).unwrap();
        }
        tx_b.send(Bytes::from_static(b"b")).unwrap();
        let Poll::Ready(Ok(first)) = take(&mut subs, 2) else { panic!("frames were ready") };
        assert_eq!(first, vec![Bytes::from(vec![0]), Bytes::from(vec![1])]);
        let Poll::Ready(Ok(rest)) = take(&mut subs, 10) else { panic!("frames were ready") };
        assert_eq!(rest, vec![Bytes::from(vec![2]), Bytes::from_static(b"b")]);
        assert!(take(&mut subs, 10).is_pending());
        assert!(subs.remove(ChatId::from_u128(1)));
        assert!(!subs.contains(ChatId::from_u128(1)) && subs.len() == 1);
        assert_eq!(tx_a.receiver_count(), 0, "removing drops the receiver");
    }

    #[test]
    fn reports_a_lagging_room() {
        let (tx, rx) = broadcast::channel(2);
        let mut subs = Subscriptions::default();
        subs.insert(ChatId::from_u128(3), rx);
        for i in 0..5u8 {
            tx.send(Bytes::from(vec![i])).unwrap();
        }
        assert_eq!(
            take(&mut subs, 10),
            Poll::Ready(Err(Stopped::Lagged { chat: ChatId::from_u128(3), missed: 3 }))
        );
    }
}
