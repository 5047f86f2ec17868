"""nook's code-interpreter bridge: runs inside a sandbox and drives real Jupyter kernels for nook's E2B layer.

nook starts this program once per sandbox (as a background process, over its agent) and talks to it through
standard input and output, one JSON object per line. Requests carry an integer "id"; every reply line carries the
id of the request it answers. The kernels are started and driven with jupyter_client (the Jupyter messaging
protocol over ZeroMQ); nothing here evaluates code itself.

Requests (field "op"):
  create  {language, cwd}            -> {"id", "ok": context}   context = {"id", "language", "cwd"}
  list    {}                         -> {"id", "ok": [context, ...]}
  restart {context_id}               -> {"id", "ok": null}
  remove  {context_id}               -> {"id", "ok": null}
  execute {context_id | language, code, env_vars}
                                     -> {"id", "accepted": true}, then {"id", "line": {...}} for each line of E2B's
                                        /execute stream (number_of_executions, stdout, stderr, result, error), then
                                        {"id", "done": true}
  interrupt {target}                 -> (nothing) interrupts execution `target` if it runs, drops it if it waits
A request that fails before it starts is answered {"id", "error": {"status": HTTP status, "message": text}}.
At start the bridge prints {"ready": true} once the default Python context is up, or {"fatal": text} and exits.

The protocol channel is a private duplicate of the original standard output: file descriptor 1 itself is pointed
at /dev/null, so nothing the kernels or libraries print can corrupt it.
"""

import asyncio
import json
import os
import shlex
import sys
import typing
import uuid

DEFAULT_CWD = "/home/user"
# Largest request line accepted (code and env vars of one execution).
MAX_LINE = 64 << 20
KERNEL_START_TIMEOUT = 60


class Statements(typing.NamedTuple):
    """Code in one kernel language that sets and unsets an environment variable (per-execution env vars) and enters
    a directory (a context's cwd)."""

    set_env: typing.Callable[[str, str], str]
    unset_env: typing.Callable[[str], str]
    chdir: typing.Callable[[str], str]


LANGUAGES = {
    "python": Statements(
        lambda k, v: f"__import__('os').environ[{json.dumps(k)}] = {json.dumps(v)}",
        lambda k: f"__import__('os').environ.pop({json.dumps(k)}, None)",
        lambda cwd: f"__import__('os').chdir({json.dumps(cwd)})",
    ),
    "javascript": Statements(
        lambda k, v: f"process.env[{json.dumps(k)}] = {json.dumps(v)};",
        lambda k: f"delete process.env[{json.dumps(k)}];",
        lambda cwd: f"process.chdir({json.dumps(cwd)});",
    ),
    # Names are identifiers: nook's /execute handler refuses others before they get here.
    "bash": Statements(
        lambda k, v: f"export {k}={shlex.quote(v)}",
        lambda k: f"unset {k}",
        lambda cwd: f"cd {shlex.quote(cwd)}",
    ),
    "r": Statements(
        lambda k, v: f"Sys.setenv({json.dumps(k)} = {json.dumps(v)})",
        lambda k: f"Sys.unsetenv({json.dumps(k)})",
        lambda cwd: f"setwd({json.dumps(cwd)})",
    ),
}
LANGUAGES["typescript"] = LANGUAGES["javascript"]


def default_cwd():
    """The user's home, as in E2B's template; `/` in an image without it."""
    return DEFAULT_CWD if os.path.isdir(DEFAULT_CWD) else "/"


# Run once in every Python kernel: plain colours in tracebacks, no truncated reprs, JSON results for lists and
# dicts, and E2B's `e2b/data` form of pandas DataFrames.
PYTHON_SETUP = r"""
def __nook_setup():
    import json
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode
    ip = get_ipython()
    ip.run_line_magic("colors", "NoColor")
    formatters = ip.display_formatter.formatters
    formatters["text/plain"].max_seq_length = 0

    def as_json(value):
        try:
            return json.loads(json.dumps(value))
        except (TypeError, ValueError):
            return None

    formatters["application/json"].for_type(list, as_json)
    formatters["application/json"].for_type(dict, as_json)

    class DataFormatter(BaseFormatter):
        format_type = Unicode("e2b/data")
        print_method = ObjectName("_repr_e2b_data_")
        _return_type = (dict,)

    def frame_columns(frame):
        split = json.loads(frame.to_json(orient="split", date_format="iso"))
        return {str(name): [row[i] for row in split["data"]] for i, name in enumerate(split["columns"])}

    data = DataFormatter(parent=ip.display_formatter)
    data.for_type_by_name("pandas.core.frame", "DataFrame", frame_columns)
    formatters["e2b/data"] = data

    # Matches figures by class name rather than through the type registry: matplotlib's inline backend removes
    # every formatter's Figure entry when it activates. (Bound here: in a class body the name would be mangled.)
    figure_chart = __nook_figure_chart

    class ChartFormatter(BaseFormatter):
        format_type = Unicode("e2b/chart")
        _return_type = (dict,)

        def __call__(self, obj):
            is_figure = any(
                cls.__module__ == "matplotlib.figure" and cls.__name__ == "Figure" for cls in type(obj).__mro__
            )
            return figure_chart(obj) if self.enabled and is_figure else None

    formatters["e2b/chart"] = ChartFormatter(parent=ip.display_formatter)

__nook_setup()
del __nook_setup, __nook_figure_chart
"""

# E2B's `chart` result: what a matplotlib figure shows, as data (the shapes of the SDKs' Chart classes). Line,
# scatter, bar and pie axes are read back from the artists matplotlib drew; a figure with several axes is a
# "superchart"; anything else is left out (the figure still comes back as PNG).
CHART_SETUP = r"""
def __nook_figure_chart(figure):
    def number(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            return str(value)

    def tick_labels(labels):
        return [label.get_text() for label in labels]

    def text_or_none(text):
        return text or None

    def label_of(artist):
        label = artist.get_label()
        return "" if label.startswith("_") else label  # matplotlib names unlabelled artists "_child0" and so on

    def axes_2d(ax, kind):
        return {
            "type": kind,
            "title": text_or_none(ax.get_title()),
            "x_label": text_or_none(ax.get_xlabel()),
            "y_label": text_or_none(ax.get_ylabel()),
            "x_unit": None,
            "y_unit": None,
        }

    def point_chart(ax, kind, elements):
        chart = axes_2d(ax, kind)
        chart.update(
            x_ticks=[number(t) for t in ax.get_xticks()],
            x_tick_labels=tick_labels(ax.get_xticklabels()),
            x_scale=ax.get_xscale(),
            y_ticks=[number(t) for t in ax.get_yticks()],
            y_tick_labels=tick_labels(ax.get_yticklabels()),
            y_scale=ax.get_yscale(),
            elements=elements,
        )
        return chart

    def axes_chart(ax):
        from matplotlib.collections import PathCollection
        from matplotlib.container import BarContainer
        from matplotlib.patches import Wedge

        wedges = [patch for patch in ax.patches if isinstance(patch, Wedge)]
        if wedges and len(wedges) == len(ax.patches):
            return {
                "type": "pie",
                "title": text_or_none(ax.get_title()),
                "elements": [
                    {"label": w.get_label(), "angle": abs(w.theta2 - w.theta1), "radius": float(w.r)} for w in wedges
                ],
            }
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        if bars:
            positions = {round(float(t), 6): label for t, label in zip(ax.get_xticks(), tick_labels(ax.get_xticklabels()))}
            elements = []
            for index, container in enumerate(bars):
                group = container.get_label()
                if not group or group.startswith("_"):
                    group = f"Group {index}"
                for rect in container.patches:
                    center = round(rect.get_x() + rect.get_width() / 2, 6)
                    elements.append(
                        {"label": positions.get(center, str(center)), "group": group, "value": float(rect.get_height())}
                    )
            chart = axes_2d(ax, "bar")
            chart["elements"] = elements
            return chart
        scatters = [c for c in ax.collections if isinstance(c, PathCollection)]
        lines = [line for line in ax.get_lines() if len(line.get_xdata()) > 0]
        if scatters and not lines:
            return point_chart(
                ax,
                "scatter",
                [
                    {"label": label_of(c), "points": [[number(x), number(y)] for x, y in c.get_offsets()]}
                    for c in scatters
                ],
            )
        if lines:
            return point_chart(
                ax,
                "line",
                [
                    {"label": label_of(line), "points": [[number(x), number(y)] for x, y in zip(*line.get_data())]}
                    for line in lines
                ],
            )
        return None

    try:
        charts = [chart for chart in (axes_chart(ax) for ax in figure.axes) if chart is not None]
        if len(figure.axes) == 1:
            return charts[0] if charts else None
        if not charts:
            return None
        title = figure._suptitle.get_text() if getattr(figure, "_suptitle", None) else None
        return {"type": "superchart", "title": title, "elements": charts}
    except Exception:
        return None
"""

# Jupyter MIME types and the E2B result fields they become.
MIME_FIELDS = {
    "text/plain": "text",
    "text/html": "html",
    "text/markdown": "markdown",
    "image/svg+xml": "svg",
    "image/png": "png",
    "image/jpeg": "jpeg",
    "application/pdf": "pdf",
    "text/latex": "latex",
    "application/json": "json",
    "application/javascript": "javascript",
    "e2b/data": "data",
    "e2b/chart": "chart",
}


def normalise_language(language):
    language = (language or "").strip().lower()
    if not language:
        return "python"
    return {"js": "javascript", "ts": "typescript"}.get(language, language)


# Kernel names to try for a language, in order; a language not listed is its own kernel name.
KERNEL_CANDIDATES = {
    "python": ["python3"],
    "typescript": ["javascript"],
    "r": ["r", "ir"],  # E2B's images name IRkernel "r"; Debian's r-cran-irkernel installs it as "ir"
}


def kernel_name(language):
    """The installed Jupyter kernel that runs a language (the first candidate if none is installed)."""
    from jupyter_client.kernelspec import KernelSpecManager

    candidates = KERNEL_CANDIDATES.get(language, [language])
    installed = KernelSpecManager().find_kernel_specs()
    return next((name for name in candidates if name in installed), candidates[0])


def result_line(content, main):
    line = {"type": "result"}
    extra = {}
    for mime, value in content.get("data", {}).items():
        field = MIME_FIELDS.get(mime)
        if field is None:
            extra[mime] = value
            continue
        if field == "text" and len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        line[field] = value
    line["extra"] = extra
    line["is_main_result"] = main
    return line


def timestamp(message):
    date = message.get("header", {}).get("date")
    return date.isoformat() if hasattr(date, "isoformat") else str(date or "")


class Failure(Exception):
    """A request that cannot be served, with the HTTP status nook answers."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status
        self.message = message


class Context:
    """One kernel: executions run one at a time, in arrival order."""

    def __init__(self, language, cwd):
        self.id = str(uuid.uuid4())
        self.language = language
        self.cwd = cwd
        self.lock = asyncio.Lock()
        self.manager = None
        self.client = None

    def describe(self):
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    async def start(self):
        from jupyter_client.manager import AsyncKernelManager
        from jupyter_client.kernelspec import NoSuchKernel

        self.manager = AsyncKernelManager(kernel_name=kernel_name(self.language))
        try:
            await self.manager.start_kernel(cwd=default_cwd())
        except NoSuchKernel:
            raise Failure(500, f"Failed to create context: no Jupyter kernel for {self.language!r} is installed")
        self.client = self.manager.client()
        self.client.start_channels()
        try:
            await self.client.wait_for_ready(timeout=KERNEL_START_TIMEOUT)
        except RuntimeError as error:
            await self.shutdown()
            raise Failure(500, f"Failed to create context: the {self.language} kernel did not start: {error}")
        error = await self.prepare()
        if error:
            await self.shutdown()
            raise Failure(500, f"Failed to set working directory {self.cwd!r}: {error}")

    async def prepare(self):
        """Runs the language's setup and enters the context's directory; returns the error text, if any."""
        if self.language == "python":
            error = await self.run_silently(CHART_SETUP + PYTHON_SETUP)
            if error:
                print(f"nook's Python kernel setup failed: {error}", file=sys.stderr, flush=True)
        statements = LANGUAGES.get(self.language)
        if statements and self.cwd:
            return await self.run_silently(statements.chdir(self.cwd))
        return None

    async def restart(self):
        await self.manager.restart_kernel(now=True)
        self.client.stop_channels()
        self.client = self.manager.client()
        self.client.start_channels()
        await self.client.wait_for_ready(timeout=KERNEL_START_TIMEOUT)
        await self.prepare()

    async def shutdown(self):
        if self.client is not None:
            self.client.stop_channels()
        if self.manager is not None and self.manager.has_kernel:
            await self.manager.shutdown_kernel(now=True)

    async def run_silently(self, code):
        """Runs setup code; returns the error text, if any."""
        msg_id = self.client.execute(code, silent=True, store_history=False, allow_stdin=False, stop_on_error=False)
        reply = await self.reply_to(msg_id)
        if reply["content"].get("status") == "error":
            content = reply["content"]
            return f"{content.get('ename')}: {content.get('evalue')}"
        return None

    async def reply_to(self, msg_id):
        while True:
            reply = await self.client.get_shell_msg(timeout=None)
            if reply.get("parent_header", {}).get("msg_id") == msg_id:
                return reply

    async def execute(self, code, env_vars, emit):
        """Runs user code, calling emit(line) for each E2B output line."""
        statements = LANGUAGES.get(self.language)
        if env_vars and statements:
            await self.run_silently("\n".join(statements.set_env(k, v) for k, v in env_vars.items()))
        try:
            await self.execute_cell(code, emit)
        finally:
            if env_vars and statements:
                await self.run_silently("\n".join(statements.unset_env(k) for k in env_vars))

    async def execute_cell(self, code, emit):
        client = self.client
        # Requests go one at a time, so there is never a queue to abort; with stop_on_error the kernel would abort
        # whatever arrives just after an error instead (the env cleanup, the next cell).
        msg_id = client.execute(code, silent=False, store_history=True, allow_stdin=False, stop_on_error=False)
        reply_task = asyncio.ensure_future(self.reply_to(msg_id))
        errored = False
        idle = False
        try:
            while not idle:
                try:
                    message = await client.get_iopub_msg(timeout=1)
                except Exception:  # queue.Empty: check the kernel is still there
                    if not await self.manager.is_alive():
                        emit({"type": "error", "name": "KernelDied",
                              "value": "the kernel died during the execution; it was restarted",
                              "traceback": ""})
                        reply_task.cancel()
                        await self.restart()
                        return
                    continue
                if message.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind = message["msg_type"]
                content = message["content"]
                if kind == "execute_input":
                    emit({"type": "number_of_executions", "execution_count": content.get("execution_count")})
                elif kind == "stream":
                    name = "stderr" if content.get("name") == "stderr" else "stdout"
                    emit({"type": name, "text": content.get("text", ""), "timestamp": timestamp(message)})
                elif kind == "execute_result":
                    emit(result_line(content, True))
                elif kind == "display_data":
                    emit(result_line(content, False))
                elif kind == "error" and not errored:
                    errored = True
                    emit({"type": "error", "name": content.get("ename", ""), "value": content.get("evalue", ""),
                          "traceback": "\n".join(content.get("traceback", []))})
                elif kind == "status" and content.get("execution_state") == "idle":
                    idle = True
            reply = await reply_task
            status = reply["content"].get("status")
            if status == "error" and not errored:
                content = reply["content"]
                emit({"type": "error", "name": content.get("ename", ""), "value": content.get("evalue", ""),
                      "traceback": "\n".join(content.get("traceback", []))})
            elif status == "aborted":
                emit({"type": "error", "name": "ExecutionAborted", "value": "Execution was aborted",
                      "traceback": ""})
        finally:
            if not reply_task.done():
                reply_task.cancel()


class Bridge:
    def __init__(self, channel):
        self.channel = channel
        self.contexts = {}
        self.defaults = {}
        self.default_locks = {}
        self.executions = {}

    def send(self, message):
        self.channel.write(json.dumps(message, separators=(",", ":")) + "\n")
        self.channel.flush()

    async def create(self, language, cwd):
        context = Context(normalise_language(language), cwd or default_cwd())
        await context.start()
        self.contexts[context.id] = context
        return context

    async def default_context(self, language):
        language = normalise_language(language)
        lock = self.default_locks.setdefault(language, asyncio.Lock())
        async with lock:
            context = self.defaults.get(language)
            if context is None or context.id not in self.contexts:
                context = await self.create(language, default_cwd())
                self.defaults[language] = context
            return context

    def context(self, context_id):
        context = self.contexts.get(context_id)
        if context is None:
            raise Failure(404, f"Context {context_id} not found")
        return context

    async def handle(self, request):
        request_id = request.get("id")
        try:
            op = request.get("op")
            if op == "create":
                context = await self.create(request.get("language"), request.get("cwd"))
                self.send({"id": request_id, "ok": context.describe()})
            elif op == "list":
                self.send({"id": request_id, "ok": [c.describe() for c in self.contexts.values()]})
            elif op == "restart":
                context = self.context(request.get("context_id"))
                async with context.lock:
                    await context.restart()
                self.send({"id": request_id, "ok": None})
            elif op == "remove":
                context = self.context(request.get("context_id"))
                del self.contexts[context.id]
                await context.shutdown()
                self.send({"id": request_id, "ok": None})
            elif op == "execute":
                await self.execute(request_id, request)
            elif op == "interrupt":
                await self.interrupt(request.get("target"))
            else:
                raise Failure(400, f"unknown operation {op!r}")
        except Failure as failure:
            self.send({"id": request_id, "error": {"status": failure.status, "message": failure.message}})
        except Exception as error:  # report, never die: other requests go on
            self.send({"id": request_id, "error": {"status": 500, "message": f"{type(error).__name__}: {error}"}})

    async def execute(self, request_id, request):
        context_id = request.get("context_id")
        if context_id:
            context = self.context(context_id)
        else:
            context = await self.default_context(request.get("language"))
        env_vars = request.get("env_vars") or {}
        self.send({"id": request_id, "accepted": True})
        task = asyncio.current_task()
        self.executions[request_id] = (context, task)
        running = False
        try:
            async with context.lock:
                running = True
                self.executions[request_id] = (context, None)
                await context.execute(request.get("code", ""), env_vars,
                                      lambda line: self.send({"id": request_id, "line": line}))
        except asyncio.CancelledError:
            if running:
                raise
        finally:
            self.executions.pop(request_id, None)
            self.send({"id": request_id, "done": True})

    async def interrupt(self, target):
        entry = self.executions.get(target)
        if entry is None:
            return
        context, waiting = entry
        if waiting is not None:
            waiting.cancel()
        else:
            await context.manager.interrupt_kernel()


async def main(channel):
    # ipykernel's debugger warns on every kernel start about frozen modules; the warning is noise here.
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    bridge = Bridge(channel)
    try:
        import jupyter_client  # noqa: F401
    except ImportError:
        bridge.send({"fatal": "this sandbox's image has no Jupyter client: install python3-jupyter-client and "
                              "python3-ipykernel (ipykernel and jupyter_client from PyPI) to run code"})
        return
    try:
        await bridge.default_context("python")
    except Failure as failure:
        bridge.send({"fatal": failure.message})
        return
    bridge.send({"ready": True})

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_LINE)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks = set()
    while True:
        line = await reader.readline()
        if not line:
            break
        try:
            request = json.loads(line)
        except ValueError:
            bridge.send({"id": None, "error": {"status": 400, "message": "a request line is not JSON"}})
            continue
        task = asyncio.ensure_future(bridge.handle(request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    for context in list(bridge.contexts.values()):
        await context.shutdown()


if __name__ == "__main__":
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = open(os.devnull, "w")
    asyncio.run(main(channel))
