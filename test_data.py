"""Tests of data.py on the CPU with SmolLM2's tokenizer: `pytest test_data.py`."""

import json
import re

import pytest
import torch
from pydoc_data.topics import topics

import tasks
import texts
from data import (HELDOUT_KINDS, HUMAN_KINDS, IGNORE, KIND_CLASS, KINDS, ROBUST, SENSITIVE, TASK_CLASSES, JsonlDataset,
                  Sample, SyntheticMix, collate, encode, mentions, task_class)

END_OF_PROMPT = "<|im_end|>\n<|im_start|>assistant\n"  # SmolLM2's template between user turn and answer


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from default_model import default_model_dir
    return AutoTokenizer.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def mix(tok):
    return SyntheticMix(tok, min_len=300, max_len=700, seed=0)


def record(task="single_qa", context="Paris is the capital of France.", question="What is the capital of France?",
           answer="Paris."):
    return {"context": context, "question": question, "answer": answer, "task": task}


# --- tasks ----------------------------------------------------------------


def test_task_classes():
    paper = {"single_qa", "multi_hop_qa", "synthetic", "summarization", "code", "icl"}
    assert set(TASK_CLASSES) == paper | set(KIND_CLASS)
    assert {t for t in paper if TASK_CLASSES[t] == SENSITIVE} == {"single_qa", "multi_hop_qa", "synthetic"}
    # at least 8 trained kinds of each class; held-out and human-style kinds of both classes; no kind in two groups
    for c in (SENSITIVE, ROBUST):
        assert sum(KIND_CLASS[k] == c for k in KINDS) >= 8
        assert sum(KIND_CLASS[k] == c for k in HELDOUT_KINDS) >= 5 and sum(KIND_CLASS[k] == c for k in HUMAN_KINDS) >= 5
    assert len(set(KINDS) | set(HELDOUT_KINDS) | set(HUMAN_KINDS)) == len(KINDS) + len(HELDOUT_KINDS) + len(HUMAN_KINDS)
    assert (SENSITIVE, ROBUST) == (0, 1)
    with pytest.raises(ValueError, match=r"unknown task 'qa'; expected one of single_qa, multi_hop_qa"):
        task_class("qa")


# --- prompts --------------------------------------------------------------


def test_encode_equals_the_chat_template(tok):
    users = {  # the user turn each task gets (docs/training.md: Data)
        "single_qa": "CTX\n\nQ?", "multi_hop_qa": "CTX\n\nQ?", "icl": "CTX\n\nQ?",
        "synthetic": "Some special numbers are hidden inside the following text. Make sure to memorize them. "
                     "I will quiz you about the numbers afterwards.\n\nCTX\n\nQ?",
        "summarization": "You are given several news passages. Write a one-page summary of all news."
                         "\n\nCTX\n\nSummary:",
        "code": "Please complete the code given below.\n\nCTX",
        "continuation": "Continue the text given below.\n\nCTX",
        "passkey": "CTX\n\nQ?",  # a kind of the built-in mix: no default instruction
    }
    assert set(users) <= set(TASK_CLASSES)
    ctx = "Some text.\nMore text here."
    for task, user in users.items():
        question = "Q?" if "Q?" in user else ""
        s = encode(tok, record(task, context=ctx, question=question), max_len=4096)
        assert s.task == task and s.task_class == TASK_CLASSES[task]
        # The prompt is exactly the template's tokenised prompt; the rest is the assistant turn and EOS.
        messages = [{"role": "user", "content": user.replace("CTX", ctx)}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert s.input_ids[:s.prompt_len].tolist() == tok(prompt, add_special_tokens=False).input_ids, task
        assert tok.decode(s.input_ids[s.prompt_len:]) == "Paris.<|im_end|>\n"
        assert s.input_ids[s.prompt_len:].tolist().count(tok.eos_token_id) == 1


def test_task_prompts(tok):
    text = tok.decode(encode(tok, record("summarization", context="NEWS", question=""), 4096).input_ids)
    assert ("user\nYou are given several news passages. Write a one-page summary of all news.\n\nNEWS\n\nSummary:"
            + END_OF_PROMPT) in text
    text = tok.decode(encode(tok, record("code", context="def f(x):", question=""), 4096).input_ids)
    assert "user\nPlease complete the code given below.\n\ndef f(x):" + END_OF_PROMPT in text
    text = tok.decode(encode(tok, record("multi_hop_qa", context="CTX", question="Q?"), 4096).input_ids)
    assert "user\nCTX\n\nQ?" + END_OF_PROMPT in text


def test_record_instruction_order_and_keys(tok):
    r = {**record(), "instruction": "Answer briefly.", "order": "qci", "keys": ["Paris"]}
    s = encode(tok, r, 4096)
    assert "user\nWhat is the capital of France?\n\nParis is the capital of France.\n\nAnswer briefly." \
        + END_OF_PROMPT in tok.decode(s.input_ids) and s.keys == ("Paris",)
    s = encode(tok, {**record("synthetic"), "instruction": "", "order": "q"}, 4096)  # no instruction; the context last
    assert "user\nWhat is the capital of France?\n\nParis is the capital of France." + END_OF_PROMPT \
        in tok.decode(s.input_ids)
    s = encode(tok, {**record(), "instruction": "", "order": "qcq"}, 4096)  # the question asked on both sides
    assert "user\nWhat is the capital of France?\n\nParis is the capital of France.\n\nWhat is the capital of " \
        "France?" + END_OF_PROMPT in tok.decode(s.input_ids) and s.order == "qcq"
    for bad in ("icqq", "qqc", "abc", "icci", 3):
        with pytest.raises(ValueError, match="order must be some of the letters i, c, q"):
            encode(tok, {**record(), "order": bad}, 4096)


def test_length_limit_truncates_the_middle_of_the_context(tok):
    words = " ".join(f"w{i}" for i in range(2000))
    r = record("single_qa", context="BEGIN " + words + " END", question="Which words are there?", answer="Many words.")
    s = encode(tok, r, max_len=200)
    assert len(s.input_ids) == 200
    text = tok.decode(s.input_ids)
    assert "BEGIN w0 w1" in text and "w1999 END" in text and " w1000 " not in text
    assert "Which words are there?" + END_OF_PROMPT + "Many words.<|im_end|>\n" in text
    assert len(encode(tok, record(), max_len=200).input_ids) < 200    # short records are left alone
    with pytest.raises(ValueError, match="max_len=20"):
        encode(tok, r, max_len=20)


# --- JSONL ----------------------------------------------------------------


def test_jsonl_reader(tok, tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [record(), record("summarization", context="Long news.", question="", answer="Short."),
            {**record("code", context="def f():", question="", answer="    pass"), "id": 7}]
    rest = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows[1:])
    path.write_text(json.dumps(rows[0]) + "\n\n" + rest + "\n")
    data = JsonlDataset(path, tok, max_len=512)
    assert len(data) == 3 and data.tasks == ["single_qa", "summarization", "code"]
    for r, s in zip(rows, (data[i] for i in range(3))):
        assert isinstance(s, Sample) and s.task == r["task"] and s.task_class == TASK_CLASSES[r["task"]]
        assert tok.decode(s.input_ids) == tok.decode(encode(tok, r, 512).input_ids)
        assert tok.decode(s.input_ids[s.prompt_len:]).startswith(r["answer"])


@pytest.mark.parametrize("line,match", [
    ('{"context": "c", "question": "q", "answer": "a", "task": "qa"}', r"bad.jsonl:2: unknown task 'qa'"),
    ('{"context": "c", "question": "q", "task": "code"}', r"bad.jsonl:2: 'answer' must be a string"),
    ('{"context": 3, "question": "q", "answer": "a", "task": "code"}', r"bad.jsonl:2: 'context' must be a string"),
    ('["c", "q", "a", "code"]', r"bad.jsonl:2: expected a JSON object"),
    ('{"context": "c", "question": "q", "answer": "a", "task": "code", "keys": "a"}',
     r"bad.jsonl:2: optional 'keys' must be a list of strings"),
    ('{"context": "c", ', r"bad.jsonl:2: not valid JSON"),
])
def test_jsonl_errors(tok, tmp_path, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record()) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match):
        JsonlDataset(path, tok, max_len=512)


# --- the built-in mix ------------------------------------------------------


def test_synthetic_is_deterministic(tok, mix):
    again = SyntheticMix(tok, min_len=300, max_len=700, seed=0)
    other = SyntheticMix(tok, min_len=300, max_len=700, seed=1)
    order = [7, 3, 0, 12, 5]
    for i in order:                                   # any order, a fresh instance: the same samples
        a, b = mix[i], again[i]
        assert torch.equal(a.input_ids, b.input_ids)
        assert (a.prompt_len, a.task, a.keys) == (b.prompt_len, b.task, b.keys)
    assert sum(torch.equal(mix[i].input_ids, other[i].input_ids) for i in range(10)) == 0


def test_synthetic_lengths_and_mix(tok, mix):
    samples = [mix[i] for i in range(60)]
    lengths = [len(s.input_ids) for s in samples]
    assert all(300 <= n <= 700 for n in lengths) and len(set(lengths)) > 30
    classes = [s.task_class for s in samples]
    assert 15 < classes.count(SENSITIVE) < 45 and len({s.task for s in samples}) >= 12
    assert all(s.task in KINDS and s.task_class == KIND_CLASS[s.task] for s in samples)
    assert all(s.input_ids.dtype == torch.long for s in samples)
    fixed = SyntheticMix(tok, min_len=512, max_len=512, seed=3, sensitive_frac=1.0)
    assert {len(fixed[i].input_ids) for i in range(10)} == {512}
    assert {fixed[i].task_class for i in range(10)} == {SENSITIVE}
    assert {SyntheticMix(tok, 400, 500, sensitive_frac=0.0)[i].task_class for i in range(10)} == {ROBUST}


COUNTS = ("counting", "word_count", "human_how_many")  # kinds whose key is a count, not a string of the text


@pytest.mark.parametrize("split,kind", [("train", k) for k in KINDS] + [("heldout", k) for k in HELDOUT_KINDS]
                         + [("human", k) for k in HUMAN_KINDS])
def test_every_kind_makes_well_formed_samples(tok, split, kind):
    """Each kind, in range, of its class, with its keys in the prompt (a count is computed, not copied), the same
    again from a fresh instance; the answer is the assistant turn."""
    mix = SyntheticMix(tok, 380, 420, seed=11, kinds=(kind,), split=split)
    for i in range(2):
        s = mix[i]
        assert 380 <= len(s.input_ids) <= 420 and s.task == kind and s.task_class == KIND_CLASS[kind]
        prompt, answer = tok.decode(s.input_ids[:s.prompt_len]), tok.decode(s.input_ids[s.prompt_len:])
        assert prompt.endswith(END_OF_PROMPT) and answer.endswith("<|im_end|>\n") and len(answer) > len("<|im_end|>\n")
        assert bool(s.keys) == (s.task_class == SENSITIVE)
        assert all(k in answer for k in s.keys)
        if kind not in COUNTS:
            assert all(k in prompt for k in s.keys), (kind, s.keys)
        assert torch.equal(s.input_ids, SyntheticMix(tok, 380, 420, seed=11, kinds=(kind,), split=split)[i].input_ids)


def test_heldout_split_is_never_trained(tok):
    """Held-out kinds, wordings and documents: the train split draws none of them."""
    train, held = texts.Texts(tok, "train"), texts.Texts(tok, "heldout")
    for source in ("docs", "docstrings", "code"):
        assert held._docs[source] and train._docs[source] and not set(held._docs[source]) & set(train._docs[source])
    import random
    for kind in KINDS:
        plan = tasks.KIND_TABLE[kind][1](random.Random(0), train, 300)
        (ti, tq), (hi, hq) = tasks.wordings(plan, kind, "train"), tasks.wordings(plan, kind, "heldout")
        assert len(set(ti)) >= 6 and hi and not set(hi) & set(ti) and (not set(hq) & set(tq) or tq == ("",) * 3)
    heldout_instructions = {w for kind in KINDS for w in tasks.wordings(
        tasks.KIND_TABLE[kind][1](random.Random(0), train, 300), kind, "heldout")[0]}
    trained = {w for kind in KINDS for ws in tasks.wordings(
        tasks.KIND_TABLE[kind][1](random.Random(0), train, 300), kind, "train") for w in ws if w}
    asked = {w for kind in HELDOUT_KINDS for w in tasks.KIND_TABLE[kind][1](random.Random(0), held, 300).questions}
    assert not (heldout_instructions | asked) & trained  # no held-out wording is a trained one of another kind
    mix = SyntheticMix(tok, 300, 400, seed=4)
    for i in range(40):
        prompt = tok.decode(mix[i].input_ids[:mix[i].prompt_len])
        assert mix[i].task in KINDS and not any(w in prompt for w in heldout_instructions)
    for kind in ("variable_tracking", "grep_lines", "human_tldr"):
        with pytest.raises(ValueError, match="kinds of the train split must be a non-empty subset"):
            SyntheticMix(tok, 300, 300, kinds=(kind,))
    with pytest.raises(ValueError, match="kinds of the heldout split must be a non-empty subset"):
        SyntheticMix(tok, 300, 300, kinds=("human_default",), split="heldout")
    assert {SyntheticMix(tok, 300, 300, split="heldout")[i].task for i in range(12)} <= set(HELDOUT_KINDS)


def test_human_style_prompts_are_never_trained(tok):
    """The human-style set: its own kinds, wordings and lead-ins, over the held-out documents; the train split draws
    none of them, and the held-out split draws them only when asked by name."""
    import random
    train, human = texts.Texts(tok, "train"), texts.Texts(tok, "human")
    assert human._docs == texts.Texts(tok, "heldout")._docs
    trained = set()
    for kind in KINDS:
        plan = tasks.KIND_TABLE[kind][1](random.Random(0), train, 300)
        trained |= set(plan.instructions) | set(plan.questions)
    mix = SyntheticMix(tok, 300, 400, seed=5, split="human")
    samples = [mix[i] for i in range(16)]
    assert {s.task for s in samples} <= set(HUMAN_KINDS) and {s.task_class for s in samples} == {SENSITIVE, ROBUST}
    for s in samples:  # the prompt's own wordings: none is a trained one
        plan = tasks.KIND_TABLE[s.task][1](random.Random(0), human, 300)
        assert not (set(plan.instructions) | set(plan.questions)) & trained, s.task
    wordings = {w for kind in HUMAN_KINDS for w in tasks.KIND_TABLE[kind][1](random.Random(1), human, 300).instructions}
    train_mix = SyntheticMix(tok, 300, 400, seed=4)
    for i in range(40):
        prompt = tok.decode(train_mix[i].input_ids[:train_mix[i].prompt_len])
        assert train_mix[i].task not in HUMAN_KINDS and not any(w in prompt for w in wordings)


# (source, finder, kind) of every fact a kind asks about (texts.find)
FACTS = [(("code",), texts.code_facts, k) for k in ("default", "raises", "purpose", "does", "owner", "methods",
                                                     "constant")] \
    + [(("docs",), texts.prose_facts, "version"), (("docs", "docstrings"), texts.prose_facts, "number")] \
    + [(("docs", "docstrings", "code"), texts.word_facts, k) for k in ("count", "lines")]


@pytest.mark.parametrize("sources,finder,kind", FACTS, ids=[k for _, _, k in FACTS])
def test_facts_stand_in_every_context(tok, sources, finder, kind):
    """A fact read from a real text is in its context at every length, and what the question names occurs there as
    often as the answer says (a count is the real count), at every length that holds the fact (n_max 1000: its span
    is at most 250 tokens); from one fact to the next, its depth varies."""
    import random
    depths = []
    for seed in range(6):
        split = ("train", "heldout")[seed % 2]
        context, fact = texts.find(texts.Texts(tok, split), random.Random(seed), sources, finder, kind, 1000)
        for n in (300, 600, 1000):
            text = context(n)
            flat = " ".join(text.split()).lower()
            assert abs(tok(text, add_special_tokens=False, return_length=True).length[0] - n) <= 4
            assert all(flat.count(" ".join(s.split()).lower()) == times for s, times in fact.occurs), (kind, fact)
            assert kind == "count" or all(k in text for k in fact.keys), (kind, fact.keys)
        depths.append(flat.index(" ".join(fact.occurs[0][0].split()).lower()) / len(flat))
        if kind == "count":
            assert fact.occurs == ((fact.ask[0], int(fact.keys[0])),)
    assert max(depths) - min(depths) > 0.2, depths


def test_layouts_vary_in_both_classes(tok):
    """Both classes draw the same layouts: the question before the text, after it and on both sides, the
    instruction before and after it; the human-style set puts its lead-in right before the text."""
    mix = SyntheticMix(tok, 300, 360, seed=6)
    orders = {SENSITIVE: set(), ROBUST: set()}
    for i in range(90):
        s = mix[i]
        orders[s.task_class].add(s.order)
    for c, seen in orders.items():
        assert {"iqc", "icq", "iqcq", "qci", "ciq", "qciq", "qc", "cq", "qcq"} - seen <= {"iqcq"}, (c, seen)
    human = {SyntheticMix(tok, 300, 360, seed=6, split="human")[i].order for i in range(30)}
    assert human <= {"qic", "icq", "qicq", "qc", "cq", "qcq"} and len(human) >= 4


def test_continuation_answers_are_the_true_next_lines(tok):
    import random
    mix = SyntheticMix(tok, 300, 400, seed=2, kinds=("continuation", "code_completion"))
    docs = [texts.document(src, n) for src in ("docs", "docstrings", "code") for n in texts.names(src)]
    follows = 0
    for i in range(6):
        s = mix[i]
        prompt = tok.decode(s.input_ids[:s.prompt_len]).removesuffix(END_OF_PROMPT)
        answer = tok.decode(s.input_ids[s.prompt_len:]).removesuffix("<|im_end|>\n")
        plan = tasks.KIND_TABLE[s.task][1](random.Random(0), mix.texts, 300)
        for w in plan.instructions:  # an instruction placed after the context
            prompt = prompt.removesuffix("\n\n" + w)
        assert len(answer) > 40 and any(answer in d for d in docs), i
        follows += any(prompt[-30:] + answer in d for d in docs)  # not when the cut falls between two documents
    assert follows >= 4


def test_synthetic_errors(tok):
    with pytest.raises(ValueError, match="min_len"):
        SyntheticMix(tok, min_len=500, max_len=400)
    with pytest.raises(ValueError, match="raise min_len"):
        SyntheticMix(tok, min_len=40, max_len=40)[0]
    with pytest.raises(ValueError, match="split must be"):
        SyntheticMix(tok, 300, 300, split="test")


# --- batches --------------------------------------------------------------


def test_collate_shapes_and_targets(tok, mix):
    samples = [mix[i] for i in range(5)]
    pad = tok.pad_token_id
    for answer_only in (False, True):
        batch = collate(samples, pad_id=pad, answer_only=answer_only, pad_multiple=64)
        T = batch.input_ids.shape[1]
        assert T % 64 == 0 and T - 64 < max(len(s.input_ids) for s in samples) <= T
        assert batch.targets.shape == (5, T) and batch.input_ids.dtype == batch.targets.dtype == torch.long
        assert batch.prompt_lens.tolist() == [s.prompt_len for s in samples]
        assert batch.task_class.tolist() == [s.task_class for s in samples]
        assert batch.tasks == [s.task for s in samples]
        for b, s in enumerate(samples):
            n, p = len(s.input_ids), s.prompt_len
            assert batch.lengths[b] == n
            assert torch.equal(batch.input_ids[b, :n], s.input_ids) and (batch.input_ids[b, n:] == pad).all()
            assert (batch.targets[b, n - 1:] == IGNORE).all()         # padding and the last token: no loss
            first = p - 1 if answer_only else 0
            assert (batch.targets[b, :first] == IGNORE).all()
            assert torch.equal(batch.targets[b, first:n - 1], s.input_ids[first + 1:n])   # shifted by one
        trained = (batch.targets != IGNORE).sum().item()
        assert trained == sum(len(s.input_ids) - (s.prompt_len if answer_only else 1) for s in samples)
    assert batch.to("cpu").input_ids is not None
    with pytest.raises(ValueError, match="pad_id"):
        collate(samples, pad_id=None)


def test_a_key_counts_only_as_a_whole_token():
    assert mentions("it occurs 2 times.", "2") and mentions("(7)", "7") and mentions("valueerror: no", "ValueError")
    assert not mentions("it occurs 12 times", "2") and not mentions("2.5", "2") and not mentions("nonetype", "None")
    assert not mentions("0.5 of them", "5") and not mentions("python 3.10", "10") and not mentions("it is -1", "1")
    assert mentions("It Is NONE.", "None") and mentions("between 1-2", "1")
    assert mentions("see os.path.join", "os.path") and mentions("python 3.10 added it", "3.10")
