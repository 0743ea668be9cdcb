#!/usr/bin/env bash
# Usage: start_all_models.sh [OPTIONS] [ID|NAME ...]
#
# Start one vLLM server per model of vllm_model_configs.sh (or only the models named), each in its
# own process group, bound to its CPUs with numactl, logging to VLLM_LOG_DIR. Everything is checked
# first (ports, model paths, GPUs, memory fractions, tensor parallel sizes); on any problem nothing
# starts. A model already running is left alone; models with url= run elsewhere and are skipped.
# The supervisor (started here when none runs) launches the servers and restarts one that exits or
# hangs, with a backoff (VLLM_RESTART_* settings, docs/fleet.md). A model named here that last ran
# simulated starts simulated again, unless --no-simulate.
#
# Options:
#   -c, --config FILE     model config (default: $VLLM_MODEL_CONFIG, else vllm_model_configs.sh)
#   -n, --dry-run         check, then print each command and its environment instead of running it
#   -s, --simulate        run the vLLM simulator in place of vLLM (no GPU, no weights); also VLLM_SIMULATE=1
#       --no-simulate     run vLLM even for models that last ran simulated
#   -w, --wait            wait until every model answers /health, showing progress
#   -i, --interval SECS   pause between two launches (default: $VLLM_START_INTERVAL, else 15; with
#                         --simulate 0 unless this option or VLLM_START_INTERVAL in the environment asks)
#   -t, --timeout SECS    with --wait: give up after SECS (default: $VLLM_START_TIMEOUT, else 1800)
#   -h, --help            show this help
#
# Exit status: 0 started (or already running), 1 a model failed to start or to become healthy,
# 2 the config or the machine is not ready (nothing was started).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

main() {
    local config="" dry_run=0 simulate="${VLLM_SIMULATE:-0}" wait=0 interval="" timeout="${VLLM_START_TIMEOUT:-1800}"
    # Read before the config sets its default: an interval the caller asked for.
    local asked_interval="${VLLM_START_INTERVAL:-}"
    local -a names=()
    while (($# > 0)); do
        case "$1" in
            -c | --config) config="${2:?--config needs a file}"; shift ;;
            -n | --dry-run) dry_run=1 ;;
            -s | --simulate) simulate=1 ;;
            --no-simulate) simulate=no ;;
            -w | --wait) wait=1 ;;
            -i | --interval) interval="${2:?--interval needs seconds}"; shift ;;
            -t | --timeout) timeout="${2:?--timeout needs seconds}"; shift ;;
            -h | --help) usage_from_header "$0"; return 0 ;;
            -*) die 2 "unknown option $1 (see --help)" ;;
            *) names+=("$1") ;;
        esac
        shift
    done
    local keep_mode=1
    [[ "$simulate" != no ]] || keep_mode=0
    [[ "$simulate" == 1 ]] || simulate=0

    init_dirs
    load_config "${config:-$(default_config_file)}"
    if [[ -z "$interval" ]]; then
        # The stagger spares GPUs loading weights at once; simulated models load nothing.
        if ((simulate)) && [[ -z "$asked_interval" ]]; then
            interval=0
        else
            interval="$VLLM_START_INTERVAL"
        fi
    fi
    [[ "$interval" =~ ^[0-9]+$ && "$timeout" =~ ^[0-9]+$ ]] || die 2 "--interval and --timeout take whole seconds"
    select_models "${names[@]}"
    ((dry_run)) || lock models

    local i state pid
    local -a to_start=() running=()
    for i in "${SELECTED[@]}"; do
        if is_remote "$i"; then
            info "$(m "$i" id): served elsewhere ($(m "$i" url)), skipped"
            continue
        fi
        read -r state pid <<<"$(service_state "$(pid_file_of "$(m "$i" id)")")"
        case "$state" in
            running)
                info "$(m "$i" id) is already running (PID $pid, port $(m "$i" port)): not started again"
                running+=("$i")
                ;;
            stale)
                ((dry_run)) || rm -f "$(pid_file_of "$(m "$i" id)")"
                info "$(m "$i" id): removed a stale PID file (PID $pid is gone)"
                to_start+=("$i")
                ;;
            *) to_start+=("$i") ;;
        esac
    done

    if ((!simulate && keep_mode && ${#names[@]} > 0 && ${#to_start[@]} > 0)) && last_ran_simulated "${to_start[@]}"; then
        info "$(ids_of "${to_start[@]}") last ran simulated: started simulated again (--no-simulate for vLLM)"
        simulate=1
    fi
    plan_start "$dry_run" "$simulate" "${to_start[@]}"
    if ((dry_run)); then
        return 0
    fi

    local failed=0 n=0
    for i in "${to_start[@]}"; do
        if ((n > 0 && interval > 0)); then
            info "waiting ${interval}s before the next model (--interval)"
            sleep "$interval"
        fi
        start_model "$i" "$simulate" || failed=1
        n=$((n + 1))
    done
    # Models that ran on while no supervisor did (it died) are adopted by a new one.
    ((${#running[@]} == 0)) || ensure_supervisor
    unlock
    if ((wait)); then
        ALREADY_RUNNING=" ${running[*]} "
        wait_until_healthy "$timeout" "${to_start[@]}" "${running[@]}" || failed=1
    fi
    return "$failed"
}

# start_model INDEX SIMULATE: launch the command plan_start built, record it in the log.
start_model() {
    local i="$1" simulate="$2" id log pid_file mode=vllm
    id="$(m "$i" id)"
    log="$(m "$i" log_path)"
    pid_file="$(pid_file_of "$id")"
    if ((simulate)); then
        mode=simulated
    fi
    [[ -z "${START_WARNING[i]}" ]] || warn "${START_WARNING[i]}"
    rotate_log "$log"
    printf '==== %s: %s starts %s (%s) ====\n%s\n' "$(date '+%F %T')" "$LOG_PREFIX" "$id" "$mode" \
        "${LOGGED_COMMAND[i]}" >>"$log"
    rm -f "$pid_file"
    request_start "$id"
    ensure_supervisor
    if ! wait_for_pid_file "$id"; then
        printf '%s: error: the supervisor did not start %s\n' "$LOG_PREFIX" "$id" >&2
        log_tail "$LOG_DIR/supervisor.log" 10
        return 1
    fi
    info "started $id (PID $LAUNCHED_PID, port $(m "$i" port), GPUs $(or_none "$(m "$i" gpus)"), ${PLACE_TEXT[i]}), log $(display_path "$log")"
    sleep 1
    if [[ -z "$(group_members "$LAUNCHED_PID")" ]]; then
        # Gone within a second: a wrong command or flag, which no retry mends.
        request_stop "$id"
        let_supervisor_look
        stop_services "${VLLM_STOP_TIMEOUT:-60}" "$id|$pid_file|$VLLM_HOST|$(m "$i" port)" >/dev/null 2>&1 || true
        printf '%s: error: %s exited at once; not restarted (fix it, then start it again)\n' "$LOG_PREFIX" "$id" >&2
        log_tail "$log"
        return 1
    fi
}

# last_ran_simulated INDEX...: every one of these models' last launch ran the simulator.
last_ran_simulated() {
    local id
    local -a ids=()
    read -ra ids <<<"$(ids_of "$@")"
    read_supervisor_view "${ids[@]}"
    for id in "${ids[@]}"; do
        [[ "${SUPERVISED_MODE[$id]-}" == simulated ]] || return 1
    done
}

# ids_of INDEX...: the models' ids, space separated (an id has no space).
ids_of() {
    local i
    local -a ids=()
    for i in "$@"; do
        ids+=("$(m "$i" id)")
    done
    printf '%s' "${ids[*]}"
}

# Indices (" 0 2 ") of the models that ran before this start: healthy, they were not just started.
ALREADY_RUNNING=" "

# wait_until_healthy TIMEOUT INDEX...: poll each model's /health; report deaths with their log.
wait_until_healthy() {
    local timeout="$1" i id pid code state started last_report=0 failed=0 progress="${VLLM_PROGRESS_INTERVAL:-10}"
    shift
    local -a pending=("$@") still=() report=() ids=()
    started="$SECONDS"
    info "waiting for ${#pending[@]} model(s) to answer /health (timeout ${timeout}s)"
    while ((${#pending[@]} > 0)); do
        still=()
        report=()
        read -ra ids <<<"$(ids_of "${pending[@]}")"
        read_supervisor_view "${ids[@]}"
        for i in "${pending[@]}"; do
            id="$(m "$i" id)"
            read -r state pid <<<"$(service_state "$(pid_file_of "$id")")"
            code="$(http_status "$(m "$i" base_url)/health")"
            # Healthy once the supervisor has seen it too: status then shows it ready, not loading.
            if [[ "$code" == 200 && -n "${SUPERVISED[$id]-}" && "${SUPERVISED[$id]-}" != ready ]]; then
                code=unseen
            fi
            if [[ "${SUPERVISED[$id]-}" =~ ^(sleeping|waking|stopped)$ ]]; then  # ready, then idle already
                info "$id was ready and is ${SUPERVISED[$id]} now, idle (port $(m "$i" port))"
            elif [[ "$code" == 200 && "$ALREADY_RUNNING" == *" $i "* ]]; then
                info "$id was already running and is healthy (up $(uptime_of "$pid"), port $(m "$i" port))"
            elif [[ "$code" == 200 ]]; then
                info "$id is healthy after $(uptime_of "$pid") (port $(m "$i" port))"
            elif [[ "$state" != running || "${SUPERVISED[$id]-}" =~ ^(restarting|failed)$ ||
                "${RESTARTS[$id]-}" =~ ^[1-9] ]]; then  # it died since this start asked for it
                printf '%s: error: %s died while loading (the supervisor restarts it after a backoff)\n' \
                    "$LOG_PREFIX" "$id" >&2
                log_tail "$(m "$i" log_path)"
                failed=1
            else
                still+=("$i")
                if [[ "$code" == 000 ]] && port_in_use "$VLLM_HOST" "$(m "$i" port)"; then
                    report+=("$id loading, port open ($(uptime_of "$pid"))")
                elif [[ "$code" == 000 ]]; then
                    report+=("$id loading ($(uptime_of "$pid"))")
                elif [[ "$code" == unseen ]]; then
                    report+=("$id answers, its supervisor has yet to see it ($(uptime_of "$pid"))")
                else
                    report+=("$id answers HTTP $code ($(uptime_of "$pid"))")
                fi
            fi
        done
        pending=("${still[@]}")
        ((${#pending[@]} > 0)) || break
        if ((SECONDS - started >= timeout)); then
            printf '%s: error: not healthy after %ss: %s\n' "$LOG_PREFIX" "$timeout" "${report[*]}" >&2
            return 1
        fi
        if ((SECONDS - last_report >= progress)); then
            info "$((SECONDS - started))s: $(printf '%s; ' "${report[@]}" | sed 's/; $//')"
            last_report="$SECONDS"
        fi
        sleep 1
    done
    return "$failed"
}

main "$@"
