#!/usr/bin/env bash
# Launch `bigtrain train CONFIG [key=value ...]` with torchrun, on one node or many.
#
#   launch/torchrun.sh configs/debug.yaml train.max_steps=50                   # one node, all GPUs (or 1 CPU process)
#   launch/torchrun.sh --nnodes 2 --nproc-per-node 8 --rdzv-endpoint node01:29500 \
#       configs/llama-1b.yaml                                                   # run the same line on every node
#
# Options (each also read from the environment variable in brackets; an option wins):
#   --nnodes N              nodes in the job                                   [NNODES, default 1]
#   --nproc-per-node G      processes per node: a number, or `gpu` = one per visible GPU
#                                                                              [NPROC_PER_NODE, default: GPUs, else 1]
#   --rdzv-endpoint H:P     c10d rendezvous address, any node's reachable address (usually the first node)
#                                                                              [RDZV_ENDPOINT, else MASTER_ADDR:MASTER_PORT]
#   --rdzv-id ID            a name shared by all nodes of one job              [RDZV_ID, default bigtrain]
#   --verb VERB             the bigtrain verb to run on every rank: train, or doctor to check the nodes
#                                                                              [BIGTRAIN_VERB, default train]
#   --                      end of options (then CONFIG and overrides)
#
# One node without an endpoint uses `torchrun --standalone` (a private rendezvous on a free port).
# More nodes use the c10d rendezvous: no ssh, no hostfile; every node runs this same line and the
# node whose address is the endpoint hosts the rendezvous store.
#
# Python: BIGTRAIN_PYTHON if set, else the active virtualenv's python ($VIRTUAL_ENV/bin/python),
# else `python3` on PATH; bigtrain must be importable by it (pip install -e . / make setup).
#
# Signals: SIGTERM, SIGINT and SIGUSR1 reach every rank (torchrun forwards them), which finish the
# current step, save a checkpoint and exit with status 75 (preempted; see launch/README.md).
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT (default here 600 s) is how long torchrun then waits for the
# ranks before killing them: it must cover one step plus one checkpoint save.
set -euo pipefail

usage() { sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'; }

NNODES=${NNODES:-1}
NPROC_PER_NODE=${NPROC_PER_NODE:-}
RDZV_ENDPOINT=${RDZV_ENDPOINT:-}
RDZV_ID=${RDZV_ID:-bigtrain}
VERB=${BIGTRAIN_VERB:-train}
if [[ -z "$RDZV_ENDPOINT" && -n "${MASTER_ADDR:-}" ]]; then
  RDZV_ENDPOINT="${MASTER_ADDR}:${MASTER_PORT:-29500}"
fi

while [[ $# -gt 0 ]]; do
  case "$1" in
    --nnodes) NNODES=$2; shift 2 ;;
    --nnodes=*) NNODES=${1#*=}; shift ;;
    --nproc-per-node|--nproc_per_node) NPROC_PER_NODE=$2; shift 2 ;;
    --nproc-per-node=*|--nproc_per_node=*) NPROC_PER_NODE=${1#*=}; shift ;;
    --rdzv-endpoint|--rdzv_endpoint) RDZV_ENDPOINT=$2; shift 2 ;;
    --rdzv-endpoint=*|--rdzv_endpoint=*) RDZV_ENDPOINT=${1#*=}; shift ;;
    --rdzv-id|--rdzv_id) RDZV_ID=$2; shift 2 ;;
    --rdzv-id=*|--rdzv_id=*) RDZV_ID=${1#*=}; shift ;;
    --verb) VERB=$2; shift 2 ;;
    --verb=*) VERB=${1#*=}; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    -*) echo "torchrun.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done

if [[ "$VERB" != train && "$VERB" != doctor ]]; then
  echo "torchrun.sh: --verb must be train or doctor, got '$VERB'" >&2; exit 2
fi
if [[ $# -lt 1 && "$VERB" == train ]]; then
  echo "torchrun.sh: missing CONFIG (usage: launch/torchrun.sh [options] CONFIG [key=value ...])" >&2
  exit 2
fi

if ! [[ "$NNODES" =~ ^[0-9]+(:[0-9]+)?$ ]]; then
  echo "torchrun.sh: --nnodes must be a number (or MIN:MAX), got '$NNODES'" >&2; exit 2
fi
if [[ "$NNODES" != 1 && -z "$RDZV_ENDPOINT" ]]; then
  echo "torchrun.sh: $NNODES nodes need a rendezvous address: --rdzv-endpoint HOST:PORT (or RDZV_ENDPOINT," \
       "or MASTER_ADDR and MASTER_PORT) reachable from every node" >&2
  exit 2
fi

if [[ -n "${BIGTRAIN_PYTHON:-}" ]]; then
  PY=$BIGTRAIN_PYTHON
elif [[ -n "${VIRTUAL_ENV:-}" && -x "${VIRTUAL_ENV}/bin/python" ]]; then
  PY=${VIRTUAL_ENV}/bin/python
else
  PY=$(command -v python3 || true)
fi
if [[ -z "$PY" ]] || ! "$PY" -c 'import torch, bigtrain' 2>/dev/null; then
  echo "torchrun.sh: cannot import torch and bigtrain with python '${PY:-<none>}'; activate the venv (source .venv/bin/activate)" \
       "or set BIGTRAIN_PYTHON=/path/to/venv/bin/python" >&2
  exit 2
fi

if [[ -z "$NPROC_PER_NODE" ]]; then
  # One process per visible GPU; one (CPU) process when there is none.
  NPROC_PER_NODE=$("$PY" -c 'import torch; print(torch.cuda.device_count() or 1)')
fi

# Forward SIGUSR1 too (torchrun's default list lacks it; without it torchrun dies of SIGUSR1 and takes
# the rendezvous store its ranks need with it) and give the ranks time to checkpoint. PET_* is how
# torchrun reads its --signals-to-handle option from the environment (torch >= 2.9; older ones ignore it).
export PET_SIGNALS_TO_HANDLE=${PET_SIGNALS_TO_HANDLE:-SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1}
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-$PET_SIGNALS_TO_HANDLE}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}

if [[ "$NNODES" == 1 && -z "$RDZV_ENDPOINT" ]]; then
  RDZV=(--standalone)
else
  RDZV=(--rdzv-backend=c10d "--rdzv-endpoint=$RDZV_ENDPOINT" "--rdzv-id=$RDZV_ID")
fi

# Check the config for this launch's world size before starting any rank: a config error is then
# one message and exit status 2 here, not one traceback per rank under torchrun's own.
if [[ "$VERB" == train && "$NNODES" =~ ^[0-9]+$ && "$NPROC_PER_NODE" =~ ^[0-9]+$ ]]; then
  "$PY" -m bigtrain config check --world-size $((NNODES * NPROC_PER_NODE)) "$@" >/dev/null || exit $?
fi

# exec: signals sent to this script (srun, Ctrl-C, kill) go straight to torchrun.
exec "$PY" -m torch.distributed.run "${RDZV[@]}" --nnodes="$NNODES" --nproc-per-node="$NPROC_PER_NODE" \
  --max-restarts=0 -m bigtrain "$VERB" "$@"
