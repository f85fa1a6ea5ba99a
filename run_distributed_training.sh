#!/usr/bin/env bash
# Data-parallel training with Hugging Face accelerate: one process per GPU (or real multi-process CPU over gloo).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: ./run_distributed_training.sh CONFIG [NUM_PROCESSES] [extra accelerate launch args...]

  CONFIG          a config path, or a name under config/ (.yaml/.yml/.json tried in turn);
                  it should set train.distributed_training: true (a warning is printed otherwise)
  NUM_PROCESSES   processes on THIS machine (default 2). With GPUs: one per GPU, capped at the GPU count.
                  Without GPUs: that many CPU processes over gloo, each with cores/NUM_PROCESSES threads.

Extra arguments go to `accelerate launch`, e.g.
  --config_file config/accelerate/fsdp.yaml          use an accelerate config (DDP, FSDP, DeepSpeed ZeRO-2)
  --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 --main_process_port 29500   multi-node

Environment (also read from .env; values already set in the environment win):
  MAIN_PROCESS_PORT   rendezvous port (default: a free port on this machine; set it for multi-node)
  NCCL_DEBUG          default WARN
  TORCH_NCCL_ASYNC_ERROR_HANDLING  default 1: a failed rank ends all ranks instead of hanging
  NCCL_P2P_DISABLE, NCCL_IB_DISABLE, NCCL_SOCKET_IFNAME  not set unless you set them (see README)
  PYTHON              interpreter (default: .venv/bin/python when present, else python3)
EOF
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi

cd "$(dirname "${BASH_SOURCE[0]}")"
CONFIG="$1"; shift
NUM_PROCESSES=2
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then NUM_PROCESSES="$1"; shift; fi
if [[ "$NUM_PROCESSES" -lt 1 ]]; then echo "error: NUM_PROCESSES must be >= 1" >&2; exit 2; fi
EXTRA=("$@")

# .env: export keys that are not already in the environment (the environment wins). Values are never echoed.
if [[ -f .env ]]; then
  while IFS='=' read -r key value; do
    [[ -z "$key" || "$key" =~ ^[[:space:]]*# ]] && continue
    key="${key// /}"
    [[ -z "${!key+x}" ]] && export "$key=${value}"
  done < .env
fi

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# Check the whole config once, before any process starts (strict keys, dataset paths come later per run).
CONFIG_PATH="$("$PYTHON" -m toolkit.launch_check "$CONFIG")"

arg_value() {  # value of --flag in EXTRA, or the default
  local flag="$1" default="$2" i
  for ((i = 0; i < ${#EXTRA[@]}; i++)); do
    if [[ "${EXTRA[$i]}" == "$flag" ]]; then echo "${EXTRA[$((i + 1))]:-$default}"; return; fi
    if [[ "${EXTRA[$i]}" == "$flag="* ]]; then echo "${EXTRA[$i]#*=}"; return; fi
  done
  echo "$default"
}
has_arg() { local a; for a in "${EXTRA[@]+"${EXTRA[@]}"}"; do [[ "$a" == "$1" || "$a" == "$1="* ]] && return 0; done; return 1; }

NUM_MACHINES="$(arg_value --num_machines 1)"
GPUS="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)"
LAUNCH=()
if [[ "$GPUS" -gt 0 ]]; then
  if [[ "$NUM_PROCESSES" -gt "$GPUS" ]]; then
    echo "warning: $NUM_PROCESSES processes asked but this machine has $GPUS GPU(s): using $GPUS" >&2
    NUM_PROCESSES="$GPUS"
  fi
  export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
  export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
else
  # No GPU: `accelerate launch --cpu` silently runs ONE process; --multi_gpu with ACCELERATE_USE_CPU=1 gives real
  # gloo data parallelism (see shared FACTS). Each rank gets its share of the cores.
  export ACCELERATE_USE_CPU=1
  CORES="$(nproc 2>/dev/null || echo 1)"
  THREADS=$(( CORES / NUM_PROCESSES )); [[ "$THREADS" -lt 1 ]] && THREADS=1
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$THREADS}"
  echo "no GPU found: $NUM_PROCESSES CPU processes over gloo, $OMP_NUM_THREADS thread(s) each" >&2
fi

TOTAL=$(( NUM_PROCESSES * NUM_MACHINES ))
export KONTEXT_EXPECTED_WORLD_SIZE="$TOTAL"
PORT="${MAIN_PROCESS_PORT:-$(arg_value --main_process_port "")}"
if [[ -z "$PORT" ]]; then
  PORT="$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

if ! has_arg --config_file && [[ "$TOTAL" -gt 1 ]]; then LAUNCH+=(--multi_gpu); fi
has_arg --mixed_precision || LAUNCH+=(--mixed_precision no)
has_arg --dynamo_backend || LAUNCH+=(--dynamo_backend no)
has_arg --num_machines || LAUNCH+=(--num_machines 1)
has_arg --main_process_port || LAUNCH+=(--main_process_port "$PORT")
# --num_processes is the total over all machines for accelerate; ours is per machine.
FILTERED=()
for ((i = 0; i < ${#EXTRA[@]}; i++)); do
  if [[ "${EXTRA[$i]}" == "--num_processes" ]]; then i=$((i + 1)); continue; fi
  [[ "${EXTRA[$i]}" == "--num_processes="* ]] && continue
  FILTERED+=("${EXTRA[$i]}")
done

echo "launching $TOTAL process(es) ($NUM_PROCESSES on this machine, $NUM_MACHINES machine(s)), port $PORT: $CONFIG_PATH" >&2
exec "$PYTHON" -m accelerate.commands.launch --num_processes "$TOTAL" "${LAUNCH[@]}" \
  "${FILTERED[@]+"${FILTERED[@]}"}" run.py "$CONFIG_PATH"
