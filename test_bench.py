"""
bench.py and bench_model.py on the CPU, where nothing is timed for real: every bench_model.py setup runs (eagerly:
no CUDA graph, no torch.compile) on a tiny random model for a few decode steps, none fails, and the dense SDPA
setups decode the same greedy tokens as ours all-FA on the same weights (and the dense baseline's cache decodes as
attention.KVCache, step by step); a setup that raises is a row with its error; the prefill's (query, key) pair
counts against the masks they count; the report renders; bench_train.py's step runs and trains the routers; without
a GPU the scripts stop in one line.

    pytest test_bench.py
"""
import json

import pytest
import torch

import attention
import bench
import bench_model
import bench_train
from attention import KVCache
from kernel import FA, SSA, XA

TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5)
# T = 160 past the window (rings wrap) and over two XA blocks; B = 1 and B = 2 (the masked SDPA path)
ARGS = ["--seq-lens", "160", "--batch", "2", "--decode-tokens", "4", "--sink", "8", "--window", "32"]
SETUPS = ["dense SDPA, eager", "dense SDPA, CUDA graph", bench_model.FLASH, "dense, ours (all FA)", "FA-SSA, Omega 0.7",
          "XA-SSA, Omega 0.7", "FA-SSA, Omega 0.7, not compiled"]


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "config.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def model_run(tiny_config):
    args = bench_model.parse_args(["--model", str(tiny_config), *ARGS])
    saved = []  # the rows each progress call held: a run cut short keeps what it measured
    res = bench_model.bench_model(args, device="cpu", progress=lambda r: saved.append(list(r.rows)))
    return args, res, saved


def test_every_model_setup_runs(model_run):
    args, res, saved = model_run
    assert [len(rows) for rows in saved] == [len(SETUPS), 2 * len(SETUPS)]  # after B = 1, then after B = 2
    assert saved[-1] == res.rows
    assert [(r.B, r.T, r.setup) for r in res.rows] == [(B, 160, name) for B in (1, 2) for name in SETUPS]
    failed = [f"B={r.B} {r.setup}: {r.error}" for r in res.rows if r.error is not None]
    assert not failed, failed
    for r in res.rows:
        assert r.ttft > 0 and r.ms > 0 and r.floor > 0 and r.kv > 0, r
        assert len(r.tokens) == r.B and all(len(row) == args.decode_tokens for row in r.tokens), r
    dense = ("dense SDPA, eager", "dense SDPA, CUDA graph", bench_model.FLASH)  # not our cache: no split
    for r in res.rows:  # ours: attention alone and the GEMVs alone were timed, and the attention has its floor
        assert (r.setup in dense) == (r.attn_ms != r.attn_ms), r
        assert r.setup in dense or (r.attn_ms > 0 and r.gemv_ms > 0 and 0 < r.attn_floor < r.floor), r
    report = bench_model.model_report(args, res, device="cpu")
    table, split = report.split("Where our decode step's time goes")
    split, ideal = split.split("against Amdahl's ideal")
    for name in SETUPS:
        assert table.count(f"| {name} |") == 2, name
        assert split.count(f"| {name} |") == (0 if name in dense else 2), name
    assert "Failed" not in report and "nan" not in report
    # the FA-SSA first tokens against Amdahl's ideal, from the measured per-mode attention times
    assert all(t > 0 for t in res.prefill_attn[160])
    assert ideal.count("| FA-SSA, Omega 0.7 |") == 1 and ideal.count("| FA-SSA, Omega 0.7, not compiled |") == 1
    assert {r.omega for r in res.rows if "Omega" in r.setup} == {0.75}  # 3 of the 4 KV heads SSA
    assert {r.omega for r in res.rows if "Omega" not in r.setup} == {0.0}


def test_ideal_first_token():
    """ideal = dense first token - L * Omega * (dense attention - SSA attention), from SDPA and from ours all FA."""
    rows = [bench_model.ModelRow(1, 4096, name, ttft=ttft, omega=omega) for name, ttft, omega in
            [("dense SDPA, eager", 1000.0, 0.0), ("dense, ours (all FA)", 1100.0, 0.0),
             ("FA-SSA, Omega 0.7", 700.0, 0.75), ("XA-SSA, Omega 0.7", 650.0, 0.75)]]
    lines = bench_model.ideal_table(rows, {4096: (10.0, 12.0, 2.0)}, layers=32, ring=2176)
    assert len(lines) == 6 and "| FA-SSA, Omega 0.7 | 0.750 |" in lines[-1]
    assert lines[-1].endswith("| 700 | 808 (1.15) | 860 (1.23) |"), lines[-1]  # 1000 - 32 * 0.75 * 8; 1100 - 240
    assert len(bench_model.ideal_table(rows, {4096: (10.0, 12.0, 2.0)}, layers=32, ring=4096)) == 5  # SSA is FA
    # without the eager row, the dense SDPA prefill of flash decoding's setup: the same first token, the same ideal
    rows[0].setup = bench_model.FLASH
    assert bench_model.ideal_table(rows, {4096: (10.0, 12.0, 2.0)}, layers=32, ring=2176)[-1] == lines[-1]


def test_setups_flag(tiny_config):
    args = bench_model.parse_args(["--model", str(tiny_config), "--setups", "flash", "fa-ssa", "ours-dense"])
    model = bench_model.random_model(args.model, "cpu")
    names = [s.name for s in bench_model.model_setups(model, args)]
    assert names == [bench_model.FLASH, "dense, ours (all FA)", "FA-SSA, Omega 0.7"]  # in the table's order
    with pytest.raises(SystemExit) as e:
        bench_model.parse_args(["--model", str(tiny_config), "--setups", "flash-decoding"])
    err = str(e.value.code)  # cli.fail: the one line Python prints on exit, status 1
    assert len(err.splitlines()) == 1 and "'flash-decoding'" in err and "fa-ssa" in err, err


def test_dense_paths_decode_alike(model_run):
    _, res, _ = model_run
    tokens = {(r.B, r.setup): r.tokens for r in res.rows}
    for B in (1, 2):
        ours = tokens[(B, "dense, ours (all FA)")]
        assert tokens[(B, "dense SDPA, eager")] == ours, B
        assert tokens[(B, "dense SDPA, CUDA graph")] == ours, B
        assert tokens[(B, bench_model.FLASH)] == ours, B
        # on the CPU nothing is compiled: the compiled setup and the other are one path
        assert tokens[(B, "FA-SSA, Omega 0.7")] == tokens[(B, "FA-SSA, Omega 0.7, not compiled")], B


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the flash kernel needs CUDA"))])
@pytest.mark.parametrize("kind", ["eager", "graph", "flash"])
def test_sdpa_cache_decodes_as_ours(kind, device):
    """The dense baselines' cache against attention.KVCache with every head FA, step by step on the same keys: a
    wrong mask or a key in the wrong slot shows here, where a tiny random model's greedy tokens may not notice (its
    residual stream is mostly the token's own embedding). On the GPU (bf16) "flash" is FlashAttention's kernel."""
    torch.manual_seed(0)
    B, H, G, T, D, new = 2, 4, 2, 40, 16, 5
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    rand = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    k, v = rand(B, G, T, D), rand(B, G, T, D)
    ours, dense = KVCache(new, sink=8, window=32), bench_model.SdpaCache(new, kind)
    ours.prefill(k, v, None)
    dense.prefill(k, v, None)
    assert dense.nbytes() == ours.nbytes()
    for i in range(new):
        q, k_new, v_new = rand(B, H, 1, D), rand(B, G, 1, D), rand(B, G, 1, D)
        pos = torch.tensor([T + i, T - 3 + i], dtype=torch.int32, device=device)  # rows at different positions
        tol = dict(atol=1e-5, rtol=1e-4) if device == "cpu" else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(dense.decode(q, k_new, v_new, pos, None), ours.decode(q, k_new, v_new, pos, None),
                                   **tol)


def test_a_failing_setup_is_a_row_with_its_error(tiny_config, monkeypatch):
    args = bench_model.parse_args(["--model", str(tiny_config), *ARGS])
    model = bench_model.random_model(args.model, "cpu")
    setup = bench_model.model_setups(model, args)[0]
    old = lambda self, q, k, v, pos: None  # noqa: E731  the signature before SparseK
    monkeypatch.setattr(bench_model.SdpaCache, "decode", old)
    idx = torch.randint(0, TINY["vocab_size"], (1, 160))
    row = bench_model.time_setup(model, setup, idx, args, weight_bytes=1, bandwidth=1.0, device="cpu")
    assert row.error is not None and row.error.startswith("TypeError"), row
    res = bench_model.ModelResults([row], {160: 1.0}, {160: (1.0, 1.0, 0.5)}, TINY["num_hidden_layers"], 1, 1.0)
    assert f"- B=1 T=160 {setup.name}: TypeError" in bench_model.model_report(args, res, device="cpu")


def test_pairs_per_head_counts_the_mask():
    T, sink, window, nb = 300, 8, 64, 3
    torch.manual_seed(0)
    mode = torch.tensor([FA, SSA, XA, XA])
    xa_blocks = torch.rand(4, nb, nb) < 0.5
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    causal = j <= i
    masks = {FA: causal, SSA: causal & ((j < sink) | (i - j < window))}
    expected = [int((masks[m] if m != XA else causal & xa_blocks[h][i // 128, j // 128]).sum())
                for h, m in enumerate(mode.tolist())]
    assert bench.pairs_per_head(mode, T, sink, window, xa_blocks).tolist() == expected


def test_prefill_report_renders():
    args = bench.parse_args(["--seq-lens", "8192", "--sk-ks", "256"])
    res = bench.Results(args.head_dim)
    for case, method, ms in [("FA-only (dense causal)", "elastic_attention", 2.0),
                             ("SSA-only", "elastic_attention", 0.5),
                             ("SSA-only", "FlexAttention (same mask, mode table)", 1.0)]:
        res.rows.append((8192, case, method, ms, 100.0, ""))
        res.ms[(8192, case, method)] = ms
    res.rows.append((8192, "25% FA + SSA", "elastic_attention", float("nan"), float("nan"), "failed: out of memory"))
    targets = bench.prefill_targets(res, args)
    assert len(targets) == 6 and targets[1][3]  # SSA 2x faster than Flex: met
    report = bench.prefill_report(res, targets, args, None, [], device="cpu")
    assert "| SSA-only | FlexAttention (same mask, mode table) | 1.000 | 100 | 2.00x |  |" in report
    assert "failed: out of memory" in report


def test_no_gpu_is_one_line(tiny_config):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    for main, argv in ((bench.main, []), (bench_model.main, ["--model", str(tiny_config.parent / "missing.json")]),
                       (bench_model.main, ["--model", str(tiny_config)]),
                       (bench_train.main, ["--model", str(tiny_config)]),
                       (bench_train.main, ["--model", str(tiny_config), "--seq-lens", "64"]),
                       (bench_train.main, ["--model", str(tiny_config), "--answer-tokens", "0"])):
        with pytest.raises(SystemExit) as exit:
            main(argv)
        message = exit.value.code
        assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message


@pytest.mark.parametrize("whole, loss", [(False, "ce"), (True, "kl")])
def test_training_step_runs_and_trains_the_routers(tiny_config, monkeypatch, whole, loss):
    """bench_train.py on the CPU: every row measured, the split too, and the routed step reaches every router (its
    optimiser step moves their weights: the gradient went through the loss, the mix and the straight-through z)."""
    args = bench_train.parse_args(["--model", str(tiny_config), "--seq-lens", "160", "--answer-tokens", "16",
                                   "--sink", "8", "--window", "32", "--loss", loss] + ["--whole-sequence"] * whole)
    moved = []
    step = bench_train.routed_step

    def watched(model, routers, batch, device, loss):
        before = [p.detach().clone() for p in routers.parameters()]
        run = step(model, routers, batch, device, loss)

        def checked():
            run()
            moved.append(sum(not torch.equal(a, p) for a, p in zip(before, routers.parameters())))
        return checked
    monkeypatch.setattr(bench_train, "routed_step", watched)
    fused = attention.routed_attention

    def inference_only(*a, **k):  # the fused kernel has no backward on the GPU: no timed step may ask one of it
        assert not torch.is_grad_enabled(), "a gradient through the fused kernel (no backward on the GPU)"
        return fused(*a, **k)
    monkeypatch.setattr(attention, "routed_attention", inference_only)
    seen = []
    rows, weights_gib = bench_train.bench_train(args, device="cpu", done=lambda rows, gib: seen.append(len(rows)))
    assert seen == [1, 2] and weights_gib > 0  # the report is rewritten after every row
    assert [(r.T, r.checkpointing, r.error) for r in rows] == [(160, True, ""), (160, False, "")]
    assert all(r.step_ms > 0 and r.dense_ms > 0 for r in rows)
    assert rows[0].attn_ms > 0 and rows[0].router_ms > 0
    n_weights = len(list(bench_train.Routers(2, 16).parameters()))  # every parameter tensor of both layers' routers
    assert moved and all(m == n_weights for m in moved), (moved, n_weights)
    rows.append(bench_train.Row(320, True, error="out of memory: CUDA out of memory"))
    report = bench_train.train_report(args, rows, device="cpu", weights_gib=weights_gib)
    assert report.count("\n| 160 |") == 2 and "| 320 | yes | out of memory" in report and "nan" not in report
    unsplit = next(line for line in report.splitlines() if line.startswith("| 160 | no |"))
    assert unsplit.endswith("| - | - | - | - | - |"), unsplit  # without checkpointing the split is not measured
