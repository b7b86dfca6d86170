"""
The paper's central claim, measured on SmolLM2: accuracy against sparsity by task type, and elastic routing
against static hybrids at the same sparsity (Elastic Attention, arXiv 2601.17367; README: Results).

    python eval.py --routers out-routers                                    # one H100: about 2 min per method
    python eval.py --routers out-fa-ssa out-fa-xa out-xa-ssa                # several trained routers
    python eval.py --routers out-routers --limit 2 --lengths 512 1024       # a quick run, also on the CPU
    python eval.py --routers fa-ssa fa-xa xa-ssa --out eval_results.md      # regenerate the committed results

Tasks come from a seed, built out of Python's own docs (data.SyntheticMix, the generator training uses, with
another seed):
  sensitive (RULER-like): passkey, multi-key and multi-value retrieval; the score is the share of the answer's
    numbers found in a greedy answer (exact match for one number, recall for several);
  robust: text continuation; the score is teacher-forced next-token accuracy on the true next passage (the
    share of answer tokens that are the model's top prediction), so it needs no reference model.
Methods: dense FA; the static hybrid (DuoAttention / PruLong style) with the top 30% of KV heads by retrieval
score kept full (Omega 0.7), and again at the elastic model's own average Omega; XAttention on every head;
Elastic Attention with each dir of routers given (its mode pair read from its elastic.json; the first must be
FA-SSA: its sink and window serve every SSA method). Writes out-eval/eval_results.md (rewritten after every
method, so a stopped run leaves what it measured) and, with matplotlib, the figure beside it; `--out
eval_results.md` writes the committed eval_results.md and eval_results.png instead. Every flag and every file
given is checked before the model loads; a bad one is one line on stderr.
"""
import argparse
import datetime
import os
import re
import sys
import time
from pathlib import Path

import torch
import triton
from tqdm import tqdm
from transformers import AutoTokenizer

from data import SyntheticMix
from default_model import check_device, checkpoint_dir
from generate import generate
from kernel import FA, SSA, XA
from model import Transformer
from router import Routers
from static_hybrid import probe_samples, retrieval_scores, static_modes

TASKS = {"passkey": "sensitive", "multi_key": "sensitive", "multi_value": "sensitive", "continuation": "robust"}
ROOM = 64  # tokens a prompt leaves for the answer in the model's context


def fail(message):
    """A user error: one line on stderr, exit status 1, no traceback."""
    sys.exit("error: " + " ".join(str(message).split()))


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def is_xa(name):
    return name.startswith("XAttention")  # every head XA: Omega (share of SSA heads) does not apply


def main():
    # -------------------------------------------------------------------------
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HuggingFace checkpoint dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--routers", required=True, nargs="+", help="dirs of routers from train.py; the first FA-SSA, "
                        "whose sink and window every SSA method here uses")
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8000], help="prompt lengths "
                        f"(each >= {ROOM}, and {ROOM} tokens below the model's context)")
    parser.add_argument("--samples", type=int, default=8, help="samples per task and length")
    parser.add_argument("--limit", type=int, default=None, help="at most this many samples per task and length")
    parser.add_argument("--static-ratio", type=float, default=0.7, help="Omega of the static hybrid (paper: 0.7)")
    parser.add_argument("--seed", type=int, default=2026, help="seed of the task sets")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--out", default="out-eval/eval_results.md", help="markdown tables (its dir is created); "
                        "--out eval_results.md regenerates the committed file, and its figure")
    parser.add_argument("--figure", default=None, help="figure (needs matplotlib; skipped without it); default: "
                        "beside --out, .png in place of its suffix; '' for none")
    parser.error = lambda message: fail(f"{message} (python eval.py --help lists the flags)")  # one line, no usage
    args = parser.parse_args()

    # -------------------------------------------------------------------------
    # every flag and file checked before the model loads: a bad one is one line now, not a traceback minutes later
    for flag, value, ok, want in (("--samples", args.samples, args.samples >= 1, ">= 1"),
                                  ("--limit", args.limit, args.limit is None or args.limit >= 1, ">= 1"),
                                  ("--lengths", " ".join(map(str, args.lengths)), min(args.lengths) >= ROOM,
                                   f">= {ROOM} each"),
                                  ("--static-ratio", args.static_ratio, 0 <= args.static_ratio <= 1, "in [0, 1]")):
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
    loaded = []  # the routers of each dir, checked against the model's shape
    for path in args.routers:
        if not Path(path).is_dir():
            fail(f"--routers {path}: no such directory; pass dirs that train.py --out-dir wrote")
        try:
            loaded.append(Routers.load(path, config))
        except Exception as e:  # no routers.safetensors, an unreadable routers.json / elastic.json, another model
            fail(f"--routers {path}: {e}")
    ssa_config = loaded[0].elastic
    if ssa_config.mode_pair != "FA-SSA":
        fail(f"--routers {args.routers[0]} holds {ssa_config.mode_pair} routers; the first dir must hold FA-SSA ones")
    out = Path(args.out)
    figure = out.with_suffix(".png") if args.figure is None else Path(args.figure) if args.figure else None
    try:
        for path in (out, figure or out):
            path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        fail(f"cannot create the dir of --out or --figure: {e}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        fail(f"cannot load the tokenizer from {model_dir}: {e}")

    # -------------------------------------------------------------------------
    # model, tasks
    try:
        model = Transformer.from_pretrained(model_dir, device=args.device,
                                            dtype=getattr(torch, args.dtype) if args.dtype else None)
    except Exception as e:  # a truncated or corrupt weight file, tensors that do not fit the config
        weights = "model.safetensors.index.json" if (model_dir / "model.safetensors.index.json").is_file() \
            else "model.safetensors"
        fail(f"cannot load the model from {model_dir} ({weights}): {e}")
    device = model.output_weight().device
    L, G = model.config.num_hidden_layers, model.config.num_key_value_heads
    n = min(args.samples, args.limit or args.samples)
    try:
        tasks = {(task, T): [SyntheticMix(tokenizer, T, T, seed=args.seed + T, kinds=(task,))[i] for i in range(n)]
                 for task in TASKS for T in args.lengths}
    except ValueError as e:  # a length too short for a task's prompt
        fail(f"--lengths {' '.join(map(str, args.lengths))}: {e}")

    # -------------------------------------------------------------------------
    # methods: each gives the modes [L, 1, G] for a sample, or None to let the loaded routers decide
    model.elastic = ssa_config
    scores = retrieval_scores(model, probe_samples(tokenizer, model.config.max_position_embeddings))

    def fixed(mode):
        return torch.full((1, L, G), mode, dtype=torch.int32, device=device)

    methods = {
        "dense FA": (None, fixed(FA), ssa_config),
        f"static FA-SSA {args.static_ratio:.2f}": (None, static_modes(scores, args.static_ratio, ssa_config),
                                                   ssa_config),
        "XAttention (all heads)": (None, fixed(XA), ssa_config),
    }
    for path, routers in zip(args.routers, loaded):
        name = f"elastic {routers.elastic.mode_pair}" + (f" ({path.rstrip('/').split('/')[-1]})"
                                                          if len(args.routers) > 1 else "")
        methods[name] = (routers, None, None)
    ELASTIC = next(name for name in methods if name.startswith("elastic FA-SSA"))  # the first routers
    print(f"{len(tasks) * n} samples per method: {', '.join(TASKS)} x lengths {args.lengths} x {n}; methods: "
          f"{', '.join(methods)}; SSA sink {ssa_config.sink}, window {ssa_config.window}")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.no_grad()
    def run(sample, T, modes):
        """Score one sample of length T; also return its Omega, its head modes [L, G], and, at the longest length,
        the prefill time in ms (else nan)."""
        ids = sample.input_ids.to(device)
        prompt, P = ids[None, :sample.prompt_len], sample.prompt_len
        prefill_ms = float("nan")
        if T == max(args.lengths):
            sync()
            t0 = time.perf_counter()
            model(prompt, modes=modes, last_only=True)
            sync()
            prefill_ms = (time.perf_counter() - t0) * 1e3
        if sample.task == "continuation":  # teacher-forced next-token accuracy on the true next passage
            logits, routing = model(ids[None], prompt_lens=torch.tensor([P], device=device), modes=modes,
                                    return_routing=True)
            score = (logits[0, P - 1:-1].argmax(-1) == ids[P:]).float().mean().item()
        else:  # the share of the answer's numbers found in a greedy answer
            stats = []
            out = [t for (t,) in generate(model, prompt, len(ids) - P + 8, eos_token_id=tokenizer.eos_token_id,
                                          modes=modes, stats=stats)]
            text, routing = tokenizer.decode(out, skip_special_tokens=True), stats[0]["routing"]
            want = re.findall(r"\d{5,}", tokenizer.decode(ids[P:], skip_special_tokens=True))
            score = sum(w in text for w in want) / len(want)
        return score, routing.omega.item(), routing.modes[0].cpu(), prefill_ms

    results = {}  # method -> list of (task, T, score, omega, modes, prefill_ms)

    def evaluate(name, routers, modes, config):
        if routers is not None:
            model.routers = routers.to(device)
            model.elastic = routers.elastic
        else:
            model.routers, model.elastic = None, config
        rows = []
        for (task, T), samples in tqdm(tasks.items(), desc=name, dynamic_ncols=True):
            for s in samples:
                rows.append((task, T) + run(s, T, modes))
        results[name] = rows

    # -------------------------------------------------------------------------
    # tables

    def summary(rows):
        kind = lambda r: TASKS[r[0]]  # noqa: E731
        return dict(acc_sensitive=100 * mean(r[2] for r in rows if kind(r) == "sensitive"),
                    acc_robust=100 * mean(r[2] for r in rows if kind(r) == "robust"),
                    omega_sensitive=mean(r[3] for r in rows if kind(r) == "sensitive"),
                    omega_robust=mean(r[3] for r in rows if kind(r) == "robust"),
                    omega=mean(r[3] for r in rows),
                    prefill_ms=mean(r[5] for r in rows if r[1] == max(args.lengths)))

    def write_table(matched=None, figure_written=False):
        """The markdown tables of what has run so far; with matched, the claim checked too, and the figure linked
        when it was written."""
        gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
        lines = ["# Accuracy against sparsity on SmolLM2-135M-Instruct",
                 "",
                 f"{gpu}, torch {torch.__version__}, triton {triton.__version__}, {datetime.date.today()}. "
                 f"Command: `python eval.py {' '.join(sys.argv[1:])}`. "
                 f"{n} samples per task and length, lengths {args.lengths}; SSA sink {ssa_config.sink}, window "
                 f"{ssa_config.window}; XA threshold {ssa_config.xa_threshold}, stride {ssa_config.xa_stride}. "
                 "Sensitive score: share of the answer's numbers in a greedy answer; robust score: teacher-forced "
                 "next-token accuracy on the true continuation. Omega: share of KV heads in the sparse mode (SSA; it "
                 "does not apply to XAttention on every head). Prefill: mean ms at the longest length, our fused "
                 "kernel for every method.",
                 "",
                 "| method | sensitive acc. | robust acc. | Omega sensitive | Omega robust | Omega mean | prefill ms |",
                 "|---|---|---|---|---|---|---|"]
        for name, rows in results.items():
            s = summary(rows)
            omegas = " | ".join("n/a" if is_xa(name) else f"{s[k]:.3f}"
                                for k in ("omega_sensitive", "omega_robust", "omega"))
            lines.append(f"| {name} | {s['acc_sensitive']:.1f} | {s['acc_robust']:.1f} | {omegas} | "
                         f"{s['prefill_ms']:.1f} |")
        lines += ["", "Score per task and length (%):", "",
                  "| method | " + " | ".join(f"{t} {T}" for t in TASKS for T in args.lengths) + " |",
                  "|---|" + "---|" * (len(TASKS) * len(args.lengths))]
        for name, rows in results.items():
            cells = [100 * mean(r[2] for r in rows if r[0] == t and r[1] == T) for t in TASKS for T in args.lengths]
            lines.append(f"| {name} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")

        if matched is not None:  # the claim, checked
            d, e, st = summary(results["dense FA"]), summary(results[ELASTIC]), summary(results[matched])
            holds = lambda ok: "holds" if ok else "does not hold"  # noqa: E731
            lines += ["", "The claim on this run:", "",
                      f"- retrieval within 2 points of dense: {ELASTIC} {e['acc_sensitive']:.1f} vs dense "
                      f"{d['acc_sensitive']:.1f} -> {holds(e['acc_sensitive'] >= d['acc_sensitive'] - 2)}",
                      f"- robust tasks at Omega >= 0.9: {e['omega_robust']:.3f} -> {holds(e['omega_robust'] >= 0.9)}",
                      f"- elastic above the static hybrid at equal average Omega ({e['omega']:.3f}): sensitive "
                      f"{e['acc_sensitive']:.1f} vs {st['acc_sensitive']:.1f}, robust {e['acc_robust']:.1f} vs "
                      f"{st['acc_robust']:.1f} -> "
                      f"{holds(e['acc_sensitive'] + e['acc_robust'] > st['acc_sensitive'] + st['acc_robust'])}"]
            if figure_written:
                link = os.path.relpath(figure, out.resolve().parent)  # as the .md sees it
                lines += ["", f"![accuracy against Omega, and routing per task type]({link})"]
        tmp = out.with_name(f".{out.name}.tmp")  # written whole, then renamed: a kill leaves the previous table
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, out)
        if matched is not None:
            print("\n".join(lines))

    # -------------------------------------------------------------------------
    # figure: accuracy against Omega per method, and where the elastic routers send heads per task type
    def draw_figure():
        """Writes the figure; False when matplotlib is missing."""
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print(f"matplotlib is not installed: no {figure} (pip install matplotlib)")
            return False
        fig, axes = plt.subplots(1, 3, figsize=(17, 4.5), gridspec_kw=dict(width_ratios=[1.4, 1, 1], wspace=0.3))
        ax = axes[0]
        for i, (name, rows) in enumerate(results.items()):
            s = summary(rows)
            if is_xa(name):
                continue  # no Omega to place it at
            c = f"C{i}"
            ax.scatter(s["omega_sensitive"], s["acc_sensitive"], color=c, marker="o", s=60, label=name)
            ax.scatter(s["omega_robust"], s["acc_robust"], color=c, marker="s", s=60)
        ax.set(xlabel="Omega (share of sparse KV heads)", ylabel="score (%)")
        ax.set_title("score against sparsity (circles: sensitive tasks, squares: robust)", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
        for ax, kind in zip(axes[1:], ("sensitive", "robust")):
            maps = [r[4] for r in results[ELASTIC] if TASKS[r[0]] == kind]
            heat = torch.stack([(m == SSA).float() for m in maps]).mean(0)  # [L, G]: share of samples sparse
            im = ax.imshow(heat.T, aspect="auto", cmap="viridis", vmin=0, vmax=1)
            ax.set(xlabel="layer", ylabel="KV head", yticks=range(G))
            ax.set_title(f"{ELASTIC} routing, {kind} tasks\n(share of samples with the head on SSA)", fontsize=10)
        fig.colorbar(im, ax=axes[1:].tolist(), shrink=0.8)
        tmp = figure.with_name(f".{figure.name}.tmp")
        fig.savefig(tmp, format=figure.suffix.lstrip(".") or "png", dpi=120, bbox_inches="tight")
        os.replace(tmp, figure)
        print(f"figure written to {figure}")
        return True

    # -------------------------------------------------------------------------
    # run every method, the table rewritten after each; then the static hybrid again, at the elastic model's own
    # average Omega (the fair comparison), the figure, and the table with the claim checked
    try:
        for name, (routers, modes, config) in methods.items():
            evaluate(name, routers, modes, config)
            write_table()
        omega_elastic = sum(r[3] for r in results[ELASTIC]) / len(results[ELASTIC])
        matched = f"static FA-SSA {omega_elastic:.2f} (matched)"
        evaluate(matched, None, static_modes(scores, omega_elastic, ssa_config), ssa_config)
    except KeyboardInterrupt:
        print(f"interrupted; the {len(results)} methods measured so far are in {out}" if results else
              "interrupted before the first method finished: nothing written", file=sys.stderr)
        sys.exit(130)
    write_table(matched, figure_written=figure is not None and draw_figure())
    print(f"results written to {out}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # while loading or drawing (main reports one during the methods itself)
        print("interrupted", file=sys.stderr)
        sys.exit(130)
