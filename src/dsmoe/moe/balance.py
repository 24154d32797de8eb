"""Load-balance losses of the DeepSeekMoE generations, as pure functions of routing results.

All inputs are fp32; every loss is a scalar *before* its alpha. With f the selection
frequency and P the mean affinity (DeepSeekMoE / DeepSeek-V2 papers):
- expert     sum_i f_i P_i,  f_i = E/(K T) * #tokens picking i   (V1 token level)
             or the same per sequence, averaged over the batch     (V1 ``seq_aux``, V3)
- device     sum_d f'_d P'_d, f'_d = mean_{i in d} f_i, P'_d = sum_{i in d} P_i
- comm       sum_d f''_d P''_d, f''_d = D/(M T) * #tokens sent to d, P''_d = sum_{i in d} P_i
- z          mean_t logsumexp(logits_t)^2                          (router z-loss)
The expert loss follows DeepSeek V1's MoEGate exactly, including its ``seq_aux`` branch.

Design choices:
- The frequencies count "the batch", and where that batch lives is an argument, ``total``:
  ``None`` counts this call's tokens; under data or expert parallelism each rank holds a
  slice of the global batch, and ``total`` sums a small tensor of counts over the ranks
  (an all-reduce, no gradient). P always averages this call's own tokens, so the mean of
  the ranks' losses is the single-process loss on the global batch (equal slices).
  Per-sequence losses never need ``total``: a sequence never spans ranks.
- ``total`` is called unconditionally, also for an empty slice, so every rank takes part
  in the same collectives; an empty batch (here or everywhere) gives 0, never NaN.

Shapes: B sequences, S tokens per sequence, T = B*S, E experts, K picks, Dv devices.
"""

from __future__ import annotations

from typing import Callable

import torch

# Sums a tensor of counts over the ranks that share the batch (``None``: this process only).
Total = Callable[[torch.Tensor], torch.Tensor]


def expert_counts(topk_idx: torch.Tensor, n_experts: int,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """[..., K] expert ids -> [E] number of (token, expert) assignments per expert; with
    ``keep`` ([...] bool, one per token) only the kept tokens' assignments count.

    A scatter-add, not ``torch.bincount`` (or boolean indexing by ``keep``): CUDA's bincount
    reads the largest id on the host to size its output, a device sync per MoE layer that
    also breaks CUDA-graph capture. Integer adds are exact, so the counts are deterministic
    on every device."""
    flat = topk_idx.reshape(-1)  # [A]
    ones = (torch.ones_like(flat) if keep is None
            else keep.unsqueeze(-1).expand(topk_idx.shape).reshape(-1).long())  # [A]
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device)  # [E]
    return counts.scatter_add_(0, flat, ones)


def expert_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, n_experts: int,
                        seq_level: bool, total: Total | None = None) -> torch.Tensor:
    """probs: [B, S, E] affinities used for balancing; topk_idx: [B, S, K]."""
    B, S, K = topk_idx.shape
    if seq_level:
        if B * S == 0:
            return probs.new_zeros(())
        ones = torch.ones(B, S * K, device=probs.device, dtype=probs.dtype)
        load = torch.zeros(B, n_experts, device=probs.device, dtype=probs.dtype)
        load.scatter_add_(1, topk_idx.reshape(B, S * K), ones).div_(S * K / n_experts)  # [B, E]
        return (load * probs.mean(dim=1)).sum(dim=1).mean()
    f = _frequency(topk_idx, n_experts, probs.dtype, total)  # [E]
    return (f * _mean_affinity(probs, n_experts)).sum()


def device_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, n_experts: int,
                        n_devices: int, total: Total | None = None) -> torch.Tensor:
    """Balance computation across devices holding contiguous blocks of E/Dv experts."""
    f = _frequency(topk_idx, n_experts, probs.dtype, total).view(n_devices, -1).mean(dim=1)
    P = _mean_affinity(probs, n_experts).view(n_devices, -1).sum(dim=1)  # [Dv]
    return (f * P).sum()


def comm_balance_loss(probs: torch.Tensor, topk_idx: torch.Tensor, n_experts: int,
                      n_devices: int, max_devices: int, total: Total | None = None
                      ) -> torch.Tensor:
    """Balance what each device *receives*: tokens sent to it, not expert slots."""
    idx = topk_idx.reshape(-1, topk_idx.shape[-1])  # [T, K]
    T = idx.shape[0]
    device = idx // (n_experts // n_devices)  # [T, K]
    sent = torch.zeros(T, n_devices, device=idx.device, dtype=torch.bool)
    sent.scatter_(1, device, True)  # [T, Dv]: token t goes to device d
    f = _share(sent.sum(dim=0), T, n_devices, max_devices, probs.dtype, total)  # [Dv]
    P = _mean_affinity(probs, n_experts).view(n_devices, -1).sum(dim=1)  # [Dv]
    return (f * P).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Penalise large router logits (ST-MoE), which keeps the softmax well-conditioned."""
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(rows, dim=-1).square().mean()


def _frequency(topk_idx: torch.Tensor, n_experts: int, dtype: torch.dtype,
               total: Total | None) -> torch.Tensor:
    """f_i = E/(K T) * count_i: 1 for every expert under perfect balance."""
    K = topk_idx.shape[-1]
    T = topk_idx.numel() // K
    return _share(expert_counts(topk_idx, n_experts), T, n_experts, K, dtype, total)


def _share(counts: torch.Tensor, n_tokens: int, num: int, den: int, dtype: torch.dtype,
           total: Total | None) -> torch.Tensor:
    """counts * num / (den * T) over the batch ``total`` describes: [N] -> [N] (0 if T = 0).
    The same float expression in both cases, so one process and many agree bit for bit
    on the same counts."""
    if total is not None:
        summed = total(torch.cat([counts, counts.new_tensor([n_tokens])]))  # [N + 1]
        counts, n_tokens = summed[:-1], int(summed[-1])
    return counts.to(dtype) * (num / (den * max(n_tokens, 1)))


def _mean_affinity(probs: torch.Tensor, n_experts: int) -> torch.Tensor:
    """P_i: the mean affinity over this call's tokens ([..., E] -> [E]; zeros if none)."""
    rows = probs.reshape(-1, n_experts)
    return rows.mean(dim=0) if rows.shape[0] else rows.new_zeros(n_experts)
