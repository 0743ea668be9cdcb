# shellcheck shell=bash disable=SC2034  # the globals set here are read by the scripts
# scripts/lib.sh: what every fleet script shares; sourced, never run.
#
#   config       load_config evaluates vllm_model_configs.sh and hands what its `vllm_model` calls
#                collected to vllm_fleet, which checks it and fills MODEL[index.key]; model selection
#   start        vllm_fleet places the models on CPUs, checks the machine and builds their commands
#   processes    PID files, process groups (one per service, made by setsid), stop, health, logs;
#                in scripts/lib_processes.sh
#
# The rules (config checks, placement, memory fractions, command lines) live in vllm_fleet/, run
# by fleet_python (standard library only); bash does the process control.
#
# Paths: VLLM_LOG_DIR (default logs) and VLLM_RUN_DIR (default run) are taken relative to the repo,
# as the gateway, which runs there, sees them.

VLLM_REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LOG_PREFIX="$(basename "$0" .sh)"
CONFIG_PREFIX="vllm_model_configs"

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

# or_none VALUE: VALUE, or "none" when empty.
or_none() {
    printf '%s' "${1:-none}"
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

# ---- the fleet's rules -------------------------------------------------------------------------

# repo_python: the repo's .venv interpreter when there is one, else the machine's python3. Started
# directly, it skips a version manager's shim that `python3` may be (pyenv's is a bash script: 0.13 s
# of CPU a call against 0.02 s here, and a script calls vllm_fleet a few times per model).
repo_python() {
    if [[ -x "$VLLM_REPO_DIR/.venv/bin/python" ]]; then
        printf '%s\n' "$VLLM_REPO_DIR/.venv/bin/python"
    else
        printf 'python3\n'
    fi
}

# fleet_python: the interpreter that runs vllm_fleet (standard library only): repo_python.
fleet_python() {
    local python
    python="$(repo_python)"
    [[ "$python" != python3 ]] || command -v python3 >/dev/null ||
        die "python3 is needed to run vllm_fleet (the config checks, the placement, the supervisor)"
    printf '%s\n' "$python"
}

# vllm_fleet COMMAND ARG...: vllm_fleet/ (see vllm_fleet/cli.py) with fleet_python.
vllm_fleet() {
    local python
    python="$(fleet_python)"
    "$python" "$VLLM_REPO_DIR/vllm_fleet" "$@"
}

# ---- config ------------------------------------------------------------------------------------

declare -gA MODEL=()
MODEL_COUNT=0
CONFIG_FILE=""
CONFIG_DOCUMENT=()

# vllm_model key=value ...: called by the config file, once per model.
vllm_model() {
    CONFIG_DOCUMENT+=(model "$#" "$@")
}

# m INDEX KEY: a model's value, empty when unset. Besides the keys of vllm_model (defaults filled)
# each model has log_path (empty for a model served elsewhere) and base_url.
m() {
    printf '%s' "${MODEL[$1.$2]-}"
}

# load_config FILE: evaluate the config and hand what it collected to vllm_fleet (the document of
# vllm_fleet/document.py): each vllm_model call's words, GPU_CPU_BINDING, and the variables the file
# made, for a model's tuning may come from one (vllm_fleet sees the exported ones in its
# environment). On any static problem vllm_fleet prints one line each and we exit 2.
# Needs bash 4.4 (mapfile -d, ${var@a}, wait for a process substitution).
# With CONFIG_MAY_FAIL=1 (stop and status, which work from what runs) a broken config sets
# CONFIG_BROKEN=1 and leaves no model, instead of exiting; its problems are said all the same.
CONFIG_MAY_FAIL=0
CONFIG_BROKEN=0
load_config() {
    local _config_file="$1" _name="" _k=0
    local -A _known=()
    local -a _fields=()
    MODEL=()
    MODEL_COUNT=0
    GPU_CPU_BINDING=()
    if [[ ! -f "$_config_file" ]]; then
        printf '%s: %s: no such file\n' "$CONFIG_PREFIX" "$_config_file" >&2
        config_failed 2
        return 0
    fi
    CONFIG_FILE="$(absolute_path "$_config_file")"
    CONFIG_DOCUMENT=(file "$CONFIG_FILE")
    for _name in $(compgen -v); do
        _known["$_name"]=1
    done
    # shellcheck source=/dev/null
    source "$CONFIG_FILE" || CONFIG_DOCUMENT+=(unevaluated)
    for _name in "${GPU_CPU_BINDING[@]}"; do
        CONFIG_DOCUMENT+=(binding "$_name")
    done
    for _name in $(compgen -v); do
        if [[ -z "${_known[$_name]-}" && "${!_name@a}" != *[aA]* ]]; then
            CONFIG_DOCUMENT+=(variable "$_name" "${!_name}")
        fi
    done
    mapfile -d '' -t _fields < <(config_document | vllm_fleet models --log-dir "${LOG_DIR:-$VLLM_REPO_DIR/logs}")
    wait "$!" || {
        config_failed "$?"
        return 0
    }
    for ((_k = 0; _k + 1 < ${#_fields[@]}; _k += 2)); do
        case "${_fields[_k]}" in
            models) MODEL_COUNT="${_fields[_k + 1]}" ;;
            VLLM_HOST) VLLM_HOST="${_fields[_k + 1]}" ;;
            VLLM_START_INTERVAL) VLLM_START_INTERVAL="${_fields[_k + 1]}" ;;
            *) MODEL["${_fields[_k]}"]="${_fields[_k + 1]}" ;;
        esac
    done
}

# config_failed STATUS: exit with STATUS, or with CONFIG_MAY_FAIL=1 go on with no model.
config_failed() {
    ((CONFIG_MAY_FAIL)) || exit "$1"
    CONFIG_BROKEN=1
    MODEL=()
    MODEL_COUNT=0
    VLLM_HOST="${VLLM_HOST:-127.0.0.1}"
}

# config_document: what load_config collected, as NUL-terminated fields for vllm_fleet.
config_document() {
    printf '%s\0' "${CONFIG_DOCUMENT[@]}"
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
        [[ "$id" != api_server && "$id" != "$SUPERVISOR_ID" ]] || continue
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

# ---- ports -------------------------------------------------------------------------------------

# probe_host HOST: the address to connect to for a server listening on HOST.
probe_host() {
    case "$1" in
        "" | 0.0.0.0 | "::" | "[::]") printf '127.0.0.1\n' ;;
        *) printf '%s\n' "$1" ;;
    esac
}

# port_in_use HOST PORT: something accepts connections there.
port_in_use() {
    # shellcheck disable=SC2016  # expanded by the inner bash
    timeout 3 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$(probe_host "$1")" "$2" 2>/dev/null
}

# ---- start -------------------------------------------------------------------------------------

# gateway_python: $GATEWAY_PYTHON, else repo_python.
gateway_python() {
    if [[ -n "${GATEWAY_PYTHON:-}" ]]; then
        printf '%s\n' "$GATEWAY_PYTHON"
    else
        repo_python
    fi
}

# plan_start DRY_RUN SIMULATE INDEX...: vllm_fleet places the models on CPUs and checks the machine
# (ports, paths, GPUs, memory fractions, numactl); on any problem it says which and we exit 2, with
# nothing started. A dry run then prints the commands. Otherwise vllm_fleet writes each model's
# launch record in RUN_DIR (the supervisor starts it from there), and per model: PLACE_TEXT (its
# binding in words), START_WARNING (said when it starts), LOGGED_COMMAND (its command for the log,
# keys hidden) and its argv, "${PLAN[@]:ARGV_FROM[i]:ARGV_LEN[i]}".
plan_start() {
    local dry_run="$1" simulate="$2" i k=0
    shift 2
    local -a options=(--log-dir "$LOG_DIR" --prog "$LOG_PREFIX" --python "$(gateway_python)" --repo "$VLLM_REPO_DIR")
    ((!simulate)) || options+=(--simulate)
    if ((dry_run)); then
        config_document | vllm_fleet plan --dry-run "${options[@]}" "$@" || exit "$?"
        return 0
    fi
    options+=(--run-dir "$RUN_DIR")  # each model's launch record, for the supervisor
    PLAN=()
    PLACE_TEXT=()
    START_WARNING=()
    LOGGED_COMMAND=()
    ARGV_FROM=()
    ARGV_LEN=()
    # Each model's fields: INDEX PLACE_TEXT START_WARNING LOGGED_COMMAND N and the N words of its argv.
    mapfile -d '' -t PLAN < <(config_document | vllm_fleet plan "${options[@]}" "$@")
    wait "$!" || exit "$?"
    while ((k < ${#PLAN[@]})); do
        i="${PLAN[k]}"
        PLACE_TEXT[i]="${PLAN[k + 1]}"
        START_WARNING[i]="${PLAN[k + 2]}"
        LOGGED_COMMAND[i]="${PLAN[k + 3]}"
        ARGV_FROM[i]=$((k + 5))
        ARGV_LEN[i]="${PLAN[k + 4]}"
        k=$((ARGV_FROM[i] + ARGV_LEN[i]))
    done
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

# shellcheck source=scripts/lib_processes.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib_processes.sh"

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
