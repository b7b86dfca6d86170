"""
The static hybrid: the baseline Elastic Attention (arXiv 2601.17367) is measured against. DuoAttention and PruLong
keep a fixed set of "retrieval" heads full and run the rest sparse, whatever the input; the share of sparse heads
(Omega, 0.7 in the paper's comparisons) is fixed too. Here the heads are ranked by a retrieval score measured on a
few synthetic retrieval prompts, one recipe for every script:

    modes = static_hybrid_modes(model, tokenizer, sparse_ratio=0.7)    # [1, L, G], for model(idx, modes=modes)
    python sample.py --prompt long.txt --sparse-ratio 0.7             # the same from the command line

Omega of a static hybrid is the same for every prompt; the routers' Omega follows the prompt. eval.py compares the
two at equal mean Omega.
"""
import torch

from data import SyntheticMix
from kernel import FA

# the probe recipe: RULER-like retrieval prompts (data.py) whose answers the model must copy from the prompt
PROBE_KINDS = ("passkey", "multi_key", "multi_value")
PROBE_SAMPLES, PROBE_LEN, PROBE_SEED = 8, 1024, 0


def probe_samples(tokenizer, max_len=None):
    """The retrieval prompts the heads are ranked on: PROBE_SAMPLES of PROBE_LEN tokens (fewer when the model's
    context max_len is shorter)."""
    T = PROBE_LEN if max_len is None else min(PROBE_LEN, max_len - 64)
    mix = SyntheticMix(tokenizer, T, T, seed=PROBE_SEED, kinds=PROBE_KINDS)
    return [mix[i] for i in range(PROBE_SAMPLES)]


@torch.no_grad()
def retrieval_scores(model, samples):
    """Retrieval score of every KV head, [L, G]: how much a head copies from the prompt when the answer must be
    retrieved (the heads DuoAttention and the paper's static baselines keep full). samples: data.Sample of
    retrieval tasks. For each query predicting an answer token, the score is the attention mass on the prompt
    positions j that continue the query's own token the way the answer does (ids[j-1] = ids[p] and
    ids[j] = ids[p+1]: the copy source); averaged over answer tokens, the group's query heads and samples.
    Dense attention throughout; the attention rows are computed from q and k observed by hooks on each layer's
    `tap` (model.Tap)."""
    layers = [block.self_attn for block in model.model.layers]
    G = model.config.num_key_value_heads
    device = model.output_weight().device
    total = torch.zeros(len(layers), G, device=device)
    for sample in samples:
        ids, P = sample.input_ids.to(device), sample.prompt_len
        rows = torch.arange(P - 1, len(ids) - 1, device=device)  # positions that predict the answer
        source = (ids[None, :P - 1] == ids[rows, None]) & (ids[None, 1:P] == ids[rows + 1, None])  # [P', P-1]

        def score(i):
            def hook(tap, args):
                q, k = args[0], args[1]                                       # [1, H, T, D], [1, G, T, D]
                probs = attention_rows(q, k, rows)                            # [1, H, P', T]
                mass = (probs[0, :, :, 1:P] * source).sum(-1).mean(-1)        # [H]
                total[i] += mass.view(G, -1).mean(-1)                         # [G]
            return hook

        handles = [a.tap.register_forward_pre_hook(score(i)) for i, a in enumerate(layers)]
        try:
            model(ids[None], modes=None if model.routers is None else model.fixed_modes(FA), last_only=True)
        finally:
            for h in handles:
                h.remove()
    return total / len(samples)


def attention_rows(q, k, rows):
    """Dense causal attention probabilities of a few query rows: q [B, H, T, D], k [B, G, T, D], rows [P]
    -> [B, H, P, T] in fp32 (for probing heads, not for speed)."""
    T, D = q.shape[2], q.shape[3]
    kk = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).float()  # [B, H, T, D]
    s = q[:, :, rows].float() @ kk.transpose(-1, -2) / D ** 0.5       # [B, H, P, T]
    return s.masked_fill(torch.arange(T, device=q.device) > rows[:, None], float("-inf")).softmax(-1)


def static_modes(scores, sparse_ratio, elastic):
    """Modes [1, L, G] of a static hybrid (they broadcast over a batch): the top (1 - sparse_ratio) of all KV
    heads by score run the retrieval mode of elastic.mode_pair, the rest its sparse mode."""
    if not 0.0 <= sparse_ratio <= 1.0:
        raise ValueError(f"sparse ratio must lie in [0, 1], got {sparse_ratio}")
    L, G = scores.shape
    retrieval, sparse = elastic.mode_ids
    modes = torch.full((L * G,), sparse, dtype=torch.int32, device=scores.device)
    modes[scores.flatten().argsort(descending=True)[:round((1 - sparse_ratio) * L * G)]] = retrieval
    return modes.view(1, L, G)


def static_hybrid_modes(model, tokenizer, sparse_ratio, scores=None):
    """The static hybrid of this model at sparse_ratio, in the model's mode pair (model.elastic): [1, L, G].
    scores: retrieval scores already measured (they do not depend on the ratio)."""
    if scores is None:
        scores = retrieval_scores(model, probe_samples(tokenizer, model.config.max_position_embeddings))
    return static_modes(scores, sparse_ratio, model.elastic)
