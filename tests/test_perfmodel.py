"""The performance model (xdit_core/parallel/perf_model.py): its communication formulas against the PipeFusion paper's
table, its message sizes against our counters, its ranking against CPU measurements, and the claims about
links that the method advice rests on.

The CPU measurements are a fixture written by `python -m bench cpu_scaling --publish` (the calibrated
workload, the gloo link and every config's measured times and bytes); regenerating it re-measures.
"""

import itertools
import json
from dataclasses import replace
from pathlib import Path

import pytest
import sympy

from bench.calibrate import link_from_json, spread_ok, workload_from_json
from bench.perfmodel import PAPER_METHODS, exact_comm_elements, paper_comm_elements
from xdit_core.parallel.perf_model import (LINKS, BlockCost, Cluster, Workload, message_bytes, pipe_units, predict,
                                           uniform_link)
from xdit_core.parallel.perf_workloads import FLUX_DEV, WAN21_T2V_14B, flop_workload
from xdit_core.parallel.mesh import ParallelConfig

FIXTURE = Path(__file__).parent / "fixtures" / "perf_cpu.json"
pc = ParallelConfig


# --------------------------------------------------------------------------------------------------
# The paper's communication table, symbolically
# --------------------------------------------------------------------------------------------------
p, hs, L, N = sympy.symbols("p hs L N", positive=True)


@pytest.mark.parametrize("method", PAPER_METHODS)
def test_exact_volumes_reduce_to_the_papers_table(method):
    """Per device per step, the exact volume of each method has the paper's order in p, hs, L and N:
    the ratio tends to 1 as N grows (the paper drops the (N-1)/N of ring collectives)."""
    exact = exact_comm_elements(method, p, hs, L, N)
    paper = paper_comm_elements(method, p, hs, L, N)
    ratio = sympy.simplify(exact / paper)
    assert ratio.free_symbols <= {N}, f"{method}: the ratio depends on the shapes: {ratio}"
    assert sympy.limit(ratio, N, sympy.oo) == 1
    if method == "pipefusion":
        assert ratio == 1  # independent of N and of the depth L
    else:
        assert sympy.simplify(ratio - (N - 1) / N) == 0


def test_papers_table_orders_the_methods():
    """PipeFusion's volume is independent of L; per layer, Ulysses < Ring = DistriFusion < TP for every N > 2."""
    vol = {m: paper_comm_elements(m, p, hs, L, N) for m in PAPER_METHODS}
    assert sympy.diff(vol["pipefusion"], L) == 0
    assert all(sympy.diff(vol[m], L) != 0 for m in PAPER_METHODS if m != "pipefusion")
    assert sympy.simplify(vol["ring"] - vol["distrifusion"]) == 0
    ulysses_below_ring = sympy.solve_univariate_inequality(vol["ulysses"] < vol["ring"], N, relational=False)
    assert ulysses_below_ring.intersect(sympy.Interval.open(0, sympy.oo)) == sympy.Interval.open(2, sympy.oo)
    assert sympy.simplify(vol["tensor_parallel"] / vol["ring"]) == 2


def _image_only(tokens: int = 64, heads: int = 8, head_dim: int = 16, layers: int = 4, bytes_: int = 4) -> Workload:
    """A workload whose only sequence is the image (cross-attention text moves no bytes), as in the paper."""
    block = BlockCost(0.0, 0.0, 0.0, 0.0)
    side = int(tokens**0.5) * 2
    return Workload(
        "image only",
        (block,) * layers,
        (1,) * layers,
        heads,
        head_dim,
        tokens,
        16,
        False,
        (1, 4, side, side),
        act_bytes=bytes_,
        cross_text=True,
    )


@pytest.mark.parametrize("n", [2, 4, 8])
def test_message_sizes_equal_the_exact_formulas(n):
    """The model's per-rank bytes for one step equal the exact volumes times the element size."""
    w = _image_only()
    shape = dict(p=w.img_tokens, hs=w.hidden, L=len(w.blocks), N=n)
    uly = message_bytes(w, pc(ulysses_degree=n))
    ring = message_bytes(w, pc(ring_degree=n))
    assert uly["ulysses_all_to_all"] == exact_comm_elements("ulysses", **shape) * w.act_bytes
    assert ring["ring_p2p"] == exact_comm_elements("ring", **shape) * w.act_bytes
    # PipeFusion: a middle stage receives and sends every patch's activations once per step; the
    # counters count what a rank sends, half of the paper's figure, plus each hand-off's cancel flag element.
    pf = pc(pipefusion_parallel_degree=4, num_pipeline_patch=4, warmup_steps=0)
    middle = message_bytes(w, pf, rank=pf.rank_of({"ulysses": 0, "ring": 0, "pipefusion": 1, "cfg": 0}))
    flags = 4 * w.act_bytes
    assert 2 * (middle["pipefusion_p2p"] - flags) == exact_comm_elements("pipefusion", **shape) * w.act_bytes


def test_pipefusion_bytes_do_not_grow_with_depth_and_sp_bytes_do():
    shallow, deep = _image_only(layers=4), _image_only(layers=8)
    pf = pc(pipefusion_parallel_degree=2, warmup_steps=0)
    assert message_bytes(shallow, pf)["pipefusion_p2p"] == message_bytes(deep, pf)["pipefusion_p2p"] > 0
    uly = pc(ulysses_degree=2)
    assert 2 * message_bytes(shallow, uly)["ulysses_all_to_all"] == message_bytes(deep, uly)["ulysses_all_to_all"]


# --------------------------------------------------------------------------------------------------
# Against the CPU measurements (fixture)
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu():
    data = json.loads(FIXTURE.read_text())
    workloads = {k: workload_from_json(v) for k, v in data["workloads"].items()}
    cluster = Cluster("fixture", link_from_json(data["link"]), contention=data["contention"])
    return data, workloads, cluster


def _predict(cpu, row):
    data, workloads, cluster = cpu
    return predict(workloads[row["request"]], pc(**row["config"]), cluster, data["steps"], row["ring_impl"]).total


def test_model_bytes_equal_the_measured_counters(cpu):
    data, workloads, _ = cpu
    checked = 0
    for name, row in data["rows"].items():
        cfg = pc(**row["config"])
        for r in range(cfg.world_size):
            model = message_bytes(workloads[row["request"]], cfg, r, data["steps"], row["ring_impl"])
            measured = {k: v for k, v in row["bytes"][str(r)].items() if v}
            assert {k: v for k, v in model.items() if v} == measured, f"{name}, rank {r}"
            checked += 1
    assert checked >= 10


def test_model_ranks_configs_as_measured_where_the_difference_exceeds_the_spread(cpu):
    """Every pair of configs of the same request (serial included) whose measured ranges are disjoint is
    ordered the same way by the model, and there are at least four such pairs. (Since PipeFusion runs as one
    pipeline across steps, the 2-rank configs of this small request lie within each other's spread, so the
    pairs are mostly serial against each parallel config.)"""
    data, _, _ = cpu
    rows = data["rows"]
    pairs = 0
    for a, b in itertools.combinations(rows, 2):
        ma, mb = rows[a]["measured"], rows[b]["measured"]
        if rows[a]["request"] != rows[b]["request"] or not spread_ok(ma, mb):
            continue
        pairs += 1
        measured_faster = ma["median"] < mb["median"]
        predicted_faster = _predict(cpu, rows[a]) < _predict(cpu, rows[b])
        assert measured_faster == predicted_faster, (
            f"measured {a} {ma['median']:.3f} s vs {b} {mb['median']:.3f} s; predicted "
            f"{_predict(cpu, rows[a]):.3f} vs {_predict(cpu, rows[b]):.3f}"
        )
    assert pairs >= 4, "too few configs differ beyond their spread to test the ranking"


def test_model_error_on_the_cpu_is_bounded(cpu):
    """The calibrated model predicts every measured config within 25% (docs/performance.md states the errors)."""
    data, _, _ = cpu
    for name, row in data["rows"].items():
        error = _predict(cpu, row) / row["measured"]["median"] - 1
        assert abs(error) < 0.25, f"{name}: predicted {100 * error:+.0f}%"


# --------------------------------------------------------------------------------------------------
# Links: what the method advice rests on
# --------------------------------------------------------------------------------------------------
def _flux_1024(s_per_flop: float = 2.5e-15) -> Workload:
    return flop_workload(FLUX_DEV, 1024, 1024, s_per_flop=s_per_flop)


def test_slower_links_never_make_a_config_faster():
    w = _flux_1024()
    for cfg in (
        pc(ulysses_degree=4),
        pc(ring_degree=4),
        pc(pipefusion_parallel_degree=4, warmup_steps=1),
        pc(ulysses_degree=2, ring_degree=2),
    ):
        times = [predict(w, cfg, Cluster(k, LINKS[k]), 28).total for k in ("nvlink", "pcie", "eth25")]
        assert times == sorted(times), cfg.describe()


def test_pipefusion_is_the_least_link_sensitive_method():
    """The PipeFusion paper's claim: over a slow link (25 GbE) PipeFusion loses least against NVLink."""
    w = _flux_1024()
    slowdown = {}
    for name, cfg in {
        "ulysses": pc(ulysses_degree=4),
        "ring": pc(ring_degree=4),
        # M = 2 stages: a patch's hand-offs hide behind the next patches (at M = stages the round trip of the
        # patch that carries the text, hand-offs included, sets the period).
        "pipefusion": pc(pipefusion_parallel_degree=4, num_pipeline_patch=8, warmup_steps=1),
    }.items():
        fast, slow = (predict(w, cfg, Cluster(k, LINKS[k]), 28).total for k in ("nvlink", "eth25"))
        slowdown[name] = slow / fast
    assert slowdown["pipefusion"] < min(slowdown["ulysses"], slowdown["ring"])
    assert slowdown["pipefusion"] < 1.1


def test_free_links_give_ideal_sequence_parallel_speedup():
    """With no communication cost and no fixed costs, Ulysses over N ranks divides the time by N."""
    free = Cluster("free", uniform_link("free", float("inf"), 0.0))
    w = _flux_1024()
    serial = predict(w, pc(), free, 28).total
    for n in (2, 4, 8):
        assert predict(w, pc(ulysses_degree=n), free, 28).total == pytest.approx(serial / n, rel=1e-9)


# --------------------------------------------------------------------------------------------------
# Video with cross-attention text: Wan2.1 T2V 14B at 720p
# --------------------------------------------------------------------------------------------------
def _wan_720p(arch=WAN21_T2V_14B, s_per_flop: float = 2e-15) -> Workload:
    return flop_workload(arch, 720, 1280, frames=81, branches=2, s_per_flop=s_per_flop)


def test_wan_720p_81_frames_is_75600_video_tokens_with_cross_attention_text():
    w = _wan_720p()
    assert w.img_tokens == 21 * (720 // 16) * (1280 // 16) == 75_600
    assert (w.joint_text, w.cross_text, w.txt_tokens) == (False, True, 512)
    assert w.latent == (1, 16, 21 * 90, 160)  # 21 latent frames stacked as rows: the CFG gather's bytes
    assert sum(WAN21_T2V_14B.block_param_bytes()) / 2 == pytest.approx(14.05e9, rel=1e-3)  # the "14B", bf16


@pytest.mark.parametrize("config", [pc(ulysses_degree=8), pc(ring_degree=8), pc(ulysses_degree=4, ring_degree=2),
                                    pc(use_cfg_parallel=True, ulysses_degree=4)])
def test_wan_cross_attention_text_is_never_exchanged(config):
    """The 512 text tokens are replicated on every rank: no byte of theirs moves (the same bytes without any
    text), and Ulysses moves exactly the video tokens' Q, K, V and output, per branch."""
    with_text, no_text = _wan_720p(), _wan_720p(replace(WAN21_T2V_14B, txt_tokens=0))
    for rank in range(config.world_size):
        assert message_bytes(with_text, config, rank, 50) == message_bytes(no_text, config, rank, 50)
    uly = message_bytes(with_text, pc(ulysses_degree=8))
    shape = dict(p=75_600, hs=5120, L=40, N=8)
    assert uly["ulysses_all_to_all"] == 2 * exact_comm_elements("ulysses", **shape) * 2  # 2 branches, bf16
    assert uly["ulysses_all_gather"] == 0


@pytest.mark.parametrize("config", [pc(ulysses_degree=4), pc(ring_degree=4)])
def test_wan_text_projections_are_replicated_not_split(config):
    """Over free links, sequence parallelism divides everything by N except the text's cross-attention key and
    value projections, which every rank computes in full."""
    free = Cluster("free", uniform_link("free", float("inf"), 0.0))
    s_per_flop = 2e-15
    w = _wan_720p(s_per_flop=s_per_flop)
    serial = predict(w, pc(), free, 1).per_step
    kv = w.branches * len(w.blocks) * WAN21_T2V_14B.text_kv_flops() * s_per_flop
    assert kv > 0
    n = config.world_size
    assert predict(w, config, free, 1).per_step == pytest.approx(serial / n + (1 - 1 / n) * kv, rel=1e-12)


# --------------------------------------------------------------------------------------------------
# The GPU script's code path, on the CPU with a small model (its times mean nothing here)
# --------------------------------------------------------------------------------------------------
def test_gpu_script_runs_end_to_end_on_cpu_with_a_small_model(tmp_path):
    from bench import gpu

    out = tmp_path / "gpu.json"
    args = ["--device", "cpu", "--small", "--steps", "1", "--repeats", "1", "--size", "64", "--sizes", "64", "128"]
    assert gpu.main(args + ["--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["engine_vs_diffusers"]["max_rel_diff"] < 1e-2  # our loop and diffusers' agree (bf16)
    samples = result["blocks"]["samples"]
    assert samples["kinds"] == ["FluxTransformerBlock", "FluxSingleTransformerBlock", "FluxSingleTransformerBlock"]
    assert [(i, n) for i, n, _ in samples["rest"]] == [(i, n) for n in (16 + 512, 64 + 512) for i in range(3)]
    assert result["attention_ms"]["torch SDPA (no LSE)"] > 0 and result["attention_ms"]["ours: sdpa (+ LSE)"] > 0


# --------------------------------------------------------------------------------------------------
# PipeFusion's schedule: stages by compute, no drain per step, patch-local embedding, text with patch 0
# --------------------------------------------------------------------------------------------------
def _joint(block: BlockCost, embed=(0.0, 0.0), layers: int = 4, split=None) -> Workload:
    """A joint-text workload of 1024 image tokens (32 x 32) and 64 text tokens whose costs are `block`'s."""
    return Workload("joint", (block,) * layers, tuple(split or (1.0,) * layers), 8, 16, 1024, 64, True,
                    (1, 4, 64, 64), embed=embed)


def test_flux_stages_split_by_compute_are_equal_block_counts():
    """FLUX.1-dev's double and single blocks cost the same FLOPs per token: 57 blocks split 28 | 29, and the
    predicted stage times are balanced where a split by bytes (a double block holds 2.4x a single's) was not."""
    w = _flux_1024()
    assert sorted(len(r) for r in w.stages(2)) == [28, 29]
    cluster = Cluster("nvlink", LINKS["nvlink"])
    by_flops = predict(w, pc(pipefusion_parallel_degree=2), cluster, 28)
    by_bytes = predict(replace(w, split_costs=FLUX_DEV.block_param_bytes()), pc(pipefusion_parallel_degree=2), cluster, 28)
    assert len(by_flops.stage_times) == 2
    assert by_flops.breakdown["imbalance"] < 1.05 < by_bytes.breakdown["imbalance"]
    assert by_flops.total < by_bytes.total


@pytest.mark.parametrize("warmup", [0, 1, 3])
def test_pipefusion_pays_fill_and_drain_once_not_per_step(warmup):
    """After the warmup steps every further step adds exactly one period: patches flow across step boundaries."""
    w = _flux_1024()
    cfg, cluster = pc(pipefusion_parallel_degree=4, warmup_steps=warmup), Cluster("pcie", LINKS["pcie"])
    t = {n: predict(w, cfg, cluster, n) for n in (10, 11, 20)}
    period = t[10].breakdown["period"]
    assert t[11].total - t[10].total == pytest.approx(period, rel=1e-9)
    assert t[20].total - t[10].total == pytest.approx(10 * period, rel=1e-9)
    fill_drain = t[10].breakdown["fill_drain"]
    assert 0 < fill_drain < period
    assert t[10].total == pytest.approx(warmup * t[10].breakdown["warmup_step"] + (10 - warmup) * period + fill_drain)


def test_stage_0_embeds_only_its_patches_and_the_others_only_the_timestep():
    e0, e1 = 1e-3, 1e-6
    w = _joint(BlockCost(0.0, 0.0, 0.0, 0.0), embed=(e0, e1))
    p = predict(w, pc(pipefusion_parallel_degree=2, num_pipeline_patch=4), Cluster("free", uniform_link("f", float("inf"), 0.0)), 3)
    assert p.stage_times[0] == pytest.approx(e0 + e1 * (w.img_tokens + w.txt_tokens))
    assert p.stage_times[1] == pytest.approx(e0)


def test_text_is_computed_once_per_stage_and_step_whatever_the_patches():
    """Per-token work only: a pipelined step costs each stage the image once and the text once, for any M."""
    w = _joint(BlockCost(0.0, 1e-6, 0.0, 0.0))
    free = Cluster("free", uniform_link("f", float("inf"), 0.0))
    for m in (2, 4, 8):
        p = predict(w, pc(pipefusion_parallel_degree=2, num_pipeline_patch=m), free, 3)
        assert p.stage_times == pytest.approx((2 * 1e-6 * (w.img_tokens + w.txt_tokens),) * 2)


@pytest.mark.parametrize("patches", [2, 4])
def test_handoffs_carry_the_text_with_patch_0_only_and_a_flag_each(patches):
    """Stage 0's bytes per pipelined step: every patch's image tokens, the text once, one flag per hand-off; a
    warmup step: the whole image with its text and one flag."""
    w = _joint(BlockCost(0.0, 0.0, 0.0, 0.0))
    cfg = pc(pipefusion_parallel_degree=2, num_pipeline_patch=patches, warmup_steps=1)
    units = pipe_units(w, cfg, warm=False)
    assert [u.text for u in units] == [True] + [False] * (patches - 1)
    assert sum(u.tokens for u in units) == w.img_tokens
    one, two = (message_bytes(w, cfg, 0, n)["pipefusion_p2p"] for n in (1, 2))
    a = w.act_bytes
    assert one == ((w.img_tokens + w.txt_tokens) * w.hidden + 1) * a
    assert two - one == ((w.img_tokens + w.txt_tokens) * w.hidden + patches) * a
