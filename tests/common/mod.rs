//! Test harness: real upstream servers and real varco instances on port 0,
//! and small clients. Each test binary uses a part of it.
#![allow(dead_code)]

pub mod client;
pub mod gated;
pub mod process;
pub mod redis;
pub mod relay;
pub mod upstream;

use std::net::SocketAddr;
use std::path::Path;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use varco::app::{self, Listeners};
use varco::config::Config;

/// An in-process varco serving until dropped or `stop`ped.
pub struct Varco {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), app::AppError>>>,
}

impl Varco {
    /// Starts varco with `toml`; `server.listen` and `admin_listen` are
    /// forced to 127.0.0.1:0 unless the text sets them.
    pub async fn start(toml: &str) -> Varco {
        Self::start_in(toml, Path::new(".")).await
    }

    pub async fn start_in(toml: &str, base: &Path) -> Varco {
        varco::tls::install_crypto_provider();
        let mut cfg = Config::from_toml(toml, base).unwrap_or_else(|e| panic!("test config: {e}"));
        if !toml.contains("listen =") {
            cfg.server.listen = "127.0.0.1:0".parse().unwrap();
            cfg.server.admin_listen = "127.0.0.1:0".parse().unwrap();
        }
        let listeners = Listeners::bind(&cfg.server).await.expect("bind");
        let addr = listeners.proxy_addr();
        let admin = listeners.admin_addr();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(app::run(cfg, listeners, async move {
            let _ = rx.await;
        }));
        Varco {
            addr,
            admin,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Graceful shutdown; returns when `run` has returned.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("run task").expect("run result");
        }
    }
}

impl Drop for Varco {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// A room config pointing at the given upstreams, plus extra TOML.
pub fn room_config(upstreams: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = upstreams
        .iter()
        .map(|a| format!("\"http://{a}\""))
        .collect();
    format!(
        "{extra}\n[rooms.portal]\nupstreams = [{}]\n",
        list.join(", ")
    )
}

/// A FIFO at `path` (any file there first removed): a test holds varco
/// in a read or a write of it until the test opens the other end.
pub fn fifo_at(path: &Path) {
    let _ = std::fs::remove_file(path);
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(made.success(), "mkfifo {}", path.display());
}

/// The writing end of FIFO `path`, once varco has it open to read: opened
/// without waiting (O_NONBLOCK, 0o4000 on Linux), a FIFO's writer fails
/// until a reader has it, so this is the readiness signal of varco's read;
/// held and never written, that read then waits for ever. Fails after
/// `within`.
pub async fn fifo_writer_once_read(
    path: &Path,
    what: &str,
    within: std::time::Duration,
) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    let mut writer = None;
    client::until(what, within, async || {
        writer = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(0o4000)
            .open(path)
            .ok();
        writer.is_some()
    })
    .await;
    writer.unwrap()
}

/// An address nothing listens on (bound, then released).
pub fn dead_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// The records of an admission log, each as (from, to).
pub fn logged_ranges(log: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<varco::audit::Record>(l).unwrap())
        .map(|r| (r.from, r.to))
        .collect()
}
