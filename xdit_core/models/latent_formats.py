"""ComfyUI's latent formats (scale/shift between the VAE's space and the model's) and Flux packing."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LatentFormat:
    """One of ComfyUI's `comfy.latent_formats` entries: channel count and affine map."""

    name: str
    channels: int
    scale: float
    shift: float = 0.0

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        """ComfyUI LATENT space -> model space."""
        return (latent - self.shift) * self.scale

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        """Model space -> ComfyUI LATENT space."""
        return latent / self.scale + self.shift


SD15 = LatentFormat("SD15", 4, 0.18215)
SDXL = LatentFormat("SDXL", 4, 0.13025)
SD3 = LatentFormat("SD3", 16, 1.5305, 0.0609)
FLUX = LatentFormat("Flux", 16, 0.3611, 0.1159)


def pack_flux(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: Flux's 2x2 patchify, rows then columns."""
    b, c, h, w = latent.shape
    x = latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_flux(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_flux` for a latent of `height` x `width`."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def flux_image_ids(height: int, width: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Position ids [(H/2)(W/2), 3] of the packed tokens: (0, row, column), as ComfyUI and diffusers use."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(dtype)
