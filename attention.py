"""
How one layer's attention runs in Elastic Attention (arXiv 2601.17367): the plug-in point between the backbone
(model.py), the routers (router.py) and the kernels (kernel.py).

model.Attention computes q, k, v and the pre-RoPE keys and hands them to `attend`, with the `Run` that says what
this forward is (prefill or decode, fixed modes or routers, training or inference). `attend` then
    at prefill   routes the layer's KV heads (the router reads the pre-RoPE keys; or the mode table is given),
                 runs dense attention (no routing), the fused kernel (routed inference), or the training mix
                 of both branches (Gumbel straight-through), and fills the KV cache;
    at decode    attends one new token against the cache, every head in the mode of its prefill,
and returns the output with a record of what the heads ran (`Routed`); Transformer.forward stacks the
records of all layers into a `Routing`. Nothing here keeps state between forwards except the KV cache,
which the caller owns and passes in (`Run.caches`, one per layer).

    pytest test_elastic.py          # routing, the training mix, decode against recomputation
"""
import functools
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

import kernel
from decode_kernel import cache_slot, decode_attention_op, decode_splits
from kernel import FA, KV_BLOCK, SK, SSA, XA
from router import ElasticConfig, route, sparsity_ratio
from sparsek import SK_P_FLOOR, sk_logp, sk_pool, sk_pools

DECODE_SPLIT = 1024  # cache slots per program of the decode kernel on the GPU (decode_kernel.py)

# -----------------------------------------------------------------------------
# what a forward is, and what a layer reports back


@dataclass
class Run:
    """What every layer of one forward needs besides its own weights (built by Transformer.forward).

    elastic:     how routed heads run (mode pair, SSA sink and window, XA threshold)
    routers:     router.Routers, one per layer, or None
    modes:       int [B, L, G] (or [1, L, G] for every row) fixed modes instead of the routers', or None
    tau:         Gumbel temperature: training (both branches run, mixed by the sampled z); None: inference
    prompt_lens: [B] the prompt span of each row that the routers pool (None: all T tokens)
    caches:      one KVCache per layer while generating, or None
    pos:         int [B] on the device: the position of each row's token in a decode step (None: a prefill)
    lengths:     a prefill of rows of several lengths, right-padded to T: the tokens of each row, as Python ints
                 (for the caches) and as lens, int32 [B] on the device (for XA's estimate); None: all T
    """
    elastic: ElasticConfig
    routers: object = None
    modes: torch.Tensor | None = None
    tau: float | None = None
    prompt_lens: torch.Tensor | None = None
    caches: list | None = None
    pos: torch.Tensor | None = None
    lengths: list | None = None
    lens: torch.Tensor | None = None


class Routed(NamedTuple):
    """What the KV heads of one layer ran at prefill."""
    modes: torch.Tensor                # [B, G] kernel mode ids
    z: torch.Tensor | None = None      # [B, G, 2] router decisions (straight-through in training); None: given modes
    logits: torch.Tensor | None = None  # [B, G, 2] the router's logits (differentiable in training)


@dataclass
class Routing:
    """What the heads of a whole forward ran (Transformer.forward(return_routing=True))."""
    z: torch.Tensor | None  # [B, L, G, 2] router decisions (straight-through in training); None for given modes
    modes: torch.Tensor     # [B, L, G] the kernel mode (FA, SSA, XA, SK) of every KV head
    omega: torch.Tensor     # [B] model sparsity ratio: share of KV heads in the sparse mode
    logits: torch.Tensor | None = None  # [B, L, G, 2] the routers' logits (differentiable); None for given modes

    @classmethod
    def stack(cls, layers: list[Routed], elastic: ElasticConfig) -> "Routing":
        modes = torch.stack([r.modes for r in layers], dim=1)  # [B, L, G]
        if layers[0].z is None:
            return cls(None, modes, (modes == elastic.mode_ids[1]).float().mean(dim=(1, 2)))
        zs = [r.z for r in layers]  # Omega keeps the straight-through gradient
        return cls(torch.stack(zs, dim=1), modes, sparsity_ratio(zs), torch.stack([r.logits for r in layers], dim=1))

    def rows(self) -> list["Routing"]:
        """One Routing per row of the batch."""
        def row(x, b):
            return None if x is None else x[b:b + 1]
        return [Routing(row(self.z, b), row(self.modes, b), row(self.omega, b), row(self.logits, b))
                for b in range(self.modes.shape[0])]

    @property
    def margin(self) -> torch.Tensor:
        """[B, L, G] the sparse-minus-full logit margin: how sure each router is, and of what (ours: train.py penalises
        it and reports it against the task class's effect on it)."""
        return self.logits[..., 1] - self.logits[..., 0]


def attend(q, k, v, k_pre, run: Run, i: int):
    """Layer i's attention. q [B, H, T, D], k and v [B, G, T, D] (after RoPE), k_pre [B, T, G, D] (before RoPE;
    what the router reads) -> (y [B, H, T, D], Routed or None). Decode: T = 1, run.pos and run.caches given."""
    cache = run.caches[i] if run.caches is not None else None
    scorer = getattr(run.routers[i], "scorer", None) if run.routers is not None else None
    u = scorer(k_pre) if scorer is not None else None  # SK pairs: one score per key per KV head [B, G, T]
    if run.pos is not None:
        return cache.decode(q, k, v, run.pos, u), None
    routed = None
    if run.modes is not None:
        routed = Routed(run.modes[:, i].to(torch.int32).expand(q.shape[0], -1))  # [1, G] broadcasts over B
    elif run.routers is not None:
        logits = run.routers[i](k_pre, run.prompt_lens)        # [B, G, 2]
        z = route(logits, run.tau)                              # Gumbel ST if tau, else argmax
        routed = Routed(run.elastic.head_modes(z), z, logits)
    if routed is None:
        y = dense_attention(q, k, v)
    elif run.tau is not None:
        y = mixed_attention(q, k, v, routed.z, run.elastic, u)
    else:
        y = routed_attention(q, k, v, routed.modes, run.elastic, u, run.lens)
    if cache is not None:
        cache.prefill(k, v, None if routed is None else routed.modes, u, run.lengths)
    return y, routed


def check_modes(modes, L, G, has_scorers):
    """Fixed modes int [1 or B, L, G] of FA, SSA, XA, or SK (which needs the routers' scorers), checked once per
    forward (Transformer.forward; one host sync), so that no layer's kernel waits for a check."""
    if not isinstance(modes, torch.Tensor) or modes.is_floating_point() or modes.dim() != 3 \
            or tuple(modes.shape[1:]) != (L, G):
        raise ValueError(f"modes must be an integer tensor [B or 1, L={L}, G={G}] of FA=0, SSA=1, XA=2, SK=3; got "
                         f"{tuple(modes.shape) if isinstance(modes, torch.Tensor) else type(modes)}")
    found = set(modes.unique().tolist())
    if found - {FA, SSA, XA, SK}:
        raise ValueError(f"modes must be FA=0, SSA=1, XA=2 or SK=3; got {sorted(found - {FA, SSA, XA, SK})}")
    if SK in found and not has_scorers:
        raise ValueError("modes has SK heads, which need their layer's scorer: load routers of an SK mode pair "
                         "(FA-SK), or use FA, SSA and XA")

# -----------------------------------------------------------------------------
# prefill


def dense_attention(q, k, v):
    """Dense causal attention, q [B, H, T, D], k and v [B, G, T, D] -> [B, H, T, D]. GQA without repeating K/V."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def routed_attention(q, k, v, modes, ec, sk_scores=None, lens=None):
    """Inference prefill: each KV head runs its own mode (modes int [B, G]), all heads in one fused launch.
    On the CPU the PyTorch reference runs instead: the same function (test_kernel.py), without the Triton
    interpreter's slowness. SK heads need sk_scores [B, G, T] (the layer's scorer); when given, the kernel's SK
    selection runs for every KV head of the layer (sk_select), then SK heads run in the same launch.
    lens [B]: the tokens of right-padded rows (Run.lens). The modes come from the routers or were checked once
    per forward (check_modes): the kernel's own check, a host sync per layer, is off."""
    if not q.is_cuda:
        return kernel.reference_attention(q, k, v, modes, sink=ec.sink, window=ec.window, xa_threshold=ec.xa_threshold,
                                          xa_stride=ec.xa_stride, sk_scores=sk_scores, sk_k=ec.sk_k, lengths=lens)
    return kernel.elastic_attention(q, k, v, modes, sink=ec.sink, window=ec.window, xa_threshold=ec.xa_threshold,
                                    xa_stride=ec.xa_stride, sk_scores=sk_scores, sk_k=ec.sk_k, lengths=lens,
                                    check_modes=False)


def mixed_attention(q, k, v, z, ec, sk_scores=None):
    """Training forward (the paper's Gumbel straight-through routing): every head computes its retrieval and its
    sparse branch and O = z[..., 0] * O_retrieval + z[..., 1] * O_sparse; z is one-hot forward, so this equals
    the routed output, while the straight-through gradient reaches the router through z (and, for SK, the
    scorer's gradient through log p; sk_scores [B, G, T])."""
    B, H, G = q.shape[0], q.shape[1], k.shape[1]
    w = z.repeat_interleave(H // G, dim=1).to(q.dtype)[..., None, None]  # [B, H, 2, 1, 1], per query head
    retrieval, sparse = ec.mode_ids
    return (w[:, :, 0] * branch_attention(q, k, v, retrieval, ec, sk_scores)
            + w[:, :, 1] * branch_attention(q, k, v, sparse, ec, sk_scores))


def branch_attention(q, k, v, mode, ec, sk_scores=None):
    """Every head in one mode, differentiable: SDPA for FA; for SSA, XA and SK, FlexAttention with the mode's
    block mask on the GPU (nothing T x T is materialised), the PyTorch reference on the CPU."""
    if mode == FA:
        return dense_attention(q, k, v)
    B, H, T, _ = q.shape
    modes = torch.full(k.shape[:2], mode, dtype=torch.int32, device=q.device)  # [B, G]
    if not q.is_cuda:
        return kernel.reference_attention(q, k, v, modes, sink=ec.sink, window=ec.window, xa_threshold=ec.xa_threshold,
                                          xa_stride=ec.xa_stride, sk_scores=sk_scores, sk_k=ec.sk_k)
    if mode == SK:
        if sk_scores is None:
            raise ValueError("SK heads need scores: routers with a scorer (an SK mode pair such as FA-SK)")
        return sk_flex_attention(q, k, v, sk_scores, sk_k=ec.sk_k, sink=ec.sink, window=ec.window)
    if mode == XA:  # the selection is a discrete choice: no gradient flows through it
        xa_blocks = kernel.xattn_block_mask(q.detach(), k.detach(), stride=ec.xa_stride, threshold=ec.xa_threshold)
        mask = flex_block_mask(modes, H, T, sink=ec.sink, window=ec.window, xa_blocks=xa_blocks)
    else:  # SSA: the same mask in every layer, built once per shape
        mask = ssa_block_mask(B, H, k.shape[1], T, ec.sink, ec.window, q.device)
    return compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=True)


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


@functools.lru_cache(maxsize=16)
def ssa_block_mask(B, H, G, T, sink, window, device):
    modes = torch.full((B, G), SSA, dtype=torch.int32, device=device)
    return flex_block_mask(modes, H, T, sink=sink, window=window)


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
    from torch.nn.attention.flex_attention import BlockMask

    B, H, T, _ = q.shape
    G = k.shape[1]
    group = H // G
    if window % KV_BLOCK:
        raise ValueError(f"SK through FlexAttention needs a window that is a multiple of {KV_BLOCK}, got {window}")
    dev = q.device
    NB = -(-T // KV_BLOCK)
    blocks = torch.arange(NB, device=dev)
    u = u.float()
    pos, u_pool, n = sk_pools(u, k=sk_k, sink=sink, window=window)  # [B, G, NB, P]
    logp, tau = sk_logp(u_pool, n, sk_k, return_tau=True)         # differentiable in u (SPARSEK)
    tau = tau.detach()  # Flex adds log p as a constant; SKLogpGrad brings its gradient
    with torch.no_grad():  # the k-th best candidate of each block (past all when n <= k: every candidate kept)
        last = (n.clamp(max=sk_k) - 1).clamp(min=0).expand(B, G, NB)[..., None]
        kth_u = torch.where(n > sk_k, u_pool.gather(-1, last)[..., 0], float("-inf"))
        kth_j = torch.where(n > sk_k, pos.gather(-1, last)[..., 0], T)
    c = (blocks + 1) * KV_BLOCK - window  # [NB] start of each query block's local span

    u_sel = u.detach()  # the selection is discrete: no gradient through it (nor through the score_mod)

    def selected(b, h, q_idx, kv_idx):
        g, m = h // group, q_idx // KV_BLOCK
        uj, ku = u_sel[b, g, kv_idx], kth_u[b, g, m]
        cand = (kv_idx >= sink) & (kv_idx < c[m])
        return cand & ((uj > ku) | ((uj == ku) & (kv_idx <= kth_j[b, g, m])))

    def mask_mod(b, h, q_idx, kv_idx):
        local = (kv_idx < sink) | (kv_idx >= c[q_idx // KV_BLOCK])
        return (kv_idx <= q_idx) & (local | selected(b, h, q_idx, kv_idx))

    def score_mod(score, b, h, q_idx, kv_idx):
        p = (u_sel[b, h // group, kv_idx] - tau[b, h // group, q_idx // KV_BLOCK]).clamp(SK_P_FLOOR, 1.0)
        return score + torch.where(selected(b, h, q_idx, kv_idx), p.log(), 0.0)

    # blocks: the sink and the local span (whole, except the diagonal and partial ones), the selected keys' blocks
    m = blocks[:, None]
    nn_ = blocks[None, :]
    whole = ((m + 1) * KV_BLOCK <= T) & ((nn_ + 1) * KV_BLOCK <= T)
    local_any = (nn_ <= m) & ((nn_ * KV_BLOCK < sink) | ((nn_ + 1) * KV_BLOCK > c[:, None]))
    local_full = (nn_ < m) & whole & (((nn_ + 1) * KV_BLOCK <= sink) | (nn_ * KV_BLOCK >= c[:, None]))
    with torch.no_grad():
        sel_blocks = torch.zeros(B, G, NB, NB + 1, dtype=torch.bool, device=dev)
        rank_ok = torch.arange(pos.shape[-1], device=dev) < sk_k
        at = torch.where((pos >= 0) & rank_ok, pos // KV_BLOCK, NB)
        sel_blocks = sel_blocks.scatter(-1, at, True)[..., :NB].repeat_interleave(group, dim=1)  # [B, H, NB, NB]
    any_ = local_any | sel_blocks
    full = local_full & ~sel_blocks  # a block with a selected key needs mask_mod (a partial candidate block)

    def as_lists(blocks_):
        counts = blocks_.sum(-1, dtype=torch.int32)
        indices = torch.argsort((~blocks_).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts, indices

    mask = BlockMask.from_kv_blocks(*as_lists(any_ & ~full), *as_lists(full.expand(B, H, NB, NB)), KV_BLOCK,
                                    mask_mod, seq_lengths=(T, T))
    o, aux = (_flex or compiled_flex_attention())(q, k, v, score_mod=score_mod, block_mask=mask, enable_gqa=True,
                                                  **LSE)
    lse = getattr(aux, "lse", aux)  # AuxOutput, or the lse itself (older torch)
    if not logp.requires_grad:
        return o
    K = min(sk_k, pos.shape[-1])  # the pool's first K: the selected keys (log p -inf for none)
    return SKLogpGrad.apply(o, logp[..., :K], lse, q.detach(), k.detach(), v.detach(), pos[..., :K],
                            q.shape[-1] ** -0.5)


try:  # how flex_attention returns the log-sum-exp of each row's scores (natural log)
    from torch.nn.attention.flex_attention import AuxRequest
    LSE = dict(return_aux=AuxRequest(lse=True))
except ImportError:
    LSE = dict(return_lse=True)


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
    pad = NB * KV_BLOCK - T

    def blocked(x, value=0.0):  # [B, H, T, ...] -> [B, G, H / G, NB, 128, ...] fp32, padded past T
        x = F.pad(x.float(), (0, 0, 0, pad) if x.ndim == 4 else (0, pad), value=value)
        return x.view(B, G, H // G, NB, KV_BLOCK, *x.shape[3:])

    qb, dob = blocked(q), blocked(do)
    delta = (dob * blocked(o)).sum(-1)                     # [B, G, H/G, NB, 128]
    lseb = blocked(lse, float("inf"))                      # rows past T: P = 0
    j = idx.clamp(min=0).long().flatten(2)[..., None].expand(-1, -1, -1, D)
    ks, vs = (x.float().gather(2, j).view(B, G, NB, K, D) for x in (k, v))
    out = torch.empty(B, G, NB, K, dtype=torch.float32, device=q.device)
    step = max(1, max_bytes // (4 * B * H * KV_BLOCK * K))
    for a in range(0, NB, step):
        m = slice(a, a + step)
        s = torch.einsum("bgrmqd,bgmkd->bgrmqk", qb[:, :, :, m], ks[:, :, m]) * scale + logp[:, :, None, m, None]
        p = torch.exp(s - lseb[:, :, :, m, :, None])      # -inf log p (no key): 0
        dp = torch.einsum("bgrmqd,bgmkd->bgrmqk", dob[:, :, :, m], vs[:, :, m])
        out[:, :, m] = (p * (dp - delta[:, :, :, m, :, None])).sum((2, 4))
    return out.to(logp.dtype)


# The masks of kernel.py as a FlexAttention BlockMask: the training branch above runs
# flex_attention(q, k, v, block_mask=..., enable_gqa=True), differentiable on the GPU (FlexAttention has a
# backward); bench.py times FlexAttention with the same masks.


def flex_block_mask(modes, H, T, *, sink=128, window=2048, xa_blocks=None):
    """BlockMask (128 x 128 blocks) for modes [B, G] and H query heads; xa_blocks [B, H, nb, nb] is the
    XA selection (e.g. from xattn_block_mask), needed when a mode is XA. Full blocks are marked as
    such, so FlexAttention applies mask_mod only on the edges, as the kernel does."""
    from torch.nn.attention.flex_attention import BlockMask

    B, G = modes.shape
    dev = modes.device
    mode = modes.to(torch.int32).repeat_interleave(H // G, dim=1)  # [B, H]
    NB = -(-T // KV_BLOCK)
    has_xa = xa_blocks is not None  # known without asking the device: no host sync per training layer
    if xa_blocks is None:
        if bool((modes == XA).any()):
            raise ValueError("modes has XA heads: pass their block selection as xa_blocks (xattn_block_mask)")
        xa_blocks = torch.ones(B, H, NB, NB, dtype=torch.bool, device=dev)
    if tuple(xa_blocks.shape) != (B, H, NB, NB):
        raise ValueError(f"xa_blocks must be [B={B}, H={H}, {NB}, {NB}]; got {tuple(xa_blocks.shape)}")
    xa_blocks = xa_blocks.to(device=dev, dtype=torch.bool)

    def mask_mod(b, h, q_idx, kv_idx):
        md = mode[b, h]
        keep = (md == FA) | ((md == SSA) & ((kv_idx < sink) | (q_idx - kv_idx < window)))
        if has_xa:  # a gather per element: only when XA blocks were given
            keep = keep | ((md == XA) & xa_blocks[b, h, q_idx // KV_BLOCK, kv_idx // KV_BLOCK])
        return (kv_idx <= q_idx) & keep

    # which blocks hold some visible pair (any), which hold only visible pairs (full)
    m = torch.arange(NB, device=dev)[:, None]
    n = torch.arange(NB, device=dev)[None, :]
    B_ = KV_BLOCK
    whole = ((m + 1) * B_ <= T) & ((n + 1) * B_ <= T)  # a partial last block is never "full"
    causal_any, causal_full = n <= m, (n < m) & whole
    ssa_any = causal_any & ((n * B_ < sink) | ((m - n) * B_ - (B_ - 1) < window))
    ssa_full = causal_full & (((n + 1) * B_ <= sink) | ((m - n) * B_ + (B_ - 1) < window))
    md = mode[:, :, None, None]
    any_ = torch.where(md == FA, causal_any, torch.where(md == SSA, ssa_any, xa_blocks & causal_any))
    full = torch.where(md == FA, causal_full, torch.where(md == SSA, ssa_full, xa_blocks & causal_full))

    def as_lists(blocks):  # [B, H, NB, NB] bool -> counts [B, H, NB], indices (kept ones first, ascending)
        counts = blocks.sum(-1, dtype=torch.int32)
        indices = torch.argsort((~blocks).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return counts, indices

    return BlockMask.from_kv_blocks(*as_lists(any_ & ~full), *as_lists(full), KV_BLOCK, mask_mod,
                                    seq_lengths=(T, T))

# -----------------------------------------------------------------------------
# decode: the KV cache


class KVCache:
    """One layer's keys and values (after RoPE) while generating B rows: every (row, KV head) owns a segment of
    one flat buffer, k and v [N, D], of `cap` slots starting at `base` (decode_kernel.py says how a segment is
    read and written):
        FA and XA heads  cap = prompt + max_new_tokens: every position;
        SSA heads        cap = sink + window (at most prompt + max_new_tokens): the sinks and a ring of the last
                         `window` positions, so their memory is constant and decoding is token-exact against a
                         full recomputation with the SSA mask (the paper's code keeps a full cache for every head).
        SK heads         the same sink | window ring (its slots before the local span masked by the kernel), then
                         `extra` = sk_k slots of selected keys whose log p the kernel adds (`bias`, per slot).
    The buffers are allocated once, at prefill, for the whole generation; a decode step writes one slot per
    segment and reads the filled ones in one launch of the decode kernel, with no host sync (CUDA graphs).

    SK eviction. A decode step at position p (block m = p // 128) sees the candidates C_m = {sink <= j < c_m},
    c_m = 128 (m + 1) - window; C_m only grows with m, by the 128 keys [c_m - 128, c_m) at each block's first
    query, which are still in the ring then. Scores do not depend on the query, so a key's rank among the
    candidates only drops as they grow: a key outside the best 2k (the SPARSEK pool) or the best k (selected)
    never returns to them. So the cache keeps the k selected keys' K/V and the pool's 2k scores and positions
    (sk_update merges the new block into them), and forgets the rest: at most sink + window + k K/V per SK head,
    and decoding equals a full recomputation under kernel.reference_attention's rule (test_elastic.py)."""

    def __init__(self, max_new_tokens, sink, window, sk_k=256):
        self.max_new_tokens, self.sink, self.window, self.sk_k = max_new_tokens, sink, window, sk_k

    def prefill(self, k, v, modes, sk_scores=None, lengths=None):
        """k, v [B, G, T, D] of B rows of prompt tokens; modes int [B, G] (None: every head FA); sk_scores
        [B, G, T] the scorer's u (needed when a head is SK); lengths: the tokens of each row (Python ints) when the
        rows are right-padded to T (None: all T): a row's segments hold its own tokens only, as if it had been
        prefilled alone. The segment sizes follow the modes: they come to the host, one copy per layer."""
        B, G, T, D = k.shape
        lengths = [T] * B if lengths is None else list(lengths)
        kinds = [FA] * (B * G) if modes is None else modes.reshape(B * G).tolist()  # the segment sizes: host
        n = [lengths[i // G] for i in range(B * G)]                                 # each segment's prompt tokens
        caps = [min(self.sink + self.window, t + self.max_new_tokens) if m in (SSA, SK) else t + self.max_new_tokens
                for m, t in zip(kinds, n)]
        extras = [self.sk_k if m == SK else 0 for m in kinds]
        full = [i for i, m in enumerate(kinds) if m not in (SSA, SK)]
        ssa = [i for i, m in enumerate(kinds) if m == SSA]
        sk = [i for i, m in enumerate(kinds) if m == SK]
        if sk and sk_scores is None:
            raise ValueError("SK heads need their scores at prefill (sk_scores [B, G, T], from the routers' scorer)")
        # memory order: per row, its full segments, then its rings, then its SK segments; so a row's segments of one
        # size lie side by side, a [count, size, D] view for the CPU path of decode (`runs`: row, its (b, g)
        # indices, first slot, cap, extra)
        bases, self.runs, at = [0] * (B * G), [], 0
        for b in range(B):
            for group in ([i for i in full if i // G == b], [i for i in ssa if i // G == b],
                          [i for i in sk if i // G == b]):
                if group:
                    self.runs.append((b, group, at, caps[group[0]], extras[group[0]]))
                for i in group:
                    bases[i], at = at, at + caps[i] + extras[i]
        dev = k.device
        # one copy to the device: the segments' first slots, caps, extras, tokens, and the full, SSA, SK ones in order
        meta = torch.tensor(bases + caps + extras + n + full + ssa + sk).to(dev, non_blocking=True)
        base, cap, extra, n_dev, order = meta.split([B * G] * 5)
        self.k, self.v = k.new_zeros(at, D), v.new_zeros(at, D)
        self.u = torch.zeros(at, dtype=torch.float32, device=dev)     # SK rings: the score of each slot's key
        self.bias = torch.zeros(at, dtype=torch.float32, device=dev)  # SK selected slots: log p (-inf: empty)
        k, v = k.reshape(B * G, T, D), v.reshape(B * G, T, D)
        # positions past a segment's tokens are read as its last token: the same slot, written the same value
        if full:  # positions 0 .. n - 1 in slots 0 .. n - 1
            f = order[:len(full), None]
            j = torch.minimum(torch.arange(T, device=dev), n_dev[f] - 1)                      # [n_full, T]
            self.k[base[f] + j], self.v[base[f] + j] = k[f, j], v[f, j]
        if ssa or sk:  # what the next query sees under SSA: the sinks and the last `window` positions
            r = order[len(full):len(full) + len(ssa) + len(sk), None]
            p, last = torch.arange(self.sink + self.window, device=dev), n_dev[r] - 1
            j = torch.where(p < self.sink, p, last + 1 - self.window + (p - self.sink)).clamp(min=0)
            j = torch.minimum(j, last)                                                        # [n_rings, R]
            at = base[r] + cache_slot(j, cap[r], self.sink, self.window)
            self.k[at], self.v[at] = k[r, j], v[r, j]
            if sk:
                self.u[at[len(ssa):]] = sk_scores.reshape(B * G, T)[r[len(ssa):], j[len(ssa):]].float()
        self.base, self.cap, self.extra = base.int(), cap.int(), extra.int()  # int32: [B*G] tables the kernel reads
        self.n_splits = decode_splits(1 << (max(c + e for c, e in zip(caps, extras)) - 1).bit_length(), DECODE_SPLIT)
        self.rows, self.G = B, G
        # SK state, one row per SK segment: the pool (2k positions, best first, -1 empty, and their scores) as of the
        # block of its last prompt token; its best k are in the selected slots, in rank order
        self.sk_seg = order[len(full) + len(ssa):]
        self.sk_pos = torch.full((len(sk), 2 * self.sk_k), -1, dtype=torch.long, device=dev)
        self.sk_u = torch.zeros(len(sk), 2 * self.sk_k, dtype=torch.float32, device=dev)
        self.sk_block = (n_dev[self.sk_seg] - 1) // KV_BLOCK                              # merged up to
        if sk:
            u = sk_scores.reshape(B * G, T).float()
            last_block = [(n[i] - 1) // KV_BLOCK for i in sk]
            for m in sorted(set(last_block)):  # the pools of the segments whose prompt ends in block m
                rows = [s for s, mb in enumerate(last_block) if mb == m]
                pos, u_pool, _ = sk_pool(u[[sk[s] for s in rows]][None], torch.full((1,), m, device=dev),
                                         k=self.sk_k, sink=self.sink, window=self.window)  # [1, S, 1, P]
                P = pos.shape[-1]
                self.sk_pos[rows, :P], self.sk_u[rows, :P] = pos[0, :, 0], u_pool[0, :, 0]
            top = self.sk_pos[:, :self.sk_k]                                                 # [S, k]
            slots, seg = self._sk_slots(), self.sk_seg[:, None]
            self.k[slots], self.v[slots] = k[seg, top.clamp(min=0)], v[seg, top.clamp(min=0)]
            self._sk_bias()

    def _sk_slots(self):
        """[S, k] the flat slots of the SK segments' selected keys (after their rings)."""
        first = (self.base.long() + self.cap.long())[self.sk_seg]
        return first[:, None] + torch.arange(self.sk_k, device=first.device)

    def _sk_bias(self):
        """The selected slots' log p from the pool (-inf for slots without a key)."""
        n = (self.sk_pos >= 0).sum(-1)
        self.bias[self._sk_slots()] = sk_logp(self.sk_u, n, self.sk_k)[:, :self.sk_k]

    def sk_update(self, pos):
        """Before a decode step at positions pos (int [B], device): at a block's first query (pos % 128 == 0) the
        128 keys [pos - window, pos + 128 - window) past the sink become candidates: merge them (from the ring) into
        the pool, move the new best k's K/V into the selected slots, refresh their log p. Every step runs the same
        operations (a step off the boundary merges nothing): static shapes, no host sync, state updated in place, so
        it is captured in the decode step's CUDA graph. A block is merged once (sk_block), so running a step again at
        the same position (generate's warm-up) changes nothing. What falls out of the pool or the selection is
        forgotten (class docstring)."""
        S, K = len(self.sk_seg), self.sk_k
        if S == 0:
            return
        dev = self.k.device
        seg_base, seg_cap = self.base.long()[self.sk_seg], self.cap.long()[self.sk_seg]   # [S]
        p = pos.to(dev).long()[self.sk_seg // self.G]                                      # [S]
        j = p[:, None] - self.window + torch.arange(KV_BLOCK, device=dev)                 # [S, 128]
        m = p // KV_BLOCK
        ok = (m > self.sk_block)[:, None] & (j >= self.sink)  # a block's first query, not merged yet
        ring_at = seg_base[:, None] + cache_slot(j.clamp(min=0), seg_cap[:, None], self.sink, self.window)
        sel = self._sk_slots()
        cand_pos = torch.cat([self.sk_pos, torch.where(ok, j, -1)], 1)                    # [S, 2k + 128]
        cand_u = torch.cat([self.sk_u, self.u[ring_at]], 1)
        # where each candidate's K/V is now: the pool's best k in the selected slots (the rest of the pool never
        # returns to the best k, so it needs none), the new ones in the ring
        cand_at = torch.cat([sel, sel[:, :1].expand(S, K), ring_at], 1)
        # order: u descending, ties by the earlier position, empty entries last (two stable sorts)
        order = torch.argsort(torch.where(cand_pos >= 0, cand_pos, 1 << 62), dim=1, stable=True)
        key = torch.where(cand_pos >= 0, cand_u, float("-inf")).gather(1, order)
        order = order.gather(1, torch.argsort(key, dim=1, descending=True, stable=True))[:, :2 * K]
        self.sk_pos.copy_(cand_pos.gather(1, order))
        self.sk_u.copy_(cand_u.gather(1, order))
        self.sk_block.copy_(torch.maximum(self.sk_block, m))
        src = cand_at.gather(1, order[:, :K])
        self.k[sel], self.v[sel] = self.k[src], self.v[src]  # gathered first (a copy), then written
        self._sk_bias()

    @classmethod
    def cat(cls, caches):
        """The rows of several prefilled caches of one layer, in order, as one cache (each prompt is prefilled
        alone; then all decode together). The inputs' buffers are copied once and can be freed."""
        if len(caches) == 1:
            return caches[0]
        c0 = caches[0]
        out = cls(c0.max_new_tokens, c0.sink, c0.window, c0.sk_k)
        offsets = list(itertools.accumulate([c.k.shape[0] for c in caches[:-1]], initial=0))  # first slot of each
        for name in ("k", "v", "u", "bias", "cap", "extra", "sk_pos", "sk_u", "sk_block"):
            setattr(out, name, torch.cat([getattr(c, name) for c in caches]))
        out.base = torch.cat([c.base + o for c, o in zip(caches, offsets)])
        out.n_splits = max(c.n_splits for c in caches)
        out.G = c0.G
        out.runs, rows, segs = [], 0, []
        for c, o in zip(caches, offsets):
            out.runs += [(b + rows, [i + rows * c.G for i in group], at + o, cap, extra)
                         for b, group, at, cap, extra in c.runs]
            segs.append(c.sk_seg + rows * c.G)
            rows += c.rows
        out.sk_seg = torch.cat(segs)
        out.rows = rows
        return out

    def decode(self, q, k, v, pos, u=None):
        """One new token per row at positions pos (int [B], on the device): q [B, H, 1, D], k and v [B, G, 1, D]
        -> [B, H, 1, D]; u [B, G, 1] the new keys' SK scores (needed when a head is SK). The decode kernel on the
        GPU; on the CPU the same rule (decode_attention_reference, the definition) by runs of equal segments, each a
        view of the buffer: no gather, a few SDPA calls per layer."""
        if len(self.sk_seg):
            if u is None:
                raise ValueError("SK heads need the new keys' scores (u [B, G, 1], from the routers' scorer)")
            self.sk_update(pos)  # before the new key overwrites the ring slot of position pos - window
            B, G = u.shape[:2]
            p = pos.to(self.k.device).long().repeat_interleave(G)
            self.u[self.base.long() + cache_slot(p, self.cap.long(), self.sink, self.window)] = u.reshape(B * G).float()
        if q.is_cuda:
            y = decode_attention_op(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.k, self.v, self.base, self.cap, pos,
                                    self.sink, self.window, self.n_splits, DECODE_SPLIT, self.extra, self.bias)
            return y[:, :, None]
        B, H, _, D = q.shape
        G = k.shape[1]
        q = q.reshape(B * G, H // G, D)  # [B*G, H/G, D]: a group's query heads share its keys
        k, v = k.reshape(B * G, D), v.reshape(B * G, D)
        y = torch.empty_like(q)
        for b, group, at, cap, extra in self.runs:
            p = int(pos[b])
            slot = p if p < cap else self.sink + (p - self.sink) % self.window
            size = cap + extra
            keys = self.k[at:at + len(group) * size].view(len(group), size, D)
            values = self.v[at:at + len(group) * size].view(len(group), size, D)
            keys[:, slot], values[:, slot] = k[group], v[group]
            n = min(p + 1, cap)
            if not extra:
                y[group] = F.scaled_dot_product_attention(q[group], keys[:, :n], values[:, :n])
                continue
            # SK: the ring's sinks and local span (age <= p - c_m), then the selected slots with their log p
            s = torch.arange(n)
            age = (slot - s) % self.window
            local = (s < self.sink) | (age <= p - ((p // KV_BLOCK + 1) * KV_BLOCK - self.window))
            bias = torch.cat([torch.where(local, 0.0, float("-inf")).expand(len(group), n),
                              self.bias[at:at + len(group) * size].view(len(group), size)[:, cap:]], 1)
            idx = torch.cat([s, torch.arange(cap, size)])
            y[group] = F.scaled_dot_product_attention(q[group], keys[:, idx], values[:, idx],
                                                      attn_mask=bias[:, None].to(q.dtype))
        return y.reshape(B, H, 1, D)

    def nbytes(self, row=None):
        """Bytes of keys and values held, for all rows or one."""
        sizes = self.cap + self.extra
        sizes = sizes.view(self.rows, -1)[row] if row is not None else sizes
        return 2 * int(sizes.sum()) * self.k.shape[1] * self.k.element_size()
