# Shared set-up of the launch/*.sh scripts (sourced). Puts the repository's virtual environment on PATH
# (PRIMAPS_VENV, default <repo>/.venv; PATH as it is when missing). Commands run in the caller's directory.

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PRIMAPS_VENV:-$REPO/.venv}"
if [ -x "$VENV/bin/python" ]; then
    export PATH="$VENV/bin:$PATH"
    export VIRTUAL_ENV="$VENV"
fi
export PYTHONUNBUFFERED=1
# Elastic restarts (--max-restarts, requeue) must not reuse the dead attempt's rendezvous store
# (pytorch/pytorch#135712: restarts failed with "Connection refused" or hung without this).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"

require() {  # require PROGRAM: exit with a hint when it is not installed
    command -v "$1" >/dev/null || { echo "error: $1 not found; set PRIMAPS_VENV or run 'make install'" >&2; exit 2; }
}

# Processes per node: NPROC_PER_NODE, else the visible GPUs, else 1 (CPU).
detect_nproc() {
    if [ -z "${NPROC_PER_NODE:-}" ]; then
        NPROC_PER_NODE="$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))' 2>/dev/null || echo 1)"
    fi
}
