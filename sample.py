"""
Generate text from a prompt file, streaming tokens to stdout, with dense or elastic attention.

    python sample.py --prompt prompts/capital.txt                    # the embedded SmolLM2-135M-Instruct, dense
    python sample.py --prompt long.txt --routers out-routers         # Elastic Attention with trained routers
    python sample.py --prompt long.txt --sparse-ratio 0.7            # static hybrid: 30% of KV heads full
    python sample.py --prompt long.txt --modes all-ssa               # every head streaming
    echo "Why is the sky blue?" | python sample.py --prompt -         # prompt from stdin

The prompt goes through the tokenizer's chat template (skip it with --raw) and is prefilled once: with routers,
each layer's router picks every KV head's mode from the prompt (router.py) and the fused kernel runs
all heads (kernel.py). Decoding then goes one token at a time; streaming (SSA) heads keep only their sink and
window in the KV cache. The answer goes to stdout; timings, the routing and the cache size go to stderr.
"""
import argparse
import json
import sys
import time

import torch
from transformers import AutoTokenizer

from default_model import default_model_dir
from generate import generate
from model import Transformer
from router import MODE_IDS, MODE_PAIRS, ElasticConfig, Routers
from static_hybrid import static_hybrid_modes

# -----------------------------------------------------------------------------
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--prompt", required=True, help="text file holding the prompt, or - for stdin")
parser.add_argument("--model", default=None, help="HuggingFace checkpoint dir (default: SmolLM2-135M-Instruct)")
parser.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens")
parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (with temperature > 0)")
parser.add_argument("--seed", type=int, default=1337, help="random seed for sampling")
parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="model dtype (default: bfloat16 on the GPU, float32 on the CPU)")
parser.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
# elastic attention
parser.add_argument("--routers", default=None, help="dir of routers trained by train.py (--out-dir)")
parser.add_argument("--sparse-ratio", type=float, default=None,
                    help="no routers: a static hybrid where the top (1 - R) KV heads by retrieval score stay full")
parser.add_argument("--modes", default=None, choices=["all-fa", "all-ssa", "all-xa"], help="every head in one mode")
parser.add_argument("--mode-pair", default=None, choices=MODE_PAIRS,
                    help="{retrieval}-{sparse} modes (default: the routers' own, else FA-SSA)")
parser.add_argument("--sink", type=int, default=None, help="SSA sink tokens (default: the routers', else 128)")
parser.add_argument("--window", type=int, default=None, help="SSA window tokens (default: the routers', else 2048)")
parser.add_argument("--stats-json", default=None, help="also write the stats printed on stderr to this file")
args = parser.parse_args()
if sum(x is not None for x in (args.routers, args.sparse_ratio, args.modes)) > 1:
    parser.error("choose one of --routers, --sparse-ratio and --modes")

# -----------------------------------------------------------------------------
# prompt
if args.prompt == "-":
    text = sys.stdin.read()
else:
    try:
        with open(args.prompt) as f:
            text = f.read()
    except FileNotFoundError:
        sys.exit(f"error: prompt file {args.prompt!r} does not exist")
if not text.strip():
    sys.exit(f"error: the prompt {'on stdin' if args.prompt == '-' else repr(args.prompt)} is empty")

# -----------------------------------------------------------------------------
# model and tokenizer
torch.manual_seed(args.seed)
model_dir = args.model or default_model_dir()
dtype = getattr(torch, args.dtype) if args.dtype else None
model = Transformer.from_pretrained(model_dir, device=args.device, dtype=dtype)
device = model.output_weight().device
tokenizer = AutoTokenizer.from_pretrained(model_dir)
overrides = {k: getattr(args, k) for k in ("mode_pair", "sink", "window") if getattr(args, k) is not None}
modes = None  # [1, L, G]; None: the routers decide (or every head is dense)
try:
    if args.routers:
        model.routers = Routers.load(args.routers, model.config).to(device)
        elastic = ElasticConfig(**{**vars(model.routers.elastic), **overrides})
    else:
        elastic = ElasticConfig(**overrides)
    model.elastic = elastic
    L, G = model.config.num_hidden_layers, model.config.num_key_value_heads
    if args.modes:
        modes = torch.full((1, L, G), MODE_IDS[args.modes[4:].upper()], dtype=torch.int32, device=device)
    elif args.sparse_ratio is not None:  # rank heads on a few retrieval prompts (static_hybrid.py)
        modes = static_hybrid_modes(model, tokenizer, args.sparse_ratio)
except (FileNotFoundError, ValueError) as e:
    sys.exit(f"error: {e}")

if args.raw:
    ids = tokenizer(text, return_tensors="pt").input_ids
else:
    if tokenizer.chat_template is None:
        sys.exit(f"error: the tokenizer in {model_dir} has no chat template; use --raw")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True).input_ids
ids = ids.to(device)
T, context = ids.shape[1], model.config.max_position_embeddings
if T >= context:
    sys.exit(f"error: the prompt has {T} tokens but the model's context is {context} tokens; shorten the prompt")

# -----------------------------------------------------------------------------
# generate, streaming: decode the whole answer each time and print what is new (keeps multi-byte characters whole)
eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
generator = torch.Generator(device=device).manual_seed(args.seed)
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
new, printed, stats = [], "", {}
t0 = time.perf_counter()
for i, token in enumerate(generate(model, ids, args.max_new_tokens, args.temperature, args.top_p, eos, generator,
                                   modes=modes, stats=stats)):
    if i == 0:
        sync()
        t1 = time.perf_counter()  # the first token comes out of the prefill
    new.append(token)
    out = tokenizer.decode(new, skip_special_tokens=True)
    if not out.endswith("\ufffd"):  # wait for the rest of a multi-byte character
        print(out[len(printed):], end="", flush=True)
        printed = out
sync()
t2 = time.perf_counter()
print()

# -----------------------------------------------------------------------------
# what ran: timings, routing, cache size (stderr, and --stats-json for machines)
n_decode = max(len(new) - 1, 0)
out = dict(prompt_tokens=T, prefill_ms=(t1 - t0) * 1e3, decode_tokens=n_decode,
           decode_tokens_per_s=n_decode / max(t2 - t1, 1e-9), kv_bytes=stats["kv_bytes"],
           kv_bytes_dense=stats["kv_bytes_dense"])
print(f"prompt tokens: {T} | prefill: {out['prefill_ms']:.1f} ms | "
      f"decode: {n_decode} tokens, {out['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
routing = stats["routing"]
if routing is not None:
    letters = "FSX"  # FA, SSA, XA: one character per KV head
    rows = ["".join(letters[m] for m in layer) for layer in routing.modes[0].tolist()]
    source = "routers" if args.routers else args.modes or f"static hybrid, sparse ratio {args.sparse_ratio}"
    out.update(omega=routing.omega[0].item(), modes=rows, mode_pair=elastic.mode_pair, sink=elastic.sink,
               window=elastic.window, source=source)
    print(f"routing ({source}, {elastic.mode_pair}, sink {elastic.sink}, window {elastic.window}): "
          f"Omega {out['omega']:.3f}; modes per layer (F=FA S=SSA X=XA):", file=sys.stderr)
    for i in range(0, len(rows), 10):
        print(f"  layers {i:2d}-{min(i + 9, len(rows) - 1):2d}: {' '.join(rows[i:i + 10])}", file=sys.stderr)
mib = 2 ** 20
print(f"KV cache: {out['kv_bytes'] / mib:.2f} MiB vs {out['kv_bytes_dense'] / mib:.2f} MiB dense "
      f"({out['kv_bytes'] / out['kv_bytes_dense']:.1%})", file=sys.stderr)
if args.stats_json:
    with open(args.stats_json, "w") as f:
        json.dump(out, f, indent=2)
