//! `loadgen soak`: minutes of fixed-rate events with every healthy class (steady, churn, stall,
//! switch) and abusive clients mixed in, sampling the server's memory and tasks; the verdict is
//! zero loss for healthy clients and only the promised close codes for abusive ones.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::abuse::{self, AbuseCtx};
use crate::cli::SoakArgs;
use crate::frame::CLOSE_ABNORMAL;
use crate::ident::Minter;
use crate::procfs;
use crate::report::{AbuseReport, ClassReport, RssGrowth, Sample, SoakReport, StreamsHead, Verdict};
use crate::scrape;
use crate::streams::{Harness, Switching};

/// Longest soak: the run must stay bounded on a shared machine.
const MAX_DURATION: Duration = Duration::from_secs(3600);
/// Share of the run before RSS growth is judged.
const WARMUP_SHARE: f64 = 0.2;
/// How long abusive clients get to stop once told.
const ABUSE_GRACE: Duration = Duration::from_secs(3);
/// The gauges sampled from /metrics.
const GAUGES: &[&str] =
    &["herald_tasks", "herald_connections", "herald_users", "herald_rooms", "herald_history_bytes"];

pub(crate) async fn run(args: SoakArgs) -> anyhow::Result<SoakReport> {
    let (common, s) = (&args.common, &args.streams);
    common.check_durations(&[
        ("--drain", s.drain),
        ("--churn-every", s.churn_every),
        ("--outage", s.outage),
        ("--stall-for", s.stall_for),
        ("--stall-every", s.stall_every),
        ("--switch-every", args.switch_every),
        ("--abuse-pause", args.abuse_pause),
    ])?;
    if args.duration.is_zero() || args.duration > MAX_DURATION {
        bail!("--duration must be more than 0 and at most 1h");
    }
    if args.sample_every.is_zero() {
        bail!("--sample-every must be more than 0");
    }
    let counts = [
        args.ping_flooders,
        args.garbage_senders,
        args.non_utf8_senders,
        args.tricklers,
        args.idle_http,
        args.slowloris,
    ];
    let abusers: u64 = counts.iter().map(|n| u64::from(*n)).sum();
    let switching = Switching { fraction: args.switch, every: args.switch_every, rooms: args.switch_rooms };
    // Abusive clients and the sampler's scrape hold files too.
    let mut h = Harness::open(common, s, Some(switching), abusers + 2, "soak").await?;
    if common.server_pid.is_none() {
        h.notes.push("no --server-pid: the series has no RSS and memory growth is not judged".to_owned());
    }
    let abuse_ctx = Arc::new(AbuseCtx::new(
        h.target.clone(),
        Minter::new(&common.jwt_secret),
        h.rooms(),
        common.source_addrs.first().copied(),
        args.abuse_pause,
    ));
    let (stop_tx, stop_rx) = watch::channel(false);
    let publishing = h.publish(s, args.duration, common.server_pid)?;
    let mut abusive = abuse::spawn(&abuse_ctx, counts, &stop_rx);

    eprintln!("{}", Sample::HEADER);
    let mut series = Vec::new();
    let mut next = publishing.start;
    loop {
        let now = Instant::now();
        if now >= next || now >= publishing.end {
            let sample = sample(&h, common.server_pid, publishing.start).await;
            eprintln!("{}", sample.line());
            series.push(sample);
            next += args.sample_every;
        }
        if now >= publishing.end {
            break;
        }
        tokio::time::sleep_until(next.min(publishing.end)).await;
    }
    let _ = stop_tx.send(true);
    if tokio::time::timeout(ABUSE_GRACE, async { while abusive.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        abusive.abort_all();
        h.notes.push("abusive clients did not stop in time".to_owned());
    }
    let abuse = abuse_ctx.reports();
    let (url, connect) = (common.url.clone(), h.connect.clone());
    let targets = h.targets.clone();
    let streams = h.finish(publishing, s.drain, common.server_pid).await;
    let backlog_at_end = settled_backlog(&targets).await;
    let warmup_secs = args.duration.as_secs_f64() * WARMUP_SHARE;
    let rss: Vec<(f64, u64)> = series
        .iter()
        .filter_map(|p| Some((p.t_secs, p.server_rss_kb?)))
        .filter(|(t, _)| *t >= warmup_secs)
        .collect();
    Ok(SoakReport {
        head: StreamsHead {
            mode: "soak",
            url,
            also_urls: s.also_urls.clone(),
            layout: (!s.also_urls.is_empty()).then(|| s.layout.name()),
            connect,
            rate_target: s.rate,
            duration_secs: args.duration.as_secs_f64(),
            drain_secs: s.drain.as_secs_f64(),
            presence: crate::report::PresenceSummary::read(common),
        },
        warmup_secs,
        series,
        rss_growth: rss_growth(&rss),
        verdict: verdict(&streams.classes, &abuse, backlog_at_end),
        backlog_at_end,
        abuse,
        streams,
    })
}

/// The servers' backlog (frames owed to their readers, summed over the nodes)
/// once every client has closed: 0 unless their accounting drifted. Waits up
/// to [`ABUSE_GRACE`] for the closes to land; None for a server without the
/// gauge.
async fn settled_backlog(targets: &[crate::target::Target]) -> Option<f64> {
    let deadline = Instant::now() + ABUSE_GRACE;
    loop {
        let owed = scrape::fetch_sum(targets, &["herald_backlog_frames"])
            .await
            .ok()?
            .get("herald_backlog_frames")
            .copied()?;
        if owed == 0.0 || Instant::now() >= deadline {
            return Some(owed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The server now: RSS, the gauges, and the run's counts so far.
async fn sample(h: &Harness, server_pid: Option<u32>, start: Instant) -> Sample {
    let gauges = scrape::fetch(&h.target, GAUGES).await.unwrap_or_default();
    let gauge = |name: &str| gauges.get(name).copied();
    Sample {
        t_secs: start.elapsed().as_secs_f64(),
        server_rss_kb: server_pid.and_then(|p| procfs::rss_bytes(Some(p)).ok()).map(|b| b / 1024),
        tasks: gauge("herald_tasks"),
        connections: gauge("herald_connections"),
        users: gauge("herald_users"),
        rooms: gauge("herald_rooms"),
        history_bytes: gauge("herald_history_bytes"),
        events_accepted: h.ctx.published().events_accepted.load(Relaxed),
        deliveries: h.ctx.deliveries(),
    }
}

/// Least-squares slope (KiB per minute) and spread of `(seconds, KiB)` samples.
pub(crate) fn rss_growth(samples: &[(f64, u64)]) -> Option<RssGrowth> {
    if samples.len() < 2 {
        return None;
    }
    let n = samples.len() as f64;
    let mean_t = samples.iter().map(|(t, _)| t).sum::<f64>() / n;
    let mean_kb = samples.iter().map(|(_, kb)| *kb as f64).sum::<f64>() / n;
    let (mut cov, mut var) = (0.0, 0.0);
    for (t, kb) in samples {
        cov += (t - mean_t) * (*kb as f64 - mean_kb);
        var += (t - mean_t) * (t - mean_t);
    }
    if var == 0.0 {
        return None;
    }
    let kbs = samples.iter().map(|(_, kb)| *kb);
    let spread = kbs.clone().max().unwrap_or(0) - kbs.min().unwrap_or(0);
    Some(RssGrowth { samples: samples.len(), slope_kb_per_min: cov / var * 60.0, max_minus_min_kb: spread })
}

/// Healthy classes lose nothing, see nothing twice, resume within history, and every
/// server-side end of theirs came with a close code; abusive ones end only as their limits
/// promise; and with every client gone the server owes no frames (its backlog did not drift).
pub(crate) fn verdict(
    classes: &[ClassReport],
    abuse: &[AbuseReport],
    backlog_at_end: Option<f64>,
) -> Verdict {
    let healthy_lost = classes.iter().map(|c| c.lost).sum();
    let healthy_duplicated = classes.iter().map(|c| c.duplicated).sum();
    let healthy_unexplained_drops =
        classes.iter().map(|c| c.close_codes.get(&CLOSE_ABNORMAL).copied().unwrap_or(0)).sum();
    let abusive_unexpected = abuse.iter().map(|a| a.unexpected).sum();
    let mut reasons = Vec::new();
    for c in classes.iter().filter(|c| c.lost + c.duplicated > 0) {
        reasons.push(format!(
            "{}: {} lost ({} in gaps, {} never arrived), {} duplicated",
            c.class, c.lost, c.gap_missing, c.tail_missing, c.duplicated
        ));
    }
    for c in classes.iter().filter(|c| c.not_recovered > 0) {
        // Skipped events are accounted, not lost, but a soak keeps every return within history.
        reasons.push(format!(
            "{}: {} resumes not recovered ({} events skipped)",
            c.class, c.not_recovered, c.not_recovered_skipped
        ));
    }
    for c in classes {
        if let Some(n) = c.close_codes.get(&CLOSE_ABNORMAL) {
            reasons.push(format!("{}: {n} connections ended without a close frame", c.class));
        }
    }
    for a in abuse.iter().filter(|a| a.unexpected > 0) {
        let odd: Vec<String> = a
            .outcomes
            .iter()
            .filter(|(o, _)| !a.expected.contains(&o.as_str()))
            .map(|(o, n)| format!("{n} x {o}"))
            .collect();
        reasons.push(format!("{}: {} (expected {})", a.kind, odd.join(", "), a.expected.join(" or ")));
    }
    if let Some(owed) = backlog_at_end.filter(|o| *o != 0.0) {
        reasons.push(format!("server backlog {owed} frames with every client gone (accounting drift)"));
    }
    Verdict {
        pass: reasons.is_empty(),
        healthy_lost,
        healthy_duplicated,
        healthy_unexplained_drops,
        abusive_unexpected,
        reasons,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn rss_growth_is_a_least_squares_slope_per_minute_and_a_spread() {
        // About 30 KiB per 10 s, unevenly: the fitted slope is 2.8 KiB/s.
        let rising = [(0.0, 1000), (10.0, 1040), (20.0, 1050), (30.0, 1090)];
        let g = rss_growth(&rising).expect("two or more samples");
        assert!((g.slope_kb_per_min - 168.0).abs() < 1e-9, "{g:?}");
        assert_eq!((g.samples, g.max_minus_min_kb), (4, 90));
        let flat = [(12.0, 5000), (22.0, 5008), (32.0, 5000)];
        assert_eq!(rss_growth(&flat).map(|g| g.slope_kb_per_min), Some(0.0));
        assert_eq!(rss_growth(&flat[..1]), None);
        assert_eq!(rss_growth(&[(5.0, 1), (5.0, 2)]), None, "no time between samples");
    }

    fn class(name: &'static str, lost: u64, closes: &[(u16, u64)]) -> ClassReport {
        ClassReport {
            class: name,
            conns: 1,
            expected_deliveries: 10,
            deliveries: 10 - lost,
            lost,
            gap_missing: lost,
            tail_missing: 0,
            duplicated: 0,
            foreign_deliveries: 0,
            malformed_frames: 0,
            error_replies: 0,
            drops: 0,
            stalls: 0,
            switches: 0,
            resumes: 0,
            resumes_on_other_node: 0,
            recovered: 0,
            recovered_events: 0,
            max_behind_on_resume: 0,
            max_replay_bytes: 0,
            not_recovered: 0,
            not_recovered_skipped: 0,
            position_resets: 0,
            not_recovered_reasons: BTreeMap::new(),
            reconnect_errors: 0,
            reconnect_error_kinds: BTreeMap::new(),
            close_codes: closes.iter().copied().collect(),
        }
    }

    fn abuse(kind: &'static str, expected: &'static str, outcomes: &[(&str, u64)]) -> AbuseReport {
        let unexpected = outcomes.iter().filter(|(o, _)| *o != expected).map(|(_, n)| n).sum();
        AbuseReport {
            kind,
            clients: 1,
            connections: outcomes.iter().map(|(_, n)| n).sum(),
            expected: vec![expected],
            outcomes: outcomes.iter().map(|(o, n)| ((*o).to_owned(), *n)).collect(),
            unexpected,
            open_at_end: 0,
            rounds_unclosed: 0,
        }
    }

    #[test]
    fn the_verdict_passes_only_with_no_loss_and_every_close_explained() {
        let healthy = [class("steady", 0, &[]), class("stall", 0, &[(4008, 3)])];
        let abusive = [abuse("non_utf8", "1007", &[("1007", 9)])];
        let v = verdict(&healthy, &abusive, Some(0.0));
        assert!(v.pass && v.reasons.is_empty(), "{v:?}");
        assert!(verdict(&healthy, &abusive, None).pass, "a server without the gauge is not judged on it");
        let v = verdict(&healthy, &abusive, Some(12.0));
        assert_eq!(v.reasons, ["server backlog 12 frames with every client gone (accounting drift)"]);

        let mut unrecovered = class("switch", 0, &[]);
        unrecovered.not_recovered = 1;
        let v =
            verdict(&[class("churn", 2, &[]), class("steady", 0, &[(1006, 1)]), unrecovered], &abusive, None);
        assert!(!v.pass);
        assert_eq!((v.healthy_lost, v.healthy_unexplained_drops), (2, 1));
        assert_eq!(v.reasons.len(), 3, "{v:?}");

        let v = verdict(&healthy, &[abuse("trickle", "4008", &[("4008", 4), ("1006", 1)])], None);
        assert_eq!((v.pass, v.abusive_unexpected), (false, 1));
        assert_eq!(v.reasons, ["trickle: 1 x 1006 (expected 4008)"]);
    }
}
