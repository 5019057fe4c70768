#!/bin/bash
# xffl-cwl SLURM template for Discoverer (Sofia Tech Park, Bulgaria), common partition with 8 GPUs per node.
# Set the facility's `sbatch:` options in federation.yml or streamflow.yml; defaults in brackets:
#   account [none: your default]  partition [common]  qos [none]  time [00:30:00]
#   nodes [1]  gpusPerNode [8]  cpusPerTask [32]  mem [site default]
# container: binds [the deployment's workdir, from `container.bind`], runtime [singularity], options [--nv], image: a .sif on this system (required unless runtime none).
#SBATCH --job-name={{ job_name | default('xffl', true) }}
#SBATCH --partition={{ partition | default('common', true) }}
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
#SBATCH --cpus-per-task={{ cpus_per_task | default(32, true) }}
{% if mem %}
#SBATCH --mem={{ mem }}
{% endif %}

# InfiniBand HDR
export NCCL_IB_DISABLE=0
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
{% for line in setup %}
{{ line }}
{% endfor %}

{% set runtime = container_runtime | default('singularity', true) %}
{% if runtime == 'none' %}
srun --ntasks=1 bash <<'XFFL_EOF'
{% else %}
srun --ntasks=1 {{ runtime }} exec {{ container_options | default('--nv', true) }} {{ container_binds }} "{{ container_image }}" bash <<'XFFL_EOF'
{% endif %}
{{ streamflow_command }}
XFFL_EOF
