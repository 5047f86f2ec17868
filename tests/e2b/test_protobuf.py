"""envd's binary protobuf codec: the official SDK, unmodified except that its Connect clients are handed connectrpc's
binary codec (`application/proto`, `application/connect+proto`) instead of the JSON one it uses by default — the
codec connect-go and connect-es clients send. Messages are encoded and decoded by the SDK's own generated protobuf
classes, so every field number and wire type nook uses is checked by an independent implementation."""

import os
import urllib.error
import urllib.request

import e2b.envd.client_async
import e2b.envd.client_sync
import pytest
from conftest import eventually, eventually_async
from connectrpc.codec import proto_binary_codec
from e2b import AsyncSandbox, CommandExitException, FileType, Sandbox
from e2b.exceptions import FileNotFoundException, NotFoundException, TimeoutException
from e2b.sandbox.commands.command_handle import PtySize


class CountingBinaryCodec:
    """connectrpc's binary codec, counting the messages it carries (so the test knows it was used)."""

    def __init__(self):
        self.inner = proto_binary_codec()
        self.encoded = self.decoded = 0

    def name(self):
        return self.inner.name()

    def encode(self, message):
        self.encoded += 1
        return self.inner.encode(message)

    def decode(self, data, message_class):
        self.decoded += 1
        return self.inner.decode(data, message_class)


@pytest.fixture
def binary_codec(monkeypatch):
    codec = CountingBinaryCodec()
    assert codec.name() == "proto"
    monkeypatch.setattr(e2b.envd.client_sync, "ENVD_JSON_CODEC", codec)
    monkeypatch.setattr(e2b.envd.client_async, "ENVD_JSON_CODEC", codec)
    return codec


def test_commands_terminals_files_and_watches_over_binary_protobuf(sandbox, binary_codec):
    sbx = Sandbox.connect(sandbox.sandbox_id)

    # Start (server streaming): output, exit codes, env, cwd, user.
    result = sbx.commands.run("echo out; echo err >&2; printf '%s' \"$GREETING\"; pwd", envs={"GREETING": "hi "}, cwd="/tmp")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\nhi /tmp\n", "err\n", 0)
    with pytest.raises(CommandExitException) as failed:
        sbx.commands.run("exit 3")
    assert failed.value.exit_code == 3  # sint32 on the wire
    assert sbx.commands.run("id -un", user="root").stdout == "root\n"
    with pytest.raises(TimeoutException):
        sbx.commands.run("sleep 30", timeout=1)  # the end-of-stream error, JSON under either codec

    # Background commands: SendInput, StreamInput, CloseStdin, List, Connect, SendSignal.
    cat = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(cat.pid, "one\n")
    sbx.commands.stream_input(cat.pid, ["two\n", b"three\n"])
    sleeper = sbx.commands.run("sleep 300", background=True)
    listed = {process.pid: process for process in sbx.commands.list()}
    assert listed[sleeper.pid].cmd == "/bin/bash"
    assert listed[sleeper.pid].args == ["-l", "-c", "sleep 300"]
    sbx.commands.close_stdin(cat.pid)
    assert cat.wait().stdout == "one\ntwo\nthree\n"
    follower = sbx.commands.connect(sleeper.pid)
    assert sbx.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException) as killed:
        follower.wait()
    assert (killed.value.exit_code, killed.value.error) == (-1, "signal: killed")
    assert sbx.commands.kill(sleeper.pid) is False  # not_found, a unary error
    with pytest.raises(NotFoundException):
        sbx.commands.connect(999999)

    # A terminal: pty output, input and resize (Update).
    terminal = sbx.pty.create(PtySize(rows=24, cols=80))
    sbx.pty.resize(terminal.pid, PtySize(rows=33, cols=101))
    sbx.pty.send_stdin(terminal.pid, b"stty size; exit 4\n")
    output = bytearray()
    with pytest.raises(CommandExitException) as ended:
        terminal.wait(on_pty=output.extend)
    assert ended.value.exit_code == 4
    assert b"33 101" in output, bytes(output)

    # Filesystem: entries with enums, 64-bit sizes, timestamps, maps and symlinks.
    sbx.files.write("/home/user/pb/data.bin", b"x" * 5000, metadata={"owner": "tests", "kind": "blob"})
    sbx.commands.run("ln -s /home/user/pb/data.bin /home/user/pb/link")
    info = sbx.files.get_info("pb/data.bin")
    assert (info.name, info.type, info.path, info.size) == ("data.bin", FileType.FILE, "/home/user/pb/data.bin", 5000)
    assert (info.mode, info.permissions, info.owner, info.group) == (0o644, "-rw-r--r--", "user", "user")
    assert info.metadata == {"owner": "tests", "kind": "blob"}
    assert info.modified_time.year >= 2024
    link = sbx.files.get_info("/home/user/pb/link")
    assert link.symlink_target == "/home/user/pb/data.bin"
    made = sbx.files.make_dir("/home/user/pb/sub/deeper")
    assert made is True
    entries = {entry.name: entry for entry in sbx.files.list("/home/user/pb", depth=2)}
    assert set(entries) == {"data.bin", "link", "sub", "deeper"}
    assert entries["sub"].type == FileType.DIR
    moved = sbx.files.rename("/home/user/pb/data.bin", "/home/user/pb/sub/moved.bin")
    assert (moved.path, moved.size) == ("/home/user/pb/sub/moved.bin", 5000)
    sbx.files.remove("/home/user/pb/sub/moved.bin")
    assert not sbx.files.exists("/home/user/pb/sub/moved.bin")
    with pytest.raises(FileNotFoundException):
        sbx.files.get_info("/home/user/pb/missing")

    # The polling watcher: CreateWatcher, GetWatcherEvents with entries, RemoveWatcher.
    watch = sbx.files.watch_dir("/home/user/pb", include_entry=True)
    sbx.commands.run("cd /home/user/pb && echo hi > new.txt && chmod 600 new.txt && rm new.txt")
    events = []

    def complete():
        events.extend(watch.get_new_events())
        return {("new.txt", "create"), ("new.txt", "chmod"), ("new.txt", "remove")} <= {
            (event.name, event.type.value) for event in events
        }

    eventually(complete, "the watch events")
    watch.stop()
    assert all(event.entry is None for event in events if event.type.value == "remove")

    assert binary_codec.encoded >= 20 and binary_codec.decoded >= 20, vars(binary_codec)


@pytest.mark.anyio
async def test_async_streams_over_binary_protobuf(async_sandbox, binary_codec):
    sbx = await AsyncSandbox.connect(async_sandbox.sandbox_id)
    lines = []
    result = await sbx.commands.run("for i in 1 2 3; do echo $i; done", on_stdout=lines.append)
    assert (result.stdout, "".join(lines)) == ("1\n2\n3\n", "1\n2\n3\n")

    # WatchDir (server streaming): start, then filesystem events.
    await sbx.files.make_dir("/home/user/streamed")
    seen = set()
    handle = await sbx.files.watch_dir("/home/user/streamed", on_event=lambda event: seen.add((event.name, event.type.value)))
    await sbx.files.write("/home/user/streamed/a.txt", "a")

    async def arrived():
        return ("a.txt", "rename") in seen or ("a.txt", "create") in seen

    await eventually_async(arrived, "a streamed watch event")
    await handle.stop()
    assert binary_codec.encoded >= 3 and binary_codec.decoded >= 3, vars(binary_codec)


def test_other_content_types_are_refused_with_415(sandbox):
    request = urllib.request.Request(
        os.environ["E2B_SANDBOX_URL"] + "/filesystem.Filesystem/Stat",
        data=b"<path>/</path>",
        method="POST",
        headers={
            "Content-Type": "application/xml",
            "E2b-Sandbox-Id": sandbox.sandbox_id,
            "E2b-Sandbox-Port": "49983",
            "X-Access-Token": sandbox._envd_access_token,
        },
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 415
    assert "application/proto" in refused.value.headers["Accept-Post"]
