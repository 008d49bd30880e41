//! A TCP relay between varco and a real Redis, standing for the network
//! on the way: it can drop the connections it carries without a word
//! (as a firewall or NAT that forgot the flow, or an address moved to
//! another host), and send new connections to another server (as a
//! failover moving an address).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Relay {
    pub addr: SocketAddr,
    /// Connections made before the latest `cut` carry nothing more.
    cuts: Arc<AtomicU64>,
    /// Connections made before the latest `cut_replies` carry no answer.
    reply_cuts: Arc<AtomicU64>,
    target: Arc<AtomicU16>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Relays 127.0.0.1:`port`, from a port of its own.
    pub async fn to(port: u16) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cuts = Arc::new(AtomicU64::new(0));
        let reply_cuts = Arc::new(AtomicU64::new(0));
        let target = Arc::new(AtomicU16::new(port));
        let (c, r, t) = (cuts.clone(), reply_cuts.clone(), target.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let port = t.load(Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(("127.0.0.1", port)).await else {
                    continue;
                };
                let born = (c.load(Ordering::SeqCst), r.load(Ordering::SeqCst));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(carry(cr, sw, vec![(c.clone(), born.0)]));
                tokio::spawn(carry(
                    sr,
                    cw,
                    vec![(c.clone(), born.0), (r.clone(), born.1)],
                ));
            }
        });
        Relay {
            addr,
            cuts,
            reply_cuts,
            target,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}/", self.addr)
    }

    /// Every connection carried so far goes silent, both ways, and stays
    /// open: no reset, no close, nothing for the ends to notice.
    pub fn cut(&self) {
        self.cuts.fetch_add(1, Ordering::SeqCst);
    }

    /// Every connection carried so far still carries what it is sent to
    /// the server, and nothing back: the server does what it is asked,
    /// and its answers are lost (as a slow or lossy way back).
    #[allow(dead_code)] // not every test file uses it
    pub fn cut_replies(&self) {
        self.reply_cuts.fetch_add(1, Ordering::SeqCst);
    }

    /// New connections go to 127.0.0.1:`port` from now on.
    pub fn send_to(&self, port: u16) {
        self.target.store(port, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` until either closes; once any of `cuts` moves
/// past where it stood at the connection's birth, reads on (so nothing
/// backs up to the sender) and passes nothing.
async fn carry(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cuts: Vec<(Arc<AtomicU64>, u64)>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if cuts
            .iter()
            .any(|(c, born)| c.load(Ordering::SeqCst) != *born)
        {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
