"""Every model directory and file dsmoe writes: read by real third-party clients
(transformers' ``AutoConfig``/``AutoTokenizer``), with plain-file modes, and replaced
atomically when it already exists.

Directories: ``save_pretrained``, ``dsmoe train``'s exported model, ``dsmoe merge``,
``dsmoe quantize``, ``dsmoe export --format hf`` (from a GGUF). Files: GGUF, adapters.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from dsmoe import ModelConfig
from dsmoe.cli import main as cli
from dsmoe.finetune.adapter import save_adapter
from dsmoe.finetune.lora import LoRASettings, apply_lora
from dsmoe.model import Transformer
from dsmoe.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = ["def add(a, b):\n    return a + b\n", "hello world, some text to learn from\n",
         "import os\nprint(os.getcwd())\n"] * 4


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny float model directory with a BPE tokenizer (written by save_pretrained)."""
    root = tmp_path_factory.mktemp("dirs")
    tokenizer = Tokenizer.train_bpe(TEXTS, vocab_size=300)
    tokenizer.save(root / "tok")
    cfg = ModelConfig.preset("tiny").replace(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
        moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    Transformer(cfg).save_pretrained(root / "base", tokenizer_dir=root / "tok")
    return root / "base"


def _register_deepseek_config() -> None:
    """What DeepSeek's ``configuration_deepseek.py`` does through ``trust_remote_code``:
    transformers itself has no "deepseek" model type."""
    class DeepseekConfig(transformers.PretrainedConfig):
        model_type = "deepseek"

    transformers.AutoConfig.register("deepseek", DeepseekConfig, exist_ok=True)


def _check_with_transformers(directory: Path) -> None:
    data = json.loads((directory / "config.json").read_text())
    assert "auto_map" not in data, "a null auto_map breaks AutoConfig and AutoTokenizer"
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    text = "def add(a, b): hello world"
    assert tokenizer(text)["input_ids"] == Tokenizer.from_file(directory).encode(text)
    _register_deepseek_config()
    config = transformers.AutoConfig.from_pretrained(directory)
    assert (config.hidden_size, config.n_routed_experts) == (data["hidden_size"],
                                                             data["n_routed_experts"])


def test_save_pretrained_directory_loads_in_transformers(base: Path) -> None:
    _check_with_transformers(base)


def test_quantized_directory_loads_in_transformers(base: Path, tmp_path: Path) -> None:
    assert cli(["quantize", str(base), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    _check_with_transformers(tmp_path / "q")


def test_merged_directory_loads_in_transformers(base: Path, tmp_path: Path) -> None:
    model = Transformer.from_pretrained(base)
    apply_lora(model, LoRASettings(r=2, targets=("q", "v", "gate")))
    save_adapter(model, tmp_path / "adapter", base_model=str(base))
    assert cli(["merge", str(base), str(tmp_path / "adapter"), "--out",
                str(tmp_path / "merged")]) == 0
    _check_with_transformers(tmp_path / "merged")


def test_hf_export_of_a_gguf_loads_in_transformers(base: Path, tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    assert cli(["export", str(base), "--format", "gguf", "--quant", "f32", "--out", str(gguf)]) == 0
    assert cli(["export", str(gguf), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    _check_with_transformers(tmp_path / "hf")


def test_trained_model_directory_loads_in_transformers(tmp_path: Path) -> None:
    from dsmoe.train import loop
    from dsmoe.train.config import TrainConfig

    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        (data / f"f{i}.py").write_text("".join(TEXTS) * 20)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "c"),
                      max_steps=2, batch_size=2, seq_len=16, log_every=1, eval_every=2,
                      eval_batches=1, checkpoint_every=2, warmup_steps=1, samples=0,
                      overrides=("hidden_size=32", "num_attention_heads=2",
                                 "num_key_value_heads=2", "moe_intermediate_size=16",
                                 "intermediate_size=64", "num_hidden_layers=2",
                                 "max_position_embeddings=32"))
    assert loop.train(cfg, quiet=True).status == "finished"
    _check_with_transformers(tmp_path / "run" / "model")


# --- file modes --------------------------------------------------------------------------------
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_every_written_file_has_a_plain_files_mode(base: Path, tmp_path: Path,
                                                   umask_022: None) -> None:
    model = Transformer.from_pretrained(base)
    model.save_pretrained(tmp_path / "hf", tokenizer_dir=base)
    assert _mode(tmp_path / "hf") == 0o755
    for file in (tmp_path / "hf").iterdir():
        assert _mode(file) == 0o644, file.name
    assert cli(["export", str(base), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert _mode(tmp_path / "m.gguf") == 0o644
    Tokenizer.from_file(base).save(tmp_path / "tok")  # e.g. a training run's tokenizer/
    for file in (tmp_path / "tok").iterdir():
        assert _mode(file) == 0o644, file.name
    apply_lora(model, LoRASettings(r=2, targets=("q",)))
    save_adapter(model, tmp_path / "adapter", base_model="base")
    for file in (tmp_path / "adapter").iterdir():
        assert _mode(file) == 0o644, file.name


# --- replacing an existing directory ------------------------------------------------------------
def _state(directory: Path) -> dict[str, torch.Tensor]:
    return Transformer.from_pretrained(directory).state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def _leftovers(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def test_replacing_a_model_drops_its_files_and_keeps_foreign_ones(base: Path,
                                                                 tmp_path: Path) -> None:
    target = tmp_path / "m"
    old = Transformer.from_pretrained(base)
    old.save_pretrained(target, tokenizer_dir=base, max_shard_size=40_000)  # sharded
    assert (target / "model.safetensors.index.json").is_file()
    (target / "README.md").write_text("my notes")
    (target / "model-00007-of-00009.safetensors").write_bytes(b"not in the index")
    torch.manual_seed(1)
    new = Transformer(old.config)
    new.save_pretrained(target)  # one file, no tokenizer
    assert sorted(p.name for p in target.iterdir()) == [
        "README.md", "config.json", "model-00007-of-00009.safetensors", "model.safetensors"]
    assert (target / "README.md").read_text() == "my notes"
    assert _same(_state(target), new.state_dict())
    assert _leftovers(target) == []


def test_foreign_files_survive_where_hard_links_are_not_allowed(
        base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dsmoe.checkpoint.directory as directory

    def no_links(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    target = tmp_path / "m"
    model = Transformer.from_pretrained(base)
    model.save_pretrained(target)
    (target / "README.md").write_text("my notes")
    monkeypatch.setattr(directory.os, "link", no_links)
    model.save_pretrained(target)
    assert (target / "README.md").read_text() == "my notes"


@pytest.mark.parametrize("make, match", [
    (lambda d: (d / "sub").mkdir(), "sub"),
    (lambda d: (d / "config.json").write_text("{\"name\": \"my app\"}"), "not a model directory"),
])
def test_a_directory_that_cannot_be_replaced_is_refused_untouched(base: Path, tmp_path: Path,
                                                                  make, match: str) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / "notes.txt").write_text("keep")
    make(target)
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(ValueError, match=match):
        Transformer.from_pretrained(base).save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == before
    assert _leftovers(target) == []


def test_a_foreign_file_the_new_model_would_overwrite_is_refused(base: Path,
                                                                 tmp_path: Path) -> None:
    target = tmp_path / "m"
    model = Transformer.from_pretrained(base)
    model.save_pretrained(target)
    model.save_pretrained(tmp_path / "probe", max_shard_size=40_000)
    shard = sorted(p.name for p in (tmp_path / "probe").glob("model-*"))[0]
    (target / shard).write_bytes(b"someone else's")
    with pytest.raises(ValueError, match=f"{shard} is not part"):
        model.save_pretrained(target, max_shard_size=40_000)
    assert (target / shard).read_bytes() == b"someone else's"
    assert _same(_state(target), model.state_dict())
    assert _leftovers(target) == []


_KILL_AT = r"""
import os, signal, sys
import dsmoe.checkpoint.directory as d
from dsmoe.model import Transformer

point, source, target, tok = sys.argv[1:5]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
if point == "second-shard":
    flush, calls = d.DirectoryWriter._flush, []
    d.DirectoryWriter._flush = lambda self: (calls.append(1), die() if len(calls) == 2
                                             else flush(self))
elif point == "config":
    write = d.DirectoryWriter._write_json
    d.DirectoryWriter._write_json = lambda self, n, data: die() if n == "config.json" \
        else write(self, n, data)
elif point == "swap":
    d._exchange = die
elif point == "old-removal":
    d._remove_tree = die
elif point == "between-renames":  # the fallback swap where renameat2 is unavailable
    d._exchange = lambda a, b: False
    rename = os.rename
    def rename_then_die(a, b):
        rename(a, b)
        if ".old-" in os.fspath(b):
            die()
    d.os.rename = rename_then_die
model = Transformer.from_pretrained(source)
with __import__("torch").no_grad():
    for p in model.parameters():
        p.add_(1.0)
model.save_pretrained(target, tokenizer_dir=tok or None, max_shard_size=40_000)
"""


@pytest.mark.slow
@pytest.mark.parametrize("point", ["second-shard", "config", "swap", "old-removal",
                                   "between-renames"])
def test_a_kill_at_any_step_leaves_the_old_or_the_new_model(base: Path, tmp_path: Path,
                                                            point: str) -> None:
    import subprocess
    import sys

    from dsmoe.checkpoint.directory import clean_leftovers

    target = tmp_path / "m"
    old = Transformer.from_pretrained(base)
    old.save_pretrained(target)  # the old model has no tokenizer, the new one has
    script = tmp_path / "kill.py"
    script.write_text(_KILL_AT)
    proc = subprocess.run([sys.executable, str(script), point, str(base), str(target), str(base)],
                          timeout=300, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert _leftovers(target), "the killed save left nothing to clean (it was not killed?)"
    if point == "between-renames":  # the old model waits beside the target until the next save
        assert not target.exists()
        clean_leftovers(target)
    names = sorted(p.name for p in target.iterdir())
    state = _state(target)
    if point == "old-removal":  # swapped in: the new model, complete with its tokenizer
        assert _same(state, {k: v + 1.0 if v.is_floating_point() else v
                             for k, v in old.state_dict().items()} | {
            k: v for k, v in state.items() if "inv_freq" in k or "load" in k})
        assert "tokenizer.json" in names and "model.safetensors.index.json" in names
    else:
        assert _same(state, old.state_dict())
        assert names == ["config.json", "model.safetensors"]
    old.save_pretrained(target)  # the next save removes what the killed one left
    assert _leftovers(target) == []
    assert _same(_state(target), old.state_dict())


# --- disk full and wrong targets ------------------------------------------------------------
def _disk_full(*args: object, **kwargs: object) -> None:
    import errno

    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_during_export_or_quantize_says_so_and_leaves_nothing(
        base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import gguf

    import dsmoe.quant.checkpoint as qcheckpoint

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", _disk_full)
    monkeypatch.setattr(qcheckpoint, "save_aligned", _disk_full)
    monkeypatch.setattr("dsmoe.checkpoint.hf.save_file", _disk_full)
    for argv in (["export", str(base), "--format", "gguf", "--out", str(tmp_path / "m.gguf")],
                 ["export", str(base), "--format", "hf", "--out", str(tmp_path / "hf")],
                 ["quantize", str(base), "--bits", "8", "--out", str(tmp_path / "q")]):
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: cannot write ") and "No space left on device" in err, err
        assert "\n" not in err and "Traceback" not in err
        assert list(tmp_path.iterdir()) == [], argv  # no file, no temporary left behind


def test_export_to_an_existing_directory_named_gguf_is_refused(
        base: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m.gguf").mkdir()
    assert cli(["export", str(base), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "is an existing directory" in capsys.readouterr().err
    assert list((tmp_path / "m.gguf").iterdir()) == []


def test_a_killed_gguf_writes_temporary_file_is_removed_by_the_next_write(
        base: Path, tmp_path: Path) -> None:
    leftover = tmp_path / ".m.gguf.999999999.abcd1234.tmp"  # a pid that does not exist
    leftover.write_bytes(b"half a file")
    assert cli(["export", str(base), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]
