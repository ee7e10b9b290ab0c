//! The publishers: `--in-flight` keep-alive connections POSTing `message.sent` events (one object or
//! a `--batch` array, rooms round-robin) at `--rate` events/s or as fast as answers come back,
//! until the end of the run or, with [`Plan::events`], once that many events have been sent.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;
use uuid::Uuid;

use crate::http::{self, HttpConn};
use crate::target::Target;

/// A request with no answer after this long counts as an IO error.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after the end of publishing an outstanding request may still be answered.
const END_GRACE: Duration = Duration::from_secs(2);

/// What to publish, where, and when to stop.
pub(crate) struct Plan {
    /// Nodes to publish to; worker w posts to `targets[w % len]`.
    pub(crate) targets: Vec<Target>,
    pub(crate) api_key: String,
    pub(crate) rooms: Vec<Uuid>,
    pub(crate) batch: usize,
    /// Events per second over all publishers; 0 = as fast as possible.
    pub(crate) rate: u64,
    pub(crate) in_flight: usize,
    pub(crate) start: Instant,
    pub(crate) end: Instant,
    /// Stamped into every event so deliveries of other runs are told apart.
    pub(crate) run_id: u64,
    /// The `content` text of each message.
    pub(crate) content: String,
    /// Publish exactly this many events (event `n` to room `n % rooms`, the last request holding
    /// what is left), then stop; `None` publishes until `end`.
    pub(crate) events: Option<u64>,
}

impl Plan {
    /// Events in request `k`: `batch`, fewer for the last request of a bounded plan, 0 past it.
    pub(crate) fn request_events(&self, k: u64) -> u64 {
        let batch = self.batch as u64;
        match self.events {
            Some(total) => total.saturating_sub(k.saturating_mul(batch)).min(batch),
            None => batch,
        }
    }
}

/// Publisher outcomes. Shared by the workers and the runner through an `Arc`.
#[derive(Debug)]
pub(crate) struct Stats {
    /// Request index handed to the next worker (orders events and paces the rate).
    next_request: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) events_accepted: AtomicU64,
    /// Accepted events per room index, to compute expected deliveries.
    pub(crate) accepted_per_room: Vec<AtomicU64>,
    /// Events whose fate is unknown (IO error or timeout after sending) or answered with an
    /// `accepted` count that does not match the batch.
    pub(crate) events_uncertain: AtomicU64,
    pub(crate) io_errors: AtomicU64,
    pub(crate) statuses: Mutex<BTreeMap<u16, u64>>,
    pub(crate) first_error: Mutex<Option<String>>,
    /// Set on 401: every further request would be refused too.
    pub(crate) aborted: AtomicBool,
}

impl Stats {
    pub(crate) fn new(rooms: usize) -> Self {
        Stats {
            next_request: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            events_accepted: AtomicU64::new(0),
            accepted_per_room: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            events_uncertain: AtomicU64::new(0),
            io_errors: AtomicU64::new(0),
            statuses: Mutex::new(BTreeMap::new()),
            first_error: Mutex::new(None),
            aborted: AtomicBool::new(false),
        }
    }

    fn note_error(&self, text: String) {
        let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
        first.get_or_insert(text);
    }

    fn note_status(&self, status: u16) {
        *self.statuses.lock().unwrap_or_else(|p| p.into_inner()).entry(status).or_insert(0) += 1;
    }
}

/// Unix time in nanoseconds (the clock both sides of a latency sample read).
pub(crate) fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

/// Writes the body for request `k`: its events are numbered `k * batch ..`, room = number % rooms.
pub(crate) fn write_body(plan: &Plan, k: u64, ts: u64, out: &mut Vec<u8>) {
    out.clear();
    let array = plan.batch > 1;
    if array {
        out.push(b'[');
    }
    let sender = Uuid::from_u64_pair(plan.run_id, u64::MAX);
    for j in 0..plan.request_events(k) {
        let n = k * plan.batch as u64 + j;
        if j > 0 {
            out.push(b',');
        }
        let room = plan.rooms[(n % plan.rooms.len() as u64) as usize];
        let id = Uuid::from_u64_pair(plan.run_id, n);
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            r#"{{"type":"message.sent","chat_id":"{room}","data":{{"id":"{id}","content":"{}","sender_id":"{sender}","created_at":"2026-01-15T10:30:00Z","ts":{ts},"run":{}}}}}"#,
            plan.content, plan.run_id
        );
    }
    if array {
        out.push(b']');
    }
}

/// Starts the publishers on a thread and runtime of their own, as a separate publishing service
/// would run: their pace must not depend on how busy this process is receiving deliveries. The
/// receiver resolves once every worker has stopped.
pub(crate) fn spawn_thread(
    plan: Arc<Plan>,
    stats: Arc<Stats>,
) -> anyhow::Result<tokio::sync::oneshot::Receiver<()>> {
    use anyhow::Context as _;
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("publisher".into())
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(run(plan, stats)),
                Err(e) => eprintln!("loadgen: publisher runtime: {e}"),
            }
            let _ = done_tx.send(());
        })
        .context("spawning the publisher thread")?;
    Ok(done_rx)
}

/// Runs the publishers until `plan.end` and returns when every worker has stopped.
pub(crate) async fn run(plan: Arc<Plan>, stats: Arc<Stats>) {
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..plan.in_flight.max(1) {
        workers.spawn(worker(plan.clone(), stats.clone(), w));
    }
    while workers.join_next().await.is_some() {}
}

async fn worker(plan: Arc<Plan>, stats: Arc<Stats>, index: usize) {
    let target = &plan.targets[index % plan.targets.len()];
    let path = target.events_path();
    let interval_ns = if plan.rate > 0 { 1e9 * plan.batch as f64 / plan.rate as f64 } else { 0.0 };
    let mut body = Vec::with_capacity(256 * plan.batch);
    let mut conn: Option<HttpConn> = None;
    loop {
        if stats.aborted.load(Relaxed) {
            return;
        }
        let k = stats.next_request.fetch_add(1, Relaxed);
        if plan.request_events(k) == 0 {
            // A bounded plan handed out its last event.
            return;
        }
        let due = plan.start + Duration::from_nanos((k as f64 * interval_ns) as u64);
        if due >= plan.end {
            return;
        }
        tokio::time::sleep_until(due).await;
        if Instant::now() >= plan.end {
            return;
        }
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match tokio::time::timeout(REQUEST_TIMEOUT, HttpConn::connect(target)).await {
                Ok(Ok(c)) => conn.insert(c),
                Ok(Err(e)) => {
                    stats.io_errors.fetch_add(1, Relaxed);
                    stats.note_error(format!("{e:#}"));
                    // Back off instead of spinning; the request index is simply skipped.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(_) => {
                    stats.io_errors.fetch_add(1, Relaxed);
                    stats.note_error("publisher connect timed out".to_owned());
                    continue;
                }
            },
        };
        if publish_one(&plan, &stats, target, &path, k, c, &mut body).await {
            conn = None;
        }
    }
}

/// Publishes request `k`, again after each 429 (honouring `Retry-After`,
/// as a publisher should) until it is answered otherwise or the run ends.
/// True when the connection cannot be used again.
async fn publish_one(
    plan: &Plan,
    stats: &Stats,
    target: &Target,
    path: &str,
    k: u64,
    c: &mut HttpConn,
    body: &mut Vec<u8>,
) -> bool {
    let rooms = plan.rooms.len() as u64;
    loop {
        write_body(plan, k, unix_nanos(), body);
        stats.requests.fetch_add(1, Relaxed);
        let batch = plan.request_events(k);
        // A request still unanswered shortly after the end is given up: the run must stop on time.
        let limit = REQUEST_TIMEOUT.min((plan.end + END_GRACE).saturating_duration_since(Instant::now()));
        let answer = tokio::time::timeout(limit, c.post_json(&target.host, path, &plan.api_key, body)).await;
        match answer {
            Ok(Ok(resp)) => {
                stats.note_status(resp.status);
                let close = resp.close;
                if resp.status == 429 && !close {
                    // Pushed back (counted among the statuses): none of the
                    // batch was taken, so it goes again after Retry-After.
                    let wait = Duration::from_secs(resp.retry_after.unwrap_or(1))
                        .min(plan.end.saturating_duration_since(Instant::now()));
                    tokio::time::sleep(wait).await;
                    if Instant::now() >= plan.end {
                        return false;
                    }
                    continue;
                }
                if (200..300).contains(&resp.status) {
                    let accepted = http::accepted_count(resp.body).unwrap_or(batch);
                    stats.events_accepted.fetch_add(accepted, Relaxed);
                    if accepted == batch {
                        for j in 0..batch {
                            let room = ((k * plan.batch as u64 + j) % rooms) as usize;
                            stats.accepted_per_room[room].fetch_add(1, Relaxed);
                        }
                    } else {
                        stats.events_uncertain.fetch_add(batch, Relaxed);
                    }
                } else {
                    let text = format!("HTTP {}: {}", resp.status, String::from_utf8_lossy(resp.body));
                    stats.note_error(text.chars().take(200).collect());
                    if resp.status == 401 {
                        stats.aborted.store(true, Relaxed);
                    }
                }
                return close;
            }
            Ok(Err(e)) => {
                stats.io_errors.fetch_add(1, Relaxed);
                stats.events_uncertain.fetch_add(batch, Relaxed);
                stats.note_error(format!("{e:#}"));
                return true;
            }
            Err(_) => {
                stats.io_errors.fetch_add(1, Relaxed);
                stats.events_uncertain.fetch_add(batch, Relaxed);
                stats.note_error("publish request timed out".to_owned());
                return true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ident::room_id;

    fn plan(batch: usize) -> Plan {
        let now = Instant::now();
        Plan {
            targets: vec![Target {
                addr: "127.0.0.1:1".parse().expect("literal"),
                host: "h".into(),
                prefix: String::new(),
            }],
            api_key: "k".into(),
            rooms: vec![room_id(0, 0), room_id(0, 1), room_id(0, 2)],
            batch,
            rate: 0,
            in_flight: 1,
            start: now,
            end: now,
            run_id: 5,
            content: "x".into(),
            events: None,
        }
    }

    #[test]
    fn single_event_body_is_an_object_carrying_the_stamp() {
        let mut out = Vec::new();
        write_body(&plan(1), 4, 123, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
        assert_eq!(v["type"], "message.sent");
        assert_eq!(v["chat_id"], room_id(0, 1).to_string());
        assert_eq!(v["data"]["ts"], 123);
        assert_eq!(v["data"]["run"], 5);
        assert_eq!(v["data"]["content"], "x");
        assert!(Uuid::parse_str(v["data"]["id"].as_str().unwrap_or("")).is_ok());
    }

    #[test]
    fn batch_body_is_an_array_with_rooms_round_robin() {
        let mut out = Vec::new();
        write_body(&plan(4), 1, 9, &mut out);
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out).expect("valid JSON array");
        let rooms: Vec<String> = v.iter().map(|e| e["chat_id"].as_str().unwrap_or("").to_owned()).collect();
        // Events 4..8 -> rooms 1, 2, 0, 1.
        let want: Vec<String> = [1, 2, 0, 1].iter().map(|i| room_id(0, *i).to_string()).collect();
        assert_eq!(rooms, want);
        // Every event carries a different id.
        let mut ids: Vec<&str> = v.iter().map(|e| e["data"]["id"].as_str().unwrap_or("")).collect();
        ids.dedup();
        assert_eq!(ids.len(), 4);
    }

    #[test]
    fn bounded_plan_sends_each_event_once_and_stops() {
        // 7 events in batches of 3: requests of 3, 3 and 1, then nothing.
        let p = Plan { events: Some(7), ..plan(3) };
        assert_eq!((0..5).map(|k| p.request_events(k)).collect::<Vec<_>>(), [3, 3, 1, 0, 0]);
        let mut out = Vec::new();
        write_body(&p, 2, 9, &mut out);
        let v: Vec<serde_json::Value> = serde_json::from_slice(&out).expect("valid JSON array");
        // Event 6 -> room 0, alone in the last request.
        assert_eq!(v.len(), 1);
        assert_eq!(v[0]["chat_id"], room_id(0, 0).to_string());
        assert_eq!(plan(3).request_events(1_000), 3);
    }
}
