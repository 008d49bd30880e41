//! Nobody ever receives another person's page (invariant 4): thousands of
//! distinct citizens through varco to the demo portal, sharing keep-alive
//! connections and one HTTP/2 connection, each checking every answer is
//! its own.

mod common;

use std::sync::Arc;

use common::client::{self, h2_handshake};
use common::Varco;
use http::Request;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use varco::body;
use varco::demo::PortalSettings;

const CITIZENS: usize = 2000;

async fn portal() -> varco::demo::RunningPortal {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let settings = PortalSettings {
        capacity: 10_000,
        service_time: std::time::Duration::from_millis(1),
    };
    varco::demo::spawn(l, settings).unwrap()
}

fn whoami(url: String, citizen: &str) -> Request<varco::body::Body> {
    Request::get(url)
        .header("cookie", format!("citizen={citizen}"))
        .body(body::empty())
        .unwrap()
}

type Answer = tokio::task::JoinHandle<(String, u16, String)>;

/// How many citizens got a page that was not theirs.
async fn crossed(tasks: Vec<Answer>) -> usize {
    let mut crossed = 0;
    for t in tasks {
        let (me, status, text) = t.await.unwrap();
        assert_eq!(status, 200, "{me}: {text}");
        if text.trim() != me {
            crossed += 1;
        }
    }
    crossed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_response_goes_to_its_own_citizen_over_keep_alive_and_http2() {
    let portal = portal().await;
    let v = Varco::start(&format!(
        "[log]\naccess = false\n[rooms.portal]\nupstreams = [\"http://{}\"]\n",
        portal.addr
    ))
    .await;

    // HTTP/1.1: one pool, at most 64 connections, reused across citizens.
    let h1 = client::http1();
    let limit = Arc::new(Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..CITIZENS {
        let (h1, limit, url) = (h1.clone(), limit.clone(), v.url("/whoami"));
        tasks.push(tokio::spawn(async move {
            let _slot = limit.acquire().await.unwrap();
            let me = format!("H{i:06}");
            let got = client::read(h1.request(whoami(url, &me)).await.unwrap()).await;
            (me, got.status, got.text())
        }));
    }
    let n = crossed(tasks).await;
    assert_eq!(n, 0, "responses crossed over HTTP/1.1 keep-alive");

    // HTTP/2: every citizen a stream on one shared connection.
    let tcp = tokio::net::TcpStream::connect(v.addr).await.unwrap();
    let h2 = h2_handshake(tcp).await;
    let mut tasks = Vec::new();
    for i in 0..CITIZENS {
        let mut h2 = h2.clone();
        let url = format!("http://portal:{}/whoami", v.addr.port());
        tasks.push(tokio::spawn(async move {
            let me = format!("S{i:06}");
            h2.ready().await.unwrap();
            let resp = h2.send_request(whoami(url, &me)).await.unwrap();
            let got = client::read(resp).await;
            (me, got.status, got.text())
        }));
    }
    let n = crossed(tasks).await;
    assert_eq!(n, 0, "responses crossed over HTTP/2");
}
