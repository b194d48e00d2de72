//! The key/value schema a [`NodeRecord`] is gossiped as, as pure functions.
//!
//! | key        | value                                            | example                 |
//! |------------|--------------------------------------------------|-------------------------|
//! | (node id)  | the chitchat node id, decimal                    | `17`                    |
//! | `region`   | region name, 1-64 of `[A-Za-z0-9_-]`             | `eu-west`               |
//! | `addr`     | socket address                                   | `10.0.0.7:7000`         |
//! | `role`     | 1-32 of `[A-Za-z0-9_-]`                          | `node`                  |
//! | `leads`    | `topic/partition`, comma-separated, may be empty | `orders/0,orders/3`     |
//! | `interest` | subject filters, one space between, may be empty | `orders.> payments.*`   |
//! | `reach`    | region names, comma-separated, may be empty      | `us-east,ap-south`      |
//! | `load`     | u64, decimal                                     | `1200`                  |
//! | `iversion` | u64, the version of `interest`                   | `42`                    |
//! | `ias_of`   | u64, ms since the epoch the node vouches for `interest` as current at; 0: it does not | `1764950000123` |
//! | `isince`   | u64, ms since the epoch the oldest of `interest` was added (0: unknown) | `1764950000000` |
//! | `seen`     | `region:version`, comma-separated, may be empty  | `us-east:12,ap:3`       |
//!
//! Decoding is strict: a missing key or a value that does not parse makes the whole record
//! invalid (the caller ignores that node). [`validate`] checks a record before it is published
//! by encoding and decoding it, so a node never gossips a record its peers would reject.

use std::net::SocketAddr;

use ferry_proto::SubjectFilter;

use super::NodeRecord;

/// Key of the region name.
pub(super) const KEY_REGION: &str = "region";
/// Key of the node's RPC address.
pub(super) const KEY_ADDR: &str = "addr";
/// Key of the node's role.
pub(super) const KEY_ROLE: &str = "role";
/// Key of the partitions the node leads.
pub(super) const KEY_LEADS: &str = "leads";
/// Key of the region's interest patterns.
pub(super) const KEY_INTEREST: &str = "interest";
/// Key of the regions the node reaches directly.
pub(super) const KEY_REACH: &str = "reach";
/// Key of the node's load.
pub(super) const KEY_LOAD: &str = "load";
/// Key of the interest's version.
pub(super) const KEY_INTEREST_VERSION: &str = "iversion";
/// Key of the time the node vouches for the interest as current at.
pub(super) const KEY_INTEREST_AS_OF: &str = "ias_of";
/// Key of when the oldest interest was added.
pub(super) const KEY_INTEREST_SINCE: &str = "isince";
/// Key of the interest versions the node holds for other regions.
pub(super) const KEY_SEEN: &str = "seen";

/// Why a record does not decode (or would not, once published).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum RecordError {
    /// A key of the schema is absent.
    #[error("key {0:?} is missing")]
    Missing(&'static str),
    /// A value does not parse.
    #[error("{key} = {value:?}: {reason}")]
    Invalid {
        /// The key (`"id"` for the node id).
        key: &'static str,
        /// The offending value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The record holds something its text form cannot carry (it would not read back equal).
    #[error("does not survive encoding: {0}")]
    NotRepresentable(String),
}

fn invalid(key: &'static str, value: &str, reason: impl Into<String>) -> RecordError {
    RecordError::Invalid {
        key,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// The key/value pairs `record` is gossiped as (the id travels as the chitchat node id).
pub(super) fn encode(record: &NodeRecord) -> [(&'static str, String); 11] {
    let leads = record
        .leads
        .iter()
        .map(|(topic, partition)| format!("{topic}/{partition}"))
        .collect::<Vec<_>>()
        .join(",");
    [
        (KEY_REGION, record.region.clone()),
        (KEY_ADDR, record.addr.to_string()),
        (KEY_ROLE, record.role.clone()),
        (KEY_LEADS, leads),
        (KEY_INTEREST, record.interest.join(" ")),
        (KEY_REACH, record.reach.join(",")),
        (KEY_LOAD, record.load.to_string()),
        (KEY_INTEREST_VERSION, record.interest_version.to_string()),
        (KEY_INTEREST_AS_OF, record.interest_as_of_ms.to_string()),
        (KEY_INTEREST_SINCE, record.interest_since_ms.to_string()),
        (
            KEY_SEEN,
            record
                .seen
                .iter()
                .map(|(region, version)| format!("{region}:{version}"))
                .collect::<Vec<_>>()
                .join(","),
        ),
    ]
}

/// Reads a record back from its node id and a key lookup.
pub(super) fn decode<'a>(
    node_id: &str,
    get: impl Fn(&str) -> Option<&'a str>,
) -> Result<NodeRecord, RecordError> {
    let value = |key: &'static str| get(key).ok_or(RecordError::Missing(key));
    let id = node_id
        .parse::<u64>()
        .map_err(|e| invalid("id", node_id, e.to_string()))?;
    let region = value(KEY_REGION)?;
    check_region(KEY_REGION, region)?;
    let addr_text = value(KEY_ADDR)?;
    let addr = addr_text
        .parse::<SocketAddr>()
        .map_err(|e| invalid(KEY_ADDR, addr_text, e.to_string()))?;
    let role = value(KEY_ROLE)?;
    check_word(KEY_ROLE, role, 32)?;
    let leads = decode_leads(value(KEY_LEADS)?)?;
    let interest = decode_interest(value(KEY_INTEREST)?)?;
    let reach = list(value(KEY_REACH)?, ',')
        .map(|region| check_region(KEY_REACH, region).map(|()| region.to_string()))
        .collect::<Result<Vec<_>, _>>()?;
    let number = |key: &'static str| {
        value(key).and_then(|text| {
            text.parse::<u64>()
                .map_err(|e| invalid(key, text, e.to_string()))
        })
    };
    let load = number(KEY_LOAD)?;
    let interest_version = number(KEY_INTEREST_VERSION)?;
    let interest_as_of_ms = number(KEY_INTEREST_AS_OF)?;
    let interest_since_ms = number(KEY_INTEREST_SINCE)?;
    let seen_text = value(KEY_SEEN)?;
    let seen = list(seen_text, ',')
        .map(|item| {
            let (region, version) = item.rsplit_once(':').ok_or_else(|| {
                invalid(
                    KEY_SEEN,
                    seen_text,
                    format!("{item:?} is not region:version"),
                )
            })?;
            check_region(KEY_SEEN, region)?;
            let version = version
                .parse::<u64>()
                .map_err(|e| invalid(KEY_SEEN, seen_text, format!("{item:?}: {e}")))?;
            Ok((region.to_string(), version))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NodeRecord {
        id,
        region: region.to_string(),
        addr,
        role: role.to_string(),
        leads,
        interest,
        reach,
        load,
        interest_version,
        interest_as_of_ms,
        interest_since_ms,
        seen,
    })
}

/// Checks that `record` reads back exactly as it is (so peers will accept it).
pub(super) fn validate(record: &NodeRecord) -> Result<(), RecordError> {
    let pairs = encode(record);
    let decoded = decode(&record.id.to_string(), |key| {
        pairs
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_str())
    })?;
    if decoded != *record {
        return Err(RecordError::NotRepresentable(format!(
            "{record:?} reads back as {decoded:?}"
        )));
    }
    Ok(())
}

/// The items of a `separator`-joined list; the empty string is the empty list.
fn list(text: &str, separator: char) -> impl Iterator<Item = &str> {
    let items = if text.is_empty() {
        None
    } else {
        Some(text.split(separator))
    };
    items.into_iter().flatten()
}

fn decode_leads(text: &str) -> Result<Vec<(String, u32)>, RecordError> {
    list(text, ',')
        .map(|item| {
            let (topic, partition) = item.rsplit_once('/').ok_or_else(|| {
                invalid(KEY_LEADS, text, format!("{item:?} is not topic/partition"))
            })?;
            check_topic(topic).map_err(|reason| invalid(KEY_LEADS, text, reason))?;
            let partition = partition
                .parse::<u32>()
                .map_err(|e| invalid(KEY_LEADS, text, format!("partition {partition:?}: {e}")))?;
            Ok((topic.to_string(), partition))
        })
        .collect()
}

fn decode_interest(text: &str) -> Result<Vec<String>, RecordError> {
    list(text, ' ')
        .map(|pattern| {
            SubjectFilter::new(pattern)
                .map(|filter| filter.as_str().to_string())
                .map_err(|e| invalid(KEY_INTEREST, text, e.to_string()))
        })
        .collect()
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
fn check_region(key: &'static str, region: &str) -> Result<(), RecordError> {
    check_word(key, region, 64)
}

fn check_word(key: &'static str, word: &str, max: usize) -> Result<(), RecordError> {
    let ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-');
    if word.is_empty() || word.len() > max || !word.chars().all(ok) {
        return Err(invalid(
            key,
            word,
            format!("must be 1-{max} of [A-Za-z0-9_-]"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn sample() -> NodeRecord {
        NodeRecord {
            id: 17,
            region: "eu-west".into(),
            addr: "10.0.0.7:7000".parse().expect("addr"),
            role: "node".into(),
            leads: vec![("orders".into(), 0), ("orders.v2".into(), 3)],
            interest: vec!["orders.>".into(), "payments.*.done".into()],
            reach: vec!["us-east".into(), "ap_south".into()],
            load: 1200,
            interest_version: 42,
            interest_as_of_ms: 1_764_950_000_123,
            interest_since_ms: 1_764_950_000_000,
            seen: vec![("us-east".into(), 12), ("ap_south".into(), 0)],
        }
    }

    fn as_map(record: &NodeRecord) -> HashMap<&'static str, String> {
        encode(record).into_iter().collect()
    }

    fn decode_map(
        node_id: &str,
        map: &HashMap<&'static str, String>,
    ) -> Result<NodeRecord, RecordError> {
        decode(node_id, |key| map.get(key).map(String::as_str))
    }

    #[test]
    fn encodes_to_the_documented_schema() {
        let map = as_map(&sample());
        assert_eq!(map[KEY_REGION], "eu-west");
        assert_eq!(map[KEY_ADDR], "10.0.0.7:7000");
        assert_eq!(map[KEY_ROLE], "node");
        assert_eq!(map[KEY_LEADS], "orders/0,orders.v2/3");
        assert_eq!(map[KEY_INTEREST], "orders.> payments.*.done");
        assert_eq!(map[KEY_REACH], "us-east,ap_south");
        assert_eq!(map[KEY_LOAD], "1200");
        assert_eq!(map[KEY_INTEREST_VERSION], "42");
        assert_eq!(map[KEY_INTEREST_AS_OF], "1764950000123");
        assert_eq!(map[KEY_INTEREST_SINCE], "1764950000000");
        assert_eq!(map[KEY_SEEN], "us-east:12,ap_south:0");
    }

    #[test]
    fn round_trips() {
        let record = sample();
        assert_eq!(decode_map("17", &as_map(&record)), Ok(record.clone()));
        assert_eq!(validate(&record), Ok(()));

        // Empty lists, IPv6 address.
        let bare = NodeRecord {
            addr: "[::1]:9".parse().expect("addr"),
            leads: vec![],
            interest: vec![],
            reach: vec![],
            load: 0,
            seen: vec![],
            ..record
        };
        let map = as_map(&bare);
        assert_eq!(map[KEY_LEADS], "");
        assert_eq!(decode_map("17", &map), Ok(bare.clone()));
        assert_eq!(validate(&bare), Ok(()));
    }

    #[test]
    fn malformed_values_are_rejected() {
        let good = as_map(&sample());
        let cases: &[(&'static str, &str)] = &[
            (KEY_REGION, ""),
            (KEY_REGION, "eu west"),
            (KEY_ADDR, "10.0.0.7"),
            (KEY_ROLE, ""),
            (KEY_LEADS, "orders"),
            (KEY_LEADS, "orders/x"),
            (KEY_LEADS, "orders/-1"),
            (KEY_LEADS, "/1"),
            (KEY_LEADS, "orders/1,"),
            (KEY_LEADS, "ord ers/1"),
            (KEY_INTEREST, "orders.>  payments.>"),
            (KEY_INTEREST, "orders.>.x"),
            (KEY_INTEREST, " orders.>"),
            (KEY_REACH, "us,,eu"),
            (KEY_REACH, "us,"),
            (KEY_LOAD, "-1"),
            (KEY_LOAD, "lots"),
            (KEY_LOAD, "18446744073709551616"),
            (KEY_INTEREST_VERSION, "v1"),
            (KEY_INTEREST_AS_OF, ""),
            (KEY_INTEREST_SINCE, "-5"),
            (KEY_SEEN, "us"),
            (KEY_SEEN, "us:x"),
            (KEY_SEEN, "u s:1"),
            (KEY_SEEN, "us:1,"),
        ];
        for (key, value) in cases {
            let mut map = good.clone();
            map.insert(key, value.to_string());
            match decode_map("17", &map) {
                Err(RecordError::Invalid { key: k, .. }) => {
                    assert_eq!(k, *key, "{key} = {value:?}")
                }
                other => panic!("{key} = {value:?} decoded as {other:?}"),
            }
        }
    }

    #[test]
    fn missing_keys_and_bad_ids_are_rejected() {
        let good = as_map(&sample());
        for key in good.keys() {
            let mut map = good.clone();
            map.remove(key);
            assert_eq!(decode_map("17", &map), Err(RecordError::Missing(key)));
        }
        for id in ["", "x", "-3", "1.5"] {
            assert!(
                matches!(
                    decode_map(id, &good),
                    Err(RecordError::Invalid { key: "id", .. })
                ),
                "{id:?}"
            );
        }
    }

    #[test]
    fn validate_refuses_what_would_not_read_back() {
        let bad: Vec<(&str, NodeRecord)> = vec![
            (
                "comma in region",
                NodeRecord {
                    region: "eu,us".into(),
                    ..sample()
                },
            ),
            (
                "slash in topic",
                NodeRecord {
                    leads: vec![("a/b".into(), 1)],
                    ..sample()
                },
            ),
            (
                "space in interest",
                NodeRecord {
                    interest: vec!["a b".into()],
                    ..sample()
                },
            ),
            (
                "empty interest",
                NodeRecord {
                    interest: vec!["".into()],
                    ..sample()
                },
            ),
            (
                "comma in reach",
                NodeRecord {
                    reach: vec!["us,eu".into()],
                    ..sample()
                },
            ),
            (
                "colon in a seen region",
                NodeRecord {
                    seen: vec![("us:1".into(), 2)],
                    ..sample()
                },
            ),
            (
                "empty role",
                NodeRecord {
                    role: "".into(),
                    ..sample()
                },
            ),
        ];
        for (what, record) in bad {
            assert!(validate(&record).is_err(), "{what}");
        }
    }
}
