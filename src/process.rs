//! Facts about this process for `/metrics` (resident memory, CPU time, open
//! file descriptors, start time), read from Linux's `/proc`; on other
//! systems there are none and the metrics are left out.

/// The standard process metrics' values (Prometheus' `process_*` names).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Process {
    pub resident_bytes: u64,
    /// User plus system CPU time.
    pub cpu_seconds: f64,
    pub open_fds: u64,
    /// Seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

/// Linux reports CPU and start times in USER_HZ ticks, which its ABI fixes
/// at 100 on every architecture (Prometheus' own `procfs` assumes the same);
/// reading `sysconf` would take the crate's only `unsafe` outside `main`.
const USER_HZ: f64 = 100.0;

/// This process now; `None` off Linux or if `/proc` cannot be read.
pub fn read() -> Option<Process> {
    #[cfg(target_os = "linux")]
    {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let system = std::fs::read_to_string("/proc/stat").ok()?;
        let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
        parse(&stat, &status, &system, open_fds)
    }
    #[cfg(not(target_os = "linux"))]
    None
}

/// The facts from the texts of `/proc/self/stat`, `/proc/self/status` and
/// `/proc/stat` (no IO here, so it is tested on any system).
pub fn parse(stat: &str, status: &str, system: &str, open_fds: u64) -> Option<Process> {
    // The command name (field 2) may hold spaces and parentheses: the
    // fields after it start after the last `)`, with field 3 (state).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let (utime, stime, start_ticks) = (field(14)?, field(15)?, field(22)?);
    let rss_kib: u64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_whitespace().next()?.parse().ok()?;
    let boot: u64 = system.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    Some(Process {
        resident_bytes: rss_kib * 1024,
        cpu_seconds: (utime + stime) as f64 / USER_HZ,
        open_fds,
        start_time_seconds: boot as f64 + start_ticks as f64 / USER_HZ,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_texts_even_with_an_odd_command_name() {
        let stat = "4242 (her ald) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 9 0 12345 \
                    100000000 3000 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        let status = "Name:\therald\nVmPeak:\t  200000 kB\nVmRSS:\t   12000 kB\nThreads:\t9\n";
        let system = "cpu  1 2 3 4\nintr 5\nbtime 1700000000\nprocesses 9\n";
        let p = parse(stat, status, system, 17).expect("parses");
        assert_eq!((p.resident_bytes, p.cpu_seconds, p.open_fds), (12000 * 1024, 3.0, 17));
        assert!((p.start_time_seconds - 1_700_000_123.45).abs() < 1e-3, "{p:?}");
        assert_eq!(parse("garbage", status, system, 1), None);
        assert_eq!(parse(stat, "Name: x\n", system, 1), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn reads_this_process() {
        let p = read().expect("/proc is readable");
        assert!(p.resident_bytes > 0 && p.open_fds > 0 && p.start_time_seconds > 1.6e9, "{p:?}");
    }
}
