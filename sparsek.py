"""
SparseK attention (Lou et al., *Sparser is Faster and Less is More: Efficient Sparse Attention for Long-Range
Transformers*, arXiv 2406.16747) as a fourth mode of Elastic Attention ("SK", ours): everything SK is in this file,
so a reader who skips it reads the paper's method (FA, SSA, XA) without meeting it. Read in order:

    1. SPARSEK        the differentiable top-k mask: the projection onto the capped simplex and its gradient
    2. Scorer         one score per key, u_j = w . k_pre_j, one w per layer
    3. the rule       which keys a query sees (span_start, candidates, sk_pool, sk_logp, sk_bias_reference)
    4. sk_select      the rule's selection for the fused prefill kernel, in Triton
    5. training       sk_pools and sk_flex_attention: FlexAttention with + log p, the gradient reaching u
    6. SKCache        SK's part of the decode cache: k selected keys per head, evicted for good

The files of the paper's method call a few names of it: kernel.py sk_bias_reference (its reference), sk_select and
tl_span_start (its SK tiles); decode_kernel.py span_start and tl_span_start; attention.py sk_flex_attention (the
training branch) and SKCache (the cache); router.py Scorer and candidates; generate.py selected_slots.

SPARSEK(u, k) = argmin_p ||p - u||^2   s.t.   0 <= p_i <= 1,   sum_i p_i = k

Closed form (KKT): p_i = clip(u_i - tau, 0, 1), with the threshold tau chosen so that the p sum to k. Entries far
above tau get 1, entries below tau get 0, a few in between are fractional: a top-k mask with a gradient. The
projection is unique even with ties in u. For k >= n it returns all ones with tau = min(u) - 1 (the projection
for k = n; for k > n no mask sums to k, and all ones is the nearest): "k larger than the context" is an error of
the attention layer, not of this operator.

Gradient. With S = {i : 0 < p_i < 1} (the fractional set), tau = (sum_S u_i + #{p_i = 1} - k) / |S|, so

    dp/du = diag(1_S) - 1_S 1_S^T / |S|         (0 when S is empty)
    grad_u = 1_S * (g - mean_S g),   grad_k = mean_S g

Forward method (exact, vectorised over rows, no bisection): f(t) = sum_i clip(u_i - t, 0, 1) is continuous,
non-increasing and piecewise linear in t, with breakpoints at u_i and u_i - 1. We sort the 2n breakpoints
(O(n log n) per row), walk them from the top with cumulative sums (O(n)): f starts at 0, and its slope on
each segment is the number of fractional entries there (+1 when t passes below u_i, -1 below u_i - 1). The
segment where f crosses k fixes which entries are 0, fractional or 1; one more O(n) pass solves the linear
equation on it exactly. Memory O(n) per row. (The paper evaluates SPARSEK in linear time; the sort-based solve
here is the simpler one to read and to check.)

The projection is defined for any 0 < k <= n; this project requires k >= 1 (a query keeps at least one key).
Scores must be finite: masked positions get a finite score (at most min(u) - 1 keeps them at p = 0 when k is
at most the number of unmasked ones), not -inf.

    pytest test_sparsek.py          # the operator, the scorer, SK attention and its training path
    pytest test_kernel.py -k sk     # the selection against its rule, the fused kernel's SK mode
"""

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 128  # SK selects once per block of 128 queries (kernel.KV_BLOCK, the block XA selects, is the same number)
SK_P_FLOOR = 1e-30  # log p of a selected key is taken of max(p, this): a finite logit even if p rounds to 0
_BLOCK = tl.constexpr(BLOCK)

# -----------------------------------------------------------------------------
# 1. SPARSEK

def _threshold(u, k):
    """tau [B] such that sum_i clip(u_i - tau, 0, 1) = k, for u [B, n] and 1 <= k [B] < n (float32/64)."""
    n = u.shape[-1]
    # breakpoints of f, from the top down; passing below u_i makes entry i fractional, below u_i - 1 saturated
    t, order = torch.cat([u, u - 1], -1).sort(-1, descending=True)                  # [B, 2n]
    step = torch.cat([torch.ones_like(u), -torch.ones_like(u)], -1).gather(-1, order)
    slope = step.cumsum(-1)[:, :-1]                                                  # [B, 2n-1] #fractional
    # f at each breakpoint, summed from the top: the partial sums stay <= k near the answer, so large or
    # far-below scores (masked keys) cannot spoil them by cancellation
    f = F.pad((slope * (t[:, :-1] - t[:, 1:])).cumsum(-1), (1, 0))                   # [B, 2n], f[0] = 0
    # the segment [t[j+1], t[j]] with f(t[j]) < k <= f(t[j+1]); f[0] = 0 < k and f[-1] = n > k bound j
    j = ((f < k[:, None]).sum(-1, keepdim=True) - 1).clamp(0, 2 * n - 2)             # [B, 1]
    mid = (t.gather(-1, j) + t.gather(-1, j + 1)) / 2                                # [B, 1] inside it
    # on that segment every entry is 0, fractional or 1; solve sum_S (u_i - tau) + #ones = k for tau,
    # relative to mid so that the sum only adds numbers in (0, 1)
    d = u - mid                                                                      # [B, n]
    frac = (d > 0) & (d < 1)
    ones = (d >= 1).sum(-1, keepdim=True)
    m = frac.sum(-1, keepdim=True).clamp(min=1)  # m = 0 only through rounding: then tau = mid is as good
    return (mid + ((d * frac).sum(-1, keepdim=True) + ones - k[:, None]) / m).squeeze(-1)


class _SparseK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, k):                     # u [..., n] float32/64, k [...] same dtype
        shape, n = u.shape, u.shape[-1]
        uf, kf = u.reshape(-1, n), k.reshape(-1)                                     # [B, n], [B]
        full = kf >= n                                                               # rows that keep all
        tau = torch.where(full, uf.min(-1).values - 1, _threshold(uf, kf))
        p = (uf - tau[:, None]).clamp(0, 1).masked_fill(full[:, None], 1)           # exact ones, not 1 - ulp
        frac = (p > 0) & (p < 1)                                                     # S, per row
        ctx.save_for_backward(frac)
        ctx.mark_non_differentiable(tau)
        ctx.shape = shape
        return p.reshape(shape), tau.reshape(shape[:-1])

    @staticmethod
    def backward(ctx, g, _g_tau):               # tau carries no gradient
        (frac,) = ctx.saved_tensors
        g = g.reshape(frac.shape) * frac                                             # [B, n], 0 off S
        mean = g.sum(-1, keepdim=True) / frac.sum(-1, keepdim=True).clamp(min=1)     # [B, 1] mean of g over S
        grad_u = (g - mean * frac).reshape(ctx.shape)
        return grad_u, mean.reshape(ctx.shape[:-1])


def sparsek(u, k, return_tau=False, check=True):
    """SPARSEK(u, k): the projection of scores u [..., n] onto {0 <= p <= 1, sum p = k}, per row.

    k: a number >= 1 shared by all rows, or a tensor broadcastable to u.shape[:-1] (one budget per row; it gets
    a gradient if it requires one). k >= n gives all ones. Returns p [..., n] (dtype of u), and with
    return_tau=True also tau [...] (float32, or float64 for float64 u; no gradient), p = clip(u - tau, 0, 1).
    The threshold is computed in at least float32. check=False skips the input checks (which read values back
    to the host): for callers that checked already, or that must not sync (a decode step in a CUDA graph).
    """
    if check:
        _check(u, k)
    work = torch.promote_types(u.dtype, torch.float32)
    kt = torch.as_tensor(k, dtype=work, device=u.device)     # a Python float stays exact in float64
    p, tau = _SparseK.apply(u.to(work), kt.expand(u.shape[:-1]))
    p = p.to(u.dtype)
    return (p, tau) if return_tau else p


def _check(u, k):
    if not isinstance(u, torch.Tensor) or not u.is_floating_point():
        raise ValueError(f"sparsek: scores must be a floating-point tensor, got {getattr(u, 'dtype', type(u))}; "
                         "convert them with u.float()")
    if u.dim() == 0 or u.shape[-1] == 0:
        raise ValueError(f"sparsek: scores need a non-empty last dim [..., n], got shape {tuple(u.shape)}; "
                         "pass at least one score per row")
    if not torch.isfinite(u).all():
        bad = (~torch.isfinite(u)).sum().item()
        raise ValueError(f"sparsek: scores contain NaN or inf ({bad} of {u.numel()} entries); fill masked "
                         "positions with a finite value (at most min(scores) - 1) instead of -inf")
    kt = torch.as_tensor(k, dtype=torch.promote_types(u.dtype, torch.float32), device=u.device)
    bad = kt[~(kt >= 1)]                        # also catches NaN
    if bad.numel():
        raise ValueError(f"sparsek: k={bad.flatten()[0].item():g} but the SparseK budget must be at least 1 "
                         "(each query keeps at least one key); pass k >= 1")


# -----------------------------------------------------------------------------
# 2. The scoring network of SK heads (one per layer; router.AttentionRouter holds it for SK mode pairs)


class Scorer(nn.Module):
    """One score per key per KV head for SK attention: u_j = w . k_pre_j, one w [head_dim] per layer, shared by its
    KV heads (so the layer's G heads score their own keys with one vector).

    Why the keys before RoPE: they are what the router already reads (no new input), a score costs one dot product
    per key, and they carry no rotation, so a key's score does not depend on how far it lies from the query that
    selects it (scores must be query-independent for decode's eviction to be exact; see attention.KVCache).
    w starts at 0: every score is 0, the candidates tie, and SPARSEK gives the pool a uniform p (k / 2k = 1/2) until
    training moves w. D parameters per layer, trained with the routers while the backbone stays frozen.
    forward(k_pre [B, T, G, D]) -> u [B, G, T] fp32.
    """

    def __init__(self, head_dim: int):
        super().__init__()
        self.head_dim = head_dim
        self.weight = nn.Parameter(torch.zeros(head_dim))

    def forward(self, k_pre: torch.Tensor) -> torch.Tensor:
        if k_pre.ndim != 4 or k_pre.shape[-1] != self.head_dim:
            raise ValueError(f"Scorer expects pre-RoPE keys [B, T, G, D={self.head_dim}], got {list(k_pre.shape)}")
        return torch.einsum("btgd,d->bgt", k_pre.float(), self.weight.float())


# -----------------------------------------------------------------------------
# 3. The rule: what an SK head's query sees (the reference the kernels, the training path and decode are tested
# against).
#
# SK is defined on 128-query blocks. Query i in block m = i // 128 sees
#   the sink          j < sink,
#   its local span    c_m <= j <= i, with c_m = span_start(m) = 128 (m + 1) - window (window - 127 to window keys),
#   the selected      the k best candidates of C_m = {sink <= j < c_m} by score u_j (ties: the earlier key),
# and a selected key's logit gets + log p_j, p = SPARSEK(u over the pool of the 2k best candidates, k) (when
# C_m has at most k keys every candidate is selected with p = 1). Adding log p to a logit multiplies the
# key's unnormalised weight exp(s_j) by p_j: the softmax still normalises over everything the query sees, a
# key with p = 1 weighs as in full attention, one with p < 1 is discounted, and d(log p)/du carries the
# gradient to the scorer (the selection itself is discrete). One u per key per KV head, independent of the
# query: with the candidate set only growing (c_m grows with m), a key that falls out of the top k can never
# come back, which is what lets decode evict it (SKCache).


def span_start(block, window):
    """c_m: the first key of the local span of 128-query block m (ints or tensors). tl_span_start is the same in
    Triton."""
    return (block + 1) * BLOCK - window


@triton.jit
def tl_span_start(block, window):
    return (block + 1) * _BLOCK - window


def first_block(j, window):
    """The first block whose candidates include key j (past the sink): the smallest m with j < span_start(m)."""
    return (j + window) // BLOCK


def candidates(block, T, *, sink, window):
    """How many keys the queries of block m select from, sink <= j < min(c_m, T) (ints or tensors)."""
    c = span_start(block, window)
    if torch.is_tensor(c):
        return (c.clamp(max=T) - sink).clamp(min=0)
    return max(min(c, T) - sink, 0)


def selected_slots(sk_k, last, *, sink, window):
    """The selected-key slots an SK head's decode cache needs up to position `last`: sk_k, or fewer when fewer keys
    can be candidates by then (every candidate is then selected with p = 1 either way); at least 1."""
    return min(sk_k, max(1, candidates(last // BLOCK, last + 1, sink=sink, window=window)))


@triton.jit
def tl_candidates(block, T, sink, window):
    return tl.maximum(tl.minimum(tl_span_start(block, window), T) - sink, 0)


def _check_sk_scores(u, T):
    if not isinstance(u, torch.Tensor) or u.dim() != 3 or u.shape[-1] != T:
        got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u)
        raise ValueError(f"sk_scores must be [B, G, T={T}], got {got}")
    if u.device.type == "cpu" and bool(torch.isnan(u).any()):  # on the GPU the check would be a sync per layer
        raise ValueError(f"SK scores contain NaN ({int(torch.isnan(u).sum())} of {u.numel()}): the scorer's "
                         "weight or the key states are not finite; check the scorer (routers) and the input")


def sk_pool(u, blocks, *, k, sink, window):
    """The SK candidate pools of the 128-query blocks `blocks` (LongTensor [M]) for scores u [B, G, T] ->
    (pos [B, G, M, P] long: the pool's keys, best first (u descending, ties: the earlier key), -1 past the
    candidates; u_pool [B, G, M, P] fp32 their scores (differentiable); n [M] the number of candidates),
    with P = min(2k, T)."""
    B, G, T = u.shape
    _check_sk_scores(u, T)
    P = min(2 * k, T)
    j = torch.arange(T, device=u.device)
    c = span_start(blocks.to(u.device), window)                             # [M] start of the local span
    cand = (j >= sink) & (j < c[:, None])                                     # [M, T]
    key = torch.where(cand, u.detach().float()[:, :, None, :], float("-inf"))  # [B, G, M, T]
    order = key.sort(dim=-1, descending=True, stable=True).indices[..., :P]      # stable: ties keep j ascending
    n = cand.sum(-1)                                                           # [M]
    valid = torch.arange(P, device=u.device) < n[:, None]                      # [M, P]
    u_pool = u.float()[:, :, None, :].expand(B, G, len(blocks), T).gather(-1, order)
    return torch.where(valid, order, -1), u_pool, n


def sk_logp(u_pool, n, k, return_tau=False):
    """log p of the pool's best min(k, n) keys -> logp [..., P] (-inf for keys not selected) from u_pool
    [..., P] (best first) and n [...] candidates (broadcast). With return_tau also tau [...] with
    p = clip(u - tau, 0, 1), differentiable in u_pool (the analytic form of SPARSEK's backward)."""
    P = u_pool.shape[-1]
    n = torch.as_tensor(n, device=u_pool.device).expand(u_pool.shape[:-1])
    rank = torch.arange(P, device=u_pool.device)
    valid = rank < n[..., None]
    # the pool past the candidates scores min - 2: p = 0 there, with the budget min(k, n) (all ones if n <= k; a
    # gap of 2, not 1, so that no rounding puts tau on the empty entries and makes them fractional)
    low = torch.where(valid, u_pool.detach(), float("inf")).amin(-1, keepdim=True) - 2
    x = torch.where(valid, u_pool, torch.where(torch.isfinite(low), low, 0.0))
    budget = n.clamp(min=1, max=k).to(x.dtype)
    p = sparsek(x, budget, check=False)
    logp = torch.where(valid & (rank < k), p.clamp(min=SK_P_FLOOR).log(), float("-inf"))
    if not return_tau:
        return logp
    # tau, differentiable: on the fractional set S, tau = (sum_S u + #ones - budget) / |S| (the KKT solution)
    with torch.no_grad():
        frac = (p > 0) & (p < 1)
        size = frac.sum(-1)
        ones = (p >= 1).sum(-1).to(x.dtype)
        # S empty, p all 0 or 1: the largest score that gets 0 gives this p (n <= k: all ones, min - 2 does)
        low = torch.where(torch.isfinite(low), low, 0.0).squeeze(-1)
        tau_fixed = torch.where(n > k, torch.where(p >= 1, float("-inf"), x).amax(-1), low)
    tau = torch.where(size > 0, ((x * frac).sum(-1) + ones - budget) / size.clamp(min=1), tau_fixed)
    return logp, tau


def sk_bias_reference(u, T, *, k, sink, window):
    """The SK rule as an additive bias [B, G, T, T] on the attention logits (fp32): 0 on the sink and the local
    span, log p on the selected keys, -inf elsewhere (and above the diagonal). Differentiable in u."""
    B, G, _ = u.shape
    nb = triton.cdiv(T, BLOCK)
    blocks = torch.arange(nb, device=u.device)
    pos, u_pool, n = sk_pool(u, blocks, k=k, sink=sink, window=window)
    logp = sk_logp(u_pool, n, k)                                               # [B, G, nb, P]
    row = torch.full((B, G, nb, T + 1), float("-inf"), device=u.device)        # per block; column T: the pool's -1s
    row = row.scatter(-1, torch.where(pos < 0, T, pos), logp)[..., :T]
    i = torch.arange(T, device=u.device)
    bias = row[:, :, i // BLOCK]                                            # [B, G, T, T], query i's block
    j = i[None, :]
    c = span_start(i // BLOCK, window)[:, None]
    bias = bias.masked_fill((j < sink) | (j >= c), 0.0)
    return bias.masked_fill(j > i[:, None], float("-inf"))


# -----------------------------------------------------------------------------
# 4. The selection for the fused prefill kernel (kernel.py), in Triton.
#
# Sort each (batch, KV head)'s keys once, best first (u
# descending, ties: the earlier key, as sk_pool ranks them). Key j is a candidate of block m iff sink <= j < c_m,
# i.e. from block e_j = (j + window) // 128 on. So block m's pool is the first P entries of the sorted list with
# e_j <= m, in order: one program per block walks the list a tile at a time, keeps the entries with e_j <= m and
# writes them at their running rank (a cumsum), until P are found; a tile without any (its smallest e above m) is
# skipped by reading one number. A second program per block solves SPARSEK's threshold over its pool (bisection,
# then the exact solve on the segment it lands in) and writes log p of the selected (the first min(k, n)).
# Work: the sort, plus each block's walk until its P-th candidate: with scores unrelated to position block m
# reads about P * nb / (m + 1) entries (O(P nb log nb) in all); when later keys score higher the walk skips
# the tiles of the keys past c_m one number each.

_SK_TILE = 1024  # sorted entries a walking program reads at a time


@triton.jit
def _sk_pool_kernel(Usort, Jsort, Esort, TileMin, Idx, Pool, T, sink, window, K, P, NT, TILE: tl.constexpr):
    m = tl.program_id(0)
    bg = tl.program_id(1).to(tl.int64)
    out = bg * tl.num_programs(0) + m                                   # row of (b, g, m) in Idx and Pool
    need = tl.minimum(tl_candidates(m, T, sink, window), P)
    row = bg * NT * TILE
    found = 0
    t = 0
    while found < need:
        if tl.load(TileMin + bg * NT + t) <= m:                         # a candidate of block m in this tile
            offs = row + t * TILE + tl.arange(0, TILE)
            ok = tl.load(Esort + offs) <= m
            rank = found + tl.cumsum(ok.to(tl.int32), 0) - 1
            tl.store(Pool + out * P + rank, tl.load(Usort + offs), mask=ok & (rank < P))
            tl.store(Idx + out * K + rank, tl.load(Jsort + offs), mask=ok & (rank < K))
            found += tl.sum(ok.to(tl.int32), 0)
        t += 1


@triton.jit
def _sk_logp_kernel(Idx, Logp, Pool, T, sink, window, k, K, P, PP: tl.constexpr, KK: tl.constexpr,
                    STEPS: tl.constexpr, ITERS: tl.constexpr, FLOOR: tl.constexpr):
    m = tl.program_id(0)
    out = tl.program_id(1).to(tl.int64) * tl.num_programs(0) + m
    n = tl_candidates(m, T, sink, window)
    offs = tl.arange(0, PP)
    x = tl.load(Pool + out * P + offs, mask=offs < tl.minimum(n, P), other=float("-inf"))
    # SPARSEK over the pool with budget k (n > k; else every candidate gets p = 1): tau lies in
    # [x_k - 1, x_k) with x_k the k-th best, where sum clip(x - tau, 0, 1) falls through k
    x_k = tl.max(tl.where(offs == k - 1, x, float("-inf")), 0)
    x_k = tl.where(n > k, x_k, 0.0)  # (n <= k: the threshold is not used; a finite one keeps NaN out)
    lo, hi = x_k - 1.0, x_k
    for _ in range(ITERS):  # f at STEPS points splitting [lo, hi) into STEPS + 1; f does not grow with t,
        # so the c points with f >= k come first and the crossing lies between points c and c + 1
        t = lo + (hi - lo) * (tl.arange(0, STEPS) + 1).to(tl.float32) / (STEPS + 1)
        f = tl.sum(tl.minimum(tl.maximum(x[None, :] - t[:, None], 0.0), 1.0), 1)          # [STEPS]
        c = tl.sum((f >= k).to(tl.float32), 0)
        lo, hi = lo + (hi - lo) * c / (STEPS + 1), lo + (hi - lo) * (c + 1) / (STEPS + 1)
    # on the segment around mid each entry is 0, fractional or 1: sum_S (x - tau) + #ones = k, solved exactly
    mid = (lo + hi) * 0.5
    d = x - mid
    frac = (d > 0) & (d < 1)
    ones = tl.sum((d >= 1).to(tl.float32), 0)
    tau = mid + (tl.sum(tl.where(frac, d, 0.0), 0) + ones - k) / tl.maximum(tl.sum(frac.to(tl.float32), 0), 1.0)
    sel = tl.arange(0, KK)
    n_sel = tl.minimum(n, k)
    xs = tl.load(Pool + out * P + sel, mask=sel < n_sel, other=0.0)
    p = tl.where(n > k, tl.minimum(tl.maximum(xs - tau, FLOOR), 1.0), 1.0)
    tl.store(Logp + out * K + sel, tl.where(sel < n_sel, tl.log(p), float("-inf")), mask=sel < K)
    tl.store(Idx + out * K + sel, tl.full([KK], -1, tl.int32), mask=(sel >= n_sel) & (sel < K))


def sk_select(u, *, k, sink, window):
    """SK's selection for every 128-query block, for the fused kernel: scores u [B, G, T] -> (idx int32 [B, G, nb, K]
    the selected keys, best first, -1 for none; logp fp32 [B, G, nb, K] their log p, -inf for none), K = min(k, T).
    The reference's selection (sk_pool + sk_logp) exactly, and its log p up to rounding (a bisection instead of a
    sort), in two Triton kernels after one sort per (batch, KV head). Memory O(nb k + T)."""
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"sk_k={k!r} but SK selects at least one key per query block; pass sk_k >= 1")
    B, G, T = u.shape
    _check_sk_scores(u, T)
    nb, P, K = triton.cdiv(T, BLOCK), min(2 * k, T), min(k, T)
    NT = triton.cdiv(T, _SK_TILE)
    sink, window = min(sink, T), min(window, T + BLOCK)  # beyond, nothing changes; keeps them in int32
    with torch.no_grad():
        usort, jsort = u.detach().float().sort(dim=-1, descending=True, stable=True)   # ties: the earlier key first
        esort = torch.where(jsort >= sink, first_block(jsort, window), nb)         # first block that admits it
        pad = (0, NT * _SK_TILE - T)
        usort, jsort = F.pad(usort, pad), F.pad(jsort.to(torch.int32), pad)
        esort = F.pad(esort.to(torch.int32), pad, value=nb)                           # padding: never a candidate
        tile_min = esort.view(B, G, NT, _SK_TILE).amin(-1).contiguous()
        idx = torch.empty(B, G, nb, K, dtype=torch.int32, device=u.device)
        logp = torch.empty(B, G, nb, K, dtype=torch.float32, device=u.device)
        pool = torch.empty(B, G, nb, P, dtype=torch.float32, device=u.device)
        _sk_pool_kernel[(nb, B * G)](usort, jsort, esort, tile_min, idx, pool, T, sink, window, K, P, NT,
                                     TILE=_SK_TILE, num_warps=4)
        # the threshold's bracket shrinks to 2^-24 of its width, STEPS + 1 times an iteration ([STEPS, P] values;
        # Triton's interpreter pays per operation whatever its size: few iterations of many points there)
        PP = triton.next_power_of_2(P)
        steps = 256 if not u.is_cuda else max(2, min(16, 8192 // PP))
        _sk_logp_kernel[(nb, B * G)](idx, logp, pool, T, sink, window, k, K, P, PP=PP, KK=triton.next_power_of_2(K),
                                     STEPS=steps, ITERS=math.ceil(24 / math.log2(steps + 1)), FLOOR=SK_P_FLOOR,
                                     num_warps=4)
    return idx, logp


# -----------------------------------------------------------------------------
# 5. Training: the pools of every block in PyTorch (differentiable in u), FlexAttention with + log p, and the
# gradient in log p (attention.branch_attention calls sk_flex_attention for the SK branch of the training mix).


def sk_pools(u, *, k, sink, window):
    """sk_pool of every block (the same pos, u_pool, n as sk_pool(u, arange(nb))), without anything nb x T in
    size: O(nb k + T) memory, at most ~16 sorts. In PyTorch, for training: u_pool carries u's gradient (the
    fused kernel's selection, sk_select, has none).

    C_m only grows with m, so the pool of block m is the best P of (the pool of block m - 1) + its 128 new keys.
    Blocks are taken in chunks of L: the pool carried from before the chunk and the chunk's new keys are sorted
    once, best first; block m's pool is the first P of them that it admits (the carried ones and j < c_m), found
    by a running count per block. Ranking is exact: every key gets a unique int64 (the order-preserving int of its
    fp32 score in the high bits, 2^31 - 1 - j in the low: ties go to the earlier key), so the sort needs no tie
    rule."""
    B, G, T = u.shape
    _check_sk_scores(u, T)
    nb, P = triton.cdiv(T, BLOCK), min(2 * k, T)
    none = torch.iinfo(torch.int64).min                                        # no key: ranks last
    bits = (u.detach().float() + 0.0).view(torch.int32)                        # + 0.0: -0.0 ties with 0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()               # negative floats count down
    j = torch.arange(T, device=u.device)
    key = torch.where(j >= sink, bits * 2**32 + (0x7FFFFFFF - j), none)        # [B, G, T]
    c = [span_start(m, window) for m in range(nb)]                           # start of each local span
    c_dev = span_start(torch.arange(nb, device=u.device), window)           # the same, on the device (no copy)
    L = max(32, triton.cdiv(nb, 16))                                           # blocks per chunk
    pool = torch.empty(B, G, nb, P, dtype=torch.int64, device=u.device)
    carry = torch.full((B, G, P), none, dtype=torch.int64, device=u.device)
    for m0 in range(0, nb, L):
        m1 = min(m0 + L, nb)
        lo, hi = min(max(c[m0] - BLOCK, 0), T), min(max(c[m1 - 1], 0), T)  # the keys admitted in the chunk
        cand = torch.cat([carry, key[:, :, lo:hi]], -1).sort(dim=-1, descending=True).values  # [B, G, P + W]
        # the carried keys lie before c_{m0 - 1}: every block admits them; "no key" decodes to j = 2^31 - 1
        admit = (0x7FFFFFFF - (cand & 0xFFFFFFFF))[:, :, None] < c_dev[m0:m1, None]
        rank = admit.cumsum(-1, dtype=torch.int32) - 1                         # [B, G, L, P + W]
        at = torch.where(admit & (rank < P), rank, P).long()                   # column P: dropped
        chunk = torch.full((B, G, m1 - m0, P + 1), none, dtype=torch.int64, device=u.device)
        pool[:, :, m0:m1] = chunk.scatter_(-1, at, cand[:, :, None].expand_as(at))[..., :P]
        carry = pool[:, :, m1 - 1]
    n = candidates(torch.arange(nb, device=u.device), T, sink=sink, window=window)  # [nb] per block
    pos = torch.where(torch.arange(P, device=u.device) < n[:, None], 0x7FFFFFFF - (pool & 0xFFFFFFFF), -1)
    u_pool = u.float().gather(-1, pos.clamp(min=0).flatten(2)).view(B, G, nb, P)
    return pos, u_pool, n


try:  # how flex_attention returns the log-sum-exp of each row's scores (natural log)
    from torch.nn.attention.flex_attention import AuxRequest
    LSE = dict(return_aux=AuxRequest(lse=True))
except ImportError:
    LSE = dict(return_lse=True)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)  # compiled once: uncompiled, Flex materialises the scores


def _sk_block_mask(pos, sk_k, c, T, sink, group, mask_mod):
    """FlexAttention's block mask for SK heads, from the pools' positions pos [B, G, NB, P] (the first sk_k: the
    selected keys) and the local spans' starts c [NB]. A (query block, key block) pair is full when the key block
    lies whole in the sink or the local span and holds no selected key (no mask_mod), partial when some of its pairs
    may be kept: the diagonal, a span's edge, a block holding a selected key (mask_mod decides). Built per KV head,
    then repeated for its group of query heads."""
    from torch.nn.attention.flex_attention import BlockMask

    B, G, NB, P = pos.shape
    blocks = torch.arange(NB, device=pos.device)
    m, n = blocks[:, None], blocks[None, :]
    whole = ((m + 1) * BLOCK <= T) & ((n + 1) * BLOCK <= T)
    local_any = (n <= m) & ((n * BLOCK < sink) | ((n + 1) * BLOCK > c[:, None]))
    local_full = (n < m) & whole & (((n + 1) * BLOCK <= sink) | (n * BLOCK >= c[:, None]))
    at = torch.where((pos >= 0) & (torch.arange(P, device=pos.device) < sk_k), pos // BLOCK, NB)
    sel = torch.zeros(B, G, NB, NB + 1, dtype=torch.bool, device=pos.device).scatter(-1, at, True)[..., :NB]
    full = local_full & ~sel  # a block with a selected key needs mask_mod (a partial candidate block)

    def as_lists(blocks_):  # [B, G, NB, NB] -> counts and indices of each query head's kept key blocks
        counts = blocks_.sum(-1, dtype=torch.int32)
        indices = torch.argsort((~blocks_).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts.repeat_interleave(group, dim=1), indices.repeat_interleave(group, dim=1)

    return BlockMask.from_kv_blocks(*as_lists((local_any | sel) & ~full), *as_lists(full), BLOCK, mask_mod,
                                    seq_lengths=(T, T))


def sk_flex_attention(q, k, v, u, *, sk_k, sink, window, _flex=None):
    """SK attention (kernel.reference_attention's rule) for every head, through FlexAttention: differentiable in q,
    k, v and the scores u [B, G, T] (fp32), with nothing T x T built. The selection runs in PyTorch
    (sk_pools: the pools of all 128-query blocks, [B, G, T / 128, 2k]); FlexAttention gets a block mask of
    the sink, the local span and the blocks holding a selected key, a mask_mod that keeps a candidate iff it ranks
    among the block's k best (u above the k-th best's, or equal and not later), and a score_mod that adds
    log p = log clip(u_j - tau_m, 0, 1) with the block's threshold tau_m. Flex gives the gradients in q, k, v; the
    gradient in log p, and through SPARSEK's analytic backward in u, comes from SKLogpGrad on the gathered selected
    keys (a score_mod gradient in a captured tensor is summed by Flex over every (query, key) pair with atomics:
    FA-SK training steps took 5x those of FA-SSA). window must be a multiple of 128 (ElasticConfig checks it)."""
    B, H, T, _ = q.shape
    G = k.shape[1]
    group = H // G
    if window % BLOCK:
        raise ValueError(f"SK through FlexAttention needs a window that is a multiple of {BLOCK}, got {window}")
    NB = -(-T // BLOCK)
    u = u.float()
    pos, u_pool, n = sk_pools(u, k=sk_k, sink=sink, window=window)  # [B, G, NB, P]
    logp, tau = sk_logp(u_pool, n, sk_k, return_tau=True)         # differentiable in u (SPARSEK)
    tau = tau.detach()  # Flex adds log p as a constant; SKLogpGrad brings its gradient
    with torch.no_grad():  # the k-th best candidate of each block (past all when n <= k: every candidate kept)
        last = (n.clamp(max=sk_k) - 1).clamp(min=0).expand(B, G, NB)[..., None]
        kth_u = torch.where(n > sk_k, u_pool.gather(-1, last)[..., 0], float("-inf"))
        kth_j = torch.where(n > sk_k, pos.gather(-1, last)[..., 0], T)
    c = span_start(torch.arange(NB, device=q.device), window)  # [NB] start of each query block's local span

    u_sel = u.detach()  # the selection is discrete: no gradient through it (nor through the score_mod)

    def selected(b, h, q_idx, kv_idx):
        g, m = h // group, q_idx // BLOCK
        uj, ku = u_sel[b, g, kv_idx], kth_u[b, g, m]
        cand = (kv_idx >= sink) & (kv_idx < c[m])
        return cand & ((uj > ku) | ((uj == ku) & (kv_idx <= kth_j[b, g, m])))

    def mask_mod(b, h, q_idx, kv_idx):
        local = (kv_idx < sink) | (kv_idx >= c[q_idx // BLOCK])
        return (kv_idx <= q_idx) & (local | selected(b, h, q_idx, kv_idx))

    def score_mod(score, b, h, q_idx, kv_idx):
        p = (u_sel[b, h // group, kv_idx] - tau[b, h // group, q_idx // BLOCK]).clamp(SK_P_FLOOR, 1.0)
        return score + torch.where(selected(b, h, q_idx, kv_idx), p.log(), 0.0)

    mask = _sk_block_mask(pos, sk_k, c, T, sink, group, mask_mod)
    o, aux = (_flex or _compiled_flex())(q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=True, **LSE)
    lse = getattr(aux, "lse", aux)  # AuxOutput, or the lse itself (older torch)
    if not logp.requires_grad:
        return o
    K = min(sk_k, pos.shape[-1])  # the pool's first K: the selected keys (log p -inf for none)
    return SKLogpGrad.apply(o, logp[..., :K], lse, q.detach(), k.detach(), v.detach(), pos[..., :K],
                            q.shape[-1] ** -0.5)


class SKLogpGrad(torch.autograd.Function):
    """o unchanged forward; backward passes dL/do on to o (Flex's backward: q, k, v) and returns dL/dlog p of the
    selected keys, [B, G, NB, K]. log p_mj is added to the logit s_ij of every query i of block m, so with
    P_ij = exp(s_ij - lse_i) and delta_i = do_i . o_i (the softmax backward, as in flash attention)
        dL/dlog p_mj = sum over the block's queries i (and the KV head's query heads) of P_ij (do_i . v_j - delta_i).
    A selected key lies before the block's local span (j < c_m <= 128 m), so every query of the block sees it."""

    @staticmethod
    def forward(ctx, o, logp, lse, q, k, v, idx, scale):
        ctx.save_for_backward(o, logp, lse, q, k, v, idx)
        ctx.scale = scale
        return o.view_as(o)

    @staticmethod
    def backward(ctx, do):
        o, logp, lse, q, k, v, idx = ctx.saved_tensors
        return do, sk_logp_grad(q, k, v, o, lse, do, idx, logp, ctx.scale), None, None, None, None, None, None


def sk_logp_grad(q, k, v, o, lse, do, idx, logp, scale, max_bytes=1 << 28):
    """dL/dlog p [B, G, NB, K] (SKLogpGrad) from q [B, H, T, D], k and v [B, G, T, D], the output o and its gradient
    do [B, H, T, D], lse [B, H, T] (natural log), the selected keys idx [B, G, NB, K] (-1: none) and their log p
    [B, G, NB, K]. The selected keys are gathered, [128, K] logits per block and query head, in chunks of blocks of
    at most max_bytes: O(T k D) work, nothing T x T."""
    B, H, T, D = q.shape
    G, (NB, K) = k.shape[1], idx.shape[2:]
    pad = NB * BLOCK - T

    def blocked(x, value=0.0):  # [B, H, T, ...] -> [B, G, H / G, NB, 128, ...] fp32, padded past T
        x = F.pad(x.float(), (0, 0, 0, pad) if x.ndim == 4 else (0, pad), value=value)
        return x.view(B, G, H // G, NB, BLOCK, *x.shape[3:])

    qb, dob = blocked(q), blocked(do)
    delta = (dob * blocked(o)).sum(-1)                     # [B, G, H/G, NB, 128]
    lseb = blocked(lse, float("inf"))                      # rows past T: P = 0
    j = idx.clamp(min=0).long().flatten(2)[..., None].expand(-1, -1, -1, D)
    ks, vs = (x.float().gather(2, j).view(B, G, NB, K, D) for x in (k, v))
    out = torch.empty(B, G, NB, K, dtype=torch.float32, device=q.device)
    step = max(1, max_bytes // (4 * B * H * BLOCK * K))
    for a in range(0, NB, step):
        m = slice(a, a + step)
        s = torch.einsum("bgrmqd,bgmkd->bgrmqk", qb[:, :, :, m], ks[:, :, m]) * scale + logp[:, :, None, m, None]
        p = torch.exp(s - lseb[:, :, :, m, :, None])      # -inf log p (no key): 0
        dp = torch.einsum("bgrmqd,bgmkd->bgrmqk", dob[:, :, :, m], vs[:, :, m])
        out[:, :, m] = (p * (dp - delta[:, :, :, m, :, None])).sum((2, 4))
    return out.to(logp.dtype)


# -----------------------------------------------------------------------------
# 6. Decode: SK's part of the KV cache.


class SKCache:
    """SK's part of one layer's decode cache (attention.KVCache, whose flat k and v buffers [N, D] it shares). In
    that cache an SK segment is an SSA ring of sink + window slots (of which a query reads the sinks and its local
    span: the decode kernel masks the rest) followed by sk_k *selected* slots, whose log p the decode kernel adds to
    their logits.

    Eviction. A decode step at position p (block m = p // 128) sees the candidates C_m = {sink <= j < c_m}; C_m only
    grows with m, by the 128 keys [c_m - 128, c_m) at each block's first query, which are still in the ring then.
    Scores do not depend on the query, so a key's rank among the candidates only drops as they grow: a key outside
    the best 2k (the SPARSEK pool) or the best k (selected) never returns to them. So an SK segment keeps the k
    selected keys' K/V and the pool's 2k scores and positions (update() merges each new block into them), and
    forgets the rest: at most sink + window + k K/V, and decoding equals a full recomputation under
    kernel.reference_attention's rule (test_elastic.py).

    State: u [N] the score of each ring slot's key; logp [N] each selected slot's log p (-inf: empty); and one row
    per SK segment: seg (its b * G + g), pos [S, 2k] the pool (positions, best first, -1 empty), pool_u [S, 2k] their
    scores, block [S] the last block merged."""

    def __init__(self, N, seg, sk_k, sink, window, device):
        self.sk_k, self.sink, self.window = sk_k, sink, window
        self.u = torch.zeros(N, dtype=torch.float32, device=device)
        self.logp = torch.zeros(N, dtype=torch.float32, device=device)
        self.seg = seg
        self.pos = torch.full((len(seg), 2 * sk_k), -1, dtype=torch.long, device=device)
        self.pool_u = torch.zeros(len(seg), 2 * sk_k, dtype=torch.float32, device=device)
        self.block = seg.new_zeros(len(seg))

    def prefill(self, cache, u, k, v, tokens, ring_at, ring_j):
        """After the cache has laid out its segments and filled the rings: u [B * G, T] the prompt's scores (fp32),
        k, v [B * G, T, D] its keys and values, tokens [B * G] (device) each segment's prompt tokens; ring_at,
        ring_j [S, sink + window] the SK rings' slots and the positions they hold. Keeps the scores of the ring's
        keys, the pool as of the block of the prompt's last token, and the best k's K/V in the selected slots."""
        self.block = (tokens[self.seg] - 1) // BLOCK                               # merged up to
        if not len(self.seg):
            return
        self.u[ring_at] = u[self.seg[:, None], ring_j]
        last_block = self.block.tolist()  # the pools of the segments whose prompt ends in block m, one call each
        for m in sorted(set(last_block)):
            rows = [s for s, mb in enumerate(last_block) if mb == m]
            pos, pool_u, _ = sk_pool(u[self.seg[rows]][None], torch.full((1,), m, device=u.device),
                                     k=self.sk_k, sink=self.sink, window=self.window)  # [1, S, 1, P]
            P = pos.shape[-1]
            self.pos[rows, :P], self.pool_u[rows, :P] = pos[0, :, 0], pool_u[0, :, 0]
        top = self.pos[:, :self.sk_k].clamp(min=0)                                   # [S, k]
        slots, seg = self.selected_slots(cache), self.seg[:, None]
        cache.k[slots], cache.v[slots] = k[seg, top], v[seg, top]
        self._refresh_logp(cache)

    def selected_slots(self, cache):
        """[S, k] the flat slots of the SK segments' selected keys (after their rings)."""
        first = (cache.base.long() + cache.cap.long())[self.seg]
        return first[:, None] + torch.arange(self.sk_k, device=first.device)

    def _refresh_logp(self, cache):
        n = (self.pos >= 0).sum(-1)
        self.logp[self.selected_slots(cache)] = sk_logp(self.pool_u, n, self.sk_k)[:, :self.sk_k]

    def update(self, cache, pos, u_new):
        """Before a decode step at positions pos (int [B], device) whose new keys score u_new [B, G, 1]: at a block's
        first query (pos % 128 == 0) the 128 keys [pos - window, pos + 128 - window) past the sink become candidates:
        merge them (from the ring) into the pool, move the new best k's K/V into the selected slots, refresh their
        log p; then keep the new keys' scores in their ring slots. Every step runs the same operations (a step off
        the boundary merges nothing): static shapes, no host sync, state updated in place, so it is captured in the
        decode step's CUDA graph. A block is merged once (block), so running a step again at the same position
        (generate's warm-up) changes nothing. What falls out of the pool or the selection is forgotten."""
        if len(self.seg):
            self._merge(cache, pos)  # before the new key overwrites the ring slot of position pos - window
            B, G = u_new.shape[:2]
            p = pos.to(self.u.device).long().repeat_interleave(G)
            self.u[cache.slots(p)] = u_new.reshape(B * G).float()

    def _merge(self, cache, pos):
        S, K = len(self.seg), self.sk_k
        dev = self.u.device
        p = pos.to(dev).long()[self.seg // cache.G]                                        # [S]
        j = p[:, None] - self.window + torch.arange(BLOCK, device=dev)                     # [S, 128]
        m = p // BLOCK
        ok = (m > self.block)[:, None] & (j >= self.sink)  # a block's first query, not merged yet
        ring_at = cache.slots(j.clamp(min=0), self.seg[:, None])
        sel = self.selected_slots(cache)
        cand_pos = torch.cat([self.pos, torch.where(ok, j, -1)], 1)                         # [S, 2k + 128]
        cand_u = torch.cat([self.pool_u, self.u[ring_at]], 1)
        # where each candidate's K/V is now: the pool's best k in the selected slots (the rest of the pool never
        # returns to the best k, so it needs none), the new ones in the ring
        cand_at = torch.cat([sel, sel[:, :1].expand(S, K), ring_at], 1)
        # order: u descending, ties by the earlier position, empty entries last (two stable sorts)
        order = torch.argsort(torch.where(cand_pos >= 0, cand_pos, 1 << 62), dim=1, stable=True)
        key = torch.where(cand_pos >= 0, cand_u, float("-inf")).gather(1, order)
        order = order.gather(1, torch.argsort(key, dim=1, descending=True, stable=True))[:, :2 * K]
        self.pos.copy_(cand_pos.gather(1, order))
        self.pool_u.copy_(cand_u.gather(1, order))
        self.block.copy_(torch.maximum(self.block, m))
        src = cand_at.gather(1, order[:, :K])
        cache.k[sel], cache.v[sel] = cache.k[src], cache.v[src]  # gathered first (a copy), then written
        self._refresh_logp(cache)

    def mask(self, p, slot, n, cap, at, count):
        """For the CPU decode path (attention.KVCache.decode): `count` SK segments side by side from flat slot `at`,
        each `cap` ring slots (n of them filled) and sk_k selected ones; a query at position p whose new key went to
        ring slot `slot`. -> (the slots it reads, [n + sk_k], and their additive mask [count, n + sk_k]: 0 on the
        sinks and the local span, -inf on the ring's older keys, log p on the selected slots)."""
        size = cap + self.sk_k
        s = torch.arange(n)
        age = (slot - s) % self.window
        local = (s < self.sink) | (age <= p - span_start(p // BLOCK, self.window))
        mask = torch.cat([torch.where(local, 0.0, float("-inf")).expand(count, n),
                          self.logp[at:at + count * size].view(count, size)[:, cap:]], 1)
        return torch.cat([s, torch.arange(cap, size)]), mask

    @classmethod
    def cat(cls, parts, rows, G):
        """The SK state of several caches' rows, in order, as one (attention.KVCache.cat; rows: the first row of
        each, G: KV heads per row)."""
        out = cls.__new__(cls)
        out.sk_k, out.sink, out.window = parts[0].sk_k, parts[0].sink, parts[0].window
        for name in ("u", "logp", "pos", "pool_u", "block"):
            setattr(out, name, torch.cat([getattr(c, name) for c in parts]))
        out.seg = torch.cat([c.seg + r * G for c, r in zip(parts, rows)])
        return out
