"""Tests for the built-in demo tasks (rlhf_jax.demo.tasks)."""
import re

import numpy as np
import pytest

from rlhf_jax.data.padding import right_pad
from rlhf_jax.data.tokenizers import char_tokenizer, encode_texts
from rlhf_jax.demo import tasks


def _sum_of(prompt, task):
    a, b = re.fullmatch(r"(\d+)\+(\d+)=", prompt).groups()
    if task.fixed_width:
        assert len(a) == len(b) == task.num_digits
        text = str(int(a) + int(b)).zfill(task.num_digits + 1)
    else:
        assert a == str(int(a)) and b == str(int(b))
        text = str(int(a) + int(b))
    return text[::-1] if task.reverse_answer else text


@pytest.mark.parametrize("fixed_width,reverse", [(True, True), (False, False), (True, False)])
def test_addition_splits_are_disjoint_and_answers_are_sums(fixed_width, reverse):
    task = tasks.make_addition_task(
        3, num_digits=2, num_sft=500, num_rl=300, num_eval=64, noise_rate=0.3,
        fixed_width=fixed_width, reverse_answer=reverse,
    )
    assert (len(task.sft_prompts), len(task.rl_prompts), len(task.eval_prompts)) == (500, 300, 64)
    all_prompts = task.sft_prompts + task.rl_prompts + task.eval_prompts
    assert len(set(all_prompts)) == len(all_prompts)
    assert all(_sum_of(p, task) == a for p, a in zip(task.rl_prompts, task.rl_answers))
    assert all(_sum_of(p, task) == a for p, a in zip(task.eval_prompts, task.eval_answers))
    assert max(len(a) for a in task.eval_answers) <= task.max_answer_length == 3
    if fixed_width:
        assert {len(a) for a in task.eval_answers} == {3}


def test_addition_reversed_answer_example():
    assert tasks.addition_prompt(37, 5, width=2) == "37+05="
    assert tasks.addition_answer(37, 45, width=3, reverse=True) == "280"
    assert tasks.addition_answer(37, 45) == "82"


@pytest.mark.parametrize("plain", [False, True])
def test_addition_noise_is_one_wrong_digit_at_the_stated_rate(plain):
    task = tasks.make_addition_task(
        0, num_digits=3, num_sft=4000, num_rl=10, num_eval=10, noise_rate=0.4,
        fixed_width=not plain, reverse_answer=not plain,
    )
    wrong = 0
    for prompt, completion, ok in zip(task.sft_prompts, task.sft_completions, task.sft_is_correct):
        truth = _sum_of(prompt, task)
        assert (completion == truth) == ok
        if not ok:
            wrong += 1
            assert len(completion) == len(truth)
            assert sum(x != y for x, y in zip(completion, truth)) == 1
            if plain:
                assert len(truth) == 1 or completion[0] != "0"
    assert abs(wrong / 4000 - 0.4) < 0.03


def test_addition_task_is_a_function_of_the_seed():
    a = tasks.make_addition_task(7, num_sft=200, num_rl=50, num_eval=20)
    b = tasks.make_addition_task(7, num_sft=200, num_rl=50, num_eval=20)
    c = tasks.make_addition_task(8, num_sft=200, num_rl=50, num_eval=20)
    assert a == b
    assert a.sft_prompts != c.sft_prompts


def test_addition_rejects_impossible_requests():
    with pytest.raises(ValueError, match="pairs"):
        tasks.make_addition_task(0, num_digits=1, num_sft=100, num_rl=0, num_eval=0)
    with pytest.raises(ValueError, match="noise_rate"):
        tasks.make_addition_task(0, noise_rate=1.0)


def test_addition_verifier_checks_exact_text_up_to_eos():
    tok = char_tokenizer()
    verifier = tasks.make_addition_verifier(tok, ["82", "100", "7"])
    texts = ["82", "1000", "7"]
    ids = [row + [tok.eos_token_id] for row in encode_texts(tok, texts)]
    tokens, mask = right_pad(ids, 6, pad_id=tok.pad_token_id)
    out = verifier(None, None, tokens, mask, np.array([0, 1, 2]))
    np.testing.assert_array_equal(out, [1.0, 0.0, 1.0])
    assert out.dtype == np.float32
    # The same responses judged against other rows' answers are wrong.
    np.testing.assert_array_equal(verifier(None, None, tokens, mask, np.array([2, 0, 1])), [0.0, 0.0, 0.0])


def test_mood_grammar_round_trips_and_rejects_broken_text():
    for words in (["warm"], ["cold", "wise"], ["dull", "kind", "warm"], ["good", "good"]):
        assert tasks.parse_mood(tasks.mood_completion(words)) == words
    for bad in (" warm", "warm.", " warm, calm.", " warm and.", " blue.", " warm  and calm.", ""):
        assert tasks.parse_mood(bad) is None, bad


def test_gold_annotator_scores_follow_the_hidden_rules():
    task = tasks.make_mood_task(0, num_sft=100, num_rl=10, num_eval=10)
    ann = task.annotator
    w = ann.weights
    assert all(0.5 <= w[a] <= 1.5 for a in tasks.POSITIVE_ADJECTIVES)
    assert all(-1.5 <= w[a] <= -0.5 for a in tasks.NEGATIVE_ADJECTIVES)
    assert all(abs(w[a]) <= 0.25 for a in tasks.NEUTRAL_ADJECTIVES)
    assert ann.score_one(" warm and kind.") == pytest.approx(w["warm"] + w["kind"])
    assert ann.score_one(" warm and warm.") == pytest.approx(w["warm"] - ann.repeat_penalty)
    assert ann.score_one(" warm and kind") == ann.malformed_score
    assert ann.score_one(" warm.", ended_with_eos=False) == ann.malformed_score
    texts = [" good and glad.", " bad.", " old."]
    np.testing.assert_array_equal(ann.accepts(texts), [True, False, False])


def test_mood_sft_data_does_not_favour_the_gold_preference():
    task = tasks.make_mood_task(1, num_sft=4000)
    gold = task.annotator.score(task.sft_completions)
    assert abs(gold.mean()) < 0.15
    assert 0.1 < task.annotator.accepts(task.sft_completions).mean() < 0.35
    counts = {}
    for text in task.sft_completions:
        for word in tasks.parse_mood(text):
            counts[word] = counts.get(word, 0) + 1
    freq = np.array([counts[a] for a in tasks.ADJECTIVES]) / sum(counts.values())
    assert np.all(np.abs(freq - 1 / len(tasks.ADJECTIVES)) < 0.015)
    assert max(len(c) for c in task.sft_completions) <= task.max_completion_length


def test_label_pairs_noise_rate_and_ties():
    task = tasks.make_mood_task(0, num_sft=10, label_noise=0.2, tie_margin=0.5)
    rng = np.random.default_rng(0)
    a = rng.normal(size=20000)
    b = rng.normal(size=20000)
    labels, decided = tasks.label_pairs(task.annotator, a, b, rng)
    np.testing.assert_array_equal(decided, np.abs(a - b) >= 0.5)
    agree = (labels == (a > b))[decided].mean()
    assert abs(agree - 0.8) < 0.015
    _, decided = tasks.label_pairs(task.annotator, np.zeros(5), np.full(5, 0.49), rng)
    assert not decided.any()
    with pytest.raises(ValueError):
        tasks.label_pairs(task.annotator, a, b[:3], rng)


def test_gold_reward_fn_reads_eos_from_the_tokens():
    tok = char_tokenizer()
    task = tasks.make_mood_task(0, num_sft=10)
    ids = encode_texts(tok, [" good.", " good."])
    ids[0] = ids[0] + [tok.eos_token_id]
    tokens, mask = right_pad(ids, 8, pad_id=tok.pad_token_id)
    out = task.annotator.reward_fn(tok)(None, None, tokens, mask, None)
    np.testing.assert_allclose(out, [task.annotator.weights["good"], task.annotator.malformed_score], rtol=1e-6)
