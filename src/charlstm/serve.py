"""``charlstm serve``: trained models over HTTP, in the OpenAI completions dialect.

Routes (the OpenAI shapes that llama.cpp's server, vLLM and text-generation-inference
accept, so existing clients work unchanged):

* ``POST /v1/completions`` - text after a prompt; ``stream: true`` for Server-Sent Events;
* ``POST /v1/score``       - charlstm's own: each character's probability and surprise;
* ``GET /v1/models``, ``GET /health``, ``GET /openapi.json``, and ``GET /`` the page.

Each model has one ``Engine`` (``batching``): a worker thread that steps all its active
streams as one batch. This module only checks requests, hands streams to the engines and
turns their output into responses; it never steps a model on the event loop.

Everything a client sends is bounded (body, prompt, ``max_tokens``, ``n``, stops,
``logprobs``, time), and a refusal names the limit, in OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import random
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from .checkpoint import SUFFIX, TrainedModel
from .errors import CharLSTMError
from .generate import SamplingConfig

try:
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.middleware.cors import CORSMiddleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, Response
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError:  # the optional extra: `pip install charlstm[serve]`
    Starlette = None

COMPLETION_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "n", "seed",
                     "stream", "stream_options", "logprobs", "echo", "prime_unknown", "user",
                     "presence_penalty", "frequency_penalty", "best_of", "logit_bias", "suffix"}
SCORE_FIELDS = {"model", "text", "prime_unknown", "top", "user"}
MIN_TEMPERATURE = 0.01       # below this (and above 0) 1/T is too close to overflowing to mean anything
MAX_TEMPERATURE = 100.0
MAX_SEED = 2 ** 64
MAX_TOP_K = 65535
PAGE_LIMITS = ("max_length", "max_prompt", "max_choices", "max_logprobs", "max_score_chars")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


@dataclass(frozen=True)
class ServeConfig:
    """The server's options and limits (the CLI's flags)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_length: int = 1000          # default and ceiling of max_tokens (characters)
    max_prompt: int = 8192          # characters per prompt
    max_body: int = 1 << 20         # bytes per request body
    max_choices: int = 16           # n x prompts per request
    max_stop: int = 16              # stop strings per request
    max_stop_length: int = 64       # characters per stop string
    max_logprobs: int = 20          # alternatives per character
    max_score_chars: int = 20000    # characters per /v1/score text
    max_concurrent: int = 64        # streams in one model's batch
    max_queue: int = 256            # streams waiting for a place in the batch
    request_timeout: float = 300.0  # seconds per request
    flush_interval: float = 0.02    # seconds between hand-overs of streamed text
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    backend: str = "auto"

    def validate(self) -> None:
        positive = ("max_length", "max_prompt", "max_body", "max_choices", "max_stop", "max_stop_length",
                    "max_score_chars", "max_concurrent")
        for name in positive:
            if getattr(self, name) < 1:
                raise CharLSTMError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(self, name)}")
        if self.max_queue < 0 or self.max_logprobs < 0:
            raise CharLSTMError("--max-queue and --max-logprobs must not be negative")
        if not 0 <= self.port <= 65535:
            raise CharLSTMError(f"--port must be in [0, 65535], not {self.port}")
        if not (math.isfinite(self.request_timeout) and self.request_timeout > 0):
            raise CharLSTMError(f"--request-timeout must be a positive number of seconds, not {self.request_timeout}")
        if not (math.isfinite(self.flush_interval) and 0 <= self.flush_interval <= 1):
            raise CharLSTMError(f"--flush-interval must be in [0, 1] seconds, not {self.flush_interval}")
        if self.api_key is not None and not self.api_key.strip():
            raise CharLSTMError("--api-key must not be empty")


# ----------------------------------------------------------------------------- models


def find_checkpoints(paths: list[Path]) -> dict[str, Path]:
    """Model name (file stem) -> file, for checkpoint files and folders of them (every
    ``*.safetensors`` inside). Only these names are ever served: no request names a path."""
    found: dict[str, Path] = {}
    for path in paths:
        if path.is_dir():
            files = sorted(p for p in path.glob(f"*{SUFFIX}") if p.is_file())
            if not files:
                raise CharLSTMError(f"{path}: no {SUFFIX} checkpoints in this folder")
        elif path.is_file():
            files = [path]
        else:
            raise CharLSTMError(f"{path}: no such checkpoint file or folder")
        for file in files:
            name = file.name[:-len(SUFFIX)] if file.name.endswith(SUFFIX) else file.stem
            if name in found and found[name] != file:
                raise CharLSTMError(f"two checkpoints would both be called {name!r}: {found[name]} and {file}")
            found[name] = file
    return found


@dataclass
class ServedModel:
    """A loaded model and its generation loop."""

    name: str
    trained: TrainedModel
    engine: Any          # batching.Engine
    created: int = field(default_factory=lambda: int(time.time()))

    def describe(self) -> dict:
        trained = self.trained
        best = trained.training.best
        return {
            "id": self.name, "object": "model", "created": self.created, "owned_by": "charlstm",
            "charlstm": {
                "config": trained.config.to_dict(),
                "vocab": list(trained.vocab.chars),
                "parameters": trained.model.num_parameters(),
                "val_bits_per_char": best.val_bpc if best and math.isfinite(best.val_loss) else None,
                "normalization": trained.normalization.to_dict(),
                "mode": self.engine.mode,
                "active": self.engine.active,
                "waiting": self.engine.waiting,
                "peak_active": self.engine.stats.peak_active,
            },
        }


def serve_model(name: str, trained: TrainedModel, config: ServeConfig) -> ServedModel:
    """Wrap a loaded model in its generation loop (the step path built now, not on a request)."""
    from .batching import Engine
    from .generate import Generator

    engine = Engine(Generator(trained, backend=config.backend), config.max_concurrent, config.max_queue,
                    config.flush_interval, name=name)
    engine.warm_up()
    return ServedModel(name, trained, engine)


class ServerState:
    """What the app serves: the models (once loaded) and the limits."""

    def __init__(self, config: ServeConfig, models: dict[str, TrainedModel] | None = None,
                 loader: Callable[[], dict[str, TrainedModel]] | None = None) -> None:
        if (models is None) == (loader is None):
            raise ValueError("give either models or a loader")
        self.config = config
        self.models: dict[str, ServedModel] = {}
        self.loader = loader
        self.error: str | None = None
        self.ready = threading.Event()
        self.score_limiter = None
        if models is not None:
            self._install(models)

    def _install(self, models: dict[str, TrainedModel]) -> None:
        self.models = {name: serve_model(name, trained, self.config) for name, trained in models.items()}
        self.ready.set()

    def load(self) -> None:
        """Run the loader (on a worker thread); a failure is kept as one line."""
        try:
            self._install(self.loader())
        except CharLSTMError as err:
            self.error = str(err)

    def close(self) -> None:
        for served in self.models.values():
            served.engine.request_close()
        for served in self.models.values():
            served.engine.close()

    def counts(self) -> tuple[int, int]:
        engines = [m.engine for m in self.models.values()]
        return sum(e.active for e in engines), sum(e.waiting for e in engines)


# ----------------------------------------------------------------------------- errors and bodies


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def response(self) -> Response:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return json_response(body, self.status, self.headers)


def json_bytes(obj: Any) -> bytes:
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate somewhere: escape everything instead
        return json.dumps(obj, ensure_ascii=True, allow_nan=False).encode("ascii")


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json_bytes(obj), status, headers, media_type="application/json")


async def read_json_object(request: Request, limit: int, timeout: float) -> dict:
    """The request body as a JSON object: at most ``limit`` bytes within ``timeout`` seconds,
    UTF-8, well-formed."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise _too_large(limit)
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise _too_large(limit)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s (--request-timeout)",
                       code="request_timeout") from None
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {err.start})") from None
    try:
        data = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, and integers of more than 4300 digits
        raise ApiError(400, f"the request body is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body is larger than the server's limit of {limit} bytes (--max-body)",
                    kind="invalid_request_error", code="request_too_large")


# ----------------------------------------------------------------------------- field checks


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(body: dict, name: str, default: int | None, low: int, high: int, limit: str = "") -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not _is_int(value):
        raise ApiError(400, f"{name} must be an integer, not {_shown(value)}", name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low} and {high}{limit}, not {value}", name)
    return value


def _number_field(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ApiError(400, f"{name} must be a number, not {_shown(value)}", name)
    if not low <= value <= high:
        raise ApiError(400, f"{name} must be between {low:g} and {high:g}, not {value:g}", name)
    return float(value)


def _bool_field(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"{name} must be true or false, not {_shown(value)}", name)
    return value


def _shown(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, (dict, list)) else type(value).__name__
    kind = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", float: "a number",
            int: "a number", type(None): "null"}.get(type(value), type(value).__name__)
    return kind if isinstance(value, (dict, list)) else f"{kind} {text[:40]}"


def _unknown_fields(body: dict, allowed: set[str]) -> None:
    extra = sorted(k for k in body if k not in allowed)
    if extra:
        raise ApiError(400, f"unrecognized request argument: {extra[0][:60]}", extra[0][:60])


def _prime_unknown(body: dict) -> str:
    value = body.get("prime_unknown", "error")
    if value not in ("error", "skip"):
        raise ApiError(400, f"prime_unknown must be \"error\" or \"skip\", not {_shown(value)}", "prime_unknown")
    return value


@dataclass
class CompletionRequest:
    model: ServedModel
    prompts: list[list[int]]
    max_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    n: int
    seed: int
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool


def pick_model(state: ServerState, body: dict) -> ServedModel:
    name = body.get("model")
    if name is None:
        if len(state.models) == 1:
            return next(iter(state.models.values()))
        raise ApiError(400, f"model is required: one of {', '.join(sorted(state.models))}", "model")
    if not isinstance(name, str):
        raise ApiError(400, f"model must be a string, not {_shown(name)}", "model")
    served = state.models.get(name)
    if served is None:
        raise ApiError(404, f"the model {name[:100]!r} does not exist; this server has: "
                       f"{', '.join(sorted(state.models))[:500]}", "model", "not_found_error", "model_not_found")
    return served


def parse_completion(state: ServerState, body: dict) -> CompletionRequest:
    """Check every field of a completions request against the server's limits."""
    cfg = state.config
    _unknown_fields(body, COMPLETION_FIELDS)
    served = pick_model(state, body)
    _unsupported(body)
    prompts = _prompt_texts(body.get("prompt"), cfg)
    unknown = _prime_unknown(body)
    encoded = [_encode_prompt(served, text, unknown, i if len(prompts) > 1 else None) for i, text in enumerate(prompts)]
    n = _int_field(body, "n", 1, 1, cfg.max_choices, " (the server's --max-choices)")
    if n * len(prompts) > cfg.max_choices:
        raise ApiError(400, f"n x prompts = {n * len(prompts)} choices; the server allows at most "
                       f"{cfg.max_choices} per request (--max-choices)", "n")
    temperature = _number_field(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE)
    if 0 < temperature < MIN_TEMPERATURE:
        raise ApiError(400, f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}, not {temperature:g}",
                       "temperature")
    top_p = _number_field(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be above 0 (1 keeps every character)", "top_p")
    top_k = _int_field(body, "top_k", 0, -1, MAX_TOP_K)
    stream = _bool_field(body, "stream", False)
    return CompletionRequest(
        model=served, prompts=encoded,
        max_tokens=_int_field(body, "max_tokens", cfg.max_length, 0, cfg.max_length,
                              " characters (the server's --max-length)"),
        sampling=SamplingConfig(temperature, max(top_k, 0), top_p),
        stop=_stops(body.get("stop"), cfg), n=n,
        seed=_int_field(body, "seed", None, -MAX_SEED + 1, MAX_SEED - 1) if body.get("seed") is not None
        else random.SystemRandom().randrange(2 ** 63),
        stream=stream, include_usage=_include_usage(body, stream),
        logprobs=_int_field(body, "logprobs", None, 0, cfg.max_logprobs, " (the server's --max-logprobs)"),
        echo=_bool_field(body, "echo", False),
    )


def _unsupported(body: dict) -> None:
    """OpenAI fields a character model does not implement: refused unless left at their no-op."""
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0) or isinstance(body.get(name), bool):
            raise ApiError(400, f"{name} is not supported by charlstm (leave it out or 0)", name)
    if body.get("logit_bias") not in (None, {}):
        raise ApiError(400, "logit_bias is not supported by charlstm", "logit_bias")
    if body.get("suffix") not in (None, ""):
        raise ApiError(400, "suffix (insertion) is not supported by charlstm", "suffix")
    best_of = body.get("best_of")
    if best_of is not None and best_of != body.get("n", 1):
        raise ApiError(400, "best_of is not supported by charlstm (leave it out or equal to n)", "best_of")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(400, f"user must be a string, not {_shown(user)}", "user")


def _prompt_texts(prompt: Any, cfg: ServeConfig) -> list[str]:
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif prompt is None:
        raise ApiError(400, "prompt is required", "prompt")
    elif isinstance(prompt, list) and prompt and all(_is_int(p) or isinstance(p, list) for p in prompt):
        raise ApiError(400, "prompt must be text: charlstm does not take token ids", "prompt")
    else:
        raise ApiError(400, f"prompt must be a string or a non-empty array of strings, not {_shown(prompt)}",
                       "prompt")
    if len(prompts) > cfg.max_choices:
        raise ApiError(400, f"at most {cfg.max_choices} prompts per request (--max-choices), not {len(prompts)}",
                       "prompt")
    for text in prompts:
        if len(text) > cfg.max_prompt:
            raise ApiError(400, f"a prompt may hold at most {cfg.max_prompt} characters (the server's "
                           f"--max-prompt), not {len(text)}", "prompt")
    return prompts


def _encode_prompt(served: ServedModel, text: str, unknown: str, index: int | None) -> list[int]:
    where = "prompt" if index is None else f"prompt[{index}]"
    if not text:
        raise ApiError(400, f"{where} is empty: a character model needs at least one character to start from",
                       "prompt")
    try:
        return served.engine.generator.prepare_prime(text, unknown)
    except CharLSTMError as err:
        hint = " (or send \"prime_unknown\": \"skip\" to drop them)" if unknown == "error" else ""
        raise ApiError(400, f"{where}: {err}{hint}", "prompt", code="unknown_characters") from None


def _stops(stop: Any, cfg: ServeConfig) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"stop must be a string or an array of strings, not {_shown(stop)}", "stop")
    if len(stops) > cfg.max_stop:
        raise ApiError(400, f"at most {cfg.max_stop} stop strings (the server's --max-stop), not {len(stops)}",
                       "stop")
    for s in stops:
        if not s:
            raise ApiError(400, "a stop string must not be empty", "stop")
        if len(s) > cfg.max_stop_length:
            raise ApiError(400, f"a stop string may hold at most {cfg.max_stop_length} characters, not {len(s)}",
                           "stop")
    return tuple(stops)


def _include_usage(body: dict, stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "stream_options must be an object with at most include_usage", "stream_options")
    return _bool_field(options, "include_usage", False)


# ----------------------------------------------------------------------------- completions


class _Job:
    """One request's streams; the engine thread hands their pieces to the event loop."""

    def __init__(self, request: CompletionRequest, timeout: float) -> None:
        from .batching import Stream, StreamSpec

        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        deadline = time.monotonic() + timeout
        self.streams = []
        for p, ids in enumerate(request.prompts):
            for j in range(request.n):
                index = p * request.n + j
                spec = StreamSpec(tuple(ids), request.max_tokens, request.sampling, request.seed + index,
                                  request.stop, request.logprobs, request.echo, deadline)
                self.streams.append(Stream(spec, index, self.sink))

    def sink(self, pieces: list) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, pieces)
        except RuntimeError:
            pass  # the event loop is gone: nobody is listening

    def cancel(self) -> None:
        for s in self.streams:
            s.cancel()

    async def pieces(self) -> AsyncIterator[list]:
        """Groups of pieces until every stream has finished."""
        open_streams = len(self.streams)
        while open_streams:
            group = await self.queue.get()
            open_streams -= sum(1 for p in group if p.finish_reason is not None)
            yield group


class _Choices:
    """Builds choices (text, OpenAI logprobs, finish reason) from pieces."""

    def __init__(self, count: int, logprobs: bool) -> None:
        self.texts = [[] for _ in range(count)]
        self.offsets = [0] * count
        self.logprobs = [_empty_logprobs() if logprobs else None for _ in range(count)]
        self.finish = [None] * count
        self.generated = 0

    def add(self, piece) -> dict:
        """Take a piece; return its streaming choice (logprobs of this piece only)."""
        i = piece.index
        self.texts[i].append(piece.text)
        self.finish[i] = piece.finish_reason
        if piece.finish_reason is not None:
            self.generated += piece.generated
        part = None
        if self.logprobs[i] is not None:
            part = _logprobs_part(piece.logprobs, self.offsets[i])
            for key, values in part.items():
                self.logprobs[i][key].extend(values)
        self.offsets[i] += len(piece.text)
        return {"text": piece.text, "index": i, "logprobs": part, "finish_reason": piece.finish_reason}

    def final(self) -> list[dict]:
        return [{"text": "".join(t), "index": i, "logprobs": lp, "finish_reason": f}
                for i, (t, lp, f) in enumerate(zip(self.texts, self.logprobs, self.finish))]


def _empty_logprobs() -> dict:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def _logprobs_part(entries: list, offset: int) -> dict:
    part = _empty_logprobs()
    for k, (char, lp, top) in enumerate(entries):
        part["tokens"].append(char)
        part["token_logprobs"].append(_finite(lp))
        part["top_logprobs"].append(None if top is None else {c: _finite(v) for c, v in top.items()})
        part["text_offset"].append(offset + k)
    return part


def _usage(request: CompletionRequest, generated: int) -> dict:
    prompt = sum(len(ids) for ids in request.prompts)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def _submit(request: CompletionRequest, job: _Job) -> None:
    from .batching import QueueFull, ShuttingDown

    try:
        request.model.engine.submit(job.streams)
    except ShuttingDown as err:
        raise ApiError(503, str(err), kind="server_error", code="shutting_down") from None
    except QueueFull as err:
        raise ApiError(429, f"{err}; retry shortly", kind="rate_limit_error", code="queue_full",
                       headers={"Retry-After": "1"}) from None


async def _until_disconnect(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _Completion:
    """A non-streamed completion: waits for every stream, or cancels them when the client leaves."""

    def __init__(self, request: CompletionRequest, job: _Job, head: dict, time_limit: float) -> None:
        self.request, self.job, self.head, self.time_limit = request, job, head, time_limit

    async def __call__(self, scope, receive, send) -> None:
        choices = _Choices(len(self.job.streams), self.request.logprobs is not None)
        finished = False
        try:
            with anyio.move_on_after(self.time_limit):
                await self._wait(choices, receive)
                finished = all(f is not None for f in choices.finish)
        finally:
            if not finished:
                self.job.cancel()
        if finished:
            body = dict(self.head, choices=choices.final(), usage=_usage(self.request, choices.generated))
            await json_response(body)(scope, receive, send)

    async def _wait(self, choices: "_Choices", receive) -> None:
        async with anyio.create_task_group() as group:
            async def collect() -> None:
                async for pieces in self.job.pieces():
                    for piece in pieces:
                        choices.add(piece)
                group.cancel_scope.cancel()

            group.start_soon(collect)
            await _until_disconnect(receive)
            group.cancel_scope.cancel()


class _EventStream:
    """A streamed completion: Server-Sent Events in OpenAI's chunk shape, then [DONE].
    A client that disconnects cancels its streams at once (their rows leave the batch); one
    that stops reading is cut off at the request's time limit."""

    def __init__(self, request: CompletionRequest, job: _Job, head: dict, time_limit: float) -> None:
        self.request, self.job, self.head, self.time_limit = request, job, head, time_limit

    async def __call__(self, scope, receive, send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8")] + [
            (k.lower().encode(), v.encode()) for k, v in SSE_HEADERS.items()]
        try:
            with anyio.move_on_after(self.time_limit):
                await self._send_all(send, receive, headers)
        finally:
            self.job.cancel()   # no-op for streams that finished

    async def _send_all(self, send, receive, headers) -> None:
        async with anyio.create_task_group() as group:
            async def body() -> None:
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                async for chunk in self._events():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                group.cancel_scope.cancel()

            group.start_soon(body)
            await _until_disconnect(receive)
            group.cancel_scope.cancel()

    async def _events(self) -> AsyncIterator[bytes]:
        choices = _Choices(len(self.job.streams), self.request.logprobs is not None)
        # the head is the same in every chunk: encoded once, the choice spliced in
        lead = b"data: " + json_bytes(dict(self.head, choices=[0]))[:-len(b"0]}")]
        async for pieces in self.job.pieces():
            yield b"".join(lead + json_bytes(choices.add(p)) + b"]}\n\n" for p in pieces)
        if self.request.include_usage:
            yield _event(dict(self.head, choices=[], usage=_usage(self.request, choices.generated)))
        yield b"data: [DONE]\n\n"


def _event(obj: dict) -> bytes:
    return b"data: " + json_bytes(obj) + b"\n\n"


# ----------------------------------------------------------------------------- the app


def create_app(config: ServeConfig, models: dict[str, TrainedModel] | None = None,
               loader: Callable[[], dict[str, TrainedModel]] | None = None,
               on_loaded: Callable[[ServerState], None] | None = None) -> "Starlette":
    """The ASGI app. ``models``: serve these at once; ``loader``: load them on a worker
    thread at start-up, answering 503 until done (``on_loaded`` is called after)."""
    if Starlette is None:
        raise CharLSTMError("charlstm serve needs its optional packages: pip install 'charlstm[serve]'")
    config.validate()
    state = ServerState(config, models, loader)

    @asynccontextmanager
    async def lifespan(app):
        state.score_limiter = anyio.CapacityLimiter(1)
        if not state.ready.is_set():
            async def load() -> None:
                await anyio.to_thread.run_sync(state.load)
                if on_loaded is not None:
                    on_loaded(state)

            asyncio.get_running_loop().create_task(load())
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(state.close)

    def guarded(handler):
        """API routes: the key (when set), loaded models, errors in OpenAI's shape."""
        async def route(request: Request) -> Response:
            try:
                _authorize(request, config.api_key)
                if not state.ready.is_set():
                    raise ApiError(503, state.error or "the models are still loading; retry shortly",
                                   kind="server_error", code="loading", headers={"Retry-After": "1"})
                return await handler(request, state)
            except ApiError as err:
                return err.response()
        return route

    async def health(request: Request) -> Response:
        return await _health(request, state)

    routes = [
        Route("/", _page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/openapi.json", _openapi, methods=["GET"]),
        Route("/v1/models", guarded(_models), methods=["GET"]),
        Route("/v1/models/{name:path}", guarded(_model), methods=["GET"]),
        Route("/v1/completions", guarded(_completions), methods=["POST"]),
        Route("/v1/score", guarded(_score), methods=["POST"]),
        Mount("/static", StaticFiles(packages=[("charlstm", "static")]), name="static"),
    ]
    middleware = []
    if config.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(config.cors_origins),
                                     allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"]))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error, Exception: _server_error})
    app.state.charlstm = state
    return app


def _authorize(request: Request, key: str | None) -> None:
    if key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", kind="authentication_error",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def _http_error(request: Request, exc: HTTPException) -> Response:
    kinds = {404: "not_found_error", 405: "invalid_request_error"}
    message = {404: f"no such route: {request.url.path[:200]}",
               405: f"{request.method} is not allowed on {request.url.path[:200]}"}.get(exc.status_code, exc.detail)
    return ApiError(exc.status_code, message, kind=kinds.get(exc.status_code, "invalid_request_error"),
                    headers=dict(exc.headers or {})).response()


async def _server_error(request: Request, exc: Exception) -> Response:
    return ApiError(500, "internal server error", kind="server_error").response()


async def _page(request: Request) -> Response:
    return FileResponse(str(resources.files("charlstm").joinpath("static", "index.html")),
                        headers={"Cache-Control": "no-cache"})


async def _health(request: Request, state: ServerState) -> Response:
    active, waiting = state.counts()
    status = "ok" if state.ready.is_set() else "error" if state.error else "loading"
    body = {"status": status, "models": sorted(state.models), "active": active, "waiting": waiting,
            "max_concurrent": state.config.max_concurrent, "max_queue": state.config.max_queue,
            "limits": {name: getattr(state.config, name) for name in PAGE_LIMITS}}
    if state.error:
        body["error"] = state.error
    return json_response(body, 200 if status == "ok" else 503)


async def _models(request: Request, state: ServerState) -> Response:
    return json_response({"object": "list", "data": [m.describe() for m in state.models.values()]})


async def _model(request: Request, state: ServerState) -> Response:
    return json_response(pick_model(state, {"model": request.path_params["name"]}).describe())


async def _completions(request: Request, state: ServerState):
    body = await read_json_object(request, state.config.max_body, state.config.request_timeout)
    parsed = parse_completion(state, body)
    job = _Job(parsed, state.config.request_timeout)
    _submit(parsed, job)
    head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
            "model": parsed.model.name, "seed": parsed.seed}
    # the engine ends streams at the time limit; this cuts off clients that stop reading
    return (_EventStream if parsed.stream else _Completion)(parsed, job, head, state.config.request_timeout + 5)


async def _score(request: Request, state: ServerState) -> Response:
    from .scoring import surprise_per_character

    body = await read_json_object(request, state.config.max_body, state.config.request_timeout)
    _unknown_fields(body, SCORE_FIELDS)
    served = pick_model(state, body)
    text = body.get("text")
    if not isinstance(text, str):
        raise ApiError(400, f"text must be a string, not {_shown(text)}", "text")
    if len(text) > state.config.max_score_chars:
        raise ApiError(400, f"text may hold at most {state.config.max_score_chars} characters (the server's "
                       f"--max-score-chars), not {len(text)}", "text")
    unknown = _prime_unknown(body)
    top = _int_field(body, "top", 5, 0, state.config.max_logprobs, " (the server's --max-logprobs)")
    try:
        score = await anyio.to_thread.run_sync(
            lambda: surprise_per_character(served.trained, text, unknown, top), limiter=state.score_limiter)
    except CharLSTMError as err:
        raise ApiError(400, str(err), "text") from None
    return json_response(dict(score.to_dict(), object="text_score", model=served.name))


async def _openapi(request: Request) -> Response:
    from .serve_openapi import OPENAPI

    return json_response(OPENAPI)


# ----------------------------------------------------------------------------- running it


def bind_socket(host: str, port: int) -> socket.socket:
    """Listen on host:port now, so that a taken port is a one-line error before any loading."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except (OSError, UnicodeError) as err:
        raise CharLSTMError(f"cannot listen on {host}:{port}: {getattr(err, 'strerror', None) or err}") from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run_server(files: dict[str, Path], config: ServeConfig, out=sys.stdout) -> int:
    """Serve ``files`` until Ctrl-C (or SIGTERM): open streams end with a final event."""
    import uvicorn

    from . import checkpoint

    config.validate()
    sock = bind_socket(config.host, config.port)

    def load() -> dict[str, TrainedModel]:
        return {name: checkpoint.load(path) for name, path in files.items()}

    def loaded(state: ServerState) -> None:
        if state.error:
            print(f"charlstm: error: {state.error}", file=sys.stderr, flush=True)
            server.should_exit = True
            return
        for name, served in state.models.items():
            cfg = served.trained.config
            print(f"model {name}: {cfg.layers}x{cfg.units}, {len(served.trained.vocab)} characters, "
                  f"{served.engine.mode} generation", file=out, flush=True)
        print("ready", file=out, flush=True)

    app = create_app(config, loader=load, on_loaded=loaded)
    state: ServerState = app.state.charlstm
    server = _stopping_streams_first(uvicorn.Server)(
        uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5, lifespan="on"), state)
    print(f"charlstm serve: {url_of(sock)} (loading {len(files)} model{'s' if len(files) != 1 else ''}; "
          "Ctrl-C stops)", file=out, flush=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled; the streams have ended
        pass
    print("stopped", file=out, flush=True)
    return 2 if state.error else 0


def _stopping_streams_first(base: type) -> type:
    """uvicorn's server, but a stop signal first ends the open streams (each gets its final
    event and [DONE]) so that the graceful shutdown does not wait on them."""

    class Server(base):
        def __init__(self, config, state: ServerState) -> None:
            super().__init__(config)
            self.charlstm_state = state

        def handle_exit(self, sig, frame) -> None:
            for served in self.charlstm_state.models.values():
                served.engine.request_close()
            super().handle_exit(sig, frame)

    return Server
