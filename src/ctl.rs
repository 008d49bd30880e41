//! `varco ctl`: the admin API from the command line, so operators need no
//! curl. The token comes from an environment variable, never an argument
//! (arguments show in `ps`). Given several admin listeners it sends the
//! same action to every one (a cluster's nodes follow a change made on any
//! of them within a tick; telling each also reaches a node that cannot
//! reach Redis, and reloads each one's file).

use clap::Subcommand;
use http::Request;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::body::{self, Body};

#[derive(Debug, Clone, Subcommand)]
pub enum Action {
    /// Every room's live state.
    Status,
    /// Stop admitting; tickets are still handed out.
    Pause { room: String },
    /// Admit again (mode queue).
    Resume { room: String },
    /// Everyone without a pass goes through the queue.
    QueueAll { room: String },
    /// Nobody new gets in or in line; pass holders finish.
    Close { room: String },
    /// Open the room (mode queue).
    Open { room: String },
    /// Stop admitting and let active sessions finish.
    Drain { room: String },
    /// Set the admission rate: new sessions a minute, or "unlimited".
    Rate { room: String, per_minute: String },
    /// Set the cap on live sessions, or "unlimited".
    MaxActive { room: String, value: String },
    /// Drop the live changes: mode, rate and cap back to the config (on
    /// every node of a cluster).
    Reset { room: String },
    /// Take an upstream (host:port) out of rotation on this node, e.g. for
    /// a deploy on that server; a reload keeps it out, a restart does not.
    UpstreamOut {
        room: String,
        upstream: String,
        /// Even the last upstream of the room in rotation (everyone then
        /// gets 502).
        #[arg(long)]
        force: bool,
    },
    /// Put an upstream taken out back in rotation.
    UpstreamIn { room: String, upstream: String },
    /// Re-read the config file (a bad one is refused; the old one stays).
    Reload,
}

impl Action {
    fn request(&self) -> (&'static str, String) {
        let room = |r: &str, a: &str| format!("/api/rooms/{r}/{a}");
        match self {
            Action::Status => ("GET", "/api/rooms".into()),
            Action::Pause { room: r } => ("POST", room(r, "pause")),
            Action::Resume { room: r } => ("POST", room(r, "resume")),
            Action::QueueAll { room: r } => ("POST", room(r, "queue_all")),
            Action::Close { room: r } => ("POST", room(r, "close")),
            Action::Open { room: r } => ("POST", room(r, "open")),
            Action::Drain { room: r } => ("POST", room(r, "drain")),
            Action::Rate {
                room: r,
                per_minute,
            } => ("POST", format!("{}?value={per_minute}", room(r, "rate"))),
            Action::MaxActive { room: r, value } => {
                ("POST", format!("{}?value={value}", room(r, "max_active")))
            }
            Action::Reset { room: r } => ("POST", room(r, "reset")),
            Action::UpstreamOut {
                room: r,
                upstream,
                force,
            } => (
                "POST",
                room(
                    r,
                    &format!(
                        "upstreams/{}/out{}",
                        escaped(upstream),
                        if *force { "?force=true" } else { "" }
                    ),
                ),
            ),
            Action::UpstreamIn { room: r, upstream } => (
                "POST",
                room(r, &format!("upstreams/{}/in", escaped(upstream))),
            ),
            Action::Reload => ("POST", "/api/reload".into()),
        }
    }

    /// Whether `v` is what the admin API answers this action with: a
    /// refusal's `error`, or the rooms, the room changed, the reload.
    fn answered_in(&self, v: &Value, success: bool) -> bool {
        match (success, self) {
            (false, _) => v.get("error").is_some(),
            (true, Action::Status) => v["rooms"].is_array(),
            (true, Action::Reload) => v["reloaded"] == Value::Bool(true),
            (true, _) => v["name"].is_string() && v["mode"].is_string(),
        }
    }
}

/// An upstream's label in a path: an IPv6 address's brackets escaped.
fn escaped(upstream: &str) -> String {
    upstream.replace('[', "%5B").replace(']', "%5D")
}

/// `admin`: one admin listener, or several separated by commas: each is
/// told in turn, and a failure on one does not stop the others (the error
/// then names every listener that failed).
pub fn run(
    admin: &str,
    token_env: &str,
    timeout: std::time::Duration,
    action: Action,
) -> anyhow::Result<()> {
    // Trimmed, as varco trims the tokens it reads: a file or a Secret
    // ends with a newline, which no header may hold.
    let token = std::env::var(token_env)
        .map_err(|_| anyhow::anyhow!("set {token_env} to an admin token (see README: admin API)"))?
        .trim()
        .to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let listeners: Vec<&str> = admin
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    // An empty variable in a script must not report a change nobody heard.
    if listeners.is_empty() {
        anyhow::bail!("--admin names no admin listener");
    }
    let mut failed = Vec::new();
    for a in &listeners {
        if listeners.len() > 1 {
            println!("== {a}");
        }
        let told = rt.block_on(async {
            tokio::time::timeout(timeout, one(a, &token, &action))
                .await
                .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {timeout:?}")))
        });
        if let Err(e) = told {
            eprintln!("{a}: {e}");
            failed.push(*a);
        }
    }
    if !failed.is_empty() {
        anyhow::bail!(
            "failed on {} of {} admin listeners: {}",
            failed.len(),
            listeners.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

async fn one(admin: &str, token: &str, action: &Action) -> anyhow::Result<()> {
    let (method, path) = action.request();
    // `127.0.0.1:9090`, as `admin_listen` writes it, is meant as http.
    let base = admin.trim_end_matches('/');
    if base.contains("://") && !base.starts_with("http://") {
        anyhow::bail!(
            "varco ctl speaks plain HTTP, as the admin listener does: give http://HOST:PORT (behind a TLS proxy, run ctl on the proxy's side)"
        );
    }
    let url = if base.contains("://") {
        format!("{base}{path}")
    } else {
        format!("http://{base}{path}")
    };
    let (status, kind, text) = async {
        let client: Client<_, Body> = Client::builder(TokioExecutor::new()).build_http();
        let req = Request::builder()
            .method(method)
            .uri(&url)
            .header("authorization", format!("Bearer {token}"))
            .body(body::empty())?;
        let resp = client
            .request(req)
            .await
            // With its causes: hyper-util's own words are only "client
            // error (Connect)", the reason (refused, no route, a name that
            // does not resolve) is in its source.
            .map_err(|e| anyhow::anyhow!("cannot reach {url}: {:#}", anyhow::Error::new(e)))?;
        let status = resp.status();
        let kind = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("no Content-Type")
            .to_string();
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, kind, String::from_utf8_lossy(&bytes).into_owned()))
    }
    .await?;
    // Only the admin API answers in its own JSON: the public listener
    // given by mistake answers a waiting page, or the portal its own 200,
    // and a script's `varco ctl pause portal && notify` would report a
    // pause nobody made.
    let v = match kind.starts_with("application/json") {
        true => serde_json::from_str::<Value>(&text).ok(),
        false => None,
    };
    let Some(v) = v.filter(|v| action.answered_in(v, status.is_success())) else {
        anyhow::bail!(
            "{status} ({kind}), not an answer of varco's admin API: is this the admin listener (`server.admin_listen`)?"
        );
    };
    if !status.is_success() {
        // A refused reload's reasons, a key a line, as lines.
        match &v["error"] {
            Value::String(e) => anyhow::bail!("{status}: {}", e.trim_end()),
            e => anyhow::bail!("{status}: {e}"),
        }
    }
    match action {
        Action::Status => print!("{}", status_table(&v)),
        _ => println!("{}", serde_json::to_string_pretty(&v)?),
    }
    Ok(())
}

fn status_table(v: &Value) -> String {
    let mut out = format!(
        "{:<16} {:<12} {:>10} {:>10} {:>12} {:>10} {:>12}  {}\n",
        "ROOM", "MODE", "WAITING", "ACTIVE", "MAX_ACTIVE", "RATE/MIN", "WAIT", "UPSTREAMS"
    );
    // Whole numbers as such; a fractional rate (0.4 a minute) to two
    // decimals, not rounded to a misleading 0.
    let show = |x: &Value| match x {
        Value::Null => "-".to_string(),
        Value::Number(n) => n
            .as_f64()
            .map(|f| {
                if f.fract() == 0.0 {
                    format!("{f}")
                } else {
                    format!("{f:.2}")
                }
            })
            .unwrap_or_default(),
        other => other.to_string(),
    };
    // What an operator changed live holds over the file, a reload too,
    // until a reset: marked, or it would read as the file's.
    let mut any_live = false;
    for r in v["rooms"].as_array().into_iter().flatten() {
        let mut live = |name: &str| {
            let held = r["live_changes"]
                .as_array()
                .is_some_and(|l| l.iter().any(|c| c == name));
            any_live |= held;
            if held {
                "*"
            } else {
                ""
            }
        };
        let (mode_live, max_live, rate_live) = (
            live("mode"),
            live("max_active"),
            live("admission_per_minute"),
        );
        let wait = match r["estimated_wait_seconds"].as_u64() {
            Some(s) => format!("{}m{:02}s", s / 60, s % 60),
            None => "-".into(),
        };
        let upstreams: Vec<&Value> = r["upstreams"].as_array().into_iter().flatten().collect();
        let in_rotation = upstreams.iter().filter(|u| u["healthy"] == true).count();
        // With health checks, whether a server taken out (redeployed)
        // would pass: the operator puts it back on that.
        let taken_out: Vec<String> = upstreams
            .iter()
            .filter(|u| u["taken_out"] == true)
            .map(|u| {
                let name = u["upstream"].as_str().unwrap_or("?");
                match u["checks_pass"].as_bool() {
                    Some(true) => format!("{name} (checks pass)"),
                    Some(false) => format!("{name} (checks fail)"),
                    None => name.to_string(),
                }
            })
            .collect();
        // In its slow start: how far it has come.
        let warming: Vec<String> = upstreams
            .iter()
            .filter(|u| u["healthy"] == true)
            .filter_map(|u| {
                let share = u["share"].as_f64().filter(|s| *s < 1.0)?;
                let name = u["upstream"].as_str().unwrap_or("?");
                // Floored, as the operator page shows it: 99.9% is not yet 100.
                Some(format!("{name} ({}%)", (share * 100.0).floor()))
            })
            .collect();
        // Only the heavier ones: all at 1 is the plain rotation.
        let weighted: Vec<String> = upstreams
            .iter()
            .filter_map(|u| {
                let weight = u["weight"].as_u64().filter(|w| *w > 1)?;
                let name = u["upstream"].as_str().unwrap_or("?");
                Some(format!("{name} (weight {weight})"))
            })
            .collect();
        let mut rotation = format!("{in_rotation}/{} in rotation", upstreams.len());
        if !weighted.is_empty() {
            rotation.push_str(&format!("; weighted: {}", weighted.join(", ")));
        }
        if !warming.is_empty() {
            rotation.push_str(&format!("; warming up: {}", warming.join(", ")));
        }
        if !taken_out.is_empty() {
            rotation.push_str(&format!("; taken out: {}", taken_out.join(", ")));
        }
        out.push_str(&format!(
            "{:<16} {:<12} {:>10} {:>10} {:>12} {:>10} {:>12}  {}\n",
            r["name"].as_str().unwrap_or("?"),
            format!("{}{mode_live}", r["mode"].as_str().unwrap_or("?")),
            show(&r["queue_length"]),
            show(&r["active_sessions"]),
            format!("{}{max_live}", show(&r["max_active"])),
            format!("{}{rate_live}", show(&r["admission_per_minute"])),
            wait,
            rotation
        ));
    }
    if any_live {
        out.push_str("* changed live: holds over the config file, a reload too, until `varco ctl reset ROOM`\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_table_keeps_a_fractional_rate() {
        let v = serde_json::json!({"rooms": [{
            "name": "portal", "mode": "queue", "queue_length": 12,
            "active_sessions": 3, "max_active": null,
            "admission_per_minute": 0.4, "estimated_wait_seconds": 95
        }]});
        let table = status_table(&v);
        let row = table.lines().nth(1).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cols,
            ["portal", "queue", "12", "3", "-", "0.40", "1m35s", "0/0", "in", "rotation"]
        );
    }

    #[test]
    fn the_status_table_names_upstreams_weighted_taken_out_and_warming_up() {
        let v = serde_json::json!({"rooms": [{
            "name": "portal", "mode": "queue", "upstreams": [
                {"upstream": "10.0.0.1:80", "healthy": true, "taken_out": false, "share": 1.0, "weight": 3},
                {"upstream": "10.0.0.2:80", "healthy": false, "taken_out": true, "checks_pass": true, "share": 0.0, "weight": 1},
                {"upstream": "[::1]:80", "healthy": false, "taken_out": false, "share": 0.0},
                {"upstream": "10.0.0.3:80", "healthy": true, "taken_out": false, "share": 0.4}
            ]
        }]});
        let row = status_table(&v).lines().nth(1).unwrap().to_string();
        assert!(
            row.ends_with(
                "2/4 in rotation; weighted: 10.0.0.1:80 (weight 3); warming up: 10.0.0.3:80 (40%); \
                 taken out: 10.0.0.2:80 (checks pass)"
            ),
            "{row}"
        );
    }

    #[test]
    fn an_ipv6_upstream_is_escaped_in_the_path() {
        let (_, path) = Action::UpstreamOut {
            room: "portal".into(),
            upstream: "[::1]:8080".into(),
            force: true,
        }
        .request();
        assert_eq!(
            path,
            "/api/rooms/portal/upstreams/%5B::1%5D:8080/out?force=true"
        );
    }
}
