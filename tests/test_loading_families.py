"""Single files of Z-Image, FLUX.2 and HunyuanDiT in the layouts ComfyUI users have (Comfy-Org's
z_image_turbo_bf16.safetensors and flux2_dev_*.safetensors, ComfyUI's hunyuan_dit_1.2.safetensors: the original
layouts, bare in diffusion_models or under `model.diffusion_model.` in an all-in-one checkpoint; bf16, fp8 and
ComfyUI's scaled fp8) load to the diffusers folder's parameters; our mapping equals diffusers' own single-file
converters where they exist (Z-Image, FLUX.2) and round-trips; real-size files get the shipped configs."""
import json

import pytest
import torch
from safetensors.torch import save_file

from xdit_core.cli.generate import GenerateOptions, generate
from xdit_core.cli.tiny import write_tiny
from xdit_core.errors import XDiTModelError
from xdit_core.loading.key_mapping import diffusers_name, layout_rules, model_tensors, split, to_original
from xdit_core.loading.load import ModelParts, load_model, read_model_config
from xdit_core.loading.original_layout import (config_from_shapes, detect_diffusers_family, detect_layout,
                                               diffusers_file_config, shipped_configs)
from xdit_core.models.families import model_class, resolve_model_spec
from xdit_core.models.fp8 import Fp8Weight

AIO = "model.diffusion_model."
# Other components of an all-in-one checkpoint, which the loader must leave alone.
AIO_EXTRAS = {"text_encoders.qwen3_4b.transformer.model.norm.weight": torch.ones(4),
              "vae.decoder.conv_out.bias": torch.zeros(3)}
# The shipped real-size configs this file checks (tests/test_loading.py counts them covered).
COVERED_CONFIGS = ("z-image-turbo", "flux2-dev", "hunyuandit-v1.2")
# name: (family, write_tiny options)
MODELS = {"zimage": ("zimage", {}), "flux2_dev": ("flux2", {"variant": "dev"}),
          "flux2_klein": ("flux2", {"variant": "klein"}), "hunyuandit": ("hunyuandit", {"variant": "v1.2"}),
          "hunyuandit_v1.1": ("hunyuandit", {"variant": "v1.1"})}
E4M3_MAX = 448.0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: write_tiny(family, root / name, seed=i + 1, **options)
            for i, (name, (family, options)) in enumerate(MODELS.items())}


@pytest.fixture(scope="module")
def references(folders):
    """Each model as diffusers' own from_pretrained loads it."""
    return {name: model_class(MODELS[name][0]).from_pretrained(folder, low_cpu_mem_usage=False).eval()
            for name, folder in folders.items()}


def write_file(path, family, reference, prefix="", extras=None, cast=None):
    """The model as one original-layout file (our reverse mapping); returns what was stored (unprefixed)."""
    stored = {}
    for k, v in to_original(family, model_tensors(reference)).items():
        stored.update(cast(k, v) if cast else {k: v})
    save_file({**{prefix + k: v.contiguous() for k, v in stored.items()}, **(extras or {})}, str(path))
    return stored


def assert_same_tensors(model, reference, dtype=None):
    ours, theirs = model_tensors(model), model_tensors(reference)
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        t = t if dtype is None else t.to(dtype)
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name


def assert_loads_as(path, family, expected):
    """The file upcast at load holds exactly `expected` (original names -> float values); returns the model."""
    model, spec = load_model(path, "fp32", keep_fp8=False)
    assert spec.family == family
    loaded = to_original(family, model_tensors(model))
    assert loaded.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k
    return model


# --- the mapping -----------------------------------------------------------------------------------------------

def _converter(family):
    from diffusers.loaders import single_file_utils as sfu

    return {"zimage": sfu.convert_z_image_transformer_checkpoint_to_diffusers,
            "flux2": sfu.convert_flux2_transformer_checkpoint_to_diffusers}[family]


@pytest.mark.parametrize("name", ["zimage", "flux2_dev", "flux2_klein"])
def test_our_mapping_equals_diffusers_converter(name, references):
    """diffusers' single-file converter turns our original-layout tensors back into the model's own, exactly: our
    tables are its inverse (fused q/k/v, FLUX.2's swapped final scale/shift, Z-Image's "2-1" keys)."""
    family = MODELS[name][0]
    theirs = references[name].state_dict()
    original = to_original(family, theirs)
    assert set(original).isdisjoint(theirs) or family == "zimage"  # Z-Image keeps most names
    converted = _converter(family)({k: v.clone() for k, v in original.items()})
    assert converted.keys() == theirs.keys()
    for k, v in theirs.items():
        assert torch.equal(converted[k], v), k
    if family == "zimage":  # as ComfyUI's files: under the all-in-one prefix, with Lumina 2's unused norm_final
        prefixed = {AIO + k: v.clone() for k, v in original.items()}
        prefixed[AIO + "norm_final.weight"] = torch.ones(3)
        assert _converter(family)(prefixed).keys() == theirs.keys()


@pytest.mark.parametrize("name", list(MODELS))
def test_mapping_round_trips(name, references):
    """to_original then the rules' split gives every diffusers tensor back, and each original name maps back to its
    diffusers module (for messages)."""
    family = MODELS[name][0]
    theirs = model_tensors(references[name])
    original = to_original(family, theirs)
    shapes = {k: tuple(v.shape) for k, v in theirs.items()}
    back = {}
    for rule in layout_rules(family, list(shapes)):
        back.update(split(rule, original[rule.original], shapes))
        assert diffusers_name(family, rule.original) == rule.parts[0]
    assert back.keys() == theirs.keys()
    assert all(torch.equal(back[k], v) for k, v in theirs.items())


# ComfyUI's HunyuanDiT (comfy/ldm/hydit/models.py, attn_layers.py, poolers.py; mmdit's PatchEmbed, TimestepEmbedder,
# Mlp): its tensors for the tiny model's 6 blocks (skip layers: layer > depth // 2), v1.2 and (size_cond, style) v1.1.
HYDIT_BLOCK = ["norm1", "attn1.Wqkv", "attn1.q_norm", "attn1.k_norm", "attn1.out_proj", "norm2", "mlp.fc1", "mlp.fc2",
               "default_modulation.1", "attn2.q_proj", "attn2.kv_proj", "attn2.q_norm", "attn2.k_norm",
               "attn2.out_proj", "norm3"]
HYDIT_GLOBAL = ["mlp_t5.0", "mlp_t5.2", "pooler.k_proj", "pooler.q_proj", "pooler.v_proj", "pooler.c_proj",
                "x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "extra_embedder.0", "extra_embedder.2",
                "final_layer.linear", "final_layer.adaLN_modulation.1"]


@pytest.mark.parametrize("name", ["hunyuandit", "hunyuandit_v1.1"])
def test_hunyuandit_original_names_are_comfyuis(name, references):
    expected = {"text_embedding_padding", "pooler.positional_embedding"}
    expected |= {f"{m}.{p}" for m in HYDIT_GLOBAL for p in ("weight", "bias")}
    depth = 6
    for i in range(depth):
        modules = HYDIT_BLOCK + (["skip_norm", "skip_linear"] if i > depth // 2 else [])
        expected |= {f"blocks.{i}.{m}.{p}" for m in modules for p in ("weight", "bias")}
    if name == "hunyuandit_v1.1":
        expected.add("style_embedder.weight")
    assert set(to_original("hunyuandit", model_tensors(references[name]))) == expected


def test_hunyuandit_fused_and_renamed_tensors(references):
    """Wqkv is q, k, v stacked; kv_proj is k then v (ComfyUI views it [.., 2, heads, head_dim]); the cross-attention's
    norm is the original's norm3 and the FFN's its norm2; the final adaLN is (shift, scale)."""
    m = references["hunyuandit"]
    original = to_original("hunyuandit", model_tensors(m))
    b = m.blocks[4]
    assert torch.equal(original["blocks.4.attn1.Wqkv.weight"],
                       torch.cat([b.attn1.to_q.weight, b.attn1.to_k.weight, b.attn1.to_v.weight]))
    assert torch.equal(original["blocks.4.attn2.kv_proj.bias"], torch.cat([b.attn2.to_k.bias, b.attn2.to_v.bias]))
    assert torch.equal(original["blocks.4.norm3.weight"], b.norm2.weight)  # before the cross-attention
    assert torch.equal(original["blocks.4.norm2.weight"], b.norm3.weight)  # before the FFN
    assert torch.equal(original["blocks.4.skip_linear.weight"], b.skip_linear.weight)
    scale, shift = m.norm_out.linear.weight.chunk(2)
    assert torch.equal(original["final_layer.adaLN_modulation.1.weight"], torch.cat([shift, scale]))


# --- loading ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["bare", "aio"])
@pytest.mark.parametrize("name", list(MODELS))
def test_single_file_loads_like_the_folder(name, where, folders, references, tmp_path):
    family = MODELS[name][0]
    path = tmp_path / f"{name}_{where}.safetensors"
    prefix, extras = (AIO, AIO_EXTRAS) if where == "aio" else ("", None)
    write_file(path, family, references[name], prefix, extras)
    folder_spec = resolve_model_spec(read_model_config(folders[name]))
    assert detect_layout(list(to_original(family, model_tensors(references[name]))))[0] == family
    model, spec = load_model(path)
    assert_same_tensors(model, references[name])
    assert spec == folder_spec
    config, theirs = read_model_config(path), references[name].config
    for key, value in config.items():
        if key not in ("_class_name", "sample_size", "axes_lens"):  # not in the weights; unused / not reached here
            assert value == (list(theirs[key]) if isinstance(theirs[key], tuple) else theirs[key]), key


def test_single_files_sample_like_the_folder(folders, references, tmp_path):
    """Two steps of the engine from the folder and from the bare file: the same latent, bit for bit."""
    for name in ("zimage", "flux2_dev", "hunyuandit"):
        family = MODELS[name][0]
        path = tmp_path / f"{name}.safetensors"
        write_file(path, family, references[name])
        size = 32 if family == "flux2" else 16
        outputs = [generate(GenerateOptions(model=str(p), height=size, width=2 * size, steps=2, seed=3))[0]
                   for p in (folders[name], path)]
        assert torch.equal(outputs[0], outputs[1]), name


@pytest.mark.parametrize("name", ["zimage", "flux2_dev", "hunyuandit"])
def test_bf16_file_loads_its_values(name, references, tmp_path):
    family = MODELS[name][0]
    path = tmp_path / f"{name}_bf16.safetensors"
    write_file(path, family, references[name], AIO, AIO_EXTRAS, cast=lambda k, v: {k: v.to(torch.bfloat16)})
    model, _ = load_model(path, "bf16")
    assert_same_tensors(model, references[name], torch.bfloat16)
    model, _ = load_model(path, "fp32")  # upcast at load: the stored bf16 values, exactly
    for k, t in model_tensors(references[name]).items():
        assert torch.equal(model_tensors(model)[k], t.to(torch.bfloat16).float()), k


def _scaled_fp8(k, v):
    """ComfyUI's scaled fp8: a Linear weight as e4m3fn of weight / scale, its float32 scale beside it."""
    if not (k.endswith(".weight") and v.dim() == 2):
        return {k: v.to(torch.bfloat16)}
    scale = v.abs().max().float() / E4M3_MAX
    return {k: (v / scale).to(torch.float8_e4m3fn), k[: -len("weight")] + "scale_weight": scale}


def _fp8(k, v):
    return {k: v.to(torch.float8_e4m3fn if k.endswith(".weight") and v.dim() == 2 else torch.bfloat16)}


@pytest.mark.parametrize("kind", ["fp8_e4m3fn", "fp8_scaled"])
@pytest.mark.parametrize("name", ["zimage", "flux2_dev", "hunyuandit"])
def test_fp8_file_loads_its_values(name, kind, references, tmp_path):
    """fp8 Linear weights (the rest bf16) and ComfyUI's scaled fp8 (the scaled_fp8 marker, a scale_weight per weight):
    every weight the stored fp8 value (times its scale), fused q/k/v split with their one scale; kept fp8 on the
    device, the same values."""
    family = MODELS[name][0]
    path = tmp_path / f"{name}_{kind}.safetensors"
    extras = dict(AIO_EXTRAS)
    if kind == "fp8_scaled":
        extras[AIO + "scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    stored = write_file(path, family, references[name], AIO, extras, _scaled_fp8 if kind == "fp8_scaled" else _fp8)
    expected = {}
    for k, v in stored.items():
        if not k.endswith(".scale_weight"):
            scale = stored.get(k[: -len("weight")] + "scale_weight")
            expected[k] = v.float() * scale if scale is not None else v.float()
    model = assert_loads_as(path, family, expected)
    kept, _ = load_model(path, "fp32")
    held = [n for n, t in model_tensors(kept).items() if isinstance(t, Fp8Weight)]
    assert held and all(torch.equal(model_tensors(kept)[n], model_tensors(model)[n]) for n in held)


def _comfy_quant(fmt: str) -> torch.Tensor:
    return torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)


def _fp8mixed(k, v):
    """ComfyUI's mixed precision (comfy-kitchen's layout, as Comfy-Org's *_fp8mixed.safetensors): the blocks' Linear
    weights as e4m3fn with a float32 weight_scale, an input_scale and the layer's format in a uint8 comfy_quant
    tensor; everything else (embedders, modulations, the head: "mixed") bf16."""
    if not (k.endswith(".weight") and v.dim() == 2 and k.startswith(("layers.", "double_blocks.", "single_blocks.",
                                                                     "blocks."))):
        return {k: v.to(torch.bfloat16)}
    stem = k[: -len(".weight")]
    scale = v.abs().max().float() / E4M3_MAX
    return {k: (v / scale).to(torch.float8_e4m3fn), f"{stem}.weight_scale": scale,
            f"{stem}.input_scale": torch.tensor(1.0), f"{stem}.comfy_quant": _comfy_quant("float8_e4m3fn")}


@pytest.mark.parametrize("where", ["bare", "aio"])
@pytest.mark.parametrize("name", ["zimage", "flux2_dev", "hunyuandit"])
def test_fp8mixed_file_loads_its_values(name, where, references, tmp_path):
    """flux2_dev_fp8mixed-style files: every quantized weight is its fp8 value times its weight_scale (fused q/k/v
    split with their one scale), kept fp8 on the device with that scale, the bf16 rest as stored; the format and
    input scales are no weights."""
    family = MODELS[name][0]
    path = tmp_path / f"{name}_fp8mixed_{where}.safetensors"
    prefix, extras = (AIO, AIO_EXTRAS) if where == "aio" else ("", None)
    stored = write_file(path, family, references[name], prefix, extras, _fp8mixed)
    expected = {k: v.float() * stored[k[: -len("weight")] + "weight_scale"] if v.dtype == torch.float8_e4m3fn
                else v.float() for k, v in stored.items() if not k.endswith(("_scale", ".comfy_quant"))}
    assert any(v.dtype == torch.float8_e4m3fn for v in stored.values())
    assert read_model_config(path) == read_model_config(_plain(tmp_path, family, references[name]))
    model = assert_loads_as(path, family, expected)
    kept, _ = load_model(path, "fp32")
    held = {n for n, t in model_tensors(kept).items() if isinstance(t, Fp8Weight)}
    rules = layout_rules(family, list(model_tensors(kept)))
    assert held == {p for r in rules if stored[r.original].dtype == torch.float8_e4m3fn for p in r.parts}
    assert all(torch.equal(model_tensors(kept)[n], model_tensors(model)[n]) for n in held)


def _plain(tmp_path, family, reference):
    path = tmp_path / "plain.safetensors"
    write_file(path, family, reference)
    return path


@pytest.mark.parametrize("fmt,needle", [("nvfp4", "stored as U8"), ("mxfp8", "block-wise scale")])
def test_other_comfy_quant_formats_are_refused(fmt, needle, references, tmp_path):
    """comfy-kitchen's nvfp4 (packed uint8 weights) and block-scaled formats are refused before anything is built."""
    path = tmp_path / f"flux2_{fmt}.safetensors"
    key = "double_blocks.0.img_attn.proj"

    def cast(k, v):
        if not k.startswith(key + ".weight"):
            return {k: v}
        if fmt == "nvfp4":
            return {k: torch.zeros(v.shape[0], v.shape[1] // 2, dtype=torch.uint8),
                    f"{key}.weight_scale": torch.ones(v.shape[0], v.shape[1] // 16), f"{key}.weight_scale_2": torch.ones(()),
                    f"{key}.comfy_quant": _comfy_quant(fmt)}
        return {k: v.to(torch.float8_e4m3fn), f"{key}.weight_scale": torch.ones(v.shape[0], v.shape[1] // 8),
                f"{key}.comfy_quant": _comfy_quant(fmt)}

    write_file(path, "flux2", references["flux2_dev"], cast=cast)
    for call in (read_model_config, load_model):
        with pytest.raises(XDiTModelError, match=needle):
            call(path)


@pytest.mark.parametrize("name", ["zimage", "flux2_dev", "hunyuandit"])
def test_partial_load_of_a_single_file(name, references, tmp_path):
    """A stage's share of a single file: the last block and the head, the first block and the embedder on meta."""
    from xdit_core.loading.load import BLOCK_LISTS, EMBED_MODULES, block_prefixes

    family = MODELS[name][0]
    path = tmp_path / f"{name}.safetensors"
    write_file(path, family, references[name], AIO, AIO_EXTRAS)
    prefixes = block_prefixes(references[name], family)
    model, _ = load_model(path, parts=ModelParts([len(prefixes) - 1], embed=False, head=True))
    theirs = model_tensors(references[name])
    skipped = tuple(prefixes[:-1]) + tuple(f"{m}." for m in EMBED_MODULES[family])
    assert any(n.startswith(tuple(prefixes[:-1])) for n in theirs) and BLOCK_LISTS[family]
    for n, t in model_tensors(model).items():
        if n.startswith(skipped):
            assert t.is_meta, n
        else:
            assert torch.equal(t, theirs[n]), n


@pytest.mark.parametrize("name", list(MODELS))
def test_diffusers_weight_file_loads_like_its_folder(name, folders, references, tmp_path):
    """A diffusers transformer's weight file alone (no config beside it): detected, its config inferred as for the
    original layout, the same tensors."""
    family = MODELS[name][0]
    path = tmp_path / f"{name}-transformer.safetensors"
    save_file({k: v.contiguous() for k, v in references[name].state_dict().items()}, str(path))
    assert detect_diffusers_family(list(references[name].state_dict())) == family
    assert detect_layout(list(references[name].state_dict())) is None
    model, spec = load_model(path)
    assert_same_tensors(model, references[name])
    assert spec == resolve_model_spec(read_model_config(folders[name]))
    (tmp_path / "config.json").write_text((folders[name] / "config.json").read_text())
    assert load_model(path)[1] == spec


def test_diffusers_weight_file_config_must_fit(folders, references, tmp_path):
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in references["zimage"].state_dict().items()}, str(path))
    config = json.loads((folders["zimage"] / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_layers": 3, "qk_norm": False}))
    with pytest.raises(XDiTModelError, match="n_layers is 3 in the config, 2 in the weights; qk_norm is false"):
        read_model_config(path)


def test_missing_tensor_is_named(references, tmp_path):
    path = tmp_path / "cut.safetensors"
    write_file(path, "hunyuandit", references["hunyuandit"])
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if k != "blocks.5.skip_linear.bias"}, str(path))
    with pytest.raises(XDiTModelError, match=r"1 missing \(e.g. blocks.5.skip_linear.bias\)"):
        load_model(path)


def test_zimage_omni_is_refused_by_name(references, tmp_path):
    path = tmp_path / "z_image_omni.safetensors"
    write_file(path, "zimage", references["zimage"], extras={"siglip_embedder.1.weight": torch.zeros(96, 8)})
    with pytest.raises(XDiTModelError, match="Z-Image-Omni"):
        load_model(path)


# --- real-size files ---------------------------------------------------------------------------------------------

def _real_shapes(stem, **change):
    config = {**shipped_configs()[stem], **change}
    family = {"z-image-turbo": "zimage", "flux2-dev": "flux2", "hunyuandit-v1.2": "hunyuandit"}[stem]
    with torch.device("meta"):
        model = model_class(family).from_config(config)
    return family, config, {k: tuple(v.shape) for k, v in to_original(family, model_tensors(model)).items()}


# stem: (tensors in the file, a few (name, shape) facts of the real checkpoints' original layout)
REAL = {
    "z-image-turbo": (453, {"x_embedder.weight": (3840, 64), "cap_embedder.1.weight": (3840, 2560),
                            "layers.29.attention.qkv.weight": (3 * 3840, 3840),
                            "layers.0.attention.q_norm.weight": (128,), "layers.0.feed_forward.w1.weight": (10240, 3840),
                            "layers.0.adaLN_modulation.0.weight": (4 * 3840, 256),
                            "noise_refiner.1.adaLN_modulation.0.weight": (4 * 3840, 256),
                            "context_refiner.1.attention.out.weight": (3840, 3840),
                            "final_layer.adaLN_modulation.1.weight": (3840, 256), "x_pad_token": (1, 3840),
                            "t_embedder.mlp.0.weight": (1024, 256)}),
    "flux2-dev": (299, {"img_in.weight": (6144, 128), "txt_in.weight": (6144, 15360),
                        "double_blocks.7.img_attn.qkv.weight": (3 * 6144, 6144),
                        "double_blocks.0.img_mlp.0.weight": (2 * 18432, 6144),
                        "single_blocks.47.linear1.weight": (3 * 6144 + 2 * 18432, 6144),
                        "single_blocks.0.linear2.weight": (6144, 6144 + 18432),
                        "double_stream_modulation_img.lin.weight": (6 * 6144, 6144),
                        "single_stream_modulation.lin.weight": (3 * 6144, 6144),
                        "guidance_in.in_layer.weight": (6144, 256), "final_layer.linear.weight": (128, 6144)}),
    "hunyuandit-v1.2": (1304, {"x_embedder.proj.weight": (1408, 4, 2, 2), "blocks.39.attn1.Wqkv.weight": (4224, 1408),
                               "blocks.0.attn2.kv_proj.weight": (2816, 1024), "blocks.0.mlp.fc1.weight": (6144, 1408),
                               "blocks.21.skip_linear.weight": (1408, 2816), "mlp_t5.0.weight": (8192, 2048),
                               "pooler.positional_embedding": (257, 2048), "pooler.c_proj.weight": (1024, 2048),
                               "extra_embedder.0.weight": (5632, 1024), "text_embedding_padding": (333, 1024),
                               "final_layer.linear.weight": (32, 1408)}),
}


@pytest.mark.parametrize("stem", COVERED_CONFIGS)
def test_real_size_files_get_the_shipped_config(stem):
    """A real-size file's names and shapes (bare and under the all-in-one prefix) detect its family and give the shipped
    config, from which diffusers builds exactly the file's shapes."""
    family, config, shapes = _real_shapes(stem)
    count, facts = REAL[stem]
    assert len(shapes) == count
    assert {k: shapes[k] for k in facts} == facts
    assert detect_layout(list(shapes)) == (family, "")
    assert detect_layout([AIO + k for k in shapes] + list(AIO_EXTRAS)) == (family, AIO)
    detected = config_from_shapes(family, shapes)
    assert detected == config
    with torch.device("meta"):
        rebuilt = model_class(family).from_config(detected)
    assert {k: tuple(v.shape) for k, v in to_original(family, model_tensors(rebuilt)).items()} == shapes
    if family == "zimage":  # Lumina 2's unused norm_final in a file is no weight
        assert config_from_shapes(family, {**shapes, "norm_final.weight": (3840,)}) == config


def test_hunyuandit_v12_is_comfyuis_dit_g():
    """ComfyUI's detection of hunyuan_dit_1.2: 1408 wide, 40 blocks -> mlp_ratio 4.3637 (a 6144-wide MLP in both its
    model and diffusers'), extra_embedder input 1024 (not 3968: no size/style conditioning) -> hydit, v1.2."""
    _, config, shapes = _real_shapes("hunyuandit-v1.2")
    assert int(config["hidden_size"] * config["mlp_ratio"]) == int(1408 * 4.3637) == 6144
    assert shapes["extra_embedder.0.weight"][1] != 3968
    assert resolve_model_spec(config).variant == "v1.2"
    _, _, v11 = _real_shapes("hunyuandit-v1.2", use_style_cond_and_image_meta_size=True)
    assert v11["extra_embedder.0.weight"][1] == 3968  # ComfyUI's hydit1 test
    detected = config_from_shapes("hunyuandit", v11)
    assert detected["use_style_cond_and_image_meta_size"] and "_name_or_path" not in detected
    assert resolve_model_spec(detected).variant == "v1.1"
    assert {k: v for k, v in detected.items() if k != "use_style_cond_and_image_meta_size"} == \
        {k: v for k, v in shipped_configs()["hunyuandit-v1.2"].items()
         if k not in ("use_style_cond_and_image_meta_size", "_name_or_path")}


def test_flux2_without_guidance_embedder_is_klein():
    """A FLUX.2 file without guidance_in (klein) matches no shipped config: its own, derived, is klein's."""
    _, _, shapes = _real_shapes("flux2-dev", guidance_embeds=False, num_layers=5, num_single_layers=20,
                                num_attention_heads=24, joint_attention_dim=7680)
    config = config_from_shapes("flux2", shapes)
    assert "_name_or_path" not in config and config["guidance_embeds"] is False
    assert (config["num_layers"], config["num_single_layers"], config["num_attention_heads"],
            config["joint_attention_dim"], config["mlp_ratio"]) == (5, 20, 24, 7680, 3.0)
    assert resolve_model_spec(config).variant == "klein"


def test_a_pruned_zimage_gets_its_own_depth():
    _, _, shapes = _real_shapes("z-image-turbo")
    pruned = {k: v for k, v in shapes.items() if not (k.startswith("layers.") and int(k.split(".")[1]) >= 20)}
    config = config_from_shapes("zimage", pruned)
    assert config["n_layers"] == 20 and "_name_or_path" not in config
    assert (config["n_heads"], config["axes_dims"], config["cap_feat_dim"]) == (30, [32, 48, 48], 2560)


@pytest.mark.parametrize("stem", COVERED_CONFIGS)
def test_real_size_diffusers_weight_files_get_the_shipped_config(stem, tmp_path):
    family, config, _ = _real_shapes(stem)
    with torch.device("meta"):
        saved = model_class(family).from_config(config).state_dict()
    shapes = {k: tuple(t.shape) for k, t in saved.items()}
    assert detect_diffusers_family(list(shapes)) == family
    assert diffusers_file_config(tmp_path / "x.safetensors", family, shapes) == config
