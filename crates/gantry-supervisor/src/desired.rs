//! The desired state in the store: one [`Deployment`] per service in the `deploy` bucket, and
//! its writers' operations, each a compare-and-set loop so that concurrent writers (the spec on
//! reload, a scale from the API; later a deploy, the autoscaler, another node) each build on what
//! the other wrote, and exactly one wins each round.

use std::collections::BTreeMap;
use std::sync::Arc;

use gantry_model::{Deployment, VersionSource};
use gantry_store::{Store, StoreError, StoreJsonExt};
use serde::{Deserialize, Serialize};

use crate::{SupervisorError, MAX_REPLICAS};

/// The bucket of the desired state: key = service name, value = [`Deployment`] (JSON).
pub const DEPLOY_BUCKET: &str = "deploy";
/// Before the desired state, `gantry scale` kept its overrides here.
const LEGACY_DESIRED_BUCKET: &str = "desired";
/// Rounds of compare-and-set before a writer gives up on a key that keeps changing.
const CAS_ROUNDS: usize = 32;

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
struct LegacyOverride {
    replicas: u32,
    spec_replicas: u32,
}

/// A version deployed through the API: how it differs from the service's spec version.
#[derive(Debug, Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VersionChange {
    pub replicas: u32,
    /// Program and arguments, when not the spec version's.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Environment set over the spec version's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

impl VersionChange {
    fn check(&self) -> Result<(), SupervisorError> {
        if self.replicas > MAX_REPLICAS {
            return Err(SupervisorError::Invalid(format!(
                "replicas: expected 0..={MAX_REPLICAS}, got {}",
                self.replicas
            )));
        }
        if let Some(c) = &self.command {
            if c.is_empty() || c[0].is_empty() {
                return Err(SupervisorError::Invalid(
                    "command: expected a program and its arguments".into(),
                ));
            }
            if c.iter().any(|a| a.contains('\0')) {
                return Err(SupervisorError::Invalid(
                    "command: arguments must not contain NUL".into(),
                ));
            }
        }
        if self.env.len() > 256 {
            return Err(SupervisorError::Invalid(
                "env: at most 256 variables".into(),
            ));
        }
        for (k, v) in &self.env {
            let name_ok = k.len() <= 256 && gantry_model::is_valid_env_name(k);
            if !name_ok {
                return Err(SupervisorError::Invalid(format!(
                    "env.{k}: expected a name of letters, digits and '_', not starting with a digit"
                )));
            }
            if gantry_model::is_reserved_env(k) {
                return Err(SupervisorError::Invalid(format!(
                    "env.{k}: PORT and GANTRY_* are set by gantry"
                )));
            }
            if v.len() > 64 * 1024 || v.contains('\0') {
                return Err(SupervisorError::Invalid(format!(
                    "env.{k}: values are at most 64 KiB, without NUL"
                )));
            }
        }
        Ok(())
    }
}

/// What applying the spec changed, by service.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct SpecApplied {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
    /// Services whose replica count set through the API was kept (the spec's own count for them
    /// did not change).
    pub kept_scale: Vec<String>,
}

/// Reads and writes the desired state.
#[derive(Clone)]
pub struct DesiredState {
    store: Arc<dyn Store>,
}

impl DesiredState {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    pub async fn list(&self) -> Result<Vec<Deployment>, SupervisorError> {
        let rows: Vec<(String, Deployment, u64)> = self.store.list_json(DEPLOY_BUCKET, ">").await?;
        Ok(rows.into_iter().map(|(_, d, _)| d).collect())
    }

    pub async fn get(&self, service: &str) -> Result<Option<Deployment>, SupervisorError> {
        Ok(self
            .store
            .get_json(DEPLOY_BUCKET, service)
            .await?
            .map(|(d, _)| d))
    }

    /// Make the desired state match the spec's services: add and update them (keeping a scale
    /// set through the API while the spec's own count is unchanged, and versions deployed
    /// through the API), and remove the services the spec no longer has.
    pub async fn apply_spec(&self, spec: Vec<Deployment>) -> Result<SpecApplied, SupervisorError> {
        let mut report = SpecApplied::default();
        let wanted: BTreeMap<String, Deployment> =
            spec.into_iter().map(|d| (d.service.clone(), d)).collect();
        for (name, d) in &wanted {
            let legacy: Option<LegacyOverride> = self
                .store
                .get_json(LEGACY_DESIRED_BUCKET, name)
                .await?
                .map(|(o, _)| o);
            let outcome = self
                .modify(name, |current| {
                    let mut next = d.clone();
                    let Some(cur) = current else {
                        if let (Some(o), Some(v)) = (&legacy, next.versions.first_mut()) {
                            if o.spec_replicas == v.spec_replicas {
                                v.replicas = o.replicas;
                            }
                        }
                        return Ok(Some(next));
                    };
                    merge_spec(cur, &mut next);
                    Ok(Some(next))
                })
                .await?;
            if legacy.is_some() {
                self.store.delete(LEGACY_DESIRED_BUCKET, name).await?;
            }
            match outcome {
                (None, Some(_), _) => report.added.push(name.clone()),
                (Some(before), Some(after), _) => {
                    if before != after {
                        report.changed.push(name.clone());
                    }
                    if after
                        .versions
                        .iter()
                        .any(|v| v.source == VersionSource::Spec && v.replicas != v.spec_replicas)
                    {
                        report.kept_scale.push(name.clone());
                    }
                }
                _ => {}
            }
        }
        for d in self.list().await? {
            if !wanted.contains_key(&d.service) {
                self.store.delete(DEPLOY_BUCKET, &d.service).await?;
                report.removed.push(d.service);
            }
        }
        Ok(report)
    }

    /// Set the instance count of a service's version (its only one when `version` is `None`);
    /// returns the deployment and the store revision that holds it.
    pub async fn scale(
        &self,
        service: &str,
        version: Option<&semver::Version>,
        replicas: u32,
    ) -> Result<(Deployment, u64), SupervisorError> {
        if replicas > MAX_REPLICAS {
            return Err(SupervisorError::Invalid(format!(
                "replicas: expected 0..={MAX_REPLICAS}, got {replicas}"
            )));
        }
        let (_, after, rev) = self
            .modify(service, |current| {
                let Some(mut d) = current.cloned() else {
                    return Err(SupervisorError::UnknownService(service.into()));
                };
                let v = match version {
                    Some(want) => d
                        .versions
                        .iter_mut()
                        .find(|v| &v.version == want)
                        .ok_or_else(|| {
                            SupervisorError::Invalid(format!(
                                "service {service} has no version {want} (it runs {})",
                                versions_of(current)
                            ))
                        })?,
                    None if d.versions.len() == 1 => &mut d.versions[0],
                    None => {
                        return Err(SupervisorError::Invalid(format!(
                            "service {service} runs several versions ({}); say which to scale",
                            versions_of(current)
                        )))
                    }
                };
                if v.port.is_some() && replicas > 1 {
                    return Err(SupervisorError::Invalid(format!(
                        "service {service} has a fixed port, so it can run only one instance"
                    )));
                }
                v.replicas = replicas;
                Ok(Some(d))
            })
            .await?;
        Ok((
            after.ok_or_else(|| SupervisorError::UnknownService(service.into()))?,
            rev,
        ))
    }

    /// Add a version of a service beside those it runs (or change one added this way): it runs
    /// like the spec's version of the service, with `change` applied. The base for releases.
    pub async fn put_version(
        &self,
        service: &str,
        version: semver::Version,
        change: VersionChange,
    ) -> Result<Deployment, SupervisorError> {
        change.check()?;
        let (_, after, _) = self
            .modify(service, |current| {
                let Some(mut d) = current.cloned() else {
                    return Err(SupervisorError::UnknownService(service.into()));
                };
                if let Some(existing) = d.version(&version) {
                    if existing.source == VersionSource::Spec {
                        return Err(SupervisorError::Conflict(format!(
                            "version {version} of {service} comes from the spec file; change it there (or scale it)"
                        )));
                    }
                }
                let base = d
                    .versions
                    .iter()
                    .find(|v| v.source == VersionSource::Spec)
                    .or(d.versions.first())
                    .cloned()
                    .ok_or_else(|| {
                        SupervisorError::Invalid(format!("service {service} has no version to start from"))
                    })?;
                if base.port.is_some() {
                    return Err(SupervisorError::Invalid(format!(
                        "service {service} has a fixed port, so two versions cannot run side by side"
                    )));
                }
                let mut v = base;
                v.version = version.clone();
                v.source = VersionSource::Api;
                v.replicas = change.replicas;
                v.spec_replicas = 0;
                if let Some(cmd) = &change.command {
                    v.command = cmd.clone();
                }
                v.env.extend(change.env.clone());
                d.versions.retain(|x| x.version != version);
                d.versions.push(v);
                Ok(Some(d))
            })
            .await?;
        after.ok_or_else(|| SupervisorError::UnknownService(service.into()))
    }

    /// Remove a version added through the API; its instances drain and stop.
    pub async fn remove_version(
        &self,
        service: &str,
        version: &semver::Version,
    ) -> Result<Deployment, SupervisorError> {
        let (_, after, _) = self
            .modify(service, |current| {
                let Some(mut d) = current.cloned() else {
                    return Err(SupervisorError::UnknownService(service.into()));
                };
                match d.version(version) {
                    None => {
                        return Err(SupervisorError::NotFound(format!(
                            "service {service} has no version {version} (it runs {})",
                            versions_of(current)
                        )))
                    }
                    Some(v) if v.source == VersionSource::Spec => {
                        return Err(SupervisorError::Conflict(format!(
                            "version {version} of {service} comes from the spec file; change it there"
                        )))
                    }
                    Some(_) => {}
                }
                d.versions.retain(|v| &v.version != version);
                Ok(Some(d))
            })
            .await?;
        after.ok_or_else(|| SupervisorError::UnknownService(service.into()))
    }

    /// Read-modify-write one deployment with compare-and-set until it holds: `f` gets the
    /// current value and returns the next (`None` deletes). Returns (before, after).
    pub async fn modify<F>(
        &self,
        service: &str,
        mut f: F,
    ) -> Result<(Option<Deployment>, Option<Deployment>, u64), SupervisorError>
    where
        F: FnMut(Option<&Deployment>) -> Result<Option<Deployment>, SupervisorError>,
    {
        for _ in 0..CAS_ROUNDS {
            let current: Option<(Deployment, u64)> =
                self.store.get_json(DEPLOY_BUCKET, service).await?;
            let next = f(current.as_ref().map(|(d, _)| d))?;
            if next.as_ref() == current.as_ref().map(|(d, _)| d) {
                let rev = current.as_ref().map_or(0, |(_, r)| *r);
                let before = current.map(|(d, _)| d);
                return Ok((before.clone(), before, rev));
            }
            let written = match (&current, &next) {
                (Some((_, rev)), Some(n)) => {
                    self.store
                        .update_json(DEPLOY_BUCKET, service, n, *rev)
                        .await
                }
                (None, Some(n)) => self.store.create_json(DEPLOY_BUCKET, service, n).await,
                (Some((_, rev)), None) => self
                    .store
                    .delete_if(DEPLOY_BUCKET, service, *rev)
                    .await
                    .map(|()| 0),
                (None, None) => Ok(0),
            };
            match written {
                Ok(rev) => return Ok((current.map(|(d, _)| d), next, rev)),
                Err(StoreError::RevisionMismatch { .. } | StoreError::AlreadyExists { .. }) => {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(SupervisorError::Conflict(format!(
            "the desired state of {service} kept changing; try again"
        )))
    }
}

fn versions_of(d: Option<&Deployment>) -> String {
    d.map(|d| {
        d.versions
            .iter()
            .map(|v| v.version.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    })
    .unwrap_or_default()
}

/// The spec's deployment `next` (one spec version) merged onto what is stored: versions deployed
/// through the API stay; the spec's version keeps the replica count set through the API while
/// the spec's own count for it is unchanged.
fn merge_spec(current: &Deployment, next: &mut Deployment) {
    for v in &mut next.versions {
        let earlier = current
            .versions
            .iter()
            .find(|c| c.source == VersionSource::Spec);
        if let Some(c) = earlier {
            if c.spec_replicas == v.spec_replicas {
                v.replicas = c.replicas;
            }
        }
    }
    for c in &current.versions {
        if c.source == VersionSource::Api && next.version(&c.version).is_none() {
            next.versions.push(c.clone());
        }
    }
    next.config_version = current.config_version;
}
