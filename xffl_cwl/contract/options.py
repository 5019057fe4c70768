"""The settings of the tools, one field each: the federation sets them, the generator writes them
into the CWL steps, the click commands take them as options and the tools read them.

A field's name is its CWL input id and federation.yml key; its flag is `--name-with-dashes`.
Nested groups (`lora`) are spelled `lora_<name>` by the tools.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from xffl_cwl.contract.params import Param, params, prefixed, setting
from xffl_cwl.contract.strategies import STRATEGY_NAMES, default_lrs, users_of

Mode = Literal["full", "lora"]
Precision = Literal["fp32", "bf16"]
Sharding = Literal["auto", "full", "hybrid"]
Backend = Literal["auto", "nccl", "gloo"]
LoraMerge = Literal["exact", "fedit"]
Weighting = Literal["samples", "tokens", "uniform"]
Merge = Literal["mean", "trimmed_mean", "median"]
Encoding = Literal["fp32", "bf16", "int8"]  # how a change of the weights crosses between sites (learning/deltas.py)
DEVICES = ("auto", "cpu", "cuda")  # where a tool runs: auto picks CUDA/ROCm when torch sees a GPU


@dataclass(frozen=True)
class LoraOptions:
    r: int = setting(8, "LoRA rank", minimum=1, always=True)
    alpha: float = setting(16.0, "LoRA alpha", minimum=0, min_exclusive=True, always=True)
    targets: tuple[str, ...] = setting(
        ("q_proj", "v_proj"), "LoRA target modules", "Comma-separated module names, e.g. q_proj,v_proj.", always=True
    )
    dropout: float = setting(0.0, "LoRA dropout", minimum=0.0, maximum=1.0, max_exclusive=True)


LORA_PREFIX = "lora_"


@dataclass(frozen=True)
class TrainOptions:
    """What a facility's `xffl-cwl train` is told; the federation's `training:` section."""

    mode: Mode = setting("full", "Fine-tuning mode", "full (all weights) or lora (a PEFT adapter).", always=True)
    local_steps: int | None = setting(
        None, "Local optimizer steps", "Steps this round; default one epoch. Exclusive with epochs.", minimum=1
    )
    epochs: float | None = setting(
        None, "Local epochs", "Epochs over the local data instead of local_steps.", minimum=0, min_exclusive=True
    )
    batch_size: int = setting(
        8, "Micro-batch size", "Sequences per micro-batch (default {default}).", minimum=1, always=True
    )
    lr: float = setting(
        1e-4,
        "Learning rate",
        "Peak AdamW learning rate (default {default}).",
        minimum=0,
        min_exclusive=True,
        always=True,
        default_text="1e-4",
    )
    seq_len: int = setting(
        512, "Sequence length", "Tokens per training sequence (default {default}).", minimum=2, always=True
    )
    seed: int = setting(
        0,
        "Seed",
        "Seeds the held-out split and, with the round and facility, the data order (default {default}).",
        minimum=0,
        always=True,
    )
    precision: Precision = setting(
        "fp32", "Training precision", "fp32, or bf16 mixed precision with fp32 master weights.", always=True
    )
    sharding: Sharding = setting(
        "auto",
        "Sharding across workers",
        "With several workers: full (FSDP: parameters, gradients and optimizer state sharded over all of them), "
        "hybrid (HSDP: sharded inside a node, replicated across nodes) or auto (hybrid on several nodes, else full).",
    )
    activation_checkpointing: bool = setting(
        False, "Activation checkpointing", "Recompute each decoder layer's activations in the backward pass."
    )
    backend: Backend = setting(
        "auto",
        "Communication backend",
        "auto (NCCL on GPUs, RCCL on AMD through the same name, gloo on CPU), nccl or gloo.",
    )
    grad_accum: int = setting(
        1, "Gradient accumulation", "Micro-batches per optimizer step (default {default}).", minimum=1
    )
    warmup_steps: int | None = setting(
        None, "Warm-up steps", "Linear warm-up before cosine decay (default 10% of the steps).", minimum=0
    )
    weight_decay: float = setting(
        0.0,
        "Weight decay",
        "AdamW weight decay (default {default}).",
        minimum=0.0,
        maximum=1.0,
        max_exclusive=True,
        default_text="0",
    )
    max_grad_norm: float = setting(
        1.0, "Gradient clipping norm", "Global gradient norm limit (default {default}).", minimum=0, min_exclusive=True
    )
    eval_fraction: float = setting(
        0.1,
        "Held-out share",
        "Share of the local data held out for the before/after loss (default {default}).",
        minimum=0.0,
        maximum=1.0,
        max_exclusive=True,
    )
    text_field: str = setting("text", "Text field", "Column or JSON key holding the text (default {default}).")
    uplink: Encoding = setting(
        "fp32",
        "Update encoding",
        "Full mode: fp32 sends the new weights; bf16, or int8 with per-block scales, sends their change, and the "
        "facility keeps what was not sent for its next update (error feedback).",
    )
    lora: LoraOptions = field(default_factory=LoraOptions)

    def merged(self, changes: dict[str, Any]) -> TrainOptions:
        return replace(self, **changes)


@dataclass(frozen=True)
class AggregateOptions:
    """How `xffl-cwl aggregate` merges a round; the federation's `aggregation:` section."""

    strategy: str = setting("fedavg", "Strategy", "Server optimizer.", choices=STRATEGY_NAMES, always=True)
    min_updates: int = setting(
        1, "Minimum valid updates", "Fewer valid updates fail the step (default {default}).", minimum=1, always=True
    )
    server_lr: float | None = setting(
        None, "Server learning rate", f"Default {default_lrs()}.", minimum=0, min_exclusive=True
    )
    momentum: float = setting(
        0.9,
        "Server momentum",
        f"{users_of('momentum')} (default {{default}}).",
        minimum=0.0,
        maximum=1.0,
        max_exclusive=True,
        always=True,
    )
    betas: tuple[float, float] = setting(
        (0.9, 0.99),
        "Adam betas",
        f'{users_of("betas")}, as "b1,b2" (default {{default}}).',
        minimum=0.0,
        maximum=1.0,
        max_exclusive=True,
        always=True,
    )
    tau: float = setting(
        1e-3,
        "Adaptivity",
        f"{users_of('tau')} (default {{default}}).",
        minimum=0,
        min_exclusive=True,
        always=True,
        default_text="1e-3",
    )
    lora_merge: LoraMerge = setting(
        "exact",
        "LoRA merge",
        "exact (mean of B_i A_i merged into the base) or fedit (average A and B); used for LoRA updates only.",
        always=True,
    )
    weighting: Weighting = setting("samples", "Weighting", "How updates are weighted.")
    merge: Merge = setting(
        "mean",
        "Combination rule",
        "mean (weighted), or the coordinate-wise median or trimmed_mean (unweighted), which one member with absurd "
        "values cannot drag away.",
    )
    trim: float = setting(
        0.2,
        "Trimmed share",
        "trimmed_mean: share of the members dropped at each end, at least one when three or more (default {default}).",
        minimum=0.0,
        maximum=0.5,
        max_exclusive=True,
    )
    downlink: Encoding = setting(
        "fp32",
        "Change encoding",
        "How the round's change of the global model is sent to the facilities, which keep the previous one: "
        "fp32 (exact), bf16, or int8 with per-block scales; the lossy ones keep what was not sent for the next round "
        "(error feedback). Full and exact-LoRA federations; FedIT sends its adapter.",
    )
    norm_clip: float | None = setting(
        None,
        "Norm clipping",
        "Scale down every update whose change is larger (L2) than norm_clip times the round's median change; "
        "unset: no clipping.",
        minimum=0,
        min_exclusive=True,
    )


@dataclass(frozen=True)
class EvaluateOptions:
    """How `xffl-cwl evaluate` measures a global model's held-out loss."""

    seq_len: int = setting(512, "Sequence length", minimum=2)
    batch_size: int = setting(8, "Batch size", minimum=1)
    text_field: str = setting("text", "Text field")


def tool_params(cls: type) -> tuple[Param, ...]:
    """The settings as a tool takes them: nested groups flattened with their prefix (lora_r, ...)."""
    out = list(params(cls))
    if cls is TrainOptions:
        out += [prefixed(p, LORA_PREFIX) for p in params(LoraOptions)]
    return tuple(out)


def tool_values(options: Any) -> dict[str, Any]:
    """A settings object as the tool's flat name -> value mapping (lora.r -> lora_r)."""
    values = {f.name: getattr(options, f.name) for f in fields(options) if f.name != "lora"}
    if isinstance(options, TrainOptions):
        values |= {LORA_PREFIX + f.name: getattr(options.lora, f.name) for f in fields(LoraOptions)}
    return values


def from_tool_values(cls: type, values: dict[str, Any]) -> Any:
    """The inverse of `tool_values`: flat tool settings back into the (nested) settings object."""
    top = {p.name: values[p.name] for p in params(cls) if p.name in values}
    if cls is TrainOptions:
        lora = {p.name: values[LORA_PREFIX + p.name] for p in params(LoraOptions) if LORA_PREFIX + p.name in values}
        top["lora"] = LoraOptions(**lora)
    return cls(**top)
