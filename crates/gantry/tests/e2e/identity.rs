//! Identity end to end: the token service with real clients, route authentication at the
//! gateway against a JWT attack suite forged by PyJWT, workload identity and the deny policy,
//! key rotation under load, admin principals and the audit trail.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::common::*;

const T: Duration = Duration::from_secs(15);

impl Gantry {
    fn identity_addr(&self) -> SocketAddr {
        let info: Value =
            serde_json::from_slice(&std::fs::read(self.data_dir().join("admin.json")).unwrap())
                .unwrap();
        info["identity_url"]
            .as_str()
            .unwrap()
            .trim_start_matches("http://")
            .parse()
            .unwrap()
    }

    /// A form POST to the token service.
    fn oauth(&self, path: &str, form: &str, basic: Option<(&str, &str)>) -> Resp {
        let auth = basic.map(|(u, p)| format!("Basic {}", STANDARD.encode(format!("{u}:{p}"))));
        let mut h = vec![("content-type", "application/x-www-form-urlencoded")];
        if let Some(a) = &auth {
            h.push(("authorization", a));
        }
        http(self.identity_addr(), "POST", path, &h, Some(form), T).unwrap()
    }

    /// Register a client over the admin API; returns its secret (confidential ones).
    fn new_client(&self, body: Value) -> Option<String> {
        let r = self.admin_call("POST", "/v1/identity/clients", Some(&body));
        assert_eq!(r.status, 201, "{}", r.body);
        r.json()["secret"].as_str().map(str::to_string)
    }

    fn client_token(&self, id: &str, secret: &str, scope: &str) -> String {
        let r = self.oauth(
            "/oauth2/token",
            &format!("grant_type=client_credentials&scope={scope}"),
            Some((id, secret)),
        );
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["access_token"].as_str().unwrap().to_string()
    }
}

fn bearer(g: &Gantry, path: &str, token: &str) -> Resp {
    let a = format!("Bearer {token}");
    http(g.gateway, "GET", path, &[("authorization", &a)], None, T).unwrap()
}

const PROTECTED: &str = r#"
[services.api]
command = ["{TESTSVC}"]
health = { type = "http", path = "/health" }
[[services.api.routes]]
path_prefix = "/api"
strip_prefix = true
auth = "required"
scopes = ["orders:read"]
[[services.api.routes]]
path_prefix = "/maybe"
auth = "optional"
[[services.api.routes]]
path_prefix = "/admin-only"
auth = "required"
roles = ["admin"]
"#;

#[test]
fn routes_require_valid_tokens_with_their_scopes_and_identity_reaches_the_instance() {
    let g = Gantry::start(PROTECTED);
    g.wait_healthy("api", 1, T);
    // No credentials: 401 with a challenge and a reason.
    let r = g.get("/api/x");
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"gantry\"")
    );
    assert_eq!(r.json()["error"], "missing_credentials");
    // An optional route serves anonymous callers; garbage is still refused.
    assert_eq!(g.get("/maybe/x").status, 200);
    assert_eq!(bearer(&g, "/maybe/x", "garbage").status, 401);

    let secret = g
        .new_client(
            json!({"id": "reporter", "kind": "confidential", "scopes": ["orders:read", "other"]}),
        )
        .unwrap();
    let good = g.client_token("reporter", &secret, "orders:read");
    // The client cannot forge the identity headers: its copies are removed.
    let a = format!("Bearer {good}");
    let r = http(
        g.gateway,
        "GET",
        "/api/who",
        &[
            ("authorization", &a),
            ("gantry-auth-subject", "root"),
            ("gantry-auth-service", "billing"),
        ],
        None,
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = &r.json()["headers"];
    assert_eq!(seen["gantry-auth-subject"], "reporter", "{seen}");
    assert_eq!(seen["gantry-auth-kind"], "client");
    assert_eq!(seen["gantry-auth-scopes"], "orders:read");
    assert!(seen.get("gantry-auth-service").is_none(), "{seen}");

    // A token without the scope: 403, naming it.
    let other = g.client_token("reporter", &secret, "other");
    let r = bearer(&g, "/api/x", &other);
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.json()["error"], "insufficient_scope");
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("scope=\"orders:read\""));
    // No role: 403.
    assert_eq!(
        bearer(&g, "/admin-only/x", &good).json()["error"],
        "missing_role"
    );

    // Revoked (RFC 7009): refused at once; introspection (RFC 7662) says inactive.
    let intro = |t: &str| {
        g.oauth(
            "/oauth2/introspect",
            &format!("token={t}"),
            Some(("reporter", &secret)),
        )
        .json()
    };
    assert_eq!(intro(&good)["active"], true);
    assert_eq!(intro(&good)["client_id"], "reporter");
    let r = g.oauth(
        "/oauth2/revoke",
        &format!("token={good}"),
        Some(("reporter", &secret)),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for("the revocation to reach the gateway", T, || {
        (bearer(&g, "/api/x", &good).status == 401).then_some(())
    });
    assert_eq!(bearer(&g, "/api/x", &good).json()["error"], "revoked");
    assert_eq!(intro(&good)["active"], false);

    // API keys: hashed at rest, shown once, accepted by the gateway.
    let r = g.admin_call(
        "POST",
        "/v1/identity/api-keys",
        Some(&json!({"client_id": "reporter", "scopes": ["orders:read"]})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let key = r.json()["key"].as_str().unwrap().to_string();
    let r = http(g.gateway, "GET", "/api/x", &[("x-api-key", &key)], None, T).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let listed = g.admin_get("/v1/identity/api-keys").to_string();
    assert!(
        !listed.contains(&key) && !listed.contains("sha256"),
        "{listed}"
    );
    assert!(!g
        .admin_get("/v1/identity/clients")
        .to_string()
        .contains("secret"));
    let bad = http(
        g.gateway,
        "GET",
        "/api/x",
        &[("x-api-key", "gk_nope")],
        None,
        T,
    )
    .unwrap();
    assert_eq!(bad.json()["error"], "invalid_api_key");

    // Refusals are counted by reason.
    let m = g.metrics();
    for reason in [
        "missing_credentials",
        "insufficient_scope",
        "revoked",
        "invalid_api_key",
    ] {
        assert!(
            m.contains(&format!(
                "gantry_gateway_auth_denied_total{{reason=\"{reason}\"}}"
            )),
            "{reason} not counted"
        );
    }
}

#[test]
fn forged_tokens_are_refused_each_with_its_reason() {
    // The partner serves its keys over https, with a certificate of its own CA.
    let certs = tempfile::tempdir().unwrap();
    ca_and_leaf(certs.path(), "localhost");
    let mut attacker = Command::new("python3")
        .arg(fixture("jwt_attacks.py"))
        .arg("--tls")
        .arg(certs.path().join("leaf.pem"))
        .arg(certs.path().join("leaf.key"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(attacker.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let idp: Value = serde_json::from_str(&line)
        .unwrap_or_else(|e| panic!("jwt_attacks.py did not start ({e}): {line}"));
    let g = Gantry::start(&format!(
        r#"
[identity]
listen = "127.0.0.1:0"
[[identity.issuers]]
name = "partner"
issuer = "{}"
jwks_uri = "{}"
ca_file = "{}"

[services.api]
command = ["{{TESTSVC}}"]
health = {{ type = "http", path = "/health" }}
[[services.api.routes]]
path_prefix = "/api"
auth = "required"
issuers = ["partner"]
audiences = ["shop"]
"#,
        idp["issuer"].as_str().unwrap(),
        idp["jwks_uri"].as_str().unwrap(),
        certs.path().join("ca.pem").display()
    ));
    g.wait_healthy("api", 1, T);
    // Until the partner's keys are fetched, its tokens name an unknown key.
    wait_for("the partner's keys", T, || {
        g.metrics()
            .contains("gantry_identity_jwks_fetches_total{grant=\"external\",result=\"ok\"}")
            .then_some(())
    });
    let mut stdin = attacker.stdin.take().unwrap();
    writeln!(stdin, "http://{}/api/x", g.gateway).unwrap();
    drop(stdin);
    let mut results = Vec::new();
    for l in out.lines() {
        results.push(serde_json::from_str::<Value>(&l.unwrap()).unwrap());
    }
    let st = attacker.wait().unwrap();
    assert!(st.success(), "jwt_attacks.py failed");
    let expect = [
        ("valid", 200, None),
        ("alg_none", 401, Some("algorithm_not_allowed")),
        ("hs256_with_public_key", 401, Some("algorithm_not_allowed")),
        ("unknown_kid", 401, Some("unknown_key")),
        ("wrong_key_same_kid", 401, Some("bad_signature")),
        ("expired", 401, Some("expired")),
        ("not_yet_valid", 401, Some("not_yet_valid")),
        ("wrong_issuer", 401, Some("untrusted_issuer")),
        ("wrong_audience", 401, Some("wrong_audience")),
        ("tampered_payload", 401, Some("bad_signature")),
        ("truncated", 401, Some("malformed_token")),
        ("oversized", 401, Some("token_too_large")),
        ("crit_header", 401, Some("critical_header")),
        ("embedded_jwk", 401, Some("embedded_key")),
        ("jku_header", 401, Some("embedded_key")),
        ("x5u_header", 401, Some("embedded_key")),
    ];
    assert_eq!(results.len(), expect.len(), "{results:?}");
    for (r, (name, status, error)) in results.iter().zip(expect) {
        assert_eq!(r["name"], name);
        assert_eq!(r["status"], status, "{name}: {r}");
        if let Some(e) = error {
            assert_eq!(r["error"], e, "{name}: {r}");
            assert!(
                r["www_authenticate"]
                    .as_str()
                    .unwrap()
                    .starts_with("Bearer"),
                "{name}: {r}"
            );
        }
    }
    // A token of Gantry's own issuer is not one of the partner's.
    let secret = g
        .new_client(json!({"id": "own", "kind": "confidential"}))
        .unwrap();
    let own = g.client_token("own", &secret, "");
    assert_eq!(bearer(&g, "/api/x", &own).json()["error"], "wrong_issuer");
}

#[test]
fn refresh_tokens_rotate_and_a_reused_one_revokes_its_family() {
    let g = Gantry::start(PROTECTED);
    g.wait_healthy("api", 1, T);
    let u = g.admin_call(
        "POST",
        "/v1/identity/users",
        Some(&json!({"username": "alice", "password": "correct horse", "roles": ["viewer"]})),
    );
    assert_eq!(u.status, 201, "{}", u.body);
    assert!(!u.body.contains("correct horse") && !u.body.contains("argon2"));
    g.new_client(json!({"id": "spa", "kind": "public", "grant_types": ["password", "refresh_token"], "scopes": ["orders:read"]}));
    let login = |pw: &str| {
        g.oauth(
            "/oauth2/token",
            &format!(
                "grant_type=password&client_id=spa&username=alice&password={pw}&scope=orders:read"
            ),
            None,
        )
    };
    let bad = login("wrong");
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["error"], "invalid_grant");
    assert!(!bad.body.contains("wrong"));
    let t1 = login("correct+horse");
    assert_eq!(t1.status, 200, "{}", t1.body);
    assert_eq!(t1.header("cache-control"), Some("no-store"));
    let t1 = t1.json();
    let access1 = t1["access_token"].as_str().unwrap().to_string();
    assert_eq!(bearer(&g, "/api/x", &access1).status, 200);
    let r1 = t1["refresh_token"].as_str().unwrap().to_string();
    let refresh = |r: &str| {
        g.oauth(
            "/oauth2/token",
            &format!("grant_type=refresh_token&client_id=spa&refresh_token={r}"),
            None,
        )
    };
    let t2 = refresh(&r1);
    assert_eq!(t2.status, 200, "{}", t2.body);
    let t2 = t2.json();
    let (r2, access2) = (
        t2["refresh_token"].as_str().unwrap().to_string(),
        t2["access_token"].as_str().unwrap().to_string(),
    );
    assert_ne!(r1, r2);
    // The old refresh token again: reuse. The whole family goes, access tokens included.
    let reuse = refresh(&r1);
    assert_eq!(reuse.status, 400);
    assert!(reuse.body.contains("revoked"), "{}", reuse.body);
    assert_eq!(refresh(&r2).status, 400);
    wait_for(
        "the family's access tokens revoked at the gateway",
        T,
        || {
            (bearer(&g, "/api/x", &access2).status == 401
                && bearer(&g, "/api/x", &access1).status == 401)
                .then_some(())
        },
    );
    // Password attempts are limited per user.
    let statuses: Vec<u16> = (0..12).map(|_| login("wrong").status).collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(g
        .metrics()
        .contains("gantry_identity_refresh_token_reuse_total 1"));
}

#[test]
fn a_viewer_reads_and_cannot_change_and_every_change_is_audited() {
    let g = Gantry::start(PROTECTED);
    g.wait_healthy("api", 1, T);
    g.admin_call(
        "POST",
        "/v1/identity/users",
        Some(&json!({"username": "vera", "password": "viewer-pass", "roles": ["viewer"]})),
    );
    // A user's token from another application is not for the admin API.
    g.new_client(json!({"id": "someapp", "kind": "public", "grant_types": ["password"]}));
    let other = g.oauth(
        "/oauth2/token",
        "grant_type=password&client_id=someapp&username=vera&password=viewer-pass",
        None,
    );
    let other = other.json()["access_token"].as_str().unwrap().to_string();
    let r = http(
        g.admin,
        "GET",
        "/v1/services",
        &[("authorization", &format!("Bearer {other}"))],
        None,
        T,
    )
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    let t = g.oauth(
        "/oauth2/token",
        "grant_type=password&client_id=gantry-cli&username=vera&password=viewer-pass",
        None,
    );
    assert_eq!(t.status, 200, "{}", t.body);
    let token = t.json()["access_token"].as_str().unwrap().to_string();
    let a = format!("Bearer {token}");
    let call = |m: &str, p: &str, body: Option<&str>| {
        http(
            g.admin,
            m,
            p,
            &[("authorization", &a), ("content-type", "application/json")],
            body,
            T,
        )
        .unwrap()
    };
    assert_eq!(call("GET", "/v1/services", None).status, 200);
    let r = call("POST", "/v1/services/api/scale", Some(r#"{"replicas":2}"#));
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.body.contains("user:vera") && r.body.contains("services:write"),
        "{}",
        r.body
    );
    assert_eq!(call("GET", "/v1/identity/users", None).status, 200);
    assert_eq!(call("POST", "/v1/identity/keys/rotate", None).status, 403);
    let audit = g.admin_get("/v1/audit?limit=50").to_string();
    assert!(audit.contains("\"principal\":\"user:vera\""), "{audit}");
    assert!(audit.contains("/v1/services/api/scale"), "{audit}");
    assert!(audit.contains("/v1/identity/users"), "{audit}");
    // Secrets never reach the trail.
    assert!(!audit.contains("viewer-pass"));
}

#[test]
fn services_reach_only_what_they_may_call_under_deny() {
    let g = Gantry::start(
        r#"
[identity]
listen = "127.0.0.1:0"
service_policy = "deny"
workload_token_ttl_secs = 30

[services.orders]
command = ["{TESTSVC}"]
calls = ["catalog"]
health = { type = "http", path = "/health" }
[[services.orders.routes]]
path_prefix = "/orders"
strip_prefix = true
public = true

[services.catalog]
command = ["{TESTSVC}"]
health = { type = "http", path = "/health" }
[[services.catalog.routes]]
path_prefix = "/catalog"
strip_prefix = true

[services.billing]
command = ["{TESTSVC}"]
health = { type = "http", path = "/health" }
[[services.billing.routes]]
path_prefix = "/billing"
strip_prefix = true
"#,
    );
    for s in ["orders", "catalog", "billing"] {
        g.wait_healthy(s, 1, T);
    }
    let call = |from: &str, path: &str, extra: &str| -> Value {
        let r = g.get(&format!("/{from}/call?path={path}{extra}"));
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()
    };
    // Outside traffic reaches the public route only.
    assert_eq!(g.get("/orders/x").status, 200);
    let r = g.get("/catalog/x");
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "not_public");
    // orders may call catalog; its identity arrives with the call.
    let ok = call("orders", "/catalog/who", "");
    assert_eq!(ok["status"], 200, "{ok}");
    let inner: Value = serde_json::from_str(ok["body"].as_str().unwrap()).unwrap();
    assert_eq!(inner["headers"]["gantry-auth-service"], "orders");
    // orders may not call billing: 403, and an audit entry.
    let no = call("orders", "/billing/x", "");
    assert_eq!(no["status"], 403, "{no}");
    assert!(no["body"].as_str().unwrap().contains("call_not_allowed"));
    // Without its credential, or with a forged identity header, it is outside traffic.
    assert_eq!(call("orders", "/catalog/x", "&token=none")["status"], 403);
    assert_eq!(
        call("orders", "/billing/x", "&token=none&forge=billing")["status"],
        403
    );
    wait_for("the refused call in the audit trail", T, || {
        let a = g.admin_get("/v1/audit?principal=service:orders");
        a.as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"].as_str().unwrap().starts_with("call:billing"))
            .then_some(())
    });

    // The credential: a 0600 file, kept fresh, naming service, version and instance.
    let inst = &g.instances("orders")[0];
    let id = inst["id"].as_str().unwrap();
    let file = g
        .data_dir()
        .join("instances")
        .join(id)
        .join("identity/token");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let first = std::fs::read_to_string(&file).unwrap();
    let intro_secret = g
        .new_client(json!({"id": "introspector", "kind": "confidential"}))
        .unwrap();
    let v = g
        .oauth(
            "/oauth2/introspect",
            &format!("token={first}"),
            Some(("introspector", &intro_secret)),
        )
        .json();
    assert_eq!(v["active"], true, "{v}");
    assert_eq!(v["gantry_service"], "orders");
    assert_eq!(v["gantry_instance"], id);
    let started = Instant::now();
    wait_for(
        "the token file renewed at half-life",
        Duration::from_secs(30),
        || {
            let now = std::fs::read_to_string(&file).ok()?;
            (now != first && !now.is_empty()).then_some(())
        },
    );
    assert!(started.elapsed() < Duration::from_secs(25));
    assert_eq!(call("orders", "/catalog/x", "")["status"], 200);
}

#[test]
fn signing_keys_rotate_under_load_without_one_rejected_token() {
    // A scheduled rotation (every 12 s: a key is published 1 s before it signs), then three
    // forced ones, while tokens signed with every key are in use.
    let g = Gantry::start(&format!(
        "[identity]\nlisten = \"127.0.0.1:0\"\nkey_propagation_secs = 1\naccess_token_ttl_secs = 10\nrotate_every_secs = 12\n{PROTECTED}"
    ));
    g.wait_healthy("api", 1, T);
    let secret = g
        .new_client(json!({"id": "load", "kind": "confidential", "scopes": ["orders:read"]}))
        .unwrap();
    // The first token of each key (by its header, which names the key), kept in use.
    let mut firsts: std::collections::BTreeMap<String, String> = Default::default();
    let (mut ok, mut refused) = (0, Vec::new());
    let start = Instant::now();
    let mut forced = 0;
    while start.elapsed() < Duration::from_secs(20) {
        if start.elapsed() > Duration::from_secs(14 + 2 * forced) && forced < 3 {
            let r = g.admin_call("POST", "/v1/identity/keys/rotate", None);
            assert_eq!(r.status, 201, "{}", r.body);
            forced += 1;
        }
        let t = g.client_token("load", &secret, "orders:read");
        firsts
            .entry(t.split('.').next().unwrap().to_string())
            .or_insert_with(|| t.clone());
        for t in std::iter::once(&t).chain(firsts.values()) {
            let r = bearer(&g, "/api/x", t);
            if r.status == 200 {
                ok += 1;
            } else {
                refused.push(r.body);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(forced, 3);
    assert!(
        firsts.len() >= 5,
        "tokens were signed with {} keys (expected the first, the scheduled one and 3 forced)",
        firsts.len()
    );
    assert!(
        refused.is_empty(),
        "{} of {} refused: {:?}",
        refused.len(),
        ok + refused.len(),
        &refused[..refused.len().min(3)]
    );
    let keys = g.admin_get("/v1/identity/keys");
    assert_eq!(keys.as_array().unwrap().len(), 5, "{keys}");
    assert!(!keys.to_string().contains("private"));
}

/// Where scripts/test installed the npm clients (openid-client, jose, oidc-provider).
fn node_dir() -> std::path::PathBuf {
    let d = std::env::var_os("GANTRY_TEST_NODE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/e2e-node")
        });
    assert!(
        d.join("node_modules/openid-client").is_dir(),
        "the npm test clients are not installed in {} (scripts/test installs them)",
        d.display()
    );
    d
}

/// Run a fixture script with node, from the directory the npm clients are installed in.
fn node(script: &str, args: &[&str]) -> Value {
    let dir = node_dir();
    let copy = dir.join(script);
    std::fs::copy(fixture(script), &copy).unwrap();
    let out = Command::new("node")
        .arg(&copy)
        .args(args)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{script}: not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn openid_client_and_jose_discover_obtain_and_verify_tokens() {
    let g = Gantry::start(PROTECTED);
    g.wait_healthy("api", 1, T);
    let issuer = format!("http://{}", g.identity_addr());
    let secret = g
        .new_client(json!({"id": "backend", "kind": "confidential", "scopes": ["orders:read"]}))
        .unwrap();
    let redirect = "http://app.example.test/callback";
    g.new_client(json!({"id": "webapp", "kind": "public", "grant_types": ["authorization_code", "refresh_token"],
        "redirect_uris": [redirect], "scopes": ["orders:read"]}));
    let u = g.admin_call(
        "POST",
        "/v1/identity/users",
        Some(&json!({"username": "olga", "password": "s3cret-pass", "roles": ["viewer"]})),
    );
    assert_eq!(u.status, 201, "{}", u.body);
    let v = node(
        "oidc_client.mjs",
        &[
            &issuer,
            "backend",
            &secret,
            "webapp",
            "olga",
            "s3cret-pass",
            redirect,
        ],
    );
    assert_eq!(v["discovered"]["issuer"], issuer.as_str(), "{v}");
    assert_eq!(v["discovered"]["pkce"], json!(["S256"]));
    let cc = &v["client_credentials"];
    assert_eq!(
        (cc["alg"].as_str(), cc["typ"].as_str()),
        (Some("EdDSA"), Some("at+jwt")),
        "{v}"
    );
    assert_eq!(cc["sub"], "backend");
    assert_eq!(cc["scope"], "orders:read");
    let ac = &v["authorization_code"];
    assert_eq!(ac["access"]["sub"], "olga", "{v}");
    assert_eq!(ac["access"]["client_id"], "webapp");
    assert_eq!(ac["id_token"]["aud"], "webapp");
    assert_eq!(ac["claims"]["sub"], "olga");
    assert_eq!(ac["has_refresh"], true);
    assert_eq!(v["wrong_verifier"], "invalid_grant", "{v}");
    assert_eq!(v["refresh"]["access"]["sub"], "olga");
    assert_eq!(v["refresh"]["rotated"], true);
    // The token openid-client obtained works at the gateway.
    let r = g.oauth(
        "/oauth2/token",
        "grant_type=client_credentials&scope=orders:read",
        Some(("backend", &secret)),
    );
    assert_eq!(
        bearer(&g, "/api/x", r.json()["access_token"].as_str().unwrap()).status,
        200
    );
}

#[test]
fn browser_sessions_become_short_lived_tokens_upstream_and_end_everywhere_at_logout() {
    let g = Gantry::start(
        r#"
[services.app]
command = ["{TESTSVC}"]
health = { type = "http", path = "/health" }
[[services.app.routes]]
path_prefix = "/app"
auth = "required"
roles = ["viewer"]
"#,
    );
    g.wait_healthy("app", 1, T);
    g.admin_call(
        "POST",
        "/v1/identity/users",
        Some(&json!({"username": "bea", "password": "browser-pass", "roles": ["viewer"]})),
    );
    let form = "application/x-www-form-urlencoded";
    let login = |body: &str| {
        http(
            g.identity_addr(),
            "POST",
            "/session/login",
            &[("content-type", form)],
            Some(body),
            T,
        )
        .unwrap()
    };
    assert_eq!(login("username=bea&password=wrong").status, 401);
    // A form posted from another site is refused (login CSRF).
    let r = http(
        g.identity_addr(),
        "POST",
        "/session/login",
        &[("content-type", form), ("origin", "https://evil.example")],
        Some("username=bea&password=browser-pass"),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.header("set-cookie").is_none());
    // An open redirect is not offered: return_to must be a path on this site.
    let r = login("username=bea&password=browser-pass&return_to=//evil.example/x");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = login("username=bea&password=browser-pass&return_to=/app/home");
    assert_eq!(r.status, 303, "{}", r.body);
    assert_eq!(r.header("location"), Some("/app/home"));
    let set = r.header("set-cookie").unwrap().to_string();
    for attr in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/"] {
        assert!(set.contains(attr), "{set}");
    }
    let session = set.split(';').next().unwrap().to_string();
    assert!(session.starts_with("gantry_session="), "{set}");
    let cookie = format!("theme=dark; {session}; lang=en");
    let get = |c: &str| http(g.gateway, "GET", "/app/me", &[("cookie", c)], None, T).unwrap();
    let r = get(&cookie);
    assert_eq!(r.status, 200, "{}", r.body);
    let seen = &r.json()["headers"];
    assert_eq!(seen["gantry-auth-subject"], "bea", "{seen}");
    // The instance gets a bearer token, never the browser's session id.
    let auth = seen["authorization"].as_str().unwrap();
    assert!(auth.starts_with("Bearer ey"), "{seen}");
    assert_eq!(seen["cookie"], "theme=dark; lang=en", "{seen}");
    // That token is a valid, short-lived token of the issuer.
    let token = auth.trim_start_matches("Bearer ");
    assert_eq!(bearer(&g, "/app/x", token).status, 200);
    let payload: Value = {
        let p = token.split('.').nth(1).unwrap();
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).unwrap()).unwrap()
    };
    let ttl = payload["exp"].as_u64().unwrap() - payload["iat"].as_u64().unwrap();
    assert!(ttl <= 300, "session tokens are short-lived: {ttl} s");
    // Logout ends it on the gateway at once.
    let out = http(
        g.identity_addr(),
        "POST",
        "/session/logout",
        &[("cookie", &cookie)],
        Some(""),
        T,
    )
    .unwrap();
    assert_eq!(out.status, 200, "{}", out.body);
    assert!(out.header("set-cookie").unwrap().contains("Max-Age=0"));
    wait_for("the session gone at the gateway", T, || {
        (get(&cookie).status == 401).then_some(())
    });
    assert_eq!(get(&cookie).json()["error"], "invalid_session");
}

#[test]
fn a_route_trusts_an_external_provider_and_survives_its_key_rotation() {
    let dir = node_dir();
    let script = dir.join("oidc_provider.mjs");
    std::fs::copy(fixture("oidc_provider.mjs"), &script).unwrap();
    let mut idp = Command::new("node")
        .arg(&script)
        .current_dir(&dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut to_idp = idp.stdin.take().unwrap();
    let mut from_idp = BufReader::new(idp.stdout.take().unwrap());
    // One answer line per command (oidc-provider's own notices are skipped).
    let mut read = move || loop {
        let mut l = String::new();
        assert!(
            from_idp.read_line(&mut l).unwrap() > 0,
            "oidc-provider exited"
        );
        if !l.starts_with("oidc-provider") {
            return l.trim().to_string();
        }
    };
    let issuer: Value = serde_json::from_str(&read()).unwrap();
    let issuer = issuer["issuer"].as_str().unwrap().to_string();
    let g = Gantry::start(&format!(
        r#"
[identity]
listen = "127.0.0.1:0"
[[identity.issuers]]
name = "partner"
issuer = "{issuer}"

[services.api]
command = ["{{TESTSVC}}"]
health = {{ type = "http", path = "/health" }}
[[services.api.routes]]
path_prefix = "/api"
auth = "required"
issuers = ["partner"]
audiences = ["urn:shop"]
scopes = ["orders:read"]
"#
    ));
    g.wait_healthy("api", 1, T);
    wait_for(
        "the partner's keys (through its discovery document)",
        T,
        || {
            g.metrics()
                .contains("gantry_identity_jwks_fetches_total{grant=\"external\",result=\"ok\"}")
                .then_some(())
        },
    );
    let mut cmd = |c: &str| {
        writeln!(to_idp, "{c}").unwrap();
        read()
    };
    let t1 = cmd("token");
    let r = bearer(&g, "/api/x", &t1);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["headers"]["gantry-auth-client"], "machine");
    // Other tokens are refused: tampered, or Gantry's own (not this route's issuer).
    let mut parts: Vec<String> = t1.split('.').map(str::to_string).collect();
    parts[1] = parts[1].chars().rev().collect();
    assert_eq!(bearer(&g, "/api/x", &parts.join(".")).status, 401);
    let own_secret = g
        .new_client(json!({"id": "own", "kind": "confidential"}))
        .unwrap();
    let own = g.client_token("own", &own_secret, "");
    assert_eq!(bearer(&g, "/api/x", &own).json()["error"], "wrong_issuer");

    // The provider rotates: a new key signs, the old one stays published.
    let rotated = cmd("rotate");
    assert!(rotated.contains("k2"), "{rotated}");
    let t2 = cmd("token");
    let started = Instant::now();
    let mut refused = 0;
    loop {
        let r = bearer(&g, "/api/x", &t2);
        if r.status == 200 {
            break;
        }
        assert_eq!(r.json()["error"], "unknown_key", "{}", r.body);
        refused += 1;
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "a token signed with the provider's new key still refused"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Tokens signed with the old key still pass.
    assert_eq!(bearer(&g, "/api/x", &t1).status, 200);
    eprintln!(
        "new key accepted {} ms after the first token signed with it ({refused} refused)",
        started.elapsed().as_millis()
    );
    // The first request with the new key waited for the refetch it caused: none was refused.
    assert_eq!(refused, 0, "tokens signed with the new key were refused");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the new key took {:?} to be fetched",
        started.elapsed()
    );
    writeln!(to_idp, "quit").unwrap();
    let _ = idp.wait();
}

/// `gantry` with the spec, a private config home (for `login`) and `stdin` as its input.
fn cli_with(
    g: &Gantry,
    home: &std::path::Path,
    args: &[&str],
    stdin: &str,
) -> (bool, String, String) {
    let mut c = Command::new(gantry_bin())
        .arg("-f")
        .arg(&g.spec)
        .args(args)
        .env("XDG_CONFIG_HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_manages_identity_and_logs_users_in() {
    let g = Gantry::start(PROTECTED);
    g.wait_healthy("api", 1, T);
    let home = tempfile::tempdir().unwrap();
    let run = |args: &[&str], stdin: &str| cli_with(&g, home.path(), args, stdin);
    let (ok, out, err) = run(
        &[
            "identity",
            "create-client",
            "reports",
            "--scope",
            "orders:read",
        ],
        "",
    );
    assert!(ok, "{err}");
    let secret = out
        .lines()
        .find_map(|l| l.strip_prefix("secret: "))
        .unwrap()
        .to_string();
    assert!(secret.starts_with("gcs_"), "{out}");
    let (ok, out, _) = run(&["identity", "clients"], "");
    assert!(
        ok && out.contains("reports") && !out.contains(&secret),
        "{out}"
    );
    // A user, with the password on stdin (never in argv, where ps would show it).
    let (ok, _, err) = run(
        &["identity", "create-user", "otto", "--role", "operator"],
        "op-password\n",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = run(
        &["identity", "create-user", "bad", "--role", "wizard"],
        "long-enough\n",
    );
    assert!(!ok && err.contains("unknown role"), "{err}");
    let (ok, out, _) = run(&["identity", "users"], "");
    assert!(
        ok && out.contains("otto") && out.contains("operator"),
        "{out}"
    );
    let (ok, out, err) = run(&["identity", "create-api-key", "reports"], "");
    assert!(ok, "{err}");
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("key: "))
        .unwrap()
        .to_string();
    let r = http(
        g.gateway,
        "GET",
        "/api/x",
        &[("authorization", &format!("ApiKey {key}"))],
        None,
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let (ok, out, _) = run(&["identity", "keys"], "");
    assert!(ok && out.contains("signing"), "{out}");
    let (ok, out, err) = run(&["identity", "rotate"], "");
    assert!(ok && out.contains("published now"), "{out}{err}");

    // Log in as otto: the CLI acts with the operator role from then on.
    let (ok, _, err) = run(&["login", "otto"], "wrong-password\n");
    assert!(!ok && err.contains("login failed"), "{err}");
    let (ok, out, err) = run(&["login", "otto"], "op-password\n");
    assert!(ok, "{out}{err}");
    let saved = std::fs::read_to_string(home.path().join("gantry/login.json")).unwrap();
    assert!(!saved.contains("op-password"));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(home.path().join("gantry/login.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let (ok, _, err) = run(&["scale", "api", "2"], "");
    assert!(ok, "an operator may scale: {err}");
    let (ok, _, err) = run(&["identity", "create-user", "eve"], "eve-password\n");
    assert!(
        !ok && err.contains("identity:write"),
        "an operator may not manage identity: {err}"
    );
    let audit = g.admin_get("/v1/audit?principal=user:otto").to_string();
    assert!(audit.contains("/v1/services/api/scale"), "{audit}");
    let (ok, out, _) = run(&["logout"], "");
    assert!(ok && out.contains("logged out otto"), "{out}");
    // Back to the admin token.
    let (ok, _, err) = run(&["identity", "create-user", "eve"], "eve-password\n");
    assert!(ok, "{err}");

    // No secret reached gantry's logs, its metrics, the audit trail or a process list.
    let output = g.output();
    let metrics = g.metrics();
    let audit = g.admin_get("/v1/audit?limit=1000").to_string();
    let ps = String::from_utf8_lossy(
        &Command::new("ps")
            .args(["-eo", "args"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    for secret in [secret.as_str(), key.as_str(), "op-password", "eve-password"] {
        for (what, text) in [
            ("log", &output),
            ("metrics", &metrics),
            ("audit", &audit),
            ("ps", &ps),
        ] {
            assert!(!text.contains(secret), "a secret in the {what}");
        }
    }
}

#[test]
fn rate_limits_key_on_the_verified_subject() {
    let g = Gantry::start(
        r#"
[services.api]
command = ["{TESTSVC}"]
health = { type = "http", path = "/health" }
[[services.api.routes]]
path_prefix = "/api"
auth = "required"
rate_limit = { requests_per_second = 1, burst = 2, key = "subject" }
"#,
    );
    g.wait_healthy("api", 1, T);
    let token = |id: &str| {
        let secret = g
            .new_client(json!({"id": id, "kind": "confidential"}))
            .unwrap();
        g.client_token(id, &secret, "")
    };
    let (a, b) = (token("alpha"), token("beta"));
    let statuses =
        |t: &str| -> Vec<u16> { (0..4).map(|_| bearer(&g, "/api/x", t).status).collect() };
    // alpha spends its burst; beta, from the same address, has its own.
    let sa = statuses(&a);
    assert_eq!(&sa[..2], &[200, 200], "{sa:?}");
    assert!(sa[2..].contains(&429), "{sa:?}");
    assert_eq!(&statuses(&b)[..2], &[200, 200]);
}

#[test]
fn instances_on_mtls_get_certificates_that_name_their_service_at_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    // The gateway's own server certificate (self-signed, for localhost).
    cert(dir.path(), "gw", &["localhost"]);
    let tls_port = free_port();
    let spec = dir.path().join("gantry.toml");
    let text = spec_text(
        r#"
[identity]
listen = "127.0.0.1:0"
service_policy = "deny"

[services.orders]
command = ["{TESTSVC}"]
mtls = true
calls = ["catalog"]
health = { type = "http", path = "/health" }
[[services.orders.routes]]
path_prefix = "/orders"
strip_prefix = true
public = true

[services.billing]
command = ["{TESTSVC}"]
mtls = true
health = { type = "http", path = "/health" }

[services.catalog]
command = ["{TESTSVC}"]
health = { type = "http", path = "/health" }
[[services.catalog.routes]]
path_prefix = "/catalog"
strip_prefix = true
"#,
    )
    .replace(
        "[admin]",
        &format!(
            "[gateway.tls]\nlisten = \"127.0.0.1:{tls_port}\"\ncertificates = [{{ cert = \"gw.pem\", key = \"gw.key\", hosts = [\"localhost\"] }}]\n\n[admin]"
        ),
    );
    std::fs::write(&spec, text).unwrap();
    let g = Gantry::start_at(dir, spec);
    for s in ["orders", "billing", "catalog"] {
        g.wait_healthy(s, 1, T);
    }
    let files = |svc: &str| {
        let id = g.instances(svc)[0]["id"].as_str().unwrap().to_string();
        g.data_dir().join("instances").join(id).join("identity")
    };
    let orders = files("orders");
    // The certificate chains to the CA and names the service; the key is private.
    let o = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(orders.join("ca.pem"))
        .arg(orders.join("cert.pem"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let o = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(orders.join("cert.pem"))
        .output()
        .unwrap();
    let san = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(san.contains("URI:spiffe://gantry/service/orders"), "{san}");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(orders.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    // Its path is in the instance's environment; a service without mtls has none.
    let env = g.get("/orders/env/GANTRY_TLS_CERT");
    assert!(
        env.body.trim().ends_with("identity/cert.pem"),
        "{}",
        env.body
    );
    assert!(!files("catalog").join("cert.pem").exists());

    let curl = |cert: Option<&std::path::Path>| -> (u16, String) {
        let mut c = Command::new("curl");
        c.args([
            "-s",
            "--max-time",
            "10",
            "-w",
            "\n%{http_code}",
            "--resolve",
        ])
        .arg(format!("localhost:{tls_port}:127.0.0.1"))
        .arg("--cacert")
        .arg(g.dir.path().join("gw.pem"));
        if let Some(d) = cert {
            c.arg("--cert")
                .arg(d.join("cert.pem"))
                .arg("--key")
                .arg(d.join("key.pem"));
        }
        let o = c
            .arg(format!("https://localhost:{tls_port}/catalog/who"))
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        let (body, code) = out.rsplit_once('\n').unwrap();
        (code.parse().unwrap_or(0), body.to_string())
    };
    // orders' certificate: orders may call catalog; the instance hears who called.
    let (code, body) = curl(Some(&orders));
    assert_eq!(code, 200, "{body}");
    let seen: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(seen["headers"]["gantry-auth-service"], "orders", "{seen}");
    // billing's certificate: billing may not.
    let (code, body) = curl(Some(&files("billing")));
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("call_not_allowed"), "{body}");
    // No certificate: outside traffic, and catalog is not public.
    let (code, body) = curl(None);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("not_public"), "{body}");
}

#[test]
fn the_gateway_speaks_mutual_tls_to_instances_that_require_it() {
    let g = Gantry::start(&format!(
        r#"
[services.vault]
command = ["python3", "-u", "{}"]
mtls = true
upstream = {{ tls = {{ mtls = true }} }}
[[services.vault.routes]]
path_prefix = "/vault"
"#,
        fixture("mtls_server.py")
    ));
    g.wait_healthy("vault", 1, T);
    // Through the gateway: it verified the instance against the internal CA and presented its
    // own certificate, which the instance verified.
    let r = wait_for("an answer over mutual TLS", T, || {
        let r = g.get("/vault/x");
        (r.status == 200).then_some(r)
    });
    let v = r.json();
    assert_eq!(v["peer"], json!(["spiffe://gantry/gateway"]), "{v}");
    // Straight to the instance without a certificate: refused by the instance.
    let port = g.instances("vault")[0]["port"].as_u64().unwrap();
    let o = Command::new("curl")
        .args([
            "-sk",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("https://127.0.0.1:{port}/x"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "000",
        "the instance served a client without a certificate"
    );
}

#[test]
fn sessions_in_redis_are_shared_by_gantrys_that_share_no_store() {
    let url =
        std::env::var("GANTRY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let spec = format!(
        r#"
[identity]
listen = "127.0.0.1:0"
sessions_redis = "{url}"

[services.app]
command = ["{{TESTSVC}}"]
health = {{ type = "http", path = "/health" }}
[[services.app.routes]]
path_prefix = "/app"
auth = "required"
"#
    );
    let a = Gantry::start(&spec);
    let b = Gantry::start(&spec);
    a.wait_healthy("app", 1, T);
    b.wait_healthy("app", 1, T);
    a.admin_call(
        "POST",
        "/v1/identity/users",
        Some(&json!({"username": "rhea", "password": "redis-pass", "roles": ["viewer"]})),
    );
    let r = http(
        a.identity_addr(),
        "POST",
        "/session/login",
        &[("content-type", "application/x-www-form-urlencoded")],
        Some("username=rhea&password=redis-pass"),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let cookie = session_cookie(&r);
    let get =
        |g: &Gantry| http(g.gateway, "GET", "/app/me", &[("cookie", &cookie)], None, T).unwrap();
    // Signed in at a, known at b's gateway (which sends its own token for the session).
    let r = wait_for("the session at the other gantry", T, || {
        let r = get(&b);
        (r.status == 200).then_some(r)
    });
    assert_eq!(r.json()["headers"]["gantry-auth-subject"], "rhea");
    assert_eq!(get(&a).status, 200);
    // Logged out at a: gone at b too.
    let out = http(
        a.identity_addr(),
        "POST",
        "/session/logout",
        &[("cookie", &cookie)],
        Some(""),
        T,
    )
    .unwrap();
    assert_eq!(out.status, 200, "{}", out.body);
    wait_for("the session gone at the other gantry", T, || {
        (get(&b).status == 401).then_some(())
    });
    assert_eq!(get(&a).status, 401);
}

#[test]
fn the_token_service_is_served_under_the_gateway_on_the_apps_origin() {
    let dir = tempfile::tempdir().unwrap();
    let gw_port = free_port();
    let spec = dir.path().join("gantry.toml");
    let text = spec_text(&format!(
        r#"
[identity]
listen = "127.0.0.1:0"
gateway_path = "/auth"
issuer = "http://127.0.0.1:{gw_port}/auth"
service_policy = "deny"

[services.app]
command = ["{{TESTSVC}}"]
health = {{ type = "http", path = "/health" }}
[[services.app.routes]]
path_prefix = "/app"
auth = "required"
public = true
"#
    ))
    .replace(
        "[gateway]\nlisten = \"127.0.0.1:0\"",
        &format!("[gateway]\nlisten = \"127.0.0.1:{gw_port}\""),
    );
    std::fs::write(&spec, text).unwrap();
    let g = Gantry::start_at(dir, spec);
    g.wait_healthy("app", 1, T);
    // Discovery through the gateway names URLs under the gateway (public under deny).
    let d = g.get("/auth/.well-known/openid-configuration");
    assert_eq!(d.status, 200, "{}", d.body);
    let d = d.json();
    assert_eq!(d["issuer"], format!("http://127.0.0.1:{gw_port}/auth"));
    assert_eq!(
        d["token_endpoint"],
        format!("http://127.0.0.1:{gw_port}/auth/oauth2/token")
    );
    assert_eq!(g.get("/auth/oauth2/jwks").status, 200);
    // A browser signs in on the app's own origin and uses the app with the cookie.
    g.admin_call(
        "POST",
        "/v1/identity/users",
        Some(&json!({"username": "gus", "password": "same-origin"})),
    );
    let r = http(
        g.gateway,
        "POST",
        "/auth/session/login",
        &[
            ("content-type", "application/x-www-form-urlencoded"),
            ("origin", &format!("http://127.0.0.1:{gw_port}")),
        ],
        Some("username=gus&password=same-origin&return_to=/app/home"),
        T,
    )
    .unwrap();
    assert_eq!(r.status, 303, "{}", r.body);
    let cookie = session_cookie(&r);
    let r = http(
        g.gateway,
        "GET",
        "/app/home",
        &[("cookie", &cookie)],
        None,
        T,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["headers"]["gantry-auth-subject"], "gus");
}

#[test]
fn a_bad_secrets_key_is_a_clear_error_and_a_good_one_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("gantry.toml");
    std::fs::write(&spec, spec_text("")).unwrap();
    let out = Command::new(gantry_bin())
        .args(["up", "-f"])
        .arg(&spec)
        .env("GANTRY_SECRETS_KEY", "not-a-key")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("GANTRY_SECRETS_KEY must be 32 bytes"), "{err}");
    assert!(!dir.path().join(".gantry/secrets.key").exists());
    // Without it, the data directory's key is made once, private.
    let g = Gantry::start_at(dir, spec);
    let key = g.data_dir().join("secrets.key");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

/// The `gantry_session=...` pair of a login's `Set-Cookie`.
fn session_cookie(r: &Resp) -> String {
    r.header("set-cookie")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}
