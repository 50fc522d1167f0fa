"""Which physical GPUs the local worker pool takes, beside the ComfyUI process that starts it.

The GPUs are read from NVML, which ignores CUDA_VISIBLE_DEVICES and so sees the whole machine even when
ComfyUI's `--cuda-device` has narrowed its own process to one GPU. `plan_placement` is pure: given that
inventory and how ComfyUI sees the GPUs, it returns the workers' GPUs (ComfyUI's compute GPU last, taken only
when the mesh needs every GPU), the environment for the local Ray start and a note saying which GPUs the
workers use and why. Nothing here touches torch.cuda; NVML is imported only when the inventory is read.

Numbering. A GPU's `index` is its position in PCI bus order: nvidia-smi's index, and CUDA's when
CUDA_DEVICE_ORDER=PCI_BUS_ID. The workers' CUDA_VISIBLE_DEVICES holds these indices (readable in notes, logs
and Ray's GPU ids, the numbers nvidia-smi shows) with CUDA_DEVICE_ORDER=PCI_BUS_ID set beside it, so an index
means the same GPU to NVML, to Ray and to the workers' CUDA. (UUIDs would need no order, but name nothing a
person recognises; they are accepted as input.) CUDA_VISIBLE_DEVICES values given by the user are read as
CUDA reads them: indices or GPU UUIDs (a unique prefix suffices), up to the first entry that names no GPU.
Index entries are taken in PCI bus order, which is CUDA's default order too on machines whose GPUs are all
of one model; on mixed machines use UUIDs or CUDA_DEVICE_ORDER=PCI_BUS_ID.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

from xdit_core.errors import XDiTConfigError

GIB = 2 ** 30
VISIBLE_ENV = "CUDA_VISIBLE_DEVICES"
ORDER_ENV = "CUDA_DEVICE_ORDER"


@dataclass(frozen=True)
class PhysicalGpu:
    """One GPU of the machine, as NVML reports it."""

    index: int  # position in PCI bus order (nvidia-smi's index; CUDA's with CUDA_DEVICE_ORDER=PCI_BUS_ID)
    uuid: str  # "GPU-..."
    pci_bus_id: str = ""
    name: str = ""
    total_bytes: int = 0
    free_bytes: int = field(default=0, compare=False)  # when read: the same GPU whatever its use

    def describe(self) -> str:
        size = f", {self.total_bytes / GIB:.0f} GiB" if self.total_bytes else ""
        return f"GPU {self.index} ({self.name or 'unknown'}{size})"


@dataclass(frozen=True)
class GpuInventory:
    """The machine's GPUs in PCI bus order; `source` says where they come from, or why there are none."""

    gpus: tuple[PhysicalGpu, ...] = ()
    source: str = "NVML"

    def __len__(self) -> int:
        return len(self.gpus)

    def find(self, entry: str) -> Optional[PhysicalGpu]:
        """The GPU a CUDA_VISIBLE_DEVICES entry names: an index, or a GPU UUID or a unique prefix of one."""
        entry = entry.strip()
        if entry.lstrip("+").isdigit():
            i = int(entry)
            return self.gpus[i] if 0 <= i < len(self.gpus) else None
        wanted = _uuid_key(entry)
        if not wanted:
            return None
        found = [g for g in self.gpus if _uuid_key(g.uuid).startswith(wanted)]
        return found[0] if len(found) == 1 else None


def _uuid_key(uuid: str) -> str:
    u = uuid.strip().lower()
    return u[4:] if u.startswith("gpu-") else u


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml():
    """NVML's Python bindings: nvidia-ml-py's `pynvml` when installed, else the copy Ray ships; None without."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the `pynvml` wrapper package warns that it is deprecated
        try:
            import pynvml

            if hasattr(pynvml, "nvmlDeviceGetUUID"):
                return pynvml
        except ImportError:
            pass
        try:
            import ray._private.thirdparty.pynvml as pynvml

            return pynvml
        except ImportError:
            return None


_CACHED: Optional[GpuInventory] = None


def read_inventory(refresh: bool = False) -> GpuInventory:
    """The machine's NVIDIA GPUs from NVML (it ignores CUDA_VISIBLE_DEVICES), in PCI bus order. No NVML
    bindings, no driver or an NVML failure: no GPUs (and `source` says why). Read once per process (GPUs do
    not come and go under a running ComfyUI); `refresh` reads again, for current free memory."""
    global _CACHED
    if _CACHED is not None and not refresh:
        return _CACHED
    nvml = _nvml()
    if nvml is None:
        _CACHED = GpuInventory((), "no NVML bindings (nvidia-ml-py)")
        return _CACHED
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...: no GPUs here
        _CACHED = GpuInventory((), f"no NVIDIA driver ({e})")
        return _CACHED
    try:
        rows = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            rows.append((_text(nvml.nvmlDeviceGetPciInfo(handle).busId).upper(), _text(nvml.nvmlDeviceGetUUID(handle)),
                         _text(nvml.nvmlDeviceGetName(handle)), int(memory.total), int(memory.free)))
    except Exception as e:  # noqa: BLE001 - a GPU NVML cannot read: placement falls back to Ray's own detection
        _CACHED = GpuInventory((), f"NVML failed ({e})")
        return _CACHED
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    rows.sort(key=lambda r: r[0])
    _CACHED = GpuInventory(tuple(PhysicalGpu(i, uuid, bus, name, total, free)
                                 for i, (bus, uuid, name, total, free) in enumerate(rows)))
    return _CACHED


def parse_visible(spec: Optional[str], inventory: GpuInventory) -> tuple[list[PhysicalGpu], str]:
    """The GPUs a CUDA_VISIBLE_DEVICES value leaves, in its order, as CUDA reads it (None: every GPU), and a
    note on the entries CUDA ignores ("" when none): CUDA stops at the first entry that names no GPU (an
    index out of range, an unknown or ambiguous UUID, a repeat, "-1")."""
    if spec is None:
        return list(inventory.gpus), ""
    out: list[PhysicalGpu] = []
    entries = [e.strip() for e in spec.split(",")] if spec.strip() else []
    for n, entry in enumerate(entries):
        gpu = inventory.find(entry)
        if gpu is None or gpu in out:
            return out, (f"{VISIBLE_ENV} entry {entry!r} names no {'other ' if gpu else ''}GPU here: CUDA ignores it "
                         f"and {'the entries after it' if n + 1 < len(entries) else 'nothing else'}")
        out.append(gpu)
    return out, ""


def _indices(gpus: Sequence[PhysicalGpu]) -> str:
    return ", ".join(str(g.index) for g in gpus) or "none"


@dataclass(frozen=True)
class Placement:
    """The physical GPUs of a local pool's workers (rank r on `gpus[r]`) and why."""

    gpus: tuple[PhysicalGpu, ...]
    comfy_gpu: Optional[PhysicalGpu] = None  # ComfyUI's compute GPU (None: it computes on the CPU, or unknown)
    allowed: tuple[PhysicalGpu, ...] = ()  # what the user's CUDA_VISIBLE_DEVICES leaves (every GPU when unset)
    note: str = ""
    ranks_note: str = field(default="", compare=False)

    @property
    def shares_comfy_gpu(self) -> bool:
        return self.comfy_gpu is not None and self.comfy_gpu in self.gpus

    @property
    def ray_env(self) -> dict[str, str]:
        """The environment the local Ray (raylet and workers) starts with: exactly these GPUs, numbered as NVML."""
        return {VISIBLE_ENV: ",".join(str(g.index) for g in self.gpus), ORDER_ENV: "PCI_BUS_ID"}

    def gpu_of(self, visible: Optional[str]) -> Optional[PhysicalGpu]:
        """The GPU of a worker from the CUDA_VISIBLE_DEVICES Ray gave it (one of our indices)."""
        if not visible:
            return None
        entry = visible.split(",")[0].strip()
        for g in self.gpus:
            if entry == str(g.index) or (not entry.isdigit() and _uuid_key(g.uuid).startswith(_uuid_key(entry))):
                return g
        return None


def plan_placement(inventory: GpuInventory, *, world_size: int, gpu_count: int = 0, reserve_gpus: int = 0,
                   user_visible: Optional[str] = None, comfy_visible: Optional[str] = None,
                   comfy_device: Optional[int] = None, comfy_uuid: Optional[str] = None,
                   comfy_flag: str = "") -> Placement:
    """The GPUs of a local pool of `world_size` ranks.

    inventory: the machine's GPUs (NVML). user_visible: the CUDA_VISIBLE_DEVICES the user gave the ComfyUI
    process (None: unset), which limits the workers too. comfy_visible: CUDA_VISIBLE_DEVICES in ComfyUI's process
    now, after its `--cuda-device`/`--default-device` rewrote it (comfy_flag names that flag); comfy_device:
    ComfyUI's CUDA device index in that view (None: it computes on the CPU); comfy_uuid: that device's UUID when
    torch reports it (exact whatever CUDA's device order).

    Rules: the workers choose among the allowed GPUs, ComfyUI's compute GPU last; `gpu_count` (0: all allowed)
    minus `reserve_gpus` of them may go to the workers, the reserved ones taken from the end of that order
    (ComfyUI's GPU first, then the highest-numbered); of those the mesh takes the first `world_size`, so
    ComfyUI's GPU is used only when the mesh needs every GPU it may have. Ranks follow the GPUs in index order.
    Raises XDiTConfigError (one line) when the mesh does not fit.
    """
    allowed, ignored = parse_visible(user_visible, inventory)
    seen, _ = parse_visible(comfy_visible, inventory)
    comfy_gpu = None
    if comfy_uuid:
        comfy_gpu = next((g for g in inventory.gpus if _uuid_key(g.uuid) == _uuid_key(comfy_uuid)), None)
    if comfy_gpu is None and comfy_device is not None and 0 <= comfy_device < len(seen):
        comfy_gpu = seen[comfy_device]
    limit = f" ({VISIBLE_ENV}={user_visible} leaves GPUs {_indices(allowed)})" if user_visible is not None else ""
    if gpu_count > len(allowed):
        raise XDiTConfigError(f"gpu_count {gpu_count} is more than the {len(allowed)} GPUs here{limit}; set "
                              f"gpu_count to {len(allowed)} or 0 (all of them)")
    total = gpu_count or len(allowed)
    if allowed and reserve_gpus >= total:
        raise XDiTConfigError(f"reserve_gpus {reserve_gpus} leaves none of the {total} GPUs{limit} to the workers")
    order = [g for g in allowed if g != comfy_gpu] + [g for g in allowed if g == comfy_gpu]
    usable, reserved = order[:total - reserve_gpus], order[total - reserve_gpus:total]
    notes = []
    if user_visible is not None:
        notes.append(f"{VISIBLE_ENV}={user_visible} limits the workers to GPUs {_indices(allowed)}"
                     + (f" ({ignored})" if ignored else ""))
    if not allowed:  # the user hid every GPU: CPU workers, as on a machine without GPUs
        notes.insert(0, f"CPU workers ({world_size} ranks)")
        return Placement((), comfy_gpu, (), "; ".join(notes))
    if world_size > len(usable):
        why = f"{len(allowed)} GPUs{limit}" + (f", gpu_count {gpu_count}" if gpu_count else "")
        if reserved:
            why += f", {reserve_gpus} reserved for ComfyUI: GPU {_indices(reserved)}"
        raise XDiTConfigError(f"the mesh needs {world_size} GPUs but {len(usable)} are left to the workers here "
                              f"({why}); lower the degrees, free GPUs (gpu_count, reserve_gpus), or give a "
                              "ray_address of a cluster that has them")
    gpus = tuple(sorted(usable[:world_size], key=lambda g: g.index))
    ranks = ", ".join(f"rank {r} → GPU {g.index}" for r, g in enumerate(gpus))
    notes.insert(0, f"workers on physical GPU{'s' if len(gpus) > 1 else ''} {_indices(gpus)} ({ranks})")
    flag = f" ({comfy_flag})" if comfy_flag else ""
    if comfy_gpu is None:
        notes.append("ComfyUI computes on the CPU" if comfy_device is None else
                     "ComfyUI's GPU is not among NVML's (its CUDA order differs?)")
    elif comfy_gpu in gpus:
        notes.append(f"the mesh needs every GPU, including ComfyUI's GPU {comfy_gpu.index}{flag}: ComfyUI's "
                     "models there are freed only as far as the workers need")
    elif comfy_gpu in reserved:
        notes.append(f"GPU {comfy_gpu.index} is ComfyUI's{flag}, reserved for it")
    else:
        notes.append(f"GPU {comfy_gpu.index} is ComfyUI's{flag}")
    return Placement(gpus, comfy_gpu, tuple(allowed), "; ".join(notes), ranks)
