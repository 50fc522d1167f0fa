"""PipeFusion's stage split (by compute, under an optional memory cap) and patches, including the real models'
configs on the meta device, and the patch-local image embedding."""
import json
from pathlib import Path

import pytest
import torch

from xdit_core.cli.tiny import build_tiny
from xdit_core.errors import XDiTConfigError
from xdit_core.models import make_adapter
from xdit_core.models.base import BranchCond
from xdit_core.models.families import model_class, resolve_model_spec
from xdit_core.parallel.stages import balance_stages, block_flops, patch_rows, split_stages

CONFIGS = Path(__file__).resolve().parent.parent / "xdit_core" / "loading" / "configs"


def test_balance_is_optimal_and_contiguous():
    costs = [24, 24, 10, 10, 10, 10, 10, 10]
    ranges = balance_stages(costs, 2)
    assert [list(r) for r in ranges] == [[0, 1, 2], [3, 4, 5, 6, 7]]  # 58 / 50: no split does better
    best = min(max(sum(costs[:i]), sum(costs[i:])) for i in range(1, 8))
    assert max(sum(costs[i] for i in r) for r in ranges) == best
    with pytest.raises(XDiTConfigError, match="pipefusion_parallel_degree 9 is larger than the model's 8 blocks"):
        balance_stages(costs, 9)


def test_balance_respects_the_memory_cap():
    """Equal compute, the first blocks heavy in bytes: the cap moves the cut to keep the first stage's bytes under it."""
    costs, sizes = [1] * 6, [4, 4, 4, 1, 1, 1]
    assert [list(r) for r in balance_stages(costs, 2, sizes)] == [[0, 1, 2], [3, 4, 5]]  # 12 | 3 bytes
    capped = balance_stages(costs, 2, sizes, cap=9)
    assert [list(r) for r in capped] == [[0, 1], [2, 3, 4, 5]]
    assert all(sum(sizes[i] for i in r) <= 9 for r in capped)
    with pytest.raises(XDiTConfigError, match="under"):
        balance_stages(costs, 2, sizes, cap=5)


def test_patch_rows_cover_the_latent_in_whole_patch_rows():
    assert patch_rows(8, 2, 2) == [(0, 4), (4, 8)]
    assert patch_rows(6, 2, 2) == [(0, 4), (4, 6)]  # 3 patch rows in 2 strips
    assert patch_rows(4, 4, 2) == [(0, 2), (2, 4)]  # fewer patch rows than asked: effective M = 2


def _real(name):
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    return config, resolve_model_spec(config)


@pytest.mark.parametrize("name", ["flux1-dev", "sd3.5-large", "pixart-sigma-xl-2-1024-ms"])
@pytest.mark.parametrize("stages", [2, 4, 8])
def test_real_models_stages_balanced_by_compute_within_15_percent(name, stages):
    config, spec = _real(name)
    split = split_stages(config, spec, stages)
    print(f"{name} {stages} stages: blocks {[len(r) for r in split.ranges]}, slowest / mean FLOPs {split.imbalance:.3f}")
    assert split.imbalance <= 1.15
    assert [i for r in split.ranges for i in r] == list(range(spec.num_blocks))


def test_flux_blocks_cost_the_same_though_double_blocks_weigh_more():
    """Why bytes are the wrong measure: FLUX.1-dev's double blocks hold 2.4x the bytes of a single block for
    the same FLOPs per token, so a byte split leaves stage 0 with far fewer FLOPs; the compute split is even."""
    config, spec = _real("flux1-dev")
    flops = block_flops(config, spec)
    init = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        blocks = [b for b, _ in make_adapter(model_class("flux")(**init), spec).blocks()]
    sizes = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks]
    assert sizes[0] / sizes[-1] > 2.2 and abs(flops[0] / flops[-1] - 1) < 0.02
    by_bytes = balance_stages(sizes, 2)
    imbalance_bytes = max(sum(flops[i] for i in r) for r in by_bytes) / (sum(flops) / 2)
    assert imbalance_bytes > 1.3 and split_stages(config, spec, 2).imbalance < 1.05


@pytest.mark.parametrize("family", ["flux", "sd3", "pixart"])
@pytest.mark.parametrize("h,w", [(16, 16), (24, 16), (12, 20)])
def test_patch_embedding_equals_the_slice_of_the_whole_embedding(family, h, w):
    """PipeFusion embeds each patch's rows only: bit for bit the rows' tokens of the whole image's embedding,
    including the position tables (stored, interpolated or cropped: the sizes differ from the tiny default)."""
    model = build_tiny(family)
    spec = resolve_model_spec(dict(model.config), family, None)
    adapter = make_adapter(model, spec)
    x = torch.randn(1, spec.latent_format.channels, h, w)
    pooled = None if spec.pooled_dim is None else torch.randn(1, spec.pooled_dim)
    full = adapter.embed(x, torch.ones(1), BranchCond(torch.randn(1, 7, spec.text_dim), pooled, 3.5), 3.5).img
    per_row = w // 2
    for r0, r1 in [(0, 4), (4, h), (2, 6)]:
        assert torch.equal(adapter.embed_image(x[:, :, r0:r1], r0, h), full[:, r0 // 2 * per_row:r1 // 2 * per_row])
