"""Flux against Python's `websockets` client, with the REST API signed by hand as Pusher documents
it, so the signature scheme is checked against an implementation that is not ours nor an SDK's.

Run: python3 tests/e2e/test_websockets.py (needs `websockets` 13 or later; run.sh makes a venv).
Starts its own gateway on a free loopback port (binary: $FLUX_BIN, else target/debug/flux), runs
each check, then does the same over TLS (wss:// and https://) with a gateway serving a certificate
that `openssl` makes for the run, prints "N passed, M failed", and exits non-zero if any failed.
"""

import asyncio
import hashlib
import hmac
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request

from websockets.asyncio.client import connect

HERE = os.path.dirname(os.path.abspath(__file__))
FLUX_BIN = os.environ.get("FLUX_BIN", os.path.join(HERE, "..", "..", "target", "debug", "flux"))
APP_ID, KEY, SECRET = "app-id", "app-key", "app-secret"
TIMEOUT = 5  # seconds, for every wait on the gateway


def free_port():
    """A port nothing listens on right now (the gateway must be told its port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Flux:
    """The gateway binary on a free port; `stop()` sends SIGTERM and checks it exits 0."""

    def __init__(self, tls=None):
        """With `tls`, a (certificate, key, ssl.SSLContext trusting its CA) triple: serve TLS."""
        self.port = free_port()
        self.context = tls[2] if tls else None
        # A file, not a pipe: nobody reads the log while the tests run, and a full pipe would
        # block the gateway's logging.
        self.log = tempfile.TemporaryFile()
        # The dashboard on any free port: 8080 may be taken.
        env = dict(os.environ, FLUX_HOST="127.0.0.1", FLUX_PORT=str(self.port), FLUX_DASHBOARD_PORT="0",
                   FLUX_WORKERS="2", FLUX_APP_ID=APP_ID, FLUX_APP_KEY=KEY, FLUX_APP_SECRET=SECRET, RUST_LOG="info")
        if tls:
            env.update(FLUX_TLS_CERT=tls[0], FLUX_TLS_KEY=tls[1])
        self.process = subprocess.Popen([FLUX_BIN], env=env, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 10
        while not self._answers():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                raise RuntimeError(f"flux did not start on port {self.port}:\n{self.read_log()}")
            time.sleep(0.05)

    def _answers(self):
        try:
            with urllib.request.urlopen(f"{scheme(self.context)}://127.0.0.1:{self.port}/", timeout=1, context=self.context) as response:
                return response.status == 200
        except OSError:
            return False  # Not listening yet.

    def read_log(self):
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self):
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"flux did not stop within 10 s of SIGTERM:\n{self.read_log()}")
        log = self.read_log()
        assert code == 0, f"flux exited {code} on SIGTERM:\n{log}"
        assert "panicked" not in log, log


def scheme(context):
    return "https" if context else "http"


def signed_post(port, path, body, secret=SECRET, context=None):
    """POSTs `body` signed as the Pusher SDKs do; returns (status, parsed JSON body).

    The string to sign is "POST\\n<path>\\n<query>", the query being the auth_* parameters and
    body_md5, sorted by key and joined as k=v with &; auth_signature is its hex HMAC-SHA256.
    """
    params = {
        "auth_key": KEY,
        "auth_timestamp": str(int(time.time())),
        "auth_version": "1.0",
        "body_md5": hashlib.md5(body).hexdigest(),
    }
    query = "&".join(f"{k}={params[k]}" for k in sorted(params))
    signature = hmac.new(secret.encode(), f"POST\n{path}\n{query}".encode(), hashlib.sha256).hexdigest()
    request = urllib.request.Request(
        f"{scheme(context)}://127.0.0.1:{port}{path}?{query}&auth_signature={signature}",
        data=body,
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def trigger(port, channel, name, data, secret=SECRET, context=None):
    """Publishes one event through the REST API, off the event loop."""
    body = json.dumps({"name": name, "channels": [channel], "data": json.dumps(data)}).encode()
    return await asyncio.to_thread(signed_post, port, f"/apps/{APP_ID}/events", body, secret, context)


async def receive(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout=TIMEOUT))


def client(port, context=None):
    scheme = "wss" if context else "ws"
    return connect(f"{scheme}://127.0.0.1:{port}/app/{KEY}?protocol=7&client=python", open_timeout=TIMEOUT, ssl=context)


async def connection_is_established(ws):
    established = await receive(ws)
    assert established["event"] == "pusher:connection_established", established
    data = json.loads(established["data"])  # A JSON string inside the JSON message.
    assert set(data) == {"socket_id", "activity_timeout"}, data
    high, low = data["socket_id"].split(".")
    assert high.isdigit() and low.isdigit(), data
    return data


async def test_subscribe_and_receive_a_hand_signed_publish(port):
    async with client(port) as ws:
        await connection_is_established(ws)
        await ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "py-room"}}))
        succeeded = await receive(ws)
        assert succeeded["event"] == "pusher_internal:subscription_succeeded", succeeded
        assert succeeded["channel"] == "py-room", succeeded

        data = {"from": "python", "n": [1, 2], "text": "ünïcödé"}
        published = await trigger(port, "py-room", "hello", data)
        assert published == (200, {}), published
        event = await receive(ws)
        assert (event["event"], event["channel"]) == ("hello", "py-room"), event
        assert json.loads(event["data"]) == data, event


async def test_a_wrong_secret_is_refused_with_401(port):
    status, body = await trigger(port, "py-room", "hello", {}, secret="wrong-secret")
    assert status == 401, (status, body)
    assert "auth_signature" in body["error"], body


async def test_ping_gets_pong(port):
    async with client(port) as ws:
        await connection_is_established(ws)
        await ws.send(json.dumps({"event": "pusher:ping", "data": {}}))
        pong = await receive(ws)
        assert pong["event"] == "pusher:pong", pong


async def test_wss_subscribe_and_receive_an_https_publish(port, context):
    async with client(port, context) as ws:
        await connection_is_established(ws)
        await ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "py-tls"}}))
        succeeded = await receive(ws)
        assert succeeded["event"] == "pusher_internal:subscription_succeeded", succeeded
        published = await trigger(port, "py-tls", "hello", {"over": "tls"}, context=context)
        assert published == (200, {}), published
        event = await receive(ws)
        assert (event["event"], json.loads(event["data"])) == ("hello", {"over": "tls"}), event


async def test_a_client_not_trusting_the_ca_is_refused(port, context):
    try:
        async with client(port, ssl.create_default_context()):
            raise AssertionError("a client without the test CA completed the handshake")
    except ssl.SSLCertVerificationError:
        pass  # What a certificate from an unknown authority must cause.


TESTS = [
    test_subscribe_and_receive_a_hand_signed_publish,
    test_a_wrong_secret_is_refused_with_401,
    test_ping_gets_pong,
]

TLS_TESTS = [
    test_wss_subscribe_and_receive_an_https_publish,
    test_a_client_not_trusting_the_ca_is_refused,
]


def make_certificate(directory):
    """A CA and a certificate for localhost signed by it; returns (cert, key, context trusting the CA)."""
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ca, ca_key, csr = (os.path.join(directory, name) for name in ("ca.pem", "ca.key", "server.csr"))
    cert, key, ext = (os.path.join(directory, name) for name in ("server.pem", "server.key", "server.ext"))
    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *curve, "-days", "2", "-subj", "/CN=flux-e2e-ca", "-keyout", ca_key, "-out", ca)
    openssl("req", *curve, "-subj", "/CN=localhost", "-keyout", key, "-out", csr)
    with open(ext, "w") as extensions:
        extensions.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl("x509", "-req", "-days", "2", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-extfile", ext, "-out", cert)
    return cert, key, ssl.create_default_context(cafile=ca)


def run(tests, flux, *extra):
    """Runs `tests` against `flux`; returns how many failed."""
    failed = 0
    try:
        for test in tests:
            try:
                asyncio.run(asyncio.wait_for(test(flux.port, *extra), timeout=15))
                print(f"ok - {test.__name__}")
            except Exception:  # Any failure of one test is reported and the others still run.
                failed += 1
                print(f"FAILED - {test.__name__}\n{traceback.format_exc()}")
    finally:
        flux.stop()
    return failed


def main():
    failed = run(TESTS, Flux())
    with tempfile.TemporaryDirectory() as directory:
        tls = make_certificate(directory)
        failed += run(TLS_TESTS, Flux(tls), tls[2])
    total = len(TESTS) + len(TLS_TESTS)
    print(f"websockets: {total - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
