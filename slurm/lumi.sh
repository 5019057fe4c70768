#!/bin/bash
# xffl-cwl SLURM template for LUMI (CSC, Finland), LUMI-G: 4x AMD MI250X (8 GCDs) per node.
# Set the facility's `sbatch:` and `container:` options in federation.yml or streamflow.yml; what it
# leaves unset takes the value in `defaults` below (no account: it is always yours to give). The
# container needs `image:`, a .sif on this system (an image name with `runtime: podman`), unless
# `runtime: none`; the deployment's workdir and the dataset's folder are bound into it.
{% set defaults = {
  "job_name": "xffl",
  "partition": "dev-g",
  "time": "00:30:00",
  "nodes": 1,
  "gpus_per_node": 8,
  "cpus_per_task": 7,
  "container_runtime": "singularity",
  "container_options": "--rocm",
  "gpu_vendor": "amd",
} %}
#SBATCH --job-name={{ job_name }}
#SBATCH --partition={{ partition }}
{% if qos %}
#SBATCH --qos={{ qos }}
{% endif %}
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

# Slingshot-11: RCCL over the four hsn interfaces; MIOpen caches in node-local /tmp
export NCCL_SOCKET_IFNAME=hsn0,hsn1,hsn2,hsn3
export NCCL_NET_GDR_LEVEL=3
export CXI_FORK_SAFE=1 CXI_FORK_SAFE_HP=1 FI_CXI_DISABLE_CQ_HUGETLB=1
export MIOPEN_USER_DB_PATH="/tmp/${USER}-miopen-cache-${SLURM_JOB_ID}"
export MIOPEN_CUSTOM_CACHE_DIR="${MIOPEN_USER_DB_PATH}"
mkdir -p "${MIOPEN_USER_DB_PATH}"
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
