"""Point to point under NCCL's semantics, emulated on gloo (xdit_core/parallel/p2p.py).

Every multi-rank path that sends point to point (PipeFusion 2 and 4 stages, PipeFusion x Ulysses,
CFG x PipeFusion, pipelined with warmup 1 of 3 steps, also with reference tokens and text with every patch
(Qwen-Image-Edit, FLUX.2) and HunyuanDiT's skips in the hand-offs; Ulysses; Ring) runs in the emulated mode without
hanging and gives exactly the native latent and byte counts. Negative controls: both ranks sending first
on one channel, PipeFusion's former single-group schedule, and crossed tags pass on native gloo and fail
quickly in the emulated mode. The cases run in the suite's one spawned world (tests/conftest.py); meshes
use the first ranks.
"""
import pytest
import torch

from xdit_core.cli.tiny import write_tiny
from xdit_core.loading.load import load_model
from xdit_core.models.conditioning import random_cond
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.sampling.request import build_request, empty_latent

from test_image_families import CASES
from test_image_families import family_request as make_family_request


TIMEOUT_S = 60.0  # emulated waits of the cases that must pass
CONTROL_TIMEOUT_S = 1.5  # emulated waits of the negative controls: they must fail, quickly
STEPS = 3
CONFIGS = {  # (config, ring_impl); PipeFusion pipelined: warmup 1 of 3 steps, M = stages (2 or 4 patches)
    "pf2": ParallelConfig(pipefusion_parallel_degree=2, warmup_steps=1),
    "pf4": ParallelConfig(pipefusion_parallel_degree=4, warmup_steps=1),
    "pf2_u2": ParallelConfig(pipefusion_parallel_degree=2, ulysses_degree=2, warmup_steps=1),
    "cfg_pf2": ParallelConfig(pipefusion_parallel_degree=2, use_cfg_parallel=True, warmup_steps=1),
    "u2": ParallelConfig(ulysses_degree=2),
    "r2": ParallelConfig(ring_degree=2),
}
# Cancels: name -> (config, rank 0 asks to stop after this many steps). Right after the warmup step, inside the
# warmup (its whole-image hand-off carries the flag), with Ulysses and CFG inside the stages, and Ulysses alone on
# a mesh smaller than the world (its agreement runs on the mesh's own group).
CANCELS = {
    "pf2_cancel": (CONFIGS["pf2"], 2),
    "pf4_cancel": (CONFIGS["pf4"], 2),
    "cfg_pf2_cancel": (CONFIGS["cfg_pf2"], 2),
    "pf2_u2_cancel": (CONFIGS["pf2_u2"], 1),
    "pf2_warmup2_cancel": (ParallelConfig(pipefusion_parallel_degree=2, warmup_steps=2), 1),
    "u2_cancel": (CONFIGS["u2"], 2),
}
SEMANTICS = ("native", "nccl")
# The new families' PipeFusion hand-offs, pipelined (warmup 1 of 3): reference tokens with an evaluation's first
# patch (other references per CFG branch: other sizes), Qwen-Image's text with every patch, FLUX.2's patch size 1.
FAMILY_CASES = {  # name -> (tests/test_image_families.CASES key, config)
    "qwen_edit_pf2": ("qwen_edit", CONFIGS["pf2"]),
    "qwen_edit_cfg_pf2": ("qwen_edit", CONFIGS["cfg_pf2"]),
    "flux2_pf2_u2": ("flux2_edit", CONFIGS["pf2_u2"]),
    "hunyuandit_pf4": ("hunyuandit", CONFIGS["pf4"]),  # its long skips in the hand-offs
}


def make_request(spec, steps=STEPS):
    pos, neg = random_cond(spec, 1, 0, True)
    for c in (pos, neg):
        c.text = c.text[:, :32]
    return build_request(spec, empty_latent(spec, 1, 64, 64), seed=0, steps=steps, cfg=4.0, sampler="euler",
                         scheduler="simple", denoise=1.0, positive=pos, negative=neg)


def world_payload(root):
    """What this module adds to the shared spawned world (tests/conftest.py)."""
    path = str(write_tiny("flux", root / "flux", seed=2))
    request = make_request(load_model(path)[1])
    pf2 = CONFIGS["pf2"]
    cases = [(f"{name}/{sem}", path, config, "p2p", request, sem, TIMEOUT_S)
             for name, config in CONFIGS.items() for sem in SEMANTICS]
    cases += [(f"{name}/{sem}", path, config, "p2p", request, sem, TIMEOUT_S, after)
              for name, (config, after) in CANCELS.items() for sem in SEMANTICS]
    models = {}
    for name, (case, config) in FAMILY_CASES.items():
        family, variant, kind = CASES[case]
        if case not in models:
            models[case] = str(write_tiny(family, root / case, seed=2, variant=variant))
        family_request = make_family_request(load_model(models[case])[1], kind, steps=STEPS)
        cases += [(f"{name}/{sem}", models[case], config, "p2p", family_request, sem, TIMEOUT_S) for sem in SEMANTICS]
    payload = {
        "cases": cases,
        "timeout_s": TIMEOUT_S,
        "control_timeout_s": CONTROL_TIMEOUT_S,
        "single_group_cases": [(f"pf2_single_group/{sem}", path, pf2, "p2p", request, sem, CONTROL_TIMEOUT_S)
                               for sem in SEMANTICS],
        "after_cases": [("pf2_after/nccl", path, pf2, "p2p", request, "nccl", TIMEOUT_S)],
    }
    return payload


@pytest.fixture(scope="module")
def world(spawned_world):
    per_rank = [r["nccl"] for r in spawned_world["per_rank"]]
    timings = per_rank[0]["timings"]
    print(f"\nnccl-semantics part of the shared world: {', '.join(f'{k} {v:.1f}s' for k, v in timings.items())}")
    for name, res in sorted(per_rank[0].items()):
        if isinstance(res, dict) and "seconds" in res:
            print(f"  rank 0 {name:28s} {res['seconds']:6.2f}s" + ("  error" if "error" in res else ""))
    for rank in range(2):
        for name in ("both_send_first/nccl", "tags_crossed/nccl", "pf2_single_group/nccl"):
            if "error" in per_rank[rank][name]:
                print(f"  rank {rank} {name}: {per_rank[rank][name]['error']}")
    return per_rank


@pytest.mark.parametrize("name", list(CONFIGS) + list(CANCELS) + list(FAMILY_CASES))
def test_emulated_nccl_equals_native(world, name):
    """The same latent (bit for bit) and the same bytes per step on every rank, without hanging."""
    config = CONFIGS[name] if name in CONFIGS else CANCELS[name][0] if name in CANCELS else FAMILY_CASES[name][1]
    for rank, results in enumerate(world[:config.world_size]):
        native, nccl = results[f"{name}/native"], results[f"{name}/nccl"]
        if name in CANCELS:
            assert native["error"].startswith("XDiTCancelled") and nccl["error"].startswith("XDiTCancelled")
        else:
            assert "error" not in nccl, nccl.get("error")
        assert nccl["per_step"] == native["per_step"], f"rank {rank}"
        assert sum(s["pipefusion_p2p"] + s["ring_p2p"] for s in nccl["per_step"]) > 0 or config.pipefusion_parallel_degree \
            == config.ring_degree == 1
    if name not in CANCELS:
        assert torch.equal(world[0][f"{name}/nccl"]["out"], world[0][f"{name}/native"]["out"])


@pytest.mark.parametrize("name", list(CANCELS))
def test_cancel_stops_every_rank_at_the_same_step(world, name):
    """Rank 0 asks to stop after step k of 3. Under PipeFusion there is no collective at step boundaries: every
    stage (and both CFG pipelines, every Ulysses rank) finished exactly k steps and says so, stage 0 took the
    inputs the last stage had sent back, and the in-band flag reached every stage (or a wait would time out under
    the NCCL semantics); a later run on the same world is checked by
    test_later_runs_are_unaffected_by_stuck_emulation_threads."""
    config, after = CANCELS[name]
    for rank in range(config.world_size):
        for sem in SEMANTICS:
            res = world[rank][f"{name}/{sem}"]
            assert len(res["per_step"]) == after, (rank, sem)
            assert f"cancelled after step {after} of 3" in res["error"], (rank, sem, res["error"])


def test_both_ranks_sending_first_passes_on_gloo_and_hangs_under_nccl_semantics(world):
    for rank in range(2):
        assert world[rank]["both_send_first/native"]["result"] == float(1 - rank)
        res = world[rank]["both_send_first/nccl"]
        assert "error" in res and "would hang" in res["error"] and "tag 5" in res["error"], res
        assert f"rank {1 - rank}" in res["error"]
        assert res["seconds"] < CONTROL_TIMEOUT_S + 5


def test_ordered_and_batched_large_messages_pass_under_nccl_semantics(world):
    """12 MiB messages: send/receive in matching order, then one batched exchange in both directions."""
    for rank in range(2):
        for sem in SEMANTICS:
            assert world[rank][f"ordered/{sem}"]["result"] == (float(1 - rank), float(1 - rank))


def test_crossed_tags_pass_on_gloo_and_fail_under_nccl_semantics(world):
    assert world[1]["tags_crossed/native"]["result"] == (2.0, 1.0)  # gloo matched by tag
    res = world[1]["tags_crossed/nccl"]
    assert "error" in res and "NCCL would have paired the wrong messages" in res["error"], res
    assert "expected tag 2" in res["error"] and "tag 1" in res["error"]
    assert "error" not in world[0]["tags_crossed/nccl"]  # NCCL would have delivered both, to the wrong receives


def test_pipefusion_on_one_group_passes_on_gloo_and_hangs_under_nccl_semantics(world):
    """The negative control of item 3: PipeFusion's hand-offs both ways on the one pipefusion group."""
    assert torch.equal(world[0]["pf2_single_group/native"]["out"], world[0]["pf2/native"]["out"])
    for rank in range(2):
        res = world[rank]["pf2_single_group/nccl"]
        assert "error" in res and "would hang" in res["error"], res
        assert res["seconds"] < 4 * CONTROL_TIMEOUT_S + 5


def test_later_runs_are_unaffected_by_stuck_emulation_threads(world):
    assert torch.equal(world[0]["pf2_after/nccl"]["out"], world[0]["pf2/native"]["out"])
    assert all(results["threads_left"] == 0 for results in world)
