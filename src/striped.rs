//! Counters striped over cache lines, one stripe per thread: for counters
//! that every worker adds to on the delivery path (frames written, the
//! backlog). One shared atomic would bounce its cache line between cores
//! on each delivery; a stripe stays with the thread that adds to it, and a
//! reader (a scrape, a publish's admission check) sums the stripes.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

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
}
