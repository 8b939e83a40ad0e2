"""Flux against Python's `websockets` client, with the REST API signed by hand as Pusher
documents it. Run: python3 tests/e2e/test_websockets.py (exits non-zero on failure)."""

import asyncio
import hashlib
import hmac
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from websockets.asyncio.client import connect

HERE = os.path.dirname(os.path.abspath(__file__))
FLUX_BIN = os.environ.get("FLUX_BIN", os.path.join(HERE, "..", "..", "target", "debug", "flux"))
KEY, SECRET, APP_ID = "app-key", "app-secret", "app-id"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def signed_post(port, path, body):
    """POST `body` signed like the official SDKs: HMAC-SHA256 over METHOD, path, sorted query."""
    params = {
        "auth_key": KEY,
        "auth_timestamp": str(int(time.time())),
        "auth_version": "1.0",
        "body_md5": hashlib.md5(body).hexdigest(),
    }
    query = "&".join(f"{k}={params[k]}" for k in sorted(params))
    signature = hmac.new(SECRET.encode(), f"POST\n{path}\n{query}".encode(), hashlib.sha256).hexdigest()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}?{query}&auth_signature={signature}",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status, json.loads(response.read())


async def receive(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout=5))


async def scenario(port):
    async with connect(f"ws://127.0.0.1:{port}/app/{KEY}?protocol=7&client=python") as ws:
        established = await receive(ws)
        assert established["event"] == "pusher:connection_established", established
        socket_id = json.loads(established["data"])["socket_id"]
        assert socket_id.count(".") == 1, socket_id

        await ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "py-room"}}))
        succeeded = await receive(ws)
        assert succeeded["event"] == "pusher_internal:subscription_succeeded", succeeded

        body = json.dumps({"name": "hello", "channels": ["py-room"], "data": json.dumps({"from": "python"})}).encode()
        status, reply = await asyncio.to_thread(signed_post, port, f"/apps/{APP_ID}/events", body)
        assert (status, reply) == (200, {}), (status, reply)
        event = await receive(ws)
        assert event == {"event": "hello", "channel": "py-room", "data": '{"from": "python"}'}, event

        await ws.send(json.dumps({"event": "pusher:ping", "data": {}}))
        assert (await receive(ws))["event"] == "pusher:pong"


def main():
    port = free_port()
    env = dict(os.environ, FLUX_HOST="127.0.0.1", FLUX_PORT=str(port), FLUX_WORKERS="2")
    flux = subprocess.Popen([FLUX_BIN], env=env, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        asyncio.run(scenario(port))
    finally:
        flux.send_signal(signal.SIGTERM)
        code = flux.wait(timeout=10)
        log = flux.stderr.read().decode()
    assert code == 0, f"flux exited {code}:\n{log}"
    assert "panicked" not in log, log
    print("python websockets: ok")


if __name__ == "__main__":
    sys.exit(main())
