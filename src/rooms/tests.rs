//! The room registry's unit tests: joining, publishing (with and without
//! a ring), history bounds and reads, revocations, races of join and leave
//! (the parent declares this module under `#[cfg(test)]`).

use super::room::SMALL_ROOM;
use super::*;
use std::sync::Barrier;
use std::time::Duration;

const LIMITS: HistoryLimits = HistoryLimits { size: 8, ttl: Duration::from_secs(60), bytes: 1 << 20 };

fn frame(i: u64) -> Bytes {
    Bytes::from(i.to_be_bytes().to_vec())
}

fn read_all(room: &Room, after: u64) -> Result<Vec<u64>, Evicted> {
    let mut got = Vec::new();
    room.read_after(after, usize::MAX, usize::MAX, |b| {
        got.push(u64::from_be_bytes(b[..8].try_into().unwrap()))
    })?;
    Ok(got)
}

fn mailbox() -> Arc<Mailbox> {
    Arc::new(Mailbox::new(8))
}

fn ticket(joined: Joined) -> u32 {
    match joined {
        Joined::Waiting(ticket) => ticket,
        Joined::Live(_) => panic!("joined a ring that should not exist yet"),
    }
}

#[test]
fn rooms_live_while_they_have_subscribers_or_history() {
    let rooms = Rooms::new(4, LIMITS);
    let chat = ChatId::from_u128(1);
    let mb = mailbox();
    let (_, a) = rooms.join(chat, UserId::from_u128(99), &mb);
    let (room, b) = rooms.join(chat, UserId::from_u128(99), &mb);
    let (a, b) = (ticket(a), ticket(b));
    assert_eq!((rooms.len(), rooms.subscribers(chat)), (1, 2));
    assert_eq!(rooms.publish(chat, 1, frame(1)), 2, "both nudged");
    assert_eq!(read_all(&room, 0), Ok(vec![1]));
    room.stop_waiting(a);
    room.stop_waiting(b);
    rooms.leave(chat);
    assert_eq!(rooms.len(), 1, "history keeps the room");
    rooms.sweep(Instant::now() + LIMITS.ttl);
    assert!(rooms.is_empty(), "expired history and no subscriber: gone");
    assert_eq!(rooms.held_frames(), 0);
}

/// An overloaded node names the rooms whose readers it owes frames, or
/// every room when there are too many to name.
#[test]
fn hot_rooms_are_those_carrying_events_to_counted_readers() {
    let rooms = Rooms::new(4, LIMITS);
    let mb = mailbox();
    let (quiet, busy, unread) = (ChatId::from_u128(1), ChatId::from_u128(2), ChatId::from_u128(3));
    for chat in [quiet, busy] {
        let (room, _) = rooms.join(chat, UserId::from_u128(1), &mb);
        room.count_reader(0);
    }
    rooms.publish(busy, 1, frame(1));
    rooms.publish(unread, 1, frame(1));
    assert_eq!(rooms.hot(8), Some(vec![busy]), "no event yet, or no reader here: not hot");
    rooms.publish(quiet, 1, frame(1));
    assert_eq!(rooms.hot(8).map(|h| h.len()), Some(2));
    assert_eq!(rooms.hot(1), None, "more than named: every room");
    rooms.get(busy).unwrap().uncount_reader(1);
    assert_eq!(rooms.hot(1), Some(vec![quiet]));
}

/// A small room carries its frames through history, nudging each
/// ticket; the first publish after it grows past `SMALL_ROOM` makes the
/// ring, with a receiver for everyone waiting, before it sends.
#[test]
fn a_room_makes_its_ring_once_it_grows_past_small() {
    let rooms = Rooms::new(4, LIMITS);
    let chat = ChatId::from_u128(9);
    assert_eq!(rooms.publish(chat, 1, frame(1)), 0);
    let room = rooms.get(chat).unwrap();
    assert!(room.ring.get().is_none(), "history alone makes no ring");

    let (waiter, left) = (mailbox(), mailbox());
    let (_, joined) = rooms.join(chat, UserId::from_u128(1), &waiter);
    let first = ticket(joined);
    let (_, joined) = rooms.join(chat, UserId::from_u128(2), &left);
    room.stop_waiting(ticket(joined));
    assert_eq!((room.subscribers(), room.take_receiver(first).is_none()), (1, true));
    assert!(!waiter.take_pending());

    assert_eq!(rooms.publish(chat, 2, frame(2)), 1, "nudged the one still waiting");
    assert!(waiter.take_pending(), "its mailbox was nudged");
    assert!(!left.take_pending(), "who left is not");
    assert!(room.ring.get().is_none(), "a small room has no ring");
    assert_eq!((room.head(), read_all(&room, 1)), (2, Ok(vec![2])), "the frame is in history");

    let others: Vec<u32> = (0..SMALL_ROOM)
        .map(|i| ticket(rooms.join(chat, UserId::from_u128(10 + i as u128), &mailbox()).1))
        .collect();
    assert_eq!(rooms.publish(chat, 3, frame(3)), SMALL_ROOM + 1, "sent on the new ring");
    assert!(waiter.take_pending(), "nudged to take its receiver");
    let mut rx = room.take_receiver(first).expect("made with the ring");
    assert_eq!(rx.try_recv().unwrap().seq(), 3);
    assert!(room.take_receiver(first).is_none(), "taken once");
    for other in others {
        room.stop_waiting(other);
    }
    assert!(room.waiting().is_none(), "nothing left waiting, nothing kept");
    let (_, joined) = rooms.join(chat, UserId::from_u128(3), &left);
    assert!(matches!(joined, Joined::Live(_)), "later subscribers join the ring");
}

/// A frame history will not hold (here: none is kept) makes the ring
/// whatever the room's size: tickets alone would lose it.
#[test]
fn a_frame_history_does_not_keep_goes_through_a_ring() {
    let rooms = Rooms::new(4, HistoryLimits { size: 0, ..LIMITS });
    let chat = ChatId::from_u128(11);
    let (room, joined) = rooms.join(chat, UserId::from_u128(1), &mailbox());
    let first = ticket(joined);
    assert_eq!(rooms.publish(chat, 1, frame(1)), 1);
    let mut rx = room.take_receiver(first).expect("a ring, made before the frame");
    assert_eq!(rx.try_recv().unwrap().seq(), 1);
}

/// A two-person room allocates two tickets, and its history one slot
/// for its first frame, growing from there.
#[test]
fn a_two_person_room_allocates_for_two() {
    let rooms = Rooms::new(4, LIMITS);
    let chat = ChatId::from_u128(12);
    let (mb, users) = (mailbox(), [UserId::from_u128(1), UserId::from_u128(2)]);
    let (room, _) = rooms.join(chat, users[0], &mb);
    let _ = rooms.join(chat, users[1], &mb);
    assert_eq!(room.waiting().as_ref().map(|w| w.slots.capacity()), Some(2));
    let capacity = |rooms: &Rooms| rooms.get(chat).unwrap().held().capacity();
    rooms.publish(chat, 1, frame(1));
    assert_eq!(capacity(&rooms), 1);
    rooms.publish(chat, 2, frame(2));
    assert_eq!(capacity(&rooms), 2);
    for seq in 3..=8 {
        rooms.publish(chat, seq, frame(seq));
    }
    assert_eq!(read_all(&rooms.get(chat).unwrap(), 0), Ok((1..=8).collect()));
}

#[test]
fn joining_and_leaving_a_room_without_events_reuses_its_tickets() {
    let rooms = Rooms::new(4, LIMITS);
    let chat = ChatId::from_u128(10);
    let mb = mailbox();
    let (room, stays) = rooms.join(chat, UserId::from_u128(1), &mb);
    let stays = ticket(stays);
    for _ in 0..1_000 {
        let (_, a) = rooms.join(chat, UserId::from_u128(2), &mb);
        let (_, b) = rooms.join(chat, UserId::from_u128(3), &mb);
        room.stop_waiting(ticket(b));
        room.stop_waiting(ticket(a));
    }
    assert_eq!(room.subscribers(), 1);
    let slots = room.waiting().as_ref().map_or(0, |w| w.slots.len());
    assert!(slots <= 3, "churn grew the list to {slots}");
    room.stop_waiting(stays);
    assert_eq!(room.subscribers(), 0);
    assert!(room.waiting().is_none(), "an empty list keeps no memory");
}

#[test]
fn a_removed_user_is_cut_off_at_the_head_until_it_joins_again() {
    let rooms = Rooms::new(4, LIMITS);
    let (chat, alice, bob) = (ChatId::from_u128(8), UserId::from_u128(1), UserId::from_u128(2));
    let (room, _joined) = rooms.join(chat, alice, &mailbox());
    rooms.publish(chat, 1, frame(1));
    assert_eq!(room.cutoff(alice), None);
    rooms.revoke(chat, alice);
    rooms.publish(chat, 2, frame(2));
    assert_eq!((room.cutoff(alice), room.cutoff(bob)), (Some(1), None));
    let (_, _again) = rooms.join(chat, alice, &mailbox());
    assert_eq!(room.cutoff(alice), None, "re-added and subscribed again");
}

#[test]
fn a_room_without_subscribers_keeps_history() {
    let rooms = Rooms::new(4, LIMITS);
    let chat = ChatId::from_u128(2);
    for seq in 1..=3 {
        assert_eq!(rooms.publish(chat, seq, frame(seq)), 0);
    }
    let room = rooms.get(chat).unwrap();
    assert_eq!(read_all(&room, 0), Ok(vec![1, 2, 3]));
    assert_eq!(read_all(&room, 2), Ok(vec![3]));
    assert!(room.covers(1, 3) && room.covers(0, 3) && room.covers(3, 3));
    assert!(!room.covers(4, 3), "a since ahead of the room is not covered");
    assert_eq!((rooms.held_frames(), rooms.held_bytes()), (3, 24));
}

#[test]
fn history_is_bounded_by_count_age_and_bytes() {
    let rooms = Rooms::new(4, HistoryLimits { size: 3, ttl: Duration::from_secs(5), bytes: 40 });
    let (a, b) = (ChatId::from_u128(3), ChatId::from_u128(4));
    for seq in 1..=5 {
        rooms.publish(a, seq, frame(seq));
    }
    let room_a = rooms.get(a).unwrap();
    assert_eq!(read_all(&room_a, 2), Ok(vec![3, 4, 5]));
    assert_eq!(read_all(&room_a, 1), Err(Evicted { oldest: 3 }), "count bound");
    assert!(!room_a.covers(1, 5));
    // 8 bytes a frame, 40 bytes node-wide: over budget, the node's
    // oldest frames (room a's) go first, down to 90% of the budget.
    for seq in 1..=3 {
        rooms.publish(b, seq, frame(seq));
    }
    assert_eq!(rooms.held_bytes(), 32);
    assert_eq!(read_all(&rooms.get(b).unwrap(), 0), Ok(vec![1, 2, 3]));
    assert_eq!(read_all(&room_a, 4), Ok(vec![5]));
    assert_eq!(read_all(&room_a, 2), Err(Evicted { oldest: 5 }));
    rooms.sweep(Instant::now() + Duration::from_secs(6));
    assert_eq!((rooms.held_frames(), rooms.held_bytes()), (0, 0), "age bound");
}

#[test]
fn reads_are_paged_and_say_when_they_reach_the_head() {
    let rooms = Rooms::new(4, LIMITS);
    let chat = ChatId::from_u128(5);
    for seq in 1..=5 {
        rooms.publish(chat, seq, frame(seq));
    }
    let room = rooms.get(chat).unwrap();
    let shape = |r: Read| (r.frames, r.last, r.at_head);
    let page = room.read_after(0, 2, usize::MAX, |_| {}).unwrap();
    assert_eq!(shape(page), (2, 2, false));
    assert!(page.oldest.is_some(), "the reader learns how old what it took is");
    let rest = room.read_after(page.last, 10, usize::MAX, |_| {}).unwrap();
    assert_eq!(shape(rest), (3, 5, true));
    let none = room.read_after(5, 10, usize::MAX, |_| {}).unwrap();
    assert_eq!((shape(none), none.oldest), ((0, 5, true), None));
    // 8 bytes a frame: a byte budget of 9 stops after the second.
    assert_eq!(shape(room.read_after(0, 10, 9, |_| {}).unwrap()), (2, 2, false));
}

#[test]
fn a_gap_in_what_this_node_received_restarts_history() {
    let rooms = Rooms::new(4, LIMITS);
    let chat = ChatId::from_u128(6);
    rooms.publish(chat, 1, frame(1));
    rooms.publish(chat, 2, frame(2));
    rooms.publish(chat, 5, frame(5));
    rooms.publish(chat, 4, frame(4));
    let room = rooms.get(chat).unwrap();
    assert_eq!(read_all(&room, 4), Ok(vec![5]));
    assert_eq!(read_all(&room, 2), Err(Evicted { oldest: 5 }), "3 and 4 were never held");
    assert_eq!(rooms.held_frames(), 1);
}

#[test]
fn join_racing_the_last_leave_is_never_lost() {
    let rooms = Arc::new(Rooms::new(4, HistoryLimits { size: 0, ..LIMITS }));
    let chat = ChatId::from_u128(7);
    let mb = mailbox();
    for seq in 0..200u64 {
        let (first_room, first) = rooms.join(chat, UserId::from_u128(99), &mb);
        let barrier = Arc::new(Barrier::new(2));
        let (r, b, m) = (rooms.clone(), barrier.clone(), mb.clone());
        let joiner = std::thread::spawn(move || {
            b.wait();
            r.join(chat, UserId::from_u128(99), &m)
        });
        barrier.wait();
        first_room.stop_waiting(ticket(first));
        rooms.leave(chat);
        let (room, second) = joiner.join().unwrap();
        // Whatever the interleaving, the joiner's room is the live one.
        assert_eq!(rooms.publish(chat, seq, frame(seq)), 1);
        let mut second = match second {
            Joined::Live(rx) => rx,
            Joined::Waiting(ticket) => room.take_receiver(ticket).unwrap(),
        };
        assert_eq!(second.try_recv().unwrap().seq(), seq);
        drop(second);
        rooms.leave(chat);
        assert!(rooms.is_empty());
    }
}

/// A warm two-person room holds its one frame inline: no history box and
/// no slot besides the frame (the warm-idle target, BENCHMARKS.md). The
/// room itself stays within one 112-byte size class.
#[test]
fn one_frame_of_history_is_held_inline() {
    let rooms = Rooms::new(4, LIMITS);
    let chat = ChatId::from_u128(13);
    rooms.publish(chat, 1, frame(1));
    let room = rooms.get(chat).unwrap();
    assert!(matches!(*room.held(), super::history::Lazy::One(_)));
    rooms.publish(chat, 2, frame(2));
    assert!(matches!(*room.held(), super::history::Lazy::Boxed(_)));
    assert_eq!(read_all(&room, 0), Ok(vec![1, 2]));
    assert!(std::mem::size_of::<Room>() + 16 <= 112, "{}", std::mem::size_of::<Room>());
}

/// A ticket's slot is a tag and a pointer: a two-person room's two slots
/// fill one 32-byte size class (the receiver made with the ring is boxed;
/// it is taken at the subscriber's next poll).
#[test]
fn a_ticket_slot_is_two_words() {
    assert_eq!(std::mem::size_of::<super::waiting::Slot>(), 16);
}
