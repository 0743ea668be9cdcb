#!/usr/bin/env bash
# Usage: status_all_services.sh [OPTIONS]
#
# One line per model, one for the supervisor and one for the gateway: state, PID, port, /health,
# GPUs, the CPUs the process is bound to (from /proc), uptime, restarts and log file. A supervised
# model's state is the supervisor's: loading, ready, sleeping, waking, stopped (idle: it starts on
# the next request), restarting, failed (docs/fleet.md); under the table, why each failed or
# restarting model is so, and a failed model's last log lines.
#
# Options:
#   -c, --config FILE     model config (default: $VLLM_MODEL_CONFIG, else vllm_model_configs.sh)
#   -h, --help            show this help
#
# Exit status: 0 everything runs (or is stopped as idle) and answers /health with 200, 1 something
# does not, 2 bad config (the table is shown all the same, from the PID files).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

ROWS=()
ALL_WELL=1

main() {
    local config=""
    while (($# > 0)); do
        case "$1" in
            -c | --config) config="${2:?--config needs a file}"; shift ;;
            -h | --help) usage_from_header "$0"; return 0 ;;
            *) die 2 "unknown argument $1 (see --help)" ;;
        esac
        shift
    done
    init_dirs
    CONFIG_MAY_FAIL=1  # what runs is shown whatever the config says; its problems above the table
    load_config "${config:-$(default_config_file)}"
    load_gateway_env
    gateway_settings

    ROWS+=("SERVICE|STATE|PID|PORT|HEALTH|GPUS|CPUS|UPTIME|RESTARTS|LOG")
    local i url aside="(not in the config)"
    local -a ids=() orphans=()
    for ((i = 0; i < MODEL_COUNT; i++)); do
        is_remote "$i" || ids+=("$(m "$i" id)")
    done
    mapfile -t orphans < <(orphan_ids)
    ids+=("${orphans[@]}")
    read_supervisor_view "${ids[@]}"
    ((!CONFIG_BROKEN)) || aside="(config unreadable)"
    for ((i = 0; i < MODEL_COUNT; i++)); do
        if is_remote "$i"; then
            remote_row "$i"
        else
            add_row "$(m "$i" id)" "$(pid_file_of "$(m "$i" id)")" "$(m "$i" port)" \
                "$(m "$i" base_url)/health" "$(or_none "$(m "$i" gpus)")" "$(m "$i" log_path)"
        fi
    done
    for i in "${orphans[@]}"; do
        # port and /health from the model's last launch
        url="${HEALTH_URL[$i]:--}"
        add_row "$i" "$(pid_file_of "$i")" "$(port_of_url "$url")" "$url" - "$aside"
    done
    add_row "$SUPERVISOR_ID" "$(pid_file_of "$SUPERVISOR_ID")" - - - "$LOG_DIR/supervisor.log"
    add_row gateway "$GATEWAY_PID_FILE" "$GATEWAY_LISTEN_PORT" "$GATEWAY_HEALTH_URL" - \
        "$GATEWAY_LOG_DIR_RESOLVED/vllm_api_server.log"
    print_table
    ((${#ids[@]} == 0)) || vllm_fleet status --failures --run-dir "$RUN_DIR" "${ids[@]}"
    if ((CONFIG_BROKEN)); then
        warn "the config has the problems shown above: the models are listed from their PID files"
        return 2
    fi
    ((ALL_WELL)) || return 1
}

# port_of_url URL: "http://127.0.0.1:8001/health" -> 8001; "-" -> "-".
port_of_url() {
    local rest="${1##*:}"
    [[ "$1" == *:*:* ]] || rest="-"
    printf '%s' "${rest%%/*}"
}

# add_row LABEL PIDFILE PORT HEALTH_URL GPUS LOG
add_row() {
    local label="$1" file="$2" port="$3" url="$4" gpus="$5" log="$6" state pid health="-" cpus="-" uptime="-"
    local supervised="${SUPERVISED[$label]-}" restarts="${RESTARTS[$label]:--}"
    read -r state pid <<<"$(service_state "$file")"
    if [[ -n "$supervised" && "$state" != running ]]; then
        state="$supervised"  # restarting or failed (the supervisor says why below), or stopped as idle
        pid="-"
        [[ "$state" == stopped ]] || ALL_WELL=0
        [[ "${SUPERVISED_MODE[$label]-}" != simulated ]] || state="$state(simulated)"
        ROWS+=("$label|$state|$pid|$port|-|$gpus|-|-|$restarts|$(display_path "$log")")
        return 0
    fi
    case "$state" in
        running)
            [[ "$url" == - ]] || health="$(health_text "$url")"
            cpus="$(awk '/^Cpus_allowed_list:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)"
            uptime="$(uptime_of "$pid")"
            [[ -z "$supervised" ]] || state="$supervised"
            if [[ "$(awk '{ print $3 }' "$file")" == simulated ]]; then
                state="$state(simulated)"
            fi
            # The supervisor has no /health: running is all it can be.
            [[ "$label" == "$SUPERVISOR_ID" || ("$health" == ok && "$url" != -) ]] || ALL_WELL=0
            ;;
        stale)
            state="dead(stale pid file)"
            ALL_WELL=0
            ;;
        *)
            pid="-"
            ALL_WELL=0
            ;;
    esac
    [[ "$log" == "("* ]] || log="$(display_path "$log")"
    ROWS+=("$label|$state|$pid|$port|$health|$gpus|${cpus:--}|$uptime|$restarts|$log")
}

remote_row() {
    local i="$1" health
    health="$(health_text "$(m "$i" base_url)/health")"
    [[ "$health" == ok ]] || ALL_WELL=0
    ROWS+=("$(m "$i" id)|remote|-|-|$health|-|-|-|-|$(m "$i" url)")
}

health_text() {
    local code
    code="$(http_status "$1")"
    case "$code" in
        200) printf 'ok' ;;
        000 | "") printf 'no-answer' ;;
        *) printf 'http-%s' "$code" ;;
    esac
}

print_table() {
    printf '%s\n' "${ROWS[@]}" | awk -F'|' '
        { for (c = 1; c <= NF; c++) { cell[NR, c] = $c; if (length($c) > width[c]) width[c] = length($c) } n = NF }
        END { for (r = 1; r <= NR; r++) { line = ""
                for (c = 1; c <= n; c++) line = line sprintf(c < n ? "%-" width[c] "s  " : "%s", cell[r, c])
                print line } }'
}

main "$@"
