"""PipeFusion's stage split and patches, including the real models' configs on the meta device."""
import json
from pathlib import Path

import pytest
import torch

from xdit_core.errors import XDiTConfigError
from xdit_core.models.families import resolve_model_spec
from xdit_core.models import make_adapter
from xdit_core.parallel.stages import balance_stages, module_bytes, patch_rows
from xdit_core.models.families import model_class

CONFIGS = Path(__file__).resolve().parent.parent / "xdit_core" / "loading" / "configs"


def test_balance_is_optimal_and_contiguous():
    bytes_ = [24, 24, 10, 10, 10, 10, 10, 10]  # two heavy double-stream blocks, then single-stream ones
    ranges = balance_stages(bytes_, 2)
    assert [list(r) for r in ranges] == [[0, 1, 2], [3, 4, 5, 6, 7]]  # 58 / 50: no split does better
    best = min(max(sum(bytes_[:i]), sum(bytes_[i:])) for i in range(1, 8))
    assert max(sum(bytes_[i] for i in r) for r in ranges) == best
    with pytest.raises(XDiTConfigError, match="pipefusion_parallel_degree 9 is larger than the model's 8 blocks"):
        balance_stages(bytes_, 9)


def test_patch_rows_cover_the_latent_in_whole_patch_rows():
    assert patch_rows(8, 2, 2) == [(0, 4), (4, 8)]
    assert patch_rows(6, 2, 2) == [(0, 4), (4, 6)]  # 3 patch rows in 2 strips
    assert patch_rows(4, 4, 2) == [(0, 2), (2, 4)]  # fewer patch rows than asked: effective M = 2


@pytest.mark.parametrize("name", ["flux1-dev", "sd3.5-large", "pixart-sigma-xl-2-1024-ms"])
@pytest.mark.parametrize("stages", [2, 4, 8])
def test_real_models_stages_balanced_within_15_percent(name, stages):
    config = json.loads((CONFIGS / f"{name}.json").read_text())
    spec = resolve_model_spec(config)
    init = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        model = model_class(spec.family)(**init)
    blocks = [b for b, _ in make_adapter(model, spec).blocks()]
    sizes = [module_bytes(b) for b in blocks]
    per_stage = [sum(sizes[i] for i in r) for r in balance_stages(sizes, stages)]
    ratio = max(per_stage) / (sum(per_stage) / stages)
    print(f"{name} {stages} stages: largest / mean block bytes = {ratio:.3f}")
    assert ratio <= 1.15
