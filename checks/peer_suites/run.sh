#!/usr/bin/env bash
# Run the own test suites of httpx, requests and aiohttp (its client tests) twice each: as they are (baseline), and with
# every call to their local test servers going through upstream_guard (guard_plugin.py).
#
#   checks/peer_suites/run.sh                 # both suites, guard from this work tree's src/
#   checks/peer_suites/run.sh httpx           # one suite (httpx | requests | aiohttp)
#   GUARD_REF=HEAD checks/peer_suites/run.sh  # guard from a commit (git archive, read-only)
#
# Needs the upstream repositories as bare git dirs (the search tool's fetch of
# github:encode/httpx, github:psf/requests and github:aio-libs/aiohttp puts them at the
# default paths below). Their code
# is exported to $PEER (default /tmp/peer), never into this repository. Only PyPI is used.
# See README.md beside this file.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PEER=${PEER:-/tmp/peer}
HTTPX_GIT=${HTTPX_GIT:-/work/.mirror/encode+httpx/repo}
REQUESTS_GIT=${REQUESTS_GIT:-/work/.mirror/psf+requests/repo}
AIOHTTP_GIT=${AIOHTTP_GIT:-/work/.mirror/aio-libs+aiohttp/repo}
HTTPX_TAG=${HTTPX_TAG:-0.28.1}
REQUESTS_TAG=${REQUESTS_TAG:-v2.34.2}
AIOHTTP_TAG=${AIOHTTP_TAG:-v3.14.3}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}   # seconds per pytest run
VENV="$PEER/venv"
PY="$VENV/bin/python"
LOGS="$PEER/logs"
SUITES=("${@:-httpx requests aiohttp}")
read -r -a SUITES <<<"${SUITES[*]}"

die() { echo "run.sh: $*" >&2; exit 2; }

# 1. The suites' sources, at the tags matching the installed versions.
export_tree() {  # name git-dir tag
    local dest="$PEER/$1"
    if [[ -f "$dest/.peer-tag" && "$(cat "$dest/.peer-tag")" == "$3" ]]; then return; fi
    [[ -d "$2" ]] || die "no git dir at $2: fetch github:$4 with the search tool first (or set ${1^^}_GIT)"
    rm -rf "$dest" && mkdir -p "$dest"
    git --git-dir="$2" archive "$3" | tar -x -C "$dest" || die "git archive $3 failed"
    echo "$3" >"$dest/.peer-tag"
}
mkdir -p "$PEER" "$LOGS"
for suite in "${SUITES[@]}"; do
    case "$suite" in
        httpx) export_tree httpx "$HTTPX_GIT" "$HTTPX_TAG" encode/httpx ;;
        requests) export_tree requests "$REQUESTS_GIT" "$REQUESTS_TAG" psf/requests ;;
        aiohttp) export_tree aiohttp "$AIOHTTP_GIT" "$AIOHTTP_TAG" aio-libs/aiohttp ;;
    esac
done

# 2. A venv of its own: this project (editable) + the libraries and their test requirements.
if [[ ! -x "$PY" ]] || ! cmp -s "$HERE/requirements-peer.txt" "$VENV/.peer-requirements"; then
    python3 -m venv "$VENV" || die "python3 -m venv failed"
    "$PY" -m pip install -q -e "$ROOT" -r "$HERE/requirements-peer.txt" 2>&1 |
        grep -v "is ignored: it is neither a file nor a directory" || true
    "$PY" -c "import httpx, requests, aiohttp, pytest_httpbin, trustme, uvicorn, upstream_guard" ||
        die "pip install failed"
    cp "$HERE/requirements-peer.txt" "$VENV/.peer-requirements"
fi

# Where upstream_guard is imported from: this work tree (editable install), or a commit.
GUARD_SRC="$ROOT/src"
if [[ -n "${GUARD_REF:-}" ]]; then
    rev=$(git -C "$ROOT" rev-parse --short "$GUARD_REF") || die "unknown GUARD_REF $GUARD_REF"
    GUARD_SRC="$PEER/guard-$rev/src"
    if [[ ! -d "$GUARD_SRC" ]]; then
        mkdir -p "$PEER/guard-$rev"
        git -C "$ROOT" archive "$rev" src | tar -x -C "$PEER/guard-$rev"
    fi
fi

# A clean environment: no proxies, no CA bundle overrides, no UPSTREAM_GUARD_* settings.
for var in $(env | sed -n 's/^\([A-Za-z_]*\(proxy\|PROXY\)\)=.*/\1/p; s/^\(UPSTREAM_GUARD_[A-Za-z0-9_]*\)=.*/\1/p'); do
    unset "$var"
done
unset REQUESTS_CA_BUNDLE CURL_CA_BUNDLE
export PYTHONDONTWRITEBYTECODE=1

deselect_args() {  # file -> --deselect args (the node id is the line up to "  #")
    sed -e 's/[[:space:]]*#.*$//' -e '/^[[:space:]]*$/d' "$1" | while read -r id; do
        printf -- '--deselect=%s\n' "$id"
    done
}

status=0
for suite in "${SUITES[@]}"; do
    targets=(tests) options=()
    case "$suite" in
        httpx) workers=() ;;  # its session server listens on the fixed port 8000: serial
        requests) workers=(-n 2) ;;
        aiohttp)  # its client tests against its own test servers; its setup.cfg's addopts off
            workers=(-n 2)
            targets=(tests/test_client_functional.py tests/test_client_middleware.py)
            options=(-o addopts= -m "not dev_mode and not autobahn and not internal") ;;
        *) die "unknown suite $suite (httpx | requests | aiohttp)" ;;
    esac
    mapfile -t deselect < <(deselect_args "$HERE/deselect-$suite.txt")
    echo "== $suite $(cat "$PEER/$suite/.peer-tag"): ${#deselect[@]} tests deselected (deselect-$suite.txt)"
    for mode in baseline guarded; do
        plugins=(-p netblock)
        [[ $mode == guarded ]] && plugins+=(-p guard_plugin)
        log="$LOGS/$suite-$mode.txt"
        rm -f "$LOGS/$suite-$mode.net"
        (
            cd "$PEER/$suite" &&
            NETBLOCK_LOG="$LOGS/$suite-$mode.net" \
            PYTHONPATH="$GUARD_SRC:$HERE" \
            timeout -k 30 "$RUN_TIMEOUT" "$PY" -m pytest "${targets[@]}" -q -rfE -p no:cacheprovider \
                "${plugins[@]}" "${workers[@]}" "${options[@]}" "${deselect[@]}" \
                --junitxml="$LOGS/$suite-$mode.xml" -o junit_family=xunit1
        ) >"$log" 2>&1
        rc=$?
        summary=$(grep -E '^=*.*[0-9]+ (passed|failed|error)' "$log" | tail -1 | sed 's/^=* *//; s/ *=*$//')
        printf '  %-8s rc=%-3s %s\n' "$mode" "$rc" "${summary:-NO SUMMARY (see $log)}"
        grep -E '^(netblock|guard_plugin): ' "$log" | sed 's/^/           /'
        [[ $rc == 124 || $rc == 137 ]] && echo "           TIMED OUT after ${RUN_TIMEOUT}s" && status=1
    done
    flaky=(); [[ -f "$HERE/flaky-$suite.txt" ]] && flaky=("$HERE/flaky-$suite.txt")
    "$PY" "$HERE/compare.py" "$LOGS/$suite-baseline.xml" "$LOGS/$suite-guarded.xml" "${flaky[@]}" || status=1
    echo "  logs: $LOGS/$suite-{baseline,guarded}.{txt,xml,net}"
done
exit $status
