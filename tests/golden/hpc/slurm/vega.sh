#!/bin/bash
#SBATCH --partition={{ partition }}
{% for line in setup %}
{{ line }}
{% endfor %}
{{ streamflow_command }}
