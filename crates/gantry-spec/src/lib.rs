//! The `gantry.toml` spec: typed serde structs, parsing with source positions, and validation.
//!
//! Architecture invariant: a [`Spec`] that [`load`] or [`parse`] returned has passed
//! [`validate`]; nothing downstream re-checks what is checked here. Every error names the file,
//! the line and column where the offending item is, the field path and what was expected.
#![forbid(unsafe_code)]

mod gateway;
mod identity;
mod locate;
mod types;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use gateway::*;
pub use identity::*;
pub use types::*;
pub use validate::{is_reserved_env, is_valid_env_name, valid_env_name, STOP_SIGNALS};

/// One problem found in a spec file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    pub file: PathBuf,
    /// 1-based line and column of the offending item, when known.
    pub position: Option<(usize, usize)>,
    /// Dotted field path, e.g. `services.orders.routes[0].path_prefix`; empty for the document.
    pub field: String,
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.field, self.message)
        }
    }
}

/// All problems found in a spec file (at least one).
#[derive(Debug, Clone, thiserror::Error)]
pub struct SpecErrors(pub Vec<SpecError>);

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A validated spec together with where it came from.
#[derive(Debug, Clone)]
pub struct LoadedSpec {
    pub spec: Spec,
    /// The spec file, as given.
    pub file: PathBuf,
    /// Directory relative paths in the spec are resolved against (the spec file's directory).
    pub base_dir: PathBuf,
}

impl LoadedSpec {
    /// The data directory: `[store] data_dir` resolved against the spec's directory.
    pub fn data_dir(&self) -> PathBuf {
        self.base_dir.join(&self.spec.store.data_dir)
    }

    /// The working directory of a service's instances.
    pub fn service_cwd(&self, service: &ServiceSpec) -> PathBuf {
        match &service.cwd {
            Some(cwd) => self.base_dir.join(cwd),
            None => self.base_dir.clone(),
        }
    }

    /// The spec's part of the desired state: one deployment per service that gantry runs
    /// (services with `endpoints` or self-registration run elsewhere and have none), each with the
    /// spec's one version, paths resolved.
    pub fn deployments(&self) -> Vec<gantry_model::Deployment> {
        self.spec
            .services
            .iter()
            .filter_map(|(name, svc)| {
                let command = svc.program()?.to_vec();
                Some(gantry_model::Deployment {
                    service: name.clone(),
                    versions: vec![gantry_model::VersionDeployment {
                        version: svc.semver(),
                        source: gantry_model::VersionSource::Spec,
                        command,
                        cwd: self.service_cwd(svc),
                        env: svc.env.clone(),
                        replicas: svc.replicas,
                        spec_replicas: svc.replicas,
                        port: svc.port,
                        health: svc.health.clone(),
                        restart: svc.restart,
                        backoff: svc.backoff.clone(),
                        stop_signal: svc.stop_signal.clone(),
                        stop_timeout_ms: svc.stop_timeout_ms,
                        drain_timeout_ms: svc.drain_timeout_ms,
                    }],
                    depends_on: svc.depends_on.clone(),
                    on_config_change: svc.on_config_change,
                    reload_signal: svc.reload_signal.clone(),
                    config_version: None,
                    resources: Default::default(),
                    placement: Default::default(),
                    metadata: svc.metadata.clone(),
                })
            })
            .collect()
    }
}

/// Read, parse and validate a spec file.
pub fn load(file: &Path) -> Result<LoadedSpec, SpecErrors> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        SpecErrors(vec![SpecError {
            file: file.to_path_buf(),
            position: None,
            field: String::new(),
            message: format!("cannot read spec file: {e}"),
        }])
    })?;
    let spec = parse(&text, file)?;
    let base_dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let base_dir = std::fs::canonicalize(&base_dir).unwrap_or(base_dir);
    Ok(LoadedSpec {
        spec,
        file: file.to_path_buf(),
        base_dir,
    })
}

/// Parse and validate spec text; `file` is only used in error messages.
pub fn parse(text: &str, file: &Path) -> Result<Spec, SpecErrors> {
    let located = locate::Locator::new(text);
    let de = toml::de::Deserializer::parse(text).map_err(|e| {
        SpecErrors(vec![SpecError {
            file: file.to_path_buf(),
            position: e.span().map(|s| located.line_col(s.start)),
            field: String::new(),
            message: e.message().trim().to_string(),
        }])
    })?;
    let spec: Spec = serde_path_to_error::deserialize(de).map_err(|e| {
        let field = clean_path(&e.path().to_string());
        let inner = e.inner();
        let position = inner
            .span()
            .map(|s| located.line_col(s.start))
            .or_else(|| located.position_of(&field));
        let first = SpecError {
            file: file.to_path_buf(),
            position,
            field: field.clone(),
            message: inner.message().trim().to_string(),
        };
        SpecErrors(every_type_error(text, file, &located, first))
    })?;
    let problems = validate::validate(&spec);
    if problems.is_empty() {
        Ok(spec)
    } else {
        Err(SpecErrors(
            problems
                .into_iter()
                .map(|(field, message)| SpecError {
                    file: file.to_path_buf(),
                    position: located.position_of(&field),
                    field,
                    message,
                })
                .collect(),
        ))
    }
}

/// Serde stops at the first field of the wrong type (or unknown); `validate` promises every
/// problem. So: drop the offending field from the document and deserialize again, until the
/// rest deserializes or nothing more can be dropped. Later errors are placed by their path.
fn every_type_error(
    text: &str,
    file: &Path,
    located: &locate::Locator,
    first: SpecError,
) -> Vec<SpecError> {
    let mut errors = vec![first];
    let Ok(mut doc) = text.parse::<toml::Table>() else {
        return errors;
    };
    for _ in 0..100 {
        let last = &errors[errors.len() - 1].field;
        if last.is_empty() || !locate::remove(&mut doc, last) {
            break;
        }
        let value = toml::Value::Table(doc.clone());
        match serde_path_to_error::deserialize::<_, Spec>(value) {
            Ok(_) => break,
            Err(e) => {
                let field = clean_path(&e.path().to_string());
                if errors.iter().any(|x| x.field == field) {
                    break;
                }
                errors.push(SpecError {
                    file: file.to_path_buf(),
                    position: located.position_of(&field),
                    field,
                    message: e.inner().message().trim().to_string(),
                });
            }
        }
    }
    errors
}

/// A static endpoint address (`ip:port`, port not 0).
pub fn parse_endpoint(s: &str) -> Option<std::net::SocketAddr> {
    s.parse::<std::net::SocketAddr>()
        .ok()
        .filter(|a| a.port() != 0)
}

/// serde_path_to_error prints `.` for the root and `?` for unknown segments.
fn clean_path(p: &str) -> String {
    if p == "." {
        String::new()
    } else {
        p.to_string()
    }
}

#[cfg(test)]
mod tests;
