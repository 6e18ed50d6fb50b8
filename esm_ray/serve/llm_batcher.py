"""Batching across requests: sequences that arrive together share one decoding loop.

A request's choices (n per prompt) become sequences (`Seq`) on one queue. A single worker
takes what is waiting (up to max_batch_size, waiting batch_wait_timeout_s for more after the
first), asks the router for the sequences that name `auto`, and decodes them all in one loop
(llm_decode.decode with the stacked adapters, so different tasks share every forward pass).
Sequences that arrive while a batch decodes wait for the next one (no joining mid-flight).

Each sequence streams events to its request's asyncio queue: ("task", i, name), ("text", i,
delta), ("done", i, finish_reason), ("error", i, message). If a batch raises, its sequences that
have sent no text yet are rerun one at a time, so only the sequence that fails gets an error.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from esm_ray.serve.llm_api import ApiError
from esm_ray.serve.llm_decode import Row

log = logging.getLogger("esm_ray.serve")


@dataclass
class Seq:
    """One choice of one request: its prompt, adapter, sampling and where its events go."""

    index: int
    ids: list[int]
    adapter: str | None
    auto: bool
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    events: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    cancelled: bool = False
    out: list[int] = field(default_factory=list)
    sent: str = ""
    started: bool = False
    stopped: bool = False

    def emit(self, *event: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Batcher:
    """The replica's one decoding worker and its queue."""

    def __init__(self, backend: Any, *, max_batch_size: int, wait_s: float, max_waiting: int,
                 debug_delay_s: float = 0.0, debug_fail_token: int | None = None) -> None:
        self.backend, self.max_batch, self.wait_s, self.max_waiting = backend, max_batch_size, wait_s, max_waiting
        self.debug_delay_s, self.debug_fail_token = debug_delay_s, debug_fail_token
        self.queue: asyncio.Queue | None = None
        self.waiting = 0
        self.batches: list[int] = []  # sizes of the last batches run (GET /v1/model shows them)
        self.batches_run = self.sequences_run = 0

    def submit(self, seqs: list[Seq]) -> None:
        """Queue a request's sequences, or 503 when too many already wait."""
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._work())
        if self.waiting + len(seqs) > self.max_waiting:
            raise ApiError(503, f"the server is overloaded: {self.waiting} sequences are waiting (limit "
                                f"{self.max_waiting}); retry later", None, "overloaded")
        self.waiting += len(seqs)
        for s in seqs:
            self.queue.put_nowait(s)

    async def _work(self) -> None:
        assert self.queue is not None
        while True:
            batch = [await self.queue.get()]
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    batch.append(self.queue.get_nowait() if left <= 0 else
                                 await asyncio.wait_for(self.queue.get(), left))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            self.waiting -= len(batch)
            batch = [s for s in batch if not s.cancelled]
            if not batch:
                continue
            self.batches = (self.batches + [len(batch)])[-32:]
            self.batches_run, self.sequences_run = self.batches_run + 1, self.sequences_run + len(batch)
            if self.debug_delay_s:
                await asyncio.sleep(self.debug_delay_s)
            try:
                await asyncio.to_thread(self._run, batch)
            except Exception as err:  # noqa: BLE001 - the worker must outlive any batch
                log.exception("batch of %d failed", len(batch))
                for s in batch:
                    s.emit("error", s.index, f"{type(err).__name__}: {err}")

    def _run(self, batch: list[Seq]) -> None:
        try:
            self._decode(batch)
        except Exception as err:  # noqa: BLE001 - isolate the sequence that caused it
            log.warning("a batch of %d failed (%s: %s); rerunning its sequences one by one", len(batch),
                        type(err).__name__, err)
            for s in batch:
                if s.started:
                    s.emit("error", s.index, f"the batch failed after this sequence began: {err}")
                    continue
                try:
                    self._decode([s])
                except Exception as one:  # noqa: BLE001 - this sequence's own failure, sent to its caller
                    s.emit("error", s.index, f"{type(one).__name__}: {one}")

    def _decode(self, batch: list[Seq]) -> None:
        if self.debug_fail_token is not None and any(self.debug_fail_token in s.ids for s in batch):
            raise RuntimeError(f"debug_fail_token {self.debug_fail_token} in the batch")
        auto = [s for s in batch if s.auto and s.adapter is None]
        if auto:
            for s, task in zip(auto, self.backend.route([s.ids for s in auto])):
                s.adapter = task
        for s in batch:
            s.emit("task", s.index, s.adapter)
        self.backend.generate([Row(s.ids, s.adapter, s.max_tokens, s.temperature, s.top_p, s.seed,
                                   on_token=self._on_token(s), on_finish=self._on_finish(s)) for s in batch])

    def _on_token(self, s: Seq):
        hold = max((len(x) for x in s.stop), default=0)

        def on_token(tok: int) -> str | None:
            if s.cancelled:
                return "cancelled"
            s.out.append(tok)
            text = self.backend.text(s.out)
            cut = min((i for i in (text.find(x) for x in s.stop) if i >= 0), default=-1)
            if cut >= 0:
                self._send(s, text[:cut])
                s.stopped = True
                return "stop"
            safe = text[:max(0, len(text) - max(0, hold - 1))]
            if not safe.endswith("\ufffd"):  # an incomplete character waits for its next bytes
                self._send(s, safe)
            return None

        return on_token

    def _on_finish(self, s: Seq):
        def on_finish(reason: str) -> None:
            if not s.stopped:  # what was held back for a stop string that never came
                self._send(s, self.backend.text(s.out))
            s.emit("done", s.index, reason, len(s.out))

        return on_finish

    @staticmethod
    def _send(s: Seq, text: str) -> None:
        if len(text) > len(s.sent) and text.startswith(s.sent):
            s.started = True
            s.emit("text", s.index, text[len(s.sent):])
            s.sent = text


__all__ = ["Batcher", "Seq"]
