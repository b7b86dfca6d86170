"""
Generate text from prompt files, streaming to stdout, with dense or elastic attention.

    python sample.py --prompt prompts/capital.txt                    # the embedded SmolLM2-135M-Instruct, dense
    python sample.py --prompt a.txt --prompt b.txt                   # several prompts, decoded together
    python sample.py --prompt long.txt --routers fa-ssa              # Elastic Attention, routers shipped in routers/
    python sample.py --prompt long.txt --routers out-routers         # ... or routers you trained (train.py)
    python sample.py --prompt long.txt --sparse-ratio 0.7            # static hybrid: 30% of KV heads full
    python sample.py --prompt long.txt --modes all-ssa               # every head streaming
    echo "Why is the sky blue?" | python sample.py --prompt -         # prompt from stdin

Each prompt goes through the tokenizer's chat template (skip it with --raw) and is prefilled once: with routers,
each layer's router picks every KV head's mode from that prompt's keys (router.py) and the fused kernel runs all
heads (kernel.py). All prompts then decode together (generate.py); streaming (SSA) heads keep only their sink and
window in the KV cache. One prompt streams its answer to stdout; several print their answers one after another,
each under a header line `==> FILE <==` (as `head` does). Timings, the routing and the cache size go to stderr.
"""
import argparse
import json
import os
import sys
import time

import torch

from cli import check_device, checkpoint_dir, routers_dir
from router import MODE_IDS, MODE_PAIRS, ElasticConfig


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", required=True, action="append",
                        help="text file holding a prompt, or - for stdin; give it several times for several prompts")
    parser.add_argument("--model", default=None, help="HuggingFace checkpoint dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature; 0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass in (0, 1] (temperature > 0)")
    parser.add_argument("--seed", type=int, default=1337, help="random seed for sampling")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="model dtype (default: bfloat16 on the GPU, float32 on the CPU)")
    parser.add_argument("--raw", action="store_true", help="feed the prompt as is, without the chat template")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly, without a CUDA graph")
    # elastic attention
    parser.add_argument("--routers", default=None, help="dir of routers trained by train.py (--out-dir), or the "
                        "name of a set shipped for the default model under routers/ (fa-ssa, fa-xa, xa-ssa, ...)")
    parser.add_argument("--sparse-ratio", type=float, default=None,
                        help="no routers: a static hybrid where the top (1 - R) KV heads by retrieval score stay full")
    parser.add_argument("--modes", default=None, choices=["all-fa", "all-ssa", "all-xa"], help="every head in one mode")
    parser.add_argument("--mode-pair", default=None, choices=MODE_PAIRS,
                        help="{retrieval}-{sparse} modes (default: the routers' own, else FA-SSA)")
    parser.add_argument("--sink", type=int, default=None,
                        help=f"SSA sink tokens (default: the routers', else {ElasticConfig.sink})")
    parser.add_argument("--window", type=int, default=None,
                        help=f"SSA window tokens (default: the routers', else {ElasticConfig.window})")
    parser.add_argument("--stats-json", default=None, help="also write the stats printed on stderr to this file "
                        "(a list, one entry per prompt)")
    args = parser.parse_args(argv)
    # every user error ends here, in one line, before anything heavy loads
    if sum(x is not None for x in (args.routers, args.sparse_ratio, args.modes)) > 1:
        parser.error("choose one of --routers, --sparse-ratio and --modes")
    if args.max_new_tokens < 1:
        fail(f"--max-new-tokens {args.max_new_tokens}: generate at least 1 token")
    if not args.temperature >= 0:
        fail(f"--temperature {args.temperature}: use 0 (greedy) or a positive temperature")
    if not 0 < args.top_p <= 1:
        fail(f"--top-p {args.top_p}: the nucleus mass must lie in (0, 1]")
    if args.sparse_ratio is not None and not 0 <= args.sparse_ratio <= 1:
        fail(f"--sparse-ratio {args.sparse_ratio}: the share of sparse heads must lie in [0, 1]")
    try:
        check_device(args.device)
        if args.model is not None:
            checkpoint_dir(args.model)
    except ValueError as e:
        fail(e)
    if args.routers is not None:
        try:
            args.routers = routers_dir(args.routers)
        except ValueError as e:
            fail(e)
    if args.prompt.count("-") > 1:
        fail("--prompt -: stdin can be read once only")
    try:
        ElasticConfig(**{k: getattr(args, k) for k in ("mode_pair", "sink", "window") if getattr(args, k) is not None})
    except ValueError as e:
        fail(str(e).replace("sink must", "--sink must").replace("window must", "--window must"))
    return args


def fail(message):
    sys.exit(f"error: {message}")


def read_prompt(name):
    """The text of a prompt file (or stdin for -), checked: it exists, is text, and is not empty."""
    where = "on stdin" if name == "-" else repr(name)
    try:
        text = sys.stdin.read() if name == "-" else open(name, encoding="utf-8").read()
    except FileNotFoundError:
        fail(f"prompt file {name!r} does not exist")
    except IsADirectoryError:
        fail(f"prompt file {name!r} is a directory")
    except UnicodeDecodeError:
        fail(f"the prompt {where} is not UTF-8 text")
    if not text.strip():
        fail(f"the prompt {where} is empty")
    return text


def main():
    args = parse_args()
    texts = [read_prompt(name) for name in args.prompt]

    # -------------------------------------------------------------------------
    # model and tokenizer (imported here: --help and argument errors need none of it)
    from transformers import AutoTokenizer

    from generate import generate
    from model import Transformer
    from router import Routers
    from static_hybrid import static_hybrid_modes

    torch.manual_seed(args.seed)
    try:
        model_dir, _ = checkpoint_dir(args.model)  # the default model is converted here, once
    except ValueError as e:
        fail(e)
    try:
        model = Transformer.from_pretrained(model_dir, device=args.device,
                                            dtype=getattr(torch, args.dtype) if args.dtype else None)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # a corrupt config.json, a truncated model.safetensors (both named), tokenizer files...
        fail(f"cannot load the model from {model_dir}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    device = model.output_weight().device
    overrides = {k: getattr(args, k) for k in ("mode_pair", "sink", "window") if getattr(args, k) is not None}
    modes = None  # [1, L, G]; None: the routers decide (or every head is dense)
    try:
        if args.routers:
            model.routers = Routers.load(args.routers, model.config).to(device)
            model.elastic = ElasticConfig(**{**vars(model.routers.elastic), **overrides})
        else:
            model.elastic = ElasticConfig(**overrides)
        if args.modes:
            modes = model.fixed_modes(MODE_IDS[args.modes[4:].upper()])
        elif args.sparse_ratio is not None:  # rank heads on a few retrieval prompts (static_hybrid.py)
            modes = static_hybrid_modes(model, tokenizer, args.sparse_ratio)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))

    prompts = []
    for name, text in zip(args.prompt, texts):
        if args.raw:
            ids = tokenizer(text, return_tensors="pt").input_ids
        else:
            if tokenizer.chat_template is None:
                fail(f"the tokenizer in {model_dir} has no chat template; use --raw")
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True).input_ids
        T, context = ids.shape[1], model.config.max_position_embeddings
        if T + 1 > context:
            fail(f"the prompt {name!r} has {T} tokens but the model's context is {context} tokens; shorten it")
        prompts.append(ids[0])
    max_new = min(args.max_new_tokens, model.config.max_position_embeddings - max(len(p) for p in prompts))

    # -------------------------------------------------------------------------
    # generate: one prompt streams (decode the whole answer each time and print what is new: keeps multi-byte
    # characters whole); several print one after another once all are done
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
    generator = torch.Generator(device=device).manual_seed(args.seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    answers, printed, stats = [[] for _ in prompts], "", []
    stream = len(prompts) == 1
    t0 = time.perf_counter()
    try:
        steps = generate(model, prompts, max_new, args.temperature, args.top_p, eos, generator, modes=modes,
                         stats=stats, cuda_graph=not args.no_cuda_graph)
        for i, tokens in enumerate(steps):
            if i == 0:
                sync()
                t1 = time.perf_counter()  # the first tokens come out of the prefill
            for answer, t in zip(answers, tokens):
                if t is not None:
                    answer.append(t)
            if stream:
                out = tokenizer.decode(answers[0], skip_special_tokens=True)
                if not out.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                    print(out[len(printed):], end="", flush=True)
                    printed = out
    except torch.cuda.OutOfMemoryError:
        fail(f"out of GPU memory for {len(prompts)} prompt(s) of up to {max(len(p) for p in prompts)} tokens and "
             f"{max_new} new ones; give fewer or shorter prompts, or lower --max-new-tokens")
    sync()
    t2 = time.perf_counter()
    if stream:
        print()
    else:
        for b, (name, answer) in enumerate(zip(args.prompt, answers)):
            print(f"{chr(10) if b else ''}==> {'standard input' if name == '-' else name} <==")
            print(tokenizer.decode(answer, skip_special_tokens=True))

    # -------------------------------------------------------------------------
    # what ran: timings, routing, cache size per prompt (stderr, and --stats-json for machines)
    steps_run = max(len(a) for a in answers) - 1
    decode_tps = sum(max(len(a) - 1, 0) for a in answers) / max(t2 - t1, 1e-9)
    size = f"prompt tokens: {len(prompts[0])}" if stream else f"{len(prompts)} prompts, {sum(map(len, prompts))} tokens"
    print(f"{size} | prefill: {(t1 - t0) * 1e3:.1f} ms | decode: {steps_run} {'tokens' if stream else 'steps'}, "
          f"{decode_tps:.1f} tokens/s", file=sys.stderr)
    records = []
    for name, ids, answer, st in zip(args.prompt, prompts, answers, stats):
        out = dict(prompt=name, prompt_tokens=len(ids), new_tokens=len(answer), prefill_ms=(t1 - t0) * 1e3,
                   decode_tokens_per_s=decode_tps, kv_bytes=st["kv_bytes"], kv_bytes_dense=st["kv_bytes_dense"])
        header = "" if stream else f"{name}: "
        routing = st["routing"]
        if routing is not None:
            letters = "FSXK"  # FA, SSA, XA, SK: one character per KV head
            rows = ["".join(letters[m] for m in layer) for layer in routing.modes[0].tolist()]
            source = "routers" if args.routers else args.modes or f"static hybrid, sparse ratio {args.sparse_ratio}"
            ec = model.elastic
            out.update(omega=routing.omega[0].item(), modes=rows, mode_pair=ec.mode_pair, sink=ec.sink,
                       window=ec.window, source=source)
            print(f"{header}routing ({source}, {ec.mode_pair}, sink {ec.sink}, window {ec.window}): "
                  f"Omega {out['omega']:.3f}; modes per layer (F=FA S=SSA X=XA K=SK):", file=sys.stderr)
            for i in range(0, len(rows), 10):
                print(f"  layers {i:2d}-{min(i + 9, len(rows) - 1):2d}: {' '.join(rows[i:i + 10])}", file=sys.stderr)
        mib = 2 ** 20
        print(f"{header}KV cache: {out['kv_bytes'] / mib:.2f} MiB vs {out['kv_bytes_dense'] / mib:.2f} MiB dense "
              f"({out['kv_bytes'] / out['kv_bytes_dense']:.1%})", file=sys.stderr)
        records.append(out)
    if args.stats_json:
        tmp = f"{args.stats_json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(records, f, indent=2)
        os.replace(tmp, args.stats_json)


if __name__ == "__main__":
    main()
