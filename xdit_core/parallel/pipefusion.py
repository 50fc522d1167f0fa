"""PipeFusion: the blocks split into stages, the latent into M horizontal patches that flow through them.

Every attention layer of a stage keeps full-length image K/V buffers (per CFG branch). A patch writes
its fresh K/V into its slice and attends over the whole buffer: fresh for the patches already done at
this evaluation, one evaluation stale for the rest. The first `warmup_steps` steps run synchronously on
the whole image (exact, and they fill the buffers). Then patches go stage to stage point to point; the
last stage runs the head, CFG and the sampler step per patch and sends the patch's next input back to
the first stage. Ulysses and Ring may run inside each stage: the buffers then live in the
post-all-to-all layout (this rank's heads, every image token), and the ring ranks exchange only the
current patch's fresh K/V; joint text is replicated within a stage.

Stop point: every rank ends a step when it has processed that step's last patch; cancel and progress
are decided there (the pool broadcasts rank 0's decision), so all ranks stop at the same step.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from xdit_core.parallel.attention import Segment, SPGroups, select_lse_kernel, usp_attention
from xdit_core.parallel.comm import Comm
from xdit_core.errors import XDiTCancelled, XDiTWorkerError
from xdit_core.models.base import ModelAdapter, Tokens
from xdit_core.parallel.context import RankContext
from xdit_core.parallel.p2p import P2PChannel
from xdit_core.parallel.routing import AttentionRouter
from xdit_core.sampling.finite import check_first_prediction
from xdit_core.sampling.request import SampleRequest
from xdit_core.sampling.inpaint import Inpaint
from xdit_core.sampling.preview import StepPreview
from xdit_core.sampling.samplers import ModelSampling, Sampler, make_noise
from xdit_core.parallel.sequence_parallel import shard_padded
from xdit_core.parallel.stages import balance_stages, module_bytes, patch_rows

log = logging.getLogger("xdit")


@dataclass
class Unit:
    """A piece of work flowing through the stages: some image tokens of one CFG branch."""

    rows: tuple[int, int]  # latent rows
    tokens: torch.Tensor  # global image token indices, in order
    branch: int


class PipeFusionKV:
    """The stage's attention: per-layer K/V buffers that patches refresh and attend over (module docstring)."""

    def __init__(self, joint_order: tuple[str, str], groups: SPGroups, n_img: int):
        self.groups, self.joint_order, self.n_img = groups, joint_order, n_img
        self.unit: Optional[Unit] = None
        self.segments: dict[str, list[Segment]] = {}
        # Per ring rank: the gathered positions that are real tokens, and their global token ids.
        self.keep: list[torch.Tensor] = []
        self.gathered_index: list[torch.Tensor] = []
        self.buffers: dict[tuple[torch.nn.Module, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def set_unit(self, unit: Unit, txt_len: int, has_text: bool) -> None:
        """Describe the local sequence of the unit about to run: its image shard and replicated text."""
        U, R = self.groups.ulysses.size, self.groups.ring.size
        n = len(unit.tokens)
        loc = -(-n // (U * R))
        img = Segment(loc, True, n)
        self.segments = {"image": [img]}
        if has_text:
            txt = Segment(txt_len, False, txt_len)
            self.segments["joint"] = [img if part == "img" else txt for part in self.joint_order]
        # After the all-to-all, ring rank r holds the shards r*U + u of every ulysses rank u, in order.
        # Built once per unit on the tokens' device (the model's), as every attention layer indexes with them.
        pos = torch.arange(U * loc, device=unit.tokens.device)
        self.keep, self.gathered_index = [], []
        for r in range(R):
            in_unit = (r * U + pos // loc) * loc + pos % loc
            keep = pos[in_unit < n]
            self.keep.append(keep)
            self.gathered_index.append(unit.tokens[in_unit[keep]])
        self.unit = unit

    def _cache(self, module: torch.nn.Module):
        def update(ks: torch.Tensor, vs: torch.Tensor):
            slot = (module, self.unit.branch)
            if slot not in self.buffers:
                shape = (ks.shape[0], ks.shape[1], self.n_img, ks.shape[3])
                self.buffers[slot] = (ks.new_zeros(shape), vs.new_zeros(shape))
            kb, vb = self.buffers[slot]
            # Every ring rank keeps the whole buffer: the fresh K/V of the other ring ranks' shards arrive
            # with one all-gather of this patch's K/V (not of the buffer).
            fresh = self.groups.ring.all_gather(torch.stack([ks, vs]), "ring_all_gather")
            for r in range(fresh.shape[0]):
                idx, keep = self.gathered_index[r], self.keep[r]
                kb.index_copy_(2, idx, fresh[r, 0].index_select(2, keep))
                vb.index_copy_(2, idx, fresh[r, 1].index_select(2, keep))
            return kb, vb
        return update

    def attend(self, module: torch.nn.Module, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: Optional[float]) -> torch.Tensor:
        """The route of every attention layer of the stage (see AttentionRouter)."""
        if kind == "cross":  # image queries against replicated text: nothing to exchange or buffer
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return usp_attention(q, k, v, self.segments[kind], self.groups, scale, kv_cache=self._cache(module))


@dataclass
class PatchDriver:
    """One patch's sampler, advanced one model evaluation at a time."""

    sampler: Sampler
    x: torch.Tensor
    sigmas: torch.Tensor
    step: int = 0
    gen: object = None
    request: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    finished_steps: list[int] = field(default_factory=list)
    inpaint: Optional[Inpaint] = None  # this patch's rows of the noise_mask

    def start(self) -> None:
        self.gen = self.sampler.step_gen(self.step, self.x, self.sigmas)
        if self.inpaint is not None:
            self.gen = self.inpaint.steps(self.gen)
        self.request = next(self.gen)

    def feed(self, denoised: torch.Tensor) -> None:
        try:
            self.request = self.gen.send(denoised)
        except StopIteration as done:
            self.x = done.value
            self.finished_steps.append(self.step)
            self.step += 1
            if self.step < len(self.sigmas) - 1:
                self.start()


def pipefusion_rounds(sampler: str, ms: ModelSampling, sigmas: torch.Tensor) -> list[tuple[int, torch.Tensor, bool]]:
    """Every model evaluation in order: (step, sigma, last evaluation of the step)."""
    probe = Sampler(sampler, ms, 0)
    out = []
    for i in range(len(sigmas) - 1):
        sig = probe.eval_sigmas(i, sigmas)
        out += [(i, s, k == len(sig) - 1) for k, s in enumerate(sig)]
    return out


class PipeFusionRunner:
    """One rank's share of a PipeFusion run (stage, ulysses shard, CFG branch)."""

    def __init__(self, adapter: ModelAdapter, ctx: RankContext):
        config = ctx.mesh.config
        self.adapter, self.ctx = adapter, ctx
        self.P = config.pipefusion_parallel_degree
        self.stage = ctx.mesh.coords["pipefusion"]
        blocks = adapter.blocks()
        self.stage_ranges = balance_stages([module_bytes(b) for b, _ in blocks], self.P)
        mine = self.stage_ranges[self.stage]
        # Free the blocks of the other stages: their parameters become meta tensors.
        for i, (block, _) in enumerate(blocks):
            if i not in mine:
                block.to("meta")
        self.blocks = [blocks[i] for i in mine]
        self.pp: Comm = ctx.comm("pipefusion")
        self.sp_comm: Comm = ctx.comm("sp")
        self.groups = SPGroups(ctx.comm("ulysses"), ctx.comm("ring"),
                               select_lse_kernel(ctx.device, ctx.attention_backend, adapter.dtype))
        self.cfg_comm: Optional[Comm] = ctx.comm("cfg") if config.cfg_degree > 1 else None
        self.effective_patches = 0
        self._channels: dict[tuple[int, int], P2PChannel] = {}

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.P - 1

    # -- point to point between stages -------------------------------------------------------
    def _channel(self, src: int, dst: int) -> P2PChannel:
        """The hand-offs from stage `src` to stage `dst`: a communicator per direction (Mesh.edge_group).

        NCCL pairs a communicator's messages between two ranks in issue order, both directions together, and
        a send waits for its receive: on one communicator, at 2 stages, stage 0's forward sends and the last
        stage's next-input sends would wait on each other. Per direction, each channel carries one stream
        of messages that both sides issue in the same order (rounds, then units or patches).
        """
        if (src, dst) not in self._channels:
            a, b = self.pp.members[src], self.pp.members[dst]
            self._channels[(src, dst)] = self.ctx.p2p(f"pipefusion {a}->{b}", self.ctx.mesh.edge_group(a, b), [a, b])
        return self._channels[(src, dst)]

    def _send(self, x: torch.Tensor, to_stage: int, rnd: int, tag: int) -> tuple:
        """Start a send; returns (round, work, tensor): the tensor must live until the work completes."""
        x = x.contiguous()
        self.ctx.counter.add("pipefusion_p2p", x.numel() * x.element_size())
        return rnd, self._channel(self.stage, to_stage).isend(x, self.pp.members[to_stage], tag), x

    @staticmethod
    def _wait_sends(sends: list, before_round: Optional[int] = None) -> list:
        """Wait for the sends that belong to rounds before `before_round` (all if None); return the rest."""
        rest = []
        for entry in sends:
            rnd, work, _ = entry
            if before_round is not None and rnd >= before_round:
                rest.append(entry)
            else:
                work.wait()
        return rest

    def _recv(self, shape, dtype, from_stage: int, tag: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.ctx.device)
        self._channel(from_stage, self.stage).irecv(buf, self.pp.members[from_stage], tag).wait()
        return buf

    # -- the run -----------------------------------------------------------------------------
    def run(self, request: SampleRequest, ms: ModelSampling, x: torch.Tensor,
            step_done: Callable[[int, int], None], inpaint: Optional[Inpaint] = None,
            preview: Optional[StepPreview] = None) -> torch.Tensor:
        """The whole denoising loop from x (noise-scaled), each patch's evaluations through its rows of
        `inpaint` when there is a noise_mask; returns the final x on every rank of the stage 0. The last
        stage assembles each step's first prediction in `preview`, patch by patch."""
        self.preview = preview
        a, config = self.adapter, self.ctx.mesh.config
        b, c, h, w = x.shape
        per_row = w // 2  # every family here patches the latent 2x2
        rows = patch_rows(h, config.num_pipeline_patch or self.P, 2)
        self.effective_patches = len(rows)
        if config.num_pipeline_patch and len(rows) != config.num_pipeline_patch:
            log.warning("num_pipeline_patch %d does not fit %d latent rows; using %d patches",
                        config.num_pipeline_patch, h, len(rows))
        n_img = (h // 2) * per_row
        units_pipe = [(r, torch.arange(r[0] // 2 * per_row, r[1] // 2 * per_row, device=x.device)) for r in rows]
        unit_full = ((0, h), torch.arange(n_img, device=x.device))
        branches = self._branches(request)
        sigmas = request.sigmas.to(x.device)
        rounds = pipefusion_rounds(request.sampler, ms, sigmas)
        warm_rounds = sum(1 for i, _, _ in rounds if i < config.warmup_steps)
        noise = make_noise(request.sampler, request.seed, x, sigmas)  # the whole latent's, shared by the patches
        drivers = []
        for r0, r1 in rows:
            sampler = Sampler(request.sampler, ms, request.seed, noise=noise.rows(r0, r1))
            drivers.append(PatchDriver(sampler, x[:, :, r0:r1], sigmas))
        for d, (r0, r1) in zip(drivers, rows):
            d.inpaint = None if inpaint is None else inpaint.rows(r0, r1)
            d.start()
        self._check_schedule(rounds, rows, x, request)
        x_eval = torch.cat([d.request[0] for d in drivers], dim=2)  # stage 0's latest input for every patch
        attention = PipeFusionKV(a.JOINT_ORDER, self.groups, n_img)
        kinds = a.attention_kinds()
        mine = {id(m) for block, _ in self.blocks for m in block.modules()}
        router = AttentionRouter(a.model, kinds, attention.attend, run=[m for m in kinds if id(m) in mine])
        # Sends in flight, as (round, work, tensor). Forward hand-offs are received within their round;
        # the last stage's "next input" sends are received by stage 0 at the start of the next round, so
        # a step boundary waits only for sends of earlier rounds (waiting for the current ones could
        # deadlock against a collective that stage 0 enters first).
        sends: list = []
        try:
            for rnd, (step, sigma, step_end) in enumerate(rounds):
                sync = rnd < warm_rounds
                units = [unit_full] if sync else units_pipe
                for u, (unit_rows, tokens) in enumerate(units):
                    if self.first and rnd > 0 and self.P > 1:
                        for m, (r0, r1) in enumerate(rows):  # the patches this unit covers, from the last stage
                            if r0 >= unit_rows[0] and r1 <= unit_rows[1]:
                                x_eval[:, :, r0:r1] = self._recv((b, c, r1 - r0, w), x.dtype, self.P - 1,
                                                                 tag=self._tag(rnd, m, 99))
                    outs = []
                    for k, (branch_id, cond) in enumerate(branches):
                        unit = Unit(unit_rows, tokens, branch_id)
                        outs.append(self._forward_unit(unit, x_eval, ms, sigma, cond, request, attention, router,
                                                       rnd, u, k, sends))
                    if self.last:
                        first_of_step = rnd == 0 or rounds[rnd - 1][0] != step
                        self._finish_unit(unit_rows, outs, drivers, rows, x_eval, ms, sigma, request, rnd,
                                          rnd + 1 < len(rounds), sends, step if first_of_step else None)
                if step_end:
                    sends = self._wait_sends(sends, before_round=rnd + 1)
                    try:
                        step_done(step + 1, len(sigmas) - 1)
                    except XDiTCancelled:
                        # Every rank stops here. Stage 0 takes the next inputs the last stage already sent.
                        if self.first and rnd + 1 < len(rounds) and self.P > 1:
                            for m, (r0, r1) in enumerate(rows):
                                self._recv((b, c, r1 - r0, w), x.dtype, self.P - 1, tag=self._tag(rnd + 1, m, 99))
                        raise
        finally:
            self._wait_sends(sends)
        return self._final(drivers, x)

    def _check_schedule(self, rounds, rows, x, request: SampleRequest) -> None:
        """All stages must run the same schedule, or their hand-offs would wait forever: compare first."""
        sig = torch.tensor([len(rounds), len(rows), float(sum(float(s) for _, s, _ in rounds)), x.numel(),
                            request.positive.text.shape[1], 0 if request.negative is None else 1],
                           dtype=torch.float64, device=x.device)
        seen = self.pp.all_gather(sig, "control").cpu()
        if not all(torch.equal(seen[0], row) for row in seen):
            raise XDiTWorkerError(
                "PipeFusion stages disagree on the schedule (evaluations, patches, sigma sum, latent size, text "
                f"length, branches): {[[round(v, 4) for v in row.tolist()] for row in seen]}")

    def _branches(self, request: SampleRequest):
        """(branch id, conditioning) this rank's pipeline evaluates: 0 = negative, 1 = positive."""
        if request.negative is None:
            return [(1, request.positive)]
        if self.cfg_comm is not None:
            return [(0, request.negative)] if self.cfg_comm.index == 0 else [(1, request.positive)]
        return [(0, request.negative), (1, request.positive)]

    @staticmethod
    def _tag(rnd: int, unit: int, branch: int) -> int:
        return (rnd * 1000 + unit) * 100 + branch

    def _forward_unit(self, unit: Unit, x_eval, ms, sigma, cond, request, attention, router, rnd, u, k, sends):
        """This stage's blocks on one unit; returns the model output of the unit on the last stage."""
        a = self.adapter
        S, idx = self.sp_comm.size, self.sp_comm.index
        dtype = a.dtype
        timestep = ms.timestep(sigma.reshape(1).cpu()).float().to(x_eval.device).expand(x_eval.shape[0])
        full = a.embed(ms.calculate_input(sigma, x_eval).to(dtype), timestep, cond, cond.guidance)
        tokens = unit.tokens

        def shard_img(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
            return shard_padded(t.index_select(dim, tokens), dim, idx, S)

        def keep_txt(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
            return t

        extras = a.shard_extras(full, keep_txt, shard_img)
        n_txt = full.txt.shape[1] if full.txt is not None else 0
        loc = -(-len(tokens) // S)
        joint = a.TEXT_IS_JOINT and full.txt is not None
        if self.first:
            local = full.with_(img=shard_img(full.img), extras=extras)
        else:
            width = full.img.shape[-1]
            recv = self._recv((full.img.shape[0], loc + (n_txt if joint else 0), width), dtype, self.stage - 1,
                              tag=self._tag(rnd, u, k))
            local = full.with_(img=recv[:, :loc], txt=recv[:, loc:] if joint else full.txt, extras=extras)
        attention.set_unit(unit, n_txt, joint)
        with router:
            for block, run in self.blocks:
                local = run(block, local)
        if not self.last:
            payload = torch.cat([local.img, local.txt], dim=1) if joint else local.img
            sends.append(self._send(payload, self.stage + 1, rnd, self._tag(rnd, u, k)))
            return None
        gathered = self.sp_comm.all_gather(local.img, "sp_gather")
        img = gathered.permute(1, 0, 2, 3).reshape(local.img.shape[0], -1, local.img.shape[-1])[:, :len(tokens)]
        r0, r1 = unit.rows
        out = a.head(Tokens(img, None, r1 - r0, x_eval.shape[-1], full.extras)).float()
        return ms.calculate_denoised(sigma, out, x_eval[:, :, r0:r1])

    def _finish_unit(self, unit_rows, outs, drivers, rows, x_eval, ms, sigma, request, rnd, more, sends,
                     preview_step):
        """Last stage: CFG for the unit, the sampler step of each patch it covers, inputs back to stage 0."""
        if self.cfg_comm is not None:
            uncond, cond = self.cfg_comm.all_gather(outs[0], "cfg_gather").unbind(0)
        elif len(outs) == 2:
            uncond, cond = outs
        else:
            uncond, cond = None, outs[0]
        denoised = cond if uncond is None else uncond + (cond - uncond) * request.cfg
        if rnd == 0:
            check_first_prediction(denoised, 1, request.steps, dist.get_rank())
        keep_preview = self.preview is not None and preview_step is not None
        if keep_preview and self.preview.step != preview_step:  # a fresh buffer per step: the last may be in transit
            self.preview.latest, self.preview.step = torch.empty_like(x_eval), preview_step
        for m, (r0, r1) in enumerate(rows):
            if r0 < unit_rows[0] or r1 > unit_rows[1]:
                continue
            d = drivers[m]
            if not torch.equal(d.request[1], sigma):
                raise XDiTWorkerError(f"PipeFusion schedule mismatch: patch {m} expects sigma "
                                      f"{float(d.request[1]):.6f}, the pipeline delivered {float(sigma):.6f}")
            piece = denoised[:, :, r0 - unit_rows[0]:r1 - unit_rows[0]]
            if keep_preview:  # what the sampler is fed: through the patch's noise_mask, as the serial path shows
                self.preview.latest[:, :, r0:r1] = piece if d.inpaint is None else d.inpaint.prediction(piece)
            d.feed(piece)
            if more:
                nxt = d.request[0]
                x_eval[:, :, r0:r1] = nxt
                if self.P > 1:
                    sends.append(self._send(nxt, 0, rnd + 1, self._tag(rnd + 1, m, 99)))

    def _final(self, drivers, x) -> torch.Tensor:
        """The final latent on every rank: the last stage's patches, broadcast over the pipeline group."""
        out = torch.cat([d.x for d in drivers], dim=2) if self.last else torch.empty_like(x)
        if self.P > 1:
            dist.broadcast(out, self.pp.members[-1], group=self.pp.group)
            if self.last:
                self.ctx.counter.add("pipefusion_p2p", out.numel() * out.element_size() * (self.P - 1))
        return out
