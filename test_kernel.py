"""
Tests of kernel.py and xattn.py (the XA estimate) against their PyTorch references (docs/design.md: attention
modes, the fused kernels).

On a CPU machine the Triton kernels run in Triton's interpreter (small shapes, fp32); with CUDA they
run on the GPU (bf16 and fp16, plus larger shapes). Every run draws fresh random inputs (the seed is
printed on failure) and poisons the output with NaN first, so an unwritten element fails.

    pytest -q test_kernel.py
"""

import math
import os

import pytest
import torch

import kernel
import xattn
from attention import flex_block_mask
from kernel import FA, SK, SSA, XA, elastic_attention, reference_attention
from sparsek import sk_logp, sk_pool, sk_pools, sk_select
from xattn import xattn_block_mask

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if CUDA else [torch.float32]  # interpreter: no bf16 dots
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}
# two code paths that compute the same thing may round differently on the GPU (fused multiply-adds),
# by up to about one unit in the last place of the output dtype
SAME = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 8e-3}
gpu_only = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def rand(*shapes, dtype, scale=1.0):
    """Fresh random tensors on DEV (a new seed every call), and the seed to reproduce them."""
    seed = int.from_bytes(os.urandom(4), "little")
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*s, generator=g) * scale).to(DEV, dtype) for s in shapes], seed


def rel_err(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item(), (a - b).abs().max().item()


def assert_matches_reference(B, H, G, T, D, modes, dtype, config=None, **kw):
    (q, k, v, u), seed = rand((B, H, T, D), (B, G, T, D), (B, G, T, D), (B, G, T), dtype=dtype)
    modes = torch.tensor(modes, device=DEV)
    if bool((modes == SK).any()):  # scores on a coarse grid: many ties, which the selection breaks by position
        kw["sk_scores"] = (u.float() * 2).round() / 2
    xa_kw = dict(stride=kw.get("xa_stride", 16), threshold=kw.get("xa_threshold", 0.9))
    xa = xattn_block_mask(q, k, **xa_kw) if bool((modes == XA).any()) else None
    out = torch.full_like(q, float("nan"))  # poison
    o = elastic_attention(q, k, v, modes, out=out, has_xa=xa is not None, _config=config, **kw)  # no XA: packed
    assert o.data_ptr() == out.data_ptr()
    assert not o.isnan().any(), f"{int(o.isnan().sum())} outputs left unwritten (seed {seed})"
    ref = reference_attention(q, k, v, modes, xa_blocks=xa, **kw)
    err, max_abs = rel_err(o, ref)
    assert err < TOL[dtype], \
        f"rel err {err:.2e}, max abs err {max_abs:.2e} (seed {seed}, T={T}, modes {modes.tolist()})"
    return q, k, v, o


# -----------------------------------------------------------------------------
# the fused kernel against the reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T", [1, 127, 129, 1000, 2100])
def test_lengths_all_modes_mixed(T, dtype):
    # every mode in one batch, each batch element mixing them differently
    modes = [[FA, SSA, XA], [XA, FA, SSA]]
    assert_matches_reference(2, 3, 3, T, 64, modes, dtype, sink=64, window=300, xa_threshold=0.8)


@pytest.mark.parametrize("dtype", DTYPES if CUDA else [torch.float32, torch.float16])
@pytest.mark.parametrize("ratio", [1, 3, 4])
def test_gqa(ratio, dtype):
    assert_matches_reference(2, 2 * ratio, 2, 300, 64, [[FA, XA], [SSA, FA]], dtype, sink=16, window=100)


@pytest.mark.parametrize("ratio,heads", [(2, 2), (8, 4), (6, 2)])
def test_gqa_packed(ratio, heads):
    # no XA head: a program takes `heads` query heads of a group, their rows against each K/V tile; it computes what
    # one head a program does, in FA, SSA and SK (scores on a coarse grid, as assert_matches_reference's), odd T
    assert kernel.packed_heads(ratio, has_xa=False) == heads and kernel.packed_heads(ratio, has_xa=True) == 1
    B, G, T, D = 2, 2, 333, 32
    (q, k, v, u), seed = rand((B, G * ratio, T, D), (B, G, T, D), (B, G, T, D), (B, G, T), dtype=DTYPES[0])
    modes = torch.tensor([[FA, SSA], [SK, FA]], device=DEV)
    kw = dict(sink=5, window=128, sk_scores=(u.float() * 2).round() / 2, sk_k=40)
    packed = elastic_attention(q, k, v, modes, has_xa=False, **kw)
    one = elastic_attention(q, k, v, modes, has_xa=True, **kw)  # one head a program
    ref = reference_attention(q, k, v, modes, **kw)
    err, max_abs = rel_err(packed, ref)
    assert err < TOL[DTYPES[0]], f"rel err {err:.2e}, max abs {max_abs:.2e} (seed {seed})"
    assert (packed.float() - one.float()).abs().max() <= SAME[DTYPES[0]] * one.float().abs().max()


@pytest.mark.parametrize("sink,window", [(500, 100), (0, 10_000), (4, 1), (10**9, 10**9)])
def test_sink_and_window_larger_than_T(sink, window):
    assert_matches_reference(1, 2, 2, 200, 32, [[SSA, FA]], DTYPES[0], sink=sink, window=window)


@pytest.mark.parametrize("block_m,block_n", [(128, 32), (128, 128), (64, 64), (64, 32)])
def test_other_tile_sizes(block_m, block_n):
    cfg = dict(kernel._default_config(torch.empty(0, device=DEV)), BLOCK_M=block_m, BLOCK_N=block_n)
    (q, k, v), seed = rand((1, 4, 333, 32), (1, 2, 333, 32), (1, 2, 333, 32), dtype=DTYPES[0])
    modes = torch.tensor([[SSA, XA]], device=DEV)
    xa = xattn_block_mask(q, k, threshold=0.7)
    o = elastic_attention(q, k, v, modes, sink=40, window=150, xa_threshold=0.7, _config=cfg)
    ref = reference_attention(q, k, v, modes, sink=40, window=150, xa_blocks=xa)
    err, max_abs = rel_err(o, ref)
    assert err < TOL[DTYPES[0]], f"rel err {err:.2e}, max abs {max_abs:.2e} (seed {seed})"


def test_head_dim_128_and_sm_scale():
    assert_matches_reference(1, 2, 1, 200, 128, [[SSA]], DTYPES[0], sink=8, window=64, sm_scale=0.05)


def test_strided_views():
    # q, k, v as [B, T, H, D] projections viewed as [B, H, T, D]: read in place, no copy needed
    B, H, G, T, D = 1, 4, 2, 300, 32
    (qt, kt, vt), seed = rand((B, T, H, D), (B, T, G, D), (B, T, G, D), dtype=DTYPES[0])
    q, k, v = qt.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2)
    modes = torch.tensor([[FA, SSA]], device=DEV)
    o = elastic_attention(q, k, v, modes, sink=8, window=100)
    ref = reference_attention(q, k, v, modes, sink=8, window=100)
    err, max_abs = rel_err(o, ref)
    assert err < TOL[DTYPES[0]], f"rel err {err:.2e}, max abs {max_abs:.2e} (seed {seed})"
    # the output comes token-major, as q: [B, T, H * D] for the output projection without a copy
    assert o.transpose(1, 2).is_contiguous()
    assert elastic_attention(q.contiguous(), k, v, modes, sink=8, window=100).is_contiguous()


# -----------------------------------------------------------------------------
# SK heads: the selection (sk_select) equals the reference's pools, the kernel equals the reference

@pytest.mark.parametrize("T,sk_k,sink,window,rising", [(1000, 16, 5, 256, False), (777, 300, 0, 200, False),
                                                       (300, 400, 4, 128, False), (2900, 64, 128, 1024, False),
                                                       (2500, 700, 3, 300, False), (3000, 50, 10, 256, True),
                                                       (129, 8, 0, 1, False), (5, 2, 0, 128, False)])
def test_sk_select_matches_reference_pools(T, sk_k, sink, window, rising):
    # odd lengths, k beyond the candidates (p = 1) and beyond T, sink 0, windows off the 128 grid, several tiles of
    # the sorted list (T > 1024); scores with many ties, and -0.0 beside 0.0 (equal: the earlier key wins); rising:
    # later keys score higher, so the blocks skip whole tiles of keys they cannot see yet
    (u,), seed = rand((1, 2, T), dtype=torch.float32)
    u = (u * 2).round() / 2
    u[0, 0, :T // 2:2] = -0.0
    if rising:
        u = u + torch.arange(T, device=DEV) / 64
    nb = math.ceil(T / 128)
    pos, u_pool, n = sk_pool(u, torch.arange(nb, device=DEV), k=sk_k, sink=sink, window=window)
    logp = sk_logp(u_pool, n, sk_k)
    idx, sel_logp = sk_select(u, k=sk_k, sink=sink, window=window)
    K = min(sk_k, T)
    assert idx.shape == sel_logp.shape == (1, 2, nb, K) and idx.dtype == torch.int32
    assert torch.equal(idx.long(), pos[..., :K]), f"selections differ (seed {seed})"
    assert torch.equal(sel_logp.isinf(), logp[..., :K].isinf()), f"selections differ (seed {seed})"
    fin = sel_logp.isfinite()
    torch.testing.assert_close(sel_logp[fin].exp(), logp[..., :K][fin].exp(), rtol=0, atol=1e-5,
                               msg=f"p differs (seed {seed})")


@pytest.mark.parametrize("T,sk_k,sink,window", [(10007, 64, 128, 1024), (9000, 700, 3, 300), (129, 8, 0, 1)])
def test_sk_pools_match_reference_pools(T, sk_k, sink, window):
    # the training path's pools (PyTorch, chunks of 32 blocks and more) equal the reference's, with ties
    (u,), seed = rand((2, 3, T), dtype=torch.float32)
    u = (u * 2).round() / 2
    u[0, 0, :T // 2:2] = -0.0
    pos, u_pool, n = sk_pool(u, torch.arange(math.ceil(T / 128), device=DEV), k=sk_k, sink=sink, window=window)
    pos2, u_pool2, n2 = sk_pools(u, k=sk_k, sink=sink, window=window)
    assert torch.equal(pos2, pos) and torch.equal(n2, n), f"seed {seed}"
    assert torch.equal(u_pool2[pos >= 0], u_pool[pos >= 0]), f"seed {seed}"


@pytest.mark.parametrize("dtype", DTYPES if CUDA else [torch.float32, torch.float16])
def test_sk_alone(dtype):
    # sink 5, window 128: blocks with fewer candidates than k and blocks with more than 2k
    assert_matches_reference(1, 2, 1, 389, 32, [[SK]], dtype, sink=5, window=128, sk_k=40)


@pytest.mark.parametrize("T,sink,window,sk_k", [(333, 7, 200, 30), (300, 0, 128, 500), (333, 3, 100, 80)])
def test_sk_mixed_with_every_mode_gqa(T, sink, window, sk_k):
    # SK beside FA, SSA and XA in one launch, GQA 2:1, odd T; a window off the 128 grid (the local span starts
    # mid-tile), sk_k above every block's candidates with sink 0 (whole tiles of selected keys, unmasked), and a
    # window under 128 (selected keys can lie past a query: every tile masked)
    assert_matches_reference(2, 6, 3, T, 32, [[FA, SK, SSA], [SK, XA, SK]], DTYPES[0], sink=sink, window=window,
                             sk_k=sk_k, xa_threshold=0.8)


@pytest.mark.parametrize("sink,window", [(300, 128), (40, 5000)])
def test_sk_sink_over_the_local_span_and_window_past_T(sink, window):
    # sink 300 > c: sink and local span overlap (no key counted twice); window > T: no candidates at all
    assert_matches_reference(1, 2, 2, 333, 32, [[SK, SSA]], DTYPES[0], sink=sink, window=window, sk_k=30)


@pytest.mark.parametrize("block_m,block_n", [(64, 32), (128, 128)])
def test_sk_other_tile_sizes(block_m, block_n):
    cfg = dict(kernel._default_config(torch.empty(0, device=DEV)), BLOCK_M=block_m, BLOCK_N=block_n)
    assert_matches_reference(1, 4, 2, 333, 32, [[SK, SSA]], DTYPES[0], sink=40, window=150, sk_k=20, config=cfg)


def test_sk_schedule_counts_selected_tiles():
    # an SK program's cost: its sink and local-span tiles plus ceil(min(k, n_m) / BLOCK_N) gathered tiles
    B, H, G, T, sink, window, sk_k, BM, BN = 1, 2, 1, 1000, 70, 256, 100, 128, 32
    modes = torch.tensor([[SK]], device=DEV, dtype=torch.int32)
    count = torch.ones(B, H, math.ceil(T / 128), dtype=torch.int32, device=DEV)
    _, cost = kernel._schedule(modes, count, B, H, T, sink, window, BM, BN, sk_k)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    c = (i // 128 + 1) * 128 - window
    local = (j <= i) & ((j < sink) | (j >= c))
    nbq, nbk = math.ceil(T / BM), math.ceil(T / BN)
    tiles = torch.nn.functional.pad(local, (0, nbk * BN - T, 0, nbq * BM - T)).view(nbq, BM, nbk, BN).any(1).any(-1)
    n = ((torch.arange(nbq) + 1) * 128 - window).clamp(max=T) - sink
    expected = tiles.sum(-1) + (n.clamp(0, sk_k) + BN - 1) // BN
    assert cost.view(B, H, nbq)[0, 0].cpu().equal(expected.to(cost.dtype))


def test_sk_precomputed_selection_and_nan_scores():
    (q, k, v, u), seed = rand((1, 2, 300, 32), (1, 1, 300, 32), (1, 1, 300, 32), (1, 1, 300), dtype=DTYPES[0])
    u, modes = u.float(), torch.tensor([[SK]], device=DEV)
    sel = sk_select(u, k=20, sink=4, window=128)
    o1 = elastic_attention(q, k, v, modes, sink=4, window=128, sk_selection=sel)
    o2 = elastic_attention(q, k, v, modes, sink=4, window=128, sk_scores=u, sk_k=20)
    assert torch.equal(o1, o2), f"seed {seed}"
    if not CUDA:  # the NaN check reads the scores back: CPU only
        u[0, 0, 9] = float("nan")
        with pytest.raises(ValueError, match="SK scores contain NaN"):
            elastic_attention(q, k, v, modes, sink=4, window=128, sk_scores=u, sk_k=20)


# -----------------------------------------------------------------------------
# modes that must reduce to full attention

def test_ssa_with_window_ge_T_equals_fa():
    (q, k, v), seed = rand((1, 4, 700, 64), (1, 2, 700, 64), (1, 2, 700, 64), dtype=DTYPES[0])
    o_ssa = elastic_attention(q, k, v, torch.tensor([[SSA, SSA]], device=DEV), sink=3, window=700)
    o_fa = elastic_attention(q, k, v, torch.tensor([[FA, FA]], device=DEV))
    err, max_abs = rel_err(o_ssa, o_fa)
    assert err <= SAME[DTYPES[0]], f"rel err {err:.2e}, max abs {max_abs:.2e} (seed {seed})"


def test_xa_threshold_one_equals_fa():
    (q, k, v), seed = rand((1, 4, 700, 64), (1, 2, 700, 64), (1, 2, 700, 64), dtype=DTYPES[0])
    mask = xattn_block_mask(q, k, threshold=1.0)
    assert bool(mask.equal(torch.ones_like(mask).tril())), "threshold 1.0 must keep every causal block"
    o_xa = elastic_attention(q, k, v, torch.tensor([[XA, XA]], device=DEV), xa_threshold=1.0)
    o_fa = elastic_attention(q, k, v, torch.tensor([[FA, FA]], device=DEV))
    err, max_abs = rel_err(o_xa, o_fa)
    assert err <= SAME[DTYPES[0]], f"rel err {err:.2e}, max abs {max_abs:.2e} (seed {seed})"


# -----------------------------------------------------------------------------
# the XA estimate (xattn.py)

@pytest.mark.parametrize("T,stride,threshold", [(1, 16, 0.9), (40, 16, 0.9), (1000, 16, 0.9),
                                                (1000, 16, 0.3), (700, 8, 0.6), (555, 32, 0.5)])
def test_xa_selection_matches_reference(T, stride, threshold):
    # Triton and the reference sum the cell scores in different orders, so a block right on the
    # threshold could flip. So: block scores equal within rounding, and the Triton selection equal,
    # exactly, to the reference rule applied to the scores the kernel used.
    (q, k), seed = rand((2, 3, T, 64), (2, 1, T, 64), dtype=DTYPES[0])
    mask, scores = xattn_block_mask(q, k, stride=stride, threshold=threshold, return_scores=True)
    ref_scores = xattn.xattn_block_scores_reference(q, k, stride=stride)
    err = (scores - ref_scores).abs().max().item()
    assert err < 1e-4 * (128 // stride), f"block scores differ by {err:.2e} (seed {seed})"
    ref_mask = xattn.xattn_select_reference(scores, threshold)
    assert mask.equal(ref_mask), f"{int((mask != ref_mask).sum())} blocks differ (seed {seed})"
    # the row masses: every causal cell row of a block row adds 1
    nb, nc = scores.shape[-1], math.ceil(T / stride)
    rows = torch.tensor([min(128 // stride, nc - m * (128 // stride)) for m in range(nb)], device=DEV)
    assert torch.allclose(scores.sum(-1), rows.float().expand_as(scores.sum(-1)), atol=1e-3)


def test_xa_selection_clear_margins():
    # Planted structure: every 128-token block gets a topic; queries and keys of a block point along
    # their topic's axis, with a large norm. A block row's mass then sits on the blocks of its own
    # topic, so the selection is known in advance: the sink, the diagonal and the same-topic blocks.
    T, D, nb = 1024, 64, 8
    topics = torch.tensor([0, 1, 2, 1, 0, 3, 1, 2])
    x = torch.zeros(nb, 128, D)
    x[torch.arange(nb), :, topics] = 12.0  # same-topic cells score ~18 above the rest: e^18 >> 56 cells
    x = (x + 0.1 * torch.randn(nb, 128, D)).reshape(1, 1, T, D).to(DEV, DTYPES[0])
    mask = xattn_block_mask(x, x, threshold=0.9)
    ref = xattn.xattn_block_mask_reference(x, x, threshold=0.9)
    m, n = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    expected = (n <= m) & ((n == 0) | (n == m) | (topics[n] == topics[m]))
    assert mask[0, 0].cpu().equal(expected), f"kernel kept\n{mask[0, 0].int()}\nexpected\n{expected.int()}"
    assert ref[0, 0].cpu().equal(expected), "the reference disagrees with the planted selection"


def test_xa_right_padded_rows_equal_rows_alone():
    """Rows of several lengths right-padded to T (lengths): XA's estimate of a block pools its queries, so a row's
    padded queries must not count. Planted: keys of block j point along axis j; row 1 (300 tokens) has its own
    queries of block 2 along axis 2 (that block row keeps blocks 0 and 2 alone), its padding along axis 1 (which,
    counted, adds block 1). With lengths the selection and the outputs equal the row's alone; without, the selection
    differs."""
    T, n, D = 512, 300, 64
    g = torch.Generator().manual_seed(0)
    axis = torch.arange(T) // 128                                  # each position's block
    k = torch.zeros(2, 1, T, D)
    k[:, 0, torch.arange(T), axis] = 12.0
    q = k.clone()[:, 0].repeat(2, 1, 1, 1).transpose(0, 1).contiguous()  # [2, 2, T, D]: each query along its block
    q[1, :, n:] = 0.0
    q[1, :, n:, 1] = 12.0                                          # row 1's padding points at block 1
    q, k = ((x + 0.1 * torch.randn(x.shape, generator=g)).to(DEV, DTYPES[0]) for x in (q, k))
    v = torch.randn(k.shape, generator=g).to(DEV, DTYPES[0])
    modes = torch.full((2, 1), XA, dtype=torch.int32, device=DEV)
    lens = torch.tensor([T, n], device=DEV)
    cfg = kernel._default_config(q)

    def mask(q_, k_, lens_=None):
        return xattn.xattn_estimate(q_, k_, modes[:len(q_)], 16, 0.9, cfg, lens_, xa=XA)[1]

    alone = mask(q[1:, :, :n], k[1:, :, :n])[0]                    # [H, 3, 3]
    assert alone[:, 2].tolist() == [[True, False, True]] * 2        # the planted selection
    assert mask(q, k, lens.int())[1, :, :3, :3].equal(alone)
    assert not mask(q, k)[1, :, :3, :3].equal(alone)               # the padding, counted, changes it
    o = elastic_attention(q, k, v, modes, lengths=lens)
    o1 = elastic_attention(q[1:, :, :n], k[1:, :, :n], v[1:, :, :n], modes[1:])
    err, max_abs = rel_err(o[1, :, :n], o1[0])
    assert err <= SAME[DTYPES[0]], f"rel err {err:.2e}, max abs {max_abs:.2e}"
    ref = reference_attention(q, k, v, modes, lengths=lens)
    ref1 = reference_attention(q[1:, :, :n], k[1:, :, :n], v[1:, :, :n], modes[1:])
    assert rel_err(ref[1, :, :n], ref1[0])[0] <= SAME[DTYPES[0]]
    assert rel_err(o[:, :, :n], ref[:, :, :n])[0] < TOL[DTYPES[0]]


# -----------------------------------------------------------------------------
# schedule: work per program is the tiles it visits, heaviest first

@pytest.mark.parametrize("BM,BN", [(128, 64), (64, 64), (128, 128)])
def test_schedule_costs_are_tiles_visited_heaviest_first(BM, BN):
    B, H, G, T, D = 2, 4, 2, 1000, 32
    sink, window = 70, 300
    (q, k), seed = rand((B, H, T, D), (B, G, T, D), dtype=DTYPES[0])
    modes = torch.tensor([[FA, SSA], [XA, SSA]], device=DEV, dtype=torch.int32)
    xa = xattn_block_mask(q, k)
    _, _, count, _ = xattn.xattn_estimate(q, k, modes, 16, 0.9, kernel._default_config(q), xa=XA)
    order, cost = kernel._schedule(modes, count, B, H, T, sink, window, BM, BN)
    assert sorted(order.tolist()) == list(range(B * H * math.ceil(T / BM)))
    assert (cost[order][1:] <= cost[order][:-1]).all(), "the work list must be sorted heaviest first"
    # independent count: the BN-wide key tiles that hold at least one visible (query, key) pair
    mask = kernel.attention_mask_reference(modes, H, T, sink=sink, window=window, xa_blocks=xa)
    nbq, nbk = math.ceil(T / BM), math.ceil(T / BN)
    pad = torch.nn.functional.pad(mask, (0, nbk * BN - T, 0, nbq * BM - T))
    visible_tiles = pad.view(B, H, nbq, BM, nbk, BN).any(3).any(-1).sum(-1)
    assert cost.view(B, H, nbq).equal(visible_tiles.to(cost.dtype)), "costs must equal the tiles with work"


# -----------------------------------------------------------------------------
# FlexAttention equivalents

@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("T", [512, 300])
def test_flex_block_mask(T):
    from torch.nn.attention.flex_attention import flex_attention

    B, H, G, D, sink, window = 2, 4, 2, 32, 100, 200
    (q, k, v), seed = rand((B, H, T, D), (B, G, T, D), (B, G, T, D), dtype=torch.float32)
    modes = torch.tensor([[FA, SSA], [XA, SSA]], device=DEV)
    xa = xattn_block_mask(q, k, threshold=0.6)
    bm = flex_block_mask(modes, H, T, sink=sink, window=window, xa_blocks=xa)
    # block structure: kept blocks = blocks with a visible pair; full blocks have only visible pairs
    mask = kernel.attention_mask_reference(modes, H, T, sink=sink, window=window, xa_blocks=xa)
    nb = math.ceil(T / 128)
    pad = torch.nn.functional.pad(mask, (0, nb * 128 - T, 0, nb * 128 - T)).view(B, H, nb, 128, nb, 128)
    kept = bm.to_dense().bool()
    if T % 128 == 0:
        assert kept.equal(pad.any(3).any(-1))
    else:
        assert (kept | ~pad.any(3).any(-1)).all(), "a block with visible pairs was dropped"
    full = torch.zeros_like(kept)
    for b in range(B):
        for h in range(H):
            for m in range(nb):
                idx = bm.full_kv_indices[b, h, m, : bm.full_kv_num_blocks[b, h, m]]
                full[b, h, m, idx.long()] = True
    assert (~full | pad.all(3).all(-1)).all(), "a block marked full has masked pairs"
    o = flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    ref = reference_attention(q, k, v, modes, sink=sink, window=window, xa_blocks=xa)
    err, max_abs = rel_err(o, ref)
    assert err < 1e-4, f"rel err {err:.2e} (seed {seed})"


# -----------------------------------------------------------------------------
# the reference itself

def test_reference_is_differentiable():
    (q, k, v), seed = rand((1, 4, 150, 16), (1, 2, 150, 16), (1, 2, 150, 16), dtype=torch.float32)
    for x in (q, k, v):
        x.requires_grad_(True)
    o = reference_attention(q, k, v, torch.tensor([[SSA, XA]]), sink=4, window=30)
    o.square().sum().backward()
    for name, x in zip("qkv", (q, k, v)):
        assert x.grad is not None and x.grad.isfinite().all() and x.grad.abs().sum() > 0, name


def test_reference_modes_by_definition():
    # the reference's SSA mask, checked pair by pair against the rule's sentence in docs/design.md
    T, sink, window = 40, 3, 7
    mask = kernel.attention_mask_reference(torch.tensor([[SSA]]), 1, T, sink=sink, window=window)[0, 0]
    for i in range(T):
        for j in range(T):
            assert bool(mask[i, j]) == (j <= i and (j < sink or i - j < window)), (i, j)


# -----------------------------------------------------------------------------
# errors a user can make

def test_errors():
    dt = DTYPES[0]
    q = torch.randn(1, 4, 64, 32, device=DEV, dtype=dt)
    k = torch.randn(1, 2, 64, 32, device=DEV, dtype=dt)
    ok = torch.tensor([[FA, SSA]], device=DEV)
    cases = [
        (dict(q=q[0]), "must be \\[B, H, T, D\\]"),
        (dict(k=torch.randn(1, 3, 64, 32, device=DEV, dtype=dt)), "multiple of the KV heads"),
        (dict(k=torch.randn(1, 2, 65, 32, device=DEV, dtype=dt)), "to match q"),
        (dict(k=k.to(torch.float64)), "dtype"),
        (dict(q=q.double(), k=k.double()), "not supported"),
        (dict(q=torch.randn(1, 4, 64, 48, device=DEV, dtype=dt), k=torch.randn(1, 2, 64, 48, device=DEV, dtype=dt)),
         "head dim"),
        (dict(modes=torch.tensor([[FA, 4]], device=DEV)), "FA=0, SSA=1, XA=2 or SK=3; got \\[4\\]"),
        (dict(modes=torch.tensor([[FA, SK]], device=DEV)), "SK heads: pass their scores as sk_scores"),
        (dict(sk_scores=torch.zeros(1, 2, 64, device=DEV), sk_k=0), "sk_k=0 .* pass sk_k >= 1"),
        (dict(sk_scores=torch.zeros(1, 2, 63, device=DEV)), "sk_scores must be \\[B, G, T=64\\]"),
        (dict(sk_scores=torch.zeros(1, 3, 64, device=DEV)), "sk_scores must be \\[B, G, T=64\\]"),
        (dict(sk_selection=(torch.zeros(1, 2, 1, 8, device=DEV), torch.zeros(1, 2, 1, 8, device=DEV))),
         "sk_selection must be sk_select's"),
        (dict(modes=torch.tensor([[FA, -1]], device=DEV)), "got \\[-1\\]"),
        (dict(modes=torch.tensor([FA, SSA], device=DEV)), "shape \\[B=1, G=2\\]"),
        (dict(modes=torch.tensor([[0.0, 1.0]], device=DEV)), "integer tensor"),
        (dict(q=torch.randn(1, 4, 32, 64, device=DEV, dtype=dt).transpose(2, 3)), "contiguous in its last dim"),
        (dict(window=0), "window >= 1"),
        (dict(sink=-1), "sink >= 0"),
        (dict(xa_stride=12), "xa_stride"),
        (dict(xa_threshold=-0.1), "xa_threshold"),
        (dict(out=torch.empty(1, 4, 64, 16, device=DEV, dtype=dt)), "out must be"),
        (dict(modes=torch.tensor([[FA, XA]], device=DEV), has_xa=False), "XA heads but has_xa=False"),
        (dict(_config=dict(kernel._default_config(q), HEADS=4)), "HEADS=4 must be a power of two dividing"),
        (dict(modes=torch.tensor([[FA, XA]], device=DEV), _config=dict(kernel._default_config(q, 2), HEADS=2)),
         "and 1 where a head may run XA"),
    ]
    for change, message in cases:
        args = dict(q=q, k=k, modes=ok)
        args.update({key: val for key, val in change.items() if key in ("q", "k", "modes")})
        kw = {key: val for key, val in change.items() if key not in ("q", "k", "modes")}
        v = args["k"]
        with pytest.raises((ValueError, TypeError), match=message):
            elastic_attention(args["q"], args["k"], v, args["modes"], **kw)
    with pytest.raises(ValueError, match="v must match k"):
        elastic_attention(q, k, k[:, :, :10], ok)


# -----------------------------------------------------------------------------
# GPU only: bf16 at larger shapes, the method's defaults (sink 128, window 2048)

@gpu_only
@pytest.mark.parametrize("T", [4096, 8192 + 77])
@pytest.mark.parametrize("D", [64, 128])
def test_gpu_large(T, D):
    assert_matches_reference(1, 8, 4, T, D, [[FA, SSA, XA, SSA]], torch.bfloat16)


@gpu_only
@pytest.mark.parametrize("T", [4096, 8192 + 77])
def test_gpu_large_gqa_packed(T):  # no XA: 4, then 2 query heads a program (the model's FA-SSA prefill)
    assert_matches_reference(1, 16, 4, T, 128, [[FA, SSA, SSA, FA]], torch.bfloat16)
    assert_matches_reference(1, 16, 8, T, 128, [[FA, SSA, SSA, FA, FA, FA, SSA, SSA]], torch.bfloat16)


@gpu_only
@pytest.mark.parametrize("T,sk_k", [(5000 + 77, 256), (4096, 1024)])
def test_gpu_sk_large(T, sk_k):
    # the method's sink 128 and window 2048, bf16, SK beside the other modes; the rule is the reference's
    assert_matches_reference(1, 8, 4, T, 128, [[SK, SSA, XA, SK]], torch.bfloat16, sk_k=sk_k)


@gpu_only
@pytest.mark.parametrize("T,sk_k", [(20000 + 3, 1024), (9000, 128)])
def test_gpu_sk_select_large(T, sk_k):
    # the selection's kernels on the GPU against the reference's sort, many tiles of the sorted list
    (u,), seed = rand((1, 8, T), dtype=torch.float32)
    u = (u * 8).round() / 8
    nb = math.ceil(T / 128)
    pos, u_pool, n = sk_pool(u, torch.arange(nb, device=DEV), k=sk_k, sink=128, window=2048)
    idx, logp = sk_select(u, k=sk_k, sink=128, window=2048)
    assert torch.equal(idx.long(), pos[..., :sk_k]), f"seed {seed}"
    ref = sk_logp(u_pool, n, sk_k)[..., :sk_k]
    assert torch.equal(logp.isinf(), ref.isinf()) and (logp - ref)[ref.isfinite()].abs().max() < 1e-5, f"seed {seed}"


@gpu_only
def test_gpu_sk_matches_flex_at_16k():
    # at 16K the reference's T x T is too big: the kernel against sk_flex_attention (FlexAttention), all heads SK
    from sparsek import sk_flex_attention
    T = 16384 + 100
    (q, k, v, u), seed = rand((1, 8, T, 128), (1, 2, T, 128), (1, 2, T, 128), (1, 2, T), dtype=torch.bfloat16)
    u = u.float()
    o = elastic_attention(q, k, v, torch.full((1, 2), SK, device=DEV), sk_scores=u, sk_k=512)
    ref = sk_flex_attention(q, k, v, u, sk_k=512, sink=128, window=2048)
    err, max_abs = rel_err(o, ref)
    assert err < 1e-2, f"rel err {err:.2e}, max abs {max_abs:.2e} (seed {seed})"


@gpu_only
def test_gpu_xa_selection_large():
    (q, k), seed = rand((1, 4, 8192, 128), (1, 2, 8192, 128), dtype=torch.bfloat16)
    mask, scores = xattn_block_mask(q, k, threshold=0.5, return_scores=True)
    ref_scores = xattn.xattn_block_scores_reference(q, k)
    assert (scores - ref_scores).abs().max() < 1e-3, f"seed {seed}"
    assert mask.equal(xattn.xattn_select_reference(scores, 0.5)), f"seed {seed}"


# -----------------------------------------------------------------------------
# the decode kernel (decode_kernel.py) against its reference: every mode is a segment of `cap` slots

def assert_decode_matches_reference(B, H, G, D, caps, positions, dtype, sink, window, split, extras=None,
                                    listed=True):
    """A decode step of B rows over segments of the given caps (FA: prompt + new; SSA: sink + window), at the
    given positions; compares output and written caches with the reference. extras: SK segments' selected slots
    after their rings (a random log p bias each, some slots empty: -inf). listed: the programs from the work list
    (decode_work, as KVCache runs them), else every chunk of every segment."""
    from decode_kernel import decode_attention, decode_attention_reference, decode_splits, decode_work
    caps_t = torch.tensor(caps, dtype=torch.int32, device=DEV)
    sizes = [c + e for c, e in zip(caps, extras or [0] * len(caps))]
    starts = torch.tensor(sizes, device=DEV).cumsum(0)[:-1].int()
    base = torch.cat([torch.zeros(1, dtype=torch.int32, device=DEV), starts])
    N = sum(sizes)
    (q, k_new, v_new, kc, vc), seed = rand((B, H, D), (B, G, D), (B, G, D), (N, D), (N, D), dtype=dtype)
    pos = torch.tensor(positions, dtype=torch.int32, device=DEV)
    sk = {}
    if extras is not None:
        g = torch.Generator().manual_seed(seed)
        bias = (-3 * torch.rand(N, generator=g)).to(DEV)
        bias[torch.rand(N, generator=g).to(DEV) < 0.2] = float("-inf")  # empty selected slots
        sk = dict(selected=torch.tensor(extras, dtype=torch.int32, device=DEV), logp=bias)
    kc2, vc2 = kc.clone(), vc.clone()
    ref = decode_attention_reference(q, k_new, v_new, kc, vc, base, caps_t, pos, sink=sink, window=window, **sk)
    out = torch.full_like(q, float("nan"))  # poison
    n_splits = decode_splits(max(sizes), split)
    work = torch.tensor(decode_work(sizes, n_splits, split), dtype=torch.int32, device=DEV) if listed else None
    o = decode_attention(q, k_new, v_new, kc2, vc2, base, caps_t, pos, sink=sink, window=window,
                         n_splits=n_splits, split=split, out=out, work=work, **sk)
    assert not o.isnan().any(), f"{int(o.isnan().sum())} outputs unwritten (seed {seed})"
    err, max_abs = rel_err(o, ref)
    assert err < TOL[dtype], f"rel err {err:.2e}, max abs {max_abs:.2e} (seed {seed}, caps {caps}, pos {positions})"
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2), f"the cache writes differ (seed {seed})"


DECODE_DTYPES = DTYPES if CUDA else [torch.float32, torch.float16]  # the interpreter is right on fp16 dots


@pytest.mark.parametrize("dtype", DECODE_DTYPES)
@pytest.mark.parametrize("group", [1, 3, 4])
def test_decode_every_mode_gqa(group, dtype):
    # row 0 (prompt + new = 100): an FA segment and an SSA ring (sink 4 + window 16) that has wrapped; row 1
    # (prompt + new = 9, shorter than sink + window): an XA head (decodes like FA) and an SSA segment of 9 slots
    sink, window = 4, 16
    caps = [100, 20, 9, 9]
    assert_decode_matches_reference(2, 2 * group, 2, 32, caps, [93, 7], dtype, sink, window, split=32)
    assert_decode_matches_reference(2, 2 * group, 2, 32, caps, [19, 0], dtype, sink, window, split=32)


@pytest.mark.parametrize("dtype", DECODE_DTYPES)
def test_decode_splits_and_odd_lengths(dtype):
    # one chunk, a position on a chunk's edge, an odd one, and the first decode step after a 1-token prompt;
    # every chunk of every segment, and the work list
    for pos in (0, 1, 63, 64, 127, 200):
        assert_decode_matches_reference(1, 4, 2, 64, [201, 201], [pos], dtype, 8, 32, split=64, listed=False)
    assert_decode_matches_reference(1, 4, 2, 64, [201, 20], [130], dtype, 4, 16, split=64, listed=False)
    assert_decode_matches_reference(1, 4, 2, 64, [201, 20], [130], dtype, 4, 16, split=64)


@pytest.mark.parametrize("dtype", DECODE_DTYPES)
def test_decode_one_chunk_writes_the_output_itself(dtype):
    # every segment (FA 40 slots, an SSA ring of 4 + 16 that has wrapped) fits one chunk of 64: no merge launch
    for pos in (0, 25, 39):
        assert_decode_matches_reference(1, 6, 2, 32, [40, 20], [pos], dtype, 4, 16, split=64)
    assert_decode_matches_reference(2, 6, 2, 32, [40, 20, 9, 9], [39, 8], dtype, 4, 16, split=64)


@pytest.mark.parametrize("dtype", DECODE_DTYPES)
def test_decode_sk_segments(dtype):
    # SK heads (sink 4, window 128, 8 selected slots after the ring) beside an FA and an SSA segment: a ring that
    # has wrapped (pos 300, 455) and one that has not (pos 100); the local span starts mid-ring
    sink, window = 4, 128
    caps, extras = [460, 132, 132, 132], [0, 0, 8, 8]
    for pos in (300, 455, 100):
        assert_decode_matches_reference(1, 4, 4, 32, caps, [pos], dtype, sink, window, split=64, extras=extras)


def test_decode_on_concatenated_caches(monkeypatch):
    # the kernel on the tables of two prefilled caches joined by KVCache.cat (rows of 2 and 1: the chunks planned
    # anew), FA segments, SSA and SK rings that have wrapped (sink 4, window 128) and short
    # ones, against the reference on the same tables
    import attention
    from decode_kernel import decode_attention, decode_attention_reference
    monkeypatch.setattr(attention, "decode_split", lambda sizes, programs: 16)
    G, D, new, dtype = 3, 32, 6, DTYPES[0]  # on the GPU bf16 (fp32 dots there run in tf32)
    caches = []
    for T, modes in ((300, [[FA, SSA, SK], [SSA, SK, FA]]), (30, [[SSA, FA, SSA]])):
        B = len(modes)
        (k, v, u), seed = rand((B, G, T, D), (B, G, T, D), (B, G, T), dtype=dtype)
        cache = attention.KVCache(new, sink=4, window=128, sk_k=8)
        cache.prefill(k, v, torch.tensor(modes, device=DEV), sk_scores=u.float())  # scores in fp32
        caches.append(cache)
    c = attention.KVCache.cat(caches)
    assert c.split == 16 and c.n_splits == 20 and len(set(c.work.tolist())) == c.work.numel()
    (q, k_new, v_new), seed = rand((3, 2 * G, D), (3, G, D), (3, G, D), dtype=dtype)
    pos = torch.tensor([303, 300, 33], dtype=torch.int32, device=DEV)
    kc, vc = c.k.clone(), c.v.clone()
    ref = decode_attention_reference(q, k_new, v_new, kc, vc, c.base, c.cap, pos, sink=4, window=128,
                                     selected=c.selected, logp=c.sk.logp)
    o = decode_attention(q, k_new, v_new, c.k, c.v, c.base, c.cap, pos, sink=4, window=128, n_splits=c.n_splits,
                         split=16, selected=c.selected, logp=c.sk.logp, work=c.work,
                         out=torch.full_like(q, float("nan")))  # poison: a program that did not run shows
    err, max_abs = rel_err(o, ref)
    assert err < TOL[dtype], f"rel err {err:.2e} (seed {seed})"
    assert torch.equal(kc, c.k) and torch.equal(vc, c.v)


@gpu_only
def test_gpu_decode_sk_large():
    caps, extras = [4100] * 4 + [128 + 2048] * 4, [0] * 4 + [256] * 4
    for pos in (4096, 4097, 4095 + 64):
        assert_decode_matches_reference(1, 32, 8, 128, caps, [pos], torch.bfloat16, 128, 2048, split=512,
                                        extras=extras)


@gpu_only
@pytest.mark.parametrize("T", [32768 + 5, 1000])
def test_gpu_decode_large(T):
    # the method's shape: 32 query / 8 KV heads, D 128, bf16; 5 FA heads, 3 SSA rings (128 + 2048) wrapped
    caps = [T + 8] * 5 + [128 + 2048] * 3
    assert_decode_matches_reference(1, 32, 8, 128, caps, [T + 3], torch.bfloat16, 128, 2048, split=512)
    assert_decode_matches_reference(2, 32, 8, 128, caps * 2, [T + 3, T - 1], torch.bfloat16, 128, 2048, split=512)


# -----------------------------------------------------------------------------
# every kernel variant compiles for a Hopper GPU, on any machine: Triton's interpreter runs code that the compiler
# refuses (a loop-carried variable whose shape changes, say), so the kernels are also compiled for sm_90 here, in a
# process without the interpreter, down to the GPU's binary (Triton's own ptxas). Pointers and strides are marked
# multiples of 16, as Triton's launcher marks them on a GPU: without, loads are not vectorised nor pipelined, and the
# code compiled would not be the code the GPU runs

_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import decode_kernel, kernel

def build(fn, types, const, **options):
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    aligned = [i for i, n in enumerate(fn.arg_names) if sig[n].startswith("*") or n.startswith("stride")]
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in const.items()},
                    attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)

bf16 = "*bf16"
i32 = "*i32"
f32 = "*fp32"
dec = dict(Q=bf16, KNew=bf16, VNew=bf16, KC=bf16, VC=bf16, Base=i32, Cap=i32, Pos=i32, Selected=i32, Logp=f32,
           Work=i32, MOut=f32, LOut=f32, AccOut=f32, O=bf16, qk_scale="fp32")
for direct in (True, False):
    build(decode_kernel._decode_split_kernel, dec, dict(D=128, GROUP_P2=16, BLOCK_N=64, DIRECT=direct,
          LISTED=True), num_warps=4, num_stages=3)
build(decode_kernel._decode_merge_kernel, dict(MOut=f32, LOut=f32, AccOut=f32, O=bf16, Cap=i32, Pos=i32, Selected=i32),
      dict(D=128, BLOCK_D=32, GROUP_P2=16, S_P2=128, BLOCK_S=64), num_warps=4)
pre = dict(Q=bf16, K=bf16, V=bf16, O=bf16, Modes=i32, Order="*i64", Count=i32, Index=i32, SkIdx=i32, SkLogp=f32,
           qk_scale="fp32")
for heads, tile, xa, sk in ((4, 64, False, False), (4, 64, False, True), (1, 128, True, True)):  # _default_config's
    build(kernel._elastic_attn_fwd, pre, dict(D=128, BLOCK_M=tile, BLOCK_N=tile, HEADS=heads, HAS_XA=xa, HAS_SK=sk,
                                              SPLIT=kernel.splits_rows(heads, tile, 8)), num_warps=8, num_stages=3)
print("compiled")
"""


def test_kernels_compile_for_hopper():
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE], cwd=os.path.dirname(os.path.abspath(__file__)), env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
