# shellcheck shell=bash disable=SC2034  # the globals set here are read by the scripts
# scripts/lib_processes.sh: the process control of lib.sh (PID files, process groups, the
# supervisor, stop, health); sourced by lib.sh, never run.
#
# A PID file holds "PID STARTTIME MODE": STARTTIME (from /proc) tells our process from a later one
# that got the same PID. Every service leads its own process group (setsid), so stopping it
# means signalling the group: API server, engine core and workers alike.

pid_file_of() {
    printf '%s/%s.pid\n' "$RUN_DIR" "$1"
}

proc_starttime() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
    stat="${stat##*) }"
    awk '{ print $20 }' <<<"$stat"
}

# group_members PGID: live (non-zombie) processes of the group or session PGID leads.
group_members() {
    ps -eo pid=,pgid=,sid=,stat= 2>/dev/null |
        awk -v g="$1" '($2 == g || $3 == g) && $4 !~ /^Z/ { print $1 }'
}

leader_alive() {
    local state
    state="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
    [[ -n "$state" && "$state" != Z* ]]
}

# service_state PIDFILE: prints "running PID", "stale PID" (file left by a dead service) or "stopped".
service_state() {
    local file="$1" pid started mode
    if [[ ! -f "$file" ]]; then
        printf 'stopped\n'
        return 0
    fi
    read -r pid started mode <"$file" || true
    if [[ ! "$pid" =~ ^[0-9]+$ ]]; then
        printf 'stale 0\n'
    elif leader_alive "$pid"; then
        if [[ -z "$started" || "$(proc_starttime "$pid")" == "$started" ]]; then
            printf 'running %s\n' "$pid"
        else
            printf 'stale %s\n' "$pid"  # the PID now belongs to another process
        fi
    elif [[ -n "$(group_members "$pid")" ]]; then
        printf 'running %s\n' "$pid"  # the leader is gone, its workers are not
    else
        printf 'stale %s\n' "$pid"
    fi
}

# lock NAME: one start or stop of NAME at a time.
lock() {
    mkdir -p "$RUN_DIR"
    command -v flock >/dev/null || return 0
    exec 9>"$RUN_DIR/.$1.lock"
    flock -n 9 || die "another start or stop of the $1 is running (lock $RUN_DIR/.$1.lock)"
}

unlock() {
    exec 9>&-
}

# http_status URL: the status code of a GET, 000 when nothing answers.
http_status() {
    if command -v curl >/dev/null; then
        curl -s --noproxy '*' -o /dev/null -m 3 -w '%{http_code}' "$1" 2>/dev/null || true
    else
        python3 - "$1" <<'EOF' 2>/dev/null || printf '000'
import sys, urllib.error, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    print(opener.open(sys.argv[1], timeout=3).status, end="")
except urllib.error.HTTPError as error:
    print(error.code, end="")
except OSError:
    print("000", end="")
EOF
    fi
}

# stop_services TIMEOUT "LABEL|PIDFILE|HOST|PORT" ...: stop each service's process group, SIGKILL
# what is left after TIMEOUT seconds; then check the ports are free. Returns 1 if anything survived.
#
# SIGTERM goes to the group leader first: vLLM's API server then shuts its engine core and workers
# down in order. Signalling them all at once makes the API server log the engine's death as an
# error on every stop. After half the timeout, whatever is left of the group gets SIGTERM too.
stop_services() {
    local timeout="$1" entry label file host port state pid failed=0
    shift
    local -a live=() live_pids=()
    for entry in "$@"; do
        IFS="|" read -r label file host port <<<"$entry"
        read -r state pid <<<"$(service_state "$file")"
        case "$state" in
            stopped) info "$label is not running" ;;
            stale)
                rm -f "$file"
                info "$label is not running (removed stale PID file, PID $pid)"
                ;;
            running)
                info "stopping $label (PID $pid)"
                if leader_alive "$pid"; then
                    kill -s TERM "$pid" 2>/dev/null || true
                else
                    signal_group TERM "$pid"  # the leader is gone: its orphans directly
                fi
                live+=("$entry")
                live_pids+=("$pid")
                ;;
        esac
    done
    ((${#live[@]} > 0)) || return 0
    # Until every leader is gone, at most half the timeout (TIMEOUT half seconds) ...
    wait_while "$timeout" any_leader_alive "${live_pids[@]}" || true
    for pid in "${live_pids[@]}"; do
        [[ -z "$(group_members "$pid")" ]] || signal_group TERM "$pid"
    done
    # ... then until every group is empty, up to the whole timeout.
    wait_while "$((timeout * 2 - WAITED))" any_group_alive "${live_pids[@]}" || true
    for pid in "${live_pids[@]}"; do
        if [[ -n "$(group_members "$pid")" ]]; then
            warn "PID $pid's group did not exit within ${timeout}s of SIGTERM: sending SIGKILL"
            signal_group KILL "$pid"
        fi
    done
    wait_while 20 any_group_alive "${live_pids[@]}" || true
    for entry in "${live[@]}"; do
        IFS="|" read -r label file host port <<<"$entry"
        read -r pid _ <"$file"
        if [[ -n "$(group_members "$pid")" ]]; then
            warn "$label: processes $(group_members "$pid" | tr '\n' ' ')survived SIGKILL"
            failed=1
            continue
        fi
        rm -f "$file"
        if [[ -n "$port" ]] && ! wait_while 20 port_in_use "$host" "$port"; then
            warn "$label stopped, but port $port is still in use by another process"
            failed=1
        else
            info "$label stopped"
        fi
    done
    return "$failed"
}

any_leader_alive() {
    local pid
    for pid in "$@"; do
        ! leader_alive "$pid" || return 0
    done
    return 1
}

any_group_alive() {
    local pid
    for pid in "$@"; do
        [[ -z "$(group_members "$pid")" ]] || return 0
    done
    return 1
}

# wait_while HALF_SECONDS CONDITION [ARG...]: sleep half a second while CONDITION ARG... succeeds, at
# most HALF_SECONDS times; fails if CONDITION still held then. WAITED: the half seconds slept.
wait_while() {
    local limit="$1"
    shift
    WAITED=0
    while "$@"; do
        ((WAITED < limit)) || return 1
        sleep 0.5
        WAITED=$((WAITED + 1))
    done
}

# signal_group SIGNAL PGID: the group and any process of the session that left the group.
signal_group() {
    local member
    kill -s "$1" -- "-$2" 2>/dev/null || true
    for member in $(group_members "$2"); do
        kill -s "$1" "$member" 2>/dev/null || true
    done
}

# uptime_of PID: "3d04h", "2h05m", "4m10s".
uptime_of() {
    local seconds
    seconds="$(ps -o etimes= -p "$1" 2>/dev/null | tr -d ' ')"
    [[ -n "$seconds" ]] || {
        printf -- '-'
        return 0
    }
    if ((seconds >= 86400)); then
        printf '%dd%02dh' $((seconds / 86400)) $((seconds % 86400 / 3600))
    elif ((seconds >= 3600)); then
        printf '%dh%02dm' $((seconds / 3600)) $((seconds % 3600 / 60))
    else
        printf '%dm%02ds' $((seconds / 60)) $((seconds % 60))
    fi
}

# ---- the supervisor (vllm_fleet/supervisor.py) ---------------------------------------------------
# It owns the model servers: the scripts say what they want in RUN_DIR/<id>.want and it starts,
# restarts and watches. See vllm_fleet/run_dir.py for the files.

SUPERVISOR_ID=supervisor

# request_start ID: ask for a new start of ID (a new token: a failed model runs again).
request_start() {
    printf 'run %s-%s\n' "$(date +%s%N)" "$$" >"$RUN_DIR/$1.want"
}

# request_stop ID: the supervisor leaves ID alone from its next look on.
request_stop() {
    mkdir -p "$RUN_DIR"
    printf 'stop\n' >"$RUN_DIR/$1.want"
}

supervisor_running() {
    [[ "$(service_state "$(pid_file_of "$SUPERVISOR_ID")")" == running* ]]
}

# ensure_supervisor: start the supervisor unless one runs, with this script's environment (its
# VLLM_RESTART_* settings, docs/fleet.md), and wait until it has taken its lock.
ensure_supervisor() {
    ! supervisor_running || return 0
    mkdir -p "$LOG_DIR" "$RUN_DIR"
    local python
    python="$(fleet_python)"
    (
        cd "$VLLM_REPO_DIR" || exit 1
        exec 9>&-
        exec setsid "$python" "$VLLM_REPO_DIR/vllm_fleet" supervise --run-dir "$RUN_DIR" --log-dir "$LOG_DIR" \
            >>"$LOG_DIR/supervisor.log" 2>&1 </dev/null
    ) &
    wait_while 20 negate supervisor_running || {
        log_tail "$LOG_DIR/supervisor.log" 10
        die "the supervisor did not start"
    }
}

# let_supervisor_look: after want files changed, give a running supervisor one look (it looks
# every half second), so that a start it was making when we wrote is in its PID file by now.
let_supervisor_look() {
    ! supervisor_running || sleep 1
}

# stop_supervisor_if_idle TIMEOUT: stop the supervisor once no model is wanted.
stop_supervisor_if_idle() {
    local file
    for file in "$RUN_DIR"/*.want; do
        [[ -e "$file" ]] || continue
        [[ "$(head -c 3 "$file")" != run ]] || return 0
    done
    stop_services "$1" "supervisor|$(pid_file_of "$SUPERVISOR_ID")||" 2>/dev/null
}

# read_supervisor_view ID...: what the supervisor says of each ID (vllm_fleet status), in
# SUPERVISED[id] (its state of the current start, empty when it follows none), RESTARTS[id],
# SUPERVISED_MODE[id] and HEALTH_URL[id] (of its last launch).
declare -gA SUPERVISED=() RESTARTS=() SUPERVISED_MODE=() HEALTH_URL=()
read_supervisor_view() {
    local id state restarts mode url
    (($# > 0)) || return 0
    while IFS=$'\t' read -r id state restarts _ mode url; do
        SUPERVISED["$id"]="${state#-}"
        RESTARTS["$id"]="$restarts"
        SUPERVISED_MODE["$id"]="$mode"
        HEALTH_URL["$id"]="$url"
    done < <(vllm_fleet status --run-dir "$RUN_DIR" "$@")
}

negate() {
    ! "$@"
}

# wait_for_pid_file ID: wait (10 s at most) until the supervisor has started ID; LAUNCHED_PID.
wait_for_pid_file() {
    local file
    file="$(pid_file_of "$1")"
    wait_while 20 negate test -s "$file" || return 1
    read -r LAUNCHED_PID _ <"$file"
}
