//! HTTP/2 floods written frame by frame over raw TCP, as an attacker's
//! tool would: an endless header block (CONTINUATION flood,
//! CVE-2024-27316 and kin), and PING and SETTINGS frames sent without ever
//! reading the acknowledgements (CVE-2019-9512, CVE-2019-9515). Each ends
//! with the offender's connection closed (at once for the header block;
//! by send_timeout once a flood that reads nothing stalls), memory
//! bounded, nothing reaching the upstream, and other clients served.

mod common;

use std::time::Duration;

use common::client::get;
use common::{room_config, upstream, Varco};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

async fn open(v: &Varco) -> TcpStream {
    let mut tcp = TcpStream::connect(v.addr).await.unwrap();
    tcp.write_all(PREFACE).await.unwrap();
    tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    tcp
}

/// Resident memory of this process (varco runs in it), in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// Reads until the server closes the connection or says GOAWAY; true if
/// it did within `limit`.
async fn closed_within(tcp: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = vec![0u8; 64 * 1024];
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(n)) => {
                seen.extend_from_slice(&buf[..n]);
                // Walk the frames received so far for a GOAWAY.
                let mut at = 0;
                while seen.len() >= at + 9 {
                    let len =
                        u32::from_be_bytes([0, seen[at], seen[at + 1], seen[at + 2]]) as usize;
                    if seen[at + 3] == GOAWAY {
                        return true;
                    }
                    if seen.len() < at + 9 + len {
                        break;
                    }
                    at += 9 + len;
                }
            }
        }
    }
}

/// Writes `frames` copies of `f` in batches; stops early when the server
/// stops reading (back-pressure for 2 s) or closes. Returns how many
/// were written.
async fn flood(tcp: &mut TcpStream, f: &[u8], frames: usize) -> usize {
    const BATCH: usize = 256;
    let batch: Vec<u8> = f.repeat(BATCH);
    let mut sent = 0;
    while sent < frames {
        match tokio::time::timeout(Duration::from_secs(2), tcp.write_all(&batch)).await {
            Ok(Ok(())) => sent += BATCH,
            _ => break,
        }
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_header_block_is_cut_off() {
    let up = upstream::spawn().await;
    let v = Varco::start(&room_config(&[up.addr], "[log]\naccess = false")).await;
    let mut tcp = open(&v).await;
    // :method GET, :scheme http, :path /, :authority p; no END_HEADERS.
    let start = [0x82, 0x86, 0x84, 0x41, 0x01, b'p'];
    tcp.write_all(&frame(HEADERS, END_STREAM, 1, &start))
        .await
        .unwrap();
    // Then header after header, "x-a: aaaaaaaaaa", never ending the block.
    let mut fragment = vec![0x00, 0x03];
    fragment.extend_from_slice(b"x-a");
    fragment.push(0x0a);
    fragment.extend_from_slice(b"aaaaaaaaaa");
    let before = rss();
    let sent = flood(&mut tcp, &frame(CONTINUATION, 0, 1, &fragment), 200_000).await;
    assert!(
        closed_within(&mut tcp, Duration::from_secs(5)).await,
        "after {sent} CONTINUATION frames (about {} KiB of headers) the connection is still open",
        sent * 24 / 1024
    );
    assert!(
        rss().saturating_sub(before) < 64 << 20,
        "memory grew by {} MiB",
        (rss() - before) >> 20
    );
    assert_eq!(
        up.hits(),
        0,
        "a request with an endless header block reached the upstream"
    );
    assert_eq!(get(&v.url("/echo")).await.status, 200, "others are served");
}

/// Client connections open on varco's public listener.
async fn open_connections(v: &Varco) -> u64 {
    common::client::metric(v.admin, "varco_open_connections", "")
        .await
        .unwrap_or(0.0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_and_settings_floods_never_read_keep_memory_bounded() {
    let up = upstream::spawn().await;
    // send_timeout ends a flooder that reads none of its acknowledgements.
    let v = Varco::start(&room_config(
        &[up.addr],
        "[server]\nsend_timeout = \"1s\"\n[log]\naccess = false",
    ))
    .await;
    for (what, f) in [
        ("PING", frame(PING, 0, 0, &[7u8; 8])),
        // One setting each (SETTINGS_ENABLE_PUSH = 0): each asks for an ACK.
        ("SETTINGS", frame(SETTINGS, 0, 0, &[0x00, 0x02, 0, 0, 0, 0])),
    ] {
        let baseline = open_connections(&v).await;
        let mut tcp = open(&v).await;
        let before = rss();
        // Up to 3,000,000 frames (50 MiB); the acknowledgements are never
        // read, so a server that queued one per frame would hold them all.
        // A bounded one stops reading once its own writes back up, and the
        // flood stalls.
        let sent = flood(&mut tcp, &f, 3_000_000).await;
        let grew = rss().saturating_sub(before);
        eprintln!("{what}: {sent} frames written, memory +{} KiB", grew >> 10);
        assert!(
            grew < 32 << 20,
            "{what} flood: memory grew by {} MiB after {sent} frames",
            grew >> 20
        );
        assert!(sent > 0, "{what}: not even one batch was accepted");
        assert_eq!(
            get(&v.url("/echo")).await.status,
            200,
            "{what} flood: others are served"
        );
        // The flooder, still connected and reading nothing, is cut off.
        let mut cut = false;
        for _ in 0..100 {
            if open_connections(&v).await <= baseline {
                cut = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            cut,
            "{what} flood: the stalled flooder still holds its connection"
        );
        drop(tcp);
    }
    assert_eq!(up.hits(), 2, "only the two probes reached the upstream");
}
