//! The `varco` binary: a thin CLI over the library.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use varco::app::{self, Listeners};
use varco::config::Config;
use varco::demo::PortalSettings;

#[derive(Parser)]
#[command(
    name = "varco",
    version,
    about = "Admission-control reverse proxy and virtual waiting room"
)]
struct Cli {
    /// Log format, overriding the config's log.format.
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and print it resolved, with every default.
    CheckConfig { file: PathBuf },
    /// Start the demo portal and varco in front of it.
    Demo {
        /// Requests the demo portal serves at once before it degrades.
        #[arg(long, default_value_t = 50, value_parser = at_least_one)]
        capacity: usize,
        /// Where the demo portal listens. The embedded demo config sends
        /// there; a config given with --config names its own upstreams.
        #[arg(long, default_value = "127.0.0.1:9001")]
        portal_listen: SocketAddr,
        /// Run only the demo portal, without varco (benchmarks, comparisons).
        #[arg(long)]
        portal_only: bool,
        /// Where varco's public listener binds, instead of the config's
        /// (the embedded default's 127.0.0.1:8080 taken by something else).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Where the admin listener binds, instead of the config's.
        #[arg(long)]
        admin_listen: Option<SocketAddr>,
        /// A config to use instead of the embedded demo default.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Operate a running varco through its admin API.
    Ctl {
        /// The admin listener; several, separated by commas, for the nodes
        /// of a cluster: each gets the same action.
        #[arg(long, default_value = "http://127.0.0.1:9090")]
        admin: String,
        /// The environment variable holding the admin token.
        #[arg(long, default_value = "VARCO_ADMIN_TOKEN")]
        token_env: String,
        /// How long each listener may take to answer ("10s"): a node that
        /// accepts but never answers must not keep the others untold.
        #[arg(long, default_value = "10s", value_parser = some_time)]
        timeout: std::time::Duration,
        #[command(subcommand)]
        action: varco::ctl::Action,
    },
    /// Check a queue receipt or ticket.
    Receipt {
        #[command(subcommand)]
        action: varco::checks::ReceiptAction,
    },
    /// Check the pre-queue draw.
    Lottery {
        #[command(subcommand)]
        action: varco::checks::LotteryAction,
    },
    /// Check or export the admission log.
    Audit {
        #[command(subcommand)]
        action: varco::checks::AuditAction,
    },
    /// A click day in miniature: citizens against the demo portal, without
    /// and then with varco in front; prints the comparison. With
    /// --compare: a fixed rate too high, one too low, and adaptive.
    Simulate {
        /// Default 300; 1200 with --compare. At most 20000: every citizen
        /// is a client inside this process.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=20_000))]
        citizens: Option<u64>,
        /// The demo portal's capacity (requests at once before it
        /// degrades). Default 20; 8 with --compare.
        #[arg(long, value_parser = at_least_one)]
        capacity: Option<usize>,
        /// varco's admission rate for the run, new sessions a minute.
        /// At most 1000000000, as in a config. Not with --compare, which
        /// runs plans of its own.
        #[arg(long, default_value_t = 1200, conflicts_with = "compare", value_parser = clap::value_parser!(u32).range(1..=1_000_000_000))]
        rate: u32,
        /// varco's max_active for the run. At most 1000000000. Not with
        /// --compare.
        #[arg(long, default_value_t = 20, conflicts_with = "compare", value_parser = clap::value_parser!(u64).range(1..=1_000_000_000))]
        max_active: u64,
        /// Seconds a citizen keeps trying before giving up. Default 90;
        /// 60 with --compare. At most an hour.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=3600))]
        patience: Option<u64>,
        /// Seconds a citizen spends on each portal page before the next
        /// step (reading, filling the form in), on average: between none
        /// and twice this, at random. How long a session holds its slot.
        /// At most a minute.
        #[arg(long, default_value_t = 0, conflicts_with = "compare", value_parser = clap::value_parser!(u64).range(0..=60))]
        think: u64,
        /// Compare a fixed rate too high, one too low, and adaptive
        /// admission, all through varco on the same demo portal.
        #[arg(long)]
        compare: bool,
        /// With --compare: write an SVG chart of rate and latency here.
        #[arg(long, requires = "compare")]
        chart: Option<PathBuf>,
    },
}

/// A count of at least one: a portal of capacity 0 serves nobody, and the
/// comparison would say nothing.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// A duration longer than none: a timeout of 0 gives up on every node
/// before asking it.
fn some_time(text: &str) -> Result<std::time::Duration, String> {
    match varco::config::units::parse_duration(text)? {
        d if d.is_zero() => Err("must be longer than 0s".into()),
        d => Ok(d),
    }
}

fn main() -> ExitCode {
    varco::tls::install_crypto_provider();
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(cfg) => {
                print!("{}", cfg.to_toml());
                for caution in cfg.cautions() {
                    eprintln!("{}: warning: {caution}", file.display());
                }
                eprintln!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprint!("{}: {e}", file.display());
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprint!("{}: {e}", config.display());
                    return ExitCode::from(2);
                }
            };
            // Absolute, as given: a reload reads whatever the path names
            // then. Resolving its symlinks here pinned the file of the
            // start (a Kubernetes ConfigMap's old folder, deleted at the
            // next edit: every reload failed until a restart).
            let path = std::path::absolute(&config).unwrap_or(config);
            exit(serve(cfg, cli.log_format, None, Some(path)))
        }
        Command::Receipt { action } => checked(varco::checks::receipt(action)),
        Command::Lottery { action } => checked(varco::checks::lottery(action)),
        Command::Audit { action } => {
            checked(varco::checks::audit(action, &mut std::io::stdout().lock()))
        }
        Command::Ctl {
            admin,
            token_env,
            timeout,
            action,
        } => exit(varco::ctl::run(&admin, &token_env, timeout, action)),
        Command::Simulate {
            citizens,
            capacity,
            rate,
            max_active,
            patience,
            think,
            compare,
            chart,
        } => {
            let _log = varco::logging::init(false, "warn");
            let crowd = citizens.map_or(if compare { 1200 } else { 300 }, |n| n as usize);
            if let Err(e) = varco::demo::simulate::make_room_for(crowd) {
                eprintln!("varco simulate: {e}");
                return ExitCode::FAILURE;
            }
            let rt = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("varco: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = if compare {
                let c = varco::demo::compare::CompareSettings::default_for(
                    crowd,
                    patience.unwrap_or(60),
                    capacity.unwrap_or(8),
                );
                rt.block_on(varco::demo::compare::run(&c)).and_then(|runs| {
                    print!("{}", varco::demo::compare::report(&c, &runs));
                    match chart {
                        Some(path) => {
                            let svg = varco::demo::chart::svg(
                                "varco simulate --compare: rate in force and portal p90 latency",
                                &runs,
                                c.knee_per_minute(),
                                c.target_latency.as_secs_f64() * 1000.0,
                            );
                            std::fs::write(&path, svg)
                                .map_err(|e| format!("cannot write {}: {e}", path.display()))
                        }
                        None => Ok(()),
                    }
                })
            } else {
                let settings = varco::demo::simulate::SimSettings {
                    citizens: crowd,
                    capacity: capacity.unwrap_or(20),
                    admission_per_minute: rate,
                    max_active,
                    patience: std::time::Duration::from_secs(patience.unwrap_or(90)),
                    think: std::time::Duration::from_secs(think),
                    ..Default::default()
                };
                rt.block_on(varco::demo::simulate::run(&settings))
                    .and_then(|(without, with)| {
                        print!(
                            "{}",
                            varco::demo::simulate::report(&settings, &without, &with)
                        );
                        let broken = varco::demo::simulate::broken_promises(&with);
                        if broken.is_empty() {
                            Ok(())
                        } else {
                            Err(format!("with varco, {}", broken.join("; ")))
                        }
                    })
            };
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("varco simulate: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Demo {
            capacity,
            portal_listen,
            portal_only,
            listen,
            admin_listen,
            config,
        } => {
            let cfg = match &config {
                Some(path) => Config::load(path),
                None => {
                    Config::from_toml(&varco::config::demo_config(portal_listen), Path::new("."))
                }
            };
            let mut cfg = match cfg {
                Ok(c) => c,
                Err(e) => {
                    eprint!("demo config: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(addr) = listen {
                cfg.server.listen = addr;
            }
            if let Some(addr) = admin_listen {
                cfg.server.admin_listen = addr;
            }
            // The demo has no token file: one made now opens the operator
            // page (and the API) for this run only; told once the admin
            // listener has its port (`--admin-listen 127.0.0.1:0`).
            let mut password = None;
            if cfg.admin_tokens.is_empty() && !portal_only {
                let token = format!("{:032x}", varco::room::token::random_u128());
                password = Some(token.clone());
                cfg.admin_tokens.push(varco::config::AdminToken {
                    id: "demo".into(),
                    token,
                });
            }
            let portal = PortalSettings {
                capacity,
                ..PortalSettings::default()
            };
            exit(serve(
                cfg,
                cli.log_format,
                Some(Demo {
                    portal_listen,
                    portal,
                    portal_only,
                    password,
                }),
                config,
            ))
        }
    }
}

fn exit(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("varco: {e:#}");
            // A config that does not fit the saved queue is a bad config,
            // told as `check-config` and a file with mistakes are.
            match e.downcast_ref::<varco::app::AppError>() {
                Some(varco::app::AppError::Config(_)) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// What `varco demo` adds to a run: its portal, and the operator page's
/// password made for the run.
struct Demo {
    portal_listen: SocketAddr,
    portal: PortalSettings,
    portal_only: bool,
    password: Option<String>,
}

fn serve(
    cfg: Config,
    log_format: Option<String>,
    demo: Option<Demo>,
    config_path: Option<PathBuf>,
) -> anyhow::Result<()> {
    let json = log_format.map(|f| f == "json").unwrap_or(cfg.log.json);
    let _log = varco::logging::init(json, &cfg.log.level);
    for caution in cfg.cautions() {
        tracing::warn!("{caution}");
    }
    // One worker: a current-thread runtime, without the cross-thread
    // wake-ups of a one-worker multi-thread pool.
    let mut rt = if cfg.server.workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if cfg.server.workers > 1 {
        rt.worker_threads(cfg.server.workers);
    }
    let rt = rt
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    let is_demo = demo.is_some();
    let password = demo.as_ref().and_then(|d| d.password.clone());
    rt.block_on(async move {
        // The portal serves as long as this handle lives: to the end.
        let mut _portal = None;
        if let Some(Demo {
            portal_listen,
            portal: settings,
            portal_only,
            ..
        }) = demo
        {
            let portal = start_portal(portal_listen, settings.clone()).await?;
            if portal_only {
                println!(
                    "demo portal listening on http://{} (capacity {})",
                    portal.addr, settings.capacity
                );
                shutdown_signal()?.await;
                return Ok(());
            }
            _portal = Some(portal);
        }
        let listeners = Listeners::bind(&cfg.server).await?;
        // Before the line below: a signal sent as soon as it appears must
        // find varco's handlers, not the default action that kills.
        let shutdown = shutdown_signal()?;
        // Always: without a file a SIGHUP reloads nothing (it is told
        // and counted as refused), where its default action would kill
        // varco and lose the queue of a demo run without `--config`.
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .context("cannot listen for SIGHUP")?;
        // Always: a logrotate rule left behind after `audit.log` went
        // from the config must not kill varco (SIGUSR1's default action).
        let reopen = Some(
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                .context("cannot listen for SIGUSR1")?,
        );
        // Built before the line below: a start refused for the saved
        // queue (or an admission log it cannot open) must not have said
        // it listens first.
        let app = app::prepare(cfg.clone(), config_path, hangup, reopen).await?;
        let scheme = if cfg.server.tls.is_some() {
            "https"
        } else {
            "http"
        };
        // Tests and scripts wait for this line: it is printed once both
        // listeners accept.
        // Not println!: with its reader gone (a wrapper that read one
        // line, `| head -1`) it would panic, and the queue's store, open
        // now, would be left as after a crash.
        use std::io::Write;
        let mut out = std::io::stdout();
        let _ = writeln!(
            out,
            "varco listening on {scheme}://{} (admin http://{})",
            listeners.proxy_addr(),
            listeners.admin_addr()
        );
        if is_demo {
            let _ = writeln!(
                out,
                "open {scheme}://{}/ in a browser: the demo portal is behind varco",
                listeners.proxy_addr()
            );
        }
        if let Some(token) = password {
            let _ = writeln!(
                out,
                "operator page: http://{}/status (any user name; password {token})",
                listeners.admin_addr()
            );
        }
        let _ = out.flush();
        app.serve(listeners, shutdown, true).await?;
        Ok(())
    })
}

async fn start_portal(
    addr: SocketAddr,
    settings: PortalSettings,
) -> anyhow::Result<varco::demo::RunningPortal> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("demo portal cannot listen on {addr}"))?;
    Ok(varco::demo::spawn(listener, settings)?)
}

/// SIGTERM or SIGINT, their handlers installed now (a future alone would
/// install them only when first polled, after the start-up work).
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// A check's answer: on stdout when it passed (exit 0), on stderr when
/// it did not (exit 1).
fn checked(o: varco::checks::Outcome) -> ExitCode {
    if o.ok {
        // Not println!, which panics at a reader gone (`| head`): that
        // ends it quietly; a write that fails otherwise (a full disk)
        // is no answer given, and a report file left empty must not pass.
        if !o.text.is_empty() {
            use std::io::Write;
            if let Err(e) = writeln!(std::io::stdout().lock(), "{}", o.text) {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    eprintln!("varco: cannot write the answer out: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        ExitCode::SUCCESS
    } else {
        eprintln!("{}", o.text);
        ExitCode::FAILURE
    }
}
