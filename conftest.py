"""Shared test fixtures: the embedded SmolLM2 checkpoint dir, and a tiny random Llama that scripts can run on."""
import os
import shutil

import torch

if not torch.cuda.is_available():  # before anything imports Triton: the kernel tests run in its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from default_model import default_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_dir():
    return default_model_dir()


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory):
    """A 2-layer random Llama (GQA 4:2, head dim 16) with SmolLM2's vocabulary size, weights and config only."""
    out = tmp_path_factory.mktemp("tiny-llama-weights")
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tiny_weights_dir, smollm2_dir):
    """The tiny random Llama with SmolLM2's tokenizer files, so that train.py and sample.py run on it as on a real
    checkpoint, in seconds."""
    out = tmp_path_factory.mktemp("tiny-llama")
    shutil.copytree(tiny_weights_dir, out, dirs_exist_ok=True)
    for f in smollm2_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name.endswith(".jinja"):
            shutil.copy(f, out / f.name)
    return out
