"""Supervised finetuning end to end on a tiny model and a tiny task (answer a fixed word ->
word mapping): loss masks, data errors, LoRA learns with the base bit-identical, routing
statistics, exact resume after an interrupt, full finetuning with frozen parts, QLoRA, and
the finetune / merge / generate --adapter commands."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import assert_close
from dsmoe.cli import main
from dsmoe.config import ModelConfig
from dsmoe.finetune import loop, sft_data
from dsmoe.finetune.adapter import load_adapter
from dsmoe.finetune.config import FinetuneConfig
from dsmoe.model import Transformer
from dsmoe.tokenizer import Tokenizer

WORDS = ["apple", "river", "stone", "cloud", "tiger", "piano", "lemon", "candle"]
ANSWERS = ["north", "seven", "blue", "quiet", "round", "early", "green", "ninety"]


def _save_base(path: Path, tok: Path, **overrides) -> None:
    tokenizer = Tokenizer.from_file(tok)
    cfg = ModelConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        first_k_dense_replace=1, max_position_embeddings=128, aux_loss_alpha=0.01,
        seq_aux=False, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id,
        # 0.1, not 0.02: a frozen lm_head of std 0.02 caps every logit near 1, so no adapter
        # could make one answer likely (a real base has trained, larger weights).
        initializer_range=0.1, torch_dtype="float32").replace(**overrides)
    torch.manual_seed(0)
    Transformer(cfg).save_pretrained(path, tokenizer_dir=tok)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    """A random 2-layer MoE base (dense layer + 8-expert layer) with a BPE tokenizer, and
    the mapping as jsonl in both row formats."""
    root = tmp_path_factory.mktemp("sft")
    texts = [f"User: what is the code for {w}?\n\nAssistant: {a}" for w, a in
             zip(WORDS, ANSWERS)] * 4
    tokenizer = Tokenizer.train_bpe(texts, 300)
    tokenizer.save(root / "tok")
    _save_base(root / "base", root / "tok")
    rows = []
    for i, (w, a) in enumerate(zip(WORDS * 2, ANSWERS * 2)):
        question = f"what is the code for {w}?"
        rows.append({"prompt": question, "completion": a} if i % 2 else
                    {"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": a}]})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "base": root / "base", "data": root / "data.jsonl"}


def _cfg(task: dict[str, Path], out: Path, **kw) -> FinetuneConfig:
    # The task is memorising the mapping, so the validation rows are the training rows.
    base = dict(model=str(task["base"]), data=str(task["data"]), val_data=str(task["data"]),
                out=str(out), max_steps=40, batch_size=8, lr=1e-2, warmup_steps=4,
                lora_dropout=0.0, log_every=5, eval_every=20, checkpoint_every=20)
    base.update(kw)
    return FinetuneConfig(**base)


def _base_state(task: dict[str, Path]) -> dict[str, torch.Tensor]:
    return Transformer.from_pretrained(task["base"]).state_dict()


# --- data ---------------------------------------------------------------------------------
def test_only_assistant_tokens_carry_loss(task) -> None:
    tokenizer = Tokenizer.from_file(task["base"])
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": "what is the code for stone?"},
                {"role": "assistant", "content": "blue"},
                {"role": "user", "content": "and river?"},
                {"role": "assistant", "content": "seven"}]
    ex = sft_data.encode_example(tokenizer, messages)
    # Ids are the chat format's; the targets are each reply from where generation starts.
    assert tokenizer.decode(list(ex.ids), skip_special_tokens=False) == \
        tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    eos = tokenizer.eos_token
    picked = [tokenizer.decode([i], skip_special_tokens=False)
              for i, t in zip(ex.ids, ex.targets) if t]
    assert "".join(picked) == f" blue{eos} seven{eos}"
    # The prompt the targets follow is exactly what generation is prompted with.
    first = ex.targets.index(True)
    assert list(ex.ids[:first]) == tokenizer.encode_chat(messages[:2])

    short = sft_data.encode_example(tokenizer, [{"role": "user", "content": "hi"},
                                                {"role": "assistant", "content": "yo"}])
    batch = sft_data.collate([ex, short], [[0], [1]], pad_id=tokenizer.pad_id)
    assert batch.input_ids.shape == (2, len(ex.ids) - 1)
    for b, example in enumerate((ex, short)):
        n = len(example.ids) - 1
        expected = [example.ids[t + 1] if example.targets[t + 1] else sft_data.IGNORE_INDEX
                    for t in range(n)]
        assert batch.labels[b, :n].tolist() == expected
        assert (batch.labels[b, n:] == sft_data.IGNORE_INDEX).all()  # padding: no loss
        assert batch.real[b].sum() == n
    assert batch.n_targets == ex.n_targets + short.n_targets


def test_packing_keeps_every_example_once(task) -> None:
    tokenizer = Tokenizer.from_file(task["base"])
    data = sft_data.load_sft_data(task["data"], tokenizer, 64, val_fraction=0.0)
    batches = sft_data.SFTBatches(data.train, 2, seed=0, pad_id=tokenizer.pad_id,
                                  packing=True, max_len=64)
    assert sorted(i for row in batches.rows for i in row) == list(range(len(data.train)))
    assert all(sum(len(data.train[i].ids) for i in row) <= 64 for row in batches.rows)
    batch = batches.batch(0)
    total = sum(data.train[i].n_targets for r in batches._epoch_batches(0)[0]
                for i in batches.rows[r])
    assert batch.n_targets == total and batch.position_ids is not None
    assert batch.position_ids[0, 0] == 0 and batches.batch(0).labels.equal(batch.labels)


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not valid JSON"),
    ('{"text": "hello"}', "line 2: a row needs 'messages'.*or 'prompt' and 'completion'; "
                          "found keys \\['text'\\]"),
    ('{"prompt": "hi"}', "line 2: has prompt but no 'completion'"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: no assistant message"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "line 2: message 0 has role 'bot'"),
    ('{"messages": [{"role": "user"}]}', "line 2: message 0 needs 'role' and 'content'"),
    ('[1, 2]', "line 2: expected a JSON object"),
])
def test_bad_rows_name_their_line(tmp_path, task, line, message) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n' + line + "\n")
    tokenizer = Tokenizer.from_file(task["base"])
    with pytest.raises(ValueError, match=message):
        sft_data.load_sft_data(path, tokenizer, 64)


# --- LoRA ---------------------------------------------------------------------------------
def test_lora_learns_the_mapping_and_keeps_the_base(task, tmp_path) -> None:
    cfg = _cfg(task, tmp_path / "run", targets=("q", "k", "v", "o", "gate", "up", "down",
                                                "router", "shared"))
    result = loop.finetune(cfg, quiet=True)
    assert result.status == "finished" and result.step == 40
    assert result.val_loss < 0.25 * result.probe_loss_before, (result.val_loss,
                                                               result.probe_loss_before)
    model = result.model
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    # Every base tensor (weights and buffers, under their wrapped names) is bit-identical.
    base = _base_state(task)
    current = {n.replace(".base_layer", "").replace("parametrizations.weight.original",
                                                    "weight"): t
               for n, t in model.state_dict().items() if ".lora_" not in n}
    assert current.keys() == base.keys()
    for name, tensor in base.items():
        assert torch.equal(current[name], tensor), name

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text()
               .splitlines()]
    routing = [r for r in records if r.get("event") == "routing"]
    assert [r["phase"] for r in routing] == ["before", "after"]
    before, after = routing
    assert len(after["expert_load"]) == 1 and len(after["expert_load"][0]) == 8
    assert sum(before["expert_load"][0]) == sum(after["expert_load"][0])  # same tokens, top-2
    p = torch.tensor(before["expert_load"][0], dtype=torch.float64)
    q = torch.tensor(after["expert_load"][0], dtype=torch.float64)
    shift = 0.5 * (p / p.sum() - q / q.sum()).abs().sum().item()
    assert after["load_shift"] == pytest.approx(shift) and shift > 0
    steps = [r["step"] for r in records if "train_loss" in r]
    assert steps == [5, 10, 15, 20, 25, 30, 35, 40]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()

    # The saved adapter on a fresh base reproduces the trained model.
    fresh = Transformer.from_pretrained(task["base"])
    load_adapter(fresh, result.output)
    ids = torch.randint(0, fresh.config.vocab_size, (2, 10))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_resume_after_interrupt_is_exact(task, tmp_path, monkeypatch) -> None:
    kw = dict(max_steps=12, log_every=1, eval_every=4, checkpoint_every=100, lora_dropout=0.1)
    whole = loop.finetune(_cfg(task, tmp_path / "whole", **kw), quiet=True)

    real_step, calls = loop._train_step, []

    def interrupted_step(*args, **kwargs):  # Ctrl-C arrives during the 5th step
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", interrupted_step)
    first = loop.finetune(_cfg(task, tmp_path / "split", **kw), quiet=True)
    assert first.status == "interrupted" and first.step == 5
    monkeypatch.setattr(loop, "_train_step", real_step)
    with pytest.raises(ValueError, match="--resume"):
        loop.finetune(_cfg(task, tmp_path / "split", **kw), quiet=True)
    second = loop.finetune(_cfg(task, tmp_path / "split", **kw), resume=True, quiet=True)
    assert second.status == "finished" and second.step == 12

    def losses(run: str) -> list[tuple]:
        records = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text()
                   .splitlines()]
        return [(r["step"], r.get("train_loss"), r.get("val_loss"), r.get("probe_loss"),
                 r.get("expert_load")) for r in records]

    assert losses("split") == losses("whole")
    for name, p in whole.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, dict(second.model.named_parameters())[name]), name


def test_resume_refuses_changed_data(task, tmp_path) -> None:
    loop.finetune(_cfg(task, tmp_path / "run", max_steps=2), quiet=True)
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" +
                     json.dumps({"prompt": "c", "completion": "d"}) + "\n")
    with pytest.raises(ValueError, match="data changed"):
        loop.finetune(_cfg(task, tmp_path / "run", data=str(other), val_data=None,
                           max_steps=4), resume=True, quiet=True)


# --- full finetuning and QLoRA ------------------------------------------------------------
def test_full_finetuning_with_frozen_router_and_experts(task, tmp_path) -> None:
    cfg = _cfg(task, tmp_path / "full", full=True, freeze_router=True, freeze_experts=True,
               max_steps=6, lr=1e-3)
    result = loop.finetune(cfg, quiet=True)
    base, after = _base_state(task), result.model.state_dict()
    frozen = [n for n in base if ".mlp.gate." in n or ".mlp.experts." in n]
    assert frozen
    for name in base:
        assert torch.equal(after[name], base[name]) == (name in frozen), name
    exported = Transformer.from_pretrained(tmp_path / "full" / "model")
    ids = torch.randint(0, exported.config.vocab_size, (2, 10))
    result.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, result.model(ids).logits, atol=0, rtol=0)
    assert result.val_loss < result.probe_loss_before


def test_qlora_int8_base_learns(task, tmp_path) -> None:
    result = loop.finetune(_cfg(task, tmp_path / "q", quant="int8", max_steps=20), quiet=True)
    assert result.val_loss < 0.6 * result.probe_loss_before
    from dsmoe.quant import QuantLinear
    assert isinstance(result.model.layers[0].self_attn.q_proj.base_layer, QuantLinear)


def test_config_errors(task) -> None:
    with pytest.raises(ValueError, match="cannot be combined with --full"):
        FinetuneConfig(model="m", data="d", full=True, quant="int8")
    with pytest.raises(ValueError, match="apply to --full"):
        FinetuneConfig(model="m", data="d", freeze_router=True)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        FinetuneConfig(model="m", data="d", targets=("q", "mlp"))


# --- commands -----------------------------------------------------------------------------
def test_finetune_merge_and_generate_commands(task, tmp_path, capsys) -> None:
    out = tmp_path / "cli"
    assert main(["finetune", str(task["base"]), "--data", str(task["data"]), "--out", str(out),
                 "--max-steps", "30", "--lr", "1e-2", "--batch-size", "8", "--lora-r", "8",
                 "--lora-dropout", "0", "--targets", "q,v,o,gate,up,down", "--quiet"]) == 0
    assert main(["merge", str(task["base"]), str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = Transformer.from_pretrained(tmp_path / "merged")
    adapted = Transformer.from_pretrained(task["base"])
    load_adapter(adapted, out / "adapter")
    ids = torch.randint(0, merged.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert_close(merged(ids).logits, adapted(ids).logits, atol=1e-5, rtol=1e-5,
                     what="merged checkpoint vs adapter")
    capsys.readouterr()
    prompt = ["--prompt", "what is the code for stone?", "--chat", "--max-new-tokens", "6"]
    assert main(["generate", str(task["base"]), "--adapter", str(out), *prompt]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", str(tmp_path / "merged"), *prompt]) == 0
    assert capsys.readouterr().out == with_adapter

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"question": "x"}\n')
    assert main(["finetune", str(task["base"]), "--data", str(bad), "--out",
                 str(tmp_path / "bad"), "--quiet"]) == 2
    assert "bad.jsonl line 2: a row needs 'messages'" in capsys.readouterr().err
    assert main(["finetune", str(task["base"]), "--data", str(task["data"]), "--targets",
                 "q,experts", "--out", str(tmp_path / "t"), "--quiet"]) == 2
    assert "unknown LoRA target(s) 'experts'" in capsys.readouterr().err


@pytest.mark.slow
def test_nproc_2_gives_the_losses_of_one_process(task, tmp_path) -> None:
    """`dsmoe finetune --nproc 2`: each rank trains on half of every batch; the per-step
    losses and the adapter equal one process's. The batch-level balance loss is off: it is
    computed per rank (not over the data-parallel group), so it would differ slightly."""
    base = tmp_path / "base"
    _save_base(base, task["root"] / "tok", aux_loss_alpha=0.0)
    common = [str(base), "--data", str(task["data"]), "--max-steps", "4", "--lr", "1e-2",
              "--batch-size", "8", "--lora-dropout", "0", "--log-every", "1", "--quiet",
              "--targets", "q,v,gate,up,down,shared,router"]
    assert main(["finetune", *common, "--out", str(tmp_path / "one")]) == 0
    assert main(["finetune", *common, "--out", str(tmp_path / "two"), "--nproc", "2"]) == 0

    def losses(run: str) -> list[tuple[int, float]]:
        return [(r["step"], r["train_loss"]) for r in map(
            json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
            if "train_loss" in r]

    one, two = losses("one"), losses("two")
    assert [s for s, _ in one] == [s for s, _ in two] == [1, 2, 3, 4]
    for (_, x), (_, y) in zip(one, two):
        assert y == pytest.approx(x, rel=1e-5), (one, two)
    a, b = Transformer.from_pretrained(base), Transformer.from_pretrained(base)
    load_adapter(a, tmp_path / "one" / "adapter")
    load_adapter(b, tmp_path / "two" / "adapter")
    ids = torch.randint(0, a.config.vocab_size, (2, 10))
    with torch.no_grad():
        assert_close(b(ids).logits, a(ids).logits, atol=1e-5, rtol=1e-4, what="adapters")


def test_non_utf8_rows_name_their_line(tmp_path, task) -> None:
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "a", "completion": "b"}\n{"prompt": "caf\xe9", '
                     b'"completion": "x"}\n')
    with pytest.raises(ValueError, match=r"latin.jsonl line 2: not UTF-8 text \(byte 16"):
        sft_data.read_rows(path)


def test_resume_refuses_changed_settings_and_allows_more_steps(task, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    loop.finetune(_cfg(task, out, max_steps=2, checkpoint_every=1), quiet=True)
    with pytest.raises(ValueError, match="--resume: --lora-r was 8 when this run started, "
                                         "now 4"):
        loop.finetune(_cfg(task, out, max_steps=2, lora_r=4), resume=True)
    more = loop.finetune(_cfg(task, out, max_steps=3), resume=True)
    assert more.step == 3 and "resume: max_steps 2 -> 3" in capsys.readouterr().out
