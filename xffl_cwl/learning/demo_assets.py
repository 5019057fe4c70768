"""Everything a demo or a test needs, built locally in seconds: no hub, no network.

A byte-level tokenizer, a tiny LLaMA-architecture causal LM with random weights, and a
synthetic non-IID corpus: every facility gets a different kind of text, and the held-out
test set mixes all of them, so a federated model can beat every facility's local model.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xffl_cwl.atomic import atomic_dir
from xffl_cwl.errors import InputError

# The facilities of the original cross-facility example, in the order demos use them.
FACILITY_NAMES = ("leonardo", "lumi", "meluxina", "vega", "karolina", "marenostrum5", "deucalion", "discoverer")

MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 176,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "small": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
    },
    # About 400 MB in fp32: the size the aggregation memory benchmark uses.
    "bench-400mb": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 8,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
    },
    # About 1B parameters (TinyLlama's shape): the GPU training check, benchmarks/gpu_train.py.
    "bench-1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
    },
}

_WORDS = ("red", "blue", "green", "quick", "lazy", "small", "old", "young", "happy", "dark")
_NOUNS = ("fox", "dog", "cat", "bird", "river", "tree", "house", "ship", "cloud", "stone")
_VERBS = ("jumps over", "runs past", "looks at", "sleeps near", "waits for", "sings to")
_CITIES = ("rome", "paris", "oslo", "lisbon", "sofia", "prague", "ljubljana", "barcelona")


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a}+{b}={a + b}"


def _reverse(rng: random.Random) -> str:
    word = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(3, 8)))
    return f"reverse {word}: {word[::-1]}"


def _sentences(rng: random.Random) -> str:
    return f"the {rng.choice(_WORDS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_WORDS)} {rng.choice(_NOUNS)}."


def _uppercase(rng: random.Random) -> str:
    word = "".join(rng.choice("klmnopqrst") for _ in range(rng.randint(3, 8)))
    return f"upper {word}: {word.upper()}"


def _records(rng: random.Random) -> str:
    return json.dumps({"city": rng.choice(_CITIES), "temp": rng.randint(-10, 35)})


def _dates(rng: random.Random) -> str:
    y, m, d = rng.randint(1990, 2030), rng.randint(1, 12), rng.randint(1, 28)
    return f"{y:04d}-{m:02d}-{d:02d} -> {d:02d}/{m:02d}/{y:04d}"


def _counting(rng: random.Random) -> str:
    start, step = rng.randint(0, 50), rng.randint(1, 5)
    return "count: " + " ".join(str(start + i * step) for i in range(6))


def _patterns(rng: random.Random) -> str:
    unit = "".join(rng.choice("xyzw") for _ in range(rng.randint(1, 3)))
    return " ".join([unit] * rng.randint(3, 6))


TASKS: dict[str, Callable[[random.Random], str]] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "sentences": _sentences,
    "uppercase": _uppercase,
    "records": _records,
    "dates": _dates,
    "counting": _counting,
    "patterns": _patterns,
}


@dataclass(frozen=True)
class DemoAssets:
    """Paths of what `make_demo_assets` wrote."""

    root: Path
    model: Path
    datasets: dict[str, Path]
    test_set: Path
    tasks: dict[str, str]


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """A byte-level tokenizer (256 byte tokens + pad/bos/eos) that needs no training data or download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_model(out: Path, preset: str = "tiny", seed: int = 0, max_positions: int = 512) -> None:
    """Write a randomly initialised LLaMA-architecture model and its tokenizer with save_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if preset not in MODEL_PRESETS:
        raise InputError(f"unknown model preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_PRESETS[preset],
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def facility_names(count: int) -> list[str]:
    if not 1 <= count <= len(FACILITY_NAMES):
        raise InputError(f"--facilities must be between 1 and {len(FACILITY_NAMES)}, got {count}")
    return list(FACILITY_NAMES[:count])


def make_demo_assets(
    out: Path,
    facilities: list[str],
    samples_per_facility: int = 2000,
    test_samples_per_task: int = 100,
    preset: str = "tiny",
    seed: int = 0,
) -> DemoAssets:
    """Write model/, data/<facility>/ (datasets.save_to_disk), data/test.jsonl and assets.json under `out`."""
    from datasets import Dataset

    if len(set(facilities)) != len(facilities) or not facilities:
        raise InputError("facility names for demo assets must be distinct and at least one")
    task_names = list(TASKS)
    tasks = {name: task_names[i % len(task_names)] for i, name in enumerate(facilities)}
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_model(tmp / "model", preset, seed)
        for i, (name, task) in enumerate(tasks.items()):
            rng = random.Random(f"{seed}:{i}:{task}")
            texts = [TASKS[task](rng) for _ in range(samples_per_facility)]
            Dataset.from_dict({"text": texts}).save_to_disk(str(tmp / "data" / name))
        test_rng = random.Random(f"{seed}:test")
        with open(tmp / "data" / "test.jsonl", "w", encoding="utf-8") as fh:
            for task in dict.fromkeys(tasks.values()):
                for _ in range(test_samples_per_task):
                    fh.write(json.dumps({"text": TASKS[task](test_rng), "task": task}) + "\n")
        summary = {
            "seed": seed,
            "preset": preset,
            "model": "model",
            "test_set": "data/test.jsonl",
            "facilities": {name: {"task": task, "dataset": f"data/{name}"} for name, task in tasks.items()},
        }
        (tmp / "assets.json").write_text(json.dumps(summary, indent=2) + "\n")
    return DemoAssets(out, out / "model", {n: out / "data" / n for n in tasks}, out / "data" / "test.jsonl", tasks)
