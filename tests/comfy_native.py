"""ComfyUI's own model and KSampler on our tiny diffusers models, in-process, for parity tests.

ComfyUI's loaders detect a model from a real checkpoint and hard-code real widths, so they cannot load the tiny
test models. Here the unet_config that `comfy.model_detection.detect_unet_config` would give a checkpoint of the
same sizes is written from our diffusers config, ComfyUI picks its model config from it as its loader does, and
our weights, converted to the original layout by `to_original`, fill every tensor of ComfyUI's model.

Import it in ComfyUI's Python with COMFYUI_PATH naming the checkout (ComfyUI's code is used, never copied):

    patcher = comfy_model(folder)
    samples = ksampler(patcher, latent, seed=1, steps=4, cfg=2.0, sampler_name="euler", scheduler="normal",
                       positive=conditioning(text, pooled, guidance=3.5), negative=conditioning(...))

As a script it serves tests running in another Python: named cases in, one safetensors file of outputs back.

    COMFYUI_PATH=<checkout> <ComfyUI's python> tests/comfy_native.py <cases.json> <out.safetensors>

cases.json: {"tensors": <safetensors file of inputs>, "cases": [{"name", "kind", "model", ...}, ...]}; any value
{"tensor": key} in a case stands for that input tensor. Each case's outputs are saved as "<name>/<output>";
a case that raises is recorded in the file's metadata ("errors": {name: traceback}) and the others still run.
A new kind of case is a function (patcher, case) -> {output: tensor} added to CASE_KINDS.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

COMFY = Path(os.environ["COMFYUI_PATH"]).resolve()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(COMFY))  # ComfyUI's top-level modules (nodes, utils) before anything of ours
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))
if "comfy.cli_args" not in sys.modules:  # not inside a running ComfyUI: parse "--cpu" as main.py would
    _argv, sys.argv = sys.argv, [sys.argv[0], "--cpu"]
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses sys.argv on import)

    sys.argv = _argv

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import comfy.model_detection  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.samplers  # noqa: E402
from xdit_core.loading.key_mapping import to_original  # noqa: E402
from xdit_core.models.families import family_of_class, size_conditioned  # noqa: E402

# Tensors of ComfyUI's model that inference never reads, so our files have no value for them: PixArt's learned
# null caption (training's caption dropout).
UNUSED_AT_INFERENCE = {"pixart": {"y_embedder.y_embedding"}}


def _flux(config: dict[str, Any]) -> dict[str, Any]:
    heads = config["num_attention_heads"]
    # ComfyUI patchifies the 16-channel latent 2x2 itself; diffusers' in_channels count the packed channels.
    return dict(image_model="flux", in_channels=config["in_channels"] // 4, patch_size=2,
                out_channels=(config.get("out_channels") or config["in_channels"]) // 4,
                vec_in_dim=config["pooled_projection_dim"], context_in_dim=config["joint_attention_dim"],
                hidden_size=heads * config["attention_head_dim"], mlp_ratio=4.0, num_heads=heads,
                depth=config["num_layers"], depth_single_blocks=config["num_single_layers"],
                axes_dim=list(config["axes_dims_rope"]), theta=10000, qkv_bias=True,
                guidance_embed=bool(config.get("guidance_embeds")))


def _sd3(config: dict[str, Any]) -> dict[str, Any]:
    head_dim, hidden = config["attention_head_dim"], config["num_attention_heads"] * config["attention_head_dim"]
    if head_dim != 64:  # MMDiT: hidden_size = 64 * depth, num_heads = depth
        raise ValueError(f"ComfyUI's MMDiT has 64-wide heads; this SD3 has {head_dim}-wide ones and cannot be built "
                         "there (write the tiny model with heads=hidden_size/64, e.g. heads=2, hidden_size=128)")
    if config.get("qk_norm") not in (None, "rms_norm"):
        raise ValueError(f"ComfyUI's MMDiT has RMS q/k norms only, not {config['qk_norm']!r}")
    pos = config["pos_embed_max_size"]
    return dict(in_channels=config["in_channels"], patch_size=config["patch_size"],
                out_channels=config["out_channels"], depth=hidden // 64, num_blocks=config["num_layers"],
                input_size=None, adm_in_channels=config["pooled_projection_dim"],
                context_embedder_config={"target": "torch.nn.Linear", "params": {
                    "in_features": config["joint_attention_dim"], "out_features": config["caption_projection_dim"]}},
                num_patches=pos * pos, pos_embed_max_size=pos, pos_embed_scaling_factor=None,
                x_block_self_attn_layers=list(config.get("dual_attention_layers") or ()),
                **({"qk_norm": "rms"} if config.get("qk_norm") else {}))


def _pixart(config: dict[str, Any]) -> dict[str, Any]:
    # As ComfyUI's detection: the size embedders make pixart_alpha, their absence pixart_sigma. No
    # pe_interpolation: ComfyUI then derives the sin-cos grid from the latent size, as for checkpoints without a
    # pos_embed table (diffusers saves none). That grid is diffusers' only for sample sizes of 64 and up.
    micro = size_conditioned(config)
    return dict(image_model="pixart_alpha" if micro else "pixart_sigma", micro_condition=micro,
                num_heads=config["num_attention_heads"], hidden_size=config["num_attention_heads"] *
                config["attention_head_dim"], patch_size=config["patch_size"], in_channels=config["in_channels"],
                depth=config["num_layers"], caption_channels=config["caption_channels"], mlp_ratio=4.0,
                pred_sigma=config["out_channels"] == 2 * config["in_channels"])


# What ComfyUI's WanModel fixes rather than reads from a checkpoint: 128-wide heads (detection: dim // 128),
# umT5's 4096-wide states, 256 sinusoidal timestep features, CLIP vision states 1280 wide (Wan 2.1 I2V).
WAN_FIXED = {"attention_head_dim": 128, "text_dim": 4096, "freq_dim": 256, "patch_size": [1, 2, 2],
             "qk_norm": "rms_norm_across_heads", "cross_attn_norm": True, "eps": 1e-6}
WAN_CLIP_VISION_DIM = 1280


def _wan(config: dict[str, Any]) -> dict[str, Any]:
    # As ComfyUI's detection of a Wan checkpoint (head.modulation): the image embedder (img_emb) makes it "i2v",
    # its absence "t2v" (Wan 2.2 A14B I2V experts too); out_dim 48 then picks Wan 2.2 5B's config.
    have = {k: list(config[k]) if isinstance(v, list) else config.get(k) for k, v in WAN_FIXED.items()}
    wrong = {k: value for k, value in have.items() if value != WAN_FIXED[k]}
    if config.get("image_dim") not in (None, WAN_CLIP_VISION_DIM):
        wrong["image_dim"] = config["image_dim"]
    if wrong:
        raise ValueError(f"ComfyUI's WanModel fixes {WAN_FIXED} (and image_dim {WAN_CLIP_VISION_DIM}); this Wan has "
                         f"{wrong} and cannot be built there (write the tiny model with those sizes)")
    if config.get("pos_embed_seq_len"):
        raise ValueError("Wan first-last-frame models (pos_embed_seq_len) are not built here")
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    return dict(image_model="wan2.1", dim=dim, out_dim=config.get("out_channels") or config["in_channels"],
                num_heads=dim // 128, ffn_dim=config["ffn_dim"], num_layers=config["num_layers"], patch_size=(1, 2, 2),
                freq_dim=256, window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6,
                in_dim=config["in_channels"], model_type="i2v" if config.get("image_dim") else "t2v")


def _qwen(config: dict[str, Any]) -> dict[str, Any]:
    # ComfyUI's detection of a Qwen-Image checkpoint (txt_norm.weight) reads in_channels and num_layers; its model
    # takes the rest from its constructor's defaults (24 heads of 128, 3584-wide text, rotary axes 16/56/56), which a
    # tiny model's sizes replace here, as unet_config keys that constructor takes.
    return dict(image_model="qwen_image", in_channels=config["in_channels"], num_layers=config["num_layers"],
                patch_size=config["patch_size"], out_channels=config["out_channels"],
                attention_head_dim=config["attention_head_dim"], num_attention_heads=config["num_attention_heads"],
                joint_attention_dim=config["joint_attention_dim"], axes_dims_rope=tuple(config["axes_dims_rope"]))


UNET_CONFIGS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {"flux": _flux, "sd3": _sd3, "pixart": _pixart,
                                                                      "wan": _wan, "qwen": _qwen}


# What ComfyUI's HunYuanDiT fixes rather than reads from a config: the pooler's 1024-wide output (and so the extra
# embedder's input), 8 pooler heads (diffusers' too), layer norms with q/k norms, heads of at most 128 in multiples of 8.
HUNYUAN_POOLED_DIM = 1024


def _hunyuandit(config: dict[str, Any]) -> dict[str, Any]:
    # As ComfyUI's detection of a HunyuanDiT checkpoint (mlp_t5.0.weight): depth and width from the weights, hydit1 with
    # size and style conditioning (its test: extra_embedder's input 1024 + 6 * 256 + 1408, DiT-g/2's; the tiny model's
    # style width is its own), hydit (v1.2) without; the tiny sizes its constructor takes as unet_config keys.
    head_dim, heads = config["attention_head_dim"], config["num_attention_heads"]
    if config.get("pooled_projection_dim") != HUNYUAN_POOLED_DIM or head_dim % 8 or head_dim > 128:
        raise ValueError(f"ComfyUI's HunYuanDiT fixes a {HUNYUAN_POOLED_DIM}-wide pooler output and heads of at most "
                         f"128 in multiples of 8; this one has pooled_projection_dim "
                         f"{config.get('pooled_projection_dim')}, {head_dim}-wide heads")
    if config["hidden_size"] != heads * head_dim:
        raise ValueError("ComfyUI's HunYuanDiT has one width: hidden_size must be num_attention_heads x attention_head_dim")
    style = bool(config.get("use_style_cond_and_image_meta_size", True))
    return dict(image_model="hydit1" if style else "hydit", size_cond=style, use_style_cond=style,
                depth=config["num_layers"], hidden_size=config["hidden_size"], num_heads=heads,
                mlp_ratio=config["mlp_ratio"], in_channels=config["in_channels"], patch_size=config["patch_size"],
                learn_sigma=config["learn_sigma"], text_states_dim=config["cross_attention_dim"],
                text_states_dim_t5=config["cross_attention_dim_t5"], text_len=config["text_len"],
                text_len_t5=config["text_len_t5"], qk_norm=True, norm="layer")


UNET_CONFIGS["hunyuandit"] = _hunyuandit


def read_diffusers(folder: str | Path) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """(family, config, tensors by diffusers name) of a diffusers model folder."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    tensors = {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    return family_of_class(config.get("_class_name")), config, tensors


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], unused: set[str]) -> None:
    """Load `state` into `model`; ValueError unless every tensor but `unused` is filled, with its own shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state) - unused)
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(f"{k}: ours {list(state[k].shape)}, ComfyUI's {list(own[k].shape)}"
                   for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(f"our weights do not fit ComfyUI's {type(model).__name__}: missing {missing}, "
                         f"unexpected {unexpected}, other shape {wrong}")
    model.load_state_dict(state, strict=False)


def comfy_model(folder: str | Path) -> comfy.model_patcher.ModelPatcher:
    """ComfyUI's own model of a diffusers folder (Flux dev/schnell, SD3, PixArt alpha/sigma, Wan 2.1 T2V/I2V and
    2.2 TI2V 5B at ComfyUI's fixed widths: see WAN_FIXED; Qwen-Image), fp32 on the CPU."""
    family, config, tensors = read_diffusers(folder)
    model_config = comfy.model_detection.model_config_from_unet_config(UNET_CONFIGS[family](config))
    if model_config is None:
        raise ValueError(f"ComfyUI matched no model config to the {family} model {folder}")
    model_config.set_inference_dtype(torch.float32, None)
    device = comfy.model_management.get_torch_device()
    model = model_config.get_model({}, device=device)
    state = model_config.process_unet_state_dict(to_original(family, tensors))
    load_strict(model.diffusion_model, state, UNUSED_AT_INFERENCE.get(family, set()))
    return comfy.model_patcher.ModelPatcher(model.eval(), load_device=device,
                                            offload_device=comfy.model_management.unet_offload_device())


def conditioning(text: torch.Tensor, pooled: Optional[torch.Tensor] = None,
                 guidance: Optional[float] = None) -> list:
    """ComfyUI CONDITIONING of one entry. Flux reads `guidance` per entry, 3.5 where an entry has none."""
    extra = {k: v for k, v in (("pooled_output", pooled), ("guidance", guidance)) if v is not None}
    return [[text, extra]]


def ksampler(patcher: comfy.model_patcher.ModelPatcher, latent: torch.Tensor, *, seed: int, steps: int, cfg: float,
             sampler_name: str, scheduler: str, positive: list, negative: list, denoise: float = 1.0,
             noise_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ComfyUI's KSampler node (nodes.common_ksampler, without previews): a LATENT's tensor (and noise_mask) in,
    the sampled one out."""
    latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                               denoise=denoise, noise_mask=noise_mask, disable_pbar=True, seed=seed)


def _branch(spec: dict[str, Any]) -> list:
    return conditioning(spec["text"], spec.get("pooled"), spec.get("guidance"))


def lora_loader(patcher: comfy.model_patcher.ModelPatcher, path: str, strength: float) -> comfy.model_patcher.ModelPatcher:
    """ComfyUI's LoraLoaderModelOnly node on `path` (its folder registered as one of ComfyUI's loras folders)."""
    import folder_paths
    from nodes import LoraLoaderModelOnly  # ComfyUI's nodes.py (first on the path)

    folder_paths.add_model_folder_path("loras", str(Path(path).parent))
    return LoraLoaderModelOnly().load_lora_model_only(patcher, Path(path).name, strength)[0]


def ksampler_case(patcher: comfy.model_patcher.ModelPatcher, case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Case keys: latent, seed, steps, cfg, sampler_name, scheduler, denoise (optional), positive and negative
    as {"text", "pooled" (optional), "guidance" (optional)}, loras (optional: [[file, strength], ...], each
    through ComfyUI's LoraLoaderModelOnly)."""
    for path, strength in case.get("loras", []):
        patcher = lora_loader(patcher, path, strength)
    samples = ksampler(patcher, case["latent"], seed=case["seed"], steps=case["steps"], cfg=case["cfg"],
                       sampler_name=case["sampler_name"], scheduler=case["scheduler"],
                       positive=_branch(case["positive"]), negative=_branch(case["negative"]),
                       denoise=case.get("denoise", 1.0))
    return {"samples": samples}


def ksampler_advanced_case(patcher: comfy.model_patcher.ModelPatcher, case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ComfyUI's KSamplerAdvanced nodes chained, each stage's LATENT into the next. Case keys as "ksampler" (no
    denoise), plus stages: [{"add_noise", "start_at_step", "end_at_step", "return_with_leftover_noise"}, ...]
    with the nodes' own values ("enable"/"disable")."""
    from nodes import KSamplerAdvanced  # ComfyUI's nodes.py (first on the path)

    latent, out = {"samples": case["latent"]}, {}
    for i, stage in enumerate(case["stages"]):
        (latent,) = KSamplerAdvanced().sample(patcher, stage["add_noise"], case["seed"], case["steps"], case["cfg"],
                                              case["sampler_name"], case["scheduler"], _branch(case["positive"]),
                                              _branch(case["negative"]), latent, stage["start_at_step"],
                                              stage["end_at_step"], stage["return_with_leftover_noise"])
        out[f"stage{i}"] = latent["samples"]
    return out


def xdit_advanced_case(patcher: comfy.model_patcher.ModelPatcher, case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Our xDiT Sampler (Advanced) nodes chained on the workers, on our model folder: keys as "ksampler_advanced"
    plus "mesh" (the xDiT Parallel Mesh's degrees)."""
    nodes = plugin().nodes
    xdit = nodes.loader.XDiTLoadModel().load(str(case["model"]), "fp32", "auto", "auto")[0]
    mesh = nodes.types.XDiTMesh("manual", **case["mesh"])
    latent, out = {"samples": case["latent"]}, {}
    for i, stage in enumerate(case["stages"]):
        (latent,) = nodes.sampler.XDiTSamplerAdvanced().sample(
            xdit, mesh, stage["add_noise"], case["seed"], case["steps"], case["cfg"], case["sampler_name"],
            case["scheduler"], _branch(case["positive"]), _branch(case["negative"]), latent, stage["start_at_step"],
            stage["end_at_step"], stage["return_with_leftover_noise"])
        out[f"stage{i}"] = latent["samples"]
    return out


def plugin():
    """This repository as ComfyUI loads a custom node (a package named after its folder, by path)."""
    import importlib.util

    if "comfyui_xdit" not in sys.modules:
        spec = importlib.util.spec_from_file_location("comfyui_xdit", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["comfyui_xdit"] = module
        spec.loader.exec_module(module)
    return sys.modules["comfyui_xdit"]


def xdit_guider(folder: str, mesh: dict[str, Any], positive: list, negative: list, cfg: float, shift: Optional[float]):
    """(guider, MODEL) as a workflow builds them: xDiT Load Diffusion Model -> xDiT Model for ComfyUI Samplers
    (-> ModelSamplingFlux/SD3 for a shift) -> xDiT Guider, on an xDiT Parallel Mesh of `mesh`'s degrees."""
    nodes = plugin().nodes
    xdit = nodes.loader.XDiTLoadModel().load(str(folder), "fp32", "auto", "auto")[0]
    model = nodes.comfy_model.XDiTSamplingModel().build(xdit)[0]
    if shift is not None:
        model = shifted(model, shift)
    guider = nodes.guider.XDiTGuider().get_guider(model, nodes.types.XDiTMesh("manual", **mesh), positive, negative,
                                                   cfg)[0]
    return guider, model


def shifted(model: comfy.model_patcher.ModelPatcher, shift: float) -> comfy.model_patcher.ModelPatcher:
    """ComfyUI's ModelSamplingSD3 node (a flow model's shift), on any MODEL."""
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3

    return ModelSamplingSD3().patch(model, shift)[0]


def ksampler_on_weightless_case(patcher: comfy.model_patcher.ModelPatcher,
                                case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ComfyUI's KSampler on the xDiT Model for ComfyUI Samplers' MODEL: it must refuse, saying what to use."""
    nodes = plugin().nodes
    xdit = nodes.loader.XDiTLoadModel().load(str(case["model"]), "fp32", "auto", "auto")[0]
    weightless = nodes.comfy_model.XDiTSamplingModel().build(xdit)[0]
    ksampler_case(weightless, case)
    return {}


def custom_sampler_case(patcher: comfy.model_patcher.ModelPatcher, case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """SamplerCustomAdvanced with RandomNoise, KSamplerSelect and BasicScheduler (on the guider's MODEL). Case keys:
    latent, seed, steps, cfg, sampler_name, scheduler, positive, negative, optional shift and noise_mask, and
    "guider": "comfy" (CFGGuider on ComfyUI's model) or {"mesh": {...}} (the xDiT Guider on our model folder)."""
    positive, negative = _branch(case["positive"]), _branch(case["negative"])
    if case["guider"] == "comfy":
        model = patcher if case.get("shift") is None else shifted(patcher, case["shift"])
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(case["cfg"])
    else:
        guider, model = xdit_guider(case["model"], case["guider"]["mesh"], positive, negative, case["cfg"],
                                    case.get("shift"))
    latent = {"samples": case["latent"]}
    if case.get("noise_mask") is not None:
        latent["noise_mask"] = case["noise_mask"]
    return sampler_custom_advanced(guider, model, case, latent)


def sampler_custom_advanced(guider, model: comfy.model_patcher.ModelPatcher, case: dict[str, Any],
                            latent: dict) -> dict[str, torch.Tensor]:
    """SamplerCustomAdvanced with RandomNoise(seed), KSamplerSelect(sampler_name) and BasicScheduler(scheduler,
    steps) on `model`: {"samples", "denoised", "sigmas"}."""
    from comfy_extras.nodes_custom_sampler import (BasicScheduler, KSamplerSelect, Noise_RandomNoise,
                                                   SamplerCustomAdvanced)

    sigmas = BasicScheduler().get_sigmas(model, case["scheduler"], case["steps"], 1.0)[0]
    sampler = KSamplerSelect().get_sampler(case["sampler_name"])[0]
    out, denoised = SamplerCustomAdvanced().sample(Noise_RandomNoise(case["seed"]), guider, sampler, sigmas, latent)
    return {"samples": out["samples"], "denoised": denoised["samples"], "sigmas": sigmas}


class StandInVAE:
    """A VAE for ComfyUI's Wan latent nodes where no real one exists: `encode` checks the pixels it is given
    ([frames, height, width, 3], as the node prepares them) and returns the fixed `latent`."""

    def __init__(self, latent: torch.Tensor, pixels: tuple[int, ...]):
        self.latent, self.pixels = latent, tuple(pixels)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        if tuple(pixels.shape) != self.pixels:
            raise ValueError(f"the node encoded pixels of shape {list(pixels.shape)}, expected {list(self.pixels)}")
        return self.latent.clone()


class ClipVisionOutput:
    """CLIP Vision Encode's output as ComfyUI's Wan 2.1 I2V model reads it (the penultimate hidden states)."""

    def __init__(self, penultimate_hidden_states: torch.Tensor):
        self.penultimate_hidden_states = penultimate_hidden_states


def wan_inputs(case: dict[str, Any]) -> tuple[list, list, dict]:
    """(positive, negative, LATENT) from ComfyUI's own Wan nodes. Case keys: positive and negative {"text"};
    "node": EmptyHunyuanLatentVideo (T2V), WanImageToVideo (I2V: "vae_latent" [1, 16, frames, h, w] the VAE
    stand-in's encoding of the start image, optional "clip_vision" [1, 257, 1280]) or Wan22ImageToVideoLatent
    (TI2V 5B: "vae_latent" [1, 48, 1, h, w]); width, height, length (pixels, frames) and "start_image"
    [1, height, width, 3] for the image nodes."""
    from comfy_extras.nodes_hunyuan import EmptyHunyuanLatentVideo
    from comfy_extras.nodes_wan import Wan22ImageToVideoLatent, WanImageToVideo

    positive, negative = _branch(case["positive"]), _branch(case["negative"])
    size = dict(width=case["width"], height=case["height"], length=case["length"], batch_size=1)
    if case["node"] == "EmptyHunyuanLatentVideo":
        (latent,) = EmptyHunyuanLatentVideo().generate(**size)
    elif case["node"] == "WanImageToVideo":
        vae = StandInVAE(case["vae_latent"], (case["length"], case["height"], case["width"], 3))
        clip = case.get("clip_vision")
        positive, negative, latent = WanImageToVideo.execute(
            positive, negative, vae, start_image=case["start_image"],
            clip_vision_output=None if clip is None else ClipVisionOutput(clip), **size).args
    elif case["node"] == "Wan22ImageToVideoLatent":
        vae = StandInVAE(case["vae_latent"], tuple(case["start_image"].shape))
        (latent,) = Wan22ImageToVideoLatent.execute(vae, start_image=case["start_image"], **size).args
    else:
        raise ValueError(f"unknown Wan latent node {case['node']!r}")
    return positive, negative, latent


def wan_video_case(patcher: comfy.model_patcher.ModelPatcher, case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """ComfyUI's Wan nodes (wan_inputs) give the conditioning and LATENT; then "sampler": "comfy" (KSampler on
    ComfyUI's model), {"mesh": {...}} (our xDiT Sampler node on our model folder), "comfy_guider" (CFGGuider on
    ComfyUI's model) or {"guider_mesh": {...}} (the xDiT Guider), the last two through SamplerCustomAdvanced;
    with seed, steps, cfg, sampler_name, scheduler. Outputs the samples and what the nodes made: the LATENT ("latent", "noise_mask")
    and the positive's start image keys ("concat_latent_image", "concat_mask")."""
    positive, negative, latent = wan_inputs(case)
    if case["sampler"] == "comfy":
        samples = ksampler(patcher, latent["samples"], seed=case["seed"], steps=case["steps"], cfg=case["cfg"],
                           sampler_name=case["sampler_name"], scheduler=case["scheduler"], positive=positive,
                           negative=negative, noise_mask=latent.get("noise_mask"))
    elif case["sampler"] == "comfy_guider":  # CFGGuider on ComfyUI's model through SamplerCustomAdvanced
        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_conds(positive, negative)
        guider.set_cfg(case["cfg"])
        samples = sampler_custom_advanced(guider, patcher, case, latent)["samples"]
    elif "guider_mesh" in case["sampler"]:  # the xDiT Guider on the workers, the same way
        guider, model = xdit_guider(case["model"], case["sampler"]["guider_mesh"], positive, negative, case["cfg"],
                                    None)
        samples = sampler_custom_advanced(guider, model, case, latent)["samples"]
    else:
        nodes = plugin().nodes
        xdit = nodes.loader.XDiTLoadModel().load(str(case["model"]), "fp32", "auto", "auto")[0]
        mesh = nodes.types.XDiTMesh("manual", **case["sampler"]["mesh"])
        samples = nodes.sampler.XDiTSampler().sample(xdit, mesh, positive, negative, latent, case["seed"],
                                                     case["steps"], case["cfg"], case["sampler_name"],
                                                     case["scheduler"], 1.0)[0]["samples"]
    out = {"samples": samples, "latent": latent["samples"]}
    if latent.get("noise_mask") is not None:
        out["noise_mask"] = latent["noise_mask"]
    out.update({k: positive[0][1][k] for k in ("concat_latent_image", "concat_mask") if k in positive[0][1]})
    return out


def reference_case(patcher: comfy.model_patcher.ModelPatcher, case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """An edit model's run (FLUX.1 Kontext, Qwen-Image-Edit): each branch's conditioning through ComfyUI's
    ReferenceLatent node once per reference LATENT (chained, as a workflow appends them; TextEncodeQwenImageEdit sets
    the same key the same way) and, with "method", FluxKontextMultiReferenceLatentMethod; then "sampler": "comfy"
    (KSampler on ComfyUI's model) or {"mesh": {...}} (our xDiT Sampler node on our model folder). Case keys: latent,
    references (LATENT tensors, [1, 16, h, w] or Qwen's [1, 16, 1, h, w]), method (optional), seed, steps, cfg,
    sampler_name, scheduler, positive, negative, and xdit_model (optional: the file or folder our node loads, else
    model). Outputs the samples and the positive's reference_latents as set."""
    from comfy_extras.nodes_edit_model import ReferenceLatent
    from comfy_extras.nodes_flux import FluxKontextMultiReferenceLatentMethod

    branches = {}
    for which in ("positive", "negative"):
        cond = _branch(case[which])
        for ref in case.get("references", []):
            cond = ReferenceLatent.execute(cond, {"samples": ref}).args[0]
        if case.get("method"):
            cond = FluxKontextMultiReferenceLatentMethod.execute(cond, case["method"]).args[0]
        branches[which] = cond
    if case["sampler"] == "comfy":
        samples = ksampler(patcher, case["latent"], seed=case["seed"], steps=case["steps"], cfg=case["cfg"],
                           sampler_name=case["sampler_name"], scheduler=case["scheduler"],
                           positive=branches["positive"], negative=branches["negative"])
    else:
        nodes = plugin().nodes
        xdit = nodes.loader.XDiTLoadModel().load(str(case.get("xdit_model", case["model"])), "fp32", "auto",
                                                 "auto")[0]
        mesh = nodes.types.XDiTMesh("manual", **case["sampler"]["mesh"])
        samples = nodes.sampler.XDiTSampler().sample(xdit, mesh, branches["positive"], branches["negative"],
                                                     {"samples": case["latent"]}, case["seed"], case["steps"],
                                                     case["cfg"], case["sampler_name"], case["scheduler"],
                                                     1.0)[0]["samples"]
    refs = branches["positive"][0][1].get("reference_latents", [])
    return {"samples": samples, **{f"positive_reference{i}": r.clone() for i, r in enumerate(refs)}}


def hunyuan_conditioning(branch: dict[str, Any]) -> list:
    """CONDITIONING as ComfyUI's HunyuanDiT text encoder gives it (comfy.text_encoders.hydit): the CLIP-BERT states as
    the tensor, its pooled output, the mT5-XL states and both encoders' attention masks."""
    return [[branch["text"], {"pooled_output": branch["pooled"], "attention_mask": branch["attention_mask"],
                              "conditioning_mt5xl": branch["t5"], "attention_mask_mt5xl": branch["t5_mask"]}]]


def hunyuan_case(patcher: comfy.model_patcher.ModelPatcher, case: dict[str, Any]) -> dict[str, torch.Tensor]:
    """HunyuanDiT from its text encoder's CONDITIONING (hunyuan_conditioning: positive and negative as {"text",
    "pooled", "attention_mask", "t5", "t5_mask"}), then "sampler": "comfy" (KSampler on ComfyUI's model) or
    {"mesh": {...}} (our xDiT Sampler node on our model, case["xdit_model"] or the folder). Case keys: latent, seed,
    steps, cfg, sampler_name, scheduler, denoise (optional)."""
    positive, negative = hunyuan_conditioning(case["positive"]), hunyuan_conditioning(case["negative"])
    denoise = case.get("denoise", 1.0)
    if case["sampler"] == "comfy":
        samples = ksampler(patcher, case["latent"], seed=case["seed"], steps=case["steps"], cfg=case["cfg"],
                           sampler_name=case["sampler_name"], scheduler=case["scheduler"], positive=positive,
                           negative=negative, denoise=denoise)
    else:
        nodes = plugin().nodes
        xdit = nodes.loader.XDiTLoadModel().load(str(case.get("xdit_model", case["model"])), "fp32", "auto",
                                                 "auto")[0]
        mesh = nodes.types.XDiTMesh("manual", **case["sampler"]["mesh"])
        samples = nodes.sampler.XDiTSampler().sample(xdit, mesh, positive, negative, {"samples": case["latent"]},
                                                     case["seed"], case["steps"], case["cfg"], case["sampler_name"],
                                                     case["scheduler"], denoise)[0]["samples"]
    return {"samples": samples}


CASE_KINDS: dict[str, Callable[[comfy.model_patcher.ModelPatcher, dict[str, Any]], dict[str, torch.Tensor]]] = {
    "ksampler": ksampler_case,
    "custom_sampler": custom_sampler_case,
    "ksampler_advanced": ksampler_advanced_case,
    "xdit_advanced": xdit_advanced_case,
    "ksampler_on_weightless": ksampler_on_weightless_case,
    "wan_video": wan_video_case,
    "reference": reference_case,
    "hunyuan": hunyuan_case,
}


def resolve(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` with every {"tensor": key} replaced by that input tensor."""
    if isinstance(value, dict):
        if set(value) == {"tensor"}:
            return tensors[value["tensor"]]
        return {k: resolve(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, tensors) for v in value]
    return value


def run_cases(cases: list[dict[str, Any]], tensors: dict[str, torch.Tensor]
              ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """(outputs as "<name>/<output>", errors by case name, ComfyUI's model config class by model folder).
    Each model folder is built once."""
    outputs, errors, classes, models = {}, {}, {}, {}
    for case in cases:
        name = case["name"]
        try:
            if case["model"] not in models:
                models[case["model"]] = comfy_model(case["model"])
                classes[case["model"]] = type(models[case["model"]].model.model_config).__name__
            with torch.inference_mode():
                result = CASE_KINDS[case["kind"]](models[case["model"]], resolve(case, tensors))
            outputs.update({f"{name}/{k}": v.contiguous() for k, v in result.items()})
        except Exception:
            errors[name] = traceback.format_exc()
    return outputs, errors, classes


def main(argv: list[str]) -> None:
    cases_path, out_path = argv
    spec = json.loads(Path(cases_path).read_text())
    tensors = load_file(spec["tensors"]) if spec.get("tensors") else {}
    try:
        outputs, errors, classes = run_cases(spec["cases"], tensors)
    finally:
        if "comfyui_xdit" in sys.modules:  # the xDiT cases started a worker pool
            from xdit_core import api

            api.unload()
    import comfyui_version

    save_file(outputs, out_path, metadata={"errors": json.dumps(errors), "model_configs": json.dumps(classes),
                                           "comfyui_version": comfyui_version.__version__, "torch": torch.__version__})


if __name__ == "__main__":
    main(sys.argv[1:])
