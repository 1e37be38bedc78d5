//! The supervisor on its own, with real processes and a real store: it follows the desired
//! state (a service added, a version beside it, the version and the service removed) and runs
//! instance hooks before each start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gantry_config::ConfigStore;
use gantry_model::{
    BackoffSpec, Deployment, HealthSpec, ProbeKind, RestartPolicy, VersionDeployment, VersionSource,
};
use gantry_registry::Registry;
use gantry_store::RedbStore;
use gantry_supervisor::{
    DesiredState, DrainObserver, InstanceAdditions, InstanceFile, InstanceHook, InstanceInfo,
    InstanceState, Supervisor, SupervisorDeps, VersionChange,
};
use gantry_telemetry::{LogFilter, LogStore, Metrics};

struct NoDrain;
impl DrainObserver for NoDrain {
    fn inflight(&self, _: &str) -> usize {
        0
    }
}

/// Gives each instance a variable and a credential file; remembers what it released.
#[derive(Default)]
struct CredHook {
    prepared: AtomicUsize,
    released: Mutex<Vec<String>>,
    dirs: Mutex<BTreeMap<String, PathBuf>>,
}

#[async_trait::async_trait]
impl InstanceHook for CredHook {
    fn name(&self) -> &'static str {
        "test-credentials"
    }
    async fn prepare(&self, i: &InstanceInfo<'_>) -> Result<InstanceAdditions, String> {
        self.prepared.fetch_add(1, Ordering::Relaxed);
        self.dirs
            .lock()
            .unwrap()
            .insert(i.id.to_string(), i.dir.to_path_buf());
        let mut env = BTreeMap::new();
        env.insert(
            "HOOK_VAR".to_string(),
            format!("for-{}-{}", i.id, i.version),
        );
        Ok(InstanceAdditions {
            env,
            files: vec![InstanceFile {
                path: "cred/token".into(),
                contents: format!("secret-of-{}", i.id).into_bytes(),
                mode: 0o600,
            }],
        })
    }
    async fn release(&self, i: &InstanceInfo<'_>) {
        self.released.lock().unwrap().push(i.id.to_string());
    }
}

fn deployment(cwd: &std::path::Path) -> Deployment {
    Deployment {
        service: "worker".into(),
        versions: vec![VersionDeployment {
            version: semver::Version::new(1, 0, 0),
            source: VersionSource::Spec,
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo \"hook=$HOOK_VAR\"; echo \"token=$(cat \"$GANTRY_INSTANCE_DIR/cred/token\")\"; exec sleep 60".into(),
            ],
            cwd: cwd.to_path_buf(),
            env: BTreeMap::new(),
            replicas: 1,
            spec_replicas: 1,
            port: None,
            health: HealthSpec {
                kind: ProbeKind::None,
                ..HealthSpec::default()
            },
            restart: RestartPolicy::Always,
            backoff: BackoffSpec::default(),
            stop_signal: "SIGTERM".into(),
            stop_timeout_ms: 2000,
            drain_timeout_ms: 100,
        }],
        depends_on: Vec::new(),
        on_config_change: Default::default(),
        reload_signal: "SIGHUP".into(),
        config_version: None,
        resources: Default::default(),
        placement: Default::default(),
        metadata: BTreeMap::new(),
    }
}

async fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A supervisor on a fresh store in `dir`, started once `initial` is its desired state; its
/// log store and desired-state writer beside it.
async fn supervisor(
    dir: &std::path::Path,
    initial: Deployment,
    hooks: Vec<Arc<dyn InstanceHook>>,
    system_id: &str,
) -> (Arc<Supervisor>, LogStore, DesiredState) {
    let store = Arc::new(RedbStore::open(&dir.join("data")).unwrap());
    let metrics = Metrics::new();
    let logs = LogStore::new(1 << 20, &metrics);
    let registry = Registry::open(store.clone(), "test".into(), &metrics)
        .await
        .unwrap();
    let desired = DesiredState::new(store.clone());
    desired.apply_spec(vec![initial]).await.unwrap();
    let sup = Supervisor::new(SupervisorDeps {
        registry,
        config: ConfigStore::open(
            store.clone(),
            Arc::new(gantry_secrets::Keyring::new(&[1u8; 32], &[])),
            Default::default(),
        )
        .await
        .unwrap(),
        store,
        logs: logs.clone(),
        metrics,
        drain: Arc::new(NoDrain),
        gateway_url: "http://127.0.0.1:1".into(),
        admin_url: "http://127.0.0.1:1".into(),
        bus_url: None,
        node: "test".into(),
        echo: None,
        instances_dir: dir.join("instances"),
        hooks,
        system_id: system_id.into(),
        environment: None,
    });
    sup.start().await.unwrap();
    (sup, logs, desired)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_desired_state_and_runs_hooks() {
    let dir = tempfile::tempdir().unwrap();
    let hook = Arc::new(CredHook::default());
    let (sup, logs, desired) = supervisor(
        dir.path(),
        deployment(dir.path()),
        vec![hook.clone()],
        "00000000000000a1",
    )
    .await;

    let line = |want: &str| {
        let want = want.to_string();
        let logs = logs.clone();
        move || {
            logs.query(&LogFilter::default())
                .iter()
                .find(|l| l.line == want)
                .map(|l| l.instance.to_string())
        }
    };
    // The hook's variable and file reached the process; the file is private.
    wait_until("the hook's variable", line("hook=for-worker-1-1.0.0")).await;
    wait_until("the hook's file", line("token=secret-of-worker-1")).await;
    let idir = hook.dirs.lock().unwrap()["worker-1"].clone();
    assert_eq!(idir, dir.path().join("instances/worker-1"));
    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(idir.join("cred/token")), 0o600);
    assert_eq!(mode(idir.clone()), 0o700);

    // A second version beside the first: its own instance, registered with its version.
    desired
        .put_version(
            "worker",
            semver::Version::new(2, 0, 0),
            VersionChange {
                replicas: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    wait_until("worker-2 at 2.0.0", line("hook=for-worker-2-2.0.0")).await;
    let running = |sup: &Supervisor| {
        let mut v: Vec<(String, String)> = sup
            .instances()
            .into_iter()
            .filter(|i| i.state == InstanceState::Healthy)
            .map(|i| (i.id, i.version))
            .collect();
        v.sort();
        v
    };
    wait_until("both versions running", || {
        (running(&sup)
            == [
                ("worker-1".to_string(), "1.0.0".to_string()),
                ("worker-2".to_string(), "2.0.0".to_string()),
            ])
        .then_some(())
    })
    .await;
    assert_eq!(sup.services()[0].version, "1.0.0, 2.0.0");

    // The version leaves: its instance stops, its directory goes, its credentials are released.
    desired
        .remove_version("worker", &semver::Version::new(2, 0, 0))
        .await
        .unwrap();
    wait_until("worker-2 released", || {
        hook.released
            .lock()
            .unwrap()
            .contains(&"worker-2".to_string())
            .then_some(())
    })
    .await;
    assert!(!dir.path().join("instances/worker-2").exists());
    assert_eq!(running(&sup).len(), 1);

    // The service leaves the desired state.
    let report = desired.apply_spec(Vec::new()).await.unwrap();
    assert_eq!(report.removed, ["worker"]);
    wait_until("the service gone", || {
        (sup.instances().is_empty() && !sup.has_service("worker")).then_some(())
    })
    .await;
    assert!(!idir.exists());
    assert!(hook.prepared.load(Ordering::Relaxed) >= 2);
    sup.shutdown().await;
}

/// A replacement whose new instance never becomes healthy stops, keeps the old instance serving,
/// and is tried again until it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_replacement_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = deployment(dir.path());
    d.versions[0].command = vec!["sh".into(), "-c".into(), "exec sleep 60".into()];
    let (sup, _logs, desired) =
        supervisor(dir.path(), d.clone(), Vec::new(), "00000000000000a2").await;
    let healthy = |sup: &Supervisor| -> Vec<String> {
        sup.instances()
            .into_iter()
            .filter(|i| i.state == InstanceState::Healthy)
            .map(|i| i.id)
            .collect()
    };
    wait_until("worker-1", || (healthy(&sup) == ["worker-1"]).then_some(())).await;
    // The new deployment's instances only pass their probe once a flag file exists.
    let flag = dir.path().join("flag");
    d.versions[0].command = vec!["sh".into(), "-c".into(), "exec sleep 61".into()];
    d.versions[0].health = HealthSpec {
        kind: ProbeKind::Exec,
        command: Some(vec![
            "sh".into(),
            "-c".into(),
            format!("test -f {}", flag.display()),
        ]),
        interval_ms: 100,
        start_grace_ms: 200,
        ..HealthSpec::default()
    };
    desired.apply_spec(vec![d]).await.unwrap();
    // The first attempt stops; the old instance keeps serving.
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    assert!(
        healthy(&sup).contains(&"worker-1".to_string()),
        "{:?}",
        sup.instances()
    );
    // Once the new deployment can run, the retry replaces the old instance.
    std::fs::write(&flag, b"").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let h = healthy(&sup);
        if !h.is_empty() && !h.contains(&"worker-1".to_string()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not retried: {:?}",
            sup.instances()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    sup.shutdown().await;
}
