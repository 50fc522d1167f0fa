"""The links between the workers' GPUs: NVLink (bridges or NVSwitch), PCIe, or a network between nodes.

A `Topology` is pure data: the workers' GPUs in rank order (node, index, PCI bus id) and which pairs NVLink
joins; `cluster()` turns it into the performance model's `Cluster` (NVLink inside each NVLink group, PCIe
between a node's groups, the network between nodes), which is how `auto` ranks its meshes.

Where it comes from:
- one machine (`read_nvml_topology`): NVML, per GPU and link, whether the link is up and the PCI bus id at its
  other end; GPUs are matched by bus id (NVML's numbering ignores CUDA_VISIBLE_DEVICES), and a link whose far
  end is no GPU here is an NVSwitch, which joins every GPU attached to one. `torch.cuda.can_device_access_peer`
  cannot tell: it is true over PCIe too. Without NVML every pair is taken as PCIe, and the topology says so.
- a Ray cluster (`ray_topology`): the alive nodes' GPU counts, ranks filling one node's GPUs before the next
  (each node's links inside are taken as PCIe unless `inside` gives that node's NVLink groups).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from xdit_core.parallel.perf_model import LINKS, Cluster
from xdit_core.runtime.placement import _nvml, _text

def bus_key(bus_id: str) -> str:
    """One spelling of a PCI bus id (NVML writes the domain with 8 hex digits or 4, depending on the call)."""
    parts = bus_id.strip().lower().split(":")
    domain = int(parts[0], 16) if len(parts) == 3 else 0
    return f"{domain:04x}:" + ":".join(parts[-2:])


@dataclass(frozen=True)
class GpuPlace:
    """One worker's GPU: its node, its index there (PCI bus order), its PCI bus id."""

    node: str
    index: int
    pci_bus_id: str = ""


@dataclass(frozen=True)
class Topology:
    """The workers' GPUs in rank order and the pairs of ranks NVLink joins; `source` says where it comes from
    (and what was assumed)."""

    gpus: tuple[GpuPlace, ...]
    nvlink: frozenset[tuple[int, int]] = frozenset()
    source: str = "NVML"
    network: str = "eth25"  # LINKS' entry assumed between nodes

    def link(self, a: int, b: int) -> str:
        """The link kind between ranks `a` and `b`: nvlink, pcie or network."""
        if self.gpus[a].node != self.gpus[b].node:
            return "network"
        return "nvlink" if (min(a, b), max(a, b)) in self.nvlink else "pcie"

    def nodes(self) -> list[str]:
        """The nodes in rank order."""
        return list(dict.fromkeys(g.node for g in self.gpus))

    def groups(self) -> list[int]:
        """Each rank's NVLink group: ranks joined by NVLink, directly or through others (an NVSwitch joins all)."""
        group = list(range(len(self.gpus)))

        def root(r: int) -> int:
            while group[r] != r:
                r = group[r]
            return r

        for a, b in sorted(self.nvlink):
            group[root(b)] = root(a)
        return [root(r) for r in range(len(self.gpus))]

    def cluster(self) -> Cluster:
        """The performance model's view: NVLink inside each NVLink group, PCIe between a node's groups, the
        network between nodes."""
        nodes = self.nodes()
        groups = self.groups()
        places = tuple((nodes.index(g.node), groups[r]) for r, g in enumerate(self.gpus))
        fast = LINKS["nvlink"] if self.nvlink else LINKS["pcie"]
        return Cluster(self.describe(), fast, nodes=len(nodes), inter=LINKS[self.network] if len(nodes) > 1 else None,
                       bridge=LINKS["pcie"] if self.nvlink else None, places=places)

    def describe(self) -> str:
        """One line: GPUs per node and the links between them, with the source."""
        nodes = self.nodes()
        groups = self.groups()
        per_node = [[r for r, g in enumerate(self.gpus) if g.node == n] for n in nodes]
        inside = []
        for ranks in per_node:
            sizes = sorted({sum(1 for r in ranks if groups[r] == groups[q]) for q in ranks})
            if len(ranks) > 1 and len({groups[r] for r in ranks}) == 1:
                inside.append("all NVLink")
            elif sizes == [1] or len(ranks) == 1:
                inside.append("PCIe only" if len(ranks) > 1 else "1 GPU")
            else:
                inside.append(f"NVLink groups of {'/'.join(map(str, sizes))} over PCIe")
        counts = [len(r) for r in per_node]
        shape = f"{len(nodes)} nodes x {counts[0]} GPUs" if len(set(counts)) == 1 and len(nodes) > 1 else \
            f"{len(self.gpus)} GPUs on {len(nodes)} node{'s' if len(nodes) > 1 else ''}"
        links = inside[0] if len(set(inside)) == 1 else ", ".join(inside)
        between = f", {LINKS[self.network].name} between nodes" if len(nodes) > 1 else ""
        return f"{shape}, {links}{between} ({self.source})"


def nvlink_pairs(bus_ids: Sequence[str], remote_ends: Mapping[str, Sequence[str]]) -> frozenset[tuple[int, int]]:
    """Pairs of positions in `bus_ids` that NVLink joins, from each GPU's active links' far ends (bus ids): a far
    end that is one of `bus_ids` is a direct link; any other is an NVSwitch, which joins the GPUs attached to it."""
    where = {bus_key(b): i for i, b in enumerate(bus_ids)}
    pairs, switches = set(), {}
    for bus, ends in remote_ends.items():
        me = where.get(bus_key(bus))
        if me is None:
            continue
        for end in ends:
            peer = where.get(bus_key(end))
            if peer is None:
                switches.setdefault(bus_key(end), set()).add(me)
            elif peer != me:
                pairs.add((min(me, peer), max(me, peer)))
    for attached in switches.values():
        ranks = sorted(attached)
        pairs.update((a, b) for i, a in enumerate(ranks) for b in ranks[i + 1:])
    return frozenset(pairs)


def read_nvml_links(nvml: Any) -> dict[str, list[str]]:
    """Every GPU's bus id and the far ends (bus ids) of its active NVLinks, from an initialised NVML."""
    out = {}
    for i in range(nvml.nvmlDeviceGetCount()):
        handle = nvml.nvmlDeviceGetHandleByIndex(i)
        ends = []
        for link in range(nvml.NVML_NVLINK_MAX_LINKS):
            try:
                if nvml.nvmlDeviceGetNvLinkState(handle, link) != nvml.NVML_FEATURE_ENABLED:
                    continue
                ends.append(_text(nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link).busId))
            except nvml.NVMLError:  # no NVLink on this GPU (NOT_SUPPORTED), or fewer links than the maximum
                break
        out[_text(nvml.nvmlDeviceGetPciInfo(handle).busId)] = ends
    return out


def read_nvml_topology(bus_ids: Sequence[str], node: str = "local", nvml: Any = None) -> Topology:
    """The topology of this machine's GPUs `bus_ids` (the workers', in rank order) from NVML; without NVML or
    on its failure, every pair is taken as PCIe and `source` says why. `nvml`: the bindings (default: the
    installed pynvml, or Ray's copy)."""
    places = tuple(GpuPlace(node, i, b) for i, b in enumerate(bus_ids))
    nvml = nvml or _nvml()
    if nvml is None:
        return Topology(places, source="no NVML bindings: PCIe assumed")
    try:
        nvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 - no driver: no NVLink to read
        return Topology(places, source=f"NVML unavailable ({e}): PCIe assumed")
    try:
        ends = read_nvml_links(nvml)
    except Exception as e:  # noqa: BLE001 - a GPU NVML cannot read
        return Topology(places, source=f"NVML failed ({e}): PCIe assumed")
    finally:
        try:
            nvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass
    return Topology(places, nvlink_pairs(bus_ids, ends), source="NVML")


def ray_topology(nodes: Sequence[Mapping[str, Any]], ranks: int, resource: str = "GPU",
                 inside: Optional[Mapping[str, Topology]] = None) -> Optional[Topology]:
    """The topology of `ranks` workers on a Ray cluster (`nodes`: `ray.nodes()`), ranks filling each alive node's
    `resource`s in turn, most first; `inside` gives a node's own topology (by node id) where it was read there.
    None when the cluster has fewer than `ranks`."""
    alive = sorted((n for n in nodes if n.get("Alive")), key=lambda n: -int(n["Resources"].get(resource, 0)))
    places, pairs, read = [], set(), False
    for n in alive:
        node_id = n["NodeID"]
        take = min(int(n["Resources"].get(resource, 0)), ranks - len(places))
        local = (inside or {}).get(node_id)
        first = len(places)
        for i in range(take):
            places.append(GpuPlace(node_id, i, local.gpus[i].pci_bus_id if local else ""))
        if local is not None:
            read = True
            pairs.update((first + a, first + b) for a, b in local.nvlink if a < take and b < take)
    if len(places) < ranks:
        return None
    source = "Ray nodes" + ("; NVML on each node" if read else "; links inside a node unknown: PCIe assumed")
    return Topology(tuple(places), frozenset(pairs), source)
