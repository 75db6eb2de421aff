"""Tests for rlhf_jax.data.padding against slow, obvious references."""
import doctest
from typing import NamedTuple

import numpy as np
import pytest

from rlhf_jax.data import padding
from rlhf_jax.data.padding import bucket_length, left_pad, pad_rows, right_pad


def _reference_pad(seqs, length, pad_id, side):
    ids, mask = [], []
    for s in seqs:
        fill = [pad_id] * (length - len(s))
        ones, zeros = [1] * len(s), [0] * (length - len(s))
        if side == "left":
            ids.append(fill + list(s))
            mask.append(zeros + ones)
        else:
            ids.append(list(s) + fill)
            mask.append(ones + zeros)
    return np.array(ids), np.array(mask)


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_matches_reference_on_random_sequences(side):
    rng = np.random.default_rng(0)
    fn = left_pad if side == "left" else right_pad
    for _ in range(20):
        b = int(rng.integers(1, 6))
        seqs = [rng.integers(1, 100, size=int(rng.integers(0, 9))).tolist() for _ in range(b)]
        length = int(rng.integers(max(len(s) for s in seqs) or 1, 12))
        ids, mask = fn(seqs, length, pad_id=0)
        ref_ids, ref_mask = _reference_pad(seqs, length, 0, side)
        assert ids.dtype == np.int32 and mask.dtype == np.int32
        assert ids.shape == (b, length)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(mask, ref_mask)


def test_pad_uses_pad_id_and_default_length():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=7)
    assert ids.tolist() == [[1, 2, 3], [7, 7, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = right_pad([np.array([1, 2]), (3,)], 4, pad_id=9)
    assert ids.tolist() == [[1, 2, 9, 9], [3, 9, 9, 9]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def test_left_pad_accepts_2d_array():
    ids, mask = left_pad(np.array([[1, 2], [3, 4]]), 3, pad_id=0)
    assert ids.tolist() == [[0, 1, 2], [0, 3, 4]]


def test_truncation_is_explicit():
    with pytest.raises(ValueError, match=r"sequences\[1\].*5 tokens.*length`=3"):
        left_pad([[1], [1, 2, 3, 4, 5]], 3)
    ids, _ = left_pad([[1, 2, 3, 4, 5]], 3, truncation="left")
    assert ids.tolist() == [[3, 4, 5]]
    ids, _ = right_pad([[1, 2, 3, 4, 5]], 3, truncation="right")
    assert ids.tolist() == [[1, 2, 3]]
    with pytest.raises(ValueError, match="truncation"):
        left_pad([[1]], 3, truncation="middle")


def test_pad_bad_input():
    with pytest.raises(ValueError, match="length"):
        left_pad([[1]], 0)
    with pytest.raises(ValueError, match="integer"):
        left_pad([[1.5]], 2)
    with pytest.raises(ValueError, match=r"sequences\[0\]"):
        right_pad([[[1, 2]]], 2)
    with pytest.raises(ValueError, match="empty"):
        right_pad([[], []])
    with pytest.raises(TypeError, match="sequences"):
        left_pad("abc", 3)


def test_bucket_length():
    assert bucket_length(0) == 16
    assert bucket_length(16) == 16
    assert bucket_length(17) == 32
    assert bucket_length(4096) == 4096
    assert bucket_length(5, buckets=(8, 4)) == 8
    for n in range(0, 300):
        b = bucket_length(n, buckets=(3, 10, 100, 300))
        assert b >= n and all(not (n <= c < b) for c in (3, 10, 100, 300))
    with pytest.raises(ValueError, match="`n`=4097"):
        bucket_length(4097)
    with pytest.raises(ValueError, match="`n`"):
        bucket_length(-1)


class _Pair(NamedTuple):
    a: np.ndarray
    b: np.ndarray


def test_pad_rows_containers():
    x = np.arange(6).reshape(2, 3)
    padded, valid = pad_rows(x, 4)
    assert padded.shape == (4, 3) and padded.dtype == x.dtype
    np.testing.assert_array_equal(padded[:2], x)
    np.testing.assert_array_equal(padded[2:], 0)
    assert valid.tolist() == [True, True, False, False]

    d, valid = pad_rows({"ids": x, "mask": np.ones((2, 3), np.float32)}, 3, fill=0)
    assert d["ids"].shape == (3, 3) and d["mask"][2].tolist() == [0, 0, 0]
    lst, _ = pad_rows([x, x], 2)
    assert isinstance(lst, list) and lst[0].shape == (2, 3)
    pair, _ = pad_rows(_Pair(x, x[:, 0]), 5)
    assert isinstance(pair, _Pair) and pair.b.shape == (5,)


def test_pad_rows_errors():
    with pytest.raises(ValueError, match="batch_size"):
        pad_rows(np.ones((5, 2)), 4)
    with pytest.raises(ValueError, match="disagree"):
        pad_rows({"a": np.ones((2,)), "b": np.ones((3,))}, 4)
    with pytest.raises(ValueError, match="batch_size"):
        pad_rows(np.ones((2,)), 0)


def test_doctests():
    failures, _ = doctest.testmod(padding)
    assert failures == 0
