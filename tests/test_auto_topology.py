"""`auto` on fake topologies: the mesh it picks is the performance model's fastest among those that keep every
Ulysses and Ring group on one node, and its reason names the links; NVLink is read from NVML by PCI bus id."""

import pytest

from xdit_core.parallel.auto_mesh import choose_mesh
from xdit_core.parallel.mesh import ParallelConfig
from xdit_core.parallel.perf_model import predict
from xdit_core.parallel.perf_workloads import FLUX_DEV, SD35_LARGE, WAN21_T2V_14B, candidate_configs, describe, \
    nominal_workload
from xdit_core.runtime.topology import GpuPlace, Topology, bus_key, ray_topology, read_nvml_topology


def fake(nodes: int, per_node: int, nvlink: bool) -> Topology:
    gpus = tuple(GpuPlace(f"node{n}", i, f"0000:{16 * n + i + 1:02x}:00.0") for n in range(nodes)
                 for i in range(per_node))
    pairs = frozenset((a, b) for a in range(len(gpus)) for b in range(a + 1, len(gpus))
                      if nvlink and gpus[a].node == gpus[b].node)
    return Topology(gpus, pairs, "fake")


TOPOLOGIES = {  # name: (topology, what the reason must say of the links)
    "8x PCIe": (fake(1, 8, False), "8 GPUs on 1 node, PCIe only"),
    "8x NVLink": (fake(1, 8, True), "8 GPUs on 1 node, all NVLink"),
    "2 nodes x 4 NVLink": (fake(2, 4, True), "2 nodes x 4 GPUs, all NVLink, 25 GbE between nodes"),
    "4x PCIe": (fake(1, 4, False), "4 GPUs on 1 node, PCIe only"),
}
CASES = [(name, arch, cfg) for name in TOPOLOGIES for arch, cfg in ((FLUX_DEV, 1.0), (SD35_LARGE, 4.5))] + [
    ("4x PCIe", SD35_LARGE, 1.0)]


def spans_one_node(config: ParallelConfig, topology: Topology) -> bool:
    return all(len({topology.gpus[r].node for r in group}) == 1
               for dim in ("ulysses", "ring") for group in config.group_ranks(dim))


def model_best(arch, cfg: float, topology: Topology) -> tuple[list[ParallelConfig], list[float], float]:
    """Every valid mesh by predicted seconds (computed here, not by the chooser), and the serial seconds."""
    branches = 1 if cfg == 1.0 else 2
    w = nominal_workload(arch, branches)
    cluster = topology.cluster()
    valid = [c for c in candidate_configs(len(topology.gpus), arch.heads, arch.blocks, branches)
             if spans_one_node(c, topology)]
    times = {c: predict(w, c, cluster, 28).total for c in valid}
    ranked = sorted(valid, key=times.get)
    return ranked, [times[c] for c in ranked], predict(w, ParallelConfig(), cluster, 28).total


@pytest.mark.parametrize("name,arch,cfg", CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_auto_picks_the_models_fastest_valid_mesh_and_says_why(name, arch, cfg):
    topology, links = TOPOLOGIES[name]
    ranked, times, serial = model_best(arch, cfg, topology)
    chosen, why = choose_mesh(arch.family, arch.heads, len(topology.gpus), cfg, arch.blocks,
                              cluster=topology.cluster(), workload=nominal_workload(arch, 1))
    assert chosen == ranked[0]
    assert spans_one_node(chosen, topology)
    assert why.startswith(links)
    assert f"{describe(ranked[0])} predicted {serial / times[0]:.2f}x" in why
    assert f"runner-up {describe(ranked[1])} {serial / times[1]:.2f}x" in why
    assert ("approximate" in why) == (chosen.pipefusion_parallel_degree > 1)
    assert chosen.use_cfg_parallel <= (cfg != 1.0)


def test_the_topologies_lead_to_different_methods():
    """What the model says of the links: PipeFusion on PCIe, Ulysses/Ring over NVLink, and across 25 GbE
    nothing but PipeFusion and CFG (Ulysses and Ring stay inside a node)."""
    pick = {name: choose_mesh("flux", 24, len(t.gpus), 1.0, 57, cluster=t.cluster(),
                              workload=nominal_workload(FLUX_DEV, 1))[0] for name, (t, _) in TOPOLOGIES.items()}
    assert pick["8x PCIe"].pipefusion_parallel_degree > 1 and pick["4x PCIe"].pipefusion_parallel_degree > 1
    assert pick["8x NVLink"].pipefusion_parallel_degree == 1 and pick["8x NVLink"].sp_degree == 8
    assert pick["2 nodes x 4 NVLink"].sp_degree <= 4 and pick["2 nodes x 4 NVLink"].pipefusion_parallel_degree >= 2


def test_ulysses_and_ring_never_span_nodes():
    topology, _ = TOPOLOGIES["2 nodes x 4 NVLink"]
    for arch, cfg in ((FLUX_DEV, 1.0), (SD35_LARGE, 4.5), (WAN21_T2V_14B, 5.0)):
        for pipefusion in (True, False):
            chosen, why = choose_mesh(arch.family, arch.heads, 8, cfg, arch.blocks, cluster=topology.cluster(),
                                      workload=nominal_workload(arch, 1), pipefusion=pipefusion)
            assert spans_one_node(chosen, topology), (arch.name, chosen)
            assert "kept inside a node" in why


def test_pipefusion_is_left_out_for_host_driven_sampling_and_video():
    topology, _ = TOPOLOGIES["8x PCIe"]
    guider, why = choose_mesh("sd3", SD35_LARGE.heads, 8, 4.5, SD35_LARGE.blocks, cluster=topology.cluster(),
                              workload=nominal_workload(SD35_LARGE, 2), pipefusion=False)
    assert guider.pipefusion_parallel_degree == 1 and "host-driven" in why
    wan, why = choose_mesh("wan", WAN21_T2V_14B.heads, 8, 5.0, WAN21_T2V_14B.blocks, cluster=topology.cluster(),
                           workload=nominal_workload(WAN21_T2V_14B, 2))
    assert wan.pipefusion_parallel_degree == 1 and "video" in why
    rule, why = choose_mesh("sd3", 38, 4, 4.5, 38, pipefusion=False)
    assert rule.pipefusion_parallel_degree == 1 and rule.use_cfg_parallel and why.startswith("links unknown")


def test_unknown_links_keep_xdits_advice():
    assert choose_mesh("flux", 24, 4, 1.0, 57)[0] == ParallelConfig(ulysses_degree=4)
    chosen, why = choose_mesh("sd3", 38, 4, 4.5, 38)
    assert chosen == ParallelConfig(pipefusion_parallel_degree=2, use_cfg_parallel=True)
    assert why.startswith("links unknown") and "approximate" in why


def test_nvlink_groups_over_pcie_keep_ulysses_inside_a_group():
    """Two NVLink bridges (0-1, 2-3) on one PCIe machine: the fastest Ulysses pairs are the bridged ones."""
    gpus = tuple(GpuPlace("n", i) for i in range(4))
    topology = Topology(gpus, frozenset({(0, 1), (2, 3)}), "fake")
    assert topology.describe() == "4 GPUs on 1 node, NVLink groups of 2 over PCIe (fake)"
    assert [topology.link(0, 1), topology.link(1, 2)] == ["nvlink", "pcie"]
    ranked, _, _ = model_best(FLUX_DEV, 1.0, topology)
    chosen, _ = choose_mesh("flux", 24, 4, 1.0, 57, cluster=topology.cluster(), workload=nominal_workload(FLUX_DEV, 1))
    assert chosen == ranked[0]
    if chosen.ulysses_degree == 2:
        assert all(topology.link(*g) == "nvlink" for g in chosen.group_ranks("ulysses"))


# --------------------------------------------------------------------------------------------------
# Reading the links
# --------------------------------------------------------------------------------------------------
class FakeNVML:
    """NVML's calls that the reader makes, over GPUs given as (bus id, far ends of the active links)."""

    NVML_NVLINK_MAX_LINKS = 18
    NVML_FEATURE_ENABLED = 1

    class NVMLError(Exception):
        pass

    class _Pci:
        def __init__(self, bus):
            self.busId = bus.encode()

    def __init__(self, gpus):
        self.gpus = gpus

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetPciInfo(self, h):
        return self._Pci(self.gpus[h][0])

    def nvmlDeviceGetNvLinkState(self, h, link):
        ends = self.gpus[h][1]
        if ends is None:
            raise self.NVMLError("Not Supported")
        if link >= len(ends):
            raise self.NVMLError("Invalid Argument")
        return self.NVML_FEATURE_ENABLED

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h, link):
        return self._Pci(self.gpus[h][1][link])


def test_nvml_links_are_matched_to_the_workers_gpus_by_pci_bus_id():
    """NVML lists GPUs in its own order and spells bus ids with an 8-digit domain; the workers' GPUs come in
    rank order with 4 digits. A bridge between two GPUs joins exactly their ranks; a GPU without NVLink joins none."""
    nvml = FakeNVML([
        ("00000000:41:00.0", ["00000000:81:00.0", "00000000:81:00.0"]),  # two links of one bridge to 0x81
        ("00000000:81:00.0", ["00000000:41:00.0", "00000000:41:00.0"]),
        ("00000000:C1:00.0", None),  # no NVLink: NVML says NOT_SUPPORTED
        ("00000000:01:00.0", None),
    ])
    workers = ["0000:c1:00.0", "0000:41:00.0", "0000:01:00.0", "0000:81:00.0"]  # rank order
    topology = read_nvml_topology(workers, nvml=nvml)
    assert topology.nvlink == frozenset({(1, 3)})
    assert topology.link(1, 3) == "nvlink" and topology.link(0, 1) == topology.link(2, 3) == "pcie"
    assert "NVML" in topology.source and bus_key("00000000:41:00.0") == bus_key("0000:41:00.0")


def test_an_nvswitch_joins_every_gpu_attached_to_it():
    switches = ["00000000:05:00.0", "00000000:06:00.0"]
    nvml = FakeNVML([(f"00000000:{0x10 + i:02X}:00.0", switches) for i in range(8)])
    topology = read_nvml_topology([f"0000:{0x10 + i:02x}:00.0" for i in range(8)], nvml=nvml)
    assert len(topology.nvlink) == 28 and topology.describe().startswith("8 GPUs on 1 node, all NVLink")


def test_without_nvml_pcie_is_assumed_and_said():
    class Broken(FakeNVML):
        def nvmlInit(self):
            raise RuntimeError("driver not loaded")

    topology = read_nvml_topology(["0000:01:00.0", "0000:02:00.0"], nvml=Broken([]))
    assert topology.nvlink == frozenset() and "PCIe assumed" in topology.describe()


def test_ray_nodes_fill_ranks_node_by_node():
    nodes = [{"NodeID": "a", "Alive": True, "Resources": {"GPU": 4.0}},
             {"NodeID": "dead", "Alive": False, "Resources": {"GPU": 8.0}},
             {"NodeID": "b", "Alive": True, "Resources": {"GPU": 4.0}}]
    topology = ray_topology(nodes, 8)
    assert [g.node for g in topology.gpus] == ["a"] * 4 + ["b"] * 4
    assert topology.link(0, 3) == "pcie" and topology.link(3, 4) == "network"
    assert "PCIe assumed" in topology.source
    assert ray_topology(nodes, 9) is None


# --------------------------------------------------------------------------------------------------
# The mesh node
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pipefusion", [True, False])
def test_mesh_node_says_what_links_it_detected_and_why(tiny_models, monkeypatch, pipefusion):
    """On a (fake) 4x PCIe machine the node's auto summary names the links and the predicted speedups; the
    Guider's choice (no PipeFusion) says PipeFusion was left out."""
    from nodes import mesh as mesh_node
    from nodes.types import XDiTMesh, XDiTModel
    from xdit_core import api

    path = str(tiny_models["sd3"])
    spec = api.describe_model(path)
    model = XDiTModel(path, "fp32", spec.family, spec.variant, spec.num_heads, spec.num_blocks)
    monkeypatch.setattr(mesh_node, "worker_count", lambda mesh: 4)
    monkeypatch.setattr(mesh_node, "topology", lambda mesh, ranks: fake(1, ranks, False))
    chosen, summary = mesh_node.choose(XDiTMesh("auto"), model, 4.5, pipefusion=pipefusion)
    assert summary.startswith(f"auto: {chosen.describe()} — 4 GPUs on 1 node, PCIe only (fake): ")
    assert "predicted" in summary and "runner-up" in summary
    if not pipefusion:
        assert chosen.pipefusion_parallel_degree == 1 and "host-driven" in summary
