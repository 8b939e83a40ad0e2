//! Presence membership (sans-IO): who is in each presence channel, and which changes the other
//! members must hear about.
//!
//! Every presence channel has one owner worker (see [`owner_of`]), whose [`Rosters`] counts each
//! user's connections: a user is one member however many connections they have, added on the
//! first and removed with the last. Changes are not announced at once: a user's changes inside
//! the coalescing window collapse into their net effect, so a reconnect flap (leave, then join
//! again) announces nothing; and changes go out in batches at most once per window, so under
//! churn each member's socket gets one write per window carrying many changes, not one write
//! per change. A batch holds at most half a ring of changes ([`batch_for_ring`]), so a join
//! storm goes out in parts that fit the members' rings. Time is an input (`now`), so all of this is tested with a
//! virtual clock.
//!
//! In a cluster a roster also holds the users that only other nodes have connections of
//! ([`Rosters::set_elsewhere`], fed by the cluster): they are members like any other, listed to
//! joiners and counted against the limit, and a user is removed only when neither this node nor
//! any other holds a connection of theirs.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;

use super::protocol::{ChannelKey, ChannelMap, ChannelName, SocketId, MAX_USER_ID_LEN};
use crate::fanout::WorkerId;

/// The worker that owns `channel`'s roster: the same answer on every worker of a node.
pub fn owner_of(channel: &str, workers: usize) -> WorkerId {
    // SipHash with fixed keys: stable across workers (and runs of one binary).
    let mut hasher = DefaultHasher::new();
    channel.hash(&mut hasher);
    WorkerId((hasher.finish() % workers.max(1) as u64) as usize)
}

/// A member as the client's `channel_data` describes it.
#[derive(Debug, Clone)]
pub struct Member {
    /// The user's id (a number in `channel_data` becomes its decimal string, as in Pusher).
    pub user_id: String,
    /// The user's info (`null` when absent), checked as JSON once, when the member joins, and
    /// written out as it is into every member list and `member_added` after that.
    pub user_info: Box<RawValue>,
}

impl PartialEq for Member {
    fn eq(&self, other: &Member) -> bool {
        self.user_id == other.user_id && self.user_info.get() == other.user_info.get()
    }
}

impl Eq for Member {}

/// Why a `channel_data` was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemberError {
    /// Not a JSON object with a `user_id`.
    #[error("channel_data must be a JSON object with a user_id: {0}")]
    Malformed(String),
    /// `user_id` is empty or too long.
    #[error("user_id must be 1 to {MAX_USER_ID_LEN} characters")]
    UserId,
    /// `user_info` is larger than the app allows (`max_presence_member_size_kb`), in bytes.
    #[error("user_info must be at most {0} bytes (max_presence_member_size_kb)")]
    UserInfo(usize),
}

#[derive(Deserialize)]
struct ChannelData<'a> {
    user_id: UserId,
    #[serde(default, borrow)]
    user_info: Option<&'a RawValue>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum UserId {
    Text(String),
    Number(serde_json::Number),
}

impl Member {
    /// Reads a presence subscription's `channel_data`, whose `user_info` may have
    /// `max_info_bytes` at most.
    pub fn parse(channel_data: &str, max_info_bytes: usize) -> Result<Member, MemberError> {
        let data: ChannelData = serde_json::from_str(channel_data).map_err(|e| MemberError::Malformed(e.to_string()))?;
        let user_id = match data.user_id {
            UserId::Text(id) => id,
            UserId::Number(n) => n.to_string(),
        };
        if user_id.is_empty() || user_id.len() > MAX_USER_ID_LEN {
            return Err(MemberError::UserId);
        }
        let user_info = data.user_info.map_or_else(|| RawValue::NULL.to_owned(), RawValue::to_owned);
        if user_info.get().len() > max_info_bytes {
            return Err(MemberError::UserInfo(max_info_bytes));
        }
        Ok(Member { user_id, user_info })
    }
}

/// Why a join was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    /// The channel has as many members as allowed.
    #[error("presence channel is full ({0} members)")]
    Full(usize),
}

/// A change the other members must hear about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `pusher_internal:member_added`, to everyone but `except` (the joining connection).
    Added {
        /// The channel.
        channel: ChannelName,
        /// The member.
        member: Member,
        /// The connection whose join made the user a member.
        except: Option<SocketId>,
    },
    /// `pusher_internal:member_removed`.
    Removed {
        /// The channel.
        channel: ChannelName,
        /// The user who left.
        user_id: String,
    },
}

#[derive(Debug)]
struct Present {
    user_info: Box<RawValue>,
    /// The user's connections in the channel on this node (usually one or two; none when only
    /// other nodes hold them).
    sockets: Vec<SocketId>,
    /// Whether another node of the cluster holds a connection of the user's in the channel.
    elsewhere: bool,
}

/// A user whose membership changed inside the window: was it a member before the first change?
#[derive(Debug)]
struct Pending {
    was_member: bool,
    joined_by: Option<SocketId>,
}

#[derive(Debug, Default)]
struct Roster {
    members: IndexMap<String, Present>,
    /// Whose connection each socket is, so a leave needs only the socket.
    users: HashMap<SocketId, String>,
    pending: HashMap<String, Pending>,
}

/// A join accepted by [`Rosters::join`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The `subscription_succeeded` data: the member list, the joiner included.
    pub data: String,
    /// Whether this connection made the user a member (their first connection anywhere).
    pub new_member: bool,
    /// Whether it is the user's first connection to the channel on this node.
    pub first_here: bool,
}

/// A leave seen by [`Rosters::leave`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Left {
    /// The user whose connection it was.
    pub user_id: String,
    /// It was the user's last connection to the channel on this node.
    pub last_here: bool,
    /// It was their last anywhere: they are no longer a member.
    pub gone: bool,
}

/// The `presence` object of `subscription_succeeded`.
#[derive(Serialize)]
struct PresenceData<'a> {
    presence: PresenceSet<'a>,
}

/// Streams the roster: a join in a guild of thousands copies or hashes no member list.
#[derive(Serialize)]
struct PresenceSet<'a> {
    #[serde(serialize_with = "member_ids")]
    ids: Listed<'a>,
    #[serde(serialize_with = "member_infos")]
    hash: Listed<'a>,
    count: usize,
}

/// The members a joiner is told of: itself, and everyone already announced. A member whose
/// `member_added` is still waiting out the coalescing window is left out: the joiner hears of
/// them with everyone else, so no member is both listed and then added.
#[derive(Clone, Copy)]
struct Listed<'a> {
    roster: &'a Roster,
    joiner: &'a str,
}

impl<'a> Listed<'a> {
    fn members(self) -> impl Iterator<Item = (&'a String, &'a Present)> {
        let Listed { roster, joiner } = self;
        roster.members.iter().filter(move |(id, _)| *id == joiner || roster.pending.get(*id).is_none_or(|p| p.was_member))
    }
}

/// Changes announced in one batch at most. A batch lands in every member's ring at once, so it
/// must fit there with room to spare (see [`batch_for_ring`]): a join storm's thousands of
/// member_added would otherwise overflow every ring, and a member that misses a change is evicted
/// rather than left with a wrong roster.
const MAX_BATCH: usize = 100;

/// The largest batch for rings of `ring_slots` frames: at most half a ring, so a member's ring
/// still has room for a batch when the previous one has not been written out yet.
pub fn batch_for_ring(ring_slots: usize) -> usize {
    MAX_BATCH.min(ring_slots / 2).max(1)
}

/// How soon the rest of a batch that was cut short follows: long enough for the worker to write
/// the previous part out (a large flush is held for at most its write-coalescing interval,
/// 10 ms by default).
const CATCH_UP: Duration = Duration::from_millis(25);

/// The rosters of the presence channels one worker owns.
#[derive(Debug)]
pub struct Rosters {
    window: Duration,
    max_batch: usize,
    channels: ChannelMap<Roster>,
    /// Pending changes in the order they began (so by deadline).
    due: VecDeque<(Instant, ChannelName, String)>,
    /// When the previous batch went out; the next waits a window after it.
    last_batch: Option<Instant>,
    /// The previous batch was cut at `max_batch` with more due: the next waits only [`CATCH_UP`].
    cut_short: bool,
}

impl Rosters {
    /// Rosters that coalesce each user's changes over `window` and announce at most
    /// `max_batch` changes at once.
    pub fn new(window: Duration, max_batch: usize) -> Self {
        Rosters { window, max_batch, channels: ChannelMap::default(), due: VecDeque::new(), last_batch: None, cut_short: false }
    }

    /// Connection `socket` joins `channel` as `member`, where the channel's app allows
    /// `max_members` members; or why it may not.
    pub fn join(
        &mut self,
        channel: &ChannelName,
        member: &Member,
        max_members: usize,
        socket: SocketId,
        now: Instant,
    ) -> Result<Joined, JoinError> {
        let full = self.channels.get(channel).is_some_and(|r| r.members.len() >= max_members);
        let roster = self.channels.entry(channel.clone()).or_default();
        if roster.users.contains_key(&socket) {
            // Already in (a repeated join): nothing changes.
            return Ok(Joined { data: presence_data(roster, &member.user_id), new_member: false, first_here: false });
        }
        let (new_member, first_here) = match roster.members.get_mut(&member.user_id) {
            Some(present) => {
                present.sockets.push(socket);
                // The latest connection's info wins, as it would on Pusher.
                present.user_info.clone_from(&member.user_info);
                (false, present.sockets.len() == 1)
            }
            None if full => return Err(JoinError::Full(max_members)),
            None => {
                let present = Present { user_info: member.user_info.clone(), sockets: vec![socket], elsewhere: false };
                roster.members.insert(member.user_id.clone(), present);
                mark_pending(&mut self.due, roster, channel, &member.user_id, false, now).joined_by = Some(socket);
                (true, true)
            }
        };
        roster.users.insert(socket, member.user_id.clone());
        Ok(Joined { data: presence_data(roster, &member.user_id), new_member, first_here })
    }

    /// The `subscription_succeeded` data for member `socket` of `channel` now, as a joiner would
    /// get it (`None` if it is not a member).
    pub fn listing(&self, channel: &ChannelName, socket: SocketId) -> Option<String> {
        let roster = self.channels.get(channel)?;
        let user_id = roster.users.get(&socket)?;
        Some(presence_data(roster, user_id))
    }

    /// Connection `socket` left `channel` (unsubscribed or closed). A socket that never joined
    /// changes nothing (`None`).
    pub fn leave(&mut self, channel: &ChannelName, socket: SocketId, now: Instant) -> Option<Left> {
        let roster = self.channels.get_mut(channel)?;
        let user_id = roster.users.remove(&socket)?;
        let present = roster.members.get_mut(&user_id)?;
        present.sockets.retain(|&s| s != socket);
        let last_here = present.sockets.is_empty();
        let gone = last_here && !present.elsewhere;
        if gone {
            roster.members.swap_remove(&user_id);
            mark_pending(&mut self.due, roster, channel, &user_id, true, now);
        }
        Some(Left { user_id, last_here, gone })
    }

    /// Another node of the cluster now holds a connection of `user_id`'s in `channel`
    /// (`Some(user_info)`), or none of them does any more (`None`). Returns `Some(true)` when
    /// that made the user a member, `Some(false)` when it removed them, `None` otherwise. The
    /// limit is not checked here: the node that holds them admitted them.
    pub fn set_elsewhere(&mut self, channel: &ChannelName, user_id: &str, user_info: Option<Box<RawValue>>, now: Instant) -> Option<bool> {
        let roster = self.channels.entry(channel.clone()).or_default();
        match (roster.members.get_mut(user_id), user_info) {
            (Some(present), Some(_)) => {
                present.elsewhere = true;
                None
            }
            (None, Some(user_info)) => {
                roster.members.insert(user_id.to_string(), Present { user_info, sockets: Vec::new(), elsewhere: true });
                mark_pending(&mut self.due, roster, channel, user_id, false, now);
                Some(true)
            }
            (Some(present), None) if !present.sockets.is_empty() => {
                present.elsewhere = false;
                None
            }
            (Some(_), None) => {
                roster.members.swap_remove(user_id);
                mark_pending(&mut self.due, roster, channel, user_id, true, now);
                Some(false)
            }
            (None, None) => {
                if roster.members.is_empty() && roster.pending.is_empty() {
                    self.channels.remove(channel);
                }
                None
            }
        }
    }

    /// When [`poll_changes`](Self::poll_changes) next has something to give: once the oldest
    /// pending change has waited a whole window, and a window after the previous batch (or
    /// [`CATCH_UP`] after it, if that batch was cut short).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let gap = if self.cut_short { CATCH_UP } else { self.window };
        self.due.front().map(|(since, _, _)| {
            let ready = *since + self.window;
            self.last_batch.map_or(ready, |last| ready.max(last + gap))
        })
    }

    /// The next batch: the net changes whose window has passed by `now`, oldest first, at most
    /// `max_batch` (empty before [`poll_timeout`](Self::poll_timeout)).
    pub fn poll_changes(&mut self, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        if self.poll_timeout().is_none_or(|at| now < at) {
            return changes;
        }
        self.last_batch = Some(now);
        let is_due = |(since, _, _): &(Instant, ChannelName, String)| *since + self.window <= now;
        while let Some(front) = self.due.front() {
            if !is_due(front) {
                break;
            }
            if changes.len() == self.max_batch {
                break;
            }
            let Some((_, channel, user_id)) = self.due.pop_front() else { break };
            let Some(roster) = self.channels.get_mut(&channel) else { continue };
            let Some(pending) = roster.pending.remove(&user_id) else { continue };
            match (pending.was_member, roster.members.get(&user_id)) {
                (false, Some(present)) => changes.push(Change::Added {
                    channel: channel.clone(),
                    member: Member { user_id, user_info: present.user_info.clone() },
                    except: pending.joined_by,
                }),
                (true, None) => changes.push(Change::Removed { channel: channel.clone(), user_id }),
                // Joined and left, or left and came back, inside the window: nothing to say.
                _ => {}
            }
            if roster.members.is_empty() && roster.pending.is_empty() {
                self.channels.remove(&channel);
            }
        }
        self.cut_short = changes.len() == self.max_batch && self.due.front().is_some_and(is_due);
        changes
    }

    /// Members of `channel` now.
    pub fn count(&self, channel: &ChannelName) -> usize {
        self.channels.get(channel).map_or(0, |r| r.members.len())
    }

    /// Whether `channel` has changes not announced yet.
    pub fn has_pending(&self, channel: &ChannelName) -> bool {
        self.channels.get(channel).is_some_and(|r| !r.pending.is_empty())
    }
}

/// The user's pending change in `roster`, begun `now` (with `was_member` before it) unless one
/// is already waiting; a new one joins the queue of due changes.
fn mark_pending<'r>(
    due: &mut VecDeque<(Instant, ChannelName, String)>,
    roster: &'r mut Roster,
    channel: &ChannelName,
    user_id: &str,
    was_member: bool,
    now: Instant,
) -> &'r mut Pending {
    roster.pending.entry(user_id.to_string()).or_insert_with(|| {
        due.push_back((now, channel.clone(), user_id.to_string()));
        Pending { was_member, joined_by: None }
    })
}

fn presence_data(roster: &Roster, joiner: &str) -> String {
    let listed = Listed { roster, joiner };
    // A roster of thousands is hundreds of KB, sent to every joiner: its size is counted first
    // (each id twice, quoted, and each user_info), so the string is allocated once instead of
    // grown by doubling from 128 bytes (issue 16).
    let (count, size) =
        listed.members().fold((0, 64), |(n, size), (id, present)| (n + 1, size + 2 * id.len() + present.user_info.get().len() + 8));
    let data = PresenceData { presence: PresenceSet { ids: listed, hash: listed, count } };
    let mut json = Vec::with_capacity(size);
    // Serializing ids and JSON values cannot fail, and serde_json writes UTF-8.
    match serde_json::to_writer(&mut json, &data) {
        Ok(()) => String::from_utf8(json).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

fn member_ids<S: Serializer>(listed: &Listed<'_>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_seq(listed.members().map(|(id, _)| id))
}

fn member_infos<S: Serializer>(listed: &Listed<'_>, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.collect_map(listed.members().map(|(id, present)| (id, &*present.user_info)))
}

/// One worker's replica of every presence channel's user ids, for the REST API (`/users`,
/// `user_count`). Owners send each membership change to every worker as it happens.
#[derive(Debug, Default)]
pub struct Membership {
    channels: ChannelMap<indexmap::IndexSet<String>>,
}

impl Membership {
    /// Applies an owner's report that `user_id` is (or no longer is) a member of `channel`.
    pub fn apply(&mut self, channel: &ChannelName, user_id: &str, present: bool) {
        if present {
            self.channels.entry(channel.clone()).or_default().insert(user_id.to_string());
        } else if let Some(users) = self.channels.get_mut(channel) {
            users.swap_remove(user_id);
            if users.is_empty() {
                self.channels.remove(channel);
            }
        }
    }

    /// The user ids in `channel`.
    pub fn users(&self, channel: ChannelKey<'_>) -> impl Iterator<Item = &str> {
        self.channels.get(&channel).into_iter().flatten().map(String::as_str)
    }

    /// How many users are in `channel`.
    pub fn user_count(&self, channel: ChannelKey<'_>) -> usize {
        self.channels.get(&channel).map_or(0, |users| users.len())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(150);

    fn member(id: &str) -> Member {
        Member::parse(&format!(r#"{{"user_id":"{id}","user_info":{{"name":"{id}"}}}}"#), 1024).unwrap()
    }

    /// A socket id for tests (other modules' tests use it too).
    pub(crate) fn socket(low: u32) -> SocketId {
        SocketId { high: 1, low }
    }

    /// The presence channel of the tests.
    pub(crate) fn room() -> ChannelName {
        ChannelName::new(crate::pusher::AppIndex(0), "presence-room")
    }

    #[test]
    fn channel_data_is_read_and_limited() {
        let ann = Member::parse(r#"{"user_id":"u1","user_info":{"name":"Ann"}}"#, 1024).unwrap();
        assert_eq!((ann.user_id.as_str(), ann.user_info.get()), ("u1", r#"{"name":"Ann"}"#));
        let ten = Member::parse(r#"{"user_id":10}"#, 1024).unwrap();
        assert_eq!((ten.user_id.as_str(), ten.user_info.get()), ("10", "null"));
        assert!(matches!(Member::parse("nope", 1024), Err(MemberError::Malformed(_))));
        assert!(matches!(Member::parse(r#"{"user_info":{}}"#, 1024), Err(MemberError::Malformed(_))));
        assert_eq!(Member::parse(r#"{"user_id":""}"#, 1024), Err(MemberError::UserId));
        assert_eq!(Member::parse(&format!(r#"{{"user_id":"{}"}}"#, "u".repeat(129)), 1024), Err(MemberError::UserId));
        let big = format!(r#"{{"user_id":"u","user_info":"{}"}}"#, "x".repeat(1100));
        assert_eq!(Member::parse(&big, 1024), Err(MemberError::UserInfo(1024)));
        assert!(Member::parse(&big, 2048).is_ok(), "an app may allow more");
    }

    #[test]
    fn subscription_data_lists_every_member_once() {
        let t0 = Instant::now();
        let mut rosters = Rosters::new(WINDOW, MAX_BATCH);
        rosters.join(&room(), &member("a"), 100, socket(1), t0).unwrap();
        rosters.join(&room(), &member("b"), 100, socket(2), t0).unwrap();
        assert_eq!(rosters.poll_changes(t0 + WINDOW).len(), 2);
        let joined = rosters.join(&room(), &member("a"), 100, socket(3), t0 + WINDOW).unwrap();
        assert!(!joined.new_member);
        let data: serde_json::Value = serde_json::from_str(&joined.data).unwrap();
        assert_eq!(data["presence"]["ids"], serde_json::json!(["a", "b"]));
        assert_eq!(data["presence"]["count"], 2);
        assert_eq!(data["presence"]["hash"]["b"]["name"], "b");
    }

    #[test]
    fn users_on_other_nodes_are_members_until_no_node_holds_them() {
        let t0 = Instant::now();
        let mut rosters = Rosters::new(WINDOW, MAX_BATCH);
        let info = || RawValue::from_string(r#"{"name":"r"}"#.into()).unwrap();
        assert_eq!(rosters.set_elsewhere(&room(), "remote", Some(info()), t0), Some(true));
        assert_eq!(rosters.set_elsewhere(&room(), "remote", Some(info()), t0), None, "already a member");
        let joined = rosters.join(&room(), &member("remote"), 2, socket(1), t0).unwrap();
        assert_eq!((joined.new_member, joined.first_here), (false, true), "a member already, but new here");
        rosters.join(&room(), &member("local"), 2, socket(2), t0).unwrap();
        assert_eq!(rosters.join(&room(), &member("third"), 2, socket(3), t0), Err(JoinError::Full(2)), "remote members count");
        let changes = rosters.poll_changes(t0 + WINDOW);
        assert!(matches!(&changes[0], Change::Added { member, except: None, .. } if member.user_id == "remote"), "{changes:?}");
        assert_eq!(rosters.leave(&room(), socket(1), t0 + WINDOW), Some(Left { user_id: "remote".into(), last_here: true, gone: false }));
        assert_eq!(rosters.set_elsewhere(&room(), "remote", None, t0 + WINDOW), Some(false), "no connection anywhere");
        assert_eq!(rosters.set_elsewhere(&room(), "local", None, t0 + WINDOW), None, "still held here");
        assert_eq!(rosters.poll_changes(t0 + 2 * WINDOW), vec![Change::Removed { channel: room(), user_id: "remote".into() }]);
        assert_eq!(rosters.count(&room()), 1);
    }

    #[test]
    fn a_joiner_is_not_told_of_a_member_whose_member_added_is_still_to_come() {
        let t0 = Instant::now();
        let mut rosters = Rosters::new(WINDOW, MAX_BATCH);
        rosters.join(&room(), &member("a"), 100, socket(1), t0).unwrap();
        let joined = rosters.join(&room(), &member("b"), 100, socket(2), t0 + WINDOW / 2).unwrap();
        let data: serde_json::Value = serde_json::from_str(&joined.data).unwrap();
        assert_eq!(data["presence"]["ids"], serde_json::json!(["b"]), "a's member_added is still to come");
        assert_eq!(data["presence"]["count"], 1);
        let changes = rosters.poll_changes(t0 + WINDOW);
        assert!(
            matches!(&changes[0], Change::Added { member, except, .. } if member.user_id == "a" && *except == Some(socket(1))),
            "b hears of a with everyone else but a: {changes:?}"
        );
    }

    #[test]
    fn a_user_is_added_with_the_first_connection_and_removed_with_the_last() {
        let t0 = Instant::now();
        let mut rosters = Rosters::new(WINDOW, MAX_BATCH);
        assert!(rosters.join(&room(), &member("a"), 100, socket(1), t0).unwrap().new_member);
        assert_eq!(rosters.poll_timeout(), Some(t0 + WINDOW));
        assert_eq!(rosters.poll_changes(t0 + WINDOW - Duration::from_millis(1)), vec![]);
        assert_eq!(
            rosters.poll_changes(t0 + WINDOW),
            vec![Change::Added { channel: room(), member: member("a"), except: Some(socket(1)) }]
        );
        // A second connection of the same user: no news, either way.
        let t1 = t0 + Duration::from_secs(1);
        rosters.join(&room(), &member("a"), 100, socket(2), t1).unwrap();
        assert!(!rosters.leave(&room(), socket(1), t1).expect("joined").gone);
        assert_eq!(rosters.poll_timeout(), None);
        assert_eq!(rosters.count(&room()), 1);
        // A socket that is not in the channel changes nothing.
        assert_eq!(rosters.leave(&room(), socket(9), t1), None);
        // The last connection leaves.
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(rosters.leave(&room(), socket(2), t2), Some(Left { user_id: "a".into(), last_here: true, gone: true }));
        assert_eq!(rosters.count(&room()), 0);
        assert!(rosters.has_pending(&room()));
        assert_eq!(rosters.poll_changes(t2 + WINDOW), vec![Change::Removed { channel: room(), user_id: "a".into() }]);
        assert!(!rosters.has_pending(&room()));
        assert_eq!(rosters.poll_timeout(), None);
    }

    #[test]
    fn a_reconnect_flap_inside_the_window_announces_nothing() {
        let t0 = Instant::now();
        let mut rosters = Rosters::new(WINDOW, MAX_BATCH);
        rosters.join(&room(), &member("a"), 100, socket(1), t0).unwrap();
        rosters.poll_changes(t0 + WINDOW);
        let t1 = t0 + Duration::from_secs(1);
        rosters.leave(&room(), socket(1), t1);
        rosters.join(&room(), &member("a"), 100, socket(2), t1 + Duration::from_millis(50)).unwrap();
        assert_eq!(rosters.poll_changes(t1 + WINDOW * 2), vec![]);
        // Likewise a join that is undone at once.
        rosters.join(&room(), &member("b"), 100, socket(3), t1).unwrap();
        rosters.leave(&room(), socket(3), t1 + Duration::from_millis(10));
        assert_eq!(rosters.poll_changes(t1 + WINDOW * 2), vec![]);
        assert_eq!(rosters.count(&room()), 1);
    }

    #[test]
    fn changes_go_out_in_batches_at_most_once_a_window() {
        let t0 = Instant::now();
        let mut rosters = Rosters::new(WINDOW, MAX_BATCH);
        for i in 0..50 {
            rosters.join(&room(), &member(&format!("u{i}")), 1000, socket(i), t0 + Duration::from_millis(i as u64)).unwrap();
        }
        assert_eq!(rosters.poll_changes(t0 + WINDOW).len(), 1);
        // The rest waits for the next batch, a window later, and goes out together.
        assert_eq!(rosters.poll_timeout(), Some(t0 + WINDOW * 2));
        assert_eq!(rosters.poll_changes(t0 + WINDOW * 2 - Duration::from_millis(1)), vec![]);
        assert_eq!(rosters.poll_changes(t0 + WINDOW * 2).len(), 49);
        assert_eq!(rosters.poll_timeout(), None);
        // Under steady churn, one batch per window however many changes.
        let t1 = t0 + Duration::from_secs(10);
        let mut batches = 0;
        let mut announced = 0;
        for ms in 0..1000u64 {
            let now = t1 + Duration::from_millis(ms);
            if ms % 10 == 0 {
                rosters.join(&room(), &member(&format!("v{ms}")), 1000, socket(1000 + ms as u32), now).unwrap();
            }
            let batch = rosters.poll_changes(now);
            if !batch.is_empty() {
                batches += 1;
                announced += batch.len();
            }
        }
        assert!(batches <= 1000 / WINDOW.as_millis() as usize + 1, "{batches} batches in a second");
        // Each change waits between one and two windows.
        assert!(announced >= 70, "{announced} of 100 joins announced within the second");
        announced += rosters.poll_changes(t1 + Duration::from_millis(1000) + WINDOW * 2).len();
        assert_eq!(announced, 100);
    }

    #[test]
    fn a_members_listing_is_what_a_joiner_would_get() {
        let t0 = Instant::now();
        let mut rosters = Rosters::new(WINDOW, MAX_BATCH);
        let joined = rosters.join(&room(), &member("ann"), 100, socket(1), t0).unwrap();
        rosters.join(&room(), &member("bob"), 100, socket(2), t0 + WINDOW).unwrap();
        assert_eq!(rosters.listing(&room(), socket(1)), Some(joined.data.clone()), "bob is not announced yet");
        rosters.poll_changes(t0 + WINDOW * 2);
        let listed = rosters.listing(&room(), socket(1)).unwrap();
        assert!(listed.contains("bob") && listed.contains("ann"), "{listed}");
        assert_eq!(rosters.listing(&room(), socket(3)), None, "not a member");
        assert_eq!(rosters.listing(&ChannelName::new(crate::pusher::AppIndex(0), "presence-other"), socket(1)), None);
    }

    #[test]
    fn a_batch_takes_at_most_half_a_ring() {
        assert_eq!(batch_for_ring(256), MAX_BATCH);
        assert_eq!(batch_for_ring(16), 8);
        assert_eq!(batch_for_ring(1), 1);
        let t0 = Instant::now();
        let mut rosters = Rosters::new(WINDOW, batch_for_ring(16));
        for i in 0..20 {
            rosters.join(&room(), &member(&format!("u{i}")), 1000, socket(i), t0).unwrap();
        }
        assert_eq!(rosters.poll_changes(t0 + WINDOW).len(), 8);
    }

    #[test]
    fn a_join_storm_goes_out_in_batches_that_fit_a_ring_one_after_another() {
        let t0 = Instant::now();
        let mut rosters = Rosters::new(WINDOW, MAX_BATCH);
        for i in 0..250 {
            rosters.join(&room(), &member(&format!("u{i}")), 1000, socket(i), t0).unwrap();
        }
        assert_eq!(rosters.poll_changes(t0 + WINDOW).len(), MAX_BATCH);
        // The rest does not wait a window: it follows as soon as the first part can be written.
        assert_eq!(rosters.poll_timeout(), Some(t0 + WINDOW + CATCH_UP));
        assert_eq!(rosters.poll_changes(t0 + WINDOW + CATCH_UP).len(), MAX_BATCH);
        let last = rosters.poll_changes(t0 + WINDOW + CATCH_UP * 2);
        assert_eq!(last.len(), 50);
        let Change::Added { member: newest, .. } = &last[49] else { panic!("{last:?}") };
        assert_eq!(newest.user_id, "u249", "oldest first, none lost");
        assert_eq!(rosters.poll_timeout(), None);
        // A batch that was not cut short restores the full window before the next.
        rosters.join(&room(), &member("late"), 1000, socket(999), t0 + WINDOW + CATCH_UP * 2).unwrap();
        assert_eq!(rosters.poll_timeout(), Some(t0 + WINDOW * 2 + CATCH_UP * 2));
    }

    #[test]
    fn new_members_beyond_the_limit_are_refused_but_known_users_may_add_connections() {
        let t0 = Instant::now();
        let mut rosters = Rosters::new(WINDOW, MAX_BATCH);
        rosters.join(&room(), &member("a"), 2, socket(1), t0).unwrap();
        rosters.join(&room(), &member("b"), 2, socket(2), t0).unwrap();
        assert_eq!(rosters.join(&room(), &member("c"), 2, socket(3), t0), Err(JoinError::Full(2)));
        assert!(rosters.join(&room(), &member("a"), 2, socket(4), t0).is_ok());
        assert_eq!(rosters.count(&room()), 2);
    }

    #[test]
    fn owners_are_spread_and_stable() {
        let owners: std::collections::HashSet<_> = (0..100).map(|i| owner_of(&format!("presence-{i}"), 4)).collect();
        assert_eq!(owners.len(), 4);
        assert_eq!(owner_of("presence-x", 4), owner_of("presence-x", 4));
        assert_eq!(owner_of("presence-x", 1), WorkerId(0));
    }

    #[test]
    fn membership_replicas_follow_owner_reports() {
        let mut replica = Membership::default();
        replica.apply(&room(), "a", true);
        replica.apply(&room(), "b", true);
        replica.apply(&room(), "a", false);
        assert_eq!(replica.users(room().key()).collect::<Vec<_>>(), vec!["b"]);
        assert_eq!(replica.user_count(room().key()), 1);
        replica.apply(&room(), "b", false);
        assert_eq!(replica.user_count(room().key()), 0);
    }
}
