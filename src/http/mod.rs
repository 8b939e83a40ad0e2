//! HTTP/1.1 on the gateway's shared port (sans-IO): reading a request that arrives in pieces,
//! and writing a response. WebSocket upgrades and the REST API both start here.
//!
//! Requests are rare next to WebSocket traffic, so this module favours clarity over zero-copy:
//! a complete request is copied out of the read buffer once.

mod request;
mod response;

pub use request::{Request, RequestError, RequestReader};
pub use response::{json_error, Response};
