//! The deployment files under `deploy/`: every JSON and YAML file parses;
//! the Grafana dashboard's panels each have a title and a query that
//! Prometheus parses (the weights panel's arithmetic checked on series); every
//! `varco_*` metric the dashboard and the Prometheus rules name is one
//! varco exports (`varco::metrics::NAMES`); each alert rule has its name,
//! expression, `for`, severity, summary and description; and the
//! Kubernetes ConfigMap's varco.toml is a valid config that agrees with the
//! Deployment's ports and volumes.
//!
//! YAML is read by Python's PyYAML (`python3 -c "import yaml"`), so these
//! tests need python3 and PyYAML installed (Debian: python3-yaml).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

/// Every file under `dir`, recursively, in a stable order.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        let entries =
            std::fs::read_dir(&d).unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display()));
        for entry in entries {
            let path = entry
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", d.display()))
                .path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// Files under `dir` (recursively) whose extension is one of `exts`.
fn files_with_ext(dir: &Path, exts: &[&str]) -> Vec<PathBuf> {
    files_under(dir)
        .into_iter()
        .filter(|p| {
            p.extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| exts.contains(&e))
        })
        .collect()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&read(path))
        .unwrap_or_else(|e| panic!("{} is not valid JSON: {e}", path.display()))
}

const INSTALL_PYYAML: &str =
    "these tests read YAML with Python's PyYAML: install it (Debian: apt-get install python3-yaml)";

/// Runs `python3 -c script args...`, after checking PyYAML is importable.
fn python(script: &str, args: &[&Path]) -> Output {
    match Command::new("python3").args(["-c", "import yaml"]).output() {
        Ok(o) if o.status.success() => {}
        Ok(o) => panic!(
            "python3 cannot import yaml: {INSTALL_PYYAML}\n{}",
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => panic!("cannot run python3 ({e}): {INSTALL_PYYAML}"),
    }
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run python3: {e}"))
}

/// The documents of a YAML file, as JSON values (converted by PyYAML).
fn yaml_documents(path: &Path) -> Vec<Value> {
    const TO_JSON: &str = "import sys, json, yaml; \
        json.dump(list(yaml.safe_load_all(open(sys.argv[1]))), sys.stdout, default=str)";
    let out = python(TO_JSON, &[path]);
    assert!(
        out.status.success(),
        "{} is not valid YAML:\n{}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{}: PyYAML's JSON did not parse: {e}", path.display()))
}

/// A string field at a `/`-separated JSON pointer, or a panic naming the file.
fn str_at<'a>(doc: &'a Value, pointer: &str, file: &Path) -> &'a str {
    doc.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{}: no string at {pointer}", file.display()))
}

#[test]
fn every_json_file_parses() {
    let files = files_with_ext(&deploy_dir(), &["json"]);
    assert!(!files.is_empty(), "no .json file under deploy/");
    for path in &files {
        read_json(path);
    }
}

#[test]
fn every_yaml_file_parses() {
    const LOAD: &str = "import sys, yaml; list(yaml.safe_load_all(open(sys.argv[1])))";
    let files = files_with_ext(&deploy_dir(), &["yaml", "yml"]);
    assert!(!files.is_empty(), "no .yaml file under deploy/");
    for path in &files {
        let out = python(LOAD, &[path.as_path()]);
        assert!(
            out.status.success(),
            "{} is not valid YAML:\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn each_dashboard_panel_has_a_title_and_a_query() {
    let path = deploy_dir().join("grafana/varco-dashboard.json");
    let dashboard = read_json(&path);
    let panels = dashboard["panels"]
        .as_array()
        .unwrap_or_else(|| panic!("{}: no `panels` array", path.display()));
    assert!(!panels.is_empty(), "{}: `panels` is empty", path.display());
    // A row only groups panels: check the panels inside it instead.
    let mut all = Vec::new();
    for p in panels {
        if p["type"] == "row" {
            all.extend(p["panels"].as_array().into_iter().flatten());
        } else {
            all.push(p);
        }
    }
    // Line breaks in the README's prose are spaces.
    let readme = read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    for (i, p) in all.iter().enumerate() {
        let title = p["title"].as_str().unwrap_or("");
        assert!(
            !title.trim().is_empty(),
            "{}: panel {i} has no title",
            path.display()
        );
        let has_query = p["targets"].as_array().is_some_and(|ts| {
            ts.iter()
                .any(|t| t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()))
        });
        assert!(
            has_query,
            "{}: panel \"{title}\" has no target with an `expr`",
            path.display()
        );
        // "Watching a click day in Grafana" names each panel as titled.
        assert!(
            readme.contains(&format!("**{title}**")),
            "README.md does not name the panel **{title}**"
        );
    }
}

/// Every `varco_[a-z_]+` identifier in `text` (not part of a longer word),
/// with a histogram's `_bucket`, `_sum` or `_count` suffix removed.
fn metric_names(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let mut names = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find("varco_").map(|i| from + i) {
        let mut end = at + "varco_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let starts_word =
            at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'_');
        if starts_word && end > at + "varco_".len() {
            let name = &text[at..end];
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            names.push(family.to_string());
        }
        from = end;
    }
    names
}

#[test]
fn every_metric_in_the_dashboard_and_the_rules_is_exported() {
    let dir = deploy_dir();
    let mut files = files_with_ext(&dir.join("grafana"), &["json"]);
    files.extend(files_with_ext(&dir.join("prometheus"), &["yaml"]));
    let mut seen = 0;
    let mut unknown = Vec::new();
    for path in &files {
        for name in metric_names(&read(path)) {
            seen += 1;
            if !varco::metrics::NAMES.contains(&name.as_str()) {
                unknown.push(format!("{name} (in {})", path.display()));
            }
        }
    }
    assert!(seen > 0, "no varco_* metric found in {files:?}");
    unknown.sort();
    unknown.dedup();
    assert!(
        unknown.is_empty(),
        "metrics that varco does not export (varco::metrics::NAMES):\n  {}\nNAMES: {:?}",
        unknown.join("\n  "),
        varco::metrics::NAMES
    );
}

#[test]
fn every_alert_rule_is_complete() {
    let path = deploy_dir().join("prometheus/varco-rules.yaml");
    let docs = yaml_documents(&path);
    assert_eq!(
        docs.len(),
        1,
        "{}: expected one YAML document",
        path.display()
    );
    let groups = docs[0]["groups"]
        .as_array()
        .filter(|g| !g.is_empty())
        .unwrap_or_else(|| panic!("{}: no `groups`", path.display()));
    let first = groups[0]["rules"].as_array().map_or(0, Vec::len);
    assert!(first > 0, "{}: groups[0].rules is empty", path.display());
    let mut names = Vec::new();
    for (g, group) in groups.iter().enumerate() {
        let rules = group["rules"]
            .as_array()
            .unwrap_or_else(|| panic!("{}: groups[{g}] has no `rules`", path.display()));
        for (r, rule) in rules.iter().enumerate() {
            let name = rule["alert"]
                .as_str()
                .filter(|n| !n.trim().is_empty())
                .unwrap_or_else(|| {
                    panic!("{}: groups[{g}].rules[{r}] has no `alert`", path.display())
                });
            for field in [
                "expr",
                "for",
                "labels/severity",
                "annotations/summary",
                "annotations/description",
            ] {
                let v = rule
                    .pointer(&format!("/{field}"))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                assert!(
                    !v.trim().is_empty(),
                    "{}: alert {name} (groups[{g}].rules[{r}]) has no {}",
                    path.display(),
                    field.replace('/', ".")
                );
            }
            let severity = str_at(rule, "/labels/severity", &path);
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{}: alert {name} has severity {severity:?}: use critical, warning or info",
                path.display()
            );
            names.push(name.to_string());
        }
    }
    let count = names.len();
    names.sort();
    names.dedup();
    assert_eq!(
        names.len(),
        count,
        "{}: two alerts share a name",
        path.display()
    );
}

/// The ConfigMap's varco.toml validates (with a test key standing in for
/// the Secret, whose placeholder must not validate), and its listeners and
/// snapshot path match the Deployment's ports and volume mounts.
#[test]
fn the_kubernetes_config_is_valid_and_matches_the_deployment() {
    let k8s = deploy_dir().join("kubernetes");
    let configmap = k8s.join("configmap.yaml");
    let secret = k8s.join("secret.yaml");
    let deployment = k8s.join("deployment.yaml");

    let toml = str_at(
        &yaml_documents(&configmap)[0],
        "/data/varco.toml",
        &configmap,
    )
    .to_string();
    let placeholder = str_at(
        &yaml_documents(&secret)[0],
        "/stringData/keys.toml",
        &secret,
    )
    .to_string();
    const KEY_FILE: &str = "\"/etc/varco/keys/keys.toml\"";
    assert!(
        toml.contains(KEY_FILE),
        "{}: expected key_file = {KEY_FILE}",
        configmap.display()
    );

    let dir = std::env::temp_dir().join(format!("varco-deploy-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let with_keys = |keys: &str| {
        let file = dir.join("keys.toml");
        std::fs::write(&file, keys).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let text = toml.replace(KEY_FILE, &format!("'{}'", file.display()));
        varco::config::Config::from_toml(&text, Path::new("/etc/varco"))
    };
    let refused = with_keys(&placeholder);
    // 32 bytes, base64: "test-key-for-deploy-tests-012345".
    let accepted = with_keys(
        "[[keys]]\nid = \"test\"\nsecret = \"dGVzdC1rZXktZm9yLWRlcGxveS10ZXN0cy0wMTIzNDU=\"\n",
    );
    let _ = std::fs::remove_dir_all(&dir);

    match refused {
        Ok(_) => panic!(
            "{}: varco accepts the placeholder key; it must refuse it",
            secret.display()
        ),
        Err(e) => assert!(
            e.0.iter().any(|p| p.key.starts_with("secrets")),
            "{}: the placeholder is refused, but not for its key:\n{e}",
            secret.display()
        ),
    }
    let config = accepted
        .unwrap_or_else(|e| panic!("{}: varco.toml is not valid:\n{e}", configmap.display()));
    assert_eq!(config.rooms.len(), 1, "{}", configmap.display());
    assert_eq!(config.rooms[0].name, "portal", "{}", configmap.display());
    assert!(config.rooms[0].is_gated(), "{}", configmap.display());

    let deploy = yaml_documents(&deployment);
    let container = deploy[0]
        .pointer("/spec/template/spec/containers/0")
        .unwrap_or_else(|| panic!("{}: no container", deployment.display()));
    let port = |name: &str| {
        container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("{}: no container port {name}", deployment.display()))
    };
    assert_eq!(
        u64::from(config.server.listen.port()),
        port("http"),
        "server.listen in {} and the http port in {}",
        configmap.display(),
        deployment.display()
    );
    assert_eq!(
        u64::from(config.server.admin_listen.port()),
        port("admin"),
        "server.admin_listen in {} and the admin port in {}",
        configmap.display(),
        deployment.display()
    );

    // The NetworkPolicy selects these pods, and lets in the ports they
    // name: a label or a port name that drifted would shut the public
    // port, or leave the admin one open to every pod.
    let policy_file = k8s.join("networkpolicy.yaml");
    let policy = &yaml_documents(&policy_file)[0];
    let pod_labels = &deploy[0]["spec"]["template"]["metadata"]["labels"];
    let selected = policy
        .pointer("/spec/podSelector/matchLabels")
        .and_then(Value::as_object)
        .unwrap_or_else(|| panic!("{}: no podSelector", policy_file.display()));
    assert!(
        !selected.is_empty() && selected.iter().all(|(k, v)| &pod_labels[k] == v),
        "{}: its podSelector {selected:?} does not select the pods of {} ({pod_labels})",
        policy_file.display(),
        deployment.display()
    );
    let let_in: Vec<&str> = policy["spec"]["ingress"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|rule| rule["ports"].as_array().into_iter().flatten())
        .filter_map(|p| p["port"].as_str())
        .collect();
    assert_eq!(let_in, ["http", "admin"], "{}", policy_file.display());
    for name in let_in {
        port(name);
    }
    let admin_rule = &policy["spec"]["ingress"][1];
    assert!(
        admin_rule["from"].as_array().is_some_and(|f| !f.is_empty()),
        "{}: the admin port is let in from anywhere",
        policy_file.display()
    );

    let mounts: Vec<&str> = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["mountPath"].as_str())
        .collect();
    let snapshot = config
        .store
        .snapshot
        .unwrap_or_else(|| panic!("{}: no store.snapshot", configmap.display()));
    for (what, path) in [
        ("the config", Path::new("/etc/varco/varco.toml")),
        ("secrets.key_file", Path::new("/etc/varco/keys/keys.toml")),
        ("store.snapshot", snapshot.as_path()),
    ] {
        let parent = path.parent().and_then(Path::to_str).unwrap_or("");
        assert!(
            mounts.contains(&parent),
            "{}: {what} ({}) is not on a mounted volume ({mounts:?})",
            deployment.display(),
            path.display()
        );
    }
}

/// Prometheus's own checker accepts the rules file (promtool comes with
/// Debian's prometheus package; scripts/test installs it).
#[test]
fn promtool_accepts_the_rules() {
    promtool("check", &deploy_dir().join("prometheus/varco-rules.yaml"));
}

/// Every panel's query with Grafana's variables filled in, by the
/// panel's title and the target's refId.
fn dashboard_queries() -> Vec<(String, String, String)> {
    let dashboard = read_json(&deploy_dir().join("grafana/varco-dashboard.json"));
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        for t in p["targets"].as_array().into_iter().flatten() {
            let Some(expr) = t["expr"].as_str() else {
                continue;
            };
            let expr = expr
                .replace("$__rate_interval", "5m")
                .replace("$__interval", "1m")
                .replace("$room", ".*");
            out.push((
                p["title"].as_str().unwrap_or("").to_string(),
                t["refId"].as_str().unwrap_or("").to_string(),
                expr,
            ));
        }
    }
    out
}

/// A rules file recording each (name, expression), and the directory it
/// is in (JSON strings are YAML's double-quoted scalars).
fn recording_rules(name: &str, rules: &[(String, String)]) -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("varco-deploy-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (record, expr) in rules {
        yaml.push_str(&format!(
            "      - record: {record}\n        expr: {}\n",
            serde_json::to_string(expr).unwrap()
        ));
    }
    let path = dir.join("rules.yaml");
    std::fs::write(&path, yaml).unwrap();
    (dir, path)
}

/// Prometheus parses every query of the dashboard: a panel whose query
/// does not parse shows an error on the day instead of a graph.
#[test]
fn promtool_parses_every_dashboard_query() {
    let queries = dashboard_queries();
    assert!(queries.len() > 20, "{queries:?}");
    let rules: Vec<(String, String)> = queries
        .iter()
        .map(|(title, refid, expr)| {
            let slug: String = title
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_lowercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            (format!("dashboard:{slug}:{refid}"), expr.clone())
        })
        .collect();
    let (dir, path) = recording_rules("queries", &rules);
    promtool("check", &path);
    std::fs::remove_dir_all(dir).ok();
}

/// The weights panel on two nodes' series: a 3 to 1 room is due 3/4 and
/// 1/4 and takes what its request counters say; an upstream out of
/// rotation is due nothing and the other all.
#[test]
fn the_weights_panel_shows_what_each_upstream_is_due_and_takes() {
    let queries = dashboard_queries();
    let query = |r: &str| {
        queries
            .iter()
            .find(|(title, refid, _)| title == "Requests by upstream: taken vs due" && refid == r)
            .map(|(_, _, expr)| expr.clone())
            .expect("the weights panel")
    };
    // Rounded: promtool compares floats exactly, and rates divide.
    let rounded = |r: &str| format!("round(({}), 0.001)", query(r));
    let (dir, rules) = recording_rules(
        "weights",
        &[("taken".into(), rounded("A")), ("due".into(), rounded("B"))],
    );
    let mut series = String::new();
    for node in ["a", "b"] {
        for (upstream, weight, share, per_minute) in
            [("x:80", 3, "1x10", 60 * 3), ("y:80", 1, "1x5 0x5", 60)]
        {
            let labels = format!("instance=\"{node}\",room=\"portal\",upstream=\"{upstream}\"");
            series.push_str(&format!(
                "      - series: 'varco_upstream_weight{{{labels}}}'\n        values: '{weight}x10'\n\
                 \x20     - series: 'varco_upstream_share{{{labels}}}'\n        values: '{share}'\n\
                 \x20     - series: 'varco_upstream_responses_total{{{labels},class=\"2xx\"}}'\n        values: '0+{per_minute}x10'\n"
            ));
        }
    }
    let expect = |at: &str, record: &str, x: f64, y: f64| {
        format!(
            "      - eval_time: {at}\n        expr: {record}\n        exp_samples:\n\
             \x20         - labels: '{record}{{room=\"portal\",upstream=\"x:80\"}}'\n            value: {x}\n\
             \x20         - labels: '{record}{{room=\"portal\",upstream=\"y:80\"}}'\n            value: {y}\n"
        )
    };
    let test = format!(
        "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{series}    promql_expr_test:\n{}{}{}",
        rules.display(),
        expect("4m", "due", 0.75, 0.25),
        expect("4m", "taken", 0.75, 0.25),
        expect("7m", "due", 1.0, 0.0),
    );
    let path = dir.join("weights_test.yaml");
    std::fs::write(&path, test).unwrap();
    promtool("test", &path);
    std::fs::remove_dir_all(dir).ok();
}

/// On a cluster every node exports its rooms' figures: each line of a
/// panel must still be one thing, not one line per node under one name.
/// Either the query folds the nodes away (aggregating `by` labels other
/// than `instance`, each named in the legend), or the legend names the
/// node.
#[test]
fn on_a_cluster_each_dashboard_line_is_one_thing() {
    let dashboard = read_json(&deploy_dir().join("grafana/varco-dashboard.json"));
    for p in dashboard["panels"].as_array().into_iter().flatten() {
        let title = p["title"].as_str().unwrap_or("");
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap_or("");
            let legend = t["legendFormat"].as_str().unwrap_or("");
            if legend.contains("{{instance}}") {
                continue;
            }
            let groups: Vec<Vec<&str>> = expr
                .split(" by (")
                .skip(1)
                .map(|rest| {
                    rest.split(')')
                        .next()
                        .unwrap_or("")
                        .split(',')
                        .map(str::trim)
                        .collect()
                })
                .collect();
            assert!(
                !groups.is_empty(),
                "{title}: `{expr}` gives a line per node, all named \"{legend}\""
            );
            for label in groups.iter().flatten().filter(|l| **l != "le") {
                assert_ne!(
                    *label, "instance",
                    "{title}: `{expr}` without the node in \"{legend}\""
                );
                assert!(
                    legend.contains(&format!("{{{{{label}}}}}")),
                    "{title}: lines by {label} all named \"{legend}\""
                );
            }
        }
    }
}

/// Two nodes export the same room: its line and its admissions are the
/// room's, once, not one per node nor their sum (each node reads the
/// cluster's totals from Redis).
#[test]
fn the_rooms_panels_count_a_cluster_once() {
    let queries = dashboard_queries();
    let query = |title: &str, refid: &str| {
        queries
            .iter()
            .find(|(t, r, _)| t == title && r == refid)
            .map(|(_, _, expr)| format!("round(({expr}), 0.001)"))
            .unwrap_or_else(|| panic!("the panel {title} {refid}"))
    };
    let (dir, rules) = recording_rules(
        "cluster-once",
        &[
            ("line".into(), query("Queue length", "A")),
            (
                "admitted".into(),
                query("Admissions per minute vs configured rate", "A"),
            ),
        ],
    );
    let mut series = String::new();
    for node in ["a", "b"] {
        let labels = format!("instance=\"{node}\",room=\"portal\"");
        series.push_str(&format!(
            "      - series: 'varco_room_queue_length{{{labels}}}'\n        values: '500x10'\n\
             \x20     - series: 'varco_admitted_total{{{labels}}}'\n        values: '0+60x10'\n"
        ));
    }
    let expect = |record: &str, value: f64| {
        format!(
            "      - eval_time: 5m\n        expr: {record}\n        exp_samples:\n\
             \x20         - labels: '{record}{{room=\"portal\"}}'\n            value: {value}\n"
        )
    };
    let test = format!(
        "rule_files:\n  - {}\nevaluation_interval: 1m\ntests:\n  - interval: 1m\n    input_series:\n{series}    promql_expr_test:\n{}{}",
        rules.display(),
        expect("line", 500.0),
        expect("admitted", 60.0),
    );
    let path = dir.join("cluster_once_test.yaml");
    std::fs::write(&path, test).unwrap();
    promtool("test", &path);
    std::fs::remove_dir_all(dir).ok();
}

/// `promtool <what> rules <file>`, which must succeed.
fn promtool(what: &str, file: &Path) {
    let out = std::process::Command::new("promtool")
        .arg(what)
        .arg("rules")
        .arg(file)
        .output()
        .expect("promtool (scripts/test installs Debian's prometheus package for it)");
    assert!(
        out.status.success(),
        "promtool {what} rules {}:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The rules behave as meant on sample series (tests/prometheus): with
/// several varco nodes too, each exporting the same room.
#[test]
fn the_rules_fire_on_a_cluster_s_series() {
    promtool(
        "test",
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/prometheus/rules_test.yaml"),
    );
}

/// The env of a pod's first container, by name: its literal value, or
/// "SECRET/KEY" for one taken from a Secret.
fn container_env(doc: &Value, file: &Path) -> Vec<(String, String)> {
    let env = doc
        .pointer("/spec/template/spec/containers/0/env")
        .and_then(Value::as_array)
        .unwrap_or_else(|| panic!("{}: the container has no env", file.display()));
    env.iter()
        .map(|e| {
            let name = str_at(e, "/name", file).to_string();
            let value = match e.pointer("/valueFrom/secretKeyRef") {
                Some(r) => format!("{}/{}", str_at(r, "/name", file), str_at(r, "/key", file)),
                None => str_at(e, "/value", file).to_string(),
            };
            (name, value)
        })
        .collect()
}

/// The cluster variant: its varco.toml validates with the Redis store
/// (its URL made from the password the Redis asks for), keeps no
/// snapshot, and its Deployment runs several replicas that mount no
/// state volume. The Redis asks for a password and lets only varco's
/// pods in: whoever writes to it runs the waiting room.
#[test]
fn the_kubernetes_cluster_variant_uses_redis_and_several_replicas() {
    let dir = deploy_dir().join("kubernetes/cluster");
    let deployment = dir.join("deployment.yaml");
    let doc = &yaml_documents(&deployment)[0];
    let env = container_env(doc, &deployment);
    let of = |name: &str| {
        env.iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{}: no {name} in the env", deployment.display()))
    };
    let password = of("VARCO_REDIS_PASSWORD");
    let url = of("VARCO_REDIS_URL").replace("$(VARCO_REDIS_PASSWORD)", "0123abcd");
    assert!(url.contains(":0123abcd@"), "{url}");
    std::env::set_var("VARCO_REDIS_URL", &url);

    let redis = dir.join("redis.yaml");
    let docs = yaml_documents(&redis);
    let set = docs
        .iter()
        .find(|d| d["kind"] == "StatefulSet")
        .expect("a Redis StatefulSet");
    let redis_env = container_env(set, &redis);
    assert!(
        redis_env
            .iter()
            .any(|(n, v)| n == "REDIS_PASSWORD" && *v == password),
        "{}: Redis's password is not varco's ({password}): {redis_env:?}",
        redis.display()
    );
    let command = set["spec"]["template"]["spec"]["containers"][0]["command"].to_string();
    assert!(
        command.contains("--requirepass \\\"$REDIS_PASSWORD\\\""),
        "{}: Redis asks for no password: {command}",
        redis.display()
    );
    let policy = docs
        .iter()
        .find(|d| d["kind"] == "NetworkPolicy")
        .unwrap_or_else(|| panic!("{}: no NetworkPolicy for Redis", redis.display()));
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "varco-redis"
    );
    let from = &policy["spec"]["ingress"];
    assert_eq!(from.as_array().map(Vec::len), Some(1), "{from}");
    assert_eq!(
        from[0]["from"],
        serde_json::json!([{ "podSelector": { "matchLabels": { "app.kubernetes.io/name": "varco" } } }]),
        "only varco's pods"
    );

    let configmap = dir.join("configmap.yaml");
    let toml = str_at(
        &yaml_documents(&configmap)[0],
        "/data/varco.toml",
        &configmap,
    )
    .replace("\"/etc/varco/keys/keys.toml\"", "\"keys.toml\"");
    let tmp = std::env::temp_dir().join(format!("varco-deploy-cluster-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    std::fs::write(
        tmp.join("keys.toml"),
        "[[keys]]\nid = \"test\"\nsecret = \"dGVzdC1rZXktZm9yLWRlcGxveS10ZXN0cy0wMTIzNDU=\"\n",
    )
    .expect("key file");
    let config = varco::config::Config::from_toml(&toml, &tmp)
        .unwrap_or_else(|e| panic!("{}: varco.toml is not valid:\n{e}", configmap.display()));
    let _ = std::fs::remove_dir_all(&tmp);
    assert!(
        matches!(&config.store.kind, varco::config::StoreKind::Redis { url: u, .. } if *u == url),
        "{}: cluster mode needs the redis store, at the URL with the password",
        configmap.display()
    );
    assert!(config.store.snapshot.is_none());

    let replicas = doc
        .pointer("/spec/replicas")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    assert!(
        replicas >= 3,
        "{}: {replicas} replicas",
        deployment.display()
    );
    assert!(
        !read(&deployment).contains("persistentVolumeClaim"),
        "{}: cluster nodes keep no local state",
        deployment.display()
    );
    assert!(
        read(&redis).contains("--appendonly"),
        "{}: Redis must persist",
        redis.display()
    );
}
