"""Rank-side code of the benchmarks. `spawn_world` starts these in fresh gloo processes, so they live at
module level; every rank of the world calls the same function with the same payload."""

from __future__ import annotations

import statistics
import time
from functools import partial
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bench.common import proc_status_kb
from xdit_core.runtime.job import run_request
from xdit_core.loading.load import load_model
from xdit_core.parallel.mesh import Mesh, ParallelConfig
from xdit_core.models import make_adapter
from xdit_core.models.base import ModelAdapter
from xdit_core.models.model_sampling import ModelSampling
from xdit_core.parallel.context import RankContext
from xdit_core.sampling.request import SampleRequest
from xdit_core.sampling.samplers import is_max_denoise
from xdit_core.parallel.sequence_parallel import SequenceParallelRunner


def _sent(ctx: Optional[RankContext]) -> dict[str, int]:
    """Bytes this rank sent over the run's steps, by kind (the per-step tallies summed)."""
    if ctx is None:
        return {}
    out: dict[str, int] = {}
    for step in ctx.counter.per_step:
        for k, v in step.items():
            out[k] = out.get(k, 0) + v
    return out


def _param_bytes(adapter: ModelAdapter) -> int:
    return sum(p.numel() * p.element_size() for p in adapter.model.parameters() if not p.is_meta)


def _adapters(path: str, configs: dict[str, ParallelConfig], meshes: dict[str, Mesh]) -> dict[str, ModelAdapter]:
    """One shared adapter; PipeFusion frees the blocks of other stages, so each PipeFusion config gets its own."""
    shared = make_adapter(*load_model(path))
    return {
        name: make_adapter(*load_model(path)) if cfg.pipefusion_parallel_degree > 1 else shared
        for name, cfg in configs.items()
        if meshes[name].is_member
    }


# ---------------------------------------------------------------------------------------------------
# CPU scaling (timed configs) and the calibration of the performance model
# ---------------------------------------------------------------------------------------------------
def scaling_world(rank: int, device: torch.device, payload: dict[str, Any]) -> dict[str, Any]:
    """Calibrate (rank 0 times the blocks serially, ranks 0 and 1 measure the link), then time every config
    `repeats` times, interleaved (the order reversed every other repeat); ranks outside a mesh wait.

    payload: path, requests {key: SampleRequest}, configs {name: (ParallelConfig, ring_impl, request key)},
    repeats, calibration_sizes {size: SampleRequest}. Returns times, bytes sent per config, and on rank 0
    the calibration samples.
    """
    configs = {name: c[0] for name, c in payload["configs"].items()}
    meshes = {name: Mesh(cfg, list(range(cfg.world_size))) for name, cfg in configs.items()}
    adapters = _adapters(payload["path"], configs, meshes)
    requests = payload["requests"]
    times: dict[str, list[float]] = {name: [] for name in configs}
    sent: dict[str, dict[str, int]] = {}
    shared = next(a for n, a in adapters.items() if configs[n].pipefusion_parallel_degree == 1)
    run_request(shared, next(iter(requests.values())))  # first-call allocations and kernel selection
    out: dict[str, Any] = {}
    if rank == 0:  # the calibration first, while rank 1 waits
        out["blocks"] = time_blocks(shared, payload["calibration_sizes"], payload["calibration_repeats"])
    dist.barrier()
    link = link_samples(rank, payload["calibration_repeats"])
    if rank == 0:
        out["link"] = link
    contention, probe = [], _evaluation(shared, next(iter(requests.values())))
    for rep in range(payload["repeats"]):
        contention.append(_contention(rank, probe))
        order = list(configs) if rep % 2 == 0 else list(reversed(configs))
        for name in order:
            dist.barrier()
            if meshes[name].is_member:
                cfg, ring_impl, key = payload["configs"][name]
                ctx = RankContext(meshes[name], device, ring_impl=ring_impl) if cfg.world_size > 1 else None
                t0 = time.perf_counter()
                run_request(adapters[name], requests[key], ctx=ctx)
                times[name].append(time.perf_counter() - t0)
                sent[name] = _sent(ctx)
            dist.barrier()
    out.update(times=times, bytes=sent, contention=contention)
    return out


def _contention(rank: int, evaluate: Callable[[], Any]) -> float:
    """How much slower rank 0 runs one serial evaluation of the model while every rank runs one than while
    the others wait (the ranks share cores, caches and memory bandwidth with each other and with
    whatever else runs on the machine)."""
    alone, both = [], []
    for _ in range(3):  # interleaved; the fastest of each, as the load of other processes comes and goes
        dist.barrier()
        if rank == 0:
            alone.append(_median_time(evaluate, 1))
        dist.barrier()
        both.append(_median_time(evaluate, 1))
    dist.barrier()
    return min(both) / min(alone) if rank == 0 else 0.0


def _sp_evaluation(adapter: ModelAdapter, request: SampleRequest) -> Callable[[], Any]:
    """`_evaluation` through a degree-1 SequenceParallelRunner: all of its work but no communication."""
    return _evaluation(adapter, request, SequenceParallelRunner.single_rank(adapter).predict)


def _evaluation(
    adapter: ModelAdapter, request: SampleRequest, predict: Optional[Callable[..., Any]] = None
) -> Callable[[], Any]:
    """One serial model evaluation at the request's first sigma (positive branch), on the model's device."""
    request = request.to(next(adapter.model.parameters()).device)
    ms = adapter.spec.model_sampling(request.shift, width=request.width, height=request.height)
    sigma = request.sigmas[0]
    x = ms.noise_scaling(sigma, request.noise, request.latent_image, is_max_denoise(ms, request.sigmas))
    xc = ms.calculate_input(sigma, x).to(adapter.dtype)
    timestep = ms.timestep(sigma.reshape(1).cpu()).float().to(x.device).expand(x.shape[0])
    predict = predict or adapter.predict
    return torch.no_grad()(lambda: predict(xc, timestep, request.positive, request.guidance))


class _AttentionShapes(torch.overrides.TorchFunctionMode):
    """Records the (query, key, value) shapes of every scaled_dot_product_attention call."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[torch.Size, torch.Size, torch.Size]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = (args[i] if len(args) > i else kwargs[n] for i, n in enumerate(("query", "key", "value")))
            self.shapes.append((q.shape, k.shape, v.shape))
        return func(*args, **kwargs)


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of `fn` (CUDA work included: the device is synchronised around each call)."""
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def time_blocks(adapter: ModelAdapter, requests: dict[int, SampleRequest], repeats: int) -> dict[str, Any]:
    """Serial per-block times at several resolutions, uninstrumented; each block's attention kernels timed
    apart on tensors of the shapes the block used (recorded in one extra pass), the rest is the
    difference. Also the embedder, the head and a whole sampler step. Medians over `repeats`.

    `sp_overhead`: what our sequence-parallel machinery (attention interception, layout copies) adds to
    one evaluation at degree 1, where no byte moves.

    Returns {"kinds": [block class per block], "rest": [[block, tokens, s]], "attention": [[block, q, k, s]],
    "embed": [[tokens, s]], "head": [[tokens, s]], "step": [[image tokens, step s, evaluation s]],
    "sp_overhead": [[tokens, s]]}.
    """
    a = adapter
    blocks = a.blocks()
    out: dict[str, Any] = {
        "kinds": [type(b).__name__ for b, _ in blocks],
        "rest": [],
        "attention": [],
        "embed": [],
        "head": [],
        "step": [],
        "sp_overhead": [],
    }
    device = next(a.model.parameters()).device
    for _, request in sorted(requests.items()):
        request = request.to(device)
        ms = a.spec.model_sampling(request.shift, width=request.width, height=request.height)
        sigma = request.sigmas[0]
        x = ms.noise_scaling(sigma, request.noise, request.latent_image, is_max_denoise(ms, request.sigmas))
        xc = ms.calculate_input(sigma, x).to(a.dtype)
        timestep = ms.timestep(sigma.reshape(1).cpu()).float().to(x.device).expand(x.shape[0])
        embed = lambda: a.embed(xc, timestep, request.positive, request.guidance)
        inputs = [embed()]
        shapes = []
        for block, run in blocks:  # the input of every block, and its attention shapes
            recorder = _AttentionShapes()
            with recorder:
                inputs.append(run(block, inputs[-1]))
            shapes.append(recorder.shapes)
        tokens = inputs[-1]
        n_img = tokens.img.shape[1]
        n_txt = tokens.txt.shape[1] if a.TEXT_IS_JOINT and tokens.txt is not None else 0
        out["embed"].append([n_img + n_txt, _median_time(embed, repeats)])
        out["head"].append([n_img, _median_time(lambda: a.head(tokens), repeats)])
        for i, (block, run) in enumerate(blocks):
            total = _median_time(lambda: run(block, inputs[i]), repeats)
            kernels = 0.0
            for qs, ks, vs in shapes[i]:
                q, k, v = (torch.randn(shape, device=xc.device, dtype=a.dtype) for shape in (qs, ks, vs))
                t = _median_time(lambda: F.scaled_dot_product_attention(q, k, v), repeats)
                out["attention"].append([i, qs[-2], ks[-2], t])
                kernels += t
            out["rest"].append([i, n_img + n_txt, max(0.0, total - kernels)])
        evaluation = _median_time(_evaluation(a, request), repeats)
        out["sp_overhead"].append(
            [n_img + n_txt, max(0.0, _median_time(_sp_evaluation(a, request), repeats) - evaluation)]
        )
        step = _median_time(lambda: run_request(a, request), max(1, repeats // 2)) / request.steps
        out["step"].append([n_img, step, evaluation])
    return out


def link_samples(
    rank: int, repeats: int, sizes: tuple[int, ...] = (64, 1 << 14, 1 << 18, 1 << 21, 1 << 23)
) -> dict[str, Any]:
    """Ranks 0 and 1 of the default group (the others only join the collectives' barriers): seconds per
    transfer by kind and size, and how much of a point-to-point exchange hides behind compute.

    Returns {"p2p" | "all_to_all" | "all_gather": [[tensor bytes, s]], "overlap": fraction}.
    """
    world = dist.get_world_size()
    pair = dist.new_group([0, 1]) if world > 2 else None
    out: dict[str, Any] = {"p2p": [], "all_to_all": [], "all_gather": []}
    member = rank < 2
    for size in sizes:
        x = torch.ones(size // 4)
        samples: dict[str, list[float]] = {k: [] for k in ("p2p", "all_to_all", "all_gather")}
        for _ in range(repeats):
            if member:
                dist.barrier(group=pair)
                t0 = time.perf_counter()
                if rank == 0:
                    dist.send(x, 1, group=pair)
                    dist.recv(x, 1, group=pair)
                else:
                    dist.recv(x, 0, group=pair)
                    dist.send(x, 0, group=pair)
                samples["p2p"].append((time.perf_counter() - t0) / 2)
                y = torch.empty_like(x)
                dist.barrier(group=pair)
                t0 = time.perf_counter()
                dist.all_to_all_single(y, x, group=pair)
                samples["all_to_all"].append(time.perf_counter() - t0)
                gathered = [torch.empty_like(x) for _ in range(2)]
                dist.barrier(group=pair)
                t0 = time.perf_counter()
                dist.all_gather(gathered, x, group=pair)
                samples["all_gather"].append(time.perf_counter() - t0)
        if member:
            for k, v in samples.items():
                out[k].append([size, statistics.median(v)])
    out["overlap"] = _overlap(rank, repeats, pair) if member else 0.0
    dist.barrier()
    return out


def _overlap(rank: int, repeats: int, group) -> float:
    """1 - (exchange and compute together - compute alone) / exchange alone, median over repeats, in [0, 1]."""
    a = torch.randn(256, 256)
    payload = torch.ones(1 << 21)  # 8 MB each way
    peer = 1 - rank

    def compute() -> None:
        for _ in range(40):
            a @ a

    def exchange() -> list:
        buf = torch.empty_like(payload)
        return dist.batch_isend_irecv(
            [dist.P2POp(dist.isend, payload, peer, group=group), dist.P2POp(dist.irecv, buf, peer, group=group)]
        )

    fractions = []
    for _ in range(repeats):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        compute()
        t_compute = time.perf_counter() - t0
        dist.barrier(group=group)
        t0 = time.perf_counter()
        for w in exchange():
            w.wait()
        t_comm = time.perf_counter() - t0
        dist.barrier(group=group)
        t0 = time.perf_counter()
        works = exchange()
        compute()
        for w in works:
            w.wait()
        t_both = time.perf_counter() - t0
        fractions.append(min(1.0, max(0.0, 1 - (t_both - t_compute) / t_comm)))
    return statistics.median(fractions)


# ---------------------------------------------------------------------------------------------------
# Fidelity and communication
# ---------------------------------------------------------------------------------------------------
def fidelity_world(rank: int, device: torch.device, payload: dict[str, Any]) -> dict[str, Any]:
    """Run every case (name, model path, ParallelConfig, ring_impl, request key); ranks outside a case's mesh
    wait. Returns per case: the final latent (rank 0), bytes sent over the run, parameter bytes held."""
    requests = payload["requests"]
    adapters: dict[str, ModelAdapter] = {}
    results: dict[str, Any] = {}
    for name, path, config, ring_impl, key in payload["cases"]:
        mesh = Mesh(config, list(range(config.world_size)))
        if not mesh.is_member:
            continue
        if config.pipefusion_parallel_degree > 1:
            adapter = make_adapter(*load_model(path))
        else:
            adapter = adapters.setdefault(path, make_adapter(*load_model(path)))
        ctx = RankContext(mesh, device, ring_impl=ring_impl)
        out = run_request(adapter, requests[key], ctx=ctx)
        results[name] = {
            "out": out if rank == 0 else None,
            "bytes": _sent(ctx),
            "param_bytes": _param_bytes(adapter),
            "effective_patches": ctx.effective_patches,
            "coords": mesh.coords,
        }
    return results


# ---------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------
def memory_world(rank: int, device: torch.device, payload: tuple[str, ParallelConfig, SampleRequest]) -> dict[str, int]:
    """One config in fresh processes, loaded as the pool's workers load it (a PipeFusion stage reads only
    its share): resident memory before loading, after loading, peak (VmHWM) after a run, and the
    parameter bytes the rank holds."""
    from xdit_core.parallel.stages import stage_parts
    from xdit_core.runtime.job import ModelRef, stage_split

    path, config, request = payload
    base = proc_status_kb("VmRSS")
    mesh = Mesh(config, list(range(config.world_size)))
    P = config.pipefusion_parallel_degree
    parts = stage_parts(stage_split(ModelRef(path), P, device), config.coords(rank)["pipefusion"]) if P > 1 else None
    adapter = make_adapter(*load_model(path, parts=parts))
    loaded = proc_status_kb("VmRSS")
    ctx = RankContext(mesh, device) if config.world_size > 1 else None
    run_request(adapter, request, ctx=ctx)
    return {
        "rss_base_kb": base,
        "rss_loaded_kb": loaded,
        "hwm_kb": proc_status_kb("VmHWM"),
        "rss_end_kb": proc_status_kb("VmRSS"),
        "param_bytes": _param_bytes(adapter),
    }


# ---------------------------------------------------------------------------------------------------
# Video: our configs and diffusers' own context parallelism on one Wan request
# ---------------------------------------------------------------------------------------------------
def video_world(rank: int, device: torch.device, payload: dict[str, Any]) -> dict[str, Any]:
    """Run every config of ours (payload "configs": name -> ParallelConfig) and of diffusers (payload "peers":
    name -> Ulysses degree over the whole world, 1: a plain loop on rank 0) on one request: once untimed (the
    first call's allocations; bytes sent and final latents taken there), then `repeats` times timed, interleaved
    (the order reversed every other repeat), each repeat after a probe of how much slower two ranks compute than
    one (`_contention`); a rank outside a run waits.

    Returns this rank's seconds per run, bytes it sent over one run by kind (ours: the engine's counters;
    diffusers': its functional collectives, counted the same way), the probes and, on rank 0, each run's final
    latent."""
    from diffusers.models._modeling_parallel import ContextParallelConfig

    path, request = payload["path"], payload["request"]
    adapter = make_adapter(*load_model(path))
    ms = adapter.spec.model_sampling(request.shift, width=request.width, height=request.height)
    runs: dict[str, Optional[Callable[[bool], tuple[torch.Tensor, dict[str, int]]]]] = {}
    for name, cfg in payload["configs"].items():
        mesh = Mesh(cfg, list(range(cfg.world_size)))
        runs[name] = partial(_engine_run, adapter, request, mesh, device) if mesh.is_member else None
    for name, degree in payload["peers"].items():
        if degree == 1:
            runs[name] = partial(_diffusers_run, adapter.model, request, ms) if rank == 0 else None
        else:  # a model of its own: enable_parallelism hooks every block of the model it is given
            model = load_model(path)[0]
            model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
            runs[name] = partial(_diffusers_run, model, request, ms)
    out: dict[str, Any] = {"times": {n: [] for n in runs}, "bytes": {}, "latents": {}, "contention": []}
    probe = _evaluation(adapter, request)
    for rep in range(-1, payload["repeats"]):  # -1: the untimed run
        if rep >= 0:
            out["contention"].append(_contention(rank, probe))
        for name in list(runs) if rep % 2 == 0 else list(reversed(runs)):
            dist.barrier()
            if runs[name] is not None:
                t0 = time.perf_counter()
                latent, sent = runs[name](rep < 0)
                if rep < 0:
                    out["bytes"][name] = sent
                    if rank == 0:
                        out["latents"][name] = latent
                else:
                    out["times"][name].append(time.perf_counter() - t0)
            dist.barrier()
    return out


def _engine_run(adapter: ModelAdapter, request: SampleRequest, mesh: Mesh, device: torch.device,
                count: bool) -> tuple[torch.Tensor, dict[str, int]]:
    """run_request; the engine's counters cost nothing, so they always count."""
    ctx = RankContext(mesh, device) if mesh.config.world_size > 1 else None
    return run_request(adapter, request, ctx=ctx), _sent(ctx)


def _diffusers_run(model: torch.nn.Module, request: SampleRequest, ms: ModelSampling,
                   count: bool) -> tuple[torch.Tensor, dict[str, int]]:
    """plain_wan_loop; with `count`, under the dispatch mode that counts diffusers' collectives (untimed: the mode
    sees every op)."""
    if not count:
        return plain_wan_loop(model, request, ms), {}
    with _CollectiveBytes() as counter:
        latent = plain_wan_loop(model, request, ms)
    return latent, counter.sent


@torch.no_grad()
def plain_wan_loop(model: torch.nn.Module, request: SampleRequest, ms: ModelSampling) -> torch.Tensor:
    """Euler sampling with diffusers' WanTransformer3DModel.forward and nothing of ours but the request's noise,
    sigmas and the family's timestep scale: x += v(x, sigma) * (sigma_next - sigma), from the noised latent."""
    sigmas = request.sigmas
    x = ms.noise_scaling(sigmas[0], request.noise, request.latent_image, is_max_denoise(ms, sigmas))
    text = request.positive.text
    for i in range(len(sigmas) - 1):
        timestep = ms.timestep(sigmas[i]).reshape(1).expand(x.shape[0])
        v = model(hidden_states=x, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
        x = x + v.float() * (sigmas[i + 1] - sigmas[i])
    return ms.inverse_noise_scaling(sigmas[-1], x)


class _CollectiveBytes(TorchDispatchMode):
    """Bytes this rank sends through torch's functional collectives (diffusers' context parallelism), by the
    engine's convention (xdit_core/parallel/comm.py): an all-to-all sends (n - 1) / n of its input, an all-gather
    n - 1 copies; n is the world (diffusers' mesh spans it). Any other collective is an error, not a silent 0."""

    COUNTED = ("all_to_all_single", "all_gather_into_tensor")
    FREE = ("wait_tensor", "_wrap_tensor_autograd")  # no transfer of their own

    def __init__(self) -> None:
        super().__init__()
        self.n = dist.get_world_size()
        self.sent: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace in ("_c10d_functional", "c10d") and name not in self.FREE:
            if name not in self.COUNTED:
                raise NotImplementedError(f"diffusers sent through {func}, which the byte count does not know")
            nbytes = args[0].numel() * args[0].element_size()
            self.sent[name] = self.sent.get(name, 0) + (
                nbytes * (self.n - 1) // self.n if name == "all_to_all_single" else nbytes * (self.n - 1))
        return func(*args, **(kwargs or {}))
