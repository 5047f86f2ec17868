#!/usr/bin/env bash
# Benchmark nook against runc and gVisor's runsc on this machine and print a markdown report on stdout.
#
# Usage: bench/run.sh [nook-bench flags...]      e.g. bench/run.sh --sandboxes 30 --execs 100 --peer-runs 20
#        (nook-bench --help lists them all: also --processes, --file-mib, --file-runs, --runsc, --work-dir...)
#
# Steps, each idempotent:
#   1. install runc and wrk (Debian main) and a current runsc (bookworm-backports: main's 2022 runsc has no systrap
#      platform). The backports source is derived from the host's own deb822 sources, so it uses the same mirror;
#      if that fails the bench runs without runsc and reports it as unavailable.
#   2. scripts/build.sh --release (builds nook, the static agent and nook-bench).
#   3. scripts/build-base-image.sh (cached base rootfs tar).
#   4. target/release/nook-bench with those paths, plus the flags given here.
# Progress goes to stderr; only the report goes to stdout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"

HOST_SOURCES=/etc/apt/sources.list.d/debian.sources
BACKPORTS_SOURCES=/etc/apt/sources.list.d/nook-backports.sources
# runsc versions older than this (Debian main's 0.0~20221219) lack the systrap platform.
RUNSC_MIN_VERSION=0.0~20230101

# codename: print the Debian release codename (bookworm on Debian 12).
codename() {
    local name=""
    if [[ -r /etc/os-release ]]; then
        # shellcheck disable=SC1091 # a system file
        name="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
    fi
    printf '%s\n' "${name:-bookworm}"
}

# backports_stanza SUITE: print the host's deb822 stanza whose Suites field holds SUITE itself (not SUITE-security
# or SUITE-updates alone), comments dropped and Suites replaced by SUITE-backports. Prints nothing if none matches.
backports_stanza() {
    local suite="$1"
    awk -v suite="$suite" '
        BEGIN { RS = ""; FS = "\n" }
        {
            found = 0
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^Suites:/) {
                    n = split(substr($i, 8), words, /[ \t]+/)
                    for (j = 1; j <= n; j++) if (words[j] == suite) found = 1
                }
            }
            if (!found) next
            for (i = 1; i <= NF; i++) {
                if ($i ~ /^#/) continue
                if ($i ~ /^Suites:/) print "Suites: " suite "-backports"
                else print $i
            }
            exit
        }' "$HOST_SOURCES"
}

# ensure_backports_source: write the backports source when it is missing or differs. Fails if it cannot be derived.
ensure_backports_source() {
    local suite stanza
    suite="$(codename)"
    [[ -s "$HOST_SOURCES" ]] || {
        warn "$HOST_SOURCES is missing; cannot derive a $suite-backports source"
        return 1
    }
    stanza="$(backports_stanza "$suite")"
    [[ -n "$stanza" ]] || {
        warn "no stanza with suite $suite in $HOST_SOURCES; cannot derive a $suite-backports source"
        return 1
    }
    if [[ -f "$BACKPORTS_SOURCES" ]] && [[ "$(cat "$BACKPORTS_SOURCES")" == "$stanza" ]]; then
        log "$BACKPORTS_SOURCES is up to date"
        return 0
    fi
    log "writing $BACKPORTS_SOURCES ($suite-backports, derived from $HOST_SOURCES)"
    printf '%s\n' "$stanza" >"$BACKPORTS_SOURCES.tmp"
    mv -f "$BACKPORTS_SOURCES.tmp" "$BACKPORTS_SOURCES"
    # The package lists must be refreshed for the new suite.
    unset NOOK_APT_UPDATED
}

# runsc_is_current: succeed when an installed runsc is recent enough to have the systrap platform.
runsc_is_current() {
    local version
    is_installed runsc || return 1
    version="$(dpkg-query -W -f='${Version}' runsc 2>/dev/null)" || return 1
    dpkg --compare-versions "$version" ge "$RUNSC_MIN_VERSION"
}

# install_runsc: install runsc from backports; warn (and carry on without it) when that fails.
install_runsc() {
    local suite
    if runsc_is_current; then
        log "runsc is installed and current: $(dpkg-query -W -f='${Version}' runsc)"
        return 0
    fi
    suite="$(codename)"
    if ! ensure_backports_source; then
        warn "runsc will be reported as unavailable"
        return 0
    fi
    if ! apt_update_once; then
        warn "apt-get update failed; runsc will be reported as unavailable"
        return 0
    fi
    log "installing runsc from $suite-backports"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends -t "$suite-backports" runsc >&2; then
        warn "installing runsc from $suite-backports failed; runsc will be reported as unavailable"
        return 0
    fi
    runsc_is_current || warn "the installed runsc ($(dpkg-query -W -f='${Version}' runsc 2>/dev/null || echo none)) may lack systrap"
}

main() {
    local tar runc_path
    local -a runsc_flag=()
    need_root
    cd "$ROOT"

    apt_install_missing runc
    apt_install_missing wrk
    install_runsc

    "$ROOT/scripts/build.sh" --release >&2
    tar="$("$ROOT/scripts/build-base-image.sh")"
    runc_path="$(command -v runc)" || die "runc is not on PATH after installing it"
    if command -v runsc >/dev/null 2>&1 && runsc_is_current; then
        runsc_flag=(--runsc "$(command -v runsc)")
    else
        runsc_flag=(--no-runsc)
    fi

    log "running nook-bench $*"
    "$(cargo_target_dir)/release/nook-bench" \
        --nook "$(nook_binary_path release)" \
        --agent "$(agent_binary_path release)" \
        --base-image-tar "$tar" \
        --runc "$runc_path" \
        "${runsc_flag[@]}" \
        "$@"
}

main "$@"
