//! One connection's Pusher protocol state machine (sans-IO).
//!
//! Inputs are the client's text messages and the passage of time, each with a `now`; outputs
//! are [`Action`]s for the caller to carry out (reply, subscribe, close). The session owns the
//! connection's socket id, its list of subscriptions and its activity timer. It never sees a
//! socket or the channel registry, so it is tested with a virtual clock and nothing else.

use std::time::{Duration, Instant};

use super::protocol::{self, ChannelKind, ChannelName, ClientMessage, SocketId, SubscribeData, UnsubscribeData};

/// Most channels one connection may subscribe to; a bound on what one client can make us hold.
pub const MAX_SUBSCRIPTIONS: usize = 1000;

/// The activity timer's settings.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Client silence before the server sends `pusher:ping`.
    pub activity: Duration,
    /// Time to answer that ping before the connection is closed with 4201.
    pub pong: Duration,
}

/// What the caller must do after an input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    None,
    /// Send this message to the client.
    Reply(String),
    /// Subscribe the connection to this public channel (name already validated), record it
    /// with [`Session::subscribed`], and confirm with `subscription_succeeded`.
    Subscribe(String),
    /// Remove the connection from this channel (already forgotten by the session).
    Unsubscribe(ChannelName),
    /// Close the connection with this code and reason.
    Close(u16, &'static str),
}

/// The Pusher state of one connection.
#[derive(Debug)]
pub struct Session {
    socket_id: SocketId,
    subscriptions: Vec<ChannelName>,
    last_heard: Instant,
    ping_sent_at: Option<Instant>,
}

impl Session {
    /// A new session, as of `now`.
    pub fn new(socket_id: SocketId, now: Instant) -> Self {
        Session { socket_id, subscriptions: Vec::new(), last_heard: now, ping_sent_at: None }
    }

    /// This connection's socket id.
    pub fn socket_id(&self) -> SocketId {
        self.socket_id
    }

    /// The channels this connection is subscribed to.
    pub fn subscriptions(&self) -> &[ChannelName] {
        &self.subscriptions
    }

    /// Hands over the subscriptions, for cleanup when the connection ends.
    pub fn take_subscriptions(&mut self) -> Vec<ChannelName> {
        std::mem::take(&mut self.subscriptions)
    }

    /// Records a subscription the caller carried out.
    pub fn subscribed(&mut self, channel: ChannelName) {
        if !self.is_subscribed(&channel) {
            self.subscriptions.push(channel);
        }
    }

    fn is_subscribed(&self, channel: &str) -> bool {
        self.subscriptions.iter().any(|c| &**c == channel)
    }

    /// Something (any frame) arrived from the client: it is alive.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
        self.ping_sent_at = None;
    }

    /// Handles a text message from the client.
    pub fn handle_text(&mut self, text: &str, now: Instant) -> Action {
        self.heard(now);
        let message: ClientMessage = match serde_json::from_str(text) {
            Ok(m) => m,
            Err(e) => return Action::Reply(protocol::error(None, &format!("Invalid message: {e}"))),
        };
        match &*message.event {
            "pusher:ping" => Action::Reply(protocol::pong()),
            "pusher:pong" => Action::None,
            "pusher:subscribe" => self.handle_subscribe(&message),
            "pusher:unsubscribe" => match protocol::parse_data::<UnsubscribeData>(message.data) {
                Ok(data) => self.handle_unsubscribe(&data.channel),
                Err(e) => Action::Reply(protocol::error(None, &format!("Invalid pusher:unsubscribe data: {e}"))),
            },
            event if event.starts_with("client-") => Action::Reply(protocol::error(
                None,
                "Client events are only supported on private and presence channels",
            )),
            event => Action::Reply(protocol::error(None, &format!("Unsupported event {:?}", truncate(event, 64)))),
        }
    }

    fn handle_subscribe(&mut self, message: &ClientMessage<'_>) -> Action {
        let data: SubscribeData = match protocol::parse_data(message.data) {
            Ok(data) => data,
            Err(e) => return Action::Reply(protocol::error(None, &format!("Invalid pusher:subscribe data: {e}"))),
        };
        let channel = data.channel;
        if let Err(e) = protocol::validate_channel_name(&channel) {
            return Action::Reply(protocol::subscription_error(&channel, "InvalidChannel", &e.to_string(), 400));
        }
        if self.is_subscribed(&channel) {
            // Resubscribing is harmless; confirm again so the client's state settles.
            return Action::Reply(protocol::subscription_succeeded(&channel));
        }
        if self.subscriptions.len() >= MAX_SUBSCRIPTIONS {
            let message = format!("A connection may subscribe to at most {MAX_SUBSCRIPTIONS} channels");
            return Action::Reply(protocol::subscription_error(&channel, "LimitReached", &message, 400));
        }
        match ChannelKind::of(&channel) {
            ChannelKind::Public => Action::Subscribe(channel),
            ChannelKind::Private | ChannelKind::PrivateEncrypted | ChannelKind::Presence => Action::Reply(
                protocol::subscription_error(&channel, "AuthError", "Private and presence channels are not supported yet", 403),
            ),
        }
    }

    fn handle_unsubscribe(&mut self, channel: &str) -> Action {
        match self.subscriptions.iter().position(|c| &**c == channel) {
            Some(index) => Action::Unsubscribe(self.subscriptions.swap_remove(index)),
            None => Action::None,
        }
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

fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMEOUTS: Timeouts = Timeouts { activity: Duration::from_secs(120), pong: Duration::from_secs(30) };

    fn session(t0: Instant) -> Session {
        Session::new(SocketId { high: 1, low: 1 }, t0)
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
        let reply = reply_event(&session(t0).handle_text(r#"{"event":"pusher:ping","data":{}}"#, t0));
        assert_eq!(reply["event"], "pusher:pong");
    }

    #[test]
    fn subscribe_public_then_unsubscribe() {
        let t0 = Instant::now();
        let mut s = session(t0);
        let action = s.handle_text(r#"{"event":"pusher:subscribe","data":{"channel":"chat"}}"#, t0);
        assert_eq!(action, Action::Subscribe("chat".into()));
        s.subscribed("chat".into());
        // A second subscribe is confirmed again, not repeated.
        let again = reply_event(&s.handle_text(r#"{"event":"pusher:subscribe","data":{"channel":"chat"}}"#, t0));
        assert_eq!(again["event"], "pusher_internal:subscription_succeeded");
        let leave = s.handle_text(r#"{"event":"pusher:unsubscribe","data":{"channel":"chat"}}"#, t0);
        assert_eq!(leave, Action::Unsubscribe("chat".into()));
        assert!(s.subscriptions().is_empty());
        assert_eq!(s.handle_text(r#"{"event":"pusher:unsubscribe","data":{"channel":"chat"}}"#, t0), Action::None);
    }

    #[test]
    fn invalid_channel_names_get_a_subscription_error() {
        let t0 = Instant::now();
        let long = "c".repeat(165);
        for name in ["", "has space", long.as_str()] {
            let text = serde_json::json!({"event": "pusher:subscribe", "data": {"channel": name}}).to_string();
            let reply = reply_event(&session(t0).handle_text(&text, t0));
            assert_eq!(reply["event"], "pusher:subscription_error", "{name:?}");
            assert_eq!(reply["data"]["status"], 400);
        }
    }

    #[test]
    fn private_channels_are_refused_until_supported() {
        let t0 = Instant::now();
        let reply = reply_event(&session(t0).handle_text(r#"{"event":"pusher:subscribe","data":{"channel":"private-x","auth":"k:s"}}"#, t0));
        assert_eq!(reply["event"], "pusher:subscription_error");
    }

    #[test]
    fn bad_input_gets_pusher_error() {
        let t0 = Instant::now();
        for text in ["not json", "[]", r#"{"no_event":1}"#, r#"{"event":"pusher:subscribe"}"#, r#"{"event":"pusher:subscribe","data":{"chan":1}}"#, r#"{"event":"whatever"}"#, r#"{"event":"client-x","channel":"chat","data":{}}"#] {
            let reply = reply_event(&session(t0).handle_text(text, t0));
            assert_eq!(reply["event"], "pusher:error", "{text}");
        }
    }

    #[test]
    fn subscriptions_are_bounded() {
        let t0 = Instant::now();
        let mut s = session(t0);
        for i in 0..MAX_SUBSCRIPTIONS {
            s.subscribed(format!("c{i}").into());
        }
        let reply = reply_event(&s.handle_text(r#"{"event":"pusher:subscribe","data":{"channel":"one-more"}}"#, t0));
        assert_eq!(reply["data"]["type"], "LimitReached");
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
        s.handle_text(r#"{"event":"pusher:pong","data":{}}"#, t0 + Duration::from_secs(125));
        assert_eq!(s.handle_timeout(t0 + Duration::from_secs(200), &TIMEOUTS), Action::None);
        assert_eq!(s.poll_timeout(&TIMEOUTS), t0 + Duration::from_secs(245));
    }
}
