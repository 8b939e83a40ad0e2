//! The apps a node serves and what each may use: read from `FLUX_APPS_FILE` (TOML, the names
//! soketi and Sockudo users know), or one app from the `FLUX_APP_*` settings.
//!
//! Plain data, no I/O beyond reading the file: a file is parsed and checked whole before any of
//! it is used, so a bad one (at start, or on a reload) is refused with its line and the reason
//! and never half-applied. Limits a file leaves out take Pusher's defaults.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use toml::Spanned;

use crate::pusher::App;
use crate::webhooks::WebhookUrl;

/// Why an apps file was refused.
#[derive(Debug, thiserror::Error)]
pub enum AppsError {
    /// It could not be read.
    #[error("cannot read the apps file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// It is not a valid apps file.
    #[error("apps file {path}, line {line}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The line the reason is about (1-based).
        line: usize,
        /// What is wrong there.
        reason: String,
    },
}

/// The webhook events an app may ask for, by their Pusher names.
pub const WEBHOOK_EVENT_TYPES: [&str; 7] =
    ["channel_occupied", "channel_vacated", "member_added", "member_removed", "client_event", "cache_miss", "subscription_count"];

/// What one app may use. Absent (`None`) means no limit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// WebSocket connections of this app on a node; over it, `pusher:error` 4004.
    pub max_connections: Option<u64>,
    /// Whether clients may send `client-*` events.
    pub enable_client_messages: bool,
    /// Client events one connection may send per second (Pusher: 10).
    pub max_client_events_per_sec: u32,
    /// REST publishes per second; over it, HTTP 429.
    pub max_backend_events_per_sec: Option<u32>,
    /// REST reads per second; over it, HTTP 429.
    pub max_read_requests_per_sec: Option<u32>,
    /// Members of one presence channel (Pusher: 100).
    pub max_presence_members_per_channel: u32,
    /// Size of one member's `user_info`, in KiB (Pusher: 1).
    pub max_presence_member_size_kb: u32,
    /// Length of a channel name (Pusher: 200).
    pub max_channel_name_length: u32,
    /// Length of an event name (Pusher: 200).
    pub max_event_name_length: u32,
    /// Channels one publish may name (Pusher: 100).
    pub max_event_channels_at_once: u32,
    /// Size of one event's data, in KiB (Pusher: 10).
    pub max_event_payload_kb: u32,
    /// Events in one `batch_events` call (Pusher: 10).
    pub max_event_batch_size: u32,
    /// Origins a browser may connect from (`*`, `*.example.com`, `https://app.example.com`);
    /// empty: any.
    pub allowed_origins: Vec<String>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: None,
            // Off unless asked for, as on Pusher, soketi and Sockudo.
            enable_client_messages: false,
            max_client_events_per_sec: 10,
            max_backend_events_per_sec: None,
            max_read_requests_per_sec: None,
            max_presence_members_per_channel: 100,
            max_presence_member_size_kb: 1,
            max_channel_name_length: 200,
            max_event_name_length: 200,
            max_event_channels_at_once: 100,
            max_event_payload_kb: 10,
            max_event_batch_size: 10,
            allowed_origins: Vec::new(),
        }
    }
}

impl Limits {
    /// Whether a browser page from `origin` may connect. A client that sends no `Origin` (not a
    /// browser) is not held to it.
    pub fn allows_origin(&self, origin: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        self.allowed_origins.is_empty() || self.allowed_origins.iter().any(|pattern| origin_matches(pattern, origin))
    }
}

/// One webhook target of an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppWebhook {
    /// Where to post.
    pub url: WebhookUrl,
    /// The events it wants (names from [`WEBHOOK_EVENT_TYPES`]).
    pub event_types: Vec<String>,
    /// Only channels whose names start with this, if set.
    pub channel_prefix: Option<String>,
}

/// One app: its credentials and what it may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppConfig {
    /// Id, key and secret.
    pub app: App,
    /// A disabled app's clients are refused (4003) and its REST calls answered 403.
    pub enabled: bool,
    /// Its limits.
    pub limits: Limits,
    /// Its webhooks.
    pub webhooks: Vec<AppWebhook>,
}

/// The apps of a node, found by key (WebSocket clients) or by id (REST calls).
#[derive(Debug, Clone, Default)]
pub struct Apps {
    apps: Vec<Arc<AppConfig>>,
    by_key: HashMap<String, usize>,
    by_id: HashMap<String, usize>,
}

impl Apps {
    /// The apps, in file order. Ids and keys must be unique (a file is checked for it).
    fn new(apps: Vec<AppConfig>) -> Self {
        let by_key = apps.iter().enumerate().map(|(i, a)| (a.app.key.clone(), i)).collect();
        let by_id = apps.iter().enumerate().map(|(i, a)| (a.app.id.clone(), i)).collect();
        Apps { apps: apps.into_iter().map(Arc::new).collect(), by_key, by_id }
    }

    /// One app with default limits: the node's `FLUX_APP_*` settings.
    pub fn single(app: AppConfig) -> Self {
        Apps::new(vec![app])
    }

    /// Reads and checks an apps file.
    pub fn load(path: &Path) -> Result<Apps, AppsError> {
        let text = std::fs::read_to_string(path).map_err(|source| AppsError::Read { path: path.to_owned(), source })?;
        Apps::parse(&text).map_err(|(line, reason)| AppsError::Invalid { path: path.to_owned(), line, reason })
    }

    /// Parses and checks an apps file's text; on error, the line and the reason.
    pub fn parse(text: &str) -> Result<Apps, (usize, String)> {
        let line_of = |offset: usize| text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1;
        let file: FileModel = toml::from_str(text).map_err(|e| (e.span().map_or(1, |s| line_of(s.start)), e.message().to_owned()))?;
        if file.apps.is_empty() {
            return Err((1, "no apps: the file needs at least one [[apps]] table".into()));
        }
        let mut apps = Vec::with_capacity(file.apps.len());
        let (mut ids, mut keys) = (HashMap::new(), HashMap::new());
        for entry in file.apps {
            let line = line_of(entry.span().start);
            let entry = entry.into_inner();
            let refuse = |span: std::ops::Range<usize>, reason: String| Err((line_of(span.start), reason));
            for (field, value) in [("id", &entry.id), ("key", &entry.key), ("secret", &entry.secret)] {
                if value.get_ref().trim().is_empty() {
                    return refuse(value.span(), format!("the app's {field} is empty"));
                }
            }
            if let Some(first) = ids.insert(entry.id.get_ref().clone(), line) {
                return refuse(entry.id.span(), format!("app id {:?} is already used by the app on line {first}", entry.id.get_ref()));
            }
            if let Some(first) = keys.insert(entry.key.get_ref().clone(), line) {
                return refuse(entry.key.span(), format!("app key {:?} is already used by the app on line {first}", entry.key.get_ref()));
            }
            check_limits(&entry.limits).map_err(|reason| (line, reason))?;
            let mut webhooks = Vec::with_capacity(entry.webhooks.len());
            for hook in entry.webhooks {
                let hook_line = line_of(hook.span().start);
                let hook = hook.into_inner();
                let url = hook.url.parse::<WebhookUrl>().map_err(|e| (hook_line, format!("webhook url {:?}: {e}", hook.url)))?;
                if let Some(unknown) = hook.event_types.iter().find(|t| !WEBHOOK_EVENT_TYPES.contains(&t.as_str())) {
                    return Err((hook_line, format!("unknown webhook event type {unknown:?} (known: {})", WEBHOOK_EVENT_TYPES.join(", "))));
                }
                let channel_prefix = hook.filter.and_then(|f| f.channel_name_starts_with);
                webhooks.push(AppWebhook { url, event_types: hook.event_types, channel_prefix });
            }
            apps.push(AppConfig {
                app: App {
                    id: entry.id.into_inner(),
                    key: entry.key.into_inner(),
                    secret: entry.secret.into_inner(),
                    subscription_count_events: entry.subscription_count_events,
                },
                enabled: entry.enabled,
                limits: entry.limits,
                webhooks,
            });
        }
        Ok(Apps::new(apps))
    }

    /// The app clients connect to with `key`.
    pub fn by_key(&self, key: &str) -> Option<&Arc<AppConfig>> {
        self.by_key.get(key).map(|&i| &self.apps[i])
    }

    /// The app REST calls name by `id`.
    pub fn by_id(&self, id: &str) -> Option<&Arc<AppConfig>> {
        self.by_id.get(id).map(|&i| &self.apps[i])
    }

    /// Every app, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<AppConfig>> {
        self.apps.iter()
    }
}

/// The file: a list of `[[apps]]` tables.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileModel {
    #[serde(default)]
    apps: Vec<Spanned<AppEntry>>,
}

/// One `[[apps]]` table as written; limits sit beside the credentials, as in Sockudo's files.
/// The flattened [`Limits`] takes every field not named here and refuses the ones it does not
/// know, so a misspelt limit is an error, not a silent default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppEntry {
    id: Spanned<String>,
    key: Spanned<String>,
    secret: Spanned<String>,
    #[serde(default = "enabled_by_default")]
    enabled: bool,
    #[serde(default)]
    subscription_count_events: bool,
    #[serde(default)]
    webhooks: Vec<Spanned<WebhookEntry>>,
    #[serde(flatten)]
    limits: Limits,
}

fn enabled_by_default() -> bool {
    true
}

/// One webhook as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookEntry {
    url: String,
    event_types: Vec<String>,
    #[serde(default)]
    filter: Option<WebhookFilter>,
}

/// Which channels a webhook is about.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookFilter {
    channel_name_starts_with: Option<String>,
}

/// Limits that would make an app unusable are refused.
fn check_limits(limits: &Limits) -> Result<(), String> {
    let at_least_one = [
        ("max_channel_name_length", limits.max_channel_name_length),
        ("max_event_name_length", limits.max_event_name_length),
        ("max_event_channels_at_once", limits.max_event_channels_at_once),
        ("max_event_payload_kb", limits.max_event_payload_kb),
        ("max_event_batch_size", limits.max_event_batch_size),
        ("max_presence_members_per_channel", limits.max_presence_members_per_channel),
        ("max_presence_member_size_kb", limits.max_presence_member_size_kb),
    ];
    if let Some((name, _)) = at_least_one.iter().find(|(_, value)| *value == 0) {
        return Err(format!("{name} must be at least 1"));
    }
    if let Some(bad) = limits.allowed_origins.iter().find(|p| p.is_empty() || p.contains(char::is_whitespace)) {
        return Err(format!("allowed_origins entry {bad:?} is not an origin pattern"));
    }
    Ok(())
}

/// Whether `origin` (`scheme://host[:port]`) matches `pattern`: `*`; `*.example.com` (any
/// subdomain); a host (`example.com`, any scheme and port); or a whole origin. Case-insensitive,
/// as hosts are.
fn origin_matches(pattern: &str, origin: &str) -> bool {
    let (pattern, origin) = (pattern.to_ascii_lowercase(), origin.to_ascii_lowercase());
    if pattern == "*" || pattern == origin {
        return true;
    }
    let host = origin.split_once("://").map_or(origin.as_str(), |(_, rest)| rest);
    let host = host.rsplit_once(':').filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit())).map_or(host, |(h, _)| h);
    match pattern.strip_prefix("*.") {
        Some(domain) => host.strip_suffix(domain).is_some_and(|sub| sub.ends_with('.') && sub.len() > 1),
        None => !pattern.contains("://") && host == pattern,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO_APPS: &str = r#"
[[apps]]
id = "app-a"
key = "key-a"
secret = "secret-a"
max_connections = 5000
enable_client_messages = true

[[apps]]
id = "app-b"
key = "key-b"
secret = "secret-b"
subscription_count_events = true
"#;

    fn refusal(text: &str) -> (usize, String) {
        Apps::parse(text).expect_err("refused")
    }

    #[test]
    fn the_issues_example_reads_with_defaults_for_what_it_leaves_out() {
        let apps = Apps::parse(TWO_APPS).unwrap();
        let a = apps.by_key("key-a").unwrap();
        let expected = App { id: "app-a".into(), key: "key-a".into(), secret: "secret-a".into(), subscription_count_events: false };
        assert_eq!(a.app, expected);
        assert_eq!(a.limits.max_connections, Some(5000));
        assert!(a.enabled);
        let b = apps.by_id("app-b").unwrap();
        assert!(b.app.subscription_count_events);
        assert_eq!(b.limits, Limits::default());
        assert_eq!((b.limits.max_event_payload_kb, b.limits.max_event_batch_size, b.limits.max_channel_name_length), (10, 10, 200));
        assert!(apps.by_key("app-a").is_none() && apps.by_id("key-b").is_none(), "keys and ids are apart");
        assert_eq!(apps.iter().count(), 2);
    }

    #[test]
    fn a_bad_file_is_refused_with_its_line_and_the_reason() {
        let duplicate_key = format!("{TWO_APPS}\n[[apps]]\nid = \"app-c\"\nkey = \"key-a\"\nsecret = \"s\"\n");
        let (line, reason) = refusal(&duplicate_key);
        assert_eq!(line, 17, "{reason}");
        assert!(reason.contains("\"key-a\"") && reason.contains("line 2"), "{reason}");

        let unknown = "[[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"s\"\nmax_conections = 5\n";
        let (line, reason) = refusal(unknown);
        assert_eq!(line, 1, "the table with the unknown field: {reason}");
        assert!(reason.contains("max_conections"), "{reason}");

        let wrong_type = "[[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"s\"\nmax_connections = \"many\"\n";
        let (line, reason) = refusal(wrong_type);
        assert!((1..=5).contains(&line), "{line}: {reason}");
        assert!(reason.contains("invalid type") || reason.contains("expected"), "{reason}");

        let (line, reason) = refusal("[[apps]]\nid = \"a\"\nkey = \"k\"\n");
        assert_eq!(line, 1);
        assert!(reason.contains("secret"), "{reason}");

        let (line, reason) = refusal("[[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"  \"\n");
        assert_eq!(line, 4);
        assert!(reason.contains("secret is empty"), "{reason}");

        let (line, reason) = refusal("[[apps]\n");
        assert_eq!(line, 1, "{reason}");
        assert!(refusal("").1.contains("no apps"));
        assert!(refusal("[[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"s\"\nmax_event_batch_size = 0\n")
            .1
            .contains("max_event_batch_size"));
    }

    #[test]
    fn webhooks_are_checked_and_keep_their_filter() {
        let file = r#"
[[apps]]
id = "a"
key = "k"
secret = "s"

[[apps.webhooks]]
url = "http://127.0.0.1:9000/hooks"
event_types = ["channel_occupied", "member_added"]
filter = { channel_name_starts_with = "presence-" }
"#;
        let apps = Apps::parse(file).unwrap();
        let hook = &apps.by_id("a").unwrap().webhooks[0];
        assert_eq!(hook.event_types, ["channel_occupied", "member_added"]);
        assert_eq!(hook.channel_prefix.as_deref(), Some("presence-"));

        let (line, reason) = refusal(&file.replace("member_added", "member_joined"));
        assert_eq!(line, 7, "{reason}");
        assert!(reason.contains("member_joined"), "{reason}");
        let (line, reason) = refusal(&file.replace("http://127.0.0.1", "https://127.0.0.1"));
        assert_eq!(line, 7, "{reason}");
        assert!(reason.contains("http://"), "{reason}");
    }

    #[test]
    fn origins_match_as_browsers_send_them() {
        let limits = |patterns: &[&str]| Limits { allowed_origins: patterns.iter().map(|p| p.to_string()).collect(), ..Limits::default() };
        assert!(limits(&[]).allows_origin(Some("https://evil.test")), "no list: any origin");
        let only = limits(&["*.example.com", "https://app.test", "localhost"]);
        assert!(only.allows_origin(None), "not a browser");
        assert!(only.allows_origin(Some("https://chat.example.com")));
        assert!(only.allows_origin(Some("https://a.b.EXAMPLE.com:8443")));
        assert!(!only.allows_origin(Some("https://example.com")), "a subdomain pattern");
        assert!(!only.allows_origin(Some("https://badexample.com")));
        assert!(only.allows_origin(Some("https://app.test")));
        assert!(!only.allows_origin(Some("http://app.test")), "a whole origin includes its scheme");
        assert!(only.allows_origin(Some("http://localhost:3000")), "a host, any scheme and port");
        assert!(limits(&["*"]).allows_origin(Some("null")));
    }
}
