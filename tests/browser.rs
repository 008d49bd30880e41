//! The waiting page and the operator page in a real browser: the demo
//! portal behind a real varco, and Debian's Chromium driven by
//! playwright-core (tests/browser/citizen_and_operator.mjs). A citizen
//! waits on a phone, watches the place improve, is let in by the page
//! itself onto the page first asked for (at once when the page comes back
//! into view, its timers held back meanwhile), keeps the place across a reload
//! and a second tab, and gets through without JavaScript; axe-core checks
//! the pages; an operator watches the room live. Screenshots at 360 and
//! 1280 px land in target/browser-artifacts/.
//!
//! Needs node, the packages of tests/browser (npm ci) and chromium:
//! scripts/test installs them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::Varco;
use varco::demo::PortalSettings;

const TOKEN: &str = "operator-token-for-the-browser-test";

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_citizen_and_an_operator_in_chromium() {
    let dir = browser_dir();
    assert!(
        dir.join("node_modules/playwright-core").is_dir()
            && dir.join("node_modules/axe-core").is_dir(),
        "tests/browser/node_modules is missing: run scripts/test (it runs npm ci there)"
    );
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: run scripts/test (it installs Debian's chromium)"
    );

    let portal = varco::demo::spawn(
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        PortalSettings {
            capacity: 50,
            service_time: Duration::from_millis(5),
        },
    )
    .unwrap();
    let tmp = std::env::temp_dir().join(format!("varco-browser-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(
        tmp.join("tokens.toml"),
        format!("[[tokens]]\nid = \"wall-screen\"\ntoken = \"{TOKEN}\"\n"),
    )
    .unwrap();
    // One slot: the browser waits behind the people the script sends.
    let v = Varco::start_in(
        &format!(
            "[log]\naccess = false\n[secrets]\nephemeral = true\n\
             [admin]\ntokens_file = \"tokens.toml\"\n[store]\ntick = \"200ms\"\n\
             [rooms.portal]\nupstreams = [{{ url = \"http://{}\", weight = 2 }}]\n\
             admission_per_minute = 600\nmax_active = 1\nsession_idle = \"10m\"\n\
             per_ip = {{ tickets_per_minute = 100000, status_per_minute = 100000 }}\n\
             [rooms.portal.health_check]\npath = \"/healthz\"\nslow_start = \"1h\"\n\
             [rooms.portal.lanes.citizens]\nweight = 0.8\n\
             [rooms.portal.lanes.partners]\nweight = 0.2\ncidrs = [\"192.0.2.0/24\"]\n\
             [rooms.plain]\nupstreams = [\"http://{}\"]\nmax_active = 100\npaths = [\"/plain/\"]\n",
            portal.addr, portal.addr
        ),
        &tmp,
    )
    .await;

    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/browser-artifacts");
    let _ = std::fs::remove_dir_all(&artifacts);
    let run = tokio::process::Command::new("node")
        .arg("citizen_and_operator.mjs")
        .current_dir(&dir)
        .env("VARCO_URL", format!("http://{}", v.addr))
        .env("ADMIN_URL", format!("http://{}", v.admin))
        .env("ADMIN_TOKEN", TOKEN)
        .env("ARTIFACTS", &artifacts)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("the browser script finished within 4 minutes")
        .expect("node runs (scripts/test installs it)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}\n{stderr}");
    assert!(
        out.status.success(),
        "browser checks failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all browser checks passed"));

    // The screenshots are what a citizen and an operator saw.
    for shot in [
        "waiting-360.png",
        "waiting-1280.png",
        "admitted-360.png",
        "operator-1280.png",
    ] {
        let bytes = std::fs::read(artifacts.join(shot)).unwrap_or_else(|e| panic!("{shot}: {e}"));
        assert!(
            bytes.starts_with(b"\x89PNG") && bytes.len() > 5_000,
            "{shot} is not a real screenshot"
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
}
