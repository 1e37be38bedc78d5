#![allow(clippy::unwrap_used)]
use std::path::Path;

use super::*;

fn errs(text: &str) -> Vec<SpecError> {
    parse(text, Path::new("g.toml")).unwrap_err().0
}

const OK: &str = r#"
[gateway]
listen = "127.0.0.1:9000"

[services.catalog]
command = ["python3", "catalog.py"]
version = "1.2.3"
replicas = 2
[services.catalog.health]
type = "http"
path = "/health"
[[services.catalog.routes]]
path_prefix = "/catalog/"
strip_prefix = true

[services.orders]
command = ["python3", "orders.py"]
depends_on = ["catalog"]
[[services.orders.routes]]
path_prefix = "/orders"
"#;

#[test]
fn parses_valid_spec_with_defaults() {
    let s = parse(OK, Path::new("g.toml")).unwrap();
    assert_eq!(s.gateway.listen.port(), 9000);
    assert_eq!(s.admin.listen.port(), 7070);
    let c = &s.services["catalog"];
    assert_eq!(c.replicas, 2);
    assert_eq!(c.health.kind, ProbeKind::Http);
    assert_eq!(c.restart, RestartPolicy::Always);
    assert_eq!(s.services["orders"].health.kind, ProbeKind::Tcp);
    let routes = s.routes();
    assert_eq!(routes.len(), 2);
    assert_eq!(routes[0].path_prefix, "/catalog");
    assert!(routes[0].strip_prefix);
    assert_eq!(routes[0].id, "catalog/0");
}

#[test]
fn unknown_field_names_path_and_line() {
    let e = errs("[services.a]\ncommand = [\"x\"]\nreplicaz = 2\n");
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].field, "services.a.replicaz");
    assert!(
        e[0].message.contains("unknown field `replicaz`"),
        "{}",
        e[0].message
    );
    assert_eq!(e[0].position.map(|p| p.0), Some(3));
    let shown = e[0].to_string();
    assert!(shown.starts_with("g.toml:3:"), "{shown}");
}

#[test]
fn bad_semver_is_named() {
    let e = errs("[services.a]\ncommand = [\"x\"]\nversion = \"1.x\"\n");
    assert_eq!(e[0].field, "services.a.version");
    assert!(e[0].message.contains("invalid semantic version"));
    assert_eq!(e[0].position, Some((3, 11)));
}

#[test]
fn missing_command_is_named() {
    let e = errs("[services.a]\nreplicas = 1\n");
    assert_eq!(e[0].field, "services.a");
    assert!(
        e[0].message.contains("missing field `command`"),
        "{}",
        e[0].message
    );
    let e = errs("[services.a]\ncommand = []\n");
    assert_eq!(e[0].field, "services.a.command");
}

#[test]
fn duplicate_route_is_named() {
    let text = r#"
[services.a]
command = ["x"]
[[services.a.routes]]
path_prefix = "/api"
[services.b]
command = ["y"]
[[services.b.routes]]
path_prefix = "/api/"
"#;
    let e = errs(text);
    assert_eq!(e.len(), 1);
    assert_eq!(e[0].field, "services.b.routes[0].path_prefix");
    assert!(
        e[0].message.contains("services.a.routes[0]"),
        "{}",
        e[0].message
    );
    assert_eq!(e[0].position.map(|p| p.0), Some(9));
}

#[test]
fn wrong_type_is_named() {
    let e = errs("[services.a]\ncommand = [\"x\"]\nreplicas = \"two\"\n");
    assert_eq!(e[0].field, "services.a.replicas");
    assert!(
        e[0].message.contains("expected u32") || e[0].message.contains("invalid type"),
        "{}",
        e[0].message
    );
}

#[test]
fn syntax_error_has_position() {
    let e = errs("[services.a\ncommand = 1\n");
    assert_eq!(e[0].position.map(|p| p.0), Some(1));
}

#[test]
fn semantic_checks() {
    let text = r#"
[services.a]
command = ["x"]
depends_on = ["b", "zzz"]
stop_signal = "SIGFOO"
env = { PORT = "1", "bad-name" = "2" }
[services.a.health]
type = "http"
[[services.a.routes]]
path_prefix = "/x/../y"
host = "bad host"
[services.b]
command = ["y"]
depends_on = ["a"]
replicas = 2
port = 9000
[services.Bad]
command = ["z"]
"#;
    let fields: Vec<String> = errs(text).into_iter().map(|e| e.field).collect();
    for want in [
        "services.a.depends_on[1]",
        "services.a.stop_signal",
        "services.a.env.PORT",
        "services.a.env.bad-name",
        "services.a.health.path",
        "services.a.routes[0].path_prefix",
        "services.a.routes[0].host",
        "services.b.port",
        "services.Bad",
        "services.a.depends_on",
    ] {
        assert!(
            fields.iter().any(|f| f == want),
            "missing {want} in {fields:?}"
        );
    }
}

#[test]
fn dependency_cycle_is_reported() {
    let text = "[services.a]\ncommand=[\"x\"]\ndepends_on=[\"b\"]\n[services.b]\ncommand=[\"x\"]\ndepends_on=[\"c\"]\n[services.c]\ncommand=[\"x\"]\ndepends_on=[\"a\"]\n";
    let e = errs(text);
    assert_eq!(e.len(), 1);
    assert!(
        e[0].message.contains("a -> b -> c -> a"),
        "{}",
        e[0].message
    );
}

#[test]
fn health_type_enum_is_checked() {
    let e = errs("[services.a]\ncommand=[\"x\"]\n[services.a.health]\ntype = \"grpc\"\n");
    assert_eq!(e[0].field, "services.a.health.type");
    assert!(e[0].message.contains("unknown variant"), "{}", e[0].message);
}
