"""Pause and resume with the E2B SDK: `pause()` keeps a sandbox's processes where they are (nook freezes them), the
sandbox is listed `paused`, a second pause answers False as E2B's does, and `connect` resumes the same processes,
which did not run while paused; a pause without memory keeps the files, and `connect` starts the sandbox again.
"""

import time

from e2b import Sandbox, SandboxQuery, SandboxState


def counter_value(sandbox):
    return int(sandbox.commands.run("cat /tmp/counter").stdout.strip() or 0)


def test_pause_keeps_processes_frozen_and_connect_resumes_them():
    sbx = Sandbox.create(timeout=120)
    try:
        counter = sbx.commands.run(
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done", background=True
        )
        deadline = time.monotonic() + 20
        while counter_value(sbx) < 3:
            assert time.monotonic() < deadline, "the counter did not start"
            time.sleep(0.05)
        before = counter_value(sbx)
        assert sbx.pause() is True
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        assert Sandbox.pause(sbx.sandbox_id) is False, "a second pause must answer that it was paused already"
        paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert sbx.sandbox_id in [item.sandbox_id for item in paused]
        # Two seconds paused would be 40 ticks of the counter if it ran.
        time.sleep(2)
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=120)
        after = counter_value(resumed)
        assert before <= after < before + 20, (before, after)
        assert counter.pid in [process.pid for process in resumed.commands.list()]
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
    finally:
        sbx.kill()


def test_a_pause_without_memory_keeps_the_files():
    sbx = Sandbox.create(timeout=120)
    try:
        sbx.files.write("/home/user/kept.txt", "kept through the pause")
        assert sbx.pause(keep_memory=False) is True
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
        resumed = Sandbox.connect(sbx.sandbox_id, timeout=120)
        assert resumed.files.read("/home/user/kept.txt") == "kept through the pause"
    finally:
        sbx.kill()
