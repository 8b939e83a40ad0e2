//! One connection's Pusher protocol state machine (sans-IO).
//!
//! Inputs are the client's text messages and the passage of time, each with a `now`; outputs
//! are [`Action`]s for the caller to carry out (reply, subscribe, publish a client event,
//! close). The session owns the connection's socket id, its subscriptions, the user it signed
//! in as, its client-event budget and its activity timer. It checks channel and sign-in
//! signatures itself, but never sees a socket or the channel registry, so it is tested with a
//! virtual clock and nothing else.

use std::time::{Duration, Instant};

use indexmap::IndexSet;
use serde::Deserialize;

use super::presence::Member;
use super::protocol::{self, code, ChannelKey, ChannelKind, ChannelName, ClientMessage, SocketId, SubscribeData, UnsubscribeData};
use super::rate::RateLimit;
use super::signature;
use super::{App, AppIndex};
use crate::apps::{AppCells, AppConfig, Connected};

/// Prefix of the channel pusher-js subscribes to after signing in, to receive events sent to
/// its user; only that user may subscribe to it.
pub const SERVER_TO_USER_PREFIX: &str = "#server-to-user-";

/// The activity timer's settings.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Client silence before the server sends `pusher:ping`.
    pub activity: Duration,
    /// Time to answer that ping before the connection is closed with 4201.
    pub pong: Duration,
}

/// A node's Pusher settings, for every app: the timers, the node's limits, the presence
/// rosters' coalescing, and how long and how much of cache channels' events is kept. What an
/// app may do is its [`AppConfig`].
#[derive(Debug, Clone)]
pub struct Policy {
    /// Activity and pong timeouts.
    pub timeouts: Timeouts,
    /// Window over which a user's presence changes collapse into their net effect.
    pub presence_coalesce: Duration,
    /// Presence changes announced at once at most (they must fit in the members' rings).
    pub presence_batch: usize,
    /// Subscriptions the node holds at most, across its workers.
    pub max_subscriptions: usize,
    /// How long a cache channel's last event is kept.
    pub cache_ttl: Duration,
    /// Bytes of cache channels' last events kept at most.
    pub cache_max_bytes: usize,
    /// Channels one connection may subscribe to: a bound on what one client can make us hold.
    pub max_channels_per_connection: usize,
    /// WebSocket connections the node holds at most (none: no cap).
    pub max_connections: Option<u64>,
}

impl Policy {
    /// The node's settings in `config`.
    pub fn from_config(config: &crate::config::Config) -> Policy {
        Policy {
            timeouts: Timeouts { activity: config.activity_timeout(), pong: config.pong_timeout() },
            presence_coalesce: config.presence_coalesce(),
            presence_batch: super::presence::batch_for_ring(config.ring_slots as usize),
            max_subscriptions: usize::try_from(config.max_subscriptions).unwrap_or(usize::MAX),
            cache_ttl: config.cache_ttl(),
            cache_max_bytes: config.cache_max_bytes(),
            max_channels_per_connection: config.max_channels_per_connection as usize,
            max_connections: config.max_connections,
        }
    }
}

/// What the caller must do after an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// Send this message to the client.
    Reply(String),
    /// Subscribe the connection to this public or private channel (name and signature already
    /// checked), record it with [`Session::subscribed`], and confirm with
    /// `subscription_succeeded`.
    Subscribe(String),
    /// Join this presence channel as `member` (signature checked; the session already counts
    /// it as subscribed): ask the channel's roster, then confirm with the member list, or
    /// refuse and call [`Session::unsubscribed`].
    JoinPresence {
        /// The channel.
        channel: String,
        /// Who joins.
        member: Member,
        /// Members the app allows in one presence channel.
        max_members: usize,
    },
    /// Remove the connection from this channel (already forgotten by the session).
    Unsubscribe(ChannelName),
    /// Publish a client event to the channel's other subscribers (never back to the sender).
    ClientEvent {
        /// The channel, which the sender is subscribed to.
        channel: ChannelName,
        /// The `client-*` event name.
        event: String,
        /// The event's data as a string (a JSON text when the client sent an object).
        data: String,
        /// The sender's user id, on presence channels.
        user_id: Option<String>,
    },
    /// Close the connection with this code and reason.
    Close(u16, &'static str),
}

/// `pusher:signin` data.
#[derive(Debug, Deserialize)]
struct SigninData {
    auth: String,
    user_data: String,
}

/// The part of a sign-in's `user_data` Flux reads.
#[derive(Debug, Deserialize)]
struct UserData {
    id: String,
}

/// The Pusher state of one connection.
#[derive(Debug)]
pub struct Session {
    socket_id: SocketId,
    /// The app it connected to: its channels are that app's.
    app: AppIndex,
    /// Counts it among the app's connections while it lives.
    connected: Connected,
    /// A set, so a client of a thousand channels costs no scan of them per request.
    subscriptions: IndexSet<ChannelName>,
    /// The user id this connection is on each presence channel it joined.
    memberships: Vec<(ChannelName, String)>,
    user_id: Option<String>,
    /// Its client-event budget, from its first client event on.
    client_events: Option<RateLimit>,
    last_heard: Instant,
    ping_sent_at: Option<Instant>,
}

impl Session {
    /// A new session of `app`, counted in by `connected`, as of `now`.
    pub fn new(socket_id: SocketId, app: AppIndex, connected: Connected, now: Instant) -> Self {
        Session {
            socket_id,
            app,
            connected,
            subscriptions: IndexSet::new(),
            memberships: Vec::new(),
            user_id: None,
            client_events: None,
            last_heard: now,
            ping_sent_at: None,
        }
    }

    /// This connection's socket id.
    pub fn socket_id(&self) -> SocketId {
        self.socket_id
    }

    /// The app it connected to.
    pub fn app(&self) -> AppIndex {
        self.app
    }

    /// That app's counters.
    pub fn app_cells(&self) -> &AppCells {
        self.connected.cells()
    }

    /// The user this connection signed in as (`pusher:signin`), if it did.
    pub fn user_id(&self) -> Option<&str> {
        self.user_id.as_deref()
    }

    /// The channels this connection is subscribed to.
    pub fn subscriptions(&self) -> &IndexSet<ChannelName> {
        &self.subscriptions
    }

    /// Hands over the subscriptions, for cleanup when the connection ends.
    pub fn take_subscriptions(&mut self) -> IndexSet<ChannelName> {
        self.memberships.clear();
        std::mem::take(&mut self.subscriptions)
    }

    /// Forgets a subscription the caller could not carry out (a refused presence join).
    pub fn unsubscribed(&mut self, channel: &str) {
        self.subscriptions.swap_remove(&ChannelKey::new(self.app, channel));
        self.memberships.retain(|(c, _)| &**c != channel);
    }

    /// Records a subscription the caller carried out.
    pub fn subscribed(&mut self, channel: ChannelName) {
        self.subscriptions.insert(channel);
    }

    fn is_subscribed(&self, channel: &str) -> bool {
        self.subscriptions.contains(&ChannelKey::new(self.app, channel))
    }

    /// Something (any frame) arrived from the client: it is alive.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
        self.ping_sent_at = None;
    }

    /// Handles a text message from the client, under its app's settings now.
    pub fn handle_text(&mut self, text: &str, now: Instant, policy: &Policy, app: &AppConfig) -> Action {
        self.heard(now);
        let message: ClientMessage = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => return Action::Reply(protocol::error(None, &format!("Invalid message: {e}"))),
        };
        match &*message.event {
            "pusher:ping" => Action::Reply(protocol::pong()),
            "pusher:pong" => Action::None,
            "pusher:subscribe" => self.handle_subscribe(&message, policy, app),
            "pusher:unsubscribe" => match protocol::parse_data::<UnsubscribeData>(message.data) {
                Ok(data) => self.handle_unsubscribe(&data.channel),
                Err(e) => Action::Reply(protocol::error(None, &format!("Invalid pusher:unsubscribe data: {e}"))),
            },
            "pusher:signin" => self.handle_signin(&message, &app.app),
            event if event.starts_with("client-") => self.handle_client_event(&message, now, app),
            event => Action::Reply(protocol::error(None, &format!("Unsupported event {:?}", protocol::truncate(event, 64)))),
        }
    }

    fn handle_subscribe(&mut self, message: &ClientMessage<'_>, policy: &Policy, app: &AppConfig) -> Action {
        let data: SubscribeData = match protocol::parse_data(message.data) {
            Ok(data) => data,
            Err(e) => return Action::Reply(protocol::error(None, &format!("Invalid pusher:subscribe data: {e}"))),
        };
        let channel = data.channel.clone();
        if self.is_subscribed(&channel) && ChannelKind::of(&channel) != ChannelKind::Presence {
            // Resubscribing is harmless; confirm again so the client's state settles. (A
            // presence channel is asked again, for its member list.)
            return Action::Reply(protocol::subscription_succeeded(&channel));
        }
        if let Some(user) = channel.strip_prefix(SERVER_TO_USER_PREFIX) {
            return self.subscribe_server_to_user(channel.clone(), user);
        }
        if let Err(e) = protocol::validate_channel_name(&channel, app.limits.max_channel_name_length as usize) {
            return Action::Reply(protocol::subscription_error(&channel, "InvalidChannel", &e.to_string(), 400));
        }
        let most = policy.max_channels_per_connection;
        if self.subscriptions.len() >= most {
            let message = format!("A connection may subscribe to at most {most} channels (FLUX_MAX_CHANNELS_PER_CONNECTION)");
            return Action::Reply(protocol::subscription_error(&channel, "LimitReached", &message, 400));
        }
        match ChannelKind::of(&channel) {
            ChannelKind::Public => Action::Subscribe(channel),
            ChannelKind::Private | ChannelKind::PrivateEncrypted => {
                let socket_id = self.socket_id.to_string();
                match data.auth.as_deref() {
                    Some(auth) if signature::channel_auth_matches(&app.app, &socket_id, &channel, None, auth) => Action::Subscribe(channel),
                    _ => Action::Reply(auth_error(&channel, &socket_id)),
                }
            }
            ChannelKind::Presence => self.join_presence(channel, &data, app),
        }
    }

    /// A presence subscription: the signature covers `channel_data`, which names the member.
    fn join_presence(&mut self, channel: String, data: &SubscribeData, app: &AppConfig) -> Action {
        let socket_id = self.socket_id.to_string();
        let channel_data = data.channel_data.as_deref().unwrap_or("");
        match data.auth.as_deref() {
            Some(auth) if signature::channel_auth_matches(&app.app, &socket_id, &channel, Some(channel_data), auth) => {}
            _ => return Action::Reply(auth_error(&channel, &socket_id)),
        }
        let most_info = app.limits.max_presence_member_size_kb as usize * 1024;
        let member = match Member::parse(channel_data, most_info) {
            Ok(member) => member,
            Err(e) => return Action::Reply(protocol::subscription_error(&channel, "InvalidChannelData", &e.to_string(), 400)),
        };
        if !self.is_subscribed(&channel) {
            let name = ChannelName::new(self.app, &channel);
            self.memberships.push((name.clone(), member.user_id.clone()));
            self.subscriptions.insert(name);
        }
        Action::JoinPresence { channel, member, max_members: app.limits.max_presence_members_per_channel as usize }
    }

    /// pusher-js subscribes to its user's own channel after signing in; no one else may.
    fn subscribe_server_to_user(&mut self, channel: String, user: &str) -> Action {
        if self.user_id.as_deref() == Some(user) {
            Action::Subscribe(channel)
        } else {
            Action::Reply(protocol::subscription_error(&channel, "AuthError", "Sign in as this user first", 403))
        }
    }

    /// `pusher:signin`: checks the signature over `socket_id::user::user_data` and remembers
    /// the user. A bad one closes the connection with 4009, as Pusher does.
    fn handle_signin(&mut self, message: &ClientMessage<'_>, app: &App) -> Action {
        let data: SigninData = match protocol::parse_data(message.data) {
            Ok(data) => data,
            Err(e) => return Action::Reply(protocol::error(None, &format!("Invalid pusher:signin data: {e}"))),
        };
        if !signature::user_auth_matches(app, &self.socket_id.to_string(), &data.user_data, &data.auth) {
            return Action::Close(code::UNAUTHORIZED, "Invalid signin signature");
        }
        match serde_json::from_str::<UserData>(&data.user_data) {
            Ok(user) if !user.id.is_empty() && user.id.len() <= protocol::MAX_USER_ID_LEN => {
                self.user_id = Some(user.id);
                Action::Reply(protocol::signin_success(&data.user_data))
            }
            _ => Action::Reply(protocol::error(
                None,
                &format!("user_data must be a JSON object with an \"id\" string of 1 to {} characters", protocol::MAX_USER_ID_LEN),
            )),
        }
    }

    /// A `client-*` event: only on private and presence channels the sender subscribes to,
    /// within the data limit and the per-connection rate.
    fn handle_client_event(&mut self, message: &ClientMessage<'_>, now: Instant, app: &AppConfig) -> Action {
        let refuse = |text: &str| Action::Reply(protocol::error(None, text));
        let limits = &app.limits;
        if !limits.enable_client_messages {
            // soketi's and Sockudo's answer, with the code of client-event refusals.
            return Action::Reply(protocol::error(Some(code::CLIENT_EVENT_RATE_LIMIT), "The app does not have client messaging enabled."));
        }
        let Some(channel) = message.channel.as_deref() else {
            return refuse("Client events need a channel");
        };
        match ChannelKind::of(channel) {
            ChannelKind::Private | ChannelKind::Presence => {}
            ChannelKind::PrivateEncrypted => return refuse("Client events are not supported on encrypted channels"),
            ChannelKind::Public => return refuse("Client events are only supported on private and presence channels"),
        }
        let Some(channel) = self.subscriptions.get(&ChannelKey::new(self.app, channel)).cloned() else {
            return refuse(&format!("Client event rejected: not subscribed to {}", protocol::truncate(channel, 64)));
        };
        if message.event.len() > limits.max_event_name_length as usize {
            return refuse(&format!("Event names are at most {} characters", limits.max_event_name_length));
        }
        let data = message.data.map(|data| protocol::event_data_text(data).into_owned()).unwrap_or_default();
        if data.len() > app.max_payload() {
            return refuse(&format!("Client event data is larger than {} bytes", app.max_payload()));
        }
        let per_sec = limits.max_client_events_per_sec;
        if !self.client_events.get_or_insert_with(|| RateLimit::new(now)).allow(1, per_sec, now) {
            return Action::Reply(protocol::error(
                Some(code::CLIENT_EVENT_RATE_LIMIT),
                &format!("Client event rejected due to rate limit ({per_sec} per second)"),
            ));
        }
        let user_id = self.memberships.iter().find(|(c, _)| *c == channel).map(|(_, user)| user.clone());
        Action::ClientEvent { channel, event: message.event.to_string(), data, user_id }
    }

    fn handle_unsubscribe(&mut self, channel: &str) -> Action {
        self.memberships.retain(|(c, _)| &**c != channel);
        self.subscriptions.swap_take(&ChannelKey::new(self.app, channel)).map_or(Action::None, Action::Unsubscribe)
    }

    /// The next time [`handle_timeout`](Self::handle_timeout) has something to do.
    pub fn poll_timeout(&self, timeouts: &Timeouts) -> Instant {
        match self.ping_sent_at {
            Some(sent) => sent + timeouts.pong,
            None => self.last_heard + timeouts.activity,
        }
    }

    /// Runs the activity timer: ping a silent client, close one that did not answer.
    pub fn handle_timeout(&mut self, now: Instant, timeouts: &Timeouts) -> Action {
        if now < self.poll_timeout(timeouts) {
            return Action::None;
        }
        match self.ping_sent_at {
            Some(_) => Action::Close(protocol::code::PONG_NOT_RECEIVED, "Pong reply not received"),
            None => {
                self.ping_sent_at = Some(now);
                Action::Reply(protocol::ping())
            }
        }
    }
}

/// The `subscription_error` pusher-js reports when a signature is wrong (status 401).
fn auth_error(channel: &str, socket_id: &str) -> String {
    let message = format!(
        "Invalid signature: expected HMAC-SHA256 of \"{socket_id}:{}\" with the app secret",
        protocol::truncate(channel, protocol::ECHOED_CHANNEL_LEN)
    );
    protocol::subscription_error(channel, "AuthError", &message, 401)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts { activity: Duration::from_secs(120), pong: Duration::from_secs(30) };

    fn policy() -> Policy {
        Policy::from_config(&crate::config::Config::default())
    }

    /// The app of the tests: Flux's default, with client events on.
    fn test_app() -> AppConfig {
        AppConfig::from_settings(&crate::config::Config::default())
    }

    fn session(t0: Instant) -> Session {
        Session::new(SocketId { high: 1, low: 1 }, AppIndex(0), Connected::new(&Default::default()), t0)
    }

    fn chan(name: &str) -> ChannelName {
        ChannelName::new(AppIndex(0), name)
    }

    fn reply_event(action: &Action) -> serde_json::Value {
        match action {
            Action::Reply(text) => serde_json::from_str(text).expect("replies are JSON"),
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    #[test]
    fn ping_gets_pong() {
        let t0 = Instant::now();
        let reply = reply_event(&session(t0).handle_text(r#"{"event":"pusher:ping","data":{}}"#, t0, &policy(), &test_app()));
        assert_eq!(reply["event"], "pusher:pong");
    }

    #[test]
    fn subscribe_public_then_unsubscribe() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let action = s.handle_text(r#"{"event":"pusher:subscribe","data":{"channel":"chat"}}"#, t0, &policy(), &test_app());
        assert_eq!(action, Action::Subscribe("chat".into()));
        s.subscribed(chan("chat"));
        // A second subscribe is confirmed again, not repeated.
        let again = reply_event(&s.handle_text(r#"{"event":"pusher:subscribe","data":{"channel":"chat"}}"#, t0, &policy(), &test_app()));
        assert_eq!(again["event"], "pusher_internal:subscription_succeeded");
        let leave = s.handle_text(r#"{"event":"pusher:unsubscribe","data":{"channel":"chat"}}"#, t0, &policy(), &test_app());
        assert_eq!(leave, Action::Unsubscribe(chan("chat")));
        assert!(s.subscriptions().is_empty());
        assert_eq!(s.handle_text(r#"{"event":"pusher:unsubscribe","data":{"channel":"chat"}}"#, t0, &policy(), &test_app()), Action::None);
    }

    #[test]
    fn invalid_channel_names_get_a_subscription_error() {
        let t0 = Instant::now();
        let long = "c".repeat(201);
        for name in ["", "has space", long.as_str()] {
            let text = serde_json::json!({"event": "pusher:subscribe", "data": {"channel": name}}).to_string();
            let reply = reply_event(&session(t0).handle_text(&text, t0, &policy(), &test_app()));
            assert_eq!(reply["event"], "pusher:subscription_error", "{name:?}");
            assert_eq!(reply["data"]["status"], 400);
        }
    }

    fn subscribe_text(channel: &str, auth: &str) -> String {
        serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth}}).to_string()
    }

    #[test]
    fn private_channels_need_the_apps_signature_for_this_socket() {
        let t0 = Instant::now();
        let app = test_app().app;
        let mut s = session(t0);
        let good = signature::channel_auth(&app, "1.1", "private-x", None);
        assert_eq!(s.handle_text(&subscribe_text("private-x", &good), t0, &policy(), &test_app()), Action::Subscribe("private-x".into()));
        // Signed for another socket, another channel, or by another secret: a 401 subscription error.
        let other_socket = signature::channel_auth(&app, "1.2", "private-x", None);
        let other_channel = signature::channel_auth(&app, "1.1", "private-y", None);
        let other_secret = signature::channel_auth(&App { secret: "nope".into(), ..app.clone() }, "1.1", "private-x", None);
        for auth in [other_socket.as_str(), &other_channel, &other_secret, "app-key:00", "junk", ""] {
            let reply = reply_event(&s.handle_text(&subscribe_text("private-x", auth), t0, &policy(), &test_app()));
            assert_eq!(reply["event"], "pusher:subscription_error", "{auth}");
            assert_eq!(reply["data"]["status"], 401);
            assert_eq!(reply["data"]["type"], "AuthError");
        }
        let missing =
            reply_event(&s.handle_text(r#"{"event":"pusher:subscribe","data":{"channel":"private-x"}}"#, t0, &policy(), &test_app()));
        assert_eq!(missing["data"]["status"], 401);
    }

    fn subscribed_to(channel: &str, t0: Instant) -> Session {
        let mut s = session(t0);
        s.subscribed(chan(channel));
        s
    }

    fn client_event(channel: &str, data: serde_json::Value) -> String {
        serde_json::json!({"event": "client-typing", "channel": channel, "data": data}).to_string()
    }

    #[test]
    fn client_events_go_out_from_subscribers_of_private_channels_only() {
        let t0 = Instant::now();
        let mut s = subscribed_to("private-x", t0);
        let action = s.handle_text(&client_event("private-x", serde_json::json!({"who": "ann"})), t0, &policy(), &test_app());
        assert_eq!(
            action,
            Action::ClientEvent {
                channel: chan("private-x"),
                event: "client-typing".into(),
                data: r#"{"who":"ann"}"#.into(),
                user_id: None
            }
        );
        // A string is passed on unchanged.
        let action = s.handle_text(&client_event("private-x", serde_json::json!("hi")), t0, &policy(), &test_app());
        assert!(matches!(action, Action::ClientEvent { data, .. } if data == "hi"));
        // Not subscribed, public, encrypted, no channel, too big: pusher:error, nothing sent.
        for (channel, text) in [
            ("private-x", client_event("private-other", serde_json::json!({}))),
            ("chat", client_event("chat", serde_json::json!({}))),
            ("private-encrypted-x", client_event("private-encrypted-x", serde_json::json!({}))),
            ("private-x", r#"{"event":"client-x","data":{}}"#.to_string()),
            ("private-x", client_event("private-x", serde_json::json!("x".repeat(10 * 1024 + 1)))),
        ] {
            let reply = reply_event(&subscribed_to(channel, t0).handle_text(&text, t0, &policy(), &test_app()));
            assert_eq!(reply["event"], "pusher:error", "{text}");
        }
    }

    #[test]
    fn an_apps_own_settings_decide_its_client_events_and_channel_names() {
        let t0 = Instant::now();
        let off = AppConfig { limits: crate::apps::Limits { enable_client_messages: false, ..test_app().limits }, ..test_app() };
        let mut s = subscribed_to("private-x", t0);
        let refused = reply_event(&s.handle_text(&client_event("private-x", serde_json::json!({})), t0, &policy(), &off));
        assert_eq!((refused["event"].as_str(), refused["data"]["code"].as_u64()), (Some("pusher:error"), Some(4301)));
        let tight = AppConfig {
            limits: crate::apps::Limits { max_event_payload_kb: 1, max_channel_name_length: 10, ..test_app().limits },
            ..test_app()
        };
        let big = s.handle_text(&client_event("private-x", serde_json::json!("x".repeat(1025))), t0, &policy(), &tight);
        assert_eq!(reply_event(&big)["event"], "pusher:error");
        let long = reply_event(&s.handle_text(r#"{"event":"pusher:subscribe","data":{"channel":"eleven-char"}}"#, t0, &policy(), &tight));
        assert_eq!(long["event"], "pusher:subscription_error");
    }

    #[test]
    fn a_sessions_channels_are_its_apps() {
        let t0 = Instant::now();
        let mut s = Session::new(SocketId { high: 1, low: 2 }, AppIndex(3), Connected::new(&Default::default()), t0);
        s.subscribed(ChannelName::new(AppIndex(3), "chat"));
        let leave = s.handle_text(r#"{"event":"pusher:unsubscribe","data":{"channel":"chat"}}"#, t0, &policy(), &test_app());
        assert_eq!(leave, Action::Unsubscribe(ChannelName::new(AppIndex(3), "chat")));
        assert_ne!(leave, Action::Unsubscribe(chan("chat")), "app 0's chat is another channel");
    }

    #[test]
    fn a_connection_is_counted_in_its_app_while_it_lives() {
        let cells: std::sync::Arc<AppCells> = Default::default();
        let s = Session::new(SocketId { high: 1, low: 2 }, AppIndex(0), Connected::new(&cells), Instant::now());
        assert_eq!(cells.snapshot().connections, 1);
        drop(s);
        assert_eq!(cells.snapshot().connections, 0);
    }

    #[test]
    fn client_events_are_rate_limited_per_connection() {
        let t0 = Instant::now();
        let mut s = subscribed_to("private-x", t0);
        let send =
            |s: &mut Session, at: Instant| s.handle_text(&client_event("private-x", serde_json::json!({})), at, &policy(), &test_app());
        for _ in 0..10 {
            assert!(matches!(send(&mut s, t0), Action::ClientEvent { .. }));
        }
        let over = reply_event(&send(&mut s, t0));
        assert_eq!(over["event"], "pusher:error");
        assert_eq!(over["data"]["code"], 4301);
        // A tenth of a second later one more is allowed, and only one.
        let later = t0 + Duration::from_millis(100);
        assert!(matches!(send(&mut s, later), Action::ClientEvent { .. }));
        assert!(matches!(send(&mut s, later), Action::Reply(_)));
        // Savings are capped at one second's worth.
        let much_later = t0 + Duration::from_secs(60);
        let sent = (0..30).filter(|_| matches!(send(&mut s, much_later), Action::ClientEvent { .. })).count();
        assert_eq!(sent, 10);
    }

    fn presence_subscribe(channel: &str, socket: &str, channel_data: &str, secret: &str) -> String {
        let app = App { secret: secret.into(), ..test_app().app };
        let auth = signature::channel_auth(&app, socket, channel, Some(channel_data));
        serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel, "auth": auth, "channel_data": channel_data}})
            .to_string()
    }

    #[test]
    fn presence_joins_are_signed_over_channel_data_and_carry_the_member() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let data = r#"{"user_id":"u1","user_info":{"name":"Ann"}}"#;
        let action = s.handle_text(&presence_subscribe("presence-room", "1.1", data, "app-secret"), t0, &policy(), &test_app());
        let member = Member::parse(data, 1024).unwrap();
        assert_eq!(action, Action::JoinPresence { channel: "presence-room".into(), member: member.clone(), max_members: 100 });
        assert_eq!(s.subscriptions().iter().map(|c| &**c).collect::<Vec<_>>(), ["presence-room"]);
        // Asking again asks the roster again (for the member list), without a second subscription.
        assert_eq!(
            s.handle_text(&presence_subscribe("presence-room", "1.1", data, "app-secret"), t0, &policy(), &test_app()),
            Action::JoinPresence { channel: "presence-room".into(), member, max_members: 100 }
        );
        assert_eq!(s.subscriptions().len(), 1);
        // Client events there carry the sender's user id.
        let event = s.handle_text(&client_event("presence-room", serde_json::json!({})), t0, &policy(), &test_app());
        assert!(matches!(event, Action::ClientEvent { user_id: Some(ref u), .. } if u == "u1"), "{event:?}");
        // A refused join is forgotten.
        s.unsubscribed("presence-room");
        assert!(s.subscriptions().is_empty());
    }

    #[test]
    fn an_apps_presence_settings_bound_its_members() {
        let t0 = Instant::now();
        let roomy = AppConfig {
            limits: crate::apps::Limits { max_presence_member_size_kb: 2, max_presence_members_per_channel: 7, ..test_app().limits },
            ..test_app()
        };
        let info = format!(r#"{{"user_id":"u1","user_info":"{}"}}"#, "x".repeat(1500));
        let text = presence_subscribe("presence-room", "1.1", &info, "app-secret");
        let refused = reply_event(&session(t0).handle_text(&text, t0, &policy(), &test_app()));
        assert_eq!((refused["event"].as_str(), refused["data"]["status"].as_u64()), (Some("pusher:subscription_error"), Some(400)));
        let joined = session(t0).handle_text(&text, t0, &policy(), &roomy);
        assert!(matches!(joined, Action::JoinPresence { max_members: 7, .. }), "{joined:?}");
    }

    #[test]
    fn presence_joins_with_bad_signatures_or_channel_data_are_refused() {
        let t0 = Instant::now();
        let data = r#"{"user_id":"u1"}"#;
        let forged =
            reply_event(&session(t0).handle_text(&presence_subscribe("presence-room", "1.1", data, "wrong"), t0, &policy(), &test_app()));
        assert_eq!(forged["data"]["status"], 401);
        // Signed, but channel_data changed after signing.
        let mut text: serde_json::Value = serde_json::from_str(&presence_subscribe("presence-room", "1.1", data, "app-secret")).unwrap();
        text["data"]["channel_data"] = r#"{"user_id":"admin"}"#.into();
        let tampered = reply_event(&session(t0).handle_text(&text.to_string(), t0, &policy(), &test_app()));
        assert_eq!(tampered["data"]["status"], 401);
        // Properly signed but unusable channel_data.
        let long_id = format!(r#"{{"user_id":"{}"}}"#, "u".repeat(200));
        for bad in ["not json", r#"{"user_info":{}}"#, long_id.as_str()] {
            let reply = reply_event(&session(t0).handle_text(
                &presence_subscribe("presence-room", "1.1", bad, "app-secret"),
                t0,
                &policy(),
                &test_app(),
            ));
            assert_eq!(reply["event"], "pusher:subscription_error", "{bad}");
            assert_eq!(reply["data"]["status"], 400, "{bad}");
        }
    }

    fn signin_text(auth: &str, user_data: &str) -> String {
        serde_json::json!({"event": "pusher:signin", "data": {"auth": auth, "user_data": user_data}}).to_string()
    }

    #[test]
    fn signin_checks_the_signature_and_opens_the_users_own_channel() {
        let t0 = Instant::now();
        let app = test_app().app;
        let mut s = session(t0);
        // Before signing in, nobody's server-to-user channel is open.
        let early = reply_event(&s.handle_text(&subscribe_text("#server-to-user-7", ""), t0, &policy(), &test_app()));
        assert_eq!(early["event"], "pusher:subscription_error");
        let user_data = r#"{"id":"7","name":"Ann"}"#;
        let ok =
            reply_event(&s.handle_text(&signin_text(&signature::user_auth(&app, "1.1", user_data), user_data), t0, &policy(), &test_app()));
        assert_eq!(ok["event"], "pusher:signin_success");
        let data: serde_json::Value = serde_json::from_str(ok["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["user_data"], user_data);
        assert_eq!(s.user_id(), Some("7"));
        assert_eq!(
            s.handle_text(&subscribe_text("#server-to-user-7", ""), t0, &policy(), &test_app()),
            Action::Subscribe("#server-to-user-7".into())
        );
        let other = reply_event(&s.handle_text(&subscribe_text("#server-to-user-8", ""), t0, &policy(), &test_app()));
        assert_eq!(other["event"], "pusher:subscription_error");
        // user_data without an id is refused without closing; a forged signature closes 4009.
        let no_id = r#"{"name":"x"}"#;
        let reply = reply_event(&s.handle_text(&signin_text(&signature::user_auth(&app, "1.1", no_id), no_id), t0, &policy(), &test_app()));
        assert_eq!(reply["event"], "pusher:error");
        let forged = signature::user_auth(&app, "1.2", user_data);
        assert_eq!(
            s.handle_text(&signin_text(&forged, user_data), t0, &policy(), &test_app()),
            Action::Close(4009, "Invalid signin signature")
        );
    }

    #[test]
    fn bad_input_gets_pusher_error() {
        let t0 = Instant::now();
        for text in [
            "not json",
            "[]",
            r#"{"no_event":1}"#,
            r#"{"event":"pusher:subscribe"}"#,
            r#"{"event":"pusher:subscribe","data":{"chan":1}}"#,
            r#"{"event":"whatever"}"#,
            r#"{"event":"client-x","channel":"chat","data":{}}"#,
            r#"{"event":"pusher:signin","data":{}}"#,
        ] {
            let reply = reply_event(&session(t0).handle_text(text, t0, &policy(), &test_app()));
            assert_eq!(reply["event"], "pusher:error", "{text}");
        }
    }

    #[test]
    fn a_connection_holds_at_most_its_channel_limit() {
        let t0 = Instant::now();
        let policy = Policy { max_channels_per_connection: 3, ..policy() };
        let subscribe = |s: &mut Session, channel: &str| {
            let text = serde_json::json!({"event": "pusher:subscribe", "data": {"channel": channel}}).to_string();
            let action = s.handle_text(&text, t0, &policy, &test_app());
            if let Action::Subscribe(name) = &action {
                s.subscribed(chan(name));
            }
            action
        };
        let mut s = session(t0);
        for i in 0..3 {
            assert_eq!(subscribe(&mut s, &format!("c{i}")), Action::Subscribe(format!("c{i}")));
        }
        // However many more it asks for, each is refused and nothing more is held.
        for i in 3..1000 {
            let reply = reply_event(&subscribe(&mut s, &format!("c{i}")));
            assert_eq!(reply["event"], "pusher:subscription_error");
            assert_eq!(reply["channel"], format!("c{i}"));
            assert_eq!((reply["data"]["type"].as_str(), reply["data"]["status"].as_u64()), (Some("LimitReached"), Some(400)));
        }
        assert_eq!(s.subscriptions().len(), 3);
        // A channel it holds is confirmed again; leaving one makes room for another.
        assert_eq!(reply_event(&subscribe(&mut s, "c0"))["event"], "pusher_internal:subscription_succeeded");
        s.handle_text(r#"{"event":"pusher:unsubscribe","data":{"channel":"c1"}}"#, t0, &policy, &test_app());
        assert_eq!(subscribe(&mut s, "c9"), Action::Subscribe("c9".into()));
    }

    #[test]
    fn silence_brings_a_ping_then_a_4201_close() {
        let t0 = Instant::now();
        let mut s = session(t0);
        assert_eq!(s.handle_timeout(t0 + Duration::from_secs(119), &TIMEOUTS), Action::None);
        let ping = reply_event(&s.handle_timeout(t0 + Duration::from_secs(120), &TIMEOUTS));
        assert_eq!(ping["event"], "pusher:ping");
        assert_eq!(s.handle_timeout(t0 + Duration::from_secs(149), &TIMEOUTS), Action::None);
        assert_eq!(s.handle_timeout(t0 + Duration::from_secs(150), &TIMEOUTS), Action::Close(4201, "Pong reply not received"));
    }

    #[test]
    fn any_message_resets_the_activity_timer() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let _ = s.handle_timeout(t0 + Duration::from_secs(120), &TIMEOUTS); // ping sent
        s.handle_text(r#"{"event":"pusher:pong","data":{}}"#, t0 + Duration::from_secs(125), &policy(), &test_app());
        assert_eq!(s.handle_timeout(t0 + Duration::from_secs(200), &TIMEOUTS), Action::None);
        assert_eq!(s.poll_timeout(&TIMEOUTS), t0 + Duration::from_secs(245));
    }
}
