//! The HTTP request reader on any bytes: no panic, and the same requests (or the same refusal)
//! whether the bytes come whole or in the pieces the first byte chooses.
#![no_main]

use flux::http::RequestReader;
use libfuzzer_sys::fuzz_target;

/// The requests read from `bytes` fed in pieces of at most `piece` bytes (0: whole).
fn read(bytes: &[u8], piece: usize) -> Vec<String> {
    let mut reader = RequestReader::new(16 * 1024, 64 * 1024);
    let mut read = Vec::new();
    let size = if piece == 0 { bytes.len().max(1) } else { piece };
    for chunk in bytes.chunks(size) {
        reader.push(chunk);
        loop {
            match reader.next_request() {
                Ok(Some(request)) => {
                    read.push(format!("{} {} {} {:?} {:?}", request.method, request.path, request.query, request.headers, request.body))
                }
                Ok(None) => break,
                Err(e) => {
                    read.push(format!("refused {}", e.status()));
                    return read;
                }
            }
        }
    }
    read
}

fuzz_target!(|data: &[u8]| {
    let Some((&piece, bytes)) = data.split_first() else { return };
    assert_eq!(read(bytes, 0), read(bytes, usize::from(piece % 64)));
});
