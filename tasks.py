"""
The task kinds of the built-in training mix (data.SyntheticMix; Elastic Attention, arXiv 2601.17367, trains its
routers on tasks of two classes; README: Data). A router must learn the *task* (does the answer need keys from
anywhere in the context, or does the recent text do?), not a prompt's template, so the mix varies everything
but the task: many kinds per class, several wordings per kind, the instruction before the context, after it or
absent, the question before or after it, and texts from three sources a fresh machine has offline.

Kinds, one line each: the class and why (sensitive: the answer depends on a few tokens anywhere in a long
context, which a sink + window cache loses; robust: it depends on the gist or on the last lines).
Held-out kinds, wordings and texts (split="heldout") are never drawn for training; eval.py measures routing on
them. Held-out texts: the documents whose name hashes into bucket 0 of 5. Held-out wordings: the
last two instructions and the last question of each trained kind.

Every kind is a function (rng, texts) -> Plan: the instruction and question pools, the answer, the strings a
correct answer contains (keys; sensitive kinds), and context(n): the context text of about n tokens.
Nothing runs on its own; `pytest test_data.py` checks every kind.
"""
import ast
import glob
import hashlib
import os
import re
import sysconfig
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

SENSITIVE, ROBUST = 0, 1  # task classes; index SparsityConstraint's targets (0.7, 1.0) in router.py

# -----------------------------------------------------------------------------
# Texts: the Python documentation topics, the standard library's docstrings and its source


HELDOUT_BUCKETS = 5  # a document is held out iff its name hashes to bucket 0 of these (about 1 in 5)


def is_heldout(name: str) -> bool:
    """A document by its name (a module's source and its docstrings share their split)."""
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % HELDOUT_BUCKETS == 0


@lru_cache(maxsize=None)
def _stdlib_files():
    """The standard library's top-level modules (sorted; the largest skipped): name -> path."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    return {os.path.basename(f)[:-3]: f for f in files if 2_000 < os.path.getsize(f) < 150_000}


@lru_cache(maxsize=None)
def names(source: str) -> tuple[str, ...]:
    """The documents of a source: "docs" (pydoc_data.topics), "docstrings" (a stdlib module's docstrings, of the
    module, its classes and functions, as one document), "code" (a stdlib module's source)."""
    if source == "docs":
        from pydoc_data.topics import topics
        return tuple(sorted(topics))
    return tuple(_stdlib_files())


@lru_cache(maxsize=4096)
def document(source: str, name: str) -> str:
    """The text of one document, read when first asked for."""
    if source == "docs":
        from pydoc_data.topics import topics
        return topics[name].strip()
    with open(_stdlib_files()[name], encoding="utf-8", errors="replace") as f:
        text = f.read()
    if source == "code":
        return text.replace("\t", "    ")
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return ""
    parts = [ast.get_docstring(node, clean=True) for node in ast.walk(tree)
             if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    return "\n\n".join(p for p in parts if p and len(p) > 80)


class Texts:
    """The documents of one split, tokenised on first use, as token tapes with their line starts."""

    def __init__(self, tokenizer, split: str):
        self.tokenizer, self.split = tokenizer, split
        self._docs = {s: [n for n in names(s) if is_heldout(n) == (split == "heldout")]
                      for s in ("docs", "docstrings", "code")}
        self._ids, self._newline = {}, {}

    def ids(self, source, i):
        if (source, i) not in self._ids:
            text = document(source, self._docs[source][i])
            self._ids[source, i] = self.tokenizer(text + "\n\n", add_special_tokens=False).input_ids if text else []
        return self._ids[source, i]

    def ends_line(self, t: int) -> bool:
        if t not in self._newline:
            self._newline[t] = "\n" in self.tokenizer.decode([t])
        return self._newline[t]

    def tape(self, rng, sources: tuple[str, ...], n: int):
        """Token ids of >= n tokens: whole documents of the given sources, in random order; with the doc names
        and the line starts (positions right after a newline token, and 0)."""
        ids, got = [], []
        pool = [(s, i) for s in sources for i in range(len(self._docs[s]))]
        while len(ids) < n:
            s, i = rng.choice(pool)
            if len(self.ids(s, i)) > 16:  # a module with hardly any docstrings is no document
                got.append(self._docs[s][i])
                ids += self.ids(s, i)
        starts = [0] + [p for p in range(1, len(ids)) if self.ends_line(ids[p - 1])]
        return ids, got, starts

    def doc_text(self, rng, source):
        name = rng.choice(self._docs[source])
        return name, document(source, name)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids).strip("\ufffd")  # a cut UTF-8 character decodes to U+FFFD

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)


# -----------------------------------------------------------------------------
# Plans, and the two ways a context is built: text with lines planted in it, or a list of items


@dataclass
class Plan:
    instructions: tuple[str, ...]     # wordings of the instruction: the first n_train train, the rest held out
    questions: tuple[str, ...]        # wordings of the question (format fields filled), likewise
    answer: str
    context: Callable[[int], str]     # n tokens -> the context
    keys: tuple[str, ...] = ()        # strings a correct answer contains (sensitive kinds)


HEAD = 48  # tokens of plain text or items before the first planted line; SyntheticMix trims at most TRIM < HEAD
TRIM = 32


def planted(texts, rng, needles: list[str], sources=("docs", "docstrings"), n_max: int = 0):
    """context(n): n tokens of text from the sources, each needle line at a uniform depth, at a line start after
    the first HEAD tokens (so that trimming the context's start never cuts one)."""
    ids, _, starts = texts.tape(rng, sources, n_max + 64)
    depths = [rng.random() for _ in needles]

    def context(n):
        n = min(n, len(ids))
        head = min(HEAD, n)
        cuts = []
        for d in depths:
            k = bisect_left(starts, head + int(d * (n - head)))
            cuts.append(min(starts[k] if k < len(starts) else n, n))
        bounds = [0] + sorted(cuts) + [n]
        parts = [texts.decode(ids[bounds[0]:bounds[1]])]
        for needle, a, b in zip(needles, bounds[1:], bounds[2:]):
            parts += [needle.rstrip("\n") + "\n", texts.decode(ids[a:b])]
        return "".join(parts)
    return context


def listed(texts, items: list[str], pinned: list[str], rng, sep="\n"):
    """context(n): as many items as fit in about n tokens, the pinned items at uniform depths among them (not
    among the first two), the room left filled by the end of one more item, as a context cut on the left."""
    ids = texts.tokenizer([it + sep for it in items], add_special_tokens=False).input_ids
    depths = [0.1 + 0.9 * rng.random() for _ in pinned]
    pin_size = sum(texts.count(p + sep) for p in pinned)

    def context(n):
        budget, out = n - pin_size, []
        for it, x in zip(items, ids):
            if budget - len(x) < 0:
                break
            out.append(it)
            budget -= len(x)
        for p, d in sorted(zip(pinned, depths), key=lambda x: x[1]):
            out.insert(max(int(d * len(out)), min(2, len(out))), p)
        spare = ids[len(out) - len(pinned)] if len(out) - len(pinned) < len(ids) else []
        head = texts.decode(spare[len(spare) - budget:]) if 0 < budget < len(spare) else ""
        return head + sep.join(out)
    return context


def tail_text(texts, rng, sources, n_max, answer_min=32, answer_max=160):
    """(context(n), answer): the text that ends at a line start, and the true next lines (32-160 tokens)."""
    ids, names, starts = texts.tape(rng, sources, n_max + answer_max + 64)
    lo, hi = bisect_left(starts, n_max), bisect_left(starts, len(ids) - answer_max)
    b = starts[rng.randrange(lo, max(lo + 1, hi))] if lo < len(starts) else n_max
    k = bisect_left(starts, b + answer_min)
    e = min(starts[k] if k < len(starts) else b + answer_max, b + answer_max)
    return (lambda n: texts.decode(ids[b - min(n, b):b])), texts.decode(ids[b:e]), names


# -----------------------------------------------------------------------------
# Vocabulary of the planted facts

NAMES = ("amber", "basil", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
         "kestrel", "lotus", "marble", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra",
         "umber", "violet", "willow", "yarrow", "zephyr", "birch", "copper", "dune", "falcon", "glacier")
PEOPLE = ("Ada Varga", "Bruno Keller", "Clara Osei", "Dmitri Lund", "Elena Marsh", "Farid Nasser", "Greta Holm",
          "Hugo Ferreira", "Ines Albright", "Jonas Petrov", "Kira Sato", "Leon Brandt", "Mira Castell",
          "Nils Okafor", "Olga Reyes", "Pavel Dunn", "Rosa Lindqvist", "Sami Haddad", "Tessa Wren", "Viktor Ames")
TOWNS = ("Velmora", "Tessik", "Orlanth", "Brisca", "Quillon", "Marrow Bay", "Ostrava Nova", "Kelden", "Ashfall",
         "Linmoor", "Pellucid", "Sarnow", "Dunhollow", "Evershade", "Graywick", "Halcyra")
JOBS = ("glassblower", "cartographer", "beekeeper", "luthier", "archivist", "ferry pilot", "clockmaker",
        "astronomer", "botanist", "stonemason")
WORDS = ("lantern", "harvest", "compass", "meadow", "saddle", "thimble", "orchard", "anchor", "pebble", "quiver",
         "ribbon", "teapot", "violin", "walnut", "beacon", "candle", "falcon", "garden", "island", "kettle")
ANIMALS = ("fox", "heron", "badger", "otter", "lynx", "stork", "hare", "moose")
LANGS = ("French", "German", "Spanish", "Italian", "Portuguese", "Dutch")
STOP = set("""the a an and or of to in is are was were be been being for on with as by that this these those it its
from at which can not but if then than when will would may might must shall should have has had do does did
also into such there their other more most some any each only used use using see same new one two first
when where what who how all no nor so very what into over under about after before between both""".split())


def number(rng, digits=7):
    return rng.randint(10 ** (digits - 1), 10 ** digits - 1)


def sentences(text: str, n: int) -> str:
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return " ".join(parts[:n])


def keywords(text: str, n: int = 5) -> list[str]:
    words = [w.lower() for w in re.findall(r"[A-Za-z_]{5,}", text)]
    return [w for w, _ in Counter(w for w in words if w not in STOP).most_common(n)]


def title_of(name: str) -> str:
    return name.replace("-", " ").replace("_", " ").strip().capitalize()


# -----------------------------------------------------------------------------
# Sensitive kinds (trained)

def passkey(rng, texts, n_max):
    key = str(number(rng, 5))
    return Plan(("A pass key is hidden somewhere in the following text. Find it and remember it.",
                 "Somewhere in this long text there is a pass key. Keep it in mind.",
                 "Read the document below carefully; it contains a pass key.",
                 "Below is a long text with one pass key hidden in it.",
                 "Memorize the pass key that appears in the text.",
                 "There is a hidden pass key in the passage. You will be asked for it.",
                 "One line of the following material states a pass key; it matters.",
                 "Pay attention: a numeric pass key is buried inside the next text."),
                ("What is the pass key?", "Which number is the pass key?", "Tell me the pass key.",
                 "Recall the pass key that was mentioned."),
                f"The pass key is {key}.",
                planted(texts, rng, [f"The pass key is {key}. Remember it. {key} is the pass key."], n_max=n_max),
                (key,))


def word_needle(rng, texts, n_max):
    word = rng.choice(WORDS)
    return Plan(("A secret word is hidden in the text below. Remember it.",
                 "The following text hides one secret word.",
                 "Somewhere below the secret word of the day is given.",
                 "Read everything; the secret word is mentioned exactly once.",
                 "Keep track of the secret word in this document.",
                 "Inside the following passage is a secret word you must find.",
                 "The passage contains a password-like secret word.",
                 "Look for the secret word while you read the next text."),
                ("What is the secret word?", "Which word was given as the secret word?", "Name the secret word.",
                 "Recall the secret word from the text."),
                f"The secret word is {word}.",
                planted(texts, rng, [f"The secret word of the day is '{word}'."], n_max=n_max), (word,))


def multi_key(rng, texts, n_max):
    names = rng.sample(NAMES, rng.randint(2, 5))
    values = [str(number(rng)) for _ in names]
    j = rng.randrange(len(names))
    return Plan(("Some special numbers are hidden inside the following text. Make sure to memorize them.",
                 "The text below assigns secret numbers to several names.",
                 "Several names get a secret number somewhere in this document.",
                 "Read the following text; it lists secret numbers for different names.",
                 "Remember every secret number you meet in the text.",
                 "Hidden in the next passage: the secret numbers of a few names.",
                 "Different names are linked to secret numbers in the material below.",
                 "Track which secret number belongs to which name."),
                (f"What is the secret number of {names[j]}?", f"Which number belongs to {names[j]}?",
                 f"Give the secret number for {names[j]}.", f"Recall {names[j]}'s secret number."),
                f"The secret number of {names[j]} is {values[j]}.",
                planted(texts, rng, [f"The secret number of {n} is {v}." for n, v in zip(names, values)],
                        n_max=n_max), (values[j],))


def multi_value(rng, texts, n_max):
    name, values = rng.choice(NAMES), [str(number(rng)) for _ in range(rng.randint(2, 4))]
    return Plan(("Some special numbers are hidden inside the following text. Make sure to memorize them.",
                 "One name has several special numbers scattered through the text below.",
                 "Collect every special number given for a name in this document.",
                 "The following text mentions several special numbers of the same name.",
                 "Remember all special numbers you find while reading.",
                 "Special numbers are spread over the next passage.",
                 "Several lines of the material below give special numbers for one name.",
                 "Find each special number in the text; there is more than one."),
                (f"What are all the special numbers for {name}?", f"List every special number of {name}.",
                 f"Which special numbers were given for {name}?", f"Name all of {name}'s special numbers."),
                f"The special numbers for {name} are {', '.join(values[:-1])} and {values[-1]}.",
                planted(texts, rng, [f"One of the special numbers for {name} is {v}." for v in values],
                        n_max=n_max), tuple(values))


def multi_query(rng, texts, n_max):
    names = rng.sample(NAMES, rng.randint(3, 5))
    values = [str(number(rng)) for _ in names]
    asked = sorted(rng.sample(range(len(names)), 2))
    a, b = (names[i] for i in asked)
    return Plan(("The following text gives magic numbers for several objects.",
                 "Magic numbers of a few objects are hidden in the document below.",
                 "Remember the magic number of each object mentioned in the text.",
                 "Read on; several magic numbers are stated along the way.",
                 "This text contains magic numbers for different objects.",
                 "Note down every magic number in the passage below.",
                 "Objects and their magic numbers are scattered through the material.",
                 "Some lines below pair an object with a magic number."),
                (f"What are the magic numbers of {a} and of {b}?", f"Give the magic numbers for {a} and {b}.",
                 f"Which magic numbers belong to {a} and to {b}?", f"Recall the magic numbers of {a} and {b}."),
                f"The magic number of {a} is {values[asked[0]]} and that of {b} is {values[asked[1]]}.",
                planted(texts, rng, [f"The magic number of the {n} is {v}." for n, v in zip(names, values)],
                        n_max=n_max), tuple(values[i] for i in asked))


def fact_qa(rng, texts, n_max):
    people = rng.sample(PEOPLE, 4)
    towns, jobs = rng.sample(TOWNS, 4), rng.sample(JOBS, 4)
    facts = [f"{p} was born in {t} and worked as a {j}." for p, t, j in zip(people, towns, jobs)]
    who = rng.randrange(4)
    ask_town = rng.random() < 0.5
    p = people[who]
    qs = ((f"In which town was {p} born?", f"Where was {p} born?", f"What is {p}'s town of birth?",
           f"Name the birthplace of {p}.") if ask_town else
          (f"What did {p} work as?", f"What was {p}'s job?", f"Which trade did {p} follow?",
           f"What was the occupation of {p}?"))
    fact = towns[who] if ask_town else jobs[who]
    return Plan(("The text below mentions a few people in passing. Answer the question about them.",
                 "Read the following document; it contains facts about some people.",
                 "Some biographical facts are mixed into the next text.",
                 "Use the text to answer a question about one of the people in it.",
                 "The material below includes short facts about several people.",
                 "Answer from the document: a few lines describe people.",
                 "Hidden in this text are sentences about people's lives.",
                 "Find the fact about the person asked for in the passage."),
                qs, f"{p} was born in {towns[who]}." if ask_town else f"{p} worked as a {jobs[who]}.",
                planted(texts, rng, facts, n_max=n_max), (fact,))


def counting(rng, texts, n_max):
    animal, other = rng.sample(ANIMALS, 2)
    m = rng.randint(2, 6)
    lines = [f"A {animal} walked past the window."] * m + [f"A {other} walked past the window."] * rng.randint(1, 3)
    rng.shuffle(lines)
    return Plan(("Some animals walk past the window in the text below. Count them.",
                 "Read the text and keep count of the animals that pass the window.",
                 "The following document notes every animal that walks past the window.",
                 "Count how often each animal passes the window in this text.",
                 "Lines about animals passing a window are scattered through the passage.",
                 "Keep a tally of the animals mentioned below.",
                 "Several times an animal passes the window in the material below.",
                 "Track the animals walking past the window while you read."),
                (f"How many times did a {animal} walk past the window?", f"Count the {animal}s that passed the window.",
                 f"How often does a {animal} pass the window?", f"What is the number of {animal} sightings?"),
                f"A {animal} walked past the window {m} times.", planted(texts, rng, lines, n_max=n_max), (str(m),))


def kv_lookup(rng, texts, n_max):
    def hexs():
        return f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}"
    items = [f'"{hexs()}": "{hexs()}",' for _ in range(n_max // 8 + 16)]
    key, value = hexs(), hexs()
    return Plan(("Below is a JSON object of keys and values.", "Here is a large key-value store in JSON.",
                 "The following JSON maps identifiers to values.", "Read the JSON data below.",
                 "A table of keys and values follows, as JSON.", "The document is a JSON dictionary.",
                 "Extract a value from the JSON object that follows.", "Given the key-value pairs below."),
                (f'What is the value of the key "{key}"?', f'Which value does "{key}" map to?',
                 f'Look up "{key}" and give its value.', f'Return the value stored under "{key}".'),
                f'The value of "{key}" is "{value}".',
                lambda n, c=listed(texts, items, [f'"{key}": "{value}",'], rng): "{\n" + c(n - 4) + "\n}",
                (value,))


def line_lookup(rng, texts, n_max):
    ids = rng.sample(range(100, 100_000), n_max // 8 + 16)
    vals = [str(number(rng, 5)) for _ in ids]
    j = rng.randrange(len(ids))
    items = [f"line {i}: REGISTER_CONTENT is <{v}>" for i, v in zip(ids, vals) if i != ids[j]]
    return Plan(("Below is a record of lines; each holds a register value.", "The following log lists lines.",
                 "Read the numbered lines below.", "A long list of register lines follows.",
                 "Every line below states the content of a register.", "Here are many lines of a memory dump.",
                 "Look up one line of the listing below.", "The listing below has one entry per line."),
                (f"What is the REGISTER_CONTENT in line {ids[j]}?", f"Give the register value of line {ids[j]}.",
                 f"Which value does line {ids[j]} hold?", f"Report REGISTER_CONTENT for line {ids[j]}."),
                f"The REGISTER_CONTENT in line {ids[j]} is <{vals[j]}>.",
                listed(texts, items, [f"line {ids[j]}: REGISTER_CONTENT is <{vals[j]}>"], rng), (vals[j],))


# -----------------------------------------------------------------------------
# Robust kinds (trained)

def continuation(rng, texts, n_max, sources=("docs", "docstrings")):
    context, answer, _ = tail_text(texts, rng, sources, n_max)
    return Plan(("Continue the text given below.", "Keep writing where this text stops.",
                 "Write the next few lines of the following text.", "Carry on with the passage below.",
                 "Extend the text that follows.", "Pick up where the document leaves off.",
                 "Go on with the following text in the same style.", "What comes next in this text?"),
                ("", "", "", ""), answer, context)


def code_completion(rng, texts, n_max):
    context, answer, _ = tail_text(texts, rng, ("code",), n_max)
    return Plan(("Please complete the code given below.", "Complete the following Python module.",
                 "Write the next lines of this Python code.", "Continue the code below.",
                 "Finish the Python source that follows.", "Here is part of a module; continue it.",
                 "Predict the following lines of code.", "Extend this Python file."),
                ("", "", "", ""), answer, context)


def _one_doc(rng, texts, n_max, sources=("docs", "docstrings")):
    """context(n) of whole documents, and the first document's name and text."""
    ids, names, _ = texts.tape(rng, sources, n_max + 64)
    first = next(document(s, names[0]) for s in sources if names[0] in texts._docs[s])
    return (lambda n: texts.decode(ids[:n])), names[0], first


def summary(rng, texts, n_max):
    context, name, first = _one_doc(rng, texts, n_max)
    return Plan(("Read the following documentation.", "Here is a long technical text.",
                 "The document below is from a manual.", "Consider the text that follows.",
                 "Below is some reference material.", "Read this passage.",
                 "The following pages come from documentation.", "Take a look at the text below."),
                ("Summarize the text in a few sentences.", "Write a short summary of it.",
                 "What is this text about? Answer in two or three sentences.", "Give a brief overview of the text."),
                sentences(first, 2), context)


def paraphrase(rng, texts, n_max):
    context, _, _ = tail_text(texts, rng, ("docs", "docstrings"), n_max)
    return Plan(("Here is a text.", "Read the following passage.", "Below is a document.",
                 "The text that follows is technical.", "Consider this documentation.", "Look at the text below.",
                 "This is an excerpt of a manual.", "A passage follows."),
                ("Rewrite its last paragraph in simpler words.", "Paraphrase the final paragraph.",
                 "Say the last paragraph again in your own words.", "Restate the ending more plainly."),
                context(80).strip(), context)  # the surrogate answer: the last lines, as they are


def title(rng, texts, n_max):
    context, name, _ = _one_doc(rng, texts, n_max)
    return Plan(("Read the document below.", "Here is a text.", "The following is documentation.",
                 "Consider the passage below.", "Below is some reference text.", "This is a manual excerpt.",
                 "The text below needs a heading.", "Look at the following material."),
                ("Give it a short title.", "Suggest a title for this text.", "What would be a good heading?",
                 "Name the text in a few words."),
                f"{title_of(name)}", context)


def keyword_kind(rng, texts, n_max):
    context, name, first = _one_doc(rng, texts, n_max)
    return Plan(("Read the following text.", "Here is a document.", "The passage below is technical.",
                 "Below is an excerpt from documentation.", "Consider this text.", "Look at the material below.",
                 "The document that follows is long.", "A text from a reference manual follows."),
                ("List five keywords for it.", "Which keywords describe this text?",
                 "Give the main terms of the text.", "Extract a few key terms."),
                ", ".join(keywords(first)), context)


def gist_translation(rng, texts, n_max):
    context, name, first = _one_doc(rng, texts, n_max)
    lang = rng.choice(LANGS)
    return Plan(("Read the text below.", "Here is an English document.", "The following is documentation.",
                 "Consider the passage below.", "Below is an excerpt.", "A technical text follows.",
                 "The document below is in English.", "Look at this text."),
                (f"Give the gist of it in {lang}.", f"Summarize it in one sentence, in {lang}.",
                 f"In {lang}, what is the text about?", f"Translate the main idea into {lang}."),
                sentences(first, 1), context)


def few_shot(rng, texts, n_max):
    """In-context classification: is a snippet prose or code? The examples teach the format; the answer
    depends on the last snippet only."""
    def snippet(source):
        name, text = texts.doc_text(rng, source)
        lines = [ln for ln in text.splitlines() if len(ln.strip()) > 20]
        k = rng.randrange(max(1, len(lines) - 2))
        return " ".join(" ".join(lines[k:k + 2]).split())[:160]
    labels = ("prose", "code")
    items = []
    for _ in range(n_max // 16 + 8):
        c = rng.randrange(2)
        items.append(f"Snippet: {snippet(('docs', 'code')[c])}\nLabel: {labels[c]}\n")
    c = rng.randrange(2)
    query = f"Snippet: {snippet(('docs', 'code')[c])}\nLabel:"
    ctx = listed(texts, items, [], rng)
    return Plan(("Classify each snippet as prose or code, following the examples.",
                 "Label the last snippet like the examples.", "Here are labelled examples; label the last one.",
                 "Learn the labels from the examples below.", "Each snippet is prose or code.",
                 "Continue the pattern of labels.", "Decide whether the final snippet is prose or code.",
                 "Examples of snippets and their labels follow."),
                ("", "", "", ""), labels[c], lambda n: ctx(n - texts.count(query) - 2) + "\n" + query)


# -----------------------------------------------------------------------------
# Held-out kinds: evaluation only (eval.py); never drawn for training

def variable_tracking(rng, texts, n_max):
    value = str(number(rng, 5))
    chain = ["".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(4)) for _ in range(rng.randint(3, 4))]
    lines = [f"VAR {chain[0]} = {value}"] + [f"VAR {b} = VAR {a}" for a, b in zip(chain, chain[1:])]
    ctx = planted(texts, rng, lines, n_max=n_max)  # planted() keeps the lines in their order: the chain reads
    return Plan(("Variables are assigned in the text below; follow the chain.", "Track the variable assignments.",
                 "The document defines variables in terms of each other.", "Follow the VAR lines in this text."),
                (f"Which variables end up with the value {value}?", f"List every variable equal to {value}."),
                f"The variables {', '.join(chain)} all hold {value}.", ctx, tuple(chain))


def common_words(rng, texts, n_max):
    pool = list(WORDS) + list(NAMES)
    top = rng.sample(pool, 3)
    rest = [w for w in pool if w not in top]
    words = []
    while len(words) < n_max // 3 + 30:
        words += [rng.choice(rest)] * 1 + ([rng.choice(top)] if rng.random() < 0.3 else [])
    numbered = [f"{i + 1}. {w}" for i, w in enumerate(words)]
    return Plan(("Below is a numbered list of words.", "Here is a long word list.",
                 "Read the words in the list that follows.", "Count the words of the list below."),
                ("What are the three most common words in the list?", "Which three words appear most often?"),
                f"The most common words are {', '.join(top)}.", listed(texts, numbered, [], rng), tuple(top))


def code_needle(rng, texts, n_max):
    name, value = f"MAGIC_{rng.choice(NAMES).upper()}", str(number(rng, 6))
    return Plan(("The Python source below defines a magic constant.", "Read this code; one constant matters.",
                 "Somewhere in the module below a constant is set.", "Look through the following code."),
                (f"What is the value of {name}?", f"Which number is {name} set to?"),
                f"{name} is {value}.", planted(texts, rng, [f"{name} = {value}"], sources=("code",), n_max=n_max),
                (value,))


def outline(rng, texts, n_max):
    context, name, first = _one_doc(rng, texts, n_max)
    return Plan(("Read the following text.", "Here is a document.", "Below is documentation.",
                 "Consider the text below."),
                ("List its main points as bullets.", "Write an outline of the text."),
                "\n".join("- " + p for p in re.split(r"(?<=[.!?])\s+", sentences(first, 3))), context)


def explain_code(rng, texts, n_max):
    ids, names, starts = texts.tape(rng, ("code",), n_max + 64)
    doc = document("docstrings", names[0]) or f"The {names[0]} module."
    return Plan(("Here is some Python source.", "Read the code below.", "The following is a Python module.",
                 "Look at this code."),
                ("Explain what this code does.", "Describe the purpose of this module in plain words."),
                sentences(doc, 2), lambda n: texts.decode(ids[:n]))


def questions_about(rng, texts, n_max):
    context, name, first = _one_doc(rng, texts, n_max)
    return Plan(("Read the following text.", "Here is a passage from a manual.", "Consider the document below.",
                 "Below is a technical text."),
                ("Write three questions a student might ask about it.", "What questions does this text raise?"),
                f"What is {title_of(name).lower()}? How is it used? When should it be avoided?", context)


# -----------------------------------------------------------------------------
# The table: kind -> (class, builder, trained?)

KIND_TABLE = {
    # sensitive: the answer is a few tokens that may sit anywhere in the context
    "passkey": (SENSITIVE, passkey, True),              # one number planted in text (RULER niah_single)
    "word_needle": (SENSITIVE, word_needle, True),      # one word planted in text
    "multi_key": (SENSITIVE, multi_key, True),          # several keyed numbers, one asked (niah_multikey)
    "multi_value": (SENSITIVE, multi_value, True),      # all values of one key (niah_multivalue)
    "multi_query": (SENSITIVE, multi_query, True),      # two of several keys asked (niah_multiquery)
    "fact_qa": (SENSITIVE, fact_qa, True),              # a question about facts planted in the text
    "counting": (SENSITIVE, counting, True),            # every occurrence matters, wherever it is
    "kv_lookup": (SENSITIVE, kv_lookup, True),          # JSON key -> value (lost-in-the-middle's kv retrieval)
    "line_lookup": (SENSITIVE, line_lookup, True),      # numbered lines (LongEval's line retrieval)
    # robust: the gist, or the last lines, suffice
    "continuation": (ROBUST, continuation, True),       # the next lines follow the last ones
    "code_completion": (ROBUST, code_completion, True),  # the same over stdlib source
    "summary": (ROBUST, summary, True),                 # the gist of the text
    "paraphrase": (ROBUST, paraphrase, True),           # rewrite the last paragraph: local
    "title": (ROBUST, title, True),                     # the gist in a few words
    "keywords": (ROBUST, keyword_kind, True),           # frequent terms, seen many times
    "gist_translation": (ROBUST, gist_translation, True),  # the gist, in another language
    "few_shot": (ROBUST, few_shot, True),               # in-context classification of the last snippet
    # held out (eval only)
    "variable_tracking": (SENSITIVE, variable_tracking, False),  # follow VAR chains (RULER vt)
    "common_words": (SENSITIVE, common_words, False),   # the most frequent words of a list (RULER cwe)
    "code_needle": (SENSITIVE, code_needle, False),      # a constant planted in source code
    "outline": (ROBUST, outline, False),                # the main points of a text
    "explain_code": (ROBUST, explain_code, False),      # what a module is for
    "questions_about": (ROBUST, questions_about, False),  # questions a reader might ask
}
KINDS = tuple(k for k, (_, _, trained) in KIND_TABLE.items() if trained)
HELDOUT_KINDS = tuple(k for k, (_, _, trained) in KIND_TABLE.items() if not trained)
KIND_CLASS = {k: c for k, (c, _, _) in KIND_TABLE.items()}
N_TRAIN_INSTRUCTIONS, N_TRAIN_QUESTIONS = 6, 3  # of a trained kind's 8 instructions and 4 questions


def wordings(plan: Plan, kind: str, split: str):
    """The instruction and question pools a split draws from (a held-out kind: all of its own)."""
    if not KIND_TABLE[kind][2]:
        return plan.instructions, plan.questions
    cut_i, cut_q = N_TRAIN_INSTRUCTIONS, N_TRAIN_QUESTIONS
    if split == "train":
        return plan.instructions[:cut_i], plan.questions[:cut_q]
    return plan.instructions[cut_i:], plan.questions[cut_q:]
