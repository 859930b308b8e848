"""Stage 5: the training loop. ``TrainConfig`` says how, ``Trainer`` does it.

Presets: ``tutorial-small`` and ``tutorial-large`` are the tutorial's two Keras networks and
recipes; ``default`` is charlstm's own, chosen by measurement (see the README's "Training
quality"): embedding input, every position a target, contiguous streams with the state carried
between batches (truncated BPTT) starting at a random offset each epoch, variational dropout
and weight drop, AdamW with warm-up and cosine decay planned to end on the time budget,
clipping, bf16 autocast where the hardware has it, validation-selected checkpoints.

Every epoch ends with an evaluation over the whole validation text (nats/char and bits/char,
beside the compressor baselines), a metrics row and, when it is the best so far, a checkpoint.
``last.safetensors`` always holds everything needed to resume exactly: weights, optimiser
moments, the schedule position, random-generator states and the data position (epoch, batch
and the carried recurrent state).
"""

from __future__ import annotations

import hashlib
import math
import signal
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import checkpoint
from .baselines import Baseline, format_baselines, versus_best
from .checkpoint import TrainedModel, seed_windows
from .corpus import Corpus
from .data import (IGNORE_INDEX, Batches, SentenceBatches, StatefulWindowBatches, StreamBatches, WindowBatches,
                   fixed_sample, split_train_val)
from .distributed import Distributed
from .checks import check_device, check_memory, check_output_dir, training_bytes
from .errors import CharLSTMError
from .evaluate import LN2, compressor_baselines_for, score_after
from .evaluate import evaluate_ids  # noqa: F401  (re-exported from its former home)
from .fileio import RunLock, remove_stale_temporaries
from .finetune import load_init
from .metrics import MetricsLog
from .prepare import PreparedData
from .model import REGULARISATION_FIELDS, CharLSTM, ModelConfig, State, detach_state
from .recipes import (FINE_TUNING, FINE_TUNING_MODEL, FINE_TUNING_PASSES, PRESETS, TrainConfig, _fine_tuning_preset,
                      _finish_train_config, preset_configs, split_overrides)
from .records import BestEpoch, DataRecord, EpochRecord, Position, ResumeRecord, TrainingRecord
from .train_state import pack_carry, pack_optimizer, pack_rng, restore_rng, unpack_carry, unpack_optimizer
from .vocab import Vocab

BEST_NAME = "best.safetensors"
RESUME_NAME = "last.safetensors"
PREPARED_VAL_CHARS = 2_000_000  # --data's default validation part: every epoch scores it, one stream
MAX_INDEXED_TEXT = 50_000_000  # windows and sentences index every example: 8 bytes each
RANK_PREFIX = "rank"          # last.safetensors: the other ranks' random-generator states


def _silent(message: str) -> None:
    """Ranks other than 0 print nothing."""


@dataclass
class TrainResult:
    trained: TrainedModel
    history: list[EpochRecord] = field(default_factory=list)
    best_path: Path | None = None
    interrupted: bool = False
    resume_path: Path | None = None
    baselines: list[Baseline] = field(default_factory=list)
    stop_signal: int | None = None   # the signal that stopped the run (SIGINT or SIGTERM), if one did


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return check_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware does it fast (CUDA, or a CPU with AVX-512-BF16/AMX), else fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return None


def ids_fingerprint(ids: np.ndarray, chunk: int = 1 << 24) -> str:
    """A short hash of the encoded text, read in pieces so a memory map is never copied whole."""
    digest = hashlib.sha256()
    for start in range(0, len(ids), chunk):
        digest.update(np.ascontiguousarray(ids[start:start + chunk]).tobytes())
    return digest.hexdigest()[:16]


class Trainer:
    """Trains ``model`` on encoded text as ``config`` says: ``fit()`` runs the whole run
    (epochs, evaluation, checkpoints, early stopping, time budget, Ctrl-C); ``restore()`` first
    continues a saved one. ``position`` says where the run stands, ``history`` how it went."""

    def __init__(
        self,
        model: CharLSTM,
        vocab: Vocab,
        ids: np.ndarray,
        config: TrainConfig,
        corpus: Corpus | None = None,
        log: Callable[[str], None] = print,
        progress: bool = True,
        init: dict | None = None,
        val_ids: np.ndarray | None = None,
        data: PreparedData | None = None,
        dist: Distributed = Distributed(),
    ) -> None:
        """``ids`` is split by ``val_fraction`` unless ``val_ids`` are given (prepared data,
        memory-mapped and never read whole); ``dist`` makes this one rank of a DDP run."""
        config.validate()
        self.init = init  # where the weights started: the --init record, kept in every checkpoint
        self.config = config
        self.vocab = vocab
        self.dist = dist
        self.log = log if dist.is_main else _silent
        self.progress = progress and dist.is_main
        self.normalization = corpus.normalization if corpus else (data.normalization if data else None)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = pick_device(dist.device_name(config.device))
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        torch.manual_seed(config.seed)
        self.model = model.to(self.device)
        if val_ids is None:
            self.train_ids, self.val_ids = split_train_val(ids, config.val_fraction)
        else:
            self.train_ids, self.val_ids = ids, val_ids
        if config.val_chars:
            self.val_ids = fixed_sample(self.val_ids, config.val_chars)
        self.batches = self._make_batches()
        self.shared_memory_sum = False  # DDP's gradients summed through shared memory (set by the wrap)
        self.ddp = self._wrap_distributed()
        self.optimizer = self._make_optimizer()
        self.position = Position()
        self.carry = None
        self.history: list[EpochRecord] = []
        self.baselines: list[Baseline] = []
        self.output_dir = Path(config.output_dir)
        self.metrics = MetricsLog(self.output_dir)
        self.data_info = DataRecord(
            sources=list(corpus.sources) if corpus else (data.sources if data else []),
            characters=int(len(self.train_ids) + len(self.val_ids)), train_characters=int(len(self.train_ids)),
            val_characters=int(len(self.val_ids)),
            # a prepared folder is named by its manifest (sources' SHA-256): no pass over the ids
            fingerprint=data.fingerprint if data else ids_fingerprint(ids),
            prepared=str(data.directory) if data else None)
        self.seed_windows = seed_windows(vocab, self.train_ids, model.config.window, config.seed)
        self._stop_requested = self._time_up = False
        self.stop_signal: int | None = None
        self.run_id = uuid.uuid4().hex[:12]   # in every metrics row; a resumed run keeps it
        self._resumed = False
        self.eval_seconds: float | None = None  # the last evaluation's time: the budget keeps it in reserve
        self._session_start = time.perf_counter()
        self._session_elapsed0 = 0.0

    # ---------------------------------------------------------------- set-up
    def _make_batches(self) -> Batches:
        c, m = self.config, self.model.config
        if self.dist.active and c.batching != "streams":
            raise CharLSTMError("distributed training shards contiguous streams: use --batching streams")
        if c.batching != "streams" and len(self.train_ids) > MAX_INDEXED_TEXT:
            raise CharLSTMError(f"{len(self.train_ids):,} training characters: --batching {c.batching} keeps an "
                                "index of every example in memory; use --batching streams for a corpus this big")
        if c.batching == "windows":
            if m.target != "last":
                raise CharLSTMError("--batching windows trains one target per window: use --target last")
            if c.stateful:
                return StatefulWindowBatches(self.train_ids, m.window, c.batch_size)
            return WindowBatches(self.train_ids, m.window, c.batch_size, shuffle=True, seed=c.seed)
        if m.target != "all":
            raise CharLSTMError(f"--batching {c.batching} needs a model that predicts every position: "
                                f"use --target all")
        if c.batching == "sentences":
            return self._sentence_batches()
        return StreamBatches(self.train_ids, c.batch_size, c.bptt, random_offset=c.random_offset, seed=c.seed,
                             shard=(self.dist.rank, self.dist.world_size))

    def _wrap_distributed(self) -> torch.nn.Module:
        """DDP averages the gradients of the ranks' equal shares of the batch, which is the
        gradient of the whole batch; dropout masks differ by rank (rank 0 keeps the seed's)."""
        if not self.dist.active:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        # gradients live in DDP's buckets: no copy into them before the all-reduce, none back after
        wrapped = DistributedDataParallel(self.model, device_ids=ids, gradient_as_bucket_view=True)
        if self.config.gradient_sum == "auto":
            self.shared_memory_sum = self.dist.sum_gradients_in_shared_memory(wrapped, self.model.num_parameters())
        if self.dist.rank:
            torch.manual_seed(self.config.seed + 7919 * self.dist.rank)
        return wrapped

    def _sentence_batches(self) -> SentenceBatches:
        from .sentences import sentence_spans

        spans = sentence_spans(self.vocab.decode(self.train_ids))
        batches = SentenceBatches(self.train_ids, spans, self.config.batch_size, self.model.config.window,
                                  shuffle=True, seed=self.config.seed)
        self.log(f"Sentences: {len(spans)}; {batches.long_sentences} longer than the window of "
                 f"{self.model.config.window} + 1 were cut into window-length pieces (nothing dropped); "
                 f"padding is masked out of the loss")
        return batches

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = list(self.model.parameters())
        # one kernel per parameter instead of a dozen: 4x faster on a CPU, where the default is a
        # Python loop (0.9 vs 3.7 ms a step for the 2 x 256 model); under DDP every rank runs it
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        if c.optimizer == "adam":
            return torch.optim.Adam(params, lr=c.lr, **fused)
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": c.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=c.lr, **fused)

    def summary_lines(self) -> list[str]:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        summed = ", gradients summed in shared memory" if self.shared_memory_sum else ""
        ranks = f"  processes: {self.dist.world_size} (DDP, {backend}{summed})" if self.dist.active else ""
        return [
            f"Total Characters: {len(self.train_ids) + len(self.val_ids)}",
            f"Total Vocab: {len(self.vocab)}",
            f"Total Patterns: {self.batches.num_targets}",
            f"Validation Characters: {len(self.val_ids)}",
            f"Parameters: {self.model.num_parameters():,}  device: {self.device}  "
            f"precision: {'bf16' if self.amp_dtype else 'fp32'}  threads: {torch.get_num_threads()}{ranks}",
        ]

    # ---------------------------------------------------------------- resume
    def restore(self, trained: TrainedModel) -> None:
        """Continue from ``trained``; exact when it carries a resume record (``last.safetensors``),
        otherwise fine-tune its weights with a fresh optimiser and schedule."""
        record, source = trained.training.resume, trained.path or "the checkpoint"
        if record is None:
            self.log(f"fine-tuning {source}: it holds no optimiser state, so the optimiser and the "
                     f"schedule start fresh")
            return
        unpack_optimizer(self.optimizer, trained.extra, record.optimizer)
        if self.config.optimizer == "adamw":  # a changed --weight-decay wins over the saved one
            self.optimizer.param_groups[0]["weight_decay"] = self.config.weight_decay
        self.position = record.position
        m = self.model.config
        self.carry = unpack_carry(trained.extra, m.layers, self.config.batch_size, m.units, self.device)
        self._restore_rank_state(trained, record)
        self.history = list(trained.training.history)
        self.init = trained.training.init or self.init
        self.baselines = list(trained.training.baselines)
        self.run_id = record.run_id or self.run_id
        self._resumed = True
        if record.fingerprint != self.data_info.fingerprint:
            self.log("warning: this text differs from the one the checkpoint was trained on; "
                     "training continues, but not as an exact continuation")
        self.log(f"resuming {source}: epoch {self.position.epoch}, batch {self.position.batch}, "
                 f"step {self.position.step}")

    def request_stop(self, signum: int | None = None) -> None:
        """Stop cleanly after the current batch (what the first Ctrl-C or SIGTERM does)."""
        self._stop_requested = True
        self.stop_signal = signum

    # ---------------------------------------------------------------- schedule
    def elapsed(self) -> float:
        """Seconds of training so far, over all sessions of the run."""
        return self._session_elapsed0 + time.perf_counter() - self._session_start

    def lr_at(self, step: int, elapsed: float) -> float:
        """Linear warm-up, then a cosine from ``lr`` down to ``lr * final_lr_fraction`` that ends
        with the last planned step or, with a time budget, when the budget runs out."""
        c = self.config
        if c.warmup_steps and step < c.warmup_steps:
            return c.lr * (step + 1) / c.warmup_steps
        if c.schedule == "constant":
            return c.lr
        progress = step / max(1, c.epochs * len(self.batches))
        if c.time_budget:  # the schedule ends with the budget or the last epoch, whichever comes first
            progress = max(progress, elapsed / max(c.time_budget - self.reserve_seconds(), 1e-9))
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return c.lr * (c.final_lr_fraction + (1 - c.final_lr_fraction) * cosine)

    def reserve_seconds(self) -> float:
        """Time kept free at the end of a budget for the last evaluation and checkpoint."""
        return 1.2 * (self.eval_seconds or 0.0) + 0.5

    def _estimate_eval_seconds(self) -> float:
        """Time a slice of the validation text (after one warm-up call that pays for kernel set-up)
        and scale it; never more than a quarter of the budget. Each real evaluation replaces it."""
        if not len(self.val_ids):
            return 0.0
        probe = self.val_ids[: min(len(self.val_ids), 512)]
        self._score(probe[:64])
        start = time.perf_counter()
        self._score(probe)
        estimate = (time.perf_counter() - start) * len(self.val_ids) / len(probe)
        return min(estimate, 0.25 * (self.config.time_budget or math.inf))

    def _out_of_time(self) -> bool:
        """Whether the budget, less the reserve, is spent; once it is, it stays so."""
        budget = self.config.time_budget
        self._time_up = self._time_up or (budget is not None and self.elapsed() + self.reserve_seconds() >= budget)
        return self._time_up

    # ---------------------------------------------------------------- the loop
    def fit(self) -> TrainResult:
        """Train under the output folder's lock (one training per folder; a killed run's lock
        dies with it), after removing the temporary files a killed run left there."""
        if not self.dist.is_main:  # rank 0 alone writes, so it alone holds the folder
            return self._fit_locked()
        check_output_dir(self.output_dir)
        with RunLock(self.output_dir, self.run_id).acquire(force=self.config.ignore_lock):
            for stale in remove_stale_temporaries(self.output_dir):
                self.log(f"removed {stale.name}, left by a run that was killed while writing")
            if self._resumed:  # rows a killed session logged after its last save are about to be redone
                self.metrics.forget(self.run_id, after_step=self.position.step)
            return self._fit_locked()

    def _fit_locked(self) -> TrainResult:
        """Train until the epochs, the time budget, ``patience`` or Ctrl-C end the run."""
        # 1. say what is trained; the compressors' score on the validation text; start the clock
        for line in self.summary_lines():
            self.log(line)
        if len(self.val_ids) and not self.baselines and self.dist.is_main:
            self.baselines = compressor_baselines_for(self.vocab, self.train_ids, self.val_ids)
        if self.baselines:
            self.log(f"Compressor baselines on the validation text (bits/char): {format_baselines(self.baselines)}")
        result = TrainResult(trained=self._trained_model(), baselines=self.baselines)
        self._start_session()
        with _stop_on_first_interrupt(self):
            try:
                while self.position.epoch <= self.config.epochs:
                    # 2. train on the epoch's batches (what is left of them after a resume)
                    self.train_epoch()
                    # 3. Ctrl-C or --max-steps: save the exact position and stop
                    if self._stop_requested or self._at_step_limit():
                        result.interrupted = self._stop_requested
                        result.resume_path = self._save_resume()
                        reason = "stopped" if result.interrupted else f"--max-steps {self.config.max_steps} reached"
                        self.log(f"\n{reason} at epoch {self.position.epoch}, batch {self.position.batch}; "
                                 f"resume with --resume {result.resume_path}")
                        break
                    # 4. evaluate, log, keep the checkpoint if it improved, save the resume point
                    record = self._end_epoch()
                    result.resume_path = self._save_resume()
                    # 5. stop early: no improvement for ``patience`` epochs, or the budget spent
                    if self.config.patience and self.position.epochs_since_best >= self.config.patience:
                        self.log(f"early stopping: no improvement in {self.config.patience} epochs")
                        break
                    if self._out_of_time():
                        self.log(f"time budget of {self.config.time_budget:.0f} s reached after epoch {record.epoch}")
                        break
            except KeyboardInterrupt:
                result.interrupted = True
                kept = self.position.best_path or "nothing saved yet"
                self.log(f"\ninterrupted; the last good checkpoint is kept: {kept}")
        # 6. hand back the best model
        result.history = self.history
        result.stop_signal = self.stop_signal
        result.best_path = Path(self.position.best_path) if self.position.best_path else None
        result.trained = self._trained_model()
        self.dist.barrier()  # rank 0 has written the best checkpoint
        if result.best_path and result.best_path.is_file():
            result.trained = checkpoint.load(result.best_path, device=self.device)
        self._log_summary()
        return result

    def _start_session(self) -> None:
        """Start this session's clock where the run left off; measure the evaluation reserve up front."""
        self._session_start = time.perf_counter()
        self._session_elapsed0 = self.position.elapsed
        self._stop_requested = self._time_up = False
        if self.config.time_budget:
            self.eval_seconds = self._estimate_eval_seconds()

    def train_epoch(self) -> None:
        """Train on the rest of the current epoch; stops early on Ctrl-C, --max-steps or when time is up."""
        pos = self.position
        self.model.train()
        carried = self.config.carries_state
        state = self.carry if (carried and pos.batch) else None
        bar = tqdm(total=len(self.batches), initial=pos.batch, desc=f"Epoch {pos.epoch}",
                   disable=not self.progress, leave=False, unit="batch", dynamic_ncols=True)
        agreement = None
        with bar:
            for x, y in self.batches.epoch(pos.epoch, start_batch=pos.batch):
                t0 = time.perf_counter()
                lr = self.lr_at(pos.step, self.elapsed())
                if self.dist.active:  # every rank stops at the same step, with rank 0's schedule
                    # agreed while the previous step computed (the first one at once): one step late
                    # for Ctrl-C and the clock, and the step's learning rate read a step early
                    stop, (lr, late) = (agreement or self._agree_on_step(pos.step))()
                    agreement = self._agree_on_step(pos.step + 1)
                    self._stop_requested, self._time_up = stop, bool(late)
                    if stop or late:
                        break
                loss, state = self.train_step(x, y, state if carried else None, lr)
                targets = int((y != IGNORE_INDEX).sum())  # padding is no target
                pos.loss_sum += loss * targets
                pos.targets += targets
                pos.batch += 1
                pos.epoch_seconds += time.perf_counter() - t0
                self.carry = state if carried else None
                bar.update(1)
                bar.set_postfix(loss=f"{pos.loss_sum / pos.targets:.4f}",
                                chars_s=f"{pos.targets * self.dist.world_size / max(pos.epoch_seconds, 1e-9):,.0f}",
                                lr=f"{lr:.2e}")
                self._every_steps(pos.batch < len(self.batches))
                if self._at_step_limit():
                    break
                if not self.dist.active and (self._stop_requested or self._out_of_time()):
                    break  # under DDP the ranks agree on it before the next step
        if agreement is not None:
            agreement()  # every rank started it: finish it before any other collective
        pos.elapsed = self.elapsed()

    def _agree_on_step(self, step: int):
        """Start the ranks' agreement on step ``step``: stop or not, rank 0's learning rate."""
        return self.dist.agree_later(self._stop_requested, [self.lr_at(step, self.elapsed()),
                                                            float(self._out_of_time())], self.device)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, state: State | None, lr: float
                   ) -> tuple[float, State]:
        """One optimiser step on a batch at learning rate ``lr``; the loss and the state after it."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y = x.to(self.device), y.to(self.device)
        last_only = self.model.config.target == "last"
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            loss, state = self.ddp(x, state, last_only=last_only, targets=y)
        if not torch.isfinite(loss):
            self._diverged(f"the training loss became {loss.item()}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip)
        self.optimizer.step()
        self.position.step += 1
        return loss.item(), detach_state(state)

    def _at_step_limit(self) -> bool:
        return bool(self.config.max_steps) and self.position.step >= self.config.max_steps

    def _every_steps(self, mid_epoch: bool) -> None:
        """--eval-every / --save-every: an epoch over a big corpus is long."""
        c, step = self.config, self.position.step
        if c.eval_every and step % c.eval_every == 0 and mid_epoch:
            self.model.eval()
            self._record_evaluation(batch=self.position.batch)
            self.model.train()
        if c.save_every and step % c.save_every == 0 and mid_epoch:
            self._save_resume()

    def _diverged(self, what: str) -> None:
        """A NaN or infinite loss: stop, and never save the broken weights as anything."""
        pos = self.position
        kept = self.position.best_path or "none was saved yet"
        raise CharLSTMError(f"{what} at epoch {pos.epoch}, batch {pos.batch + 1}: training stopped; the last "
                            f"good checkpoint is kept ({kept}); try a lower --lr or a --clip")

    def _end_epoch(self) -> EpochRecord:
        """Evaluate, log, keep the checkpoint if it improved, print samples; then move on."""
        pos = self.position
        record = self._record_evaluation()
        if self.config.sample_every and record.epoch % self.config.sample_every == 0 and self.dist.is_main:
            self._print_samples(record.epoch)
        pos.epoch, pos.batch = pos.epoch + 1, 0
        pos.loss_sum, pos.targets, pos.epoch_seconds = 0.0, 0, 0.0
        self.carry = None
        return record

    def _record_evaluation(self, batch: int = 0) -> EpochRecord:
        """Validation loss and the epoch's training loss so far (summed over ranks): a metrics
        row, a log line, and the checkpoint when the monitored loss improved."""
        pos = self.position
        val_loss = self.evaluate() if len(self.val_ids) else None
        if val_loss is not None and not math.isfinite(val_loss):
            self._diverged(f"the validation loss became {val_loss}")
        pos.elapsed = self.elapsed()
        loss_sum, targets = self.dist.sum([pos.loss_sum, pos.targets], self.device)
        record = EpochRecord(pos.epoch, loss_sum / max(targets, 1), val_loss,
                             targets / max(pos.epoch_seconds, 1e-9), pos.elapsed,
                             self.lr_at(pos.step, pos.elapsed), pos.step, batch)
        self.history.append(record)
        if self.dist.is_main:
            self.metrics.append({**record.to_row(), "run_id": self.run_id})
        self.log(self._epoch_line(record))
        monitored = record.val_loss if self.config.monitor == "val_loss" else record.loss
        if pos.best is None or monitored < pos.best:
            improvement = "" if pos.best is None else f" improved from {pos.best:.4f}"
            pos.best, pos.epochs_since_best = monitored, 0
            pos.best_path = str(self._save_improvement(record))
            self.log(f"Epoch {record.epoch:02d}: {self.config.monitor}{improvement} to {monitored:.4f}, "
                     f"saving {pos.best_path}")
        else:
            pos.epochs_since_best += 1
        return record

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean nats/char over every validation character, conditioned on the text before it;
        under DDP each rank scores its own contiguous piece and the sums are added."""
        start = time.perf_counter()
        piece, offset = self.dist.shard(self.val_ids)
        context = self.train_ids if offset == 0 else self.val_ids[:offset]  # the text before the piece
        mean = self._score(piece, context)
        total, count = self.dist.sum([mean * len(piece), len(piece)], self.device)
        self.eval_seconds = time.perf_counter() - start
        return total / max(count, 1)

    def _score(self, ids: np.ndarray, context: np.ndarray | None = None) -> float:
        """Nats/char of ``ids`` after ``context`` (by default the training text's end)."""
        return score_after(self.model, self.train_ids if context is None else context, ids, self.amp_dtype)

    # ---------------------------------------------------------------- output
    def _epoch_line(self, r: EpochRecord) -> str:
        val = ""
        if r.val_loss is not None:
            versus = versus_best(r.val_bpc, self.baselines)
            val = f"  val_loss {r.val_loss:.4f} ({r.val_bpc:.3f} bpc{'; ' + versus if versus else ''})"
        where = f" step {r.step}" if r.batch else ""
        return (f"Epoch {r.epoch:02d}{where}  loss {r.loss:.4f}{val}  {r.chars_per_s:,.0f} chars/s  "
                f"lr {r.lr:.2e}  {r.elapsed:.0f} s")

    def _log_summary(self) -> None:
        vals = [r.val_loss for r in self.history if r.val_loss is not None]
        if vals:
            best = min(vals)
            self.log(f"best val_loss {best:.4f} nats/char = {best / LN2:.3f} bits/char "
                     f"(compressors: {format_baselines(self.baselines)} bits/char)")

    def _print_samples(self, epoch: int) -> None:
        from .generate import Generator, SamplingConfig  # generation is a later stage

        trained = self._trained_model()
        prime = self.seed_windows[epoch % len(self.seed_windows)]
        generator = Generator(trained, device=self.device)
        try:
            for temperature in self.config.sample_temperatures:
                text = generator.generate(prime, self.config.sample_length,
                                          sampling=SamplingConfig(temperature=temperature), seed=epoch)
                self.log(f"----- sample after epoch {epoch}, temperature {temperature}:\n{prime}|{text}")
        finally:
            self.model.train()

    def _trained_model(self, extra: dict | None = None, resume: ResumeRecord | None = None) -> TrainedModel:
        epochs = sum(1 for r in self.history if not r.batch)  # not the --eval-every rows
        training = TrainingRecord(config=asdict(self.config), history=list(self.history), epoch=epochs,
                                  best=BestEpoch.of(self.history), data=self.data_info,
                                  baselines=list(self.baselines), resume=resume, init=self.init)
        return TrainedModel(
            model=self.model,
            vocab=self.vocab,
            normalization=self.normalization or TrainedModel.__dataclass_fields__["normalization"].default_factory(),
            training=training,
            seed_windows=self.seed_windows,
            extra=extra or {},
        )

    def _save_improvement(self, record: EpochRecord) -> Path:
        loss = record.val_loss if self.config.monitor == "val_loss" else record.loss
        name = checkpoint.checkpoint_name(self.config.checkpoint_template, record.epoch, loss,
                                          val_loss=record.val_loss or 0.0)
        if not self.dist.is_main:  # one writer; the other ranks only track the name
            return self.output_dir / name
        trained = self._trained_model()
        path = checkpoint.save(self.output_dir / name, trained)
        checkpoint.save(self.output_dir / BEST_NAME, trained)
        self._retain(path)
        return path

    def _retain(self, newest: Path) -> None:
        """Keep the newest ``--keep N`` improvement files of this run (0 = all, as Keras); say what goes."""
        kept = [p for p in self.position.improvements if p != str(newest)] + [str(newest)]
        keep = self.config.keep
        while keep and len(kept) > keep:
            old = Path(kept.pop(0))
            try:
                old.unlink()
                self.log(f"removed {old.name} (--keep {keep}: the newest {keep} improvements, best and last stay)")
            except FileNotFoundError:
                pass
            except OSError as err:
                self.log(f"warning: could not remove {old} ({err.strerror})")
        self.position.improvements = kept

    def _save_resume(self) -> Path:
        """``last.safetensors``: weights plus everything an exact resume needs. Under DDP every
        rank's part (its streams' carried state, random generators, loss sums) is gathered, the
        carried state into one global batch laid out as a single process would have it."""
        path = self.output_dir / RESUME_NAME
        rng_tensors, rng_meta = pack_rng()
        mine = (pack_carry(self.carry), rng_tensors, rng_meta, [self.position.loss_sum, self.position.targets])
        parts = self.dist.gather(mine)
        if not self.dist.is_main:
            return path
        optim_tensors, optim_meta = pack_optimizer(self.optimizer)
        carries = [p[0] for p in parts]
        carry = {k: torch.cat([c[k] for c in carries], dim=1) for k in carries[0]} if carries[0] else {}
        extra = {**optim_tensors, **rng_tensors, **carry}
        ranks = []
        for rank, (_, tensors, meta, sums) in enumerate(parts[1:], start=1):
            extra.update({f"{RANK_PREFIX}{rank}.{k}": v for k, v in tensors.items()})
            ranks.append({"rng": meta, "loss_sum": sums[0], "targets": sums[1]})
        resume = ResumeRecord(replace(self.position), optim_meta, rng_meta, self.data_info.fingerprint,
                              world_size=self.dist.world_size, ranks=ranks,
                              run_id=self.run_id)
        return checkpoint.save(path, self._trained_model(extra, resume))

    def _restore_rank_state(self, trained: TrainedModel, record: ResumeRecord) -> None:
        """This rank's random generators, streams' carried state and loss sums; exact when the
        world size is the one the checkpoint was written with."""
        if self.carry is not None and self.dist.active:
            rows = self.dist.rows(self.config.batch_size)
            self.carry = [(h[:, rows].contiguous(), c[:, rows].contiguous()) for h, c in self.carry]
        if record.world_size != self.dist.world_size:
            self.log(f"warning: the checkpoint was written by {record.world_size} processes, this run has "
                     f"{self.dist.world_size}: it continues, but random draws differ from an unbroken run")
        if self.dist.rank == 0 or record.world_size != self.dist.world_size:
            restore_rng(trained.extra, record.rng)
            return
        rank_record = record.ranks[self.dist.rank - 1]
        prefix = f"{RANK_PREFIX}{self.dist.rank}."
        restore_rng({k[len(prefix):]: v for k, v in trained.extra.items() if k.startswith(prefix)},
                    rank_record.get("rng", {}))
        self.position.loss_sum, self.position.targets = rank_record["loss_sum"], int(rank_record["targets"])


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def _stop_on_first_interrupt(trainer: Trainer):
    """First Ctrl-C or SIGTERM: finish the batch, save the resume checkpoint, stop. A second
    signal: stop at once (the last completed checkpoint stays)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if trainer._stop_requested:
            raise KeyboardInterrupt
        trainer.request_stop(signum)
        trainer.log("\nstopping after this batch (Ctrl-C again to stop at once)")

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def train(
    corpus: Corpus,
    preset: str = "default",
    log: Callable[[str], None] = print,
    progress: bool = True,
    **overrides,
) -> TrainedModel:
    """Train a model on ``corpus``; returns the best model (also saved under ``output_dir``)."""
    return fit(corpus, preset, log=log, progress=progress, **overrides).trained


def fit(corpus: Corpus | None = None, preset: str = "default", log: Callable[[str], None] = print,
        progress: bool = True, resume: str | Path | TrainedModel | None = None, init: str | Path | None = None,
        data: PreparedData | str | Path | None = None, dist: Distributed = Distributed(),
        **overrides) -> TrainResult:
    """Like ``train`` but returns the whole ``TrainResult`` (history, best path, interruption).

    ``resume``: a checkpoint (its path, or the checkpoint loaded) to continue from.
    ``last.safetensors`` continues exactly (same settings unless overridden); any other
    checkpoint, e.g. an imported Keras model, is fine-tuned with its own model settings and a
    fresh optimiser.

    ``init``: start from a pretrained model (``"english"``, the shipped base, or a checkpoint
    path) remapped onto this corpus's characters, with the preset's regularisation and the
    fine-tuning schedule (``FINE_TUNING``); explicit options win.

    ``data``: a folder written by ``charlstm prepare`` (or its ``PreparedData``) instead of a
    corpus: its memory-mapped ids and validation part are used as they are. ``dist``: this
    process's place in a ``torchrun`` group (``Distributed.from_env()``).
    """
    if resume is not None and init is not None:
        raise CharLSTMError("--init starts a new run and --resume continues one: pass only one of them")
    if (corpus is None) == (data is None):
        raise CharLSTMError("train on either a text or prepared data (--data DIR), not both or neither")
    if data is not None and not isinstance(data, PreparedData):
        data = PreparedData.open(data)
    if init is not None:
        if data is not None:
            raise CharLSTMError("--init remaps a model onto a text's characters; it does not take --data")
        return _fit_from_init(corpus, init, preset, log, progress, overrides)
    if resume is not None:
        trained = resume if isinstance(resume, TrainedModel) else checkpoint.load(resume)
        return _fit_resumed(corpus, trained, preset, log, progress, overrides, data=data, dist=dist)
    if data is not None:
        overrides.setdefault("val_fraction", None)
        if overrides["val_fraction"] is None:  # the prepared split decides; this only keeps checks consistent
            overrides["val_fraction"] = data.manifest.get("val_fraction", 0.0)
        if overrides.get("val_chars") is None and len(data.val_ids) > PREPARED_VAL_CHARS:
            overrides["val_chars"] = PREPARED_VAL_CHARS
            log(f"validating on a fixed {PREPARED_VAL_CHARS:,}-character part of the {len(data.val_ids):,} "
                "validation characters (--val-chars N to change, 0 for all)")
    vocab = data.vocab if data is not None else Vocab.from_text(corpus.text)
    ids, val_ids = (data.train_ids, data.val_ids) if data is not None else (vocab.encode(corpus.text), None)
    counts = symbol_counts(vocab, ids, data)
    model_config, train_config = preset_configs(preset, len(vocab), log=log, symbol_counts=counts,
                                                train_chars=_training_chars(corpus, data, overrides), **overrides)
    _check_length(ids, model_config, train_config, prepared=data is not None)
    _check_memory(model_config, train_config)
    torch.manual_seed(train_config.seed)
    model = CharLSTM(model_config, symbol_counts=counts)
    trainer = Trainer(model, vocab, ids, train_config, corpus=corpus, log=log, progress=progress,
                      val_ids=val_ids, data=data, dist=dist)
    return trainer.fit()


def symbol_counts(vocab: Vocab, ids: np.ndarray, data: PreparedData | None) -> np.ndarray:
    """How often each symbol occurs in the training text (the adaptive head's frequency order):
    as ``prepare`` counted them, else counted here."""
    counts = data.symbol_counts() if data is not None else None
    return counts if counts is not None else np.bincount(ids, minlength=len(vocab))[:len(vocab)]


def _training_chars(corpus: Corpus | None, data: PreparedData | None, overrides: dict) -> int:
    """How many characters the run trains on (the adaptive recipe's measure of the text)."""
    if data is not None:
        return len(data.train_ids)
    val_fraction = overrides.get("val_fraction")
    return int(len(corpus.text) * (1 - (TrainConfig.val_fraction if val_fraction is None else val_fraction)))


def _fit_from_init(corpus: Corpus, init: str | Path, preset: str, log, progress: bool,
                   overrides: dict) -> TrainResult:
    vocab = Vocab.from_text(corpus.text)
    model_over, train_over = split_overrides(overrides)
    preset_model, preset_train = PRESETS[_fine_tuning_preset(preset, ModelConfig(vocab_size=1))]
    regularisation = {**{k: v for k, v in preset_model.items() if k in REGULARISATION_FIELDS}, **FINE_TUNING_MODEL}
    started = load_init(init, vocab, {**regularisation, **model_over})
    train_config = _finish_train_config({**preset_train, **FINE_TUNING, "epochs": FINE_TUNING_PASSES, **train_over},
                                        train_over, epochs_bound_budget=True)
    ids = vocab.encode(corpus.text)
    _check_length(ids, started.model.config, train_config)
    record = started.record
    new = "".join(record["new_characters"])
    log(f"starting from {record['init']} ({started.model.num_parameters():,} parameters): "
        f"{record['characters_shared']} of the text's {len(vocab)} characters known"
        + (f", new: {new!r}" if new else ""))
    if "epochs" not in train_over:
        budget = " or the time budget, whichever ends first" if train_config.time_budget else ""
        log(f"fine-tuning plans {FINE_TUNING_PASSES} passes over the text{budget} (--epochs to change)")
    trainer = Trainer(started.model, vocab, ids, train_config, corpus=corpus, log=log, progress=progress,
                      init=record)
    return trainer.fit()


def _fit_resumed(corpus: Corpus | None, trained: TrainedModel, preset: str, log, progress: bool, overrides: dict,
                 data: PreparedData | None = None, dist: Distributed = Distributed()) -> TrainResult:
    model_over, train_over = split_overrides(overrides)
    model = _with_regularisation(trained.model, model_over)
    saved = trained.training.config
    if saved and trained.training.resume:
        train_kw = {**asdict(TrainConfig.from_dict(saved)), **train_over}
    else:
        train_kw = {**PRESETS[_fine_tuning_preset(preset, model.config)][1], **train_over}
    train_config = _finish_train_config(train_kw, train_over)
    source = data if data is not None else corpus
    if source.normalization != trained.normalization:
        log("warning: the text is normalised differently from the checkpoint's training text")
    if data is not None:
        if data.vocab != trained.vocab:
            raise CharLSTMError(f"{trained.path}: its vocabulary ({len(trained.vocab)} symbols) is not the one of "
                                f"{data.directory} ({len(data.vocab)}); resume on the data it was trained on")
        ids, val_ids = data.train_ids, data.val_ids
    else:
        ids, val_ids = trained.vocab.encode(corpus.text), None
    _check_length(ids, model.config, train_config, prepared=data is not None)
    trainer = Trainer(model, trained.vocab, ids, train_config, corpus=corpus, log=log, progress=progress,
                      val_ids=val_ids, data=data, dist=dist)
    trainer.restore(trained)
    return trainer.fit()


def _with_regularisation(model: CharLSTM, model_over: dict) -> CharLSTM:
    """The same weights with new dropout settings; anything else cannot change on resume."""
    fixed = sorted(k for k in model_over if k not in REGULARISATION_FIELDS
                   and model_over[k] != getattr(model.config, k))
    if fixed:
        raise CharLSTMError(f"--{fixed[0].replace('_', '-')} cannot change when resuming a checkpoint "
                            f"(only {', '.join(REGULARISATION_FIELDS)} can)")
    if not model_over:
        return model
    new = CharLSTM(replace(model.config, **model_over))
    new.load_state_dict(model.state_dict())
    return new


def _check_memory(model_config: ModelConfig, train_config: TrainConfig) -> None:
    """Refuse a model whose training would not fit in memory, before allocating it."""
    steps = model_config.window if train_config.batching != "streams" else train_config.bptt
    check_memory(training_bytes(checkpoint.parameter_count(model_config), train_config.batch_size, steps,
                                model_config.units, model_config.layers, model_config.vocab_size),
                 f"training {model_config.layers} x {model_config.units} units")


def _check_length(ids: np.ndarray, model_config: ModelConfig, train_config: TrainConfig,
                  prepared: bool = False) -> None:
    spare = train_config.bptt - 1 if train_config.random_offset else 0
    min_len = (model_config.window + 2 if train_config.batching == "windows"
               else train_config.batch_size * 2 + 2 + spare)
    if len(ids) * (1 if prepared else 1 - train_config.val_fraction) < min_len:
        raise CharLSTMError(f"the text has {len(ids)} characters: too short for a window of "
                            f"{model_config.window} and batch size {train_config.batch_size}")

