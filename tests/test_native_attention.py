"""Multi-head attention of a CPU decode step in one native call
(``dsmoe.native.attention_decode``, reached from ``Attention.forward`` with a ``KVCache``).

The call does RoPE, the cache write and the attention of torch's path: the same logits
(fp32 to 1e-5; bf16 to bf16 rounding), the same cache contents, the same greedy tokens,
with grouped-query heads and left padding, on every ISA path; prefill, training and the
static (CUDA-graph) decoder keep torch's ops.
"""

from __future__ import annotations

import pytest
import torch
from conftest import needs_native, spy_native

from dsmoe import native
from dsmoe.config import ModelConfig
from dsmoe.decode import EagerDecoder
from dsmoe.model import Transformer



@pytest.fixture
def attention_calls(monkeypatch):
    """Batch size of every native attention call that returned a result."""
    return spy_native(monkeypatch, "attention_decode", lambda q, *args: [q.shape[0]])


def _decode(model: Transformer, ids: torch.Tensor, mask: torch.Tensor, steps: int,
            tokens: torch.Tensor | None = None):
    """Logits of the prefill and ``steps`` steps [steps + 1, B, V], and the cache. Each step
    feeds the previous logits' greedy tokens, or ``tokens [steps + 1, B]`` where given (a
    comparison feeds both runs the same tokens: in bf16 a near-tie may flip one argmax,
    after which the runs would decode different texts)."""
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.inference_mode():
        decoder = EagerDecoder(model, ids.shape[0], ids.shape[1] + steps + 2)
        logits = [decoder.prefill(ids, positions, mask)]
        for i in range(steps):
            logits.append(decoder.step(logits[-1].argmax(-1) if tokens is None else tokens[i]))
    return torch.stack(logits), decoder.cache


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA and grouped-query heads
def test_native_steps_equal_torchs_attention(native_isa, attention_calls, monkeypatch,
                                             dtype, kv_heads):
    config = ModelConfig.preset("tiny").replace(num_hidden_layers=2, vocab_size=300,
                                                num_key_value_heads=kv_heads)
    model = Transformer(config).eval().to(dtype)
    ids = torch.randint(0, 300, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding: those slots must stay invisible
    mask[2, :1] = 0
    fast, fast_cache = _decode(model, ids, mask, steps=6)
    assert attention_calls == [3] * 6 * 2  # every step, every layer; never the prefill
    monkeypatch.setattr(native, "attention_decode", lambda *args, **kwargs: None)
    slow, slow_cache = _decode(model, ids, mask, steps=6, tokens=fast.argmax(-1))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fast, slow, **tol)
    if dtype == torch.float32:  # bf16 logits may tie within their rounding
        assert torch.equal(fast.argmax(-1), slow.argmax(-1))
    torch.testing.assert_close(fast_cache.keys, slow_cache.keys, **tol)
    torch.testing.assert_close(fast_cache.values, slow_cache.values, **tol)


@needs_native
def test_other_attention_forwards_keep_torchs_ops(attention_calls):
    config = ModelConfig.preset("tiny").replace(num_hidden_layers=1, vocab_size=300)
    model = Transformer(config)
    ids = torch.randint(0, 300, (2, 5))
    model(ids).logits.sum().backward()  # training, no cache
    model.eval()
    with torch.no_grad():
        cache = model.new_cache(2, 8)
        model(ids, cache=cache)  # prefill
        full = model.new_cache(2, 5)
        model(ids, cache=full)
        with pytest.raises(ValueError, match="KV cache is full"):  # torch's path raises
            model(ids[:, :1], cache=full)
    assert attention_calls == []


@needs_native
def test_bad_shapes_are_refused_not_misread():
    q = torch.randn(1, 1, 64)
    keys = torch.zeros(1, 2, 8, 32)
    cos = sin = torch.ones(1, 1, 32)
    assert native.attention_decode(q, q[..., :64], q[..., :64], cos, sin, keys, keys.clone(),
                                   8, None, 1.0) is None  # slot past the cache
    assert native.attention_decode(q, q, q, cos, sin, keys.bfloat16(), keys.bfloat16(), 0,
                                   None, 1.0) is None  # mixed dtypes
    assert native.attention_decode(q, q, q, cos, sin, keys, keys.clone(), 3,
                                   torch.ones(1, 1, 1, 3, dtype=torch.bool), 1.0) is None
