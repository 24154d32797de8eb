"""The one training runner that ``dsmoe train`` and ``dsmoe finetune`` both drive.

The caller owns the data, the model and what one optimizer step and one evaluation are
(``step_fn``, ``eval_fn``); the runner owns everything around them, once:

- cadence: log every ``log_every`` steps, evaluate every ``eval_every`` (on log steps),
  checkpoint every ``checkpoint_every``, and always at the last step;
- the divergence check: a NaN/inf loss (which ``step_fn`` has not applied) stops the run
  before any further optimizer step, keeping the last good checkpoint; the message is
  printed even with ``--quiet`` (the exit status alone says nothing of why);
- Ctrl-C: a flag checked between steps, agreed on by every rank, then a checkpoint;
- V3's bias update after each optimizer step, from the loads every rank counted;
- metrics: running sums between two log lines (``Interval``) travel in the checkpoint, so
  ``metrics.jsonl`` of a killed-and-resumed run equals an uninterrupted run's, bit for bit;
- the checkpoint's common part: step, optimizer (world-size independent), scheduler,
  every RNG state and the interval sums; the caller adds its model state and configs.
  A fully sharded model (``--fsdp``) is saved as a sharded checkpoint instead: model and
  optimizer through torch.distributed.checkpoint, each rank its own shards
  (``train.checkpoint.save_sharded``); either kind restores into any layout.

Under torchrun / ``--nproc`` every rank runs the same runner; only rank 0 writes files.
``spawn`` starts those ranks for a command (or runs in this process).

Shapes: L MoE layers, E routed experts.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol

import torch

from dsmoe import distributed as ddist
from dsmoe.train import checkpoint as ckpt
from dsmoe.train.metrics import MetricsLog, ProgressDisplay


class StepStats(NamedTuple):
    """What one optimizer step reports (already reduced over the ranks)."""

    loss: float  # cross-entropy of the step (NaN/inf: the step was not applied)
    aux: float  # balance losses, weighted, summed over MoE layers
    losses: dict[str, float]  # the balance losses by name
    dropped: float  # fraction of routed assignments dropped (V2 capacity)
    load: torch.Tensor  # [L, E] routed assignments per expert
    tokens: int  # tokens the step trained on (for tokens/s)


def load_balance(load: torch.Tensor) -> list[float]:
    """Max/mean load per MoE layer of an [L, E] count table (1.0: perfectly balanced);
    empty when nothing was routed."""
    if not load.numel() or load.sum() <= 0:
        return []
    return (load.max(dim=1).values / load.mean(dim=1).clamp_min(1e-9)).tolist()


class Interval:
    """Running sums between two log lines (checkpointed, see the module docstring)."""

    def __init__(self, n_moe_layers: int, n_experts: int) -> None:
        self.state: dict[str, Any] = {
            "steps": 0, "loss": 0.0, "aux": 0.0, "losses": {}, "dropped": 0.0, "tokens": 0,
            "seconds": 0.0, "load": torch.zeros(n_moe_layers, max(n_experts, 1)),  # [L, E]
        }

    def add(self, stats: StepStats, seconds: float) -> None:
        s = self.state
        s["steps"] += 1
        s["loss"] += stats.loss
        s["aux"] += stats.aux
        for name, value in stats.losses.items():
            s["losses"][name] = s["losses"].get(name, 0.0) + value
        s["dropped"] += stats.dropped
        s["load"] += stats.load
        s["tokens"] += stats.tokens
        s["seconds"] += seconds

    def summary(self) -> dict[str, Any]:
        s, n = self.state, max(self.state["steps"], 1)
        per_layer = load_balance(s["load"])
        return {
            "train_loss": s["loss"] / n, "aux_loss": s["aux"] / n,
            "losses": {k: v / n for k, v in s["losses"].items()},
            "dropped_fraction": s["dropped"] / n,
            "tokens_per_s": s["tokens"] / max(s["seconds"], 1e-9),
            "expert_load": s["load"].long().tolist() if per_layer else [],
            "load_max_mean_per_layer": per_layer,
            "load_max_mean": max(per_layer) if per_layer else 1.0,
        }


class SigintFlag:
    """Turn Ctrl-C into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.raised = False
        self.previous = None

    def __enter__(self) -> "SigintFlag":
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


class Cadence(Protocol):
    """The fields of TrainConfig / FinetuneConfig the runner reads."""

    max_steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    keep_checkpoints: int


@dataclass
class Runner:
    """Drives ``step_fn`` from ``step`` to ``cadence.max_steps``; see the module docstring.
    ``update_biases``: run V3's bias update after each step (False: drop the counts, so a
    frozen router's bias stays bit-identical)."""

    out: Path
    cadence: Cadence
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    update_biases: bool = True
    step: int = 0

    def __post_init__(self) -> None:
        self.main = ddist.is_main_process()
        self.sharded = ddist.is_fully_sharded(self.model)
        self.log = MetricsLog(self.out / "metrics.jsonl")
        self.interval = self._new_interval()

    def _new_interval(self) -> Interval:
        return Interval(len(self.model.moe_layers()), self.model.config.n_routed_experts or 0)

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: the caller has loaded its model part, except into a
        fully sharded model, which loads here with the optimizer (from a sharded
        checkpoint, or the slices of a whole one). Without FSDP, a sharded checkpoint
        comes through ``unshard_checkpoint`` first."""
        if self.sharded and "sharded" in state:
            from dsmoe.distributed import sharded_checkpoint

            sharded_checkpoint.load(self.model, self.optimizer, Path(state["sharded"]),
                                    state["param_groups"])
        elif self.sharded:
            from dsmoe.distributed import sharded_checkpoint

            sharded_checkpoint.load_full(self.model, self.optimizer, state.get("model", state.get("trainable", {})),
                                         state["optimizer"])
        else:
            self.optimizer.load_state_dict(
                ddist.shard_optimizer_state(self.model, self.optimizer, state["optimizer"]))
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.interval.state = state["interval"]
        self.step = state["step"]

    def state(self) -> dict[str, Any]:
        """The common part of a checkpoint (a collective under expert parallelism); the
        optimizer of a fully sharded model is saved apart (``save``)."""
        common = {"step": self.step, "scheduler": self.scheduler.state_dict(),
                  "rng": ckpt.rng_state(), "interval": self.interval.state}
        if not self.sharded:
            common["optimizer"] = ddist.full_optimizer_state(self.model, self.optimizer)
        return common

    def save(self, extra: Callable[[], dict[str, Any]]) -> None:
        payload = {**extra(), **self.state()}
        if self.sharded:
            from dsmoe.distributed import sharded_checkpoint

            ckpt.save_sharded(self.out, self.step, payload, lambda path: {
                "param_groups": sharded_checkpoint.save(self.model, self.optimizer, path)},
                self.cadence.keep_checkpoints)
            return
        if self.main:
            ckpt.save_checkpoint(self.out, self.step, payload, self.cadence.keep_checkpoints)
        ddist.barrier()

    def _after_step(self) -> None:
        if self.update_biases:
            ddist.all_reduce_expert_load(self.model)
            self.model.update_router_biases()
        else:
            for layer in self.model.moe_layers():
                layer.load_counts.zero_()

    def _record(self, eval_fn: Callable[[], dict[str, float]]) -> dict[str, Any] | None:
        c, step = self.cadence, self.step
        if step % c.log_every and step != c.max_steps:
            return None
        record = {"step": step, "lr": self.optimizer.param_groups[0]["lr"],
                  **self.interval.summary()}
        if step % c.eval_every == 0 or step == c.max_steps:
            record.update(eval_fn())
        if self.main:
            self.log.write(record)
        self.interval = self._new_interval()
        return record

    def run(self, step_fn: Callable[[int], StepStats],
            eval_fn: Callable[[], dict[str, float]], extra: Callable[[], dict[str, Any]],
            display: ProgressDisplay, resume_hint: str) -> str:
        """Train to ``max_steps``; returns "finished", "interrupted" or "diverged"."""
        c = self.cadence
        with SigintFlag() as sigint:
            while self.step < c.max_steps:
                started = time.perf_counter()
                stats = step_fn(self.step)
                if not math.isfinite(stats.loss) or not math.isfinite(stats.aux):
                    if self.main:
                        display.warn(f"loss became {stats.loss} at step {self.step + 1}; "
                                     "stopping. The last good checkpoint is kept in "
                                     f"{ckpt.checkpoint_dir(self.out)}")
                    return "diverged"
                self.scheduler.step()
                self._after_step()
                self.step += 1
                self.interval.add(stats, time.perf_counter() - started)
                record = self._record(eval_fn)
                stop = ddist.any_rank(sigint.raised)
                if self.step % c.checkpoint_every == 0 or self.step == c.max_steps or stop:
                    self.save(extra)
                display.update(self.step, record)
                if stop:
                    display.print(f"interrupted at step {self.step}; checkpoint saved. "
                                  f"Continue with: {resume_hint}")
                    return "interrupted"
        return "finished"


def fill_from_log(result: Any, records: list[dict[str, Any]]) -> None:
    """A run's final numbers (``train_loss``, ``val_loss``, ``tokens_per_s`` of its result)
    from metrics.jsonl, which covers the whole run: a resumed run (even one resumed after
    it finished, which trains no step) reports what all its steps did."""
    for record in records:
        if "train_loss" in record:
            result.train_loss, result.tokens_per_s = record["train_loss"], record["tokens_per_s"]
        if "val_loss" in record:
            result.val_loss = record["val_loss"]


# Errors that describe bad input (one line for the user, no traceback), by name.
_USER_ERRORS = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}


def _in_process_group(fn: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
    """One rank's run (or the only one): join the process group torchrun or --nproc
    described, run, leave."""
    ddist.init_distributed()
    try:
        return fn(*args, **kwargs)
    finally:
        ddist.teardown()


def spawn(fn: Callable[..., Any], nproc: int, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on ``nproc`` local ranks (rank 0's result), or in this process
    (under torchrun, or for one process). ``fn``: a module-level function."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be a positive integer, got {nproc!r}")
    if nproc > 1 and "WORLD_SIZE" not in os.environ:  # not already under torchrun
        from torch.multiprocessing import ProcessRaisedException

        try:
            return ddist.launch(_in_process_group, nproc, fn, args, kwargs)[0]
        except ProcessRaisedException as exc:  # a rank's traceback: keep a user error's line
            kind, _, message = str(exc).strip().splitlines()[-1].partition(": ")
            if kind in _USER_ERRORS:
                raise _USER_ERRORS[kind](message) from None
            raise
    return _in_process_group(fn, args, kwargs)
