#!/usr/bin/env bash
# Quickstart: set everything up, build nook, build the base image, start `nook serve`, create a first sandbox and
# run a command in it. The server then stays in the foreground; Ctrl-C stops it.
#
# Usage: scripts/run.sh
#
# The server gets, in its environment:
#   NOOK_AGENT_BINARY    the static agent binary (target/x86_64-unknown-linux-gnu/release/nook-agent)
#   NOOK_BASE_IMAGE_TAR  the base image tar, imported as image `base` when that image is missing
# Its data directory is the default, /var/lib/nook; sandboxes and images live on btrfs in the image file
# /var/lib/nook/storage.img (made on the first start, sparse), for copy-on-write forks and snapshots and disk quotas.
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

READY_TIMEOUT_S=60
SANDBOX=first

SERVER_PID=""
NOOK=""

# shellcheck disable=SC2317 # called by traps
# stop_server: send SIGTERM to the server, if it is running, and wait for it to exit.
stop_server() {
    if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
        log "stopping nook serve (pid $SERVER_PID)"
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    SERVER_PID=""
}

# shellcheck disable=SC2317 # called by a trap
on_signal() {
    trap - INT TERM
    stop_server
    exit 130
}

# start_server AGENT TAR: start `nook serve` in the background.
start_server() {
    local agent="$1" tar="$2"
    log "starting $NOOK serve"
    NOOK_AGENT_BINARY="$agent" NOOK_BASE_IMAGE_TAR="$tar" "$NOOK" serve --storage-image /var/lib/nook/storage.img &
    SERVER_PID=$!
}

# wait_ready: wait until the CLI can talk to the server, at most READY_TIMEOUT_S seconds.
wait_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT_S))
    log "waiting for the server to answer"
    until "$NOOK" ls >/dev/null 2>&1; do
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            local status=0
            wait "$SERVER_PID" || status=$?
            SERVER_PID=""
            die "nook serve exited (status $status) before it was ready"
        fi
        if ((SECONDS >= deadline)); then
            die "nook serve did not become ready within ${READY_TIMEOUT_S} s"
        fi
        sleep 0.5
    done
    log "server is ready"
}

# demo: create the first sandbox (unless it exists) and run a couple of commands in it.
demo() {
    if "$NOOK" inspect "$SANDBOX" >/dev/null 2>&1; then
        log "sandbox '$SANDBOX' exists already"
    else
        log "nook create --name $SANDBOX"
        "$NOOK" create --name "$SANDBOX"
    fi
    log "nook exec $SANDBOX -- uname -a"
    "$NOOK" exec "$SANDBOX" -- uname -a
    log "nook exec $SANDBOX -- python3 -c 'print(\"hello from nook\")'"
    "$NOOK" exec "$SANDBOX" -- python3 -c 'print("hello from nook")'
}

print_hint() {
    cat >&2 <<EOF

nook is running (pid $SERVER_PID); press Ctrl-C to stop it. In another terminal, try:
    $NOOK exec $SANDBOX -- bash -lc 'whoami; pwd; ls /'
    $NOOK ls
    $NOOK --help

EOF
}

main() {
    local root agent tar status=0
    root="$(repo_root)"
    cd "$root"
    need_root

    bash "$root/scripts/setup.sh"
    bash "$root/scripts/build.sh" --release >&2
    tar="$(bash "$root/scripts/build-base-image.sh")"
    NOOK="$(nook_binary_path release)"
    agent="$(agent_binary_path release)"

    trap stop_server EXIT
    trap on_signal INT TERM
    start_server "$agent" "$tar"
    wait_ready
    demo
    print_hint

    wait "$SERVER_PID" || status=$?
    SERVER_PID=""
    log "nook serve exited with status $status"
    exit "$status"
}

main "$@"
