//! The bodies of the fuzz targets, one function per target, shared by the
//! libFuzzer binaries (`fuzz_targets/*.rs`) and the stable corpus replay
//! (`tests/fuzz_corpus.rs`), so both check the same invariants. Each function
//! takes the raw fuzzer input, derives structured arguments from it (the
//! layout is documented per function, so seeds can be written by hand), and
//! panics only when an invariant breaks.

use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use herald::auth::{self, Verifier};
use herald::config::{AuthConfig, Config};
use herald::protocol::assemble::{Assembler, Inbound};
use herald::protocol::client::{self, Command};
use herald::protocol::deflate::{self, InflateError};
use herald::protocol::event::{self, DomainEvent};
use herald::protocol::frame::{self, DecodeError};

/// A target's body: panics when an invariant breaks.
pub(crate) type Target = fn(&[u8]);

/// Every target by name: the directory names under `fuzz/corpus/` and
/// `fuzz/regressions/`, and the binaries under `fuzz/fuzz_targets/`.
pub(crate) const TARGETS: &[(&str, Target)] = &[
    ("frame_decode", frame_decode),
    ("reassemble", reassemble),
    ("inflate", inflate),
    ("client_command", client_command),
    ("ingress_events", ingress_events),
    ("config", config),
    ("token", token),
];

/// Message size limits picked by one input byte: the edges of the length
/// classes, the default, and values near `usize::MAX` (the config accepts
/// any positive `websocket.max_message_size`).
const MAXES: [usize; 16] = [
    0,
    1,
    7,
    125,
    126,
    127,
    1000,
    65_535,
    65_536,
    65_537,
    1 << 20,
    u32::MAX as usize,
    1 << 62,
    usize::MAX / 2,
    usize::MAX - 1,
    usize::MAX,
];

fn max_from(selector: u8) -> usize {
    MAXES[usize::from(selector) % MAXES.len()]
}

/// Input: `[max selector] [bytes...]`. Decodes one client frame from the bytes.
pub(crate) fn frame_decode(data: &[u8]) {
    let Some((&selector, buf)) = data.split_first() else { return };
    let max = max_from(selector);
    match frame::decode(buf, max) {
        Ok(None) => {}
        Ok(Some((decoded, used))) => {
            let len = decoded.payload.len();
            assert!(used <= buf.len(), "consumed {used} of {} bytes", buf.len());
            assert!(len <= max, "payload of {len} bytes over max {max}");
            assert!(!decoded.op.is_control() || (decoded.fin && len <= 125), "bad control frame accepted");
            // The frame ends with the mask and the masked payload: masking the
            // decoded payload again must give back exactly those bytes.
            assert!(used >= len + 6, "frame of {used} bytes too short for its {len}-byte payload");
            let tail = &buf[used - len - 4..used];
            let mask = [tail[0], tail[1], tail[2], tail[3]];
            let again = frame::masked(buf[0], &decoded.payload, mask);
            assert_eq!(&again[again.len() - len - 4..], tail, "payload does not unmask to the input");
            // A strict prefix of a complete frame only ever asks for more bytes.
            assert_eq!(frame::decode(&buf[..used - 1], max), Ok(None), "prefix of a complete frame");
        }
        Err(e) => check_error(e, max),
    }
}

fn check_error(e: DecodeError, max: usize) {
    match e {
        DecodeError::TooBig(n) => {
            assert!(n > max as u64, "TooBig({n}) under max {max}");
            assert_eq!(e.close_code().code(), 1009);
        }
        DecodeError::InvalidUtf8 | DecodeError::BadDeflate => assert_eq!(e.close_code().code(), 1007),
        _ => assert_eq!(e.close_code().code(), 1002),
    }
}

/// What a stream produced, up to and including its first close frame (the
/// connection stops reading there) or its first error.
#[derive(Debug, PartialEq)]
struct Outcome {
    messages: Vec<Inbound>,
    error: Option<DecodeError>,
}

fn feed(stream: &[u8], cuts: &[u8], max: usize, deflate: bool) -> Outcome {
    let mut assembler = Assembler::default();
    // Every message decoded so far, in order; `waiting` holds those not yet
    // answered, which is what `ingest` bounds (a connection answers what one
    // read decoded before it reads again).
    let mut all = Vec::new();
    let mut rest = stream;
    let mut cut = cuts.iter().cycle();
    loop {
        // Without cut lengths the stream arrives in one read; a length of 0
        // reads one byte (an empty read is the end of the stream, never ingested).
        let n = cut.next().map_or(rest.len(), |&n| usize::from(n).max(1)).min(rest.len());
        let (read, after) = rest.split_at(n);
        rest = after;
        let mut waiting = Vec::new();
        let mut result = assembler.ingest(read, max, deflate, &mut waiting);
        // As a connection does: what the assembler held back is decoded once
        // the messages waiting are answered, and those waiting never hold
        // more than one message past `max`.
        loop {
            let held: usize = waiting.iter().map(waiting_bytes).sum();
            assert!(held <= max.saturating_mul(2), "{held} bytes waiting under max {max}");
            let closed = waiting.iter().any(|m| matches!(m, Inbound::Close(_)));
            if result.is_err() || closed || !assembler.held_back() {
                break;
            }
            all.append(&mut waiting);
            result = assembler.ingest(&[], max, deflate, &mut waiting);
        }
        all.append(&mut waiting);
        if let Some(i) = all.iter().position(|m| matches!(m, Inbound::Close(_))) {
            all.truncate(i + 1);
            return Outcome { messages: all, error: None };
        }
        if let Err(e) = result {
            return Outcome { messages: all, error: Some(e) };
        }
        if rest.is_empty() {
            return Outcome { messages: all, error: None };
        }
    }
}

/// Bytes a decoded message holds while it waits to be answered.
fn waiting_bytes(m: &Inbound) -> usize {
    match m {
        Inbound::Text(payload) | Inbound::Ping(payload) => payload.len(),
        _ => 0,
    }
}

/// Input: `[max selector] [k] [k read lengths] [stream...]` with `k` taken
/// modulo 8. Feeds the stream to an [`Assembler`] in reads of those lengths
/// (cycled) and once in a single read: both must agree,
/// and what comes out is bounded by what went in.
pub(crate) fn reassemble(data: &[u8]) {
    let [selector, k, rest @ ..] = data else { return };
    let max = max_from(*selector);
    let k = usize::from(*k % 8).min(rest.len());
    let (cuts, stream) = rest.split_at(k);
    let split = feed(stream, cuts, max, false);
    let whole = feed(stream, &[], max, false);
    assert_eq!(split, whole, "the same bytes read differently gave different messages");

    let mut total = 0;
    for m in &split.messages {
        match m {
            Inbound::Text(text) => {
                assert!(text.len() <= max, "message of {} bytes over max {max}", text.len());
                total += text.len();
            }
            Inbound::Ping(payload) => {
                assert!(payload.len() <= 125, "ping of {} bytes", payload.len());
                total += payload.len();
            }
            Inbound::Binary | Inbound::Pong | Inbound::Close(_) => {}
        }
    }
    assert!(total <= stream.len(), "{total} bytes out of {} in", stream.len());
    // Every frame costs at least its 2-byte header and 4-byte mask.
    assert!(split.messages.len() <= stream.len() / 6, "more messages than frames fit");
    if let Some(e) = split.error {
        check_error(e, max);
    }
}

/// Input: `[max selector] [k] [k read lengths] [stream...]`, as
/// [`reassemble`], on a connection that negotiated permessage-deflate:
/// compressed messages (RSV1) are inflated. Split and whole reads agree,
/// no message is over `max` once inflated, and errors carry their close
/// codes. Then the stream itself is inflated as one message payload: never
/// more than `max` bytes, and a payload Herald's own deflate made inflates
/// back to itself.
pub(crate) fn inflate(data: &[u8]) {
    let [selector, k, rest @ ..] = data else { return };
    let max = max_from(*selector);
    let k = usize::from(*k % 8).min(rest.len());
    let (cuts, stream) = rest.split_at(k);
    let split = feed(stream, cuts, max, true);
    let whole = feed(stream, &[], max, true);
    assert_eq!(split, whole, "the same bytes read differently gave different messages");
    for m in &split.messages {
        if let Inbound::Text(text) = m {
            assert!(text.len() <= max, "inflated message of {} bytes over max {max}", text.len());
        }
    }
    if let Some(e) = split.error {
        check_error(e, max);
    }
    // A small limit keeps a fuzzed bomb cheap; the bound is what is checked.
    let limit = max.min(1 << 20);
    match deflate::inflate(stream.to_vec(), limit) {
        Ok(out) => assert!(out.len() <= limit, "inflated {} bytes over {limit}", out.len()),
        Err(InflateError::TooBig(n)) => assert!(n > limit as u64, "TooBig({n}) under {limit}"),
        Err(InflateError::Corrupt) => {}
    }
    let round = deflate::deflate_payload(stream);
    assert_eq!(deflate::inflate(round, stream.len()).as_deref(), Ok(stream), "round trip");
}

/// Input: one text frame's payload. A command that parses was valid JSON, and
/// its canonical encoding parses back to the same command.
pub(crate) fn client_command(data: &[u8]) {
    let Ok(command) = client::parse(data) else { return };
    assert!(is_json_text(data), "accepted invalid JSON");
    let canonical = match command {
        Command::Subscribe { chat_id, since, presence } => {
            serde_json::json!({ "type": "subscribe", "chat_id": chat_id, "since": since, "presence": presence })
        }
        Command::Presence { chat_id } => serde_json::json!({ "type": "presence", "chat_id": chat_id }),
        Command::Typing { chat_id } => serde_json::json!({ "type": "typing", "chat_id": chat_id }),
        Command::Unsubscribe { chat_id } => serde_json::json!({ "type": "unsubscribe", "chat_id": chat_id }),
        Command::Ping => serde_json::json!({ "type": "ping" }),
    };
    assert_eq!(client::parse(canonical.to_string().as_bytes()), Ok(command), "{canonical}");
}

/// UTF-8 text that follows the JSON grammar. Deliberately weaker than
/// `serde_json::Value`, which also refuses numbers beyond `f64` and lone
/// surrogate escapes: both are grammatical JSON, and Herald only passes them
/// through (in `data`) or drops them (in unknown fields).
fn is_json_text(data: &[u8]) -> bool {
    std::str::from_utf8(data).is_ok() && serde_json::from_slice::<serde::de::IgnoredAny>(data).is_ok()
}

fn same_event(a: &DomainEvent, b: &DomainEvent) -> bool {
    a.kind == b.kind
        && a.chat_id == b.chat_id
        && a.user_id == b.user_id
        && a.user_ids == b.user_ids
        && a.data.as_ref().map(|d| d.get()) == b.data.as_ref().map(|d| d.get())
}

/// Re-encodes an event as the Redis bus does and parses it back.
fn round_trip(ev: &DomainEvent, seq: Option<u64>) {
    let json = ev.to_json(seq);
    match DomainEvent::from_json(json.as_bytes()) {
        Ok((back, back_seq)) => {
            assert!(same_event(ev, &back), "round trip changed the event: {ev:?} -> {json} -> {back:?}");
            assert_eq!(seq, back_seq, "round trip changed seq: {json}");
        }
        Err(e) => panic!("re-encoded event does not parse: {ev:?} -> {json}: {e}"),
    }
}

/// Input: a `POST /api/events` body, and the same bytes as one event on the
/// Redis bus. Only JSON (which is UTF-8) is accepted, and whatever parses
/// survives the bus's re-encoding unchanged.
pub(crate) fn ingress_events(data: &[u8]) {
    if let Ok(events) = event::parse_batch(data) {
        assert!(is_json_text(data), "accepted invalid JSON");
        for ev in &events {
            round_trip(ev, None);
        }
    }
    if let Ok((ev, seq)) = DomainEvent::from_json(data) {
        assert!(is_json_text(data), "bus accepted invalid JSON");
        round_trip(&ev, seq);
    }
}

/// Input: `YAML [\0 KEY=VALUE [\n KEY=VALUE ...]]`, both read as lossy UTF-8.
/// A config that loads, written back out as YAML (as `herald check-config`
/// renders it), loads to the same config.
pub(crate) fn config(data: &[u8]) {
    let (yaml, env) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let yaml = String::from_utf8_lossy(yaml);
    let env: Vec<(String, String)> = String::from_utf8_lossy(env)
        .split('\n')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let path = Path::new("fuzz.yaml");
    let Ok(loaded) = Config::parse(&yaml, path, env) else { return };
    let written = serde_saphyr::to_string(&loaded).unwrap_or_else(|e| panic!("config does not render: {e}"));
    match Config::parse(&written, path, []) {
        Ok(again) => assert_eq!(
            serde_json::to_value(&again).ok(),
            serde_json::to_value(&loaded).ok(),
            "config changed when written back out:\n{written}"
        ),
        Err(e) => panic!("config written back out does not load: {e}\n{written}"),
    }
}

const SECRET: &str = "fuzz-secret-0123456789abcdef";
const ISSUER: &str = "herald-fuzz";
const AUDIENCE: &str = "herald-clients";
const LEEWAY: Duration = Duration::from_secs(60);

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let auth = AuthConfig {
            jwt_secret: Some(SECRET.into()),
            issuer: Some(ISSUER.into()),
            audience: Some(AUDIENCE.into()),
            leeway: LEEWAY,
            ..AuthConfig::default()
        };
        // ok: a fixed, valid HS256 configuration.
        Verifier::from_config(&auth).unwrap_or_else(|e| panic!("fuzz verifier: {e}"))
    })
}

/// Input: `query [\0 header JSON [\0 claims JSON]]`.
///
/// The query's `token` parameter and the query itself are refused: nobody
/// can forge a token without the secret. The header and claims are then
/// signed with the secret (exercising what follows the signature check); such
/// a token is accepted only if its claims really satisfy the configuration.
pub(crate) fn token(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0);
    let query = String::from_utf8_lossy(parts.next().unwrap_or_default());
    if let Some(t) = auth::token_from_query(&query) {
        assert!(t.len() <= 3 * query.len(), "decoded token longer than its encoding allows");
        assert!(verifier().verify(&t).is_err(), "forged token from query accepted: {t}");
    }
    assert!(verifier().verify(&query).is_err(), "forged token accepted: {query}");

    let (Some(header), claims) = (parts.next(), parts.next().unwrap_or_default()) else { return };
    let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
    let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
    let Ok(signature) = jsonwebtoken::crypto::sign(message.as_bytes(), &key, jsonwebtoken::Algorithm::HS256)
    else {
        return;
    };
    let Ok(accepted) = verifier().verify(&format!("{message}.{signature}")) else { return };
    // Accepted: the claims must hold what the verifier promises.
    // serde_json skips an unknown claim's string without checking its UTF-8
    // (harmless: only the secret's holder can sign one), so read it lossily.
    let claims: serde_json::Value = serde_json::from_str(&String::from_utf8_lossy(claims))
        .unwrap_or_else(|e| panic!("accepted claims are not JSON: {e}"));
    let now = auth::now_secs();
    assert!(accepted.exp + LEEWAY.as_secs() >= now, "expired token accepted: {claims}");
    if let Some(nbf) = claims.get("nbf").and_then(serde_json::Value::as_u64) {
        assert!(nbf <= now + LEEWAY.as_secs(), "immature token accepted: {claims}");
    }
    assert_eq!(claims.get("iss").and_then(serde_json::Value::as_str), Some(ISSUER), "issuer: {claims}");
    let aud_ok = match claims.get("aud") {
        Some(serde_json::Value::String(a)) => a == AUDIENCE,
        Some(serde_json::Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(AUDIENCE)),
        _ => false,
    };
    assert!(aud_ok, "audience: {claims}");
}
