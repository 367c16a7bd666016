"""Random-order (MAR / MaskGIT) machinery of docs/contracts.md §2.4: how many tokens stay masked after each
sampling step, the CFG scale of each step, generation orders, the training mask ratio and mask,
and label dropout. Every random draw takes an explicit `torch.Generator`, so a seed fixes the
result; nothing here touches the global RNG.

Convention (MAR's): an order is a permutation of the L positions; the masked tokens are always
a prefix of it, `orders[b, :num_masked]`. Sampling therefore reveals tokens from the end of the
order towards its start, and training masks the first ceil(L * ratio) positions of the order.
"""
from __future__ import annotations

import math

import torch

__all__ = [
    "mask_schedule",
    "cfg_schedule",
    "random_orders",
    "mask_ratio",
    "training_mask",
    "null_condition_mask",
    "next_mask",
]


def _check_int(name: str, v, minimum: int):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be a Python int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")


def _mask_lens(seq_len: int, num_steps: int) -> list[int]:
    """MAR's `mask_len` of each step: max(1, min(masked_before - 1, floor(L cos(pi/2 (k+1)/K))))."""
    lens, masked = [], seq_len
    for k in range(num_steps):
        target = math.floor(seq_len * math.cos(math.pi / 2.0 * (k + 1) / num_steps))
        masked = max(1, min(masked - 1, target))
        lens.append(masked)
    return lens


def mask_schedule(seq_len: int, num_steps: int = 64) -> list[int]:
    """Number of tokens still masked after each of the `num_steps` steps (list of length K).

    After step k (0-based): floor(L * cos(pi/2 * (k+1) / K)), lowered where needed so that every
    step unmasks at least one token (masked_after_k <= masked_before_k - 1, masked before step 0
    = L), and 0 after the last step. For K <= L that is all (the cosine never forces the count
    to 0 early). For K > L one token per step cannot last K steps; as MAR's `sample_tokens`
    does, the count then stops at 1 until the last step, so those middle steps unmask nothing.
    """
    _check_int("seq_len", seq_len, 1)
    _check_int("num_steps", num_steps, 1)
    lens = _mask_lens(seq_len, num_steps)
    lens[-1] = 0
    return lens


def cfg_schedule(cfg: float, seq_len: int, num_steps: int = 64, kind: str = "linear") -> list[float]:
    """Classifier-free-guidance scale of each step (list of length K).

    "constant": cfg every step. "linear" (Muse, MAR): w_k = 1 + (cfg - 1) * (L - n_k) / L with
    n_k the number of tokens masked after step k, as MAR computes it: its `mask_len`, which is
    `mask_schedule` on every step but the last, where MAR still has mask_len = 1 (not 0), so the
    last step uses 1 + (cfg - 1) * (L - 1) / L rather than cfg. We keep MAR's value so that MAR
    checkpoints sample exactly as they were evaluated (the difference is (cfg - 1) / L).
    """
    _check_int("seq_len", seq_len, 1)
    _check_int("num_steps", num_steps, 1)
    cfg = float(cfg)
    if kind == "constant":
        return [cfg] * num_steps
    if kind == "linear":
        return [1.0 + (cfg - 1.0) * (seq_len - n) / seq_len for n in _mask_lens(seq_len, num_steps)]
    raise ValueError(f"cfg_schedule: kind must be 'linear' or 'constant', got {kind!r}")


def _device_of(generator: torch.Generator | None, device):
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")


def random_orders(batch: int, seq_len: int, *, generator: torch.Generator | None,
                  device=None) -> torch.Tensor:
    """(batch, seq_len) int64: an independent uniformly random permutation of range(seq_len)
    per row (argsort of float64 uniforms: ties have probability ~L^2 / 2^53)."""
    _check_int("batch", batch, 0)
    _check_int("seq_len", seq_len, 1)
    dev = _device_of(generator, device)
    keys = torch.rand(batch, seq_len, dtype=torch.float64, generator=generator, device=dev)
    return keys.argsort(dim=1)


def mask_ratio(*, generator: torch.Generator | None, min_ratio: float = 0.7, mean: float = 1.0,
               std: float = 0.25, size: int | None = None):
    """Training mask ratio: normal(mean, std) truncated to [min_ratio, mean] (MAR's left half
    truncated Gaussian: with the defaults, mean 1.0, std 0.25 on [0.7, 1.0], whose own mean is
    about 0.867). One float per batch (size None), or a float64 tensor of `size` draws.

    Inverse-CDF sampling: u ~ U[0, 1) from `generator`, ratio = mean + std * ndtri(Phi(a) +
    u * (Phi(b) - Phi(a))) with a = (min_ratio - mean) / std, b = 0, in float64."""
    if not (std > 0 and min_ratio < mean):
        raise ValueError(f"mask_ratio: need std > 0 and min_ratio < mean, got std={std}, "
                         f"min_ratio={min_ratio}, mean={mean}")
    n = 1 if size is None else size
    u = torch.rand(n, dtype=torch.float64, generator=generator, device=_device_of(generator, None))

    def phi(z):
        return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))

    lo, hi = phi((min_ratio - mean) / std), 0.5
    r = (mean + std * torch.special.ndtri(lo + u * (hi - lo))).clamp_(min_ratio, mean)
    return float(r[0]) if size is None else r


def training_mask(batch: int, seq_len: int, ratio: float, orders: torch.Tensor) -> torch.Tensor:
    """(batch, seq_len) float: 1 at the first ceil(seq_len * ratio) positions of each row's
    order (the tokens the model must predict), 0 elsewhere (MAR's `random_masking`)."""
    if orders.shape != (batch, seq_len):
        raise ValueError(f"training_mask: orders must have shape ({batch}, {seq_len}), got {tuple(orders.shape)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"training_mask: ratio must be in [0, 1], got {ratio}")
    num = int(math.ceil(seq_len * ratio))
    mask = torch.zeros(batch, seq_len, device=orders.device)
    mask.scatter_(1, orders[:, :num], 1.0)
    return mask


def null_condition_mask(batch: int, p: float = 0.1, *, generator: torch.Generator | None,
                        device=None) -> torch.Tensor:
    """(batch,) bool: True where the label / text is replaced by the learned null embedding
    (independently, with probability p)."""
    _check_int("batch", batch, 0)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"null_condition_mask: p must be in [0, 1], got {p}")
    u = torch.rand(batch, generator=generator, device=_device_of(generator, device))
    return u < p


def next_mask(mask: torch.Tensor, orders: torch.Tensor, num_masked_after: int) -> torch.Tensor:
    """The mask after a sampling step: positions orders[:, :num_masked_after] stay masked, all
    others are known (MAR's `mask_by_order`); same dtype and device as `mask`. The tokens
    predicted in this step are `mask & ~next` (on the last step, everything still masked)."""
    if mask.dim() != 2 or orders.shape != mask.shape:
        raise ValueError(f"next_mask: mask and orders must be (B, L) of one shape, got "
                         f"{tuple(mask.shape)} and {tuple(orders.shape)}")
    if not 0 <= num_masked_after <= mask.shape[1]:
        raise ValueError(f"next_mask: num_masked_after must be in [0, {mask.shape[1]}], got {num_masked_after}")
    out = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    out.scatter_(1, orders[:, :num_masked_after].to(mask.device), True)
    return out.to(mask.dtype)
