//! Other issuers' keys (Keycloak, Auth0, another Gantry): fetched from their JWKS (found
//! through OpenID discovery when not given), refreshed every five minutes, refetched when a
//! token names a key the set lacks (at most once a second per issuer), and kept when a
//! fetch fails — an unreachable provider does not log everyone out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::Identity;

/// A trusted issuer of someone else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalIssuer {
    pub name: String,
    pub issuer: String,
    pub jwks_uri: Option<String>,
    /// PEM file of the CAs its https endpoints are verified against; `None`: the system's.
    pub ca_file: Option<String>,
}

const REFRESH: Duration = Duration::from_secs(300);
const RETRY: Duration = Duration::from_secs(10);
/// A token naming a key the set lacks refetches at most this often per issuer (whoever sends
/// tokens with made-up `kid`s costs the provider one request a second, no more).
const MIN_REFETCH: Duration = Duration::from_secs(1);
const MAX_DOC: usize = 1 << 20;

type HttpClient = hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>;

/// One GET over https, verified against `ca_file`'s CAs (the system's when `None`).
async fn get_https(url: &str, uri: &http::Uri, ca_file: Option<&str>) -> Result<Vec<u8>, String> {
    let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
    let port = uri.port_u16().unwrap_or(443);
    let tls = gantry_http::pool::UpstreamTls::new(ca_file, Some(host))
        .map_err(|e| format!("{url}: {e}"))?;
    let name = tls
        .server_name
        .clone()
        .ok_or_else(|| format!("{url}: no server name"))?;
    let fetch = async {
        let tcp = tokio::net::TcpStream::connect((host, port))
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let stream = tls
            .h1
            .connect(name, tcp)
            .await
            .map_err(|e| format!("{url}: TLS: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| format!("{url}: {e}"))?;
        tokio::spawn(conn);
        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = uri.authority().map_or(host, |a| a.as_str());
        let req = http::Request::get(path)
            .header(http::header::HOST, authority)
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: status {}", resp.status()));
        }
        let body = Limited::new(resp.into_body(), MAX_DOC)
            .collect()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        Ok(body.to_bytes().to_vec())
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .map_err(|_| format!("{url}: timed out"))?
}

async fn get(client: &HttpClient, url: &str, ca_file: Option<&str>) -> Result<Vec<u8>, String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    if uri.scheme_str() == Some("https") {
        return get_https(url, &uri, ca_file).await;
    }
    let req = http::Request::get(uri)
        .header(http::header::ACCEPT, "application/json")
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .map_err(|_| format!("{url}: timed out"))?
        .map_err(|e| format!("{url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("{url}: status {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_DOC)
        .collect()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    Ok(body.to_bytes().to_vec())
}

async fn fetch(client: &HttpClient, e: &ExternalIssuer) -> Result<gantry_authn::KeySet, String> {
    let jwks_uri = match &e.jwks_uri {
        Some(u) => u.clone(),
        None => {
            let url = format!(
                "{}/.well-known/openid-configuration",
                e.issuer.trim_end_matches('/')
            );
            let doc: serde_json::Value =
                serde_json::from_slice(&get(client, &url, e.ca_file.as_deref()).await?)
                    .map_err(|err| format!("{url}: not JSON: {err}"))?;
            doc.get("jwks_uri")
                .and_then(|v| v.as_str())
                .ok_or_else(|| format!("{url}: no jwks_uri"))?
                .to_string()
        }
    };
    let (set, skipped) =
        gantry_authn::KeySet::from_jwks(&get(client, &jwks_uri, e.ca_file.as_deref()).await?)?;
    for s in skipped {
        tracing::debug!(issuer = %e.name, "identity: JWKS key skipped: {s}");
    }
    Ok(set)
}

/// Keep every external issuer's keys fresh until the task is aborted.
pub(crate) async fn run(id: Arc<Identity>) {
    let issuers = id.config().external;
    if issuers.is_empty() {
        return;
    }
    let client: HttpClient = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build(HttpConnector::new());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(16);
    id.set_refetch(tx);
    let mut next: HashMap<String, Instant> = issuers
        .iter()
        .map(|e| (e.name.clone(), Instant::now()))
        .collect();
    let mut last: HashMap<String, Instant> = HashMap::new();
    loop {
        let now = Instant::now();
        for e in &issuers {
            if next.get(&e.name).is_some_and(|t| *t <= now) {
                let ok = refresh(&id, &client, e).await;
                last.insert(e.name.clone(), Instant::now());
                next.insert(
                    e.name.clone(),
                    Instant::now() + if ok { REFRESH } else { RETRY },
                );
            }
        }
        let wake = next.values().min().copied().unwrap_or(now + REFRESH);
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            Some(name) = rx.recv() => {
                // A token named a key we lack: refetch now, or as soon as the last fetch is
                // MIN_REFETCH old (requests wait for it at the gateway).
                let at = last
                    .get(&name)
                    .map_or_else(Instant::now, |t| (*t + MIN_REFETCH).max(Instant::now()));
                if let Some(n) = next.get_mut(&name) {
                    *n = (*n).min(at);
                }
            }
        }
    }
}

async fn refresh(id: &Identity, client: &HttpClient, e: &ExternalIssuer) -> bool {
    match fetch(client, e).await {
        Ok(set) => {
            id.metrics
                .jwks_fetches
                .get_or_create(&crate::GrantLabels {
                    grant: "external",
                    result: "ok",
                })
                .inc();
            tracing::debug!(issuer = %e.name, keys = set.len(), "identity: external keys fetched");
            id.external_keys(&e.name, &e.issuer, set);
            true
        }
        Err(err) => {
            id.metrics
                .jwks_fetches
                .get_or_create(&crate::GrantLabels {
                    grant: "external",
                    result: "error",
                })
                .inc();
            tracing::warn!(issuer = %e.name, error = %err, "identity: could not fetch external keys; keeping the last ones");
            false
        }
    }
}
