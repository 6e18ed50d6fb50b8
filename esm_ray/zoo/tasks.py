"""Text-classification tasks built from packaged data, with fixed-seed grouped splits.

A task is a reader (packaged file -> (text, label, group) rows) plus a label rule in words.
`load_task(name, seed)` turns the rows into train / validation / test splits:

1. whitespace is collapsed; texts are deduplicated case-insensitively, and a text that
   occurs under two labels is dropped everywhere;
2. groups (a speaker, a movie, a debate statement; by default the text itself) are shuffled
   with a seeded RNG and assigned whole to test, then validation, then train, so no group
   spans two splits;
3. each split is cut to its per-label quota (balanced classes by default) and shuffled.

The same (task, seed) always gives the same splits; no two splits share a text.
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Callable, Literal

from esm_ray.errors import InputError
from esm_ray.zoo.sources import chunks, clean, data_file, open_text, read_csv, sentences

SPLITS = ("train", "validation", "test")
Row = tuple[str, str, str]  # text, label, group


@dataclass(frozen=True)
class TaskDef:
    """A classification task: where its text comes from and how it is labelled."""

    name: str
    sources: tuple[str, ...]
    rule: str
    labels: tuple[str, ...]
    read: Callable[[], list[Row]] = field(repr=False, compare=False)
    kind: Literal["text", "word"] = "text"
    n_test: int = 400
    n_val: int = 200
    max_train: int = 1200
    balance: bool = True
    epochs: int = 1  # training epochs (small or cheap tasks get more)
    version: int = 1  # bump when the reader or rule changes: it is part of the zoo hash

    def fingerprint(self) -> dict:
        fp = {"name": self.name, "sources": list(self.sources), "rule": self.rule,
              "labels": list(self.labels), "kind": self.kind, "n_test": self.n_test,
              "n_val": self.n_val, "max_train": self.max_train, "balance": self.balance,
              "version": self.version}
        if self.epochs != 1:  # fields added later enter only when set, so older hashes stay valid
            fp["epochs"] = self.epochs
        return fp


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass(frozen=True)
class TaskData:
    task: TaskDef
    seed: int
    splits: dict[str, list[Example]]
    info: dict

    def __getitem__(self, split: str) -> list[Example]:
        return self.splits[split]


# ---------------------------------------------------------------- readers


def _rt_rows() -> tuple[dict[str, str], ...]:
    return read_csv("rotten_tomatoes_corpus_full.csv.bz2")


def read_rt_sentiment() -> list[Row]:
    return [(r["text"], r["category"], r["text"]) for r in _rt_rows() if r["category"] in ("fresh", "rotten")]


def read_rt_subjectivity() -> list[Row]:
    rows = []
    for r in _rt_rows():
        movie = r["movie_name"] or r["text"]
        if r["category"] == "plot":
            rows += [(s, "plot", movie) for s in sentences(r["text"]) if len(s.split()) >= 6]
        else:
            rows.append((r["text"], "review", movie))
    return rows


def _speech_rows(records, label_of, min_words=20, max_words=45) -> list[Row]:
    rows = []
    for i, r in enumerate(records):
        speaker = clean(r["speaker"]).upper() or f"unnamed speech {i}"
        for c in chunks(sentences(r["text"]), min_words, max_words):
            rows.append((c, label_of(r), speaker))
    return rows


def read_convention_party() -> list[Row]:
    return _speech_rows(read_csv("political_data.csv"), lambda r: r["party"])


def read_convention_year() -> list[Row]:
    r12 = [r for r in read_csv("political_data.csv") if r["party"] == "republican"]
    r16 = list(read_csv("republican_convention_2016.csv"))
    return (_speech_rows(r12, lambda r: "2012") + _speech_rows(r16, lambda r: "2016"))


def read_debate_party() -> list[Row]:
    rows = []
    for i, r in enumerate(read_csv("presidential_debates_2016.csv.gz")):
        label = {"Democratic": "democrat", "Republican": "republican", "Moderator": "moderator"}[r["party"]]
        sents = sentences(r["statement"])
        words = sum(len(s.split()) for s in sents)
        pieces = [clean(r["statement"])] if words <= 45 else chunks(sents, 8, 45)
        rows += [(p, label, f"statement-{i}") for p in pieces if len(p.split()) >= 5]
    return rows


_PERIOD = {"2020-01": "jan-feb", "2020-02": "jan-feb", "2020-03": "mar-apr", "2020-04": "mar-apr",
           "2020-05": "may-jul", "2020-06": "may-jul", "2020-07": "may-jul"}


def read_guardian_period() -> list[Row]:
    return [(r["Text"], _PERIOD[r["Date"][:7]], r["Text"]) for r in read_csv("guardian_headlines.csv.bz2")
            if r["Date"][:7] in _PERIOD]


_LOCKDOWN = {"2020-01": "jan-feb", "2020-02": "jan-feb", "2020-04": "apr-may", "2020-05": "apr-may"}


def read_guardian_lockdown() -> list[Row]:
    return [(r["Text"], _LOCKDOWN[r["Date"][:7]], r["Text"]) for r in read_csv("guardian_headlines.csv.bz2")
            if r["Date"][:7] in _LOCKDOWN]


def _whissell(dim: str, low: float, high: float, names: tuple[str, str]) -> list[Row]:
    rows = []
    for r in read_csv("whissells_df.csv"):
        v = float(r[dim])
        if v <= low:
            rows.append((r["word"], names[0], r["word"]))
        elif v >= high:
            rows.append((r["word"], names[1], r["word"]))
    return rows


def read_word_pleasantness() -> list[Row]:
    return _whissell("pleasantness", 1.5, 2.2, ("unpleasant", "pleasant"))


def read_word_imagery() -> list[Row]:
    return _whissell("imagery", 1.4, 2.6, ("abstract", "concrete"))


def read_word_activation() -> list[Row]:
    return _whissell("activation", 1.5, 2.2, ("passive", "active"))


def read_moral_foundation() -> list[Row]:
    return [(r["term"].replace("_", " "), r["cat"].split(".")[0], r["term"]) for r in read_csv("mfd2.0.csv")]


ROGET_TOPICS = ("ANIMALS INSECTS", "PLANTS", "DISEASE", "FOOD", "CLOTHING", "MUSIC",
                "THE UNIVERSE ASTRONOMY", "AVIATION")


def read_roget_topic() -> list[Row]:
    rows = []
    with open_text(data_file("roget.csv.bz2")) as f:
        for line in f:
            word, _, cat = line.strip().rpartition(",")
            if cat in ROGET_TOPICS and word and " " not in word and word.isalpha():
                rows.append((word.lower(), cat.lower().split()[-1], word.lower()))
    return rows


def read_chinese_novel() -> list[Row]:
    rows = []
    for i, r in enumerate(read_csv("chinese.csv")):
        text = re.sub(r"\[\d+\]", "", r["text"])
        paras = [clean(p) for p in text.split("\n") if len(clean(p)) >= 8]
        run, block = "", 0
        for p in paras:
            run += p
            while len(run) >= 40:
                rows.append((run[:40], r["novel"], f"doc{i}-block{block // 8}"))
                run, block = run[40:], block + 1
    return rows


# ---------------------------------------------------------------- registry

TASKS: dict[str, TaskDef] = {t.name: t for t in [
    TaskDef("rt_sentiment", ("rotten_tomatoes_corpus_full.csv.bz2",),
            "Rotten Tomatoes review snippet: critic rated it fresh vs rotten",
            ("rotten", "fresh"), read_rt_sentiment),
    TaskDef("rt_subjectivity", ("rotten_tomatoes_corpus_full.csv.bz2",),
            "sentence from a plot synopsis vs a review snippet (movie-disjoint splits)",
            ("plot", "review"), read_rt_subjectivity),
    TaskDef("convention_party", ("political_data.csv",),
            "20-45 word chunk of a 2012 convention speech: Democratic vs Republican (speaker-disjoint)",
            ("democrat", "republican"), read_convention_party),
    TaskDef("convention_year", ("political_data.csv", "republican_convention_2016.csv"),
            "chunk of a Republican convention speech: 2012 vs 2016 (speaker-disjoint)",
            ("2012", "2016"), read_convention_year),
    TaskDef("debate_party", ("presidential_debates_2016.csv.gz",),
            "2016 debate statement (or <=45-word chunk): Democrat vs Republican vs moderator",
            ("democrat", "republican", "moderator"), read_debate_party, n_test=300, n_val=150, epochs=2),
    TaskDef("guardian_period", ("guardian_headlines.csv.bz2",),
            "Guardian headline, 2020: published Jan-Feb vs Mar-Apr vs May-Jul",
            ("jan-feb", "mar-apr", "may-jul"), read_guardian_period),
    TaskDef("guardian_lockdown", ("guardian_headlines.csv.bz2",),
            "Guardian headline, 2020: published Jan-Feb (before the UK lockdown) vs Apr-May (during it)",
            ("jan-feb", "apr-may"), read_guardian_lockdown, epochs=2),
    TaskDef("word_pleasantness", ("whissells_df.csv",),
            "single word, Whissell affect dictionary: pleasantness <= 1.5 vs >= 2.2",
            ("unpleasant", "pleasant"), read_word_pleasantness, kind="word", epochs=3),
    TaskDef("word_imagery", ("whissells_df.csv",),
            "single word, Whissell affect dictionary: imagery <= 1.4 (abstract) vs >= 2.6 (concrete)",
            ("abstract", "concrete"), read_word_imagery, kind="word", epochs=3),
    TaskDef("word_activation", ("whissells_df.csv",),
            "single word, Whissell affect dictionary: activation <= 1.5 vs >= 2.2",
            ("passive", "active"), read_word_activation, kind="word", epochs=3),
    TaskDef("moral_foundation", ("mfd2.0.csv",),
            "word of the Moral Foundations Dictionary 2.0: its foundation (virtue and vice pooled)",
            ("care", "fairness", "loyalty", "authority", "sanctity"), read_moral_foundation, kind="word",
            balance=False, epochs=3),
    TaskDef("roget_topic", ("roget.csv.bz2",),
            "single word of Roget's thesaurus: which of 8 topical categories lists it",
            tuple(c.lower().split()[-1] for c in ROGET_TOPICS), read_roget_topic, kind="word", epochs=3),
    TaskDef("chinese_novel", ("chinese.csv",),
            "40-character passage of a Chinese translation: A Tale of Two Cities vs Ulysses",
            ("Tale of Two Cities", "Ulysses"), read_chinese_novel, epochs=3),
]}

DEFAULT_TASKS: tuple[str, ...] = (
    "rt_sentiment", "rt_subjectivity", "convention_year", "debate_party",
    "guardian_lockdown", "word_pleasantness", "word_imagery", "moral_foundation",
)
REDUCED_TASKS: tuple[str, ...] = ("rt_sentiment", "rt_subjectivity")


def get_task(name: str) -> TaskDef:
    try:
        return TASKS[name]
    except KeyError:
        raise InputError(f"unknown task {name!r}; known: {', '.join(TASKS)}") from None


# ---------------------------------------------------------------- splits


def _dedupe(rows: list[Row], labels: tuple[str, ...], task: str) -> list[Row]:
    by_key: dict[str, list[Row]] = defaultdict(list)
    order: list[str] = []
    for text, label, group in rows:
        if label not in labels:
            raise InputError(f"task {task}: reader produced label {label!r} outside {labels}")
        text = clean(text)
        if not text:
            continue
        key = text.lower()
        if key not in by_key:
            order.append(key)
        by_key[key].append((text, label, clean(group) or key))
    out = []
    for key in order:
        found = by_key[key]
        if len({lab for _, lab, _ in found}) == 1:
            out.append(found[0])
    return out


def _quotas(n_total: int, counts: Counter, labels: tuple[str, ...], balance: bool) -> dict[str, int]:
    if balance:
        return {lab: n_total // len(labels) for lab in labels}
    total = sum(counts.values())
    return {lab: round(n_total * counts[lab] / total) for lab in labels}


def split_rows(rows: list[Row], task: TaskDef, seed: int, sizes: dict[str, int] | None = None) -> TaskData:
    """Deduplicate and split `rows` into grouped, per-label-quota train/validation/test."""
    labels = task.labels
    rows = _dedupe(rows, labels, task.name)
    counts = Counter(lab for _, lab, _ in rows)
    missing = [lab for lab in labels if counts[lab] == 0]
    if missing:
        raise InputError(f"task {task.name}: no examples for labels {missing}")
    sizes = sizes or {"test": task.n_test, "validation": task.n_val, "train": task.max_train}
    smallest = min(counts.values())
    # Never spend more than 30% / 15% of the rarest class on test / validation.
    n_test = min(sizes["test"], int(0.3 * smallest * len(labels)) if task.balance else sizes["test"])
    n_val = min(sizes["validation"], int(0.15 * smallest * len(labels)) if task.balance else sizes["validation"])
    want = {"test": _quotas(n_test, counts, labels, task.balance),
            "validation": _quotas(n_val, counts, labels, task.balance)}

    rng = random.Random(f"{task.name}:{seed}")
    groups: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        groups[r[2]].append(r)
    keys = sorted(groups)
    rng.shuffle(keys)
    assigned: dict[str, dict[str, list[Row]]] = {s: defaultdict(list) for s in SPLITS}
    for g in keys:
        members = groups[g]
        glabels = {lab for _, lab, _ in members}
        target = "train"
        for s in ("test", "validation"):
            if any(len(assigned[s][lab]) < want[s][lab] for lab in glabels):
                target = s
                break
        for r in members:
            assigned[target][r[1]].append(r)

    splits: dict[str, list[Example]] = {}
    index = {lab: i for i, lab in enumerate(labels)}
    train_have = {lab: len(assigned["train"][lab]) for lab in labels}
    if task.balance:
        per = min(sizes["train"] // len(labels), min(train_have.values()))
        want["train"] = {lab: per for lab in labels}
    else:
        total = sum(train_have.values())
        scale = min(1.0, sizes["train"] / max(total, 1))
        want["train"] = {lab: int(train_have[lab] * scale) for lab in labels}
    for s in SPLITS:
        picked: list[Row] = []
        for lab in labels:
            pool = assigned[s][lab]
            rng.shuffle(pool)
            picked += pool[: want[s][lab]]
        rng.shuffle(picked)
        splits[s] = [Example(t, index[lab]) for t, lab, _ in picked]

    info = {
        "n_rows_after_dedupe": len(rows),
        "n_groups": len(groups),
        "available": {lab: counts[lab] for lab in labels},
        "sizes": {s: len(splits[s]) for s in SPLITS},
        "label_counts": {s: [sum(e.label == i for e in splits[s]) for i in range(len(labels))] for s in SPLITS},
    }
    test_counts = info["label_counts"]["test"]
    info["majority_rate"] = max(test_counts) / max(sum(test_counts), 1)
    return TaskData(task, seed, splits, info)


def load_task(name: str, seed: int = 0, sizes: dict[str, int] | None = None) -> TaskData:
    """The deterministic train/validation/test splits of a task for a seed."""
    task = get_task(name)
    return split_rows(task.read(), task, seed, sizes)
