//! Loading a node's, an edge's or a sidecar's configuration: TOML from a file (or the embedded dev
//! default), then `FERRY_<SECTION>_<KEY>` / `FERRY_<KEY>` environment overrides, then the one
//! validation in the role's library. Errors name the file and the key.

use std::path::Path;

use anyhow::{bail, Context};
use ferry_region::NodeConfig;

/// The embedded default shared by the nodes of `ferry dev`.
pub const DEV_DEFAULT: &str = include_str!("../../../config/dev.toml");

/// Tables of the node configuration; an override `FERRY_RAFT_HEARTBEAT_MS` sets
/// `raft.heartbeat_ms`, one without a known table prefix sets a top-level key.
const NODE_SECTIONS: &[&str] = &["limits", "raft", "tls", "mesh", "tier"];
/// Tables of the edge configuration.
const EDGE_SECTIONS: &[&str] = &["limits", "tls", "auth", "window"];
/// Tables of the sidecar configuration.
const SIDECAR_SECTIONS: &[&str] = &["limits", "tls", "outbox", "delivery", "event_store"];
/// Environment variables that are not config overrides.
const NOT_OVERRIDES: &[&str] = &["FERRY_CONFIG", "FERRY_CERTS", "FERRY_SERVERS", "FERRY_LOG"];

/// Applies environment overrides to a parsed TOML table.
pub fn apply_overrides(
    table: &mut toml::Table,
    sections: &[&str],
    vars: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    for (name, value) in vars {
        if !name.starts_with("FERRY_") || NOT_OVERRIDES.contains(&name.as_str()) {
            continue;
        }
        let key = name["FERRY_".len()..].to_ascii_lowercase();
        let parsed: toml::Value = format!("v = {value}")
            .parse::<toml::Table>()
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let section = sections.iter().find(|s| key.starts_with(&format!("{s}_")));
        match section {
            Some(section) => {
                let field = key[section.len() + 1..].to_string();
                let entry = table
                    .entry(section.to_string())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                let Some(t) = entry.as_table_mut() else {
                    bail!("{name}: config key {section} is not a table");
                };
                t.insert(field, parsed);
            }
            None => {
                table.insert(key, parsed);
            }
        }
    }
    Ok(())
}

/// Parses and validates a node configuration from TOML text plus overrides.
pub fn parse_node_config(
    text: &str,
    origin: &str,
    vars: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<NodeConfig> {
    let table: toml::Table = text
        .parse()
        .with_context(|| format!("{origin} is not valid TOML"))?;
    node_config_from_table(table, origin, vars)
}

/// Validates a node configuration from a TOML table plus overrides.
pub fn node_config_from_table(
    mut table: toml::Table,
    origin: &str,
    vars: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<NodeConfig> {
    apply_overrides(&mut table, NODE_SECTIONS, vars)?;
    let config: NodeConfig = toml::Value::Table(table)
        .try_into()
        .with_context(|| format!("{origin}: invalid node configuration"))?;
    config
        .validate()
        .with_context(|| format!("{origin}: invalid node configuration"))?;
    Ok(config)
}

/// Reads `path` (or `FERRY_CONFIG`): the text and the name to report it by.
fn read_config_file(path: Option<&Path>) -> anyhow::Result<(String, String)> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os("FERRY_CONFIG")
            .map(Into::into)
            .context("no --config given and FERRY_CONFIG is not set")?,
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    Ok((text, path.display().to_string()))
}

/// Loads `path` (or `FERRY_CONFIG`) with environment overrides.
pub fn load_node_config(path: Option<&Path>) -> anyhow::Result<NodeConfig> {
    let (text, origin) = read_config_file(path)?;
    parse_node_config(&text, &origin, std::env::vars())
}

/// Parses a role's configuration from TOML text plus overrides (`sections` are its tables),
/// then runs its validation; errors name the file and the role.
fn parse_role_config<T: serde::de::DeserializeOwned, E>(
    text: &str,
    origin: &str,
    role: &str,
    sections: &[&str],
    vars: impl Iterator<Item = (String, String)>,
    validate: impl FnOnce(&T) -> Result<(), E>,
) -> anyhow::Result<T>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let mut table: toml::Table = text
        .parse()
        .with_context(|| format!("{origin} is not valid TOML"))?;
    apply_overrides(&mut table, sections, vars)?;
    let config: T = toml::Value::Table(table)
        .try_into()
        .with_context(|| format!("{origin}: invalid {role} configuration"))?;
    validate(&config).with_context(|| format!("{origin}: invalid {role} configuration"))?;
    Ok(config)
}

/// Parses and validates an edge configuration from TOML text plus overrides.
pub fn parse_edge_config(
    text: &str,
    origin: &str,
    vars: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<ferry_edge::EdgeConfig> {
    parse_role_config(
        text,
        origin,
        "edge",
        EDGE_SECTIONS,
        vars,
        |c: &ferry_edge::EdgeConfig| c.validate(),
    )
}

/// Loads an edge's `path` (or `FERRY_CONFIG`) with environment overrides.
pub fn load_edge_config(path: Option<&Path>) -> anyhow::Result<ferry_edge::EdgeConfig> {
    let (text, origin) = read_config_file(path)?;
    parse_edge_config(&text, &origin, std::env::vars())
}

/// Parses and validates a sidecar configuration from TOML text plus overrides.
pub fn parse_sidecar_config(
    text: &str,
    origin: &str,
    vars: impl Iterator<Item = (String, String)>,
) -> anyhow::Result<ferry_sidecar::SidecarConfig> {
    parse_role_config(
        text,
        origin,
        "sidecar",
        SIDECAR_SECTIONS,
        vars,
        |c: &ferry_sidecar::SidecarConfig| c.validate(),
    )
}

/// Loads a sidecar's `path` (or `FERRY_CONFIG`) with environment overrides.
pub fn load_sidecar_config(path: Option<&Path>) -> anyhow::Result<ferry_sidecar::SidecarConfig> {
    let (text, origin) = read_config_file(path)?;
    parse_sidecar_config(&text, &origin, std::env::vars())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: &str = include_str!("../../../config/node.toml");
    const EDGE: &str = include_str!("../../../config/edge.toml");
    const SIDECAR: &str = include_str!("../../../config/sidecar.toml");

    #[test]
    fn example_sidecar_config_parses_and_errors_name_the_key() {
        let config = parse_sidecar_config(
            SIDECAR,
            "sidecar.toml",
            vars(&[("FERRY_APP_PORT", "7000"), ("FERRY_APP_ID", "billing")]),
        )
        .unwrap();
        assert_eq!(config.app_port, 7000);
        assert_eq!(config.app_id, "billing");
        let err = parse_sidecar_config(
            SIDECAR,
            "sidecar.toml",
            vars(&[("FERRY_OUTBOX_MAX_EVENTS", "0")]),
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("outbox"), "{err:#}");
    }

    fn vars(list: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn example_config_parses_and_overrides_apply() {
        let config = parse_node_config(
            NODE,
            "node.toml",
            vars(&[
                ("FERRY_RAFT_HEARTBEAT_MS", "200"),
                ("FERRY_DATA_DIR", "/tmp/x"),
            ]),
        )
        .unwrap();
        assert_eq!(config.raft.heartbeat_ms, 200);
        assert_eq!(config.data_dir, Path::new("/tmp/x"));
        assert_eq!(config.peers.len(), 3);
    }

    #[test]
    fn example_edge_config_parses_and_errors_name_the_key() {
        let config = parse_edge_config(
            EDGE,
            "edge.toml",
            vars(&[("FERRY_WINDOW_EVENTS", "50"), ("FERRY_NAME", "edge-b")]),
        )
        .unwrap();
        assert_eq!(config.window.events, 50);
        assert_eq!(config.name, "edge-b");
        let err = format!(
            "{:#}",
            parse_edge_config(EDGE, "edge.toml", vars(&[("FERRY_AUTH_SECRET", "short")]))
                .unwrap_err()
        );
        assert!(err.contains("auth.secret"), "{err}");
        let err = format!(
            "{:#}",
            parse_edge_config(EDGE, "edge.toml", vars(&[("FERRY_LIMITS_SEND_QUEUE", "0")]))
                .unwrap_err()
        );
        assert!(err.contains("limits.send_queue"), "{err}");
    }

    #[test]
    fn errors_name_the_key() {
        let err = format!(
            "{:#}",
            parse_node_config(
                NODE,
                "node.toml",
                vars(&[("FERRY_RAFT_HEARTBEAT_MS", "5000")])
            )
            .unwrap_err()
        );
        assert!(
            err.contains("raft") && err.contains("heartbeat_ms"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            parse_node_config(NODE, "node.toml", vars(&[("FERRY_LIMITS_MAX_EVNT", "5")]))
                .unwrap_err()
        );
        assert!(err.contains("max_evnt"), "{err}");
        let err = format!(
            "{:#}",
            parse_node_config(NODE, "node.toml", vars(&[("FERRY_ID", "9")])).unwrap_err()
        );
        assert!(err.contains("peers") && err.contains('9'), "{err}");
    }

    #[test]
    fn tier_limits_are_checked_and_errors_name_the_key() {
        let tier =
            |extra: &str| format!("{NODE}\n[tier]\nurl = \"file:///tmp/ferry-tier\"\n{extra}\n");
        let config = parse_node_config(&tier(""), "node.toml", vars(&[])).unwrap();
        assert_eq!(config.tier.unwrap().sweep_interval_ms, 600_000);
        let config = parse_node_config(
            &tier(""),
            "node.toml",
            vars(&[("FERRY_TIER_READ_AHEAD_PIECES", "0")]),
        )
        .unwrap();
        assert_eq!(config.tier.unwrap().read_ahead_pieces, 0);
        let err = format!(
            "{:#}",
            parse_node_config(&tier("read_ahead_pieces = 65"), "node.toml", vars(&[])).unwrap_err()
        );
        assert!(
            err.contains("tier.read_ahead_pieces") && err.contains("65"),
            "{err}"
        );
        let err = format!(
            "{:#}",
            parse_node_config(&tier("sweep_interval_ms = 500"), "node.toml", vars(&[]))
                .unwrap_err()
        );
        assert!(
            err.contains("tier.sweep_interval_ms") && err.contains("500"),
            "{err}"
        );
    }

    #[test]
    fn slow_link_faults_parse_and_errors_name_the_key() {
        let link = |extra: &str| {
            format!(
                "{NODE}\n[[faults.slow_links]]\naddr = \"10.1.0.2:7401\"\ndelay_ms = 5\n{extra}\n"
            )
        };
        let config = parse_node_config(
            &link("drop_request_percent = 10\ndrop_response_percent = 20\nduplicate_percent = 30\nseed = 7"),
            "node.toml",
            vars(&[]),
        )
        .unwrap();
        let slow = &config.faults.slow_links[0];
        assert_eq!(slow.seed, Some(7));
        let shape = slow.shape();
        assert_eq!(
            (shape.drop_request, shape.drop_response, shape.duplicate),
            (0.1, 0.2, 0.3)
        );
        for key in [
            "drop_request_percent",
            "drop_response_percent",
            "duplicate_percent",
        ] {
            let err = format!(
                "{:#}",
                parse_node_config(&link(&format!("{key} = 101")), "node.toml", vars(&[]))
                    .unwrap_err()
            );
            assert!(err.contains(&format!("faults.slow_links.{key}")), "{err}");
        }
        let two_seeds = format!(
            "{}[[faults.slow_links]]\naddr = \"10.1.0.3:7401\"\ndelay_ms = 5\nseed = 8\n",
            link("seed = 7")
        );
        let err = format!(
            "{:#}",
            parse_node_config(&two_seeds, "node.toml", vars(&[])).unwrap_err()
        );
        assert!(err.contains("faults.slow_links.seed"), "{err}");
    }
}
