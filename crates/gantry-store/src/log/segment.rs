//! The embedded log: per stream a directory of segment files, written by one writer thread
//! with group commit.
//!
//! Layout: `<dir>/<stream>/options.json`, segments `<first seq, 20 digits>.seg`, consumer
//! positions `consumers/<name>.json` (written to a temporary file, fsynced, renamed). A record
//! on disk is a 26-byte header — data length (u32), CRC-32 of everything after the CRC field
//! (u32), seq (u64), time (u64), id length (u16) — then the id and the data, little-endian.
//!
//! Appends are jobs for the writer thread: it takes every job waiting, writes each stream's
//! records to its active segment, fdatasyncs each file it touched once (and the directory when
//! it made a file), and only then makes the records visible to readers and answers: an
//! acknowledged append is on disk. Recovery at open reads every segment, checks each record's
//! CRC and sequence and cuts a torn tail (a crash in the middle of a write) off the last one.
//!
//! Retention is exact for readers (they never see a record outside the stream's age, byte or
//! count limits) and by whole segments on disk: a segment is deleted once every record in it
//! is out. Segments roll at an eighth of the byte or count limit (between 64 KiB and 64 MiB),
//! or an eighth of the age limit, so a stream holds at most about an eighth more than its
//! limits on disk. The last segment is never deleted: its name carries the last seq.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{oneshot, watch};

use super::{
    check_log_name, now_ms, Append, Appended, ConsumerPosition, Log, ReadFrom, Record, StreamInfo,
    StreamOptions,
};
use crate::StoreError;

const HEADER: usize = 26;
const MIN_SEGMENT: u64 = 64 * 1024;
const MAX_SEGMENT: u64 = 64 * 1024 * 1024;
/// A read returns at most this many bytes of records (at least one record).
const READ_BYTES: u64 = 4 * 1024 * 1024;
/// Jobs the writer takes into one commit.
const MAX_JOBS: usize = 1024;
const RETENTION_EVERY: Duration = Duration::from_secs(1);

/// The embedded log (see the module documentation).
pub struct SegmentLog {
    dir: PathBuf,
    shared: Arc<Shared>,
    jobs: Mutex<std_mpsc::Sender<Job>>,
}

struct Shared {
    streams: RwLock<HashMap<String, Arc<Stream>>>,
}

/// What readers share with the writer.
struct Stream {
    name: String,
    dir: PathBuf,
    options: RwLock<StreamOptions>,
    state: RwLock<Segments>,
    /// The last durable seq.
    tail: watch::Sender<u64>,
}

#[derive(Default)]
struct Segments {
    segs: Vec<Segment>,
    last_seq: u64,
    bytes: u64,
}

struct Segment {
    first_seq: u64,
    path: PathBuf,
    file: Arc<File>,
    /// Each record's offset in the file (record `first_seq + i` at `offsets[i]`).
    offsets: Vec<u32>,
    /// Each record's time.
    times: Vec<u64>,
    /// Bytes of the records made visible.
    len: u64,
}

impl Segment {
    fn last_seq(&self) -> u64 {
        self.first_seq + self.offsets.len() as u64 - 1
    }
    fn end_of(&self, i: usize) -> u64 {
        self.offsets
            .get(i + 1)
            .map(|&o| u64::from(o))
            .unwrap_or(self.len)
    }
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Job {
    Ensure(String, StreamOptions, Reply<()>),
    Delete(String, Reply<bool>),
    Append(Arc<Stream>, Vec<Append>, Reply<Vec<Appended>>),
}

type AppendJob = (Arc<Stream>, Vec<Append>, Reply<Vec<Appended>>);

/// Bytes staged for one file, (seq, offset in the file, time) of each record in them, and
/// where in the file they go (written at that offset, not appended: a failed commit's leftover
/// bytes are overwritten by the next one).
type FileWrite = (Arc<File>, Vec<u8>, Vec<(u64, u64, u64)>, u64);

fn io(what: &str, path: &Path, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("log: {what} {}: {e}", path.display()))
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing directory", dir, e))
}

/// Write `bytes` to `path` durably: a temporary file, fsynced, renamed over it, the directory
/// fsynced.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    // A name of its own per write: two writers of one file never share a temporary file.
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{n}"));
    let mut f = File::create(&tmp).map_err(|e| io("creating", &tmp, e))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_data())
        .map_err(|e| io("writing", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io("renaming", path, e))?;
    sync_dir(dir)
}

impl SegmentLog {
    /// Open (or create) the log in `dir`, recovering every stream in it.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(dir).map_err(|e| io("creating", dir, e))?;
        let mut streams = HashMap::new();
        let mut writers = HashMap::new();
        let entries = fs::read_dir(dir).map_err(|e| io("reading", dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io("reading", dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".deleted-") {
                let _ = fs::remove_dir_all(entry.path());
                continue;
            }
            if check_log_name("stream", &name).is_err() || !entry.path().is_dir() {
                continue;
            }
            let (stream, writer) = recover(&entry.path())?;
            let stream = Arc::new(stream);
            writers.insert(name.clone(), WStream::new(stream.clone(), writer));
            streams.insert(name, stream);
        }
        let shared = Arc::new(Shared {
            streams: RwLock::new(streams),
        });
        let (tx, rx) = std_mpsc::channel();
        let writer = Writer {
            dir: dir.to_path_buf(),
            shared: shared.clone(),
            streams: writers,
        };
        std::thread::Builder::new()
            .name("gantry-log".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Backend(format!("log: starting the writer: {e}")))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            shared,
            jobs: Mutex::new(tx),
        })
    }

    fn stream(&self, name: &str) -> Result<Arc<Stream>, StoreError> {
        self.shared
            .streams
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .cloned()
            .ok_or_else(|| no_stream(name))
    }

    async fn submit<T>(
        &self,
        job: impl FnOnce(oneshot::Sender<T>) -> Job,
    ) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(job(tx))
            .map_err(|_| StoreError::Unavailable("log writer stopped".into()))?;
        rx.await
            .map_err(|_| StoreError::Unavailable("log writer stopped".into()))
    }

    fn position_path(&self, stream: &str, consumer: &str) -> Result<PathBuf, StoreError> {
        check_log_name("stream", stream)?;
        check_log_name("consumer", consumer)?;
        Ok(self
            .dir
            .join(stream)
            .join("consumers")
            .join(format!("{consumer}.json")))
    }
}

fn no_stream(name: &str) -> StoreError {
    StoreError::NotFound(format!("stream {name}"))
}

/// The first seq a reader may see now (retention is exact for readers).
fn first_visible(st: &Segments, o: &StreamOptions, now: u64) -> u64 {
    let mut first = st.segs.first().map(|s| s.first_seq).unwrap_or(1);
    if let Some(m) = o.max_messages {
        first = first.max((st.last_seq + 1).saturating_sub(m));
    }
    if let Some(max) = o.max_bytes {
        let mut total = st.bytes;
        for s in &st.segs {
            if total <= max {
                break;
            }
            if total - s.len > max {
                total -= s.len;
                first = first.max(s.first_seq + s.offsets.len() as u64);
                continue;
            }
            // The first record i with total - offsets[i] <= max.
            let i = s
                .offsets
                .partition_point(|&off| total - u64::from(off) > max);
            first = first.max(s.first_seq + i as u64);
            break;
        }
    }
    if let Some(age) = o.max_age {
        let cutoff = now.saturating_sub(age.as_millis() as u64);
        first = first.max(seq_at_time(st, cutoff));
    }
    first.min(st.last_seq + 1)
}

/// The first seq appended at or after `t` (`last_seq + 1` if none).
fn seq_at_time(st: &Segments, t: u64) -> u64 {
    for s in &st.segs {
        if s.times.last().is_some_and(|&l| l >= t) {
            let i = s.times.partition_point(|&x| x < t);
            return s.first_seq + i as u64;
        }
    }
    st.last_seq + 1
}

#[async_trait]
impl Log for SegmentLog {
    fn backend(&self) -> &'static str {
        "embedded"
    }

    async fn ensure_stream(&self, stream: &str, options: StreamOptions) -> Result<(), StoreError> {
        check_log_name("stream", stream)?;
        options.check(stream)?;
        self.submit(|tx| Job::Ensure(stream.into(), options, tx))
            .await?
    }

    async fn delete_stream(&self, stream: &str) -> Result<bool, StoreError> {
        check_log_name("stream", stream)?;
        self.submit(|tx| Job::Delete(stream.into(), tx)).await?
    }

    async fn streams(&self) -> Result<Vec<String>, StoreError> {
        let mut v: Vec<String> = self
            .shared
            .streams
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .keys()
            .cloned()
            .collect();
        v.sort();
        Ok(v)
    }

    async fn info(&self, stream: &str) -> Result<Option<StreamInfo>, StoreError> {
        let Ok(s) = self.stream(stream) else {
            return Ok(None);
        };
        let o = *s.options.read().unwrap_or_else(PoisonError::into_inner);
        let st = s.state.read().unwrap_or_else(PoisonError::into_inner);
        let first = first_visible(&st, &o, now_ms());
        let mut bytes = 0;
        for seg in &st.segs {
            if seg.offsets.is_empty() || seg.last_seq() < first {
                continue;
            }
            let from = first.saturating_sub(seg.first_seq) as usize;
            bytes += seg.len - seg.offsets.get(from).map(|&o| u64::from(o)).unwrap_or(0);
        }
        Ok(Some(StreamInfo {
            first_seq: first,
            last_seq: st.last_seq,
            messages: st.last_seq + 1 - first,
            bytes,
        }))
    }

    async fn append(&self, stream: &str, batch: Vec<Append>) -> Result<Vec<Appended>, StoreError> {
        let s = self.stream(stream)?;
        let max = s
            .options
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .max_record_bytes;
        super::check_batch(stream, &batch, max)?;
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.submit(|tx| Job::Append(s, batch, tx)).await?
    }

    async fn read(
        &self,
        stream: &str,
        from: ReadFrom,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Record>, StoreError> {
        let s = self.stream(stream)?;
        let o = *s.options.read().unwrap_or_else(PoisonError::into_inner);
        if let (ReadFrom::Seq(seq), false) = (from, wait.is_zero()) {
            // Records older than the retention are not there to read: wait for a newer one.
            let first = {
                let st = s.state.read().unwrap_or_else(PoisonError::into_inner);
                first_visible(&st, &o, now_ms())
            };
            let want = seq.max(first);
            let mut rx = s.tail.subscribe();
            let _ = tokio::time::timeout(wait, rx.wait_for(|&v| v >= want)).await;
        }
        // What to read, under the lock; the reads after it.
        let mut plan: Vec<(Arc<File>, u64, u64, u64, usize)> = Vec::new();
        {
            let st = s.state.read().unwrap_or_else(PoisonError::into_inner);
            let first = first_visible(&st, &o, now_ms());
            let mut seq = match from {
                ReadFrom::Seq(q) => q.max(first),
                ReadFrom::Time(t) => seq_at_time(&st, t).max(first),
            };
            let mut left = max;
            let mut budget = READ_BYTES;
            for seg in &st.segs {
                if left == 0 || seq > st.last_seq {
                    break;
                }
                if seg.offsets.is_empty() || seg.last_seq() < seq {
                    continue;
                }
                let i = (seq - seg.first_seq) as usize;
                let mut j = i;
                let start = u64::from(seg.offsets[i]);
                while j < seg.offsets.len() && j - i < left {
                    let end = seg.end_of(j);
                    if end - start > budget && j > i {
                        break;
                    }
                    j += 1;
                }
                let end = seg.end_of(j - 1);
                plan.push((seg.file.clone(), start, end, seq, j - i));
                budget = budget.saturating_sub(end - start);
                left -= j - i;
                seq += (j - i) as u64;
                if budget == 0 {
                    break;
                }
            }
        }
        let mut out = Vec::new();
        for (file, start, end, first_seq, n) in plan {
            let mut buf = vec![0u8; (end - start) as usize];
            file.read_exact_at(&mut buf, start)
                .map_err(|e| io("reading", &s.dir, e))?;
            let mut at = 0;
            for k in 0..n {
                let (rec, used) = decode(&buf[at..]).ok_or_else(|| {
                    StoreError::Backend(format!(
                        "log: record {} of {} is damaged",
                        first_seq + k as u64,
                        s.dir.display()
                    ))
                })?;
                out.push(rec);
                at += used;
            }
        }
        Ok(out)
    }

    async fn position(
        &self,
        stream: &str,
        consumer: &str,
    ) -> Result<Option<ConsumerPosition>, StoreError> {
        let path = self.position_path(stream, consumer)?;
        match fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| StoreError::Corrupt {
                    bucket: stream.into(),
                    key: consumer.into(),
                    reason: e.to_string(),
                }),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("reading", &path, e)),
        }
    }

    async fn save_position(
        &self,
        stream: &str,
        consumer: &str,
        position: &ConsumerPosition,
    ) -> Result<(), StoreError> {
        let path = self.position_path(stream, consumer)?;
        self.stream(stream)?;
        let bytes = serde_json::to_vec(position).map_err(|e| StoreError::Backend(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            if let Some(d) = path.parent() {
                fs::create_dir_all(d).map_err(|e| io("creating", d, e))?;
            }
            write_atomic(&path, &bytes)
        })
        .await
        .map_err(|e| StoreError::Backend(e.to_string()))?
    }

    async fn delete_position(&self, stream: &str, consumer: &str) -> Result<bool, StoreError> {
        let path = self.position_path(stream, consumer)?;
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io("removing", &path, e)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Records on disk

fn encode(out: &mut Vec<u8>, seq: u64, time: u64, id: Option<&str>, data: &[u8]) {
    let id = id.unwrap_or("").as_bytes();
    let start = out.len();
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&time.to_le_bytes());
    out.extend_from_slice(&(id.len() as u16).to_le_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(data);
    let crc = crc32fast::hash(&out[start + 8..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One record from the front of `b` and its size; `None` if it is incomplete or damaged.
fn decode(b: &[u8]) -> Option<(Record, usize)> {
    if b.len() < HEADER {
        return None;
    }
    let len = u32::from_le_bytes(b[0..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(b[4..8].try_into().ok()?);
    let seq = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let time_ms = u64::from_le_bytes(b[16..24].try_into().ok()?);
    let idlen = u16::from_le_bytes(b[24..26].try_into().ok()?) as usize;
    let total = HEADER + idlen + len;
    if b.len() < total || crc32fast::hash(&b[8..total]) != crc {
        return None;
    }
    let id = (idlen > 0).then(|| String::from_utf8_lossy(&b[HEADER..HEADER + idlen]).into_owned());
    let data = b[HEADER + idlen..total].to_vec();
    Some((
        Record {
            seq,
            time_ms,
            id,
            data,
        },
        total,
    ))
}

fn record_size(id: Option<&str>, data: &[u8]) -> u64 {
    (HEADER + id.map_or(0, str::len) + data.len()) as u64
}

// ---------------------------------------------------------------------------------------------
// Recovery

/// A recovered stream's publisher ids still within its dedup window: (id, seq, time).
type RecentIds = Vec<(String, u64, u64)>;

fn recover(dir: &Path) -> Result<(Stream, RecentIds), StoreError> {
    let options: StreamOptions = match fs::read(dir.join("options.json")) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
            bucket: dir.display().to_string(),
            key: "options.json".into(),
            reason: e.to_string(),
        })?,
        Err(e) if e.kind() == ErrorKind::NotFound => StreamOptions::default(),
        Err(e) => return Err(io("reading", dir, e)),
    };
    let mut names: Vec<(u64, PathBuf)> = fs::read_dir(dir)
        .map_err(|e| io("reading", dir, e))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let first = n.strip_suffix(".seg")?.parse::<u64>().ok()?;
            Some((first, e.path()))
        })
        .collect();
    names.sort();
    let mut st = Segments::default();
    let horizon = now_ms().saturating_sub(options.dedup_window.as_millis() as u64);
    let mut dedup = Vec::new();
    let mut cut = false;
    for (first_seq, path) in names {
        if cut {
            // After a damaged or empty segment nothing was acknowledged (each commit writes
            // its segments in order and answers after their fsync).
            tracing::warn!(segment = %path.display(), "log: removing a segment after a damaged or empty one");
            let _ = fs::remove_file(&path);
            continue;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io("opening", &path, e))?;
        let bytes = fs::read(&path).map_err(|e| io("reading", &path, e))?;
        let mut seg = Segment {
            first_seq,
            path: path.clone(),
            file: Arc::new(file),
            offsets: Vec::new(),
            times: Vec::new(),
            len: 0,
        };
        if st.last_seq > 0 && first_seq != st.last_seq + 1 {
            return Err(StoreError::Corrupt {
                bucket: dir.display().to_string(),
                key: path.display().to_string(),
                reason: format!(
                    "segment starts at {first_seq}, expected {}",
                    st.last_seq + 1
                ),
            });
        }
        let mut at = 0usize;
        while at < bytes.len() {
            match decode(&bytes[at..]) {
                Some((r, used)) if r.seq == first_seq + seg.offsets.len() as u64 => {
                    seg.offsets.push(at as u32);
                    seg.times.push(r.time_ms);
                    if let Some(id) = r.id {
                        if r.time_ms >= horizon {
                            dedup.push((id, r.seq, r.time_ms));
                        }
                    }
                    at += used;
                }
                _ => {
                    tracing::error!(
                        segment = %path.display(),
                        offset = at,
                        "log: cutting a torn or damaged tail off a segment (a crash during a write; on a sealed segment, damage on disk)"
                    );
                    seg.file
                        .set_len(at as u64)
                        .and_then(|_| seg.file.sync_all())
                        .map_err(|e| io("truncating", &path, e))?;
                    cut = true;
                    break;
                }
            }
        }
        seg.len = at as u64;
        st.bytes += seg.len;
        st.last_seq = first_seq + seg.offsets.len() as u64 - 1;
        // An empty segment is one a commit made and never filled (it did not complete): the
        // log ends here, and what follows it was not acknowledged either.
        if seg.offsets.is_empty() {
            cut = true;
        }
        st.segs.push(seg);
    }
    let (tail, _) = watch::channel(st.last_seq);
    Ok((
        Stream {
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            dir: dir.to_path_buf(),
            options: RwLock::new(options),
            state: RwLock::new(st),
            tail,
        },
        dedup,
    ))
}

// ---------------------------------------------------------------------------------------------
// The writer

struct Writer {
    dir: PathBuf,
    shared: Arc<Shared>,
    streams: HashMap<String, WStream>,
}

/// The writer's side of a stream.
struct WStream {
    stream: Arc<Stream>,
    dedup: HashMap<String, u64>,
    dedup_order: VecDeque<(u64, String)>,
    /// The active (last) segment's record count and first record's time.
    active_count: u64,
    active_first_time: Option<u64>,
    last_time: u64,
}

impl WStream {
    fn new(stream: Arc<Stream>, recent: RecentIds) -> Self {
        let (count, first_time, last_time) = {
            let st = stream.state.read().unwrap_or_else(PoisonError::into_inner);
            match st.segs.last() {
                Some(s) => (
                    s.offsets.len() as u64,
                    s.times.first().copied(),
                    s.times.last().copied().unwrap_or(0),
                ),
                None => (0, None, 0),
            }
        };
        let mut w = Self {
            stream,
            dedup: HashMap::new(),
            dedup_order: VecDeque::new(),
            active_count: count,
            active_first_time: first_time,
            last_time,
        };
        for (id, seq, t) in recent {
            w.dedup.insert(id.clone(), seq);
            w.dedup_order.push_back((t, id));
        }
        w
    }

    fn expire_ids(&mut self, window: Duration, now: u64) {
        let horizon = now.saturating_sub(window.as_millis() as u64);
        while self.dedup_order.front().is_some_and(|(t, _)| *t < horizon) {
            if let Some((_, id)) = self.dedup_order.pop_front() {
                self.dedup.remove(&id);
            }
        }
    }
}

/// One stream's share of a commit.
struct Pending {
    name: String,
    /// New segments made in this commit (first seq, file), in order.
    new_segments: Vec<(u64, PathBuf, Arc<File>)>,
    /// Bytes per file to write: (file, bytes, [(seq, offset in file, time)]).
    writes: Vec<FileWrite>,
    /// Length of the active file before the commit (to undo a failed one).
    undo: Vec<(Arc<File>, u64)>,
    ids: Vec<String>,
    last_seq: u64,
    prev: (u64, Option<u64>, u64),
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Job>) {
        let mut last_retention = Instant::now();
        loop {
            match rx.recv_timeout(RETENTION_EVERY) {
                Ok(first) => {
                    let mut jobs = vec![first];
                    while jobs.len() < MAX_JOBS {
                        match rx.try_recv() {
                            Ok(j) => jobs.push(j),
                            Err(_) => break,
                        }
                    }
                    self.commit(jobs);
                }
                Err(std_mpsc::RecvTimeoutError::Timeout) => {}
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
            if last_retention.elapsed() >= RETENTION_EVERY {
                last_retention = Instant::now();
                let names: Vec<String> = self.streams.keys().cloned().collect();
                for n in names {
                    self.retain(&n);
                }
            }
        }
    }

    fn commit(&mut self, jobs: Vec<Job>) {
        let mut appends: Vec<AppendJob> = Vec::new();
        for job in jobs {
            match job {
                Job::Ensure(name, o, tx) => {
                    let _ = tx.send(self.ensure(&name, o));
                }
                Job::Delete(name, tx) => {
                    let _ = tx.send(self.delete(&name));
                }
                Job::Append(s, batch, tx) => appends.push((s, batch, tx)),
            }
        }
        if appends.is_empty() {
            return;
        }
        // Assign seqs and encode, per stream, in job order.
        let now = now_ms();
        let mut pending: HashMap<String, Pending> = HashMap::new();
        let mut outcomes: Vec<Result<Vec<Appended>, StoreError>> = Vec::new();
        let mut staging_failed = None;
        for (s, batch, _) in &appends {
            if !self
                .streams
                .get(&s.name)
                .is_some_and(|w| Arc::ptr_eq(&w.stream, s))
            {
                outcomes.push(Err(no_stream(&s.name)));
                continue;
            }
            match self.stage(&s.name, batch, now, &mut pending) {
                Ok(o) => outcomes.push(Ok(o)),
                // A file that cannot be made: the whole commit fails (nothing half staged).
                Err(e) => {
                    staging_failed = Some(e);
                    break;
                }
            }
        }
        // Write and sync every touched file once.
        let mut failed: Option<StoreError> = staging_failed;
        let mut dirs = Vec::new();
        'write: for p in pending.values().filter(|_| failed.is_none()) {
            for (file, bytes, _, start) in &p.writes {
                if let Err(e) = file
                    .write_all_at(bytes, *start)
                    .and_then(|_| file.sync_data())
                {
                    failed = Some(io("writing", Path::new(&p.name), e));
                    break 'write;
                }
            }
            if !p.new_segments.is_empty() {
                dirs.push(self.dir.join(&p.name));
            }
        }
        if failed.is_none() {
            for d in &dirs {
                if let Err(e) = sync_dir(d) {
                    failed = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = failed {
            tracing::error!(error = %e, "log: a commit failed; its appends are refused");
            for (name, p) in pending {
                self.undo(&name, p);
            }
            for (_, _, tx) in appends {
                let _ = tx.send(Err(StoreError::Backend(e.to_string())));
            }
            return;
        }
        // Visible, then answered.
        let touched: Vec<String> = pending.keys().cloned().collect();
        for (name, p) in pending {
            self.publish(&name, p);
        }
        for ((_, _, tx), outcome) in appends.into_iter().zip(outcomes) {
            let _ = tx.send(outcome);
        }
        for n in touched {
            self.retain(&n);
        }
    }

    fn stage(
        &mut self,
        name: &str,
        batch: &[Append],
        now: u64,
        pending: &mut HashMap<String, Pending>,
    ) -> Result<Vec<Appended>, StoreError> {
        let w = self.streams.get_mut(name).expect("staged stream exists");
        let o = *w
            .stream
            .options
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        w.expire_ids(o.dedup_window, now);
        let p = pending.entry(name.to_string()).or_insert_with(|| {
            let st = w
                .stream
                .state
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            Pending {
                name: name.to_string(),
                new_segments: Vec::new(),
                writes: Vec::new(),
                undo: st
                    .segs
                    .last()
                    .map(|s| vec![(s.file.clone(), s.len)])
                    .unwrap_or_default(),
                ids: Vec::new(),
                last_seq: st.last_seq,
                prev: (w.active_count, w.active_first_time, w.last_time),
            }
        });
        let (seg_bytes, seg_count, seg_age) = segment_limits(&o);
        let mut out = Vec::with_capacity(batch.len());
        for r in batch {
            if let Some(id) = &r.id {
                if let Some(&seq) = w.dedup.get(id) {
                    out.push(Appended {
                        seq,
                        duplicate: true,
                    });
                    continue;
                }
            }
            let seq = p.last_seq + 1;
            // Times never go backwards within a stream (time lookups binary-search them).
            let time = now.max(w.last_time);
            let size = record_size(r.id.as_deref(), &r.data);
            // The active segment: the last write target, or the stream's last segment.
            let (active_len, has_active) = match p.writes.last() {
                Some((_, b, _, start)) => (start + b.len() as u64, true),
                None => {
                    let st = w
                        .stream
                        .state
                        .read()
                        .unwrap_or_else(PoisonError::into_inner);
                    match st.segs.last() {
                        Some(s) => (s.len, true),
                        None => (0, false),
                    }
                }
            };
            let roll = !has_active
                || (w.active_count > 0
                    && (active_len + size > seg_bytes
                        || w.active_count >= seg_count
                        || w.active_first_time
                            .is_some_and(|t| time.saturating_sub(t) > seg_age)));
            if roll {
                let path = w.stream.dir.join(segment_name(seq));
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&path)
                    .map_err(|e| io("creating", &path, e))?;
                let file = Arc::new(file);
                p.new_segments.push((seq, path, file.clone()));
                p.writes.push((file, Vec::new(), Vec::new(), 0));
                w.active_count = 0;
                w.active_first_time = None;
            } else if p.writes.is_empty() {
                let st = w
                    .stream
                    .state
                    .read()
                    .unwrap_or_else(PoisonError::into_inner);
                let s = st.segs.last().expect("an active segment");
                p.writes
                    .push((s.file.clone(), Vec::new(), Vec::new(), s.len));
            }
            let base = {
                let (_, b, _, start) = p.writes.last().expect("a write target");
                start + b.len() as u64
            };
            let (_, bytes, index, _) = p.writes.last_mut().expect("a write target");
            encode(bytes, seq, time, r.id.as_deref(), &r.data);
            index.push((seq, base, time));
            if let Some(id) = &r.id {
                w.dedup.insert(id.clone(), seq);
                w.dedup_order.push_back((time, id.clone()));
                p.ids.push(id.clone());
            }
            w.active_count += 1;
            w.active_first_time.get_or_insert(time);
            w.last_time = time;
            p.last_seq = seq;
            out.push(Appended {
                seq,
                duplicate: false,
            });
        }
        Ok(out)
    }

    /// A failed commit: files cut back, ids forgotten, counters restored.
    fn undo(&mut self, name: &str, p: Pending) {
        for (f, len) in &p.undo {
            let _ = f.set_len(*len);
        }
        for (_, path, _) in &p.new_segments {
            let _ = fs::remove_file(path);
        }
        if let Some(w) = self.streams.get_mut(name) {
            for id in &p.ids {
                w.dedup.remove(id);
            }
            w.dedup_order.retain(|(_, id)| !p.ids.contains(id));
            (w.active_count, w.active_first_time, w.last_time) = p.prev;
        }
    }

    fn publish(&mut self, name: &str, p: Pending) {
        let Some(w) = self.streams.get(name) else {
            return;
        };
        let mut st = w
            .stream
            .state
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let mut new = p.new_segments.into_iter().peekable();
        for (file, bytes, index, _) in p.writes {
            if new.peek().is_some_and(|(_, _, f)| Arc::ptr_eq(f, &file)) {
                let (first_seq, path, file) = new.next().expect("peeked");
                st.segs.push(Segment {
                    first_seq,
                    path,
                    file,
                    offsets: Vec::new(),
                    times: Vec::new(),
                    len: 0,
                });
            }
            let seg = st.segs.last_mut().expect("a segment to publish into");
            for (_, off, time) in index {
                seg.offsets.push(off as u32);
                seg.times.push(time);
            }
            seg.len += bytes.len() as u64;
            st.bytes += bytes.len() as u64;
        }
        st.last_seq = p.last_seq;
        drop(st);
        w.stream.tail.send_replace(p.last_seq);
    }

    /// Delete the sealed segments every record of which is out of the retention.
    fn retain(&mut self, name: &str) {
        let Some(w) = self.streams.get(name) else {
            return;
        };
        let o = *w
            .stream
            .options
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut gone = Vec::new();
        {
            let mut st = w
                .stream
                .state
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            let first = first_visible(&st, &o, now_ms());
            while st.segs.len() > 1
                && st.segs[0].first_seq + st.segs[0].offsets.len() as u64 <= first
            {
                let s = st.segs.remove(0);
                st.bytes -= s.len;
                gone.push(s.path);
            }
        }
        for path in gone {
            if let Err(e) = fs::remove_file(&path) {
                tracing::warn!(segment = %path.display(), error = %e, "log: removing an expired segment failed");
            }
        }
    }

    fn ensure(&mut self, name: &str, o: StreamOptions) -> Result<(), StoreError> {
        let dir = self.dir.join(name);
        let bytes = serde_json::to_vec(&o).map_err(|e| StoreError::Backend(e.to_string()))?;
        if let Some(w) = self.streams.get(name) {
            let same = *w
                .stream
                .options
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                == o;
            if !same {
                write_atomic(&dir.join("options.json"), &bytes)?;
                *w.stream
                    .options
                    .write()
                    .unwrap_or_else(PoisonError::into_inner) = o;
            }
            return Ok(());
        }
        fs::create_dir_all(&dir).map_err(|e| io("creating", &dir, e))?;
        write_atomic(&dir.join("options.json"), &bytes)?;
        sync_dir(&self.dir)?;
        let (tail, _) = watch::channel(0);
        let stream = Arc::new(Stream {
            name: name.to_string(),
            dir,
            options: RwLock::new(o),
            state: RwLock::new(Segments::default()),
            tail,
        });
        self.streams
            .insert(name.to_string(), WStream::new(stream.clone(), Vec::new()));
        self.shared
            .streams
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), stream);
        Ok(())
    }

    fn delete(&mut self, name: &str) -> Result<bool, StoreError> {
        let Some(_) = self.streams.remove(name) else {
            return Ok(false);
        };
        self.shared
            .streams
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name);
        // Renamed out of the log first (a name no stream can have, skipped at open and
        // removed there), so a crash halfway through the removal leaves no half stream.
        let dir = self.dir.join(name);
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let doomed = self.dir.join(format!(
            ".deleted-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        fs::rename(&dir, &doomed).map_err(|e| io("removing", &dir, e))?;
        sync_dir(&self.dir)?;
        if let Err(e) = fs::remove_dir_all(&doomed) {
            tracing::warn!(dir = %doomed.display(), error = %e, "log: removing a deleted stream's files failed; retried at the next start");
        }
        Ok(true)
    }
}

/// When a segment rolls: bytes, records, and the age of its first record (ms).
fn segment_limits(o: &StreamOptions) -> (u64, u64, u64) {
    let bytes = o
        .max_bytes
        .map(|b| (b / 8).clamp(MIN_SEGMENT, MAX_SEGMENT))
        .unwrap_or(MAX_SEGMENT);
    let count = o.max_messages.map(|m| (m / 8).max(1)).unwrap_or(u64::MAX);
    let age = o
        .max_age
        .map(|a| (a.as_millis() as u64 / 8).max(1))
        .unwrap_or(u64::MAX);
    (bytes, count, age)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_seen() {
        let mut b = Vec::new();
        encode(&mut b, 7, 1234, Some("id-1"), b"hello");
        encode(&mut b, 8, 1235, None, b"");
        let (r, used) = decode(&b).unwrap();
        assert_eq!(
            (r.seq, r.time_ms, r.id.as_deref(), &r.data[..]),
            (7, 1234, Some("id-1"), &b"hello"[..])
        );
        let (r2, used2) = decode(&b[used..]).unwrap();
        assert_eq!((r2.seq, r2.id, r2.data.len()), (8, None, 0));
        assert_eq!(used + used2, b.len());
        // A torn record and a flipped bit are both refused.
        assert!(decode(&b[..used - 1]).is_none());
        let mut bad = b.clone();
        bad[HEADER + 5] ^= 1;
        assert!(decode(&bad).is_none());
    }
}
