//! The real `varco` binary as a child process, for what only a process
//! shows: its memory, its signals, its exit code.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_varco")
}

/// `varco demo` on its embedded default, on ports of its own (the
/// portal's found free first).
pub fn demo_command() -> Command {
    let portal = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let mut command = Command::new(bin());
    command
        .args([
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--portal-listen")
        .arg(portal.to_string());
    command
}

/// Writes `toml` to a fresh file and returns its path.
pub fn write_config(name: &str, toml: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("varco-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

impl Process {
    /// Starts `varco run` and waits for its readiness line on stdout.
    pub fn start(config: &Path) -> Process {
        Self::start_with(config, &[], Stdio::inherit())
    }

    /// As `start`, with extra arguments and a chosen stderr (piped to read
    /// the logs).
    pub fn start_with(config: &Path, extra: &[&str], stderr: Stdio) -> Process {
        let child = Command::new(bin())
            .args(extra)
            .args(["run", "--config"])
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn varco");
        Self::ready(child)
    }

    /// `varco demo` on its embedded default, on ports of its own,
    /// waiting for its readiness line.
    pub fn demo() -> Process {
        let child = demo_command()
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn varco");
        Self::ready(child)
    }

    /// Waits for `child`'s readiness line on stdout (lines before it,
    /// if any, passed over; the lines after it are read and dropped).
    fn ready(mut child: Child) -> Process {
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = lines
            .by_ref()
            .map(|l| l.expect("stdout readable"))
            .find(|l| l.starts_with("varco listening"))
            .expect("varco never said it listens");
        // Read on to the end: a line printed later into a closed pipe
        // would fail varco's print.
        std::thread::spawn(move || lines.for_each(drop));
        // "varco listening on http://A (admin http://B)"
        let addrs: Vec<SocketAddr> = line
            .split([' ', '(', ')'])
            .filter_map(|w| {
                w.strip_prefix("http://")
                    .or_else(|| w.strip_prefix("https://"))
            })
            .filter_map(|a| a.parse().ok())
            .collect();
        assert_eq!(addrs.len(), 2, "unexpected readiness line: {line}");
        Process {
            child,
            addr: addrs[0],
            admin: addrs[1],
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Peak resident memory so far, in bytes (VmHWM).
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmHWM in /proc status");
        kb * 1024
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
