"""What a request must satisfy before any of its inputs joins a dynamic batch.

- the body is read up to `max_body_bytes` (413 beyond, before the rest is read or parsed);
- the body parses as JSON into the request model (422 naming the field, as FastAPI does);
- every input is checked on its own (422 or 413 naming `inputs[i]`): a text is valid Unicode
  (no lone surrogates) of at most `max_input_chars` characters, a token id list holds ints in
  [0, vocab_size).

A request that passes can still not hurt the others in its batch: the batch runner retries a
failed batch one input at a time (app.RoutedServer._run).
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, or 413 as soon as it is known to exceed max_bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise HTTPException(413, f"request body of {int(declared)} bytes is over the limit of {max_bytes} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise HTTPException(413, f"request body is over the limit of {max_bytes} bytes")
    return bytes(body)


def parse_body(body: bytes, model: type[BaseModel]) -> Any:
    """JSON body -> request model; errors are FastAPI's 422 (RequestValidationError)."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as err:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", err.pos), "msg": "JSON decode error",
                                       "input": {}, "ctx": {"error": err.msg}}]) from None
    except (UnicodeDecodeError, RecursionError) as err:
        why = "nested too deeply" if isinstance(err, RecursionError) else "not UTF-8"
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body",), "msg": f"JSON decode error: {why}",
                                       "input": {}}]) from None
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])}
                                      for e in err.errors(include_url=False, include_context=False)]) from None


def check_inputs(inputs: Sequence[Any], *, vocab_size: int, max_chars: int, has_tokenizer: bool) -> None:
    """Reject the first input that must not reach the model, naming its index."""
    for i, x in enumerate(inputs):
        where = f"`inputs[{i}]`"
        if isinstance(x, str):
            if not has_tokenizer:
                raise HTTPException(400, f"{where}: this model has no tokenizer: send token id lists")
            if len(x) > max_chars:
                raise HTTPException(413, f"{where} has {len(x)} characters, over the limit of {max_chars}")
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as err:
                raise HTTPException(422, f"{where} is not valid Unicode text ({err.reason} at character "
                                         f"{err.start})") from None
            if not x.strip():
                raise HTTPException(400, f"{where} is empty")
        else:
            if not x:
                raise HTTPException(400, f"{where} is empty")
            if len(x) > max_chars:
                raise HTTPException(413, f"{where} has {len(x)} token ids, over the limit of {max_chars}")
            for j, t in enumerate(x):
                if not 0 <= t < vocab_size:
                    raise HTTPException(422, f"{where}[{j}]: token id {t} is outside the vocabulary "
                                             f"[0, {vocab_size})")


__all__ = ["check_inputs", "parse_body", "read_body"]
