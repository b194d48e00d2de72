//! `ferry bench table DIR`: the comparison table from the JSON reports that
//! `deploy/bench/compare` leaves in DIR (`<suite>-<system>-<pair>.json`, `idle-<system>.json`;
//! a suite run at several partition counts is `<suite>-p<N>`): per suite and figure, the
//! median of each system and the ratio Ferry/NATS — median, min and max over the pairs, each
//! pair's ratio taken within the pair (both ran back to back).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use serde_json::Value;

/// A figure read from a report: its name and where it is.
struct Figure {
    name: &'static str,
    path: &'static [&'static str],
}

const FIGURES: &[(&str, &[Figure])] = &[
    (
        "produce",
        &[
            Figure {
                name: "events/s",
                path: &["events_per_sec"],
            },
            Figure {
                name: "ack p50 ms",
                path: &["ack_latency_ms", "p50"],
            },
            Figure {
                name: "ack p99 ms",
                path: &["ack_latency_ms", "p99"],
            },
            Figure {
                name: "CPU s per M events",
                path: &["resources", "cpu_seconds_per_million_events"],
            },
            Figure {
                name: "write amplification",
                path: &["resources", "write_amplification_per_replica"],
            },
        ],
    ),
    (
        "e2e-5000",
        &[
            Figure {
                name: "e2e p50 ms",
                path: &["e2e_latency_ms", "p50"],
            },
            Figure {
                name: "e2e p99 ms",
                path: &["e2e_latency_ms", "p99"],
            },
            Figure {
                name: "e2e p999 ms",
                path: &["e2e_latency_ms", "p999"],
            },
        ],
    ),
    (
        "e2e-20000",
        &[
            Figure {
                name: "e2e p50 ms",
                path: &["e2e_latency_ms", "p50"],
            },
            Figure {
                name: "e2e p99 ms",
                path: &["e2e_latency_ms", "p99"],
            },
            Figure {
                name: "CPU s per M events",
                path: &["resources", "cpu_seconds_per_million_events"],
            },
        ],
    ),
    (
        "consume",
        &[
            Figure {
                name: "events/s",
                path: &["events_per_sec"],
            },
            Figure {
                name: "CPU s per M events",
                path: &["resources", "cpu_seconds_per_million_events"],
            },
        ],
    ),
];

fn lookup(report: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(report, |v, key| v.get(key))?.as_f64()
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// Reads every report in `dir` and renders the table.
pub(crate) fn render(dir: &Path) -> anyhow::Result<String> {
    // (suite, system) -> pair -> report
    let mut reports: BTreeMap<(String, String), BTreeMap<u32, Value>> = BTreeMap::new();
    let mut idle: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some(stem) = name.strip_suffix(".json") else {
            continue;
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        if let Some(system) = stem.strip_prefix("idle-") {
            let kib = value["idle_rss_kib"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            idle.insert(
                system.to_string(),
                kib.iter()
                    .filter_map(Value::as_f64)
                    .map(|k| k / 1024.0)
                    .collect(),
            );
            continue;
        }
        // <suite>-<system>-<pair>, where the suite may hold dashes.
        let mut parts = stem.rsplitn(3, '-');
        let (Some(pair), Some(system), Some(suite)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Ok(pair) = pair.parse::<u32>() else {
            continue;
        };
        reports
            .entry((suite.to_string(), system.to_string()))
            .or_default()
            .insert(pair, value);
    }
    anyhow::ensure!(!reports.is_empty(), "no reports in {}", dir.display());

    let mut out = String::new();
    out += &format!(
        "{:<14} {:<22} {:>12} {:>12} {:>10} {:>17}\n",
        "suite", "figure", "ferry", "nats", "ferry/nats", "[min, max]"
    );
    // The suites present, in FIGURES' order, each by its partition counts.
    let mut suites: Vec<(usize, u32, &str, &[Figure])> = reports
        .keys()
        .filter_map(|(suite, _)| {
            let (base, partitions) = match suite.rsplit_once("-p") {
                Some((base, n)) if n.parse::<u32>().is_ok() => (base, n.parse().ok()?),
                _ => (suite.as_str(), 0),
            };
            let at = FIGURES.iter().position(|(name, _)| *name == base)?;
            Some((at, partitions, suite.as_str(), FIGURES[at].1))
        })
        .collect();
    suites.sort_unstable_by_key(|(at, partitions, _, _)| (*at, *partitions));
    suites.dedup_by_key(|(_, _, suite, _)| *suite);
    for (_, _, suite, figures) in suites {
        let ferry = reports.get(&(suite.to_string(), "ferry".to_string()));
        let nats = reports.get(&(suite.to_string(), "nats".to_string()));
        let (Some(ferry), Some(nats)) = (ferry, nats) else {
            continue;
        };
        for figure in figures {
            let of = |runs: &BTreeMap<u32, Value>| -> Vec<f64> {
                runs.values()
                    .filter_map(|r| lookup(r, figure.path))
                    .collect()
            };
            let mut ratios: Vec<f64> = ferry
                .iter()
                .filter_map(|(pair, f)| {
                    let n = lookup(nats.get(pair)?, figure.path)?;
                    Some(lookup(f, figure.path)? / n)
                })
                .filter(|r| r.is_finite())
                .collect();
            let (mut f, mut n) = (of(ferry), of(nats));
            if f.is_empty() || n.is_empty() {
                continue;
            }
            let ratio = median(&mut ratios);
            let (min, max) = (
                ratios.first().copied().unwrap_or(f64::NAN),
                ratios.last().copied().unwrap_or(f64::NAN),
            );
            out += &format!(
                "{:<14} {:<22} {:>12} {:>12} {:>10.2} {:>17}\n",
                suite,
                figure.name,
                fmt(median(&mut f)),
                fmt(median(&mut n)),
                ratio,
                format!("[{min:.2}, {max:.2}]")
            );
        }
    }
    for (system, rss) in &idle {
        let max = rss.iter().copied().fold(0.0, f64::max);
        out += &format!(
            "idle RSS per node, {system}: max {max:.1} MiB ({} nodes)\n",
            rss.len()
        );
    }
    let pairs = reports.values().map(BTreeMap::len).max().unwrap_or(0);
    out += &format!("pairs: {pairs} (ratios are taken within each pair)\n");
    Ok(out)
}

fn fmt(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ratios_are_taken_within_pairs() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, eps: f64, p99: f64| {
            let v = serde_json::json!({
                "events_per_sec": eps,
                "ack_latency_ms": {"p50": 1.0, "p99": p99},
            });
            std::fs::write(dir.path().join(name), v.to_string()).unwrap();
        };
        write("produce-ferry-1.json", 200.0, 4.0);
        write("produce-nats-1.json", 100.0, 8.0);
        write("produce-ferry-2.json", 300.0, 4.0);
        write("produce-nats-2.json", 100.0, 2.0);
        std::fs::write(
            dir.path().join("idle-ferry.json"),
            r#"{"system":"ferry","idle_rss_kib":[20480,30720]}"#,
        )
        .unwrap();
        let table = render(dir.path()).unwrap();
        let line = |figure: &str| {
            table
                .lines()
                .find(|l| l.starts_with("produce") && l.contains(figure))
                .unwrap_or_else(|| panic!("no {figure} row in\n{table}"))
                .to_string()
        };
        // events/s: pair ratios 2 and 3 → median 2.5, range [2, 3].
        let eps = line("events/s");
        assert!(
            eps.contains("2.50") && eps.contains("[2.00, 3.00]"),
            "{eps}"
        );
        // ack p99: pair ratios 0.5 and 2 → median 1.25.
        let p99 = line("ack p99 ms");
        assert!(
            p99.contains("1.25") && p99.contains("[0.50, 2.00]"),
            "{p99}"
        );
        assert!(
            table.contains("idle RSS per node, ferry: max 30.0 MiB (2 nodes)"),
            "{table}"
        );
        assert!(render(&dir.path().join("missing")).is_err());
    }

    #[test]
    fn suites_at_several_partition_counts_get_a_row_each_in_count_order() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, eps: f64| {
            let v = serde_json::json!({ "events_per_sec": eps });
            std::fs::write(dir.path().join(name), v.to_string()).unwrap();
        };
        for (partitions, ferry) in [(64, 50.0), (1, 300.0), (8, 200.0)] {
            write(&format!("produce-p{partitions}-ferry-1.json"), ferry);
            write(&format!("produce-p{partitions}-nats-1.json"), 100.0);
        }
        let table = render(dir.path()).unwrap();
        let rows: Vec<&str> = table.lines().filter(|l| l.contains("events/s")).collect();
        assert_eq!(rows.len(), 3, "{table}");
        for (row, (suite, ratio)) in rows.iter().zip([
            ("produce-p1 ", "3.00"),
            ("produce-p8 ", "2.00"),
            ("produce-p64", "0.50"),
        ]) {
            assert!(row.starts_with(suite) && row.contains(ratio), "{row}");
        }
    }
}
