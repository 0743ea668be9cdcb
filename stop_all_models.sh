#!/usr/bin/env bash
# Usage: stop_all_models.sh [OPTIONS] [ID|NAME ...]
#
# Stop every model's vLLM server (or only the models named). Its process group (API server, engine
# core, workers) gets SIGTERM: the API server first, so it shuts its engine down in order, the rest of
# the group after half the timeout, then SIGKILL for whatever is left at the timeout. Afterwards no
# process of it is left and its port is free. Stale PID files are removed. Without names, models
# still running under an id the config no longer has are stopped too.
#
# Options:
#   -c, --config FILE     model config (default: $VLLM_MODEL_CONFIG, else vllm_model_configs.sh)
#   -t, --timeout SECS    how long a model may take to exit after SIGTERM (default: $VLLM_STOP_TIMEOUT, else 60)
#   -h, --help            show this help
#
# Exit status: 0 all stopped, 1 something could not be stopped, 2 bad config or arguments.
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
    load_config "${config:-$(default_config_file)}"
    select_models "${names[@]}"
    lock models
    for i in "${SELECTED[@]}"; do
        is_remote "$i" && continue
        id="$(m "$i" id)"
        services+=("$id|$(pid_file_of "$id")|$VLLM_HOST|$(m "$i" port)")
    done
    if ((${#names[@]} == 0)); then
        while IFS= read -r id; do
            services+=("$id (not in the config)|$(pid_file_of "$id")||")
        done < <(orphan_ids)
    fi
    ((${#services[@]} > 0)) || return 0
    stop_services "$timeout" "${services[@]}"
}

main "$@"
