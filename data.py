"""
Training data for the Attention Routers (Elastic Attention, arXiv 2601.17367; README: Data).

Every sample is one chat turn of a frozen instruct model: a prompt (an instruction, a long context, a
question) and the answer as the assistant turn. Its *task class* decides the sparsity target of the
Lagrangian in train.py: sparsity-sensitive tasks (QA, retrieval; target Omega = 0.7) and
sparsity-robust ones (summaries, code, in-context learning, continuation; target 1.0).

Two sources, one format:
    JsonlDataset(path, tokenizer, max_len)             records {"context", "question", "answer", "task"}
    SyntheticMix(tokenizer, min_len, max_len, seed)    generated on the fly from Python's own docs
                                                       (pydoc_data.topics): passkey / multi-key retrieval
                                                       (sensitive) and text continuation (robust)
Both yield Sample(input_ids [T], prompt_len, task, task_class); collate() pads a list of them into a
Batch of [B, T] tensors with shifted targets. train.py uses them as

    data = SyntheticMix(tokenizer, min_len=1024, max_len=4096, seed=0)   # or JsonlDataset(...)
    batch = collate([data[i] for i in range(8)], pad_id=tokenizer.pad_token_id).to(device)

Prompt layout (the paper's training records; README: Data): the user turn is the non-empty parts of
    [instruction, context, question, suffix] joined by blank lines,
where summarization has the instruction "You are given several news passages. Write a one-page summary
of all news." and the suffix "Summary:", code "Please complete the code given below.", continuation
"Continue the text given below.", synthetic retrieval "Some special numbers are hidden inside the following
text. [...]" (RULER-like); then the tokenizer's chat template, the answer as the assistant turn,
EOS. Nothing here runs on its own; `pytest test_data.py` checks it.
"""

import json
import random
from bisect import bisect_left
from dataclasses import dataclass, replace

import torch

# -----------------------------------------------------------------------------
# Tasks and their classes

SENSITIVE, ROBUST = 0, 1  # task classes; index SparsityConstraint's targets (0.7, 1.0) in router.py
TASK_CLASSES = {
    "single_qa": SENSITIVE,      # single-document QA (ChatQA2-Long-SFT)
    "multi_hop_qa": SENSITIVE,   # multi-hop QA (MuSiQue)
    "synthetic": SENSITIVE,      # synthetic retrieval: passkey, needles
    "summarization": ROBUST,     # GovReport, XSum
    "code": ROBUST,              # code completion (CoLT-132K)
    "icl": ROBUST,               # few-shot / in-context learning
    "continuation": ROBUST,      # continue a text (the built-in synthetic mix)
}
# (instruction before the context, suffix after the question); tasks not listed have neither.
TASK_PROMPTS = {
    "summarization": ("You are given several news passages. Write a one-page summary of all news.", "Summary:"),
    "code": ("Please complete the code given below.", ""),
    "continuation": ("Continue the text given below.", ""),
    # RULER's needle tasks open with an instruction like this one. It also matters for the router: without it
    # the two ends of a retrieval prompt differ from a continuation's by a question only, and a linear probe
    # on SmolLM2's pooled keys is right for a median 0.79 of held-out prompts per head; with it, 0.96 (README: Data).
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

# -----------------------------------------------------------------------------
# Prompts


CONTEXT = "\ue000context\ue000"  # placeholder (Unicode private use) where the context goes in the template


def encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids if text else []


def chat_parts(tokenizer, task: str, question: str, answer: str, has_context: bool = True):
    """(head, tail, completion) of a chat sample: the prompt is head + context + tail (text), the answer
    turn is completion (token ids).

    The chat template renders the prompt with a placeholder for the context; head and tail are the text on
    either side of it. completion = the template's assistant turn (the answer, the end-of-turn token), with
    EOS appended if the template did not already end the turn with it.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
                         "router training uses instruct models (README: Data)")
    instruction, suffix = TASK_PROMPTS.get(task, ("", ""))
    user = "\n\n".join(p for p in (instruction, CONTEXT if has_context else "", question, suffix) if p)
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


def encode(tokenizer, record: dict, max_len: int | None, truncate: str = "middle") -> Sample:
    """One record {"context", "question", "answer", "task"} -> Sample of at most max_len tokens (None: no limit).

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
    head, tail, completion = chat_parts(tokenizer, task, record["question"], record["answer"],
                                        has_context=bool(record["context"]))
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
    return Sample(torch.tensor(ids + completion, dtype=torch.long), len(ids), task, cls)

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
# The built-in synthetic mix


FILLER_HEAD = 32  # filler tokens before the first needle
KINDS = ("passkey", "multi_key", "multi_value", "continuation")  # what SyntheticMix generates
NAMES = ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
         "kestrel", "lotus", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra",
         "umber", "violet", "willow", "yarrow", "zephyr", "birch", "copper", "dune", "falcon", "glacier")


class SyntheticMix(torch.utils.data.Dataset):
    """Samples generated from a seed, so training runs with no data files (README: Data).

    Filler: Python's documentation topics (pydoc_data.topics, in sorted order), tokenised once here and
    repeated as often as max_len needs. Sample i is a pure function of (seed, i), the tokenizer and the
    Python version's docs: any order, any worker, any rank gives the same sample. Its length is drawn
    uniformly from [min_len, max_len] and met to within a token or two, always inside the range. Kinds:
      sensitive (probability sensitive_frac), task "synthetic", a third each (RULER-like):
        passkey:     "The pass key is 48213. Remember it. 48213 is the pass key." at a uniform depth;
                     question "What is the pass key?"
        multi_key:   2-4 lines "The secret number of <name> is <7 digits>." at uniform depths; the question
                     asks for one of them.
        multi_value: 2-4 lines "One of the special numbers for <name> is <7 digits>." for one name; the
                     question asks for all of them.
      robust, task "continuation": the text up to a line start; the answer is the true next 32 or more
        tokens of the text, up to the next line start (at most 160 tokens).
    kinds: draw only these kinds (uniformly), e.g. ("multi_value",) for one evaluation task; None: the mix above.
    The numbers to retrieve are the digit runs of the answer.
    Needles go in at line starts, after the first FILLER_HEAD tokens, so the filler's own lines stay whole.
    Every sample is built as a record and goes through encode(), exactly like a JSONL record.
    """

    def __init__(self, tokenizer, min_len: int = 1024, max_len: int = 4096, seed: int = 0,
                 sensitive_frac: float = 0.5, size: int = 1_000_000, kinds: tuple[str, ...] | None = None):
        from pydoc_data.topics import topics

        if kinds is not None and (not kinds or set(kinds) - set(KINDS)):
            raise ValueError(f"kinds must be a non-empty subset of {KINDS}, got {kinds!r}")
        self.kinds = kinds
        if not 1 <= min_len <= max_len:
            raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        if not 0.0 <= sensitive_frac <= 1.0:
            raise ValueError(f"sensitive_frac must lie in [0, 1], got {sensitive_frac}")
        self.tokenizer, self.min_len, self.max_len = tokenizer, min_len, max_len
        self.seed, self.sensitive_frac, self.size = seed, sensitive_frac, size
        ids = encode_text(tokenizer, "\n\n".join(topics[name] for name in sorted(topics)))
        self.n_text = len(ids)
        # The tape: the text repeated so that a continuation can start max_len tokens into it anywhere in
        # its second copy (room for the context before and the answer after).
        copies = 2 + -(-(max_len + 256) // self.n_text)
        self.tape = ids * copies
        # Line starts: positions right after a token holding a newline, and the start of each copy; sorted.
        ends_line = {t for t in set(ids) if "\n" in tokenizer.decode([t])}
        starts = [0] + [p for p in range(1, self.n_text) if ids[p - 1] in ends_line]
        self.line_starts = [c * self.n_text + p for c in range(copies) for p in starts]

    def __len__(self):
        return self.size

    def __getitem__(self, i: int) -> Sample:
        rng = random.Random(f"{self.seed}:{i}")  # string seeds hash with SHA-512: the same in every process
        length = rng.randint(self.min_len, self.max_len)
        if self.kinds is not None:
            kind = rng.choice(self.kinds)
        elif rng.random() < self.sensitive_frac:
            kind = rng.choice(KINDS[:3])
        else:
            kind = "continuation"
        make = self.continuation(rng) if kind == "continuation" else self.retrieval(rng, kind)
        # make(n) builds the record with n filler tokens. The prompt and answer take a few dozen tokens and
        # the text re-tokenises a little differently at the seams: measure on a short probe, then correct n.
        # The first full try is usually in range (within a token or two of the draw); when it is over
        # max_len by a little, the surplus comes off the start of the context, which holds only filler.
        n = length - (len(encode(self.tokenizer, make(16), max_len=None).input_ids) - 16)
        for _ in range(6):
            if n < 1:
                raise ValueError(f"a {make(1)['task']} sample of {length} tokens has no room for text: its prompt "
                                 f"and answer alone take about {length - n} tokens; raise min_len")
            sample = encode(self.tokenizer, make(n), max_len=None)
            got = len(sample.input_ids)
            if self.min_len <= got <= self.max_len:
                return sample
            if 0 < got - self.max_len <= FILLER_HEAD // 2:
                return encode(self.tokenizer, make(n), max_len=self.max_len, truncate="left")
            n += length - got
        raise RuntimeError(f"sample {i}: could not fit {length} tokens into [{self.min_len}, {self.max_len}]")

    def text(self, a: int, b: int) -> str:
        return self.tokenizer.decode(self.tape[a:b]).strip("\ufffd")  # a cut UTF-8 character decodes to U+FFFD

    def retrieval(self, rng, kind: str):
        if kind == "passkey":
            key = rng.randint(10_000, 99_999)
            needles = [f"The pass key is {key}. Remember it. {key} is the pass key.\n"]
            question, answer = "What is the pass key?", f"The pass key is {key}."
        elif kind == "multi_value":
            name, values = rng.choice(NAMES), [rng.randint(1_000_000, 9_999_999) for _ in range(rng.randint(2, 4))]
            needles = [f"One of the special numbers for {name} is {v}.\n" for v in values]
            question = f"What are all the special numbers for {name}?"
            answer = f"The special numbers for {name} are {', '.join(map(str, values[:-1]))} and {values[-1]}."
        else:
            names = rng.sample(NAMES, rng.randint(2, 4))
            values = [rng.randint(1_000_000, 9_999_999) for _ in names]
            needles = [f"The secret number of {n} is {v}.\n" for n, v in zip(names, values)]
            j = rng.randrange(len(names))
            question = f"What is the secret number of {names[j]}?"
            answer = f"The secret number of {names[j]} is {values[j]}."
        start = self.line_starts[rng.randrange(bisect_left(self.line_starts, self.n_text))]
        depths = [rng.random() for _ in needles]

        def make(n_fill):
            # Each needle at its depth of the filler after the first FILLER_HEAD tokens (so that trimming the
            # context's start never cuts a needle), moved on to the next line start.
            head = min(FILLER_HEAD, n_fill)
            pos = [start + head + int(d * (n_fill - head)) for d in depths]
            cuts = [min(self.line_starts[bisect_left(self.line_starts, p)], start + n_fill) for p in pos]
            bounds = [start] + sorted(cuts) + [start + n_fill]
            parts = [self.text(bounds[0], bounds[1])]
            for needle, a, b in zip(needles, bounds[1:], bounds[2:]):
                parts += [needle, self.text(a, b)]
            return {"context": "".join(parts), "question": question, "answer": answer, "task": "synthetic"}
        return make

    def continuation(self, rng):
        # The answer starts at a line start in the tape's second copy and runs to the first line start
        # 32 or more tokens later (at most 160 tokens); the context is the text just before it.
        lo = bisect_left(self.line_starts, self.n_text + self.max_len)
        hi = bisect_left(self.line_starts, 2 * self.n_text + self.max_len)
        b = self.line_starts[rng.randrange(lo, hi)]
        k = bisect_left(self.line_starts, b + 32)
        e = min(self.line_starts[k] if k < len(self.line_starts) else b + 160, b + 160)
        answer = self.text(b, e)
        return lambda n_ctx: {"context": self.text(b - min(n_ctx, b), b), "question": "", "answer": answer,
                              "task": "continuation"}

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
