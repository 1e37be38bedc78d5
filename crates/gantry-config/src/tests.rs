#![allow(clippy::unwrap_used)]
use super::*;
use gantry_store::RedbStore;
use serde_json::json;

fn keyring(k: u8) -> Arc<Keyring> {
    Arc::new(Keyring::new(&[k; 32], &[]))
}

async fn open_with(dir: &std::path::Path, ring: Arc<Keyring>, history: u64) -> Arc<ConfigStore> {
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(dir).unwrap());
    ConfigStore::open(store, ring, ConfigOptions { history })
        .await
        .unwrap()
}

async fn open(dir: &std::path::Path) -> Arc<ConfigStore> {
    open_with(dir, keyring(1), DEFAULT_HISTORY).await
}

fn req(set: &[(&str, Value)], msg: &str) -> ChangeRequest {
    ChangeRequest {
        set: set
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        message: Some(msg.into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn versions_history_rollback_and_durability() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = open(dir.path()).await;
        let v1 = c
            .change("cat", req(&[("CURRENCY", json!("USD"))], "first"), "alice")
            .await
            .unwrap();
        assert!(v1.created);
        assert_eq!(v1.version.version, 1);
        assert_eq!(v1.version.author, "alice");
        let v2 = c
            .change(
                "cat",
                req(&[("CURRENCY", json!("EUR")), ("TAX", json!(20))], "eu"),
                "bob",
            )
            .await
            .unwrap();
        assert_eq!(v2.version.version, 2);
        assert_eq!(
            v2.version
                .changes
                .iter()
                .map(|c| (c.key.as_str(), c.kind))
                .collect::<Vec<_>>(),
            [
                ("CURRENCY", ChangeKind::Changed),
                ("TAX", ChangeKind::Added)
            ]
        );
        // No-op change: no new version.
        let same = c
            .change("cat", req(&[("CURRENCY", json!("EUR"))], "again"), "bob")
            .await
            .unwrap();
        assert!(!same.created);
        assert_eq!(same.version.version, 2);
        let v3 = c
            .change(
                "cat",
                ChangeRequest {
                    unset: vec!["TAX".into()],
                    ..Default::default()
                },
                "bob",
            )
            .await
            .unwrap();
        assert_eq!(v3.version.changes[0].kind, ChangeKind::Removed);
        assert_eq!(v3.version.changes[0].before, Some(json!(20)));
        let rb = c
            .rollback(
                "cat",
                1,
                Author {
                    name: "carol".into(),
                    message: String::new(),
                },
            )
            .await
            .unwrap();
        assert_eq!(rb.version.version, 4);
        assert_eq!(rb.version.rollback_of, Some(1));
        assert_eq!(rb.version.message, "rollback to version 1");
    }
    let c = open(dir.path()).await;
    let h = c.history("cat", false).await.unwrap();
    assert_eq!(
        h.iter().map(|v| v.version).collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(h[1].message, "eu");
    let r = c.resolve("cat", None, None, None).await.unwrap();
    assert_eq!(
        r.values,
        BTreeMap::from([("CURRENCY".into(), json!("USD"))])
    );
    assert_eq!(r.version, 4);
    // Older versions are the head with later changes undone.
    let (_, v2) = c.export("cat", Some(2), false).await.unwrap();
    assert_eq!(v2.values["TAX"], json!(20));
    let (_, v0) = c.export("cat", Some(0), false).await.unwrap();
    assert!(v0.values.is_empty());
    let d = c.diff("cat", 2, 4, false).await.unwrap();
    assert_eq!(
        d.iter()
            .map(|c| (c.key.as_str(), c.kind, c.after.clone()))
            .collect::<Vec<_>>(),
        [
            ("CURRENCY", ChangeKind::Changed, Some(json!("USD"))),
            ("TAX", ChangeKind::Removed, None)
        ]
    );
    assert_eq!(c.sets().await.unwrap(), ["cat"]);
    assert!(c
        .resolve("dog", None, None, None)
        .await
        .unwrap()
        .values
        .is_empty());
    assert!(matches!(
        c.export("cat", Some(9), false).await,
        Err(ConfigError::NoSuchVersion { pruned: false, .. })
    ));
}

#[tokio::test]
async fn layers_resolve_global_then_service_then_environment_then_instance() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path()).await;
    let layer = |env: Option<&str>, inst: Option<&str>, kv: &[(&str, Value)]| ChangeRequest {
        env: env.map(str::to_string),
        instance: inst.map(str::to_string),
        ..req(kv, "")
    };
    c.change(
        GLOBAL,
        layer(
            None,
            None,
            &[
                ("A", json!("g")),
                ("B", json!("g")),
                ("C", json!("g")),
                ("D", json!("g")),
                ("E", json!("g")),
            ],
        ),
        "t",
    )
    .await
    .unwrap();
    c.change(
        GLOBAL,
        layer(Some("prod"), None, &[("B", json!("g-prod"))]),
        "t",
    )
    .await
    .unwrap();
    c.change(
        "web",
        layer(None, None, &[("C", json!(3)), ("B", json!("web"))]),
        "t",
    )
    .await
    .unwrap();
    c.change("web", layer(Some("prod"), None, &[("D", json!(true))]), "t")
        .await
        .unwrap();
    c.change(
        "web",
        layer(None, Some("web-3"), &[("E", json!({"x": 1}))]),
        "t",
    )
    .await
    .unwrap();
    let r = c
        .resolve("web", Some("prod"), Some("web-3"), None)
        .await
        .unwrap();
    assert_eq!(
        r.env(),
        BTreeMap::from([
            ("A".into(), "g".into()),
            ("B".into(), "web".into()),
            ("C".into(), "3".into()),
            ("D".into(), "true".into()),
            ("E".into(), r#"{"x":1}"#.into()),
        ])
    );
    assert_eq!((r.version, r.global_version), (3, 2));
    let dev = c
        .resolve("web", Some("dev"), Some("web-1"), None)
        .await
        .unwrap();
    assert_eq!(dev.values["D"], json!("g"));
    assert_eq!(dev.values["E"], json!("g"));
    let other = c.resolve("api", Some("prod"), None, None).await.unwrap();
    assert_eq!(other.values["B"], json!("g-prod"));
    // A layer is named by env or instance, not both.
    assert!(c
        .change(
            "web",
            layer(Some("prod"), Some("web-1"), &[("X", json!(1))]),
            "t"
        )
        .await
        .is_err());
    assert!(c
        .change("web", layer(Some("Prod!"), None, &[("X", json!(1))]), "t")
        .await
        .is_err());
}

#[tokio::test]
async fn secrets_are_sealed_redacted_and_revealed_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path()).await;
    c.change(
        "pay",
        ChangeRequest {
            set: BTreeMap::from([("USER".into(), json!("app"))]),
            secrets: BTreeMap::from([("DB_PASSWORD".into(), json!("hunter2-secret"))]),
            ..Default::default()
        },
        "alice",
    )
    .await
    .unwrap();
    c.change(
        "pay",
        ChangeRequest {
            secrets: BTreeMap::from([("DB_PASSWORD".into(), json!("second-secret"))]),
            ..Default::default()
        },
        "alice",
    )
    .await
    .unwrap();
    // Writing a secret is always a change: comparing would tell a writer whether a guess
    // was right.
    let same = c
        .change(
            "pay",
            ChangeRequest {
                secrets: BTreeMap::from([("DB_PASSWORD".into(), json!("second-secret"))]),
                ..Default::default()
            },
            "alice",
        )
        .await
        .unwrap();
    assert!(same.created);
    let everything = format!(
        "{:?}{:?}{:?}{:?}",
        c.view("pay", false).await.unwrap(),
        c.history("pay", false).await.unwrap(),
        c.diff("pay", 1, 2, false).await.unwrap(),
        c.resolve("pay", None, None, None).await.unwrap().redacted(),
    );
    assert!(!everything.contains("hunter2") && !everything.contains("second-secret"));
    let view = c.view("pay", false).await.unwrap();
    assert!(view.document.redacted.contains("DB_PASSWORD"));
    assert_eq!(view.document.values["USER"], json!("app"));
    let h = c.history("pay", false).await.unwrap();
    assert!(h[1].changes[0].secret && h[1].changes[0].before.is_none());
    assert!(
        format!("{:?}", c.resolve("pay", None, None, None).await.unwrap()).contains("<redacted>")
    );
    // Revealed on request.
    let shown = c.view("pay", true).await.unwrap();
    assert_eq!(
        shown.document.secrets["DB_PASSWORD"],
        json!("second-secret")
    );
    let h = c.history("pay", true).await.unwrap();
    assert_eq!(h[1].changes[0].before, Some(json!("hunter2-secret")));
    let r = c.resolve("pay", None, None, None).await.unwrap();
    assert_eq!(r.env()["DB_PASSWORD"], "second-secret");
    assert!(r.secret_keys.contains("DB_PASSWORD"));
    drop(c);
    // Not in the store's file in the clear.
    let raw = std::fs::read(dir.path().join("state.redb")).unwrap();
    let text = String::from_utf8_lossy(&raw);
    assert!(!text.contains("hunter2") && !text.contains("second-secret"));
    assert!(text.contains("sealed-v2."));
    // The wrong key cannot open them: the store opens (one set never keeps gantry from
    // starting), and reading the secret says why.
    let wrong = open_with(dir.path(), keyring(9), DEFAULT_HISTORY).await;
    let err = wrong.resolve("pay", None, None, None).await.unwrap_err();
    assert!(err.to_string().contains("secrets key"), "{err}");
}

#[tokio::test]
async fn a_secrets_key_rotation_reseals_everything_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = open_with(dir.path(), keyring(1), DEFAULT_HISTORY).await;
        for v in ["one", "two"] {
            c.change(
                "pay",
                ChangeRequest {
                    secrets: BTreeMap::from([("TOKEN".into(), json!(v))]),
                    ..Default::default()
                },
                "t",
            )
            .await
            .unwrap();
        }
    }
    {
        // New key, old key given as previous: opens, and reseals.
        let rotated = Arc::new(Keyring::new(&[2u8; 32], &[[1u8; 32]]));
        let c = open_with(dir.path(), rotated, DEFAULT_HISTORY).await;
        assert_eq!(
            c.resolve("pay", None, None, None).await.unwrap().values["TOKEN"],
            json!("two")
        );
    }
    // The old key is gone: everything, history included, opens with the new one alone.
    let c = open_with(dir.path(), keyring(2), DEFAULT_HISTORY).await;
    assert_eq!(
        c.resolve("pay", None, None, None).await.unwrap().values["TOKEN"],
        json!("two")
    );
    let h = c.history("pay", true).await.unwrap();
    assert_eq!(h[1].changes[0].before, Some(json!("one")));
    let (_, v1) = c.export("pay", Some(1), true).await.unwrap();
    assert_eq!(v1.secrets["TOKEN"], json!("one"));
}

#[tokio::test]
async fn history_is_bounded_and_costs_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let c = open_with(dir.path(), keyring(1), 5).await;
    // A big set (about 400 KB), then 30 one-key commits.
    let big: BTreeMap<String, Value> = (0..100)
        .map(|i| (format!("K{i}"), json!("x".repeat(4000))))
        .collect();
    c.change(
        "web",
        ChangeRequest {
            set: big,
            ..Default::default()
        },
        "t",
    )
    .await
    .unwrap();
    for i in 0..30 {
        c.change("web", req(&[("COUNTER", json!(i))], ""), "t")
            .await
            .unwrap();
    }
    let h = c.history("web", false).await.unwrap();
    assert_eq!(
        h.iter().map(|v| v.version).collect::<Vec<_>>(),
        [27, 28, 29, 30, 31]
    );
    // Each retained record holds only its change.
    let rows = c.store.list(BUCKET, "web.*").await.unwrap();
    assert_eq!(
        rows.len(),
        6,
        "{:?}",
        rows.iter().map(|r| &r.0).collect::<Vec<_>>()
    );
    for (k, e) in &rows {
        if !k.ends_with(".head") {
            assert!(e.value.len() < 1024, "{k}: {} bytes", e.value.len());
        }
    }
    assert!(matches!(
        c.rollback("web", 3, Author::default()).await,
        Err(ConfigError::NoSuchVersion { pruned: true, .. })
    ));
    let rb = c.rollback("web", 27, Author::default()).await.unwrap();
    assert_eq!(rb.version.changes.len(), 1);
    // Limits: a value, a set.
    let huge = "x".repeat(MAX_VALUE_BYTES + 1);
    assert!(c
        .change("web", req(&[("H", json!(huge))], ""), "t")
        .await
        .is_err());
    let many: BTreeMap<String, Value> = (0..300)
        .map(|i| (format!("M{i}"), json!("y".repeat(4000))))
        .collect();
    let err = c
        .change(
            "web",
            ChangeRequest {
                set: many,
                ..Default::default()
            },
            "t",
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("at most 1048576"), "{err}");
}

#[tokio::test]
async fn revert_undoes_one_version_and_keeps_later_changes() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path()).await;
    c.change("web", req(&[("A", json!(1)), ("B", json!(1))], ""), "t")
        .await
        .unwrap();
    c.change(
        "web",
        req(&[("A", json!(2)), ("B", json!(2)), ("C", json!(2))], "bad"),
        "t",
    )
    .await
    .unwrap();
    c.change("web", req(&[("B", json!(3))], "later"), "t")
        .await
        .unwrap();
    let mut rx = c.subscribe();
    let r = c
        .revert("web", 2, "web-4 failed its health check")
        .await
        .unwrap();
    assert_eq!(r.version.reverts, Some(2));
    assert_eq!(r.version.author, "gantry");
    assert!(r
        .version
        .message
        .contains("automatic revert of version 2: web-4 failed"));
    let v = c.resolve("web", None, None, None).await.unwrap();
    assert_eq!(v.values["A"], json!(1));
    assert_eq!(v.values["B"], json!(3));
    assert!(!v.values.contains_key("C"));
    // The event comes from the store's watch, and says it is a revert.
    let ev = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (ev.set.as_str(), ev.version, ev.reverts),
        ("web", 4, Some(2))
    );
}

#[tokio::test]
async fn import_and_export_round_trip_and_replace_keeps_redacted_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path()).await;
    let doc = format::parse(
        r#"
[values]
A = "x"
N = 3
[secrets]
S = "hidden"
[env.prod.values]
A = "y"
"#,
        format::Format::Toml,
    )
    .unwrap();
    let imported = c
        .import(
            "web",
            doc.clone(),
            Replace::Nothing,
            Author {
                name: "t".into(),
                message: "import".into(),
            },
        )
        .await
        .unwrap();
    assert_eq!(imported.version.changes.len(), 4);
    let (_, shown) = c.export("web", None, true).await.unwrap();
    assert_eq!(shown, doc);
    // A redacted export, re-imported with replace: the secret stays, the rest follows the file.
    let (_, mut redacted) = c.export("web", None, false).await.unwrap();
    assert!(redacted.secrets.is_empty() && redacted.redacted.contains("S"));
    redacted.values.remove("N");
    let r = c
        .import("web", redacted, Replace::All, Author::default())
        .await
        .unwrap();
    assert_eq!(
        r.version
            .changes
            .iter()
            .map(|c| (c.key.as_str(), c.kind))
            .collect::<Vec<_>>(),
        [("N", ChangeKind::Removed)]
    );
    let v = c.resolve("web", None, None, None).await.unwrap();
    assert_eq!(v.values["S"], json!("hidden"));
    assert!(!v.values.contains_key("N"));
}

#[tokio::test]
async fn sets_from_an_earlier_gantry_are_upgraded() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = RedbStore::open(dir.path()).unwrap();
        // Format 1: every version with all its values, the head a copy of the last.
        let v = |n: u64, vals: serde_json::Value| {
            json!({"service": "cat", "version": n, "time_ms": n, "message": format!("m{n}"),
                   "changes": [], "values": vals})
        };
        for (n, vals) in [(1, json!({"A": "1"})), (2, json!({"A": "2", "B": "x"}))] {
            store
                .put_json(BUCKET, &version_key("cat", n), &v(n, vals))
                .await
                .unwrap();
        }
        store
            .put_json(BUCKET, "cat.head", &v(3, json!({"B": "x"})))
            .await
            .unwrap();
    }
    let c = open(dir.path()).await;
    let h = c.history("cat", false).await.unwrap();
    assert_eq!(h.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(h[2].changes[0].kind, ChangeKind::Removed);
    assert_eq!(h[1].message, "m2");
    let (_, v2) = c.export("cat", Some(2), false).await.unwrap();
    assert_eq!(v2.values["A"], json!("2"));
    let next = c
        .change("cat", req(&[("C", json!(1))], ""), "t")
        .await
        .unwrap();
    assert_eq!(next.version.version, 4);
}

#[tokio::test]
async fn rejects_bad_changes() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path()).await;
    for (set, r) in [
        ("Bad", req(&[("A", json!("1"))], "")),
        ("ok", req(&[("PORT", json!("1"))], "")),
        ("ok", req(&[("GANTRY_X", json!("1"))], "")),
        ("ok", req(&[("1A", json!("1"))], "")),
        ("ok", req(&[("A-B", json!("1"))], "")),
        ("ok", req(&[("A", json!("x\0y"))], "")),
        ("ok", req(&[("A", Value::Null)], "")),
        ("ok", ChangeRequest::default()),
        (
            "ok",
            ChangeRequest {
                set: BTreeMap::from([("A".into(), json!(1))]),
                secrets: BTreeMap::from([("A".into(), json!(1))]),
                ..Default::default()
            },
        ),
    ] {
        assert!(
            matches!(c.change(set, r, "t").await, Err(ConfigError::Invalid(_))),
            "{set}"
        );
    }
    assert!(matches!(
        c.rollback("ok", 7, Author::default()).await,
        Err(ConfigError::NoSuchVersion { .. })
    ));
}

#[tokio::test]
async fn a_dotenv_import_with_replace_touches_only_its_layer_and_keeps_redacted_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path()).await;
    c.change("web", req(&[("BASE", json!("b"))], ""), "t")
        .await
        .unwrap();
    c.change(
        "web",
        ChangeRequest {
            env: Some("prod".into()),
            set: BTreeMap::from([("A".into(), json!("1")), ("OLD".into(), json!("x"))]),
            secrets: BTreeMap::from([("S".into(), json!("hidden"))]),
            ..Default::default()
        },
        "t",
    )
    .await
    .unwrap();
    // The prod layer as .env without secrets, then re-imported with replace.
    let (_, doc) = c.export("web", None, false).await.unwrap();
    let mut prod = doc.env["prod"].clone();
    prod.values.remove("OLD");
    let text = format::render_env(&prod);
    let mut parsed = format::parse(&text, format::Format::Env).unwrap();
    assert!(parsed.redacted.contains("S"), "{text}");
    let moved = LayerDoc {
        values: std::mem::take(&mut parsed.values),
        secrets: std::mem::take(&mut parsed.secrets),
        redacted: std::mem::take(&mut parsed.redacted),
    };
    parsed.env.insert("prod".into(), moved);
    let r = c
        .import(
            "web",
            parsed,
            Replace::Layers(vec![Layer::Env("prod".into())]),
            Author::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        r.version
            .changes
            .iter()
            .map(|c| c.key.as_str())
            .collect::<Vec<_>>(),
        ["OLD"]
    );
    let v = c.resolve("web", Some("prod"), None, None).await.unwrap();
    assert_eq!(v.values["BASE"], json!("b"), "other layers untouched");
    assert_eq!(v.values["S"], json!("hidden"), "redacted secret kept");
}

#[tokio::test]
async fn a_revert_undoes_secrets_too() {
    let dir = tempfile::tempdir().unwrap();
    let c = open(dir.path()).await;
    let secret = |v: &str| ChangeRequest {
        secrets: BTreeMap::from([("S".into(), json!(v))]),
        ..Default::default()
    };
    c.change("web", secret("good"), "t").await.unwrap();
    c.change("web", secret("bad"), "t").await.unwrap();
    c.revert("web", 2, "unhealthy").await.unwrap();
    let v = c.resolve("web", None, None, None).await.unwrap();
    assert_eq!(v.values["S"], json!("good"));
}

#[tokio::test]
async fn an_upgrade_cut_short_and_sets_from_before_heads_come_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = |n: u64, vals: serde_json::Value| {
        json!({"service": "cat", "version": n, "time_ms": n, "message": format!("m{n}"),
               "changes": [], "values": vals})
    };
    {
        let store = RedbStore::open(dir.path()).unwrap();
        // A set from before heads: rows only.
        for (n, vals) in [(1, json!({"A": "1"})), (2, json!({"A": "2"}))] {
            store
                .put_json(BUCKET, &version_key("old", n), &v1(n, vals))
                .await
                .unwrap();
        }
        // An upgrade that stopped after rewriting the newest rows: v1 old, v2 and v3 new, head
        // old.
        store
            .put_json(BUCKET, &version_key("cat", 1), &v1(1, json!({"A": "1"})))
            .await
            .unwrap();
        let r2 = Record {
            set: "cat".into(),
            version: 2,
            time_ms: 2,
            author: String::new(),
            message: "m2".into(),
            changes: vec![Change {
                layer: String::new(),
                key: "B".into(),
                before: None,
                after: Some(Stored::Plain(json!("x"))),
            }],
            rollback_of: None,
            reverts: None,
        };
        store
            .put_json(BUCKET, &version_key("cat", 2), &r2)
            .await
            .unwrap();
        // Rewritten newest first: the head's own row (3) came before row 2.
        let r3 = Record {
            version: 3,
            time_ms: 3,
            message: "m3".into(),
            changes: vec![Change {
                layer: String::new(),
                key: "A".into(),
                before: Some(Stored::Plain(json!("1"))),
                after: None,
            }],
            ..r2.clone()
        };
        store
            .put_json(BUCKET, &version_key("cat", 3), &r3)
            .await
            .unwrap();
        store
            .put_json(BUCKET, "cat.head", &v1(3, json!({"B": "x"})))
            .await
            .unwrap();
    }
    let c = open(dir.path()).await;
    assert_eq!(c.sets().await.unwrap(), ["cat", "old"]);
    let (_, old) = c.export("old", None, false).await.unwrap();
    assert_eq!(old.values["A"], json!("2"));
    let h = c.history("cat", false).await.unwrap();
    assert_eq!(h.iter().map(|v| v.version).collect::<Vec<_>>(), [1, 2, 3]);
    let (_, v2) = c.export("cat", Some(2), false).await.unwrap();
    assert_eq!(v2.values["A"], json!("1"));
    assert_eq!(v2.values["B"], json!("x"));
    let (_, v3) = c.export("cat", Some(3), false).await.unwrap();
    assert_eq!(v3.values.keys().collect::<Vec<_>>(), ["B"]);
}

#[tokio::test]
async fn a_pinned_version_outlives_retention() {
    let dir = tempfile::tempdir().unwrap();
    let c = open_with(dir.path(), keyring(1), 3).await;
    c.change("web", req(&[("A", json!(0))], ""), "t")
        .await
        .unwrap();
    c.change("web", req(&[("A", json!(1))], ""), "t")
        .await
        .unwrap();
    c.pin("web", 2);
    for i in 2..10 {
        c.change("web", req(&[("A", json!(i))], ""), "t")
            .await
            .unwrap();
    }
    // Retention (3) would have dropped version 2; the pin keeps it, and the versions after it.
    let v2 = c.resolve("web", None, None, Some(2)).await.unwrap();
    assert_eq!(v2.values["A"], json!(1));
    assert!(matches!(
        c.export("web", Some(1), false).await,
        Err(ConfigError::NoSuchVersion { pruned: true, .. })
    ));
    c.unpin("web", 2);
    c.change("web", req(&[("A", json!(99))], ""), "t")
        .await
        .unwrap();
    assert!(c.resolve("web", None, None, Some(2)).await.is_err());
}
