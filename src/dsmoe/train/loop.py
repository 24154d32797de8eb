"""The training loop: data -> tokenizer -> model -> AdamW steps -> checkpoints -> export.

Design choices:
- Batches are a pure function of (seed, step), so the data position is just the step and
  a resumed run sees exactly the batches an uninterrupted run would.
- The loss is cross-entropy + the MoE layers' balance losses; V3's bias update runs right
  after each optimizer step, from the loads the layers counted during that step.
- Logged averages are accumulated in a small state that checkpoints carry too, so
  ``metrics.jsonl`` of a killed-and-resumed run equals an uninterrupted run's, bit for bit.
- SIGINT finishes the current step, saves a checkpoint and returns; a NaN/inf loss stops
  before the optimizer step, keeping the last good checkpoint on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from dsmoe import distributed as ddist
from dsmoe.config import ModelConfig
from dsmoe.data import (BatchSampler, Corpus, TokenStreams, load_corpus, tokenize_corpus,
                        unigram_entropy)
from dsmoe.io import atomic_write_text
from dsmoe.model import Transformer
from dsmoe.tokenizer import Tokenizer
from dsmoe.train import checkpoint as ckpt
from dsmoe.train.config import TrainConfig, build_model_config
from dsmoe.train.metrics import MetricsLog, ProgressDisplay

SAMPLE_PROMPTS = ("def ", "import ", "class ")


@dataclass
class TrainResult:
    out: Path
    step: int
    status: str  # "finished" | "interrupted" | "diverged"
    train_loss: float | None = None
    val_loss: float | None = None
    unigram_entropy: float | None = None
    tokens_per_s: float | None = None
    samples: list[str] = field(default_factory=list)


class _Interval:
    """Running sums between two log lines (checkpointed, see module docstring)."""

    def __init__(self, n_moe_layers: int, n_experts: int) -> None:
        self.state: dict[str, Any] = {
            "steps": 0, "loss": 0.0, "aux": 0.0, "losses": {}, "dropped": 0.0, "tokens": 0,
            "seconds": 0.0, "load": torch.zeros(n_moe_layers, max(n_experts, 1)),
        }

    def add(self, loss: float, aux: float, losses: dict[str, float], dropped: float,
            load: torch.Tensor, tokens: int, seconds: float) -> None:
        s = self.state
        s["steps"] += 1
        s["loss"] += loss
        s["aux"] += aux
        for name, value in losses.items():
            s["losses"][name] = s["losses"].get(name, 0.0) + value
        s["dropped"] += dropped
        s["load"] += load
        s["tokens"] += tokens
        s["seconds"] += seconds

    def summary(self) -> dict[str, Any]:
        s, n = self.state, max(self.state["steps"], 1)
        load = s["load"]
        per_layer = (load.max(dim=1).values / load.mean(dim=1).clamp_min(1e-9)).tolist() \
            if load.numel() and load.sum() > 0 else []
        return {
            "train_loss": s["loss"] / n, "aux_loss": s["aux"] / n,
            "losses": {k: v / n for k, v in s["losses"].items()},
            "dropped_fraction": s["dropped"] / n,
            "tokens_per_s": s["tokens"] / max(s["seconds"], 1e-9),
            "expert_load": load.long().tolist() if per_layer else [],
            "load_max_mean_per_layer": per_layer,
            "load_max_mean": max(per_layer) if per_layer else 1.0,
        }


def cache_root(cfg: TrainConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("DSMOE_CACHE") or Path.home() / ".cache" / "dsmoe"
    return Path(root)


def obtain_tokenizer(cfg: TrainConfig, corpus: Corpus, vocab_size: int, out: Path) -> Tokenizer:
    """The run's tokenizer: ``--tokenizer``, the run's own copy (resume), or a byte-level
    BPE trained on the training split (cached by corpus content and size)."""
    own = out / "tokenizer"
    if (own / "tokenizer.json").exists():
        return Tokenizer.from_file(own)
    if cfg.tokenizer:
        tokenizer = Tokenizer.from_file(cfg.tokenizer)
    else:
        digest = hashlib.sha256(f"{vocab_size}\0".encode())
        for text in corpus.train:
            digest.update(text.encode("utf-8", "surrogatepass"))
            digest.update(b"\0")
        cached = cache_root(cfg) / "tokenizers" / digest.hexdigest()[:20]
        if (cached / "tokenizer.json").exists():
            tokenizer = Tokenizer.from_file(cached)
        else:
            tokenizer = Tokenizer.train_bpe(corpus.train, vocab_size, show_progress=False)
            tokenizer.save(cached)
    tokenizer.save(own)
    return tokenizer


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` x lr at ``max_steps``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices (and stacked expert tensors) decay, vectors (norms, biases) do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False)


@torch.no_grad()
def evaluate(model: Transformer, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
             autocast: contextlib.AbstractContextManager) -> float:
    """Mean validation cross-entropy (nats/token) in eval mode (no load counting, no dropping)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in batches:
        inputs, targets = ddist.data_shard((inputs, targets))
        with autocast:
            logits = model(inputs).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                 reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return ddist.reduce_mean(total / max(count, 1))


class _SigintFlag:
    """Turn Ctrl-C into a flag checked between steps (main thread only)."""

    def __init__(self) -> None:
        self.raised = False
        self.previous = None

    def __enter__(self) -> "_SigintFlag":
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


def prepare(cfg: TrainConfig, out: Path) -> tuple[Corpus, Tokenizer, TokenStreams]:
    """Load text, get a tokenizer, tokenize (cached). Fails fast on bad data."""
    base = ModelConfig.preset(cfg.preset)
    corpus = load_corpus(cfg.data)
    tokenizer = obtain_tokenizer(cfg, corpus, base.vocab_size, out)
    streams = tokenize_corpus(corpus, tokenizer, cache_root(cfg) / "tokens")
    return corpus, tokenizer, streams


def train(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False,
          ep: int | None = None) -> TrainResult:
    """Run (or continue) a training run in ``cfg.out``; see the module docstring. Under
    torchrun / ``--nproc`` every rank calls this after ``ddist.init_distributed()``;
    ``ep``: expert-parallel group size (default: every rank; 1 for ``--dense``)."""
    if ep is None:
        ep = 1 if cfg.dense else ddist.get_world_size()
    main = ddist.is_main_process()
    quiet = quiet or not main
    out = Path(cfg.out)
    existing = ckpt.list_checkpoints(out)
    if existing and not resume:
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue it "
                         "or choose another --out")
    state = ckpt.load_latest(out) if resume else None
    if state is not None:  # the run's own settings win, except how long to run
        cfg = TrainConfig.from_dict({**state["train_config"], "max_steps": cfg.max_steps})
    if main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")

    torch.manual_seed(cfg.seed)
    with ddist.main_process_first():
        corpus, tokenizer, streams = prepare(cfg, out)
    model_cfg = (ModelConfig.from_hf(state["model_config"]) if state is not None
                 else build_model_config(cfg, tokenizer.vocab_size,
                                         devices=ep if ep > 1 else None))
    model_cfg = ddist.ep_model_config(model_cfg, ep)
    model = Transformer(model_cfg)
    n_params, n_active = model.num_parameters(), model.num_parameters(active=True)
    if state is not None:
        model.load_state_dict(state["model"])
    model = ddist.parallelize(model, ep)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(cfg, s) / cfg.lr)
    sampler = BatchSampler(streams.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    val_sampler = BatchSampler(streams.val, cfg.batch_size, cfg.seq_len, cfg.seed)
    n_moe = len(model.moe_layers())
    interval = _Interval(n_moe, model_cfg.n_routed_experts or 0)
    step = 0
    if state is not None:
        optimizer.load_state_dict(ddist.shard_optimizer_state(model, optimizer,
                                                              state["optimizer"]))
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        interval.state = state["interval"]
        step = state["step"]
    log = MetricsLog(out / "metrics.jsonl")
    if main:
        log.truncate_after(step)
    entropy = unigram_entropy(streams.val, tokenizer.vocab_size)

    forward = torch.compile(model) if cfg.compile else model
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if cfg.dtype == "bfloat16"
                else contextlib.nullcontext())

    def save(at_step: int) -> None:
        payload = {"step": at_step, "model": ddist.full_state_dict(model),
                   "optimizer": ddist.full_optimizer_state(model, optimizer),
                   "scheduler": scheduler.state_dict(),
                   "rng": ckpt.rng_state(), "interval": interval.state,
                   "train_config": cfg.to_dict(), "model_config": model_cfg.to_hf()}
        if main:
            ckpt.save_checkpoint(out, at_step, payload, cfg.keep_checkpoints)
        ddist.barrier()

    result = TrainResult(out=out, step=step, status="finished", unigram_entropy=entropy)
    model.train()
    with _SigintFlag() as sigint, ProgressDisplay(cfg.max_steps, step, quiet) as display:
        display.print(f"model: {model_cfg.num_hidden_layers} layers, "
                      f"{n_params / 1e6:.2f}M params "
                      f"({n_active / 1e6:.2f}M active), routing "
                      f"{'dense' if cfg.dense else cfg.routing}; data: {corpus.source}, "
                      f"{len(streams.train):,} train tokens")
        while step < cfg.max_steps:
            started = time.perf_counter()
            loss, aux, losses, dropped, load = _train_step(
                forward, optimizer, sampler, cfg, step, autocast, n_moe, interval)
            if not math.isfinite(loss) or not math.isfinite(aux):
                display.print(f"loss became {loss} at step {step + 1}; stopping. The last good "
                              f"checkpoint is kept in {ckpt.checkpoint_dir(out)}")
                result.status = "diverged"
                break
            scheduler.step()
            ddist.all_reduce_expert_load(model)
            model.update_router_biases()
            step += 1
            interval.add(loss, aux, losses, dropped, load, cfg.batch_size * cfg.seq_len *
                         cfg.grad_accum, time.perf_counter() - started)
            record = None
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                record = {"step": step, "lr": optimizer.param_groups[0]["lr"],
                          **interval.summary()}
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    record["val_loss"] = evaluate(
                        model, val_sampler.eval_batches(cfg.eval_batches), autocast)
                if main:
                    log.write(record)
                interval = _Interval(n_moe, model_cfg.n_routed_experts or 0)
            stop = ddist.any_rank(sigint.raised)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stop:
                save(step)
            display.update(step, record)
            if stop:
                display.print(f"interrupted at step {step}; checkpoint saved. "
                              f"Continue with: dsmoe train --out {out} --resume")
                result.status = "interrupted"
                break
    result.step = step
    _fill_from_log(result, log.read())
    if result.status == "finished":
        if result.val_loss is None:  # e.g. resumed past a lowered --max-steps
            result.val_loss = evaluate(model, val_sampler.eval_batches(cfg.eval_batches),
                                       autocast)
        single = ddist.gather_model(model) if ddist.is_distributed() else model
        if main:
            _finish(single, tokenizer, cfg, out, result, quiet)
        ddist.barrier()
    return result


def _train_step(forward: torch.nn.Module, optimizer: torch.optim.Optimizer,
                sampler: BatchSampler, cfg: TrainConfig, step: int,
                autocast: contextlib.AbstractContextManager, n_moe: int, interval: _Interval
                ) -> tuple[float, float, dict[str, float], float, torch.Tensor]:
    """One optimizer step over ``grad_accum`` micro-batches (skipped when the loss is not
    finite); returns (loss, aux loss, named losses, dropped fraction, load [L, E])."""
    loss_sum = aux_sum = dropped_sum = 0.0
    losses: dict[str, float] = {}
    load = torch.zeros_like(interval.state["load"])
    for micro in range(cfg.grad_accum):
        inputs, targets = ddist.data_shard(sampler.batch(step * cfg.grad_accum + micro))
        with autocast:
            out = forward(inputs, return_routing=True)
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
        ((ce + out.aux_loss) / cfg.grad_accum).backward()
        loss_sum += ce.item()
        aux_sum += out.aux_loss.item()
        for name, value in out.losses.items():
            losses[name] = losses.get(name, 0.0) + value.item() / cfg.grad_accum
        for i, routing in enumerate(out.routing or []):
            load[i] += routing.expert_counts.float()
            dropped_sum += float(routing.dropped_fraction) / max(n_moe, 1)
    loss = ddist.reduce_mean(loss_sum / cfg.grad_accum)  # NaN anywhere -> NaN everywhere
    aux = ddist.reduce_mean(aux_sum / cfg.grad_accum)
    ddist.all_reduce_sum_(load)  # logged load: the global batch's
    losses = {name: ddist.reduce_mean(value) for name, value in losses.items()}
    dropped_sum = ddist.reduce_mean(dropped_sum)
    if math.isfinite(loss) and math.isfinite(aux):
        ddist.sync_gradients(forward)
        if cfg.grad_clip > 0:
            ddist.clip_grad_norm_(forward, cfg.grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, aux, losses, dropped_sum / cfg.grad_accum, load


def _fill_from_log(result: TrainResult, records: list[dict[str, Any]]) -> None:
    """The final numbers come from metrics.jsonl, which covers the whole run: a resumed run
    (even one resumed after it finished, which trains no step) reports what its steps did."""
    for record in records:
        if "train_loss" in record:
            result.train_loss, result.tokens_per_s = record["train_loss"], record["tokens_per_s"]
        if "val_loss" in record:
            result.val_loss = record["val_loss"]


def _finish(model: Transformer, tokenizer: Tokenizer, cfg: TrainConfig, out: Path,
            result: TrainResult, quiet: bool) -> None:
    """Export the HF model, print samples, write report.md with plots."""
    from dsmoe.train.report import fmt, write_report

    model.eval()
    model.save_pretrained(out / "model", tokenizer_dir=out / "tokenizer")
    for i, prompt in enumerate(SAMPLE_PROMPTS[: cfg.samples]):
        ids = torch.tensor([tokenizer.encode(prompt)])
        new = model.generate(ids, max_new_tokens=48, temperature=0.8, top_k=40, seed=cfg.seed + i)
        result.samples.append(prompt + tokenizer.decode(new[0].tolist()))
    write_report(out, cfg, result)
    if not quiet:
        print(f"final: train loss {fmt(result.train_loss, '.3f')}, val loss "
              f"{fmt(result.val_loss, '.3f')} nats/token (unigram entropy of the data: "
              f"{fmt(result.unigram_entropy, '.3f')}), {fmt(result.tokens_per_s, '.0f')} tokens/s")
        for sample in result.samples:
            print("--- sample ---\n" + sample)
        print(f"model exported to {out / 'model'}; report: {out / 'report.md'}")
