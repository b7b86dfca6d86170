"""
eval.py as a user runs it with --limit, on the tiny random model (CPU). Only that it runs and reports every
method: the numbers themselves come from the GPU run in eval_results.md.

    pytest test_eval.py
"""
import os
import re
import subprocess
import sys
from pathlib import Path

from model import Transformer
from router import ElasticConfig, Routers

HERE = Path(__file__).parent


def test_eval_runs_and_reports_every_method(tiny_dir, tmp_path):
    cfg = Transformer.from_pretrained(tiny_dir).config
    for name, pair in (("r", "FA-SSA"), ("r2", "XA-SSA")):
        Routers(cfg.num_hidden_layers, cfg.head_dim, ElasticConfig(pair, sink=8, window=32)).save(tmp_path / name, cfg)
    # Run from another dir with the default --out, and with a matplotlib that fails to import: the committed
    # eval_results.md stays as it is, and the table links no figure that was not written.
    (tmp_path / "stub" / "matplotlib").mkdir(parents=True)
    (tmp_path / "stub" / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib in this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "stub"), str(HERE)]))
    committed = (HERE / "eval_results.md").stat().st_mtime_ns
    r = subprocess.run([sys.executable, HERE / "eval.py", "--model", tiny_dir, "--routers", tmp_path / "r",
                        tmp_path / "r2", "--limit", "1", "--lengths", "200", "300"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    out = tmp_path / "out-eval" / "eval_results.md"
    table = out.read_text()
    for method in ("dense FA", "static FA-SSA 0.70", "XAttention (all heads)", "elastic FA-SSA (r)",
                   "elastic XA-SSA (r2)"):
        assert f"| {method} |" in table, method
    assert re.search(r"\| static FA-SSA \d\.\d\d \(matched\) \|", table)  # at the untrained routers' own Omega
    assert "passkey 200 | passkey 300 | multi_key 200" in table
    assert "retrieval within 2 points of dense" in table and "SSA sink 8, window 32" in table
    assert "matplotlib is not installed" in r.stdout and ".png" not in table
    assert sorted(f.name for f in out.parent.iterdir()) == ["eval_results.md"]  # no figure, no temporary file
    assert (HERE / "eval_results.md").stat().st_mtime_ns == committed
