//! Subjects (`orders.eu.created`) and filters with NATS wildcards: `*` matches one token,
//! `>` matches one or more trailing tokens.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ProtoError;

const MAX_SUBJECT_LEN: usize = 256;

fn check_tokens(text: &str, allow_wildcards: bool) -> Result<(), ProtoError> {
    let err = |reason| ProtoError::InvalidSubject {
        subject: text.to_string(),
        reason,
    };
    if text.is_empty() {
        return Err(err("empty"));
    }
    if text.len() > MAX_SUBJECT_LEN {
        return Err(err("longer than 256 bytes"));
    }
    let count = text.split('.').count();
    for (i, token) in text.split('.').enumerate() {
        if token.is_empty() {
            return Err(err("empty token (leading, trailing or double dot)"));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("whitespace or control character in a token"));
        }
        let wildcard = token == "*" || token == ">";
        if !wildcard && (token.contains('*') || token.contains('>')) {
            return Err(err("wildcard inside a token"));
        }
        if wildcard && !allow_wildcards {
            return Err(err("wildcards are only allowed in filters"));
        }
        if token == ">" && i + 1 != count {
            return Err(err("'>' must be the last token"));
        }
    }
    Ok(())
}

/// A concrete subject: dot-separated tokens, no wildcards.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Subject(String);

impl Subject {
    /// Parses and validates a subject.
    pub fn new(text: impl Into<String>) -> Result<Self, ProtoError> {
        let text = text.into();
        check_tokens(&text, false)?;
        Ok(Self(text))
    }

    /// The subject text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Subject {
    type Error = ProtoError;
    fn try_from(text: String) -> Result<Self, ProtoError> {
        Self::new(text)
    }
}

impl From<Subject> for String {
    fn from(s: Subject) -> String {
        s.0
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A subject filter: tokens, `*` for any one token, `>` for the rest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SubjectFilter(String);

impl SubjectFilter {
    /// Parses and validates a filter.
    pub fn new(text: impl Into<String>) -> Result<Self, ProtoError> {
        let text = text.into();
        check_tokens(&text, true)?;
        Ok(Self(text))
    }

    /// The filter that matches every subject.
    pub fn all() -> Self {
        Self(">".to_string())
    }

    /// The filter text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `subject` matches this filter.
    pub fn matches(&self, subject: &str) -> bool {
        let mut tokens = subject.split('.');
        for pattern in self.0.split('.') {
            match (pattern, tokens.next()) {
                (">", Some(_)) => return true,
                (_, None) => return false,
                ("*", Some(_)) => {}
                (p, Some(t)) if p == t => {}
                _ => return false,
            }
        }
        tokens.next().is_none()
    }
}

impl TryFrom<String> for SubjectFilter {
    type Error = ProtoError;
    fn try_from(text: String) -> Result<Self, ProtoError> {
        Self::new(text)
    }
}

impl From<SubjectFilter> for String {
    fn from(s: SubjectFilter) -> String {
        s.0
    }
}

impl fmt::Display for SubjectFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(filter: &str, subject: &str) -> bool {
        SubjectFilter::new(filter).unwrap().matches(subject)
    }

    #[test]
    fn wildcards_follow_nats() {
        assert!(m("orders.*.created", "orders.eu.created"));
        assert!(!m("orders.*.created", "orders.eu.x.created"));
        assert!(m("orders.>", "orders.eu"));
        assert!(m("orders.>", "orders.eu.created"));
        assert!(!m("orders.>", "orders"));
        assert!(m(">", "a"));
        assert!(m("a.b", "a.b"));
        assert!(!m("a.b", "a.b.c"));
        assert!(!m("a.b.c", "a.b"));
        assert!(!m("*", "a.b"));
    }

    #[test]
    fn bad_subjects_are_refused_with_reason() {
        for bad in ["", "a..b", ".a", "a.", "a.>.b", "a*.b", "a b"] {
            assert!(SubjectFilter::new(bad).is_err(), "{bad:?}");
        }
        assert!(Subject::new("a.*").is_err());
        assert!(Subject::new("a.>").is_err());
        assert!(Subject::new("orders.eu.created").is_ok());
        let err = Subject::new("a..b").unwrap_err().to_string();
        assert!(err.contains("a..b") && err.contains("empty token"), "{err}");
    }
}
