"""Embedding extraction for evaluation: batched, in eval mode, optionally with the flip test.

With ``flip=True`` the feature of an image is ``f(x) + f(flip(x))`` (not normalised), the "flip-add"
fusion of insightface's verification.py and eval_ijbc.py; protocols normalise it as they require.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bench.data.loader import normalise


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor | np.ndarray, device: torch.device,
                     batch_size: int = 512, flip: bool = True) -> np.ndarray:
    """float32 features ``[N, D]`` of uint8 images ``[N, 3, H, W]``."""
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    was_training = encoder.training
    encoder.eval()
    try:
        chunks = []
        for start in range(0, images.shape[0], batch_size):
            batch = normalise(images[start:start + batch_size].to(device, non_blocking=True))
            feats = encoder(batch).float()
            if flip:
                feats = feats + encoder(batch.flip(-1)).float()
            chunks.append(feats.cpu())
        return torch.cat(chunks).numpy()
    finally:
        encoder.train(was_training)


def l2_normalise(features: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)
