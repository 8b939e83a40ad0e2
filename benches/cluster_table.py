#!/usr/bin/env python3
"""Prints benches/cluster.sh's results as Markdown tables: one per run, a column per setup
(flux-1: one node; flux-3: three Flux nodes on Redis; sockudo-3: three Sockudo nodes on Redis),
with the three-node cluster's ratios to the single node and to Sockudo.

Usage: benches/cluster_table.py RESULTS_DIR
"""

import sys
from pathlib import Path

from compare_table import load

SETUPS = ["flux-1", "flux-3", "flux-3x1", "sockudo-3"]


def cpu(s):
    return sum(n["cpu_secs"] for n in s["_server"].get("nodes", []))


def deliveries(s):
    return s.get("roles", {}).get("healthy", {}).get("unique", s["delivered"])


def per(numerator, denominator, scale):
    return round(scale * numerator / denominator, 2) if denominator else None


ROWS = [
    ("events published", lambda s: f"{s['published']:,}"),
    ("deliveries / expected", lambda s: f"{deliveries(s):,} / {s['expected']:,}"),
    ("gaps", lambda s: s["gaps"]),
    ("deliveries/s (run average)", lambda s: f"{s['deliveries_per_sec']:,.0f}"),
    ("deliveries/s (best second)", lambda s: f"{s['peak_deliveries_per_sec']:,.0f}"),
    ("latency p50 ms", lambda s: s["latency_ms"]["p50"]),
    ("latency p95 ms", lambda s: s["latency_ms"]["p95"]),
    ("latency p99 ms", lambda s: s["latency_ms"]["p99"]),
    ("server CPU s (all nodes)", lambda s: round(cpu(s), 2)),
    ("server CPU µs per delivery", lambda s: per(cpu(s), deliveries(s), 1e6)),
    ("peak RSS per node MiB", lambda s: ", ".join(f"{n['rss_peak_kib'] / 1024:.0f}" for n in s["_server"]["nodes"])),
    ("Redis CPU s", lambda s: s["_server"].get("redis_cpu_secs", "–")),
    ("Redis CPU µs per event", lambda s: per(s["_server"]["redis_cpu_secs"], s["published"], 1e6) if "redis_cpu_secs" in s["_server"] else "–"),
    ("Redis PUBLISH per event", lambda s: per(s["_server"]["redis_publishes"], s["published"], 1) if "redis_publishes" in s["_server"] else "–"),
]

PRESENCE_ROWS = [
    ("member events received", lambda s: f"{s['presence']['member_events']:,}"),
    ("member events/s", lambda s: f"{s['presence']['member_events_per_sec']:,.0f}"),
    ("member_added latency from the join p50 ms", lambda s: s["presence"]["member_added_latency_ms"]["p50"]),
    ("member_added latency from the join p99 ms", lambda s: s["presence"]["member_added_latency_ms"]["p99"]),
]


def cell(getter, summary):
    try:
        value = getter(summary)
    except (KeyError, TypeError, ZeroDivisionError):
        return "–"
    return "–" if value is None else str(value)


def table(run, setups):
    names = [s for s in SETUPS if s in setups] + [s for s in setups if s not in SETUPS]
    print(f"\n### {run}\n")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    rows = ROWS + (PRESENCE_ROWS if any("presence" in s for s in setups.values()) else [])
    for label, getter in rows:
        print(f"| {label} | " + " | ".join(cell(getter, setups[n]) for n in names) + " |")
    single, sockudo = setups.get("flux-1"), setups.get("sockudo-3")
    for name in ("flux-3", "flux-3x1"):
        if name in setups:
            ratios(name, setups[name], single, sockudo)


def ratios(name, cluster, single, sockudo):
    if single:
        print(f"\n{name} / flux-1: deliveries/s {cluster['deliveries_per_sec'] / max(single['deliveries_per_sec'], 1):.2f}x, "
              f"p99 {cluster['latency_ms']['p99'] / max(single['latency_ms']['p99'], 0.001):.2f}x, "
              f"CPU per delivery {(cpu(cluster) / max(deliveries(cluster), 1)) / max(cpu(single) / max(deliveries(single), 1), 1e-12):.2f}x")
    if sockudo:
        print(f"\n{name} / sockudo-3: deliveries/s {cluster['deliveries_per_sec'] / max(sockudo['deliveries_per_sec'], 1):.1f}x")


def channel_table(setups):
    s = next(iter(setups.values()))
    node1 = s["_server"]["nodes"][0]["cpu_secs"]
    print("\n### redis-channel\n")
    print("Every subscriber and publish on node 2 of 2: node 1 reads every event from Redis for a channel it has no subscriber of.\n")
    print(f"| events published | node 1 CPU s | node 1 CPU µs per unwanted event | node 2 CPU s |")
    print("|---|---|---|---|")
    print(f"| {s['published']:,} | {node1} | {per(node1, s['published'], 1e6)} | {s['_server']['nodes'][1]['cpu_secs']} |")


def main():
    results = Path(sys.argv[1])
    for run, setups in load(results).items():
        if run == "redis-channel":
            channel_table(setups)
        else:
            table(run, setups)


if __name__ == "__main__":
    main()
