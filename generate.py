"""
Generation: prefill once, then decode one token at a time with the KV cache of attention.py.

    from generate import generate
    for token in generate(model, idx, max_new_tokens=100, eos_token_id=tokenizer.eos_token_id):
        ...

With routers, the prefill routes every KV head from the prompt's keys and the decision stays with the cache:
streaming (SSA) heads keep only their sink and a ring of the last `window` tokens. python sample.py is the
command-line front end.
"""
import torch

from attention import KVCache


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


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=0.0, top_p=1.0, eos_token_id=None, generator=None,
             modes=None, stats=None):
    """Yields new token ids one at a time (a Python int each), after one prefill of idx [1, T].
    temperature 0 is greedy; top_p < 1 samples from the smallest set of tokens holding top_p of the mass.
    Stops after eos_token_id (an int or a list of ints; it is yielded) or max_new_tokens tokens.
    modes [1, L, G] fixes the head modes (else the routers decide, or all heads are dense).
    stats, a dict, receives the prefill's Routing and the KV-cache bytes against a dense cache's."""
    B, T = idx.shape
    assert B == 1, "generate() decodes one sequence"
    cfg, ec = model.config, model.elastic
    max_new_tokens = min(max_new_tokens, cfg.max_position_embeddings - T)
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id or [])
    caches = [KVCache(T + max_new_tokens, ec.sink, ec.window) for _ in range(cfg.num_hidden_layers)]
    logits, routing = model(idx, modes=modes, caches=caches, return_routing=True, last_only=True)
    if stats is not None:
        dense = 2 * B * cfg.num_key_value_heads * (T + max_new_tokens) * cfg.head_dim
        stats.update(routing=routing, kv_bytes=sum(c.nbytes() for c in caches),
                     kv_bytes_dense=dense * model.output_weight().element_size() * len(caches))
    logits = logits[:, -1]
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, generator)  # [1]
        t = token.item()  # the one host sync of a decode step
        yield t
        if t in eos:
            break
        logits = model(token.view(1, 1), pos=T + i, caches=caches)[:, -1]
