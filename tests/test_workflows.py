"""The shipped workflows (workflows/*.json, UI format; workflows/api/*.json, API format), without ComfyUI.

The core ComfyUI nodes they use are described in CORE_NODES; tests/test_comfyui_integration.py checks that
table against a real ComfyUI's /object_info.
"""
import importlib.util
import inspect
import json
import math
import re
import sys
from pathlib import Path

import pytest

from nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from nodes.mesh import XDiTParallelMesh, check_against_model
from nodes.types import XDiTModel

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / "workflows"
UI_FILES = sorted(WORKFLOWS.glob("*.json"))
EXPECTED = {"flux1_ulysses", "sd35_cfg_parallel", "pixart_sigma_hybrid", "flux1_guider_custom_sampler", "flux1_lora",
            "wan21_t2v_14b", "wan22_i2v_a14b", "wan22_ti2v_5b", "qwen_image", "qwen_image_edit_2509", "zimage_turbo",
            "flux2_dev"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}

# Core nodes (ComfyUI 0.3.64): socket inputs and outputs in slot order, widgets in widget order; "optional":
# sockets a prompt may leave unconnected (V3 nodes list them after the required inputs).
# Widget specs: ("FILE", folder): a file from that models folder (or from ComfyUI's input folder: an image);
# ("COMBO", [...]): values our workflows may use (each must be one of ComfyUI's options); ("INT", min, step):
# min + a multiple of step; ("FLOAT", min, max); ("STRING",). "control": widgets followed by a
# control_after_generate value; "upload": widgets followed by their upload button's value.
CORE_NODES = {
    "DualCLIPLoader": {"inputs": [], "outputs": ["CLIP"], "widgets": {
        "clip_name1": ("FILE", "text_encoders"), "clip_name2": ("FILE", "text_encoders"),
        "type": ("COMBO", ["flux", "sd3"]), "device": ("COMBO", ["default", "cpu"])}},
    "TripleCLIPLoader": {"inputs": [], "outputs": ["CLIP"], "widgets": {
        "clip_name1": ("FILE", "text_encoders"), "clip_name2": ("FILE", "text_encoders"),
        "clip_name3": ("FILE", "text_encoders")}},
    "CLIPLoader": {"inputs": [], "outputs": ["CLIP"], "widgets": {
        "clip_name": ("FILE", "text_encoders"), "type": ("COMBO", ["pixart", "sd3", "wan", "qwen_image", "lumina2"]),
        "device": ("COMBO", ["default", "cpu"])}},
    "CLIPTextEncode": {"inputs": [("clip", "CLIP")], "outputs": ["CONDITIONING"], "widgets": {"text": ("STRING",)}},
    "FluxGuidance": {"inputs": [("conditioning", "CONDITIONING")], "outputs": ["CONDITIONING"],
                     "widgets": {"guidance": ("FLOAT", 0.0, 100.0)}},
    "ConditioningZeroOut": {"inputs": [("conditioning", "CONDITIONING")], "outputs": ["CONDITIONING"], "widgets": {}},
    "EmptySD3LatentImage": {"inputs": [], "outputs": ["LATENT"], "widgets": {
        "width": ("INT", 16, 16), "height": ("INT", 16, 16), "batch_size": ("INT", 1, 1)}},
    "EmptyLatentImage": {"inputs": [], "outputs": ["LATENT"], "widgets": {
        "width": ("INT", 16, 8), "height": ("INT", 16, 8), "batch_size": ("INT", 1, 1)}},
    "VAELoader": {"inputs": [], "outputs": ["VAE"], "widgets": {"vae_name": ("FILE", "vae")}},
    "VAEDecode": {"inputs": [("samples", "LATENT"), ("vae", "VAE")], "outputs": ["IMAGE"], "widgets": {}},
    "SaveImage": {"inputs": [("images", "IMAGE")], "outputs": [], "widgets": {"filename_prefix": ("STRING",)}},
    "SaveLatent": {"inputs": [("samples", "LATENT")], "outputs": [], "widgets": {"filename_prefix": ("STRING",)}},
    "ModelSamplingFlux": {"inputs": [("model", "MODEL")], "outputs": ["MODEL"], "widgets": {
        "max_shift": ("FLOAT", 0.0, 100.0), "base_shift": ("FLOAT", 0.0, 100.0), "width": ("INT", 16, 8),
        "height": ("INT", 16, 8)}},
    "BasicScheduler": {"inputs": [("model", "MODEL")], "outputs": ["SIGMAS"], "widgets": {
        "scheduler": ("COMBO", ["beta"]), "steps": ("INT", 1, 1), "denoise": ("FLOAT", 0.0, 1.0)}},
    "KSamplerSelect": {"inputs": [], "outputs": ["SAMPLER"], "widgets": {"sampler_name": ("COMBO", ["dpmpp_2m_sde"])}},
    "RandomNoise": {"inputs": [], "outputs": ["NOISE"], "widgets": {"noise_seed": ("INT", 0, 1)},
                    "control": {"noise_seed"}},
    "SamplerCustomAdvanced": {"inputs": [("noise", "NOISE"), ("guider", "GUIDER"), ("sampler", "SAMPLER"),
                                         ("sigmas", "SIGMAS"), ("latent_image", "LATENT")],
                              "outputs": ["LATENT", "LATENT"], "widgets": {}},
    "EmptyHunyuanLatentVideo": {"inputs": [], "outputs": ["LATENT"], "widgets": {
        "width": ("INT", 16, 16), "height": ("INT", 16, 16), "length": ("INT", 1, 4), "batch_size": ("INT", 1, 1)}},
    "WanImageToVideo": {"inputs": [("positive", "CONDITIONING"), ("negative", "CONDITIONING"), ("vae", "VAE"),
                                   ("clip_vision_output", "CLIP_VISION_OUTPUT"), ("start_image", "IMAGE")],
                        "optional": {"clip_vision_output", "start_image"},
                        "outputs": ["CONDITIONING", "CONDITIONING", "LATENT"], "widgets": {
                            "width": ("INT", 16, 16), "height": ("INT", 16, 16), "length": ("INT", 1, 4),
                            "batch_size": ("INT", 1, 1)}},
    "Wan22ImageToVideoLatent": {"inputs": [("vae", "VAE"), ("start_image", "IMAGE")], "optional": {"start_image"},
                                "outputs": ["LATENT"], "widgets": {
                                    "width": ("INT", 32, 32), "height": ("INT", 32, 32), "length": ("INT", 1, 4),
                                    "batch_size": ("INT", 1, 1)}},
    "LoadImage": {"inputs": [], "outputs": ["IMAGE", "MASK"], "widgets": {"image": ("FILE", "input")},
                  "upload": {"image"}},
    "CreateVideo": {"inputs": [("images", "IMAGE"), ("audio", "AUDIO")], "optional": {"audio"}, "outputs": ["VIDEO"],
                    "widgets": {"fps": ("FLOAT", 1.0, 120.0)}},
    "SaveVideo": {"inputs": [("video", "VIDEO")], "outputs": [], "widgets": {
        "filename_prefix": ("STRING",), "format": ("COMBO", ["auto"]), "codec": ("COMBO", ["auto"])}},
    "ImageScaleToTotalPixels": {"inputs": [("image", "IMAGE")], "outputs": ["IMAGE"], "widgets": {
        "upscale_method": ("COMBO", ["lanczos"]), "megapixels": ("FLOAT", 0.01, 16.0)}},
    "VAEEncode": {"inputs": [("pixels", "IMAGE"), ("vae", "VAE")], "outputs": ["LATENT"], "widgets": {}},
    "TextEncodeQwenImageEditPlus": {"inputs": [("clip", "CLIP"), ("vae", "VAE"), ("image1", "IMAGE"),
                                               ("image2", "IMAGE"), ("image3", "IMAGE")],
                                    "optional": {"vae", "image1", "image2", "image3"}, "outputs": ["CONDITIONING"],
                                    "widgets": {"prompt": ("STRING",)}},
    "ReferenceLatent": {"inputs": [("conditioning", "CONDITIONING"), ("latent", "LATENT")], "optional": {"latent"},
                        "outputs": ["CONDITIONING"], "widgets": {}},
}
# What a ComfyUI newer than 0.3.64 adds that a workflow uses, as its source defines it (FLUX.2 support:
# comfy_extras/nodes_flux.py's EmptyFlux2LatentImage, nodes.py's CLIPLoader type "flux2"). Not checked against
# the real server, which is 0.3.64: tests/test_comfyui_integration.py skips the workflows of NEEDS_NEWER_COMFYUI
# on a server that lacks these, and checks them on one that has them.
NEWER_CORE_NODES = {
    "EmptyFlux2LatentImage": {"inputs": [], "outputs": ["LATENT"], "widgets": {
        "width": ("INT", 16, 16), "height": ("INT", 16, 16), "batch_size": ("INT", 1, 1)}},
}
NEWER_OPTIONS = {("CLIPLoader", "type"): ["flux2"]}
NEEDS_NEWER_COMFYUI = {"flux2_dev": "EmptyFlux2LatentImage and CLIPLoader type flux2 (FLUX.2's Mistral text "
                                    "encoder), which ComfyUI 0.3.64 lacks"}
# The latent's downscaling (pixels per latent row) of the nodes that make a workflow's latent.
LATENT_SCALE = {"EmptySD3LatentImage": 8, "EmptyLatentImage": 8, "EmptyHunyuanLatentVideo": 8, "WanImageToVideo": 8,
                "Wan22ImageToVideoLatent": 16, "EmptyFlux2LatentImage": 16}
# The model each workflow is for: family, variant, attention heads and transformer blocks of the real checkpoint.
MODELS = {"flux1_ulysses": ("flux", "dev", 24, 19 + 38), "sd35_cfg_parallel": ("sd3", "sd3", 38, 38),
          "pixart_sigma_hybrid": ("pixart", "sigma", 16, 28), "flux1_guider_custom_sampler": ("flux", "dev", 24, 19 + 38),
          "flux1_lora": ("flux", "dev", 24, 19 + 38), "wan21_t2v_14b": ("wan", "t2v", 40, 40),
          "wan22_i2v_a14b": ("wan", "i2v", 40, 40), "wan22_ti2v_5b": ("wan", "ti2v", 24, 30),
          "qwen_image": ("qwen", "image", 24, 60), "qwen_image_edit_2509": ("qwen", "image", 24, 60),
          "zimage_turbo": ("zimage", "zimage", 30, 2 + 30), "flux2_dev": ("flux2", "dev", 48, 8 + 48)}


def our_signature(node_type):
    """(sockets [(name, type)], outputs [type], widgets {name: (type or options, opts)}) from INPUT_TYPES."""
    cls = NODE_CLASS_MAPPINGS[node_type]
    sockets, widgets = [], {}
    for section in ("required", "optional"):
        for name, entry in cls.INPUT_TYPES().get(section, {}).items():
            kind, opts = entry[0], entry[1] if len(entry) > 1 else {}
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                widgets[name] = (kind, opts)
            else:
                sockets.append((name, kind))
    return sockets, list(cls.RETURN_TYPES), widgets


def signature(node_type):
    """(sockets, outputs, widget names, {widget: the values allowed for the extra entry the frontend saves after
    it (control_after_generate, an upload button)})."""
    if node_type in NODE_CLASS_MAPPINGS:
        sockets, outputs, widgets = our_signature(node_type)
        return sockets, outputs, list(widgets), {n: CONTROL_VALUES for n, (_, o) in widgets.items()
                                                 if o.get("control_after_generate")}
    core = core_node(node_type)
    extra = {**{n: CONTROL_VALUES for n in core.get("control", ())}, **{n: {"image"} for n in core.get("upload", ())}}
    return core["inputs"], core["outputs"], list(core["widgets"]), extra


def core_node(node_type):
    """A core node's entry: ComfyUI 0.3.64's, else a newer ComfyUI's."""
    return CORE_NODES[node_type] if node_type in CORE_NODES else NEWER_CORE_NODES[node_type]


def newer_comfyui_lacks(object_info):
    """What NEWER_CORE_NODES and NEWER_OPTIONS name that a server's /object_info lacks."""
    missing = [name for name in NEWER_CORE_NODES if name not in object_info]
    for (node, widget), values in NEWER_OPTIONS.items():
        entries = {**object_info.get(node, {}).get("input", {}).get("required", {}),
                   **object_info.get(node, {}).get("input", {}).get("optional", {})}
        entry = entries.get(widget, [[]])
        options = entry[0] if isinstance(entry[0], list) else (entry[1] if len(entry) > 1 else {}).get("options", [])
        missing += [f"{node} {widget} {v}" for v in values if v not in options]
    return missing


def named_widgets(node):
    """{widget name: value} of a UI node, dropping the control_after_generate and upload entries."""
    _, _, names, extra = signature(node["type"])
    values = list(node["widgets_values"])
    out = {}
    for name in names:
        assert values, f"node {node['id']} ({node['type']}) has too few widgets_values"
        out[name] = values.pop(0)
        if name in extra:
            assert values and values.pop(0) in extra[name], f"node {node['id']}: {name}'s extra value"
    assert not values, f"node {node['id']} ({node['type']}) has extra widgets_values {values}"
    return out


def load(path):
    return json.loads(path.read_text())


def graph_nodes(ui):
    return [n for n in ui["nodes"] if n["type"] != "Note"]


ids = [p.stem for p in UI_FILES]


def test_the_three_workflows_ship_with_api_copies_and_nothing_else_is_listed():
    assert EXPECTED <= set(ids)
    assert sorted(p.name for p in (WORKFLOWS / "api").glob("*.json")) == sorted(p.name for p in UI_FILES)
    # ComfyUI's template browser lists every workflows/*.json: each must be a UI workflow.
    for path in UI_FILES:
        assert load(path).get("version") == 0.4, path


@pytest.mark.parametrize("path", UI_FILES, ids=ids)
def test_ui_structure(path):
    ui = load(path)
    assert {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"} <= set(ui)
    node_ids = [n["id"] for n in ui["nodes"]]
    assert len(set(node_ids)) == len(node_ids) and all(isinstance(i, int) and i > 0 for i in node_ids)
    assert ui["last_node_id"] == max(node_ids)
    assert ui["last_link_id"] == max((link[0] for link in ui["links"]), default=0)
    orders = sorted(n["order"] for n in ui["nodes"])
    assert orders == list(range(len(ui["nodes"])))
    for n in ui["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                "widgets_values"} <= set(n), n["id"]
        assert len(n["pos"]) == 2 and len(n["size"]) == 2 and n["mode"] == 0
        if n["type"] != "Note":
            assert n["properties"]["Node name for S&R"] == n["type"]
    # Nothing overlaps: each node's box (title bar included) is clear of the others.
    boxes = [(n["pos"][0], n["pos"][1] - 30, n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
             for n in ui["nodes"]]
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], (a, b)


@pytest.mark.parametrize("path", UI_FILES, ids=ids)
def test_links_agree_with_both_ends(path):
    ui = load(path)
    by_id = {n["id"]: n for n in ui["nodes"]}
    link_ids = [link[0] for link in ui["links"]]
    assert len(set(link_ids)) == len(link_ids)
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        out = by_id[src]["outputs"][src_slot]
        inp = by_id[dst]["inputs"][dst_slot]
        assert link_id in out["links"] and inp["link"] == link_id, link_id
        assert out["type"] == inp["type"] == kind, link_id
        assert signature(by_id[src]["type"])[1][src_slot] == kind
        assert signature(by_id[dst]["type"])[0][dst_slot] == (inp["name"], kind)
    # Every link a node lists is in `links`, pointing back at it.
    links = {link[0]: link for link in ui["links"]}
    for n in ui["nodes"]:
        for slot, inp in enumerate(n["inputs"]):
            if inp["link"] is not None:
                assert links[inp["link"]][3:5] == [n["id"], slot]
        for slot, out in enumerate(n["outputs"]):
            assert out.get("slot_index", slot) == slot
            for link_id in out["links"] or []:
                assert links[link_id][1:3] == [n["id"], slot]


@pytest.mark.parametrize("path", UI_FILES, ids=ids)
def test_nodes_are_known_with_their_sockets_and_valid_widgets(path):
    for n in graph_nodes(load(path)):
        assert n["type"] in NODE_CLASS_MAPPINGS or n["type"] in CORE_NODES or n["type"] in NEWER_CORE_NODES, n["type"]
        sockets, outputs, _, _ = signature(n["type"])
        assert [(i["name"], i["type"]) for i in n["inputs"]] == sockets, n["id"]
        assert [o["type"] for o in n["outputs"]] == outputs, n["id"]
        values = named_widgets(n)
        if n["type"] in NODE_CLASS_MAPPINGS:
            check_our_widgets(n["type"], values)
        else:
            check_core_widgets(n["type"], values)
        # ComfyUI refuses a prompt whose required socket is unconnected.
        required = NODE_CLASS_MAPPINGS[n["type"]].INPUT_TYPES().get("required", {}) if n["type"] in NODE_CLASS_MAPPINGS \
            else {s for s, _ in sockets} - core_node(n["type"]).get("optional", set())
        for i in n["inputs"]:
            if i["name"] in required:
                assert i["link"] is not None, (n["id"], i["name"])


def check_our_widgets(node_type, values):
    _, _, widgets = our_signature(node_type)
    for name, value in values.items():
        kind, opts = widgets[name]
        if isinstance(kind, list):
            if name == "model_name":  # the list is ComfyUI's files; the entry's form is ours
                assert re.fullmatch(r"(diffusion_models|checkpoints|diffusers)/[^/].*", value), value
            elif name == "lora_name":  # an entry of ComfyUI's loras folder
                assert re.fullmatch(r"[^/].*\.safetensors", value), value
            else:
                assert value in kind, (name, value)
        elif kind == "INT":
            assert isinstance(value, int) and not isinstance(value, bool)
            assert opts.get("min", -math.inf) <= value <= opts.get("max", math.inf), (name, value)
        elif kind == "FLOAT":
            assert isinstance(value, (int, float)) and opts.get("min", -math.inf) <= value <= opts.get("max", math.inf)
        elif kind == "BOOLEAN":
            assert isinstance(value, bool), (name, value)
        else:
            assert isinstance(value, str), (name, value)
    if node_type == "XDiTParallelMesh":
        # As ComfyUI does: VALIDATE_INPUTS gets only the inputs its signature names.
        named = inspect.signature(XDiTParallelMesh.VALIDATE_INPUTS).parameters
        assert XDiTParallelMesh.VALIDATE_INPUTS(**{k: v for k, v in values.items() if k in named}) is True


def check_core_widgets(node_type, values):
    for name, value in values.items():
        spec = core_node(node_type)["widgets"][name]
        if spec[0] == "FILE":
            suffixes = (".png", ".jpg", ".jpeg", ".webp") if spec[1] == "input" else (".safetensors",)
            assert isinstance(value, str) and value.lower().endswith(suffixes), (name, value)
        elif spec[0] == "COMBO":
            assert value in spec[1] + NEWER_OPTIONS.get((node_type, name), []), (name, value)
        elif spec[0] == "INT":
            assert isinstance(value, int) and value >= spec[1] and (value - spec[1]) % spec[2] == 0, (name, value)
        elif spec[0] == "FLOAT":
            assert isinstance(value, (int, float)) and spec[1] <= value <= spec[2], (name, value)
        else:
            assert isinstance(value, str), (name, value)


def nodes_of(ui, node_type):
    return [n for n in ui["nodes"] if n["type"] == node_type]


def source(ui, node, input_name):
    """The UI node feeding `input_name` of `node`."""
    link_id = next(i["link"] for i in node["inputs"] if i["name"] == input_name)
    src = next(link[1] for link in ui["links"] if link[0] == link_id)
    return next(n for n in ui["nodes"] if n["id"] == src)


@pytest.mark.parametrize("path", UI_FILES, ids=ids)
def test_mesh_runs_today_on_the_real_model(path):
    """The mesh passes the sampler's own checks for the real model, cfg, steps and size (ulysses divides the
    heads, cfg parallel only with a negative branch, no PipeFusion for video, ...), with one rank per given GPU;
    for every sampler of the workflow (Wan 2.2's two experts)."""
    family, variant, heads, blocks = MODELS[path.stem]
    ui = load(path)
    samplers = nodes_of(ui, "XDiTSampler") + nodes_of(ui, "XDiTSamplerAdvanced") or nodes_of(ui, "XDiTGuider")
    assert samplers
    for sampler in samplers:
        mesh_node = source(ui, sampler, "mesh")
        values = named_widgets(mesh_node)
        mesh, summary = XDiTParallelMesh().build(**values)
        settings = named_widgets(sampler)
        if sampler["type"] == "XDiTGuider":  # steps from the scheduler, the latent from SamplerCustomAdvanced
            (custom,) = nodes_of(ui, "SamplerCustomAdvanced")
            steps, latent = named_widgets(source(ui, custom, "sigmas"))["steps"], source(ui, custom, "latent_image")
            loader = source(ui, source(ui, source(ui, sampler, "model"), "model"), "model")
        else:
            steps, latent, loader = settings["steps"], source(ui, sampler, "latent_image"), source(ui, sampler, "model")
        while latent["type"] in ("XDiTSampler", "XDiTSamplerAdvanced"):  # a second expert's: the first's latent
            latent = source(ui, latent, "latent_image")
        while loader["type"] == "XDiTLoRA":
            loader = source(ui, loader, "model")
        cfg = settings["cfg"]
        if latent["type"] == "VAEEncode":  # an edit: the input image scaled to 1 MP, 1024 px high when square
            assert source(ui, latent, "pixels")["type"] == "ImageScaleToTotalPixels"
            latent_height = 1024 // 8
        else:
            latent_height = named_widgets(latent)["height"] // LATENT_SCALE[latent["type"]]
        model = XDiTModel("unused", "bf16", family, variant, heads, blocks)
        parallel = check_against_model(mesh, model, cfg, steps, latent_height, video=family == "wan")
        assert parallel.world_size == mesh.gpu_count > 1 and mesh.layout == "manual", summary
        assert named_widgets(loader)["family"] in ("auto", family)
        negative = source(ui, sampler, "negative")
        if negative["type"] == "WanImageToVideo":  # the I2V conditioning wraps the prompts
            negative = source(ui, negative, "negative")
        if cfg == 1.0:  # guidance-distilled (Flux, FLUX.2) or Turbo (Z-Image): no negative branch
            assert family in ("flux", "flux2", "zimage") and not mesh.use_cfg_parallel
            assert negative["type"] == "ConditioningZeroOut"
        else:
            assert mesh.use_cfg_parallel
            assert negative["type"] in ("CLIPTextEncode", "TextEncodeQwenImageEditPlus")
        if family in ("flux", "flux2"):
            assert cfg == 1.0 and parallel.ulysses_degree == mesh.gpu_count
            positive = source(ui, sampler, "positive")
            while positive["type"] == "ReferenceLatent":  # FLUX.2's reference image
                positive = source(ui, positive, "conditioning")
            assert positive["type"] == "FluxGuidance"
        if family == "wan":
            assert parallel.pipefusion_parallel_degree == 1 and named_widgets(sampler)["shift"] == 8.0


def test_wan22_experts_chain_as_comfyui_template():
    """Wan 2.2 I2V A14B: as the template's two KSamplerAdvanced, the high-noise expert adds the noise and hands
    its latent with the leftover noise at step 10 to the low-noise expert, which adds none and runs to the end;
    same steps, cfg, sampler, conditioning and mesh for both, each its own model file."""
    ui = load(WORKFLOWS / "wan22_i2v_a14b.json")
    high, low = sorted(nodes_of(ui, "XDiTSamplerAdvanced"), key=lambda n: named_widgets(n)["start_at_step"])
    h, lo = named_widgets(high), named_widgets(low)
    assert (h["add_noise"], h["start_at_step"], h["end_at_step"], h["return_with_leftover_noise"]) == \
        ("enable", 0, 10, "enable")
    assert (lo["add_noise"], lo["start_at_step"], lo["end_at_step"], lo["return_with_leftover_noise"]) == \
        ("disable", 10, 10000, "disable")
    for key in ("steps", "cfg", "sampler_name", "scheduler", "shift"):
        assert h[key] == lo[key], key
    assert (h["steps"], h["cfg"], h["sampler_name"], h["scheduler"]) == (20, 3.5, "euler", "simple")
    assert source(ui, low, "latent_image")["id"] == high["id"]
    assert source(ui, high, "latent_image")["type"] == "WanImageToVideo"
    for name in ("mesh", "positive", "negative"):
        assert source(ui, high, name)["id"] == source(ui, low, name)["id"], name
    assert source(ui, source(ui, high, "positive"), "positive")["type"] == "CLIPTextEncode"
    files = [named_widgets(source(ui, n, "model"))["model_name"] for n in (high, low)]
    assert files == ["diffusion_models/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors",
                     "diffusion_models/wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors"]
    (i2v,) = nodes_of(ui, "WanImageToVideo")
    assert source(ui, i2v, "start_image")["type"] == "LoadImage"


# ComfyUI's templates for the new families (Qwen-Image, Qwen-Image-Edit 2509 without its Lightning LoRA, the
# template's fp8 row; Z-Image-Turbo; FLUX.2 dev): sampler settings, the model sampling node's shift as the xDiT
# Sampler's (FLUX.2: 0, the empirical mu Flux2Scheduler computes), text encoder and type, VAE, latent size.
TEMPLATES = {
    "qwen_image": dict(steps=20, cfg=2.5, sampler_name="euler", scheduler="simple", shift=3.1, size=(1328, 1328),
                       clip=("qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image"), vae="qwen_image_vae.safetensors"),
    "qwen_image_edit_2509": dict(steps=20, cfg=2.5, sampler_name="euler", scheduler="simple", shift=3.0, size=None,
                                 clip=("qwen_2.5_vl_7b_fp8_scaled.safetensors", "qwen_image"),
                                 vae="qwen_image_vae.safetensors"),
    "zimage_turbo": dict(steps=8, cfg=1.0, sampler_name="res_multistep", scheduler="simple", shift=3.0,
                         size=(1024, 1024), clip=("qwen_3_4b.safetensors", "lumina2"), vae="ae.safetensors"),
    "flux2_dev": dict(steps=20, cfg=1.0, sampler_name="euler", scheduler="simple", shift=0.0, size=(1248, 832),
                      clip=("mistral_3_small_flux2_fp8.safetensors", "flux2"), vae="flux2-vae.safetensors"),
}


def test_newer_comfyui_parts_are_used_only_by_the_workflows_that_say_so():
    for path in UI_FILES:
        used = set()
        for n in graph_nodes(load(path)):
            if n["type"] in NEWER_CORE_NODES:
                used.add(n["type"])
            elif n["type"] in CORE_NODES:
                for name, value in named_widgets(n).items():
                    if value in NEWER_OPTIONS.get((n["type"], name), []):
                        used.add(f"{n['type']} {name} {value}")
        assert bool(used) == (path.stem in NEEDS_NEWER_COMFYUI), (path.stem, used)


@pytest.mark.parametrize("stem", sorted(TEMPLATES))
def test_new_families_follow_comfyui_templates(stem):
    ui = load(WORKFLOWS / f"{stem}.json")
    expected = TEMPLATES[stem]
    (sampler,) = nodes_of(ui, "XDiTSampler")
    settings = named_widgets(sampler)
    for key in ("steps", "cfg", "sampler_name", "scheduler", "shift"):
        assert settings[key] == expected[key], key
    assert named_widgets(source(ui, sampler, "model"))["family"] == "auto"
    (clip,) = nodes_of(ui, "CLIPLoader")
    assert (named_widgets(clip)["clip_name"], named_widgets(clip)["type"]) == expected["clip"]
    (vae,) = nodes_of(ui, "VAELoader")
    assert named_widgets(vae)["vae_name"] == expected["vae"]
    latent = source(ui, sampler, "latent_image")
    if expected["size"] is not None:
        assert (named_widgets(latent)["width"], named_widgets(latent)["height"]) == expected["size"]
    if stem == "flux2_dev":
        assert latent["type"] == "EmptyFlux2LatentImage"
        (guidance,) = nodes_of(ui, "FluxGuidance")
        assert named_widgets(guidance)["guidance"] == 4.0


def scaled_input_image(ui, node):
    """The ImageScaleToTotalPixels feeding `node` (1 MP, lanczos, as the templates), checked to scale a LoadImage."""
    assert node["type"] == "ImageScaleToTotalPixels"
    assert named_widgets(node) == {"upscale_method": "lanczos", "megapixels": 1.0}
    assert source(ui, node, "image")["type"] == "LoadImage"
    return node


def test_qwen_edit_references_as_comfyui_template():
    """Qwen-Image-Edit 2509: one scaled input image feeds both TextEncodeQwenImageEditPlus (image1, with the VAE:
    each prompt carries its reference latent) and VAE Encode, whose latent the sampler denoises."""
    ui = load(WORKFLOWS / "qwen_image_edit_2509.json")
    (sampler,) = nodes_of(ui, "XDiTSampler")
    latent = source(ui, sampler, "latent_image")
    assert latent["type"] == "VAEEncode"
    scaled = scaled_input_image(ui, source(ui, latent, "pixels"))
    vae = source(ui, latent, "vae")
    for branch in ("positive", "negative"):
        encoder = source(ui, sampler, branch)
        assert encoder["type"] == "TextEncodeQwenImageEditPlus"
        assert source(ui, encoder, "image1")["id"] == scaled["id"] and source(ui, encoder, "vae")["id"] == vae["id"]
        assert [i["link"] for i in encoder["inputs"] if i["name"] in ("image2", "image3")] == [None, None]
    assert named_widgets(source(ui, sampler, "negative"))["prompt"] == ""


def test_flux2_reference_as_comfyui_template():
    """FLUX.2 dev: the scaled reference image's VAE Encode reaches the positive prompt through ReferenceLatent,
    after FluxGuidance; the negative is unused at cfg 1."""
    ui = load(WORKFLOWS / "flux2_dev.json")
    (sampler,) = nodes_of(ui, "XDiTSampler")
    reference = source(ui, sampler, "positive")
    assert reference["type"] == "ReferenceLatent"
    assert source(ui, reference, "conditioning")["type"] == "FluxGuidance"
    encoded = source(ui, reference, "latent")
    assert encoded["type"] == "VAEEncode"
    scaled_input_image(ui, source(ui, encoded, "pixels"))
    assert source(ui, sampler, "negative")["type"] == "ConditioningZeroOut"


@pytest.mark.parametrize("path", UI_FILES, ids=ids)
def test_note_names_every_file_and_the_meshes_for_2_4_8_gpus(path):
    ui = load(path)
    (note,) = nodes_of(ui, "Note")
    text = note["widgets_values"][0]
    for n in graph_nodes(ui):
        for name, spec in {**CORE_NODES, **NEWER_CORE_NODES}.get(n["type"], {}).get("widgets", {}).items():
            if spec[0] == "FILE":
                assert f"{spec[1]}/{named_widgets(n)[name]}" in text, (n["type"], name)
        if n["type"] == "XDiTLoadModel":
            assert named_widgets(n)["model_name"] in text
        if n["type"] == "XDiTLoRA":
            assert f"loras/{named_widgets(n)['lora_name']}" in text
    for gpus in (2, 4, 8):
        assert re.search(rf"^- {gpus} GPUs: .*(ulysses|pipefusion_parallel)_degree \d", text, re.M), gpus


def advertised_meshes(text):
    """{GPUs: mesh widgets} of a note's "- N GPUs: ..." lines (the text before any ';' or '(')."""
    meshes = {}
    for gpus, line in re.findall(r"^- (\d+) GPUs: ([^;(\n]*)", text, re.M):
        widgets = {"use_cfg_parallel": "use_cfg_parallel" in line, "ulysses_degree": 1, "ring_degree": 1,
                   "pipefusion_parallel_degree": 1}
        for name, degree in re.findall(r"(ulysses_degree|ring_degree|pipefusion_parallel_degree) (\d+)", line):
            widgets[name] = int(degree)
        meshes[int(gpus)] = widgets
    return meshes


@pytest.mark.parametrize("path", UI_FILES, ids=ids)
def test_every_mesh_the_note_advertises_runs_on_the_real_model(path):
    """The note's meshes for 2, 4 and 8 GPUs pass the sampler's checks for the real model, as the shipped one."""
    family, variant, heads, blocks = MODELS[path.stem]
    ui = load(path)
    (note,) = nodes_of(ui, "Note")
    meshes = advertised_meshes(note["widgets_values"][0])
    assert set(meshes) == {2, 4, 8}
    sampler = (nodes_of(ui, "XDiTSampler") + nodes_of(ui, "XDiTSamplerAdvanced") or nodes_of(ui, "XDiTGuider"))[0]
    shipped = named_widgets(source(ui, sampler, "mesh"))
    cfg = named_widgets(sampler)["cfg"]
    model = XDiTModel("unused", "bf16", family, variant, heads, blocks)
    for gpus, widgets in meshes.items():
        mesh, summary = XDiTParallelMesh().build(**{**shipped, **widgets, "gpu_count": gpus})
        parallel = check_against_model(mesh, model, cfg, 20, 128, video=family == "wan")
        assert parallel.world_size == gpus, (gpus, summary)


def ui_to_api(ui):
    """ComfyUI's 'Export (API)': Notes dropped, links as [source id, slot], widgets by name."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for n in graph_nodes(ui):
        inputs = {i["name"]: [str(links[i["link"]][1]), links[i["link"]][2]]
                  for i in n["inputs"] if i["link"] is not None}
        inputs.update(named_widgets(n))
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


@pytest.mark.parametrize("path", UI_FILES, ids=ids)
def test_api_file_is_the_ui_workflow_exported(path):
    api = load(WORKFLOWS / "api" / path.name)
    assert api == ui_to_api(load(path))


def test_generator_output_is_what_is_committed():
    spec = importlib.util.spec_from_file_location("build_workflows", ROOT / "tools" / "build_workflows.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    rendered = module.render()
    assert {str(p) for p in rendered} == {str(p.relative_to(ROOT)) for p in UI_FILES} | \
        {str((WORKFLOWS / "api" / p.name).relative_to(ROOT)) for p in UI_FILES}
    for rel, text in rendered.items():
        assert (ROOT / rel).read_text() == text, f"{rel} is stale: run python tools/build_workflows.py"


def test_readme_section_covers_every_workflow():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Using it in ComfyUI")[1].split("\n## ")[0]
    for path in UI_FILES:
        assert f"`{path.name}`" in section, path.name
    for display in NODE_DISPLAY_NAME_MAPPINGS.values():
        assert display in section, display
