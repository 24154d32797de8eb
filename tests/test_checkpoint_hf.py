"""HF checkpoint directories: round trips, the real 16B layout, sharding, atomic writes and
errors that name the problem.

Round trips are bit-exact (``torch.equal``, byte-identical files): saving and loading only
move bytes, nothing is recomputed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import reference_file
from dsmoe import ModelConfig
from dsmoe.checkpoint import hf
from dsmoe.model import Transformer


SMALL = ModelConfig.preset("tiny").replace(
    vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, n_routed_experts=8,
    num_experts_per_tok=2, n_shared_experts=1, attention_bias=True)


def _model(cfg: ModelConfig = SMALL, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def _ids(cfg: ModelConfig = SMALL) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))


def _assert_same_model(a: Transformer, b: Transformer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert sa[name].dtype == sb[name].dtype, name
        assert torch.equal(sa[name], sb[name]), f"{name} differs"
    ids = _ids(a.config)
    assert torch.equal(a(ids).logits, b(ids).logits), "logits are not bit-identical"


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --- round trips -----------------------------------------------------------------------------
def test_save_load_is_bit_exact_and_save_again_is_byte_identical(tmp_path: Path) -> None:
    model = _model()
    model.save_pretrained(tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == ["config.json", "model.safetensors"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "a").stat().st_mode & 0o777 == 0o777 & ~umask, "not mkdtemp's 0700"
    assert (tmp_path / "a" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    loaded = Transformer.from_pretrained(tmp_path / "a")
    assert not loaded.training, "from_pretrained returns an eval-mode model"
    _assert_same_model(model, loaded)
    loaded.save_pretrained(tmp_path / "b")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["model_type"] == "deepseek" and config["torch_dtype"] == "float32"
    assert ModelConfig.from_hf(config) == SMALL


@pytest.mark.parametrize("cfg", [
    SMALL.replace(tie_word_embeddings=True),
    SMALL.replace(n_routed_experts=None, n_shared_experts=None, num_experts_per_tok=None),
    SMALL.replace(scoring_func="sigmoid", topk_method="noaux_tc", n_group=2, topk_group=1,
                  norm_topk_prob=True, bias_update_speed=0.01),
], ids=["tied", "dense", "v3_bias"])
def test_round_trip_variants(cfg: ModelConfig, tmp_path: Path) -> None:
    model = _model(cfg)
    if cfg.uses_bias_balancing:  # give the persistent fp32 bias non-trivial values
        for layer in model.moe_layers():
            layer.gate.e_score_correction_bias.normal_(std=0.1)
    model.save_pretrained(tmp_path / "m")
    stored = load_file(tmp_path / "m" / "model.safetensors")
    assert ("lm_head.weight" in stored) == (not cfg.tie_word_embeddings)
    loaded = Transformer.from_pretrained(tmp_path / "m")
    _assert_same_model(model, loaded)
    if cfg.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_load_casts_to_dtype_but_keeps_fp32_buffers(tmp_path: Path) -> None:
    cfg = SMALL.replace(scoring_func="sigmoid", topk_method="noaux_tc", n_group=2,
                        topk_group=1, bias_update_speed=0.01)
    model = _model(cfg)
    model.save_pretrained(tmp_path / "m")
    bf16 = Transformer.from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert bf16.embed_tokens.weight.dtype == torch.bfloat16
    assert bf16.moe_layers()[0].experts.gate_up_proj.dtype == torch.bfloat16
    assert bf16.moe_layers()[0].gate.e_score_correction_bias.dtype == torch.float32
    assert bf16.rotary.inv_freq.dtype == torch.float32
    fresh = Transformer(cfg).moe_layers()[0].load_counts
    assert bf16.moe_layers()[0].load_counts.dtype == fresh.dtype, "buffers keep their dtype"
    torch.testing.assert_close(bf16.layers[0].self_attn.q_proj.weight,
                               model.layers[0].self_attn.q_proj.weight.bfloat16(), atol=0, rtol=0)
    bf16.save_pretrained(tmp_path / "bf16")
    again = Transformer.from_pretrained(tmp_path / "bf16", dtype=None)  # keep stored dtype
    assert again.embed_tokens.weight.dtype == torch.bfloat16
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _assert_same_model(bf16, again)


def test_sharded_save_and_load(tmp_path: Path) -> None:
    model = _model()
    limit = 40_000
    model.save_pretrained(tmp_path / "m", max_shard_size=limit)
    index = json.loads((tmp_path / "m" / hf.INDEX_NAME).read_text())
    shards = sorted(p for p in os.listdir(tmp_path / "m") if p.startswith("model-"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert sorted(set(index["weight_map"].values())) == shards
    sizes = {name: t.numel() * t.element_size() for shard in shards
             for name, t in load_file(tmp_path / "m" / shard).items()}
    assert set(sizes) == set(index["weight_map"]) == set(hf.hf_shapes(model))
    assert index["metadata"]["total_size"] == sum(sizes.values())
    for shard in shards:  # a shard exceeds the limit only when it holds one big tensor
        tensors = load_file(tmp_path / "m" / shard)
        assert len(tensors) == 1 or sum(t.numel() * 4 for t in tensors.values()) <= limit
    loaded = Transformer.from_pretrained(tmp_path / "m")
    _assert_same_model(model, loaded)
    # re-saving unsharded into the same directory removes the stale shards and index
    loaded.save_pretrained(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "model.safetensors"]
    _assert_same_model(model, Transformer.from_pretrained(tmp_path / "m"))


# --- the real deepseek-moe-16b layout -------------------------------------------------------
def _tiny_16b(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """The real config.json and tensors.json with every width shrunk (same names, same 28
    layers and 64 experts): written directly, not by dsmoe."""
    config = json.loads(reference_file("deepseek-moe-16b-base", "config.json").read_text())
    real = json.loads(reference_file("deepseek-moe-16b-base", "tensors.json").read_text())
    sizes = {"hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 8,
             "vocab_size": 64}
    width = {config[k]: v for k, v in sizes.items()}
    width[config["moe_intermediate_size"] * config["n_shared_experts"]] = 8 * config["n_shared_experts"]
    config.update(sizes)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn([width.get(d, d) for d in shape], generator=gen) * 0.1
                      ).to(torch.bfloat16) for name, shape in real.items()}
    directory = tmp_path / "deepseek-moe-16b-tiny"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory, tensors, config


def test_directory_with_real_16b_names_loads_and_saves_the_same_names(tmp_path: Path) -> None:
    directory, tensors, config = _tiny_16b(tmp_path)
    model = Transformer.from_pretrained(directory, dtype=None)
    assert len(model.layers) == 28 and len(model.moe_layers()) == 27
    expert_5 = model.moe_layers()[0].experts  # layer 1, expert 5: gate rows, then up rows
    F = config["moe_intermediate_size"]
    assert torch.equal(expert_5.gate_up_proj[5, :F], tensors["model.layers.1.mlp.experts.5.gate_proj.weight"])
    assert torch.equal(expert_5.gate_up_proj[5, F:], tensors["model.layers.1.mlp.experts.5.up_proj.weight"])
    assert torch.equal(expert_5.down_proj[5], tensors["model.layers.1.mlp.experts.5.down_proj.weight"])
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()

    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert set(saved) == set(tensors), "names differ from tensors.json"
    for name, tensor in tensors.items():
        assert torch.equal(saved[name], tensor), name
    assert json.loads((tmp_path / "saved" / "config.json").read_text()) == config


# --- tokenizer files and atomic writes ----------------------------------------------------------
def test_tokenizer_files_are_copied(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"model": {}}')
    (tok / "tokenizer_config.json").write_text('{"bos_token": "<s>"}')
    _model().save_pretrained(tmp_path / "m", tokenizer_dir=tok)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "m" / name).read_bytes() == (tok / name).read_bytes()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        _model().save_pretrained(tmp_path / "m2", tokenizer_dir=tmp_path / "empty")
    assert not (tmp_path / "m2").exists()


def test_failed_save_leaves_existing_directory_untouched(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _model(seed=0).save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "notes.txt").write_text("user file")
    before = _files(tmp_path / "m")

    def broken_save_file(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(hf, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        _model(seed=1).save_pretrained(tmp_path / "m")
    assert _files(tmp_path / "m") == before
    assert sorted(os.listdir(tmp_path)) == ["m"], "temporary directory left behind"
    monkeypatch.undo()
    _model(seed=1).save_pretrained(tmp_path / "m")  # a successful save keeps other files
    assert (tmp_path / "m" / "notes.txt").read_text() == "user file"
    assert _files(tmp_path / "m")["model.safetensors"] != before["model.safetensors"]


# --- errors --------------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> Path:
    _model().save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def _rewrite_weights(directory: Path, edit) -> None:  # noqa: ANN001 - a dict -> None callable
    tensors = load_file(directory / "model.safetensors")
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensors_are_listed(saved: Path) -> None:
    def drop(t: dict) -> None:
        del t["model.layers.1.mlp.experts.3.up_proj.weight"], t["model.norm.weight"]
    _rewrite_weights(saved, drop)
    with pytest.raises(ValueError, match=r"missing tensors: .*model\.layers\.1\.mlp\.experts\.3"
                                         r"\.up_proj\.weight.*model\.norm\.weight"):
        Transformer.from_pretrained(saved)


def test_unexpected_tensors_are_listed(saved: Path) -> None:
    def add(t: dict) -> None:
        t["model.layers.1.mlp.experts.8.up_proj.weight"] = torch.zeros(16, 32)
        t["model.extra.weight"] = torch.zeros(2)
    _rewrite_weights(saved, add)
    with pytest.raises(ValueError, match=r"unexpected tensors: .*experts\.8\.up_proj"):
        Transformer.from_pretrained(saved)


def test_shape_mismatch_names_tensor_expected_and_found(saved: Path) -> None:
    def reshape(t: dict) -> None:
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 32)
    _rewrite_weights(saved, reshape)
    with pytest.raises(ValueError, match=r"shape mismatch: model\.layers\.0\.self_attn\.k_proj"
                                         r"\.weight \(expected \[16, 32\], found \[32, 32\]\)"):
        Transformer.from_pretrained(saved)


def test_unsupported_stored_dtype_is_named(saved: Path) -> None:
    def quantize(t: dict) -> None:
        t["model.norm.weight"] = torch.zeros(32, dtype=torch.int8)
    _rewrite_weights(saved, quantize)
    with pytest.raises(ValueError, match=r"unsupported stored dtype: model\.norm\.weight \(I8\)"):
        Transformer.from_pretrained(saved)


@pytest.mark.parametrize("dtype", [torch.int8, "float8", torch.complex64])
def test_unsupported_requested_dtype(saved: Path, dtype: object) -> None:
    with pytest.raises(ValueError, match="unsupported dtype"):
        Transformer.from_pretrained(saved, dtype=dtype)


@pytest.mark.parametrize("model_type", ["llama", "mixtral", None])
def test_model_type_must_be_deepseek(saved: Path, model_type: str | None) -> None:
    config = json.loads((saved / "config.json").read_text())
    config["model_type"] = model_type
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"model_type {model_type!r} is not supported"):
        Transformer.from_pretrained(saved)


def test_v1_weights_under_a_v2_config_name_the_missing_mla_tensors(saved: Path) -> None:
    """deepseek_v2 means MLA (transformers' default sizes when the keys are absent): V1's
    q/k/v projections do not fit it, and the error says which tensors are missing."""
    config = json.loads((saved / "config.json").read_text())
    config["model_type"] = "deepseek_v2"
    config["num_key_value_heads"] = config["num_attention_heads"]  # MLA's requirement
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing tensors: .*kv_a_proj_with_mqa"):
        Transformer.from_pretrained(saved)


def test_truncated_and_corrupted_files_are_named(saved: Path) -> None:
    weights = saved / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read safetensors file "
                                         r"\(truncated or corrupted\?\)"):
        Transformer.from_pretrained(saved)
    weights.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read"):
        Transformer.from_pretrained(saved)


def test_missing_files_are_named(saved: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Transformer.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        Transformer.from_pretrained(saved / "config.json")
    (saved / "model.safetensors").rename(tmp_path / "elsewhere.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or model.safetensors.index"):
        Transformer.from_pretrained(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json not found"):
        Transformer.from_pretrained(saved)


def test_missing_shard_and_bad_config_json(tmp_path: Path) -> None:
    _model().save_pretrained(tmp_path / "m", max_shard_size=40_000)
    index = json.loads((tmp_path / "m" / hf.INDEX_NAME).read_text())
    second = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "m" / second).unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {second} listed in"):
        Transformer.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        Transformer.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors",
                                   "..", 7])
def test_a_shard_index_may_only_name_files_beside_it(tmp_path: Path, shard: object) -> None:
    _model().save_pretrained(tmp_path / "m", max_shard_size=40_000)
    first = sorted((tmp_path / "m").glob("model-*"))[0]  # a real shard, outside the directory
    (tmp_path / "outside.safetensors").write_bytes(first.read_bytes())
    path = tmp_path / "m" / hf.INDEX_NAME
    index = json.loads(path.read_text())
    index["weight_map"]["model.embed_tokens.weight"] = shard
    path.write_text(json.dumps(index))
    match = "is not a file in" if isinstance(shard, str) else "must map tensor names to file"
    with pytest.raises(ValueError, match=f"{hf.INDEX_NAME}: .*{match}"):
        Transformer.from_pretrained(tmp_path / "m")


# --- one load / save for every format ----------------------------------------------------------
def test_one_load_chooses_the_format_and_model_imports_no_io(tmp_path: Path) -> None:
    """``dsmoe.checkpoint.load`` reads an HF directory, a GGUF and a quantized directory
    (``from_pretrained`` is the same call); importing the model pulls in none of them."""
    import subprocess

    from dsmoe.checkpoint import load, save
    from dsmoe.checkpoint.gguf import write_model_gguf
    from dsmoe.quant import quantize_model

    model = _model()
    save(model, tmp_path / "hf")
    write_model_gguf(model, tmp_path / "m.gguf", quant="f32")
    quantized = quantize_model(_model(), 8)
    save(quantized, tmp_path / "q")
    ids = _ids()
    assert torch.equal(load(tmp_path / "hf")(ids).logits, model(ids).logits)
    gguf = Transformer.from_pretrained(tmp_path / "m.gguf", dtype="bf16")
    assert gguf.embed_tokens.weight.dtype == torch.bfloat16, "dtype names are resolved"
    assert torch.equal(load(tmp_path / "m.gguf")(ids).logits, model(ids).logits)
    # SMALL has attention biases, which quantized checkpoints used to leave out
    assert torch.equal(load(tmp_path / "q")(ids).logits, quantized(ids).logits)
    assert Transformer.from_pretrained(tmp_path / "q").quant_config.bits == 8
    code = ("import sys, dsmoe.model; print(sorted(m for m in sys.modules if m.startswith("
            "('dsmoe.checkpoint.', 'dsmoe.quant', 'dsmoe.generate'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "['dsmoe.checkpoint.keys']", loaded  # the MoE layer's key mapping only


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_loading_releases_each_groups_file_mapping_before_reading_the_next(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Peak memory is the weights plus one layer: when a group is read, no earlier group's
    memory map of the file is still alive (and none is once the model is loaded)."""
    _model().save_pretrained(tmp_path / "m")
    read_group = hf._read_group
    live = []

    def mapped_files() -> int:
        return sum(str(tmp_path / "m") in line for line in
                   Path("/proc/self/maps").read_text().splitlines())

    def counting(names, stored):  # noqa: ANN001, ANN202 - hf._read_group's signature
        live.append(mapped_files())
        return read_group(names, stored)

    monkeypatch.setattr(hf, "_read_group", counting)
    Transformer.from_pretrained(tmp_path / "m")
    assert len(live) == SMALL.num_hidden_layers + 1 and set(live) == {0}, live
    assert mapped_files() == 0
