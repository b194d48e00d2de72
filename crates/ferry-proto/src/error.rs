//! The error type of this crate.

/// What was wrong with a value or a frame. Each variant names the offending part.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// A subject or subject filter is not well formed.
    #[error("invalid subject {subject:?}: {reason}")]
    InvalidSubject {
        /// The subject as given.
        subject: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A topic configuration is not valid.
    #[error("invalid topic configuration: {field}: {reason}")]
    InvalidTopic {
        /// The field that is wrong.
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// An event is larger than the configured limit.
    #[error("event {id:?} is {size} bytes, over the limit of {max} bytes")]
    EventTooLarge {
        /// The event's id.
        id: String,
        /// Its encoded size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// An event lacks a required attribute.
    #[error("event is missing required attribute {0:?}")]
    MissingAttribute(&'static str),
    /// A frame is larger than the configured limit.
    #[error("frame is {size} bytes, over the limit of {max} bytes")]
    FrameTooLarge {
        /// The frame's size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A frame carries a wire version this build does not speak.
    #[error("frame has wire version {found}, expected {expected}")]
    UnsupportedVersion {
        /// The version byte found.
        found: u8,
        /// The version this build speaks.
        expected: u8,
    },
    /// A frame or value could not be decoded.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being decoded.
        what: &'static str,
        /// The decoder's message.
        reason: String,
    },
    /// A value could not be encoded.
    #[error("cannot encode {what}: {reason}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The encoder's message.
        reason: String,
    },
    /// A domain stream name is not well formed.
    #[error("invalid stream name {stream:?}: {reason}")]
    InvalidStreamName {
        /// The name as given.
        stream: String,
        /// Why it was refused.
        reason: &'static str,
    },
}
