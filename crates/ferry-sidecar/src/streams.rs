//! The domain event store: an aggregate's events form a stream, appended with an expected
//! version (optimistic concurrency) and read back from any version. The version check runs
//! inside the partition's state machine, atomically with the append, so two writers with the
//! same expected version cannot both succeed.
//!
//! Stream `<category>-<id>` lives in topic `<topic_prefix><category>` (created on first use),
//! in the partition its name hashes to; the events carry the stream as their key. A
//! projection reads a category's topic partition by partition from any offset, so it can
//! replay from the start.

use bytes::Bytes;
use ferry_proto::{Event, EventClass, Subject};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::config::EventStoreConfig;

/// Why a stream request is refused (HTTP 400 with the message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The stream name is not valid.
    #[error("stream {0:?}: names are 1-128 characters of [A-Za-z0-9_.:-], category (before the first '-') of [A-Za-z0-9_.]")]
    BadName(String),
    /// The body is not the expected JSON.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// An event lacks a required field.
    #[error("event {index}: {field} is missing or empty")]
    MissingField {
        /// Index in `events`.
        index: usize,
        /// The field.
        field: &'static str,
    },
}

/// The topic and category of a stream.
pub fn locate(config: &EventStoreConfig, stream: &str) -> Result<(String, String), StreamError> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-');
    if stream.is_empty() || stream.len() > 128 || !stream.chars().all(ok_char) {
        return Err(StreamError::BadName(stream.into()));
    }
    let category = stream.split('-').next().unwrap_or(stream);
    category_topic(config, category)
        .map(|topic| (topic, category.to_string()))
        .ok_or_else(|| StreamError::BadName(stream.into()))
}

/// The topic holding a category's streams, if the category name is valid.
pub fn category_topic(config: &EventStoreConfig, category: &str) -> Option<String> {
    let ok = !category.is_empty()
        && !category.starts_with('.')
        && !category.ends_with('.')
        && !category.contains("..")
        && category
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.'));
    ok.then(|| format!("{}{category}", config.topic_prefix))
}

/// An append request: `{"expectedVersion": 3, "events": [{"type": "...", "data": ...}]}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AppendRequest {
    /// The version the stream must be at (0: must not exist); absent: any.
    #[serde(default)]
    pub expected_version: Option<u64>,
    /// The events, in order.
    pub events: Vec<NewEvent>,
}

/// One event to append.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewEvent {
    /// Its id (a new one if absent).
    #[serde(default)]
    pub id: Option<String>,
    /// Its type, e.g. `OrderPlaced`.
    #[serde(rename = "type", default)]
    pub ty: String,
    /// Its source (the app id if absent).
    #[serde(default)]
    pub source: Option<String>,
    /// Content type of `data` (`application/json` by default).
    #[serde(default)]
    pub datacontenttype: Option<String>,
    /// The payload: any JSON (a string is stored as text when the content type is not JSON).
    #[serde(default)]
    pub data: Value,
}

/// Parses an append body into events for `stream`, stamped with `app_id`, `tenant`, `now`.
pub fn events_of(
    body: &[u8],
    stream: &str,
    app_id: &str,
    tenant: Option<&str>,
    now_ms: u64,
    max_events: usize,
) -> Result<(Option<u64>, Vec<Event>), StreamError> {
    let request: AppendRequest =
        serde_json::from_slice(body).map_err(|e| StreamError::Malformed(e.to_string()))?;
    if request.events.is_empty() {
        return Err(StreamError::Malformed("events is empty".into()));
    }
    if request.events.len() > max_events {
        return Err(StreamError::Malformed(format!(
            "{} events; at most {max_events} per append",
            request.events.len()
        )));
    }
    let subject = Subject::new(stream).map_err(|_| StreamError::BadName(stream.into()))?;
    let mut events = Vec::with_capacity(request.events.len());
    for (index, new) in request.events.into_iter().enumerate() {
        if new.ty.is_empty() {
            return Err(StreamError::MissingField {
                index,
                field: "type",
            });
        }
        let content_type = new
            .datacontenttype
            .unwrap_or_else(|| "application/json".into());
        let data = match (&new.data, crate::cloudevent::is_json(&content_type)) {
            (Value::String(text), false) => Bytes::from(text.clone()),
            (Value::Null, _) => Bytes::new(),
            (value, _) => Bytes::from(value.to_string()),
        };
        let mut event = Event::new(
            new.id
                .filter(|i| !i.is_empty())
                .unwrap_or_else(crate::new_event_id),
            new.source
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| app_id.to_string()),
            new.ty,
            subject.clone(),
            data,
        );
        event.time = Some(crate::cloudevent::rfc3339(now_ms));
        event.datacontenttype = Some(content_type);
        event.class = EventClass::Domain;
        event.tenant = tenant.map(str::to_string);
        event.key = Some(Bytes::copy_from_slice(stream.as_bytes()));
        events.push(event);
    }
    Ok((request.expected_version, events))
}

/// An event as the stream and category reads show it.
pub fn event_json(event: &Event) -> Value {
    let content_type = event
        .datacontenttype
        .as_deref()
        .unwrap_or("application/json");
    let data = if event.data.is_empty() {
        Value::Null
    } else if crate::cloudevent::is_json(content_type) {
        serde_json::from_slice(&event.data)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&event.data).into()))
    } else {
        Value::String(String::from_utf8_lossy(&event.data).into())
    };
    json!({
        "id": event.id,
        "type": event.ty,
        "source": event.source,
        "time": event.time,
        "datacontenttype": content_type,
        "stream": event.key.as_ref().map(|k| String::from_utf8_lossy(k).into_owned()),
        "data": data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_map_to_category_topics() {
        let config = EventStoreConfig::default();
        assert_eq!(
            locate(&config, "order-42").unwrap(),
            ("streams.order".to_string(), "order".to_string())
        );
        assert_eq!(locate(&config, "cart").unwrap().1, "cart");
        assert!(locate(&config, "").is_err());
        assert!(locate(&config, "has space").is_err());
        assert!(
            locate(&config, "a:b-1").is_err(),
            "':' is not valid in a category"
        );
        assert!(locate(&config, "-1").is_err());
    }

    #[test]
    fn append_bodies_become_keyed_domain_events() {
        let body = br#"{"expectedVersion": 0, "events": [
            {"type": "OrderPlaced", "data": {"total": 5}},
            {"type": "Note", "data": "hi", "datacontenttype": "text/plain", "id": "n1"}]}"#;
        let (expected, events) = events_of(body, "order-1", "shop", None, 0, 10).unwrap();
        assert_eq!(expected, Some(0));
        assert_eq!(events[0].key.as_deref(), Some(&b"order-1"[..]));
        assert_eq!(&events[0].data[..], br#"{"total":5}"#);
        assert_eq!(&events[1].data[..], b"hi");
        assert_eq!(events[1].id, "n1");
        assert_eq!(event_json(&events[0])["data"]["total"], json!(5));

        let missing = br#"{"events": [{"data": 1}]}"#;
        assert_eq!(
            events_of(missing, "order-1", "shop", None, 0, 10).unwrap_err(),
            StreamError::MissingField {
                index: 0,
                field: "type"
            }
        );
        assert!(events_of(b"{", "order-1", "shop", None, 0, 10).is_err());
        assert!(events_of(br#"{"events": []}"#, "order-1", "shop", None, 0, 10).is_err());
        let many = br#"{"events": [{"type": "a"}, {"type": "b"}]}"#;
        assert!(events_of(many, "order-1", "shop", None, 0, 1).is_err());
    }
}
