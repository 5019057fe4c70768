"""LoRA adapters as PEFT saves them, mapped onto the base model's weights.

A module `X` adapted with rank r stores `base_model.model.X.lora_A.weight` (r x in) and
`base_model.model.X.lora_B.weight` (out x r); its weight change is scale * B @ A with
scale = alpha / r (alpha / sqrt(r) with rsLoRA) and applies to base tensor `X.weight`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from xffl_cwl.learning.safetensors_stream import Checkpoint, TensorEntry

PEFT_PREFIX = "base_model.model."
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"


class UnsupportedAdapter(ValueError):
    """An adapter xffl-cwl cannot merge; the message says which feature."""


@dataclass(frozen=True)
class LoraModule:
    base_name: str
    a: TensorEntry
    b: TensorEntry
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def check_config(config: dict[str, Any]) -> None:
    """Refuse adapter features whose weight change is not scale * B @ A on a Linear layer."""
    if config.get("peft_type", "LORA") != "LORA":
        raise UnsupportedAdapter(f"peft_type {config.get('peft_type')} is not LORA")
    for key, what in (("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out layers"), ("lora_bias", "LoRA biases")):
        if config.get(key):
            raise UnsupportedAdapter(f"{what} ({key}) cannot be merged by xffl-cwl")
    if config.get("alpha_pattern"):
        raise UnsupportedAdapter("per-module alpha_pattern cannot be merged by xffl-cwl")
    if config.get("modules_to_save"):
        raise UnsupportedAdapter("modules_to_save (fully trained extra modules) cannot be merged by xffl-cwl")


def adapter_modules(ckpt: Checkpoint, config: dict[str, Any]) -> dict[str, LoraModule]:
    """Pair up A and B of every adapted module, keyed by the base tensor they change."""
    check_config(config)
    alpha = float(config.get("lora_alpha", 8))
    rslora = bool(config.get("use_rslora"))
    modules: dict[str, LoraModule] = {}
    for name, entry in ckpt.by_name.items():
        if name.endswith(B_SUFFIX):
            continue
        if not (name.startswith(PEFT_PREFIX) and name.endswith(A_SUFFIX)):
            raise UnsupportedAdapter(f"tensor {name!r} is not a LoRA A/B matrix of a Linear layer")
        stem = name[: -len(A_SUFFIX)]
        b = ckpt.by_name.get(stem + B_SUFFIX)
        if b is None:
            raise UnsupportedAdapter(f"tensor {name!r} has no matching {stem + B_SUFFIX!r}")
        if len(entry.shape) != 2 or len(b.shape) != 2 or b.shape[1] != entry.shape[0]:
            raise UnsupportedAdapter(
                f"tensors {name!r} {list(entry.shape)} and {b.name!r} {list(b.shape)} are not a rank-r pair"
            )
        rank = entry.shape[0]
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        base_name = stem[len(PEFT_PREFIX) :] + ".weight"
        modules[base_name] = LoraModule(base_name, entry, b, scale)
    for name in ckpt.by_name:
        if name.endswith(B_SUFFIX) and not (
            name.startswith(PEFT_PREFIX) and name[: -len(B_SUFFIX)] + A_SUFFIX in ckpt.by_name
        ):
            raise UnsupportedAdapter(f"tensor {name!r} has no matching lora_A")
    if not modules:
        raise UnsupportedAdapter("the adapter holds no LoRA matrices")
    return modules
