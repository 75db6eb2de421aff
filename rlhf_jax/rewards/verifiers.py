"""Verifiers: programmatic rewards for tasks with a checkable answer (RLVR).

`math_reward` is a reward function in TRL's convention
(`f(prompts, completions, answer=[...]) -> list[float]`) that gives 1.0 when
the final number of a completion equals the reference answer and 0.0
otherwise. Use it in a config as `reward.function: rlhf_jax.rewards.verifiers:math_reward`
or as the `verifier` of `rlhf-jax eval`.

The final number of a text is, in order of preference: the number after the
last GSM8K-style `####` marker, the content of the last `\\boxed{...}`, the
number after a last "answer is"/"answer:" phrase, else the last number in
the text. Numbers may carry thousands separators, a sign, a decimal part, a
fraction `a/b`, a leading `$` or a trailing `%`; they compare exactly as
rationals (so `0.50` equals `1/2` and `1,000` equals `1000`).
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Sequence

__all__ = ["extract_final_number", "parse_number", "numbers_match", "math_reward"]

_NUMBER = r"[-+]?\$?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s?/\s?\d+)?%?|[-+]?\$?\.\d+"
_NUMBER_RE = re.compile(_NUMBER)
_MARKERS = (
    re.compile(r"####\s*(" + _NUMBER + r")"),
    re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}"),
    re.compile(r"answer\s*(?:is|:|=)\s*(" + _NUMBER + r")", re.IGNORECASE),
)


def parse_number(text: str) -> Fraction | None:
    """Parse one number (`1,234`, `-3.5`, `$12`, `3/4`, `50%`) as an exact Fraction, or None."""
    if text is None:
        return None
    s = str(text).strip().replace("$", "").replace(",", "").replace(" ", "")
    percent = s.endswith("%")
    s = s.rstrip("%").rstrip(".")
    try:
        value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def extract_final_number(text: str) -> Fraction | None:
    """The final answer of a model's text, as a Fraction (None when it has no number).

    >>> extract_final_number("3 apples + 4 apples = 7 apples. #### 7")
    Fraction(7, 1)
    >>> extract_final_number("so the total is 1,250.") == 1250
    True
    """
    if not isinstance(text, str):
        return None
    for pattern in _MARKERS:
        found = pattern.findall(text)
        if found:
            return parse_number(found[-1])
    found = _NUMBER_RE.findall(text)
    return parse_number(found[-1]) if found else None


def numbers_match(completion: str, answer) -> bool:
    """Whether the completion's final number equals the reference answer's.

    The reference may be a number or a text (a GSM8K answer with its worked
    solution and `#### n` works as is).
    """
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        expected = Fraction(answer)
    else:
        expected = extract_final_number(str(answer)) if answer is not None else None
    got = extract_final_number(completion)
    return expected is not None and got is not None and got == expected


def math_reward(prompts: Sequence[str], completions: Sequence[str], answer: Sequence | None = None,
                **unused) -> list[float]:
    """1.0 per completion whose final number equals its reference answer, else 0.0.

    Args:
      prompts: the prompt texts (unused; part of the reward-function convention).
      completions: the generated texts.
      answer: one reference answer per completion (strings or numbers);
        rows without an answer score 0.

    Returns:
      A list of floats, one per completion.
    """
    del prompts, unused
    if answer is None:
        raise ValueError("math_reward needs reference answers: give the prompt set an `answer` column")
    if len(answer) != len(completions):
        raise ValueError(f"math_reward got {len(completions)} completions but {len(answer)} answers")
    return [1.0 if numbers_match(c, a) else 0.0 for c, a in zip(completions, answer)]
