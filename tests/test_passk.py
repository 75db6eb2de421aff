"""pass@k: golden values from math.comb, stability, curve and bootstrap."""
import doctest
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.core import passk
from rlhf_jax.core.passk import pass_at_k, pass_at_k_bootstrap, pass_at_k_curve


def golden(n, c, k):
    """Exact rational 1 - C(n-c, k) / C(n, k)."""
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def test_matches_math_comb_exhaustively_small():
    for n in range(1, 13):
        for c in range(n + 1):
            ks = range(1, n + 1)
            got = [float(pass_at_k(n, c, k)) for k in ks]
            np.testing.assert_allclose(got, [golden(n, c, k) for k in ks], rtol=1e-12, atol=1e-15)


def test_vectorised_and_large_n_stable():
    rng = np.random.default_rng(0)
    n = rng.integers(2000, 5000, size=20)
    c = rng.integers(0, 40, size=20)
    for k in (1, 10, 100, 1000):
        got = pass_at_k(n, c, k)
        assert got.shape == (20,) and got.dtype == np.float64
        want = [golden(int(a), int(b), k) for a, b in zip(n, c)]
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
    # broadcast a scalar n against many c
    np.testing.assert_allclose(pass_at_k(100, np.arange(5), 3), [golden(100, i, 3) for i in range(5)], rtol=1e-12)


def test_exact_one_when_too_few_failures():
    # n - c < k: every k-subset contains a correct sample
    assert pass_at_k(10, 8, 3) == 1.0
    assert pass_at_k(3000, 2999, 2) == 1.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 0, 5) == 0.0
    assert float(pass_at_k(10, 3, 1)) == pytest.approx(0.3, abs=1e-15)


def test_errors():
    with pytest.raises(ValueError, match="k"):
        pass_at_k(5, 1, 6)
    with pytest.raises(ValueError, match="k"):
        pass_at_k(5, 1, 0)
    with pytest.raises(ValueError, match="`c`"):
        pass_at_k(5, 6, 1)
    with pytest.raises(ValueError, match="`c`"):
        pass_at_k(np.array([5, 5]), np.array([1, -1]), 1)
    with pytest.raises(ValueError, match="k"):
        pass_at_k(jnp.array([3, 8]), jnp.array([1, 1]), 4)
    with pytest.raises(ValueError, match="ks"):
        pass_at_k_bootstrap(4, np.array([1, 2]), [5])
    with pytest.raises(ValueError, match="confidence"):
        pass_at_k_bootstrap(4, np.array([1, 2]), [1], confidence=1.5)


def test_jax_arrays_and_jit():
    n = jnp.array([10, 20, 50])
    c = jnp.array([1, 19, 7])
    got = pass_at_k(n, c, 4)
    assert isinstance(got, jax.Array)
    np.testing.assert_allclose(got, [golden(10, 1, 4), golden(20, 19, 4), golden(50, 7, 4)], rtol=1e-5)
    jitted = jax.jit(pass_at_k, static_argnums=2)(n, c, 4)
    np.testing.assert_allclose(jitted, got, rtol=1e-6)
    assert float(jitted[1]) == 1.0


def test_curve_is_mean_over_problems_for_every_k():
    rng = np.random.default_rng(1)
    c = rng.integers(0, 17, size=30)
    curve = pass_at_k_curve(16, c)
    assert curve.shape == (16,)
    want = [np.mean([golden(16, int(ci), k) for ci in c]) for k in range(1, 17)]
    np.testing.assert_allclose(curve, want, rtol=1e-12)
    assert np.all(np.diff(curve) >= -1e-15)  # non-decreasing in k
    assert curve[-1] == pytest.approx(np.mean(c > 0))  # pass@n = any correct


def test_bootstrap_interval():
    rng = np.random.default_rng(2)
    c = rng.integers(0, 9, size=200)
    mean, lower, upper = pass_at_k_bootstrap(8, c, [1, 4], num_samples=2000, seed=3)
    np.testing.assert_allclose(mean, pass_at_k_curve(8, c)[[0, 3]], rtol=1e-12)
    assert np.all(lower < mean) and np.all(mean < upper)
    # the width of a 95% interval is about 2 * 1.96 standard errors of the mean
    se = np.array([np.std(pass_at_k(8, c, k), ddof=1) / np.sqrt(len(c)) for k in (1, 4)])
    np.testing.assert_allclose(upper - lower, 2 * 1.96 * se, rtol=0.15)
    # deterministic for a seed; a different seed moves the bounds a little
    again = pass_at_k_bootstrap(8, c, [1, 4], num_samples=2000, seed=3)
    for a, b in zip(again, (mean, lower, upper)):
        np.testing.assert_array_equal(a, b)
    # a narrower confidence gives a narrower interval
    _, lo50, hi50 = pass_at_k_bootstrap(8, c, [1, 4], num_samples=2000, confidence=0.5, seed=3)
    assert np.all(hi50 - lo50 < upper - lower)
    # identical problems: no uncertainty
    m, lo, hi = pass_at_k_bootstrap(8, np.full(10, 3), 2)
    assert lo[0] == pytest.approx(m[0]) and hi[0] == pytest.approx(m[0])


def test_docstring_example():
    assert doctest.testmod(passk, raise_on_error=False).failed == 0
