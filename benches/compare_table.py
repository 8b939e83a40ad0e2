#!/usr/bin/env python3
"""Prints benches/compare.sh's results as Markdown tables: one per scenario, a column per server
(Flux, Sockudo, the raw limits) and Flux's ratios to the others.

Usage: benches/compare_table.py RESULTS_DIR
"""

import json
import sys
from pathlib import Path

SERVERS = ["flux", "flux-tls", "sockudo", "sockudo-tls", "raw", "raw-batched", "raw-tls", "raw-batched-tls"]
NAMES = {"flux": "Flux", "flux-tls": "Flux over TLS", "sockudo": "Sockudo", "sockudo-tls": "Sockudo over TLS", "raw": "raw, a write per frame", "raw-batched": "raw, batched writes",
         "raw-tls": "raw over TLS, a write per frame", "raw-batched-tls": "raw over TLS, batched writes"}


def load(results):
    runs = {}
    for path in sorted(results.glob("*.json")):
        if path.name.endswith(".server.json"):
            continue
        scenario, server = path.stem.rsplit(".", 1)
        summary = json.loads(path.read_text())
        server_file = path.with_name(f"{scenario}.{server}.server.json")
        summary["_server"] = json.loads(server_file.read_text()) if server_file.exists() else {}
        runs.setdefault(scenario, {})[server] = summary
    return runs


def healthy(s):
    return s.get("roles", {}).get("healthy", {})


def phase(s, name):
    return next((p for p in s.get("phases", []) if p["name"] == name), None)


def rows_for(scenario, runs):
    """(label, getter, lower_is_better) for the scenario's table."""
    rows = [
        ("healthy deliveries / expected", lambda s: f"{healthy(s).get('unique', s['delivered']):,} / {s['expected']:,}", None),
        ("healthy gaps", lambda s: s["gaps"], True),
        ("latency p50 ms", lambda s: s["latency_ms"]["p50"], True),
        ("latency p95 ms", lambda s: s["latency_ms"]["p95"], True),
        ("latency p99 ms", lambda s: s["latency_ms"]["p99"], True),
        ("latency max ms", lambda s: s["latency_ms"]["max"], True),
    ]
    if not scenario.startswith("big-channel"):
        # A rounds publisher's rate is set by its interval, so deliveries/s says nothing there.
        rows[2:2] = [
            ("deliveries/s (run average)", lambda s: s["deliveries_per_sec"], False),
            ("deliveries/s (best second)", lambda s: s["peak_deliveries_per_sec"], False),
        ]
    if any(s.get("roles", {}).get("slow") for s in runs.values()):
        rows.append(("slow consumers evicted (4100)", lambda s: f"{s['roles'].get('slow', {}).get('evicted', 0)} / {s['roles'].get('slow', {}).get('clients', 0)}", None))
    if any("presence" in s for s in runs.values()):
        rows += [
            ("member_added/removed received", lambda s: s["presence"]["member_events"], None),
            ("member events/s", lambda s: s["presence"]["member_events_per_sec"], False),
            ("member_added latency from the join p50 ms", lambda s: s["presence"]["member_added_latency_ms"]["p50"], True),
            ("member_added latency from the join p99 ms", lambda s: s["presence"]["member_added_latency_ms"]["p99"], True),
        ]
    if any(s.get("vacate") for s in runs.values()):
        v = lambda s: s.get("vacate") or {}
        rows += [
            ("subscriptions vacated at once", lambda s: f"{v(s).get('subscriptions_vacated', 0):,}", None),
            ("connect probes failed / made", lambda s: f"{v(s)['probes']['refused'] + v(s)['probes']['timed_out']} / {v(s)['probes']['probes']}", None),
            ("connect during the storm p99 ms", lambda s: v(s)["probes"]["connect_ms"]["p99"], True),
            ("connect during the storm max ms", lambda s: v(s)["probes"]["connect_ms"]["max"], True),
            ("server CPU s from the storm", lambda s: (v(s).get("server_cpu") or {}).get("seconds"), True),
            ("server CPU s per 100k subscriptions vacated", lambda s: (v(s).get("server_cpu") or {}).get("per_100k_subscriptions"), True),
            ("server busy after the storm s", lambda s: (v(s).get("server_cpu") or {}).get("busy_seconds"), True),
        ]
    if scenario.startswith("big-channel"):
        for name in ("one channel", "spread channels"):
            rows.append((f"{name}: publish to last delivery p50 ms", lambda s, n=name: phase(s, n)["completion_ms"]["p50"], True))
            rows.append((f"{name}: ns per delivery", lambda s, n=name: phase(s, n)["ns_per_delivery"], True))
        rows.append(("one channel / spread channels", lambda s: round(phase(s, "one channel")["ns_per_delivery"] / phase(s, "spread channels")["ns_per_delivery"], 2), True))
    if scenario.startswith("idle"):
        rows = [
            ("connections held", lambda s: s["connections"], None),
            ("server RSS at start MiB", lambda s: round(s["_server"]["rss_start_kib"] / 1024, 1), True),
            ("server RSS peak MiB", lambda s: round(s["_server"]["rss_peak_kib"] / 1024, 1), True),
            ("bytes per idle connection", lambda s: round((s["_server"]["rss_peak_kib"] - s["_server"]["rss_start_kib"]) * 1024 / s["connections"]), True),
        ]
    else:
        rows.append(("server CPU seconds", lambda s: s["_server"].get("cpu_secs"), True))
        rows.append(("server CPU µs per delivery, member events included (connects too)", lambda s: round(s["_server"]["cpu_secs"] * 1e6 / max(s["delivered"] + s.get("presence", {}).get("member_events", 0), 1), 3), True))
        rows.append(("server peak RSS MiB", lambda s: round(s["_server"]["rss_peak_kib"] / 1024, 1), True))
    return rows


def cell(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def ratio(flux, other, lower_is_better):
    if lower_is_better is None or not isinstance(flux, (int, float)) or not isinstance(other, (int, float)):
        return "-"
    if other == 0 or flux == 0:
        return "-"
    return f"{flux / other:.2f}x"


def main():
    results = Path(sys.argv[1])
    runs = load(results)
    for scenario, by_server in runs.items():
        servers = [s for s in SERVERS if s in by_server]
        first = by_server[servers[0]]
        print(f"### {scenario}: {first['connections']:,} clients, {first['published']:,} events published\n")
        others = [s for s in servers if s != "flux"] if "flux" in servers else []
        header = ["", *(NAMES[s] for s in servers), *(f"Flux / {NAMES[o]}" for o in others)]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for label, get, lower in rows_for(scenario, by_server):
            values = {}
            for s in servers:
                try:
                    values[s] = get(by_server[s])
                except (KeyError, TypeError, ZeroDivisionError):
                    values[s] = None
            cells = [label, *(cell(values[s]) for s in servers)]
            cells += [ratio(values["flux"], values[o], lower) for o in others]
            print("| " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
