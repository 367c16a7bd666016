"""Batches of pre-encoded inputs (`fluid-ops prepare`): image tokens and frozen text-encoder
outputs computed once, so a training step never runs the VAE / tokenizer or the text encoder.

`Fluid.forward(PreparedTokens, PreparedText, generator=...)` gives the loss
`Fluid.forward(images, captions, generator=...)` gives for the same images and captions (with
one view; with two views, one is drawn per image from `generator`, see `Fluid`)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PreparedTokens", "PreparedText"]


@dataclass
class PreparedTokens:
    """tokens: (B, V, L, C) float (continuous tokens: VAE latents or pixel patches); V views of
    each image (V = 2: [as is, flipped left-right], as MAR caches its latents)."""
    tokens: torch.Tensor

    def __post_init__(self):
        t = self.tokens
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"PreparedTokens: tokens must be a float tensor (B, views, L, C), got {got}")

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def shape(self):
        return self.tokens.shape

    def to(self, device, non_blocking: bool = False) -> "PreparedTokens":
        return PreparedTokens(self.tokens.to(device, non_blocking=non_blocking))


@dataclass
class PreparedText:
    """The frozen text encoder's output for a batch: emb (B, Nt, D) float, mask (B, Nt) bool
    (True = real token), padded to the batch's longest caption as `TextEncoder.encode` pads."""
    emb: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self):
        if (not isinstance(self.emb, torch.Tensor) or self.emb.dim() != 3 or not isinstance(self.mask, torch.Tensor)
                or self.mask.dtype != torch.bool or tuple(self.mask.shape) != tuple(self.emb.shape[:2])):
            raise ValueError("PreparedText: emb must be (B, Nt, D) and mask (B, Nt) bool, got "
                             f"{getattr(self.emb, 'shape', self.emb)} and {getattr(self.mask, 'shape', self.mask)}")

    def __len__(self) -> int:
        return self.emb.shape[0]

    def to(self, device, non_blocking: bool = False) -> "PreparedText":
        return PreparedText(self.emb.to(device, non_blocking=non_blocking),
                            self.mask.to(device, non_blocking=non_blocking))

    @staticmethod
    def collate(embs: list[torch.Tensor]) -> "PreparedText":
        """Per-caption (n_i, D) outputs -> padded batch (zeros past each caption's end)."""
        n = max(e.shape[0] for e in embs)
        out = torch.zeros(len(embs), n, embs[0].shape[1], dtype=embs[0].dtype)
        mask = torch.zeros(len(embs), n, dtype=torch.bool)
        for i, e in enumerate(embs):
            out[i, :e.shape[0]] = e
            mask[i, :e.shape[0]] = True
        return PreparedText(out, mask)
