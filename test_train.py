"""
train.py as a user runs it, on the CPU: a tiny random model (one process and torchrun's two), and SmolLM2.

    pytest test_train.py
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model import Transformer
from router import ElasticConfig, Routers

HERE = Path(__file__).parent
SHORT = ["--min-len", "160", "--max-len", "260", "--sink", "8", "--window", "32", "--eval-samples", "4",
         "--pad-multiple", "128", "--calib-samples", "4", "--workers", "0"]  # data workers: one test (spawns cost)


def train(*args, nproc=None, timeout=600):
    cmd = [sys.executable, "train.py", *map(str, args)]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_three_steps_change_routers_save_and_resume(tiny_dir, tmp_path):
    out = tmp_path / "routers"
    log = train("--model", tiny_dir, "--out-dir", out, "--steps", 3, "--batch-size", 2, "--eval-every", 3, *SHORT)
    assert "step 3 |" in log and "eval step 3" in log and "final: routers at step 3" in log
    assert "router margin" in log
    assert "router inputs standardised from 8 pooled key vectors per layer" in log  # 4 samples x 2 KV heads
    ev = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["eval"]
    assert ev["margin"] > 0 and ev["class_gap"] >= 0, ev  # 4 held-out samples, both classes among them
    trained = load_file(out / "routers.safetensors")
    cfg = Transformer.from_pretrained(tiny_dir).config
    torch.manual_seed(1337)  # train.py's default seed: the routers it started from
    start = Routers(cfg.num_hidden_layers, cfg.head_dim, ElasticConfig(sink=8, window=32, tail=16)).state_dict()
    assert set(trained) == set(start)
    assert any(not torch.equal(trained[k], start[k]) for k in trained if "in_" not in k), \
        "training left the routers unchanged"
    assert not torch.equal(trained["0.in_std"], start["0.in_std"])  # calibrated, not the identity
    meta = json.loads((out / "routers.json").read_text())
    assert meta["step"] == 3 and len(meta["lambda1"]) == 2
    # the checkpoint loads back into the model, with its ElasticConfig
    routers = Routers.load(out, cfg)
    assert routers.elastic.sink == 8 and routers.elastic.window == 32
    assert routers.elastic.tail == 16 and trained["0.in_mean"].numel() == 2 * cfg.head_dim  # --tail's default
    assert all(torch.equal(v, trained[k]) for k, v in routers.state_dict().items())
    # and training resumes where it stopped
    log = train("--model", tiny_dir, "--out-dir", out, "--steps", 5, "--batch-size", 2, "--eval-every", 0,
                "--resume", *SHORT)
    assert "resumed from" in log and "at step 3" in log and "step 4 |" in log and "step 5 |" in log
    assert "standardised" not in log  # the saved routers carry their input standardisation
    assert "step 3 |" not in log
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]


def test_resume_of_a_run_from_before_tail(tiny_dir, tmp_path):
    """A run saved before --tail existed (no `tail` among its arguments) resumes with the paper's input it was
    trained on, not with today's default."""
    out = tmp_path / "old"
    train("--model", tiny_dir, "--out-dir", out, "--steps", 1, "--batch-size", 2, "--eval-every", 0, "--tail", 0,
          *SHORT)
    meta = json.loads((out / "routers.json").read_text())
    del meta["args"]["tail"]
    (out / "routers.json").write_text(json.dumps(meta))
    log = train("--model", tiny_dir, "--out-dir", out, "--steps", 2, "--batch-size", 2, "--eval-every", 0,
                "--resume", *SHORT)
    assert "at step 1" in log and "step 2 |" in log
    assert json.loads((out / "routers.json").read_text())["args"]["tail"] == 0


def test_torchrun_two_processes_keep_routers_identical(tiny_dir, tmp_path):
    # with the warm start, whose prompts are gathered from both processes
    log = train("--model", tiny_dir, "--out-dir", tmp_path / "ddp", "--steps", 2, "--batch-size", 4,
                "--eval-every", 0, "--device", "cpu", "--warm-start", 4, "--warm-steps", 3, *SHORT, nproc=2)
    assert "2 process(es) x 1 x 2 accum = batch 4" in log
    assert "warm start: routers taught the task class of 4 prompts in 3 steps" in log
    line = next(l for l in log.splitlines() if l.startswith("routers in sync across 2 processes"))
    assert float(line.split()[-1]) == 0.0, line


def test_torchrun_trains_what_one_process_trains(tiny_dir, tmp_path):
    """The same global batch on one process and on torchrun's two: each micro-batch draws the same Gumbel noise (a
    function of the seed and of its samples) and the gradients are averaged over the same micro-batches, so the
    routers and the step lines agree up to the order of the sums."""
    common = ["--model", tiny_dir, "--steps", 3, "--batch-size", 4, "--eval-every", 0, "--device", "cpu", *SHORT,
              "--workers", 2]  # batches built by spawned workers, as by default
    train(*common, "--out-dir", tmp_path / "one")
    train(*common, "--out-dir", tmp_path / "two", nproc=2)
    one, two = (load_file(tmp_path / d / "routers.safetensors") for d in ("one", "two"))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    lines = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in ("one", "two")]
    assert [round(x["loss"], 4) for x in lines[0]] == [round(x["loss"], 4) for x in lines[1]], lines


def test_torchrun_resumes_exactly_after_one_rank_is_killed(tiny_dir, tmp_path):
    """SIGKILL of one of torchrun's two processes mid-run: torchrun stops the other, the last checkpoint loads, and
    --resume ends with the routers of the run that was never killed, bit for bit."""
    common = ["--model", tiny_dir, "--steps", 4, "--batch-size", 4, "--save-every", 1, "--eval-every", 0, "--device",
              "cpu", *SHORT]
    train(*common, "--out-dir", tmp_path / "whole", nproc=2)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "train.py", *map(str, common), "--out-dir", str(out)], cwd=HERE,
                            env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "train_state.pt").exists():  # the first checkpoint
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.05)
    os.kill(worker_pid(out, local_rank=1), signal.SIGKILL)
    assert proc.wait(timeout=120) != 0
    assert torch.load(out / "train_state.pt")["step"] < 4  # killed before the end
    train("--out-dir", out, "--resume", nproc=2)
    whole, resumed = (load_file(tmp_path / d / "routers.safetensors") for d in ("whole", "killed"))
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def worker_pid(out_dir, local_rank):
    """The pid of torchrun's worker of this local rank that trains into out_dir (from /proc)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(out_dir).encode() in cmd and f"LOCAL_RANK={local_rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of local rank {local_rank} trains into {out_dir}")


def test_fsdp_shards_the_backbone_and_trains_the_same_routers(tiny_dir, tmp_path):
    """--fsdp (FSDP2 over the frozen backbone) must train exactly what the replicated backbone trains."""
    common = ["--model", tiny_dir, "--steps", 2, "--batch-size", 4, "--eval-every", 2, "--device", "cpu", *SHORT,
              "--eval-samples", 3]  # 3 held-out samples over 2 ranks: one rank runs a padding forward
    log = train(*common, "--out-dir", tmp_path / "fsdp", "--fsdp", nproc=2)
    train(*common, "--out-dir", tmp_path / "ddp", nproc=2)
    fsdp, ddp = (load_file(tmp_path / d / "routers.safetensors") for d in ("fsdp", "ddp"))
    assert max((fsdp[k] - ddp[k]).abs().max().item() for k in ddp) < 1e-6
    evals = [[json.loads(l)["eval"] for l in (tmp_path / d / "log.jsonl").read_text().splitlines()
              if "eval" in json.loads(l)] for d in ("fsdp", "ddp")]
    assert evals[0] == evals[1] and len(evals[0]) == 1, evals
    assert "routers in sync across 2 processes" in log
    held = next(l for l in log.splitlines() if l.startswith("FSDP2:")).replace(",", "").split()
    assert int(held[4]) < 0.6 * int(held[1]), held  # each process holds about half the backbone


def test_fsdp_needs_torchrun(tiny_dir, tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--model", str(tiny_dir), "--fsdp", "--out-dir", str(tmp_path)],
                       cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--fsdp shards the backbone over torchrun's processes" in r.stderr


def test_a_few_steps_on_smollm2(tmp_path):
    """Both objectives: CE of the targets, and KL from the dense model (its loss is the KL plus the Lagrangian,
    which starts near zero, so it sits far below the CE)."""
    for loss in ("ce", "kl"):
        out = tmp_path / loss
        log = train("--out-dir", out, "--steps", 2, "--batch-size", 2, "--eval-every", 0, "--loss", loss, *SHORT)
        lines = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
        assert [l["step"] for l in lines] == [1, 2]
        assert all(0.0 < l["ce"] < 10.0 for l in lines), lines  # a trained model, not random logits (ln V = 10.8)
        assert "final: routers at step 2" in log
        if loss == "kl":
            assert all(l["loss"] < 0.5 * l["ce"] for l in lines), lines


def test_distillation_loss_is_zero_for_the_dense_model(tiny_dir):
    from data import IGNORE
    from kernel import FA, SSA
    from router import ElasticConfig
    from train import cross_entropy, distillation_loss
    model = Transformer.from_pretrained(tiny_dir)
    model.elastic = ElasticConfig(sink=4, window=8)
    L, G = model.config.num_hidden_layers, model.config.num_key_value_heads
    idx = torch.randint(0, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    targets = torch.full((2, 40), IGNORE)
    targets[:, 20:39] = idx[:, 21:]
    sel = targets != IGNORE
    with torch.no_grad():
        dense = model(idx, modes=torch.full((1, L, G), FA))
        routed = model(idx, modes=torch.full((1, L, G), FA), logits_at=sel)
        sparse = model(idx, modes=torch.full((1, L, G), SSA), logits_at=sel)
    assert torch.equal(routed, dense[sel])  # logits_at: the trained positions' logits, in row-major order
    with pytest.raises(ValueError, match="logits_at must be a bool mask"):
        model(idx, logits_at=sel.long())
    full = F.cross_entropy(dense.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)  # every position's logits
    assert torch.allclose(cross_entropy(routed, targets[sel]), full, rtol=1e-6, atol=0)
    dense = dense[sel]
    assert distillation_loss(routed, dense).item() == 0.0
    kl = distillation_loss(sparse, dense).item()
    assert kl > 1e-4
    # against a direct sum: KL(p||q) = sum p (log p - log q), mean over trained positions
    p, q = dense.double().softmax(-1), sparse.double().softmax(-1)
    assert abs(kl - (p * (p.log() - q.log())).sum(-1).mean().item()) < 1e-4 * max(kl, 1)


def test_margin_penalty_shrinks_the_router_margins(tiny_dir, tmp_path):
    """--margin-penalty pulls the routers' sparse-minus-full logit margins towards 0 (train.py's held-out eval
    reports their size)."""
    margins = {}
    for beta in (0, 10):
        out = tmp_path / f"beta{beta}"
        train("--model", tiny_dir, "--out-dir", out, "--steps", 5, "--batch-size", 2, "--eval-every", 5,
              "--lr", 1e-2, "--warmup", 0, "--margin-penalty", beta, *SHORT)
        margins[beta] = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["eval"]["margin"]
    assert margins[10] < 0.5 * margins[0], margins


def test_fa_sk_trains_routers_and_scorers(tiny_dir, tmp_path):
    """--mode-pair FA-SK: the SparseK scorers (one per layer, w = 0 at the start) train with the routers."""
    out = tmp_path / "sk"
    args = [a for a in SHORT if a not in ("--window", "32")]
    train("--model", tiny_dir, "--out-dir", out, "--steps", 3, "--batch-size", 2, "--eval-every", 0, "--lr", 1e-2,
          "--warmup", 0, "--mode-pair", "FA-SK", "--window", 128, "--sk-k", 16, *args)
    saved = load_file(out / "routers.safetensors")
    scorers = [k for k in saved if "scorer" in k]
    assert len(scorers) == Transformer.from_pretrained(tiny_dir).config.num_hidden_layers
    assert all(saved[k].abs().max() > 0 for k in scorers)  # moved from their zero start
    assert json.loads((out / "elastic.json").read_text())["sk_k"] == 16
