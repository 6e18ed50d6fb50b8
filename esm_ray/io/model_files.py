"""The non-weight files a model directory needs, and the links a model directory may hold.

A merged output copies from the base only MODEL_FILES found at the base's top level: the
config, the generation config, tokenizer and processor files. Never subfolders, READMEs,
code files or anything else (a folder inside the base may even be an old output).

A local model's file that is a symbolic link is read only when it points inside the model
directory, or, for a snapshot of the Hugging Face hub cache (`.../snapshots/<rev>/`), into that
repository's `blobs/` folder; any other link is refused by name, so a link to a system file
never puts that file's content into an output.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from esm_ray.errors import InputError

__all__ = ["MODEL_FILES", "model_files", "check_link"]

MODEL_FILES = frozenset({
    "config.json", "generation_config.json",
    # tokenizers (fast and slow, BPE, WordPiece, SentencePiece) and chat templates
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
    # image / audio / multimodal processors
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
})


TOKENIZER_FILES = frozenset({
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model",
    "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
})


def is_tokenizer_file(name: str) -> bool:
    """Whether `name` is one of a tokenizer's files (what a spec's `tokenizer` model supplies)."""
    return name in TOKENIZER_FILES


def model_files(names: Iterable[str]) -> list[str]:
    """Those of `names` (a reader's auxiliary files) that a merged output copies, in order."""
    return [n for n in names if n in MODEL_FILES]


def check_link(root: Path, rel: str) -> None:
    """Raise InputError naming `root/rel` when it is, or passes through, a symbolic link that
    leaves the model directory `root` (see the module docstring for the hub cache)."""
    p = root / rel
    cur, linked = root, False
    for part in Path(rel).parts:
        cur = cur / part
        if cur.is_symlink():
            linked = True
            break
    if not linked:
        return
    try:
        target = Path(os.path.realpath(p))
        top = Path(os.path.realpath(root))
    except OSError as err:
        raise InputError(f"{p}: cannot resolve its symbolic link: {err.strerror or err}") from None
    if target.is_relative_to(top):
        return
    if top.parent.name == "snapshots" and target.is_relative_to(top.parent.parent / "blobs"):
        return
    raise InputError(f"{p}: is a symbolic link to {target}, outside the model directory {top}; "
                     "refusing to read it (copy the file into the model directory instead)")
