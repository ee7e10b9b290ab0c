//! Reading a redis crate error: which [`Fault`] it is (the one place that looks for TLS and ACL
//! failures inside it), and whether the peer reset the connection.

use super::Fault;

/// True if `e` is the peer resetting or closing the connection (not refusing it).
pub(super) fn reset(e: &redis::RedisError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        // The redis crate keeps an io::Error behind an `Arc<dyn Error>`.
        let shared = err.downcast_ref::<std::sync::Arc<dyn std::error::Error + Send + Sync>>();
        let io = shared.map_or(err, |arc| &**arc as &(dyn std::error::Error + 'static));
        if let Some(io) = io.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = err.source();
    }
    false
}

/// What a connect or command error means: the one place that reads TLS and ACL failures out of
/// the redis crate's errors.
pub(crate) fn fault(e: &redis::RedisError) -> Fault {
    if e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
    {
        return Fault::Auth;
    }
    // TLS failures arrive as an io::Error wrapping rustls's error.
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
                return match tls {
                    rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented
                    | rustls::Error::AlertReceived(_) => Fault::Certificate,
                    _ => Fault::Unreachable,
                };
            }
        }
        source = err.source();
    }
    let text = e.to_string();
    if text.contains("WRONGPASS") || text.contains("NOAUTH") {
        Fault::Auth
    } else if text.contains("certificate") {
        Fault::Certificate
    } else {
        Fault::Unreachable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_is_told_from_a_refusal() {
        let io = |kind| redis::RedisError::from(std::io::Error::from(kind));
        assert!(reset(&io(std::io::ErrorKind::ConnectionReset)));
        assert!(reset(&io(std::io::ErrorKind::UnexpectedEof)));
        assert!(!reset(&io(std::io::ErrorKind::ConnectionRefused)));
        assert!(matches!(fault(&io(std::io::ErrorKind::ConnectionReset)), Fault::Unreachable));
    }
}
