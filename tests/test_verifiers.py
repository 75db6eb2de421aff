"""Tests of rlhf_jax.rewards.verifiers (final-number math verifier) and rlhf_jax.rewards.functions
(`module:function` loading and the host reward_fn wrapper)."""
from fractions import Fraction

import numpy as np
import pytest

from rlhf_jax.data.padding import right_pad
from rlhf_jax.data.tokenizers import char_tokenizer, encode_texts
from rlhf_jax.rewards.functions import host_reward_fn, load_function
from rlhf_jax.rewards.verifiers import extract_final_number, math_reward, numbers_match, parse_number


@pytest.mark.parametrize("text, value", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n#### 72", 72),
    ("so 3 + 4 = 7. The answer is 7.", 7),
    ("first 12 then \\boxed{3/4} and 9", Fraction(3, 4)),
    ("costs $1,250.50 in total", Fraction(250100, 200)),
    ("temperature fell to -3", -3),
    ("half is .5", Fraction(1, 2)),
    ("it grew 50%", Fraction(1, 2)),
    ("answer: 18, and then 19 more", 18),
    ("no digits here", None),
    ("", None),
])
def test_extract_final_number(text, value):
    assert extract_final_number(text) == value


def test_numbers_match_compares_exactly():
    assert numbers_match("so it is 0.50", "1/2")
    assert numbers_match("#### 1,000", 1000)
    assert numbers_match("total 1000", "explained ... #### 1000")
    assert not numbers_match("total 1001", "#### 1000")
    assert not numbers_match("no number", "5")
    assert not numbers_match("5", None)
    assert parse_number("abc") is None and parse_number("7.") == 7


def test_math_reward_scores_each_completion():
    scores = math_reward(["q1", "q2", "q3"], ["x = 4", "I think 5", "#### 6"], answer=["4", "#### 6", 6.0])
    assert scores == [1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="needs reference answers"):
        math_reward(["q"], ["1"])
    with pytest.raises(ValueError, match="1 completions but 2 answers"):
        math_reward(["q"], ["1"], answer=["1", "2"])


def test_load_function_from_module_and_file(tmp_path):
    assert load_function("rlhf_jax.rewards.verifiers:math_reward") is math_reward
    path = tmp_path / "my_rewards.py"
    path.write_text("def length(prompts, completions, **kw):\n    return [len(c) for c in completions]\n")
    fn = load_function(f"{path}:length")
    assert fn(["a"], ["abc"]) == [3]


@pytest.mark.parametrize("spec, message", [
    ("rlhf_jax.rewards.verifiers", r"must be written `module:function`"),
    ("no_such_module_xyz:f", r"cannot import module 'no_such_module_xyz'"),
    ("rlhf_jax.rewards.verifiers:nope", r"has no attribute 'nope'"),
    ("rlhf_jax.rewards.verifiers:__doc__", r"'__doc__' is not callable"),
    ("missing_file.py:f", r"no such file missing_file.py"),
])
def test_load_function_errors_name_the_spec(spec, message):
    with pytest.raises(ValueError, match=message):
        load_function(spec)


def _responses(tok, texts, length=6):
    ids = [seq + [tok.eos_token_id] for seq in encode_texts(tok, texts)]
    return right_pad(ids, length, tok.pad_token_id)


def test_host_reward_fn_decodes_and_looks_up_answers():
    tok = char_tokenizer()
    reward_fn = host_reward_fn(math_reward, tok, prompts=["1+1=", "2+2=", "3+3="], answers=["2", "4", "6"])
    tokens, mask = _responses(tok, ["2", "5", "6"])
    prompt_ids, prompt_mask = right_pad(encode_texts(tok, ["1+1=", "3+3=", "2+2="]), 4, 0)
    # Rows 0, 2, 1 of the data set: "2" is right for 1+1, "5" wrong for 3+3, "6" wrong for 2+2.
    scores = reward_fn(prompt_ids, prompt_mask, tokens, mask, np.array([0, 2, 1]))
    assert scores.dtype == np.float32 and scores.tolist() == [1.0, 0.0, 0.0]
    scores = reward_fn(prompt_ids, prompt_mask, tokens, mask, np.array([0, 1, 2]))
    assert scores.tolist() == [1.0, 0.0, 1.0]


def test_host_reward_fn_without_answers_and_bad_returns():
    tok = char_tokenizer()
    seen = {}

    def length_reward(prompts, completions):
        seen["prompts"] = prompts
        return [float(len(c)) for c in completions]

    reward_fn = host_reward_fn(length_reward, tok, prompts=["ab", "cd"], answers=["x", "y"])
    tokens, mask = _responses(tok, ["aaa", "b"])
    prompt_ids, prompt_mask = right_pad(encode_texts(tok, ["ab", "cd"]), 4, 0)
    assert reward_fn(prompt_ids, prompt_mask, tokens, mask, None).tolist() == [3.0, 1.0]
    assert seen["prompts"] == ["ab", "cd"]  # decoded from the ids when there is no prompt_index
    bad = host_reward_fn(lambda p, c: [1.0], tok, prompts=["ab", "cd"], name="short")
    with pytest.raises(ValueError, match=r"short returned shape \(1,\) for 2 completions"):
        bad(prompt_ids, prompt_mask, tokens, mask, np.array([0, 1]))
    worse = host_reward_fn(lambda p, c: ["good", "bad"], tok, prompts=["ab", "cd"], name="words")
    with pytest.raises(ValueError, match=r"words must return a list of numbers"):
        worse(prompt_ids, prompt_mask, tokens, mask, np.array([0, 1]))


def test_reward_model_export_keeps_the_head_bias(tmp_path):
    import jax.numpy as jnp

    from rlhf_jax.cli.commands import export_model
    from rlhf_jax.models import ModelConfig, from_config
    from rlhf_jax.models.hf.pretrained import SCORE_BIAS_FILE
    from rlhf_jax.rewards.functions import load_reward_model

    rm, rm_params = from_config(ModelConfig.tiny("gpt2", vocab_size=64), head="scalar", seed=0)
    assert rm.config.pad_token_id is None
    params = {**rm_params, "score": {**rm_params["score"], "bias": jnp.full_like(rm_params["score"]["bias"], 0.75)}}
    tok = char_tokenizer()
    tok.pad_token = "<unk>"  # id 3: the written config must carry the tokenizer's PAD and EOS
    export_model(rm, params, tok, str(tmp_path / "rm"))
    assert (tmp_path / "rm" / SCORE_BIAS_FILE).exists()
    import json

    written = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert written["pad_token_id"] == 3 and written["eos_token_id"] == 1
    loaded, loaded_params = load_reward_model(str(tmp_path / "rm"))
    assert loaded.head == "scalar"
    np.testing.assert_allclose(np.asarray(loaded_params["score"]["bias"]), 0.75)
    np.testing.assert_allclose(np.asarray(loaded_params["score"]["kernel"]), np.asarray(params["score"]["kernel"]))
