#!/usr/bin/env bash
# Build the workspace and the statically linked sandbox agent.
#
# Usage: scripts/build.sh [--release|--debug]   (default: --release)
# Prints the paths of `nook` and `nook-agent` on stdout; progress goes to stderr.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    printf 'usage: %s [--release|--debug]\n' "$0" >&2
    exit 2
}

# parse_profile ARGS...: print the profile name (release|debug).
parse_profile() {
    local profile=release
    while [[ $# -gt 0 ]]; do
        case "$1" in
        --release) profile=release ;;
        --debug) profile=debug ;;
        -h | --help) usage ;;
        *)
            printf 'unknown argument: %s\n' "$1" >&2
            usage
            ;;
        esac
        shift
    done
    printf '%s\n' "$profile"
}

# cargo_profile_flags PROFILE: print the cargo flag selecting PROFILE.
cargo_profile_flags() {
    if [[ "$1" == release ]]; then
        printf '%s\n' --release
    fi
}

build_workspace() {
    local profile="$1"
    log "cargo build --workspace ($profile)"
    # shellcheck disable=SC2046 # the flag list is empty or one word
    cargo build --workspace $(cargo_profile_flags "$profile") >&2
}

# build_agent PROFILE: build nook-agent with the C runtime linked statically. With --target, RUSTFLAGS reach only
# the target's artifacts, not build scripts or proc macros, and the output lands in its own directory.
build_agent() {
    local profile="$1"
    log "cargo build -p nook-agent --target $NOOK_AGENT_TARGET, statically linked ($profile)"
    # shellcheck disable=SC2046 # the flag list is empty or one word
    RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
        cargo build -p nook-agent --target "$NOOK_AGENT_TARGET" $(cargo_profile_flags "$profile") >&2
}

# check_static BINARY: fail unless BINARY is an ELF file without a program interpreter or shared-library needs.
check_static() {
    local bin="$1" headers dynamic
    [[ -x "$bin" ]] || die "agent binary not found at $bin"
    command -v readelf >/dev/null 2>&1 || die "readelf is missing (package binutils): run scripts/setup.sh first"
    headers="$(readelf -lW "$bin" 2>&1)" || die "$bin is not an ELF file: $headers"
    if grep -q 'INTERP' <<<"$headers"; then
        die "$bin is dynamically linked (it has a program interpreter); the agent must be static"
    fi
    dynamic="$(readelf -dW "$bin" 2>&1 || true)"
    if grep -q '(NEEDED)' <<<"$dynamic"; then
        die "$bin needs shared libraries: $(grep '(NEEDED)' <<<"$dynamic" | tr -s ' ' | tr '\n' ';')"
    fi
    log "$bin is statically linked"
}

main() {
    local profile root nook agent
    profile="$(parse_profile "$@")"
    root="$(repo_root)"
    ensure_cargo
    cd "$root"

    build_workspace "$profile"
    build_agent "$profile"

    nook="$(nook_binary_path "$profile")"
    agent="$(agent_binary_path "$profile")"
    [[ -x "$nook" ]] || die "nook binary not found at $nook"
    check_static "$agent"

    log "build done ($profile)"
    printf 'nook:       %s\n' "$nook"
    printf 'nook-agent: %s\n' "$agent"
}

main "$@"
