"""Generation: the KV cache changes nothing, batching changes nothing, sampling is seeded."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import generation_config
from dsmoe.generate import filter_top_k, filter_top_p, generate, left_pad
from dsmoe.model import Transformer
from dsmoe.textstream import TextStreamer


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    cfg = generation_config()
    return Transformer(cfg).eval()


def _greedy_by_recomputation(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_greedy_equals_full_recomputation(model: Transformer) -> None:
    prompt = [5, 17, 42, 8, 3]
    cached = generate(model, torch.tensor([prompt]), max_new_tokens=12)
    assert cached.shape == (1, 12)
    assert cached[0].tolist() == _greedy_by_recomputation(model, prompt, 12)


def test_batched_prompts_of_different_lengths_match_one_by_one(model: Transformer) -> None:
    prompts = [[5, 17, 42, 8, 3], [9], [60, 61, 62]]
    batched = generate(model, prompts, max_new_tokens=8)
    for row, prompt in enumerate(prompts):
        alone = generate(model, torch.tensor([prompt]), max_new_tokens=8)
        assert batched[row].tolist() == alone[0].tolist(), row


def test_seeded_sampling_is_reproducible(model: Transformer) -> None:
    prompt = torch.tensor([[1, 2, 3]])
    kwargs = dict(max_new_tokens=10, temperature=1.0, top_k=20, top_p=0.9)
    a = generate(model, prompt, seed=7, **kwargs)
    b = generate(model, prompt, seed=7, **kwargs)
    c = generate(model, prompt, seed=8, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stop_sequences_and_eos_end_a_row(model: Transformer) -> None:
    prompt = torch.tensor([[5, 17, 42]])
    free = generate(model, prompt, max_new_tokens=10)[0].tolist()
    stop_seq = free[3:5]
    first_end = next(j + 2 for j in range(len(free) - 1) if free[j:j + 2] == stop_seq)
    stopped = generate(model, prompt, max_new_tokens=10, stop=[stop_seq])[0].tolist()
    assert stopped == free[:first_end]
    by_eos = generate(model, prompt, max_new_tokens=10, eos_token_id=free[2])[0].tolist()
    assert by_eos == free[: free.index(free[2]) + 1]


def test_repetition_penalty_discourages_repeats(model: Transformer) -> None:
    prompt = torch.tensor([[5, 5, 5, 5]])
    plain = generate(model, prompt, max_new_tokens=20)[0].tolist()
    penalised = generate(model, prompt, max_new_tokens=20, repetition_penalty=5.0)[0].tolist()
    assert len(set(penalised)) >= len(set(plain))
    assert 5 not in penalised[:1] or 5 not in plain[:1]


def test_filters() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(filter_top_k(logits, 2)[0, 2:]).all()
    assert torch.isfinite(filter_top_k(logits, 2)[0, :2]).all()
    probs = logits.softmax(-1)[0]  # ~[0.64, 0.24, 0.09, 0.03]
    kept = torch.isfinite(filter_top_p(logits, 0.8))[0].tolist()
    assert kept == [True, True, False, False] and probs[0] < 0.8


def test_bad_arguments(model: Transformer) -> None:
    with pytest.raises(ValueError):
        generate(model, torch.tensor([[1, 2]]), max_new_tokens=3, top_p=1.5)
    with pytest.raises(ValueError):
        generate(model, torch.tensor([[1, 500]]), max_new_tokens=3)
    with pytest.raises(ValueError):
        left_pad([[1], []], 0)


class _CharTokenizer:
    """One character per token: enough to test streaming and stop strings."""

    class _Decoder:
        def push(self, token: int) -> str:
            return chr(token)

        def flush(self) -> str:
            return ""

    def stream_decoder(self):
        return self._Decoder()


def test_text_streamer_never_prints_a_stop_string() -> None:
    printed: list[str] = []
    streamer = TextStreamer(_CharTokenizer(), ["User:"], write=printed.append)
    stopped = False
    for ch in "Hello there\nUser: more":
        stopped = streamer(torch.tensor([ord(ch)]))
        if stopped:
            break
    assert stopped
    assert streamer.finish() == "Hello there\n"
    assert "".join(printed) == "Hello there\n"


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([torch.float32, torch.bfloat16]),
       st.sampled_from(["none", "ties", "nan", "inf"]), st.integers(1, 3))
def test_greedy_tokens_equal_torch_argmax(seed: int, dtype: torch.dtype, special: str,
                                          rows: int) -> None:
    """The numpy-backed greedy pick equals ``argmax(-1)`` on every row: first maximum on
    ties, first NaN where there is one, infinities, both dtypes, 1-D and batched."""
    from dsmoe.generate import greedy_tokens

    g = torch.Generator().manual_seed(seed)
    logits = torch.randint(-3, 4, (rows, 500), generator=g).float()  # many ties
    if special == "nan":
        logits[0, torch.randint(0, 500, (2,), generator=g)] = float("nan")
    elif special == "inf":
        logits[-1, torch.randint(0, 500, (2,), generator=g)] = float("inf")
    elif special == "none":
        logits = logits + torch.rand(rows, 500, generator=g)
    logits = logits.to(dtype)
    got = greedy_tokens(logits)
    assert got.dtype == torch.int64 and torch.equal(got, logits.argmax(-1))
    assert torch.equal(greedy_tokens(logits[0]), logits[0].argmax(-1))
