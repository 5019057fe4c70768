"""Turn a facility's dataset into fixed-length token blocks for causal-LM training.

Accepted inputs: a `datasets.save_to_disk` directory (a Dataset, or a DatasetDict whose
`train` split is used), a JSONL file, a text file, or a directory of JSONL/text files.
Documents are tokenized, joined with EOS and cut into `seq_len` blocks (standard packing).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from xffl_cwl.errors import InputError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".json")


def _jsonl_texts(path: Path, field: str) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise InputError(f"{path}:{lineno} has no string field {field!r}; set --text-field")
            texts.append(record[field])
    return texts


def _plain_texts(path: Path) -> list[str]:
    """Paragraphs (separated by blank lines) are documents."""
    body = path.read_text(encoding="utf-8")
    return [p.strip() for p in body.split("\n\n") if p.strip()]


def _saved_dataset_texts(path: Path, field: str) -> list[str]:
    from datasets import DatasetDict, load_from_disk

    dataset = load_from_disk(str(path))
    if isinstance(dataset, DatasetDict):
        if "train" not in dataset:
            raise InputError(f"{path} is a DatasetDict without a 'train' split (has: {', '.join(dataset)})")
        dataset = dataset["train"]
    if field not in dataset.column_names:
        raise InputError(
            f"{path} has no column {field!r} (columns: {', '.join(dataset.column_names)}); set --text-field"
        )
    return [t for t in dataset[field] if isinstance(t, str)]


def load_texts(path: Path, field: str = "text") -> list[str]:
    """Every document of the dataset at `path`, in a stable order."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"dataset {path} does not exist")
    if path.is_dir():
        if (
            (path / "dataset_info.json").is_file()
            or (path / "dataset_dict.json").is_file()
            or (path / "state.json").is_file()
        ):
            return _saved_dataset_texts(path, field)
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
        if not files:
            raise InputError(f"dataset directory {path} holds no save_to_disk dataset and no .jsonl/.txt files")
        return [t for f in files for t in load_texts(f, field)]
    if path.suffix in JSONL_SUFFIXES:
        return _jsonl_texts(path, field)
    if path.suffix in TEXT_SUFFIXES:
        return _plain_texts(path)
    raise InputError(f"dataset {path}: unknown format; use a save_to_disk directory, .jsonl or .txt")


def pack_blocks(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Token ids of all documents, EOS-separated, cut into a [n_blocks, seq_len] tensor."""
    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2, got {seq_len}")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    batch = 1024
    for i in range(0, len(texts), batch):
        for doc in tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]:
            ids.extend(doc)
            if eos is not None:
                ids.append(eos)
    n_blocks = len(ids) // seq_len
    return torch.tensor(ids[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


def split_blocks(blocks: torch.Tensor, eval_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded train/held-out split; the held-out part gets at least one block when there are two or more."""
    if not 0.0 <= eval_fraction < 1.0:
        raise InputError(f"--eval-fraction must be in [0, 1), got {eval_fraction}")
    n = blocks.shape[0]
    n_eval = min(n - 1, max(1, round(n * eval_fraction))) if eval_fraction > 0 and n >= 2 else 0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return blocks[order[n_eval:]], blocks[order[:n_eval]]
