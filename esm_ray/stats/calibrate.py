"""Calibration: run an expert over its task's samples once and keep every linear layer's input
statistics (n, Σx, XᵀX accumulated in float64 from float32 block products, or all in float64
with `calibration.gram_precision: float64`), cached on disk per (model, data, settings).

`calibrate` works on a loaded nn.Module; `calibrate_expert` loads the Hugging Face model,
reads the data file, and caches the result (see `esm_ray.stats.store` for the file layout).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from esm_ray.errors import InputError, SpecError
from esm_ray.heap import return_kept_memory, reuse_freed_memory
from esm_ray.io.uri import is_s3
from esm_ray.spec import CalibrationSpec, S3Options
from esm_ray.stats.cache import cache_root, cache_source, unusable
from esm_ray.stats.data import check_token_ids, data_hash, load_calibration_rows
from esm_ray.models.blocks import BlockModel, LayerwiseUnsupported, layerwise_blocks
from esm_ray.models.hf import StoredModel, base_model, copy_tokenizer
from esm_ray.models.text import TOKENIZER_FILES, encode_rows, forward_kwargs, make_batches, pad_id
from esm_ray.stats.hooks import GramPrecision, ModuleFilter, ModuleStats, StatsCollector, in_features, linear_modules, plan_passes
from esm_ray.stats.layerwise import calibrate_layerwise
from esm_ray.stats.spill import StatsSpill
from esm_ray.stats.store import FORMAT_VERSION, StatsStore

log = logging.getLogger(__name__)

# batching: esm_ray.models.text ----------------------------------------------------------------
def _check_vocab(model: nn.Module, ids: list[list[int]]) -> None:
    """InputError for a token id the model's input embedding has no row for (the embedding
    would raise IndexError in the middle of a forward pass)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    if not isinstance(n, int):
        return
    for i, row in enumerate(ids):
        if max(row) >= n or min(row) < 0:
            bad = max(row) if max(row) >= n else min(row)
            raise InputError(f"calibration row {i}: token id {bad} is outside the model's vocabulary "
                             f"({n} ids, 0 to {n - 1}); the data or tokenizer belongs to another model")


def output_head(model: nn.Module) -> tuple[str, nn.Module, nn.Module] | None:
    """(name, head, base model) of a model whose linear output head (`get_output_embeddings`)
    may read the last hidden state of its base model (`base_model_prefix`), as a causal LM's
    does; else None. Whether it really does is checked on data (`_head_reads_base`)."""
    get_head = getattr(model, "get_output_embeddings", None)
    base = base_model(model)
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False) or not callable(get_head) \
            or base is None:
        return None
    head = get_head()
    if not isinstance(head, nn.Linear):
        return None
    name = next((n for n, m in model.named_modules() if m is head), None)
    return None if name is None else (name, head, base)


def _head_reads_base(model: nn.Module, head: tuple[str, nn.Module, nn.Module], batch: tuple[Tensor, Tensor],
                     device: torch.device) -> bool:
    """Whether the head's input in a whole forward is exactly the base model's last hidden state
    (true for LLaMA, Mistral, Qwen2, GPT-2, OPT; false where a transform sits between them, as
    in BERT's masked-LM head). Checked on the first row of `batch`, cut to 8 positions: a
    property of the model's code, not of the data, at a small fraction of one batch's cost."""
    ids, mask = batch[0][:1, :8].to(device), batch[1][:1, :8].to(device)
    seen: list[Tensor] = []
    hook = head[1].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model(input_ids=ids, attention_mask=mask, **forward_kwargs(model))
    finally:
        hook.remove()
    out = head[2](input_ids=ids, attention_mask=mask, **forward_kwargs(head[2]))[0]
    return len(seen) == 1 and seen[0].shape == out.shape and torch.equal(seen[0], out)


def _run_passes(model: nn.Module, batches: list[tuple[Tensor, Tensor]], modules: ModuleFilter,
                max_bytes: int | None, device: torch.device,
                precision: GramPrecision = "mixed") -> tuple[dict[str, ModuleStats], int]:
    # A causal LM runs its base model alone, the last hidden state handed to the head's
    # statistics: the logits (tokens × vocabulary floats: 151 MB for a batch of 8 × 96 tokens of
    # SmolLM2, whose head is about a fifth of a forward's multiply-adds) are never formed.
    head = output_head(model)
    if head is not None and not _head_reads_base(model, head, batches[0], device):
        head = None
    kwargs = forward_kwargs(model if head is None else head[2])

    def forward(col: StatsCollector, batch: tuple[Tensor, Tensor]) -> None:
        ids, mask = batch[0].to(device), batch[1].to(device)
        col.begin_batch(mask)
        if head is None:
            model(input_ids=ids, attention_mask=mask, **kwargs)
            return
        name, module, decoder = head
        out = decoder(input_ids=ids, attention_mask=mask, **kwargs)
        col.feed(name, module, out[0])  # the head's input, as its hook would see it

    targets = linear_modules(model, modules)
    if max_bytes is None:
        passes = [list(targets)]
    else:  # one cheap batch reveals which layers share an input, then pack the groups
        with StatsCollector(model, list(targets), record_only=True) as probe:
            forward(probe, batches[0])
        grouped = probe.groups()
        unseen = [[m] for m in targets if m not in probe.shared]
        widths = {m: in_features(mod) for m, mod in targets.items()}
        passes = plan_passes(list(grouped.values()) + unseen, widths, max_bytes)
    tokens = sum(int(mask.sum()) for _ids, mask in batches)
    out: dict[str, ModuleStats] = {}
    for names in passes:
        with StatsCollector(model, names, precision=precision, tokens=tokens) as col:
            for batch in batches:
                forward(col, batch)
        out.update(col.results())
    return out, len(passes)


def calibrate(model: nn.Module, rows: list[dict[str, Any]], tokenizer: Any, settings: CalibrationSpec,
              *, modules: ModuleFilter = None, max_bytes: int | None = None,
              blocks: BlockModel | None = None,
              emit: Callable[[dict[str, ModuleStats]], None] | None = None) -> dict[str, ModuleStats]:
    """Input statistics of every linear layer of `model` over `rows`.

    Rows are encoded (truncated to settings.max_length), grouped in batches of
    settings.batch_size, right-padded with an attention mask; padding rows are not counted.
    modules:   restrict to these module names (or a predicate on the name)
    max_bytes: budget for the statistics held at once; when the layers need more, the data
               is run several times, each pass over a group of layers (see hooks.plan_passes)
    blocks:    `model` is this skeleton's (meta device): run layer-wise, one block loaded at a
               time (esm_ray.stats.layerwise); max_bytes then applies within each block
    emit:      layer-wise only: each part's statistics are handed to it when complete and not
               kept (calibrate then returns {})
    Returns {module name: ModuleStats}; modules reading the same input share one object.
    """
    if not rows:
        raise InputError("no calibration rows")
    ids = encode_rows(rows, tokenizer, settings.max_length)
    _check_vocab(model, ids)
    batches = list(make_batches(ids, settings.batch_size, pad_id(model, tokenizer)))
    if blocks is not None:
        names = list(linear_modules(model, modules))
        with torch.inference_mode(), reuse_freed_memory():
            return calibrate_layerwise(blocks, batches, names, max_bytes, settings.gram_precision, emit)
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        # each batch's activations are freed and allocated again: kept by the allocator (esm_ray.heap)
        with torch.inference_mode(), reuse_freed_memory():
            stats, n_passes = _run_passes(model, batches, modules, max_bytes, device,
                                          settings.gram_precision)
    finally:
        model.train(was_training)
    if n_passes > 1:
        log.info("calibration ran %d passes to stay under %d bytes", n_passes, max_bytes)
    return stats


# model loading: esm_ray.models.hf -------------------------------------------------------------
def _hash_files(paths: list[Path], root: Path) -> str:
    """sha256 over the names and bytes of some files (the tokenizer's part of the cache key)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _find_tokenizer(tokenizer_uri: str | None, src: StoredModel, s3: S3Options | None, tmp: Path) -> Path | None:
    """Tokenizer files: from `tokenizer_uri` (a local tokenizer or model directory, or an s3://
    model whose auxiliary files hold one) when it has them, else from the expert itself."""
    if tokenizer_uri and is_s3(tokenizer_uri):
        from esm_ray.io.reader import open_model

        with open_model(tokenizer_uri, s3) as reader:
            found = copy_tokenizer(reader, reader.config, tmp / "given")
        if found is not None:
            return found
    elif tokenizer_uri:
        local = Path(tokenizer_uri.removeprefix("file://")).expanduser()
        if local.is_dir() and any((local / n).is_file() for n in TOKENIZER_FILES):
            return local
    return src.tokenizer_dir(tmp / "model")


def _checkpoint_names(model: nn.Module, names: list[str], ckpt_keys: set[str]) -> dict[str, str]:
    """Map module names of the loaded model to the names used by the checkpoint's keys.

    A checkpoint of e.g. BertForSequenceClassification stores 'bert.encoder...' while the bare
    encoder we load calls it 'encoder...'. Statistics are saved under the checkpoint's names,
    the ones the merge executor sees.
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    out = {}
    for n in names:
        if f"{n}.weight" in ckpt_keys or not prefix:
            out[n] = n
        elif f"{prefix}.{n}.weight" in ckpt_keys:
            out[n] = f"{prefix}.{n}"
        elif n.startswith(prefix + ".") and f"{n[len(prefix) + 1:]}.weight" in ckpt_keys:
            out[n] = n[len(prefix) + 1:]
        else:
            out[n] = n
    return out


# cache ---------------------------------------------------------------------------------------
def cache_key(model_fp: str, data_fp: str, settings: CalibrationSpec, extra: dict[str, Any] | None = None) -> str:
    """sha256 of everything the statistics depend on.

    gram_precision is in: the two precisions give Grams that differ in round-off.
    batch_size, mode and cache_dir are left out: padding is masked, so batching changes only
    round-off, a layer-wise pass computes the same statistics as a full one (the same
    operations on the same batches), and where the cache lives does not change what is in it.
    """
    payload = {"format": FORMAT_VERSION, "model": model_fp, "data": data_fp, "samples": settings.samples,
               "max_length": settings.max_length, "seed": settings.seed,
               "gram_precision": settings.gram_precision, **(extra or {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class _Pass:
    """One calibration pass of a stored expert (`calibrate_expert`): the whole model, or one
    block at a time with each block's statistics spilled to the cache directory as it is done.
    After a call: `rename` (module -> checkpoint name) and `spill` (None for the whole model)."""

    def __init__(self, src: StoredModel, rows: list[dict[str, Any]], tokenizer: Any, settings: CalibrationSpec,
                 modules: list[str] | None, max_bytes: int | None, dtype: torch.dtype, device: str, path: Path,
                 data_uri: str) -> None:
        self.src, self.rows, self.tokenizer, self.settings = src, rows, tokenizer, settings
        self.modules, self.max_bytes, self.dtype, self.device = modules, max_bytes, dtype, device
        self.path, self.data_uri = path, data_uri
        self.rename: dict[str, str] = {}
        self.spill: StatsSpill | None = None

    def _unusable(self, err: OSError) -> SpecError:
        return unusable(cache_root(self.settings), cache_source(self.settings), err)

    def __call__(self, layerwise: bool) -> dict[str, ModuleStats]:
        src, settings = self.src, self.settings
        blocks = BlockModel(src, self.dtype, torch.device(self.device)) if layerwise else None
        model = blocks.model if blocks is not None else src.load(self.dtype, self.device)
        self.rename = rename = _checkpoint_names(model, list(linear_modules(model)), src.keys())
        selected = None
        if self.modules is not None:
            wanted = set(self.modules)
            selected = [m for m, ck in rename.items() if ck in wanted]
        spill = self.spill = None
        emit = None
        if blocks is not None:  # each block's statistics go to disk as soon as they are complete
            return_kept_memory()  # an earlier expert's (a merge calibrates its experts in turn)
            try:
                spill = self.spill = StatsSpill(self.path.parent)
            except OSError as err:
                raise self._unusable(err) from None

            def emit(part: dict[str, ModuleStats]) -> None:
                try:
                    spill.add({rename[m]: st for m, st in part.items()})
                except OSError as err:  # e.g. the disk is full
                    raise self._unusable(err) from None
        try:
            return calibrate(model, self.rows, self.tokenizer, settings, modules=selected,
                             max_bytes=self.max_bytes, blocks=blocks, emit=emit)
        except BaseException as err:
            if spill is not None:
                spill.close()
            if not isinstance(err, InputError):
                raise
            # An error names the model where it is about it (layer-wise loading names it already;
            # a structure the pass cannot cut is the model's), else the data.
            kind = LayerwiseUnsupported if isinstance(err, LayerwiseUnsupported) else InputError
            where = src.uri if kind is LayerwiseUnsupported else self.data_uri
            msg = str(err)
            raise kind(msg if msg.startswith(src.uri) else f"{where}: {msg}") from None


def calibrate_expert(model_uri: str, data_uri: str, settings: CalibrationSpec, s3: S3Options | None = None,
                     tokenizer_uri: str | None = None, *, name: str | None = None, modules: list[str] | None = None,
                     max_bytes: int | None = None, dtype: torch.dtype = torch.float32,
                     device: str = "cpu", base_uri: str | None = None) -> StatsStore:
    """Calibrate one expert on its data file, or return the cached statistics.

    The model class comes from config `architectures` (*ForCausalLM -> AutoModelForCausalLM,
    else AutoModel); it runs in `dtype` on `device` (float32 on CPU by default). Module names
    here and in the result are the checkpoint's (see `_checkpoint_names`). A tokenizer is loaded
    only when a row is text: from `tokenizer_uri`, else from the model directory.
    name: how log lines and the manifest call the expert (default: the last part of the URI).
    base_uri: the merge's base; a LoRA adapter at `model_uri` is applied to it (io.adapter).
    """
    label = name or model_uri.rstrip("/").rsplit("/", 1)[-1]
    t0 = time.perf_counter()
    rows = load_calibration_rows(data_uri, settings.samples, settings.seed)
    src = StoredModel(model_uri, s3, base_uri)
    try:
        vocab = src.config.get("vocab_size")
        if isinstance(vocab, int) and vocab > 0 and not is_s3(data_uri):
            check_token_ids(data_uri, vocab)  # names the file and line
        with tempfile.TemporaryDirectory(prefix="esm-ray-tok-") as tmp:
            tokenizer, tok_fp = None, None
            if any("input_ids" not in r for r in rows):
                tok_dir = _find_tokenizer(tokenizer_uri, src, s3, Path(tmp))
                if tok_dir is None:
                    where = f"{model_uri}" + (f" or {tokenizer_uri}" if tokenizer_uri else "")
                    raise InputError(f"{data_uri}: rows are text but no tokenizer was found in {where}; "
                                     f"add tokenizer files or use rows with input_ids")
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
                tok_fp = _hash_files([p for p in tok_dir.iterdir() if p.name in TOKENIZER_FILES], tok_dir)
            extra = {"dtype": str(dtype).replace("torch.", ""), "tokenizer": tok_fp,
                     "modules": sorted(modules) if modules is not None else None}
            model_fp = src.fingerprint()
            data_fp = data_hash(data_uri)
            key = cache_key(model_fp, data_fp, settings, extra)
            path = cache_root(settings) / "stats" / f"{key}.safetensors"
            if path.is_file() and path.with_suffix(".json").is_file():
                try:
                    store = StatsStore(path, cache_hit=True)
                    if store.key == key:
                        log.info("calibration of %s: cache hit %s (%d modules)", label, path.name,
                                 len(store.modules()))
                        return store
                except InputError as err:
                    log.warning("calibration of %s: ignoring unreadable cache entry (%s)", label, err)
            t1 = time.perf_counter()
            layerwise = layerwise_blocks(settings.mode, src.is_adapter, src.config, src.reader.keys(),
                                         model_uri) is not None
            run = _Pass(src, rows, tokenizer, settings, modules, max_bytes, dtype, device, path, data_uri)
            try:
                stats = run(layerwise)
            except LayerwiseUnsupported as err:
                if settings.mode != "auto":
                    raise
                log.warning("calibration of %s: %s; calibrating the whole model instead", label, err)
                stats = run(False)
            rename, spill = run.rename, run.spill
            t_fwd = time.perf_counter() - t1
    finally:
        src.close()
    stats = {rename[m]: s for m, s in stats.items()}
    took = time.perf_counter() - t0
    tokens = spill.tokens if spill is not None else max((s.n for s in stats.values()), default=0)
    manifest = {"key": key, "expert": label, "model": model_uri, "model_fingerprint": model_fp,
                "data": data_uri, "data_hash": data_fp, "rows": len(rows), "tokens": tokens,
                "settings": settings.model_dump(mode="json"),
                "mode": "layerwise" if spill is not None else "full", "dtype": extra["dtype"],
                "seconds": round(took, 3), "seconds_forward": round(t_fwd, 3)}
    try:
        store = spill.save(path, manifest) if spill is not None else StatsStore.save(stats, path, manifest)
    except OSError as err:  # the cache directory went away or became read-only since the plan
        raise unusable(cache_root(settings), cache_source(settings), err) from None
    log.info("calibration of %s: %d rows, %d tokens, %d modules (%d distinct inputs) in %.2fs%s -> %s",
             label, len(rows), tokens, len(store.modules()), store.manifest["distinct_inputs"], took,
             " (layer-wise)" if spill is not None else "", path.name)
    return store
