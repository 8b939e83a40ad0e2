//! The WebSocket codec (sans-IO): the upgrade handshake, decoding client frames, and encoding
//! server frames into pooled buffers.
//!
//! tungstenite supplies the frame-header parser and formatter, the close-code rules and the
//! accept key. We keep the buffers and the message assembly ourselves, for two reasons that are
//! the point of Flux: a connection holds no read buffer while idle (frames are decoded straight
//! out of the worker's shared read buffer, and only a partial frame is kept), and every byte a
//! connection sends — broadcasts, pongs, close frames — goes through its one bounded outbound
//! ring, in order.

mod decode;
mod encode;
mod handshake;

pub use decode::{DecodeError, Decoder, Flow, Incoming};
pub use encode::{binary_frame, close_frame, control_frame, data_frame, payload_of, text_frame, EncodeError};
pub use handshake::{upgrade_response, UpgradeError};
