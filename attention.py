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
from kernel import FA, KV_BLOCK, SSA, XA
from router import ElasticConfig, route, sparsity_ratio

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
    """
    elastic: ElasticConfig
    routers: object = None
    modes: torch.Tensor | None = None
    tau: float | None = None
    prompt_lens: torch.Tensor | None = None
    caches: list | None = None
    pos: torch.Tensor | None = None


class Routed(NamedTuple):
    """What the KV heads of one layer ran at prefill."""
    modes: torch.Tensor                # [B, G] kernel mode ids
    z: torch.Tensor | None = None      # [B, G, 2] router decisions (straight-through in training); None: given modes
    logits: torch.Tensor | None = None  # [B, G, 2] the router's logits (differentiable in training)


@dataclass
class Routing:
    """What the heads of a whole forward ran (Transformer.forward(return_routing=True))."""
    z: torch.Tensor | None  # [B, L, G, 2] router decisions (straight-through in training); None for given modes
    modes: torch.Tensor     # [B, L, G] the kernel mode (FA, SSA, XA) of every KV head
    omega: torch.Tensor     # [B] model sparsity ratio: share of KV heads in the sparse mode
    logits: torch.Tensor | None = None  # [B, L, G, 2] the routers' logits (differentiable); None for given modes

    @classmethod
    def stack(cls, layers: list[Routed], elastic: ElasticConfig) -> "Routing":
        modes = torch.stack([r.modes for r in layers], dim=1)  # [B, L, G]
        if layers[0].z is None:
            return cls(None, modes, (modes == elastic.mode_ids[1]).float().mean(dim=(1, 2)))
        zs = [r.z for r in layers]  # Omega keeps the straight-through gradient
        return cls(torch.stack(zs, dim=1), modes, sparsity_ratio(zs), torch.stack([r.logits for r in layers], dim=1))

    @property
    def margin(self) -> torch.Tensor:
        """[B, L, G] the sparse-minus-full logit margin: how sure each router is, and of what (ours: train.py penalises
        it and reports it against the task class's effect on it)."""
        return self.logits[..., 1] - self.logits[..., 0]


def attend(q, k, v, k_pre, run: Run, i: int):
    """Layer i's attention. q [B, H, T, D], k and v [B, G, T, D] (after RoPE), k_pre [B, T, G, D] (before RoPE;
    what the router reads) -> (y [B, H, T, D], Routed or None). Decode: T = 1, run.pos and run.caches given."""
    cache = run.caches[i] if run.caches is not None else None
    if run.pos is not None:
        return cache.decode(q, k, v, run.pos), None
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
        y = mixed_attention(q, k, v, routed.z, run.elastic)
    else:
        y = routed_attention(q, k, v, routed.modes, run.elastic)
    if cache is not None:
        cache.prefill(k, v, None if routed is None else routed.modes)
    return y, routed

# -----------------------------------------------------------------------------
# prefill


def dense_attention(q, k, v):
    """Dense causal attention, q [B, H, T, D], k and v [B, G, T, D] -> [B, H, T, D]. GQA without repeating K/V."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def routed_attention(q, k, v, modes, ec):
    """Inference prefill: each KV head runs its own mode (modes int [B, G]), all heads in one fused launch.
    On the CPU the PyTorch reference runs instead: the same function (test_kernel.py), without the Triton
    interpreter's slowness."""
    fn = kernel.elastic_attention if q.is_cuda else kernel.reference_attention
    return fn(q, k, v, modes, sink=ec.sink, window=ec.window, xa_threshold=ec.xa_threshold, xa_stride=ec.xa_stride)


def mixed_attention(q, k, v, z, ec):
    """Training forward (the paper's Gumbel straight-through routing): every head computes its retrieval and its
    sparse branch and O = z[..., 0] * O_retrieval + z[..., 1] * O_sparse; z is one-hot forward, so this equals
    the routed output, while the straight-through gradient reaches the router through z."""
    B, H, G = q.shape[0], q.shape[1], k.shape[1]
    w = z.repeat_interleave(H // G, dim=1).to(q.dtype)[..., None, None]  # [B, H, 2, 1, 1], per query head
    retrieval, sparse = ec.mode_ids
    return w[:, :, 0] * branch_attention(q, k, v, retrieval, ec) + w[:, :, 1] * branch_attention(q, k, v, sparse, ec)


def branch_attention(q, k, v, mode, ec):
    """Every head in one mode, differentiable: SDPA for FA; for SSA and XA, FlexAttention with the mode's
    block mask on the GPU (nothing T x T is materialised), the PyTorch reference on the CPU."""
    if mode == FA:
        return dense_attention(q, k, v)
    B, H, T, _ = q.shape
    modes = torch.full(k.shape[:2], mode, dtype=torch.int32, device=q.device)  # [B, G]
    if not q.is_cuda:
        return kernel.reference_attention(q, k, v, modes, sink=ec.sink, window=ec.window,
                                          xa_threshold=ec.xa_threshold, xa_stride=ec.xa_stride)
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
    The buffers are allocated once, at prefill, for the whole generation; a decode step writes one slot per
    segment and reads the filled ones in one launch of the decode kernel, with no host sync (CUDA graphs)."""

    def __init__(self, max_new_tokens, sink, window):
        self.max_new_tokens, self.sink, self.window = max_new_tokens, sink, window

    def prefill(self, k, v, modes):
        """k, v [B, G, T, D] of B rows of T prompt tokens; modes int [B, G] (None: every head FA)."""
        B, G, T, D = k.shape
        kinds = [FA] * (B * G) if modes is None else modes.reshape(B * G).tolist()  # the segment sizes: host
        ring = min(self.sink + self.window, T + self.max_new_tokens)
        caps = [ring if m == SSA else T + self.max_new_tokens for m in kinds]
        full = [i for i, m in enumerate(kinds) if m != SSA]
        ssa = [i for i, m in enumerate(kinds) if m == SSA]
        # memory order: per row, its full segments, then its rings; so a row's segments of one size lie side by
        # side, a [count, cap, D] view for the CPU path of decode (`runs`: row, its (b, g) indices, first slot, cap)
        bases, self.runs, at = [0] * (B * G), [], 0
        for b in range(B):
            for group in ([i for i in full if i // G == b], [i for i in ssa if i // G == b]):
                if group:
                    self.runs.append((b, group, at, caps[group[0]]))
                for i in group:
                    bases[i], at = at, at + caps[i]
        self.k, self.v = k.new_zeros(sum(caps), D), v.new_zeros(sum(caps), D)
        k, v = k.reshape(B * G, T, D), v.reshape(B * G, T, D)
        j = torch.arange(T, device=k.device)
        if full:  # positions 0 .. T-1 in slots 0 .. T-1
            at = torch.tensor([bases[i] for i in full], device=k.device)[:, None] + j   # [n_full, T]
            self.k[at], self.v[at] = k[full], v[full]
        if ssa:  # what the next query sees under SSA: the sinks and the last `window` positions
            j = j[(j < self.sink) | (T - 1 - j < self.window)]
            at = torch.tensor([bases[i] for i in ssa], device=k.device)[:, None] + cache_slot(j, ring, self.sink,
                                                                                              self.window)
            self.k[at], self.v[at] = k[ssa][:, j], v[ssa][:, j]
        self.base = torch.tensor(bases, dtype=torch.int32, device=k.device)  # int32: a [B*G] table the kernel reads
        self.cap = torch.tensor(caps, dtype=torch.int32, device=k.device)
        self.n_splits = decode_splits(1 << (max(caps) - 1).bit_length(), DECODE_SPLIT)  # a power of two: few graphs
        self.rows = B

    @classmethod
    def cat(cls, caches):
        """The rows of several prefilled caches of one layer, in order, as one cache (each prompt is prefilled
        alone; then all decode together). The inputs' buffers are copied once and can be freed."""
        if len(caches) == 1:
            return caches[0]
        out = cls(caches[0].max_new_tokens, caches[0].sink, caches[0].window)
        offsets = list(itertools.accumulate([c.k.shape[0] for c in caches[:-1]], initial=0))  # first slot of each
        out.k, out.v = torch.cat([c.k for c in caches]), torch.cat([c.v for c in caches])
        out.base = torch.cat([c.base + o for c, o in zip(caches, offsets)])
        out.cap = torch.cat([c.cap for c in caches])
        out.n_splits = max(c.n_splits for c in caches)
        out.runs, rows = [], 0
        for c, o in zip(caches, offsets):
            out.runs += [(b + rows, [i + rows * len(c.base) // c.rows for i in group], at + o, cap)
                         for b, group, at, cap in c.runs]
            rows += c.rows
        out.rows = rows
        return out

    def decode(self, q, k, v, pos):
        """One new token per row at positions pos (int [B], on the device): q [B, H, 1, D], k and v [B, G, 1, D]
        -> [B, H, 1, D]. The decode kernel on the GPU; on the CPU the same rule (decode_attention_reference, the
        definition) by runs of equal segments, each a view of the buffer: no gather, a few SDPA calls per layer."""
        if q.is_cuda:
            y = decode_attention_op(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.k, self.v, self.base, self.cap, pos,
                                    self.sink, self.window, self.n_splits, DECODE_SPLIT)
            return y[:, :, None]
        B, H, _, D = q.shape
        G = k.shape[1]
        q = q.reshape(B * G, H // G, D)  # [B*G, H/G, D]: a group's query heads share its keys
        k, v = k.reshape(B * G, D), v.reshape(B * G, D)
        y = torch.empty_like(q)
        for b, group, at, cap in self.runs:
            p = int(pos[b])
            slot = p if p < cap else self.sink + (p - self.sink) % self.window
            keys = self.k[at:at + len(group) * cap].view(len(group), cap, D)
            values = self.v[at:at + len(group) * cap].view(len(group), cap, D)
            keys[:, slot], values[:, slot] = k[group], v[group]
            n = min(p + 1, cap)
            y[group] = F.scaled_dot_product_attention(q[group], keys[:, :n], values[:, :n])
        return y.reshape(B, H, 1, D)

    def nbytes(self, row=None):
        """Bytes of keys and values held, for all rows or one."""
        caps = self.cap.view(self.rows, -1)[row] if row is not None else self.cap
        return 2 * int(caps.sum()) * self.k.shape[1] * self.k.element_size()
