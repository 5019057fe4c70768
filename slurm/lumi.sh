#!/bin/bash
# xffl-cwl SLURM template for LUMI (CSC, Finland), LUMI-G: 4x AMD MI250X (8 GCDs) per node.
# Set the facility's `sbatch:` options in federation.yml or streamflow.yml; defaults in brackets:
#   account [none: your default]  partition [dev-g]  qos [none]  time [00:30:00]
#   nodes [1]  gpusPerNode [8]  cpusPerTask [56]  mem [site default]
# container: binds [the deployment's workdir, from `container.bind`], runtime [singularity], options [--rocm], image: a .sif on this system (required unless runtime none).
#SBATCH --job-name={{ job_name | default('xffl', true) }}
#SBATCH --partition={{ partition | default('dev-g', true) }}
{% if qos %}
#SBATCH --qos={{ qos }}
{% endif %}
{% if account %}
#SBATCH --account={{ account }}
{% endif %}
#SBATCH --time={{ time | default('00:30:00', true) }}
#SBATCH --nodes={{ nodes | default(1, true) }}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={{ gpus_per_node | default(8, true) }}
#SBATCH --cpus-per-task={{ cpus_per_task | default(56, true) }}
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

{% set runtime = container_runtime | default('singularity', true) %}
{% if runtime == 'none' %}
srun --ntasks=1 bash <<'XFFL_EOF'
{% else %}
srun --ntasks=1 {{ runtime }} exec {{ container_options | default('--rocm', true) }} {{ container_binds }} "{{ container_image }}" bash <<'XFFL_EOF'
{% endif %}
{{ streamflow_command }}
XFFL_EOF
