"""
What one router training step costs at the paper's scale (Elastic Attention, arXiv 2601.17367, Sec. 3 and Table 6:
an 8B model, 8K-64K tokens, 8 A800s, under 12 hours): a model of a config.json with random weights (timings need no
checkpoint), one sequence of T random token ids, the real objective and routers and the real attention path, on one
GPU, against a dense forward + backward of the same frozen model.

    python bench_train.py --model configs/llama-3.1-8b.json --seq-lens 8192 16384 32768   # -> bench_train_results.md
    python bench_train.py --model configs/qwen3-8b.json --whole-sequence    # the loss on every token (the paper's)

Rows per length T, with activation checkpointing per block and without:
- routed step: train.train_step as training runs it (Gumbel straight-through routing at tau 1, both branches of
  every KV head mixed by z, Eq. 8 with the margin penalty), forward and backward, and the router optimiser's step;
- dense: the same frozen model with every head dense (SDPA), forward and a backward that reaches the embeddings, its
  attention's backward included (what any gradient through the frozen model costs; the routed step's extra is
  routing's price);
- the split of the routed step: attention of both branches (fwd + bwd, per layer x layers), the routers (all
  layers, fwd + bwd), and the rest (projections, MLPs, norms, the head, the recompute);
- the attention of both branches as training runs it (SDPA for FA, FlexAttention for SSA) against both branches in
  FlexAttention.
Peak GPU memory per row; a row that does not fit says so. The loss covers the last --answer-tokens positions (our
recipes' --answer-only) or, with --whole-sequence, every position (the paper's). pytest test_bench.py runs it on
the CPU on a tiny model.
"""
import argparse
import types
from dataclasses import dataclass

import torch

from attention import compiled_flex_attention, flex_block_mask, mixed_attention
from bench import log, sync, timeit
from bench_model import random_model
from cli import command_line, fail, model_config, provenance, write_atomic
from data import IGNORE, Batch
from kernel import FA
from router import MODE_PAIRS, ElasticConfig, Routers, SparsityConstraint
from train import cross_entropy, train_step

GiB = 2 ** 30


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="config.json of the model (e.g. configs/llama-3.1-8b.json)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768], help="tokens per step")
    parser.add_argument("--mode-pair", default="FA-SSA", choices=[p for p in MODE_PAIRS if "SK" not in p],
                        help="the routers' modes (SK needs its scorer's own path)")
    parser.add_argument("--sink", type=int, default=128, help="SSA sink tokens")
    parser.add_argument("--window", type=int, default=2048, help="SSA window tokens")
    parser.add_argument("--answer-tokens", type=int, default=64, help="trained positions at the end of the sequence")
    parser.add_argument("--whole-sequence", action="store_true", help="the loss on every position (the paper's)")
    parser.add_argument("--loss", default="ce", choices=["ce", "kl"], help="train.py's --loss (kl adds a no-grad "
                        "dense forward per step)")
    parser.add_argument("--out", default="bench_train_results.md", help="markdown file to write")
    parser.error = lambda message: fail(f"{message} (python bench_train.py --help lists the flags)")  # one line
    args = parser.parse_args(argv)
    model_config(args.model)
    if args.answer_tokens < 1:
        fail(f"--answer-tokens {args.answer_tokens}: the loss needs at least 1 trained position")
    if min(args.seq_lens) <= args.answer_tokens:
        fail(f"--seq-lens {min(args.seq_lens)}: each length must exceed --answer-tokens {args.answer_tokens}")
    return args


@dataclass
class Row:
    T: int
    checkpointing: bool
    step_ms: float = float("nan")     # the routed step: forward, backward, optimiser
    step_gib: float = float("nan")
    dense_ms: float = float("nan")    # the dense forward + backward
    dense_gib: float = float("nan")
    attn_ms: float = float("nan")     # both branches, fwd + bwd, all layers: ours
    flex_ms: float = float("nan")     # the same in FlexAttention only
    router_ms: float = float("nan")   # all layers' routers, fwd + bwd
    error: str = ""


def one_batch(cfg, T, args, device):
    """One sequence of T random token ids; the trained positions are the last --answer-tokens (or all)."""
    g = torch.Generator().manual_seed(T)
    ids = torch.randint(0, cfg.vocab_size, (1, T + 1), generator=g)
    targets = ids[:, 1:].clone()
    if not args.whole_sequence:
        targets[:, :T - args.answer_tokens] = IGNORE
    prompt = T - args.answer_tokens
    return Batch(ids[:, :T], targets, torch.tensor([prompt]), torch.tensor([T]), torch.tensor([0]),
                 ["bench"]).to(device)


def peak(fn, device):
    """(median ms, peak GiB allocated) of fn()."""
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    ms = timeit(fn, budget_ms=2000, min_reps=3, max_reps=10, device=device)
    gib = torch.cuda.max_memory_allocated() / GiB if torch.device(device).type == "cuda" else float("nan")
    return ms, gib


def routed_step(model, routers, batch, device, loss="ce"):
    """train.py's step on one micro-batch, with the router optimiser's step after it."""
    constraint = SparsityConstraint().to(device)
    # no weight decay: a weight moves iff its gradient is not 0 (test_bench.py checks that every one moves)
    optimizer = torch.optim.AdamW(routers.parameters(), lr=1e-6, weight_decay=0.0)
    cfg = types.SimpleNamespace(seed=0, loss=loss, margin_penalty=1e-2)
    dense_modes = model.fixed_modes(FA)

    def step():
        optimizer.zero_grad(set_to_none=True)
        train_step(model, [(batch, batch.input_ids.numel(), 0)], constraint, cfg, 1.0, dense_modes)
        optimizer.step()
    return step


def dense_step(model, batch):
    """The frozen model without its routers (every head dense, SDPA), forward and a backward through every block,
    attention included, down to the embeddings."""
    trained = batch.targets != IGNORE
    targets = batch.targets[trained]

    def step():
        routers, model.routers = model.routers, None
        hook = model.model.embed_tokens.register_forward_hook(lambda m, i, out: out.detach().requires_grad_())
        try:
            cross_entropy(model(batch.input_ids, logits_at=trained), targets).backward()
        finally:
            hook.remove()
            model.routers = routers
    return step


def attention_steps(model, T, device):
    """fwd + bwd of one layer's attention, both branches mixed by z as training runs it, and the same in FlexAttention
    only (None on the CPU) -> (ours, flex) callables."""
    cfg, ec = model.config, model.elastic
    H, G, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dtype = model.output_weight().dtype
    # [B, T, heads, D] seen as [B, heads, T, D], as Attention.forward hands them over
    leaves = [torch.randn(1, T, n, D, device=device, dtype=dtype, requires_grad=True) for n in (H, G, G)]
    q, k, v = (t.transpose(1, 2) for t in leaves)
    z = torch.nn.functional.one_hot(torch.randint(0, 2, (1, G), device=device), 2).float().requires_grad_()

    def backward(out):
        out.sum().backward()
        for t in leaves + [z]:  # no gradient piles up over the repetitions
            t.grad = None

    def ours():
        backward(mixed_attention(q, k, v, z, ec))

    if torch.device(device).type != "cuda" or "XA" in ec.mode_pair:  # Flex's XA mask needs the selection first
        return ours, None
    retrieval, sparse = ec.mode_ids
    masks = [flex_block_mask(torch.full((1, G), m, dtype=torch.int32, device=device), H, T, sink=ec.sink,
                             window=ec.window) for m in (retrieval, sparse)]
    flex = compiled_flex_attention()

    def flex_only():
        w = z.repeat_interleave(H // G, dim=1).to(dtype)[..., None, None]
        backward(sum(w[:, :, i] * flex(q, k, v, block_mask=masks[i], enable_gqa=True) for i in range(2)))
    return ours, flex_only


def router_step(model, routers, T, device):
    """All layers' routers on keys of T tokens, forward and backward."""
    cfg = model.config
    k = torch.randn(1, T, cfg.num_key_value_heads, cfg.head_dim, device=device, dtype=model.output_weight().dtype)

    def step():
        sum(r(k).float().sum() for r in routers).backward()
    return step


def measure(model, routers, T, checkpointing, args, device):
    """One Row: the routed step and the dense one (each its peak memory), and at checkpointing on, the split."""
    row = Row(T, checkpointing)
    model.grad_checkpointing = checkpointing
    batch = one_batch(model.config, T, args, device)
    try:
        row.dense_ms, row.dense_gib = peak(dense_step(model, batch), device)
        row.step_ms, row.step_gib = peak(routed_step(model, routers, batch, device, args.loss), device)
        if checkpointing:
            ours, flex = attention_steps(model, T, device)
            L = model.config.num_hidden_layers
            row.attn_ms = L * timeit(ours, budget_ms=500, min_reps=3, device=device)
            row.flex_ms = L * timeit(flex, budget_ms=500, min_reps=3, device=device) if flex else float("nan")
            row.router_ms = timeit(router_step(model, routers, T, device), budget_ms=300, min_reps=3, device=device)
    except torch.OutOfMemoryError as e:
        row.error = "out of memory: " + str(e).split("\n")[0][:120]
    except Exception as e:  # a compile that fails, ...: the row says so, the rows measured so far stay
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    finally:
        routers.zero_grad(set_to_none=True)
        sync(device)
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    log(f"T={T} checkpointing={checkpointing}: {row}")
    return row


def bench_train(args, device="cuda", done=None):
    """Every length of --seq-lens with checkpointing on and off -> (rows, GiB of the frozen weights); done(rows,
    GiB) after each row."""
    model = random_model(args.model, device)
    model.elastic = ElasticConfig(mode_pair=args.mode_pair, sink=args.sink, window=args.window)
    torch.manual_seed(0)
    model.routers = routers = Routers(model.config.num_hidden_layers, model.config.head_dim, model.elastic).to(device)
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad) / GiB
    rows = []
    for T in args.seq_lens:
        for ckpt in (True, False):
            rows.append(measure(model, routers, T, ckpt, args, device))
            if done:
                done(rows, weights_gib)
    return rows, weights_gib


def cell(x, fmt="{:.0f}"):
    return "-" if x != x else fmt.format(x)  # NaN: not measured


def train_report(args, rows, device="cuda", weights_gib=float("nan")):
    """The markdown of bench_train_results.md."""
    loss = "every position (the paper's)" if args.whole_sequence else f"the last {args.answer_tokens} positions"
    lines = [f"# Router training step: {args.model}, random weights", "",
             f"{provenance(device)} · `{command_line('bench_train.py')}`", "",
             f"{'bf16' if torch.device(device).type == 'cuda' else 'fp32'}; {args.mode_pair}, SSA sink {args.sink}, "
             f"window {args.window}; one sequence of T tokens a step; the loss on {loss} (--loss {args.loss}); the "
             f"frozen weights hold {cell(weights_gib, '{:.1f}')} GiB of each peak. Routed step: train.py's "
             "train_step (both branches of every head, Gumbel straight-through z, Eq. 8) and the router optimiser. "
             "Dense: every head FA (SDPA), forward and backward to the embeddings. Attention: both branches of every "
             "layer, fwd + bwd, as training runs them (SDPA for FA, FlexAttention for the sparse mode) and in "
             "FlexAttention only. Rest: the routed step less attention and routers (projections, MLPs, norms, the "
             "head, and the recompute of every block's forward, its attention included, that checkpointing costs).",
             "",
             "| T | checkpointing | routed step ms | tokens/s | peak GiB | dense fwd+bwd ms | peak GiB "
             "| routed / dense | attention ms (ours) | attention ms (Flex only) | ours vs Flex | routers ms "
             "| rest ms |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if r.error:
            lines.append(f"| {r.T} | {'yes' if r.checkpointing else 'no'} | {r.error} |" + " |" * 10)
            continue
        cells = [r.step_ms, r.T * 1e3 / r.step_ms, r.step_gib, r.dense_ms, r.dense_gib, r.step_ms / r.dense_ms,
                 r.attn_ms, r.flex_ms, r.flex_ms / r.attn_ms, r.router_ms, r.step_ms - r.attn_ms - r.router_ms]
        fmts = ["{:.0f}", "{:,.0f}", "{:.1f}", "{:.0f}", "{:.1f}", "{:.2f}x", "{:.0f}", "{:.0f}", "{:.2f}x", "{:.1f}",
                "{:.0f}"]
        lines.append(f"| {r.T} | {'yes' if r.checkpointing else 'no'} | "
                     + " | ".join(cell(x, f) for x, f in zip(cells, fmts)) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        fail("bench_train.py times training on a CUDA GPU and this machine has none (pytest runs the CPU checks)")
    torch.backends.cuda.matmul.allow_tf32 = True

    def write(rows, weights_gib):  # after every row: a run cut short keeps what it measured
        write_atomic(args.out, train_report(args, rows, "cuda", weights_gib))
    rows, weights_gib = bench_train(args, "cuda", done=write)
    log(train_report(args, rows, "cuda", weights_gib))


if __name__ == "__main__":
    main()
