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
#   python3 python3-venv          the venv of the E2B SDK compatibility tests (tests/e2b)
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
)

# The official E2B SDK the compatibility tests drive, pinned so that a new release cannot change a test run.
E2B_TEST_PACKAGES=(e2b==2.63.0 e2b-code-interpreter==2.11.5 pytest==8.3.5)

# ensure_test_venv: the Python venv at .venv with the E2B SDK and pytest (from PyPI), created once.
ensure_test_venv() {
    local venv
    venv="$(repo_root)/.venv"
    if [[ ! -x "$venv/bin/python" ]]; then
        log "creating the Python venv for the E2B compatibility tests at $venv"
        python3 -m venv "$venv"
    fi
    if ! "$venv/bin/python" -m pip show --quiet "${E2B_TEST_PACKAGES[@]%%==*}" >/dev/null 2>&1 ||
        ! "$venv/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version("e2b") != sys.argv[1])' \
            "${E2B_TEST_PACKAGES[0]#*==}"; then
        log "installing ${E2B_TEST_PACKAGES[*]} into $venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${E2B_TEST_PACKAGES[@]}"
    fi
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

main() {
    check_platform
    log "checking Debian packages"
    apt_install_missing "${NOOK_PACKAGES[@]}"
    check_toolchain
    ensure_test_venv
    log "setup done"
}

main "$@"
