"""The official `e2b` Python SDK's synchronous `Sandbox`, unmodified, against nook: lifecycle, commands, background
commands, terminals, files and watches, and the errors an app relies on. `test_async.py` covers the same with
`AsyncSandbox`."""

import io
import time

import pytest
from conftest import eventually
from e2b import CommandExitException, FileType, Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import (
    AuthenticationException,
    FileNotFoundException,
    InvalidArgumentException,
    NotFoundException,
    SandboxException,
    SandboxNotFoundException,
    SandboxNotRunningException,
    TemplateException,
    TimeoutException,
)
from e2b.sandbox.commands.command_handle import PtySize

WRONG_KEY = "e2b_" + "0" * 40


def test_lifecycle_create_info_list_timeout_connect_kill(sandbox):
    sbx = Sandbox.create(timeout=120, metadata={"suite": "sync", "owner": "alice smith"}, envs={"GREETING": "hi"})
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.template_id == "base"
    assert info.metadata == {"suite": "sync", "owner": "alice smith"}
    assert info.state == SandboxState.RUNNING
    assert info.envd_version == "0.5.2"
    assert 115 <= (info.end_at - info.started_at).total_seconds() <= 125
    assert sbx.is_running()
    # Sandbox-wide env vars reach commands.
    assert sbx.commands.run("echo $GREETING").stdout == "hi\n"

    listed = Sandbox.list(query=SandboxQuery(metadata={"owner": "alice smith"})).next_items()
    assert [item.sandbox_id for item in listed] == [sbx.sandbox_id]
    assert listed[0].metadata == {"suite": "sync", "owner": "alice smith"}
    assert Sandbox.list(query=SandboxQuery(metadata={"owner": "nobody"})).next_items() == []
    running = Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING])).next_items()
    assert {sbx.sandbox_id, sandbox.sandbox_id} <= {item.sandbox_id for item in running}
    assert Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items() == []
    # Pages: one sandbox each, in creation order, then no more.
    pages = Sandbox.list(query=SandboxQuery(state=[SandboxState.RUNNING]), limit=1)
    seen = []
    while pages.has_next:
        page = pages.next_items()
        assert len(page) == 1
        seen.append(page[0].sandbox_id)
    assert seen == [item.sandbox_id for item in running]

    before = sbx.get_info().end_at
    sbx.set_timeout(600)
    after = sbx.get_info().end_at
    assert 470 <= (after - before).total_seconds() <= 490
    Sandbox.set_timeout(sbx.sandbox_id, 60)
    assert Sandbox.get_info(sbx.sandbox_id).end_at < after

    again = Sandbox.connect(sbx.sandbox_id)
    assert again.sandbox_id == sbx.sandbox_id
    assert again.commands.run("echo $GREETING; hostname").stdout.startswith("hi\n")

    assert sbx.kill() is True
    assert not sbx.is_running()
    assert Sandbox.kill(sbx.sandbox_id) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(sbx.sandbox_id, 30)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sbx.sandbox_id)
    # The handle of a killed sandbox says so on every call.
    with pytest.raises(SandboxNotRunningException):
        sbx.commands.run("echo too late")
    with pytest.raises(SandboxNotRunningException):
        sbx.files.read("/etc/hostname")
    assert sbx.sandbox_id not in [item.sandbox_id for item in Sandbox.list().next_items()]


def test_the_timeout_kills_the_sandbox():
    sbx = Sandbox.create(timeout=2)
    assert sbx.is_running()
    eventually(
        lambda: sbx.sandbox_id not in [item.sandbox_id for item in Sandbox.list().next_items()],
        "the sandbox to end at its timeout",
    )
    assert not sbx.is_running()


def test_unknown_sandboxes_templates_and_api_keys_are_refused(sandbox):
    with Sandbox.create(timeout=60) as scoped:
        assert scoped.commands.run("echo scoped").stdout == "scoped\n"
    # Leaving the block killed it.
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(scoped.sandbox_id)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect("sb-doesnotexist")
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info("sb-doesnotexist")
    assert Sandbox.kill("sb-doesnotexist") is False
    with pytest.raises(SandboxException, match="404.*nosuch"):
        Sandbox.create(template="nosuch")
    with pytest.raises(SandboxException, match="400.*timeout"):
        Sandbox.create(timeout=10**6)
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key=WRONG_KEY)
    with pytest.raises(AuthenticationException):
        Sandbox.list(api_key=WRONG_KEY).next_items()
    with pytest.raises(AuthenticationException):
        Sandbox.connect(sandbox.sandbox_id, api_key=WRONG_KEY)
    with pytest.raises(AuthenticationException):
        Sandbox.kill(sandbox.sandbox_id, api_key=WRONG_KEY)
    # Nothing was done with the wrong key.
    assert sandbox.is_running()


def test_commands_run_output_exit_codes_env_cwd_user_and_timeout(sandbox):
    result = sandbox.commands.run("echo out; echo err >&2; whoami; pwd; echo $HOME")
    assert (result.stdout, result.stderr, result.exit_code, result.error) == (
        "out\nuser\n/home/user\n/home/user\n",
        "err\n",
        0,
        None,
    )

    with pytest.raises(CommandExitException) as failed:
        sandbox.commands.run("echo partial; echo bad >&2; exit 3")
    assert failed.value.exit_code == 3
    assert failed.value.stdout == "partial\n"
    assert failed.value.stderr == "bad\n"
    assert failed.value.error == "exit status 3"

    # Per-command env vars, on top of E2B's defaults.
    env = sandbox.commands.run('echo "$A-$B $E2B_SANDBOX $E2B_SANDBOX_ID $E2B_TEMPLATE_ID"', envs={"A": "1", "B": "t w o"})
    assert env.stdout == f"1-t w o true {sandbox.sandbox_id} base\n"
    # Working directory: absolute, relative to the user's home, or missing.
    sandbox.files.make_dir("/home/user/project/src")
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sandbox.commands.run("pwd", cwd="project/src").stdout == "/home/user/project/src\n"
    assert sandbox.commands.run("pwd", cwd="~/project").stdout == "/home/user/project\n"
    with pytest.raises(InvalidArgumentException):
        sandbox.commands.run("pwd", cwd="/does/not/exist")
    # The default user is `user`; root is one argument away.
    assert sandbox.commands.run("whoami; echo $HOME; pwd", user="root").stdout == "root\n/root\n/root\n"
    assert sandbox.commands.run("id -u").stdout == "1000\n"
    with pytest.raises(AuthenticationException):
        sandbox.commands.run("whoami", user="nosuchuser")

    stdout, stderr = [], []
    sandbox.commands.run(
        "for i in 1 2 3; do echo line$i; echo warn$i >&2; done", on_stdout=stdout.append, on_stderr=stderr.append
    )
    assert "".join(stdout) == "line1\nline2\nline3\n"
    assert "".join(stderr) == "warn1\nwarn2\nwarn3\n"
    assert sandbox.commands.run("printf 'zażółć 🎉\\n'").stdout == "zażółć 🎉\n"

    # The timeout ends the call and kills the command (the process envd started, as envd does).
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.commands.run("exec sleep 31", timeout=1)
    assert time.monotonic() - started < 10
    eventually(
        lambda: "sleep 31" not in sandbox.commands.run("ps -eo args").stdout,
        "the timed-out command to be killed",
    )


def test_large_output_arrives_whole(sandbox):
    # More than nook's 1 MiB replay buffer, produced faster than the client reads it.
    result = sandbox.commands.run("head -c 3000000 /dev/zero | tr '\\0' a; echo; echo done >&2")
    assert len(result.stdout) == 3_000_001 and set(result.stdout[:-1]) == {"a"}
    assert result.stderr == "done\n"


def test_background_commands_stdin_stream_input_connect_list_and_kill(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "one\n")
    handle.send_stdin(b"two\n")
    sandbox.commands.stream_input(handle.pid, ["three\n", b"four", "\n"])
    sandbox.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert (result.stdout, result.exit_code) == ("one\ntwo\nthree\nfour\n", 0)
    with pytest.raises(InvalidArgumentException):
        sandbox.commands.stream_input(handle.pid, "not an iterable of chunks")

    # Without stdin=True the command's input is closed.
    closed = sandbox.commands.run("cat; echo eof", background=True)
    assert closed.wait().stdout == "eof\n"

    ticker = sandbox.commands.run("echo first; read line; echo got $line; sleep 300", background=True, stdin=True)
    listed = {process.pid: process for process in sandbox.commands.list()}
    assert listed[ticker.pid].cmd == "/bin/bash"
    assert listed[ticker.pid].args == ["-l", "-c", "echo first; read line; echo got $line; sleep 300"]
    # A second client follows the output from now on; disconnecting does not stop the command.
    assert next(iter(ticker)) == ("first\n", None, None)
    reattached = sandbox.commands.connect(ticker.pid)
    ticker.disconnect()
    sandbox.commands.send_stdin(ticker.pid, "hello\n")
    seen = []
    for stdout, _, _ in reattached:
        if stdout:
            seen.append(stdout)
        if "".join(seen).endswith("got hello\n"):
            break
    assert "".join(seen) == "got hello\n"
    assert sandbox.commands.kill(ticker.pid) is True
    with pytest.raises(CommandExitException) as killed:
        reattached.wait()
    assert (killed.value.exit_code, killed.value.error) == (-1, "signal: killed")
    assert sandbox.commands.kill(ticker.pid) is False
    assert ticker.pid not in [process.pid for process in sandbox.commands.list()]

    # handle.kill, and a background command's own timeout.
    sleeper = sandbox.commands.run("sleep 300", background=True)
    assert sleeper.kill() is True
    with pytest.raises(CommandExitException):
        sleeper.wait()
    limited = sandbox.commands.run("sleep 300", background=True, timeout=1)
    eventually(
        lambda: limited.pid not in [process.pid for process in sandbox.commands.list()],
        "the background command's timeout to kill it",
    )

    # Unknown pids.
    with pytest.raises(NotFoundException):
        sandbox.commands.connect(999999)
    with pytest.raises(NotFoundException):
        sandbox.commands.send_stdin(999999, "x")
    with pytest.raises(NotFoundException):
        sandbox.commands.stream_input(999999, ["x"])
    assert sandbox.commands.kill(999999) is False
    # Input to a command whose stdin is closed is refused.
    no_stdin = sandbox.commands.run("sleep 300", background=True)
    with pytest.raises(SandboxException, match="standard input"):
        sandbox.commands.send_stdin(no_stdin.pid, "x")
    no_stdin.kill()


def read_until_prompt(terminal, output):
    """Reads a terminal until its shell prompts: input typed earlier may be flushed while the shell starts."""
    for _, _, data in terminal:
        output.extend(data or b"")
        if output.endswith((b"$ ", b"# ")):
            return output
    raise AssertionError(f"the shell ended before prompting: {bytes(output)!r}")


def test_pty_create_input_resize_connect_and_kill(sandbox):
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80), user="root", cwd="/tmp", envs={"FOO": "bar"})
    output = read_until_prompt(terminal, bytearray())
    sandbox.pty.send_stdin(terminal.pid, b"tty; echo $FOO-$(pwd)-$(whoami)-$((6*7))\n")
    sandbox.pty.resize(terminal.pid, PtySize(rows=30, cols=100))
    sandbox.pty.stream_input(terminal.pid, [b"stty size; echo $TERM", b"; exit 5\n"])
    with pytest.raises(CommandExitException) as ended:
        terminal.wait(on_pty=output.extend)
    assert ended.value.exit_code == 5
    text = output.decode()
    assert "/dev/pts/" in text and "bar-/tmp-root-42" in text and "30 100\r\nxterm-256color" in text, text

    # A second client attaches to a running terminal and sees what it does next.
    other = sandbox.pty.create(PtySize(rows=24, cols=80))
    read_until_prompt(other, bytearray())
    attached = sandbox.pty.connect(other.pid)
    other.disconnect()
    sandbox.pty.send_stdin(other.pid, b"echo attached$((1+1)); whoami\n")
    sandbox.pty.send_stdin(other.pid, b"exit\n")
    seen = bytearray()
    result = attached.wait(on_pty=seen.extend)
    assert result.exit_code == 0
    assert b"\rattached2\r\n" in seen and b"\nuser\r\n" in seen, bytes(seen)
    assert sandbox.pty.kill(other.pid) is False

    third = sandbox.pty.create(PtySize(rows=24, cols=80))
    assert sandbox.pty.kill(third.pid) is True
    with pytest.raises(CommandExitException) as killed:
        third.wait()
    assert killed.value.exit_code == -1


def test_files_read_and_write_text_bytes_streams_and_many(sandbox):
    info = sandbox.files.write("notes/today.txt", "hello files")
    assert (info.path, info.name, info.type) == ("/home/user/notes/today.txt", "today.txt", FileType.FILE)
    assert sandbox.files.read("/home/user/notes/today.txt") == "hello files"
    assert sandbox.files.read("~/notes/today.txt") == "hello files"
    sandbox.files.write("notes/today.txt", "short")
    assert sandbox.files.read("notes/today.txt") == "short"
    sandbox.files.write("/tmp/empty", b"")
    assert sandbox.files.read("/tmp/empty", format="bytes") == bytearray()

    payload = bytes(range(256)) * 4096
    sandbox.files.write("/tmp/blob.bin", payload)
    read = sandbox.files.read("/tmp/blob.bin", format="bytes")
    assert isinstance(read, bytearray) and bytes(read) == payload
    with sandbox.files.read("/tmp/blob.bin", format="stream") as stream:
        assert b"".join(stream) == payload
    # File objects: binary streams and text.
    sandbox.files.write("/tmp/from-io.bin", io.BytesIO(payload[:100_000]))
    assert bytes(sandbox.files.read("/tmp/from-io.bin", format="bytes")) == payload[:100_000]
    sandbox.files.write("/tmp/from-io.txt", io.StringIO("text stream ✓"))
    assert sandbox.files.read("/tmp/from-io.txt") == "text stream ✓"
    # gzip falls back to a plain upload at nook's envd version; a gzip download is answered uncompressed.
    sandbox.files.write("/tmp/zipped.txt", "zipped " * 100, gzip=True)
    assert sandbox.files.read("/tmp/zipped.txt", gzip=True) == "zipped " * 100
    # Iterables and metadata need a newer envd than nook reports: the SDK refuses them itself.
    with pytest.raises(TemplateException):
        sandbox.files.write("/tmp/chunks.txt", iter([b"a", b"b"]))
    with pytest.raises(TemplateException):
        sandbox.files.write("/tmp/meta.txt", "m", metadata={"k": "v"})

    written = sandbox.files.write_files(
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
    assert bytes(sandbox.files.read("many/b.bin", format="bytes")) == b"\x00b"
    assert sandbox.files.read("many/deep/c.txt") == "c"
    assert sandbox.files.write_files([]) == []

    # Files belong to the acting user, directories created for them too.
    sandbox.files.write("/tmp/as-root/r.txt", "r", user="root")
    owners = sandbox.commands.run(
        "stat -c %U /home/user/notes /home/user/notes/today.txt /home/user/many/deep /tmp/as-root /tmp/as-root/r.txt"
    )
    assert owners.stdout == "user\nuser\nuser\nroot\nroot\n"
    assert sandbox.files.read("/tmp/as-root/r.txt", user="root") == "r"
    with pytest.raises(AuthenticationException):
        sandbox.files.read("/tmp/as-root/r.txt", user="nosuchuser")


def test_files_list_make_dir_rename_remove_exists_and_info(sandbox):
    sandbox.files.write("/home/user/tree/a/b/c.txt", "c")
    sandbox.files.write("/home/user/tree/top.txt", "top")
    listed = sandbox.files.list("/home/user/tree")
    assert [(entry.name, entry.type) for entry in listed] == [("a", FileType.DIR), ("top.txt", FileType.FILE)]
    assert [entry.path for entry in sandbox.files.list("tree", depth=2)] == [
        "/home/user/tree/a",
        "/home/user/tree/a/b",
        "/home/user/tree/top.txt",
    ]
    assert [entry.path for entry in sandbox.files.list("tree", depth=3)] == [
        "/home/user/tree/a",
        "/home/user/tree/a/b",
        "/home/user/tree/a/b/c.txt",
        "/home/user/tree/top.txt",
    ]

    entry = sandbox.files.get_info("/home/user/tree/top.txt")
    assert (entry.name, entry.type, entry.size, entry.mode, entry.permissions) == (
        "top.txt",
        FileType.FILE,
        3,
        0o644,
        "-rw-r--r--",
    )
    assert (entry.owner, entry.group) == ("user", "user")
    assert abs(entry.modified_time.timestamp() - time.time()) < 120
    directory = sandbox.files.get_info("tree/a")
    assert (directory.type, directory.permissions, directory.path) == (FileType.DIR, "drwxr-xr-x", "/home/user/tree/a")
    sandbox.commands.run("ln -s /home/user/tree/top.txt /home/user/tree/link")
    link = sandbox.files.get_info("/home/user/tree/link")
    assert (link.type, link.symlink_target) == (FileType.SYMLINK, "/home/user/tree/top.txt")

    assert sandbox.files.make_dir("/home/user/new/nested/dir") is True
    assert sandbox.files.make_dir("/home/user/new/nested/dir") is False
    assert sandbox.commands.run("stat -c %U /home/user/new /home/user/new/nested/dir").stdout == "user\nuser\n"
    with pytest.raises(InvalidArgumentException):
        sandbox.files.make_dir("/home/user/tree/top.txt")

    moved = sandbox.files.rename("/home/user/tree/top.txt", "/home/user/moved/here/top.txt")
    assert (moved.path, moved.name, moved.size) == ("/home/user/moved/here/top.txt", "top.txt", 3)
    assert not sandbox.files.exists("/home/user/tree/top.txt")
    assert sandbox.files.read("/home/user/moved/here/top.txt") == "top"
    assert sandbox.files.exists("/home/user/moved")
    assert not sandbox.files.exists("/home/user/missing")

    sandbox.files.remove("/home/user/tree")
    assert not sandbox.files.exists("/home/user/tree")
    sandbox.files.remove("/home/user/tree")  # a missing path is no error
    sandbox.files.remove("/home/user/moved/here/top.txt")
    assert sandbox.files.list("/home/user/moved/here") == []

    # What an app catches.
    with pytest.raises(FileNotFoundException):
        sandbox.files.read("/home/user/tree/a/b/c.txt")
    with pytest.raises(NotFoundException):
        sandbox.files.read("/no/such/file", format="bytes")
    with pytest.raises(NotFoundException):
        sandbox.files.list("/no/such/dir")
    with pytest.raises(NotFoundException):
        sandbox.files.get_info("/no/such/file")
    with pytest.raises(NotFoundException):
        sandbox.files.rename("/no/such/file", "/tmp/x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.read("/home/user")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list("/etc/hostname")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write("/tmp", "a directory")


def test_watch_dir_reports_changes_recursively_or_not(sandbox):
    sandbox.files.make_dir("/home/user/watched/sub")
    flat = sandbox.files.watch_dir("/home/user/watched")
    deep = sandbox.files.watch_dir("/home/user/watched", recursive=True)
    sandbox.commands.run(
        "cd /home/user/watched && echo 1 > f && echo 2 >> f && chmod 600 f && mv f g && rm g"
        " && echo x > sub/inner.txt && mkdir sub/deeper && echo y > sub/deeper/z.txt && mkdir d2"
    )
    expected_flat = {
        ("f", "create"),
        ("f", "write"),
        ("f", "chmod"),
        ("f", "rename"),
        ("g", "rename"),
        ("g", "remove"),
        ("d2", "create"),
    }
    expected_deep = expected_flat | {
        ("sub/inner.txt", "create"),
        ("sub/inner.txt", "write"),
        ("sub/deeper", "create"),
        ("sub/deeper/z.txt", "create"),
        ("sub/deeper/z.txt", "write"),
    }
    flat_seen, deep_seen = set(), set()

    def collect():
        flat_seen.update((event.name, event.type.value) for event in flat.get_new_events())
        deep_seen.update((event.name, event.type.value) for event in deep.get_new_events())
        return expected_flat <= flat_seen and expected_deep <= deep_seen

    eventually(collect, "the watch events")
    assert not any(name.startswith("sub/") for name, _ in flat_seen), flat_seen
    flat.stop()
    deep.stop()
    with pytest.raises(SandboxException, match="stopped"):
        flat.get_new_events()

    with pytest.raises(NotFoundException):
        sandbox.files.watch_dir("/home/user/not-there")
    sandbox.files.write("/home/user/plain.txt", "x")
    with pytest.raises(InvalidArgumentException):
        sandbox.files.watch_dir("/home/user/plain.txt")
    # Entry info in events needs envd 0.6.3: the SDK refuses it.
    with pytest.raises(TemplateException):
        sandbox.files.watch_dir("/home/user/watched", include_entry=True)
