# shellcheck shell=bash disable=SC2034  # the globals set here are read by the scripts
# scripts/lib.sh: what every fleet script shares; sourced, never run.
#
#   config       load_config evaluates vllm_model_configs.sh: each `vllm_model` call becomes one
#                entry of MODEL[index.key]; static checks; model selection by id or name
#   placement    GPU -> CPU binding (vllm_gateway/placement.py, stdlib only) and numactl
#   commands     the environment and command line of each model and of the gateway
#   processes    PID files, process groups (one per service, made by setsid), stop, health
#
# Paths: VLLM_LOG_DIR (default logs) and VLLM_RUN_DIR (default run) are taken relative to the repo,
# as the gateway, which runs there, sees them.

VLLM_REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_PREFIX="$(basename "$0" .sh)"
CONFIG_PREFIX="vllm_model_configs"

MODEL_KEYS=(name id aliases path port url gpus device cpus tensor_parallel_size gpu_memory_utilization
    max_model_len max_num_seqs enforce_eager load_workers log extra_args env api_key launch_command)

# Variables of these scripts that vLLM would take for misspelt settings of its own and warn about.
FLEET_VARIABLES=(VLLM_MODEL_CONFIG VLLM_LOG_DIR VLLM_RUN_DIR VLLM_START_INTERVAL VLLM_START_TIMEOUT
    VLLM_STOP_TIMEOUT VLLM_SIMULATE VLLM_LAUNCH_COMMAND VLLM_HOST VLLM_NUMACTL VLLM_LOG_KEEP
    VLLM_PROGRESS_INTERVAL)

# ---- messages ----------------------------------------------------------------------------------

info() { printf '%s: %s\n' "$LOG_PREFIX" "$*" >&2; }
warn() { printf '%s: warning: %s\n' "$LOG_PREFIX" "$*" >&2; }

# die [CODE] MESSAGE: 1 = something failed, 2 = the configuration or the command line is wrong.
die() {
    local code=1
    if [[ "$1" =~ ^[0-9]+$ ]]; then
        code="$1"
        shift
    fi
    printf '%s: error: %s\n' "$LOG_PREFIX" "$*" >&2
    exit "$code"
}

# usage_from_header FILE: print the comment block at the top of FILE (after the shebang) as help.
usage_from_header() {
    awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

# ---- paths -------------------------------------------------------------------------------------

# repo_path PATH: PATH when absolute, else PATH inside the repo.
repo_path() {
    if [[ "$1" == /* ]]; then
        printf '%s\n' "$1"
    else
        printf '%s/%s\n' "$VLLM_REPO_DIR" "${1#./}"
    fi
}

# display_path PATH: PATH relative to the repo when inside it, for tables and messages.
display_path() {
    if [[ "$1" == "$VLLM_REPO_DIR"/* ]]; then
        printf '%s\n' "${1#"$VLLM_REPO_DIR"/}"
    else
        printf '%s\n' "$1"
    fi
}

init_dirs() {
    LOG_DIR="$(repo_path "${VLLM_LOG_DIR:-logs}")"
    RUN_DIR="$(repo_path "${VLLM_RUN_DIR:-run}")"
}

# default_config_file: $VLLM_MODEL_CONFIG, else vllm_model_configs.sh in the repo.
default_config_file() {
    printf '%s\n' "${VLLM_MODEL_CONFIG:-$VLLM_REPO_DIR/vllm_model_configs.sh}"
}

absolute_path() {
    if [[ "$1" == /* ]]; then
        printf '%s\n' "$1"
    else
        printf '%s/%s\n' "$PWD" "${1#./}"
    fi
}

# ---- config ------------------------------------------------------------------------------------

declare -gA MODEL=()
MODEL_COUNT=0
CONFIG_ERRORS=()
CONFIG_FILE=""

is_model_key() {
    local key
    for key in "${MODEL_KEYS[@]}"; do
        [[ "$key" == "$1" ]] && return 0
    done
    return 1
}

# vllm_model key=value ...: called by the config file, once per model.
vllm_model() {
    local index="$MODEL_COUNT" word key value problem label
    local -a problems=()
    MODEL_COUNT=$((index + 1))
    for word in "$@"; do
        if [[ "$word" != *=* ]]; then
            problems+=("'$word' is not key=value")
            continue
        fi
        key="${word%%=*}"
        value="${word#*=}"
        if ! is_model_key "$key"; then
            problems+=("unknown key '$key' ($(key_hint "$key"))")
        elif [[ -v "MODEL[$index.$key]" ]]; then
            problems+=("key '$key' given twice")
        elif [[ "$value" == *$'\t'* || "$value" == *$'\n'* ]]; then
            problems+=("$key= contains a tab or a newline")
        else
            MODEL["$index.$key"]="$value"
        fi
    done
    label="$(model_label "$index")"
    for problem in "${problems[@]}"; do
        CONFIG_ERRORS+=("$label: $problem")
    done
}

# key_hint KEY: "did you mean gpus?" for a near miss, else the list of keys.
key_hint() {
    local key
    for key in "${MODEL_KEYS[@]}"; do
        if [[ "$key" == "$1"* || "$1" == "$key"* || "${key//_/}" == "${1//[_-]/}" ]]; then
            printf 'did you mean %s?' "$key"
            return 0
        fi
    done
    printf 'keys: %s' "${MODEL_KEYS[*]}"
}

# m INDEX KEY: a model's value, empty when unset.
m() {
    printf '%s' "${MODEL[$1.$2]-}"
}

model_label() {
    local name="${MODEL[$1.name]-}"
    if [[ -n "$name" ]]; then
        printf "model #%s (%s)" "$(($1 + 1))" "$name"
    else
        printf "model #%s" "$(($1 + 1))"
    fi
}

# load_config FILE: evaluate the config; on any static problem print one line each and exit 2.
load_config() {
    local _config_file="$1"
    MODEL=()
    MODEL_COUNT=0
    CONFIG_ERRORS=()
    GPU_CPU_BINDING=()
    if [[ ! -f "$_config_file" ]]; then
        printf '%s: %s: no such file\n' "$CONFIG_PREFIX" "$_config_file" >&2
        exit 2
    fi
    CONFIG_FILE="$(absolute_path "$_config_file")"
    # shellcheck source=/dev/null
    if ! source "$CONFIG_FILE"; then
        CONFIG_ERRORS+=("$CONFIG_FILE could not be evaluated (bash said why above)")
    fi
    VLLM_LAUNCH_COMMAND="${VLLM_LAUNCH_COMMAND:-vllm serve}"
    VLLM_HOST="${VLLM_HOST:-127.0.0.1}"
    VLLM_START_INTERVAL="${VLLM_START_INTERVAL:-15}"
    fill_model_defaults
    check_config
    if ((${#CONFIG_ERRORS[@]} > 0)); then
        local problem
        for problem in "${CONFIG_ERRORS[@]}"; do
            printf '%s: %s\n' "$CONFIG_PREFIX" "$problem" >&2
        done
        exit 2
    fi
}

fill_model_defaults() {
    local i gpus
    for ((i = 0; i < MODEL_COUNT; i++)); do
        if [[ -z "$(m "$i" id)" && -n "$(m "$i" name)" ]]; then
            MODEL["$i.id"]="$(m "$i" name | tr -c 'A-Za-z0-9._\n-' '_')"
        fi
        [[ -n "$(m "$i" device)" ]] || MODEL["$i.device"]="gpu"
        [[ -n "$(m "$i" log)" ]] || MODEL["$i.log"]="$(m "$i" id)_vllm.log"
        gpus="$(m "$i" gpus)"
        if [[ -z "$(m "$i" tensor_parallel_size)" && -n "$gpus" ]]; then
            MODEL["$i.tensor_parallel_size"]="$(count_list "$gpus")"
        fi
    done
}

count_list() {
    local -a items
    IFS=',' read -ra items <<<"$1"
    printf '%s' "${#items[@]}"
}

# check_config: the static checks, shared with the gateway through print_model_config.sh.
check_config() {
    local i j label value key word dup_id
    local -A seen_id=() seen_port=() seen_log=()
    local cpulist='^[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*$'
    [[ "$VLLM_START_INTERVAL" =~ ^[0-9]+$ ]] ||
        CONFIG_ERRORS+=("VLLM_START_INTERVAL=$VLLM_START_INTERVAL is not a number of seconds")
    for ((i = 0; i < MODEL_COUNT; i++)); do
        label="$(model_label "$i")"
        [[ -n "$(m "$i" name)" ]] || CONFIG_ERRORS+=("$label: no name=")
        if [[ -z "$(m "$i" path)" && -z "$(m "$i" url)" ]]; then
            CONFIG_ERRORS+=("$label: needs path= (served here) or url= (served elsewhere)")
        fi
        value="$(m "$i" id)"
        dup_id=0
        if [[ -n "$value" ]]; then
            if [[ ! "$value" =~ ^[A-Za-z0-9._-]+$ ]]; then
                CONFIG_ERRORS+=("$label: id=$value may only hold letters, digits, '.', '_' and '-'")
            elif [[ -n "${seen_id[$value]-}" ]]; then
                CONFIG_ERRORS+=("$label: duplicate id '$value' (also model #${seen_id[$value]})")
                dup_id=1
            else
                seen_id["$value"]=$((i + 1))
            fi
        fi
        if [[ -n "$(m "$i" url)" ]]; then
            [[ "$(m "$i" url)" =~ ^https?://[^[:space:]]+$ ]] ||
                CONFIG_ERRORS+=("$label: url=$(m "$i" url) is not an http:// or https:// URL")
            [[ -z "$(m "$i" port)" ]] ||
                CONFIG_ERRORS+=("$label: url= and port= exclude each other (url= is a server elsewhere)")
        else
            value="$(m "$i" port)"
            if [[ -z "$value" ]]; then
                [[ -z "$(m "$i" path)" ]] || CONFIG_ERRORS+=("$label: no port=")
            elif [[ ! "$value" =~ ^[0-9]+$ ]] || ((10#$value < 1 || 10#$value > 65535)); then
                CONFIG_ERRORS+=("$label: port=$value is not a port number")
            elif [[ -n "${seen_port[$value]-}" ]]; then
                CONFIG_ERRORS+=("$label: duplicate port $value (also model #${seen_port[$value]})")
            else
                seen_port["$value"]=$((i + 1))
            fi
            value="$(log_path "$i")"
            if [[ -n "${seen_log[$value]-}" ]]; then
                ((dup_id)) ||
                CONFIG_ERRORS+=("$label: log $(m "$i" log) is also model #${seen_log[$value]}'s log")
            else
                seen_log["$value"]=$((i + 1))
            fi
        fi
        value="$(m "$i" gpus)"
        if [[ -n "$value" ]]; then
            if [[ ! "$value" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
                CONFIG_ERRORS+=("$label: gpus=$value is not a comma separated list of GPU indices")
            elif [[ -n "$(tr ',' '\n' <<<"$value" | sort | uniq -d)" ]]; then
                CONFIG_ERRORS+=("$label: gpus=$value names a GPU twice")
            fi
        fi
        case "$(m "$i" device)" in
            gpu) ;;
            cpu) [[ -z "$value" ]] || CONFIG_ERRORS+=("$label: device=cpu takes no gpus=") ;;
            *) CONFIG_ERRORS+=("$label: device=$(m "$i" device) is neither gpu nor cpu") ;;
        esac
        value="$(m "$i" cpus)"
        [[ -z "$value" || "$value" =~ $cpulist ]] ||
            CONFIG_ERRORS+=("$label: cpus=$value is not a CPU list like 0-15,32-47")
        for key in tensor_parallel_size max_model_len max_num_seqs load_workers; do
            value="$(m "$i" "$key")"
            [[ -z "$value" || "$value" =~ ^[1-9][0-9]*$ ]] ||
                CONFIG_ERRORS+=("$label: $key=$value is not a positive whole number")
        done
        value="$(m "$i" gpu_memory_utilization)"
        if [[ -n "$value" ]] && ! awk -v v="$value" 'BEGIN { exit !(v ~ /^[0-9]*\.?[0-9]+$/ && v > 0 && v <= 1) }'; then
            CONFIG_ERRORS+=("$label: gpu_memory_utilization=$value is not a fraction in (0, 1]")
        fi
        value="$(m "$i" enforce_eager)"
        [[ -z "$value" || "$value" == true || "$value" == false ]] ||
            CONFIG_ERRORS+=("$label: enforce_eager=$value is neither true nor false")
        value="$(m "$i" aliases)"
        [[ -z "$value" || "$value" =~ ^[^,[:space:]]+(,[^,[:space:]]+)*$ ]] ||
            CONFIG_ERRORS+=("$label: aliases=$value is not a comma separated list of names")
        for word in $(m "$i" env); do
            [[ "$word" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
                CONFIG_ERRORS+=("$label: env= word '$word' is not KEY=VALUE")
        done
        for ((j = 0; j < i; j++)); do
            if [[ -n "$(m "$i" name)" && "$(m "$i" name)" == "$(m "$j" name)" && "$(m "$i" url)$(m "$j" url)" == "" ]] &&
                [[ "$(m "$i" path)" != "$(m "$j" path)" ]]; then
                CONFIG_ERRORS+=("$label: same name as model #$((j + 1)) but another path (replicas serve the same weights)")
            fi
        done
    done
}

# select_models [ID|NAME ...]: SELECTED=(indices), every model when no argument.
select_models() {
    local arg i found
    SELECTED=()
    if (($# == 0)); then
        for ((i = 0; i < MODEL_COUNT; i++)); do
            SELECTED+=("$i")
        done
        return 0
    fi
    for arg in "$@"; do
        found=0
        for ((i = 0; i < MODEL_COUNT; i++)); do
            if [[ "$arg" == "$(m "$i" id)" || "$arg" == "$(m "$i" name)" ]]; then
                [[ " ${SELECTED[*]} " == *" $i "* ]] || SELECTED+=("$i")
                found=1
            fi
        done
        ((found)) || die 2 "no model with id or name '$arg' in $CONFIG_FILE"
    done
}

# orphan_ids: ids of PID files in RUN_DIR that no model of the config has (removed or renamed while
# running), the gateway's aside.
orphan_ids() {
    local file id i known
    for file in "$RUN_DIR"/*.pid; do
        [[ -e "$file" ]] || continue
        id="$(basename "$file" .pid)"
        [[ "$id" != api_server ]] || continue
        known=0
        for ((i = 0; i < MODEL_COUNT; i++)); do
            [[ "$(m "$i" id)" != "$id" ]] || known=1
        done
        ((known)) || printf '%s\n' "$id"
    done
}

is_remote() {
    [[ -n "$(m "$1" url)" ]]
}

log_path() {
    local name
    name="$(m "$1" log)"
    if [[ "$name" == /* ]]; then
        printf '%s\n' "$name"
    else
        printf '%s/%s\n' "${LOG_DIR:-$VLLM_REPO_DIR/logs}" "$name"
    fi
}

# probe_host HOST: the address to connect to for a server listening on HOST.
probe_host() {
    case "$1" in
        "" | 0.0.0.0 | "::" | "[::]") printf '127.0.0.1\n' ;;
        *) printf '%s\n' "$1" ;;
    esac
}

base_url() {
    if is_remote "$1"; then
        printf '%s\n' "$(m "$1" url)"
    else
        printf 'http://%s:%s\n' "$(probe_host "$VLLM_HOST")" "$(m "$1" port)"
    fi
}

# ---- machine checks and placement --------------------------------------------------------------

# port_in_use HOST PORT: something accepts connections there.
port_in_use() {
    # shellcheck disable=SC2016  # expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$(probe_host "$1")" "$2" 2>/dev/null
}

# numactl_command: the numactl to bind with, empty when binding is off (with the reason told once).
numactl_command() {
    local wanted="${VLLM_NUMACTL-numactl}"
    if [[ -z "$wanted" || "$wanted" == none ]]; then
        return 0
    fi
    if command -v "$wanted" >/dev/null; then
        printf '%s\n' "$wanted"
    fi
}

# or_none VALUE: VALUE, or "none" when empty.
or_none() {
    printf '%s' "${1:-none}"
}

# plan_placement MODE INDEX...: fill PLACE_CPUS / PLACE_NODES / PLACE_COUNT / PLACE_NOTE per model,
# KNOWN_GPUS (" 0 1 ... "), GPU_PROBLEM (why GPUs cannot be listed), ONLINE_COUNT and PLACE_ERRORS.
# MODE "simulate" places only models with cpus= and lists no GPU.
plan_placement() {
    local mode="$1" i tag a b c d e entry
    shift
    local -a args=() requests=()
    declare -gA PLACE_CPUS=() PLACE_NODES=() PLACE_COUNT=() PLACE_NOTE=()
    KNOWN_GPUS=" "
    GPU_PROBLEM=""
    PLACE_ERRORS=()
    ONLINE_COUNT="$(nproc 2>/dev/null || printf '1')"
    for i in "$@"; do
        if [[ "$mode" == simulate ]]; then
            [[ -z "$(m "$i" cpus)" ]] || requests+=("$i||$(m "$i" cpus)")
        else
            requests+=("$i|$(m "$i" gpus)|$(m "$i" cpus)")
        fi
    done
    if [[ "$mode" == simulate && ${#requests[@]} -eq 0 ]]; then
        return 0
    fi
    command -v python3 >/dev/null || die "python3 is needed to place the models on CPUs"
    for entry in "${GPU_CPU_BINDING[@]}"; do
        args+=(--binding "$entry")
    done
    while IFS='|' read -r tag a b c d e; do
        case "$tag" in
            model)
                PLACE_CPUS["$a"]="$b"
                PLACE_NODES["$a"]="$c"
                PLACE_COUNT["$a"]="$d"
                PLACE_NOTE["$a"]="$e"
                ;;
            gpu) KNOWN_GPUS+="$a " ;;
            nogpu) GPU_PROBLEM="$a" ;;
            online) ONLINE_COUNT="$b" ;;
            error) PLACE_ERRORS+=("$a") ;;
        esac
    done < <(printf '%s\n' "${requests[@]}" |
        python3 "$VLLM_REPO_DIR/vllm_gateway/placement.py" "${args[@]}" plan)
}

# validate_machine MODE INDEX...: everything that would make a start fail, one line each, before
# anything starts. MODE is "simulate" or "vllm". Needs plan_placement first.
validate_machine() {
    local mode="$1" i j label port path gpu tp pp gpus missing numactl
    shift
    MACHINE_ERRORS=("${PLACE_ERRORS[@]}")
    for i in "$@"; do
        label="model $(m "$i" id)"
        port="$(m "$i" port)"
        if port_in_use "$VLLM_HOST" "$port"; then
            MACHINE_ERRORS+=("$label: port $port is already in use")
        fi
        [[ "$mode" == simulate ]] && continue
        path="$(m "$i" path)"
        if [[ "$path" == /* || "$path" == ./* || "$path" == ../* || "$path" == "~"* ]] && [[ ! -e "$path" ]]; then
            MACHINE_ERRORS+=("$label: model path $path does not exist")
        fi
        gpus="$(m "$i" gpus)"
        [[ "$(m "$i" device)" == gpu && -n "$gpus" ]] || continue
        if [[ -n "$GPU_PROBLEM" ]]; then
            MACHINE_ERRORS+=("$label: gpus=$gpus cannot be checked: $GPU_PROBLEM")
        else
            missing=""
            for gpu in ${gpus//,/ }; do
                [[ "$KNOWN_GPUS" == *" $gpu "* ]] || missing+="${missing:+,}$gpu"
            done
            [[ -z "$missing" ]] ||
                MACHINE_ERRORS+=("$label: no GPU $missing on this host (GPUs here:${KNOWN_GPUS% })")
        fi
        tp="$(m "$i" tensor_parallel_size)"
        pp="$(sed -nE 's/.*(--pipeline-parallel-size|-pp)[ =]([0-9]+).*/\2/p' <<<"$(m "$i" extra_args)")"
        if ((tp * ${pp:-1} != $(count_list "$gpus"))); then
            MACHINE_ERRORS+=("$label: tensor_parallel_size=$tp${pp:+ x pipeline $pp} does not match the $(count_list "$gpus") GPUs in gpus=$gpus")
        fi
    done
    if [[ "$mode" != simulate ]]; then
        check_memory_fractions
    fi
    numactl="$(numactl_command)"
    if [[ -n "$numactl" && "${DRY_RUN:-0}" != 1 ]]; then
        for i in "$@"; do
            [[ -n "${PLACE_CPUS[$i]-}" ]] || continue
            if ! j="$("$numactl" "--physcpubind=${PLACE_CPUS[$i]}" ${PLACE_NODES[$i]:+"--membind=${PLACE_NODES[$i]}"} true 2>&1)"; then
                MACHINE_ERRORS+=("model $(m "$i" id): numactl cannot bind CPUs ${PLACE_CPUS[$i]}: ${j%%$'\n'*}")
            fi
        done
    fi
}

# check_memory_fractions: per GPU, the gpu_memory_utilization of every local GPU model in the config
# (vLLM's default 0.9 when unset) must add up to 1.0 at most: they all share the GPU's memory.
check_memory_fractions() {
    local i gpu problem
    local -a rows=()
    for ((i = 0; i < MODEL_COUNT; i++)); do
        is_remote "$i" && continue
        [[ "$(m "$i" device)" == gpu ]] || continue
        for gpu in $(m "$i" gpus | tr ',' ' '); do
            rows+=("$gpu|$(m "$i" gpu_memory_utilization)|$(m "$i" id)")
        done
    done
    ((${#rows[@]} > 0)) || return 0
    while IFS= read -r problem; do
        MACHINE_ERRORS+=("$problem")
    done < <(printf '%s\n' "${rows[@]}" | awk -F'|' '
        { fraction = ($2 == "" ? 0.9 : $2); sum[$1] += fraction; who[$1] = who[$1] " " $3 "=" fraction }
        END { for (gpu in sum) if (sum[gpu] > 1.0 + 1e-9)
            printf "GPU %s: gpu_memory_utilization adds up to %.3f > 1.0 (%s )\n", gpu, sum[gpu], who[gpu] }' |
        sort -t' ' -k2,2n)
}

# ---- commands ----------------------------------------------------------------------------------

# gateway_python: $GATEWAY_PYTHON, else the repo's .venv, else python3.
gateway_python() {
    if [[ -n "${GATEWAY_PYTHON:-}" ]]; then
        printf '%s\n' "$GATEWAY_PYTHON"
    elif [[ -x "$VLLM_REPO_DIR/.venv/bin/python" ]]; then
        printf '%s\n' "$VLLM_REPO_DIR/.venv/bin/python"
    else
        printf 'python3\n'
    fi
}

# env_default NAME VALUE: NAME=its value in our environment if set there, else VALUE.
env_default() {
    if [[ -n "${!1+set}" ]]; then
        printf '%s=%s' "$1" "${!1}"
    else
        printf '%s=%s' "$1" "$2"
    fi
}

# model_env INDEX THREADS CPULIST: MODEL_ENV=(KEY=VALUE ...), the spec's tuning with thread counts
# from the model's CPU set, each overridable by a variable of the same name in our environment (or
# the config file), then the model's env= words, which win.
model_env() {
    local i="$1" threads="$2" cpus="$3" name word k replaced
    MODEL_ENV=()
    if [[ "$(m "$i" device)" == gpu && -n "$(m "$i" gpus)" ]]; then
        MODEL_ENV+=("CUDA_VISIBLE_DEVICES=$(m "$i" gpus)")
    fi
    for name in OMP_NUM_THREADS MKL_NUM_THREADS NUMEXPR_NUM_THREADS NUMEXPR_MAX_THREADS TORCH_CPU_CORES; do
        MODEL_ENV+=("$(env_default "$name" "$threads")")
    done
    MODEL_ENV+=(
        "$(env_default TOKENIZERS_PARALLELISM true)"
        "$(env_default CUDA_DEVICE_MAX_CONNECTIONS 16)"
        "$(env_default VLLM_CPU_OMP_THREADS_BIND "${cpus:-auto}")"
        "$(env_default PYTORCH_CUDA_ALLOC_CONF expandable_segments:True)"
        "$(env_default VLLM_ALLOW_LONG_MAX_MODEL_LEN 1)"
        "$(env_default KMP_AFFINITY granularity=fine,compact,1,0)"
        "$(env_default KMP_BLOCKTIME 0)"
        "$(env_default OMP_SCHEDULE dynamic)"
    )
    for word in $(m "$i" env); do
        replaced=0
        for k in "${!MODEL_ENV[@]}"; do
            if [[ "${MODEL_ENV[k]%%=*}" == "${word%%=*}" ]]; then
                MODEL_ENV[k]="$word"
                replaced=1
            fi
        done
        ((replaced)) || MODEL_ENV+=("$word")
    done
}

# model_argv INDEX SIMULATE: MODEL_ARGV=(the server's command line).
model_argv() {
    local i="$1" simulate="$2" path name word
    local -a launch names extra
    path="$(m "$i" path)"
    name="$(m "$i" name)"
    names=("$name")
    [[ -z "$(m "$i" aliases)" ]] || IFS=',' read -ra extra <<<"$(m "$i" aliases)"
    names+=("${extra[@]}")
    if [[ "$simulate" == 1 ]]; then
        MODEL_ARGV=("$(gateway_python)" -m vllm_simulator --model "$path"
            --served-model-name "${names[@]}" --host "$VLLM_HOST" --port "$(m "$i" port)")
        [[ -z "$(m "$i" max_num_seqs)" ]] || MODEL_ARGV+=(--max-num-seqs "$(m "$i" max_num_seqs)")
        [[ -z "$(m "$i" max_model_len)" ]] || MODEL_ARGV+=(--max-model-len "$(m "$i" max_model_len)")
        [[ -z "$(m "$i" api_key)" ]] || MODEL_ARGV+=(--api-key "$(m "$i" api_key)")
        return 0
    fi
    read -ra launch <<<"${MODEL[$i.launch_command]:-$VLLM_LAUNCH_COMMAND}"
    if [[ "${launch[-1]}" == serve ]]; then
        MODEL_ARGV=("${launch[@]}" "$path")  # `vllm serve MODEL`
    else
        MODEL_ARGV=("${launch[@]}" --model "$path")  # python -m vllm.entrypoints.openai.api_server
    fi
    MODEL_ARGV+=(--served-model-name "${names[@]}" --host "$VLLM_HOST" --port "$(m "$i" port)")
    [[ -z "$(m "$i" tensor_parallel_size)" ]] ||
        MODEL_ARGV+=(--tensor-parallel-size "$(m "$i" tensor_parallel_size)")
    [[ -z "$(m "$i" gpu_memory_utilization)" ]] ||
        MODEL_ARGV+=(--gpu-memory-utilization "$(m "$i" gpu_memory_utilization)")
    [[ -z "$(m "$i" max_model_len)" ]] || MODEL_ARGV+=(--max-model-len "$(m "$i" max_model_len)")
    [[ -z "$(m "$i" max_num_seqs)" ]] || MODEL_ARGV+=(--max-num-seqs "$(m "$i" max_num_seqs)")
    [[ "$(m "$i" enforce_eager)" != true ]] || MODEL_ARGV+=(--enforce-eager)
    [[ -z "$(m "$i" load_workers)" ]] || MODEL_ARGV+=(--max-parallel-loading-workers "$(m "$i" load_workers)")
    [[ -z "$(m "$i" api_key)" ]] || MODEL_ARGV+=(--api-key "$(m "$i" api_key)")
    # extra_args is split on white space (no quotes): write JSON values without spaces.
    for word in $(m "$i" extra_args); do
        MODEL_ARGV+=("$word")
    done
}

# unset_fleet_variables: `env -u` words for our own settings exported to us.
unset_fleet_variables() {
    local name
    UNSET_ARGS=()
    for name in "${FLEET_VARIABLES[@]}"; do
        if [[ " $(compgen -e | tr '\n' ' ') " == *" $name "* ]]; then
            UNSET_ARGS+=(-u "$name")
        fi
    done
}

# full_argv INDEX SIMULATE: FULL_ARGV=(setsid env ... [numactl ...] server ...) plus PLACE_TEXT,
# a one-line description of the binding.
full_argv() {
    local i="$1" simulate="$2" numactl cpus nodes threads
    numactl="$(numactl_command)"
    cpus="${PLACE_CPUS[$i]-}"
    nodes="${PLACE_NODES[$i]-}"
    threads="${PLACE_COUNT[$i]:-0}"
    if [[ -z "$cpus" || -z "$numactl" ]]; then
        cpus=""
        threads="$ONLINE_COUNT"
    fi
    model_env "$i" "$threads" "$cpus"
    model_argv "$i" "$simulate"
    unset_fleet_variables
    FULL_ARGV=(setsid env "${UNSET_ARGS[@]}" "${MODEL_ENV[@]}")
    if [[ -n "$cpus" ]]; then
        FULL_ARGV+=("$numactl" "--physcpubind=$cpus")
        [[ -z "$nodes" ]] || FULL_ARGV+=("--membind=$nodes")
        PLACE_TEXT="CPUs $cpus${nodes:+, memory node $nodes} (${PLACE_NOTE[$i]})"
    elif [[ -z "$numactl" && -n "${PLACE_CPUS[$i]-}" ]]; then
        PLACE_TEXT="unbound (no numactl)"
    else
        PLACE_TEXT="unbound${PLACE_NOTE[$i]:+ (${PLACE_NOTE[$i]})}"
    fi
    FULL_ARGV+=("${MODEL_ARGV[@]}")
}

# shell_word WORD: WORD quoted for a shell only when it needs it.
shell_word() {
    if [[ "$1" =~ ^[A-Za-z0-9_./:=,+@%^-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# print_command LOG ARGV...: ARGV as a shell would run it with its output going to LOG; the words
# after `env` (-u NAME and NAME=VALUE) one a line, so the environment reads as a list.
print_command() {
    local log="$1" text="" k=0
    shift
    local -a argv=("$@")
    while ((k < ${#argv[@]})); do
        [[ -z "$text" ]] || text+=" "
        text+="$(shell_word "${argv[k]}")"
        if [[ "${argv[k]}" == env ]]; then
            k=$((k + 1))
            while ((k < ${#argv[@]})); do
                if [[ "${argv[k]}" == -u ]]; then
                    text+=" \\"$'\n'"    -u ${argv[k + 1]}"
                    k=$((k + 2))
                elif [[ "${argv[k]}" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]]; then
                    text+=" \\"$'\n'"    $(shell_word "${argv[k]}")"
                    k=$((k + 1))
                else
                    break
                fi
            done
            text+=" \\"$'\n'" "
            continue
        fi
        k=$((k + 1))
    done
    printf '%s \\\n  >> %s 2>&1 < /dev/null &\n' "$text" "$(shell_word "$log")"
}

# ---- logs --------------------------------------------------------------------------------------

# rotate_log FILE: keep the previous runs as FILE.1 (newest) .. FILE.$VLLM_LOG_KEEP.
rotate_log() {
    local file="$1" keep="${VLLM_LOG_KEEP:-5}" n
    mkdir -p "$(dirname "$file")"
    [[ -s "$file" ]] || return 0
    for ((n = keep - 1; n >= 1; n--)); do
        [[ ! -e "$file.$n" ]] || mv -f "$file.$n" "$file.$((n + 1))"
    done
    if ((keep >= 1)); then
        mv -f "$file" "$file.1"
    fi
}

log_tail() {
    local file="$1" lines="${2:-30}"
    if [[ -s "$file" ]]; then
        printf '%s: ---- last %s lines of %s ----\n' "$LOG_PREFIX" "$lines" "$(display_path "$file")" >&2
        tail -n "$lines" "$file" | sed 's/^/    /' >&2
    else
        printf '%s: (%s is empty)\n' "$LOG_PREFIX" "$(display_path "$file")" >&2
    fi
}

# ---- processes ---------------------------------------------------------------------------------
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

# launch LOG PIDFILE MODE ARGV...: start ARGV in the background in the repo, output to LOG.
# setsid makes it the leader of a new session and process group, with the PID we record.
launch() {
    local log="$1" pid_file="$2" mode="$3" pid
    shift 3
    mkdir -p "$(dirname "$pid_file")"
    (
        cd "$VLLM_REPO_DIR" || exit 1
        exec 9>&- # the lock stays with us, not with the servers
        exec "$@" >>"$log" 2>&1 </dev/null
    ) &
    pid=$!
    printf '%s %s %s\n' "$pid" "$(proc_starttime "$pid")" "$mode" >"$pid_file"
    LAUNCHED_PID="$pid"
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
    local timeout="$1" entry label file host port state pid waited=0 failed=0
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
    # waited counts half seconds: until every leader is gone, at most half the timeout ...
    while any_leader_alive "${live_pids[@]}" && ((waited < timeout)); do
        sleep 0.5
        waited=$((waited + 1))
    done
    for pid in "${live_pids[@]}"; do
        [[ -z "$(group_members "$pid")" ]] || signal_group TERM "$pid"
    done
    # ... then until every group is empty, up to the whole timeout.
    while any_group_alive "${live_pids[@]}" && ((waited < timeout * 2)); do
        sleep 0.5
        waited=$((waited + 1))
    done
    for pid in "${live_pids[@]}"; do
        if [[ -n "$(group_members "$pid")" ]]; then
            warn "PID $pid's group did not exit within ${timeout}s of SIGTERM: sending SIGKILL"
            signal_group KILL "$pid"
        fi
    done
    waited=0
    while any_group_alive "${live_pids[@]}" && ((waited < 20)); do
        sleep 0.5
        waited=$((waited + 1))
    done
    for entry in "${live[@]}"; do
        IFS="|" read -r label file host port <<<"$entry"
        read -r pid _ <"$file"
        if [[ -n "$(group_members "$pid")" ]]; then
            warn "$label: processes $(group_members "$pid" | tr '\n' ' ')survived SIGKILL"
            failed=1
            continue
        fi
        rm -f "$file"
        waited=0
        while [[ -n "$port" ]] && port_in_use "$host" "$port" && ((waited < 20)); do
            sleep 0.5
            waited=$((waited + 1))
        done
        if [[ -n "$port" ]] && port_in_use "$host" "$port"; then
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

# ---- the gateway -------------------------------------------------------------------------------

# load_gateway_env: GATEWAY_ENV_FILE (default gateway.env in the repo, when present), exported.
load_gateway_env() {
    local file="${GATEWAY_ENV_FILE:-}"
    if [[ -z "$file" ]]; then
        file="$VLLM_REPO_DIR/gateway.env"
        [[ -f "$file" ]] || return 0
    else
        file="$(repo_path "$file")"
        [[ -f "$file" ]] || die 2 "GATEWAY_ENV_FILE $file does not exist"
    fi
    set -a
    # shellcheck source=/dev/null
    source "$file"
    set +a
    GATEWAY_ENV_LOADED="$file"
}

gateway_settings() {
    GATEWAY_PID_FILE="$(pid_file_of api_server)"
    GATEWAY_LOG_DIR_RESOLVED="$(repo_path "${GATEWAY_LOG_DIR:-${VLLM_LOG_DIR:-logs}}")"
    GATEWAY_STDOUT_LOG="$GATEWAY_LOG_DIR_RESOLVED/api_server.stdout.log"
    GATEWAY_LISTEN_HOST="${GATEWAY_HOST:-0.0.0.0}"
    GATEWAY_LISTEN_PORT="${GATEWAY_PORT:-1024}"
    GATEWAY_HEALTH_URL="http://$(probe_host "$GATEWAY_LISTEN_HOST"):$GATEWAY_LISTEN_PORT/health"
}
