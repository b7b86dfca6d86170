"""
Training data for the Attention Routers (Elastic Attention, arXiv 2601.17367; docs/training.md: Data).

Every sample is one chat turn of a frozen instruct model: a prompt (an instruction, a long context, a
question) and the answer as the assistant turn. Its *task class* decides the sparsity target of the
Lagrangian in train.py: sparsity-sensitive tasks (QA, retrieval; target Omega = 0.7) and
sparsity-robust ones (summaries, code, in-context learning, continuation; target 1.0).

Two sources, one format:
    JsonlDataset(path, tokenizer, max_len)             records {"context", "question", "answer", "task"}
    SyntheticMix(tokenizer, min_len, max_len, seed)    generated on the fly: 29 task kinds of both classes
                                                       (tasks.py) over Python's docs, docstrings and source,
                                                       many wordings and layouts; split="heldout" gives the
                                                       kinds, wordings and texts training never sees, and
                                                       split="human" the human-style prompts (human.py)
Both yield Sample(input_ids [T], prompt_len, task, task_class, keys, order); collate() pads a list of them into a
Batch of [B, T] tensors with shifted targets. train.py uses them as

    data = SyntheticMix(tokenizer, min_len=1024, max_len=4096, seed=0)   # or JsonlDataset(...)
    batch = collate([data[i] for i in range(8)], pad_id=tokenizer.pad_token_id).to(device)

Prompt layout (docs/training.md: Data): the user turn is the non-empty parts of
    [instruction, context, question] in the record's order (default: that one; the question may also be asked
    on both sides of the context, order "qcq"), then the task's suffix,
joined by blank lines. A JSONL record without its own "instruction" gets its task's default (the paper's
training records): summarization "You are given several news passages. Write a one-page summary of all
news." and the suffix "Summary:", code "Please complete the code given below.", continuation "Continue the
text given below.", synthetic retrieval "Some special numbers are hidden inside the following text. [...]"
(RULER-like). Then the tokenizer's chat template, the answer as the assistant turn,
EOS. Nothing here runs on its own; `pytest test_data.py` checks it.
"""

import json
import random
import re
from bisect import bisect_left
from dataclasses import dataclass, replace

import torch

from tasks import HELDOUT_KINDS, HUMAN_KINDS, KIND_CLASS, KIND_TABLE, KINDS, ROBUST, SENSITIVE, wordings
from texts import TRIM, Texts

# -----------------------------------------------------------------------------
# Tasks and their classes

TASK_CLASSES = {
    "single_qa": SENSITIVE,      # single-document QA (ChatQA2-Long-SFT)
    "multi_hop_qa": SENSITIVE,   # multi-hop QA (MuSiQue)
    "synthetic": SENSITIVE,      # synthetic retrieval: passkey, needles
    "summarization": ROBUST,     # GovReport, XSum
    "code": ROBUST,              # code completion (CoLT-132K)
    "icl": ROBUST,               # few-shot / in-context learning
    **KIND_CLASS,                # the built-in mix's kinds (tasks.py), e.g. "passkey", "summary"
}
# (instruction before the context, suffix after the question); tasks not listed have neither.
TASK_PROMPTS = {
    "summarization": ("You are given several news passages. Write a one-page summary of all news.", "Summary:"),
    "code": ("Please complete the code given below.", ""),
    "continuation": ("Continue the text given below.", ""),
    # RULER's needle tasks open with an instruction like this one. It also matters for the router: without it
    # the two ends of a retrieval prompt differ from a continuation's by a question only, and a linear probe
    # on SmolLM2's pooled keys is right for a median 0.79 of held-out prompts per head; with it, 0.96
    # (docs/training.md: Data).
    "synthetic": ("Some special numbers are hidden inside the following text. Make sure to memorize them. "
                  "I will quiz you about the numbers afterwards.", ""),
}
IGNORE = -100  # targets that take no loss (F.cross_entropy's default ignore_index)


def task_class(task: str) -> int:
    """0 (sensitive) or 1 (robust) for a task name; an unknown name is an error that lists the known ones."""
    if task not in TASK_CLASSES:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASK_CLASSES)}")
    return TASK_CLASSES[task]


@dataclass
class Sample:
    input_ids: torch.Tensor  # [T] int64: prompt tokens, then the answer and EOS
    prompt_len: int          # tokens before the answer: the span the router pools (router.boundary_pool)
    task: str
    task_class: int          # SENSITIVE or ROBUST
    keys: tuple[str, ...] = ()  # strings a correct answer contains (the built-in sensitive kinds; eval.py scores them)
    order: str = "icq"          # the user turn's parts: instruction, context, question (encode's order)


def mentions(text: str, key: str) -> bool:
    """Whether an answer states a key as a whole token, case aside: "2" is not found in "12", "2.5", "0.2" or "-2",
    "None" not in "NoneType"."""
    edge = r"[0-9a-z_]"
    number = r"(?<![0-9]\.)(?<!-)" if key[:1].isdigit() else ""  # a digit key inside a decimal or a negative
    return re.search(rf"(?<!{edge}){number}{re.escape(key.lower())}(?!{edge}|\.[0-9])", text.lower()) is not None

# -----------------------------------------------------------------------------
# Prompts


CONTEXT = "\ue000context\ue000"  # placeholder (Unicode private use) where the context goes in the template


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def chat_parts(tokenizer, task: str, question: str, answer: str, has_context: bool = True,
               instruction: str | None = None, order: str = "icq"):
    """(head, tail, completion) of a chat sample: the prompt is head + context + tail (text), the answer
    turn is completion (token ids).

    The user turn is the instruction (the task's default from TASK_PROMPTS unless given), the context and the
    question in `order` (the letters i, c, q, each at most once, but for a question asked on both sides of the
    context: "qcq"), then the task's suffix; empty parts are left out.
    The chat template renders the prompt with a placeholder for the context; head and tail are the text on
    either side of it. completion = the template's assistant turn (the answer, the end-of-turn token), with
    EOS appended if the template did not already end the turn with it.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                         "router training uses instruct models (docs/training.md: Data)")
    default, suffix = TASK_PROMPTS.get(task, ("", ""))
    parts = {"i": default if instruction is None else instruction, "c": CONTEXT if has_context else "", "q": question}
    user = "\n\n".join(p for p in [parts[c] for c in order] + [suffix] if p)
    messages = [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        raise ValueError("the chat template renders the conversation so that it does not start with the prompt "
                         "(add_generation_prompt=True); prompt and answer cannot be split")
    if has_context and prompt.count(CONTEXT) != 1:
        raise ValueError("the chat template changed the user message; cannot place the context")
    head, _, tail = prompt.partition(CONTEXT) if has_context else (prompt, "", "")
    completion = encode_text(tokenizer, full[len(prompt):])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in completion:
        completion.append(tokenizer.eos_token_id)
    return head, tail, completion


def check_order(order) -> bool:
    """Whether order is a valid layout of the user turn: i, c, q each at most once, or q twice with c between."""
    if not isinstance(order, str) or set(order) - set("icq") or order.count("i") > 1 or order.count("c") > 1:
        return False
    return order.count("q") <= 1 or (order.count("q") == 2 and order.index("q") < order.find("c") < order.rindex("q"))


def encode(tokenizer, record: dict, max_len: int | None, truncate: str = "middle") -> Sample:
    """One record {"context", "question", "answer", "task"} -> Sample of at most max_len tokens (None: no limit).
    Optional keys: "instruction" (replaces the task's default), "order" (of instruction, context, question:
    "icq" by default), "keys" (strings a correct answer contains).

    The prompt is tokenised as one text, as a chat prompt is at inference. Only the context
    is truncated: when the whole does not fit, the middle of the context's tokens goes (truncate="middle":
    the first and the last halves of the room left stay, as LongBench truncates) or its beginning
    (truncate="left"); the instruction, question, template and answer stay whole. A record whose prompt
    without context and answer alone exceed max_len is an error.
    """
    if truncate not in ("middle", "left"):
        raise ValueError(f"truncate must be 'middle' or 'left', got {truncate!r}")
    task = record["task"]
    cls = task_class(task)
    order = record.get("order", "icq")
    if not check_order(order):
        raise ValueError(f"order must be some of the letters i, c, q (instruction, context, question), each at most "
                         f"once but q, which may stand on both sides of c: e.g. 'icq', 'qci' or 'qcq'; got {order!r}")
    head, tail, completion = chat_parts(tokenizer, task, record["question"], record["answer"],
                                        has_context=bool(record["context"]), instruction=record.get("instruction"),
                                        order=order if "c" in order else order + "c")
    enc = tokenizer(head + record["context"] + tail, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc.input_ids
    if max_len is not None and len(ids) + len(completion) > max_len:
        over = len(ids) + len(completion) - max_len
        # Context tokens: those starting inside the context's characters.
        starts = [a for a, _ in enc.offset_mapping]
        c0 = bisect_left(starts, len(head))
        c1 = bisect_left(starts, len(head) + len(record["context"]))
        room = (c1 - c0) - over
        if room < 0:
            raise ValueError(f"a {task} record needs {max_len - room} tokens without its context, more than "
                             f"max_len={max_len}; raise max_len or shorten its question/answer")
        keep_first = room // 2 if truncate == "middle" else 0
        ids = ids[:c0 + keep_first] + ids[c1 - (room - keep_first):]
    return Sample(torch.tensor(ids + completion, dtype=torch.long), len(ids), task, cls,
                  tuple(record.get("keys", ())), order)

# -----------------------------------------------------------------------------
# JSONL records


class JsonlDataset(torch.utils.data.Dataset):
    """Records {"context", "question", "answer", "task"}, one JSON object a line (extra keys are ignored).

    The file is checked line by line at construction (every key present and a string, a known task) and
    then read lazily: only byte offsets stay in memory and a record is tokenised when it is indexed.
    """

    KEYS = ("context", "question", "answer", "task")

    def __init__(self, path: str, tokenizer, max_len: int):
        self.path, self.tokenizer, self.max_len = str(path), tokenizer, max_len
        self.offsets, self.tasks = [], []
        with open(self.path, "rb") as f:
            lineno, offset = 0, 0
            for line in f:
                lineno += 1
                if line.strip():
                    self.tasks.append(self.check(line, f"{self.path}:{lineno}")["task"])
                    self.offsets.append(offset)
                offset += len(line)
        if not self.offsets:
            raise ValueError(f"{self.path} holds no records")

    @classmethod
    def check(cls, line: bytes, where: str) -> dict:
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:  # the latter: bytes that are not UTF-8
            raise ValueError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object with keys {', '.join(cls.KEYS)}")
        for key in cls.KEYS:
            if not isinstance(record.get(key), str):
                raise ValueError(f"{where}: {key!r} must be a string, got {type(record.get(key)).__name__}")
        for key, ok in (("instruction", isinstance(record.get("instruction", ""), str)),
                        ("order", isinstance(record.get("order", ""), str)),
                        ("keys", isinstance(record.get("keys", []), list)
                         and all(isinstance(k, str) for k in record.get("keys", [])))):
            if not ok:
                raise ValueError(f"{where}: optional {key!r} must be a " + ("list of strings" if key == "keys"
                                                                           else "string"))
        try:
            task_class(record["task"])
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return record

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i: int) -> Sample:
        with open(self.path, "rb") as f:
            f.seek(self.offsets[i])
            record = json.loads(f.readline())
        return encode(self.tokenizer, record, self.max_len)

# -----------------------------------------------------------------------------
# The built-in mix


SPLITS = {"train": KINDS, "heldout": KINDS + HELDOUT_KINDS, "human": HUMAN_KINDS}  # split -> the kinds it may draw
# (where the instruction goes, where the question goes) -> the order of the user turn's parts (encode's `order`)
LAYOUTS = {("before", "before"): "iqc", ("before", "after"): "icq", ("before", "both"): "iqcq",
           ("after", "before"): "qci", ("after", "after"): "ciq", ("after", "both"): "qciq",
           ("none", "before"): "qc", ("none", "after"): "cq", ("none", "both"): "qcq",
           ("lead-in", "before"): "qic", ("lead-in", "after"): "icq", ("lead-in", "both"): "qicq"}


class SyntheticMix(torch.utils.data.Dataset):
    """Samples generated from a seed, so training runs with no data files (docs/training.md: Data).

    The kinds are tasks.py's: 16 sensitive and 13 robust ones for training (KINDS), 6 + 5 more held out for
    evaluation (HELDOUT_KINDS), and 8 + 5 human-style ones (HUMAN_KINDS, human.py), each with its own wordings, over
    Python's documentation topics, the stdlib's docstrings and its source. Sample i is a pure function of (seed,
    split, i), the tokenizer and the Python version's stdlib: any order, any worker, any rank gives the same sample.
    Per sample: a length uniform in [min_len, max_len] (met to within a few tokens, always inside the range), a kind
    (sensitive with probability sensitive_frac, then uniform among the class's kinds), an instruction and a question
    from the kind's wordings, and a layout (LAYOUTS): the instruction before the context, after it or nowhere (a
    human-style lead-in: right before the context, or nowhere), the question before it, after it or on both sides;
    both classes draw the same layouts, so that only the task tells them apart.
    split: "train" (trained kinds, their first wordings, 4 in 5 documents), "heldout" (every kind but the
    human-style ones, the held-out wordings and documents; with kinds=None, the held-out kinds only) or "human" (the
    human-style kinds over the held-out documents). kinds: draw only these (uniformly).
    Every sample is built as a record and goes through encode(), exactly like a JSONL record.
    """

    def __init__(self, tokenizer, min_len: int = 1024, max_len: int = 4096, seed: int = 0,
                 sensitive_frac: float = 0.5, size: int = 1_000_000, kinds: tuple[str, ...] | None = None,
                 split: str = "train"):
        if split not in SPLITS:
            raise ValueError(f"split must be 'train', 'heldout' or 'human', got {split!r}")
        allowed = SPLITS[split]
        if kinds is not None and (not kinds or set(kinds) - set(allowed)):
            raise ValueError(f"kinds of the {split} split must be a non-empty subset of {allowed}, got {kinds!r}")
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        if not 0.0 <= sensitive_frac <= 1.0:
            raise ValueError(f"sensitive_frac must lie in [0, 1], got {sensitive_frac}")
        self.tokenizer, self.min_len, self.max_len = tokenizer, min_len, max_len
        self.seed, self.sensitive_frac, self.size, self.split = seed, sensitive_frac, size, split
        self.kinds = kinds
        pool = kinds or (HELDOUT_KINDS if split == "heldout" else allowed)
        self.by_class = [[k for k in pool if KIND_CLASS[k] == c] for c in (SENSITIVE, ROBUST)]
        self.texts = Texts(tokenizer, split)

    def __len__(self):
        return self.size

    def kind(self, rng) -> str:
        if self.kinds is not None:
            return rng.choice(self.kinds)
        sensitive = rng.random() < self.sensitive_frac
        return rng.choice(self.by_class[0 if sensitive and self.by_class[0] or not self.by_class[1] else 1])

    def __getitem__(self, i: int) -> Sample:
        rng = random.Random(f"{self.seed}:{self.split}:{i}")  # string seeds hash with SHA-512: the same everywhere
        length = rng.randint(self.min_len, self.max_len)
        kind = self.kind(rng)
        plan = KIND_TABLE[kind][1](rng, self.texts, self.max_len)
        instructions, questions = wordings(plan, kind, self.split)
        instruction, question = rng.choice(instructions), rng.choice(questions)
        where_i = rng.choice(("lead-in", "none") if self.split == "human" else ("before", "after", "none"))
        order = LAYOUTS[where_i, rng.choice(("before", "after", "both"))]

        def make(n):
            return {"context": plan.context(n), "question": question, "answer": plan.answer, "task": kind,
                    "instruction": instruction, "order": order, "keys": list(plan.keys)}
        # make(n) builds the record with about n context tokens. The prompt and answer take a few dozen tokens and
        # the text re-tokenises a little differently at the seams: measure on a short probe, then correct n.
        # When a try is over max_len by a little, the surplus comes off the start of the context, which holds
        # no planted line and no fact (texts.HEAD > texts.TRIM).
        n = length - (len(encode(self.tokenizer, make(64), max_len=None).input_ids) - 64)
        for _ in range(8):
            if n < 1:
                raise ValueError(f"a {kind} sample of {length} tokens has no room for text: its prompt and answer "
                                 f"alone take about {length - n} tokens; raise min_len")
            sample = encode(self.tokenizer, make(n), max_len=None)
            got = len(sample.input_ids)
            if self.min_len <= got <= self.max_len:
                return sample
            if 0 < got - self.max_len <= TRIM:
                return encode(self.tokenizer, make(n), max_len=self.max_len, truncate="left")
            n += max(length - got, 1) if got < self.min_len else length - got
        raise RuntimeError(f"sample {i} ({kind}): could not fit {length} tokens into [{self.min_len}, {self.max_len}]")

# -----------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    input_ids: torch.Tensor    # [B, T] int64, right-padded with pad_id (samples left-aligned)
    targets: torch.Tensor      # [B, T] int64, already shifted: the token to predict at each position, or -100
    prompt_lens: torch.Tensor  # [B] int64, prompt span per sample (router input)
    lengths: torch.Tensor      # [B] int64, real tokens per sample
    task_class: torch.Tensor   # [B] int64, 0 sensitive, 1 robust
    tasks: list[str]

    def to(self, device) -> "Batch":
        return replace(self, **{k: getattr(self, k).to(device)
                                for k in ("input_ids", "targets", "prompt_lens", "lengths", "task_class")})


def collate(samples: list[Sample], pad_id: int, answer_only: bool = False, pad_multiple: int = 1) -> Batch:
    """Pads samples on the right into [B, T] (T rounded up to pad_multiple) with shifted targets.

    targets[b, t] = input_ids[b, t + 1] where position t is trained, else -100 (IGNORE), so the loss is
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()) with no further shifting. Trained positions:
    the whole sequence (answer_only=False, as the paper trains) or only those predicting the answer and
    EOS (answer_only=True). Right padding leaves causal attention over the real tokens unchanged.
    """
    if not samples:
        raise ValueError("collate() needs at least one sample")
    if pad_id is None:
        raise ValueError("pad_id is None: pass tokenizer.pad_token_id, or tokenizer.eos_token_id when it has none")
    lengths = torch.tensor([len(s.input_ids) for s in samples])
    T = -(-int(lengths.max()) // pad_multiple) * pad_multiple
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(samples), T), IGNORE, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[b, :n] = s.input_ids
        first = s.prompt_len - 1 if answer_only else 0   # position whose next token is the first trained one
        targets[b, first:n - 1] = s.input_ids[first + 1:n]
    return Batch(input_ids, targets, torch.tensor([s.prompt_len for s in samples]), lengths,
                 torch.tensor([s.task_class for s in samples]), [s.task for s in samples])
