"""Qwen-Image single files as ComfyUI's model folders hold them (diffusers tensor names, bare in diffusion_models or
under `model.diffusion_model.` in an all-in-one checkpoint; bf16, fp8 and ComfyUI's scaled fp8; Edit 2511's marker)
load to the diffusers folder's parameters; real-size files get the shipped config."""
import json

import pytest
import torch

from xdit_core.cli.generate import GenerateOptions, generate
from xdit_core.cli.tiny import write_tiny
from xdit_core.errors import XDiTModelError
from xdit_core.loading.key_mapping import layout_rules, model_tensors, to_original
from xdit_core.loading.load import ModelParts, load_model, read_model_config
from xdit_core.loading.original_layout import (config_from_shapes, detect_diffusers_family, detect_layout,
                                               diffusers_file_config, shipped_configs)
from xdit_core.models.families import model_class, resolve_model_spec
from xdit_core.models.fp8 import Fp8Weight

from test_loading_families import assert_same_tensors
from test_loading_families import write_file as write_family_file

AIO = "model.diffusion_model."
# Other components of an all-in-one checkpoint (Qwen's text encoder and VAE), which the loader must leave alone.
AIO_EXTRAS = {"text_encoders.qwen25_7b.transformer.model.norm.weight": torch.ones(4),
              "vae.decoder.conv_out.bias": torch.zeros(3)}
MARKER = "__index_timestep_zero__"  # ComfyUI's Qwen-Image-Edit 2511 files
QWEN_CONFIGS = ("qwen-image", "qwen-image-edit-2509", "qwen-image-edit-2511")
COVERED_CONFIGS = QWEN_CONFIGS  # the shipped configs this file checks (tests/test_loading.py counts them covered)
E4M3_MAX = 448.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny("qwen", tmp_path_factory.mktemp("qwen") / "tiny", seed=1)


@pytest.fixture(scope="module")
def reference(folder):
    """The model as diffusers' own from_pretrained loads it."""
    return model_class("qwen").from_pretrained(folder, low_cpu_mem_usage=False).eval()


def write_file(path, reference, prefix="", extras=None, cast=None):
    """The model as one ComfyUI-style file: its tensors under their diffusers names (our mapping: the identity)."""
    return write_family_file(path, "qwen", reference, prefix, extras, cast)


def test_the_original_layout_is_diffusers_names(reference):
    tensors = model_tensors(reference)
    assert set(to_original("qwen", tensors)) == set(tensors)
    assert all(r.parts == (r.original,) for r in layout_rules("qwen", list(tensors)))
    # ComfyUI's detection key (model_detection: txt_norm.weight), bare and in an all-in-one checkpoint
    names = list(tensors)
    assert detect_layout(names) == ("qwen", "")
    assert detect_layout([AIO + n for n in names] + list(AIO_EXTRAS)) == ("qwen", AIO)
    assert detect_diffusers_family(names) == "qwen"


@pytest.mark.parametrize("where", ["bare", "aio"])
def test_single_file_loads_like_the_folder(where, folder, reference, tmp_path):
    path = tmp_path / f"qwen_image_{where}.safetensors"
    prefix, extras = (AIO, AIO_EXTRAS) if where == "aio" else ("", None)
    write_file(path, reference, prefix, extras)
    folder_spec = resolve_model_spec(read_model_config(folder))
    for p in (folder, path):
        model, spec = load_model(p)
        assert_same_tensors(model, reference)
        assert spec == folder_spec and spec.variant == "image"
    config = read_model_config(path)
    assert {k: config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
                                   "in_channels", "out_channels", "patch_size")} == \
        {k: reference.config[k] for k in ("num_layers", "num_attention_heads", "attention_head_dim",
                                          "joint_attention_dim", "in_channels", "out_channels", "patch_size")}
    assert list(config["axes_dims_rope"]) == list(reference.config.axes_dims_rope)
    outputs = [generate(GenerateOptions(model=str(p), height=32, width=48, steps=2, seed=3))[0] for p in (folder, path)]
    assert torch.equal(outputs[0], outputs[1])


def test_bf16_file_loads_its_values(reference, tmp_path):
    path = tmp_path / "qwen_image_bf16.safetensors"
    write_file(path, reference, AIO, AIO_EXTRAS, cast=lambda k, v: {k: v.to(torch.bfloat16)})
    model, _ = load_model(path, "bf16")
    assert_same_tensors(model, reference, torch.bfloat16)
    model, _ = load_model(path, "fp32")  # upcast at load: the stored bf16 values, exactly
    for name, t in model_tensors(reference).items():
        assert torch.equal(model_tensors(model)[name], t.to(torch.bfloat16).float()), name


def _scaled_fp8(k, v):
    """ComfyUI's scaled fp8: a Linear weight as e4m3fn of weight / scale, its float32 scale beside it."""
    if not (k.endswith(".weight") and v.dim() == 2):
        return {k: v.to(torch.bfloat16)}
    scale = v.abs().max().float() / E4M3_MAX
    return {k: (v / scale).to(torch.float8_e4m3fn), k[: -len("weight")] + "scale_weight": scale}


@pytest.mark.parametrize("kind", ["fp8_e4m3fn", "fp8_scaled"])
@pytest.mark.parametrize("where", ["bare", "aio"])
def test_fp8_file_loads_its_values(kind, where, reference, tmp_path):
    """qwen_image_fp8_e4m3fn.safetensors (fp8 Linear weights, the rest bf16) and ComfyUI's scaled fp8 (with the
    scaled_fp8 marker and a scale_weight per weight): every weight the stored fp8 value (times its scale)."""
    path = tmp_path / f"qwen_image_{kind}_{where}.safetensors"
    prefix, extras = (AIO, dict(AIO_EXTRAS)) if where == "aio" else ("", {})
    if kind == "fp8_scaled":
        cast = _scaled_fp8
        extras[prefix + "scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    else:
        def cast(k, v):
            return {k: v.to(torch.float8_e4m3fn if k.endswith(".weight") and v.dim() == 2 else torch.bfloat16)}
    stored = write_file(path, reference, prefix, extras, cast)
    model, spec = load_model(path, "fp32", keep_fp8=False)
    assert spec.family == "qwen"
    loaded = model_tensors(model)
    expected = {}
    for k, v in stored.items():
        if k.endswith(".scale_weight"):
            continue
        scale = stored.get(k[: -len("weight")] + "scale_weight")
        expected[k] = v.float() * scale if scale is not None else v.float()
    assert expected.keys() == loaded.keys()
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k
    # Kept fp8 on the device (upcast per layer as used): every Linear weight held as fp8, the same values, and
    # sampling equals the load-time upcast bit for bit.
    kept, _ = load_model(path, "fp32")
    held = {n for n, t in model_tensors(kept).items() if isinstance(t, Fp8Weight)}
    assert held == {k for k, v in stored.items() if v.dtype == torch.float8_e4m3fn}
    assert all(torch.equal(model_tensors(kept)[k], expected[k]) for k in held)
    samples = [generate(GenerateOptions(model=str(path), height=32, width=48, steps=2, seed=3, fp8=fp8))[0]
               for fp8 in ("keep", "upcast")]
    assert torch.equal(samples[0], samples[1])


@pytest.mark.parametrize("where", ["bare", "aio"])
def test_edit_2511_marker_selects_timestep_zero_references(where, tmp_path):
    """ComfyUI's Qwen-Image-Edit 2511 files carry an empty __index_timestep_zero__: the config gets zero_cond_t (the
    variant edit_2511) and the marker is no weight; the same weights without it read as Qwen-Image / Edit 2509."""
    folder = write_tiny("qwen", tmp_path / "tiny_2511", seed=2, variant="edit_2511")
    reference = model_class("qwen").from_pretrained(folder, low_cpu_mem_usage=False).eval()
    prefix, extras = (AIO, AIO_EXTRAS) if where == "aio" else ("", None)
    path, plain = tmp_path / "qwen_image_edit_2511.safetensors", tmp_path / "qwen_image_edit.safetensors"
    write_file(path, reference, prefix, {**(extras or {}), prefix + MARKER: torch.tensor([])})
    write_file(plain, reference, prefix, extras)
    model, spec = load_model(path)
    assert_same_tensors(model, reference)
    assert spec.variant == "edit_2511" and read_model_config(path)["zero_cond_t"] is True
    assert resolve_model_spec(read_model_config(plain)).variant == "image"
    assert not read_model_config(plain).get("zero_cond_t")


@pytest.mark.parametrize("where", ["bare", "aio"])
def test_partial_load_of_a_single_file(where, reference, tmp_path):
    """A PipeFusion stage's share of a single file: block 1 and the head, block 0 and the image embedder on meta."""
    path = tmp_path / "qwen.safetensors"
    write_file(path, reference, *((AIO, AIO_EXTRAS) if where == "aio" else ("", None)))
    model, _ = load_model(path, parts=ModelParts([1], embed=False, head=True))
    theirs = model_tensors(reference)
    for name, t in model_tensors(model).items():
        if name.startswith(("transformer_blocks.0.", "img_in.")):
            assert t.is_meta, name
        else:
            assert torch.equal(t, theirs[name]), name


def _real_shapes(stem):
    config = shipped_configs()[stem]
    with torch.device("meta"):
        model = model_class("qwen").from_config(config)
    shapes = {k: tuple(v.shape) for k, v in to_original("qwen", model_tensors(model)).items()}
    if config.get("zero_cond_t"):
        shapes[MARKER] = (0,)
    return config, shapes


@pytest.mark.parametrize("stem", QWEN_CONFIGS)
def test_real_size_files_get_the_shipped_config(stem):
    """A real-size file's names and shapes (ComfyUI's qwen_image_*.safetensors): 1933 tensors (2511: and its marker),
    detected bare and under the all-in-one prefix, its config the shipped one, 60 blocks counted from the file.
    Qwen-Image and Edit 2509 share one transformer, so their files get Qwen-Image's config."""
    config, shapes = _real_shapes(stem)
    assert len(shapes) == 1933 + (1 if config.get("zero_cond_t") else 0)
    assert shapes["img_in.weight"] == (3072, 64) and shapes["txt_in.weight"] == (3072, 3584)
    assert shapes["transformer_blocks.59.img_mod.1.weight"] == (6 * 3072, 3072)
    assert shapes["proj_out.weight"] == (64, 3072)
    assert detect_layout(list(shapes)) == ("qwen", "")
    assert detect_layout([AIO + k for k in shapes] + list(AIO_EXTRAS)) == ("qwen", AIO)
    detected = config_from_shapes("qwen", shapes)
    expected = shipped_configs()["qwen-image" if stem == "qwen-image-edit-2509" else stem]
    assert detected == expected
    assert {k: v for k, v in detected.items() if k != "_name_or_path"} == \
        {k: v for k, v in config.items() if k != "_name_or_path"}
    assert resolve_model_spec(detected).variant == ("edit_2511" if config.get("zero_cond_t") else "image")
    with torch.device("meta"):
        rebuilt = model_class("qwen").from_config(detected)
    assert {k: tuple(v.shape) for k, v in model_tensors(rebuilt).items()} == \
        {k: v for k, v in shapes.items() if k != MARKER}


def test_a_pruned_file_gets_its_own_depth():
    """Blocks counted from the file: a 20-block Qwen-Image matches no shipped config and is derived."""
    _, shapes = _real_shapes("qwen-image")
    pruned = {k: v for k, v in shapes.items()
              if not (k.startswith("transformer_blocks.") and int(k.split(".")[1]) >= 20)}
    config = config_from_shapes("qwen", pruned)
    assert config["num_layers"] == 20 and "_name_or_path" not in config
    assert config["num_attention_heads"] == 24 and config["axes_dims_rope"] == [16, 56, 56]


def test_diffusers_weight_file_config_agrees(folder, reference, tmp_path):
    """The diffusers-layout reading of the same names (a config beside it, or inferred) agrees with the original."""
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    write_file(path, reference)
    shapes = {k: tuple(v.shape) for k, v in model_tensors(reference).items()}
    inferred = diffusers_file_config(path, "qwen", shapes)
    assert inferred == config_from_shapes("qwen", shapes)
    beside = json.loads((folder / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(beside))
    assert diffusers_file_config(path, "qwen", shapes)["num_layers"] == reference.config.num_layers
    # Edit 2511's weights are Qwen-Image's: its config beside says zero_cond_t, which diffusers' files carry no
    # marker for, so it is taken as it is
    (tmp_path / "config.json").write_text(json.dumps({**beside, "zero_cond_t": True}))
    assert diffusers_file_config(path, "qwen", shapes)["zero_cond_t"] is True
    (tmp_path / "config.json").write_text(json.dumps({**beside, "num_layers": 3}))
    with pytest.raises(XDiTModelError, match="num_layers is 3 in the config, 2 in the weights"):
        diffusers_file_config(path, "qwen", shapes)


def test_layered_model_is_refused_by_name(reference, tmp_path):
    path = tmp_path / "qwen_image_layered.safetensors"
    write_file(path, reference, extras={"time_text_embed.addition_t_embedding.weight": torch.zeros(2, 64)})
    with pytest.raises(XDiTModelError, match="Qwen-Image-Layered"):
        load_model(path)
