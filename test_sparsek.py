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


# -----------------------------------------------------------------------------
# SK attention: the reference rule (kernel.reference_attention with SK heads) against a brute force, and the
# FlexAttention path (GPU) against the reference

import math  # noqa: E402

import kernel  # noqa: E402
from kernel import FA, SK, SSA  # noqa: E402
from sparsek import SK_P_FLOOR, sk_bias_reference, sk_logp, sk_pools  # noqa: E402

CUDA = torch.cuda.is_available()


def sk_brute_force(q, k, v, u, sk_k, sink, window):
    """SK written out one query at a time, from the rule's words: block m = i // 128, local span from
    c = 128 (m + 1) - window, candidates sink <= j < c ranked by (u descending, j ascending), the pool the best 2k,
    p = SPARSEK(pool, k) (all ones when there are at most k candidates), the best k selected with + log p."""
    B, H, T, D = q.shape
    G = k.shape[1]
    out = torch.zeros(B, H, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            g = h // (H // G)
            selection = {}  # per block: (pool, p), the same for its 128 queries
            for i in range(T):
                c = 128 * (i // 128 + 1) - window
                if i // 128 not in selection:
                    cands = sorted(range(sink, max(sink, c)), key=lambda j: (-u[b, g, j].item(), j))
                    pool = cands[:2 * sk_k]
                    p = torch.ones(len(pool), dtype=torch.float64) if len(pool) <= sk_k else \
                        sparsek(u[b, g, pool].double(), sk_k)
                    selection[i // 128] = pool, p
                pool, p = selection[i // 128]
                keys = {j: 0.0 for j in range(0, min(sink, i + 1))}
                keys.update({j: 0.0 for j in range(max(c, 0), i + 1)})
                keys.update({j: math.log(max(p[r].item(), 1e-30)) for r, j in enumerate(pool[:sk_k])})
                js = torch.tensor(sorted(keys))
                s = q[b, h, i].double() @ k[b, g, js].double().T / math.sqrt(D)
                s = s + torch.tensor([keys[j] for j in js.tolist()], dtype=torch.float64)
                out[b, h, i] = s.softmax(-1) @ v[b, g, js].double()
    return out


@pytest.mark.parametrize("T,sk_k,ties", [(300, 6, False), (300, 130, True)])
def test_sk_reference_matches_brute_force(T, sk_k, ties):
    """GQA (4 query heads on 2 KV heads), odd lengths (a partial last block), SK beside FA and SSA heads; a block
    whose candidates are fewer than k (p = 1) and blocks with more than 2k; tied scores (ties: the earlier key)."""
    torch.manual_seed(T)
    B, H, G, D, sink, window = 1, 4, 2, 16, 5, 128
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, G, T, D), torch.randn(B, G, T, D)
    u = torch.randn(B, G, T)
    if ties:
        u = (u * 2).round() / 2  # few distinct values
    modes = torch.tensor([[SK, SK]])
    o = kernel.reference_attention(q, k, v, modes, sink=sink, window=window, sk_scores=u, sk_k=sk_k)
    ref = sk_brute_force(q, k, v, u, sk_k, sink, window)
    assert (o.double() - ref).abs().max() < 1e-5
    # the SK heads beside other modes: unchanged by them, and the others unchanged by SK
    mixed = kernel.reference_attention(q, k, v, torch.tensor([[SK, SSA]]), sink=sink, window=window, sk_scores=u,
                                       sk_k=sk_k)
    torch.testing.assert_close(mixed[:, :2], o[:, :2])
    ssa = kernel.reference_attention(q, k, v, torch.tensor([[FA, SSA]]), sink=sink, window=window)
    torch.testing.assert_close(mixed[:, 2:], ssa[:, 2:])


def test_sk_scores_get_a_gradient_and_nan_is_refused():
    torch.manual_seed(0)
    B, H, G, T, D = 1, 2, 1, 400, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, G, T, D), torch.randn(B, G, T, D)
    u = torch.randn(B, G, T, requires_grad=True)
    modes = torch.tensor([[SK]])
    o = kernel.reference_attention(q, k, v, modes, sink=4, window=128, sk_scores=u, sk_k=8)
    o.square().sum().backward()
    assert u.grad.abs().sum() > 0 and torch.isfinite(u.grad).all()
    # the sink and the keys after the last block's c = 4 * 128 - 128 are never candidates: no gradient
    assert u.grad[0, 0, :4].abs().sum() == 0 and u.grad[0, 0, 384:].abs().sum() == 0
    # a scorer at 0 (its initialisation) ties every key: p is 1/2 on the pool, and still a gradient
    u0 = torch.zeros(B, G, T, requires_grad=True)
    kernel.reference_attention(q, k, v, modes, sink=4, window=128, sk_scores=u0, sk_k=8).square().sum().backward()
    assert u0.grad.abs().sum() > 0
    bad = u.detach().clone()
    bad[0, 0, 7] = float("nan")
    with pytest.raises(ValueError, match="SK scores contain NaN"):
        kernel.reference_attention(q, k, v, modes, sink=4, window=128, sk_scores=bad, sk_k=8)
    with pytest.raises(ValueError, match="pass their scores as sk_scores"):
        kernel.reference_attention(q, k, v, modes, sink=4, window=128)


def test_scorer():
    from sparsek import Scorer
    s = Scorer(16)
    k_pre = torch.randn(2, 30, 3, 16)
    assert torch.equal(s(k_pre), torch.zeros(2, 3, 30))  # starts at 0: uniform over the candidates
    with torch.no_grad():
        s.weight.normal_()
    torch.testing.assert_close(s(k_pre), torch.einsum("btgd,d->bgt", k_pre, s.weight))
    with pytest.raises(ValueError, match=r"pre-RoPE keys \[B, T, G, D=16\], got \[2, 30, 3, 8\]"):
        s(torch.randn(2, 30, 3, 8))


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("T,sink,window,sk_k", [(1000, 4, 256, 32), (4096 + 77, 128, 1024, 256)])
def test_gpu_sk_flex_matches_reference(T, sink, window, sk_k):
    """sk_flex_attention (FlexAttention: block mask, mask_mod on the k-th best score, score_mod adding log p) against
    the reference, forward and gradients in q, k, v and the scores; GQA 8:2; fp32."""
    from sparsek import sk_flex_attention
    torch.manual_seed(T)
    B, H, G, D = 2, 8, 2, 64
    q, k, v = (torch.randn(B, n, T, D, device="cuda", requires_grad=True) for n in (H, G, G))
    u = torch.randn(B, G, T, device="cuda", requires_grad=True)
    o = sk_flex_attention(q, k, v, u, sk_k=sk_k, sink=sink, window=window)
    go = torch.randn_like(o)
    grads = torch.autograd.grad(o, (q, k, v, u), go)
    modes = torch.full((B, G), SK, device="cuda")
    ref = kernel.reference_attention(q, k, v, modes, sink=sink, window=window, sk_scores=u, sk_k=sk_k)
    ref_grads = torch.autograd.grad(ref, (q, k, v, u), go)
    assert (o - ref).abs().max() < 1e-3 * ref.abs().max()
    for name, a, b in zip("qkvu", grads, ref_grads):
        assert (a - b).abs().max() < 2e-3 * b.abs().max(), name


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_routed_attention_with_sk_heads():
    """Inference prefill on the GPU: FA / SSA / XA and SK heads in one launch of the fused kernel."""
    from attention import routed_attention
    from router import ElasticConfig
    torch.manual_seed(0)
    B, H, G, T, D = 2, 8, 4, 2000, 64
    ec = ElasticConfig(mode_pair="FA-SK", sink=4, window=256, sk_k=64)
    q, k, v = (torch.randn(B, n, T, D, device="cuda", dtype=torch.bfloat16) for n in (H, G, G))
    u = torch.randn(B, G, T, device="cuda")
    modes = torch.tensor([[SK, FA, SSA, SK], [FA, SK, SK, 2]], device="cuda", dtype=torch.int32)
    o = routed_attention(q, k, v, modes, ec, u)
    ref = kernel.reference_attention(q, k, v, modes, sink=4, window=256, sk_scores=u, sk_k=64)
    assert ((o.float() - ref.float()).norm() / ref.float().norm()) < 1e-2


@pytest.mark.parametrize("T,sink,window,sk_k", [(700, 4, 256, 16), (389, 5, 128, 130), (1000, 130, 128, 8)])
def test_sk_flex_forward_matches_reference_on_cpu(T, sink, window, sk_k):
    """The FlexAttention path's masks and score_mod, run by eager flex_attention on the CPU (forward only: Flex has
    no CPU backward; the GPU test checks gradients): the same output as the reference."""
    import warnings
    from torch.nn.attention.flex_attention import flex_attention
    from sparsek import sk_flex_attention
    torch.manual_seed(T)
    B, H, G, D = 2, 4, 2, 16
    q, k, v = (torch.randn(B, n, T, D) for n in (H, G, G))
    u = torch.randn(B, G, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention's "not compiled" notice
        o = sk_flex_attention(q, k, v, u, sk_k=sk_k, sink=sink, window=window, _flex=flex_attention)
    ref = kernel.reference_attention(q, k, v, torch.full((B, G), SK), sink=sink, window=window, sk_scores=u, sk_k=sk_k)
    assert (o - ref).abs().max() < 1e-5


def test_sk_threshold_carries_sparsek_gradient():
    """The Flex path adds log clip(u - tau, 0, 1) with tau from sk_logp(return_tau=True): the same log p as
    SPARSEK's, and the same gradient (SPARSEK's analytic backward, via the differentiable tau)."""
    torch.manual_seed(0)
    P, k = 40, 12
    u = torch.randn(3, P, dtype=torch.float64)
    n = torch.tensor([40, 30, 9])  # pool full, partly empty, fewer candidates than k
    w = torch.randn(3, P, dtype=torch.float64)
    u1, u2 = u.clone().requires_grad_(), u.clone().requires_grad_()
    logp = sk_logp(u1, n, k)
    _, tau = sk_logp(u2, n, k, return_tau=True)
    sel = torch.isfinite(logp)
    logp2 = torch.where(sel, (u2 - tau[:, None]).clamp(SK_P_FLOOR, 1).log(), 0.0)
    torch.testing.assert_close(logp2[sel], logp[sel])
    (torch.where(sel, logp, 0.0) * w).sum().backward()
    (logp2 * w).sum().backward()
    torch.testing.assert_close(u2.grad, u1.grad)
    assert u1.grad.abs().sum() > 0


@pytest.mark.parametrize("T,sink,window,sk_k", [(389, 5, 128, 16), (700, 4, 256, 100)])
def test_sk_logp_grad_matches_autograd(T, sink, window, sk_k):
    """The training path's gradient in the scores (sparsek.SKLogpGrad: dL/dlog p on the gathered selected keys,
    then SPARSEK's backward through sk_pools' pools) equals autograd through the reference's T x T bias;
    GQA 4:2, odd T, a block with fewer candidates than k (the pools and log p are fp32, as on the GPU; the
    attention fp64). Flex has no CPU backward: o and lse come from the
    reference here, the GPU test runs the whole path."""
    from sparsek import SKLogpGrad
    torch.manual_seed(T)
    B, H, G, D = 2, 4, 2, 16
    q, k, v = (torch.randn(B, n, T, D, dtype=torch.float64) for n in (H, G, G))
    u = torch.randn(B, G, T, dtype=torch.float64)
    w = torch.randn(B, H, T, D, dtype=torch.float64)
    scale = D ** -0.5
    u_ref = u.clone().requires_grad_()
    bias = sk_bias_reference(u_ref, T, k=sk_k, sink=sink, window=window).double()
    s = torch.einsum("bhid,bhjd->bhij", q, k.repeat_interleave(H // G, 1)) * scale + bias.repeat_interleave(H // G, 1)
    o = torch.softmax(s, -1) @ v.repeat_interleave(H // G, 1)
    (o * w).sum().backward()
    u_new = u.clone().requires_grad_()
    pos, u_pool, n = sk_pools(u_new, k=sk_k, sink=sink, window=window)
    logp, _ = sk_logp(u_pool, n, sk_k, return_tau=True)
    K = min(sk_k, pos.shape[-1])
    out = SKLogpGrad.apply(o.detach(), logp[..., :K], s.detach().logsumexp(-1), q, k, v, pos[..., :K], scale)
    torch.testing.assert_close(out, o.detach())
    (out * w).sum().backward()
    assert u_ref.grad.abs().max() > 0
    assert (u_new.grad - u_ref.grad).abs().max() < 1e-5 * u_ref.grad.abs().max()
