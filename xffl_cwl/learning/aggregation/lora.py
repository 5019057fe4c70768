"""LoRA adapters as PEFT saves them, mapped onto the base model's weights.

A module `X` adapted with rank r stores `base_model.model.X.lora_A.weight` (r x in) and
`base_model.model.X.lora_B.weight` (out x r); its weight change is scale * B @ A with
scale = alpha / r (alpha / sqrt(r) with rsLoRA) and applies to base tensor `X.weight`.
adapter_config.json comes from another machine: only the fields this arithmetic needs are read,
each checked, and the global adapter's config is written from them, never copied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from xffl_cwl.learning.safetensors_stream import Checkpoint, TensorEntry, TensorReader, to_f32

PEFT_PREFIX = "base_model.model."
A_SUFFIX = ".lora_A.weight"
B_SUFFIX = ".lora_B.weight"
# Settings whose presence (with a non-empty value) means a change that is not scale * B @ A.
UNSUPPORTED = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "fan_in_fan_out layers",
    "lora_bias": "LoRA biases",
    "alpha_pattern": "per-module alpha_pattern",
    "rank_pattern": "per-module rank_pattern",
    "modules_to_save": "modules_to_save (fully trained extra modules)",
}


class UnsupportedAdapter(ValueError):
    """An adapter xffl-cwl cannot merge; the message says which feature or field."""


@dataclass(frozen=True)
class AdapterConfig:
    """The validated fields of adapter_config.json."""

    r: int
    alpha: float
    use_rslora: bool
    targets: tuple[str, ...]
    dropout: float

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def same_merge(self, other: AdapterConfig) -> bool:
        """Adapters FedIT may average: same rank, alpha and scaling rule."""
        return (self.r, self.alpha, self.use_rslora) == (other.r, other.alpha, other.use_rslora)

    def to_peft(self) -> dict[str, Any]:
        """A PEFT adapter_config.json written from validated fields only."""
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "target_modules": list(self.targets),
            "lora_dropout": self.dropout,
            "bias": "none",
            "fan_in_fan_out": False,
            "use_dora": False,
            "base_model_name_or_path": None,
            "inference_mode": False,
        }


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UnsupportedAdapter(f"adapter_config.json {what} must be a finite number, got {value!r:.40}")
    return float(value)


def parse_config(config: Any) -> AdapterConfig:
    """adapter_config.json -> AdapterConfig, refusing what cannot be merged exactly as scale * B @ A."""
    if not isinstance(config, dict):
        raise UnsupportedAdapter("adapter_config.json must be a JSON object")
    if config.get("peft_type") != "LORA":
        raise UnsupportedAdapter(f"adapter_config.json peft_type must be LORA, got {config.get('peft_type')!r:.40}")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise UnsupportedAdapter(f"{what} ({key}) cannot be merged by xffl-cwl")
    if config.get("bias", "none") != "none":
        raise UnsupportedAdapter("LoRA biases (bias) cannot be merged by xffl-cwl")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= 2**20:
        raise UnsupportedAdapter(f"adapter_config.json r must be a positive integer, got {r!r:.40}")
    alpha = _number(config.get("lora_alpha"), "lora_alpha")
    if not 0 < alpha <= 1e6:
        raise UnsupportedAdapter(f"adapter_config.json lora_alpha must be in (0, 1e6], got {alpha}")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise UnsupportedAdapter(f"adapter_config.json use_rslora must be true or false, got {rslora!r:.40}")
    dropout = _number(config.get("lora_dropout", 0.0), "lora_dropout")
    if not 0 <= dropout < 1:
        raise UnsupportedAdapter(f"adapter_config.json lora_dropout must be in [0, 1), got {dropout}")
    targets = config.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, list) or not all(isinstance(t, str) and 0 < len(t) <= 200 for t in targets):
        raise UnsupportedAdapter("adapter_config.json target_modules must be a list of module names")
    return AdapterConfig(r, alpha, rslora, tuple(sorted(set(targets))), dropout)


@dataclass(frozen=True)
class LoraModule:
    base_name: str
    a: TensorEntry
    b: TensorEntry
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


def adapter_modules(ckpt: Checkpoint, config: AdapterConfig) -> dict[str, LoraModule]:
    """Pair up A and B of every adapted module, keyed by the base tensor they change."""
    modules: dict[str, LoraModule] = {}
    for name, entry in ckpt.by_name.items():
        if name.endswith(B_SUFFIX):
            continue
        if not (name.startswith(PEFT_PREFIX) and name.endswith(A_SUFFIX)):
            raise UnsupportedAdapter(f"tensor {name[:120]!r} is not a LoRA A/B matrix of a Linear layer")
        stem = name[: -len(A_SUFFIX)]
        b = ckpt.by_name.get(stem + B_SUFFIX)
        if b is None:
            raise UnsupportedAdapter(f"tensor {name[:120]!r} has no matching lora_B")
        if len(entry.shape) != 2 or len(b.shape) != 2 or b.shape[1] != entry.shape[0]:
            raise UnsupportedAdapter(
                f"tensors {name[:120]!r} {list(entry.shape)} and its lora_B {list(b.shape)} are not a rank-r pair"
            )
        if entry.shape[0] != config.r:
            raise UnsupportedAdapter(
                f"tensor {name[:120]!r} has rank {entry.shape[0]}, adapter_config.json says r={config.r}"
            )
        base_name = stem[len(PEFT_PREFIX) :] + ".weight"
        modules[base_name] = LoraModule(base_name, entry, b, config.scale)
    for name in ckpt.by_name:
        if name.endswith(B_SUFFIX) and not (
            name.startswith(PEFT_PREFIX) and name[: -len(B_SUFFIX)] + A_SUFFIX in ckpt.by_name
        ):
            raise UnsupportedAdapter(f"tensor {name[:120]!r} has no matching lora_A")
    if not modules:
        raise UnsupportedAdapter("the adapter holds no LoRA matrices")
    return modules


class NotFinite(ValueError):
    """A tensor that holds NaN or Inf values; the message is its name."""


def change_norm_sq(module: LoraModule, reader: TensorReader, chunk_elems: int) -> float:
    """||scale * B @ A||_F^2 = scale^2 * sum((A A^T) * (B^T B)): r x r Gram matrices, never B @ A itself.

    A and B are read in row blocks of at most `chunk_elems` elements, in float64 so nothing overflows
    on the way; a NaN or Inf in either raises NotFinite naming the tensor.
    """
    r, cols = module.rank, module.a.shape[1]
    block = max(1, chunk_elems // cols)

    def rows_of(entry: TensorEntry, first: int, n: int, width: int) -> np.ndarray:
        values = to_f32(reader.read(entry, first * width, n * width), entry.dtype).astype(np.float64)
        if not np.isfinite(values).all():
            raise NotFinite(entry.name)
        return values.reshape(n, width)

    gram_a = np.zeros((r, r), dtype=np.float64)
    for i in range(0, r, block):
        left = rows_of(module.a, i, min(block, r - i), cols)
        for j in range(i, r, block):
            right = left if j == i else rows_of(module.a, j, min(block, r - j), cols)
            gram_a[i : i + left.shape[0], j : j + right.shape[0]] = left @ right.T
            gram_a[j : j + right.shape[0], i : i + left.shape[0]] = right @ left.T
    gram_b = np.zeros((r, r), dtype=np.float64)
    rows = max(1, chunk_elems // r)
    for first in range(0, module.b.shape[0], rows):
        b = rows_of(module.b, first, min(rows, module.b.shape[0] - first), r)
        gram_b += b.T @ b
    with np.errstate(over="ignore", invalid="ignore"):
        value = float(np.sum(gram_a * gram_b)) * module.scale**2
    return value if value == value else float("inf")
