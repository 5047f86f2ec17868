"""Tests nook's bash and JavaScript Jupyter kernels (images/base/rootfs) for real: each kernel is started through
jupyter_client from its kernelspec, cells are executed, and the messages it publishes are checked.

Needs a Python with jupyter_client and ipykernel, node, and the overlay installed at / (the kernelspecs name
absolute paths): the base image, or an unpacked copy of it with images/base/rootfs copied over it. See README.md.

    python3 test_kernels.py [-k SUBSTRING]

Prints one line per test and exits with status 1 if any failed.
"""

import argparse
import sys
import time
import traceback

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager

KERNELS_DIR = "/usr/local/share/jupyter/kernels"
# Seconds process_kernel.py gives an interrupted cell before it kills the interpreter.
sys.path.insert(0, "/usr/local/lib/nook/kernels")
from process_kernel import INTERRUPT_GRACE  # noqa: E402

# An interrupt is "prompt" within this many seconds: generous for a loaded 2-core machine, yet far below what the
# interrupted cells would take (they sleep 30 s or more, or never end).
PROMPTLY = 10


class Outcome:
    """What one execution published, in arrival order, and its reply."""

    def __init__(self, reply, messages):
        self.reply = reply["content"]
        self.messages = messages  # (arrival time, msg_type, content)
        self.stdout = "".join(c["text"] for _, kind, c in messages if kind == "stream" and c["name"] == "stdout")
        self.stderr = "".join(c["text"] for _, kind, c in messages if kind == "stream" and c["name"] == "stderr")
        self.results = [c for _, kind, c in messages if kind == "execute_result"]
        self.errors = [c for _, kind, c in messages if kind == "error"]
        self.inputs = [c for _, kind, c in messages if kind == "execute_input"]

    @property
    def text(self):
        assert len(self.results) == 1, self.describe()
        return self.results[0]["data"]["text/plain"]

    def ok(self):
        assert self.reply["status"] == "ok", self.describe()
        assert not self.errors, self.describe()
        return self

    def error(self, ename, evalue_part=""):
        assert self.reply["status"] == "error", self.describe()
        assert self.reply["ename"] == ename and evalue_part in self.reply["evalue"], self.describe()
        assert [(e["ename"], e["evalue"]) for e in self.errors] == [(ename, self.reply["evalue"])], self.describe()
        return self

    def describe(self):
        kinds = [(kind, content) for _, kind, content in self.messages]
        return f"reply={self.reply!r} published={kinds!r}"


class Kernel:
    """One running kernel and a blocking client."""

    def __init__(self, name, **start):
        specs = KernelSpecManager(kernel_dirs=[KERNELS_DIR])
        self.manager = KernelManager(kernel_name=name, kernel_spec_manager=specs)
        self.manager.start_kernel(**start)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def start(self, code, silent=False):
        # stop_on_error=False: after an error reply, ipykernel aborts requests that arrive before its event loop
        # gets back to the queue (all kernels, Python's too); the tests send their next cell at once.
        return self.client.execute(code, silent=silent, store_history=not silent, allow_stdin=False,
                                   stop_on_error=False)

    def collect(self, msg_id, timeout=30):
        """The messages published for `msg_id` until the kernel went idle, and the reply."""
        deadline = time.monotonic() + timeout
        messages = []
        while True:
            message = self.client.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.01))
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = message["msg_type"], message["content"]
            if kind == "status":
                if content["execution_state"] == "idle":
                    break
                continue
            messages.append((time.monotonic(), kind, content))
        while True:
            reply = self.client.get_shell_msg(timeout=max(deadline - time.monotonic(), 0.01))
            if reply["parent_header"].get("msg_id") == msg_id:
                return Outcome(reply, messages)

    def run(self, code, silent=False, timeout=30):
        return self.collect(self.start(code, silent), timeout)

    def wait_for_output(self, msg_id, text, timeout=30):
        """Waits until a stdout stream message of `msg_id` contains `text`; returns the messages seen so far."""
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            message = self.client.get_iopub_msg(timeout=max(deadline - time.monotonic(), 0.01))
            if message["parent_header"].get("msg_id") != msg_id:
                continue
            seen.append((time.monotonic(), message["msg_type"], message["content"]))
            if message["msg_type"] == "stream" and text in message["content"]["text"]:
                return seen

    def interrupted(self, code, started, timeout=30):
        """Runs `code`, interrupts it once its stdout shows `started`; returns (outcome, seconds until the reply)."""
        msg_id = self.start(code)
        self.wait_for_output(msg_id, started)
        self.manager.interrupt_kernel()
        since = time.monotonic()
        outcome = self.collect(msg_id, timeout)
        return outcome, time.monotonic() - since

    def close(self):
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


def streamed(outcome, name="stdout"):
    """Seconds between the first and the last stream message of `name`, and their number."""
    times = [at for at, kind, c in outcome.messages if kind == "stream" and c["name"] == name]
    return times[-1] - times[0], len(times)


# bash


def test_bash_output_status_and_count(bash):
    first = bash.run("echo out; echo err >&2").ok()
    assert (first.stdout, first.stderr) == ("out\n", "err\n"), first.describe()
    assert first.inputs == [{"code": "echo out; echo err >&2", "execution_count": first.reply["execution_count"]}]
    second = bash.run("true").ok()
    assert second.reply["execution_count"] == first.reply["execution_count"] + 1
    failed = bash.run("echo before; ls /nonexistent").error("CommandExitError", "exit status 2")
    assert failed.stdout == "before\n" and "nonexistent" in failed.stderr, failed.describe()
    assert bash.run("false; true").ok().stdout == ""


def test_bash_state_persists(bash):
    bash.run(
        "x=42; declare -A map=([k]=v); cd /tmp; export NOOK_TEST=exported\n"
        "greet() { echo \"hello $1\"; }\n"
        "alias shout='echo LOUD'"
    ).ok()
    out = bash.run('echo "$x ${map[k]}"; pwd; greet you; bash -c \'echo $NOOK_TEST\'; shout').ok().stdout
    assert out == "42 v\n/tmp\nhello you\nexported\nLOUD\n", out


def test_bash_multiline_quotes_heredocs_and_no_prompt_noise(bash):
    code = (
        "y=3\n"
        "cat <<EOF\n"
        "y is $y\n"
        "EOF\n"
        "if [ \"$y\" -gt 2 ]; then\n"
        "  echo 'single \"double\" $y'\n"
        "fi\n"
        "echo 'NOOK_END_0123456789abcdef' \\\n"
        "  continued\n"
        "sleep 0.2 & wait"
    )
    out = bash.run(code).ok()
    assert out.stdout == "y is 3\nsingle \"double\" $y\nNOOK_END_0123456789abcdef continued\n", out.describe()
    assert out.stderr == "", out.describe()


def test_bash_syntax_error_keeps_the_shell(bash):
    broken = bash.run("echo 'unclosed").error("CommandExitError", "exit status 2")
    assert "unexpected EOF" in broken.stderr, broken.describe()
    assert bash.run("if then").error("CommandExitError").stderr.count("syntax error") == 1
    assert bash.run("echo fine").ok().stdout == "fine\n"


def test_bash_stdin_is_at_end(bash):
    assert bash.run("cat; read -r line || echo eof").ok().stdout == "eof\n"


def test_bash_streams_while_running(bash):
    out = bash.run("for i in 1 2 3 4; do echo $i; sleep 0.4; done").ok()
    spread, count = streamed(out)
    assert out.stdout == "1\n2\n3\n4\n" and count == 4 and spread > 1, out.describe()


def test_bash_large_output(bash):
    out = bash.run("seq 1 200000; seq 1 50000 >&2").ok()
    assert out.stdout == "".join(f"{i}\n" for i in range(1, 200001)), len(out.stdout)
    assert out.stderr == "".join(f"{i}\n" for i in range(1, 50001)), len(out.stderr)
    # Three-byte characters, split across reads, come out whole.
    assert bash.run("printf '\u20ac%.0s' $(seq 1 100000)").ok().stdout == "\u20ac" * 100000


def test_bash_silent(bash):
    before = bash.run("true").reply["execution_count"]
    quiet = bash.run("z=silent; echo hidden; echo hidden >&2", silent=True)
    assert quiet.reply["status"] == "ok" and quiet.messages == [], quiet.describe()
    failed = bash.run("cd /nonexistent", silent=True)
    assert failed.reply["status"] == "error" and failed.messages == [], failed.describe()
    after = bash.run("echo $z").ok()
    assert after.stdout == "silent\n" and after.reply["execution_count"] == before + 1, after.describe()


def test_bash_interrupt(bash):
    bash.run("kept=yes").ok()
    out, took = bash.interrupted("echo started; sleep 100; echo after", "started")
    out.error("KeyboardInterrupt", "130")
    assert took < PROMPTLY and "after" not in out.stdout and out.stderr == "", (took, out.describe())
    assert bash.run("pgrep -f 'sleep 100' || echo gone").ok().stdout == "gone\n"
    loop, took = bash.interrupted("echo looping; while true; do :; done", "looping")
    loop.error("KeyboardInterrupt")
    assert took < PROMPTLY, took
    assert bash.run("echo $kept").ok().stdout == "yes\n"


def test_bash_interrupt_between_cells_is_harmless(bash):
    bash.run("kept=yes").ok()
    bash.manager.interrupt_kernel()
    time.sleep(0.5)
    assert bash.run("echo next").ok().stdout == "next\n"
    assert bash.run("false").error("CommandExitError").stdout == ""
    assert bash.run("echo $kept").ok().stdout == "yes\n"


def test_bash_command_ignoring_interrupt_is_killed(bash):
    bash.run("lost=no").ok()
    out, took = bash.interrupted("(trap '' INT; echo stubborn; sleep 30)", "stubborn")
    out.error("KeyboardInterrupt", "killed")
    assert INTERRUPT_GRACE - 1 < took < INTERRUPT_GRACE + PROMPTLY, took
    assert bash.run('echo "${lost:-reset}"').ok().stdout == "reset\n"


def test_bash_exit_restarts(bash):
    bash.run("gone=no").ok()
    bash.run("echo bye; exit 3").error("ProcessExited", "status 3")
    assert bash.run('echo "${gone:-fresh}"').ok().stdout == "fresh\n"


# javascript


def test_js_console_and_results(js):
    out = js.run("console.log('hello', 42); console.error('oops'); 1 + 2").ok()
    assert (out.stdout, out.stderr, out.text) == ("hello 42\n", "oops\n", "3"), out.describe()
    assert "application/json" not in out.results[0]["data"]
    assert out.results[0]["execution_count"] == out.reply["execution_count"]
    data = js.run("({a: 1, b: [1, 'two', null], c: {d: true}})").ok().results[0]["data"]
    assert data["application/json"] == {"a": 1, "b": [1, "two", None], "c": {"d": True}}, data
    assert data["text/plain"] == "{ a: 1, b: [ 1, 'two', null ], c: { d: true } }", data
    assert js.run("'text'").ok().text == "'text'"
    not_json = js.run("new Map([[1, {x: 1}]])").ok().results[0]["data"]
    assert not_json == {"text/plain": "Map(1) { 1 => { x: 1 } }"}, not_json
    assert js.run("[1, undefined, 2n]").ok().results[0]["data"] == {"text/plain": "[ 1, undefined, 2n ]"}
    assert js.run("let nothing; nothing").ok().results == []
    assert js.run("NaN").ok().text == "NaN"


def test_js_declarations_persist(js):
    js.run("let a = 1; const b = 2; var c = 3; function f() { return a + b + c; } class K { m() { return 'm'; } }")
    assert js.run("f() + new K().m()").ok().text == "'6m'"
    assert js.run("let a = 10; const b = 20; a + b").ok().text == "30"  # declaring again is allowed
    assert js.run("f()").ok().text == "33"


def test_js_top_level_await(js):
    assert js.run("await Promise.resolve(5)").ok().text == "5"
    out = js.run("const later = await new Promise((r) => setTimeout(() => r(7), 100)); later * 2").ok()
    assert out.text == "14", out.describe()
    assert js.run("later").ok().text == "7"


def test_js_require_chdir_env(js):
    assert js.run("require('fs').existsSync('/')").ok().text == "true"
    js.run('process.chdir("/tmp");', silent=True)
    js.run('process.env["NOOK_TEST"] = "v";', silent=True)
    out = js.run("[process.cwd(), process.env.NOOK_TEST, require('child_process').execSync('echo $NOOK_TEST') + '']")
    assert out.ok().results[0]["data"]["application/json"] == ["/tmp", "v", "v\n"], out.describe()
    js.run("require('fs').writeFileSync('/tmp/nook_local.js', 'module.exports = 41 + 1;')").ok()
    assert js.run("require('./nook_local.js')").ok().text == "42"  # relative to the working directory


def test_js_errors(js):
    out = js.run("console.log('first'); null.x").error("TypeError", "Cannot read properties of null")
    assert out.stdout == "first\n", out.describe()
    traceback = out.reply["traceback"]
    assert traceback[0].startswith("TypeError: Cannot read properties of null"), traceback
    assert traceback[1:] == ["    at <anonymous>:1:28"], traceback  # the cell's frames only
    nested = js.run("function g() { throw new RangeError('deep'); }\ng()").error("RangeError", "deep")
    assert nested.reply["traceback"] == ["RangeError: deep", "    at g (<anonymous>:1:22)", "    at <anonymous>:2:1"]
    syntax = js.run("if (true) {").error("SyntaxError", "Unexpected end of input")
    assert syntax.reply["traceback"] == ["SyntaxError: Unexpected end of input", "    at <anonymous>:1:12"]
    js.run("await Promise.reject(new Error('async'))").error("Error", "async")
    js.run("throw 5").error("Uncaught", "5")
    js.run("undefinedName").error("ReferenceError", "undefinedName is not defined")
    assert js.run("1").ok().text == "1"


def test_js_uncaught_outside_cells(js):
    out = js.run("setTimeout(() => { throw new Error('late'); }, 10);\n"
                 "await new Promise((r) => setTimeout(r, 200)); 'alive'")
    assert out.ok().text == "'alive'" and "late" in out.stderr, out.describe()
    out = js.run("Promise.reject(new Error('unhandled')); await new Promise((r) => setTimeout(r, 100)); 'still'")
    assert out.ok().text == "'still'" and "unhandled" in out.stderr, out.describe()


def test_js_streams_while_running(js):
    out = js.run("for (let i = 0; i < 4; i++) { console.log(i); await new Promise((r) => setTimeout(r, 400)); }").ok()
    spread, count = streamed(out)
    assert out.stdout == "0\n1\n2\n3\n" and count == 4 and spread > 1, out.describe()


def test_js_large_output(js):
    out = js.run("for (let i = 0; i < 20; i++) process.stdout.write('x'.repeat(100000) + '\\n'); 'done'").ok()
    assert out.stdout == ("x" * 100000 + "\n") * 20 and out.text == "'done'", len(out.stdout)
    assert js.run("console.log('\u20ac'.repeat(100000))").ok().stdout == "\u20ac" * 100000 + "\n"


def test_js_silent(js):
    before = js.run("1").reply["execution_count"]
    quiet = js.run("globalThis.hush = 'quiet'; console.log('hidden'); 99", silent=True)
    assert quiet.reply["status"] == "ok" and quiet.messages == [], quiet.describe()
    failed = js.run("null.x", silent=True)
    assert failed.reply["status"] == "error" and failed.messages == [], failed.describe()
    after = js.run("hush").ok()
    assert after.text == "'quiet'" and after.reply["execution_count"] == before + 1, after.describe()


def test_js_interrupt(js):
    js.run("let survivor = 'kept'").ok()
    busy, took = js.interrupted("console.log('spinning'); while (true) {}", "spinning")
    busy.error("KeyboardInterrupt")
    assert took < PROMPTLY and busy.stderr == "", (took, busy.describe())
    waiting, took = js.interrupted("console.log('waiting'); await new Promise(() => {})", "waiting")
    waiting.error("KeyboardInterrupt")
    assert took < PROMPTLY and waiting.stderr == "", (took, waiting.describe())
    assert js.run("survivor").ok().text == "'kept'"
    js.manager.interrupt_kernel()  # between cells: nothing to stop
    time.sleep(0.5)
    assert js.run("survivor").ok().text == "'kept'"


def test_js_interrupt_while_printing(js):
    # An interrupt can stop JavaScript in the middle of writing output; printing must go on working.
    for _ in range(5):
        out, took = js.interrupted("let n = 0; while (true) { console.log(n++); }", "\n")
        out.error("KeyboardInterrupt")
        assert took < PROMPTLY, took
        assert js.run("console.log('after'); 'result'").ok().stdout == "after\n"


def test_js_child_processes_share_the_output(js):
    code = (
        "require('child_process').execSync(`node -e \"process.stdout.write('c'.repeat(300000))\"`, "
        "{stdio: 'inherit'});\n"
        "console.log('p'.repeat(300000))"
    )
    assert js.run(code).ok().stdout == "c" * 300000 + "p" * 300000 + "\n"


def test_js_busy_after_await_is_killed(js):
    js.run("let doomed = 1").ok()
    out, took = js.interrupted("await null; console.log('stuck'); while (true) {}", "stuck")
    out.error("KeyboardInterrupt", "killed")
    assert INTERRUPT_GRACE - 1 < took < INTERRUPT_GRACE + PROMPTLY, took
    assert js.run("typeof doomed").ok().text == "'undefined'"


def test_js_exit_restarts(js):
    js.run("let gone = 1").ok()
    js.run("console.log('bye'); process.exit(4)").error("ProcessExited", "status 4")
    assert js.run("typeof gone").ok().text == "'undefined'"


# both


def test_missing_interpreter_is_reported(_):
    kernel = Kernel("javascript", env={"PATH": "/nonexistent"})
    try:
        kernel.run("1").error("ProcessStartError", "node could not be started")
    finally:
        kernel.close()


def test_kernelspecs_are_found_on_jupyters_default_path(_):
    specs = KernelSpecManager().find_kernel_specs()
    assert specs.get("bash") == f"{KERNELS_DIR}/bash", specs
    assert specs.get("javascript") == f"{KERNELS_DIR}/javascript", specs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="run only the tests whose name contains this")
    args = parser.parse_args()
    tests = [(name, test) for name, test in globals().items() if name.startswith("test_") and args.k in name]
    kernels = {}
    failed = []
    try:
        for name, test in tests:
            kind = name.split("_")[1]
            if kind in ("bash", "js") and kind not in kernels:
                kernels[kind] = Kernel("bash" if kind == "bash" else "javascript")
            start = time.monotonic()
            try:
                test(kernels.get(kind))
            except Exception:
                failed.append(name)
                print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
            else:
                print(f"ok   {name} ({time.monotonic() - start:.1f} s)", flush=True)
    finally:
        for kernel in kernels.values():
            kernel.close()
    print(f"{len(tests) - len(failed)} passed, {len(failed)} failed")
    if not tests:
        print(f"no test matches -k {args.k!r}")
    return 1 if failed or not tests else 0


if __name__ == "__main__":
    sys.exit(main())
