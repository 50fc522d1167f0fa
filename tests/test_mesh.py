"""Mesh layout and validation (no process is started for any of these)."""
import pytest

from xdit_core.cli.main import main
from xdit_core.errors import XDiTConfigError
from xdit_core.parallel.mesh import ParallelConfig, validate_parallel_config


def test_rank_layout_ulysses_fastest_then_ring_pipefusion_cfg():
    c = ParallelConfig(ulysses_degree=2, ring_degree=2, pipefusion_parallel_degree=1, use_cfg_parallel=True)
    assert c.world_size == 8
    assert c.coords(0) == {"ulysses": 0, "ring": 0, "pipefusion": 0, "cfg": 0}
    assert c.coords(1) == {"ulysses": 1, "ring": 0, "pipefusion": 0, "cfg": 0}
    assert c.coords(2) == {"ulysses": 0, "ring": 1, "pipefusion": 0, "cfg": 0}
    assert c.coords(5) == {"ulysses": 1, "ring": 0, "pipefusion": 0, "cfg": 1}
    assert all(c.rank_of(c.coords(r)) == r for r in range(8))
    assert c.group_ranks("ulysses") == [[0, 1], [2, 3], [4, 5], [6, 7]]  # contiguous
    assert c.group_ranks("ring") == [[0, 2], [1, 3], [4, 6], [5, 7]]  # stride = ulysses degree
    assert c.group_ranks("cfg") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert c.group_ranks(("ulysses", "ring")) == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_pipefusion_dim_sits_between_ring_and_cfg():
    c = ParallelConfig(ulysses_degree=2, pipefusion_parallel_degree=2, use_cfg_parallel=True)
    assert c.coords(2) == {"ulysses": 0, "ring": 0, "pipefusion": 1, "cfg": 0}
    assert c.group_ranks("pipefusion") == [[0, 2], [1, 3], [4, 6], [5, 7]]


@pytest.mark.parametrize("config,kwargs,needle", [
    (ParallelConfig(ulysses_degree=2, ring_degree=2), {"world_size": 8},
     "the mesh needs 4 ranks (cfg 1 x pipefusion 1 x ring 2 x ulysses 2 = 4 ranks) but the world has 8"),
    (ParallelConfig(ulysses_degree=3), {"num_heads": 4},
     "ulysses_degree 3 does not divide the model's 4 attention heads; valid ulysses degrees: [1, 2, 4]"),
    (ParallelConfig(use_cfg_parallel=True), {"cfg": 1.0}, "use_cfg_parallel needs cfg != 1"),
    (ParallelConfig(ulysses_degree=0), {}, "ulysses_degree must be an integer >= 1, got 0"),
    (ParallelConfig(ring_degree=-2), {}, "ring_degree must be an integer >= 1, got -2"),
    (ParallelConfig(warmup_steps=-1), {}, "warmup_steps must be >= 0"),
    (ParallelConfig(num_pipeline_patch=0), {}, "num_pipeline_patch must be >= 1"),
])
def test_validation_errors(config, kwargs, needle):
    with pytest.raises(XDiTConfigError) as e:
        validate_parallel_config(config, **kwargs)
    assert needle in str(e.value)


@pytest.mark.parametrize("flags,needle", [
    (["--ulysses_degree", "3"], "ulysses_degree 3 does not divide the model's 4 attention heads"),
    (["--use_cfg_parallel", "--cfg", "1.0"], "use_cfg_parallel needs cfg != 1"),
    (["--pipefusion_parallel_degree", "5"], "pipefusion_parallel_degree 5 is larger than the model's 4 blocks"),
    (["--pipefusion_parallel_degree", "2", "--warmup_steps", "3"], "warmup_steps 3 is more than the 2 steps"),
    (["--pipefusion_parallel_degree", "2", "--num_pipeline_patch", "5"],
     "num_pipeline_patch 5 is more than this latent's 4 patch rows (64 px high); use at most 4"),
    (["--ulysses_degree", "2", "--attention_backend", "xformers"], "unknown attention backend 'xformers'"),
])
def test_cli_rejects_bad_mesh_before_starting_processes(tiny_models, capsys, monkeypatch, flags, needle):
    import xdit_core.runtime.launch

    def no_spawn(*a, **k):
        raise AssertionError("a process was started")

    monkeypatch.setattr(xdit_core.runtime.launch, "spawn_world", no_spawn)
    rc = main(["generate", "--model", str(tiny_models["sd3"]), "--height", "64", "--width", "64", "--steps", "2",
               "--seed", "0", "--out", "never.safetensors", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and needle in err, err
