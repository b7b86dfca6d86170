"""
Train the Attention Routers of a frozen model (Elastic Attention, arXiv 2601.17367, Sec. 3; docs/design.md).

    python train.py                                        # SmolLM2-135M + the built-in synthetic mix
    python train.py --model path/to/Llama-3.1-8B-Instruct --data train.jsonl --max-len 32768
    torchrun --standalone --nproc_per_node=8 train.py --model path/to/Llama-3.1-8B-Instruct --data train.jsonl
    python train.py --out-dir out-routers --resume         # continue a run with its own arguments

Only the routers (one per layer) and two Lagrange multipliers per task class train; the backbone is frozen
(bf16 on the GPU). Every step samples each router's decision with a Gumbel-softmax straight-through estimator,
runs both branches of every KV head and mixes them by that decision, and takes
    loss = D + lambda1[c] * (Omega - t[c]) + lambda2[c] * (Omega - t[c])^2         (paper Eq. 8)
              + beta * mean(margin^2)                                               (ours, --margin-penalty)
which the routers minimise and the lambdas maximise (gradient ascent); `train_step` is where it stands. D is the CE
of the targets (--loss ce, as the paper) or the KL divergence from the frozen dense model's next-token distribution
on the same positions (--loss kl, distillation as DuoAttention trains its gates). Omega is the share of sparse KV
heads, t the target of the sample's task class (0.7 sensitive, 1.0 robust), margin the routers' sparse-minus-full
logit margin: kept small, it stays within reach of the Gumbel noise and the routers keep learning from the prompt.
Before step 0 the routers' input standardisation is set from the dense model's pooled keys (ours, --calib-samples).
The same code runs on one CPU process, one GPU or torchrun's N processes; the router gradients are averaged across
processes (data parallel).

The output dir holds routers.safetensors, elastic.json and routers.json; `sample.py --routers DIR` uses them.
Every flag is checked before anything loads (TrainConfig). `--resume` takes the run's own arguments from
routers.json (a flag given again must agree, except --steps and those that only say how it runs). Each file of a
checkpoint is written to a temporary name and renamed, so a kill at any moment leaves the last checkpoint whole;
Ctrl-C or SIGTERM stops with one line that says where to resume (exit status 130).
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
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from cli import check_device, checkpoint_dir, fail, load_model, load_tokenizer
from data import IGNORE, ROBUST, SENSITIVE, JsonlDataset, SyntheticMix, collate
from kernel import FA
from router import (MODE_PAIRS, TARGETS, TAU_END, TAU_FRAC, TAU_START, ElasticConfig, Routers, SparsityConstraint,
                    calibrate_routers, dense_pooled_keys, tau_schedule, warm_start_routers)

STOP = {signal.SIGINT, signal.SIGTERM}  # held back while a checkpoint is written (save_checkpoint)
# Where the run stands, for the line an interrupt prints (the end of the file).
progress = dict(step=None, saved=None, out_dir=None)

# -----------------------------------------------------------------------------
# the run's configuration: every flag's default, help and range in one place


def arg(default, help, want=None, ok=None, **argparse_kw):
    """A TrainConfig field: its default, its --help line, and its range (ok(value) is True when `want` holds)."""
    return field(default=default, metadata=dict(help=help, want=want, ok=ok, kw=argparse_kw))


@dataclass
class TrainConfig:
    # where
    model: str = arg(None, "HuggingFace checkpoint dir (default: SmolLM2-135M-Instruct)")
    data: str = arg("synthetic", "'synthetic' (built-in mix) or a JSONL file of {context, question, answer, task} "
                    "records (docs/training.md: Data)")
    out_dir: str = arg("out-routers", "where routers, lambdas and the resume state go")
    overwrite: bool = arg(False, "start afresh in an --out-dir that already holds a run (without it, such a dir is "
                          "refused: resume it or pick another)")
    resume: bool = arg(False, "continue the run saved in --out-dir, with its own arguments (flags given again must "
                       "agree with them, except --steps, --eval-every, --eval-samples, --save-every, --device, "
                       "--fsdp, --grad-checkpointing)")
    # how routed heads run
    mode_pair: str = arg(ElasticConfig.mode_pair, "{retrieval}-{sparse} modes", choices=MODE_PAIRS)
    sink: int = arg(ElasticConfig.sink, "SSA sink tokens", ">= 0", lambda v: v >= 0)
    window: int = arg(ElasticConfig.window, "SSA local window in tokens", ">= 1", lambda v: v >= 1)
    xa_threshold: float = arg(ElasticConfig.xa_threshold, "XAttention cumulative block-mass threshold")
    xa_stride: int = arg(ElasticConfig.xa_stride, "XAttention antidiagonal stride")
    sk_k: int = arg(ElasticConfig.sk_k, "SK (SparseK): keys each query selects beyond sink and window (FA-SK; its "
                    "--window must be a multiple of 128)")
    tail: int = arg(ElasticConfig.tail, "ours: the routers also read the mean key of the prompt's last TAIL tokens, "
                    "beside the paper's boundary mean; 0: the paper's input alone (docs/design.md: The router)")
    # data
    min_len: int = arg(1024, "synthetic mix: shortest sample, in tokens")
    max_len: int = arg(4096, "longest sample in tokens (JSONL: contexts are cut)")
    sensitive_frac: float = arg(0.5, "synthetic mix: share of retrieval samples", "in [0, 1]", lambda v: 0 <= v <= 1)
    answer_only: bool = arg(False, "the loss on the answer only (paper: the whole sequence)")
    loss: str = arg("ce", "ce: cross-entropy of the targets (paper); kl: KL from the frozen dense model's next-token "
                    "distribution on the same positions (distillation; docs/training.md)", choices=["ce", "kl"])
    workers: int = arg(2, "processes that build batches ahead of the step", ">= 0", lambda v: v >= 0)
    pad_multiple: int = arg(1024, "pad each batch to a multiple of this many tokens: few distinct lengths, so few "
                            "FlexAttention compiles (padding changes no result)", ">= 1", lambda v: v >= 1)
    # optimisation (paper Table 6)
    steps: int = arg(300, "optimizer steps", ">= 1", lambda v: v >= 1)
    batch_size: int = arg(48, "global batch in samples, over all processes", ">= 1", lambda v: v >= 1)
    micro_batch: int = arg(1, "samples per forward on each process", ">= 1", lambda v: v >= 1)
    lr: float = arg(5e-4, "router learning rate (peak)", "> 0", lambda v: v > 0)
    lambda_lr: float = arg(1e-3, "Lagrange multiplier learning rate (constant)", ">= 0", lambda v: v >= 0)
    weight_decay: float = arg(0.1, "AdamW weight decay of the routers", ">= 0", lambda v: v >= 0)
    warmup: float = arg(0.2, "share of steps of linear warm-up", "in [0, 1]", lambda v: 0 <= v <= 1)
    grad_clip: float = arg(5.0, "router gradient norm clip", "> 0", lambda v: v > 0)
    tau_start: float = arg(TAU_START, "Gumbel temperature at step 0", "> 0", lambda v: v > 0)
    tau_end: float = arg(TAU_END, "Gumbel temperature after --tau-frac of the steps", "> 0", lambda v: v > 0)
    tau_frac: float = arg(TAU_FRAC, "share of steps over which tau anneals", "in (0, 1]", lambda v: 0 < v <= 1)
    targets: tuple = arg(TARGETS, "Omega targets of the two task classes", "in [0, 1]",
                         lambda v: all(0 <= t <= 1 for t in v), metavar=("SENSITIVE", "ROBUST"))
    abs_linear: bool = arg(False, "|Omega - t| in the linear term (released code)")
    margin_penalty: float = arg(1e-2, "weight of the mean squared router logit margin in the loss (ours; 0: off): "
                                "keeps decisions within reach of the Gumbel noise, so the routers keep learning from "
                                "the prompt instead of freezing into per-head switches", ">= 0", lambda v: v >= 0)
    warm_start: int = arg(0, "ours: before step 0, teach the routers the task class of this many training prompts "
                          "from the dense model's pooled keys (0: off; docs/training.md)", ">= 0 (0: no warm start)",
                          lambda v: v >= 0)
    warm_steps: int = arg(200, "full-batch steps of the warm start", ">= 1", lambda v: v >= 1)
    calib_samples: int = arg(64, "samples whose dense pooled keys set the routers' input standardisation before "
                             "step 0 (ours; docs/training.md)", ">= 0 (0: no input standardisation)", lambda v: v >= 0)
    fsdp: bool = arg(False, "under torchrun: shard the frozen backbone over the processes (FSDP2) instead of a whole "
                     "copy on each, for backbones that do not fit one GPU")
    grad_checkpointing: bool = arg(True, "recompute each block in backward to save memory",
                                   action=argparse.BooleanOptionalAction)
    # bookkeeping
    eval_every: int = arg(50, "steps between held-out evaluations (0: never)", ">= 0 (0: never)", lambda v: v >= 0)
    eval_samples: int = arg(16, "held-out samples per evaluation", ">= 1", lambda v: v >= 1)
    save_every: int = arg(100, "steps between checkpoints", ">= 1", lambda v: v >= 1)
    seed: int = arg(1337, "seed of router init, data order and Gumbel noise")
    device: str = arg(None, "cuda or cpu (default: cuda if available)")
    dtype: str = arg(None, "backbone dtype (default: bfloat16 on the GPU, float32 on the CPU)",
                     choices=["float32", "bfloat16", "float16"])

    # Flags a resumed run may change: they say how it runs and reports, not what it trains (a new --steps stretches
    # the schedules; the run says so).
    RUN_ONLY = ("steps", "eval_every", "eval_samples", "save_every", "device", "fsdp", "grad_checkpointing",
                "overwrite", "workers")

    @classmethod
    def from_command_line(cls, argv=None):
        """The flags of this command line -> (config, the names of the flags given). A bad flag is one line."""
        parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
        for f in fields(cls):
            kw = dict(f.metadata["kw"], help=f.metadata["help"], default=f.default)
            if "action" not in kw and isinstance(f.default, bool):
                kw["action"] = "store_true"
            elif isinstance(f.default, tuple):
                kw.update(type=type(f.default[0]), nargs=len(f.default))
            elif "action" not in kw:
                kw["type"] = str if f.default is None else type(f.default)
            parser.add_argument("--" + f.name.replace("_", "-"), **kw)
        parser.error = lambda message: fail(f"{message} (python train.py --help lists the flags)")  # one line
        args = parser.parse_args(argv)
        for action in parser._actions:  # parsed again without defaults: only the flags on this command line
            action.default = argparse.SUPPRESS
        return cls(**vars(args)), vars(parser.parse_args(argv))

    def merge_saved(self, saved, given, out_dir):
        """--resume: the saved run's arguments, except the flags given again, which must agree (RUN_ONLY may
        change)."""
        saved.setdefault("tail", 0)  # a run from before --tail read the paper's input alone
        known = {f.name for f in fields(self)}
        for name, value in saved.items():
            if name in ("out_dir", "resume") or name not in known:
                continue  # the dir may have moved; a flag this version no longer has
            if name not in given:
                setattr(self, name, value)
            elif given[name] != value and name not in self.RUN_ONLY:
                fail(f"{flag(name, given[name])} contradicts the run in {out_dir} ({flag(name, value)[2:]}); "
                     "drop the flag or use another --out-dir")

    def check(self):
        """Every flag in range before anything loads: a bad value is one line now, not a traceback minutes later."""
        for f in fields(self):
            ok, want = f.metadata["ok"], f.metadata["want"]
            if ok is not None and not ok(getattr(self, f.name)):
                fail(f"{flag(f.name, getattr(self, f.name))} is out of range: it must be {want}")
        if not 1 <= self.min_len <= self.max_len:
            fail(f"{flag('min_len', self.min_len)} is out of range: it must be in [1, --max-len {self.max_len}]")
        try:
            elastic = ElasticConfig(mode_pair=self.mode_pair, sink=self.sink, window=self.window,
                                    xa_threshold=self.xa_threshold, xa_stride=self.xa_stride, sk_k=self.sk_k,
                                    tail=self.tail)
            elastic.check_context(self.max_len)  # SK: k keys to select must exist in the longest sample
        except ValueError as e:
            fail(e)
        return elastic


def flag(name, value):
    """`--name value`, as it is typed on the command line."""
    value = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
    return f"--{name.replace('_', '-')} {value}"

# -----------------------------------------------------------------------------
# the objective (paper Eq. 8) and one optimizer step


def cross_entropy(logits, targets):
    """Mean CE of the trained positions' logits [N, V] (the model's logits_at) against their targets [N]."""
    return F.cross_entropy(logits.float(), targets)


def distillation_loss(logits, dense_logits):
    """KL(dense || routed) of the next-token distributions at the trained positions (logits [N, V] of both),
    summed over the vocabulary, averaged over positions. Zero when the routed model is the dense one."""
    routed = F.log_softmax(logits.float(), -1)
    dense = F.log_softmax(dense_logits.float(), -1)
    return F.kl_div(routed, dense, log_target=True, reduction="sum") / max(len(logits), 1)


def train_step(model, micro_batches, constraint, cfg, tau, dense_modes):
    """The forward and backward of one step over its micro-batches -> per task class [sums of CE, Omega, loss;
    count] [2, 4], and the real tokens seen. Each KV head computes both branches, mixed by its router's Gumbel
    straight-through decision z at temperature tau (attention.mixed_attention), so Omega carries z's gradient."""
    stats = torch.zeros(2, 4, device=dense_modes.device)
    tokens = 0
    for batch, n_tokens, first in micro_batches:
        # the Gumbel noise of a micro-batch is a function of the seed and of its first sample's place in the stream:
        # one process or N draw the same noise for it, so N processes train the routers that one process trains
        # with the same global batch, and a resumed run continues exactly
        torch.manual_seed((cfg.seed << 32) + first)
        trained = batch.targets != IGNORE  # logits only where the loss is: [N, V], not [B, T, V]
        logits, routing = model(batch.input_ids, prompt_lens=batch.prompt_lens, tau=tau, return_routing=True,
                                logits_at=trained)
        ce = cross_entropy(logits, batch.targets[trained])
        fit = ce  # what the routers fit; the log shows CE either way
        if cfg.loss == "kl":
            with torch.no_grad():
                dense = model(batch.input_ids, modes=dense_modes, logits_at=trained)
            fit = distillation_loss(logits, dense)
        # paper Eq. 8: the task loss plus the Lagrangian that holds Omega at its task class's target (the lambdas
        # ascend on it), and ours: the squared margin that keeps the routers within reach of the Gumbel noise
        loss = fit + constraint(routing.omega, batch.task_class) + cfg.margin_penalty * routing.margin.pow(2).mean()
        (loss / len(micro_batches)).backward()
        for c in (SENSITIVE, ROBUST):
            sel = batch.task_class == c
            n = sel.sum()
            stats[c] += torch.stack([ce.detach() * n, routing.omega.detach()[sel].sum(), loss.detach() * n,
                                     n.float()])
        tokens += n_tokens
    return stats, tokens


def optimizer_step(routers, params, optimizer, lambda_optimizer, stats, cfg, proc):
    """Data parallel over the router parameters and lambdas: their gradients averaged once per step; then the routers
    descend and the lambdas ascend. -> the routers' gradient norm (before clipping)."""
    if proc.ddp:
        grads = [p.grad for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= proc.world
        for g, new in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(new.view_as(g))
        dist.all_reduce(stats)
    grad_norm = torch.nn.utils.clip_grad_norm_(routers.parameters(), cfg.grad_clip)
    optimizer.step()
    lambda_optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lambda_optimizer.zero_grad(set_to_none=True)
    return grad_norm


def lr_at(step, cfg):
    """Linear warm-up over --warmup of the steps, then cosine decay to zero."""
    warm = max(1, int(cfg.warmup * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))

# -----------------------------------------------------------------------------
# the phases of a run, in the order main() takes them


@dataclass
class Processes:
    """One code path for 1 CPU process, 1 GPU or torchrun's N: this process's place among them."""
    ddp: bool
    world: int
    rank: int = 0
    device: torch.device = None
    master: bool = True  # rank 0: prints, logs and saves


def resume_point(cfg, given):
    """--resume: the run's own arguments (routers.json) merged into cfg, and its state, both read before anything
    loads -> (state or None, the step to start from). Refuses to write over a run it was not told about."""
    out_dir = Path(cfg.out_dir)
    state_file = out_dir / "train_state.pt"
    progress.update(step=0, out_dir=out_dir)
    held = [f.name for f in (state_file, out_dir / "routers.safetensors") if f.is_file()]
    if held and not cfg.resume and not cfg.overwrite:  # nothing a user made is overwritten unasked
        fail(f"--out-dir {out_dir} already holds a run ({', '.join(held)}); continue it with --resume, start afresh "
             "with --overwrite, or pick another --out-dir")
    if not cfg.resume:
        return None, 0
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
    cfg.merge_saved(saved, given, out_dir)
    progress.update(step=start, saved=start)
    master = os.environ.get("RANK", "0") == "0"
    if start >= cfg.steps:  # exit status 0: nothing is wrong, there is just nothing left to do
        if master:
            print(f"the run in {out_dir} is already done: step {start} of --steps {cfg.steps}; "
                  "pass a larger --steps to train on")
        sys.exit(0)
    if master and "steps" in given and cfg.steps != saved.get("steps"):
        print(f"--steps {cfg.steps}: the run was started for {saved.get('steps')} steps; the learning-rate and "
              "temperature schedules stretch to the new length from here on")
    return state, start


def check_processes(cfg):
    """torchrun's processes as its environment names them (not yet started) -> (Processes, micro-batches per step)."""
    proc = Processes(ddp="RANK" in os.environ, world=int(os.environ.get("WORLD_SIZE", "1")))
    per_step = proc.world * cfg.micro_batch
    if cfg.batch_size % per_step:
        fail(f"--batch-size {cfg.batch_size} must be a multiple of processes x --micro-batch = {per_step}")
    if cfg.fsdp and not proc.ddp:
        fail("--fsdp shards the backbone over torchrun's processes: run it under torchrun "
             "(torchrun --standalone --nproc_per_node=N train.py --fsdp ...)")
    return proc, cfg.batch_size // per_step


def checked_model_dir(cfg):
    """--device and --model checked (the default model converted, once) -> the checkpoint dir."""
    try:
        check_device(cfg.device)
        return checkpoint_dir(cfg.model)[0]
    except ValueError as e:
        fail(e)


def load_data(cfg, tokenizer):
    """-> (training samples, held-out samples or None). Sample i of the stream is a pure function of i, so ranks take
    disjoint slices and resume is exact."""
    try:
        if cfg.data == "synthetic":
            dataset = SyntheticMix(tokenizer, cfg.min_len, cfg.max_len, seed=cfg.seed,
                                   sensitive_frac=cfg.sensitive_frac)
            heldout = SyntheticMix(tokenizer, cfg.min_len, cfg.max_len, seed=cfg.seed + 1,  # kinds, wordings,
                                   sensitive_frac=cfg.sensitive_frac, split="heldout")  # texts never trained
            return dataset, heldout
        if not Path(cfg.data).is_file():
            fail(f"--data {cfg.data}: no such file; pass a JSONL file of records (docs/training.md: Data) or "
                 "'synthetic'")
        # a JSONL file has no held-out split here; pass one as --data to sample.py/eval.py instead
        return JsonlDataset(cfg.data, tokenizer, cfg.max_len), None  # checks every line: names the bad one
    except (OSError, ValueError) as e:
        fail(e)


def start_processes(cfg, proc):
    """init_process_group under torchrun; this process's device."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a kill from a shell or a scheduler: like Ctrl-C
    if proc.ddp:
        proc.rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        use_cuda = torch.cuda.is_available() and cfg.device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        proc.device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(proc.device)
    else:
        proc.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    proc.master = proc.rank == 0


def build_model(cfg, model_dir, elastic, proc):
    """The frozen backbone with fresh routers (the same on every rank: one seed, then the broadcast in
    build_optimizers); with --fsdp the backbone sharded over the processes."""
    device = proc.device
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # With --fsdp each process reads the checkpoint into host memory and keeps only its shard on the device.
    model = load_model(model_dir, device="cpu" if cfg.fsdp else device, dtype=dtype)
    torch.manual_seed(cfg.seed)
    model.elastic = elastic
    model.routers = routers = Routers(model.config.num_hidden_layers, model.config.head_dim, elastic).to(device)
    model.grad_checkpointing = cfg.grad_checkpointing
    if cfg.fsdp:
        # FSDP2 (per-parameter sharding): each block's frozen weights live as 1/N shards, all-gathered for its
        # forward (and for the recompute in backward) and freed after. The routers stay whole on every rank
        # (ignored_params): they are tiny, and their gradients are averaged like in plain data parallel.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh(device.type, (proc.world,))
        keep = set(routers.parameters())
        for block in model.model.layers:
            fully_shard(block, mesh=mesh, ignored_params=keep)
        fully_shard(model, mesh=mesh, ignored_params=keep)  # embeddings, final norm, head; moves buffers too
        routers.to(device)
        backbone = [p for p in model.parameters() if p not in keep]
        if proc.master:
            print(f"FSDP2: {sum(p.numel() for p in backbone):,} backbone parameters, "
                  f"{sum(p.to_local().numel() for p in backbone):,} of them held by each process")
    return model, routers


def build_optimizers(cfg, routers, proc, state):
    """The Lagrangian's multipliers (their initial values the same on every rank: the seed, then a broadcast), AdamW
    for the routers (descent) and for the lambdas (ascent), restored from the resume state if there is one ->
    (constraint, optimizer, lambda_optimizer, every trained parameter)."""
    constraint = SparsityConstraint(tuple(cfg.targets), cfg.abs_linear).to(proc.device)
    params = list(routers.parameters()) + list(constraint.parameters())
    if proc.ddp:
        for p in params:
            dist.broadcast(p.data, src=0)
    optimizer = torch.optim.AdamW(routers.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    lambda_optimizer = torch.optim.AdamW(constraint.parameters(), lr=cfg.lambda_lr, betas=(0.9, 0.95),
                                         weight_decay=0.0, maximize=True)  # the lambdas ascend
    if state is not None:  # --resume
        routers.load_state_dict(state["routers"])
        constraint.load_state_dict(state["constraint"])
        optimizer.load_state_dict(state["optimizer"])
        lambda_optimizer.load_state_dict(state["lambda_optimizer"])
        if proc.master:
            print(f"resumed from {Path(cfg.out_dir) / 'train_state.pt'} at step {state['step']}")
    return constraint, optimizer, lambda_optimizer, params


def batch_stream(cfg, dataset, pad_id, start, accum, proc):
    """This rank's micro-batches from step `start` on, built ahead by --workers processes (samples take tens of ms
    each) -> an iterator of (batch on the device, its real tokens counted on the host: no device sync, the place of
    its first sample in the stream). Step s's global batch is samples s * batch_size on, whatever the processes."""
    firsts = [step * cfg.batch_size + (proc.rank * accum + micro) * cfg.micro_batch
              for step in range(start, cfg.steps) for micro in range(accum)]
    indices = [[(first + b) % len(dataset) for b in range(cfg.micro_batch)] for first in firsts]
    # the workers are spawned, not forked from this process: its threads (the process group's, the allocator's) may
    # hold a lock at the fork, which the child then waits on forever (seen under torchrun on a CPU). Not from a fork
    # server either: its workers watch the server, not this process, and outlive a run that is killed
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=indices, num_workers=cfg.workers,
                                         collate_fn=functools.partial(collate, pad_id=pad_id,
                                                                      answer_only=cfg.answer_only,
                                                                      pad_multiple=cfg.pad_multiple),
                                         worker_init_fn=quiet_worker,
                                         multiprocessing_context="spawn" if cfg.workers else None)
    batches = iter(loader)  # the workers start now, ahead of the routers' preparation
    return ((batch.to(proc.device), int(batch.lengths.sum()), first) for batch, first in zip(batches, firsts))


def quiet_worker(_):
    """A data worker hands each batch over by file descriptor, from a thread of its own; when the main process stops
    (Ctrl-C, SIGTERM) in the middle of a handover, that thread's broken connection is no news, and the main process
    has said in one line what happened. (Errors of the dataset or collate go to the main process, not through this.)"""
    sys.excepthook = lambda *exc: None


def first_samples(cfg, dataset, pad_id, count, proc, desc):
    """The first `count` samples of the training stream in batches, split over the processes; each runs the same
    number of forwards (FSDP's all-gathers must pair up)."""
    per_rank = -(-count // proc.world)
    mine = [dataset[(proc.rank * per_rank + i) % len(dataset)] for i in range(per_rank)]
    for i in tqdm(range(0, per_rank, cfg.micro_batch), desc=desc, disable=not proc.master, dynamic_ncols=True,
                  leave=False):
        yield collate(mine[i:i + cfg.micro_batch], pad_id, pad_multiple=cfg.pad_multiple).to(proc.device)


def prepare_routers(cfg, model, routers, dataset, pad_id, proc):
    """Before step 0 (a resumed run has it in its saved routers): the routers' input standardisation from the dense
    model's pooled keys, and with --warm-start the task class taught first (both ours; docs/training.md)."""
    if cfg.calib_samples > 0:
        n = calibrate_routers(model, ((b.input_ids, b.prompt_lens) for b in first_samples(
            cfg, dataset, pad_id, cfg.calib_samples, proc, "calibrating router inputs")),
            reduce=dist.all_reduce if proc.ddp else None)
        if proc.master:
            print(f"router inputs standardised from {n:,} pooled key vectors per layer (dense model)")
    if cfg.warm_start == 0:
        return
    batches = list(first_samples(cfg, dataset, pad_id, cfg.warm_start, proc, "warm start: pooled keys"))
    keys = torch.cat(list(dense_pooled_keys(model, ((b.input_ids, b.prompt_lens) for b in batches),
                                            model.elastic.boundary, model.elastic.tail)), 1)  # [L, N, G, D or 2D]
    labels = torch.cat([b.task_class for b in batches])
    if proc.ddp:  # every rank fits all ranks' prompts (as many on each), then takes rank 0's routers
        def gather(x):
            parts = [torch.empty_like(x) for _ in range(proc.world)]
            dist.all_gather(parts, x.contiguous())
            return torch.cat(parts)
        keys, labels = gather(keys.transpose(0, 1)).transpose(0, 1), gather(labels)
    acc = warm_start_routers(routers, keys.float(), labels, steps=cfg.warm_steps, margin_penalty=cfg.margin_penalty)
    if proc.ddp:
        for p in routers.parameters():
            dist.broadcast(p.data, src=0)
    if proc.master:
        print(f"warm start: routers taught the task class of {len(labels)} prompts in {cfg.warm_steps} steps, "
              f"{100 * acc:.1f}% of heads routed to their class")


@torch.no_grad()
def evaluate(model, heldout, cfg, pad_id, proc):
    """Held-out CE of the routed model (argmax routing, the fused kernel on the GPU) next to the dense model's, and
    Omega, per task class: the routers should keep CE near dense while sensitive and robust tasks split. Also the
    routers' logit margins against the gap the task class makes in them (a diagnostic of ours)."""
    L, G = model.config.num_hidden_layers, model.config.num_key_value_heads
    sums = torch.zeros(2, 4, device=proc.device)  # per class: dense CE, routed CE, Omega, count
    margins = torch.zeros(2, 2, L, G, device=proc.device)  # per class: sums of the sparse-minus-full margin, |margin|
    # Every rank runs the same number of forwards (FSDP's all-gathers must pair up); a rank short of samples
    # repeats sample 0 and counts it with weight 0.
    for j in range(-(-cfg.eval_samples // proc.world)):
        i = j * proc.world + proc.rank
        weight = float(i < cfg.eval_samples)
        batch = collate([heldout[i if weight else 0]], pad_id, answer_only=True, pad_multiple=cfg.pad_multiple)
        batch = batch.to(proc.device)
        trained = batch.targets != IGNORE
        targets = batch.targets[trained]
        dense = cross_entropy(model(batch.input_ids, modes=model.fixed_modes(FA), logits_at=trained), targets)
        logits, routing = model(batch.input_ids, prompt_lens=batch.prompt_lens, return_routing=True,
                                logits_at=trained)
        c = batch.task_class.item()
        sums[c] += weight * torch.stack([dense, cross_entropy(logits, targets), routing.omega[0],
                                         torch.ones((), device=proc.device)])
        margin = routing.margin[0]  # [L, G]
        margins[c] += weight * torch.stack([margin, margin.abs()])
    if proc.ddp:
        dist.all_reduce(sums)
        dist.all_reduce(margins)
    mean = sums[:, :3] / sums[:, 3:].clamp(min=1)
    out = {name: [round(x, 4) for x in mean[c].tolist()] for c, name in ((SENSITIVE, "sensitive"), (ROBUST, "robust"))}
    # Is the routing reading the prompt? Per head: the mean |margin| (how sure the router is) against the gap between
    # the classes' mean margins (how much the task moves it). A router that ends as fixed per-head switches shows
    # margins far above the gap, and then its Gumbel noise and gradient die out.
    per_head = margins / sums[:, 3, None, None, None].clamp(min=1)      # [class, (margin, |margin|), L, G]
    size = margins[:, 1].sum(0) / sums[:, 3].sum().clamp(min=1)          # [L, G] mean |margin| over all samples
    out["margin"] = round(size.median().item(), 3)
    gap = (per_head[ROBUST, 0] - per_head[SENSITIVE, 0]).abs().median().item() if bool((sums[:, 3] > 0).all()) \
        else float("nan")  # a class absent from the held-out samples
    out["class_gap"] = round(gap, 3)
    return out


def save_checkpoint(step, cfg, model, routers, constraint, optimizer, lambda_optimizer, proc, final=False):
    """Routers (routers.json with the run's arguments first: --resume reads them), then the training state. Each file
    goes to a temporary name and is renamed over the old one, and Ctrl-C / SIGTERM wait until both are written:
    whenever the run dies, the dir holds a checkpoint that --resume loads."""
    out_dir = Path(cfg.out_dir)
    state_file = out_dir / "train_state.pt"
    # a stop that comes meanwhile is only noted, then raised once both files and the step they hold are recorded
    # (a mask alone is not enough: another thread may take the signal, and Python runs its handler here anyway)
    pending = []
    handlers = {sig: signal.signal(sig, lambda s, f: pending.append(s)) for sig in STOP}
    try:
        extra = dict(step=step, lambda1=constraint.lambda1.tolist(), lambda2=constraint.lambda2.tolist(),
                     targets=list(cfg.targets), args=asdict(cfg))
        routers.save(out_dir, model.config, extra=extra)
        tmp = state_file.with_name(f".{state_file.name}.tmp")
        torch.save(dict(routers=routers.state_dict(), constraint=constraint.state_dict(),
                        optimizer=optimizer.state_dict(), lambda_optimizer=lambda_optimizer.state_dict(),
                        step=step), tmp)
        os.replace(tmp, state_file)
        progress["saved"] = step
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if pending:
        signal.raise_signal(pending[0])  # now to the handler it was held back from (Ctrl-C's: KeyboardInterrupt)
    print(f"{'final' if final else 'checkpoint'}: routers at step {step} saved to {out_dir}")


def open_log(cfg, start):
    """out-dir/log.jsonl, the printed numbers for plotting; the steps logged after the checkpoint a run resumes from
    run again: their lines go."""
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = out_dir / "log.jsonl"
    if start and log_file.is_file():
        tmp = log_file.with_name(f".{log_file.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in log_file.read_text().splitlines()
                               if logged_step(line) <= start))
        os.replace(tmp, log_file)
    return open(log_file, "a")


def logged_step(line):
    """The step of a log.jsonl line; inf for a line that a kill cut short."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def step_line(step, stats, tokens, dt, constraint, tau, lr, grad_norm, proc):
    """One step's log record (rank 0), and its printed line."""
    ce_c, om_c, _ = (stats[:, :3] / stats[:, 3:]).T.tolist()  # nan for a class absent from the step
    total = stats.sum(0)
    line = dict(step=step + 1, loss=(total[2] / total[3]).item(), ce=(total[0] / total[3]).item(),
                omega_sensitive=om_c[SENSITIVE], omega_robust=om_c[ROBUST], ce_sensitive=ce_c[SENSITIVE],
                ce_robust=ce_c[ROBUST], lambda1=constraint.lambda1.tolist(), lambda2=constraint.lambda2.tolist(),
                tau=tau, lr=lr, grad_norm=grad_norm.item(), tokens_per_s=tokens * proc.world / dt)
    tqdm.write(f"step {step + 1} | loss {line['loss']:.4f} | ce {line['ce']:.4f} | omega sens "
               f"{om_c[SENSITIVE]:.3f} robust {om_c[ROBUST]:.3f}"
               f" | lambda1 {line['lambda1'][0]:+.3f} {line['lambda1'][1]:+.3f}"
               f" lambda2 {line['lambda2'][0]:+.3f} {line['lambda2'][1]:+.3f}"
               f" | tau {tau:.3f} | lr {lr:.2e} | {line['tokens_per_s']:.0f} tok/s")
    return line


def finish(params, proc):
    """The routers must be identical on every rank; then the processes shut down."""
    if not proc.ddp:
        return
    mine = torch.cat([p.detach().flatten() for p in params])
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    diff = (mine - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    if proc.master:
        print(f"routers in sync across {proc.world} processes: max |difference| {diff.item():.3e}")

# -----------------------------------------------------------------------------


def main():
    # config: every flag checked, and a resumed run's own arguments, before anything loads
    cfg, given = TrainConfig.from_command_line()
    state, start = resume_point(cfg, given)
    elastic = cfg.check()
    proc, accum = check_processes(cfg)
    model_dir = checked_model_dir(cfg)
    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset, heldout = load_data(cfg, tokenizer)
    # processes, model, optimisers
    start_processes(cfg, proc)
    model, routers = build_model(cfg, model_dir, elastic, proc)
    constraint, optimizer, lambda_optimizer, params = build_optimizers(cfg, routers, proc, state)
    save = functools.partial(save_checkpoint, cfg=cfg, model=model, routers=routers, constraint=constraint,
                             optimizer=optimizer, lambda_optimizer=lambda_optimizer, proc=proc)
    batches = batch_stream(cfg, dataset, pad_id, start, accum, proc)
    if start == 0:
        prepare_routers(cfg, model, routers, dataset, pad_id, proc)
    if proc.master:
        print(f"model {model_dir}: {model.config.num_hidden_layers} layers x {model.config.num_key_value_heads} KV "
              f"heads, {sum(p.numel() for p in routers.parameters()):,} router parameters | {elastic} | {proc.world} "
              f"process(es) x {cfg.micro_batch} x {accum} accum = batch {cfg.batch_size} | device {proc.device}")
        log = open_log(cfg, start)
    # the training loop
    dense_modes = model.fixed_modes(FA)
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not proc.master,
                     dynamic_ncols=True):
        progress["step"] = step
        t0 = time.perf_counter()
        lr, tau = lr_at(step, cfg), tau_schedule(step, cfg.steps, cfg.tau_start, cfg.tau_end, cfg.tau_frac)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stats, tokens = train_step(model, [next(batches) for _ in range(accum)], constraint, cfg, tau, dense_modes)
        grad_norm = optimizer_step(routers, params, optimizer, lambda_optimizer, stats, cfg, proc)
        if proc.device.type == "cuda":
            torch.cuda.synchronize()
        if proc.master:
            line = step_line(step, stats, tokens, time.perf_counter() - t0, constraint, tau, lr, grad_norm, proc)
        if heldout is not None and cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
            ev = evaluate(model, heldout, cfg, pad_id, proc)
            if proc.master:
                line["eval"] = ev
                tqdm.write(f"eval step {step + 1} | [dense CE, routed CE, omega] sensitive {ev['sensitive']} "
                           f"robust {ev['robust']} | router margin {ev['margin']} vs class gap {ev['class_gap']}")
        if proc.master:
            log.write(json.dumps(line) + "\n")
            log.flush()
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save(step + 1)
    progress["step"] = cfg.steps
    # save and shut down
    finish(params, proc)
    if proc.master:
        save(cfg.steps, final=True)
    if proc.ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; save_checkpoint never leaves a checkpoint half-written
        if os.environ.get("RANK", "0") == "0":
            step, saved, out_dir = progress["step"], progress["saved"], progress["out_dir"]
            print(f"interrupted at step {step or 0}; " + (
                f"the last checkpoint (step {saved}) is in {out_dir}: resume with python train.py --out-dir "
                f"{shlex.quote(str(out_dir))} --resume" if saved is not None else "no checkpoint saved yet, nothing to "
                "resume"), file=sys.stderr)
        sys.exit(130)
