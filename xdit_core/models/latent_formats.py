"""ComfyUI's latent formats (scale/shift between the VAE's space and the model's) and Flux packing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass(frozen=True)
class LatentFormat:
    """One of ComfyUI's `comfy.latent_formats` entries: channel count, spatial dims and affine map (a scalar
    scale and shift, or per-channel means and deviations as the Wan video VAEs')."""

    name: str
    channels: int
    scale: float
    shift: float = 0.0
    dims: int = 2  # ComfyUI's latent_dimensions: 2 for images [B, C, h, w], 3 for video [B, C, t, h, w]
    spatial_scale: int = 8  # pixels per latent row or column (the VAE's downscale)
    means: Optional[tuple[float, ...]] = None
    stds: Optional[tuple[float, ...]] = None

    def _per_channel(self, values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, *[1] * (like.ndim - 2))

    def process_in(self, latent: torch.Tensor) -> torch.Tensor:
        """ComfyUI LATENT space -> model space."""
        if self.means is not None:
            return (latent - self._per_channel(self.means, latent)) * self.scale / self._per_channel(self.stds, latent)
        return (latent - self.shift) * self.scale

    def process_out(self, latent: torch.Tensor) -> torch.Tensor:
        """Model space -> ComfyUI LATENT space."""
        if self.means is not None:
            return latent * self._per_channel(self.stds, latent) / self.scale + self._per_channel(self.means, latent)
        return latent / self.scale + self.shift


SD15 = LatentFormat("SD15", 4, 0.18215)
SDXL = LatentFormat("SDXL", 4, 0.13025)
SD3 = LatentFormat("SD3", 16, 1.5305, 0.0609)
FLUX = LatentFormat("Flux", 16, 0.3611, 0.1159)
# The Wan 2.1 VAE's (16 channels; also Wan 2.2 A14B's) and the Wan 2.2 VAE's (48 channels, the TI2V 5B's)
# per-channel statistics, as ComfyUI's Wan21 and Wan22 formats.
WAN21 = LatentFormat("Wan21", 16, 1.0, dims=3, means=(
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921), stds=(
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160))
WAN22 = LatentFormat("Wan22", 48, 1.0, dims=3, spatial_scale=16, means=(
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667), stds=(
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744))


# FLUX.2: its VAE's 32 channels in 2x2 patches, batch-normalised by the VAE (Flux2Pipeline): the model's space.
FLUX2 = LatentFormat("Flux2", 128, 1.0, spatial_scale=16)


def pack_flux(latent: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/2)(W/2), 4C]: Flux's 2x2 patchify, rows then columns."""
    b, c, h, w = latent.shape
    x = latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def tokens_of(size: int) -> int:
    """Tokens along a latent side of `size` rows: 2x2 patches, an odd side padded (ComfyUI's pad_to_patch_size)."""
    return (size + 1) // 2


def packed_tokens(latents: Sequence[torch.Tensor]) -> int:
    """Tokens of latents packed 2x2 (an odd side padded): what reference latents add to the image's."""
    return sum(tokens_of(r.shape[-2]) * tokens_of(r.shape[-1]) for r in latents)


def offset_placements(shapes: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """(row, column) offsets, in latent rows, of reference latents of `shapes` placed by ComfyUI's "offset" method
    (its Flux and QwenImage models): each beside the ones before when taller than their extent, else below them."""
    out, h, w = [], 0, 0
    for rows, cols in shapes:
        row0, col0 = (0, w) if rows + h > cols + w else (h, 0)
        h, w = max(h, rows + row0), max(w, cols + col0)
        out.append((row0, col0))
    return out


def pad_to_patches(latent: torch.Tensor) -> torch.Tensor:
    """A latent with odd sides padded to even, circularly at the bottom and right, as ComfyUI's pad_to_patch_size."""
    h, w = latent.shape[-2:]
    if h % 2 == 0 and w % 2 == 0:
        return latent
    return torch.nn.functional.pad(latent, (0, w % 2, 0, h % 2), mode="circular")


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
