"""The two built-in demo tasks, generated from a seed (no downloads).

1. **Addition** (RLVR, a verifiable reward): prompts like `"374+058="`, the
   reference answer `"2340"` (the sum 0432, zero-padded and written least
   significant digit first, so a tiny left-to-right model can carry; the
   plain format `"374+58="` -> `"432"` is an option). The supervised data are deliberately noisy: a
   fraction `noise_rate` of the training answers has one digit replaced by
   a wrong one, so a model that imitates them is right only some of the
   time, and a verifier can tell right from wrong exactly. The SFT,
   RL and evaluation problems are disjoint.

2. **Moods** (RLHF, a learned reward): prompts like `"sea is"`,
   completions that describe it with one or two adjectives
   (`" calm."`, `" cold and wise."`; the grammar also allows lists like
   `" dull, kind and warm."`). The
   supervised data draw the adjectives uniformly, so they favour no mood. A
   hidden `GoldAnnotator` has a private weight per adjective (positive
   words like "warm" get weights in [0.5, 1.5], negative ones in
   [-1.5, -0.5], neutral ones near 0), dislikes repeating an adjective and
   strongly dislikes text that does not follow the grammar or never ends.
   It calls a pair a tie when the gold scores differ by less than a margin
   (such pairs are dropped, as many labelling pipelines drop "about the
   same" answers), and labels the others with some label noise (the RLHF annotators of Ziegler et
   al. 2019 and Stiennon et al. 2020 agreed with each other only ~70-80% of
   the time) and *accepts* a response when its gold score is at least
   `accept_threshold`. A reward model only sees the annotator's pairwise
   labels of the SFT model's own samples, never the weights.

Everything is host-side Python/NumPy; reward functions follow the host
reward signature of `rlhf_jax.train` (`reward_fn(prompt_ids, prompt_mask,
response_tokens, response_mask, prompt_index) -> np.ndarray [B]`).

References:
  Ziegler et al. 2019, "Fine-Tuning Language Models from Human
  Preferences", arXiv 1909.08593. Stiennon et al. 2020, "Learning to
  summarize from human feedback", arXiv 2009.01325. Gao et al. 2022,
  "Scaling Laws for Reward Model Overoptimization", arXiv 2210.10760.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import numpy as np

from rlhf_jax.data.tokenizers import decode_tokens

__all__ = [
    "AdditionTask",
    "make_addition_task",
    "addition_prompt",
    "addition_answer",
    "corrupt_answer",
    "make_addition_verifier",
    "MoodTask",
    "GoldAnnotator",
    "make_mood_task",
    "MOOD_NOUNS",
    "POSITIVE_ADJECTIVES",
    "NEGATIVE_ADJECTIVES",
    "NEUTRAL_ADJECTIVES",
    "mood_completion",
    "parse_mood",
    "label_pairs",
]


# --------------------------------------------------------------------------
# Addition (RLVR)
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AdditionTask:
    """Addition problems split three ways, as text.

    Attributes:
      sft_prompts, sft_completions: supervised pairs; a fraction of the
        completions is wrong by one digit (`sft_is_correct` says which).
      sft_is_correct: bool per SFT example.
      rl_prompts, rl_answers: prompts for RL with their reference answers.
      eval_prompts, eval_answers: held-out prompts for pass@k.
      num_digits: digits per operand.
      fixed_width, reverse_answer: the text format (see `make_addition_task`).
    """

    sft_prompts: tuple[str, ...]
    sft_completions: tuple[str, ...]
    sft_is_correct: tuple[bool, ...]
    rl_prompts: tuple[str, ...]
    rl_answers: tuple[str, ...]
    eval_prompts: tuple[str, ...]
    eval_answers: tuple[str, ...]
    num_digits: int
    fixed_width: bool = True
    reverse_answer: bool = True

    @property
    def max_answer_length(self) -> int:
        """Characters in the longest possible answer (the sum can carry)."""
        return self.num_digits + 1


def addition_prompt(a: int, b: int, *, width: int | None = None) -> str:
    """The prompt text for `a + b`: `"37+45="`, or `"037+045="` with `width=3`."""
    if width is None:
        return f"{a}+{b}="
    return f"{a:0{width}d}+{b:0{width}d}="


def addition_answer(a: int, b: int, *, width: int | None = None, reverse: bool = False) -> str:
    """The answer text for `a + b`.

    `width` zero-pads the sum to that many digits; `reverse` writes it least
    significant digit first (`37+45` with width 3, reversed: `"280"`), the
    order in which a left-to-right model can propagate carries (Lee et al.
    2023, arXiv 2307.03381).
    """
    text = str(a + b) if width is None else f"{a + b:0{width}d}"
    return text[::-1] if reverse else text


def corrupt_answer(answer: str, rng: np.random.Generator, *, keep_leading_nonzero: bool = True) -> str:
    """Replaces one digit of `answer` by a different digit.

    With `keep_leading_nonzero` the first digit never becomes 0, so an
    unpadded number still looks like a number and only its value is wrong.
    """
    position = int(rng.integers(len(answer)))
    lowest = 1 if keep_leading_nonzero and position == 0 and len(answer) > 1 else 0
    choices = [d for d in "0123456789"[lowest:] if d != answer[position]]
    digit = choices[int(rng.integers(len(choices)))]
    return answer[:position] + digit + answer[position + 1 :]


def make_addition_task(
    seed: int,
    *,
    num_digits: int = 3,
    num_sft: int = 4000,
    num_rl: int = 4000,
    num_eval: int = 128,
    noise_rate: float = 0.4,
    fixed_width: bool = True,
    reverse_answer: bool = True,
) -> AdditionTask:
    """Draws disjoint sets of `num_digits`-digit addition problems.

    Operands are uniform over `[0, 10**num_digits)`; a pair `(a, b)` appears
    in at most one split. In the SFT split a fraction `noise_rate` of the
    answers (chosen at random) is corrupted by `corrupt_answer`.

    Args:
      seed: NumPy seed; the task is a pure function of the arguments.
      num_digits: digits per operand (1-6).
      num_sft, num_rl, num_eval: problems per split.
      noise_rate: fraction of SFT answers with one wrong digit, in [0, 1).
      fixed_width: zero-pad operands to `num_digits` and sums to
        `num_digits + 1` digits, so every digit has a fixed position.
      reverse_answer: write sums least significant digit first.

    Returns:
      An `AdditionTask`.
    """
    if not 1 <= num_digits <= 6:
        raise ValueError(f"`num_digits` must be in [1, 6], got {num_digits}")
    if not 0.0 <= noise_rate < 1.0:
        raise ValueError(f"`noise_rate` must be in [0, 1), got {noise_rate}")
    total = num_sft + num_rl + num_eval
    space = 10 ** (2 * num_digits)
    if total > space // 2:
        raise ValueError(f"{total} problems requested but {num_digits}-digit addition has only {space} pairs")
    rng = np.random.default_rng(seed)
    # Draw distinct pair codes a * 10**d + b without listing the whole space.
    codes: dict[int, None] = {}
    while len(codes) < total:
        for code in rng.integers(0, space, size=total - len(codes)).tolist():
            codes.setdefault(code, None)
    pairs = [divmod(code, 10**num_digits) for code in codes]
    pairs = [pairs[i] for i in rng.permutation(total)]
    width = num_digits if fixed_width else None
    prompts = [addition_prompt(a, b, width=width) for a, b in pairs]
    answers = [
        addition_answer(a, b, width=num_digits + 1 if fixed_width else None, reverse=reverse_answer)
        for a, b in pairs
    ]
    sft_slice = slice(0, num_sft)
    rl_slice = slice(num_sft, num_sft + num_rl)
    eval_slice = slice(num_sft + num_rl, total)
    noisy = rng.random(num_sft) < noise_rate
    plain_number = not fixed_width and not reverse_answer
    completions = [
        corrupt_answer(ans, rng, keep_leading_nonzero=plain_number) if bad else ans
        for ans, bad in zip(answers[sft_slice], noisy)
    ]
    return AdditionTask(
        sft_prompts=tuple(prompts[sft_slice]),
        sft_completions=tuple(completions),
        sft_is_correct=tuple(bool(not bad) for bad in noisy),
        rl_prompts=tuple(prompts[rl_slice]),
        rl_answers=tuple(answers[rl_slice]),
        eval_prompts=tuple(prompts[eval_slice]),
        eval_answers=tuple(answers[eval_slice]),
        num_digits=num_digits,
        fixed_width=fixed_width,
        reverse_answer=reverse_answer,
    )


def make_addition_verifier(tokenizer, answers: Sequence[str]) -> Callable[..., np.ndarray]:
    """A host reward function: 1.0 when the response is exactly the answer.

    The response is the decoded text up to (not including) its EOS; a
    response that never ended is as long as the sampling budget and so is
    only right if the budget equals the answer length, which callers avoid
    by allowing at least one token more than the longest answer.

    Args:
      tokenizer: the tokenizer the responses were sampled with.
      answers: the reference answer for each data-set row; `prompt_index`
        picks the row of every response.

    Returns:
      `reward_fn(prompt_ids, prompt_mask, response_tokens, response_mask,
      prompt_index) -> float32 [B]` of 0.0 / 1.0.
    """
    answers = np.asarray(list(answers), dtype=object)

    def reward_fn(prompt_ids, prompt_mask, response_tokens, response_mask, prompt_index):
        del prompt_ids, prompt_mask
        texts = decode_tokens(tokenizer, response_tokens, response_mask)
        wanted = answers[np.asarray(prompt_index)]
        return np.array([text == ans for text, ans in zip(texts, wanted)], dtype=np.float32)

    return reward_fn


# --------------------------------------------------------------------------
# Moods (RLHF)
# --------------------------------------------------------------------------

MOOD_NOUNS = (
    "sea", "cat", "sun", "tea", "day", "dog", "sky", "room",
    "song", "road", "town", "bread", "rain", "hill", "boat", "park",
)
POSITIVE_ADJECTIVES = ("good", "kind", "warm", "calm", "glad", "wise")
NEGATIVE_ADJECTIVES = ("bad", "cold", "sad", "dull", "rude", "grim")
NEUTRAL_ADJECTIVES = ("big", "old", "new", "red", "tall", "slow")
ADJECTIVES = POSITIVE_ADJECTIVES + NEGATIVE_ADJECTIVES + NEUTRAL_ADJECTIVES

_MOOD_PATTERN = re.compile(r" ([a-z]+(?:, [a-z]+)*)(?: and ([a-z]+))?\.")


def mood_completion(adjectives: Sequence[str]) -> str:
    """Writes adjectives as a completion: `" a."`, `" a and b."`, `" a, b and c."`."""
    adjectives = list(adjectives)
    if not adjectives:
        raise ValueError("a completion needs at least one adjective")
    if len(adjectives) == 1:
        return f" {adjectives[0]}."
    return " " + ", ".join(adjectives[:-1]) + f" and {adjectives[-1]}."


def parse_mood(text: str) -> list[str] | None:
    """The adjectives of a completion, or None when it breaks the grammar.

    The grammar is the one `mood_completion` writes; every word must be one
    of the task's adjectives.
    """
    match = _MOOD_PATTERN.fullmatch(text)
    if match is None:
        return None
    words = match.group(1).split(", ")
    if match.group(2) is None:
        if len(words) != 1:
            return None
    else:
        words.append(match.group(2))
    if any(word not in ADJECTIVES for word in words):
        return None
    return words


@dataclasses.dataclass(frozen=True)
class GoldAnnotator:
    """The hidden preference of the moods task and a noisy labeller of pairs.

    Gold score of a completion that follows the grammar and ended with EOS:
    the sum of `weights[w]` over its distinct adjectives, minus
    `repeat_penalty` for every repeated one. Anything else scores
    `malformed_score`. The annotator accepts a completion whose gold score
    is at least `accept_threshold`. Shown a pair, it calls it a tie when the
    gold scores differ by less than `tie_margin`; otherwise it prefers the
    higher gold score and flips its verdict with probability `label_noise`.

    Attributes:
      weights: adjective -> hidden weight.
      repeat_penalty, malformed_score, accept_threshold, tie_margin,
        label_noise: see above.
    """

    weights: dict
    repeat_penalty: float = 1.0
    malformed_score: float = -2.0
    accept_threshold: float = 1.0
    tie_margin: float = 0.25
    label_noise: float = 0.1

    def score_one(self, text: str, ended_with_eos: bool = True) -> float:
        """Gold score of one completion text."""
        words = parse_mood(text) if ended_with_eos else None
        if words is None:
            return float(self.malformed_score)
        distinct = set(words)
        return float(sum(self.weights[w] for w in distinct) - self.repeat_penalty * (len(words) - len(distinct)))

    def score(self, texts: Sequence[str], ended_with_eos=None) -> np.ndarray:
        """Gold scores `[B]` float64 of completion texts."""
        if ended_with_eos is None:
            ended_with_eos = [True] * len(texts)
        return np.array([self.score_one(t, bool(e)) for t, e in zip(texts, ended_with_eos)], dtype=np.float64)

    def accepts(self, texts: Sequence[str], ended_with_eos=None) -> np.ndarray:
        """Whether the annotator accepts each completion, `[B]` bool."""
        return self.score(texts, ended_with_eos) >= self.accept_threshold

    def reward_fn(self, tokenizer) -> Callable[..., np.ndarray]:
        """The gold score as a host reward function (for diagnostics, not training)."""

        def reward_fn(prompt_ids, prompt_mask, response_tokens, response_mask, prompt_index):
            del prompt_ids, prompt_mask, prompt_index
            texts = decode_tokens(tokenizer, response_tokens, response_mask)
            ended = _ended_with_eos(tokenizer, response_tokens, response_mask)
            return self.score(texts, ended).astype(np.float32)

        return reward_fn


def _ended_with_eos(tokenizer, tokens, mask) -> np.ndarray:
    """`[B]` bool: the last kept token of every row is EOS."""
    tokens = np.asarray(tokens)
    mask = np.asarray(mask) > 0
    length = mask.sum(axis=1)
    last = tokens[np.arange(tokens.shape[0]), np.maximum(length - 1, 0)]
    return (length > 0) & (last == tokenizer.eos_token_id)


def label_pairs(annotator: GoldAnnotator, scores_a, scores_b, rng: np.random.Generator):
    """The annotator's noisy verdicts on pairs.

    Args:
      annotator: gives `tie_margin` and `label_noise`.
      scores_a, scores_b: `[B]` gold scores of the two completions.
      rng: NumPy generator (the flips are random).

    Returns:
      `(prefer_a, decided)`, both `[B]` bool: `decided` is False for the pairs
      the annotator calls a tie (`|a - b| < tie_margin`; their `prefer_a` is
      meaningless), `prefer_a` is the verdict, flipped with probability
      `label_noise`.
    """
    scores_a = np.asarray(scores_a, dtype=np.float64)
    scores_b = np.asarray(scores_b, dtype=np.float64)
    if scores_a.shape != scores_b.shape:
        raise ValueError(f"score shapes differ: {scores_a.shape} vs {scores_b.shape}")
    decided = np.abs(scores_a - scores_b) >= annotator.tie_margin
    flip = rng.random(scores_a.shape) < annotator.label_noise
    return (scores_a > scores_b) ^ flip, decided


@dataclasses.dataclass(frozen=True)
class MoodTask:
    """The moods task: SFT data, RL prompts and the hidden annotator.

    Attributes:
      sft_prompts, sft_completions: supervised pairs, adjectives uniform.
      rl_prompts: prompts for preference sampling and PPO.
      eval_prompts: held-out prompts for the final comparison.
      annotator: the hidden `GoldAnnotator`.
      max_adjectives: the most adjectives an SFT completion has.
    """

    sft_prompts: tuple[str, ...]
    sft_completions: tuple[str, ...]
    rl_prompts: tuple[str, ...]
    eval_prompts: tuple[str, ...]
    annotator: GoldAnnotator

    max_adjectives: int = 2

    @property
    def max_completion_length(self) -> int:
        """Characters in the longest SFT completion (`max_adjectives` of the longest words)."""
        longest = max(len(a) for a in ADJECTIVES)
        return len(mood_completion(["x" * longest] * self.max_adjectives))


def make_mood_task(
    seed: int,
    *,
    num_sft: int = 4000,
    num_rl: int = 2048,
    num_eval: int = 256,
    adjective_counts: Sequence[float] = (0.5, 0.5),
    label_noise: float = 0.1,
    tie_margin: float = 0.25,
    accept_threshold: float = 1.0,
    repeat_penalty: float = 1.0,
) -> MoodTask:
    """Draws the moods task.

    Prompts are `MOOD_NOUNS` followed by `" is"`. SFT completions take
    1, 2, ... adjectives with probabilities `adjective_counts`, each drawn
    uniformly from all 18 (with replacement, so repeats occur naturally).
    The hidden weights are drawn once from the seed: positive adjectives
    U(0.5, 1.5), negative U(-1.5, -0.5), neutral U(-0.25, 0.25).

    Args:
      seed: NumPy seed.
      num_sft, num_rl, num_eval: examples / prompts per split (prompts repeat
        across splits: there are only 16 nouns; the completion is what is judged).
      adjective_counts: probabilities of 1, 2, ... adjectives in the SFT data.
      label_noise, tie_margin, accept_threshold, repeat_penalty: the annotator's.

    Returns:
      A `MoodTask`.
    """
    counts = np.asarray(adjective_counts, dtype=np.float64)
    if counts.ndim != 1 or counts.size == 0 or np.any(counts < 0) or not np.isclose(counts.sum(), 1.0):
        raise ValueError(f"`adjective_counts` must be probabilities summing to 1, got {adjective_counts!r}")
    rng = np.random.default_rng(seed)
    weights = {}
    for words, low, high in (
        (POSITIVE_ADJECTIVES, 0.5, 1.5),
        (NEGATIVE_ADJECTIVES, -1.5, -0.5),
        (NEUTRAL_ADJECTIVES, -0.25, 0.25),
    ):
        for word, w in zip(words, rng.uniform(low, high, size=len(words))):
            weights[word] = float(w)
    annotator = GoldAnnotator(
        weights=weights,
        repeat_penalty=repeat_penalty,
        accept_threshold=accept_threshold,
        tie_margin=tie_margin,
        label_noise=label_noise,
    )

    def prompts(n):
        return tuple(f"{MOOD_NOUNS[i]} is" for i in rng.integers(len(MOOD_NOUNS), size=n))

    sft_prompts = prompts(num_sft)
    sizes = rng.choice(np.arange(1, counts.size + 1), size=num_sft, p=counts)
    completions = tuple(mood_completion([ADJECTIVES[i] for i in rng.integers(len(ADJECTIVES), size=k)]) for k in sizes)
    return MoodTask(
        sft_prompts=sft_prompts,
        sft_completions=completions,
        rl_prompts=prompts(num_rl),
        eval_prompts=prompts(num_eval),
        annotator=annotator,
        max_adjectives=int(counts.size),
    )
