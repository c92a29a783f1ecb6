#!/usr/bin/env bash
# Train on several machines without a scheduler: run this on every node, with the same arguments.
#
#   HEAD_ADDR=10.0.0.1 NNODES=2 NODE_RANK=0 launch/train_multi_node.sh --config FILE [key=value ...]   # head
#   HEAD_ADDR=10.0.0.1 NNODES=2 NODE_RANK=1 launch/train_multi_node.sh --config FILE [key=value ...]   # other
#
# HEAD_ADDR    address of the node with NODE_RANK=0, reachable from all nodes (required)
# NNODES       number of nodes (required)
# NODE_RANK    0 on the head node, which hosts the c10d rendezvous store; 1..NNODES-1 elsewhere (required)
# HEAD_PORT    rendezvous port on the head node (default 29400)
# RUN_ID       rendezvous id, the same on all nodes (default primaps)
# NPROC_PER_NODE  processes per node (default: visible GPUs, else 1). Extra torchrun flags: TORCHRUN_ARGS.
# Global ranks are assigned by the rendezvous; NODE_RANK only decides which node hosts the store.
set -euo pipefail
: "${HEAD_ADDR:?set HEAD_ADDR to the address of the head node (NODE_RANK=0)}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK (0 on the head node)}"
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require torchrun
detect_nproc
if [ "$NODE_RANK" = 0 ]; then IS_HOST=1; else IS_HOST=0; fi
# shellcheck disable=SC2086
exec torchrun --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
    --rdzv_backend=c10d --rdzv_endpoint="$HEAD_ADDR:${HEAD_PORT:-29400}" --rdzv_id="${RUN_ID:-primaps}" \
    --rdzv_conf="is_host=$IS_HOST" ${TORCHRUN_ARGS:-} \
    -m primaps_dist.train "$@"
