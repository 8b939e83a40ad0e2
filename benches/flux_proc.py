"""What the benchmark scripts do with a `flux` of their own: start it on free ports and wait
until it answers, and read its CPU and resident memory from /proc and counters from its
dashboard's /metrics."""

import os
import re
import socket
import subprocess
import time
import urllib.request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def metrics(dashboard, names):
    """The values of the unlabelled counters `names` in the node's /metrics."""
    sample = re.compile(r"^(" + "|".join(map(re.escape, names)) + r") (\S+)$")
    with urllib.request.urlopen(f"http://127.0.0.1:{dashboard}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2)) for m in map(sample.match, text.splitlines()) if m}


def start_flux(env=None, nice=None):
    """Starts `FLUX_BIN` (default target/release/flux) on free ports with `env` added, under
    `nice -n NICE` if given; returns the process, its port and its dashboard port once /metrics
    answers (after 10 s it is returned as it is)."""
    port, dashboard = free_port(), free_port()
    env = dict(os.environ, FLUX_PORT=str(port), FLUX_DASHBOARD_PORT=str(dashboard), RUST_LOG="warn", **(env or {}))
    command = (["nice", "-n", nice] if nice else []) + [os.environ.get("FLUX_BIN", "target/release/flux")]
    server = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            metrics(dashboard, [])
            break
        except OSError:
            time.sleep(0.1)
    return server, port, dashboard
