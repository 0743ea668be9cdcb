#!/usr/bin/env bash
# Usage: start_all_services.sh [OPTIONS]
#
# Start every model (start_all_models.sh), then the gateway (start_api_server.sh).
#
# Options:
#   -c, --config FILE     model config for both (default: $VLLM_MODEL_CONFIG, else vllm_model_configs.sh)
#   -n, --dry-run         print the commands and environment instead of running them
#   -s, --simulate        run the vLLM simulator in place of vLLM (no GPU needed); also VLLM_SIMULATE=1
#   -w, --wait            wait until every model, then the gateway, answers /health
#   -i, --interval SECS   pause between two model launches (default: $VLLM_START_INTERVAL, else 15;
#                         with --simulate 0 unless asked for)
#   -h, --help            show this help
#
# Exit status: 0 all started, 1 a model or the gateway failed (the gateway still starts when only
# some models fail), 2 the config or the machine is not ready (nothing was started).
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/scripts/lib.sh"

main() {
    local status=0
    local -a model_args=() gateway_args=()
    while (($# > 0)); do
        case "$1" in
            -c | --config)
                # the gateway must read the same file, from its own working directory
                export VLLM_MODEL_CONFIG
                VLLM_MODEL_CONFIG="$(absolute_path "${2:?--config needs a file}")"
                shift
                ;;
            -n | --dry-run) model_args+=("$1"); gateway_args+=("$1") ;;
            -s | --simulate | -w | --wait) model_args+=("$1") ;;
            -i | --interval) model_args+=("$1" "${2:?--interval needs seconds}"); shift ;;
            -h | --help) usage_from_header "$0"; return 0 ;;
            *) die 2 "unknown argument $1 (see --help)" ;;
        esac
        [[ "$1" != -w && "$1" != --wait ]] || gateway_args+=("$1")
        shift
    done
    "$VLLM_REPO_DIR/start_all_models.sh" "${model_args[@]}" || status=$?
    if ((status == 2)); then
        return 2
    elif ((status != 0)); then
        warn "some models did not start; starting the gateway for the others"
    fi
    "$VLLM_REPO_DIR/start_api_server.sh" "${gateway_args[@]}" || return 1
    return "$status"
}

main "$@"
