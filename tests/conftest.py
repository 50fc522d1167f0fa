import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny diffusers folders of every family and variant, written once per session."""
    from xdit_core.cli.tiny import write_tiny

    root = tmp_path_factory.mktemp("models")
    specs = {"flux": ("flux", "dev"), "flux_schnell": ("flux", "schnell"), "sd3": ("sd3", None),
             "pixart": ("pixart", "alpha"), "pixart_sigma": ("pixart", "sigma")}
    return {name: write_tiny(fam, root / name, seed=1, variant=var) for name, (fam, var) in specs.items()}


@pytest.fixture(scope="session")
def spawned_world(tmp_path_factory):
    """The suite's one spawned world of 8 gloo ranks (spawning costs seconds per process here). The parity
    cases of test_parallel.py, test_wan.py, test_image_families.py and test_sharding.py, then the point-to-point cases of test_nccl_semantics.py, run in
    it in turn;
    smaller meshes use the first ranks."""
    import parallel_world
    from test_nccl_semantics import world_payload as nccl_payload
    from test_parallel import PATHS
    from test_parallel import world_payload as parallel_payload
    from test_sharding import world_payload as sharding_payload
    from test_image_families import world_payload as families_payload
    from test_wan import world_payload as wan_payload
    from xdit_core.runtime.launch import spawn_world

    cases, refs, shapes = parallel_payload(tmp_path_factory.mktemp("par"))
    wan_cases, wan_refs = wan_payload(tmp_path_factory.mktemp("wan"))
    family_cases, family_refs = families_payload(tmp_path_factory.mktemp("families"))
    cases = cases + wan_cases + family_cases + sharding_payload(PATHS)
    refs = {**refs, **wan_refs, **family_refs}
    payload = {"parallel": cases, "nccl": nccl_payload(tmp_path_factory.mktemp("nccl"))}
    # The ranks start with diffusers' attention backend set to flex (the serial references used native SDPA):
    # the dispatcher families (Flux) must then be routed at the dispatcher, not at the SDPA call that the
    # native backend would have made.
    previous = os.environ.get("DIFFUSERS_ATTN_BACKEND")
    os.environ["DIFFUSERS_ATTN_BACKEND"] = "flex"
    try:
        per_rank = spawn_world(parallel_world.run_all, 8, payload, threads=1, timeout_s=900)
    finally:
        if previous is None:
            os.environ.pop("DIFFUSERS_ATTN_BACKEND")
        else:
            os.environ["DIFFUSERS_ATTN_BACKEND"] = previous
    return {"per_rank": per_rank, "refs": refs, "shapes": shapes}
