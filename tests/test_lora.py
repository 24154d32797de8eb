"""LoRA modules: stacked expert adapters through the grouped dispatch against a per-expert
loop, identity at init, merge = unmerged adapter, adapter files (PEFT layout) and their
errors, gradients through a quantized base.

Shapes: A assignments sorted by expert, D hidden, F expert width, E experts, r rank.
"""

from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_close, moe_config
from dsmoe.finetune.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, DSMOE_CONFIG, load_adapter,
                                    save_adapter, target_modules_regex)
from dsmoe.finetune.lora import (TARGETS, LoRAExperts, LoRALinear, LoRASettings, apply_lora,
                                 lora_parameters, make_quant_trainable, merge_lora,
                                 parse_targets)
from dsmoe.finetune.qlora import dequantized, quant_matmul
from dsmoe.model import Transformer
from dsmoe.moe.experts import SwiGLUExperts
from dsmoe.quant import quantize_model
from dsmoe.quant.matrix import QuantMatrix

ALL = LoRASettings(r=4, alpha=8.0, targets=TARGETS)


def _model(**overrides) -> Transformer:
    cfg = moe_config(first_k_dense_replace=1, num_hidden_layers=3, vocab_size=96,
                     initializer_range=0.1, **overrides)
    return Transformer(cfg).eval()


def _randomize_adapters(model: torch.nn.Module, std: float = 0.2) -> None:
    """B starts at zero (an identity update); give every adapter tensor values."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def _ids(model: Transformer, B: int = 2, S: int = 12) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (B, S),
                         generator=torch.Generator().manual_seed(2))


def test_expert_lora_grouped_equals_per_expert_loop() -> None:
    E, D, F_, r = 6, 32, 16, 4
    base = SwiGLUExperts(E, D, F_, init_std=0.2)
    experts = LoRAExperts(base, ("gate_proj", "up_proj", "down_proj"), r=r, alpha=8.0)
    _randomize_adapters(experts)
    counts = torch.tensor([3, 0, 5, 1, 0, 4])  # experts 1 and 4 get no rows
    x = torch.randn(int(counts.sum()), D, requires_grad=True)  # [A, D] sorted by expert
    out = experts(x, counts)

    s = experts.gate_proj.scaling

    def delta(pair, e: int) -> torch.Tensor:  # s * B_e A_e [out, in]
        return s * pair.lora_B[e] @ pair.lora_A[e]

    pieces, start = [], 0
    for e, n in enumerate(counts.tolist()):  # the oracle: a plain loop of dense matrices
        rows = x[start:start + n]
        gate_w = base.gate_up_proj[e, :F_] + delta(experts.gate_proj, e)
        up_w = base.gate_up_proj[e, F_:] + delta(experts.up_proj, e)
        down_w = base.down_proj[e] + delta(experts.down_proj, e)
        pieces.append(F.linear(F.silu(F.linear(rows, gate_w)) * F.linear(rows, up_w), down_w))
        start += n
    expected = torch.cat(pieces)
    assert_close(out, expected, atol=1e-5, rtol=1e-5, what="grouped expert LoRA vs loop")

    grads = torch.autograd.grad(out.square().sum(), [x, experts.down_proj.lora_A,
                                                     experts.gate_proj.lora_B])
    ref = torch.autograd.grad(expected.square().sum(), [x, experts.down_proj.lora_A,
                                                        experts.gate_proj.lora_B])
    for got, want, name in zip(grads, ref, ("x", "down lora_A", "gate lora_B")):
        assert_close(got, want, atol=1e-4, rtol=1e-4, what=f"gradient of {name}")
    assert experts.down_proj.lora_A.shape == (E, r, F_)  # stacked [E, r, in]
    assert experts.gate_proj.lora_B.shape == (E, F_, r)  # stacked [E, out, r]


def test_adapters_start_as_identity_and_freeze_the_base() -> None:
    model = _model()
    ids = _ids(model)
    with torch.no_grad():  # (SDPA may pick another CPU kernel for inputs that need grad)
        before = model(ids).logits
    wrapped = apply_lora(model, ALL)
    assert "layers.1.mlp.experts" in wrapped and "layers.1.mlp.gate" in wrapped
    assert "layers.1.mlp.shared_experts.down_proj" in wrapped and "layers.0.mlp.up_proj" in wrapped
    assert isinstance(model.layers[2].self_attn.q_proj, LoRALinear)
    with torch.no_grad():  # B = 0: the same function; only ulps differ (SiLU runs on a
        # contiguous tensor instead of a strided half of gate_up, another vectorised path)
        assert_close(model(ids).logits, before, atol=1e-6, rtol=0, what="identity at init")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_parameters(model)) and trainable


def test_merged_logits_equal_adapter_logits() -> None:
    model = _model()
    apply_lora(model, ALL)
    _randomize_adapters(model)
    ids = _ids(model)
    with torch.no_grad():
        adapted = model(ids).logits
        base_names = set(_model().state_dict())
        merge_lora(model)
        merged = model(ids).logits
    assert set(model.state_dict()) == base_names  # plain modules, HF-savable names
    assert not lora_parameters(model)
    assert (adapted - _model()(ids).logits).abs().max() > 0.1  # the adapter does something
    assert_close(merged, adapted, atol=1e-5, rtol=1e-5, what="merged vs adapter logits")


def _saved_adapter(directory) -> tuple[Transformer, Transformer]:  # noqa: ANN001 - a Path
    """(base, base + every adapter with random values), the adapter saved to ``directory``."""
    torch.manual_seed(3)
    base = _model()
    model = copy.deepcopy(base)
    apply_lora(model, ALL)
    _randomize_adapters(model)
    save_adapter(model, directory, base_model="some/base")
    return base, model


def test_adapter_files_use_peft_layout_and_reload_exactly(tmp_path) -> None:
    base, model = _saved_adapter(tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["base_model_name_or_path"] == "some/base"
    assert "dsmoe" not in config  # PEFT warns about keys it does not know
    ours = json.loads((tmp_path / DSMOE_CONFIG).read_text())
    assert ours["targets"] == list(TARGETS)
    assert set(ours["not_read_by_peft"]) == {"routed experts", "router"}
    with safe_open(tmp_path / ADAPTER_WEIGHTS, framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    E, D, F_ = 8, 32, 16
    p = "base_model.model.model.layers"
    assert shapes[f"{p}.0.self_attn.q_proj.lora_A.weight"] == (4, D)
    assert shapes[f"{p}.0.mlp.down_proj.lora_B.weight"] == (D, 4)  # dense MLP
    assert shapes[f"{p}.1.mlp.shared_experts.gate_proj.lora_B.weight"] == (F_, 4)
    assert shapes[f"{p}.2.mlp.experts.7.down_proj.lora_A.weight"] == (4, F_)  # per expert
    assert shapes[f"{p}.2.mlp.experts.0.up_proj.lora_B.weight"] == (F_, 4)
    assert shapes[f"{p}.1.mlp.gate.lora_B.weight"] == (E, 4)  # router
    assert not any(".experts.8." in k for k in shapes)
    # PEFT full-matches target_modules against the HF module names.
    regex = config["target_modules"]
    for name in ("model.layers.0.self_attn.o_proj", "model.layers.2.mlp.experts.5.gate_proj",
                 "model.layers.0.mlp.up_proj", "model.layers.1.mlp.shared_experts.down_proj"):
        assert re.fullmatch(regex, name), name
    for name in ("lm_head", "model.layers.1.mlp.gate", "model.embed_tokens"):
        assert not re.fullmatch(regex, name), name

    reloaded = copy.deepcopy(base)
    load_adapter(reloaded, tmp_path)
    ids = _ids(base)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_peft_loads_the_config_without_warnings_and_the_attention_lora_exactly(
        tmp_path) -> None:
    """PEFT on a transformers model with the same attention (a tiny Llama): the config loads
    with no "unexpected keyword" warning and the q/v adapters arrive bit for bit."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = _model()
    apply_lora(model, LoRASettings(r=4, alpha=8.0, targets=("q", "v")))
    _randomize_adapters(model)
    save_adapter(model, tmp_path, base_model="tiny")
    assert json.loads((tmp_path / DSMOE_CONFIG).read_text())["not_read_by_peft"] == {}
    c = model.config
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = peft.PeftConfig.from_pretrained(str(tmp_path))
        peft_model = peft.PeftModel.from_pretrained(llama, str(tmp_path))
    about_us = [str(w.message) for w in caught if "nexpected" in str(w.message)
                or "dsmoe" in str(w.message) or "missing" in str(w.message).lower()]
    assert not about_us, about_us
    assert config.r == 4 and config.lora_alpha == 8.0
    loaded = {k.replace(".default", ""): v for k, v in peft_model.state_dict().items()
              if "lora_" in k}
    saved = load_file(tmp_path / ADAPTER_WEIGHTS)
    assert set(loaded) == set(saved)
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key


def test_adapters_written_before_dsmoe_adapter_json_still_load(tmp_path) -> None:
    """Old layout: dsmoe's section inside adapter_config.json under "dsmoe"."""
    base, model = _saved_adapter(tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    config["dsmoe"] = json.loads((tmp_path / DSMOE_CONFIG).read_text())
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps(config))
    (tmp_path / DSMOE_CONFIG).unlink()
    reloaded = copy.deepcopy(base)
    assert load_adapter(reloaded, tmp_path).settings.targets == TARGETS
    ids = _ids(base)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    other = _model(hidden_size=64)  # the old section's base config is still checked
    with pytest.raises(ValueError, match="hidden_size 32 there, 64 here"):
        load_adapter(other, tmp_path)


def test_finetune_output_names_the_parts_peft_does_not_read(tmp_path, capsys,
                                                            monkeypatch) -> None:
    from types import SimpleNamespace

    from dsmoe.cli import main
    from dsmoe.finetune import loop

    model = _model()
    apply_lora(model, LoRASettings(r=2, targets=("q", "gate", "router")))
    save_adapter(model, tmp_path / "adapter", base_model="base")
    monkeypatch.setattr(loop, "finetune", lambda cfg, **kw: SimpleNamespace(
        status="finished", output=tmp_path / "adapter"))
    assert main(["finetune", "base", "--data", "rows.jsonl", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "routed experts LoRA: read by dsmoe, DeepSeek's own modeling code" in out
    assert "router LoRA: read by dsmoe and llama.cpp" in out


def test_target_modules_regex_follows_targets() -> None:
    regex = target_modules_regex(("q", "down"))
    assert re.fullmatch(regex, "model.layers.3.self_attn.q_proj")
    assert re.fullmatch(regex, "model.layers.3.mlp.experts.12.down_proj")
    assert not re.fullmatch(regex, "model.layers.3.self_attn.k_proj")
    assert not re.fullmatch(regex, "model.layers.3.mlp.shared_experts.down_proj")


def test_target_errors() -> None:
    with pytest.raises(ValueError, match=r"unknown LoRA target\(s\) 'ffn'.*q,k,v,o"):
        parse_targets("q,ffn")
    with pytest.raises(ValueError, match="no LoRA targets"):
        parse_targets(" , ")
    dense = Transformer(moe_config(n_routed_experts=None, n_shared_experts=None))
    with pytest.raises(ValueError, match="'router' .*no MoE layers"):
        apply_lora(dense, LoRASettings(targets=("q", "router")))
    no_shared = _model(n_shared_experts=None)
    with pytest.raises(ValueError, match="'shared' .*no shared experts"):
        apply_lora(no_shared, LoRASettings(targets=("shared",)))
    model = _model()
    apply_lora(model, LoRASettings())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, LoRASettings())


def test_adapter_for_another_base_is_refused(tmp_path) -> None:
    model = _model()
    apply_lora(model, LoRASettings(r=2, targets=("q", "gate")))
    save_adapter(model, tmp_path, base_model="tiny-a")
    other = Transformer(moe_config(first_k_dense_replace=1, num_hidden_layers=3, vocab_size=96,
                                   hidden_size=64))
    with pytest.raises(ValueError,
                       match=r"another base model \(tiny-a\): hidden_size 32 there, 64 here"):
        load_adapter(other, tmp_path)
    same_shape = _model()  # same architecture, other weights: applied with a warning
    with pytest.warns(UserWarning, match="different base weights"):
        load_adapter(same_shape, tmp_path)


def test_adapter_with_missing_or_misshapen_tensors_is_refused(tmp_path) -> None:
    model = _model()
    apply_lora(model, LoRASettings(r=2, targets=("q", "down")))
    save_adapter(model, tmp_path, base_model="b")
    with safe_open(tmp_path / ADAPTER_WEIGHTS, framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    gone = "base_model.model.model.layers.2.mlp.experts.3.down_proj.lora_A.weight"
    del tensors[gone]
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.zeros(32, 3)
    save_file(tensors, str(tmp_path / ADAPTER_WEIGHTS))
    with pytest.raises(ValueError) as info, pytest.warns(UserWarning, match="base weights"):
        load_adapter(Transformer(model.config), tmp_path)
    message = str(info.value)
    assert f"missing: {gone}" in message, message
    assert "q_proj.lora_B.weight (expected [32, 2], found [32, 3])" in message, message


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_passes_input_gradients(bits: int) -> None:
    """QuantMatmul: forward = the int kernel, backward = grad @ dequantized weight."""
    torch.manual_seed(0)
    matrix = QuantMatrix(32, 64, bits=bits, group_size=32, stack=(3,))
    matrix.set_float(torch.randn(3, 32, 64) * 0.1)
    for rows in (4, 40):  # int8: the kernel path (<= 16 rows) and the GEMM path
        x = torch.randn(rows, 64, requires_grad=True)
        out = quant_matmul(matrix, x, 1)  # [rows, 32]
        assert_close(out, matrix.matmul(x.detach(), 1), atol=0, rtol=0, what="forward")
        grad_out = torch.randn_like(out)
        (grad_x,) = torch.autograd.grad(out, x, grad_out)
        assert_close(grad_x, grad_out @ dequantized(matrix, 1, torch.float32), atol=1e-5,
                     rtol=1e-5, what=f"int{bits} input gradient ({rows} rows)")
    assert_close(dequantized(matrix, 2, torch.float32), matrix.dequantize()[2], atol=0, rtol=0,
                 what="per-expert dequantization")


@pytest.mark.parametrize("bits", [8, 4])
def test_lora_on_quantized_base_trains_adapters(bits: int) -> None:
    model = _model()
    quantize_model(model, bits=bits, group_size=32)
    ids = _ids(model)
    with torch.no_grad():
        before = model(ids).logits
    apply_lora(model, LoRASettings(r=2, targets=("q", "down")))
    make_quant_trainable(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
    model.train()
    model(ids).logits.logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in lora_parameters(model).items()}
    assert grads and all(g is not None for g in grads.values())
    # B gets a gradient everywhere, also in layer 0, below quantized layers without adapter.
    assert all(g.abs().sum() > 0 for n, g in grads.items() if n.endswith("lora_B")), grads.keys()
    assert not any(p.requires_grad for n, p in model.named_parameters()
                   if n not in grads)
    with pytest.raises(ValueError, match="quantized base"):
        merge_lora(model)
