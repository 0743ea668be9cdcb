#!/usr/bin/env bash
# Usage: scripts/print_model_config.sh [CONFIG]
#
# Evaluate the model config with the scripts' own code and print one line per model, fields
# separated by tabs, for the gateway:
#   model  id=  name=  aliases=a,b  path=  base_url=http://HOST:PORT  api_key=  max_num_seqs=
#          device=gpu  gpus=0,1  port=8001  log=  max_concurrency=  idle=none|sleep|stop  cpus=0-15
#          config=<the model's vllm_model words, defaults filled, as bash would read them>
# CONFIG defaults to $VLLM_MODEL_CONFIG, else vllm_model_configs.sh in the repo. On a static problem
# (unknown key, no name, neither path nor url, duplicate id or port, a tab or newline in a value,
# ...) it prints one line per problem to stderr, prefixed "vllm_model_configs: ", and exits 2.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

main() {
    case "${1:-}" in
        -h | --help) usage_from_header "$0"; return 0 ;;
    esac
    (($# <= 1)) || die 2 "takes at most one argument, the config file"
    init_dirs
    load_config "${1:-$(default_config_file)}"
    local i
    for ((i = 0; i < MODEL_COUNT; i++)); do
        printf 'model\tid=%s\tname=%s\taliases=%s\tpath=%s\tbase_url=%s\tapi_key=%s\tmax_num_seqs=%s\tdevice=%s\tgpus=%s\tport=%s\tlog=%s\tmax_concurrency=%s\tidle=%s\tcpus=%s\tconfig=%s\n' \
            "$(m "$i" id)" "$(m "$i" name)" "$(m "$i" aliases)" "$(m "$i" path)" "$(m "$i" base_url)" \
            "$(m "$i" api_key)" "$(m "$i" max_num_seqs)" "$(m "$i" device)" "$(m "$i" gpus)" \
            "$(m "$i" port)" "$(m "$i" log_path)" "$(m "$i" max_concurrency)" "$(m "$i" idle)" \
            "$(m "$i" cpus)" "$(m "$i" config_line)"
    done
}

main "$@"
