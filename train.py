"""
Train the Attention Routers of a frozen model (Elastic Attention, arXiv 2601.17367; README: The method).

    python train.py                                        # SmolLM2-135M + the built-in synthetic mix
    python train.py --model path/to/Llama-3.1-8B-Instruct --data train.jsonl --max-len 32768
    torchrun --standalone --nproc_per_node=8 train.py --model path/to/Llama-3.1-8B-Instruct --data train.jsonl
    python train.py --out-dir out-routers --resume         # continue a run with its own arguments

Only the routers (one per layer) and two Lagrange multipliers per task class train; the backbone is frozen
(bf16 on the GPU). Every step samples each router's decision with a Gumbel-softmax straight-through estimator,
runs both branches of every KV head and mixes them by that decision, and takes
    loss = D + lambda1[c] * (Omega - t[c]) + lambda2[c] * (Omega - t[c])^2         (paper Eq. 8)
              + beta * mean(margin^2)                                               (ours, --margin-penalty)
which the routers minimise and the lambdas maximise (gradient ascent). D is the CE of the targets (--loss ce, as
the paper) or the KL divergence from the frozen dense model's next-token distribution on the same positions
(--loss kl, distillation as DuoAttention trains its gates: a task with no reference answer keeps the dense
model's behaviour; one no-grad dense pass more per step). Omega is the share of sparse KV heads,
t the target of the sample's task class (0.7 sensitive, 1.0 robust), margin the routers' sparse-minus-full logit
margin: kept small, it stays within reach of the Gumbel noise and the routers keep learning from the prompt.
Before step 0 the routers' input standardisation is set from the dense model's pooled keys (ours,
--calib-samples). The same code runs on one CPU process, one GPU or torchrun's N processes; the router gradients
are averaged across processes (data parallel).
The output dir holds routers.safetensors, elastic.json and routers.json; `sample.py --routers DIR` uses them.
Every flag is checked before anything loads. `--resume` takes the run's own arguments from routers.json (a flag
given again must agree, except --steps and those that only say how it runs). Each file of a checkpoint is written
to a temporary name and renamed, so a kill at any moment leaves the last checkpoint whole; Ctrl-C or SIGTERM
stops with one line that says where to resume (exit status 130).
"""
import argparse
import functools
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer

from data import IGNORE, ROBUST, SENSITIVE, JsonlDataset, SyntheticMix, collate
from cli import check_device, checkpoint_dir
from kernel import FA
from model import Transformer
from router import (MODE_PAIRS, TARGETS, TAU_END, TAU_FRAC, TAU_START, ElasticConfig, Routers, SparsityConstraint,
                    calibrate_routers, dense_pooled_keys, tau_schedule, warm_start_routers)

# Flags a resumed run may change: they say how it runs and reports, not what it trains (a new --steps stretches
# the schedules; the run says so).
RUN_ONLY = {"steps", "eval_every", "eval_samples", "save_every", "device", "fsdp", "grad_checkpointing", "overwrite",
            "workers"}
STOP = {signal.SIGINT, signal.SIGTERM}  # held back while a checkpoint is written (save in main)
RANK0 = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 reports
# Where the run stands, for the line an interrupt prints (the end of the file).
progress = dict(step=None, saved=None, out_dir=None)


def fail(message):
    """A user error: one line on stderr (under torchrun from rank 0 only), exit status 1, no traceback."""
    sys.exit("error: " + " ".join(str(message).split()) if RANK0 else 1)


def flag(name, value):
    """`--name value`, as it is typed on the command line."""
    value = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return f"--{name.replace('_', '-')} {value}"


def distillation_loss(logits, dense_logits, targets):
    """KL(dense || routed) of the next-token distributions at the trained positions (targets != -100), summed
    over the vocabulary, averaged over positions. Zero when the routed model is the dense one."""
    sel = targets != IGNORE
    routed = F.log_softmax(logits[sel].float(), -1)
    dense = F.log_softmax(dense_logits[sel].float(), -1)
    return F.kl_div(routed, dense, log_target=True, reduction="sum") / sel.sum().clamp(min=1)


def logged_step(line):
    """The step of a log.jsonl line; inf for a line that a kill cut short."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def main():
    # -------------------------------------------------------------------------
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HuggingFace checkpoint dir (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default="synthetic", help="'synthetic' (built-in mix) or a JSONL file of "
                        "{context, question, answer, task} records (README: Data)")
    parser.add_argument("--out-dir", default="out-routers", help="where routers, lambdas and the resume state go")
    parser.add_argument("--overwrite", action="store_true", help="start afresh in an --out-dir that already holds a "
                        "run (without it, such a dir is refused: resume it or pick another)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out-dir, with its own "
                        "arguments (flags given again must agree with them, except --steps, --eval-every, "
                        "--eval-samples, --save-every, --device, --fsdp, --grad-checkpointing)")
    # how routed heads run
    parser.add_argument("--mode-pair", default=ElasticConfig.mode_pair, choices=MODE_PAIRS,
                        help="{retrieval}-{sparse} modes")
    parser.add_argument("--sink", type=int, default=ElasticConfig.sink, help="SSA sink tokens")
    parser.add_argument("--window", type=int, default=ElasticConfig.window, help="SSA local window in tokens")
    parser.add_argument("--xa-threshold", type=float, default=ElasticConfig.xa_threshold,
                        help="XAttention cumulative block-mass threshold")
    parser.add_argument("--xa-stride", type=int, default=ElasticConfig.xa_stride, help="XAttention antidiagonal stride")
    parser.add_argument("--sk-k", type=int, default=ElasticConfig.sk_k, help="SK (SparseK): keys each query selects "
                        "beyond sink and window (FA-SK; its --window must be a multiple of 128)")
    parser.add_argument("--tail", type=int, default=16, help="ours: the routers also read the mean key of the prompt's "
                        "last TAIL tokens, beside the paper's boundary mean; 0: the paper's input alone (README: the "
                        "router)")
    # data
    parser.add_argument("--min-len", type=int, default=1024, help="synthetic mix: shortest sample, in tokens")
    parser.add_argument("--max-len", type=int, default=4096, help="longest sample in tokens (JSONL: contexts are cut)")
    parser.add_argument("--sensitive-frac", type=float, default=0.5, help="synthetic mix: share of retrieval samples")
    parser.add_argument("--answer-only", action="store_true", help="the loss on the answer only (paper: the whole "
                        "sequence)")
    parser.add_argument("--loss", default="ce", choices=["ce", "kl"], help="ce: cross-entropy of the targets (paper); "
                        "kl: KL from the frozen dense model's next-token distribution on the same positions "
                        "(distillation; README: Training)")
    parser.add_argument("--workers", type=int, default=2, help="processes that build batches ahead of the step")
    parser.add_argument("--pad-multiple", type=int, default=1024, help="pad each batch to a multiple of this many "
                        "tokens: few distinct lengths, so few FlexAttention compiles (padding changes no result)")
    # optimisation (paper Table 6)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=48, help="global batch in samples, over all processes")
    parser.add_argument("--micro-batch", type=int, default=1, help="samples per forward on each process")
    parser.add_argument("--lr", type=float, default=5e-4, help="router learning rate (peak)")
    parser.add_argument("--lambda-lr", type=float, default=1e-3, help="Lagrange multiplier learning rate (constant)")
    parser.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay of the routers")
    parser.add_argument("--warmup", type=float, default=0.2, help="share of steps of linear warm-up")
    parser.add_argument("--grad-clip", type=float, default=5.0, help="router gradient norm clip")
    parser.add_argument("--tau-start", type=float, default=TAU_START, help="Gumbel temperature at step 0")
    parser.add_argument("--tau-end", type=float, default=TAU_END,
                        help="Gumbel temperature after --tau-frac of the steps")
    parser.add_argument("--tau-frac", type=float, default=TAU_FRAC, help="share of steps over which tau anneals")
    parser.add_argument("--targets", type=float, nargs=2, default=TARGETS, metavar=("SENSITIVE", "ROBUST"),
                        help="Omega targets of the two task classes")
    parser.add_argument("--abs-linear", action="store_true", help="|Omega - t| in the linear term (released code)")
    parser.add_argument("--margin-penalty", type=float, default=1e-2, help="weight of the mean squared router logit "
                        "margin in the loss (ours; 0: off): keeps decisions within reach of the Gumbel noise, so the "
                        "routers keep learning from the prompt instead of freezing into per-head switches")
    parser.add_argument("--warm-start", type=int, default=0, help="ours: before step 0, teach the routers the task "
                        "class of this many training prompts from the dense model's pooled keys (0: off; README)")
    parser.add_argument("--warm-steps", type=int, default=200, help="full-batch steps of the warm start")
    parser.add_argument("--calib-samples", type=int, default=64, help="samples whose dense pooled keys set the "
                        "routers' input standardisation before step 0 (ours; README: Training)")
    parser.add_argument("--fsdp", action="store_true", help="under torchrun: shard the frozen backbone over the "
                        "processes (FSDP2) instead of a whole copy on each, for backbones that do not fit one GPU")
    parser.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="recompute each block in backward to save memory")
    # bookkeeping
    parser.add_argument("--eval-every", type=int, default=50, help="steps between held-out evaluations (0: never)")
    parser.add_argument("--eval-samples", type=int, default=16, help="held-out samples per evaluation")
    parser.add_argument("--save-every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, default=1337, help="seed of router init, data order and Gumbel noise")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="backbone dtype (default: bfloat16 on the GPU, float32 on the CPU)")
    parser.error = lambda message: fail(f"{message} (python train.py --help lists the flags)")  # one line, no usage
    args = parser.parse_args()
    for action in parser._actions:  # parsed again without defaults: only the flags on this command line
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args())
    master = RANK0

    # -------------------------------------------------------------------------
    # --resume: the run's own arguments (routers.json) and its state, both read before anything loads
    out_dir = Path(args.out_dir)
    state_file = out_dir / "train_state.pt"
    state, start = None, 0
    progress.update(step=0, out_dir=out_dir)
    held = [f.name for f in (state_file, out_dir / "routers.safetensors") if f.is_file()]
    if held and not args.resume and not args.overwrite:  # nothing a user made is overwritten unasked
        fail(f"--out-dir {out_dir} already holds a run ({', '.join(held)}); continue it with --resume, start afresh "
             "with --overwrite, or pick another --out-dir")
    if args.resume:
        try:
            state = torch.load(state_file, map_location="cpu")
            start = int(state["step"])
        except FileNotFoundError:
            fail(f"--resume: {state_file} does not exist; train without --resume first")
        except Exception as e:
            fail(f"--resume: cannot read {state_file} ({e}); resume another --out-dir or start again")
        try:
            saved = json.loads((out_dir / "routers.json").read_text())["args"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"--resume: cannot read the run's arguments from {out_dir / 'routers.json'} ({e})")
        saved.setdefault("tail", 0)  # a run from before --tail read the paper's input alone
        for name, value in saved.items():
            if name in ("out_dir", "resume") or name not in vars(args):
                continue  # the dir may have moved; a flag this version no longer has
            if name not in given:
                setattr(args, name, value)
            elif given[name] != value and name not in RUN_ONLY:
                fail(f"{flag(name, given[name])} contradicts the run in {out_dir} ({flag(name, value)[2:]}); "
                     "drop the flag or use another --out-dir")
        progress.update(step=start, saved=start)
        if start >= args.steps:  # exit status 0: nothing is wrong, there is just nothing left to do
            if master:
                print(f"the run in {out_dir} is already done: step {start} of --steps {args.steps}; "
                      "pass a larger --steps to train on")
            sys.exit(0)
        if master and "steps" in given and args.steps != saved.get("steps"):
            print(f"--steps {args.steps}: the run was started for {saved.get('steps')} steps; the learning-rate and "
                  "temperature schedules stretch to the new length from here on")

    # -------------------------------------------------------------------------
    # every flag in range before anything loads: a bad value is one line now, not a traceback minutes later
    for name, ok, want in (
            ("steps", args.steps >= 1, ">= 1"), ("batch_size", args.batch_size >= 1, ">= 1"),
            ("micro_batch", args.micro_batch >= 1, ">= 1"), ("workers", args.workers >= 0, ">= 0"),
            ("pad_multiple", args.pad_multiple >= 1, ">= 1"),
            ("min_len", 1 <= args.min_len <= args.max_len, f"in [1, --max-len {args.max_len}]"),
            ("sensitive_frac", 0 <= args.sensitive_frac <= 1, "in [0, 1]"),
            ("warmup", 0 <= args.warmup <= 1, "in [0, 1]"), ("lr", args.lr > 0, "> 0"),
            ("lambda_lr", args.lambda_lr >= 0, ">= 0"), ("grad_clip", args.grad_clip > 0, "> 0"),
            ("weight_decay", args.weight_decay >= 0, ">= 0"), ("margin_penalty", args.margin_penalty >= 0, ">= 0"),
            ("tau_start", args.tau_start > 0, "> 0"), ("tau_end", args.tau_end > 0, "> 0"),
            ("tau_frac", 0 < args.tau_frac <= 1, "in (0, 1]"),
            ("targets", all(0 <= t <= 1 for t in args.targets), "in [0, 1]"),
            ("calib_samples", args.calib_samples >= 0, ">= 0 (0: no input standardisation)"),
            ("warm_start", args.warm_start >= 0, ">= 0 (0: no warm start)"),
            ("warm_steps", args.warm_steps >= 1, ">= 1"),
            ("eval_every", args.eval_every >= 0, ">= 0 (0: never)"), ("eval_samples", args.eval_samples >= 1, ">= 1"),
            ("save_every", args.save_every >= 1, ">= 1"), ("sink", args.sink >= 0, ">= 0"),
            ("window", args.window >= 1, ">= 1")):
        if not ok:
            fail(f"{flag(name, getattr(args, name))} is out of range: it must be {want}")
    try:
        elastic = ElasticConfig(mode_pair=args.mode_pair, sink=args.sink, window=args.window,
                                xa_threshold=args.xa_threshold, xa_stride=args.xa_stride, sk_k=args.sk_k,
                                tail=args.tail)
        elastic.check_context(args.max_len)  # SK: k keys to select must exist in the longest sample
    except ValueError as e:
        fail(e)
    ddp = "RANK" in os.environ
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = world * args.micro_batch
    if args.batch_size % per_step:
        fail(f"--batch-size {args.batch_size} must be a multiple of processes x --micro-batch = {per_step}")
    accum = args.batch_size // per_step
    if args.fsdp and not ddp:
        fail("--fsdp shards the backbone over torchrun's processes: run it under torchrun "
             "(torchrun --standalone --nproc_per_node=N train.py --fsdp ...)")
    try:
        check_device(args.device)
        model_dir, _ = checkpoint_dir(args.model)
    except ValueError as e:
        fail(e)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        fail(f"cannot load the tokenizer from {model_dir}: {e}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # -------------------------------------------------------------------------
    # data: sample i of the stream is a pure function of i, so ranks take disjoint slices and resume is exact
    try:
        if args.data == "synthetic":
            dataset = SyntheticMix(tokenizer, args.min_len, args.max_len, seed=args.seed,
                                   sensitive_frac=args.sensitive_frac)
            heldout = SyntheticMix(tokenizer, args.min_len, args.max_len, seed=args.seed + 1,  # kinds, wordings,
                                   sensitive_frac=args.sensitive_frac, split="heldout")      # texts never trained
        elif not Path(args.data).is_file():
            fail(f"--data {args.data}: no such file; pass a JSONL file of records (README: Data) or 'synthetic'")
        else:
            dataset = JsonlDataset(args.data, tokenizer, args.max_len)  # checks every line: names the bad one
            heldout = None  # a JSONL file has no held-out split here; pass one as --data to sample.py/eval.py instead
    except (OSError, ValueError) as e:
        fail(e)

    # -------------------------------------------------------------------------
    # processes: one code path for 1 CPU process, 1 GPU or torchrun's N
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill from a shell or a scheduler: like Ctrl-C
    if ddp:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        rank = 0
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # -------------------------------------------------------------------------
    # model: frozen backbone + fresh routers (the same initial routers on every rank: same seed, then a broadcast)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # With --fsdp each process reads the checkpoint into host memory and keeps only its shard on the device.
    try:
        model = Transformer.from_pretrained(model_dir, device="cpu" if args.fsdp else device, dtype=dtype)
    except Exception as e:  # a truncated or corrupt weight file, tensors that do not fit the config
        weights = "model.safetensors.index.json" if (model_dir / "model.safetensors.index.json").is_file() \
            else "model.safetensors"
        fail(f"cannot load the model from {model_dir} ({weights}): {e}")
    torch.manual_seed(args.seed)
    model.elastic = elastic
    model.routers = routers = Routers(model.config.num_hidden_layers, model.config.head_dim, elastic).to(device)
    model.grad_checkpointing = args.grad_checkpointing
    if args.fsdp:
        # FSDP2 (per-parameter sharding): each block's frozen weights live as 1/N shards, all-gathered for its
        # forward (and for the recompute in backward) and freed after. The routers stay whole on every rank
        # (ignored_params): they are tiny, and their gradients are averaged below like in plain data parallel.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (world,))
        keep = set(routers.parameters())
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, ignored_params=keep)
        fully_shard(model, mesh=mesh, ignored_params=keep)  # embeddings, final norm, head; moves buffers too
        routers.to(device)
        backbone = [p for p in model.parameters() if p not in keep]
        if master:
            print(f"FSDP2: {sum(p.numel() for p in backbone):,} backbone parameters, "
                  f"{sum(p.to_local().numel() for p in backbone):,} of them held by each process")
    constraint = SparsityConstraint(tuple(args.targets), args.abs_linear).to(device)
    params = list(routers.parameters()) + list(constraint.parameters())
    if ddp:
        for p in params:
            dist.broadcast(p.data, src=0)
    torch.manual_seed(args.seed + rank)  # Gumbel noise differs across ranks, as their samples do

    optimizer = torch.optim.AdamW(routers.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    lambda_optimizer = torch.optim.AdamW(constraint.parameters(), lr=args.lambda_lr, betas=(0.9, 0.95),
                                         weight_decay=0.0, maximize=True)  # the lambdas ascend

    def get_lr(step):
        """Linear warm-up over --warmup of the steps, then cosine decay to zero."""
        warm = max(1, int(args.warmup * args.steps))
        if step < warm:
            return args.lr * (step + 1) / warm
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))

    if state is not None:  # --resume (read above)
        routers.load_state_dict(state["routers"])
        constraint.load_state_dict(state["constraint"])
        optimizer.load_state_dict(state["optimizer"])
        lambda_optimizer.load_state_dict(state["lambda_optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        if master:
            print(f"resumed from {state_file} at step {start}")

    # This rank's micro-batches, step by step, built ahead by --workers processes (samples take tens of ms each)
    indices = [[(step * args.batch_size + (rank * accum + micro) * args.micro_batch + b) % len(dataset)
                for b in range(args.micro_batch)] for step in range(start, args.steps) for micro in range(accum)]
    loader = iter(torch.utils.data.DataLoader(
        dataset, batch_sampler=indices, num_workers=args.workers, collate_fn=functools.partial(
            collate, pad_id=pad_id, answer_only=args.answer_only, pad_multiple=args.pad_multiple)))

    def get_batch():
        batch = next(loader)
        return batch.to(device), int(batch.lengths.sum())  # its real tokens, counted on the host (no device sync)

    def cross_entropy(logits, targets):
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)

    @torch.no_grad()
    def evaluate():
        """Held-out CE of the routed model (argmax routing, the fused kernel on the GPU) next to the dense model's,
        and Omega, per task class: the routers should keep CE near dense while sensitive and robust tasks split.
        Also the routers' logit margins against the gap the task class makes in them (see below)."""
        L, G = model.config.num_hidden_layers, model.config.num_key_value_heads
        sums = torch.zeros(2, 4, device=device)  # per class: dense CE, routed CE, Omega, count
        margins = torch.zeros(2, 2, L, G, device=device)  # per class: sums of the sparse-minus-full margin, |margin|
        # Every rank runs the same number of forwards (FSDP's all-gathers must pair up); a rank short of samples
        # repeats sample 0 and counts it with weight 0.
        for j in range(-(-args.eval_samples // world)):
            i = j * world + rank
            weight = float(i < args.eval_samples)
            sample = heldout[i if weight else 0]
            batch = collate([sample], pad_id, answer_only=True, pad_multiple=args.pad_multiple).to(device)
            dense = cross_entropy(model(batch.input_ids, modes=model.fixed_modes(FA)),
                                  batch.targets)
            logits, routing = model(batch.input_ids, prompt_lens=batch.prompt_lens, return_routing=True)
            c = batch.task_class.item()
            sums[c] += weight * torch.stack([dense, cross_entropy(logits, batch.targets), routing.omega[0],
                                             torch.ones((), device=device)])
            margin = routing.margin[0]  # [L, G]
            margins[c] += weight * torch.stack([margin, margin.abs()])
        if ddp:
            dist.all_reduce(sums)
            dist.all_reduce(margins)
        mean = sums[:, :3] / sums[:, 3:].clamp(min=1)
        out = {name: [round(x, 4) for x in mean[c].tolist()]
               for c, name in ((SENSITIVE, "sensitive"), (ROBUST, "robust"))}
        # Is the routing reading the prompt? (a diagnostic of ours) Per head: the mean |margin| (how sure the router
        # is) against the gap between the classes' mean margins (how much the task moves it). A router that ends as
        # fixed per-head switches shows margins far above the gap, and then its Gumbel noise and gradient die out.
        per_head = margins / sums[:, 3, None, None, None].clamp(min=1)      # [class, (margin, |margin|), L, G]
        size = margins[:, 1].sum(0) / sums[:, 3].sum().clamp(min=1)          # [L, G] mean |margin| over all samples
        out["margin"] = round(size.median().item(), 3)
        gap = (per_head[ROBUST, 0] - per_head[SENSITIVE, 0]).abs().median().item() if bool((sums[:, 3] > 0).all()) \
            else float("nan")  # a class absent from the held-out samples
        out["class_gap"] = round(gap, 3)
        return out

    def save(step, final=False):
        """Routers (routers.json with the run's arguments first: --resume reads them), then the training state.
        Each file goes to a temporary name and is renamed over the old one, and Ctrl-C / SIGTERM wait until both
        are written: whenever the run dies, the dir holds a checkpoint that --resume loads."""
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP)
        try:
            extra = dict(step=step, lambda1=constraint.lambda1.tolist(), lambda2=constraint.lambda2.tolist(),
                         targets=list(args.targets), args=vars(args))
            routers.save(out_dir, model.config, extra=extra)
            tmp = state_file.with_name(f".{state_file.name}.tmp")
            torch.save(dict(routers=routers.state_dict(), constraint=constraint.state_dict(),
                            optimizer=optimizer.state_dict(), lambda_optimizer=lambda_optimizer.state_dict(),
                            step=step, rng_cpu=torch.get_rng_state(),
                            rng_cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None), tmp)
            os.replace(tmp, state_file)
            progress["saved"] = step
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP)  # a signal that came meanwhile is raised now
        print(f"{'final' if final else 'checkpoint'}: routers at step {step} saved to {out_dir}")

    # -------------------------------------------------------------------------
    # the routers' input standardisation (ours): from the dense model's pooled keys, before step 0 (a resumed run
    # has it in its saved routers)
    def stream_batches(count, desc):
        """The first `count` samples of the training stream, split over the processes; each runs the same number of
        forwards (FSDP's all-gathers must pair up)."""
        per_rank = -(-count // world)
        mine = [dataset[(rank * per_rank + i) % len(dataset)] for i in range(per_rank)]
        for i in tqdm(range(0, per_rank, args.micro_batch), desc=desc, disable=not master, dynamic_ncols=True,
                      leave=False):
            yield collate(mine[i:i + args.micro_batch], pad_id, pad_multiple=args.pad_multiple).to(device)

    if start == 0 and args.calib_samples > 0:
        n = calibrate_routers(model, ((b.input_ids, b.prompt_lens) for b in stream_batches(
            args.calib_samples, "calibrating router inputs")), reduce=dist.all_reduce if ddp else None)
        if master:
            print(f"router inputs standardised from {n:,} pooled key vectors per layer (dense model)")
    if start == 0 and args.warm_start > 0:  # ours: routers that read the task from step 0 (README: Training)
        batches = list(stream_batches(args.warm_start, "warm start: pooled keys"))
        keys = torch.cat(list(dense_pooled_keys(model, ((b.input_ids, b.prompt_lens) for b in batches),
                                                elastic.boundary, elastic.tail)), 1)  # [L, N, G, D or 2D]
        labels = torch.cat([b.task_class for b in batches])
        if ddp:  # every rank fits all ranks' prompts (as many on each), then takes rank 0's routers
            def gather(x):
                parts = [torch.empty_like(x) for _ in range(world)]
                dist.all_gather(parts, x.contiguous())
                return torch.cat(parts)
            keys, labels = gather(keys.transpose(0, 1)).transpose(0, 1), gather(labels)
        acc = warm_start_routers(routers, keys.float(), labels, steps=args.warm_steps,
                                 margin_penalty=args.margin_penalty)
        if ddp:
            for p in routers.parameters():
                dist.broadcast(p.data, src=0)
        if master:
            print(f"warm start: routers taught the task class of {len(labels)} prompts in {args.warm_steps} steps, "
                  f"{100 * acc:.1f}% of heads routed to their class")

    # -------------------------------------------------------------------------
    # training loop
    if master:
        n_router = sum(p.numel() for p in routers.parameters())
        print(f"model {model_dir}: {model.config.num_hidden_layers} layers x {model.config.num_key_value_heads} KV "
              f"heads, {n_router:,} router parameters | {elastic} | {world} process(es) x {args.micro_batch} x "
              f"{accum} accum = batch {args.batch_size} | device {device}")
        out_dir.mkdir(parents=True, exist_ok=True)
        log_file = out_dir / "log.jsonl"  # the same numbers as the printed lines, for plotting
        if start and log_file.is_file():  # steps logged after the checkpoint run again from it: drop their lines
            tmp = log_file.with_name(f".{log_file.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in log_file.read_text().splitlines()
                                   if logged_step(line) <= start))
            os.replace(tmp, log_file)
        log = open(log_file, "a")
    dense_modes = model.fixed_modes(FA)
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not master, dynamic_ncols=True)
    for step in bar:
        progress["step"] = step
        t0 = time.perf_counter()
        lr, tau = get_lr(step), tau_schedule(step, args.steps, args.tau_start, args.tau_end, args.tau_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats = torch.zeros(2, 4, device=device)  # per class: sums of CE, Omega, loss; count
        tokens = 0
        for micro in range(accum):
            batch, n_tokens = get_batch()
            logits, routing = model(batch.input_ids, prompt_lens=batch.prompt_lens, tau=tau, return_routing=True)
            ce = cross_entropy(logits, batch.targets)
            fit = ce  # what the routers fit; the log shows CE either way
            if args.loss == "kl":
                with torch.no_grad():
                    dense = model(batch.input_ids, modes=dense_modes)
                fit = distillation_loss(logits, dense, batch.targets)
            loss = fit + constraint(routing.omega, batch.task_class) + args.margin_penalty * routing.margin.pow(2).mean()
            (loss / accum).backward()
            for c in (SENSITIVE, ROBUST):
                sel = batch.task_class == c
                n = sel.sum()
                stats[c] += torch.stack([ce.detach() * n, routing.omega.detach()[sel].sum(), loss.detach() * n,
                                         n.float()])
            tokens += n_tokens
        if ddp:  # data parallel over the router parameters and lambdas: average their gradients once per step
            grads = [p.grad for p in params]
            flat = torch.cat([g.flatten() for g in grads])
            dist.all_reduce(flat)
            flat /= world
            for g, new in zip(grads, flat.split([g.numel() for g in grads])):
                g.copy_(new.view_as(g))
            dist.all_reduce(stats)
        grad_norm = torch.nn.utils.clip_grad_norm_(routers.parameters(), args.grad_clip)
        optimizer.step()
        lambda_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        lambda_optimizer.zero_grad(set_to_none=True)

        # one line per step on rank 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        ce_c, om_c, _ = (stats[:, :3] / stats[:, 3:]).T.tolist()  # nan for a class absent from the step
        total = stats.sum(0)
        if master:
            line = dict(step=step + 1, loss=(total[2] / total[3]).item(), ce=(total[0] / total[3]).item(),
                        omega_sensitive=om_c[SENSITIVE], omega_robust=om_c[ROBUST], ce_sensitive=ce_c[SENSITIVE],
                        ce_robust=ce_c[ROBUST], lambda1=constraint.lambda1.tolist(),
                        lambda2=constraint.lambda2.tolist(), tau=tau, lr=lr, grad_norm=grad_norm.item(),
                        tokens_per_s=tokens * world / dt)
            tqdm.write(f"step {step + 1} | loss {line['loss']:.4f} | ce {line['ce']:.4f} | omega sens "
                       f"{om_c[SENSITIVE]:.3f} robust {om_c[ROBUST]:.3f}"
                       f" | lambda1 {line['lambda1'][0]:+.3f} {line['lambda1'][1]:+.3f}"
                       f" lambda2 {line['lambda2'][0]:+.3f} {line['lambda2'][1]:+.3f}"
                       f" | tau {tau:.3f} | lr {lr:.2e} | {line['tokens_per_s']:.0f} tok/s")
        if heldout is not None and args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            ev = evaluate()
            if master:
                line["eval"] = ev
                tqdm.write(f"eval step {step + 1} | [dense CE, routed CE, omega] sensitive {ev['sensitive']} "
                           f"robust {ev['robust']} | router margin {ev['margin']} vs class gap {ev['class_gap']}")
        if master:
            log.write(json.dumps(line) + "\n")
            log.flush()
            if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                save(step + 1)
    progress["step"] = args.steps

    # -------------------------------------------------------------------------
    # the routers must be identical on every rank; then save and shut down
    if ddp:
        mine = torch.cat([p.detach().flatten() for p in params])
        ref = mine.clone()
        dist.broadcast(ref, src=0)
        diff = (mine - ref).abs().max()
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        if master:
            print(f"routers in sync across {world} processes: max |difference| {diff.item():.3e}")
    if master:
        save(args.steps, final=True)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; save() never leaves a checkpoint half-written
        if RANK0:
            step, saved, out_dir = progress["step"], progress["saved"], progress["out_dir"]
            print(f"interrupted at step {step or 0}; " + (
                f"the last checkpoint (step {saved}) is in {out_dir}: resume with python train.py --out-dir "
                f"{shlex.quote(str(out_dir))} --resume" if saved is not None else "no checkpoint saved yet, nothing to "
                "resume"), file=sys.stderr)
        sys.exit(130)
