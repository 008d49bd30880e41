//! The demo: a small public-service portal ([`portal`]) that degrades past
//! its capacity like a real overloaded site, so varco has something to
//! protect in `varco demo`, the tests and the benchmarks.

pub mod chart;
pub mod compare;
pub mod portal;
pub mod simulate;

pub use portal::{spawn, Portal, PortalSettings, RunningPortal};
