"""The supervised finetuning loop: base model -> adapters (or not) -> AdamW steps -> output.

Design choices:
- The pretraining loop's pieces are reused as they are: ``lr_at`` (warmup + cosine),
  ``build_optimizer`` (AdamW over the parameters that require grad) and the one runner
  (``train.runner.Runner``: cadence, Ctrl-C, the NaN check, metrics, checkpoints, V3's
  bias update). So the progress bar, ``metrics.jsonl``, checkpoints and exact resume
  behave as in ``dsmoe train``, under ``--nproc`` / torchrun too (data parallel).
- The loss is the mean cross-entropy over the assistant tokens of an optimizer step (all
  micro-batches together: every target token weighs the same) plus the MoE balance
  losses; prompt and padding positions are ignored.
- LoRA checkpoints hold only the trainable tensors; the frozen base is reloaded from
  MODEL on resume, and its fingerprint (and the data's) must match the checkpoint's.
- Routing statistics: before the first step and after the last, the validation rows (or
  up to 256 training rows without a validation split) run in eval mode and the expert
  load of every MoE layer over their real tokens is logged; the "after" record adds the
  load shift per layer, the total variation distance 0.5 * sum_e |p_after - p_before|
  between the two load distributions (the share of routed assignments that moved).
- V3 routers keep their balancing bias frozen unless the routers are trained (``--full``
  without ``--freeze-router``), so a LoRA base stays bit-identical.
- ``--full --fsdp`` (``--ep E``): the base is loaded whole on every rank, then expert
  parallelism and FSDP2 shard it (``distributed.apply_fsdp``), so parameters, gradients
  and optimizer state are split over the ranks; checkpoints are sharded (DCP) and resume
  in any layout. Forward passes are collectives then, so every rank runs the routing
  probes (on the same rows) and rank 0 writes.

Shapes: B batch, S row length, L MoE layers, E routed experts, K picks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from dsmoe import distributed as ddist
from dsmoe.finetune import sft_data
from dsmoe.finetune.adapter import (check_peft_dropout, peft_layout, save_adapter,
                                    weights_fingerprint)
from dsmoe.finetune.config import FinetuneConfig
from dsmoe.finetune.lora import apply_lora, lora_modules, make_quant_trainable
from dsmoe.io import atomic_write_text
from dsmoe.model import Transformer
from dsmoe.moe.balance import expert_counts
from dsmoe.tokenizer import Tokenizer
from dsmoe.train import checkpoint as ckpt
from dsmoe.train import rundir
from dsmoe.train.config import resumed_settings
from dsmoe.train.loop import build_optimizer, lr_at, training_device
from dsmoe.train.metrics import MetricsLog, ProgressDisplay
from dsmoe.train.runner import Runner, StepStats, fill_from_log, load_balance

ROUTING_SAMPLE_ROWS = 256
_MOVABLE = frozenset({"model", "data", "val_data", "tokenizer", "device"})  # checked by fingerprint


@dataclass
class FinetuneResult:
    out: Path
    step: int
    status: str  # "finished" | "interrupted" | "diverged"
    train_loss: float | None = None
    val_loss: float | None = None
    probe_loss_before: float | None = None  # assistant-token loss of the probe rows
    load_shift: float | None = None  # mean over MoE layers (see module docstring)
    tokens_per_s: float | None = None
    output: Path | None = None  # the adapter directory (LoRA) or the HF model (full)
    model: Transformer | None = field(default=None, repr=False)  # the finetuned model


# --- model ------------------------------------------------------------------------------
def load_base(cfg: FinetuneConfig) -> tuple[Transformer, Tokenizer]:
    """The base model (quantized while loading with ``quant``) and its tokenizer."""
    path = Path(cfg.model)
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path}")
    dtype = getattr(torch, cfg.dtype)
    if cfg.quant is not None:
        from dsmoe.quant import load_model

        model = load_model(path, dtype=dtype, quant=cfg.quant)
    else:
        model = Transformer.from_pretrained(path, dtype=dtype, device=training_device(cfg))
    if cfg.tokenizer is not None:
        tokenizer = Tokenizer.from_file(cfg.tokenizer)
    elif path.suffix == ".gguf":
        from dsmoe.checkpoint.gguf import load_tokenizer

        tokenizer = load_tokenizer(path)
    else:
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has no tokenizer.json; pass --tokenizer")
        tokenizer = Tokenizer.from_file(path)
    if tokenizer.eos_id is None:
        raise ValueError("the tokenizer has no EOS token, which ends every assistant turn")
    return model, tokenizer


def prepare_model(model: Transformer, cfg: FinetuneConfig) -> str:
    """Set what trains: adapters on a frozen base, or (``--full``) every weight but the
    frozen parts. Returns a one-line description."""
    if cfg.full:
        model.requires_grad_(True)
        for layer in model.moe_layers():
            if cfg.freeze_router:
                layer.gate.requires_grad_(False)
            if cfg.freeze_experts:
                layer.experts.requires_grad_(False)
        frozen = [n for n, flag in (("routers", cfg.freeze_router),
                                    ("routed experts", cfg.freeze_experts)) if flag]
        what = "full finetuning" + (f" (frozen: {', '.join(frozen)})" if frozen else "")
    else:
        settings = cfg.lora_settings()
        wrapped = apply_lora(model, settings)
        if cfg.quant is not None:
            make_quant_trainable(model)
        what = (f"LoRA r={settings.r} alpha={settings.alpha:g} dropout={settings.dropout:g} "
                f"on {','.join(settings.targets)} ({len(wrapped)} modules"
                f"{', base ' + cfg.quant if cfg.quant else ''})")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{what}: {trainable / 1e6:.3f}M trainable of {total / 1e6:.2f}M parameters"


def dropout_for_peft(cfg: FinetuneConfig, model: Transformer, given: frozenset[str] | None,
                     quiet: bool) -> FinetuneConfig:
    """PEFT reads the feed-forward adapters (MLPs, shared and routed experts, routers) of a
    DeepSeek-V2/V3 model through target_parameters, which allow no dropout
    (``adapter.check_peft_dropout``): there an unset lora_dropout becomes 0 (with a note)
    and one the user set is refused.
    ``given`` as in ``_open_run``; None (the Python API): a value other than the default
    counts as set."""
    if cfg.full or cfg.lora_dropout == 0:
        return cfg
    settings = cfg.lora_settings()
    if not peft_layout(model.config, settings).stacked:
        return cfg
    default = FinetuneConfig.__dataclass_fields__["lora_dropout"].default
    if ("lora_dropout" in given) if given is not None else cfg.lora_dropout != default:
        check_peft_dropout(model.config, settings)
    if not quiet and ddist.is_main_process():
        print(f"finetune: lora dropout 0, not {cfg.lora_dropout:g}: PEFT reads the feed-forward "
              f"adapters of {model.config.model_type} models through target_parameters, "
              "which allow no dropout", flush=True)
    return dataclasses.replace(cfg, lora_dropout=0.0)


def trainable_state(model: Transformer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: Transformer, state: dict[str, torch.Tensor]) -> None:
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ValueError(f"checkpoint does not match the run's trainable tensors: missing "
                         f"{missing[:3]}, unexpected {extra[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


# --- measuring ----------------------------------------------------------------------------
def _real_load(routing: list, real: torch.Tensor, n_experts: int) -> torch.Tensor:
    """[L, E] assignments per expert over the real (non-padding) tokens."""
    keep = real.reshape(-1)  # [B*S]
    rows = [expert_counts(r.topk_idx, n_experts, keep=keep).float() for r in routing]
    return torch.stack(rows) if rows else torch.zeros(0, max(n_experts, 1), device=keep.device)


@torch.no_grad()
def evaluate(model: Transformer, examples: list[sft_data.Example], batch_size: int,
             pad_id: int) -> tuple[float, torch.Tensor]:
    """(mean assistant-token cross-entropy, [L, E] expert load over real tokens), eval mode."""
    was_training = model.training
    model.eval()
    E = model.config.n_routed_experts or 0
    total, count = 0.0, 0
    load = torch.zeros(len(model.moe_layers()), max(E, 1))
    device = model.embed_tokens.weight.device
    for batch in sft_data.eval_batches(examples, batch_size, pad_id):
        batch = batch.to(device)
        out = model(batch.input_ids, return_routing=True)
        total += F.cross_entropy(out.logits.float().flatten(0, 1), batch.labels.flatten(),
                                 ignore_index=sft_data.IGNORE_INDEX, reduction="sum").item()
        count += batch.n_targets
        load += _real_load(out.routing or [], batch.real, E).cpu()
    model.train(was_training)
    return total / max(count, 1), load


def load_shift(before: torch.Tensor, after: torch.Tensor) -> list[float]:
    """Per layer: total variation distance between the two load distributions [L, E]."""
    p = before / before.sum(dim=1, keepdim=True).clamp_min(1e-9)
    q = after / after.sum(dim=1, keepdim=True).clamp_min(1e-9)
    return (0.5 * (p - q).abs().sum(dim=1)).tolist()


def routing_record(step: int, phase: str, probe: str, loss: float, load: torch.Tensor,
                   before: dict[str, Any] | None = None) -> dict[str, Any]:
    """A metrics.jsonl line: expert load on the probe rows ("val" or "train") and their
    assistant-token loss; with ``before`` (the first record) also the load shift."""
    per_layer = load_balance(load)
    record: dict[str, Any] = {"step": step, "event": "routing", "phase": phase,
                              "probe": probe, "probe_loss": loss,
                              "expert_load": load.long().tolist(),
                              "load_max_mean_per_layer": per_layer}
    if before is not None:
        shift = load_shift(torch.tensor(before["expert_load"], dtype=torch.float32), load) \
            if before["expert_load"] else []
        record.update(probe_loss_before=before["probe_loss"], load_shift_per_layer=shift,
                      load_shift=sum(shift) / len(shift) if shift else 0.0)
    return record


def _drop_after_records(log: MetricsLog) -> None:
    """A continued run writes its own "after" record when it finishes."""
    records = log.read()
    kept = [r for r in records if not (r.get("event") == "routing" and r.get("phase") == "after")]
    if len(kept) != len(records):
        atomic_write_text(log.path, "".join(json.dumps(r) + "\n" for r in kept))


# --- the loop ---------------------------------------------------------------------------
def _open_run(cfg: FinetuneConfig, out: Path, resume: bool, given: frozenset[str] | None,
              quiet: bool, sharded: bool) -> tuple[FinetuneConfig, dict[str, Any] | None]:
    """Check ``out`` and load its newest checkpoint (``resume``); returns the settings the
    run continues under and the checkpoint. Paths may change on resume (the base's and the
    data's fingerprints must still match); ``given`` as in ``config.resumed_settings``
    (None: every field of ``cfg`` that is set)."""
    if ckpt.list_checkpoints(out) and not resume:
        raise ValueError(f"{out} already holds checkpoints; pass --resume to continue it "
                         "or choose another --out")
    state = ckpt.load_latest(out) if resume else None
    if state is not None and not sharded:
        state = ckpt.unshard_checkpoint(state)
    if state is not None:
        if given is None:
            given = frozenset(k for k, v in cfg.to_dict().items() if v is not None)
        saved = FinetuneConfig.from_dict(state["finetune_config"])
        cfg, changes = resumed_settings(saved, cfg, given, also=_MOVABLE)
        if "epochs" in given and "max_steps" not in given:
            cfg = dataclasses.replace(cfg, max_steps=None)  # resolve() recounts the steps
        for line in changes if not quiet else ():
            print(line, flush=True)
    return cfg, state


def _load_data(cfg: FinetuneConfig, model: Transformer, tokenizer: Tokenizer
               ) -> tuple[sft_data.SFTData, sft_data.SFTBatches, int]:
    """The rows (cut to what the model's positions allow), the training batches, the pad id."""
    data = sft_data.load_sft_data(cfg.data, tokenizer, min(cfg.max_seq_len + 1,
                                                            model.config.max_position_embeddings),
                                  val_fraction=cfg.val_fraction, val_path=cfg.val_data)
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    batches = sft_data.SFTBatches(data.train, cfg.batch_size, cfg.seed, pad_id,
                                  packing=cfg.packing, max_len=cfg.max_seq_len + 1)
    return data, batches, pad_id


def finetune(cfg: FinetuneConfig, *, resume: bool = False, quiet: bool = False,
             given: frozenset[str] | None = None, ep: int = 1,
             fsdp: ddist.FSDPOptions | None = None) -> FinetuneResult:
    """Run (or continue) a finetuning run in ``cfg.out`` (module docstring). Under torchrun
    / ``--nproc`` every rank calls this and trains on its rows of each batch; rank 0 holds
    the run directory's lock throughout. ``fsdp`` (``--full`` only): shard the model over
    the ranks, its experts over ``ep`` of them first."""
    check_sharding(cfg, ep, fsdp)
    out = Path(cfg.out)
    rundir.check_out(out)
    with rundir.locked(out) if ddist.is_main_process() else contextlib.nullcontext():
        return _finetune(cfg, out, resume, quiet, given, ep, fsdp)


def check_sharding(cfg: FinetuneConfig, ep: int, fsdp: ddist.FSDPOptions | None) -> None:
    """What ``--fsdp`` and ``--ep`` can be combined with, as one-line errors."""
    if fsdp is not None and not cfg.full:
        raise ValueError("--fsdp shards full finetuning (--full); LoRA trains small "
                         "adapters on a frozen base: drop --fsdp (--nproc alone splits "
                         "the batches)")
    if ep != 1 and fsdp is None:
        raise ValueError(f"--ep {ep} shards the experts of --full --fsdp finetuning; add "
                         "--full --fsdp or drop --ep")


def _shard(model: Transformer, ep: int, fsdp: ddist.FSDPOptions | None) -> Transformer:
    """Expert parallelism, then FSDP (``--fsdp``); the model as it was without."""
    if fsdp is None:
        return model
    return ddist.apply_fsdp(ddist.parallelize(model, ep), ep, fsdp)


def _restore(model: Transformer, runner: Runner, state: dict[str, Any]) -> None:
    """Continue from ``state``: a sharded model loads with its optimizer in the runner; a
    whole one gets its trainable tensors here (a sharded checkpoint, read whole, holds the
    full model: its trainable part is taken)."""
    if not runner.sharded:
        trainable = state.get("trainable")
        if trainable is None:
            trainable = {n: state["model"][n] for n, p in model.named_parameters()
                         if p.requires_grad}
        load_trainable_state(model, trainable)
    runner.restore(state)


def _finetune(cfg: FinetuneConfig, out: Path, resume: bool, quiet: bool,
              given: frozenset[str] | None, ep: int, fsdp: ddist.FSDPOptions | None
              ) -> FinetuneResult:
    main = ddist.is_main_process()
    quiet = quiet or not main
    cfg, state = _open_run(cfg, out, resume, given, quiet, fsdp is not None)
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_base(cfg)
    cfg = dropout_for_peft(cfg, model, given, quiet)
    base_fingerprint = weights_fingerprint(model)
    data, batches, pad_id = _load_data(cfg, model, tokenizer)
    cfg = cfg.resolve(batches.batches_per_epoch)
    if state is not None:
        _check_resumable(state, base_fingerprint, data.fingerprint())
    if main:
        atomic_write_text(out / "finetune_config.json",
                          json.dumps(cfg.to_dict(), indent=2) + "\n")
        tokenizer.save(out / "tokenizer")
    description = prepare_model(model, cfg)
    model = _shard(model, ep, fsdp)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(cfg, s) / cfg.lr)
    runner = Runner(out, cfg, model, optimizer, scheduler,
                    update_biases=cfg.full and not cfg.freeze_router)
    if state is not None:
        _restore(model, runner, state)
    if main:
        runner.log.truncate_after(runner.step)
        _drop_after_records(runner.log)
    probe = ("val", data.val) if data.val else ("train", data.train[:ROUTING_SAMPLE_ROWS])

    def extra() -> dict[str, Any]:
        return {**({} if runner.sharded else {"trainable": trainable_state(model)}),
                "finetune_config": cfg.to_dict(),
                "model_config": model.config.to_hf(), "base_fingerprint": base_fingerprint,
                "data_fingerprint": data.fingerprint()}

    result = FinetuneResult(out=out, step=runner.step, status="finished")
    with ProgressDisplay(cfg.max_steps, runner.step, quiet) as display:
        display.print(f"finetune: {description}")
        display.print(_data_line(data, cfg))
        if runner.step == 0 and (main or runner.sharded):
            record = routing_record(0, "before", probe[0],
                                    *evaluate(model, probe[1], cfg.eval_batch_size, pad_id))
            if main:
                runner.log.write(record)
        model.train()
        result.status = runner.run(
            lambda step: _train_step(model, optimizer, batches, cfg, step,
                                     runner.interval.state["load"]),
            lambda: ({"val_loss": evaluate(model, data.val, cfg.eval_batch_size, pad_id)[0]}
                     if data.val else {}),
            extra, display,
            f"dsmoe finetune {cfg.model} --data {cfg.data} --out {out} --resume")
    result.step, result.model = runner.step, model
    fill_from_log(result, runner.log.read())
    if result.status == "finished" and (main or runner.sharded):
        _finish(model, cfg, out, runner.log, probe, pad_id, result, quiet)
    ddist.barrier()
    return result


def _data_line(data: sft_data.SFTData, cfg: FinetuneConfig) -> str:
    return (f"data: {len(data.train)} train / {len(data.val)} val examples"
            f"{f', {data.truncated} truncated' if data.truncated else ''}"
            f"{f', {data.dropped} dropped (no assistant tokens)' if data.dropped else ''}"
            f"; {cfg.max_steps} steps of {cfg.batch_size} x {cfg.grad_accum} rows")


def _check_resumable(state: dict[str, Any], base_fingerprint: str, data_fingerprint: str
                     ) -> None:
    if state.get("base_fingerprint") != base_fingerprint:
        raise ValueError("--resume: MODEL is not the base model this run started from "
                         "(its weights differ)")
    if state.get("data_fingerprint") != data_fingerprint:
        raise ValueError("--resume: the finetuning data changed since this run started, so it "
                         "cannot be continued exactly; start a new run (another --out)")


def _my_rows(batch: sft_data.Batch) -> sft_data.Batch:
    """This rank's contiguous rows of a global batch (all of it in one process)."""
    rank, world = ddist.get_rank(), ddist.get_world_size()
    if world == 1:
        return batch
    rows = torch.arange(batch.input_ids.shape[0]).tensor_split(world)[rank]  # [B_rank]
    return sft_data.Batch(batch.input_ids[rows], batch.labels[rows], batch.real[rows],
                          None if batch.position_ids is None else batch.position_ids[rows])


def _train_step(model: Transformer, optimizer: torch.optim.Optimizer,
                batches: sft_data.SFTBatches, cfg: FinetuneConfig, step: int,
                like_load: torch.Tensor) -> StepStats:
    """One optimizer step over ``grad_accum`` micro-batches; every target token of the
    global batch weighs the same, on any number of ranks. ``like_load``: [L, E] shape."""
    micro = [batches.batch(step * cfg.grad_accum + m) for m in range(cfg.grad_accum)]
    n_targets = sum(b.n_targets for b in micro)  # of the global batch: the same on every rank
    world = ddist.get_world_size()  # sync_gradients averages: undo it for the CE sum
    ce_sum = aux_sum = dropped_sum = 0.0
    losses: dict[str, float] = {}
    device = model.embed_tokens.weight.device
    load = torch.zeros(like_load.shape, device=device)  # [L, E]
    for batch in map(_my_rows, micro):
        if not batch.input_ids.numel():
            continue
        batch = batch.to(device)
        out = model(batch.input_ids, position_ids=batch.position_ids, return_routing=True)
        ce = F.cross_entropy(out.logits.float().flatten(0, 1), batch.labels.flatten(),
                             ignore_index=sft_data.IGNORE_INDEX, reduction="sum")
        (ce / n_targets * world + out.aux_loss / cfg.grad_accum).backward()
        ce_sum += ce.item()
        aux_sum += out.aux_loss.item()
        for name, value in out.losses.items():
            losses[name] = losses.get(name, 0.0) + value.item() / cfg.grad_accum
        routing = out.routing or []
        load += _real_load(routing, batch.real, load.shape[1])
        if routing:
            dropped_sum += float(torch.stack([r.dropped_fraction for r in routing]).mean())
    loss = ddist.reduce_mean(ce_sum) * world / n_targets
    aux = ddist.reduce_mean(aux_sum / cfg.grad_accum)
    load = ddist.all_reduce_sum_(load).cpu()
    losses = {name: ddist.reduce_mean(value) for name, value in losses.items()}
    if math.isfinite(loss) and math.isfinite(aux):
        ddist.sync_gradients(model)
        if cfg.grad_clip > 0:
            ddist.clip_grad_norm_(model, cfg.grad_clip)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(b.n_tokens for b in micro)
    return StepStats(loss, aux, losses, ddist.reduce_mean(dropped_sum) / cfg.grad_accum, load,
                     tokens)


def _finish(model: Transformer, cfg: FinetuneConfig, out: Path, log: MetricsLog,
            probe: tuple[str, list[sft_data.Example]], pad_id: int,
            result: FinetuneResult, quiet: bool) -> None:
    """Routing statistics after finetuning, then the adapter or the finetuned model. On
    every rank for a sharded model (its forward and gathering are collectives), else on
    rank 0 only; rank 0 writes."""
    before = next((r for r in log.read() if r.get("event") == "routing"
                   and r.get("phase") == "before"), None)
    loss, load = evaluate(model, probe[1], cfg.eval_batch_size, pad_id)
    record = routing_record(result.step, "after", probe[0], loss, load, before)
    if ddist.is_fully_sharded(model):
        model = result.model = ddist.gather_model(model)
        if not ddist.is_main_process():
            return
    log.write(record)
    result.probe_loss_before = record.get("probe_loss_before")
    result.load_shift = record.get("load_shift")
    model.eval()
    if lora_modules(model):
        result.output = save_adapter(model, out / "adapter", base_model=cfg.model)
    else:
        result.output = out / "model"
        model.save_pretrained(result.output, tokenizer_dir=out / "tokenizer")
    if not quiet:
        shift = (f", expert load shift {result.load_shift:.3f} (total variation, mean over "
                 "MoE layers)" if record["load_shift_per_layer"] else "")
        before_loss = f" (before: {result.probe_loss_before:.3f})" if before else ""
        train = f"train loss {result.train_loss:.3f}, " if result.train_loss is not None else ""
        print(f"final: {train}{probe[0]} assistant-token loss {loss:.3f}{before_loss}{shift}")
        print(f"{'adapter' if lora_modules(model) else 'model'} written to {result.output}")
