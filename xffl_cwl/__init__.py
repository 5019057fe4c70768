"""xffl-cwl: federated fine-tuning of LLMs across HPC facilities, as a CWL workflow."""

__version__ = "0.1.0"
