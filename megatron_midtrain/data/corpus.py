"""A small, deterministic, generated training corpus shipped with the package.

Nothing is downloaded: documents are built from templates and word lists with a
private ``random.Random(seed)``, so the same seed always gives byte-identical text.

Two kinds of documents:

* ``"prose"``: several sentences of simple English about a topic (people, places,
  weather, work, nature...). Gives a tokenizer and a tiny LM something to learn.
* ``"math"``: step-by-step arithmetic word problems with checkable integer answers::

      Question: Tom has 3 boxes with 8 apples each. He gives away 7 apples. How many apples does he have left?
      Answer: Step 1: 3 * 8 = 24. Step 2: 24 - 7 = 17. The answer is 17.

Default sizes (``num_prose=3000``, ``num_math=4000``) give about 2.3 MB of text
(~1.5 MB prose, ~0.7 MB math), small enough that tokenizer training and indexing
take a few seconds on 2 CPU cores.

Helpers for evaluation / RL: :data:`MATH_ANSWER_PREFIX`, :func:`format_math_prompt`,
:func:`split_question_answer`, :func:`extract_final_answer`, :func:`check_answer`.
"""

from __future__ import annotations

import random
import re

QUESTION_PREFIX = "Question: "
MATH_ANSWER_PREFIX = "Answer:"
FINAL_ANSWER_PHRASE = "The answer is"

DEFAULT_SEED = 1234
DEFAULT_NUM_PROSE = 3000
DEFAULT_NUM_MATH = 4000

_FINAL_ANSWER_RE = re.compile(r"The answer is\s*(-?\d+)")

# ----------------------------------------------------------------------------------------
# Word lists
# ----------------------------------------------------------------------------------------

_NAMES = [
    "Tom", "Anna", "Ravi", "Lena", "Omar", "Mia", "Jonas", "Sara", "Kofi", "Elena",
    "Ben", "Yuki", "Carlos", "Nina", "Ali", "Grace", "Pablo", "Ivy", "Sam", "Leah",
    "Hugo", "Zara", "Felix", "Maya", "Owen", "Chloe", "Arjun", "Rosa", "Theo", "Amira",
]
_PRONOUN = {n: ("She" if n in {
    "Anna", "Lena", "Mia", "Sara", "Elena", "Yuki", "Nina", "Grace", "Ivy", "Leah",
    "Zara", "Maya", "Chloe", "Rosa", "Amira"} else "He") for n in _NAMES}

_PLACES = [
    "the old harbor", "a quiet village", "the city library", "the mountain road",
    "a small bakery", "the river bank", "the market square", "a busy train station",
    "the school garden", "an empty beach", "the museum hall", "a narrow street",
    "the forest path", "a crowded cafe", "the town bridge", "the farm by the hill",
]
_TIMES = [
    "In the morning", "Every evening", "On Sunday", "Last winter", "After lunch",
    "At dawn", "During the summer", "Late at night", "Each spring", "Before the rain",
    "On a cold day", "Years ago", "That afternoon", "Once a week",
]
_ADJ = [
    "quiet", "bright", "old", "busy", "small", "warm", "gentle", "strange", "tall",
    "careful", "happy", "tired", "curious", "green", "heavy", "simple", "famous",
    "patient", "cheerful", "dark", "clever", "broad", "soft", "sharp",
]
_ANIMALS = ["cat", "dog", "horse", "fox", "owl", "goat", "rabbit", "crow", "deer", "duck"]
_PLURAL = {"fox": "foxes", "deer": "deer"}
_OBJECTS = [
    "book", "lamp", "basket", "letter", "map", "bicycle", "garden", "boat", "window",
    "painting", "clock", "kettle", "violin", "notebook", "coat", "bench", "kite", "bridge",
]
_FOODS = ["bread", "soup", "apples", "cheese", "rice", "tea", "pears", "cake", "beans", "honey"]
_JOBS = [
    "teacher", "baker", "farmer", "doctor", "painter", "sailor", "engineer", "writer",
    "gardener", "carpenter", "nurse", "musician", "driver", "scientist",
]
_VERBS_PAST = [
    "walked to", "looked at", "cleaned", "visited", "painted", "found", "carried",
    "repaired", "watched", "opened", "described", "remembered", "followed", "built",
]
_FEELINGS = ["calm", "proud", "surprised", "hopeful", "nervous", "glad", "thoughtful", "sleepy"]
_WEATHER = [
    "the sky was grey", "a cold wind blew from the sea", "the sun was warm",
    "light rain fell on the roofs", "the air smelled of pine", "snow covered the fields",
    "the clouds moved slowly", "fog hid the hills",
]
_CONNECT = ["Then", "Later", "After a while", "Soon", "Meanwhile", "At last", "Still", "Afterwards"]
_TOPICS = ["day", "work", "nature", "town", "weather", "friends"]

_FACTS = [
    "Water boils at one hundred degrees at sea level",
    "Bees carry pollen from flower to flower",
    "The moon changes its shape over a month",
    "Trees grow a new ring of wood each year",
    "Sound travels faster in water than in air",
    "Rivers slowly carve valleys into the land",
    "Birds fly south when the days grow short",
    "Bread rises because yeast makes small bubbles of gas",
    "A compass needle points toward the north",
    "Plants turn sunlight into food for themselves",
    "Salt water freezes at a lower temperature than fresh water",
    "The heart pumps blood through the whole body",
]


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _plural(word: str) -> str:
    return _PLURAL.get(word, word + "s")


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _prose_sentence(rng: random.Random, name: str, topic: str) -> str:
    he = _PRONOUN[name]
    his = "her" if he == "She" else "his"
    c = rng.choice
    options = [
        lambda: f"{c(_TIMES)}, {name} {c(_VERBS_PAST)} {c(_PLACES)}.",
        lambda: f"{he} {c(_VERBS_PAST)} {_a(c(_ADJ))} {c(_OBJECTS)} near {c(_PLACES)}.",
        lambda: f"{_cap(c(_WEATHER))}, and {name} felt {c(_FEELINGS)}.",
        lambda: f"{c(_CONNECT)}, {his} friend {c(_NAMES)} brought some {c(_FOODS)}.",
        lambda: f"The {c(_ADJ)} {c(_ANIMALS)} sat beside the {c(_OBJECTS)} and watched the road.",
        lambda: f"{name} worked as {_a(c(_JOBS))} and liked {his} {c(_ADJ)} {c(_OBJECTS)}.",
        lambda: f"{c(_FACTS)}, {his} teacher once said.",
        lambda: f"{c(_CONNECT)}, {he.lower()} {c(_VERBS_PAST)} the {c(_ADJ)} {c(_OBJECTS)} again.",
        lambda: f"People in {c(_PLACES)} said that {c(_WEATHER)}.",
        lambda: f"{he} counted {rng.randint(2, 40)} {_plural(c(_ANIMALS))} on the way to {c(_PLACES)}.",
        lambda: f"\"Is the {c(_OBJECTS)} {c(_ADJ)}?\" asked {c(_NAMES)}.",
        lambda: f"{c(_FACTS)}.",
    ]
    # Each topic prefers some sentence shapes, which gives documents a bit of structure.
    bias = {
        "day": [0, 1, 3, 7], "work": [1, 5, 7, 10], "nature": [4, 6, 11, 9],
        "town": [0, 8, 1, 10], "weather": [2, 8, 2, 9], "friends": [3, 10, 0, 2],
    }[topic]
    idx = c(bias) if rng.random() < 0.5 else rng.randrange(len(options))
    return options[idx]()


def _prose_doc(rng: random.Random) -> str:
    name = rng.choice(_NAMES)
    topic = rng.choice(_TOPICS)
    job = rng.choice(_JOBS)
    first = f"This is a story about {name}, {_a(rng.choice(_ADJ))} {job} from {rng.choice(_PLACES)}."
    paragraphs = []
    sentences = [first]
    for _ in range(rng.randint(6, 12)):
        sentences.append(_prose_sentence(rng, name, topic))
        if rng.random() < 0.15:
            paragraphs.append(" ".join(sentences))
            sentences = []
    if sentences:
        paragraphs.append(" ".join(sentences))
    return "\n".join(paragraphs)


# ----------------------------------------------------------------------------------------
# Math word problems
# ----------------------------------------------------------------------------------------

_ITEMS = ["apples", "pencils", "marbles", "cookies", "stickers", "books", "eggs", "cards",
          "stones", "shells", "coins", "flowers", "toys", "candles", "buttons"]
_CONTAINERS = ["boxes", "bags", "baskets", "jars", "crates", "packs", "trays", "shelves"]


def _math_problem(rng: random.Random) -> tuple[str, list[str], int]:
    """Return (question, steps, answer). Steps are 'a op b = c' strings.

    Operands are one digit and results stay under 60 (grade-1 arithmetic): a demo model of
    about a million parameters learns to copy the numbers and most of these facts within a few
    minutes of CPU training, so the sft model solves some problems and verifiable-task GRPO
    has correct rollouts to learn from. Larger numbers leave it at ~0% and GRPO with nothing.
    """
    name = rng.choice(_NAMES)
    he = _PRONOUN[name]
    item = rng.choice(_ITEMS)
    kind = rng.randrange(7)
    r = rng.randint
    if kind == 0:
        a, b = r(2, 5), r(2, 9)
        total = a * b
        c = r(1, min(9, total - 1))
        cont = rng.choice(_CONTAINERS)
        q = (f"{name} has {a} {cont} with {b} {item} each. {he} gives away {c} {item}. "
             f"How many {item} does {he.lower()} have left?")
        steps = [f"{a} * {b} = {total}", f"{total} - {c} = {total - c}"]
        ans = total - c
    elif kind == 1:
        a, b, c = r(1, 9), r(1, 9), r(1, 9)
        q = (f"{name} has {a} {item}. {he} buys {b} more and then finds {c} more. "
             f"How many {item} does {he.lower()} have now?")
        steps = [f"{a} + {b} = {a + b}", f"{a + b} + {c} = {a + b + c}"]
        ans = a + b + c
    elif kind == 2:
        k, friends = r(2, 9), r(2, 5)
        extra = r(1, 9)
        total = k * friends + extra
        q = (f"{name} has {total} {item}. {he} keeps {extra} and shares the rest equally "
             f"among {friends} friends. How many {item} does each friend get?")
        steps = [f"{total} - {extra} = {total - extra}", f"{total - extra} / {friends} = {k}"]
        ans = k
    elif kind == 3:
        n, price = r(2, 5), r(2, 9)
        cost = n * price
        bill = rng.choice([b for b in (10, 20, 50) if b >= cost])
        q = (f"{name} buys {n} {item} that cost {price} dollars each. {he} pays with "
             f"{bill} dollars. How much change does {he.lower()} get?")
        steps = [f"{n} * {price} = {cost}", f"{bill} - {cost} = {bill - cost}"]
        ans = bill - cost
    elif kind == 4:
        per_day, days = r(2, 9), r(2, 5)
        total = per_day * days
        spent = r(1, min(9, total))
        q = (f"{name} collects {per_day} {item} every day for {days} days. Then {he.lower()} "
             f"uses {spent} of them. How many {item} are left?")
        steps = [f"{per_day} * {days} = {total}", f"{total} - {spent} = {total - spent}"]
        ans = total - spent
    elif kind == 5:
        a, b, m = r(1, 9), r(1, 9), r(2, 3)
        other = rng.choice([n for n in _NAMES if n != name])
        q = (f"{name} has {a} red {item} and {b} blue {item}. {other} has {m} "
             f"times as many {item} as {name}. How many {item} does {other} have?")
        steps = [f"{a} + {b} = {a + b}", f"{a + b} * {m} = {(a + b) * m}"]
        ans = (a + b) * m
    else:
        a, b, c = r(10, 30), r(1, 9), r(1, 9)
        q = (f"A shelf holds {a} {item}. {name} takes {b} {item} and then puts back {c} "
             f"{item}. How many {item} are on the shelf now?")
        steps = [f"{a} - {b} = {a - b}", f"{a - b} + {c} = {a - b + c}"]
        ans = a - b + c
    return q, steps, ans


def format_math_prompt(question: str) -> str:
    """The prompt a model should complete: ``"Question: ...\\nAnswer:"``."""
    return f"{QUESTION_PREFIX}{question}\n{MATH_ANSWER_PREFIX}"


def format_math_solution(steps: list[str], answer: int) -> str:
    """The completion text that follows :func:`format_math_prompt` (starts with a space)."""
    parts = [f"Step {i}: {s}." for i, s in enumerate(steps, 1)]
    parts.append(f"{FINAL_ANSWER_PHRASE} {answer}.")
    return " " + " ".join(parts)


def make_math_doc(rng: random.Random) -> dict:
    """One math document dict (see module docstring)."""
    question, steps, answer = _math_problem(rng)
    text = format_math_prompt(question) + format_math_solution(steps, answer)
    return {"text": text, "kind": "math", "question": question, "answer": answer}


def split_question_answer(text: str) -> tuple[str, str]:
    """Split a math document into ``(prompt, completion)``.

    ``prompt`` ends with ``"Answer:"`` (see :func:`format_math_prompt`); ``completion`` is
    the rest. Raises ValueError if ``text`` has no ``"\\nAnswer:"`` separator.
    """
    sep = "\n" + MATH_ANSWER_PREFIX
    pos = text.find(sep)
    if pos < 0:
        raise ValueError("text has no '\\nAnswer:' separator")
    cut = pos + len(sep)
    return text[:cut], text[cut:]


def extract_final_answer(text: str) -> str | None:
    """The integer after the first ``"The answer is"`` in ``text``, as a string; None if absent."""
    m = _FINAL_ANSWER_RE.search(text)
    return m.group(1) if m else None


def check_answer(completion: str, answer: int | str) -> bool:
    """True if the final answer in ``completion`` equals ``answer``."""
    got = extract_final_answer(completion)
    return got is not None and got == str(answer).strip()


# ----------------------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------------------


def generate_corpus(
    seed: int = DEFAULT_SEED,
    num_prose: int = DEFAULT_NUM_PROSE,
    num_math: int = DEFAULT_NUM_MATH,
) -> list[dict]:
    """Generate the corpus: ``num_prose`` prose docs then ``num_math`` math docs.

    Byte-for-byte deterministic for a given (seed, num_prose, num_math). Prose and math
    use separate RNG streams, so changing one count does not change the other kind's text.
    """
    prose_rng = random.Random(f"prose-{seed}")
    math_rng = random.Random(f"math-{seed}")
    docs: list[dict] = [{"text": _prose_doc(prose_rng), "kind": "prose"} for _ in range(num_prose)]
    docs.extend(make_math_doc(math_rng) for _ in range(num_math))
    return docs


def generate_math_eval(
    num: int, seed: int = DEFAULT_SEED, exclude_questions: set[str] | frozenset[str] = frozenset()
) -> list[dict]:
    """Held-out math problems (distinct RNG stream) whose questions are not in ``exclude_questions``.

    Each dict also carries ``"prompt"`` (:func:`format_math_prompt`) for generation-based eval.
    """
    rng = random.Random(f"math-eval-{seed}")
    out: list[dict] = []
    seen = set(exclude_questions)
    attempts = 0
    while len(out) < num:
        attempts += 1
        if attempts > 100 * num + 1000:
            raise RuntimeError("could not generate enough distinct held-out math problems")
        doc = make_math_doc(rng)
        if doc["question"] in seen:
            continue
        seen.add(doc["question"])
        doc["prompt"] = format_math_prompt(doc["question"])
        out.append(doc)
    return out
