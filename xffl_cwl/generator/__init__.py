"""federation.yml objects -> a self-contained run folder of CWL and StreamFlow files."""

from xffl_cwl.generator.generate import GENERATED_FILES, generate

__all__ = ["GENERATED_FILES", "generate"]
