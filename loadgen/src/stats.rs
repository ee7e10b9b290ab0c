//! Counters shared by all connection tasks: connect outcomes, deliveries, latency histogram,
//! per-room sequence checking and close codes. Tasks batch their updates once per socket read.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;

use hdrhistogram::Histogram;

/// Distinct connect-error messages kept; the rest are counted under "other".
const MAX_ERROR_KINDS: usize = 16;

/// What one `seq` says about the stream of a room as seen by one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SeqOutcome {
    /// First event seen in this room: the baseline.
    First,
    /// Exactly one more than the last.
    InOrder,
    /// Events between the last and this one never arrived (their count).
    Gap(u64),
    /// Equal to or behind the last: delivered again or out of order.
    Duplicate,
}

/// The last `seq` a connection saw in each of its rooms (usually one room, so a short Vec). Seqs
/// are compared only with each other and with the position the server told, never with a fixed
/// start: a room's counter may start anywhere (Herald: the Unix time in microseconds; others: 1).
#[derive(Debug, Default)]
pub(crate) struct SeqTracker {
    rooms: Vec<(Box<[u8]>, u64)>,
}

impl SeqTracker {
    /// Starts room `chat_id` at the position its `subscribed` reported: the next event is
    /// `seq + 1`, and a first event after that is a gap.
    pub(crate) fn start(&mut self, chat_id: &[u8], seq: u64) {
        match self.rooms.iter_mut().find(|(id, _)| &id[..] == chat_id) {
            Some((_, last)) => *last = seq,
            None => self.rooms.push((chat_id.into(), seq)),
        }
    }

    /// Moves the only room's position `n` events on: that many of its deliveries were counted
    /// without being read (`--inflate-every`), so the next one read must be `n` further. `false`
    /// (and nothing moved) unless exactly one room is tracked.
    pub(crate) fn skip_sole(&mut self, n: u64) -> bool {
        match &mut self.rooms[..] {
            [(_, last)] => {
                *last = last.saturating_add(n);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn observe(&mut self, chat_id: &[u8], seq: u64) -> SeqOutcome {
        let Some((_, last)) = self.rooms.iter_mut().find(|(id, _)| &id[..] == chat_id) else {
            self.rooms.push((chat_id.into(), seq));
            return SeqOutcome::First;
        };
        let before = *last;
        if seq <= before {
            return SeqOutcome::Duplicate;
        }
        *last = seq;
        match seq - before {
            1 => SeqOutcome::InOrder,
            n => SeqOutcome::Gap(n - 1),
        }
    }
}

/// Per-connection tallies, flushed into [`Shared`] after each socket read so the hot path takes
/// one lock and a few atomic adds per read instead of per frame.
#[derive(Debug, Default)]
pub(crate) struct Local {
    pub(crate) own: u64,
    pub(crate) in_window: u64,
    pub(crate) foreign: u64,
    pub(crate) gap_missing: u64,
    pub(crate) duplicated: u64,
    pub(crate) malformed: u64,
    pub(crate) pongs: u64,
    /// Deliveries of this run's events (read or not) that arrived inside the measured window.
    pub(crate) arrived_in_window: u64,
    /// Compressed deliveries counted without being inflated (`--inflate-every`).
    pub(crate) uninflated: u64,
    /// Latencies (microseconds) of in-window deliveries since the last flush.
    pub(crate) latencies_us: Vec<u64>,
}

/// Figures every connection task adds to. Lives in an `Arc` held by the runner and every task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) subscribed: AtomicU64,
    pub(crate) connect_errors: AtomicU64,
    connect_error_kinds: Mutex<BTreeMap<String, u64>>,
    /// Deliveries of this run's events (any time), duplicates excluded.
    pub(crate) own_deliveries: AtomicU64,
    /// Deliveries of this run's events published inside the measured window.
    pub(crate) window_deliveries: AtomicU64,
    /// Deliveries of this run's events that arrived inside the measured window, whenever
    /// published: the deliveries the server's CPU over the window paid for, countable without
    /// reading a frame (so with `--inflate-every` too).
    pub(crate) arrived_window_deliveries: AtomicU64,
    /// Compressed deliveries counted but not inflated (`--inflate-every`).
    pub(crate) uninflated_deliveries: AtomicU64,
    /// `message.new` frames not published by this run (other loadgen processes, other publishers).
    pub(crate) foreign_deliveries: AtomicU64,
    pub(crate) gap_missing: AtomicU64,
    pub(crate) duplicated: AtomicU64,
    pub(crate) malformed: AtomicU64,
    pub(crate) pongs: AtomicU64,
    pub(crate) pings_answered: AtomicU64,
    pub(crate) protocol_errors: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
    close_codes: Mutex<BTreeMap<u16, u64>>,
}

impl Shared {
    pub(crate) fn new() -> Self {
        // 1 us .. 1 h at 3 significant digits; values above saturate at the top.
        let hist =
            Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds are valid");
        Shared {
            subscribed: AtomicU64::new(0),
            connect_errors: AtomicU64::new(0),
            connect_error_kinds: Mutex::new(BTreeMap::new()),
            own_deliveries: AtomicU64::new(0),
            window_deliveries: AtomicU64::new(0),
            arrived_window_deliveries: AtomicU64::new(0),
            uninflated_deliveries: AtomicU64::new(0),
            foreign_deliveries: AtomicU64::new(0),
            gap_missing: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            malformed: AtomicU64::new(0),
            pongs: AtomicU64::new(0),
            pings_answered: AtomicU64::new(0),
            protocol_errors: AtomicU64::new(0),
            latency_us: Mutex::new(hist),
            close_codes: Mutex::new(BTreeMap::new()),
        }
    }

    pub(crate) fn connect_failed(&self, err: &anyhow::Error) {
        self.connect_errors.fetch_add(1, Relaxed);
        let mut text = format!("{err:#}");
        text.truncate(160);
        let mut kinds = lock(&self.connect_error_kinds);
        if kinds.len() >= MAX_ERROR_KINDS && !kinds.contains_key(&text) {
            text = "other".to_owned();
        }
        *kinds.entry(text).or_insert(0) += 1;
    }

    pub(crate) fn connect_error_kinds(&self) -> BTreeMap<String, u64> {
        lock(&self.connect_error_kinds).clone()
    }

    /// "text (xN), ..." for an error message.
    pub(crate) fn connect_error_summary(&self) -> String {
        let kinds = self.connect_error_kinds();
        kinds.iter().map(|(text, n)| format!("{text} (x{n})")).collect::<Vec<_>>().join(", ")
    }

    pub(crate) fn closed(&self, code: u16) {
        *lock(&self.close_codes).entry(code).or_insert(0) += 1;
    }

    pub(crate) fn close_codes(&self) -> BTreeMap<u16, u64> {
        lock(&self.close_codes).clone()
    }

    /// Adds a connection's tallies and empties them.
    pub(crate) fn flush(&self, local: &mut Local) {
        for (counter, value) in [
            (&self.own_deliveries, local.own),
            (&self.window_deliveries, local.in_window),
            (&self.foreign_deliveries, local.foreign),
            (&self.gap_missing, local.gap_missing),
            (&self.duplicated, local.duplicated),
            (&self.malformed, local.malformed),
            (&self.pongs, local.pongs),
            (&self.arrived_window_deliveries, local.arrived_in_window),
            (&self.uninflated_deliveries, local.uninflated),
        ] {
            if value != 0 {
                counter.fetch_add(value, Relaxed);
            }
        }
        if !local.latencies_us.is_empty() {
            let mut hist = lock(&self.latency_us);
            for &us in &local.latencies_us {
                hist.saturating_record(us.max(1));
            }
        }
        let latencies = std::mem::take(&mut local.latencies_us);
        *local = Local { latencies_us: latencies, ..Local::default() };
        local.latencies_us.clear();
    }

    pub(crate) fn latency(&self) -> Histogram<u64> {
        lock(&self.latency_us).clone()
    }
}

/// Locks a mutex whose data stays consistent even if a holder panicked (plain counters).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_in_order_gap_and_duplicate() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe(b"room-a", 10), SeqOutcome::First);
        assert_eq!(t.observe(b"room-a", 11), SeqOutcome::InOrder);
        assert_eq!(t.observe(b"room-a", 14), SeqOutcome::Gap(2));
        assert_eq!(t.observe(b"room-a", 14), SeqOutcome::Duplicate);
        assert_eq!(t.observe(b"room-a", 12), SeqOutcome::Duplicate);
        // A backwards seq does not move the baseline: the next in-order event is fine.
        assert_eq!(t.observe(b"room-a", 15), SeqOutcome::InOrder);
    }

    #[test]
    fn a_told_position_is_the_baseline_however_large() {
        let origin = 1_765_000_000_000_000;
        let mut t = SeqTracker::default();
        t.start(b"a", origin);
        assert_eq!(t.observe(b"a", origin + 1), SeqOutcome::InOrder);
        assert_eq!(t.observe(b"a", origin + 3), SeqOutcome::Gap(1));
        t.start(b"b", origin);
        assert_eq!(t.observe(b"b", origin + 2), SeqOutcome::Gap(1), "the first event was missed");
        assert_eq!(t.observe(b"b", origin), SeqOutcome::Duplicate);
        // Without a position, the first event is the baseline.
        assert_eq!(t.observe(b"c", 1), SeqOutcome::First);
    }

    #[test]
    fn rooms_are_tracked_separately() {
        let mut t = SeqTracker::default();
        assert_eq!(t.observe(b"a", 1), SeqOutcome::First);
        assert_eq!(t.observe(b"b", 100), SeqOutcome::First);
        assert_eq!(t.observe(b"a", 2), SeqOutcome::InOrder);
        assert_eq!(t.observe(b"b", 101), SeqOutcome::InOrder);
        assert_eq!(t.observe(b"b", 110), SeqOutcome::Gap(8));
    }

    #[test]
    fn flush_adds_and_resets() {
        let shared = Shared::new();
        let mut local = Local { own: 3, in_window: 2, duplicated: 1, ..Local::default() };
        local.latencies_us.extend([100, 200]);
        shared.flush(&mut local);
        assert_eq!(local.own, 0);
        assert!(local.latencies_us.is_empty());
        local.own = 1;
        shared.flush(&mut local);
        assert_eq!(shared.own_deliveries.load(Relaxed), 4);
        assert_eq!(shared.window_deliveries.load(Relaxed), 2);
        assert_eq!(shared.duplicated.load(Relaxed), 1);
        assert_eq!(shared.latency().len(), 2);
    }

    #[test]
    fn connect_error_kinds_are_bounded() {
        let shared = Shared::new();
        for i in 0..40 {
            shared.connect_failed(&anyhow::anyhow!("error {}", i % 20));
        }
        let kinds = shared.connect_error_kinds();
        assert_eq!(kinds.len(), MAX_ERROR_KINDS + 1);
        assert_eq!(kinds.values().sum::<u64>(), 40);
        assert_eq!(shared.connect_errors.load(Relaxed), 40);
        assert!(shared.connect_error_summary().starts_with("error 0 (x2), "));
    }
}
