"""
Generation for one prompt or many: the prompts are prefilled in batches, right-padded, each row as if alone (and,
with routers, routed from its own keys), then all decode together, one token per row per step, through the KV
cache and the decode kernel of attention.py and decode_kernel.py. On the GPU a decode step has static shapes and
no host sync, so it is captured once as a CUDA graph and replayed (gpt-fast's way to a decode at the speed of
memory).

    from generate import generate
    for tokens in generate(model, [ids_a, ids_b], max_new_tokens=100, eos_token_id=tokenizer.eos_token_id):
        ...   # tokens: one new id per prompt, None for a prompt that has finished

Read in order: sample_next, batches, prefill, decode_one_token, CUDAGraphStep, generate. python sample.py is the
command-line front end.
"""
import functools

import torch

from attention import KVCache
from sparsek import selected_slots


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


PREFILL_TOKENS = 1 << 16  # a prefill forward holds at most this many tokens, padding included (or one prompt)


def batches(lengths, budget=PREFILL_TOKENS):
    """Consecutive prompts, as few forwards as the budget allows: -> [(first, end)], each batch's count times its
    longest prompt <= budget (a longer prompt alone)."""
    out, a, longest = [], 0, 0
    for i, n in enumerate(lengths):
        if i > a and (i + 1 - a) * max(longest, n) > budget:
            out.append((a, i))
            a, longest = i, 0
        longest = max(longest, n)
    return out + [(a, len(lengths))]


@torch.no_grad()
def prefill(model, prompts, max_new_tokens, modes=None):
    """Prefills the prompts a batch at a time (batches: right-padded to the batch's longest, each row as if alone:
    its own routing from its own keys, a cache of its own tokens, the logits of its own last token; Transformer.
    forward(lengths=...)) into caches that hold each prompt and max_new_tokens more.
    prompts: list of B int tensors [T_b]; modes: [1 or B, L, G] fixed modes, or None (the routers decide, or every
    head is dense). -> (logits [B, V] at each prompt's last token, caches: one attention.KVCache per layer with
    the B rows, routings: one attention.Routing per prompt, or None)."""
    ec, L = model.elastic, model.config.num_hidden_layers
    # an SK head keeps sk_k selected slots, but never more than the keys that can be candidates by the last step
    last = max(len(p) for p in prompts) + max_new_tokens - 1
    sk_k = selected_slots(ec.sk_k, last, sink=ec.sink, window=ec.window)
    logits, rows, routings = [], [], []
    for a, b in batches([len(p) for p in prompts]):
        ids = torch.nn.utils.rnn.pad_sequence(prompts[a:b], batch_first=True)  # [b - a, longest], zeros after each
        caches = [KVCache(max_new_tokens, ec.sink, ec.window, sk_k) for _ in range(L)]
        m = None if modes is None else modes[a:b] if modes.shape[0] > 1 else modes
        out, routing = model(ids, modes=m, caches=caches, return_routing=True, last_only=True,
                             lengths=[len(p) for p in prompts[a:b]])
        logits.append(out[:, -1])
        rows.append(caches)
        routings += [None] * (b - a) if routing is None else routing.rows()
    caches = []
    for i in range(L):  # layer by layer, so that the batches' own buffers are freed as they are copied
        caches.append(KVCache.cat([row[i] for row in rows]))
        for row in rows:
            row[i] = None
    return torch.cat(logits), caches, routings


def decode_one_token(model, token, pos, caches):
    """token [B] at positions pos [B] -> logits [B, V] of the next token; the caches take the token's keys."""
    return model(token[:, None], pos, caches=caches)[:, -1]


@functools.cache
def compiled_decode_one_token():
    """decode_one_token through torch.compile: the norms, RoPE, residuals and activations of a step fuse into a
    few kernels around the GEMVs and the decode kernel (an opaque operator), a few hundred launches fewer.
    Coordinate-descent tuning retunes those kernels' launch settings for a batch of a few rows (at B = 1 a norm is
    one row of 4096): on an H100, Llama-3.1-8B at 32K, FA-SSA, a step went from 7.12 to 6.79 ms, for a compile of
    45 s instead of 26 (RESULTS.md)."""
    return torch.compile(decode_one_token, options={"coordinate_descent_tuning": True})


class CUDAGraphStep:
    """A decode step captured once as a CUDA graph: each call copies (token, pos) into the graph's static inputs
    and replays it, so a step costs one launch instead of a few hundred. The step has static shapes and reads
    positions and cache lengths on the device, so the graph stays valid for the whole generation.
    fn: decode_one_token, or its compiled form."""

    def __init__(self, model, token, pos, caches, fn=decode_one_token):
        self.token, self.pos = token.clone(), pos.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the graph: Triton (and torch.compile) compile here
            for _ in range(2):
                fn(model, self.token, self.pos, caches)  # writes the same keys the first replay writes
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = fn(model, self.token, self.pos, caches)

    def __call__(self, token, pos):
        self.token.copy_(token)
        self.pos.copy_(pos)
        self.graph.replay()
        return self.logits


@torch.no_grad()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, eos_token_id=None, generator=None,
             modes=None, stats=None, cuda_graph=True, compile=False):
    """Yields, per decode step, a list of B new token ids (Python ints; None for a prompt already finished).

    prompts: a list of B 1-D int tensors of token ids (or one [1, T] / [T] tensor), of any lengths; each is
    routed from its own keys. temperature 0 is greedy; top_p < 1 samples from the smallest set of tokens that
    holds top_p of the mass. A prompt finishes after eos_token_id (an int or a list of ints; it is yielded) or
    max_new_tokens tokens. modes [1 or B, L, G] fixes the head modes (else the routers decide, or every head is
    dense). stats, a list, receives one dict per prompt: its Routing, and its KV-cache bytes against a dense
    cache's. cuda_graph: replay decode steps from a CUDA graph (on the GPU); compile: fuse a step's small
    operations with torch.compile first (GPU; the first call compiles, for a minute or so).
    A prompt's greedy tokens are those of generating it alone."""
    if torch.is_tensor(prompts):
        prompts = [prompts.reshape(-1)]
    device = model.output_weight().device
    prompts = [p.reshape(-1).to(device) for p in prompts]
    context = model.config.max_position_embeddings
    model.elastic.check_context(context)  # SK pairs: an sk_k the context can fill
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for b, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {b} is empty")
        if len(p) + max_new_tokens > context:
            raise ValueError(f"prompt {b} has {len(p)} tokens: with {max_new_tokens} new ones that exceeds the "
                             f"model's context of {context}; shorten it or lower max_new_tokens")
    B = len(prompts)
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    eos = torch.tensor(eos_ids or [-1], device=device)

    logits, caches, routings = prefill(model, prompts, max_new_tokens, modes)
    if stats is not None:
        cfg, size = model.config, model.output_weight().element_size()
        for b, p in enumerate(prompts):
            dense = 2 * cfg.num_key_value_heads * (len(p) + max_new_tokens) * cfg.head_dim * size * len(caches)
            stats.append(dict(routing=routings[b], kv_bytes=sum(c.nbytes(b) for c in caches), kv_bytes_dense=dense))
    pos = torch.tensor([len(p) for p in prompts], dtype=torch.int32, device=device)
    step = lambda token, pos: decode_one_token(model, token, pos, caches)  # noqa: E731
    done = torch.zeros(B, dtype=torch.bool, device=device)
    token = sample_next(logits, temperature, top_p, generator)
    host = torch.empty(2, B, dtype=torch.long, pin_memory=device.type == "cuda")  # tokens, finished flags
    for i in range(max_new_tokens):
        host[0].copy_(token, non_blocking=True)  # queued before the next step: reading it waits for it alone
        host[1].copy_(done, non_blocking=True)
        copied = torch.cuda.Event() if device.type == "cuda" else None
        if copied is not None:
            copied.record()
        done = done | torch.isin(token, eos)
        ahead = 0 < i < max_new_tokens - 1  # from the second token on, the next step runs while the host reads
        if ahead:
            logits = step(token, pos)
            pos = pos + 1
            next_token = sample_next(logits, temperature, top_p, generator)
        if copied is not None:
            copied.synchronize()
        tokens, finished = host.tolist()
        yield [None if f else t for t, f in zip(tokens, finished)]
        if i == max_new_tokens - 1 or all(f or t in eos_ids for t, f in zip(tokens, finished)):
            break
        if not ahead:  # after the first token (handed out as soon as the prefill made it): capture the step once
            if cuda_graph and device.type == "cuda":
                fn = compiled_decode_one_token() if compile else decode_one_token
                step = CUDAGraphStep(model, token, pos, caches, fn)
            logits = step(token, pos)
            pos = pos + 1
            next_token = sample_next(logits, temperature, top_p, generator)
        token = next_token
