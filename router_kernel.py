"""
The Attention Router's inference (arXiv 2601.17367, Sec. 3.2: boundary pooling, Task MLP, Router MLP) in one Triton
launch per layer, beside its PyTorch reference in router.py (AttentionRouter.forward, which training runs).

Eager, a router is some twenty small kernels (three gathers of pooled keys, their means, the standardisation, five
linear layers, three SiLUs) and the launches cost more than the work: about 0.6 ms per layer on an H100, three times
the paper's 0.196 ms. Here one program per (sample, KV head) pools its keys, standardises them and runs both MLPs,
each layer's output going through a small scratch row that stays in L1/L2. The weights (about 1.3 MB in fp32 at head
dim 128) are read from L2 by every program, so a layer costs one launch whatever the batch.

    pytest test_router.py -k kernel    # CPU (Triton's interpreter) and, with CUDA, the GPU
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _end_sum(K, b_off, g_off, stride_t, n_len, n, last, d, D_PAD: tl.constexpr, N_PAD: tl.constexpr,
             D: tl.constexpr):
    """Sum of the first (last=0) or last (last=1) m = min(n, n_len) prompt tokens' keys of one (sample, KV head),
    fp32 [D_PAD]; and m."""
    m = tl.minimum(n, n_len)
    pos = tl.arange(0, N_PAD)
    t = tl.where(last == 1, n_len - 1 - pos, pos).to(tl.int64)  # token offsets past 2^31 elements: fused qkv at 350K
    mask = (pos < m)[:, None] & (d < D)[None, :]
    x = tl.load(K + b_off + g_off + t[:, None] * stride_t + d[None, :], mask=mask, other=0.0)
    return tl.sum(x.to(tl.float32), 0), m


@triton.jit
def _linear(X, W, Bias, Y, N: tl.constexpr, K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
            SILU: tl.constexpr):
    """Y[:N] = act(W X[:K] + Bias) for one row, W [N, K] row-major; X and Y are this program's scratch rows."""
    for n0 in tl.static_range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        acc = tl.zeros([BN], dtype=tl.float32)
        for k0 in tl.static_range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            w = tl.load(W + rn[:, None] * K + rk[None, :], mask=(rn < N)[:, None] & (rk < K)[None, :], other=0.0)
            x = tl.load(X + rk, mask=rk < K, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], 1)
        acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)
        if SILU:
            acc = acc * tl.sigmoid(acc)
        tl.store(Y + rn, acc, mask=rn < N)
    tl.debug_barrier()  # the next layer reads Y in other threads' chunks


@triton.jit
def _router_fwd(K, Lens, Mean, Std, W1, B1, W2, B2, W3, B3, W4, B4, W5, B5, Scratch, Out,
                stride_b, stride_t, stride_g, G,
                D: tl.constexpr, H: tl.constexpr, BOUNDARY: tl.constexpr, TAIL: tl.constexpr,
                D_PAD: tl.constexpr, NB_PAD: tl.constexpr, NT_PAD: tl.constexpr, S: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    b, g = pid // G, pid % G
    n_len = tl.load(Lens + b).to(tl.int32)
    d = tl.arange(0, D_PAD)
    b_off, g_off = b.to(tl.int64) * stride_b, g * stride_g
    # router input: the boundary mean (first and last BOUNDARY prompt tokens), and with TAIL the tail mean beside it
    first, m = _end_sum(K, b_off, g_off, stride_t, n_len, BOUNDARY, 0, d, D_PAD, NB_PAD, D)
    last, _ = _end_sum(K, b_off, g_off, stride_t, n_len, BOUNDARY, 1, d, D_PAD, NB_PAD, D)
    pooled = (first / m + last / m) / 2
    x0, x1 = Scratch + pid * 2 * S, Scratch + pid * 2 * S + S  # scratch rows: each layer reads one, writes the other
    tl.store(x0 + d, (pooled - tl.load(Mean + d, mask=d < D)) / tl.load(Std + d, mask=d < D, other=1.0), mask=d < D)
    if TAIL > 0:
        tail, mt = _end_sum(K, b_off, g_off, stride_t, n_len, TAIL, 1, d, D_PAD, NT_PAD, D)
        tail = tail / mt
        tl.store(x0 + D + d, (tail - tl.load(Mean + D + d, mask=d < D)) / tl.load(Std + D + d, mask=d < D, other=1.0),
                 mask=d < D)
    D_IN: tl.constexpr = 2 * D if TAIL > 0 else D
    tl.debug_barrier()
    _linear(x0, W1, B1, x1, H, D_IN, BN, BK, True)   # Task MLP
    _linear(x1, W2, B2, x0, D, H, BN, BK, False)
    _linear(x0, W3, B3, x1, H, D, BN, BK, True)      # Router MLP
    _linear(x1, W4, B4, x0, D, H, BN, BK, True)
    _linear(x0, W5, B5, Out + pid * 2, 2, D, BN, BK, False)


def router_logits(router, k: torch.Tensor, prompt_lens: torch.Tensor | None = None) -> torch.Tensor:
    """router.AttentionRouter's forward in one launch: k [B, T, G, D] pre-RoPE keys (any strides with the last
    contiguous), prompt_lens [B] (None: all T tokens; each in [1, T], unchecked here) -> logits [B, G, 2], fp32."""
    B, T, G, D = k.shape
    if k.stride(-1) != 1:
        k = k.contiguous()
    lens = (torch.full((B,), T, dtype=torch.int32, device=k.device) if prompt_lens is None
            else prompt_lens.to(k.device))  # any integer dtype: the kernel reads it as it is (no cast launch)
    t, r = router.task_mlp, router.router_mlp
    H = t[0].out_features
    S = max(2 * D, H)
    scratch = torch.empty(B * G, 2 * S, dtype=torch.float32, device=k.device)
    out = torch.empty(B, G, 2, dtype=torch.float32, device=k.device)
    pad = triton.next_power_of_2
    _router_fwd[(B * G,)](k, lens, router.in_mean, router.in_std, t[0].weight, t[0].bias, t[2].weight, t[2].bias,
                          r[0].weight, r[0].bias, r[2].weight, r[2].bias, r[4].weight, r[4].bias, scratch, out,
                          k.stride(0), k.stride(1), k.stride(2), G,
                          D=D, H=H, BOUNDARY=router.boundary, TAIL=router.tail, D_PAD=pad(D),
                          NB_PAD=pad(router.boundary), NT_PAD=pad(max(router.tail, 1)), S=S, BN=64, BK=64,
                          num_warps=4)
    return out
