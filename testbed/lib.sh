# shellcheck shell=bash disable=SC2034  # the constants are used by the scripts that source this
# Shared helpers for the test-bed scripts. Source it; do not execute it.
#
# Defines:
#   TESTBED_DIR  absolute path of this testbed/ directory
#   REPO_ROOT    the repository root (parent of testbed/)
#   STATE        machine-global state directory (TESTBED_STATE, default
#                /var/lib/deployra-testbed), shared by every clone on purpose
# and the constants every script agrees on (ports, names, credentials).

TESTBED_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$TESTBED_DIR/.." && pwd)"
STATE="${TESTBED_STATE:-/var/lib/deployra-testbed}"

# Ports and identities of the services (all on 127.0.0.1).
REDIS_PORT=6379
MOTO_PORT=5050
GIT_PORT=8418
DASHBOARD_PORT=3990
API_KEY=testbed-api-key
GIT_USERNAME=tester
GIT_PASSWORD=testbed-git-secret
REGISTRY_HOST=123456789012.dkr.ecr.us-east-1.amazonaws.com
REGISTRY_USERNAME=AWS
REGISTRY_PASSWORD=123456789012-auth-token
# The same registry under a second name with a user of its own: a private
# registry an operator lists in the builder's Docker config.
PRIVATE_REGISTRY_HOST=registry.private.testbed
PRIVATE_REGISTRY_USERNAME=operator
PRIVATE_REGISTRY_PASSWORD=testbed-private-registry-secret
BASE_IMAGE=local/busybox:latest

# say MSG...: one status line on stdout.
say() { printf '%s\n' "$*"; }

# die MSG...: error on stderr, exit 1.
die() {
    printf 'testbed: error: %s\n' "$*" >&2
    exit 1
}

# show_log FILE [LINES]: print the tail of a service log to stderr.
show_log() {
    local file=$1 lines=${2:-40}
    if [[ -s $file ]]; then
        printf -- '--- last %s lines of %s ---\n' "$lines" "$file" >&2
        tail -n "$lines" "$file" >&2
        printf -- '---\n' >&2
    else
        printf 'testbed: (no log output in %s)\n' "$file" >&2
    fi
}

# pid_alive PID: true when PID names a live (non-zombie) process.
pid_alive() {
    local pid=$1 state
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    [[ $state != Z ]]
}

# pid_cmdline PID: the process's argv joined with spaces.
pid_cmdline() {
    tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" || true
}

# pid_matches PID WORD: PID is alive and its command line contains WORD.
# Guards against killing an unrelated process that reused a stale PID.
pid_matches() {
    pid_alive "$1" && [[ " $(pid_cmdline "$1")" == *"$2"* ]]
}

# pidfile_pid NAME: the PID recorded in $STATE/pids/NAME.pid (or nothing).
pidfile_pid() {
    local file="$STATE/pids/$1.pid"
    [[ -r $file ]] && tr -dc '0-9' <"$file"
    return 0
}

# stop_pid PID [SECONDS]: SIGTERM, wait up to SECONDS (default 10), SIGKILL.
stop_pid() {
    local pid=$1 timeout=${2:-10} i
    pid_alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < timeout * 10; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    for ((i = 0; i < 20; i++)); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    return 1
}

# pids_of_cmd WORD...: PIDs whose argv contains every WORD (as a substring
# of the joined command line). Used to find our own servers by script name.
pids_of_cmd() {
    local dir pid cmd word ok
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        [[ $pid == "$$" ]] && continue
        cmd=" $(pid_cmdline "$pid") "
        ok=1
        for word in "$@"; do
            [[ $cmd == *"$word"* ]] || { ok=0; break; }
        done
        ((ok)) && printf '%s\n' "$pid"
    done
    return 0
}

# wait_until SECONDS PID LOG CMD...: poll CMD every 0.25 s until it succeeds.
# Fails early if PID (when not empty) dies; prints LOG's tail on failure.
wait_until() {
    local timeout=$1 pid=$2 log=$3 deadline
    shift 3
    deadline=$((SECONDS + timeout))
    while ! "$@" >/dev/null 2>&1; do
        if [[ -n $pid ]] && ! pid_alive "$pid"; then
            printf 'testbed: process %s exited while starting\n' "$pid" >&2
            show_log "$log"
            return 1
        fi
        if ((SECONDS >= deadline)); then
            printf 'testbed: no answer after %ss: %s\n' "$timeout" "$*" >&2
            show_log "$log"
            return 1
        fi
        sleep 0.25
    done
}

# answered_by PID URL: an HTTP answer (any status) at URL carries the header
# "X-Testbed-Pid: PID", i.e. comes from our server with that PID and not
# from something else holding the port.
answered_by() {
    local pid=$1 url=$2
    curl -s -m 5 -o /dev/null -D - "$url" 2>/dev/null |
        tr -d '\r' | grep -qix "x-testbed-pid: $pid"
}

# start_bg NAME LOG CMD...: start CMD detached (own session, stdin from
# /dev/null, output to LOG), record its PID in $STATE/pids/NAME.pid and put
# it in the variable STARTED_PID. setsid does not fork here (a background
# child of a non-interactive shell is not a group leader), so $! is CMD.
start_bg() {
    local name=$1 log=$2
    shift 2
    setsid "$@" </dev/null >"$log" 2>&1 &
    STARTED_PID=$!
    printf '%s\n' "$STARTED_PID" >"$STATE/pids/$name.pid"
}
