#![allow(clippy::unwrap_used)]
use std::sync::atomic::{AtomicU64, Ordering};

use gantry_store::RedbStore;

use super::*;

fn reg_req(service: &str, version: &str, port: u16) -> Registration {
    Registration {
        service: service.into(),
        id: None,
        version: Some(version.into()),
        address: None,
        port,
        metadata: BTreeMap::new(),
        zone: None,
        ttl_ms: Some(1000),
        tags: Vec::new(),
        checks: Vec::new(),
    }
}

fn supervised(id: &str, service: &str, port: u16) -> Instance {
    Instance {
        id: id.into(),
        service: service.into(),
        version: semver::Version::new(1, 0, 0),
        address: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port,
        metadata: BTreeMap::new(),
        node: "n1".into(),
        zone: None,
        health: Health::Passing,
        source: InstanceSource::Supervised,
        registered_at_ms: unix_ms(),
        tags: Vec::new(),
        checks: Vec::new(),
    }
}

async fn open(dir: &std::path::Path) -> Arc<Registry> {
    let store = Arc::new(RedbStore::open(dir).unwrap());
    Registry::open(store, "n1".into(), &Metrics::new())
        .await
        .unwrap()
}

#[tokio::test]
async fn lookup_by_version_requirement() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path()).await;
    r.register_external(reg_req("cat", "1.2.0", 1001))
        .await
        .unwrap();
    r.register_external(reg_req("cat", "2.0.1", 1002))
        .await
        .unwrap();
    r.register_supervised(supervised("cat-1", "cat", 1003));
    let req = semver::VersionReq::parse("^1").unwrap();
    let by_version = |req: &semver::VersionReq| {
        r.query(&Query {
            service: "cat".into(),
            version: Some(req.clone()),
            health: HealthFilter::Any,
            ..Query::default()
        })
        .1
    };
    let ports: Vec<u16> = by_version(&req).iter().map(|i| i.port).collect();
    assert_eq!(ports.len(), 2);
    assert!(ports.contains(&1001) && ports.contains(&1003));
    let req2 = semver::VersionReq::parse(">=2").unwrap();
    assert_eq!(by_version(&req2).len(), 1);
    assert_eq!(r.snapshot().instances("cat").len(), 3);
    assert!(r.snapshot().instances("dog").is_empty());
}

#[tokio::test]
async fn listeners_run_before_the_call_returns() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path()).await;
    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    r.on_change(move |snap| s2.store(snap.revision, Ordering::SeqCst));
    let rev = r.register_supervised(supervised("a-1", "a", 1));
    assert_eq!(seen.load(Ordering::SeqCst), rev);
    let rev2 = r.deregister_supervised("a-1").unwrap();
    assert_eq!(seen.load(Ordering::SeqCst), rev2);
    assert!(r.deregister_supervised("a-1").is_none());
}

#[tokio::test]
async fn leases_expire_without_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path()).await;
    let mut events = r.subscribe();
    let mut long = reg_req("svc", "1.0.0", 2001);
    long.ttl_ms = Some(5000);
    let a = r.register_external(long).await.unwrap();
    let b = r
        .register_external(reg_req("svc", "1.0.0", 2002))
        .await
        .unwrap();
    let t0 = unix_ms();
    // Within both leases nothing expires.
    assert!(r.expire_due(t0 + 500).await.is_empty());
    // A heartbeat moves the lease forward.
    let before = match a.source {
        InstanceSource::External {
            last_heartbeat_ms, ..
        } => last_heartbeat_ms,
        _ => unreachable!(),
    };
    std::thread::sleep(Duration::from_millis(5));
    let renewed = r.heartbeat(&a.id).unwrap();
    let after = match renewed.source {
        InstanceSource::External {
            last_heartbeat_ms, ..
        } => last_heartbeat_ms,
        _ => unreachable!(),
    };
    assert!(after > before);
    // Past b's 1000 ms lease but within a's 5000 ms lease: only b expires.
    let expired = r.expire_due(t0 + 1500).await;
    assert_eq!(expired, vec![b.id.clone()]);
    assert!(r.get(&a.id).is_some());
    assert!(r.heartbeat(&b.id).is_err());
    let kinds: Vec<RegistryEventKind> = std::iter::from_fn(|| events.try_recv().ok())
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&RegistryEventKind::Expired));
    // Expired registrations are gone from the store too.
    drop(r);
    let r2 = open(dir.path()).await;
    assert!(r2.get(&b.id).is_none());
}

#[tokio::test]
async fn external_registrations_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let r = open(dir.path()).await;
        let mut req = reg_req("pay", "3.1.4", 3001);
        req.id = Some("pay-eu-1".into());
        req.ttl_ms = Some(60_000);
        let i = r.register_external(req).await.unwrap();
        r.register_supervised(supervised("pay-1", "pay", 3002));
        i.id
    };
    let r = open(dir.path()).await;
    let got = r.get(&id).unwrap();
    assert_eq!(got.port, 3001);
    assert_eq!(got.version.to_string(), "3.1.4");
    // Supervised instances are not persisted: the supervisor re-creates them.
    assert!(r.get("pay-1").is_none());
    r.deregister_external(&id).await.unwrap();
    drop(r);
    let r = open(dir.path()).await;
    assert!(r.get(&id).is_none());
}

#[tokio::test]
async fn bad_registrations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path()).await;
    let mut bad = reg_req("Bad Name", "1.0.0", 1);
    assert!(matches!(
        r.register_external(bad.clone()).await,
        Err(RegistryError::Invalid(_))
    ));
    bad.service = "ok".into();
    bad.version = Some("x".into());
    assert!(matches!(
        r.register_external(bad.clone()).await,
        Err(RegistryError::Invalid(_))
    ));
    bad.version = None;
    bad.ttl_ms = Some(5);
    assert!(matches!(
        r.register_external(bad.clone()).await,
        Err(RegistryError::Invalid(_))
    ));
    bad.ttl_ms = None;
    bad.port = 0;
    assert!(matches!(
        r.register_external(bad.clone()).await,
        Err(RegistryError::Invalid(_))
    ));
    r.register_supervised(supervised("ok-1", "ok", 5));
    bad.port = 9;
    bad.id = Some("ok-1".into());
    assert!(matches!(
        r.register_external(bad).await,
        Err(RegistryError::Conflict(_))
    ));
    assert!(matches!(
        r.deregister_external("ok-1").await,
        Err(RegistryError::Conflict(_))
    ));
    assert!(matches!(
        r.heartbeat("nope"),
        Err(RegistryError::NotFound(_))
    ));
}

#[tokio::test]
async fn snapshots_name_the_changed_service_and_share_the_others_lists() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path()).await;
    r.register_supervised(supervised("a-1", "a", 2001));
    r.register_supervised(supervised("b-1", "b", 2002));
    let before = r.snapshot();
    r.register_supervised(supervised("b-2", "b", 2003));
    let after = r.snapshot();
    assert_eq!(after.revision, before.revision + 1);
    assert_eq!(after.changed, vec![Arc::<str>::from("b")]);
    assert!(Arc::ptr_eq(&before.services["a"], &after.services["a"]));
    assert_eq!(after.services["b"].len(), 2);
    // The last instance of a service gone: the service is gone, and named.
    r.deregister_supervised("a-1");
    let gone = r.snapshot();
    assert!(!gone.services.contains_key("a"));
    assert_eq!(gone.changed, vec![Arc::<str>::from("a")]);
    assert!(Arc::ptr_eq(&after.services["b"], &gone.services["b"]));
}

#[tokio::test]
async fn an_instance_moved_to_another_service_leaves_the_old_list_in_the_same_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path()).await;
    r.register_supervised(supervised("x-1", "a", 1001));
    r.register_supervised(supervised("keep", "a", 1002));
    r.register_supervised(supervised("x-1", "b", 1001));
    let snap = r.snapshot();
    let ids = |s: &str| -> Vec<String> { snap.instances(s).iter().map(|i| i.id.clone()).collect() };
    assert_eq!(ids("a"), ["keep"]);
    assert_eq!(ids("b"), ["x-1"]);
    let mut changed: Vec<&str> = snap.changed.iter().map(|s| &**s).collect();
    changed.sort_unstable();
    assert_eq!(changed, ["a", "b"]);
    // The last one of its old service: that service's list goes.
    r.register_supervised(supervised("keep", "c", 1002));
    let snap = r.snapshot();
    assert!(snap.instances("a").is_empty());
    assert!(!snap.services.contains_key("a"));
}

#[tokio::test]
async fn stored_registrations_come_back_in_one_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    {
        let r = open(dir.path()).await;
        let mut writes = Vec::new();
        for n in 0..2_000u16 {
            let mut req = reg_req(if n % 2 == 0 { "pay" } else { "ship" }, "1.0.0", 1000 + n);
            req.ttl_ms = Some(60_000);
            writes.push(r.register_external(req));
        }
        for w in futures_util::future::join_all(writes).await {
            w.unwrap();
        }
    }
    let r = open(dir.path()).await;
    let snap = r.snapshot();
    // One revision for the whole load: its cost is linear in the registrations.
    assert_eq!(snap.revision, 1);
    assert_eq!(snap.instances("pay").len(), 1_000);
    assert_eq!(snap.instances("ship").len(), 1_000);
    assert_eq!(snap.changed.len(), 2);
    // Changes after the load still publish as usual.
    let mut req = reg_req("pay", "1.0.0", 9);
    req.ttl_ms = Some(60_000);
    r.register_external(req).await.unwrap();
    assert_eq!(r.snapshot().revision, 2);
    assert_eq!(r.snapshot().instances("pay").len(), 1_001);
}

#[tokio::test]
async fn ttl_checks_set_health_and_expire_to_critical() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path()).await;
    let mut req = reg_req("pay", "1.0.0", 3001);
    req.id = Some("pay-1".into());
    req.ttl_ms = Some(60_000);
    req.checks = vec![CheckRegistration {
        id: None,
        name: Some("alive".into()),
        ttl_ms: 1_000,
        status: Some(Health::Critical),
    }];
    let i = r.register_external(req).await.unwrap();
    assert_eq!(i.health, Health::Critical);
    assert_eq!(i.checks[0].id, "ttl");
    let routable = |r: &Registry| {
        r.query(&Query {
            service: "pay".into(),
            ..Query::default()
        })
        .1
        .len()
    };
    assert_eq!(routable(&r), 0);
    let rev = r.revision();
    let i = r
        .update_check("pay-1", "ttl", Health::Passing, "ok")
        .unwrap();
    assert_eq!(i.health, Health::Passing);
    assert_eq!(r.revision(), rev + 1, "a status change publishes");
    assert_eq!(routable(&r), 1);
    // The same status again only renews.
    r.update_check("pay-1", "ttl", Health::Passing, "ok")
        .unwrap();
    assert_eq!(r.revision(), rev + 1);
    r.update_check("pay-1", "ttl", Health::Warning, "slow disk")
        .unwrap();
    assert_eq!(routable(&r), 1, "warning still gets traffic");
    let passing_only = r.query(&Query {
        service: "pay".into(),
        health: HealthFilter::Passing,
        ..Query::default()
    });
    assert!(passing_only.1.is_empty());
    // No update within the TTL: critical, out of rotation.
    let t = unix_ms() + 1_500;
    assert_eq!(r.expire_checks(t), ["pay-1"]);
    assert_eq!(r.get("pay-1").unwrap().health, Health::Critical);
    assert!(r.get("pay-1").unwrap().checks[0]
        .output
        .contains("TTL expired"));
    assert_eq!(routable(&r), 0);
    assert!(r.expire_checks(t).is_empty());
    assert!(matches!(
        r.update_check("pay-1", "nope", Health::Passing, ""),
        Err(RegistryError::NotFound(_))
    ));
    let mut bad = reg_req("pay", "1.0.0", 1);
    bad.checks = vec![CheckRegistration {
        id: Some("a b".into()),
        name: None,
        ttl_ms: 1_000,
        status: None,
    }];
    assert!(r.register_external(bad).await.is_err());
}

#[tokio::test]
async fn queries_filter_and_order_for_locality() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path()).await;
    for (id, ver, zone, tags, node_local) in [
        ("a", "1.2.0", "eu-1", vec!["blue"], true),
        ("b", "2.0.0", "us-1", vec!["blue", "canary"], true),
        ("c", "1.5.0", "us-1", vec![], true),
        ("d", "1.9.0", "us-1", vec!["blue"], false),
    ] {
        let mut req = reg_req("web", ver, 1000);
        req.id = Some(id.into());
        req.zone = Some(zone.into());
        req.tags = tags.into_iter().map(str::to_string).collect();
        req.metadata.insert("id".into(), id.into());
        req.ttl_ms = Some(60_000);
        let mut i = r.register_external(req).await.unwrap();
        if !node_local {
            // An instance of another node (cluster mode): registered as the registry would
            // learn it from another gantry.
            i.node = "n2".into();
            r.apply(RegistryEventKind::Updated, i);
        }
    }
    let ids = |q: Query| {
        r.query(&q)
            .1
            .iter()
            .map(|i| i.id.clone())
            .collect::<Vec<_>>()
    };
    let q = |f: &dyn Fn(&mut Query)| {
        let mut q = Query {
            service: "web".into(),
            ..Query::default()
        };
        f(&mut q);
        q
    };
    assert_eq!(ids(q(&|_| {})), ["a", "b", "c", "d"]);
    assert_eq!(
        ids(q(&|q| q.near = Some("us-1".into()))),
        ["b", "c", "a", "d"],
        "this node first, then the preferred zone"
    );
    assert_eq!(
        ids(q(
            &|q| q.version = Some(semver::VersionReq::parse("^1").unwrap())
        )),
        ["a", "c", "d"]
    );
    assert_eq!(ids(q(&|q| q.tags = vec!["blue".into()])), ["a", "b", "d"]);
    assert_eq!(
        ids(q(&|q| q.tags = vec!["blue".into(), "canary".into()])),
        ["b"]
    );
    assert_eq!(ids(q(&|q| q.zone = Some("eu-1".into()))), ["a"]);
    assert_eq!(
        ids(q(&|q| {
            q.metadata.insert("id".into(), "c".into());
        })),
        ["c"]
    );
}

#[tokio::test]
async fn blocking_waits_return_on_a_change_of_the_service_or_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path()).await;
    let mut req = reg_req("web", "1.0.0", 1);
    req.ttl_ms = Some(60_000);
    r.register_external(req).await.unwrap();
    let index = r.service_index("web");
    assert!(index > 0);
    // An index already passed answers at once.
    let t = std::time::Instant::now();
    assert_eq!(
        r.wait_past(Some("web"), index - 1, Duration::from_secs(5))
            .await,
        index
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    // Nothing changes: the deadline.
    let t = std::time::Instant::now();
    assert_eq!(
        r.wait_past(Some("web"), index, Duration::from_millis(200))
            .await,
        index
    );
    assert!(t.elapsed() >= Duration::from_millis(200));
    // Another service's change does not wake it; this one's does.
    let waiter = {
        let r = r.clone();
        tokio::spawn(async move {
            r.wait_past(Some("web"), index, Duration::from_secs(10))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    r.register_supervised(supervised("api-1", "api", 2));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiter.is_finished());
    r.register_supervised(supervised("web-9", "web", 3));
    let got = tokio::time::timeout(Duration::from_secs(2), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, r.service_index("web"));
    assert!(got > index);
}

#[tokio::test]
async fn concurrent_registrations_publish_together_and_each_snapshot_names_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let r = open(dir.path()).await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(u64, u64, usize)>::new()));
    {
        let seen = seen.clone();
        r.on_change(move |s| {
            seen.lock()
                .unwrap()
                .push((s.since, s.revision, s.changed.len()))
        });
    }
    let mut writes = Vec::new();
    for n in 0..64u16 {
        let mut req = reg_req(&format!("s{}", n % 8), "1.0.0", 1000 + n);
        req.ttl_ms = Some(60_000);
        writes.push(r.register_external(req));
    }
    for w in futures_util::future::join_all(writes).await {
        w.unwrap();
    }
    let seen = seen.lock().unwrap().clone();
    // The first call is the listener's own (the snapshot as it was).
    let published = &seen[1..];
    assert!(
        published.len() < 64,
        "{} snapshots for 64 changes",
        published.len()
    );
    for w in published.windows(2) {
        assert_eq!(w[1].0, w[0].1, "each snapshot is made from the one before");
    }
    assert_eq!(published.last().unwrap().1, 64, "one revision per change");
    assert_eq!(
        (0..8)
            .map(|s| r.snapshot().instances(&format!("s{s}")).len())
            .sum::<usize>(),
        64
    );
}
