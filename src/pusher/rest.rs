//! The Pusher Channels HTTP API (sans-IO): a signed request in, a response and the events to
//! publish out. The gateway publishes them through its one fan-out seam.
//!
//! Routes: `POST /apps/{id}/events`, `POST /apps/{id}/batch_events`, `GET /apps/{id}/channels`,
//! `GET /apps/{id}/channels/{name}`. Errors answer `{"error": "..."}` with Pusher's statuses:
//! 400 malformed, 401 signature, 404 unknown app or route, 405 method, 413 too large.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use super::presence::Membership;
use super::protocol::{
    event_data_text, validate_channel_name, validate_publish_channel, ChannelKind, ChannelName, SocketId, MAX_EVENT_NAME_LEN,
    MAX_USER_ID_LEN,
};
use super::signature;
use super::App;
use crate::fanout::directory::Directory;
use crate::http::{json_error, Request, Response};

/// Most channels one `events` call may name (Pusher's limit).
pub const MAX_CHANNELS_PER_EVENT: usize = 100;
/// Most events in one `batch_events` call (Pusher's limit).
pub const MAX_BATCH_EVENTS: usize = 10;

/// What a REST call reads from the node.
pub struct RestContext<'a> {
    /// The app requests must be signed for.
    pub app: &'a App,
    /// Channel occupancy (this worker's replica of the node's directory).
    pub directory: &'a Directory,
    /// Presence channels' users (this worker's replica).
    pub membership: &'a Membership,
    /// The server's clock, for `auth_timestamp`.
    pub unix_now: u64,
    /// Largest event `data`, in bytes.
    pub max_payload: usize,
}

/// One event for one channel, to be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The channel.
    pub channel: ChannelName,
    /// The event name.
    pub event: String,
    /// The event data, as the string clients receive.
    pub data: String,
    /// The connection excluded from delivery (the `socket_id` of the call).
    pub except: Option<SocketId>,
    /// The sending member, for client events on presence channels.
    pub user_id: Option<String>,
}

/// The answer to a REST call.
#[derive(Debug)]
pub struct RestOutcome {
    /// The HTTP response.
    pub response: Response,
    /// Events to publish, in order. Empty unless the call succeeded.
    pub publishes: Vec<Publish>,
    /// A user whose connections, on every worker, must be closed.
    pub terminate_user: Option<String>,
}

impl RestOutcome {
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

/// Answers one REST call.
pub fn handle(request: &Request, context: &RestContext<'_>) -> RestOutcome {
    match route_and_handle(request, context) {
        Ok(outcome) => outcome,
        Err(Refusal(status, message)) => RestOutcome::respond(json_error(status, &message)),
    }
}

fn route_and_handle(request: &Request, context: &RestContext<'_>) -> Result<RestOutcome, Refusal> {
    let rest = request.path.strip_prefix("/apps/").ok_or_else(|| Refusal::new(404, "not found"))?;
    let (app_id, resource) = rest.split_once('/').unwrap_or((rest, ""));
    if app_id != context.app.id {
        return Err(Refusal::new(404, format!("unknown app id {:?}", app_id.chars().take(64).collect::<String>())));
    }
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
    signature::verify(context.app, &request.method, &request.path, &request.query, &request.body, context.unix_now)
        .map_err(|e| Refusal::new(401, e.to_string()))?;
    if request.method != method {
        return Err(Refusal::new(405, format!("{} expects {method}", request.path)));
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

/// The body of `POST /events`.
#[derive(Deserialize)]
struct EventsBody<'a> {
    name: String,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    socket_id: Option<String>,
    #[serde(default)]
    info: Option<String>,
}

/// One event of `POST /batch_events`.
#[derive(Deserialize)]
struct BatchEvent<'a> {
    name: String,
    #[serde(borrow)]
    data: &'a RawValue,
    channel: String,
    #[serde(default)]
    socket_id: Option<String>,
    #[serde(default)]
    info: Option<String>,
}

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    batch: Vec<BatchEvent<'a>>,
}

fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| Refusal::new(400, format!("malformed JSON body: {e}")))
}

fn events(request: &Request, context: &RestContext<'_>) -> Result<RestOutcome, Refusal> {
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
    if channels.len() > MAX_CHANNELS_PER_EVENT {
        return Err(Refusal::new(413, format!("an event may go to at most {MAX_CHANNELS_PER_EVENT} channels")));
    }
    let event = checked_event(&body.name, body.data, context.max_payload)?;
    let except = parse_socket_id(body.socket_id.as_deref())?;
    let info = Info::parse(body.info.as_deref())?;
    let mut publishes = Vec::with_capacity(channels.len());
    for channel in &channels {
        validate_publish_channel(channel).map_err(|e| Refusal::new(400, format!("{e}: {:?}", truncated(channel))))?;
        publishes.push(Publish { channel: channel.as_str().into(), event: body.name.clone(), data: event.clone(), except, user_id: None });
    }
    let response = if info.is_empty() {
        Response::json(200, "{}")
    } else {
        let attributes: Map<String, Value> =
            channels.iter().map(|c| Ok((c.clone(), info.attributes(c, context)?))).collect::<Result<_, Refusal>>()?;
        Response::json(200, json!({ "channels": attributes }).to_string())
    };
    Ok(RestOutcome { response, publishes, terminate_user: None })
}

fn batch_events(request: &Request, context: &RestContext<'_>) -> Result<RestOutcome, Refusal> {
    let body: BatchBody = parse_body(&request.body)?;
    if body.batch.is_empty() {
        return Err(Refusal::new(400, "batch is empty"));
    }
    if body.batch.len() > MAX_BATCH_EVENTS {
        return Err(Refusal::new(413, format!("a batch may hold at most {MAX_BATCH_EVENTS} events")));
    }
    let mut publishes = Vec::with_capacity(body.batch.len());
    let mut attributes = Vec::with_capacity(body.batch.len());
    let mut any_info = false;
    for item in &body.batch {
        validate_publish_channel(&item.channel).map_err(|e| Refusal::new(400, format!("{e}: {:?}", truncated(&item.channel))))?;
        let data = checked_event(&item.name, item.data, context.max_payload)?;
        let except = parse_socket_id(item.socket_id.as_deref())?;
        let info = Info::parse(item.info.as_deref())?;
        any_info |= !info.is_empty();
        attributes.push(info.attributes(&item.channel, context)?);
        publishes.push(Publish { channel: item.channel.as_str().into(), event: item.name.clone(), data, except, user_id: None });
    }
    let response = if any_info { Response::json(200, json!({ "batch": attributes }).to_string()) } else { Response::json(200, "{}") };
    Ok(RestOutcome { response, publishes, terminate_user: None })
}

/// Checks an event's name and size, and returns its data as the string clients receive
/// ([`event_data_text`]).
fn checked_event(name: &str, data: &RawValue, max_payload: usize) -> Result<String, Refusal> {
    if name.is_empty() {
        return Err(Refusal::new(400, "event name is empty"));
    }
    if name.len() > MAX_EVENT_NAME_LEN {
        return Err(Refusal::new(413, format!("event name is longer than {MAX_EVENT_NAME_LEN} characters")));
    }
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
            attributes.insert("user_count".into(), context.membership.user_count(channel).into());
        }
        if self.subscription_count {
            attributes.insert("subscription_count".into(), context.directory.subscription_count(channel).into());
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
    let mut names: Vec<(&str, u32)> = context.directory.channels().filter(|(name, _)| name.starts_with(&prefix)).collect();
    names.sort_unstable();
    for (name, _) in names {
        listed.insert(name.to_owned(), info.attributes(name, context)?);
    }
    Ok(Response::json(200, json!({ "channels": listed }).to_string()))
}

fn channel(request: &Request, name: &str, context: &RestContext<'_>) -> Result<Response, Refusal> {
    validate_channel_name(name).map_err(|e| Refusal::new(400, format!("{e}: {:?}", truncated(name))))?;
    let info = Info::parse(request.query_param("info").as_deref())?;
    let count = context.directory.subscription_count(name);
    let mut attributes = match info.attributes(name, context)? {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    attributes.insert("occupied".into(), (count > 0).into());
    Ok(Response::json(200, Value::Object(attributes).to_string()))
}

fn users(name: &str, context: &RestContext<'_>) -> Result<Response, Refusal> {
    validate_channel_name(name).map_err(|e| Refusal::new(400, format!("{e}: {:?}", truncated(name))))?;
    if ChannelKind::of(name) != ChannelKind::Presence {
        return Err(Refusal::new(400, "users are only listed for presence channels"));
    }
    let users: Vec<Value> = context.membership.users(name).map(|id| json!({ "id": id })).collect();
    Ok(Response::json(200, json!({ "users": users }).to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fanout::directory::Occupancy;
    use crate::fanout::WorkerId;
    use crate::pusher::signature::sign_query;

    const NOW: u64 = 1_700_000_000;

    fn app() -> App {
        App { id: "app-id".into(), key: "app-key".into(), secret: "app-secret".into(), subscription_count_events: false }
    }

    fn directory() -> Directory {
        let mut directory = Directory::new(2);
        for (worker, channel, count) in [(0, "news", 2), (1, "news", 3), (1, "presence-x", 1), (0, "sports", 1)] {
            directory.apply(&Occupancy { worker: WorkerId(worker), channel: channel.into(), count });
        }
        directory
    }

    fn call(method: &str, path: &str, body: &str, params: &[(&str, &str)]) -> RestOutcome {
        let query = sign_query(&app(), method, path, body.as_bytes(), params, NOW);
        call_with_query(method, path, body, &query)
    }

    fn call_with_query(method: &str, path: &str, body: &str, query: &str) -> RestOutcome {
        let request = Request {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            close: false,
        };
        let app = app();
        let directory = directory();
        let mut membership = Membership::default();
        for user in ["u1", "u2"] {
            membership.apply(&"presence-x".into(), user, true);
        }
        handle(&request, &RestContext { app: &app, directory: &directory, membership: &membership, unix_now: NOW, max_payload: 100 })
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
                Publish { channel: "a".into(), event: "greet".into(), data: r#"{"x":1}"#.into(), except, user_id: None },
                Publish { channel: "b".into(), event: "greet".into(), data: r#"{"x":1}"#.into(), except, user_id: None },
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
        let events: Vec<_> = outcome.publishes.iter().map(|p| (&*p.channel, p.event.as_str(), p.data.as_str())).collect();
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
            (404, call("GET", "/apps/other/channels", "", &[])),
            (404, call("GET", "/apps/app-id/nothing", "", &[])),
            (405, call("GET", "/apps/app-id/events", "", &[])),
            (400, call("POST", "/apps/app-id/events", "not json", &[])),
            (400, call("POST", "/apps/app-id/events", r#"{"name":"e","data":"d"}"#, &[])),
            (400, call("POST", "/apps/app-id/events", r#"{"name":"e","channels":["bad name"],"data":"d"}"#, &[])),
            (400, call("POST", "/apps/app-id/events", r#"{"name":"e","channels":["a"],"data":"d","socket_id":"x"}"#, &[])),
            (413, call("POST", "/apps/app-id/events", &format!(r#"{{"name":"e","channels":["a"],"data":"{}"}}"#, "x".repeat(101)), &[])),
            (400, call("GET", "/apps/app-id/channels", "", &[("info", "user_count")])),
            (400, call("GET", "/apps/app-id/channels/news", "", &[("info", "bogus")])),
            (400, call("GET", "/apps/app-id/channels/news", "", &[("info", "user_count")])),
            (400, call("GET", "/apps/app-id/channels/news/users", "", &[])),
            (404, call("GET", "/apps/app-id/channels/presence-x/members", "", &[])),
            (405, call("GET", "/apps/app-id/users/u1/terminate_connections", "", &[])),
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
    fn too_many_channels_or_batch_events_are_413() {
        let channels: Vec<String> = (0..101).map(|i| format!("c{i}")).collect();
        let body = json!({"name": "e", "channels": channels, "data": "d"}).to_string();
        assert_eq!(call("POST", "/apps/app-id/events", &body, &[]).response.status, 413);
        let batch: Vec<Value> = (0..11).map(|_| json!({"name": "e", "channel": "c", "data": "d"})).collect();
        let body = json!({ "batch": batch }).to_string();
        assert_eq!(call("POST", "/apps/app-id/batch_events", &body, &[]).response.status, 413);
    }
}
