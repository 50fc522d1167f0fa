"""Weight sharding (FSDP2 over the ranks that hold the same blocks) equals the unsharded runs exactly, holds about
1/N of the block weights per rank, and counts the bytes it gathers. The cases run in the suite's shared spawned
world (tests/conftest.py) beside test_parallel.py's unsharded ones, with the same requests."""
from dataclasses import replace

import pytest
import torch

from xdit_core.loading.load import load_model
from xdit_core.parallel.stages import split_stages, stage_parts

from test_parallel import CONFIGS, PF_CONFIGS, SIZES, STEPS, make_request, MUTATION_FACTOR, TOL, rel_err

# name in test_parallel's cases -> its config; the sharded case runs the same config with shard_weights on.
SHARDED = {"u2": CONFIGS["u2"], "r2": CONFIGS["r2"], "cfg": CONFIGS["cfg"],
           "pf2_u2": replace(PF_CONFIGS["pf2_u2"], warmup_steps=STEPS)}
FAMILIES = ("flux", "sd3")


def world_payload(paths: dict) -> list:
    """The sharded cases, on test_parallel's models (`paths`: family -> folder) and its requests."""
    h, w, text_len = SIZES["even"]
    cases = []
    for family in FAMILIES:
        _, spec = load_model(paths[family])
        request = make_request(spec, h, w, text_len)
        for name, config in SHARDED.items():
            cases.append((f"{family}/even/{name}@shard", str(paths[family]), replace(config, shard_weights=True),
                          "p2p", request))
        cases.append((f"{family}/even/u2@shard+shard_roll", str(paths[family]),
                      replace(SHARDED["u2"], shard_weights=True), "p2p", request))
    return cases


@pytest.fixture(scope="module")
def world(spawned_world):
    per_rank = [r["parallel"] for r in spawned_world["per_rank"]]
    return per_rank, spawned_world["refs"]


@pytest.mark.parametrize("family,name", [(f, n) for f in FAMILIES for n in SHARDED])
def test_sharded_runs_equal_the_unsharded_ones_exactly(world, family, name):
    per_rank, _ = world
    sharded, plain = per_rank[0][f"{family}/even/{name}@shard"], per_rank[0][f"{family}/even/{name}"]
    assert torch.equal(sharded["out"], plain["out"])
    assert sharded["total"]["shard_gather"] > 0 and plain["total"]["shard_gather"] == 0


@pytest.mark.parametrize("family,name", [(f, n) for f in FAMILIES for n in SHARDED])
def test_each_rank_holds_its_share_of_the_blocks(world, family, name):
    """Between forwards: <= 1.05 x (its stage's block bytes / N) + the modules outside the blocks, on every rank,
    and less than the same mesh unsharded."""
    from test_parallel import PATHS
    from xdit_core.loading.load import block_prefixes, read_model_config

    per_rank, _ = world
    model, spec = load_model(PATHS[family])
    prefixes = block_prefixes(model, spec.family)
    sizes = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    blocks = [sum(v for n, v in sizes.items() if n.startswith(prefix)) for prefix in prefixes]
    other = sum(v for n, v in sizes.items() if not n.startswith(tuple(prefixes)))
    config = SHARDED[name]
    n = config.world_size // config.pipefusion_parallel_degree
    members = [rank for rank in per_rank if f"{family}/even/{name}@shard" in rank]  # the mesh's ranks
    assert len(members) == config.world_size
    for rank in members:
        case = rank[f"{family}/even/{name}@shard"]
        stage = stage_parts(split_stages(read_model_config(PATHS[family]), spec, config.pipefusion_parallel_degree).ranges,
                            case["coords"]["pipefusion"]) \
            if config.pipefusion_parallel_degree > 1 else None
        held_blocks = sum(b for i, b in enumerate(blocks) if stage is None or i in stage.blocks)
        assert case["param_bytes"] <= 1.05 * held_blocks / n + other
        assert case["param_bytes"] < rank[f"{family}/even/{name}"]["param_bytes"]


@pytest.mark.parametrize("family", FAMILIES)
def test_shard_negative_control_is_caught(world, family):
    per_rank, refs = world
    err = rel_err(per_rank[0][f"{family}/even/u2@shard+shard_roll"]["out"], refs[(family, "even")])
    assert err >= MUTATION_FACTOR * TOL


def test_the_loader_hands_over_each_block_before_reading_the_next(tiny_models):
    """load_model's on_block (RankJob shards there): every selected block, in order, as soon as its weights are in
    place and before a byte of the next block is read, so a sharded load holds one block whole at a time."""
    from xdit_core.loading.load import LoadStats, ModelParts, block_prefixes

    for parts, chosen in ((None, None), (ModelParts(range(2, 4)), [2, 3])):
        stats, seen = LoadStats(), []
        model, spec = load_model(tiny_models["flux"], parts=parts, stats=stats, on_block=lambda block: seen.append(
            (block, all(not p.is_meta for p in block.parameters()), stats.bytes_read)))
        prefixes = block_prefixes(model, spec.family)
        blocks = [model.get_submodule(prefix.rstrip(".")) for prefix in prefixes]
        indices = chosen or list(range(len(blocks)))
        assert [b for b, _, _ in seen] == [blocks[i] for i in indices] and all(whole for _, whole, _ in seen)
        sizes = {n: p.numel() * p.element_size() for n, p in model.named_parameters() if not p.is_meta}
        block_bytes = [sum(v for n, v in sizes.items() if n.startswith(prefixes[i])) for i in indices]
        outside = sum(v for n, v in sizes.items() if not n.startswith(tuple(prefixes)))
        # read so far when block k is handed over: everything outside the blocks, then blocks 0..k, nothing more
        assert [read for _, _, read in seen] == [outside + sum(block_bytes[:k + 1]) for k in range(len(indices))]
