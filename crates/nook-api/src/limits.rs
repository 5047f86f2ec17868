//! Bounds on what a client may ask for, shared by the server (which enforces them) and clients (which may check
//! early). A request outside these bounds is refused with `invalid_request` and creates nothing.

/// CPU cores given to a sandbox when the request names none.
pub const DEFAULT_CPU: f64 = 1.0;
/// Smallest CPU share a sandbox may ask for.
pub const MIN_CPU: f64 = 0.05;
/// Largest CPU share a sandbox may ask for, in cores.
pub const MAX_CPU: f64 = 256.0;

/// Memory given to a sandbox when the request names none, in MiB.
pub const DEFAULT_MEMORY_MB: u64 = 512;
/// Smallest memory limit, in MiB: below this the agent itself cannot run reliably.
pub const MIN_MEMORY_MB: u64 = 16;
/// Largest memory limit, in MiB (4 TiB).
pub const MAX_MEMORY_MB: u64 = 4 * 1024 * 1024;

/// Smallest disk quota, in MiB.
pub const MIN_DISK_MB: u64 = 16;
/// Largest disk quota, in MiB (1 PiB).
pub const MAX_DISK_MB: u64 = 1024 * 1024 * 1024;

/// Most forks one request makes.
pub const MAX_FORKS: u32 = 64;

/// Process limit when the request names none.
pub const DEFAULT_PIDS: u32 = 1024;
/// Smallest process limit: the agent and one command.
pub const MIN_PIDS: u32 = 8;
/// Largest process limit.
pub const MAX_PIDS: u32 = 1_000_000;

/// Most labels on one sandbox.
pub const MAX_LABELS: usize = 64;
/// Most environment variables given at once.
pub const MAX_ENV: usize = 512;
/// Longest label or environment value, in bytes.
pub const MAX_VALUE_LEN: usize = 32 * 1024;
/// Most arguments in one command.
pub const MAX_ARGS: usize = 4096;
/// Longest command line, all arguments together, in bytes.
pub const MAX_COMMAND_BYTES: usize = 1024 * 1024;
/// Largest `stdin` text for a synchronous exec, in bytes.
pub const MAX_EXEC_STDIN: usize = 8 * 1024 * 1024;
/// Output kept per stream by a synchronous exec; the rest is dropped and flagged as truncated.
pub const MAX_EXEC_CAPTURE: usize = 16 * 1024 * 1024;
/// Longest exec timeout, in milliseconds (7 days).
pub const MAX_EXEC_TIMEOUT_MS: u64 = 7 * 24 * 3600 * 1000;
