//! Export and import formats: JSON and TOML carry a whole set (every layer, secrets marked);
//! `.env` carries one layer's values as `KEY=VALUE` lines.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::model::{env_text, Document, LayerDoc};
use crate::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Toml,
    Env,
}

impl Format {
    pub fn parse(s: &str) -> Result<Format, ConfigError> {
        match s {
            "json" => Ok(Format::Json),
            "toml" => Ok(Format::Toml),
            "env" | "dotenv" | ".env" => Ok(Format::Env),
            other => Err(ConfigError::Invalid(format!(
                "format: expected json, toml or env, got {other:?}"
            ))),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Toml => "application/toml",
            Format::Env => "text/plain; charset=utf-8",
        }
    }
}

/// A whole set as JSON or TOML.
pub fn render(doc: &Document, format: Format) -> Result<String, ConfigError> {
    match format {
        Format::Json => serde_json::to_string_pretty(doc)
            .map(|s| s + "\n")
            .map_err(|e| ConfigError::Invalid(format!("cannot render JSON: {e}"))),
        Format::Toml => toml::to_string(doc)
            .map_err(|e| ConfigError::Invalid(format!("cannot render TOML: {e}"))),
        Format::Env => Err(ConfigError::Invalid(
            "a whole set is exported as json or toml; .env takes one layer".into(),
        )),
    }
}

/// One layer as `.env` lines: values, then secrets (revealed) and comments naming redacted ones.
pub fn render_env(layer: &LayerDoc) -> String {
    let mut out = String::new();
    for (k, v) in layer.values.iter().chain(&layer.secrets) {
        out.push_str(k);
        out.push('=');
        out.push_str(&quote_env(&env_text(v)));
        out.push('\n');
    }
    for k in &layer.redacted {
        out.push_str(&format!("# {k}: secret, redacted\n"));
    }
    out
}

fn quote_env(v: &str) -> String {
    let plain = !v.is_empty()
        && v.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"-_./:,@+%".contains(&c));
    if plain {
        return v.to_string();
    }
    let mut q = String::with_capacity(v.len() + 2);
    q.push('"');
    for c in v.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            '\n' => q.push_str("\\n"),
            '\r' => q.push_str("\\r"),
            '\t' => q.push_str("\\t"),
            '$' => q.push_str("\\$"),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// A whole set from JSON or TOML.
pub fn parse(text: &str, format: Format) -> Result<Document, ConfigError> {
    match format {
        Format::Json => {
            let de = &mut serde_json::Deserializer::from_str(text);
            serde_path_to_error::deserialize(de).map_err(|e| {
                ConfigError::Invalid(format!("JSON document: {}: {}", e.path(), e.inner()))
            })
        }
        Format::Toml => toml::from_str(text)
            .map_err(|e| ConfigError::Invalid(format!("TOML document: {}", e.message()))),
        Format::Env => parse_env(text).map(|values| Document {
            values: values
                .into_iter()
                .map(|(k, v)| (k, Value::String(v)))
                .collect(),
            redacted: redacted_env(text),
            ..Document::default()
        }),
    }
}

/// The secrets a `.env` export withheld: its `# KEY: secret, redacted` lines.
fn redacted_env(text: &str) -> std::collections::BTreeSet<String> {
    text.lines()
        .filter_map(|l| {
            l.trim()
                .strip_prefix("# ")?
                .strip_suffix(": secret, redacted")
        })
        .map(str::to_string)
        .collect()
}

/// `KEY=VALUE` lines (`export` allowed, `#` comments, values bare, "double-quoted" with
/// escapes, or 'single-quoted' as they are).
pub fn parse_env(text: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line).trim_start();
        let Some((k, v)) = line.split_once('=') else {
            return Err(ConfigError::Invalid(format!(
                ".env line {}: expected KEY=VALUE",
                n + 1
            )));
        };
        let k = k.trim();
        let v = v.trim();
        let value = if let Some(inner) = v.strip_prefix('"') {
            let Some(inner) = inner.strip_suffix('"') else {
                return Err(ConfigError::Invalid(format!(
                    ".env line {}: unterminated double quote",
                    n + 1
                )));
            };
            unescape(inner)
                .ok_or_else(|| ConfigError::Invalid(format!(".env line {}: bad escape", n + 1)))?
        } else if let Some(inner) = v.strip_prefix('\'') {
            inner
                .strip_suffix('\'')
                .ok_or_else(|| {
                    ConfigError::Invalid(format!(".env line {}: unterminated single quote", n + 1))
                })?
                .to_string()
        } else {
            // A bare value ends at an inline comment.
            v.split(" #").next().unwrap_or(v).trim_end().to_string()
        };
        if out.insert(k.to_string(), value).is_some() {
            return Err(ConfigError::Invalid(format!(
                ".env line {}: {k} given twice",
                n + 1
            )));
        }
    }
    Ok(out)
}

fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next()? {
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            c @ ('"' | '\\' | '$' | '\'') => c,
            _ => return None,
        });
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    #[test]
    fn env_lines_round_trip() {
        let mut layer = LayerDoc::default();
        layer.values.insert("A".into(), json!("plain"));
        layer
            .values
            .insert("B".into(), json!("two words \"q\" $HOME\nline"));
        layer.values.insert("C".into(), json!(42));
        layer.values.insert("D".into(), json!({"x": [1, true]}));
        layer.redacted.insert("S".into());
        let text = render_env(&layer);
        assert!(text.contains("# S: secret, redacted"));
        let back = parse_env(&text).unwrap();
        assert_eq!(back["A"], "plain");
        assert_eq!(back["B"], "two words \"q\" $HOME\nline");
        assert_eq!(back["C"], "42");
        assert_eq!(back["D"], r#"{"x":[1,true]}"#);
        assert!(!back.contains_key("S"));
        let more = parse_env("export X='a b'\n# c\nY=1 # note\n").unwrap();
        assert_eq!((more["X"].as_str(), more["Y"].as_str()), ("a b", "1"));
        for bad in ["NOEQUALS", "A=\"open", "A=1\nA=2", "A=\"\\q\""] {
            assert!(parse_env(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn documents_round_trip_through_json_and_toml() {
        let doc: Document = serde_json::from_value(json!({
            "values": {"A": "x", "N": 3, "F": 1.5, "B": true, "J": {"k": ["v"]}},
            "secrets": {"S": "hunter2"},
            "env": {"prod": {"values": {"A": "y"}, "redacted": ["T"]}},
            "instance": {"web-3": {"values": {"A": "z"}}}
        }))
        .unwrap();
        for f in [Format::Json, Format::Toml] {
            let text = render(&doc, f).unwrap();
            assert_eq!(parse(&text, f).unwrap(), doc, "{f:?}: {text}");
        }
        let err = parse(r#"{"values": {"A": 1}, "bogus": 2}"#, Format::Json).unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
        assert!(parse("values = 3", Format::Toml).is_err());
    }
}
