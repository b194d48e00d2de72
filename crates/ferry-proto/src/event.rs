//! Events, the batches producers send, and the batches partitions store.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{codec, Limits, ProtoError, Subject};

/// The kind of an event; classes scale differently (see DESIGN.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum EventClass {
    /// A fact inside one service or aggregate.
    #[default]
    Domain,
    /// A fact other services react to, possibly in other regions.
    Integration,
    /// A message to people.
    Notification,
}

impl std::str::FromStr for EventClass {
    type Err = ProtoError;
    fn from_str(s: &str) -> Result<Self, ProtoError> {
        match s {
            "domain" => Ok(Self::Domain),
            "integration" => Ok(Self::Integration),
            "notification" => Ok(Self::Notification),
            other => Err(ProtoError::InvalidTopic {
                field: "class",
                reason: format!("{other:?} is not one of domain, integration, notification"),
            }),
        }
    }
}

/// An idempotent producer's identity; sequences are per (producer, partition).
pub type ProducerId = u64;

/// One event: CloudEvents 1.0 attributes plus Ferry's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// CloudEvents `id`: unique within `source`.
    pub id: String,
    /// CloudEvents `source` (a URI reference).
    pub source: String,
    /// CloudEvents `type`.
    pub ty: String,
    /// CloudEvents `specversion`; always "1.0" here.
    pub specversion: String,
    /// CloudEvents `subject`, used by Ferry as the routing subject.
    pub subject: Subject,
    /// CloudEvents `time` (RFC 3339), if the producer set it.
    pub time: Option<String>,
    /// CloudEvents `datacontenttype`.
    pub datacontenttype: Option<String>,
    /// The payload.
    #[serde(with = "codec::shared_bytes")]
    pub data: Bytes,
    /// Ferry: the event's class.
    pub class: EventClass,
    /// Ferry: the tenant it belongs to.
    pub tenant: Option<String>,
    /// Ferry: partition key; events with one key stay ordered.
    pub key: Option<Bytes>,
    /// Ferry: the region that first accepted it.
    pub origin_region: Option<String>,
}

impl Event {
    /// A minimal valid event.
    pub fn new(
        id: impl Into<String>,
        source: impl Into<String>,
        ty: impl Into<String>,
        subject: Subject,
        data: impl Into<Bytes>,
    ) -> Self {
        Self {
            id: id.into(),
            source: source.into(),
            ty: ty.into(),
            specversion: "1.0".into(),
            subject,
            time: None,
            datacontenttype: None,
            data: data.into(),
            class: EventClass::Domain,
            tenant: None,
            key: None,
            origin_region: None,
        }
    }

    /// Sets the partition key.
    pub fn with_key(mut self, key: impl Into<Bytes>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Bytes this event accounts for against [`Limits::max_event`]: payload plus attributes.
    pub fn size(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        self.id.len()
            + self.source.len()
            + self.ty.len()
            + self.specversion.len()
            + self.subject.as_str().len()
            + opt(&self.time)
            + opt(&self.datacontenttype)
            + self.data.len()
            + opt(&self.tenant)
            + self.key.as_ref().map_or(0, Bytes::len)
            + opt(&self.origin_region)
    }

    /// Checks required attributes and the size limit.
    pub fn validate(&self, limits: &Limits) -> Result<(), ProtoError> {
        if self.id.is_empty() {
            return Err(ProtoError::MissingAttribute("id"));
        }
        if self.source.is_empty() {
            return Err(ProtoError::MissingAttribute("source"));
        }
        if self.ty.is_empty() {
            return Err(ProtoError::MissingAttribute("type"));
        }
        if self.specversion != "1.0" {
            return Err(ProtoError::Malformed {
                what: "event",
                reason: format!("specversion {:?} is not \"1.0\"", self.specversion),
            });
        }
        let size = self.size();
        if size > limits.max_event {
            return Err(ProtoError::EventTooLarge {
                id: self.id.clone(),
                size,
                max: limits.max_event,
            });
        }
        Ok(())
    }
}

/// Partition of `key` in a topic of `partitions` partitions that was never split: FNV-1a 64
/// of the key ([`crate::key_hash`]), mod N. A topic that grew maps keys by its
/// [`crate::KeyLayout`].
pub fn partition_for_key(key: &[u8], partitions: u32) -> u32 {
    (crate::key_hash(key) % u64::from(partitions.max(1))) as u32
}

/// What a producer sends to one partition: events already encoded once by the client, so
/// the node stores and serves the same bytes without re-encoding them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventBatch {
    /// The idempotent producer, if any.
    pub producer: Option<ProducerId>,
    /// Sequence of the first event; the batch holds `first_seq..first_seq + count`.
    pub first_seq: u64,
    /// Number of events.
    pub count: u32,
    /// `codec::encode` of `Vec<Event>`.
    #[serde(with = "codec::shared_bytes")]
    pub events: Bytes,
}

impl EventBatch {
    /// Validates and encodes events into a batch.
    pub fn new(
        events: &[Event],
        producer: Option<ProducerId>,
        first_seq: u64,
        limits: &Limits,
    ) -> Result<Self, ProtoError> {
        for event in events {
            event.validate(limits)?;
        }
        let encoded = codec::encode("event batch", &events)?;
        Ok(Self {
            producer,
            first_seq,
            count: events.len() as u32,
            events: Bytes::from(encoded),
        })
    }

    /// Decodes and validates the events, checking the count matches.
    pub fn decode_events(&self, limits: &Limits) -> Result<Vec<Event>, ProtoError> {
        let events: Vec<Event> = codec::decode_shared("event batch", &self.events)?;
        if events.len() != self.count as usize {
            return Err(ProtoError::Malformed {
                what: "event batch",
                reason: format!(
                    "header says {} events, body holds {}",
                    self.count,
                    events.len()
                ),
            });
        }
        if events.is_empty() {
            return Err(ProtoError::Malformed {
                what: "event batch",
                reason: "no events".into(),
            });
        }
        for event in &events {
            event.validate(limits)?;
        }
        Ok(events)
    }
}

/// A batch as a partition stores and serves it: the producer's encoded events at offsets
/// `base_offset..base_offset + count`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBatch {
    /// Offset of the first event.
    pub base_offset: u64,
    /// Number of events.
    pub count: u32,
    /// When the leader appended it (milliseconds since the Unix epoch).
    pub appended_at_ms: u64,
    /// `codec::encode` of `Vec<Event>`.
    #[serde(with = "codec::shared_bytes")]
    pub events: Bytes,
}

impl StoredBatch {
    /// The events with their offsets.
    pub fn decode(&self) -> Result<Vec<(u64, Event)>, ProtoError> {
        let events: Vec<Event> = codec::decode("stored batch", &self.events)?;
        Ok(events
            .into_iter()
            .enumerate()
            .map(|(i, e)| (self.base_offset + i as u64, e))
            .collect())
    }

    /// Offset after the last event.
    pub fn end_offset(&self) -> u64 {
        self.base_offset + u64::from(self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(i: u32, size: usize) -> Event {
        Event::new(
            format!("e{i}"),
            "/test",
            "t",
            Subject::new("a.b").unwrap(),
            vec![7u8; size],
        )
    }

    #[test]
    fn batch_round_trip() {
        let events = vec![event(1, 10), event(2, 20)];
        let batch = EventBatch::new(&events, Some(9), 4, &Limits::default()).unwrap();
        assert_eq!(batch.decode_events(&Limits::default()).unwrap(), events);
    }

    #[test]
    fn oversized_event_is_refused_naming_it() {
        let limits = Limits {
            max_event: 100,
            ..Limits::default()
        };
        let err = EventBatch::new(&[event(3, 200)], None, 0, &limits).unwrap_err();
        assert!(matches!(err, ProtoError::EventTooLarge { ref id, max: 100, .. } if id == "e3"));
    }

    #[test]
    fn count_mismatch_is_malformed() {
        let mut batch = EventBatch::new(&[event(1, 1)], None, 0, &Limits::default()).unwrap();
        batch.count = 2;
        assert!(batch.decode_events(&Limits::default()).is_err());
    }

    #[test]
    fn partitioning_is_stable_and_in_range() {
        assert_eq!(
            partition_for_key(b"customer-1", 8),
            partition_for_key(b"customer-1", 8)
        );
        for i in 0..1000u32 {
            assert!(partition_for_key(&i.to_be_bytes(), 8) < 8);
        }
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c.
        assert_eq!(
            partition_for_key(b"a", 1 << 31),
            (0xaf63dc4c8601ec8c_u64 % (1 << 31)) as u32
        );
    }
}
