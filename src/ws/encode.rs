//! Server-to-client frames, each encoded once into a buffer from the frame pool.
//!
//! Server frames are unmasked, so one encoded frame is valid for every recipient: the payload is
//! written after a 10-byte gap, then the real header (2 to 10 bytes) is written right-aligned
//! into the gap and the frame handle starts there. No byte is moved.

use bytes::Bytes;
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::fanout::pool::{FrameBuf, FramePool};

/// The longest unmasked frame header: 2 bytes plus a 64-bit length.
const MAX_HEADER: usize = 10;

/// A payload could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The payload writer failed (for example a JSON serializer error).
    #[error("could not serialize the payload: {0}")]
    Payload(#[from] serde_json::Error),
}

/// Encodes a final frame with `opcode` whose payload `write_payload` appends to the buffer.
pub fn data_frame(
    pool: &FramePool,
    opcode: OpCode,
    write_payload: impl FnOnce(&mut Vec<u8>) -> Result<(), EncodeError>,
) -> Result<Bytes, EncodeError> {
    let mut buf = pool.checkout();
    buf.as_mut_vec().resize(MAX_HEADER, 0);
    write_payload(buf.as_mut_vec())?;
    Ok(finish(buf, opcode))
}

/// The payload of a frame made here (unmasked, so the header's length says where it starts).
pub fn payload_of(frame: &[u8]) -> &[u8] {
    let header = match frame.get(1).map(|b| b & 0x7f) {
        None => return &[],
        Some(0..=125) => 2,
        Some(126) => 4,
        Some(_) => 10,
    };
    frame.get(header..).unwrap_or_default()
}

/// A text frame carrying `text`.
pub fn text_frame(pool: &FramePool, text: &str) -> Bytes {
    frame_of(pool, OpCode::Data(Data::Text), &[text.as_bytes()])
}

/// A binary frame carrying `payload`.
pub fn binary_frame(pool: &FramePool, payload: &[u8]) -> Bytes {
    frame_of(pool, OpCode::Data(Data::Binary), &[payload])
}

/// A control frame (ping or pong) carrying `payload` (at most 125 bytes, as the RFC requires;
/// longer payloads are truncated).
pub fn control_frame(pool: &FramePool, control: Control, payload: &[u8]) -> Bytes {
    frame_of(pool, OpCode::Control(control), &[&payload[..payload.len().min(125)]])
}

/// A close frame with `code` and a `reason` (truncated on a character boundary to fit the
/// 125-byte control-frame limit).
pub fn close_frame(pool: &FramePool, code: u16, reason: &str) -> Bytes {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    frame_of(pool, OpCode::Control(Control::Close), &[&code.to_be_bytes(), &reason.as_bytes()[..end]])
}

fn frame_of(pool: &FramePool, opcode: OpCode, parts: &[&[u8]]) -> Bytes {
    let mut buf = pool.checkout();
    let vec = buf.as_mut_vec();
    vec.resize(MAX_HEADER, 0);
    for part in parts {
        vec.extend_from_slice(part);
    }
    finish(buf, opcode)
}

/// Writes the header into the gap before the payload and returns the frame from its first byte.
fn finish(mut buf: FrameBuf, opcode: OpCode) -> Bytes {
    let vec = buf.as_mut_vec();
    let payload_len = (vec.len() - MAX_HEADER) as u64;
    let header = FrameHeader { is_final: true, rsv1: false, rsv2: false, rsv3: false, opcode, mask: None };
    let start = MAX_HEADER - header.len(payload_len);
    let mut gap = &mut vec[start..MAX_HEADER];
    if header.format(payload_len, &mut gap).is_err() {
        // The gap is exactly the header's computed length; formatting into it cannot fail.
        unreachable!("an unmasked header always fits its computed length");
    }
    buf.freeze().slice(start..)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn parse(frame: &[u8]) -> (FrameHeader, Vec<u8>) {
        let mut cursor = Cursor::new(frame);
        let (header, len) = FrameHeader::parse(&mut cursor).unwrap().unwrap();
        let start = cursor.position() as usize;
        assert_eq!(frame.len() - start, len as usize, "declared length matches the payload");
        (header, frame[start..].to_vec())
    }

    #[test]
    fn frames_of_every_length_class_parse_back() {
        let pool = FramePool::default();
        for len in [0usize, 1, 125, 126, 127, 65535, 65536, 70000] {
            let text = "x".repeat(len);
            let frame = text_frame(&pool, &text);
            let (header, payload) = parse(&frame);
            assert!(header.is_final);
            assert_eq!(header.opcode, OpCode::Data(Data::Text));
            assert_eq!(header.mask, None, "server frames are not masked");
            assert_eq!(payload, text.as_bytes());
        }
    }

    #[test]
    fn the_payload_is_found_behind_every_header_length() {
        let pool = FramePool::default();
        for len in [0usize, 125, 126, 65535, 65536] {
            let text = "y".repeat(len);
            assert_eq!(payload_of(&text_frame(&pool, &text)), text.as_bytes());
        }
        assert_eq!(payload_of(&[]), b"");
    }

    #[test]
    fn close_frames_carry_code_and_a_bounded_reason() {
        let pool = FramePool::default();
        let frame = close_frame(&pool, 4100, &"é".repeat(100));
        let (header, payload) = parse(&frame);
        assert_eq!(header.opcode, OpCode::Control(Control::Close));
        assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), 4100);
        assert!(payload.len() <= 125);
        assert!(std::str::from_utf8(&payload[2..]).is_ok(), "cut on a character boundary");
    }

    #[test]
    fn a_json_payload_is_serialized_in_place() {
        let pool = FramePool::default();
        let frame = data_frame(&pool, OpCode::Data(Data::Text), |buf| {
            serde_json::to_writer(buf, &serde_json::json!({"a": 1}))?;
            Ok(())
        })
        .unwrap();
        assert_eq!(parse(&frame).1, br#"{"a":1}"#);
    }
}
