"""Padding and length bucketing for token batches (NumPy only, no JAX).

Compiled JAX functions are specialised on shapes, so every batch that reaches
a jitted step should have one of a handful of shapes. These helpers turn
Python lists of token ids into fixed-shape `int32` arrays with a mask:

- `left_pad` for prompts (the sampler continues every row from the same
  last column, so prompts end flush right; Huang et al. 2024),
- `right_pad` for responses and training sequences,
- `bucket_length` to round a length up to one of a few sizes,
- `pad_rows` to pad the batch axis to a fixed size (e.g. the last, short
  batch of an epoch).

Truncation is explicit: a sequence longer than `length` is an error unless
the caller asks for `truncation="left"` (keep the end) or `"right"` (keep the
start).

References:
  Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO",
  arXiv 2403.17031.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["DEFAULT_BUCKETS", "left_pad", "right_pad", "bucket_length", "pad_rows"]

DEFAULT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

_TRUNCATIONS = ("error", "left", "right")


def _check_common(sequences, length, pad_id, truncation):
    if isinstance(sequences, np.ndarray) and sequences.ndim == 2:
        sequences = [list(row) for row in sequences]
    if not isinstance(sequences, (list, tuple)):
        raise TypeError(f"`sequences` must be a list of lists of token ids, got {type(sequences).__name__}")
    if length is not None and (not isinstance(length, (int, np.integer)) or length < 1):
        raise ValueError(f"`length` must be a positive int or None, got {length!r}")
    if not isinstance(pad_id, (int, np.integer)):
        raise ValueError(f"`pad_id` must be an int, got {pad_id!r}")
    if truncation not in _TRUNCATIONS:
        raise ValueError(f"`truncation` must be one of {_TRUNCATIONS}, got {truncation!r}")
    rows = []
    for i, seq in enumerate(sequences):
        row = np.asarray(seq)
        if row.ndim != 1:
            raise ValueError(f"`sequences[{i}]` must be a flat sequence of token ids, got shape {row.shape}")
        if row.size and not np.issubdtype(row.dtype, np.integer):
            raise ValueError(f"`sequences[{i}]` must hold integer token ids, got dtype {row.dtype}")
        rows.append(row.astype(np.int64))
    if length is None:
        length = max((len(r) for r in rows), default=0)
        if length == 0:
            raise ValueError("`sequences` are all empty and no `length` was given")
    fitted = []
    for i, row in enumerate(rows):
        if len(row) > length:
            if truncation == "error":
                raise ValueError(
                    f"`sequences[{i}]` has {len(row)} tokens, more than `length`={length}; "
                    "pass truncation='left' (keep the end) or 'right' (keep the start) to cut it"
                )
            row = row[len(row) - length:] if truncation == "left" else row[:length]
        fitted.append(row)
    return fitted, int(length)


def _pad(sequences, length, pad_id, truncation, side):
    rows, length = _check_common(sequences, length, pad_id, truncation)
    ids = np.full((len(rows), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int32)
    for i, row in enumerate(rows):
        n = len(row)
        if n == 0:
            continue
        cols = slice(length - n, length) if side == "left" else slice(0, n)
        ids[i, cols] = row
        mask[i, cols] = 1
    return ids, mask


def left_pad(
    sequences: Sequence[Sequence[int]],
    length: int | None = None,
    pad_id: int = 0,
    *,
    truncation: str = "error",
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token sequences into a `[B, L]` array (prompts end in the last column).

    Args:
      sequences: B sequences of token ids (lists, tuples or 1-D arrays).
      length: L, the padded length; None uses the longest sequence.
      pad_id: id written into padding slots.
      truncation: what to do with a sequence longer than `length`: "error"
        (default), "left" (drop tokens from the start, keep the end) or "right"
        (drop tokens from the end).

    Returns:
      `(ids, mask)`, both `[B, L]` int32; `mask` is 1 on real tokens.

    >>> ids, mask = left_pad([[5, 6], [7]], 3, pad_id=0)
    >>> ids.tolist(), mask.tolist()
    ([[0, 5, 6], [0, 0, 7]], [[0, 1, 1], [0, 0, 1]])
    """
    return _pad(sequences, length, pad_id, truncation, "left")


def right_pad(
    sequences: Sequence[Sequence[int]],
    length: int | None = None,
    pad_id: int = 0,
    *,
    truncation: str = "error",
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token sequences into a `[B, L]` array (sequences start in column 0).

    Args:
      sequences: B sequences of token ids.
      length: L, the padded length; None uses the longest sequence.
      pad_id: id written into padding slots.
      truncation: "error" (default), "left" (keep the end) or "right" (keep the start).

    Returns:
      `(ids, mask)`, both `[B, L]` int32; `mask` is 1 on real tokens.

    >>> ids, mask = right_pad([[5, 6], [7]], 3, pad_id=9)
    >>> ids.tolist(), mask.tolist()
    ([[5, 6, 9], [7, 9, 9]], [[1, 1, 0], [1, 0, 0]])
    """
    return _pad(sequences, length, pad_id, truncation, "right")


def bucket_length(n: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket size that is at least `n`.

    Padding every batch to a bucket bounds the number of distinct shapes (and so
    of compilations) by the number of buckets.

    Args:
      n: the length to fit (>= 0).
      buckets: the allowed sizes, in any order.

    Returns:
      `min(b for b in buckets if b >= n)`.

    Raises:
      ValueError: naming `n` when it exceeds the largest bucket.

    >>> bucket_length(17)
    32
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"`n` must be a non-negative int, got {n!r}")
    sizes = sorted(int(b) for b in buckets)
    if not sizes:
        raise ValueError("`buckets` is empty")
    for size in sizes:
        if size >= n:
            return size
    raise ValueError(f"`n`={n} is longer than the largest bucket {sizes[-1]} (buckets={tuple(sizes)})")


def pad_rows(arrays, batch_size: int, *, fill=0):
    """Pad the leading (batch) axis of arrays to `batch_size` rows.

    The added rows are filled with `fill` (0 by default, so a padded mask row is
    all zeros and the row contributes nothing to masked losses).

    Args:
      arrays: one array, or a dict / list / tuple of arrays sharing the same
        leading size B <= `batch_size`.
      batch_size: the target number of rows.
      fill: value written into the new rows.

    Returns:
      `(padded, valid)`: the arrays (same container type) with `batch_size` rows,
      and a `[batch_size]` bool array that is True on the original B rows.

    >>> padded, valid = pad_rows({"x": np.ones((2, 3))}, 4)
    >>> padded["x"].shape, valid.tolist()
    ((4, 3), [True, True, False, False])
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    if isinstance(arrays, dict):
        items = list(arrays.items())
    elif isinstance(arrays, (list, tuple)):
        items = list(enumerate(arrays))
    else:
        items = [(None, arrays)]
    if not items:
        raise ValueError("`arrays` is empty")
    sizes = {}
    for name, a in items:
        a = np.asarray(a)
        if a.ndim == 0:
            raise ValueError(f"`arrays[{name!r}]` is a scalar; it has no batch axis")
        sizes[name] = a.shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"`arrays` disagree on the batch size: {sizes}")
    b = next(iter(sizes.values()))
    if b > batch_size:
        raise ValueError(f"`arrays` have {b} rows, more than `batch_size`={batch_size}")

    def grow(a):
        a = np.asarray(a)
        out = np.full((batch_size,) + a.shape[1:], fill, dtype=a.dtype)
        out[:b] = a
        return out

    valid = np.arange(batch_size) < b
    if isinstance(arrays, dict):
        return {k: grow(v) for k, v in arrays.items()}, valid
    if isinstance(arrays, tuple) and hasattr(arrays, "_fields"):  # NamedTuple
        return type(arrays)(*(grow(a) for a in arrays)), valid
    if isinstance(arrays, (list, tuple)):
        return type(arrays)(grow(a) for a in arrays), valid
    return grow(arrays), valid
