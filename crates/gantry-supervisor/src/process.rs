//! Processes: spawning an instance in its own process group, signalling the group, capturing
//! its output, and reaping groups a previous gantry left behind.
//!
//! Orphans are prevented three ways: each instance's leader gets `PR_SET_PDEATHSIG = SIGKILL` (it
//! dies with gantry, even on SIGKILL of gantry); every spawned group is recorded in the store so
//! the next `gantry up` kills whatever of it is still alive (grandchildren included); and every
//! process carries its system's and instance's marks in its environment (`GANTRY_SYSTEM`,
//! `GANTRY_INSTANCE`), so a process that left its group (a daemon: `setsid`, a second fork,
//! SIGTERM ignored) is found by a scan of `/proc` and killed when its instance stops, and at the
//! next start if gantry itself was killed. Where cgroup v2 lets gantry make cgroups, each instance
//! also runs in one of its own (the child moves itself in before exec): `cgroup.kill` ends every
//! process of it, even one that cleared its environment.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use gantry_store::{Store, StoreJsonExt};
use gantry_telemetry::{LogStore, LogStream, MAX_LINE_BYTES};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

type EchoFn = dyn Fn(&str, &str, LogStream) + Send + Sync;

pub(crate) const PROCS_BUCKET: &str = "procs";

/// A process record's key: `<system>.<instance>`, so that systems sharing a store (nodes on one
/// NATS) never reap or overwrite each other's records.
pub(crate) fn proc_key(system: &str, instance: &str) -> String {
    format!("{system}.{instance}")
}

/// A spawned process group, as recorded in the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProcRecord {
    pub instance: String,
    pub service: String,
    pub pid: u32,
    pub pgid: u32,
    pub started_ms: u64,
}

/// Per-instance cgroups (v2), where the machine lets gantry make them: every process an
/// instance starts, daemons included, stays in its cgroup, and `cgroup.kill` ends them all.
/// (Resource limits will live here too.)
#[derive(Clone, Debug)]
pub(crate) struct Cgroups {
    base: PathBuf,
}

impl Cgroups {
    /// `<cgroup2 mount><gantry's own cgroup>/gantry-<system>`, if it can be made.
    pub fn detect(system: &str) -> Option<Self> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let mount = mountinfo.lines().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (right.split_whitespace().next()? == "cgroup2")
                .then(|| left.split_whitespace().nth(4).map(PathBuf::from))
                .flatten()
        })?;
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = own.lines().find_map(|l| l.strip_prefix("0::"))?;
        let base = mount
            .join(rel.trim_start_matches('/'))
            .join(format!("gantry-{system}"));
        match std::fs::create_dir(&base) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(_) => return None,
        }
        base.join("cgroup.procs").exists().then_some(Self { base })
    }

    pub fn base(&self) -> &Path {
        &self.base
    }

    /// A fresh cgroup for `instance` (what a previous process of it left is killed first).
    pub fn create(&self, instance: &str) -> Option<PathBuf> {
        let dir = self.base.join(instance);
        if dir.exists() {
            Self::kill_dir(&dir);
        }
        std::fs::create_dir(&dir).ok().map(|()| dir)
    }

    /// Kill every process of `instance`'s cgroup and remove it; how many there were.
    pub fn kill(&self, instance: &str) -> usize {
        Self::kill_dir(&self.base.join(instance))
    }

    /// Kill every instance cgroup's processes (what a previous run left).
    pub fn kill_all(&self) -> usize {
        let Ok(dir) = std::fs::read_dir(&self.base) else {
            return 0;
        };
        dir.flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| Self::kill_dir(&e.path()))
            .sum()
    }

    fn procs(dir: &Path) -> usize {
        std::fs::read_to_string(dir.join("cgroup.procs"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn kill_dir(dir: &Path) -> usize {
        let n = Self::procs(dir);
        if n > 0 {
            let _ = std::fs::write(dir.join("cgroup.kill"), b"1");
        }
        // The kernel empties the cgroup as the processes die; it can be removed once empty.
        for _ in 0..200 {
            if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        n
    }
}

/// Spawn `command` as the leader of a new process group with piped stdout and stderr, in
/// `cgroup` when given.
pub(crate) fn spawn(
    command: &[String],
    env: &[(String, String)],
    cwd: &Path,
    cgroup: Option<&Path>,
) -> std::io::Result<Child> {
    let (prog, args) = command
        .split_first()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty command"))?;
    let mut cmd = Command::new(prog);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    die_with_parent(&mut cmd);
    if let Some(cg) = cgroup {
        join_cgroup(&mut cmd, cg)?;
    }
    cmd.spawn()
}

/// Make the child move itself into `cgroup` before exec, so that nothing it starts is ever
/// outside it (a move from the parent after spawn would race with the child's first fork).
#[allow(unsafe_code)]
fn join_cgroup(cmd: &mut Command, cgroup: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let procs = std::ffi::CString::new(cgroup.join("cgroup.procs").as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: the closure runs in the forked child before exec and only calls async-signal-safe
    // functions (open, write, close) on memory allocated before the fork. Writing "0" to
    // `cgroup.procs` moves the writing process. A failure leaves the child where it was (the
    // environment marks still find what it leaves behind).
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
            Ok(())
        });
    }
    Ok(())
}

/// Make the child receive SIGKILL when gantry dies.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only calls async-signal-safe
    // functions (prctl, getppid, _exit) without allocating.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // gantry died between fork and prctl: do not outlive it.
            if libc::getppid() != parent {
                libc::_exit(1);
            }
            Ok(())
        });
    }
}

/// Send `signal` to a whole process group; false if the group no longer exists.
pub(crate) fn signal_group(pgid: u32, signal: i32) -> bool {
    if pgid <= 1 {
        return false;
    }
    nix_kill(-(pgid as i32), signal)
}

/// Send `signal` to one process; false if it no longer exists.
pub(crate) fn signal_process(pid: u32, signal: i32) -> bool {
    if pid <= 1 || pid > i32::MAX as u32 {
        return false;
    }
    nix_kill(pid as i32, signal)
}

#[allow(unsafe_code)]
fn nix_kill(pid: i32, signal: i32) -> bool {
    // SAFETY: kill(2) has no memory effects; a stale pid yields ESRCH, which we report as false.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Signal number for a validated spec name.
pub(crate) fn signal_number(name: &str) -> i32 {
    match name {
        "SIGINT" => libc::SIGINT,
        "SIGQUIT" => libc::SIGQUIT,
        "SIGHUP" => libc::SIGHUP,
        "SIGUSR1" => libc::SIGUSR1,
        "SIGUSR2" => libc::SIGUSR2,
        "SIGKILL" => libc::SIGKILL,
        _ => libc::SIGTERM,
    }
}

/// Copy a pipe into the log store line by line. Lines longer than [`MAX_LINE_BYTES`] are split,
/// invalid UTF-8 is replaced, so a hostile instance cannot make gantry buffer without bound.
pub(crate) async fn pump<R: AsyncRead + Unpin>(
    reader: R,
    logs: LogStore,
    service: Arc<str>,
    instance: Arc<str>,
    stream: LogStream,
    echo: Option<crate::Echo>,
) {
    let mut reader = BufReader::with_capacity(16 * 1024, reader);
    let mut line: Vec<u8> = Vec::with_capacity(256);
    while let Ok(buf) = reader.fill_buf().await {
        if buf.is_empty() {
            break;
        }
        let room = MAX_LINE_BYTES - line.len();
        let (take, done) = match buf.iter().take(room).position(|&c| c == b'\n') {
            Some(i) => (i + 1, true),
            None if buf.len() >= room => (room, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            emit(
                &mut line,
                &logs,
                &service,
                &instance,
                stream,
                echo.as_deref(),
            );
        }
    }
    if !line.is_empty() {
        emit(
            &mut line,
            &logs,
            &service,
            &instance,
            stream,
            echo.as_deref(),
        );
    }
}

fn emit(
    line: &mut Vec<u8>,
    logs: &LogStore,
    service: &Arc<str>,
    instance: &Arc<str>,
    stream: LogStream,
    echo: Option<&EchoFn>,
) {
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    let text = String::from_utf8_lossy(line).into_owned();
    line.clear();
    if let Some(echo) = echo {
        echo(instance, &text, stream);
    }
    logs.push(service, instance, stream, text);
}

/// Processes other than gantry whose environment carries `GANTRY_SYSTEM=<system>` (and
/// `GANTRY_INSTANCE=<instance>` when given).
pub(crate) fn marked_processes(system: &str, instance: Option<&str>) -> Vec<u32> {
    let sys = format!("GANTRY_SYSTEM={system}");
    let inst = instance.map(|i| format!("GANTRY_INSTANCE={i}"));
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        let mut has_sys = false;
        let mut has_inst = inst.is_none();
        for kv in env.split(|&b| b == 0) {
            has_sys |= kv == sys.as_bytes();
            if let Some(i) = &inst {
                has_inst |= kv == i.as_bytes();
            }
        }
        if has_sys && has_inst {
            out.push(pid);
        }
    }
    out
}

/// SIGKILL every marked process (of one instance, or of the whole system) until none is left
/// (a forking process may need a few rounds); returns how many were killed.
pub(crate) fn kill_marked(system: &str, instance: Option<&str>) -> usize {
    let mut killed = 0;
    for _ in 0..5 {
        let found = marked_processes(system, instance);
        if found.is_empty() {
            break;
        }
        for pid in found {
            if nix_kill(pid as i32, libc::SIGKILL) {
                killed += 1;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    killed
}

/// Kill every process group a previous run recorded and that is still alive, then forget the
/// records. A group is only killed if one of its processes still carries the instance's
/// `GANTRY_INSTANCE` in its environment, so a recycled process group id is left alone.
pub(crate) async fn reap_orphans(
    store: &Arc<dyn Store>,
    system: &str,
    cgroups: Option<&Cgroups>,
) -> Vec<ProcRecord> {
    let reaped = reap_recorded_groups(store, system).await;
    if let Some(cg) = cgroups.cloned() {
        let n = tokio::task::spawn_blocking(move || cg.kill_all())
            .await
            .unwrap_or(0);
        if n > 0 {
            tracing::warn!(
                count = n,
                "killed processes a previous gantry run left in its instances' cgroups"
            );
        }
    }
    // Then processes of an earlier run that left their groups (nothing of this run is running
    // yet, so every marked process is a leftover).
    let system = system.to_string();
    let escaped = tokio::task::spawn_blocking(move || kill_marked(&system, None))
        .await
        .unwrap_or(0);
    if escaped > 0 {
        tracing::warn!(count = escaped, "killed processes of a previous gantry run that had left their instances' process groups");
    }
    reaped
}

async fn reap_recorded_groups(store: &Arc<dyn Store>, system: &str) -> Vec<ProcRecord> {
    let records: Vec<(String, ProcRecord, u64)> = match store.list_json(PROCS_BUCKET, ">").await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read process records; skipping orphan reaping");
            return Vec::new();
        }
    };
    let mut reaped = Vec::new();
    for (key, rec, _) in records {
        // This system's records, and those written before records had a system (the key was
        // the bare instance id); another system's are not ours to reap.
        let ours = key == proc_key(system, &rec.instance) || key == rec.instance;
        if !ours {
            continue;
        }
        if group_is_ours(rec.pgid, &rec.instance) && signal_group(rec.pgid, libc::SIGKILL) {
            tracing::warn!(instance = %rec.instance, pgid = rec.pgid, "killed process group left by a previous gantry run");
            reaped.push(rec);
        }
        let _ = store.delete(PROCS_BUCKET, &key).await;
    }
    reaped
}

/// Does any live process in group `pgid` carry `GANTRY_INSTANCE=<instance>`?
fn group_is_ours(pgid: u32, instance: &str) -> bool {
    let needle = format!("GANTRY_INSTANCE={instance}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return false;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if process_group_of(pid) != Some(pgid) {
            continue;
        }
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
            if env.split(|&b| b == 0).any(|kv| kv == needle.as_bytes()) {
                return true;
            }
        }
    }
    false
}

/// The process group of `pid`, from `/proc/<pid>/stat` (field 5).
fn process_group_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process_group() {
        let me = std::process::id();
        let pg = process_group_of(me);
        assert!(pg.is_some_and(|g| g > 0));
        assert_eq!(process_group_of(u32::MAX), None);
    }
}
