"""
The shipped routers (routers/, trained on SmolLM2-135M-Instruct; RESULTS.md) on a fresh machine: every set
loads into the default model by name, and the paper's claim is guarded for the FA-SSA set: robust prompts of
held-out kinds route to more sparse heads than sensitive ones (argmax routing, CPU, fp32).

    pytest test_routers.py
"""
import pytest
import torch
from transformers import AutoTokenizer

from data import HELDOUT_KINDS, KIND_CLASS, ROBUST, SENSITIVE, SyntheticMix
from cli import SHIPPED_ROUTERS, routers_dir
from model import Transformer
from router import MODE_PAIRS, Routers

SHIPPED = sorted(p.name for p in SHIPPED_ROUTERS.iterdir() if (p / "routers.safetensors").is_file())


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return Transformer.from_pretrained(smollm2_dir), AutoTokenizer.from_pretrained(smollm2_dir)


def test_the_shipped_sets(smol):
    model, _ = smol
    assert {"fa-ssa", "fa-xa", "xa-ssa", "fa-sk"} <= set(SHIPPED)
    for name in SHIPPED:
        routers = Routers.load(routers_dir(name), model.config)  # by name, as sample.py and eval.py take it
        assert routers.elastic.mode_pair in MODE_PAIRS and len(routers) == model.config.num_hidden_layers


@torch.no_grad()
def test_fa_ssa_routes_by_the_task_on_held_out_kinds(smol):
    """The claim as a test, on what training never saw: one prompt of each held-out kind (their own wordings and
    documents; 1024 tokens; argmax routing, fp32 on the CPU, so deterministic). The robust ones get a higher mean
    Omega than the sensitive ones by a clear margin, and each robust kind more than the sensitive mean (eval.py on
    the GPU, 24 prompts a kind and length: robust - sensitive 0.240 [0.220, 0.259]; RESULTS.md)."""
    model, tok = smol
    routers = Routers.load(routers_dir("fa-ssa"), model.config)
    model.routers, model.elastic = routers, routers.elastic
    try:
        omega = {}
        for kind in HELDOUT_KINDS:
            s = SyntheticMix(tok, 1024, 1024, seed=2026 + 1024, kinds=(kind,), split="heldout")[0]
            _, routing = model(s.input_ids[None, :s.prompt_len], return_routing=True, last_only=True)
            omega[kind] = routing.omega.item()
    finally:
        model.routers = None
    mean = {c: sum(o for k, o in omega.items() if KIND_CLASS[k] == c) / sum(KIND_CLASS[k] == c for k in omega)
            for c in (SENSITIVE, ROBUST)}
    assert mean[ROBUST] - mean[SENSITIVE] > 0.12, (mean, omega)
    assert all(omega[k] > mean[SENSITIVE] for k in HELDOUT_KINDS if KIND_CLASS[k] == ROBUST), omega
