#!/bin/bash
# xffl-cwl SLURM template for MareNostrum 5 (BSC, Spain), ACC partition: 4x NVIDIA H100 64 GB per node.
# Set the facility's `sbatch:` and `container:` options in federation.yml or streamflow.yml; what it
# leaves unset takes the value in `defaults` below (no account: it is always yours to give). The
# container needs `image:`, a .sif on this system (an image name with `runtime: podman`), unless
# `runtime: none`; the deployment's workdir and the dataset's folder are bound into it.
{% set defaults = {
  "job_name": "xffl",
  "partition": "acc",
  "qos": "acc_debug",
  "time": "00:30:00",
  "nodes": 1,
  "gpus_per_node": 4,
  "cpus_per_task": 20,
  "container_runtime": "singularity",
  "container_options": "--nv",
  "gpu_vendor": "nvidia",
} %}
#SBATCH --job-name={{ job_name }}
#SBATCH --partition={{ partition }}
#SBATCH --qos={{ qos }}
{% if account %}
#SBATCH --account={{ account }}
{% endif %}
#SBATCH --time={{ time }}
#SBATCH --nodes={{ nodes }}
#SBATCH --ntasks-per-node={{ ntasks_per_node or (gpus_per_node if (gpus_per_node or 0) | int > 0 else 1) }}
#SBATCH --gpus-per-node={{ gpus_per_node }}
#SBATCH --cpus-per-task={{ cpus_per_task }}
{% if mem %}
#SBATCH --mem={{ mem }}
{% endif %}

module load singularity
# InfiniBand NDR200
export NCCL_IB_DISABLE=0
export NCCL_NET_GDR_LEVEL=2
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
{% for line in setup %}
{{ line }}
{% endfor %}

# The job's command is a file StreamFlow's command was written to; streamflow_command runs it.
{% if container_runtime == 'none' %}
srun --ntasks=1 {{ streamflow_command }}
{% else %}
{{ container_setup }}
srun --ntasks=1 {{ container_exec }} {{ streamflow_command }} &
wait $!
{% endif %}
