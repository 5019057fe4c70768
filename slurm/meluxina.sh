#!/bin/bash
# xffl-cwl SLURM template for MeluXina (LuxProvide, Luxembourg), GPU partition: 4x NVIDIA A100 40 GB per node.
# Set the facility's `sbatch:` options in federation.yml or streamflow.yml; defaults in brackets:
#   account [none: your default]  partition [gpu]  qos [test]  time [00:30:00]
#   nodes [1]  gpusPerNode [4]  cpusPerTask [32]  mem [site default]
# container: binds [the deployment's workdir, from `container.bind`], runtime [apptainer], options [--nv], image: a .sif on this system (required unless runtime none).
#SBATCH --job-name={{ job_name | default('xffl', true) }}
#SBATCH --partition={{ partition | default('gpu', true) }}
#SBATCH --qos={{ qos | default('test', true) }}
{% if account %}
#SBATCH --account={{ account }}
{% endif %}
#SBATCH --time={{ time | default('00:30:00', true) }}
#SBATCH --nodes={{ nodes | default(1, true) }}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={{ gpus_per_node | default(4, true) }}
#SBATCH --cpus-per-task={{ cpus_per_task | default(32, true) }}
{% if mem %}
#SBATCH --mem={{ mem }}
{% endif %}

module load Apptainer
# InfiniBand HDR
export NCCL_IB_DISABLE=0
export NCCL_NET_GDR_LEVEL=2
export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
{% for line in setup %}
{{ line }}
{% endfor %}

{% set runtime = container_runtime | default('apptainer', true) %}
{% if runtime == 'none' %}
srun --ntasks=1 bash <<'XFFL_EOF'
{% else %}
srun --ntasks=1 {{ runtime }} exec {{ container_options | default('--nv', true) }} {{ container_binds }} "{{ container_image }}" bash <<'XFFL_EOF'
{% endif %}
{{ streamflow_command }}
XFFL_EOF
