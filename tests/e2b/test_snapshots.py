"""Snapshots and forks with the E2B SDK on nook's own snapshot and fork: a snapshot keeps the files of its moment and
`Sandbox.create(<snapshot id>)` starts from them; snapshots are listed (by sandbox, by name, in pages) and deleted
(True, then False); a named snapshot's name moves to the newest; a fork's sandboxes start with the source's files,
get the timeout asked for, and diverge from each other and from the source, which keeps running.

nook snapshots and forks carry a sandbox's files, not its processes or memory (its container sandboxes have no
memory checkpoints), whatever `mode` the SDK asks for.
"""

import json
import os
import urllib.error
import urllib.request
import uuid
from datetime import timedelta

import pytest
from e2b import (
    AsyncSandbox,
    InvalidArgumentException,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
)

STATE = "/home/user/state.txt"
MISSING_SANDBOX = "sb-" + "0" * 20


def unique(name):
    return f"{name}-{uuid.uuid4().hex[:8]}"


def all_snapshots(paginator):
    found = []
    while paginator.has_next:
        found.extend(paginator.next_items())
    return found


def post(path, body):
    """A raw E2B API call, for what the SDK checks before sending."""
    request = urllib.request.Request(
        os.environ["E2B_API_URL"] + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"X-API-Key": os.environ["E2B_API_KEY"], "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as refused:
        return refused.code, json.load(refused)


def test_a_snapshot_keeps_the_files_of_its_moment_until_deleted(sandbox):
    sandbox.files.write(STATE, "first")
    snapshot = sandbox.create_snapshot()
    assert snapshot.snapshot_id
    assert snapshot.names == [snapshot.snapshot_id]
    sandbox.files.write(STATE, "second")
    assert sandbox.is_running(), "the source keeps running"

    restored = Sandbox.create(snapshot.snapshot_id, timeout=120)
    try:
        assert restored.files.read(STATE) == "first"
        assert restored.get_info().template_id == snapshot.snapshot_id
    finally:
        restored.kill()
    assert sandbox.files.read(STATE) == "second"

    listed = [item.snapshot_id for item in all_snapshots(sandbox.list_snapshots())]
    assert listed == [snapshot.snapshot_id]
    everywhere = [item.snapshot_id for item in all_snapshots(Sandbox.list_snapshots())]
    assert snapshot.snapshot_id in everywhere

    assert Sandbox.delete_snapshot(snapshot.snapshot_id) is True
    assert Sandbox.delete_snapshot(snapshot.snapshot_id) is False
    assert all_snapshots(sandbox.list_snapshots()) == []
    with pytest.raises(Exception):
        Sandbox.create(snapshot.snapshot_id, timeout=60)


def test_snapshots_are_listed_by_sandbox_and_in_pages(sandbox):
    other = Sandbox.create(timeout=120)
    try:
        made = [sandbox.create_snapshot(mode="filesystem").snapshot_id for _ in range(3)]
        assert len(set(made)) == 3
        assert all_snapshots(other.list_snapshots()) == []
        assert all_snapshots(Sandbox.list_snapshots(sandbox_id=other.sandbox_id)) == []

        paginator = Sandbox.list_snapshots(sandbox_id=sandbox.sandbox_id, limit=2)
        first = paginator.next_items()
        assert len(first) == 2 and paginator.has_next
        second = paginator.next_items()
        assert len(second) == 1 and not paginator.has_next
        # Newest first.
        assert [item.snapshot_id for item in first + second] == made[::-1]
        for snapshot_id in made:
            assert Sandbox.delete_snapshot(snapshot_id) is True
    finally:
        other.kill()


def test_a_named_snapshot_moves_to_the_newest(sandbox):
    name = unique("sdk-snap")
    sandbox.files.write(STATE, "one")
    first = sandbox.create_snapshot(name, mode="full")
    assert first.snapshot_id == name and first.names == [name]
    sandbox.files.write(STATE, "two")
    second = Sandbox.create_snapshot(sandbox.sandbox_id, name)
    assert second.snapshot_id == name

    assert [item.snapshot_id for item in all_snapshots(Sandbox.list_snapshots(name=name))] == [name]
    assert all_snapshots(Sandbox.list_snapshots(name=unique("sdk-snap"))) == []
    restored = Sandbox.create(name, timeout=120)
    try:
        assert restored.files.read(STATE) == "two"
    finally:
        restored.kill()
    assert Sandbox.delete_snapshot(name) is True
    assert Sandbox.delete_snapshot(name) is False


def test_snapshot_names_of_other_templates_and_unknown_sandboxes_are_refused(sandbox):
    with pytest.raises(SandboxException) as refused:
        sandbox.create_snapshot("base")
    assert "not a snapshot" in str(refused.value)
    with pytest.raises(SandboxException):
        sandbox.create_snapshot("Not A Name")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.create_snapshot(MISSING_SANDBOX)
    # A template that is no snapshot is not deleted as one.
    with pytest.raises(SandboxException) as refused:
        Sandbox.delete_snapshot("base")
    assert refused.value.status_code == 501
    assert Sandbox.delete_snapshot(unique("no-such-snapshot")) is False


def test_forks_start_with_the_files_and_diverge(sandbox):
    sandbox.files.write(STATE, "before the fork")
    forks = sandbox.fork(count=2, timeout=120)
    assert len(forks) == 2
    assert all(isinstance(fork, Sandbox) for fork in forks), forks
    try:
        a, b = forks
        assert len({a.sandbox_id, b.sandbox_id, sandbox.sandbox_id}) == 3
        for fork in forks:
            assert fork.files.read(STATE) == "before the fork"
            info = fork.get_info()
            assert timedelta(seconds=110) < info.end_at - info.started_at < timedelta(seconds=130), info
        a.files.write(STATE, "a's own")
        sandbox.files.write(STATE, "the source's own")
        assert b.files.read(STATE) == "before the fork"
        assert a.files.read(STATE) == "a's own"
        assert sandbox.files.read(STATE) == "the source's own"
        assert sandbox.is_running(), "the source keeps running"
        assert b.commands.run("echo forked").stdout == "forked\n"
        running = [item.sandbox_id for item in Sandbox.list().next_items()]
        assert a.sandbox_id in running and b.sandbox_id in running
    finally:
        for fork in forks:
            if isinstance(fork, Sandbox):
                fork.kill()


def test_fork_counts_and_sources_are_checked(sandbox):
    with pytest.raises(InvalidArgumentException):
        sandbox.fork(count=21)
    status, body = post(f"/sandboxes/{sandbox.sandbox_id}/fork", {"count": 0})
    assert status == 400 and body["code"] == 400 and "between 1 and 20" in body["message"], body
    status, body = post(f"/sandboxes/{sandbox.sandbox_id}/fork", {"count": 21})
    assert status == 400, body
    with pytest.raises(SandboxNotFoundException):
        Sandbox.fork(MISSING_SANDBOX)
    # No count: one fork.
    forks = Sandbox.fork(sandbox.sandbox_id, timeout=60)
    try:
        assert len(forks) == 1 and isinstance(forks[0], Sandbox), forks
    finally:
        for fork in forks:
            if isinstance(fork, Sandbox):
                fork.kill()


@pytest.mark.anyio
async def test_async_snapshots_and_forks(async_sandbox):
    await async_sandbox.files.write(STATE, "async")
    snapshot = await async_sandbox.create_snapshot()
    paginator = async_sandbox.list_snapshots()
    listed = await paginator.next_items()
    assert [item.snapshot_id for item in listed] == [snapshot.snapshot_id]
    restored = await AsyncSandbox.create(snapshot.snapshot_id, timeout=120)
    try:
        assert await restored.files.read(STATE) == "async"
    finally:
        await restored.kill()
    assert await AsyncSandbox.delete_snapshot(snapshot.snapshot_id) is True
    assert await AsyncSandbox.delete_snapshot(snapshot.snapshot_id) is False

    forks = await async_sandbox.fork(count=1, timeout=120)
    assert len(forks) == 1 and isinstance(forks[0], AsyncSandbox), forks
    try:
        await forks[0].files.write(STATE, "the fork's")
        assert await async_sandbox.files.read(STATE) == "async"
    finally:
        await forks[0].kill()
