#!/bin/bash
# Train ping-llm on one or more SLURM nodes with torchrun (one torchrun per node, c10d rendezvous).
#
#   sbatch --nodes 2 scripts/slurm_train.sh --data /shared/prepared --out /shared/runs/full \
#       --preset full --steps 20000 --total-batch-tokens 524288
#
# Everything after the script name is passed to `ping-llm train`; --resume is always added, so
# the same command starts a run, continues it after preemption and after a requeue. RUN_DIR and
# the dataset must be on a filesystem every node sees. See docs/multinode.md.
#
# Stopping cleanly: SLURM sends SIGTERM at preemption and at the time limit (then SIGKILL after
# KillWait, often 30 s). Each rank finishes its step, rank 0 saves, everyone exits. To avoid
# relying on the grace period, --time-limit makes training stop by itself TRAIN_MARGIN_MIN
# minutes before the job's wall time; if the run is not finished the job requeues itself.

#SBATCH --job-name=ping-llm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
TRAIN_MARGIN_MIN=${TRAIN_MARGIN_MIN:-15}   # minutes kept for the final checkpoint and teardown
RDZV_PORT=${RDZV_PORT:-29500}
PYTHON_ENV=${PYTHON_ENV:-}                 # e.g. /shared/ping-llm/.venv to activate
# torchrun forwards SIGTERM to its workers and SIGKILLs them after this many seconds (default
# 30): leave room to finish the step and write the checkpoint (torch >= 2.6 reads this).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-180}

if [[ -n "$PYTHON_ENV" ]]; then source "$PYTHON_ENV/bin/activate"; fi
mkdir -p logs

# Minutes of wall time left for this job (squeue %L: [D-]HH:MM:SS, MM:SS, or UNLIMITED).
minutes_left() {
  local left; left=$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null || echo UNLIMITED)
  if [[ "$left" == UNLIMITED || "$left" == NOT_SET || -z "$left" ]]; then echo 0; return; fi
  local days=0; if [[ "$left" == *-* ]]; then days=${left%%-*}; left=${left#*-}; fi
  IFS=: read -r -a p <<< "$left"
  local h=0 m=0
  case ${#p[@]} in 3) h=$((10#${p[0]})); m=$((10#${p[1]}));; 2) m=$((10#${p[0]}));; esac
  echo $(( days * 1440 + h * 60 + m ))
}

TIME_LIMIT_ARGS=()
LEFT=$(minutes_left)
if (( LEFT > TRAIN_MARGIN_MIN )); then
  TIME_LIMIT_ARGS=(--time-limit "$(( LEFT - TRAIN_MARGIN_MIN ))")
fi

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NNODES} node(s) x" \
     "${GPUS_PER_NODE} GPU(s), rendezvous ${MASTER_ADDR}:${RDZV_PORT}, ${LEFT} min left"

# Same world size on every restart: the data order (and exact resume) depends on it.
set +e
srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
  torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_backend c10d \
    --rdzv_endpoint "${MASTER_ADDR}:${RDZV_PORT}" \
    --rdzv_id "$SLURM_JOB_ID" \
    -m ping_llm.cli train --resume ${TIME_LIMIT_ARGS[@]+"${TIME_LIMIT_ARGS[@]}"} "$@"
STATUS=$?
set -e

# Exit 0 = finished or stopped by --time-limit; 143/130 = stopped by SIGTERM/SIGINT (checkpoint
# saved); 1 = diverged or crashed; 2 = bad arguments. Requeue only runs that stopped cleanly
# and are not done yet.
OUT_DIR=""
prev=""
for a in "$@"; do
  if [[ "$prev" == "--out" ]]; then OUT_DIR="$a"; fi
  prev="$a"
done
if [[ ( $STATUS -eq 0 || $STATUS -eq 143 || $STATUS -eq 130 ) && -n "$OUT_DIR" ]]; then
  DONE=$(python - "$OUT_DIR" <<'PY'
import json, sys
from pathlib import Path
ckpt = Path(sys.argv[1]) / "checkpoint"
meta = json.loads((ckpt / "meta.json").read_text())
cfg = json.loads((ckpt / "config.json").read_text())
print("yes" if meta["step"] >= cfg["train"]["steps"] else "no")
PY
)
  if [[ "$DONE" == "no" ]]; then
    echo "run not finished: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
  fi
fi
exit $STATUS
