//! `loadgen recovery`: publish at a fixed rate while a fraction of connections repeatedly drop
//! their socket and resume with `since`, and another fraction stops reading for a while; report,
//! per class, whether every connection saw every seq of its room exactly once.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::bail;
use tokio::time::Instant;

use crate::cli::RecoveryArgs;
use crate::report::{RecoveryReport, StreamsHead};
use crate::streams::Harness;

pub(crate) async fn run(args: RecoveryArgs) -> anyhow::Result<RecoveryReport> {
    let (common, s) = (&args.common, &args.streams);
    common.check_durations(&[
        ("--duration", args.duration),
        ("--drain", s.drain),
        ("--churn-every", s.churn_every),
        ("--outage", s.outage),
        ("--stall-for", s.stall_for),
        ("--stall-every", s.stall_every),
    ])?;
    if args.duration.is_zero() {
        bail!("--duration must be more than 0");
    }
    let mut h = Harness::open(common, s, None, 0, "recovery").await?;
    let publishing = h.publish(s, args.duration, common.server_pid)?;
    let total = args.duration.as_millis() as u64;
    h.progress.phase("publish", total);
    while Instant::now() < publishing.end {
        h.progress.set(
            publishing.start.elapsed().as_millis().min(u128::from(total)) as u64,
            format!(
                "ms  events {}  resumes {}",
                h.ctx.published().events_accepted.load(Relaxed),
                h.ctx.resumes()
            ),
        );
        tokio::time::sleep_until(publishing.end.min(Instant::now() + Duration::from_millis(200))).await;
    }
    let mix = h.ctx.mix();
    let (url, connect) = (common.url.clone(), h.connect.clone());
    let streams = h.finish(publishing, s.drain, common.server_pid).await;
    Ok(RecoveryReport {
        head: StreamsHead {
            mode: "recovery",
            url,
            also_urls: s.also_urls.clone(),
            layout: (!s.also_urls.is_empty()).then(|| s.layout.name()),
            connect,
            rate_target: s.rate,
            duration_secs: args.duration.as_secs_f64(),
            drain_secs: s.drain.as_secs_f64(),
            presence: crate::report::PresenceSummary::read(common),
        },
        churn_conns: mix.churn as u64,
        stall_conns: mix.stall as u64,
        churn_every_ms: s.churn_every.as_millis() as u64,
        outage_max_ms: s.outage.as_millis() as u64,
        stall_for_ms: s.stall_for.as_millis() as u64,
        stall_every_ms: s.stall_every.as_millis() as u64,
        stall_rcvbuf: s.stall_rcvbuf,
        streams,
    })
}
