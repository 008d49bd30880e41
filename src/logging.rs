//! Log output: human-readable lines by default, JSON for log shippers.
//! Access lines go to the `varco::access` target so they can be filtered.
//!
//! Lines are written to stderr by a thread of their own, not by the
//! workers that log them: a reader that stops reading (journald busy,
//! Docker's blocking log driver, a full pipe) would otherwise block the
//! workers one by one in `write(2)`, and with them every request, the
//! admission tick and the health checks. Past [`HELD_LINES`] waiting,
//! lines are dropped and counted (`varco_log_lines_dropped_total`), as
//! HAProxy drops syslog lines rather than wait.

use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::EnvFilter;

/// The lines held in memory while stderr's reader is behind: a few
/// seconds of access lines on a click day, some tens of MiB at most.
const HELD_LINES: usize = 100_000;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Lines dropped so far because the reader fell behind.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Keeps the log's writer thread: dropped, it writes out what is held
/// and stops. Hold it until the process ends.
#[must_use]
pub struct Flush {
    _writer: Option<WorkerGuard>,
}

pub fn init(json: bool, level: &str) -> Flush {
    let filter = match std::env::var("VARCO_LOG") {
        Ok(v) => EnvFilter::try_new(&v).unwrap_or_else(|e| {
            // Said, not silently the config's: someone set it to see
            // something.
            eprintln!("varco: VARCO_LOG={v:?} is not a log filter ({e}); using log.level");
            EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"))
        }),
        Err(_) => EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(HELD_LINES)
        .thread_name("varco-log")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    // A second init (tests, demo) keeps the first subscriber.
    let installed = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    match installed {
        Ok(()) => {
            let _ = DROPPED.set(dropped);
            Flush {
                _writer: Some(guard),
            }
        }
        Err(_) => Flush { _writer: None },
    }
}
