# shellcheck shell=bash
# Shared helpers for zygote's scripts. Source it; do not run it.
set -euo pipefail

ZYGOTE_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ZYGOTE_CACHE="${ZYGOTE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zygote}"
export ZYGOTE_ROOT ZYGOTE_CACHE

log() { printf '[zygote %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# Debian packages the project needs: kernel build, guest image, peer, tools.
ZYGOTE_DEB_PACKAGES=(
    linux-source-6.1 build-essential flex bison bc libelf-dev cpio xz-utils
    busybox-static qemu-system-x86 iproute2 python3
)

# Installs the Debian packages that are missing; a no-op when all are there.
ensure_packages() {
    local missing=()
    local p
    for p in "${ZYGOTE_DEB_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
}

# Runs "$@" with its output in LOGFILE, printing a progress line every 15 s
# (work done so far and the latest line) instead of silence or a flood.
with_progress() {
    local what="$1" logfile="$2"
    shift 2
    "$@" >"$logfile" 2>&1 &
    local pid=$! start=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        sleep 5
        if (( (SECONDS - start) % 15 < 5 )) && kill -0 "$pid" 2>/dev/null; then
            log "$what: $((SECONDS - start)) s, $(wc -l <"$logfile") lines, last: $(tail -n 1 "$logfile" | cut -c1-80)"
        fi
    done
    if ! wait "$pid"; then
        tail -n 40 "$logfile" >&2
        die "$what failed (full log: $logfile)"
    fi
    log "$what: done in $((SECONDS - start)) s"
}
