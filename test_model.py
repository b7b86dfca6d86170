"""
model.py against its definition, HuggingFace transformers, on the same weights (CPU, fp32).

    pytest test_model.py
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from default_model import default_model_dir
from generate import generate
import model as model_module
from model import ModelConfig, Transformer

HERE = Path(__file__).parent
TINY = dict(vocab_size=311, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
            max_position_embeddings=1024, rms_norm_eps=1e-5)


def tiny_checkpoint(tmp_path, kind):
    """A tiny random HuggingFace model saved as sharded safetensors; norms randomised too, so that they matter."""
    if kind == "llama3":  # llama3 rope scaling, GQA 6:2, untied
        config = LlamaConfig(**TINY, num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                             rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                    high_freq_factor=4.0,
                                                                    original_max_position_embeddings=64))
        cls = LlamaForCausalLM
    elif kind == "qwen3":  # q/k norms, head_dim != hidden/heads, GQA 4:1, tied
        config = Qwen3Config(**TINY, num_attention_heads=4, num_key_value_heads=1, head_dim=32,
                             tie_word_embeddings=True)
        cls = Qwen3ForCausalLM
    elif kind == "qwen2":  # q/k/v biases, GQA 6:3, untied
        config = Qwen2Config(**TINY, num_attention_heads=6, num_key_value_heads=3, tie_word_embeddings=False)
        cls = Qwen2ForCausalLM
    torch.manual_seed(0)
    hf = cls(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    out = tmp_path / kind
    hf.save_pretrained(out, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file(), "expected a sharded checkpoint"
    return out, hf


def max_logit_error(ours, hf, idx):
    with torch.no_grad():
        a, b = ours(idx), hf(idx).logits
    return (a - b).abs().max().item(), b.abs().max().item()


@pytest.mark.parametrize("kind", ["llama3", "qwen3", "qwen2"])
def test_tiny_logits_match_transformers(tmp_path, kind):
    path, hf = tiny_checkpoint(tmp_path, kind)
    model = Transformer.from_pretrained(path, device="cpu", dtype=torch.float32)
    assert model.config.model_type == kind[:5] if kind != "llama3" else model.config.model_type == "llama"
    idx = torch.randint(0, TINY["vocab_size"], (2, 300))  # 300 > 64: llama3 scaling's long wavelengths matter
    err, scale = max_logit_error(model, hf, idx)
    print(f"{kind}: max |logit diff| {err:.3e}, logit scale {scale:.3e}")
    assert err < 1e-4 * scale, f"{kind}: max |logit diff| {err:.3e} vs scale {scale:.3e}"


@pytest.mark.parametrize("kind", ["llama3", "qwen2"])  # qwen2: the q, k, v biases are fused too
def test_fused_matrices_hold_the_checkpoint_exactly(tmp_path, kind):
    """qkv_proj and gate_up_proj are the checkpoint's q/k/v and gate/up stacked by rows: every checkpoint tensor
    is found, bit for bit, where checkpoint_tensors says, and those blocks tile the fused matrices."""
    path, hf = tiny_checkpoint(tmp_path, kind)
    model = Transformer.from_pretrained(path, device="cpu", dtype=torch.float32)
    where = model.checkpoint_tensors()
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight" or not hf.config.tie_word_embeddings}
    assert set(where) == set(state)
    assert all(torch.equal(where[name], t) for name, t in state.items())
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    q, k, v = (hf.model.layers[0].self_attn.get_submodule(n) for n in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(attn.qkv_proj.weight, torch.cat([q.weight, k.weight, v.weight]))
    if kind == "qwen2":
        assert torch.equal(attn.qkv_proj.bias, torch.cat([q.bias, k.bias, v.bias]))
    hf_mlp = hf.model.layers[0].mlp
    assert torch.equal(mlp.gate_up_proj.weight, torch.cat([hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight]))


def test_long_prefill_goes_in_chunks(tmp_path, monkeypatch):
    """Past CHUNK elements a forward that autograd does not record runs the MLP and the norms a chunk of rows at a
    time (a batched 8 x 32K prefill of an 8B model would hold 14 GiB of gate/up, and 4 GiB for each fp32 copy a norm
    makes): the logits are those of the whole calls, and a recorded forward keeps one call for its backward."""
    path, hf = tiny_checkpoint(tmp_path, "llama3")
    model = Transformer.from_pretrained(path, device="cpu", dtype=torch.float32)
    idx = torch.randint(0, TINY["vocab_size"], (2, 37))
    with torch.no_grad():
        whole = model(idx)
    calls = []
    layer = model.model.layers[0]
    monkeypatch.setattr(model_module, "CHUNK", 16 * TINY["hidden_size"])  # 16 rows a call
    for module, name in ((layer.mlp, "mlp"), (layer.input_layernorm, "norm")):
        monkeypatch.setattr(module, name, lambda x, f=getattr(module, name), n=name: calls.append((n, len(x))) or f(x))
    chunks = [(name, n) for name in ("norm", "mlp") for n in (16, 16, 16, 16, 10)]  # 74 rows, the norm first
    with torch.no_grad():
        chunked = model(idx)
    assert sorted(calls, key=lambda c: c[0] == "mlp") == chunks
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    calls.clear()
    model.requires_grad_(False)  # frozen weights, autograd on (bench_model's prefill): nothing recorded, chunks
    torch.testing.assert_close(model(idx), whole, rtol=1e-5, atol=1e-5)
    assert sorted(calls, key=lambda c: c[0] == "mlp") == chunks
    calls.clear()
    model.requires_grad_(True)  # a recorded forward keeps one call on [B, T, hidden]
    model(idx)
    assert calls == [("norm", 2), ("mlp", 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_rms_norm_equals_the_eager_one(dtype):
    """model.rms_norm (one Triton pass, what a GPU prefill runs; here Triton's interpreter) against RMSNorm.norm:
    odd widths and row counts, a strided input (Qwen3's q_norm reads a view of the q/k/v projection), a weight of
    another dtype. On a GPU the same, and RMSNorm's forward takes this path there."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    for C, rows in ((96, 37), (32, 5), (100, 3)):
        norm = model_module.RMSNorm(C, 1e-5)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(C))
        norm = norm.to(dev, dtype)
        x = torch.randn(rows, 3 * C, dtype=dtype, device=dev)[:, C:2 * C]  # strided rows
        torch.testing.assert_close(model_module.rms_norm(x, norm.weight, norm.eps), norm.norm(x),
                                   rtol=1e-5 if dtype == torch.float32 else 1e-3, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(norm(x), norm.norm(x), rtol=1e-5 if dtype == torch.float32 else 1e-3,
                                       atol=1e-5)
    x = torch.randn(2, 7, 64, dtype=torch.float16, device=dev)
    w = torch.randn(64, device=dev)  # an fp32 weight: an fp32 result, as the eager product
    y = model_module.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.float32 and y.shape == x.shape
    ref = w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_rope_and_silu_mul_equal_the_eager_ones(dtype):
    """model.rope and model.silu_mul (one Triton pass each, what a GPU prefill runs; here Triton's interpreter)
    against apply_rope's and MLP's eager arithmetic: q and k as views of one projection (token-major, strided),
    an odd head count, cos and sin for one row or each row; gate and up side by side in one tensor."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-3, atol=1e-3)
    torch.manual_seed(0)
    B, T, H, G, D = 2, 9, 6, 3, 32
    qkv = torch.randn(B, T, (H + 2 * G) * D, dtype=dtype, device=dev)
    q, k = qkv[..., :H * D].view(B, T, H, D), qkv[..., H * D:(H + G) * D].view(B, T, G, D)
    angles = torch.rand(B, T, D // 2, device=dev) * 6
    cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
    rope, apply_rope = model_module.rope, model_module.apply_rope  # apply_rope: the eager arithmetic, the definition
    for x in (q, k):
        torch.testing.assert_close(rope(x, cos, sin), apply_rope(x, cos, sin), **tol)
        torch.testing.assert_close(rope(x, cos[:1], sin[:1]), apply_rope(x, cos[:1], sin[:1]), **tol)
    gate_up = torch.randn(3, 5, 2 * 40, dtype=dtype, device=dev) * 3
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(model_module.silu_mul(gate_up), torch.nn.functional.silu(gate) * up, **tol)


def test_config_reads_both_rope_layouts(tmp_path):
    """transformers 4 wrote rope_theta / rope_scaling at the top level, transformers 5 writes rope_parameters."""
    old = dict(model_type="llama", vocab_size=10, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
               num_attention_heads=4, rope_theta=500000.0,
               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192))
    new = {k: v for k, v in old.items() if k not in ("rope_theta", "rope_scaling")}
    new["rope_parameters"] = dict(old["rope_scaling"], rope_theta=500000.0)
    cfgs = []
    for i, hf in enumerate([old, new]):
        (tmp_path / f"{i}.json").write_text(json.dumps(hf))
        cfgs.append(ModelConfig.from_json(tmp_path / f"{i}.json"))
    assert cfgs[0] == cfgs[1]
    assert cfgs[0].rope_theta == 500000.0 and cfgs[0].rope_scaling["factor"] == 8.0
    assert cfgs[0].head_dim == 16 and cfgs[0].num_key_value_heads == 4  # derived when absent


# -----------------------------------------------------------------------------
# the real default model


@pytest.fixture(scope="module")
def smollm2():
    path = default_model_dir()
    ours = Transformer.from_pretrained(path, device="cpu", dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ours, hf, AutoTokenizer.from_pretrained(path)


def test_smollm2_logits_match_transformers(smollm2):
    path, ours, hf, tok = smollm2
    text = (HERE / "prompts" / "capital.txt").read_text() * 4
    idx = torch.stack([tok(text, return_tensors="pt").input_ids[0, :150]] * 2)
    idx[1] = idx[1].flip(0)  # two different rows in one batch
    err, scale = max_logit_error(ours, hf, idx)
    print(f"SmolLM2: max |logit diff| {err:.3e}, logit scale {scale:.3e}")
    assert err < 1e-4 * scale, f"max |logit diff| {err:.3e} vs scale {scale:.3e}"


def test_smollm2_greedy_generation_matches_transformers(smollm2):
    path, ours, hf, tok = smollm2
    text = (HERE / "prompts" / "sky.txt").read_text()
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True).input_ids
    want = hf.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    got = [t for (t,) in generate(ours, ids, 20, eos_token_id=tok.eos_token_id)]
    print("ours:", repr(tok.decode(got)), "\nhf:  ", repr(tok.decode(want)))
    assert len(want) == 20 and got == want


def test_sample_py_answers(smollm2):
    r = subprocess.run([sys.executable, "sample.py", "--prompt", "prompts/capital.txt", "--max-new-tokens", "16"],
                       cwd=HERE, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout, r.stdout
    assert "prompt tokens:" in r.stderr and "tokens/s" in r.stderr


@pytest.mark.parametrize("prompt, message", [("/no/such/file.txt", "does not exist"), ("EMPTY", "is empty")])
def test_sample_py_prompt_errors(tmp_path, prompt, message):
    if prompt == "EMPTY":
        prompt = tmp_path / "empty.txt"
        prompt.write_text("  \n")
    r = subprocess.run([sys.executable, "sample.py", "--prompt", str(prompt)], cwd=HERE, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and message in r.stderr, r.stderr


def test_sample_py_prompt_longer_than_context(smollm2, tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("word " * 9000)  # SmolLM2's context is 8192 tokens
    r = subprocess.run([sys.executable, "sample.py", "--prompt", str(long)], cwd=HERE, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "context is 8192 tokens" in r.stderr, r.stderr


# -----------------------------------------------------------------------------
# clear errors


def test_missing_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Transformer.from_pretrained(tmp_path / "nowhere")


def test_unsupported_model_type_lists_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported: llama, qwen2, qwen3"):
        Transformer.from_pretrained(tmp_path)


def rewrite_single_file(path, edit):
    """Merges a sharded checkpoint into one model.safetensors, edited by edit(state)."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    state = {}
    for shard in set(index["weight_map"].values()):
        state.update(load_file(path / shard))
        (path / shard).unlink()
    (path / "model.safetensors.index.json").unlink()
    edit(state)
    save_file(state, path / "model.safetensors")


def test_missing_tensor_is_named(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "llama3")
    rewrite_single_file(path, lambda s: s.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        Transformer.from_pretrained(path)


def test_unexpected_tensor_is_named(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "llama3")
    rewrite_single_file(path, lambda s: s.update({"model.layers.9.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.9.extra.weight'\]"):
        Transformer.from_pretrained(path)


def test_wrong_shape_is_named(tmp_path):
    path, _ = tiny_checkpoint(tmp_path, "qwen3")
    rewrite_single_file(path, lambda s: s.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 96)}))
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.k_proj.weight has shape \(64, 96\), "
                                         r"the config implies \(32, 96\)"):
        Transformer.from_pretrained(path)
