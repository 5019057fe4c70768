"""HPC facilities: their SLURM job templates, SSH logins and the preflight checks before a run.

Shared by the generator, `xffl-cwl check`/`run` and the `xffl-facility` StreamFlow plugin.
"""
