//! `gantry up`: build the system (the component list in `gantry-system`), start it, run until
//! Ctrl-C or SIGTERM, stop it in order. What is here is the terminal: the banner, lifecycle events,
//! instance output with `--logs`, SIGHUP as reload, and a second Ctrl-C as "kill now".

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use gantry_api::RouteControl;
use gantry_spec::LoadedSpec;
use gantry_supervisor::EventKind;
use gantry_system::{local_url, Options, System, ThreadHooks};
use gantry_telemetry::LogStream;

use crate::table;
use crate::{UpArgs, EXIT_FAILURE, EXIT_USAGE};

pub fn run(file: &Path, args: &UpArgs) -> ExitCode {
    let mut spec = match gantry_spec::load(file) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Some(env) = &args.env {
        if !gantry_spec::valid_env_name(env) {
            eprintln!("error: --env: invalid environment name {env:?}; expected 1-32 characters of a-z, 0-9 and '-' starting with a letter");
            return ExitCode::from(EXIT_USAGE);
        }
        spec.spec.config.env = Some(env.clone());
    }
    let spec = Arc::new(spec);
    gantry_telemetry::init_tracing(args.json_logs, "info,async_nats=warn");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gantry-control")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match rt.block_on(up(spec, args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// Raise the open-file soft limit to the hard limit (nginx's `worker_rlimit_nofile`): every
/// client connection, upstream connection and instance pipe is a descriptor, and the common
/// default soft limit (1024) runs out long before `max_connections`. Returns the limit now in
/// force and what it was, if it was raised.
fn raise_open_file_limit() -> (Option<u64>, Option<u64>) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let (Some(cur), hard) = (lim.current, lim.maximum) else {
        return (None, None);
    };
    // No hard limit: ask for what the kernel allows a process (`nr_open`).
    let want = hard.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(cur)
    });
    if want <= cur {
        return (Some(cur), None);
    }
    let raised = Rlimit {
        current: Some(want),
        maximum: hard,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => (Some(want), Some(cur)),
        Err(_) => (Some(cur), None),
    }
}

async fn up(spec: Arc<LoadedSpec>, args: &UpArgs) -> anyhow::Result<ExitCode> {
    let (files, was) = raise_open_file_limit();
    match (files, was) {
        (Some(now), Some(before)) => {
            tracing::info!(open_files = now, was = before, "open-file limit raised")
        }
        (Some(now), None) => tracing::info!(open_files = now, "open-file limit"),
        _ => {}
    }
    // Each client connection is a descriptor; instances, the store and pooled upstream
    // connections need some more.
    let wanted = u64::from(spec.spec.gateway.limits.max_connections) + 256;
    if let Some(now) = files.filter(|n| *n < wanted) {
        tracing::warn!(
            open_files = now,
            max_connections = spec.spec.gateway.limits.max_connections,
            "the open-file limit is below what gateway.limits.max_connections needs; raise the hard \
             limit (ulimit -Hn) or lower max_connections"
        );
    }
    let echo: Option<gantry_supervisor::Echo> = if args.logs {
        Some(Arc::new(|instance: &str, line: &str, stream: LogStream| {
            let mut out = std::io::stdout().lock();
            let mark = if stream == LogStream::Stderr {
                "!"
            } else {
                "|"
            };
            let _ = writeln!(out, "{instance:>14} {mark} {line}");
        }))
    } else {
        None
    };
    let mut system = System::build(
        spec.clone(),
        Options {
            echo,
            gateway_threads: ThreadHooks {
                on_start: Some(crate::alloc::reuse_hot_blocks),
                on_stop: Some(crate::alloc::release_hot_blocks),
            },
            fresh: args.fresh,
        },
    )
    .await?;
    let earlier = system.earlier_state().await?;
    if !earlier.is_empty() {
        println!("kept from earlier runs: {earlier} (`gantry up --fresh` starts clean)");
    }

    // Lifecycle events on the terminal, from the first instance start on.
    let mut events = system.supervisor.board().subscribe();
    let printer = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(e) => {
                    let who = e.instance.as_deref().unwrap_or(&e.service);
                    let mark = match e.kind {
                        EventKind::Healthy => "✓",
                        EventKind::Unhealthy | EventKind::Exited | EventKind::CrashLoop => "✗",
                        _ => "·",
                    };
                    println!("{} {mark} {who:<14} {}", table::clock(e.at_ms), e.message);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            }
        }
    });
    println!(
        "gantry {}: {} services | gateway {}{} | admin {} | data {}",
        env!("CARGO_PKG_VERSION"),
        spec.spec.services.len(),
        local_url(system.gateway_addr),
        system
            .tls_addr
            .map(|a| format!(" | https {}", local_url(a).replace("http://", "https://")))
            .unwrap_or_default(),
        local_url(system.admin_addr),
        system.data_dir.display()
    );
    if let Err(e) = system.start().await {
        system.stop().await;
        return Err(e);
    }
    {
        // SIGHUP reloads the spec, as it does for nginx and HAProxy.
        let c = system.control.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                match c.reload().await {
                    Ok(report) => println!(
                        "spec reloaded: {}",
                        serde_json::to_string(&report).unwrap_or_default()
                    ),
                    Err(gantry_api::RouteControlError::Invalid(errors)) => {
                        eprintln!("spec reload refused:\n{}", errors.join("\n"))
                    }
                    Err(e) => eprintln!("spec reload failed: {e:?}"),
                }
            }
        });
    }

    wait_for_signal().await?;
    println!("stopping: draining and stopping every instance (Ctrl-C again to kill now)");
    let supervisor = system.supervisor.clone();
    let mut forced = false;
    {
        let stopping = system.stop();
        tokio::pin!(stopping);
        tokio::select! {
            _ = &mut stopping => {}
            r = wait_for_signal() => {
                if r.is_ok() {
                    forced = true;
                    eprintln!("killing every instance now");
                    supervisor.kill_all();
                }
                stopping.await;
            }
        }
    }
    printer.abort();
    println!("stopped");
    Ok(if forced {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    Ok(())
}
