# shellcheck shell=bash
# Helpers for tests/e2e/run.sh: a throwaway systemd container (systemd-nspawn over an
# overlay of the machine's own /, see /work/shared/notes/e2e-systemd.md), commands inside
# it, bounded waits, TAP-like reporting. Sourced, not executed.

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$E2E_DIR/../.." && pwd)
HOST_PY=/usr/bin/python3          # the system python (not a pyenv shim), also inside the container
CT_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

RUN_ID=$$
MNT_BASE=/mnt/herdsman-e2e-$RUN_ID
RUN_TMP=$(mktemp -d "/tmp/herdsman-e2e-$RUN_ID.XXXXXX")   # host-side scratch, removed at exit
# Kept when a scenario failed: console logs, load summaries, the journal of herdsman@*.
ARTIFACTS=${E2E_ARTIFACTS:-/tmp/herdsman-e2e-$RUN_ID-logs}
MOUNTS=()        # every container dir this run created, for the cleanup trap
SCENARIO_PID=""  # the subshell running the current scenario

# Current container.
CT_DIR=""        # tmpfs with upper/ work/ root/
CT_ROOT=""       # the overlay: the container's / as seen from the host
CT_NAME=""
NSPAWN_PID=""
LEADER=""        # the container's PID 1, as seen from the host

PASSED=0
FAILED=0
SKIPPED=0

# ---------------------------------------------------------------------------------------------
# Reporting

note() { echo "# $*"; }
# Ends the current scenario (they run in a subshell) with a reason.
fail() { echo "# FAIL: $*"; exit 1; }
now() { date +%s.%N; }
# CLOCK_MONOTONIC, the clock load.py reports failures in (shared with the container).
mono() { "$HOST_PY" -c 'import time; print(time.monotonic())'; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# run_scenario NAME FUNCTION: runs FUNCTION in a subshell with set -e (any failing command
# fails the scenario, the ERR trap names it), prints `ok - NAME` / `not ok - NAME`.
run_scenario() {
    local name=$1 rc t0
    shift
    if ! scenario_selected "$name"; then
        skip_scenario "$name" "not selected by E2E_ONLY"
        return 0
    fi
    t0=$(now)
    note "--- $name"
    set +e
    # In the background + wait, so that a signal to this shell runs the cleanup trap at once.
    (
        set -eE
        trap 'echo "# command failed (rc $?) at ${BASH_SOURCE[0]##*/}:$LINENO: $BASH_COMMAND"' ERR
        "$@"
    ) &
    SCENARIO_PID=$!
    wait "$SCENARIO_PID"
    rc=$?
    SCENARIO_PID=""
    stop_all_loads
    set -e
    note "$name: $(elapsed "$t0") s"
        if [ $rc -eq 0 ]; then
        echo "ok - $name"
        PASSED=$((PASSED + 1))
    elif [ $rc -eq 77 ]; then
        # The scenario found it cannot run here (and said why in a note).
        skip_scenario "$name" "cannot run in this container (see the note above)"
    else
        echo "not ok - $name"
        FAILED=$((FAILED + 1))
    fi
    return 0
}

# E2E_ONLY=REGEX runs only the scenarios whose name matches (and `install`, which every
# other needs), for working on a few of them.
scenario_selected() {
    [ -z "${E2E_ONLY:-}" ] || [ "$1" = install ] || echo "$1" | grep -qE -- "$E2E_ONLY"
}

skip_scenario() {
    echo "ok - $1 # SKIP $2"
    PASSED=$((PASSED + 1))
    SKIPPED=$((SKIPPED + 1))
}

# ---------------------------------------------------------------------------------------------
# Bounded waits

# wait_until SECONDS DESCRIPTION COMMAND...: polls COMMAND every 0.2 s until it succeeds;
# returns 1 (after a note) when the deadline passes.
wait_until() {
    local secs=$1 what=$2 deadline
    shift 2
    deadline=$(($(date +%s) + secs))
    while :; do
        if "$@" >/dev/null 2>&1; then return 0; fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            note "timed out after ${secs}s waiting for: $what"
            return 1
        fi
        sleep 0.2
    done
}

# A live (not zombie) process.
pid_alive() {
    local st
    st=$(awk '{ print $3 }' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ]
}

pid_dead() { ! pid_alive "$1"; }

# wait_pid PID SECONDS: waits for a background child of this shell; its exit status, or
# 124 (after killing it) at the deadline.
wait_pid() {
    local pid=$1 secs=$2 deadline
    deadline=$(($(date +%s) + secs))
    while pid_alive "$pid"; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
            return 124
        fi
        sleep 0.1
    done
    local rc=0
    wait "$pid" 2>/dev/null || rc=$?
    return $rc
}

# ---------------------------------------------------------------------------------------------
# The container

# ct_create NAME: a fresh overlay root over / at $MNT_BASE-NAME, with the host's own enabled
# services and timers disabled and masked (postgresql & co. only slow the boot down).
ct_create() {
    CT_NAME="hse2e-$1-$RUN_ID"
    CT_DIR="$MNT_BASE-$1"
    CT_ROOT="$CT_DIR/root"
    mkdir -p "$CT_DIR" || return 1
    mount -t tmpfs -o mode=0755 tmpfs "$CT_DIR" || return 1
    MOUNTS+=("$CT_DIR")
    mkdir -p "$CT_DIR/upper" "$CT_DIR/work" "$CT_ROOT" || return 1
    mount -t overlay overlay -o "lowerdir=/,upperdir=$CT_DIR/upper,workdir=$CT_DIR/work" "$CT_ROOT" ||
        return 1
    local etc="$CT_ROOT/etc/systemd/system" link unit masked=()
    for link in "$etc"/*.wants/*.service "$etc"/*.wants/*.timer; do
        [ -L "$link" ] || continue
        unit=${link##*/}
        case $unit in
            getty@*|dbus*|systemd-journald*|systemd-logind*) continue ;;
        esac
        rm -f "$link"
        ln -sf /dev/null "$etc/$unit"
        masked+=("$unit")
    done
    # Heavy daemons that may be installed but not enabled on some machines.
    for unit in postgresql.service docker.service containerd.service ssh.service \
        mariadb.service mysql.service redis-server.service nginx.service apache2.service \
        exim4.service cron.service unattended-upgrades.service console-getty.service; do
        if [ -e "$CT_ROOT/lib/systemd/system/$unit" ] && [ ! -e "$etc/$unit" ]; then
            ln -sf /dev/null "$etc/$unit"
            masked+=("$unit")
        fi
    done
    note "container $CT_NAME at $CT_ROOT; masked: ${masked[*]:-none}"
    # This machine is a Docker-style image whose policy-rc.d forbids maintainer scripts to
    # start, reload or restart services (exit 101): a real system has none. Without removing
    # it, the package's postinst cannot reload running instances on upgrade.
    if [ -e "$CT_ROOT/usr/sbin/policy-rc.d" ]; then
        rm -f "$CT_ROOT/usr/sbin/policy-rc.d"
        note "removed /usr/sbin/policy-rc.d (exit 101) inside the container"
    fi
    # man-db's dpkg trigger re-indexes every man page on each package install (about 15 s here,
    # under load): off inside the container, as debconf man-db/auto-update=false would.
    rm -f "$CT_ROOT/var/lib/man-db/auto-update"
    # A persistent journal (in the overlay), so `journalctl -b -1` works after a reboot.
    mkdir -p "$CT_ROOT/var/log/journal" "$CT_ROOT/var/lib/herdsman-e2e"
    return 0
}

# ct_boot: boots the current container root and waits until systemd says running/degraded.
ct_boot() {
    local t0 deadline pid state=""
    t0=$(now)
    LEADER=""
    # `--balance steer` loads an eBPF program: nspawn's default capability set lacks CAP_BPF,
    # and its seccomp filter refuses bpf() (it allows it only with CAP_SYS_ADMIN). A host
    # systemd has neither restriction; the unit's own (steer.conf) is what the test checks.
    setsid systemd-nspawn --register=no --keep-unit -q -D "$CT_ROOT" --private-network \
        --capability=CAP_BPF --system-call-filter=bpf \
        -M "$CT_NAME" -b systemd.firstboot=off >>"$CT_DIR/console.log" 2>&1 </dev/null &
    NSPAWN_PID=$!
    # nspawn forks a short-lived outer child first; PID 1 is the child running systemd.
    deadline=$(($(date +%s) + 20))
    while [ -z "$LEADER" ]; do
        for pid in $(pgrep -P "$NSPAWN_PID"); do
            if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = systemd ] && [ -e "/proc/$pid/ns/user" ]; then
                LEADER=$pid
            fi
        done
        [ -n "$LEADER" ] && break
        if ! pid_alive "$NSPAWN_PID" || [ "$(date +%s)" -ge "$deadline" ]; then
            note "container did not start; console:"
            tail -20 "$CT_DIR/console.log" | sed 's/^/#   /'
            return 1
        fi
        sleep 0.05
    done
    deadline=$(($(date +%s) + 60))
    while :; do
        state=$(timeout 10 nsenter -t "$LEADER" -a systemctl is-system-running 2>/dev/null) || true
        case $state in running|degraded) break ;; esac
        if ! pid_alive "$NSPAWN_PID" || [ "$(date +%s)" -ge "$deadline" ]; then
            note "container not up (state '$state'); console:"
            tail -20 "$CT_DIR/console.log" | sed 's/^/#   /'
            return 1
        fi
        sleep 0.1
    done
    note "container booted in $(elapsed "$t0") s (leader pid $LEADER, state $state)"
    if [ "$state" = degraded ]; then
        note "failed units: $(ct systemctl --failed --plain --no-legend | awk '{print $1}' | tr '\n' ' ')"
    fi
    return 0
}

# ct_wait_exit SECONDS: waits for systemd-nspawn to exit (after poweroff/reboot inside).
ct_wait_exit() {
    local rc=0
    wait_pid "$NSPAWN_PID" "$1" || rc=$?
    [ $rc -ne 124 ] || { note "systemd-nspawn did not exit within $1 s"; return 1; }
    note "systemd-nspawn exited with status $rc"
    NSPAWN_PID=""
    LEADER=""
    return 0
}

# ct_stop: poweroff, bounded; then SIGTERM (nspawn halts the container), then SIGKILL.
ct_stop() {
    [ -n "$NSPAWN_PID" ] || return 0
    if pid_alive "$NSPAWN_PID"; then
        if [ -n "$LEADER" ]; then
            timeout 10 nsenter -t "$LEADER" -a systemctl poweroff >/dev/null 2>&1 || true
        fi
        if ! wait_until 30 "container poweroff" pid_dead "$NSPAWN_PID"; then
            kill -TERM "$NSPAWN_PID" 2>/dev/null || true
            wait_until 10 "nspawn after SIGTERM" pid_dead "$NSPAWN_PID" ||
                kill -KILL "$NSPAWN_PID" 2>/dev/null || true
        fi
    fi
    wait_pid "$NSPAWN_PID" 10 >/dev/null 2>&1 || true
    NSPAWN_PID=""
    LEADER=""
}

ct_unmount() {
    local dir=$1
    [ -n "$dir" ] || return 0
    umount "$dir/root" 2>/dev/null || umount -l "$dir/root" 2>/dev/null || true
    umount "$dir" 2>/dev/null || umount -l "$dir" 2>/dev/null || true
    rmdir "$dir" 2>/dev/null || true
}

# ct_destroy: stops and unmounts the current container.
ct_destroy() {
    ct_stop
    ct_unmount "$CT_DIR"
    CT_DIR=""
    CT_ROOT=""
}

cleanup() {
    local rc=$? dir
    trap - EXIT INT TERM
    set +e
    if [ -n "$SCENARIO_PID" ] && pid_alive "$SCENARIO_PID"; then
        note "interrupted: stopping the running scenario (pid $SCENARIO_PID)"
        kill -TERM "$SCENARIO_PID" 2>/dev/null
        wait "$SCENARIO_PID" 2>/dev/null
        [ $rc -ne 0 ] || rc=1
    fi
    stop_all_loads
    if [ -n "${KEEP_CT:-}" ] && [ -n "$NSPAWN_PID" ]; then
        note "KEEP_CT set: container left running: nsenter -t $LEADER -a bash; root $CT_ROOT"
        exit $rc
    fi
    if [ "$FAILED" -gt 0 ] || [ $rc -ne 0 ]; then save_artifacts; fi
    ct_stop
    for dir in "${MOUNTS[@]}"; do ct_unmount "$dir"; done
    rm -rf "$RUN_TMP"
    exit $rc
}

save_artifacts() {
    local dir
    [ ${#MOUNTS[@]} -gt 0 ] || return 0
    mkdir -p "$ARTIFACTS"
    if [ -n "$LEADER" ] && pid_alive "$LEADER"; then
        CT_TIMEOUT=20 ct journalctl --no-pager -o short-monotonic -u 'herdsman@*' \
            >"$ARTIFACTS/journal-herdsman.txt" 2>&1
        CT_TIMEOUT=20 ct journalctl --no-pager -o short-monotonic -b -1 -u 'herdsman@*' \
            >"$ARTIFACTS/journal-herdsman-previous-boot.txt" 2>&1
    fi
    for dir in "${MOUNTS[@]}"; do
        mkdir -p "$ARTIFACTS/${dir##*/}"
        cp "$dir"/*.log "$dir"/*.json "$dir"/*.err "$ARTIFACTS/${dir##*/}/" 2>/dev/null
    done
    note "logs kept in $ARTIFACTS"
}

# ct CMD...: runs CMD inside the container (all namespaces of its PID 1), clean environment,
# bounded by $CT_TIMEOUT seconds (default 60).
ct() {
    timeout -k 5 "${CT_TIMEOUT:-60}" nsenter -t "$LEADER" -a \
        env -i PATH="$CT_PATH" LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0 HOME=/root \
        "$@"
}

# ct_sh 'SCRIPT': bash -c inside the container.
ct_sh() { ct bash -c "$1"; }

# ---------------------------------------------------------------------------------------------
# herdsman inside the container

APP=web
PORT=8080
ADDR=127.0.0.1:$PORT
URL=http://$ADDR/
# The worker program is copied into the container's /srv/web (create_app): the service runs
# with PrivateTmp= and the checkout may live under /tmp, invisible to it.
WORKER_CMD=("$HOST_PY" /srv/web/worker.py)
STATE=/var/lib/herdsman-e2e        # scratch dir inside the container (host: $CT_ROOT$STATE)

# Is `herdsman init` implemented in the binary under test?
have_init() { ct herdsman init --help >/dev/null 2>&1; }

# Properties of a unit.
prop() { ct systemctl show -p "$2" --value "$1"; }

# status_json: `herdsman status web --json` inside the container.
status_json() { ct herdsman status "$APP" --json; }

# json_get 'PYTHON EXPR over d' < JSON: prints the value (a bare string, else JSON).
json_get() {
    "$HOST_PY" -c '
import json, sys
d = json.loads(sys.stdin.read())
v = eval(sys.argv[1])
print(v if isinstance(v, str) else json.dumps(v))' "$1"
}

# get_json: one answer from the app.
get_json() { ct curl -sS --max-time 5 -H 'Connection: close' "$URL"; }

# worker_ids_seen N: the set of worker ids answering N new connections, sorted, space-separated.
worker_ids_seen() {
    local urls=() i
    for i in $(seq "$1"); do urls+=("$URL?$i"); done
    ct curl -sS --max-time 20 -H 'Connection: close' -w '\n' "${urls[@]}" |
        "$HOST_PY" -c '
import json, sys
ids = sorted({json.loads(l)["worker_id"] for l in sys.stdin if l.strip()})
print(" ".join(map(str, ids)))'
}

# until_all_seen WANT SECONDS CMD...: runs CMD (it prints what one batch of answers showed,
# space-separated) until the union of all batches is WANT or SECONDS pass; prints the union.
# The kernel wakes every worker waiting on a shared socket and the first to run takes the
# connection, so on a loaded machine one worker can lose 200 races in a row: only a worker
# that never answers within the deadline is a failure.
until_all_seen() {
    local want=$1 end=$(($(date +%s) + $2)) seen=""
    shift 2
    while :; do
        seen=$(printf '%s %s\n' "$seen" "$("$@")" | tr ' ' '\n' | grep -v '^$' | sort -Vu | tr '\n' ' ')
        seen=${seen% }
        [ "$seen" = "$want" ] && break
        [ "$(date +%s)" -lt "$end" ] || break
    done
    echo "$seen"
}

# workers_answering WANT [SECONDS]: the worker ids answering batches of 50 new connections,
# until they are WANT ("0 1 2 3") or SECONDS (30) pass.
workers_answering() { until_all_seen "$1" "${2:-30}" worker_ids_seen 50; }

# generations_seen N: the set of generations answering N new connections.
generations_seen() {
    local urls=() i
    for i in $(seq "$1"); do urls+=("$URL?$i"); done
    ct curl -sS --max-time 20 -H 'Connection: close' -w '\n' "${urls[@]}" |
        "$HOST_PY" -c '
import json, sys
print(" ".join(sorted({str(json.loads(l)["generation"]) + "/" + str(json.loads(l)["version"]) for l in sys.stdin if l.strip()})))'
}

# The socket unit's activation time: must never change across reloads, restarts, upgrades.
socket_stamp() { prop "herdsman@$APP.socket" ActiveEnterTimestampMonotonic; }

# cgroup_pids CGROUP: the pids in that cgroup (a unit's ControlGroup, recorded while it ran:
# systemd clears the property when the unit stops, leftovers or not) and below, one per line,
# sorted; nothing when the cgroup is gone. systemd's named v1 hierarchy, the hybrid layout's
# unified one, or a unified host.
cgroup_pids() {
    # shellcheck disable=SC2016
    ct sh -c 'for r in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
        [ -f "$r$1/cgroup.procs" ] || continue
        find "$r$1" -name cgroup.procs -exec cat {} + | sort -n; exit 0
    done' sh "$1"
}
cgroup_empty() { [ -z "$(cgroup_pids "$1")" ]; }

# describe_pids PID...: "pid (cmdline)" for each, for a failure's note.
describe_pids() {
    local p
    for p in "$@"; do
        printf '%s (%s) ' "$p" "$(ct cat "/proc/$p/cmdline" 2>/dev/null | tr '\0' ' ' | head -c 80)"
    done
}

# ---------------------------------------------------------------------------------------------
# Load inside the container

# load_start NAME MODE [THREADS]: runs tests/e2e/load.py inside the container in the
# background until load_stop; waits (bounded) for its first good answer.
load_start() {
    local name=$1 mode=$2 threads=${3:-6}
    rm -f "$CT_ROOT$STATE/stop-$name" "$CT_ROOT$STATE/ready-$name"
    : >"$CT_ROOT$STATE/load-$name"
        # Copied in: nspawn mounts a fresh /tmp, so a checkout under /tmp is invisible inside.
    cp "$E2E_DIR/load.py" "$CT_ROOT$STATE/load.py"
    CT_TIMEOUT=300 ct "$HOST_PY" "$STATE/load.py" --addr "$ADDR" --mode "$mode" \
        --threads "$threads" --duration 240 --stop-file "$STATE/stop-$name" \
        --ready-file "$STATE/ready-$name" >"$CT_DIR/load-$name.json" 2>"$CT_DIR/load-$name.err" &
    LOAD_PID=$!
    eval "LOAD_PID_$name=$LOAD_PID"
    wait_until 15 "first answer to load $name" test -e "$CT_ROOT$STATE/ready-$name" || return 1
    sleep 0.5   # some traffic before the action
}

# Stops every load client still running (a scenario that failed or was interrupted):
# each one watches its stop file.
stop_all_loads() {
    local f
    [ -n "$CT_ROOT" ] || return 0
    for f in "$CT_ROOT$STATE"/load-*; do
        [ -e "$f" ] && touch "$CT_ROOT$STATE/stop-${f##*/load-}"
    done
    return 0
}

# load_stop NAME: stops it, prints its summary as a note, fails unless it exited cleanly.
load_stop() {
    local name=$1 pid rc=0
    eval "pid=\$LOAD_PID_$name"
    touch "$CT_ROOT$STATE/stop-$name"
    wait_pid "$pid" 40 || rc=$?
    note "load $name: $(cat "$CT_DIR/load-$name.json" 2>/dev/null)"
    if [ -s "$CT_DIR/load-$name.err" ]; then
        note "load $name stderr: $(head -c 2000 "$CT_DIR/load-$name.err")"
    fi
    [ $rc -eq 0 ] || { note "load client $name exited with $rc"; return 1; }
}

# load_field NAME 'EXPR over d'
load_field() { json_get "$2" <"$CT_DIR/load-$1.json"; }
