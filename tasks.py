"""
The task kinds of the built-in training mix (data.SyntheticMix; Elastic Attention, arXiv 2601.17367, trains its
routers on tasks of two classes; docs/training.md: Data). A router must learn the *task* (does the answer need keys from
anywhere in the context, or does the recent text do?), not a prompt's template, so the mix varies everything
but the task: many kinds per class, several wordings per kind, the instruction before the context, after it or
absent, the question before it, after it or on both sides, and texts from three sources a fresh machine has offline
(texts.py). Sensitive kinds plant a fact in the text (RULER's needles) or ask about one the text states itself (a
parameter's default, the exception a function raises, a version note, a number in a sentence, how often a word
occurs, a class's methods); robust kinds ask for the gist, a rewrite or the next lines.

Kinds, one line each in KIND_TABLE: the class and why (sensitive: the answer depends on a few tokens anywhere in a
long context, which a sink + window cache loses; robust: it depends on the gist or on the last lines).
Held-out kinds, wordings and texts (split="heldout") are never drawn for training; eval.py measures routing on
them. Held-out texts: the documents whose name hashes into bucket 0 of 5 (texts.is_heldout). Held-out wordings: the
last two instructions and the last question of each trained kind. The human-style kinds (human.py, split="human")
are held out as well.

Every kind is a function (rng, texts, n_max) -> texts.Plan: the instruction and question pools, the answer, the
strings a correct answer contains (keys; sensitive kinds), and context(n): the context text of about n tokens.
Nothing runs on its own; `pytest test_data.py` checks every kind.
"""
import re
from collections import Counter

from human import HUMAN_TABLE
from texts import (ROBUST, SENSITIVE, Plan, code_facts, document, find, listed, one_doc, planted, prose_facts,
                   sentences, tail_text, title_of, word_facts)

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


def keywords(text: str, n: int = 5) -> list[str]:
    words = [w.lower() for w in re.findall(r"[A-Za-z_]{5,}", text)]
    return [w for w, _ in Counter(w for w in words if w not in STOP).most_common(n)]


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
# Sensitive kinds over what a real text states (trained): no planted line; the question names something the text
# says once (a function, a sentence, a word) and its answer stands wherever that is (texts.find)

CODE_INSTRUCTIONS = ("The Python source below is from the standard library.", "Read the following code.",
                     "Here is a Python module.", "Answer from the code that follows.",
                     "The next text is Python source; answer from it.", "Below is part of a library's source.",
                     "Look the answer up in the module below.", "Consult the following source file.")
TEXT_INSTRUCTIONS = ("Answer the question from the documentation below.", "Read the following text.",
                     "Here is a document.", "Use the text that follows to answer.",
                     "The passage below is from a manual; answer from it.", "Below is some reference material.",
                     "Look the answer up in the document below.", "Consult the following text.")


def param_default(rng, texts, n_max):
    context, f = find(texts, rng, ("code",), code_facts, "default", n_max)
    func, param = f.ask
    return Plan(CODE_INSTRUCTIONS,
                (f"What is the default value of the parameter `{param}` of `{func}`?",
                 f"In the code, what does `{param}` default to in `{func}()`?",
                 f"Which default does `{func}` give its `{param}` argument?",
                 f"If `{param}` is not passed to `{func}`, what value does it take?"),
                f"The default of `{param}` in `{func}` is {f.keys[0]}.", context, f.keys)


def raises(rng, texts, n_max):
    context, f = find(texts, rng, ("code",), code_facts, "raises", n_max)
    func = f.ask[0]
    return Plan(CODE_INSTRUCTIONS,
                (f"Which exception does `{func}` raise?", f"According to the code, what error can `{func}()` raise?",
                 f"Name the exception class that `{func}` raises.", f"When `{func}` fails, which exception is thrown?"),
                f"`{func}` raises {f.keys[0]}.", context, f.keys)


def function_for(rng, texts, n_max):
    context, f = find(texts, rng, ("code",), code_facts, "purpose", n_max)
    first, does = f.ask
    quoted = (f'Which function is documented as "{first}"?', f'Name the function whose docstring says "{first}".',
              f'The docstring "{first}" belongs to which function?', f'Whose docstring begins "{first}"?')
    return Plan(CODE_INSTRUCTIONS,
                (f"Which function {does}?", f"What is the name of the function that {does}?",
                 quoted[1], f"Name the function in the code that {does}.") if does else quoted,
                f"That is `{f.keys[0]}`.", context, f.keys)


def version_note(rng, texts, n_max):
    context, f = find(texts, rng, ("docs",), prose_facts, "version", n_max)
    what = f.ask[0]
    return Plan(TEXT_INSTRUCTIONS,
                (f'According to the text, in which Python version did this change: "{what}"?',
                 f'Which version does the documentation give for this change: "{what}"?',
                 f'In what version of Python was this changed, as the text says: "{what}"?',
                 f'When, in Python versions, did the following change? "{what}"'),
                f"In Python {f.keys[0]}.", context, f.keys)


def number_lookup(rng, texts, n_max):
    context, f = find(texts, rng, ("docs", "docstrings"), prose_facts, "number", n_max)
    cloze = f.ask[0]
    return Plan(TEXT_INSTRUCTIONS,
                (f'What number fills the blank in this sentence from the text: "{cloze}"?',
                 f'The text says: "{cloze}" Which number is missing?',
                 f'Complete the sentence with the number the document gives: "{cloze}"',
                 f'Which number does the text state here: "{cloze}"?'),
                cloze.replace("___", f.keys[0]), context, f.keys)


def word_count(rng, texts, n_max):
    context, f = find(texts, rng, ("docs", "docstrings", "code"), word_facts, "count", n_max)
    word, k = f.ask[0], f.keys[0]
    return Plan(TEXT_INSTRUCTIONS,
                (f'How many times does the word "{word}" occur in the text?', f'Count the occurrences of "{word}".',
                 f'How often is "{word}" mentioned in the document?',
                 f'What is the number of times "{word}" appears in the text?'),
                f'"{word}" occurs {k} times.', context, f.keys)


def list_methods(rng, texts, n_max):
    context, f = find(texts, rng, ("code",), code_facts, "methods", n_max)
    cls = f.ask[0]
    return Plan(CODE_INSTRUCTIONS,
                (f"List every method that the class `{cls}` defines.", f"Which methods does `{cls}` have? Name all.",
                 f"Name all the methods of the class `{cls}` in the code.",
                 f"What are the methods defined in `{cls}`?"),
                f"`{cls}` defines {', '.join(f.keys)}.", context, f.keys)


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


def summary(rng, texts, n_max):
    context, name, first = one_doc(rng, texts, n_max)
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
    context, name, _ = one_doc(rng, texts, n_max)
    return Plan(("Read the document below.", "Here is a text.", "The following is documentation.",
                 "Consider the passage below.", "Below is some reference text.", "This is a manual excerpt.",
                 "The text below needs a heading.", "Look at the following material."),
                ("Give it a short title.", "Suggest a title for this text.", "What would be a good heading?",
                 "Name the text in a few words."),
                f"{title_of(name)}", context)


def keyword_kind(rng, texts, n_max):
    context, name, first = one_doc(rng, texts, n_max)
    return Plan(("Read the following text.", "Here is a document.", "The passage below is technical.",
                 "Below is an excerpt from documentation.", "Consider this text.", "Look at the material below.",
                 "The document that follows is long.", "A text from a reference manual follows."),
                ("List five keywords for it.", "Which keywords describe this text?",
                 "Give the main terms of the text.", "Extract a few key terms."),
                ", ".join(keywords(first)), context)


def gist_translation(rng, texts, n_max):
    context, name, first = one_doc(rng, texts, n_max)
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


def main_topic(rng, texts, n_max):
    context, name, first = one_doc(rng, texts, n_max)
    return Plan(("Here is a document.", "Read the following text.", "The passage below is from a manual.",
                 "Below is some documentation.", "Consider the text that follows.", "A technical text follows.",
                 "The document below is long.", "Have a look at this material."),
                ("What is the main topic of this text?", "What is the document mostly about?",
                 "In a sentence or two, what does this text cover?", "What subject does the passage deal with?"),
                sentences(first, 2), context)


def audience(rng, texts, n_max):
    context, name, _ = one_doc(rng, texts, n_max)
    return Plan(("Read the following text.", "Here is a piece of documentation.", "The text below is technical.",
                 "Consider the document that follows.", "Below is an excerpt.", "Look at this passage.",
                 "A manual page follows.", "The material below is reference text."),
                ("Who is this text written for?", "What kind of reader is this document meant for?",
                 "Describe the intended audience of the text.", "Who would find this passage useful?"),
                f"Python programmers who want to know about {title_of(name).lower()}.", context)


def simplify(rng, texts, n_max):
    context, name, first = one_doc(rng, texts, n_max)
    return Plan(("Here is a text.", "Read the documentation below.", "The following passage is hard to read.",
                 "Below is a technical document.", "Consider the text that follows.", "This is a manual excerpt.",
                 "A dense piece of documentation follows.", "Here is the material in question."),
                ("Rewrite this text in plain words for a beginner.", "Explain the whole passage in simpler language.",
                 "Make this document easier to read.", "Restate the text for someone new to Python."),
                sentences(first, 3), context)


def refactor_end(rng, texts, n_max):
    context, _, _ = tail_text(texts, rng, ("code",), n_max)
    return Plan(("Here is some Python code.", "Read the module below.", "The following is Python source.",
                 "Below is part of a Python file.", "Consider this code.", "A Python module follows.",
                 "The code below works but reads badly.", "Look at the source below."),
                ("Rewrite the last function of the code to make it easier to read.",
                 "Refactor the final lines of this code.", "Clean up the code at the end of the file.",
                 "Improve the readability of the last block of code."),
                context(60).strip(), context)  # the surrogate answer: the last lines, as they are


def write_tests(rng, texts, n_max):
    context, name, _ = one_doc(rng, texts, n_max, ("code",))
    return Plan(("Here is a Python module.", "Read the code below.", "The following is Python source.",
                 "Below is a module of the standard library.", "Consider this code.", "A Python file follows.",
                 "The module below has no tests yet.", "Look at the following source."),
                ("Write unit tests for this module.", "Add a few unittest tests for the code.",
                 "How would you test this code? Write the tests.", "Write pytest tests that cover this module."),
                f"import unittest\nimport {name}\n\n\nclass Test{title_of(name).title().replace(' ', '')}"
                f"(unittest.TestCase):\n    def test_import(self):\n        self.assertTrue({name}.__doc__)", context)


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
    context, name, first = one_doc(rng, texts, n_max)
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
    context, name, first = one_doc(rng, texts, n_max)
    return Plan(("Read the following text.", "Here is a passage from a manual.", "Consider the document below.",
                 "Below is a technical text."),
                ("Write three questions a student might ask about it.", "What questions does this text raise?"),
                f"What is {title_of(name).lower()}? How is it used? When should it be avoided?", context)


def method_class(rng, texts, n_max):
    context, f = find(texts, rng, ("code",), code_facts, "owner", n_max)
    return Plan(("This is a module of the standard library.", "Study the source below.", "The code below is complete.",
                 "Here is the full text of a module."),
                (f"Which class defines the method `{f.ask[0]}`?",
                 f"In the code, `{f.ask[0]}` is a method of which class?"),
                f"`{f.ask[0]}` is a method of `{f.keys[0]}`.", context, f.keys)


def module_constant(rng, texts, n_max):
    context, f = find(texts, rng, ("code",), code_facts, "constant", n_max)
    return Plan(("This is a module of the standard library.", "Study the source below.", "The code below is complete.",
                 "Here is the full text of a module."),
                (f"What is `{f.ask[0]}` set to in the code?", f"Which value does the module assign to `{f.ask[0]}`?"),
                f"`{f.ask[0]}` is {f.keys[0]}.", context, f.keys)


def grep_lines(rng, texts, n_max):
    context, f = find(texts, rng, ("docs", "docstrings", "code"), word_facts, "lines", n_max)
    return Plan(("Below is a long text.", "Search through the following material.", "Scan the document that follows.",
                 "Here is the material to search."),
                (f'Quote every line of the text that contains "{f.ask[0]}".',
                 f'Copy out all the lines that mention "{f.ask[0]}".'),
                "\n".join(f.keys), context, f.keys)


def code_review(rng, texts, n_max):
    context, name, _ = one_doc(rng, texts, n_max, ("code",))
    return Plan(("Below is a Python file.", "Study the source that follows.", "The code below was just written.",
                 "Here is the module to review."),
                ("How could this code be improved?", "Review this module: what would you change?"),
                sentences(document("docstrings", name) or f"The {name} module.", 1)
                + " Its functions could use shorter bodies and more comments.", context)


def next_topic(rng, texts, n_max):
    context, name, _ = one_doc(rng, texts, n_max)
    return Plan(("Here is part of a manual.", "Below is documentation.", "Consider the document below.",
                 "Study the following text."),
                ("What should the next section of this document cover?",
                 "Suggest what a follow-up section to this text would discuss."),
                f"Further examples of {title_of(name).lower()}.", context)


# -----------------------------------------------------------------------------
# The table: kind -> (class, builder, group); group "train" (drawn for training), "heldout" (eval only) or "human"
# (the human-style prompts, eval only: human.py)

KIND_TABLE = {
    # sensitive: the answer is a few tokens that may sit anywhere in the context
    "passkey": (SENSITIVE, passkey, "train"),              # one number planted in text (RULER niah_single)
    "word_needle": (SENSITIVE, word_needle, "train"),      # one word planted in text
    "multi_key": (SENSITIVE, multi_key, "train"),          # several keyed numbers, one asked (niah_multikey)
    "multi_value": (SENSITIVE, multi_value, "train"),      # all values of one key (niah_multivalue)
    "multi_query": (SENSITIVE, multi_query, "train"),      # two of several keys asked (niah_multiquery)
    "fact_qa": (SENSITIVE, fact_qa, "train"),              # a question about facts planted in the text
    "counting": (SENSITIVE, counting, "train"),            # every occurrence matters, wherever it is
    "kv_lookup": (SENSITIVE, kv_lookup, "train"),          # JSON key -> value (lost-in-the-middle's kv retrieval)
    "line_lookup": (SENSITIVE, line_lookup, "train"),      # numbered lines (LongEval's line retrieval)
    # sensitive, over what a real text states (no planted line)
    "param_default": (SENSITIVE, param_default, "train"),  # a parameter's default in a function's signature
    "raises": (SENSITIVE, raises, "train"),                # the exception a function raises
    "function_for": (SENSITIVE, function_for, "train"),    # the function a docstring line describes
    "version_note": (SENSITIVE, version_note, "train"),    # the version of a "Changed in version" note
    "number_lookup": (SENSITIVE, number_lookup, "train"),  # a number stated in a sentence of prose
    "word_count": (SENSITIVE, word_count, "train"),        # how often a word occurs: every occurrence counts
    "list_methods": (SENSITIVE, list_methods, "train"),    # every method of a class
    # robust: the gist, or the last lines, suffice
    "continuation": (ROBUST, continuation, "train"),       # the next lines follow the last ones
    "code_completion": (ROBUST, code_completion, "train"),  # the same over stdlib source
    "summary": (ROBUST, summary, "train"),                 # the gist of the text
    "paraphrase": (ROBUST, paraphrase, "train"),           # rewrite the last paragraph: local
    "title": (ROBUST, title, "train"),                     # the gist in a few words
    "keywords": (ROBUST, keyword_kind, "train"),           # frequent terms, seen many times
    "gist_translation": (ROBUST, gist_translation, "train"),  # the gist, in another language
    "few_shot": (ROBUST, few_shot, "train"),               # in-context classification of the last snippet
    "main_topic": (ROBUST, main_topic, "train"),           # a question about the text as a whole
    "audience": (ROBUST, audience, "train"),               # who the text is for: its gist
    "simplify": (ROBUST, simplify, "train"),               # the whole text in plainer words
    "refactor_end": (ROBUST, refactor_end, "train"),       # rewrite the last lines of code: local
    "write_tests": (ROBUST, write_tests, "train"),         # tests for a module: what it does, not a detail
    # held out (eval only)
    "variable_tracking": (SENSITIVE, variable_tracking, "heldout"),  # follow VAR chains (RULER vt)
    "common_words": (SENSITIVE, common_words, "heldout"),  # the most frequent words of a list (RULER cwe)
    "code_needle": (SENSITIVE, code_needle, "heldout"),    # a constant planted in source code
    "method_class": (SENSITIVE, method_class, "heldout"),  # the class a real method belongs to
    "module_constant": (SENSITIVE, module_constant, "heldout"),  # a constant a real module sets
    "grep_lines": (SENSITIVE, grep_lines, "heldout"),      # every line that mentions a word
    "outline": (ROBUST, outline, "heldout"),               # the main points of a text
    "explain_code": (ROBUST, explain_code, "heldout"),     # what a module is for
    "questions_about": (ROBUST, questions_about, "heldout"),  # questions a reader might ask
    "code_review": (ROBUST, code_review, "heldout"),       # how a module could be better
    "next_topic": (ROBUST, next_topic, "heldout"),         # what a next section would cover
    **HUMAN_TABLE,                                         # human-style prompts (human.py)
}
KINDS = tuple(k for k, (_, _, group) in KIND_TABLE.items() if group == "train")
HELDOUT_KINDS = tuple(k for k, (_, _, group) in KIND_TABLE.items() if group == "heldout")
HUMAN_KINDS = tuple(k for k, (_, _, group) in KIND_TABLE.items() if group == "human")
KIND_CLASS = {k: c for k, (c, _, _) in KIND_TABLE.items()}
N_TRAIN_INSTRUCTIONS, N_TRAIN_QUESTIONS = 6, 3  # of a trained kind's 8 instructions and 4 questions


def wordings(plan: Plan, kind: str, split: str):
    """The instruction and question pools a split draws from (a kind that is not trained: all of its own)."""
    if KIND_TABLE[kind][2] != "train":
        return plan.instructions, plan.questions
    cut_i, cut_q = N_TRAIN_INSTRUCTIONS, N_TRAIN_QUESTIONS
    if split == "train":
        return plan.instructions[:cut_i], plan.questions[:cut_q]
    return plan.instructions[cut_i:], plan.questions[cut_q:]
