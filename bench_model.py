"""
A whole model end to end on the GPU: a model of a config.json with random weights (timings need no checkpoint), its
first token (the prefill), its decode step and its KV cache, dense against Elastic Attention (arXiv 2601.17367) at
Omega 0.7 (that share of KV heads sparse, the rest full), against the bytes a decode step must read.

    python bench_model.py --model configs/llama-3.1-8b.json --seq-lens 32768 130944   # -> bench_model_results.md
    python bench_model.py --model configs/llama-3.1-8b.json --batch 1 --setups flash ours-dense fa-ssa  # the anchors

Setups (--setups picks some): dense SDPA over a contiguous cache (eager; and with static shapes in a CUDA graph,
gpt-fast's way), dense flash decoding over it (the fair dense anchor), ours all FA, and ours FA-SSA and XA-SSA at
--sparse-ratio (the KV cache of attention.py, the decode kernel of decode_kernel.py, one CUDA graph per step,
torch.compile around it). The floor: the weights once and every filled cache slot once over the copy bandwidth
measured in the same run. For our setups, where a step's time goes: every layer's attention alone and every GEMV
alone, each against its floor, and the rest. FA-SSA's first token against Amdahl's ideal: the dense prefill with a
share Omega of the attention at the SSA speed, from one layer's prefill attention timed in each mode. pytest
test_bench.py runs every setup eagerly on the CPU on a tiny model (bench_model(device="cpu")) and checks that the
dense paths decode alike.
"""
import argparse
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from attention import KVCache, dense_attention, routed_attention
from bench import DTYPE, copy_bandwidth, cuda_device, log, sync, timeit
from cli import command_line, fail, model_config, provenance, write_atomic
from generate import CUDAGraphStep, compiled_decode_one_token, decode_one_token
from kernel import FA, SSA
from model import ModelConfig, Transformer, rope_inv_freq
from router import ElasticConfig, Routers
from static_hybrid import static_modes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="config.json of the model (e.g. configs/llama-3.1-8b.json)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 130944], help="prompt lengths T")
    parser.add_argument("--sink", type=int, default=128, help="SSA sink tokens")
    parser.add_argument("--window", type=int, default=2048, help="SSA window tokens")
    parser.add_argument("--sparse-ratio", type=float, default=0.7, help="Omega of the elastic runs")
    parser.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per run")
    parser.add_argument("--compile-sdpa", action="store_true", help="torch.compile the dense SDPA baseline's step "
                        "too (gpt-fast's way; a minute of compiling per length, little gain)")
    parser.add_argument("--batch", type=int, default=8, help="also decode this many prompts of the first length "
                        "together (1: skip)")
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS), metavar="SETUP",
                        help=f"which setups run (default all: {' '.join(SETUPS)}); flash, ours-dense and fa-ssa are "
                        "the fair anchor, our dense path and the method")
    parser.add_argument("--out", default="bench_model_results.md", help="markdown file to write")
    parser.error = lambda message: fail(f"{message} (python bench_model.py --help lists the flags)")  # one line
    args = parser.parse_args(argv)
    model_config(args.model)
    if args.decode_tokens < 2:
        fail(f"--decode-tokens {args.decode_tokens}: a run times the steps after the first, so decode >= 2")
    return args


# -----------------------------------------------------------------------------
# the dense baseline's cache, the setups, one run of a setup


class SdpaCache:
    """The dense baselines' KV cache: one contiguous buffer per layer (what a HuggingFace-style model holds), read
    three ways. kind "eager": SDPA over the cache sliced to its length (flash backend; a host read of the length:
    no CUDA graph). "graph": SDPA over the whole buffer with a mask of the filled positions, static shapes for a
    CUDA graph (gpt-fast's way; the mask keeps SDPA off its flash kernel). "flash": flash decoding, FlashAttention's
    varlen kernel told each row's filled length on the device (seqused_k, split along the keys): static shapes and
    the fastest dense decode attention PyTorch ships, the fair dense anchor (on the CPU: as "eager").
    Same interface as attention.KVCache."""

    def __init__(self, max_new_tokens, kind="eager"):
        self.max_new_tokens, self.kind = max_new_tokens, kind

    def prefill(self, k, v, modes, sk_scores=None, lengths=None):  # rows of one length, every head dense
        B, G, T, D = k.shape
        n = T + self.max_new_tokens
        if self.kind == "flash":  # token-major [B, T + new, G, D], as the flash kernel reads it
            self.k, self.v = k.new_zeros(B, n, G, D), v.new_zeros(B, n, G, D)
            self.k[:, :T], self.v[:, :T] = k.transpose(1, 2), v.transpose(1, 2)
            self.cu_q = torch.arange(B + 1, device=k.device, dtype=torch.int32)
            self.cu_k = self.cu_q * n
        else:
            self.k, self.v = k.new_zeros(B, G, n, D), v.new_zeros(B, G, n, D)
            self.k[:, :, :T], self.v[:, :, :T] = k, v

    def decode(self, q, k, v, pos, u=None):  # u: the new keys' SK scores; every head here is dense
        B, H, _, D = q.shape
        G = k.shape[1]
        rows = torch.arange(B, device=q.device)
        if self.kind == "flash":
            self.k[rows, pos], self.v[rows, pos] = k[:, :, 0], v[:, :, 0]
            if q.is_cuda:
                y = torch.ops.aten._flash_attention_forward(
                    q.reshape(B, H, D), self.k.view(-1, G, D), self.v.view(-1, G, D), self.cu_q, self.cu_k, 1,
                    self.k.shape[1], 0.0, False, False, seqused_k=pos + 1)[0]
                return y.reshape(B, H, 1, D)
            keys, values = self.k.transpose(1, 2), self.v.transpose(1, 2)
        else:
            self.k[rows, :, pos], self.v[rows, :, pos] = k[:, :, 0], v[:, :, 0]
            keys, values = self.k, self.v
        q = q.reshape(B, G, H // G, D)  # a group's query heads on the query axis: GQA without copies
        if self.kind == "graph":
            mask = torch.arange(keys.shape[2], device=q.device) <= pos[:, None, None, None]  # [B, 1, 1, T + new]
            y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        else:
            n = int(pos.max()) + 1
            mask = None if B == 1 else torch.arange(n, device=q.device) <= pos[:, None, None, None]
            y = F.scaled_dot_product_attention(q, keys[:, :, :n], values[:, :, :n], attn_mask=mask)
        return y.reshape(B, H, 1, D)

    def nbytes(self, row=None):
        return 2 * self.k[0].numel() * self.k.element_size() * (self.k.shape[0] if row is None else 1)


class Setup(NamedTuple):
    """One way of running the model: a row of the table at each (B, T)."""
    name: str
    pair: str                    # the mode pair (router.ElasticConfig) its sparse heads run
    modes: torch.Tensor | None   # fixed modes [1, L, G]; None: every head dense, through SDPA
    cache: str                   # "ours" (KVCache), or SdpaCache's kind: "eager", "graph" or "flash"
    compiled: bool               # torch.compile the decode step before capturing it


@dataclass
class ModelRow:
    """A setup's run at B prompts of T tokens; error says why it failed (the other fields then stay empty)."""
    B: int
    T: int
    setup: str
    ttft: float = float("nan")   # first token: ms of the prefill
    ms: float = float("nan")     # ms per decode step
    floor: float = float("nan")  # ms a step needs at the copy bandwidth
    kv: int = 0                  # KV-cache bytes
    tokens: list | None = None   # the greedy tokens, [B][decode_tokens]: the first from the prefill
    attn_ms: float = float("nan")     # ours: every layer's decode attention alone, and its floor (the cache bytes)
    attn_floor: float = float("nan")
    gemv_ms: float = float("nan")     # ours: every GEMV of the step alone (its floor: the weights)
    omega: float = 0.0                # share of KV heads in the sparse mode (as static_modes rounded it)
    error: str | None = None


@dataclass
class ModelResults:
    rows: list          # ModelRow of every (B, T, setup), failed ones included
    router_ms: dict     # T -> ms of every layer's router on one prompt's keys
    prefill_attn: dict  # T -> ms of one layer's prefill attention (B = 1): dense SDPA, ours all FA, ours all SSA
    layers: int
    weight_bytes: int   # what a decode step reads of the weights
    bandwidth: float    # copy bandwidth, bytes/s


def random_model(path, device):
    """The model of a config.json with random weights, straight on the device (bf16 on the GPU: timings need no
    checkpoint; fp32 on the CPU, where the tests compare the setups' tokens)."""
    cfg = ModelConfig.from_json(path)
    torch.manual_seed(0)
    torch.set_default_dtype(DTYPE if torch.device(device).type == "cuda" else torch.float32)
    try:
        with torch.device(device):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.inv_freq = rope_inv_freq(cfg).to(device)  # in fp32, as from_pretrained makes it
    return model.eval().requires_grad_(False)


FLASH = "dense flash decoding, CUDA graph"  # the fair dense anchor: the speed-ups are stated against it and ours
SDPA_PREFILLED = ("dense SDPA, eager", "dense SDPA, CUDA graph", FLASH)  # prefilled by dense SDPA alike


SETUPS = ("sdpa-eager", "sdpa-graph", "flash", "ours-dense", "fa-ssa", "xa-ssa", "fa-ssa-eager")  # model_setups order


def model_setups(model, args):
    """Dense SDPA (eager; static shapes in a CUDA graph), dense flash decoding (compiled), ours all FA, and ours at
    Omega = --sparse-ratio in FA-SSA and XA-SSA (compiled, and FA-SSA not compiled). On the GPU every setup but the
    first replays a CUDA graph per step."""
    L, G = model.config.num_hidden_layers, model.config.num_key_value_heads
    scores = torch.rand(L, G, device=model.output_weight().device)  # which heads stay full does not change the time
    setups = [Setup("dense SDPA, eager", "FA-SSA", None, "eager", False),
              Setup("dense SDPA, CUDA graph", "FA-SSA", None, "graph", args.compile_sdpa),
              Setup(FLASH, "FA-SSA", None, "flash", True),
              Setup("dense, ours (all FA)", "FA-SSA", model.fixed_modes(FA), "ours", True)]
    for pair in ("FA-SSA", "XA-SSA"):
        ec = ElasticConfig(mode_pair=pair, sink=args.sink, window=args.window)
        setups.append(Setup(f"{pair}, Omega {args.sparse_ratio}", pair, static_modes(scores, args.sparse_ratio, ec),
                            "ours", True))
    setups.append(setups[-2]._replace(name=setups[-2].name + ", not compiled", compiled=False))
    return [setup for key, setup in zip(SETUPS, setups) if key in args.setups]


def decode_step(model, setup, token, pos, caches, device):
    """step(token, pos) -> logits: replayed from a CUDA graph (torch.compile first if the setup says so), or eager
    for dense SDPA eager (the host launches every kernel of every step) and on the CPU."""
    if setup.cache == "eager" or torch.device(device).type != "cuda":
        return lambda t, p: decode_one_token(model, t, p, caches)
    t0 = time.perf_counter()
    step = CUDAGraphStep(model, token, pos, caches, compiled_decode_one_token() if setup.compiled else decode_one_token)
    log(f"  CUDA graph{' and torch.compile' if setup.compiled else ''}: {time.perf_counter() - t0:.1f} s")
    return step


def step_bytes(setup, caches, T, new, weight_bytes, head_dim):
    """What a decode step must read, on average over the run: the weights once and every filled cache slot once
    (SSA rings: sink + window)."""
    if setup.cache != "ours":
        return weight_bytes + sum(c.nbytes() for c in caches) * (T + new // 2) / (T + new)
    return weight_bytes + sum(
        2 * int(torch.minimum(c.cap, torch.tensor(T + new // 2, device=c.cap.device)).sum()) * head_dim
        * c.k.element_size() for c in caches)


def replayed(fn, device):
    """fn captured once in a CUDA graph -> its replay (on the CPU: fn itself)."""
    if torch.device(device).type != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up outside the graph
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def step_split(model, caches, pos, device):
    """Where a decode step of ours spends its time: every layer's attention over its cache alone (the decode kernel,
    B new tokens at pos) and every GEMV of the step alone (q/k/v, o, gate/up, down, the head, for B tokens), each in
    its own CUDA graph -> (attention ms, GEMV ms). The step less both is the rest: norms, RoPE, residuals, sampling."""
    cfg, W = model.config, model.output_weight()
    B, H, G, D = pos.shape[0], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = torch.randn(B, H, 1, D, device=device, dtype=W.dtype)
    k, v = (torch.randn(B, G, 1, D, device=device, dtype=W.dtype) for _ in range(2))
    weights = [m.weight for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)] + [W]
    xs = {n: torch.randn(B, n, device=device, dtype=W.dtype) for n in {w.shape[1] for w in weights}}

    def attention():
        for cache in caches:
            cache.decode(q, k, v, pos)  # rewrites slot pos, as the warm-up steps do

    def gemvs():
        for w in weights:
            F.linear(xs[w.shape[1]], w)
    return tuple(timeit(replayed(fn, device), budget_ms=200, device=device) for fn in (attention, gemvs))


def time_setup(model, setup, idx, args, weight_bytes, bandwidth, device, warm_up=True):
    """One setup on the prompts idx [B, T]: the prefill (first token; after a warm-up prefill that compiles its
    kernels, unless an earlier setup's ran the same ones), then decode_tokens - 1 greedy steps timed -> ModelRow.
    A failure (out of memory, a compile that fails) is a row with its error: the other setups run."""
    Bm, T = idx.shape
    new, L = args.decode_tokens, model.config.num_hidden_layers
    model.elastic = ElasticConfig(mode_pair=setup.pair, sink=args.sink, window=args.window)
    if setup.cache == "ours":
        caches = [KVCache(new, args.sink, args.window) for _ in range(L)]
    else:
        caches = [SdpaCache(new, setup.cache) for _ in range(L)]
    try:
        if warm_up:
            model(idx, modes=setup.modes, last_only=True)  # warm-up at the same length: kernels compile once
        sync(device)
        t0 = time.perf_counter()
        logits = model(idx, modes=setup.modes, caches=caches, last_only=True)[:, -1]  # B prompts of T tokens
        sync(device)
        ttft = (time.perf_counter() - t0) * 1e3
        token, pos = logits.argmax(-1), torch.full((Bm,), T, dtype=torch.int32, device=device)
        step = decode_step(model, setup, token, pos, caches, device)
        for _ in range(3):
            step(token, pos)  # rewrites position T: the same keys each time
        sync(device)
        tokens = [token]
        t0 = time.perf_counter()
        for i in range(new - 1):
            token = step(token, pos + i).argmax(-1)
            tokens.append(token)
        sync(device)
        ms = (time.perf_counter() - t0) * 1e3 / (new - 1)
        kv = sum(c.nbytes() for c in caches)
        floor = step_bytes(setup, caches, T, new, weight_bytes, model.config.head_dim) / bandwidth * 1e3
        split = (float("nan"),) * 2
        if setup.cache == "ours":
            try:
                split = step_split(model, caches, pos, device)
            except Exception as e:  # the row keeps its timings without the split
                log(f"B={Bm} T={T} {setup.name}: no split of the step: {type(e).__name__}: {e}")
    except Exception as e:  # out of memory, or a compile that fails: the row says so, the others run
        error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        log(f"B={Bm} T={T} {setup.name}: failed: {error}")
        return ModelRow(Bm, T, setup.name, error=error)
    log(f"B={Bm} T={T} {setup.name}: first token {ttft:.0f} ms, decode {ms:.2f} ms/step "
        f"({Bm * 1e3 / ms:.0f} tokens/s), floor {floor:.2f} ms ({ms / floor:.2f}x), KV {kv / 2**30:.2f} GiB")
    omega = 0.0 if setup.modes is None else float((setup.modes == SSA).float().mean())
    return ModelRow(Bm, T, setup.name, ttft, ms, floor, kv, torch.stack(tokens, 1).tolist(), split[0],
                    floor - weight_bytes / bandwidth * 1e3, split[1], omega)


# -----------------------------------------------------------------------------
# the benchmark and its report


def router_latency(model, seq_lens, device):
    """The routers' latency per prefill: every layer's router on its keys as inference runs it (frozen, no
    autograd: on the GPU one launch per layer, router_kernel.py) -> {T: ms}."""
    cfg = model.config
    routers = Routers(cfg.num_hidden_layers, cfg.head_dim).to(device).requires_grad_(False)
    router_ms = {}
    for T in seq_lens:
        k_pre = torch.randn(1, T, cfg.num_key_value_heads, cfg.head_dim, device=device,
                            dtype=model.output_weight().dtype)
        with torch.no_grad():
            router_ms[T] = timeit(lambda: [r(k_pre) for r in routers], budget_ms=300, device=device)
        log(f"routers at T={T}: {router_ms[T]:.2f} ms per prefill, {router_ms[T] / cfg.num_hidden_layers:.3f} ms "
            "per layer")
    return router_ms


def prefill_attention(model, args, seq_lens, device):
    """One layer's prefill attention at B = 1, every KV head in one mode, as the model runs it: dense SDPA (the dense
    setups), and the fused kernel with every head FA or every head SSA -> {T: (dense, FA, SSA) ms}: the per-mode
    times that Amdahl's ideal first token is built from."""
    cfg, dtype = model.config, model.output_weight().dtype
    H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    ec = ElasticConfig(mode_pair="FA-SSA", sink=args.sink, window=args.window)
    times = {}
    for T in seq_lens:  # q, k and v as model.Attention makes them: token-major views of one projection
        qkv = torch.randn(1, T, (H + 2 * G) * D, device=device, dtype=dtype).split([H * D, G * D, G * D], -1)
        q, k, v = (x.view(1, T, -1, D).transpose(1, 2) for x in qkv)
        with torch.no_grad():
            times[T] = (timeit(lambda: dense_attention(q, k, v), budget_ms=300, device=device),
                        *(timeit(lambda m=m: routed_attention(q, k, v, torch.full((1, G), m, device=device), ec),
                                 budget_ms=300, device=device) for m in (FA, SSA)))
        log(f"prefill attention at T={T}, one layer: dense SDPA {times[T][0]:.2f} ms, ours FA {times[T][1]:.2f} ms, "
            f"SSA {times[T][2]:.2f} ms")
    return times


def bench_model(args, device="cuda", progress=None):
    """A model of random weights from --model, every setup at B = 1 and each of --seq-lens, and at B = --batch and
    the first length -> ModelResults. progress(results so far) after each (B, T), so that a run cut short keeps
    what it measured. device "cpu": every setup runs eagerly (the tests)."""
    model = random_model(args.model, device)
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                       if "embed_tokens" not in name or cfg.tie_word_embeddings)  # a step reads B embedding rows
    bandwidth = copy_bandwidth(device)
    log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; weights read per step {weight_bytes / 1e9:.2f} GB")
    res = ModelResults([], router_latency(model, args.seq_lens, device),
                       prefill_attention(model, args, args.seq_lens, device), cfg.num_hidden_layers, weight_bytes,
                       bandwidth)
    setups = model_setups(model, args)
    runs = [(1, T) for T in args.seq_lens] + ([(args.batch, args.seq_lens[0])] if args.batch > 1 else [])
    for Bm, T in runs:
        idx = torch.randint(0, cfg.vocab_size, (Bm, T), device=device)
        warm = set()  # the prefills run so far at (B, T): dense SDPA, or our kernels of a mode pair
        for setup in setups:
            prefill = (setup.pair, setup.cache == "ours")
            res.rows.append(time_setup(model, setup, idx, args, weight_bytes, bandwidth, device, prefill not in warm))
            warm.add(prefill)
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
        if progress is not None:
            progress(res)
    return res


def model_report(args, res, device="cuda"):
    """The markdown of bench_model_results.md: one row per setup and (B, T), speed-ups against the dense
    baselines, the router latency; setups that failed are listed under the table."""
    L, new, wb, bw = res.layers, args.decode_tokens, res.weight_bytes, res.bandwidth
    lines = [f"# End to end: {args.model}, random weights", "",
             f"{provenance(device)} · `{command_line('bench_model.py')}`", "",
             f"{'bf16' if torch.device(device).type == 'cuda' else 'fp32'}; SSA sink {args.sink}, window "
             f"{args.window}; Omega {args.sparse_ratio}: that share of KV heads "
             f"sparse (SSA), the rest full (FA) or XA. First token: the prefill of B prompts of T tokens (a single "
             f"run after a warm-up). Decode: mean ms per step over {new - 1} greedy steps, B tokens per step. "
             f"Floor: the bytes a step must read (the weights once, {wb / 1e9:.2f} GB, and every filled "
             f"cache slot once) over the copy bandwidth measured in the same run, {bw / 1e12:.2f} TB/s. "
             f"KV cache: bytes held for prompt + new tokens. Dense SDPA: a contiguous cache; eager (sliced to its "
             f"length, flash) or in a CUDA graph (the whole buffer with a mask). Dense flash decoding: the same "
             f"cache read by FlashAttention's varlen kernel with each row's length on the device (split along the "
             f"keys), in a CUDA graph, compiled: the fair dense anchor. Ours: the per-head cache of "
             f"attention.py, the decode kernel of decode_kernel.py, one CUDA graph per step; compiled: the step's "
             f"small operations fused by torch.compile around the GEMVs and the attention kernel (generate.py, "
             f"compile=True).", "",
             "| B | prompt | setup | first token ms | decode ms/step | tokens/s | floor ms | x floor | vs SDPA eager "
             "| vs flash decoding | vs ours dense | KV GiB |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    done = [r for r in res.rows if r.error is None]
    for r in done:
        base = {o.setup: o.ms for o in done if (o.B, o.T) == (r.B, r.T)}
        vs = [f"{base[n] / r.ms:.2f}x" if n in base else "-"  # a baseline that failed (out of memory): no ratio
              for n in ("dense SDPA, eager", FLASH, "dense, ours (all FA)")]
        lines.append(f"| {r.B} | {r.T} | {r.setup} | {r.ttft:.0f} | {r.ms:.2f} | {r.B * 1e3 / r.ms:.1f} | "
                     f"{r.floor:.2f} | {r.ms / r.floor:.2f} | {' | '.join(vs)} | {r.kv / 2**30:.2f} |")
    lines += split_table(done, wb / bw * 1e3)
    lines += ideal_table(done, res.prefill_attn, L, args.sink + args.window)
    failed = [r for r in res.rows if r.error is not None]
    if failed:
        lines += ["", "Failed (no row above):"] + [f"- B={r.B} T={r.T} {r.setup}: {r.error}" for r in failed]
    lines += ["", "Router latency per prefill (all layers, inference, random routers): " + ", ".join(
        f"T={T}: {ms:.2f} ms ({ms / L:.3f} ms per layer)" for T, ms in res.router_ms.items()) + "."]
    return "\n".join(lines) + "\n"


def ideal_table(rows, prefill_attn, layers, ring):
    """The FA-SSA first tokens at B = 1 against Amdahl's ideal: a dense prefill with a share Omega of every layer's
    attention at the SSA speed instead, ideal = dense first token - L * Omega * (dense attention - SSA attention),
    every other part as the dense prefill runs it. Two dense prefills: SDPA (its FA heads at cuDNN's speed: the
    strict ideal) and ours all FA (the same kernel for both modes). Prompts no longer than sink + window (ring) are
    skipped: there SSA is FA."""
    lines = ["", "FA-SSA's first token at B = 1 against Amdahl's ideal: a dense prefill with a share Omega of every "
             "layer's attention at the SSA speed instead, from one layer's prefill attention timed alone in each "
             "mode, on q, k and v laid out as the model makes them (median of several runs; the first tokens are "
             "single runs after a warm-up). Ideal from dense SDPA (the FA heads at its speed) and from ours all FA; "
             "the ratios: ideal over measured.", "",
             "| prompt | setup | Omega | attention per layer ms: SDPA / ours FA / ours SSA | first token ms | ideal "
             "from SDPA ms (ratio) | ideal from ours all FA ms (ratio) |", "|---:|---|---:|---|---:|---:|---:|"]
    dense = {(o.T, o.setup): o.ttft for o in rows if o.B == 1}
    for o in rows:  # the dense SDPA prefill: the first token of any setup that decodes from SdpaCache
        if o.B == 1 and o.setup in SDPA_PREFILLED:
            dense.setdefault((o.T, "dense SDPA"), o.ttft)
    for r in rows:
        if r.B != 1 or not r.setup.startswith("FA-SSA") or r.T not in prefill_attn or r.T <= ring \
                or (r.T, "dense SDPA") not in dense or (r.T, "dense, ours (all FA)") not in dense:
            continue
        sdpa, fa, ssa = prefill_attn[r.T]
        ideal = dense[r.T, "dense SDPA"] - layers * r.omega * (sdpa - ssa)
        ideal_ours = dense[r.T, "dense, ours (all FA)"] - layers * r.omega * (fa - ssa)
        lines.append(f"| {r.T} | {r.setup} | {r.omega:.3f} | {sdpa:.2f} / {fa:.2f} / {ssa:.2f} | {r.ttft:.0f} | "
                     f"{ideal:.0f} ({ideal / r.ttft:.2f}) | {ideal_ours:.0f} ({ideal_ours / r.ttft:.2f}) |")
    return lines


def split_table(rows, weights_floor):
    """Where each of our decode steps spends its time, against the floors of its parts."""
    lines = ["", "Where our decode step's time goes: every layer's attention alone and every GEMV alone (each in its "
             "own CUDA graph; floors: the cache bytes and the weight bytes over the copy bandwidth), and the rest of "
             "the step (norms, RoPE, residuals, the head's argmax, launch gaps); the share of the gap between the "
             "step and its floor that each part holds.", "",
             "| B | prompt | setup | step ms (floor) | attention ms (floor) | GEMVs ms (floor) | rest ms "
             "| gap: attention / GEMVs / rest |", "|---:|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.attn_ms != r.attn_ms:  # not one of ours
            continue
        rest, gap = r.ms - r.attn_ms - r.gemv_ms, r.ms - r.floor
        shares = [r.attn_ms - r.attn_floor, r.gemv_ms - weights_floor, rest]
        lines.append(f"| {r.B} | {r.T} | {r.setup} | {r.ms:.2f} ({r.floor:.2f}) | {r.attn_ms:.2f} ({r.attn_floor:.2f}) "
                     f"| {r.gemv_ms:.2f} ({weights_floor:.2f}) | {rest:.2f} | "
                     + (" / ".join(f"{100 * x / gap:.0f}%" for x in shares) if gap > 0 else "at the floor") + " |")
    return lines


# -----------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    device = cuda_device()
    torch.backends.cuda.matmul.allow_tf32 = True
    res = bench_model(args, device, progress=lambda r: write_atomic(args.out, model_report(args, r, device)))
    log(model_report(args, res, device))  # the last progress call wrote the whole report


if __name__ == "__main__":
    main()
