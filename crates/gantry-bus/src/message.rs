//! Messages: CloudEvents 1.0 events, as they are published over HTTP (binary, structured and
//! batched structured modes), stored in the log and pushed to subscribers (binary mode).
//!
//! Every message on the bus is a CloudEvent. A plain HTTP body (no `ce-` headers, not
//! `application/cloudevents+json`) becomes one with the body as data, its `Content-Type` as
//! `datacontenttype`, `type` `gantry.message`, `source` `/topics/{topic}` and the id the publisher
//! gives in `Gantry-Message-Id` (or `Idempotency-Key`), else a generated one. The id is what the
//! topic's dedup window compares. The ordering key is the CloudEvents `partitionkey` extension
//! (or `Ordering-Key` on a plain body, `Gantry-Key` on the admin API); trace context is the `traceparent`/`tracestate`
//! extensions (taken from the publish request's headers when the event has none).

use std::collections::BTreeMap;

use base64::Engine;
use bytes::Bytes;
use http::HeaderMap;
use serde_json::{Map, Value};

/// One message (a CloudEvent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub id: String,
    pub source: String,
    /// The CloudEvents `type`.
    pub kind: String,
    pub subject: Option<String>,
    pub time: Option<String>,
    pub datacontenttype: Option<String>,
    pub dataschema: Option<String>,
    /// Extension attributes (`partitionkey`, `traceparent`, ...), by name.
    pub extensions: BTreeMap<String, String>,
    pub data: Bytes,
    /// The id was made by Gantry (the publisher gave none): not a dedup key.
    pub generated_id: bool,
}

/// Why a publish was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

const MAX_ATTRIBUTE: usize = 4096;

impl Message {
    /// The optional CloudEvents attributes by name.
    fn optional(&self) -> [(&'static str, &Option<String>); 4] {
        [
            ("subject", &self.subject),
            ("time", &self.time),
            ("datacontenttype", &self.datacontenttype),
            ("dataschema", &self.dataschema),
        ]
    }

    /// The ordering key (`partitionkey`).
    pub fn key(&self) -> Option<&str> {
        self.extensions.get("partitionkey").map(String::as_str)
    }

    /// A plain message with `data`, as a plain HTTP body makes it.
    pub fn plain(topic: &str, data: Bytes, content_type: Option<String>) -> Self {
        Self {
            id: new_id(),
            source: format!("/topics/{topic}"),
            kind: "gantry.message".into(),
            subject: None,
            time: None,
            datacontenttype: content_type,
            dataschema: None,
            extensions: BTreeMap::new(),
            data,
            generated_id: true,
        }
    }

    fn check(&self) -> Result<(), Invalid> {
        let req = |name: &str, v: &str| {
            if v.is_empty() {
                Err(Invalid(format!(
                    "CloudEvents attribute {name} must not be empty"
                )))
            } else if v.len() > MAX_ATTRIBUTE {
                Err(Invalid(format!(
                    "CloudEvents attribute {name} is longer than {MAX_ATTRIBUTE} bytes"
                )))
            } else {
                Ok(())
            }
        };
        req("id", &self.id)?;
        req("source", &self.source)?;
        req("type", &self.kind)?;
        if self.extensions.len() > 64 {
            return Err(Invalid(
                "at most 64 CloudEvents extension attributes".into(),
            ));
        }
        for (k, v) in &self.extensions {
            check_attribute_name(k)?;
            if v.len() > MAX_ATTRIBUTE {
                return Err(Invalid(format!(
                    "CloudEvents attribute {k} is longer than {MAX_ATTRIBUTE} bytes"
                )));
            }
        }
        for (name, v) in self.optional() {
            if let Some(v) = v {
                req(name, v)?;
            }
        }
        if let Some(t) = &self.time {
            if !looks_like_rfc3339(t) {
                return Err(Invalid(format!(
                    "CloudEvents attribute time {t:?} is not an RFC 3339 timestamp"
                )));
            }
        }
        Ok(())
    }

    /// Encode for the log: a JSON object of the attributes, then the data.
    pub fn encode(&self) -> Vec<u8> {
        let mut attrs = Map::new();
        attrs.insert("id".into(), self.id.clone().into());
        attrs.insert("source".into(), self.source.clone().into());
        attrs.insert("type".into(), self.kind.clone().into());
        for (k, v) in self.optional() {
            if let Some(v) = v {
                attrs.insert(k.into(), v.clone().into());
            }
        }
        if !self.extensions.is_empty() {
            attrs.insert(
                "ext".into(),
                Value::Object(
                    self.extensions
                        .iter()
                        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                        .collect(),
                ),
            );
        }
        if self.generated_id {
            attrs.insert("gen".into(), true.into());
        }
        let head = serde_json::to_vec(&Value::Object(attrs)).unwrap_or_default();
        let mut out = Vec::with_capacity(4 + head.len() + self.data.len());
        out.extend_from_slice(&(head.len() as u32).to_le_bytes());
        out.extend_from_slice(&head);
        out.extend_from_slice(&self.data);
        out
    }

    /// Decode what [`Message::encode`] wrote.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let n = u32::from_le_bytes(b.get(..4)?.try_into().ok()?) as usize;
        let head: Map<String, Value> = serde_json::from_slice(b.get(4..4 + n)?).ok()?;
        let s = |k: &str| head.get(k).and_then(Value::as_str).map(str::to_string);
        Some(Self {
            id: s("id")?,
            source: s("source")?,
            kind: s("type")?,
            subject: s("subject"),
            time: s("time"),
            datacontenttype: s("datacontenttype"),
            dataschema: s("dataschema"),
            extensions: head
                .get("ext")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                        .collect()
                })
                .unwrap_or_default(),
            data: Bytes::copy_from_slice(&b[4 + n..]),
            generated_id: head.get("gen").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// The message as a structured-mode JSON event (views, the pull API, dead-letter
    /// inspection): `data` as JSON when the content type is JSON and it parses, else
    /// `data_base64`.
    pub fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("specversion".into(), "1.0".into());
        m.insert("id".into(), self.id.clone().into());
        m.insert("source".into(), self.source.clone().into());
        m.insert("type".into(), self.kind.clone().into());
        for (k, v) in self.optional() {
            if let Some(v) = v {
                m.insert(k.into(), v.clone().into());
            }
        }
        for (k, v) in &self.extensions {
            m.insert(k.clone(), v.clone().into());
        }
        let json_data = self.datacontenttype.as_deref().is_none_or(is_json_type);
        match serde_json::from_slice::<Value>(&self.data) {
            Ok(v) if json_data && !self.data.is_empty() => {
                m.insert("data".into(), v);
            }
            _ if self.data.is_empty() => {}
            _ => {
                m.insert(
                    "data_base64".into(),
                    base64::engine::general_purpose::STANDARD
                        .encode(&self.data)
                        .into(),
                );
            }
        }
        Value::Object(m)
    }

    /// The headers of a binary-mode HTTP request carrying this message (`ce-*`,
    /// `content-type`, and `traceparent`/`tracestate` so the receiver continues the trace).
    pub fn binary_headers(&self) -> Vec<(String, String)> {
        let mut h = vec![
            ("ce-specversion".to_string(), "1.0".to_string()),
            ("ce-id".into(), self.id.clone()),
            ("ce-source".into(), self.source.clone()),
            ("ce-type".into(), self.kind.clone()),
        ];
        for (k, v) in [
            ("subject", &self.subject),
            ("time", &self.time),
            ("dataschema", &self.dataschema),
        ] {
            if let Some(v) = v {
                h.push((format!("ce-{k}"), v.clone()));
            }
        }
        for (k, v) in &self.extensions {
            if k == "gantryredrive" {
                continue;
            }
            h.push((format!("ce-{k}"), v.clone()));
            if k == "traceparent" || k == "tracestate" {
                h.push((k.clone(), v.clone()));
            }
        }
        if let Some(ct) = &self.datacontenttype {
            h.push(("content-type".into(), ct.clone()));
        }
        h
    }
}

fn looks_like_rfc3339(t: &str) -> bool {
    // 2026-12-06T03:00:00Z, with a fraction or an offset: the shape RFC 3339 gives it.
    let b = t.as_bytes();
    b.len() >= 20
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b'T' || b[10] == b't')
        && b[13] == b':'
        && b[16] == b':'
        && b[..4].iter().all(u8::is_ascii_digit)
}

fn media_is_json(media: &str) -> bool {
    !media.is_empty() && is_json_type(media)
}

fn is_json_type(ct: &str) -> bool {
    let ct = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    ct == "application/json" || ct.ends_with("+json") || ct == "text/json"
}

/// CloudEvents attribute names: 1-20 characters of `a-z` and `0-9`.
fn check_attribute_name(k: &str) -> Result<(), Invalid> {
    if k.is_empty()
        || k.len() > 20
        || !k
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        return Err(Invalid(format!(
            "CloudEvents attribute name {k:?}: expected 1-20 characters of a-z and 0-9"
        )));
    }
    Ok(())
}

/// A fresh message id (128 random bits, hex).
pub fn new_id() -> String {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, Invalid> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(Some)
            .map_err(|_| Invalid(format!("header {name} is not visible ASCII"))),
    }
}

/// The messages an HTTP publish carries: a structured event, a batch of them, a binary-mode
/// event or a plain body.
pub fn from_http(topic: &str, headers: &HeaderMap, body: Bytes) -> Result<Vec<Message>, Invalid> {
    let ct = header(headers, "content-type")?.map(str::to_string);
    let media = ct
        .as_deref()
        .map(|c| {
            c.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let mut out = if media == "application/cloudevents+json" {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| Invalid(format!("body is not a JSON CloudEvent: {e}")))?;
        vec![structured(v)?]
    } else if media == "application/cloudevents-batch+json" {
        let v: Value = serde_json::from_slice(&body)
            .map_err(|e| Invalid(format!("body is not a JSON array of CloudEvents: {e}")))?;
        let Value::Array(items) = v else {
            return Err(Invalid(
                "a CloudEvents batch must be a JSON array of events".into(),
            ));
        };
        if items.is_empty() {
            return Err(Invalid("the batch is empty".into()));
        }
        items
            .into_iter()
            .enumerate()
            .map(|(i, v)| structured(v).map_err(|e| Invalid(format!("event {i}: {}", e.0))))
            .collect::<Result<_, _>>()?
    } else if headers.contains_key("ce-specversion")
        || headers.contains_key("ce-id")
        || headers.contains_key("ce-type")
    {
        vec![binary(headers, ct, body)?]
    } else {
        if media_is_json(&media) && serde_json::from_slice::<Value>(&body).is_err() {
            return Err(Invalid(
                "the body is not valid JSON, as its Content-Type says it is".into(),
            ));
        }
        let mut m = Message::plain(topic, body, ct);
        if let Some(id) =
            header(headers, "gantry-message-id")?.or(header(headers, "idempotency-key")?)
        {
            m.id = id.to_string();
            m.generated_id = false;
        }
        if let Some(k) = header(headers, "ordering-key")?.or(header(headers, "gantry-key")?) {
            m.extensions.insert("partitionkey".into(), k.to_string());
        }
        vec![m]
    };
    // The publish request's trace context, for events that carry none of their own.
    let traceparent = header(headers, "traceparent")?;
    let tracestate = header(headers, "tracestate")?;
    for m in &mut out {
        if let Some(tp) = traceparent {
            if !m.extensions.contains_key("traceparent") {
                m.extensions.insert("traceparent".into(), tp.to_string());
                if let Some(ts) = tracestate {
                    m.extensions.insert("tracestate".into(), ts.to_string());
                }
            }
        }
        m.check()?;
        if let Some(k) = m.extensions.keys().find(|k| k.starts_with("gantry")) {
            return Err(Invalid(format!(
                "CloudEvents attribute {k}: names starting with gantry are reserved"
            )));
        }
    }
    Ok(out)
}

fn binary(headers: &HeaderMap, ct: Option<String>, body: Bytes) -> Result<Message, Invalid> {
    if ct.as_deref().is_some_and(is_json_type)
        && !body.is_empty()
        && serde_json::from_slice::<Value>(&body).is_err()
    {
        return Err(Invalid(
            "the body is not valid JSON, as its Content-Type says it is".into(),
        ));
    }
    let need = |name: &str| -> Result<String, Invalid> {
        header(headers, name)?
            .map(str::to_string)
            .ok_or_else(|| Invalid(format!("binary-mode CloudEvent without the {name} header")))
    };
    let version = need("ce-specversion")?;
    if version != "1.0" {
        return Err(Invalid(format!(
            "ce-specversion {version:?}: only CloudEvents 1.0 is accepted"
        )));
    }
    let mut m = Message {
        id: need("ce-id")?,
        source: need("ce-source")?,
        kind: need("ce-type")?,
        subject: header(headers, "ce-subject")?.map(str::to_string),
        time: header(headers, "ce-time")?.map(str::to_string),
        datacontenttype: ct,
        dataschema: header(headers, "ce-dataschema")?.map(str::to_string),
        extensions: BTreeMap::new(),
        data: body,
        generated_id: false,
    };
    for (name, v) in headers {
        let Some(attr) = name.as_str().strip_prefix("ce-") else {
            continue;
        };
        if matches!(
            attr,
            "specversion" | "id" | "source" | "type" | "subject" | "time" | "dataschema"
        ) {
            continue;
        }
        check_attribute_name(attr)?;
        let v = v
            .to_str()
            .map_err(|_| Invalid(format!("header {name} is not visible ASCII")))?;
        // HTTP binding: header values are percent-encoded where needed.
        m.extensions.insert(attr.to_string(), percent_decode(v));
    }
    Ok(m)
}

fn percent_decode(v: &str) -> String {
    if !v.contains('%') {
        return v.to_string();
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn structured(v: Value) -> Result<Message, Invalid> {
    let Value::Object(mut o) = v else {
        return Err(Invalid("a CloudEvent must be a JSON object".into()));
    };
    let mut take_str = |k: &str, required: bool| -> Result<Option<String>, Invalid> {
        match o.remove(k) {
            None | Some(Value::Null) if required => {
                Err(Invalid(format!("CloudEvent without the {k} attribute")))
            }
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(Invalid(format!(
                "CloudEvents attribute {k} must be a string"
            ))),
        }
    };
    let version = take_str("specversion", true)?.unwrap_or_default();
    if version != "1.0" {
        return Err(Invalid(format!(
            "specversion {version:?}: only CloudEvents 1.0 is accepted"
        )));
    }
    let id = take_str("id", true)?.unwrap_or_default();
    let source = take_str("source", true)?.unwrap_or_default();
    let kind = take_str("type", true)?.unwrap_or_default();
    let subject = take_str("subject", false)?;
    let time = take_str("time", false)?;
    let datacontenttype = take_str("datacontenttype", false)?;
    let dataschema = take_str("dataschema", false)?;
    let data_base64 = take_str("data_base64", false)?;
    let data = o.remove("data").filter(|v| !v.is_null());
    let data = match (data, data_base64) {
        (Some(_), Some(_)) => {
            return Err(Invalid(
                "a CloudEvent has either data or data_base64, not both".into(),
            ))
        }
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b.as_bytes())
            .map(Bytes::from)
            .map_err(|e| Invalid(format!("data_base64 is not base64: {e}")))?,
        (None, None) => Bytes::new(),
        // A string under a non-JSON content type is the data itself (text).
        (Some(Value::String(s)), None)
            if datacontenttype.as_deref().is_some_and(|c| !is_json_type(c)) =>
        {
            Bytes::from(s)
        }
        (Some(v), None) => Bytes::from(serde_json::to_vec(&v).unwrap_or_default()),
    };
    let mut extensions = BTreeMap::new();
    for (k, v) in o {
        check_attribute_name(&k)?;
        let v = match v {
            Value::String(s) => s,
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            Value::Null => continue,
            _ => {
                return Err(Invalid(format!(
                    "CloudEvents extension {k} must be a string, number or boolean"
                )))
            }
        };
        extensions.insert(k, v);
    }
    Ok(Message {
        id,
        source,
        kind,
        subject,
        time,
        datacontenttype: datacontenttype.or_else(|| Some("application/json".into())),
        dataschema,
        extensions,
        data,
        generated_id: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hm(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn a_plain_body_becomes_an_event() {
        let h = hm(&[
            ("content-type", "application/json"),
            ("gantry-message-id", "order-1"),
            ("gantry-key", "cust-7"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ]);
        let m = from_http("orders", &h, Bytes::from_static(b"{\"a\":1}")).unwrap();
        assert_eq!(m.len(), 1);
        let m = &m[0];
        assert_eq!((m.id.as_str(), m.generated_id), ("order-1", false));
        assert_eq!(m.key(), Some("cust-7"));
        assert_eq!(m.source, "/topics/orders");
        assert!(m.extensions["traceparent"].starts_with("00-4bf92f"));
        let back = Message::decode(&m.encode()).unwrap();
        assert_eq!(&back, m);
        // Without an id one is made, and marked so.
        let m = from_http("orders", &HeaderMap::new(), Bytes::from_static(b"x")).unwrap();
        assert!(m[0].generated_id && m[0].id.len() == 32);
    }

    #[test]
    fn binary_and_structured_modes() {
        let h = hm(&[
            ("ce-specversion", "1.0"),
            ("ce-id", "e1"),
            ("ce-source", "/orders"),
            ("ce-type", "order.created"),
            ("ce-partitionkey", "k%201"),
            ("content-type", "text/plain"),
        ]);
        let m = from_http("t", &h, Bytes::from_static(b"hi"))
            .unwrap()
            .remove(0);
        assert_eq!((m.id.as_str(), m.kind.as_str()), ("e1", "order.created"));
        assert_eq!(m.key(), Some("k 1"));
        assert_eq!(m.datacontenttype.as_deref(), Some("text/plain"));
        let hs = m.binary_headers();
        assert!(hs.contains(&("ce-partitionkey".into(), "k 1".into())));

        let s = serde_json::json!({
            "specversion": "1.0", "id": "e2", "source": "/s", "type": "t",
            "data": {"n": 1}, "comexampleext": 5
        });
        let h = hm(&[("content-type", "application/cloudevents+json")]);
        let m = from_http("t", &h, Bytes::from(s.to_string()))
            .unwrap()
            .remove(0);
        assert_eq!(&m.data[..], b"{\"n\":1}");
        assert_eq!(m.extensions["comexampleext"], "5");
        assert_eq!(m.to_json()["data"]["n"], 1);

        let batch = serde_json::json!([
            {"specversion": "1.0", "id": "b1", "source": "/s", "type": "t", "data_base64": "AAE="},
            {"specversion": "1.0", "id": "b2", "source": "/s", "type": "t"}
        ]);
        let h = hm(&[("content-type", "application/cloudevents-batch+json")]);
        let ms = from_http("t", &h, Bytes::from(batch.to_string())).unwrap();
        assert_eq!(ms.len(), 2);
        assert_eq!(&ms[0].data[..], &[0u8, 1]);
    }

    #[test]
    fn a_json_content_type_needs_a_json_body() {
        let h = hm(&[("content-type", "application/json")]);
        let e = from_http("t", &h, Bytes::from_static(b"FKwYc")).unwrap_err();
        assert!(e.0.contains("not valid JSON"), "{e}");
        let h = hm(&[("content-type", "text/plain")]);
        assert!(from_http("t", &h, Bytes::from_static(b"FKwYc")).is_ok());
    }

    #[test]
    fn invalid_events_are_named() {
        let h = hm(&[("content-type", "application/cloudevents+json")]);
        let cases = [
            (
                r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#,
                "1.0",
            ),
            (r#"{"specversion":"1.0","source":"/s","type":"t"}"#, "id"),
            (
                r#"{"specversion":"1.0","id":"","source":"/s","type":"t"}"#,
                "id",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":5}"#,
                "type",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","Bad":"x"}"#,
                "Bad",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1,"data_base64":"AA=="}"#,
                "both",
            ),
            (
                r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"yesterday"}"#,
                "RFC 3339",
            ),
            ("[1]", "JSON object"),
            ("nope", "JSON"),
        ];
        for (body, want) in cases {
            let e = from_http("t", &h, Bytes::from(body)).unwrap_err();
            assert!(e.0.contains(want), "{body}: {e}");
        }
        let h = hm(&[("ce-id", "1"), ("ce-source", "/s")]);
        let e = from_http("t", &h, Bytes::new()).unwrap_err();
        assert!(e.0.contains("ce-specversion"), "{e}");
        let h = hm(&[("content-type", "application/cloudevents-batch+json")]);
        assert!(from_http("t", &h, Bytes::from("[]"))
            .unwrap_err()
            .0
            .contains("empty"));
    }
}
