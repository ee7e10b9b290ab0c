//! Gives memory the allocator holds free back to the system once a burst of
//! connections has settled. glibc's malloc returns freed memory only from the
//! top of its heaps: the buffers of thousands of WebSocket handshakes, freed
//! as each connection is upgraded, stay resident as holes between the
//! connections that outlive them (about 200 bytes per idle connection,
//! BENCHMARKS.md "Idle connections"). `malloc_trim(0)` releases every whole
//! free page, wherever it lies.

use std::time::Duration;

use tokio::time::Instant;

/// Connections opened or closed since the last trim that make one worth it.
const MIN_CHURN: u64 = 256;
/// Trims are at least this far apart: each walks (and briefly locks) every
/// allocator arena.
const MIN_GAP: Duration = Duration::from_secs(5);
/// Under churn that never settles, trim anyway this often.
const MAX_GAP: Duration = Duration::from_secs(60);

/// Releases whole free pages to the system; true when any were.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[expect(unsafe_code, reason = "glibc's malloc_trim has no safe binding")]
pub fn release_free_memory() -> bool {
    // SAFETY: malloc_trim takes no pointers and has no caller-side
    // invariants; glibc documents it MT-Safe and serializes it with every
    // other allocator call.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators return memory themselves or have no such call.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free_memory() -> bool {
    false
}

/// Decides when to trim, from the count of connections opened plus closed,
/// sampled on the sweeper's tick: once that count has stopped moving for a
/// tick after growing by [`MIN_CHURN`], at most every [`MIN_GAP`] (or every
/// [`MAX_GAP`] while it keeps moving).
#[derive(Debug)]
pub struct Trimmer {
    trimmed_at: u64,
    last_trim: Instant,
    previous: u64,
}

impl Trimmer {
    pub fn new(now: Instant) -> Trimmer {
        Trimmer { trimmed_at: 0, last_trim: now, previous: 0 }
    }

    /// True when a trim is due now (and counts it as done).
    pub fn due(&mut self, churn: u64, now: Instant) -> bool {
        let settled = churn == self.previous;
        self.previous = churn;
        let since = now.saturating_duration_since(self.last_trim);
        let worth = churn.saturating_sub(self.trimmed_at) >= MIN_CHURN;
        if worth && ((settled && since >= MIN_GAP) || since >= MAX_GAP) {
            self.trimmed_at = churn;
            self.last_trim = now;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_a_burst_settles_and_never_for_a_trickle() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_millis(s);
        let mut t = Trimmer::new(start);
        assert!(!t.due(10_000, at(6_000)), "still moving");
        assert!(t.due(10_000, at(6_500)), "settled after the burst");
        assert!(!t.due(10_000, at(7_000)), "nothing new since");
        assert!(!t.due(10_300, at(8_000)));
        assert!(!t.due(10_300, at(8_500)), "settled, but too soon after the last");
        assert!(t.due(10_300, at(11_500)));
        assert!(!t.due(10_400, at(20_000)));
        assert!(!t.due(10_400, at(20_500)), "a trickle is not worth a trim");
        // Churn that never settles still gets a trim now and then.
        let mut churn = 10_400;
        let mut trims = 0;
        for s in 0..240u64 {
            churn += 500;
            trims += u32::from(t.due(churn, at(21_000 + s * 500)));
        }
        assert_eq!(trims, 2, "every MAX_GAP over two minutes");
    }

    /// Resident bytes of this process, from /proc (Linux only).
    fn resident() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        pages * 4096
    }

    /// Holes between live allocations (what handshakes leave) go back to the
    /// system: glibc's own trimming, from the top of the heap, cannot.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn free_pages_between_live_allocations_go_back_to_the_system() {
        // 64 MiB in 4 KiB pieces, every 64th kept: nothing is at the top.
        let mut pieces: Vec<Option<Vec<u8>>> = (0..16_384).map(|i| Some(vec![i as u8; 4096])).collect();
        for (i, piece) in pieces.iter_mut().enumerate() {
            if i % 64 != 0 {
                *piece = None;
            }
        }
        let before = resident();
        assert!(release_free_memory(), "there were free pages to give back");
        let after = resident();
        assert!(before.saturating_sub(after) > 32 << 20, "resident {before} -> {after}");
        assert!(pieces.iter().step_by(64).all(|p| p.as_ref().is_some_and(|v| v.len() == 4096)));
    }
}
