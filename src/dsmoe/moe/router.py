"""The router: affinity scores, expert selection and gate weights for every DeepSeek generation.

Design choices:
- Scores come from fp32 logits whatever the compute dtype; gate weights leave as fp32 and
  are cast once, at the combine.
- Scoring (softmax | sigmoid) and selection (``topk_method``) are independent pieces, each
  a small function in a registry, so a routing variant is a pair of names, not a branch.
- Selection may use bias-corrected scores (V3), but gate weights are always gathered from
  the uncorrected scores: the bias steers *which* experts, never *how much*.
- Masked-out experts get -inf before the final top-k (transformers uses 0.0, which can only
  differ when bias-corrected scores are negative).

Shapes: T tokens, D hidden size, E routed experts, K experts per token, G groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from dsmoe import native
from dsmoe.autograd import records_grad
from dsmoe.config import ModelConfig
from dsmoe.linear import DECODE_STEP_MAX_ROWS, fp32_linear


@dataclass
class RouterOutput:
    topk_idx: torch.Tensor  # [T, K] long: chosen experts
    topk_weight: torch.Tensor  # [T, K] fp32: gate weights (normalised / scaled per config)
    topk_score: torch.Tensor  # [T, K] fp32: raw affinities of the chosen experts
    scores: torch.Tensor  # [T, E] fp32: affinities (softmax or sigmoid)
    logits: torch.Tensor  # [T, E] fp32: gate logits


# --- scoring -------------------------------------------------------------------------------
SCORING: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda logits: logits.softmax(dim=-1),
    "sigmoid": torch.sigmoid,
}


# --- selection -----------------------------------------------------------------------------
def select_greedy(choice: torch.Tensor, k: int) -> torch.Tensor:
    """Plain top-k over all experts (V1)."""
    return torch.topk(choice, k, dim=-1, sorted=False).indices


def select_group_limited(choice: torch.Tensor, k: int, n_groups: int, keep_groups: int,
                         group_rank: str) -> torch.Tensor:
    """Keep the ``keep_groups`` best of ``n_groups`` contiguous expert groups per token, then
    top-k inside them. Groups are ranked by their best expert ("max": V2 group-limited and
    device-limited routing) or by the sum of their two best experts ("top2": V3)."""
    T, E = choice.shape
    grouped = choice.view(T, n_groups, E // n_groups)  # [T, G, E/G]
    if group_rank == "max":
        group_scores = grouped.amax(dim=-1)
    else:
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    kept = torch.topk(group_scores, keep_groups, dim=-1, sorted=False).indices  # [T, keep]
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
    masked = grouped.masked_fill(~group_mask.unsqueeze(-1), float("-inf")).view(T, E)
    return torch.topk(masked, k, dim=-1, sorted=False).indices


def grouping(cfg: ModelConfig) -> tuple[str | None, int, int]:
    """(group ranking, groups, groups kept) of ``cfg.topk_method`` (ranking None: plain
    top-k): the one description the torch selection and the native decode step share."""
    return {
        "greedy": (None, 1, 1),
        "group_limited_greedy": ("max", cfg.n_group, cfg.topk_group),
        "device_limited": ("max", cfg.n_devices, cfg.max_devices),
        "noaux_tc": ("top2", cfg.n_group, cfg.topk_group),
    }[cfg.topk_method]


def _selector(cfg: ModelConfig) -> Callable[[torch.Tensor], torch.Tensor]:
    k = cfg.num_experts_per_tok
    rank, groups, keep = grouping(cfg)
    if rank is None:
        return lambda c: select_greedy(c, k)
    return lambda c: select_group_limited(c, k, groups, keep, rank)


class Router(nn.Module):
    """Gate of a MoE layer (HF name ``gate``).

    forward: fp32 logits -> scores -> (bias-corrected) selection -> gather gate weights ->
    optional renormalisation over the K picks -> ``routed_scaling_factor``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E = cfg.n_routed_experts
        self.num_experts, self.top_k = E, cfg.num_experts_per_tok
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))  # [E, D]
        if cfg.uses_bias_balancing:
            # fp32 and persistent: it is trained state that checkpoints must carry.
            self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.score = SCORING[cfg.scoring_func]
        self.select = self._own_select = _selector(cfg)
        self.renormalize = cfg.norm_topk_prob and cfg.num_experts_per_tok > 1
        self.scaling = cfg.routed_scaling_factor
        self.init_std = cfg.initializer_range
        # A CPU decode step's router is one native call (native.router_decode) for every
        # method: ~10-20 aten ops per layer otherwise. Tests turn it off to get torch's path;
        # a replaced ``select`` (analysis.disabled_top_experts) also runs in torch.
        self.native_decode = True
        self.sigmoid = cfg.scoring_func == "sigmoid"
        self.grouping = grouping(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.init_std)
        if self.e_score_correction_bias is not None:
            self.e_score_correction_bias.zero_()

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - torch's signature
        # NOTE: .to(bf16)/.half() would round the balancing bias; keep it fp32 on purpose.
        bias = self.e_score_correction_bias
        result = super()._apply(fn, recurse)
        if bias is not None and not bias.is_meta:
            moved = self._buffers["e_score_correction_bias"]
            self._buffers["e_score_correction_bias"] = bias.to(device=moved.device)
        elif bias is not None:
            self._buffers["e_score_correction_bias"] = self._buffers[
                "e_score_correction_bias"].float()
        return result

    def forward(self, x: torch.Tensor) -> RouterOutput:  # x: [T, D]
        if (self.native_decode and self.select is self._own_select and x.device.type == "cpu"
                and x.shape[0] <= DECODE_STEP_MAX_ROWS):
            weight = self.weight
            if not records_grad(x, weight):  # a decode step: all of it in one native call
                rank, groups, keep = self.grouping
                out = native.router_decode(
                    x.contiguous(), weight, self.top_k, self.renormalize, self.scaling,
                    sigmoid=self.sigmoid, bias=self.e_score_correction_bias, group_rank=rank,
                    groups=groups, keep_groups=keep)
                if out is not None:
                    return RouterOutput(*out)
        logits = fp32_linear(x, self.weight)  # [T, E], fp32
        scores = self.score(logits)  # [T, E]
        choice = scores if self.e_score_correction_bias is None else (
            scores + self.e_score_correction_bias)
        topk_idx = self.select(choice.detach())  # [T, K]
        topk_score = scores.gather(1, topk_idx)  # [T, K]
        weight = topk_score
        if self.renormalize:
            weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return RouterOutput(topk_idx, weight * self.scaling, topk_score, scores, logits)

    @torch.no_grad()
    def update_bias(self, expert_load: torch.Tensor, speed: float) -> torch.Tensor:
        """V3's aux-loss-free step: raise the bias of under-loaded experts, lower it for
        over-loaded ones, by ``speed`` x sign(mean load - load). Returns the load error."""
        if self.e_score_correction_bias is None:
            raise RuntimeError('update_bias needs topk_method="noaux_tc" (a V3 router)')
        load = expert_load.float().to(self.e_score_correction_bias.device)
        error = load.mean() - load  # [E]
        self.e_score_correction_bias.add_(speed * torch.sign(error))
        return error
