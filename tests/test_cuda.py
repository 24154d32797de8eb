"""dsmoe on CUDA: the parity tests of the CPU suite re-run on the GPU, plus what only a GPU
has (CUDA-graph decoding, graph-safe routing, ``torch._grouped_mm``, NCCL).

Skipped without CUDA, so ``make test`` stays green on CPU machines; ``pytest -m cuda`` on a
GPU machine runs them (benchmarks/gpu.sh does). Tolerances: fp32 at atol=rtol=1e-4 (GPU
GEMMs may use other blockings and TF32 is off); bf16 at atol=rtol=2e-2 against an fp32 or
bf16 reference (a few bf16 ulps on outputs of order 1).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import assert_close, generation_config

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

transformers = pytest.importorskip("transformers")

from dsmoe.config import ModelConfig  # noqa: E402
from dsmoe.generate import generate  # noqa: E402
from dsmoe.model import Transformer  # noqa: E402
from dsmoe.moe.grouped_gemm import grouped_mm_supported  # noqa: E402
from dsmoe.moe.layer import MoELayer  # noqa: E402

FP32 = dict(atol=1e-4, rtol=1e-4)
BF16 = dict(atol=2e-2, rtol=2e-2)
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# --- the MoE layer against transformers' DeepseekV2Moe / DeepseekV3MoE ------------------------
def _layer_pair(kind: str):
    from test_moe_parity import _build_pair, _common_kwargs, _small_bias
    from transformers import DeepseekV2Config, DeepseekV3Config

    if kind == "v2":
        cfg = DeepseekV2Config(**_common_kwargs(16, 4, n_shared=2), topk_method="group_limited_greedy",
                               n_group=4, topk_group=2, routed_scaling_factor=2.5,
                               norm_topk_prob=False)
        return _build_pair(cfg, seed=3)
    cfg = DeepseekV3Config(**_common_kwargs(16, 4, n_shared=1), n_group=4, topk_group=2,
                           norm_topk_prob=True, routed_scaling_factor=2.5)
    return _build_pair(cfg, seed=4, bias=_small_bias(16, 4))


@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_layer_parity_fp32_on_cuda(kind: str) -> None:
    from test_moe_parity import SHAPE, _dsmoe_grads, _hf_grads

    reference, layer = _layer_pair(kind)
    reference, layer = reference.to(CUDA), layer.to(CUDA).train()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(SHAPE, generator=gen).to(CUDA)
    upstream = torch.randn(SHAPE, generator=gen).to(CUDA)
    x_ref, x_ds = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    expected, out = reference(x_ref), layer(x_ds)
    assert_close(out.hidden_states, expected, **FP32, what=f"{kind} forward")
    (expected * upstream).sum().backward()
    (out.hidden_states * upstream).sum().backward()
    assert_close(x_ds.grad, x_ref.grad, **FP32, what=f"{kind} input gradient")
    ref_grads, ds_grads = _hf_grads(reference), _dsmoe_grads(layer)
    for name, g in ref_grads.items():
        assert_close(ds_grads[name], g, **FP32, what=f"{kind} gradient of {name}")


@pytest.mark.parametrize("kind", ["v2", "v3"])
def test_layer_bf16_on_cuda_close_to_transformers(kind: str) -> None:
    from test_moe_parity import SHAPE

    reference, layer = _layer_pair(kind)
    reference, layer = reference.to(CUDA).eval(), layer.to(CUDA, torch.bfloat16).eval()
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6)).to(CUDA)
    with torch.no_grad():
        expected = reference(x)  # fp32 reference
        got = layer(x.bfloat16()).hidden_states
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), expected, **BF16, what=f"{kind} bf16 forward")


def test_grouped_mm_is_used_for_bf16_on_cuda() -> None:
    if not grouped_mm_supported("cuda", torch.bfloat16):
        pytest.skip("this torch/GPU has no working torch._grouped_mm for bf16")
    from dsmoe.moe.grouped_gemm import GroupedGEMM

    counts = torch.tensor([3, 0, 5], device=CUDA)
    assert GroupedGEMM.plan(counts, 8, torch.bfloat16).kernel == "grouped_mm"


def test_moe_forward_and_backward_do_not_sync_with_the_host() -> None:
    from conftest import moe_config

    if not grouped_mm_supported("cuda", torch.bfloat16):
        pytest.skip("no torch._grouped_mm for bf16 here: the loop kernels read counts")
    layer = MoELayer(moe_config(aux_loss_alpha=0.01, hidden_size=64)).to(CUDA, torch.bfloat16)
    layer.train()
    x = torch.randn(4, 16, 64, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    layer(x)  # first call: kernel probes and lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
        (out.hidden_states.sum() + out.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_autocast_bf16_training_step_on_cuda() -> None:
    """autocast: fp32 master weights, bf16 products (experts included), fp32 routing."""
    from conftest import moe_config

    layer = MoELayer(moe_config(hidden_size=64, aux_loss_alpha=0.01)).to(CUDA).train()
    ref = MoELayer(layer.config).to(CUDA).train()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 16, 64, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
        assert out.router_logits.dtype == torch.float32
    expected = ref(x)
    assert_close(out.hidden_states.float(), expected.hidden_states, **BF16, what="autocast fwd")
    out.hidden_states.float().pow(2).mean().backward()
    expected.hidden_states.pow(2).mean().backward()
    for (name, p), q in zip(layer.named_parameters(), ref.parameters()):
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), q.grad.flatten(), dim=0)
        assert cos > 0.99, f"{name}: bf16 gradient direction differs (cos {cos:.4f})"


# --- the model against the Llama + DeepseekV2Moe composite ------------------------------------
@pytest.mark.parametrize("case", ["v1_greedy", "gqa_freq2"])
def test_model_parity_fp32_on_cuda(case: str, tmp_path: Path) -> None:
    from test_model_parity import MOE, MOE_CASES, _random_model, _reference

    cfg = ModelConfig(**{**MOE, **MOE_CASES[case]})
    _random_model(cfg, 0).save_pretrained(tmp_path / "model")
    ours = Transformer.from_pretrained(tmp_path / "model", device="cuda")
    ref = _reference(cfg, tmp_path / "model").to(CUDA)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(ids.to(CUDA)).logits, ref(input_ids=ids.to(CUDA)).logits, **FP32,
                     what=f"{case} logits")


# --- decoding: CUDA graphs and compile give the eager tokens ----------------------------------
@pytest.fixture(scope="module")
def gen_model() -> Transformer:
    torch.manual_seed(0)
    cfg = generation_config()
    return Transformer(cfg).eval().to(CUDA)


def _recompute(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids], device=CUDA)).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("mode", ["eager", "graph", "compiled graph"])
def test_cached_generation_equals_recomputation_on_cuda(gen_model: Transformer, mode: str
                                                        ) -> None:
    prompt = [5, 17, 42, 8, 3]
    kwargs = {"eager": dict(cuda_graph=False), "graph": dict(cuda_graph=True),
              "compiled graph": dict(cuda_graph=True, compile=True)}[mode]
    got = generate(gen_model, torch.tensor([prompt]), max_new_tokens=16, **kwargs)
    assert got[0].tolist() == _recompute(gen_model, prompt, 16), mode


def test_graph_batched_left_padded_equals_one_by_one(gen_model: Transformer) -> None:
    prompts = [[5, 17, 42, 8, 3], [9], [60, 61, 62]]
    batched = generate(gen_model, prompts, max_new_tokens=10, cuda_graph=True)
    for row, prompt in enumerate(prompts):
        alone = generate(gen_model, [prompt], max_new_tokens=10, cuda_graph=False)
        assert batched[row].tolist() == alone[0].tolist(), row


def test_graph_decoding_bf16_matches_eager_bf16(gen_model: Transformer) -> None:
    """Teacher-forced: the graph's logits at every step against eager bf16 decoding (the
    graph attends over the whole cache under a mask, so bf16 rounding may differ a little)."""
    from dsmoe.decode import EagerDecoder, StaticDecoder

    model = Transformer(gen_model.config).to(CUDA, torch.bfloat16).eval()
    model.load_state_dict(gen_model.state_dict())
    ids = torch.tensor([[5, 17, 42, 8, 3], [1, 2, 3, 4, 5]], device=CUDA)
    positions = torch.arange(5, device=CUDA).expand(2, 5)
    mask = torch.ones_like(ids)
    eager, graph = EagerDecoder(model, 2, 17), StaticDecoder(model, 2, 17)
    with torch.inference_mode():
        want, got = eager.prefill(ids, positions, mask), graph.prefill(ids, positions, mask)
        for step in range(12):
            token = want.argmax(dim=-1)
            want, got = eager.step(token), graph.step(token)
            assert_close(got, want, **BF16, what=f"bf16 step {step}")


def test_graph_decoders_are_reused_and_recaptured_for_new_weights(gen_model: Transformer) -> None:
    from dsmoe.decode import make_decoder

    a = make_decoder(gen_model, 2, 40)
    assert make_decoder(gen_model, 2, 50) is a  # same rounded slot count: reused
    assert make_decoder(gen_model, 3, 40) is not a
    model = Transformer(gen_model.config).to(CUDA).eval()
    assert make_decoder(model, 2, 40) is not a


def test_layer_gradients_are_bitwise_deterministic_on_cuda() -> None:
    """Dispatch and combine reduce in a fixed order (no atomics): two backward passes
    give identical bits."""
    from conftest import moe_config

    layer = MoELayer(moe_config(hidden_size=64)).to(CUDA).train()
    x = torch.randn(8, 64, 64, device=CUDA)

    def grads() -> list[torch.Tensor]:
        xi = x.clone().requires_grad_(True)
        layer(xi).hidden_states.pow(2).sum().backward()
        result = [xi.grad] + [p.grad.clone() for p in layer.parameters()]
        layer.zero_grad(set_to_none=True)
        return result

    for a, b in zip(grads(), grads()):
        assert torch.equal(a, b)


def test_expert_parallel_path_on_a_one_rank_nccl_group(monkeypatch) -> None:
    """The all-to-all dispatcher and the all-reduced balance counts, over NCCL with one
    rank: the layer must give exactly what the single-process layer gives."""
    import torch.distributed as dist

    from conftest import moe_config, randomize_
    from dsmoe.distributed.launcher import _free_port, init_distributed, teardown
    from dsmoe.moe.parallel import AllToAllDispatcher, GroupSum

    if not dist.is_nccl_available():
        pytest.skip("torch was built without NCCL")
    for key, value in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(_free_port())).items():
        monkeypatch.setenv(key, value)
    assert init_distributed() == (0, 1)
    try:
        assert dist.get_backend() == "nccl"
        cfg = moe_config(aux_loss_alpha=0.01, n_routed_experts=8)
        ref = randomize_(MoELayer(cfg)).to(CUDA).train()
        ep = MoELayer(cfg).to(CUDA).train()
        ep.load_state_dict(ref.state_dict())
        ep.dispatcher = AllToAllDispatcher(cfg.n_routed_experts, None, 1, 0)
        ep.balance_total = GroupSum(None)
        x = torch.randn(4, 16, cfg.hidden_size, device=CUDA)
        outs = []
        for layer in (ref, ep):
            xi = x.clone().requires_grad_(True)
            out = layer(xi)
            (out.hidden_states.pow(2).sum() + out.aux_loss).backward()
            outs.append((out.hidden_states, out.aux_loss, xi.grad))
        for got, want, what in zip(outs[1], outs[0], ("output", "aux loss", "input grad")):
            assert_close(got, want, **FP32, what=f"EP over NCCL: {what}")
        for (name, p), q in zip(ep.named_parameters(), ref.parameters()):
            assert_close(p.grad, q.grad, **FP32, what=f"EP over NCCL: grad of {name}")
    finally:
        teardown()


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3"])
def test_graph_decoding_with_mla_equals_eager(preset: str) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset).replace(
        vocab_size=97, num_hidden_layers=2, initializer_range=0.2, eos_token_id=None)
    ).eval().to(CUDA)
    prompts = [[5, 17, 42, 8, 3], [9, 4]]
    eager = generate(model, prompts, max_new_tokens=12, cuda_graph=False)
    graph = generate(model, prompts, max_new_tokens=12, cuda_graph=True)
    assert torch.equal(eager, graph)


@pytest.mark.parametrize("case", ["v2_qlora_yarn_group_limited", "v3_yarn_mscale"])
def test_mla_model_parity_with_transformers_on_cuda(case: str, tmp_path: Path) -> None:
    """DeepSeek-V2/V3 (MLA, YaRN) against transformers' native classes on the GPU: logits
    in fp32, and 32 greedy tokens decoded through the CUDA graph."""
    from test_mla_parity import CASES, _reference

    hf = CASES[case]
    ref = _reference(hf, seed=1)
    ref.save_pretrained(tmp_path)
    ref = ref.to(CUDA)
    ours = Transformer.from_pretrained(tmp_path, device="cuda")
    ids = torch.randint(0, hf["vocab_size"], (2, 11),
                        generator=torch.Generator().manual_seed(2)).to(CUDA)
    with torch.no_grad():
        assert_close(ours(ids).logits, ref(ids).logits, **FP32, what=f"{case} logits")
    new = ours.generate(ids[:1], max_new_tokens=32, cuda_graph=True)
    expected = ref.generate(ids[:1], max_new_tokens=32, do_sample=False, min_new_tokens=32,
                            pad_token_id=0)[:, ids.shape[1]:]
    assert torch.equal(new, expected), f"{case}: {new.tolist()} != {expected.tolist()}"


# --- training and finetuning on the GPU --------------------------------------------------------
def test_training_on_cuda_matches_cpu_and_exports(tmp_path: Path) -> None:
    import json

    from dsmoe.train import loop
    from test_train import _cfg, _write_corpus

    corpus = _write_corpus(tmp_path / "corpus")

    def losses(out: Path) -> list[float]:
        return [json.loads(line)["train_loss"]
                for line in (out / "metrics.jsonl").read_text().splitlines()]

    runs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / device
        result = loop.train(_cfg(corpus, out, tmp_path / "cache", max_steps=4, device=device),
                            quiet=True)
        assert result.status == "finished"
        runs[device] = losses(out)
    assert runs["cuda"] == pytest.approx(runs["cpu"], rel=1e-3)
    bf16 = loop.train(_cfg(corpus, tmp_path / "bf16", tmp_path / "cache", max_steps=4,
                           device="cuda", dtype="bfloat16", activation_checkpointing=True),
                      quiet=True)
    assert bf16.status == "finished" and all(map(math.isfinite, losses(tmp_path / "bf16")))
    Transformer.from_pretrained(tmp_path / "bf16" / "model", device="cuda")


def test_lora_finetuning_on_cuda_learns(tmp_path_factory, tmp_path: Path) -> None:
    from dsmoe.finetune import loop
    from test_finetune import _cfg, task

    data = task.__wrapped__(tmp_path_factory)
    result = loop.finetune(_cfg(data, tmp_path / "run", device="cuda"), quiet=True)
    assert result.status == "finished"
    assert result.val_loss < 0.25 * result.probe_loss_before
