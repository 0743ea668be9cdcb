#!/usr/bin/env bash
# Usage: tests/gpu_host/check.sh OUT_DIR [-h|--help]
#
# The spec's memory plan, run for real on a GPU host where vLLM is not installed: four models on
# every GPU of the host with the spec's shares (0.325 + 0.325 + 0.155 + 0.155 = 0.96 of each GPU),
# each a stand-in (stand_in_server.py) that takes its share with PyTorch, started by the fleet's own
# scripts under their numactl binding. It records, in OUT_DIR:
#   fixtures/      the host's nvidia-smi and lscpu outputs, as tests/fixtures/nvidia-smi/ keeps them
#   check.log      every step's output: the dry run's placement, what nvidia-smi shows after the
#                  start, after a kill -9 of one model and its restart by the supervisor, and after
#                  the stop; an over-committed config refused before anything starts; each server's
#                  CPUs as the kernel applies them
# Environment: VLLM_NUMACTL (default numactl), PYTHON (default python3, the one with PyTorch),
# WORK_DIR (default OUT_DIR/work): the fleet's config, run and log directories.
# Exit status: 0 every check held, 1 one did not, 2 bad command line.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
SHARES=(0.325 0.325 0.155 0.155)
NAMES=(DeepSeek-R1-0528-Qwen3-14B Qwen3-14B DeepSeek-R1-0528-Qwen3-8B Qwen2.5-7B-Instruct)
FIRST_PORT=18001

say() { printf '\n== %s\n' "$*"; }
fail() {
    printf 'check: FAILED: %s\n' "$*"
    exit 1
}

# record_fixtures DIR: the outputs tests/fixtures/nvidia-smi/<host>/ holds (README.md there says which).
record_fixtures() {
    local dir="$1" bus
    mkdir -p "$dir"
    nvidia-smi topo -m >"$dir/topo_m.txt"
    nvidia-smi >"$dir/smi.txt"
    nvidia-smi --query-gpu=index,uuid,name,pci.bus_id,memory.total,memory.used,utilization.gpu \
        --format=csv,noheader,nounits >"$dir/query_gpu.csv"
    nvidia-smi --query-gpu=index,name,pci.bus_id,memory.total --format=csv >"$dir/query_gpu_header.csv"
    nvidia-smi -q -x >"$dir/smi_q.xml"
    {
        lscpu
        echo "----"
        "${VLLM_NUMACTL:-numactl}" -H 2>&1 || true
        echo "----"
        for bus in $(nvidia-smi --query-gpu=pci.bus_id --format=csv,noheader); do
            bus="${bus,,}"
            bus="${bus#0000}"
            echo "/sys/bus/pci/devices/${bus}/local_cpulist $(cat "/sys/bus/pci/devices/${bus}/local_cpulist" 2>&1)"
        done
    } >"$dir/host.txt"
}

# gpu_reading LABEL: each GPU's memory in use now, as nvidia-smi shows it.
gpu_reading() {
    say "nvidia-smi: $1"
    nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv,noheader
}

# used_mib GPU: that GPU's memory in use, in MiB.
used_mib() {
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -i "$1" | tr -d ' '
}

# write_config FILE GPUS [EXTRA_SHARE]: the four models on GPUS, their weights empty folders beside
# FILE (the stand-in reads none); with EXTRA_SHARE a fifth one.
write_config() {
    local file="$1" gpus="$2" extra="${3:-}" count k models
    models="$(dirname "$file")/models"
    mkdir -p "$models"
    count=$(($(tr -cd , <<<"$gpus" | wc -c) + 1))
    {
        printf 'VLLM_LAUNCH_COMMAND="%s %s"\n' "$PYTHON" "$REPO_DIR/tests/gpu_host/stand_in_server.py"
        printf 'GPU_CPU_BINDING=()\n'
        for k in "${!NAMES[@]}"; do
            mkdir -p "$models/${NAMES[k]}"
            printf 'vllm_model name=%s path=%s port=%d gpus=%s tensor_parallel_size=%d gpu_memory_utilization=%s max_model_len=32768 max_num_seqs=8 enforce_eager=true\n' \
                "${NAMES[k]}" "$models/${NAMES[k]}" $((FIRST_PORT + k)) "$gpus" "$count" "${SHARES[k]}"
        done
        if [[ -n "$extra" ]]; then
            printf 'vllm_model name=one-too-many path=%s port=%d gpus=%s gpu_memory_utilization=%s\n' \
                "$models/${NAMES[0]}" $((FIRST_PORT + ${#NAMES[@]})) "$gpus" "$extra"
        fi
    } >"$file"
}

# server_pid ID: the pid a model's PID file names (empty when it has none).
server_pid() {
    local file="$VLLM_RUN_DIR/$1.pid"
    if [[ -f "$file" ]]; then
        cut -d' ' -f1 "$file"
    fi
}

# wait_for SECONDS COMMAND...: until COMMAND succeeds; fails after SECONDS.
wait_for() {
    local seconds="$1"
    shift
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}

supervised_ready() {
    grep -q '"state": "ready"' "$VLLM_RUN_DIR/$1.status.json" 2>/dev/null
}

restarted() {
    local pid
    pid="$(server_pid "$1")"
    [[ -n "$pid" && "$pid" != "$2" ]] && supervised_ready "$1"
}

main() {
    if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
        sed -n '2,/^set /{/^set /d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
        return 0
    fi
    (($# == 1)) || {
        echo "usage: tests/gpu_host/check.sh OUT_DIR" >&2
        return 2
    }
    local out="$1" gpus before after killed pid id
    local work="${WORK_DIR:-$out/work}"
    mkdir -p "$work"
    export VLLM_MODEL_CONFIG="$work/models.sh" VLLM_RUN_DIR="$work/run" VLLM_LOG_DIR="$work/logs"
    export VLLM_RESTART_DELAY=2 VLLM_START_TIMEOUT=300

    say "host"
    record_fixtures "$out/fixtures"
    nvidia-smi --query-gpu=index,name,pci.bus_id,memory.total --format=csv
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "GPUs", torch.cuda.device_count())'
    gpus="$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)"
    if "${VLLM_NUMACTL:-numactl}" --physcpubind=0 true 2>/dev/null; then
        echo "numactl binds here: ${VLLM_NUMACTL:-numactl}"
    else
        echo "numactl cannot bind here; the models run unbound"
        export VLLM_NUMACTL=none
    fi

    say "an over-committed config is refused before anything starts"
    write_config "$VLLM_MODEL_CONFIG" "$gpus" 0.2
    before="$(used_mib 0)"
    if bash "$REPO_DIR/start_all_models.sh" --wait --interval 0; then
        fail "the over-committed config started"
    fi
    [[ -z "$(ls "$VLLM_RUN_DIR"/*.pid 2>/dev/null)" ]] || fail "a model started from the over-committed config"
    echo "GPU 0 memory before: ${before} MiB, after: $(used_mib 0) MiB"

    say "the spec's plan: dry run"
    write_config "$VLLM_MODEL_CONFIG" "$gpus"
    cat "$VLLM_MODEL_CONFIG"
    bash "$REPO_DIR/start_all_models.sh" --dry-run --interval 3

    say "the spec's plan: started"
    gpu_reading "before the start"
    bash "$REPO_DIR/start_all_models.sh" --wait --interval 3
    gpu_reading "the four models running"
    bash "$REPO_DIR/status_all_services.sh" || true
    for id in "${NAMES[@]}"; do
        pid="$(server_pid "$id")"
        echo "$id: pid $pid, CPUs $(grep Cpus_allowed_list "/proc/$pid/status" | cut -f2)"
    done
    grep -h "stand-in: holding" "$VLLM_LOG_DIR"/*.log || true

    say "kill -9 of ${NAMES[3]}: its memory goes, the supervisor starts it again, it comes back"
    before="$(used_mib 0)"
    killed="$(server_pid "${NAMES[3]}")"
    kill -9 -- "-$killed"
    wait_for 30 test ! -d "/proc/$killed" || fail "the killed server did not go"
    sleep 2
    after="$(used_mib 0)"
    gpu_reading "after the kill -9"
    echo "GPU 0: ${before} MiB before the kill, ${after} MiB after"
    ((after < before)) || fail "the killed model's memory was not freed"
    wait_for 180 restarted "${NAMES[3]}" "$killed" || fail "the supervisor did not bring ${NAMES[3]} back"
    gpu_reading "after the supervisor's restart (pid $(server_pid "${NAMES[3]}"))"
    (($(used_mib 0) > after)) || fail "the restarted model did not take its memory back"
    grep -h '"model": "'"${NAMES[3]}"'"' "$VLLM_LOG_DIR/fleet_events.jsonl" | tail -3 || true

    say "stop: every GPU's memory is freed"
    bash "$REPO_DIR/stop_all_models.sh"
    sleep 2
    gpu_reading "after the stop"
    for gpu in ${gpus//,/ }; do
        (($(used_mib "$gpu") < 1024)) || fail "GPU $gpu still holds $(used_mib "$gpu") MiB after the stop"
    done
    say "every check held"
}

main "$@"
