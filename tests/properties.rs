//! Properties of the parsers that read what clients send, checked on stable with proptest over
//! generated inputs (the fuzz targets in tools/fuzz run the same entry points for longer):
//! - any bytes never panic: the WebSocket frame decoder, the HTTP request reader, the Pusher
//!   session's message handling and the signed REST API each answer garbage with an error;
//! - feeding an input in any pieces gives what feeding it whole gives;
//! - what a client encodes is what the server decodes: frames (masked, fragmented or not) and
//!   HTTP requests round-trip, and a request signed as the SDKs sign it verifies.

use std::time::Instant;

use proptest::prelude::*;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::Frame;

use flux::apps::{AppConfig, Apps};
use flux::config::Config;
use flux::fanout::directory::Directory;
use flux::http::{Request, RequestReader};
use flux::pusher::presence::Membership;
use flux::pusher::protocol::SocketId;
use flux::pusher::rest::{self, RestContext};
use flux::pusher::session::{Policy, Session};
use flux::pusher::signature::{sign_query, Verifier};
use flux::pusher::AppIndex;
use flux::ws::{Decoder, Flow, Incoming};

/// Largest message the decoders here accept (the node's default: 10 KiB of data and 4 KiB of
/// envelope).
const MAX_MESSAGE: usize = 14 * 1024;

/// A message as the server saw it, owned, to compare runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
    Error(u16),
}

impl From<Incoming<'_>> for Seen {
    fn from(incoming: Incoming<'_>) -> Seen {
        match incoming {
            Incoming::Text(t) => Seen::Text(t.to_string()),
            Incoming::Binary(b) => Seen::Binary(b.to_vec()),
            Incoming::Ping(p) => Seen::Ping(p.to_vec()),
            Incoming::Pong(p) => Seen::Pong(p.to_vec()),
            Incoming::Close(c) => Seen::Close(c.map(|(code, reason)| (code, reason.to_string()))),
        }
    }
}

/// Decodes `bytes` cut at `cuts` (offsets, in any order), as a socket might deliver them.
fn decode_in_pieces(bytes: &[u8], cuts: &[usize]) -> Vec<Seen> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut decoder = Decoder::new(MAX_MESSAGE);
    let mut seen = Vec::new();
    let mut start = 0;
    for end in cuts.into_iter().chain([bytes.len()]) {
        let mut piece = bytes[start..end].to_vec();
        start = end;
        let result = decoder.decode(&mut piece, &mut |incoming| {
            seen.push(Seen::from(incoming));
            Flow::Continue
        });
        if let Err(e) = result {
            seen.push(Seen::Error(e.close_code()));
            break;
        }
    }
    seen
}

/// A message a client may send.
#[derive(Debug, Clone)]
enum Message {
    Text(String),
    Binary(Vec<u8>),
    Ping(Vec<u8>),
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        ".{0,300}".prop_map(Message::Text),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(Message::Binary),
        proptest::collection::vec(any::<u8>(), 0..125).prop_map(Message::Ping),
    ]
}

/// `message` as masked client frames: data messages in `fragments` pieces (continuation frames).
fn encode(message: &Message, fragments: usize, mask: [u8; 4], out: &mut Vec<u8>) {
    let mut push = |mut frame: Frame| {
        frame.header_mut().mask = Some(mask);
        frame.format(out).expect("a Vec takes any frame");
    };
    let (payload, opcode) = match message {
        Message::Ping(p) => return push(Frame::ping(p.clone())),
        Message::Text(t) => (t.as_bytes(), OpCode::Data(Data::Text)),
        Message::Binary(b) => (b.as_slice(), OpCode::Data(Data::Binary)),
    };
    let size = payload.len().div_ceil(fragments.max(1)).max(1);
    let pieces: Vec<&[u8]> = if payload.is_empty() { vec![payload] } else { payload.chunks(size).collect() };
    for (i, piece) in pieces.iter().enumerate() {
        let opcode = if i == 0 { opcode } else { OpCode::Data(Data::Continue) };
        push(Frame::message(piece.to_vec(), opcode, i + 1 == pieces.len()));
    }
}

fn expected(message: &Message) -> Seen {
    match message {
        Message::Text(t) => Seen::Text(t.clone()),
        Message::Binary(b) => Seen::Binary(b.clone()),
        Message::Ping(p) => Seen::Ping(p.clone()),
    }
}

/// A request as an HTTP client would send it.
#[derive(Debug, Clone)]
struct Sent {
    method: &'static str,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

fn sent_request() -> impl Strategy<Value = Sent> {
    (
        prop_oneof![Just("GET"), Just("POST")],
        "/[a-z0-9/_-]{0,40}",
        "[a-z0-9=&_%]{0,40}",
        // Distinct names: a repeated header is read as its first value.
        proptest::collection::btree_map("x-[a-z]{1,12}", "[ -~]{0,40}", 0..6),
        proptest::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(method, path, query, headers, body)| Sent {
            method,
            path,
            query,
            headers: headers.into_iter().map(|(n, v)| (n, v.trim().to_string())).collect(),
            body,
        })
}

impl Sent {
    fn bytes(&self) -> Vec<u8> {
        let query = if self.query.is_empty() { String::new() } else { format!("?{}", self.query) };
        let mut head =
            format!("{} {}{query} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {}\r\n", self.method, self.path, self.body.len());
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

/// Every request `bytes` holds, read in pieces cut at `cuts`; an error ends the reading.
fn read_requests(bytes: &[u8], cuts: &[usize]) -> Vec<Result<Request, u16>> {
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut reader = RequestReader::new(16 * 1024, 64 * 1024);
    let mut read = Vec::new();
    let mut start = 0;
    for end in cuts.into_iter().chain([bytes.len()]) {
        reader.push(&bytes[start..end]);
        start = end;
        loop {
            match reader.next_request() {
                Ok(Some(request)) => read.push(Ok(request)),
                Ok(None) => break,
                Err(e) => {
                    read.push(Err(e.status()));
                    return read;
                }
            }
        }
    }
    read
}

/// Pusher client messages, from well-formed to nonsense: real event names and shapes with
/// arbitrary values, and arbitrary text.
fn client_text() -> impl Strategy<Value = String> {
    let event = prop_oneof![
        Just("pusher:subscribe".to_string()),
        Just("pusher:unsubscribe".to_string()),
        Just("pusher:ping".to_string()),
        Just("pusher:signin".to_string()),
        Just("client-x".to_string()),
        ".{0,20}",
    ];
    let value = prop_oneof![
        Just("null".to_string()),
        Just("{}".to_string()),
        "[0-9]{1,20}".prop_map(|n| n),
        ".{0,40}".prop_map(|s| serde_json::Value::String(s).to_string()),
        ("[a-z-]{0,30}", ".{0,60}", ".{0,60}").prop_map(|(channel, auth, data)| {
            serde_json::json!({"channel": channel, "auth": auth, "channel_data": data, "user_data": data}).to_string()
        }),
    ];
    prop_oneof![
        (event, value, "[a-z-]{0,20}").prop_map(|(event, data, channel)| format!(
            r#"{{"event":{},"data":{data},"channel":"{channel}"}}"#,
            serde_json::Value::String(event)
        )),
        ".{0,200}",
    ]
}

proptest! {
    // 256 cases each unless PROPTEST_CASES says more (a long run by hand). No failure files: a
    // failure prints its minimal input, to be kept as a test of its own.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_never_panic_the_frame_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..2048), cuts in proptest::collection::vec(0usize..2048, 0..8)) {
        decode_in_pieces(&bytes, &cuts);
    }

    #[test]
    fn frames_round_trip_whole_or_in_any_pieces(
        messages in proptest::collection::vec(message(), 1..6),
        fragments in 1usize..4,
        mask in any::<[u8; 4]>(),
        cuts in proptest::collection::vec(0usize..4096, 0..10),
    ) {
        let mut bytes = Vec::new();
        for message in &messages {
            encode(message, fragments, mask, &mut bytes);
        }
        let whole = decode_in_pieces(&bytes, &[]);
        prop_assert_eq!(&whole, &messages.iter().map(expected).collect::<Vec<_>>());
        prop_assert_eq!(decode_in_pieces(&bytes, &cuts), whole);
    }

    #[test]
    fn any_bytes_never_panic_the_request_reader(bytes in proptest::collection::vec(any::<u8>(), 0..2048), cuts in proptest::collection::vec(0usize..2048, 0..8)) {
        read_requests(&bytes, &cuts);
    }

    #[test]
    fn requests_round_trip_whole_or_in_any_pieces(requests in proptest::collection::vec(sent_request(), 1..4), cuts in proptest::collection::vec(0usize..2048, 0..10)) {
        let bytes: Vec<u8> = requests.iter().flat_map(Sent::bytes).collect();
        let whole = read_requests(&bytes, &[]);
        prop_assert_eq!(whole.len(), requests.len());
        for (read, sent) in whole.iter().zip(&requests) {
            let read = read.as_ref().expect("a well-formed request reads");
            prop_assert_eq!((read.method.as_str(), read.path.as_str(), read.query.as_str()), (sent.method, sent.path.as_str(), sent.query.as_str()));
            prop_assert_eq!(&read.body, &sent.body);
            for (name, value) in &sent.headers {
                prop_assert_eq!(read.header(name), Some(value.as_str()));
            }
        }
        let pieces = read_requests(&bytes, &cuts);
        let summary = |read: &[Result<Request, u16>]| read.iter().map(|r| r.as_ref().map(|r| (r.method.clone(), r.path.clone(), r.query.clone(), r.body.clone())).map_err(|s| *s)).collect::<Vec<_>>();
        prop_assert_eq!(summary(&pieces), summary(&whole));
    }

    #[test]
    fn any_client_message_gets_an_answer_and_no_panic(texts in proptest::collection::vec(client_text(), 1..8)) {
        let app = AppConfig::from_settings(&Config::default());
        let cells = Default::default();
        let now = Instant::now();
        let mut session = Session::new(SocketId { high: 1, low: 1 }, AppIndex(0), flux::apps::Connected::new(&cells), now);
        for text in &texts {
            session.handle_text(text, now, &Policy::from_config(&Config::default()), &app);
        }
    }

    #[test]
    fn any_rest_call_is_answered_with_a_status_and_json(
        method in prop_oneof![Just("GET"), Just("POST"), Just("PUT")],
        path in prop_oneof!["/apps/app-id/[a-z_/%-]{0,40}", ".{0,60}"],
        query in ".{0,120}",
        body in proptest::collection::vec(any::<u8>(), 0..300),
        signed in any::<bool>(),
    ) {
        let apps = Apps::new(vec![AppConfig::from_settings(&Config::default())]);
        let unix_now = 1_700_000_000;
        let query = if signed {
            let app = &apps.by_id("app-id").expect("the app").1.app;
            sign_query(app, method, &path, &body, &[], unix_now)
        } else {
            query
        };
        let request = Request { method: method.into(), path: path.clone(), query, headers: Vec::new(), body, close: false };
        let response = match rest::resolve(&request, &apps) {
            Err(refused) => refused,
            Ok((index, app, rates)) => {
                let (directory, membership) = (Directory::new(2), Membership::default());
                let context = RestContext { app, index, directory: &directory, membership: &membership, unix_now, rates: (rates, Instant::now()) };
                rest::handle(&request, &context, &mut Verifier::default()).response
            }
        };
        prop_assert!((200..600).contains(&response.status));
        prop_assert!(serde_json::from_slice::<serde_json::Value>(&response.body).is_ok(), "JSON: {:?}", String::from_utf8_lossy(&response.body));
    }

    #[test]
    fn a_request_signed_as_the_sdks_sign_it_verifies_and_a_changed_one_does_not(
        method in prop_oneof![Just("GET"), Just("POST")],
        path in "/apps/app-id/[a-z_/]{0,30}",
        body in proptest::collection::vec(any::<u8>(), 0..200),
        params in proptest::collection::vec(("[a-z_]{1,10}", "[ -~]{0,20}"), 0..4),
        flip in any::<usize>(),
    ) {
        let app = AppConfig::from_settings(&Config::default()).app;
        let params: Vec<(String, String)> = params.into_iter().filter(|(k, _)| !k.starts_with("auth_") && k != "body_md5").collect();
        let borrowed: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let unix_now = 1_700_000_000;
        let query = sign_query(&app, method, &path, &body, &borrowed, unix_now);
        let mut verifier = Verifier::default();
        prop_assert!(verifier.verify(&app, method, &path, &query, &body, unix_now).is_ok(), "{}", query);
        if !body.is_empty() && method == "POST" {
            let mut changed = body.clone();
            let i = flip % changed.len();
            changed[i] ^= 1;
            prop_assert!(verifier.verify(&app, method, &path, &query, &changed, unix_now).is_err());
        }
    }
}
