//! varco: an admission-control reverse proxy and virtual waiting room.
//!
//! The modules in request-path order:
//!
//! - [`config`]: the TOML file, its defaults and validation.
//! - [`app`]: wires everything; `run(config, listeners, shutdown)`.
//! - [`listener`]: accept loop, connection cap, TLS ([`tls`]), HTTP/1+2,
//!   timeouts, graceful drain.
//! - [`gateway`]: one request's path: its path made canonical
//!   ([`request_path`]), varco's own `/.varco/*` paths, route
//!   ([`router`]) to a [`room`], the waiting-room [`gate`] (tickets,
//!   passes, [`cookies`], the [`store`] of counters), forward ([`proxy`]),
//!   answer with a [`page`] (errors, the waiting page).
//! - [`proxy`]: upstream choice, pooled client, header rules, streaming.
//! - [`admin`]: `/metrics` ([`metrics`]), `/healthz`, `/readyz`.
//! - [`audit`]: the hash-chained admission log the ticker appends to.
//! - [`checks`]: the receipt, lottery and audit checks anyone can run.
//! - [`demo`]: the embedded demo portal `varco demo` protects.
//! - [`body`], [`clock`], [`timefmt`], [`logging`]: the shared body type
//!   and the watcher of its end; time and writing it; logs.
#![forbid(unsafe_code)]

pub mod access_log;
pub mod admin;
pub mod app;
pub mod audit;
pub mod body;
pub mod checks;
pub mod clock;
pub mod config;
pub mod cookies;
pub mod ctl;
pub mod demo;
pub mod gate;
pub mod gateway;
pub mod history;
pub mod increases;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod page;
pub mod proxy;
pub mod proxy_header;
pub mod request_id;
pub mod request_path;
pub mod room;
pub mod router;
pub mod store;
pub mod timefmt;
pub mod tls;
