"""Continuous batching: one generation loop per model steps every active stream together.

A server gets requests at random moments, each wanting its own prompt, settings and length.
The ``Engine`` keeps a batch of rows, one per active stream, and a worker thread that steps
all rows at once with the batched step (the native kernel where it loads). A new stream
takes a free row between two steps; a finished or cancelled one gives its row back (the
last row moves into the hole, so the active rows stay ``0..n-1``). For an LSTM a stream's
whole state is (h, c) per layer, so a row is cheap to clear or move.

The prompt is fed through the same batched step (teacher forcing, one character per step),
so a joining stream never stalls the others, and the echo's log-probabilities come free.
Each stream draws random number ``t`` of its own seed at its own sampled step ``t``
(``stream_uniforms``), and every row of the kernel is computed on its own, so a seeded
stream gives the same text alone, in any batch, and as ``Generator`` gives it.

Output goes back in groups: the loop collects each stream's new text and hands it to the
stream's ``sink`` every ``flush_interval`` seconds (at once for a first character or an
end), never one hand-over per character.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .errors import CharLSTMError
from .evaluate import one_cpu_thread
from .generate import UNIFORM_BLOCK, BatchSampler, Generator, SamplingConfig, StopMatcher, stream_uniforms

log = logging.getLogger("charlstm.serve")

FLUSH_ROWS = 16             # streams per flush interval: bigger batches hand over less often
PRIME_BUDGET = 512          # prompt characters read per loop iteration on a one-stream stepper
FINISH_STOP = "stop"        # a stop string ended it
FINISH_LENGTH = "length"    # max_tokens ended it
FINISH_ABORT = "abort"      # the server ended it: its time limit, or shutting down
FINISH_ERROR = "error"      # the generation loop failed (a bug): the stream ends, others go on

# one character's log-probabilities: (char, log p(char) or None, {alternative: log p} or None)
CharLogprob = tuple[str, float | None, dict[str, float] | None]


class QueueFull(CharLSTMError):
    """More streams than the batch and the waiting room hold."""


class ShuttingDown(CharLSTMError):
    """The engine is closing and takes no new streams."""


@dataclass(frozen=True)
class StreamSpec:
    """What one stream (one choice of one prompt) asks for."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    sampling: SamplingConfig = SamplingConfig(temperature=1.0)
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None      # top-N alternatives per character; None: no log-probabilities
    echo: bool = False               # output the prompt (as the model read it) first
    deadline: float = math.inf       # time.monotonic() after which the server ends the stream


@dataclass
class Piece:
    """New output of one stream since the last hand-over."""

    index: int
    text: str
    logprobs: list[CharLogprob]
    finish_reason: str | None = None
    generated: int = 0               # characters sampled in all (on the final piece)


Sink = Callable[[list[Piece]], None]   # called on the engine thread; must not block


class Stream:
    """One stream's progress, owned by the engine thread (``cancel`` may come from anywhere)."""

    def __init__(self, spec: StreamSpec, index: int, sink: Sink) -> None:
        if not spec.prompt_ids:
            raise CharLSTMError("the prompt is empty")
        self.spec, self.index, self.sink = spec, index, sink
        self.cancelled = False
        self.pos = 0                  # prompt characters fed so far
        self.sampled = 0              # characters generated so far (the random-number counter)
        self.next_id = -1
        self.matcher = StopMatcher(spec.stop)
        self.held: deque[CharLogprob] = deque()   # log-probabilities of text the matcher holds back
        self.out_text: list[str] = []
        self.out_logprobs: list[CharLogprob] = []
        self.echo_logprobs: list[CharLogprob] = []
        self.finish_reason: str | None = None
        self.started_output = False
        self._block_start, self._block = -UNIFORM_BLOCK, np.empty(0)

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def priming(self) -> bool:
        return self.pos < len(self.spec.prompt_ids)

    def feed_id(self) -> int:
        return self.spec.prompt_ids[self.pos] if self.priming else self.next_id

    def uniform(self) -> float:
        """This stream's random number for its current step, as ``BatchSampler`` draws it."""
        t = self.sampled
        if not self._block_start <= t < self._block_start + UNIFORM_BLOCK:
            self._block_start = t - t % UNIFORM_BLOCK
            self._block = stream_uniforms([self.spec.seed], self._block_start, UNIFORM_BLOCK)[:, 0]
        return self._block[t - self._block_start]

    def emit(self, text: str) -> None:
        """Output ``text`` (a prefix of what the matcher held plus the new character)."""
        if text:
            self.out_text.append(text)
        if self.spec.logprobs is not None:
            for _ in range(len(text)):
                self.out_logprobs.append(self.held.popleft())

    def take_piece(self) -> Piece | None:
        if not self.out_text and self.finish_reason is None:
            return None
        piece = Piece(self.index, "".join(self.out_text), self.out_logprobs, self.finish_reason, self.sampled)
        self.out_text, self.out_logprobs = [], []
        return piece


def _bucket(rows: int) -> int:
    return 1 << max(0, rows - 1).bit_length()


class _StatefulRows:
    """Rows of (h, c) stepped by the generator's stepper; the stepper's batch is the smallest
    power of two that holds the active rows (grown at once, shrunk below a quarter)."""

    def __init__(self, generator: Generator) -> None:
        self._generator = generator
        self._steppers: dict = {}
        self.stepper = None
        self.capacity = 0
        self._feed = np.zeros(0, dtype=np.int64)

    def prepare(self, max_rows: int) -> None:
        """Build the stepper of every batch size now (the first build of a size may time the
        ways to share a step across threads), so that no request waits for it."""
        self._steppers.setdefault("primer", self._generator.stepper(1))
        size = 1
        while size <= _bucket(max_rows):
            if size not in self._steppers:
                self._steppers[size] = self._generator.stepper(size)
            size *= 2

    def fit(self, keep: int, rows: int) -> None:
        """Make room for ``rows`` rows, keeping the state of rows ``0..keep-1``."""
        want = _bucket(rows)
        if self.stepper is not None and self.capacity >= want and want * 4 > self.capacity:
            return
        new = self._steppers.get(want)
        if new is None:
            new = self._steppers[want] = self._generator.stepper(want)
        if self.stepper is not None and keep:
            old_state, new_state = self.stepper.state(), new.state()
            for (h_old, c_old), (h_new, c_new) in zip(old_state, new_state):
                h_new[:, :keep], c_new[:, :keep] = h_old[:, :keep], c_old[:, :keep]
            new.load_state(new_state)
        self.stepper, self.capacity = new, want
        self._feed = np.zeros(want, dtype=np.int64)

    def edit(self, resets: Sequence[int], moves: Sequence[tuple[int, int]]) -> None:
        """Move rows (src -> dst, in order), then clear rows to the zero state."""
        if not resets and not moves:
            return
        if hasattr(self.stepper, "h"):   # the lean steppers: state in place, (layers, B, H)
            tensors = [self.stepper.h, self.stepper.c]
            for src, dst in moves:
                for t in tensors:
                    t[:, dst] = t[:, src]
            for row in resets:
                for t in tensors:
                    t[:, row] = 0.0
            return
        state = self.stepper.state()
        for h, c in state:
            for src, dst in moves:
                h[:, dst], c[:, dst] = h[:, src], c[:, src]
            for row in resets:
                h[:, row], c[:, row] = 0.0, 0.0
        self.stepper.load_state(state)

    def step(self, ids: np.ndarray) -> np.ndarray:
        self._feed[:len(ids)] = ids
        return self.stepper.step(self._feed)[:len(ids)]

    def prime(self, row: int, ids: Sequence[int], each: Callable[[np.ndarray, int], None] | None = None) -> None:
        """Read ``ids`` into ``row`` from the zero state on a one-stream stepper (a joining
        stream's prompt, without a batch step per character); ``each(logits, j)`` sees the
        logits after ``ids[j]``. Rows are computed on their own, so this is the batch's arithmetic."""
        primer = self._steppers.get("primer") or self._steppers.setdefault("primer", self._generator.stepper(1))
        feed = np.zeros(1, dtype=np.int64)
        zero = [(torch.zeros_like(h), torch.zeros_like(c)) for h, c in primer.state()]
        primer.load_state(zero)
        for j, i in enumerate(ids):
            feed[0] = i
            logits = primer.step(feed)
            if each is not None:
                each(logits, j)
        state, primed = self.stepper.state(), primer.state()
        for (h, c), (ph, pc) in zip(state, primed):
            h[:, row], c[:, row] = ph[:, 0], pc[:, 0]
        self.stepper.load_state(state)


class _WindowRows:
    """Rows for models trained on windows (the tutorial's): each row keeps its last ``window``
    ids and every step re-reads them; rows whose windows are equally long go together."""

    def __init__(self, generator: Generator) -> None:
        self.model = generator.model
        self.device = generator.device
        self.window = self.model.config.window
        self.rows: list[list[int]] = []

    def fit(self, keep: int, rows: int) -> None:
        del self.rows[keep:]
        self.rows.extend([] for _ in range(rows - keep))

    def edit(self, resets: Sequence[int], moves: Sequence[tuple[int, int]]) -> None:
        for src, dst in moves:
            self.rows[dst] = self.rows[src]
        for row in resets:
            self.rows[row] = []

    @torch.inference_mode()
    def step(self, ids: np.ndarray) -> np.ndarray:
        by_length: dict[int, list[int]] = {}
        for row, i in enumerate(ids.tolist()):
            window = self.rows[row]
            window.append(i)
            del window[:-self.window]
            by_length.setdefault(len(window), []).append(row)
        logits = np.empty((len(ids), self.model.config.vocab_size), dtype=np.float32)
        with one_cpu_thread(self.device):   # short sequences: a second thread only waits
            for rows in by_length.values():
                batch = torch.tensor([self.rows[r] for r in rows], device=self.device)
                out, _ = self.model(batch, last_only=True)
                logits[rows] = out.float().cpu().numpy()
        return logits


@dataclass
class EngineStats:
    requests: int = 0
    streams: int = 0
    characters: int = 0
    steps: int = 0
    rejected: int = 0
    peak_active: int = 0     # the most streams stepped together


class Engine:
    """The generation loop of one model (a worker thread), fed by ``submit``."""

    def __init__(self, generator: Generator, max_concurrent: int = 64, max_queue: int = 256,
                 flush_interval: float = 0.02, name: str = "model") -> None:
        if max_concurrent < 1 or max_queue < 0:
            raise CharLSTMError("--max-concurrent must be at least 1 and --max-queue at least 0")
        self.generator = generator
        self.name = name
        self.max_concurrent, self.max_queue = max_concurrent, max_queue
        self.flush_interval = flush_interval
        self.mode = generator.resolve_mode("auto")
        self.chars = generator.vocab.chars
        self.stats = EngineStats()
        self._rows_state = _WindowRows(generator) if self.mode == "window" else _StatefulRows(generator)
        self._rows: list[Stream] = []
        self._waiting: deque[Stream] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._sampler: BatchSampler | None = None
        self._last_flush = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=f"charlstm-engine-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the caller's side

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, streams: Sequence[Stream]) -> None:
        """Queue streams to join the batch; ``QueueFull`` when they would not all fit."""
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._rows) + len(self._waiting) + len(streams) > self.max_concurrent + self.max_queue:
                self.stats.rejected += 1
                raise QueueFull(f"the queue is full ({self.max_concurrent} streams generating, "
                                f"{len(self._waiting)} waiting, --max-queue {self.max_queue})")
            self._waiting.extend(streams)
            self.stats.requests += 1
            self.stats.streams += len(streams)
            self._cond.notify()

    def request_close(self) -> None:
        """End every stream (finish reason ``abort``) and stop the loop, without waiting."""
        with self._cond:
            self._closing = True
            self._cond.notify()

    def close(self, timeout: float = 5.0) -> None:
        self.request_close()
        self._thread.join(timeout)

    def warm_up(self) -> None:
        """Build the step path now (the native kernel compiles on first use), not on a request."""
        if self.mode == "stateful":
            self._rows_state.prepare(self.max_concurrent)
        self.generator.sampler([SamplingConfig(1.0)], [0])

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._rows and not self._waiting and not self._closing:
                    self._cond.wait()
                if self._closing:
                    break
                if self._waiting and any(s.cancelled for s in self._waiting):
                    self._waiting = deque(s for s in self._waiting if not s.cancelled)
                room = self.max_concurrent - len(self._rows)
                joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            try:
                self._iterate(joining)
            except Exception:  # a bug: end the streams it touched rather than hang their clients
                log.exception("generation loop of %s failed", self.name)
                self._end_all(FINISH_ERROR)
        self._end_all(FINISH_ABORT)

    def _end_all(self, reason: str) -> None:
        with self._cond:
            everyone = self._rows + list(self._waiting)
            self._rows, self._waiting = [], deque()
        for stream in everyone:
            if stream.finish_reason is None:
                stream.finish_reason = reason
        self._sampler = None
        self._flush(everyone)

    def _iterate(self, joining: list[Stream]) -> None:
        now = time.monotonic()
        self._drop_finished(now)
        self._admit(joining, now)
        rows = self._rows
        if not rows:
            self._flush_due(rows, force=True)
            return
        logits = self._rows_state.step(np.fromiter((s.feed_id() for s in rows), dtype=np.int64, count=len(rows)))
        self.stats.steps += 1
        sampling = [r for r, s in enumerate(rows) if s.pos + 1 >= len(s.spec.prompt_ids)]
        chosen = self._pick(logits, rows) if sampling else None
        self._record(logits, rows, chosen)
        self._flush_due(rows)
        self._drop_finished(now)

    def _drop_finished(self, now: float) -> None:
        """Rows of finished, cancelled or expired streams leave; the last rows fill the holes."""
        rows = self._rows
        leaving = []
        for r, s in enumerate(rows):
            if s.finish_reason is None and (s.cancelled or now > s.spec.deadline):
                s.finish_reason = FINISH_ABORT
                self._flush([s])
            if s.finish_reason is not None:
                leaving.append(r)
        if not leaving:
            return
        moves = []
        with self._cond:
            for r in reversed(leaving):
                last = len(rows) - 1
                if r != last:
                    moves.append((last, r))
                    rows[r] = rows[last]
                rows.pop()
        self._rows_state.edit([], moves)
        self._sampler = None

    def _admit(self, joining: list[Stream], now: float) -> None:
        keep = len(self._rows)
        fresh = []
        for s in joining:
            if s.cancelled or now > s.spec.deadline:
                s.finish_reason = FINISH_ABORT
                self._flush([s])
                continue
            if self.mode == "window" and not (s.spec.echo and s.spec.logprobs is not None):
                s.pos = max(0, len(s.spec.prompt_ids) - self._rows_state.window)  # older ids are never read
            fresh.append(s)
        if not fresh:
            return
        self._rows_state.fit(keep, keep + len(fresh))
        with self._cond:
            self._rows.extend(fresh)
        self._rows_state.edit(list(range(keep, keep + len(fresh))), [])
        if self.mode == "stateful":
            self._prime(fresh, keep)
        self._sampler = None
        self.stats.peak_active = max(self.stats.peak_active, len(self._rows))

    def _prime(self, fresh: list[Stream], first_row: int) -> None:
        """Read the joining streams' prompts (all but their last character, which the batch
        step reads) on the side, up to ``PRIME_BUDGET`` characters in all; the rest of a long
        prompt is read through the batch, a character per step, so others never stall long."""
        budget = PRIME_BUDGET
        for row, s in enumerate(fresh, start=first_row):
            n = min(len(s.spec.prompt_ids) - 1, budget)
            if n <= 0:
                continue
            each = None
            if s.spec.echo and s.spec.logprobs is not None:
                def each(logits: np.ndarray, j: int, s: Stream = s) -> None:
                    table = _log_probabilities(logits, [0], [s.spec.logprobs])[0]
                    s.echo_logprobs.append(table(s.spec.prompt_ids[j + 1], self.chars))
            self._rows_state.prime(row, s.spec.prompt_ids[:n], each)
            s.pos = n
            budget -= n

    def _pick(self, logits: np.ndarray, rows: list[Stream]) -> np.ndarray:
        if self._sampler is None:
            self._sampler = self.generator.sampler([s.spec.sampling for s in rows], [s.spec.seed for s in rows])
        uniforms = np.fromiter((s.uniform() for s in rows), dtype=np.float64, count=len(rows))
        return self._sampler.pick_with(logits, uniforms)

    def _record(self, logits: np.ndarray, rows: list[Stream], chosen: np.ndarray | None) -> None:
        """Advance every row by the step just taken: prompt rows read on, the others take
        their sampled character through the stop matcher."""
        chars = self.chars
        wants = [r for r, s in enumerate(rows) if s.spec.logprobs is not None
                 and (s.pos + 1 >= len(s.spec.prompt_ids) or s.spec.echo)]
        tables = _log_probabilities(logits, wants, [rows[r].spec.logprobs for r in wants]) if wants else {}
        picks = chosen.tolist() if chosen is not None else None
        for r, s in enumerate(rows):
            if s.finish_reason is not None:
                continue
            if s.priming:
                s.pos += 1
                if s.priming:
                    if r in tables:   # echo: the log-probability of the next prompt character
                        s.echo_logprobs.append(tables[r](s.spec.prompt_ids[s.pos], chars))
                    continue
                self._start_output(s)
                if s.spec.max_tokens == 0:
                    s.finish_reason = FINISH_LENGTH
                    continue
            c = picks[r]
            if s.spec.logprobs is not None:
                s.held.append(tables[r](c, chars))
            s.emit(s.matcher.feed(chars[c]))
            s.sampled += 1
            s.next_id = c
            self.stats.characters += 1
            if s.matcher.stopped:
                s.held.clear()
                s.finish_reason = FINISH_STOP
            elif s.sampled >= s.spec.max_tokens:
                s.emit(s.matcher.flush())
                s.finish_reason = FINISH_LENGTH

    def _start_output(self, s: Stream) -> None:
        """The prompt is read: output the echo, if asked for."""
        if not s.spec.echo:
            return
        s.out_text.append("".join(self.chars[i] for i in s.spec.prompt_ids))
        if s.spec.logprobs is not None:
            s.out_logprobs.extend([(self.chars[s.spec.prompt_ids[0]], None, None)] + s.echo_logprobs)
            s.echo_logprobs = []

    def _flush_due(self, rows: list[Stream], force: bool = False) -> None:
        """Hand over everyone's new text when the interval has passed (longer for bigger
        batches: fewer, larger pieces when there is more to send); a first character or an
        end goes at once, alone."""
        now = time.monotonic()
        if force or now - self._last_flush >= self.flush_interval * max(1.0, len(rows) / FLUSH_ROWS):
            self._flush(rows)
            self._last_flush = now
            return
        urgent = [s for s in rows if s.finish_reason is not None or (s.out_text and not s.started_output)]
        if urgent:
            self._flush(urgent)

    def _flush(self, streams: Sequence[Stream]) -> None:
        by_sink: dict[int, tuple[Sink, list[Piece]]] = {}
        for s in streams:
            piece = s.take_piece()
            if piece is None:
                continue
            s.started_output = True
            by_sink.setdefault(id(s.sink), (s.sink, []))[1].append(piece)
        for sink, pieces in by_sink.values():
            try:
                sink(pieces)
            except Exception:  # a sink whose client is gone must not stop the others
                log.debug("a stream's sink failed", exc_info=True)


def _log_probabilities(logits: np.ndarray, rows: list[int], tops: list[int]) -> dict[int, Callable]:
    """For each row, a function (char id, chars) -> CharLogprob under the model's own
    distribution (temperature 1, no top-k/top-p), with that row's likeliest alternatives."""
    z = logits[rows].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    best = np.argsort(-z, axis=1, kind="stable")[:, :max(tops)]
    return {r: _char_logprob(z[k], best[k, :top]) for k, (r, top) in enumerate(zip(rows, tops))}


def _char_logprob(lp: np.ndarray, best: np.ndarray) -> Callable:
    def entry(i: int, chars: Sequence[str]) -> CharLogprob:
        return chars[i], float(lp[i]), {chars[j]: float(lp[j]) for j in best.tolist()}
    return entry
