//! The WebSocket frame decoder on any bytes: no panic, and the same messages (or the same
//! error) whether the bytes come whole or in the pieces the first byte chooses.
#![no_main]

use flux::ws::{Decoder, Flow};
use libfuzzer_sys::fuzz_target;

/// What the decoder made of `bytes` fed in pieces of at most `piece` bytes (0: whole).
fn decode(bytes: &[u8], piece: usize) -> Vec<String> {
    let mut decoder = Decoder::new(14 * 1024);
    let mut seen = Vec::new();
    let size = if piece == 0 { bytes.len().max(1) } else { piece };
    for chunk in bytes.chunks(size) {
        let mut chunk = chunk.to_vec();
        if let Err(e) = decoder.decode(&mut chunk, &mut |incoming| {
            seen.push(format!("{incoming:?}"));
            Flow::Continue
        }) {
            seen.push(format!("error {}", e.close_code()));
            break;
        }
    }
    seen
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, bytes)) = data.split_first() else { return };
    assert_eq!(decode(bytes, 0), decode(bytes, usize::from(piece % 32)));
});
