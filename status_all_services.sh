#!/usr/bin/env bash
# Usage: status_all_services.sh [OPTIONS]
#
# One line per model and one for the gateway: state, PID, port, /health, GPUs, the CPUs the
# process is bound to (from /proc), uptime and log file.
#
# Options:
#   -c, --config FILE     model config (default: $VLLM_MODEL_CONFIG, else vllm_model_configs.sh)
#   -h, --help            show this help
#
# Exit status: 0 everything runs and answers /health with 200, 1 something does not, 2 bad config.
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
    load_config "${config:-$(default_config_file)}"
    load_gateway_env
    gateway_settings

    ROWS+=("SERVICE|STATE|PID|PORT|HEALTH|GPUS|CPUS|UPTIME|LOG")
    local i
    for ((i = 0; i < MODEL_COUNT; i++)); do
        if is_remote "$i"; then
            remote_row "$i"
        else
            add_row "$(m "$i" id)" "$(pid_file_of "$(m "$i" id)")" "$(m "$i" port)" \
                "$(m "$i" base_url)/health" "$(or_none "$(m "$i" gpus)")" "$(m "$i" log_path)"
        fi
    done
    while IFS= read -r i; do
        add_row "$i" "$(pid_file_of "$i")" - - - "(not in the config)"
    done < <(orphan_ids)
    add_row gateway "$GATEWAY_PID_FILE" "$GATEWAY_LISTEN_PORT" "$GATEWAY_HEALTH_URL" - \
        "$GATEWAY_LOG_DIR_RESOLVED/vllm_api_server.log"
    print_table
    ((ALL_WELL)) || return 1
}

# add_row LABEL PIDFILE PORT HEALTH_URL GPUS LOG
add_row() {
    local label="$1" file="$2" port="$3" url="$4" gpus="$5" log="$6" state pid health="-" cpus="-" uptime="-"
    read -r state pid <<<"$(service_state "$file")"
    case "$state" in
        running)
            [[ "$url" == - ]] || health="$(health_text "$url")"
            cpus="$(awk '/^Cpus_allowed_list:/ { print $2 }' "/proc/$pid/status" 2>/dev/null || true)"
            uptime="$(uptime_of "$pid")"
            if [[ "$(awk '{ print $3 }' "$file")" == simulated ]]; then
                state="running(simulated)"
            fi
            [[ "$health" == ok && "$url" != - ]] || ALL_WELL=0
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
    [[ "$log" == "(not in the config)" ]] || log="$(display_path "$log")"
    ROWS+=("$label|$state|$pid|$port|$health|$gpus|${cpus:--}|$uptime|$log")
}

remote_row() {
    local i="$1" health
    health="$(health_text "$(m "$i" base_url)/health")"
    [[ "$health" == ok ]] || ALL_WELL=0
    ROWS+=("$(m "$i" id)|remote|-|-|$health|-|-|-|$(m "$i" url)")
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
