"""
hf.py against this repo's own path: a transformers model after enable_elastic_attention, through plain
model.generate on one left-padded batch, gives each prompt the greedy tokens, routing and KV-cache bytes that
generate.py gives on model.Transformer with the same routers; disable_elastic_attention restores the model; the
errors. SmolLM2 with the shipped routers and tiny random Llama / Qwen2 / Qwen3 models, CPU, fp32; the GPU check at the
end runs only where CUDA is.

    pytest test_hf.py
    pytest test_hf.py -k gpu -s       # on a GPU machine: the same check there, fp32 and bf16
"""
import inspect

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          Qwen2Config, Qwen3Config)

import data
import hf
from cli import routers_dir
from generate import generate
from model import Transformer
from router import ElasticConfig, Routers, calibrate_routers

NEW = 8  # new tokens per prompt
# how a forward takes a cache: `cache` from transformers 5.25 on (`past_key_values` still works there, with a warning)
CACHE_ARGUMENT = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
# built-in kinds and sample lengths: prompts of about 310, 450 and 610 tokens (XA's reference is O(T^2) on the CPU)
PROMPTS = (("passkey", 330), ("multi_key", 480), ("continuation", 640))


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Chat prompts of three lengths around and past SSA's sink + window of the shipped routers (64 + 256)."""
    return chat_prompts(tokenizer, PROMPTS)


def chat_prompts(tokenizer, kinds_and_lengths):
    samples = [data.SyntheticMix(tokenizer, n, n, seed=i, kinds=(kind,))[0]
               for i, (kind, n) in enumerate(kinds_and_lengths)]
    return [s.input_ids[:s.prompt_len] for s in samples]


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2_ours(smollm2_dir):
    return Transformer.from_pretrained(smollm2_dir, device="cpu", dtype=torch.float32)


def repo_generate(model, routers, prompts, new, eos=None):
    """generate.py's greedy tokens of each prompt (up to its EOS) and its stats (routing, KV bytes)."""
    model.routers, model.elastic = routers, routers.elastic
    stats = []
    steps = list(generate(model, prompts, new, eos_token_id=eos, stats=stats))
    model.routers = None
    return [[s[b] for s in steps if s[b] is not None] for b in range(len(prompts))], stats


def hf_generate(model, prompts, new, pad_id=0, **kwargs):
    """Plain model.generate, greedy, on the prompts left-padded into one batch -> (new tokens per prompt, generate's
    output, which holds the cache)."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    device = model.device
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=new,
                         do_sample=False, pad_token_id=pad_id, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, T:].tolist(), out


def assert_same_as_repo(hf_model, ours, routers, prompts, new):
    """Both paths on the same prompts: every prompt's tokens (up to its EOS), head modes and KV bytes are equal.
    -> the stats."""
    eos = hf_model.generation_config.eos_token_id
    want, stats = repo_generate(ours, routers, prompts, new, eos)
    hf.enable_elastic_attention(hf_model, routers, max_new_tokens=new)
    try:
        got, out = hf_generate(hf_model, prompts, new, eos_token_id=eos)
    finally:
        hf.disable_elastic_attention(hf_model)
    modes = hf.head_modes(out)
    for b, p in enumerate(prompts):
        assert got[b][:len(want[b])] == want[b], f"prompt {b} ({len(p)} tokens): {got[b]} vs {want[b]}"
        assert torch.equal(modes[b], stats[b]["routing"].modes[0]), f"prompt {b}: head modes"
        assert hf.kv_bytes(out, b) == stats[b]["kv_bytes"], f"prompt {b}: KV bytes"
    return stats


@pytest.mark.parametrize("name", ["fa-ssa", "fa-xa"])
def test_generate_equals_repo_path_smollm2(name, smollm2_hf, smollm2_ours, prompts):
    """The shipped routers on SmolLM2: plain model.generate equals generate.py; and both modes ran on every prompt
    (fa-ssa's streaming heads holding less than a dense cache), so that the equality says something."""
    routers = Routers.load(routers_dir(name), smollm2_ours.config)
    stats = assert_same_as_repo(smollm2_hf, smollm2_ours, routers, prompts, NEW)
    for st in stats:
        print(f"{name}: Omega {st['routing'].omega.item():.3f}, KV {st['kv_bytes']} of {st['kv_bytes_dense']} bytes")
        assert 0 < st["routing"].omega.item() < 1
        if name == "fa-ssa":
            assert st["kv_bytes"] < st["kv_bytes_dense"]


TINY = dict(vocab_size=311, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024)


def tiny_pair(tmp_path, kind):
    """A tiny random transformers model, saved, and this repo's Transformer on the same weights."""
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[kind](**TINY)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(tmp_path / kind)
    hf_model = AutoModelForCausalLM.from_pretrained(tmp_path / kind, dtype=torch.float32).eval()
    return hf_model, Transformer.from_pretrained(tmp_path / kind, device="cpu", dtype=torch.float32)


def random_routers(model, elastic):
    """Untrained routers that send some heads one way, some the other: their input standardised on a few random
    prompts (router.calibrate_routers; a tiny random model's keys differ little), random weights and SK scorers."""
    torch.manual_seed(1)
    model.routers = Routers(model.config.num_hidden_layers, model.config.head_dim, elastic)
    with torch.no_grad():
        for p in model.routers.parameters():
            p.normal_()
    calibrate_routers(model, [(torch.randint(1, model.config.vocab_size, (8, 200)), torch.full((8,), 200))])
    routers, model.routers = model.routers, None
    return routers.requires_grad_(False)


@pytest.mark.parametrize("kind, pair", [("qwen2", "FA-XA"), ("qwen3", "FA-SSA"), ("qwen3", "FA-SK"),
                                        ("llama", "XA-SSA")])
def test_generate_equals_repo_path_tiny(kind, pair, tmp_path):
    """Qwen2 (q/k/v biases) and Qwen3 (the router reads k_norm's output), every mode pair, with SSA rings that wrap
    while decoding, XA over several 128-blocks and SK's selection moving with new blocks (window 128, 16 keys)."""
    hf_model, ours = tiny_pair(tmp_path, kind)
    window = 128 if pair == "FA-SK" else 16
    routers = random_routers(ours, ElasticConfig(mode_pair=pair, sink=4, window=window, sk_k=16))
    prompts = [torch.randint(1, TINY["vocab_size"], (n,)) for n in (23, 240, 400)]
    stats = assert_same_as_repo(hf_model, ours, routers, prompts, 24)
    modes = torch.stack([st["routing"].modes[0] for st in stats])
    assert len(modes.unique()) == 2, f"both modes of {pair} should run: {modes.unique().tolist()}"


def test_forward_with_left_or_right_padding_equals_repo_forward(tmp_path):
    """A plain forward (no generate) of rows padded on either side: each row's logits at its own tokens equal those of
    this repo's forward of the right-padded rows (Transformer.forward(lengths=...)), and a mask with a hole is an
    error."""
    hf_model, ours = tiny_pair(tmp_path, "qwen3")
    routers = random_routers(ours, ElasticConfig(mode_pair="FA-XA", sink=4, window=16))
    lengths = [300, 140, 1]
    rows = [torch.randint(1, TINY["vocab_size"], (n,)) for n in lengths]
    T = max(lengths)
    ours.routers, ours.elastic = routers, routers.elastic
    with torch.no_grad():
        want = ours(torch.nn.utils.rnn.pad_sequence(rows, batch_first=True), lengths=lengths)
    hf.enable_elastic_attention(hf_model, routers)
    try:
        for side in ("left", "right"):
            ids, mask = torch.zeros(len(rows), T, dtype=torch.long), torch.zeros(len(rows), T, dtype=torch.long)
            for b, r in enumerate(rows):
                at = slice(T - len(r), T) if side == "left" else slice(0, len(r))
                ids[b, at], mask[b, at] = r, 1
            with torch.no_grad():
                got = hf_model(input_ids=ids, attention_mask=mask).logits
            for b, r in enumerate(rows):
                at = slice(T - len(r), T) if side == "left" else slice(0, len(r))
                torch.testing.assert_close(got[b, at], want[b, :len(r)], rtol=1e-5, atol=1e-5)
        mask[0, 5] = 0
        with pytest.raises(ValueError, match="row 0 of the attention mask has 299 tokens between positions 0 and 299"):
            hf_model(input_ids=ids, attention_mask=mask)
    finally:
        hf.disable_elastic_attention(hf_model)


def test_disable_restores_the_model(smollm2_hf, tokenizer, prompts):
    """After disable the model holds no hook and no attribute of ours, its attention implementation is the one from
    before, its weights and config are untouched, and its logits are the ones from before, bit for bit. (A forward
    with right padding.)"""
    model = smollm2_hf
    long, short = prompts[1], prompts[0][:40]  # right padding by hand: some transformers' GGUF tokenizer has no pad
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)  # masked anyway
    idx = {"input_ids": torch.stack([long, F.pad(short, (0, len(long) - len(short)), value=pad)]),
           "attention_mask": torch.stack([torch.ones_like(long), (torch.arange(len(long)) < len(short)).long()])}
    with torch.no_grad():
        dense = model(**idx).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config, attributes = model.config.to_json_string(), set(vars(model))
    implementation = model.config._attn_implementation

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    before = hooks()
    hf.enable_elastic_attention(model, "fa-ssa", max_new_tokens=4)
    assert model.config._attn_implementation == hf.NAME and hooks() == before + 2 * model.config.num_hidden_layers
    with torch.no_grad():  # elastic: streaming heads dropped tokens of the long row, its logits moved
        assert (model(**idx).logits[0] - dense[0]).abs().max() > 1e-3 * dense.abs().max()
    hf.disable_elastic_attention(model)
    assert model.config._attn_implementation == implementation and hooks() == before
    assert set(vars(model)) == attributes and model.config.to_json_string() == config
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**idx).logits, dense)


def test_errors(smollm2_hf, tmp_path, monkeypatch):
    """Each user error is one ValueError that names the bad value and the fix."""
    model = smollm2_hf
    tiny, tiny_ours = tiny_pair(tmp_path, "llama")
    with pytest.raises(ValueError, match="trained for another model: num_hidden_layers 30 there vs 2 here"):
        hf.enable_elastic_attention(tiny, "fa-ssa")
    wrong = random_routers(tiny_ours, ElasticConfig())  # 2 layers of head dim 16
    with pytest.raises(ValueError, match="the routers have 2 layers of head dim 16, the model 30 of head dim 64"):
        hf.enable_elastic_attention(model, wrong)
    with pytest.raises(ValueError, match="'no-such-routers': no routers.safetensors there; .* fa-ssa"):
        hf.enable_elastic_attention(model, "no-such-routers")
    mistral = AutoModelForCausalLM.from_config(MistralConfig(**TINY))
    with pytest.raises(ValueError, match="model_type 'mistral' is not supported; .* llama, qwen2, qwen3"):
        hf.enable_elastic_attention(mistral, wrong)
    sliding = AutoModelForCausalLM.from_config(Qwen2Config(**TINY, use_sliding_window=True, sliding_window=64))
    with pytest.raises(ValueError, match="sliding-window layers"):
        hf.enable_elastic_attention(sliding, wrong)
    with pytest.raises(ValueError, match="max_new_tokens=0: pass the most tokens"):
        hf.enable_elastic_attention(model, "fa-ssa", max_new_tokens=0)
    with monkeypatch.context() as patch:  # a transformers without the mask-function registry
        patch.delattr(transformers.masking_utils, "AttentionMaskInterface")
        with pytest.raises(ValueError, match=r"transformers \S+ lacks transformers.masking_utils.AttentionMaskInt"):
            hf.enable_elastic_attention(model, "fa-ssa")
    with pytest.raises(ValueError, match="not enabled on this model"):
        hf.disable_elastic_attention(model)

    hf.enable_elastic_attention(model, "fa-ssa", max_new_tokens=3)
    try:
        with pytest.raises(ValueError, match="enabled on this model already"):
            hf.enable_elastic_attention(model, "fa-xa")
        prompt = [torch.arange(5, 40)]
        with pytest.raises(ValueError, match="room for 3 new tokens per prompt and this generation wants more"):
            hf_generate(model, prompt, 5)
        with pytest.raises(ValueError, match="beam search"):
            hf_generate(model, prompt, 3, num_beams=2)
        _, out = hf_generate(model, prompt, 2)
        cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers 5.25 on / before
        with pytest.raises(ValueError, match="a forward of 3 tokens on a cache that holds a prompt already"):
            model(torch.arange(5, 8)[None], **{CACHE_ARGUMENT: cache})
    finally:
        hf.disable_elastic_attention(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_generate_against_repo_path(smollm2_dir, tokenizer):
    """The same check on the GPU, where prefill runs the fused Triton kernel and decode the decode kernel in both paths.
    fp32: tokens, head modes and KV bytes equal, as on the CPU. bf16: both paths run the same kernels on the same
    weights, but the batch is laid out otherwise (left padding against generate.py's right padding), so a GEMM may round
    a row differently and a near-tie may flip a router's argmax or a greedy token. So bf16 asserts what must hold: the
    head modes agree on all but a few heads, the KV bytes of every prompt whose modes agree are equal, and the first
    token is the same; it prints how many tokens agree before the first that differs."""
    prompts = chat_prompts(tokenizer, (("passkey", 700), ("multi_key", 1500), ("continuation", 3000)))
    for dtype in (torch.float32, torch.bfloat16):
        ours = Transformer.from_pretrained(smollm2_dir, device="cuda", dtype=dtype)
        hf_model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=dtype).cuda().eval()
        for name in ("fa-ssa", "fa-xa"):
            routers = Routers.load(routers_dir(name), ours.config).cuda()
            if dtype == torch.float32:
                assert_same_as_repo(hf_model, ours, routers, prompts, 32)
                continue
            want, stats = repo_generate(ours, routers, prompts, 32)
            hf.enable_elastic_attention(hf_model, routers, max_new_tokens=32)
            got, out = hf_generate(hf_model, prompts, 32)
            hf.disable_elastic_attention(hf_model)
            modes = hf.head_modes(out)
            for b, st in enumerate(stats):
                agree = (modes[b] == st["routing"].modes[0]).float().mean().item()
                same = next((i for i, (x, y) in enumerate(zip(got[b], want[b])) if x != y), len(want[b]))
                print(f"bf16 {name} prompt {b}: modes agree {agree:.3f}, tokens agree {same} of {len(want[b])}")
                assert agree >= 0.97 and got[b][0] == want[b][0]
                if agree == 1:
                    assert hf.kv_bytes(out, b) == st["kv_bytes"]
