//! Each bad config gives its own error naming the key; good ones resolve
//! with the documented defaults.

use std::path::Path;
use std::time::Duration;

use varco::config::Config;

fn errors(toml: &str) -> varco::config::ConfigErrors {
    match Config::from_toml(toml, Path::new(".")) {
        Ok(_) => panic!("accepted a bad config:\n{toml}"),
        Err(e) => e,
    }
}

const ROOM: &str = "[rooms.portal]\nupstreams = [\"http://127.0.0.1:9001\"]\n";

/// Keys every node of a cluster shares, from the environment.
const SHARED_KEYS: &str = "[secrets]\nkey_env = \"VARCO_TEST_SHARED_KEYS\"\n";

fn set_shared_keys() {
    std::env::set_var(
        "VARCO_TEST_SHARED_KEYS",
        "k1:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    );
}

/// The portal holds a copy of the arrival key: it may not be a key that
/// signs passes.
#[test]
fn the_arrival_key_is_no_signing_key() {
    set_shared_keys();
    std::env::set_var(
        "VARCO_TEST_ARRIVAL_SAME",
        "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    );
    std::env::set_var(
        "VARCO_TEST_ARRIVAL_OTHER",
        "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=",
    );
    let with = |var: &str| {
        format!(
            "[secrets]\nkey_env = \"VARCO_TEST_SHARED_KEYS\"\narrival_key_env = \"{var}\"\n{ROOM}"
        )
    };
    let e = errors(&with("VARCO_TEST_ARRIVAL_SAME"));
    assert!(e.names("secrets.arrival_key_env"), "{e}");
    Config::from_toml(&with("VARCO_TEST_ARRIVAL_OTHER"), Path::new(".")).expect("another key");
}

/// In cluster mode every node must verify the others' tickets and draw
/// the same pre-queue order: keys varco makes up (each node its own) are
/// refused, by the key that asked for them.
#[test]
fn cluster_mode_needs_keys_every_node_shares() {
    set_shared_keys();
    let redis = "[store]\nkind = \"redis\"\nurl = \"redis://10.0.0.9:6379/0\"\n";
    let e = errors(&format!("[secrets]\nephemeral = true\n{redis}{ROOM}"));
    assert!(e.names("secrets.ephemeral"), "{e}");
    // A room with no limits needs no key; an operator may gate it live.
    let e = errors(&format!("{redis}{ROOM}"));
    assert!(e.names("secrets"), "{e}");
    Config::from_toml(&format!("{SHARED_KEYS}{redis}{ROOM}"), Path::new(".")).expect("shared keys");
    Config::from_toml(
        &format!("[secrets]\nephemeral = true\n{ROOM}"),
        Path::new("."),
    )
    .expect("one node may make its keys up");
}

#[test]
fn defaults_apply() {
    let c = Config::from_toml(ROOM, Path::new(".")).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.server.header_read_timeout, Duration::from_secs(30));
    assert_eq!(c.server.max_header_size, 32 * 1024);
    assert_eq!(c.upstream.connect_timeout, Duration::from_secs(5));
    assert_eq!(c.upstream.request_buffer, 1 << 20);
    assert_eq!(c.upstream.request_buffer_memory, 256 << 20);
    assert_eq!(c.rooms[0].paths, vec!["/"]);
    assert!(c.rooms[0].preserve_host);
}

/// What the checks on a room's paths must not refuse: assets of their
/// own path exempt beside a gated one, a detour inside the room, a path
/// with a slash and an escape that is already canonical.
#[test]
fn rooms_partly_exempt_are_accepted() {
    for room in [
        "paths = [\"/app\", \"/assets\"]\nexempt_paths = [\"/assets/\"]\n",
        "paths = [\"/app\"]\nexempt_paths = [\"/app/static/\"]\nflow_paths = [\"/app/oidc/callback\"]\n",
        "paths = [\"/app/\", \"/caf%C3%A8\"]\n",
        // Exempt as browsers send it, under the room's path written raw.
        "paths = [\"/caf\u{e8}\"]\nexempt_paths = [\"/caf%C3%A8/static/\"]\n",
    ] {
        let toml = format!("[secrets]\nephemeral = true\n{ROOM}{room}");
        if let Err(e) = Config::from_toml(&toml, Path::new(".")) {
            panic!("refused {room:?}: {e}");
        }
    }
}

/// `check-config` prints the resolved config (the systemd unit runs it
/// before every start, into the journal): never the Redis password.
#[test]
fn the_printed_config_keeps_the_redis_password_out() {
    set_shared_keys();
    let toml = format!(
        "{SHARED_KEYS}[store]\nkind = \"redis\"\nurl = \"redis://varco:s3cret-pw@10.0.0.9:6379/0\"\n{ROOM}"
    );
    let printed = Config::from_toml(&toml, Path::new(".")).unwrap().to_toml();
    assert!(!printed.contains("s3cret-pw"), "{printed}");
    assert!(
        printed.contains("url = \"redis://varco:***@10.0.0.9:6379/0\""),
        "{printed}"
    );
    let e = errors(&format!(
        "[store]\nkind = \"redis\"\nurl = \"http://:s3cret-pw@x\"\n{ROOM}"
    ));
    assert!(!e.to_string().contains("s3cret-pw"), "{e}");
    // A password with a `/` (as base64 makes them) not percent-encoded:
    // the URL does not parse, and its error shows none of it.
    let e = errors(&format!(
        "[store]\nkind = \"redis\"\nurl = \"redis://:Zq8v/Lk3+pw=@10.0.0.9:6379/0\"\n{ROOM}"
    ));
    assert!(e.names("store.url"), "{e}");
    let text = e.to_string();
    assert!(!text.contains("Zq8v") && !text.contains("Lk3"), "{text}");
    assert!(text.contains("redis://***@10.0.0.9:6379/0"), "{text}");
    // No scheme at all: the part before the `@` is not shown either.
    let e = errors(&format!(
        "[store]\nkind = \"redis\"\nurl = \"default:S3cret@10.0.0.9:6379\"\n{ROOM}"
    ));
    assert!(e.names("store.url"), "{e}");
    assert!(!e.to_string().contains("S3cret"), "{e}");
    // A password alone (a variable meant to hold just it), and one in a
    // query (redis+unix's `?pass=`): refused, and not shown.
    for url in ["S3cretPw", "redis+unix:///run/redis.sock?pass=S3cretPw"] {
        let e = errors(&format!(
            "[store]\nkind = \"redis\"\nurl = \"{url}\"\n{ROOM}"
        ));
        assert!(e.names("store.url"), "{e}");
        assert!(!e.to_string().contains("S3cret"), "{e}");
    }
    for (url, shown) in [
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("rediss://u:p@w@h/2", "rediss://u:***@h/2"),
        ("redis://h:6379/0", "redis://h:6379/0"),
        ("redis://user@h", "redis://user@h"),
        ("redis://h/0?x=a@b", "redis://h/0?x=a@b"),
    ] {
        assert_eq!(varco::config::redacted(url), shown, "{url}");
    }
}

/// A Redis CA renewed under the same path reads as a change of the
/// store (what a reload names as waiting for a restart: the store reads
/// it only as it starts), as a renewed upstream CA does; read again
/// unchanged, as none.
#[test]
fn a_redis_ca_renewed_under_its_path_is_a_change() {
    set_shared_keys();
    let dir = std::env::temp_dir().join(format!("varco-config-redis-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = |name: &str| {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("redis-ca.pem"), cert.pem()).unwrap();
    };
    let toml = format!(
        "{SHARED_KEYS}[store]\nkind = \"redis\"\nurl = \"rediss://10.0.0.9:6380/0\"\ntls_ca = \"redis-ca.pem\"\n{ROOM}"
    );
    let read = || Config::from_toml(&toml, &dir).unwrap().store.kind;
    ca("ca-2026.example.it");
    let running = read();
    assert_eq!(read(), running, "the same file read again");
    ca("ca-2027.example.it");
    assert_ne!(read(), running, "renewed under the same path");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Redis URL (and its password) from a file or the environment,
/// as the other secrets: each source named by its own key when it fails.
#[test]
fn the_redis_url_comes_from_a_file_or_the_environment() {
    use varco::config::StoreKind;
    set_shared_keys();
    let dir = std::env::temp_dir().join(format!("varco-config-url-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("redis-url");
    std::fs::write(&file, "redis://:s3cret-pw@10.0.0.9:6379/0\n").unwrap();
    std::env::set_var(
        "VARCO_TEST_REDIS_URL",
        "rediss://:s3cret-pw@10.0.0.9:6380/1",
    );
    std::env::set_var("VARCO_TEST_NOT_A_URL", "10.0.0.9:6379");
    let store = |keys: &str| format!("{SHARED_KEYS}[store]\nkind = \"redis\"\n{keys}\n{ROOM}");
    let url_of = |keys: &str| match Config::from_toml(&store(keys), &dir).unwrap().store.kind {
        StoreKind::Redis { url, .. } => url,
        StoreKind::Memory => panic!("not the Redis store"),
    };
    assert_eq!(
        url_of("url_file = \"redis-url\""),
        "redis://:s3cret-pw@10.0.0.9:6379/0"
    );
    assert_eq!(
        url_of("url_env = \"VARCO_TEST_REDIS_URL\""),
        "rediss://:s3cret-pw@10.0.0.9:6380/1"
    );
    let printed = Config::from_toml(&store("url_file = \"redis-url\""), &dir)
        .unwrap()
        .to_toml();
    assert!(!printed.contains("s3cret-pw"), "{printed}");

    let refused = |keys: &str| match Config::from_toml(&store(keys), &dir) {
        Ok(_) => panic!("accepted {keys}"),
        Err(e) => e,
    };
    for (keys, key) in [
        ("url_file = \"missing\"", "store.url_file"),
        ("url_env = \"VARCO_TEST_UNSET_URL\"", "store.url_env"),
        ("url_env = \"VARCO_TEST_NOT_A_URL\"", "store.url_env"),
        (
            "url = \"redis://h\"\nurl_env = \"VARCO_TEST_REDIS_URL\"",
            "store.url",
        ),
    ] {
        let e = refused(keys);
        assert!(e.names(key), "{keys}: {e}");
        assert_eq!(e.0.len(), 1, "{keys}: one problem: {e}");
        assert!(!e.to_string().contains("s3cret-pw"), "{e}");
    }
    // With the memory store, as `url` is.
    let e = errors(&format!(
        "[secrets]\nephemeral = true\n[store]\nurl_env = \"VARCO_TEST_REDIS_URL\"\n{ROOM}"
    ));
    assert!(e.names("store.url_env"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A bypass secret from the environment is trimmed as one from a file
/// is: made from a file, it ends in a newline no header value can hold.
#[test]
fn a_secret_from_the_environment_loses_its_newline() {
    std::env::set_var("VARCO_TEST_BYPASS_NEWLINE", "a-bypass-secret-0123456789\n");
    let c = Config::from_toml(
        &format!(
            "[secrets]\nephemeral = true\n{ROOM}\
             bypass = {{ header = \"X-B\", secret_env = \"VARCO_TEST_BYPASS_NEWLINE\" }}\n"
        ),
        Path::new("."),
    )
    .unwrap();
    let (_, secret) = c.rooms[0].bypass.header.clone().unwrap();
    assert_eq!(secret, "a-bypass-secret-0123456789");
}

/// A host written with the root's dot matches requests for it, which
/// lose theirs before they are matched.
#[test]
fn a_host_with_the_roots_dot_matches() {
    let toml = "[rooms.portal]\nupstreams = [\"http://127.0.0.1:9001\"]\nhosts = [\"Portale.Example.it.\", \"*.example.org.\"]\n";
    let c = Config::from_toml(toml, Path::new(".")).unwrap();
    let rooms: Vec<std::sync::Arc<varco::room::Room>> = c
        .rooms
        .into_iter()
        .map(|r| std::sync::Arc::new(varco::room::Room::standalone(r)))
        .collect();
    let router = varco::router::Router::new(&rooms);
    for host in [
        "portale.example.it",
        "portale.example.it.",
        "www.example.org",
    ] {
        assert!(router.route(Some(host), "/").is_some(), "{host}");
    }
    assert!(router.route(Some("example.it"), "/").is_none());
}

/// A short admin token is named by the key its tokens came from.
#[test]
fn a_short_admin_token_names_where_it_came_from() {
    std::env::set_var("VARCO_TEST_SHORT_ADMIN", "ops:short");
    let e = errors(&format!(
        "[admin]\ntokens_env = \"VARCO_TEST_SHORT_ADMIN\"\n{ROOM}"
    ));
    assert!(e.names("admin.tokens_env"), "{e}");
    // With a file of good tokens beside it, still the variable.
    let dir = std::env::temp_dir().join(format!("varco-admin-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("tokens.toml"),
        "[[tokens]]\nid = \"ci\"\ntoken = \"a-long-enough-token-0123456789\"\n",
    )
    .unwrap();
    let toml = format!(
        "[admin]\ntokens_file = \"tokens.toml\"\ntokens_env = \"VARCO_TEST_SHORT_ADMIN\"\n{ROOM}"
    );
    let Err(e) = Config::from_toml(&toml, &dir) else {
        panic!("a short token accepted");
    };
    assert!(
        e.names("admin.tokens_env") && !e.names("admin.tokens_file"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A token source that holds no token is refused: the admin API, and
/// `/api/reload` with it, would be off without a word.
#[test]
fn an_admin_token_source_without_a_token_is_refused() {
    std::env::set_var("VARCO_TEST_EMPTY_ADMIN", " , ");
    let e = errors(&format!(
        "[admin]\ntokens_env = \"VARCO_TEST_EMPTY_ADMIN\"\n{ROOM}"
    ));
    assert!(
        e.names("admin.tokens_env") && e.to_string().contains("holds no token"),
        "{e}"
    );
    let dir = std::env::temp_dir().join(format!("varco-no-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("tokens.toml"), "tokens = []\n").unwrap();
    let toml = format!("[admin]\ntokens_file = \"tokens.toml\"\n{ROOM}");
    let Err(e) = Config::from_toml(&toml, &dir) else {
        panic!("a file without a token accepted");
    };
    assert!(
        e.names("admin.tokens_file") && e.to_string().contains("holds no token"),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A token or secret anyone could guess is refused, however long:
/// one character or a few, or one piece over and over; and one with a
/// character a header does not carry as written, which could never match.
/// Generated ones pass.
#[test]
fn guessable_tokens_and_secrets_are_refused() {
    for (token, says) in [
        ("0000000000000000000000", "only 1 different"),
        ("abababababababababab", "only 2 different"),
        ("changemechangemechangeme", "\"changeme\" over and over"),
        ("passwordpassword", "\"password\" over and over"),
        ("a-long-token with-a-space", "a space"),
        ("pässwörd-sëcret-01234", "past ASCII"),
        ("x7Qk", "shorter than 16"),
    ] {
        std::env::set_var("VARCO_TEST_GUESSABLE_ADMIN", format!("ops:{token}"));
        let e = errors(&format!(
            "[admin]\ntokens_env = \"VARCO_TEST_GUESSABLE_ADMIN\"\n{ROOM}"
        ));
        assert!(
            e.names("admin.tokens_env") && e.to_string().contains(says),
            "{token}: {e}"
        );
        assert!(!e.to_string().contains(token), "the token said: {e}");
        std::env::set_var("VARCO_TEST_GUESSABLE_BYPASS", token);
        let e = errors(&format!(
            "{ROOM}bypass = {{ header = \"X-B\", secret_env = \"VARCO_TEST_GUESSABLE_BYPASS\" }}\n"
        ));
        assert!(
            e.names("rooms.portal.bypass") && e.to_string().contains(says),
            "{token}: {e}"
        );
    }
    // Every entry's problem at once, though all are under one key.
    std::env::set_var(
        "VARCO_TEST_GUESSABLE_ADMIN",
        "anna:x7Qk,marco:0000000000000000,ci:x7Qk",
    );
    let e = errors(&format!(
        "[admin]\ntokens_env = \"VARCO_TEST_GUESSABLE_ADMIN\"\n{ROOM}"
    ));
    for who in [
        "\"anna\" is shorter",
        "\"marco\" has only 1",
        "\"ci\" is shorter",
        "share one token",
    ] {
        assert!(e.to_string().contains(who), "{who}: {e}");
    }
    std::env::set_var("VARCO_TEST_SHORT_KEYS", "k1:c2hvcnQ=,k2:dG9vIHNob3J0");
    let e = errors("[secrets]\nkey_env = \"VARCO_TEST_SHORT_KEYS\"\n[rooms.portal]\nupstreams = [\"http://x\"]\nmax_active = 10\n");
    for key in ["\"k1\" is shorter", "\"k2\" is shorter"] {
        assert!(e.to_string().contains(key), "{key}: {e}");
    }
    for token in [
        "MDEyMzQ1Njc4OWFiY2RlZjAx",
        "3f9a0c71e2b48d56",
        "an-example-token-for-tests",
    ] {
        std::env::set_var("VARCO_TEST_GUESSABLE_ADMIN", format!("ops:{token}"));
        let toml = format!("[admin]\ntokens_env = \"VARCO_TEST_GUESSABLE_ADMIN\"\n{ROOM}");
        assert!(
            Config::from_toml(&toml, Path::new(".")).is_ok(),
            "{token} refused"
        );
    }
}

/// A tokens or keys file toml cannot read is named with the line, not
/// quoted: the line holds a secret, and the error goes to the journal and
/// a refused reload's answer.
#[test]
fn a_secrets_file_that_does_not_parse_is_not_quoted() {
    let dir = std::env::temp_dir().join(format!("varco-secret-quote-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    const SECRET: &str = "Zq8vN1-a-real-token-3xK";
    std::fs::write(
        dir.join("tokens.toml"),
        format!("[[tokens]]\nid = \"ops\"\ntokne = \"{SECRET}\"\n"),
    )
    .unwrap();
    std::fs::write(
        dir.join("keys.toml"),
        format!("[[keys]]\nid = \"k1\"\nsecret = {SECRET}\n"),
    )
    .unwrap();
    // A value of the wrong type, which serde quotes.
    std::fs::write(
        dir.join("typed.toml"),
        format!("\n\ntokens = \"{SECRET}\"\n"),
    )
    .unwrap();
    for (toml, key) in [
        (
            "[admin]\ntokens_file = \"tokens.toml\"\n",
            "admin.tokens_file",
        ),
        ("[secrets]\nkey_file = \"keys.toml\"\n", "secrets.key_file"),
        (
            "[admin]\ntokens_file = \"typed.toml\"\n",
            "admin.tokens_file",
        ),
    ] {
        let Err(e) = Config::from_toml(&format!("{toml}{ROOM}"), &dir) else {
            panic!("accepted: {toml}");
        };
        assert!(e.names(key), "{e}");
        assert!(e.to_string().contains("line 3"), "{e}");
        assert!(!e.to_string().contains(SECRET), "the secret said: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A room that ignores case and another whose path is the same in
/// another case would both match one request: refused.
#[test]
fn paths_alike_but_for_case_are_refused_where_case_is_ignored() {
    let rooms = |ignore: bool| {
        format!(
            "[rooms.a]\nupstreams = [\"http://x\"]\npaths = [\"/Bonus\"]\n\
             [rooms.b]\nupstreams = [\"http://x\"]\npaths = [\"/bonus\"]\npaths_ignore_case = {ignore}\n"
        )
    };
    let e = errors(&rooms(true));
    assert!(
        e.0.iter()
            .any(|p| p.key == "rooms.b.paths" && p.reason.contains("in another case")),
        "{e}"
    );
    // Both minding case: two paths, two rooms.
    assert!(Config::from_toml(&rooms(false), Path::new(".")).is_ok());
}

/// A zero or a size that refuses every form says what it would do.
/// A mistyped variable in an operator's template would show its braces
/// to every person in line: refused, naming the key, the name and what
/// it most likely meant. Braces around anything but a plain name (an
/// inline script's own) are text.
#[test]
fn a_templates_unknown_variable_is_refused_with_what_it_meant() {
    let dir = std::env::temp_dir().join(format!("varco-templates-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("page.html"),
        "<p>{{postion}} {{ ahead }} <script>x = `{{ a + b }}`</script>",
    )
    .unwrap();
    std::fs::write(dir.join("error.html"), "<h1>{{stauts}} {{frobnicate}}</h1>").unwrap();
    std::fs::write(dir.join("good.html"), "<p>{{position}} {{ a + b }}</p>").unwrap();
    let toml = format!("{ROOM}page_template = \"page.html\"\nerror_template = \"error.html\"\n");
    let e = match Config::from_toml(&toml, &dir) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("rooms.portal.page_template: {{postion}} is no variable of this page (did you mean {{position}}?)"),
        "{e}"
    );
    assert!(
        e.contains("rooms.portal.error_template: {{stauts}} is no variable of this page (did you mean {{status}}?)"),
        "{e}"
    );
    assert!(
        e.contains("{{frobnicate}} is no variable of this page:"),
        "{e}"
    );
    assert!(!e.contains("ahead") && !e.contains("a + b"), "{e}");
    let toml = format!("{ROOM}page_template = \"good.html\"\n");
    Config::from_toml(&toml, &dir).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_value_that_would_refuse_everything_says_so() {
    for (bad, key, says) in [
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nresponse_timeout = \"0s\"\n".to_string(),
            "rooms.portal.response_timeout",
            "every request would be a 504",
        ),
        (
            format!("[upstream]\nrequest_buffer_time = \"0s\"\n{ROOM}"),
            "upstream.request_buffer_time",
            "turns buffering off",
        ),
        (
            format!("[server]\nmax_body_size = \"0\"\n{ROOM}"),
            "server.max_body_size",
            "\"no limit\" as in nginx",
        ),
        (
            format!("[server]\nmax_body_size = \"100\"\n{ROOM}"),
            "server.max_body_size",
            "under 1KiB",
        ),
    ] {
        let e = errors(&bad);
        assert!(
            e.0.iter().any(|p| p.key == key && p.reason.contains(says)),
            "{key}: {e}"
        );
    }
    let small = format!("[server]\nmax_body_size = \"1KiB\"\n{ROOM}");
    assert!(Config::from_toml(&small, Path::new(".")).is_ok());
}

/// The audit log names who acted by the id of the token presented: a
/// token without an id, an id for two tokens or a token for two ids is
/// refused; a token written with spaces around it in the file is read
/// without them, as a Bearer token arrives.
#[test]
fn admin_tokens_each_name_one_person() {
    let dir = std::env::temp_dir().join(format!("varco-admin-ids-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let with = |tokens: &str| {
        std::fs::write(dir.join("tokens.toml"), tokens).unwrap();
        Config::from_toml(
            &format!("[admin]\ntokens_file = \"tokens.toml\"\n{ROOM}"),
            &dir,
        )
    };
    let entry = |id: &str, token: &str| format!("[[tokens]]\nid = \"{id}\"\ntoken = \"{token}\"\n");
    let (one, two) = (
        "a-long-enough-token-0123456789",
        "another-long-token-9876543210",
    );
    for (bad, says) in [
        (entry("", one), "without an id"),
        (entry("anna", one) + &entry("anna", two), "names two tokens"),
        (entry("anna", one) + &entry("ci", one), "share one token"),
    ] {
        let Err(e) = with(&bad) else {
            panic!("accepted: {bad}");
        };
        assert!(
            e.names("admin.tokens_file") && e.to_string().contains(says),
            "{e}"
        );
    }
    let cfg = with(&entry("anna", &format!("  {one} "))).expect("spaces around a token");
    assert_eq!(cfg.admin_tokens[0].token, one);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A host or path given twice is named where it was written, as written;
/// one another room serves is named with that room.
#[test]
fn hosts_and_paths_given_twice_are_named_as_written() {
    let e = errors(&format!(
        "{ROOM}hosts = [\"portale.example.it\", \"*.example.org\", \"Portale.example.it\"]\n"
    ));
    assert!(e.names("rooms.portal.hosts"), "{e}");
    assert!(
        e.to_string()
            .contains("\"portale.example.it\" is listed twice"),
        "{e}"
    );
    let e = errors(&format!("{ROOM}paths = [\"/bonus\", \"/bonus\"]\n"));
    assert!(e.names("rooms.portal.paths"), "{e}");
    assert!(e.to_string().contains("\"/bonus\" is listed twice"), "{e}");
    let e = errors(&format!(
        "{ROOM}hosts = [\"*.example.org\"]\n\
         [rooms.other]\nupstreams = [\"http://127.0.0.1:9002\"]\nhosts = [\"*.example.org\"]\n"
    ));
    let text = e.to_string();
    assert!(
        text.contains("host \"*.example.org\" and path \"/\" are already served by room"),
        "{text}"
    );
    assert!(!text.contains("Suffix("), "{text}");
    // One path to the portal, however it is spelled: one room's.
    let e = errors(&format!(
        "{ROOM}paths = [\"/caf%C3%A8\"]\n\
         [rooms.other]\nupstreams = [\"http://127.0.0.1:9002\"]\npaths = [\"/caf\u{e8}\"]\n"
    ));
    assert!(
        e.to_string()
            .contains("path \"/caf%C3%A8\" are already served by room \"other\""),
        "{e}"
    );
}

/// A value that does not parse is reported once, for what it is: not
/// judged again on the stand-in the check goes on with.
#[test]
fn a_value_that_does_not_parse_is_one_problem() {
    let e = errors(&format!(
        "[secrets]\nephemeral = true\n{ROOM}claim_window = \"60\"\n"
    ));
    let about: Vec<&str> =
        e.0.iter()
            .filter(|p| p.key == "rooms.portal.claim_window")
            .map(|p| p.reason.as_str())
            .collect();
    assert_eq!(about.len(), 1, "{about:?}");
    assert!(!about[0].contains("at least"), "{about:?}");
}

#[test]
fn an_opening_keeps_the_zone_it_was_written_in() {
    let at = |t: &str| {
        let c = Config::from_toml(
            &format!("[secrets]\nephemeral = true\n{ROOM}opens_at = \"{t}\"\n"),
            Path::new("."),
        )
        .unwrap();
        (c.rooms[0].opens_at_ms, c.rooms[0].opens_at_offset_s)
    };
    let rome = at("2026-12-01T09:00:00+01:00");
    assert_eq!(rome, (Some(1_796_112_000_000), 3600));
    assert_eq!(at("2026-12-01T08:00:00Z"), (Some(1_796_112_000_000), 0));
}

#[test]
fn the_demo_default_is_valid() {
    Config::from_toml(varco::config::DEMO_CONFIG, Path::new(".")).unwrap();
    Config::load(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/varco.toml"
    )))
    .unwrap();
}

#[test]
fn the_demo_sends_to_the_portal_where_it_listens() {
    let at = |addr: &str| {
        let c = Config::from_toml(
            &varco::config::demo_config(addr.parse().unwrap()),
            Path::new("."),
        )
        .unwrap();
        let portal = c.rooms.iter().find(|r| r.name == "portal").unwrap();
        portal
            .upstreams
            .iter()
            .map(|u| u.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(at("127.0.0.1:9001"), ["http://127.0.0.1:9001/"]);
    assert_eq!(at("127.0.0.1:9002"), ["http://127.0.0.1:9002/"]);
}

/// A rotation across a cluster: the new key first goes on every node
/// `verify_only` (each verifies what any node signs with it), then signs.
#[test]
fn a_verify_only_key_verifies_and_never_signs() {
    let dir = std::env::temp_dir().join(format!("varco-verify-only-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let load = |keys: &str| {
        std::fs::write(dir.join("keys.toml"), keys).unwrap();
        Config::from_toml(
            &format!("[secrets]\nkey_file = \"keys.toml\"\n{ROOM}"),
            &dir,
        )
    };
    const K1: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";
    const K2: &str = "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=";
    let c = load(&format!(
        "[[keys]]\nid = \"k1\"\nsecret = \"{K1}\"\n\
         [[keys]]\nid = \"k2\"\nsecret = \"{K2}\"\nverify_only = true\n"
    ))
    .unwrap();
    assert_eq!(
        c.keys.signing_key().id,
        "k1",
        "the newest key that may sign"
    );
    assert!(c.keys.key("k2").is_some(), "k2 verifies");
    let e = load(&format!(
        "[[keys]]\nid = \"k1\"\nsecret = \"{K1}\"\nverify_only = true\n"
    ))
    .unwrap_err();
    assert!(e.names("secrets.key_file"), "{e}");
    assert!(e.to_string().contains("one key must sign"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_example_is_valid() {
    // The examples read their secrets from the environment.
    std::env::set_var(
        "VARCO_KEYS",
        "example:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    );
    std::env::set_var("VARCO_ADMIN_TOKENS", "ops:an-example-token-for-tests");
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 1);
}

/// A timeout of a few milliseconds is most likely a unit mistyped: told.
#[test]
fn a_timeout_of_milliseconds_is_told() {
    let toml = "[upstream]\nconnect_timeout = \"5ms\"\n[rooms.portal]\nupstreams = [\"http://127.0.0.1:9001\"]\n\
         in_flight = { limit = 8, wait = \"3ms\" }\n\
         health_check = { path = \"/healthz\", timeout = \"5ms\" }\n";
    let cautions = Config::from_toml(toml, Path::new(".")).unwrap().cautions();
    for key in [
        "upstream.connect_timeout: 5 ms",
        "rooms.portal.in_flight.wait: 3 ms",
        "rooms.portal.health_check.timeout: 5 ms",
    ] {
        assert!(
            cautions
                .iter()
                .any(|c| c.starts_with(key) && c.contains("did you mean")),
            "{key}: {cautions:?}"
        );
    }
    let plain = Config::from_toml(ROOM, Path::new(".")).unwrap().cautions();
    assert!(plain.is_empty(), "{plain:?}");
}

/// A claim window or an idle time of hours is most likely a unit
/// mistyped ("60m" for "60s"): told, not refused.
#[test]
fn windows_of_hours_are_told() {
    let toml = "[rooms.portal]\nupstreams = [\"http://127.0.0.1:9001\"]\n\
         claim_window = \"60m\"\nsession_idle = \"13h\"\nticket_ttl = \"48h\"\n";
    let cautions = Config::from_toml(toml, Path::new(".")).unwrap().cautions();
    // One line each, words apart by one space.
    assert!(cautions_in_one_line(&cautions), "{cautions:?}");
    for key in [
        "rooms.portal.claim_window: 60 min",
        "rooms.portal.session_idle: 13 h",
    ] {
        assert!(
            cautions
                .iter()
                .any(|c| c.starts_with(key) && c.contains("did you mean")),
            "{key}: {cautions:?}"
        );
    }
    // A few minutes, as the README advises for phones: nothing said.
    let phones = "[rooms.portal]\nupstreams = [\"http://127.0.0.1:9001\"]\n\
         claim_window = \"5m\"\nsession_idle = \"30m\"\n";
    let plain = Config::from_toml(phones, Path::new("."))
        .unwrap()
        .cautions();
    assert!(plain.is_empty(), "{plain:?}");
}

/// A waiting-page template that keeps the script but not what it reads
/// for a refused poll (`data-poll-cap`) or for screen readers (`#said`)
/// is told; the default page, copied, is not.
#[test]
fn a_template_missing_what_its_script_reads_is_told() {
    let dir = std::env::temp_dir().join(format!("varco-template-told-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let toml =
        "[rooms.portal]\nupstreams = [\"http://127.0.0.1:9001\"]\npage_template = \"page.html\"\n";
    let told = |page: &str| {
        std::fs::write(dir.join("page.html"), page).unwrap();
        Config::from_toml(toml, &dir).unwrap().cautions()
    };
    let bare = told(
        "<html lang=\"{{lang}}\"><main id=\"varco\" data-poll=\"{{poll_seconds}}\">{{position}}</main></html>",
    );
    assert!(cautions_in_one_line(&bare), "{bare:?}");
    for what in ["data-poll-cap", "id=\"said\""] {
        assert!(
            bare.iter()
                .any(|c| c.starts_with("rooms.portal.page_template:") && c.contains(what)),
            "{what}: {bare:?}"
        );
    }
    let copy = told(varco::page::waiting::DEFAULT_TEMPLATE);
    assert!(copy.is_empty(), "{copy:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Each caution one line, words one space apart.
fn cautions_in_one_line(cautions: &[String]) -> bool {
    cautions
        .iter()
        .all(|c| !c.contains("  ") && !c.contains('\n'))
}

/// The id of the key varco makes up is its own: a listed key of that
/// name would be kept by a reload after its removal from the file.
#[test]
fn the_made_up_keys_id_is_refused() {
    std::env::set_var(
        "VARCO_TEST_EPHEMERAL_ID",
        "ephemeral:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
    );
    let e = errors(&format!(
        "[secrets]\nkey_env = \"VARCO_TEST_EPHEMERAL_ID\"\n{ROOM}"
    ));
    assert!(
        e.names("secrets.key_env") && e.to_string().contains("varco makes up"),
        "{e}"
    );
}

/// Listeners on one port but on addresses that do not meet are fine.
#[test]
fn listeners_on_one_port_and_addresses_apart_are_taken() {
    for (listen, admin) in [
        ("127.0.0.1:8080", "127.0.0.2:8080"),
        ("0.0.0.0:8080", "[::1]:8080"),
        ("0.0.0.0:8080", "0.0.0.0:9090"),
    ] {
        let toml = format!("[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\n{ROOM}");
        if let Err(e) = Config::from_toml(&toml, Path::new(".")) {
            panic!("{listen} and {admin}: {e}");
        }
    }
}

#[test]
fn each_bad_value_names_its_key() {
    let cases: &[(&str, &str)] = &[
        ("[server]\nlisten = \"8080\"\n", "server.listen"),
        (
            "[server]\nadmin_listen = \"127.0.0.1:8080\"\n",
            "server.admin_listen",
        ),
        // On every address: the admin listener's would not bind.
        (
            "[server]\nlisten = \"0.0.0.0:8080\"\nadmin_listen = \"127.0.0.1:8080\"\n",
            "server.admin_listen",
        ),
        (
            "[server]\nlisten = \"[::]:8080\"\nadmin_listen = \"127.0.0.1:8080\"\n",
            "server.admin_listen",
        ),
        ("[audit]\nlog = \"\"\n", "audit.log"),
        ("[audit]\nlog = \"/tmp\"\n", "audit.log"),
        ("[server]\nmax_connections = 0\n", "server.max_connections"),
        ("[server]\nmax_headers = 0\n", "server.max_headers"),
        // Above tokio's semaphore limit: the listeners panicked at start.
        (
            "[server]\nmax_connections = 2305843009213693952\n",
            "server.max_connections",
        ),
        // Past what the OS grants: tokio panicked at start, naming nothing.
        ("[server]\nworkers = 5000\n", "server.workers"),
        // Anyone could name any client.
        ("[server]\nproxy_protocol = true\n", "server.proxy_protocol"),
        (
            "[server]\nclient_address_header = \"x-real-ip\"\n",
            "server.client_address_header",
        ),
        // hyper reserves a slot per header on every request.
        ("[server]\nmax_headers = 1000000\n", "server.max_headers"),
        (
            "[server]\nmax_header_size = \"1KiB\"\n",
            "server.max_header_size",
        ),
        (
            "[server]\nmax_body_size = \"lots\"\n",
            "server.max_body_size",
        ),
        (
            "[server]\nheader_read_timeout = \"soon\"\n",
            "server.header_read_timeout",
        ),
        (
            "[server]\nkeepalive_timeout = \"0s\"\n",
            "server.keepalive_timeout",
        ),
        (
            "[server]\nshutdown_grace = \"25\"\n",
            "server.shutdown_grace",
        ),
        (
            "[server]\ntrusted_proxies = [\"10.0.0.0/99\"]\n",
            "server.trusted_proxies[0]",
        ),
        // Anyone could name any client.
        (
            "[server]\ntrusted_proxies = [\"0.0.0.0/0\"]\n",
            "server.trusted_proxies[0]",
        ),
        (
            "[server]\ntls = { cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\" }\n",
            "server.tls.cert",
        ),
        (
            "[upstream]\nconnect_timeout = \"-1s\"\n",
            "upstream.connect_timeout",
        ),
        (
            "[upstream]\ntls_ca = \"/nonexistent/ca.pem\"\n",
            "upstream.tls_ca",
        ),
        (
            "[upstream]\ntls_client = { cert = \"/nonexistent/c.pem\", key = \"/nonexistent/k.pem\" }\n",
            "upstream.tls_client.cert",
        ),
        ("[upstream]\npool_max_idle = 0\n", "upstream.pool_max_idle"),
        ("[upstream]\nmax_fails = 101\n", "upstream.max_fails"),
        (
            "[upstream]\nrequest_buffer = \"1MB2\"\n",
            "upstream.request_buffer",
        ),
        (
            "[upstream]\nrequest_buffer_memory = \"lots\"\n",
            "upstream.request_buffer_memory",
        ),
        (
            "[upstream]\nrequest_buffer = \"2MiB\"\nrequest_buffer_memory = \"1MiB\"\n",
            "upstream.request_buffer",
        ),
        (
            "[upstream]\nrequest_buffer = \"2GiB\"\nrequest_buffer_memory = \"8GiB\"\n",
            "upstream.request_buffer",
        ),
        (
            "[upstream]\nrequest_buffer_time = \"0s\"\n",
            "upstream.request_buffer_time",
        ),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        ("[store]\nkind = \"etcd\"\n", "store.kind"),
        ("[store]\nkind = \"redis\"\n", "store.url"),
        (
            "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nlease = \"1s\"\n",
            "store.lease",
        ),
        // Nobody is admitted for as long after the node holding it dies.
        (
            "[store]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:1\"\nlease = \"2m\"\n",
            "store.lease",
        ),
        (
            "[store]\nkind = \"redis\"\nurl = \"http://x\"\n",
            "store.url",
        ),
        (
            "[store]\nkind = \"redis\"\nurl = \"rediss://x\"\ntls_ca = \"/nonexistent/ca.pem\"\n",
            "store.tls_ca",
        ),
        (
            "[store]\nkind = \"redis\"\nurl = \"redis://x\"\nsnapshot = \"s.json\"\n",
            "store.snapshot",
        ),
        ("[store]\nlease = \"3\"\n", "store.lease"),
        // Counted in whole milliseconds: 0 ms ticks pushed every claim
        // window on at every tick.
        ("[store]\ntick = \"500us\"\n", "store.tick"),
        ("[store]\ntick = \"6s\"\n", "store.tick"),
        // Each snapshot fsyncs the whole queue: one after another, the
        // disk does nothing else.
        ("[store]\nsnapshot_interval = \"1ms\"\n", "store.snapshot_interval"),
        // Read as the store reads them at start: no check that passes
        // before a start that fails.
        (
            "[store]\nkind = \"redis\"\nurl = \"rediss://x\"\ntls_ca = \"Cargo.toml\"\n",
            "store.tls_ca",
        ),
        (
            "[store]\nkind = \"redis\"\nurl = \"redis://x:notaport/0\"\n",
            "store.url",
        ),
        // Redis settings without kind = "redis": a cluster of separate
        // queues, each node admitting its own max_active.
        ("[store]\nurl = \"redis://10.0.0.9:6379/0\"\n", "store.url"),
        ("[store]\ntls_ca = \"Cargo.toml\"\n", "store.tls_ca"),
        ("[store]\nprefix = \"bonus:\"\n", "store.prefix"),
        ("[store]\nlease = \"30s\"\n", "store.lease"),
        ("[log]\nlevel = \"=[\"\n", "log.level"),
    ];
    for (bad, key) in cases {
        let e = errors(&format!("{bad}{ROOM}"));
        assert!(e.names(key), "{key} not named for {bad:?}: {e}");
    }
}

#[test]
fn upstreams_with_a_port_or_an_ipv6_address_are_taken() {
    for up in [
        "http://x:8000",
        "https://x.example",
        "http://[::1]:8080",
        "http://[::1]",
        "http://127.0.0.1:65535",
    ] {
        let toml = format!("[rooms.portal]\nupstreams = [\"{up}\"]\n");
        if let Err(e) = Config::from_toml(&toml, Path::new(".")) {
            panic!("{up}: {e}");
        }
    }
}

/// An upstream of another scheme is told what varco speaks, not asked for
/// a scheme it has ("http://ftp://x" was the advice).
#[test]
fn an_upstream_of_another_scheme_is_told_which_varco_speaks() {
    let e = Config::from_toml(
        "[rooms.portal]\nupstreams = [\"ftp://x.example\"]\n",
        Path::new("."),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("varco speaks http:// and https:// to upstreams, not ftp://"),
        "{e}"
    );
    assert!(!e.contains("needs a scheme"), "{e}");
    let e = Config::from_toml(
        "[rooms.portal]\nupstreams = [\"127.0.0.1:9001\"]\n",
        Path::new("."),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("needs a scheme: write e.g. \"http://127.0.0.1:9001\""),
        "{e}"
    );
}

#[test]
fn bad_rooms_name_their_keys() {
    let cases: &[(&str, &str)] = &[
        ("[rooms.portal]\nupstreams = []\n", "rooms.portal.upstreams"),
        (
            "[rooms.portal]\nupstreams = [\"127.0.0.1:9001\"]\n",
            "rooms.portal.upstreams[0]",
        ),
        (
            "[rooms.portal]\nupstreams = [\"ftp://x.example\"]\n",
            "rooms.portal.upstreams[0]",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x.example\", \"https://x.example:80\"]\n",
            "rooms.portal.upstreams[1]",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x/app\"]\n",
            "rooms.portal.upstreams[0]",
        ),
        // Under none of the room's paths: dead config, said.
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\npaths = [\"/bonus\"]\nflow_paths = [\"/oidc/callback\"]\n",
            "rooms.portal.flow_paths[0]",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\npaths = [\"/bonus\"]\nexempt_paths = [\"/static/\"]\n",
            "rooms.portal.exempt_paths[0]",
        ),
        // A port the URL parser cannot read would be the scheme's default,
        // silently; credentials would never be sent.
        (
            "[rooms.portal]\nupstreams = [\"http://10.0.0.5:80000\"]\n",
            "rooms.portal.upstreams[0]",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x:8o80\"]\n",
            "rooms.portal.upstreams[0]",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x:\"]\n",
            "rooms.portal.upstreams[0]",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x:0\"]\n",
            "rooms.portal.upstreams[0]",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://user:pw@x:8000\"]\n",
            "rooms.portal.upstreams[0]",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\", { url = \"http://y\", weight = 0 }]\n",
            "rooms.portal.upstreams[1].weight",
        ),
        (
            "[rooms.portal]\nupstreams = [{ url = \"http://y\", weight = 101 }]\n",
            "rooms.portal.upstreams[0].weight",
        ),
        (
            "[rooms.portal]\nupstreams = [{ url = \"http://y/app\", weight = 2 }]\n",
            "rooms.portal.upstreams[0]",
        ),
        // Both problems of one entry at once.
        (
            "[rooms.portal]\nupstreams = [{ url = \"http://y/app\", weight = 0 }]\n",
            "rooms.portal.upstreams[0].weight",
        ),
        (
            "[rooms.portal]\nupstreams = [{ url = \"http://y\", wieght = 2 }]\n",
            "rooms.portal.upstreams[0].wieght",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nhosts = [\"bad host\"]\n",
            "rooms.portal.hosts[0]",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\npaths = [\"app\"]\n",
            "rooms.portal.paths[0]",
        ),
        (
            "[rooms.\"bad name\"]\nupstreams = [\"http://x\"]\n",
            "rooms.bad name",
        ),
        // The label of requests no room serves, in every per-room metric.
        ("[rooms.\"-\"]\nupstreams = [\"http://x\"]\n", "rooms.-"),
        (
            "[rooms.a]\nupstreams = [\"http://x\"]\n[rooms.b]\nupstreams = [\"http://y\"]\n",
            "rooms.b.paths",
        ),
        ("[server]\n", "rooms"),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nhealth_check = { path = \"healthz\" }\n",
            "rooms.portal.health_check.path",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nper_session = { requests_per_second = 0 }\n",
            "rooms.portal.per_session.requests_per_second",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nper_session = { requests_per_second = 10, burst = 5 }\n",
            "rooms.portal.per_session.burst",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nhealth_check = { path = \"/healthz\", fall = 0 }\n",
            "rooms.portal.health_check.fall",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nhealth_check = { path = \"/healthz\", interval = \"1s\", timeout = \"2s\" }\n",
            "rooms.portal.health_check.timeout",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nhealth_check = { path = \"/healthz\", interval = \"10ms\", timeout = \"5ms\" }\n",
            "rooms.portal.health_check.interval",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nhealth_check = { path = \"/healthz\", rise = 101 }\n",
            "rooms.portal.health_check.rise",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nresponse_timeout = \"0s\"\n",
            "rooms.portal.response_timeout",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nresponse_timeout = \"fast\"\n",
            "rooms.portal.response_timeout",
        ),
        (
            "[rooms.portal]\nupstreams = [\"https://10.0.0.1\"]\ntls_server_name = \"not a name\"\n",
            "rooms.portal.tls_server_name",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://10.0.0.1\"]\ntls_server_name = \"portal.internal\"\n",
            "rooms.portal.tls_server_name",
        ),
        (
            "[rooms.portal]\nupstreams = [\"https://10.0.0.1\"]\ntls_server_name = \"portal.internal\"\n[rooms.shop]\nupstreams = [\"https://10.0.0.1:443\"]\npaths = [\"/shop\"]\n",
            "rooms.shop.tls_server_name",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nhealth_check = { path = \"/healthz\", expect_status = [] }\n",
            "rooms.portal.health_check.expect_status",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nhealth_check = { path = \"/healthz\", expect_status = [200, 42] }\n",
            "rooms.portal.health_check.expect_status",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nhealth_check = { path = \"/healthz\", slow_start = \"2h\" }\n",
            "rooms.portal.health_check.slow_start",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nhealth_check = { path = \"/healthz\", slow_start = \"soon\" }\n",
            "rooms.portal.health_check.slow_start",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\"]\nhealth_check = { path = \"/healthz\", host = \"a b\" }\n",
            "rooms.portal.health_check.host",
        ),
    ];
    for (bad, key) in cases {
        let e = errors(bad);
        assert!(e.names(key), "{key} not named for {bad:?}: {e}");
    }
}

#[test]
fn bad_waiting_room_keys_name_their_keys() {
    let gated = "[secrets]\nephemeral = true\n[rooms.portal]\nupstreams = [\"http://x\"]\n";
    let cases: &[(&str, &str)] = &[
        (
            "admission_per_minute = -5\n",
            "rooms.portal.admission_per_minute",
        ),
        // Its burst overflowed to infinity, which the snapshot cannot
        // hold: the next start lost the line.
        (
            "admission_per_minute = 1e306\n",
            "rooms.portal.admission_per_minute",
        ),
        (
            "adaptive = { min_per_minute = 60, max_per_minute = 1e306, target_latency = \"100ms\" }\n",
            "rooms.portal.adaptive.max_per_minute",
        ),
        ("max_active = 0\n", "rooms.portal.max_active"),
        ("max_active = 1000000001\n", "rooms.portal.max_active"),
        // NaN bounds once panicked before the error was told.
        (
            "adaptive = { min_per_minute = nan, max_per_minute = 600, target_latency = \"100ms\" }\n",
            "rooms.portal.adaptive.min_per_minute",
        ),
        (
            "adaptive = { min_per_minute = 60, max_per_minute = nan, target_latency = \"100ms\" }\n",
            "rooms.portal.adaptive.max_per_minute",
        ),
        ("mode = \"open\"\n", "rooms.portal.mode"),
        ("opens_at = \"tomorrow 9am\"\n", "rooms.portal.opens_at"),
        // 1926 for 2026: as unix ms it wrapped to an opening that never came.
        (
            "opens_at = \"1926-12-01T09:00:00Z\"\n",
            "rooms.portal.opens_at",
        ),
        (
            "in_flight = { limit = 2305843009213693952 }\n",
            "rooms.portal.in_flight.limit",
        ),
        (
            "in_flight = { limit = 8, queue = 2305843009213693952 }\n",
            "rooms.portal.in_flight.queue",
        ),
        (
            "in_flight = { limit = 8, per_session = 0 }\n",
            "rooms.portal.in_flight.per_session",
        ),
        (
            "in_flight = { limit = 8, per_session = 9 }\n",
            "rooms.portal.in_flight.per_session",
        ),
        ("session_idle = \"5\"\n", "rooms.portal.session_idle"),
        // Two weights this large added up to infinity.
        (
            "[rooms.portal.lanes.a]\nweight = 1e300\n\
             [rooms.portal.lanes.b]\nweight = 1e300\ncidrs = [\"10.0.0.0/8\"]\n",
            "rooms.portal.lanes.a.weight",
        ),
        ("session_idle = \"5ms\"\n", "rooms.portal.session_idle"),
        ("claim_window = \"never\"\n", "rooms.portal.claim_window"),
        ("claim_window = \"10s\"\n", "rooms.portal.claim_window"),
        (
            "claim_window = \"2m\"\nticket_ttl = \"90s\"\n",
            "rooms.portal.ticket_ttl",
        ),
        ("language = \"fr\"\n", "rooms.portal.language"),
        (
            "cookie_same_site = \"strict\"\n",
            "rooms.portal.cookie_same_site",
        ),
        (
            "exempt_paths = [\"static\"]\n",
            "rooms.portal.exempt_paths[0]",
        ),
        (
            "exempt_paths = [\"/static/\", \"/api?public=1\"]\n",
            "rooms.portal.exempt_paths[1]",
        ),
        ("exempt_paths = [\"/\"]\n", "rooms.portal.exempt_paths[0]"),
        (
            "exempt_paths = [\"/static/\", \"/a//b\"]\n",
            "rooms.portal.exempt_paths[1]",
        ),
        (
            "exempt_paths = [\"/static%2fx\"]\n",
            "rooms.portal.exempt_paths[0]",
        ),
        // A detour covering the room lets every ticket holder past the
        // queue.
        ("flow_paths = [\"/\"]\n", "rooms.portal.flow_paths[0]"),
        (
            "paths = [\"/bonus\"]\nflow_paths = [\"/bonus/oidc\", \"/bonus\"]\n",
            "rooms.portal.flow_paths[1]",
        ),
        (
            "flow_paths = [\"/oidc/callback\", \"/saml/acs?binding=post\"]\n",
            "rooms.portal.flow_paths[1]",
        ),
        ("flow_paths = [\"/oidc//cb\"]\n", "rooms.portal.flow_paths[0]"),
        // With its slash, the room's path still covers all of it.
        (
            "paths = [\"/app\"]\nflow_paths = [\"/app/\"]\n",
            "rooms.portal.flow_paths[0]",
        ),
        // The room's path spelled another way covers it too.
        (
            "paths = [\"/caf\u{e8}\"]\nflow_paths = [\"/caf%C3%A8\"]\n",
            "rooms.portal.flow_paths[0]",
        ),
        // Every path of the room exempt: an ungated room.
        (
            "paths = [\"/app\"]\nexempt_paths = [\"/app\"]\n",
            "rooms.portal.exempt_paths",
        ),
        (
            "paths = [\"/app\", \"/assets\"]\nexempt_paths = [\"/assets/\", \"/app/\"]\n",
            "rooms.portal.exempt_paths",
        ),
        // Room paths requests can never be matched on once made canonical.
        (
            "paths = [\"/servizi%2Fbonus\"]\n",
            "rooms.portal.paths[0]",
        ),
        ("paths = [\"/a//b\"]\n", "rooms.portal.paths[0]"),
        ("paths = [\"/a/./b\"]\n", "rooms.portal.paths[0]"),
        ("paths = [\"/%7Euser\"]\n", "rooms.portal.paths[0]"),
        ("paths = [\"/app;v=1\"]\n", "rooms.portal.paths[0]"),
        ("flow_paths = [\"oidc\"]\n", "rooms.portal.flow_paths[0]"),
        (
            "page_template = \"/nonexistent/page.html\"\n",
            "rooms.portal.page_template",
        ),
        (
            "error_template = \"/nonexistent/error.html\"\n",
            "rooms.portal.error_template",
        ),
        (
            "bypass = { header = \"X-B\" }\n",
            "rooms.portal.bypass.header",
        ),
        (
            "bypass = { cidrs = [\"nope\"] }\n",
            "rooms.portal.bypass.cidrs[0]",
        ),
        // Everyone let through: the gate taken off by a slip.
        (
            "bypass = { cidrs = [\"10.0.0.0/8\", \"0.0.0.0/0\"] }\n",
            "rooms.portal.bypass.cidrs[1]",
        ),
        (
            "bypass = { cidrs = [\"::/0\"] }\n",
            "rooms.portal.bypass.cidrs[0]",
        ),
        (
            "bypass = { header = \"X-B\", secret_env = \"VARCO_TEST_UNSET_VARIABLE\" }\n",
            "rooms.portal.bypass.secret_env",
        ),
        (
            "per_ip = { tickets_per_minute = 0, status_per_minute = 1 }\n",
            "rooms.portal.per_ip.tickets_per_minute",
        ),
    ];
    for (bad, key) in cases {
        let e = errors(&format!("{gated}{bad}"));
        assert!(e.names(key), "{key} not named for {bad:?}: {e}");
    }
}

#[test]
fn a_gated_room_needs_a_signing_key() {
    let e = errors("[rooms.portal]\nupstreams = [\"http://x\"]\nmax_active = 10\n");
    assert!(e.names("secrets"), "{e}");
    // Without limits, a room that queues everyone or pauses still hands
    // out tickets: a key generated per process would lose every place at
    // a restart.
    for mode in ["queue_all", "paused", "closed"] {
        let e = errors(&format!(
            "[rooms.portal]\nupstreams = [\"http://x\"]\nmode = \"{mode}\"\n"
        ));
        assert!(e.names("secrets"), "{mode}: {e}");
    }
    for mode in ["queue", "passthrough"] {
        let toml = format!("[rooms.portal]\nupstreams = [\"http://x\"]\nmode = \"{mode}\"\n");
        assert!(
            Config::from_toml(&toml, Path::new(".")).is_ok(),
            "{mode}: a plain proxy"
        );
    }
    let e = errors("[secrets]\nkey_env = \"VARCO_TEST_UNSET_VARIABLE\"\n[rooms.portal]\nupstreams = [\"http://x\"]\nmax_active = 10\n");
    assert!(e.names("secrets.key_env"), "{e}");
    std::env::set_var("VARCO_TEST_SHORT_KEY", "k1:c2hvcnQ=");
    let e = errors("[secrets]\nkey_env = \"VARCO_TEST_SHORT_KEY\"\n[rooms.portal]\nupstreams = [\"http://x\"]\nmax_active = 10\n");
    assert!(
        e.0.iter()
            .any(|p| p.key == "secrets.key_env" && p.reason.contains("shorter than 32 bytes")),
        "{e}"
    );
    std::env::set_var("VARCO_TEST_GOOD_KEYS", "old:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=,new:ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=");
    let c = Config::from_toml(
        "[secrets]\nkey_env = \"VARCO_TEST_GOOD_KEYS\"\n[rooms.portal]\nupstreams = [\"http://x\"]\nmax_active = 10\n",
        Path::new("."),
    )
    .unwrap();
    assert_eq!(c.keys.signing_key().id, "new", "the last key signs");
    assert!(c.keys.key("old").is_some(), "older keys still verify");
    // One id twice: the first would verify, the last sign, and every
    // token varco made would be refused.
    std::env::set_var("VARCO_TEST_TWICE_KEYS", "k1:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=,k1:ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=");
    let e = errors("[secrets]\nkey_env = \"VARCO_TEST_TWICE_KEYS\"\n[rooms.portal]\nupstreams = [\"http://x\"]\nmax_active = 10\n");
    assert!(
        e.0.iter()
            .any(|p| p.key == "secrets.key_env" && p.reason.contains("\"k1\" is given twice")),
        "{e}"
    );
    // A key from the file is named under key_file, not just "secrets".
    let dir = std::env::temp_dir().join(format!("varco-short-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("keys.toml"),
        "[[keys]]\nid = \"k1\"\nsecret = \"c2hvcnQ=\"\n",
    )
    .unwrap();
    let Err(e) = Config::from_toml(
        "[secrets]\nkey_file = \"keys.toml\"\n[rooms.portal]\nupstreams = [\"http://x\"]\nmax_active = 10\n",
        &dir,
    ) else {
        panic!("a short key accepted");
    };
    assert!(
        e.0.iter()
            .any(|p| p.key == "secrets.key_file" && p.reason.contains("shorter than 32 bytes")),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_duration_too_long_to_compute_with_is_refused_not_a_panic() {
    let e = errors(&format!(
        "{ROOM}max_active = 10\nfailure_grace = \"18000000000000000000s\"\n"
    ));
    assert!(e.names("rooms.portal.failure_grace"), "{e}");
}

#[test]
fn unknown_keys_are_refused_by_name() {
    let e = errors(&format!("[server]\nlisten_on = \"x\"\n{ROOM}"));
    assert!(e.names("server.listen_on"), "{e}");
    let e = errors("[rooms.portal]\nupstreams = [\"http://x\"]\nupstream = \"typo\"\n");
    assert!(e.names("rooms.portal.upstream"), "{e}");
    let e = errors("[server]\ntls = [{ cert = \"a\", key = \"b\" }, { crt = \"a\" }]\n");
    assert!(e.names("server.tls[1].crt"), "{e}");
}

/// A value of the wrong type is named by its own key, not by the table it
/// stands in: "rooms.portal" leaves the operator reading thirty lines.
#[test]
fn a_value_of_the_wrong_type_is_named_by_its_key() {
    for (toml, key) in [
        (
            format!("{ROOM}max_active = \"1000\"\n"),
            "rooms.portal.max_active",
        ),
        (
            "[server]\nlisten = 8080\n".to_string() + ROOM,
            "server.listen",
        ),
        (
            "[rooms.portal]\nupstreams = [{ url = \"http://y\", weight = \"2\" }]\n".into(),
            "rooms.portal.upstreams[0].weight",
        ),
        (
            "[rooms.portal]\nupstreams = [\"http://x\", 3]\n".into(),
            "rooms.portal.upstreams[1]",
        ),
    ] {
        let e = errors(&toml);
        assert!(e.names(key), "{toml}: {e}");
        assert!(e.to_string().contains("invalid type"), "{e}");
    }
}

/// A file that does not parse names the table the error stands in, and its
/// line, on one line of the report.
#[test]
fn a_broken_file_names_its_table_and_line() {
    let e = errors("[server]\nlisten = \"127.0.0.1:8080\"\n[rooms.portal\nupstreams = []\n");
    assert!(e.names("rooms.portal"), "{e}");
    let shown = e.to_string();
    assert!(shown.contains("(line 3)"), "{shown}");
    assert_eq!(e.0.len(), 1, "{shown}");
    assert!(!e.0[0].reason.contains('\n'), "{shown}");
    let e = errors(&format!("{ROOM}upstreams = [\"http://y\"]\n"));
    assert!(e.names("rooms.portal"), "{e}");
    assert!(e.to_string().contains("duplicate key"), "{e}");
}

#[test]
fn all_problems_are_reported_at_once() {
    let e = errors("[server]\nlisten = \"x\"\nmax_headers = 0\n[rooms.portal]\nupstreams = []\n");
    assert!(e.0.len() >= 3, "{e}");
}

/// A file that exists but holds no certificate (a renewal gone wrong, a
/// key and certificate swapped) fails the check, naming its key, rather
/// than the first handshake or the start.
#[test]
fn certificate_files_are_read_by_the_check() {
    let dir = std::env::temp_dir().join(format!("varco-config-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let toml = format!("[server]\ntls = {{ cert = \"cert.pem\", key = \"key.pem\" }}\n{ROOM}");
    let check = || Config::from_toml(&toml, &dir);

    std::fs::write(dir.join("cert.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.pem()).unwrap();
    let e = check().expect_err("swapped files").to_string();
    assert!(
        e.contains("server.tls.cert") && e.contains("holds no certificate"),
        "{e}"
    );

    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    let e = check().expect_err("a certificate as the key").to_string();
    assert!(e.contains("server.tls.key"), "{e}");

    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    if let Err(e) = check() {
        panic!("good files refused: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Health checks' defaults are HAProxy's order of magnitude, and a short
/// interval without a timeout takes the interval as its timeout instead
/// of being refused for the default's sake.
#[test]
fn health_check_defaults_fit_the_interval() {
    let room = |hc: &str| {
        let toml = format!(
            "[rooms.portal]\nupstreams = [\"http://127.0.0.1:9001\"]\nhealth_check = {hc}\n"
        );
        let c = Config::from_toml(&toml, Path::new(".")).unwrap_or_else(|e| panic!("{hc}: {e}"));
        c.rooms[0].health_check.clone().unwrap()
    };
    let h = room("{ path = \"/healthz\" }");
    assert_eq!(
        (h.interval, h.timeout, h.fall, h.rise, h.host),
        (Duration::from_secs(5), Duration::from_secs(2), 3, 2, None)
    );
    assert_eq!(h.path.as_str(), "/healthz");
    let h = room("{ path = \"/healthz?deep=1\", interval = \"1s\" }");
    assert_eq!(
        (h.interval, h.timeout),
        (Duration::from_secs(1), Duration::from_secs(1))
    );
    assert_eq!(h.path.as_str(), "/healthz?deep=1");
}

#[test]
fn rooms_sharing_an_https_upstream_may_name_it_alike() {
    for name in ["", "tls_server_name = \"portal.internal\"\n"] {
        let toml = format!(
            "[rooms.portal]\nupstreams = [\"https://10.0.0.1\"]\n{name}[rooms.shop]\nupstreams = [\"https://10.0.0.1:443\"]\npaths = [\"/shop\"]\n{name}"
        );
        Config::from_toml(&toml, Path::new("."))
            .unwrap_or_else(|e| panic!("refused {toml:?}: {e}"));
    }
}

#[test]
fn a_second_upstream_on_one_host_and_port_names_the_first_where_it_stands() {
    let e = errors("[rooms.portal]\nupstreams = [\"ftp://x\", \"http://x:80\", \"http://x\"]\n");
    assert!(e.names("rooms.portal.upstreams[2]"), "{e}");
    assert!(
        e.to_string().contains("same host and port as upstreams[1]"),
        "{e}"
    );
    // A host name in another case is the same server.
    let e = errors(
        "[rooms.portal]\nupstreams = [\"http://portal.internal\", \"http://Portal.Internal:80\"]\n",
    );
    assert!(e.names("rooms.portal.upstreams[1]"), "{e}");
}

/// A key file every user of the machine may read is said at start (a
/// caution, not an error: a container has no other users).
#[test]
fn a_secret_file_anyone_may_read_is_told() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("varco-config-mode-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        "[[keys]]\nid = \"k1\"\nsecret = \"MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=\"\n",
    )
    .unwrap();
    let cfg = dir.join("varco.toml");
    std::fs::write(&cfg, format!("[secrets]\nkey_file = \"keys.toml\"\n{ROOM}")).unwrap();
    let told = |mode: u32| {
        std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(mode)).unwrap();
        Config::load(&cfg).unwrap().cautions()
    };
    let cautions = told(0o644);
    assert!(
        cautions.iter().any(|c| c.starts_with("secrets.key_file:")
            && c.contains("readable by every user")
            && c.contains("mode 644")),
        "{cautions:?}"
    );
    assert_eq!(told(0o640), Vec::<String>::new());
    let cautions = told(0o602);
    assert!(
        cautions.iter().any(|c| c.starts_with("secrets.key_file:")
            && c.contains("writable by every user")
            && c.contains("next reload")),
        "{cautions:?}"
    );
    // A room's bypass secret and a lane's are secrets too.
    std::fs::set_permissions(&keys, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(dir.join("staff.secret"), "correct-horse-battery-staple\n").unwrap();
    std::fs::write(dir.join("lane.secret"), "battery-staple-correct-horse\n").unwrap();
    for f in ["staff.secret", "lane.secret"] {
        std::fs::set_permissions(dir.join(f), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    std::fs::write(
        &cfg,
        "[secrets]\nkey_file = \"keys.toml\"\n[rooms.portal]\nupstreams = [\"http://127.0.0.1:9\"]\n\
         max_active = 10\nbypass = { header = \"X-Staff\", secret_file = \"staff.secret\" }\n\
         [rooms.portal.lanes.partners]\nweight = 1\nheader = \"X-Partner\"\nsecret_file = \"lane.secret\"\n\
         [rooms.portal.lanes.public]\nweight = 1\n",
    )
    .unwrap();
    let cautions = Config::load(&cfg).unwrap().cautions();
    for key in [
        "rooms.portal.bypass.secret_file:",
        "rooms.portal.lanes.partners.secret_file:",
    ] {
        assert!(
            cautions
                .iter()
                .any(|c| c.starts_with(key) && c.contains("skip the line")),
            "{key} {cautions:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
