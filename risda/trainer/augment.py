"""Augmentation on whole batches of uint8 images already on the training device (airbench style):
no per-image PIL work in the training loop."""
from __future__ import annotations

import torch
import torch.nn.functional as F

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator, pad: int = 4,
                     pad_mode: str = "zeros") -> torch.Tensor:
    """Random HxW crop of each image padded by `pad` pixels, then a random horizontal flip.

    Padding happens on raw pixels, as torchvision's RandomCrop(32, padding=4) does on the PIL
    image, so zero padding is black before normalisation."""
    n, _, h, w = images.shape
    x = images.float()
    mode = "constant" if pad_mode == "zeros" else "reflect"
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    dy = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=x.device, generator=generator)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (n,1,h,1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (n,1,1,w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    crops = padded[batch, chans, rows, cols]
    flip = torch.rand(n, device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8-range images -> (x/255 - mean) / std, per channel."""
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    return (images.float() - mean) / std
