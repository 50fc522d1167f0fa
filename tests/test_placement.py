"""GPU placement beside ComfyUI with fake GPU inventories (no GPU needed): which physical GPUs the workers take
under gpu_count, reserve_gpus, ComfyUI's --cuda-device and the user's CUDA_VISIBLE_DEVICES; the local Ray started
with exactly those GPUs (fake ones on this CPU machine: Ray hands out the ids, the ranks run on the CPU); the
workers' memory in the mesh summary and the Unload node; the /free hook."""
import os

import pytest

from nodes.types import XDiTMesh
from xdit_core.errors import XDiTConfigError
from xdit_core.runtime.placement import GpuInventory, PhysicalGpu, parse_visible, plan_placement

GIB = 2 ** 30


def inventory(n=4):
    """n identical 80 GiB GPUs in PCI bus order, UUIDs GPU-aaaa..., GPU-bbbb..., ..."""
    return GpuInventory(tuple(PhysicalGpu(i, f"GPU-{chr(97 + i) * 8}-1111-2222-3333-444455556666",
                                          f"00000000:{0x18 + i:02X}:00.0", "NVIDIA H100 80GB HBM3", 80 * GIB,
                                          79 * GIB) for i in range(n)))


def indices(placement):
    return [g.index for g in placement.gpus]


# ComfyUI started plainly on a 4-GPU machine computes on cuda:0 = physical GPU 0.
COMFY_ON_0 = dict(comfy_device=0)


@pytest.mark.parametrize("world,kwargs,expected,note", [
    # The mesh leaves ComfyUI's GPU out while other GPUs remain.
    (3, COMFY_ON_0, [1, 2, 3],
     "workers on physical GPUs 1, 2, 3 (rank 0 → GPU 1, rank 1 → GPU 2, rank 2 → GPU 3); GPU 0 is ComfyUI's"),
    (2, COMFY_ON_0, [1, 2], "GPU 0 is ComfyUI's"),
    # ... and takes it only when it needs every GPU, saying so.
    (4, COMFY_ON_0, [0, 1, 2, 3], "the mesh needs every GPU, including ComfyUI's GPU 0"),
    # reserve_gpus: ComfyUI's GPU is the one reserved first, then the highest-numbered.
    (3, dict(COMFY_ON_0, reserve_gpus=1), [1, 2, 3], "GPU 0 is ComfyUI's, reserved for it"),
    (2, dict(COMFY_ON_0, reserve_gpus=2), [1, 2], "GPU 0 is ComfyUI's, reserved for it"),
    # gpu_count: that many GPUs of the machine, minus the reserved ones, may go to the workers.
    (2, dict(COMFY_ON_0, gpu_count=3, reserve_gpus=1), [1, 2], "rank 1 → GPU 2"),
    (3, dict(COMFY_ON_0, gpu_count=3), [1, 2, 3], "GPU 0 is ComfyUI's"),
    # --cuda-device 2: ComfyUI's process sees only GPU 2 (CUDA_VISIBLE_DEVICES=2, set by ComfyUI), the workers
    # still get the machine's other GPUs, and GPU 2 only when the mesh needs all four.
    (3, dict(comfy_visible="2", comfy_device=0, comfy_flag="--cuda-device 2"), [0, 1, 3],
     "workers on physical GPUs 0, 1, 3 (rank 0 → GPU 0, rank 1 → GPU 1, rank 2 → GPU 3); GPU 2 is ComfyUI's "
     "(--cuda-device 2)"),
    (4, dict(comfy_visible="2", comfy_device=0, comfy_flag="--cuda-device 2"), [0, 1, 2, 3],
     "the mesh needs every GPU, including ComfyUI's GPU 2 (--cuda-device 2)"),
    (3, dict(comfy_visible="2", comfy_device=0, comfy_flag="--cuda-device 2", reserve_gpus=1), [0, 1, 3],
     "GPU 2 is ComfyUI's (--cuda-device 2), reserved for it"),
    # --default-device 3: ComfyUI reorders its view ("3,0,1,2,4,...,31": CUDA stops at the first missing index).
    (3, dict(comfy_visible="3,0,1,2," + ",".join(map(str, range(4, 32))), comfy_device=0,
             comfy_flag="--default-device 3"), [0, 1, 2], "GPU 3 is ComfyUI's (--default-device 3)"),
    # CUDA_VISIBLE_DEVICES=1,3 given by the user: ComfyUI computes on its cuda:0 = GPU 1, the workers are limited
    # to GPUs 1 and 3, and the note says so.
    (1, dict(user_visible="1,3", comfy_visible="1,3", comfy_device=0), [3],
     "workers on physical GPU 3 (rank 0 → GPU 3); CUDA_VISIBLE_DEVICES=1,3 limits the workers to GPUs 1, 3; "
     "GPU 1 is ComfyUI's"),
    (2, dict(user_visible="1,3", comfy_visible="1,3", comfy_device=0), [1, 3],
     "the mesh needs every GPU, including ComfyUI's GPU 1"),
    # The user's restriction with --cuda-device too: ComfyUI on GPU 3, the workers within 1 and 3.
    (1, dict(user_visible="1,3", comfy_visible="3", comfy_device=0, comfy_flag="--cuda-device 3"), [1],
     "CUDA_VISIBLE_DEVICES=1,3 limits the workers to GPUs 1, 3; GPU 3 is ComfyUI's (--cuda-device 3)"),
    # UUIDs (whole, without the GPU- prefix, or a unique prefix), as CUDA takes them.
    (1, dict(user_visible="GPU-bbbbbbbb-1111-2222-3333-444455556666,GPU-dddd", comfy_visible="GPU-bbbbbbbb,dddd",
             comfy_device=1), [1], "CUDA_VISIBLE_DEVICES=GPU-bbbbbbbb-1111-2222-3333-444455556666,GPU-dddd limits "
                                   "the workers to GPUs 1, 3; GPU 3 is ComfyUI's"),
    # ComfyUI's GPU found by the UUID torch reports, whatever its CUDA order.
    (3, dict(comfy_device=0, comfy_uuid="cccccccc-1111-2222-3333-444455556666"), [0, 1, 3], "GPU 2 is ComfyUI's"),
    # ComfyUI on the CPU (--cpu): every GPU is the workers'.
    (4, {}, [0, 1, 2, 3], "ComfyUI computes on the CPU"),
])
def test_ranks_map_to_the_expected_physical_gpus(world, kwargs, expected, note):
    placement = plan_placement(inventory(), world_size=world, **kwargs)
    assert indices(placement) == expected
    assert note in placement.note, placement.note
    assert placement.ray_env == {"CUDA_VISIBLE_DEVICES": ",".join(map(str, expected)),
                                 "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert placement.ranks_note == ", ".join(f"rank {r} → GPU {g}" for r, g in enumerate(expected))
    assert placement.shares_comfy_gpu == ("including ComfyUI's" in placement.note)


@pytest.mark.parametrize("world,kwargs,needle", [
    (2, dict(gpu_count=6), "gpu_count 6 is more than the 4 GPUs here; set gpu_count to 4 or 0 (all of them)"),
    (1, dict(gpu_count=3, user_visible="1,3"),
     "gpu_count 3 is more than the 2 GPUs here (CUDA_VISIBLE_DEVICES=1,3 leaves GPUs 1, 3)"),
    (4, dict(COMFY_ON_0, reserve_gpus=1), "the mesh needs 4 GPUs but 3 are left to the workers here (4 GPUs, 1 "
                                          "reserved for ComfyUI: GPU 0)"),
    (5, COMFY_ON_0, "the mesh needs 5 GPUs but 4 are left to the workers here (4 GPUs)"),
    (3, dict(COMFY_ON_0, gpu_count=2), "the mesh needs 3 GPUs but 2 are left to the workers here (4 GPUs, "
                                       "gpu_count 2)"),
    (1, dict(reserve_gpus=4), "reserve_gpus 4 leaves none of the 4 GPUs to the workers"),
])
def test_meshes_that_do_not_fit_fail_in_one_line(world, kwargs, needle):
    with pytest.raises(XDiTConfigError) as e:
        plan_placement(inventory(), world_size=world, **kwargs)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_visible_devices_are_read_as_cuda_reads_them():
    inv = inventory()
    assert [g.index for g in parse_visible(None, inv)[0]] == [0, 1, 2, 3]
    assert parse_visible("", inv) == ([], "")
    assert [g.index for g in parse_visible("3, 1", inv)[0]] == [3, 1]  # CUDA's order is the variable's
    gpus, note = parse_visible("2,7,1", inv)  # CUDA stops at the first entry that names no GPU
    assert [g.index for g in gpus] == [2] and "'7' names no GPU here: CUDA ignores it and the entries after it" in note
    assert [g.index for g in parse_visible("GPU-a,GPU-c", inv)[0]] == [0, 2]
    assert parse_visible("-1", inv)[0] == []
    assert [g.index for g in parse_visible("1,1", inv)[0]] == [1]  # a repeat ends it too
    # A hidden-everything restriction: CPU workers, said in the note.
    placement = plan_placement(inv, world_size=2, user_visible="", comfy_device=None)
    assert placement.gpus == () and placement.ray_env["CUDA_VISIBLE_DEVICES"] == ""
    assert placement.note.startswith("CPU workers (2 ranks); CUDA_VISIBLE_DEVICES= limits the workers to GPUs none")


def test_a_machine_without_nvml_has_no_inventory_and_nodes_behave_as_before(monkeypatch):
    from nodes import host
    from nodes.mesh import XDiTParallelMesh
    from xdit_core import api
    from xdit_core.runtime import placement

    monkeypatch.setattr(placement, "_CACHED", None)
    monkeypatch.setattr(placement, "_nvml", lambda: None)
    assert api.gpu_inventory(refresh=True).gpus == ()
    monkeypatch.setattr(placement, "_CACHED", None)
    assert host.plan_placement(0, 0, 2) is None
    _, summary = XDiTParallelMesh().build("manual", 2, 1, 1, False, 0, 1, 0)
    assert summary == "manual: cfg 1 x pipefusion 1 x ring 1 x ulysses 2 = 2 ranks; CPU workers (no GPU visible)"


class FakeNvml:
    """NVML's calls the inventory makes, over a fixed table (deliberately not in bus order)."""

    class NVMLError(Exception):
        pass

    def __init__(self, rows):
        self.rows = rows

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.rows)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.rows[i]

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("M", (), {"total": h[3], "free": h[4]})

    def nvmlDeviceGetPciInfo(self, h):
        return type("P", (), {"busId": h[0]})

    def nvmlDeviceGetUUID(self, h):
        return h[1]

    def nvmlDeviceGetName(self, h):
        return h[2]


def test_inventory_from_nvml_is_numbered_in_pci_bus_order(monkeypatch):
    from xdit_core.runtime import placement

    rows = [(b"00000000:3B:00.0", b"GPU-b", b"NVIDIA RTX 4090", 24 * GIB, 20 * GIB),
            ("00000000:18:00.0", "GPU-a", "NVIDIA RTX 3090", 24 * GIB, 23 * GIB)]
    monkeypatch.setattr(placement, "_nvml", lambda: FakeNvml(rows))
    monkeypatch.setattr(placement, "_CACHED", None)
    inv = placement.read_inventory()
    assert [(g.index, g.uuid, g.name) for g in inv.gpus] == [(0, "GPU-a", "NVIDIA RTX 3090"),
                                                             (1, "GPU-b", "NVIDIA RTX 4090")]
    assert inv.gpus[1].describe() == "GPU 1 (NVIDIA RTX 4090, 24 GiB)"
    assert placement.read_inventory() is inv  # read once per process

    class Broken(FakeNvml):
        def nvmlInit(self):
            raise self.NVMLError("Driver Not Loaded")

    monkeypatch.setattr(placement, "_nvml", lambda: Broken(rows))
    assert placement.read_inventory(refresh=True).gpus == ()


def test_comfyui_view_separates_cuda_device_from_the_users_restriction(monkeypatch):
    """--cuda-device rewrites CUDA_VISIBLE_DEVICES in ComfyUI's process: the user's own restriction is then the
    one the process started with; without the flag the variable is the user's."""
    import sys
    import types

    from nodes import host

    args = types.SimpleNamespace(cuda_device=2, default_device=None)
    cli_args = types.ModuleType("comfy.cli_args")
    cli_args.args = args
    monkeypatch.setitem(sys.modules, "comfy.cli_args", cli_args)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    monkeypatch.setattr(host, "_LAUNCH_ENV", {})
    view = host.comfy_gpu_view()
    assert (view["user_visible"], view["comfy_visible"], view["comfy_flag"]) == (None, "2", "--cuda-device 2")
    monkeypatch.setattr(host, "_LAUNCH_ENV", {"CUDA_VISIBLE_DEVICES": "0,2,3"})
    assert host.comfy_gpu_view()["user_visible"] == "0,2,3"
    args.cuda_device = None
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    view = host.comfy_gpu_view()
    assert (view["user_visible"], view["comfy_visible"], view["comfy_flag"]) == ("1,3", "1,3", "")


def test_mesh_node_lists_rank_to_gpu_and_refuses_what_does_not_fit(monkeypatch, tiny_models):
    from nodes import host
    from nodes.mesh import XDiTParallelMesh, check_against_model
    from nodes.types import XDiTModel
    from xdit_core import api
    from xdit_core.runtime import pool

    monkeypatch.setattr(api, "gpu_inventory", lambda refresh=False: inventory())
    view = dict(user_visible=None, comfy_visible="2", comfy_device=0, comfy_uuid=None, comfy_flag="--cuda-device 2")
    monkeypatch.setattr(host, "comfy_gpu_view", lambda: dict(view))
    _, summary = XDiTParallelMesh().build("manual", 3, 1, 1, False, 0, 1, 0)
    assert summary == ("manual: cfg 1 x pipefusion 1 x ring 1 x ulysses 3 = 3 ranks; workers on physical GPUs 0, 1, 3 "
                       "(rank 0 → GPU 0, rank 1 → GPU 1, rank 2 → GPU 3); GPU 2 is ComfyUI's (--cuda-device 2)")
    _, summary = XDiTParallelMesh().build("manual", 4, 1, 1, False, 0, 1, 0)
    assert "the mesh needs every GPU, including ComfyUI's GPU 2 (--cuda-device 2)" in summary
    _, summary = XDiTParallelMesh().build("manual", 4, 1, 1, False, 0, 1, 0, reserve_gpus=1)
    assert "will not run here: the mesh needs 4 GPUs but 3 are left to the workers" in summary
    # auto: every GPU the workers may have (4 here, not the 1 ComfyUI's process sees).
    flux = XDiTModel(str(tiny_models["flux"]), "fp32", "flux", "dev", 4, 6)
    _, summary = XDiTParallelMesh().build("auto", 1, 1, 1, False, 0, 1, 0, model=flux)
    assert "ulysses 4 = 4 ranks" in summary and "rank 3 → GPU 3" in summary
    # At sampling time the placement goes to the pool, with what the workers add on ComfyUI's GPU.
    try:
        parallel = check_against_model(XDiTMesh("manual", ring_degree=3), flux, 2.0, 3, 8)
        assert pool.local_placement().ray_env["CUDA_VISIBLE_DEVICES"] == "0,1,3"
        assert api.comfy_gpu_bytes_needed() == 0  # GPU 2 is not the workers'
        check_against_model(XDiTMesh("manual", ulysses_degree=4), flux, 2.0, 3, 8)
        weights = api.estimate_weight_bytes(flux.path, "fp32", api.ParallelConfig(ulysses_degree=4))
        assert api.comfy_gpu_bytes_needed() == weights + api.RANK_OVERHEAD_BYTES
        with pytest.raises(XDiTConfigError, match="the mesh needs 4 GPUs but 3 are left"):
            check_against_model(XDiTMesh("manual", ulysses_degree=4, reserve_gpus=1), flux, 2.0, 3, 8)
        assert parallel.world_size == 3
    finally:
        pool.place_local_workers(None)
        api.place_workers(None)


def test_comfyui_frees_only_what_the_workers_need_and_only_on_its_gpu(monkeypatch):
    """host.free_comfy_gpu_memory: ComfyUI's free_memory(need + its inference reserve, its device) when a worker
    shares ComfyUI's GPU; nothing otherwise (ComfyUI keeps every model); never unload_all_models."""
    import sys
    import types

    import torch

    from nodes import host
    from xdit_core import api

    calls = []
    mm = types.ModuleType("comfy.model_management")
    mm.get_torch_device = lambda: torch.device("cuda", 0)
    mm.minimum_inference_memory = lambda: GIB
    mm.free_memory = lambda need, device: calls.append((need, device))
    mm.unload_all_models = lambda: pytest.fail("every ComfyUI model unloaded")
    comfy = types.ModuleType("comfy")
    comfy.model_management = mm
    monkeypatch.setitem(sys.modules, "comfy", comfy)
    monkeypatch.setitem(sys.modules, "comfy.model_management", mm)
    monkeypatch.setattr(api, "_COMFY_GPU_NEED", 0)
    host.free_comfy_gpu_memory()
    assert calls == []
    monkeypatch.setattr(api, "_COMFY_GPU_NEED", 3 * GIB)
    host.free_comfy_gpu_memory()
    assert calls == [(4 * GIB, torch.device("cuda", 0))]


def test_free_hook_unloads_the_workers_only_when_comfyui_takes_the_flags(monkeypatch):
    """A stand-in for ComfyUI's PromptQueue: /free sets flags, the prompt worker takes them with get_flags()."""
    from nodes import unload

    calls = []
    monkeypatch.setattr(unload, "unload_workers", lambda reason: calls.append(reason) or "")

    class PromptQueue:
        def __init__(self):
            self.flags = {}

        def set_flag(self, name, data):
            self.flags[name] = data

        def get_flags(self, reset=True):
            if reset:
                out, self.flags = self.flags, {}
                return out
            return dict(self.flags)

    assert unload.install_free_hook(PromptQueue) and unload.install_free_hook(PromptQueue)  # once
    q = PromptQueue()
    assert q.get_flags() == {} and calls == []  # an idle loop turn
    q.set_flag("unload_models", True)
    assert q.get_flags(reset=False) == {"unload_models": True} and calls == []  # a peek takes nothing
    assert q.get_flags() == {"unload_models": True} and len(calls) == 1
    q.set_flag("free_memory", True)  # "Free model and node cache" sends both; free_memory alone implies unloading
    q.get_flags()
    q.set_flag("unload_models", False)
    q.set_flag("free_memory", True)  # ComfyUI keeps its models then, and so do we
    q.get_flags()
    assert calls == ["ComfyUI was asked to free memory (/free)"] * 2
    assert unload.install_free_hook(object) is False and unload.install_free_hook() is False  # no ComfyUI here


def test_local_ray_gets_exactly_the_placed_gpus_and_ranks_report_them(monkeypatch, tiny_models):
    """A local pool placed on (fake) physical GPUs 1 and 3 on this CPU machine: Ray starts with num_gpus 2 and
    CUDA_VISIBLE_DEVICES=1,3 (ComfyUI's own value restored after), hands rank 0 GPU 1 and rank 1 GPU 3, and each
    rank reports that GPU and its memory, which the mesh summary and the Unload node show."""
    import ray

    from nodes import host
    from nodes.mesh import summarize
    from nodes.unload import XDiTUnload
    from xdit_core import api
    from xdit_core.runtime import pool

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")  # as ComfyUI's --cuda-device 2 leaves its process
    placement = plan_placement(inventory(), world_size=2, user_visible="1,3", comfy_visible="2", comfy_device=0)
    assert indices(placement) == [1, 3]
    if ray.is_initialized():
        ray.shutdown()
    try:
        pool.place_local_workers(placement)
        key = pool.PoolKey(str(tiny_models["flux"]), "fp32", None, None, api.ParallelConfig(ulysses_degree=2))
        p = pool.get_pool(key)
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "2" and "CUDA_DEVICE_ORDER" not in os.environ
        assert ray.cluster_resources().get("GPU") == 2
        reports = api.workers_memory()
        assert [(r["rank"], r["cuda_visible_devices"], r["gpu"]) for r in reports] == [(0, "1", 1), (1, "3", 3)]
        assert all(r["rss_bytes"] > 50 * 2 ** 20 and r["device"] == "cpu" for r in reports)
        _, summary = summarize(XDiTMesh("manual", ulysses_degree=2), None)
        assert "workers up (cfg 1 x pipefusion 1 x ring 1 x ulysses 2 = 2 ranks): rank 0 → GPU 1 " in summary
        assert "rank 1 → GPU 3 " in summary and "GiB in all" in summary
        # Another placement restarts the pool (and Ray) on its GPUs; the same one keeps it.
        assert pool.get_pool(key) is p
        pool.place_local_workers(plan_placement(inventory(), world_size=2, comfy_device=0))
        p2 = pool.get_pool(key)
        assert p2 is not p and [r["gpu"] for r in api.workers_memory()] == [1, 2]
        result = XDiTUnload().unload(latent=None)
        latent, text = result["result"]
        assert latent is None and result["ui"]["text"] == [text]
        assert text.startswith("xDiT Unload: freed the workers (cfg 1 x pipefusion 1 x ring 1 x ulysses 2 = 2 ranks): "
                               "rank 0 → GPU 1 "), text
        assert pool.running_pool() is None and api.workers_memory() == []
        assert XDiTUnload().unload()["result"][1] == "no xDiT workers were running"
        assert host.describe_workers([], None) == ""
    finally:
        pool.unload()
        pool.place_local_workers(None)
        ray.shutdown()


def test_placement_equality_is_by_gpus():
    """The pool is rebuilt only for other GPUs: not for another note, nor for a fresh reading of free memory."""
    from dataclasses import replace

    a = plan_placement(inventory(), world_size=2, comfy_device=0)
    later = GpuInventory(tuple(replace(g, free_bytes=g.free_bytes // 2) for g in inventory().gpus))
    b = plan_placement(later, world_size=2, comfy_visible="0", comfy_device=0, comfy_flag="--cuda-device 0")
    assert a.gpus == b.gpus and a.note != b.note
    assert a.gpus != plan_placement(inventory(), world_size=2, comfy_device=3).gpus
    assert a.gpu_of("2") == inventory().gpus[2] and a.gpu_of("0") is None and a.gpu_of(None) is None
