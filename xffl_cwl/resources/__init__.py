"""Files shipped with the package: cwl/ and slurm/ of the repository, mapped here by pyproject.toml."""
