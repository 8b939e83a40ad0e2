//! An HTTP/1.1 response, serialized whole into one buffer.
//!
//! Its body is [`Bytes`], so the fixed answers (`{}` to every publish) are static and cost no
//! allocation, and the worker writes the response into a pooled buffer ([`Response::write_to`]).

use std::io::Write as _;

use bytes::Bytes;

/// A response ready to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Content type of the body.
    pub content_type: &'static str,
    /// The body.
    pub body: Bytes,
    /// Extra headers (name, value).
    pub headers: Vec<(&'static str, String)>,
}

impl Response {
    /// A JSON response.
    pub fn json(status: u16, body: impl Into<Bytes>) -> Self {
        Response { status, content_type: "application/json", body: body.into(), headers: Vec::new() }
    }

    /// A plain-text response.
    pub fn text(status: u16, body: impl Into<Bytes>) -> Self {
        Response { status, content_type: "text/plain; charset=utf-8", body: body.into(), headers: Vec::new() }
    }

    /// The response as bytes on the wire; `close` adds `Connection: close`.
    pub fn to_bytes(&self, close: bool) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(160 + self.body.len());
        self.write_to(&mut bytes, close);
        bytes
    }

    /// Appends the response as bytes on the wire to `out`; `close` adds `Connection: close`.
    pub fn write_to(&self, out: &mut Vec<u8>, close: bool) {
        // Writing into a Vec cannot fail.
        let _ = write!(
            out,
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        );
        for (name, value) in &self.headers {
            let _ = write!(out, "{name}: {value}\r\n");
        }
        out.extend_from_slice(if close { b"Connection: close\r\n\r\n" } else { b"Connection: keep-alive\r\n\r\n" });
        out.extend_from_slice(&self.body);
    }
}

/// A JSON error body `{"error": message}` with `status`.
pub fn json_error(status: u16, message: &str) -> Response {
    Response::json(status, serde_json::json!({ "error": message }).to_string())
}

fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Payload Too Large",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_carry_length_and_connection_headers() {
        let wire = String::from_utf8(json_error(413, "too big").to_bytes(true)).unwrap();
        assert!(wire.starts_with("HTTP/1.1 413 Payload Too Large\r\n"));
        assert!(wire.contains("Content-Type: application/json\r\n"));
        assert!(wire.contains("Connection: close\r\n\r\n"));
        assert!(wire.ends_with(r#"{"error":"too big"}"#));
        assert!(wire.contains(&format!("Content-Length: {}\r\n", r#"{"error":"too big"}"#.len())));
    }
}
