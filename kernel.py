"""
Elastic Attention's fused prefill kernel (arXiv 2601.17367: one kernel runs retrieval and sparse heads in
one launch, each thread block reading its head's mode): full (FA), streaming (SSA), XAttention (XA) and
SparseK (SK) heads, in Triton, with its PyTorch reference. The modes and their numbers are written down in
docs/design.md (Attention modes).

Each KV head of each batch element has a mode (FA = 0, SSA = 1, XA = 2, SK = 3), shared by its query heads:
- FA:  query i sees every key j <= i.
- SSA: query i sees key j <= i iff j < sink or i - j < window (token-exact).
- XA:  query i sees key j <= i iff the 128 x 128 block (i // 128, j // 128) was selected by the
       XAttention estimate (arXiv 2503.16428; defined in xattn.py): antidiagonal scores of 16 x 16 cells,
       softmax per row, summed into block scores, then per block row the sink block, the diagonal block and
       the highest-scoring blocks until their mass reaches `xa_threshold` of the row. The estimate runs first
       (xattn.xattn_estimate: two Triton kernels) and hands the kernel each block row's kept blocks as a list.
- SK:  (SparseK, arXiv 2406.16747; defined in sparsek.py) query i in 128-query block m sees the sink, its local
       span c_m <= j <= i with c_m = sparsek.span_start(m) = 128 (m + 1) - window, and the sk_k best-scoring
       earlier keys by a per-key score, whose logits get + log p (p from SPARSEK). The selection runs first
       (sparsek.sk_select: a sort, two small Triton kernels).

Read top to bottom, in the order of the Triton tutorial (06-fused-attention): 1. the reference (the
definition), 2. the attention kernel and its wrapper, 3. the launch schedule, 4. a quick self-check. XA's
selection (its reference and its Triton estimate) lives in xattn.py, with the input checks of q and k; SK's rule and
its selection (sk_select) live in sparsek.py, beside the SPARSEK operator; this file's reference and kernel use them.
The FlexAttention equivalents of these masks live in attention.py, next to the training code that uses them.

    pytest test_kernel.py        # CPU (Triton's interpreter, which the tests turn on) and, with CUDA, the GPU
    python bench.py              # GPU: timings against SDPA and FlexAttention -> bench_results.md
    python kernel.py             # quick check against the reference (GPU; on a CPU: TRITON_INTERPRET=1)

Importing this file does nothing but define things. On a machine without CUDA the kernels run only in
Triton's interpreter, which must be chosen before Python imports Triton: `TRITON_INTERPRET=1 python ...`.
(In the interpreter a tl.dot on bf16 operands is wrong: use fp32 or fp16 there.)
"""

import math

import torch
import triton
import triton.language as tl

import sparsek
import xattn
from sparsek import sk_bias_reference, sk_select, tl_candidates, tl_span_start
from xattn import NEG, check_qk, check_xa_args, xattn_block_mask, xattn_block_mask_reference, xattn_estimate

FA, SSA, XA, SK = 0, 1, 2, 3  # the modes' numbers; xattn.py gets XA from here (xattn_estimate's xa)
KV_BLOCK = 128  # the method's block: XA selects 128 x 128 blocks; SK selects per block of 128 queries
assert KV_BLOCK == sparsek.BLOCK == xattn.BLOCK

# the same numbers as constants the kernels can read
_SSA = tl.constexpr(SSA)
_XA = tl.constexpr(XA)
_SK = tl.constexpr(SK)
_KV_BLOCK = tl.constexpr(KV_BLOCK)
_LOG2E = tl.constexpr(1.4426950408889634)  # log p in the kernel's log2 units

def _expand_kv(x, H):
    """[B, G, T, D] -> [B, H, T, D]: each KV head repeated for its H // G query heads (reference only)."""
    return x.repeat_interleave(H // x.shape[1], dim=1)


# -----------------------------------------------------------------------------
# 1. The reference: plain PyTorch, fp32 math. This is the definition the kernels are tested against.

def attention_mask_reference(modes, H, T, *, sink=128, window=2048, xa_blocks=None):
    """The token mask [B, H, T, T] (bool) of every query head, from modes [B, G]."""
    B, G = modes.shape
    mode = modes.repeat_interleave(H // G, dim=1)[:, :, None, None]  # [B, H, 1, 1]
    i = torch.arange(T, device=modes.device)[:, None]
    j = torch.arange(T, device=modes.device)[None, :]
    causal = j <= i
    ssa = causal & ((j < sink) | (i - j < window))
    mask = torch.where(mode == SSA, ssa, causal)
    if xa_blocks is not None:
        xa = xa_blocks.repeat_interleave(KV_BLOCK, -1).repeat_interleave(KV_BLOCK, -2)[..., :T, :T] & causal
        mask = torch.where(mode == XA, xa, mask)
    return mask


def reference_attention(q, k, v, modes, *, sink=128, window=2048, xa_threshold=0.9, xa_stride=16,
                        sm_scale=None, xa_blocks=None, sk_scores=None, sk_k=256, lengths=None):
    """Elastic attention in plain PyTorch (fp32 math, differentiable in q, k, v) -> o [B, H, T, D].

    q [B, H, T, D]; k, v [B, G, T, D]; modes [B, G] with values FA, SSA, XA, SK. xa_blocks: an XA block
    selection [B, H, nb, nb] to use instead of computing it (the tests pass the kernel's own selection,
    checked separately, so that a block on the threshold's edge cannot flip between the two).
    sk_scores [B, G, T]: the scorer's u (sparsek.Scorer), needed when a head is SK (differentiable: gradients
    reach the scorer through log p); sk_k its budget. SK is defined by sparsek.sk_bias_reference.
    lengths [B]: the tokens of each row, right padding past them (elastic_attention): XA estimates each row
    on its own tokens.
    """
    B, H, T, D = q.shape
    modes = modes.to(q.device)
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)
    if xa_blocks is None and bool((modes == XA).any()):
        with torch.no_grad():
            if lengths is None:
                xa_blocks = xattn_block_mask_reference(q, k, stride=xa_stride, threshold=xa_threshold)
            else:  # each row on its own tokens; the blocks past them keep every causal block
                nb = triton.cdiv(T, KV_BLOCK)
                xa_blocks = torch.ones(nb, nb, dtype=torch.bool, device=q.device).tril().repeat(B, H, 1, 1)
                for b, n in enumerate(torch.as_tensor(lengths).tolist()):
                    m = triton.cdiv(n, KV_BLOCK)
                    xa_blocks[b, :, :m, :m] = xattn_block_mask_reference(
                        q[b:b + 1, :, :n], k[b:b + 1, :, :n], stride=xa_stride, threshold=xa_threshold)[0]
    mask = attention_mask_reference(modes, H, T, sink=sink, window=window, xa_blocks=xa_blocks)
    s = (q.float() @ _expand_kv(k, H).float().transpose(-1, -2)) * scale  # [B, H, T, T]
    if bool((modes == SK).any()):
        if sk_scores is None:
            raise ValueError("modes has SK heads: pass their scores as sk_scores [B, G, T] (sparsek.Scorer)")
        bias = _expand_kv(sk_bias_reference(sk_scores, T, k=sk_k, sink=sink, window=window), H)  # [B, H, T, T]
        sk = (modes == SK).repeat_interleave(H // modes.shape[1], dim=1)[:, :, None, None]
        s = torch.where(sk, s + bias, s)
        mask = torch.where(sk, bias > float("-inf"), mask)
    p = s.masked_fill(~mask, float("-inf")).softmax(-1)
    return (p @ _expand_kv(v, H).float()).to(q.dtype)


# -----------------------------------------------------------------------------
# 2. The attention kernel.
#
# A program owns BLOCK_M queries [start_m, start_m + BLOCK_M) of HEADS query heads of one KV group (its rows:
# HEADS x BLOCK_M, head by head) and visits its key tiles (BLOCK_N keys each) in two loops. With HEADS > 1 (GQA
# packed) each K/V tile loaded serves HEADS times the rows: the heads of a group share the mode and the keys.
# XA's block lists are per query head, so a launch where any head may run XA takes one head per program.
# Only tiles where the queries disagree on some key pay for a mask:
#   masked     SSA, SK: the sink [0, sink_hi) and the window's (local span's) lower edge [edge_lo, full_lo);
#              every mode: the diagonal [diag_lo, diag_hi), causal (and the end of the sequence);
#              SK: its block's selected keys, gathered BLOCK_N at a time (sk_select's idx), + log p
#   unmasked   FA: every earlier key [0, diag_lo); SSA, SK: inside the window [full_lo, diag_lo);
#              XA: the selected 128-key blocks before the diagonal, from a compact list
# Work is proportional to the tiles visited; a mode's other ranges are empty loops. A query tile lies in one
# 128-query block (BLOCK_M divides 128), so SK's local span start and selection are the same for all its rows.
# With SPLIT (rows enough for two halves that each stack the warps along their rows: the packed launches) the rows
# are two halves a and b, so that one half's softmax runs while the other's matrix products are on the tensor cores
# (_attn_tile; compiled schedule in RESULTS.md).

@triton.jit
def _key_ranges(mode, start_m, T, sink, window, sk_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The ranges (token offsets) for query tile [start_m, start_m + BLOCK_M), and the number of SK keys
    selected for it. Works on scalars (the attention kernel) and on vectors (the scheduler), so both count
    the same tiles."""
    is_ssa, is_xa, is_sk = mode == _SSA, mode == _XA, mode == _SK
    local = is_ssa | is_sk
    # XA's diagonal is the whole 128-key block that holds the tile's queries
    diag_lo = tl.where(is_xa, start_m // _KV_BLOCK * _KV_BLOCK, start_m)
    diag_hi = tl.minimum(start_m + BLOCK_M, T)
    # SSA: the first query of the tile sees back to start_m - window + 1; the last query sees every key
    # from start_m + BLOCK_M - window on. Between the two the queries disagree: the edge. SK: every query
    # of the tile sees from c = 128 (m + 1) - window on (its 128-query block m); an edge only if c is not
    # a multiple of BLOCK_N.
    c = tl_span_start(start_m // _KV_BLOCK, window)
    edge_lo = tl.maximum(tl.where(is_sk, c, start_m - window + 1), 0) // BLOCK_N * BLOCK_N
    edge_lo = tl.minimum(edge_lo, diag_lo)
    full_lo = (tl.maximum(tl.where(is_sk, c, start_m + BLOCK_M - window), 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, edge_lo), diag_lo)
    sink_hi = tl.minimum((sink + BLOCK_N - 1) // BLOCK_N * BLOCK_N, edge_lo)  # the sink, below the window
    sink_hi = tl.where(local, sink_hi, 0)
    edge_lo = tl.where(local, edge_lo, tl.where(is_xa, diag_lo, 0))  # FA: all from 0; XA: the list
    full_lo = tl.where(local, full_lo, edge_lo)
    # SK: the best min(k, n) of the n candidates sink <= j < c (the selection's rows hold them first)
    n_sel = tl.where(is_sk, tl.minimum(tl_candidates(start_m // _KV_BLOCK, T, sink, window), sk_k), 0)
    return sink_hi, edge_lo, full_lo, diag_lo, diag_hi, n_sel


@triton.jit
def _softmax_tile(qk, m_i, l_i, cols, offs_m, T, sink, local_lo, bias, qk_scale, MASKED: tl.constexpr,
                  BIASED: tl.constexpr):
    """Scores qk = q k^T of one tile (keys at positions cols) -> p = exp2(logit - new row max), the factor alpha
    that rescales what was summed before, and the updated row sum and max (online softmax, log2 units). Masked:
    query i keeps key j <= i, j < T, if j < sink or j >= local_lo[i], with the logit + bias (SK's log p; 0
    elsewhere). Unmasked: every query keeps every key, with + bias if BIASED."""
    if MASKED:
        keep = (cols[None, :] <= offs_m[:, None]) & (cols[None, :] < T)
        keep = keep & ((cols[None, :] < sink) | (cols[None, :] >= local_lo[:, None]))
        qk = tl.where(keep, qk * qk_scale + bias, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_ij[:, None]
    elif BIASED:
        qk = qk * qk_scale + bias
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        qk = qk - m_ij[:, None]
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
    p = tl.math.exp2(qk)
    alpha = tl.math.exp2(m_i - m_ij)  # the running max grew from m_i to m_ij: rescale what was summed so far
    return p, alpha, l_i * alpha + tl.sum(p, 1), m_ij


@triton.jit
def _attn_tile(acc_a, l_a, m_a, acc_b, l_b, m_b, q_a, q_b, k_base, v_base, cols, offs_m_a, offs_m_b, offs_d,
               T, sink, local_lo_a, local_lo_b, bias, qk_scale, stride_kt, stride_vt, MASKED: tl.constexpr,
               BIASED: tl.constexpr, SPLIT: tl.constexpr):
    """One tile of BLOCK_N keys (positions cols: consecutive, or SK's selected keys, T for none) for the program's
    two halves of rows, a and b: both halves' scores, then a's softmax and P @ V, then b's. The P @ V of half a
    runs on the tensor cores while b's softmax runs (independent rows): with one block of rows, the tensor cores
    wait for each tile's whole softmax. Without SPLIT, half a holds every row and b is not touched."""
    if MASKED:
        k = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None], mask=cols[None, :] < T, other=0.0)
    else:
        k = tl.load(k_base + cols[None, :] * stride_kt + offs_d[:, None])  # [D, BLOCK_N]
    qk_a = tl.dot(q_a, k)
    if SPLIT:
        qk_b = tl.dot(q_b, k)
    p, alpha, l_a, m_a = _softmax_tile(qk_a, m_a, l_a, cols, offs_m_a, T, sink, local_lo_a, bias, qk_scale,
                                       MASKED, BIASED)
    if MASKED:
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :], mask=cols[:, None] < T, other=0.0)
    else:
        v = tl.load(v_base + cols[:, None] * stride_vt + offs_d[None, :])
    acc_a = tl.dot(p.to(v.dtype), v, acc_a * alpha[:, None])
    if SPLIT:
        p, alpha, l_b, m_b = _softmax_tile(qk_b, m_b, l_b, cols, offs_m_b, T, sink, local_lo_b, bias, qk_scale,
                                           MASKED, BIASED)
        acc_b = tl.dot(p.to(v.dtype), v, acc_b * alpha[:, None])
    return acc_a, l_a, m_a, acc_b, l_b, m_b


@triton.jit
def _elastic_attn_fwd(
    Q, K, V, O, Modes, Order, Count, Index, SkIdx, SkLogp,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    T, NQB, NB, H, G, GROUP, sink, window, sk_k, qk_scale,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr, HAS_XA: tl.constexpr,
    HAS_SK: tl.constexpr, SPLIT: tl.constexpr,
):
    # program -> work item (b, heads h..h + HEADS - 1, m) from the list, sorted by cost: the heaviest start first
    item = tl.load(Order + tl.program_id(0))
    m = (item % NQB).to(tl.int32)
    bh = (item // NQB).to(tl.int32) * HEADS  # b * H + h, h the first of the program's heads
    b = bh // H
    h = bh % H
    g = h // GROUP  # GQA: the KV head is read in place, never repeated
    mode = tl.load(Modes + b * G + g)
    start_m = m * BLOCK_M
    # the program's HEADS x BLOCK_M rows, head by head, in two halves a and b (_attn_tile); without SPLIT all in a
    HALF: tl.constexpr = HEADS * BLOCK_M // 2 if SPLIT else HEADS * BLOCK_M
    rows_a = tl.arange(0, HALF)
    rows_b = HALF + rows_a  # (SPLIT only)
    offs_m_a = start_m + rows_a % BLOCK_M  # each row's query position
    offs_m_b = start_m + rows_b % BLOCK_M
    heads_a = (h + rows_a // BLOCK_M).to(tl.int64)
    heads_b = (h + rows_b // BLOCK_M).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k_base = K + b.to(tl.int64) * stride_kb + g.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + g.to(tl.int64) * stride_vh
    q_base = Q + b.to(tl.int64) * stride_qb + offs_d[None, :]
    q_a = tl.load(q_base + heads_a[:, None] * stride_qh + offs_m_a[:, None] * stride_qt, mask=offs_m_a[:, None] < T,
                  other=0.0)
    q_b = q_a  # (SPLIT only)
    if SPLIT:
        q_b = tl.load(q_base + heads_b[:, None] * stride_qh + offs_m_b[:, None] * stride_qt,
                      mask=offs_m_b[:, None] < T, other=0.0)

    m_a = tl.full([HALF], NEG, tl.float32)  # running row max (log2 units); finite: no NaN
    l_a = tl.zeros([HALF], tl.float32)      # running row sum of exp2(score - m)
    acc_a = tl.zeros([HALF, D], tl.float32)  # running p @ v
    m_b = tl.full([HALF], NEG, tl.float32)
    l_b = tl.zeros([HALF], tl.float32)
    acc_b = tl.zeros([HALF, D], tl.float32)

    sink_hi, edge_lo, full_lo, diag_lo, diag_hi, n_sel = _key_ranges(mode, start_m, T, sink, window, sk_k,
                                                                     BLOCK_M, BLOCK_N)
    # where each query's local keys start: SSA its window, SK its block's local span; FA and XA: key 0
    c = tl_span_start(start_m // _KV_BLOCK, window)
    local_lo_a = tl.where(mode == _SSA, offs_m_a - window + 1, tl.where(mode == _SK, c, 0))
    local_lo_b = tl.where(mode == _SSA, offs_m_b - window + 1, tl.where(mode == _SK, c, 0))

    # 1. masked tiles, one loop over three ranges: the sink, the window's edge (SSA, SK), the diagonal
    n_sink = sink_hi // BLOCK_N
    n_edge = (full_lo - edge_lo) // BLOCK_N
    n_masked = n_sink + n_edge + (diag_hi - diag_lo + BLOCK_N - 1) // BLOCK_N
    for t in range(0, n_masked):
        start_n = tl.where(t < n_sink, t * BLOCK_N,
                           tl.where(t < n_sink + n_edge, edge_lo + (t - n_sink) * BLOCK_N,
                                    diag_lo + (t - n_sink - n_edge) * BLOCK_N))
        acc_a, l_a, m_a, acc_b, l_b, m_b = _attn_tile(
            acc_a, l_a, m_a, acc_b, l_b, m_b, q_a, q_b, k_base, v_base, start_n + offs_n, offs_m_a, offs_m_b, offs_d,
            T, sink, local_lo_a, local_lo_b, 0.0, qk_scale, stride_kt, stride_vt, MASKED=True, BIASED=False,
            SPLIT=SPLIT)
    # 2. unmasked tiles every query of the tile sees whole (FA: all earlier keys, SSA: inside the window,
    # SK: inside the local span)
    for start_n in range(full_lo, diag_lo, BLOCK_N):
        acc_a, l_a, m_a, acc_b, l_b, m_b = _attn_tile(
            acc_a, l_a, m_a, acc_b, l_b, m_b, q_a, q_b, k_base, v_base, start_n + offs_n, offs_m_a, offs_m_b, offs_d,
            T, sink, local_lo_a, local_lo_b, 0.0, qk_scale, stride_kt, stride_vt, MASKED=False, BIASED=False,
            SPLIT=SPLIT)
    # 2. (XA) the selected blocks before the diagonal, from the compact ascending list (its last entry
    # is the diagonal block, done above), no mask; one query head per program (HEADS = 1)
    if HAS_XA:
        xa_row = bh.to(tl.int64) * NB + start_m // _KV_BLOCK
        count = tl.load(Count + xa_row, mask=mode == _XA, other=1)
        for i in range(0, count - 1):
            blk = tl.load(Index + xa_row * NB + i)
            for sub in tl.static_range(_KV_BLOCK // BLOCK_N):
                cols = blk * _KV_BLOCK + sub * BLOCK_N + offs_n
                acc_a, l_a, m_a, acc_b, l_b, m_b = _attn_tile(
                    acc_a, l_a, m_a, acc_b, l_b, m_b, q_a, q_b, k_base, v_base, cols, offs_m_a, offs_m_b, offs_d,
                    T, sink, local_lo_a, local_lo_b, 0.0, qk_scale, stride_kt, stride_vt, MASKED=False, BIASED=False,
                    SPLIT=SPLIT)
    # 3. (SK; compiled only into launches with a selection, HAS_SK) the selected keys of the tile's 128-query block,
    # BLOCK_N at a time: gathered K/V rows, the logits + log p. A selected key lies before the local span,
    # j < c_m = 128 (m + 1) - window: with window >= 128 before every query of the block, so whole tiles need no mask;
    # the last, partial one (and all, for window < 128: a candidate can lie past a query) are masked causally, with
    # no local-span bound
    if HAS_SK:
        sk_row = ((b * G + g).to(tl.int64) * NB + start_m // _KV_BLOCK) * sk_k
        n_whole = tl.where(window >= _KV_BLOCK, n_sel // BLOCK_N * BLOCK_N, 0)
        for t0 in range(0, n_whole, BLOCK_N):
            cols = tl.load(SkIdx + sk_row + t0 + offs_n)
            bias = tl.load(SkLogp + sk_row + t0 + offs_n)[None, :] * _LOG2E
            acc_a, l_a, m_a, acc_b, l_b, m_b = _attn_tile(
                acc_a, l_a, m_a, acc_b, l_b, m_b, q_a, q_b, k_base, v_base, cols, offs_m_a, offs_m_b, offs_d,
                T, sink, local_lo_a, local_lo_b, bias, qk_scale, stride_kt, stride_vt, MASKED=False, BIASED=True,
                SPLIT=SPLIT)
        no_bound = tl.zeros([HALF], tl.int32)
        for t0 in range(n_whole, n_sel, BLOCK_N):
            ok = t0 + offs_n < n_sel
            cols = tl.load(SkIdx + sk_row + t0 + offs_n, mask=ok, other=-1)
            bias = tl.load(SkLogp + sk_row + t0 + offs_n, mask=ok, other=0.0)[None, :] * _LOG2E
            acc_a, l_a, m_a, acc_b, l_b, m_b = _attn_tile(
                acc_a, l_a, m_a, acc_b, l_b, m_b, q_a, q_b, k_base, v_base, tl.where(cols >= 0, cols, T), offs_m_a,
                offs_m_b, offs_d, T, sink, no_bound, no_bound, bias, qk_scale, stride_kt, stride_vt, MASKED=True,
                BIASED=True, SPLIT=SPLIT)

    # every query sees at least itself (SK: with window >= 128), so l > 0
    o_base = O + b.to(tl.int64) * stride_ob + offs_d[None, :]
    tl.store(o_base + heads_a[:, None] * stride_oh + offs_m_a[:, None] * stride_ot,
             (acc_a / l_a[:, None]).to(O.dtype.element_ty), mask=offs_m_a[:, None] < T)
    if SPLIT:
        tl.store(o_base + heads_b[:, None] * stride_oh + offs_m_b[:, None] * stride_ot,
                 (acc_b / l_b[:, None]).to(O.dtype.element_ty), mask=offs_m_b[:, None] < T)


# -----------------------------------------------------------------------------
# The wrapper: check the inputs, run the XA estimate (xattn.py), build the work list, launch.

def packed_heads(group, has_xa):
    """Query heads per program: the largest power of two, at most 4, that divides the GQA group (so that a program's
    HEADS x BLOCK_M rows are a power of two); 1 when any head may run XA (its block lists are per query head)."""
    return 1 if has_xa else math.gcd(group, 4)


def _default_config(q, heads=1):
    """Tile sizes and launch settings, one naming style (the kernels' constexpr names), for programs of `heads` query
    heads (packed_heads). GPU: tuned on an H100 (bench.py --sweep; GQA packed: RESULTS.md).
    BLOCK_N <= BLOCK_M, both divide 128. The XA estimate's keys (XA_BLOCK_I, XA_BLOCK_J, XA_WARPS, XA_STAGES) come
    from xattn.default_config."""
    if not q.is_cuda:  # Triton's interpreter: small tiles, one stage
        bm = 128 // heads
        return dict(HEADS=heads, BLOCK_M=bm, BLOCK_N=min(bm, 64), NUM_WARPS=4, NUM_STAGES=1, **xattn.default_config(q))
    if heads == 1:
        return dict(HEADS=1, BLOCK_M=128, BLOCK_N=128, NUM_WARPS=8, NUM_STAGES=3, **xattn.default_config(q))
    return dict(HEADS=heads, BLOCK_M=64, BLOCK_N=64, NUM_WARPS=8, NUM_STAGES=3, **xattn.default_config(q))


def _check_modes(modes, B, G, device):
    if not isinstance(modes, torch.Tensor) or modes.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8,
                                                                  torch.uint8):
        raise TypeError(f"modes must be an integer tensor [B, G] of FA=0, SSA=1, XA=2, SK=3; got "
                        f"{modes.dtype if isinstance(modes, torch.Tensor) else type(modes)}")
    if tuple(modes.shape) != (B, G):
        raise ValueError(f"modes must have shape [B={B}, G={G}] (one mode per batch element and KV head); "
                         f"got {tuple(modes.shape)}")
    return modes.to(device=device, dtype=torch.int32).contiguous()


def _check_sk_selection(sel, B, G, T, device):
    """sk_selection (idx, logp) -> the two tensors the kernel reads and K; None -> stand-ins never read, K = 0."""
    if sel is None:
        return torch.zeros(1, dtype=torch.int32, device=device), torch.zeros(1, device=device), 0
    shape = (B, G, triton.cdiv(T, KV_BLOCK))
    idx, logp = sel
    if (idx.dtype != torch.int32 or logp.dtype != torch.float32 or idx.shape[:3] != shape or idx.shape != logp.shape
            or idx.shape[-1] < 1 or not idx.is_contiguous() or not logp.is_contiguous() or idx.device != device):
        raise ValueError(f"sk_selection must be sk_select's (idx int32, logp fp32), both [{B}, {G}, {shape[2]}, K], "
                         f"contiguous, on {device}; got {tuple(idx.shape)} {idx.dtype}, {tuple(logp.shape)} "
                         f"{logp.dtype}: compute it with sk_select(u, k=..., sink=..., window=...)")
    return idx, logp, idx.shape[-1]


def elastic_attention(q, k, v, modes, *, sink=128, window=2048, xa_threshold=0.9, xa_stride=16,
                      sm_scale=None, sk_scores=None, sk_k=256, sk_selection=None, lengths=None, out=None,
                      check_modes=True, has_xa=True, _config=None):
    """Causal attention where every KV head runs its own mode, one launch for all heads -> o [B, H, T, D].

    q [B, H, T, D]; k, v [B, G, T, D] with H % G == 0 (GQA: a KV head is never repeated); modes [B, G] of FA, SSA,
    XA, SK. fp16 or bf16 (fp32 too; on the GPU its products run in tf32). Any T >= 1; D in 16, 32, 64, 128.
    Tensors may be strided views (e.g. [B, T, H, D].transpose(1, 2)) with the last dim contiguous (token-major k and v
    are copied head-major first: faster).
    SK heads need sk_scores [B, G, T] (the scorer's u) and their budget sk_k; the selection (sk_select) then
    runs for every KV head, since which heads are SK is known on the device only. Or pass sk_selection, the
    (idx, logp) of sk_select, computed beforehand.
    lengths: int [B] on the device, the tokens of each row when rows of several lengths are right-padded to T
    (None: every row has T). Causal attention never lets a query see the padding after it; only XA's estimate,
    which pools the queries of a 128-block, must leave the padded ones out: row b's first lengths[b] outputs then
    equal those of the row alone, cut to its length. Padded rows' outputs are finite and meaningless.
    out: an optional [B, H, T, D] tensor to write into (default: new, head-major or token-major as q is).
    check_modes: raise if a mode is not FA, SSA, XA or SK (or is SK without scores), read back after the launches:
    the host waits for the check, not for the kernel.
    has_xa: whether any head may run XA (one query head a program). False, when no head does (say FA-SSA routers),
    lets a program take several query heads of a GQA group: each K/V tile loaded serves all their rows (faster); an
    XA head would then see its diagonal block only (with check_modes: an error). Known to the caller, not read from
    modes: that would make the host wait for the device.
    """
    B, H, T, D, G = check_qk(q, k)
    if not isinstance(v, torch.Tensor) or v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
        raise ValueError(f"v must match k: shape {tuple(k.shape)}, {k.dtype}, {k.device}; "
                         f"got {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v)}")
    if v.stride(-1) != 1:
        raise ValueError(f"v must be contiguous in its last dim (stride 1), got strides {v.stride()}")
    if not (isinstance(sink, int) and sink >= 0 and isinstance(window, int) and window >= 1):
        raise ValueError(f"need integers sink >= 0 and window >= 1; got sink={sink}, window={window}")
    check_xa_args(xa_stride, xa_threshold)
    if k.stride(2) != D or v.stride(2) != D:  # token-major keys and values (the model's views) are copied so that a
        # head's tokens lie together: its tiles are then whole stretches of memory. An H100 at 32K, the model's
        # views: 17.4 ms a layer with the copies against 18.7 without (cuDNN 13.9); at 128K 277.4 against 279.7;
        # inside the model's 32K prefill 18.5 against 18.9 (RESULTS.md)
        k, v = k.contiguous(), v.contiguous()
    modes = _check_modes(modes, B, G, q.device)
    if sk_selection is None and sk_scores is not None:
        if not isinstance(sk_scores, torch.Tensor) or tuple(sk_scores.shape) != (B, G, T):
            raise ValueError(f"sk_scores must be [B, G, T={T}] = {(B, G, T)} (one score per key per KV head), got "
                             f"{tuple(sk_scores.shape) if isinstance(sk_scores, torch.Tensor) else type(sk_scores)}")
        sk_selection = sk_select(sk_scores, k=sk_k, sink=sink, window=window)
    sk_idx, sk_logp_, sk_width = _check_sk_selection(sk_selection, B, G, T, q.device)
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (B,) or lengths.is_floating_point():
            raise ValueError(f"lengths must be an integer tensor [B={B}] (the tokens of each row), got "
                             f"{tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths)}")
        lengths = lengths.to(device=q.device, dtype=torch.int32).clamp(0, T)  # no read past T (and no sync)
    if check_modes:  # a kernel reads a bad mode as FA (SK without a selection: sink + local span; XA where has_xa is
        # False: its diagonal block); the wrapper raises once its launches are queued
        bad_modes = ((modes < FA) | (modes > (XA if sk_selection is None else SK)) | ((modes == XA) & (not has_xa)))
        bad_modes = bad_modes.any()
        if q.is_cuda:  # copy the flag without waiting; later the host waits for this copy only
            bad_modes = torch.empty((), dtype=torch.bool, pin_memory=True).copy_(bad_modes, non_blocking=True)
            checked = torch.cuda.Event()
            checked.record()
    sink, window = min(sink, T), min(window, T + KV_BLOCK)  # beyond, nothing changes; keeps them in int32
    if out is None:  # token-major q (the model's [B, T, H, D] seen as [B, H, T, D]) gets a token-major output, as
        # SDPA returns it: the model's o_proj then reads it without a copy
        token_major = T > 1 and q.stride(2) > q.stride(1)
        out = q.new_empty(B, T, H, D).transpose(1, 2) if token_major else torch.empty_like(
            q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.device != q.device or out.stride(-1) != 1:
        raise ValueError(f"out must be a {tuple(q.shape)} {q.dtype} tensor on {q.device}, last dim contiguous")
    cfg = _launch_config(_config or _default_config(q, packed_heads(H // G, has_xa)), H // G, has_xa)
    bm, bn, heads = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["HEADS"]
    scale = sm_scale if sm_scale is not None else 1.0 / math.sqrt(D)

    if has_xa:
        _, _, count, index = xattn_estimate(q, k, modes, xa_stride, xa_threshold, cfg, lengths, xa=XA)
    else:  # no estimate (its buffers are B * H * T * T / 2048 floats: 1 GiB a layer at 128K), stand-ins never read
        count = index = torch.empty(1, dtype=torch.int32, device=q.device)
    order, _ = _schedule(modes, count, B, H, T, sink, window, bm, bn, sk_width, heads, has_xa)
    _elastic_attn_fwd[(order.numel(),)](
        q, k, v, out, modes, order, count, index, sk_idx, sk_logp_,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        T, triton.cdiv(T, bm), triton.cdiv(T, KV_BLOCK), H, G, H // G, sink, window,
        sk_width, scale * math.log2(math.e),
        D=D, BLOCK_M=bm, BLOCK_N=bn, HEADS=heads, HAS_XA=has_xa, HAS_SK=sk_width > 0,
        SPLIT=splits_rows(heads, bm, cfg["NUM_WARPS"]),
        num_warps=cfg["NUM_WARPS"], num_stages=cfg["NUM_STAGES"])
    if check_modes:
        if q.is_cuda:
            checked.synchronize()
        if bool(bad_modes):
            _raise_bad_modes(modes, has_xa)
    return out


def _launch_config(cfg, group, has_xa):
    """cfg (kernel._default_config's keys), checked against the tiles' rules and the GQA group -> cfg."""
    bm, bn, heads = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["HEADS"]
    if not (bn <= bm <= KV_BLOCK and KV_BLOCK % bm == 0 == bm % bn and bn >= 16 and heads * bm >= 32):
        raise ValueError(f"config needs 16 <= BLOCK_N <= BLOCK_M, both dividing {KV_BLOCK}, and HEADS x BLOCK_M >= 32 "
                         f"(two halves of 16 rows or more); got {cfg}")
    if group % heads or heads & (heads - 1) or (heads > 1 and has_xa):
        raise ValueError(f"config HEADS={heads} must be a power of two dividing the GQA group {group}, and 1 where a "
                         f"head may run XA; got {cfg}")
    return cfg


def splits_rows(heads, block_m, num_warps):
    """Whether a program's HEADS x BLOCK_M rows run as two halves (_attn_tile's SPLIT): when each half still stacks
    every warp along its rows (the packed launches); a one-head 128-row program on 8 warps keeps one block."""
    return heads * block_m >= 32 * num_warps


def _raise_bad_modes(modes, has_xa):
    """The error for modes that the check flagged (read back after the launches)."""
    bad = sorted(set(modes.flatten().tolist()) - {FA, SSA, XA, SK})
    if not bad and not has_xa and bool((modes == XA).any()):
        raise ValueError("modes has XA heads but has_xa=False: pass has_xa=True (or None)")
    if not bad:
        raise ValueError("modes has SK heads: pass their scores as sk_scores [B, G, T] (sparsek.Scorer), "
                         "or sk_selection from sk_select")
    raise ValueError(f"modes must be FA=0, SSA=1, XA=2 or SK=3; got {bad}")


# -----------------------------------------------------------------------------
# 3. The launch schedule: programs differ hugely in cost (an FA program on the last query tile visits
# T / BLOCK_N key tiles, an SSA one about (sink + window) / BLOCK_N), so the heaviest start first.

@triton.jit
def _schedule_cost_kernel(Modes, Count, Cost, N, T, NQB, NB, H, G, GROUP, sink, window, sk_k,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr, HAS_XA: tl.constexpr,
                          BLOCK: tl.constexpr):
    """Cost (key tiles visited) of each work item (b, heads h..h + HEADS - 1, m): item = (b * H + h) / HEADS * NQB
    + m. An SK program's gathered tiles count as tiles."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < N
    m = offs % NQB
    bh = offs // NQB * HEADS
    mode = tl.load(Modes + (bh // H) * G + (bh % H) // GROUP, mask=valid, other=0)
    sink_hi, edge_lo, full_lo, diag_lo, diag_hi, n_sel = _key_ranges(mode, m * BLOCK_M, T, sink, window, sk_k,
                                                                     BLOCK_M, BLOCK_N)
    count = tl.load(Count + bh * NB + m * BLOCK_M // _KV_BLOCK, mask=valid & (mode == _XA) & HAS_XA, other=1)
    tiles = (sink_hi + diag_hi - edge_lo + BLOCK_N - 1) // BLOCK_N + (count - 1) * (_KV_BLOCK // BLOCK_N)
    tiles += (n_sel + BLOCK_N - 1) // BLOCK_N
    tl.store(Cost + offs, tiles, mask=valid)


def _schedule(modes, count, B, H, T, sink, window, block_m, block_n, sk_k=0, heads=1, has_xa=True):
    """Work list: every (b, query heads, query tile) ordered by the number of key tiles it visits, heaviest
    first (a long FA row must not start last). Built on the device, no host sync. -> (order, cost)."""
    G = modes.shape[1]
    NQB, NB = triton.cdiv(T, block_m), triton.cdiv(T, KV_BLOCK)
    N = B * H // heads * NQB
    cost = torch.empty(N, device=modes.device, dtype=torch.int32)
    _schedule_cost_kernel[(triton.cdiv(N, 1024),)](
        modes, count, cost, N, T, NQB, NB, H, G, H // G, sink, window, sk_k,
        BLOCK_M=block_m, BLOCK_N=block_n, HEADS=heads, HAS_XA=has_xa, BLOCK=1024)
    order = torch.argsort(cost, descending=True, stable=True)
    return order, cost


# -----------------------------------------------------------------------------
# 4. Quick self-check (the full benchmark is bench.py)

if __name__ == "__main__":
    import time

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    B, H, G, T, D = (1, 32, 8, 8192, 128) if dev == "cuda" else (1, 4, 2, 1000, 64)
    q = torch.randn(B, H, T, D, device=dev, dtype=dtype)
    k, v = (torch.randn(B, G, T, D, device=dev, dtype=dtype) for _ in range(2))
    modes = torch.tensor([[FA, SSA, XA, SSA, FA, SSA, XA, SSA][:G]] * B, device=dev)
    o = elastic_attention(q, k, v, modes, sink=128, window=256 if dev == "cpu" else 2048)
    xa = xattn_block_mask(q, k)
    ref = reference_attention(q, k, v, modes, sink=128, window=256 if dev == "cpu" else 2048, xa_blocks=xa)
    err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
    print(f"{dev} {dtype} B={B} H={H} G={G} T={T} D={D} modes={modes[0].tolist()}: rel err {err:.2e}")
    if dev == "cuda":
        for _ in range(3):
            elastic_attention(q, k, v, modes)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            elastic_attention(q, k, v, modes)
        torch.cuda.synchronize()
        print(f"elastic_attention: {(time.perf_counter() - t0) / 10 * 1e3:.2f} ms")
