//! Personalised notifications: a notification whose data is `{"template": NAME, "vars": {…}}`
//! is rendered (minijinja) for each receiving user, with the template of the user's locale
//! (the token's `locale` claim, else the default), the event's `vars`, and — only if the
//! template refers to it — the user's attributes as `user`. The delivered frame carries the
//! result as `text` and the locale used as `locale`.
//!
//! Rendering is cached: the rendered text per (template, locale, vars, and user attributes
//! only where the template reads them), and the finished frame per (notification, that key).
//! A broadcast to a million users whose template does not read `user` renders once per
//! locale.
//!
//! Templates are files `<name>.<locale>.j2` in `templates.dir`.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::auth::User;
use crate::hub::Outbound;
use crate::EdgeError;

/// Template settings (the `[templates]` table).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateConfig {
    /// Folder of `<name>.<locale>.j2` files (none: templated notifications carry an error).
    #[serde(default)]
    pub dir: Option<std::path::PathBuf>,
    /// Locale for users without one, and when a template lacks the user's.
    #[serde(default = "default_locale")]
    pub default_locale: String,
    /// Rendered frames kept in the cache.
    #[serde(default = "default_cache_entries")]
    pub cache_entries: usize,
}

fn default_locale() -> String {
    "en".into()
}
fn default_cache_entries() -> usize {
    10_000
}

impl Default for TemplateConfig {
    fn default() -> Self {
        Self {
            dir: None,
            default_locale: default_locale(),
            cache_entries: default_cache_entries(),
        }
    }
}

/// Counters of the renderer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RenderStats {
    /// Templates rendered.
    pub renders: u64,
    /// Frames served from the cache.
    pub cache_hits: u64,
    /// Notifications whose template was missing or failed.
    pub errors: u64,
}

/// A bounded map that is emptied when full: simple, and a hot broadcast refills it at once.
#[derive(Debug)]
struct BoundedCache<V> {
    map: HashMap<u64, V>,
    capacity: usize,
}

impl<V: Clone> BoundedCache<V> {
    fn get(&self, key: u64) -> Option<V> {
        self.map.get(&key).cloned()
    }

    fn insert(&mut self, key: u64, value: V) {
        if self.map.len() >= self.capacity {
            self.map.clear();
        }
        self.map.insert(key, value);
    }
}

#[derive(Debug)]
struct Caches {
    texts: BoundedCache<Arc<str>>,
    frames: BoundedCache<Bytes>,
    stats: RenderStats,
}

/// Loaded templates and the caches.
pub struct Renderer {
    env: minijinja::Environment<'static>,
    /// (name, locale) → whether the template reads `user`.
    templates: HashMap<(String, String), bool>,
    default_locale: String,
    caches: Mutex<Caches>,
}

/// Hashes the parts of a cache key (JSON values by their text: serde_json keeps object keys
/// sorted, so equal values hash equally).
fn hash_of(strings: &[&str], values: &[&serde_json::Value], number: u64) -> u64 {
    let mut hasher = DefaultHasher::new();
    strings.hash(&mut hasher);
    for value in values {
        value.to_string().hash(&mut hasher);
    }
    number.hash(&mut hasher);
    hasher.finish()
}

impl Renderer {
    /// Loads every `<name>.<locale>.j2` of `config.dir`.
    pub fn load(config: &TemplateConfig) -> Result<Self, EdgeError> {
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        let mut templates = HashMap::new();
        if let Some(dir) = &config.dir {
            let entries = std::fs::read_dir(dir).map_err(|e| EdgeError::Config {
                key: "templates.dir",
                reason: format!("{}: {e}", dir.display()),
            })?;
            for entry in entries {
                let path = entry
                    .map_err(|e| EdgeError::Config {
                        key: "templates.dir",
                        reason: e.to_string(),
                    })?
                    .path();
                if let Some((name, locale)) = template_name(&path) {
                    let text = std::fs::read_to_string(&path).map_err(|e| EdgeError::Config {
                        key: "templates.dir",
                        reason: format!("{}: {e}", path.display()),
                    })?;
                    let key = format!("{name}.{locale}");
                    env.add_template_owned(key.clone(), text)
                        .map_err(|e| EdgeError::Config {
                            key: "templates.dir",
                            reason: format!("{}: {e}", path.display()),
                        })?;
                    let reads_user = env
                        .get_template(&key)
                        .map(|t| t.undeclared_variables(false).contains("user"))
                        .unwrap_or(true);
                    templates.insert((name, locale), reads_user);
                }
            }
        }
        Ok(Self {
            env,
            templates,
            default_locale: config.default_locale.clone(),
            caches: Mutex::new(Caches {
                texts: BoundedCache {
                    map: HashMap::new(),
                    capacity: config.cache_entries.max(1),
                },
                frames: BoundedCache {
                    map: HashMap::new(),
                    capacity: config.cache_entries.max(1),
                },
                stats: RenderStats::default(),
            }),
        })
    }

    /// Templates loaded.
    pub fn template_count(&self) -> usize {
        self.templates.len()
    }

    /// Counters.
    pub fn stats(&self) -> RenderStats {
        self.caches.lock().expect("render cache").stats
    }

    /// The frame `user` receives for a notification: itself, or rendered when templated.
    pub fn frame_for(&self, note: &Outbound, user: &User) -> Bytes {
        if !note.templated {
            return note.frame.clone();
        }
        let Ok(mut frame) = serde_json::from_slice::<serde_json::Value>(&note.frame) else {
            return note.frame.clone();
        };
        let name = frame["data"]["template"].as_str().unwrap_or("").to_string();
        let wanted = user
            .claims
            .locale
            .clone()
            .unwrap_or_else(|| self.default_locale.clone());
        let found = [wanted.as_str(), self.default_locale.as_str()]
            .into_iter()
            .find_map(|locale| {
                self.templates
                    .get(&(name.clone(), locale.to_string()))
                    .map(|reads_user| (locale.to_string(), *reads_user))
            });
        let Some((locale, reads_user)) = found else {
            let mut caches = self.caches.lock().expect("render cache");
            caches.stats.errors += 1;
            drop(caches);
            frame["text"] = serde_json::Value::Null;
            frame["template_error"] = format!("no template {name} for locale {wanted}").into();
            return Bytes::from(frame.to_string());
        };
        let attrs = if reads_user {
            user.claims.attrs.clone()
        } else {
            serde_json::Value::Null
        };
        let vars = frame["data"]["vars"].clone();
        let text_key = hash_of(&[&name, &locale], &[&vars, &attrs], 0);
        let frame_key = hash_of(&[&note.channel], &[], note.seq ^ text_key.rotate_left(17));
        let mut caches = self.caches.lock().expect("render cache");
        if let Some(cached) = caches.frames.get(frame_key) {
            caches.stats.cache_hits += 1;
            return cached;
        }
        let text = match caches.texts.get(text_key) {
            Some(text) => Ok(text),
            None => {
                drop(caches);
                let rendered = self
                    .env
                    .get_template(&format!("{name}.{locale}"))
                    .and_then(|t| {
                        t.render(minijinja::context! {
                            vars => minijinja::Value::from_serialize(&vars),
                            user => minijinja::Value::from_serialize(&attrs),
                        })
                    });
                caches = self.caches.lock().expect("render cache");
                match rendered {
                    Ok(text) => {
                        caches.stats.renders += 1;
                        let text: Arc<str> = text.into();
                        caches.texts.insert(text_key, text.clone());
                        Ok(text)
                    }
                    Err(e) => {
                        caches.stats.errors += 1;
                        Err(e.to_string())
                    }
                }
            }
        };
        match text {
            Ok(text) => {
                frame["text"] = serde_json::Value::String(text.to_string());
                frame["locale"] = locale.into();
            }
            Err(e) => {
                frame["text"] = serde_json::Value::Null;
                frame["template_error"] = e.into();
            }
        }
        let bytes = Bytes::from(frame.to_string());
        caches.frames.insert(frame_key, bytes.clone());
        bytes
    }
}

/// `order.en.j2` → ("order", "en").
fn template_name(path: &Path) -> Option<(String, String)> {
    let file = path.file_name()?.to_str()?;
    let stem = file.strip_suffix(".j2")?;
    let (name, locale) = stem.rsplit_once('.')?;
    (!name.is_empty() && !locale.is_empty()).then(|| (name.to_string(), locale.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Claims;

    fn user(sub: &str, locale: Option<&str>, name: &str) -> User {
        User::from_claims(Claims {
            sub: sub.into(),
            tenant: String::new(),
            channels: vec![],
            exp: u64::MAX,
            locale: locale.map(str::to_string),
            attrs: serde_json::json!({ "name": name }),
        })
        .unwrap()
    }

    fn note(channel: &str, seq: u64, data: serde_json::Value) -> Outbound {
        let frame = serde_json::json!({"type": "message", "channel": channel, "data": data});
        Outbound {
            channel: channel.into(),
            seq,
            frame: Bytes::from(frame.to_string()),
            templated: true,
        }
    }

    fn renderer() -> (tempfile::TempDir, Renderer) {
        let dir = tempfile::tempdir().unwrap();
        let write = |f: &str, t: &str| std::fs::write(dir.path().join(f), t).unwrap();
        write("sale.en.j2", "Sale: {{ vars.pct }}% off");
        write("sale.fr.j2", "Soldes : -{{ vars.pct }} %");
        write(
            "shipped.en.j2",
            "{{ user.name }}, order {{ vars.order }} shipped",
        );
        write("README.txt", "not a template");
        let config = TemplateConfig {
            dir: Some(dir.path().to_path_buf()),
            ..TemplateConfig::default()
        };
        let renderer = Renderer::load(&config).unwrap();
        (dir, renderer)
    }

    fn text(frame: &Bytes) -> serde_json::Value {
        serde_json::from_slice(frame).unwrap()
    }

    #[test]
    fn a_broadcast_renders_once_per_locale() {
        let (_dir, r) = renderer();
        assert_eq!(r.template_count(), 3);
        let sale = note(
            "news",
            1,
            serde_json::json!({"template": "sale", "vars": {"pct": 20}}),
        );
        for i in 0..100 {
            let locale = if i % 2 == 0 { Some("fr") } else { None };
            let frame = text(&r.frame_for(&sale, &user(&format!("u{i}"), locale, "x")));
            let want = if i % 2 == 0 {
                "Soldes : -20 %"
            } else {
                "Sale: 20% off"
            };
            assert_eq!(frame["text"], want);
        }
        let stats = r.stats();
        assert_eq!(stats.renders, 2, "once per locale");
        assert_eq!(stats.cache_hits, 98);
    }

    #[test]
    fn user_attributes_personalise_and_missing_templates_say_so() {
        let (_dir, r) = renderer();
        let shipped = note(
            "user.a",
            1,
            serde_json::json!({"template": "shipped", "vars": {"order": 7}}),
        );
        let a = text(&r.frame_for(&shipped, &user("a", Some("de"), "Ana")));
        assert_eq!(a["text"], "Ana, order 7 shipped");
        assert_eq!(a["locale"], "en", "falls back to the default locale");
        let b = text(&r.frame_for(&shipped, &user("b", None, "Bo")));
        assert_eq!(b["text"], "Bo, order 7 shipped");
        assert_eq!(
            r.stats().renders,
            2,
            "a template reading user renders per user"
        );
        let missing = note(
            "news",
            2,
            serde_json::json!({"template": "nope", "vars": {}}),
        );
        let m = text(&r.frame_for(&missing, &user("a", None, "Ana")));
        assert!(m["text"].is_null());
        assert!(m["template_error"].as_str().unwrap().contains("nope"));
        let plain = Outbound {
            templated: false,
            ..note("news", 3, serde_json::json!("hi"))
        };
        assert_eq!(r.frame_for(&plain, &user("a", None, "Ana")), plain.frame);
    }

    #[test]
    fn a_template_that_fails_is_reported_in_the_frame() {
        let (dir, _) = renderer();
        std::fs::write(dir.path().join("bad.en.j2"), "{{ vars.missing.deeper }}").unwrap();
        let r = Renderer::load(&TemplateConfig {
            dir: Some(dir.path().to_path_buf()),
            ..TemplateConfig::default()
        })
        .unwrap();
        let bad = note(
            "news",
            1,
            serde_json::json!({"template": "bad", "vars": {}}),
        );
        let frame = text(&r.frame_for(&bad, &user("a", None, "Ana")));
        assert!(frame["text"].is_null());
        assert!(frame["template_error"].is_string());
        assert_eq!(r.stats().errors, 1);
    }
}
