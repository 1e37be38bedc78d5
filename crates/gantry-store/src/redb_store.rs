//! The embedded store: one redb file; per bucket a table of current values, a change log and a
//! per-key index of the log.
//!
//! Tables, for a bucket `b` (bucket names never contain `#`, so these cannot collide):
//! - `b`: key → 8 bytes of little-endian revision, then the value (the current values);
//! - `b#log`: revision → one change (op, time, key, value), what watches and history read;
//! - `b#hist`: key → the revisions of its retained changes (a multimap), to prune the log to the
//!   bucket's history depth;
//! - `__meta`: the revision counter (one for the whole database, bumped in the same transaction as
//!   the write, so revisions are unique and increasing like JetStream sequences) and the format;
//! - `__buckets`: bucket → options (JSON).
//!
//! Every write is a job for one writer thread, which takes every job waiting, applies them in
//! order in one transaction and commits with one fsync (group commit): a write is acknowledged
//! only after the fsync that made it durable, and 64 concurrent writers cost one fsync, not 64.
//! After each commit the thread publishes the new head revision; each watch reads the log from
//! where it stopped to the head. Every second the thread also expires changes older than their
//! bucket's `max_age`.
//!
//! Format 1 (before watches) had only the value tables and keys that used `/` as a separator;
//! opening such a file migrates it once: `/` in keys becomes `.` and the log and index are built
//! from the current values.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use redb::{
    Database, Durability, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable,
    ReadableTable, TableDefinition, TableHandle, WriteTransaction,
};
use tokio::sync::{oneshot, watch};

use crate::{
    check_bucket, check_filter, check_key, filter_matches, literal_prefix, BucketOptions, Change,
    Entry, Op, Store, StoreError, WatchEvent, WatchFrom, Watcher,
};

const META: TableDefinition<&str, u64> = TableDefinition::new("__meta");
const BUCKETS: TableDefinition<&str, &[u8]> = TableDefinition::new("__buckets");
const REVISION_KEY: &str = "revision";
const FORMAT_KEY: &str = "format";
const FORMAT: u64 = 2;
/// Most jobs one transaction takes.
const MAX_BATCH: usize = 4096;
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// How long a delete stays in a key's history and in watches from a revision. Keys that come
/// and go (self-registrations with generated ids, process records) would otherwise leave one
/// marker each, forever. A watch resumed from a revision older than this may miss a delete; a
/// watch from `Current` never does. (JetStream's `purge_deletes` has the same trade.)
pub const DELETE_MARKER_TTL: Duration = Duration::from_secs(3600);

type ValueTable<'a> = TableDefinition<'a, &'static str, &'static [u8]>;

struct Names {
    log: String,
    hist: String,
}

impl Names {
    fn of(bucket: &str) -> Self {
        Self {
            log: format!("{bucket}#log"),
            hist: format!("{bucket}#hist"),
        }
    }
}

/// Embedded, durable [`Store`] on redb.
#[derive(Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: Arc<Database>,
    path: PathBuf,
    jobs: Mutex<Option<std_mpsc::Sender<Job>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    head: watch::Sender<u64>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer after the jobs already queued; joining it releases the
        // database file, so that it can be opened again at once.
        if let Ok(mut j) = self.jobs.lock() {
            j.take();
        }
        if let Ok(mut w) = self.writer.lock() {
            if let Some(h) = w.take() {
                let _ = h.join();
            }
        }
    }
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn be<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Backend(e.into().to_string())
}

#[derive(Debug, Clone, Copy)]
enum Cond {
    Always,
    Absent,
    Revision(u64),
}

enum WriteOp {
    Put {
        key: String,
        value: Vec<u8>,
        cond: Cond,
    },
    Delete {
        key: String,
        expected: Option<u64>,
    },
    Options(BucketOptions),
}

#[derive(Debug, Clone, Copy)]
struct Outcome {
    revision: u64,
    existed: bool,
}

struct Job {
    bucket: String,
    op: WriteOp,
    reply: oneshot::Sender<Result<Outcome, StoreError>>,
}

impl RedbStore {
    /// Open (or create) `dir/state.redb`, migrating an older format. Fails with
    /// [`StoreError::Locked`] if another process has it open.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, DELETE_MARKER_TTL)
    }

    /// [`RedbStore::open`], keeping delete markers for `marker_ttl` (see [`DELETE_MARKER_TTL`]).
    pub fn open_with(dir: &Path, marker_ttl: Duration) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Backend(format!("create {}: {e}", dir.display())))?;
        let path = dir.join("state.redb");
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                StoreError::Locked(dir.display().to_string())
            }
            other => StoreError::Backend(format!("open {}: {other}", path.display())),
        })?;
        let head = migrate(&db)?;
        let db = Arc::new(db);
        let (head, _) = watch::channel(head);
        let (tx, rx) = std_mpsc::channel();
        let writer = {
            let db = db.clone();
            let head = head.clone();
            std::thread::Builder::new()
                .name("gantry-store".into())
                .spawn(move || writer_loop(&db, &rx, &head, marker_ttl))
                .map_err(|e| StoreError::Backend(format!("start store writer: {e}")))?
        };
        Ok(Self {
            inner: Arc::new(Inner {
                db,
                path,
                jobs: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
                head,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.inner.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }

    async fn submit(&self, bucket: &str, op: WriteOp) -> Result<Outcome, StoreError> {
        let (reply, rx) = oneshot::channel();
        let job = Job {
            bucket: bucket.to_string(),
            op,
            reply,
        };
        {
            let jobs = self
                .inner
                .jobs
                .lock()
                .map_err(|_| StoreError::Backend("store writer lock poisoned".into()))?;
            let sender = jobs
                .as_ref()
                .ok_or_else(|| StoreError::Unavailable("the store is closed".into()))?;
            sender
                .send(job)
                .map_err(|_| StoreError::Unavailable("the store writer stopped".into()))?;
        }
        rx.await
            .map_err(|_| StoreError::Unavailable("the store writer stopped".into()))?
    }

    async fn write(
        &self,
        bucket: &str,
        key: &str,
        value: Vec<u8>,
        cond: Cond,
    ) -> Result<u64, StoreError> {
        check_bucket(bucket)?;
        check_key(key)?;
        let op = WriteOp::Put {
            key: key.to_string(),
            value,
            cond,
        };
        Ok(self.submit(bucket, op).await?.revision)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn revision_of(raw: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if raw.len() >= 8 {
        b.copy_from_slice(&raw[..8]);
    }
    u64::from_le_bytes(b)
}

fn entry_of(raw: &[u8]) -> Entry {
    Entry {
        revision: revision_of(raw),
        value: raw.get(8..).unwrap_or(&[]).to_vec(),
    }
}

/// A log record: op (0 put, 1 delete), time in ms (LE u64), key length (LE u16), key, value.
fn encode_change(op: Op, at_ms: u64, key: &str, value: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(11 + key.len() + value.len());
    b.push(match op {
        Op::Put => 0,
        Op::Delete => 1,
    });
    b.extend_from_slice(&at_ms.to_le_bytes());
    b.extend_from_slice(&(key.len() as u16).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(value);
    b
}

struct LogRecord<'a> {
    op: Op,
    at_ms: u64,
    key: &'a str,
    value: &'a [u8],
}

fn decode_change(raw: &[u8]) -> Option<LogRecord<'_>> {
    let op = match *raw.first()? {
        0 => Op::Put,
        1 => Op::Delete,
        _ => return None,
    };
    let at_ms = u64::from_le_bytes(raw.get(1..9)?.try_into().ok()?);
    let klen = u16::from_le_bytes(raw.get(9..11)?.try_into().ok()?) as usize;
    let key = std::str::from_utf8(raw.get(11..11 + klen)?).ok()?;
    Some(LogRecord {
        op,
        at_ms,
        key,
        value: raw.get(11 + klen..)?,
    })
}

fn corrupt_log(bucket: &str, revision: u64) -> StoreError {
    StoreError::Corrupt {
        bucket: bucket.into(),
        key: format!("#log/{revision}"),
        reason: "unreadable change record".into(),
    }
}

/// Whether a table name is a bucket's value table (not its log or index, not internal).
fn is_value_table(name: &str) -> bool {
    !name.starts_with("__") && !name.contains('#')
}

/// Bring a database to the current format; returns the head revision.
fn migrate(db: &Database) -> Result<u64, StoreError> {
    let tx = db.begin_write().map_err(be)?;
    let head;
    {
        let mut meta = tx.open_table(META).map_err(be)?;
        head = meta.get(REVISION_KEY).map_err(be)?.map(|g| g.value());
        let format = meta.get(FORMAT_KEY).map_err(be)?.map(|g| g.value());
        if format.is_some_and(|f| f >= FORMAT) {
            drop(meta);
            tx.abort().map_err(be)?;
            return Ok(head.unwrap_or(0));
        }
        meta.insert(FORMAT_KEY, FORMAT).map_err(be)?;
    }
    let buckets: Vec<String> = tx
        .list_tables()
        .map_err(be)?
        .map(|h| h.name().to_string())
        .filter(|n| is_value_table(n))
        .collect();
    let at = now_ms();
    for bucket in buckets {
        let names = Names::of(&bucket);
        let def: ValueTable = TableDefinition::new(&bucket);
        let mut table = tx.open_table(def).map_err(be)?;
        let rows: Vec<(String, Vec<u8>)> = table
            .iter()
            .map_err(be)?
            .map(|r| r.map(|(k, v)| (k.value().to_string(), v.value().to_vec())))
            .collect::<Result<_, _>>()
            .map_err(be)?;
        let mut log = tx
            .open_table::<u64, &[u8]>(TableDefinition::new(&names.log))
            .map_err(be)?;
        let mut hist = tx
            .open_multimap_table::<&str, u64>(MultimapTableDefinition::new(&names.hist))
            .map_err(be)?;
        for (key, raw) in rows {
            let mut key = key;
            let dotted = key.replace('/', ".");
            if dotted != key
                && check_key(&dotted).is_ok()
                && table.get(dotted.as_str()).map_err(be)?.is_none()
            {
                table.remove(key.as_str()).map_err(be)?;
                table.insert(dotted.as_str(), raw.as_slice()).map_err(be)?;
                key = dotted;
            }
            let e = entry_of(&raw);
            log.insert(
                e.revision,
                encode_change(Op::Put, at, &key, &e.value).as_slice(),
            )
            .map_err(be)?;
            hist.insert(key.as_str(), e.revision).map_err(be)?;
        }
    }
    tx.commit().map_err(be)?;
    Ok(head.unwrap_or(0))
}

fn writer_loop(
    db: &Database,
    jobs: &std_mpsc::Receiver<Job>,
    head: &watch::Sender<u64>,
    marker_ttl: Duration,
) {
    let mut options: HashMap<String, BucketOptions> = HashMap::new();
    let mut last_sweep = Instant::now();
    let mut last_marker_sweep = Instant::now();
    let marker_every = marker_ttl.min(Duration::from_secs(60));
    loop {
        let first = match jobs.recv_timeout(SWEEP_EVERY) {
            Ok(j) => Some(j),
            Err(std_mpsc::RecvTimeoutError::Timeout) => None,
            Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if let Some(first) = first {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(j) => batch.push(j),
                    Err(_) => break,
                }
            }
            commit_batch(db, &mut options, batch, head);
        }
        if last_sweep.elapsed() >= SWEEP_EVERY {
            last_sweep = Instant::now();
            let markers_due = last_marker_sweep.elapsed() >= marker_every;
            if markers_due {
                last_marker_sweep = Instant::now();
            }
            let marker_cutoff =
                markers_due.then(|| now_ms().saturating_sub(marker_ttl.as_millis() as u64));
            // A failed sweep is tried again at the next one.
            if let Err(e) = sweep(db, marker_cutoff) {
                tracing::warn!(error = %e, "store: removing old changes failed; retried later");
            }
        }
    }
}

fn commit_batch(
    db: &Database,
    options: &mut HashMap<String, BucketOptions>,
    batch: Vec<Job>,
    head: &watch::Sender<u64>,
) {
    let mut outcomes = Vec::with_capacity(batch.len());
    let result = (|| -> Result<u64, StoreError> {
        let mut tx = db.begin_write().map_err(be)?;
        tx.set_durability(Durability::Immediate)
            .map_err(|e| StoreError::Backend(e.to_string()))?;
        let mut rev = {
            let meta = tx.open_table(META).map_err(be)?;
            let r = meta.get(REVISION_KEY).map_err(be)?.map(|g| g.value());
            r.unwrap_or(0)
        };
        let at = now_ms();
        for job in &batch {
            outcomes.push(apply(&tx, options, job, &mut rev, at)?);
        }
        tx.open_table(META)
            .map_err(be)?
            .insert(REVISION_KEY, rev)
            .map_err(be)?;
        tx.commit().map_err(be)?;
        Ok(rev)
    })();
    match result {
        Ok(rev) => {
            for (job, outcome) in batch.into_iter().zip(outcomes) {
                let _ = job.reply.send(outcome);
            }
            head.send_if_modified(|h| {
                let changed = *h != rev;
                *h = rev;
                changed
            });
        }
        Err(e) => {
            // Nothing of the batch was committed; options read inside it may be stale.
            options.clear();
            let msg = e.to_string();
            for job in batch {
                let _ = job.reply.send(Err(StoreError::Backend(msg.clone())));
            }
        }
    }
}

fn bucket_options(
    tx: &WriteTransaction,
    cache: &mut HashMap<String, BucketOptions>,
    bucket: &str,
) -> Result<BucketOptions, StoreError> {
    if let Some(o) = cache.get(bucket) {
        return Ok(*o);
    }
    let table = tx.open_table(BUCKETS).map_err(be)?;
    let o = match table.get(bucket).map_err(be)? {
        Some(raw) => crate::decode("__buckets", bucket, raw.value())?,
        None => BucketOptions::default(),
    };
    cache.insert(bucket.to_string(), o);
    Ok(o)
}

/// Apply one job inside the batch's transaction. The outer `Err` aborts the whole batch (the
/// database failed); the inner one is this job's answer (a condition did not hold).
fn apply(
    tx: &WriteTransaction,
    cache: &mut HashMap<String, BucketOptions>,
    job: &Job,
    rev: &mut u64,
    at: u64,
) -> Result<Result<Outcome, StoreError>, StoreError> {
    let bucket = job.bucket.as_str();
    let (key, value, op, cond) = match &job.op {
        WriteOp::Options(o) => {
            let old = match bucket_options(tx, cache, bucket) {
                Ok(o) => o,
                // This bucket's own options are unreadable: this job fails, not the batch.
                Err(e @ StoreError::Corrupt { .. }) => return Ok(Err(e)),
                Err(e) => return Err(e),
            };
            let json = serde_json::to_vec(o).map_err(|e| StoreError::Backend(e.to_string()))?;
            tx.open_table(BUCKETS)
                .map_err(be)?
                .insert(bucket, json.as_slice())
                .map_err(be)?;
            cache.insert(bucket.to_string(), *o);
            if o.history < old.history {
                // Trim every key to the new depth now rather than at its next write.
                let names = Names::of(bucket);
                let keys: Vec<String> = {
                    let hist = tx
                        .open_multimap_table::<&str, u64>(MultimapTableDefinition::new(&names.hist))
                        .map_err(be)?;
                    let mut keys = Vec::new();
                    for item in hist.iter().map_err(be)? {
                        keys.push(item.map_err(be)?.0.value().to_string());
                    }
                    keys
                };
                for k in keys {
                    prune(tx, &names, &k, o.history)?;
                }
            }
            return Ok(Ok(Outcome {
                revision: 0,
                existed: true,
            }));
        }
        WriteOp::Put { key, value, cond } => (key.as_str(), value.as_slice(), Op::Put, *cond),
        WriteOp::Delete { key, expected } => (
            key.as_str(),
            &[][..],
            Op::Delete,
            expected.map(Cond::Revision).unwrap_or(Cond::Always),
        ),
    };
    let opts = match bucket_options(tx, cache, bucket) {
        Ok(o) => o,
        Err(e @ StoreError::Corrupt { .. }) => return Ok(Err(e)),
        Err(e) => return Err(e),
    };
    let names = Names::of(bucket);
    let def: ValueTable = TableDefinition::new(bucket);
    let mut table = tx.open_table(def).map_err(be)?;
    let current = table.get(key).map_err(be)?.map(|v| revision_of(v.value()));
    match cond {
        Cond::Always => {}
        Cond::Absent if current.is_some() => {
            return Ok(Err(StoreError::AlreadyExists {
                bucket: bucket.into(),
                key: key.into(),
            }))
        }
        Cond::Absent => {}
        Cond::Revision(expected) if current != Some(expected) => {
            return Ok(Err(StoreError::RevisionMismatch {
                bucket: bucket.into(),
                key: key.into(),
                expected,
                found: current,
            }))
        }
        Cond::Revision(_) => {}
    }
    if op == Op::Delete && current.is_none() {
        return Ok(Ok(Outcome {
            revision: 0,
            existed: false,
        }));
    }
    *rev += 1;
    let r = *rev;
    match op {
        Op::Put => {
            let mut buf = Vec::with_capacity(8 + value.len());
            buf.extend_from_slice(&r.to_le_bytes());
            buf.extend_from_slice(value);
            table.insert(key, buf.as_slice()).map_err(be)?;
        }
        Op::Delete => {
            table.remove(key).map_err(be)?;
        }
    }
    drop(table);
    tx.open_table::<u64, &[u8]>(TableDefinition::new(&names.log))
        .map_err(be)?
        .insert(r, encode_change(op, at, key, value).as_slice())
        .map_err(be)?;
    tx.open_multimap_table::<&str, u64>(MultimapTableDefinition::new(&names.hist))
        .map_err(be)?
        .insert(key, r)
        .map_err(be)?;
    prune(tx, &names, key, opts.history)?;
    Ok(Ok(Outcome {
        revision: r,
        existed: current.is_some(),
    }))
}

/// Keep the newest `depth` changes of `key` in the log.
fn prune(tx: &WriteTransaction, names: &Names, key: &str, depth: u8) -> Result<(), StoreError> {
    let mut hist = tx
        .open_multimap_table::<&str, u64>(MultimapTableDefinition::new(&names.hist))
        .map_err(be)?;
    let revs: Vec<u64> = hist
        .get(key)
        .map_err(be)?
        .map(|r| r.map(|g| g.value()))
        .collect::<Result<_, _>>()
        .map_err(be)?;
    if revs.len() <= depth as usize {
        return Ok(());
    }
    let mut log = tx
        .open_table::<u64, &[u8]>(TableDefinition::new(&names.log))
        .map_err(be)?;
    for old in &revs[..revs.len() - depth as usize] {
        hist.remove(key, *old).map_err(be)?;
        log.remove(*old).map_err(be)?;
    }
    Ok(())
}

/// Remove old changes, at most 10,000 per bucket per sweep: every change older than its
/// bucket's `max_age` (a key whose latest change expires disappears), and, when `marker_cutoff`
/// (ms since the epoch) is given, delete markers older than that.
fn sweep(db: &Database, marker_cutoff: Option<u64>) -> Result<(), StoreError> {
    let max_ages: HashMap<String, Duration> = {
        let tx = db.begin_read().map_err(be)?;
        let mut out = HashMap::new();
        match tx.open_table(BUCKETS) {
            Ok(table) => {
                for item in table.iter().map_err(be)? {
                    let (k, v) = item.map_err(be)?;
                    let o: BucketOptions = crate::decode("__buckets", k.value(), v.value())?;
                    if let Some(age) = o.max_age {
                        out.insert(k.value().to_string(), age);
                    }
                }
            }
            Err(redb::TableError::TableDoesNotExist(_)) => {}
            Err(e) => return Err(be(e)),
        }
        out
    };
    if max_ages.is_empty() && marker_cutoff.is_none() {
        return Ok(());
    }
    let now = now_ms();
    let mut tx = db.begin_write().map_err(be)?;
    tx.set_durability(Durability::Immediate)
        .map_err(|e| StoreError::Backend(e.to_string()))?;
    let buckets: Vec<String> = tx
        .list_tables()
        .map_err(be)?
        .map(|h| h.name().to_string())
        .filter(|n| is_value_table(n))
        .collect();
    let mut removed = 0usize;
    for bucket in buckets {
        let age_cutoff = max_ages
            .get(&bucket)
            .map(|age| now.saturating_sub(age.as_millis() as u64));
        // The log is in time order: nothing at or after this can go.
        let stop = match (age_cutoff, marker_cutoff) {
            (None, None) => continue,
            (a, m) => a.unwrap_or(0).max(m.unwrap_or(0)),
        };
        let names = Names::of(&bucket);
        let mut log = tx
            .open_table::<u64, &[u8]>(TableDefinition::new(&names.log))
            .map_err(be)?;
        let mut old = Vec::new();
        for item in log.iter().map_err(be)? {
            let (r, raw) = item.map_err(be)?;
            let rec = decode_change(raw.value()).ok_or_else(|| corrupt_log(&bucket, r.value()))?;
            if rec.at_ms >= stop || old.len() >= 10_000 {
                break;
            }
            let expired = age_cutoff.is_some_and(|c| rec.at_ms < c);
            let stale_marker = rec.op == Op::Delete && marker_cutoff.is_some_and(|c| rec.at_ms < c);
            if expired || stale_marker {
                old.push((r.value(), rec.key.to_string()));
            }
        }
        if old.is_empty() {
            continue;
        }
        let mut hist = tx
            .open_multimap_table::<&str, u64>(MultimapTableDefinition::new(&names.hist))
            .map_err(be)?;
        let def: ValueTable = TableDefinition::new(&bucket);
        let mut table = tx.open_table(def).map_err(be)?;
        for (r, key) in old {
            log.remove(r).map_err(be)?;
            hist.remove(key.as_str(), r).map_err(be)?;
            let latest = table
                .get(key.as_str())
                .map_err(be)?
                .map(|v| revision_of(v.value()));
            if latest == Some(r) {
                table.remove(key.as_str()).map_err(be)?;
            }
            removed += 1;
        }
    }
    if removed == 0 {
        tx.abort().map_err(be)?;
        return Ok(());
    }
    tx.commit().map_err(be)
}

fn read_head(db: &Database) -> Result<u64, StoreError> {
    head_in(&db.begin_read().map_err(be)?)
}

/// The last revision committed, as `tx` sees it.
fn head_in(tx: &redb::ReadTransaction) -> Result<u64, StoreError> {
    match tx.open_table(META) {
        Ok(m) => Ok(m
            .get(REVISION_KEY)
            .map_err(be)?
            .map(|g| g.value())
            .unwrap_or(0)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(be(e)),
    }
}

/// Current values matching `filter` and the head revision they are current at.
fn read_current(
    db: &Database,
    bucket: &str,
    filter: &str,
    values: bool,
) -> Result<(Vec<(String, Entry)>, u64), StoreError> {
    let tx = db.begin_read().map_err(be)?;
    let head = head_in(&tx)?;
    let def: ValueTable = TableDefinition::new(bucket);
    let table = match tx.open_table(def) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), head)),
        Err(e) => return Err(be(e)),
    };
    let prefix = literal_prefix(filter);
    let mut out = Vec::new();
    for item in table.range(prefix..).map_err(be)? {
        let (k, v) = item.map_err(be)?;
        let k = k.value();
        if !k.starts_with(prefix) {
            break;
        }
        if filter_matches(filter, k) {
            let e = if values {
                entry_of(v.value())
            } else {
                Entry {
                    value: Vec::new(),
                    revision: revision_of(v.value()),
                }
            };
            out.push((k.to_string(), e));
        }
    }
    Ok((out, head))
}

/// Logged changes in `from..` matching `filter`, and the head revision read with them.
fn read_log(
    db: &Database,
    bucket: &str,
    filter: &str,
    from: u64,
) -> Result<(Vec<Change>, u64), StoreError> {
    let tx = db.begin_read().map_err(be)?;
    let head = head_in(&tx)?;
    let names = Names::of(bucket);
    let log = match tx.open_table::<u64, &[u8]>(TableDefinition::new(&names.log)) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok((Vec::new(), head)),
        Err(e) => return Err(be(e)),
    };
    let mut out = Vec::new();
    for item in log.range(from..).map_err(be)? {
        let (r, raw) = item.map_err(be)?;
        let rec = decode_change(raw.value()).ok_or_else(|| corrupt_log(bucket, r.value()))?;
        if filter_matches(filter, rec.key) {
            out.push(Change {
                key: rec.key.to_string(),
                revision: r.value(),
                op: rec.op,
                value: rec.value.to_vec(),
            });
        }
    }
    Ok((out, head))
}

#[async_trait]
impl Store for RedbStore {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn ensure_bucket(&self, bucket: &str, options: BucketOptions) -> Result<(), StoreError> {
        check_bucket(bucket)?;
        options.check(bucket)?;
        self.submit(bucket, WriteOp::Options(options)).await?;
        Ok(())
    }

    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Entry>, StoreError> {
        check_bucket(bucket)?;
        check_key(key)?;
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(be)?;
            let def: ValueTable = TableDefinition::new(&bucket);
            let table = match tx.open_table(def) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(be(e)),
            };
            let got = table.get(key.as_str()).map_err(be)?;
            Ok(got.map(|v| entry_of(v.value())))
        })
        .await
    }

    async fn put(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        self.write(bucket, key, value, Cond::Always).await
    }

    async fn create(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        self.write(bucket, key, value, Cond::Absent).await
    }

    async fn update(
        &self,
        bucket: &str,
        key: &str,
        value: Vec<u8>,
        expected: u64,
    ) -> Result<u64, StoreError> {
        self.write(bucket, key, value, Cond::Revision(expected))
            .await
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<bool, StoreError> {
        check_bucket(bucket)?;
        check_key(key)?;
        let op = WriteOp::Delete {
            key: key.to_string(),
            expected: None,
        };
        Ok(self.submit(bucket, op).await?.existed)
    }

    async fn delete_if(&self, bucket: &str, key: &str, expected: u64) -> Result<(), StoreError> {
        check_bucket(bucket)?;
        check_key(key)?;
        let op = WriteOp::Delete {
            key: key.to_string(),
            expected: Some(expected),
        };
        self.submit(bucket, op).await.map(|_| ())
    }

    async fn list(&self, bucket: &str, filter: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        check_bucket(bucket)?;
        check_filter(filter)?;
        let (bucket, filter) = (bucket.to_string(), filter.to_string());
        self.blocking(move |db| Ok(read_current(db, &bucket, &filter, true)?.0))
            .await
    }

    async fn keys(&self, bucket: &str, filter: &str) -> Result<Vec<String>, StoreError> {
        check_bucket(bucket)?;
        check_filter(filter)?;
        let (bucket, filter) = (bucket.to_string(), filter.to_string());
        self.blocking(move |db| {
            let rows = read_current(db, &bucket, &filter, false)?.0;
            Ok(rows.into_iter().map(|(k, _)| k).collect())
        })
        .await
    }

    async fn history(&self, bucket: &str, key: &str) -> Result<Vec<Change>, StoreError> {
        check_bucket(bucket)?;
        check_key(key)?;
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(be)?;
            let names = Names::of(&bucket);
            let hist = match tx
                .open_multimap_table::<&str, u64>(MultimapTableDefinition::new(&names.hist))
            {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(be(e)),
            };
            let log = tx
                .open_table::<u64, &[u8]>(TableDefinition::new(&names.log))
                .map_err(be)?;
            let mut out = Vec::new();
            for r in hist.get(key.as_str()).map_err(be)? {
                let r = r.map_err(be)?.value();
                let Some(raw) = log.get(r).map_err(be)? else {
                    continue;
                };
                let rec = decode_change(raw.value()).ok_or_else(|| corrupt_log(&bucket, r))?;
                out.push(Change {
                    key: key.clone(),
                    revision: r,
                    op: rec.op,
                    value: rec.value.to_vec(),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn watch(
        &self,
        bucket: &str,
        filter: &str,
        from: WatchFrom,
    ) -> Result<Watcher, StoreError> {
        check_bucket(bucket)?;
        check_filter(filter)?;
        let (bucket, filter) = (bucket.to_string(), filter.to_string());
        // Subscribe before the first read, so that no commit after it goes unnoticed.
        let mut head_rx = self.inner.head.subscribe();
        let (initial, mut next) = {
            let (bucket, filter) = (bucket.clone(), filter.clone());
            self.blocking(move |db| match from {
                WatchFrom::Current => {
                    let (rows, head) = read_current(db, &bucket, &filter, true)?;
                    let changes = rows
                        .into_iter()
                        .map(|(key, e)| Change {
                            key,
                            revision: e.revision,
                            op: Op::Put,
                            value: e.value,
                        })
                        .collect::<Vec<_>>();
                    Ok((changes, head + 1))
                }
                WatchFrom::Revision(r) => {
                    let (changes, head) = read_log(db, &bucket, &filter, r)?;
                    Ok((changes, head.max(r.saturating_sub(1)) + 1))
                }
                WatchFrom::New => Ok((Vec::new(), read_head(db)? + 1)),
            })
            .await?
        };
        let (tx, watcher) = Watcher::channel();
        // Weak, so that a watch left running never keeps the file open after the store is gone.
        let db = Arc::downgrade(&self.inner.db);
        tokio::spawn(async move {
            for c in initial {
                if tx.send(Ok(WatchEvent::Change(c))).await.is_err() {
                    return;
                }
            }
            if tx.send(Ok(WatchEvent::Current)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    changed = head_rx.changed() => if changed.is_err() { return },
                    _ = tx.closed() => return,
                }
                let head = *head_rx.borrow_and_update();
                if head < next {
                    continue;
                }
                let Some(db) = db.upgrade() else { return };
                let (bucket, filter) = (bucket.clone(), filter.clone());
                let read =
                    tokio::task::spawn_blocking(move || read_log(&db, &bucket, &filter, next))
                        .await
                        .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))
                        .and_then(|r| r);
                match read {
                    Ok((changes, read_head)) => {
                        next = read_head.max(head) + 1;
                        for c in changes {
                            if tx.send(Ok(WatchEvent::Change(c))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(watcher)
    }
}
