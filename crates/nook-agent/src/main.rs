//! `nook-agent`: the one binary nook runs inside every sandbox.
//!
//! Two subcommands, used in sequence for a container sandbox:
//! - `boot` runs on the host, started by the runner: it builds the sandbox around itself (cgroups, namespaces,
//!   root filesystem, capabilities, seccomp) and finally executes `serve` from the read-only copy mounted inside.
//! - `serve` is PID 1 of the sandbox: it reaps zombies and serves the agent protocol on the listening socket it
//!   inherited on fd 3, starting and streaming processes on the runner's behalf.
//!
//! `boot` runs before any thread exists (it forks and changes namespaces); `serve` starts a single-threaded runtime.

mod archive;
mod boot;
mod files;
mod metadata;
mod processes;
mod search;
mod serve;
mod users;
mod watch;

fn main() {
    let mut args = std::env::args().skip(1);
    let code = match args.next().as_deref() {
        Some("boot") => boot::run(),
        Some("serve") => serve::run(),
        Some("--version") => {
            println!("nook-agent {}", env!("CARGO_PKG_VERSION"));
            0
        }
        _ => {
            eprintln!("usage: nook-agent boot|serve  (started by the nook runner, not by hand)");
            2
        }
    };
    std::process::exit(code);
}
