//! Herald's outcome vocabularies: the error codes a client is answered with
//! and the close codes a connection ends with. Each carries its wire value,
//! its reason text and its metric label in one place, so a new code cannot be
//! sent without being counted and documented (a test checks
//! `docs/PROTOCOL.md` names every one).

/// The `code` of an `{"type":"error",...}` reply (PROTOCOL.md section 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Not JSON, a missing field, a bad UUID, a bad `since`.
    BadRequest,
    /// A well-formed command of a type Herald does not know.
    UnknownType,
    /// The user is not a member of that chat.
    Forbidden,
    /// The connection holds `websocket.max_subscriptions` rooms already.
    TooManySubscriptions,
    /// The connection sends commands faster than its budget.
    RateLimited,
    /// The event bus cannot serve the command right now (extension).
    Unavailable,
    /// `typing` in a room the connection is not subscribed to.
    NotSubscribed,
}

impl ErrorCode {
    /// Every code, in the order of the metrics' counters.
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownType,
        ErrorCode::Forbidden,
        ErrorCode::TooManySubscriptions,
        ErrorCode::RateLimited,
        ErrorCode::Unavailable,
        ErrorCode::NotSubscribed,
    ];

    /// The wire value, which is also the metric label.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotSubscribed => "not_subscribed",
        }
    }

    /// Position in [`ErrorCode::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// Why Herald closed a connection: the close frame's code and reason
/// (PROTOCOL.md section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: the client asked to close (its code is echoed when valid).
    Normal,
    /// 1001: the node is shutting down.
    GoingAway,
    /// 1002: a frame broke RFC 6455.
    ProtocolError,
    /// 1007: a text message that is not UTF-8.
    InvalidData,
    /// 1008: repeated abuse.
    PolicyViolation,
    /// 1009: a client message over `websocket.max_message_size`.
    TooBig,
    /// 1011: the node cannot serve the connection (event bus down).
    InternalError,
    /// 4001: the token expired.
    TokenExpired,
    /// 4003: an operator disconnected the user or revoked its token
    /// (`POST /api/users/{id}/disconnect` or `/revoke`); do not reconnect
    /// with the same token.
    Disconnected,
    /// 4008: the client fell further behind than its rooms' history reaches.
    SlowConsumer,
}

impl CloseCode {
    /// Every code Herald sends, in the order of the metrics' counters.
    pub const ALL: [CloseCode; 10] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::ProtocolError,
        CloseCode::InvalidData,
        CloseCode::PolicyViolation,
        CloseCode::TooBig,
        CloseCode::InternalError,
        CloseCode::TokenExpired,
        CloseCode::Disconnected,
        CloseCode::SlowConsumer,
    ];

    /// The code on the wire.
    pub const fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::InvalidData => 1007,
            CloseCode::PolicyViolation => 1008,
            CloseCode::TooBig => 1009,
            CloseCode::InternalError => 1011,
            CloseCode::TokenExpired => 4001,
            CloseCode::Disconnected => 4003,
            CloseCode::SlowConsumer => 4008,
        }
    }

    /// The default reason text sent with the code.
    pub const fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "",
            CloseCode::GoingAway => "server shutting down",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::InvalidData => "text message is not UTF-8",
            CloseCode::PolicyViolation => "too many invalid commands",
            CloseCode::TooBig => "message too big",
            CloseCode::InternalError => "event bus unavailable",
            CloseCode::TokenExpired => "token expired",
            CloseCode::Disconnected => "disconnected by the server",
            CloseCode::SlowConsumer => "slow consumer",
        }
    }

    /// Position in [`CloseCode::ALL`].
    pub const fn index(self) -> usize {
        self as usize
    }
}

/// How a connection ended, for `herald_closes_total{code=...}`: a code Herald
/// sent or echoed, another code the client sent (echoed as 1000 when
/// reserved), or no close frame at all (the client vanished).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Sent(CloseCode),
    /// The client's own code, echoed back (not one of Herald's).
    Echoed(u16),
    /// No close frame was sent (the peer was gone).
    Vanished,
}

impl Ended {
    /// The metric labels in counter order: Herald's codes, then `other` and `none`.
    pub const LABELS: [&'static str; CloseCode::ALL.len() + 2] =
        ["1000", "1001", "1002", "1007", "1008", "1009", "1011", "4001", "4003", "4008", "other", "none"];

    /// Index into [`Ended::LABELS`].
    pub fn index(self) -> usize {
        match self {
            Ended::Sent(code) => code.index(),
            Ended::Echoed(code) => {
                CloseCode::ALL.iter().position(|c| c.code() == code).unwrap_or(CloseCode::ALL.len())
            }
            Ended::Vanished => CloseCode::ALL.len() + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_match_the_order_of_all() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), i);
        }
        for (i, code) in CloseCode::ALL.iter().enumerate() {
            assert_eq!(code.index(), i);
            assert_eq!(Ended::LABELS[i], code.code().to_string());
            assert_eq!(Ended::Echoed(code.code()).index(), i);
        }
        assert_eq!(Ended::LABELS[Ended::Echoed(3000).index()], "other");
        assert_eq!(Ended::LABELS[Ended::Vanished.index()], "none");
    }
}
