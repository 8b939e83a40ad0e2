//! The Pusher Channels protocol (sans-IO): its messages, the per-connection session state
//! machine, the signed REST API, presence rosters, cache channels' last events,
//! subscription-count events and rate limits.

pub mod cache;
pub mod channel;
pub mod counts;
pub mod presence;
pub mod protocol;
pub mod rate;
pub mod rest;
pub mod session;
pub mod signature;

/// An app's place in the node's table of apps: fixed for as long as the node runs, through
/// reloads, so channels and connections can name their app with a number. Never sent to
/// another node (they may number apps differently); the app's id is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct AppIndex(pub u32);

/// One Pusher app: the id in REST paths, the key clients connect with, the secret that signs,
/// and the features it turned on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    /// The id in `/apps/{id}/...`.
    pub id: String,
    /// The public key in `/app/{key}` and `auth_key`.
    pub key: String,
    /// The shared secret.
    pub secret: String,
    /// Subscribers of public and private channels are told the channel's subscription count
    /// when it changes (see [`counts`]).
    pub subscription_count_events: bool,
}

impl App {
    /// The app given by these flags.
    pub fn from_args(args: &crate::config::AppArgs) -> Self {
        App {
            id: args.app_id.clone(),
            key: args.app_key.clone(),
            secret: args.app_secret.clone(),
            subscription_count_events: args.subscription_count_events,
        }
    }
}
