"""The Ray worker pool on a real two-node Ray cluster on this machine (CPU actors, gloo).

One cluster (2 nodes x 2 CPUs, each with a custom resource) and one 4-rank pool (cfg 2 x ulysses 2) are
shared by the tests; Ray is shut down after them.
"""
import os
import re
import signal
import time
from dataclasses import replace

import pytest
import torch

ray = pytest.importorskip("ray")

from xdit_core.runtime import pool as pool_mod  # noqa: E402
from xdit_core.cli.main import main  # noqa: E402
from xdit_core.models.conditioning import random_cond  # noqa: E402
from xdit_core.errors import XDiTCancelled, XDiTConfigError, XDiTWorkerError  # noqa: E402
from xdit_core.loading.load import load_model  # noqa: E402
from xdit_core.parallel.mesh import ParallelConfig  # noqa: E402
from xdit_core.runtime.pool import PoolKey, WorkerPool, get_pool  # noqa: E402
from xdit_core.sampling.request import build_request, empty_latent  # noqa: E402

MESH = ParallelConfig(ulysses_degree=2, use_cfg_parallel=True)
MESH_FLAGS = ["--ulysses_degree", "2", "--use_cfg_parallel"]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"node_a": 1},
                                                      "include_dashboard": False})
    c.add_node(num_cpus=2, resources={"node_b": 1})
    c.wait_for_nodes()
    os.environ["XDIT_RAY_ADDRESS"] = c.address
    yield c
    pool_mod.unload()
    ray.shutdown()
    c.shutdown()
    os.environ.pop("XDIT_RAY_ADDRESS", None)


@pytest.fixture(scope="module")
def first_run(cluster, tiny_models, tmp_path_factory):
    """`generate --backend ray` (cold: starts the pool) and `--backend local` on the same config."""
    tmp = tmp_path_factory.mktemp("pool")
    base = ["generate", "--model", str(tiny_models["flux"]), "--height", "64", "--width", "48", "--steps", "3",
            "--seed", "5", "--cfg", "2.0", "--threads", "1", *MESH_FLAGS]
    t0 = time.perf_counter()
    assert main(base + ["--backend", "ray", "--out", str(tmp / "ray.safetensors")]) == 0
    cold_s = time.perf_counter() - t0
    assert main(base + ["--backend", "local", "--out", str(tmp / "local.safetensors")]) == 0
    t0 = time.perf_counter()
    assert main(base + ["--backend", "ray", "--out", str(tmp / "ray2.safetensors")]) == 0
    warm_s = time.perf_counter() - t0
    return {"tmp": tmp, "cold_s": cold_s, "warm_s": warm_s}


def pool_for(tiny_models):
    return get_pool(PoolKey(str(tiny_models["flux"]), "fp32", None, None, MESH, "auto", 1))


def make_request(tiny_models, steps, family="flux"):
    _, spec = load_model(tiny_models[family])
    pos, neg = random_cond(spec, 1, 0, True)
    return build_request(spec, empty_latent(spec, 1, 64, 48), seed=1, steps=steps, cfg=2.0, sampler="euler",
                         scheduler="simple", denoise=1.0, positive=pos, negative=neg)


def test_mesh_larger_than_cluster_fails_before_any_actor(cluster, tiny_models):
    key = PoolKey(str(tiny_models["flux"]), "fp32", None, None, ParallelConfig(ulysses_degree=4, ring_degree=2))
    pool = WorkerPool(key)
    with pytest.raises(XDiTConfigError) as e:
        pool.start()
    assert "needs 8 CPUs" in str(e.value)
    assert re.search(r"CPUs per node: [\d.]+: 2, [\d.]+: 2$", str(e.value)), str(e.value)
    assert pool.workers == [] and pool.placement_groups == []


def test_ray_backend_equals_local_bit_for_bit(first_run):
    from safetensors.torch import load_file

    tmp = first_run["tmp"]
    ray_out = load_file(str(tmp / "ray.safetensors"))["samples"]
    assert torch.equal(ray_out, load_file(str(tmp / "local.safetensors"))["samples"])
    assert torch.equal(ray_out, load_file(str(tmp / "ray2.safetensors"))["samples"])


def test_placement_keeps_ulysses_groups_on_one_node_across_two_nodes(first_run, tiny_models):
    infos = pool_for(tiny_models).infos
    nodes = [i["node_id"] for i in infos]
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3]  # ulysses groups: ranks (0, 1) and (2, 3)
    assert len(set(nodes)) == 2


def test_warm_request_loads_nothing_and_is_faster_by_the_load_time(first_run, tiny_models):
    pool = pool_for(tiny_models)
    stats = pool.worker_stats()
    assert [s["load_count"] for s in stats] == [1, 1, 1, 1]
    load_s = max(s["load_s"] for s in stats)
    assert first_run["cold_s"] - first_run["warm_s"] >= load_s


def check_previews(pool, request):
    """Previews come at the polls, latest step first-image prediction, up to the last step. With euler the last
    step's prediction is the result (its step to sigma 0 lands on it), which pins what they hold."""
    seen, previews = [], []
    out = pool.sample(replace(request, preview=True), on_progress=lambda i, n: seen.append((i, n)),
                      on_preview=lambda i, x0: previews.append((i, x0)))
    n = request.steps
    assert seen == [(i, n) for i in range(1, n + 1)]
    steps = [i for i, _ in previews]
    assert steps == sorted(set(steps)) and steps[-1] == n
    last = previews[-1][1]
    assert last.shape == (1, *out.shape[1:])
    assert float((last - out[:1]).abs().max() / out.abs().max()) <= 1e-5
    unasked = []
    pool.sample(request, on_preview=lambda i, x0: unasked.append(i))
    assert unasked == []  # no preview is moved unless the request asks for it


def test_progress_and_previews_arrive_in_order_for_every_step(first_run, tiny_models):
    check_previews(pool_for(tiny_models), make_request(tiny_models, 5))


def test_cancel_stops_all_ranks_at_the_same_step_and_pool_stays_usable(first_run, tiny_models):
    pool = pool_for(tiny_models)
    seen = []
    with pytest.raises(XDiTCancelled):
        pool.sample(make_request(tiny_models, 200), on_progress=lambda i, n: seen.append(i),
                    cancel=lambda: len(seen) >= 2)
    steps = [len(p) for p, _ in ray.get([w.poll.remote(pool.last_job) for w in pool.workers])]
    assert len(set(steps)) == 1 and steps[0] < 200  # every rank left at the same step boundary
    assert ray.get([w.busy.remote() for w in pool.workers]) == [False] * 4
    out = pool.sample(make_request(tiny_models, 2))
    assert torch.isfinite(out).all()
    assert [s["load_count"] for s in pool.worker_stats()] == [1, 1, 1, 1]


def test_two_models_stay_resident_and_switching_loads_nothing(first_run, tiny_models, monkeypatch):
    """Another model on the same mesh joins the resident one on the same actors; switching back loads
    nothing and gives the same latent. Over the resident budget the least recently used is evicted."""
    def loads(pool):
        return [s["load_count"] for s in pool.worker_stats()]

    def key(name):
        return PoolKey(str(tiny_models[name]), "fp32", None, None, MESH, "auto", 1)

    flux = pool_for(tiny_models)
    before = loads(flux)
    ref = flux.sample(make_request(tiny_models, 2))
    sd3 = get_pool(key("sd3"))
    assert sd3 is flux  # the same actors
    assert torch.isfinite(sd3.sample(make_request(tiny_models, 2, "sd3"))).all()
    assert loads(flux) == [n + 1 for n in before]
    assert torch.equal(pool_for(tiny_models).sample(make_request(tiny_models, 2)), ref)
    assert get_pool(key("sd3")).resident and loads(flux) == [n + 1 for n in before]  # switching loaded nothing
    monkeypatch.setenv("XDIT_RESIDENT_GB", "0")  # room for one model at a time
    get_pool(key("pixart"))
    assert [m.path for m in flux.worker_stats()[0]["resident"]] == [str(tiny_models["pixart"])]
    assert list(flux.resident) == [key("pixart").model]
    assert torch.equal(pool_for(tiny_models).sample(make_request(tiny_models, 2)), ref)  # flux, loaded again
    assert loads(flux) == [n + 3 for n in before]


def test_host_driven_evaluations_equal_the_in_rank_loop(first_run, tiny_models):
    """The xDiT Guider's path: the host runs the sampler and sends each evaluation to the ranks (cfg 2 x
    ulysses 2), which keep the conditioning; the same euler loop on the host equals the ranks' own loop."""
    from xdit_core.runtime.job import denoise_latent, serial_loop

    pool = pool_for(tiny_models)
    request = make_request(tiny_models, 3)
    in_rank = pool.sample(request)
    _, spec = load_model(tiny_models["flux"])
    ms = spec.model_sampling(width=request.width, height=request.height)
    with pool.evaluations(request.positive, request.negative) as evaluate:
        def denoise(x, sigma):
            t = ms.timestep(sigma.reshape(1)).float().expand(x.shape[0])
            cond, uncond = evaluate(ms.calculate_input(sigma, x), t, with_negative=True)
            cond, uncond = ms.calculate_denoised(sigma, cond, x), ms.calculate_denoised(sigma, uncond, x)
            return uncond + (cond - uncond) * request.cfg

        host = denoise_latent(spec, ms, request, serial_loop(request, ms, denoise))
        cond_only, none = evaluate(torch.zeros_like(request.noise), torch.ones(1), with_negative=False)
        assert none is None and torch.isfinite(cond_only).all()
        assert evaluate.evaluations == 4
    assert float((host - in_rank).abs().max() / in_rank.abs().max()) <= 1e-5
    # A cancel on the host between evaluations (ComfyUI raises from its progress hook) closes the session;
    # the pool stays warm and usable.
    loads = [s["load_count"] for s in pool.worker_stats()]
    with pytest.raises(KeyboardInterrupt):
        with pool.evaluations(request.positive, request.negative) as evaluate:
            evaluate(torch.zeros_like(request.noise), torch.ones(1), with_negative=True)
            raise KeyboardInterrupt
    assert not pool.broken and ray.get([w.busy.remote() for w in pool.workers]) == [False] * 4
    assert torch.equal(pool.sample(request), in_rank)
    assert [s["load_count"] for s in pool.worker_stats()] == loads


def test_killed_rank_fails_fast_then_pool_rebuilds(first_run, tiny_models):
    pool = pool_for(tiny_models)
    victim = pool.infos[1]["pid"]
    killed = []

    def kill_once(i, n):
        if not killed:
            os.kill(victim, signal.SIGKILL)
            killed.append(time.perf_counter())

    with pytest.raises(XDiTWorkerError) as e:
        pool.sample(make_request(tiny_models, 200), on_progress=kill_once)
    assert time.perf_counter() - killed[0] < 30
    assert "rank 1" in str(e.value)
    out = pool.sample(make_request(tiny_models, 2))  # rebuilt: fresh actors, weights loaded once again
    assert torch.isfinite(out).all()
    assert victim not in [i["pid"] for i in pool.infos]


def test_rank_that_raises_ends_the_request_with_its_message(first_run, tiny_models):
    pool = pool_for(tiny_models)
    bad = make_request(tiny_models, 2)
    bad.positive.text = bad.positive.text[..., :7]  # wrong text width: the context embedder raises
    t0 = time.perf_counter()
    with pytest.raises(XDiTWorkerError) as e:
        pool.sample(bad)
    assert time.perf_counter() - t0 < 30
    assert "rank " in str(e.value) and "shapes cannot be multiplied" in str(e.value)
    assert torch.isfinite(pool.sample(make_request(tiny_models, 2))).all()


def test_pipefusion_pool_cancels_at_a_common_step_and_matches_local(first_run, tiny_models, tmp_path):
    """PipeFusion's stop point: every rank ends the step after its last patch; a cancel there drains cleanly."""
    from safetensors.torch import load_file

    mesh = ParallelConfig(pipefusion_parallel_degree=2, ulysses_degree=2, warmup_steps=1)
    pool = get_pool(PoolKey(str(tiny_models["sd3"]), "fp32", None, None, mesh, "auto", 1))
    with pytest.raises(XDiTCancelled):
        seen = []
        pool.sample(make_request(tiny_models, 100, "sd3"), on_progress=lambda i, n: seen.append(i),
                    cancel=lambda: len(seen) >= 2)
    steps = [len(p) for p, _ in ray.get([w.poll.remote(pool.last_job) for w in pool.workers])]
    assert len(set(steps)) == 1 and steps[0] < 100
    base = ["generate", "--model", str(tiny_models["sd3"]), "--height", "64", "--width", "48", "--steps", "3",
            "--seed", "2", "--threads", "1", "--pipefusion_parallel_degree", "2", "--ulysses_degree", "2",
            "--warmup_steps", "1"]
    assert main(base + ["--backend", "ray", "--out", str(tmp_path / "ray.safetensors")]) == 0
    assert main(base + ["--backend", "local", "--out", str(tmp_path / "local.safetensors")]) == 0
    assert torch.equal(load_file(str(tmp_path / "ray.safetensors"))["samples"],
                       load_file(str(tmp_path / "local.safetensors"))["samples"])



def test_pipefusion_previews_come_from_the_last_stage(first_run, tiny_models):
    """Under PipeFusion rank 0 (stage 0) never sees a prediction: the last stage assembles each step's, patch by
    patch, and reports it."""
    mesh = ParallelConfig(pipefusion_parallel_degree=2, ulysses_degree=2, warmup_steps=1)
    assert mesh.preview_rank == 2
    check_previews(get_pool(PoolKey(str(tiny_models["sd3"]), "fp32", None, None, mesh, "auto", 1)),
                   make_request(tiny_models, 3, "sd3"))
