"""nook's Jupyter kernel for JavaScript: one persistent Node.js process per kernel, running javascript_repl.js,
which evaluates the cells (see there for the semantics; process_kernel.py relays output, interrupts and restarts).

node's stdout and stderr are the cell's output streams; requests and replies travel on two more pipes, one JSON
object per line: {"code": ...} to node, and for each cell, after all its output, {"status": "ok", "data":
{mime type: value}} (data only when the cell has a value) or {"status": "error", "ename", "evalue", "traceback"}.
"""

import json
import os
import subprocess

from ipykernel.kernelapp import IPKernelApp

from process_kernel import Interpreter, ProcessKernel, pipe, spawn

REPL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "javascript_repl.js")


class JavaScriptKernel(ProcessKernel):
    implementation = "nook-javascript"
    language_info = {
        "name": "javascript",
        "mimetype": "application/javascript",
        "file_extension": ".js",
        "codemirror_mode": "javascript",
        "pygments_lexer": "javascript",
    }
    banner = "JavaScript: one persistent Node.js process per kernel (nook)"
    process_name = "node"

    def start_interpreter(self):
        requests_r, requests_w = pipe()
        replies_r, replies_w = pipe()
        stdout_r, stdout_w = pipe()
        stderr_r, stderr_w = pipe()
        process = spawn(
            ["node", REPL, str(requests_r), str(replies_w)],
            subprocess.DEVNULL,
            stdout_w,
            stderr_w,
            pass_fds=(requests_r, replies_w),
        )
        self.interpreter = Interpreter(process, requests_w, stdout_r, stderr_r, replies_r)

    def send_cell(self, code):
        self.write(json.dumps({"code": code}) + "\n")

    def parse_control(self, line, interrupted):
        return json.loads(line)


if __name__ == "__main__":
    IPKernelApp.launch_instance(kernel_class=JavaScriptKernel)
