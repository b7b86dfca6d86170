"""
The Attention Router of Elastic Attention (arXiv 2601.17367), its training signal and its saved form.

One small router per layer looks at the layer's key states *before RoPE*, pooled over the two ends of
the prompt (and, ours, over its last few tokens: ElasticConfig.tail), and sends each KV head (a GQA group)
either to a retrieval mode (full attention, class 0) or to a sparse mode (streaming sink+window or
XAttention, class 1). The routers are the only thing that trains, together with two Lagrange multipliers
per task class that hold the model sparsity ratio Omega (the fraction of sparse heads) near a per-task
target (paper Eq. 8). docs/design.md writes the whole method down with its numbers.

This file holds, in the order a reader needs them:
    ElasticConfig         how routed heads run (mode pair, SSA sink/window, XA threshold/stride, pooling)
    boundary_pool         mean of the first and last `boundary` prompt tokens, fp32     [B, T, G, D] -> [B, G, D]
    tail_pool             mean of the last `tail` prompt tokens (ours): boundary_pool's last end alone
    router_input          what a router reads: boundary_pool, and with a tail tail_pool beside it
    AttentionRouter       Task MLP -> Router MLP, one per layer, shared by its KV heads [B, T, G, D] -> [B, G, 2]
    Routers               the routers of all layers, saved and loaded with the ElasticConfig they route for
    calibrate_routers     the routers' input standardisation from the dense model (ours)
    warm_start_routers    routers first taught the task class of their input (ours)
    route                 Gumbel-softmax straight-through (training) or argmax (inference) [B, G, 2] -> z
    tau_schedule          the Gumbel temperature over training
    sparsity_ratio        Omega per sample from every layer's z
    SparsityConstraint    the Lagrangian penalty of Eq. 8, lambdas per task class

Convention (used everywhere in the project): class 0 = retrieval (full) mode, class 1 = sparse mode,
so z[..., 1] = 1 means "this KV head runs sparse". Task classes: 0 = sparsity-sensitive, 1 = robust.

attention.py calls a layer's router at prefill and turns its decision into the kernel's mode table;
train.py calls route() through the model with the tau of tau_schedule() and adds SparsityConstraint's
penalty to the cross-entropy. Nothing here runs on its own; `pytest test_router.py` checks it.
"""

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from kernel import FA, KV_BLOCK, SK, SSA, XA
from router_kernel import router_logits
from sparsek import Scorer, candidates

# Attention modes as kernel.py numbers them in its per-(batch, KV head) mode table (docs/design.md: Attention modes).
MODE_IDS = {"FA": FA, "SSA": SSA, "XA": XA, "SK": SK}
# "{retrieval mode}-{sparse mode}": what class 0 and class 1 of the router mean (the paper's FA-SSA, FA-XA, XA-SSA;
# FA-SK is ours: SparseK, arXiv 2406.16747, as the sparse mode).
MODE_PAIRS = ("FA-SSA", "FA-XA", "XA-SSA", "FA-SK")

# -----------------------------------------------------------------------------
# Config


@dataclass
class ElasticConfig:
    """How routed heads run. Saved as elastic.json next to trained routers so sample.py runs them as trained.

    mode_pair:    "{retrieval mode}-{sparse mode}", one of MODE_PAIRS (paper: FA-SSA, FA-XA, XA-SSA).
    sink, window: SSA keeps key j for query i iff j <= i and (j < sink or i - j < window); token-exact.
                  Paper: 128 and 2048 at 8K-64K tokens; size them to the model's context.
    xa_threshold, xa_stride: XAttention's cumulative block-mass threshold and antidiagonal stride.
    boundary:     tokens pooled at each end of the prompt by the router.
    tail:         tokens at the very end of the prompt pooled as a second router input beside the boundary mean
                  (ours; 0: the paper's input alone; elastic.json files without it were saved before it existed
                  and read 0). docs/design.md: The router.
    sk_k:         SK's budget: the selected keys per query beyond the sink and the local span (FA-SK only; an SK
                  head keeps at most sink + window + sk_k keys). FA-SK needs a window that is a multiple of 128.
    """
    mode_pair: str = "FA-SSA"
    sink: int = 128
    window: int = 2048
    xa_threshold: float = 0.9
    xa_stride: int = 16
    boundary: int = 100
    sk_k: int = 256
    tail: int = 16

    def __post_init__(self):
        if self.mode_pair not in MODE_PAIRS:
            raise ValueError(f"unknown mode_pair {self.mode_pair!r}; expected one of {', '.join(MODE_PAIRS)}")
        for name, low in (("sink", 0), ("window", 1), ("xa_stride", 1), ("boundary", 1), ("tail", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if KV_BLOCK % self.xa_stride != 0:  # XA scores 128 x 128 blocks from stride x stride cells
            raise ValueError(f"xa_stride must divide the XA block size {KV_BLOCK}, got {self.xa_stride}")
        if not 0.0 < self.xa_threshold <= 1.0:
            raise ValueError(f"xa_threshold must lie in (0, 1], got {self.xa_threshold!r}")
        if not isinstance(self.sk_k, int) or isinstance(self.sk_k, bool) or self.sk_k < 1:
            raise ValueError(f"sk_k={self.sk_k!r} but SK selects at least one key per query; pass sk_k >= 1")
        if self.uses_sk and self.window % KV_BLOCK:
            raise ValueError(f"{self.mode_pair} needs a window that is a multiple of {KV_BLOCK} (SK selects per "
                             f"{KV_BLOCK}-query block), got window={self.window}; round it to a multiple of {KV_BLOCK}")

    @property
    def uses_sk(self) -> bool:
        """Whether a head can run SK: then each router holds a scorer (sparsek.Scorer)."""
        return "SK" in self.mode_pair.split("-")

    def check_context(self, max_pos: int) -> None:
        """For SK pairs: refuse an sk_k that a context of max_pos tokens can never fill, i.e. more than the candidates
        (keys past the sink and before the local span) of its last 128-query block. Call it with the model's
        max_position_embeddings (or the longest sequence a run will see)."""
        if not self.uses_sk:
            return
        n = candidates((max_pos - 1) // KV_BLOCK, max_pos, sink=self.sink, window=self.window)
        if self.sk_k > n:
            raise ValueError(f"sk_k={self.sk_k} is larger than the {n} keys SK can select from in a context "
                             f"of {max_pos} tokens (outside sink={self.sink} and window={self.window}); lower sk_k "
                             f"or the window")

    @property
    def mode_ids(self) -> tuple[int, int]:
        """Kernel mode ids (FA=0, SSA=1, XA=2) of router class 0 (retrieval) and class 1 (sparse)."""
        retrieval, sparse = self.mode_pair.split("-")
        return MODE_IDS[retrieval], MODE_IDS[sparse]

    def head_modes(self, z: torch.Tensor) -> torch.Tensor:
        """Per-head kernel modes from router decisions z [B, G, 2] -> int32 [B, G], the kernel's mode table."""
        retrieval, sparse = self.mode_ids
        return torch.where(z[..., 1] > 0.5, sparse, retrieval).to(torch.int32)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "ElasticConfig":
        with open(path) as f:
            d = json.load(f)
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(d) - known):
            raise ValueError(f"{path}: unknown ElasticConfig keys {unknown}; expected some of {sorted(known)}")
        return cls(**{"tail": 0, **d})  # saved before the tail input existed: the paper's input alone

# -----------------------------------------------------------------------------
# Router


def boundary_pool(k: torch.Tensor, prompt_lens: torch.Tensor | None = None, n: int = 100) -> torch.Tensor:
    """Boundary pooling of the router input (arXiv 2601.17367: first and last 100 prompt tokens), in fp32.

    k:           key states before RoPE, [B, T, G, D]; samples are left-aligned (right padding).
    prompt_lens: LongTensor [B], the prompt span of each sample (1 <= len <= T); the answer after it is
                 not pooled. None: the whole sequence is prompt. Its range is checked here when it comes on
                 the CPU; on the GPU that would cost a sync per layer, so Transformer.forward checks it once.
    Returns [B, G, D] = (mean of the first m prompt tokens + mean of the last m prompt tokens) / 2, with
    m = min(n, prompt_len). That is the mean over the concatenation of both ends, so when the prompt is
    shorter than 2n the tokens in the overlap count twice, and a prompt of n tokens or fewer pools to
    its plain mean. (The released training code pooled the whole prompt; ours pools the boundaries in
    training and inference alike.)
    """
    prompt_lens = _prompt_lens(k, prompt_lens, n)
    return (_end_mean(k, prompt_lens, n, last=False) + _end_mean(k, prompt_lens, n, last=True)) / 2


def tail_pool(k: torch.Tensor, prompt_lens: torch.Tensor | None = None, n: int = 16) -> torch.Tensor:
    """Ours: the mean of the last m = min(n, prompt_len) prompt tokens' keys, fp32, [B, T, G, D] -> [B, G, D].
    Arguments as boundary_pool. These tokens (the question when it comes last, the chat template's assistant
    header) sit where the model starts its answer and have attended to the whole prompt."""
    return _end_mean(k, _prompt_lens(k, prompt_lens, n), n, last=True)


def router_input(k: torch.Tensor, prompt_lens: torch.Tensor | None = None, boundary: int = 100,
                 tail: int = 0) -> torch.Tensor:
    """What a router reads: boundary_pool [B, G, D], and with tail > 0 tail_pool beside it -> [B, G, 2D], fp32."""
    pooled = boundary_pool(k, prompt_lens, boundary)
    return torch.cat([pooled, tail_pool(k, prompt_lens, tail)], -1) if tail else pooled


def _prompt_lens(k: torch.Tensor, prompt_lens: torch.Tensor | None, n: int) -> torch.Tensor:
    """prompt_lens [B] on k's device (None: every sample is all prompt), checked; n (tokens pooled) >= 1."""
    B, T = k.shape[:2]
    if prompt_lens is None:
        prompt_lens = torch.full((B,), T, dtype=torch.long, device=k.device)
    prompt_lens = torch.as_tensor(prompt_lens, dtype=torch.long)
    if prompt_lens.shape != (B,):
        raise ValueError(f"prompt_lens must have shape [B]=[{B}], got {list(prompt_lens.shape)}")
    if prompt_lens.device.type == "cpu":
        check_prompt_lens(prompt_lens, T)
    if n < 1:
        raise ValueError(f"n (tokens pooled) must be >= 1, got {n}")
    return prompt_lens.to(k.device)


def _end_mean(k: torch.Tensor, prompt_lens: torch.Tensor, n: int, last: bool) -> torch.Tensor:
    """The mean of the first (last=False) or last m = min(n, prompt_len) prompt tokens, fp32: [B, T, G, D] ->
    [B, G, D]. Positions beyond the m get weight 0 and are clamped into the prompt, so padding (whatever it holds)
    is never read."""
    pos = torch.arange(n, device=k.device)                                            # [n]
    m = prompt_lens.clamp(max=n)                                                      # [B]
    idx = ((prompt_lens[:, None] - 1 - pos).clamp(min=0) if last                      # [B, n] len-1 down to len-m
           else torch.minimum(pos, prompt_lens[:, None] - 1))                         # [B, n] 0 up to m-1
    weight = (pos < m[:, None]).float() / m[:, None].float()                          # [B, n] sums to 1
    picked = k[torch.arange(k.shape[0], device=k.device)[:, None], idx].float()      # [B, n, G, D]
    return torch.einsum("bn,bngd->bgd", weight, picked)


def check_prompt_lens(prompt_lens: torch.Tensor, T: int) -> None:
    if bool(((prompt_lens < 1) | (prompt_lens > T)).any()):
        raise ValueError(f"prompt_lens must lie in [1, T={T}], got {prompt_lens.tolist()}")


class AttentionRouter(nn.Module):
    """The per-layer Attention Router of arXiv 2601.17367: boundary pooling, Task MLP, Router MLP.

    Task MLP:   Linear(D, 4D) -> SiLU -> Linear(4D, D)                         (8D^2 + 5D parameters)
    Router MLP: Linear(D, 4D) -> SiLU -> Linear(4D, D) -> SiLU -> Linear(D, 2) (8D^2 + 7D + 2)
    Both act on each KV head's pooled vector on its own (no head embedding), so one router serves all KV
    heads of its layer. 16D^2 + 12D + 2 parameters: 263,682 for D = 128 (paper: "0.27M"), 66,306 for 64.
    With tail > 0 (ours) the input is [boundary mean, tail mean], 2D wide, and the Task MLP's first layer
    Linear(2D, 4D): 4D^2 parameters more. Before the Task MLP the input is standardised per dimension
    (in_mean, in_std; ours, see __init__).
    forward(k [B, T, G, D], prompt_lens [B]) -> logits [B, G, 2] in fp32; class 0 retrieval, 1 sparse.
    With sk=True (an SK mode pair) it also holds `scorer`, the layer's sparsek.Scorer.
    """

    def __init__(self, head_dim: int, hidden_mult: int = 4, boundary: int = 100, tail: int = 0, sk: bool = False):
        super().__init__()
        d, h = head_dim, hidden_mult * head_dim
        d_in = 2 * d if tail else d
        self.head_dim, self.boundary, self.tail = head_dim, boundary, tail
        # Input standardisation (ours, not in the paper): buffers, not parameters, set once before training by
        # calibrate_routers and saved with the router. The pooled keys of every prompt share a large
        # common part (norm ~15 in SmolLM2) beside which the task's imprint is small (~0.5); per dimension the
        # imprint is up to one standard deviation. Standardised, the router reads it early, before its
        # per-head decisions saturate (docs/training.md). Identity until calibrated.
        self.register_buffer("in_mean", torch.zeros(d_in))
        self.register_buffer("in_std", torch.ones(d_in))
        self.task_mlp = nn.Sequential(nn.Linear(d_in, h), nn.SiLU(), nn.Linear(h, d))
        self.router_mlp = nn.Sequential(nn.Linear(d, h), nn.SiLU(), nn.Linear(h, d), nn.SiLU(), nn.Linear(d, 2))
        # SK pairs: the layer's scoring network (sparsek.Scorer, D parameters), trained and saved with the router
        self.scorer = Scorer(d) if sk else None

    def forward(self, k: torch.Tensor, prompt_lens: torch.Tensor | None = None) -> torch.Tensor:
        if k.ndim != 4 or k.shape[-1] != self.head_dim:
            raise ValueError(f"expected pre-RoPE keys [B, T, G, D={self.head_dim}], got {list(k.shape)}")
        wants_grad = torch.is_grad_enabled() and (k.requires_grad or any(p.requires_grad for p in self.parameters()))
        if k.is_cuda and not wants_grad:
            # inference on the GPU: the same computation in one launch (router_kernel.py, tested against this one)
            return router_logits(self, k, _prompt_lens(k, prompt_lens, self.boundary))
        return self.classify(router_input(k, prompt_lens, self.boundary, self.tail))  # [B, G, D or 2D] -> [B, G, 2]

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """The logits [..., 2] (fp32) of the pooled input [..., D or 2D]: standardised, Task MLP, Router MLP."""
        x = ((pooled - self.in_mean) / self.in_std).to(self.router_mlp[0].weight.dtype)
        return self.router_mlp(self.task_mlp(x)).float()

    @torch.no_grad()
    def set_input_stats(self, pooled_sum: torch.Tensor, pooled_sq_sum: torch.Tensor, count: float) -> None:
        """Standardise the pooled input with the mean and std over `count` pooled vectors [D] (their sum and sum of
        squares; pass them in fp64, since the variance is their difference). Across samples *and* KV heads, so the
        heads stay apart: their means differ and the router tells them apart by that."""
        if count < 2:
            raise ValueError(f"need at least 2 pooled vectors to standardise the router input, got {count}")
        mean = pooled_sum / count
        var = (pooled_sq_sum / count - mean ** 2).clamp(min=0) * count / (count - 1)
        self.in_mean.copy_(mean)
        self.in_std.copy_((var + 1e-6).sqrt())


class Routers(nn.ModuleList):
    """The AttentionRouter of every layer, and the ElasticConfig they route for (`elastic`). A model holds them
    as `Transformer.routers`; saved as a dir: routers.safetensors (layer-indexed names, fp32), elastic.json, and
    routers.json (the shape of the model they fit, plus whatever train.py records)."""

    def __init__(self, num_layers: int, head_dim: int, elastic: "ElasticConfig | None" = None):
        self.elastic = elastic or ElasticConfig()
        super().__init__(AttentionRouter(head_dim, boundary=self.elastic.boundary, tail=self.elastic.tail,
                                         sk=self.elastic.uses_sk) for _ in range(num_layers))

    @staticmethod
    def fits(config) -> dict:
        """The numbers of a model config (model.ModelConfig) that routers must match to run on it."""
        return dict(num_hidden_layers=config.num_hidden_layers, num_key_value_heads=config.num_key_value_heads,
                    head_dim=config.head_dim, hidden_size=config.hidden_size)

    def save(self, out_dir, config, extra: dict | None = None) -> None:
        """Writes the dir; each file goes to a temporary name first and is renamed over the old one, so a run
        killed at any moment leaves the previous save whole."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous() for k, v in self.state_dict().items()}
        meta = json.dumps({"model": {"model_type": config.model_type, **self.fits(config)}, **(extra or {})}, indent=2)
        for name, write in (("routers.safetensors", lambda p: save_file(state, p)),
                            ("elastic.json", self.elastic.save),
                            ("routers.json", lambda p: Path(p).write_text(meta))):
            tmp = out_dir / f".{name}.tmp"
            write(tmp)
            tmp.replace(out_dir / name)

    @classmethod
    def load(cls, path, config) -> "Routers":
        """Routers saved by save(), for a model of this config; refused, with the numbers that differ, when they
        were trained for another shape. Frozen (no gradients)."""
        path = Path(path)
        if not (path / "routers.safetensors").is_file():
            raise FileNotFoundError(f"{path} holds no routers.safetensors (save them with train.py --out-dir)")
        try:
            meta = json.loads((path / "routers.json").read_text())["model"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path / 'routers.json'} is missing or unreadable ({e}); save the routers "
                             "again") from None
        diff = {k: (meta.get(k), v) for k, v in cls.fits(config).items() if meta.get(k) != v}
        if diff:
            raise ValueError(f"routers in {path} were trained for another model: "
                             + ", ".join(f"{k} {a} there vs {b} here" for k, (a, b) in diff.items()))
        routers = cls(config.num_hidden_layers, config.head_dim, ElasticConfig.load(path / "elastic.json"))
        state = load_file(path / "routers.safetensors")
        # Routers saved before the input standardisation existed have no in_mean / in_std: they were trained on the
        # raw pooled keys, which is what the fresh routers' identity standardisation gives.
        for name, buffer in routers.named_buffers():
            state.setdefault(name, buffer)
        want = routers.state_dict()
        if missing := sorted(set(want) - set(state)):
            raise ValueError(f"{path / 'routers.safetensors'} lacks {', '.join(missing[:4])}"
                             f"{' ...' if len(missing) > 4 else ''} ({routers.elastic.mode_pair} routers need them)")
        for name, tensor in state.items():
            if name in want and tuple(tensor.shape) != tuple(want[name].shape):
                raise ValueError(f"{path / 'routers.safetensors'}: {name} has shape {list(tensor.shape)} there vs "
                                 f"{list(want[name].shape)} here; the routers were saved for another model")
        routers.load_state_dict(state)
        return routers.requires_grad_(False)


@torch.no_grad()
def dense_pooled_keys(model, batches, boundary: int = 100, tail: int = 0):
    """Yields, for each (input_ids [B, T], prompt_lens [B]) of `batches`, the *dense* model's pooled pre-RoPE keys of
    every layer (router_input with this boundary and tail), [L, B, G, D or 2D] fp32: what the routers read,
    observed by forward hooks on each layer's `tap` (model.Attention), removed when the generator ends."""
    layers = [block.self_attn for block in model.model.layers]
    L = len(layers)
    got = {}

    def observe(i):
        def hook(tap, args):
            got[i] = router_input(args[2], got["lens"], boundary, tail)  # k_pre -> [B, G, D or 2D]
        return hook

    handles = [a.tap.register_forward_pre_hook(observe(i)) for i, a in enumerate(layers)]
    try:
        for input_ids, prompt_lens in batches:
            got["lens"] = prompt_lens
            model(input_ids, prompt_lens=prompt_lens, modes=model.fixed_modes(FA, input_ids.shape[0]), last_only=True)
            yield torch.stack([got[i] for i in range(L)])
    finally:
        for h in handles:
            h.remove()


def calibrate_routers(model, batches, reduce=None) -> int:
    """Sets every router's input standardisation (AttentionRouter.in_mean, in_std; ours) from the pooled pre-RoPE
    keys (router_input) of the *dense* model on `batches`, an iterable of (input_ids [B, T], prompt_lens [B]).
    Dense, so that the statistics belong to the backbone and the data, not to untrained routers. The keys are
    observed by forward hooks on each layer's `tap` (model.Attention), removed at the end.
    reduce: a function that sums a tensor across processes (train.py passes an all-reduce), so every rank
    ends with the same statistics. Returns the number of pooled vectors per layer (samples x KV heads)."""
    if model.routers is None:
        raise RuntimeError("calibrate_routers needs routers: set model.routers first")
    L, D = model.config.num_hidden_layers, model.routers[0].in_mean.numel()  # D: the router input's width
    stats = torch.zeros(L, 2, D, dtype=torch.float64, device=model.output_weight().device)  # per layer: sum, squares
    count = torch.zeros((), dtype=torch.float64, device=stats.device)
    for keys in dense_pooled_keys(model, batches, model.routers[0].boundary, model.routers[0].tail):
        x = keys.double().flatten(1, 2)  # [L, B * G, D]
        stats += torch.stack([x.sum(1), (x ** 2).sum(1)], 1)
        count += x.shape[1]
    if reduce is not None:
        reduce(stats)
        reduce(count)
    for router, (s, sq) in zip(model.routers, stats):  # fp64: the variance is a difference of two large sums
        router.set_input_stats(s, sq, count.item())
    return int(count.item())


def warm_start_routers(routers, keys, task_class, steps=200, lr=1e-3, margin_penalty=1e-2) -> float:
    """Ours: before the Lagrangian training, teach every router the task class of its input. keys [L, N, G, D]: the
    dense model's pooled pre-RoPE keys of N labelled prompts (dense_pooled_keys), task_class [N] (0 sensitive, 1
    robust). Each KV head of a sensitive prompt is pushed to retrieval (class 0), of a robust prompt to sparse
    (class 1): cross-entropy of the router logits, plus margin_penalty x the mean squared logit so that the logits
    stay small enough for the Gumbel noise and the training that follows to move them. Full-batch Adam for `steps`.
    The training then sets how sparse each class runs (the targets) and which heads stay full (the task loss); it
    starts from routers that already read the task. Returns the final share of heads routed to their class."""
    L, N, G, _ = keys.shape
    target = task_class.long().view(1, N, 1).expand(L, N, G).reshape(-1)

    def logits():  # [L * N * G, 2], what each router's forward gives after pooling
        return torch.stack([r.classify(x) for r, x in zip(routers, keys)]).reshape(-1, 2)
    opt = torch.optim.Adam(routers.parameters(), lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            out = logits()
            loss = F.cross_entropy(out, target) + margin_penalty * out.square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (logits().argmax(-1) == target).float().mean().item()


def route(logits: torch.Tensor, tau: float | None = None, hard: bool = True,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Turn router logits [B, G, 2] into mode weights z [B, G, 2] (the paper's Gumbel-softmax with straight-through).

    Training (tau given): 2-way Gumbel-softmax, g = -log(-log(u + 1e-8) + 1e-8), u ~ U[0, 1),
      soft = softmax((logits + g) / tau). hard=True: straight-through estimator,
      z = one_hot(argmax(soft)) + (soft - soft.detach()): exactly one-hot forward, soft gradient backward.
      hard=False: z = soft.
    Inference (tau None): z = one_hot(argmax(logits)), no noise, no gradient.
    z[..., 1] = 1 means the KV head runs its sparse mode.
    """
    if tau is None:
        if not hard:
            raise ValueError("route(tau=None) is inference and always hard; pass a tau for soft routing")
        return F.one_hot(logits.argmax(-1), 2).to(logits.dtype)
    if not tau > 0:
        raise ValueError(f"Gumbel temperature tau must be > 0, got {tau!r}")
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    g = -torch.log(-torch.log(u + 1e-8) + 1e-8)
    soft = torch.softmax((logits + g) / tau, dim=-1)
    if not hard:
        return soft
    hard_z = F.one_hot(soft.argmax(-1), 2).to(soft.dtype)
    return hard_z + (soft - soft.detach())   # parenthesised: soft - soft.detach() is exactly 0, so z is exactly one-hot


# The temperature schedule of the released code (the paper names an exponential decay without values)
TAU_START, TAU_END, TAU_FRAC = 1.5, 1.0, 0.6


def tau_schedule(step: int, total_steps: int, start: float = TAU_START, end: float = TAU_END,
                 frac: float = TAU_FRAC) -> float:
    """Gumbel temperature at `step`: cosine from `start` to `end` over the first `frac` of the steps, then `end`.

    The paper names an exponential decay without values; these numbers are the released code's.
    """
    if total_steps < 1 or not 0.0 < frac <= 1.0:
        raise ValueError(f"need total_steps >= 1 and 0 < frac <= 1, got total_steps={total_steps}, frac={frac}")
    anneal = frac * total_steps
    if step >= anneal:
        return end
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * max(step, 0) / anneal))

# -----------------------------------------------------------------------------
# Sparsity objective


def sparsity_ratio(zs: list[torch.Tensor]) -> torch.Tensor:
    """Model sparsity ratio Omega [B] (the paper's Omega_MSR): mean over layers and KV heads of z[..., 1].

    zs: one z [B, G, 2] per routed layer. Hard values forward, soft gradient backward (through route()).
    """
    return torch.stack(list(zs), dim=1)[..., 1].mean(dim=(1, 2))        # [B, L, G] -> [B]


# Omega targets of the task classes (sensitive, robust): the paper's t_sen = 0.7 and t_rob = 1.0
TARGETS = (0.7, 1.0)


class SparsityConstraint(nn.Module):
    """The Lagrangian sparsity penalty of paper Eq. 8, with Lagrange multipliers per task class.

    penalty = mean_b( lambda1[c_b] * (Omega_b - t[c_b]) + lambda2[c_b] * (Omega_b - t[c_b])^2 ),
    c_b the task class of sample b (0 sensitive, 1 robust), t = targets[c] (paper: 0.7 and 1.0).
    abs_linear=True uses |Omega - t| in the linear term, as the released code did.

    A min-max problem: the routers *minimise* CE + penalty, the lambdas *maximise* it. Give the lambdas a
    separate optimizer doing gradient ascent, e.g. AdamW(constraint.parameters(), lr=1e-3,
    betas=(0.9, 0.95), weight_decay=0.0, maximize=True), and step it on the same backward pass as the
    router optimizer. Ascent moves lambda1 by +(Omega - t) (up while a class is too sparse, down and
    possibly negative while it is too dense) and lambda2 by +(Omega - t)^2 (up whenever violated), so the
    price of violating the target rises until the routers meet it. Weight decay would pull the lambdas
    back to 0 and soften the constraint: keep it at 0 for them.
    """

    def __init__(self, targets: tuple[float, ...] = TARGETS, abs_linear: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not all(0.0 <= t <= 1.0 for t in targets):
            raise ValueError(f"sparsity targets must lie in [0, 1], got {targets}")
        n = len(targets)
        self.register_buffer("targets", torch.tensor(targets, dtype=torch.float32))
        self.lambda1 = nn.Parameter(0.5 * torch.rand(n, generator=generator))   # U[0, 0.5) as in the paper
        self.lambda2 = nn.Parameter(0.5 * torch.rand(n, generator=generator))
        self.abs_linear = abs_linear

    def forward(self, omega: torch.Tensor, task_class: torch.Tensor) -> torch.Tensor:
        """omega [B] (from sparsity_ratio), task_class LongTensor [B] -> scalar penalty. The range of task_class
        is checked when it comes on the CPU; on the GPU that would cost a sync every micro-batch (data.collate
        builds it from checked task names)."""
        n = len(self.targets)
        if omega.shape != task_class.shape:
            raise ValueError(f"omega {list(omega.shape)} and task_class {list(task_class.shape)} must match")
        if task_class.device.type == "cpu" and bool(((task_class < 0) | (task_class >= n)).any()):
            raise ValueError(f"task_class must lie in [0, {n}), got {task_class.tolist()}")
        gap = omega.float() - self.targets[task_class]                     # [B]
        linear = gap.abs() if self.abs_linear else gap
        return (self.lambda1[task_class] * linear + self.lambda2[task_class] * gap ** 2).mean()
