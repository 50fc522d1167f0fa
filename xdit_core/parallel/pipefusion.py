"""PipeFusion: the blocks split into stages (balanced by compute), the latent into M horizontal patches that
flow through them.

Every attention layer of a stage keeps full-length image K/V buffers (per CFG branch). A patch writes
its fresh K/V into its slice and attends over the whole buffer: fresh for the patches already done at
this evaluation, one evaluation stale for the rest. The first `warmup_steps` steps run synchronously on
the whole image (exact, and they fill the buffers). Then patches go stage to stage point to point; the
last stage runs the head, CFG and the sampler step per patch and sends the patch's next input back to
the first stage. Ulysses and Ring may run inside each stage: the buffers then live in the
post-all-to-all layout (this rank's heads, every image token), and the ring ranks exchange only the
current patch's fresh K/V; joint text is replicated within a stage.

Work that does not grow with M: stage 0 embeds each patch's own rows only (`embed_image`). Joint text (Flux, SD3) travels
with the first patch of every evaluation only; the other patches attend over the text K/V that patch left in
each layer (fresh for this evaluation, computed against partly stale image K/V, like the image's). A family whose
attention cannot run without text tokens (Qwen-Image: TEXT_EVERY_UNIT) sends its text with every patch instead,
each refreshing the text's K/V. State a block leaves for a later one (HunyuanDiT's long skips:
ModelAdapter.carried) travels in the hand-off after the patch's tokens, fresh like the hidden states.
Reference-image tokens (and Z-Image's image pad tokens) travel with the first patch and stay in the buffers after
the image's. With
`warmup_steps = steps` every evaluation is one whole-image unit with its text: exact.

One pipeline for the whole run: no rank waits for another at a step boundary, so step t+1's first patch
enters while step t drains. Each rank reports its steps as it finishes them (the last stage's are the
progress the host sees). A cancel travels in-band: at each step boundary stage 0's ranks agree on rank 0's
stop flag (a one-element broadcast in their stage group), and the first hand-off of that step carries it
(the last element of every forward hand-off) to the next stages, which pass it on and stop. So every rank
stops before the same step, stage 0 having taken the inputs the last stage already sent back.
"""
from __future__ import annotations

import contextlib
import logging
import time
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
from xdit_core.parallel.routing import AttentionRouter, local_router
from xdit_core.sampling.finite import check_first_prediction
from xdit_core.sampling.request import SampleRequest
from xdit_core.sampling.inpaint import Inpaint
from xdit_core.sampling.preview import StepPreview
from xdit_core.sampling.samplers import ModelSampling, Sampler, make_noise
from xdit_core.parallel.sequence_parallel import check_declared_mask, shard_padded
from xdit_core.parallel.stages import patch_rows, split_stages

log = logging.getLogger("xdit")


@dataclass
class Unit:
    """A piece of work flowing through the stages: some image tokens of one CFG branch."""

    rows: tuple[int, int]  # latent rows
    tokens: torch.Tensor  # global image token indices, in order: a contiguous run, then any reference tokens
    branch: int
    start: int  # the first of `tokens`, on the host
    n_ref: int = 0  # reference-image tokens at the end of `tokens` (the first unit of an evaluation carries them)


class PipeFusionKV:
    """The stage's attention: per-layer K/V buffers that patches refresh and attend over (module docstring)."""

    def __init__(self, joint_order: tuple[str, str], groups: SPGroups):
        self.groups, self.joint_order = groups, joint_order
        self.n_img = 0  # image tokens of the unit's branch, its reference tokens included: the buffer's image part
        self.txt_masks: dict[int, Optional[torch.Tensor]] = {}  # per branch: its text's key mask (Tokens.txt_mask)
        self.unit: Optional[Unit] = None
        self.segments: dict[str, list[Segment]] = {}
        # Per ring rank: the gathered positions that are real tokens, and their global token ids.
        self.keep: list[torch.Tensor] = []
        self.gathered_index: list[torch.Tensor] = []
        self.buffers: dict[tuple[torch.nn.Module, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def set_unit(self, unit: Unit, n_img: int, txt_len: int, has_text: bool,
                 txt_mask: Optional[torch.Tensor] = None) -> None:
        """Describe the local sequence of the unit about to run: its image shard (of the `n_img` tokens of its
        branch) and, when it carries the joint text, the replicated text and its key mask (a unit without it
        attends over the text K/V kept in the buffers)."""
        self.n_img = n_img
        if has_text:
            self.txt_masks[unit.branch] = txt_mask
        U, R = self.groups.ulysses.size, self.groups.ring.size
        n = len(unit.tokens)
        loc = -(-n // (U * R))
        img = Segment(loc, True, n)
        self.segments = {"image": [img], "joint": [img]}
        if has_text:
            txt = Segment(txt_len, False, txt_len, txt_mask)
            self.segments["joint"] = [img if part == "img" else txt for part in self.joint_order]
        # After the all-to-all, ring rank r holds the shards r*U + u of every ulysses rank u, in order (without
        # Ring: the unit's tokens in order, then padding, which `_cache` writes as a slice).
        # Built once per unit on the tokens' device (the model's), as every attention layer indexes with them.
        pos = torch.arange(U * loc, device=unit.tokens.device)
        self.keep, self.gathered_index = [], []
        for r in range(R if R > 1 else 0):
            in_unit = (r * U + pos // loc) * loc + pos % loc
            keep = pos[in_unit < n]
            self.keep.append(keep)
            self.gathered_index.append(unit.tokens[in_unit[keep]])
        self.unit = unit

    def _cache(self, module: torch.nn.Module):
        def update(ks: torch.Tensor, vs: torch.Tensor, text: Optional[tuple[torch.Tensor, torch.Tensor]]):
            slot = (module, self.unit.branch)
            if slot not in self.buffers:  # the first call of a layer carries its text, if it has any
                n_txt = 0 if text is None else text[0].shape[2]
                shape = (ks.shape[0], ks.shape[1], self.n_img + n_txt, ks.shape[3])
                self.buffers[slot] = (ks.new_zeros(shape), vs.new_zeros(shape))
            kb, vb = self.buffers[slot]
            if text is not None:  # the joint text's K/V, after the image's: kept for the units without text
                kb[:, :, self.n_img:] = text[0]
                vb[:, :, self.n_img:] = text[1]
            n, start = len(self.unit.tokens), self.unit.start
            if self.groups.ring.size == 1:  # this rank's shards hold the unit's tokens in order, padding last
                if self.unit.n_ref:  # its rows, then the reference tokens at the end of the image's part
                    kb.index_copy_(2, self.unit.tokens, ks[:, :, :n])
                    vb.index_copy_(2, self.unit.tokens, vs[:, :, :n])
                else:
                    kb[:, :, start:start + n] = ks[:, :, :n]
                    vb[:, :, start:start + n] = vs[:, :, :n]
                return kb, vb, self._validity(kb)
            # Every ring rank keeps the whole buffer: the fresh K/V of the other ring ranks' shards arrive
            # with one all-gather of this patch's K/V (not of the buffer).
            fresh = self.groups.ring.all_gather(torch.stack([ks, vs]), "ring_all_gather")
            for r in range(fresh.shape[0]):
                idx, keep = self.gathered_index[r], self.keep[r]
                kb.index_copy_(2, idx, fresh[r, 0].index_select(2, keep))
                vb.index_copy_(2, idx, fresh[r, 1].index_select(2, keep))
            return kb, vb, self._validity(kb)
        return update

    def _validity(self, kb: torch.Tensor) -> Optional[torch.Tensor]:
        """The buffer's keys that are real (attention._key_validity): every image token; the text per its mask."""
        mask = self.txt_masks.get(self.unit.branch)
        if mask is None or kb.shape[2] == self.n_img:
            return None
        return torch.cat([torch.ones(mask.shape[0], self.n_img, dtype=torch.bool), mask], dim=1)

    def attend(self, module: torch.nn.Module, kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: Optional[float], mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The route of every attention layer of the stage (see AttentionRouter)."""
        if kind == "cross":  # image queries against replicated text: nothing to exchange or buffer
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
        check_declared_mask(module, mask, self.txt_masks.get(self.unit.branch) is not None)
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


class _Stop(Exception):
    """A hand-off carried the cancel flag: pass `payload` on (it is the next stage's first hand-off) and stop."""

    def __init__(self, payload: torch.Tensor):
        super().__init__("cancel flag")
        self.payload = payload


class PipeFusionRunner:
    """One rank's share of a PipeFusion run (stage, ulysses shard, CFG branch)."""

    def __init__(self, adapter: ModelAdapter, ctx: RankContext, stage_ranges: Optional[list[range]] = None):
        """`stage_ranges`: the split the ranks loaded (default: by compute, as split_stages makes it)."""
        config = ctx.mesh.config
        self.adapter, self.ctx = adapter, ctx
        self.P = config.pipefusion_parallel_degree
        self.stage = ctx.mesh.coords["pipefusion"]
        blocks = adapter.blocks()
        self.split = split_stages(dict(adapter.model.config), adapter.spec, self.P, stage_ranges)
        mine = self.split.ranges[self.stage]
        # Free the blocks of the other stages: their parameters become meta tensors.
        for i, (block, _) in enumerate(blocks):
            if i not in mine:
                block.to("meta")
        self.blocks = [blocks[i] for i in mine]
        self.pp: Comm = ctx.comm("pipefusion")
        self.sp_comm: Comm = ctx.comm("sp")
        self.stage_comm: Optional[Comm] = ctx.comm("stage") if ctx.mesh.size("stage") > 1 else None
        self.groups = SPGroups(ctx.comm("ulysses"), ctx.comm("ring"),
                               select_lse_kernel(ctx.device, ctx.attention_backend, adapter.dtype))
        self.cfg_comm: Optional[Comm] = ctx.comm("cfg") if config.cfg_degree > 1 else None
        self.effective_patches = 0
        self._embed_router = local_router(adapter.model, adapter.attention_kinds())
        self.wait_s = 0.0  # time blocked on hand-offs: this stage's share of the pipeline's bubble
        self._channels: dict[tuple[int, int], P2PChannel] = {}
        # What the first hand-off of a round carries beside the image tokens, known after the first embedding: the
        # hidden size, and the joint text tokens (0 without joint text).
        self._width = self._joint_txt = 0

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

    def _wait_sends(self, sends: list, before_round: Optional[int] = None) -> list:
        """Wait for the sends that belong to rounds before `before_round` (all if None); return the rest."""
        rest = []
        t0 = time.perf_counter()
        for entry in sends:
            rnd, work, _ = entry
            if before_round is not None and rnd >= before_round:
                rest.append(entry)
            else:
                work.wait()
        self.wait_s += time.perf_counter() - t0
        return rest

    def _recv(self, shape, dtype, from_stage: int, tag: int) -> torch.Tensor:
        buf = torch.empty(shape, dtype=dtype, device=self.ctx.device)
        t0 = time.perf_counter()
        self._channel(from_stage, self.stage).irecv(buf, self.pp.members[from_stage], tag).wait()
        self.wait_s += time.perf_counter() - t0
        return buf

    def _send_forward(self, tokens: torch.Tensor, rnd: int, tag: int, sends: list, stop: bool = False) -> None:
        """A hand-off to the next stage: the tokens, flattened, then the cancel flag."""
        flag = torch.full((1,), 1.0 if stop else 0.0, dtype=tokens.dtype, device=tokens.device)
        sends.append(self._send(torch.cat([tokens.reshape(-1), flag]), self.stage + 1, rnd, tag))

    def _stop_agreed(self, should_stop: Optional[Callable[[], bool]]) -> bool:
        """Stage 0: rank 0's stop flag, agreed by every rank of the stage (they hand off to their own peers)."""
        stop = should_stop is not None and should_stop()
        if self.stage_comm is None:
            return stop  # no device round trip
        flag = self.stage_comm.broadcast(torch.tensor([1.0 if stop else 0.0], device=self.ctx.device), "control")
        return bool(flag.item())

    # -- the run -----------------------------------------------------------------------------
    def run(self, request: SampleRequest, ms: ModelSampling, x: torch.Tensor,
            step_done: Callable[[int, int], None], inpaint: Optional[Inpaint] = None,
            preview: Optional[StepPreview] = None, should_stop: Optional[Callable[[], bool]] = None) -> torch.Tensor:
        """The whole denoising loop from x (noise-scaled), each patch's evaluations through its rows of
        `inpaint` when there is a noise_mask; returns the final x on every rank. The last stage assembles each
        step's first prediction in `preview`, patch by patch. `step_done` is called when this rank has finished a
        step; `should_stop` (read on rank 0; every rank passes one, or none) cancels at a step boundary."""
        self.preview = preview
        a, config = self.adapter, self.ctx.mesh.config
        b, c, h, w = x.shape
        p = a.spec.patch_size  # latent rows and columns per token
        per_row = w // p
        rows = patch_rows(h, config.num_pipeline_patch or self.P, p)
        self.effective_patches = len(rows)
        if config.num_pipeline_patch and len(rows) != config.num_pipeline_patch:
            log.warning("num_pipeline_patch %d does not fit %d latent rows; using %d patches",
                        config.num_pipeline_patch, h, len(rows))
        n_img = (h // p) * per_row
        units_pipe = [(r, torch.arange(r[0] // p * per_row, r[1] // p * per_row, device=x.device), r[0] // p * per_row)
                      for r in rows]
        unit_full = ((0, h), torch.arange(n_img, device=x.device), 0)
        branches = self._branches(request)
        sigmas = request.sigmas.to(x.device)
        steps = len(sigmas) - 1
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
        attention = PipeFusionKV(a.JOINT_ORDER, self.groups)
        # Reference tokens per branch: after the image's in the buffers, carried by an evaluation's first unit.
        self._refs = {bid: a.reference_tokens(cond, h, w) for bid, cond in branches}
        self._n_noise = n_img
        kinds = a.attention_kinds()
        mine = {id(m) for block, _ in self.blocks for m in block.modules()}
        router = AttentionRouter(a.model, kinds, attention.attend, run=[m for m in kinds if id(m) in mine])
        # Sends in flight, as (round, work, tensor). Forward hand-offs are received within their round;
        # the last stage's "next input" sends are received by stage 0 in the next round, so a step boundary
        # waits only for sends of earlier rounds (the current ones complete as stage 0 takes them).
        sends: list = []
        self.wait_s, started = 0.0, time.perf_counter()
        self._cancellable = should_stop is not None
        try:
            for rnd, (step, sigma, step_end) in enumerate(rounds):
                units = [unit_full] if rnd < warm_rounds else units_pipe
                step_start = rnd == 0 or rounds[rnd - 1][0] != step
                if self.first and step_start and step > 0 and self._stop_agreed(should_stop):
                    self._stop_pipeline(rnd, rows, units[0][1], x, sends)
                    raise XDiTCancelled(f"cancelled after step {step} of {steps}")
                try:
                    self._round(rnd, step, sigma, units, branches, rows, drivers, x_eval, ms, request, attention,
                                router, rounds, sends, step_start)
                except _Stop as stop:  # a later stage: pass the flag on, take nothing more
                    if not self.last:
                        sends.append(self._send(stop.payload, self.stage + 1, rnd, self._tag(rnd, 0, 0)))
                    raise XDiTCancelled(f"cancelled after step {step} of {steps}") from None
                if step_end:
                    sends = self._wait_sends(sends, before_round=rnd + 1)
                    step_done(step + 1, steps)
        finally:
            self._wait_sends(sends)
            self.ctx.pipefusion_stats = self._stats(time.perf_counter() - started, rounds, warm_rounds)
        return self._final(drivers, x)

    def _round(self, rnd, step, sigma, units, branches, rows, drivers, x_eval, ms, request, attention, router,
               rounds, sends, step_start) -> None:
        """One model evaluation of every patch on this stage (one whole-image unit in a warmup round)."""
        b, c, _, w = x_eval.shape
        bases: dict[int, Tokens] = {}  # per branch: this round's conditioning and tables (and stage 0's image)
        for u, (unit_rows, tokens, start) in enumerate(units):
            if self.first and rnd > 0 and self.P > 1:
                for m, (r0, r1) in enumerate(rows):  # the patches this unit covers, from the last stage
                    if r0 >= unit_rows[0] and r1 <= unit_rows[1]:
                        x_eval[:, :, r0:r1] = self._recv((b, c, r1 - r0, w), x_eval.dtype, self.P - 1,
                                                         tag=self._tag(rnd, m, 99))
            outs = []
            for k, (branch_id, cond) in enumerate(branches):
                if k not in bases:
                    bases[k] = self._embed(x_eval, ms, sigma, cond)
                unit = self._unit(unit_rows, tokens, branch_id, start, u == 0)
                # Only a step's first hand-off can carry the cancel flag: read it there alone (a device sync).
                may_stop = self._cancellable and step_start and step > 0 and u == 0 and k == 0
                outs.append(self._forward_unit(unit, bases[k], u == 0, x_eval, ms, sigma, attention, router,
                                               rnd, u, k, sends, may_stop))
            if self.last:
                self._finish_unit(unit_rows, outs, drivers, rows, x_eval, ms, sigma, request, rnd,
                                  rnd + 1 < len(rounds), sends, step if step_start else None)

    def _stop_pipeline(self, rnd: int, rows, tokens: torch.Tensor, x: torch.Tensor, sends: list) -> None:
        """Stage 0 stops before round `rnd`: take the inputs the last stage sent for it, then send the first
        hand-off of the round with the cancel flag set (its tokens unused) so the next stages stop there too."""
        b, c, _, w = x.shape
        if self.P > 1:
            for m, (r0, r1) in enumerate(rows):
                self._recv((b, c, r1 - r0, w), x.dtype, self.P - 1, tag=self._tag(rnd, m, 99))
            first_refs = next(iter(self._refs.values()))  # the first hand-off is the first branch's
            loc = -(-(len(tokens) + first_refs) // self.sp_comm.size)
            carried = self.adapter.carried_after(self.split.ranges[0].stop) * loc
            filler = torch.zeros(b, loc + self._joint_txt + carried, self._width, dtype=self.adapter.dtype,
                                 device=x.device)
            self._send_forward(filler, rnd, self._tag(rnd, 0, 0), sends, stop=True)

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

    def _unit(self, rows, tokens: torch.Tensor, branch: int, start: int, first_unit: bool) -> Unit:
        """A unit of `branch`: the first of an evaluation carries the branch's reference tokens."""
        n_ref = self._refs[branch] if first_unit else 0
        if n_ref:
            tokens = torch.cat([tokens, torch.arange(self._n_noise, self._n_noise + n_ref, device=tokens.device)])
        return Unit(rows, tokens, branch, start, n_ref)

    @staticmethod
    def _tag(rnd: int, unit: int, branch: int) -> int:
        return (rnd * 1000 + unit) * 100 + branch

    def _embed(self, x_eval: torch.Tensor, ms: ModelSampling, sigma: torch.Tensor, cond) -> Tokens:
        """One branch's embedding for a round: conditioning, timestep and per-token tables (and the whole image,
        which stage 0 uses in a warmup round; a pipelined patch embeds its own rows, `embed_image`)."""
        a = self.adapter
        timestep = ms.timestep(sigma.reshape(1).cpu()).float().to(x_eval.device).expand(x_eval.shape[0])
        with self._embed_router or contextlib.nullcontext():
            base = a.embed(ms.calculate_input(sigma, x_eval).to(a.dtype), timestep, cond, cond.guidance)
        self._width = base.img.shape[-1]
        self._joint_txt = base.txt.shape[1] if a.TEXT_IS_JOINT and base.txt is not None else 0
        return base

    def _forward_unit(self, unit: Unit, base: Tokens, first_unit: bool, x_eval, ms, sigma, attention, router, rnd,
                      u, k, sends, may_stop: bool):
        """This stage's blocks on one unit; returns the model output of the unit on the last stage."""
        a = self.adapter
        S, idx = self.sp_comm.size, self.sp_comm.index
        tokens = unit.tokens
        whole = len(tokens) == base.img.shape[1]
        # Joint text rides with the first unit of an evaluation only (the module docstring).
        joint = a.TEXT_IS_JOINT and base.txt is not None
        carries_text = joint and (first_unit or a.TEXT_EVERY_UNIT)

        def shard_img(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
            return shard_padded(t.index_select(dim, tokens), dim, idx, S)

        def keep_txt(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
            return t if carries_text or not joint else t.narrow(dim, 0, 0)

        extras = a.shard_extras(base, keep_txt, shard_img)
        n_txt = base.txt.shape[1] if carries_text else 0
        loc = -(-len(tokens) // S)
        if self.first:
            if whole:
                img = shard_img(base.img)
            else:  # this patch's rows only, from the input the last stage just sent back
                r0, r1 = unit.rows
                xin = ms.calculate_input(sigma, x_eval[:, :, r0:r1]).to(a.dtype)
                img = a.embed_image(xin, r0, x_eval.shape[-2])
                if unit.n_ref:  # the reference tokens, embedded with the round's conditioning
                    img = torch.cat([img, base.img[:, base.img.shape[1] - unit.n_ref:]], dim=1)
                img = shard_padded(img, 1, idx, S)
            local = base.with_(img=img, txt=keep_txt(base.txt) if joint else base.txt, extras=extras)
        else:
            width = base.img.shape[-1]
            carried = a.carried_after(self.split.ranges[self.stage].start)  # state the earlier stages left
            recv = self._recv((base.img.shape[0] * (loc + n_txt + carried * loc) * width + 1,), a.dtype,
                              self.stage - 1, tag=self._tag(rnd, u, k))
            if may_stop and recv[-1].item():
                raise _Stop(recv)
            recv = recv[:-1].reshape(base.img.shape[0], loc + n_txt + carried * loc, width)
            txt = recv[:, loc:loc + n_txt] if joint else base.txt
            local = base.with_(img=recv[:, :loc], txt=txt, extras=extras)
            local = a.with_carried(local, list(recv[:, loc + n_txt:].split(loc, dim=1)) if carried else [])
        attention.set_unit(unit, base.img.shape[1], n_txt, carries_text, base.txt_mask)
        with router:
            for block, run in self.blocks:
                local = run(block, local)
        if not self.last:
            payload = torch.cat([local.img] + ([local.txt] if carries_text else []) + a.carried(local), dim=1)
            self._send_forward(payload, rnd, self._tag(rnd, u, k), sends)
            return None
        gathered = self.sp_comm.all_gather(local.img, "sp_gather")
        img = gathered.permute(1, 0, 2, 3).reshape(local.img.shape[0], -1, local.img.shape[-1])
        img = img[:, :len(tokens) - unit.n_ref]
        r0, r1 = unit.rows
        out = a.head(Tokens(img, None, r1 - r0, x_eval.shape[-1], base.extras)).float()
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

    def _stats(self, run_s: float, rounds, warm_rounds: int) -> dict:
        """This rank's share of the pipeline: its blocks, the split's predicted stage costs and imbalance, and
        the time it spent blocked on hand-offs (its bubble) against the schedule's formula. The host is blocked
        only where the hand-offs are synchronous for it (gloo, CPU); NCCL's waits return at once, so on GPUs the
        measured bubble is not reported (None)."""
        P, M = self.P, self.effective_patches
        on_gpu = self.ctx.device.type == "cuda"
        pipelined = len(rounds) - warm_rounds
        # Idle fraction of a stage if stages were equal and hand-offs free, in patch slots: a warmup round takes
        # M x P slots (the stages one after the other); a pipelined round max(M, P) (with fewer patches than
        # stages a patch's round trip sets the pace); the pipeline fills and drains once per run (P - 1 slots).
        slots_busy = warm_rounds * M + pipelined * M
        slots_total = warm_rounds * M * P + (pipelined * max(M, P) + P - 1 if pipelined else 0)
        return {"stage": self.stage, "blocks": [len(r) for r in self.split.ranges],
                "stage_gflops": [round(c / 1e9, 3) for c in self.split.costs],
                "imbalance": round(self.split.imbalance, 4), "run_s": run_s,
                "wait_s": None if on_gpu else self.wait_s,
                "idle_fraction": None if on_gpu or not run_s else self.wait_s / run_s,
                "idle_fraction_formula": 1 - slots_busy / slots_total if slots_total else 0.0,
                "per_step_drain_formula": (P - 1) / (M + P - 1) if M else 0.0}
