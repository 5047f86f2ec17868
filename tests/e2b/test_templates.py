"""E2B template builds with the official SDK's `Template.build` (its v2 build system) against nook's image builder:
files copied from the local context (with their owner and mode, .dockerignore honoured), commands run as root or
as the default user, environment and working directory, a start command that is running and ready when a sandbox
from the template starts, cache hits on a rebuild, and a failing step reported as a BuildException with its step.
"""

import time
import uuid

import pytest
from e2b import BuildException, Sandbox, Template, wait_for_port


def unique(name):
    return f"{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def context_dir(tmp_path):
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "server.py").write_text(
        "import http.server, os\n"
        "os.chdir('/srv/site')\n"
        "http.server.test(http.server.SimpleHTTPRequestHandler, port=8000, bind='127.0.0.1')\n"
    )
    (tmp_path / "app" / "notes.tmp").write_text("left out by .dockerignore\n")
    (tmp_path / "run.sh").write_text("#!/bin/sh\necho ran as $(id -un)\n")
    (tmp_path / ".dockerignore").write_text("*.tmp\napp/*.tmp\n")
    return tmp_path


def template(context_dir):
    return (
        Template(file_context_path=str(context_dir))
        .from_base_image()
        .set_envs({"GREETING": "hello from the template", "QUOTED": "it's $HOME"})
        .copy("app/", "/opt/app/", user="user")
        .copy("run.sh", "/usr/local/bin/run-it", mode=0o755)
        .run_cmd("mkdir -p /srv/site && echo 'served by a template' > /srv/site/index.html", user="root")
        .run_cmd("run-it > /home/user/who.txt")
        .set_workdir("/opt/app")
        .set_start_cmd("python3 /opt/app/server.py", wait_for_port(8000))
    )


def test_a_template_builds_and_its_sandboxes_start_with_its_server_running(context_dir):
    name = unique("sdk-template")
    logs = []
    info = Template.build(template(context_dir), f"{name}:v1", on_build_logs=logs.append)
    assert info.template_id == f"{name}:v1"
    assert any("run-it" in entry.message for entry in logs), [entry.message for entry in logs]
    assert Template.exists(f"{name}:v1")
    assert not Template.exists(unique("missing"))

    sandbox = Sandbox.create(f"{name}:v1", timeout=120)
    try:
        # The start command answers at once: the create returned only when its readiness check passed.
        page = sandbox.commands.run("curl -s http://127.0.0.1:8000/index.html")
        assert page.stdout == "served by a template\n"
        seen = sandbox.commands.run(
            "pwd; echo $GREETING; echo \"$QUOTED\"; cat /home/user/who.txt; "
            "stat -c '%U %a' /opt/app/server.py /usr/local/bin/run-it; ls /opt/app"
        )
        assert seen.stdout.splitlines() == [
            "/opt/app",
            "hello from the template",
            "it's $HOME",
            "ran as user",
            "user 644",
            "root 755",
            "server.py",
        ], seen.stdout
    finally:
        sandbox.kill()

    # Unchanged: every step comes from the cache, and the build is quick.
    logs.clear()
    started = time.monotonic()
    Template.build(template(context_dir), f"{name}:v1", on_build_logs=logs.append)
    rebuilt = time.monotonic() - started
    cached = [entry for entry in logs if entry.message == "CACHED"]
    assert len(cached) == 4, [entry.message for entry in logs]
    assert rebuilt < 30, rebuilt


def test_a_failing_step_is_a_build_exception_naming_it(context_dir):
    failing = Template().from_base_image().run_cmd("echo preparing").run_cmd("echo 'no such tool' >&2; exit 9")
    with pytest.raises(BuildException) as raised:
        Template.build(failing, unique("sdk-broken"))
    message = str(raised.value)
    assert "exit code 9" in message and "no such tool" in message, message
