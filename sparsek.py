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

    pytest test_sparsek.py
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


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
