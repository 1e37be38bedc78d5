//! Versioned configuration: per service a *set* of keys, plus the global set every service
//! inherits, each in layers (base, per environment, per instance), rolled out like code.
//!
//! In the store's `config` bucket, `<set>.head` holds the current version: its record (who,
//! when, why, which keys changed with their values before and after) and every current value.
//! `<set>.<version, 12 digits>` holds each retained version's record — what changed, not the
//! unchanged values, so history costs what changed. A commit of any number of keys is one
//! compare-and-set of the head (seen whole or not at all; two writers, or two gantrys, cannot
//! both claim a version); the version's own record is written after it, and the next commit
//! first repairs the record of the version before it if a crash came between. The values of an
//! older version are the head's with the later versions' changes undone. History keeps the last
//! `history` versions of each set (older records are deleted as new ones come).
//!
//! Secrets are sealed (AES-256-GCM, [`gantry_secrets::Keyring`]) before they reach the store,
//! bound to their set, layer and key, and redacted in every view unless revealed.
//!
//! Change events come from a watch of the heads, so a commit made by another gantry sharing the
//! store is announced here too.
//!
//! Architecture invariant: a version is returned to the caller only after its head is durable;
//! the current values of a set are those of its head.
#![forbid(unsafe_code)]

pub mod format;
pub mod model;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use gantry_secrets::Keyring;
use gantry_store::{Entry, Store, StoreError, StoreJsonExt, WatchEvent, WatchFrom};
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::{broadcast, Mutex};

use model::{Change, Entries, Head, Record, Stored, FORMAT};
pub use model::{
    ChangeKind, ChangeRequest, ChangeView, Committed, ConfigView, Document, Layer, LayerDoc,
    Resolved, ResolvedView, VersionView, GLOBAL,
};

const BUCKET: &str = "config";
/// Largest value accepted (its JSON text), in bytes.
pub const MAX_VALUE_BYTES: usize = 64 * 1024;
/// Most keys one layer may have.
pub const MAX_KEYS: usize = 1024;
/// Most layers (environments and instances) one set may have.
pub const MAX_LAYERS: usize = 256;
/// Largest set (every value of every layer), in bytes.
pub const MAX_SET_BYTES: usize = 1024 * 1024;
/// Versions of each set history keeps by default.
pub const DEFAULT_HISTORY: u64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Invalid(String),
    #[error("{set} has no config version {version}{}", if *.pruned { " (older than what history keeps)" } else { "" })]
    NoSuchVersion {
        set: String,
        version: u64,
        pruned: bool,
    },
    #[error("config changed concurrently; try again")]
    Conflict,
    #[error("{0}")]
    Secret(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Published for each new version of a set (from this gantry or another sharing the store).
#[derive(Debug, Clone)]
pub struct ConfigChanged {
    pub set: String,
    pub version: u64,
    /// Set when this version is an automatic revert (a rollout failed): not reverted again.
    pub reverts: Option<u64>,
}

/// What the store keeps and how.
#[derive(Debug, Clone)]
pub struct ConfigOptions {
    /// Versions of each set history keeps (2..=10000).
    pub history: u64,
}

impl Default for ConfigOptions {
    fn default() -> Self {
        Self {
            history: DEFAULT_HISTORY,
        }
    }
}

/// One key to change in a commit: `None` removes it.
#[derive(Debug, Clone)]
pub struct Edit {
    pub layer: Layer,
    pub key: String,
    pub value: Option<NewValue>,
}

#[derive(Clone)]
pub struct NewValue {
    pub value: Value,
    pub secret: bool,
}

impl std::fmt::Debug for NewValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.secret {
            f.write_str("NewValue(<secret, redacted>)")
        } else {
            write!(f, "NewValue({:?})", self.value)
        }
    }
}

/// Who commits and why.
#[derive(Debug, Clone, Default)]
pub struct Author {
    pub name: String,
    pub message: String,
}

pub struct ConfigStore {
    store: Arc<dyn Store>,
    keyring: Arc<Keyring>,
    options: ConfigOptions,
    write: Mutex<()>,
    events: broadcast::Sender<ConfigChanged>,
    /// Versions something runs by (a deployment pinned to a config version): history keeps
    /// them, and every version after them, whatever its retention says.
    pins: std::sync::Mutex<BTreeMap<String, BTreeSet<u64>>>,
}

fn version_key(set: &str, version: u64) -> String {
    format!("{set}.{version:012}")
}

fn head_key(set: &str) -> String {
    format!("{set}.head")
}

fn aad(set: &str, layer: &str, key: &str) -> String {
    format!("config/{set}/{layer}/{key}")
}

impl ConfigStore {
    /// Open the config store: upgrade sets written by earlier versions of gantry (full values
    /// per version) to records of changes, reseal secrets sealed under a previous secrets key,
    /// and follow the heads for change events.
    pub async fn open(
        store: Arc<dyn Store>,
        keyring: Arc<Keyring>,
        options: ConfigOptions,
    ) -> Result<Arc<Self>, ConfigError> {
        if !(2..=10_000).contains(&options.history) {
            return Err(ConfigError::Invalid(format!(
                "config history: expected 2..=10000 versions, got {}",
                options.history
            )));
        }
        let (events, _) = broadcast::channel(1024);
        let c = Arc::new(Self {
            store,
            keyring,
            options,
            write: Mutex::new(()),
            pins: std::sync::Mutex::new(BTreeMap::new()),
            events,
        });
        // Every set with rows, a head or not (sets written before heads existed have none).
        let mut sets: Vec<String> = c
            .store
            .keys(BUCKET, ">")
            .await?
            .into_iter()
            .filter_map(|k| k.split_once('.').map(|(s, _)| s.to_string()))
            .collect();
        sets.dedup();
        for set in sets {
            c.upgrade(&set).await?;
        }
        // Follow the heads: the watch is running before open returns, so no commit after it
        // goes unannounced.
        let watcher = c.store.watch(BUCKET, "*.head", WatchFrom::New).await?;
        let mut seen = BTreeMap::new();
        for set in c.sets().await? {
            seen.insert(set.clone(), c.version_of(&set).await?);
        }
        tokio::spawn(follow(Arc::downgrade(&c), watcher, seen));
        Ok(c)
    }

    /// Keep `version` of `set` readable (a deployment runs by it) until [`ConfigStore::unpin`].
    pub fn pin(&self, set: &str, version: u64) {
        self.pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(set.to_string())
            .or_default()
            .insert(version);
    }

    pub fn unpin(&self, set: &str, version: u64) {
        let mut pins = self
            .pins
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = pins.get_mut(set) {
            v.remove(&version);
            if v.is_empty() {
                pins.remove(set);
            }
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ConfigChanged> {
        self.events.subscribe()
    }

    /// Sets that have config (services and `_global`), sorted.
    pub async fn sets(&self) -> Result<Vec<String>, ConfigError> {
        let keys = self.store.keys(BUCKET, "*.head").await?;
        Ok(keys
            .into_iter()
            .filter_map(|k| k.strip_suffix(".head").map(str::to_string))
            .collect())
    }

    async fn head(&self, set: &str) -> Result<Option<(Head, u64)>, ConfigError> {
        Ok(self.store.get_json::<Head>(BUCKET, &head_key(set)).await?)
    }

    /// The current version of a set as the API shows it (version 0 when it has none).
    pub async fn view(&self, set: &str, reveal: bool) -> Result<ConfigView, ConfigError> {
        check_set(set)?;
        Ok(match self.head(set).await? {
            None => ConfigView {
                set: set.into(),
                version: 0,
                time_ms: 0,
                author: String::new(),
                message: String::new(),
                document: Document::default(),
            },
            Some((h, _)) => ConfigView {
                set: set.into(),
                version: h.record.version,
                time_ms: h.record.time_ms,
                author: h.record.author.clone(),
                message: h.record.message.clone(),
                document: self.document(set, &h.entries, reveal)?,
            },
        })
    }

    /// The current version number (0: none).
    pub async fn version_of(&self, set: &str) -> Result<u64, ConfigError> {
        check_set(set)?;
        Ok(self.head(set).await?.map_or(0, |(h, _)| h.record.version))
    }

    /// Every retained version of a set, oldest first.
    pub async fn history(&self, set: &str, reveal: bool) -> Result<Vec<VersionView>, ConfigError> {
        check_set(set)?;
        let records = self.records(set).await?;
        records
            .iter()
            .map(|r| self.version_view(r, reveal))
            .collect()
    }

    /// One version's record.
    pub async fn version(
        &self,
        set: &str,
        version: u64,
        reveal: bool,
    ) -> Result<VersionView, ConfigError> {
        check_set(set)?;
        match self.record(set, version).await? {
            Some(r) => self.version_view(&r, reveal),
            None => {
                let records = self.records(set).await?;
                Err(self.no_such(set, version, &records))
            }
        }
    }

    /// One retained record (the head's own included).
    async fn record(&self, set: &str, version: u64) -> Result<Option<Record>, ConfigError> {
        let Some((head, _)) = self.head(set).await? else {
            return Ok(None);
        };
        if version == head.record.version {
            return Ok(Some(head.record));
        }
        if version < head.oldest || version > head.record.version {
            return Ok(None);
        }
        match self
            .store
            .get_json::<Record>(BUCKET, &version_key(set, version))
            .await
        {
            Ok(r) => Ok(r.map(|(r, _)| r)),
            Err(StoreError::Corrupt { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Retained records, oldest first; the head's own record included even if its write was
    /// lost to a crash.
    async fn records(&self, set: &str) -> Result<Vec<Record>, ConfigError> {
        let Some((head, _)) = self.head(set).await? else {
            return Ok(Vec::new());
        };
        let rows: Vec<(String, Record, u64)> = self
            .store
            .list_json(BUCKET, &format!("{set}.*"))
            .await
            .or_else(|e| match e {
                // A head written by an older gantry is upgraded at open; nothing else is here.
                StoreError::Corrupt { .. } => Ok(Vec::new()),
                e => Err(e),
            })?
            .into_iter()
            .filter(|(k, _, _)| !k.ends_with(".head"))
            .collect();
        let mut out: Vec<Record> = rows
            .into_iter()
            .map(|(_, r, _)| r)
            .filter(|r| r.version >= head.oldest && r.version < head.record.version)
            .collect();
        out.push(head.record);
        Ok(out)
    }

    fn no_such(&self, set: &str, version: u64, records: &[Record]) -> ConfigError {
        let pruned = records
            .first()
            .is_some_and(|r| version > 0 && version < r.version);
        ConfigError::NoSuchVersion {
            set: set.into(),
            version,
            pruned,
        }
    }

    /// The entries of `version` (the head's with later versions' changes undone).
    async fn entries_at(&self, set: &str, version: u64) -> Result<Entries, ConfigError> {
        let Some((head, _)) = self.head(set).await? else {
            return Err(ConfigError::NoSuchVersion {
                set: set.into(),
                version,
                pruned: false,
            });
        };
        if version == head.record.version {
            return Ok(head.entries);
        }
        let records = self.records(set).await?;
        if version == 0 {
            // Before the first version: nothing. Possible only while the first is retained.
            if records.first().is_none_or(|r| r.version != 1) {
                return Err(self.no_such(set, version, &records));
            }
        } else if !records.iter().any(|r| r.version == version) {
            return Err(self.no_such(set, version, &records));
        }
        let mut entries = head.entries;
        for r in records.iter().rev().take_while(|r| r.version > version) {
            for c in &r.changes {
                let layer = entries.entry(c.layer.clone()).or_default();
                match &c.before {
                    Some(v) => {
                        layer.insert(c.key.clone(), v.clone());
                    }
                    None => {
                        layer.remove(&c.key);
                    }
                }
            }
        }
        entries.retain(|_, l| !l.is_empty());
        Ok(entries)
    }

    /// The whole set at `version` as a document (what export writes).
    pub async fn export(
        &self,
        set: &str,
        version: Option<u64>,
        reveal: bool,
    ) -> Result<(u64, Document), ConfigError> {
        check_set(set)?;
        let v = match version {
            Some(v) => v,
            None => self.version_of(set).await?,
        };
        if v == 0 && version.is_none() {
            return Ok((0, Document::default()));
        }
        let entries = self.entries_at(set, v).await?;
        Ok((v, self.document(set, &entries, reveal)?))
    }

    /// What changed from version `from` to version `to` (either may be older or newer).
    pub async fn diff(
        &self,
        set: &str,
        from: u64,
        to: u64,
        reveal: bool,
    ) -> Result<Vec<ChangeView>, ConfigError> {
        check_set(set)?;
        let a = self.entries_at(set, from).await?;
        let b = self.entries_at(set, to).await?;
        let changes = diff_entries(&a, &b);
        changes
            .iter()
            .map(|c| self.change_view(set, c, reveal))
            .collect()
    }

    /// Apply an API change request (one layer) as one commit; a change that alters nothing
    /// creates no version.
    pub async fn change(
        &self,
        set: &str,
        req: ChangeRequest,
        author: &str,
    ) -> Result<Committed, ConfigError> {
        self.change_with(set, req, author, None).await
    }

    async fn change_with(
        &self,
        set: &str,
        req: ChangeRequest,
        author: &str,
        expect: Option<u64>,
    ) -> Result<Committed, ConfigError> {
        check_set(set)?;
        let layer = Layer::from_parts(req.env.as_deref(), req.instance.as_deref())?;
        if req.set.is_empty() && req.secrets.is_empty() && req.unset.is_empty() {
            return Err(ConfigError::Invalid(
                "nothing to change: give keys to set, secrets or unset".into(),
            ));
        }
        let mut edits = Vec::new();
        let mut seen = BTreeSet::new();
        for (map, secret) in [(&req.set, false), (&req.secrets, true)] {
            for (k, v) in map {
                if !seen.insert(k.clone()) {
                    return Err(ConfigError::Invalid(format!(
                        "{k}: given both as a value and as a secret"
                    )));
                }
                edits.push(Edit {
                    layer: layer.clone(),
                    key: k.clone(),
                    value: Some(NewValue {
                        value: v.clone(),
                        secret,
                    }),
                });
            }
        }
        for k in &req.unset {
            if !seen.insert(k.clone()) {
                return Err(ConfigError::Invalid(format!(
                    "{k}: both set and unset in one change"
                )));
            }
            edits.push(Edit {
                layer: layer.clone(),
                key: k.clone(),
                value: None,
            });
        }
        let author = Author {
            name: author.into(),
            message: check_message(req.message)?,
        };
        let meta = Meta {
            expect,
            ..Meta::default()
        };
        self.commit(set, edits, author, meta).await
    }

    /// [`ConfigStore::change`] only if the set's current version is `expected` (0: none yet),
    /// else `Conflict`.
    pub async fn change_if(
        &self,
        set: &str,
        req: ChangeRequest,
        author: &str,
        expected: u64,
    ) -> Result<Committed, ConfigError> {
        self.change_with(set, req, author, Some(expected)).await
    }

    /// Import a document as one commit: every key it gives is set; `replace` also removes what
    /// the document does not mention, in the layers it says (secrets it lists as redacted are
    /// kept).
    pub async fn import(
        &self,
        set: &str,
        doc: Document,
        replace: Replace,
        author: Author,
    ) -> Result<Committed, ConfigError> {
        check_set(set)?;
        let author = Author {
            message: check_message(Some(author.message))?,
            ..author
        };
        let mut edits = Vec::new();
        let mut mentioned: BTreeSet<(String, String)> = BTreeSet::new();
        for (layer, d) in doc.layers() {
            if let Layer::Env(e) = &layer {
                model::check_env_name(e)?;
            }
            if let Layer::Instance(i) = &layer {
                Layer::from_parts(None, Some(i))?;
            }
            for (k, v) in &d.values {
                if d.secrets.contains_key(k) {
                    return Err(ConfigError::Invalid(format!(
                        "{k}: given both as a value and as a secret"
                    )));
                }
                mentioned.insert((layer.key(), k.clone()));
                edits.push(Edit {
                    layer: layer.clone(),
                    key: k.clone(),
                    value: Some(NewValue {
                        value: v.clone(),
                        secret: false,
                    }),
                });
            }
            for (k, v) in &d.secrets {
                mentioned.insert((layer.key(), k.clone()));
                edits.push(Edit {
                    layer: layer.clone(),
                    key: k.clone(),
                    value: Some(NewValue {
                        value: v.clone(),
                        secret: true,
                    }),
                });
            }
            for k in &d.redacted {
                mentioned.insert((layer.key(), k.clone()));
            }
        }
        if edits.is_empty() && replace == Replace::Nothing {
            return Err(ConfigError::Invalid(
                "the document has no values to import".into(),
            ));
        }
        let sets = self.seal_edits(set, edits)?;
        let _guard = self.write.lock().await;
        self.commit_with(set, author, Meta::default(), |current| {
            let mut out = sets.clone();
            let scope: Option<BTreeSet<String>> = match &replace {
                Replace::Nothing => return Ok(out),
                Replace::All => None,
                Replace::Layers(l) => Some(l.iter().map(Layer::key).collect()),
            };
            for (lk, keys) in current {
                if scope.as_ref().is_some_and(|s| !s.contains(lk)) {
                    continue;
                }
                for k in keys.keys() {
                    if !mentioned.contains(&(lk.clone(), k.clone())) {
                        out.push((Layer::from_key(lk).unwrap_or(Layer::Base), k.clone(), None));
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// Make the values of version `to` current again, as a new version.
    pub async fn rollback(
        &self,
        set: &str,
        to: u64,
        author: Author,
    ) -> Result<Committed, ConfigError> {
        check_set(set)?;
        let author = Author {
            message: check_message(Some(author.message))?,
            ..author
        };
        let _guard = self.write.lock().await;
        let target = self.entries_at(set, to).await?;
        let author = Author {
            message: if author.message.is_empty() {
                format!("rollback to version {to}")
            } else {
                author.message
            },
            ..author
        };
        let meta = Meta {
            rollback_of: Some(to),
            reverts: None,
            always: true,
            expect: None,
        };
        // Computed from each head tried: whatever came in between, the result is `to`'s values.
        self.commit_with(set, author, meta, |current| {
            Ok(diff_entries(current, &target)
                .into_iter()
                .map(|c| {
                    (
                        Layer::from_key(&c.layer).unwrap_or(Layer::Base),
                        c.key,
                        c.after,
                    )
                })
                .collect())
        })
        .await
    }

    /// Undo what `version` changed (keys changed since keep their newer values), as a new
    /// version that says why: the automatic revert of a failed rollout.
    pub async fn revert(
        &self,
        set: &str,
        version: u64,
        reason: &str,
    ) -> Result<Committed, ConfigError> {
        check_set(set)?;
        let _guard = self.write.lock().await;
        let Some(rec) = self.record(set, version).await? else {
            let records = self.records(set).await?;
            return Err(self.no_such(set, version, &records));
        };
        let author = Author {
            name: "gantry".into(),
            message: format!("automatic revert of version {version}: {reason}"),
        };
        let meta = Meta {
            rollback_of: None,
            reverts: Some(version),
            always: true,
            expect: None,
        };
        self.commit_with(set, author, meta, |current| {
            Ok(rec
                .changes
                .iter()
                .filter(|c| {
                    let now = current.get(&c.layer).and_then(|l| l.get(&c.key));
                    self.same_value(set, &c.layer, &c.key, now, c.after.as_ref())
                })
                .map(|c| {
                    (
                        Layer::from_key(&c.layer).unwrap_or(Layer::Base),
                        c.key.clone(),
                        c.before.clone(),
                    )
                })
                .collect())
        })
        .await
    }

    /// Commit edits (each checked) as one version.
    pub async fn commit(
        &self,
        set: &str,
        edits: Vec<Edit>,
        author: Author,
        meta: Meta,
    ) -> Result<Committed, ConfigError> {
        check_set(set)?;
        let sealed = self.seal_edits(set, edits)?;
        let _guard = self.write.lock().await;
        self.commit_with(set, author, meta, |_| Ok(sealed.clone()))
            .await
    }

    /// Check edits and seal their secrets.
    fn seal_edits(&self, set: &str, edits: Vec<Edit>) -> Result<Vec<StoredEdit>, ConfigError> {
        let mut stored = Vec::with_capacity(edits.len());
        let mut seen = BTreeSet::new();
        for e in edits {
            check_key(&e.key)?;
            if !seen.insert((e.layer.key(), e.key.clone())) {
                return Err(ConfigError::Invalid(format!(
                    "{}: changed twice in one commit",
                    e.key
                )));
            }
            let value = match e.value {
                None => None,
                Some(nv) => {
                    check_value(&e.key, &nv.value)?;
                    Some(if nv.secret {
                        let text = nv.value.to_string();
                        Stored::Secret(
                            self.keyring
                                .seal(&aad(set, &e.layer.key(), &e.key), text.as_bytes())
                                .map_err(|x| ConfigError::Secret(x.to_string()))?,
                        )
                    } else {
                        Stored::Plain(nv.value)
                    })
                }
            };
            stored.push((e.layer, e.key, value));
        }
        Ok(stored)
    }

    /// The commit itself: `edits` computes what to change from the current values (called again
    /// for each head tried), the head is compare-and-set (retried when another gantry committed
    /// in between), then the record is written and history pruned.
    async fn commit_with(
        &self,
        set: &str,
        author: Author,
        meta: Meta,
        edits: impl Fn(&Entries) -> Result<Vec<StoredEdit>, ConfigError>,
    ) -> Result<Committed, ConfigError> {
        for attempt in 0..8 {
            let head = self.head(set).await?;
            if let Some(expected) = meta.expect {
                if head.as_ref().map_or(0, |(h, _)| h.record.version) != expected {
                    return Err(ConfigError::Conflict);
                }
            }
            let mut entries = head
                .as_ref()
                .map(|(h, _)| h.entries.clone())
                .unwrap_or_default();
            let edits = edits(&entries)?;
            let mut changes = Vec::new();
            for (layer, key, value) in &edits {
                let lk = layer.key();
                let before = entries.get(&lk).and_then(|l| l.get(key)).cloned();
                // A secret written is always a change: comparing it with what is stored would
                // tell a writer whether a guess was right.
                let unchanged = match (&before, value) {
                    (None, None) => true,
                    (Some(Stored::Plain(x)), Some(Stored::Plain(y))) => x == y,
                    (Some(Stored::Secret(x)), Some(Stored::Secret(y))) => x == y,
                    _ => false,
                };
                if unchanged {
                    continue;
                }
                let l = entries.entry(lk.clone()).or_default();
                match value {
                    Some(v) => {
                        l.insert(key.clone(), v.clone());
                    }
                    None => {
                        l.remove(key);
                    }
                }
                changes.push(Change {
                    layer: lk,
                    key: key.clone(),
                    before,
                    after: value.clone(),
                });
            }
            entries.retain(|_, l| !l.is_empty());
            if changes.is_empty() && !meta.always {
                return match &head {
                    Some((h, _)) => Ok(Committed {
                        version: self.version_view(&h.record, false)?,
                        created: false,
                    }),
                    None => Err(ConfigError::Invalid(
                        "nothing to change: the set has no such keys".into(),
                    )),
                };
            }
            check_limits(&entries)?;
            let previous = head.as_ref().map_or(0, |(h, _)| h.record.version);
            if let Some((prev, _)) = &head {
                // Repair the record of the previous version if a crash lost it.
                match self
                    .store
                    .create_json(BUCKET, &version_key(set, previous), &prev.record)
                    .await
                {
                    Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            let version = previous + 1;
            let old_oldest = head.as_ref().map_or(1, |(h, _)| h.oldest.max(1));
            let mut oldest = old_oldest.max((version + 1).saturating_sub(self.options.history));
            // A pinned version stays readable: its record and every later one are kept.
            if let Some(&p) = self
                .pins
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(set)
                .and_then(|v| v.first())
            {
                oldest = oldest.min(p.max(old_oldest));
            }
            let record = Record {
                set: set.into(),
                version,
                time_ms: gantry_model::unix_ms(),
                author: author.name.clone(),
                message: author.message.clone(),
                changes,
                rollback_of: meta.rollback_of,
                reverts: meta.reverts,
            };
            let new_head = Head {
                format: FORMAT,
                record: record.clone(),
                oldest,
                entries,
            };
            let written = match &head {
                Some((_, rev)) => {
                    self.store
                        .update_json(BUCKET, &head_key(set), &new_head, *rev)
                        .await
                }
                None => {
                    self.store
                        .create_json(BUCKET, &head_key(set), &new_head)
                        .await
                }
            };
            match written {
                Ok(_) => {}
                Err(StoreError::RevisionMismatch { .. } | StoreError::AlreadyExists { .. }) => {
                    tracing::debug!(set, attempt, "config head changed concurrently; retrying");
                    continue;
                }
                Err(e) => return Err(e.into()),
            }
            // Committed: the head holds it. Its own record is repaired by the next commit (and
            // served from the head meanwhile) if this write fails.
            if let Err(e) = self
                .store
                .put_json(BUCKET, &version_key(set, version), &record)
                .await
            {
                tracing::warn!(set, version, error = %e, "config version committed, its history record not yet written");
            }
            for old in old_oldest..oldest {
                if let Err(e) = self.store.delete(BUCKET, &version_key(set, old)).await {
                    tracing::warn!(set, version = old, error = %e, "could not prune a config history record");
                }
            }
            tracing::info!(
                set,
                version,
                author = %record.author,
                changes = record.changes.len(),
                "config version committed"
            );
            return Ok(Committed {
                version: self.version_view(&record, false)?,
                created: true,
            });
        }
        Err(ConfigError::Conflict)
    }

    /// Whether two stored values are the same (secrets compared by their plaintext: sealing twice
    /// never gives the same text).
    /// (Internal comparisons only, such as a revert's: never tells a caller anything.)
    fn same_value(
        &self,
        set: &str,
        lk: &str,
        key: &str,
        a: Option<&Stored>,
        b: Option<&Stored>,
    ) -> bool {
        match (a, b) {
            (None, None) => true,
            (Some(Stored::Plain(x)), Some(Stored::Plain(y))) => x == y,
            (Some(Stored::Secret(x)), Some(Stored::Secret(y))) => {
                if x == y {
                    return true;
                }
                let place = aad(set, lk, key);
                matches!(
                    (self.keyring.open(&place, x), self.keyring.open(&place, y)),
                    (Ok(p), Ok(q)) if p == q
                )
            }
            _ => false,
        }
    }

    /// A service's config as instance `instance` in environment `env` sees it: global base →
    /// global env → service base → service env → instance. `pin` starts from that version of
    /// the service's set instead of its current one.
    pub async fn resolve(
        &self,
        service: &str,
        env: Option<&str>,
        instance: Option<&str>,
        pin: Option<u64>,
    ) -> Result<Resolved, ConfigError> {
        check_set(service)?;
        let mut out = Resolved {
            service: service.into(),
            ..Resolved::default()
        };
        let global = self.head(GLOBAL).await?;
        if let Some((g, _)) = &global {
            out.global_version = g.record.version;
            self.overlay(&mut out, GLOBAL, &g.entries, env, None)?;
        }
        let entries = match pin {
            Some(v) => {
                out.version = v;
                Some(self.entries_at(service, v).await?)
            }
            None => self.head(service).await?.map(|(h, _)| {
                out.version = h.record.version;
                h.entries
            }),
        };
        if let Some(e) = entries {
            self.overlay(&mut out, service, &e, env, instance)?;
        }
        Ok(out)
    }

    fn overlay(
        &self,
        out: &mut Resolved,
        set: &str,
        entries: &Entries,
        env: Option<&str>,
        instance: Option<&str>,
    ) -> Result<(), ConfigError> {
        let mut layers = vec![Layer::Base];
        layers.extend(env.map(|e| Layer::Env(e.into())));
        layers.extend(instance.map(|i| Layer::Instance(i.into())));
        for layer in layers {
            let lk = layer.key();
            for (k, v) in entries.get(&lk).into_iter().flatten() {
                let (value, secret) = self.open_value(set, &lk, k, v)?;
                if secret {
                    out.secret_keys.insert(k.clone());
                } else {
                    out.secret_keys.remove(k);
                }
                out.values.insert(k.clone(), value);
            }
        }
        Ok(())
    }

    fn open_value(
        &self,
        set: &str,
        lk: &str,
        key: &str,
        v: &Stored,
    ) -> Result<(Value, bool), ConfigError> {
        match v {
            Stored::Plain(v) => Ok((v.clone(), false)),
            Stored::Secret(s) => {
                let plain = self
                    .keyring
                    .open(&aad(set, lk, key), s)
                    .map_err(|e| ConfigError::Secret(format!("{set}: {key}: {e}")))?;
                let v = serde_json::from_slice(&plain).map_err(|e| {
                    ConfigError::Secret(format!("{set}: {key}: sealed value is not JSON: {e}"))
                })?;
                Ok((v, true))
            }
        }
    }

    fn document(
        &self,
        set: &str,
        entries: &Entries,
        reveal: bool,
    ) -> Result<Document, ConfigError> {
        let mut doc = Document::default();
        for (lk, keys) in entries {
            let Some(layer) = Layer::from_key(lk) else {
                continue;
            };
            let l = doc.layer_mut(&layer);
            for (k, v) in keys {
                match v {
                    Stored::Plain(v) => {
                        l.values.insert(k.clone(), v.clone());
                    }
                    Stored::Secret(_) if reveal => {
                        let (v, _) = self.open_value(set, lk, k, v)?;
                        l.secrets.insert(k.clone(), v);
                    }
                    Stored::Secret(_) => {
                        l.redacted.insert(k.clone());
                    }
                }
            }
        }
        Ok(doc)
    }

    fn version_view(&self, r: &Record, reveal: bool) -> Result<VersionView, ConfigError> {
        Ok(VersionView {
            set: r.set.clone(),
            version: r.version,
            time_ms: r.time_ms,
            author: r.author.clone(),
            message: r.message.clone(),
            changes: r
                .changes
                .iter()
                .map(|c| self.change_view(&r.set, c, reveal))
                .collect::<Result<_, _>>()?,
            rollback_of: r.rollback_of,
            reverts: r.reverts,
        })
    }

    fn change_view(&self, set: &str, c: &Change, reveal: bool) -> Result<ChangeView, ConfigError> {
        let layer = Layer::from_key(&c.layer).unwrap_or(Layer::Base);
        let secret = c.before.as_ref().is_some_and(Stored::is_secret)
            || c.after.as_ref().is_some_and(Stored::is_secret);
        let show = |v: &Option<Stored>| -> Result<Option<Value>, ConfigError> {
            match v {
                None => Ok(None),
                Some(Stored::Plain(v)) => Ok(Some(v.clone())),
                Some(s @ Stored::Secret(_)) if reveal => self
                    .open_value(set, &c.layer, &c.key, s)
                    .map(|(v, _)| Some(v)),
                Some(Stored::Secret(_)) => Ok(None),
            }
        };
        Ok(ChangeView {
            env: layer.env().map(str::to_string),
            instance: layer.instance().map(str::to_string),
            key: c.key.clone(),
            kind: match (&c.before, &c.after) {
                (None, _) => ChangeKind::Added,
                (Some(_), None) => ChangeKind::Removed,
                (Some(_), Some(_)) => ChangeKind::Changed,
            },
            secret,
            before: show(&c.before)?,
            after: show(&c.after)?,
        })
    }

    /// Bring one set to the current format and secrets key: a set written by an earlier
    /// gantry (every version with all its values) becomes records of changes; values sealed
    /// under a previous secrets key are resealed under the current one. What cannot be resealed
    /// is logged and left as it is (it opens again once the right key is given): one old
    /// record never keeps the platform from starting.
    async fn upgrade(&self, set: &str) -> Result<(), ConfigError> {
        let head = self.store.get(BUCKET, &head_key(set)).await?;
        let current = match &head {
            Some(e) => serde_json::from_slice::<Value>(&e.value)
                .ok()
                .is_some_and(|v| v.get("format").is_some()),
            None => false,
        };
        if !current {
            return self.upgrade_v1(set).await;
        }
        let records: Vec<(String, Entry)> = self.store.list(BUCKET, &format!("{set}.*")).await?;
        for (k, e) in records {
            if k.ends_with(".head") {
                continue;
            }
            let Ok(mut r) = serde_json::from_slice::<Record>(&e.value) else {
                continue;
            };
            let mut any = false;
            for c in r.changes.iter_mut() {
                any |= self.reseal_change(set, c);
            }
            if any {
                self.store.put_json(BUCKET, &k, &r).await?;
            }
        }
        // The head: compare-and-set, retried if a commit came in between.
        for _ in 0..8 {
            let Some((mut head, rev)) = self.head(set).await? else {
                return Ok(());
            };
            let mut changed = false;
            for (lk, keys) in head.entries.iter_mut() {
                for (k, v) in keys.iter_mut() {
                    changed |= self.reseal(set, lk, k, v);
                }
            }
            for c in head.record.changes.iter_mut() {
                changed |= self.reseal_change(set, c);
            }
            if !changed {
                return Ok(());
            }
            match self
                .store
                .update_json(BUCKET, &head_key(set), &head, rev)
                .await
            {
                Ok(_) => {
                    tracing::info!(set, "config secrets resealed under the current secrets key");
                    return Ok(());
                }
                Err(StoreError::RevisionMismatch { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        tracing::warn!(
            set,
            "config set kept changing while resealing; resealed at the next start"
        );
        Ok(())
    }

    /// Reseal one value if an older key sealed it; false when it stays as it is.
    fn reseal(&self, set: &str, lk: &str, key: &str, v: &mut Stored) -> bool {
        let Stored::Secret(s) = v else { return false };
        match self.keyring.reseal(&aad(set, lk, key), s) {
            Ok(Some(new)) => {
                *s = new;
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::error!(set, key, error = %e, "config secret cannot be opened with the secrets keys given; left as it is");
                false
            }
        }
    }

    fn reseal_change(&self, set: &str, c: &mut Change) -> bool {
        let mut any = false;
        for v in [&mut c.before, &mut c.after].into_iter().flatten() {
            any |= self.reseal(set, &c.layer, &c.key, v);
        }
        any
    }

    /// Format 1 (before layers and secrets): every version held all values as strings. The
    /// records are rewritten newest first, so that after a crash part-way the rows still
    /// give every version's values (a rewritten record undoes into the version below it) and
    /// the upgrade simply runs again; the head goes last.
    async fn upgrade_v1(&self, set: &str) -> Result<(), ConfigError> {
        #[derive(Deserialize)]
        struct V1 {
            version: u64,
            time_ms: u64,
            #[serde(default)]
            message: String,
            values: BTreeMap<String, String>,
            #[serde(default)]
            rollback_of: Option<u64>,
        }
        let head_entry = self.store.get(BUCKET, &head_key(set)).await?;
        let rows = self.store.list(BUCKET, &format!("{set}.*")).await?;
        let mut old: BTreeMap<u64, V1> = BTreeMap::new();
        let mut new: BTreeMap<u64, Record> = BTreeMap::new();
        for (k, e) in &rows {
            if k.ends_with(".head") {
                continue;
            }
            if let Ok(v) = serde_json::from_slice::<V1>(&e.value) {
                old.insert(v.version, v);
            } else if let Ok(r) = serde_json::from_slice::<Record>(&e.value) {
                new.insert(r.version, r);
            } else {
                tracing::warn!(set, key = %k, "config row is neither format; skipped");
            }
        }
        // The head: the old head record, else (sets from before heads) the highest old row.
        let head = match head_entry
            .as_ref()
            .and_then(|e| serde_json::from_slice::<V1>(&e.value).ok())
        {
            Some(h) => h,
            None => match old.pop_last() {
                Some((_, h)) => h,
                None => return Ok(()),
            },
        };
        let to_entries = |values: &BTreeMap<String, String>| -> Entries {
            if values.is_empty() {
                return Entries::new();
            }
            BTreeMap::from([(
                String::new(),
                values
                    .iter()
                    .map(|(k, x)| (k.clone(), Stored::Plain(Value::String(x.clone()))))
                    .collect(),
            )])
        };
        let keep_from = (head.version + 1)
            .saturating_sub(self.options.history)
            .max(1);
        let lowest = old
            .keys()
            .chain(new.keys())
            .copied()
            .min()
            .unwrap_or(head.version)
            .min(head.version);
        // Values of every version, newest first.
        let mut values: BTreeMap<u64, Entries> = BTreeMap::new();
        values.insert(head.version, to_entries(&head.values));
        let mut v = head.version;
        while v > lowest {
            let below = v - 1;
            let e = if let Some(o) = old.get(&below) {
                to_entries(&o.values)
            } else if let (Some(r), Some(above)) = (new.get(&v), values.get(&v)) {
                let mut e = above.clone();
                for c in &r.changes {
                    let l = e.entry(c.layer.clone()).or_default();
                    match &c.before {
                        Some(x) => {
                            l.insert(c.key.clone(), x.clone());
                        }
                        None => {
                            l.remove(&c.key);
                        }
                    }
                }
                e.retain(|_, l| !l.is_empty());
                e
            } else {
                // A gap (pruned long ago): history starts above it.
                break;
            };
            values.insert(below, e);
            v = below;
        }
        let first = *values.keys().next().unwrap_or(&head.version);
        let mut written = 0;
        for (&ver, entries) in values.iter().rev() {
            let meta = if ver == head.version {
                Some((head.time_ms, head.message.clone(), head.rollback_of))
            } else if let Some(o) = old.get(&ver) {
                Some((o.time_ms, o.message.clone(), o.rollback_of))
            } else {
                new.get(&ver)
                    .map(|r| (r.time_ms, r.message.clone(), r.rollback_of))
            };
            let Some((time_ms, message, rollback_of)) = meta else {
                continue;
            };
            let prev = match values.get(&(ver.wrapping_sub(1))) {
                Some(p) => p.clone(),
                None if ver == 1 => Entries::new(),
                // The oldest version known: its changes are unknown, kept as all it held.
                None => Entries::new(),
            };
            let record = Record {
                set: set.into(),
                version: ver,
                time_ms,
                author: String::new(),
                message,
                changes: diff_entries(&prev, entries),
                rollback_of,
                reverts: None,
            };
            if ver >= keep_from && ver < head.version {
                self.store
                    .put_json(BUCKET, &version_key(set, ver), &record)
                    .await?;
                written += 1;
            } else if ver < keep_from {
                self.store.delete(BUCKET, &version_key(set, ver)).await?;
            }
            if ver == head.version {
                // The head's own record row too (as a commit writes it).
                self.store
                    .put_json(BUCKET, &version_key(set, ver), &record)
                    .await?;
            }
        }
        let record = Record {
            set: set.into(),
            version: head.version,
            time_ms: head.time_ms,
            author: String::new(),
            message: head.message.clone(),
            changes: diff_entries(
                values
                    .get(&(head.version.wrapping_sub(1)))
                    .unwrap_or(&Entries::new()),
                &values[&head.version],
            ),
            rollback_of: head.rollback_of,
            reverts: None,
        };
        let new_head = Head {
            format: FORMAT,
            record,
            oldest: keep_from.max(first),
            entries: values.remove(&head.version).unwrap_or_default(),
        };
        let done = match &head_entry {
            Some(e) => {
                self.store
                    .update_json(BUCKET, &head_key(set), &new_head, e.revision)
                    .await
            }
            None => {
                self.store
                    .create_json(BUCKET, &head_key(set), &new_head)
                    .await
            }
        };
        match done {
            Ok(_) => {
                tracing::info!(
                    set,
                    versions = written + 1,
                    "config set upgraded to records of changes"
                );
                Ok(())
            }
            // Another gantry sharing the store upgraded it first.
            Err(StoreError::RevisionMismatch { .. } | StoreError::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// One key's new stored value (`None`: removed).
type StoredEdit = (Layer, String, Option<Stored>);

/// What an import removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replace {
    /// Nothing: the document's keys are set, the rest stays.
    Nothing,
    /// Every key of the set the document does not mention.
    All,
    /// Keys the document does not mention in these layers only (a `.env` file carries one).
    Layers(Vec<Layer>),
}

/// Extra facts of a commit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Meta {
    pub rollback_of: Option<u64>,
    pub reverts: Option<u64>,
    /// Commit even if nothing changes (a rollback to identical values still says so).
    pub always: bool,
    /// Commit only if the set's current version is this one (0: the set has none), else
    /// `Conflict`: a compare-and-set for writers that read first (Consul's `cas`).
    pub expect: Option<u64>,
}

/// Changes that turn `a` into `b`.
fn diff_entries(a: &Entries, b: &Entries) -> Vec<Change> {
    let mut out = Vec::new();
    let layers: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let empty = BTreeMap::new();
    for lk in layers {
        let la = a.get(lk).unwrap_or(&empty);
        let lb = b.get(lk).unwrap_or(&empty);
        let keys: BTreeSet<&String> = la.keys().chain(lb.keys()).collect();
        for k in keys {
            let (x, y) = (la.get(k), lb.get(k));
            if x != y {
                out.push(Change {
                    layer: lk.clone(),
                    key: k.clone(),
                    before: x.cloned(),
                    after: y.cloned(),
                });
            }
        }
    }
    out
}

/// Announce every new head (from this gantry or another), restarting the watch if it fails.
async fn follow(
    weak: std::sync::Weak<ConfigStore>,
    mut watcher: gantry_store::Watcher,
    mut seen: BTreeMap<String, u64>,
) {
    let mut last_rev = 0u64;
    loop {
        match watcher.next().await {
            Some(Ok(WatchEvent::Change(c))) => {
                last_rev = c.revision;
                let Some(me) = weak.upgrade() else { return };
                let Some(set) = c.key.strip_suffix(".head") else {
                    continue;
                };
                if c.value.is_empty() {
                    continue;
                }
                match gantry_store::decode::<Head>(BUCKET, &c.key, &c.value) {
                    // A head rewritten without a new version (a reseal, an upgrade by another
                    // gantry) is no change to announce.
                    Ok(h) if seen.get(set).is_some_and(|v| *v >= h.record.version) => {}
                    Ok(h) => {
                        // Every version in order: a head that moved several versions at once
                        // (commits closer together than the watch reads) announces the ones
                        // between from their records (as many as history keeps).
                        let from = seen.get(set).copied().unwrap_or(0) + 1;
                        let from = from
                            .max(h.oldest)
                            .max(h.record.version.saturating_sub(1_000));
                        for v in from..h.record.version {
                            let reverts = match me.record(set, v).await {
                                Ok(Some(r)) => r.reverts,
                                _ => None,
                            };
                            let _ = me.events.send(ConfigChanged {
                                set: set.to_string(),
                                version: v,
                                reverts,
                            });
                        }
                        seen.insert(set.to_string(), h.record.version);
                        let _ = me.events.send(ConfigChanged {
                            set: set.to_string(),
                            version: h.record.version,
                            reverts: h.record.reverts,
                        });
                    }
                    Err(e) => {
                        tracing::debug!(key = %c.key, error = %e, "config head not in the current format")
                    }
                }
            }
            Some(Ok(WatchEvent::Current)) => {}
            Some(Err(e)) => {
                tracing::warn!(error = %e, "config watch failed; resuming");
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    let Some(me) = weak.upgrade() else { return };
                    let from = if last_rev == 0 {
                        WatchFrom::New
                    } else {
                        WatchFrom::Revision(last_rev + 1)
                    };
                    if let Ok(w) = me.store.watch(BUCKET, "*.head", from).await {
                        watcher = w;
                        break;
                    }
                }
            }
            None => return,
        }
    }
}

/// A set is a service name or `_global`.
pub fn check_set(set: &str) -> Result<(), ConfigError> {
    if set == GLOBAL || gantry_model::is_valid_service_name(set) {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "invalid service name {set:?}; expected 1-63 characters of a-z, 0-9 and '-' starting with a letter (or {GLOBAL} for the global set)"
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

fn check_value(key: &str, v: &Value) -> Result<(), ConfigError> {
    if v.is_null() {
        return Err(ConfigError::Invalid(format!(
            "{key}: null is not a value (use unset to remove a key)"
        )));
    }
    let text = model::env_text(v);
    if text.len() > MAX_VALUE_BYTES {
        return Err(ConfigError::Invalid(format!(
            "{key}: value is {} bytes; at most {MAX_VALUE_BYTES} allowed",
            text.len()
        )));
    }
    if text.contains('\0') {
        return Err(ConfigError::Invalid(format!(
            "{key}: value must not contain NUL (it becomes an environment variable)"
        )));
    }
    Ok(())
}

fn check_limits(entries: &Entries) -> Result<(), ConfigError> {
    if entries.len() > MAX_LAYERS {
        return Err(ConfigError::Invalid(format!(
            "a set may have at most {MAX_LAYERS} layers (environments and instances)"
        )));
    }
    let mut total = 0usize;
    for (lk, keys) in entries {
        if keys.len() > MAX_KEYS {
            let name = if lk.is_empty() { "base" } else { lk };
            return Err(ConfigError::Invalid(format!(
                "layer {name}: at most {MAX_KEYS} keys"
            )));
        }
        total += keys.iter().map(|(k, v)| k.len() + v.size()).sum::<usize>();
    }
    if total > MAX_SET_BYTES {
        return Err(ConfigError::Invalid(format!(
            "the set would hold {total} bytes of values; at most {MAX_SET_BYTES} allowed"
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
mod tests;
