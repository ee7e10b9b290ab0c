//! Process sampling from /proc: CPU time (user + sys) and RSS of loadgen itself and of the server,
//! and the open-files limit that caps how many connections one process can hold.

use std::time::Instant;

use anyhow::Context as _;

/// /proc reports CPU times in USER_HZ, which Linux fixes at 100 ticks per second for userspace.
const TICKS_PER_SEC: f64 = 100.0;

/// `/proc/<pid>` or `/proc/self`.
fn proc_dir(pid: Option<u32>) -> String {
    pid.map_or_else(|| "/proc/self".to_owned(), |p| format!("/proc/{p}"))
}

/// utime + stime in ticks from the text of /proc/PID/stat.
pub(crate) fn parse_stat_ticks(stat: &str) -> Option<u64> {
    // The command name (field 2) may contain spaces and ')': fields are counted after the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After ')' field 3 (state) is index 0, so utime (14) is index 11 and stime (15) index 12.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS in bytes from the text of /proc/PID/status.
pub(crate) fn parse_status_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The soft "Max open files" limit from the text of /proc/self/limits.
pub(crate) fn parse_open_files_limit(limits: &str) -> Option<u64> {
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..].split_whitespace().next()?.parse().ok()
}

/// CPU seconds (user + sys) a process has used so far.
pub(crate) fn cpu_seconds(pid: Option<u32>) -> anyhow::Result<f64> {
    let path = format!("{}/stat", proc_dir(pid));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = parse_stat_ticks(&text).with_context(|| format!("unexpected format of {path}"))?;
    Ok(ticks as f64 / TICKS_PER_SEC)
}

/// Resident set size of a process in bytes.
pub(crate) fn rss_bytes(pid: Option<u32>) -> anyhow::Result<u64> {
    let path = format!("{}/status", proc_dir(pid));
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_status_rss(&text).with_context(|| format!("no VmRSS in {path}"))
}

/// This process's soft open-files limit, if /proc says.
pub(crate) fn open_files_limit() -> Option<u64> {
    parse_open_files_limit(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

/// CPU used by loadgen and (optionally) the server between two points in time.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuMark {
    at: Instant,
    own: f64,
    server: Option<f64>,
}

/// CPU seconds used between two marks, and the wall time between them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuUse {
    pub(crate) wall_secs: f64,
    pub(crate) own_secs: f64,
    pub(crate) server_secs: Option<f64>,
}

impl CpuMark {
    /// Samples now; a server that cannot be read yields `None` for its part.
    pub(crate) fn now(server_pid: Option<u32>) -> Self {
        CpuMark {
            at: Instant::now(),
            own: cpu_seconds(None).unwrap_or(0.0),
            server: server_pid.and_then(|p| cpu_seconds(Some(p)).ok()),
        }
    }

    pub(crate) fn since(&self, earlier: &CpuMark) -> CpuUse {
        CpuUse {
            wall_secs: self.at.duration_since(earlier.at).as_secs_f64(),
            own_secs: self.own - earlier.own,
            server_secs: self.server.zip(earlier.server).map(|(b, a)| b - a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_tricky_command_name() {
        let stat = "4242 (my (weird) prog) S 1 4242 4242 0 -1 4194560 1234 0 0 0 250 75 0 0 20 0 3 0 \
                    1000 123456789 2000 18446744073709551615";
        assert_eq!(parse_stat_ticks(stat), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn parses_status_and_limits() {
        let status = "Name:\therald\nVmPeak:\t  20000 kB\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        assert_eq!(parse_status_rss(status), Some(12345 * 1024));
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             95000                95000                processes \n\
                      Max open files            20000                20000                files     \n";
        assert_eq!(parse_open_files_limit(limits), Some(20000));
    }

    #[test]
    fn samples_this_process() {
        assert!(cpu_seconds(None).is_ok());
        assert!(rss_bytes(None).map(|b| b > 0).unwrap_or(false));
        assert!(open_files_limit().is_some());
        let a = CpuMark::now(Some(std::process::id()));
        let b = CpuMark::now(Some(std::process::id()));
        let used = b.since(&a);
        assert!(used.own_secs >= 0.0 && used.server_secs.is_some());
    }
}
