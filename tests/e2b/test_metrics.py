"""Sandbox metrics and logs through E2B's API on nook: the official SDK's `get_metrics` (sync and async) sees the
samples nook takes every 5 s move with a CPU burn and held memory; the logs endpoints, which no SDK method calls,
are read over REST with the `X-API-Key` header as E2B's own clients do."""

import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest
from conftest import eventually, eventually_async
from e2b import AsyncSandbox, CommandExitException, Sandbox
from e2b.exceptions import SandboxNotFoundException

MIB = 1024 * 1024
UNKNOWN = "sb-" + "a" * 20


def api(path, **query):
    """GET on nook's E2B REST API; returns (status, parsed JSON body)."""
    url = os.environ["E2B_API_URL"] + path
    if query:
        url += "?" + urllib.parse.urlencode(query)
    request = urllib.request.Request(url, headers={"X-API-Key": os.environ["E2B_API_KEY"]})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_metrics_move_with_cpu_and_memory(sandbox):
    info = sandbox.get_info()
    first = eventually(sandbox.get_metrics, "a first sample")
    sample = first[-1]
    assert sample.cpu_count == info.cpu_count >= 1
    assert sample.mem_total == info.memory_mb * MIB
    assert 0 < sample.mem_used < 128 * MIB
    assert sample.mem_cache >= 0
    assert 0 <= sample.disk_used < sample.disk_total
    assert 0 <= sample.cpu_used_pct <= 100
    assert abs((datetime.now(timezone.utc) - sample.timestamp).total_seconds()) < 30

    # A busy loop longer than the sampling interval: some sample sees the allowance (nearly) used up.
    busy_from = datetime.now(timezone.utc)
    sandbox.commands.run("timeout 7 sh -c 'while :; do :; done'; true", timeout=30)
    busy_to = datetime.now(timezone.utc)
    saturated = 80 / sample.cpu_count

    def busy_samples():
        return [m for m in sandbox.get_metrics() if busy_from < m.timestamp and m.cpu_used_pct >= saturated]

    busy = eventually(busy_samples, "a sample of the busy loop", timeout=15)
    assert busy[0].cpu_used_pct <= 100

    # Memory held by a background command shows in memUsed.
    baseline = sandbox.get_metrics()[-1].mem_used
    holder = sandbox.commands.run(
        "python3 -c \"import time; b = b'x' * (160 << 20); time.sleep(120)\"", background=True
    )

    def holding():
        return [m for m in sandbox.get_metrics() if m.mem_used >= baseline + 140 * MIB]

    eventually(holding, "a sample with the held memory", timeout=20)
    holder.kill()

    # Once idle again, the CPU figure falls back: the series changes.
    def idle_samples():
        return [m for m in sandbox.get_metrics() if m.timestamp > busy_to + timedelta(seconds=1) and m.cpu_used_pct < 20]

    eventually(idle_samples, "an idle sample after the busy loop", timeout=15)
    # The window below ends at busy_to + 5 s; a later sample must exist for it to leave something out.
    eventually(
        lambda: [m for m in sandbox.get_metrics() if m.timestamp > busy_to + timedelta(seconds=7)],
        "a sample after the window",
        timeout=15,
    )
    series = sandbox.get_metrics()
    assert [m.timestamp for m in series] == sorted(m.timestamp for m in series)
    assert max(m.cpu_used_pct for m in series) - min(m.cpu_used_pct for m in series) >= saturated / 2

    # start and end (sent in Unix seconds) select a window.
    assert sandbox.get_metrics(start=datetime.now(timezone.utc) + timedelta(hours=1)) == []
    window = sandbox.get_metrics(start=busy_from, end=busy_to + timedelta(seconds=5))
    assert window and all(busy_from - timedelta(seconds=1) <= m.timestamp <= busy_to + timedelta(seconds=6) for m in window)
    assert len(window) < len(series)

    # The class method reads the same series by id.
    assert len(Sandbox.get_metrics(sandbox.sandbox_id)) >= len(series)


def test_metrics_of_an_unknown_sandbox_raise_not_found():
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_metrics(UNKNOWN)
    status, body = api(f"/sandboxes/{UNKNOWN}/metrics")
    assert (status, body["code"]) == (404, 404)
    status, body = api(f"/sandboxes/{UNKNOWN}/metrics", start="later")
    assert status == 400


@pytest.mark.anyio
async def test_async_metrics(async_sandbox):
    samples = await async_sandbox.get_metrics()
    assert samples and samples[-1].mem_total > 0 and samples[-1].cpu_count >= 1
    busy_from = datetime.now(timezone.utc)
    await async_sandbox.commands.run("timeout 6 sh -c 'while :; do :; done'; true", timeout=30)

    async def busy_sample():
        return [
            m
            for m in await AsyncSandbox.get_metrics(async_sandbox.sandbox_id)
            if m.timestamp > busy_from and m.cpu_used_pct >= 80 / m.cpu_count
        ]

    await eventually_async(busy_sample, "a sample of the busy loop through the class method", timeout=15)


def test_logs_tell_the_sandbox_story(sandbox):
    status, body = api(f"/sandboxes/{sandbox.sandbox_id}/logs")
    assert status == 200
    assert len(body["logs"]) == len(body["logEntries"]) >= 2
    assert [entry["line"] for entry in body["logs"]] == [entry["message"] for entry in body["logEntries"]]
    created, running = body["logEntries"][:2]
    assert created["message"].startswith("creating (requested)")
    assert running["fields"] == {
        "sandboxID": sandbox.sandbox_id,
        "fromState": "creating",
        "toState": "running",
        "reason": "requested",
    }
    assert created["level"] == running["level"] == "info"
    started = datetime.fromisoformat(created["timestamp"].replace("Z", "+00:00"))
    assert abs((datetime.now(timezone.utc) - started).total_seconds()) < 120

    # start (Unix ms) and limit.
    last_ms = int(datetime.fromisoformat(body["logs"][-1]["timestamp"].replace("Z", "+00:00")).timestamp() * 1000)
    assert api(f"/sandboxes/{sandbox.sandbox_id}/logs", start=last_ms + 1)[1] == {"logs": [], "logEntries": []}
    assert len(api(f"/sandboxes/{sandbox.sandbox_id}/logs", limit=1)[1]["logs"]) == 1

    # An OOM kill is a warning, found by level and by search in v2.
    memory_mb = sandbox.get_info().memory_mb
    with pytest.raises(CommandExitException):
        sandbox.commands.run(f"python3 -c \"b = b'x' * ({memory_mb + 64} << 20)\"", timeout=60)

    def warnings():
        return api(f"/v2/sandboxes/{sandbox.sandbox_id}/logs", level="warn")[1]["logs"]

    oom = eventually(warnings, "the OOM kill in the logs")
    assert oom[0]["level"] == "warn" and oom[0]["fields"]["reason"] == "oom"
    assert api(f"/v2/sandboxes/{sandbox.sandbox_id}/logs", search="exceeded the sandbox")[1]["logs"] == oom

    forward = api(f"/v2/sandboxes/{sandbox.sandbox_id}/logs")[1]["logs"]
    backward = api(f"/v2/sandboxes/{sandbox.sandbox_id}/logs", direction="backward")[1]["logs"]
    assert len(forward) >= 3 and backward == forward[::-1]
    assert api(f"/v2/sandboxes/{sandbox.sandbox_id}/logs", direction="backward", limit=1)[1]["logs"] == backward[:1]
    first_ms = int(datetime.fromisoformat(forward[0]["timestamp"].replace("Z", "+00:00")).timestamp() * 1000)
    assert api(f"/v2/sandboxes/{sandbox.sandbox_id}/logs", direction="backward", cursor=first_ms)[1]["logs"] == forward[:1]
    assert api(f"/v2/sandboxes/{sandbox.sandbox_id}/logs", level="error")[1]["logs"] == []

    status, body = api(f"/v2/sandboxes/{sandbox.sandbox_id}/logs", direction="sideways")
    assert (status, body["code"]) == (400, 400)
    status, body = api(f"/v2/sandboxes/{UNKNOWN}/logs")
    assert (status, body["code"]) == (404, 404)
    assert api(f"/sandboxes/{UNKNOWN}/logs")[0] == 404
