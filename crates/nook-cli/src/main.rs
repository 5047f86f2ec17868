//! `nook`: the server (`nook serve`) and the docker-like client verbs, in one thin binary.
//!
//! Parsing is clap's; the server is `nook_control::Server`; every client verb is one or two calls of
//! `nook_client::Client`. The client finds the server and key in `NOOK_URL` / `NOOK_API_KEY`, or in the config file
//! `nook serve` writes for the local user. Output is a table by default and JSON with `--json`; `nook exec` exits
//! with the command's exit code (128 + signal when a signal killed it, 125 when nook itself failed).

mod build;
mod client_config;
mod commands;
mod copy;
mod progress;
mod serve;
mod table;
mod terminal;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Sandboxes for AI agents.
#[derive(Debug, Parser)]
#[command(name = "nook", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server: control plane, embedded store and local runner.
    Serve(serve::ServeArgs),
    /// Create and start a sandbox.
    Create(CreateArgs),
    /// List sandboxes.
    #[command(alias = "list")]
    Ls(LsArgs),
    /// Show one sandbox.
    Inspect(InspectArgs),
    /// Run a command in a sandbox; exits with the command's exit code.
    Exec(ExecArgs),
    /// Set, move or remove a sandbox's deadline (when it is deleted or stopped on its own).
    Deadline(DeadlineArgs),
    /// Set what a sandbox does on its own: stop when idle, delete once stopped for a while.
    Lifecycle(LifecycleArgs),
    /// Replace a sandbox's network policy, in force at once (no flags: any public address).
    Network(NetworkArgs),
    /// Tenants and their quotas (the operator's).
    #[command(subcommand)]
    Tenant(TenantCommand),
    /// API keys: make (shown once), list, revoke.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Make a capability token: chosen verbs on one sandbox, until it expires (for a sub-agent or an end user).
    Token(TokenArgs),
    /// Show the audit log: API calls (who, what, which sandbox, the result) and egress decisions.
    Audit(AuditArgs),
    /// Reach a sandbox's ports from outside: URLs and tokens, signed links, public ports.
    #[command(subcommand)]
    Preview(PreviewCommand),
    /// Stop sandboxes (files are kept).
    Stop(TargetsArgs),
    /// Start stopped sandboxes.
    Start(TargetsArgs),
    /// Pause sandboxes: every process frozen where it is, using no CPU, until resumed.
    Pause(TargetsArgs),
    /// Resume paused sandboxes: their processes continue where they were.
    Resume(TargetsArgs),
    /// Delete sandboxes and their files.
    #[command(alias = "delete")]
    Rm(TargetsArgs),
    /// Make an image from a sandbox's files (its image plus what it changed); sandboxes created from the image
    /// share its layers.
    Snapshot(SnapshotArgs),
    /// Make new sandboxes from a sandbox's files as they are now (copy-on-write); the source goes on.
    Fork(ForkArgs),
    /// Move stopped sandboxes' files to the archive store, freeing local disk (`nook start` brings them back).
    Archive(TargetsArgs),
    /// Change a sandbox's CPU, memory, process or disk limits, live.
    Resize(ResizeArgs),
    /// Show a sandbox's state changes and events; `-f` follows new ones as they happen.
    Events(EventsArgs),
    /// Show what a running sandbox uses now: CPU time, memory, processes, disk.
    Stats(InspectArgs),
    /// Show every running sandbox's CPU, memory, disk and processes, refreshed every 2 s (Ctrl-C ends it).
    Top(TopArgs),
    /// List a sandbox's background processes (started with `nook exec -d`).
    Ps(InspectArgs),
    /// Show a background process's output (replayed from its buffer); `-f` follows it until it exits.
    Logs(LogsArgs),
    /// Send a signal to a background process.
    Kill(KillArgs),
    /// Open an interactive login shell in a sandbox (Ctrl-P Ctrl-Q detaches; `nook attach` returns to it).
    Shell(ShellArgs),
    /// Attach this terminal to a background process, replaying its recent output.
    Attach(AttachArgs),
    /// Copy files or directories between the host and a sandbox: `nook cp ./src box:/work/` or
    /// `nook cp box:/etc/os-release .` (a directory copied into an existing directory lands inside it).
    Cp(CpArgs),
    /// Work with files in a sandbox.
    #[command(subcommand)]
    Files(FilesCommand),
    /// Manage images.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Print the OpenAPI document of the native API.
    Openapi,
}

#[derive(Debug, clap::Args)]
struct CreateArgs {
    /// Unique name, also the hostname.
    #[arg(long)]
    name: Option<String>,
    /// Image name.
    #[arg(long, default_value = "base")]
    image: String,
    /// Label `key=value` (repeatable).
    #[arg(long = "label", short = 'l', value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// Environment variable `KEY=value` (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_pair)]
    env: Vec<(String, String)>,
    #[command(flatten)]
    resources: ResourceArgs,
    /// Seconds until the sandbox's deadline (none by default: it lives until deleted).
    #[arg(long)]
    timeout: Option<u64>,
    /// What the deadline does: `delete` (the default) or `stop` (files kept).
    #[arg(long, value_parser = parse_deadline_action)]
    on_deadline: Option<nook_api::DeadlineAction>,
    /// Stop the sandbox (files kept) after this many seconds without activity.
    #[arg(long)]
    idle_stop: Option<u64>,
    /// Delete the sandbox once it has been stopped this many seconds.
    #[arg(long)]
    delete_after_stopped: Option<u64>,
    /// Archive the sandbox (files to the archive store) once it has been stopped this many seconds.
    #[arg(long)]
    archive_after_stopped: Option<u64>,
    #[command(flatten)]
    egress: EgressArgs,
    /// A port anyone may reach through the preview proxy without a token (repeatable).
    #[arg(long = "public-port", value_name = "PORT")]
    public_ports: Vec<u16>,
    /// A preview request to the sandbox while it is paused or stopped resumes or starts it.
    #[arg(long)]
    wake_on_request: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct AuditArgs {
    /// Only `api` calls or `egress` decisions.
    #[arg(long, value_parser = ["api", "egress"])]
    kind: Option<String>,
    /// Only events about this sandbox (its id; API calls as they named it).
    #[arg(long)]
    sandbox: Option<String>,
    /// Only events of this tenant (the operator; other keys see their own tenant's).
    #[arg(long)]
    tenant: Option<String>,
    /// Only refused calls and denied traffic.
    #[arg(long)]
    denied: bool,
    /// Only events of the last DURATION (90s, 15m, 2h).
    #[arg(long, value_parser = parse_duration_s)]
    since: Option<u64>,
    /// The most events to show (the latest of them are the last lines) [default: 50; with --jsonl all].
    #[arg(long)]
    limit: Option<u32>,
    /// Print JSON (one page).
    #[arg(long, conflicts_with = "jsonl")]
    json: bool,
    /// Export every matching event as JSON lines.
    #[arg(long)]
    jsonl: bool,
}

/// `nook tenant …`.
#[derive(Debug, clap::Subcommand)]
enum TenantCommand {
    /// Make a tenant.
    Create(TenantArgs),
    /// List the tenants with their quotas.
    Ls(JsonArgs),
    /// Replace a tenant's quota (limits left out are lifted).
    Quota(TenantArgs),
}

#[derive(Debug, clap::Args)]
struct TenantArgs {
    /// Tenant name.
    name: String,
    /// The most sandboxes it may have.
    #[arg(long)]
    max_sandboxes: Option<u64>,
    /// The most cores its running sandboxes may have in all.
    #[arg(long)]
    max_cpu: Option<f64>,
    /// The most memory its running sandboxes may have in all, in MiB.
    #[arg(long)]
    max_memory: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct JsonArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `nook key …`.
#[derive(Debug, clap::Subcommand)]
enum KeyCommand {
    /// Make a key; it is printed once (only its hash is kept).
    Create(KeyArgs),
    /// List keys (never the keys themselves).
    Ls(JsonArgs),
    /// Revoke a key at once.
    Revoke {
        /// Key id (`key-…`).
        id: String,
    },
}

#[derive(Debug, clap::Args)]
struct KeyArgs {
    /// A name to know it by.
    name: String,
    /// What it may do: read, write or admin.
    #[arg(long, value_parser = ["read", "write", "admin"])]
    scope: String,
    /// Its tenant (the caller's by default; another for the operator only).
    #[arg(long)]
    tenant: Option<String>,
    /// How long it works (90s, 15m, 2h, 30d); until revoked when left out.
    #[arg(long, value_parser = parse_duration_s)]
    expires: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct TokenArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// A verb it grants (repeatable): read, exec, files:read, files:write, manage.
    #[arg(long = "verb", required = true, value_parser = ["read", "exec", "files:read", "files:write", "manage"])]
    verbs: Vec<String>,
    /// How long it works (up to 30d).
    #[arg(long, default_value = "1h", value_parser = parse_duration_s)]
    expires: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// `nook preview …`.
#[derive(Debug, clap::Subcommand)]
enum PreviewCommand {
    /// Show a port's preview URLs and token.
    Url(PortArgs),
    /// Make a signed link to a port that works until it expires (1s to 24h) or is revoked.
    Link(LinkArgs),
    /// List a sandbox's signed links.
    Links(InspectArgs),
    /// Revoke a signed link at once.
    Revoke(RevokeArgs),
    /// Change who may reach a sandbox's ports, and whether a request wakes it.
    Set(PreviewSetArgs),
}

#[derive(Debug, clap::Args)]
struct PortArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// Port inside the sandbox.
    port: u16,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct LinkArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// Port inside the sandbox.
    port: u16,
    /// How long the link works: seconds, or a number with s, m or h.
    #[arg(long, default_value = "1h", value_parser = parse_duration_s)]
    expires: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct RevokeArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// Link id (`lnk-…`).
    link: String,
}

#[derive(Debug, clap::Args)]
struct PreviewSetArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// Make a port public: reachable without a token (repeatable).
    #[arg(long = "public", value_name = "PORT")]
    public: Vec<u16>,
    /// Make a port private again (repeatable).
    #[arg(long = "private", value_name = "PORT")]
    private: Vec<u16>,
    /// Make every port public (`false` to go back to the listed ones).
    #[arg(long, value_name = "BOOL")]
    all_public: Option<bool>,
    /// Wake the sandbox on a preview request while it is paused or stopped.
    #[arg(long, value_name = "BOOL")]
    wake_on_request: Option<bool>,
    /// Revoke every token and signed link made so far.
    #[arg(long)]
    rotate: bool,
    /// The Host header the sandbox's servers see (`localhost:${PORT}`); an empty string for the client's own.
    #[arg(long, value_name = "HOST")]
    upstream_host: Option<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// A duration in seconds: `90`, `90s`, `15m`, `2h`, `30d`.
fn parse_duration_s(text: &str) -> Result<u64, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration: write 90, 90s, 15m, 2h or 30d"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("{text:?} is not a duration: the unit is s, m, h or d")),
    };
    number.checked_mul(scale).ok_or_else(|| format!("{text:?} is too long"))
}

/// A network policy on the command line.
#[derive(Debug, Clone, clap::Args)]
struct EgressArgs {
    /// No network at all: only loopback.
    #[arg(long, conflicts_with_all = ["allow", "deny", "default_deny"])]
    no_network: bool,
    /// Allow `TO[:PORT,...]`: an IPv4 address or CIDR block, a domain or `*.domain` (repeatable). Private and
    /// link-local blocks open only to a rule inside them.
    #[arg(long, value_name = "TO[:PORTS]")]
    allow: Vec<String>,
    /// Deny `TO[:PORT,...]` (repeatable); deny rules come before allow rules.
    #[arg(long, value_name = "TO[:PORTS]")]
    deny: Vec<String>,
    /// Refuse whatever no --allow names (without it, any public address is allowed after the deny rules).
    #[arg(long)]
    default_deny: bool,
}

impl EgressArgs {
    /// Whether any network flag was given.
    fn given(&self) -> bool {
        self.no_network || self.default_deny || !self.allow.is_empty() || !self.deny.is_empty()
    }

    /// The policy the flags describe.
    fn policy(&self) -> anyhow::Result<nook_api::NetworkPolicy> {
        use nook_api::{EgressAction, EgressMode, EgressRule, NetworkPolicy};
        if self.no_network {
            return Ok(NetworkPolicy::none());
        }
        let rule = |action: EgressAction, text: &String| -> anyhow::Result<EgressRule> {
            let (to, ports) = match text.split_once(':') {
                Some((to, ports)) => (
                    to,
                    ports
                        .split(',')
                        .map(|port| port.trim().parse::<u16>())
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|_| anyhow::anyhow!("{text:?}: ports are numbers separated by commas"))?,
                ),
                None => (text.as_str(), Vec::new()),
            };
            Ok(EgressRule {
                action,
                to: to.to_string(),
                ports,
            })
        };
        let mut rules = Vec::new();
        for text in &self.deny {
            rules.push(rule(EgressAction::Deny, text)?);
        }
        for text in &self.allow {
            rules.push(rule(EgressAction::Allow, text)?);
        }
        Ok(NetworkPolicy {
            egress: if self.default_deny {
                EgressMode::Rules
            } else {
                EgressMode::AllowAll
            },
            rules,
            default: None,
        })
    }
}

#[derive(Debug, clap::Args)]
struct NetworkArgs {
    /// Sandbox id or name.
    sandbox: String,
    #[command(flatten)]
    egress: EgressArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct LifecycleArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// Stop the sandbox (files kept) after this many seconds without activity (0: never).
    #[arg(long)]
    idle_stop: Option<u64>,
    /// Delete the sandbox once it has been stopped this many seconds (0: never).
    #[arg(long)]
    delete_after_stopped: Option<u64>,
    /// Archive the sandbox once it has been stopped this many seconds (0: never).
    #[arg(long)]
    archive_after_stopped: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct SnapshotArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// Name of the image to make.
    image: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct ForkArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// How many forks (default: one per --name, or 1).
    #[arg(long, short = 'n')]
    count: Option<u32>,
    /// Name of a fork (repeatable, one per fork).
    #[arg(long = "name")]
    names: Vec<String>,
    /// Label `key=value` for the forks instead of the source's (repeatable).
    #[arg(long = "label", short = 'l', value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct ResizeArgs {
    /// Sandbox id or name.
    sandbox: String,
    #[command(flatten)]
    resources: ResourceArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// A sandbox's limits on the command line (at create, or what a resize changes).
#[derive(Debug, clap::Args)]
struct ResourceArgs {
    /// CPU cores (fractions allowed).
    #[arg(long)]
    cpu: Option<f64>,
    /// Memory limit in MiB.
    #[arg(long)]
    memory: Option<u64>,
    /// Let the memory limit grow on its own up to this many MiB instead of an OOM kill (0 on a resize: off).
    #[arg(long)]
    memory_max: Option<u64>,
    /// Process limit.
    #[arg(long)]
    pids: Option<u32>,
    /// Disk quota of the sandbox's writable layer in MiB (needs btrfs storage; 0 on a resize removes it).
    #[arg(long)]
    disk: Option<u64>,
}

impl ResourceArgs {
    /// The request the flags describe (the fields not given are absent).
    fn request(&self) -> nook_api::ResourceRequest {
        nook_api::ResourceRequest {
            cpu: self.cpu,
            memory_mb: self.memory,
            memory_max_mb: self.memory_max,
            pids: self.pids,
            disk_mb: self.disk,
        }
    }
}

#[derive(Debug, clap::Args)]
struct DeadlineArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// Seconds from now until the deadline.
    #[arg(long, conflicts_with = "clear", required_unless_present_any = ["clear", "on_deadline"])]
    timeout: Option<u64>,
    /// Remove the deadline: the sandbox lives until deleted.
    #[arg(long)]
    clear: bool,
    /// What the deadline does: `delete` or `stop` (files kept).
    #[arg(long, value_parser = parse_deadline_action)]
    on_deadline: Option<nook_api::DeadlineAction>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_deadline_action(text: &str) -> Result<nook_api::DeadlineAction, String> {
    nook_api::DeadlineAction::parse(text).ok_or_else(|| format!("{text:?} is not `delete` or `stop`"))
}

#[derive(Debug, clap::Args)]
struct LsArgs {
    /// Only sandboxes in this state.
    #[arg(long)]
    state: Option<String>,
    /// Only sandboxes with label `key=value` (repeatable).
    #[arg(long = "label", short = 'l', value_parser = parse_pair)]
    labels: Vec<(String, String)>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Print only ids.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Debug, clap::Args)]
struct EventsArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// Keep printing events as they happen, until the sandbox is deleted or Ctrl-C.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Print JSON (one object per line when following).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct TopArgs {
    /// Print one reading (CPU over one second) and exit.
    #[arg(long)]
    once: bool,
    /// Print JSON (implies --once).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct InspectArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct ExecArgs {
    /// Environment variable `KEY=value` (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_pair)]
    env: Vec<(String, String)>,
    /// Working directory.
    #[arg(long, short = 'w')]
    cwd: Option<String>,
    /// User name or uid.
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Kill the command after this many seconds.
    #[arg(long)]
    timeout: Option<f64>,
    /// Run in the background: print the pid and return; the process outlives this command.
    #[arg(long, short = 'd', conflicts_with_all = ["interactive", "tty"])]
    detach: bool,
    /// Keep standard input open and pass it to the command as it is typed.
    #[arg(long, short = 'i')]
    interactive: bool,
    /// Run the command on a pseudo-terminal (raw mode here, resizes passed on; Ctrl-P Ctrl-Q detaches).
    #[arg(long, short = 't')]
    tty: bool,
    /// Sandbox id or name.
    sandbox: String,
    /// The command and its arguments (after `--`).
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

#[derive(Debug, clap::Args)]
struct ShellArgs {
    /// User name or uid.
    #[arg(long, short = 'u')]
    user: Option<String>,
    /// Working directory.
    #[arg(long, short = 'w')]
    cwd: Option<String>,
    /// Environment variable `KEY=value` (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_pair)]
    env: Vec<(String, String)>,
    /// Sandbox id or name.
    sandbox: String,
}

#[derive(Debug, clap::Args)]
struct AttachArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// Process id inside the sandbox.
    pid: u32,
    /// Bytes of recent output to replay first.
    #[arg(long, default_value_t = terminal::DEFAULT_REPLAY_BYTES)]
    replay: u64,
}

#[derive(Debug, clap::Args)]
struct LogsArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// Process id inside the sandbox.
    pid: u32,
    /// Keep following the output until the process exits.
    #[arg(long, short)]
    follow: bool,
}

#[derive(Debug, clap::Args)]
struct KillArgs {
    /// Sandbox id or name.
    sandbox: String,
    /// Process id inside the sandbox.
    pid: u32,
    /// Signal number.
    #[arg(long, short, default_value_t = 15)]
    signal: i32,
}

#[derive(Debug, clap::Args)]
struct TargetsArgs {
    /// Sandbox ids or names.
    #[arg(required = true)]
    sandboxes: Vec<String>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct CpArgs {
    /// Source: a host path, or SANDBOX:/path.
    source: String,
    /// Destination: a host path, or SANDBOX:/path (missing parent directories are created in sandboxes).
    destination: String,
}

#[derive(Debug, Subcommand)]
enum FilesCommand {
    /// List a directory.
    Ls {
        /// Sandbox id or name.
        sandbox: String,
        /// Absolute path.
        #[arg(default_value = "/")]
        path: String,
        /// Levels to descend.
        #[arg(long, short, default_value_t = 1)]
        depth: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a file.
    Cat {
        /// Sandbox id or name.
        sandbox: String,
        /// Absolute path.
        path: String,
    },
    /// Show a path's metadata.
    Stat {
        /// Sandbox id or name.
        sandbox: String,
        /// Absolute path.
        path: String,
    },
    /// Create a directory and its parents.
    Mkdir {
        /// Sandbox id or name.
        sandbox: String,
        /// Absolute path.
        path: String,
    },
    /// Move or rename a path.
    Mv {
        /// Sandbox id or name.
        sandbox: String,
        /// Absolute source path.
        from: String,
        /// Absolute destination path.
        to: String,
    },
    /// Remove a path.
    Rm {
        /// Sandbox id or name.
        sandbox: String,
        /// Absolute path.
        path: String,
        /// Remove directories with their contents.
        #[arg(long, short)]
        recursive: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ImageCommand {
    /// List images.
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Import an image: an OCI image layout or `docker save` archive, or a root filesystem (a directory, a tar,
    /// .tar.gz or .tar.zst, or `-` for either on stdin).
    Import {
        /// Image name.
        name: String,
        /// Archive, directory or `-`.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Pull an image from a registry (`host[:port]/repository[:tag][@sha256:…]`), with progress.
    Pull {
        /// Image reference.
        reference: String,
        /// Store it under this name instead of the reference.
        #[arg(long)]
        name: Option<String>,
        /// Print the image as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Push a stored image to a registry (`host[:port]/repository:tag`), with progress.
    Push {
        /// Stored image name.
        name: String,
        /// Where to push it.
        reference: String,
    },
    /// Give an image another name.
    Tag {
        /// Existing name.
        source: String,
        /// New name.
        target: String,
    },
    /// Show an image's layers and config as JSON.
    Inspect {
        /// Image name.
        name: String,
    },
    /// Remove unnamed images and the layers no image or sandbox uses.
    Prune {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image name (its layers stay until `nook image prune`, and as long as sandboxes use them).
    Rm {
        /// Image name.
        name: String,
    },
    /// Export an image as an OCI image layout tar (which `nook image import` and OCI tools read).
    Export {
        /// Image name.
        name: String,
        /// Where to write the tar (`-` for standard output).
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Build an image from a Dockerfile in a context directory, with its log as it runs (Ctrl-C cancels).
    Build {
        /// The build context: the directory whose files COPY and ADD see (less what .dockerignore excludes).
        context: PathBuf,
        /// Name of the image to build.
        #[arg(long, short)]
        tag: String,
        /// The Dockerfile, inside the context (default: CONTEXT/Dockerfile).
        #[arg(long, short)]
        file: Option<PathBuf>,
        /// A build argument for the Dockerfile's ARG (repeatable).
        #[arg(long = "build-arg", value_name = "KEY=VALUE", value_parser = parse_pair)]
        build_args: Vec<(String, String)>,
        /// Run every step again instead of taking cached layers.
        #[arg(long)]
        no_cache: bool,
        /// Seconds the build may take (default 3600).
        #[arg(long)]
        timeout: Option<u64>,
        /// Make a template: a command every sandbox from the image starts with (a server, say).
        #[arg(long)]
        start_cmd: Option<String>,
        /// The template's readiness check: a shell command that exits 0 once the start command is ready.
        #[arg(long, requires = "start_cmd")]
        ready_cmd: Option<String>,
        /// Seconds the readiness check may take (default 60).
        #[arg(long, requires = "start_cmd")]
        ready_timeout: Option<u64>,
        /// Print the finished build as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_pair(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{text:?} is not KEY=value"))
}

fn pairs(list: Vec<(String, String)>) -> BTreeMap<String, String> {
    list.into_iter().collect()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("nook: cannot start the async runtime: {error}");
            return ExitCode::from(125);
        }
    };
    match runtime.block_on(commands::run(cli.command)) {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("nook: {error:#}");
            ExitCode::from(125)
        }
    }
}
