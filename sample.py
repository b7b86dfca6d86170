"""
Generate text from prompt files, streaming to stdout, with dense or elastic attention (arXiv 2601.17367).

    python sample.py --prompt prompts/long.txt --routers fa-ssa      # Elastic Attention, routers shipped in routers/
    python sample.py --prompt prompts/capital.txt                    # the embedded SmolLM2-135M-Instruct, dense
    python sample.py --prompt a.txt --prompt b.txt                   # several prompts, decoded together
    python sample.py --prompt long.txt --routers out-routers         # ... or routers you trained (train.py)
    python sample.py --prompt long.txt --sparse-ratio 0.7            # static hybrid: 30% of KV heads full
    python sample.py --prompt long.txt --modes all-ssa               # every head streaming
    echo "Why is the sky blue?" | python sample.py --prompt -         # prompt from stdin

Each prompt goes through the tokenizer's chat template (skip it with --raw) and is prefilled once: with routers,
each layer's router picks every KV head's mode from that prompt's keys (router.py) and the fused kernel runs all
heads (kernel.py). All prompts then decode together (generate.py); streaming (SSA) heads keep only their sink and
window in the KV cache. One prompt streams its answer to stdout; several print their answers one after another,
each under a header line `==> FILE <==` (as `head` does). Timings, the routing map and the cache size go to stderr.
"""
import argparse
import json
import sys
import time

import torch

from cli import check_device, checkpoint_dir, fail, load_model, load_tokenizer, routers_dir, write_atomic
from router import MODE_IDS, MODE_PAIRS, ElasticConfig

ELASTIC_FLAGS = ("mode_pair", "sink", "window")  # override the routers' own ElasticConfig


def parse_args(argv=None):
    """The flags, every user error one line before anything heavy loads."""
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
    parser.error = lambda message: fail(f"{message} (python sample.py --help lists the flags)")  # one line
    args = parser.parse_args(argv)
    if sum(x is not None for x in (args.routers, args.sparse_ratio, args.modes)) > 1:
        parser.error("choose one of --routers, --sparse-ratio and --modes")
    for ok, message in ((args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens}: generate at least 1 "
                         "token"),
                        (args.temperature >= 0, f"--temperature {args.temperature}: use 0 (greedy) or a positive "
                         "temperature"),
                        (0 < args.top_p <= 1, f"--top-p {args.top_p}: the nucleus mass must lie in (0, 1]"),
                        (args.sparse_ratio is None or 0 <= args.sparse_ratio <= 1,
                         f"--sparse-ratio {args.sparse_ratio}: the share of sparse heads must lie in [0, 1]"),
                        (args.prompt.count("-") <= 1, "--prompt -: stdin can be read once only")):
        if not ok:
            fail(message)
    try:
        check_device(args.device)
        if args.model is not None:
            checkpoint_dir(args.model)
        if args.routers is not None:
            args.routers = routers_dir(args.routers)
        ElasticConfig(**overrides(args))
    except ValueError as e:
        fail(str(e).replace("sink must", "--sink must").replace("window must", "--window must"))
    return args


def overrides(args):
    """The ElasticConfig fields given on the command line."""
    return {k: getattr(args, k) for k in ELASTIC_FLAGS if getattr(args, k) is not None}


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


def elastic_setup(model, tokenizer, args):
    """How each KV head's mode is picked: routers (model.routers), a static hybrid or one mode for all (fixed modes
    [1, L, G]), or none (dense). -> the fixed modes, or None."""
    from router import Routers
    from static_hybrid import static_hybrid_modes
    try:
        if args.routers:
            model.routers = Routers.load(args.routers, model.config).to(model.output_weight().device)
            model.elastic = ElasticConfig(**{**vars(model.routers.elastic), **overrides(args)})
        else:
            model.elastic = ElasticConfig(**overrides(args))
        if args.modes:
            return model.fixed_modes(MODE_IDS[args.modes[4:].upper()])
        if args.sparse_ratio is not None:  # rank heads on a few retrieval prompts (static_hybrid.py)
            return static_hybrid_modes(model, tokenizer, args.sparse_ratio)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    return None


def encode_prompts(tokenizer, texts, args, model_dir, context):
    """Token ids [T] of each prompt, through the chat template unless --raw; each must leave room for an answer."""
    prompts = []
    for name, text in zip(args.prompt, texts):
        if args.raw:
            ids = tokenizer(text, return_tensors="pt").input_ids
        else:
            if tokenizer.chat_template is None:
                fail(f"the tokenizer in {model_dir} has no chat template; use --raw")
            ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True).input_ids
        if ids.shape[1] + 1 > context:
            fail(f"the prompt {name!r} has {ids.shape[1]} tokens but the model's context is {context} tokens; "
                 "shorten it")
        prompts.append(ids[0])
    return prompts


def run_generation(model, tokenizer, prompts, max_new, modes, args):
    """Generates; one prompt streams (the whole answer decoded each time and what is new printed: multi-byte
    characters stay whole), several print one after another at the end. -> (answers as token lists, stats per
    prompt, prefill seconds, decode seconds)."""
    from generate import generate
    device = model.output_weight().device
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
    return answers, stats, t1 - t0, t2 - t1


def report(model, args, prompts, answers, stats, prefill_s, decode_s):
    """What ran, on stderr: timings, and per prompt the routing (Omega and one letter per KV head and layer) and the
    KV-cache size against a dense cache; with --stats-json the same as a list, one entry per prompt."""
    stream = len(prompts) == 1
    steps_run = max(len(a) for a in answers) - 1
    decode_tps = sum(max(len(a) - 1, 0) for a in answers) / max(decode_s, 1e-9)
    size = f"prompt tokens: {len(prompts[0])}" if stream else f"{len(prompts)} prompts, {sum(map(len, prompts))} tokens"
    print(f"{size} | prefill: {prefill_s * 1e3:.1f} ms | decode: {steps_run} {'tokens' if stream else 'steps'}, "
          f"{decode_tps:.1f} tokens/s", file=sys.stderr)
    records = []
    for name, ids, answer, st in zip(args.prompt, prompts, answers, stats):
        out = dict(prompt=name, prompt_tokens=len(ids), new_tokens=len(answer), prefill_ms=prefill_s * 1e3,
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
        write_atomic(args.stats_json, json.dumps(records, indent=2))


def main():
    args = parse_args()
    texts = [read_prompt(name) for name in args.prompt]
    torch.manual_seed(args.seed)
    try:
        model_dir, _ = checkpoint_dir(args.model)  # the default model is converted here, once
    except ValueError as e:
        fail(e)
    model = load_model(model_dir, args.device, args.dtype)
    tokenizer = load_tokenizer(model_dir)
    modes = elastic_setup(model, tokenizer, args)
    context = model.config.max_position_embeddings
    prompts = encode_prompts(tokenizer, texts, args, model_dir, context)
    max_new = min(args.max_new_tokens, context - max(len(p) for p in prompts))
    answers, stats, prefill_s, decode_s = run_generation(model, tokenizer, prompts, max_new, modes, args)
    report(model, args, prompts, answers, stats, prefill_s, decode_s)


if __name__ == "__main__":
    main()
