//! The server side of the WebSocket opening handshake (RFC 6455 §4.2): checks an upgrade
//! request and writes the `101 Switching Protocols` answer. No extension is negotiated, so
//! clients never compress.

use tungstenite::handshake::derive_accept_key;

use crate::http::Request;

/// Why an upgrade request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpgradeError {
    /// Not a GET.
    #[error("a WebSocket upgrade must be a GET request")]
    NotGet,
    /// `Upgrade: websocket` or `Connection: Upgrade` is missing.
    #[error("expected a WebSocket upgrade (Upgrade: websocket, Connection: Upgrade)")]
    NotUpgrade,
    /// `Sec-WebSocket-Version` is not 13.
    #[error("unsupported WebSocket version; this server speaks version 13")]
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` is missing or not 16 bytes of base64.
    #[error("missing or malformed Sec-WebSocket-Key")]
    BadKey,
}

impl UpgradeError {
    /// The HTTP status for this refusal.
    pub fn status(&self) -> u16 {
        match self {
            UpgradeError::UnsupportedVersion => 426,
            _ => 400,
        }
    }
}

/// Checks `request` and returns the bytes of the `101` response that completes the handshake.
pub fn upgrade_response(request: &Request) -> Result<Vec<u8>, UpgradeError> {
    if request.method != "GET" {
        return Err(UpgradeError::NotGet);
    }
    if !request.header_has_token("upgrade", "websocket") || !request.header_has_token("connection", "upgrade") {
        return Err(UpgradeError::NotUpgrade);
    }
    if request.header("sec-websocket-version") != Some("13") {
        return Err(UpgradeError::UnsupportedVersion);
    }
    let key = request.header("sec-websocket-key").ok_or(UpgradeError::BadKey)?;
    // 16 random bytes in base64 are always 24 characters ending in "==".
    if key.len() != 24 || !key.ends_with("==") {
        return Err(UpgradeError::BadKey);
    }
    let accept = derive_accept_key(key.as_bytes());
    Ok(format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n")
        .into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::RequestReader;

    fn request(raw: &str) -> Request {
        let mut reader = RequestReader::new(8192, 0);
        reader.push(raw.as_bytes());
        reader.next_request().unwrap().unwrap()
    }

    #[test]
    fn the_rfc_example_key_gets_the_rfc_accept_value() {
        let req = request(
            "GET /app/key?protocol=7 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        );
        let response = String::from_utf8(upgrade_response(&req).unwrap()).unwrap();
        assert!(response.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(response.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
    }

    #[test]
    fn incomplete_upgrades_are_refused() {
        let plain = request("GET /app/key HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(upgrade_response(&plain), Err(UpgradeError::NotUpgrade));
        let old = request(
            "GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 8\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        );
        assert_eq!(upgrade_response(&old).unwrap_err().status(), 426);
        let keyless = request("GET / HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n");
        assert_eq!(upgrade_response(&keyless), Err(UpgradeError::BadKey));
    }
}
