"""
The frozen backbone: a Llama / Qwen3 (and Qwen2) decoder, loaded exactly from a HuggingFace checkpoint.

Elastic Attention (arXiv 2601.17367) never changes the backbone's weights; it only decides, per layer and
KV head, which attention each head runs. So this file is a plain decoder whose attention goes through one
place: `Attention.forward` computes q, k, v and the key states before RoPE (what the router reads) and hands
them to `attention.attend`, which routes the heads, runs them, and keeps the KV cache (attention.py).

    model = Transformer.from_pretrained("path/to/Llama-3.1-8B-Instruct")   # or default_model.default_model_dir()
    logits = model(idx)                                                    # idx [B, T] -> [B, T, V]

The q, k and v projections are one matrix, and so are the MLP's gate and up (one GEMV each a decode step, as
gpt-fast does); the checkpoint's separate tensors load into their rows under their own names. The model holds two
things besides its weights: `elastic`, how sparse heads run (router.ElasticConfig), and
`routers` (router.Routers, or None: dense unless a forward is given fixed modes). Generation is generate.py.

    pytest test_model.py      # logits against HuggingFace transformers on the same weights
"""
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import triton
import triton.language as tl
from safetensors import safe_open
from torch.utils.checkpoint import checkpoint

import attention
from router import ElasticConfig, check_prompt_lens

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
        try:
            with open(path) as f:
                hf = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid config.json ({e})") from None
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
    """x [B, T, heads, D]; cos, sin [B or 1, T, D]. Rotates the two halves of each head (HuggingFace's layout)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B|1, T, 1, D], broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# -----------------------------------------------------------------------------
# one-pass kernels: a GPU prefill's norms, RoPE and SiLU-times-up, each one read and one write (eager PyTorch makes
# two to six passes, with fp32 copies). Only where autograd does not record the call and torch.compile does not fuse
# it (a prefill, an eager decode step); the same roundings as the eager code, which stays the definition.


def recorded(x, weight=None):
    """Whether autograd records a call on x (and weight): training, which needs the eager code and every row."""
    return torch.is_grad_enabled() and (x.requires_grad or weight is not None and weight.requires_grad)


def one_pass(x, weight=None):
    """Whether x's norm, RoPE or SiLU-times-up runs as one Triton pass."""
    return x.is_cuda and not recorded(x, weight) and not torch.compiler.is_compiling()


@triton.jit
def _rms_norm_kernel(X, W, Y, N, C, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """ROWS rows of X [N, C] a program: RMSNorm.norm's arithmetic (fp32, then the input dtype times the weight)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    ok = (rows[:, None] < N) & (cols[None, :] < C)
    x = tl.load(X + rows[:, None] * C + cols[None, :], mask=ok, other=0.0)
    xf = x.to(tl.float32)
    r = tl.math.rsqrt(tl.sum(xf * xf, 1) / C + eps)
    w = tl.load(W + cols, mask=cols < C, other=0.0)
    y = (xf * r[:, None]).to(x.dtype) * w[None, :]
    tl.store(Y + rows[:, None] * C + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


def rms_norm(x, weight, eps):
    """RMSNorm.norm(x) in one pass, x [..., C] (any rows; a strided x is copied first)."""
    C = x.shape[-1]
    x2 = x.reshape(-1, C).contiguous()
    y = torch.empty(x2.shape, dtype=torch.result_type(x, weight), device=x.device)
    block = triton.next_power_of_2(C)
    rows = max(1, min(16, 4096 // block))
    _rms_norm_kernel[(triton.cdiv(x2.shape[0], rows),)](x2, weight, y, x2.shape[0], C, eps, ROWS=rows, BLOCK=block,
                                                         num_warps=8 if block >= 2048 else 4)
    return y.view(x.shape)


@triton.jit
def _rope_kernel(X, Cos, Sin, Y, T, HEADS, stride_xb, stride_xt, stride_xh, stride_cb, D: tl.constexpr,
                 H_P2: tl.constexpr):
    """One token's heads a program: apply_rope's x * cos + cat(-x2, x1) * sin, rounded to x's dtype after each
    operation as the eager one is."""
    b = tl.program_id(0) // T
    t = tl.program_id(0) % T
    h = tl.arange(0, H_P2)[:, None]
    d = tl.arange(0, D)[None, :]
    half: tl.constexpr = D // 2
    ok = h < HEADS
    row = X + b.to(tl.int64) * stride_xb + t.to(tl.int64) * stride_xt + h * stride_xh
    x = tl.load(row + d, mask=ok, other=0.0)
    partner = tl.load(row + (d + half) % D, mask=ok, other=0.0)  # x2 beside x1, x1 beside x2
    rotated = tl.where(d < half, -partner, partner)
    at = b.to(tl.int64) * stride_cb + t.to(tl.int64) * D + d
    cos, sin = tl.load(Cos + at), tl.load(Sin + at)
    y = (x * cos).to(x.dtype) + (rotated * sin).to(x.dtype)
    tl.store(Y + (tl.program_id(0).to(tl.int64) * HEADS + h) * D + d, y.to(Y.dtype.element_ty), mask=ok)


def rope(x, cos, sin):
    """apply_rope(x, cos, sin) in one pass -> a new contiguous [B, T, heads, D]."""
    B, T, heads, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()  # [B or 1, T, D]
    y = torch.empty(B, T, heads, D, dtype=torch.result_type(x, cos), device=x.device)
    _rope_kernel[(B * T,)](x, cos, sin, y, T, heads, x.stride(0), x.stride(1), x.stride(2),
                           T * D if cos.shape[0] > 1 else 0, D=D, H_P2=triton.next_power_of_2(heads), num_warps=4)
    return y


@triton.jit
def _silu_mul_kernel(GU, Y, NI, I, BLOCK: tl.constexpr):
    """BLOCK of the NI = [N, I] outputs a program: silu(gate) * up from one row of [gate | up], rounded to the input's
    dtype after the silu and after the product, as F.silu(gate) * up is."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < NI
    row, col = offs // I, offs % I
    gate = tl.load(GU + row * 2 * I + col, mask=ok, other=0.0)
    up = tl.load(GU + row * 2 * I + I + col, mask=ok, other=0.0)
    g = gate.to(tl.float32)
    s = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(Y + offs, (s * up).to(Y.dtype.element_ty), mask=ok)


def silu_mul(gate_up):
    """F.silu(gate) * up for gate_up [..., 2I] = [gate | up], in one pass -> [..., I]."""
    I = gate_up.shape[-1] // 2
    gu = gate_up.reshape(-1, 2 * I).contiguous()
    y = torch.empty(gu.shape[0], I, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul_kernel[(triton.cdiv(y.numel(), 1024),)](gu, y, y.numel(), I, BLOCK=1024, num_warps=4)
    return y.view(*gate_up.shape[:-1], I)


# -----------------------------------------------------------------------------
# the decoder

CHUNK = 1 << 26  # input elements per call of a norm or the MLP in a long prefill (16K tokens of a 4096-wide model)


def in_chunks(fn, x, weight):
    """fn(x) for x [..., C], CHUNK elements of x at a time when there are more and autograd does not record the call
    (training keeps every row for its backward): at 8 x 32K tokens of an 8B model the MLP's [tokens, 2 x
    intermediate] alone would take 14 GiB beside the cache, and a norm's fp32 copies of its input 4 GiB each."""
    rows = x.shape[:-1].numel()
    step = max(1, CHUNK // x.shape[-1])
    if rows <= step or recorded(x, weight):
        return fn(x)
    flat, out = x.reshape(rows, -1), None
    for i in range(0, rows, step):
        y = fn(flat[i:i + step])
        out = y.new_empty(rows, y.shape[-1]) if out is None else out
        out[i:i + step] = y
    return out.view(*x.shape[:-1], -1)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if one_pass(x, self.weight):  # the eager norm below makes six passes over fp32 copies of x
            return rms_norm(x, self.weight, self.eps)
        return in_chunks(self.norm, x, self.weight)

    def norm(self, x):
        # normalise in fp32, scale in the input dtype, as HuggingFace does (logits match bit for bit in fp32)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Tap(nn.Module):
    """Does nothing. Attention calls it at prefill with (q, k, k_pre), so that a forward (pre-)hook can observe a
    layer's states without the layer knowing who listens: router calibration (router.calibrate_routers) and the
    retrieval scores of the static hybrid (static_hybrid.py) use it."""

    def forward(self, q, k, k_pre):
        return None


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        H, G, D, C = self.n_head, self.n_kv_head, self.head_dim, cfg.hidden_size
        # q, k and v in one matrix: one GEMM at prefill, one GEMV a decode step (gpt-fast's wqkv). The checkpoint's
        # q_proj, k_proj and v_proj load into its rows (Transformer.checkpoint_tensors)
        self.qkv_proj = nn.Linear(C, (H + 2 * G) * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(D, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(D, cfg.rms_norm_eps)
        self.tap = Tap()

    def forward(self, x, cos, sin, fwd, i):
        """x [B, T, C] -> (y [B, T, C], attention.LayerRouting of layer i, or None when nothing was routed)."""
        B, T, _ = x.shape
        H, G, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.qkv_proj(x).split([H * D, G * D, G * D], dim=-1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, G, D), v.view(B, T, G, D)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        k_pre = k  # what the router reads: key states before RoPE, after Qwen3's k_norm
        rotate = rope if one_pass(q) and D & (D - 1) == 0 else apply_rope  # the kernel's tiles: D a power of two
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if fwd.pos is None:  # a prefill
            self.tap(q, k, k_pre)
        y, routed = attention.attend(q, k, v, k_pre, fwd, i)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # [B, T, H*D]
        return self.o_proj(y), routed


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        # gate and up in one matrix (the checkpoint's gate_proj and up_proj, stacked by rows)
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return in_chunks(self.mlp, x, self.gate_up_proj.weight)

    def mlp(self, x):
        gate_up = self.gate_up_proj(x)
        if one_pass(gate_up):
            return self.down_proj(silu_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, fwd, i):
        h, routed = self.self_attn(self.input_layernorm(x), cos, sin, fwd, i)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), routed


class Decoder(nn.Module):
    """HuggingFace's `model.*` submodule, kept so that parameter names match the checkpoint's."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.elastic = ElasticConfig()  # how heads run when routers or fixed modes send them off FA
        self.routers = None               # router.Routers: each layer routes its KV heads at prefill
        self.grad_checkpointing = False   # recompute each block in backward (training at long lengths)

    def output_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def fixed_modes(self, mode, batch=1):
        """int32 [batch, L, G]: every KV head in one mode, for forward(modes=...). attention.FA is dense attention,
        also when the model holds routers."""
        cfg = self.config
        return torch.full((batch, cfg.num_hidden_layers, cfg.num_key_value_heads), mode, dtype=torch.int32,
                          device=self.output_weight().device)

    def forward(self, idx, pos=None, *, prompt_lens=None, tau=None, modes=None, caches=None, return_routing=False,
                last_only=False, lengths=None, logits_at=None):
        """idx [B, T] token ids -> logits [B, T, V] (fp32 when the model is fp32).

        A prefill (pos None) reads positions 0..T-1. With routers, each layer routes its KV heads from the keys
        of the prompt, the first prompt_lens [B] tokens of each row (default: all T). tau: Gumbel temperature,
        training only: both branches run and mix by z. modes int [B, L, G] (or [1, L, G]): fixed modes instead
        of the routers' (static hybrids, all-FA, ...). caches: one attention.KVCache per layer, filled by a
        prefill and used by decode steps: pos (int [B] on the device, or an int) is then the position of each
        row's one token. return_routing: also return an attention.Routing of what the heads ran (None when
        nothing was routed). last_only: logits of the last position only, [B, 1, V] (a long prefill need not
        hold T x V logits). lengths: a prefill of rows of several lengths (Python ints), right-padded to T: each row
        runs as if alone (routers pool its tokens, unless prompt_lens says otherwise; caches hold them; last_only
        gives its own last token's logits). logits_at: bool [B, T], the logits of those positions only, [N, V] in
        row-major order (training: the trained positions; an 8B model's logits of 32K positions are 8 GB in bf16).
        Fixed modes are checked once here, not in every layer."""
        fwd = self._forward_spec(idx, pos, prompt_lens, tau, modes, caches, lengths)
        B, T = idx.shape
        if logits_at is not None and (logits_at.dtype != torch.bool or logits_at.shape != idx.shape or last_only):
            raise ValueError(f"logits_at must be a bool mask of idx's shape [B, T] = {[B, T]}, without last_only")
        x = self.model.embed_tokens(idx)
        positions = torch.arange(T, device=idx.device)[None] if fwd.pos is None else fwd.pos[:, None]  # [1|B, T]
        freqs = positions.float()[..., None] * self.inv_freq                                 # [B|1, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                                              # [B|1, T, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        routed = []
        for i, block in enumerate(self.model.layers):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, r = checkpoint(block, x, cos, sin, fwd, i, use_reentrant=False)  # the RNG is replayed: same z
            else:
                x, r = block(x, cos, sin, fwd, i)
            routed.append(r)
        if last_only:
            last = fwd.lengths_device
            x = x[:, -1:] if last is None else x[torch.arange(B, device=x.device), last.long() - 1][:, None]
        elif logits_at is not None:
            x = x[logits_at]
        logits = F.linear(self.model.norm(x), self.output_weight())
        if not return_routing:
            return logits
        return logits, None if routed[0] is None else attention.Routing.stack(routed, self.elastic)

    def _forward_spec(self, idx, pos, prompt_lens, tau, modes, caches, lengths):
        """forward()'s arguments checked once, for all layers -> attention.Forward."""
        B, T = idx.shape
        lengths_device = None
        if lengths is not None:
            lengths = [int(n) for n in lengths]
            if pos is not None or len(lengths) != B or not all(1 <= n <= T for n in lengths):
                raise ValueError(f"lengths must give each of the B={B} rows of a prefill its tokens, in [1, T={T}]; "
                                 f"got {lengths}")
            lengths_device = torch.tensor(lengths, dtype=torch.int32).to(idx.device, non_blocking=True)
        if prompt_lens is not None:
            check_prompt_lens(prompt_lens, T)  # once here, not in every layer's router (a sync on the GPU)
        elif lengths_device is not None:
            prompt_lens = lengths_device.long()  # checked above, on the host: no sync
        if isinstance(pos, int):
            pos = torch.full((B,), pos, dtype=torch.int32, device=idx.device)
        if pos is not None and (caches is None or T != 1):
            raise ValueError("a decode step (pos given) takes one token per row and the caches of a prefill")
        has_xa = None
        if modes is not None and pos is None:
            has_scorers = self.routers is not None and getattr(self.routers[0], "scorer", None) is not None
            has_xa = attention.check_modes(modes, self.config.num_hidden_layers, self.config.num_key_value_heads,
                                           has_scorers)
        return attention.Forward(self.elastic, self.routers, modes, tau, prompt_lens, caches, pos, lengths,
                                 lengths_device, has_xa)

    # -------------------------------------------------------------------------
    # checkpoint loading

    def checkpoint_tensors(self):
        """{a HuggingFace checkpoint's tensor name: where it loads in this model}. Our fused matrices are the
        checkpoint's separate ones stacked by rows, so each of those names a block of rows of one of them."""
        cfg = self.config
        H, G, D, I = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size
        fused = {"qkv_proj": (("q_proj", "k_proj", "v_proj"), (H * D, G * D, G * D)),
                 "gate_up_proj": (("gate_proj", "up_proj"), (I, I))}
        out = {}
        for name, p in self.named_parameters():
            module, leaf = name.rsplit(".", 1)          # model.layers.0.self_attn.qkv_proj, weight
            parent, _, own = module.rpartition(".")
            if own not in fused:
                out[name] = p.data
                continue
            parts, sizes = fused[own]
            for part, rows in zip(parts, p.data.split(sizes)):
                out[f"{parent}.{part}.{leaf}"] = rows
        return out

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
        params = model.checkpoint_tensors()
        loaded, unexpected = set(), []
        for file in files:
            try:
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
                        params[name].copy_(tensor)
                        loaded.add(name)
            except ValueError:
                raise
            except Exception as e:  # a truncated or corrupt file: name it
                raise ValueError(f"{path / file}: cannot read it ({str(e).splitlines()[0]})") from None
        missing = sorted(set(params) - loaded)
        if missing or unexpected:
            raise ValueError(f"{path}: checkpoint does not match the config: missing tensors {missing[:8]}"
                             f"{' ...' if len(missing) > 8 else ''}, unexpected tensors {unexpected[:8]}"
                             f"{' ...' if len(unexpected) > 8 else ''}")
        return model.eval().requires_grad_(False)
