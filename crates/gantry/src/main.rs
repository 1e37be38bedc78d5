//! `gantry`: the one binary. `gantry up` runs the whole system; every other command is a client
//! of the admin API of a running `gantry up`.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod alloc;
mod bus_cmd;
mod client;
mod commands;
mod identity_cmd;
mod table;
mod top;
mod up;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// mimalloc (see `alloc`): the only unsafe code in the binary.
#[global_allocator]
static ALLOC: alloc::Mimalloc = alloc::Mimalloc;

#[derive(Parser)]
#[command(
    name = "gantry",
    version,
    about = "The outer architecture of microservices in one binary: supervisor, registry, gateway, config"
)]
struct Cli {
    /// The spec file (`-f FILE` works too, before or after the command; after `logs`, `-f` is
    /// follow, as in docker and kubectl). Client commands find the running gantry through it:
    /// its data directory holds the admin address and token.
    #[arg(
        long = "file",
        global = true,
        default_value = "gantry.toml",
        env = "GANTRY_FILE",
        value_name = "FILE"
    )]
    file: PathBuf,
    /// Admin API URL of a running gantry (overrides discovery through the spec file).
    #[arg(long, global = true, env = "GANTRY_ADMIN_URL")]
    admin: Option<String>,
    /// Admin token (default: read from the data directory).
    #[arg(
        long,
        global = true,
        env = "GANTRY_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start every service in the spec, the gateway and the admin API; Ctrl-C stops everything.
    Up(UpArgs),
    /// Check a spec file without starting anything (exit 2 on errors).
    Validate,
    /// Instances and their state.
    Ps {
        /// Only this service.
        service: Option<String>,
        #[command(flatten)]
        out: Output,
    },
    /// Live figures per service (requests, errors, latency, CPU, memory) and per instance.
    Top {
        /// Refresh every this many seconds.
        #[arg(long, short = 'i', default_value_t = 2.0)]
        interval: f64,
        /// One frame (CPU measured over one interval), then exit.
        #[arg(long)]
        once: bool,
        /// One JSON object per frame.
        #[arg(long)]
        json: bool,
    },
    /// Query the metrics history (a PromQL subset), e.g.
    /// `gantry query 'sum by (service) (rate(gantry_gateway_requests_total[1m]))' --range 1h`.
    Query {
        expr: String,
        /// Over this long back from now (a table of the series' last, min and max values);
        /// without it, the value now.
        #[arg(long)]
        range: Option<String>,
        /// The range's step, e.g. 30s (default: the history's sampling step).
        #[arg(long)]
        step: Option<String>,
        /// Prometheus's JSON answer.
        #[arg(long)]
        json: bool,
    },
    /// Services with desired and healthy instance counts.
    Services {
        #[command(flatten)]
        out: Output,
    },
    /// Output of instances (stdout and stderr).
    Logs {
        /// Only this service.
        service: Option<String>,
        /// Keep streaming new lines.
        #[arg(short = 'f', long)]
        follow: bool,
        /// Only this instance, e.g. orders-2.
        #[arg(long)]
        instance: Option<String>,
        /// Lines since: RFC 3339 time, unix ms, or a duration such as 10m.
        #[arg(long)]
        since: Option<String>,
        /// Only lines before: the same forms as --since.
        #[arg(long)]
        until: Option<String>,
        /// Only lines this regular expression matches.
        #[arg(long)]
        grep: Option<String>,
        /// Only lines at this level or above: trace, debug, info, warn, error, fatal.
        #[arg(long)]
        level: Option<String>,
        /// Only JSON lines with this top-level field value, KEY=VALUE (repeatable).
        #[arg(long = "field", value_name = "KEY=VALUE")]
        fields: Vec<String>,
        /// Only lines of this request: its request id (the access log's and services').
        #[arg(long)]
        request_id: Option<String>,
        /// Only lines of this trace.
        #[arg(long)]
        trace_id: Option<String>,
        /// Only the last N lines.
        #[arg(long, short = 'n')]
        tail: Option<usize>,
        /// At most N lines (default 10000).
        #[arg(long)]
        limit: Option<usize>,
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Set the number of instances of a service.
    Scale { service: String, replicas: u32 },
    /// Rolling restart: replace each instance with a new one, waiting for health.
    Restart { service: String },
    /// Re-read the spec file: routes, upstream policies and endpoints apply at once, without
    /// dropping connections; other changes are reported as needing a restart.
    Reload,
    /// The gateway's live route table.
    Routes {
        #[command(flatten)]
        out: Output,
    },
    /// Routes added over the admin API (kept across restarts; spec routes live in the spec).
    #[command(subcommand)]
    Route(RouteCmd),
    /// The service registry.
    #[command(subcommand)]
    Registry(RegistryCmd),
    /// Versioned configuration of services.
    #[command(subcommand)]
    Config(ConfigCmd),
    /// The message bus: topics, publishing, subscriptions, dead letters.
    #[command(subcommand)]
    Bus(bus_cmd::BusCmd),
    /// Users, clients, roles, API keys and signing keys.
    #[command(subcommand)]
    Identity(identity_cmd::IdentityCmd),
    /// Sign in as a user (password read from standard input): later commands use your roles'
    /// permissions instead of the admin token.
    Login { username: String },
    /// Forget the login for this gantry.
    Logout,
    /// The audit trail: who changed what, when, from where, and the outcome (newest first).
    Audit {
        /// At most this many records.
        #[arg(long, short = 'n', default_value_t = 50)]
        limit: usize,
        /// Only calls by this principal, e.g. admin-token.
        #[arg(long)]
        principal: Option<String>,
        #[command(flatten)]
        out: Output,
    },
}

#[derive(Args)]
pub struct UpArgs {
    /// Start clean: forget what earlier runs left (registrations, config versions, routes added
    /// over the API, scale and deployed versions).
    #[arg(long)]
    fresh: bool,
    /// Also print every line instances write, prefixed by instance.
    #[arg(long)]
    logs: bool,
    /// Gantry's own logs as JSON lines.
    #[arg(long)]
    json_logs: bool,
    /// The config environment (dev, staging, prod, ...): instances get its config layer and
    /// `GANTRY_ENV`. Overrides `[config] env`.
    #[arg(long, value_name = "NAME")]
    env: Option<String>,
}

#[derive(Args, Clone, Copy)]
pub struct Output {
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum RouteCmd {
    /// Add or replace a route.
    Put {
        name: String,
        /// The target service.
        #[arg(long)]
        service: String,
        #[arg(long)]
        path_prefix: Option<String>,
        #[arg(long)]
        host: Option<String>,
        #[arg(long)]
        strip_prefix: bool,
        /// Any other route fields, as JSON (same names as in the spec), e.g. '{"methods":["GET"]}'.
        #[arg(long)]
        json: Option<String>,
    },
    /// Remove a route added over the API.
    Rm { name: String },
}

#[derive(Subcommand)]
enum RegistryCmd {
    /// Registered instances, optionally of one service, filtered and ordered for locality.
    Ls {
        service: Option<String>,
        /// Semver requirement, e.g. ^1.2
        #[arg(long)]
        version: Option<String>,
        /// Only instances with this tag (repeat for several).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// passing, routable (passing and warning) or any; default: any without a service,
        /// routable with one.
        #[arg(long)]
        health: Option<String>,
        /// Preferred zone: its instances first.
        #[arg(long)]
        near: Option<String>,
        #[command(flatten)]
        out: Output,
    },
}

/// Which layer of a config set a command works on (default: the base layer).
#[derive(Args, Clone, Default)]
pub struct LayerArgs {
    /// The environment layer (dev, staging, prod, ...).
    #[arg(long, value_name = "NAME", conflicts_with = "instance")]
    env: Option<String>,
    /// The layer of one instance (overrides for e.g. web-3).
    #[arg(long, value_name = "ID")]
    instance: Option<String>,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Set keys in one commit: KEY=VALUE (a string) or KEY:=JSON (a number, boolean, object...).
    /// SERVICE is a service name or _global (what every service inherits).
    Set {
        service: String,
        /// KEY=VALUE or KEY:=JSON, several at once (or the old form: KEY VALUE).
        #[arg(value_name = "KEY=VALUE")]
        pairs: Vec<String>,
        /// A secret: KEY (its value read from stdin, one line per secret, so it never shows in
        /// `ps`) or KEY=VALUE. Sealed at rest, redacted in every output.
        #[arg(long = "secret", value_name = "KEY[=VALUE]")]
        secrets: Vec<String>,
        #[command(flatten)]
        layer: LayerArgs,
        /// Message stored with the version.
        #[arg(short, long)]
        message: Option<String>,
        /// Rolling-restart the service afterwards so running instances get the values.
        #[arg(long)]
        restart: bool,
        /// Do not wait for an automatic rollout's outcome.
        #[arg(long)]
        no_wait: bool,
    },
    /// Remove keys in one commit.
    Unset {
        service: String,
        #[arg(required = true)]
        keys: Vec<String>,
        #[command(flatten)]
        layer: LayerArgs,
        #[arg(short, long)]
        message: Option<String>,
        #[arg(long)]
        restart: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// A key's value, or every value, as an instance of SERVICE sees them (global, service,
    /// environment and instance layers merged).
    Get {
        service: String,
        key: Option<String>,
        #[command(flatten)]
        layer: LayerArgs,
        /// Show secret values (needs config:reveal; audited).
        #[arg(long)]
        reveal: bool,
        #[command(flatten)]
        out: Output,
    },
    /// Every layer of a set, or the sets that have config.
    List {
        service: Option<String>,
        #[arg(long)]
        reveal: bool,
        #[command(flatten)]
        out: Output,
    },
    /// Every retained version of a set: who, when, why, what changed.
    History {
        service: String,
        #[arg(long)]
        reveal: bool,
        #[command(flatten)]
        out: Output,
    },
    /// What changed between two versions (TO: default the current one).
    Diff {
        service: String,
        from: u64,
        to: Option<u64>,
        #[arg(long)]
        reveal: bool,
        #[command(flatten)]
        out: Output,
    },
    /// Make an earlier version's values current again (as a new version).
    Rollback {
        service: String,
        version: u64,
        #[arg(short, long)]
        message: Option<String>,
        #[arg(long)]
        restart: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// Write a set as JSON or TOML (every layer), or one layer as .env, to stdout.
    Export {
        service: String,
        /// json, toml or env.
        #[arg(long, default_value = "toml")]
        format: String,
        /// Default: the current version.
        #[arg(long)]
        version: Option<u64>,
        #[command(flatten)]
        layer: LayerArgs,
        /// Include secret values (needs config:reveal; audited). Without it secrets are listed
        /// as redacted, and an import of the file keeps them.
        #[arg(long)]
        reveal: bool,
    },
    /// Import a JSON, TOML or .env file (- for stdin) as one commit.
    Import {
        service: String,
        /// The file (named `path`: `file` is the global spec option).
        #[arg(value_name = "FILE")]
        path: PathBuf,
        /// json, toml or env; default from the file's extension.
        #[arg(long)]
        format: Option<String>,
        /// Remove keys the file does not mention.
        #[arg(long)]
        replace: bool,
        #[command(flatten)]
        layer: LayerArgs,
        /// With a .env file: keys to store as secrets.
        #[arg(long = "secret", value_name = "KEY")]
        secrets: Vec<String>,
        #[arg(short, long)]
        message: Option<String>,
    },
}

/// Exit codes: 0 ok, 1 runtime failure, 2 bad input (spec, arguments).
pub const EXIT_FAILURE: u8 = 1;
pub const EXIT_USAGE: u8 = 2;

/// `-f FILE` anywhere means `--file FILE`, except after `logs`, where `-f` is follow (as
/// `docker compose -f FILE logs -f` and `kubectl logs -f`).
fn normalize_args(args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut command: Option<String> = None;
    let mut iter = args.into_iter();
    if let Some(program) = iter.next() {
        out.push(program);
    }
    let mut takes_value = false;
    for a in iter {
        let text = a.to_string_lossy().into_owned();
        if takes_value {
            takes_value = false;
            out.push(a);
            continue;
        }
        if text == "--" {
            out.push(a);
            command.get_or_insert_with(String::new);
            continue;
        }
        if text == "-f" && command.as_deref() != Some("logs") {
            out.push("--file".into());
            takes_value = true;
            continue;
        }
        if matches!(text.as_str(), "--file" | "--admin" | "--token") {
            takes_value = true;
        } else if command.is_none() && !text.starts_with('-') {
            command = Some(text);
        }
        out.push(a);
    }
    out
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse_from(normalize_args(std::env::args_os().collect())) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.cmd {
        Cmd::Up(args) => up::run(&cli.file, &args),
        Cmd::Validate => commands::validate(&cli.file),
        cmd => {
            let target = client::Target {
                file: cli.file,
                admin: cli.admin,
                token: cli.token,
            };
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: cannot start runtime: {e}");
                    return ExitCode::from(EXIT_FAILURE);
                }
            };
            rt.block_on(commands::run_client(cmd, target))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        super::Cli::command().debug_assert();
    }

    fn parse(args: &[&str]) -> (std::path::PathBuf, Option<bool>) {
        use clap::Parser;
        let args = super::normalize_args(args.iter().map(|a| a.into()).collect());
        let cli = super::Cli::try_parse_from(args).unwrap();
        let follow = match cli.cmd {
            super::Cmd::Logs { follow, .. } => Some(follow),
            _ => None,
        };
        (cli.file, follow)
    }

    #[test]
    fn file_before_or_after_the_command_and_logs_follow() {
        assert_eq!(
            parse(&["gantry", "-f", "a.toml", "ps"]).0,
            std::path::Path::new("a.toml")
        );
        assert_eq!(
            parse(&["gantry", "ps", "-f", "a.toml"]).0,
            std::path::Path::new("a.toml")
        );
        assert_eq!(
            parse(&["gantry", "ps", "--file", "b.toml"]).0,
            std::path::Path::new("b.toml")
        );
        assert_eq!(
            parse(&["gantry", "up", "-f", "c.toml"]).0,
            std::path::Path::new("c.toml")
        );
        assert_eq!(
            parse(&["gantry", "-f", "d.toml", "logs", "orders", "-f"]),
            (std::path::PathBuf::from("d.toml"), Some(true))
        );
        assert_eq!(
            parse(&["gantry", "logs", "orders", "-f", "--file", "e.toml"]),
            (std::path::PathBuf::from("e.toml"), Some(true))
        );
        assert_eq!(
            parse(&["gantry", "logs", "orders"]),
            (std::path::PathBuf::from("gantry.toml"), Some(false))
        );
    }
}
