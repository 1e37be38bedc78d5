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
    assert_eq!(
        routes[0].matcher.path,
        gantry_model::PathMatch::Prefix("/catalog".into())
    );
    match &routes[0].action {
        gantry_model::RouteAction::Forward(f) => {
            assert!(f.rewrite.strip_prefix);
            assert_eq!(f.timeouts.request_ms, 30_000);
            assert!(f.retry.on_connect_failure);
            assert_eq!(f.backends[0].service, "catalog");
        }
        other => panic!("{other:?}"),
    }
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
    assert_eq!(e[0].field, "services.a.command");
    assert!(
        e[0].message.contains("missing field `command`"),
        "{}",
        e[0].message
    );
    let e = errs("[services.a]\ncommand = []\n");
    assert_eq!(e[0].field, "services.a.command");
    let e = errs("[services.a]\nendpoints = [\"nope\"]\n");
    assert_eq!(e[0].field, "services.a.endpoints[0]");
    let e = errs("[services.a]\ncommand = [\"x\"]\nendpoints = [\"127.0.0.1:1\"]\n");
    assert_eq!(e[0].field, "services.a.endpoints");
    assert!(parse(
        "[services.a]\nendpoints = [\"127.0.0.1:9000\"]\n",
        Path::new("g")
    )
    .is_ok());
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

#[test]
fn rich_routes_parse_and_convert() {
    let text = r#"
[services.api]
command = ["x"]
version = "2.1.0"
[services.api.upstream]
load_balancer = "hash"
hash_on = "cookie:sid"
protocol = "h2c"
[[services.api.routes]]
hosts = ["API.example.com", "*.api.example.com"]
path_regex = "^/v[0-9]+/items$"
methods = ["get"]
headers = [{ name = "X-Canary", value = "1" }, { name = "x-debug" }]
query = [{ name = "beta", regex = "^(1|true)$" }]
split = [{ version = "^1", weight = 90 }, { version = "^2", weight = 10 }]
mirror = { version = "^2", percent = 5 }
rewrite_regex = { pattern = "^/v[0-9]+/(.*)", replacement = "/$1" }
request_headers = { set = { "x-from" = "gantry" }, remove = ["x-secret"] }
retries = { attempts = 3, on = ["connect-failure", "gateway-error"] }
rate_limit = { requests_per_second = 5, key = "header:x-api-key" }
cache = {}
[[services.api.routes]]
path = "/old"
redirect = { path = "/new", status = 301 }
"#;
    let s = parse(text, Path::new("g.toml")).unwrap();
    let m = s.gateway_model(Path::new("."));
    let r = &m.routes[0];
    assert_eq!(r.matcher.hosts, ["api.example.com", "*.api.example.com"]);
    assert_eq!(r.matcher.methods, ["GET"]);
    assert_eq!(r.matcher.headers[0].name, "x-canary");
    let gantry_model::RouteAction::Forward(f) = &r.action else {
        panic!()
    };
    assert_eq!(f.backends.len(), 2);
    assert_eq!(f.backends[1].weight, 10);
    assert_eq!(f.retry.on_statuses, [502, 503, 504]);
    let rl = f.rate_limit.as_ref().unwrap();
    assert_eq!(
        (rl.burst, &rl.key),
        (5, &gantry_model::RateLimitKey::Header("x-api-key".into()))
    );
    assert!(f.cache.is_some());
    assert!(matches!(
        m.routes[1].action,
        gantry_model::RouteAction::Redirect(_)
    ));
    let up = &m.upstreams["api"];
    assert_eq!(up.protocol, gantry_model::UpstreamProtocol::H2c);
    assert_eq!(
        up.load_balancer,
        gantry_model::LoadBalancer::Hash(gantry_model::HashOn::Cookie("sid".into()))
    );
}

#[test]
fn rich_route_errors_are_named() {
    let text = r#"
[services.api]
command = ["x"]
[services.api.upstream]
load_balancer = "hash"
[[services.api.routes]]
path_prefix = "/a"
path = "/b"
path_regex = "(unclosed"
hosts = ["ok.example.com", "bad host"]
split = [{ service = "nope", version = "banana", weight = 1 }]
retries = { on = ["sometimes"] }
rate_limit = { requests_per_second = 0, key = "cookie" }
redirect = { status = 200 }
"#;
    let fields: Vec<String> = errs(text).into_iter().map(|e| e.field).collect();
    for want in [
        "services.api.upstream.hash_on",
        "services.api.routes[0].path",
        "services.api.routes[0].path_regex",
        "services.api.routes[0].hosts[1]",
        "services.api.routes[0].split[0].service",
        "services.api.routes[0].split[0].version",
        "services.api.routes[0].retries.on[0]",
        "services.api.routes[0].rate_limit.requests_per_second",
        "services.api.routes[0].rate_limit.key",
        "services.api.routes[0].redirect.status",
    ] {
        assert!(
            fields.iter().any(|f| f == want),
            "missing {want} in {fields:?}"
        );
    }
}

#[test]
fn split_weights_must_not_wrap_the_total() {
    let text = |a: u64, b: u64| {
        format!(
            r#"
[services.api]
command = ["x"]
[[services.api.routes]]
split = [{{ version = "^1", weight = {a} }}, {{ version = "^2", weight = {b} }}]
"#
        )
    };
    let e = errs(&text(1, 4_294_967_295));
    assert!(
        e.iter()
            .any(|e| e.field == "services.api.routes[0].split" && e.message.contains("at most")),
        "{e:?}"
    );
    let fits = text(1, 4_294_967_294);
    assert!(parse(&fits, Path::new("g.toml")).is_ok());
}

#[test]
fn store_backend_and_its_options() {
    let s = parse(
        &format!("{OK}\n[store]\nbackend = \"nats\"\nurl = \"nats://10.0.0.1:4222,nats://10.0.0.2:4222\"\nreplicas = 3\nnamespace = \"prod-eu\"\n"),
        Path::new("g.toml"),
    )
    .unwrap();
    assert_eq!(s.store.backend, StoreBackend::Nats);
    assert_eq!(s.store.replicas, 3);
    assert_eq!(s.store.namespace, "prod-eu");
    let d = parse(OK, Path::new("g.toml")).unwrap();
    assert_eq!(d.store.backend, StoreBackend::Embedded);
    assert_eq!(d.store.url, "nats://127.0.0.1:4222");
    // Every problem is named, not only the first.
    let e = errs(&format!(
        "{OK}\n[store]\nurl = \"http://x\"\nreplicas = 2\nnamespace = \"Prod_EU\"\n"
    ));
    let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
    assert!(fields.contains(&"store.url"), "{e:?}");
    assert!(fields.contains(&"store.replicas"), "{e:?}");
    assert!(fields.contains(&"store.namespace"), "{e:?}");
    let e = errs(&format!("{OK}\n[store]\nbackend = \"etcd\"\n"));
    assert_eq!(e[0].field, "store.backend", "{e:?}");
    assert!(e[0].message.contains("nats"), "{e:?}");
}

#[test]
fn every_type_error_is_reported_not_only_the_first() {
    let e = errs(
        r#"
[services.web]
command = ["x"]
replicas = "two"
helth = { type = "http" }

[services.api]
command = ["y"]
stop_timeout_ms = -1
[[services.api.routes]]
path_prefix = 5
"#,
    );
    let fields: Vec<&str> = e.iter().map(|x| x.field.as_str()).collect();
    assert!(fields.contains(&"services.web.replicas"), "{e:?}");
    assert!(fields.contains(&"services.web.helth"), "{e:?}");
    assert!(fields.contains(&"services.api.stop_timeout_ms"), "{e:?}");
    assert!(
        fields.contains(&"services.api.routes[0].path_prefix"),
        "{e:?}"
    );
    // Each is placed at its line.
    let line_of = |f: &str| e.iter().find(|x| x.field == f).unwrap().position.unwrap().0;
    assert_eq!(line_of("services.web.replicas"), 4);
    assert_eq!(line_of("services.web.helth"), 5);
    assert_eq!(line_of("services.api.stop_timeout_ms"), 9);
}

#[test]
fn identity_settings_and_route_auth_are_checked() {
    let text = r#"
[identity]
algorithm = "HS256"
gateway_path = "/a"
service_policy = "maybe"
access_token_ttl_secs = 5
rotate_every_secs = 30
issuer = "not a url"
[[identity.issuers]]
name = "gantry"
issuer = "ftp://x"

[services.gantry-identity]
command = ["x"]

[services.api]
command = ["x"]
calls = ["nowhere"]
[[services.api.routes]]
path_prefix = "/a"
auth = "sometimes"
[[services.api.routes]]
path_prefix = "/b"
scopes = ["orders:read"]
[[services.api.routes]]
path_prefix = "/c"
auth = "required"
issuers = ["keycloak"]
scopes = ["two words"]
"#;
    let fields: Vec<String> = errs(text).into_iter().map(|e| e.field).collect();
    for want in [
        "identity.algorithm",
        "identity.service_policy",
        "identity.access_token_ttl_secs",
        "identity.rotate_every_secs",
        "identity.issuer",
        "identity.issuers[0].name",
        "identity.issuers[0].issuer",
        "services.api.calls[0]",
        "services.api.routes[0].auth",
        "services.api.routes[1].auth",
        "services.api.routes[2].issuers[0]",
        "services.api.routes[2].scopes[0]",
        "services.api.routes[0].path_prefix",
        "services.gantry-identity",
    ] {
        assert!(
            fields.iter().any(|f| f == want),
            "missing {want} in {fields:?}"
        );
    }
    // The same checks for a route added over the API.
    let spec = parse(OK, Path::new("g.toml")).unwrap();
    let r: RouteSpec = toml::from_str("path_prefix = \"/x\"\nauth = \"bogus\"").unwrap();
    let problems = check_route(&spec, "catalog", &r);
    assert!(
        problems.iter().any(|p| p.starts_with("auth:")),
        "{problems:?}"
    );
}

#[test]
fn route_auth_reaches_the_model() {
    let text = format!(
        "{OK}\n[[services.orders.routes]]\npath_prefix = \"/secure\"\nauth = \"required\"\npublic = true\nscopes = [\"a\"]\nclaims = {{ tenant = \"acme\" }}\nrate_limit = {{ requests_per_second = 5, key = \"subject\" }}\n"
    );
    let s = parse(&text, Path::new("g.toml")).unwrap();
    let r = s.services["orders"].routes[1].to_model("orders", 1);
    let gantry_model::RouteAction::Forward(f) = r.action else {
        panic!("a forwarding route")
    };
    assert_eq!(f.auth.mode, gantry_model::AuthMode::Required);
    assert!(f.auth.public);
    assert_eq!(f.auth.scopes, ["a"]);
    assert_eq!(f.auth.claims["tenant"], "acme");
    assert_eq!(
        f.rate_limit.unwrap().key,
        gantry_model::RateLimitKey::Subject
    );
}

#[test]
fn bus_topics_and_subscriptions() {
    let ok = format!(
        "{OK}\n[bus.topics.orders]\nmax_age = \"7d\"\nmax_messages = 1000\n\
         [[services.catalog.subscribe]]\ntopic = \"orders\"\npath = \"/events/orders\"\n"
    );
    let s = parse(&ok, Path::new("g.toml")).unwrap();
    let t = &s.bus.topics["orders"];
    assert_eq!(t.max_age.as_deref(), Some("7d"));
    assert_eq!(
        (t.max_message_bytes, t.dedup_window.as_str()),
        (1 << 20, "2m")
    );
    let sub = &s.services["catalog"].subscribe[0];
    assert_eq!(
        (sub.max_attempts, sub.max_in_flight, sub.ordered),
        (5, 64, true)
    );
    assert_eq!(sub.start, "new");
    // Every problem, named by its field.
    let e = errs(&format!(
        "{OK}\n[bus.topics.Orders]\nmax_age = \"a week\"\ndedup_window = \"2y\"\n\
         [[services.catalog.subscribe]]\ntopic = \"payments\"\npath = \"events\"\nmax_attempts = 0\n\
         start = \"latest\"\n"
    ));
    let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
    for f in [
        "bus.topics.Orders",
        "bus.topics.Orders.max_age",
        "bus.topics.Orders.dedup_window",
        "services.catalog.subscribe[0].topic",
        "services.catalog.subscribe[0].path",
        "services.catalog.subscribe[0].max_attempts",
        "services.catalog.subscribe[0].start",
    ] {
        assert!(fields.contains(&f), "{f}: {e:?}");
    }
    let e = errs(&format!("{OK}\n[bus.topics.orders]\nretention = 5\n"));
    assert!(e[0].message.contains("unknown field"), "{e:?}");
}

#[test]
fn the_bus_gateway_path_is_checked_and_routed() {
    for (path, ok) in [
        ("/_gantry/topics", true),
        ("/events/", true),
        ("", true),
        ("/", false),
        ("topics", false),
        ("/a/../b", false),
        ("/a?b", false),
    ] {
        let text = format!("[bus]\ngateway_path = {path:?}\n[services.api]\ncommand = [\"x\"]\n");
        let r = parse(&text, Path::new("g.toml"));
        assert_eq!(r.is_ok(), ok, "{path:?}: {:?}", r.err());
    }
    // A service's route that could take the bus's requests, or a service of Gantry's own
    // name, is refused.
    let text = r#"
[services.gantry-bus]
command = ["x"]
[services.api]
command = ["x"]
[[services.api.routes]]
path_prefix = "/_gantry/topics/"
[[services.api.routes]]
path_prefix = "/_gantry/topics/orders"
[[services.api.routes]]
path = "/_gantry/topics/orders/messages"
[[services.api.routes]]
path_regex = "^/_gantry/.*"
[[services.api.routes]]
hosts = ["127.0.0.1"]
path_prefix = "/"
[[services.api.routes]]
path_prefix = "/_gantry"
[[services.api.routes]]
path_prefix = "/_gantry/topicsx"
[[services.api.routes]]
path_regex = "^/_gantry/topics/payments/.*"
"#;
    let fields: Vec<String> = errs(text).into_iter().map(|e| e.field).collect();
    assert!(
        fields.contains(&"services.gantry-bus".to_string()),
        "{fields:?}"
    );
    for f in [
        "services.api.routes[0].path_prefix",
        "services.api.routes[1].path_prefix",
        "services.api.routes[2].path",
        "services.api.routes[3].path_regex",
        "services.api.routes[7].path_regex",
    ] {
        assert!(fields.contains(&f.to_string()), "{f}: {fields:?}");
    }
    // A shorter prefix, a sibling path, or (in the spec) a catch-all for the local host.
    assert!(
        !fields
            .iter()
            .any(|f| f.starts_with("services.api.routes[4]")
                || f.starts_with("services.api.routes[5]")
                || f.starts_with("services.api.routes[6]")),
        "{fields:?}"
    );
    // Over the API, the local host's catch-all is refused: its author is not the spec's.
    let ok = parse("[services.api]\ncommand = [\"x\"]\n", Path::new("g.toml")).unwrap();
    let local: RouteSpec =
        toml::from_str("hosts = [\"127.0.0.1\"]\npath_prefix = \"/\"\n").unwrap();
    let problems = check_route(&ok, "api", &local);
    assert!(
        problems.iter().any(|p| p.starts_with("path_prefix:")),
        "{problems:?}"
    );
    let elsewhere: RouteSpec =
        toml::from_str("hosts = [\"api.example.com\"]\npath_prefix = \"/\"\n").unwrap();
    assert!(check_route(&ok, "api", &elsewhere).is_empty());

    // The route: the admin API's /v1/topics, credentials passed on; none when turned off.
    let spec: Spec = toml::from_str("").unwrap();
    let model = spec.gateway_model(std::path::Path::new("."));
    let bus = model.routes.iter().find(|r| r.id == "bus/0").unwrap();
    assert_eq!(bus.service, BUS_SERVICE);
    let gantry_model::RouteAction::Forward(f) = &bus.action else {
        panic!("{bus:?}")
    };
    assert!(f.auth.pass_credentials && f.auth.public);
    assert!(model.upstreams.contains_key(BUS_SERVICE));
    let off: Spec = toml::from_str("[bus]\ngateway_path = \"\"\n").unwrap();
    let model = off.gateway_model(std::path::Path::new("."));
    assert!(model.routes.iter().all(|r| r.id != "bus/0"));
}
