"""
What eval.py measured, judged and written down: the statistics (bootstrap intervals, the AUC of Omega as a score of
the task class), the Results that the methods fill in, the report's markdown tables and claims, and the figure
(Elastic Attention, arXiv 2601.17367: accuracy against sparsity by task class, and whether Omega follows the class).
Nothing here runs a model; `python eval.py` writes the report, `pytest test_eval.py` checks it.
"""
import os
from dataclasses import dataclass, field

import torch

import data
from cli import command_line, provenance, write_atomic
from router import ElasticConfig

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
# the results, and the questions the report asks of them


@dataclass
class Results:
    """What the report is written from, filled in as the methods run."""
    classes: dict        # (where, task) -> task class (data.SENSITIVE or data.ROBUST)
    ssa: ElasticConfig   # the first routers' config: every SSA method's sink and window, the probe's pooling
    elastic: dict        # elastic method -> its routers' label (dir name)
    pair: dict           # elastic method -> its mode pair (FA-SSA, ...)
    frontier: dict       # the frontier's static FA-SSA hybrids, name -> sparse ratio
    samples: int         # samples per (split, task, length) cell
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
# the report: markdown tables, rewritten after every method; the claims and the figure at the end


def header(res, args, device):
    seen = ", ".join(t for w, t in res.classes if w == "seen") or "none"
    heldout = ", ".join(t for w, t in res.classes if w in UNSEEN)
    return ["# Accuracy against sparsity on SmolLM2-135M-Instruct, with 95% intervals", "",
            f"{provenance(device)}. Command: `{command_line('eval.py')}`. {res.samples} samples per task "
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
