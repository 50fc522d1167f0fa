"""Build the example workflows from one description: UI format in workflows/, API format in workflows/api/.

    python tools/build_workflows.py           # (re)write the files
    python tools/build_workflows.py --check   # exit 1 if the committed files differ from what this builds

Our nodes' signatures come from their INPUT_TYPES; the core ComfyUI nodes used are listed in CORE below.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nodes import NODE_CLASS_MAPPINGS  # noqa: E402

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# Core node signatures (ComfyUI 0.3.64): socket inputs, outputs, widget names, all in slot/widget order.
CORE = {
    "DualCLIPLoader": ([], [("CLIP", "CLIP")], ["clip_name1", "clip_name2", "type", "device"]),
    "TripleCLIPLoader": ([], [("CLIP", "CLIP")], ["clip_name1", "clip_name2", "clip_name3"]),
    "CLIPLoader": ([], [("CLIP", "CLIP")], ["clip_name", "type", "device"]),
    "CLIPTextEncode": ([("clip", "CLIP")], [("CONDITIONING", "CONDITIONING")], ["text"]),
    "FluxGuidance": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")], ["guidance"]),
    "ConditioningZeroOut": ([("conditioning", "CONDITIONING")], [("CONDITIONING", "CONDITIONING")], []),
    "EmptySD3LatentImage": ([], [("LATENT", "LATENT")], ["width", "height", "batch_size"]),
    "EmptyLatentImage": ([], [("LATENT", "LATENT")], ["width", "height", "batch_size"]),
    "VAELoader": ([], [("VAE", "VAE")], ["vae_name"]),
    "VAEDecode": ([("samples", "LATENT"), ("vae", "VAE")], [("IMAGE", "IMAGE")], []),
    "SaveImage": ([("images", "IMAGE")], [], ["filename_prefix"]),
    "ModelSamplingFlux": ([("model", "MODEL")], [("MODEL", "MODEL")], ["max_shift", "base_shift", "width", "height"]),
    "BasicScheduler": ([("model", "MODEL")], [("SIGMAS", "SIGMAS")], ["scheduler", "steps", "denoise"]),
    "KSamplerSelect": ([], [("SAMPLER", "SAMPLER")], ["sampler_name"]),
    "RandomNoise": ([], [("NOISE", "NOISE")], ["noise_seed"]),
    "SamplerCustomAdvanced": ([("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"), ("sigmas", "SIGMAS"),
                               ("latent_image", "LATENT")], [("output", "LATENT"), ("denoised_output", "LATENT")], []),
    # Video (Wan). V3 nodes (io.Schema) list their required inputs, then their optional ones; an unconnected
    # optional socket is still a socket (the frontend shows it, the templates save it with link null).
    "EmptyHunyuanLatentVideo": ([], [("LATENT", "LATENT")], ["width", "height", "length", "batch_size"]),
    "WanImageToVideo": ([("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "VAE"),
                         ("clip_vision_output", "CLIP_VISION_OUTPUT"), ("start_image", "IMAGE")],
                        [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("latent", "LATENT")],
                        ["width", "height", "length", "batch_size"]),
    "Wan22ImageToVideoLatent": ([("vae", "VAE"), ("start_image", "IMAGE")], [("LATENT", "LATENT")],
                                ["width", "height", "length", "batch_size"]),
    "LoadImage": ([], [("IMAGE", "IMAGE"), ("MASK", "MASK")], ["image"]),
    "CreateVideo": ([("images", "IMAGE"), ("audio", "AUDIO")], [("VIDEO", "VIDEO")], ["fps"]),
    "SaveVideo": ([("video", "VIDEO")], [], ["filename_prefix", "format", "codec"]),
    # Qwen-Image-Edit (comfy_extras/nodes_qwen.py, nodes_post_processing.py) and edit models' references
    # (nodes_edit_model.py); V3 nodes: their optional sockets after the required ones.
    "ImageScaleToTotalPixels": ([("image", "IMAGE")], [("IMAGE", "IMAGE")], ["upscale_method", "megapixels"]),
    "VAEEncode": ([("pixels", "IMAGE"), ("vae", "VAE")], [("LATENT", "LATENT")], []),
    "TextEncodeQwenImageEditPlus": ([("clip", "CLIP"), ("vae", "VAE"), ("image1", "IMAGE"), ("image2", "IMAGE"),
                                     ("image3", "IMAGE")], [("CONDITIONING", "CONDITIONING")], ["prompt"]),
    "ReferenceLatent": ([("conditioning", "CONDITIONING"), ("latent", "LATENT")], [("CONDITIONING", "CONDITIONING")],
                        []),
    # Newer than 0.3.64 (FLUX.2 support, comfy_extras/nodes_flux.py): EmptyFlux2LatentImage's io.Schema, width and
    # height 16..MAX_RESOLUTION step 16, a [B, 128, H/16, W/16] latent. tests/test_workflows.py lists what a
    # workflow needs from a newer ComfyUI (NEEDS_NEWER_COMFYUI).
    "EmptyFlux2LatentImage": ([], [("LATENT", "LATENT")], ["width", "height", "batch_size"]),
}
# Widgets the frontend saves with one more value after theirs: control_after_generate (its default here; a node
# may set another) and LoadImage's upload button ("image").
CORE_EXTRA = {"RandomNoise": {"noise_seed": "randomize"}, "LoadImage": {"image": "image"}}
SIZES = {
    "XDiTLoadModel": (360, 130), "XDiTParallelMesh": (360, 320), "XDiTSampler": (320, 334),
    "DualCLIPLoader": (360, 130), "TripleCLIPLoader": (360, 106), "CLIPLoader": (360, 106),
    "CLIPTextEncode": (420, 180), "FluxGuidance": (320, 58), "ConditioningZeroOut": (320, 26),
    "EmptySD3LatentImage": (320, 106), "EmptyLatentImage": (320, 106), "VAELoader": (360, 58),
    "VAEDecode": (210, 46), "SaveImage": (520, 560), "XDiTSamplingModel": (320, 46), "XDiTGuider": (320, 122),
    "XDiTLoRA": (360, 82), "XDiTSamplerAdvanced": (320, 400), "ModelSamplingFlux": (320, 130),
    "BasicScheduler": (320, 106), "KSamplerSelect": (320, 58), "RandomNoise": (320, 82),
    "SamplerCustomAdvanced": (320, 110), "EmptyHunyuanLatentVideo": (320, 130), "WanImageToVideo": (320, 230),
    "Wan22ImageToVideoLatent": (320, 150), "LoadImage": (320, 326), "CreateVideo": (270, 78),
    "SaveVideo": (520, 480), "ImageScaleToTotalPixels": (320, 82), "VAEEncode": (210, 46),
    "TextEncodeQwenImageEditPlus": (420, 200), "ReferenceLatent": (210, 46), "EmptyFlux2LatentImage": (320, 106),
}


def signature(node_type: str):
    """(socket inputs, outputs, widget names, {widget: the extra value the frontend saves after it})."""
    if node_type in CORE:
        sockets, outputs, widgets = CORE[node_type]
        return sockets, outputs, widgets, CORE_EXTRA.get(node_type, {})
    cls = NODE_CLASS_MAPPINGS[node_type]
    spec = cls.INPUT_TYPES()
    sockets, widgets, extra = [], [], {}
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            kind, opts = entry[0], entry[1] if len(entry) > 1 else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                widgets.append(name)
                if opts.get("control_after_generate"):
                    extra[name] = "randomize"
            else:
                sockets.append((name, kind))
    names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
    return sockets, list(zip(names, cls.RETURN_TYPES)), widgets, extra


@dataclass
class Out:
    node: "Node"
    slot: int


@dataclass
class Node:
    id: int
    type: str
    pos: tuple
    values: dict
    title: str | None = None
    color: tuple | None = None
    size: tuple | None = None
    note: str | None = None
    control: str | None = None  # control_after_generate other than "randomize" ("fixed", ...)

    def out(self, name: str) -> Out:
        outputs = signature(self.type)[1]
        return Out(self, [n for n, _ in outputs].index(name))


@dataclass
class Graph:
    nodes: list = field(default_factory=list)

    def add(self, node_type, pos, title=None, color=None, control=None, **values) -> Node:
        node = Node(len(self.nodes) + 1, node_type, pos, values, title, color, control=control)
        self.nodes.append(node)
        return node

    def note(self, pos, size, text) -> Node:
        node = Node(len(self.nodes) + 1, "Note", pos, {}, size=size, note=text)
        self.nodes.append(node)
        return node


POSITIVE, NEGATIVE = ("#232", "#353"), ("#322", "#533")


def ui_format(graph: Graph) -> dict:
    """LiteGraph's workflow JSON (version 0.4), as ComfyUI's frontend saves it."""
    links, inputs, outputs = [], {}, {}
    for node in graph.nodes:
        if node.note is not None:
            continue
        sockets, outs, _, _ = signature(node.type)
        inputs[node.id] = [{"name": n, "type": t, "link": None} for n, t in sockets]
        outputs[node.id] = [{"name": n, "type": t, "links": [], "slot_index": i} for i, (n, t) in enumerate(outs)]
    for node in graph.nodes:
        for slot, (name, kind) in enumerate(signature(node.type)[0] if node.note is None else []):
            src = node.values.get(name)
            if src is None:
                continue
            link_id = len(links) + 1
            links.append([link_id, src.node.id, src.slot, node.id, slot, kind])
            inputs[node.id][slot]["link"] = link_id
            outputs[src.node.id][src.slot]["links"].append(link_id)
    order = topological_order(graph)
    ui_nodes = []
    for node in graph.nodes:
        if node.note is not None:
            ui_nodes.append({"id": node.id, "type": "Note", "pos": list(node.pos), "size": list(node.size),
                             "flags": {}, "order": order[node.id], "mode": 0, "inputs": [], "outputs": [],
                             "properties": {}, "widgets_values": [node.note], "color": "#432", "bgcolor": "#653"})
            continue
        entry = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": list(SIZES[node.type]),
                 "flags": {}, "order": order[node.id], "mode": 0, "inputs": inputs[node.id],
                 "outputs": outputs[node.id], "properties": {"Node name for S&R": node.type},
                 "widgets_values": widget_values(node, ui=True)}
        if node.title:
            entry["title"] = node.title
        if node.color:
            entry["color"], entry["bgcolor"] = node.color
        ui_nodes.append(entry)
    return {"last_node_id": max(n.id for n in graph.nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 0.75, "offset": [480, 80]}},
            "version": 0.4}


def widget_values(node: Node, ui: bool):
    _, _, widgets, extra = signature(node.type)
    sockets = {n for n, _ in signature(node.type)[0]}
    unknown = set(node.values) - set(widgets) - sockets
    missing = set(widgets) - set(node.values)
    assert not unknown and not missing, (node.type, unknown, missing)
    if not ui:
        return {w: node.values[w] for w in widgets}
    values = []
    for w in widgets:
        values.append(node.values[w])
        if w in extra:
            values.append(node.control if node.control and extra[w] == "randomize" else extra[w])
    return values


def api_format(graph: Graph) -> dict:
    """The `POST /prompt` form: {id: {class_type, inputs}}, links as [source id, output slot]."""
    prompt = {}
    for node in graph.nodes:
        if node.note is not None:
            continue
        inputs = {}
        for name, _ in signature(node.type)[0]:
            src = node.values.get(name)
            if src is not None:
                inputs[name] = [str(src.node.id), src.slot]
        inputs.update(widget_values(node, ui=False))
        prompt[str(node.id)] = {"class_type": node.type, "inputs": inputs}
    return prompt


def topological_order(graph: Graph) -> dict:
    """Execution order the frontend stores in `order`: sources first, ties by id."""
    deps = {n.id: {v.node.id for v in n.values.values() if isinstance(v, Out)} for n in graph.nodes}
    order, done = {}, set()
    while len(done) < len(deps):
        ready = min(i for i, d in deps.items() if i not in done and d <= done)
        order[ready] = len(order)
        done.add(ready)
    return order


# ---- the workflows --------------------------------------------------------------------------------------

FLUX_MODEL = "diffusion_models/flux1-dev.safetensors"
SD35_MODEL = "diffusers/stable-diffusion-3.5-large/transformer"
PIXART_MODEL = "diffusers/PixArt-Sigma-XL-2-1024-MS/transformer"
PROMPT = ("a red fox in a snowy birch forest at dawn, soft golden light through the trees, "
          "highly detailed photograph")


def mesh(graph, pos, model, ulysses=1, ring=1, cfg_parallel=False, gpus=0, pipefusion=1, warmup=1):
    return graph.add("XDiTParallelMesh", pos, layout="manual", ulysses_degree=ulysses, ring_degree=ring,
                     pipefusion_parallel_degree=pipefusion, use_cfg_parallel=cfg_parallel, num_pipeline_patch=0,
                     warmup_steps=warmup, gpu_count=gpus, model=model.out("model"), reserve_gpus=0, ray_address="",
                     attention_backend="auto", shard_weights=False)


def sampler(graph, pos, model, mesh_node, positive, negative, latent, steps, cfg, sampler_name, scheduler):
    return graph.add("XDiTSampler", pos, model=model.out("model"), mesh=mesh_node.out("mesh"), positive=positive,
                     negative=negative, latent_image=latent.out("LATENT"), seed=42, steps=steps, cfg=cfg,
                     sampler_name=sampler_name, scheduler=scheduler, denoise=1.0, shift=0.0)


def decode_and_save(graph, latent, vae, prefix):
    decode = graph.add("VAEDecode", (1240, 60), samples=latent.out("LATENT"), vae=vae.out("VAE"))
    graph.add("SaveImage", (1240, 150), images=decode.out("IMAGE"), filename_prefix=prefix)


FLUX_TEXT_AND_VAE = """- text_encoders/clip_l.safetensors and text_encoders/t5xxl_fp16.safetensors (comfyanonymous/flux_text_encoders)
- vae/ae.safetensors (the Flux VAE)
"""


def flux_meshes(shipped: int) -> str:
    """The Flux notes' mesh advice for 2, 4 and 8 GPUs, marking the workflow's own."""
    rows = {2: "ulysses_degree 2", 4: "ulysses_degree 4",
            8: "ulysses_degree 8; across two 4-GPU machines: ulysses 4 x ring 2"}
    lines = [f"- {n} GPUs: {text}" + (" (as set here)" if n == shipped else "") for n, text in rows.items()]
    return "Mesh (xDiT Parallel Mesh, layout manual, gpu_count = GPUs for the workers):\n" + "\n".join(lines) + "\n"


FLUX_NOTE = """xDiT: Flux.1 dev with Ulysses sequence parallelism

Files, under ComfyUI/models/:
- diffusion_models/flux1-dev.safetensors (Flux.1 dev, picked in "xDiT Load Diffusion Model"), or instead the transformer folder of black-forest-labs/FLUX.1-dev (config.json + *.safetensors) as diffusers/FLUX.1-dev/transformer/, picked as diffusers/FLUX.1-dev/transformer
""" + FLUX_TEXT_AND_VAE + "\n" + flux_meshes(shipped=4) + """Flux has 24 attention heads, so ulysses_degree must divide 24; use ring_degree for the rest. Flux runs at cfg 1 (guidance comes from FluxGuidance), so there is no negative branch: keep use_cfg_parallel off. layout auto chooses the same for you. The text encoders and VAE run in ComfyUI itself; the negative input is ignored at cfg 1."""

SD35_NOTE = """xDiT: SD3.5 Large with CFG parallel x PipeFusion

Files, under ComfyUI/models/:
- diffusers/stable-diffusion-3.5-large/transformer/ (the transformer folder of stabilityai/stable-diffusion-3.5-large: config.json + *.safetensors), picked in "xDiT Load Diffusion Model"
- text_encoders/clip_l.safetensors, text_encoders/clip_g.safetensors, text_encoders/t5xxl_fp16.safetensors (the text_encoders of the same repository)
- vae/sd3.5_vae.safetensors (its vae/diffusion_pytorch_model.safetensors, renamed)

Mesh (xDiT Parallel Mesh, layout manual, gpu_count = GPUs for the workers). CFG parallel puts the positive and the negative prompt on two halves of the GPUs (needs cfg != 1); PipeFusion splits the 38 blocks into stages (each GPU holds only its stage's weights) and pipelines patches of the image through them, as xDiT advises for SD3:
- 2 GPUs: use_cfg_parallel, pipefusion_parallel_degree 1
- 4 GPUs: use_cfg_parallel, pipefusion_parallel_degree 2 (as set here)
- 8 GPUs: use_cfg_parallel, pipefusion_parallel_degree 4
PipeFusion is exact for its first warmup_steps steps and then uses one-step-stale attention for patches not yet recomputed (a small, measured difference); set warmup_steps to the step count for an exact result, or use ulysses_degree 2 instead of PipeFusion (SD3.5 Large has 38 heads, so Ulysses can only be 1 or 2; go further with ring_degree). layout auto picks CFG parallel x PipeFusion."""

PIXART_NOTE = """xDiT: PixArt-Sigma with a hybrid mesh (CFG parallel x Ulysses x Ring)

Files, under ComfyUI/models/:
- diffusers/PixArt-Sigma-XL-2-1024-MS/transformer/ (the transformer folder of PixArt-alpha/PixArt-Sigma-XL-2-1024-MS: config.json + *.safetensors), picked in "xDiT Load Diffusion Model"
- text_encoders/t5xxl_fp16.safetensors (T5-XXL; the CLIPLoader's type is pixart)
- vae/sdxl_vae.safetensors (the SDXL VAE, which PixArt-Sigma uses)

Mesh (xDiT Parallel Mesh, layout manual, gpu_count = GPUs for the workers):
- 2 GPUs: use_cfg_parallel, ulysses_degree 1
- 4 GPUs: use_cfg_parallel, ulysses_degree 2
- 8 GPUs: use_cfg_parallel, ulysses_degree 2, ring_degree 2 (as set here); cfg x ulysses 4 also works
PixArt-Sigma has 16 attention heads, so ulysses_degree must divide 16. use_cfg_parallel needs cfg != 1. Width and height must be multiples of 16."""


def loader(g: Graph, pos: tuple[int, int], model_name: str, title: Optional[str] = None) -> Node:
    """xDiT Load Diffusion Model with the defaults every workflow ships (dtype, family and variant detected,
    fp8 kept)."""
    return g.add("XDiTLoadModel", pos, title=title, model_name=model_name, weight_dtype="default", family="auto",
                 variant="auto", fp8_weights="keep")


def flux_loaders(g: Graph) -> tuple[Node, Node, Node, Node]:
    """Flux.1 dev's model, text encoders, VAE and a 1024x1024 empty latent, down the first column."""
    model = loader(g, (0, 60), FLUX_MODEL)
    clip = g.add("DualCLIPLoader", (0, 230), clip_name1="clip_l.safetensors", clip_name2="t5xxl_fp16.safetensors",
                 type="flux", device="default")
    vae = g.add("VAELoader", (0, 400), vae_name="ae.safetensors")
    latent = g.add("EmptySD3LatentImage", (0, 500), width=1024, height=1024, batch_size=1)
    return model, clip, vae, latent


def flux_text(g: Graph, clip: Node) -> tuple[Out, Out]:
    """Flux's positive prompt with FluxGuidance, and the zeroed negative (unused at cfg 1)."""
    text = g.add("CLIPTextEncode", (400, 60), title="Positive prompt", color=POSITIVE, text=PROMPT,
                 clip=clip.out("CLIP"))
    guided = g.add("FluxGuidance", (400, 280), conditioning=text.out("CONDITIONING"), guidance=3.5)
    zero = g.add("ConditioningZeroOut", (400, 380), title="Negative (unused at cfg 1)", color=NEGATIVE,
                 conditioning=text.out("CONDITIONING"))
    return guided.out("CONDITIONING"), zero.out("CONDITIONING")


def flux1_ulysses() -> Graph:
    g = Graph()
    g.note((-460, 60), (420, 620), FLUX_NOTE)
    model, clip, vae, latent = flux_loaders(g)
    positive, negative = flux_text(g, clip)
    m = mesh(g, (400, 450), model, ulysses=4, gpus=4)
    s = sampler(g, (880, 60), model, m, positive, negative, latent, 20, 1.0, "euler", "simple")
    decode_and_save(g, s, vae, "xdit_flux1")
    return g


def sd35_cfg_parallel() -> Graph:
    g = Graph()
    g.note((-460, 60), (420, 620), SD35_NOTE)
    model = loader(g, (0, 60), SD35_MODEL)
    clip = g.add("TripleCLIPLoader", (0, 230), clip_name1="clip_l.safetensors", clip_name2="clip_g.safetensors",
                 clip_name3="t5xxl_fp16.safetensors")
    vae = g.add("VAELoader", (0, 380), vae_name="sd3.5_vae.safetensors")
    latent = g.add("EmptySD3LatentImage", (0, 480), width=1024, height=1024, batch_size=1)
    pos = g.add("CLIPTextEncode", (400, 60), title="Positive prompt", color=POSITIVE, text=PROMPT,
                clip=clip.out("CLIP"))
    neg = g.add("CLIPTextEncode", (400, 280), title="Negative prompt", color=NEGATIVE,
                text="blurry, low quality, watermark, text", clip=clip.out("CLIP"))
    m = mesh(g, (400, 500), model, cfg_parallel=True, gpus=4, pipefusion=2, warmup=2)
    s = sampler(g, (880, 60), model, m, pos.out("CONDITIONING"), neg.out("CONDITIONING"), latent, 28, 4.5,
                "euler", "sgm_uniform")
    decode_and_save(g, s, vae, "xdit_sd35")
    return g


def pixart_sigma_hybrid() -> Graph:
    g = Graph()
    g.note((-460, 60), (420, 620), PIXART_NOTE)
    model = loader(g, (0, 60), PIXART_MODEL)
    clip = g.add("CLIPLoader", (0, 230), clip_name="t5xxl_fp16.safetensors", type="pixart", device="default")
    vae = g.add("VAELoader", (0, 380), vae_name="sdxl_vae.safetensors")
    latent = g.add("EmptyLatentImage", (0, 480), width=1024, height=1024, batch_size=1)
    pos = g.add("CLIPTextEncode", (400, 60), title="Positive prompt", color=POSITIVE, text=PROMPT,
                clip=clip.out("CLIP"))
    neg = g.add("CLIPTextEncode", (400, 280), title="Negative prompt", color=NEGATIVE,
                text="blurry, low quality, watermark, text", clip=clip.out("CLIP"))
    m = mesh(g, (400, 500), model, ulysses=2, ring=2, cfg_parallel=True, gpus=8)
    s = sampler(g, (880, 60), model, m, pos.out("CONDITIONING"), neg.out("CONDITIONING"), latent, 20, 4.5,
                "dpmpp_2m", "normal")
    decode_and_save(g, s, vae, "xdit_pixart_sigma")
    return g


FLUX_GUIDER_NOTE = """xDiT: Flux.1 dev through ComfyUI's own samplers (xDiT Guider + SamplerCustomAdvanced)

ComfyUI's sampler (any of KSamplerSelect's, here dpmpp_2m_sde), scheduler and noise run in ComfyUI; every model evaluation runs on the xDiT workers with Ulysses sequence parallelism. "xDiT Model for ComfyUI Samplers" gives ComfyUI a MODEL without weights (they stay on the workers) for BasicScheduler and ModelSamplingFlux.

Files, under ComfyUI/models/:
- diffusion_models/flux1-dev.safetensors (Flux.1 dev, picked in "xDiT Load Diffusion Model")
""" + FLUX_TEXT_AND_VAE + "\n" + flux_meshes(shipped=4) + """The guider takes Ulysses, Ring and CFG parallel meshes; PipeFusion needs the sampling loop inside the workers, so use the xDiT Sampler nodes for it. Flux runs at cfg 1 (guidance from FluxGuidance)."""

FLUX_LORA_NOTE = """xDiT: Flux.1 dev with two LoRAs (xDiT LoRA, chained)

Each xDiT LoRA node adds a LoRA for the workers: they keep the base weights loaded and apply the LoRAs at run time to the layers each GPU holds, so changing a LoRA or its strength reloads nothing. LoRA files in kohya, ai-toolkit/diffusers (PEFT), OneTrainer, ComfyUI and BFL layouts are read.

Files, under ComfyUI/models/:
- diffusion_models/flux1-dev.safetensors (Flux.1 dev, picked in "xDiT Load Diffusion Model")
- loras/flux_style_lora.safetensors and loras/flux_detail_lora.safetensors (your Flux LoRAs)
""" + FLUX_TEXT_AND_VAE + "\n" + flux_meshes(shipped=2) + """Flux runs at cfg 1 (guidance from FluxGuidance)."""


def flux1_guider_custom_sampler() -> Graph:
    g = Graph()
    g.note((-460, 60), (420, 620), FLUX_GUIDER_NOTE)
    model, clip, vae, latent = flux_loaders(g)
    positive, negative = flux_text(g, clip)
    m = mesh(g, (400, 450), model, ulysses=4, gpus=4)
    weightless = g.add("XDiTSamplingModel", (880, 60), model=model.out("model"))
    shifted = g.add("ModelSamplingFlux", (880, 150), model=weightless.out("MODEL"), max_shift=1.15, base_shift=0.5,
                    width=1024, height=1024)
    guider = g.add("XDiTGuider", (880, 320), model=shifted.out("MODEL"), mesh=m.out("mesh"), positive=positive,
                   negative=negative, cfg=1.0)
    sigmas = g.add("BasicScheduler", (880, 480), model=shifted.out("MODEL"), scheduler="beta", steps=20, denoise=1.0)
    select = g.add("KSamplerSelect", (880, 620), sampler_name="dpmpp_2m_sde")
    noise = g.add("RandomNoise", (880, 710), noise_seed=42)
    s = g.add("SamplerCustomAdvanced", (1240, 60), noise=noise.out("NOISE"), guider=guider.out("GUIDER"),
              sampler=select.out("SAMPLER"), sigmas=sigmas.out("SIGMAS"), latent_image=latent.out("LATENT"))
    decode = g.add("VAEDecode", (1240, 210), samples=s.out("output"), vae=vae.out("VAE"))
    g.add("SaveImage", (1240, 300), images=decode.out("IMAGE"), filename_prefix="xdit_flux1_guider")
    return g


def flux1_lora() -> Graph:
    g = Graph()
    g.note((-460, 60), (420, 620), FLUX_LORA_NOTE)
    model, clip, vae, latent = flux_loaders(g)
    style = g.add("XDiTLoRA", (0, 660), model=model.out("model"), lora_name="flux_style_lora.safetensors",
                  strength_model=0.8)
    detail = g.add("XDiTLoRA", (0, 790), model=style.out("model"), lora_name="flux_detail_lora.safetensors",
                   strength_model=0.5)
    positive, negative = flux_text(g, clip)
    m = mesh(g, (400, 450), detail, ulysses=2, gpus=2)
    s = sampler(g, (880, 60), detail, m, positive, negative, latent, 20, 1.0, "euler", "simple")
    decode_and_save(g, s, vae, "xdit_flux1_lora")
    return g


# ---- Wan 2.1 / 2.2 video: ComfyUI's own templates, with UNETLoader + ModelSamplingSD3 + KSampler(Advanced)
# replaced by our loader, one mesh and our samplers (ModelSamplingSD3's shift in the sampler's `shift`).

WAN_NEGATIVE = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
                "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
                "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")  # ComfyUI's Wan templates' negative prompt
WAN_T2V_PROMPT = "a fox moving quickly in a beautiful winter scenery nature trees mountains daytime tracking camera"
WAN_I2V_PROMPT = ("The white dragon warrior stands still, eyes full of determination and strength. The camera slowly "
                  "moves closer or circles around the warrior, highlighting the powerful presence and heroic spirit "
                  "of the character.")
WAN_TI2V_PROMPT = ("Low contrast. In a retro 1970s-style subway station, a street musician plays in dim colors and "
                   "rough textures. He wears an old jacket, playing guitar with focus. Commuters hurry by, and a small "
                   "crowd gathers to listen. The camera slowly moves right, capturing the blend of music and city "
                   "noise, with old subway signs and mottled walls in the background.")
WAN21_T2V_14B = "diffusion_models/wan2.1_t2v_14B_fp8_scaled.safetensors"
WAN22_I2V_HIGH = "diffusion_models/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors"
WAN22_I2V_LOW = "diffusion_models/wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"
WAN22_TI2V_5B = "diffusion_models/wan2.2_ti2v_5B_fp16.safetensors"
UMT5 = "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
START_IMAGE = "example.png"  # the picture ComfyUI ships in its input folder


def wan_meshes(heads: int, shipped: int) -> str:
    """The Wan notes' mesh advice for 2, 4 and 8 GPUs (CFG parallel x Ulysses, what layout auto picks at
    cfg != 1), marking the workflow's own."""
    valid = ", ".join(str(d) for d in range(1, 9) if heads % d == 0)
    ring = next(d for d in range(3, 9) if heads % d)  # the smallest degree Ulysses cannot take
    rows = {2: ("use_cfg_parallel, ulysses_degree 1", "ulysses_degree 2"),
            4: ("use_cfg_parallel, ulysses_degree 2", "ulysses_degree 4"),
            8: ("use_cfg_parallel, ulysses_degree 4", "ulysses_degree 8")}
    lines = [f"- {n} GPUs: {mesh_}" + (" (as set here)" if n == shipped else "") + f"; without CFG parallel: {alt}"
             for n, (mesh_, alt) in rows.items()]
    return ("Mesh (xDiT Parallel Mesh, layout manual, gpu_count = GPUs for the workers; layout auto picks the same):\n"
            + "\n".join(lines) + "\n"
            f"The model has {heads} attention heads, so ulysses_degree must divide {heads} (up to 8: {valid}); put "
            f"the rest on ring_degree (e.g. {2 * ring} GPUs: use_cfg_parallel, ring_degree {ring}). use_cfg_parallel "
            "runs the positive and the negative prompt on two halves of the GPUs: it doubles the ranks (2 x ulysses "
            "x ring = gpu_count) and needs cfg != 1. PipeFusion does not run video: keep "
            "pipefusion_parallel_degree 1.\n")


WAN_SHARED = ("fp8 files stay fp8 on the workers (the loader's fp8_weights keep): a 14B model takes about 14 GB per "
              "rank. shard_weights on the mesh splits the blocks over the GPUs of the mesh (FSDP; in this version "
              "the shards hold bf16 even from an fp8 file) at the price of gathering each block on every forward; "
              "layout auto turns it on when the memory plan says the model does not fit (docs/memory.md has the "
              "figures). The text encoder and VAE run in ComfyUI itself, which keeps its own GPU out of the mesh "
              "unless the mesh needs every GPU; give it one with reserve_gpus 1 if it runs short of memory.")

WAN21_T2V_NOTE = """xDiT: Wan 2.1 T2V 14B (text to video) with CFG parallel x Ulysses

ComfyUI's Wan 2.1 text-to-video template, with UNETLoader + ModelSamplingSD3 (shift 8) + KSampler replaced by xDiT Load Diffusion Model + xDiT Parallel Mesh + xDiT Sampler (shift 8).

Files, under ComfyUI/models/ (Comfy-Org/Wan_2.1_ComfyUI_repackaged, split_files/):
- diffusion_models/wan2.1_t2v_14B_fp8_scaled.safetensors (picked in "xDiT Load Diffusion Model"; the fp16/bf16 files of the same model load too)
- text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (CLIPLoader type wan)
- vae/wan_2.1_vae.safetensors
- clip_vision/: nothing (text to video takes no CLIP vision)

""" + wan_meshes(40, shipped=4) + """The 1.3B (diffusion_models/wan2.1_t2v_1.3B_fp16.safetensors) runs in the same graph; it has 12 heads (ulysses_degree 1, 2, 3, 4, 6).

Memory: the 14B takes about 28.6 GB of weights per rank in bf16, plus activations (832x480, 81 frames: 32760 tokens, split over ulysses x ring). """ + WAN_SHARED + """ Width and height must be multiples of 16; length 4n+1 frames (16 fps)."""

WAN22_I2V_NOTE = """xDiT: Wan 2.2 I2V A14B (image to video, two experts) with CFG parallel x Ulysses

ComfyUI's Wan 2.2 14B image-to-video template (its 20-step fp8_scaled group), with the two UNETLoader + ModelSamplingSD3 (shift 8) + KSamplerAdvanced chains replaced by two xDiT Load Diffusion Model and two xDiT Sampler (Advanced) nodes (shift 8) on one xDiT Parallel Mesh: the high-noise expert samples steps 0-10 and returns the latent with its leftover noise, the low-noise expert finishes steps 10-20 without adding noise.

Files, under ComfyUI/models/ (Comfy-Org/Wan_2.2_ComfyUI_Repackaged, split_files/; the text encoder from Comfy-Org/Wan_2.1_ComfyUI_repackaged):
- diffusion_models/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors and diffusion_models/wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors (the two experts, each picked in its "xDiT Load Diffusion Model")
- text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (CLIPLoader type wan)
- vae/wan_2.1_vae.safetensors (the 14B experts use the Wan 2.1 VAE)
- clip_vision/: nothing (Wan 2.2 takes no CLIP vision; only Wan 2.1 I2V 14B does: CLIPVisionLoader with clip_vision/clip_vision_h.safetensors -> CLIPVisionEncode -> WanImageToVideo's clip_vision_output)
- the start image: Load Image (an upload lands in ComfyUI/input/; input/example.png is the picture ComfyUI ships there). Describe it in the prompt.

""" + wan_meshes(40, shipped=4) + """Both samplers take the one mesh node: the two experts run on the same workers.

Memory: both experts stay resident on every worker rank, so going from the high- to the low-noise expert loads nothing. """ + WAN_SHARED + """ The pair of fp8 files takes about 27 GB per rank, plus activations (640x640, 81 frames: 33600 tokens, split over ulysses x ring): 32-48 GB GPUs run it unsharded; on 24 GB cards use shard_weights on 8 GPUs, or let one expert be resident at a time (XDIT_RESIDENT_GB below the pair: every switch then reloads the other expert). Width and height must be multiples of 16; length 4n+1 frames (16 fps)."""

WAN22_TI2V_NOTE = """xDiT: Wan 2.2 TI2V 5B (text and image to video) with CFG parallel

ComfyUI's Wan 2.2 5B template with its start image connected, with UNETLoader + ModelSamplingSD3 (shift 8) + KSampler replaced by xDiT Load Diffusion Model + xDiT Parallel Mesh + xDiT Sampler (shift 8). Wan22ImageToVideoLatent encodes the start image into the first latent frame and sets a noise_mask that keeps it; disconnect Load Image from start_image for text to video.

Files, under ComfyUI/models/ (Comfy-Org/Wan_2.2_ComfyUI_Repackaged, split_files/; the text encoder from Comfy-Org/Wan_2.1_ComfyUI_repackaged):
- diffusion_models/wan2.2_ti2v_5B_fp16.safetensors (picked in "xDiT Load Diffusion Model")
- text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors (CLIPLoader type wan)
- vae/wan2.2_vae.safetensors (the 5B's own VAE, 16x downscaling; not wan_2.1_vae)
- clip_vision/: nothing (the 5B takes no CLIP vision)
- the start image: Load Image (an upload lands in ComfyUI/input/; input/example.png is the picture ComfyUI ships there)

""" + wan_meshes(24, shipped=2) + """
Memory: the 5B takes about 10 GB of weights per rank in bf16, plus activations (1280x704, 121 frames: 27280 tokens, split over ulysses x ring). """ + WAN_SHARED + """ Width and height must be multiples of 32; length 4n+1 frames (24 fps)."""


def wan_text(g: Graph, clip: Node, prompt: str) -> tuple[Node, Node]:
    pos = g.add("CLIPTextEncode", (400, 60), title="Positive prompt", color=POSITIVE, text=prompt,
                clip=clip.out("CLIP"))
    neg = g.add("CLIPTextEncode", (400, 280), title="Negative prompt", color=NEGATIVE, text=WAN_NEGATIVE,
                clip=clip.out("CLIP"))
    return pos, neg


def decode_and_save_video(graph, latent: Out, vae, fps, prefix):
    decode = graph.add("VAEDecode", (1240, 60), samples=latent, vae=vae.out("VAE"))
    video = graph.add("CreateVideo", (1240, 150), images=decode.out("IMAGE"), fps=fps)
    graph.add("SaveVideo", (1240, 270), video=video.out("VIDEO"), filename_prefix=prefix, format="auto",
              codec="auto")


def wan21_t2v_14b() -> Graph:
    g = Graph()
    g.note((-460, 60), (420, 760), WAN21_T2V_NOTE)
    model = loader(g, (0, 60), WAN21_T2V_14B)
    clip = g.add("CLIPLoader", (0, 230), clip_name=UMT5, type="wan", device="default")
    vae = g.add("VAELoader", (0, 380), vae_name="wan_2.1_vae.safetensors")
    latent = g.add("EmptyHunyuanLatentVideo", (0, 480), width=832, height=480, length=81, batch_size=1)
    pos, neg = wan_text(g, clip, WAN_T2V_PROMPT)
    m = mesh(g, (400, 500), model, ulysses=2, cfg_parallel=True, gpus=4)
    s = g.add("XDiTSampler", (880, 60), model=model.out("model"), mesh=m.out("mesh"), positive=pos.out("CONDITIONING"),
              negative=neg.out("CONDITIONING"), latent_image=latent.out("LATENT"), seed=42, steps=30, cfg=6.0,
              sampler_name="uni_pc", scheduler="simple", denoise=1.0, shift=8.0)
    decode_and_save_video(g, s.out("LATENT"), vae, 16.0, "video/xdit_wan21_t2v_14b")
    return g


def wan22_i2v_a14b() -> Graph:
    g = Graph()
    g.note((-460, 60), (420, 1030), WAN22_I2V_NOTE)
    high = loader(g, (0, 60), WAN22_I2V_HIGH, title="High-noise expert")
    low = loader(g, (0, 230), WAN22_I2V_LOW, title="Low-noise expert")
    clip = g.add("CLIPLoader", (0, 400), clip_name=UMT5, type="wan", device="default")
    vae = g.add("VAELoader", (0, 550), vae_name="wan_2.1_vae.safetensors")
    image = g.add("LoadImage", (0, 650), title="Start image", image=START_IMAGE)
    pos, neg = wan_text(g, clip, WAN_I2V_PROMPT)
    i2v = g.add("WanImageToVideo", (400, 500), positive=pos.out("CONDITIONING"), negative=neg.out("CONDITIONING"),
                vae=vae.out("VAE"), start_image=image.out("IMAGE"), width=640, height=640, length=81, batch_size=1)
    m = mesh(g, (400, 770), high, ulysses=2, cfg_parallel=True, gpus=4)
    common = dict(mesh=m.out("mesh"), steps=20, cfg=3.5, sampler_name="euler", scheduler="simple",
                  positive=i2v.out("positive"), negative=i2v.out("negative"), shift=8.0)
    first = g.add("XDiTSamplerAdvanced", (880, 60), title="High-noise expert: steps 0-10", model=high.out("model"),
                  add_noise="enable", noise_seed=42, latent_image=i2v.out("latent"), start_at_step=0, end_at_step=10,
                  return_with_leftover_noise="enable", **common)
    second = g.add("XDiTSamplerAdvanced", (880, 500), title="Low-noise expert: steps 10-end", control="fixed",
                   model=low.out("model"), add_noise="disable", noise_seed=0, latent_image=first.out("LATENT"),
                   start_at_step=10, end_at_step=10000, return_with_leftover_noise="disable", **common)
    decode_and_save_video(g, second.out("LATENT"), vae, 16.0, "video/xdit_wan22_i2v_a14b")
    return g


def wan22_ti2v_5b() -> Graph:
    g = Graph()
    g.note((-460, 60), (420, 900), WAN22_TI2V_NOTE)
    model = loader(g, (0, 60), WAN22_TI2V_5B)
    clip = g.add("CLIPLoader", (0, 230), clip_name=UMT5, type="wan", device="default")
    vae = g.add("VAELoader", (0, 380), vae_name="wan2.2_vae.safetensors")
    image = g.add("LoadImage", (0, 480), title="Start image", image=START_IMAGE)
    pos, neg = wan_text(g, clip, WAN_TI2V_PROMPT)
    latent = g.add("Wan22ImageToVideoLatent", (400, 500), vae=vae.out("VAE"), start_image=image.out("IMAGE"),
                   width=1280, height=704, length=121, batch_size=1)
    m = mesh(g, (400, 690), model, cfg_parallel=True, gpus=2)
    s = g.add("XDiTSampler", (880, 60), model=model.out("model"), mesh=m.out("mesh"), positive=pos.out("CONDITIONING"),
              negative=neg.out("CONDITIONING"), latent_image=latent.out("LATENT"), seed=42, steps=20, cfg=5.0,
              sampler_name="uni_pc", scheduler="simple", denoise=1.0, shift=8.0)
    decode_and_save_video(g, s.out("LATENT"), vae, 24.0, "video/xdit_wan22_ti2v_5b")
    return g


# ---- Qwen-Image, Qwen-Image-Edit 2509, Z-Image-Turbo, FLUX.2 dev: ComfyUI's own templates, with the model loader,
# its model sampling node and the sampler replaced by our loader, one mesh and the xDiT Sampler (the model sampling
# node's shift in the sampler's `shift`).

QWEN_IMAGE = "diffusion_models/qwen_image_fp8_e4m3fn.safetensors"
QWEN_EDIT_2509 = "diffusion_models/qwen_image_edit_2509_fp8_e4m3fn.safetensors"
QWEN_TEXT = "qwen_2.5_vl_7b_fp8_scaled.safetensors"
QWEN_VAE = "qwen_image_vae.safetensors"
ZIMAGE_MODEL = "diffusion_models/z_image_turbo_bf16.safetensors"
FLUX2_MODEL = "diffusion_models/flux2_dev_fp8mixed.safetensors"
QWEN_PROMPT = (  # ComfyUI's Qwen-Image template's prompt
    '"A vibrant, warm neon-lit street scene in Hong Kong at the afternoon, with a mix of colorful Chinese and English '
    'signs glowing brightly. The atmosphere is lively, cinematic, and rain-washed with reflections on the pavement. '
    'The colors are vivid, full of pink, blue, red, and green hues. Crowded buildings with overlapping neon signs. '
    '1980s Hong Kong style. Signs include:\n"龍鳳冰室" "金華燒臘" "HAPPY HAIR" "鴻運茶餐廳" "EASY BAR" "永發魚蛋粉" '
    '"添記粥麵" "SUNSHINE MOTEL" "美都餐室" "富記糖水" "太平館" "雅芳髮型屋" "STAR KTV" "銀河娛樂城" "百樂門舞廳" '
    '"BUBBLE CAFE" "萬豪麻雀館" "CITY LIGHTS BAR" "瑞祥香燭莊" "文記文具" "GOLDEN JADE HOTEL" "LOVELY BEAUTY" "合興百貨" '
    '"興旺電器" And the background is warm yellow street and with all stores\' lights on.')
QWEN_EDIT_PROMPT = ("Turn the drawing into a photograph of a smiling girl with big fox ears and blonde hair, in a pink "
                    "dress, standing on a green hill under a blue sky with white clouds; keep her pose")
ZIMAGE_PROMPT = ("Latina female with thick wavy hair, harbor boats and pastel houses behind. Breezy seaside light, "
                 "warm tones, cinematic close-up.")  # ComfyUI's Z-Image-Turbo template's prompt
FLUX2_PROMPT = ("Repaint the child's drawing as a detailed watercolour illustration: the smiling girl with big fox "
                "ears and blonde hair in a pink dress, arms spread, on a green hill under a blue sky with white clouds")

QWEN_MESHES = """Mesh (xDiT Parallel Mesh, layout manual, gpu_count = GPUs for the workers):
- 2 GPUs: use_cfg_parallel, ulysses_degree 1
- 4 GPUs: use_cfg_parallel, ulysses_degree 2 (as set here)
- 8 GPUs: use_cfg_parallel, ulysses_degree 4
Qwen-Image has 24 attention heads, so ulysses_degree must divide 24 (1, 2, 3, 4, 6, 8); put the rest on ring_degree. use_cfg_parallel runs the positive and the negative prompt on two halves of the GPUs (2 x ulysses x ring = gpu_count) and needs cfg != 1; at cfg 1 give those GPUs to ulysses_degree instead. PipeFusion (pipefusion_parallel_degree) runs Qwen-Image too: each GPU then holds only its stage's blocks; it is exact for its warmup_steps and uses one-step-stale attention after them.
"""
QWEN_MEMORY = ("fp8 files stay fp8 on the workers (the loader's fp8_weights keep): about 20 GB of weights per rank for "
               "the 20B transformer (38 GiB in bf16); shard_weights on the mesh splits them over its GPUs "
               "(docs/memory.md has the per-GPU figures). The text encoder and VAE run in ComfyUI itself.")

QWEN_IMAGE_NOTE = """xDiT: Qwen-Image with CFG parallel x Ulysses

ComfyUI's Qwen-Image template (1328x1328, 20 steps, cfg 2.5, euler, simple; Qwen's own suggestion is 40 steps), with UNETLoader + ModelSamplingAuraFlow (shift 3.1) + KSampler replaced by xDiT Load Diffusion Model + xDiT Parallel Mesh + xDiT Sampler. The sampler's shift 3.1 stands for ModelSamplingAuraFlow's; shift 0 is ComfyUI's own default for Qwen-Image without that node (ModelSamplingFlux 1.15).

Files, under ComfyUI/models/ (Comfy-Org/Qwen-Image_ComfyUI, split_files/):
- diffusion_models/qwen_image_fp8_e4m3fn.safetensors (picked in "xDiT Load Diffusion Model"; a bf16 or scaled fp8 file, or the transformer folder of Qwen/Qwen-Image under diffusers/, loads too)
- text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors (CLIPLoader type qwen_image)
- vae/qwen_image_vae.safetensors

""" + QWEN_MESHES + "\nMemory: " + QWEN_MEMORY + " Width and height must be multiples of 16."

QWEN_EDIT_NOTE = """xDiT: Qwen-Image-Edit 2509 with CFG parallel x Ulysses

ComfyUI's Qwen-Image-Edit 2509 template without its 4-step Lightning LoRA (the template's own settings for the fp8 model: 20 steps, cfg 2.5, euler, simple), with UNETLoader + ModelSamplingAuraFlow (shift 3) + KSampler replaced by xDiT Load Diffusion Model + xDiT Parallel Mesh + xDiT Sampler (shift 3). The input image is scaled to 1 megapixel (ImageScaleToTotalPixels); TextEncodeQwenImageEditPlus reads it (image1; image2 and image3 take more images) with the VAE, so both prompts carry its reference latent, and VAE Encode of the same image is the latent sampled, so the result has its size. The template's CFGNorm is left out: the xDiT Sampler applies plain CFG.

Files, under ComfyUI/models/ (Comfy-Org/Qwen-Image-Edit_ComfyUI and Comfy-Org/Qwen-Image_ComfyUI, split_files/):
- diffusion_models/qwen_image_edit_2509_fp8_e4m3fn.safetensors (picked in "xDiT Load Diffusion Model"). Qwen-Image-Edit 2511 (diffusion_models/qwen_image_edit_2511_bf16.safetensors) runs in the same graph: the loader detects it by its marker (variant edit_2511, its reference tokens at timestep 0)
- text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors (CLIPLoader type qwen_image)
- vae/qwen_image_vae.safetensors
- the input image: Load Image (an upload lands in ComfyUI/input/; input/example.png is the picture ComfyUI ships there)

""" + QWEN_MESHES + """Ulysses and Ring split the reference image's tokens with the result's.

Memory: """ + QWEN_MEMORY + " The reference adds its tokens: a 1 MP image with a 1 MP reference attends over twice the image tokens."

ZIMAGE_NOTE = """xDiT: Z-Image-Turbo with Ulysses

ComfyUI's Z-Image-Turbo template (1024x1024, 8 steps, cfg 1, res_multistep, simple), with UNETLoader + ModelSamplingAuraFlow (shift 3) + KSampler replaced by xDiT Load Diffusion Model + xDiT Parallel Mesh + xDiT Sampler (shift 3, also Z-Image's default at shift 0). At cfg 1 the negative (ConditioningZeroOut) is not evaluated.

ComfyUI 0.3.64 accepts this graph, but its CLIPLoader does not know Qwen3-4B: the text encoder needs a ComfyUI with Z-Image support.

Files, under ComfyUI/models/:
- diffusion_models/z_image_turbo_bf16.safetensors (Comfy-Org/z_image_turbo, split_files/; or the diffusers folder of Tongyi-MAI/Z-Image-Turbo, diffusers/Z-Image-Turbo/transformer/)
- text_encoders/qwen_3_4b.safetensors (CLIPLoader type lumina2; Comfy-Org/z_image_turbo, split_files/)
- vae/ae.safetensors (the FLUX.1 VAE)

Mesh (xDiT Parallel Mesh, layout manual, gpu_count = GPUs for the workers):
- 2 GPUs: ulysses_degree 2 (as set here)
- 4 GPUs: ulysses_degree 2, ring_degree 2
- 8 GPUs: ulysses_degree 2, ring_degree 4
Z-Image has 30 attention heads, so ulysses_degree can only be 1, 2, 3, 5 or 6 (3 GPUs: ulysses_degree 3; 6 GPUs: ulysses_degree 6); ring_degree takes the rest. At cfg 1 there is no negative branch: keep use_cfg_parallel off (at cfg > 1 it puts the negative prompt on half the GPUs).

Memory: the 6.2B transformer takes about 12 GB per rank in bf16. Width and height must be multiples of 16."""

FLUX2_NOTE = """xDiT: FLUX.2 dev with Ulysses (needs a ComfyUI newer than 0.3.64)

ComfyUI's FLUX.2 dev template with its reference image (Load Image -> ImageScaleToTotalPixels 1 MP -> VAE Encode -> ReferenceLatent; 1248x832, 20 steps, euler, FluxGuidance 4), with UNETLoader + Flux2Scheduler + BasicGuider + SamplerCustomAdvanced replaced by xDiT Load Diffusion Model + xDiT Parallel Mesh + xDiT Sampler at cfg 1, scheduler simple and shift 0: FLUX.2's default shift is Flux2Pipeline's empirical mu for the image size and step count, the schedule Flux2Scheduler makes. For text to image, delete (or bypass) ReferenceLatent; chain more ReferenceLatent nodes for more reference images.

ComfyUI 0.3.64 has neither EmptyFlux2LatentImage nor CLIPLoader type flux2 (FLUX.2's Mistral text encoder): this graph needs a ComfyUI with FLUX.2 support.

Files, under ComfyUI/models/:
- diffusion_models/flux2_dev_fp8mixed.safetensors (Comfy-Org/flux2-dev, split_files/; its fp8 weights stay fp8 on the workers; or the diffusers folder of black-forest-labs/FLUX.2-dev, diffusers/FLUX.2-dev/transformer/)
- text_encoders/mistral_3_small_flux2_fp8.safetensors (CLIPLoader type flux2; Comfy-Org/flux2-dev, split_files/, which also has a bf16 file)
- vae/flux2-vae.safetensors (Comfy-Org/flux2-dev)
- the reference image: Load Image (an upload lands in ComfyUI/input/; input/example.png is the picture ComfyUI ships there)

""" + flux_meshes(shipped=4) + """FLUX.2 dev has 48 attention heads, so ulysses_degree must divide 48; use ring_degree for the rest. It runs at cfg 1 (guidance comes from FluxGuidance), so there is no negative branch: keep use_cfg_parallel off; the negative input is ignored at cfg 1. Ulysses and Ring split the reference image's tokens with the result's.

Memory: the 32B transformer takes about 60 GiB per rank in bf16. On smaller GPUs turn on shard_weights (4 GPUs of 24 GB: about 21 GiB each at 1024x1024, docs/memory.md) or use PipeFusion (pipefusion_parallel_degree: each GPU holds only its stage's blocks). Width and height must be multiples of 16."""


def qwen_loaders(g: Graph, model_name: str) -> tuple[Node, Node, Node]:
    """Qwen-Image's model, text encoder and VAE down the first column."""
    model = loader(g, (0, 60), model_name)
    clip = g.add("CLIPLoader", (0, 230), clip_name=QWEN_TEXT, type="qwen_image", device="default")
    vae = g.add("VAELoader", (0, 380), vae_name=QWEN_VAE)
    return model, clip, vae


def qwen_image() -> Graph:
    g = Graph()
    g.note((-460, 60), (420, 760), QWEN_IMAGE_NOTE)
    model, clip, vae = qwen_loaders(g, QWEN_IMAGE)
    latent = g.add("EmptySD3LatentImage", (0, 480), width=1328, height=1328, batch_size=1)
    pos = g.add("CLIPTextEncode", (400, 60), title="Positive prompt", color=POSITIVE, text=QWEN_PROMPT,
                clip=clip.out("CLIP"))
    neg = g.add("CLIPTextEncode", (400, 280), title="Negative prompt", color=NEGATIVE, text="", clip=clip.out("CLIP"))
    m = mesh(g, (400, 500), model, ulysses=2, cfg_parallel=True, gpus=4)
    s = g.add("XDiTSampler", (880, 60), model=model.out("model"), mesh=m.out("mesh"), positive=pos.out("CONDITIONING"),
              negative=neg.out("CONDITIONING"), latent_image=latent.out("LATENT"), seed=42, steps=20, cfg=2.5,
              sampler_name="euler", scheduler="simple", denoise=1.0, shift=3.1)
    decode_and_save(g, s, vae, "xdit_qwen_image")
    return g


def qwen_image_edit_2509() -> Graph:
    g = Graph()
    g.note((-460, 60), (420, 1000), QWEN_EDIT_NOTE)
    model, clip, vae = qwen_loaders(g, QWEN_EDIT_2509)
    image = g.add("LoadImage", (0, 480), title="Image to edit", image=START_IMAGE)
    scaled = g.add("ImageScaleToTotalPixels", (0, 850), image=image.out("IMAGE"), upscale_method="lanczos",
                   megapixels=1.0)
    common = dict(clip=clip.out("CLIP"), vae=vae.out("VAE"), image1=scaled.out("IMAGE"))
    pos = g.add("TextEncodeQwenImageEditPlus", (400, 60), title="Positive prompt", color=POSITIVE,
                prompt=QWEN_EDIT_PROMPT, **common)
    neg = g.add("TextEncodeQwenImageEditPlus", (400, 300), title="Negative prompt", color=NEGATIVE, prompt="", **common)
    latent = g.add("VAEEncode", (400, 540), pixels=scaled.out("IMAGE"), vae=vae.out("VAE"))
    m = mesh(g, (400, 630), model, ulysses=2, cfg_parallel=True, gpus=4)
    s = g.add("XDiTSampler", (880, 60), model=model.out("model"), mesh=m.out("mesh"), positive=pos.out("CONDITIONING"),
              negative=neg.out("CONDITIONING"), latent_image=latent.out("LATENT"), seed=42, steps=20, cfg=2.5,
              sampler_name="euler", scheduler="simple", denoise=1.0, shift=3.0)
    decode_and_save(g, s, vae, "xdit_qwen_image_edit")
    return g


def zimage_turbo() -> Graph:
    g = Graph()
    g.note((-460, 60), (420, 760), ZIMAGE_NOTE)
    model = loader(g, (0, 60), ZIMAGE_MODEL)
    clip = g.add("CLIPLoader", (0, 230), clip_name="qwen_3_4b.safetensors", type="lumina2", device="default")
    vae = g.add("VAELoader", (0, 380), vae_name="ae.safetensors")
    latent = g.add("EmptySD3LatentImage", (0, 480), width=1024, height=1024, batch_size=1)
    pos = g.add("CLIPTextEncode", (400, 60), title="Positive prompt", color=POSITIVE, text=ZIMAGE_PROMPT,
                clip=clip.out("CLIP"))
    zero = g.add("ConditioningZeroOut", (400, 280), title="Negative (unused at cfg 1)", color=NEGATIVE,
                 conditioning=pos.out("CONDITIONING"))
    m = mesh(g, (400, 360), model, ulysses=2, gpus=2)
    s = g.add("XDiTSampler", (880, 60), model=model.out("model"), mesh=m.out("mesh"), positive=pos.out("CONDITIONING"),
              negative=zero.out("CONDITIONING"), latent_image=latent.out("LATENT"), seed=42, steps=8, cfg=1.0,
              sampler_name="res_multistep", scheduler="simple", denoise=1.0, shift=3.0)
    decode_and_save(g, s, vae, "xdit_zimage_turbo")
    return g


def flux2_dev() -> Graph:
    g = Graph()
    g.note((-460, 60), (420, 1060), FLUX2_NOTE)
    model = loader(g, (0, 60), FLUX2_MODEL)
    clip = g.add("CLIPLoader", (0, 230), clip_name="mistral_3_small_flux2_fp8.safetensors", type="flux2",
                 device="default")
    vae = g.add("VAELoader", (0, 380), vae_name="flux2-vae.safetensors")
    latent = g.add("EmptyFlux2LatentImage", (0, 480), width=1248, height=832, batch_size=1)
    image = g.add("LoadImage", (0, 630), title="Reference image", image=START_IMAGE)
    scaled = g.add("ImageScaleToTotalPixels", (0, 1000), image=image.out("IMAGE"), upscale_method="lanczos",
                   megapixels=1.0)
    text = g.add("CLIPTextEncode", (400, 60), title="Positive prompt", color=POSITIVE, text=FLUX2_PROMPT,
                 clip=clip.out("CLIP"))
    guided = g.add("FluxGuidance", (400, 280), conditioning=text.out("CONDITIONING"), guidance=4.0)
    encoded = g.add("VAEEncode", (400, 380), pixels=scaled.out("IMAGE"), vae=vae.out("VAE"))
    referenced = g.add("ReferenceLatent", (400, 470), conditioning=guided.out("CONDITIONING"),
                       latent=encoded.out("LATENT"))
    zero = g.add("ConditioningZeroOut", (400, 560), title="Negative (unused at cfg 1)", color=NEGATIVE,
                 conditioning=text.out("CONDITIONING"))
    m = mesh(g, (400, 640), model, ulysses=4, gpus=4)
    s = g.add("XDiTSampler", (880, 60), model=model.out("model"), mesh=m.out("mesh"),
              positive=referenced.out("CONDITIONING"), negative=zero.out("CONDITIONING"),
              latent_image=latent.out("LATENT"), seed=42, steps=20, cfg=1.0, sampler_name="euler", scheduler="simple",
              denoise=1.0, shift=0.0)
    decode_and_save(g, s, vae, "xdit_flux2_dev")
    return g


WORKFLOWS = {"flux1_ulysses": flux1_ulysses, "sd35_cfg_parallel": sd35_cfg_parallel,
             "pixart_sigma_hybrid": pixart_sigma_hybrid, "flux1_guider_custom_sampler": flux1_guider_custom_sampler,
             "flux1_lora": flux1_lora, "wan21_t2v_14b": wan21_t2v_14b, "wan22_i2v_a14b": wan22_i2v_a14b,
             "wan22_ti2v_5b": wan22_ti2v_5b, "qwen_image": qwen_image, "qwen_image_edit_2509": qwen_image_edit_2509,
             "zimage_turbo": zimage_turbo, "flux2_dev": flux2_dev}


def render() -> dict[Path, str]:
    """Every output file's path (relative to the repo) and text."""
    files = {}
    for name, build in WORKFLOWS.items():
        graph = build()
        files[Path("workflows") / f"{name}.json"] = json.dumps(ui_format(graph), indent=2) + "\n"
        files[Path("workflows") / "api" / f"{name}.json"] = json.dumps(api_format(graph), indent=2) + "\n"
    return files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files, write nothing")
    args = parser.parse_args(argv)
    stale = []
    for rel, text in render().items():
        path = ROOT / rel
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(rel))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {rel}")
    if stale:
        print("out of date (run python tools/build_workflows.py): " + ", ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
