"""The directories xffl-cwl passes around, following Hugging Face's save_pretrained layout.

A global model directory is what `from_pretrained` loads (config, tokenizer, `model.safetensors`
or shards plus index). In LoRA/FedIT federations it also holds the global adapter in `adapter/`
(PEFT's layout). Updates are either a model directory (full fine-tuning) or a PEFT adapter
directory, each with an `update.json`. Nothing here needs torch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from xffl_cwl.contract.layout import AGGREGATE_JSON, UPDATE_JSON
from xffl_cwl.errors import InputError

MODEL_STEM = "model"
ADAPTER_STEM = "adapter_model"
ADAPTER_SUBDIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
INDEX_SUFFIX = ".safetensors.index.json"
HASH_BLOCK = 8 * 1024 * 1024
# Files that describe one round's result, never part of the model handed to the next round.
RESULT_FILES = frozenset({UPDATE_JSON, AGGREGATE_JSON})


def weight_files(model_dir: Path) -> list[str]:
    """Relative paths of every safetensors file that defines the model's values."""
    model_dir = Path(model_dir)
    rels = [p.name for p in model_dir.glob("*.safetensors")]
    adapter = model_dir / ADAPTER_SUBDIR
    if adapter.is_dir():
        rels += [f"{ADAPTER_SUBDIR}/{p.name}" for p in adapter.glob("*.safetensors")]
    return sorted(rels)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def combine_digests(digests: dict[str, str]) -> str:
    """One fingerprint from per-file sha256 digests, independent of the order files were written."""
    lines = "".join(f"{rel} {digests[rel]}\n" for rel in sorted(digests))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def fingerprint(model_dir: Path) -> str:
    """Content hash of a model directory's weights (and global adapter): names what an update started from."""
    rels = weight_files(model_dir)
    if not rels:
        raise InputError(f"{model_dir} holds no .safetensors weights; is it a Hugging Face model directory?")
    return combine_digests({rel: file_sha256(Path(model_dir) / rel) for rel in rels})


def has_adapter(model_dir: Path) -> bool:
    return (Path(model_dir) / ADAPTER_SUBDIR / ADAPTER_CONFIG).is_file()


def is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", INDEX_SUFFIX, ".bin", ".pt"))


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy config, generation config and tokenizer files: everything at the top that is not weights or results."""
    for path in sorted(Path(src).iterdir()):
        if path.is_file() and not is_weight_file(path.name) and path.name not in RESULT_FILES:
            shutil.copy2(path, Path(dst) / path.name)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object, or fail with one line that says which file and why."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise InputError(f"{path} is missing; is this {what}?") from exc
    except (OSError, ValueError) as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); regenerate {what}") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} must hold a JSON object")
    return data
