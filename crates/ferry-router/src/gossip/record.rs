//! How a [`NodeRecord`] travels, as pure functions: ferry-proto's binary codec, checked on
//! both sides by [`validate`] (names as the node config and ferry-proto accept them, subject
//! filters that parse), so a node never gossips a record its peers would reject, and a
//! record that does not pass makes only that record invisible.

use ferry_proto::SubjectFilter;

use super::NodeRecord;

/// Why a record is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum RecordError {
    /// A field holds something peers refuse.
    #[error("{field} = {value:?}: {reason}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(field: &'static str, value: &str, reason: impl Into<String>) -> RecordError {
    RecordError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Checks every field of `record`.
pub(super) fn validate(record: &NodeRecord) -> Result<(), RecordError> {
    check_region("region", &record.region)?;
    check_word("role", &record.role, 32)?;
    for led in record.leads.iter() {
        check_topic(&led.topic).map_err(|reason| invalid("leads", &led.topic, reason))?;
        if led.group >= led.groups {
            return Err(invalid(
                "leads",
                &format!("{}: group {} of {}", led.topic, led.group, led.groups),
                "a group is numbered below the topic's group count",
            ));
        }
    }
    if let Some(pair) = record.leads.windows(2).find(|pair| pair[0] >= pair[1]) {
        let name = |l: &crate::LedGroup| format!("{}: group {} of {}", l.topic, l.group, l.groups);
        return Err(invalid(
            "leads",
            &name(&pair[1]),
            format!(
                "not after {}: leads are sorted by (topic, groups, group), each once",
                name(&pair[0])
            ),
        ));
    }
    for pattern in &record.interest {
        match SubjectFilter::new(pattern.as_str()) {
            Ok(filter) if filter.as_str() == pattern => {}
            Ok(filter) => {
                return Err(invalid(
                    "interest",
                    pattern,
                    format!("not in its normal form {:?}", filter.as_str()),
                ))
            }
            Err(e) => return Err(invalid("interest", pattern, e.to_string())),
        }
    }
    for region in &record.reach {
        check_region("reach", region)?;
    }
    for (region, _) in &record.seen {
        check_region("seen", region)?;
    }
    Ok(())
}

/// Topic names as ferry-proto accepts them: 1-128 of `[A-Za-z0-9_.-]`.
fn check_topic(topic: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if topic.is_empty() || topic.len() > 128 || !topic.chars().all(ok) {
        return Err(format!("topic {topic:?} is not 1-128 of [A-Za-z0-9_.-]"));
    }
    Ok(())
}

/// Region names as the node config accepts them: 1-64 of `[A-Za-z0-9_-]`.
pub(super) fn check_region(field: &'static str, region: &str) -> Result<(), RecordError> {
    check_word(field, region, 64)
}

fn check_word(field: &'static str, word: &str, max: usize) -> Result<(), RecordError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-');
    if word.is_empty() || word.len() > max || !word.chars().all(ok) {
        return Err(invalid(
            field,
            word,
            format!("must be 1-{max} of [A-Za-z0-9_-]"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn led(topic: &str, groups: u32, group: u32) -> crate::LedGroup {
        crate::LedGroup {
            topic: topic.into(),
            groups,
            group,
        }
    }

    fn sample() -> NodeRecord {
        NodeRecord {
            id: 17,
            region: "eu-west".into(),
            addr: "10.0.0.7:7000".parse().expect("addr"),
            role: "node".into(),
            leads: vec![led("orders", 3, 0), led("orders.v2", 8, 3)].into(),
            interest: vec!["orders.>".into(), "payments.*.done".into()],
            reach: vec!["us-east".into(), "ap_south".into()],
            load: 1200,
            interest_version: 42,
            interest_as_of_ms: 1_764_950_000_123,
            interest_since_ms: 1_764_950_000_000,
            seen: vec![("us-east".into(), 12), ("ap_south".into(), 0)],
        }
    }

    #[test]
    fn leads_name_the_partitions_of_their_groups() {
        let leads = vec![
            led("a", 3, 0),
            led("a", 3, 2),
            led("a", 8, 5),
            led("b", 1, 0),
            led("c", 1000, 7),
        ];
        let holds = |topic, p| crate::leads_partition(&leads, topic, p);
        assert!(holds("a", 0) && holds("a", 3) && holds("a", 5) && holds("a", 8));
        assert!(holds("a", 13), "group 5 of 8");
        assert!(!holds("a", 1) && !holds("a", 4) && !holds("a", 7));
        assert!((0..100).all(|p| holds("b", p)));
        assert!(holds("c", 7) && !holds("c", 8) && !holds("c", 6));
        assert!(!holds("d", 0) && !holds("", 0));
    }

    #[test]
    fn round_trips_through_the_codec() {
        let record = sample();
        assert_eq!(validate(&record), Ok(()));
        let bytes = ferry_proto::codec::encode("record", &record).expect("encode");
        let back: NodeRecord = ferry_proto::codec::decode("record", &bytes).expect("decode");
        assert_eq!(back, record);
        let bare = NodeRecord {
            addr: "[::1]:9".parse().expect("addr"),
            leads: vec![].into(),
            interest: vec![],
            reach: vec![],
            seen: vec![],
            ..record
        };
        assert_eq!(validate(&bare), Ok(()));
    }

    #[test]
    fn refuses_what_peers_would_reject() {
        let bad: Vec<(&str, &str, NodeRecord)> = vec![
            (
                "region",
                "empty region",
                NodeRecord {
                    region: "".into(),
                    ..sample()
                },
            ),
            (
                "region",
                "space in region",
                NodeRecord {
                    region: "eu west".into(),
                    ..sample()
                },
            ),
            (
                "leads",
                "slash in topic",
                NodeRecord {
                    leads: vec![led("a/b", 3, 1)].into(),
                    ..sample()
                },
            ),
            (
                "leads",
                "leads out of order",
                NodeRecord {
                    leads: vec![led("b", 3, 0), led("a", 3, 1)].into(),
                    ..sample()
                },
            ),
            (
                "leads",
                "a group led twice",
                NodeRecord {
                    leads: vec![led("a", 3, 1), led("a", 3, 1)].into(),
                    ..sample()
                },
            ),
            (
                "leads",
                "a group past the count",
                NodeRecord {
                    leads: vec![led("a", 3, 3)].into(),
                    ..sample()
                },
            ),
            (
                "interest",
                "space in interest",
                NodeRecord {
                    interest: vec!["a b".into()],
                    ..sample()
                },
            ),
            (
                "interest",
                "empty interest",
                NodeRecord {
                    interest: vec!["".into()],
                    ..sample()
                },
            ),
            (
                "interest",
                "a token after >",
                NodeRecord {
                    interest: vec!["orders.>.x".into()],
                    ..sample()
                },
            ),
            (
                "reach",
                "comma in reach",
                NodeRecord {
                    reach: vec!["us,eu".into()],
                    ..sample()
                },
            ),
            (
                "seen",
                "colon in a seen region",
                NodeRecord {
                    seen: vec![("us:1".into(), 2)],
                    ..sample()
                },
            ),
            (
                "role",
                "empty role",
                NodeRecord {
                    role: "".into(),
                    ..sample()
                },
            ),
        ];
        for (field, what, record) in bad {
            match validate(&record) {
                Err(RecordError::Invalid { field: f, .. }) => assert_eq!(f, field, "{what}"),
                Ok(()) => panic!("{what}: accepted"),
            }
        }
    }
}
