//! What the config store keeps and shows: layers, stored values, change records, heads, and the
//! document form (the API's view, export and import).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ConfigError;

/// The config set every service inherits from (its lowest layer).
pub const GLOBAL: &str = "_global";

/// Where in a set a key lives. Resolution for service S in environment E, instance I:
/// global base → global E → S base → S E → S I (later wins).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Layer {
    Base,
    Env(String),
    Instance(String),
}

impl Layer {
    /// Its name in stored records: "", `env:NAME`, `instance:ID`.
    pub fn key(&self) -> String {
        match self {
            Layer::Base => String::new(),
            Layer::Env(e) => format!("env:{e}"),
            Layer::Instance(i) => format!("instance:{i}"),
        }
    }

    pub fn from_key(k: &str) -> Option<Layer> {
        if k.is_empty() {
            return Some(Layer::Base);
        }
        match k.split_once(':')? {
            ("env", e) => Some(Layer::Env(e.into())),
            ("instance", i) => Some(Layer::Instance(i.into())),
            _ => None,
        }
    }

    /// From the API's optional `env` / `instance` (at most one).
    pub fn from_parts(env: Option<&str>, instance: Option<&str>) -> Result<Layer, ConfigError> {
        match (env, instance) {
            (None, None) => Ok(Layer::Base),
            (Some(e), None) => {
                check_env_name(e)?;
                Ok(Layer::Env(e.into()))
            }
            (None, Some(i)) => {
                check_instance_name(i)?;
                Ok(Layer::Instance(i.into()))
            }
            (Some(_), Some(_)) => Err(ConfigError::Invalid(
                "give env or instance, not both: a key lives in one layer".into(),
            )),
        }
    }

    pub fn env(&self) -> Option<&str> {
        match self {
            Layer::Env(e) => Some(e),
            _ => None,
        }
    }

    pub fn instance(&self) -> Option<&str> {
        match self {
            Layer::Instance(i) => Some(i),
            _ => None,
        }
    }
}

/// Environment names (`gantry up --env`): 1-32 of a-z, 0-9, '-', starting with a letter.
pub fn check_env_name(e: &str) -> Result<(), ConfigError> {
    if gantry_spec::valid_env_name(e) {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "invalid environment name {e:?}: expected 1-32 characters of a-z, 0-9 and '-' starting with a letter"
        )))
    }
}

fn check_instance_name(i: &str) -> Result<(), ConfigError> {
    let ok = !i.is_empty()
        && i.len() <= 128
        && i.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::Invalid(format!(
            "invalid instance id {i:?}: expected 1-128 characters of a-z, 0-9, '-' and '_'"
        )))
    }
}

/// A stored value: plain JSON, or a secret sealed under the secrets key (its plaintext is the
/// value's JSON text).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stored {
    Plain(Value),
    Secret(String),
}

impl Stored {
    pub fn is_secret(&self) -> bool {
        matches!(self, Stored::Secret(_))
    }

    /// Bytes it takes in the head (what the set size limit counts).
    pub(crate) fn size(&self) -> usize {
        match self {
            Stored::Plain(v) => serde_json::to_string(v).map_or(0, |s| s.len()),
            Stored::Secret(s) => s.len(),
        }
    }
}

/// Layer key → key → value.
pub type Entries = BTreeMap<String, BTreeMap<String, Stored>>;

/// One key a version changed, with the value before and after (`None`: absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub layer: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<Stored>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Stored>,
}

/// One version as kept in history: who, when, why and what changed (not the values of keys it
/// did not change, so history costs what changed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub set: String,
    pub version: u64,
    pub time_ms: u64,
    #[serde(default)]
    pub author: String,
    #[serde(default)]
    pub message: String,
    pub changes: Vec<Change>,
    /// This version restored the values of an earlier one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
    /// This version undid the changes of an earlier one (an automatic revert after a failed
    /// rollout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverts: Option<u64>,
}

pub(crate) const FORMAT: u32 = 2;

/// The current version of a set: its record and every current value. A commit is one
/// compare-and-set of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Head {
    pub format: u32,
    #[serde(flatten)]
    pub record: Record,
    /// The oldest version whose record history keeps.
    pub oldest: u64,
    pub entries: Entries,
}

/// The form the API shows a set in, exports and imports: per layer, plain values, secrets and
/// the names of secrets whose values were withheld.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LayerDoc {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = Object)]
    pub values: BTreeMap<String, Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = Object)]
    pub secrets: BTreeMap<String, Value>,
    /// Secrets present but not shown (ask with reveal and the `config:reveal` permission).
    /// On import these keys are kept as they are, even when replacing.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub redacted: BTreeSet<String>,
}

impl LayerDoc {
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.secrets.is_empty() && self.redacted.is_empty()
    }
}

/// A whole set: the base layer's fields, then environments and instances.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Document {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = Object)]
    pub values: BTreeMap<String, Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = Object)]
    pub secrets: BTreeMap<String, Value>,
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub redacted: BTreeSet<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, LayerDoc>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub instance: BTreeMap<String, LayerDoc>,
}

impl Document {
    /// Every layer with its part of the document.
    pub fn layers(&self) -> Vec<(Layer, LayerDoc)> {
        let mut out = vec![(
            Layer::Base,
            LayerDoc {
                values: self.values.clone(),
                secrets: self.secrets.clone(),
                redacted: self.redacted.clone(),
            },
        )];
        out.extend(
            self.env
                .iter()
                .map(|(e, d)| (Layer::Env(e.clone()), d.clone())),
        );
        out.extend(
            self.instance
                .iter()
                .map(|(i, d)| (Layer::Instance(i.clone()), d.clone())),
        );
        out
    }

    pub(crate) fn layer_mut(&mut self, layer: &Layer) -> LayerMut<'_> {
        match layer {
            Layer::Base => LayerMut {
                values: &mut self.values,
                secrets: &mut self.secrets,
                redacted: &mut self.redacted,
            },
            Layer::Env(e) => {
                let d = self.env.entry(e.clone()).or_default();
                LayerMut {
                    values: &mut d.values,
                    secrets: &mut d.secrets,
                    redacted: &mut d.redacted,
                }
            }
            Layer::Instance(i) => {
                let d = self.instance.entry(i.clone()).or_default();
                LayerMut {
                    values: &mut d.values,
                    secrets: &mut d.secrets,
                    redacted: &mut d.redacted,
                }
            }
        }
    }
}

pub(crate) struct LayerMut<'a> {
    pub values: &'a mut BTreeMap<String, Value>,
    pub secrets: &'a mut BTreeMap<String, Value>,
    pub redacted: &'a mut BTreeSet<String>,
}

/// A set's current version as the API shows it (secrets redacted unless revealed).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ConfigView {
    pub set: String,
    /// 0 when the set has no config yet.
    pub version: u64,
    pub time_ms: u64,
    pub author: String,
    pub message: String,
    #[serde(flatten)]
    pub document: Document,
}

/// One changed key as the API shows it (a secret's values only when revealed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ChangeView {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
    pub key: String,
    pub kind: ChangeKind,
    pub secret: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub before: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub after: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The key did not exist before.
    Added,
    /// The key's value changed.
    Changed,
    /// The key was removed.
    Removed,
}

/// One version in history as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionView {
    pub set: String,
    pub version: u64,
    pub time_ms: u64,
    pub author: String,
    pub message: String,
    pub changes: Vec<ChangeView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollback_of: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverts: Option<u64>,
}

/// Outcome of a change: the version now current, and whether this call created it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Committed {
    pub version: VersionView,
    pub created: bool,
}

/// A request to change keys of one layer of a set.
#[derive(Clone, Default, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeRequest {
    /// Keys to set to plain values (strings, numbers, booleans or JSON).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub set: BTreeMap<String, Value>,
    /// Keys to set to secret values: sealed at rest, redacted in every output.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub secrets: BTreeMap<String, Value>,
    #[serde(default)]
    pub unset: Vec<String>,
    /// The environment layer to change (`gantry up --env`); absent: the base layer.
    #[serde(default)]
    pub env: Option<String>,
    /// The instance layer to change (overrides for one instance, e.g. `web-3`).
    #[serde(default)]
    pub instance: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// A service's config as one instance sees it.
#[derive(Clone, Default, PartialEq)]
pub struct Resolved {
    pub service: String,
    /// The service set's version (0: none).
    pub version: u64,
    /// The global set's version (0: none).
    pub global_version: u64,
    pub values: BTreeMap<String, Value>,
    /// Which of `values` are secrets.
    pub secret_keys: BTreeSet<String>,
}

impl Resolved {
    /// Values as environment variables: strings as they are, everything else as JSON text.
    pub fn env(&self) -> BTreeMap<String, String> {
        self.values
            .iter()
            .map(|(k, v)| (k.clone(), env_text(v)))
            .collect()
    }

    /// The JSON document instances read from their config file and the stream: values with
    /// their types, secrets included (this is what the service is given).
    pub fn file_json(&self) -> Value {
        serde_json::json!({
            "service": self.service,
            "version": self.version,
            "global_version": self.global_version,
            "values": self.values,
        })
    }

    /// The same with secrets redacted (what is shown to people without `config:reveal`).
    pub fn redacted(&self) -> ResolvedView {
        ResolvedView {
            service: self.service.clone(),
            version: self.version,
            global_version: self.global_version,
            values: self
                .values
                .iter()
                .filter(|(k, _)| !self.secret_keys.contains(*k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            secrets: self.secret_keys.clone(),
        }
    }

    pub fn revealed(&self) -> ResolvedView {
        ResolvedView {
            values: self.values.clone(),
            ..self.redacted()
        }
    }
}

/// A service's resolved config as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ResolvedView {
    pub service: String,
    pub version: u64,
    pub global_version: u64,
    #[schema(value_type = Object)]
    pub values: BTreeMap<String, Value>,
    /// Names of the secrets among the values (their values are shown only when revealed).
    pub secrets: BTreeSet<String>,
}

/// A value as an environment variable.
pub fn env_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// Debug output never holds a secret's value: a `{:?}` in a log line must not leak one.

fn names<'a>(keys: impl Iterator<Item = &'a String>) -> Vec<&'a str> {
    keys.map(String::as_str).collect()
}

impl std::fmt::Debug for LayerDoc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerDoc")
            .field("values", &self.values)
            .field("secrets", &names(self.secrets.keys()))
            .field("redacted", &self.redacted)
            .finish()
    }
}

impl std::fmt::Debug for Document {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Document")
            .field("values", &self.values)
            .field("secrets", &names(self.secrets.keys()))
            .field("redacted", &self.redacted)
            .field("env", &self.env)
            .field("instance", &self.instance)
            .finish()
    }
}

impl std::fmt::Debug for ChangeRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeRequest")
            .field("set", &self.set)
            .field("secrets", &names(self.secrets.keys()))
            .field("unset", &self.unset)
            .field("env", &self.env)
            .field("instance", &self.instance)
            .field("message", &self.message)
            .finish()
    }
}

impl std::fmt::Debug for Resolved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let values: BTreeMap<&str, &dyn std::fmt::Debug> = self
            .values
            .iter()
            .map(|(k, v)| {
                let shown: &dyn std::fmt::Debug = if self.secret_keys.contains(k) {
                    &"<redacted>"
                } else {
                    v
                };
                (k.as_str(), shown)
            })
            .collect();
        f.debug_struct("Resolved")
            .field("service", &self.service)
            .field("version", &self.version)
            .field("global_version", &self.global_version)
            .field("values", &values)
            .finish()
    }
}
