"""The official `e2b` Python SDK, unmodified, against nook: lifecycle, commands, terminals and files, sync and
async. Each test asserts what an app written for E2B relies on."""

import asyncio
import time

import pytest
from e2b import AsyncSandbox, CommandExitException, Sandbox, SandboxQuery
from e2b.exceptions import NotFoundException, SandboxNotFoundException, TimeoutException


def test_lifecycle_create_info_list_timeout_connect_kill():
    sbx = Sandbox.create(timeout=120, metadata={"suite": "e2b", "owner": "alice smith"}, envs={"GREETING": "hi"})
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id
    assert info.template_id == "base"
    assert info.metadata == {"suite": "e2b", "owner": "alice smith"}
    assert info.state.value == "running"
    assert sbx.is_running()
    # Sandbox-wide env vars reach commands.
    assert sbx.commands.run("echo $GREETING").stdout == "hi\n"

    listed = Sandbox.list(query=SandboxQuery(metadata={"owner": "alice smith"})).next_items()
    assert [item.sandbox_id for item in listed] == [sbx.sandbox_id]
    assert Sandbox.list(query=SandboxQuery(metadata={"owner": "nobody"})).next_items() == []

    before = sbx.get_info().end_at
    sbx.set_timeout(600)
    assert sbx.get_info().end_at > before

    again = Sandbox.connect(sbx.sandbox_id)
    assert again.commands.run("hostname").exit_code == 0

    assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id) is False
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id)


def test_the_timeout_kills_the_sandbox():
    sbx = Sandbox.create(timeout=2)
    assert sbx.is_running()
    deadline = time.monotonic() + 30
    while sbx.sandbox_id in [item.sandbox_id for item in Sandbox.list().next_items()]:
        assert time.monotonic() < deadline, "the sandbox outlived its timeout"
        time.sleep(0.5)


def test_commands_run_with_output_exit_codes_env_cwd_and_user(sandbox):
    result = sandbox.commands.run("echo out; echo err >&2; whoami; pwd")
    assert result.stdout == "out\nuser\n/home/user\n"
    assert result.stderr == "err\n"
    assert result.exit_code == 0

    with pytest.raises(CommandExitException) as failed:
        sandbox.commands.run("echo partial; exit 3")
    assert failed.value.exit_code == 3
    assert failed.value.stdout == "partial\n"

    assert sandbox.commands.run("echo $A-$B", envs={"A": "1", "B": "two"}).stdout == "1-two\n"
    assert sandbox.commands.run("pwd", cwd="/tmp").stdout == "/tmp\n"
    assert sandbox.commands.run("whoami", user="root").stdout == "root\n"

    streamed = []
    sandbox.commands.run("for i in 1 2 3; do echo line$i; done", on_stdout=streamed.append)
    assert "".join(streamed) == "line1\nline2\nline3\n"

    with pytest.raises(TimeoutException):
        sandbox.commands.run("sleep 30", timeout=1)


def test_background_commands_stdin_connect_and_kill(sandbox):
    handle = sandbox.commands.run("cat", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "echo me\n")
    sandbox.commands.close_stdin(handle.pid)
    result = handle.wait()
    assert result.stdout == "echo me\n"

    sleeper = sandbox.commands.run("echo started; sleep 300", background=True)
    pids = [process.pid for process in sandbox.commands.list()]
    assert sleeper.pid in pids
    reattached = sandbox.commands.connect(sleeper.pid)
    assert sandbox.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException):
        reattached.wait()
    assert sandbox.commands.kill(sleeper.pid) is False


def test_pty_create_input_resize_and_kill(sandbox):
    from e2b.sandbox.commands.command_handle import PtySize

    terminal = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.send_stdin(terminal.pid, b"tty; echo $((6*7))\n")
    sandbox.pty.resize(terminal.pid, PtySize(rows=30, cols=100))
    sandbox.pty.send_stdin(terminal.pid, b"stty size; exit 0\n")
    output = bytearray()
    result = terminal.wait(on_pty=output.extend)
    assert result.exit_code == 0
    assert b"/dev/pts/" in output and b"42" in output and b"30 100" in output, bytes(output)

    other = sandbox.pty.create(PtySize(rows=24, cols=80))
    assert sandbox.pty.kill(other.pid) is True


def test_files_read_write_list_and_manage(sandbox):
    info = sandbox.files.write("notes/today.txt", "hello files")
    assert info.path == "/home/user/notes/today.txt"
    assert sandbox.files.read("/home/user/notes/today.txt") == "hello files"
    payload = bytes(range(256)) * 4096
    sandbox.files.write("/tmp/blob.bin", payload)
    assert bytes(sandbox.files.read("/tmp/blob.bin", format="bytes")) == payload
    written = sandbox.files.write_files(
        [{"path": "/home/user/many/a.txt", "data": "a"}, {"path": "/home/user/many/b.txt", "data": "b"}]
    )
    assert sorted(item.path for item in written) == ["/home/user/many/a.txt", "/home/user/many/b.txt"]
    # Written as the default user, not root.
    assert sandbox.commands.run("stat -c %U /home/user/notes /home/user/notes/today.txt").stdout == "user\nuser\n"

    names = sorted(entry.name for entry in sandbox.files.list("/home/user/many"))
    assert names == ["a.txt", "b.txt"]
    assert sandbox.files.exists("/home/user/many/a.txt")
    assert not sandbox.files.exists("/home/user/missing")
    assert sandbox.files.make_dir("/home/user/newdir") is True
    assert sandbox.files.make_dir("/home/user/newdir") is False
    moved = sandbox.files.rename("/home/user/many/a.txt", "/home/user/newdir/a.txt")
    assert moved.path == "/home/user/newdir/a.txt"
    entry = sandbox.files.get_info("/home/user/newdir/a.txt")
    assert entry.size == 1 and entry.owner == "user" and entry.permissions == "-rw-r--r--"
    sandbox.files.remove("/home/user/newdir")
    assert not sandbox.files.exists("/home/user/newdir")
    with pytest.raises(NotFoundException):
        sandbox.files.read("/home/user/newdir/a.txt")


def test_watch_dir_reports_changes(sandbox):
    sandbox.files.make_dir("/home/user/watched")
    watcher = sandbox.files.watch_dir("/home/user/watched")
    sandbox.commands.run("echo x > /home/user/watched/new.txt")
    deadline = time.monotonic() + 20
    seen = []
    while not any(event.name == "new.txt" and event.type.value == "create" for event in seen):
        assert time.monotonic() < deadline, seen
        seen.extend(watcher.get_new_events())
        time.sleep(0.2)
    watcher.stop()


def test_async_sdk_runs_commands_and_files():
    async def scenario():
        sbx = await AsyncSandbox.create(timeout=120)
        try:
            result = await sbx.commands.run("echo async; exit 0")
            assert result.stdout == "async\n"
            await sbx.files.write("/tmp/async.txt", "from async")
            assert await sbx.files.read("/tmp/async.txt") == "from async"
            events = []
            handle = await sbx.files.watch_dir("/tmp", on_event=events.append)
            await sbx.files.write("/tmp/watched-async.txt", "y")
            for _ in range(100):
                if any(event.name == "watched-async.txt" for event in events):
                    break
                await asyncio.sleep(0.1)
            await handle.stop()
            assert any(event.name == "watched-async.txt" for event in events), events
        finally:
            await sbx.kill()

    asyncio.run(scenario())
