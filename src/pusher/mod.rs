//! The Pusher Channels protocol (sans-IO): its messages, the per-connection session state
//! machine, and the signed REST API.

pub mod protocol;
pub mod rest;
pub mod session;
pub mod signature;

/// One Pusher app: the id in REST paths, the key clients connect with, the secret that signs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct App {
    /// The id in `/apps/{id}/...`.
    pub id: String,
    /// The public key in `/app/{key}` and `auth_key`.
    pub key: String,
    /// The shared secret.
    pub secret: String,
}

impl App {
    /// The app configured by `config`.
    pub fn from_config(config: &crate::config::Config) -> Self {
        App { id: config.app_id.clone(), key: config.app_key.clone(), secret: config.app_secret.clone() }
    }
}
