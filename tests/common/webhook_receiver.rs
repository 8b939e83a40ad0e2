//! A webhook endpoint for the tests: a tiny_http server on a free loopback port that records
//! every POST and answers with the statuses it is given.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flux::webhooks::WebhookUrl;
use serde_json::Value;

/// One POST the receiver got.
#[derive(Debug)]
pub struct Posted {
    pub at: Instant,
    /// Header names lower-cased.
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Posted {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", String::as_str)
    }

    pub fn event_names(&self) -> Vec<String> {
        let events = self.json()["events"].as_array().cloned().unwrap_or_default();
        events.iter().map(|e| e["name"].as_str().unwrap_or("").to_string()).collect()
    }
}

/// A webhook endpoint on a free loopback port. It answers each POST with the next of the
/// statuses it was given, then 200.
pub struct Receiver {
    pub url: WebhookUrl,
    pub posts: crossbeam_channel::Receiver<Posted>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Receiver {
    pub fn answering(statuses: &[u16]) -> Receiver {
        let server = tiny_http::Server::http("127.0.0.1:0").expect("receiver binds");
        let addr = server.server_addr().to_ip().expect("an IP address");
        let (tx, posts) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let mut statuses: VecDeque<u16> = statuses.iter().copied().collect();
        let stopping = stop.clone();
        let thread = std::thread::spawn(move || {
            while !stopping.load(Ordering::Acquire) {
                let Ok(Some(mut request)) = server.recv_timeout(Duration::from_millis(20)) else { continue };
                let mut body = String::new();
                request.as_reader().read_to_string(&mut body).expect("a UTF-8 body");
                let headers = request
                    .headers()
                    .iter()
                    .map(|h| (h.field.as_str().as_str().to_ascii_lowercase(), h.value.as_str().to_string()))
                    .collect();
                let _ = tx.send(Posted { at: Instant::now(), headers, body });
                let status = statuses.pop_front().unwrap_or(200);
                let _ = request.respond(tiny_http::Response::from_string("").with_status_code(status));
            }
        });
        let url = format!("http://{addr}/pusher/webhooks").parse().expect("a valid URL");
        Receiver { url, posts, stop, thread: Some(thread) }
    }

    pub fn next(&self, within: Duration) -> Posted {
        self.posts.recv_timeout(within).expect("a webhook POST")
    }

    /// Every event posted until no POST has come for `quiet`, in order.
    pub fn events_until_quiet(&self, quiet: Duration) -> Vec<Value> {
        let mut events = Vec::new();
        while let Ok(posted) = self.posts.recv_timeout(quiet) {
            events.extend(posted.json()["events"].as_array().cloned().unwrap_or_default());
        }
        events
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
