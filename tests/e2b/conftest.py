"""Starts one `nook serve` for the E2B SDK tests and points the official, unmodified SDKs at it.

The server runs on a free loopback port with its own data directory; the SDKs get nothing but the three
environment variables a user would set (E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY). Every sandbox still alive at
the end is killed through the API before the server stops.
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
    data = tempfile.mkdtemp(prefix="nook-e2b-test-")
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
    os.environ.pop("E2B_DEBUG", None)
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


@pytest.fixture
def sandbox():
    from e2b import Sandbox

    sbx = Sandbox.create(timeout=300)
    yield sbx
    sbx.kill()


@pytest.fixture
async def async_sandbox():
    """An `AsyncSandbox` for tests marked `anyio` (the anyio pytest plugin runs them on asyncio)."""
    from e2b import AsyncSandbox

    sbx = await AsyncSandbox.create(timeout=300)
    yield sbx
    await sbx.kill()


@pytest.fixture
def anyio_backend():
    return "asyncio"


def eventually(check, what, timeout=20.0):
    """Polls `check` until it returns something truthy and returns that; fails naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


async def eventually_async(check, what, timeout=20.0):
    """`eventually` for coroutines: awaits `check()` until it returns something truthy."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)
