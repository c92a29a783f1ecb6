#!/usr/bin/env bash
# Gradient-mode PriMaPs-EM with the DeepSpeed engine (the paper's M-step; DeepSpeed reduces the gradients):
#
#   launch/train_deepspeed.sh --config FILE [key=value ...]
#   LAUNCHER=deepspeed launch/train_deepspeed.sh --config FILE                  # the deepspeed launcher
#   LAUNCHER=deepspeed DS_HOSTFILE=hosts.txt launch/train_deepspeed.sh --config FILE   # several nodes (ssh)
#
# Adds em.mode=gradient em.engine=deepspeed before your overrides (yours win; choose the ZeRO config with
# em.deepspeed_config=configs/deepspeed/zero1.json). LAUNCHER: torchrun (default, standalone on this
# machine) or deepspeed. NPROC_PER_NODE defaults to the visible GPUs (1 on CPU).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require torchrun
detect_nproc

ARGS=()
OVERRIDES=(em.mode=gradient em.engine=deepspeed)
# Keep "--config FILE" first, then the DeepSpeed overrides, then the caller's overrides.
while [ $# -gt 0 ]; do
    case "$1" in
        --config) ARGS+=("$1" "$2"); shift 2 ;;
        --config=*) ARGS+=("$1"); shift ;;
        *) break ;;
    esac
done
ARGS+=("${OVERRIDES[@]}" "$@")

case "${LAUNCHER:-torchrun}" in
    torchrun)
        # shellcheck disable=SC2086
        exec torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC_PER_NODE" ${TORCHRUN_ARGS:-} \
            -m primaps_dist.train "${ARGS[@]}" ;;
    deepspeed)
        command -v deepspeed >/dev/null || { echo "error: deepspeed launcher not found (pip install '.[deepspeed]')" >&2; exit 2; }
        DS=(deepspeed --no_local_rank --master_port="${MASTER_PORT:-29500}")
        if [ -n "${DS_HOSTFILE:-}" ]; then DS+=(--hostfile="$DS_HOSTFILE"); else DS+=(--num_gpus="$NPROC_PER_NODE"); fi
        exec "${DS[@]}" --module primaps_dist.train "${ARGS[@]}" ;;
    *) echo "error: LAUNCHER must be torchrun or deepspeed, got '$LAUNCHER'" >&2; exit 2 ;;
esac
