"""
The paper's central claim, measured with error bars on SmolLM2: accuracy against sparsity by task class, elastic
routing against dense and against static hybrids at the same sparsity, and whether Omega still follows the task
class on task kinds the routers never saw (Elastic Attention, arXiv 2601.17367; RESULTS.md).

    python eval.py --routers fa-ssa                                         # shipped routers (routers/<name>)
    python eval.py --routers fa-ssa fa-xa xa-ssa --lengths 1024 2048 4096   # several routers dirs or names
    python eval.py --routers out-routers --limit 2 --lengths 512 1024       # a quick run, also on the CPU
    python eval.py --routers fa-ssa --probe                                 # + the linear probe's ceiling
    python eval.py --routers fa-ssa --frontier 0.5 0.6 0.7 0.8 0.9 0.95     # + the static hybrids' frontier
    python eval.py --routers fa-ssa fa-xa xa-ssa fa-sk --lengths 1024 2048 --samples 24 --out eval_results.md

Tasks (data.SyntheticMix): seen, passkey, multi_key, multi_value (sensitive) and continuation (robust) from the train
split with another seed; held-out, data.HELDOUT_KINDS (split="heldout"); human, data.HUMAN_KINDS (split="human": written
the way people write); both over held-out texts. Scores: sensitive, the share of the sample's keys found
(case-insensitive) in a greedy answer; robust, teacher-forced top-1 agreement with the reference answer. Methods: dense
FA; the static hybrid (DuoAttention / PruLong style: the top 30% of KV heads by retrieval score full, Omega 0.7);
XAttention on every head; Elastic Attention with each routers dir (its mode pair from its elastic.json; the first must
be FA-SSA: its sink and window serve every other SSA method), each followed by the static hybrid of its mode pair at its
own mean Omega (the fair comparison); with --frontier, static FA-SSA hybrids at those sparse ratios: the
accuracy-sparsity curve that elastic routing should lie above at every Omega (the paper's claim; each FA-SSA set is
compared with the curve, linear between its points, at its mean Omega). Statistics: percentile-bootstrap 95% intervals
(1000 resamples, fixed seed; paired differences resample the samples); the AUC of Omega as a score of the task class
(robust positive) on the held-out and human-style kinds. --probe fits a logistic regression on the dense model's pooled
pre-RoPE keys (the first routers' input) over train-split samples: a probe far above the routers' AUC says the routers
fail, one near it says the data does (eval_report.py: the statistics, the tables, the claims and the figure). Writes
out-eval/eval_results.md (after every method) and, with matplotlib, the figure beside it. Every flag is checked before
the model loads.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from cli import check_device, checkpoint_dir, fail, load_model, load_tokenizer, routers_dir
from eval_report import Results, auc_of_pairs, bootstrap_ci, draw_figure, mean, write_report
from generate import generate
from kernel import FA, XA
from router import Routers, dense_pooled_keys
from static_hybrid import probe_samples, retrieval_scores, static_modes

SEEN = ("passkey", "multi_key", "multi_value", "continuation")  # kinds of the first mix, still trained on
ROOM = 64           # tokens a prompt leaves for the answer in the model's context
EXTRA_TOKENS = 16   # a greedy answer may run this many tokens past the reference's length
TOKENS_PER_PASS = 1 << 15  # teacher-forced rows per forward hold at most this many tokens (logits [B, T, V])
TIMED = 4           # prompts per task timed for the prefill column, at the longest length


# -----------------------------------------------------------------------------
# the linear probe: can the routers' input tell the task class at all?


@torch.no_grad()
def pooled_keys(model, samples, boundary=100, tail=0, batch_size=16):
    """The dense model's pooled pre-RoPE keys of every layer (router.dense_pooled_keys of each prompt, what routers
    of this boundary and tail read), [N, L * G * D (or 2D)] fp32 on the CPU. Prompts right-padded (causal: padding
    is never seen)."""
    device = model.output_weight().device

    def batches():
        for b in range(0, len(samples), batch_size):
            batch = samples[b:b + batch_size]
            lens = torch.tensor([s.prompt_len for s in batch], device=device)
            ids = torch.zeros(len(batch), int(lens.max()), dtype=torch.long, device=device)
            for r, s in enumerate(batch):
                ids[r, :s.prompt_len] = s.input_ids[:s.prompt_len]
            yield ids, lens
    return torch.cat([keys.transpose(0, 1).flatten(1).float().cpu()
                      for keys in dense_pooled_keys(model, batches(), boundary, tail)])


def fit_probe(x, y, l2=0.1, steps=300):
    """L2-regularised logistic regression of labels y [N] (0/1) on features x [N, F] (standardised by their train
    mean and std), fitted by LBFGS. -> a function from features [M, F] to logits [M]."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    z, y = (x - mu) / sd, torch.as_tensor(y, dtype=torch.float32)
    w, b = torch.zeros(x.shape[1], requires_grad=True), torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * w.square().sum() / 2
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    w, b = w.detach(), b.detach()
    return lambda x_new: ((x_new - mu) / sd) @ w + b


def probe_auc(model, train_samples, test_samples, boundary=100, tail=0, batch_size=16):
    """Fits the probe on the task class of train_samples and scores test_samples: (auc, low, high) with the
    bootstrap interval over the test samples."""
    probe = fit_probe(pooled_keys(model, train_samples, boundary, tail, batch_size),
                      [s.task_class for s in train_samples])
    scores = probe(pooled_keys(model, test_samples, boundary, tail, batch_size)).tolist()
    return bootstrap_ci(list(zip(scores, [s.task_class for s in test_samples])), auc_of_pairs)

# -----------------------------------------------------------------------------
# scoring one batch of a (task, length) cell


@torch.no_grad()
def score_batch(model, tokenizer, samples, modes):
    """Scores samples of one task (all sensitive or all robust) -> [(score, omega, head modes [L, G])], each from
    the sample's own routing. modes: fixed [1, L, G], or None (the routers decide)."""
    device = model.output_weight().device
    if samples[0].task_class == data.SENSITIVE:  # greedy answers, all prompts of the batch decoding together
        prompts = [s.input_ids[:s.prompt_len] for s in samples]
        limits = [len(s.input_ids) - s.prompt_len + EXTRA_TOKENS for s in samples]
        outs, stats = [[] for _ in samples], []
        for step in generate(model, prompts, max(limits), eos_token_id=tokenizer.eos_token_id, modes=modes,
                             stats=stats):
            for out, t in zip(outs, step):
                if t is not None:
                    out.append(t)
        rows = []
        for s, out, limit, st in zip(samples, outs, limits, stats):
            text = tokenizer.decode(out[:limit], skip_special_tokens=True).lower()
            rows.append((sum(data.mentions(text, k) for k in s.keys) / len(s.keys), st["routing"].omega.item(),
                         st["routing"].modes[0].cpu()))
        return rows
    # teacher-forced agreement: rows of one length go through one forward, no padding
    rows = [None] * len(samples)
    by_len = {}
    for j, s in enumerate(samples):
        by_len.setdefault(len(s.input_ids), []).append(j)
    for T, js in by_len.items():
        step = max(1, TOKENS_PER_PASS // T)
        for a in range(0, len(js), step):
            part = js[a:a + step]
            ids = torch.stack([samples[j].input_ids for j in part]).to(device)
            P = [samples[j].prompt_len for j in part]
            logits, routing = model(ids, prompt_lens=torch.tensor(P, device=device), modes=modes,
                                    return_routing=True)
            for r, (j, p) in enumerate(zip(part, P)):
                hit = (logits[r, p - 1:-1].argmax(-1) == ids[r, p:]).float().mean().item()
                rows[j] = (hit, routing.omega[r].item(), routing.modes[r].cpu())
    return rows


# -----------------------------------------------------------------------------
# flags and files: every one checked before the model loads (a bad one is one line now, not a traceback minutes later)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HuggingFace checkpoint dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--routers", required=True, nargs="+", help="dirs of routers from train.py, or names of "
                        "shipped ones (routers/<name>); the first FA-SSA, whose sink and window every SSA method "
                        "here uses")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096], help="prompt lengths "
                        f"(each >= {ROOM}, and {ROOM} tokens below the model's context)")
    parser.add_argument("--samples", type=int, default=32, help="samples per task and length")
    parser.add_argument("--limit", type=int, default=None, help="at most this many samples per task and length")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch of one task and length")
    parser.add_argument("--heldout-only", action="store_true", help="only the held-out and human-style kinds")
    parser.add_argument("--probe", action="store_true", help="also fit the linear probe on the dense model's "
                        "pooled keys and report its held-out AUC")
    parser.add_argument("--probe-samples", type=int, default=256, help="train-split samples the probe fits on, at "
                        "the shortest length")
    parser.add_argument("--static-ratio", type=float, default=0.7, help="Omega of the static hybrid (paper: 0.7)")
    parser.add_argument("--frontier", type=float, nargs="+", default=[], metavar="R", help="also the static FA-SSA "
                        "hybrids at these sparse ratios (e.g. 0.5 0.6 0.7 0.8 0.9 0.95, named to 2 decimals): the "
                        "accuracy-sparsity curve that elastic routing is compared with")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the task sets")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--out", default="out-eval/eval_results.md", help="markdown tables (its dir is created); "
                        "--out eval_results.md regenerates the committed file, and its figure")
    parser.add_argument("--figure", default=None, help="figure (needs matplotlib; skipped without it); default: "
                        "beside --out, .png in place of its suffix; '' for none")
    parser.error = lambda message: fail(f"{message} (python eval.py --help lists the flags)")  # one line, no usage
    return parser.parse_args()


def check_args(args):
    """Every flag and file before anything heavy loads: the ranges, --device, --model's config, the routers dirs
    (the first FA-SSA), the dirs of --out and --figure (created). -> (model dir, [(label, Routers)], out path,
    figure path or None)"""
    for flag, value, ok, want in (("--samples", args.samples, args.samples >= 1, ">= 1"),
                                  ("--limit", args.limit, args.limit is None or args.limit >= 1, ">= 1"),
                                  ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
                                  ("--probe-samples", args.probe_samples, args.probe_samples >= 2, ">= 2"),
                                  ("--lengths", " ".join(map(str, args.lengths)), min(args.lengths) >= ROOM,
                                   f">= {ROOM} each"),
                                  ("--static-ratio", args.static_ratio, 0 <= args.static_ratio <= 1, "in [0, 1]"),
                                  ("--frontier", " ".join(map(str, args.frontier)),
                                   all(0 <= r <= 1 for r in args.frontier), "in [0, 1] each")):
        if not ok:
            fail(f"{flag} {value} is out of range: it must be {want}")
    try:
        check_device(args.device)
        model_dir, config = checkpoint_dir(args.model)
    except ValueError as e:
        fail(e)
    if max(args.lengths) + ROOM > config.max_position_embeddings:
        fail(f"--lengths {max(args.lengths)} leaves no room for the answer in the model's context of "
             f"{config.max_position_embeddings} tokens; use lengths <= {config.max_position_embeddings - ROOM}")
    loaded = []  # (label, routers) of each dir, checked against the model's shape
    for name in args.routers:
        try:
            path = routers_dir(name)  # a dir, or the name of a shipped set (routers/fa-ssa, ...)
        except ValueError as e:
            fail(e)
        try:
            loaded.append((path.resolve().name, Routers.load(path, config)))
        except Exception as e:  # an unreadable routers.json / elastic.json, routers of another model
            fail(f"--routers {name}: {e}")
    if loaded[0][1].elastic.mode_pair != "FA-SSA":
        fail(f"--routers {args.routers[0]} holds {loaded[0][1].elastic.mode_pair} routers; the first dir must hold "
             "FA-SSA ones")
    out = Path(args.out)
    figure = out.with_suffix(".png") if args.figure is None else Path(args.figure) if args.figure else None
    try:
        for path in (out, figure or out):
            path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the dir of --out or --figure: {e}")
    return model_dir, loaded, out, figure

# -----------------------------------------------------------------------------
# tasks and methods


def samples_per_cell(args):
    """Samples per (split, task, length) cell: --samples, at most --limit."""
    return min(args.samples, args.limit or args.samples)


def build_cells(tokenizer, args):
    """The task cells (split, task, length) -> samples; each task's class, {(split, task): class}; the probe's
    train-split samples (none without --probe). Samples depend on the seed alone, so they are built before the
    model loads: a length too short for a task's prompt is one line."""
    n = samples_per_cell(args)
    plan = ([] if args.heldout_only else [("seen", t, "train") for t in SEEN]) + \
        [("held-out", t, "heldout") for t in data.HELDOUT_KINDS] + [("human", t, "human") for t in data.HUMAN_KINDS]
    try:
        cells = {(where, task, T): [mix[i] for i in range(n)] for where, task, split in plan for T in args.lengths
                 for mix in [data.SyntheticMix(tokenizer, T, T, seed=args.seed + T, kinds=(task,), split=split)]}
        train_probe = [] if not args.probe else \
            [data.SyntheticMix(tokenizer, min(args.lengths), min(args.lengths), seed=args.seed + 1, kinds=data.KINDS,
                               split="train")[i] for i in range(args.probe_samples)]
    except ValueError as e:  # a length too short for a task's prompt
        fail(f"--lengths {' '.join(map(str, args.lengths))}: {e}")
    return cells, {(where, task): data.KIND_CLASS[task] for where, task, _ in plan}, train_probe


def frontier_methods(ratios):
    """--frontier's static FA-SSA hybrids, name -> sparse ratio, by ratio."""
    return {f"static FA-SSA {r:.2f}": r for r in sorted(ratios)}


def build_methods(model, tokenizer, loaded, static_ratio, frontier):
    """The methods, name -> (routers or None, fixed modes [1, L, G] or None, ElasticConfig): dense FA, the static
    FA-SSA hybrid at static_ratio, XAttention on every head, Elastic Attention with each routers set (the first's
    sink and window serve every SSA method), then the frontier's static hybrids ({name: ratio}). -> (methods,
    {elastic name: its label}, the retrieval scores [L, G] that rank heads for every static hybrid)"""
    ssa = loaded[0][1].elastic
    model.elastic = ssa
    scores = retrieval_scores(model, probe_samples(tokenizer, model.config.max_position_embeddings))
    methods = {"dense FA": (None, model.fixed_modes(FA), ssa),
               f"static FA-SSA {static_ratio:.2f}": (None, static_modes(scores, static_ratio, ssa), ssa),
               "XAttention (all heads)": (None, model.fixed_modes(XA), ssa)}
    elastic = {}
    for label, routers in loaded:
        name = f"elastic {routers.elastic.mode_pair}" + (f" ({label})" if len(loaded) > 1 else "")
        methods[name], elastic[name] = (routers, None, routers.elastic), label
    for name, ratio in frontier.items():  # one at --static-ratio is that method already
        methods.setdefault(name, (None, static_modes(scores, ratio, ssa), ssa))
    return methods, elastic, scores

# -----------------------------------------------------------------------------
# running the methods


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def evaluate(model, tokenizer, name, method, cells, batch_size, timed_length):
    """Scores every sample of every cell with one method -> ({(where, task, T, i): (score, omega, modes [L, G])},
    mean prefill ms of a few prompts at timed_length, one at a time)."""
    routers, modes, config = method
    device = model.output_weight().device
    model.routers = routers.to(device) if routers is not None else None
    model.elastic = config
    rows, times = {}, []
    for (where, task, T), samples in tqdm(cells.items(), desc=name, dynamic_ncols=True):
        for b in range(0, len(samples), batch_size):
            for i, row in enumerate(score_batch(model, tokenizer, samples[b:b + batch_size], modes), start=b):
                rows[where, task, T, i] = row
        if T == timed_length:
            for s in samples[:TIMED]:
                sync(device)
                t0 = time.perf_counter()
                model(s.input_ids[None, :s.prompt_len].to(device), modes=modes, last_only=True)
                sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
    return rows, mean(times[1:] or times)  # the first call warms up


def run_methods(model, tokenizer, methods, scores, cells, res, args, out):
    """Runs every method into res, the report rewritten after each; each elastic one is followed by the static
    hybrid of its mode pair at its own mean Omega (the fair comparison)."""
    print(f"{sum(len(v) for v in cells.values())} samples per method: {len(res.classes)} tasks x lengths "
          f"{args.lengths} x {samples_per_cell(args)}; methods: {', '.join(methods)}, each elastic one then a static "
          f"hybrid at its mean Omega; SSA sink {res.ssa.sink}, window {res.ssa.window}; batches of {args.batch_size}")
    device, longest = model.output_weight().device, max(args.lengths)
    for name, (routers, modes, config) in methods.items():
        res.rows[name], res.prefill[name] = evaluate(model, tokenizer, name, (routers, modes, config), cells,
                                                     args.batch_size, longest)
        write_report(res, args, device, out)
        if name in res.elastic:  # its static hybrid at its own mean Omega
            omega = mean(res.omegas(name))
            static = res.matched[name] = f"static {config.mode_pair} {omega:.2f} (matched to {res.elastic[name]})"
            # an SK head needs its layer's scorer: the static FA-SK hybrid keeps the routers' scorers, fixed modes
            method = (routers if "SK" in config.mode_pair else None, static_modes(scores, omega, config), config)
            res.rows[static], res.prefill[static] = evaluate(model, tokenizer, static, method, cells,
                                                             args.batch_size, longest)
            write_report(res, args, device, out)

# -----------------------------------------------------------------------------


def main():
    args = parse_args()
    model_dir, loaded, out, figure = check_args(args)  # every flag and file, before anything loads
    tokenizer = load_tokenizer(model_dir)
    cells, classes, train_probe = build_cells(tokenizer, args)  # (split, task, length) -> samples
    model = load_model(model_dir, args.device, args.dtype)
    frontier = frontier_methods(args.frontier)  # the static curve: name -> sparse ratio
    methods, elastic, scores = build_methods(model, tokenizer, loaded, args.static_ratio, frontier)
    res = Results(classes, ssa=loaded[0][1].elastic, elastic=elastic, frontier=frontier,
                  pair={name: methods[name][2].mode_pair for name in elastic}, samples=samples_per_cell(args))
    try:
        run_methods(model, tokenizer, methods, scores, cells, res, args, out)
        if args.probe:  # fitted on the trained kinds, scored on the held-out samples
            heldout = [s for (where, _, _), samples in cells.items() if where == "held-out" for s in samples]
            res.probe = probe_auc(model, train_probe, heldout, res.ssa.boundary, res.ssa.tail, args.batch_size)
            print(f"linear probe: held-out AUC {res.probe[0]:.3f} [{res.probe[1]:.3f}, {res.probe[2]:.3f}]")
    except KeyboardInterrupt:
        print(f"interrupted; the {len(res.rows)} methods measured so far are in {out}" if res.rows else
              "interrupted before the first method finished: nothing written", file=sys.stderr)
        sys.exit(130)
    drawn = figure is not None and draw_figure(res, figure)
    write_report(res, args, model.output_weight().device, out, final=True, figure=figure if drawn else None)
    print(f"results written to {out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # while loading or drawing (main reports one during the methods itself)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
