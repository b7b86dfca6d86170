"""
The elastic model (model.py with routers, attention.py): routing at prefill, the training mix of both branches, and
the per-head KV cache whose decode must equal a full recomputation under the same modes. CPU, fp32.

    pytest test_elastic.py
"""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attention import KVCache
from generate import generate
from kernel import FA, SK, SSA, XA
from model import Transformer
from router import ElasticConfig, Routers, calibrate_routers


def load(path, elastic):
    model = Transformer.from_pretrained(path, device="cpu", dtype=torch.float32)
    model.elastic = elastic
    return model


def with_routers(model):
    """Fresh (untrained) routers for the model's ElasticConfig."""
    model.routers = Routers(model.config.num_hidden_layers, model.config.head_dim, model.elastic)
    return model


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_decode_equals_recompute(which, tiny_dir, smollm2_dir):
    """Decode step by step with the cache (SSA heads in a ring buffer that evicts) and compare every step's
    logits with a full recomputation of the whole sequence under the same modes."""
    model = load(tiny_dir if which == "tiny" else smollm2_dir, ElasticConfig(sink=4, window=16))
    L, G, V = model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.vocab_size
    # a mix of modes, with every mode present; XA heads decode densely, and on fewer than 128 tokens their
    # prefill is dense too (one block), so the recomputation is comparable
    modes = torch.zeros(1, L, G, dtype=torch.int32)
    modes[0] = (torch.arange(G) + torch.arange(L)[:, None]) % 3  # FA, SSA and XA all present
    T0, steps = 40, 60  # prompt 40, then 60 tokens: the 16-token window turns over several times
    tokens = torch.randint(0, V, (1, T0 + steps))  # fresh every run
    caches = [KVCache(steps, 4, 16) for _ in range(L)]  # room for the prompt and `steps` more
    decoded = [model(tokens[:, :T0], modes=modes, caches=caches)[:, -1]]
    for p in range(T0, T0 + steps - 1):
        decoded.append(model(tokens[:, p:p + 1], pos=p, caches=caches)[:, -1])
    decoded = torch.cat(decoded)  # [steps, V]: logits for positions T0-1 .. T0+steps-2
    full = model(tokens[:, :T0 + steps - 1], modes=modes)[0, T0 - 1:]
    err, scale = (decoded - full).abs().max().item(), full.abs().max().item()
    print(f"{which}: decode vs recompute max |logit diff| {err:.2e}, scale {scale:.2e}")
    assert err < 1e-4 * scale, f"decode vs recompute: {err:.3e} (scale {scale:.3e})"
    # and SSA really evicts: a dense recomputation differs
    dense = model(tokens[:, :T0 + steps - 1])[0, T0 - 1:]
    assert (dense - full).abs().max() > 1e-3 * scale


def mixed_modes(model):
    """[1, L, G] with FA, SSA and XA all present."""
    L, G = model.config.num_hidden_layers, model.config.num_key_value_heads
    return ((torch.arange(G) + torch.arange(L)[:, None]) % 3).int()[None]


def assert_decode_equals_recompute(model, modes, lengths, steps, again_at=None):
    """Prompts of the given lengths prefilled alone and decoded together for `steps` tokens (each row at its own
    position): every row's logits at every step equal a full recomputation of that row alone under `modes`. At
    step again_at (row 1 there) a step runs twice, as CUDA-graph warm-up does, and must change nothing.
    -> (the sequences, the caches, the last row's recomputed logits)."""
    from generate import decode_one_token, prefill
    V = model.config.vocab_size
    seqs = [torch.randint(0, V, (T + steps,)) for T in lengths]
    logits, caches, _ = prefill(model, [s[:T] for s, T in zip(seqs, lengths)], steps, modes)
    decoded = [logits]
    pos = torch.tensor(lengths, dtype=torch.int32)
    for i in range(steps - 1):
        token = torch.stack([s[T + i] for s, T in zip(seqs, lengths)])
        decoded.append(decode_one_token(model, token, pos + i, caches))
        if i == again_at:
            assert torch.equal(decode_one_token(model, token, pos + i, caches), decoded[-1])
    decoded = torch.stack(decoded, 1)  # [B, steps, V]
    for b, (s, T) in enumerate(zip(seqs, lengths)):
        full = model(s[None, :T + steps - 1], modes=modes)[0, T - 1:]
        err, scale = (decoded[b] - full).abs().max().item(), full.abs().max().item()
        assert err < 1e-4 * scale, f"row {b} (prompt {T}): decode vs recompute {err:.3e} (scale {scale:.3e})"
    return seqs, caches, full


def test_batched_decode_equals_recompute(tiny_dir):
    """Several prompts of different lengths, prefilled alone and decoded together (each row at its own position):
    every row's logits at every step equal a full recomputation of that row alone under the same modes."""
    model = load(tiny_dir, ElasticConfig(sink=4, window=16))
    assert_decode_equals_recompute(model, mixed_modes(model), [23, 40, 9], 30)


def test_batched_generation_equals_generating_alone(smollm2_dir, tiny_dir):
    """A prompt's greedy tokens in a batch are those of generating it alone: fixed mixed modes on SmolLM2 (with a
    ring that wraps), and per-prompt routing with routers on the tiny model (each prompt routed from its own keys)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["The capital of France is", "Water boils at a temperature of one hundred degrees Celsius at sea level, "
             "and it freezes at", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"]
    prompts = [tok(t, return_tensors="pt").input_ids[0] for t in texts]
    model = load(smollm2_dir, ElasticConfig(sink=4, window=16))
    modes = mixed_modes(model)
    together = list(generate(model, prompts, 12, modes=modes))
    for b, p in enumerate(prompts):
        alone = [t for (t,) in generate(model, [p], 12, modes=modes)]
        assert [step[b] for step in together] == alone, f"prompt {b}"
    model = with_routers(load(tiny_dir, ElasticConfig(sink=4, window=8)))
    prompts = [torch.randint(0, 1000, (T,)) for T in (30, 17, 52)]
    stats = []
    together = list(generate(model, prompts, 10, stats=stats))
    for b, p in enumerate(prompts):
        alone_stats = []
        alone = [t for (t,) in generate(model, [p], 10, stats=alone_stats)]
        assert [step[b] for step in together] == alone, f"prompt {b}"
        assert torch.equal(stats[b]["routing"].modes, alone_stats[0]["routing"].modes)
        assert stats[b]["kv_bytes"] == alone_stats[0]["kv_bytes"]


def assert_batched_prefill_equals_alone(model, prompts, modes=None, new=5):
    """generate.prefill of prompts of several lengths in one right-padded batch: each row's last logits, routing
    and cache segments equal those of prefilling the prompt alone."""
    from generate import batches, prefill
    assert batches([len(p) for p in prompts]) == [(0, len(prompts))]  # one forward, padded
    logits, caches, routings = prefill(model, prompts, new, modes)
    for b, p in enumerate(prompts):
        alone, caches1, routing1 = prefill(model, [p], new, modes)
        scale = alone.abs().max()
        assert (logits[b] - alone[0]).abs().max() < 1e-4 * scale, f"row {b} (prompt {len(p)})"
        if routing1[0] is not None:
            assert torch.equal(routings[b].modes, routing1[0].modes)
        for c, c1 in zip(caches, caches1):
            assert c.nbytes(b) == c1.nbytes(0)
            segs = [(at, len(group) * (cap + extra)) for r, group, at, cap, extra in c.groups if r == b]
            segs1 = [(at, len(group) * (cap + extra)) for _, group, at, cap, extra in c1.groups]
            for (at, n), (at1, n1) in zip(segs, segs1):
                assert n == n1
                for x, x1 in ((c.k, c1.k), (c.v, c1.v), (c.sk.u, c1.sk.u), (c.sk.logp, c1.sk.logp)):
                    torch.testing.assert_close(x[at:at + n], x1[at1:at1 + n1], rtol=1e-4, atol=1e-4)


def test_batched_prefill_equals_prefilling_alone(tiny_dir):
    """Prompts of several lengths prefill in one right-padded forward, each row as if alone: XA heads over several
    128-blocks (the estimate of a block pools its queries: the padded ones must not count; rows 260 and 300 end
    inside a block that the longest row fills), SSA rings that wrap; and routed by fresh routers."""
    model = load(tiny_dir, ElasticConfig(sink=4, window=16))
    V = model.config.vocab_size
    prompts = [torch.randint(0, V, (T,)) for T in (390, 260, 300, 7)]
    modes = torch.full_like(mixed_modes(model), XA)
    modes[0, ::2] = mixed_modes(model)[0, ::2]
    assert_batched_prefill_equals_alone(model, prompts, modes)
    assert_batched_prefill_equals_alone(with_routers(model), prompts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_equals_eager(tiny_weights_dir):
    """On the GPU a decode step is replayed from a CUDA graph, compiled or not: the same tokens as eager steps, several
    prompts. fp32, so that the fusions of torch.compile round like the eager ops."""
    model = Transformer.from_pretrained(tiny_weights_dir, device="cuda", dtype=torch.float32)
    model.elastic = ElasticConfig(sink=4, window=16)
    prompts = [torch.randint(0, 1000, (T,)) for T in (300, 41, 77)]
    modes = mixed_modes(model).cuda()
    eager = list(generate(model, prompts, 40, modes=modes, cuda_graph=False))
    assert list(generate(model, prompts, 40, modes=modes, cuda_graph=True)) == eager
    assert list(generate(model, prompts, 40, modes=modes, cuda_graph=True, compile=True)) == eager


def test_generate_errors(tiny_dir):
    model = load(tiny_dir, ElasticConfig())
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        list(generate(model, [torch.tensor([1, 2]), torch.tensor([], dtype=torch.long)], 4))
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1, got 0"):
        list(generate(model, [torch.tensor([1, 2])], 0))
    with pytest.raises(ValueError, match="prompt 0 has 8190 tokens: with 5 new ones that exceeds the model's context "
                                         "of 8192"):
        list(generate(model, [torch.zeros(8190, dtype=torch.long)], 5))


def test_forward_checks_fixed_modes_and_lengths_once(tiny_dir):
    """Fixed modes and right-padded lengths are checked at the forward's start (the kernels' own per-layer check is
    off): a bad mode, SK without the routers' scorers, a mode table of another shape, lengths out of range."""
    model = load(tiny_dir, ElasticConfig())
    L, G = model.config.num_hidden_layers, model.config.num_key_value_heads
    idx = torch.randint(0, 1000, (2, 20))
    for modes, message in ((torch.full((1, L, G), 7), r"FA=0, SSA=1, XA=2 or SK=3; got \[7\]"),
                           (torch.full((1, L, G), SK), "SK heads, which need their layer's scorer"),
                           (torch.zeros(1, L + 1, G, dtype=torch.int32), f"\\[B or 1, L={L}, G={G}\\]")):
        with pytest.raises(ValueError, match=message):
            model(idx, modes=modes)
    for lengths in ([20], [0, 20], [20, 21]):
        with pytest.raises(ValueError, match="lengths must give each of the B=2 rows"):
            model(idx, lengths=lengths)
    # the check also tells the layers whether a head runs XA (without, the prefill kernel packs a GQA group's heads)
    modes = torch.full((1, L, G), SSA)
    assert model._forward_spec(idx, None, None, None, modes, None, None).has_xa is False
    modes[0, L - 1, 0] = XA
    assert model._forward_spec(idx, None, None, None, modes, None, None).has_xa is True


def test_decode_work_lists_only_the_chunks_each_segment_fills(monkeypatch):
    """The decode kernel's programs (KVCache.work): every chunk of `split` slots that a segment can fill, for a long
    FA segment, SSA rings and an SK segment, and none past a short ring; KVCache.cat plans the chunks of the rows it
    joins anew, over all their segments. decode_split: chunks of one length, about as many as asked for."""
    import attention
    from decode_kernel import decode_split
    # the shortest multiple of 64 whose chunks fit the programs (64 slots: 16 + 1 chunks), whole rounds of programs
    # when the segments outnumber them
    assert decode_split([1000, 24], 16) == 128 and decode_split([4096] * 8, 64) == 512
    assert decode_split([100] * 20, 8) == 128
    monkeypatch.setattr(attention, "decode_split", lambda sizes, programs: 16)

    def chunks(cache):
        items = cache.work.tolist()
        assert len(set(items)) == len(items)
        got = {}
        for item in items:
            got.setdefault(item // cache.n_splits, []).append(item % cache.n_splits)
        return got

    D, new = 8, 6
    caches = []
    for T, modes in ((100, [[FA, SSA, SK]]), (30, [[SSA, FA, SSA]])):
        cache = KVCache(new, sink=4, window=16, sk_k=8)
        k, v = torch.randn(2, 1, 3, T, D)
        cache.prefill(k, v, torch.tensor(modes), sk_scores=torch.randn(1, 3, T))
        sizes = (cache.cap + cache.selected).tolist()
        assert sizes == cache.sizes
        assert chunks(cache) == {i: list(range(-(-size // 16))) for i, size in enumerate(sizes)}
        caches.append(cache)
    assert caches[0].n_splits == 7 and chunks(caches[0])[1] == [0, 1]  # the FA segment's 106 slots; a ring of 20
    both = KVCache.cat(caches)
    assert both.n_splits == 7 and both.sizes == caches[0].sizes + caches[1].sizes
    expected = {**chunks(caches[0]), **{3 + i: c for i, c in chunks(caches[1]).items()}}
    assert chunks(both) == expected


def test_ssa_cache_is_constant(tiny_dir):
    model = load(tiny_dir, ElasticConfig(sink=8, window=32))
    L, G, D = model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.head_dim
    modes = torch.full((1, L, G), SSA, dtype=torch.int32)
    modes[:, :, 0] = FA  # one full head per layer
    for T in (100, 400):
        stats = []
        list(generate(model, torch.randint(0, 1000, (1, T)), 3, modes=modes, stats=stats))
        stats = stats[0]  # one prompt
        per_layer = 2 * 4 * D * ((T + 3) * 1 + (8 + 32) * (G - 1))  # k and v, fp32: full head + ring heads
        assert stats["kv_bytes"] == L * per_layer
        assert stats["kv_bytes_dense"] == L * 2 * 4 * D * (T + 3) * G


def test_training_mix_equals_routed_forward(tiny_dir):
    """With hard straight-through z, the mixed output of both branches equals running the sampled modes."""
    model = with_routers(load(tiny_dir, ElasticConfig(sink=4, window=24)))
    idx = torch.randint(0, 1000, (2, 150))
    prompt_lens = torch.tensor([120, 150])
    logits, routing = model(idx, prompt_lens=prompt_lens, tau=1.0, return_routing=True)
    assert routing.z.requires_grad and routing.omega.requires_grad
    assert torch.equal(routing.modes, torch.where(routing.z[..., 1] > 0.5, SSA, FA).int())
    with torch.no_grad():
        routed = model(idx, modes=routing.modes)  # [B, L, G]
    assert (logits - routed).abs().max() < 1e-4 * routed.abs().max()
    logits.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.routers.parameters())


def test_inference_routing_and_omega(tiny_dir):
    model = with_routers(load(tiny_dir, ElasticConfig(mode_pair="FA-XA")))
    idx = torch.randint(0, 1000, (1, 300))
    _, routing = model(idx, return_routing=True)
    assert routing.z is not None and not routing.z.requires_grad
    assert set(routing.modes.unique().tolist()) <= {FA, XA}
    assert torch.allclose(routing.omega, (routing.modes == XA).float().mean(dim=(1, 2)))
    # Routing.logits are the routers' own outputs, and their argmax is the modes that ran
    assert routing.logits.shape == (1, model.config.num_hidden_layers, model.config.num_key_value_heads, 2)
    k_pre = {}
    for i, block in enumerate(model.model.layers):
        block.self_attn.tap.register_forward_hook(lambda m, inp, out, i=i: k_pre.__setitem__(i, inp[2]))
    model(idx)
    for i, block in enumerate(model.model.layers):
        want = model.routers[i](k_pre[i])  # the keys before RoPE, [1, T, G, D]
        assert torch.allclose(routing.logits[:, i], want)
    assert torch.equal(routing.modes, torch.where(routing.logits[..., 1] > routing.logits[..., 0], XA, FA).int())
    _, again = model(idx, return_routing=True)
    assert torch.equal(again.modes, routing.modes)  # argmax routing: no noise


def test_routers_save_load_and_mismatch(tiny_dir, smollm2_dir, tmp_path):
    model = with_routers(load(tiny_dir, ElasticConfig(sink=8, window=64)))
    calibrate_routers(model, [(torch.randint(0, 1000, (2, 20)), torch.tensor([20, 9]))])  # buffers off the identity
    model.routers.save(tmp_path / "r", model.config)
    again = Routers.load(tmp_path / "r", model.config)
    assert again.elastic == ElasticConfig(sink=8, window=64)
    for a, b in zip(model.routers.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    # routers saved before the input standardisation existed load with the identity, as they were trained
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "r" / "routers.safetensors")
    save_file({k: v for k, v in state.items() if ".in_" not in k}, tmp_path / "r" / "routers.safetensors")
    old = Routers.load(tmp_path / "r", model.config)
    for router in old:
        assert torch.equal(router.in_mean, torch.zeros_like(router.in_mean))
        assert torch.equal(router.in_std, torch.ones_like(router.in_std))
    other = Transformer.from_pretrained(smollm2_dir, device="cpu")
    with pytest.raises(ValueError, match="trained for another model: num_hidden_layers 2 there vs 30 here"):
        Routers.load(tmp_path / "r", other.config)
    with pytest.raises(FileNotFoundError, match="no routers.safetensors"):
        Routers.load(tmp_path, other.config)


# -----------------------------------------------------------------------------
# sample.py with elastic attention, as a user runs it


def run_sample(*args):
    r = subprocess.run([sys.executable, "sample.py", *map(str, args)], cwd=Path(__file__).parent,
                       capture_output=True, text=True, timeout=300)
    return r


def test_sample_py_with_routers_writes_stats(tiny_dir, tmp_path):
    model = with_routers(load(tiny_dir, ElasticConfig(sink=8, window=16)))
    model.routers.save(tmp_path / "r", model.config)
    r = run_sample("--model", tiny_dir, "--routers", tmp_path / "r", "--prompt", "prompts/sky.txt",
                   "--max-new-tokens", 30, "--stats-json", tmp_path / "stats.json")
    assert r.returncode == 0, r.stderr
    stats = json.loads((tmp_path / "stats.json").read_text())[0]  # one entry per prompt
    assert stats["source"] == "routers" and stats["sink"] == 8 and stats["window"] == 16
    assert len(stats["modes"]) == 2 and all(len(row) == 2 and set(row) <= set("FS") for row in stats["modes"])
    sparse = sum(row.count("S") for row in stats["modes"]) / 4
    assert abs(stats["omega"] - sparse) < 1e-6
    assert f"Omega {stats['omega']:.3f}" in r.stderr and "KV cache:" in r.stderr
    assert stats["kv_bytes"] <= stats["kv_bytes_dense"]


def test_sample_py_static_hybrid_and_all_modes(tiny_dir, tmp_path):
    for flags, omega in ((["--sparse-ratio", "0.5"], 0.5), (["--modes", "all-ssa"], 1.0), (["--modes", "all-fa"], 0.0)):
        r = run_sample("--model", tiny_dir, "--prompt", "prompts/sky.txt", "--max-new-tokens", 5,
                       "--stats-json", tmp_path / "s.json", *flags)
        assert r.returncode == 0, r.stderr
        assert json.loads((tmp_path / "s.json").read_text())[0]["omega"] == omega, flags


def test_sample_py_rejects_routers_of_another_model(tiny_dir, tmp_path):
    model = with_routers(load(tiny_dir, ElasticConfig()))
    model.routers.save(tmp_path / "r", model.config)
    r = run_sample("--routers", tmp_path / "r", "--prompt", "prompts/sky.txt")  # the default model: 30 layers
    assert r.returncode != 0
    assert "trained for another model: num_hidden_layers 2 there vs 30 here" in r.stderr, r.stderr
    r = run_sample("--modes", "all-xb", "--prompt", "prompts/sky.txt")
    assert r.returncode != 0 and "invalid choice: 'all-xb'" in r.stderr


@pytest.mark.parametrize("tail", [0, 4])
def test_calibrate_routers_standardises_the_dense_pooled_keys(tiny_dir, tail):
    """calibrate_routers sets each router's in_mean / in_std from the dense model's pooled pre-RoPE keys (the
    boundary mean, and with a tail the tail mean beside it). Checked against keys rebuilt from HuggingFace's hidden
    states (the input of every layer)."""
    from transformers import LlamaForCausalLM
    from router import router_input
    model = with_routers(load(tiny_dir, ElasticConfig(tail=tail)))
    G, D = model.config.num_key_value_heads, model.config.head_dim
    batches = [(torch.randint(0, 1000, (2, 30)), torch.tensor([30, 12])),
               (torch.randint(0, 1000, (3, 21)), torch.tensor([5, 21, 17]))]
    assert calibrate_routers(model, batches) == 5 * G                      # 5 samples x G KV heads per layer
    hf = LlamaForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for i, block in enumerate(hf.model.layers):
            pooled = []
            for idx, lens in batches:
                h = hf(idx, output_hidden_states=True).hidden_states[i]   # the input of layer i
                k = block.self_attn.k_proj(block.input_layernorm(h)).view(*idx.shape, G, D)
                pooled.append(router_input(k, lens, 100, tail).flatten(0, 1))
            pooled = torch.cat(pooled)                                     # [5 * G, D or 2D]
            router = model.routers[i]
            torch.testing.assert_close(router.in_mean, pooled.mean(0), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(router.in_std, (pooled.var(0) + 1e-6).sqrt(), rtol=1e-4, atol=1e-5)
    assert all(not block.self_attn.tap._forward_pre_hooks for block in model.model.layers)  # the probes are removed


def test_router_logits_keep_their_gradient_under_checkpointing(tiny_dir):
    """train.py's margin penalty differentiates Routing.logits: in training they carry the router gradient, the
    same with gradient checkpointing (the block recomputed in backward) as without."""
    model = load(tiny_dir, ElasticConfig(sink=4, window=8))
    torch.manual_seed(0)
    with_routers(model)
    idx = torch.randint(0, 1000, (2, 40))
    grads = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.routers.zero_grad()
        torch.manual_seed(1)  # the same Gumbel noise
        _, routing = model(idx, tau=1.0, return_routing=True)
        (routing.logits[..., 1] - routing.logits[..., 0]).pow(2).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.routers.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0])
    with torch.no_grad():  # inference: detached
        assert not model(idx, return_routing=True)[1].logits.requires_grad


# -----------------------------------------------------------------------------
# SK heads (FA-SK): decode against recomputation, the cache's bound, training


def sk_model(tiny_dir, sk_k=4):
    """The tiny model with FA-SK routers whose scorers are random (a fresh scorer scores every key 0)."""
    model = with_routers(load(tiny_dir, ElasticConfig(mode_pair="FA-SK", sink=4, window=128, sk_k=sk_k)))
    with torch.no_grad():
        for router in model.routers:
            router.scorer.weight.normal_()
    return model


def test_sk_decode_equals_recompute(tiny_dir):
    """Two prompts prefilled alone and decoded together, SK beside FA heads: every step's logits equal a full
    recomputation under the SK rule (the reference), across block boundaries where new candidates arrive and
    selected keys are evicted (row 0's first step is a block's first query, row 1 crosses 384). Each SK head holds
    sink + window + sk_k keys."""
    model = sk_model(tiny_dir)
    D = model.config.head_dim
    modes = torch.tensor([[[SK, FA], [SK, SK]]], dtype=torch.int32)
    lengths, steps = [256, 379], 12
    seqs, caches, full = assert_decode_equals_recompute(model, modes, lengths, steps, again_at=384 - lengths[1])
    scale = full.abs().max().item()
    dense = model(seqs[1][None, :lengths[1] + steps - 1])[0, lengths[1] - 1:]
    assert (dense - full).abs().max() > 1e-3 * scale  # SK really drops keys
    # the cache: FA heads hold every position, SK heads sink + window + sk_k
    per_row = [2 * 4 * D * ((T + steps) + 3 * (4 + 128 + 4)) for T in lengths]  # k and v, fp32, both layers
    assert sum(c.nbytes() for c in caches) == sum(per_row)


def test_sk_short_prompt_keeps_no_more_than_its_candidates(tiny_dir):
    """A prompt too short for any key to become an SK candidate before the last step: its SK heads hold one
    selected slot, not sk_k (the cache no larger than dense), and it generates what a cache of sk_k slots would."""
    model = sk_model(tiny_dir, sk_k=64)
    L, G = model.config.num_hidden_layers, model.config.num_key_value_heads
    modes = torch.full((1, L, G), SK, dtype=torch.int32)
    prompt = torch.randint(0, 1000, (40,))
    stats = []
    short = list(generate(model, [prompt], 20, modes=modes, stats=stats))
    assert stats[0]["kv_bytes"] <= stats[0]["kv_bytes_dense"] + 2 * L * G * model.config.head_dim * 4
    caches = [KVCache(20, 4, 128, 64) for _ in range(L)]  # the full sk_k slots
    logits = model(prompt[None], modes=modes, caches=caches, last_only=True)[:, -1]
    tokens, pos = [logits.argmax(-1)], torch.tensor([40], dtype=torch.int32)
    for i in range(19):
        tokens.append(model(tokens[-1][:, None], pos + i, caches=caches)[:, -1].argmax(-1))
    assert [t for (t,) in short] == [int(t) for t in tokens]


def test_sk_training_mix_trains_the_scorer(tiny_dir):
    """FA-SK training: the Gumbel mix with SK as the sparse branch equals the routed forward, and the routers and
    the scorers get gradients (the scorer's through log p)."""
    model = sk_model(tiny_dir)
    with torch.no_grad():
        for router in model.routers:  # every head sparse, so that every layer's scorer is used
            router.router_mlp[-1].bias.copy_(torch.tensor([-20.0, 20.0]))
    idx = torch.randint(0, 1000, (2, 300))
    logits, routing = model(idx, tau=1.0, return_routing=True)
    assert set(routing.modes.unique().tolist()) == {SK}
    with torch.no_grad():
        routed = model(idx, modes=routing.modes)
    assert (logits - routed).abs().max() < 1e-4 * routed.abs().max()
    logits.float().square().mean().backward()
    for router in model.routers:
        assert router.scorer.weight.grad is not None and router.scorer.weight.grad.abs().sum() > 0
        assert router.router_mlp[0].weight.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_sk_decode(tiny_weights_dir):
    """On the GPU: SK heads prefill through the fused kernel (its SK mode), decode through the decode kernel with the
    selected slots and SKCache.update inside a CUDA graph; the graph's tokens equal eager steps', and the step-by-step
    logits match a full recomputation (loosely: fp32 runs in tf32 on the GPU)."""
    from generate import decode_one_token, prefill
    model = Transformer.from_pretrained(tiny_weights_dir, device="cuda", dtype=torch.float32)
    model.elastic = ElasticConfig(mode_pair="FA-SK", sink=4, window=128, sk_k=16)
    with_routers(model).cuda()
    with torch.no_grad():
        for router in model.routers:
            router.scorer.weight.normal_()
    modes = torch.tensor([[[SK, FA], [SK, SK]]], dtype=torch.int32, device="cuda")
    prompts = [torch.randint(0, 1000, (T,)) for T in (300, 41, 250)]
    eager = list(generate(model, prompts, 150, modes=modes, cuda_graph=False))
    assert list(generate(model, prompts, 150, modes=modes, cuda_graph=True)) == eager
    T, steps = 250, 150
    seq = torch.randint(0, 1000, (T + steps,), device="cuda")
    logits, caches, _ = prefill(model, [seq[:T]], steps, modes)
    decoded = [logits]
    for i in range(steps - 1):
        decoded.append(decode_one_token(model, seq[T + i][None], torch.tensor([T + i], device="cuda"), caches))
    decoded = torch.cat(decoded)
    full = model(seq[None, :T + steps - 1], modes=modes)[0, T - 1:]
    assert (decoded - full).abs().max() < 1e-2 * full.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pair", ["FA-SSA", "FA-XA", "XA-SSA", "FA-SK"])
def test_gpu_training_mix_gradients_equal_the_reference(pair):
    """The training path on the GPU (SDPA and FlexAttention branches, attention.mixed_attention) against the PyTorch
    reference of both branches, fp32, GQA 8:2, an odd length: the output and the gradients that reach the router
    (through z), the queries, keys and values, and for SK the scorer's scores."""
    import torch.nn.functional as F

    import kernel
    import xattn

    from attention import mixed_attention
    torch.manual_seed(len(pair))
    B, H, G, T, D = 2, 8, 2, 389, 64
    ec = ElasticConfig(mode_pair=pair, sink=4, window=128, sk_k=32, xa_threshold=0.6)
    q, k, v = (torch.randn(B, n, T, D, device="cuda", requires_grad=True) for n in (H, G, G))
    u = torch.randn(B, G, T, device="cuda", requires_grad=True)
    logits = torch.tensor([[[1.0, -0.5], [-0.3, 0.8]], [[0.2, 0.9], [0.7, -0.4]]], device="cuda",
                          requires_grad=True)  # each branch taken by some head, so both backwards are checked

    def z():  # straight-through, as route() gives in training (one-hot forward, soft backward); a graph per path,
        soft = logits.softmax(-1)  # since the compiled Flex backward frees its buffers (no retain_graph)
        return F.one_hot(soft.argmax(-1), 2).to(soft.dtype) + soft - soft.detach()

    scores = u if ec.uses_sk else None
    o = mixed_attention(q, k, v, z(), ec, scores)
    w = z().repeat_interleave(H // G, dim=1)[..., None, None]
    # XA: the block selection the training path made (a block on the threshold's edge must not flip between the two)
    xa = xattn.xattn_block_mask(q.detach(), k.detach(), stride=ec.xa_stride, threshold=ec.xa_threshold)
    ref = sum(w[:, :, c] * kernel.reference_attention(
        q, k, v, torch.full((B, G), mode, device="cuda"), sink=ec.sink, window=ec.window, xa_blocks=xa,
        sk_scores=scores, sk_k=ec.sk_k) for c, mode in enumerate(ec.mode_ids))
    go = torch.randn_like(o)
    inputs = (logits, q, k, v) + ((u,) if ec.uses_sk else ())
    grads, ref_grads = torch.autograd.grad(o, inputs, go), torch.autograd.grad(ref, inputs, go)
    assert (o - ref).abs().max() < 1e-3 * ref.abs().max()
    for name, a, b in zip(["router logits", "q", "k", "v", "scores"], grads, ref_grads):
        assert (a - b).abs().max() < 2e-3 * b.abs().max(), name


def test_a_backward_through_the_fused_kernel_is_an_error():
    """attention.ForwardOnly, which wraps the fused prefill kernel on the GPU where autograd is on: the forward is the
    kernel's output (a forward without no_grad works), a backward that reaches it raises instead of losing the
    gradient of attention without a word."""
    from attention import ForwardOnly
    q, k, v = (torch.randn(1, 2, 5, 4, requires_grad=True) for _ in range(3))
    y = ForwardOnly.apply(q, k, v, None, lambda q, k, v: q + k * v)
    assert y.requires_grad and torch.equal(y, (q + k * v).detach())
    with pytest.raises(RuntimeError, match="no backward"):
        y.sum().backward()
    u = torch.randn(1, 2, 5, requires_grad=True)  # only the SK scores ask for a gradient
    y = ForwardOnly.apply(q.detach(), k.detach(), v.detach(), u, lambda q, k, v: q + k * v)
    with pytest.raises(RuntimeError, match="no backward"):
        y.sum().backward()
