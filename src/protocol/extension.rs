//! `Sec-WebSocket-Extensions` negotiation of permessage-deflate (RFC 7692
//! section 7.1): picks the first offer Herald can honour and writes the
//! answer. An offer it cannot honour is declined (the next one is tried);
//! the connection never fails over an offer.

use super::deflate::Agreed;

/// The extension's registered name.
const NAME: &str = "permessage-deflate";

/// Herald's answer to the client's offers (each header value a
/// comma-separated list of offers): what was agreed, and the header value
/// that says so. `None`: no offer of permessage-deflate Herald accepts.
/// `context` (`websocket.compression_context`): keep the compression
/// context when the client did not ask for `server_no_context_takeover`.
pub fn negotiate<'a>(offers: impl IntoIterator<Item = &'a str>, context: bool) -> Option<(Agreed, String)> {
    let mut agreed = offers.into_iter().flat_map(|value| value.split(',')).find_map(accept)?;
    agreed.0.context &= context;
    // Without the context each compressed frame stands alone; with it a
    // frame may refer to the room frame sent before it (RFC 7692 7.1.1.1
    // lets the server answer `server_no_context_takeover` unasked, and
    // keep the context otherwise). `client_no_context_takeover` is always
    // answered (7.1.1.2): a connection drops its inflater between messages.
    let mut answer = String::from(NAME);
    if !agreed.0.context {
        answer.push_str("; server_no_context_takeover");
    }
    answer.push_str("; client_no_context_takeover");
    if let Some(bits) = agreed.1 {
        // Accepting an offer's `server_max_window_bits` means answering it
        // (7.1.2.1); Herald honours it by sending longer frames plain.
        answer.push_str(&format!("; server_max_window_bits={bits}"));
    }
    Some((agreed.0, answer))
}

/// One offer, accepted: what was agreed and the `server_max_window_bits`
/// to answer, if the offer had one.
fn accept(offer: &str) -> Option<(Agreed, Option<u8>)> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case(NAME) {
        return None;
    }
    let mut seen = [false; 4];
    let mut server_bits = None;
    for param in parts {
        let (name, value) = match param.split_once('=') {
            Some((name, value)) => (name.trim(), Some(unquote(value.trim())?)),
            None => (param, None),
        };
        let slot = match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => 0,
            "client_no_context_takeover" if value.is_none() => 1,
            // Without a value it says the client can take a limit; Herald
            // sets none (its inflater is per message anyway).
            "client_max_window_bits" => match value {
                None => 2,
                Some(v) => window_bits(v).map(|_| 2)?,
            },
            "server_max_window_bits" => {
                server_bits = Some(window_bits(value?)?);
                3
            }
            // Unknown parameters, or a value where none belongs: decline.
            _ => return None,
        };
        // The same parameter twice makes the offer invalid (7.1).
        if std::mem::replace(&mut seen[slot], true) {
            return None;
        }
    }
    let agreed = Agreed { server_max_window_bits: server_bits.unwrap_or(15), context: !seen[0] };
    Some((agreed, server_bits))
}

/// A window size: a decimal 8..=15 without leading zeros (7.1.2).
fn window_bits(value: &str) -> Option<u8> {
    match value {
        "8" | "9" | "10" | "11" | "12" | "13" | "14" | "15" => value.parse().ok(),
        _ => None,
    }
}

/// A parameter value as a token or a quoted string (RFC 7692 7.1 allows
/// both; a quoted value must still be a token once unquoted).
fn unquote(value: &str) -> Option<&str> {
    match value.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"').filter(|v| !v.contains(['"', '\\'])),
        None => Some(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    fn answer(offer: &str) -> Option<String> {
        negotiate([offer], false).map(|(_, answer)| answer)
    }

    #[test]
    fn answers_every_offer_shape_it_can_honour() {
        for offer in [
            "permessage-deflate",
            // Chromium's offer: the window parameter without a value.
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; client_max_window_bits=10",
            "permessage-deflate; client_max_window_bits=\"12\"",
            "permessage-deflate; server_no_context_takeover",
            "permessage-deflate; client_no_context_takeover",
            "Permessage-Deflate;Server_No_Context_Takeover ;client_max_window_bits",
            "x-webkit-deflate-frame, permessage-deflate",
        ] {
            assert_eq!(answer(offer).as_deref(), Some(BASE), "{offer}");
        }
        let (agreed, text) = negotiate(["permessage-deflate; server_max_window_bits=10"], false).unwrap();
        assert_eq!(text, format!("{BASE}; server_max_window_bits=10"));
        assert_eq!(agreed.max_payload(), 1024);
    }

    #[test]
    fn keeps_the_context_unless_the_client_or_the_config_says_not_to() {
        let kept = "permessage-deflate; client_no_context_takeover";
        for offer in ["permessage-deflate", "permessage-deflate; client_max_window_bits"] {
            let (agreed, text) = negotiate([offer], true).unwrap();
            assert_eq!(text, kept, "{offer}");
            assert!(agreed.context);
        }
        let (agreed, text) = negotiate(["permessage-deflate; server_max_window_bits=10"], true).unwrap();
        assert_eq!(text, format!("{kept}; server_max_window_bits=10"));
        assert!(agreed.context, "kept, but frames go out standalone in a window under 15 bits");
        let (agreed, text) = negotiate(["permessage-deflate; server_no_context_takeover"], true).unwrap();
        assert_eq!(text, BASE, "asked for: answered");
        assert!(!agreed.context);
        assert!(!negotiate(["permessage-deflate"], false).unwrap().0.context, "turned off");
    }

    #[test]
    fn declines_offers_it_cannot_honour_and_tries_the_next() {
        for offer in [
            "",
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=99999999999999999999",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; unknown_param",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_max_window_bits=10; server_max_window_bits=11",
        ] {
            assert_eq!(answer(offer), None, "{offer:?}");
        }
        // The first acceptable offer wins, across offers and header lines.
        let offers = [
            "permessage-deflate; server_max_window_bits=4",
            "permessage-deflate; server_max_window_bits=9, permessage-deflate",
        ];
        assert_eq!(negotiate(offers, true).unwrap().0.server_max_window_bits, 9);
    }
}
