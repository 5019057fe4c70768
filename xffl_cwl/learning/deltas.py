"""Encodings of a change to float weights, for the bytes that cross between sites each round.

- fp32: the change itself (lossless).
- bf16: the change rounded to bfloat16 (2 bytes per weight).
- int8: the change in blocks of BLOCK consecutive elements, each scaled by its largest magnitude
  to [-127, 127] (1 byte per weight plus 4 bytes per block), as DiLoCo/INTELLECT-style
  outer-gradient compression does.

Blocks are counted over the flattened tensor from element 0, so decoding any element range needs
only the scales of the blocks it touches; encoding must get whole blocks (see aligned_chunks). The
lossy encodings come with error feedback: what was not sent this round is added to the next
round's change (Residual), so nothing is lost, only delayed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import numpy as np

from xffl_cwl.learning.safetensors_stream import from_f32, to_f32

Encoding = Literal["fp32", "bf16", "int8"]
ENCODINGS: tuple[str, ...] = ("fp32", "bf16", "int8")
BLOCK = 256
STORED_CODE = {"fp32": "F32", "bf16": "BF16", "int8": "I8"}  # the safetensors dtype of an encoded change


def block_count(numel: int) -> int:
    return -(-numel // BLOCK)


def aligned_chunks(shape: tuple[int, ...], max_elems: int) -> Iterator[tuple[int, int]]:
    """(start, count) ranges of whole rows that start on a block boundary (only the last may end off one).

    At least one block's worth of rows each, so a chunk may exceed `max_elems` for tiny limits."""
    total = 1
    for d in shape:
        total *= d
    row = total // shape[0] if len(shape) >= 2 and shape[0] else 1
    rows = max(1, max_elems // max(row, 1))
    unit = BLOCK // np.gcd(row, BLOCK) if row else 1  # rows per whole number of blocks
    step = -(-rows // unit) * unit * row
    start = 0
    while start < total:
        count = min(step, total - start)
        yield start, count
        start += count


def encode(change: np.ndarray, encoding: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(values in the stored dtype, int8 block scales or None) of a float32 chunk starting on a block boundary."""
    if encoding == "fp32":
        return change, None
    if encoding == "bf16":
        return from_f32(change, "BF16"), None
    n = change.size
    padded = np.zeros(block_count(n) * BLOCK, dtype=np.float32)
    padded[:n] = change
    blocks = padded.reshape(-1, BLOCK)
    scales = (np.abs(blocks).max(axis=1) / np.float32(127.0)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1.0))
    q = np.rint(blocks / safe[:, None]).clip(-127, 127).astype(np.int8)
    return q.reshape(-1)[:n], scales


def decode(values: np.ndarray, scales: np.ndarray | None, encoding: str, start: int = 0) -> np.ndarray:
    """The float32 change of the elements [start, start + len(values)) from their stored values and,
    for int8, the scales of the blocks those elements fall in (block start // BLOCK onwards)."""
    if encoding == "fp32":
        return values.astype(np.float32, copy=True)
    if encoding == "bf16":
        return to_f32(values, "BF16")
    assert scales is not None
    offset = start % BLOCK
    per_element = np.repeat(scales, BLOCK)[offset : offset + values.size]
    return values.astype(np.float32) * per_element


def scale_range(start: int, count: int) -> tuple[int, int]:
    """(first block, number of blocks) that elements [start, start + count) touch."""
    if count == 0:
        return start // BLOCK, 0
    first = start // BLOCK
    return first, (start + count - 1) // BLOCK - first + 1


def encoded_bytes(numel: int, encoding: str) -> int:
    """Bytes of one tensor's change in an encoding: what a round moves for it."""
    if encoding == "int8":
        return numel + 4 * block_count(numel)
    return numel * (2 if encoding == "bf16" else 4)


def low_rank_rows(b: np.ndarray, a: np.ndarray) -> np.ndarray:
    """b @ a (rows x R times R x cols), float32, computed as R rank-one updates in a fixed order.

    Elementwise products and sums only, so every machine gets the same bits (a BLAS product's
    rounding depends on its kernel): the aggregator and each facility build the same model from it."""
    out = np.zeros((b.shape[0], a.shape[1]), dtype=np.float32)
    term = np.empty_like(out)
    for k in range(b.shape[1]):
        np.multiply.outer(b[:, k], a[k], out=term)
        out += term
    return out
