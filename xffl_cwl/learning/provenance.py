"""Which image a tool runs in, for its record.

A SLURM template that starts a container says so in the environment (runtime, image and the digest it
computed there); an image built by containers/build.sh also carries its own identity file, which is
all a tool knows when a CWL runner (cwltool --podman, StreamFlow's docker connector) started it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from xffl_cwl.contract.layout import (
    CONTAINER_DIGEST_ENV,
    CONTAINER_IMAGE_ENV,
    CONTAINER_RUNTIME_ENV,
    IMAGE_IDENTITY_FILE,
)
from xffl_cwl.contract.records import ContainerRecord, container_text


def _word(value: object) -> str | None:
    return value if isinstance(value, str) and container_text(value) else None


def current_container(identity_file: Path = Path(IMAGE_IDENTITY_FILE)) -> ContainerRecord:
    """The container this process runs in, or ContainerRecord() ("none" everywhere) outside one."""
    baked: dict[str, object] = {}
    try:
        loaded = json.loads(identity_file.read_text(encoding="utf-8"))
        baked = loaded if isinstance(loaded, dict) else {}
    except (OSError, ValueError):
        pass
    runtime = _word(os.environ.get(CONTAINER_RUNTIME_ENV))
    if runtime in (None, "none") and not baked:
        return ContainerRecord()
    return ContainerRecord(
        runtime=runtime or "unknown",  # started by a runner that does not say which
        image=_word(os.environ.get(CONTAINER_IMAGE_ENV)) or _word(baked.get("image")) or "unknown",
        digest=_word(os.environ.get(CONTAINER_DIGEST_ENV)) or "unknown",
        build=_word(baked.get("inputs")) or "none",
    )
