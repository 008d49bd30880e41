//! A real `redis-server` on an ephemeral port, started and killed by the
//! test that owns it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = super::dead_addr().port();
        Self::start_on(port)
    }

    pub fn start_on(port: u16) -> RedisServer {
        Self::start_with(port, None)
    }

    /// A Redis that keeps only what a `SAVE` wrote to `dir`: a restart on
    /// the same port comes back as of the last save, its later writes
    /// lost (as `appendfsync everysec`, or a replica that was behind).
    #[allow(dead_code)] // not every test file uses it
    pub fn start_saved(port: u16, dir: &std::path::Path) -> RedisServer {
        Self::spawn(port, |cmd| {
            cmd.args(["--appendonly", "no", "--dir"]).arg(dir);
        })
    }

    /// With `dir`, Redis keeps an append-only file there, so a restart on
    /// the same port finds its data again (as a production Redis would).
    pub fn start_with(port: u16, dir: Option<&std::path::Path>) -> RedisServer {
        Self::spawn(port, |cmd| match dir {
            Some(d) => {
                cmd.args(["--appendonly", "yes", "--appendfsync", "always", "--dir"])
                    .arg(d);
            }
            // A folder of its own all the same: a replica writes the data
            // it is sent to `dump.rdb` there, and a Redis started later in
            // the same folder would load it.
            None => {
                cmd.args(["--appendonly", "no", "--dir"])
                    .arg(Self::own_dir(port));
            }
        })
    }

    /// redis-server on `port`, no snapshots unless asked for, with the
    /// persistence `persist` sets; answers once it is ready.
    fn spawn(port: u16, persist: impl FnOnce(&mut Command)) -> RedisServer {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", ""]);
        persist(&mut cmd);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test installs it)");
        let server = RedisServer {
            child: Some(child),
            port,
        };
        server.wait_ready();
        server
    }

    /// An empty folder for the Redis on `port`, in this test process's.
    fn own_dir(port: u16) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("varco-redis-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a folder for redis-server");
        dir
    }

    /// A Redis that speaks only TLS, with a certificate for "localhost"
    /// made here; returns the server and the CA file to trust.
    pub fn start_tls(dir: &std::path::Path) -> (RedisServer, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let (cert_file, key_file) = (dir.join("redis.crt"), dir.join("redis.key"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        let port = super::dead_addr().port();
        let child = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .args(["--appendonly", "no", "--tls-auth-clients", "no"])
            .arg("--tls-cert-file")
            .arg(&cert_file)
            .arg("--tls-key-file")
            .arg(&key_file)
            .arg("--tls-ca-cert-file")
            .arg(&cert_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server");
        let server = RedisServer {
            child: Some(child),
            port,
        };
        // Listening is the readiness signal here (PING would need TLS).
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server (TLS) did not listen"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (server, cert_file)
    }

    pub fn tls_url(&self) -> String {
        format!("rediss://localhost:{}/", self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A client connection of the test's own, to read or set what the
    /// nodes keep.
    #[allow(dead_code)] // not every test file uses it
    pub fn connection(&self) -> redis::Connection {
        redis::Client::open(self.url())
            .unwrap()
            .get_connection()
            .unwrap()
    }

    /// Waits until the server answers PING (its readiness signal).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").is_ok()
                    && s.read_exact(&mut buf).is_ok()
                    && &buf == b"+PONG\r\n"
                {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server did not answer on port {}", self.port);
    }

    /// Sends one inline command and returns the first line of the reply.
    #[allow(dead_code)] // not every test file uses it
    pub fn command(&self, cmd: &str) -> String {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(format!("{cmd}\r\n").as_bytes()).unwrap();
        let mut reply = Vec::new();
        let mut b = [0u8; 1];
        while !reply.ends_with(b"\r\n") {
            s.read_exact(&mut b).expect("a reply from redis");
            reply.push(b[0]);
        }
        String::from_utf8_lossy(&reply).trim_end().to_string()
    }

    /// How many clients are connected, this question's own connection
    /// included (from `INFO clients`, a bulk reply).
    #[allow(dead_code)] // not every test file uses it
    pub fn connected_clients(&self) -> usize {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect to redis");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"INFO clients\r\n").unwrap();
        let mut reply = Vec::new();
        let mut b = [0u8; 1];
        while !reply.ends_with(b"\r\n") {
            s.read_exact(&mut b).expect("a reply from redis");
            reply.push(b[0]);
        }
        let len: usize = String::from_utf8_lossy(&reply[1..reply.len() - 2])
            .parse()
            .expect("a bulk reply");
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).expect("the reply's body");
        String::from_utf8_lossy(&body)
            .lines()
            .find_map(|l| l.strip_prefix("connected_clients:"))
            .and_then(|n| n.trim().parse().ok())
            .expect("connected_clients in INFO clients")
    }

    /// `kill -SIG` to this Redis: STOP leaves it holding every
    /// connection unanswered (a Redis stalled by a fork or a slow disk),
    /// CONT brings it back.
    #[allow(dead_code)] // not every test file uses it
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().expect("a running redis-server").id();
        let ok = Command::new("kill")
            .args([format!("-{sig}"), pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} redis-server failed");
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
