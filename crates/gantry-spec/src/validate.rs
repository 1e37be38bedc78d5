//! Semantic checks serde cannot express. Each problem is `(field path, message)`.

use std::collections::{BTreeMap, HashMap};

use crate::types::{ProbeKind, Spec};

/// Headers that describe one connection, never forwarded (RFC 9110 §7.6.1).
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

type Problems = Vec<(String, String)>;

/// Signals a service may ask to be stopped with.
pub const STOP_SIGNALS: &[&str] = &[
    "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGKILL",
];

pub use gantry_model::{is_reserved_env, is_valid_env_name};

pub(crate) fn validate(spec: &Spec) -> Problems {
    let mut p = Problems::new();
    if spec.gateway.listen == spec.admin.listen && spec.gateway.listen.port() != 0 {
        p.push((
            "admin.listen".into(),
            format!(
                "is the same address as gateway.listen ({})",
                spec.gateway.listen
            ),
        ));
    }
    if spec.gateway.workers > 1024 {
        p.push(("gateway.workers".into(), "expected at most 1024".into()));
    }
    if !(1..=65_536).contains(&spec.admin.max_connections) {
        p.push(("admin.max_connections".into(), "expected 1..=65536".into()));
    }
    match humantime::parse_duration(&spec.metrics.step) {
        Ok(d) if d.as_millis() >= 500 && d.as_secs() <= 3600 => {}
        Ok(_) => p.push(("metrics.step".into(), "expected 500ms..=1h".into())),
        Err(e) => p.push((
            "metrics.step".into(),
            format!("{:?}: {e} (e.g. \"30s\")", spec.metrics.step),
        )),
    }
    match humantime::parse_duration(&spec.metrics.retention) {
        Ok(d) if d.as_secs() >= 60 => {}
        Ok(_) => p.push(("metrics.retention".into(), "expected at least 1m".into())),
        Err(e) => p.push((
            "metrics.retention".into(),
            format!("{:?}: {e} (e.g. \"7d\")", spec.metrics.retention),
        )),
    }
    if spec.metrics.max_disk_bytes < 1 << 20 {
        p.push((
            "metrics.max_disk_bytes".into(),
            "expected at least 1048576 (1 MiB)".into(),
        ));
    }
    if spec.logs.max_disk_bytes < 1 << 20 {
        p.push((
            "logs.max_disk_bytes".into(),
            "expected at least 1048576 (1 MiB)".into(),
        ));
    }
    match humantime::parse_duration(&spec.logs.max_age) {
        Ok(d) if d.as_secs() >= 60 => {}
        Ok(_) => p.push(("logs.max_age".into(), "expected at least 1m".into())),
        Err(e) => p.push((
            "logs.max_age".into(),
            format!("{:?}: {e} (e.g. \"7d\", \"12h\")", spec.logs.max_age),
        )),
    }
    if spec.logs.max_bytes < 4096 {
        p.push(("logs.max_bytes".into(), "expected at least 4096".into()));
    }
    if spec.store.data_dir.as_os_str().is_empty() {
        p.push(("store.data_dir".into(), "must not be empty".into()));
    }
    for url in spec.store.url.split(',') {
        let url = url.trim();
        let scheme_ok = ["nats://", "tls://"].iter().any(|s| url.starts_with(s));
        if !scheme_ok || url.len() <= 7 || url.chars().any(|c| c.is_whitespace()) {
            p.push((
                "store.url".into(),
                format!("{url:?} is not a NATS server address; expected nats://HOST:PORT (comma-separated for several)"),
            ));
        }
    }
    if !matches!(spec.store.replicas, 1 | 3 | 5) {
        p.push((
            "store.replicas".into(),
            format!(
                "expected 1, 3 or 5 (JetStream replica counts), got {}",
                spec.store.replicas
            ),
        ));
    }
    let ns = &spec.store.namespace;
    if ns.is_empty()
        || ns.len() > 32
        || !ns
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    {
        p.push((
            "store.namespace".into(),
            format!("{ns:?}: expected 1-32 characters of a-z, 0-9 and '-'"),
        ));
    }

    let mut routes_seen: HashMap<String, String> = HashMap::new();
    let mut ports_seen: HashMap<u16, String> = HashMap::new();
    for (name, svc) in &spec.services {
        let at = |f: &str| format!("services.{name}.{f}");
        if !gantry_model::is_valid_service_name(name) {
            p.push((
                format!("services.{name}"),
                "service name must be 1-63 characters of a-z, 0-9 and '-', start with a letter and not end with '-'".into(),
            ));
        }
        if svc.external && (svc.command.is_some() || !svc.endpoints.is_empty()) {
            p.push((
                at("external"),
                "an external service's instances register themselves: no command or endpoints"
                    .into(),
            ));
        }
        match (&svc.command, svc.endpoints.is_empty()) {
            (None, true) if svc.external => {}
            (None, true) => p.push((
                at("command"),
                "missing field `command`: give the program to run, `endpoints` (addresses of instances gantry does not run), or `external = true` (instances that register themselves)".into(),
            )),
            (Some(_), false) => p.push((
                at("endpoints"),
                "a service has either a command (gantry runs it) or endpoints (it runs elsewhere), not both".into(),
            )),
            (Some(c), true) => match c.first() {
                None => p.push((
                    at("command"),
                    "expected a non-empty array: program and arguments".into(),
                )),
                Some(prog) if prog.trim().is_empty() => p.push((
                    format!("services.{name}.command[0]"),
                    "program must not be empty".into(),
                )),
                _ => {}
            },
            (None, false) => {
                for (i, e) in svc.endpoints.iter().enumerate() {
                    if crate::parse_endpoint(e).is_none() {
                        p.push((
                            format!("services.{name}.endpoints[{i}]"),
                            format!("{e:?} is not an address; expected ip:port, e.g. \"127.0.0.1:9000\""),
                        ));
                    }
                }
            }
        }
        if let Err(e) = semver::Version::parse(&svc.version) {
            p.push((
                at("version"),
                format!(
                    "invalid semantic version {:?} ({e}); expected e.g. \"1.4.2\"",
                    svc.version
                ),
            ));
        }
        if svc.replicas > 1000 {
            p.push((at("replicas"), "expected at most 1000".into()));
        }
        if let Some(port) = svc.port {
            if port == 0 {
                p.push((
                    at("port"),
                    "expected 1-65535 (omit the field to get a free port)".into(),
                ));
            } else if svc.replicas > 1 {
                p.push((
                    at("port"),
                    "a fixed port allows only one replica; omit port to get one per instance"
                        .into(),
                ));
            } else if let Some(other) = ports_seen.insert(port, name.clone()) {
                p.push((
                    at("port"),
                    format!("port {port} is already used by service {other}"),
                ));
            } else if port == spec.gateway.listen.port() || port == spec.admin.listen.port() {
                p.push((
                    at("port"),
                    format!("port {port} is the gateway's or the admin API's"),
                ));
            }
        }
        for (k, v) in &svc.env {
            if !is_valid_env_name(k) {
                p.push((
                    format!("services.{name}.env.{k}"),
                    "expected a name of letters, digits and '_', not starting with a digit".into(),
                ));
            } else if is_reserved_env(k) {
                p.push((
                    format!("services.{name}.env.{k}"),
                    "PORT and GANTRY_* are set by gantry".into(),
                ));
            }
            if v.contains('\0') {
                p.push((
                    format!("services.{name}.env.{k}"),
                    "value must not contain NUL".into(),
                ));
            }
        }
        for (i, dep) in svc.depends_on.iter().enumerate() {
            let f = format!("services.{name}.depends_on[{i}]");
            if dep == name {
                p.push((f, "a service cannot depend on itself".into()));
            } else if !spec.services.contains_key(dep) {
                p.push((f, format!("unknown service {dep:?}")));
            }
        }
        if !STOP_SIGNALS.contains(&svc.reload_signal.as_str()) || svc.reload_signal == "SIGKILL" {
            p.push((
                at("reload_signal"),
                format!(
                    "unknown signal {:?}; expected one of {} (not SIGKILL)",
                    svc.reload_signal,
                    STOP_SIGNALS.join(", ")
                ),
            ));
        }
        if !STOP_SIGNALS.contains(&svc.stop_signal.as_str()) {
            p.push((
                at("stop_signal"),
                format!(
                    "unknown signal {:?}; expected one of {}",
                    svc.stop_signal,
                    STOP_SIGNALS.join(", ")
                ),
            ));
        }
        if svc.stop_timeout_ms > 3_600_000 {
            p.push((
                at("stop_timeout_ms"),
                "expected at most 3600000 (one hour)".into(),
            ));
        }
        if svc.drain_timeout_ms > 3_600_000 {
            p.push((
                at("drain_timeout_ms"),
                "expected at most 3600000 (one hour)".into(),
            ));
        }
        let b = &svc.backoff;
        if b.initial_ms == 0 {
            p.push((at("backoff.initial_ms"), "expected at least 1".into()));
        }
        if b.max_ms < b.initial_ms {
            p.push((
                at("backoff.max_ms"),
                "must be at least backoff.initial_ms".into(),
            ));
        }
        if b.crash_loop_restarts == 0 {
            p.push((
                at("backoff.crash_loop_restarts"),
                "expected at least 1".into(),
            ));
        }

        let h = &svc.health;
        match h.kind {
            ProbeKind::Http => match &h.path {
                None => p.push((
                    at("health.path"),
                    "type = \"http\" needs a path, e.g. \"/health\"".into(),
                )),
                Some(path)
                    if !path.starts_with('/')
                        || path.chars().any(|c| c.is_ascii_control() || c == ' ') =>
                {
                    p.push((
                        at("health.path"),
                        "expected an absolute path such as \"/health\"".into(),
                    ))
                }
                _ => {}
            },
            ProbeKind::Exec => match &h.command {
                Some(c) if c.first().is_some_and(|p| !p.trim().is_empty()) => {}
                _ => p.push((
                    at("health.command"),
                    "type = \"exec\" needs a non-empty command array".into(),
                )),
            },
            ProbeKind::Tcp | ProbeKind::None => {}
        }
        if h.kind != ProbeKind::Http && h.path.is_some() {
            p.push((
                at("health.path"),
                "only allowed with type = \"http\"".into(),
            ));
        }
        if h.kind != ProbeKind::Exec && h.command.is_some() {
            p.push((
                at("health.command"),
                "only allowed with type = \"exec\"".into(),
            ));
        }
        if h.interval_ms < 10 {
            p.push((at("health.interval_ms"), "expected at least 10".into()));
        }
        if h.timeout_ms == 0 {
            p.push((at("health.timeout_ms"), "expected at least 1".into()));
        }
        if h.healthy_threshold == 0 {
            p.push((at("health.healthy_threshold"), "expected at least 1".into()));
        }
        if h.unhealthy_threshold == 0 {
            p.push((
                at("health.unhealthy_threshold"),
                "expected at least 1".into(),
            ));
        }

        crate::gateway::validate_upstream(&mut p, name, &svc.upstream);
        for (i, r) in svc.routes.iter().enumerate() {
            crate::gateway::validate_route(&mut p, spec, name, i, r);
            // Two routes that match exactly the same requests: the second could never be used.
            let m = r.to_model(name, i).matcher;
            let key = serde_json::to_string(&m).unwrap_or_default();
            let here = format!("services.{name}.routes[{i}]");
            if let Some(first) = routes_seen.get(&key) {
                let field = match (&r.path, &r.path_regex) {
                    (Some(_), _) => "path",
                    (_, Some(_)) => "path_regex",
                    _ => "path_prefix",
                };
                p.push((
                    format!("{here}.{field}"),
                    format!("duplicate route: it matches exactly what {first} matches"),
                ));
            } else {
                routes_seen.insert(key, here);
            }
        }
    }
    crate::gateway::validate_gateway(&mut p, spec);
    crate::identity::validate(&mut p, spec);
    if let Some(e) = &spec.config.env {
        if !valid_env_name(e) {
            p.push((
                "config.env".into(),
                format!("invalid environment name {e:?}: expected 1-32 characters of a-z, 0-9 and '-' starting with a letter"),
            ));
        }
    }
    if spec.registry.dns_ttl_secs > 3600 {
        p.push((
            "registry.dns_ttl_secs".into(),
            "expected at most 3600 (answers must follow the registry)".into(),
        ));
    }
    if !(2..=10_000).contains(&spec.config.history) {
        p.push((
            "config.history".into(),
            format!("expected 2..=10000 versions, got {}", spec.config.history),
        ));
    }
    if let Some(cycle) = find_cycle(spec) {
        p.push((
            format!("services.{}.depends_on", cycle[0]),
            format!("dependency cycle: {}", cycle.join(" -> ")),
        ));
    }
    validate_bus(spec, &mut p);
    p
}

/// Environment names (`[config] env`, `gantry up --env`): 1-32 of a-z, 0-9, '-', starting with
/// a letter.
pub fn valid_env_name(e: &str) -> bool {
    !e.is_empty()
        && e.len() <= 32
        && e.starts_with(|c: char| c.is_ascii_lowercase())
        && e.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

pub(crate) fn bad_prefix(prefix: &str) -> Option<&'static str> {
    if prefix.contains("//") {
        return Some("must not contain empty segments (\"//\")");
    }
    if prefix.split('/').any(|s| s == "." || s == "..") {
        return Some("must not contain \".\" or \"..\" segments");
    }
    if prefix.contains(['?', '#', '%']) || prefix.chars().any(|c| c.is_ascii_control() || c == ' ')
    {
        return Some("must be a plain path: no '?', '#', '%', spaces or control characters");
    }
    None
}

pub(crate) fn is_valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// A dependency cycle, as service names from the first back to itself.
fn find_cycle(spec: &Spec) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn visit<'a>(
        n: &'a str,
        spec: &'a Spec,
        marks: &mut BTreeMap<&'a str, Mark>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<String>> {
        match marks.get(n) {
            Some(Mark::Done) => return None,
            Some(Mark::Visiting) => {
                let start = stack.iter().position(|s| *s == n).unwrap_or(0);
                let mut c: Vec<String> = stack[start..].iter().map(|s| s.to_string()).collect();
                c.push(n.to_string());
                return Some(c);
            }
            None => {}
        }
        marks.insert(n, Mark::Visiting);
        stack.push(n);
        if let Some(svc) = spec.services.get(n) {
            for d in &svc.depends_on {
                if d != n && spec.services.contains_key(d) {
                    if let Some(c) = visit(d, spec, marks, stack) {
                        return Some(c);
                    }
                }
            }
        }
        stack.pop();
        marks.insert(n, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for name in spec.services.keys() {
        let mut stack = Vec::new();
        if let Some(c) = visit(name, spec, &mut marks, &mut stack) {
            return Some(c);
        }
    }
    None
}

/// Bus topic and subscription names: 1-48 characters of a-z, 0-9 and '-', starting with a
/// letter (the bus's own rule).
fn valid_bus_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 48
        && n.as_bytes()[0].is_ascii_lowercase()
        && n.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

fn validate_bus(spec: &Spec, p: &mut Problems) {
    let g = &spec.bus.gateway_path;
    if !g.is_empty() {
        if !g.starts_with('/') || g.len() < 2 || bad_prefix(g).is_some() {
            p.push((
                "bus.gateway_path".into(),
                format!("{g:?}: expected a path prefix such as \"/_gantry/topics\" (not \"/\"), or \"\" for none"),
            ));
        }
        let g = crate::normalize_prefix(g);
        if spec
            .identity
            .gateway_path
            .as_deref()
            .map(crate::normalize_prefix)
            .as_deref()
            == Some(g.as_str())
        {
            p.push((
                "bus.gateway_path".into(),
                format!("{g:?} is identity.gateway_path too"),
            ));
        }
    }
    if spec.services.contains_key(crate::BUS_SERVICE) {
        p.push((
            format!("services.{}", crate::BUS_SERVICE),
            "this name is Gantry's own (the message bus)".into(),
        ));
    }
    for (name, t) in &spec.bus.topics {
        let at = |f: &str| format!("bus.topics.{name}.{f}");
        if !valid_bus_name(name) {
            p.push((
                format!("bus.topics.{name}"),
                "topic name must be 1-48 characters of a-z, 0-9 and '-', starting with a letter"
                    .into(),
            ));
        }
        if let Some(a) = &t.max_age {
            match humantime::parse_duration(a) {
                Ok(d) if d.as_millis() >= 100 => {}
                Ok(_) => p.push((at("max_age"), "expected at least 100ms".into())),
                Err(e) => p.push((at("max_age"), format!("{a:?}: {e} (e.g. \"7d\", \"12h\")"))),
            }
        }
        match humantime::parse_duration(&t.dedup_window) {
            Ok(d) if d.as_millis() >= 100 && d.as_secs() <= 24 * 3600 => {}
            Ok(_) => p.push((at("dedup_window"), "expected 100ms..=24h".into())),
            Err(e) => p.push((
                at("dedup_window"),
                format!("{:?}: {e} (e.g. \"2m\")", t.dedup_window),
            )),
        }
        if t.max_bytes.is_some_and(|b| b < 1024) {
            p.push((at("max_bytes"), "expected at least 1024".into()));
        }
        if t.max_messages == Some(0) {
            p.push((at("max_messages"), "expected at least 1".into()));
        }
        if t.max_message_bytes == 0 || t.max_message_bytes > 8 << 20 {
            p.push((at("max_message_bytes"), "expected 1..=8388608".into()));
        }
    }
    for (name, svc) in &spec.services {
        let mut seen = std::collections::BTreeSet::new();
        for (i, s) in svc.subscribe.iter().enumerate() {
            let at = |f: &str| format!("services.{name}.subscribe[{i}].{f}");
            if !spec.bus.topics.contains_key(&s.topic) {
                p.push((
                    at("topic"),
                    format!(
                        "{:?} is not a topic of [bus.topics] (declare it there)",
                        s.topic
                    ),
                ));
            }
            if !seen.insert(&s.topic) {
                p.push((
                    at("topic"),
                    format!("{:?}: the service already subscribes to it", s.topic),
                ));
            }
            if !valid_bus_name(name) {
                p.push((
                    at("topic"),
                    "a subscribing service's name must be at most 48 characters".into(),
                ));
            }
            if !s.path.starts_with('/') || s.path.bytes().any(|c| c <= b' ' || c >= 0x7f) {
                p.push((
                    at("path"),
                    "expected a path starting with '/' without spaces or control characters".into(),
                ));
            }
            if !(1..=100).contains(&s.max_attempts) {
                p.push((at("max_attempts"), "expected 1..=100".into()));
            }
            if s.backoff_initial_ms == 0 || s.backoff_initial_ms > s.backoff_max_ms {
                p.push((
                    at("backoff_initial_ms"),
                    "expected at least 1 and at most backoff_max_ms".into(),
                ));
            }
            if s.backoff_max_ms > 24 * 3600 * 1000 {
                p.push((at("backoff_max_ms"), "expected at most a day".into()));
            }
            if !(1..=10_000).contains(&s.max_in_flight) {
                p.push((at("max_in_flight"), "expected 1..=10000".into()));
            }
            if !(1..=600_000).contains(&s.timeout_ms) {
                p.push((at("timeout_ms"), "expected 1..=600000".into()));
            }
            if !matches!(s.start.as_str(), "new" | "earliest") {
                p.push((
                    at("start"),
                    format!("{:?}: expected \"new\" or \"earliest\"", s.start),
                ));
            }
        }
    }
}
