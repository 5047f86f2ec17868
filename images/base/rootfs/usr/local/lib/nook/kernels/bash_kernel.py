"""nook's Jupyter kernel for bash: one persistent bash process per kernel (see process_kernel.py for the relay of
output, interrupts and restarts).

- bash runs as `bash --noprofile --norc --noediting -i`. Interactive, because only an interactive shell answers
  SIGINT by abandoning the running command and reading the next one; a non-interactive shell would exit and lose
  its state. With no terminal bash has no job control, so its commands stay in the kernel's process group and
  receive jupyter_client's SIGINT themselves (background jobs ignore it, as without job control they should).
- Each cell is one command on bash's standard input, with the cell's text as a quoted here-document that
  `source` reads from /dev/stdin:

      __nook_cell=7; builtin source /dev/stdin 2>&62 62>&- 63>&- <<'NOOK_END_<random hex>'
      <the cell>
      NOOK_END_<random hex>

  so any text (unbalanced quotes, here-documents of its own, syntax errors) stays inside the cell, and `source`
  runs it in the shell itself: variables (`declare` included), functions, aliases, the working directory and
  exported variables persist from cell to cell. Commands that read standard input get end-of-file, not the kernel's
  next requests.
- The end of a cell is reported on a pipe of its own (63 above; the kernel's two extra pipes get numbers from 60 up,
  clear of those scripts pick) by PROMPT_COMMAND, which bash runs before each prompt, so also after a cell
  abandoned by an interrupt: `<cell number> <exit status>`. The number makes the kernel ignore the prompts that end
  no cell (the first one, and one that an interrupt between cells causes). PROMPT_COMMAND is read-only. Nothing
  is parsed out of the cell's output.
- The cell's stderr is a pipe (62 above) given to `source` alone; bash's own stderr, with its prompts (empty
  anyway), its startup warnings about job control and the newline it prints on an interrupt, goes to /dev/null.
  Both pipes are closed for the cell's commands, so background jobs cannot hold or write them.
- Reply: exit status 0 is ok. Any other status of the cell (that of its last command, as in a script) is an error:
  `KeyboardInterrupt` if the kernel was interrupted, otherwise `CommandExitError` with "exit status N".
- As in a terminal, `exit` ends the shell, and so does a failing command after `set -e`; the kernel then starts a
  new one (process_kernel.py).
"""

import secrets
import subprocess

from ipykernel.kernelapp import IPKernelApp

from process_kernel import Interpreter, ProcessKernel, error_reply, pipe, spawn

# The lowest file descriptor number the kernel's two extra pipes may get in bash.
HIGH_FD = 60


class BashKernel(ProcessKernel):
    implementation = "nook-bash"
    language_info = {
        "name": "bash",
        "mimetype": "text/x-sh",
        "file_extension": ".sh",
        "codemirror_mode": "shell",
        "pygments_lexer": "bash",
    }
    banner = "bash: one persistent shell per kernel (nook)"
    process_name = "bash"

    def start_interpreter(self):
        stdin_r, stdin_w = pipe()
        stdout_r, stdout_w = pipe()
        stderr_r, self.stderr_fd = pipe(HIGH_FD)
        control_r, self.control_fd = pipe(HIGH_FD)
        process = spawn(
            ["bash", "--noprofile", "--norc", "--noediting", "-i"],
            stdin_r,
            stdout_w,
            subprocess.DEVNULL,
            pass_fds=(self.stderr_fd, self.control_fd),
        )
        self.interpreter = Interpreter(process, stdin_w, stdout_r, stderr_r, control_r)
        self.cell = 0
        self.write(
            "PS1= PS2= PS0=; unset HISTFILE MAILCHECK; set +o history +H; __nook_cell=0; "
            f"declare -r PROMPT_COMMAND='builtin printf \"%s %s\\n\" \"$__nook_cell\" \"$?\" >&{self.control_fd}'\n"
        )

    def send_cell(self, code):
        self.cell += 1
        end = f"NOOK_END_{secrets.token_hex(8)}"
        while end in code:
            end = f"NOOK_END_{secrets.token_hex(8)}"
        self.write(
            f"__nook_cell={self.cell}; builtin source /dev/stdin 2>&{self.stderr_fd} {self.stderr_fd}>&- "
            f"{self.control_fd}>&- <<'{end}'\n{code}\n{end}\n"
        )

    def parse_control(self, line, interrupted):
        cell, _, status = line.partition(" ")
        if cell != str(self.cell):
            return None
        if status == "0":
            return {"status": "ok"}
        if interrupted:
            return error_reply("KeyboardInterrupt", f"interrupted (exit status {status})")
        return error_reply("CommandExitError", f"exit status {status}")


if __name__ == "__main__":
    IPKernelApp.launch_instance(kernel_class=BashKernel)
