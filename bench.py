"""
Prefill benchmark of kernel.elastic_attention on the GPU, side by side with
torch SDPA (cuDNN and flash backends), FlexAttention (compiled) with the same block masks, and the
split-and-merge way (gather the heads of each mode, one call per mode, scatter back).

Shape: Llama-3.1-8B attention, B = 1, 32 query / 8 KV heads, D = 128, bf16. Cases: FA-only, SSA-only
(sink 128, window 2048), XA-only on random inputs (which select nearly every block) and on structured
inputs (planted topics: a known share of blocks), mixes with 25%, 50%, 75% FA heads (the rest SSA), and
SK-only at SSA's KV budget per query (sink + window + k = sink + SSA window: window 1024 + k 1024, 1792 + 256).
TFLOP/s count the (query, key) pairs actually computed: 4 * D flops each. Writes a markdown table.

    python bench.py                                  # T = 8K, 32K, 128K -> bench_results.md
    python bench.py --seq-lens 8192 --out /tmp/b.md  # one length
    python bench.py --sweep                          # first try kernel tile configs at 32K, bench the best
    python bench.py --sk                             # SK (and XA) against SSA, no dense -> bench_sk_results.md

With --decode, the decode kernel alone (a few tile configs) against SDPA's flash decode and the memory floor:

    python bench.py --decode --seq-lens 32768 131072                               # -> bench_decode_results.md

A whole model end to end (first token, decode step, KV cache) is bench_model.py's.

Read in order: arguments, timing and counting, the prefill cases (one function per family), their report, the
tile sweep, the decode kernel, main. The timings need a CUDA GPU; pytest test_bench.py checks on the CPU what can be
checked there (the pair counts, the report).
"""

import argparse
import json
import math
import statistics
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

import kernel
import xattn
from attention import flex_block_mask
from cli import command_line, fail, provenance, write_atomic
from decode_kernel import decode_attention, decode_split, decode_splits, decode_wave, decode_work
from kernel import FA, SK, SSA, XA
from sparsek import candidates, sk_flex_attention, sk_select, span_start

DTYPE = torch.bfloat16
B = 1  # the prefill cases: one sequence

# -----------------------------------------------------------------------------
# arguments


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 32768, 131072], help="sequence lengths T")
    parser.add_argument("--heads", type=int, default=32, help="query heads H")
    parser.add_argument("--kv-heads", type=int, default=8, help="KV heads G")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim D")
    parser.add_argument("--sink", type=int, default=128, help="SSA sink tokens")
    parser.add_argument("--window", type=int, default=2048, help="SSA window tokens")
    parser.add_argument("--xa-threshold", type=float, default=0.9, help="XA threshold")
    parser.add_argument("--xa-stride", type=int, default=16, help="XA antidiagonal stride")
    parser.add_argument("--xa-topics", type=int, default=8,
                        help="structured XA inputs: topics per head (share ~ 1/topics)")
    parser.add_argument("--sk-ks", type=int, nargs="+", default=[1024, 256],
                        help="SK budgets k; each SK case gets window = SSA window - k (the same keys per query as SSA)")
    parser.add_argument("--flex-sk-max-len", type=int, default=32768, help="time FlexAttention SK up to this T (its "
                        "selected keys' blocks cover nearly every candidate block with random scores: dense cost)")
    parser.add_argument("--sweep", action="store_true", help="time kernel tile configs first and bench the best")
    parser.add_argument("--sweep-len", type=int, default=32768, help="sequence length of the sweep")
    parser.add_argument("--sweep-configs", type=str, help="JSON list of [BLOCK_M, BLOCK_N, NUM_WARPS, NUM_STAGES]",
                        default="[[128,128,8,3],[128,128,8,2],[128,64,8,3],[128,64,8,4],[64,64,4,3],[64,64,4,4]]")
    parser.add_argument("--sweep-repeat", type=int, default=1, help="time each sweep config this many times")
    parser.add_argument("--config", type=str, default=None, help="kernel config as JSON (see kernel._default_config)")
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compiles take a while)")
    parser.add_argument("--sk", action="store_true", help="the selecting modes against SSA only (SSA-only, SK and "
                        "XA cases; no dense, no Flex) -> bench_sk_results.md")
    parser.add_argument("--out", type=str, default=None, help="markdown file to write (default: bench_results.md; "
                        "with --sk, --decode: bench_sk_results.md, bench_decode_results.md)")
    parser.add_argument("--decode", action="store_true", help="time the decode kernel alone (a few tile configs) "
                        "against SDPA's flash decode and the memory floor, at the --seq-lens, B = 1 and --batch")
    parser.add_argument("--batch", type=int, default=8, help="with --decode: also decode this many rows of the "
                        "first length together")
    parser.error = lambda message: fail(f"{message} (python bench.py --help lists the flags)")  # one line
    args = parser.parse_args(argv)
    args.out = args.out or ("bench_decode_results.md" if args.decode else "bench_sk_results.md" if args.sk
                            else "bench_results.md")
    for name in ("config", "sweep_configs"):
        try:
            setattr(args, name, None if getattr(args, name) is None else json.loads(getattr(args, name)))
        except json.JSONDecodeError as e:
            fail(f"--{name.replace('_', '-')} {getattr(args, name)}: not JSON ({e})")
    return args


def cuda_device():
    if not torch.cuda.is_available():
        fail("bench.py times kernels on a CUDA GPU and this machine has none (pytest runs the CPU checks)")
    return "cuda"


# -----------------------------------------------------------------------------
# timing and counting


def log(line):
    print(line, flush=True)


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, budget_ms=600.0, min_reps=5, max_reps=100, device="cuda"):
    """Median time (ms) of fn() over several runs, with CUDA events; one warm-up call first. On the CPU (the tests)
    the host clock instead."""
    fn()
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    est = (time.perf_counter() - t0) * 1e3
    reps = int(max(min_reps, min(max_reps, budget_ms / max(est, 1e-3))))
    if torch.device(device).type != "cuda":
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def pairs_per_head(mode, T, sink, window, xa_blocks=None):
    """Number of (query, key) pairs a head computes: [H] int64 for modes [H] (xa_blocks [H, nb, nb])."""
    dev = mode.device
    i = torch.arange(T, device=dev, dtype=torch.int64)
    fa = T * (T + 1) // 2
    ssa = (torch.minimum(i + 1, torch.tensor(window, device=dev))
           + (torch.minimum(i - window + 1, torch.tensor(sink, device=dev))).clamp(min=0)).sum().item()
    out = torch.where(mode == FA, fa, ssa).to(torch.int64)
    if xa_blocks is not None:
        nb = xa_blocks.shape[-1]
        rows = torch.full((nb,), 128, device=dev, dtype=torch.int64)
        rows[-1] = T - 128 * (nb - 1)
        m, n = torch.arange(nb, device=dev)[:, None], torch.arange(nb, device=dev)[None, :]
        per_block = torch.where(n < m, rows[:, None] * rows[None, :],
                                torch.where(n == m, rows[:, None] * (rows[:, None] + 1) // 2, 0))
        xa = (xa_blocks.to(torch.int64) * per_block).sum((-1, -2))
        out = torch.where(mode == XA, xa, out)
    return out


def sk_pairs(T, sink, window, k, device):
    """(query, key) pairs an SK head computes: per query its sink, its local span and min(k, n) selected keys."""
    i = torch.arange(T, device=device, dtype=torch.int64)
    c = span_start(i // 128, window)
    lo = c.clamp(min=0)
    n = candidates(i // 128, T, sink=sink, window=window)
    return ((i - lo + 1).clamp(min=0) + lo.clamp(max=sink) + n.clamp(max=k)).sum().item()


def head_modes(modes, H):
    """Modes [1, G] -> [H]: each query head in its KV head's mode."""
    return modes.repeat_interleave(H // modes.shape[1], 1)[0]


def random_qkv(args, T, device="cuda"):
    """q [B, H, T, D], k and v [B, G, T, D] of random bf16."""
    q = torch.randn(B, args.heads, T, args.head_dim, device=device, dtype=DTYPE)
    k, v = (torch.randn(B, args.kv_heads, T, args.head_dim, device=device, dtype=DTYPE) for _ in range(2))
    return q, k, v


def structured_qk(T, topics, H, G, D, device="cuda"):
    """q, k with planted structure: each 128-token block has a topic (a random direction per KV head);
    queries and keys of a block point along it, so attention mass sits on the blocks of one's own topic."""
    nb = math.ceil(T / 128)
    dirs = F.normalize(torch.randn(G, topics, D, device=device), dim=-1)
    topic = torch.randint(0, topics, (G, nb), device=device)
    base = dirs[torch.arange(G, device=device)[:, None], topic]                # [G, nb, D]
    base = base.repeat_interleave(128, dim=1)[:, :T]                           # [G, T, D]
    amp = 3.0 * D ** 0.25  # same-topic scores ~ amp^2 / sqrt(D) = 9 above the rest
    k = (amp * base + torch.randn(G, T, D, device=device))[None]
    q = (amp * base.repeat_interleave(H // G, dim=0) + torch.randn(H, T, D, device=device))[None]
    return q.to(DTYPE), k.to(DTYPE)


@dataclass
class Results:
    """The prefill rows in order, (T, case, method, ms, TFLOP/s, note), a failed call's included (nan ms, the
    error in its note), and the ms of each call timed by (T, case, method)."""
    head_dim: int
    rows: list = field(default_factory=list)
    ms: dict = field(default_factory=dict)

    def record(self, T, case, method, fn, pairs, note=""):
        """Times fn as one row; pairs: the (query, key) pairs it computes, for TFLOP/s."""
        try:
            ms = timeit(fn)
        except Exception as e:  # out of memory, a tile config that does not fit: the row says so, the others run
            log(f"T={T} {case} {method}: failed: {str(e).splitlines()[0][:160]}")
            self.rows.append((T, case, method, float("nan"), float("nan"), "failed: " + str(e).splitlines()[0][:80]))
            return float("nan")
        tflops = 4 * self.head_dim * pairs / (ms * 1e-3) / 1e12
        self.rows.append((T, case, method, ms, tflops, note))
        self.ms[(T, case, method)] = ms
        log(f"T={T:>6} {case:<24} {method:<34} {ms:9.3f} ms {tflops:7.1f} TFLOP/s {note}")
        return ms


# -----------------------------------------------------------------------------
# the prefill cases of one length: each family against its competitors


def sdpa(backend, q, k_rep, v_rep, is_causal=True):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k_rep, v_rep, is_causal=is_causal)


def fused(q, k, v, modes, args, config, **kw):
    """The call timed as 'elastic_attention': every head in its mode, one launch (a GQA group's query heads in one
    program where no head runs XA, as the model runs FA-SSA)."""
    has_xa = bool((modes == XA).any())
    return lambda: kernel.elastic_attention(q, k, v, modes, sink=args.sink, window=args.window, has_xa=has_xa,
                                            xa_threshold=args.xa_threshold, xa_stride=args.xa_stride, _config=config,
                                            **kw)


def xa_kw(args):
    return dict(stride=args.xa_stride, threshold=args.xa_threshold)


def split_and_merge(q, k, v, modes, fa_with_cudnn, args, config):
    """Gather the heads of each mode, one call per mode, scatter back (B = 1)."""
    H, G = q.shape[1], k.shape[1]
    o = torch.empty_like(q)
    for mode in (FA, SSA):
        groups = (modes[0] == mode).nonzero().flatten()
        if groups.numel() == 0:
            continue
        heads = (groups[:, None] * (H // G) + torch.arange(H // G, device=q.device)).flatten()
        qs, ks, vs = q[:, heads], k[:, groups], v[:, groups]
        if mode == FA and fa_with_cudnn:
            out = sdpa(SDPBackend.CUDNN_ATTENTION, qs, ks.repeat_interleave(H // G, 1), vs.repeat_interleave(H // G, 1))
        else:
            out = kernel.elastic_attention(qs, ks, vs, torch.full((1, groups.numel()), mode, device=q.device),
                                           sink=args.sink, window=args.window, has_xa=False, _config=config)
        o[:, heads] = out
    return o


def bench_dense(res, args, T, q, k, v, config, flex):
    """FA-only: SDPA (cuDNN, flash), FlexAttention causal, and ours with and without its mode check."""
    H, G = q.shape[1], k.shape[1]
    k_rep, v_rep = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)  # for SDPA, outside the timing
    all_fa = torch.full((B, G), FA, device=q.device, dtype=torch.int32)
    pairs = H * T * (T + 1) // 2
    case = "FA-only (dense causal)"
    for name, backend in (("cuDNN", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
        res.record(T, case, f"SDPA {name} (K/V pre-expanded)", lambda: sdpa(backend, q, k_rep, v_rep), pairs)
    if flex:
        causal_bm = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, T, T, device=q.device, _compile=True)
        res.record(T, case, "FlexAttention causal", lambda: flex(q, k, v, block_mask=causal_bm, enable_gqa=True), pairs)
    res.record(T, case, "elastic_attention", fused(q, k, v, all_fa, args, config), pairs)
    res.record(T, case, "elastic_attention, check_modes=False", fused(q, k, v, all_fa, args, config,
                                                                      check_modes=False), pairs, "no host sync")


def bench_mixes(res, args, T, q, k, v, config, flex):
    """SSA-only and the FA/SSA mixes (25%, 50%, 75% FA heads): ours, FlexAttention on the same mask, and the
    split-and-merge way."""
    H, G = q.shape[1], k.shape[1]
    perm = torch.tensor([3, 6, 0, 5, 1, 7, 2, 4][:G] if G == 8 else torch.randperm(G).tolist(), device=q.device)
    for n_fa in [0, G // 4, G // 2, 3 * G // 4]:
        modes = torch.full((B, G), SSA, device=q.device, dtype=torch.int32)
        modes[0, perm[:n_fa]] = FA
        case = "SSA-only" if n_fa == 0 else f"{100 * n_fa // G}% FA + SSA"
        pairs = pairs_per_head(head_modes(modes, H), T, args.sink, args.window).sum().item()
        res.record(T, case, "elastic_attention", fused(q, k, v, modes, args, config), pairs)
        if n_fa == 0:
            res.record(T, case, "elastic_attention, check_modes=False", fused(q, k, v, modes, args, config,
                                                                              check_modes=False), pairs, "no host sync")
        if flex:
            bm = flex_block_mask(modes, H, T, sink=args.sink, window=args.window)
            res.record(T, case, "FlexAttention (same mask, mode table)",
                       lambda: flex(q, k, v, block_mask=bm, enable_gqa=True), pairs, "attention.flex_block_mask")
            if n_fa == 0:  # FlexAttention at its best on this mask: one mask_mod and block mask for all heads
                ssa_mod = lambda b, h, qi, ki: (ki <= qi) & ((ki < args.sink) | (qi - ki < args.window))  # noqa: E731
                ssa_bm = create_block_mask(ssa_mod, None, None, T, T, device=q.device, _compile=True)
                res.record(T, case, "FlexAttention (same mask, SSA mask_mod)",
                           lambda: flex(q, k, v, block_mask=ssa_bm, enable_gqa=True), pairs, "one mask for all heads")
        if n_fa > 0:
            res.record(T, case, "split: cuDNN FA + ours SSA",
                       lambda: split_and_merge(q, k, v, modes, True, args, config), pairs)
            res.record(T, case, "split: ours per mode", lambda: split_and_merge(q, k, v, modes, False, args, config),
                       pairs)


def bench_sk(res, args, T, q, k, v, config, flex):
    """SK-only at SSA's KV budget per query (sink + window + k = sink + SSA window): the selection alone, ours with
    and without it, FlexAttention SK (its selection and block mask included) up to --flex-sk-max-len."""
    H, G = q.shape[1], k.shape[1]
    u = torch.randn(B, G, T, device=q.device)
    u_rising = u + 8 * torch.arange(T, device=q.device) / T
    all_sk = torch.full((B, G), SK, device=q.device, dtype=torch.int32)
    for sk_k in args.sk_ks:
        win = args.window - sk_k
        case = f"SK-only, window {win} + k {sk_k}"
        pairs = H * sk_pairs(T, args.sink, win, sk_k, q.device)
        sel_kw = dict(k=sk_k, sink=args.sink, window=win)
        res.record(T, case, "sk_select alone", lambda: sk_select(u, **sel_kw), 0)
        res.record(T, case, "sk_select alone, scores rising with position", lambda: sk_select(u_rising, **sel_kw),
                   0, "u + 8 j / T: later keys rank first, so each block walks past keys it cannot see yet")
        res.record(T, case, "elastic_attention (selection + attention)", lambda: kernel.elastic_attention(
            q, k, v, all_sk, sink=args.sink, window=win, sk_scores=u, sk_k=sk_k, has_xa=False, _config=config), pairs)
        try:  # out of memory: a line of the log, not a crash (as in Results.record)
            sel = sk_select(u, **sel_kw)
        except Exception as e:
            sel = None
            log(f"T={T} {case} sk_select: failed: {str(e).splitlines()[0][:160]}")
        if sel is not None:
            res.record(T, case, "elastic_attention, selection given", lambda: kernel.elastic_attention(
                q, k, v, all_sk, sink=args.sink, window=win, sk_selection=sel, has_xa=False, _config=config), pairs)
        sel = None  # freed before FlexAttention's own selection
        if flex and T <= args.flex_sk_max_len:
            res.record(T, case, "FlexAttention SK (sk_flex_attention)", lambda: sk_flex_attention(
                q, k, v, u, sk_k=sk_k, sink=args.sink, window=win), pairs, "selection and block mask included")
        elif flex:
            res.rows.append((T, case, "FlexAttention SK (sk_flex_attention)", float("nan"), float("nan"),
                             f"skipped: T > {args.flex_sk_max_len}, about dense cost (random scores)"))


def bench_xa(res, args, T, q, k, v, config, flex):
    """XA: the estimate alone, and XA-only on random and on structured inputs (ours with its estimate,
    FlexAttention on the blocks the estimate kept)."""
    H, G, D = q.shape[1], k.shape[1], q.shape[3]
    all_xa = torch.full((B, G), XA, device=q.device, dtype=torch.int32)
    kw = xa_kw(args)
    for label, (qx, kx) in [("random", (q, k)), ("structured", structured_qk(T, args.xa_topics, H, G, D, q.device))]:
        xa_blocks = xattn.xattn_block_mask(qx, kx, _config=config, **kw)
        nb = xa_blocks.shape[-1]
        share = xa_blocks.float().sum().item() / (B * H * nb * (nb + 1) / 2)
        pairs = pairs_per_head(head_modes(all_xa, H), T, args.sink, args.window, xa_blocks[0]).sum().item()
        case = f"XA-only, {label} q/k"
        note = f"{100 * share:.1f}% of causal blocks kept"
        res.record(T, case, "XA estimate alone (xattn_block_mask)",
                   lambda: xattn.xattn_block_mask(qx, kx, _config=config, **kw), 0, note)
        res.record(T, case, "elastic_attention (estimate + attention)", fused(qx, kx, v, all_xa, args, config), pairs,
                   note)
        if flex:
            bm = flex_block_mask(all_xa, H, T, xa_blocks=xa_blocks)
            res.record(T, case, "FlexAttention (same blocks, no estimate)",
                       lambda: flex(qx, kx, v, block_mask=bm, enable_gqa=True), pairs, note)
        del xa_blocks


def bench_length(res, args, T, config, flex):
    """Every prefill case at one length (--sk: SSA-only, SK and XA)."""
    torch.manual_seed(T)
    torch._dynamo.reset()  # FlexAttention compiles a few variants per length; stay under dynamo's recompile limit
    q, k, v = random_qkv(args, T)
    if args.sk:
        modes = torch.full((B, args.kv_heads), SSA, device=q.device, dtype=torch.int32)
        pairs = pairs_per_head(head_modes(modes, args.heads), T, args.sink, args.window).sum().item()
        res.record(T, "SSA-only", "elastic_attention", fused(q, k, v, modes, args, config), pairs)
    else:
        bench_dense(res, args, T, q, k, v, config, flex)
        bench_mixes(res, args, T, q, k, v, config, flex)
    bench_sk(res, args, T, q, k, v, config, flex)
    torch.cuda.empty_cache()
    bench_xa(res, args, T, q, k, v, config, flex)


# -----------------------------------------------------------------------------
# the prefill report: the table and the targets


def prefill_targets(res, args):
    """-> [(T, target, measured, met)] of every length timed (issue 3: H100, T = 32K; the XA estimate at 128K)."""
    def get(T, case, method):
        return res.ms.get((T, case, method), float("nan"))

    # anchors measured earlier on an H100 / H200 (RESULTS.md: The prefill kernel): Flex causal, Flex SSA,
    # Flex 25% FA mix (ms)
    anchors = {8192: (1.36, 0.68, 0.85), 32768: (19.9, 2.93, 7.19)}
    targets = []
    for T in sorted({row[0] for row in res.rows}):
        fa = get(T, "FA-only (dense causal)", "elastic_attention")
        flex_fa = get(T, "FA-only (dense causal)", "FlexAttention causal")
        cudnn = get(T, "FA-only (dense causal)", "SDPA cuDNN (K/V pre-expanded)")
        ssa = get(T, "SSA-only", "elastic_attention")
        flex_ssa = min((ms for (t, c, meth), ms in res.ms.items()
                        if t == T and c == "SSA-only" and meth.startswith("FlexAttention")), default=float("nan"))
        mix = get(T, "25% FA + SSA", "elastic_attention")
        flex_mix = get(T, "25% FA + SSA", "FlexAttention (same mask, mode table)")
        pred = 0.25 * fa + 0.75 * ssa
        est = get(T, "XA-only, random q/k", "XA estimate alone (xattn_block_mask)")
        a_fa, a_ssa, a_mix = (f"; earlier anchor {a:.2f} ms ({a / ours:.2f}x)" if T in anchors else ""
                              for a, ours in zip(anchors.get(T, (0, 0, 0)), (fa, ssa, mix)))
        targets += [] if args.sk else [
            (T, "FA-only: at least as fast as FlexAttention causal; toward cuDNN",
             f"{fa:.2f} ms vs Flex {flex_fa:.2f} ms ({flex_fa / fa:.2f}x), cuDNN {cudnn:.2f} ms{a_fa}", fa <= flex_fa),
            (T, "SSA-only: >= 1.4x faster than FlexAttention, same mask",
             f"{ssa:.3f} ms vs Flex {flex_ssa:.3f} ms ({flex_ssa / ssa:.2f}x){a_ssa}", flex_ssa / ssa >= 1.4),
            (T, "25% FA mix: within 10% of 0.25 FA-only + 0.75 SSA-only",
             f"{mix:.3f} ms vs {pred:.3f} ms predicted ({100 * (mix / pred - 1):+.1f}%)", mix <= 1.1 * pred),
            (T, "25% FA mix: >= 1.3x faster than FlexAttention, same mask",
             f"{mix:.3f} ms vs Flex {flex_mix:.3f} ms ({flex_mix / mix:.2f}x){a_mix}", flex_mix / mix >= 1.3),
            (T, "XA estimate: <= 10% of the FA-only time (target at 128K)",
             f"{est:.2f} ms = {100 * est / fa:.1f}% of {fa:.2f} ms", est <= 0.1 * fa),
        ]
        for sk_k in args.sk_ks:
            case = f"SK-only, window {args.window - sk_k} + k {sk_k}"
            sk, sel = get(T, case, "elastic_attention (selection + attention)"), get(T, case, "sk_select alone")
            sk_kernel = get(T, case, "elastic_attention, selection given")
            targets.append((T, f"{case}: within 1.3x of SSA-only (same keys per query), selection included",
                            f"{sk:.3f} ms vs SSA {ssa:.3f} ms ({sk / ssa:.2f}x); selection {sel:.3f} ms, "
                            f"attention {sk_kernel:.3f} ms ({sk_kernel / ssa:.2f}x)", sk <= 1.3 * ssa))
    return targets


def prefill_report(res, targets, args, config, sweep_lines, device="cuda"):
    """The markdown of bench_results.md (or bench_sk_results.md): one table per length, the targets, the sweep."""
    H, G, D = args.heads, args.kv_heads, args.head_dim
    empty, packed = torch.empty(0, device=device), kernel.packed_heads(H // G, False)
    lines = [
        "# Elastic attention prefill benchmark (bench.py)",
        "",
        provenance(device),
        "",
        f"Llama-3.1-8B attention shape: B={B}, {H} query / {G} KV heads, D={D}, {str(DTYPE)[6:]}, causal. "
        f"SSA sink {args.sink}, window {args.window}; XA threshold {args.xa_threshold}, stride {args.xa_stride}; "
        f"SK sink {args.sink}, window + k = {args.window} (random scores). Kernel config: " + (
            f"`{json.dumps(config)}`." if config else
            f"`{json.dumps(kernel._default_config(empty))}` where a head runs XA, else {packed} query heads a "
            f"program (GQA packed): `{json.dumps(kernel._default_config(empty, packed))}`."),
        "",
        "Times are medians of CUDA-event timings of the whole call: elastic_attention includes its mode check, "
        "its XA estimate and its work list. TFLOP/s count 4·D flops per (query, key) pair actually computed "
        "(the causal half for dense). 'vs fastest dense' = the fastest FA-only time at that length / this time. "
        "SDPA gets K/V expanded to all query heads before the timing; FlexAttention is compiled, its block "
        "mask built before the timing (it runs on the XA blocks the kernel selected, without the estimate). "
        "SK: elastic_attention with sk_scores includes the selection (sk_select, also timed alone); "
        "FlexAttention SK (attention.sk_flex_attention) includes its selection and block mask, and is skipped "
        f"beyond T = {args.flex_sk_max_len}: with random scores the selected keys' blocks are nearly all the "
        "candidate blocks, so it costs about as much as dense attention.",
        "",
    ]
    for T in sorted({row[0] for row in res.rows}):
        dense = min((ms for (t, case, _), ms in res.ms.items() if t == T and case.startswith("FA-only")),
                    default=float("nan"))
        lines += [f"## T = {T}", "", "| case | method | ms | TFLOP/s | vs fastest dense | note |",
                  "|---|---|---:|---:|---:|---|"]
        for t, case, method, ms, tflops, note in res.rows:
            if t == T:
                tf = f"{tflops:.0f}" if tflops > 0 else "-"
                vs = f"{dense / ms:.2f}x" if dense == dense else "-"  # no dense timed (--sk): nan
                lines.append(f"| {case} | {method} | {ms:.3f} | {tf} | {vs} | {note} |")
        lines.append("")
    lines += ["## Targets (issue 3: H100, T = 32K; the XA estimate at 128K)", "",
              "| T | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {T} | {name} | {value} | {'yes' if met else 'no'} |" for T, name, value, met in targets]
    lines.append("")
    if sweep_lines:
        lines += ["## Tile-config sweep", "", "```"] + sweep_lines + ["```", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# optional sweep of kernel tile configs (--sweep): the best goes to the prefill cases


def slog(lines, line):  # a sweep line: printed and kept for the report
    log(line)
    lines.append(line)


def sweep_tiles(args, q, k, v, ref, base, lines):
    """The attention tile configs of --sweep-configs on FA-only, SSA-only and a 25% FA mix -> the best (or None)."""
    G = k.shape[1]
    best, best_t = None, float("inf")
    mix = torch.full((B, G), SSA, device=q.device)
    mix[0, :G // 4] = FA
    for bm, bn, warps, stages in args.sweep_configs * args.sweep_repeat:
        cfg = dict(base, BLOCK_M=bm, BLOCK_N=bn, NUM_WARPS=warps, NUM_STAGES=stages)
        name = f"BLOCK_M={bm} BLOCK_N={bn} warps={warps} stages={stages}"
        try:
            t0 = time.perf_counter()
            o = kernel.elastic_attention(q, k, v, torch.full((B, G), FA, device=q.device), _config=cfg)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
            t_fa, t_ssa, t_mix = (timeit(lambda: kernel.elastic_attention(q, k, v, modes, _config=cfg))
                                  for modes in (torch.full((B, G), FA, device=q.device),
                                                torch.full((B, G), SSA, device=q.device), mix))
            slog(lines, f"  {name}: FA {t_fa:.2f} ms, SSA {t_ssa:.3f} ms, 25% FA mix {t_mix:.3f} ms, "
                        f"rel err vs cuDNN {err:.1e}, first call {compile_s:.1f} s")
            score = t_fa + 3 * t_ssa + 4 * t_mix  # terms of similar size at 32K
            if err < 1e-2 and score < best_t:
                best, best_t = cfg, score
        except Exception as e:  # a config that does not fit (shared memory) is skipped
            slog(lines, f"  {name}: failed: {str(e).splitlines()[0][:120]}")
    return best


def sweep_xa(args, q, k, best, base, lines):
    """XA estimate tile configs on top of the best attention config -> the config to bench with."""
    kw = xa_kw(args)
    ref_mask = xattn.xattn_block_mask(q, k, _config=base, **kw)
    xbest, xbest_t = None, float("inf")
    for bi, bj, warps, stages in [(128, 128, 8, 3), (128, 128, 4, 3), (128, 64, 8, 3)]:
        cfg = dict(best or base, XA_BLOCK_I=bi, XA_BLOCK_J=bj, XA_WARPS=warps, XA_STAGES=stages)
        name = f"XA_BLOCK_I={bi} XA_BLOCK_J={bj} warps={warps} stages={stages}"
        try:
            mask = xattn.xattn_block_mask(q, k, _config=cfg, **kw)
            t = timeit(lambda: xattn.xattn_block_mask(q, k, _config=cfg, **kw))
            same = (mask == ref_mask).float().mean().item()
            slog(lines, f"  {name}: estimate {t:.3f} ms, mask agreement {same:.6f}")
            if same > 0.999 and t < xbest_t:
                xbest, xbest_t = cfg, t
        except Exception as e:
            slog(lines, f"  {name}: failed: {str(e).splitlines()[0][:120]}")
    return dict(xbest or best or base)


def sweep(args):
    """-> (the kernel config to bench with, the sweep's lines for the report)."""
    T, H, G = args.sweep_len, args.heads, args.kv_heads
    q, k, v = random_qkv(args, T)
    ref = sdpa(SDPBackend.CUDNN_ATTENTION, q, k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1))
    base = kernel._default_config(q)
    lines = []
    slog(lines, f"sweep at T={T}: attention tile configs (FA-only, SSA-only), then XA estimate configs")
    best = sweep_tiles(args, q, k, v, ref, base, lines)
    config = sweep_xa(args, q, k, best, base, lines)
    slog(lines, f"best config: {json.dumps(config)}")
    return config, lines


# -----------------------------------------------------------------------------
# the decode kernel alone (--decode)


def copy_bandwidth(device="cuda"):
    """Device-to-device copy bandwidth in bytes/s (read + write), the ceiling a decode step works against. On the
    CPU (the tests) a smaller buffer: the number only scales the reported floor."""
    x = torch.empty(2 * 2**30 if torch.device(device).type == "cuda" else 2**26, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = timeit(lambda: y.copy_(x), budget_ms=300, device=device)
    return 2 * x.numel() / (ms * 1e-3)


def graphed_ms(fn):
    """Time of fn replayed from a CUDA graph (as in a decode step): no Python launch overhead."""
    fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return timeit(graph.replay, budget_ms=200)


def decode_rows(args, q, k_new, v_new, pos, T, share, bandwidth):
    """One layer's decode at B rows of T cached tokens, a share of its KV heads SSA rings: the kernel at a few
    tile configs (and SDPA flash on the same dense cache when no head is SSA) -> the report's lines."""
    Bm, H, D = q.shape
    G = k_new.shape[1]
    n_ssa = round(share * G)
    caps = torch.tensor(([T + 64] * (G - n_ssa) + [args.sink + args.window] * n_ssa) * Bm, dtype=torch.int32,
                        device=q.device)
    base = torch.cat([caps.new_zeros(1), caps.cumsum(0)[:-1].int()])
    kc, vc = (torch.randn(int(caps.sum()), D, device=q.device, dtype=DTYPE) for _ in range(2))
    floor = 2 * int(torch.minimum(caps, pos.repeat_interleave(G) + 1).sum()) * D * 2 / bandwidth * 1e3
    lines = []
    # slots per program from 128 to 2048, and the length KVCache fits to one wave (decode_kernel.decode_split): at
    # B = 1 few segments are long, and the best split balances the programs over the multiprocessors
    fit = decode_split(caps.tolist(), decode_wave(q.device))
    for split, bn, warps, stages in [(fit, 64, 4, 3), (128, 64, 4, 2), (256, 64, 4, 2), (512, 64, 4, 2),
                                     (1024, 64, 4, 3), (2048, 64, 4, 3), (2048, 128, 8, 3)]:
        n_splits = decode_splits(int(caps.max()), split)
        work = torch.tensor(decode_work(caps.tolist(), n_splits, split), dtype=torch.int32, device=q.device)
        ms, ms_grid = (graphed_ms(lambda: decode_attention(
            q, k_new, v_new, kc, vc, base, caps, pos, sink=args.sink, window=args.window, n_splits=n_splits,
            split=split, work=w, _config=dict(BLOCK_N=bn, NUM_WARPS=warps, NUM_STAGES=stages))) for w in (work, None))
        lines.append(f"- B={Bm} T={T} SSA share {share}: split {split} BLOCK_N {bn} warps {warps} stages "
                     f"{stages}: {ms * 1e3:.1f} us with the work list ({work.numel()} programs; every chunk of every "
                     f"segment: {ms_grid * 1e3:.1f} us, {Bm * G * n_splits}), floor {floor * 1e3:.1f} us "
                     f"({floor / ms:.0%} of bandwidth)")
        log(lines[-1])
    if share == 0.0:  # SDPA flash decode over the same dense cache, the group's query heads as query rows
        kd = kc.view(Bm, G, T + 64, D)[:, :, :T + 1]
        vd = vc.view(Bm, G, T + 64, D)[:, :, :T + 1]
        qd = q.view(Bm, G, H // G, D)
        ms = graphed_ms(lambda: sdpa(SDPBackend.FLASH_ATTENTION, qd, kd, vd, is_causal=False))
        lines.append(f"- B={Bm} T={T} dense: SDPA flash {ms * 1e3:.1f} us ({floor / ms:.0%} of bandwidth)")
        log(lines[-1])
    return lines


def bench_decode(args):
    """The decode kernel alone: B rows of T cached tokens, the Llama-3.1-8B attention shape, every head FA or 70%
    of them SSA rings (sink + window); time per layer against the bytes it must read. -> the report's markdown."""
    H, G, D = args.heads, args.kv_heads, args.head_dim
    bandwidth = copy_bandwidth()
    lines = [f"# The decode kernel alone (`{command_line('bench.py')}`)", "",
             f"{provenance('cuda')} · copy bandwidth {bandwidth / 1e12:.2f} TB/s. Each call replayed from a CUDA "
             f"graph (as in a decode step); one layer of {H} query / {G} KV heads, D {D}, bf16; floor: the filled "
             f"cache bytes over the copy bandwidth. SSA share 0.7: 70% of KV heads are rings of sink {args.sink} + "
             f"window {args.window}.", ""]
    for Bm, T in [(1, T) for T in args.seq_lens] + [(args.batch, args.seq_lens[0])]:
        q = torch.randn(Bm, H, D, device="cuda", dtype=DTYPE)
        k_new, v_new = (torch.randn(Bm, G, D, device="cuda", dtype=DTYPE) for _ in range(2))
        pos = torch.full((Bm,), T, dtype=torch.int32, device="cuda")
        for share in (0.0, 0.7):
            lines += decode_rows(args, q, k_new, v_new, pos, T, share, bandwidth)
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    cuda_device()
    torch.backends.cuda.matmul.allow_tf32 = True

    if args.decode:  # the decode kernel alone
        write_atomic(args.out, bench_decode(args))
        return

    # the prefill cases, after an optional tile sweep; the report is rewritten after each length
    config, sweep_lines = sweep(args) if args.sweep else (args.config, [])
    torch.cuda.empty_cache()
    flex = None if (args.no_flex or args.sk) else torch.compile(flex_attention, dynamic=False)
    res = Results(args.head_dim)
    for T in args.seq_lens:
        bench_length(res, args, T, config, flex)
        torch.cuda.empty_cache()
        targets = prefill_targets(res, args)
        log("targets:")
        for t, name, value, met in targets:
            log(f"  T={t}: {name}: {value} -> {'met' if met else 'MISSED'}")
        write_atomic(args.out, prefill_report(res, targets, args, config, sweep_lines))
        log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
