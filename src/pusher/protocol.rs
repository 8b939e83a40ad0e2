//! The Pusher Channels protocol 7 vocabulary: socket ids, channel names, the messages a client
//! sends, the messages the server sends, and the close and error codes.
//!
//! Everything here is a pure function of its input. Server messages are written straight into
//! the caller's buffer, so a broadcast's JSON is produced once, in the frame it will travel in.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The protocol version Flux speaks. Pusher's protocol 5 and 6 use the same messages.
pub const PROTOCOL_VERSIONS: std::ops::RangeInclusive<u32> = 5..=7;

/// The most of a refused channel's name echoed back in `pusher:subscription_error`.
pub const ECHOED_CHANNEL_LEN: usize = 200;

/// Pusher's longest user id (sign-in and presence).
pub const MAX_USER_ID_LEN: usize = 128;

pub use super::channel::{ChannelKey, ChannelMap, ChannelName};

/// Close codes and `pusher:error` codes from the Pusher protocol.
pub mod code {
    /// The app key is unknown.
    pub const APP_NOT_FOUND: u16 = 4001;
    /// The app is disabled.
    pub const APP_DISABLED: u16 = 4003;
    /// Over connection quota: the node holds its maximum of connections. In Pusher's 4000-4099
    /// range, so clients do not reconnect.
    pub const OVER_QUOTA: u16 = 4004;
    /// The `protocol` query parameter is not a number.
    pub const INVALID_VERSION_FORMAT: u16 = 4006;
    /// The protocol version is not supported.
    pub const UNSUPPORTED_PROTOCOL: u16 = 4007;
    /// No `protocol` query parameter.
    pub const NO_PROTOCOL_VERSION: u16 = 4008;
    /// The connection is not authorized (a bad `pusher:signin` signature).
    pub const UNAUTHORIZED: u16 = 4009;
    /// Over capacity: for slow consumers that are evicted, and clients that arrive while the
    /// node shuts down; clients reconnect with backoff.
    pub const OVER_CAPACITY: u16 = 4100;
    /// The server is going away; reconnect immediately.
    pub const RECONNECT_NOW: u16 = 4200;
    /// The client did not answer a ping in time.
    pub const PONG_NOT_RECEIVED: u16 = 4201;
    /// Client event rejected by rate limit.
    pub const CLIENT_EVENT_RATE_LIMIT: u16 = 4301;
}

/// A connection's public identifier, shown to clients as `"<high>.<low>"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketId {
    /// The first number: chosen per worker at random, so ids differ across restarts and nodes.
    pub high: u32,
    /// The second number: a per-worker sequence.
    pub low: u32,
}

impl fmt::Display for SocketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.high, self.low)
    }
}

/// A string that is not of the form `N.N`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid socket_id {0:?}: expected two numbers joined by a dot")]
pub struct InvalidSocketId(pub String);

impl FromStr for SocketId {
    type Err = InvalidSocketId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidSocketId(s.chars().take(64).collect());
        let (high, low) = s.split_once('.').ok_or_else(invalid)?;
        let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        if !digits(high) || !digits(low) {
            return Err(invalid());
        }
        Ok(SocketId { high: high.parse().map_err(|_| invalid())?, low: low.parse().map_err(|_| invalid())? })
    }
}

/// The kind of a channel, from its name's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// Anyone may subscribe.
    Public,
    /// `private-`: subscription needs a signature from the app's server.
    Private,
    /// `private-encrypted-`: like private; payloads are end-to-end encrypted by the clients.
    PrivateEncrypted,
    /// `presence-`: private, plus a member list.
    Presence,
}

impl ChannelKind {
    /// The kind of the channel named `name`.
    pub fn of(name: &str) -> Self {
        if name.starts_with("private-encrypted-") {
            ChannelKind::PrivateEncrypted
        } else if name.starts_with("private-") {
            ChannelKind::Private
        } else if name.starts_with("presence-") {
            ChannelKind::Presence
        } else {
            ChannelKind::Public
        }
    }
}

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelNameError {
    /// Empty name.
    #[error("channel name is empty")]
    Empty,
    /// Longer than the app allows (`max_channel_name_length`).
    #[error("channel name is longer than {0} characters")]
    TooLong(usize),
    /// A character outside Pusher's set.
    #[error("channel name may contain only A-Z a-z 0-9 _ - = @ , . ;")]
    InvalidCharacter,
}

/// Whether `name` is a cache channel: Pusher's `cache-`, `private-cache-`,
/// `private-encrypted-cache-` and `presence-cache-` channels keep their last event for new
/// subscribers, and are otherwise channels of the kind the rest of the prefix says.
pub fn is_cache_channel(name: &str) -> bool {
    ["cache-", "private-cache-", "private-encrypted-cache-", "presence-cache-"].iter().any(|prefix| name.starts_with(prefix))
}

/// Checks a channel name against Pusher's rules: 1 to `max_len` characters (the app's
/// `max_channel_name_length`) from `A-Za-z0-9_-=@,.;`.
pub fn validate_channel_name(name: &str, max_len: usize) -> Result<(), ChannelNameError> {
    if name.is_empty() {
        return Err(ChannelNameError::Empty);
    }
    if name.len() > max_len {
        return Err(ChannelNameError::TooLong(max_len));
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_-=@,.;".contains(&b);
    if !name.bytes().all(allowed) {
        return Err(ChannelNameError::InvalidCharacter);
    }
    Ok(())
}

/// Checks a channel an event may be published to: a channel name by Pusher's rules, or a
/// user's `#server-to-user-{user_id}` channel (the REST side of the SDKs' `sendToUser`).
pub fn validate_publish_channel(name: &str, max_len: usize) -> Result<(), ChannelNameError> {
    match name.strip_prefix(crate::pusher::session::SERVER_TO_USER_PREFIX) {
        Some("") => Err(ChannelNameError::Empty),
        Some(user_id) if user_id.len() > MAX_USER_ID_LEN => Err(ChannelNameError::TooLong(MAX_USER_ID_LEN)),
        Some(user_id) if user_id.chars().any(char::is_control) => Err(ChannelNameError::InvalidCharacter),
        Some(_) => Ok(()),
        None => validate_channel_name(name, max_len),
    }
}

/// A message from a client, before its `data` is interpreted.
#[derive(Debug, Deserialize)]
pub struct ClientMessage<'a> {
    /// The event name.
    #[serde(borrow)]
    pub event: std::borrow::Cow<'a, str>,
    /// The channel, for client events.
    #[serde(default, borrow)]
    pub channel: Option<std::borrow::Cow<'a, str>>,
    /// The event's data, left unparsed until the event is known.
    #[serde(default, borrow)]
    pub data: Option<&'a RawValue>,
}

/// The `data` of `pusher:subscribe`.
#[derive(Debug, Deserialize)]
pub struct SubscribeData {
    /// Channel to subscribe to.
    pub channel: String,
    /// `key:signature` for private and presence channels.
    #[serde(default)]
    pub auth: Option<String>,
    /// The member's JSON, for presence channels.
    #[serde(default)]
    pub channel_data: Option<String>,
}

/// The `data` of `pusher:unsubscribe`.
#[derive(Debug, Deserialize)]
pub struct UnsubscribeData {
    /// Channel to leave.
    pub channel: String,
}

/// Parses an event's `data`, which clients send either as an object or as a JSON string that
/// holds one.
pub fn parse_data<T: for<'de> Deserialize<'de>>(raw: Option<&RawValue>) -> Result<T, serde_json::Error> {
    let raw = raw.map_or("null", RawValue::get);
    if raw.trim_start().starts_with('"') {
        let inner: String = serde_json::from_str(raw)?;
        serde_json::from_str(&inner)
    } else {
        serde_json::from_str(raw)
    }
}

/// An event as it travels to clients: `{"event":…,"channel":…,"data":…}`.
#[derive(Debug, Serialize)]
pub struct EventMessage<'a> {
    /// Event name.
    pub event: &'a str,
    /// Channel it was published on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<&'a str>,
    /// The data, a string (usually JSON) passed through unchanged.
    pub data: &'a str,
    /// The publishing member, on presence channels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<&'a str>,
}

#[derive(Serialize)]
struct ErrorData<'a> {
    code: Option<u16>,
    message: &'a str,
}

#[derive(Serialize)]
struct ObjectEvent<'a, T: Serialize> {
    event: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    channel: Option<&'a str>,
    data: T,
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serializing these plain structs of strings and numbers into a String cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

/// An event's `data` as the string clients receive: a JSON string is unquoted (what the SDKs
/// and pusher-js send), any other JSON value is passed on as its text, which pusher-js parses
/// back into the same value. Borrowed from `data` unless escapes in a JSON string had to be
/// undone.
pub fn event_data_text(data: &RawValue) -> std::borrow::Cow<'_, str> {
    let raw = data.get();
    if let Ok(text) = serde_json::from_str::<&str>(raw) {
        return text.into();
    }
    serde_json::from_str::<String>(raw).map_or(raw.into(), Into::into)
}

/// `pusher:connection_established`, whose `data` is a JSON string.
pub fn connection_established(socket_id: SocketId, activity_timeout_secs: u64) -> String {
    let data = format!(r#"{{"socket_id":"{socket_id}","activity_timeout":{activity_timeout_secs}}}"#);
    to_json(&EventMessage { event: "pusher:connection_established", channel: None, data: &data, user_id: None })
}

/// `pusher:error`, with an optional code (Pusher sends `null` for errors that are not fatal).
pub fn error(code: Option<u16>, message: &str) -> String {
    to_json(&ObjectEvent { event: "pusher:error", channel: None, data: ErrorData { code, message } })
}

/// `pusher:pong`, the answer to a client's `pusher:ping`.
pub fn pong() -> String {
    r#"{"event":"pusher:pong","data":"{}"}"#.to_string()
}

/// `pusher:ping`, sent to a client that has been silent for the activity timeout.
pub fn ping() -> String {
    r#"{"event":"pusher:ping","data":"{}"}"#.to_string()
}

/// `pusher_internal:subscription_succeeded` for a channel without member data.
pub fn subscription_succeeded(channel: &str) -> String {
    to_json(&EventMessage { event: "pusher_internal:subscription_succeeded", channel: Some(channel), data: "{}", user_id: None })
}

/// `pusher_internal:subscription_succeeded` for a presence channel, with its member list
/// (`{"presence":{...}}`, which travels as a JSON string).
pub fn presence_subscription_succeeded(channel: &str, presence_data: &str) -> String {
    let message =
        EventMessage { event: "pusher_internal:subscription_succeeded", channel: Some(channel), data: presence_data, user_id: None };
    // The member list is hundreds of KB in a big channel: room for it and its escaped quotes
    // up front, rather than growing by doubling from 128 bytes (issue 16).
    let mut json = Vec::with_capacity(presence_data.len() + presence_data.len() / 4 + channel.len() + 96);
    // Serializing strings cannot fail, and serde_json writes UTF-8.
    match serde_json::to_writer(&mut json, &message) {
        Ok(()) => String::from_utf8(json).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// `pusher:cache_miss`: the cache channel just subscribed to has no event kept. pusher-js hands
/// it to the channel's `pusher:cache_miss` binding.
pub fn cache_miss(channel: &str) -> String {
    to_json(&EventMessage { event: "pusher:cache_miss", channel: Some(channel), data: "{}", user_id: None })
}

/// The data of `pusher_internal:subscription_count`: `{"subscription_count":N}` as a JSON string.
pub fn subscription_count_data(count: u32) -> String {
    format!(r#"{{"subscription_count":{count}}}"#)
}

/// The data of `pusher_internal:member_added` and `member_removed`.
#[derive(Serialize)]
struct MemberData<'a> {
    user_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    user_info: Option<&'a RawValue>,
}

/// The data of `pusher_internal:member_added`: `{"user_id":…,"user_info":…}` as a JSON string.
pub fn member_added_data(user_id: &str, user_info: &RawValue) -> String {
    to_json(&MemberData { user_id, user_info: Some(user_info) })
}

/// The data of `pusher_internal:member_removed`: `{"user_id":…}` as a JSON string.
pub fn member_removed_data(user_id: &str) -> String {
    to_json(&MemberData { user_id, user_info: None })
}

/// `pusher:signin_success`, whose `data` is a JSON string holding the signed `user_data`.
pub fn signin_success(user_data: &str) -> String {
    let data = to_json(&serde_json::json!({ "user_data": user_data }));
    to_json(&EventMessage { event: "pusher:signin_success", channel: None, data: &data, user_id: None })
}

#[derive(Serialize)]
struct SubscriptionErrorData<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    error: &'a str,
    status: u16,
}

/// The first `max` bytes of `s`, or fewer to end on a character: for echoing what a client
/// sent without echoing all of it.
pub fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `pusher:subscription_error`, which pusher-js hands to the channel's error callback.
/// The channel is echoed back so the client can match the error to its channel; a name too
/// long to be valid is cut (to [`ECHOED_CHANNEL_LEN`]), so a bad request is never mirrored whole.
pub fn subscription_error(channel: &str, kind: &str, message: &str, status: u16) -> String {
    to_json(&ObjectEvent {
        event: "pusher:subscription_error",
        channel: Some(truncate(channel, ECHOED_CHANNEL_LEN)),
        data: SubscriptionErrorData { kind, error: message, status },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_ids_round_trip_and_reject_junk() {
        let id = SocketId { high: 123, low: 4567 };
        assert_eq!(id.to_string(), "123.4567");
        assert_eq!("123.4567".parse::<SocketId>(), Ok(id));
        for bad in ["", "1", "1.", ".1", "1.2.3", "a.b", "-1.2", "1.99999999999", " 1.2"] {
            assert!(bad.parse::<SocketId>().is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn channel_names_follow_pushers_rules() {
        for good in ["a", "my-channel", "private-x_y=z@a,b.c;d", "presence-room.1", &"c".repeat(200)] {
            assert_eq!(validate_channel_name(good, 200), Ok(()), "{good}");
        }
        assert_eq!(validate_channel_name("", 200), Err(ChannelNameError::Empty));
        assert_eq!(validate_channel_name(&"c".repeat(201), 200), Err(ChannelNameError::TooLong(200)));
        assert_eq!(validate_channel_name(&"c".repeat(11), 10), Err(ChannelNameError::TooLong(10)), "the app's own limit");
        for bad in ["a b", "a/b", "é", "a#b", "a\"b"] {
            assert_eq!(validate_channel_name(bad, 200), Err(ChannelNameError::InvalidCharacter), "{bad}");
        }
    }

    #[test]
    fn events_may_go_to_a_users_channel() {
        assert_eq!(validate_publish_channel("#server-to-user-user 9", 200), Ok(()), "user ids are free text");
        assert_eq!(validate_publish_channel("chat", 200), Ok(()));
        assert_eq!(validate_publish_channel("#server-to-user-", 200), Err(ChannelNameError::Empty));
        assert_eq!(
            validate_publish_channel(&format!("#server-to-user-{}", "u".repeat(MAX_USER_ID_LEN + 1)), 200),
            Err(ChannelNameError::TooLong(MAX_USER_ID_LEN))
        );
        assert_eq!(validate_publish_channel("#other", 200), Err(ChannelNameError::InvalidCharacter));
    }

    #[test]
    fn channel_kinds_come_from_prefixes() {
        assert_eq!(ChannelKind::of("chat"), ChannelKind::Public);
        assert_eq!(ChannelKind::of("private-chat"), ChannelKind::Private);
        assert_eq!(ChannelKind::of("private-encrypted-chat"), ChannelKind::PrivateEncrypted);
        assert_eq!(ChannelKind::of("presence-chat"), ChannelKind::Presence);
    }

    #[test]
    fn cache_channels_are_any_kind_with_cache_after_its_prefix() {
        for cache in ["cache-price", "private-cache-x", "private-encrypted-cache-x", "presence-cache-room"] {
            assert!(is_cache_channel(cache), "{cache}");
        }
        for other in ["cached", "chat-cache-1", "private-x", "presence-cacheless", "private-encrypted-x"] {
            assert!(!is_cache_channel(other), "{other}");
        }
        assert_eq!(ChannelKind::of("private-cache-x"), ChannelKind::Private);
        assert_eq!(ChannelKind::of("presence-cache-room"), ChannelKind::Presence);
        let miss: serde_json::Value = serde_json::from_str(&cache_miss("cache-price")).unwrap();
        assert_eq!((miss["event"].as_str(), miss["channel"].as_str()), (Some("pusher:cache_miss"), Some("cache-price")));
    }

    #[test]
    fn data_may_be_an_object_or_a_string_holding_one() {
        let as_object: ClientMessage = serde_json::from_str(r#"{"event":"pusher:subscribe","data":{"channel":"a"}}"#).unwrap();
        let as_string: ClientMessage = serde_json::from_str(r#"{"event":"pusher:subscribe","data":"{\"channel\":\"a\"}"}"#).unwrap();
        assert_eq!(parse_data::<SubscribeData>(as_object.data).unwrap().channel, "a");
        assert_eq!(parse_data::<SubscribeData>(as_string.data).unwrap().channel, "a");
        assert!(parse_data::<SubscribeData>(None).is_err());
    }

    #[test]
    fn event_data_is_borrowed_unless_escapes_are_undone() {
        use std::borrow::Cow;
        let text = |json: &str| event_data_text(&RawValue::from_string(json.to_string()).unwrap()).into_owned();
        let borrowed = |json: &'static str| {
            let raw: &RawValue = serde_json::from_str(json).unwrap();
            matches!(event_data_text(raw), Cow::Borrowed(_))
        };
        assert_eq!(text(r#""plain text""#), "plain text");
        assert_eq!(text(r#""{\"x\":1}""#), r#"{"x":1}"#);
        assert_eq!(text(r#"{"x": 1}"#), r#"{"x": 1}"#, "not a string: its text as it came");
        assert!(borrowed(r#""plain text""#) && borrowed(r#"{"x":1}"#));
        assert!(!borrowed(r#""{\"x\":1}""#));
    }

    #[test]
    fn server_messages_have_pushers_shapes() {
        let established: serde_json::Value = serde_json::from_str(&connection_established(SocketId { high: 1, low: 2 }, 120)).unwrap();
        assert_eq!(established["event"], "pusher:connection_established");
        let data: serde_json::Value = serde_json::from_str(established["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["socket_id"], "1.2");
        assert_eq!(data["activity_timeout"], 120);

        let err: serde_json::Value = serde_json::from_str(&error(Some(4001), "nope")).unwrap();
        assert_eq!(err["data"]["code"], 4001);
        assert_eq!(err["data"]["message"], "nope");

        let ok: serde_json::Value = serde_json::from_str(&subscription_succeeded("c")).unwrap();
        assert_eq!(ok["channel"], "c");

        let event = serde_json::to_string(&EventMessage { event: "e", channel: Some("c"), data: "say \"hi\"", user_id: None }).unwrap();
        assert_eq!(event, r#"{"event":"e","channel":"c","data":"say \"hi\""}"#);
    }
}
