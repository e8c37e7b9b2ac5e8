#!/bin/bash
# Entry of one task under srun: Slurm's task variables become the torch.distributed ones, then the
# command given as arguments (the trainer) replaces this shell, so it gets srun's signals itself.
#   srun launch/srun_task.sh python -m harness.cli train --config run.yaml
set -euo pipefail
: "${SLURM_PROCID:?not a Slurm task: start this script with srun}"
export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
export MASTER_ADDR=${hosts%%$'\n'*}  # rank 0 runs on the first node
# one port per job, the same on every node and after a requeue, without any coordination
export MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))  # below the ephemeral ports (harness.parallel.distributed.job_port)
# torch would start one thread per core on every task: oversubscribed when tasks share a node
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
exec "$@"
