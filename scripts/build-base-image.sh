#!/usr/bin/env bash
# Build nook's `base` image: a Debian bookworm root filesystem as a tar, made by mmdebstrap from the host's own
# apt sources. The result is cached under /var/cache/nook/images/base-<key>.tar, where <key> hashes the recipe, so
# a second run with the same recipe does nothing. /var/cache/nook/images/base.tar links to the current one.
#
# Usage: scripts/build-base-image.sh [OUT_TAR]
#   OUT_TAR  optional: also copy the image there.
# Prints the path of the image tar (OUT_TAR when given) on stdout, and only that; progress goes to stderr.
#
# Environment: NOOK_IMAGE_CACHE_DIR overrides the cache directory (default /var/cache/nook/images).
set -euo pipefail
# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Bump when the recipe changes in a way the hashed text below does not show.
RECIPE_VERSION=1
SUITE=bookworm
VARIANT=minbase
# E2B's base-template conventions (python3 with pip, node, sudo) plus what the code interpreter needs: Jupyter's
# Python and R kernels and the data stack code-interpreter users expect (matplotlib figures come back as PNG results).
# Recommends are left out; Debian's matplotlib and ipykernel still depend on scipy, sympy and gdb (1.4 GB in all). A
# compiler is in on purpose, so that `pip install` can build packages with C extensions.
PACKAGES="bash,coreutils,python3,python3-pip,python3-dev,build-essential,git,curl,ca-certificates,procps,sudo,nodejs"
PACKAGES+=",python3-ipykernel,python3-jupyter-client,python3-matplotlib,python3-numpy,python3-pandas"
# R with its Jupyter kernel (IRkernel), as E2B's code-interpreter template has it.
PACKAGES+=",r-base-core,r-cran-irkernel"
# ss (iproute2): the readiness check E2B's SDKs write for `wait_for_port` runs it, as E2B's base template has it.
PACKAGES+=",iproute2"

# Hooks run by mmdebstrap after installing the packages; "$1" is the root filesystem being built.
# shellcheck disable=SC2016 # mmdebstrap expands "$1", not this script
CUSTOMIZE_HOOKS=(
    # mmdebstrap copies the host's /etc/hostname; nook sets each sandbox's hostname itself.
    'echo nook > "$1/etc/hostname"'
    # The unprivileged account agents work as, with passwordless sudo.
    'chroot "$1" useradd --uid 1000 --user-group --create-home --home-dir /home/user --shell /bin/bash user'
    'echo "user ALL=(ALL:ALL) NOPASSWD: ALL" > "$1/etc/sudoers.d/user"'
    'chmod 0440 "$1/etc/sudoers.d/user"'
    'chroot "$1" visudo -c -q -f /etc/sudoers.d/user'
    # pip installs system-wide, as in E2B's images (Debian marks its Python as managed by apt).
    'rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED'
)

# Files copied over the image after the packages (Jupyter kernels for more languages, their helpers).
OVERLAY_DIR="$(repo_root)/images/base/rootfs"

CACHE_DIR="${NOOK_IMAGE_CACHE_DIR:-/var/cache/nook/images}"

# host_sources: print the host's apt sources file, which mmdebstrap takes as its mirror argument.
host_sources() {
    local f
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        if [[ -s "$f" ]]; then
            printf '%s\n' "$f"
            return 0
        fi
    done
    die "no apt sources found (looked for /etc/apt/sources.list.d/debian.sources and /etc/apt/sources.list)"
}

# recipe_key: print the first 16 hex digits of the sha256 of the recipe.
recipe_key() {
    {
        printf 'version=%s\nsuite=%s\nvariant=%s\npackages=%s\nrecommends=no\n' "$RECIPE_VERSION" "$SUITE" "$VARIANT" "$PACKAGES"
        printf 'hook=%s\n' "${CUSTOMIZE_HOOKS[@]}"
        overlay_digest
    } | sha256sum | cut -c1-16
}

# overlay_digest: print a line per overlay file (path, mode, content hash), so any change makes a new image.
overlay_digest() {
    [[ -d "$OVERLAY_DIR" ]] || return 0
    (cd "$OVERLAY_DIR" && find . -type f -printf '%p %m\n' | LC_ALL=C sort | while read -r path mode; do
        printf 'overlay=%s %s %s\n' "$path" "$mode" "$(sha256sum <"$path" | cut -c1-64)"
    done)
}

# build_image OUT: run mmdebstrap into a temporary tar next to OUT, then move it into place atomically.
build_image() {
    local out="$1" tmp sources start hook
    local -a hook_args=()
    sources="$(host_sources)"
    tmp="$(dirname "$out")/.$(basename "$out" .tar).$$.tmp.tar"
    if [[ -d "$OVERLAY_DIR" ]]; then
        hook_args+=("--customize-hook=sync-in $OVERLAY_DIR /")
    fi
    for hook in "${CUSTOMIZE_HOOKS[@]}"; do
        hook_args+=("--customize-hook=$hook")
    done
    # shellcheck disable=SC2064 # expand $tmp now
    trap "rm -f '$tmp'" EXIT
    log "building base image with mmdebstrap ($SUITE, $VARIANT, sources from $sources); this takes about a minute"
    start=$SECONDS
    mmdebstrap \
        --variant="$VARIANT" \
        --format=tar \
        --include="$PACKAGES" \
        --aptopt='APT::Install-Recommends "false"' \
        --skip=output/dev \
        "${hook_args[@]}" \
        "$SUITE" "$tmp" "$sources" >&2 ||
        die "mmdebstrap failed"
    mv -f "$tmp" "$out"
    trap - EXIT
    log "built $out ($(du -h "$out" | cut -f1), $((SECONDS - start)) s)"
}

# link_current TAR: point base.tar at TAR (atomically).
link_current() {
    local target link tmp_link
    target="$(basename "$1")"
    link="$CACHE_DIR/base.tar"
    if [[ "$(readlink "$link" 2>/dev/null || true)" == "$target" ]]; then
        return 0
    fi
    tmp_link="$CACHE_DIR/.base.tar.$$.link"
    ln -sfn "$target" "$tmp_link"
    mv -fT "$tmp_link" "$link"
    log "linked $link -> $target"
}

# copy_out SRC DEST: copy the image to DEST unless an identical file is there already.
copy_out() {
    local src="$1" dest="$2" tmp
    if [[ -f "$dest" ]] && cmp -s "$src" "$dest"; then
        log "$dest is up to date"
        return 0
    fi
    mkdir -p "$(dirname "$dest")"
    tmp="$dest.$$.tmp"
    cp -f "$src" "$tmp"
    mv -f "$tmp" "$dest"
    log "copied the image to $dest"
}

# Images of other recipes are 1.5 GB each: keep the newest one besides IMAGE (another checkout of the project may
# still use it; switching between two branches then builds nothing) and remove the older ones.
prune_superseded() {
    local keep old
    keep="$(basename "$1")"
    # (grep finds nothing on a machine with one image: that is not a failure.)
    ls -t "$CACHE_DIR"/base-*.tar 2>/dev/null | { grep -v "/$keep\$" || true; } | tail -n +2 | while read -r old; do
        rm -f "$old"
        log "removed the superseded image $old"
    done
}

main() {
    local out_tar="${1:-}" key image
    if [[ $# -gt 1 ]]; then
        die "usage: $0 [OUT_TAR]"
    fi
    key="$(recipe_key)"
    image="$CACHE_DIR/base-$key.tar"

    if [[ -s "$image" ]]; then
        log "base image is cached: $image"
    else
        need_root
        command -v mmdebstrap >/dev/null 2>&1 || die "mmdebstrap is missing: run scripts/setup.sh first"
        mkdir -p "$CACHE_DIR"
        # One build at a time; a concurrent run waits, then finds the image built.
        exec 9>"$CACHE_DIR/.base.lock"
        flock 9
        if [[ -s "$image" ]]; then
            log "base image was built meanwhile: $image"
        else
            # Leftovers of interrupted builds (safe to remove: we hold the lock).
            rm -f "$CACHE_DIR"/.base-*.tmp.tar
            build_image "$image"
            prune_superseded "$image"
        fi
        flock -u 9
        exec 9>&-
    fi
    link_current "$image"

    if [[ -n "$out_tar" ]]; then
        copy_out "$image" "$out_tar"
        printf '%s\n' "$(realpath "$out_tar")"
    else
        printf '%s\n' "$image"
    fi
}

main "$@"
