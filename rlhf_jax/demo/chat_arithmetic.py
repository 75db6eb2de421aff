"""A verifiable task for a real chat model: two-digit arithmetic in the model's chat template.

Each problem is ``a + b``, ``a - b`` (``a >= b``, both two-digit) or ``a * b`` (``a`` in
11..49, ``b`` in 2..9). The prompt is the chat template's conversation of a short system
message and the question, with the assistant's turn opened and begun with the equation
(``"... <|im_start|>assistant\\n59 + 63 ="``), so the answer is the next few tokens and a
few tokens of sampling budget suffice. The reward is the verifier: 1 when the final
number of the response (:func:`rlhf_jax.rewards.verifiers.extract_final_number`) equals
the answer, else 0.

Problems are drawn without repetition from a seeded generator, and the held-out problems
never occur among the training ones (as ``(a, op, b)`` triples).
"""
from __future__ import annotations

import dataclasses
import random
from typing import Sequence

import numpy as np

from rlhf_jax.data.padding import left_pad
from rlhf_jax.rewards.verifiers import extract_final_number

__all__ = ["Problem", "OPERATIONS", "SYSTEM_PROMPT", "make_problems", "prompt_text", "encode_prompts",
           "ArithmeticVerifier"]

OPERATIONS = ("+", "-", "*")
SYSTEM_PROMPT = "Answer with the number only."


@dataclasses.dataclass(frozen=True)
class Problem:
    """``a op b``, its answer, and how it is asked."""

    a: int
    op: str
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b if self.op == "+" else self.a - self.b if self.op == "-" else self.a * self.b

    @property
    def question(self) -> str:
        return f"What is {self.a} {self.op} {self.b}?"

    @property
    def equation(self) -> str:
        return f"{self.a} {self.op} {self.b} ="


def _draw(rng: random.Random, op: str) -> Problem:
    if op == "+":
        return Problem(rng.randint(10, 99), op, rng.randint(10, 99))
    if op == "-":
        a, b = sorted((rng.randint(10, 99), rng.randint(10, 99)), reverse=True)
        return Problem(a, op, b)
    return Problem(rng.randint(11, 49), op, rng.randint(2, 9))


# How many distinct problems each operation has.
_SPACE = {"+": 90 * 90, "-": 90 * 91 // 2, "*": 39 * 8}


def make_problems(num_train: int, num_heldout: int, *, seed: int,
                  operations: Sequence[str] = OPERATIONS) -> tuple[list[Problem], list[Problem]]:
    """``(train, heldout)``: distinct problems, the operations in turn, no held-out one in train.

    Deterministic for a seed (Python's ``random.Random``).
    """
    for op in operations:
        if op not in OPERATIONS:
            raise ValueError(f"operation {op!r} is not one of {OPERATIONS}")
    total = num_train + num_heldout
    for i, op in enumerate(operations):
        wanted = len(range(i, total, len(operations)))
        if wanted > _SPACE[op]:
            raise ValueError(f"{wanted} distinct `{op}` problems were asked for; there are {_SPACE[op]}")
    rng = random.Random(seed)
    seen: set[Problem] = set()
    problems: list[Problem] = []
    while len(problems) < total:
        p = _draw(rng, operations[len(problems) % len(operations)])
        if p not in seen:
            seen.add(p)
            problems.append(p)
    order = rng.sample(range(total), total)
    problems = [problems[i] for i in order]
    return problems[num_heldout:], problems[:num_heldout]


def prompt_text(tokenizer, problem: Problem, *, system: str = SYSTEM_PROMPT) -> str:
    """The chat-template prompt of a problem, the assistant's turn begun with its equation."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": problem.question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text + problem.equation


def encode_prompts(tokenizer, problems: Sequence[Problem], *, pad_id: int, system: str = SYSTEM_PROMPT):
    """``(prompt_ids, prompt_mask)`` ``[len(problems), P]`` int32, left-padded with ``pad_id``."""
    rows = [tokenizer(prompt_text(tokenizer, p, system=system), add_special_tokens=False)["input_ids"]
            for p in problems]
    ids, mask = left_pad(rows, pad_id=pad_id)
    return ids.astype(np.int32), mask.astype(np.int32)


class ArithmeticVerifier:
    """The host reward: 1.0 where the response's final number is the problem's answer, else 0.0.

    Called with the reward signature of the RL trainer and of `evaluate_pass_at_k`
    (`(prompt_ids, prompt_mask, response_tokens, response_mask, prompt_index) -> [rows]`);
    `prompt_index` selects the problem of each row from `problems`.
    """

    def __init__(self, tokenizer, problems: Sequence[Problem]):
        self.tokenizer = tokenizer
        self.answers = np.asarray([p.answer for p in problems])

    def texts(self, tokens, mask) -> list[str]:
        """The responses as text (special tokens dropped)."""
        tokens, mask = np.asarray(tokens), np.asarray(mask)
        return self.tokenizer.batch_decode([row[: int(m.sum())].tolist() for row, m in zip(tokens, mask)],
                                           skip_special_tokens=True)

    def __call__(self, prompt_ids, prompt_mask, tokens, mask, prompt_index) -> np.ndarray:
        del prompt_ids, prompt_mask
        if prompt_index is None:
            raise ValueError("the arithmetic verifier needs each row's problem index (`prompt_index`)")
        answers = self.answers[np.asarray(prompt_index)]
        got = [extract_final_number(t) for t in self.texts(tokens, mask)]
        return np.asarray([1.0 if g is not None and g == a else 0.0 for g, a in zip(got, answers)], np.float32)
