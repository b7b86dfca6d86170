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
fail, one near it says the data does. Writes out-eval/eval_results.md (after every method) and, with matplotlib, the
figure beside it. Every flag is checked before the model loads.
"""
import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
from cli import (check_device, checkpoint_dir, command_line, fail, load_model, load_tokenizer, provenance,
                 routers_dir, write_atomic)
from generate import generate
from kernel import FA, XA
from router import ElasticConfig, Routers, dense_pooled_keys
from static_hybrid import probe_samples, retrieval_scores, static_modes

SEEN = ("passkey", "multi_key", "multi_value", "continuation")  # kinds of the first mix, still trained on
ROOM = 64           # tokens a prompt leaves for the answer in the model's context
EXTRA_TOKENS = 16   # a greedy answer may run this many tokens past the reference's length
TOKENS_PER_PASS = 1 << 15  # teacher-forced rows per forward hold at most this many tokens (logits [B, T, V])
TIMED = 4           # prompts per task timed for the prefill column, at the longest length
CLASS_NAME = {data.SENSITIVE: "sensitive", data.ROBUST: "robust"}


# -----------------------------------------------------------------------------
# statistics: plain torch, at module level so that tests call them


def mean(xs):
    """The mean of numbers (nan for none); of a tensor, over its last axis."""
    if torch.is_tensor(xs):
        return xs.mean(-1)
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def bootstrap_ci(values, stat=mean, resamples=1000, seed=0, level=0.95):
    """(stat(values), low, high): the percentile bootstrap interval of stat from `resamples` resamples of the values
    with replacement (a fixed seed: the same interval every run). values: n numbers, or n tuples (e.g. (omega, task
    class)); stat maps a tensor [..., n] (numbers) or [..., n, k] (tuples) to [...], all resamples in one call: mean,
    class_gap, auc_of_pairs. Resamples where stat is nan (a class missing) are dropped."""
    if len(values) == 0:
        return float("nan"), float("nan"), float("nan")
    v = torch.tensor(values, dtype=torch.float64)
    idx = torch.randint(len(v), (resamples, len(v)), generator=torch.Generator().manual_seed(seed))
    boot = stat(v[idx])
    boot = boot[~boot.isnan()]
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.quantile(boot, q).tolist() if len(boot) else (float("nan"),) * 2
    return stat(v).item(), lo, hi


def auc(scores, labels):
    """Area under the ROC curve of scores for labels (1 positive, 0 negative): the chance that a random positive
    scores above a random negative, ties counting half (Mann-Whitney, from average ranks). Tensors [..., n] give
    [...]; nan without both classes."""
    s, y = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels, dtype=torch.float64)
    ranked = s.sort(-1).values
    below = torch.searchsorted(ranked, s.contiguous(), side="left")   # scores below each one
    upto = torch.searchsorted(ranked, s.contiguous(), side="right")   # ... and those equal to it
    rank = (below + upto + 1) / 2                                     # average 1-based rank
    pos = y.sum(-1)
    neg = y.shape[-1] - pos
    out = ((rank * y).sum(-1) - pos * (pos + 1) / 2) / (pos * neg)
    out = torch.where(pos * neg > 0, out, torch.nan)
    return out if out.ndim else out.item()


def auc_of_pairs(v):
    """AUC of (score, label) pairs, v [..., n, 2]."""
    return torch.as_tensor(auc(v[..., 0], v[..., 1]), dtype=torch.float64)


def class_gap(v):
    """For (score, task class) pairs v [..., n, 2]: the mean score of the robust ones minus that of the sensitive."""
    s, robust = v[..., 0], (v[..., 1] == data.ROBUST).double()
    return (s * robust).sum(-1) / robust.sum(-1) - (s * (1 - robust)).sum(-1) / (1 - robust).sum(-1)

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
# the results, and the questions the report asks of them


@dataclass
class Results:
    """What the report is written from, filled in as the methods run."""
    classes: dict        # (where, task) -> task class (data.SENSITIVE or data.ROBUST)
    ssa: ElasticConfig   # the first routers' config: every SSA method's sink and window, the probe's pooling
    elastic: dict        # elastic method -> its routers' label (dir name)
    pair: dict           # elastic method -> its mode pair (FA-SSA, ...)
    frontier: dict       # the frontier's static FA-SSA hybrids, name -> sparse ratio
    rows: dict = field(default_factory=dict)       # method -> {(where, task, T, i): (score, omega, modes [L, G])}
    prefill: dict = field(default_factory=dict)    # method -> mean prefill ms at the longest length
    matched: dict = field(default_factory=dict)    # elastic method -> its matched static hybrid
    probe: tuple = None                            # (AUC, low, high) of the linear probe, with --probe
    intervals: dict = field(default_factory=dict)  # the tables are rewritten after every method: each interval once

    def pick(self, name, where=None, cls=None, task=None, T=None):
        """(key, score, omega) of the method's samples that match."""
        def match(k):  # k: (where, task, T, i)
            return all(want is None or want == got for want, got in
                       ((where, k[0]), (cls, self.classes[k[:2]]), (task, k[1]), (T, k[2])))
        return [(k, r[0], r[1]) for k, r in self.rows[name].items() if match(k)]

    def paired(self, a, b, where, cls):
        """Per-sample score differences a - b on the matching samples (paired by sample)."""
        rb = self.rows[b]
        return [s - rb[k][0] for k, s, _ in self.pick(a, where, cls)]

    def omegas(self, name):
        """The method's Omega of every sample."""
        return [r[1] for r in self.rows[name].values()]

    def interval(self, values, stat=mean):
        """bootstrap_ci(values, stat), computed once."""
        key = (tuple(values), stat)
        if key not in self.intervals:
            self.intervals[key] = bootstrap_ci(values, stat)
        return self.intervals[key]

    def ci(self, values, stat=mean, scale=1.0, digits=3):
        """'mean [low, high]' of bootstrap_ci(values, stat), scaled."""
        est, lo, hi = self.interval(values, stat)
        return f"{scale * est:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"

    def wheres(self):
        return [w for w in ("seen", "held-out", "human") if any(k[0] == w for k in self.classes)]

    def groups(self):
        """The (where, task class) pairs that have tasks."""
        have = set((k[0], c) for k, c in self.classes.items())
        return [(w, c) for w in self.wheres() for c in (data.SENSITIVE, data.ROBUST) if (w, c) in have]

    def done(self):
        """The elastic methods whose matched static hybrid has run."""
        return [name for name in self.rows if name in self.elastic and self.matched.get(name) in self.rows]

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
# the report: markdown tables, rewritten after every method; the claims and the figure at the end


def header(res, args, device):
    seen = ", ".join(t for w, t in res.classes if w == "seen") or "none"
    heldout = ", ".join(t for w, t in res.classes if w in UNSEEN)
    return ["# Accuracy against sparsity on SmolLM2-135M-Instruct, with 95% intervals", "",
            f"{provenance(device)}. Command: `{command_line('eval.py')}`. {samples_per_cell(args)} samples per task "
            f"and length, lengths {args.lengths}; seen kinds {seen}; held-out and human-style kinds {heldout}. "
            f"SSA sink {res.ssa.sink}, window {res.ssa.window}; XA threshold {res.ssa.xa_threshold}, stride "
            f"{res.ssa.xa_stride}. Sensitive score: share of the sample's keys in a greedy answer; robust score: "
            "teacher-forced top-1 agreement with the reference answer. Omega: share of KV heads in the sparse mode of "
            "the method's pair (n/a for XAttention on every head). Every cell: mean [95% bootstrap interval, 1000 "
            "resamples]. Prefill: mean ms over a few prompts at the longest length, one at a time."]


def main_table(res):
    """Per method: accuracy per split and task class, Omega per task class, prefill time."""
    groups = res.groups()
    lines = ["", "| method | " + " | ".join(f"{w} {CLASS_NAME[c]} (%)" for w, c in groups)
             + " | Omega sensitive | Omega robust | Omega mean | prefill ms |", "|---|" + "---|" * (len(groups) + 4)]
    for name in res.rows:
        accs = [res.ci([s for _, s, _ in res.pick(name, w, c)], scale=100, digits=1) for w, c in groups]
        omegas = ["n/a"] * 3 if name.startswith("XAttention") else \
            [res.ci([o for _, _, o in res.pick(name, cls=c)]) for c in (data.SENSITIVE, data.ROBUST)] + \
            [f"{mean(o for _, _, o in res.pick(name)):.3f}"]
        lines.append(f"| {name} | " + " | ".join(accs + omegas) + f" | {res.prefill[name]:.1f} |")
    return lines


def task_table(res, lengths):
    """Score per task and length, every method."""
    lines = ["", "Score per task and length (%):", "", "| task | " + " | ".join(res.rows) + " |",
             "|---|" + "---|" * len(res.rows)]
    for (where, task), c in res.classes.items():
        for T in lengths:
            cells = [res.ci([s for _, s, _ in res.pick(name, where, task=task, T=T)], scale=100, digits=0)
                     for name in res.rows]
            lines.append(f"| {task} ({where}, {CLASS_NAME[c]}) {T} | " + " | ".join(cells) + " |")
    return lines


def omega_table(res):
    """Omega per task (all lengths), every elastic method that has run."""
    routed = [name for name in res.rows if name in res.elastic]
    if not routed:
        return []
    lines = ["", "Omega per task (all lengths):", "", "| task | " + " | ".join(routed) + " |",
             "|---|" + "---|" * len(routed)]
    for (where, task), c in res.classes.items():
        lines.append(f"| {task} ({where}, {CLASS_NAME[c]}) | " + " | ".join(
            res.ci([o for _, _, o in res.pick(name, where, task=task)]) for name in routed) + " |")
    return lines


UNSEEN = ("held-out", "human")  # what training never drew: the held-out kinds, and the human-style prompts


def heldout_table(res):
    """On the held-out kinds and the human-style prompts: does Omega follow the task class (its gap and AUC), and
    what it costs in sensitive accuracy against dense and against the matched static hybrid, paired by sample."""
    unseen = [w for w in UNSEEN if w in res.wheres()]
    if not res.done() or not unseen:
        return []
    lines = ["", "Held-out kinds and human-style prompts: does Omega follow the task class, and what does it cost? "
             "(differences in points, paired by sample)", "",
             "| routers | prompts | Omega sensitive | Omega robust | robust - sensitive | AUC of Omega | sensitive "
             "acc. (%) | - dense | - matched static |", "|---|---|---|---|---|---|---|---|---|"]
    for name in res.done():
        for where in unseen:
            pairs = [(o, res.classes[k[:2]]) for k, _, o in res.pick(name, where)]
            lines.append(f"| {name} | {where} | " + " | ".join(
                [res.ci([o for o, c in pairs if c == cl]) for cl in (data.SENSITIVE, data.ROBUST)]
                + [res.ci(pairs, class_gap), res.ci(pairs, auc_of_pairs),
                   res.ci([s for _, s, _ in res.pick(name, where, data.SENSITIVE)], scale=100, digits=1),
                   res.ci(res.paired(name, "dense FA", where, data.SENSITIVE), scale=100, digits=1),
                   res.ci(res.paired(name, res.matched[name], where, data.SENSITIVE), scale=100, digits=1)]) + " |")
    return lines


def frontier_table(res):
    """The accuracy-sparsity frontier: the static FA-SSA hybrids of --frontier (the curve), then each elastic
    routers set (a point), with mean Omega and accuracy per split and task class."""
    names = [name for name in res.frontier if name in res.rows] + [name for name in res.rows if name in res.elastic]
    if not res.frontier or not names:
        return []
    groups = res.groups()
    lines = ["", "The accuracy-sparsity frontier: the static FA-SSA hybrids at the --frontier ratios (the curve) and "
             "each elastic routers set (a point; the claims compare the FA-SSA ones with the curve at their mean "
             "Omega). Omega: mean over every sample.", "",
             "| method | Omega mean | " + " | ".join(f"{w} {CLASS_NAME[c]} (%)" for w, c in groups) + " |",
             "|---|" + "---|" * (len(groups) + 1)]
    for name in names:
        accs = [res.ci([s for _, s, _ in res.pick(name, w, c)], scale=100, digits=1) for w, c in groups]
        lines.append(f"| {name} | {res.ci(res.omegas(name))} | " + " | ".join(accs) + " |")
    return lines


def probe_line(res, args):
    if res.probe is None:
        return []
    auc_, lo, hi = res.probe
    pooling = f"boundary {res.ssa.boundary}" + (f", tail {res.ssa.tail}" if res.ssa.tail else "")
    return ["", f"Linear probe (logistic regression on the dense model's pooled pre-RoPE keys of every layer, the "
            f"first routers' input ({pooling}), fitted on {args.probe_samples} train-split samples of the trained "
            f"kinds at {min(args.lengths)} tokens): AUC {auc_:.3f} [{lo:.3f}, {hi:.3f}] on the held-out samples. Near "
            "the routers' AUC: the training data limits routing; far above it: the routers do."]


def verdict(lo, hi, want_above):
    """What a paired interval says of a claim: a lead (want_above) or parity with dense."""
    if want_above:  # a lead: the interval must lie above 0
        return "holds" if lo > 0 else "does not hold" if hi < 0 else "not shown (the interval contains 0)"
    return "does not hold (below dense)" if hi < 0 else "holds (the interval reaches 0 or above)"


def points(est):
    """A paired difference of scores in points: '+1.2 points [-0.3, +2.8]'."""
    return f"{100 * est[0]:+.1f} points [{100 * est[1]:+.1f}, {100 * est[2]:+.1f}]"


def interpolate(xy, x):
    """y at x on the line through the points xy [(x, y)], sorted by x; None where x lies outside them."""
    if not xy or not xy[0][0] <= x <= xy[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(xy, xy[1:] or xy):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * ((x - x0) / (x1 - x0))


def frontier_claims(res, name):
    """Does this elastic method lie above the static curve at its own mean Omega, on sensitive tasks? The curve (of
    FA-SSA hybrids: FA-SSA routers only) is interpolated linearly between its hybrids, point estimates; the paired
    interval is against the static hybrid at exactly that Omega (the matched one)."""
    curve = [n for n in res.frontier if n in res.rows]
    if not curve or res.pair[name] != "FA-SSA":
        return []
    omega, static, lines = mean(res.omegas(name)), res.matched[name], []
    for where in [w for w, c in res.groups() if c == data.SENSITIVE]:
        acc = mean(s for _, s, _ in res.pick(name, where, data.SENSITIVE))
        xy = sorted((mean(res.omegas(n)), mean(s for _, s, _ in res.pick(n, where, data.SENSITIVE))) for n in curve)
        on_curve = interpolate(xy, omega)
        if on_curve is None:
            lines.append(f"- {name}, {where} sensitive accuracy against the static frontier: its mean Omega "
                         f"{omega:.2f} lies outside the curve's {xy[0][0]:.2f} to {xy[-1][0]:.2f}, no comparison "
                         "(add a --frontier ratio beyond it)")
            continue
        side = "above" if acc > on_curve else "below" if acc < on_curve else "on"
        est = bootstrap_ci(res.paired(name, static, where, data.SENSITIVE))
        lines.append(f"- {name}, {where} sensitive accuracy against the static frontier at its mean Omega "
                     f"{omega:.2f}: {100 * acc:.1f}% against {100 * on_curve:.1f}% on the curve -> {side} the curve "
                     f"(point estimates); paired against the static hybrid at exactly this Omega ({static}): "
                     f"{points(est)} -> {verdict(est[1], est[2], True)}")
    return lines


def claims(res):
    """The paper's claims on this run, each with its 95% interval and what the interval says."""
    lines = ["", "The claims on this run (95% intervals):", ""]
    for name in res.done():
        static = res.matched[name]
        for where in res.wheres():
            est = bootstrap_ci(res.paired(name, "dense FA", where, data.SENSITIVE))
            lines.append(f"- {name}, {where} sensitive accuracy on par with dense: elastic - dense = {points(est)} "
                         f"-> {verdict(est[1], est[2], False)}")
            est = bootstrap_ci(res.paired(name, static, where, data.SENSITIVE))
            lines.append(f"- {name}, {where} sensitive accuracy above the static hybrid at its mean Omega ({static}): "
                         f"{points(est)} -> {verdict(est[1], est[2], True)}")
        for where in [w for w in UNSEEN if w in res.wheres()]:
            pairs = [(o, res.classes[k[:2]]) for k, _, o in res.pick(name, where)]
            gap, a = bootstrap_ci(pairs, class_gap), bootstrap_ci(pairs, auc_of_pairs)
            meets = gap[0] >= 0.15 and gap[1] > 0 and a[0] >= 0.8
            lines.append(f"- {name}, Omega follows the task class on the {where} kinds: robust - sensitive = "
                         f"{gap[0]:+.3f} [{gap[1]:+.3f}, {gap[2]:+.3f}], AUC {a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}] -> "
                         f"{verdict(gap[1], gap[2], True)}; the bar (>= 0.15 with the interval above 0, AUC >= 0.80) "
                         f"{'is met' if meets else 'is not met'}")
        lines += frontier_claims(res, name)
    return lines


def write_report(res, args, device, out, final=False, figure=None):
    """Writes the tables to out (whole or not at all); final: with the claims and the figure's link (figure: the
    path of a figure that was written), printed too."""
    lines = header(res, args, device) + main_table(res) + task_table(res, args.lengths) + omega_table(res) + \
        heldout_table(res) + frontier_table(res) + probe_line(res, args)
    if final and res.done():
        lines += claims(res)
        if figure is not None:
            lines += ["", f"![accuracy against Omega, and routing per task class]"
                      f"({os.path.relpath(figure, out.resolve().parent)})"]  # the link as the .md sees it
    write_atomic(out, "\n".join(lines) + "\n")
    if final:
        print("\n".join(lines))

# -----------------------------------------------------------------------------
# the figure: score against Omega per method, and where the first elastic routers send heads per task class


def draw_figure(res, figure):
    """Writes the figure; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {figure} (pip install matplotlib)")
        return False
    frontier = any(name in res.rows for name in res.frontier)  # a panel of its own
    fig, axes = plt.subplots(1, 3 + frontier, figsize=(17 + 7 * frontier, 4.5),
                             gridspec_kw=dict(width_ratios=[1.4] * (1 + frontier) + [1, 1], wspace=0.3))
    score_panel(axes[0], res)
    if frontier:
        frontier_panel(axes[1], res)
    routing_panels(fig, axes[-2:], res, first=next(iter(res.elastic)))
    tmp = figure.with_name(f".{figure.name}.tmp")  # written whole, then renamed
    fig.savefig(tmp, format=figure.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
    os.replace(tmp, figure)
    print(f"figure written to {figure}")
    return True


def score_panel(ax, res):
    """Mean score against mean Omega per method and task class."""
    from matplotlib import colormaps  # 20 colours: a method each
    for i, name in enumerate(res.rows):
        if name.startswith("XAttention"):
            continue  # no Omega to place it at
        for c, marker in ((data.SENSITIVE, "o"), (data.ROBUST, "s")):
            rows = res.pick(name, cls=c)
            ax.scatter(mean(o for _, _, o in rows), 100 * mean(s for _, s, _ in rows), marker=marker, s=60,
                       color=colormaps["tab20"](i % 20), label=name if c == data.SENSITIVE else None)
    ax.set(xlabel="Omega (share of sparse KV heads)", ylabel="score (%)")
    ax.set_title("score against sparsity (circles: sensitive tasks, squares: robust)", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")


def error_bars(intervals, scale=1.0):
    """Intervals [(estimate, low, high)] as errorbar's [[below...], [above...]], scaled (never negative)."""
    return [[scale * max(0.0, est - lo) for est, lo, _ in intervals],
            [scale * max(0.0, hi - est) for est, _, hi in intervals]]


def frontier_panel(ax, res):
    """Sensitive accuracy against mean Omega, held-out and seen: the static curve as a line, each elastic routers
    set as a point, with 95% intervals (both axes for a point)."""
    curve = [name for name in res.frontier if name in res.rows]
    routed = [name for name in res.rows if name in res.elastic]
    for j, where in enumerate(w for w, c in res.groups() if c == data.SENSITIVE):
        accs = {name: res.interval([s for _, s, _ in res.pick(name, where, data.SENSITIVE)]) for name in curve + routed}
        ax.errorbar([mean(res.omegas(name)) for name in curve], [100 * accs[name][0] for name in curve],
                    yerr=error_bars([accs[name] for name in curve], 100), fmt="-o", color=f"C{j}", capsize=3,
                    label=f"static FA-SSA, {where} sensitive")
        for name, marker in zip(routed, "*D^vPX"):
            omega = res.interval(res.omegas(name))
            ax.errorbar(omega[0], 100 * accs[name][0], xerr=error_bars([omega]), yerr=error_bars([accs[name]], 100),
                        fmt=marker, color=f"C{j}", markersize=10, capsize=3, label=f"{name}, {where} sensitive")
    ax.set(xlabel="mean Omega (share of sparse KV heads)", ylabel="sensitive accuracy (%)")
    ax.set_title("the frontier: static hybrids (line) and elastic routing (points), 95% intervals", fontsize=10)
    ax.legend(fontsize=7)


def routing_panels(fig, axes, res, first):
    """Per task class, the share of samples in which the first elastic routers send each head (layer, KV head) to
    the sparse mode."""
    sparse = res.ssa.mode_ids[1]  # the first routers' config is res.ssa
    for ax, c in zip(axes, (data.SENSITIVE, data.ROBUST)):
        maps = [r[2] for k, r in res.rows[first].items() if res.classes[k[:2]] == c]
        share = torch.stack([(m == sparse).float() for m in maps]).mean(0)  # [L, G]
        im = ax.imshow(share.T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set(xlabel="layer", ylabel="KV head", yticks=range(share.shape[1]))
        ax.set_title(f"{first} routing, {CLASS_NAME[c]} tasks\n(share of samples with the head sparse)", fontsize=10)
    fig.colorbar(im, ax=axes.tolist(), shrink=0.8)

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
                  pair={name: methods[name][2].mode_pair for name in elastic})
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
