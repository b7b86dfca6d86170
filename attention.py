"""
How one layer's attention runs in Elastic Attention (arXiv 2601.17367): the plug-in point between the backbone
(model.py), the routers (router.py) and the kernels (kernel.py).

model.Attention computes q, k, v and the pre-RoPE keys and hands them to `attend`, with the `Forward` that says what
this forward is (prefill or decode, fixed modes or routers, training or inference). `attend` then
    at prefill   routes the layer's KV heads (the router reads the pre-RoPE keys; or the mode table is given),
                 runs dense attention (no routing), the fused kernel (routed inference), or the training mix
                 of both branches (Gumbel straight-through), and fills the KV cache;
    at decode    attends one new token against the cache, every head in the mode of its prefill,
and returns the output with a record of what the heads ran (`LayerRouting`); Transformer.forward stacks the
records of all layers into a `Routing`. Nothing here keeps state between forwards except the KV cache,
which the caller owns and passes in (`Forward.caches`, one per layer). SK heads (SparseK, sparsek.py) meet this
file in three calls: the scorer's u, sparsek.sk_flex_attention in training, sparsek.SKCache in the cache.

    pytest test_elastic.py          # routing, the training mix, decode against recomputation
"""
import functools
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

import kernel
import xattn
from decode_kernel import cache_slot, decode_attention_op, decode_split, decode_splits, decode_wave, decode_work
from kernel import FA, KV_BLOCK, SK, SSA, XA
from router import ElasticConfig, route, sparsity_ratio
from sparsek import SKCache, sk_flex_attention


# -----------------------------------------------------------------------------
# what a forward is, and what a layer reports back


@dataclass
class Forward:
    """What every layer of one forward needs besides its own weights (built by Transformer.forward).

    elastic:     how routed heads run (mode pair, SSA sink and window, XA threshold)
    routers:     router.Routers, one per layer, or None
    modes:       int [B, L, G] (or [1, L, G] for every row) fixed modes instead of the routers', or None
    tau:         Gumbel temperature: training (both branches run, mixed by the sampled z); None: inference
    prompt_lens: [B] the prompt span of each row that the routers pool (None: all T tokens)
    caches:      one KVCache per layer while generating, or None
    pos:         int [B] on the device: the position of each row's token in a decode step (None: a prefill)
    lengths:     a prefill of rows of several lengths, right-padded to T: the tokens of each row, as Python ints
                 (for the caches) and as lengths_device, int32 [B] on the device (for XA's estimate); None: all T
    has_xa:      whether the fixed modes hold an XA head (check_modes); None: the routers' mode pair tells
    """
    elastic: ElasticConfig
    routers: object = None
    modes: torch.Tensor | None = None
    tau: float | None = None
    prompt_lens: torch.Tensor | None = None
    caches: list | None = None
    pos: torch.Tensor | None = None
    lengths: list | None = None
    lengths_device: torch.Tensor | None = None
    has_xa: bool | None = None


class LayerRouting(NamedTuple):
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
    def stack(cls, layers: list[LayerRouting], elastic: ElasticConfig) -> "Routing":
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


def attend(q, k, v, k_pre, fwd: Forward, i: int):
    """Layer i's attention. q [B, H, T, D], k and v [B, G, T, D] (after RoPE), k_pre [B, T, G, D] (before RoPE;
    what the router reads) -> (y [B, H, T, D], LayerRouting or None). Decode: T = 1, fwd.pos and fwd.caches given."""
    cache = fwd.caches[i] if fwd.caches is not None else None
    scorer = getattr(fwd.routers[i], "scorer", None) if fwd.routers is not None else None
    u = scorer(k_pre) if scorer is not None else None  # SK pairs: one score per key per KV head [B, G, T]
    if fwd.pos is not None:
        return cache.decode(q, k, v, fwd.pos, u), None
    routed = None
    if fwd.modes is not None:
        routed = LayerRouting(fwd.modes[:, i].to(torch.int32).expand(q.shape[0], -1))  # [1, G] broadcasts over B
    elif fwd.routers is not None:
        logits = fwd.routers[i](k_pre, fwd.prompt_lens)        # [B, G, 2]
        z = route(logits, fwd.tau)                              # Gumbel ST if tau, else argmax
        routed = LayerRouting(fwd.elastic.head_modes(z), z, logits)
    if routed is None:
        y = dense_attention(q, k, v)
    elif fwd.tau is not None:
        y = mixed_attention(q, k, v, routed.z, fwd.elastic, u)
    else:
        y = routed_attention(q, k, v, routed.modes, fwd.elastic, u, fwd.lengths_device, fwd.has_xa)
    if cache is not None:
        cache.prefill(k, v, None if routed is None else routed.modes, u, fwd.lengths)
    return y, routed


def check_modes(modes, L, G, has_scorers):
    """Fixed modes int [1 or B, L, G] of FA, SSA, XA, or SK (which needs the routers' scorers), checked once per
    forward (Transformer.forward; one host sync), so that no layer's kernel waits for a check. -> whether a head
    runs XA (without, the prefill kernel packs a GQA group's query heads: kernel.packed_heads)."""
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
    return XA in found

# -----------------------------------------------------------------------------
# prefill


def dense_attention(q, k, v):
    """Dense causal attention, q [B, H, T, D], k and v [B, G, T, D] -> [B, H, T, D]. GQA without repeating K/V."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def routed_attention(q, k, v, modes, ec, sk_scores=None, lengths=None, has_xa=None):
    """Inference prefill: each KV head runs its own mode (modes int [B, G]), all heads in one fused launch.
    On the CPU the PyTorch reference runs instead: the same function (test_kernel.py), without the Triton
    interpreter's slowness. SK heads need sk_scores [B, G, T] (the layer's scorer); when given, the kernel's SK
    selection runs for every KV head of the layer (sk_select), then SK heads run in the same launch.
    lengths int32 [B]: the tokens of right-padded rows (Forward.lengths_device). has_xa: whether a head may run XA
    (fixed modes: check_modes tells); None: whether the routers' pair holds XA (ec.mode_ids). The modes come from
    the routers or were checked once per forward (check_modes): the kernel's own check, a host sync per layer, is
    off."""
    if not q.is_cuda:
        return kernel.reference_attention(q, k, v, modes, sink=ec.sink, window=ec.window, xa_threshold=ec.xa_threshold,
                                          xa_stride=ec.xa_stride, sk_scores=sk_scores, sk_k=ec.sk_k, lengths=lengths)
    def run(q, k, v):
        return kernel.elastic_attention(q, k, v, modes, sink=ec.sink, window=ec.window, xa_threshold=ec.xa_threshold,
                                        xa_stride=ec.xa_stride, sk_scores=sk_scores, sk_k=ec.sk_k, lengths=lengths,
                                        check_modes=False, has_xa=XA in ec.mode_ids if has_xa is None else has_xa)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, sk_scores)):
        return ForwardOnly.apply(q, k, v, sk_scores, run)  # a backward through it raises: no gradient silently lost
    return run(q, k, v)


class ForwardOnly(torch.autograd.Function):
    """The fused prefill kernel where autograd is on: its output as it is, and a clear error if a backward reaches
    it (the kernel has none; training runs mixed_attention)."""

    @staticmethod
    def forward(ctx, q, k, v, sk_scores, run):  # sk_scores: only so that a gradient asked of them reaches backward
        return run(q, k, v)

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("the fused prefill kernel has no backward: train through the routers' mix (a Gumbel "
                           "tau, attention.mixed_attention), or run fixed modes under torch.no_grad()")


def mixed_attention(q, k, v, z, ec, sk_scores=None):
    """Training forward (the paper's Gumbel straight-through routing): every head computes its retrieval and its
    sparse branch and O = z[..., 0] * O_retrieval + z[..., 1] * O_sparse; z is one-hot forward, so this equals
    the routed output, while the straight-through gradient reaches the router through z (and, for SK, the
    scorer's gradient through log p; sk_scores [B, G, T])."""
    H, G = q.shape[1], k.shape[1]
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
        xa_blocks = xattn.xattn_block_mask(q.detach(), k.detach(), stride=ec.xa_stride, threshold=ec.xa_threshold)
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


def _runs(segments):
    """[(i, j)]: the runs segments[i:j] of consecutive numbers in an ascending list."""
    ends = [i for i in range(1, len(segments)) if segments[i] != segments[i - 1] + 1]
    return list(zip([0] + ends, ends + [len(segments)]))


class KVCache:
    """One layer's keys and values (after RoPE) while generating B rows: every (row, KV head) owns a segment of
    one flat buffer, k and v [N, D], of `cap` slots starting at `base` (decode_kernel.py says how a segment is
    read and written):
        FA and XA heads  cap = prompt + max_new_tokens: every position;
        SSA heads        cap = sink + window (at most prompt + max_new_tokens): the sinks and a ring of the last
                         `window` positions, so their memory is constant and decoding is token-exact against a
                         full recomputation with the SSA mask (the paper's code keeps a full cache for every head).
        SK heads         the same ring, then `selected` = sk_k slots for the keys SparseK selects (sparsek.SKCache,
                         which keeps them: `sk`).
    The buffers are allocated once, at prefill, for the whole generation; a decode step writes one slot per
    segment and reads the filled ones in one launch of the decode kernel, with no host sync (CUDA graphs)."""

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
        selected = [self.sk_k if m == SK else 0 for m in kinds]
        full = [i for i, m in enumerate(kinds) if m not in (SSA, SK)]
        ssa = [i for i, m in enumerate(kinds) if m == SSA]
        sk = [i for i, m in enumerate(kinds) if m == SK]
        if sk and sk_scores is None:
            raise ValueError("SK heads need their scores at prefill (sk_scores [B, G, T], from the routers' scorer)")
        bases, N = self._layout(B, G, (full, ssa, sk), caps, selected)
        self.sizes = [c + e for c, e in zip(caps, selected)]
        dev = k.device
        # one copy to the device: the segments' first slots, caps, selected slots, tokens, the full, SSA, SK ones
        meta = torch.tensor(bases + caps + selected + n + full + ssa + sk).to(dev, non_blocking=True)
        base, cap, sel, tokens, order = meta.split([B * G] * 5)
        self.k, self.v = k.new_zeros(N, D), v.new_zeros(N, D)
        k, v = k.reshape(B * G, T, D), v.reshape(B * G, T, D)
        for b, segments, first, size, _ in self.groups:
            if kinds[segments[0]] in (SSA, SK):
                continue
            # full segments: positions 0 .. n - 1 in slots 0 .. n - 1, a row's neighbouring heads in one strided copy
            for r0, r1 in _runs(segments):
                seg = slice(segments[r0], segments[r0] + r1 - r0)
                for cache, x in ((self.k, k), (self.v, v)):
                    cache[first + r0 * size:first + r1 * size].view(r1 - r0, size, D)[:, :lengths[b]] = \
                        x[seg, :lengths[b]]
        r = order[len(full):, None]  # the rings (SSA, then SK): what the next query sees under SSA, the sinks
        p, last = torch.arange(self.sink + self.window, device=dev), tokens[r] - 1  # and the last `window` positions
        j = torch.where(p < self.sink, p, last + 1 - self.window + (p - self.sink)).clamp(min=0)
        j = torch.minimum(j, last)                                                          # [n_rings, R]
        at = base[r] + cache_slot(j, cap[r], self.sink, self.window)
        self.k[at], self.v[at] = k[r, j], v[r, j]
        self.base, self.cap, self.selected = base.int(), cap.int(), sel.int()  # int32: [B*G] tables the kernel reads
        self.rows, self.G = B, G
        self._plan(dev)
        self.sk = SKCache(N, order[len(full) + len(ssa):], self.sk_k, self.sink, self.window, dev)
        self.sk.prefill(self, None if sk_scores is None else sk_scores.reshape(B * G, T).float(), k, v, tokens,
                        at[len(ssa):], j[len(ssa):])

    def _layout(self, B, G, kinds, caps, selected):
        """Memory order: per row, its full segments, then its SSA rings, then its SK segments, so that a row's
        segments of one size lie side by side: a [count, size, D] view for the CPU path of decode (`groups`: row,
        its segments' b * G + g, first slot, cap, selected slots). -> (each segment's first slot, N slots in all)"""
        bases, self.groups, at = [0] * (B * G), [], 0
        for b in range(B):
            for segments in ([i for i in kind if i // G == b] for kind in kinds):
                if segments:
                    self.groups.append((b, segments, at, caps[segments[0]], selected[segments[0]]))
                for i in segments:
                    bases[i], at = at, at + caps[i] + selected[i]
        return bases, at

    def _plan(self, dev):
        """The decode kernel's chunks, fixed for the generation: `split` slots each, at most one wave of programs
        over all segments (decode_wave), and the work list of the chunks each segment can fill."""
        self.split = decode_split(self.sizes, decode_wave(dev))
        self.n_splits = decode_splits(max(self.sizes), self.split)
        self.work = torch.tensor(decode_work(self.sizes, self.n_splits, self.split), dtype=torch.int32, device=dev)

    def slots(self, j, segments=None):
        """The flat slots of positions j in the segments (b * G + g; all B * G when None), broadcast against j."""
        base, cap = self.base.long(), self.cap.long()
        if segments is not None:
            base, cap = base[segments], cap[segments]
        return base + cache_slot(j, cap, self.sink, self.window)

    @classmethod
    def cat(cls, caches):
        """The rows of several prefilled caches of one layer, in order, as one cache (each prompt is prefilled
        alone; then all decode together). The inputs' buffers are copied once and can be freed."""
        if len(caches) == 1:
            return caches[0]
        c0 = caches[0]
        out = cls(c0.max_new_tokens, c0.sink, c0.window, c0.sk_k)
        offsets = list(itertools.accumulate([c.k.shape[0] for c in caches[:-1]], initial=0))  # first slot of each
        rows = list(itertools.accumulate([c.rows for c in caches[:-1]], initial=0))          # first row of each
        for name in ("k", "v", "cap", "selected"):
            setattr(out, name, torch.cat([getattr(c, name) for c in caches]))
        out.base = torch.cat([c.base + o for c, o in zip(caches, offsets)])
        out.groups = [(b + r, [i + r * c.G for i in segments], at + o, cap, sel)
                      for c, o, r in zip(caches, offsets, rows) for b, segments, at, cap, sel in c.groups]
        out.sk = SKCache.cat([c.sk for c in caches], rows, c0.G)
        out.sizes = [size for c in caches for size in c.sizes]
        out.rows, out.G = sum(c.rows for c in caches), c0.G
        out._plan(c0.k.device)  # chunks for all the rows together
        return out

    def decode(self, q, k, v, pos, u=None):
        """One new token per row at positions pos (int [B], on the device): q [B, H, 1, D], k and v [B, G, 1, D]
        -> [B, H, 1, D]; u [B, G, 1] the new keys' SK scores (needed when a head is SK). The decode kernel on the
        GPU; on the CPU the same rule (decode_attention_reference, the definition) by groups of equal segments, each
        a view of the buffer: no gather, a few SDPA calls per layer."""
        if len(self.sk.seg):
            if u is None:
                raise ValueError("SK heads need the new keys' scores (u [B, G, 1], from the routers' scorer)")
            self.sk.update(self, pos, u)  # before the new key overwrites the ring slot of position pos - window
        if q.is_cuda:
            y = decode_attention_op(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.k, self.v, self.base, self.cap, pos,
                                    self.sink, self.window, self.n_splits, self.split, self.selected, self.sk.logp,
                                    self.work)
            return y[:, :, None]
        B, H, _, D = q.shape
        G = k.shape[1]
        q = q.reshape(B * G, H // G, D)  # [B*G, H/G, D]: a group's query heads share its keys
        k, v = k.reshape(B * G, D), v.reshape(B * G, D)
        y = torch.empty_like(q)
        for b, segments, at, cap, sel in self.groups:
            p = int(pos[b])
            slot = p if p < cap else self.sink + (p - self.sink) % self.window
            size = cap + sel
            keys = self.k[at:at + len(segments) * size].view(len(segments), size, D)
            values = self.v[at:at + len(segments) * size].view(len(segments), size, D)
            keys[:, slot], values[:, slot] = k[segments], v[segments]
            n = min(p + 1, cap)
            if not sel:
                y[segments] = F.scaled_dot_product_attention(q[segments], keys[:, :n], values[:, :n])
                continue
            idx, mask = self.sk.mask(p, slot, n, cap, at, len(segments))  # SK: the ring's sinks and local span,
            y[segments] = F.scaled_dot_product_attention(q[segments], keys[:, idx], values[:, idx],  # the selected
                                                         attn_mask=mask[:, None].to(q.dtype))
        return y.reshape(B, H, 1, D)

    def nbytes(self, row=None):
        """Bytes of keys and values held, for all rows or one."""
        sizes = self.cap + self.selected
        sizes = sizes.view(self.rows, -1)[row] if row is not None else sizes
        return 2 * int(sizes.sum()) * self.k.shape[1] * self.k.element_size()
