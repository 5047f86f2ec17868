"""What nook's wrapper kernels (bash_kernel.py, javascript_kernel.py) share: a Jupyter kernel that drives one
long-lived interpreter process and relays each cell's output while the cell runs.

Each kernel subclasses ipykernel's `Kernel` (Jupyter's "wrapper kernel" pattern): the base class handles the
messaging (execute_input, busy/idle status, the execution count, replies); `do_execute` here hands the cell to the
interpreter and relays what comes back over three pipes:

- the interpreter's stdout and stderr: whatever arrives is published at once as a `stream` message;
- a control pipe, with one line per finished cell, in the subclass's format (bash: number and exit status; node: a
  JSON reply). Everything the cell wrote is in the stdout and stderr pipes before that line is, so exactly the bytes
  pending there (FIONREAD) are read out before the reply goes. Output that background jobs write later is published
  during the next execution.

Interrupts: jupyter_client sends SIGINT to the kernel's whole process group, and the interpreter is in that group,
so it gets the signal itself (bash abandons the cell, node stops the script). The kernel only notes the time. If the
cell has not ended INTERRUPT_REPEAT seconds later, the kernel sends the group SIGINT once more: a command that was
being started when the first came can miss it (between fork and exec it still runs the shell's handler). If the cell
has not ended INTERRUPT_GRACE seconds after the interrupt (a command that ignores SIGINT, a loop node cannot break),
the interpreter is killed, the cell fails, and the next execution starts a fresh one (its state is lost).

The interpreter starts with the first execution, while do_execute's own SIGINT handler is installed: outside
handlers ipykernel ignores SIGINT, and an ignored signal would stay ignored in the interpreter and its commands.
If the interpreter exits (bash's `exit`, node's `process.exit()`), the cell fails the same way.

Silent executions publish nothing; their reply still says whether they failed.
"""

import codecs
import fcntl
import os
import select
import signal
import subprocess
import termios
import time

from ipykernel.kernelbase import Kernel

# Seconds after an interrupt at which the kernel repeats it, and at which it kills the interpreter.
INTERRUPT_REPEAT = 1
INTERRUPT_GRACE = 5
# Seconds between checks that the interpreter is still alive while a cell runs.
LIVENESS_CHECK = 1


def error_reply(ename, evalue):
    return {"status": "error", "ename": ename, "evalue": evalue, "traceback": [f"{ename}: {evalue}"]}


class Interpreter:
    """A running interpreter: the process and the kernel's ends of its pipes (file descriptors)."""

    def __init__(self, process, stdin, stdout, stderr, control):
        self.process = process
        self.stdin = stdin
        self.streams = {stdout: "stdout", stderr: "stderr"}
        self.decoders = {fd: codecs.getincrementaldecoder("utf-8")("replace") for fd in self.streams}
        self.control = control

    def close(self):
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        for fd in (self.stdin, self.control, *self.streams):
            os.close(fd)


class ProcessKernel(Kernel):
    implementation = "nook"
    implementation_version = "1.0"
    # The interpreter's name in error messages.
    process_name = ""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.interpreter = None

    def start_interpreter(self):
        """Starts the interpreter and sets self.interpreter."""
        raise NotImplementedError

    def send_cell(self, code):
        """Writes the request that runs `code` to self.interpreter.stdin (with self.write)."""
        raise NotImplementedError

    def parse_control(self, line, interrupted):
        """The reply content for a control line, or None when the line is not about the current cell."""
        raise NotImplementedError

    def write(self, text):
        data = text.encode()
        while data:
            data = data[os.write(self.interpreter.stdin, data):]

    def do_execute(self, code, silent, store_history=True, user_expressions=None, allow_stdin=False):
        interrupts = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupts.append(time.monotonic()))
        try:
            reply = self.run_cell(code, silent, interrupts)
        finally:
            signal.signal(signal.SIGINT, previous)
        data = reply.pop("data", None)
        if data and not silent:
            self.send_response(
                self.iopub_socket,
                "execute_result",
                {"execution_count": self.execution_count, "data": data, "metadata": {}},
            )
        if reply["status"] == "error" and not silent:
            self.send_response(self.iopub_socket, "error", {k: reply[k] for k in ("ename", "evalue", "traceback")})
        return {**reply, "execution_count": self.execution_count, "payload": [], "user_expressions": {}}

    def run_cell(self, code, silent, interrupts):
        if self.interpreter is None:
            try:
                self.start_interpreter()
            except OSError as error:
                return error_reply("ProcessStartError", f"{self.process_name} could not be started: {error}")
        try:
            self.send_cell(code)
        except BrokenPipeError:
            pass  # it has exited: relay() finds out and says so
        return self.relay(silent, interrupts)

    def relay(self, silent, interrupts):
        """Publishes the cell's output until its control line comes; returns the reply content."""
        interpreter = self.interpreter
        watched = [*interpreter.streams, interpreter.control]
        pending = b""
        repeated = False
        while True:
            timeout = LIVENESS_CHECK
            if interrupts:
                since = time.monotonic() - interrupts[0]
                if since >= INTERRUPT_GRACE:
                    self.publish_pending(silent)
                    self.stop_interpreter()
                    return error_reply(
                        "KeyboardInterrupt",
                        f"{self.process_name} did not stop within {INTERRUPT_GRACE} s of the interrupt, so it was "
                        f"killed; the next execution starts a new {self.process_name} (the state is lost)",
                    )
                if since >= INTERRUPT_REPEAT and not repeated:
                    repeated = True
                    if os.getpgrp() == os.getpid():  # a process group of its own, as jupyter_client starts kernels
                        os.killpg(os.getpgrp(), signal.SIGINT)
                timeout = min(timeout, (INTERRUPT_GRACE if repeated else INTERRUPT_REPEAT) - since)
            ready, _, _ = select.select(watched, [], [], timeout)
            for fd in interpreter.streams:
                if fd in ready and not self.publish(fd, os.read(fd, 65536), silent):
                    watched.remove(fd)  # closed by the cell (`exec >&-`); it is watched again next time
            chunk = os.read(interpreter.control, 65536) if interpreter.control in ready else b""
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                reply = self.parse_control(line.decode(errors="replace"), bool(interrupts))
                if reply is not None:
                    self.publish_pending(silent)
                    return reply
            if (interpreter.control in ready and not chunk) or interpreter.process.poll() is not None:
                status = interpreter.process.wait()
                self.publish_pending(silent)
                self.stop_interpreter()
                how = f"was killed by signal {-status}" if status < 0 else f"exited with status {status}"
                return error_reply(
                    "ProcessExited",
                    f"{self.process_name} {how}; the next execution starts a new {self.process_name} "
                    "(the state is lost)",
                )

    def publish(self, fd, data, silent):
        """Publishes output read from `fd`; returns False at its end."""
        text = self.interpreter.decoders[fd].decode(data, final=not data)
        if text and not silent:
            self.send_response(self.iopub_socket, "stream", {"name": self.interpreter.streams[fd], "text": text})
        return bool(data)

    def publish_pending(self, silent):
        """Publishes exactly what is in the stdout and stderr pipes now, without waiting for more."""
        for fd in self.interpreter.streams:
            size = int.from_bytes(fcntl.ioctl(fd, termios.FIONREAD, bytes(4)), "little")
            while size > 0:
                data = os.read(fd, size)
                self.publish(fd, data, silent)
                size -= len(data)

    def stop_interpreter(self):
        if self.interpreter is not None:
            self.interpreter.close()
            self.interpreter = None

    def do_shutdown(self, restart):
        self.stop_interpreter()
        return super().do_shutdown(restart)


def pipe(low=0):
    """A pipe (read end, write end); with `low`, the write end is at `low` or above, clear of the numbers scripts
    pick themselves (`exec 3>file`)."""
    read, write = os.pipe()
    if low:
        moved = fcntl.fcntl(write, fcntl.F_DUPFD_CLOEXEC, low)
        os.close(write)
        write = moved
    return read, write


def spawn(argv, stdin, stdout, stderr, pass_fds=()):
    """Starts `argv` with the given child ends of its pipes, and closes them here."""
    try:
        return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, pass_fds=pass_fds)
    finally:
        for fd in {stdin, stdout, stderr, *pass_fds} - {subprocess.DEVNULL}:
            os.close(fd)
