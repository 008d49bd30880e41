//! varco: an admission-control reverse proxy and virtual waiting room.
//!
//! The modules in request-path order:
//!
//! - [`config`]: the TOML file, its defaults and validation.
//! - [`app`]: wires everything; `run(config, listeners, shutdown)`.
//! - [`listener`]: accept loop, connection cap, TLS ([`tls`]), HTTP/1+2,
//!   timeouts, graceful drain.
//! - [`gateway`]: one request's path: route ([`router`]) to a [`room`],
//!   forward ([`proxy`]), answer failures with a [`page`].
//! - [`proxy`]: upstream choice, pooled client, header rules, streaming.
//! - [`admin`]: `/metrics` ([`metrics`]), `/healthz`, `/readyz`.
//! - [`demo`]: the embedded demo portal `varco demo` protects.
//! - [`body`], [`logging`]: the shared body type; log output.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod body;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod page;
pub mod proxy;
pub mod room;
pub mod router;
pub mod tls;
