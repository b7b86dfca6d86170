"""
What the scripts share (train.py, sample.py, eval.py, bench.py): a user error is one line, the checks of --model,
--routers and --device before anything heavy loads, the model and tokenizer loaded or refused in one line, and the
header a results file carries. Nothing here is part of the method; a reader of the method can skip this file.

    fail(message)                   one line on stderr ("error: ..."), exit status 1, no traceback
    check_device(device)            a --device that this machine can run, or ValueError
    checkpoint_dir(model)           the dir a --model names (None: the embedded default model) and its config
    routers_dir(name)               a --routers value: a dir train.py wrote, or a set shipped under routers/
    model_config(path)              a benchmark's --model config.json, read, or fail in one line
    load_model(dir, device, dtype)  model.Transformer.from_pretrained, or fail naming the weights file
    load_tokenizer(dir)             the checkpoint's tokenizer, or fail
    command_line(script)            the command a results file records; provenance(): GPU, versions and date
    write_atomic(path, text)        a file written whole or not at all

The check functions raise ValueError (one line) so that library code and tests can call them; scripts turn it into
fail(). Under torchrun only rank 0 prints an error; every rank exits.
"""
import datetime
import os
import sys
from pathlib import Path

SHIPPED_ROUTERS = Path(__file__).parent / "routers"  # routers trained for the default model (RESULTS.md)


def fail(message):
    """A user error: one line on stderr (under torchrun from rank 0 only), exit status 1, no traceback."""
    sys.exit("error: " + " ".join(str(message).split()) if os.environ.get("RANK", "0") == "0" else 1)


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


def checkpoint_dir(model=None):
    """The checkpoint dir that a script's --model names (None: the default model, converted if need be) and its
    model.ModelConfig, checked before anything heavy loads; a bad dir or config.json is a ValueError of one line
    naming it. -> (dir, config)"""
    from default_model import default_model_dir
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


def model_config(path):
    """A benchmark's --model (a config.json; random weights) -> model.ModelConfig, or fail in one line."""
    from model import ModelConfig
    if not os.path.isfile(path):
        fail(f"--model {path}: no such config.json (try configs/llama-3.1-8b.json)")
    try:
        return ModelConfig.from_json(path)
    except ValueError as e:  # it names the file
        fail(e)
    except (KeyError, TypeError) as e:  # a field missing or of the wrong type
        fail(f"{path} is not a model config this code reads: {e!r}")


def load_model(model_dir, device=None, dtype=None):
    """model.Transformer.from_pretrained(model_dir, device, dtype), or fail() with one line that names the weights
    file (a truncated or corrupt file, tensors that do not fit the config). dtype: a torch dtype or its name."""
    import torch

    from model import Transformer
    try:
        return Transformer.from_pretrained(model_dir, device=device,
                                           dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    except Exception as e:
        weights = "model.safetensors.index.json" if (Path(model_dir) / "model.safetensors.index.json").is_file() \
            else "model.safetensors"
        fail(f"cannot load the model from {model_dir} ({weights}): {str(e).splitlines()[0] if str(e) else repr(e)}")


def load_tokenizer(model_dir):
    """The checkpoint's tokenizer (transformers.AutoTokenizer), or fail() in one line."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        fail(f"cannot load the tokenizer from {model_dir}: {str(e).splitlines()[0] if str(e) else repr(e)}")


def command_line(script, argv=None):
    """The command that made a results file, as a reader would retype it: `python SCRIPT ARGS`, where the
    values of --out and --figure keep only their file name (the dir was the writer's machine's)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(1, len(argv)):
        if argv[i - 1] in ("--out", "--figure"):
            argv[i] = os.path.basename(argv[i])
    return " ".join(["python", script, *argv])


def provenance(device="cuda"):
    """What a results file states about where it was measured: 'NVIDIA H200 · torch 2.11.0 · triton 3.6.0 · date'
    (the GPU's name when device is a CUDA device, else 'CPU')."""
    import torch
    import triton
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "CPU"
    return f"{name} · torch {torch.__version__} · triton {triton.__version__} · {datetime.date.today()}"


def write_atomic(path, text):
    """Writes text to path through a temporary file and a rename: a kill leaves the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
