//! An HTTP/1.1 request read incrementally: the head is parsed by `httparse` once it is complete,
//! then the body is read up to its `Content-Length`. Sizes are checked before anything is kept,
//! so an announced 1 GiB body is refused without reading or allocating it.
//!
//! A request can be read into one that is reused ([`RequestReader::next_request_into`]): its
//! strings and body keep their capacity, so a steady stream of requests (a publisher's REST
//! calls) allocates nothing here.

use std::fmt;

/// Most headers a request may carry.
const MAX_HEADERS: usize = 48;

/// A complete request.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// The path, without the query string.
    pub path: String,
    /// The raw query string, without the `?` (may be empty).
    pub query: String,
    /// Header names (lower-cased) and values.
    pub headers: Vec<(String, String)>,
    /// The body (empty without `Content-Length`).
    pub body: Vec<u8>,
    /// HTTP/1.0, or `Connection: close`: the connection ends after the response.
    pub close: bool,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}?{} ({} body bytes)", self.method, self.path, self.query, self.body.len())
    }
}

impl Request {
    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// Whether a comma-separated header contains `token`, case-insensitively
    /// (`Connection: keep-alive, Upgrade`).
    pub fn header_has_token(&self, name: &str, token: &str) -> bool {
        self.headers.iter().filter(|(n, _)| n == name).flat_map(|(_, v)| v.split(',')).any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// The first value of query parameter `name`, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        form_urlencoded::parse(self.query.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
    }
}

/// Why a request was refused. Each maps to the status the client receives.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not parseable as HTTP/1.x.
    #[error("malformed HTTP request: {0}")]
    Malformed(String),
    /// The head is larger than allowed.
    #[error("request head larger than {0} bytes")]
    HeadTooLarge(usize),
    /// The announced body is larger than allowed.
    #[error("request body of {announced} bytes is larger than the {limit}-byte limit")]
    BodyTooLarge {
        /// What `Content-Length` announced.
        announced: u64,
        /// The limit.
        limit: usize,
    },
    /// A body without `Content-Length` (chunked transfer is not supported).
    #[error("a request body needs a Content-Length header")]
    LengthRequired,
}

impl RequestError {
    /// The HTTP status for this error.
    pub fn status(&self) -> u16 {
        match self {
            RequestError::Malformed(_) => 400,
            RequestError::HeadTooLarge(_) => 431,
            RequestError::BodyTooLarge { .. } => 413,
            RequestError::LengthRequired => 411,
        }
    }
}

/// Accumulates the bytes of one request at a time.
#[derive(Debug)]
pub struct RequestReader {
    buf: Vec<u8>,
    max_head: usize,
    max_body: usize,
}

impl RequestReader {
    /// A reader refusing heads over `max_head` bytes and bodies over `max_body` bytes.
    pub fn new(max_head: usize, max_body: usize) -> Self {
        RequestReader { buf: Vec::new(), max_head, max_body }
    }

    /// Adds bytes read from the socket.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Nothing buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Takes the bytes that followed the last complete request (for example WebSocket frames
    /// sent right after an upgrade request).
    pub fn take_rest(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.buf)
    }

    /// Returns the next complete request, `Ok(None)` if more bytes are needed.
    pub fn next_request(&mut self) -> Result<Option<Request>, RequestError> {
        let mut request = Request::default();
        Ok(self.next_request_into(&mut request)?.is_some().then_some(request))
    }

    /// Reads the next complete request into `request`, overwriting it in place so that its
    /// strings, headers and body keep their capacity; `Ok(None)` if more bytes are needed (then
    /// `request` holds nothing of use).
    pub fn next_request_into<'r>(&mut self, request: &'r mut Request) -> Result<Option<&'r Request>, RequestError> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        let head_len = match parsed.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                if self.buf.len() > self.max_head {
                    return Err(RequestError::HeadTooLarge(self.max_head));
                }
                return Ok(None);
            }
            Err(e) => return Err(RequestError::Malformed(e.to_string())),
        };
        if head_len > self.max_head {
            return Err(RequestError::HeadTooLarge(self.max_head));
        }

        let (method, target) = match (parsed.method, parsed.path) {
            (Some(m), Some(p)) => (m, p),
            _ => return Err(RequestError::Malformed("missing method or path".into())),
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        overwrite(&mut request.method, method);
        overwrite(&mut request.path, path);
        overwrite(&mut request.query, query);
        // Pairs already there are overwritten, not replaced, so their strings are reused.
        request.headers.truncate(parsed.headers.len());
        for (i, h) in parsed.headers.iter().enumerate() {
            let value = std::str::from_utf8(h.value).map_err(|_| RequestError::Malformed(format!("header {} is not UTF-8", h.name)))?;
            if i == request.headers.len() {
                request.headers.push(Default::default());
            }
            let (name, kept) = &mut request.headers[i];
            overwrite(name, h.name);
            name.make_ascii_lowercase();
            overwrite(kept, value.trim());
        }
        request.body.clear();
        let http10 = parsed.version == Some(0);
        request.close = http10 && !request.header_has_token("connection", "keep-alive") || request.header_has_token("connection", "close");

        if request.header("transfer-encoding").is_some() {
            return Err(RequestError::LengthRequired);
        }
        let body_len = match request.header("content-length") {
            None => 0,
            Some(v) => {
                let announced: u64 = v.parse().map_err(|_| RequestError::Malformed(format!("bad Content-Length {v:?}")))?;
                if announced > self.max_body as u64 {
                    return Err(RequestError::BodyTooLarge { announced, limit: self.max_body });
                }
                announced as usize
            }
        };
        if self.buf.len() < head_len + body_len {
            return Ok(None);
        }
        request.body.extend_from_slice(&self.buf[head_len..head_len + body_len]);
        self.buf.drain(..head_len + body_len);
        Ok(Some(request))
    }
}

/// Sets `string` to `value`, in the capacity it has.
fn overwrite(string: &mut String, value: &str) {
    string.clear();
    string.push_str(value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader() -> RequestReader {
        RequestReader::new(8192, 100)
    }

    #[test]
    fn a_request_split_anywhere_is_read_whole() {
        let raw = b"POST /apps/1/events?auth_key=k&x=%20y HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhelloGET / HTTP/1.1\r\n\r\n";
        for split in 1..raw.len() {
            let mut r = reader();
            r.push(&raw[..split]);
            let first = match r.next_request().unwrap() {
                Some(req) => req,
                None => {
                    r.push(&raw[split..]);
                    r.next_request().unwrap().expect("complete after the rest")
                }
            };
            assert_eq!(first.method, "POST");
            assert_eq!(first.path, "/apps/1/events");
            assert_eq!(first.query, "auth_key=k&x=%20y");
            assert_eq!(first.query_param("x").as_deref(), Some(" y"));
            assert_eq!(first.body, b"hello");
            assert_eq!(first.header("host"), Some("a"));
        }
    }

    #[test]
    fn a_reused_request_is_overwritten_whole() {
        let mut r = reader();
        r.push(b"POST /first?a=1 HTTP/1.1\r\nHost: a\r\nX-One: 1\r\nX-Two: 2\r\nContent-Length: 5\r\n\r\nhello");
        r.push(b"GET /second HTTP/1.0\r\nHOST: b\r\n\r\n");
        let mut request = Request::default();
        let first = r.next_request_into(&mut request).unwrap().expect("complete").clone();
        assert_eq!((first.path.as_str(), first.headers.len(), first.body.as_slice()), ("/first", 4, &b"hello"[..]));
        let second = r.next_request_into(&mut request).unwrap().expect("complete");
        assert_eq!((second.method.as_str(), second.path.as_str(), second.query.as_str()), ("GET", "/second", ""));
        assert_eq!(second.headers, vec![("host".to_string(), "b".to_string())], "nothing left of the first request's headers");
        assert!(second.body.is_empty() && second.close);
        assert!(r.next_request_into(&mut request).unwrap().is_none());
    }

    #[test]
    fn pipelined_requests_come_out_in_order() {
        let mut r = reader();
        r.push(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nConnection: close\r\n\r\n");
        assert_eq!(r.next_request().unwrap().unwrap().path, "/a");
        let b = r.next_request().unwrap().unwrap();
        assert_eq!(b.path, "/b");
        assert!(b.close);
        assert!(r.next_request().unwrap().is_none());
    }

    #[test]
    fn oversized_bodies_are_refused_before_they_arrive() {
        let mut r = reader();
        r.push(b"POST / HTTP/1.1\r\nContent-Length: 999999999999\r\n\r\n");
        assert_eq!(r.next_request().unwrap_err().status(), 413);
    }

    #[test]
    fn junk_and_huge_heads_are_refused() {
        let mut r = reader();
        r.push(b"\x00\x01\x02 nonsense\r\n\r\n");
        assert_eq!(r.next_request().unwrap_err().status(), 400);

        let mut r = RequestReader::new(64, 100);
        r.push(b"GET / HTTP/1.1\r\nX-Long: ");
        r.push(&[b'a'; 100]);
        assert_eq!(r.next_request().unwrap_err().status(), 431);
    }

    #[test]
    fn chunked_bodies_need_a_length() {
        let mut r = reader();
        r.push(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(r.next_request().unwrap_err().status(), 411);
    }

    #[test]
    fn connection_tokens_are_matched_case_insensitively() {
        let mut r = reader();
        r.push(b"GET /app/k HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n\r\n");
        let req = r.next_request().unwrap().unwrap();
        assert!(req.header_has_token("connection", "upgrade"));
        assert!(req.header_has_token("upgrade", "websocket"));
        assert!(!req.close);
    }

    #[test]
    fn http10_closes_unless_kept_alive() {
        let mut r = reader();
        r.push(b"GET / HTTP/1.0\r\n\r\n");
        assert!(r.next_request().unwrap().unwrap().close);
    }
}
