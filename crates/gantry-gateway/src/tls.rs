//! TLS termination with rustls: certificates chosen by SNI (exact names, then wildcards, then
//! the first certificate as default), ALPN `h2` and `http/1.1`, and certificate files reloaded
//! when they change on disk (a bad new file is reported and the old certificate kept).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// One certificate and the names it serves.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub hosts: Vec<String>,
}

#[derive(Debug)]
struct CertSet {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// (".example.com", key), longest first.
    wildcard: Vec<(String, Arc<CertifiedKey>)>,
    default: Arc<CertifiedKey>,
}

/// The loaded certificates; cheap to read on every handshake.
#[derive(Debug)]
pub struct CertStore {
    files: Vec<CertFiles>,
    set: ArcSwap<CertSet>,
    stamps: Mutex<Vec<Option<SystemTime>>>,
    provider: Arc<CryptoProvider>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load_one(f: &CertFiles, provider: &CryptoProvider) -> Result<Arc<CertifiedKey>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&f.cert)
        .map_err(|e| format!("{}: {e}", f.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", f.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", f.cert.display()));
    }
    let key =
        PrivateKeyDer::from_pem_file(&f.key).map_err(|e| format!("{}: {e}", f.key.display()))?;
    CertifiedKey::from_der(certs, key, provider)
        .map(Arc::new)
        .map_err(|e| format!("{} with {}: {e}", f.cert.display(), f.key.display()))
}

fn stamp(f: &CertFiles) -> Option<SystemTime> {
    let a = std::fs::metadata(&f.cert).and_then(|m| m.modified()).ok()?;
    let b = std::fs::metadata(&f.key).and_then(|m| m.modified()).ok()?;
    Some(a.max(b))
}

fn build(files: &[CertFiles], provider: &CryptoProvider) -> Result<CertSet, String> {
    let mut exact = HashMap::new();
    let mut wildcard = Vec::new();
    let mut default = None;
    for f in files {
        let key = load_one(f, provider)?;
        default.get_or_insert_with(|| key.clone());
        for h in &f.hosts {
            let h = h.to_ascii_lowercase();
            match h.strip_prefix('*') {
                Some(suffix) => wildcard.push((suffix.to_string(), key.clone())),
                None => {
                    exact.insert(h, key.clone());
                }
            }
        }
    }
    wildcard.sort_by_key(|w| std::cmp::Reverse(w.0.len()));
    Ok(CertSet {
        exact,
        wildcard,
        default: default.ok_or("no certificates configured")?,
    })
}

impl CertStore {
    pub fn load(files: Vec<CertFiles>) -> Result<Arc<Self>, String> {
        let provider = provider();
        let set = build(&files, &provider)?;
        let stamps = files.iter().map(stamp).collect();
        Ok(Arc::new(Self {
            files,
            set: ArcSwap::from_pointee(set),
            stamps: Mutex::new(stamps),
            provider,
        }))
    }

    /// Reload if any file changed; `Ok(true)` when new certificates are live.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now: Vec<Option<SystemTime>> = self.files.iter().map(stamp).collect();
        let mut stamps = self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        if *stamps == now {
            return Ok(false);
        }
        *stamps = now;
        let set = build(&self.files, &self.provider)?;
        self.set.store(Arc::new(set));
        Ok(true)
    }

    /// Check the files every second until `shutdown` turns true.
    pub async fn watch(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = async { let _ = shutdown.wait_for(|s| *s).await; } => return,
            }
            let me = self.clone();
            match tokio::task::spawn_blocking(move || me.reload_if_changed()).await {
                Ok(Ok(true)) => tracing::info!("TLS certificates reloaded"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "TLS certificate reload failed; keeping the previous certificates")
                }
                Err(_) => {}
            }
        }
    }

    /// rustls server configuration using this store, offering HTTP/2 and HTTP/1.1.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<ServerConfig>, String> {
        self.server_config_with_clients(&[])
    }

    /// The server configuration, asking clients for a certificate (optional) issued by one of
    /// `client_cas` when any is given: a verified one names the calling workload (mTLS). Without
    /// a certificate a client is served as before.
    pub fn server_config_with_clients(
        self: &Arc<Self>,
        client_cas: &[rustls_pki_types::CertificateDer<'static>],
    ) -> Result<Arc<ServerConfig>, String> {
        let builder = ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?;
        let builder = if client_cas.is_empty() {
            builder.with_no_client_auth()
        } else {
            let mut roots = rustls::RootCertStore::empty();
            for c in client_cas {
                roots
                    .add(c.clone())
                    .map_err(|e| format!("client CA: {e}"))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                self.provider.clone(),
            )
            .allow_unauthenticated()
            .build()
            .map_err(|e| format!("client certificate verifier: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        };
        let mut cfg = builder.with_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(cfg))
    }
}

#[derive(Debug)]
struct Resolver(Arc<CertStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.0.set.load();
        let Some(name) = hello.server_name() else {
            return Some(set.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(k) = set.exact.get(&name) {
            return Some(k.clone());
        }
        for (suffix, k) in &set.wildcard {
            if name.len() > suffix.len() && name.ends_with(suffix.as_str()) {
                return Some(k.clone());
            }
        }
        Some(set.default.clone())
    }
}

/// Mutual TLS to instances with Gantry's internal CA: the CA the instances' certificates are
/// verified against, and the gateway's own client certificate (renewed by identity; every
/// connection takes the current one).
#[derive(Debug, Default)]
pub struct InternalTls {
    ca: std::sync::RwLock<Vec<rustls_pki_types::CertificateDer<'static>>>,
    key: arc_swap::ArcSwapOption<rustls::sign::CertifiedKey>,
}

impl InternalTls {
    pub(crate) fn ca(&self) -> Vec<rustls_pki_types::CertificateDer<'static>> {
        self.ca
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub(crate) fn set_ca(&self, der: Vec<u8>) {
        *self
            .ca
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            vec![rustls_pki_types::CertificateDer::from(der)];
    }

    /// Replace the client certificate: `chain_pem` (the certificate, then its CA) and its key.
    pub(crate) fn set_key(&self, chain_pem: &str, key_pem: &str) -> Result<(), String> {
        use rustls_pki_types::pem::PemObject;
        let chain = rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("client certificate: {e}"))?;
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| format!("client key: {e}"))?;
        let signer = provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("client key: {e}"))?;
        self.key
            .store(Some(Arc::new(rustls::sign::CertifiedKey::new(
                chain, signer,
            ))));
        Ok(())
    }

    /// The resolver connectors use.
    pub(crate) fn resolver(self: &Arc<Self>) -> Arc<dyn rustls::client::ResolvesClientCert> {
        Arc::new(InternalClient(self.clone()))
    }
}

#[derive(Debug)]
struct InternalClient(Arc<InternalTls>);

impl rustls::client::ResolvesClientCert for InternalClient {
    fn resolve(
        &self,
        _acceptable_issuers: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.key.load_full()
    }

    fn has_certs(&self) -> bool {
        self.0.key.load().is_some()
    }
}
