//! Counters striped over cache lines, one stripe per thread: for counters
//! that every worker adds to on the delivery path (frames written, the
//! backlog), and the latency histograms it feeds. One shared atomic would
//! bounce its cache line between cores on each delivery; a stripe stays with
//! the thread that adds to it, and a reader (a scrape, a publish's admission
//! check) sums the stripes.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

const STRIPES: usize = 16;

#[repr(align(128))]
#[derive(Default)]
struct Stripe(AtomicU64);

static NEXT_STRIPE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static STRIPE: usize = NEXT_STRIPE.fetch_add(1, Ordering::Relaxed) % STRIPES;
}

/// A counter striped over cache lines. Adds wrap, so it also counts down:
/// the sum read as `i64` is exact as long as the true value fits.
#[derive(Default)]
pub struct Striped([Stripe; STRIPES]);

impl Striped {
    /// Adds `n` (negative: subtracts).
    pub fn add(&self, n: i64) {
        let stripe = STRIPE.with(|s| *s);
        self.0[stripe].0.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The sum of every stripe: each stripe is exact, their sum may mix
    /// instants.
    pub fn sum(&self) -> i64 {
        self.0.iter().fold(0u64, |acc, s| acc.wrapping_add(s.0.load(Ordering::Relaxed))) as i64
    }

    /// The sum as an unsigned count (a counter that only grows).
    pub fn get(&self) -> u64 {
        self.sum() as u64
    }
}

/// Upper bounds of the latency histograms' buckets, in microseconds (the
/// Prometheus client libraries' default shape, extended down to 100 µs: a
/// delivery on an idle node takes well under a millisecond).
const BOUNDS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000,
];

/// One thread's share of a histogram: its buckets (the last is `+Inf`) and
/// the sum of what it observed, in one 128-byte line that no other thread
/// writes.
#[repr(align(128))]
#[derive(Default)]
struct Shard {
    buckets: [AtomicU64; BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

/// A histogram's per-bucket counts (the last is `+Inf`).
pub type Buckets = [u64; BOUNDS_US.len() + 1];

/// A Prometheus histogram of durations, striped per thread like [`Striped`]:
/// an observation is two relaxed adds to the observing thread's own line.
#[derive(Default)]
pub struct Histogram([Shard; STRIPES]);

impl Histogram {
    /// Counts one duration.
    pub fn observe(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = BOUNDS_US.iter().position(|b| us <= *b).unwrap_or(BOUNDS_US.len());
        let shard = &self.0[STRIPE.with(|s| *s)];
        shard.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        shard.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Per-bucket counts now (not cumulative; the last is `+Inf`).
    pub fn counts(&self) -> Buckets {
        self.totals().0
    }

    /// Of the observations between two [`Histogram::counts`], how many
    /// there were and how many were at most `limit` (in buckets whose upper
    /// bound is at most `limit`: one inside a bucket that straddles it
    /// counts as over).
    pub fn within(before: &Buckets, now: &Buckets, limit: Duration) -> (u64, u64) {
        let limit_us = u64::try_from(limit.as_micros()).unwrap_or(u64::MAX);
        let mut all = 0u64;
        let mut within = 0u64;
        for (i, (n, b)) in now.iter().zip(before).enumerate() {
            let count = n.wrapping_sub(*b);
            all = all.wrapping_add(count);
            if BOUNDS_US.get(i).is_some_and(|bound| *bound <= limit_us) {
                within = within.wrapping_add(count);
            }
        }
        (all, within)
    }

    /// Per-bucket counts (not cumulative; the last is `+Inf`) and the sum in
    /// microseconds, summed over the stripes.
    fn totals(&self) -> (Buckets, u64) {
        let mut buckets = [0u64; BOUNDS_US.len() + 1];
        let mut sum = 0u64;
        for shard in &self.0 {
            for (total, b) in buckets.iter_mut().zip(&shard.buckets) {
                *total = total.wrapping_add(b.load(Ordering::Relaxed));
            }
            sum = sum.wrapping_add(shard.sum_us.load(Ordering::Relaxed));
        }
        (buckets, sum)
    }

    /// Appends the Prometheus text of `herald_<name>` (seconds).
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let (buckets, sum_us) = self.totals();
        let _ = writeln!(out, "# HELP herald_{name} {help}\n# TYPE herald_{name} histogram");
        let mut cumulative = 0u64;
        for (i, count) in buckets.iter().enumerate() {
            cumulative += count;
            match BOUNDS_US.get(i) {
                Some(us) => {
                    let _ = writeln!(out, "herald_{name}_bucket{{le=\"{}\"}} {cumulative}", *us as f64 / 1e6);
                }
                None => {
                    let _ = writeln!(out, "herald_{name}_bucket{{le=\"+Inf\"}} {cumulative}");
                }
            }
        }
        let _ = writeln!(out, "herald_{name}_sum {}", sum_us as f64 / 1e6);
        let _ = writeln!(out, "herald_{name}_count {cumulative}");
    }
}

impl std::fmt::Debug for Striped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Striped").field(&self.sum()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stripes_sum_across_threads_and_count_down_too() {
        let counter = std::sync::Arc::new(Striped::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || {
                    for _ in 0..1_000 {
                        counter.add(3);
                        counter.add(-1);
                    }
                })
            })
            .collect();
        for t in threads {
            assert!(t.join().is_ok());
        }
        assert_eq!(counter.sum(), 4 * 2_000);
        counter.add(-10_000);
        assert_eq!(counter.sum(), -2_000);
    }

    #[test]
    fn a_histogram_renders_cumulative_buckets_in_seconds() {
        let h = std::sync::Arc::new(Histogram::default());
        let other = h.clone();
        assert!(std::thread::spawn(move || other.observe(Duration::from_micros(100))).join().is_ok());
        h.observe(Duration::from_micros(101));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let mut text = String::new();
        h.render(&mut text, "t_seconds", "Test.");
        for line in [
            "# TYPE herald_t_seconds histogram",
            "herald_t_seconds_bucket{le=\"0.0001\"} 1",
            "herald_t_seconds_bucket{le=\"0.00025\"} 2",
            "herald_t_seconds_bucket{le=\"0.0025\"} 2",
            "herald_t_seconds_bucket{le=\"0.005\"} 3",
            "herald_t_seconds_bucket{le=\"2.5\"} 3",
            "herald_t_seconds_bucket{le=\"+Inf\"} 4",
            "herald_t_seconds_sum 60.003201",
            "herald_t_seconds_count 4",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in:\n{text}");
        }
        let before = h.counts();
        for ms in [1, 5, 9, 11, 200] {
            h.observe(Duration::from_millis(ms));
        }
        assert_eq!(Histogram::within(&before, &h.counts(), Duration::from_millis(10)), (5, 3));
        assert_eq!(
            Histogram::within(&before, &h.counts(), Duration::from_millis(7)),
            (5, 2),
            "5..10 ms is over 7"
        );
    }
}
