"""Ulysses, Ring, USP and CFG parallel equal serial; the byte counters equal the analytic formulas.

All cases run in one spawned world of 8 gloo ranks (spawning costs seconds per process here);
smaller meshes use the first ranks.
"""
import pytest
import torch

from xdit_core.comm import COMM_KINDS
from xdit_core.conditioning import random_cond
from xdit_core.engine import run_request
from xdit_core.launch import spawn_world
from xdit_core.loading import load_model
from xdit_core.mesh import ParallelConfig
from xdit_core.models import make_adapter
from xdit_core.request import build_request, empty_latent
from xdit_core.tiny import write_tiny

import parallel_world

TOL = 1e-4  # max|parallel - serial| / max|serial|
STEPS, CFG = 2, 4.0
CONFIGS = {
    "u2": ParallelConfig(ulysses_degree=2),
    "u4": ParallelConfig(ulysses_degree=4),
    "r2": ParallelConfig(ring_degree=2),
    "r4": ParallelConfig(ring_degree=4),
    "u2r2": ParallelConfig(ulysses_degree=2, ring_degree=2),
    "cfg": ParallelConfig(use_cfg_parallel=True),
    "cfg_u2r2": ParallelConfig(ulysses_degree=2, ring_degree=2, use_cfg_parallel=True),
    "r4_allgather": ParallelConfig(ring_degree=4),  # the same ring with one all-gather instead of hand-offs
}
# 64x64 px: 16 image tokens, text 32 (both divide every degree). 48x80 px: 15 image tokens (no
# degree divides them: padding), text 30 (split at degree 2, replicated at 4).
SIZES = {"even": (64, 64, 32), "uneven": (48, 80, 30)}
UNEVEN_CONFIGS = ("u2", "u4", "r2", "u2r2", "r4_allgather")
FAMILIES = ("flux", "sd3", "pixart")


def make_request(spec, height, width, text_len):
    pos, neg = random_cond(spec, 1, 0, True)
    for c in (pos, neg):
        c.text = c.text[:, :text_len]
    return build_request(spec, empty_latent(spec, 1, height, width), seed=0, steps=STEPS, cfg=CFG,
                         sampler="euler", scheduler="simple", denoise=1.0, positive=pos, negative=neg)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("par")
    paths = {f: write_tiny(f, root / f, seed=2) for f in FAMILIES}
    paths["sd3_deep"] = write_tiny("sd3", root / "sd3_deep", seed=2, layers=8)
    cases, refs, shapes = [], {}, {}
    for key, path in paths.items():
        model, spec = load_model(path)
        adapter = make_adapter(model, spec)
        sizes = SIZES if key in FAMILIES else {"even": SIZES["even"]}
        for size, (h, w, text_len) in sizes.items():
            request = make_request(spec, h, w, text_len)
            refs[(key, size)] = run_request(adapter, request)
            shapes[(key, size)] = (spec, model.config)
            names = CONFIGS if size == "even" else UNEVEN_CONFIGS
            if key == "sd3_deep":
                names = ("u2", "r2")
            for name in names:
                ring_impl = "allgather" if name.endswith("allgather") else "p2p"
                cases.append((f"{key}/{size}/{name}", str(path), CONFIGS[name], ring_impl, request))
    results = spawn_world(parallel_world.run_cases, 8, cases, threads=1)[0]
    return results, refs, shapes


PARITY = [(f, s, c) for f in FAMILIES for s in SIZES for c in (CONFIGS if s == "even" else UNEVEN_CONFIGS)]


@pytest.mark.parametrize("family,size,config", PARITY)
def test_parallel_equals_serial(world, family, size, config):
    results, refs, _ = world
    out, ref = results[f"{family}/{size}/{config}"]["out"], refs[(family, size)]
    err = float((out - ref).abs().max() / ref.abs().max())
    print(f"parity {family:6s} {size:6s} {config:8s} max|d|/max|ref| = {err:.2e}")
    assert err <= TOL


def _attention_layers(family, config):
    if family == "flux":
        return config.num_layers + config.num_single_layers
    return config.num_layers


def _expected_bytes(family, size, name, spec, config):
    """Analytic bytes sent per rank per step, from the shapes (float32, batch 1, euler: 1 eval per step)."""
    h, w, n_txt = SIZES[size]
    n_img = (h // 16) * (w // 16)
    heads, head_dim = config.num_attention_heads, config.attention_head_dim
    hidden = heads * head_dim
    par = CONFIGS[name]
    U, R = par.ulysses_degree, par.ring_degree
    S = U * R
    branches = 1 if par.use_cfg_parallel else 2  # CFG: each rank evaluates its own branch only
    layers = _attention_layers(family, config)
    img_loc = -(-n_img // S)
    txt_loc = n_txt // S if n_txt % S == 0 else n_txt
    split_len = img_loc + (txt_loc if family != "pixart" and n_txt % S == 0 else 0)
    rep_len = n_txt if family != "pixart" and n_txt % S else 0
    e = {k: 0 for k in COMM_KINDS}
    if S > 1:
        local = heads * split_len * head_dim * 4
        e["ulysses_all_to_all"] = branches * layers * 4 * local * (U - 1) // U  # Q, K, V and the output
        e["ulysses_all_gather"] = branches * layers * (U - 1) * (heads // U) * rep_len * head_dim * 4
        ring_kind = "ring_all_gather" if name.endswith("allgather") else "ring_p2p"
        e[ring_kind] = branches * layers * (R - 1) * 2 * (heads // U) * U * split_len * head_dim * 4  # K and V
        e["sp_gather"] = branches * (S - 1) * img_loc * hidden * 4
    if par.use_cfg_parallel:
        channels = spec.latent_channels
        e["cfg_gather"] = channels * (h // 8) * (w // 8) * 4
    return e


@pytest.mark.parametrize("family,size,config", [(f, s, c) for f, s, c in PARITY if c != "cfg_u2r2"] +
                         [("sd3_deep", "even", "u2"), ("sd3_deep", "even", "r2")])
def test_counters_equal_analytic_bytes(world, family, size, config):
    results, _, shapes = world
    spec, model_config = shapes[(family, size)]
    res = results[f"{family}/{size}/{config}"]
    expected = _expected_bytes(family.split("_")[0], size, config, spec, model_config)
    assert len(res["per_step"]) == STEPS
    for step in res["per_step"]:
        assert step == expected
    assert res["total"] == {k: v * STEPS for k, v in expected.items()}


@pytest.mark.parametrize("config,kind", [("u2", "ulysses_all_to_all"), ("r2", "ring_p2p")])
def test_counters_grow_linearly_with_depth(world, config, kind):
    results, _, shapes = world
    shallow = results[f"sd3/even/{config}"]["total"][kind]
    deep = results[f"sd3_deep/even/{config}"]["total"][kind]
    layers = shapes[("sd3", "even")][1].num_layers, shapes[("sd3_deep", "even")][1].num_layers
    assert shallow > 0 and deep * layers[0] == shallow * layers[1]
    assert results["sd3/even/u2"]["total"]["sp_gather"] == results["sd3_deep/even/u2"]["total"]["sp_gather"]


@pytest.mark.parametrize("flags", [["--ulysses_degree", "2"], ["--use_cfg_parallel"]])
def test_cli_local_backend_equals_serial_cli(tiny_models, tmp_path, flags):
    from safetensors.torch import load_file

    from xdit_core.cli import main

    base = ["generate", "--model", str(tiny_models["flux"]), "--height", "64", "--width", "48", "--steps", "2",
            "--seed", "3", "--cfg", "2.5", "--threads", "1", "--backend", "local"]
    assert main(base + ["--out", str(tmp_path / "serial.safetensors")]) == 0
    assert main(base + flags + ["--out", str(tmp_path / "par.safetensors"),
                                "--report", str(tmp_path / "r.json")]) == 0
    ref = load_file(str(tmp_path / "serial.safetensors"))["samples"]
    out = load_file(str(tmp_path / "par.safetensors"))["samples"]
    assert float((out - ref).abs().max() / ref.abs().max()) <= TOL
    import json

    report = json.loads((tmp_path / "r.json").read_text())
    assert report["world_size"] == 2 and len(report["per_rank"]) == 2
    kind = "ulysses_all_to_all" if "--ulysses_degree" in flags else "cfg_gather"
    assert all(r["comm_bytes"][kind] > 0 for r in report["per_rank"])
