"""The static decode step (``dsmoe.decode``) that CUDA graphs replay, checked on the CPU.

The graph itself needs a GPU (tests/test_cuda.py); what it replays is ``StaticDecoder``'s
step, which runs eagerly here with ``use_graph=False``: whole-cache attention under a
slot mask, slot-indexed cache writes, positions advanced in place. It must give the
logits of ``Transformer.forward`` with a growing cache (fp32, atol 1e-5), also for
left-padded batches, where slots and RoPE positions differ per row.
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, generation_config
from dsmoe.config import ModelConfig
from dsmoe.decode import EagerDecoder, StaticDecoder, graph_unsupported_reason, make_decoder
from dsmoe.generate import generate, left_pad
from dsmoe.model import Transformer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = generation_config()
    return Transformer(cfg).eval()


@pytest.mark.parametrize("prompts", [[[5, 17, 42, 8, 3]], [[5, 17, 42, 8, 3], [9], [60, 61]]])
def test_static_step_matches_eager_decoding(model: Transformer, prompts: list[list[int]]
                                            ) -> None:
    ids, mask = left_pad(prompts, 0)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    B, P, N = ids.shape[0], ids.shape[1], 6
    eager = EagerDecoder(model, B, P + N)
    static = StaticDecoder(model, B, P + N, use_graph=False)
    with torch.inference_mode():
        want, got = eager.prefill(ids, positions, mask), static.prefill(ids, positions, mask)
        assert_close(got, want, atol=1e-5, rtol=1e-5, what="prefill logits")
        for step in range(N):
            token = want.argmax(dim=-1)  # [B]
            want, got = eager.step(token), static.step(token)
            assert_close(got, want, atol=1e-5, rtol=1e-5, what=f"decode step {step}")
    assert int(static.slot) == P + N


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3"])
def test_static_step_matches_eager_decoding_with_mla(preset: str) -> None:
    """MLA: the latent cache written at the slot, absorbed attention over every slot."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset).replace(
        vocab_size=97, num_hidden_layers=2, initializer_range=0.2)).eval()
    ids, mask = left_pad([[5, 17, 42, 8, 3], [9, 4]], 0)
    positions = (mask.cumsum(dim=1) - 1).clamp_min(0)
    eager = EagerDecoder(model, 2, 12)
    static = StaticDecoder(model, 2, 12, use_graph=False)
    with torch.inference_mode():
        want, got = eager.prefill(ids, positions, mask), static.prefill(ids, positions, mask)
        for step in range(5):
            token = want.argmax(dim=-1)
            want, got = eager.step(token), static.step(token)
            assert_close(got, want, atol=1e-5, rtol=1e-5, what=f"{preset} step {step}")


def test_static_step_ignores_stale_cache_entries(model: Transformer) -> None:
    """Slots past the current one hold garbage (warm-up writes, an earlier longer run):
    the mask must hide them."""
    ids = torch.tensor([[5, 17, 42]])
    positions = torch.arange(3).unsqueeze(0)
    mask = torch.ones_like(ids)
    clean = StaticDecoder(model, 1, 10, use_graph=False)
    dirty = StaticDecoder(model, 1, 10, use_graph=False)
    dirty.cache.keys.normal_()
    dirty.cache.values.normal_()  # (an MLA cache holds latents instead)
    with torch.inference_mode():
        a, b = clean.prefill(ids, positions, mask), dirty.prefill(ids, positions, mask)
        assert_close(b, a, atol=0, rtol=0, what="prefill")
        a, b = clean.step(a.argmax(-1)), dirty.step(b.argmax(-1))
        assert_close(b, a, atol=1e-6, rtol=1e-6, what="first step")


def test_decoder_choice_on_cpu(model: Transformer) -> None:
    assert "CUDA" in graph_unsupported_reason(model)
    assert isinstance(make_decoder(model, 1, 8), EagerDecoder)
    with pytest.raises(ValueError, match="cannot decode with a CUDA graph: CUDA graphs need"):
        make_decoder(model, 1, 8, cuda_graph=True)
    with pytest.raises(ValueError, match="compile=True needs the CUDA-graph decoder"):
        make_decoder(model, 1, 8, compile=True)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA model"):
        generate(model, [[1, 2]], max_new_tokens=2, cuda_graph=True)


# --- --device on the model commands ------------------------------------------------------------
@pytest.mark.parametrize("command", ["generate", "chat", "analyze"])
def test_device_argument_errors_are_one_line(command: str, tmp_path, capsys) -> None:
    from dsmoe import cli

    extra = {"generate": ["--prompt", "hi"], "chat": [], "analyze": ["--out", str(tmp_path / "o")]}
    cases = [("meta", "dsmoe runs on cpu or cuda"), ("nonsense:x", "is not a device")]
    if not torch.cuda.is_available():
        cases.append(("cuda", "no CUDA device is available"))
    for device, message in cases:
        code = cli.main([command, str(tmp_path), "--device", device, *extra[command]])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and "\n" not in err, (device, err)


def test_int_kernels_refuse_cuda() -> None:
    from dsmoe.commands._common import resolve_device

    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="--quant int8 uses dsmoe's CPU kernels"):
            resolve_device("cuda", quant="int8")
    assert resolve_device("cpu", quant="int8") == torch.device("cpu")
