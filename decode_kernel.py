"""
Elastic Attention's decode kernel: one new token per row attends its KV cache, every KV head in the mode its
prefill gave it (FA, SSA, XA), all (row, KV head) pairs in one Triton launch, with its PyTorch reference.

The cache (attention.KVCache) gives every (row, KV head) a segment of one flat buffer per layer, [N, D] for keys
and the same for values. A segment has `cap` slots and starts at `base`:
    FA and XA heads  cap = prompt + new tokens: position j lives in slot j;
    SSA heads        cap = sink + window (or less for a short run): the sinks stay put, the other positions
                     cycle through the `window` slots after them, so at position p the segment holds exactly
                     the keys an SSA query sees (j < sink or p - j < window), token-exact.
So one rule serves every mode: write the new key at slot(p) = p if p < cap else sink + (p - sink) % window,
then attend the n = min(p + 1, cap) filled slots. The order of the keys in a segment does not matter to a
softmax; the mode is only in `cap`.
    SK heads         the same ring, plus `selected` (= sk_k) slots after it holding the keys SparseK selected,
                     whose log p (`logp`, one float per slot of the flat buffer, -inf for an empty slot) is added to
                     their logits; of the ring only the sinks and the local span count: a slot whose key is `age`
                     positions old is read iff age <= p - c_m, c_m = sparsek.span_start(p // 128). sparsek.SKCache
                     keeps the selected slots.

At B = 1 with GQA there are only a handful of (row, KV head) pairs: one program each would leave an H200's 132
multiprocessors idle and read the cache at a quarter of its bandwidth. So each segment is split along its length
into chunks of `split` slots (flash-decoding), one program per (row, KV head, chunk) from a work list that names
each segment's own chunks (decode_work: an SSA ring of 2K slots beside 32K-token FA heads gets its few, not as many
as the longest). The length is chosen per cache (decode_split) so that all chunks run in one wave of programs of
about equal work. Each program keeps an online softmax over its chunk and writes (max, sum, partial output); a
second kernel merges the chunks (when one chunk covers every segment, the first writes the output itself and the
second is not launched; a merge inside the split kernel, by each segment's last chunk to finish, was slower on an
H100: RESULTS.md). A group's query heads share each K/V tile (GQA native, one tl.dot of [GROUP, D] x [D, BLOCK_N]).
Positions are read on the device and the work list is fixed at prefill: a step has no host sync and static shapes, so
it can be captured once in a CUDA graph and replayed (generate.py).

    pytest test_kernel.py -k decode      # CPU (Triton's interpreter, which the tests turn on) and, with CUDA, GPU
    python bench.py --decode             # the kernel alone against SDPA's flash decode, on the GPU
    python bench_model.py --model configs/llama-3.1-8b.json   # a whole decode step against dense ones, on the GPU
"""
import math

import torch
import triton
import triton.language as tl

from sparsek import BLOCK, span_start, tl_span_start

_BLOCK = tl.constexpr(BLOCK)

# -----------------------------------------------------------------------------
# 1. The reference: plain PyTorch, fp32 math. The definition the kernel is tested against; the model uses it on
# the CPU.


def cache_slot(pos, cap, sink, window):
    """Slot of position pos in a segment of cap slots: FA/XA heads never wrap; SSA rings keep the sinks."""
    return torch.where(pos < cap, pos, sink + (pos - sink) % window)


def decode_attention_reference(q, k_new, v_new, k_cache, v_cache, base, cap, pos, *, sink, window, sm_scale=None,
                               selected=None, logp=None):
    """One decode step of B rows. q [B, H, D]; k_new, v_new [B, G, D]; k_cache, v_cache [N, D] (written in
    place); base, cap [B * G] int (the segment of row b, KV head g at index b * G + g); pos [B] int (the
    position of the new token of each row). Writes the new keys and values at slot(pos), then every query head
    attends the min(pos + 1, cap) filled slots of its group's segment -> o [B, H, D].
    SK segments (selected [B * G] > 0, logp [N] fp32): of the ring only the sinks and the local span, plus the
    `selected` slots after the ring with their log p added (module docstring)."""
    B, H, D = q.shape
    G = k_new.shape[1]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    p = pos.to(base.device, torch.long).repeat_interleave(G)                 # [B*G] the row's position
    base, cap = base.long(), cap.long()
    at = base + cache_slot(p, cap, sink, window)                             # [B*G]
    k_cache[at] = k_new.reshape(B * G, D).to(k_cache.dtype)
    v_cache[at] = v_new.reshape(B * G, D).to(v_cache.dtype)
    n = torch.minimum(p + 1, cap)                                            # [B*G] filled slots
    selected = torch.zeros_like(cap) if selected is None else selected.long()
    j = torch.arange(int((n + selected).max()), device=base.device)         # a host sync: the reference only
    ring = j < n[:, None]                                                    # [B*G, n_max]
    slot = torch.where(ring, j, cap[:, None] + j - n[:, None])               # ring slots, then the selected ones
    idx = (base[:, None] + slot).clamp(max=k_cache.shape[0] - 1)            # [B*G, n_max]
    filled = j < (n + selected)[:, None]
    age = (cache_slot(p, cap, sink, window)[:, None] - slot) % window
    local = (slot < sink) | (age <= (p - span_start(p // BLOCK, window))[:, None])
    filled = filled & ((selected[:, None] == 0) | ~ring | local)
    add = torch.zeros(idx.shape, device=base.device)
    if logp is not None:
        add = torch.where(ring, 0.0, logp[idx].float())
    filled = filled[..., None]                                               # [B*G, n_max, 1]
    k = torch.where(filled, k_cache[idx].float(), 0.0)                       # [B*G, n_max, D]; slots past
    v = torch.where(filled, v_cache[idx].float(), 0.0)                       # n may hold anything
    s = q.reshape(B * G, H // G, D).float() @ k.transpose(1, 2) * scale      # [B*G, H/G, n_max]
    s = s + torch.where(filled[..., 0], add, 0.0)[:, None]
    s = s.masked_fill(~filled.transpose(1, 2), float("-inf"))
    return (s.softmax(-1) @ v).reshape(B, H, D).to(q.dtype)

# -----------------------------------------------------------------------------
# 2. The kernels


@triton.jit
def _decode_split_kernel(
    Q, KNew, VNew, KC, VC, Base, Cap, Pos, Selected, Logp, Work, MOut, LOut, AccOut, O,
    stride_qb, stride_qh, stride_nb, stride_ng, stride_ob, stride_oh,
    G, GROUP, N_SPLITS, SPLIT, sink, window, qk_scale,
    D: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT: tl.constexpr,
    LISTED: tl.constexpr,
):
    # program -> (row b and KV head g, chunk s of the segment): from the work list (the chunks each segment can
    # fill, no program for chunks past a short ring), or every (b, g) with every chunk of the longest segment
    if LISTED:
        item = tl.load(Work + tl.program_id(0))
    else:
        item = tl.program_id(0)
    bg = item // N_SPLITS
    s = item % N_SPLITS
    b = bg // G
    g = bg % G
    pos = tl.load(Pos + b)
    cap = tl.load(Cap + bg)
    base = tl.load(Base + bg).to(tl.int64)
    n_sel = tl.load(Selected + bg)                                     # SK: selected slots after the ring
    n = tl.minimum(pos + 1, cap)                                       # filled slots once the new key is in
    slot_new = tl.where(pos < cap, pos, sink + (pos - sink) % window)
    local = pos - tl_span_start(pos // _BLOCK, window)                 # SK: the oldest ring key it reads (age)
    offs_h = tl.arange(0, GROUP_P2)                                    # the group's query heads (padded)
    offs_d = tl.arange(0, D)
    h_ok = offs_h < GROUP
    # a chunk past the filled slots (an SSA ring beside long FA ones, without a work list; an FA segment's slots
    # for tokens still to come) reads and writes nothing: the merge counts each segment's own chunks (chunk 0,
    # with the new token, always has work)
    busy = tl.zeros([GROUP_P2], tl.int32) + s * SPLIT < n + n_sel     # [GROUP_P2], all alike
    q = tl.load(Q + b.to(tl.int64) * stride_qb + (g * GROUP + offs_h)[:, None] * stride_qh + offs_d[None, :],
                mask=(h_ok & busy)[:, None], other=0.0)                # [GROUP_P2, D]
    m_i = tl.full([GROUP_P2], -float("inf"), tl.float32)               # running max (log2 units)
    l_i = tl.zeros([GROUP_P2], tl.float32)                             # running sum of exp2(score - m_i)
    acc = tl.zeros([GROUP_P2, D], tl.float32)
    if s == 0:
        # the new token: chunk 0 writes it into its slot and counts it from its registers; every program skips
        # that slot when reading (it held a key that just left the window, or nothing), so no program reads a
        # slot while it is written
        kn = tl.load(KNew + b.to(tl.int64) * stride_nb + g * stride_ng + offs_d)
        vn = tl.load(VNew + b.to(tl.int64) * stride_nb + g * stride_ng + offs_d)
        tl.store(KC + (base + slot_new) * D + offs_d, kn)
        tl.store(VC + (base + slot_new) * D + offs_d, vn)
        m_i = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * qk_scale
        l_i = tl.full([GROUP_P2], 1.0, tl.float32)
        acc = tl.zeros([GROUP_P2, D], tl.float32) + vn.to(tl.float32)[None, :]
    # the chunk's filled slots, a BLOCK_N tile at a time, online softmax as in flash attention; a segment's
    # slots in order: the n ring slots, then its n_sel selected slots (SK)
    lo = s * SPLIT
    hi = tl.minimum(lo + SPLIT, n + n_sel)
    for start_n in range(lo, hi, BLOCK_N):
        offs_v = start_n + tl.arange(0, BLOCK_N)
        ring = offs_v < n
        sel = offs_v >= n                                              # the selected slots (SK)
        offs_n = tl.where(ring, offs_v, cap + offs_v - n)              # the slot
        age = (slot_new - offs_n + window) % window
        keep = (offs_v < hi) & (offs_n != slot_new)
        sk_keep = sel | (offs_n < sink) | (age <= local)
        keep = keep & (sk_keep | (tl.zeros_like(offs_v) + n_sel == 0))
        k = tl.load(KC + (base + offs_n)[None, :] * D + offs_d[:, None], mask=keep[None, :], other=0.0)  # [D, BN]
        logp = tl.load(Logp + base + offs_n, mask=keep & sel, other=0.0) * 1.4426950408889634  # log2 units
        qk = tl.dot(q, k) * qk_scale + logp[None, :]                   # [GROUP_P2, BLOCK_N]
        qk = tl.where(keep[None, :], qk, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)          # a chunk may hold nothing yet
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(VC + (base + offs_n)[:, None] * D + offs_d[None, :], mask=keep[:, None], other=0.0)  # [BN, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    if DIRECT:  # one chunk covers every segment: its softmax is the whole one, and no merge is needed
        o = acc / l_i[:, None]                                         # l_i >= 1 term: the new token's
        rows = b.to(tl.int64) * stride_ob + (g * GROUP + offs_h)[:, None] * stride_oh
        tl.store(O + rows + offs_d[None, :], o.to(O.dtype.element_ty), mask=h_ok[:, None])
    else:
        out = bg.to(tl.int64) * N_SPLITS + s                           # this chunk's partial results
        written = busy & h_ok                                          # the real heads, the ones the merge reads
        tl.store(MOut + out * GROUP_P2 + offs_h, m_i, mask=written)
        tl.store(LOut + out * GROUP_P2 + offs_h, l_i, mask=written)
        tl.store(AccOut + (out * GROUP_P2 + offs_h)[:, None] * D + offs_d[None, :], acc, mask=written[:, None])


@triton.jit
def _decode_merge_kernel(MOut, LOut, AccOut, O, Cap, Pos, Selected, stride_ob, stride_oh, G, GROUP, N_SPLITS, SPLIT,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_P2: tl.constexpr, S_P2: tl.constexpr,
                         BLOCK_S: tl.constexpr):
    # program -> BLOCK_D dims of one query head: merge its chunks' (max, sum, partial output) into softmax(q K^T) V.
    # Split along D, so that the merge of a long segment's hundred chunks is many short programs, not a few long ones
    bg = tl.program_id(0)
    h = tl.program_id(1)
    b = bg // G
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    first = bg.to(tl.int64) * N_SPLITS                                 # this head's first chunk
    n = tl.minimum(tl.load(Pos + b) + 1, tl.load(Cap + bg)) + tl.load(Selected + bg)
    chunks = (n + SPLIT - 1) // SPLIT                                  # the chunks of this segment that ran
    offs_s = tl.arange(0, S_P2)
    ok = offs_s < chunks
    m = tl.load(MOut + (first + offs_s) * GROUP_P2 + h, mask=ok, other=-float("inf"))
    l = tl.load(LOut + (first + offs_s) * GROUP_P2 + h, mask=ok, other=0.0)
    m_max = tl.max(m, 0)                                               # finite: chunk 0 holds the new token
    denom = tl.sum(tl.where(ok, tl.math.exp2(m - m_max), 0.0) * l, 0)
    o = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, chunks, BLOCK_S):  # the partial outputs, BLOCK_S chunks at a time (registers)
        offs = s0 + tl.arange(0, BLOCK_S)
        ok_s = offs < chunks
        rows = (first + offs) * GROUP_P2 + h
        w = tl.where(ok_s, tl.math.exp2(tl.load(MOut + rows, mask=ok_s, other=-float("inf")) - m_max), 0.0)
        part = tl.load(AccOut + rows[:, None] * D + offs_d[None, :], mask=ok_s[:, None], other=0.0)  # [BLOCK_S, BD]
        o += tl.sum(part * w[:, None], 0)
    head = (bg % G) * GROUP + h
    tl.store(O + b.to(tl.int64) * stride_ob + head * stride_oh + offs_d, (o / denom).to(O.dtype.element_ty))

# -----------------------------------------------------------------------------
# 3. The wrapper


DECODE_PROGRAMS = 2  # per multiprocessor in a wave: with the default tile, 2 beat 1, 3, 4 and 8 on an H100


def decode_wave(device):
    """The programs of one wave on this device: DECODE_PROGRAMS per multiprocessor (1 multiprocessor off the GPU,
    where KVCache decodes through the reference and the plan only feeds the tests)."""
    device = torch.device(device)
    n_sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return DECODE_PROGRAMS * n_sm


def decode_split(sizes, programs, multiple=64):
    """Slots per chunk for segments of these sizes (cap + selected slots, Python ints): the shortest length, a
    multiple of `multiple` (the kernel's tile), whose chunks number at most `programs` (whole rounds of it when the
    segments alone outnumber it). With `programs` one wave (decode_wave), every program reads about as much and all
    run together. A fixed length does not fit: at B = 1 and Omega 0.7, 1024 slots make 84 programs at 32K tokens for
    an H100's 264 (132 multiprocessors, 2 each), and 276 at 128K, a second wave of 12."""
    programs *= triton.cdiv(len(sizes), programs)

    def chunks(split):
        return sum(triton.cdiv(size, split) for size in sizes)
    lo, hi = triton.cdiv(sum(sizes), programs * multiple), triton.cdiv(max(sizes), multiple)  # in tiles
    while lo < hi:  # the fewest tiles per chunk with chunks(.) <= programs; chunks(hi) = len(sizes) fits
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if chunks(mid * multiple) > programs else (lo, mid)
    return lo * multiple


def decode_splits(max_cap, split):
    """Chunks per segment for a cache whose longest segment has max_cap slots: fixed for a generate() call."""
    return triton.cdiv(max_cap, split)


def decode_work(sizes, n_splits, split):
    """The work list of a cache whose segments (b * G + g in order) have these sizes (cap + selected slots, Python
    ints): every chunk a segment can fill, each as b * G * n_splits + g * n_splits + chunk. At B = 1, 32K tokens and
    Omega 0.7 most KV heads are rings of sink + window slots: a grid over the longest segment would be mostly
    programs with nothing to do."""
    return [i * n_splits + s for i, size in enumerate(sizes) for s in range(triton.cdiv(size, split))]


def decode_attention(q, k_new, v_new, k_cache, v_cache, base, cap, pos, *, sink, window, n_splits, split=None,
                     sm_scale=None, out=None, selected=None, logp=None, work=None, _config=None):
    """The kernel version of decode_attention_reference (same arguments, same result), in two launches (one when
    a single chunk covers every segment: n_splits == 1).
    n_splits: chunks per segment, decode_splits(max(cap + selected), split), passed in so that the launch needs nothing
    from the device (CUDA graphs); split: slots per chunk (default 512 on the GPU, 64 in the interpreter).
    work: int32 [n] on the device, the programs to run, each b * G * n_splits + g * n_splits + chunk (decode_work):
    with it a short segment beside long ones gets no program for chunks it never fills; None: every chunk of every
    segment, B * G * n_splits programs. fp16 / bf16 (fp32 for the CPU tests); D a power of two >= 16."""
    B, H, D = q.shape
    G = k_new.shape[1]
    if k_new.shape != (B, G, D) or v_new.shape != (B, G, D) or H % G:
        raise ValueError(f"q [B, H, D] and k_new, v_new [B, G, D] with H % G == 0; got q {tuple(q.shape)}, "
                         f"k_new {tuple(k_new.shape)}, v_new {tuple(v_new.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[1] != D or not k_cache.is_contiguous() \
            or not v_cache.is_contiguous():
        raise ValueError(f"k_cache and v_cache must be contiguous [N, D={D}]; got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if base.shape != (B * G,) or cap.shape != (B * G,) or pos.shape != (B,):
        raise ValueError(f"base, cap must be [B*G={B * G}] and pos [B={B}]; got {tuple(base.shape)}, "
                         f"{tuple(cap.shape)}, {tuple(pos.shape)}")
    if q.stride(-1) != 1:
        raise ValueError(f"q must be contiguous in its last dim, got strides {q.stride()}")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head dim D={D} must be a power of two >= 16")
    split = split or (512 if q.is_cuda else 64)
    # the merge's programs take 32 dims of a query head and 64 chunks a step: at B = 1 on an H100 one layer's FA-SSA
    # attention took 60.4 us instead of 66.1 at 128K, 21.7 instead of 26.2 at 32K, with all 128 dims and 16 chunks
    cfg = {"BLOCK_N": 64, "NUM_WARPS": 4, "NUM_STAGES": 3 if q.is_cuda else 1, "MERGE_BLOCK_D": 32, "MERGE_BLOCK_S": 64,
           **(_config or {})}  # bench.py --decode
    block_n = min(cfg["BLOCK_N"], split)
    group_p2 = max(16, triton.next_power_of_2(H // G))  # tl.dot needs 16 rows
    scale = (sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)) * math.log2(math.e)
    dev = q.device
    direct = n_splits == 1
    parts = 1 if direct else B * G * n_splits * group_p2  # the chunks' partial results, for the merge
    m = torch.empty(parts, device=dev, dtype=torch.float32)
    l = torch.empty_like(m)
    acc = torch.empty(parts, D, device=dev, dtype=torch.float32)
    if k_new.stride(-1) != 1 or v_new.stride(1) != k_new.stride(1) or v_new.stride(0) != k_new.stride(0):
        k_new, v_new = k_new.contiguous(), v_new.contiguous()
    if selected is None:  # no SK segment: nothing after the rings, logp never read
        selected = torch.zeros_like(cap)
        logp = torch.zeros(1, device=dev, dtype=torch.float32)
    elif logp is None or logp.shape != (k_cache.shape[0],) or logp.dtype != torch.float32 \
            or selected.shape != cap.shape:
        raise ValueError(f"with selected [B*G] (SK segments) pass logp, fp32 [N={k_cache.shape[0]}]")
    listed = work is not None
    if listed and (work.dtype != torch.int32 or work.dim() != 1 or work.device != q.device):
        raise ValueError(f"work must be int32 [n] on {q.device} (decode_work); got {work.dtype} "
                         f"{tuple(work.shape)} on {work.device}")
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    _decode_split_kernel[(work.numel() if listed else B * G * n_splits,)](
        q, k_new, v_new, k_cache, v_cache, base, cap, pos, selected, logp, work if listed else base, m, l, acc, out,
        q.stride(0), q.stride(1), k_new.stride(0), k_new.stride(1), out.stride(0), out.stride(1),
        G, H // G, n_splits, split, sink, window, scale,
        D=D, GROUP_P2=group_p2, BLOCK_N=block_n, DIRECT=direct, LISTED=listed,
        num_warps=cfg["NUM_WARPS"], num_stages=cfg["NUM_STAGES"])
    if direct:
        return out
    block_d = min(D, cfg["MERGE_BLOCK_D"])
    _decode_merge_kernel[(B * G, H // G, D // block_d)](
        m, l, acc, out, cap, pos, selected, out.stride(0), out.stride(1), G, H // G, n_splits, split,
        D=D, BLOCK_D=block_d, GROUP_P2=group_p2, S_P2=max(2, triton.next_power_of_2(n_splits)),
        BLOCK_S=cfg["MERGE_BLOCK_S"], num_warps=4)
    return out


# -----------------------------------------------------------------------------
# 4. The kernel as a torch operator, so that torch.compile (generate.py, compile=True) keeps it as one opaque call
# and fuses what lies around it (norms, RoPE, residuals) instead of tracing into the wrapper.

@torch.library.custom_op("elastic::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention_op(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                        v_cache: torch.Tensor, base: torch.Tensor, cap: torch.Tensor, pos: torch.Tensor,
                        sink: int, window: int, n_splits: int, split: int, selected: torch.Tensor | None = None,
                        logp: torch.Tensor | None = None, work: torch.Tensor | None = None) -> torch.Tensor:
    return decode_attention(q, k_new, v_new, k_cache, v_cache, base, cap, pos, sink=sink, window=window,
                            n_splits=n_splits, split=split, selected=selected, logp=logp, work=work)


@decode_attention_op.register_fake
def _(q, k_new, v_new, k_cache, v_cache, base, cap, pos, sink, window, n_splits, split, selected=None, logp=None,
      work=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
