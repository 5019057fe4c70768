"""Run-time settings for the Hugging Face libraries: never touch the network, no third-party bars."""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def configure() -> None:
    """Set before transformers/datasets are imported; a user's explicit setting wins."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
