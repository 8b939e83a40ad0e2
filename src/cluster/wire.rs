//! What nodes say to each other over Redis, and its encoding (postcard, a compact serde format).
//!
//! Every Redis message is one [`Envelope`]: who sent it (node id and incarnation) and a
//! [`Body`]. A cache channel's last event is also stored in Redis, as a [`Kept`] under its
//! channel's key. Decoding borrows from the received bytes, so a broadcast's channel name and
//! event are read in place; nothing here touches a socket.

use serde::{Deserialize, Serialize};

/// One message on the cluster's Redis channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope<'a> {
    /// The sending node's id.
    pub node: &'a str,
    /// Which run of that node: drawn at random at start, so a restarted node is told apart from
    /// its earlier self, and two nodes given the same id are noticed.
    pub incarnation: u64,
    /// What it says.
    #[serde(borrow)]
    pub body: Body<'a>,
}

/// A channel as nodes name it: `(app id, channel name)`. Nodes may number their apps
/// differently; the id is the app's name everywhere.
pub type Channel<'a> = (&'a str, &'a str);

/// A channel's subscription count on the sending node.
pub type Count<'a> = (Channel<'a>, u32);

/// A user's presence in a presence channel on the sending node: `(channel, user_id, user_info)`,
/// where the info (raw JSON) is `None` once the user has no connection there any more.
pub type MemberChange<'a> = (Channel<'a>, &'a str, Option<&'a str>);

/// What a node says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body<'a> {
    /// An event for the subscribers of `channel` on every other node.
    Broadcast {
        /// The channel.
        #[serde(borrow)]
        channel: Channel<'a>,
        /// A socket that must not receive it (`(high, low)` of its socket id).
        except: Option<(u32, u32)>,
        /// When it was published, in microseconds since the Unix epoch, for the cross-node
        /// delivery time.
        published_at_us: u64,
        /// The Pusher event message, as its subscribers receive it.
        message: &'a str,
    },
    /// Close every connection signed in as this user (REST `terminate_connections`).
    Terminate {
        /// The user's app (its id).
        app: &'a str,
        /// The user.
        user_id: &'a str,
    },
    /// "I am alive": sent every heartbeat interval.
    Heartbeat {
        /// Where its clients connect (shown on dashboards).
        addr: &'a str,
        /// Its open connections.
        connections: u64,
        /// The sequence number of the last state message it sent (0: none yet), so a receiver
        /// that missed one knows.
        last_seq: u64,
        /// Its open connections per app (by id), for the apps' cluster-wide `max_connections`.
        #[serde(borrow)]
        apps: Vec<(&'a str, u64)>,
    },
    /// What changed on the sender since its previous state message.
    Delta {
        /// This state message's sequence number (one more than the previous).
        seq: u64,
        /// Each channel whose count changed, with its count on the sender now (0: none left).
        counts: Vec<Count<'a>>,
        /// Presence changes on the sender, in the order they happened.
        members: Vec<MemberChange<'a>>,
    },
    /// Everything the sender holds, replacing whatever a receiver knew of it.
    Snapshot {
        /// This state message's sequence number; deltas follow from the next one.
        seq: u64,
        /// Every channel the sender holds, with its count.
        counts: Vec<Count<'a>>,
        /// Every presence member with a connection on the sender.
        members: Vec<MemberChange<'a>>,
    },
    /// Asks a node (or, with `None`, every node) for a [`Body::Snapshot`].
    SyncRequest {
        /// The node asked.
        target: Option<&'a str>,
    },
    /// The sender is stopping: forget it now rather than at its timeout.
    Leaving,
    /// A subscriber of this cache channel found no event kept: for the node that reports the
    /// channel's webhooks, to post `cache_miss`. (Last, as every variant added later must be:
    /// postcard numbers variants in order, and nodes of two builds share a cluster while it is
    /// upgraded.)
    CacheMiss {
        /// The cache channel.
        #[serde(borrow)]
        channel: Channel<'a>,
    },
}

/// A cache channel's last event as Redis keeps it, for the nodes that were not there to see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept<'a> {
    /// When it was published, in microseconds since the Unix epoch: of two copies of a
    /// channel's last event, the later one wins.
    pub published_at_us: u64,
    /// The Pusher event message, as its subscribers receive it.
    pub message: &'a str,
}

impl<'a> Kept<'a> {
    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        // As for envelopes: nothing here postcard cannot represent.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Reads stored bytes, borrowing the message from them.
    pub fn decode(bytes: &'a [u8]) -> Result<Kept<'a>, DecodeError> {
        Ok(postcard::from_bytes(bytes)?)
    }
}

/// A message that could not be read.
#[derive(Debug, thiserror::Error)]
#[error("unreadable cluster message: {0}")]
pub struct DecodeError(#[from] postcard::Error);

impl<'a> Envelope<'a> {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing into a Vec fails only on types postcard cannot represent; these have none.
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Reads a message, borrowing its strings from `bytes`.
    pub fn decode(bytes: &'a [u8]) -> Result<Envelope<'a>, DecodeError> {
        Ok(postcard::from_bytes(bytes)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(body: Body<'_>) {
        let envelope = Envelope { node: "node-a", incarnation: 42, body };
        let bytes = envelope.encode();
        assert_eq!(Envelope::decode(&bytes).expect("decodes"), envelope);
    }

    #[test]
    fn every_body_round_trips() {
        round_trip(Body::Broadcast {
            channel: ("app", "chat"),
            except: Some((1, 2)),
            published_at_us: 1_700_000_000_000_000,
            message: r#"{"event":"e","channel":"chat","data":"{}"}"#,
        });
        round_trip(Body::Terminate { app: "app", user_id: "u1" });
        round_trip(Body::CacheMiss { channel: ("app", "cache-price") });
        round_trip(Body::Heartbeat { addr: "127.0.0.1:6001", connections: 7, last_seq: 9, apps: vec![("app-a", 5), ("app-b", 2)] });
        round_trip(Body::Delta {
            seq: 3,
            counts: vec![(("app", "a"), 1), (("app", "b"), 0)],
            members: vec![(("app", "presence-a"), "u1", Some(r#"{"name":"Ann"}"#)), (("app", "presence-a"), "u2", None)],
        });
        round_trip(Body::Snapshot { seq: 4, counts: vec![], members: vec![] });
        round_trip(Body::SyncRequest { target: None });
        round_trip(Body::SyncRequest { target: Some("node-b") });
        round_trip(Body::Leaving);
    }

    #[test]
    fn a_broadcast_is_its_payload_and_a_few_bytes() {
        let message = "x".repeat(100);
        let envelope = Envelope {
            node: "n1",
            incarnation: u64::MAX,
            body: Body::Broadcast { channel: ("app", "chat"), except: None, published_at_us: u64::MAX, message: &message },
        };
        assert!(envelope.encode().len() < 100 + 40, "{} bytes", envelope.encode().len());
    }

    #[test]
    fn variants_keep_their_numbers_for_nodes_of_other_builds() {
        // After the node id ("n": length and byte) and the incarnation (0): the variant.
        let variant = |body| Envelope { node: "n", incarnation: 0, body }.encode()[3];
        assert_eq!(variant(Body::Terminate { app: "a", user_id: "u" }), 1);
        assert_eq!(variant(Body::Leaving), 6);
        assert_eq!(variant(Body::CacheMiss { channel: ("a", "cache-x") }), 7);
    }

    #[test]
    fn a_kept_event_round_trips_and_garbage_is_an_error() {
        let kept = Kept { published_at_us: 1_700_000_000_000_000, message: r#"{"event":"e","channel":"cache-x","data":"1"}"# };
        assert_eq!(Kept::decode(&kept.encode()).expect("decodes"), kept);
        assert!(Kept::decode(b"").is_err());
        assert!(Kept::decode(&[0xff; 12]).is_err());
    }

    #[test]
    fn garbage_and_truncated_messages_are_errors_not_panics() {
        assert!(Envelope::decode(b"").is_err());
        assert!(Envelope::decode(&[0xff; 64]).is_err());
        let bytes = Envelope { node: "n", incarnation: 1, body: Body::Terminate { app: "a", user_id: "someone" } }.encode();
        for cut in 0..bytes.len() {
            assert!(Envelope::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
