//! The data directory: its lock, the store the spec chose, the admin token and `admin.json`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context};
use gantry_spec::{LoadedSpec, StoreBackend, StoreSpec};
use gantry_store::{NatsOptions, NatsStore, RedbStore, Store, StoreError};
use serde::{Deserialize, Serialize};

/// Written by `gantry up` into the data directory so that the CLI can find it.
#[derive(Debug, Serialize, Deserialize)]
pub struct AdminInfo {
    pub admin_url: String,
    pub gateway_url: String,
    /// The token service's URL on this machine (the issuer's own URL may differ).
    #[serde(default)]
    pub identity_url: String,
    /// The Consul-compatible listener, when `[registry] consul` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consul_url: Option<String>,
    /// The Eureka-compatible listener, when `[registry] eureka` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eureka_url: Option<String>,
    /// The Spring Cloud Config endpoint, when `[config] spring` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spring_config_url: Option<String>,
    /// The DNS listener (UDP and TCP), when `[registry] dns` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_addr: Option<String>,
    pub pid: u32,
    pub started_ms: u64,
}

pub const ADMIN_INFO_FILE: &str = "admin.json";
pub const TOKEN_FILE: &str = "admin-token";

pub(crate) struct DataDir {
    pub dir: PathBuf,
    pub lock: std::fs::File,
    pub store: Arc<dyn Store>,
    /// The bus's log: the embedded segment log in `bus/`, or JetStream beside the NATS store.
    pub log: Arc<dyn gantry_store::Log>,
    pub token: Arc<str>,
    /// Marks this system's processes (`GANTRY_SYSTEM`); kept in `system-id`.
    pub system_id: String,
    /// What secrets (config secrets, private keys) are sealed with in the store: the current
    /// key (`GANTRY_SECRETS_KEY`, else `secrets.key`, made once, 0600) and, during a rotation,
    /// the previous ones (`GANTRY_SECRETS_KEY_PREVIOUS`, else `secrets.key.previous`).
    pub keyring: Arc<gantry_secrets::Keyring>,
}

impl DataDir {
    /// `fresh`: forget the state of earlier runs first (the embedded store's file, or every
    /// bucket of the NATS namespace).
    pub async fn open(
        spec: &LoadedSpec,
        fresh: bool,
        metrics: &gantry_telemetry::Metrics,
    ) -> anyhow::Result<Self> {
        let dir = spec.data_dir();
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create data directory {}", dir.display()))?;
        let lock = lock_data_dir(&dir)?;
        if fresh && spec.spec.store.backend == StoreBackend::Embedded {
            let file = dir.join("state.redb");
            match std::fs::remove_file(&file) {
                Ok(()) => tracing::info!(file = %file.display(), "--fresh: earlier state removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow!("--fresh: cannot remove {}: {e}", file.display())),
            }
            let bus = dir.join(BUS_DIR);
            match std::fs::remove_dir_all(&bus) {
                Ok(()) => tracing::info!(dir = %bus.display(), "--fresh: earlier messages removed"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow!("--fresh: cannot remove {}: {e}", bus.display())),
            }
        }
        let (store, log) = open_store(&spec.spec.store, &dir, fresh).await?;
        let store: Arc<dyn Store> = metrics.register("store", |r| {
            Arc::new(gantry_store::MeteredStore::new(store, r))
        });
        tracing::info!(
            backend = store.backend(),
            "store open{}",
            match spec.spec.store.backend {
                StoreBackend::Nats => format!(
                    " (NATS at {}, namespace {}, {} replica(s))",
                    spec.spec.store.url, spec.spec.store.namespace, spec.spec.store.replicas
                ),
                StoreBackend::Embedded => format!(" ({})", dir.join("state.redb").display()),
            }
        );
        let token: Arc<str> = admin_token(&dir)?.into();
        let system_id = system_id(&dir)?;
        let keyring = Arc::new(gantry_secrets::Keyring::new(
            &secrets_key(&dir)?,
            &previous_secrets_keys(&dir)?,
        ));
        Ok(Self {
            dir,
            lock,
            store,
            log,
            token,
            system_id,
            keyring,
        })
    }
}

pub const SECRETS_KEY_FILE: &str = "secrets.key";
pub const SECRETS_KEY_ENV: &str = "GANTRY_SECRETS_KEY";
pub const PREVIOUS_SECRETS_KEY_FILE: &str = "secrets.key.previous";
pub const PREVIOUS_SECRETS_KEY_ENV: &str = "GANTRY_SECRETS_KEY_PREVIOUS";

use gantry_secrets::decode_key;

/// Keys of a rotation in progress: what sealed values may still be sealed with (resealed under
/// the current key as they are loaded). `GANTRY_SECRETS_KEY_PREVIOUS` (comma-separated), else
/// `secrets.key.previous` (one per line); none when neither is there.
fn previous_secrets_keys(dir: &Path) -> anyhow::Result<Vec<[u8; 32]>> {
    let (text, from) = match std::env::var(PREVIOUS_SECRETS_KEY_ENV) {
        Ok(v) => (v.replace(',', "\n"), PREVIOUS_SECRETS_KEY_ENV.to_string()),
        Err(_) => {
            let path = dir.join(PREVIOUS_SECRETS_KEY_FILE);
            match std::fs::read_to_string(&path) {
                Ok(t) => (t, path.display().to_string()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                Err(e) => return Err(anyhow!("cannot read {}: {e}", path.display())),
            }
        }
    };
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .enumerate()
        .map(|(n, l)| {
            decode_key(l)
                .ok_or_else(|| anyhow!("{from}: key {} is not 32 bytes in base64url", n + 1))
        })
        .collect()
}

/// The key private keys are sealed with: `GANTRY_SECRETS_KEY` (base64url of 32 bytes: what
/// gantrys sharing a store must all have), else the data directory's `secrets.key`, made once.
fn secrets_key(dir: &Path) -> anyhow::Result<[u8; 32]> {
    if let Ok(v) = std::env::var(SECRETS_KEY_ENV) {
        return decode_key(&v).ok_or_else(|| {
            anyhow!("{SECRETS_KEY_ENV} must be 32 bytes in base64url (e.g. from: head -c 32 /dev/urandom | basenc --base64url | tr -d =)")
        });
    }
    let path = dir.join(SECRETS_KEY_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) => {
            decode_key(&t).ok_or_else(|| anyhow!("{} is not 32 bytes in base64url", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut k = [0u8; 32];
            getrandom::fill(&mut k).map_err(|e| anyhow!("random source: {e}"))?;
            write_private(dir, SECRETS_KEY_FILE, &gantry_secrets::encode_key(&k))?;
            Ok(k)
        }
        Err(e) => Err(anyhow!("cannot read {}: {e}", path.display())),
    }
}

/// This system's id: generated once, kept in the data directory.
fn system_id(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join("system-id");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim();
        if t.len() == 16 && t.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Ok(t.to_string());
        }
    }
    let id = gantry_registry::random_hex(8);
    write_private(dir, "system-id", &id)?;
    Ok(id)
}

fn write_private(dir: &Path, name: &str, contents: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// The admin token: generated once, kept in the data directory (mode 0600).
fn admin_token(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join(TOKEN_FILE);
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if t.len() >= 32 {
            return Ok(t);
        }
    }
    let token = gantry_registry::random_hex(32);
    write_private(dir, TOKEN_FILE, &token)?;
    Ok(token)
}

pub(crate) fn write_admin_info(dir: &Path, info: &AdminInfo) -> anyhow::Result<PathBuf> {
    let path = dir.join(ADMIN_INFO_FILE);
    let tmp = dir.join(format!("{ADMIN_INFO_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(info)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Keeps a second gantry off this data directory (and so off its store) while this one runs.
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = data_dir.join("gantry.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow!(
            "data directory {} is in use by another gantry; stop it first (or give this spec another [store] data_dir)",
            data_dir.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow!("cannot lock {}: {e}", path.display()))
        }
    }
}

/// Where instance output is kept on disk (whatever the store backend, and across `--fresh`:
/// a node's journal of what ran).
pub const LOGS_DIR: &str = "logs";

/// The log store: the newest lines in memory, every line in `logs/` with the spec's retention.
pub(crate) async fn open_logs(
    spec: &gantry_spec::LogsSpec,
    data_dir: &Path,
    metrics: &gantry_telemetry::Metrics,
) -> anyhow::Result<gantry_telemetry::LogStore> {
    let dir = data_dir.join(LOGS_DIR);
    let log = gantry_store::SegmentLog::open(&dir)
        .map_err(|e| anyhow!("the log store in {}: {e}", dir.display()))?;
    let retention = gantry_store::StreamOptions {
        max_bytes: Some(spec.max_disk_bytes),
        max_age: humantime::parse_duration(&spec.max_age).ok(),
        max_record_bytes: gantry_telemetry::logs::MAX_RECORD_BYTES,
        ..Default::default()
    };
    gantry_telemetry::LogStore::open(spec.max_bytes, metrics, Arc::new(log), retention)
        .await
        .map_err(|e| anyhow!("the log store in {}: {e}", dir.display()))
}

/// Where the embedded bus log lives in the data directory.
pub const BUS_DIR: &str = "bus";

type Backends = (Arc<dyn Store>, Arc<dyn gantry_store::Log>);

/// The store the spec asks for (embedded in the data directory, or NATS JetStream KV) and the
/// bus's log beside it.
async fn open_store(spec: &StoreSpec, data_dir: &Path, fresh: bool) -> anyhow::Result<Backends> {
    match spec.backend {
        StoreBackend::Embedded => {
            let store: Arc<dyn Store> = match RedbStore::open(data_dir) {
                Ok(s) => Arc::new(s),
                Err(StoreError::Locked(d)) => return Err(anyhow!(
                    "data directory {d} is in use by another gantry; stop it first (or give this spec another [store] data_dir)"
                )),
                Err(e) => return Err(e.into()),
            };
            let log = gantry_store::SegmentLog::open(&data_dir.join(BUS_DIR))
                .map_err(|e| anyhow!("the bus's log: {e}"))?;
            Ok((store, Arc::new(log)))
        }
        StoreBackend::Nats => {
            let mut o = NatsOptions::new(spec.url.clone());
            o.replicas = usize::from(spec.replicas);
            o.namespace = spec.namespace.clone();
            let s = NatsStore::connect(o)
                .await
                .map_err(|e| anyhow!("[store] backend = \"nats\": {e}"))?;
            if fresh {
                let n = s
                    .destroy_namespace()
                    .await
                    .map_err(|e| anyhow!("--fresh: {e}"))?;
                tracing::info!(buckets = n, namespace = %spec.namespace, "--fresh: earlier state removed");
            }
            let s = Arc::new(s);
            let log = Arc::new(gantry_store::NatsLog::new(s.clone()));
            Ok((s, log))
        }
    }
}
