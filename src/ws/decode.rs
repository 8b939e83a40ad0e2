//! Client-to-server frames: a resumable decoder that turns bytes, in whatever pieces the socket
//! delivers them, into whole messages and control frames.
//!
//! It decodes in two steps, as the STYLE asks: first check that a whole frame is there (its
//! header is parsed and checked against the limits before any payload is kept), then unmask and
//! hand it over. Complete frames are unmasked in place in the caller's read buffer and lent to a
//! callback; only an incomplete frame's bytes, or a fragmented message, are copied. A frame that
//! announces more than the limit fails with 1009 before anything is allocated for it.

use std::io::Cursor;

use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

/// Largest control-frame payload (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// A partial-frame buffer larger than this is freed, not kept, once it empties.
const KEEP_PARTIAL_CAPACITY: usize = 4096;

/// One decoded message or control frame, borrowed from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming<'a> {
    /// A complete text message (valid UTF-8).
    Text(&'a str),
    /// A complete binary message.
    Binary(&'a [u8]),
    /// A ping with its payload.
    Ping(&'a [u8]),
    /// A pong with its payload.
    Pong(&'a [u8]),
    /// A close frame: its code and reason, if it had any.
    Close(Option<(u16, &'a str)>),
}

/// Whether the decoder should go on after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Keep decoding.
    Continue,
    /// Stop: the connection is closing; further input is ignored.
    Stop,
    /// Stop for now: the rest of the input is kept, undecoded, and decoded by the next call
    /// (the caller is not ready for more messages, e.g. while their replies have no room).
    Pause,
}

/// Why the peer violated the protocol. Each maps to the close code it is answered with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// A framing rule was broken (1002).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// A text message or close reason is not UTF-8 (1007).
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
    /// A message is larger than the limit (1009).
    #[error("message larger than {0} bytes")]
    TooBig(usize),
}

impl DecodeError {
    /// The close code to answer this error with.
    pub fn close_code(&self) -> u16 {
        match self {
            DecodeError::Protocol(_) => 1002,
            DecodeError::InvalidUtf8 => 1007,
            DecodeError::TooBig(_) => 1009,
        }
    }
}

/// A fragmented data message being assembled.
#[derive(Debug)]
struct Fragments {
    text: bool,
    payload: Vec<u8>,
    /// Bytes of `payload` known to be valid UTF-8, so invalid text fails at the fragment that
    /// breaks it, not only at the end.
    utf8_checked: usize,
}

/// The decoding state of one connection.
#[derive(Debug)]
pub struct Decoder {
    /// Which side's frames this decoder reads: clients must mask, servers must not.
    reads_client_frames: bool,
    max_message: usize,
    partial: Vec<u8>,
    fragments: Option<Fragments>,
    stopped: bool,
}

impl Decoder {
    /// A server's decoder of client frames, refusing messages larger than `max_message` bytes.
    pub fn new(max_message: usize) -> Self {
        Decoder { reads_client_frames: true, max_message, partial: Vec::new(), fragments: None, stopped: false }
    }

    /// A client's decoder of server frames (which are never masked), for the load tool.
    pub fn for_client(max_message: usize) -> Self {
        Decoder { reads_client_frames: false, ..Decoder::new(max_message) }
    }

    /// Decodes `input` (which it may unmask in place), calling `on_message` for every complete
    /// message or control frame, until the input is used up or `on_message` says stop or
    /// pause. After a pause, a call with empty input goes on where it left off.
    pub fn decode<F>(&mut self, input: &mut [u8], on_message: &mut F) -> Result<(), DecodeError>
    where
        F: FnMut(Incoming<'_>) -> Flow,
    {
        if self.stopped {
            return Ok(());
        }
        if self.partial.is_empty() {
            let used = self.decode_frames(input, on_message)?;
            if !self.stopped {
                self.partial.extend_from_slice(&input[used..]);
            }
        } else {
            let mut buffered = std::mem::take(&mut self.partial);
            buffered.extend_from_slice(input);
            let used = self.decode_frames(&mut buffered, on_message)?;
            buffered.drain(..used);
            if buffered.is_empty() && buffered.capacity() > KEEP_PARTIAL_CAPACITY {
                buffered = Vec::new();
            }
            self.partial = buffered;
        }
        Ok(())
    }

    /// Bytes held for an incomplete frame or message (for memory accounting).
    pub fn buffered(&self) -> usize {
        self.partial.capacity() + self.fragments.as_ref().map_or(0, |f| f.payload.capacity())
    }

    /// Decodes the complete frames at the front of `buf`; returns how many bytes they used.
    fn decode_frames<F>(&mut self, buf: &mut [u8], on_message: &mut F) -> Result<usize, DecodeError>
    where
        F: FnMut(Incoming<'_>) -> Flow,
    {
        let mut pos = 0;
        while !self.stopped {
            let mut cursor = Cursor::new(&buf[pos..]);
            let (header, len) = match FrameHeader::parse(&mut cursor) {
                Ok(Some(parsed)) => parsed,
                Ok(None) => break,
                Err(_) => return Err(DecodeError::Protocol("reserved opcode")),
            };
            let header_len = cursor.position() as usize;
            let mask = self.check_header(&header, len)?;
            let start = pos + header_len;
            let len = len as usize; // check_header bounded it by max_message
            if buf.len() - start < len {
                break;
            }
            let payload = &mut buf[start..start + len];
            if let Some(mask) = mask {
                unmask(payload, mask);
            }
            pos = start + len;
            match self.handle_frame(&header, payload, on_message)? {
                Flow::Continue => {}
                Flow::Stop => self.stopped = true,
                Flow::Pause => break,
            }
        }
        Ok(pos)
    }

    /// Checks a frame header before its payload is waited for; returns the mask.
    fn check_header(&self, header: &FrameHeader, len: u64) -> Result<Option<[u8; 4]>, DecodeError> {
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(DecodeError::Protocol("reserved bits set without a negotiated extension"));
        }
        match (self.reads_client_frames, header.mask) {
            (true, None) => return Err(DecodeError::Protocol("client frames must be masked")),
            (false, Some(_)) => return Err(DecodeError::Protocol("server frames must not be masked")),
            _ => {}
        }
        let mask = header.mask;
        match header.opcode {
            OpCode::Control(_) => {
                if !header.is_final {
                    return Err(DecodeError::Protocol("fragmented control frame"));
                }
                if len > MAX_CONTROL_PAYLOAD {
                    return Err(DecodeError::Protocol("control frame payload over 125 bytes"));
                }
            }
            OpCode::Data(data) => {
                let already = match (&self.fragments, data) {
                    (None, Data::Continue) => return Err(DecodeError::Protocol("continuation frame without a message")),
                    (Some(_), Data::Text | Data::Binary) => return Err(DecodeError::Protocol("new message inside a fragmented message")),
                    (Some(f), _) => f.payload.len() as u64,
                    (None, _) => 0,
                };
                if already.saturating_add(len) > self.max_message as u64 {
                    return Err(DecodeError::TooBig(self.max_message));
                }
            }
        }
        Ok(mask)
    }

    fn handle_frame<F>(&mut self, header: &FrameHeader, payload: &[u8], on_message: &mut F) -> Result<Flow, DecodeError>
    where
        F: FnMut(Incoming<'_>) -> Flow,
    {
        match header.opcode {
            OpCode::Control(Control::Ping) => Ok(on_message(Incoming::Ping(payload))),
            OpCode::Control(Control::Pong) => Ok(on_message(Incoming::Pong(payload))),
            OpCode::Control(Control::Close) => {
                let close = parse_close(payload)?;
                on_message(Incoming::Close(close));
                Ok(Flow::Stop)
            }
            // The header parser refuses reserved opcodes.
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => Err(DecodeError::Protocol("reserved opcode")),
            OpCode::Data(Data::Text) if header.is_final => {
                let text = std::str::from_utf8(payload).map_err(|_| DecodeError::InvalidUtf8)?;
                Ok(on_message(Incoming::Text(text)))
            }
            OpCode::Data(Data::Binary) if header.is_final => Ok(on_message(Incoming::Binary(payload))),
            OpCode::Data(Data::Text | Data::Binary) => {
                let text = header.opcode == OpCode::Data(Data::Text);
                let mut fragments = Fragments { text, payload: payload.to_vec(), utf8_checked: 0 };
                if text {
                    check_utf8(&fragments.payload, &mut fragments.utf8_checked, false)?;
                }
                self.fragments = Some(fragments);
                Ok(Flow::Continue)
            }
            OpCode::Data(Data::Continue) => {
                let Some(fragments) = self.fragments.as_mut() else {
                    return Err(DecodeError::Protocol("continuation frame without a message"));
                };
                fragments.payload.extend_from_slice(payload);
                if fragments.text {
                    check_utf8(&fragments.payload, &mut fragments.utf8_checked, header.is_final)?;
                }
                if !header.is_final {
                    return Ok(Flow::Continue);
                }
                let Some(done) = self.fragments.take() else {
                    return Ok(Flow::Continue);
                };
                if done.text {
                    let text = std::str::from_utf8(&done.payload).map_err(|_| DecodeError::InvalidUtf8)?;
                    Ok(on_message(Incoming::Text(text)))
                } else {
                    Ok(on_message(Incoming::Binary(&done.payload)))
                }
            }
        }
    }
}

fn unmask(payload: &mut [u8], mask: [u8; 4]) {
    for (i, byte) in payload.iter_mut().enumerate() {
        *byte ^= mask[i & 3];
    }
}

/// Validates the bytes after `checked`; an incomplete character at the end is allowed until the
/// message is `complete`.
fn check_utf8(buf: &[u8], checked: &mut usize, complete: bool) -> Result<(), DecodeError> {
    match std::str::from_utf8(&buf[*checked..]) {
        Ok(_) => {
            *checked = buf.len();
            Ok(())
        }
        Err(e) if e.error_len().is_none() && !complete => {
            *checked += e.valid_up_to();
            Ok(())
        }
        Err(_) => Err(DecodeError::InvalidUtf8),
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, DecodeError> {
    match payload {
        [] => Ok(None),
        [_] => Err(DecodeError::Protocol("close frame with a one-byte payload")),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            if !CloseCode::from(code).is_allowed() {
                return Err(DecodeError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason).map_err(|_| DecodeError::InvalidUtf8)?;
            Ok(Some((code, reason)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Owned copy of an `Incoming`, for assertions.
    #[derive(Debug, PartialEq, Eq)]
    enum Got {
        Text(String),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Close(Option<(u16, String)>),
    }

    /// A masked client frame.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        let mut out = vec![first];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i & 3]));
        out
    }

    const TEXT: u8 = 0x81;
    const BINARY: u8 = 0x82;
    const TEXT_START: u8 = 0x01;
    const CONT: u8 = 0x00;
    const CONT_FINAL: u8 = 0x80;
    const CLOSE: u8 = 0x88;
    const PING: u8 = 0x89;
    const PONG: u8 = 0x8a;

    fn decode_chunks(decoder: &mut Decoder, chunks: &[&[u8]]) -> Result<Vec<Got>, DecodeError> {
        let mut got = Vec::new();
        for chunk in chunks {
            let mut owned = chunk.to_vec();
            decoder.decode(&mut owned, &mut |m: Incoming<'_>| {
                got.push(match m {
                    Incoming::Text(t) => Got::Text(t.to_string()),
                    Incoming::Binary(b) => Got::Binary(b.to_vec()),
                    Incoming::Ping(p) => Got::Ping(p.to_vec()),
                    Incoming::Pong(p) => Got::Pong(p.to_vec()),
                    Incoming::Close(c) => Got::Close(c.map(|(code, r)| (code, r.to_string()))),
                });
                Flow::Continue
            })?;
        }
        Ok(got)
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Got>, DecodeError> {
        decode_chunks(&mut Decoder::new(1 << 20), &[bytes])
    }

    #[test]
    fn messages_decode_whatever_the_chunking() {
        let mut wire = frame(TEXT, b"hello");
        wire.extend(frame(PING, b"p"));
        wire.extend(frame(BINARY, &[0, 1, 2]));
        wire.extend(frame(TEXT, &vec![b'a'; 70_000]));
        let expected = vec![Got::Text("hello".into()), Got::Ping(b"p".to_vec()), Got::Binary(vec![0, 1, 2]), Got::Text("a".repeat(70_000))];
        for chunk in [1, 2, 3, 7, 100, 4096, wire.len()] {
            let chunks: Vec<&[u8]> = wire.chunks(chunk).collect();
            let mut decoder = Decoder::new(1 << 20);
            assert_eq!(decode_chunks(&mut decoder, &chunks).unwrap(), expected, "chunk size {chunk}");
            assert_eq!(decoder.buffered(), 0, "nothing kept after whole messages (chunk {chunk})");
        }
    }

    #[test]
    fn a_pause_keeps_the_rest_for_the_next_call() {
        let mut wire = Vec::new();
        for word in ["one", "two", "three"] {
            wire.extend(frame(TEXT, word.as_bytes()));
        }
        wire.extend(&frame(TEXT, b"four")[..3]); // and the start of a fourth
        let mut decoder = Decoder::new(1 << 20);
        let mut got = Vec::new();
        let one_at_a_time = |decoder: &mut Decoder, input: &mut [u8], got: &mut Vec<String>| {
            decoder
                .decode(input, &mut |m: Incoming<'_>| {
                    if let Incoming::Text(t) = m {
                        got.push(t.to_string());
                    }
                    Flow::Pause
                })
                .unwrap();
        };
        one_at_a_time(&mut decoder, &mut wire, &mut got);
        assert_eq!(got, ["one"]);
        for _ in 0..3 {
            one_at_a_time(&mut decoder, &mut [], &mut got);
        }
        assert_eq!(got, ["one", "two", "three"], "one message per call, none lost, none repeated");
        let mut rest = frame(TEXT, b"four")[3..].to_vec();
        one_at_a_time(&mut decoder, &mut rest, &mut got);
        assert_eq!(got.last().map(String::as_str), Some("four"), "a partial frame after a pause completes as usual");
    }

    #[test]
    fn fragments_are_assembled_around_interleaved_control_frames() {
        let mut wire = frame(TEXT_START, b"he");
        wire.extend(frame(PING, b""));
        wire.extend(frame(CONT, b"ll"));
        wire.extend(frame(CONT_FINAL, b"o"));
        assert_eq!(decode_all(&wire).unwrap(), vec![Got::Ping(vec![]), Got::Text("hello".into())]);
    }

    #[test]
    fn unmasked_frames_are_a_protocol_error() {
        let wire = [0x81, 0x02, b'h', b'i'];
        assert_eq!(decode_all(&wire).unwrap_err().close_code(), 1002);
    }

    #[test]
    fn a_client_decoder_reads_unmasked_server_frames_and_refuses_masked_ones() {
        let wire = [0x81, 0x02, b'h', b'i'];
        assert_eq!(decode_chunks(&mut Decoder::for_client(1024), &[&wire]).unwrap(), vec![Got::Text("hi".into())]);
        let masked = frame(TEXT, b"hi");
        assert_eq!(decode_chunks(&mut Decoder::for_client(1024), &[&masked]).unwrap_err().close_code(), 1002);
    }

    #[test]
    fn oversized_messages_fail_from_the_header_alone() {
        // Announces 1 GiB but sends only the header: refused without waiting or allocating.
        let mut wire = vec![0x82, 0x80 | 127];
        wire.extend_from_slice(&(1u64 << 30).to_be_bytes());
        wire.extend_from_slice(&[1, 2, 3, 4]);
        let mut decoder = Decoder::new(1024);
        assert_eq!(decode_chunks(&mut decoder, &[&wire]).unwrap_err(), DecodeError::TooBig(1024));
        assert!(decoder.buffered() < 64);
    }

    #[test]
    fn fragments_count_toward_the_limit() {
        let mut wire = frame(0x02, &[0; 600]);
        wire.extend(frame(CONT_FINAL, &[0; 600]));
        assert_eq!(decode_chunks(&mut Decoder::new(1000), &[&wire]).unwrap_err().close_code(), 1009);
    }

    #[test]
    fn invalid_utf8_is_1007_and_fails_at_the_breaking_fragment() {
        assert_eq!(decode_all(&frame(TEXT, &[0xff])).unwrap_err().close_code(), 1007);
        // A character split across fragments is fine...
        let mut split = frame(TEXT_START, &[0xc3]);
        split.extend(frame(CONT_FINAL, &[0xa9]));
        assert_eq!(decode_all(&split).unwrap(), vec![Got::Text("é".into())]);
        // ...but a bad byte fails before the message ends.
        let mut decoder = Decoder::new(1 << 20);
        let first = frame(TEXT_START, b"ok");
        let bad = frame(CONT, &[0xff]);
        assert_eq!(decode_chunks(&mut decoder, &[&first, &bad]).unwrap_err(), DecodeError::InvalidUtf8);
        // An incomplete character at the very end is invalid.
        let mut truncated = frame(TEXT_START, b"a");
        truncated.extend(frame(CONT_FINAL, &[0xc3]));
        assert_eq!(decode_all(&truncated).unwrap_err(), DecodeError::InvalidUtf8);
    }

    #[test]
    fn framing_rules_are_enforced() {
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("reserved bit", frame(0xc1, b"x")),
            ("reserved opcode", frame(0x83, b"x")),
            ("reserved control opcode", frame(0x8b, b"x")),
            ("fragmented ping", frame(0x09, b"x")),
            ("long ping", frame(PING, &[0; 126])),
            ("stray continuation", frame(CONT_FINAL, b"x")),
            ("one-byte close", frame(CLOSE, &[3])),
            ("close code 1005", frame(CLOSE, &1005u16.to_be_bytes())),
            ("close code 999", frame(CLOSE, &999u16.to_be_bytes())),
            ("close code 5000", frame(CLOSE, &5000u16.to_be_bytes())),
        ];
        for (name, wire) in cases {
            assert_eq!(decode_all(&wire).map_err(|e| e.close_code()), Err(1002), "{name}");
        }
        let mut nested = frame(TEXT_START, b"a");
        nested.extend(frame(TEXT, b"b"));
        assert_eq!(decode_all(&nested).unwrap_err().close_code(), 1002);
    }

    #[test]
    fn close_frames_stop_decoding() {
        let mut payload = 4000u16.to_be_bytes().to_vec();
        payload.extend_from_slice(b"bye");
        let mut wire = frame(CLOSE, &payload);
        wire.extend(frame(TEXT, b"ignored"));
        assert_eq!(decode_all(&wire).unwrap(), vec![Got::Close(Some((4000, "bye".into())))]);
        assert_eq!(decode_all(&frame(CLOSE, b"")).unwrap(), vec![Got::Close(None)]);
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.push(0xff);
        assert_eq!(decode_all(&frame(CLOSE, &bad_reason)).unwrap_err(), DecodeError::InvalidUtf8);
    }

    #[test]
    fn pongs_are_reported() {
        assert_eq!(decode_all(&frame(PONG, b"x")).unwrap(), vec![Got::Pong(b"x".to_vec())]);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: junk of every shape must end in Ok or a close code.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            let mut junk = Vec::new();
            let len = (seed % 40) as usize;
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                junk.push(seed as u8);
            }
            let mut decoder = Decoder::new(64);
            let _ = decode_chunks(&mut decoder, &[&junk[..len / 2], &junk[len / 2..]]);
        }
    }
}
