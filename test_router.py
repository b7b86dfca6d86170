"""Tests of router.py (arXiv 2601.17367; docs/design.md) on the CPU: `pytest test_router.py`."""

import math

import pytest
import torch

from router import (FA, SK, SSA, XA, AttentionRouter, ElasticConfig, Routers, SparsityConstraint, boundary_pool,
                    route, router_input, sparsity_ratio, tail_pool, tau_schedule, warm_start_routers)


def mlp_params(d, mult=4):
    # Task MLP Linear(d,4d) Linear(4d,d); Router MLP Linear(d,4d) Linear(4d,d) Linear(d,2): weights + biases
    h = mult * d
    task = (d * h + h) + (h * d + d)
    router = (d * h + h) + (h * d + d) + (d * 2 + 2)
    return task + router


# --- the router network ---------------------------------------------------


def test_parameter_count():
    assert sum(p.numel() for p in AttentionRouter(128).parameters()) == 263_682  # the paper: "0.27M" per layer
    assert mlp_params(128) == 263_682
    assert sum(p.numel() for p in AttentionRouter(64).parameters()) == mlp_params(64) == 66_306
    # with a tail (ours) the Task MLP's first layer reads 2D: 4D^2 weights more
    assert sum(p.numel() for p in AttentionRouter(64, tail=16).parameters()) == 66_306 + 4 * 64 ** 2


def test_router_shapes_and_dtype():
    torch.manual_seed(0)
    router = AttentionRouter(64)
    k = torch.randn(3, 50, 2, 64, dtype=torch.bfloat16)                   # [B, T, G, D]
    logits = router(k, torch.tensor([50, 7, 1]))
    assert logits.shape == (3, 2, 2) and logits.dtype == torch.float32
    # Each KV head is routed from its own pooled vector: permuting heads permutes the logits.
    perm = router(k.flip(2), torch.tensor([50, 7, 1]))
    torch.testing.assert_close(perm, logits.flip(1))


def test_router_ignores_padding_and_answer():
    torch.manual_seed(0)
    router = AttentionRouter(32, boundary=8)
    k = torch.randn(2, 40, 3, 32)
    lens = torch.tensor([25, 11])
    poisoned = k.clone()
    poisoned[0, 25:] = float("nan")
    poisoned[1, 11:] = float("inf")
    torch.testing.assert_close(router(poisoned, lens), router(k, lens))


def test_input_standardisation():
    """The router standardises its pooled input per dimension with buffers (not parameters: the count above holds)."""
    torch.manual_seed(0)
    router = AttentionRouter(16, boundary=4)
    k = torch.randn(3, 20, 2, 16)
    lens = torch.tensor([20, 9, 3])
    x = boundary_pool(k, lens, 4)                                         # [B, G, D]
    identity = router(k, lens)
    torch.testing.assert_close(identity, router.router_mlp(router.task_mlp(x)))  # identity until calibrated
    seen = 5 * torch.randn(40, 16) + torch.arange(16.0)                   # 40 pooled vectors
    router.set_input_stats(seen.sum(0), (seen ** 2).sum(0), 40)
    torch.testing.assert_close(router.in_mean, seen.mean(0))
    torch.testing.assert_close(router.in_std, (seen.var(0) + 1e-6).sqrt())
    want = router.router_mlp(router.task_mlp((x - seen.mean(0)) / seen.std(0)))
    torch.testing.assert_close(router(k, lens), want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(router(k, lens), identity)
    assert {name for name, _ in router.named_buffers()} == {"in_mean", "in_std"}
    assert {"in_mean", "in_std"} <= set(router.state_dict())            # saved with the router
    with pytest.raises(ValueError, match="at least 2 pooled vectors"):
        router.set_input_stats(seen[0], seen[0] ** 2, 1)


# --- boundary pooling -----------------------------------------------------


def pool_one(k, length, n):
    # Explicit definition: mean over the concatenation of the first and last min(n, len) prompt tokens.
    m = min(n, length)
    ends = torch.cat([k[:m], k[length - m:length]])                       # [2m, G, D]
    return ends.double().mean(0)


@pytest.mark.parametrize("n", [100, 5])
def test_boundary_pool_against_per_sample_definition(n):
    torch.manual_seed(1)
    lens = [1, 2, 37, 99, 100, 101, 150, 199, 200, 201, 260]
    k = torch.randn(len(lens), 260, 2, 16)
    out = boundary_pool(k, torch.tensor(lens), n=n)
    assert out.shape == (len(lens), 2, 16) and out.dtype == torch.float32
    for b, length in enumerate(lens):
        expected = pool_one(k[b], length, n).float()
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-6, msg=f"len {length}")
        # The same sample alone, cut to its prompt, pools the same way.
        torch.testing.assert_close(boundary_pool(k[b:b + 1, :length], None, n=n)[0], expected,
                                   rtol=1e-5, atol=1e-6)


def test_boundary_pool_short_prompt_cases():
    torch.manual_seed(2)
    k = torch.randn(1, 150, 1, 8)
    # A prompt of <= n tokens pools to its plain mean (both ends are the whole prompt).
    torch.testing.assert_close(boundary_pool(k, torch.tensor([60]))[0], k[0, :60].mean(0))
    # 150 tokens with n=100: tokens 50..99 lie in both ends and count twice.
    w = torch.ones(150)
    w[50:100] = 2
    expected = (w[:, None, None] * k[0]).sum(0) / w.sum()
    torch.testing.assert_close(boundary_pool(k, torch.tensor([150]))[0], expected)
    # bf16 keys pool in fp32.
    assert boundary_pool(k.bfloat16(), None).dtype == torch.float32


@pytest.mark.parametrize("n", [16, 3])
def test_tail_pool_against_per_sample_definition(n):
    torch.manual_seed(4)
    lens = [1, 2, 3, 15, 16, 17, 40]
    k = torch.randn(len(lens), 40, 2, 8)
    out = tail_pool(k, torch.tensor(lens), n=n)
    assert out.shape == (len(lens), 2, 8) and out.dtype == torch.float32
    for b, length in enumerate(lens):  # the mean of the last min(n, len) prompt tokens
        expected = k[b, max(0, length - n):length].double().mean(0).float()
        torch.testing.assert_close(out[b], expected, rtol=1e-5, atol=1e-6, msg=f"len {length}")
    poisoned = k.clone()
    poisoned[0, 1:] = float("nan")  # past sample 0's prompt of 1 token: never read
    torch.testing.assert_close(tail_pool(poisoned, torch.tensor(lens), n=n), out)


def test_router_input_with_and_without_tail():
    torch.manual_seed(5)
    k = torch.randn(2, 30, 3, 8)
    lens = torch.tensor([30, 12])
    torch.testing.assert_close(router_input(k, lens, 10), boundary_pool(k, lens, 10))   # tail 0: the paper's input
    both = router_input(k, lens, 10, tail=4)
    assert both.shape == (2, 3, 16)
    torch.testing.assert_close(both[..., :8], boundary_pool(k, lens, 10))
    torch.testing.assert_close(both[..., 8:], tail_pool(k, lens, 4))
    router = AttentionRouter(8, boundary=10, tail=4)
    assert router.in_mean.shape == (16,)
    torch.testing.assert_close(router(k, lens), router.router_mlp(router.task_mlp(both)))
    # swapping tokens 20 and 29 keeps the boundary mean (both in the last 10) and moves the tail mean (26..29)
    other = k.clone()
    other[0, [20, 29]] = k[0, [29, 20]]
    torch.testing.assert_close(boundary_pool(other, lens, 10), boundary_pool(k, lens, 10))
    assert not torch.allclose(router(other, lens)[0], router(k, lens)[0])
    with pytest.raises(ValueError, match="tail must be an integer >= 0"):
        ElasticConfig(tail=-1)


# --- routing --------------------------------------------------------------


def test_straight_through_hard_forward_soft_backward():
    torch.manual_seed(3)
    router = AttentionRouter(32)
    k = torch.randn(4, 30, 3, 32)
    logits = router(k, torch.tensor([30, 20, 10, 5]))
    z = route(logits, tau=1.2, generator=torch.Generator().manual_seed(7))
    # Forward values are exactly one-hot.
    assert set(z.detach().unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(z.detach().sum(-1), torch.ones(4, 3))
    # Same noise, soft: the hard choice is the argmax of the soft sample ...
    soft = route(logits, tau=1.2, hard=False, generator=torch.Generator().manual_seed(7))
    assert torch.equal(z.detach().argmax(-1), soft.argmax(-1))
    # ... and the straight-through gradient is exactly the soft sample's gradient.
    w = torch.randn(4, 3)
    (g_hard,) = torch.autograd.grad((z[..., 1] * w).sum(), logits, retain_graph=True)
    (g_soft,) = torch.autograd.grad((soft[..., 1] * w).sum(), logits, retain_graph=True)
    assert g_hard.abs().sum() > 0
    torch.testing.assert_close(g_hard, g_soft)
    # Gradients reach every router parameter.
    (z[..., 1] * w).sum().backward()
    for name, p in router.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_gumbel_samples_follow_the_router_distribution():
    # Gumbel-max: P(argmax(logits + g) = 1) = softmax(logits)[1], whatever tau.
    logits = torch.tensor([0.0, math.log(3.0)]).expand(20_000, 1, 2)
    z = route(logits, tau=1.5, generator=torch.Generator().manual_seed(0))
    assert abs(z[..., 1].mean().item() - 0.75) < 0.015


def test_inference_is_deterministic_argmax():
    logits = torch.randn(5, 4, 2, requires_grad=True)
    z1, z2 = route(logits), route(logits)
    assert torch.equal(z1, z2)
    assert torch.equal(z1, torch.nn.functional.one_hot(logits.argmax(-1), 2).float())
    assert not z1.requires_grad


def test_tau_schedule():
    assert tau_schedule(0, 300) == pytest.approx(1.5)
    assert tau_schedule(90, 300) == pytest.approx(1.25)                  # halfway through the cosine
    assert tau_schedule(180, 300) == pytest.approx(1.0)
    assert tau_schedule(299, 300) == pytest.approx(1.0)
    taus = [tau_schedule(s, 300) for s in range(300)]
    assert all(a >= b for a, b in zip(taus, taus[1:]))


def test_sparsity_ratio():
    z0 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])   # [B=2, G=2, 2]
    z1 = torch.tensor([[[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]]])
    torch.testing.assert_close(sparsity_ratio([z0, z1]), torch.tensor([0.75, 0.5]))


# --- the Lagrangian (paper Eq. 8) -----------------------------------------


def lambda_steps(constraint, omega, task_class, steps=5):
    opt = torch.optim.AdamW(constraint.parameters(), lr=1e-2, weight_decay=0.0, maximize=True)
    for _ in range(steps):
        opt.zero_grad()
        constraint(omega, task_class).backward()
        opt.step()


def test_lambdas_rise_with_the_violation():
    torch.manual_seed(4)
    c = SparsityConstraint(targets=(0.7, 1.0))
    assert (c.lambda1 >= 0).all() and (c.lambda1 < 0.5).all() and (c.lambda2 >= 0).all() and (c.lambda2 < 0.5).all()
    l1, l2 = c.lambda1.detach().clone(), c.lambda2.detach().clone()
    # Sensitive sample too sparse (0.9 > 0.7), robust sample too dense (0.6 < 1.0).
    lambda_steps(c, torch.tensor([0.9, 0.6]), torch.tensor([0, 1]))
    assert c.lambda1[0] > l1[0]         # too sparse: lambda1 grows, its price on Omega pushes Omega down
    assert c.lambda1[1] < l1[1]         # too dense: lambda1 falls (goes negative), pushing Omega up
    assert (c.lambda2 > l2).all()       # the quadratic multiplier grows with any violation
    # A met target leaves lambda1 where it is.
    l1 = c.lambda1.detach().clone()
    lambda_steps(c, torch.tensor([0.7]), torch.tensor([0]))
    torch.testing.assert_close(c.lambda1.detach(), l1)


def test_abs_linear_lambda_grows_both_ways():
    torch.manual_seed(5)
    c = SparsityConstraint(abs_linear=True)
    l1 = c.lambda1.detach().clone()
    lambda_steps(c, torch.tensor([0.9, 0.6]), torch.tensor([0, 1]))
    assert (c.lambda1 > l1).all()


@pytest.mark.parametrize("task_class,start_bias,target", [(0, 3.0, 0.7), (1, -1.0, 1.0)])
def test_router_step_lowers_the_violation(task_class, start_bias, target):
    torch.manual_seed(6)
    router = AttentionRouter(16, boundary=4)
    with torch.no_grad():                                                # start far from the target
        router.router_mlp[-1].bias.copy_(torch.tensor([0.0, start_bias]))
    c = SparsityConstraint(abs_linear=(task_class == 1))
    k, lens, cls = torch.randn(8, 12, 4, 16), torch.full((8,), 12), torch.full((8,), task_class)
    opt = torch.optim.AdamW(router.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    violations = []
    for _ in range(10):
        with torch.no_grad():
            violations.append(abs(router(k, lens).softmax(-1)[..., 1].mean().item() - target))
        opt.zero_grad()
        omega = sparsity_ratio([route(router(k, lens), tau=1.0, generator=gen)])
        c(omega, cls).backward()
        opt.step()
    # Each router step (fixed lambdas, hard Omega forward, soft gradient) moves P(sparse) toward the target.
    assert all(a > b for a, b in zip(violations, violations[1:])), violations
    assert violations[-1] < violations[0] - 0.02, violations


# --- config and errors ----------------------------------------------------


def test_warm_start_teaches_the_task_class():
    # pooled keys whose task class shows along one direction of each layer (under a large common part, as in
    # SmolLM2): after the warm start the routers route sensitive prompts' heads full and robust ones' sparse, on
    # prompts they did not fit, and their logits stay small (the margin penalty)
    torch.manual_seed(0)
    L, N, G, D = 3, 64, 2, 16
    routers = Routers(L, D, ElasticConfig(tail=0))  # the paper's input: [.., D]
    direction = torch.randn(L, 1, 1, D)

    def prompts(n):
        y = torch.randint(0, 2, (n,))
        return 15 + torch.randn(L, n, G, D) + 1.5 * (2 * y.view(1, n, 1, 1) - 1) * direction, y
    keys, y = prompts(N)
    for r, x in zip(routers, keys):  # the input standardisation, as calibrate_routers sets it
        r.set_input_stats(x.double().flatten(0, 1).sum(0), x.double().flatten(0, 1).square().sum(0), N * G)
    test_keys, test_y = prompts(256)

    def accuracy():
        with torch.no_grad():
            z = torch.stack([r(x[:, None]).argmax(-1) for r, x in zip(routers, test_keys)])   # [L, n, G]
        return (z == test_y.view(1, -1, 1)).float().mean().item(), \
            torch.stack([r(x[:, None]) for r, x in zip(routers, test_keys)]).abs().max().item()
    before, _ = accuracy()
    fit = warm_start_routers(routers, keys, y, steps=100, lr=3e-3, margin_penalty=1e-2)
    after, largest = accuracy()
    assert before < 0.75 and fit > 0.95 and after > 0.9, (before, fit, after)
    assert largest < 20, largest


def test_config_modes_and_roundtrip(tmp_path):
    assert ElasticConfig().mode_ids == (FA, SSA)
    assert ElasticConfig(mode_pair="FA-XA").mode_ids == (FA, XA)
    assert ElasticConfig(mode_pair="XA-SSA").mode_ids == (XA, SSA)
    z = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert ElasticConfig(mode_pair="FA-XA").head_modes(z).tolist() == [[FA, XA]]
    cfg = ElasticConfig(mode_pair="XA-SSA", sink=64, window=512)
    cfg.save(tmp_path / "elastic.json")
    assert ElasticConfig.load(tmp_path / "elastic.json") == cfg
    (tmp_path / "old.json").write_text('{"mode_pair": "FA-SSA", "sink": 64}')  # saved before `tail` existed
    assert ElasticConfig.load(tmp_path / "old.json").tail == 0                # the paper's input, as trained
    (tmp_path / "bad.json").write_text('{"sinks": 3}')
    with pytest.raises(ValueError, match="sinks"):
        ElasticConfig.load(tmp_path / "bad.json")


def test_kernel_mode_numbers_agree():
    kernel = pytest.importorskip("kernel")
    assert (kernel.FA, kernel.SSA, kernel.XA) == (FA, SSA, XA)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode_pair="SSA-FA"), "FA-SSA, FA-XA, XA-SSA"),
    (dict(sink=-1), "sink"),
    (dict(window=0), "window"),
    (dict(xa_stride=24), "xa_stride"),
    (dict(xa_threshold=1.5), "xa_threshold"),
    (dict(boundary=0), "boundary"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ElasticConfig(**kwargs)


def test_errors():
    k = torch.randn(2, 10, 1, 8)
    with pytest.raises(ValueError, match="prompt_lens"):
        boundary_pool(k, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="prompt_lens"):
        boundary_pool(k, torch.tensor([11, 5]))
    with pytest.raises(ValueError, match="prompt_lens"):
        boundary_pool(k, torch.tensor([5]))
    with pytest.raises(ValueError, match="D=16"):
        AttentionRouter(16)(k)
    with pytest.raises(ValueError, match="tau"):
        route(torch.zeros(1, 1, 2), tau=0.0)
    with pytest.raises(ValueError, match="tau"):
        route(torch.zeros(1, 1, 2), hard=False)
    with pytest.raises(ValueError, match="task_class"):
        SparsityConstraint()(torch.tensor([0.5]), torch.tensor([2]))


# --- SK (FA-SK): the scorer the routers carry, its config -----------------


def test_sk_config():
    from router import SK, MODE_IDS, MODE_PAIRS
    kernel = pytest.importorskip("kernel")
    assert MODE_IDS["SK"] == SK == kernel.SK == 3 and "FA-SK" in MODE_PAIRS
    cfg = ElasticConfig(mode_pair="FA-SK", window=256, sk_k=64)
    assert cfg.mode_ids == (FA, SK) and cfg.uses_sk and not ElasticConfig().uses_sk
    assert ElasticConfig(window=100).sk_k == 256  # FA-SSA: any window, sk_k unused
    with pytest.raises(ValueError, match=r"^sk_k=0 but SK selects at least one key per query; pass sk_k >= 1$"):
        ElasticConfig(mode_pair="FA-SK", sk_k=0)
    with pytest.raises(ValueError, match="FA-SK needs a window that is a multiple of 128.*window=100"):
        ElasticConfig(mode_pair="FA-SK", window=100)
    cfg.check_context(8192)  # 8192 - 256 - 128 candidates in the last block: plenty
    ElasticConfig(sk_k=10 ** 6).check_context(512)  # not an SK pair: nothing to check
    with pytest.raises(ValueError, match=r"sk_k=200 is larger than the 128 keys SK can select from in a context of "
                                         r"512 tokens \(outside sink=128 and window=256\)"):
        ElasticConfig(mode_pair="FA-SK", sink=128, window=256, sk_k=200).check_context(512)


def test_sk_scorers_save_load_and_shape_refusal(tmp_path):
    from types import SimpleNamespace
    from safetensors.torch import load_file, save_file
    from router import Routers
    config = SimpleNamespace(model_type="llama", num_hidden_layers=2, num_key_value_heads=2, head_dim=16,
                             hidden_size=64)
    routers = Routers(2, 16, ElasticConfig(mode_pair="FA-SK", window=128, sk_k=8))
    assert all(r.scorer is not None and torch.equal(r.scorer.weight, torch.zeros(16)) for r in routers)
    assert Routers(2, 16).__getitem__(0).scorer is None  # FA-SSA routers carry no scorer
    with torch.no_grad():
        for r in routers:
            r.scorer.weight.normal_()
    routers.save(tmp_path / "r", config)
    again = Routers.load(tmp_path / "r", config)
    assert again.elastic == routers.elastic
    for name, t in routers.state_dict().items():
        assert torch.equal(t, again.state_dict()[name]), name
    state = load_file(tmp_path / "r" / "routers.safetensors")
    save_file({**state, "0.scorer.weight": torch.zeros(8)}, tmp_path / "r" / "routers.safetensors")
    with pytest.raises(ValueError, match=r"0.scorer.weight has shape \[8\] there vs \[16\] here"):
        Routers.load(tmp_path / "r", config)
    save_file({k: v for k, v in state.items() if "scorer" not in k}, tmp_path / "r" / "routers.safetensors")
    with pytest.raises(ValueError, match=r"lacks 0.scorer.weight, 1.scorer.weight \(FA-SK routers need them\)"):
        Routers.load(tmp_path / "r", config)


DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]  # the kernel on the CPU: Triton's interpreter (conftest)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim, tail", [(16, 0), (16, 4), (24, 3)])
def test_router_kernel_equals_the_reference(device, head_dim, tail):
    """router_kernel.router_logits (one launch: pooling, standardisation, both MLPs) against AttentionRouter's PyTorch
    forward, fp32: prompts longer and shorter than both pooled ends, padding after the prompt, keys with strides of a
    fused projection, a head dim that is not a power of two; trained-looking weights and input statistics."""
    from router_kernel import router_logits
    torch.manual_seed(head_dim + tail)
    B, T, G, boundary = 3, 23, 2, 5
    router = AttentionRouter(head_dim, boundary=boundary, tail=tail).to(device)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 0.3)
        router.in_mean.normal_(0, 1)
        router.in_std.uniform_(0.5, 2)
    qkv = torch.randn(B, T, 3 * G, head_dim, device=device) * 2
    k = qkv[:, :, G:2 * G]  # a strided view, as the fused projection gives
    for lens in (None, torch.tensor([23, 7, 1])):
        want = router.classify(router_input(k, lens, boundary, tail))
        got = router_logits(router, k, None if lens is None else lens.to(device))
        assert got.shape == (B, G, 2) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        with torch.no_grad():  # the forward of inference (on the GPU it is the kernel's)
            torch.testing.assert_close(router(k, lens), want, rtol=1e-4, atol=1e-4)
