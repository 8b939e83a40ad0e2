//! The Pusher Channels HTTP API (sans-IO): a signed request in, a response and the events to
//! publish out. The gateway publishes them through its one fan-out seam.
//!
//! Routes: `POST /apps/{id}/events`, `POST /apps/{id}/batch_events`, `GET /apps/{id}/channels`,
//! `GET /apps/{id}/channels/{name}`. Errors answer `{"error": "..."}` with Pusher's statuses:
//! 400 malformed, 401 signature, 403 disabled app, 404 unknown app or route, 405 method, 413 too
//! large, 429 over the app's per-second limits (counted only once a call is signed). Each app's limits (`max_event_channels_at_once`, `max_event_batch_size`, ...) apply to
//! its calls, and a call signed for one app reaches only that app's channels.
//!
//! A publish borrows its event name and data from the request's body wherever JSON escapes do
//! not have to be undone, and its channel's shared name from the directory, so a steady stream
//! of publishes to occupied channels allocates two lists per call, of the channels named and of
//! the publishes (issue 16; the signature's scratch space is the worker's [`Verifier`]).

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::presence::Membership;
use super::protocol::{
    event_data_text, validate_channel_name, validate_publish_channel, ChannelKey, ChannelKind, ChannelName, SocketId, MAX_USER_ID_LEN,
};
use super::signature::Verifier;
use super::AppIndex;
use std::time::Instant;

use super::rate::RateLimit;
use crate::apps::{AppConfig, AppRates, Apps};
use crate::fanout::directory::Directory;
use crate::http::{json_error, Request, Response};

/// What a REST call reads from the node.
pub struct RestContext<'a> {
    /// The app the call names (see [`resolve`]); it must be signed with its secret.
    pub app: &'a AppConfig,
    /// That app's index, which its channels carry.
    pub index: AppIndex,
    /// Channel occupancy (this worker's replica of the node's directory).
    pub directory: &'a Directory,
    /// Presence channels' users (this worker's replica).
    pub membership: &'a Membership,
    /// The server's clock, for `auth_timestamp`.
    pub unix_now: u64,
    /// The app's rate limits on this node, and now, to check them.
    pub rates: (&'a AppRates, Instant),
}

impl RestContext<'_> {
    /// The channel's shared name: the directory's if the node has held subscribers of it.
    fn channel(&self, name: &str) -> ChannelName {
        self.directory.name(self.key(name)).cloned().unwrap_or_else(|| ChannelName::new(self.index, name))
    }

    fn key<'n>(&self, name: &'n str) -> ChannelKey<'n> {
        ChannelKey::new(self.index, name)
    }

    fn max_channel_name(&self) -> usize {
        self.app.limits.max_channel_name_length as usize
    }

    /// Takes `n` from `limit` (a budget of `per_sec`, if the app has one): 429 when they are not
    /// all there.
    fn within(&self, limit: &RateLimit, per_sec: Option<u32>, n: usize, what: &str, setting: &str) -> Result<(), Refusal> {
        let Some(per_sec) = per_sec else { return Ok(()) };
        if limit.allow(u32::try_from(n).unwrap_or(u32::MAX), per_sec, self.rates.1) {
            return Ok(());
        }
        Err(Refusal::new(429, format!("over the app's limit of {per_sec} {what} a second ({setting})")))
    }

    /// REST publishes count against `max_backend_events_per_sec`, one per event and channel.
    fn publishing(&self, publishes: &[Publish]) -> Result<(), Refusal> {
        let per_sec = self.app.limits.max_backend_events_per_sec;
        self.within(&self.rates.0.backend_events, per_sec, publishes.len(), "events", "max_backend_events_per_sec")
    }
}

/// The app a REST call names in its path (`/apps/{id}/...`): 404 for an id no app has, 403 for
/// a disabled app.
pub fn resolve<'a>(request: &Request, apps: &'a Apps) -> Result<(AppIndex, &'a AppConfig, &'a AppRates), Response> {
    let rest = request.path.strip_prefix("/apps/").unwrap_or_default();
    let app_id = rest.split_once('/').map_or(rest, |(id, _)| id);
    match apps.by_id(app_id).and_then(|(index, app)| Some((index, app, apps.rates(index)?))) {
        None => Err(json_error(404, &format!("unknown app id {:?}", truncated(app_id)))),
        Some((_, app, _)) if !app.enabled => Err(json_error(403, &format!("app {:?} is disabled", truncated(app_id)))),
        Some((index, app, rates)) => Ok((index, app, rates)),
    }
}

/// One event for one channel, to be published; its strings may be borrowed from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish<'a> {
    /// The channel.
    pub channel: ChannelName,
    /// The event name.
    pub event: Cow<'a, str>,
    /// The event data, as the string clients receive.
    pub data: Cow<'a, str>,
    /// The connection excluded from delivery (the `socket_id` of the call).
    pub except: Option<SocketId>,
    /// The sending member, for client events on presence channels.
    pub user_id: Option<String>,
}

/// The answer to a REST call.
#[derive(Debug)]
pub struct RestOutcome<'a> {
    /// The HTTP response.
    pub response: Response,
    /// Events to publish, in order. Empty unless the call succeeded.
    pub publishes: Vec<Publish<'a>>,
    /// A user whose connections, on every worker, must be closed.
    pub terminate_user: Option<String>,
}

impl RestOutcome<'_> {
    fn respond(response: Response) -> Self {
        RestOutcome { response, publishes: Vec::new(), terminate_user: None }
    }
}

/// Whether `path` belongs to the REST API.
pub fn is_rest_path(path: &str) -> bool {
    path.starts_with("/apps/")
}

/// A REST call refused, with its status and message.
struct Refusal(u16, String);

impl Refusal {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Refusal(status, message.into())
    }
}

enum Route<'p> {
    Events,
    BatchEvents,
    Channels,
    Channel(&'p str),
    Users(&'p str),
    TerminateUser(&'p str),
}

/// Answers one REST call; `verifier` is the worker's scratch space for its signature.
pub fn handle<'r>(request: &'r Request, context: &RestContext<'_>, verifier: &mut Verifier) -> RestOutcome<'r> {
    match route_and_handle(request, context, verifier) {
        Ok(outcome) => outcome,
        Err(Refusal(status, message)) => RestOutcome::respond(json_error(status, &message)),
    }
}

fn route_and_handle<'r>(request: &'r Request, context: &RestContext<'_>, verifier: &mut Verifier) -> Result<RestOutcome<'r>, Refusal> {
    // The app id was resolved already (see `resolve`).
    let rest = request.path.strip_prefix("/apps/").ok_or_else(|| Refusal::new(404, "not found"))?;
    let resource = rest.split_once('/').map_or("", |(_, resource)| resource);
    let (route, method) = match resource.split_once('/') {
        None if resource == "events" => (Route::Events, "POST"),
        None if resource == "batch_events" => (Route::BatchEvents, "POST"),
        None if resource == "channels" => (Route::Channels, "GET"),
        Some(("channels", name)) if !name.is_empty() && !name.contains('/') => (Route::Channel(name), "GET"),
        Some(("channels", path)) => match path.split_once('/') {
            Some((name, "users")) if !name.is_empty() => (Route::Users(name), "GET"),
            _ => return Err(Refusal::new(404, format!("no such API endpoint: {}", request.path))),
        },
        Some(("users", user)) => match user.split_once('/') {
            Some((id, "terminate_connections")) if !id.is_empty() => (Route::TerminateUser(id), "POST"),
            _ => return Err(Refusal::new(404, format!("no such API endpoint: {}", request.path))),
        },
        _ => return Err(Refusal::new(404, format!("no such API endpoint: {}", request.path))),
    };
    verifier
        .verify(&context.app.app, &request.method, &request.path, &request.query, &request.body, context.unix_now)
        .map_err(|e| Refusal::new(401, e.to_string()))?;
    if request.method != method {
        return Err(Refusal::new(405, format!("{} expects {method}", request.path)));
    }
    if method == "GET" {
        let per_sec = context.app.limits.max_read_requests_per_sec;
        context.within(&context.rates.0.read_requests, per_sec, 1, "read requests", "max_read_requests_per_sec")?;
    }
    match route {
        Route::Events => events(request, context),
        Route::BatchEvents => batch_events(request, context),
        Route::Channels => channels(request, context).map(RestOutcome::respond),
        Route::Channel(name) => channel(request, name, context).map(RestOutcome::respond),
        Route::Users(name) => users(name, context).map(RestOutcome::respond),
        Route::TerminateUser(id) => {
            let id = percent_encoding::percent_decode_str(id)
                .decode_utf8()
                .ok()
                .map(|id| id.into_owned())
                .filter(|id| id.len() <= MAX_USER_ID_LEN)
                .ok_or_else(|| Refusal::new(400, format!("user ids are at most {MAX_USER_ID_LEN} characters")))?;
            Ok(RestOutcome { terminate_user: Some(id), ..RestOutcome::respond(Response::json(200, "{}")) })
        }
    }
}

/// A JSON string of the body: borrowed from it unless escapes had to be undone. (serde's own
/// `Cow<str>` borrows only as a field of its own, never inside an `Option` or a `Vec`.)
#[derive(Debug)]
struct Text<'a>(Cow<'a, str>);

impl std::ops::Deref for Text<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct TextVisitor;

        impl<'de> serde::de::Visitor<'de> for TextVisitor {
            type Value = Text<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }

            fn visit_borrowed_str<E: serde::de::Error>(self, text: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(text)))
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(text.to_owned())))
            }

            fn visit_string<E: serde::de::Error>(self, text: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(text)))
            }
        }

        deserializer.deserialize_str(TextVisitor)
    }
}

/// The body of `POST /events`.
#[derive(Deserialize)]
struct EventsBody<'a> {
    #[serde(borrow)]
    name: Text<'a>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default, borrow)]
    channels: Option<Vec<Text<'a>>>,
    #[serde(default, borrow)]
    channel: Option<Text<'a>>,
    #[serde(default, borrow)]
    socket_id: Option<Text<'a>>,
    #[serde(default, borrow)]
    info: Option<Text<'a>>,
}

/// One event of `POST /batch_events`.
#[derive(Deserialize)]
struct BatchEvent<'a> {
    #[serde(borrow)]
    name: Text<'a>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(borrow)]
    channel: Text<'a>,
    #[serde(default, borrow)]
    socket_id: Option<Text<'a>>,
    #[serde(default, borrow)]
    info: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    batch: Vec<BatchEvent<'a>>,
}

fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| Refusal::new(400, format!("malformed JSON body: {e}")))
}

fn events<'r>(request: &'r Request, context: &RestContext<'_>) -> Result<RestOutcome<'r>, Refusal> {
    let body: EventsBody = parse_body(&request.body)?;
    let channels = match (body.channels, body.channel) {
        (Some(channels), None) => channels,
        (None, Some(channel)) => vec![channel],
        (Some(_), Some(_)) => return Err(Refusal::new(400, "give either channels or channel, not both")),
        (None, None) => return Err(Refusal::new(400, "missing channels")),
    };
    if channels.is_empty() {
        return Err(Refusal::new(400, "channels is empty"));
    }
    let most = context.app.limits.max_event_channels_at_once as usize;
    if channels.len() > most {
        return Err(Refusal::new(413, format!("an event may go to at most {most} channels (max_event_channels_at_once)")));
    }
    let event = checked_event(&body.name, body.data, context.app)?;
    let except = parse_socket_id(body.socket_id.as_deref())?;
    let info = Info::parse(body.info.as_deref())?;
    let mut publishes = Vec::with_capacity(channels.len());
    for channel in &channels {
        validate_publish_channel(channel, context.max_channel_name())
            .map_err(|e| Refusal::new(400, format!("{e}: {:?}", truncated(channel))))?;
        publishes.push(Publish {
            channel: context.channel(channel),
            event: body.name.0.clone(),
            data: event.clone(),
            except,
            user_id: None,
        });
    }
    let response = if info.is_empty() {
        Response::json(200, "{}")
    } else {
        let attributes: Map<String, Value> =
            channels.iter().map(|c| Ok((c.to_string(), info.attributes(c, context)?))).collect::<Result<_, Refusal>>()?;
        Response::json(200, json!({ "channels": attributes }).to_string())
    };
    context.publishing(&publishes)?;
    Ok(RestOutcome { response, publishes, terminate_user: None })
}

fn batch_events<'r>(request: &'r Request, context: &RestContext<'_>) -> Result<RestOutcome<'r>, Refusal> {
    let body: BatchBody = parse_body(&request.body)?;
    if body.batch.is_empty() {
        return Err(Refusal::new(400, "batch is empty"));
    }
    let most = context.app.limits.max_event_batch_size as usize;
    if body.batch.len() > most {
        return Err(Refusal::new(413, format!("a batch may hold at most {most} events (max_event_batch_size)")));
    }
    let mut publishes = Vec::with_capacity(body.batch.len());
    let mut attributes = Vec::with_capacity(body.batch.len());
    let mut any_info = false;
    for item in &body.batch {
        validate_publish_channel(&item.channel, context.max_channel_name())
            .map_err(|e| Refusal::new(400, format!("{e}: {:?}", truncated(&item.channel))))?;
        let data = checked_event(&item.name, item.data, context.app)?;
        let except = parse_socket_id(item.socket_id.as_deref())?;
        let info = Info::parse(item.info.as_deref())?;
        any_info |= !info.is_empty();
        attributes.push(info.attributes(&item.channel, context)?);
        publishes.push(Publish { channel: context.channel(&item.channel), event: item.name.0.clone(), data, except, user_id: None });
    }
    let response = if any_info { Response::json(200, json!({ "batch": attributes }).to_string()) } else { Response::json(200, "{}") };
    context.publishing(&publishes)?;
    Ok(RestOutcome { response, publishes, terminate_user: None })
}

/// Checks an event's name and size, and returns its data as the string clients receive
/// ([`event_data_text`]).
fn checked_event<'a>(name: &str, data: &'a RawValue, app: &AppConfig) -> Result<Cow<'a, str>, Refusal> {
    if name.is_empty() {
        return Err(Refusal::new(400, "event name is empty"));
    }
    let most = app.limits.max_event_name_length as usize;
    if name.len() > most {
        return Err(Refusal::new(413, format!("event name is longer than {most} characters (max_event_name_length)")));
    }
    let max_payload = app.max_payload();
    let data = event_data_text(data);
    if data.len() > max_payload {
        return Err(Refusal::new(413, format!("event data is {} bytes, more than the {max_payload}-byte limit", data.len())));
    }
    Ok(data)
}

fn parse_socket_id(socket_id: Option<&str>) -> Result<Option<SocketId>, Refusal> {
    socket_id.map(|s| s.parse().map_err(|e: super::protocol::InvalidSocketId| Refusal::new(400, e.to_string()))).transpose()
}

fn truncated(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The channel attributes a call asked for with `info`.
#[derive(Default)]
struct Info {
    subscription_count: bool,
    user_count: bool,
}

impl Info {
    fn parse(info: Option<&str>) -> Result<Self, Refusal> {
        let mut parsed = Info::default();
        for attribute in info.unwrap_or("").split(',').map(str::trim).filter(|a| !a.is_empty()) {
            match attribute {
                "subscription_count" => parsed.subscription_count = true,
                "user_count" => parsed.user_count = true,
                other => return Err(Refusal::new(400, format!("unknown info attribute {:?}", truncated(other)))),
            }
        }
        Ok(parsed)
    }

    fn is_empty(&self) -> bool {
        !self.subscription_count && !self.user_count
    }

    fn attributes(&self, channel: &str, context: &RestContext<'_>) -> Result<Value, Refusal> {
        let mut attributes = Map::new();
        if self.user_count {
            if ChannelKind::of(channel) != ChannelKind::Presence {
                return Err(Refusal::new(400, "user_count is only available for presence channels"));
            }
            attributes.insert("user_count".into(), context.membership.user_count(context.key(channel)).into());
        }
        if self.subscription_count {
            attributes.insert("subscription_count".into(), context.directory.subscription_count(context.key(channel)).into());
        }
        Ok(Value::Object(attributes))
    }
}

fn channels(request: &Request, context: &RestContext<'_>) -> Result<Response, Refusal> {
    let prefix = request.query_param("filter_by_prefix").unwrap_or_default();
    let info = Info::parse(request.query_param("info").as_deref())?;
    if info.user_count && !prefix.starts_with("presence-") {
        return Err(Refusal::new(400, "info=user_count needs filter_by_prefix=presence-"));
    }
    let mut listed = Map::new();
    let mut names: Vec<(&str, u32)> = context.directory.channels(context.index).filter(|(name, _)| name.starts_with(&prefix)).collect();
    names.sort_unstable();
    for (name, _) in names {
        listed.insert(name.to_owned(), info.attributes(name, context)?);
    }
    Ok(Response::json(200, json!({ "channels": listed }).to_string()))
}

fn channel(request: &Request, name: &str, context: &RestContext<'_>) -> Result<Response, Refusal> {
    validate_channel_name(name, context.max_channel_name()).map_err(|e| Refusal::new(400, format!("{e}: {:?}", truncated(name))))?;
    let info = Info::parse(request.query_param("info").as_deref())?;
    let count = context.directory.subscription_count(context.key(name));
    let mut attributes = match info.attributes(name, context)? {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    attributes.insert("occupied".into(), (count > 0).into());
    Ok(Response::json(200, Value::Object(attributes).to_string()))
}

fn users(name: &str, context: &RestContext<'_>) -> Result<Response, Refusal> {
    validate_channel_name(name, context.max_channel_name()).map_err(|e| Refusal::new(400, format!("{e}: {:?}", truncated(name))))?;
    if ChannelKind::of(name) != ChannelKind::Presence {
        return Err(Refusal::new(400, "users are only listed for presence channels"));
    }
    let users: Vec<Value> = context.membership.users(context.key(name)).map(|id| json!({ "id": id })).collect();
    Ok(Response::json(200, json!({ "users": users }).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::directory::Occupancy;
    use crate::fanout::WorkerId;
    use crate::pusher::signature::sign_query;
    use crate::pusher::App;
    use std::time::Duration;

    const NOW: u64 = 1_700_000_000;

    const APP: AppIndex = AppIndex(0);
    const OTHER: AppIndex = AppIndex(1);

    /// The default app (index 0), and "other" (index 1) with tighter limits, and "off",
    /// disabled.
    fn apps() -> Apps {
        let default = AppConfig::from_settings(&crate::config::Config::default());
        let mut other = default.clone();
        other.app = App { id: "other".into(), key: "other-key".into(), secret: "other-secret".into(), subscription_count_events: false };
        (other.limits.max_event_channels_at_once, other.limits.max_event_batch_size, other.limits.max_event_name_length) = (2, 2, 5);
        let mut off = default.clone();
        off.app = App { id: "off".into(), key: "off-key".into(), secret: "off-secret".into(), subscription_count_events: false };
        off.enabled = false;
        Apps::new(vec![default, other, off])
    }

    fn signer(app_id: &str) -> App {
        apps().by_id(app_id).expect("an app of the tests").1.app.clone()
    }

    fn directory() -> Directory {
        let mut directory = Directory::new(2);
        let counts = [(0, APP, "news", 2), (1, APP, "news", 3), (1, APP, "presence-x", 1), (0, APP, "sports", 1), (0, OTHER, "news", 9)];
        for (worker, app, channel, count) in counts {
            directory.apply(&Occupancy { worker: WorkerId(worker), channel: ChannelName::new(app, channel), count });
        }
        directory
    }

    fn call(method: &str, path: &str, body: &str, params: &[(&str, &str)]) -> RestOutcome<'static> {
        call_as("app-id", method, path, body, params)
    }

    /// A call signed with the secret of app `signer_id`.
    fn call_as(signer_id: &str, method: &str, path: &str, body: &str, params: &[(&str, &str)]) -> RestOutcome<'static> {
        let query = sign_query(&signer(signer_id), method, path, body.as_bytes(), params, NOW);
        call_with_query(method, path, body, &query)
    }

    fn call_with_query(method: &str, path: &str, body: &str, query: &str) -> RestOutcome<'static> {
        let request = Request {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            close: false,
        };
        let apps = apps();
        let directory = directory();
        let mut membership = Membership::default();
        for user in ["u1", "u2"] {
            membership.apply(&ChannelName::new(APP, "presence-x"), user, true);
        }
        owned(call_apps(&apps, &request, &directory, &membership, Instant::now()))
    }

    /// The outcome without its borrows of the request.
    fn owned(outcome: RestOutcome<'_>) -> RestOutcome<'static> {
        let own = |text: Cow<'_, str>| Cow::Owned(text.into_owned());
        let publishes = outcome
            .publishes
            .into_iter()
            .map(|p| Publish { channel: p.channel, event: own(p.event), data: own(p.data), except: p.except, user_id: p.user_id })
            .collect();
        RestOutcome { response: outcome.response, publishes, terminate_user: outcome.terminate_user }
    }

    fn call_apps<'r>(apps: &Apps, request: &'r Request, directory: &Directory, membership: &Membership, now: Instant) -> RestOutcome<'r> {
        match resolve(request, apps) {
            Ok((index, app, rates)) => {
                let context = RestContext { app, index, directory, membership, unix_now: NOW, rates: (rates, now) };
                handle(request, &context, &mut Verifier::default())
            }
            Err(response) => RestOutcome::respond(response),
        }
    }

    fn body_json(outcome: &RestOutcome) -> Value {
        serde_json::from_slice(&outcome.response.body).expect("responses are JSON")
    }

    #[test]
    fn events_publish_to_every_channel_with_the_exclusion() {
        let body = r#"{"name":"greet","channels":["a","b"],"data":"{\"x\":1}","socket_id":"12.34"}"#;
        let outcome = call("POST", "/apps/app-id/events", body, &[]);
        assert_eq!(outcome.response.status, 200);
        assert_eq!(body_json(&outcome), json!({}));
        let except = Some(SocketId { high: 12, low: 34 });
        assert_eq!(
            outcome.publishes,
            vec![
                Publish { channel: ChannelName::new(APP, "a"), event: "greet".into(), data: r#"{"x":1}"#.into(), except, user_id: None },
                Publish { channel: ChannelName::new(APP, "b"), event: "greet".into(), data: r#"{"x":1}"#.into(), except, user_id: None },
            ]
        );
    }

    #[test]
    fn events_accept_a_single_channel_and_report_info() {
        let body = r#"{"name":"e","channel":"news","data":"hi","info":"subscription_count"}"#;
        let outcome = call("POST", "/apps/app-id/events", body, &[]);
        assert_eq!(outcome.response.status, 200);
        assert_eq!(body_json(&outcome), json!({"channels": {"news": {"subscription_count": 5}}}));
        assert_eq!(outcome.publishes[0].data, "hi");
    }

    #[test]
    fn batch_events_publish_in_order() {
        let body =
            r#"{"batch":[{"name":"a","channel":"x","data":"1"},{"name":"b","channel":"news","data":"2","info":"subscription_count"}]}"#;
        let outcome = call("POST", "/apps/app-id/batch_events", body, &[]);
        assert_eq!(outcome.response.status, 200);
        assert_eq!(body_json(&outcome), json!({"batch": [{}, {"subscription_count": 5}]}));
        let events: Vec<_> = outcome.publishes.iter().map(|p| (&*p.channel, &*p.event, &*p.data)).collect();
        assert_eq!(events, vec![("x", "a", "1"), ("news", "b", "2")]);
    }

    #[test]
    fn channels_are_listed_and_filtered() {
        let outcome = call("GET", "/apps/app-id/channels", "", &[]);
        assert_eq!(body_json(&outcome), json!({"channels": {"news": {}, "presence-x": {}, "sports": {}}}));
        let outcome = call("GET", "/apps/app-id/channels", "", &[("filter_by_prefix", "new"), ("info", "subscription_count")]);
        assert_eq!(body_json(&outcome), json!({"channels": {"news": {"subscription_count": 5}}}));
    }

    #[test]
    fn one_channel_reports_occupancy() {
        let outcome = call("GET", "/apps/app-id/channels/news", "", &[("info", "subscription_count")]);
        assert_eq!(body_json(&outcome), json!({"occupied": true, "subscription_count": 5}));
        let outcome = call("GET", "/apps/app-id/channels/empty", "", &[]);
        assert_eq!(body_json(&outcome), json!({"occupied": false}));
    }

    #[test]
    fn errors_have_pushers_statuses_and_json_messages() {
        let cases: Vec<(u16, RestOutcome)> = vec![
            (
                401,
                call_with_query("GET", "/apps/app-id/channels", "", "auth_key=app-key&auth_timestamp=1&auth_version=1.0&auth_signature=00"),
            ),
            (404, call("GET", "/apps/nobody/channels", "", &[])),
            (404, call("GET", "/apps/app-id/nothing", "", &[])),
            (405, call("GET", "/apps/app-id/events", "", &[])),
            (400, call("POST", "/apps/app-id/events", "not json", &[])),
            (400, call("POST", "/apps/app-id/events", r#"{"name":"e","data":"d"}"#, &[])),
            (400, call("POST", "/apps/app-id/events", r#"{"name":"e","channels":["bad name"],"data":"d"}"#, &[])),
            (400, call("POST", "/apps/app-id/events", r#"{"name":"e","channels":["a"],"data":"d","socket_id":"x"}"#, &[])),
            (
                413,
                call(
                    "POST",
                    "/apps/app-id/events",
                    &format!(r#"{{"name":"e","channels":["a"],"data":"{}"}}"#, "x".repeat(10 * 1024 + 1)),
                    &[],
                ),
            ),
            (400, call("GET", "/apps/app-id/channels", "", &[("info", "user_count")])),
            (400, call("GET", "/apps/app-id/channels/news", "", &[("info", "bogus")])),
            (400, call("GET", "/apps/app-id/channels/news", "", &[("info", "user_count")])),
            (400, call("GET", "/apps/app-id/channels/news/users", "", &[])),
            (404, call("GET", "/apps/app-id/channels/presence-x/members", "", &[])),
            (405, call("GET", "/apps/app-id/users/u1/terminate_connections", "", &[])),
            (403, call_as("off", "GET", "/apps/off/channels", "", &[])),
        ];
        for (status, outcome) in cases {
            assert_eq!(outcome.response.status, status, "{:?}", String::from_utf8_lossy(&outcome.response.body));
            assert!(body_json(&outcome)["error"].is_string());
            assert!(outcome.publishes.is_empty());
        }
    }

    #[test]
    fn presence_users_and_user_counts_come_from_the_membership_replica() {
        let users = call("GET", "/apps/app-id/channels/presence-x/users", "", &[]);
        assert_eq!(body_json(&users), json!({"users": [{"id": "u1"}, {"id": "u2"}]}));
        let one = call("GET", "/apps/app-id/channels/presence-x", "", &[("info", "user_count,subscription_count")]);
        assert_eq!(body_json(&one), json!({"occupied": true, "user_count": 2, "subscription_count": 1}));
        let listed = call("GET", "/apps/app-id/channels", "", &[("filter_by_prefix", "presence-"), ("info", "user_count")]);
        assert_eq!(body_json(&listed), json!({"channels": {"presence-x": {"user_count": 2}}}));
        let empty = call("GET", "/apps/app-id/channels/presence-empty/users", "", &[]);
        assert_eq!(body_json(&empty), json!({"users": []}));
    }

    #[test]
    fn terminate_connections_names_the_decoded_user() {
        let outcome = call("POST", "/apps/app-id/users/user%20one/terminate_connections", "", &[]);
        assert_eq!(outcome.response.status, 200);
        assert_eq!(outcome.terminate_user.as_deref(), Some("user one"));
    }

    #[test]
    fn a_call_reaches_only_its_own_apps_channels_and_needs_its_own_secret() {
        let listed = call("GET", "/apps/app-id/channels", "", &[("info", "subscription_count")]);
        assert_eq!(body_json(&listed)["channels"]["news"], json!({"subscription_count": 5}), "not the other app's 9");
        let others = call_as("other", "GET", "/apps/other/channels", "", &[("info", "subscription_count")]);
        assert_eq!(body_json(&others), json!({"channels": {"news": {"subscription_count": 9}}}));
        let published = call_as("other", "POST", "/apps/other/events", r#"{"name":"e","channel":"news","data":"d"}"#, &[]);
        assert_eq!(published.publishes[0].channel, ChannelName::new(OTHER, "news"));
        let forged = call_as("app-id", "POST", "/apps/other/events", r#"{"name":"e","channel":"news","data":"d"}"#, &[]);
        assert_eq!(forged.response.status, 401, "signed with another app's secret");
        assert!(forged.publishes.is_empty());
    }

    #[test]
    fn each_apps_own_limits_apply_to_its_calls() {
        let three = r#"{"name":"e","channels":["a","b","c"],"data":"d"}"#;
        assert_eq!(call("POST", "/apps/app-id/events", three, &[]).response.status, 200);
        assert_eq!(call_as("other", "POST", "/apps/other/events", three, &[]).response.status, 413);
        let long_name = r#"{"name":"client","channel":"a","data":"d"}"#;
        assert_eq!(call_as("other", "POST", "/apps/other/events", long_name, &[]).response.status, 413);
        let batch = json!({"batch": (0..3).map(|_| json!({"name": "e", "channel": "c", "data": "d"})).collect::<Vec<_>>()}).to_string();
        assert_eq!(call_as("other", "POST", "/apps/other/batch_events", &batch, &[]).response.status, 413);
    }

    #[test]
    fn over_an_apps_per_second_limits_signed_calls_get_429() {
        let mut limited = AppConfig::from_settings(&crate::config::Config::default());
        (limited.limits.max_backend_events_per_sec, limited.limits.max_read_requests_per_sec) = (Some(3), Some(2));
        let apps = Apps::new(vec![limited]);
        let (directory, membership) = (directory(), Membership::default());
        let request = |method: &str, path: &str, body: &str, signer: &App| Request {
            method: method.into(),
            path: path.into(),
            query: sign_query(signer, method, path, body.as_bytes(), &[], NOW),
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            close: false,
        };
        let me = signer("app-id");
        let t0 = Instant::now();
        let status = |req: &Request, at: Instant| call_apps(&apps, req, &directory, &membership, at).response.status;
        let two = request("POST", "/apps/app-id/events", r#"{"name":"e","channels":["a","b"],"data":"d"}"#, &me);
        assert_eq!(status(&two, t0), 200);
        assert_eq!(status(&two, t0), 429, "an event to two channels is two of the three a second");
        let refused = call_apps(&apps, &two, &directory, &membership, t0);
        assert!(refused.publishes.is_empty() && body_json(&refused)["error"].as_str().unwrap().contains("max_backend_events_per_sec"));
        assert_eq!(status(&two, t0 + Duration::from_millis(700)), 200, "room again");
        let read = request("GET", "/apps/app-id/channels", "", &me);
        assert_eq!((status(&read, t0), status(&read, t0), status(&read, t0)), (200, 200, 429));
        let unsigned = request("GET", "/apps/app-id/channels", "", &App { secret: "wrong".into(), ..me.clone() });
        assert_eq!(status(&unsigned, t0 + Duration::from_secs(5)), 401);
        assert_eq!(status(&read, t0 + Duration::from_secs(5)), 200, "an unsigned call spends nothing of the budget");
        assert_eq!(status(&read, t0 + Duration::from_secs(5)), 200);
    }

    #[test]
    fn too_many_channels_or_batch_events_are_413() {
        let channels: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
        let body = json!({"name": "e", "channels": channels, "data": "d"}).to_string();
        assert_eq!(call("POST", "/apps/app-id/events", &body, &[]).response.status, 413);
        let batch: Vec<Value> = (0..11).map(|_| json!({"name": "e", "channel": "c", "data": "d"})).collect();
        let body = json!({ "batch": batch }).to_string();
        assert_eq!(call("POST", "/apps/app-id/batch_events", &body, &[]).response.status, 413);
    }
}
