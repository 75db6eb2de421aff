"""Parity of the Gemma 2, Gemma 3 (text) and GPT-NeoX/Pythia families with HF PyTorch.

Each HF model is tiny and random (weights scrambled to O(0.15), norms around their identity,
so a wrong mapping cannot hide behind near-zero logits), saved with ``save_pretrained`` and
loaded with ours. Checked per family: logits on a left-padded batch, greedy decoding through
the KV cache against HF ``generate``, our export loaded back by transformers, and the
scalar head of ``*ForSequenceClassification``. The sliding window (4) is smaller than the
rows (12 tokens, 21 when decoding), and turning the window or the soft caps off must break
the parity, so the parity tests them.
"""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch as torch  # a test extra: missing is a failure, not a skip
import transformers as transformers  # a test extra: missing is a failure, not a skip

from rlhf_jax.data import left_pad  # noqa: E402
from rlhf_jax.models import LM, ModelConfig, from_config, from_pretrained, save_pretrained  # noqa: E402
from rlhf_jax.rollout import generate  # noqa: E402

VOCAB = 96
TOL = 1e-4
PAD = 0
KINDS = ["gemma2", "gemma3", "neox-parallel", "neox-sequential"]


def _hf_config(kind, **extra):
    tf = transformers
    small = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=PAD, **extra)
    if kind == "gemma2":
        return tf.Gemma2Config(num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                               sliding_window=4, query_pre_attn_scalar=24,
                               attn_logit_softcapping=3.0, final_logit_softcapping=4.0, **small)
    if kind == "gemma3":
        # layers sliding, sliding, global; the global layers' rope is linearly scaled
        return tf.Gemma3TextConfig(num_hidden_layers=3, num_key_value_heads=1, head_dim=16,
                                   sliding_window=4, sliding_window_pattern=3,
                                   query_pre_attn_scalar=12, rope_theta=1000.0,
                                   rope_local_base_freq=50.0,
                                   rope_scaling={"rope_type": "linear", "factor": 2.0}, **small)
    if kind.startswith("neox"):
        return tf.GPTNeoXConfig(num_hidden_layers=2, rotary_pct=0.5, rotary_emb_base=100.0,
                                use_parallel_residual=kind == "neox-parallel", **small)
    raise AssertionError(kind)


def _hf_causal(kind):
    config = _hf_config(kind)
    cls = {"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}.get(kind, "GPTNeoXForCausalLM")
    return getattr(transformers, cls)(config)


def _scramble(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                # Gemma's (1 + w) norms start at w = 0, LayerNorm's at 1: stay near either
                base = 0.0 if torch.all(p == 0) else 1.0
                p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def batch():
    """Left-padded batch: rows with 0, 3 and 7 padding tokens (pad id 0)."""
    rs = np.random.RandomState(0)
    ids = rs.randint(3, VOCAB, (3, 12))
    mask = np.ones((3, 12), np.int64)
    mask[1, :3] = 0
    mask[2, :7] = 0
    ids[mask == 0] = PAD
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return ids, mask, positions


def _hf_logits(model, ids, mask, positions):
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """kind -> (folder, HF model)."""
    torch.manual_seed(0)
    out = {}
    for kind in KINDS:
        model = _scramble(_hf_causal(kind))
        folder = tmp_path_factory.mktemp(kind)
        model.save_pretrained(folder)
        out[kind] = (folder, model)
    return out


def _our_logits(lm, params, ids, mask):
    return np.asarray(jax.jit(lm.logits)(params, jnp.asarray(ids), jnp.asarray(mask)))


@pytest.mark.parametrize("kind", KINDS)
def test_causal_lm_logits_match_hf(kind, checkpoints, batch):
    folder, model = checkpoints[kind]
    ids, mask, positions = batch
    ref = _hf_logits(model, ids, mask, positions)
    lm, params = from_pretrained(folder)
    ours = _our_logits(lm, params, ids, mask)
    assert np.isfinite(ours).all()  # padding rows included
    err = np.abs(ours - ref)[mask > 0].max()
    print(f"{kind}: max |logit diff| = {err:.2e}")
    assert err < TOL, (kind, err)
    assert np.abs(ref).max() > 1.0  # the comparison is not trivially small


def test_configs_read_what_hf_builds(checkpoints):
    g2 = from_pretrained(checkpoints["gemma2"][0])[0].config
    assert g2.family == "gemma" and g2.sliding_layers == (True, False)
    assert (g2.attn_logit_softcap, g2.final_logit_softcap, g2.query_pre_attn_scalar) == (3.0, 4.0, 24)
    g3 = from_pretrained(checkpoints["gemma3"][0])[0].config
    assert g3.sliding_layers == (True, True, False) and g3.qk_norm
    assert (g3.rope_theta, g3.rope_local_theta) == (1000.0, 50.0)
    assert g3.rope_scaling_dict == {"rope_type": "linear", "factor": 2.0}
    neox = from_pretrained(checkpoints["neox-parallel"][0])[0].config
    assert neox.parallel_residual and neox.rotary_dim == 4 and neox.rope_theta == 100.0
    assert not from_pretrained(checkpoints["neox-sequential"][0])[0].config.parallel_residual


@pytest.mark.parametrize("kind, change", [
    ("gemma2", dict(sliding_window=None, layer_types=())),
    ("gemma2", dict(attn_logit_softcap=None)),
    ("gemma2", dict(final_logit_softcap=None)),
    ("gemma3", dict(layer_types=("full_attention",) * 3)),
    ("gemma3", dict(rope_local_theta=1000.0)),
    ("neox-parallel", dict(parallel_residual=False)),
    ("neox-parallel", dict(partial_rotary_factor=1.0)),
])
def test_each_feature_matters(kind, change, checkpoints, batch):
    """Switching one feature off breaks the parity above: the parity is evidence for it."""
    folder, model = checkpoints[kind]
    ids, mask, positions = batch
    lm, params = from_pretrained(folder)
    other = LM(dataclasses.replace(lm.config, **change))
    err = np.abs(_our_logits(other, params, ids, mask) - _hf_logits(model, ids, mask, positions))
    assert err[mask > 0].max() > 100 * TOL


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "neox-parallel"])
def test_greedy_matches_hf_generate(kind, checkpoints):
    """Decoding through the KV cache (prompt 9 + 12 new tokens, window 4) equals HF's."""
    folder, hf = checkpoints[kind]
    lm, params = from_pretrained(folder)
    rng = np.random.default_rng(0)
    ids, mask = left_pad([rng.integers(3, VOCAB, size=n).tolist() for n in (9, 4, 1, 6)], 9, pad_id=PAD)
    n = 12
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long), do_sample=False,
                          max_new_tokens=n, eos_token_id=None, pad_token_id=PAD)
    ref = ref[:, ids.shape[1]:].numpy()
    assert len(np.unique(ref)) > 3, "degenerate test model: greedy path is constant"
    out = generate(lm, params, ids, mask, jax.random.key(0), max_new_tokens=n, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "gpt_neox"])
def test_export_loads_in_transformers_with_same_logits(model_type, tmp_path, batch):
    extra = {"num_layers": 3, "layer_types": ("sliding_attention", "full_attention", "sliding_attention")}
    if model_type == "gpt_neox":
        extra = {"tie_word_embeddings": False}
    cfg = ModelConfig.tiny(model_type, VOCAB, hidden_size=32, max_position_embeddings=64,
                           initializer_range=0.2, pad_token_id=PAD, eos_token_id=2, **extra)
    lm, params = from_config(cfg, seed=3)
    # norms away from their identity, so that a (1 + w) / w mix-up shows
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 if "norm" in jax.tree_util.keystr(path) else x, params)
    save_pretrained(lm, params, tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == hf_config["architectures"][0]
    ids, mask, positions = batch
    ref = _hf_logits(hf, ids, mask, positions)
    assert np.abs(_our_logits(lm, params, ids, mask) - ref)[mask > 0].max() < TOL
    again, again_params = from_pretrained(tmp_path)
    assert again == lm
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, again_params)


@pytest.mark.parametrize("kind", ["gemma2", "neox-parallel"])
def test_sequence_classification_score_matches_hf(kind, tmp_path, batch):
    torch.manual_seed(0)
    config = _hf_config(kind, num_labels=1)
    cls = "Gemma2ForSequenceClassification" if kind == "gemma2" else "GPTNeoXForSequenceClassification"
    model = _scramble(getattr(transformers, cls)(config))
    model.save_pretrained(tmp_path)
    ids, mask, positions = batch
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions)).logits[:, 0].numpy()
    rm, rm_params = from_pretrained(tmp_path, head="scalar")
    ours = np.asarray(jax.jit(rm.scores)(rm_params, jnp.asarray(ids), jnp.asarray(mask)))
    np.testing.assert_allclose(ours, ref, atol=TOL)
