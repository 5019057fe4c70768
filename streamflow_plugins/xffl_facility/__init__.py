"""The `xffl-facility` StreamFlow deployment: SLURM over SSH, one entry per facility."""
