#!/bin/bash
# xffl-cwl generic SLURM template: any cluster, no modules, no site network settings.
# Set the facility's `sbatch:` options in federation.yml or streamflow.yml (only those in `defaults`
# below have a default here), `setup:` lines (e.g. `module load apptainer`, or
# `. /path/to/venv/bin/activate`) and `container:` (runtime apptainer|singularity|podman|none, options, image).
{% set defaults = {
  "job_name": "xffl",
  "nodes": 1,
  "container_runtime": "none",
  "container_options": "",
  "gpu_vendor": "nvidia",
} %}
#SBATCH --job-name={{ job_name }}
{% if partition %}
#SBATCH --partition={{ partition }}
{% endif %}
{% if qos %}
#SBATCH --qos={{ qos }}
{% endif %}
{% if account %}
#SBATCH --account={{ account }}
{% endif %}
{% if time %}
#SBATCH --time={{ time }}
{% endif %}
#SBATCH --nodes={{ nodes }}
#SBATCH --ntasks-per-node={{ ntasks_per_node or (gpus_per_node if (gpus_per_node or 0) | int > 0 else 1) }}
{% if gpus_per_node %}
#SBATCH --gpus-per-node={{ gpus_per_node }}
{% endif %}
{% if cpus_per_task %}
#SBATCH --cpus-per-task={{ cpus_per_task }}
{% endif %}
{% if mem %}
#SBATCH --mem={{ mem }}
{% endif %}

export OMP_NUM_THREADS="${SLURM_CPUS_PER_TASK:-1}"
{% for line in setup %}
{{ line }}
{% endfor %}

# The job's command is a file StreamFlow's command was written to; streamflow_command runs it.
{% if container_runtime == 'none' %}
{{ streamflow_command }}
{% else %}
{{ container_setup }}
{{ container_exec }} {{ streamflow_command }} &
wait $!
{% endif %}
