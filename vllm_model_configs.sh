# shellcheck shell=bash disable=SC2034  # the variables are read by scripts/lib.sh and vllm_fleet
# vllm_model_configs.sh: every vLLM model this host serves, in one place.
#
# Read by start_all_models.sh / stop_all_models.sh / status_all_services.sh and by the gateway
# (vllm_api_server.py), which all evaluate it with bash, so variables and $(...) work as usual.
# Set VLLM_MODEL_CONFIG=/path/to/other.sh to use another file.
#
# One `vllm_model` block per model, as key=value words. Keys (only name and path/url are required):
#   name                    served model name: what clients put in "model"
#   id                      unique handle for the scripts (PID file, CLI selection); default: name.
#                           Two blocks with the same name and different ids are replicas of one model.
#   aliases                 other names clients may use, comma separated
#   path                    model weights folder (or hub id) passed to vLLM
#   port                    port of this model's vLLM server on this host
#   url                     base URL of a server on another host instead of port: the scripts skip
#                           it, only the gateway uses it
#   gpus                    GPU indices, comma separated (empty with device=cpu)
#   device                  gpu (default) or cpu (vLLM's CPU build)
#   cpus                    CPU list for numactl (e.g. 0-15,32-47); default: derived from the GPUs
#   tensor_parallel_size    default: the number of GPUs
#   gpu_memory_utilization  --gpu-memory-utilization
#   max_model_len           --max-model-len
#   max_num_seqs            --max-num-seqs
#   enforce_eager           true/false: --enforce-eager
#   load_workers            --max-parallel-loading-workers
#   log                     log file name inside VLLM_LOG_DIR; default: <id>_vllm.log
#   extra_args              more `vllm serve` arguments, as one string split on spaces (no quoting:
#                           write JSON values without spaces)
#   simulate_args           the simulator's own flags, used with --simulate only (python -m vllm_simulator --help)
#   env                     more environment for this model, space separated KEY=VALUE words; they
#                           override the tuning the scripts set (OMP_NUM_THREADS=<CPUs of the model>, ...)
#   api_key                 the key the server requires on /v1 (given as VLLM_API_KEY, never on its command
#                           line); the gateway sends it upstream. Default: one the fleet makes at the
#                           model's first start and keeps in $VLLM_RUN_DIR/<id>.api_key (mode 0600), so
#                           that only the gateway reaches the model. none: no key (any local user can)
#   launch_command          overrides VLLM_LAUNCH_COMMAND for this model

# ---- Fleet-wide settings ----------------------------------------------------------------------
MODEL_ROOT="${MODEL_ROOT:-/data/models}"

# The command that starts one vLLM OpenAI server. vLLM's CPU build ships a broken `vllm`
# command; use "python -m vllm.entrypoints.openai.api_server" there.
VLLM_LAUNCH_COMMAND="${VLLM_LAUNCH_COMMAND:-vllm serve}"

# Address the vLLM servers listen on; the gateway is the only public door.
VLLM_HOST="${VLLM_HOST:-127.0.0.1}"

# Seconds between two model launches, so weight loading does not fight for disk and CPU.
VLLM_START_INTERVAL="${VLLM_START_INTERVAL:-15}"

# GPU -> CPU threads. Leave the array empty to derive it from `nvidia-smi topo -m` and the NUMA
# layout (each NUMA node's CPUs split among its GPUs); GPUs missing here are derived too. A model
# runs under numactl on the union of its GPUs' CPUs. This table is the reference 4-GPU host's.
GPU_CPU_BINDING=(
    "0=0-15"
    "1=16-31"
    "2=48-63"
    "3=64-79"
)

# ---- Models -----------------------------------------------------------------------------------
vllm_model \
    name=DeepSeek-R1-0528-Qwen3-14B \
    path="$MODEL_ROOT/DeepSeek-R1-0528-Qwen3-14B" \
    port=8001 \
    gpus=0,1,2,3 \
    tensor_parallel_size=4 \
    gpu_memory_utilization=0.325 \
    max_model_len=32768 \
    max_num_seqs=8 \
    enforce_eager=true \
    load_workers=64 \
    log=deepseek_qwen3_vllm.log

vllm_model \
    name=Qwen3-14B \
    path="$MODEL_ROOT/Qwen3-14B" \
    port=8002 \
    gpus=0,1,2,3 \
    tensor_parallel_size=4 \
    gpu_memory_utilization=0.325 \
    max_model_len=32768 \
    max_num_seqs=8 \
    enforce_eager=true \
    load_workers=64 \
    log=qwen3_14b_vllm.log

vllm_model \
    name=DeepSeek-R1-Distill-Qwen-7B \
    path="$MODEL_ROOT/DeepSeek-R1-Distill-Qwen-7B" \
    port=8003 \
    gpus=0,1,2,3 \
    tensor_parallel_size=4 \
    gpu_memory_utilization=0.155 \
    max_model_len=32768 \
    max_num_seqs=8 \
    enforce_eager=true \
    load_workers=64 \
    log=deepseek_distill_vllm.log

vllm_model \
    name=Qwen2.5-7B-Instruct \
    path="$MODEL_ROOT/Qwen2.5-7B-Instruct" \
    port=8004 \
    gpus=0,1,2,3 \
    tensor_parallel_size=4 \
    gpu_memory_utilization=0.155 \
    max_model_len=32768 \
    max_num_seqs=8 \
    enforce_eager=true \
    load_workers=64 \
    log=qwen_vllm.log
