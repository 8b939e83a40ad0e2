//! What a webhook says: the events Pusher posts to an app's server, the JSON body that carries
//! a batch of them, and the signature over that body.
//!
//! Pure functions of their input; nothing here touches a socket or reads a clock.

use std::fmt::Display;

use serde::{Serialize, Serializer};

use crate::pusher::protocol::{ChannelName, SocketId};
use crate::pusher::signature::hmac_hex;

/// One webhook event, serialized exactly as Pusher sends it: an object whose `name` says which
/// event it is (`channel_occupied`, ...), with that event's fields beside it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "name", rename_all = "snake_case")]
pub enum WebhookEvent {
    /// A channel got its first subscriber (on the node).
    ChannelOccupied {
        /// The channel.
        #[serde(serialize_with = "as_string")]
        channel: ChannelName,
    },
    /// A channel lost its last subscriber.
    ChannelVacated {
        /// The channel.
        #[serde(serialize_with = "as_string")]
        channel: ChannelName,
    },
    /// A user's first connection joined a presence channel.
    MemberAdded {
        /// The presence channel.
        #[serde(serialize_with = "as_string")]
        channel: ChannelName,
        /// The user, as in the channel's `channel_data`.
        user_id: String,
    },
    /// A user's last connection left a presence channel.
    MemberRemoved {
        /// The presence channel.
        #[serde(serialize_with = "as_string")]
        channel: ChannelName,
        /// The user.
        user_id: String,
    },
    /// A client subscribed to a cache channel that had no event kept (reported at most once per
    /// channel every few seconds: see [`crate::pusher::cache::MISS_REPORT_EVERY`]).
    CacheMiss {
        /// The cache channel.
        #[serde(serialize_with = "as_string")]
        channel: ChannelName,
    },
    /// A client sent a `client-*` event on a private or presence channel.
    ClientEvent {
        /// The channel it was sent on.
        #[serde(serialize_with = "as_string")]
        channel: ChannelName,
        /// The event's name (`client-...`).
        event: String,
        /// The event's data, as the client sent it (a string, usually of JSON).
        data: String,
        /// The sender's connection.
        #[serde(serialize_with = "as_string")]
        socket_id: SocketId,
        /// The sender's user on a presence channel; Pusher omits the field elsewhere.
        #[serde(skip_serializing_if = "Option::is_none")]
        user_id: Option<String>,
    },
    /// A channel's subscription count changed (for apps with `subscription_count_events`, at
    /// most once a second per channel, as the events to its subscribers).
    SubscriptionCount {
        /// The channel.
        #[serde(serialize_with = "as_string")]
        channel: ChannelName,
        /// Its subscriptions now.
        subscription_count: u32,
    },
}

impl WebhookEvent {
    /// The channel it is about, whose app's webhooks it goes to.
    pub fn channel(&self) -> &ChannelName {
        match self {
            WebhookEvent::ChannelOccupied { channel }
            | WebhookEvent::ChannelVacated { channel }
            | WebhookEvent::MemberAdded { channel, .. }
            | WebhookEvent::MemberRemoved { channel, .. }
            | WebhookEvent::CacheMiss { channel }
            | WebhookEvent::ClientEvent { channel, .. }
            | WebhookEvent::SubscriptionCount { channel, .. } => channel,
        }
    }

    /// Its Pusher name, as webhooks' `event_types` list it.
    pub fn name(&self) -> &'static str {
        match self {
            WebhookEvent::ChannelOccupied { .. } => "channel_occupied",
            WebhookEvent::ChannelVacated { .. } => "channel_vacated",
            WebhookEvent::MemberAdded { .. } => "member_added",
            WebhookEvent::MemberRemoved { .. } => "member_removed",
            WebhookEvent::CacheMiss { .. } => "cache_miss",
            WebhookEvent::ClientEvent { .. } => "client_event",
            WebhookEvent::SubscriptionCount { .. } => "subscription_count",
        }
    }
}

/// Channel names are `Arc<str>` and socket ids a pair of numbers; both travel as JSON strings.
/// (serde's `rc` feature would cover the first, but this also covers the second.)
fn as_string<T: Display, S: Serializer>(value: &T, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

/// The body of one webhook POST.
#[derive(Serialize)]
struct Body<'a> {
    time_ms: u64,
    events: &'a [WebhookEvent],
}

/// The JSON body Pusher posts for `events`, stamped `time_ms` (milliseconds since the epoch).
pub fn body(events: &[WebhookEvent], time_ms: u64) -> Result<String, serde_json::Error> {
    serde_json::to_string(&Body { time_ms, events })
}

/// The `X-Pusher-Signature` of `body`: hex HMAC-SHA256 under the app's secret, the same MAC that
/// signs REST calls, so receivers verify it with the official SDKs' webhook helpers.
pub fn signature(secret: &str, body: &str) -> String {
    hmac_hex(secret, body)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::pusher::protocol::ChannelName;
    use crate::pusher::signature::hmac_matches;
    use crate::pusher::AppIndex;

    fn to_json(event: &WebhookEvent) -> Value {
        serde_json::to_value(event).expect("events serialize")
    }

    #[test]
    fn events_serialize_as_pusher_documents_them() {
        let channel = ChannelName::new(AppIndex(0), "presence-room");
        assert_eq!(
            to_json(&WebhookEvent::ChannelOccupied { channel: channel.clone() }),
            json!({"name": "channel_occupied", "channel": "presence-room"})
        );
        assert_eq!(
            to_json(&WebhookEvent::ChannelVacated { channel: channel.clone() }),
            json!({"name": "channel_vacated", "channel": "presence-room"})
        );
        assert_eq!(
            to_json(&WebhookEvent::CacheMiss { channel: ChannelName::new(AppIndex(0), "cache-price") }),
            json!({"name": "cache_miss", "channel": "cache-price"})
        );
        assert_eq!(
            to_json(&WebhookEvent::MemberAdded { channel: channel.clone(), user_id: "42".into() }),
            json!({"name": "member_added", "channel": "presence-room", "user_id": "42"})
        );
        assert_eq!(
            to_json(&WebhookEvent::MemberRemoved { channel: channel.clone(), user_id: "42".into() }),
            json!({"name": "member_removed", "channel": "presence-room", "user_id": "42"})
        );
        let client_event = |user_id: Option<&str>| WebhookEvent::ClientEvent {
            channel: channel.clone(),
            event: "client-typing".into(),
            data: r#"{"data":1234}"#.into(),
            socket_id: SocketId { high: 34718, low: 5367461 },
            user_id: user_id.map(str::to_string),
        };
        assert_eq!(
            to_json(&client_event(Some("42"))),
            json!({"name": "client_event", "channel": "presence-room", "event": "client-typing",
                   "data": "{\"data\":1234}", "socket_id": "34718.5367461", "user_id": "42"})
        );
        assert!(to_json(&client_event(None)).get("user_id").is_none(), "no user_id outside presence");
        let count = WebhookEvent::SubscriptionCount { channel: ChannelName::new(AppIndex(0), "news"), subscription_count: 7 };
        assert_eq!(to_json(&count), json!({"name": "subscription_count", "channel": "news", "subscription_count": 7}));
        for event in [count, client_event(None), WebhookEvent::ChannelVacated { channel: channel.clone() }] {
            assert_eq!(to_json(&event)["name"], event.name(), "the name event_types filter on is the name posted");
            assert_eq!(event.channel().to_string(), to_json(&event)["channel"]);
        }
    }

    #[test]
    fn the_body_carries_time_ms_and_the_events_in_order() {
        let events = [
            WebhookEvent::ChannelOccupied { channel: ChannelName::new(AppIndex(0), "a") },
            WebhookEvent::ChannelVacated { channel: ChannelName::new(AppIndex(0), "a") },
        ];
        let body = body(&events, 1_396_258_618_139).expect("serializes");
        let value: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(value["time_ms"], 1_396_258_618_139u64);
        assert_eq!(value["events"][0]["name"], "channel_occupied");
        assert_eq!(value["events"][1]["name"], "channel_vacated");
    }

    #[test]
    fn the_signature_is_the_hmac_of_the_exact_body() {
        let body = body(&[WebhookEvent::ChannelOccupied { channel: ChannelName::new(AppIndex(0), "c") }], 1).expect("serializes");
        let signature = signature("app-secret", &body);
        assert_eq!(signature.len(), 64, "hex SHA-256");
        assert!(hmac_matches("app-secret", &body, &signature));
        assert!(!hmac_matches("other-secret", &body, &signature));
        assert!(!hmac_matches("app-secret", &body.replace("\"c\"", "\"d\""), &signature));
    }
}
