"""xDiT Parallel Mesh: the layout of the workers (xDiT's parameter names)."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from . import host
from .types import XDiTMesh, XDiTModel

BACKENDS = ["auto", "flash", "sdpa"]
FAMILY_DEFAULT_CFG = {"flux": 1.0, "sd3": 4.5, "pixart": 4.5, "wan": 5.0}


def worker_count(mesh: XDiTMesh) -> int:
    """Workers for an `auto` mesh: the GPUs it may use, or 2 CPU workers without GPUs."""
    visible = host.visible_gpus()
    if visible == 0:
        return mesh.gpu_count or 2
    return (mesh.gpu_count or visible) - mesh.reserve_gpus


def topology(mesh: XDiTMesh, ranks: int):
    """The links between the `ranks` workers' GPUs (api.Topology), or None when unknown: CPU workers, a mesh
    that cannot be placed here, a cluster that cannot be reached or is too small."""
    from xdit_core.api import XDiTError, cluster_topology, gpu_topology, uses_cluster

    try:
        if uses_cluster(mesh.ray_address):
            return cluster_topology(mesh.ray_address, ranks)
        if not host.visible_gpus():
            return None
        return gpu_topology(host.plan_placement(mesh.gpu_count, mesh.reserve_gpus, ranks), ranks)
    except XDiTError:
        return None


def choose(mesh: XDiTMesh, model: Optional[XDiTModel], cfg: Optional[float] = None, pipefusion: bool = True):
    """(ParallelConfig or None, what was chosen and why). Auto needs the model (and ranks the meshes on the links
    it detects; `pipefusion` False where PipeFusion cannot run); manual is taken as given."""
    from xdit_core.api import ParallelConfig, auto_mesh

    if mesh.layout == "manual":
        pc = ParallelConfig(mesh.ulysses_degree, mesh.ring_degree, mesh.pipefusion_parallel_degree,
                            mesh.use_cfg_parallel, mesh.num_pipeline_patch or None, mesh.warmup_steps,
                            mesh.shard_weights)
        return pc, f"manual: {pc.describe()}"
    if model is None:
        return None, "auto: chosen for the model at sampling time"
    cfg = FAMILY_DEFAULT_CFG[model.family] if cfg is None else cfg
    ranks = worker_count(mesh)
    pc, why = auto_mesh(model.path, model.family, model.variant, ranks, cfg, topology=topology(mesh, ranks),
                        pipefusion=pipefusion)
    if mesh.shard_weights and pc.world_size > pc.pipefusion_parallel_degree:
        pc = replace(pc, shard_weights=True)
    return pc, f"auto: {pc.describe()} — {why}"


def where(mesh: XDiTMesh, parallel) -> str:
    """Where the ranks run: CPU workers, the GPUs visible, or (a local pool on a machine whose GPUs NVML sees)
    which physical GPU each rank takes and whether ComfyUI's GPU is among them."""
    from xdit_core.api import XDiTConfigError, uses_cluster

    gpus = host.visible_gpus()
    if not gpus:
        return "CPU workers (no GPU visible)"
    if parallel is None or uses_cluster(mesh.ray_address):
        return f"{gpus} GPUs visible"
    try:
        placement = host.plan_placement(mesh.gpu_count, mesh.reserve_gpus, parallel.world_size)
    except XDiTConfigError as e:
        return f"{gpus} GPUs visible; will not run here: {e}"
    return f"{gpus} GPUs visible" if placement is None else placement.note


def summarize(mesh: XDiTMesh, model: Optional[XDiTModel], cfg: Optional[float] = None):
    """(ParallelConfig or None, one-line summary: the layout, where its ranks run and, when a worker pool is
    up, the memory its ranks hold)."""
    from xdit_core import api

    pc, chosen = choose(mesh, model, cfg)
    summary = f"{chosen}; {where(mesh, pc)}"
    workers = host.describe_workers(api.workers_memory(), api.running_mesh())
    return pc, f"{summary}; {workers}" if workers else summary


class XDiTParallelMesh:
    CATEGORY = "xDiT"
    RETURN_TYPES = ("XDIT_MESH", "STRING")
    RETURN_NAMES = ("mesh", "summary")
    FUNCTION = "build"
    DESCRIPTION = "world = cfg (1|2) x pipefusion x ring x ulysses; one worker per rank (one GPU each)."

    @classmethod
    def INPUT_TYPES(cls):
        degree = {"default": 1, "min": 1, "max": 64}
        return {
            "required": {
                "layout": (["manual", "auto"], {"default": "manual",
                                                "tooltip": "auto: the mesh the performance model predicts fastest on the "
                                                           "links detected between the GPUs (NVLink, PCIe, nodes)"}),
                "ulysses_degree": ("INT", {**degree, "tooltip": "must divide the model's attention heads"}),
                "ring_degree": ("INT", degree),
                "pipefusion_parallel_degree": ("INT", degree),
                "use_cfg_parallel": ("BOOLEAN", {"default": False, "tooltip": "needs cfg != 1"}),
                "num_pipeline_patch": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "0: default"}),
                "warmup_steps": ("INT", {"default": 1, "min": 0, "max": 100}),
                "gpu_count": ("INT", {"default": 0, "min": 0, "max": 1024, "tooltip": "0: all visible GPUs"}),
            },
            "optional": {
                "model": ("XDIT_MODEL", {"tooltip": "lets auto choose (and the summary say) the layout"}),
                "reserve_gpus": ("INT", {"default": 0, "min": 0, "max": 1024,
                                         "tooltip": "GPUs left to ComfyUI (text encoders, VAE)"}),
                "ray_address": ("STRING", {"default": "", "tooltip": "empty: local Ray or $XDIT_RAY_ADDRESS"}),
                "attention_backend": (BACKENDS, {"default": "auto"}),
                "shard_weights": ("BOOLEAN", {"default": False,
                                              "tooltip": "each GPU keeps 1/N of the blocks (N: the ulysses x ring x "
                                                         "cfg GPUs of a stage) and gathers each block as it runs: "
                                                         "big models on small GPUs, at the price of that traffic; "
                                                         "auto turns it on when the model does not fit otherwise"}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, layout="manual", ulysses_degree=1, ring_degree=1, pipefusion_parallel_degree=1,
                        use_cfg_parallel=False, num_pipeline_patch=0, warmup_steps=1, gpu_count=0,
                        reserve_gpus=0, ray_address=""):
        """What the widgets alone decide; model-dependent checks run when sampling starts.

        No **kwargs: ComfyUI keeps its own checks for every input not named here (e.g. attention_backend)."""
        from xdit_core.api import XDiTConfigError, validate_ray_address

        if layout not in ("manual", "auto"):
            return f"layout must be manual or auto, got {layout!r}"
        try:
            validate_ray_address(ray_address.strip() or None)
        except XDiTConfigError as e:
            return str(e)
        for name, v in (("ulysses_degree", ulysses_degree), ("ring_degree", ring_degree),
                        ("pipefusion_parallel_degree", pipefusion_parallel_degree)):
            if v < 1:
                return f"{name} must be >= 1, got {v}"
        if num_pipeline_patch < 0 or warmup_steps < 0:
            return f"num_pipeline_patch ({num_pipeline_patch}) and warmup_steps ({warmup_steps}) must be >= 0"
        if gpu_count and reserve_gpus >= gpu_count:
            return f"reserve_gpus {reserve_gpus} leaves none of the {gpu_count} GPUs to the workers"
        world = ulysses_degree * ring_degree * pipefusion_parallel_degree * (2 if use_cfg_parallel else 1)
        usable = gpu_count - reserve_gpus
        if layout == "manual" and gpu_count and world != usable:
            return (f"the degrees make {world} ranks (cfg {2 if use_cfg_parallel else 1} x pipefusion "
                    f"{pipefusion_parallel_degree} x ring {ring_degree} x ulysses {ulysses_degree}) but "
                    f"{usable} GPUs are given to the workers; make the product {usable}, or set gpu_count to "
                    f"{world + reserve_gpus}, or use layout auto")
        return True

    def build(self, layout, ulysses_degree, ring_degree, pipefusion_parallel_degree, use_cfg_parallel,
              num_pipeline_patch, warmup_steps, gpu_count, model=None, reserve_gpus=0, ray_address="",
              attention_backend="auto", shard_weights=False):
        mesh = XDiTMesh(layout, ulysses_degree, ring_degree, pipefusion_parallel_degree, use_cfg_parallel,
                        num_pipeline_patch, warmup_steps, gpu_count, reserve_gpus, ray_address.strip() or None,
                        attention_backend, shard_weights)
        _, summary = summarize(mesh, model)
        return (mesh, summary)


def check_against_model(mesh: XDiTMesh, model: XDiTModel, cfg: float, steps: int, latent_height: int,
                        video: bool = False, pipefusion: bool = True):
    """The ParallelConfig to run, after the checks that need the model and cfg (before any GPU work). For a
    local pool it also places the workers: the physical GPUs their ranks take (ComfyUI's GPU only when the mesh
    needs every GPU) and what they will add on ComfyUI's GPU (see host.free_comfy_gpu_memory). `pipefusion`
    False: auto leaves PipeFusion out (host-driven sampling)."""
    from xdit_core.api import XDiTConfigError, place_workers, uses_cluster, validate_parallel_config

    parallel, _ = choose(mesh, model, cfg, pipefusion)
    validate_parallel_config(parallel, num_heads=model.num_heads, cfg=cfg, num_blocks=model.num_blocks,
                             steps=steps, latent_height=latent_height, video=video)
    if uses_cluster(mesh.ray_address):
        place_workers(None)
        return parallel
    placement = host.plan_placement(mesh.gpu_count, mesh.reserve_gpus, parallel.world_size)
    if placement is not None:
        place_workers(placement, model.path, model.dtype, parallel, keep_fp8=model.keep_fp8)
        return parallel
    gpus = host.visible_gpus()  # no NVML: the GPUs this process sees, all of them Ray's
    if gpus:
        usable = (mesh.gpu_count or gpus) - mesh.reserve_gpus
        if parallel.world_size > usable:
            raise XDiTConfigError(f"the mesh needs {parallel.world_size} GPUs ({parallel.describe()}) but "
                                  f"{usable} are available here ({gpus} visible, {mesh.reserve_gpus} reserved)")
    # Ray hands its GPUs out from the first, which is ComfyUI's (unless ComfyUI computes on the CPU).
    place_workers(None, model.path, model.dtype, parallel,
                  shares_host_gpu=gpus > 0 and host.comfy_gpu_view()["comfy_device"] is not None,
                  keep_fp8=model.keep_fp8)
    return parallel
