//! Workload identity: before each start, every supervised instance gets a short-lived token
//! naming its service, version and instance — in `$GANTRY_INSTANCE_DIR/identity/token`
//! (0600), kept fresh (rewritten atomically at half-life), and in `GANTRY_TOKEN` (the token at
//! start; long-running code should read the file). `GANTRY_TOKEN_FILE` names the file and
//! `GANTRY_ISSUER` the issuer. Calls through the gateway carry it
//! (`Authorization: Bearer …`), so the gateway knows which service calls. When the instance is
//! gone its last token is revoked.
//!
//! Instances of services with `mtls = true` also get a certificate from the internal CA
//! (`identity/cert.pem`: the instance's certificate then the CA's; `identity/key.pem`;
//! `identity/ca.pem`; in `GANTRY_TLS_CERT`, `GANTRY_TLS_KEY`, `GANTRY_TLS_CA`), renewed at
//! half-life: the new key is written first and the certificate last, each file replaced
//! atomically, so a service that reloads when `cert.pem` changes gets a matching pair.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gantry_supervisor::{InstanceAdditions, InstanceFile, InstanceHook, InstanceInfo};

use crate::Identity;

pub const TOKEN_FILE: &str = "identity/token";
pub const CERT_FILE: &str = "identity/cert.pem";
pub const KEY_FILE: &str = "identity/key.pem";
pub const CA_FILE: &str = "identity/ca.pem";

struct Renewal {
    task: tokio::task::AbortHandle,
    /// The token now in the file.
    current: Arc<Mutex<(String, u64)>>,
}

pub struct WorkloadHook {
    id: Arc<Identity>,
    renewals: Mutex<HashMap<String, Renewal>>,
}

impl WorkloadHook {
    pub fn new(id: Arc<Identity>) -> Self {
        Self {
            id,
            renewals: Mutex::new(HashMap::new()),
        }
    }

    /// Stop renewing `instance`'s token and revoke the last one.
    async fn end(&self, instance: &str) {
        let r = self
            .renewals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(instance);
        if let Some(r) = r {
            r.task.abort();
            let (jti, exp) = r
                .current
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Err(e) = self.id.revoke_jti(&jti, exp).await {
                tracing::warn!(instance, error = %e, "identity: could not revoke a stopped instance's token");
            }
        }
    }
}

fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[async_trait::async_trait]
impl InstanceHook for WorkloadHook {
    fn name(&self) -> &'static str {
        "identity"
    }

    async fn prepare(&self, i: &InstanceInfo<'_>) -> Result<InstanceAdditions, String> {
        // A restart of the same instance: its previous run's token goes.
        self.end(i.id).await;
        let version = i.version.to_string();
        let t = self
            .id
            .workload_token(i.service, &version, i.id)
            .map_err(|e| format!("cannot issue the instance's credential: {e}"))?;
        let path: PathBuf = i.dir.join(TOKEN_FILE);
        let current = Arc::new(Mutex::new((t.jti.clone(), t.expires)));
        let cert = if self.id.mtls(i.service) {
            Some(
                self.id
                    .issue_cert(i.service, i.id)
                    .map_err(|e| format!("cannot issue the instance's certificate: {e}"))?,
            )
        } else {
            None
        };
        let cert_dir = i.dir.to_path_buf();
        let first_cert_expiry = cert.as_ref().map(|c| c.expires);
        let task = {
            let (id, service, instance, path, current) = (
                self.id.clone(),
                i.service.to_string(),
                i.id.to_string(),
                path.clone(),
                current.clone(),
            );
            let ttl = self.id.config().workload_ttl;
            tokio::spawn(async move {
                let now = gantry_authn::now_secs;
                let mut next_token = now() + (ttl / 2).max(1);
                let mut next_cert = first_cert_expiry.map(|e| now() + e.saturating_sub(now()) / 2);
                loop {
                    let wake = next_cert.map_or(next_token, |c| c.min(next_token));
                    tokio::time::sleep(Duration::from_secs(wake.saturating_sub(now()).max(1)))
                        .await;
                    if next_cert.is_some_and(|c| c <= now()) {
                        next_cert = Some(renew_cert(&id, &service, &instance, &cert_dir).await);
                    }
                    if next_token > now() {
                        continue;
                    }
                    next_token = now() + (ttl / 2).max(1);
                    match id.workload_token(&service, &version, &instance) {
                        Ok(n) => {
                            let p = path.clone();
                            let body = n.token.clone().into_bytes();
                            let w = tokio::task::spawn_blocking(move || write_atomically(&p, &body))
                                .await;
                            match w {
                                Ok(Ok(())) => {
                                    let old = std::mem::replace(
                                        &mut *current.lock().unwrap_or_else(PoisonError::into_inner),
                                        (n.jti, n.expires),
                                    );
                                    tracing::debug!(instance = %instance, "identity: workload token renewed");
                                    // The old token stays valid until it expires: the instance
                                    // may hold it in memory mid-request.
                                    drop(old);
                                }
                                Ok(Err(e)) => {
                                    tracing::warn!(instance = %instance, error = %e, "identity: could not write the renewed token");
                                }
                                Err(_) => {}
                            }
                        }
                        Err(e) => {
                            tracing::warn!(instance = %instance, error = %e, "identity: could not renew the workload token")
                        }
                    }
                }
            })
            .abort_handle()
        };
        self.renewals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(i.id.to_string(), Renewal { task, current });
        let mut add = InstanceAdditions::default();
        add.files.push(InstanceFile {
            path: PathBuf::from(TOKEN_FILE),
            contents: t.token.clone().into_bytes(),
            mode: 0o600,
        });
        add.env.insert(
            "GANTRY_TOKEN_FILE".into(),
            path.to_string_lossy().into_owned(),
        );
        add.env.insert("GANTRY_TOKEN".into(), t.token);
        add.env
            .insert("GANTRY_ISSUER".into(), self.id.issuer().to_string());
        if let Some(c) = cert {
            for (file, contents, var) in [
                (KEY_FILE, c.key_pem, "GANTRY_TLS_KEY"),
                (CERT_FILE, c.chain_pem, "GANTRY_TLS_CERT"),
                (
                    CA_FILE,
                    self.id.ca_certificate().0.to_string(),
                    "GANTRY_TLS_CA",
                ),
            ] {
                add.files.push(InstanceFile {
                    path: PathBuf::from(file),
                    contents: contents.into_bytes(),
                    mode: 0o600,
                });
                add.env
                    .insert(var.into(), i.dir.join(file).to_string_lossy().into_owned());
            }
        }
        Ok(add)
    }

    async fn release(&self, i: &InstanceInfo<'_>) {
        self.end(i.id).await;
    }
}

/// Issue a new certificate for an instance and replace its files (key first, certificate last);
/// returns when to renew next (half its life, or in a minute after a failure).
async fn renew_cert(id: &Identity, service: &str, instance: &str, dir: &Path) -> u64 {
    let now = gantry_authn::now_secs();
    let c = match id.issue_cert(service, instance) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(instance, error = %e, "identity: could not renew the instance's certificate");
            return now + 60;
        }
    };
    let (key, cert) = (dir.join(KEY_FILE), dir.join(CERT_FILE));
    let written = tokio::task::spawn_blocking(move || {
        write_atomically(&key, c.key_pem.as_bytes())?;
        write_atomically(&cert, c.chain_pem.as_bytes())
    })
    .await;
    match written {
        Ok(Ok(())) => {
            tracing::debug!(instance, "identity: certificate renewed");
            now + c.expires.saturating_sub(now) / 2
        }
        _ => {
            tracing::warn!(
                instance,
                "identity: could not write the renewed certificate"
            );
            now + 60
        }
    }
}
