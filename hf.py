"""
Elastic Attention (arXiv 2601.17367) on a HuggingFace transformers Llama, Qwen2 or Qwen3 model, loaded the usual way,
through transformers' own extension points. Three lines:

    model = AutoModelForCausalLM.from_pretrained(path)                           # as usual: dtype, device_map, ...
    enable_elastic_attention(model, "fa-ssa")                                    # routers trained for this model
    out = model.generate(**tokenizer(texts, return_tensors="pt", padding=True), max_new_tokens=64)  # pad left

Each prompt of the batch (left-padded, as generate wants) is routed from its own keys, attended and cached as if alone,
as generate.py does: greedy tokens and KV-cache bytes equal this repo's own path (test_hf.py). What the call adds,
and disable_elastic_attention(model) takes away again:
  - an attention function, registered with transformers' AttentionInterface as "elastic_attention" and selected with
    model.set_attn_implementation. At prefill each layer's router reads the prompt's keys and sends every KV head to
    its mode, and one call of attention.routed_attention runs them all (the fused kernel on the GPU, the PyTorch
    reference on the CPU); at decode attention.KVCache.decode attends the new token (the decode kernel on the GPU);
  - a mask function of the same name (AttentionMaskInterface): from the batch's 2D padding mask it finds where each
    row's tokens lie, and transformers hands that to every layer's attention call as its attention_mask;
  - per layer, a forward hook on k_proj (Llama, Qwen2) or k_norm (Qwen3) that catches the keys before RoPE (what the
    router reads), and a forward pre-hook on self_attn that hands the layer's attention call, through the keyword
    arguments transformers passes on to attention functions, its router, those keys and its cache layer;
  - ElasticLayer, a cache layer of transformers' cache API around one attention.KVCache: streaming heads keep only
    sink + window, so generate saves the memory too. At prefill it takes the place of the empty layer in the cache
    that transformers makes for generate (or for a forward); its full heads have room for max_new_tokens new tokens.
The weights are not touched; enable sets the config's attn_implementation and leaves one attribute on the model,
model.elastic_attention, the record of what disable undoes.

    pytest test_hf.py          # generate() against generate.py: greedy tokens, routing, KV bytes; restore; errors
"""
import importlib
from typing import NamedTuple

import torch
import transformers
from transformers import cache_utils

from attention import KVCache, routed_attention
from cli import SHIPPED_ROUTERS, routers_dir
from model import SUPPORTED_MODEL_TYPES, ModelConfig
from router import ElasticConfig, Routers, route
from sparsek import selected_slots

NAME = "elastic_attention"    # the attn_implementation, in transformers' attention and mask registries
INPUTS = "elastic_inputs"     # the keyword argument that carries a layer's LayerInputs to the attention function
CACHE_ARGUMENTS = ("cache", "past_key_values")  # the attention layer's cache argument: 5.25 on, before
# transformers >= 5 has them all (tested: 5.17 and 5.25); an older one is refused by enable_elastic_attention
EXTENSION_POINTS = (("transformers", "AttentionInterface"), ("transformers.masking_utils", "AttentionMaskInterface"),
                    ("transformers.cache_utils", "CacheLayerMixin"), ("transformers.cache_utils", "DynamicLayer"),
                    ("transformers", "PreTrainedModel.set_attn_implementation"))

# -----------------------------------------------------------------------------
# the cache


# (a transformers without the layered cache API imports this file all the same; enable_elastic_attention refuses it)
class ElasticLayer(getattr(cache_utils, "CacheLayerMixin", object)):
    """One layer's KV cache in transformers' cache API: an attention.KVCache, in which every (row, KV head) owns a
    segment sized by its mode: full and XA heads the prompt and max_new_tokens more positions, streaming heads sink +
    window, SK heads that and their selected keys. Each row holds its own tokens only, as if it had come alone.
    The attention function fills it at prefill and decodes through it. update() stores nothing: KVCache.decode writes
    the new key and value and attends in one step (one launch of the decode kernel on the GPU)."""

    is_compileable = False      # segment sizes follow the prompt's routing, on the host
    is_sliding = False
    supports_early_init = False  # nothing to allocate before the routers have seen the prompt

    def __init__(self, max_new_tokens):
        super().__init__()
        self.max_new_tokens = max_new_tokens
        self.kv = None       # attention.KVCache, from the prefill on
        self.modes = None    # int32 [B, G]: each row's head modes (kernel.FA, SSA, XA, SK)
        self.pos = None      # int32 [B] on the device: each row's position of its next token (its own tokens so far)
        self.steps = 0       # decode steps taken
        self.seen = 0        # tokens the forwards brought, padding included: what transformers counts

    def prefill(self, k, v, modes, sk_scores, lengths, elastic):
        """k, v [B, G, T, D] (after RoPE) of B rows, each its lengths[b] tokens first (right-padded), modes int32
        [B, G], sk_scores [B, G, T] (SK heads) or None."""
        # an SK head keeps no more selected slots than there can be candidates by the last step (generate.prefill)
        last = max(lengths) + self.max_new_tokens - 1
        sk_k = selected_slots(elastic.sk_k, last, sink=elastic.sink, window=elastic.window)
        self.kv = KVCache(self.max_new_tokens, elastic.sink, elastic.window, sk_k)
        self.kv.prefill(k, v, modes, sk_scores, lengths)
        self.modes, self.steps = modes, 0
        self.pos = torch.tensor(lengths, dtype=torch.int32).to(k.device, non_blocking=True)

    def decode(self, q, k, v, u):
        """One token per row: q [B, H, 1, D], k and v [B, G, 1, D] (after RoPE), u [B, G, 1] (SK) -> [B, H, 1, D]."""
        if self.steps == self.max_new_tokens:  # a full head's segment is full: the next position has no slot
            raise ValueError(f"the elastic KV cache has room for {self.max_new_tokens} new tokens per prompt and "
                             f"this generation wants more; call enable_elastic_attention(model, routers, "
                             f"max_new_tokens=...) with at least the generation's max_new_tokens")
        y = self.kv.decode(q, k, v, self.pos, u)
        self.pos, self.steps = self.pos + 1, self.steps + 1
        return y

    def nbytes(self, row=None):
        return 0 if self.kv is None else self.kv.nbytes(row)

    # the cache API
    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.seen += key_states.shape[-2]
        return key_states, value_states

    def get_seq_length(self):
        return self.seen

    def get_mask_sizes(self, query_length):
        return self.seen + query_length, 0

    def get_max_length(self):
        return -1

    def reset(self):
        self.kv = self.modes = self.pos = None
        self.steps = self.seen = 0

    def _unsupported(self, *args, **kwargs):
        raise ValueError("the elastic KV cache decodes each prompt on its own, one token a step (greedy or sampled "
                         "generate); beam search, assisted and contrastive decoding reorder or crop it: generate "
                         "without them (num_beams=1, no assistant_model, no penalty_alpha)")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _unsupported


def elastic_layers(cache):
    """The ElasticLayers of a cache that a generate (or a forward) filled after enable_elastic_attention; or of the
    cache in what generate(..., return_dict_in_generate=True) returned."""
    if isinstance(cache, dict):  # a generate output; transformers 5.25 renamed its past_key_values to cache
        cache = cache["cache"] if "cache" in cache else cache.get("past_key_values")
    layers = [layer for layer in getattr(cache, "layers", ()) if isinstance(layer, ElasticLayer)]
    if not layers:
        raise ValueError(f"{type(cache).__name__} holds no elastic layers: pass the cache of a generate (or forward) "
                         f"of a model that enable_elastic_attention set up, or generate's output")
    return layers


def kv_bytes(cache, row=None):
    """Bytes of keys and values the cache holds, for all rows or row `row` (attention.KVCache.nbytes, every layer)."""
    return sum(layer.nbytes(row) for layer in elastic_layers(cache))


def head_modes(cache):
    """int32 [B, L, G]: the mode each row's routing gave every KV head (kernel.FA, SSA, XA, SK)."""
    return torch.stack([layer.modes for layer in elastic_layers(cache)], dim=1)

# -----------------------------------------------------------------------------
# what one layer's attention call gets besides transformers' own arguments


class Rows(NamedTuple):
    """Where each row's tokens lie in the batch of a prompt forward, from its 2D attention mask."""
    start: torch.Tensor  # [B] long, on the device: the row's first token (its left padding)
    lengths: list        # the row's tokens, Python ints (KVCache.prefill sizes its segments on the host)


def rows_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
              device="cpu", **kwargs):
    """The mask function of NAME (transformers' AttentionMaskInterface), called once per forward: at a prompt forward
    the Rows of the 2D padding mask attention_mask [B, T] (None: every row is whole); at a decode step None, since
    every cache layer knows its rows' positions (and nothing comes to the host)."""
    from transformers.masking_utils import causal_mask_function
    if mask_function is not causal_mask_function:
        raise ValueError("elastic attention runs causal attention over each row's own contiguous tokens; this forward "
                         "asked for another mask (packed sequences or a custom mask function): pass one sequence "
                         "per row with a 2D attention mask")
    if kv_length != q_length:
        return None
    if attention_mask is None:
        return Rows(torch.zeros(batch_size, dtype=torch.long, device=device), [q_length] * batch_size)
    mask = attention_mask[:, -q_length:].cpu()               # [B, T] bool: one copy per prompt forward
    n = mask.sum(1)
    first = mask.int().argmax(1)                             # [B] first token of each row
    last = q_length - 1 - mask.flip(1).int().argmax(1)       # [B] last token of each row
    for b in range(batch_size):
        if n[b] == 0 or last[b] - first[b] + 1 != n[b]:
            raise ValueError(f"row {b} of the attention mask has {n[b]} tokens between positions {first[b]} and "
                             f"{last[b]}: elastic attention needs each row's tokens side by side, at least one (pad "
                             f"on the left or the right only)")
    return Rows(first.to(device), n.tolist())


class KeyTap:
    """Forward hook on a layer's k_proj (Llama, Qwen2) or k_norm (Qwen3): keeps the keys before RoPE of the forward in
    progress until the layer's attention call takes them, a few operations later in the same layer."""

    def __init__(self):
        self.keys = None

    def __call__(self, module, args, output):
        self.keys = output

    def take(self):
        keys, self.keys = self.keys, None
        if keys is None:
            raise RuntimeError("the layer's attention ran without its keys before RoPE: the hook on its k_proj or "
                               "k_norm did not run")
        return keys


class LayerInputs(NamedTuple):
    """What layer i's attention call needs besides transformers' arguments."""
    layer: ElasticLayer | None  # its cache layer (None: a forward without a cache)
    router: torch.nn.Module     # router.AttentionRouter of layer i
    elastic: ElasticConfig      # the mode pair, sink and window, ...
    tap: KeyTap                 # the keys before RoPE


class LayerHook:
    """Forward pre-hook (with keyword arguments) on layer i's self_attn: adds LayerInputs to the call's keyword
    arguments, which the attention layer passes on to the attention function, as it does position_ids."""

    def __init__(self, i, router, elastic, tap, max_new_tokens):
        self.i, self.router, self.elastic, self.tap, self.max_new_tokens = i, router, elastic, tap, max_new_tokens

    def __call__(self, attn, args, kwargs):
        names = [name for name in CACHE_ARGUMENTS if name in kwargs]
        if not names:
            raise ValueError(f"transformers {transformers.__version__} calls the attention layer without a "
                             f"{' or '.join(CACHE_ARGUMENTS)} argument; elastic attention was tested with transformers "
                             f"5.17 and 5.25: install one of those")
        layer = cache_layer(kwargs[names[0]], self.i, self.max_new_tokens)
        return args, {**kwargs, INPUTS: LayerInputs(layer, self.router, self.elastic, self.tap)}


def cache_layer(cache, i, max_new_tokens):
    """Layer i's ElasticLayer in `cache` (None without a cache). The cache that transformers makes for generate or a
    forward (a DynamicCache) starts with empty DynamicLayers: at the prompt forward an ElasticLayer takes the place of
    layer i's (Cache.layers is the cache API's list of per-layer caches). A cache of another kind, or one that holds
    tokens already, is refused."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    old = layers[i] if layers is not None and i < len(layers) else None
    if isinstance(old, ElasticLayer):
        return old
    empty = layers is not None and (old is None and i == len(layers) or
                                     type(old) is cache_utils.DynamicLayer and old.get_seq_length() == 0)
    if not empty:
        raise ValueError(f"elastic attention keeps its own KV cache and cannot take over layer {i} of this "
                         f"{type(cache).__name__} ({type(old).__name__}, or holding tokens already); let generate or "
                         f"the forward make the cache (no past_key_values, no cache_implementation)")
    layer = ElasticLayer(max_new_tokens)
    if old is None:
        layers.append(layer)
    else:
        layers[i] = layer
    return layer

# -----------------------------------------------------------------------------
# the attention function


def elastic_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention function signature: query [B, H, T, D], key and value [B, G, T, D] (after RoPE; what the
    cache's update returned: this forward's own), attention_mask from rows_mask -> (output [B, T, H, D], None).
    A prompt forward routes and runs every head (prefill); a forward of one token on a filled cache layer decodes."""
    inputs = kwargs.get(INPUTS)
    if inputs is None:
        raise ValueError(f"attn_implementation {NAME!r} runs only inside a model that enable_elastic_attention set up")
    if dropout:
        raise ValueError(f"attention dropout {dropout}: elastic attention is for inference; call model.eval() first")
    B, H, T, D = query.shape
    k_pre = inputs.tap.take().reshape(B, T, key.shape[1], D)  # [B, T, G, D]
    router, layer = inputs.router, inputs.layer
    if next(router.parameters()).device != k_pre.device:
        raise ValueError(f"the routers are on {next(router.parameters()).device} and the model on {k_pre.device}: "
                         f"call enable_elastic_attention after moving the model")
    if layer is None or layer.kv is None:
        if not isinstance(attention_mask, Rows):
            raise ValueError(f"elastic attention reads a 2D attention mask (or none), got {type(attention_mask)} "
                             f"{getattr(attention_mask, 'shape', '')}")
        y = prefill(query, key, value, k_pre, attention_mask, router, inputs.elastic, layer)
    elif T == 1:
        y = layer.decode(query, key, value, router.scorer(k_pre) if router.scorer is not None else None)
    else:
        raise ValueError(f"a forward of {T} tokens on a cache that holds a prompt already: elastic attention prefills "
                         f"a prompt in one forward and then decodes one token a forward (no chunked prefill, no cached "
                         f"prefix, no speculative decoding)")
    return y.transpose(1, 2).contiguous(), None


def prefill(q, k, v, k_pre, rows, router, elastic, layer):
    """A prompt forward: q [B, H, T, D], k and v [B, G, T, D] (after RoPE), k_pre [B, T, G, D] (before RoPE) -> y
    [B, H, T, D]. Each row as generate.py prefills it (attention.attend, Transformer.forward(lengths=...)): its tokens
    moved to the front (right padding), routed from its own keys (the routers pool its own tokens), its heads run
    in one call of routed_attention, its cache segments filled with its own tokens; then moved back."""
    T = q.shape[2]
    lens = torch.tensor(rows.lengths, dtype=torch.int32).to(q.device, non_blocking=True)
    start = rows.start.to(q.device)  # (the layers of a model spread over GPUs by device_map)
    padded = min(rows.lengths) < T
    if padded:  # each row's tokens first; then its last token again, which no row's own tokens attend to
        at = start[:, None] + torch.minimum(torch.arange(T, device=q.device), lens[:, None] - 1)  # [B, T]
        q, k, v = (x.gather(2, at[:, None, :, None].expand(x.shape)) for x in (q, k, v))
        k_pre = k_pre.gather(1, at[:, :, None, None].expand(k_pre.shape))
    modes = elastic.head_modes(route(router(k_pre, lens.long())))       # [B, G]: argmax routing
    u = router.scorer(k_pre) if router.scorer is not None else None     # SK pairs: [B, G, T]
    y = routed_attention(q, k, v, modes, elastic, u, lens)
    if layer is not None:
        layer.prefill(k, v, modes, u, rows.lengths, elastic)
    if padded:  # back to the batch's layout; padding gets zeros
        t = torch.arange(T, device=q.device) - start[:, None]          # [B, T] each position's index in its row
        keep = (t >= 0) & (t < lens[:, None])
        y = y.gather(2, t.clamp(0, T - 1)[:, None, :, None].expand(y.shape))
        y = torch.where(keep[:, None, :, None], y, 0.0)
    return y

# -----------------------------------------------------------------------------
# enable, disable


class Enabled(NamedTuple):
    """What enable_elastic_attention leaves on the model, as model.elastic_attention, for disable to undo."""
    routers: Routers
    max_new_tokens: int
    previous: str    # the attn_implementation before
    handles: list    # of the hooks


def enable_elastic_attention(model, routers, max_new_tokens=512):
    """Elastic Attention on a transformers Llama, Qwen2 or Qwen3 model (e.g. from AutoModelForCausalLM.from_pretrained).
    routers: a router.Routers, the dir train.py --out-dir wrote, or the name of a set shipped in routers/ (fa-ssa,
    fa-xa, xa-ssa, fa-sk); they must have been trained for this model. max_new_tokens: the room a generation's full
    heads keep for new tokens per prompt (its cache is sized at prefill, as a static cache is); a longer generation
    stops with an error. Inference only: prefill and decode of model.generate or forward."""
    check_transformers(model)
    if getattr(model, "elastic_attention", None) is not None:
        raise ValueError("elastic attention is enabled on this model already: call disable_elastic_attention(model) "
                         "first to change its routers or max_new_tokens")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: pass the most tokens a generation adds, an int >= 1")
    layers = attention_layers(model)
    routers = fitting_routers(routers, model)
    routers.elastic.check_context(model.config.max_position_embeddings)  # SK pairs: an sk_k the context can fill
    transformers.AttentionInterface.register(NAME, elastic_attention_forward)
    importlib.import_module("transformers.masking_utils").AttentionMaskInterface.register(NAME, rows_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation(NAME)
    handles = []
    for i, (attn, key_source) in enumerate(layers):
        router = routers[i].to(attn.k_proj.weight.device)  # a layer's router beside its weights (device_map too)
        tap = KeyTap()
        handles.append(key_source.register_forward_hook(tap))
        handles.append(attn.register_forward_pre_hook(LayerHook(i, router, routers.elastic, tap, max_new_tokens),
                                                      with_kwargs=True))
    model.elastic_attention = Enabled(routers, max_new_tokens, previous, handles)


def disable_elastic_attention(model):
    """Undoes enable_elastic_attention: the hooks go, the attention implementation is the one before, and the model
    computes exactly what it did before (its weights were never changed)."""
    enabled = getattr(model, "elastic_attention", None)
    if enabled is None:
        raise ValueError("elastic attention is not enabled on this model (enable_elastic_attention(model, routers))")
    for handle in enabled.handles:
        handle.remove()
    model.set_attn_implementation(enabled.previous)
    del model.elastic_attention


def check_transformers(model):
    """The extension points this file builds on, looked up now: a one-line error names the missing ones."""
    missing = []
    for module, name in EXTENSION_POINTS:
        try:
            found = importlib.import_module(module)
            for part in name.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError):
            missing.append(f"{module}.{name}")
    if missing:
        raise ValueError(f"transformers {transformers.__version__} lacks {', '.join(missing)}: elastic attention on a "
                         f"transformers model needs transformers >= 5 (pip install -U 'transformers>=5')")
    if not isinstance(model, transformers.PreTrainedModel):
        raise ValueError(f"expected a transformers model (e.g. AutoModelForCausalLM.from_pretrained(...)), got "
                         f"{type(model).__name__}; this repo's own model.Transformer takes routers as model.routers")


def attention_layers(model):
    """[(self_attn, the module whose output is its keys before RoPE)] per decoder layer: k_proj (Llama, Qwen2), or
    k_norm (Qwen3: its per-head RMSNorm comes before RoPE, and the router reads what it returns)."""
    cfg = model.config
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type {cfg.model_type!r} is not supported; elastic attention runs on "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} models")
    if getattr(cfg, "use_sliding_window", False) or "sliding_attention" in (getattr(cfg, "layer_types", None) or ()):
        raise ValueError(f"this {cfg.model_type} model has sliding-window layers (use_sliding_window or layer_types), "
                         f"which elastic attention does not route; load it with use_sliding_window=False")
    decoder = getattr(model, "model", model)  # *ForCausalLM holds the decoder as .model
    return [(layer.self_attn, layer.self_attn.k_norm if cfg.model_type == "qwen3" else layer.self_attn.k_proj)
            for layer in decoder.layers]


def model_config(model):
    """model.ModelConfig with the numbers of a transformers config that routers must fit (Routers.fits)."""
    cfg = model.config
    return ModelConfig(model_type=cfg.model_type, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                       num_attention_heads=cfg.num_attention_heads,
                       num_key_value_heads=cfg.num_key_value_heads or cfg.num_attention_heads,
                       head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                       max_position_embeddings=cfg.max_position_embeddings)


def fitting_routers(routers, model):
    """A router.Routers for this model from what enable_elastic_attention got, refused (with the numbers that differ)
    when trained for another model: a Routers object by its layers and head dim, a saved set by its routers.json."""
    config = model_config(model)
    if isinstance(routers, Routers):
        if len(routers) != config.num_hidden_layers or routers[0].head_dim != config.head_dim:
            raise ValueError(f"the routers have {len(routers)} layers of head dim {routers[0].head_dim}, the model "
                             f"{config.num_hidden_layers} of head dim {config.head_dim}: load routers trained for it")
        return routers
    try:
        path = routers_dir(routers)
    except ValueError:
        shipped = sorted(p.parent.name for p in SHIPPED_ROUTERS.glob("*/routers.safetensors"))
        raise ValueError(f"routers {str(routers)!r}: no routers.safetensors there; pass a dir that train.py --out-dir "
                         f"wrote, a set shipped in routers/ ({', '.join(shipped)}), or a router.Routers") from None
    return Routers.load(path, config)
