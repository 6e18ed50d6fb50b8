"""The LM zoo's data: text domains (told apart by their text alone) and label tasks.

A domain is a reader giving documents as (units, separator): lines or sentences in file order.
`passages` cuts them into runs of at most `max_tokens` tokens and `split_passages` sends whole
blocks of 8 consecutive passages to test, validation or train (seeded), so that neighbouring
passages (one scene, one speech) never straddle two splits.

A label task is a classification task of `esm_ray.zoo.tasks` (same readers, same grouped and
balanced splits) asked as an instruction: a prompt ending in a cue, answered by one of the
label words. Its expert is trained on the answer tokens only, and it is scored by the
multiple-choice protocol (the label word with the highest log-likelihood after the prompt).
"""

from __future__ import annotations

import hashlib
import random
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from esm_ray.errors import InputError
from esm_ray.zoo.sources import clean, data_file, file_digest, open_text, read_csv, sentences
from esm_ray.zoo.tasks import get_task

Docs = list[tuple[list[str], str]]

# ---------------------------------------------------------------- domains


@dataclass(frozen=True)
class Domain:
    name: str
    sources: tuple[str, ...]
    description: str
    read: Callable[[], Docs]
    keep_indent: bool = False  # code: leading whitespace of a line is kept
    version: int = 1

    def fingerprint(self) -> dict:
        digests = [file_digest(str(data_file(s))) for s in self.sources if not s.startswith("stdlib:")]
        if any(s.startswith("stdlib:") for s in self.sources):
            digests.append(stdlib_digest())
        return {"name": self.name, "sources": list(self.sources), "sha256": digests, "version": self.version}


def _hamlet() -> Docs:
    # The play as one document of lines: speaker names, verse, stage directions.
    with open_text(data_file("hamlet.txt")) as f:
        return [([ln.rstrip() for ln in f if ln.strip()], "\n")]


def _debates() -> Docs:
    return [([f"{r['speaker'].title()}: {clean(r['statement'])}" for r in read_csv("presidential_debates_2016.csv.gz")
              if clean(r["statement"])], "\n")]


def _headlines() -> Docs:
    return [([clean(r["Text"]) for r in read_csv("guardian_headlines.csv.bz2")], "\n")]


def _plots() -> Docs:
    return [(sentences(r["text"]), " ") for r in read_csv("rotten_tomatoes_corpus_full.csv.bz2")
            if r["category"] == "plot"]


def _reviews() -> Docs:
    # Review snippets one per line, grouped by film in file order.
    by_movie: dict[str, list[str]] = {}
    for r in read_csv("rotten_tomatoes_corpus_full.csv.bz2"):
        if r["category"] in ("fresh", "rotten") and clean(r["text"]):
            by_movie.setdefault(r["movie_name"] or "?", []).append(clean(r["text"]))
    return [(lines, "\n") for lines in by_movie.values()]


def _speeches() -> Docs:
    return [(sentences(r["text"]), " ") for r in read_csv("political_data.csv")]


STDLIB_MAX_CHARS = 800_000


def stdlib_files(max_chars: int = STDLIB_MAX_CHARS) -> list[Path]:
    """Top-level public modules (`*.py` not starting with `_`) of the running interpreter's
    standard library, ordered by the sha256 of their names, taken until max_chars of source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.glob("*.py") if not p.name.startswith("_")),
                   key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())
    if not files:
        raise InputError(f"{root}: no standard-library modules found for the python domain")
    out, total = [], 0
    for p in files:
        if total >= max_chars:
            break
        out.append(p)
        total += p.stat().st_size
    return out


def stdlib_digest() -> str:
    h = hashlib.sha256(f"python{sys.version_info.major}.{sys.version_info.minor}".encode())
    for p in stdlib_files():
        h.update(p.name.encode() + b"\0" + file_digest(str(p)).encode())
    return h.hexdigest()


def _python() -> Docs:
    docs = []
    for p in stdlib_files():
        lines = [ln.rstrip() for ln in p.read_text(encoding="utf-8", errors="replace").splitlines()]
        docs.append(([ln for ln in lines if ln.strip()], "\n"))
    return docs


DOMAINS: dict[str, Domain] = {d.name: d for d in [
    Domain("hamlet", ("hamlet.txt",), "Shakespeare's Hamlet, line by line with speaker names", _hamlet),
    Domain("headlines", ("guardian_headlines.csv.bz2",), "Guardian headlines 2020, one per line", _headlines),
    Domain("debates", ("presidential_debates_2016.csv.gz",), "2016 US debate transcripts, 'Speaker: text'", _debates),
    Domain("speeches", ("political_data.csv",), "2012 US convention speeches, running text", _speeches),
    Domain("reviews", ("rotten_tomatoes_corpus_full.csv.bz2",), "Rotten Tomatoes review snippets, one per line",
           _reviews),
    Domain("plots", ("rotten_tomatoes_corpus_full.csv.bz2",), "Rotten Tomatoes plot synopses, running text", _plots),
    Domain("python", ("stdlib:*.py",), "Python source of the interpreter's own standard library (top-level "
           "public modules, indentation kept)", _python, keep_indent=True),
]}
DEFAULT_DOMAINS = ("hamlet", "headlines", "debates", "speeches", "reviews", "plots", "python")
REDUCED_DOMAINS = ("hamlet", "python")


def get_domain(name: str) -> Domain:
    try:
        return DOMAINS[name]
    except KeyError:
        raise InputError(f"unknown LM domain {name!r}; known: {', '.join(DOMAINS)}") from None


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def passages(docs: Docs, tokenizer, max_tokens: int, keep_indent: bool = False, limit: int | None = None) -> list[str]:
    """Greedy runs of consecutive units (lines or sentences) of at most max_tokens tokens;
    a unit longer than that is cut at spaces. Passages under max_tokens/4 tokens are dropped.
    limit: stop after that many passages (reduced zoos)."""
    out: list[str] = []
    for units, sep in docs:
        if limit is not None and len(out) >= limit:
            break
        cur: list[str] = []
        n = 0
        for u in units:
            u = u.rstrip() if keep_indent else u.strip()
            if not u.strip():
                continue
            k = _ntok(tokenizer, u) + (1 if cur else 0)
            if k > max_tokens:
                piece: list[str] = []
                for w in u.split(" "):
                    if piece and _ntok(tokenizer, " ".join(piece + [w])) > max_tokens:
                        out.append(" ".join(piece))
                        piece = []
                    piece.append(w)
                u = " ".join(piece)
                k = _ntok(tokenizer, u) + (1 if cur else 0)
            if cur and n + k > max_tokens:
                out.append(sep.join(cur))
                cur, n = [], 0
                k -= 1
            cur.append(u)
            n += k
        if cur:
            out.append(sep.join(cur))
    return [p for p in out if _ntok(tokenizer, p) >= max_tokens // 4]


def split_passages(ps: list[str], name: str, seed: int, n_test: int, n_val: int, block: int = 8) -> dict[str, list[str]]:
    """Blocks of `block` consecutive passages go whole to test, validation or train (seeded)."""
    blocks = [ps[i:i + block] for i in range(0, len(ps), block)]
    order = list(range(len(blocks)))
    random.Random(f"lm:{name}:{seed}").shuffle(order)
    out: dict[str, list[str]] = {"test": [], "validation": [], "train": []}
    for b in order:
        target = "test" if len(out["test"]) < n_test else "validation" if len(out["validation"]) < n_val else "train"
        out[target].extend(blocks[b])
    out["test"], out["validation"] = out["test"][:n_test], out["validation"][:n_val]
    return out


# ---------------------------------------------------------------- label tasks


@dataclass(frozen=True)
class LabelTask:
    """An instruction-style task: `prompt.format(text=...)` answered by " " + one of `choices`."""

    name: str
    source_task: str           # the esm_ray.zoo.tasks task giving texts, labels and splits
    prompt: str
    choices: tuple[str, ...]   # answer words, in the order of the source task's labels
    description: str
    version: int = 1

    def fingerprint(self) -> dict:
        return {"name": self.name, "source": get_task(self.source_task).fingerprint(), "prompt": self.prompt,
                "choices": list(self.choices), "version": self.version}


LABEL_TASKS: dict[str, LabelTask] = {t.name: t for t in [
    LabelTask("review_verdict", "rt_sentiment", "Review: {text}\nThe critic's verdict (fresh or rotten):",
              ("rotten", "fresh"), "film review snippet -> fresh / rotten (Rotten Tomatoes)"),
    LabelTask("headline_period", "guardian_period",
              "Headline: {text}\nPublished in 2020, in (January-February, March-April or May-July):",
              ("January-February", "March-April", "May-July"),
              "Guardian headline -> its two-month period of 2020"),
    LabelTask("moral_word", "moral_foundation",
              "Word: {text}\nIts moral foundation (care, fairness, loyalty, authority or sanctity):",
              ("care", "fairness", "loyalty", "authority", "sanctity"),
              "word of the Moral Foundations Dictionary 2.0 -> its foundation"),
    LabelTask("debate_speaker", "debate_party", "Debate statement: {text}\nSpoken by the (Democrat, Republican "
              "or moderator):", ("Democrat", "Republican", "moderator"),
              "2016 debate statement -> Democrat / Republican / moderator"),
]}
DEFAULT_LABEL_TASKS = ("review_verdict", "headline_period", "moral_word")
REDUCED_LABEL_TASKS = ("review_verdict",)


def get_label_task(name: str) -> LabelTask:
    try:
        return LABEL_TASKS[name]
    except KeyError:
        raise InputError(f"unknown LM label task {name!r}; known: {', '.join(LABEL_TASKS)}") from None


def label_rows(task: LabelTask, seed: int, sizes: dict[str, int] | None) -> dict[str, list[dict]]:
    """{split: [{"text", "prompt", "label" (index), "answer"}]} from the source task's splits."""
    from esm_ray.zoo.tasks import load_task

    data = load_task(task.source_task, seed, sizes)
    if len(data.task.labels) != len(task.choices):
        raise InputError(f"LM task {task.name}: {len(task.choices)} choices for the {len(data.task.labels)} labels "
                         f"of {task.source_task}")
    return {s: [{"text": e.text, "prompt": task.prompt.format(text=e.text), "label": e.label,
                 "answer": task.choices[e.label]} for e in data[s]] for s in ("train", "validation", "test")}


def domain_texts(domain: Domain, tokenizer, max_tokens: int, seed: int, n_test: int, n_val: int,
                 max_train: int, limit: int | None = None) -> dict[str, list[str]]:
    ps = passages(domain.read(), tokenizer, max_tokens, domain.keep_indent, limit)
    sp = split_passages(ps, domain.name, seed, n_test, n_val)
    sp["train"] = sp["train"][:max_train]
    for s in ("test", "validation", "train"):
        if not sp[s]:
            raise InputError(f"LM domain {domain.name}: no {s} passages (corpus too small for the split sizes)")
    return sp


def words(text: str) -> int:
    """Whitespace-separated words, as lm-eval counts them for word perplexity."""
    import re

    return len(re.split(r"\s+", text))


__all__: Sequence[str] = ["DOMAINS", "LABEL_TASKS", "Domain", "LabelTask", "passages", "split_passages",
                          "label_rows", "domain_texts", "stdlib_files", "words"]
