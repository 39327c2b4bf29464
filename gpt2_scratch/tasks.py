"""Verifiable instruction tasks: each answer is computed, so a response is simply right or wrong.

Every family makes (instruction, input, output) from a seeded random generator. `make_tasks` builds the test split
first and then refuses any training instance whose (instruction, input) is in it, so held-out instances are new
combinations of words and numbers the model has seen, never repeats.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from datasets import Dataset, DatasetDict

# Regular nouns with their plurals: the common spelling rules (-s, -es, consonant + y → -ies, -f/-fe → -ves).
NOUNS = {
    "apple": "apples", "bird": "birds", "book": "books", "cat": "cats", "cloud": "clouds", "dog": "dogs",
    "door": "doors", "friend": "friends", "garden": "gardens", "hand": "hands", "house": "houses", "king": "kings",
    "lamp": "lamps", "letter": "letters", "moon": "moons", "river": "rivers", "road": "roads", "ship": "ships",
    "song": "songs", "star": "stars", "stone": "stones", "table": "tables", "tree": "trees", "window": "windows",
    "box": "boxes", "bus": "buses", "church": "churches", "class": "classes", "dish": "dishes", "fox": "foxes",
    "glass": "glasses", "match": "matches", "wish": "wishes", "watch": "watches", "baby": "babies",
    "city": "cities", "country": "countries", "lady": "ladies", "party": "parties", "story": "stories",
    "berry": "berries", "day": "days", "key": "keys", "boy": "boys", "toy": "toys", "leaf": "leaves",
    "knife": "knives", "wolf": "wolves", "life": "lives", "shelf": "shelves", "wife": "wives", "half": "halves",
}
ADJECTIVES = ["red", "green", "blue", "old", "young", "small", "large", "quiet", "loud", "happy", "sad", "bright",
              "dark", "warm", "cold", "fast", "slow", "brave", "kind", "proud", "soft", "hard", "sweet", "wild"]
VERBS = ["runs", "sings", "waits", "sleeps", "falls", "shines", "grows", "moves", "stays", "turns", "rests", "plays"]
WORDS = sorted(set(NOUNS) | set(ADJECTIVES) | set(VERBS))


def some_words(rng: random.Random, low: int = 2, high: int = 4) -> list[str]:
    return rng.sample(WORDS, rng.randint(low, high))


def sentence(rng: random.Random) -> str:
    return f"The {rng.choice(ADJECTIVES)} {rng.choice(list(NOUNS))} {rng.choice(VERBS)}."


Example = tuple[str, str, str]  # instruction, input, output


def upper(rng: random.Random) -> Example:
    text = " ".join(some_words(rng))
    return "Convert the text to upper case.", text, text.upper()


def lower(rng: random.Random) -> Example:
    text = " ".join(some_words(rng))
    return "Convert the text to lower case.", text.upper(), text


def title(rng: random.Random) -> Example:
    text = " ".join(some_words(rng))
    return "Convert the text to title case.", text, text.title()


def reverse_words(rng: random.Random) -> Example:
    words = some_words(rng, 3, 5)
    return "Reverse the order of the words.", " ".join(words), " ".join(reversed(words))


def count_words(rng: random.Random) -> Example:
    words = some_words(rng, 1, 8)
    return "How many words are in the text?", " ".join(words), str(len(words))


def sort_words(rng: random.Random) -> Example:
    words = some_words(rng, 3, 5)
    return "Sort the words alphabetically.", ", ".join(words), ", ".join(sorted(words))


def add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 50), rng.randint(0, 50)
    return "Add the two numbers.", f"{a} + {b}", str(a + b)


def subtract(rng: random.Random) -> Example:
    a = rng.randint(0, 50)
    b = rng.randint(0, a)
    return "Subtract the second number from the first.", f"{a} - {b}", str(a - b)


def pluralise(rng: random.Random) -> Example:
    noun = rng.choice(list(NOUNS))
    return "Give the plural of the noun.", noun, NOUNS[noun]


def first_sentence(rng: random.Random) -> Example:
    sentences = [sentence(rng) for _ in range(rng.randint(2, 3))]
    return "Extract the first sentence.", " ".join(sentences), sentences[0]


FAMILIES: dict[str, Callable[[random.Random], Example]] = {
    f.__name__: f for f in (upper, lower, title, reverse_words, count_words, sort_words, add, subtract, pluralise,
                            first_sentence)
}
DISTINCT = {"pluralise": len(NOUNS)}  # families with few distinct instances
SENTIMENT = "sentiment"  # rotten_tomatoes reviews: answer "positive" or "negative"
SENTIMENT_INSTRUCTION = "Is this movie review positive or negative?"


def sentiment_examples(split: str, count: int, rng: random.Random) -> list[Example]:
    """Reviews from the rotten_tomatoes split of the same name, so test reviews are never trained on."""
    from .sources import rotten_tomatoes

    reviews = rotten_tomatoes()[split]
    names = reviews.features["label"].names
    rows = rng.sample(range(len(reviews)), min(count, len(reviews)))
    return [(SENTIMENT_INSTRUCTION, reviews[i]["text"], names[reviews[i]["label"]]) for i in rows]


def make_split(sizes: dict[str, int], rng: random.Random, split: str, exclude: set) -> Dataset:
    """`sizes[family]` instances per family, none in `exclude`; a test split has no repeats, a training split may."""
    rows: dict[str, list] = {"instruction": [], "input": [], "output": [], "task": []}
    for family, size in sizes.items():
        if family == SENTIMENT:
            found = [e for e in sentiment_examples(split, size, rng) if e[:2] not in exclude]
        else:
            wanted = size
            if split == "test" and family in DISTINCT:  # leave three quarters of a small family for training
                wanted = min(size, DISTINCT[family] // 4)
            found, seen, tries = [], set(exclude), 0
            while len(found) < wanted and tries < 100 * wanted:
                tries += 1
                example = FAMILIES[family](rng)
                if example[:2] not in seen:
                    found.append(example)
                    if split == "test":
                        seen.add(example[:2])
        for instruction, text, output in found:
            rows["instruction"].append(instruction)
            rows["input"].append(text)
            rows["output"].append(output)
            rows["task"].append(family)
    return Dataset.from_dict(rows)


def make_tasks(families: list[str], train_size: int, test_size: int, seed: int,
               weights: dict[str, float] | None = None) -> DatasetDict:
    """`test_size` held-out instances per family (a quarter of its nouns for `pluralise`) and `train_size` training
    instances, times `weights[family]` where given: the families a model learns slowly can have more of the steps."""
    weights = weights or {}
    unknown = [f for f in [*families, *weights] if f not in FAMILIES and f != SENTIMENT]
    if unknown:
        raise ValueError(f"unknown task families {unknown}; choose from {', '.join([*FAMILIES, SENTIMENT])}")
    ignored = [f for f in weights if f not in families]
    if ignored:
        raise ValueError(f"weights given for {ignored}, which are not among the chosen families {families}")
    if any(w <= 0 for w in weights.values()):
        raise ValueError(f"task weights must be positive, got {weights}")
    rng = random.Random(seed)
    test = make_split(dict.fromkeys(families, test_size), rng, "test", set())
    held_out = set(zip(test["instruction"], test["input"]))
    train_sizes = {f: max(1, round(train_size * weights.get(f, 1.0))) for f in families}
    train = make_split(train_sizes, rng, "train", held_out)
    return DatasetDict(train=train, test=test)
