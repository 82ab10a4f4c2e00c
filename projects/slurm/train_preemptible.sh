#!/bin/bash
# Train on a preemptible SLURM cluster: SLURM signals this script 120 s before the time limit, the script
# passes the signal on to train_net.py (which stops all its processes at one iteration, writes a checkpoint
# and exits with code 75), and a run that stopped so is requeued; the requeued job runs the same command,
# whose --resume continues exactly where it stopped (docs/GETTING_STARTED.md, "Preemption and resume").
#
#   sbatch [sbatch options] projects/slurm/train_preemptible.sh --config-file CONFIG --num-gpus 8 --resume \
#       OUTPUT_DIR output/run1
#
# Arguments: train_net.py's (include --resume). $PYTHON: the interpreter (default: python).
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
set -u
"${PYTHON:-python}" train_net.py "$@" &
PID=$!
trap 'kill -USR1 $PID' USR1
trap 'kill -TERM $PID' TERM
# A trapped signal ends `wait` early (status > 128) while train_net.py finishes its iteration and checkpoint.
wait $PID; RC=$?
while [ $RC -gt 128 ] && kill -0 $PID 2>/dev/null; do wait $PID; RC=$?; done
if [ $RC -gt 128 ]; then wait $PID; RC=$?; fi
if [ $RC -eq 75 ]; then
    echo "train_net.py stopped for preemption (exit code 75): requeueing job ${SLURM_JOB_ID:-?}"
    scontrol requeue "${SLURM_JOB_ID:?SLURM_JOB_ID is not set: run this script with sbatch}"
fi
exit $RC
