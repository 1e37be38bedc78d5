//! Versioned configuration per service.
//!
//! Every change (set, unset, rollback) is a new immutable version holding the full set of values,
//! the time, a message and which keys changed. In the store's `config` bucket, `<service>.head`
//! holds the current version (one read) and `<service>.<version, 12 digits>` each version.
//! A commit is a compare-and-set of the head, so two writers (later: two nodes) can never both
//! claim a version; the version's own key is written after it, and a commit first repairs the
//! record of the version before it if a crash came between the two. Values reach instances as
//! environment variables when they start.
//!
//! Architecture invariant: a version is returned to the caller only after its head is durable;
//! the current values of a service are those of its head.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::sync::Arc;

use gantry_store::{Store, StoreError, StoreJsonExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Mutex};

const BUCKET: &str = "config";
/// Largest value accepted, in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most keys one service may have.
pub const MAX_KEYS: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("service {service} has no config version {version}")]
    NoSuchVersion { service: String, version: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    Set,
    Unset,
}

/// One key a version changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyChange {
    pub key: String,
    pub kind: ChangeKind,
}

/// One stored version of a service's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigVersion {
    pub service: String,
    pub version: u64,
    pub time_ms: u64,
    pub message: String,
    pub changes: Vec<KeyChange>,
    pub values: BTreeMap<String, String>,
    /// Set when this version restored the values of an earlier one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
}

/// A request to change some keys.
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeRequest {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub unset: Vec<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// Published after each new version.
#[derive(Debug, Clone)]
pub struct ConfigChanged {
    pub service: String,
    pub version: u64,
}

/// The current values of a service (version 0 and no values when it has no config).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CurrentConfig {
    pub service: String,
    pub version: u64,
    pub values: BTreeMap<String, String>,
}

/// Outcome of a change: the version now current, and whether this call created it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Committed {
    pub version: ConfigVersion,
    pub created: bool,
}

pub struct ConfigStore {
    store: Arc<dyn Store>,
    write: Mutex<()>,
    events: broadcast::Sender<ConfigChanged>,
}

fn version_key(service: &str, version: u64) -> String {
    format!("{service}.{version:012}")
}

fn head_key(service: &str) -> String {
    format!("{service}.head")
}

impl ConfigStore {
    pub fn new(store: Arc<dyn Store>) -> Self {
        let (events, _) = broadcast::channel(256);
        Self {
            store,
            write: Mutex::new(()),
            events,
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ConfigChanged> {
        self.events.subscribe()
    }

    /// Every version of `service`, oldest first.
    pub async fn history(&self, service: &str) -> Result<Vec<ConfigVersion>, ConfigError> {
        check_service(service)?;
        let rows: Vec<(String, ConfigVersion, u64)> = self
            .store
            .list_json(BUCKET, &format!("{service}.*"))
            .await?;
        let mut versions: Vec<ConfigVersion> = rows
            .into_iter()
            .filter(|(k, _, _)| !k.ends_with(".head"))
            .map(|(_, v, _)| v)
            .collect();
        // The head's own record is missing when a crash came between the two writes.
        if let Some((head, _)) = self.head(service).await? {
            if versions.last().is_none_or(|v| v.version < head.version) {
                versions.push(head);
            }
        }
        Ok(versions)
    }

    /// The head and its store revision. Data written before heads existed has none until its
    /// next commit: its highest version is current.
    async fn head(&self, service: &str) -> Result<Option<(ConfigVersion, u64)>, ConfigError> {
        if let Some(h) = self.store.get_json(BUCKET, &head_key(service)).await? {
            return Ok(Some(h));
        }
        let rows: Vec<(String, ConfigVersion, u64)> = self
            .store
            .list_json(BUCKET, &format!("{service}.*"))
            .await?;
        Ok(rows
            .into_iter()
            .filter(|(k, _, _)| !k.ends_with(".head"))
            .map(|(_, v, _)| (v, 0))
            .next_back())
    }

    /// The current version, if the service has any config.
    pub async fn current(&self, service: &str) -> Result<Option<ConfigVersion>, ConfigError> {
        check_service(service)?;
        Ok(self.head(service).await?.map(|(v, _)| v))
    }

    /// Current values (empty when the service has no config).
    pub async fn values(&self, service: &str) -> Result<BTreeMap<String, String>, ConfigError> {
        Ok(self
            .current(service)
            .await?
            .map(|v| v.values)
            .unwrap_or_default())
    }

    /// One version by number.
    pub async fn version(&self, service: &str, version: u64) -> Result<ConfigVersion, ConfigError> {
        check_service(service)?;
        match self
            .store
            .get_json::<ConfigVersion>(BUCKET, &version_key(service, version))
            .await?
        {
            Some((v, _)) => Ok(v),
            None => match self.head(service).await? {
                // The head's own record is missing when a crash came between the two writes.
                Some((head, _)) if head.version == version => Ok(head),
                _ => Err(ConfigError::NoSuchVersion {
                    service: service.into(),
                    version,
                }),
            },
        }
    }

    /// Services that have config, sorted.
    pub async fn services(&self) -> Result<Vec<String>, ConfigError> {
        let keys = self.store.keys(BUCKET, ">").await?;
        let mut out: Vec<String> = keys
            .into_iter()
            .filter_map(|k| k.split_once('.').map(|(s, _)| s.to_string()))
            .collect();
        out.dedup();
        Ok(out)
    }

    /// Apply a change; a change that alters nothing creates no version.
    pub async fn change(
        &self,
        service: &str,
        req: ChangeRequest,
    ) -> Result<Committed, ConfigError> {
        check_service(service)?;
        if req.set.is_empty() && req.unset.is_empty() {
            return Err(ConfigError::Invalid(
                "nothing to change: give keys to set or unset".into(),
            ));
        }
        for (k, v) in &req.set {
            check_key(k)?;
            if v.len() > MAX_VALUE_BYTES {
                return Err(ConfigError::Invalid(format!(
                    "set.{k}: value is {} bytes; at most {MAX_VALUE_BYTES} allowed",
                    v.len()
                )));
            }
            if v.contains('\0') {
                return Err(ConfigError::Invalid(format!(
                    "set.{k}: value must not contain NUL (it becomes an environment variable)"
                )));
            }
        }
        for k in &req.unset {
            check_key(k)?;
            if req.set.contains_key(k) {
                return Err(ConfigError::Invalid(format!(
                    "{k}: both set and unset in one change"
                )));
            }
        }
        let message = check_message(req.message)?;
        let _guard = self.write.lock().await;
        let head = self.head(service).await?;
        let current = head.as_ref().map(|(v, _)| v.clone());
        let mut values = current
            .as_ref()
            .map(|c| c.values.clone())
            .unwrap_or_default();
        let mut changes = Vec::new();
        for (k, v) in req.set {
            if values.get(&k) != Some(&v) {
                changes.push(KeyChange {
                    key: k.clone(),
                    kind: ChangeKind::Set,
                });
                values.insert(k, v);
            }
        }
        for k in req.unset {
            if values.remove(&k).is_some() {
                changes.push(KeyChange {
                    key: k,
                    kind: ChangeKind::Unset,
                });
            }
        }
        if changes.is_empty() {
            if let Some(c) = current {
                return Ok(Committed {
                    version: c,
                    created: false,
                });
            }
        }
        if values.len() > MAX_KEYS {
            return Err(ConfigError::Invalid(format!(
                "a service may have at most {MAX_KEYS} keys"
            )));
        }
        self.commit(service, head, values, changes, message, None)
            .await
    }

    /// Make the values of `to` current again, as a new version.
    pub async fn rollback(
        &self,
        service: &str,
        to: u64,
        message: Option<String>,
    ) -> Result<Committed, ConfigError> {
        let message = check_message(message)?;
        let _guard = self.write.lock().await;
        let target = self.version(service, to).await?;
        let head = self.head(service).await?;
        let current = head.as_ref().map(|(v, _)| v);
        let cur_values = current
            .as_ref()
            .map(|c| c.values.clone())
            .unwrap_or_default();
        let mut changes = Vec::new();
        for (k, v) in &target.values {
            if cur_values.get(k) != Some(v) {
                changes.push(KeyChange {
                    key: k.clone(),
                    kind: ChangeKind::Set,
                });
            }
        }
        for k in cur_values.keys() {
            if !target.values.contains_key(k) {
                changes.push(KeyChange {
                    key: k.clone(),
                    kind: ChangeKind::Unset,
                });
            }
        }
        let message = if message.is_empty() {
            format!("rollback to version {to}")
        } else {
            message
        };
        self.commit(service, head, target.values, changes, message, Some(to))
            .await
    }

    /// Make a new version current: compare-and-set of the head (the commit point), then the
    /// version's own record.
    async fn commit(
        &self,
        service: &str,
        head: Option<(ConfigVersion, u64)>,
        values: BTreeMap<String, String>,
        changes: Vec<KeyChange>,
        message: String,
        rollback_of: Option<u64>,
    ) -> Result<Committed, ConfigError> {
        let previous = head.as_ref().map_or(0, |(v, _)| v.version);
        if let Some((prev, _)) = &head {
            // Repair the record of the previous version if a crash lost it.
            match self
                .store
                .create_json(BUCKET, &version_key(service, prev.version), prev)
                .await
            {
                Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let v = ConfigVersion {
            service: service.into(),
            version: previous + 1,
            time_ms: gantry_model::unix_ms(),
            message,
            changes,
            values,
            rollback_of,
        };
        match head {
            Some((_, rev)) if rev > 0 => {
                self.store
                    .update_json(BUCKET, &head_key(service), &v, rev)
                    .await?
            }
            _ => {
                self.store
                    .create_json(BUCKET, &head_key(service), &v)
                    .await?
            }
        };
        // Committed: the head holds it. Its own record is repaired by the next commit (and
        // served from the head meanwhile) if this write fails.
        if let Err(e) = self
            .store
            .put_json(BUCKET, &version_key(service, v.version), &v)
            .await
        {
            tracing::warn!(service, version = v.version, error = %e, "config version committed, its history record not yet written");
        }
        tracing::info!(service, version = v.version, "config version committed");
        let _ = self.events.send(ConfigChanged {
            service: service.into(),
            version: v.version,
        });
        Ok(Committed {
            version: v,
            created: true,
        })
    }
}

fn check_service(service: &str) -> Result<(), ConfigError> {
    if gantry_model::is_valid_service_name(service) {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "invalid service name {service:?}; expected 1-63 characters of a-z, 0-9 and '-' starting with a letter"
        )))
    }
}

fn check_key(key: &str) -> Result<(), ConfigError> {
    if !gantry_spec::is_valid_env_name(key) || key.len() > 256 {
        return Err(ConfigError::Invalid(format!(
            "invalid key {key:?}: keys become environment variables, so use letters, digits and '_' (not starting with a digit, at most 256)"
        )));
    }
    if gantry_spec::is_reserved_env(key) {
        return Err(ConfigError::Invalid(format!(
            "key {key:?} is reserved: PORT and GANTRY_* are set by gantry"
        )));
    }
    Ok(())
}

fn check_message(m: Option<String>) -> Result<String, ConfigError> {
    let m = m.unwrap_or_default();
    if m.len() > 1024 {
        return Err(ConfigError::Invalid("message: at most 1024 bytes".into()));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use gantry_store::RedbStore;

    fn set(kv: &[(&str, &str)], msg: &str) -> ChangeRequest {
        ChangeRequest {
            set: kv
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            unset: vec![],
            message: Some(msg.into()),
        }
    }

    #[tokio::test]
    async fn versions_history_rollback_and_durability() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = ConfigStore::new(Arc::new(RedbStore::open(dir.path()).unwrap()));
            let mut rx = c.subscribe();
            let v1 = c
                .change("cat", set(&[("CURRENCY", "USD")], "first"))
                .await
                .unwrap();
            assert!(v1.created);
            assert_eq!(v1.version.version, 1);
            assert_eq!(rx.try_recv().unwrap().version, 1);
            let v2 = c
                .change("cat", set(&[("CURRENCY", "EUR"), ("TAX", "20")], "eu"))
                .await
                .unwrap();
            assert_eq!(v2.version.version, 2);
            // No-op change: no new version.
            let same = c
                .change("cat", set(&[("CURRENCY", "EUR")], "again"))
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
                )
                .await
                .unwrap();
            assert_eq!(
                v3.version.changes,
                vec![KeyChange {
                    key: "TAX".into(),
                    kind: ChangeKind::Unset
                }]
            );
            let rb = c.rollback("cat", 1, None).await.unwrap();
            assert_eq!(rb.version.version, 4);
            assert_eq!(rb.version.rollback_of, Some(1));
            assert_eq!(rb.version.values.get("CURRENCY").unwrap(), "USD");
        }
        let c = ConfigStore::new(Arc::new(RedbStore::open(dir.path()).unwrap()));
        let h = c.history("cat").await.unwrap();
        assert_eq!(
            h.iter().map(|v| v.version).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(h[1].message, "eu");
        assert_eq!(
            c.values("cat").await.unwrap().get("CURRENCY").unwrap(),
            "USD"
        );
        assert_eq!(c.services().await.unwrap(), ["cat"]);
        assert!(c.values("dog").await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn rejects_bad_changes() {
        let dir = tempfile::tempdir().unwrap();
        let c = ConfigStore::new(Arc::new(RedbStore::open(dir.path()).unwrap()));
        for (svc, req) in [
            ("Bad", set(&[("A", "1")], "")),
            ("ok", set(&[("PORT", "1")], "")),
            ("ok", set(&[("GANTRY_X", "1")], "")),
            ("ok", set(&[("1A", "1")], "")),
            ("ok", set(&[("A-B", "1")], "")),
            ("ok", set(&[("A", "x\0y")], "")),
            ("ok", ChangeRequest::default()),
        ] {
            assert!(
                matches!(c.change(svc, req).await, Err(ConfigError::Invalid(_))),
                "{svc}"
            );
        }
        let big = "x".repeat(MAX_VALUE_BYTES + 1);
        assert!(c.change("ok", set(&[("A", &big)], "")).await.is_err());
        assert!(matches!(
            c.rollback("ok", 7, None).await,
            Err(ConfigError::NoSuchVersion { .. })
        ));
    }
}
