//! The CLI's side of the admin API: finding a running gantry and talking to it.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::{EXIT_FAILURE, EXIT_USAGE};

pub use gantry_system::{AdminInfo, ADMIN_INFO_FILE, TOKEN_FILE};

/// Where the user asked us to look.
pub struct Target {
    pub file: PathBuf,
    pub admin: Option<String>,
    pub token: Option<String>,
}

/// A failed CLI command: what to print and the exit code.
#[derive(Debug)]
pub struct CliError {
    pub message: String,
    pub code: u8,
}

impl CliError {
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: EXIT_FAILURE,
        }
    }
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            code: EXIT_USAGE,
        }
    }
}

pub struct Client {
    base: String,
    token: Option<String>,
    /// The token service's URL (from `admin.json`; unknown with `--admin`).
    identity: Option<String>,
    http: hyper_util::client::legacy::Client<HttpConnector, Full<Bytes>>,
}

fn read_token(data_dir: &Path) -> Option<String> {
    std::fs::read_to_string(data_dir.join(TOKEN_FILE))
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

impl Client {
    pub fn connect(t: Target) -> Result<Self, CliError> {
        let mut identity = None;
        let (base, token) = match t.admin {
            Some(url) => {
                let token = t.token.or_else(|| {
                    gantry_spec::load(&t.file)
                        .ok()
                        .and_then(|s| read_token(&s.data_dir()))
                });
                (url, token)
            }
            None => {
                if !t.file.exists() {
                    return Err(CliError::usage(format!(
                        "no spec file {} here: pass -f FILE (the spec gantry up runs) or --admin URL",
                        t.file.display()
                    )));
                }
                let spec =
                    gantry_spec::load(&t.file).map_err(|e| CliError::usage(e.to_string()))?;
                let dir = spec.data_dir();
                let info_path = dir.join(ADMIN_INFO_FILE);
                let info: AdminInfo = std::fs::read(&info_path)
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .ok_or_else(|| {
                        CliError::new(format!(
                            "gantry is not running for {} (no {}); start it with: gantry up -f {}",
                            t.file.display(),
                            info_path.display(),
                            t.file.display()
                        ))
                    })?;
                identity = Some(info.identity_url).filter(|u| !u.is_empty());
                (info.admin_url, t.token.or_else(|| read_token(&dir)))
            }
        };
        let http = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .build(HttpConnector::new());
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token,
            identity,
            http,
        })
    }

    /// The admin API's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn identity_url(&self) -> Option<String> {
        self.identity.clone()
    }

    /// Use this bearer token (a logged-in user's).
    pub fn set_token(&mut self, t: String) {
        self.token = Some(t);
    }

    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<hyper::Response<Incoming>, CliError> {
        let body = body.map(|v| ("application/json", Bytes::from(v.to_string())));
        self.request_raw(method, path, body, &[]).await
    }

    async fn request_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<(&str, Bytes)>,
        extra: &[(String, String)],
    ) -> Result<hyper::Response<Incoming>, CliError> {
        let url = format!("{}{}", self.base, path);
        let mut b = Request::builder().method(method.clone()).uri(&url);
        for (k, v) in extra {
            b = b.header(k.as_str(), v.as_str());
        }
        // Every endpoint needs a permission, reads included.
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        let body = match body {
            Some((ct, bytes)) => {
                b = b.header("content-type", ct);
                Full::new(bytes)
            }
            None => Full::new(Bytes::new()),
        };
        let req = b
            .body(body)
            .map_err(|e| CliError::usage(format!("bad request {url}: {e}")))?;
        let resp = self.http.request(req).await.map_err(|e| {
            CliError::new(format!(
                "cannot reach gantry's admin API at {}: {e}; is `gantry up` running?",
                self.base
            ))
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let msg = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| {
                v.get("message")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        let code = if status == StatusCode::BAD_REQUEST || status == StatusCode::NOT_FOUND {
            EXIT_USAGE
        } else {
            EXIT_FAILURE
        };
        Err(CliError {
            message: format!("{msg} (HTTP {})", status.as_u16()),
            code,
        })
    }

    /// A call with a typed body and a typed answer (the API's own types).
    pub async fn send<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, CliError> {
        let body = body
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| CliError::new(format!("encoding the request: {e}")))?;
        let v = self.call(method, path, body.as_ref()).await?;
        serde_json::from_value(v).map_err(|e| {
            CliError::new(format!(
                "unexpected answer from {path}: {e} (is gantry the same version as this CLI?)"
            ))
        })
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, CliError> {
        let resp = self.request(method, path, body).await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CliError::new(format!("reading response: {e}")))?
            .to_bytes();
        if bytes.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| CliError::new(format!("gantry sent invalid JSON: {e}")))
    }

    /// A call with a body that is not JSON (a document to import); the answer is JSON.
    pub async fn send_text<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<T, CliError> {
        self.send_with_headers(method, path, content_type, &[], body)
            .await
    }

    /// A call with a body that is not JSON and headers of its own (a publish); the answer is
    /// JSON.
    pub async fn send_with_headers<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
    ) -> Result<T, CliError> {
        let resp = self
            .request_raw(
                method,
                path,
                Some((content_type, Bytes::from(body))),
                headers,
            )
            .await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CliError::new(format!("reading response: {e}")))?
            .to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| {
            CliError::new(format!(
                "unexpected answer from {path}: {e} (is gantry the same version as this CLI?)"
            ))
        })
    }

    /// A GET whose answer is text (an export).
    pub async fn get_text(&self, path: &str) -> Result<String, CliError> {
        let resp = self.request(Method::GET, path, None).await?;
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| CliError::new(format!("reading response: {e}")))?
            .to_bytes();
        String::from_utf8(bytes.to_vec())
            .map_err(|_| CliError::new("gantry sent text that is not UTF-8"))
    }

    pub async fn get(&self, path: &str) -> Result<serde_json::Value, CliError> {
        self.call(Method::GET, path, None).await
    }

    /// A streaming GET; the caller reads the body frame by frame.
    pub async fn stream(&self, path: &str) -> Result<Incoming, CliError> {
        Ok(self.request(Method::GET, path, None).await?.into_body())
    }
}

/// Percent-encode a query value.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
