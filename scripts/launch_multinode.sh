#!/usr/bin/env bash
# One node's share of a multi-node run: torchrun with a static rendezvous read from the environment.
# Static, not c10d: ranks follow NODE_RANK (node k holds ranks k*NPROC_PER_NODE...), and node 0 hosts the one
# key-value store. Under c10d torchrun orders the nodes by hostname and process id instead, and the rendezvous store
# (on the node that guessed it is MASTER_ADDR) and the workers' store (on whichever node got rank 0) can sit on two
# different nodes, so losing either one took the survivors' torchrun down before the trainer could name the lost rank.
# Run the same command on every node (only NODE_RANK differs); the arguments go to `python -m trainer train`.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC_PER_NODE=8 \
#   ACCELERATE_CONFIG=accelerate_configs/fsdp_multinode.yaml \
#       bash scripts/launch_multinode.sh --config configs/libero_spatial_grpo.yaml
#
#   NNODES          number of nodes (required)
#   NODE_RANK       this node's index, 0..NNODES-1 (required; 0 is the node at MASTER_ADDR)
#   MASTER_ADDR     address of node 0, reachable from every node (required)
#   MASTER_PORT     rendezvous port on node 0 (default 29500)
#   NPROC_PER_NODE  processes per node, one per GPU (default: the number of GPUs, else 1)
#   ACCELERATE_CONFIG  an accelerate_configs/*.yaml whose backend (FSDP2, DeepSpeed ZeRO) the processes use; its
#                   process / machine counts are ignored (torchrun owns the topology). Unset: DDP.
#   RDZV_ID         run id shared by the nodes of one job (default: trainer-$MASTER_PORT); SLURM passes its job id
#   PYTHON          interpreter (default: .venv/bin/python when present, else python)
set -euo pipefail
cd "$(dirname "$0")/.."

: "${NNODES:?set NNODES (number of nodes)}"
: "${NODE_RANK:?set NODE_RANK (this node, 0..NNODES-1)}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of node 0)}"
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [[ "$NPROC_PER_NODE" -ge 1 ]] || NPROC_PER_NODE=1
fi
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
if [[ -n "${ACCELERATE_CONFIG:-}" ]]; then
    [[ -f "$ACCELERATE_CONFIG" ]] || { echo "ACCELERATE_CONFIG=$ACCELERATE_CONFIG: no such file" >&2; exit 2; }
    export TRAINER_ACCELERATE_CONFIG="$ACCELERATE_CONFIG"
fi
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}  # DeepSpeed's JIT-built ops

echo "node $NODE_RANK/$NNODES: $NPROC_PER_NODE processes, rendezvous $MASTER_ADDR:$MASTER_PORT," \
     "backend ${ACCELERATE_CONFIG:-DDP (no ACCELERATE_CONFIG)}" >&2
exec "$PYTHON" -m torch.distributed.run \
    --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --rdzv-id "${RDZV_ID:-trainer-$MASTER_PORT}" \
    -m trainer train "$@"
