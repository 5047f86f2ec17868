"""One `nook serve` for the SDK suites (tests/e2b, tests/e2b-agents; tests/e2b-js reads the same variables).

scripts/test.sh starts one server for all three suites (`python3 tests/nook_test_server.py`: it prints
`NOOK_TEST_URL=… NOOK_TEST_KEY=…` once the server answers, and stops it on SIGTERM or when its stdin closes), so the
1.5 GB base image is imported once per run rather than once per suite. A suite run on its own starts its own
server instead. Either way a suite gets nothing but the three variables a user would set (E2B_API_URL,
E2B_SANDBOX_URL, E2B_API_KEY) and kills the sandboxes it leaves behind when it ends.

Standard library only: each suite has its own venv.
"""

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Sandbox ports are `{port}-{id}.nook.test` (the SDKs' get_host); tests send that as the Host to the server's address.
PREVIEW_DOMAIN = "nook.test"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _required_env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: run the suite through scripts/test.sh")
    return value


class Server:
    """A running `nook serve` on a free loopback port with its own data directory."""

    def __init__(self, prefix: str):
        nook = os.environ.get("NOOK_BIN", str(ROOT / "target/debug/nook"))
        agent = _required_env("NOOK_AGENT_BINARY")
        base = _required_env("NOOK_BASE_IMAGE_TAR")
        # Shaped as E2B's keys are (the pinned e2b 2.31.0 of tests/e2b-agents checks the shape).
        self.key = "e2b_" + secrets.token_hex(20)
        self.url = f"http://127.0.0.1:{_free_port()}"
        self.data = tempfile.mkdtemp(prefix=prefix)
        self.log_path = os.path.join(self.data, "serve.log")
        env = dict(os.environ, NOOK_ADMIN_KEY=self.key, NOOK_AGENT_BINARY=agent, NOOK_BASE_IMAGE_TAR=base)
        with open(self.log_path, "w") as log:
            self.process = subprocess.Popen(
                [nook, "serve", "--listen", self.url.removeprefix("http://"), "--data-dir", self.data,
                 "--no-client-config", "--preview-domain", PREVIEW_DOMAIN],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(self.url + "/v1/health", timeout=1)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = self.log_tail()
                    self.stop(keep_data=False)
                    raise RuntimeError("nook serve did not start:\n" + tail) from None
                time.sleep(0.2)

    def log_tail(self, chars: int = 3000) -> str:
        with open(self.log_path, errors="replace") as log:
            return log.read()[-chars:]

    def stop(self, keep_data: bool):
        """Stops the server; its data directory (with serve.log) is kept when asked, for a failed run."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if keep_data:
            print(f"nook test server data kept in {self.data}", file=sys.stderr)
        else:
            shutil.rmtree(self.data, ignore_errors=True)


def kill_sandboxes(url: str, key: str):
    """Kills every sandbox the key can see, through E2B's REST API."""
    request = urllib.request.Request(f"{url}/sandboxes?state=running,paused&limit=1000", headers={"X-API-Key": key})
    with urllib.request.urlopen(request, timeout=30) as response:
        sandboxes = json.load(response)
    for sandbox in sandboxes:
        kill = urllib.request.Request(
            f"{url}/sandboxes/{sandbox['sandboxID']}", method="DELETE", headers={"X-API-Key": key}
        )
        with contextlib.suppress(urllib.error.HTTPError):
            urllib.request.urlopen(kill, timeout=60).close()


@contextlib.contextmanager
def sdk_environment(prefix: str, unset=(), failed=lambda: False):
    """Points the E2B SDKs at nook for a suite: the shared server when scripts/test.sh started one, else a server of
    the suite's own (its data kept if `failed()` says the suite failed). Yields the URL."""
    shared = os.environ.get("NOOK_TEST_URL"), os.environ.get("NOOK_TEST_KEY")
    server = None
    if all(shared):
        url, key = shared
    else:
        server = Server(prefix)
        url, key = server.url, server.key
    os.environ.update(E2B_API_URL=url, E2B_SANDBOX_URL=url, E2B_API_KEY=key)
    for name in ("E2B_DEBUG", *unset):
        os.environ.pop(name, None)
    try:
        yield url
    finally:
        try:
            kill_sandboxes(url, key)
        finally:
            if server is not None:
                server.stop(keep_data=failed())


def main():
    """Serves until SIGTERM or until stdin closes, after printing the variables the suites read."""
    server = Server("nook-sdk-tests-")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"NOOK_TEST_URL={server.url} NOOK_TEST_KEY={server.key} NOOK_TEST_LOG={server.log_path}", flush=True)
    try:
        sys.stdin.read()
    finally:
        server.stop(keep_data=False)


if __name__ == "__main__":
    main()
