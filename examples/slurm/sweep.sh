#!/bin/bash
# Hydra multirun sweep on SLURM through the submitit launcher.
#
#   bash examples/slurm/sweep.sh                                  # default example sweep
#   bash examples/slurm/sweep.sh optimizer.lr=1e-4,3e-4 train.max_steps=2000
#   NODES=2 SWEEP_NAME=lr bash examples/slurm/sweep.sh --dry-run 'schedule.name=cosine,wsd'
#
# Run it on a login node (it only submits; it returns when all sweep jobs end,
# so use tmux/screen or nohup).  Each sweep point is one element of a SLURM
# job array with NODES nodes x 8 GPUs, one task per GPU (no torchrun; the
# trainer maps SLURM_* to RANK/WORLD_SIZE via
# megatron_midtrain.utils.slurm_env.torchrun_env_from_slurm).
# Launcher settings: conf/hydra/launcher/submitit_slurm.yaml.
#
# Arguments other than --dry-run are Hydra overrides.  Without any, the
# example sweep below is used.  Re-running the same command with the same
# SWEEP_DIR (and e.g. a larger train.max_steps) resumes every point from its
# own run.dir.
set -euo pipefail

DRY_RUN=${DRY_RUN:-0}
ARGS=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        *) ARGS+=("$arg") ;;
    esac
done
if ((${#ARGS[@]} == 0)); then
    ARGS=('optimizer.lr=1e-4,3e-4,1e-3')
fi

WORKDIR=${WORKDIR:-$PWD}
SWEEP_NAME=${SWEEP_NAME:-sweep}
SWEEP_DIR=${SWEEP_DIR:-$WORKDIR/multirun/$SWEEP_NAME}
read -r -a PYTHON_BIN <<< "${PYTHON:-python}"

# One run.dir per sweep point (<sweep dir>/<job number>), identical on all
# ranks of that point and stable across re-submissions.  Single quotes: the
# interpolation must reach Hydra unexpanded (Hydra resolves it in each job).
# shellcheck disable=SC2016
RUN_DIR_OVERRIDE=${RUN_DIR_OVERRIDE:-'run.dir=${hydra:sweep.dir}/${hydra:sweep.subdir}'}

for arg in "${ARGS[@]}"; do
    case "$arg" in
        run.dir=*|+run.dir=*|++run.dir=*) RUN_DIR_OVERRIDE="" ;;   # the user's own wins
    esac
done

CMD=(
    "${PYTHON_BIN[@]}" -m megatron_midtrain.train
    -m
    hydra/launcher=submitit_slurm
    "hydra.sweep.dir=$SWEEP_DIR"
)
[[ -n $RUN_DIR_OVERRIDE ]] && CMD+=("$RUN_DIR_OVERRIDE")
[[ -n ${NODES:-} ]] && CMD+=("hydra.launcher.nodes=$NODES")
[[ -n ${TIMEOUT_MIN:-} ]] && CMD+=("hydra.launcher.timeout_min=$TIMEOUT_MIN")
[[ -n ${PARTITION:-} ]] && CMD+=("hydra.launcher.partition=$PARTITION")
CMD+=("${ARGS[@]}")

quote() {   # shell-quote only where needed, so the output can be pasted
    local out=() a
    for a in "$@"; do
        if [[ $a =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
            out+=("$a")
        else
            out+=("'${a//\'/\'\\\'\'}'")
        fi
    done
    printf '%s' "${out[*]}"
}

if ((DRY_RUN)); then
    echo "# sweep.sh --dry-run: nothing is submitted"
    echo "# sweep dir: $SWEEP_DIR (submitit logs in $SWEEP_DIR/.submitit/<job id>/)"
    quote "${CMD[@]}"
    echo
    exit 0
fi

cd "$WORKDIR"
echo "[$(date -Is)] $(quote "${CMD[@]}")"
exec "${CMD[@]}"
