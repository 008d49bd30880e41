//! Forwarding to a room's upstreams: request bodies read whole first
//! ([`buffer`]), the pooled client ([`client`]), the choice of upstream
//! ([`upstreams`]) and its active checks ([`health`]), header rules
//! ([`headers`]), the request itself ([`forward`]) and what can fail
//! ([`error`]).

pub mod buffer;
pub mod client;
pub mod error;
pub mod forward;
pub mod headers;
pub mod health;
pub mod in_flight;
pub mod timeout;
pub mod upstreams;

pub use error::{ProxyError, Side};
pub use forward::Forwarder;
