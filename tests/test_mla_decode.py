"""MLA's one-call CPU decode step (csrc/decode_ops.c via ``native.mla_decode``): the latent
norm, both rotations, the cache write and the absorbed attention of one layer.

It must equal torch's absorbed path: the cached latent to the last bit of its dtype (state
every later step reads: the norm's mean square is summed in another order, nothing else
differs), the output within fp32 rounding (fp32) or a few bf16 roundings (bf16: torch
rounds its bmm and softmax inside SDPA, the kernel keeps fp32 there). Every decode step of
an MLA model must really take it (the spies), prefill and gradients keep torch's ops.

Shapes: B batch, H heads, n nope, r rope, v value dims, C latent rank, P cached tokens.
"""

from __future__ import annotations

import pytest
import torch
from conftest import needs_native, spy_native
from hypothesis import given, settings
from hypothesis import strategies as st

from dsmoe import native, native_step
from dsmoe.config import ModelConfig
from dsmoe.model import Transformer
from dsmoe.model.mask import build_attention_mask
from dsmoe.model.mla import MultiHeadLatentAttention
from dsmoe.model.rope import RotaryEmbedding

pytestmark = needs_native
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}


def _config(H: int, n: int, r: int, v: int, C: int, interleave: bool, yarn: bool
            ) -> ModelConfig:
    return ModelConfig.preset("tiny-v2").replace(
        vocab_size=64, hidden_size=32, num_attention_heads=H, num_key_value_heads=H,
        qk_nope_head_dim=n, qk_rope_head_dim=r, v_head_dim=v, kv_lora_rank=C,
        num_hidden_layers=2, max_position_embeddings=64, rope_scaling=YARN if yarn else None,
        extra={"rope_interleave": interleave})


def _near(fast: torch.Tensor, slow: torch.Tensor, dtype: torch.dtype) -> None:
    share = 1e-5 if dtype == torch.float32 else 3e-2
    diff, top = (fast.float() - slow.float()).abs().max(), slow.float().abs().max()
    assert diff <= share * top, f"max diff {diff:.3g}, largest value {top:.3g}"


def _last_bit(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal, or apart by at most one unit in the last place of the dtype."""
    ulp = torch.finfo(a.dtype).eps * torch.maximum(a.float().abs(), b.float().abs())
    assert ((a.float() - b.float()).abs() <= ulp).all(), (a - b).abs().max()


@settings(max_examples=25)
@given(H=st.sampled_from([1, 4]), n=st.sampled_from([4, 8]), r=st.sampled_from([2, 8]),
       v=st.sampled_from([4, 12]), C=st.sampled_from([8, 24]), B=st.integers(1, 3),
       P=st.integers(1, 9), bf16=st.booleans(), interleave=st.booleans(),
       yarn=st.booleans(), padded=st.booleans(), seed=st.integers(0, 2**16))
def test_mla_decode_equals_torchs_absorbed_step(H, n, r, v, C, B, P, bf16, interleave, yarn,
                                                padded, seed):
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    cfg = _config(H, n, r, v, C, interleave, yarn)
    attn = MultiHeadLatentAttention(cfg, 1)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(std=0.3)
    attn = attn.to(dtype).eval()
    caches = [attn.new_cache(cfg, B, P + 3, dtype=dtype, device="cpu") for _ in range(2)]
    caches[0].latents.normal_()
    caches[1].latents.copy_(caches[0].latents)
    x = torch.randn(B, 1, 32).to(dtype)
    padding = None
    if padded:  # the first sequence left-padded by up to P - 1 tokens
        padding = torch.ones(B, P + 1, dtype=torch.long)
        padding[0, :torch.randint(0, P, ()).item()] = 0
    mask = build_attention_mask(padding, 1, P, x.device)
    pos = torch.full((B, 1), P)
    cos, sin = RotaryEmbedding(r, cfg.rope_theta, 64, cfg.rope_scaling)(pos, P + 1, dtype)
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        for cache in caches:
            cache.seq_len = P
        calls = spy_native(mp, "mla_decode", lambda *args: [1])
        fast = attn(x, cos, sin, mask, caches[0])
        mp.setattr(native, "mla_decode", lambda *args, **kwargs: None)
        slow = attn(x, cos, sin, mask, caches[1])
    assert calls == [1] and fast.dtype == dtype and fast.shape == slow.shape
    _last_bit(caches[0].latents, caches[1].latents)
    _near(fast, slow, dtype)


def _model(dtype: torch.dtype, preset: str, **changes) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig.preset(preset).replace(vocab_size=300, num_hidden_layers=3,
                                             initializer_range=0.1, **changes)
    model = Transformer(cfg).to(dtype).eval()
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.gate.weight.normal_(std=1.0)  # decisive routing: no near-ties
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3"])
def test_mla_models_take_the_native_step_and_equal_torchs(monkeypatch, dtype, preset):
    model = _model(dtype, preset, rope_scaling=YARN)
    calls = spy_native(monkeypatch, "mla_decode", lambda q, *rest: [q.shape[0]])

    def per_module(*args):  # generate's one-call step is tests/test_native_step_mla.py's
        raise native_step.Unsupported("the per-module path under test")

    monkeypatch.setattr(native_step, "build_plan", per_module)
    prompt = torch.randint(0, 300, (2, 6))
    padding = torch.ones(2, 6, dtype=torch.long)
    padding[1, :2] = 0
    with torch.inference_mode():
        fast = model.generate(prompt, max_new_tokens=4, attention_mask=padding)
        cache = model.new_cache(2, 8)
        model(prompt, cache=cache)
        fast_logits = model(fast[:, :1], cache=cache).logits
    assert calls == [2] * 3 * 4  # three layers, three generated steps after the prompt + one
    monkeypatch.setattr(native, "mla_decode", lambda *args, **kwargs: None)
    with torch.inference_mode():
        slow = model.generate(prompt, max_new_tokens=4, attention_mask=padding)
        cache = model.new_cache(2, 8)
        model(prompt, cache=cache)
        slow_logits = model(fast[:, :1], cache=cache).logits
    _near(fast_logits, slow_logits, dtype)
    if dtype == torch.float32:
        assert torch.equal(fast, slow)


def test_prefill_gradients_and_a_lora_kv_b_keep_torchs_ops(monkeypatch):
    model = _model(torch.float32, "tiny-v3")
    calls = spy_native(monkeypatch, "mla_decode", lambda q, *rest: [q.shape[0]])
    cache = model.new_cache(1, 8)
    prompt = torch.randint(0, 300, (1, 6))
    model(prompt, cache=cache)  # prefill; then a step that records gradients
    assert model(prompt[:, :1], cache=cache).logits.grad_fn is not None
    assert calls == []
    monkeypatch.setattr(MultiHeadLatentAttention, "_kv_b_weight", lambda self, dtype: None)
    with torch.no_grad():
        model(prompt[:, :1], cache=cache)
    assert calls == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_threads_give_the_one_thread_result(dtype):
    """Heads are split between threads, and the scores' matmul by key rows: every sum
    keeps its order, so the output and the cache are bit-identical."""
    cfg = _config(4, 8, 8, 12, 24, True, True)
    attn = MultiHeadLatentAttention(cfg, 0)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(std=0.3)
    attn = attn.to(dtype).eval()
    x = torch.randn(2, 1, 32).to(dtype)
    cos, sin = RotaryEmbedding(8, cfg.rope_theta, 64, cfg.rope_scaling)(
        torch.full((2, 1), 70), 71, dtype)
    results = []
    for threads in (1, 2):
        torch.manual_seed(1)
        cache = attn.new_cache(cfg, 2, 80, dtype=dtype, device="cpu")
        cache.latents.normal_()
        cache.seq_len = 70
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                results.append((attn(x, cos, sin, build_attention_mask(None, 1, 70, x.device),
                                     cache), cache.latents))
        finally:
            torch.set_num_threads(1)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_row_that_may_attend_nowhere_gives_zeros_as_sdpa():
    """build_attention_mask never makes one, but native.mla_decode is public: an all-False
    mask row yields zeros (torch's SDPA), not NaN."""
    H, n, r, v, C, B, P = 2, 4, 2, 4, 8, 2, 3
    torch.manual_seed(0)
    latents = torch.randn(B, P + 2, C + r)
    mask = torch.ones(B, 1, 1, P + 1, dtype=torch.bool)
    mask[1] = False
    out = native.mla_decode(torch.randn(B, 1, H * (n + r)), torch.randn(B, 1, C + r),
                            torch.ones(C), 1e-6, torch.ones(B, 1, r), torch.zeros(B, 1, r),
                            True, latents, P, mask, torch.randn(H * (n + v), C), 0.5,
                            native.MLAShape(H, n, r, v, C))
    assert out[0].abs().sum() > 0 and torch.equal(out[1], torch.zeros(1, H * v))
