//! Subscriptions in Dapr's shapes: what the app answers on `GET /dapr/subscribe`
//! (programmatic, `route` or `routes`) and declarative `Subscription` files (YAML,
//! `dapr.io/v1alpha1` with `route` or `dapr.io/v2alpha1` with `routes`), both turned into
//! [`Subscription`]s. Loading refuses what cannot work (a bad `match` rule, a route without a
//! path, a duplicate topic) with the reason; nothing here does I/O.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::route::Rule;

/// Where a subscription came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Origin {
    /// The app's `GET /dapr/subscribe`.
    Programmatic,
    /// A file in `subscriptions_dir`.
    Declarative,
}

/// Bulk delivery settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bulk {
    /// Most events in one call.
    pub max_messages: usize,
    /// How long to wait for more events before calling with fewer, ms.
    pub max_await_ms: u64,
}

/// One subscription of the app.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    /// The pubsub component name.
    pub pubsub: String,
    /// The topic.
    pub topic: String,
    /// Rules in order: the first that matches gives the path.
    pub rules: Vec<(Rule, String)>,
    /// The path when no rule matches (no path: the event is dropped and counted).
    pub default_path: Option<String>,
    /// Where dropped events go.
    pub dead_letter_topic: Option<String>,
    /// Bulk delivery, when enabled.
    pub bulk: Option<Bulk>,
    /// Deliver the stored payload itself instead of a CloudEvent (`metadata.rawPayload`).
    pub raw_payload: bool,
    /// Start from the oldest retained event (default) or only new ones
    /// (`metadata.initialOffset: newest`) when the group has no cursor yet.
    pub from_newest: bool,
    /// Where it came from.
    pub origin: Origin,
}

impl Subscription {
    /// The path an event goes to, if any.
    pub fn path_for(&self, event: &Value) -> Option<&str> {
        self.rules
            .iter()
            .find(|(rule, _)| rule.matches(event))
            .map(|(_, path)| path.as_str())
            .or(self.default_path.as_deref())
    }
}

/// Why subscriptions could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {reason}")]
pub struct SubscriptionError {
    /// Where (the file, or `GET /dapr/subscribe`).
    pub origin: String,
    /// What is wrong.
    pub reason: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawRoutes {
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    default: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RawRule {
    /// A rule without `match` is the default route (v2alpha1).
    #[serde(rename = "match", default)]
    matches: Option<String>,
    path: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawBulk {
    #[serde(default)]
    enabled: bool,
    #[serde(default)]
    max_messages_count: Option<usize>,
    #[serde(default)]
    max_await_duration_ms: Option<u64>,
}

/// The fields both shapes share (`spec` of a file, an entry of `/dapr/subscribe`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawSpec {
    #[serde(alias = "pubsubName")]
    pubsubname: String,
    topic: String,
    #[serde(default)]
    route: Option<String>,
    #[serde(default)]
    routes: Option<RawRoutes>,
    /// dapr-ext-fastapi sends `null` when the app gave no metadata.
    #[serde(default)]
    metadata: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    dead_letter_topic: Option<String>,
    #[serde(default)]
    bulk_subscribe: Option<RawBulk>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawFile {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    spec: RawSpec,
    #[serde(default)]
    scopes: Vec<String>,
}

fn path(p: &str) -> String {
    if p.starts_with('/') {
        p.to_string()
    } else {
        format!("/{p}")
    }
}

fn metadata_text(metadata: &BTreeMap<String, Value>, key: &str) -> Option<String> {
    match metadata.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        other => Some(other.to_string()),
    }
}

fn convert(raw: RawSpec, origin: Origin, at: &str) -> Result<Subscription, SubscriptionError> {
    let err = |reason: String| SubscriptionError {
        origin: at.to_string(),
        reason,
    };
    if raw.pubsubname.is_empty() || raw.topic.is_empty() {
        return Err(err("pubsubname and topic are required".into()));
    }
    let mut rules = Vec::new();
    let mut default_path = raw.route.as_deref().filter(|r| !r.is_empty()).map(path);
    if let Some(routes) = raw.routes {
        for rule in routes.rules {
            if rule.path.is_empty() {
                return Err(err(format!("topic {}: a rule without a path", raw.topic)));
            }
            match rule.matches.as_deref().map(str::trim) {
                None | Some("") => default_path = Some(path(&rule.path)),
                Some(text) => {
                    let parsed =
                        Rule::parse(text).map_err(|e| err(format!("topic {}: {e}", raw.topic)))?;
                    rules.push((parsed, path(&rule.path)));
                }
            }
        }
        if let Some(d) = routes.default.filter(|d| !d.is_empty()) {
            default_path = Some(path(&d));
        }
    }
    if rules.is_empty() && default_path.is_none() {
        return Err(err(format!(
            "topic {}: neither route nor routes gives a path",
            raw.topic
        )));
    }
    let bulk = match raw.bulk_subscribe {
        Some(b) if b.enabled => Some(Bulk {
            max_messages: b.max_messages_count.unwrap_or(100).clamp(1, 10_000),
            max_await_ms: b.max_await_duration_ms.unwrap_or(1000),
        }),
        _ => None,
    };
    let metadata = raw.metadata.unwrap_or_default();
    let raw_payload = metadata_text(&metadata, "rawPayload").as_deref() == Some("true");
    let from_newest = match metadata_text(&metadata, "initialOffset").as_deref() {
        None | Some("oldest") => false,
        Some("newest") => true,
        Some(other) => {
            return Err(err(format!(
                "topic {}: metadata.initialOffset {other:?} is not oldest or newest",
                raw.topic
            )))
        }
    };
    Ok(Subscription {
        pubsub: raw.pubsubname,
        topic: raw.topic,
        rules,
        default_path,
        dead_letter_topic: raw.dead_letter_topic.filter(|t| !t.is_empty()),
        bulk,
        raw_payload,
        from_newest,
        origin,
    })
}

/// The subscriptions in an app's answer to `GET /dapr/subscribe`, and why any entry was
/// refused (the others still count); an error when the answer is not a JSON list.
pub fn parse_programmatic(
    body: &[u8],
) -> Result<(Vec<Subscription>, Vec<SubscriptionError>), SubscriptionError> {
    let at = "GET /dapr/subscribe";
    let entries: Vec<Value> = serde_json::from_slice(body).map_err(|e| SubscriptionError {
        origin: at.into(),
        reason: format!("not a list of subscriptions: {e}"),
    })?;
    let mut subscriptions = Vec::new();
    let mut refused = Vec::new();
    for (index, entry) in entries.into_iter().enumerate() {
        let origin = format!("{at}, entry {index}");
        let parsed = serde_json::from_value::<RawSpec>(entry)
            .map_err(|e| SubscriptionError {
                origin: origin.clone(),
                reason: e.to_string(),
            })
            .and_then(|raw| convert(raw, Origin::Programmatic, &origin));
        match parsed {
            Ok(s) => subscriptions.push(s),
            Err(e) => refused.push(e),
        }
    }
    Ok((subscriptions, refused))
}

/// The subscription a declarative file holds, or None when it is not a `Subscription` or is
/// scoped to other apps.
pub fn parse_declarative(
    text: &str,
    file: &str,
    app_id: &str,
) -> Result<Option<Subscription>, SubscriptionError> {
    let raw: RawFile = yaml_serde::from_str(text).map_err(|e| SubscriptionError {
        origin: file.into(),
        reason: e.to_string(),
    })?;
    if raw.kind != "Subscription" {
        return Ok(None);
    }
    if !matches!(
        raw.api_version.as_str(),
        "dapr.io/v1alpha1" | "dapr.io/v2alpha1"
    ) {
        return Err(SubscriptionError {
            origin: file.into(),
            reason: format!(
                "apiVersion {:?} is not dapr.io/v1alpha1 or dapr.io/v2alpha1",
                raw.api_version
            ),
        });
    }
    if !raw.scopes.is_empty() && !raw.scopes.iter().any(|s| s == app_id) {
        return Ok(None);
    }
    convert(raw.spec, Origin::Declarative, file).map(Some)
}

/// Merges subscription lists: one per (pubsub, topic), the first kept; the others are
/// returned as errors to report.
pub fn merge(
    lists: impl IntoIterator<Item = Subscription>,
) -> (Vec<Subscription>, Vec<SubscriptionError>) {
    let mut kept: Vec<Subscription> = Vec::new();
    let mut refused = Vec::new();
    for s in lists {
        if kept
            .iter()
            .any(|k| k.pubsub == s.pubsub && k.topic == s.topic)
        {
            refused.push(SubscriptionError {
                origin: format!("{:?} subscription", s.origin),
                reason: format!(
                    "a second subscription to {}/{} is ignored (one per topic)",
                    s.pubsub, s.topic
                ),
            });
        } else {
            kept.push(s);
        }
    }
    (kept, refused)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn programmatic_route_and_routes_shapes() {
        let body = json!([
            {"pubsubname": "pubsub", "topic": "a", "route": "orders", "metadata": {"rawPayload": "true"}},
            {"pubsubname": "pubsub", "topic": "b", "routes": {
                "rules": [{"match": "event.type == \"x\"", "path": "/x"}],
                "default": "/other"},
             "deadLetterTopic": "dead",
             "bulkSubscribe": {"enabled": true, "maxMessagesCount": 10, "maxAwaitDurationMs": 5}}
        ]);
        let (subs, refused) = parse_programmatic(body.to_string().as_bytes()).unwrap();
        assert!(refused.is_empty());
        assert_eq!(subs[0].default_path.as_deref(), Some("/orders"));
        assert!(subs[0].raw_payload);
        assert_eq!(subs[1].path_for(&json!({"type": "x"})), Some("/x"));
        assert_eq!(subs[1].path_for(&json!({"type": "y"})), Some("/other"));
        assert_eq!(subs[1].dead_letter_topic.as_deref(), Some("dead"));
        assert_eq!(
            subs[1].bulk,
            Some(Bulk {
                max_messages: 10,
                max_await_ms: 5
            })
        );
    }

    #[test]
    fn what_dapr_ext_fastapi_sends_is_accepted() {
        // DaprApp.subscribe(pubsub="pubsub", topic="orders") with no metadata or dead letter.
        let body = json!([{"pubsubname": "pubsub", "topic": "orders", "route": "/events/pubsub/orders",
                           "metadata": null, "deadLetterTopic": null}]);
        let (subs, refused) = parse_programmatic(body.to_string().as_bytes()).unwrap();
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(
            subs[0].default_path.as_deref(),
            Some("/events/pubsub/orders")
        );
        assert_eq!(subs[0].dead_letter_topic, None);
    }

    #[test]
    fn bad_subscriptions_are_refused_with_the_reason() {
        let bad_rule = json!([{"pubsubname": "p", "topic": "a",
            "routes": {"rules": [{"match": "size(event.data) > 1", "path": "/x"}]}}]);
        let (_, refused) = parse_programmatic(bad_rule.to_string().as_bytes()).unwrap();
        assert!(refused[0].reason.contains("topic a"), "{}", refused[0]);
        // One bad entry does not take the others down.
        let no_path = json!([{"pubsubname": "p", "topic": "a"}, {"pubsubname": "p", "topic": "b", "route": "/b"}]);
        let (subs, refused) = parse_programmatic(no_path.to_string().as_bytes()).unwrap();
        assert_eq!(subs.len(), 1);
        assert!(refused[0].reason.contains("path"));
        assert_eq!(refused[0].origin, "GET /dapr/subscribe, entry 0");
        assert!(parse_programmatic(b"{}").is_err());
    }

    #[test]
    fn declarative_files_with_scopes() {
        let file = r#"
apiVersion: dapr.io/v2alpha1
kind: Subscription
metadata:
  name: orders
spec:
  pubsubname: pubsub
  topic: orders
  routes:
    rules:
      - match: event.data.total > 100 && event.type == "created"
        path: /big
    default: /orders
  deadLetterTopic: orders-dead
scopes:
  - checkout
"#;
        let sub = parse_declarative(file, "orders.yaml", "checkout")
            .unwrap()
            .unwrap();
        assert_eq!(sub.origin, Origin::Declarative);
        assert_eq!(
            sub.path_for(&json!({"type": "created", "data": {"total": 150}})),
            Some("/big")
        );
        assert_eq!(
            parse_declarative(file, "orders.yaml", "shipping").unwrap(),
            None
        );
        let component =
            "apiVersion: dapr.io/v1alpha1\nkind: Component\nspec:\n  pubsubname: x\n  topic: y\n";
        assert_eq!(parse_declarative(component, "c.yaml", "a").unwrap(), None);
        let v1 = "apiVersion: dapr.io/v1alpha1\nkind: Subscription\nspec:\n  pubsubname: p\n  topic: t\n  route: /t\n";
        let sub = parse_declarative(v1, "v1.yaml", "a").unwrap().unwrap();
        assert_eq!(sub.default_path.as_deref(), Some("/t"));
        let e = parse_declarative("kind: [", "broken.yaml", "a").unwrap_err();
        assert_eq!(e.origin, "broken.yaml");
    }

    #[test]
    fn one_subscription_per_topic() {
        let body = json!([
            {"pubsubname": "p", "topic": "a", "route": "/1"},
            {"pubsubname": "p", "topic": "a", "route": "/2"}
        ]);
        let (kept, refused) = merge(parse_programmatic(body.to_string().as_bytes()).unwrap().0);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].default_path.as_deref(), Some("/1"));
        assert_eq!(refused.len(), 1);
    }
}
