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
# protobuf-compiler and libprotobuf-dev: the etcd client's build runs protoc
# on etcd's protos (which import the well-known types). etcd-server: the
# scheduler's etcd store (its tests start a private etcd; start_etcd below).
# Debian enables an etcd.service on install; zygote never uses it.
ZYGOTE_DEB_PACKAGES=(
    linux-source-6.1 build-essential flex bison bc libelf-dev cpio xz-utils
    busybox-static iproute2 python3 nftables
    protobuf-compiler libprotobuf-dev etcd-server
)
# QEMU, the benchmarks' peer, is not here: `zygote bench` installs it when
# a run compares with it (its one test is ignored by default). The test
# suite installed it once; on a machine with a newer qemu-utils (from
# backports, say) Debian's qemu-system-x86 cannot be installed without
# removing that, which these scripts never do, and the suite stopped there.

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

# check_api_schema WHAT ROLES START...: checks a server's OpenAPI document
# against the server with schemathesis. Makes a scratch DIR, picks a free
# loopback PORT and writes DIR/tokens with one random token per role of
# ROLES (space-separated tokens-file tenants: a tenant name, or `admin`);
# runs `START... DIR PORT` in the background (it must exec the server,
# serving /healthz and /v1/openapi.json on 127.0.0.1:PORT; its output goes
# to DIR/server.log); once /healthz answers, runs schemathesis with each
# role's token in turn (a bounded number of examples per operation, and
# ZYGOTE_SCHEMATHESIS_TIMEOUT seconds at most per run); then checks that
# the server still answers /healthz and never logged a panic, nor a line
# matching ZYGOTE_SCHEMATHESIS_LOG_FAIL (an extended regex, if set), and
# stops it. WHAT names it in messages. Returns non-zero on any finding.
# ZYGOTE_SCHEMATHESIS_WORKERS: schemathesis's workers (default 2).
ZYGOTE_SCHEMATHESIS_TIMEOUT="${ZYGOTE_SCHEMATHESIS_TIMEOUT:-600}"
check_api_schema() {
    local what="$1" roles="$2"
    shift 2
    local st dir port pid role token status=0
    st="$(ensure_schemathesis)"
    dir="$(mktemp -d "${TMPDIR:-/tmp}/zygote-schemathesis.XXXXXX")"
    for role in $roles; do
        printf 'schemathesis-%s %s\n' "$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" "$role"
    done >"$dir/tokens"
    port="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
    "$@" "$dir" "$port" >"$dir/server.log" 2>&1 &
    pid=$!
    if ! _wait_healthz "$port" 200; then
        cat "$dir/server.log" >&2
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        rm -rf "$dir"
        log "error: $what did not serve /healthz"
        return 1
    fi
    while read -r token role; do
        log "schemathesis: $what, as $role"
        (cd "$dir" && timeout "$ZYGOTE_SCHEMATHESIS_TIMEOUT" "$st" run \
            "http://127.0.0.1:$port/v1/openapi.json" \
            --header "Authorization: Bearer $token" \
            --checks not_a_server_error,status_code_conformance,response_schema_conformance \
            --max-examples 25 --workers "${ZYGOTE_SCHEMATHESIS_WORKERS:-2}" --request-timeout 10 \
            --generation-database none --no-color </dev/null) || status=$?
    done <"$dir/tokens"
    if ! _wait_healthz "$port" 20; then
        log "error: $what stopped serving /healthz under the fuzzer"
        status=1
    fi
    if grep -q 'panicked' "$dir/server.log"; then
        log "error: $what panicked under the fuzzer"
        status=1
    fi
    if [ -n "${ZYGOTE_SCHEMATHESIS_LOG_FAIL:-}" ] \
        && grep -Eq "$ZYGOTE_SCHEMATHESIS_LOG_FAIL" "$dir/server.log"; then
        grep -E "$ZYGOTE_SCHEMATHESIS_LOG_FAIL" "$dir/server.log" | tail -n 5 >&2
        log "error: $what logged a failure under the fuzzer"
        status=1
    fi
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if [ "$status" -ne 0 ]; then
        tail -n 20 "$dir/server.log" >&2
    fi
    rm -rf "$dir"
    return "$status"
}

# _wait_healthz PORT TRIES: whether http://127.0.0.1:PORT/healthz answers
# 200 within TRIES attempts (50 ms apart).
_wait_healthz() {
    python3 - "$1" "$2" <<'PY'
import sys, time, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/healthz"
for _ in range(int(sys.argv[2])):
    try:
        if urllib.request.urlopen(url, timeout=1).status == 200:
            sys.exit(0)
    except OSError:
        time.sleep(0.05)
sys.exit(1)
PY
}

# The daemon (binary ZYGOTE DIR PORT) for check_api_schema: a loopback TCP
# listener and the tokens, and no master; it refuses every master for lack
# of memory (--memory-ratio tiny) so that no fuzzed request boots a VM.
fuzz_target_daemon() {
    local zygote="$1" dir="$2" port="$3"
    exec "$zygote" daemon --state-dir "$dir/state" --listen "unix:$dir/zygote.sock" \
        --listen "127.0.0.1:$port" --tokens "$dir/tokens" --on-shutdown stop \
        --memory-ratio 0.000001
}

# The scheduler (binary ZYGOTE DIR PORT) for check_api_schema: an embedded
# store in DIR and the tokens. Fuzzed apps and heartbeats meet in its
# reconcile loop, which must keep working (check_scheduler_api_schema).
fuzz_target_scheduler() {
    local zygote="$1" dir="$2" port="$3"
    exec "$zygote" scheduler --listen "127.0.0.1:$port" --store "embedded:$dir/store" \
        --tokens "$dir/tokens" --state-dir "$dir/state"
}

# Fuzzes the daemon (binary $1) as a tenant.
check_daemon_api_schema() {
    check_api_schema "the daemon" "fuzz" fuzz_target_daemon "$1"
}

# Fuzzes the scheduler (binary $1) as the admin and as a tenant; a failed
# reconcile step in its log fails the check. One worker: its requests are
# quick, and schemathesis's coverage phase with two threads has crashed
# inside Python's ast module (hypothesis describing a filter lambda).
check_scheduler_api_schema() {
    ZYGOTE_SCHEMATHESIS_LOG_FAIL='reconcile (step|worker) failed' ZYGOTE_SCHEMATHESIS_WORKERS=1 \
        check_api_schema "the scheduler" "admin fuzz" fuzz_target_scheduler "$1"
}

# The scheduler's etcd: one single-member etcd for a dev cluster or a test.
# `--max-txn-ops` is raised to ZYGOTE_ETCD_MAX_TXN_OPS (default 1024): the
# scheduler commits a batch of N slots as one transaction of N + 1 compares,
# and etcd's default (128) would refuse batches past 127 slots.
ZYGOTE_ETCD_MAX_TXN_OPS="${ZYGOTE_ETCD_MAX_TXN_OPS:-1024}"

# start_etcd DATA_DIR CLIENT_URL PEER_URL PIDFILE: starts etcd in the
# background (data and its log, etcd.log, in DATA_DIR; a restart on the same
# DATA_DIR keeps the data), writes its pid to PIDFILE and returns once it
# reports healthy on CLIENT_URL (http://HOST:PORT), or dies with its log.
start_etcd() {
    local data_dir="$1" client_url="$2" peer_url="$3" pidfile="$4"
    local etcd_bin="${ZYGOTE_ETCD:-etcd}"
    command -v "$etcd_bin" >/dev/null \
        || die "no etcd binary ($etcd_bin): install Debian's etcd-server (ensure_packages etcd-server)"
    if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        die "etcd already runs with pid $(cat "$pidfile") (from $pidfile)"
    fi
    mkdir -p "$data_dir"
    local name=zygote
    "$etcd_bin" --name "$name" --data-dir "$data_dir/data" \
        --listen-client-urls "$client_url" --advertise-client-urls "$client_url" \
        --listen-peer-urls "$peer_url" --initial-advertise-peer-urls "$peer_url" \
        --initial-cluster "$name=$peer_url" \
        --max-txn-ops "$ZYGOTE_ETCD_MAX_TXN_OPS" \
        --logger zap --log-level warn \
        </dev/null >>"$data_dir/etcd.log" 2>&1 &
    local pid=$!
    echo "$pid" >"$pidfile"
    local hostport="${client_url#*://}"
    hostport="${hostport%%/*}"
    local host="${hostport%:*}" port="${hostport##*:}"
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || {
            tail -n 20 "$data_dir/etcd.log" >&2
            rm -f "$pidfile"
            die "etcd exited while starting (log: $data_dir/etcd.log)"
        }
        if _etcd_healthy "$host" "$port"; then
            log "etcd $pid healthy on $client_url"
            return 0
        fi
        sleep 0.1
    done
    tail -n 20 "$data_dir/etcd.log" >&2
    stop_etcd "$pidfile"
    die "etcd not healthy on $client_url after 30 s (log: $data_dir/etcd.log)"
}

# _etcd_healthy HOST PORT: whether etcd's /health answers "true".
_etcd_healthy() {
    local reply
    reply="$( (exec 3<>"/dev/tcp/$1/$2" \
        && printf 'GET /health HTTP/1.0\r\nHost: %s\r\n\r\n' "$1" >&3 \
        && timeout 2 cat <&3) 2>/dev/null)" || return 1
    [[ "$reply" == *'"health":"true"'* ]]
}

# stop_etcd PIDFILE: stops the etcd start_etcd started (TERM, then KILL after
# 10 s) and removes PIDFILE; a no-op when it is not running.
stop_etcd() {
    local pidfile="$1" pid
    [ -s "$pidfile" ] || return 0
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$pidfile"
}
