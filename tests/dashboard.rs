//! The dashboard's HTTP side on loopback: an in-process gateway with its dashboard on free
//! ports, real WebSocket clients and REST publishes, and plain HTTP requests to the JSON API,
//! the Prometheus metrics and the embedded page.

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::{masked_text, raw_websocket, wait_until, Client};
use flux::dashboard::Dashboard;
use flux::gateway::Gateway;
use flux::heap::CountingAllocator;
use serde_json::{json, Value};

/// As in the `flux` binary, so the heap figures are there to check.
#[global_allocator]
static GLOBAL: CountingAllocator = CountingAllocator;

/// A gateway and its dashboard, both on free loopback ports.
fn start() -> (Gateway, Dashboard) {
    let gateway = common::start(&common::config());
    let dashboard = Dashboard::start(SocketAddr::from(([127, 0, 0, 1], 0)), gateway.observer().clone()).expect("dashboard starts");
    (gateway, dashboard)
}

/// A response: status, content type, body.
struct Got {
    status: u16,
    content_type: String,
    allow: Option<String>,
    body: String,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn request(dashboard: &Dashboard, method: &str, path: &str) -> Got {
    let url = format!("http://{}{path}", dashboard.local_addr());
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let response = match method {
        "GET" => agent.get(&url).call(),
        "POST" => agent.post(&url).send(""),
        "DELETE" => agent.delete(&url).call(),
        other => panic!("unsupported method {other}"),
    }
    .expect("HTTP request");
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (status, content_type, allow) = (response.status().as_u16(), header("content-type").unwrap_or_default(), header("allow"));
    let body = response.into_body().read_to_string().expect("response body");
    Got { status, content_type, allow, body }
}

fn get_json(dashboard: &Dashboard, path: &str) -> Value {
    let got = request(dashboard, "GET", path);
    assert_eq!(got.status, 200, "{path}: {}", got.body);
    assert_eq!(got.content_type, "application/json", "{path}");
    got.json()
}

#[test]
fn stats_have_their_shape_and_move_after_a_publish() {
    let (gateway, dashboard) = start();
    let stats = get_json(&dashboard, "/api/stats");
    for key in ["totals", "latest", "write_success_rate", "write_success_target", "frame_pool", "fanout", "interval_s", "webhooks"] {
        assert!(stats.get(key).is_some(), "/api/stats has no {key}: {stats}");
    }
    for key in ["messages_in", "messages_out", "bytes_out", "broadcasts", "deliveries", "drops", "evictions", "websockets"] {
        assert!(stats["totals"][key].is_u64(), "totals.{key}: {stats}");
    }
    assert_eq!(stats["write_success_target"], 95.0);
    assert!(stats["frame_pool"]["hit_rate"].is_f64() && stats["fanout"]["p99_ms"].is_f64(), "{stats}");

    let mut client = Client::connect(gateway.local_addr());
    client.subscribe("dash");
    let (status, body) = common::publish(gateway.local_addr(), &["dash"], "tick", "{\"n\":1}", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(client.next_event()["event"], "tick");

    // Fan-out times reach the shared histogram on the workers' one-second tick.
    assert!(wait_until(Duration::from_secs(5), || {
        let totals = get_json(&dashboard, "/api/stats");
        totals["totals"]["broadcasts"] == 1
            && totals["totals"]["deliveries"] == 1
            && totals["totals"]["websockets"] == 1
            && totals["fanout"]["count"] == 1
            && totals["apps"][0]["deliveries"] == 1
    }));
    let app = &get_json(&dashboard, "/api/stats")["apps"][0];
    assert_eq!((app["id"].as_str(), app["enabled"].as_bool(), app["connections"].as_u64()), (Some("app-id"), Some(true), Some(1)), "{app}");
    // The sampler saw the delivery as a rate in one of its one-second samples.
    assert!(wait_until(Duration::from_secs(5), || {
        let history = get_json(&dashboard, "/api/history");
        history["samples"].as_array().is_some_and(|samples| samples.iter().any(|s| s["deliveries"].as_f64() > Some(0.0)))
    }));
    let latest = &get_json(&dashboard, "/api/stats")["latest"];
    for key in ["t", "messages_out", "bytes_out", "deliveries", "write_success_rate", "pool_hit_rate", "websockets", "heap_allocations"] {
        assert!(latest[key].is_number(), "latest.{key}: {latest}");
    }
    // Counted since start, and every answer above allocated.
    let heap = &get_json(&dashboard, "/api/stats")["heap"];
    assert!(heap["allocations"].as_u64() > Some(0) && heap["bytes"].as_u64() > Some(0), "{heap}");
    let evictions = get_json(&dashboard, "/api/evictions");
    assert_eq!(evictions, json!({"total": 0, "recent": []}));
}

#[test]
fn connections_list_a_subscribed_raw_client() {
    let (gateway, dashboard) = start();
    let mut raw = raw_websocket(gateway.local_addr());
    let subscribe = json!({"event": "pusher:subscribe", "data": {"channel": "grid"}}).to_string();
    raw.write_all(&masked_text(subscribe.as_bytes())).expect("subscribe");
    let peer = raw.local_addr().expect("local address").to_string();

    let mut listed = Value::Null;
    assert!(wait_until(Duration::from_secs(5), || {
        listed = get_json(&dashboard, "/api/connections");
        listed["connections"][0]["channels"] == json!(["grid"])
    }));
    assert_eq!((listed["total"].as_u64(), listed["shown"].as_u64()), (Some(1), Some(1)), "{listed}");
    let conn = &listed["connections"][0];
    assert_eq!(conn["peer"], peer);
    assert!(conn["socket_id"].as_str().is_some_and(|id| id.contains('.')), "{conn}");
    assert_eq!(conn["ring_slots"], 256);
    assert!(conn["ring_len"].is_u64() && conn["dropped"] == 0 && conn["backpressured_ms"].is_null(), "{conn}");

    let none = get_json(&dashboard, "/api/connections?limit=0");
    assert_eq!((none["total"].as_u64(), none["shown"].as_u64()), (Some(1), Some(0)), "{none}");
    let bad = request(&dashboard, "GET", "/api/connections?limit=lots");
    assert_eq!(bad.status, 400);
    assert!(bad.json()["error"].as_str().is_some_and(|e| e.contains("limit")), "{}", bad.body);
}

/// One sample line of the text format: its name, its labels, its value.
struct PromSample {
    name: String,
    labels: String,
    value: f64,
}

/// Parses OpenMetrics text: `# HELP`, `# TYPE`, `# UNIT` comments, samples, and `# EOF` last.
/// Returns each family's type and every sample; panics on anything else.
fn parse_metrics(text: &str) -> (HashMap<String, String>, Vec<PromSample>) {
    let (mut types, mut samples) = (HashMap::new(), Vec::new());
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "the exposition ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or_else(|| panic!("bad TYPE line {line:?}"));
            types.insert(name.to_string(), kind.to_string());
        } else if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        } else {
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {line:?}"));
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.strip_suffix('}').unwrap_or_else(|| panic!("bad labels {line:?}"))),
                None => (series, ""),
            };
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "bad metric name {name:?}");
            let value = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
            samples.push(PromSample { name: name.to_string(), labels: labels.to_string(), value });
        }
    }
    (types, samples)
}

#[test]
fn metrics_are_prometheus_text_with_total_counters() {
    let (gateway, dashboard) = start();
    let mut client = Client::connect(gateway.local_addr());
    client.subscribe("prom");
    let (status, _) = common::publish(gateway.local_addr(), &["prom"], "tick", "{}", None);
    assert_eq!(status, 200);
    assert_eq!(client.next_event()["event"], "tick");

    let got = request(&dashboard, "GET", "/metrics");
    assert_eq!(got.status, 200);
    assert!(got.content_type.starts_with("application/openmetrics-text"), "{}", got.content_type);
    let (types, samples) = parse_metrics(&got.body);
    let value = |name: &str, labels: &str| {
        samples.iter().find(|s| s.name == name && s.labels == labels).map(|s| s.value).unwrap_or_else(|| panic!("no {name}{{{labels}}}"))
    };

    for (family, kind) in &types {
        if kind == "counter" {
            let family_samples: Vec<&PromSample> = samples.iter().filter(|s| s.name.starts_with(family.as_str())).collect();
            assert!(!family_samples.is_empty(), "counter {family} has no samples");
            assert!(family_samples.iter().all(|s| s.name == format!("{family}_total")), "counter {family} samples end in _total");
        }
    }
    assert_eq!(types.get("flux_connections").map(String::as_str), Some("gauge"));
    assert_eq!(types.get("flux_fanout_duration_seconds").map(String::as_str), Some("histogram"));
    assert_eq!(value("flux_websockets", ""), 1.0);
    assert_eq!(value("flux_broadcasts_total", ""), 1.0);
    assert_eq!(value("flux_deliveries_total", ""), 1.0);
    assert!(value("flux_messages_sent_total", "") >= 3.0, "connection_established, subscription_succeeded, tick");
    assert!(value("flux_bytes_sent_total", "") > 0.0);
    for name in ["flux_messages_received_total", "flux_bytes_received_total", "flux_backpressure_events_total"] {
        value(name, "");
    }
    for name in ["flux_frames_dropped_total", "flux_evictions_total", "flux_frame_pool_idle_buffers"] {
        value(name, "");
    }
    assert!(value("flux_writes_total", r#"result="immediate""#) >= 1.0);
    value("flux_writes_total", r#"result="would_block""#);
    assert!(value("flux_frame_pool_checkouts_total", r#"result="miss""#) >= 1.0);
    assert!(value("flux_heap_allocations_total", "") > 0.0 && value("flux_heap_allocated_bytes_total", "") > 0.0);
    value("flux_frame_pool_checkouts_total", r#"result="hit""#);
    value("flux_fanout_duration_seconds_count", "");
    value("flux_fanout_duration_seconds_bucket", r#"le="+Inf""#);
    // Without a webhook URL the webhook series are there, at zero.
    assert_eq!(value("flux_webhook_events_total", r#"result="queued""#), 0.0);
    assert_eq!(value("flux_webhook_queue_depth", ""), 0.0);
    // The same, for the one app.
    let app = r#"app="app-id""#;
    assert_eq!(types.get("flux_app_connections").map(String::as_str), Some("gauge"));
    assert_eq!((value("flux_app_connections", app), value("flux_app_broadcasts_total", app)), (1.0, 1.0));
    assert_eq!(value("flux_app_deliveries_total", app), 1.0);
    assert!(value("flux_app_messages_received_total", app) >= 1.0, "the subscribe");
    assert_eq!((value("flux_app_connections_refused_total", app), value("flux_app_rate_limited_total", app)), (0.0, 0.0));
}

#[test]
fn the_page_is_embedded_and_errors_are_json() {
    let (_gateway, dashboard) = start();
    let page = request(&dashboard, "GET", "/");
    assert_eq!(page.status, 200);
    assert!(page.content_type.starts_with("text/html"), "{}", page.content_type);
    for reference in ["/app.js", "/style.css", "/vendor/uplot/uPlot.iife.min.js", "/vendor/uplot/uPlot.min.css"] {
        assert!(page.body.contains(reference), "the page loads {reference}");
        let file = request(&dashboard, "GET", reference);
        assert_eq!(file.status, 200, "{reference}");
        assert!(!file.body.is_empty(), "{reference}");
    }
    assert!(!page.body.contains("://"), "the page loads nothing from another host");

    let missing = request(&dashboard, "GET", "/api/nothing");
    assert_eq!((missing.status, missing.content_type.as_str()), (404, "application/json"));
    assert!(missing.json()["error"].is_string(), "{}", missing.body);

    for method in ["POST", "DELETE"] {
        let wrong = request(&dashboard, method, "/api/stats");
        assert_eq!((wrong.status, wrong.content_type.as_str()), (405, "application/json"), "{method}");
        assert!(wrong.json()["error"].is_string(), "{}", wrong.body);
        assert_eq!(wrong.allow.as_deref(), Some("GET, HEAD"));
    }
}

#[test]
fn stopping_the_dashboard_closes_its_port() {
    let (_gateway, dashboard) = start();
    let addr = dashboard.local_addr();
    assert_eq!(request(&dashboard, "GET", "/api/stats").status, 200);
    dashboard.stop();
    assert!(wait_until(Duration::from_secs(5), || TcpStream::connect(addr).is_err()), "the dashboard still accepts connections after stop");
}
