"""The real-model demo's task: problems (deterministic, distinct, held-out disjoint) and its verifier."""
import collections

import numpy as np
import pytest

from rlhf_jax.demo import chat_arithmetic as task


def test_problems_are_deterministic_distinct_and_heldout_disjoint():
    train, heldout = task.make_problems(300, 60, seed=3)
    assert (train, heldout) == task.make_problems(300, 60, seed=3)
    assert (train, heldout) != task.make_problems(300, 60, seed=4)
    assert len(set(train)) == 300 and len(set(heldout)) == 60 and not set(train) & set(heldout)
    counts = collections.Counter(p.op for p in train + heldout)
    assert counts == {"+": 120, "-": 120, "*": 120}
    for p in train + heldout:
        assert p.answer == eval(f"{p.a} {p.op} {p.b}")  # noqa: S307 -- our own integers
        assert p.answer >= 0 and 10 <= p.a <= 99
        assert p.equation == f"{p.a} {p.op} {p.b} =" and p.question == f"What is {p.a} {p.op} {p.b}?"
    with pytest.raises(ValueError, match="distinct `\\*` problems"):
        task.make_problems(400, 0, seed=0, operations=("*",))


class _Tokenizer:
    """Token i is the i-th character of a fixed alphabet; a chat template in the ChatML style."""

    alphabet = "<>0123456789 =-+*.abcdefghijklmnopqrstuvwxyz"

    def batch_decode(self, rows, skip_special_tokens=True):
        return ["".join(self.alphabet[i] for i in row) for row in rows]

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def _encode(text, width):
    ids = [_Tokenizer.alphabet.index(c) for c in text]
    return ids + [0] * (width - len(ids)), [1] * len(ids) + [0] * (width - len(ids))


def test_verifier_reads_the_final_number_of_each_row():
    problems = [task.Problem(12, "+", 30), task.Problem(40, "-", 15), task.Problem(13, "*", 3)]
    verify = task.ArithmeticVerifier(_Tokenizer(), problems)
    texts = [" 42", " 41", " 25 is it", " 39.", " 3 no 39", "", " 1 2 42"]
    rows = [_encode(t, 10) for t in texts]
    tokens, mask = np.array([r[0] for r in rows]), np.array([r[1] for r in rows])
    index = np.array([0, 0, 1, 2, 2, 2, 0])
    scores = verify(None, None, tokens, mask, index)
    np.testing.assert_array_equal(scores, [1, 0, 1, 1, 1, 0, 1])
    assert scores.dtype == np.float32
    with pytest.raises(ValueError, match="prompt_index"):
        verify(None, None, tokens, mask, None)
    assert task.prompt_text(_Tokenizer(), problems[1]) == (
        "<system>Answer with the number only.<user>What is 40 - 15?<assistant>40 - 15 =")
