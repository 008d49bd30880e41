//! What can go wrong between a request arriving and a response leaving, and
//! the one status code each maps to.

use std::time::Duration;

use http::StatusCode;

use crate::body::BoxError;
use crate::page::{Said, NOTHING_HERE};

/// Who caused a failure: metrics and logs say so, and only upstream-side
/// failures count against an upstream's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Upstream,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no room serves this host and path")]
    NoRoute,
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("request body not received: {0}")]
    ClientBody(BoxError),
    #[error("request body stalled")]
    BodyTimeout,
    /// A body that may not stream found the buffer memory in use.
    #[error("request buffer memory in use")]
    BufferFull,
    #[error("upstream {upstream} unreachable: {source}")]
    Unreachable { upstream: String, source: BoxError },
    #[error("upstream {upstream} sent no response within {timeout:?}")]
    Timeout { upstream: String, timeout: Duration },
    #[error("upstream {upstream} failed: {source}")]
    Upstream { upstream: String, source: BoxError },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::ClientBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BufferFull => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Unreachable { .. } | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// `Retry-After` for an error worth trying again soon, in seconds.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ProxyError::BufferFull => Some(5),
            _ => None,
        }
    }

    pub fn side(&self) -> Side {
        match self {
            ProxyError::NoRoute
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::ClientBody(_)
            | ProxyError::BodyTimeout
            | ProxyError::BufferFull => Side::Client,
            _ => Side::Upstream,
        }
    }

    /// The short label used in metrics (`kind`) and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::ClientBody(_) => "client_body",
            ProxyError::BodyTimeout => "body_timeout",
            ProxyError::BufferFull => "buffer_full",
            ProxyError::Unreachable { .. } => "connect",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::Upstream { .. } => "upstream",
        }
    }

    /// What the person is told: never internal addresses or error chains.
    pub fn public_message(&self) -> &'static Said {
        match self {
            ProxyError::NoRoute => &NOTHING_HERE,
            ProxyError::BodyTooLarge { .. } => &Said {
                en: "The request is too large.",
                it: "La richiesta è troppo grande.",
            },
            ProxyError::ClientBody(_) => &Said {
                en: "The request was not received completely. Please try again.",
                it: "La richiesta non è arrivata per intero. Riprova.",
            },
            ProxyError::BodyTimeout => &Said {
                en: "The request took too long to arrive. Please try again.",
                it: "La richiesta ha impiegato troppo tempo ad arrivare. Riprova.",
            },
            ProxyError::BufferFull => &Said {
                en: "The service is busy right now. Please try again in a moment.",
                it: "Il servizio è molto richiesto in questo momento. Riprova tra un momento.",
            },
            ProxyError::Unreachable { .. } | ProxyError::Upstream { .. } => &Said {
                en: "The service is not reachable right now. Please try again in a moment.",
                it: "Il servizio non è raggiungibile in questo momento. Riprova tra un momento.",
            },
            ProxyError::Timeout { .. } => &Said {
                en: "The service did not answer in time. Please try again in a moment.",
                it: "Il servizio non ha risposto in tempo. Riprova tra un momento.",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pins the one mapping from error to status code.
    #[test]
    fn each_error_has_one_status() {
        let e = || -> BoxError { "x".into() };
        let up = || "u".to_string();
        let cases = [
            (ProxyError::NoRoute, 404, Side::Client),
            (ProxyError::BodyTooLarge { limit: 1 }, 413, Side::Client),
            (ProxyError::ClientBody(e()), 400, Side::Client),
            (ProxyError::BodyTimeout, 408, Side::Client),
            (ProxyError::BufferFull, 503, Side::Client),
            (
                ProxyError::Unreachable {
                    upstream: up(),
                    source: e(),
                },
                502,
                Side::Upstream,
            ),
            (
                ProxyError::Timeout {
                    upstream: up(),
                    timeout: Duration::from_secs(1),
                },
                504,
                Side::Upstream,
            ),
            (
                ProxyError::Upstream {
                    upstream: up(),
                    source: e(),
                },
                502,
                Side::Upstream,
            ),
        ];
        for (err, status, side) in cases {
            assert_eq!(err.status().as_u16(), status, "{err}");
            assert_eq!(err.side(), side, "{err}");
        }
    }
}
