"""
SPARSEK, the differentiable top-k mask of SparseK attention (Lou et al., *Sparser is Faster and Less is More:
Efficient Sparse Attention for Long-Range Transformers*, arXiv 2406.16747).

Given scores u in R^n and a budget k, SPARSEK is the Euclidean projection of u onto the capped simplex:

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

After the operator come the per-layer key scorer of SK heads (`Scorer`) and SK attention's selection of keys:
the rule that defines it (`sk_pool`, `sk_logp`, `sk_bias_reference`), the pools that training differentiates
(`sk_pools`), and the fused kernel's selection in Triton (`sk_select`). kernel.py runs the attention itself.

    pytest test_sparsek.py          # the operator, the scorer, SK attention and its training path
    pytest test_kernel.py -k sk     # the selection against its rule, the fused kernel's SK mode
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 128  # SK selects once per 128-query block (kernel.KV_BLOCK, the block XA selects too, is this number)
SK_P_FLOOR = 1e-30  # log p of a selected key is taken of max(p, this): a finite logit even if p rounds to 0
_BLOCK = tl.constexpr(BLOCK)


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
# The scoring network of SK attention (attention.py, kernel.reference_attention)


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
# SK attention's selection: the rule (the reference the kernels are tested against) and its Triton version.

# SK, the SparseK mode (arXiv 2406.16747), defined on 128-query blocks. Query i in block m = i // 128 sees
#   the sink          j < sink,
#   its local span    c_m <= j <= i, with c_m = 128 (m + 1) - window (window - 127 to window keys),
#   the selected      the k best candidates of C_m = {sink <= j < c_m} by score u_j (ties: the earlier key),
# and a selected key's logit gets + log p_j, p = SPARSEK(u over the pool of the 2k best candidates, k) (when
# C_m has at most k keys every candidate is selected with p = 1). Adding log p to a logit multiplies the
# key's unnormalised weight exp(s_j) by p_j: the softmax still normalises over everything the query sees, a
# key with p = 1 weighs as in full attention, one with p < 1 is discounted, and d(log p)/du carries the
# gradient to the scorer (the selection itself is discrete). One u per key per KV head, independent of the
# query: with the candidate set only growing (c_m grows with m), a key that falls out of the top k can never
# come back, which is what lets decode evict it (attention.KVCache).

def _check_sk_scores(u, T):
    if not isinstance(u, torch.Tensor) or u.dim() != 3 or u.shape[-1] != T:
        raise ValueError(f"sk_scores must be [B, G, T={T}], got {tuple(u.shape) if isinstance(u, torch.Tensor) else type(u)}")
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
    c = (blocks.to(u.device) + 1) * BLOCK - window                          # [M] start of the local span
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
    c = [(m + 1) * BLOCK - window for m in range(nb)]                       # start of each local span
    c_dev = torch.arange(1, nb + 1, device=u.device) * BLOCK - window       # the same, on the device (no copy)
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
    n = (c_dev.clamp(max=T) - sink).clamp(min=0)                              # [nb] candidates per block
    pos = torch.where(torch.arange(P, device=u.device) < n[:, None], 0x7FFFFFFF - (pool & 0xFFFFFFFF), -1)
    u_pool = u.float().gather(-1, pos.clamp(min=0).flatten(2)).view(B, G, nb, P)
    return pos, u_pool, n


# SK's selection for the fused kernel, in Triton. Sort each (batch, KV head)'s keys once, best first (u
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
    need = tl.minimum(tl.maximum(tl.minimum((m + 1) * _BLOCK - window, T) - sink, 0), P)
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
    n = tl.maximum(tl.minimum((m + 1) * _BLOCK - window, T) - sink, 0)  # candidates of block m
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
        esort = torch.where(jsort >= sink, (jsort + window) // BLOCK, nb)          # first block that admits it
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
    c = ((i // BLOCK + 1) * BLOCK - window)[:, None]
    bias = bias.masked_fill((j < sink) | (j >= c), 0.0)
    return bias.masked_fill(j > i[:, None], float("-inf"))
