# Shared set-up of the sbatch scripts (sourced; not a job script). Sets ROOT, NNODES, NPROC, HEAD_NODE,
# RDZV_PORT and SRUN_ARGS, enters ROOT and activates the virtual environment. See train.sbatch for the knobs.

ROOT="${PRIMAPS_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$ROOT" || { echo "error: cannot enter $ROOT" >&2; exit 2; }
[ -d "$ROOT/primaps_dist" ] || echo "warning: $ROOT has no primaps_dist/; submit from the repository root or set PRIMAPS_ROOT" >&2

VENV="${PRIMAPS_VENV:-$ROOT/.venv}"
if [ -f "$VENV/bin/activate" ]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
else
    echo "warning: no virtual environment at $VENV (set PRIMAPS_VENV); using torchrun from PATH" >&2
fi
command -v torchrun >/dev/null || { echo "error: torchrun not found (PRIMAPS_VENV=$VENV)" >&2; exit 2; }

_count_list() { local IFS=','; set -- $1; echo $#; }

# Processes per node: explicit NPROC_PER_NODE, else the GPUs SLURM gave this node, else 1 (CPU).
if [ -n "${NPROC_PER_NODE:-}" ]; then
    NPROC="$NPROC_PER_NODE"
elif [ "${SLURM_GPUS_ON_NODE:-0}" -gt 0 ] 2>/dev/null; then
    NPROC="$SLURM_GPUS_ON_NODE"
elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$CUDA_VISIBLE_DEVICES" != "NoDevFiles" ]; then
    NPROC="$(_count_list "$CUDA_VISIBLE_DEVICES")"
else
    NPROC=1
fi

NNODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
# The rendezvous store lives on the first host of the allocation (where the batch script runs).
HEAD_NODE="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1)"
HEAD_NODE="${HEAD_NODE:-localhost}"
RDZV_PORT="${RDZV_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}"

SRUN_ARGS=(--nodes="$NNODES" --ntasks-per-node=1)
# srun does not always inherit --cpus-per-task from sbatch; without it each agent could be held to one CPU.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    SRUN_ARGS+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi

export PYTHONUNBUFFERED=1
# Elastic restarts (--max-restarts, requeue) must not reuse the dead attempt's rendezvous store
# (pytorch/pytorch#135712: restarts failed with "Connection refused" or hung without this).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

stamp() { date '+%F %T'; }
