#!/usr/bin/env bash
# Launch rat training with torchrun. Every argument is passed on to `python -m rat.train` as fastargs flags:
#
#   ./run_train.sh                                   # the demo: configs/demo.yaml on the embedded dataset (CPU is fine)
#   ./run_train.sh --config-file configs/convnext_tiny_cvst.yaml --adv.attack apgd
#   NPROC=8 ./run_train.sh -C configs/vit_base_patch16_cvst.yaml --logging.folder runs/vitb
#
# Environment (all optional):
#   NPROC         processes on this node (default: the number of visible GPUs, 1 without a GPU)
#   NNODES        number of nodes (default 1)
#   NODE_RANK, MASTER_ADDR, MASTER_PORT      static multi-node rendezvous (MASTER_PORT default 29500)
#   RDZV_ENDPOINT (host:port), RDZV_ID       c10d rendezvous instead (elastic; NODE_RANK not needed)
#   PYTHON        interpreter (default: python)
# Ranks reach rat through torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE); the backend is nccl on GPU, gloo on CPU.
#
# The configuration is checked first (`python -m rat.train --validate-only`), so a bad setting is one line and exit
# status 2 before torchrun starts. SIGTERM/SIGINT to this script go to the training processes themselves: they save a
# checkpoint and end with "checkpoint saved ...; resume with --training.resume auto", and torchrun exits cleanly.
# Exit status: 0 done, 1 the run failed, 2 bad input (see docs/errors.md).
set -euo pipefail

PYTHON="${PYTHON:-python}"
# Idle OpenMP threads of torch otherwise spin on the cores that ffcv needs for decoding (measured: ~2x loader speed).
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
if (( $# == 0 )); then
  set -- --config-file "$(dirname "$0")/configs/demo.yaml"
fi
"$PYTHON" -m rat.train --validate-only "$@" || exit $?
NPROC="${NPROC:-$("$PYTHON" -c 'import torch; print(max(torch.cuda.device_count(), 1))')}"
NNODES="${NNODES:-1}"

launch=(--nproc_per_node "$NPROC" --nnodes "$NNODES")
if [[ -n "${RDZV_ENDPOINT:-}" ]]; then
  launch+=(--rdzv_backend c10d --rdzv_endpoint "$RDZV_ENDPOINT" --rdzv_id "${RDZV_ID:-rat}")
elif (( NNODES > 1 )); then
  : "${MASTER_ADDR:?set MASTER_ADDR (the address of node 0) for a multi-node run, or RDZV_ENDPOINT}"
  : "${NODE_RANK:?set NODE_RANK (0..NNODES-1) for a multi-node run}"
  launch+=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
else
  launch+=(--standalone)
fi

# torchrun answers SIGTERM/SIGINT with a SignalException traceback and kills its workers; the workers answer them by
# saving a checkpoint. So torchrun is started with both signals ignored (inherited across exec, and
# --signals-to-handle keeps it from installing its own handlers for them); torchrun starts its workers in their own
# session, so a signal this script gets (Ctrl-C in a terminal, scancel's SIGTERM) is forwarded to them, and torchrun
# sees its workers finish normally.
trap '' TERM INT
"$PYTHON" -m torch.distributed.run --signals-to-handle SIGHUP,SIGQUIT "${launch[@]}" -m rat.train "$@" &
torchrun_pid=$!
forward() { interrupted=1; pkill -TERM -P "$torchrun_pid" || true; }
trap forward TERM INT
while :; do
  interrupted=0
  wait "$torchrun_pid" && status=0 || status=$?
  (( interrupted )) || break  # a trapped signal interrupts `wait`: wait again for torchrun's own exit status
done
exit "$status"
