#!/usr/bin/env python3
"""Kernel TCP memory of a running Flux under a flux-load scenario (issue 15, slow consumers).

Starts a release `flux` on free loopback ports (the environment passes through, so
FLUX_SEND_BUFFER_BYTES=... chooses the setting under test), runs `flux-load` with the given
arguments against it, and samples every INTERVAL seconds until flux-load ends:

- the whole host's TCP memory, `/proc/net/sockstat`'s "TCP: ... mem" (pages, both ends of
  every loopback connection: the server's send queues and the clients' receive queues);
- the server's resident memory;
- its `flux_evictions_total` and `flux_broadcasts_total` (from /metrics).

It prints one JSON line: the TCP memory before the run, its peak rise over that, the rise just
before the first eviction, the time from the first publish to the first and the last eviction,
the server's peak RSS and CPU time, and flux-load's own figures (evictions seen by the clients,
healthy deliveries and their p99 latency, the slow readers' largest lag, deliveries per second). With --samples FILE it also writes every sample as
CSV (seconds since the first publish, TCP MiB, RSS MiB, evictions).

    benches/kernel_memory.py [--interval S] [--samples FILE] FLUX-LOAD-ARGS...
    FLUX_SEND_BUFFER_BYTES=0 benches/kernel_memory.py slow-consumer --connections 10 --slow 1000 \
        --payload 9000 --rate 100 --duration 3 --stall-secs 30 --processes 2

FLUX_NICE=-10 runs the server under `nice -n -10` (root only), so the load tool's two cores
are less of a factor. This samples the whole host: other work on the machine shows up too, so
the baseline is read just before flux-load starts.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from flux_proc import cpu_seconds, metrics, rss_bytes, start_flux

SCRAPED = ["flux_evictions_total", "flux_broadcasts_total"]
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20


def scrape(dashboard):
    return metrics(dashboard, SCRAPED)


def tcp_mem_bytes():
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                fields = line.split()
                return int(fields[fields.index("mem") + 1]) * PAGE
    return 0


def mib(n):
    return round(n / MIB, 1)


def main():
    args = sys.argv[1:]
    options = {"--interval": "0.1", "--samples": ""}
    while args[:1] and args[0] in options:
        options[args[0]], args = args[1], args[2:]
    interval = float(options["--interval"])
    load = os.environ.get("FLUX_LOAD_BIN", "target/release/flux-load")
    server, port, dashboard = start_flux(nice=os.environ.get("FLUX_NICE"))
    try:
        baseline = min(tcp_mem_bytes() for _ in range(5) if time.sleep(0.1) is None)
        samples = []  # (monotonic, tcp bytes, rss bytes, evictions, broadcasts)
        cpu_start = cpu_seconds(server.pid)
        with tempfile.NamedTemporaryFile(suffix=".json") as summary:
            loader = subprocess.Popen(
                [load, *args, "--port", str(port), "--quiet", "--json", summary.name],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            while loader.poll() is None:
                try:
                    metrics = scrape(dashboard)
                except OSError:
                    metrics = {}
                samples.append(
                    (
                        time.monotonic(),
                        tcp_mem_bytes(),
                        rss_bytes(server.pid),
                        metrics.get("flux_evictions_total", 0.0),
                        metrics.get("flux_broadcasts_total", 0.0),
                    )
                )
                time.sleep(interval)
            report = json.load(open(summary.name)) if os.path.getsize(summary.name) else {}
        cpu = cpu_seconds(server.pid) - cpu_start
        if loader.returncode != 0:
            print(f"flux-load exited with {loader.returncode}", file=sys.stderr)

        published = next((s[0] for s in samples if s[4] > 0), samples[0][0] if samples else 0.0)
        evictions = [s for s in samples if s[3] > 0]
        final = samples[-1][3] if samples else 0
        last = next((s for s in samples if s[3] >= final), None) if final else None
        before = [s[1] for s in samples if not evictions or s[0] < evictions[0][0]]
        peak = max((s[1] for s in samples), default=baseline)
        slow = (report.get("roles") or {}).get("slow") or {}
        healthy = (report.get("roles") or {}).get("healthy") or {}
        result = {
            "send_buffer_bytes": os.environ.get("FLUX_SEND_BUFFER_BYTES", "default"),
            "tcp_mem_baseline_mib": mib(baseline),
            "tcp_mem_peak_rise_mib": mib(peak - baseline),
            "tcp_mem_rise_before_first_eviction_mib": mib(max(before, default=baseline) - baseline),
            "first_eviction_s": round(evictions[0][0] - published, 2) if evictions else None,
            "last_eviction_s": round(last[0] - published, 2) if last else None,
            "server_evictions": int(final),
            "server_peak_rss_mib": mib(max((s[2] for s in samples), default=0)),
            "slow_evicted": slow.get("evicted"),
            "slow_delivered": slow.get("delivered"),
            "slow_lag_max_ms": (slow.get("latency_ms") or {}).get("max"),
            "healthy_delivered": healthy.get("delivered"),
            "healthy_gaps": report.get("gaps"),
            "deliveries_per_s": report.get("deliveries_per_sec"),
            "p99_ms": (report.get("latency_ms") or {}).get("p99"),
            "server_cpu_s": round(cpu, 2),
            "cpu_us_per_delivery": round(cpu * 1e6 / report["delivered"], 3) if report.get("delivered") else None,
        }
        print(json.dumps(result))
        if options["--samples"]:
            with open(options["--samples"], "w") as out:
                out.write("seconds,tcp_mib,rss_mib,evictions\n")
                for t, tcp, rss, evicted, _ in samples:
                    out.write(f"{t - published:.2f},{mib(tcp - baseline)},{mib(rss)},{int(evicted)}\n")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
