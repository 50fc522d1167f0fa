"""A PNG preview of a latent without any image library: channels mapped to RGB, written with zlib."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch


def latent_to_rgb(latent: torch.Tensor) -> torch.Tensor:
    """[C, h, w] -> uint8 [h, w, 3] (video [C, frames, h, w]: the frames side by side): a fixed projection of
    the channels, each colour stretched to 0..255.

    Not a VAE decode: it shows the latent's structure, which is all a random-weight model has.
    """
    if latent.ndim == 4:
        latent = torch.cat(latent.unbind(1), dim=-1)
    c = latent.shape[0]
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(3, c, generator=gen)
    rgb = torch.einsum("kc,chw->hwk", proj, latent.float())
    lo = rgb.amin(dim=(0, 1), keepdim=True)
    hi = rgb.amax(dim=(0, 1), keepdim=True)
    return ((rgb - lo) / (hi - lo).clamp_min(1e-8) * 255).round().to(torch.uint8)


def write_png(path: str | Path, rgb: torch.Tensor, scale: int = 4) -> Path:
    """Write uint8 [h, w, 3] as an RGB PNG, each pixel repeated `scale` times for visibility."""
    rgb = rgb.repeat_interleave(scale, 0).repeat_interleave(scale, 1).contiguous()
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + bytes(rgb[y].flatten().tolist()) for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    path = Path(path)
    path.write_bytes(png)
    return path
