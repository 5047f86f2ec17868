"""The official `e2b-code-interpreter` Python SDK, unmodified, against nook: real Jupyter kernels behind port 49999,
sync and async. Each test asserts what a data-analysis agent written for E2B relies on."""

import asyncio
import base64
from pathlib import Path

import pytest
from e2b import CommandExitException
from e2b.exceptions import NotFoundException, SandboxException, TimeoutException
from e2b_code_interpreter import AsyncSandbox, Sandbox


@pytest.fixture(scope="module")
def interpreter():
    sbx = Sandbox.create(timeout=600)
    yield sbx
    sbx.kill()


def test_state_persists_and_results_carry_their_types(interpreter):
    first = interpreter.run_code("x = 21\nprint('hello'); import sys; print('warn', file=sys.stderr)\nx * 2")
    assert first.error is None
    assert first.logs.stdout == ["hello\n"]
    assert first.logs.stderr == ["warn\n"]
    assert first.text == "42"
    assert first.execution_count >= 1

    # The kernel keeps its state between executions.
    second = interpreter.run_code("x + 1")
    assert second.text == "22"
    assert second.execution_count == first.execution_count + 1

    # Lists and dicts come back as JSON as well as text; HTML and LaTeX displays keep their formats.
    shaped = interpreter.run_code("{'a': [1, 2], 'b': 'c'}")
    assert shaped.results[0].json == {"a": [1, 2], "b": "c"}
    rich = interpreter.run_code(
        "from IPython.display import HTML, Latex, display\n"
        "display(HTML('<b>bold</b>'))\n"
        "display(Latex(r'$\\alpha$'))"
    )
    assert [result.html for result in rich.results][0] == "<b>bold</b>"
    assert rich.results[1].latex == "$\\alpha$"
    assert all(not result.is_main_result for result in rich.results)

    # A string's repr loses its quotes, as in E2B.
    assert interpreter.run_code("'abc'").text == "abc"

    # Callbacks see output as it is produced.
    seen = []
    interpreter.run_code(
        "import time\nfor i in range(3):\n    print(i, flush=True); time.sleep(0.1)",
        on_stdout=lambda message: seen.append(message.line),
    )
    assert seen == ["0\n", "1\n", "2\n"]


def test_matplotlib_figures_come_back_as_png(interpreter):
    execution = interpreter.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [3, 1, 2])\n"
        "plt.title('chart')\n"
        "plt.show()"
    )
    assert execution.error is None, execution.error
    pngs = [result.png for result in execution.results if result.png]
    assert len(pngs) == 1
    assert base64.b64decode(pngs[0]).startswith(b"\x89PNG\r\n\x1a\n")
    # The same result carries the chart as data.
    chart = execution.results[0].chart
    assert chart.type.value == "line" and chart.title == "chart"
    assert [(element.label, element.points) for element in chart.elements] == [("", [(1, 3), (2, 1), (3, 2)])]

    bars = interpreter.run_code("plt.bar(['a', 'b'], [4, 5], label='sales')\nplt.show()").results[0].chart
    assert bars.type.value == "bar"
    assert [(bar.label, bar.group, bar.value) for bar in bars.elements] == [("a", "sales", 4), ("b", "sales", 5)]
    pie = interpreter.run_code("plt.pie([1, 3], labels=['one', 'three'])\nplt.show()").results[0].chart
    assert [(wedge.label, wedge.angle) for wedge in pie.elements] == [("one", 90), ("three", 270)]


def test_pandas_frames_come_back_as_data_and_html(interpreter):
    execution = interpreter.run_code("import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})")
    result = execution.results[0]
    assert result.is_main_result
    assert "<table" in result.html
    assert result.data == {"a": [1, 2], "b": ["x", "y"]}


def test_errors_carry_name_value_and_traceback(interpreter):
    execution = interpreter.run_code("def f():\n    return 1 / 0\nf()")
    assert execution.error.name == "ZeroDivisionError"
    assert execution.error.value == "division by zero"
    assert "return 1 / 0" in execution.error.traceback
    assert "\x1b[" not in execution.error.traceback  # plain text, no terminal colours

    syntax = interpreter.run_code("def broken(:")
    assert syntax.error.name == "SyntaxError"

    errors = []
    interpreter.run_code("raise ValueError('told you')", on_error=errors.append)
    assert [(error.name, error.value) for error in errors] == [("ValueError", "told you")]

    # The kernel survives its errors.
    assert interpreter.run_code("1 + 1").text == "2"


def test_env_vars_apply_to_one_execution(interpreter):
    execution = interpreter.run_code("import os\nprint(os.environ['SECRET_X'])", envs={"SECRET_X": "it's \"quoted\""})
    assert execution.logs.stdout == ["it's \"quoted\"\n"]
    assert interpreter.run_code("import os\nos.environ.get('SECRET_X', 'unset')").text == "unset"
    bash = interpreter.run_code("echo \"$GREETING\"", language="bash", envs={"GREETING": "hi; there"})
    assert bash.logs.stdout == ["hi; there\n"]
    # A name that is not an identifier is refused (400), never run as shell code.
    for name in ("X=1; touch /tmp/ran; Y", "X; touch /tmp/ran", "$(touch /tmp/ran)"):
        with pytest.raises(SandboxException, match="400.*not an environment variable name"):
            interpreter.run_code("true", language="bash", envs={name: "1"})
    assert not interpreter.files.exists("/tmp/ran")


def test_contexts_are_separate_kernels(interpreter):
    context = interpreter.create_code_context(cwd="/tmp")
    assert context.language == "python" and context.cwd == "/tmp"
    assert interpreter.run_code("import os\nos.getcwd()", context=context).text == "/tmp"
    interpreter.run_code("only_here = 5", context=context)
    assert interpreter.run_code("only_here", context=context).text == "5"
    # The default context does not see another context's variables.
    assert interpreter.run_code("only_here").error.name == "NameError"

    listed = interpreter.list_code_contexts()
    assert context.id in [item.id for item in listed]
    assert any(item.language == "python" and item.id != context.id for item in listed)

    interpreter.restart_code_context(context)
    assert interpreter.run_code("only_here", context=context).error.name == "NameError"

    interpreter.remove_code_context(context)
    assert context.id not in [item.id for item in interpreter.list_code_contexts()]
    with pytest.raises(NotFoundException):
        interpreter.run_code("1", context=context)

    with pytest.raises(SandboxException, match="cobol"):
        interpreter.run_code("DISPLAY 'HI'", language="cobol")


def test_javascript_and_bash_kernels(interpreter):
    js = interpreter.run_code("const xs = [1, 2, 3]\nconsole.log('from node')\nxs.map((x) => x * 2)", language="js")
    assert js.error is None, js.error
    assert js.logs.stdout == ["from node\n"]
    assert js.results[0].json == [2, 4, 6]
    # State persists in the language's default context; top-level await works.
    assert interpreter.run_code("xs.length", language="javascript").text == "3"
    assert interpreter.run_code("await Promise.resolve(7)", language="js").text == "7"
    assert interpreter.run_code("null.x", language="js").error.name == "TypeError"
    assert interpreter.run_code("process.env.FROM_ENVS", language="js", envs={"FROM_ENVS": "yes"}).text == "yes"

    shell = interpreter.run_code("cd /tmp && X=5\necho $X; pwd", language="bash")
    assert "".join(shell.logs.stdout) == "5\n/tmp\n"
    assert "".join(interpreter.run_code("echo $X $(pwd)", language="bash").logs.stdout) == "5 /tmp\n"
    failed = interpreter.run_code("false", language="bash")
    assert failed.error.name == "CommandExitError"
    assert "".join(interpreter.run_code("echo $V", language="bash", envs={"V": "a b"}).logs.stdout) == "a b\n"
    assert "".join(interpreter.run_code("echo ${V:-unset}", language="bash").logs.stdout) == "unset\n"

    context = interpreter.create_code_context(language="bash", cwd="/etc")
    assert context.language == "bash"
    assert "".join(interpreter.run_code("pwd", context=context).logs.stdout) == "/etc\n"
    interpreter.remove_code_context(context)


def test_r_kernel(interpreter):
    """Debian's IRkernel (installed as `ir`) answers E2B's `r`."""
    first = interpreter.run_code("xs <- c(1, 2, 3)\ncat('from R\\n')\nsum(xs)", language="r")
    assert first.error is None, first.error
    assert first.logs.stdout == ["from R\n"]
    # IRkernel shows values as display data, not as the cell's execute result: E2B's `text` (the main result's) is
    # empty, as it is on E2B.
    assert [result.text for result in first.results] == ["[1] 6"]

    def value(code, **options):
        return interpreter.run_code(code, language="r", **options).results[-1].text

    assert value("length(xs)") == "[1] 3"
    assert value("Sys.getenv('FROM_ENVS')", envs={"FROM_ENVS": "yes"}) == '[1] "yes"'
    assert value("Sys.getenv('FROM_ENVS')") == '[1] ""'
    failed = interpreter.run_code("stop('no good')", language="r")
    assert failed.error is not None and "no good" in failed.error.value, failed.error
    # The module's sandbox has 512 MiB for all its kernels: the R one goes once tested.
    for context in interpreter.list_code_contexts():
        if context.language == "r":
            interpreter.remove_code_context(context)


def test_the_kernels_own_suite_passes_inside_a_sandbox(interpreter):
    """images/base/test_kernels.py drives the bash and JavaScript kernels over jupyter_client message by message
    (interrupts, silent cells, restarts); it runs where the kernels are installed: in a sandbox of the base image."""
    suite = Path(__file__).resolve().parents[2] / "images/base/test_kernels.py"
    interpreter.files.write("/tmp/test_kernels.py", suite.read_text())
    try:
        result = interpreter.commands.run("python3 /tmp/test_kernels.py", user="root", timeout=600)
    except CommandExitException as failed:
        raise AssertionError(f"the kernels' suite failed:\n{failed.stdout}") from None
    assert result.stdout.rstrip().endswith(" passed, 0 failed"), result.stdout


def test_an_execution_that_times_out_is_interrupted(interpreter):
    with pytest.raises(TimeoutException):
        interpreter.run_code("import time\ntime.sleep(60)", timeout=2)
    # The kernel was interrupted when the client went away, so it is free again at once.
    assert interpreter.run_code("'free'", timeout=30).text == "free"


def test_files_and_commands_see_what_the_code_wrote(interpreter):
    interpreter.run_code("open('/home/user/from_kernel.txt', 'w').write('kernel data')")
    assert interpreter.files.read("/home/user/from_kernel.txt") == "kernel data"
    assert interpreter.commands.run("cat /home/user/from_kernel.txt").stdout == "kernel data"


def test_async_sdk_runs_code():
    async def scenario():
        sbx = await AsyncSandbox.create(timeout=300)
        try:
            await sbx.run_code("counter = 10")
            execution = await sbx.run_code("counter += 5\ncounter")
            assert execution.text == "15"
            context = await sbx.create_code_context()
            assert (await sbx.run_code("counter", context=context)).error.name == "NameError"
            await sbx.remove_code_context(context)
        finally:
            await sbx.kill()

    asyncio.run(scenario())
