//! Whether the node takes new clients, decided once for the health endpoints and for admission
//! alike (sans-IO: a pure function of the drain flag, the open count and the limit).
//!
//! `GET /up` on the main port is liveness: 200 `{"health":"OK"}` whenever the node answers at
//! all, as Laravel Reverb and Sockudo answer it. `GET /ready` is readiness: 503 with the reason
//! while the node drains for a shutdown or holds its `FLUX_MAX_CONNECTIONS`, so a load balancer
//! sends new clients elsewhere; 200 otherwise. A WebSocket client that arrives when the node
//! is not ready is refused the Pusher way, with the code that tells pusher-js what to do next.
//! Neither endpoint needs a signature: they tell nothing about the apps.

use crate::http::{json_error, Response};
use crate::pusher::protocol::code;

/// Whether the node takes new clients now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// It does.
    Ready,
    /// It is shutting down: its clients were told to reconnect, elsewhere.
    Draining,
    /// It holds its maximum of WebSocket connections.
    Full {
        /// Connections open.
        open: u64,
        /// The maximum.
        max: u64,
    },
}

/// How a client that arrives while the node is not ready is turned away: the `pusher:error`
/// code (also the close code) and the close reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code: 4004 when full, which Pusher clients take as "do not reconnect"; 4100 when
    /// draining, which they take as "reconnect after backing off", by which time the balancer
    /// has another node for them.
    pub code: u16,
    /// The `pusher:error` message.
    pub message: String,
    /// The close frame's reason.
    pub reason: &'static str,
}

impl Readiness {
    /// The node's readiness with `open` WebSocket connections of at most `max_connections`.
    pub fn of(draining: bool, open: u64, max_connections: Option<u64>) -> Self {
        if draining {
            return Readiness::Draining;
        }
        match max_connections {
            Some(max) if open >= max => Readiness::Full { open, max },
            _ => Readiness::Ready,
        }
    }

    /// The answer to `GET /ready`.
    pub fn response(self) -> Response {
        match self {
            Readiness::Ready => Response::json(200, r#"{"ready":true}"#),
            Readiness::Draining => json_error(503, "shutting down: this node takes no new clients"),
            Readiness::Full { open, max } => {
                json_error(503, &format!("at the connection limit: {open} of {max} connections open (FLUX_MAX_CONNECTIONS)"))
            }
        }
    }

    /// How to turn away a WebSocket client now, if it must be.
    pub fn refusal(self) -> Option<Refusal> {
        match self {
            Readiness::Ready => None,
            Readiness::Draining => Some(Refusal {
                code: code::OVER_CAPACITY,
                message: "This server is shutting down; reconnect".into(),
                reason: "Server shutting down",
            }),
            Readiness::Full { max, .. } => Some(Refusal {
                code: code::OVER_QUOTA,
                message: format!("Over connection quota: this server holds its maximum of {max} connections"),
                reason: "Over connection quota",
            }),
        }
    }
}

/// The answer to `GET /up`.
pub fn up() -> Response {
    Response::json(200, r#"{"health":"OK"}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(response: &Response) -> serde_json::Value {
        serde_json::from_slice(&response.body).expect("JSON body")
    }

    #[test]
    fn the_node_is_ready_below_its_limit_and_without_one() {
        assert_eq!(Readiness::of(false, 0, None), Readiness::Ready);
        assert_eq!(Readiness::of(false, 1_000_000, None), Readiness::Ready);
        assert_eq!(Readiness::of(false, 4, Some(5)), Readiness::Ready);
        let ready = Readiness::Ready.response();
        assert_eq!((ready.status, body(&ready)), (200, serde_json::json!({"ready": true})));
        assert_eq!(Readiness::Ready.refusal(), None);
    }

    #[test]
    fn at_the_limit_it_is_full_and_refuses_with_4004() {
        let full = Readiness::of(false, 5, Some(5));
        assert_eq!(full, Readiness::Full { open: 5, max: 5 });
        // A few more than the limit (admitted by other workers at the same moment) is full too.
        assert_eq!(Readiness::of(false, 6, Some(5)), Readiness::Full { open: 6, max: 5 });
        let response = full.response();
        assert_eq!(response.status, 503);
        assert!(body(&response)["error"].as_str().is_some_and(|e| e.contains("5 of 5")), "{:?}", body(&response));
        let refusal = full.refusal().expect("refused");
        assert_eq!((refusal.code, refusal.reason), (4004, "Over connection quota"));
    }

    #[test]
    fn while_draining_it_is_not_ready_whatever_it_holds() {
        for (open, max) in [(0, None), (0, Some(5)), (9, Some(5))] {
            assert_eq!(Readiness::of(true, open, max), Readiness::Draining);
        }
        let response = Readiness::Draining.response();
        assert_eq!(response.status, 503);
        assert!(body(&response)["error"].as_str().is_some_and(|e| e.starts_with("shutting down")));
        assert_eq!(Readiness::Draining.refusal().map(|r| r.code), Some(4100), "pusher-js backs off, then reconnects");
    }

    #[test]
    fn up_answers_as_reverb_and_sockudo_do() {
        let response = up();
        assert_eq!((response.status, body(&response)), (200, serde_json::json!({"health": "OK"})));
    }
}
