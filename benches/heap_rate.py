#!/usr/bin/env python3
"""Heap allocations of a running Flux under a flux-load scenario (issue 16).

Starts a release `flux` on free loopback ports, runs `flux-load` with the given arguments
against it, and reads the gateway's /metrics twice in the steady state: AFTER seconds after the
first event was published (the connects are over, and the first events have warmed the rings,
the pool and the buffers up), and WINDOW seconds later. For that window it prints heap
allocations and bytes per second and per published event (flux_broadcasts_total: one per event
and channel, presence changes included), deliveries per second, and the server's CPU time over
the whole run.

    benches/heap_rate.py [--idle S] [--after S] [--window S] FLUX-LOAD-ARGS...
    benches/heap_rate.py chat-storm --connections 1000 --slow 0 --partition 0 --duration 20

A scrape of /metrics allocates too (about 290 KB, most of it copies of the latency
histograms), so the window holds one scrape's worth; until publishing starts the gateway is
polled twice a second, outside the window. `--idle S` first measures S seconds of the idle
gateway with the same two scrapes. FLUX_BIN (default target/release/flux) chooses the gateway:
one without the counting allocator gives no heap figures, and the rest is still there, for
measuring the allocator's own cost.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from flux_proc import cpu_seconds, metrics, start_flux

SCRAPED = ["flux_heap_allocations_total", "flux_heap_allocated_bytes_total", "flux_broadcasts_total", "flux_deliveries_total"]


def scrape(dashboard):
    return time.monotonic(), metrics(dashboard, SCRAPED)


def rates(first, last):
    (t0, a), (t1, b) = first, last
    seconds = t1 - t0
    delta = {k: b.get(k, 0.0) - a.get(k, 0.0) for k in b}
    events = delta.get("flux_broadcasts_total", 0.0)
    allocations = delta.get("flux_heap_allocations_total")
    allocated = delta.get("flux_heap_allocated_bytes_total")
    out = {"seconds": round(seconds, 2), "events_per_s": round(events / seconds, 1)}
    out["deliveries_per_s"] = round(delta.get("flux_deliveries_total", 0.0) / seconds)
    if allocations is not None:
        out["allocations_per_s"] = round(allocations / seconds)
        out["allocated_bytes_per_s"] = round(allocated / seconds)
        if events:
            out["allocations_per_event"] = round(allocations / events, 2)
            out["allocated_bytes_per_event"] = round(allocated / events)
    return out


def main():
    args = sys.argv[1:]
    options = {"--idle": 0.0, "--after": 3.0, "--window": 12.0}
    while args[:1] and args[0] in options:
        options[args[0]], args = float(args[1]), args[2:]
    load = os.environ.get("FLUX_LOAD_BIN", "target/release/flux-load")
    server, port, dashboard = start_flux({"FLUX_PRESENCE_MAX_MEMBERS": "20000"})
    try:
        result = {}
        if options["--idle"]:
            first = scrape(dashboard)
            time.sleep(options["--idle"])
            result["idle"] = rates(first, scrape(dashboard))
        cpu_start = cpu_seconds(server.pid)
        with tempfile.NamedTemporaryFile(suffix=".json") as summary:
            command = [load, *args, "--port", str(port), "--quiet", "--json", summary.name]
            loader = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while loader.poll() is None and scrape(dashboard)[1].get("flux_broadcasts_total", 0) == 0:
                time.sleep(0.5)
            time.sleep(options["--after"])
            first = scrape(dashboard)
            time.sleep(options["--window"])
            last = scrape(dashboard)
            if loader.poll() is None:
                result["steady"] = rates(first, last)
            else:
                print("flux-load ended before the window did: no steady state", file=sys.stderr)
            loader.wait()
            cpu = cpu_seconds(server.pid) - cpu_start
            report = json.load(open(summary.name)) if os.path.getsize(summary.name) else {}
        if loader.returncode != 0:
            print(f"flux-load exited with {loader.returncode}", file=sys.stderr)
        deliveries = report.get("delivered", 0)
        result["run"] = {
            "server_cpu_s": round(cpu, 2),
            "deliveries": deliveries,
            "cpu_us_per_delivery": round(cpu * 1e6 / deliveries, 3) if deliveries else None,
            "deliveries_per_s": report.get("deliveries_per_sec"),
            "gaps": report.get("gaps"),
            "p99_ms": (report.get("latency_ms") or {}).get("p99"),
        }
        print(json.dumps(result))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
