//! The rooms one connection is subscribed to: one live-ring receiver and a
//! position per room, polled in place. A wake takes the ready frame and every
//! frame queued behind it before the receiver waits again, so each delivery
//! pays one registration with the room, not one per poll.
//!
//! A room whose ring ran ahead of this connection (it lagged, or a frame
//! arrived past a gap) is read from the room's history instead, a page at a
//! time, until the connection is back at the room's head: no frame is missed
//! and none is queued twice, because every frame carries its `seq`.

use std::cell::Cell;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::sync::broadcast::{error::RecvError, Receiver};
use tokio_util::sync::ReusableBoxFuture;

use crate::protocol::deflate::Wire;
use crate::protocol::{ChatId, UserId};
use crate::rooms::{Frame, Joined, Room};

/// Most history frames one read takes out under a room's lock while a
/// reader catches up (it reads again for more).
const CATCH_UP_CHUNK: usize = 32;

/// What a receive future resolves to: the outcome and the receiver back.
type Received = (Result<Frame, RecvError>, Receiver<Frame>);

async fn receive(mut rx: Receiver<Frame>) -> Received {
    let result = rx.recv().await;
    (result, rx)
}

struct Sub {
    chat: ChatId,
    room: Arc<Room>,
    /// Owns the receiver while it waits. Boxed once per subscription and
    /// reused for every frame; none while the room has no ring yet (the
    /// subscription waits under `ticket`).
    next: Option<ReusableBoxFuture<'static, Received>>,
    /// The `seq` of the last frame queued for the client (its position).
    last: u64,
    /// Reading from history: the ring is ahead of `last + 1`.
    behind: bool,
    /// Its position is known (set by [`Subscriptions::set_position`]).
    placed: bool,
    /// Counted in the node's backlog: placed, and the connection not parked.
    counted: bool,
    /// The room's ticket for this subscription while it has no receiver.
    ticket: u32,
    /// Asked for the room's presence events (`"presence":true`). Under
    /// `presence.enabled` a placed subscription is in the room's presence
    /// (the command that placed it entered it), so this is all it adds: a
    /// byte of what was padding.
    listening: bool,
}

impl Drop for Sub {
    fn drop(&mut self) {
        if self.counted {
            self.room.uncount_reader(self.last);
        }
        if self.next.is_none() {
            self.room.stop_waiting(self.ticket);
        }
    }
}

/// A room stopped serving this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stopped {
    /// The connection fell further behind than the room's history reaches.
    Evicted { chat: ChatId, last: u64, oldest: u64 },
    /// The room's sender is gone (cannot happen while a receiver exists).
    Closed { chat: ChatId },
}

/// How much one poll may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Budget {
    pub(crate) frames: usize,
    pub(crate) bytes: usize,
}

/// What one poll took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Taken {
    pub(crate) frames: usize,
    /// Rooms that started reading from history in this poll (catch-ups).
    /// (`u32`, so [`Taken::waiting`] fits beside it: a wider `Taken`
    /// widens every connection's future, which keeps a wake's outcome.)
    pub(crate) catchups: u32,
    /// When the oldest frame taken was published: how far behind this
    /// connection runs (the node's load sensor samples it).
    pub(crate) oldest: Option<tokio::time::Instant>,
    /// Every room is waiting (its receiver registered with the poll's
    /// waker, or a ringless room waiting for the mailbox's nudge), rather
    /// than the budget having stopped the take: until the task is woken,
    /// polling again finds nothing.
    pub(crate) waiting: bool,
}

#[derive(Default)]
pub(crate) struct Subscriptions {
    subs: Vec<Sub>,
    /// The connection's write queue is full: it takes nothing, and its rooms
    /// do not count what it falls behind in the node's backlog (a stalled
    /// reader must not make the node look overloaded; it catches up from
    /// history, or is dropped, on its own).
    parked: bool,
}

impl Subscriptions {
    pub(crate) fn len(&self) -> usize {
        self.subs.len()
    }

    pub(crate) fn is_parked(&self) -> bool {
        self.parked
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.subs.is_empty()
    }

    /// The connection's position in `chat`, if subscribed.
    pub(crate) fn position(&self, chat: ChatId) -> Option<u64> {
        self.subs.iter().find(|s| s.chat == chat).map(|s| s.last)
    }

    /// (placed, so in the room's presence; listening for its presence events), if subscribed.
    pub(crate) fn presence(&self, chat: ChatId) -> Option<(bool, bool)> {
        self.subs.iter().find(|s| s.chat == chat).map(|s| (s.placed, s.listening))
    }

    /// Whether the subscription listens for the room's presence events.
    pub(crate) fn set_listening(&mut self, chat: ChatId, listening: bool) {
        if let Some(sub) = self.subs.iter_mut().find(|s| s.chat == chat) {
            sub.listening = listening;
        }
    }

    /// Whether a presence (`listeners_only`) or typing frame of `chat` is for this connection.
    pub(crate) fn wants(&self, chat: ChatId, listeners_only: bool) -> bool {
        self.subs.iter().any(|s| s.chat == chat && s.placed && (s.listening || !listeners_only))
    }

    /// The rooms whose presence the connection is in, and whether it listens there.
    pub(crate) fn present(&self) -> Vec<(ChatId, bool)> {
        self.subs.iter().filter(|s| s.placed).map(|s| (s.chat, s.listening)).collect()
    }

    pub(crate) fn chats(&self) -> Vec<ChatId> {
        self.subs.iter().map(|s| s.chat).collect()
    }

    /// Adds a room whose position is not known yet: it takes nothing until
    /// [`Subscriptions::set_position`] places it.
    pub(crate) fn insert(&mut self, chat: ChatId, room: Arc<Room>, joined: Joined) {
        if self.subs.capacity() == 0 {
            // Most connections watch one room: don't reserve four.
            self.subs.reserve_exact(1);
        }
        let (next, ticket) = match joined {
            Joined::Live(rx) => (Some(ReusableBoxFuture::new(receive(rx))), 0),
            Joined::Waiting(ticket) => (None, ticket),
        };
        let sub = Sub {
            chat,
            room,
            next,
            last: u64::MAX,
            behind: false,
            placed: false,
            counted: false,
            ticket,
            listening: false,
        };
        self.subs.push(sub);
    }

    /// Places the connection in `chat` at `last`: frames after it are taken
    /// from the ring, or first from history when `behind` (a recovery).
    pub(crate) fn set_position(&mut self, chat: ChatId, last: u64, behind: bool) {
        if let Some(sub) = self.subs.iter_mut().find(|s| s.chat == chat) {
            if sub.counted {
                sub.room.move_reader(sub.last, last);
            } else if !self.parked {
                sub.room.count_reader(last);
                sub.counted = true;
            }
            sub.last = last;
            sub.behind = behind;
            sub.placed = true;
        }
    }

    /// The connection stopped taking (its queue is full) or resumed: while
    /// parked, its rooms stop counting it in the node's backlog.
    pub(crate) fn park(&mut self, parked: bool) {
        if parked == self.parked {
            return;
        }
        self.parked = parked;
        for sub in self.subs.iter_mut().filter(|s| s.placed) {
            if parked && sub.counted {
                sub.room.uncount_reader(sub.last);
            } else if !parked && !sub.counted {
                sub.room.count_reader(sub.last);
            }
            sub.counted = !parked;
        }
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

    /// Takes new frames from every room, in each room's `seq` order, handing
    /// them to `push`: at most `budget.frames`, and none more once
    /// `budget.bytes` are taken. Ready when any was taken; pending (every
    /// ring receiver registered with `cx`) when none was.
    pub(crate) fn poll_take(
        &mut self,
        cx: &mut Context<'_>,
        user: UserId,
        budget: Budget,
        mut push: impl FnMut(Wire),
    ) -> Poll<Result<Taken, Stopped>> {
        let mut taken = Taken { waiting: true, ..Taken::default() };
        let bytes = Cell::new(0);
        let mut push = |frame: Wire| {
            bytes.set(bytes.get() + frame.len());
            push(frame);
        };
        for sub in &mut self.subs {
            // A user removed from the room takes nothing past the removal,
            // even before its connection has read the removal itself.
            let cutoff = sub.room.cutoff(user).unwrap_or(u64::MAX);
            // Set where the room is left waiting; a budget that ends the
            // loop first leaves it unset.
            let mut waiting = sub.last >= cutoff;
            while taken.frames < budget.frames && bytes.get() < budget.bytes && sub.last < cutoff {
                if sub.behind {
                    let frames = (budget.frames - taken.frames)
                        .min(usize::try_from(cutoff - sub.last).unwrap_or(usize::MAX))
                        .min(CATCH_UP_CHUNK);
                    let left = budget.bytes - bytes.get();
                    // Frames are taken out under the room's history lock and
                    // handed on (compressed, the first time a peer that
                    // agreed needs them) only once it is released: a
                    // compression under it would stall the room's publishes
                    // and every other reader. A stack chunk, so catching up
                    // allocates nothing and the task's future does not grow.
                    let mut chunk: [Option<Wire>; CATCH_UP_CHUNK] = [const { None }; CATCH_UP_CHUNK];
                    let mut held = 0;
                    let read = sub.room.read_after(sub.last, frames, left, |frame| {
                        if let Some(slot) = chunk.get_mut(held) {
                            *slot = Some(frame);
                            held += 1;
                        }
                    });
                    chunk.iter_mut().filter_map(Option::take).for_each(&mut push);
                    let read = match read {
                        Ok(read) => read,
                        Err(e) => {
                            return Poll::Ready(Err(Stopped::Evicted {
                                chat: sub.chat,
                                last: sub.last,
                                oldest: e.oldest,
                            }))
                        }
                    };
                    taken.frames += read.frames;
                    taken.oldest = earliest(taken.oldest, read.oldest);
                    sub.last = read.last;
                    // At the head, the ring serves again; what it still holds
                    // up to `last` is skipped below.
                    sub.behind = !read.at_head;
                    continue;
                }
                let next = match &mut sub.next {
                    Some(next) => next,
                    None => {
                        // The head is read before looking for a receiver: a
                        // publish makes the ring before it moves the head, so
                        // frames past our position with no ring are in history.
                        let head = sub.room.head();
                        match sub.room.take_receiver(sub.ticket) {
                            Some(rx) => sub.next.insert(ReusableBoxFuture::new(receive(rx))),
                            // A small room (no ring): read its new frames
                            // from history, like a catch-up.
                            None if head > sub.last => {
                                if head - sub.last > sub.room.ring_capacity() {
                                    // As far behind as a ring would have lagged.
                                    taken.catchups += 1;
                                }
                                sub.behind = true;
                                continue;
                            }
                            // Nothing new: the publish that keeps a frame, or
                            // makes the ring, nudges our mailbox.
                            None => {
                                waiting = true;
                                break;
                            }
                        }
                    }
                };
                match next.poll(cx) {
                    Poll::Pending => {
                        waiting = true;
                        break;
                    }
                    Poll::Ready((Ok(frame), rx)) => {
                        next.set(receive(rx));
                        let seq = frame.seq();
                        if seq <= sub.last || seq > cutoff {
                            // Already queued from history, before our position,
                            // or after our removal.
                            continue;
                        }
                        if seq == sub.last + 1 {
                            taken.oldest = earliest(taken.oldest, Some(frame.at()));
                            push(frame.bytes().clone());
                            taken.frames += 1;
                            sub.last = seq;
                        } else {
                            // A gap: what lies between is in history.
                            sub.behind = true;
                            taken.catchups += 1;
                        }
                    }
                    Poll::Ready((Err(RecvError::Lagged(_)), rx)) => {
                        // The ring moved past us; history has what it dropped.
                        next.set(receive(rx));
                        sub.behind = true;
                        taken.catchups += 1;
                    }
                    Poll::Ready((Err(RecvError::Closed), _)) => {
                        return Poll::Ready(Err(Stopped::Closed { chat: sub.chat }))
                    }
                }
            }
            taken.waiting &= waiting;
        }
        if taken.frames > 0 {
            Poll::Ready(Ok(taken))
        } else {
            Poll::Pending
        }
    }
}

fn earliest(
    a: Option<tokio::time::Instant>,
    b: Option<tokio::time::Instant>,
) -> Option<tokio::time::Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rooms::{HistoryLimits, Rooms};
    use bytes::Bytes;
    use futures_util::task::noop_waker_ref;
    use std::time::Duration;

    const LIMITS: HistoryLimits = HistoryLimits { size: 64, ttl: Duration::from_secs(60), bytes: 1 << 20 };

    fn take(subs: &mut Subscriptions, frames: usize) -> Poll<Result<Vec<u8>, Stopped>> {
        let mut cx = Context::from_waker(noop_waker_ref());
        let mut got = Vec::new();
        let budget = Budget { frames, bytes: usize::MAX };
        subs.poll_take(&mut cx, USER, budget, |b| got.push(b[0])).map(|r| r.map(|_| got))
    }

    const USER: UserId = UserId::from_u128(77);

    fn join(rooms: &Rooms, subs: &mut Subscriptions, chat: ChatId, last: u64, behind: bool) {
        let (room, joined) = rooms.join(chat, USER, &Arc::new(crate::mailbox::Mailbox::new(8)));
        subs.insert(chat, room, joined);
        subs.set_position(chat, last, behind);
    }

    fn publish(rooms: &Rooms, chat: ChatId, seqs: std::ops::RangeInclusive<u8>) {
        for seq in seqs {
            rooms.publish(chat, u64::from(seq), Bytes::from(vec![seq]));
        }
    }

    #[test]
    fn a_subscription_stays_56_bytes() {
        // Presence added one flag, in what was padding.
        assert!(std::mem::size_of::<Sub>() <= 56, "{}", std::mem::size_of::<Sub>());
    }

    /// The pump polls the rooms only once per task poll when a take left
    /// every room waiting: a take the budget stopped must not say so, or
    /// the frames it left would wait for the next wake.
    #[test]
    fn a_take_says_whether_it_left_every_room_waiting() {
        // A ringless small room (read from history), then one with a ring
        // (a history shorter than the ring makes one).
        for history in [64, 1] {
            let rooms = Rooms::new(4, HistoryLimits { size: history, ..LIMITS });
            let chat = ChatId::from_u128(12);
            let mut subs = Subscriptions::default();
            join(&rooms, &mut subs, chat, 0, false);
            publish(&rooms, chat, 1..=3);
            let mut cx = Context::from_waker(noop_waker_ref());
            let budget = |frames| Budget { frames, bytes: usize::MAX };
            let taken = subs.poll_take(&mut cx, USER, budget(2), |_| {});
            assert!(matches!(taken, Poll::Ready(Ok(Taken { frames: 2, waiting: false, .. }))), "{taken:?}");
            let taken = subs.poll_take(&mut cx, USER, budget(10), |_| {});
            assert!(matches!(taken, Poll::Ready(Ok(Taken { frames: 1, waiting: true, .. }))), "{taken:?}");
        }
    }

    #[test]
    fn takes_everything_ready_in_order_within_the_budget() {
        let rooms = Rooms::new(8, LIMITS);
        let (a, b) = (ChatId::from_u128(1), ChatId::from_u128(2));
        let mut subs = Subscriptions::default();
        join(&rooms, &mut subs, a, 0, false);
        join(&rooms, &mut subs, b, 0, false);
        assert!(take(&mut subs, 10).is_pending());
        publish(&rooms, a, 1..=3);
        publish(&rooms, b, 1..=1);
        assert_eq!(take(&mut subs, 2), Poll::Ready(Ok(vec![1, 2])));
        assert_eq!(take(&mut subs, 10), Poll::Ready(Ok(vec![3, 1])));
        assert!(take(&mut subs, 10).is_pending());
        assert!(subs.remove(a));
        assert!(subs.position(a).is_none() && subs.len() == 1);
        assert_eq!(rooms.subscribers(a), 0, "removing drops the receiver");
    }

    #[test]
    fn a_reader_that_lags_the_ring_catches_up_from_history_without_a_gap() {
        let rooms = Rooms::new(2, LIMITS);
        let chat = ChatId::from_u128(3);
        let mut subs = Subscriptions::default();
        join(&rooms, &mut subs, chat, 0, false);
        publish(&rooms, chat, 1..=20);
        // Pages of 7 from history, then the ring again, with nothing twice.
        let mut got = Vec::new();
        while let Poll::Ready(page) = take(&mut subs, 7) {
            got.extend(page.unwrap());
        }
        assert_eq!(got, (1..=20).collect::<Vec<u8>>());
        publish(&rooms, chat, 21..=21);
        assert_eq!(take(&mut subs, 7), Poll::Ready(Ok(vec![21])));
    }

    /// A small room has no ring: a reader takes its frames from history,
    /// counting a catch-up only when it ran more than a ring behind.
    #[test]
    fn a_small_room_is_read_from_history_and_counts_catchups_past_a_ring() {
        let rooms = Rooms::new(4, LIMITS);
        let chat = ChatId::from_u128(8);
        let mut subs = Subscriptions::default();
        join(&rooms, &mut subs, chat, 0, false);
        publish(&rooms, chat, 1..=4);
        let mut cx = Context::from_waker(noop_waker_ref());
        let budget = Budget { frames: 100, bytes: usize::MAX };
        let mut got = Vec::new();
        let taken = subs.poll_take(&mut cx, USER, budget, |b| got.push(b[0]));
        assert_eq!((got, taken.map(|t| t.map(|t| t.catchups))), (vec![1, 2, 3, 4], Poll::Ready(Ok(0))));
        publish(&rooms, chat, 5..=9);
        let mut got = Vec::new();
        let taken = subs.poll_take(&mut cx, USER, budget, |b| got.push(b[0]));
        assert_eq!((got, taken.map(|t| t.map(|t| t.catchups))), (vec![5, 6, 7, 8, 9], Poll::Ready(Ok(1))));
        assert!(rooms.get(chat).unwrap().take_receiver(0).is_none(), "no ring was made");
    }

    /// A history shorter than the ring (`rooms.history_size` 1, `rooms.buffer`
    /// 4): a small room makes its ring, so frames published before its reader
    /// runs are not evicted from under it.
    #[test]
    fn a_small_room_with_a_history_shorter_than_the_ring_evicts_nothing_unread() {
        let rooms = Rooms::new(4, HistoryLimits { size: 1, ..LIMITS });
        let chat = ChatId::from_u128(9);
        let mut subs = Subscriptions::default();
        join(&rooms, &mut subs, chat, 0, false);
        publish(&rooms, chat, 1..=3);
        assert_eq!(take(&mut subs, 100), Poll::Ready(Ok(vec![1, 2, 3])));
    }

    /// The node-wide byte budget sheds the oldest frames, whatever their
    /// room; a small room's frames that its ring would still hold are not
    /// among them while it has subscribers (they read them from history).
    /// Under load a two-person room's reader a few frames behind, as any
    /// ring allows, was closed with 4008 when other rooms published.
    #[test]
    fn the_byte_budget_does_not_shed_what_a_small_room_has_not_read() {
        let rooms = Rooms::new(4, HistoryLimits { size: 64, bytes: 1000, ..LIMITS });
        let chat = ChatId::from_u128(10);
        let mut subs = Subscriptions::default();
        join(&rooms, &mut subs, chat, 0, false);
        for seq in 1..=2u8 {
            rooms.publish(chat, u64::from(seq), Bytes::from(vec![seq; 100]));
        }
        for other in 11..40 {
            rooms.publish(ChatId::from_u128(other), 1, Bytes::from(vec![0; 100]));
        }
        assert!(rooms.held_bytes() < 1000 + 200, "the rest was shed: {}", rooms.held_bytes());
        assert_eq!(take(&mut subs, 100), Poll::Ready(Ok(vec![1, 2])));
        // Once read past the ring's reach, the budget takes them as before.
        publish(&rooms, chat, 3..=8);
        assert_eq!(take(&mut subs, 100), Poll::Ready(Ok(vec![3, 4, 5, 6, 7, 8])));
        for other in 11..40 {
            rooms.publish(ChatId::from_u128(other), 2, Bytes::from(vec![0; 100]));
        }
        let room = rooms.get(chat).expect("the room");
        assert_eq!(room.read_after(0, 100, usize::MAX, |_| {}), Err(crate::rooms::Evicted { oldest: 5 }));
    }

    #[test]
    fn a_recovery_replays_from_history_then_goes_live() {
        let rooms = Rooms::new(4, LIMITS);
        let chat = ChatId::from_u128(4);
        publish(&rooms, chat, 1..=5);
        let mut subs = Subscriptions::default();
        join(&rooms, &mut subs, chat, 2, true);
        publish(&rooms, chat, 6..=6);
        assert_eq!(take(&mut subs, 100), Poll::Ready(Ok(vec![3, 4, 5, 6])));
        assert!(take(&mut subs, 100).is_pending(), "6 came from history; the ring's copy is skipped");
        assert_eq!(subs.position(chat), Some(6));
    }

    #[test]
    fn nothing_after_a_removal_is_taken_from_the_ring_or_from_history() {
        let rooms = Rooms::new(4, LIMITS);
        let (live, behind) = (ChatId::from_u128(6), ChatId::from_u128(7));
        let mut subs = Subscriptions::default();
        join(&rooms, &mut subs, live, 0, false);
        publish(&rooms, behind, 1..=3);
        join(&rooms, &mut subs, behind, 0, true);
        publish(&rooms, live, 1..=2);
        rooms.revoke(live, USER);
        rooms.revoke(behind, USER);
        publish(&rooms, live, 3..=4);
        publish(&rooms, behind, 4..=4);
        assert_eq!(take(&mut subs, 100), Poll::Ready(Ok(vec![1, 2, 1, 2, 3])));
        assert!(take(&mut subs, 100).is_pending());
    }

    #[test]
    fn falling_behind_further_than_history_stops_the_room() {
        let rooms = Rooms::new(2, HistoryLimits { size: 4, ..LIMITS });
        let chat = ChatId::from_u128(5);
        let mut subs = Subscriptions::default();
        join(&rooms, &mut subs, chat, 0, false);
        publish(&rooms, chat, 1..=10);
        assert_eq!(take(&mut subs, 100), Poll::Ready(Err(Stopped::Evicted { chat, last: 0, oldest: 7 })));
    }
}
