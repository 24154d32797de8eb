"""The training loop: data -> tokenizer -> model -> AdamW steps -> checkpoints -> export.

Design choices:
- Batches are a pure function of (seed, step), so the data position is just the step and
  a resumed run sees exactly the batches an uninterrupted run would.
- The loss is cross-entropy + the MoE layers' balance losses; V3's bias update runs right
  after each optimizer step, from the loads the layers counted during that step.
- What happens around a step (cadence, Ctrl-C, the NaN check, metrics, checkpoints, V3's
  bias update) is ``train.runner.Runner``, shared with ``dsmoe finetune``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from dsmoe import distributed as ddist
from dsmoe.config import ModelConfig
from dsmoe.data import (BatchSampler, Corpus, TokenStreams, load_corpus, tokenize_corpus,
                        unigram_entropy)
from dsmoe.devices import resolve_device
from dsmoe.io import atomic_write_text
from dsmoe.model import Transformer
from dsmoe.tokenizer import Tokenizer
from dsmoe.train import checkpoint as ckpt
from dsmoe.train import rundir
from dsmoe.train.activation_checkpointing import apply_activation_checkpointing
from dsmoe.train.config import (TrainConfig, build_model_config, requested_model_config,
                               resumed_settings, vocab_size_asked)
from dsmoe.train.metrics import ProgressDisplay
from dsmoe.train.runner import Runner, StepStats, fill_from_log

SAMPLE_PROMPTS = ("def ", "import ", "class ")  # only when the validation text has no line


def sample_prompts(texts: list[str], n: int) -> list[str]:
    """``n`` prompts from the validation text, so samples look like the data: lines spread
    evenly through it, each cut to its first two words (or half of a one-word line)."""
    lines = [line.strip() for text in texts for line in text.splitlines() if line.strip()]
    if not lines:
        return list(SAMPLE_PROMPTS[:n])
    prompts = []
    for i in range(min(n, len(lines))):
        line = lines[i * len(lines) // n]
        words = line.split()
        prompts.append(" ".join(words[:2]) + " " if len(words) > 2
                       else line[:max(1, len(line) // 2)])
    return prompts


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


def cache_root(cfg: TrainConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("DSMOE_CACHE") or Path.home() / ".cache" / "dsmoe"
    return Path(root)


def obtain_tokenizer(cfg: TrainConfig, corpus: Corpus, vocab_size: int, out: Path, *,
                     resumed: bool = True) -> Tokenizer:
    """The run's tokenizer: the run's own copy (``resumed``: a checkpoint was loaded),
    ``--tokenizer``, or a byte-level BPE trained on the training split (cached by corpus
    content and size). A copy without a checkpoint is a failed run's, perhaps on other
    data, and is replaced."""
    own = out / "tokenizer"
    if resumed and (own / "tokenizer.json").exists():
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
    """AdamW; matrices (and stacked expert tensors) decay, vectors (norms, biases) do not.
    Fused on CUDA (one kernel for all parameters), the plain loop on CPU."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    on_cuda = all(p.is_cuda for p in decay + no_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             foreach=False, fused=on_cuda or None)


def training_device(cfg: Any) -> torch.device:
    """Where this process trains (``cfg.device`` of a training or finetuning config): the
    CPU, or its GPU (its local one under NCCL)."""
    device = resolve_device(cfg.device)
    return ddist.device() if device.type == "cuda" and ddist.is_distributed() else device


@torch.no_grad()
def evaluate(model: Transformer, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
             autocast: contextlib.AbstractContextManager) -> float:
    """Mean validation cross-entropy (nats/token) in eval mode (no load counting, no dropping)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = model.embed_tokens.weight.device
    for inputs, targets in batches:
        inputs, targets = ddist.data_shard((inputs.to(device), targets.to(device)))
        with autocast:
            logits = model(inputs).logits
        total += F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                 reduction="sum").item()
        count += targets.numel()
    model.train(was_training)
    return ddist.reduce_mean(total / max(count, 1))


def prepare(cfg: TrainConfig, out: Path, *, resumed: bool = True
            ) -> tuple[Corpus, Tokenizer, TokenStreams]:
    """Load text, get a tokenizer, tokenize (cached). Fails fast on bad data and on a
    ``--seq-len`` the model has no positions for."""
    asked = requested_model_config(cfg)
    if cfg.seq_len > asked.max_position_embeddings:
        raise ValueError(f"--seq-len {cfg.seq_len} is longer than the model's "
                         f"max_position_embeddings={asked.max_position_embeddings}; lower "
                         "--seq-len or raise it with --set max_position_embeddings=N")
    corpus = load_corpus(cfg.data)
    tokenizer = obtain_tokenizer(cfg, corpus, asked.vocab_size, out, resumed=resumed)
    if vocab_size_asked(cfg) and tokenizer.vocab_size != asked.vocab_size:
        print(f"warning: --set vocab_size={asked.vocab_size} is overridden by the "
              f"tokenizer's {tokenizer.vocab_size} tokens (the model's vocabulary is the "
              "tokenizer's)", file=sys.stderr, flush=True)
    streams = tokenize_corpus(corpus, tokenizer, cache_root(cfg) / "tokens")
    return corpus, tokenizer, streams


def _open_run(cfg: TrainConfig, out: Path, resume: bool, given: frozenset[str] | None,
              quiet: bool, sharded: bool) -> tuple[TrainConfig, dict[str, Any] | None]:
    """Check ``out`` and load its newest checkpoint (``resume``; ``sharded``: this run is
    fully sharded, else a sharded checkpoint is read whole); returns the settings the run
    continues under (``config.resumed_settings``) and the checkpoint."""
    existing = ckpt.list_checkpoints(out)
    if existing and not resume:
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue it "
                         "or choose another --out")
    state = ckpt.load_latest(out) if resume else None
    if state is not None and not sharded:
        state = ckpt.unshard_checkpoint(state)
    if state is not None:
        cfg, changes = resumed_settings(TrainConfig.from_dict(state["train_config"]), cfg,
                                        given)
        for line in changes if not quiet else ():
            print(line, flush=True)
    if ddist.is_main_process():
        atomic_write_text(out / "train_config.json", json.dumps(cfg.to_dict(), indent=2) + "\n")
    return cfg, state


def _build_model(cfg: TrainConfig, state: dict[str, Any] | None, vocab_size: int, ep: int,
                 fsdp: ddist.FSDPOptions | None) -> tuple[Transformer, str]:
    """The run's model (the checkpoint's on resume; a sharded checkpoint loads later, into
    the sharded model) on its device, parallelized over ``ep`` ranks, activation
    checkpointing applied after, then ``fsdp`` sharding; and a line describing it."""
    model_cfg = (ModelConfig.from_hf(state["model_config"]) if state is not None
                 else build_model_config(cfg, vocab_size, devices=ep if ep > 1 else None))
    model_cfg = ddist.ep_model_config(model_cfg, ep)
    model = Transformer(model_cfg)
    banner = (f"model: {model_cfg.num_hidden_layers} layers, "
              f"{model.num_parameters() / 1e6:.2f}M params "
              f"({model.num_parameters(active=True) / 1e6:.2f}M active), routing "
              f"{'dense' if cfg.dense else cfg.routing}")
    if state is not None and "model" in state:
        model.load_state_dict(state["model"])
    model = ddist.parallelize(model.to(training_device(cfg)), ep)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if fsdp is not None:  # --dtype bfloat16: blocks gather their weights in bf16 too
        if cfg.dtype == "bfloat16" and fsdp.param_dtype is None:
            fsdp = dataclasses.replace(fsdp, param_dtype="bfloat16")
        model = ddist.apply_fsdp(model, ep, fsdp)
        banner += f"; FSDP over {ddist.get_world_size()} ranks, EP {ep}"
    return model, banner


def train(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False,
          ep: int | None = None, given: frozenset[str] | None = None,
          fsdp: ddist.FSDPOptions | None = None) -> TrainResult:
    """Run (or continue) a training run in ``cfg.out``; see the module docstring. Under
    torchrun / ``--nproc`` every rank calls this after ``ddist.init_distributed()``;
    ``ep``: expert-parallel group size (default: every rank; 1 for ``--dense``);
    ``fsdp``: shard everything over the ranks too (``distributed.apply_fsdp``);
    ``given``: the settings the user chose (None: all of ``cfg``), which ``--resume``
    checks against the run's own. Rank 0 holds the run directory's lock throughout."""
    out = Path(cfg.out)
    rundir.check_out(out)
    with rundir.locked(out) if ddist.is_main_process() else contextlib.nullcontext():
        return _train(cfg, out, resume, quiet, ep, given, fsdp)


def _train(cfg: TrainConfig, out: Path, resume: bool, quiet: bool, ep: int | None,
           given: frozenset[str] | None, fsdp: ddist.FSDPOptions | None) -> TrainResult:
    if ep is None:
        ep = 1 if cfg.dense else ddist.get_world_size()
    main = ddist.is_main_process()
    quiet = quiet or not main
    cfg, state = _open_run(cfg, out, resume, given, quiet, fsdp is not None)
    torch.manual_seed(cfg.seed)
    with ddist.main_process_first():
        corpus, tokenizer, streams = prepare(cfg, out, resumed=state is not None)
    model, banner = _build_model(cfg, state, tokenizer.vocab_size, ep, fsdp)
    banner += f"; data: {corpus.source}, {len(streams.train):,} train tokens"
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(cfg, s) / cfg.lr)
    runner = Runner(out, cfg, model, optimizer, scheduler)
    if state is not None:
        runner.restore(state)
    if main:
        runner.log.truncate_after(runner.step)
    sampler = BatchSampler(streams.train, cfg.batch_size, cfg.seq_len, cfg.seed)
    val_sampler = BatchSampler(streams.val, cfg.batch_size, cfg.seq_len, cfg.seed)
    forward = torch.compile(model) if cfg.compile else model
    device = model.embed_tokens.weight.device
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if cfg.dtype == "bfloat16"
                else contextlib.nullcontext())

    def validate() -> dict[str, float]:
        return {"val_loss": evaluate(model, val_sampler.eval_batches(cfg.eval_batches),
                                     autocast)}

    result = TrainResult(out=out, step=runner.step, status="finished",
                         unigram_entropy=unigram_entropy(streams.val, tokenizer.vocab_size))
    model.train()
    with ProgressDisplay(cfg.max_steps, runner.step, quiet) as display:
        display.print(banner)
        result.status = runner.run(
            lambda step: _train_step(forward, optimizer, sampler, cfg, step, autocast,
                                     runner.interval.state["load"]),
            validate,
            lambda: {**({} if runner.sharded else {"model": ddist.full_state_dict(model)}),
                     "train_config": cfg.to_dict(), "model_config": model.config.to_hf()},
            display, f"dsmoe train --out {out} --resume")
    result.step = runner.step
    fill_from_log(result, runner.log.read())
    if result.status == "finished":
        if result.val_loss is None:  # e.g. resumed past a lowered --max-steps
            result.val_loss = validate()["val_loss"]
        single = ddist.gather_model(model) if ddist.is_distributed() else model
        if main:
            _finish(single, tokenizer, cfg, out, result, quiet,
                    sample_prompts(corpus.val, cfg.samples))
        ddist.barrier()
    return result


def _train_step(forward: torch.nn.Module, optimizer: torch.optim.Optimizer,
                sampler: BatchSampler, cfg: TrainConfig, step: int,
                autocast: contextlib.AbstractContextManager, like_load: torch.Tensor
                ) -> StepStats:
    """One optimizer step over ``grad_accum`` micro-batches (skipped when the loss is not
    finite); ``like_load``: an [L, E] table of the load's shape. The numbers the log needs
    stay on the model's device until the step ends and reach the host in one read."""
    device = next(forward.parameters()).device
    sums = torch.zeros(3, device=device)  # cross-entropy, aux loss, dropped fraction
    named: dict[str, torch.Tensor] = {}  # balance loss name -> sum over micro-batches
    load = torch.zeros(like_load.shape, device=device)  # [L, E]
    n_moe = load.shape[0]
    for micro in range(cfg.grad_accum):
        batch = sampler.batch(step * cfg.grad_accum + micro)
        inputs, targets = ddist.data_shard(tuple(t.to(device) for t in batch))
        with autocast:
            out = forward(inputs, return_routing=True)
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), targets.flatten())
        ((ce + out.aux_loss) / cfg.grad_accum).backward()
        sums[0] += ce.detach()
        sums[1] += out.aux_loss.detach().float()
        for name, value in out.losses.items():
            named[name] = named.get(name, 0.0) + value.detach().float() / cfg.grad_accum
        for i, routing in enumerate(out.routing or []):
            load[i] += routing.expert_counts.float()
            sums[2] += routing.dropped_fraction.float() / max(n_moe, 1)
    values = torch.cat([sums, torch.stack(list(named.values()))] if named else [sums]).tolist()
    loss_sum, aux_sum, dropped_sum = values[:3]
    losses = dict(zip(named, values[3:]))
    loss = ddist.reduce_mean(loss_sum / cfg.grad_accum)  # NaN anywhere -> NaN everywhere
    aux = ddist.reduce_mean(aux_sum / cfg.grad_accum)
    load = ddist.all_reduce_sum_(load).cpu()  # logged load: the global batch's
    losses = {name: ddist.reduce_mean(value) for name, value in losses.items()}
    dropped = ddist.reduce_mean(dropped_sum) / cfg.grad_accum
    if math.isfinite(loss) and math.isfinite(aux):
        ddist.sync_gradients(forward)
        if cfg.grad_clip > 0:
            ddist.clip_grad_norm_(forward, cfg.grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepStats(loss, aux, losses, dropped, load,
                     cfg.batch_size * cfg.seq_len * cfg.grad_accum)


def _finish(model: Transformer, tokenizer: Tokenizer, cfg: TrainConfig, out: Path,
            result: TrainResult, quiet: bool, prompts: list[str]) -> None:
    """Export the HF model, print samples, write report.md with plots."""
    from dsmoe.train.report import fmt, write_report

    model.eval()
    model.save_pretrained(out / "model", tokenizer_dir=out / "tokenizer")
    for i, prompt in enumerate(prompts):
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
