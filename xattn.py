"""
The XA mode's block selection: XAttention (arXiv 2503.16428), as Elastic Attention (arXiv 2601.17367) uses it for
its XA heads. An XA head's query i sees key j <= i iff the 128 x 128 block (i // 128, j // 128) was selected:
- cells: the queries and keys are cut into cells of `stride` (16) tokens; cell (i, j) is scored by the sum of its
  antidiagonal (query row S-1-t of cell i against key row t of cell j), scaled by 1 / (sqrt(D) * S);
- a softmax over the causal cells of each cell row, the probabilities summed over each 128 x 128 block (8 x 8
  cells for S = 16): the block scores, of mass 1 per cell row;
- the selection, per block row: the sink block 0, the diagonal block and the highest-scoring other blocks until
  the kept mass reaches `threshold` (0.9) of the row's.

Read top to bottom: 1. the reference (plain PyTorch, fp32: the definition), 2. the estimate in Triton, two kernels
(the cell rows' log-sum-exps, then the block scores and the selection), 3. the wrappers: xattn_estimate, which
kernel.elastic_attention launches for its XA heads (it also hands the kernel the kept blocks as compact lists), and
xattn_block_mask, the selection of every head alone. The input checks here (check_qk, check_xa_args) are
kernel.elastic_attention's too. This file imports no other file of the project: kernel.py imports it, and passes
its mode number XA in.

    pytest test_kernel.py -k xa     # the estimate against its reference (CPU: Triton's interpreter; GPU too)
    pytest test_kernel.py           # all of the prefill kernel, XA mode included
    python bench.py                 # GPU: the estimate's time alone, among the kernel's timings

Importing this file does nothing but define things. On a machine without CUDA the kernels run only in Triton's
interpreter, which must be chosen before Python imports Triton: `TRITON_INTERPRET=1 python ...`.
(In the interpreter a tl.dot on bf16 operands is wrong: use fp32 or fp16 there.)
"""

import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

BLOCK = 128  # XA selects 128 x 128 blocks (kernel.KV_BLOCK and sparsek.BLOCK are the same number; kernel.py checks)
NEG = tl.constexpr(-1.0e30)  # "minus infinity" that stays finite, so that NEG - NEG is 0, not NaN (kernel.py's too)


# -----------------------------------------------------------------------------
# 1. The reference: plain PyTorch, fp32 math. This is the definition the kernels are tested against.

def xattn_block_scores_reference(q, k, *, stride=16):
    """XAttention block scores [B, H, nb, nb] (fp32), nb = ceil(T / 128).

    The queries and keys are cut into cells of `stride` tokens. Cell (i, j) is scored by the sum of
    its antidiagonal, sum_t q[i*S + S-1-t] . k[j*S + t], which is one matrix product of the reshaped
    Q and K, scaled by 1 / (sqrt(D) * S). A softmax over the causal cells j <= i of each row, then the
    probabilities are summed over each 128 x 128 block (8 x 8 cells for S = 16).
    Partial cells and blocks (T not a multiple of S or of 128): the missing tokens are zero rows, so a
    partial cell scores the pairs it has, and a partial last block has fewer cell rows (a smaller mass).
    """
    B, H, T, D = q.shape
    S = stride
    nc, nb, cpb = triton.cdiv(T, S), triton.cdiv(T, BLOCK), BLOCK // S
    pad = nc * S - T
    qc = F.pad(q.float(), (0, 0, 0, pad)).view(B, H, nc, S, D)
    kc = F.pad(k.repeat_interleave(H // k.shape[1], dim=1).float(), (0, 0, 0, pad)).view(B, H, nc, S, D)
    qc = qc.flip(3).reshape(B, H, nc, S * D)  # cell i: query rows i*S + S-1-t, t = 0..S-1
    kc = kc.reshape(B, H, nc, S * D)          # cell j: key rows j*S + t
    s = qc @ kc.transpose(-1, -2) / (math.sqrt(D) * S)  # [B, H, nc, nc]
    causal = torch.ones(nc, nc, dtype=torch.bool, device=q.device).tril()
    p = s.masked_fill(~causal, float("-inf")).softmax(-1)
    p = F.pad(p, (0, nb * cpb - nc, 0, nb * cpb - nc))  # zero cells fill the last partial block
    return p.view(B, H, nb, cpb, nb, cpb).sum((3, 5))


def xattn_select_reference(scores, threshold):
    """The selection rule on block scores [B, H, nb, nb] -> bool mask [B, H, nb, nb].

    Per block row m: the sink block 0 and the diagonal block m are always kept. The other causal
    blocks are added by descending score until the kept mass reaches threshold * (row mass). Ties are
    kept together: the cutoff s* is the largest score such that forced mass + mass of all candidates
    scoring >= s* reaches the goal, and every candidate scoring >= s* is kept. Sums in fp64, the
    threshold rounded to fp32 (as the kernel gets it). threshold >= 1 keeps every causal block.
    """
    B, H, nb, _ = scores.shape
    thr = float(torch.tensor(threshold, dtype=torch.float32))
    s = scores.double()
    m = torch.arange(nb, device=s.device)[:, None]
    n = torch.arange(nb, device=s.device)[None, :]
    causal = n <= m
    forced = causal & ((n == 0) | (n == m))
    candidate = causal & ~forced
    goal = thr * (s * causal).sum(-1, keepdim=True)
    forced_mass = (s * forced).sum(-1, keepdim=True)
    ranked = torch.where(candidate, s, -1.0).sort(-1, descending=True).values  # candidates first
    kept_mass = forced_mass + ranked.clamp(min=0).cumsum(-1)
    reached = (kept_mass >= goal) & (ranked >= 0)
    cut = torch.where(reached, ranked, float("-inf")).amax(-1, keepdim=True)  # first rank that reaches
    cut = torch.where(forced_mass >= goal, float("inf"), cut)  # the forced blocks suffice
    if thr >= 1.0:
        cut = torch.full_like(cut, float("-inf"))
    return forced | (candidate & (s >= cut))


def xattn_block_mask_reference(q, k, *, stride=16, threshold=0.9):
    """XA block selection [B, H, nb, nb] (bool) of the reference."""
    return xattn_select_reference(xattn_block_scores_reference(q, k, stride=stride), threshold)


# -----------------------------------------------------------------------------
# 2. The estimate in Triton: two kernels, launched for every head, at once done for heads whose mode is not XA
# (the kernels get the mode number XA from the caller, kernel.py, where the modes are numbered).
#
# Kernel 1 is flash attention's online softmax over the cell scores, but instead of p @ V it writes,
# for every (cell row, key block) segment, the log-sum-exp of the segment's cells, and at the end the
# log-sum-exp of the whole row. The probability mass of a segment is then exp2(seg - row): no second
# pass over the keys. Kernel 2 sums the segments of a block row into block scores and selects.
# All exponentials are base 2 (exp2), with log2(e) folded into the scale.

@triton.jit
def _xattn_rows_kernel(
    Q, K, Modes, Lens, SegLse, RowLse,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    T, NC, NB, H, G, GROUP, qk_scale,
    XA: tl.constexpr, S: tl.constexpr, CELLS: tl.constexpr, D: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # program -> (BLOCK_I cell rows, one batch element and query head); the last rows have the most
    # cells to score, so they run first
    pid_i = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    mode = tl.load(Modes + b * G + h // GROUP)
    if mode == XA:  # other heads need no estimate
        T_b = tl.load(Lens + b)  # the row's own tokens: right padding past them is not estimated
        NC_b = (T_b + S - 1) // S
        offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)  # query cells (rows)
        offs_d = tl.arange(0, D)
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        k_base = K + b.to(tl.int64) * stride_kb + (h // GROUP).to(tl.int64) * stride_kh
        seg_base = SegLse + pid_bh.to(tl.int64) * NC * NB
        m_i = tl.full([BLOCK_I], NEG, tl.float32)  # running max of the row (log2 units)
        l_i = tl.zeros([BLOCK_I], tl.float32)       # running sum of exp2(score - m_i)
        # visit key cells 0 .. the last row's own cell (causal at the cell level)
        hi = tl.minimum((pid_i + 1) * BLOCK_I, NC_b)
        for start_j in range(0, hi, BLOCK_J):
            offs_j = start_j + tl.arange(0, BLOCK_J)  # key cells (columns)
            # antidiagonal sums: query row S-1-t of cell i meets key row t of cell j
            s = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
            for t in range(S):
                q_rows = offs_i * S + (S - 1 - t)
                k_rows = offs_j * S + t
                qt = tl.load(q_base + q_rows[:, None] * stride_qt + offs_d[None, :],
                             mask=q_rows[:, None] < T_b, other=0.0)
                kt = tl.load(k_base + k_rows[None, :] * stride_kt + offs_d[:, None],
                             mask=k_rows[None, :] < T_b, other=0.0)  # [D, BLOCK_J]
                s = tl.dot(qt, kt, s)
            valid = (offs_j[None, :] <= offs_i[:, None]) & (offs_i[:, None] < NC_b)
            s = tl.where(valid, s * qk_scale, NEG)
            # log-sum-exp of each segment: CELLS consecutive key cells = one 128-token key block
            s3 = tl.reshape(s, [BLOCK_I, BLOCK_J // CELLS, CELLS])
            seg_max = tl.max(s3, 2)
            seg_sum = tl.sum(tl.math.exp2(s3 - seg_max[:, :, None]), 2)
            offs_blk = start_j // CELLS + tl.arange(0, BLOCK_J // CELLS)
            tl.store(seg_base + offs_i[:, None] * NB + offs_blk[None, :], seg_max + tl.math.log2(seg_sum),
                     mask=(offs_i[:, None] < NC) & (offs_blk[None, :] < NB))
            # the row's log-sum-exp, online: rescale the old sum when the max grows
            m_new = tl.maximum(m_i, tl.max(seg_max, 1))
            l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(seg_sum * tl.math.exp2(seg_max - m_new[:, None]), 1)
            m_i = m_new
        tl.store(RowLse + pid_bh.to(tl.int64) * NC + offs_i, m_i + tl.math.log2(l_i), mask=offs_i < NC)


@triton.jit
def _xattn_select_kernel(
    SegLse, RowLse, Modes, Lens, Scores, Mask, Count, Index,
    NC, NB, H, G, GROUP, threshold, S,
    XA: tl.constexpr, CELLS: tl.constexpr, NB_P2: tl.constexpr,
):
    # program -> one block row m of one (batch, query head)
    m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    mode = tl.load(Modes + b * G + h // GROUP)
    if mode == XA:
        offs_n = tl.arange(0, NB_P2)  # key blocks
        causal = offs_n <= m
        row_out = (pid_bh.to(tl.int64) * NB + m) * NB
        # Phase 1: block scores. The mass of segment (r, n) is exp2(seg - row): sum the block's rows.
        score = tl.zeros([NB_P2], tl.float32)
        NC_b = (tl.load(Lens + b) + S - 1) // S  # the row's own cells (none past its tokens: right padding)
        for r in range(tl.minimum(CELLS, NC_b - m * CELLS)):  # the last block row may have fewer cells
            row = m * CELLS + r
            row_lse = tl.load(RowLse + pid_bh.to(tl.int64) * NC + row)
            seg = tl.load(SegLse + (pid_bh.to(tl.int64) * NC + row) * NB + offs_n, mask=causal, other=NEG)
            score += tl.math.exp2(seg - row_lse)
        tl.store(Scores + row_out + offs_n, score, mask=offs_n < NB)
        # Phase 2: the selection rule of xattn_select_reference (sums in fp64)
        forced = causal & ((offs_n == 0) | (offs_n == m))
        candidate = causal & (offs_n != 0) & (offs_n != m)
        goal = tl.sum(tl.where(causal, score, 0.0).to(tl.float64), 0) * threshold
        forced_mass = tl.sum(tl.where(forced, score, 0.0).to(tl.float64), 0)
        ranked = tl.sort(tl.where(candidate, score, -1.0), 0, descending=True)
        kept_mass = forced_mass + tl.cumsum(tl.maximum(ranked, 0.0).to(tl.float64), 0)
        reached = (kept_mass >= goal) & (ranked >= 0.0)
        cut = tl.max(tl.where(reached, ranked, float("-inf")), 0)
        cut = tl.where(forced_mass >= goal, float("inf"), cut)
        cut = tl.where(threshold >= 1.0, float("-inf"), cut)
        keep = forced | (candidate & (score >= cut))
        tl.store(Mask + row_out + offs_n, keep, mask=offs_n < NB)
        # the kept blocks as a compact ascending list (the diagonal block m comes last)
        pos = tl.cumsum(keep.to(tl.int32), 0) - 1
        tl.store(Index + row_out + pos, offs_n, mask=keep)
        tl.store(Count + pid_bh.to(tl.int64) * NB + m, tl.sum(keep.to(tl.int32), 0))


# -----------------------------------------------------------------------------
# 3. The wrappers: tile sizes, input checks (kernel.elastic_attention's too), the launch.

def default_config(q):
    """The estimate's tile sizes and launch settings: the XA_ keys of kernel._default_config, which holds them
    with the attention kernel's. GPU: tuned on an H100 at 32K (bench.py --sweep)."""
    if not q.is_cuda:  # Triton's interpreter: small tiles, one stage
        return dict(XA_BLOCK_I=64, XA_BLOCK_J=64, XA_WARPS=4, XA_STAGES=1)
    return dict(XA_BLOCK_I=128, XA_BLOCK_J=128, XA_WARPS=8, XA_STAGES=3)


def check_qk(q, k):
    """q [B, H, T, D] and k [B, G, T, D] as the kernels read them -> B, H, T, D, G; else an error that says why."""
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        raise TypeError("q and k must be torch tensors")
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q must be [B, H, T, D] and k, v [B, G, T, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (T, D):
        raise ValueError(f"k must be [B={B}, G, T={T}, D={D}] to match q {tuple(q.shape)}; got {tuple(k.shape)}")
    G = k.shape[1]
    if G == 0 or H % G != 0:
        raise ValueError(f"the query heads H={H} must be a multiple of the KV heads G={G} (GQA)")
    if T < 1 or B < 1 or H < 1:
        raise ValueError(f"empty input: q {tuple(q.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"dtype {q.dtype} is not supported: use float16 or bfloat16 (float32 for CPU tests)")
    if k.dtype != q.dtype:
        raise TypeError(f"q and k must have one dtype; got q {q.dtype}, k {k.dtype}")
    if D not in (16, 32, 64, 128):
        raise ValueError(f"head dim D={D} is not supported: use 16, 32, 64 or 128")
    if k.device != q.device:
        raise ValueError(f"q and k must be on one device; got {q.device} and {k.device}")
    if q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("q is on the CPU, where Triton kernels run only in its interpreter: start Python with "
                         "TRITON_INTERPRET=1, or pass CUDA tensors (on a CPU, reference_attention is the fast way)")
    for name, x in (("q", q), ("k", k)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {x.stride()}: "
                             f"call .contiguous() first")
    return B, H, T, D, G


def check_xa_args(stride, threshold):
    """The estimate's own arguments: a cell size dividing the block, a threshold >= 0 (1 keeps every block)."""
    if not (isinstance(stride, int) and 1 <= stride <= BLOCK and BLOCK % stride == 0):
        raise ValueError(f"xa_stride must be a power of two dividing {BLOCK}; got {stride}")
    if not (0.0 <= float(threshold)):
        raise ValueError(f"xa_threshold must be >= 0; got {threshold}")


def xattn_estimate(q, k, modes, stride, threshold, config, lengths=None, *, xa):
    """The XA estimate for the heads whose mode (modes int32 [B, G]) is xa, kernel.py's XA -> (scores, mask, count,
    index), [B, H, nb, ...]: count and index hold each block row's kept blocks as a compact ascending list, which
    the attention kernel walks. Rows of other heads are left unwritten. lengths int32 [B]: the tokens of each row
    (None: all T). config: default_config's keys (kernel._default_config holds them too)."""
    B, H, T, D = q.shape
    G = k.shape[1]
    S = stride
    NC, NB = triton.cdiv(T, S), triton.cdiv(T, BLOCK)
    cells = BLOCK // S
    block_i = max(config["XA_BLOCK_I"], cells, 16)
    block_j = max(config["XA_BLOCK_J"], cells, 16)
    dev = q.device
    seg_lse = torch.empty(B, H, NC, NB, device=dev, dtype=torch.float32)
    row_lse = torch.empty(B, H, NC, device=dev, dtype=torch.float32)
    scores = torch.empty(B, H, NB, NB, device=dev, dtype=torch.float32)
    mask = torch.empty(B, H, NB, NB, device=dev, dtype=torch.bool)
    count = torch.empty(B, H, NB, device=dev, dtype=torch.int32)
    index = torch.empty(B, H, NB, NB, device=dev, dtype=torch.int32)
    qk_scale = math.log2(math.e) / (math.sqrt(D) * S)
    lens = torch.full((B,), T, dtype=torch.int32, device=dev) if lengths is None else lengths
    _xattn_rows_kernel[(triton.cdiv(NC, block_i), B * H)](
        q, k, modes, lens, seg_lse, row_lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        T, NC, NB, H, G, H // G, qk_scale,
        XA=xa, S=S, CELLS=cells, D=D, BLOCK_I=block_i, BLOCK_J=block_j,
        num_warps=config["XA_WARPS"], num_stages=config["XA_STAGES"])
    _xattn_select_kernel[(NB, B * H)](
        seg_lse, row_lse, modes, lens, scores, mask, count, index,
        NC, NB, H, G, H // G, float(torch.tensor(threshold, dtype=torch.float32)), S,  # fp32, as the reference
        XA=xa, CELLS=cells, NB_P2=max(16, triton.next_power_of_2(NB)), num_warps=4)
    return scores, mask, count, index


def xattn_block_mask(q, k, *, stride=16, threshold=0.9, return_scores=False, _config=None):
    """XA block selection [B, H, nb, nb] (bool) of every query head, in Triton (see the reference).
    With return_scores=True also the block scores [B, H, nb, nb] (fp32) the selection used."""
    B, H, T, D, G = check_qk(q, k)
    check_xa_args(stride, threshold)
    # the kernels estimate the heads whose mode equals xa: here every head, each marked 0 (any number would do)
    marks = torch.zeros((B, G), dtype=torch.int32, device=q.device)
    scores, mask, _, _ = xattn_estimate(q, k, marks, stride, threshold, _config or default_config(q), xa=0)
    return (mask, scores) if return_scores else mask
