#!/usr/bin/env bash
# Data-parallel training with Hugging Face accelerate: one process per GPU (or real multi-process CPU over gloo).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: ./run_distributed_training.sh CONFIG [NUM_PROCESSES] [extra accelerate launch args...]

  CONFIG          a config path, or a name under config/ (.yaml/.yml/.json tried in turn);
                  it should set train.distributed_training: true (a warning is printed otherwise)
  NUM_PROCESSES   processes on THIS machine (default 2). With GPUs: one per GPU, at most the GPU count.
                  Without GPUs: that many CPU processes over gloo, each with cores/NUM_PROCESSES threads.

  --dry-run       (anywhere after CONFIG) print the accelerate command and the environment it gets, start nothing

Extra arguments go to `accelerate launch`, e.g.
  --config_file config/accelerate/fsdp.yaml          use an accelerate config (DDP, FSDP, DeepSpeed ZeRO-2);
                                                     FSDP and DeepSpeed need GPUs (refused without them)
  --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 --main_process_port 29500   multi-node

Environment (also read from .env; values already set in the environment win):
  MAIN_PROCESS_PORT   rendezvous port (default: a free port on this machine; 29500 with --num_machines > 1)
  OMP_NUM_THREADS     CPU threads per process without GPUs (default: cores / NUM_PROCESSES)
  NCCL_DEBUG          default WARN
  TORCH_NCCL_ASYNC_ERROR_HANDLING  default 1: a failed rank ends all ranks instead of hanging
  NCCL_P2P_DISABLE, NCCL_IB_DISABLE, NCCL_SOCKET_IFNAME  not set unless you set them (see README)
  PYTHON              interpreter (default: .venv/bin/python when present, else python3)
EOF
}

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage; exit 0; fi
if [[ $# -lt 1 ]]; then usage >&2; exit 2; fi

CONFIG="$1"; shift
# A config path is relative to where the user is; everything else runs from the repository (like run.py).
if [[ -e "$CONFIG" ]]; then CONFIG="$(cd "$(dirname "$CONFIG")" && pwd)/$(basename "$CONFIG")"; fi
cd "$(dirname "${BASH_SOURCE[0]}")"
NUM_PROCESSES=2
if [[ $# -gt 0 && "$1" =~ ^[0-9]+$ ]]; then NUM_PROCESSES="$1"; shift; fi
if [[ "$NUM_PROCESSES" -lt 1 ]]; then echo "error: NUM_PROCESSES must be >= 1" >&2; exit 2; fi
DRY_RUN=0
EXTRA=()
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then DRY_RUN=1; else EXTRA+=("$arg"); fi
done

# .env: KEY=VALUE lines (optional `export `, optional quotes, # comments); keys already in the environment win.
# Values are never echoed.
if [[ -f .env ]]; then
  while IFS= read -r line || [[ -n "$line" ]]; do
    line="${line%$'\r'}"
    [[ "$line" =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)[[:space:]]*=[[:space:]]*(.*)$ ]] || continue
    key="${BASH_REMATCH[2]}"
    value="${BASH_REMATCH[3]}"
    if [[ "$value" =~ ^\"(.*)\"$ || "$value" =~ ^\'(.*)\'$ ]]; then value="${BASH_REMATCH[1]}"; fi
    if [[ -z "${!key+x}" ]]; then export "$key=$value"; fi
  done < .env
fi

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

# Check the whole config once, before any process starts (strict keys, dataset paths come later per run).
CONFIG_PATH="$("$PYTHON" -m tools.launch_check "$CONFIG")"

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
    # An error, not a silent change: fewer processes would change the effective batch the config was tuned for.
    echo "error: $NUM_PROCESSES processes asked but this machine has $GPUS GPU(s): pass NUM_PROCESSES $GPUS (and" \
         "raise train.batch_size or gradient_accumulation_steps to keep the effective batch)" >&2
    exit 2
  fi
else
  # No GPU: `accelerate launch --cpu` silently runs ONE process; --multi_gpu with ACCELERATE_USE_CPU=1 gives real
  # gloo data parallelism (see shared FACTS). Each rank gets its share of the cores.
  ACCELERATE_CONFIG="$(arg_value --config_file "")"
  if [[ -n "$ACCELERATE_CONFIG" && -f "$ACCELERATE_CONFIG" ]] &&
     grep -Eq '^[[:space:]]*distributed_type:[[:space:]]*"?(FSDP|DEEPSPEED)' "$ACCELERATE_CONFIG"; then
    echo "error: $ACCELERATE_CONFIG asks for FSDP or DeepSpeed, which need GPUs (accelerate refuses FSDP without" \
         "an accelerator: 'There are currently no available devices found'). Without GPUs, leave out" \
         "--config_file: the launcher runs plain data parallelism over gloo." >&2
    exit 2
  fi
  export ACCELERATE_USE_CPU=1
  CORES="$(nproc 2>/dev/null || echo 1)"
  THREADS=$(( CORES / NUM_PROCESSES )); [[ "$THREADS" -lt 1 ]] && THREADS=1
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$THREADS}"
  export KONTEXT_CPU_THREADS="$OMP_NUM_THREADS"  # toolkit.dist sets torch's threads to this on every rank
  echo "no GPU found: $NUM_PROCESSES CPU processes over gloo, $OMP_NUM_THREADS thread(s) each" >&2
fi
# Harmless without GPUs; set here so a CPU dry run shows what a GPU run gets.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

TOTAL=$(( NUM_PROCESSES * NUM_MACHINES ))
export KONTEXT_EXPECTED_WORLD_SIZE="$TOTAL"
PORT="${MAIN_PROCESS_PORT:-$(arg_value --main_process_port "")}"
if [[ -z "$PORT" && "$NUM_MACHINES" -gt 1 ]]; then
  PORT=29500  # every node must agree on it; a random free port would differ per node
elif [[ -z "$PORT" ]]; then
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

COMMAND=("$PYTHON" -m accelerate.commands.launch --num_processes "$TOTAL" "${LAUNCH[@]+"${LAUNCH[@]}"}"
         "${FILTERED[@]+"${FILTERED[@]}"}" run.py "$CONFIG_PATH")
echo "launching $TOTAL process(es) ($NUM_PROCESSES on this machine, $NUM_MACHINES machine(s)), port $PORT: $CONFIG_PATH" >&2
if [[ "$DRY_RUN" == 1 ]]; then
  for key in ACCELERATE_USE_CPU OMP_NUM_THREADS KONTEXT_CPU_THREADS KONTEXT_EXPECTED_WORLD_SIZE NCCL_DEBUG \
             TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_P2P_DISABLE NCCL_IB_DISABLE NCCL_SOCKET_IFNAME; do
    if [[ -n "${!key+x}" ]]; then echo "$key=${!key}"; fi
  done
  printf 'command:'; printf ' %q' "${COMMAND[@]}"; printf '\n'
  exit 0
fi
exec "${COMMAND[@]}"
