"""The persistent worker pool: one Ray actor per rank, warm across requests, with progress, cancel and
recovery from failed or dead ranks.

Policy: a process keeps at most one pool (`get_pool`), one set of actors for one mesh (degrees, attention
backend, threads). Its ranks keep several models resident (Wan 2.2's two experts, two models in one graph):
a request for a resident model loads nothing; a new model is loaded beside the others, after evicting the
least recently used ones while the weights per rank would exceed the resident budget ($XDIT_RESIDENT_GB).
Another mesh shuts the old actors down first, freeing their memory; `unload()` frees everything. A request
that fails (a rank raised or died) kills all ranks, because the survivors are blocked in collectives; the
next request rebuilds the pool with only its model.
"""
from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from xdit_core.import_root import engine_import_root
from xdit_core.errors import XDiTCancelled, XDiTConfigError, XDiTWorkerError
from xdit_core.parallel.mesh import ParallelConfig, validate_parallel_config
from xdit_core.runtime import timeouts
from xdit_core.models.base import BranchCond
from xdit_core.runtime.job import ModelRef
from xdit_core.runtime.launch import Rendezvous
from xdit_core.runtime.limits import estimate_weight_bytes, resident_budget
from xdit_core.runtime.placement import Placement
from xdit_core.sampling.request import LoraRef, SampleRequest

log = logging.getLogger("xdit")
POLL_S = 0.05
PING_EVERY_S = 0.5
FAILURE_SETTLE_S = 3.0  # after a first failure, time for Ray to report a dead actor as the cause


@dataclass(frozen=True)
class PoolKey:
    """What identifies a warm pool: same key, same actors and weights."""

    model_path: str
    dtype: str
    family: Optional[str]
    variant: Optional[str]
    parallel: ParallelConfig
    attention_backend: str = "auto"
    threads: int = 1
    keep_fp8: bool = True

    @property
    def model(self) -> ModelRef:
        return ModelRef(self.model_path, self.dtype, self.family, self.variant, self.keep_fp8)

    @property
    def mesh(self) -> tuple[ParallelConfig, str, int]:
        """What the actors are built for: requests with the same mesh share them, whatever their model."""
        return self.parallel, self.attention_backend, self.threads


@dataclass
class PoolStats:
    """Cold-start breakdown and request counters, in seconds."""

    ray_start_s: float = 0.0
    actor_start_s: float = 0.0
    rendezvous_s: float = 0.0
    load_s: float = 0.0
    requests: int = 0
    last_reports: list[dict[str, Any]] = field(default_factory=list)


def ray_address_from_env(address: Optional[str]) -> Optional[str]:
    """The explicit address, else XDIT_RAY_ADDRESS, else None (start a local Ray)."""
    return address or os.environ.get("XDIT_RAY_ADDRESS") or None


_ADDRESS = re.compile(r"^(?:ray://)?(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9][A-Za-z0-9._-]*):(\d{1,5})$")


def parse_ray_address(address: Optional[str]) -> Optional[tuple[str, int]]:
    """(host, port) of a cluster address; None for no address or "auto" (a cluster already running on
    this machine, which Ray finds itself). A malformed address fails here, before anything starts."""
    if address is None or address == "auto":
        return None
    match = _ADDRESS.match(address)
    if match is None or not 0 < int(match.group(2)) < 65536:
        raise XDiTConfigError(f"Ray address {address!r} is not host:port (or ray://host:port, or auto), "
                              "e.g. 192.168.1.10:6379")
    return match.group(1).strip("[]"), int(match.group(2))


def check_ray_address(address: Optional[str]) -> None:
    """Fail at once, with the reason, on a cluster address that is malformed or does not accept a TCP
    connection within the connect timeout (Ray itself would retry for minutes)."""
    target = parse_ray_address(address)
    if target is None:
        return
    limit = timeouts.connect_timeout_s()
    try:
        with socket.create_connection(target, timeout=limit):
            pass
    except OSError as e:
        raise XDiTConfigError(f"Ray address {address!r} does not answer within {limit:g}s "
                              f"(XDIT_CONNECT_TIMEOUT_S): {e.strerror or e}; is the cluster up "
                              "(`ray start --head`) and the port open?") from None


def worker_pythonpath() -> str:
    """The workers' PYTHONPATH: the directory that holds only the engine package, then the inherited path."""
    return os.pathsep.join(p for p in (str(engine_import_root()), os.environ.get("PYTHONPATH", "")) if p)


def _token_auth_mode() -> bool:
    """Whether this process's Ray uses token authentication (Ray >= 2.52; its settings are read at import)."""
    try:
        from ray._raylet import AuthenticationMode, get_authentication_mode
    except ImportError:
        return False
    return get_authentication_mode() == AuthenticationMode.TOKEN


def _require_token_auth() -> None:
    """A local Ray serves on every network interface (it replaces a loopback node address with the
    machine's), so its ports must refuse anyone without the token."""
    import ray

    version = tuple(int(p) for p in re.findall(r"\d+", ray.__version__)[:2])
    if version < (2, 52):
        raise XDiTConfigError(f"Ray {ray.__version__} has no token authentication, so a local worker pool "
                              "would accept work from the network; install ray>=2.52")
    if os.environ.get("RAY_AUTH_MODE", "token").lower() != "token":
        log.warning("xDiT: RAY_AUTH_MODE=%s ignored: the local worker pool always uses Ray's token "
                    "authentication", os.environ["RAY_AUTH_MODE"])
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray read its settings when imported: make this process use the token too (what Ray itself does)
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError) as e:
        raise XDiTConfigError(f"cannot turn on Ray {ray.__version__}'s token authentication ({e}); "
                              "start ComfyUI with RAY_AUTH_MODE=token") from None
    if not _token_auth_mode():
        raise XDiTConfigError(f"Ray {ray.__version__} did not turn on token authentication; start ComfyUI with "
                              "RAY_AUTH_MODE=token")
    _write_private_token()


def _write_private_token() -> None:
    """Ray writes the token it generates readable by everyone: write one first, readable by this user only."""
    if os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return
    path = os.path.join(os.path.expanduser("~"), ".ray", "auth_token")
    if os.path.exists(path):
        os.chmod(path, 0o600)
        return
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(secrets.token_hex(32))  # 256 bits, as Ray's own generator


# What this process's Ray was started for: (address, the local GPUs' CUDA_VISIBLE_DEVICES or None), with
# address "" for the private local one; None: not started here.
_RAY_FOR: Optional[tuple[str, Optional[str]]] = None


@contextmanager
def environment(values: dict[str, str], unset: tuple[str, ...] = ()):
    """`values` in os.environ (and `unset` out of it) for the duration, then the previous values back: what
    processes started meanwhile inherit (the local Ray's raylet and workers at ray.init, spawned ranks)."""
    saved = {k: os.environ.get(k) for k in (*values, *unset)}
    for k in unset:
        os.environ.pop(k, None)
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ensure_ray(address: Optional[str], num_cpus: Optional[int] = None,
               placement: Optional[Placement] = None) -> float:
    """Connect to the Ray cluster at `address`, or start a private local Ray (token authentication on,
    dashboard off); returns the seconds it took.

    A local Ray with a `placement` gets exactly its GPUs: `num_gpus` and CUDA_VISIBLE_DEVICES (physical
    indices, CUDA_DEVICE_ORDER=PCI_BUS_ID) for the raylet, which hands each GPU actor one of them; without one,
    Ray detects the GPUs this process sees, as before. A Ray already running in this process is reused only if
    it was started here for the same address and GPUs (another GPU set restarts it); one started by someone else
    (another plugin) is reused for a local pool only with token authentication on."""
    global _RAY_FOR
    import ray

    t0 = time.perf_counter()
    gpu_env = placement.ray_env if placement is not None and not address else None
    wanted = (address or "", None if gpu_env is None else gpu_env["CUDA_VISIBLE_DEVICES"])
    if ray.is_initialized():
        if _RAY_FOR == wanted:
            return 0.0
        if _RAY_FOR is None and not address and not _token_auth_mode():
            raise XDiTConfigError("Ray is already running in this process without token authentication "
                                  "(started by another plugin?), so a local worker pool would accept work from the "
                                  "network; start ComfyUI with RAY_AUTH_MODE=token, or give a cluster address")
        if _RAY_FOR is None:
            if gpu_env is not None:
                log.warning("xDiT: reusing a Ray started by someone else in this process: its GPUs, not %s",
                            placement.note)
            return 0.0
        ray.shutdown()  # ours, for another address or other GPUs: its ranks would run in the wrong place
    env = {"env_vars": {"PYTHONPATH": worker_pythonpath()}}
    if address:
        check_ray_address(address)
        ray.init(address=address, runtime_env=env, logging_level=logging.WARNING, log_to_driver=False)
    else:
        _require_token_auth()
        gpus = {}
        if gpu_env is not None:
            gpus = {"num_gpus": len(placement.gpus)}
            env["env_vars"]["CUDA_DEVICE_ORDER"] = gpu_env["CUDA_DEVICE_ORDER"]
            log.info("xDiT: local Ray with CUDA_VISIBLE_DEVICES=%s: %s", gpu_env["CUDA_VISIBLE_DEVICES"] or "''",
                     placement.note)
        # address="local": always a fresh, private instance, never some other cluster found on the machine.
        with environment(gpu_env or {}):
            ray.init(address="local", num_cpus=num_cpus or max(os.cpu_count() or 1, 8), include_dashboard=False,
                     runtime_env=env, logging_level=logging.WARNING, log_to_driver=False, **gpus)
    _RAY_FOR = wanted
    return time.perf_counter() - t0


def check_resources(parallel: ParallelConfig, use_gpu: bool) -> None:
    """Fail before any actor starts if the cluster cannot hold the mesh; the message lists what each node has."""
    import ray

    resource = "GPU" if use_gpu else "CPU"
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_node = [(n["NodeManagerAddress"], int(n["Resources"].get(resource, 0))) for n in nodes]
    need, uly = parallel.world_size, parallel.ulysses_degree
    # Each ulysses group must fit on one node: count how many whole groups the nodes can hold.
    groups_fit = sum(have // uly for _, have in per_node)
    if groups_fit * uly < need:
        listing = ", ".join(f"{addr}: {have}" for addr, have in per_node) or "no nodes"
        raise XDiTConfigError(
            f"the mesh ({parallel.describe()}) needs {need} {resource}s with each group of {uly} ulysses ranks "
            f"on one node, but the Ray cluster has {resource}s per node: {listing}")


class WorkerPool:
    """A warm set of rank actors for one PoolKey."""

    def __init__(self, key: PoolKey, ray_address: Optional[str] = None, placement: Optional[Placement] = None):
        validate_parallel_config(key.parallel)
        self.key = key
        self.address = ray_address_from_env(ray_address)
        # The local workers' physical GPUs (None: those Ray detects; ignored for a cluster address).
        self.placement = placement if self.address is None else None
        self.stats = PoolStats()
        self.workers: list = []
        self.placement_groups: list = []
        self.infos: list[dict[str, Any]] = []
        self.broken = False
        self.last_job: Optional[str] = None
        self._rendezvous_dir: Optional[str] = None
        # The models every rank holds, least recently used first, with the weight bytes of its largest share.
        self.resident: OrderedDict[ModelRef, int] = OrderedDict()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the actors (one per rank), rendezvous and load the weights."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from xdit_core.runtime.worker import RankWorker

        self.broken = True  # until every rank is set up: a start that fails is rebuilt by the next request
        self.stats.ray_start_s = ensure_ray(self.address, placement=self.placement)
        use_gpu = bool(self.placement.gpus) if self.placement is not None else torch.cuda.is_available()
        parallel = self.key.parallel
        check_resources(parallel, use_gpu)
        t0 = time.perf_counter()
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        uly = parallel.ulysses_degree
        # One strictly packed placement group per ulysses group keeps its all-to-alls on one node.
        self.placement_groups = [placement_group([bundle] * uly, strategy="STRICT_PACK")
                                 for _ in range(parallel.world_size // uly)]
        ray.get([pg.ready() for pg in self.placement_groups])
        actor_cls = ray.remote(RankWorker)
        self.workers = []
        for rank in range(parallel.world_size):
            strategy = PlacementGroupSchedulingStrategy(self.placement_groups[rank // uly], rank % uly)
            self.workers.append(actor_cls.options(
                num_cpus=1, num_gpus=1 if use_gpu else 0, max_concurrency=4, scheduling_strategy=strategy,
                name=None).remote(rank, parallel.world_size, self.key.threads))
        self.infos = ray.get([w.info.remote() for w in self.workers])
        self.stats.actor_start_s = time.perf_counter() - t0
        rendezvous = self._rendezvous()
        timings = self._collect([w.setup.remote(rendezvous, self.key.model, parallel, self.key.attention_backend)
                                 for w in self.workers])
        self.stats.rendezvous_s = max(t["rendezvous_s"] for t in timings)
        self.stats.load_s = max(t["load_s"] for t in timings)
        self.resident = OrderedDict([(self.key.model, max(t["param_bytes"] for t in timings))])
        self.broken = False

    def use(self, key: PoolKey) -> None:
        """Make `key`'s model the one requests run on, loading it (after evicting the least recently used
        models the resident budget cannot keep beside it) unless it is resident already."""
        model = key.model
        self.key = key
        if self.broken or not self.workers:
            return  # the next request rebuilds the pool with this model
        if model in self.resident:
            self.resident.move_to_end(model)
            return
        budget = resident_budget(key.parallel.world_size, torch.cuda.is_available())
        need = estimate_weight_bytes(model.path, model.dtype, key.parallel, model.keep_fp8)
        evict = []
        while self.resident and budget is not None and sum(self.resident.values()) + need > budget:
            evict.append(self.resident.popitem(last=False)[0])
        if evict:
            log.info("xDiT: evicting %s to load %s (resident budget %.1f GiB per rank)",
                     ", ".join(m.path for m in evict), model.path, budget / 2 ** 30)
        loaded = self._collect([w.load.remote(model, evict) for w in self.workers])
        self.stats.load_s = max(t["load_s"] for t in loaded)
        self.resident[model] = max(t["param_bytes"] for t in loaded)

    def _rendezvous(self) -> Rendezvous:
        """Ranks all on this machine (no cluster address): a FileStore in a private folder (kept while the
        pool lives: NCCL reads it again when it builds a communicator). Otherwise a TCP store on rank 0's
        node, reachable from the cluster's network as the user chose."""
        import ray

        here = ray.get_runtime_context().get_node_id()
        if self.address is None and all(info["node_id"] == here for info in self.infos):
            self._rendezvous_dir = tempfile.mkdtemp(prefix="xdit-rendezvous-")
            return Rendezvous(store_file=os.path.join(self._rendezvous_dir, "store"))
        return Rendezvous(host=self.infos[0]["ip"], port=self.infos[0]["port"])

    def shutdown(self) -> None:
        """Stop every actor and free its memory (and the placement groups)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            ray.kill(w, no_restart=True)
        for pg in self.placement_groups:
            remove_placement_group(pg)
        self.workers, self.placement_groups, self.infos = [], [], []
        self.resident.clear()
        if self._rendezvous_dir is not None:
            shutil.rmtree(self._rendezvous_dir, ignore_errors=True)
            self._rendezvous_dir = None

    def memory_report(self, timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Each rank's memory (`RankWorker.memory`: bytes torch holds on its GPU, or the process's RSS on the
        CPU), with `gpu`, the physical GPU index it runs on (None on the CPU or where unknown)."""
        import ray

        reports = ray.get([w.memory.remote() for w in self.workers], timeout=timeout_s)
        for report in reports:
            gpu = self.placement.gpu_of(report.get("cuda_visible_devices")) if self.placement else None
            report["gpu"] = None if gpu is None else gpu.index
            if gpu is None and report.get("device", "cpu") != "cpu":
                report["gpu"] = report.get("cuda_visible_devices")  # Ray's own id (no placement: its detection)
        return reports

    def worker_stats(self) -> list[dict[str, Any]]:
        """Each rank's load counter and load time."""
        import ray

        return ray.get([w.stats.remote() for w in self.workers])

    # -- requests ----------------------------------------------------------------------------
    def sample(self, request: SampleRequest, on_progress: Optional[Callable[[int, int], None]] = None,
               cancel: Optional[Callable[[], bool]] = None,
               on_preview: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
        """Run `request` on every rank; returns rank 0's latent (model space, float32, CPU). `on_preview(step,
        x0)` gets the latest step's prediction of the first image at each poll (request.preview must be set).

        Raises XDiTCancelled when `cancel()` turned true: all ranks stop at the same step, or, when they
        do not within the cancel grace period, are killed (the pool rebuilds on the next request).
        Raises XDiTWorkerError when a rank failed, died or stopped answering (the pool rebuilds too).
        """
        import ray

        timeouts.liveness_timeout_s(), timeouts.cancel_grace_s()  # malformed settings fail before work
        if self.broken or not self.workers:
            if self.workers:
                self.shutdown()
            self.start()
        job = self.last_job = uuid.uuid4().hex
        req_ref = ray.put(request)
        seen = 0
        in_flight: list = []  # at most one poll call: a frozen rank must not block the wait loop
        # The rank that sees whole predictions (rank 0, or PipeFusion's last stage) reports steps and previews.
        reporter = self.workers[self.key.parallel.preview_rank]

        def show(steps: list, preview: Optional[tuple[int, torch.Tensor]]) -> None:
            nonlocal seen
            if on_preview is not None and preview is not None:
                on_preview(*preview)
            if on_progress is not None:
                for step, total in steps[seen:]:
                    on_progress(step, total)
            seen = max(seen, len(steps))

        def poll(final: bool) -> None:
            if on_progress is None and on_preview is None:
                return
            if final:  # every rank has returned: the reporter answers at once
                calls = in_flight + [reporter.poll.remote(job)]  # a poll in flight may hold a preview it took
                in_flight.clear()
                for call in calls:
                    try:
                        show(*ray.get(call, timeout=timeouts.liveness_timeout_s()))
                    except ray.exceptions.GetTimeoutError:
                        return
                return
            if not in_flight:
                in_flight.append(reporter.poll.remote(job))
            if ray.wait(in_flight, timeout=0)[0]:
                show(*ray.get(in_flight.pop()))

        def stop() -> None:
            self.workers[0].request_stop.remote(job)

        model = self.key.model
        results = self._collect([w.sample.remote(req_ref, job, model) for w in self.workers], poll, stop, cancel)
        self.stats.requests += 1
        cancelled = [r for r in results if "cancelled" in r]
        if cancelled:
            raise XDiTCancelled(cancelled[0]["cancelled"])
        self.stats.last_reports = [r["report"] for r in results]
        return results[0]["samples"]

    def evaluations(self, positive: BranchCond, negative: Optional[BranchCond],
                    loras: tuple[LoraRef, ...] = ()) -> "PoolEvaluations":
        """Open host-driven evaluations of the current model with a prompt's conditioning and LoRAs (a context
        manager)."""
        if self.broken or not self.workers:
            if self.workers:
                self.shutdown()
            self.start()
        return PoolEvaluations(self, positive, negative, loras)

    def _collect(self, refs: list, poll: Optional[Callable[[bool], None]] = None,
                 stop: Optional[Callable[[], None]] = None, cancel: Optional[Callable[[], bool]] = None) -> list:
        """Wait for one call per rank, polling between waits; on failure end the request on every rank.

        - After the first failure the others get FAILURE_SETTLE_S to report, so that a dead rank is
          blamed rather than the peers whose collectives broke because of it.
        - Every rank is pinged; one that leaves a ping unanswered for the liveness timeout is frozen:
          all ranks are killed and the request fails naming it.
        - When `cancel()` turns true (or `poll`, a host callback, raises) the ranks are asked to stop
          with `stop`; those that have not within the cancel grace period are killed. So no request
          is ever left running on the actors, and ComfyUI's queue moves on.
        """
        import ray

        rank_of = {ref: r for r, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        errors: dict[int, Exception] = {}
        first_error = None
        aborted: Optional[BaseException] = None
        stop_at: Optional[float] = None
        pings = _Pings(self.workers)
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL_S)
            for ref in done:
                try:
                    results[rank_of[ref]] = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a rank raised or its process died
                    errors[rank_of[ref]] = e
                    first_error = first_error or time.monotonic()
            if not pending:
                break
            if errors:
                if time.monotonic() - first_error > FAILURE_SETTLE_S:
                    break
                continue
            frozen = pings.frozen(set(results))
            if frozen is not None:
                self._kill(frozen)
            if stop_at is None:
                try:
                    if poll is not None:
                        poll(False)
                    wants_stop = cancel is not None and cancel()
                except BaseException as e:  # noqa: BLE001 - re-raised once every rank has stopped
                    aborted, wants_stop = e, True
                if wants_stop and stop is not None:
                    stop()
                    stop_at = time.monotonic()
            elif time.monotonic() - stop_at > timeouts.cancel_grace_s():
                self.broken = True
                self.shutdown()
                if aborted is not None:
                    raise aborted
                raise XDiTCancelled(f"cancelled; the ranks did not stop within {timeouts.cancel_grace_s():g}s "
                                    "(XDIT_CANCEL_GRACE_S) and were killed, the pool restarts on the next request")
        if errors:
            self._fail(errors)
        if aborted is not None:
            raise aborted
        if poll is not None and stop_at is None:
            poll(True)  # the steps reported since the last poll
        return [results[r] for r in range(len(refs))]

    def _kill(self, frozen: tuple[int, float]) -> None:
        rank, silent_s = frozen
        info = self.infos[rank] if rank < len(self.infos) else {}
        self.broken = True
        self.shutdown()
        raise XDiTWorkerError(f"rank {rank} (pid {info.get('pid', '?')}) stopped responding: no answer for "
                              f"{silent_s:.1f}s (limit {timeouts.liveness_timeout_s():g}s, "
                              "XDIT_LIVENESS_TIMEOUT_S); all ranks were stopped, the pool restarts on the next "
                              "request")

    def _fail(self, errors: dict[int, Exception]) -> None:
        """Blame a dead rank first, else the lowest failing rank; kill all ranks; raise XDiTWorkerError."""
        from ray.exceptions import RayActorError

        dead = sorted(r for r, e in errors.items() if isinstance(e, RayActorError))
        rank = dead[0] if dead else min(errors)
        info = self.infos[rank] if rank < len(self.infos) else {}
        self.broken = True
        self.shutdown()
        what = "died" if dead else "failed"
        raise XDiTWorkerError(f"rank {rank} (pid {info.get('pid', '?')}) {what}: {_short(errors[rank])}",
                              details=str(errors[rank])) from None


class PoolEvaluations:
    """Model evaluations driven by the host's sampler (ComfyUI's, through the xDiT Guider): the ranks keep the
    weights and the prompt's conditioning; each call sends the scaled latent and timestep and gets rank 0's raw
    outputs back. A failed or frozen rank fails the call as a request would (the pool rebuilds)."""

    def __init__(self, pool: WorkerPool, positive: BranchCond, negative: Optional[BranchCond],
                 loras: tuple[LoraRef, ...] = ()):
        self.pool, self.session = pool, uuid.uuid4().hex
        self.evaluations = 0
        pool._collect([w.begin_evaluations.remote(self.session, pool.key.model, positive, negative, loras)
                       for w in pool.workers])

    def __call__(self, xc: torch.Tensor, timestep: torch.Tensor,
                 with_negative: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Raw model outputs (positive, negative or None), float32 on the CPU."""
        import ray

        xc_ref, t_ref = ray.put(xc.detach().cpu()), ray.put(timestep.detach().cpu())
        results = self.pool._collect([w.evaluate.remote(self.session, xc_ref, t_ref, with_negative)
                                      for w in self.pool.workers])
        self.evaluations += 1
        return results[0]

    def close(self) -> None:
        """Free the conditioning on the ranks (nothing to do when the pool was torn down meanwhile)."""
        if self.pool.workers and not self.pool.broken:
            self.pool._collect([w.end_evaluations.remote(self.session) for w in self.pool.workers])

    def __enter__(self) -> "PoolEvaluations":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Pings:
    """Keeps one ping in flight per rank (every PING_EVERY_S) and says which rank left one unanswered
    for longer than the liveness timeout."""

    def __init__(self, workers: list):
        self.workers = workers
        self.in_flight: dict[int, tuple[Any, float]] = {}
        self.last_answer = {r: time.monotonic() for r in range(len(workers))}

    def frozen(self, finished: set[int]) -> Optional[tuple[int, float]]:
        import ray

        now = time.monotonic()
        for rank, worker in enumerate(self.workers):
            if rank in finished:
                continue
            sent = self.in_flight.get(rank)
            if sent is not None:
                ready, _ = ray.wait([sent[0]], timeout=0)
                if ready:
                    self.last_answer[rank] = now
                    del self.in_flight[rank]
                elif now - sent[1] > timeouts.liveness_timeout_s():
                    return rank, now - sent[1]
            if rank not in self.in_flight and now - self.last_answer[rank] >= PING_EVERY_S:
                self.in_flight[rank] = (worker.ping.remote(), now)
        return None


def _short(error: Exception) -> str:
    """The rank's own message: its exception for a raise, the first line of Ray's report for a death."""
    cause = getattr(error, "cause", None)  # RayTaskError carries the rank's exception
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else 'no message'}"


_POOL: Optional[WorkerPool] = None
_LOCAL_PLACEMENT: Optional[Placement] = None


def place_local_workers(placement: Optional[Placement]) -> None:
    """The GPUs a local pool's workers take from the next request on (None: the GPUs Ray detects, as the CLI
    does). A running local pool on other GPUs is rebuilt by that request."""
    global _LOCAL_PLACEMENT
    _LOCAL_PLACEMENT = placement


def local_placement() -> Optional[Placement]:
    return _LOCAL_PLACEMENT


def _gpus(placement: Optional[Placement]):
    return None if placement is None else placement.gpus


def get_pool(key: PoolKey, ray_address: Optional[str] = None) -> WorkerPool:
    """The process's pool for `key`'s mesh, running `key`'s model (loaded unless resident); a pool for another
    mesh, address or set of local GPUs is shut down first."""
    global _POOL
    address = ray_address_from_env(ray_address)
    placement = _LOCAL_PLACEMENT if address is None else None
    if _POOL is not None and (_POOL.key.mesh != key.mesh or _POOL.address != address
                              or _gpus(_POOL.placement) != _gpus(placement)):
        _POOL.shutdown()
        _POOL = None
    if _POOL is None:
        _POOL = WorkerPool(key, ray_address, placement)
        _POOL.start()
    else:
        _POOL.use(key)
    return _POOL


def running_pool() -> Optional[WorkerPool]:
    """The process's pool when it is up (actors started, not failed), else None; starts nothing."""
    return _POOL if _POOL is not None and _POOL.workers and not _POOL.broken else None


def workers_memory() -> list[dict[str, Any]]:
    """Each rank's memory report (`WorkerPool.memory_report`) when a pool is up, else []; starts nothing. A
    pool that does not answer within seconds reports nothing (logged), it is not failed for it."""
    pool = running_pool()
    if pool is None:
        return []
    try:
        return pool.memory_report()
    except Exception as e:  # noqa: BLE001 - a report is never worth a failed prompt
        log.warning("xDiT: the workers did not report their memory: %s", _short(e))
        return []


def unload() -> None:
    """Shut the pool down and free everything it held."""
    global _POOL
    if _POOL is not None:
        _POOL.shutdown()
        _POOL = None
