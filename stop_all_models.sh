#!/usr/bin/env bash
# Usage: stop_all_models.sh [OPTIONS] [ID|NAME ...]
#
# Stop every model's vLLM server (or only the models named). Its process group (API server, engine
# core, workers) gets SIGTERM: the API server first, so it shuts its engine down in order, the rest of
# the group after half the timeout, then SIGKILL for whatever is left at the timeout. Afterwards no
# process of it is left and its port is free. Stale PID files are removed. Without names, models
# still running under an id the config no longer has are stopped too. The supervisor is told first,
# so that it restarts none of them, and is stopped too once no model is wanted. A config that cannot
# be read does not keep anything running: its problems are shown, and the models are found by their
# PID files (by id).
#
# Options:
#   -c, --config FILE     model config (default: $VLLM_MODEL_CONFIG, else vllm_model_configs.sh)
#   -t, --timeout SECS    how long a model may take to exit after SIGTERM (default: $VLLM_STOP_TIMEOUT, else 60)
#   -h, --help            show this help
#
# Exit status: 0 all stopped, 1 something could not be stopped, 2 bad arguments (or a model named
# that has no PID file while the config cannot be read).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

main() {
    local config="" timeout="${VLLM_STOP_TIMEOUT:-60}" i id
    local -a names=() services=()
    while (($# > 0)); do
        case "$1" in
            -c | --config) config="${2:?--config needs a file}"; shift ;;
            -t | --timeout) timeout="${2:?--timeout needs seconds}"; shift ;;
            -h | --help) usage_from_header "$0"; return 0 ;;
            -*) die 2 "unknown option $1 (see --help)" ;;
            *) names+=("$1") ;;
        esac
        shift
    done
    [[ "$timeout" =~ ^[0-9]+$ ]] || die 2 "--timeout takes whole seconds"

    init_dirs
    CONFIG_MAY_FAIL=1  # stopping works from what runs, config or no config
    load_config "${config:-$(default_config_file)}"
    if ((CONFIG_BROKEN)); then
        warn "the config has the problems above: stopping what runs, by its PID files"
        select_running "${names[@]}"
    else
        select_models "${names[@]}"
    fi
    lock models
    for i in "${SELECTED[@]}"; do
        is_remote "$i" && continue
        id="$(m "$i" id)"
        services+=("$id|$(pid_file_of "$id")|$VLLM_HOST|$(m "$i" port)")
    done
    if ((${#names[@]} == 0)); then
        local aside=" (not in the config)"
        ((!CONFIG_BROKEN)) || aside=""
        while IFS= read -r id; do
            services+=("$id$aside|$(pid_file_of "$id")||")
        done < <(orphan_ids)
    fi
    for id in "${RUNNING_NAMED[@]}"; do
        services+=("$id|$(pid_file_of "$id")||")
    done
    ((${#services[@]} > 0)) || return 0
    local entry status=0
    for entry in "${services[@]}"; do
        id="${entry%%|*}"
        request_stop "${id% (not in the config)}"
    done
    let_supervisor_look
    stop_services "$timeout" "${services[@]}" || status=1
    stop_supervisor_if_idle "$timeout" || status=1
    return "$status"
}

# select_running [ID ...]: with a broken config, the models named must have PID files
# (RUNNING_NAMED); without names, orphan_ids finds them all.
RUNNING_NAMED=()
select_running() {
    local id
    SELECTED=()
    for id in "$@"; do
        [[ -f "$(pid_file_of "$id")" ]] || die 2 "no PID file for '$id' in $RUN_DIR (and the config cannot be read)"
        RUNNING_NAMED+=("$id")
    done
}

main "$@"
