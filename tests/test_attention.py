"""Attention through jax.nn.dot_product_attention against the plain einsum reference, in
both mask forms (packed lengths for forwards, explicit mask for the KV cache), with GQA,
left/right padding, holes, fully padded rows and sliding windows; the scanned layer stack
(program size flat in depth) and remat policies (same gradients, less memory)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models import ModelConfig
from rlhf_jax.models.attention import AttentionMask, cache_allowed, pack_order
from rlhf_jax.models.attention import attention as _attention
from rlhf_jax.models.lm import LM

# one compilation per call site instead of one per eager op
attention = jax.jit(_attention, static_argnames=("scale", "window"))


@jax.jit
def reference_attention(q, k, v, allowed, *, scale):
    """The einsum attention the models used before: f32 scores, explicit [B, T, S] mask,
    GQA by grouping query heads; a row with no allowed key averages all keys."""
    b, t, hq, dh = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, t, hkv, hq // hkv, dh)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, hq * dh)


def _masks(t):
    """Rows: full, left padding, right padding, both ([prompt | response] layout), holes,
    and an all-padding row."""
    m = np.ones((6, t), np.int32)
    m[1, :5] = 0
    m[2, t - 4:] = 0
    m[3, :3] = 0
    m[3, t - 2:] = 0
    m[4, [1, 4, 5, 9]] = 0
    m[5, :] = 0
    return m


def _qkv(rs, b, t, s, hq=4, hkv=2, dh=8, dtype=np.float32):
    q = rs.standard_normal((b, t, hq, dh)).astype(dtype)
    k = rs.standard_normal((b, s, hkv, dh)).astype(dtype)
    v = rs.standard_normal((b, s, hkv, dh)).astype(dtype)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _causal_allowed(mask, window=None):
    t = mask.shape[1]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    seen = j <= i
    if window is not None:
        seen &= i - j < window
    return jnp.asarray(seen[None] & (mask[:, None, :] > 0))


@pytest.mark.parametrize("window", [None, 3])
def test_packed_form_equals_masked_reference_at_real_tokens(window):
    """Packing real tokens first, attending with lengths and unpacking equals the masked
    attention over the original slots, for any padding pattern (GQA: 4 query, 2 KV heads)."""
    rs = np.random.default_rng(0)
    t = 12
    mask = _masks(t)
    q, k, v = _qkv(rs, 6, t, t)
    order, inverse, lengths = pack_order(jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(lengths), mask.sum(1))

    def packed(x):
        return jnp.take_along_axis(x, order[:, :, None, None], axis=1)

    out = attention(packed(q), packed(k), packed(v), AttentionMask(lengths=lengths), scale=8 ** -0.5,
                    window=window)
    out = np.asarray(jnp.take_along_axis(out, inverse[:, :, None], axis=1))
    if window is None:
        want = reference_attention(q, k, v, _causal_allowed(mask), scale=8 ** -0.5)
    else:
        # the window counts real tokens (positions): the reference sees the packed sequence
        pq, pk, pv = packed(q), packed(k), packed(v)
        packed_mask = (np.arange(t)[None, :] < mask.sum(1)[:, None]).astype(np.int32)
        want = reference_attention(pq, pk, pv, _causal_allowed(packed_mask, window), scale=8 ** -0.5)
        want = jnp.take_along_axis(want, inverse[:, :, None], axis=1)
    want = np.asarray(want)
    real = mask > 0
    np.testing.assert_allclose(out[real], want[real], atol=1e-5)
    assert np.isfinite(out).all()  # padding queries, the all-padding row included
    assert np.abs(out[~real]).max() == 0.0  # padding query rows come out as zeros


def test_sliding_window_without_padding_matches_explicit_window():
    rs = np.random.default_rng(1)
    mask = np.ones((2, 10), np.int32)
    q, k, v = _qkv(rs, 2, 10, 10)
    out = attention(q, k, v, AttentionMask(lengths=jnp.full((2,), 10, jnp.int32)), scale=0.3, window=4)
    want = reference_attention(q, k, v, _causal_allowed(mask, window=4), scale=0.3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)
    # and the window matters: full causal attention differs
    full = attention(q, k, v, AttentionMask(lengths=jnp.full((2,), 10, jnp.int32)), scale=0.3)
    assert np.abs(np.asarray(full) - np.asarray(out)).max() > 1e-2


@pytest.mark.parametrize("window", [None, 3])
def test_explicit_form_equals_reference_on_cache_slots(window):
    """The KV-cache form: T=4 queries written at slot 5 of 12, left-padded slots, every row
    (fully masked rows too: both average all keys)."""
    rs = np.random.default_rng(2)
    mask = _masks(12)
    q, k, v = _qkv(rs, 6, 4, 12)
    allowed = cache_allowed(jnp.asarray(mask), 5, 4, window=window)
    i = 5 + np.arange(4)[:, None]
    j = np.arange(12)[None, :]
    want_allowed = (j <= i) & (mask[:, None, :] > 0)
    if window is not None:
        want_allowed &= i - j < window
    np.testing.assert_array_equal(np.asarray(allowed), want_allowed)
    out = attention(q, k, v, AttentionMask(allowed=allowed), scale=0.35)
    want = reference_attention(q, k, v, allowed, scale=0.35)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)


def test_bfloat16_inputs_close_to_float32():
    rs = np.random.default_rng(3)
    mask = _masks(12)
    q, k, v = _qkv(rs, 6, 12, 12)
    lengths = jnp.asarray(mask.sum(1), jnp.int32)
    f32 = attention(q, k, v, AttentionMask(lengths=lengths), scale=0.35)
    bf16 = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                     AttentionMask(lengths=lengths), scale=0.35)
    assert bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(bf16, np.float32), np.asarray(f32), atol=5e-2)


def test_mask_needs_exactly_one_form():
    q, k, v = _qkv(np.random.default_rng(4), 1, 2, 2)
    with pytest.raises(ValueError, match="exactly one"):
        attention(q, k, v, AttentionMask(), scale=1.0)


# ------------------------------------------------------------- scanned layers and remat
def _abstract_lm(num_layers, **kw):
    lm = LM(ModelConfig.tiny("llama", 64, hidden_size=32, num_layers=num_layers), **kw)
    return lm, lm.abstract_params()


def test_program_size_is_flat_in_depth():
    """The layers are one scanned block: the lowered update does not grow with depth."""
    sizes = {}
    for layers in (2, 8):
        lm, params = _abstract_lm(layers, remat="full")
        ids = jax.ShapeDtypeStruct((2, 8), jnp.int32)

        def loss(p, ids):
            return jnp.sum(lm.logits(p, ids, jnp.ones_like(ids)))

        sizes[layers] = len(jax.jit(jax.grad(loss)).lower(params, ids).as_text())
    assert sizes[8] < 1.05 * sizes[2], sizes


def test_remat_policies_give_the_same_gradients_and_full_saves_memory():
    from rlhf_jax.models import from_config

    cfg = ModelConfig.tiny("qwen2", 64, hidden_size=32, num_layers=2, initializer_range=0.2)
    base, params = from_config(cfg, seed=0)
    rs = np.random.default_rng(5)
    ids = jnp.asarray(rs.integers(0, 64, (4, 24)), jnp.int32)
    mask = jnp.asarray(_masks(24)[:4])

    def grads(remat):
        def loss(p):
            hidden, _ = base.hidden_states(p, ids, mask, remat=remat)
            return jnp.sum(jnp.sin(hidden) * mask[:, :, None])

        fn = jax.jit(jax.grad(loss))
        temp = fn.lower(params).compile().memory_analysis().temp_size_in_bytes
        return fn(params), temp

    want, temp_none = grads("none")
    for remat in ("full", "save_dots_no_batch"):
        got, temp = grads(remat)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
        if remat == "full":
            assert temp < temp_none, (temp, temp_none)
    with pytest.raises(ValueError, match="remat must be one of"):
        base.hidden_states(params, ids, mask, remat="sometimes")
    with pytest.raises(ValueError, match="remat must be one of"):
        LM(cfg, remat="sometimes")


# --------------------------------------------------------------- TPU: the splash kernel
from rlhf_jax.models import attention as attention_module  # noqa: E402
from rlhf_jax.models import splash  # noqa: E402


def test_splash_is_chosen_only_on_tpu_and_where_the_shapes_allow(monkeypatch):
    impl = attention_module._implementation
    monkeypatch.delenv(attention_module.ATTENTION_ENV, raising=False)
    assert impl(jnp.float32, backend="tpu") == "splash"
    assert impl(jnp.bfloat16, backend="gpu") == "cudnn" and impl(jnp.float32, backend="gpu") is None
    assert impl(jnp.bfloat16, backend="cpu") is None
    monkeypatch.setenv(attention_module.ATTENTION_ENV, "xla")
    assert impl(jnp.bfloat16, backend="tpu") is None
    monkeypatch.setenv(attention_module.ATTENTION_ENV, "splash")
    assert impl(jnp.float32, backend="cpu") == "splash"
    monkeypatch.setenv(attention_module.ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="RLHF_JAX_ATTENTION"):
        impl(jnp.float32)
    # block sizes: the largest of 512, 256, 128 that divides the slots
    size = splash.splash_block_size
    assert (size(1024), size(768), size(384), size(100)) == (512, 256, 128, None)
    unsupported = splash.splash_unsupported
    assert unsupported((2, 256, 4, 64), (2, 256, 2, 64), device_count=1) is None
    assert "multiple of the kernel's 128-slot blocks" in unsupported((2, 100, 4, 64), (2, 100, 2, 64), device_count=1)
    assert "self-attention" in unsupported((2, 128, 4, 64), (2, 256, 4, 64), device_count=1)
    assert "not a multiple of the 3" in unsupported((2, 128, 4, 64), (2, 128, 3, 64), device_count=1)
    assert "no context mesh" in unsupported((2, 128, 4, 64), (2, 128, 2, 64), device_count=4)
    mesh = jax.sharding.AbstractMesh((2, 2, 1), ("data", "fsdp", "tensor"))
    assert unsupported((4, 128, 4, 64), (4, 128, 2, 64), mesh=mesh, device_count=4) is None
    # segment ids of the packed form: real slots 1, padding 0; a row with no real token keeps slot 0
    np.testing.assert_array_equal(splash.splash_segment_ids(jnp.array([3, 0, 4]), 4),
                                  [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])


def test_auto_on_a_tpu_falls_back_to_xla_where_splash_cannot_run(monkeypatch):
    """Pretend the backend is a TPU: shapes the kernel cannot take (12 slots), and a
    multi-device run without a context mesh (these tests have 4 host devices), get the XLA path."""
    monkeypatch.delenv(attention_module.ATTENTION_ENV, raising=False)
    rs = np.random.default_rng(2)
    for t in (12, 128):
        q, k, v = _qkv(rs, 2, t, t)
        lengths = jnp.array([t, t - 5], jnp.int32)
        want = jax.jit(_attention, static_argnames=("scale",))(q, k, v, AttentionMask(lengths=lengths), scale=0.3)
        monkeypatch.setattr(attention_module.jax, "default_backend", lambda: "tpu")
        got = jax.jit(lambda q, k, v, n: _attention(q, k, v, AttentionMask(lengths=n), scale=0.3))(q, k, v, lengths)
        monkeypatch.undo()
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_splash_kernel_in_interpret_mode_matches_xla(monkeypatch):
    """The Pallas splash kernel (interpret mode on CPU) against the XLA path: a tiny Llama's
    logits over 128 slots with left padding (packed, then segment ids), GQA; the gradients of
    the attention with a sliding window; and the kernel inside `shard_map` under a context
    mesh (2 x 2 data x fsdp), the batch split over the devices."""
    from rlhf_jax.train.sharding import make_mesh, shard_batch

    splash._splash_kernel.cache_clear()
    config = ModelConfig.tiny("llama", 64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                              max_position_embeddings=128)
    lm = LM(config, "lm")
    params = lm.init(0)
    rs = np.random.default_rng(3)
    mask = np.ones((2, 128), np.int32)
    mask[1, :37] = 0  # left padding
    ids = jnp.asarray(np.where(mask > 0, rs.integers(1, 64, (2, 128)), 0), jnp.int32)

    def run(choice, fn, *args):
        monkeypatch.setenv(attention_module.ATTENTION_ENV, choice)
        return jax.jit(fn)(*args)  # a fresh jit: the choice is read when it traces

    logits = lambda p, i, m: lm.logits(p, i, m)  # noqa: E731
    got = run("splash", logits, params, ids, jnp.asarray(mask))
    want = run("xla", logits, params, ids, jnp.asarray(mask))
    real = mask > 0
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=2e-5)

    q, k, v = _qkv(rs, 2, 128, 128, hq=2, hkv=1, dh=16)
    lengths = jnp.array([128, 90], jnp.int32)
    weights = jnp.asarray(rs.standard_normal((2, 128, 32)), jnp.float32)

    def loss(q, k, v):
        out = _attention(q, k, v, AttentionMask(lengths=lengths), scale=0.25, window=40)
        return jnp.sum(out * weights)

    grad = jax.grad(loss, argnums=(0, 1, 2))
    for g, w in zip(run("splash", grad, q, k, v), run("xla", grad, q, k, v)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4)

    mesh = make_mesh(data=2, fsdp=2)
    q, k, v = _qkv(rs, 4, 128, 128, hq=2, hkv=1, dh=16)
    lengths = jnp.array([128, 90, 1, 0], jnp.int32)
    forward = lambda q, k, v, n: _attention(q, k, v, AttentionMask(lengths=n), scale=0.25)  # noqa: E731
    want = run("xla", forward, q, k, v, lengths)
    with jax.set_mesh(mesh):
        placed = shard_batch((q, k, v, lengths), mesh)
        got = run("splash", forward, *placed)
    assert got.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    # the kernel really ran: one per (slots, heads, window) seen above
    assert splash._splash_kernel.cache_info().currsize == 2
