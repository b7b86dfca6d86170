"""
The texts of the built-in mix (tasks.py, human.py; docs/training.md: Data) and what is read from them. Every text
is one that a fresh machine with Python 3.11 has offline: the documentation topics (pydoc_data.topics), the standard
library's docstrings and its source (its top-level modules and those of the packages every install ships; tests,
IDLE and the GUI modules, which some installs leave out, are not used).

    names(source), document(source, name)    the documents: "docs", "docstrings" (one module's, as one text), "code"
    is_heldout(name)                          the held-out documents: the names that hash into bucket 0 of 5
    Texts(tokenizer, split)                   one split's documents as token tapes
    planted, listed, tail_text, around        the ways a context of n tokens is cut (and lines planted in it)
    Plan, one_doc, sentences, title_of        what a kind builds for one sample, and helpers on whole documents
    code_facts, prose_facts, word_facts       facts a document states itself: a parameter's default, the exception a
                                              function raises, a version note, a number in a sentence, how often a
                                              word occurs; each with the characters that hold it

A context built around a fact holds it at a uniform depth, whatever its length; the fact is chosen so that what the
question names occurs in every such context exactly as often as the answer says (find()).
Nothing runs on its own; `pytest test_data.py` checks every kind built on these, and every kind of fact in contexts
of several lengths (test_facts_stand_in_every_context).
"""
import ast
import glob
import hashlib
import os
import re
import sysconfig
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from functools import lru_cache
from itertools import accumulate
from typing import Callable

# -----------------------------------------------------------------------------
# Documents

HELDOUT_BUCKETS = 5  # a document is held out iff its name hashes to bucket 0 of these (about 1 in 5)
# the standard library's packages whose modules every CPython 3.11 install has (Debian, for one, ships tkinter,
# idlelib, lib2to3 and distutils apart; Docker images drop the tests)
PACKAGES = ("asyncio", "collections", "concurrent", "email", "html", "http", "importlib", "json", "logging",
            "multiprocessing", "re", "sqlite3", "tomllib", "unittest", "urllib", "wsgiref", "xml", "xmlrpc", "zoneinfo")


def is_heldout(name: str) -> bool:
    """A document by its name (a module's source and its docstrings share their split)."""
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % HELDOUT_BUCKETS == 0


@lru_cache(maxsize=None)
def _stdlib_files():
    """The standard library's modules (the largest skipped), sorted: dotted name -> path."""
    root = sysconfig.get_paths()["stdlib"]
    files = glob.glob(os.path.join(root, "*.py"))
    files += [f for p in PACKAGES for f in glob.glob(os.path.join(root, p, "**", "*.py"), recursive=True)]
    out = {}
    for f in files:
        parts = os.path.relpath(f, root)[:-3].split(os.sep)
        if 2_000 < os.path.getsize(f) < 150_000 and not {"test", "tests"} & set(parts):
            out[".".join(parts).removesuffix(".__init__")] = f
    return dict(sorted(out.items()))


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
    """The documents of one split, tokenised on first use, as token tapes with their line starts. The train split
    has the documents that are not held out; every other split ("heldout", "human") has the held-out ones."""

    def __init__(self, tokenizer, split: str):
        self.tokenizer, self.split = tokenizer, split
        self._docs = {s: [n for n in names(s) if is_heldout(n) == (split != "train")]
                      for s in ("docs", "docstrings", "code")}
        self._ids, self._newline, self._offsets = {}, {}, {}

    def ids(self, source, i):
        if (source, i) not in self._ids:
            text = document(source, self._docs[source][i])
            self._ids[source, i] = self.tokenizer(text + "\n\n", add_special_tokens=False).input_ids if text else []
        return self._ids[source, i]

    def offsets(self, source, name):
        """(token ids of the document and a blank line, the character where each token starts)."""
        if (source, name) not in self._offsets:
            enc = self.tokenizer(document(source, name) + "\n\n", add_special_tokens=False,
                                 return_offsets_mapping=True)
            self._offsets[source, name] = enc.input_ids, [a for a, _ in enc.offset_mapping]
        return self._offsets[source, name]

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
# Contexts: text with lines planted in it, a list of items, the text before a cut, the text around a fact


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


def around(texts, rng, ids, a: int, b: int):
    """context(n): n tokens of ids with the tokens [a, b) (a fact) at a uniform depth after the first HEAD tokens;
    ids must hold n tokens on either side of them."""
    depth = rng.random()

    def context(n):
        room = n - HEAD - (b - a)
        before = HEAD + int(depth * room) if room >= 0 else max(0, n - (b - a))  # too short: the fact's start stays
        return texts.decode(ids[a - before:a - before + n])
    return context

# -----------------------------------------------------------------------------
# Plans: what a kind builds for one sample (tasks.py, human.py), and helpers on whole documents

SENSITIVE, ROBUST = 0, 1  # task classes; index SparsityConstraint's targets (0.7, 1.0) in router.py


@dataclass
class Plan:
    instructions: tuple[str, ...]     # wordings of the instruction: the first n_train train, the rest held out
    questions: tuple[str, ...]        # wordings of the question (format fields filled), likewise
    answer: str
    context: Callable[[int], str]     # n tokens -> the context
    keys: tuple[str, ...] = ()        # strings a correct answer contains (sensitive kinds)


def one_doc(rng, texts, n_max, sources=("docs", "docstrings")):
    """context(n) of whole documents, and the first document's name and text."""
    ids, names, _ = texts.tape(rng, sources, n_max + 64)
    first = next(document(s, names[0]) for s in sources if names[0] in texts._docs[s])
    return (lambda n: texts.decode(ids[:n])), names[0], first


def sentences(text: str, n: int, limit: int = 300) -> str:
    """The first n sentences of a text, cut at a word to at most `limit` characters: a surrogate answer stays short
    enough for short samples."""
    out = " ".join(re.split(r"(?<=[.!?])\s+", " ".join(text.split()))[:n])
    return out if len(out) <= limit else out[:limit].rsplit(" ", 1)[0]


def title_of(name: str) -> str:
    return name.replace("-", " ").replace("_", " ").strip().capitalize()


# -----------------------------------------------------------------------------
# Facts a document states itself


@dataclass(frozen=True)
class Fact:
    span: tuple[int, int]               # characters of the document that hold the answer and what the question names
    ask: tuple[str, ...]                # what the question names: a function, a parameter, a word, a sentence
    keys: tuple[str, ...]               # strings a correct answer contains
    occurs: tuple[tuple[str, int], ...]  # (string, times): how often each must occur in any context (case ignored)


def _flat(text: str) -> str:
    return " ".join(text.split()).lower()


def find(texts, rng, sources, facts, kind: str, n_max: int):
    """(context(n), fact): a fact of this kind (facts(source, name)[kind]: code_facts, prose_facts or word_facts) in
    one of the split's documents of the sources, that fits in a quarter of n_max tokens (at most 400) and whose
    `occurs` hold in the whole text that any context(n <= n_max) is cut from. The context holds the fact's document
    with others of its source on either side."""
    budget = max(24, min(400, n_max // 4))
    docs = [(s, name) for s in sources for name in texts._docs[s]]
    for _ in range(300):
        source, name = rng.choice(docs)
        found = [f for f in facts(source, name)[kind] if f.span[1] - f.span[0] <= 8 * budget]
        if not found:
            continue
        ids, starts = texts.offsets(source, name)
        before, after = (texts.tape(rng, (source,), n_max + 64)[0] for _ in range(2))
        tape = before + ids + after
        for fact in rng.sample(found, min(len(found), 8)):
            a = len(before) + bisect_right(starts, fact.span[0]) - 1
            b = len(before) + bisect_left(starts, fact.span[1])
            if b - a > budget:
                continue
            extent = _flat(texts.decode(tape[a - n_max - 64:b + n_max + 64]))
            if all(extent.count(_flat(s)) == times for s, times in fact.occurs):
                return around(texts, rng, tape, a, b), fact
    raise ValueError(f"no {kind} fact ({facts.__name__}) of the {texts.split} split's {sources} fits in a quarter of "
                     f"{n_max} tokens; raise max_len")


def _third_person(line: str) -> str:
    """'Return the path.' -> 'returns the path' (a docstring's imperative first line as what a function does);
    '' when the line does not open with a verb of VERBS."""
    verb, _, rest = line.rstrip(".").partition(" ")
    if verb not in VERBS or not rest:
        return ""
    v = verb.lower()
    v = v[:-1] + "ies" if v.endswith("y") else v + "es" if v.endswith(("s", "sh", "ch", "x")) else v + "s"
    return f"{v} {rest}"


VERBS = set("""Return Set Read Get Create Write Execute Process Open Parse Print Run Generate Add Format Check Construct
Convert Move Copy Delete Remove Find Bind Calculate Start Extract Turn Send Split Make Load Save Update Close Build
Compute Encode Decode Handle Call Register Emit Insert Append Clear Reset Wait Apply Initialize Determine Compare
Translate Search Match Replace Join Push Fetch Yield Count Flush Stop Accept Change Install Ensure Show Display
Prepare Test Validate Verify Look Collect Strip Fill Store Resolve Define Wrap Enable Disable Lock Release""".split())


def _literal(lines: list[bytes], node) -> str:
    """The source text of a default or constant worth asking about ('' for none): a number, True/False/None, or a
    plain string of 2-40 characters (the key, without its quotes), on one line. lines: the source's, as UTF-8 (the
    column offsets of ast count bytes)."""
    if node.lineno != node.end_lineno:
        return ""
    seg = lines[node.lineno - 1][node.col_offset:node.end_col_offset].decode(errors="replace")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    if not isinstance(node, ast.Constant):
        return ""
    if isinstance(node.value, str):
        plain = seg[:1] in "'\"" and seg[1:-1] == node.value
        return node.value if plain and 2 <= len(node.value) <= 40 and node.value.isprintable() else ""
    return seg if isinstance(node.value, (int, float, bool, type(None))) and len(seg) <= 20 else ""


def _raised(func) -> set[str]:
    """Names of the exceptions a function's own body raises (not its nested functions and classes)."""
    out, todo = set(), list(func.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            out.add(exc.id if isinstance(exc, ast.Name) else "")
        todo += list(ast.iter_child_nodes(node))
    return out


@lru_cache(maxsize=1024)
def code_facts(source: str, name: str) -> dict[str, list[Fact]]:
    """What a module's source (source "code") states, by kind: "default" (of a parameter), "raises" (the one
    exception a function raises), "purpose" (a function's docstring line; "does": those that open with a verb),
    "owner" (the class of a method), "methods" (all of a class's), "constant" (a module-level assignment)."""
    text = document(source, name)
    out = {k: [] for k in ("default", "raises", "purpose", "does", "owner", "methods", "constant")}
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return out
    rows = text.split("\n")  # as ast counts lines (str.splitlines would also split at a form feed)
    line = [0, *accumulate(len(s) + 1 for s in rows)]
    utf8 = [s.encode() for s in rows]

    def span(first, last):  # lines first..last (1-based, inclusive) -> characters
        return line[first - 1], line[last]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("__"):
            anchor = (f"def {node.name}(", 1)
            sig = span(node.lineno, max(node.lineno, node.body[0].lineno - 1))
            a = node.args
            pos = a.posonlyargs + a.args
            for arg, d in [*zip(pos[len(pos) - len(a.defaults):], a.defaults), *zip(a.kwonlyargs, a.kw_defaults)]:
                if d is not None and _literal(utf8, d):
                    out["default"].append(Fact(sig, (node.name, arg.arg), (_literal(utf8, d),), (anchor,)))
            raised = _raised(node)
            if len(raised) == 1 and "" not in raised:
                last = max(r.end_lineno for r in ast.walk(node) if isinstance(r, ast.Raise))
                out["raises"].append(Fact(span(node.lineno, last), (node.name,), tuple(raised), (anchor,)))
            first = (ast.get_docstring(node) or "").split("\n")[0].strip()
            at = text.find(first, line[node.body[0].lineno - 1])  # the docstring's first line, maybe below its quotes
            if 25 <= len(first) <= 100 and first[0].isupper() and first.endswith(".") and at >= 0:  # a whole sentence
                fact = Fact((line[node.lineno - 1], at + len(first)), (first, _third_person(first)), (node.name,),
                            (anchor, (first, 1)))
                out["purpose"].append(fact)
                if fact.ask[1]:
                    out["does"].append(fact)
        if isinstance(node, ast.ClassDef):
            methods = [m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
            for m in methods:
                if not m.name.startswith("__"):
                    out["owner"].append(Fact(span(node.lineno, m.lineno), (m.name,), (node.name,),
                                             ((f"def {m.name}(", 1), (f"class {node.name}", 1))))
            if 2 <= len(methods) <= 8:
                out["methods"].append(Fact(span(node.lineno, node.end_lineno), (node.name,),
                                           tuple(m.name for m in methods), ((f"class {node.name}", 1),)))
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and _literal(utf8, node.value) not in ("", "None"):  # "x = None" only declares a name
            target = node.targets[0].id
            out["constant"].append(Fact(span(node.lineno, node.end_lineno), (target,), (_literal(utf8, node.value),),
                                        ((f"{target} =", 1),)))
    return out


NUMBER = re.compile(r"(?<![\w.])\d{2,}(?![\w.])")


@lru_cache(maxsize=1024)
def prose_facts(source: str, name: str) -> dict[str, list[Fact]]:
    """What a text's prose states, by kind: "version" (the version of a "Changed in version X.Y:" note, and what
    changed), "number" (a sentence with one number in it, the number blanked out)."""
    text = document(source, name)
    out = {"version": [], "number": []}
    for m in re.finditer(r"(?:Changed in|Deprecated since) version (\d+\.\d+): ((?:[^\n]+\n?)+)", text):
        what = re.split(r"(?<=\.)\s", m.group(2))[0]  # what changed: its first sentence
        first = m.group(2).split("\n")[0]
        if 30 <= len(what) <= 120 and len(first) >= 20:  # quoted in the question: short
            out["version"].append(Fact((m.start(), m.start(2) + len(what)), (" ".join(what.split()),), (m.group(1),),
                                       ((first, 1),)))
    for p in re.finditer(r"(?:[^\n]+\n?)+", text):  # paragraphs; none with code in it
        if re.search(r"^\s*(>>>|\.\.\.|\$|\|)|::", p.group(), re.M):
            continue
        for s in re.finditer(r"[A-Z][^.!?]*[.!?](?=\s|$)", p.group()):
            flat = " ".join(s.group().split())
            nums = re.findall(r"\d+", flat)
            if 40 <= len(flat) <= 160 and len(nums) == 1 and NUMBER.search(flat):
                a = p.start() + s.start()
                out["number"].append(Fact((a, a + len(s.group())), (NUMBER.sub("___", flat),), (nums[0],),
                                          ((flat, 1),)))
    return out


WORD = re.compile(r"(?<![\w.])[A-Za-z_][A-Za-z0-9_]{3,}(?![\w])")


@lru_cache(maxsize=1024)
def word_facts(source: str, name: str) -> dict[str, list[Fact]]:
    """How a text uses its words, by kind: "count" (a word that occurs 2-7 times, never inside a longer word: the
    count) and "lines" (a word on 2-3 short lines: those lines). Common English words are not asked about."""
    text = document(source, name)
    out, where = {"count": [], "lines": []}, {}
    for m in WORD.finditer(text):
        where.setdefault(m.group(), []).append(m.start())
    low = text.lower()
    for word, at in where.items():
        if not 2 <= len(at) <= 7 or word.lower() in COMMON or low.count(word.lower()) != len(at):
            continue  # the last: every occurrence, case ignored, is this whole word (a count can be read one way)
        span = (text.rfind("\n", 0, at[0]) + 1, at[-1] + len(word))
        out["count"].append(Fact(span, (word,), (str(len(at)),), ((word, len(at)),)))
        lines = sorted({(text.rfind("\n", 0, a) + 1, _line_end(text, a)) for a in at})
        shown = [text[a:b].strip() for a, b in lines]
        if 2 <= len(lines) <= 3 and all(10 <= len(s) <= 80 for s in shown):  # the answer quotes them: short
            out["lines"].append(Fact((lines[0][0], lines[-1][1]), (word,), tuple(shown), ((word, len(at)),)))
    return out


def _line_end(text: str, at: int) -> int:
    end = text.find("\n", at)
    return len(text) if end < 0 else end


COMMON = set("""that this these those with from which have been were when where what will would there their other
more most some such than then them they into only also each used uses using must should could about after before
between both same very here just like over under your does done make made many much well even back down first last
next true false none self return value values none""".split())
