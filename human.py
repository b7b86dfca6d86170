"""
The human-style prompts: held-out kinds written the way people write to a chat model (casual, terse, typos left in,
the text pasted after "here's the doc:", the question before the text, after it or both), for measuring whether
routing holds on prompts that no template of the training mix wrote (docs/training.md: Data). Training never draws them:
data.SyntheticMix(..., split="human") does, over the held-out documents, and eval.py reports them apart.

The facts asked about are the ones the trained kinds read from real texts (texts.find: a parameter's default, the
exception a function raises, a version note, a number in a sentence, how often a word occurs, a class's methods, the
lines that mention a word); the robust requests are a summary, an explanation, a fix, a continuation, a rewrite.
Each kind is a function (rng, texts, n_max) -> texts.Plan, as in tasks.py; its "instructions" are lead-ins that
stand right before the pasted text. Nothing runs on its own; `pytest test_data.py` checks every kind.
"""
from texts import (ROBUST, SENSITIVE, Plan, code_facts, document, find, one_doc, prose_facts, sentences, tail_text,
                   word_facts)

DOC_LEAD = ("here's the doc:", "text:", "pasting it below", "this is from the python docs:", "ok so here it is",
            "context:")
CODE_LEAD = ("here's the code:", "code:", "from the stdlib source:", "pasting the file here", "ok here's the module",
             "the file:")

# -----------------------------------------------------------------------------
# Sensitive: the answer is a detail the text states once


def default(rng, texts, n_max):
    context, f = find(texts, rng, ("code",), code_facts, "default", n_max)
    func, param = f.ask
    return Plan(CODE_LEAD,
                (f"quick q: whats the default for {param} in {func}()?", f"what does {param} default to in {func}",
                 f"if i dont pass {param} to {func}, what do i get?", f"{func}() - default value of {param}??",
                 f"can you tell me the default {param} of {func}"),
                f"{param} defaults to {f.keys[0]}.", context, f.keys)


def throws(rng, texts, n_max):
    context, f = find(texts, rng, ("code",), code_facts, "raises", n_max)
    func = f.ask[0]
    return Plan(CODE_LEAD,
                (f"what error does {func} throw", f"which exception do i need to catch when calling {func}()?",
                 f"does {func} raise anything? which exeption?", f"{func} - what does it raise"),
                f"{func} raises {f.keys[0]}.", context, f.keys)


def which_function(rng, texts, n_max):
    context, f = find(texts, rng, ("code",), code_facts, "does", n_max)
    first, does = f.ask
    todo = first[0].lower() + first[1:].rstrip(".")
    return Plan(CODE_LEAD,
                (f"which function {does}?", f"whats the name of the func that {does}",
                 f"i need the function that {does} - what's it called?", f"what do i call to {todo}?"),
                f.keys[0], context, f.keys)


def how_many(rng, texts, n_max):
    context, f = find(texts, rng, ("docs", "docstrings", "code"), word_facts, "count", n_max)
    word = f.ask[0]
    return Plan(DOC_LEAD + CODE_LEAD[:2],
                (f"how many times does '{word}' appear in this?", f"count how often {word} shows up pls",
                 f"how many {word}s are in here", f"quick count: occurences of {word}?",
                 f"how many times is {word} mentioned"),
                f"{f.keys[0]} times.", context, f.keys)


def methods_of(rng, texts, n_max):
    context, f = find(texts, rng, ("code",), code_facts, "methods", n_max)
    cls = f.ask[0]
    return Plan(CODE_LEAD,
                (f"what methods does {cls} have", f"list all the methods in {cls} pls",
                 f"can u list every method of {cls}?", f"{cls}: which methods?"),
                ", ".join(f.keys), context, f.keys)


def when_changed(rng, texts, n_max):
    context, f = find(texts, rng, ("docs",), prose_facts, "version", n_max)
    what = f.ask[0]
    return Plan(DOC_LEAD,
                (f'when did this change: "{what}"? which python version', f"what version changed this -> {what}",
                 f'the docs say this changed at some point: "{what}" - which version?',
                 f"since which python is this true: {what}"),
                f"Python {f.keys[0]}.", context, f.keys)


def which_number(rng, texts, n_max):
    context, f = find(texts, rng, ("docs", "docstrings"), prose_facts, "number", n_max)
    cloze = f.ask[0]
    return Plan(DOC_LEAD,
                (f'the doc says something like "{cloze}" - whats the number there?',
                 f'what\'s the number in "{cloze}"?', f"fill in the number: {cloze}",
                 f'what number does it give here: "{cloze}"'),
                f.keys[0], context, f.keys)


def show_lines(rng, texts, n_max):
    context, f = find(texts, rng, ("docs", "docstrings", "code"), word_facts, "lines", n_max)
    word = f.ask[0]
    return Plan(DOC_LEAD + CODE_LEAD[:2],
                (f"show me every line that mentions {word}", f"grep for {word} - which lines have it?",
                 f"find all the lines with '{word}' in them", f"which lines say {word}? paste them"),
                "\n".join(f.keys), context, f.keys)

# -----------------------------------------------------------------------------
# Robust: the gist of the text, or its last lines


def tldr(rng, texts, n_max):
    context, _, first = one_doc(rng, texts, n_max)
    return Plan(DOC_LEAD,
                ("tl;dr this", "tldr pls", "can you summarize this for me?", "whats this about? short version",
                 "give me the gist", "summarise in 2 sentences plz"),
                sentences(first, 2), context)


def explain(rng, texts, n_max):
    context, name, _ = one_doc(rng, texts, n_max, ("code",))
    return Plan(CODE_LEAD,
                ("what does this code do?", "explain this code like im 5", "can you walk me through this file",
                 "what is this module for?", "eli5 this code pls"),
                sentences(document("docstrings", name) or f"The {name} module.", 2), context)  # its own docstrings


def fix(rng, texts, n_max):
    context, _, _ = tail_text(texts, rng, ("code",), n_max)
    return Plan(CODE_LEAD,
                ("theres a bug somewhere at the end of this, can you fix it?", "fix this code pls",
                 "this doesnt work, whats wrong with the last part?", "can you clean up the end of this file"),
                context(60).strip(), context)  # the surrogate answer: the last lines, as they are


def keep_going(rng, texts, n_max):
    source = rng.choice((("docs", "docstrings"), ("code",)))
    context, answer, _ = tail_text(texts, rng, source, n_max)
    return Plan(DOC_LEAD + CODE_LEAD[:2],
                ("finish this for me", "keep going from where it stops", "continue pls", "write the rest of this"),
                answer, context)


def reword(rng, texts, n_max):
    context, _, _ = tail_text(texts, rng, ("docs", "docstrings"), n_max)
    return Plan(DOC_LEAD,
                ("make the last bit easier to read", "can you reword the last paragraph, its confusing",
                 "rewrite the ending so a beginner gets it", "too formal - rewrite the end casually"),
                context(80).strip(), context)  # the surrogate answer: the last lines, as they are


HUMAN_TABLE = {  # kind -> (class, builder, "human"), as tasks.KIND_TABLE holds them
    "human_default": (SENSITIVE, default, "human"),
    "human_throws": (SENSITIVE, throws, "human"),
    "human_which_function": (SENSITIVE, which_function, "human"),
    "human_how_many": (SENSITIVE, how_many, "human"),
    "human_methods": (SENSITIVE, methods_of, "human"),
    "human_when_changed": (SENSITIVE, when_changed, "human"),
    "human_which_number": (SENSITIVE, which_number, "human"),
    "human_show_lines": (SENSITIVE, show_lines, "human"),
    "human_tldr": (ROBUST, tldr, "human"),
    "human_explain": (ROBUST, explain, "human"),
    "human_fix": (ROBUST, fix, "human"),
    "human_keep_going": (ROBUST, keep_going, "human"),
    "human_reword": (ROBUST, reword, "human"),
}
