"""The official `e2b` Python SDK's `AsyncSandbox`, unmodified, against nook: the same ground as `test_sync.py`
(lifecycle, commands, background commands, terminals, files, watches and errors) through the asynchronous client,
which uses other wire calls in places (a streaming watch instead of polling, an input handle for stdin)."""

import asyncio
import hashlib
import io
import time
import urllib.error
import urllib.request

import pytest
from conftest import eventually_async
from e2b import AsyncSandbox, CommandExitException, FileType, SandboxQuery, SandboxState
from e2b.exceptions import (
    AuthenticationException,
    FileNotFoundException,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    TimeoutException,
)
from e2b.sandbox.commands.command_handle import PtySize

pytestmark = pytest.mark.anyio

WRONG_KEY = "e2b_" + "0" * 40


async def listed_ids(**query):
    return [item.sandbox_id for item in await AsyncSandbox.list(query=SandboxQuery(**query)).next_items()]


async def test_lifecycle_create_info_list_timeout_connect_kill(async_sandbox):
    sbx = await AsyncSandbox.create(timeout=120, metadata={"suite": "async", "team": "a b&c"}, envs={"GREETING": "hey"})
    info = await sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert (info.template_id, info.state, info.envd_version) == ("base", SandboxState.RUNNING, "0.6.4")
    assert info.metadata == {"suite": "async", "team": "a b&c"}
    assert 115 <= (info.end_at - info.started_at).total_seconds() <= 125
    assert await sbx.is_running()
    assert (await sbx.commands.run("echo $GREETING")).stdout == "hey\n"

    assert await listed_ids(metadata={"team": "a b&c"}) == [sbx.sandbox_id]
    assert await listed_ids(metadata={"team": "nobody"}) == []
    running = await listed_ids(state=[SandboxState.RUNNING])
    assert {sbx.sandbox_id, async_sandbox.sandbox_id} <= set(running)
    assert await listed_ids(state=[SandboxState.PAUSED]) == []
    pages = AsyncSandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING]), limit=1)
    seen = []
    while pages.has_next:
        page = await pages.next_items()
        assert len(page) == 1
        seen.append(page[0].sandbox_id)
    assert seen == running

    before = (await sbx.get_info()).end_at
    await sbx.set_timeout(600)
    after = (await sbx.get_info()).end_at
    assert 470 <= (after - before).total_seconds() <= 490
    await AsyncSandbox.set_timeout(sbx.sandbox_id, 60)
    assert (await AsyncSandbox.get_info(sbx.sandbox_id)).end_at < after

    again = await AsyncSandbox.connect(sbx.sandbox_id)
    assert again.sandbox_id == sbx.sandbox_id
    assert (await again.commands.run("echo $GREETING")).stdout == "hey\n"

    assert await sbx.kill() is True
    assert not await sbx.is_running()
    assert await AsyncSandbox.kill(sbx.sandbox_id) is False
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.get_info(sbx.sandbox_id)
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.set_timeout(sbx.sandbox_id, 30)
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.connect(sbx.sandbox_id)
    with pytest.raises(SandboxNotRunningException):
        await sbx.commands.run("echo too late")
    with pytest.raises(SandboxNotRunningException):
        await sbx.files.write("/tmp/late.txt", "late")
    assert sbx.sandbox_id not in await listed_ids()


async def test_the_timeout_kills_the_sandbox():
    sbx = await AsyncSandbox.create(timeout=2)
    assert await sbx.is_running()

    async def gone():
        return sbx.sandbox_id not in await listed_ids()

    await eventually_async(gone, "the sandbox to end at its timeout")
    assert not await sbx.is_running()


async def test_unknown_sandboxes_templates_and_api_keys_are_refused(async_sandbox):
    async with await AsyncSandbox.create(timeout=60) as scoped:
        assert (await scoped.commands.run("echo scoped")).stdout == "scoped\n"
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.connect(scoped.sandbox_id)
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.connect("sb-doesnotexist")
    with pytest.raises(SandboxNotFoundException):
        await AsyncSandbox.get_info("sb-doesnotexist")
    assert await AsyncSandbox.kill("sb-doesnotexist") is False
    with pytest.raises(SandboxException, match="404.*nosuch"):
        await AsyncSandbox.create(template="nosuch")
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.create(api_key=WRONG_KEY)
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.list(api_key=WRONG_KEY).next_items()
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.connect(async_sandbox.sandbox_id, api_key=WRONG_KEY)
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.kill(async_sandbox.sandbox_id, api_key=WRONG_KEY)
    assert await async_sandbox.is_running()


async def test_commands_run_output_exit_codes_env_cwd_user_and_timeout(async_sandbox):
    sbx = async_sandbox
    result = await sbx.commands.run("echo out; echo err >&2; whoami; pwd")
    assert (result.stdout, result.stderr, result.exit_code, result.error) == (
        "out\nuser\n/home/user\n",
        "err\n",
        0,
        None,
    )
    with pytest.raises(CommandExitException) as failed:
        await sbx.commands.run("echo partial; echo bad >&2; exit 42")
    assert (failed.value.exit_code, failed.value.stdout, failed.value.stderr) == (42, "partial\n", "bad\n")
    assert failed.value.error == "exit status 42"

    env = await sbx.commands.run('echo "$A $E2B_SANDBOX $E2B_SANDBOX_ID"', envs={"A": "x=y"})
    assert env.stdout == f"x=y true {sbx.sandbox_id}\n"
    await sbx.files.make_dir("work/dir")
    assert (await sbx.commands.run("pwd", cwd="/usr")).stdout == "/usr\n"
    assert (await sbx.commands.run("pwd", cwd="work/dir")).stdout == "/home/user/work/dir\n"
    with pytest.raises(InvalidArgumentException):
        await sbx.commands.run("pwd", cwd="/does/not/exist")
    assert (await sbx.commands.run("whoami; echo $HOME", user="root")).stdout == "root\n/root\n"
    assert (await sbx.commands.run("id -un; echo $HOME")).stdout == "user\n/home/user\n"
    with pytest.raises(AuthenticationException):
        await sbx.commands.run("whoami", user="nosuchuser")

    stdout, stderr = [], []
    await sbx.commands.run(
        "for i in 1 2 3; do echo line$i; echo warn$i >&2; done", on_stdout=stdout.append, on_stderr=stderr.append
    )
    assert ("".join(stdout), "".join(stderr)) == ("line1\nline2\nline3\n", "warn1\nwarn2\nwarn3\n")

    started = time.monotonic()
    with pytest.raises(TimeoutException):
        await sbx.commands.run("exec sleep 32", timeout=1)
    assert time.monotonic() - started < 10

    async def killed():
        return "sleep 32" not in (await sbx.commands.run("ps -eo args")).stdout

    await eventually_async(killed, "the timed-out command to be killed")

    # More than nook's replay buffer, faster than the client reads: nothing is lost.
    big = await sbx.commands.run("head -c 3000000 /dev/zero | tr '\\0' b")
    assert len(big.stdout) == 3_000_000 and set(big.stdout) == {"b"}


async def test_background_commands_stdin_stream_input_connect_list_and_kill(async_sandbox):
    sbx = async_sandbox
    handle = await sbx.commands.run("cat", background=True, stdin=True)
    await sbx.commands.send_stdin(handle.pid, "one\n")
    await handle.send_stdin(b"two\n")
    async with sbx.commands.stream_input(handle.pid) as stream:
        await stream.send("three\n")
        await stream.send(b"four\n")
    await handle.close_stdin()
    result = await handle.wait()
    assert (result.stdout, result.exit_code) == ("one\ntwo\nthree\nfour\n", 0)
    assert (handle.stdout, handle.exit_code) == ("one\ntwo\nthree\nfour\n", 0)

    closed = await sbx.commands.run("cat; echo eof", background=True)
    assert (await closed.wait()).stdout == "eof\n"

    first = []
    ticker = await sbx.commands.run(
        "echo first; read line; echo got $line; sleep 300", background=True, stdin=True, on_stdout=first.append
    )
    listed = {process.pid: process for process in await sbx.commands.list()}
    assert (listed[ticker.pid].cmd, listed[ticker.pid].args[:2]) == ("/bin/bash", ["-l", "-c"])

    async def started():
        return first == ["first\n"]

    await eventually_async(started, "the command's first line")
    seen = []
    reattached = await sbx.commands.connect(ticker.pid, on_stdout=seen.append)
    await ticker.disconnect()
    await sbx.commands.send_stdin(ticker.pid, "hello\n")

    async def answered():
        return "".join(seen) == "got hello\n"

    await eventually_async(answered, "the reattached client to see new output")
    assert await sbx.commands.kill(ticker.pid) is True
    with pytest.raises(CommandExitException) as killed:
        await reattached.wait()
    assert (killed.value.exit_code, killed.value.error) == (-1, "signal: killed")
    assert await sbx.commands.kill(ticker.pid) is False

    sleeper = await sbx.commands.run("sleep 300", background=True)
    assert await sleeper.kill() is True
    with pytest.raises(CommandExitException):
        await sleeper.wait()
    limited = await sbx.commands.run("sleep 300", background=True, timeout=1)

    async def limited_gone():
        return limited.pid not in [process.pid for process in await sbx.commands.list()]

    await eventually_async(limited_gone, "the background command's timeout to kill it")
    with pytest.raises(TimeoutException):
        await limited.wait()

    with pytest.raises(NotFoundException):
        await sbx.commands.connect(999999)
    with pytest.raises(NotFoundException):
        await sbx.commands.send_stdin(999999, "x")
    with pytest.raises(NotFoundException):
        async with sbx.commands.stream_input(999999) as stream:
            await stream.send("x")
    assert await sbx.commands.kill(999999) is False


async def prompted(output):
    """Waits for a terminal's shell to prompt: input typed earlier may be flushed while the shell starts."""

    async def prompt():
        return output.endswith((b"$ ", b"# "))

    await eventually_async(prompt, f"the shell's prompt in {bytes(output)!r}")


async def test_pty_create_input_resize_connect_and_kill(async_sandbox):
    sbx = async_sandbox
    output = bytearray()
    terminal = await sbx.pty.create(
        PtySize(rows=24, cols=80), on_data=output.extend, user="root", cwd="/tmp", envs={"FOO": "bar"}
    )
    await prompted(output)
    await sbx.pty.send_stdin(terminal.pid, b"tty; echo $FOO-$(pwd)-$(whoami)-$((6*7))\n")
    await sbx.pty.resize(terminal.pid, PtySize(rows=30, cols=100))
    async with sbx.pty.stream_input(terminal.pid) as stream:
        await stream.send(b"stty size; echo $TERM")
        await stream.send(b"; exit 5\n")
    with pytest.raises(CommandExitException) as ended:
        await terminal.wait()
    assert ended.value.exit_code == 5
    text = output.decode()
    assert "/dev/pts/" in text and "bar-/tmp-root-42" in text and "30 100\r\nxterm-256color" in text, text

    before = bytearray()
    other = await sbx.pty.create(PtySize(rows=24, cols=80), on_data=before.extend)
    await prompted(before)
    seen = bytearray()
    attached = await sbx.pty.connect(other.pid, on_data=seen.extend)
    await other.disconnect()
    await sbx.pty.send_stdin(other.pid, b"echo attached$((1+1)); whoami\nexit\n")
    assert (await attached.wait()).exit_code == 0
    assert b"\rattached2\r\n" in seen and b"\nuser\r\n" in seen, bytes(seen)
    assert await sbx.pty.kill(other.pid) is False

    third = await sbx.pty.create(PtySize(rows=24, cols=80), on_data=lambda data: None)
    assert await sbx.pty.kill(third.pid) is True
    with pytest.raises(CommandExitException) as killed:
        await third.wait()
    assert killed.value.exit_code == -1


async def test_files_read_and_write_text_bytes_streams_and_many(async_sandbox):
    sbx = async_sandbox
    info = await sbx.files.write("notes/today.txt", "hello async files")
    assert (info.path, info.name, info.type) == ("/home/user/notes/today.txt", "today.txt", FileType.FILE)
    assert await sbx.files.read("~/notes/today.txt") == "hello async files"
    await sbx.files.write("notes/today.txt", "short")
    assert await sbx.files.read("notes/today.txt") == "short"

    payload = bytes(range(256)) * 4096
    await sbx.files.write("/tmp/blob.bin", payload)
    assert bytes(await sbx.files.read("/tmp/blob.bin", format="bytes")) == payload
    stream = await sbx.files.read("/tmp/blob.bin", format="stream")
    received = bytearray()
    async for chunk in stream:
        received.extend(chunk)
    assert bytes(received) == payload
    await sbx.files.write("/tmp/from-io.bin", io.BytesIO(payload[:70_000]))
    assert bytes(await sbx.files.read("/tmp/from-io.bin", format="bytes")) == payload[:70_000]
    await sbx.files.write("/tmp/from-io.txt", io.StringIO("text stream ✓"))
    assert await sbx.files.read("/tmp/from-io.txt") == "text stream ✓"
    # gzip both ways: the upload is inflated as it streams, the download compressed because the SDK asks for it.
    await sbx.files.write("/tmp/zipped.txt", "zipped " * 100, gzip=True)
    assert (await sbx.commands.run("wc -c < /tmp/zipped.txt")).stdout.strip() == "700"
    assert await sbx.files.read("/tmp/zipped.txt", gzip=True) == "zipped " * 100

    # Async iterables of chunks go up as raw octet-stream bodies, gzip-compressed or not, with metadata if given.
    async def chunks():
        for _ in range(8):
            yield payload
            await asyncio.sleep(0)

    await sbx.files.write("/tmp/chunks.bin", chunks())
    await sbx.files.write("/tmp/chunks.gz.bin", chunks(), gzip=True, metadata={"Source": "async chunks"})
    sums = (await sbx.commands.run("sha256sum < /tmp/chunks.bin; sha256sum < /tmp/chunks.gz.bin")).stdout.split()
    assert sums[0] == sums[2] == hashlib.sha256(payload * 8).hexdigest()
    info = await sbx.files.get_info("/tmp/chunks.gz.bin")
    assert (info.size, info.metadata) == (8 * len(payload), {"source": "async chunks"})
    assert (await sbx.files.get_info("/tmp/chunks.bin")).metadata is None
    written = await sbx.files.write("/tmp/meta.txt", "m", metadata={"k": "v"})
    assert written.metadata == {"k": "v"}
    assert [entry.metadata for entry in await sbx.files.list("/tmp") if entry.name == "meta.txt"] == [{"k": "v"}]
    with pytest.raises(InvalidArgumentException):
        await sbx.files.write("/tmp/bad-meta", "x", metadata={"k" * 247: "v"})

    # A signed URL serves a plain HTTP client, until it expires.
    url = sbx.download_url("/tmp/meta.txt", use_signature_expiration=30)
    assert await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=30).read()) == b"m"
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(urllib.request.urlopen, sbx.download_url("/tmp/meta.txt", use_signature_expiration=-1))
    assert refused.value.code == 401

    written = await sbx.files.write_files(
        [
            {"path": "/home/user/many/a.txt", "data": "a"},
            {"path": "many/b.bin", "data": b"\x00b"},
            {"path": "/home/user/many/deep/c.txt", "data": io.BytesIO(b"c")},
        ]
    )
    assert [item.path for item in written] == [
        "/home/user/many/a.txt",
        "/home/user/many/b.bin",
        "/home/user/many/deep/c.txt",
    ]
    contents = await asyncio.gather(
        sbx.files.read("many/a.txt"), sbx.files.read("many/b.bin", format="bytes"), sbx.files.read("many/deep/c.txt")
    )
    assert contents == ["a", bytearray(b"\x00b"), "c"]

    await sbx.files.write("/tmp/as-root/r.txt", "r", user="root")
    owners = await sbx.commands.run("stat -c %U /home/user/notes/today.txt /home/user/many/deep /tmp/as-root/r.txt")
    assert owners.stdout == "user\nuser\nroot\n"
    with pytest.raises(AuthenticationException):
        await sbx.files.write("/tmp/x.txt", "x", user="nosuchuser")


async def test_files_list_make_dir_rename_remove_exists_and_info(async_sandbox):
    sbx = async_sandbox
    await sbx.files.write("/home/user/tree/a/b/c.txt", "c")
    await sbx.files.write("/home/user/tree/top.txt", "top")
    assert [(entry.name, entry.type) for entry in await sbx.files.list("tree")] == [
        ("a", FileType.DIR),
        ("top.txt", FileType.FILE),
    ]
    assert [entry.path for entry in await sbx.files.list("/home/user/tree", depth=3)] == [
        "/home/user/tree/a",
        "/home/user/tree/a/b",
        "/home/user/tree/a/b/c.txt",
        "/home/user/tree/top.txt",
    ]

    entry = await sbx.files.get_info("tree/top.txt")
    assert (entry.type, entry.size, entry.mode, entry.permissions, entry.owner, entry.group) == (
        FileType.FILE,
        3,
        0o644,
        "-rw-r--r--",
        "user",
        "user",
    )
    assert abs(entry.modified_time.timestamp() - time.time()) < 120

    assert await sbx.files.make_dir("new/nested") is True
    assert await sbx.files.make_dir("new/nested") is False
    with pytest.raises(InvalidArgumentException):
        await sbx.files.make_dir("tree/top.txt")
    moved = await sbx.files.rename("tree/top.txt", "moved/top.txt")
    assert moved.path == "/home/user/moved/top.txt"
    assert await sbx.files.read("moved/top.txt") == "top"
    assert not await sbx.files.exists("tree/top.txt")
    assert await sbx.files.exists("new/nested")

    await sbx.files.remove("tree")
    assert not await sbx.files.exists("tree")
    await sbx.files.remove("tree")

    with pytest.raises(FileNotFoundException):
        await sbx.files.read("tree/a/b/c.txt")
    with pytest.raises(NotFoundException):
        await sbx.files.list("/no/such/dir")
    with pytest.raises(NotFoundException):
        await sbx.files.get_info("/no/such/file")
    with pytest.raises(NotFoundException):
        await sbx.files.rename("/no/such/file", "/tmp/x")
    with pytest.raises(InvalidArgumentException):
        await sbx.files.read("/home/user")
    with pytest.raises(InvalidArgumentException):
        await sbx.files.list("/etc/hostname")


async def test_watch_dir_streams_changes_recursively_or_not(async_sandbox):
    sbx = async_sandbox
    await sbx.files.make_dir("/home/user/watched/sub")
    flat_seen, deep_seen, exits = set(), set(), []
    flat = await sbx.files.watch_dir(
        "/home/user/watched", on_event=lambda event: flat_seen.add((event.name, event.type.value)), on_exit=exits.append
    )
    deep = await sbx.files.watch_dir(
        "/home/user/watched", on_event=lambda event: deep_seen.add((event.name, event.type.value)), recursive=True
    )
    await sbx.commands.run(
        "cd /home/user/watched && echo 1 > f && chmod 600 f && mv f g && rm g"
        " && echo x > sub/inner.txt && mkdir sub/deeper && echo y > sub/deeper/z.txt"
    )
    expected_flat = {("f", "create"), ("f", "write"), ("f", "chmod"), ("f", "rename"), ("g", "rename"), ("g", "remove")}
    expected_deep = expected_flat | {
        ("sub/inner.txt", "create"),
        ("sub/inner.txt", "write"),
        ("sub/deeper", "create"),
        ("sub/deeper/z.txt", "create"),
    }

    async def complete():
        return expected_flat <= flat_seen and expected_deep <= deep_seen

    await eventually_async(complete, "the watch events")
    assert not any(name.startswith("sub/") for name, _ in flat_seen), flat_seen
    await flat.stop()
    await deep.stop()
    assert exits == [None]

    # A watch ends at its timeout, and says why.
    ended = []
    await sbx.files.watch_dir("/home/user/watched", on_event=lambda event: None, on_exit=ended.append, timeout=1)

    async def timed_out():
        return ended

    await eventually_async(timed_out, "the watch's timeout")
    assert [type(error) for error in ended] == [TimeoutException]

    with pytest.raises(NotFoundException):
        await sbx.files.watch_dir("/home/user/not-there", on_event=lambda event: None)
    await sbx.files.write("/home/user/plain.txt", "x")
    with pytest.raises(InvalidArgumentException):
        await sbx.files.watch_dir("/home/user/plain.txt", on_event=lambda event: None)

    # Entry info in streamed events: for creations, writes and changes of what still exists, with its metadata.
    events = []
    entries = await sbx.files.watch_dir(
        "/home/user/watched", on_event=events.append, include_entry=True, allow_network_mounts=True
    )
    await sbx.files.write("/home/user/watched/with-entry.txt", "12345", metadata={"k": "v"})
    await sbx.commands.run("cd /home/user/watched && chmod 640 with-entry.txt && mkdir kept")

    def seen(*wanted):
        async def check():
            return set(wanted) <= {(event.name, event.type.value) for event in events}

        return check

    # The file is removed only once its chmod event arrived: the entry is looked up while the file still exists.
    await eventually_async(seen(("with-entry.txt", "chmod"), ("kept", "create")), "the events with entries")
    await sbx.commands.run("rm /home/user/watched/with-entry.txt")
    await eventually_async(seen(("with-entry.txt", "remove")), "the removal")
    await entries.stop()
    by_kind = {(event.name, event.type.value): event for event in events}
    changed = by_kind[("with-entry.txt", "chmod")].entry
    assert changed is not None
    assert (changed.mode, changed.size, changed.metadata) == (0o640, 5, {"k": "v"})
    kept = by_kind[("kept", "create")].entry
    assert (kept.type, kept.path, kept.owner) == (FileType.DIR, "/home/user/watched/kept", "user")
    assert by_kind[("with-entry.txt", "remove")].entry is None
