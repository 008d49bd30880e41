//! The floor under the waiting-page benchmark: varco's own listener (the
//! same hyper settings, one current-thread worker, as `workers = 1`)
//! answering every request with one fixed copy of a waiting page and its
//! headers, Set-Cookie included, with no gate at all.
//!
//! `benches/load.sh` runs it beside varco and nginx on the same core:
//! varco's distance to this floor is what the gate costs (a queue number,
//! a signed ticket, a receipt, a personal page); the floor's distance to
//! nginx is what the HTTP stack and the page's size cost.
//!
//!     cargo run --release --example page_floor -- 127.0.0.1:8099 page.html 'varco_ticket_x=...'

use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER, SET_COOKIE};
use http::{Request, Response};
use hyper::body::Incoming;
use varco::body::{full, Body};
use varco::listener::{serve, ConnInfo, Handler, ListenerSettings};

struct Fixed {
    page: Bytes,
    cookie: HeaderValue,
}

impl Handler for Fixed {
    async fn handle(&self, _req: Request<Incoming>, _conn: ConnInfo) -> Response<Body> {
        let mut r = Response::new(full(self.page.clone()));
        let h = r.headers_mut();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        );
        h.insert(CACHE_CONTROL, varco::page::NO_STORE);
        h.insert(RETRY_AFTER, HeaderValue::from_static("20"));
        h.insert(SET_COOKIE, self.cookie.clone());
        r
    }
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: page_floor ADDR PAGE_FILE SET_COOKIE";
    let addr: std::net::SocketAddr = args.next().ok_or(anyhow::anyhow!(usage))?.parse()?;
    let page = std::fs::read(args.next().ok_or(anyhow::anyhow!(usage))?)?;
    let cookie = HeaderValue::from_str(&args.next().ok_or(anyhow::anyhow!(usage))?)?;
    let handler = Arc::new(Fixed {
        page: page.into(),
        cookie,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        // Never told to stop: the script ends it by its PID.
        let (_stop, shutdown) = tokio::sync::watch::channel(false);
        serve(
            listener,
            None,
            handler,
            ListenerSettings::default(),
            varco::listener::Stop {
                drain: shutdown,
                close: tokio_util::sync::CancellationToken::new(),
            },
            tokio_util::task::TaskTracker::new(),
            None,
        )
        .await;
        Ok(())
    })
}
