"""The official `e2b` Python SDK's synchronous `Sandbox`, unmodified, against nook: lifecycle, commands, background
commands, terminals, files and watches, and the errors an app relies on. `test_async.py` covers the same with
`AsyncSandbox`."""

import gzip
import hashlib
import io
import json
import os
import time
import urllib.error
import urllib.request

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
    assert info.envd_version == "0.6.4"
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
    # gzip both ways: the upload is inflated as it streams, the download compressed because the SDK asks for it.
    zipped = sandbox.files.write("/tmp/zipped.txt", "zipped " * 100, gzip=True)
    assert (zipped.path, zipped.name) == ("/tmp/zipped.txt", "zipped.txt")
    assert sandbox.commands.run("wc -c < /tmp/zipped.txt").stdout.strip() == "700"
    assert sandbox.files.read("/tmp/zipped.txt", gzip=True) == "zipped " * 100
    with sandbox.files.read("/tmp/blob.bin", format="stream", gzip=True) as stream:
        assert b"".join(stream) == payload
    # Iterables of chunks, file objects and, when asked, plain bytes go up as raw octet-stream bodies.
    sandbox.files.write("/tmp/chunks.txt", iter([b"a", b"b" * 100_000, b"c"]))
    assert sandbox.files.read("/tmp/chunks.txt") == "a" + "b" * 100_000 + "c"
    sandbox.files.write("/tmp/chunks.bin", (payload for _ in range(8)), gzip=True)
    digest = sandbox.commands.run("sha256sum < /tmp/chunks.bin").stdout.split()[0]
    assert digest == hashlib.sha256(payload * 8).hexdigest()
    sandbox.files.write("/tmp/raw.bin", payload[:1000], use_octet_stream=True)
    assert bytes(sandbox.files.read("/tmp/raw.bin", format="bytes")) == payload[:1000]
    sandbox.files.write("/tmp/from-io.gz", io.BytesIO(payload), gzip=True)
    assert bytes(sandbox.files.read("/tmp/from-io.gz", format="bytes")) == payload

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


def test_file_metadata_round_trips_and_is_replaced_by_the_next_upload(sandbox):
    info = sandbox.files.write("/home/user/meta.txt", "m", metadata={"Author": "ada", "purpose": "a test ~"})
    expected = {"author": "ada", "purpose": "a test ~"}
    assert info.metadata == expected
    assert sandbox.files.get_info("meta.txt").metadata == expected
    listed = {entry.name: entry.metadata for entry in sandbox.files.list("/home/user")}
    assert listed["meta.txt"] == expected
    # Kept as user.e2b.* extended attributes of the file in the sandbox's own file system.
    read_back = sandbox.commands.run(
        "python3 -c 'import os; print(sorted((n, os.getxattr(\"meta.txt\", n).decode())"
        " for n in os.listxattr(\"meta.txt\") if n.startswith(\"user.\")))'"
    )
    assert read_back.stdout.strip() == "[('user.e2b.author', 'ada'), ('user.e2b.purpose', 'a test ~')]"
    # Attributes set by other means show too.
    sandbox.commands.run("python3 -c 'import os; os.setxattr(\"meta.txt\", \"user.e2b.extra\", b\"1\")'")
    assert sandbox.files.get_info("meta.txt").metadata == {**expected, "extra": "1"}
    moved = sandbox.files.rename("meta.txt", "kept/meta.txt")
    assert moved.metadata == {**expected, "extra": "1"}

    # An upload replaces the whole set: with other metadata, or with none.
    assert sandbox.files.write("kept/meta.txt", "n", metadata={"v": "2"}).metadata == {"v": "2"}
    assert sandbox.files.get_info("kept/meta.txt").metadata == {"v": "2"}
    assert sandbox.files.write("kept/meta.txt", "o").metadata is None
    assert sandbox.files.get_info("kept/meta.txt").metadata is None

    # Every file of a multipart upload, and streamed (gzip) uploads, carry it too.
    written = sandbox.files.write_files(
        [{"path": "batch/a.txt", "data": "a"}, {"path": "batch/b.bin", "data": b"b"}], metadata={"batch": "7"}
    )
    assert [item.metadata for item in written] == [{"batch": "7"}, {"batch": "7"}]
    assert sandbox.files.get_info("batch/b.bin").metadata == {"batch": "7"}
    sandbox.files.write("batch/c.txt", iter([b"c"]), metadata={"streamed": "yes"}, gzip=True)
    assert sandbox.files.get_info("batch/c.txt").metadata == {"streamed": "yes"}

    # What the SDK lets through but envd's limits refuse: a key over 246 bytes, more than 4096 bytes in all.
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write("/tmp/bad-meta", "x", metadata={"k" * 247: "v"})
    with pytest.raises(InvalidArgumentException):
        sandbox.files.write("/tmp/bad-meta", "x", metadata={"a": "v" * 3000, "b": "v" * 1100})
    assert not sandbox.files.exists("/tmp/bad-meta")


def _multipart(path: str, data: bytes):
    boundary = "nook-test-boundary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def _status(request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_signed_urls_work_without_the_sdk_and_are_checked(sandbox):
    sandbox.files.write("/home/user/shared.txt", "shared bytes")
    # Handed to plain HTTP clients: nothing but the URL, against nook's own address.
    url = sandbox.download_url("/home/user/shared.txt")
    assert "signature=v1_" in url and url.startswith(os.environ["E2B_SANDBOX_URL"])
    with urllib.request.urlopen(url, timeout=30) as response:
        assert response.read() == b"shared bytes"
    # Compressed when asked for gzip by name (as files.read(gzip=True) asks); as they are for a generic list.
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept-Encoding": "gzip"}), timeout=30) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(response.read()) == b"shared bytes"
    generic = urllib.request.Request(url, headers={"Accept-Encoding": "gzip, deflate"})
    with urllib.request.urlopen(generic, timeout=30) as response:
        assert response.headers["Content-Encoding"] is None and response.read() == b"shared bytes"
    upload = sandbox.upload_url("uploads/raw.bin")
    raw = urllib.request.Request(
        upload, data=b"\x00raw", method="POST", headers={"Content-Type": "application/octet-stream"}
    )
    with urllib.request.urlopen(raw, timeout=30) as response:
        assert json.loads(response.read()) == [
            {"path": "/home/user/uploads/raw.bin", "name": "raw.bin", "type": "file"}
        ]
    assert bytes(sandbox.files.read("uploads/raw.bin", format="bytes")) == b"\x00raw"
    body, content_type = _multipart("ignored-name", b"form bytes")
    form = sandbox.upload_url("/home/user/uploads/form.txt", use_signature_expiration=60)
    request = urllib.request.Request(form, data=body, method="POST", headers={"Content-Type": content_type})
    assert _status(request) == 200
    assert sandbox.files.read("uploads/form.txt") == "form bytes"
    # As another user, who owns what they upload.
    as_root = sandbox.upload_url("/tmp/by-root.txt", user="root")
    octets = {"Content-Type": "application/octet-stream"}
    assert _status(urllib.request.Request(as_root, data=b"r", method="POST", headers=octets)) == 200
    assert sandbox.commands.run("stat -c %U /tmp/by-root.txt").stdout == "root\n"

    # Within its lifetime it works; past it, or altered in any part, it is refused.
    assert _status(sandbox.download_url("shared.txt", use_signature_expiration=60)) == 200
    assert _status(sandbox.download_url("shared.txt", use_signature_expiration=-5)) == 401
    assert _status(url.replace("shared.txt", "raw.txt")) == 401
    later = sandbox.download_url("shared.txt", use_signature_expiration=60)
    stamp = later.rsplit("signature_expiration=", 1)[1]
    assert _status(later.replace(stamp, str(int(stamp) + 3600))) == 401
    assert _status(urllib.request.Request(url, data=b"x", method="POST", headers=octets)) == 401  # reads only
    # Addressed to the sandbox by its header, a file request needs the token or a signature.
    routed = {"E2b-Sandbox-Id": sandbox.sandbox_id}
    assert _status(urllib.request.Request(url.split("&signature=")[0], headers=routed)) == 401
    assert _status(urllib.request.Request(url, headers=routed)) == 200
    # A signature is an alternative to the token, not a way around a wrong one.
    assert _status(urllib.request.Request(url, headers={**routed, "X-Access-Token": "wrong"})) == 401
    assert _status(urllib.request.Request(url, headers={"X-Access-Token": "wrong"})) == 401


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

    # Entry info in events: for creations, writes and changes of what still exists, with its metadata.
    entries = sandbox.files.watch_dir("/home/user/watched", include_entry=True, allow_network_mounts=True)
    sandbox.files.write("/home/user/watched/with-entry.txt", "12345", metadata={"k": "v"})
    sandbox.commands.run("cd /home/user/watched && chmod 600 with-entry.txt && mkdir kept && mkdir gone && rmdir gone")
    events = []

    def collected():
        events.extend(entries.get_new_events())
        kinds = {(event.name, event.type.value) for event in events}
        return {("with-entry.txt", "rename"), ("with-entry.txt", "chmod"), ("kept", "create"), ("gone", "remove")} <= kinds

    eventually(collected, "the events with entries")
    entries.stop()
    changed = [event for event in events if (event.name, event.type.value) == ("with-entry.txt", "chmod")][0]
    assert changed.entry is not None
    assert (changed.entry.path, changed.entry.size, changed.entry.mode) == ("/home/user/watched/with-entry.txt", 5, 0o600)
    assert (changed.entry.owner, changed.entry.metadata) == ("user", {"k": "v"})
    kept = [event for event in events if (event.name, event.type.value) == ("kept", "create")][0]
    assert (kept.entry.type, kept.entry.path) == (FileType.DIR, "/home/user/watched/kept")
    assert all(event.entry is None for event in events if event.type.value in ("remove", "rename"))
