"""Tests of sparsek.py (the SPARSEK operator of arXiv 2406.16747) against an independent bisection reference.

    pytest test_sparsek.py
"""
import pytest
import torch

from sparsek import sparsek


def reference(u, k, iters=200):
    """float64 bisection on tau: sum_i clip(u_i - tau, 0, 1) = k; f is non-increasing in tau, f(min u - 1) = n
    and f(max u) = 0. Independent of the sort-based solve in sparsek.py."""
    u = u.double()
    k = torch.as_tensor(k, dtype=torch.float64).expand(u.shape[:-1])
    lo, hi = u.amin(-1) - 1, u.amax(-1)                   # f(lo) = n >= k >= 0 = f(hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        big = (u - mid[..., None]).clamp(0, 1).sum(-1) > k   # sum too big: tau lies above mid
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    p = (u - ((lo + hi) / 2)[..., None]).clamp(0, 1)
    return torch.where((k >= u.shape[-1])[..., None], torch.ones_like(p), p)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


SHAPES = [(7,), (3, 5, 129), (2, 1000)]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_bisection_float64(shape):
    torch.manual_seed(0)
    u = torch.randn(shape, dtype=torch.float64)
    n = shape[-1]
    for k in [1, 2.5, 16, n - 1, n, n + 3]:
        k = max(k, 1)
        p = sparsek(u, k)
        assert p.dtype == torch.float64 and p.shape == u.shape
        e = err(p, reference(u, k))
        assert e < 1e-6, f"shape {shape} k={k}: max error {e:.3g}"
        # the constraints
        assert p.min() >= 0 and p.max() <= 1, f"p outside [0, 1]: {p.min().item()}, {p.max().item()}"
        s = err(p.sum(-1), torch.full(shape[:-1], float(min(k, n))))
        assert s < 1e-5, f"shape {shape} k={k}: row sums off by {s:.3g}"


def test_matches_bisection_float32():
    torch.manual_seed(1)
    u = torch.randn(4, 1000)
    for k in [1, 2.5, 16, 500, 999, 1000]:
        p = sparsek(u, k)
        assert p.dtype == torch.float32
        e = err(p, reference(u, k))
        assert e < 1e-5, f"float32 k={k}: max error {e:.3g}"
        s = err(p.sum(-1), torch.full((4,), float(k)))
        assert s < 1e-4 * k ** 0.5 + 1e-5, f"float32 k={k}: row sums off by {s:.3g}"


def test_half_in_half_out():
    torch.manual_seed(2)
    u = torch.randn(3, 64)
    p = sparsek(u.bfloat16(), 8)
    assert p.dtype == torch.bfloat16
    e = err(p, reference(u.bfloat16(), 8))
    assert e < 1e-2, f"bfloat16: max error {e:.3g}"


def test_per_row_k():
    torch.manual_seed(3)
    u = torch.randn(2, 3, 40, dtype=torch.float64)
    k = torch.tensor([[1.0, 4.5, 39.0], [40.0, 2.0, 100.0]], dtype=torch.float64)
    p, tau = sparsek(u, k, return_tau=True)
    e = err(p, reference(u, k))
    assert e < 1e-6, f"per-row k: max error {e:.3g}"
    assert tau.shape == (2, 3)
    e = err(p, (u - tau[..., None]).clamp(0, 1))
    assert e < 1e-12, f"p != clip(u - tau, 0, 1): {e:.3g}"


def test_ties_and_small_cases():
    p = sparsek(torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=torch.float64), 2)
    assert err(p, torch.tensor([2 / 3, 2 / 3, 2 / 3, 0.0], dtype=torch.float64)) < 1e-12, p
    for c in [0.0, -3.5, 1e6]:                                 # constant rows: k/n everywhere
        p = sparsek(torch.full((2, 10), c, dtype=torch.float64), 3)
        assert err(p, torch.full((2, 10), 0.3, dtype=torch.float64)) < 1e-9, (c, p)
    u = torch.tensor([[2.0, 2.0, 0.5, 0.5, 0.5, -1.0]], dtype=torch.float64)  # ties on both sides
    for k in [1, 2, 2.5, 3.7, 5]:
        assert err(sparsek(u, k), reference(u, k)) < 1e-9, k
    u = torch.randint(-3, 3, (5, 30)).double()                 # many ties, integer scores
    for k in [1, 3, 7.25, 29]:
        assert err(sparsek(u, k), reference(u, k)) < 1e-9, k
    assert sparsek(torch.tensor([[0.3], [-7.0]]), 1).eq(1).all()            # n = 1
    assert sparsek(torch.randn(3, 5), 5).eq(1).all()                         # k = n
    assert sparsek(torch.randn(3, 5), 12.5).eq(1).all()                      # k > n


def test_scales():
    torch.manual_seed(4)
    u = 1e6 * torch.randn(3, 300, dtype=torch.float64)
    for k in [1, 2.5, 16, 299]:
        e = err(sparsek(u, k), reference(u, k))
        assert e < 1e-6, f"scale 1e6, k={k}: max error {e:.3g}"
    u = 1e-6 * torch.randn(3, 300, dtype=torch.float64)
    for k in [1, 2.5, 16, 299]:
        p = sparsek(u, k)
        e = err(p, reference(u, k))
        assert e < 1e-9, f"scale 1e-6, k={k}: max error {e:.3g}"
        e = err(p, torch.full_like(p, k / 300))               # everything fractional: p = u - mean u + k/n
        assert e < 1e-5, f"scale 1e-6, k={k}: off k/n by {e:.3g}"
    u = torch.randn(2, 50)                                     # far-below (masked) scores in float32
    u[:, 30:] = -1e9
    p = sparsek(u, 5)
    e = err(p[:, :30], reference(u[:, :30], 5))
    assert p[:, 30:].eq(0).all(), "masked scores got mass"
    assert e < 1e-5, f"with -1e9 masked scores: max error {e:.3g}"


@pytest.mark.parametrize("shape,k", [((6,), 2.5), ((3, 17), 1), ((2, 3, 12), 4.3), ((2, 20), 18)])
def test_gradcheck(shape, k):
    torch.manual_seed(5)
    u = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sparsek(x, k), (u,))
    if k > 1:                                  # and d p / d k (k = 1 sits on the k >= 1 boundary)
        kt = torch.full(shape[:-1], float(k), dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(sparsek, (u, kt), fast_mode=True)   # random directions


def test_jacobian_formula():
    u = torch.tensor([3.0, 0.2, 0.9, -2.0, 0.5, 0.45], dtype=torch.float64)
    p = sparsek(u, 2.2)
    S = ((p > 0) & (p < 1)).double()
    assert S.sum() >= 2 and p[0] == 1 and p[3] == 0, p                 # a 1, a 0 and a fractional set
    J = torch.autograd.functional.jacobian(lambda x: sparsek(x, 2.2), u)
    expected = torch.diag(S) - S[:, None] * S[None, :] / S.sum()
    assert err(J, expected) < 1e-12, f"Jacobian off by {err(J, expected):.3g}\n{J}"
    u = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)    # k >= n: zero gradient
    sparsek(u, 6).sum().backward()
    assert u.grad.eq(0).all()


@pytest.mark.parametrize("u,k,match", [
    (torch.randn(3, 8), 0, "k=0"),
    (torch.randn(3, 8), -1, "k=-1"),
    (torch.randn(3, 8), 0.5, "k=0.5"),
    (torch.randn(3, 8), torch.tensor([2.0, 0.0, 3.0]), "k=0"),
    (torch.tensor([[0.1, float("nan"), 0.3]]), 1, "NaN"),
    (torch.tensor([[0.1, float("-inf"), 0.3]]), 1, "inf"),
    (torch.arange(8), 2, "int64"),
    (torch.randn(3, 0), 1, "shape"),
    (torch.tensor(1.0), 1, "shape"),
])
def test_bad_input(u, k, match):
    with pytest.raises(ValueError, match=match):
        sparsek(u, k)
