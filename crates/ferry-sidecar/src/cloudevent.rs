//! From a Dapr publish request (`POST /v1.0/publish/{pubsub}/{topic}`) to the CloudEvent that
//! is stored, following Dapr's rules:
//!
//! - `Content-Type: application/cloudevents+json`: the body is a structured CloudEvent and is
//!   passed through; `id`, `source`, `type` and `specversion` ("1.0") are required.
//! - `ce-*` headers (binary mode): the attributes come from the headers, the body is the data;
//!   `ce-id`, `ce-source`, `ce-type` and `ce-specversion` are required.
//! - otherwise the body is wrapped: a new `id`, `source` = the app id, `type`
//!   `com.dapr.event.sent`, `specversion` 1.0, `datacontenttype` = the Content-Type (default
//!   `text/plain`), and `topic`, `pubsubname`, `time`. Metadata `cloudevent.id`,
//!   `cloudevent.source`, `cloudevent.type` and `cloudevent.subject` override those.
//! - `metadata.rawPayload=true`: no envelope at all; the body is stored as it came.
//!
//! Data is JSON when the content type is JSON, a string for other text, and `data_base64`
//! otherwise. `metadata.partitionKey` becomes the partition key; `metadata.ttlInSeconds` an
//! `expiration` attribute. Errors name what was wrong; nothing is produced for them.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde_json::{Map, Value};

/// The CloudEvent type Dapr gives wrapped payloads.
pub const WRAPPED_TYPE: &str = "com.dapr.event.sent";
/// Content type of structured CloudEvents.
pub const STRUCTURED: &str = "application/cloudevents+json";

/// A publish request's parts that matter for the event.
#[derive(Debug, Clone, Default)]
pub struct PublishRequest<'a> {
    /// The pubsub component name from the path.
    pub pubsub: &'a str,
    /// The topic from the path.
    pub topic: &'a str,
    /// The `Content-Type` header.
    pub content_type: Option<&'a str>,
    /// `ce-*` headers, names lowercased without the prefix (`ce-id` → `id`).
    pub ce_headers: BTreeMap<String, String>,
    /// `metadata.*` query parameters, names without the prefix.
    pub metadata: BTreeMap<String, String>,
    /// The body.
    pub body: &'a [u8],
}

/// What to store for a publish.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// The bytes to store: a CloudEvent as JSON, or the raw body.
    pub payload: Bytes,
    /// Whether `payload` is the raw body (`rawPayload`).
    pub raw: bool,
    /// The CloudEvent (None for raw payloads).
    pub event: Option<Map<String, Value>>,
    /// The partition key (`metadata.partitionKey`).
    pub partition_key: Option<String>,
    /// Seconds to live (`metadata.ttlInSeconds`).
    pub ttl_secs: Option<u64>,
}

/// Why a publish request is refused (HTTP 400, with the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// The body is not valid JSON where JSON is required.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// A required CloudEvent attribute is missing or empty.
    #[error("CloudEvent attribute {0} is missing or empty")]
    MissingAttribute(&'static str),
    /// `specversion` is not 1.0.
    #[error("CloudEvent attribute specversion is {0:?}; only \"1.0\" is supported")]
    UnsupportedSpecVersion(String),
    /// A structured CloudEvent that is not a JSON object.
    #[error("a structured CloudEvent must be a JSON object")]
    NotAnObject,
    /// A metadata value is invalid.
    #[error("metadata.{key}: {reason}")]
    BadMetadata {
        /// The key, without `metadata.`.
        key: String,
        /// What is wrong.
        reason: String,
    },
}

/// The four attributes every CloudEvent must have.
const REQUIRED: [&str; 4] = ["id", "source", "type", "specversion"];

/// Whether a content type is JSON (`application/json`, `text/json`, `*+json`).
pub fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json" || essence.ends_with("+json") || essence == "text/json"
}

fn is_text(content_type: &str) -> bool {
    let essence = content_type.split(';').next().unwrap_or("").trim();
    essence.starts_with("text/") || essence == "application/xml" || essence.ends_with("+xml")
}

/// The event's data attribute(s) for a body of `content_type`.
fn put_data(
    event: &mut Map<String, Value>,
    content_type: &str,
    body: &[u8],
) -> Result<(), PublishError> {
    if body.is_empty() {
        return Ok(());
    }
    if is_json(content_type) {
        let data: Value =
            serde_json::from_slice(body).map_err(|e| PublishError::MalformedJson(e.to_string()))?;
        event.insert("data".into(), data);
    } else if let (true, Ok(text)) = (is_text(content_type), std::str::from_utf8(body)) {
        event.insert("data".into(), Value::String(text.to_string()));
    } else {
        event.insert("data_base64".into(), Value::String(base64(body)));
    }
    Ok(())
}

/// Standard base64 with padding (for `data_base64`).
fn base64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn check_required(event: &Map<String, Value>) -> Result<(), PublishError> {
    for name in REQUIRED {
        match event.get(name) {
            Some(Value::String(s)) if !s.is_empty() => {}
            _ => return Err(PublishError::MissingAttribute(name)),
        }
    }
    match event.get("specversion").and_then(Value::as_str) {
        Some("1.0") => Ok(()),
        other => Err(PublishError::UnsupportedSpecVersion(
            other.unwrap_or("").to_string(),
        )),
    }
}

/// RFC 3339 UTC time of a Unix time in milliseconds (`2026-11-28T23:59:59.123Z`).
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

/// Unix milliseconds of an RFC 3339 time (`2026-11-28T23:59:59.123Z`, or with an offset such
/// as `+02:00`); None if it is not one.
pub fn parse_rfc3339_ms(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    let num = |range: std::ops::Range<usize>| -> Option<i64> {
        std::str::from_utf8(b.get(range)?).ok()?.parse().ok()
    };
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    let mut rest = &text[19..];
    let mut millis = 0i64;
    if let Some(fraction) = rest.strip_prefix('.') {
        let digits = fraction.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let first3: String = fraction[..digits]
            .chars()
            .chain("000".chars())
            .take(3)
            .collect();
        millis = first3.parse().ok()?;
        rest = &fraction[digits..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6 && matches!(&rest[..1], "+" | "-") && &rest[3..4] == ":" => {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (rest[1..3].parse::<i64>().ok()? * 3600 + rest[4..6].parse::<i64>().ok()? * 60)
        }
        _ => return None,
    };
    // Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    u64::try_from(secs * 1000 + millis).ok()
}

fn metadata_flag(metadata: &BTreeMap<String, String>, key: &str) -> Result<bool, PublishError> {
    match metadata.get(key).map(|v| v.to_ascii_lowercase()) {
        None => Ok(false),
        Some(v) if v == "true" => Ok(true),
        Some(v) if v == "false" => Ok(false),
        Some(v) => Err(PublishError::BadMetadata {
            key: key.into(),
            reason: format!("{v:?} is not true or false"),
        }),
    }
}

/// Prepares what to store for a publish by app `app_id` at `now_ms`; `new_id` makes event ids.
pub fn prepare(
    request: &PublishRequest<'_>,
    app_id: &str,
    now_ms: u64,
    new_id: impl FnOnce() -> String,
) -> Result<Prepared, PublishError> {
    let metadata = &request.metadata;
    let ttl_secs = match metadata.get("ttlInSeconds") {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n > 0 => Some(n),
            _ => {
                return Err(PublishError::BadMetadata {
                    key: "ttlInSeconds".into(),
                    reason: format!("{v:?} is not a whole number of seconds above 0"),
                })
            }
        },
    };
    let partition_key = metadata.get("partitionKey").cloned();
    if partition_key.as_deref() == Some("") {
        return Err(PublishError::BadMetadata {
            key: "partitionKey".into(),
            reason: "empty".into(),
        });
    }
    if metadata_flag(metadata, "rawPayload")? {
        return Ok(Prepared {
            payload: Bytes::copy_from_slice(request.body),
            raw: true,
            event: None,
            partition_key,
            ttl_secs,
        });
    }
    let content_type = request.content_type.unwrap_or("text/plain");
    let structured = content_type
        .split(';')
        .next()
        .is_some_and(|e| e.trim().eq_ignore_ascii_case(STRUCTURED));
    let mut event = if structured {
        match serde_json::from_slice::<Value>(request.body) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(PublishError::NotAnObject),
            Err(e) => return Err(PublishError::MalformedJson(e.to_string())),
        }
    } else if !request.ce_headers.is_empty() {
        let mut map = Map::new();
        for (name, value) in &request.ce_headers {
            map.insert(name.clone(), Value::String(value.clone()));
        }
        map.insert("datacontenttype".into(), Value::String(content_type.into()));
        put_data(&mut map, content_type, request.body)?;
        map
    } else {
        let mut map = Map::new();
        map.insert("id".into(), Value::String(new_id()));
        map.insert("source".into(), Value::String(app_id.into()));
        map.insert("type".into(), Value::String(WRAPPED_TYPE.into()));
        map.insert("specversion".into(), Value::String("1.0".into()));
        map.insert("datacontenttype".into(), Value::String(content_type.into()));
        map.insert("time".into(), Value::String(rfc3339(now_ms)));
        for attribute in ["id", "source", "type", "subject"] {
            if let Some(v) = metadata.get(&format!("cloudevent.{attribute}")) {
                map.insert(attribute.into(), Value::String(v.clone()));
            }
        }
        put_data(&mut map, content_type, request.body)?;
        map
    };
    check_required(&event)?;
    event
        .entry("topic")
        .or_insert_with(|| Value::String(request.topic.into()));
    event
        .entry("pubsubname")
        .or_insert_with(|| Value::String(request.pubsub.into()));
    if let Some(ttl) = ttl_secs {
        event.insert(
            "expiration".into(),
            Value::String(rfc3339(now_ms + ttl * 1000)),
        );
    }
    let payload = Bytes::from(Value::Object(event.clone()).to_string());
    Ok(Prepared {
        payload,
        raw: false,
        event: Some(event),
        partition_key,
        ttl_secs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request<'a>(content_type: Option<&'a str>, body: &'a [u8]) -> PublishRequest<'a> {
        PublishRequest {
            pubsub: "pubsub",
            topic: "orders",
            content_type,
            body,
            ..PublishRequest::default()
        }
    }

    fn run(r: &PublishRequest<'_>) -> Result<Prepared, PublishError> {
        prepare(r, "checkout", 1_764_374_399_123, || "id-1".into())
    }

    #[test]
    fn a_plain_json_body_is_wrapped_like_dapr_does() {
        let p = run(&request(Some("application/json"), br#"{"order":7}"#)).unwrap();
        let e = p.event.unwrap();
        assert_eq!(e["id"], "id-1");
        assert_eq!(e["source"], "checkout");
        assert_eq!(e["type"], WRAPPED_TYPE);
        assert_eq!(e["specversion"], "1.0");
        assert_eq!(e["datacontenttype"], "application/json");
        assert_eq!(e["data"]["order"], 7);
        assert_eq!(e["topic"], "orders");
        assert_eq!(e["pubsubname"], "pubsub");
        assert_eq!(e["time"], "2025-11-28T23:59:59.123Z");
        let stored: Value = serde_json::from_slice(&p.payload).unwrap();
        assert_eq!(stored["data"]["order"], 7);
    }

    #[test]
    fn text_binary_and_default_content_types() {
        let text = run(&request(None, b"hello")).unwrap().event.unwrap();
        assert_eq!(text["datacontenttype"], "text/plain");
        assert_eq!(text["data"], "hello");
        let binary = run(&request(Some("application/octet-stream"), &[0, 1, 2, 250]))
            .unwrap()
            .event
            .unwrap();
        assert_eq!(binary["data_base64"], "AAEC+g==");
        assert!(binary.get("data").is_none());
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }

    #[test]
    fn structured_events_pass_through_and_must_be_complete() {
        let body = br#"{"specversion":"1.0","id":"a-1","source":"shop","type":"order.placed","data":{"n":1},"custom":"x"}"#;
        let e = run(&request(Some("application/cloudevents+json"), body))
            .unwrap()
            .event
            .unwrap();
        assert_eq!(e["id"], "a-1");
        assert_eq!(e["type"], "order.placed");
        assert_eq!(e["custom"], "x");
        assert_eq!(e["topic"], "orders");
        for missing in REQUIRED {
            let mut event: Map<String, Value> = serde_json::from_slice(body).unwrap();
            event.remove(missing);
            let text = Value::Object(event).to_string();
            let err = run(&request(Some(STRUCTURED), text.as_bytes())).unwrap_err();
            assert_eq!(err, PublishError::MissingAttribute(missing));
            assert!(err.to_string().contains(missing));
        }
        let old = br#"{"specversion":"0.3","id":"a","source":"s","type":"t"}"#;
        assert!(matches!(
            run(&request(Some(STRUCTURED), old)),
            Err(PublishError::UnsupportedSpecVersion(_))
        ));
        assert!(matches!(
            run(&request(Some(STRUCTURED), b"{not json")),
            Err(PublishError::MalformedJson(_))
        ));
        assert_eq!(
            run(&request(Some(STRUCTURED), b"[1]")),
            Err(PublishError::NotAnObject)
        );
        assert!(matches!(
            run(&request(Some("application/json"), b"{oops")),
            Err(PublishError::MalformedJson(_))
        ));
    }

    #[test]
    fn binary_mode_takes_attributes_from_ce_headers() {
        let mut r = request(Some("application/json"), br#"{"x":1}"#);
        for (k, v) in [
            ("id", "b-1"),
            ("source", "s"),
            ("type", "t"),
            ("specversion", "1.0"),
            ("subject", "sub"),
        ] {
            r.ce_headers.insert(k.into(), v.into());
        }
        let e = run(&r).unwrap().event.unwrap();
        assert_eq!(e["id"], "b-1");
        assert_eq!(e["subject"], "sub");
        assert_eq!(e["data"]["x"], 1);
        r.ce_headers.remove("source");
        assert_eq!(run(&r), Err(PublishError::MissingAttribute("source")));
    }

    #[test]
    fn metadata_raw_payload_partition_key_ttl_and_overrides() {
        let mut r = request(Some("application/json"), br#"{"x":1}"#);
        r.metadata.insert("rawPayload".into(), "true".into());
        r.metadata
            .insert("partitionKey".into(), "customer-9".into());
        let p = run(&r).unwrap();
        assert!(p.raw);
        assert_eq!(&p.payload[..], br#"{"x":1}"#);
        assert_eq!(p.partition_key.as_deref(), Some("customer-9"));
        r.metadata.clear();
        r.metadata.insert("ttlInSeconds".into(), "60".into());
        r.metadata
            .insert("cloudevent.type".into(), "order.paid".into());
        let p = run(&r).unwrap();
        let e = p.event.unwrap();
        assert_eq!(p.ttl_secs, Some(60));
        assert_eq!(e["expiration"], "2025-11-29T00:00:59.123Z");
        assert_eq!(e["type"], "order.paid");
        for (key, value) in [
            ("ttlInSeconds", "soon"),
            ("ttlInSeconds", "0"),
            ("rawPayload", "yes"),
            ("partitionKey", ""),
        ] {
            let mut bad = request(Some("application/json"), b"{}");
            bad.metadata.insert(key.into(), value.into());
            let err = run(&bad).unwrap_err();
            assert!(
                err.to_string().starts_with(&format!("metadata.{key}")),
                "{err}"
            );
        }
    }

    #[test]
    fn rfc3339_parses_back() {
        for ms in [0, 1_764_374_399_123, 951_782_400_000, 4_102_444_800_999] {
            assert_eq!(parse_rfc3339_ms(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(
            parse_rfc3339_ms("2026-11-29T02:00:00+02:00"),
            parse_rfc3339_ms("2026-11-29T00:00:00Z")
        );
        assert_eq!(parse_rfc3339_ms("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339_ms("yesterday"), None);
    }

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_709_251_199_999), "2024-02-29T23:59:59.999Z");
    }
}
