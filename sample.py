"""
Generate text from a prompt file, streaming tokens to stdout.

    python sample.py --prompt prompts/capital.txt                 # the embedded SmolLM2-135M-Instruct
    echo "Why is the sky blue?" | python sample.py --prompt -      # prompt from stdin
    python sample.py --prompt long.txt --model path/to/Llama-3.1-8B-Instruct --temperature 0.7

The prompt goes through the tokenizer's chat template (skip it with --raw), is prefilled once, and is then
decoded one token at a time with a KV cache. Timings go to stderr, so stdout holds only the answer.
"""
import argparse
import sys
import time

import torch
from transformers import AutoTokenizer

from model import Transformer, default_model_dir

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
args = parser.parse_args()

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
new, printed = [], ""
t0 = time.perf_counter()
for i, token in enumerate(model.generate(ids, args.max_new_tokens, args.temperature, args.top_p, eos, generator)):
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
n_decode = max(len(new) - 1, 0)
print(f"prompt tokens: {T} | prefill: {(t1 - t0) * 1e3:.1f} ms | "
      f"decode: {n_decode} tokens, {n_decode / max(t2 - t1, 1e-9):.1f} tokens/s", file=sys.stderr)
