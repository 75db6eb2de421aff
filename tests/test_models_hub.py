"""Checkpoint loading/export without torch: sharded and bfloat16 files, head
conversions, and errors that name the offending tensor, key or architecture."""
import json
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from rlhf_jax.models import ModelConfig, from_config, from_pretrained, save_pretrained
from rlhf_jax.models.hf.pretrained import read_safetensors, write_safetensors

VOCAB = 64


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree_util.tree_leaves(tree)])


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    lm, params = from_config(ModelConfig.tiny("gpt2", VOCAB, hidden_size=32, max_position_embeddings=32,
                                      pad_token_id=0), seed=0)
    folder = tmp_path_factory.mktemp("gpt2")
    save_pretrained(lm, params, folder)
    return lm, params, folder


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    lm, params = from_config(ModelConfig.tiny("llama", VOCAB, hidden_size=32, max_position_embeddings=32,
                                      tie_word_embeddings=False), seed=0)
    folder = tmp_path_factory.mktemp("llama")
    save_pretrained(lm, params, folder)
    return lm, params, folder


def _copy_with(folder, dest, *, tensors=None, config=None):
    """A copy of checkpoint ``folder`` in ``dest`` with edited tensors and/or config."""
    dest.mkdir(parents=True, exist_ok=True)
    current = dict(read_safetensors(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    if tensors is not None:
        current = tensors(current)
    if config is not None:
        cfg = config(cfg)
    write_safetensors(dest / "model.safetensors", {k: np.array(v) for k, v in current.items()})
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def test_safetensors_files_match_hf_names(gpt2_dir, llama_dir):
    _, _, folder = gpt2_dir
    names = set(dict(read_safetensors(folder / "model.safetensors")))
    assert "transformer.h.1.attn.c_attn.weight" in names and "lm_head.weight" not in names
    _, _, folder = llama_dir
    tensors = dict(read_safetensors(folder / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)  # [out, in]
    assert tensors["lm_head.weight"].shape == (VOCAB, 32)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float32"


def test_sharded_checkpoint_loads(llama_dir, tmp_path):
    lm, params, folder = llama_dir
    tensors = dict(read_safetensors(folder / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate([names[:half], names[half:]]):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        write_safetensors(tmp_path / file, {n: np.array(tensors[n]) for n in part})
        weight_map.update({n: file for n in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    _, again = from_pretrained(tmp_path)
    np.testing.assert_array_equal(_flat(again), _flat(params))


def test_bfloat16_export_and_load(llama_dir, tmp_path):
    lm, params, _ = llama_dir
    save_pretrained(lm, params, tmp_path, save_dtype=jnp.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    stored = dict(read_safetensors(tmp_path / "model.safetensors"))
    assert stored["model.norm.weight"].dtype == ml_dtypes.bfloat16
    _, again = from_pretrained(tmp_path)  # param_dtype float32: upcast
    assert again["trunk"]["norm"]["scale"].dtype == jnp.float32
    want = _flat(jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params))
    np.testing.assert_array_equal(_flat(again), want)


def test_scalar_and_value_heads_from_a_causal_checkpoint(llama_dir):
    lm, params, folder = llama_dir
    _, rm_params = from_pretrained(folder, head="scalar", seed=3)
    assert "lm_head" not in rm_params  # the SFT LM head is not needed by a reward model
    np.testing.assert_array_equal(_flat(rm_params["trunk"]), _flat(params["trunk"]))
    kernel = np.asarray(rm_params["score"]["kernel"])
    assert kernel.shape == (32, 1) and 0.5 < kernel.std() * np.sqrt(33) < 1.5
    _, policy_params = from_pretrained(folder, head="lm+value")
    assert float(jnp.abs(policy_params["value_head"]["kernel"]).max()) == 0.0
    np.testing.assert_array_equal(np.asarray(policy_params["lm_head"]["kernel"]),
                                  np.asarray(params["lm_head"]["kernel"]))


def test_scalar_export_round_trip_and_bias_warning(tmp_path):
    rm, rm_params = from_config(ModelConfig.tiny("gpt2", VOCAB, hidden_size=32, max_position_embeddings=32),
                                head="scalar", seed=2)
    with pytest.warns(UserWarning, match="pad_token_id"):
        save_pretrained(rm, rm_params, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2ForSequenceClassification"] and cfg["num_labels"] == 1
    _, again = from_pretrained(tmp_path / "a", head="scalar")
    np.testing.assert_array_equal(_flat(again), _flat(rm_params))
    params = dict(rm_params, score={**rm_params["score"], "bias": jnp.ones((1,))})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_pretrained(rm, params, tmp_path / "b")
    assert any("bias (1)" in str(w.message) for w in caught)
    with pytest.raises(ValueError, match="load it with head='scalar'"):
        from_pretrained(tmp_path / "a")


def test_value_head_is_not_exported_with_a_warning(gpt2_dir, tmp_path):
    lm, params, _ = gpt2_dir
    policy, policy_params = lm.with_head("lm+value", params)
    with pytest.warns(UserWarning, match="value head"):
        save_pretrained(policy, policy_params, tmp_path)
    names = set(dict(read_safetensors(tmp_path / "model.safetensors")))
    assert not any("value" in n for n in names)


def test_tokenizer_is_saved_alongside(gpt2_dir, tmp_path):
    lm, params, _ = gpt2_dir
    calls = []

    class FakeTokenizer:
        def save_pretrained(self, path):
            calls.append(path)

    save_pretrained(lm, params, tmp_path, tokenizer=FakeTokenizer())
    assert calls == [str(tmp_path)]


def test_unknown_tensor_is_named(gpt2_dir, tmp_path):
    _, _, folder = gpt2_dir

    def add(t):
        t["transformer.h.0.attn.rotary.weight"] = np.zeros(3, np.float32)
        return t

    bad = _copy_with(folder, tmp_path / "x", tensors=add)
    with pytest.raises(ValueError, match="unknown tensor 'transformer.h.0.attn.rotary.weight'"):
        from_pretrained(bad)


def test_missing_tensor_is_named(gpt2_dir, tmp_path):
    _, _, folder = gpt2_dir

    def drop(t):
        del t["transformer.ln_f.bias"]
        return t

    bad = _copy_with(folder, tmp_path / "x", tensors=drop)
    with pytest.raises(ValueError, match="missing tensor.*transformer.ln_f.bias"):
        from_pretrained(bad)


def test_wrong_shape_is_named(llama_dir, tmp_path):
    _, _, folder = llama_dir

    def shrink(t):
        t["model.layers.1.mlp.up_proj.weight"] = np.zeros((5, 32), np.float32)
        return t

    bad = _copy_with(folder, tmp_path / "x", tensors=shrink)
    with pytest.raises(ValueError, match=r"'model.layers.1.mlp.up_proj.weight': shape \(32, 5\)"):
        from_pretrained(bad)


def test_unsupported_model_type_and_architecture(gpt2_dir, tmp_path):
    _, _, folder = gpt2_dir
    bert = _copy_with(folder, tmp_path / "bert",
                      config=lambda c: {**c, "model_type": "bert", "architectures": ["BertModel"]})
    with pytest.raises(ValueError, match="model_type 'bert' is not supported"):
        from_pretrained(bert)
    token_cls = _copy_with(folder, tmp_path / "tok",
                           config=lambda c: {**c, "architectures": ["GPT2ForTokenClassification"]})
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2ForTokenClassification'"):
        from_pretrained(token_cls)
    two_labels = _copy_with(folder, tmp_path / "two", config=lambda c: {
        **c, "architectures": ["GPT2ForSequenceClassification"], "num_labels": 2})
    with pytest.raises(ValueError, match="num_labels=2"):
        from_pretrained(two_labels, head="scalar")
    with pytest.raises(ValueError, match="expects a directory"):
        from_pretrained(folder / "config.json")
    with pytest.raises(ValueError, match="head must be one of"):
        from_pretrained(folder, head="reward")


def test_safetensors_writer_rejects_unknown_dtypes(tmp_path):
    with pytest.raises(ValueError, match="'x'"):
        write_safetensors(tmp_path / "a.safetensors", {"x": np.zeros(2, np.complex64)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        write_safetensors(tmp_path / "b.safetensors", {"x": np.arange(3, dtype=np.int64)})
    assert dict(read_safetensors(tmp_path / "b.safetensors"))["x"].tolist() == [0, 1, 2]


def test_original_gpt2_layout_without_prefix_and_with_buffers(gpt2_dir, tmp_path):
    """The hub's gpt2 checkpoint names tensors without 'transformer.' and stores attn.bias buffers."""
    lm, params, folder = gpt2_dir

    def legacy(t):
        t = {k.removeprefix("transformer."): v for k, v in t.items()}
        t["h.0.attn.bias"] = np.ones((1, 1, 32, 32), np.float32)
        t["lm_head.weight"] = np.array(t["wte.weight"])  # tied: present but not needed
        return t

    legacy_dir = _copy_with(folder, tmp_path / "legacy", tensors=legacy,
                            config=lambda c: {**c, "architectures": ["GPT2LMHeadModel"]})
    _, again = from_pretrained(legacy_dir)
    np.testing.assert_array_equal(_flat(again), _flat(params))
