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

# Debian packages zygote needs: kernel build, guest image, tools.
ZYGOTE_DEB_PACKAGES=(
    linux-source-6.1 build-essential flex bison bc libelf-dev cpio xz-utils
    busybox-static iproute2 python3
)
# What only the test suite adds: the benchmarks' QEMU peer, which a unit
# test drives (a benchmark that compares with it installs it when it runs).
ZYGOTE_TEST_DEB_PACKAGES=(qemu-system-x86)

# Installs those of the Debian packages "$@" that are missing; a no-op when
# all are there. Never removes or downgrades anything.
ensure_packages() {
    local missing=()
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing Debian packages: ${missing[*]}"
        as_root apt-get update -qq
        DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends --no-remove "${missing[@]}" >&2
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

# schemathesis (the OpenAPI fuzzer the API check runs), pinned; its venv is
# cached under ZYGOTE_CACHE and keyed by the version.
ZYGOTE_SCHEMATHESIS_VERSION="${ZYGOTE_SCHEMATHESIS_VERSION:-4.32.5}"

# Prints the path of the cached `schemathesis` (`st`) binary, installing it
# from PyPI into its own venv first when missing. Idempotent.
ensure_schemathesis() {
    local venv="$ZYGOTE_CACHE/venv-schemathesis-$ZYGOTE_SCHEMATHESIS_VERSION"
    if [ ! -x "$venv/bin/st" ] || [ ! -e "$venv/.complete" ]; then
        log "installing schemathesis $ZYGOTE_SCHEMATHESIS_VERSION into $venv"
        rm -rf "$venv"
        mkdir -p "$ZYGOTE_CACHE"
        python3 -m venv "$venv" >&2
        "$venv/bin/pip" install -q --disable-pip-version-check \
            "schemathesis==$ZYGOTE_SCHEMATHESIS_VERSION" >&2
        touch "$venv/.complete"
    fi
    printf '%s\n' "$venv/bin/st"
}

# Checks the daemon's OpenAPI document against the daemon with schemathesis:
# starts `zygote daemon` (binary $1) with a loopback TCP listener and one
# tenant token, and no master; refuses every master for lack of memory
# (--memory-ratio tiny) so that no fuzzed request boots a VM; runs a
# bounded number of examples per operation; stops the daemon. Returns
# schemathesis's status.
check_api_schema() {
    local zygote="$1"
    local st dir token port pid status=0
    st="$(ensure_schemathesis)"
    dir="$(mktemp -d "${TMPDIR:-/tmp}/zygote-schemathesis.XXXXXX")"
    token="schemathesis-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
    printf '%s fuzz\n' "$token" >"$dir/tokens"
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    "$zygote" daemon --state-dir "$dir/state" --listen "unix:$dir/zygote.sock" \
        --listen "127.0.0.1:$port" --tokens "$dir/tokens" --on-shutdown stop \
        --memory-ratio 0.000001 >"$dir/daemon.log" 2>&1 &
    pid=$!
    if ! python3 - "$port" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/healthz"
for _ in range(200):
    try:
        if urllib.request.urlopen(url, timeout=1).status == 200:
            sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
PY
    then
        cat "$dir/daemon.log" >&2
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        rm -rf "$dir"
        log "error: the daemon did not serve /healthz"
        return 1
    fi
    (cd "$dir" && "$st" run "http://127.0.0.1:$port/v1/openapi.json" \
        --header "Authorization: Bearer $token" \
        --checks not_a_server_error,status_code_conformance,response_schema_conformance \
        --max-examples 25 --workers 2 --request-timeout 10 \
        --generation-database none --no-color) || status=$?
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [ "$status" -ne 0 ]; then
        tail -n 20 "$dir/daemon.log" >&2
    fi
    rm -rf "$dir"
    return "$status"
}
