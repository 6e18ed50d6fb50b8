"""The OpenAI request bodies esm-ray accepts, and OpenAI's error shape.

Fields OpenAI defines that esm-ray does not implement are declared, so that a client that sends
them gets a 400 naming the field (`param`) instead of a silent difference; fields OpenAI does not
define are a 422 naming them. Every error body is OpenAI's:

    {"error": {"message": ..., "type": "invalid_request_error", "param": "max_tokens", "code": null}}
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class ApiError(Exception):
    """An error answered in OpenAI's shape: HTTP status, message, the field it is about."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


_TYPES = {404: "invalid_request_error", 413: "invalid_request_error", 503: "server_overloaded",
          500: "server_error"}


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """FastAPI/pydantic validation errors -> one 422 naming the first bad field."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "invalid body"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return ApiError(422, f"the body is not valid JSON: {first.get('msg')}", None, "json_invalid")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    what = f"`{param}`: " if param else ""
    return ApiError(422, f"{what}{first.get('msg', 'invalid')}{more}", param, str(first.get("type", "invalid")))


class Sampling(BaseModel):
    """What both endpoints share: decoding parameters and the fields esm-ray refuses."""

    model_config = ConfigDict(extra="forbid")

    model: StrictStr = Field(description="the merged model's id, a task adapter's name, or `auto` (router)")
    max_tokens: StrictInt | None = Field(None, description="tokens to generate per choice (default 16)")
    temperature: float | None = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    n: StrictInt | None = Field(None, ge=1)
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**64 - 9, description="choice k samples with seed + k")
    stream: StrictBool | None = False
    stream_options: dict[str, Any] | None = None
    user: StrictStr | None = None
    # OpenAI fields that esm-ray does not implement: a value other than the default is a 400
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    def unsupported(self) -> list[str]:
        """Names of the set fields esm-ray cannot honour."""
        out = [k for k in ("logprobs", "logit_bias") if getattr(self, k) not in (None, False, {})]
        out += [k for k in ("presence_penalty", "frequency_penalty") if getattr(self, k) not in (None, 0, 0.0)]
        return out


class CompletionRequest(Sampling):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    echo: StrictBool | None = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        out += ["echo"] if self.echo else []
        out += ["best_of"] if self.best_of not in (None, 1) else []
        out += ["suffix"] if self.suffix else []
        return out


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id ...: passed to the template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None


class ChatRequest(Sampling):
    messages: list[Message]
    max_completion_tokens: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    top_logprobs: StrictInt | None = None

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        out += [k for k in ("tools", "tool_choice", "top_logprobs") if getattr(self, k)]
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            out.append("response_format")
        return out


# the routed-LM loader's router choices (RouterOptions' fields of the same names)
ROUTER_CHOICES = ("router", "likelihood_candidates", "likelihood_margin", "router_depth")


class RouterOptions(BaseModel):
    """How `model: auto` is routed: the router loader and its choices (None: the directory's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    router_loader: str = Field("esm_ray.routed.lm:load_routed_lm", description="module:function -> RoutedLM")
    router: Literal["prototype", "sim", "likelihood"] | None = Field(
        None, description="the router of `model: auto` (default: the directory's)")
    likelihood_candidates: int | None = Field(
        None, ge=1, description="the likelihood router's adapters per prompt (default: the directory's)")
    likelihood_margin: float | None = Field(
        None, ge=0, description="the likelihood router skips its pass for prompts whose two best prototype "
                                "scores differ by at least this, per routed layer (default: the directory's; "
                                "inf: never skip)")
    router_depth: int | None = Field(
        None, ge=1, description="the router pass runs only the first N decoder blocks and scores the routed "
                                "linears in them (default: the directory's; all blocks)")

    def router_choice(self) -> dict[str, Any]:
        """The loader's keyword arguments for the choices made here."""
        return {k: getattr(self, k) for k in ROUTER_CHOICES if getattr(self, k) is not None}


__all__ = ["ApiError", "ChatRequest", "CompletionRequest", "Message", "ROUTER_CHOICES", "RouterOptions", "Sampling",
           "error_body", "validation_error"]
