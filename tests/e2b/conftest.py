"""Points the official, unmodified E2B SDKs at a `nook serve` (tests/nook_test_server.py: the one scripts/test.sh
started for all SDK suites, or one of this suite's own) and gives the tests their sandboxes. Every sandbox still
alive at the end is killed through the API.
"""

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nook_test_server import sdk_environment  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def nook_server(request):
    with sdk_environment("nook-e2b-test-", failed=lambda: request.session.testsfailed > 0) as url:
        yield url


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
