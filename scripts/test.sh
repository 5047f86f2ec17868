#!/usr/bin/env bash
# Quickstart: set everything up and run the whole test suite: formatting, clippy, a debug build with the static
# agent, the base image, then `cargo test --workspace`, then the E2B SDK compatibility suites against one shared
# `nook serve` (tests/e2b: the Python SDK; tests/e2b-js: the JavaScript SDK; tests/e2b-agents: the OpenAI Agents
# SDK's E2B provider). Exits with the status of the tests.
#
# Usage: scripts/test.sh [extra arguments for the test binaries, after --test-threads=2]
#
# The tests get, in their environment:
#   NOOK_AGENT_BINARY    the static agent binary (target/x86_64-unknown-linux-gnu/debug/nook-agent)
#   NOOK_BASE_IMAGE_TAR  the base image tar
#   NOOK_MOTO_SERVER     moto's S3 server (.venv-s3/bin/moto_server), which the archive tests start on loopback
#   TMPDIR               a directory on btrfs (an image file mounted at TEST_STORAGE_DIR), where the tests' servers
#                        keep their data, as `nook serve --storage-image` keeps a real one's
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

TEST_THREADS=2
TEST_STORAGE_IMAGE=/var/lib/nook-test/storage.img
TEST_STORAGE_DIR=/var/lib/nook-test/tmp

# need_cargo_tool NAME COMPONENT: fail clearly unless `cargo NAME` works.
need_cargo_tool() {
    cargo "$1" --version >/dev/null 2>&1 ||
        die "cargo $1 is missing: install the rustup component '$2' (rustup component add $2)"
}

check_format() {
    need_cargo_tool fmt rustfmt
    log "cargo fmt --all -- --check"
    cargo fmt --all -- --check
}

run_clippy() {
    need_cargo_tool clippy clippy
    log "cargo clippy --workspace --all-targets -- -D warnings"
    cargo clippy --workspace --all-targets -- -D warnings
}

# run_tests AGENT TAR ARGS...: run the whole suite; returns its status.
run_tests() {
    local agent="$1" tar="$2"
    shift 2
    log "cargo test --workspace -- --test-threads=$TEST_THREADS $*"
    NOOK_AGENT_BINARY="$agent" NOOK_BASE_IMAGE_TAR="$tar" \
        cargo test --workspace -- --test-threads="$TEST_THREADS" "$@"
}

# run_sdk_suites ROOT: the three SDK suites against one `nook serve` (tests/nook_test_server.py, stopped by SIGTERM
# at the end, or when its stdin, a coprocess pipe, closes because this script died); returns the first failing
# status. Needs NOOK_BIN,
# NOOK_AGENT_BINARY and NOOK_BASE_IMAGE_TAR exported.
run_sdk_suites() {
    local root="$1" line status=0
    log "starting one nook serve for the SDK suites"
    coproc SDK_SERVER { exec "$root/.venv/bin/python" "$root/tests/nook_test_server.py"; }
    if ! read -r line <&"${SDK_SERVER[0]}"; then
        log "the SDK suites' nook serve did not start"
        return 1
    fi
    # shellcheck disable=SC2163 # exports the three NAME=VALUE words the server printed
    export $line
    log "E2B SDK compatibility tests (tests/e2b, official e2b Python SDK)"
    "$root/.venv/bin/python" -m pytest "$root/tests/e2b" -q || status=$?
    if [[ $status -eq 0 ]]; then
        log "E2B SDK compatibility tests (tests/e2b-js, official e2b npm package)"
        run_npm test --prefix "$root/tests/e2b-js" || status=$?
    fi
    if [[ $status -eq 0 ]]; then
        log "OpenAI Agents SDK E2B provider tests (tests/e2b-agents, openai-agents[e2b] in .venv-agents)"
        "$root/.venv-agents/bin/python" -m pytest "$root/tests/e2b-agents" -q || status=$?
    fi
    if [[ $status -ne 0 ]]; then
        log "the end of the SDK suites' server log ($NOOK_TEST_LOG):"
        tail -n 40 "$NOOK_TEST_LOG" >&2 || true
    fi
    local server_pid="$SDK_SERVER_PID"
    kill -TERM "$server_pid" 2>/dev/null || true
    wait "$server_pid" || true
    unset NOOK_TEST_URL NOOK_TEST_KEY NOOK_TEST_LOG
    return "$status"
}

main() {
    local root agent tar status=0 start=$SECONDS
    root="$(repo_root)"
    cd "$root"

    bash "$root/scripts/setup.sh"
    ensure_cargo
    check_format
    run_clippy
    bash "$root/scripts/build.sh" --debug >&2
    tar="$(bash "$root/scripts/build-base-image.sh")"
    agent="$(agent_binary_path debug)"
    ensure_btrfs_mount "$TEST_STORAGE_IMAGE" 64G "$TEST_STORAGE_DIR"
    export TMPDIR="$TEST_STORAGE_DIR"
    export NOOK_MOTO_SERVER="$root/.venv-s3/bin/moto_server"

    run_tests "$agent" "$tar" "$@" || status=$?
    if [[ $status -eq 0 ]]; then
        NOOK_BIN="$(nook_binary_path debug)" NOOK_AGENT_BINARY="$agent" NOOK_BASE_IMAGE_TAR="$tar" \
            run_sdk_suites "$root" || status=$?
    fi
    if [[ $status -eq 0 ]]; then
        log "all tests passed ($((SECONDS - start)) s)"
    else
        log "tests FAILED with status $status ($((SECONDS - start)) s)"
    fi
    exit "$status"
}

main "$@"
