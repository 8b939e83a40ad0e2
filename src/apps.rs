//! The apps a node serves and what each may use: read from `FLUX_APPS_FILE` (TOML, the names
//! soketi and Sockudo users know), or one app from the `FLUX_APP_*` settings.
//!
//! Plain data, no I/O beyond reading the file: a file is parsed and checked whole before any of
//! it is used, so a bad one (at start, or on a reload) is refused with its line and the reason
//! and never half-applied. Limits a file leaves out take Pusher's defaults.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use serde::Deserialize;
use toml::Spanned;

use crate::config::Config;
use crate::pusher::rate::RateLimit;
use crate::pusher::{App, AppIndex};
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

impl AppConfig {
    /// The app of the `FLUX_APP_*` settings, with the node's older settings for what they
    /// covered (client events on, as Flux always had them; `FLUX_WEBHOOK_URL` gets every
    /// webhook event).
    pub fn from_settings(config: &Config) -> Self {
        AppConfig {
            app: App::from_args(&config.app),
            enabled: true,
            limits: Limits {
                enable_client_messages: true,
                max_client_events_per_sec: config.client_events_per_sec,
                max_presence_members_per_channel: config.presence_max_members,
                max_event_payload_kb: u32::try_from(config.max_payload.div_ceil(1024)).unwrap_or(u32::MAX),
                ..Limits::default()
            },
            webhooks: config
                .webhook_url
                .iter()
                .map(|url| AppWebhook {
                    url: url.clone(),
                    event_types: WEBHOOK_EVENT_TYPES.iter().map(|t| t.to_string()).collect(),
                    channel_prefix: None,
                })
                .collect(),
        }
    }

    /// Largest event data, in bytes.
    pub fn max_payload(&self) -> usize {
        self.limits.max_event_payload_kb as usize * 1024
    }
}

impl AppWebhook {
    /// Whether this webhook wants `event_type` for `channel`.
    pub fn wants(&self, event_type: &str, channel: &str) -> bool {
        self.event_types.iter().any(|t| t == event_type) && self.channel_prefix.as_deref().is_none_or(|p| channel.starts_with(p))
    }
}

crate::metrics::counters! {
    /// One app's live counters on this node, shared by every worker (each adds once per
    /// connection, message or broadcast, never per recipient).
    AppCells,
    /// A copy of one app's counters.
    AppCounters {
        /// WebSocket connections open now on this node (a gauge).
        connections,
        /// Its connections on the other nodes of the cluster, as of their last heartbeats (a
        /// gauge, written by the cluster thread).
        connections_elsewhere,
        /// Messages received from its clients.
        messages_in,
        /// Events published (REST, client events and the node's own announcements).
        broadcasts,
        /// Frames queued to its subscribers.
        deliveries,
        /// Clients refused for its `max_connections`.
        over_quota,
        /// REST calls refused for its per-second limits (429).
        rate_limited,
    }
}

/// One app's figures, for the dashboard and `/metrics`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppStatus {
    /// Its id.
    pub id: String,
    /// Whether it serves (a disabled app keeps its figures until removed).
    pub enabled: bool,
    /// Its counters since start (`connections`: open now).
    #[serde(flatten)]
    pub counters: AppCounters,
}

/// One WebSocket connection of an app: counted in the app's `connections` while it lives, so
/// every way a connection ends (closed, evicted, a failed upgrade) counts it out.
#[derive(Debug)]
pub struct Connected(Arc<AppCells>);

impl Connected {
    /// Counts a connection in.
    pub fn new(cells: &Arc<AppCells>) -> Self {
        cells.connections.fetch_add(1, Ordering::Relaxed);
        Connected(cells.clone())
    }

    /// The app's counters.
    pub fn cells(&self) -> &AppCells {
        &self.0
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The REST rate limits of one app on this node, shared by every worker.
#[derive(Debug)]
pub struct AppRates {
    /// Events published through REST (`max_backend_events_per_sec`).
    pub backend_events: RateLimit,
    /// REST reads (`max_read_requests_per_sec`).
    pub read_requests: RateLimit,
}

impl Default for AppRates {
    fn default() -> Self {
        let now = Instant::now();
        AppRates { backend_events: RateLimit::new(now), read_requests: RateLimit::new(now) }
    }
}

/// An app's place in the table: its settings (replaced on reload), its counters and its rate
/// limits' state (kept).
#[derive(Debug, Clone)]
struct Slot {
    config: Arc<AppConfig>,
    cells: Arc<AppCells>,
    rates: Arc<AppRates>,
}

/// The apps of a node, found by key (WebSocket clients), by id (REST calls) or by index
/// (channels and connections). An app keeps its index and its counters through reloads, and an
/// index is never given to another app: a removed app's slot stays empty.
#[derive(Debug, Clone, Default)]
pub struct Apps {
    slots: Vec<Option<Slot>>,
    by_key: HashMap<String, AppIndex>,
    by_id: HashMap<String, AppIndex>,
}

/// The node's apps, swapped whole on reload and read by every worker without a lock.
pub type SharedApps = Arc<arc_swap::ArcSwap<Apps>>;

impl Apps {
    /// `apps` numbered after `previous`: an app with an id `previous` had keeps its index, a
    /// new one takes the next unused. Ids and keys must be unique (a file is checked for it).
    fn numbered(apps: Vec<AppConfig>, previous: Option<&Apps>) -> Self {
        let mut slots: Vec<Option<Slot>> = previous.map_or_else(Vec::new, |p| vec![None; p.slots.len()]);
        let (mut by_key, mut by_id) = (HashMap::new(), HashMap::new());
        for app in apps {
            let kept = previous.and_then(|p| p.by_id(&app.app.id).and_then(|(index, _)| Some((index, p.slot(index)?.clone()))));
            let (index, cells, rates) = match kept {
                Some((index, slot)) => (index, slot.cells, slot.rates),
                None => {
                    slots.push(None);
                    (AppIndex((slots.len() - 1) as u32), Arc::default(), Arc::default())
                }
            };
            by_key.insert(app.app.key.clone(), index);
            by_id.insert(app.app.id.clone(), index);
            slots[index.0 as usize] = Some(Slot { config: Arc::new(app), cells, rates });
        }
        Apps { slots, by_key, by_id }
    }

    /// These apps, numbered in order (ids and keys unique, as a file is checked for).
    pub fn new(apps: Vec<AppConfig>) -> Self {
        Apps::numbered(apps, None)
    }

    /// Reads and checks an apps file; apps `previous` had keep their indices. No app may allow
    /// events larger than the node reads (`max_payload` bytes).
    pub fn load(path: &Path, max_payload: usize, previous: Option<&Apps>) -> Result<Apps, AppsError> {
        let text = std::fs::read_to_string(path).map_err(|source| AppsError::Read { path: path.to_owned(), source })?;
        let apps = Apps::parse(&text, max_payload).map_err(|(line, reason)| AppsError::Invalid { path: path.to_owned(), line, reason })?;
        Ok(Apps::numbered(apps, previous))
    }

    /// Parses and checks an apps file's text; on error, the line and the reason.
    fn parse(text: &str, max_payload: usize) -> Result<Vec<AppConfig>, (usize, String)> {
        let line_of = |offset: usize| text[..offset.min(text.len())].bytes().filter(|&b| b == b'\n').count() + 1;
        let file: FileModel = toml::from_str(text)
            .map_err(|e| {
                let span = e.span().unwrap_or_default();
                (setting_at_fault(text, span.start).unwrap_or(span.start), e.message().to_owned())
            })
            .map_err(|(offset, reason)| (line_of(offset), reason))?;
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
            check_limits(&entry.limits, max_payload).map_err(|reason| (line, reason))?;
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
        Ok(apps)
    }

    /// The app with this index, unless it was removed.
    pub fn get(&self, index: AppIndex) -> Option<&Arc<AppConfig>> {
        self.slot(index).map(|slot| &slot.config)
    }

    /// The counters of the app with this index, unless it was removed.
    pub fn cells(&self, index: AppIndex) -> Option<&Arc<AppCells>> {
        self.slot(index).map(|slot| &slot.cells)
    }

    /// The REST rate limits of the app with this index, unless it was removed.
    pub fn rates(&self, index: AppIndex) -> Option<&Arc<AppRates>> {
        self.slot(index).map(|slot| &slot.rates)
    }

    fn slot(&self, index: AppIndex) -> Option<&Slot> {
        self.slots.get(index.0 as usize).and_then(Option::as_ref)
    }

    /// The app clients connect to with `key`.
    pub fn by_key(&self, key: &str) -> Option<(AppIndex, &Arc<AppConfig>)> {
        let &index = self.by_key.get(key)?;
        Some((index, self.get(index)?))
    }

    /// The app REST calls name by `id`.
    pub fn by_id(&self, id: &str) -> Option<(AppIndex, &Arc<AppConfig>)> {
        let &index = self.by_id.get(id)?;
        Some((index, self.get(index)?))
    }

    /// Every app, by index.
    pub fn iter(&self) -> impl Iterator<Item = (AppIndex, &Arc<AppConfig>)> {
        self.slots.iter().enumerate().filter_map(|(i, slot)| Some((AppIndex(i as u32), &slot.as_ref()?.config)))
    }

    /// Every app's figures, in index order.
    pub fn status(&self) -> Vec<AppStatus> {
        self.slots
            .iter()
            .flatten()
            .map(|slot| AppStatus { id: slot.config.app.id.clone(), enabled: slot.config.enabled, counters: slot.cells.snapshot() })
            .collect()
    }

    /// Whether the app with this index may serve (it exists and is enabled).
    pub fn serves(&self, index: AppIndex) -> bool {
        self.get(index).is_some_and(|app| app.enabled)
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

/// Where in `text` the setting is that made the `[[apps]]` table at `table_start` fail. Errors
/// in the limits come through serde's `flatten`, which keeps only the table's span; so each
/// limit of that table is read again alone, and the first one refused is the one at fault.
fn setting_at_fault(text: &str, table_start: usize) -> Option<usize> {
    #[derive(Deserialize)]
    struct RawFile {
        #[serde(default)]
        apps: Vec<Spanned<toml::map::Map<String, toml::Value>>>,
    }
    #[derive(Deserialize)]
    struct RawSettings(std::collections::BTreeMap<Spanned<String>, toml::Value>);
    let raw: RawFile = toml::from_str(text).ok()?;
    let table = raw.apps.into_iter().find(|t| t.span().start == table_start)?;
    let keyed: RawSettings = toml::from_str(&text[table.span()].replacen("[[apps]]", "", 1)).ok()?;
    let offset = table.span().start + "[[apps]]".len();
    keyed.0.into_iter().find_map(|(key, value)| {
        const NOT_LIMITS: [&str; 6] = ["id", "key", "secret", "enabled", "subscription_count_events", "webhooks"];
        if NOT_LIMITS.contains(&key.get_ref().as_str()) {
            return None;
        }
        let alone = toml::Value::Table([(key.get_ref().clone(), value)].into_iter().collect());
        Limits::deserialize(alone).is_err().then(|| offset + key.span().start)
    })
}

/// Limits that would make an app unusable are refused.
fn check_limits(limits: &Limits, max_payload: usize) -> Result<(), String> {
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
    if limits.max_event_payload_kb as usize * 1024 > max_payload {
        return Err(format!(
            "max_event_payload_kb = {} is more than the node reads ({max_payload} bytes); raise FLUX_MAX_PAYLOAD",
            limits.max_event_payload_kb
        ));
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

    const MAX_PAYLOAD: usize = 10 * 1024;

    fn refusal(text: &str) -> (usize, String) {
        Apps::parse(text, MAX_PAYLOAD).expect_err("refused")
    }

    fn read(text: &str) -> Apps {
        Apps::numbered(Apps::parse(text, MAX_PAYLOAD).expect("reads"), None)
    }

    #[test]
    fn the_issues_example_reads_with_defaults_for_what_it_leaves_out() {
        let apps = read(TWO_APPS);
        let (index, a) = apps.by_key("key-a").unwrap();
        assert_eq!(index, AppIndex(0));
        let expected = App { id: "app-a".into(), key: "key-a".into(), secret: "secret-a".into(), subscription_count_events: false };
        assert_eq!(a.app, expected);
        assert_eq!(a.limits.max_connections, Some(5000));
        assert!(a.enabled);
        let (_, b) = apps.by_id("app-b").unwrap();
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
        assert_eq!(line, 5, "the unknown field's own line: {reason}");
        assert!(reason.contains("max_conections"), "{reason}");

        let wrong_type = "[[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"s\"\nmax_connections = \"many\"\n";
        let (line, reason) = refusal(wrong_type);
        assert_eq!(line, 5, "{reason}");
        let second_app = format!("{TWO_APPS}max_event_batch_size = []\n");
        assert_eq!(refusal(&second_app).0, 14, "a wrong type in the second app: its own line");
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
        assert!(refusal("[[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"s\"\nmax_event_payload_kb = 11\n").1.contains("FLUX_MAX_PAYLOAD"));
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
        let apps = read(file);
        let hook = &apps.by_id("a").unwrap().1.webhooks[0];
        assert!(hook.wants("member_added", "presence-room") && !hook.wants("member_added", "private-room"));
        assert!(!hook.wants("client_event", "presence-room"));
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
    fn apps_keep_their_index_through_a_reload_and_a_removed_ones_is_not_reused() {
        let before = read(TWO_APPS);
        let without_a = TWO_APPS.split("[[apps]]").nth(2).map(|b| format!("[[apps]]{b}")).unwrap();
        let with_c = format!("{without_a}\n[[apps]]\nid = \"app-c\"\nkey = \"key-c\"\nsecret = \"secret-c\"\nenabled = false\n");
        let after = Apps::numbered(Apps::parse(&with_c, MAX_PAYLOAD).unwrap(), Some(&before));
        assert_eq!(after.by_id("app-b").map(|(i, _)| i), before.by_id("app-b").map(|(i, _)| i));
        assert_eq!(after.by_key("key-c").map(|(i, _)| i), Some(AppIndex(2)), "a new app takes a new index");
        assert!(after.get(AppIndex(0)).is_none() && after.by_key("key-a").is_none(), "app-a was removed");
        assert!(after.serves(AppIndex(1)) && !after.serves(AppIndex(2)) && !after.serves(AppIndex(0)));
        assert_eq!(after.iter().map(|(i, _)| i).collect::<Vec<_>>(), [AppIndex(1), AppIndex(2)]);
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
