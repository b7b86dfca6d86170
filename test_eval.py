"""
eval.py on the CPU: the statistics it reports (bootstrap intervals, AUC, the linear probe) against known answers,
and a run as a user makes it with --limit, on the tiny random model (that it runs and reports every method; the
numbers themselves come from the GPU run in eval_results.md).

    pytest test_eval.py
"""
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import torch

from eval import fit_probe
from eval_report import auc, auc_of_pairs, bootstrap_ci, class_gap, interpolate, mean
from model import Transformer
from router import ElasticConfig, Routers

HERE = Path(__file__).parent


def test_bootstrap_ci_covers_the_mean_and_narrows_with_n():
    rng = random.Random(0)
    widths = []
    for n in (50, 800):
        xs = [rng.gauss(3.0, 1.0) for _ in range(n)]
        est, lo, hi = bootstrap_ci(xs)
        assert abs(est - mean(xs)) < 1e-12 and lo < 3.0 < hi and lo < est < hi
        widths.append(hi - lo)
        assert abs((hi - lo) - 2 * 1.96 / n ** 0.5) < 0.35 * 2 * 1.96 / n ** 0.5  # the normal interval's width
    assert widths[1] < widths[0] / 3
    assert bootstrap_ci(xs) == bootstrap_ci(xs)  # a fixed seed
    # a stat of tuples: a difference of class means, as eval.py's robust - sensitive Omega
    pairs = [(rng.gauss(c, 0.5), c) for c in (0, 1) for _ in range(100)]
    est, lo, hi = bootstrap_ci(pairs, class_gap)
    assert abs(est - (mean(s for s, c in pairs if c) - mean(s for s, c in pairs if not c))) < 1e-12
    assert lo < 1.0 < hi and lo > 0.7
    est, lo, hi = bootstrap_ci(pairs, auc_of_pairs)  # AUC about 0.92 for two normals one sd apart
    assert est == auc([s for s, _ in pairs], [c for _, c in pairs]) and lo < 0.92 < hi


def test_auc():
    assert auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    assert auc([0.5] * 6, [0, 1, 0, 1, 1, 0]) == 0.5
    assert auc([1.0, 2.0], [1, 1]) != auc([1.0, 2.0], [1, 1])  # nan: one class only
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=g).tolist()  # many ties
    labels = torch.randint(0, 2, (60,), generator=g).tolist()
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    brute = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg) / (len(pos) * len(neg))
    assert abs(auc(scores, labels) - brute) < 1e-12
    batch = auc(torch.tensor([scores, scores[::-1]]), torch.tensor([labels, labels]))  # [2]: one per row
    assert abs(batch[0].item() - brute) < 1e-12 and batch.shape == (2,)


def test_interpolate_on_the_static_curve():
    xy = [(0.5, 40.0), (0.7, 30.0), (0.7, 20.0), (0.9, 10.0)]  # two hybrids may share an Omega
    assert abs(interpolate(xy, 0.6) - 35.0) < 1e-12 and abs(interpolate(xy, 0.8) - 15.0) < 1e-12
    assert interpolate(xy, 0.5) == 40.0 and interpolate(xy, 0.9) == 10.0 and interpolate(xy, 0.7) in (30.0, 20.0)
    assert interpolate(xy, 0.49) is None and interpolate(xy, 0.95) is None and interpolate([], 0.5) is None
    assert interpolate([(0.5, 1.0)], 0.5) == 1.0 and interpolate([(0.5, 1.0)], 0.6) is None


def test_probe_separates_separable_features_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 300, generator=g)  # features of two classes whose means differ, as pooled keys' would
    y = torch.randint(0, 2, (400,), generator=g)
    x_sep = x + y[:, None] * 3 * torch.randn(300, generator=g) / 300 ** 0.5
    probe = fit_probe(x_sep[:200], y[:200])
    assert auc(probe(x_sep[200:]).tolist(), y[200:].tolist()) > 0.9
    noise = torch.randint(0, 2, (400,), generator=g)
    probe = fit_probe(x[:200], noise[:200])
    assert abs(auc(probe(x[200:]).tolist(), noise[200:].tolist()) - 0.5) < 0.15


def test_eval_runs_and_reports_every_method(tiny_dir, tmp_path):
    cfg = Transformer.from_pretrained(tiny_dir).config
    for name, pair in (("r", "FA-SSA"), ("r2", "XA-SSA")):
        Routers(cfg.num_hidden_layers, cfg.head_dim, ElasticConfig(pair, sink=8, window=32)).save(tmp_path / name, cfg)
    # Run from another dir with the default --out, and with a matplotlib that fails to import: the committed
    # eval_results.md stays as it is, and the table links no figure that was not written.
    (tmp_path / "stub" / "matplotlib").mkdir(parents=True)
    (tmp_path / "stub" / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib in this test')\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tmp_path / "stub"), str(HERE)]))
    committed = (HERE / "eval_results.md").stat().st_mtime_ns
    r = subprocess.run([sys.executable, HERE / "eval.py", "--model", tiny_dir, "--routers", tmp_path / "r",
                        tmp_path / "r2", "--limit", "2", "--batch-size", "2", "--lengths", "400", "--probe",
                        "--probe-samples", "8"], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = tmp_path / "out-eval" / "eval_results.md"
    table = out.read_text()
    for method in ("dense FA", "static FA-SSA 0.70", "XAttention (all heads)", "elastic FA-SSA (r)",
                   "elastic XA-SSA (r2)"):
        assert f"| {method} |" in table, method
    for label, pair in (("r", "FA-SSA"), ("r2", "XA-SSA")):  # at the untrained routers' own Omega
        assert re.search(rf"\| static {pair} \d\.\d\d \(matched to {label}\) \|", table), label
    assert "| passkey (seen, sensitive) 400 |" in table and "| continuation (seen, robust) 400 |" in table
    assert "(held-out, sensitive) 400 |" in table and "(held-out, robust) 400 |" in table
    assert re.search(r"elastic FA-SSA \(r\), held-out sensitive accuracy on par with dense: elastic - dense = "
                     r"[+-]\d+\.\d points \[[+-]\d+\.\d, [+-]\d+\.\d\]", table)
    assert "Omega follows the task class on the held-out kinds" in table and "SSA sink 8, window 32" in table
    assert re.search(r"Linear probe .* AUC \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", table)
    assert "matplotlib is not installed" in r.stdout and ".png" not in table
    assert sorted(f.name for f in out.parent.iterdir()) == ["eval_results.md"]  # no figure, no temporary file
    assert (HERE / "eval_results.md").stat().st_mtime_ns == committed


def test_eval_frontier_has_a_row_per_ratio_and_a_claim(tiny_dir, tmp_path):
    cfg = Transformer.from_pretrained(tiny_dir).config
    Routers(cfg.num_hidden_layers, cfg.head_dim, ElasticConfig("FA-SSA", sink=8, window=32)).save(tmp_path / "r", cfg)
    ratios = ["0", "0.5", "1"]  # from every head full to every head sparse: any Omega of the routers lies between
    out = tmp_path / "frontier.md"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, HERE / "eval.py", "--model", tiny_dir, "--routers", tmp_path / "r", "--limit",
                        "1", "--heldout-only", "--lengths", "400", "--frontier", *ratios, "--out", out, "--figure", ""],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = out.read_text()
    table = report.split("The accuracy-sparsity frontier")[1].split("\n\n")[1]  # its caption, then the table
    rows = [line.split(" | ")[0].lstrip("| ") for line in table.splitlines()[2:]]
    assert rows == [f"static FA-SSA {float(x):.2f}" for x in ratios] + ["elastic FA-SSA"], table
    for line in table.splitlines()[2:]:  # Omega mean, then sensitive and robust accuracy of the held-out kinds and of
        # the human-style prompts, each an interval
        assert re.fullmatch(r"\| [^|]+ \| \d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\] (\| \d+\.\d \[\d+\.\d, \d+\.\d\] ){4}\|",
                            line), line
    assert re.search(r"- elastic FA-SSA, held-out sensitive accuracy against the static frontier at its mean Omega "
                     r"\d\.\d\d: \d+\.\d% against \d+\.\d% on the curve -> (above|below|on) the curve \(point "
                     r"estimates\); paired against the static hybrid at exactly this Omega \(static FA-SSA \d\.\d\d "
                     r"\(matched to r\)\): [+-]\d+\.\d points", report), report[-3000:]
