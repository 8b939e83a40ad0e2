//! `/metrics`: the node's counters in the OpenMetrics text format that Prometheus scrapes,
//! through the `prometheus-client` crate.
//!
//! Flux keeps its own counters (relaxed atomics, one writer per worker) so the hot path pays
//! nothing for Prometheus. A [`Collector`] reads them at scrape time and encodes constant
//! metrics; nothing here is updated between scrapes.

use std::fmt;

use hdrhistogram::Histogram;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::apps::{AppCounters, AppStatus};
use crate::cluster::ClusterStatus;
use crate::gateway::Observer;
use crate::metrics::Counters;
use crate::webhooks::WebhookStats;

/// The content type of the OpenMetrics text that `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Reads one counter out of a snapshot.
type Read = fn(&Counters) -> u64;

/// Counters without labels: name (the encoder appends `_total`), help, value.
const COUNTERS: &[(&str, &str, Read)] = &[
    ("flux_connections_accepted", "TCP connections accepted.", |c| c.connections_total),
    ("flux_messages_received", "WebSocket messages received from clients.", |c| c.messages_in),
    ("flux_messages_sent", "Frames fully written to clients (WebSocket frames and HTTP responses).", |c| c.messages_out),
    ("flux_bytes_received", "Bytes read from clients.", |c| c.bytes_in),
    ("flux_bytes_sent", "Bytes written to clients.", |c| c.bytes_out),
    ("flux_http_requests", "HTTP requests handled (REST calls and WebSocket upgrades).", |c| c.http_requests),
    ("flux_broadcasts", "Broadcasts fanned out (one per channel per event, per worker).", |c| c.broadcasts),
    ("flux_deliveries", "Frames queued into connection rings by broadcasts.", |c| c.deliveries),
    ("flux_backpressure_events", "Times a connection entered backpressure.", |c| c.backpressure_events),
    ("flux_frames_dropped", "Frames dropped because a connection's ring was full.", |c| c.drops),
    ("flux_evictions", "Slow consumers evicted with close code 4100.", |c| c.evictions),
    ("flux_presence_resyncs", "Presence members sent the whole roster again after their ring had no room for a change.", |c| {
        c.presence_resyncs
    }),
    ("flux_read_budget_exhausted", "Times a connection's per-turn read budget ran out.", |c| c.read_budget_exhausted),
    ("flux_inbox_full", "Messages between workers that found an inbox full and waited in the sender's backlog.", |c| c.inbox_full),
    ("flux_inbox_overflows", "Messages between workers lost because an inbox and the sender's backlog were full.", |c| c.inbox_overflows),
    ("flux_cache_hits", "Subscriptions to cache channels answered with the channel's last event.", |c| c.cache_hits),
    ("flux_cache_misses", "Subscriptions to cache channels that found no event kept (pusher:cache_miss).", |c| c.cache_misses),
    ("flux_cache_evictions", "Cache channels' last events dropped before their TTL to stay within FLUX_CACHE_MAX_MB.", |c| {
        c.cache_evictions
    }),
    ("flux_subscription_count_events", "Subscription-count events framed (one per channel per announcement).", |c| {
        c.subscription_count_events
    }),
];

/// Upper bounds of the latency histograms' buckets, in microseconds (100 µs to 5 s).
const LATENCY_BUCKETS_MICROS: [u64; 15] =
    [100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000, 5_000_000];

/// A registry whose only collector reads `observer`.
pub fn registry(observer: Observer) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector(observer)));
    registry
}

/// The registry's metrics as OpenMetrics text.
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut text = String::with_capacity(8 * 1024);
    prometheus_client::encoding::text::encode(&mut text, registry)?;
    Ok(text)
}

struct NodeCollector(Observer);

impl fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("NodeCollector")
    }
}

impl Collector for NodeCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let counters = self.0.counters();
        let pool = self.0.pool_stats();

        gauge(&mut encoder, "flux_connections", "TCP connections open.", counters.connections)?;
        gauge(&mut encoder, "flux_websockets", "WebSocket sessions open.", counters.websockets)?;
        let help = "Connections accepted that are not yet an open WebSocket (request being read, TLS handshake, keep-alive HTTP).";
        gauge(&mut encoder, "flux_handshakes_pending", help, counters.handshakes_pending)?;
        for (name, help, value) in COUNTERS {
            counter(&mut encoder, name, help, value(&counters))?;
        }
        labelled_counter(
            &mut encoder,
            ("flux_writes", "Socket flushes, by whether everything queued was written at once."),
            ("result", [("immediate", counters.writes_immediate), ("would_block", counters.writes_would_block)]),
        )?;
        labelled_counter(
            &mut encoder,
            ("flux_frame_pool_checkouts", "Frame buffers checked out, by whether a pooled buffer was reused."),
            ("result", [("hit", pool.hits), ("miss", pool.misses)]),
        )?;
        labelled_counter(
            &mut encoder,
            ("flux_tls_handshakes", "TLS handshakes on the main port, by how they ended."),
            ("result", [("ok", counters.tls_handshakes), ("refused", counters.tls_refused), ("timed_out", counters.tls_timed_out)]),
        )?;
        labelled_counter(
            &mut encoder,
            ("flux_handshakes_refused", "Connections closed at accept, by the cap on unfinished handshakes they met."),
            ("cap", [("node", counters.handshakes_refused_node), ("per_ip", counters.handshakes_refused_per_ip)]),
        )?;
        gauge(&mut encoder, "flux_frame_pool_idle_buffers", "Frame buffers idle in the pool.", pool.idle)?;
        if let Some(heap) = self.0.heap() {
            counter(&mut encoder, "flux_heap_allocations", "Heap allocations and reallocations by the whole process.", heap.allocations)?;
            counter(&mut encoder, "flux_heap_allocated_bytes", "Bytes of heap asked for by those allocations.", heap.bytes)?;
        }
        webhooks(&mut encoder, &self.0.webhooks())?;
        apps(&mut encoder, &self.0.apps().status())?;
        if let Some(status) = self.0.cluster() {
            cluster(&mut encoder, &status)?;
            let help = "Time from a publish on another node of the cluster to its frame queued in the last ring of a worker here.";
            latency(&mut encoder, "flux_cluster_delivery_duration", help, self.0.remote_delivery_histogram())?;
        }

        let help = "Time from a publish to its frame queued in the last ring of a worker.";
        latency(&mut encoder, "flux_fanout_duration", help, self.0.fanout_histogram())
    }
}

/// The webhook sender's figures (all zero when no webhook URL is set, so the series exist
/// either way and dashboards need no special case).
fn webhooks(encoder: &mut DescriptorEncoder, stats: &WebhookStats) -> Result<(), fmt::Error> {
    let c = &stats.counters;
    labelled_counter(
        encoder,
        (
            "flux_webhook_events",
            "Webhook events: queued or dropped (queue full) when emitted; delivered or given up when their batch ends.",
        ),
        (
            "result",
            [
                ("queued", c.events_queued),
                ("dropped", c.events_dropped),
                ("delivered", c.events_delivered),
                ("given_up", c.events_given_up),
            ],
        ),
    )?;
    labelled_counter(
        encoder,
        ("flux_webhook_batches", "Webhook batches, by whether the endpoint accepted one (2xx) or it was given up."),
        ("result", [("delivered", c.batches_delivered), ("given_up", c.batches_given_up)]),
    )?;
    let failed_help = "Webhook POSTs that failed: network error, timeout or a status other than 2xx.";
    counter(encoder, "flux_webhook_failed_attempts", failed_help, c.attempts_failed)?;
    counter(encoder, "flux_webhook_retries", "Webhook POSTs that retried a failed one.", c.retries)?;
    gauge(encoder, "flux_webhook_queue_depth", "Webhook events waiting in the queue.", stats.queue_depth)
}

/// Each app's figures, labelled with its id.
fn apps(encoder: &mut DescriptorEncoder, apps: &[AppStatus]) -> Result<(), fmt::Error> {
    type AppRead = fn(&AppCounters) -> u64;
    let families: [(&str, &str, MetricType, AppRead); 7] = [
        ("flux_app_connections", "WebSocket connections of the app open now on this node.", MetricType::Gauge, |c| c.connections),
        ("flux_app_connections_elsewhere", "The app's connections on the other nodes of the cluster.", MetricType::Gauge, |c| {
            c.connections_elsewhere
        }),
        ("flux_app_messages_received", "WebSocket messages received from the app's clients.", MetricType::Counter, |c| c.messages_in),
        (
            "flux_app_broadcasts",
            "The app's events fanned out (REST, client events, announcements), once per channel.",
            MetricType::Counter,
            |c| c.broadcasts,
        ),
        ("flux_app_deliveries", "Frames queued into the rings of the app's subscribers.", MetricType::Counter, |c| c.deliveries),
        ("flux_app_connections_refused", "Clients refused for the app's max_connections (4004).", MetricType::Counter, |c| c.over_quota),
        ("flux_app_rate_limited", "REST calls of the app refused with 429 for its per-second limits.", MetricType::Counter, |c| {
            c.rate_limited
        }),
    ];
    for (name, help, kind, read) in families {
        let mut family = encoder.encode_descriptor(name, help, None, kind)?;
        for app in apps {
            let labels = [("app", app.id.as_str())];
            let value = read(&app.counters);
            match kind {
                MetricType::Gauge => ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX)).encode(family.encode_family(&labels)?)?,
                _ => ConstCounter::new(value).encode(family.encode_family(&labels)?)?,
            }
        }
    }
    Ok(())
}

/// The cluster's figures, when the node is in one.
fn cluster(encoder: &mut DescriptorEncoder, status: &ClusterStatus) -> Result<(), fmt::Error> {
    let c = &status.counters;
    gauge(encoder, "flux_cluster_link_up", "1 while both connections to Redis are up.", u64::from(status.link_up))?;
    gauge(encoder, "flux_cluster_nodes", "Other live nodes this node sees.", status.nodes.len() as u64)?;
    let directions = |out, into| ("direction", [("out", out), ("in", into)]);
    labelled_counter(encoder, ("flux_cluster_messages", "Messages over Redis, by direction."), directions(c.messages_out, c.messages_in))?;
    labelled_counter(encoder, ("flux_cluster_bytes", "Bytes over Redis, by direction."), directions(c.bytes_out, c.bytes_in))?;
    let dropped_help = "Messages not published on Redis: the queue to it was full, or the link failed with them.";
    counter(encoder, "flux_cluster_dropped", dropped_help, c.dropped)?;
    counter(encoder, "flux_cluster_reconnects", "Times a lost Redis connection was made again.", c.reconnects)?;
    counter(encoder, "flux_cluster_inbox_waits", "Events from other nodes that waited for a worker's inbox to have room.", c.inbox_waits)?;
    counter(encoder, "flux_cluster_inputs_lost", "Changes of this node's state that never reached the cluster thread.", c.inputs_lost)?;
    let help = "Cache channels' last events read back from Redis (when the node joins, and after each reconnect).";
    counter(encoder, "flux_cluster_last_events_loaded", help, c.last_events_loaded)?;
    counter(
        encoder,
        "flux_cluster_last_event_loads",
        "Times the cache channels' last events were read back from Redis completely.",
        c.last_event_loads,
    )
}

fn latency(encoder: &mut DescriptorEncoder, name: &str, help: &str, histogram: Option<Histogram<u64>>) -> Result<(), fmt::Error> {
    let seconds = LatencySeconds::of(histogram);
    seconds.encode(encoder.encode_descriptor(name, help, Some(&Unit::Seconds), seconds.metric_type())?)
}

fn counter(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), fmt::Error> {
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Result<(), fmt::Error> {
    // Gauges are signed in OpenMetrics; these never come near i64::MAX.
    let metric = ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX));
    metric.encode(encoder.encode_descriptor(name, help, None, metric.metric_type())?)
}

fn labelled_counter<const N: usize>(
    encoder: &mut DescriptorEncoder,
    (name, help): (&str, &str),
    (label, values): (&str, [(&str, u64); N]),
) -> Result<(), fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (value_label, value) in values {
        ConstCounter::new(value).encode(family.encode_family(&[(label, value_label)])?)?;
    }
    Ok(())
}

/// A latency histogram, converted from microseconds to Prometheus buckets in seconds.
struct LatencySeconds {
    sum: f64,
    count: u64,
    /// Upper bound (seconds) and the samples in that bucket alone; the encoder accumulates.
    buckets: Vec<(f64, u64)>,
}

impl LatencySeconds {
    fn of(histogram: Option<Histogram<u64>>) -> LatencySeconds {
        // Counts are exact to the histogram's precision (3 significant digits).
        let count_up_to = |micros| histogram.as_ref().map_or(0, |h| h.count_between(0, micros));
        let count = histogram.as_ref().map_or(0, |h| h.len());
        let mut below = 0;
        let mut buckets = Vec::with_capacity(LATENCY_BUCKETS_MICROS.len() + 1);
        for bound in LATENCY_BUCKETS_MICROS {
            let cumulative = count_up_to(bound);
            buckets.push((bound as f64 / 1e6, cumulative.saturating_sub(below)));
            below = cumulative;
        }
        buckets.push((f64::INFINITY, count.saturating_sub(below)));
        // The histogram keeps no exact sum; its mean is exact to the same precision.
        let sum = histogram.as_ref().map_or(0.0, |h| h.mean() * h.len() as f64 / 1e6);
        LatencySeconds { sum, count, buckets }
    }
}

impl EncodeMetric for LatencySeconds {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_split_the_histogram_and_add_up_to_its_count() {
        let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
        for micros in [50, 200, 200, 4_000, 9_000_000] {
            h.record(micros).expect("in range");
        }
        let fanout = LatencySeconds::of(Some(h));
        assert_eq!(fanout.count, 5);
        assert_eq!(fanout.buckets.iter().map(|&(_, n)| n).sum::<u64>(), 5);
        assert_eq!(fanout.buckets[0], (0.0001, 1));
        assert_eq!(fanout.buckets[1], (0.00025, 2));
        assert_eq!(fanout.buckets.last(), Some(&(f64::INFINITY, 1)));
    }
}
