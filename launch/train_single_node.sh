#!/usr/bin/env bash
# Train on one machine with torchrun (standalone rendezvous on a free local port):
#
#   launch/train_single_node.sh --config configs/demo.yaml [key=value ...]
#   NPROC_PER_NODE=4 launch/train_single_node.sh --config configs/cityscapes_dino_vits8.yaml
#
# NPROC_PER_NODE defaults to the number of visible GPUs (1 on CPU). Extra torchrun flags: TORCHRUN_ARGS.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require torchrun
detect_nproc
# shellcheck disable=SC2086
exec torchrun --standalone --nnodes=1 --nproc_per_node="$NPROC_PER_NODE" ${TORCHRUN_ARGS:-} \
    -m primaps_dist.train "$@"
