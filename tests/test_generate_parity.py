"""Greedy `generate` parity with HF transformers' `generate(do_sample=False)`.

Each test builds a tiny random HF PyTorch model (weights scrambled to O(0.15) so
that the greedy path is not a constant token), saves it with `save_pretrained`,
loads it with `rlhf_jax.models.from_pretrained`, and decodes the same
left-padded batch with both: the tokens must be identical, with and without an
EOS token (HF pads finished rows with `pad_token_id`, as we do): the EOS loop for every
family, the fixed-length scan for GPT-2.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch as torch  # a test extra: missing is a failure, not a skip
import transformers as transformers  # a test extra: missing is a failure, not a skip

from rlhf_jax.data import left_pad  # noqa: E402
from rlhf_jax.models import from_pretrained  # noqa: E402
from rlhf_jax.rollout import generate  # noqa: E402

VOCAB = 96
P = 9
N = 12
PAD = 0


def _hf_model(kind):
    tf = transformers
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, bos_token_id=1,
                 eos_token_id=2, pad_token_id=PAD)
    if kind == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=1, eos_token_id=2, pad_token_id=PAD)
        return tf.GPT2LMHeadModel(config)
    if kind == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False,
                                                  **small))
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=True,
                                                  **small))
    raise AssertionError(kind)


def _scrambled(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "ln_" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, VOCAB, size=n).tolist() for n in (P, 4, 1, 6)]
    return left_pad(seqs, P, pad_id=PAD)


def _hf_greedy(model, ids, mask, eos):
    model.generation_config.eos_token_id = eos
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                             attention_mask=torch.tensor(mask, dtype=torch.long),
                             do_sample=False, max_new_tokens=N, eos_token_id=eos,
                             pad_token_id=PAD)
    tokens = out[:, ids.shape[1]:].numpy()
    # HF stops when every row is done: pad up to N as we do.
    return np.pad(tokens, ((0, 0), (0, N - tokens.shape[1])), constant_values=PAD)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
def test_greedy_matches_hf_generate(kind, prompts, tmp_path_factory):
    torch.manual_seed(0)
    hf = _scrambled(_hf_model(kind), seed=1)
    folder = tmp_path_factory.mktemp(f"{kind}_ckpt")
    hf.save_pretrained(folder)
    lm, params = from_pretrained(folder)
    ids, mask = prompts

    hf_tokens = _hf_greedy(hf, ids, mask, eos=None)
    assert len(np.unique(hf_tokens)) > 3, "degenerate test model: greedy path is constant"
    # EOS := a token some rows produce mid-way, so some rows stop and others do not.
    counts = np.array([np.isin(hf_tokens, t).any(axis=1).sum() for t in range(VOCAB)])
    eos = int(np.argmax(np.where((counts > 0) & (counts < len(ids)), counts, 0)))
    if counts[eos] == 0:  # every token is in all rows or none: any produced token will do
        eos = int(hf_tokens[0, N // 2])
    hf_eos_tokens = _hf_greedy(hf, ids, mask, eos=eos)
    out = generate(lm, params, ids, mask, jax.random.key(0), max_new_tokens=N,
                   temperature=0.0, eos_token_id=eos, pad_token_id=PAD)
    np.testing.assert_array_equal(np.asarray(out.tokens), hf_eos_tokens)
    ended = (hf_tokens == eos).any(axis=1)
    assert ended.any()
    np.testing.assert_array_equal(np.asarray(out.ended_with_eos), ended)
    first = np.where(ended, np.argmax(hf_tokens == eos, axis=1) + 1, N)
    np.testing.assert_array_equal(np.asarray(out.mask), (np.arange(N)[None] < first[:, None]))

    if kind == "gpt2":
        # The fixed-length decode (a scan, no EOS): one family suffices, the loop does not
        # depend on it; the KV cache, positions and heads of each family run in the EOS loop above.
        free = generate(lm, params, ids, mask, jax.random.key(0), max_new_tokens=N, temperature=0.0)
        np.testing.assert_array_equal(np.asarray(free.tokens), hf_tokens)
        assert not np.asarray(free.ended_with_eos).any()
        np.testing.assert_array_equal(np.asarray(free.mask), 1.0)
    # Greedy log-probs are those of the untempered distribution, from a fresh forward (over
    # the real response tokens of the EOS run: after a row's EOS its PAD slots are masked).
    full_ids = jnp.concatenate([jnp.asarray(ids), out.tokens], axis=1)
    full_mask = jnp.concatenate([jnp.asarray(mask), jnp.asarray(out.mask, jnp.int32)], axis=1)
    fresh = jax.jit(lm.response_logprobs, static_argnums=3)(params, full_ids, full_mask, N)
    m = np.asarray(out.mask)
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(fresh) * m, atol=1e-5)
