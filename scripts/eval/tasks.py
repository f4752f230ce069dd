"""The classification tasks: raw data from `data.py`, class descriptions for the frozen heads,
and fixed stratified train / validation / test splits (cached as JSON in the work folder).

Splits do not depend on the run seed: seeds vary fine-tuning and which tasks get merged,
never which examples are tested. Each class is capped first so that no class swamps a task,
then the test and validation quotas are drawn in proportion to the capped class sizes.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import data

SPLIT_SEED = 1234
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Task:
    """One labelled task; ``descriptions[i]`` is embedded by the base model as class i's head."""

    name: str
    classes: list[str]
    descriptions: list[str]
    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    test: list[tuple[str, int]]

    def majority_rate(self) -> float:
        """Accuracy of always answering the most frequent test class: the chance bar we use."""
        counts = [0] * len(self.classes)
        for _, label in self.test:
            counts[label] += 1
        return max(counts) / len(self.test)


@dataclass(frozen=True)
class Sizes:
    """Per-task split sizes (upper bounds: a task with less data gets less, train first)."""

    test: int = 1000
    val: int = 200
    train: int = 4000
    class_cap: int = 1500


def stratified_split(
    examples: list[tuple[str, str]], classes: list[str], sizes: Sizes, seed: int = SPLIT_SEED
) -> tuple[list[tuple[str, int]], list[tuple[str, int]], list[tuple[str, int]]]:
    """Cap each class, then carve test, val and train in proportion to the capped class sizes."""
    rng = random.Random(seed)
    by_class: dict[int, list[str]] = defaultdict(list)
    index = {name: i for i, name in enumerate(classes)}
    for text, label in sorted(set(examples)):
        by_class[index[label]].append(text)
    for texts in by_class.values():
        rng.shuffle(texts)
        del texts[sizes.class_cap:]
    total = sum(len(t) for t in by_class.values())
    test_n = min(sizes.test, total // 2)  # small data: half for test, the rest to val/train
    val_n = min(sizes.val, (total - test_n) // 4)
    splits: tuple[list[tuple[str, int]], ...] = ([], [], [])
    for label, texts in sorted(by_class.items()):
        n_test = round(test_n * len(texts) / total)
        n_val = round(val_n * len(texts) / total)
        n_train = round(sizes.train * len(texts) / total)
        parts = (texts[:n_test], texts[n_test:n_test + n_val],
                 texts[n_test + n_val:n_test + n_val + n_train])
        for split, part in zip(splits, parts, strict=True):
            split.extend((text, label) for text in part)
    for split in splits:
        rng.shuffle(split)
    test, val, train = splits
    return train, val, test


# ---- the task definitions: (classes, head descriptions, raw examples) ----------------------

FORTUNE_TOPICS = {
    "computers": "a joke or quotation about computers, software and programmers",
    "politics": "a joke or quotation about politics, government and politicians",
    "science": "a joke or quotation about science, mathematics and scientists",
    "work": "a joke or quotation about work, jobs, bosses and the office",
    "songs-poems": "lyrics of a song or lines of a poem",
    "men-women": "a joke or quotation about men and women, love, sex and marriage",
}

NOUN_SENSES = {
    "noun.act": "acts or actions", "noun.animal": "animals",
    "noun.artifact": "man-made objects", "noun.attribute": "attributes of people and objects",
    "noun.body": "body parts", "noun.cognition": "cognitive processes and contents",
    "noun.communication": "communicative processes and contents",
    "noun.event": "natural events", "noun.feeling": "feelings and emotions",
    "noun.food": "foods and drinks", "noun.group": "groupings of people or objects",
    "noun.location": "spatial position", "noun.motive": "goals",
    "noun.object": "natural objects (not man-made)", "noun.person": "people",
    "noun.phenomenon": "natural phenomena", "noun.plant": "plants",
    "noun.possession": "possession and transfer of possession",
    "noun.process": "natural processes", "noun.quantity": "quantities and units of measure",
    "noun.relation": "relations between people or things or ideas",
    "noun.shape": "two and three dimensional shapes", "noun.state": "stable states of affairs",
    "noun.substance": "substances", "noun.time": "time and temporal relations",
}

VERB_SENSES = {
    "verb.body": "grooming, dressing and bodily care", "verb.change": "size, temperature change,"
    " intensifying", "verb.cognition": "thinking, judging, analyzing, doubting",
    "verb.communication": "telling, asking, ordering, singing",
    "verb.competition": "fighting, athletic activities", "verb.consumption": "eating and drinking",
    "verb.contact": "touching, hitting, tying, digging", "verb.creation": "sewing, baking,"
    " painting, performing", "verb.emotion": "feeling", "verb.motion": "walking, flying,"
    " swimming", "verb.perception": "seeing, hearing, feeling", "verb.possession": "buying,"
    " selling, owning", "verb.social": "political and social activities and events",
    "verb.stative": "being, having, spatial relations", "verb.weather": "raining, snowing,"
    " thawing, thundering",
}

LANGUAGES = {"en": "English", "de": "German", "it": "Italian", "es": "Spanish",
             "pt": "Portuguese", "pl": "Polish"}


def _bbc(work: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    return {
        "business": "a news article about business, companies and the economy",
        "entertainment": "a news article about entertainment, films, music and celebrities",
        "politics": "a news article about politics, elections and government",
        "sports": "a news article about sport, matches and athletes",
        "tech": "a news article about technology, computers and the internet",
    }, data.bbc_news()


def _tweets(work: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    return {
        "negative": "a negative tweet: angry, sad or complaining",
        "neutral": "a neutral tweet stating a fact or a piece of news",
        "positive": "a positive tweet: happy, excited or praising",
    }, data.tweets()


def _words(work: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    return {
        "negative": "a word with a negative meaning: something bad or unpleasant",
        "positive": "a word with a positive meaning: something good or pleasant",
    }, data.vader_words()


def _language(work: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    heads = {code: f"a text written in the {name} language" for code, name in LANGUAGES.items()}
    return heads, data.fortunes_by_language(work, set(FORTUNE_TOPICS))


def _fortune_topic(work: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    return dict(FORTUNE_TOPICS), data.fortune_files(work, list(FORTUNE_TOPICS))


def _used_offsets(work: Path, pos: str, senses: dict[str, str]) -> set[str]:
    """Synsets the supersense task draws from, so the part-of-speech task can avoid them."""
    return {off for off, _, lex in data.wordnet_glosses(work, pos) if lex in senses}


def _noun_sense(work: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    heads = {k: f"the definition of a noun denoting {v}" for k, v in NOUN_SENSES.items()}
    rows = data.wordnet_glosses(work, "noun")
    return heads, [(d, lex) for off, d, lex in rows if lex in heads and int(off) % 2 == 0]


def _verb_sense(work: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    heads = {k: f"the definition of a verb of {v}" for k, v in VERB_SENSES.items()}
    rows = data.wordnet_glosses(work, "verb")
    return heads, [(d, lex) for off, d, lex in rows if lex in heads and int(off) % 2 == 0]


def _pos(work: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Part of speech from a definition; uses only odd offsets, disjoint from the sense tasks."""
    heads = {
        "noun": "the definition of a noun: a person, place, thing or idea",
        "verb": "the definition of a verb: an action or an occurrence",
        "adj": "the definition of an adjective: a quality or property of something",
        "adv": "the definition of an adverb: how, when or where something is done",
    }
    out = []
    for pos in heads:
        out.extend((d, pos) for off, d, _ in data.wordnet_glosses(work, pos) if int(off) % 2 == 1)
    return heads, out


BUILDERS: dict[str, Callable[[Path], tuple[dict[str, str], list[tuple[str, str]]]]] = {
    "bbc_topic": _bbc,
    "tweet_sentiment": _tweets,
    "word_polarity": _words,
    "language_id": _language,
    "fortune_topic": _fortune_topic,
    "noun_supersense": _noun_sense,
    "verb_supersense": _verb_sense,
    "wordnet_pos": _pos,
}
ALL_TASKS = list(BUILDERS)


def build_task(name: str, work: Path, sizes: Sizes) -> Task:
    """Build one task from its raw source (or read it from the JSON cache)."""
    tag = f"v{FORMAT_VERSION}_t{sizes.test}_v{sizes.val}_n{sizes.train}_c{sizes.class_cap}"
    cache = work / "tasks" / f"{name}_{tag}.json"
    if cache.exists():
        raw = json.loads(cache.read_text())
        return Task(
            name=raw["name"], classes=raw["classes"], descriptions=raw["descriptions"],
            **{k: [(t, int(y)) for t, y in raw[k]] for k in ("train", "val", "test")},
        )
    heads, examples = BUILDERS[name](work)
    classes = sorted(heads)
    train, val, test = stratified_split(examples, classes, sizes)
    task = Task(name, classes, [heads[c] for c in classes], train, val, test)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp")
    tmp.write_text(json.dumps(task.__dict__))
    tmp.rename(cache)
    return task


def build_tasks(names: list[str], work: Path, sizes: Sizes) -> list[Task]:
    return [build_task(name, work, sizes) for name in names]
