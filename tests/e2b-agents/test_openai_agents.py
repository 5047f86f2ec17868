"""The OpenAI Agents SDK's E2B sandbox provider (`agents.extensions.sandbox.e2b`), unmodified, against nook.

An agent's sandbox tools go through these session calls: start (which prepares the workspace root), exec,
write, read, PTY processes, workspace persistence as a tar stream, resume of a saved session, and shutdown. No
model is called: the tests drive the session the way the agent runtime does."""

import asyncio
import io
import tarfile
from pathlib import Path

import pytest
from agents.extensions.sandbox.e2b import E2BSandboxClient, E2BSandboxClientOptions, E2BSandboxSessionState
from agents.sandbox.errors import WorkspaceReadNotFoundError
from e2b import AsyncSandbox, SandboxQuery, SandboxState


def run(coroutine):
    return asyncio.run(coroutine)


def options(sandbox_type: str = "e2b", **extra) -> E2BSandboxClientOptions:
    return E2BSandboxClientOptions(sandbox_type=sandbox_type, timeout=300, **extra)


async def listed_ids(**metadata) -> list[str]:
    paginator = AsyncSandbox.list(query=SandboxQuery(metadata=metadata))
    return [info.sandbox_id for info in await paginator.next_items()]


# "e2b_code_interpreter" makes the same session on e2b-code-interpreter's sandbox (template code-interpreter-v1).
@pytest.mark.parametrize("sandbox_type", ["e2b", "e2b_code_interpreter"])
def test_session_runs_commands_writes_and_reads_files_and_shuts_down(sandbox_type):
    async def scenario():
        client = E2BSandboxClient()
        session = await client.create(
            options=options(
                sandbox_type, metadata={"suite": "openai-agents"}, envs={"AGENT_GREETING": "hi from the client"}
            )
        )
        sandbox_id = session.state.sandbox_id
        assert sandbox_id in await listed_ids(suite="openai-agents")
        await session.start()
        assert await session.running() is True

        # Commands run in the workspace root, which start() created, as the sandbox's default user.
        result = await session.exec("echo out; echo err >&2; whoami; pwd; echo $AGENT_GREETING")
        assert result.exit_code == 0
        assert result.stdout == b"out\nuser\n/workspace\nhi from the client\n"
        assert result.stderr == b"err\n"

        failed = await session.exec("echo partial; exit 7")
        assert failed.exit_code == 7
        assert failed.stdout == b"partial\n"

        as_root = await session.exec("whoami; id -u", user="root")
        assert as_root.stdout == b"root\n0\n"

        # Files go through the envd file API; relative paths are inside the workspace.
        await session.write(Path("notes/today.txt"), io.BytesIO("hello from the agent ✓".encode()))
        assert (await session.read(Path("notes/today.txt"))).read() == "hello from the agent ✓".encode()
        assert (await session.exec("cat /workspace/notes/today.txt")).stdout == "hello from the agent ✓".encode()
        payload = bytes(range(256)) * 1024
        await session.write(Path("/workspace/blob.bin"), io.BytesIO(payload))
        assert (await session.read(Path("blob.bin"))).read() == payload
        with pytest.raises(WorkspaceReadNotFoundError):
            await session.read(Path("missing.txt"))

        await session.mkdir(Path("made/deep"), parents=True)
        entries = await session.ls(Path("."))
        assert sorted(Path(entry.path).name for entry in entries) == ["blob.bin", "made", "notes"]
        assert {Path(entry.path).name: entry.is_dir() for entry in entries} == {
            "blob.bin": False,
            "made": True,
            "notes": True,
        }
        await session.rm(Path("made"), recursive=True)
        assert (await session.exec("test -e /workspace/made")).exit_code == 1

        await session.shutdown()
        assert sandbox_id not in await listed_ids(suite="openai-agents")

    run(scenario())


def test_pty_processes_with_and_without_a_terminal():
    async def scenario():
        client = E2BSandboxClient()
        session = await client.create(options=options())
        await session.start()
        try:
            piped = await session.pty_exec_start("echo piped; exit 3", yield_time_s=5)
            assert piped.output == b"piped\n"
            assert piped.exit_code == 3

            terminal = await session.pty_exec_start("read line; echo got:$line", tty=True, yield_time_s=1)
            assert terminal.exit_code is None
            assert terminal.process_id is not None
            update = await session.pty_write_stdin(session_id=terminal.process_id, chars="hello\n", yield_time_s=5)
            output = terminal.output + update.output
            while b"got:hello" not in output:
                more = await session.pty_write_stdin(session_id=terminal.process_id, chars="", yield_time_s=5)
                assert more.output, output
                output += more.output
            await session.pty_terminate_all()
        finally:
            await session.shutdown()

    run(scenario())


def test_workspace_persists_as_a_tar_and_hydrates_a_new_session():
    async def scenario():
        client = E2BSandboxClient()
        first = await client.create(options=options())
        await first.start()
        try:
            await first.write(Path("project/main.py"), io.BytesIO(b"print('persisted')\n"))
            await first.exec("mkdir -p /workspace/project/data && echo 42 > /workspace/project/data/answer")
            archive = (await first.persist_workspace()).read()
        finally:
            await first.shutdown()
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            names = {name.removeprefix("./") for name in tar.getnames()}
        assert {"project/main.py", "project/data/answer"} <= names, names

        second = await client.create(options=options())
        await second.start()
        try:
            await second.hydrate_workspace(io.BytesIO(archive))
            assert (await second.read(Path("project/main.py"))).read() == b"print('persisted')\n"
            assert (await second.exec("cat project/data/answer")).stdout == b"42\n"
        finally:
            await second.shutdown()

    run(scenario())


def test_a_saved_session_resumes_on_the_same_sandbox():
    async def scenario():
        client = E2BSandboxClient()
        session = await client.create(options=options())
        await session.start()
        sandbox_id = session.state.sandbox_id
        await session.write(Path("state.txt"), io.BytesIO(b"kept"))

        # What an application stores between runs, and a new client resuming it (POST /sandboxes/{id}/connect).
        saved = session.state.model_dump(mode="json")
        restored = E2BSandboxClient().deserialize_session_state(saved)
        assert isinstance(restored, E2BSandboxSessionState)
        resumed = await E2BSandboxClient().resume(restored)
        await resumed.start()
        try:
            assert resumed.state.sandbox_id == sandbox_id
            assert (await resumed.read(Path("state.txt"))).read() == b"kept"
            assert (await resumed.exec("cat state.txt")).stdout == b"kept"
        finally:
            await resumed.shutdown()
        assert sandbox_id not in [info.sandbox_id for info in await AsyncSandbox.list().next_items()]

    run(scenario())


def test_a_session_paused_by_its_timeout_resumes_with_its_workspace():
    async def scenario():
        client = E2BSandboxClient()
        # The provider's default lifecycle: pause (not kill) when the timeout passes.
        session = await client.create(options=E2BSandboxClientOptions(sandbox_type="e2b", timeout=300))
        assert session.state.on_timeout == "pause"
        await session.start()
        sandbox_id = session.state.sandbox_id
        await session.write(Path("draft.md"), io.BytesIO(b"work in progress"))
        # The timeout is cut short only now, so a slow start cannot pause the sandbox before the write.
        await AsyncSandbox.set_timeout(sandbox_id, 1)
        for _ in range(300):
            paused = AsyncSandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED]))
            if sandbox_id in [info.sandbox_id for info in await paused.next_items()]:
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the sandbox was not paused at its timeout")

        restored = E2BSandboxClient().deserialize_session_state(session.state.model_dump(mode="json"))
        resumed = await E2BSandboxClient().resume(restored)
        await resumed.start()
        try:
            assert resumed.state.sandbox_id == sandbox_id
            assert (await AsyncSandbox.get_info(sandbox_id)).state == SandboxState.RUNNING
            assert (await resumed.read(Path("draft.md"))).read() == b"work in progress"
        finally:
            await resumed.shutdown()

    run(scenario())
