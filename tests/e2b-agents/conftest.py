"""Starts one `nook serve` for the OpenAI Agents SDK provider tests and points the SDK's pinned e2b client at it.

This suite runs in its own venv (.venv-agents): `openai-agents[e2b]` pins e2b 2.31.0, older than the e2b of
tests/e2b. The server runs on a free loopback port with its own data directory, and the provider gets nothing but
the three environment variables a user would set (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY). The key is shaped
`e2b_<40 hex>`, as e2b 2.31.0 checks on the client. Every sandbox still alive at the end is killed through the API
before the server stops. No model is called.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.exit(f"{name} is not set: run the suite through scripts/test.sh", returncode=2)
    return value


@pytest.fixture(scope="session", autouse=True)
def nook_server():
    nook = os.environ.get("NOOK_BIN", str(ROOT / "target/debug/nook"))
    agent = _required_env("NOOK_AGENT_BINARY")
    base = _required_env("NOOK_BASE_IMAGE_TAR")
    port = _free_port()
    key = "e2b_" + secrets.token_hex(20)
    data = tempfile.mkdtemp(prefix="nook-e2b-agents-test-")
    log = open(os.path.join(data, "serve.log"), "w")
    env = dict(os.environ, NOOK_ADMIN_KEY=key, NOOK_AGENT_BINARY=agent, NOOK_BASE_IMAGE_TAR=base)
    server = subprocess.Popen(
        [nook, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data, "--no-client-config"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/v1/health", timeout=1)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                log.flush()
                pytest.exit("nook serve did not start:\n" + open(log.name).read()[-3000:], returncode=2)
            time.sleep(0.2)
    os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=key)
    for name in ("E2B_DEBUG", "E2B_ACCESS_TOKEN", "E2B_VALIDATE_API_KEY", "OPENAI_API_KEY"):
        os.environ.pop(name, None)
    yield url
    from e2b import Sandbox

    for info in Sandbox.list().next_items():
        Sandbox.kill(info.sandbox_id)
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()
    shutil.rmtree(data, ignore_errors=True)
