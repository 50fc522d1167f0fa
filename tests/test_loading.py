"""Model loading: diffusers folders, original-layout single files, all-in-one checkpoints, fp8, partial loads."""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xdit_core.api import describe_model
from xdit_core.cli.main import main
from xdit_core.errors import XDiTConfigError, XDiTModelError
from xdit_core.models.families import CLASS_NAMES, resolve_model_spec
from xdit_core.cli.generate import GenerateOptions, generate
from xdit_core.loading.key_mapping import COMPUTED, layout_rules, model_tensors, split, to_original
from xdit_core.loading.load import LoadStats, ModelParts, load_model, read_model_config
from xdit_core.models import BranchCond, make_adapter
from xdit_core.loading.original_layout import config_from_shapes, detect_layout, diffusers_file_config, shipped_configs
from xdit_core.models.families import model_class

AIO = "model.diffusion_model."
MODELS = ("flux", "flux_schnell", "sd3", "pixart", "pixart_sigma")
# Other components of an all-in-one checkpoint, which the loader must leave alone.
AIO_EXTRAS = {"first_stage_model.x": torch.zeros(3), "cond_stage_model.y": torch.ones(2, 2)}
# fp8 weights (2-D and up; biases and norms stay bf16) against bf16 weights: relative L2 error of the
# 2-step output. Measured on tiny Flux (3 seeds): e4m3fn 0.007, e5m2 0.011-0.012, scaled e4m3fn 0.006.
FP8_TOLERANCE = {torch.float8_e4m3fn: 0.02, torch.float8_e5m2: 0.03}


def family_of(folder) -> str:
    return resolve_model_spec(read_model_config(folder)).family


def diffusers_reference(folder) -> torch.nn.Module:
    """The model as diffusers' own from_pretrained loads it: the reference every load is compared with."""
    return model_class(family_of(folder)).from_pretrained(folder, low_cpu_mem_usage=False).eval()


def write_original(path, folder, prefix="", extras=None, cast=None) -> dict:
    """The diffusers folder written as one original-layout file (our reverse mapping); returns its tensors."""
    tensors = to_original(family_of(folder), model_tensors(diffusers_reference(folder)))
    if cast is not None:
        tensors = {k: cast(v) for k, v in tensors.items()}
    save_file({**{prefix + k: v.contiguous() for k, v in tensors.items()}, **(extras or {})}, str(path))
    return tensors


def assert_same_tensors(model, reference):
    ours, theirs = model_tensors(model), model_tensors(reference)
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype and torch.equal(ours[name], t), name


def tiny_generate(path, dtype="fp32") -> torch.Tensor:
    samples, _ = generate(GenerateOptions(model=str(path), height=32, width=32, steps=2, seed=3, dtype=dtype))
    return samples


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def single_files(tiny_models, tmp_path_factory):
    """Every tiny model as a bare original-layout file and inside an all-in-one checkpoint."""
    root = tmp_path_factory.mktemp("single_files")
    out = {}
    for name in MODELS:
        bare, aio = root / f"{name}.safetensors", root / f"{name}_aio.safetensors"
        write_original(bare, tiny_models[name])
        # PixArt's original files also carry the null caption of training, which diffusers has no place for.
        extra = {AIO + "y_embedder.y_embedding": torch.zeros(4, 32)} if name.startswith("pixart") else {}
        write_original(aio, tiny_models[name], prefix=AIO, extras={**AIO_EXTRAS, **extra})
        out[name] = {"bare": bare, "aio": aio}
    return out


@pytest.mark.parametrize("name", MODELS)
def test_single_files_load_and_generate_like_the_folder(name, tiny_models, single_files):
    folder = tiny_models[name]
    reference = diffusers_reference(folder)
    folder_spec = resolve_model_spec(read_model_config(folder))
    paths = [folder, single_files[name]["bare"], single_files[name]["aio"]]
    for path in paths:
        model, spec = load_model(path)
        assert_same_tensors(model, reference)
        assert spec == folder_spec
    assert read_model_config(paths[1]) == read_model_config(paths[2])
    outputs = [tiny_generate(p) for p in paths]
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_cli_generates_from_an_all_in_one_checkpoint(single_files, tiny_models, tmp_path):
    out = tmp_path / "latent.safetensors"
    rc = main(["generate", "--model", str(single_files["sd3"]["aio"]), "--height", "32", "--width", "32",
               "--steps", "2", "--seed", "3", "--out", str(out)])
    assert rc == 0
    with safe_open(str(out), "pt") as f:
        assert torch.equal(f.get_tensor("samples"), tiny_generate(tiny_models["sd3"]))


@pytest.mark.parametrize("name", ["flux", "sd3", "pixart"])
def test_sharded_folder_equals_from_pretrained_in_every_dtype(name, tiny_models, tmp_path):
    reference = diffusers_reference(tiny_models[name])
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model, _ = load_model(tmp_path)
    assert_same_tensors(model, reference)
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        model, _ = load_model(tmp_path, dtype)
        expected = {n: p.to(torch_dtype) for n, p in reference.named_parameters()}
        for n, p in model.named_parameters():
            assert p.dtype == torch_dtype and torch.equal(p, expected[n]), n
        # Buffers (sin-cos tables) stay float32, as diffusers makes them.
        assert all(b.dtype == torch.float32 for b in model.buffers())


# Facts of the real checkpoints, checked against the shapes our reverse mapping gives.
REAL_FACTS = {
    "flux1-dev": ("dev", {"single_blocks.0.linear1.weight": (21504, 3072),
                          "double_blocks.0.img_attn.qkv.weight": (9216, 3072),
                          "final_layer.adaLN_modulation.1.weight": (6144, 3072)}, 780),
    "flux1-schnell": ("schnell", {"img_in.weight": (3072, 64)}, 776),
    "sd3-medium": ("sd3", {"pos_embed": (1, 192 * 192, 1536), "x_embedder.proj.weight": (1536, 16, 2, 2)}, None),
    "sd3.5-medium": ("sd3", {"pos_embed": (1, 384 * 384, 1536),
                             "joint_blocks.12.x_block.attn2.qkv.weight": (4608, 1536),
                             "joint_blocks.0.x_block.adaLN_modulation.1.weight": (9 * 1536, 1536)}, None),
    "sd3.5-large": ("sd3", {"joint_blocks.37.context_block.adaLN_modulation.1.weight": (2 * 2432, 2432),
                            "joint_blocks.0.x_block.attn.ln_q.weight": (64,)}, None),
    "pixart-alpha-xl-2-1024-ms": ("alpha", {"blocks.27.cross_attn.kv_linear.weight": (2304, 1152),
                                            "pos_embed": (1, 4096, 1152), "t_block.1.weight": (6912, 1152)}, None),
    "pixart-sigma-xl-2-1024-ms": ("sigma", {"y_embedder.y_proj.fc1.weight": (1152, 4096)}, None),
    # Wan: 27 tensors a block, 15 outside them (Wan 2.1 I2V: k/v_img add 5 a block, the image embedder 8)
    "wan2.1-t2v-1.3b": ("t2v", {"head.modulation": (1, 2, 1536), "blocks.29.ffn.0.weight": (8960, 1536),
                                "text_embedding.0.weight": (1536, 4096)}, 30 * 27 + 15),
    "wan2.1-t2v-14b": ("t2v", {"blocks.39.cross_attn.norm_k.weight": (5120,), "head.head.weight": (64, 5120),
                               "blocks.0.norm3.weight": (5120,)}, 40 * 27 + 15),
    "wan2.1-i2v-14b": ("i2v", {"patch_embedding.weight": (5120, 36, 1, 2, 2), "img_emb.proj.1.weight": (1280, 1280),
                               "img_emb.proj.3.weight": (5120, 1280), "blocks.0.cross_attn.k_img.weight": (5120, 5120)},
                       40 * 32 + 15 + 8),
    "wan2.2-i2v-a14b": ("i2v", {"patch_embedding.weight": (5120, 36, 1, 2, 2)}, 40 * 27 + 15),
    "wan2.2-ti2v-5b": ("ti2v", {"patch_embedding.weight": (3072, 48, 1, 2, 2), "head.head.weight": (192, 3072),
                                "blocks.29.self_attn.q.weight": (3072, 3072)}, 30 * 27 + 15),
}


# Family test files cover their own shipped configs: each names them in a module-level COVERED_CONFIGS (the stems its
# real-size tests are parametrized over).
COVERING_FILES = ("test_loading_qwen", "test_loading_families")


def covered_elsewhere() -> dict[str, set[str]]:
    """{test file: the shipped config stems it says it covers}."""
    import importlib

    return {name: set(importlib.import_module(name).COVERED_CONFIGS) for name in COVERING_FILES}


def test_every_shipped_config_is_covered():
    """Every shipped config is checked by some test: REAL_FACTS here or a family file's COVERED_CONFIGS; and nothing is
    claimed that is not shipped."""
    elsewhere = covered_elsewhere()
    covered = set(REAL_FACTS).union(*elsewhere.values())
    shipped = set(shipped_configs())
    assert not shipped - covered, f"shipped configs no test covers: {sorted(shipped - covered)}"
    assert not covered - shipped, f"covered configs that are not shipped: {sorted(covered - shipped)}"
    claims = [stem for stems in [set(REAL_FACTS), *elsewhere.values()] for stem in stems]
    assert len(claims) == len(set(claims)), "a shipped config is claimed by two test files"


@pytest.mark.parametrize("stem", sorted(REAL_FACTS))
def test_shipped_config_round_trips_through_the_original_layout(stem):
    """Diffusers shapes -> original shapes -> detected config -> diffusers shapes, on the meta device."""
    config = shipped_configs()[stem]
    family = CLASS_NAMES[config["_class_name"]]
    with torch.device("meta"):
        model = model_class(family).from_config(config)
    diffusers_tensors = {k: v for k, v in model_tensors(model).items() if k not in COMPUTED.get(family, ())}
    original = to_original(family, diffusers_tensors)
    variant, facts, key_count = REAL_FACTS[stem]
    assert {k: tuple(original[k].shape) for k in facts} == facts
    if key_count is not None:
        assert len(original) == key_count
    assert detect_layout([AIO + k for k in original] + list(AIO_EXTRAS)) == (family, AIO)
    detected = config_from_shapes(family, {k: tuple(v.shape) for k, v in original.items()})
    assert detected == config
    assert resolve_model_spec(detected).variant == variant
    with torch.device("meta"):
        rebuilt = model_class(family).from_config(detected)
    shapes = {k: tuple(v.shape) for k, v in model_tensors(rebuilt).items()}
    back = {}
    for rule in layout_rules(family, list(shapes)):
        back.update(split(rule, original[rule.original], shapes))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in diffusers_tensors.items()}


def test_pixart_resolution_variant_keeps_the_shipped_heads():
    """A 2K PixArt-Sigma differs from the 1024 one only in its position table: same heads, its own size."""
    config = shipped_configs()["pixart-sigma-xl-2-1024-ms"]
    with torch.device("meta"):
        model = model_class("pixart").from_config({**config, "sample_size": 256, "interpolation_scale": None})
    shapes = {k: tuple(v.shape) for k, v in to_original("pixart", model_tensors(model)).items()}
    detected = config_from_shapes("pixart", shapes)
    assert detected["num_attention_heads"] == 16 and detected["sample_size"] == 256
    with torch.device("meta"):
        assert model_class("pixart").from_config(detected).pos_embed.interpolation_scale == 4


@pytest.mark.parametrize("fp8", list(FP8_TOLERANCE), ids=["e4m3fn", "e5m2"])
def test_fp8_file_loads_exactly_and_samples_close_to_bf16(fp8, tiny_models, tmp_path):
    folder = tiny_models["flux"]
    bf16_file, fp8_file = tmp_path / "bf16.safetensors", tmp_path / "fp8.safetensors"
    write_original(bf16_file, folder, cast=lambda t: t.to(torch.bfloat16))
    stored = write_original(fp8_file, folder, cast=lambda t: t.to(fp8 if t.dim() >= 2 else torch.bfloat16))
    model, _ = load_model(fp8_file, "bf16", keep_fp8=False)
    # Upcast at load: every weight is the stored fp8 value, exactly, in bf16 (kept fp8 computes the same: test_fp8.py).
    loaded = to_original("flux", model_tensors(model))
    assert all(torch.equal(loaded[k], v.to(torch.bfloat16)) for k, v in stored.items())
    assert relative_error(tiny_generate(fp8_file, "bf16"), tiny_generate(bf16_file, "bf16")) < FP8_TOLERANCE[fp8]


def test_scaled_fp8_checkpoint_applies_its_scales(tiny_models, tmp_path):
    """ComfyUI's scaled fp8: a `scaled_fp8` marker and a float32 `scale_weight` next to each fp8 weight."""
    folder = tiny_models["flux"]
    tensors = to_original("flux", model_tensors(diffusers_reference(folder)))
    stored = {AIO + "scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    expected = {}
    for k, v in tensors.items():
        if v.dim() >= 2:
            scale = v.abs().max() / 448  # e4m3fn's largest value
            q = (v / scale).to(torch.float8_e4m3fn)
            stored[AIO + k], stored[AIO + k[: -len("weight")] + "scale_weight"] = q, scale.reshape(())
            expected[k] = (q.float() * scale).to(torch.bfloat16)
        else:
            stored[AIO + k] = expected[k] = v.to(torch.bfloat16)
    path = tmp_path / "scaled.safetensors"
    save_file(stored, str(path))
    model, _ = load_model(path, "bf16")
    loaded = to_original("flux", model_tensors(model))
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())
    plain = tmp_path / "bf16.safetensors"
    write_original(plain, folder, cast=lambda t: t.to(torch.bfloat16))
    error = relative_error(tiny_generate(path, "bf16"), tiny_generate(plain, "bf16"))
    assert error < FP8_TOLERANCE[torch.float8_e4m3fn]


def original_bytes(path, prefixes) -> int:
    """Bytes of the file's model tensors whose original names start with one of `prefixes`."""
    with safe_open(str(path), "pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()
                   if k.startswith(AIO) and k[len(AIO):].startswith(prefixes))


def test_partial_loads_read_their_share_and_equal_the_full_load(tiny_models, single_files):
    path = single_files["pixart"]["aio"]
    full_stats, first_stats, second_stats = LoadStats(), LoadStats(), LoadStats()
    full, spec = load_model(path, stats=full_stats)
    first, _ = load_model(path, parts=ModelParts(range(0, 2), embed=True, head=False), stats=first_stats)
    second, _ = load_model(path, parts=ModelParts([2, 3], embed=False, head=True), stats=second_stats)

    conditioning = original_bytes(path, ("t_embedder.", "t_block.", "csize_embedder.", "ar_embedder.",
                                         "y_embedder.y_proj."))
    blocks = [original_bytes(path, (f"blocks.{i}.",)) for i in range(4)]
    embed, head = original_bytes(path, ("x_embedder.",)), original_bytes(path, ("final_layer.",))
    assert full_stats.bytes_read == conditioning + sum(blocks) + embed + head  # nothing else read (not y_embedding)
    assert first_stats.bytes_read == conditioning + blocks[0] + blocks[1] + embed
    assert second_stats.bytes_read == conditioning + blocks[2] + blocks[3] + head
    assert blocks[0] + blocks[1] == sum(blocks) / 2  # half the blocks: half of the block bytes
    # Beyond the conditioning embedders every stage reads (17% of this tiny model, under 3% of PixArt-XL),
    # each half reads half of the bytes.
    rest = full_stats.bytes_read - conditioning
    for stats in (first_stats, second_stats):
        assert abs((stats.bytes_read - conditioning) / rest - 0.5) < 0.01

    reference = model_tensors(full)
    for part, prefixes in ((first, ("transformer_blocks.0.", "transformer_blocks.1.", "pos_embed.")),
                           (second, ("transformer_blocks.2.", "transformer_blocks.3.", "proj_out.",
                                     "scale_shift_table"))):
        for name, t in model_tensors(part).items():
            own = name.startswith(prefixes) or name.startswith(("adaln_single.", "caption_projection."))
            assert t.is_meta != own, name
            if own:
                assert torch.equal(t, reference[name]), name

    # Stage by stage, the two halves compute what the whole model computes.
    a, b, whole = make_adapter(first, spec), make_adapter(second, spec), make_adapter(full, spec)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500.0])
    cond = BranchCond(torch.randn(1, 6, spec.text_dim))
    tokens = a.embed(x, t, cond, None)
    for block, run in a.blocks()[:2] + b.blocks()[2:]:
        tokens = run(block, tokens)
    assert torch.equal(b.head(tokens), whole.predict(x, t, cond, None))


def test_flux_flat_block_indices_span_double_then_single_blocks(tiny_models):
    model, spec = load_model(tiny_models["flux"], parts=ModelParts({1, 2}, embed=False, head=False))
    assert spec.num_blocks == 6  # 2 double + 4 single
    live = {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters()
            if not p.is_meta and "blocks" in n}
    assert live == {"transformer_blocks.1", "single_transformer_blocks.0"}
    assert model.x_embedder.weight.is_meta and model.proj_out.weight.is_meta and model.norm_out.linear.weight.is_meta
    assert not model.time_text_embed.guidance_embedder.linear_1.weight.is_meta
    assert not model.context_embedder.weight.is_meta
    with pytest.raises(XDiTConfigError, match=r"block indices \[6\] are out of range: the model has 6 blocks"):
        load_model(tiny_models["flux"], parts=ModelParts([5, 6]))


# --- diffusers-layout single files: a transformer's weight file alone, as ComfyUI's UNETLoader takes them ----

def lone_weight_file(folder, tmp_path, name, beside=None):
    """The folder's weight file alone under another name; its config.json copied as `beside` (a name,
    `{stem}` for the file's stem) or not at all."""
    path = tmp_path / f"{name}-transformer.safetensors"
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", path)
    if beside is not None:
        shutil.copy(folder / "config.json", tmp_path / beside.format(stem=path.stem))
    return path


def assert_same_live_tensors(model, reference, buffers=True):
    """The same tensors by name, the same ones left on meta, equal values and dtypes where loaded."""
    ours = model_tensors(model) if buffers else dict(model.named_parameters())
    theirs = model_tensors(reference) if buffers else dict(reference.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, t in theirs.items():
        assert ours[name].is_meta == t.is_meta, name
        assert t.is_meta or (ours[name].dtype == t.dtype and torch.equal(ours[name], t)), name


@pytest.mark.parametrize("beside", [None, "config.json"])
@pytest.mark.parametrize("name", MODELS)
def test_diffusers_weight_file_loads_like_its_folder(name, beside, tiny_models, tmp_path):
    folder = tiny_models[name]
    path = lone_weight_file(folder, tmp_path, name, beside)
    spec = describe_model(str(path))
    assert spec == describe_model(str(folder))  # family, variant, heads, blocks, text widths
    # PixArt's sample size is only in its sin-cos table, which diffusers does not save: without a config the
    # 1024 models' 128 is assumed (the tiny model has 32), so that non-persistent table differs; no weight does.
    assumed = beside is None and name.startswith("pixart")
    if assumed:
        assert read_model_config(path)["sample_size"] == 128
    half = ModelParts(range(spec.num_blocks // 2), embed=True, head=False)  # PipeFusion's first stage
    for dtype, parts in (("fp32", None), ("bf16", None), ("fp32", half)):
        model, model_spec = load_model(path, dtype, parts=parts)
        reference, _ = load_model(folder, dtype, parts=parts)
        assert model_spec == spec
        assert_same_live_tensors(model, reference, buffers=not assumed)
    assert_same_live_tensors(load_model(path)[0], diffusers_reference(folder), buffers=not assumed)


def test_a_weight_files_own_json_comes_before_config_json(tiny_models, tmp_path):
    path = lone_weight_file(tiny_models["flux"], tmp_path, "flux", beside="{stem}.json")
    shutil.copy(tiny_models["sd3"] / "config.json", tmp_path / "config.json")  # another model's, in the same folder
    assert describe_model(str(path)) == describe_model(str(tiny_models["flux"]))
    (tmp_path / f"{path.stem}.json").unlink()
    for call in (read_model_config, load_model):
        with pytest.raises(XDiTModelError, match=r"config.json names SD3Transformer2DModel but .*flux-transformer"
                                                 r".safetensors holds a FluxTransformer2DModel \(diffusers layout\)"):
            call(path)


@pytest.mark.parametrize("name,change,needle", [
    ("sd3", {"num_layers": 3}, "num_layers is 3 in the config, 4 in the weights"),
    ("flux", {"guidance_embeds": False}, "guidance_embeds is false in the config, true in the weights"),
    ("flux", {"num_attention_heads": 8, "attention_head_dim": 8, "axes_dims_rope": [2, 2, 4]},
     "attention_head_dim is 8 in the config, 16 in the weights; num_attention_heads is 8 in the config, 4 in"),
    ("pixart", {"use_additional_conditions": False}, "use_additional_conditions is false in the config, true in"),
    ("sd3", {"num_attention_heads": 2, "caption_projection_dim": 32},
     r"caption_projection_dim is 32 in the config, 64 in the weights; the width \(num_attention_heads × "
     r"attention_head_dim\) is 32 in the config, 64 in the weights"),
])
def test_config_beside_a_diffusers_weight_file_must_fit_its_shapes(name, change, needle, tiny_models, tmp_path):
    path = lone_weight_file(tiny_models[name], tmp_path, name, beside="config.json")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    for call in (read_model_config, load_model):
        with pytest.raises(XDiTModelError, match=r"config.json does not fit the weights of .*: " + needle) as e:
            call(path)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("dropped,needle", [
    ("proj_out.weight", "lacks 'proj_out.weight', which every flux model has"),  # a size the config comes from
    ("transformer_blocks.0.attn.norm_q.weight", "lacks 'transformer_blocks.0.attn.norm_q.weight', which every"),
    ("transformer_blocks.1.ff.net.2.bias", r"1 missing \(e.g. transformer_blocks.1.ff.net.2.bias\)"),  # at load
])
def test_diffusers_weight_file_missing_a_tensor_names_it(dropped, needle, tiny_models, tmp_path):
    path = tmp_path / "cut.safetensors"
    with safe_open(str(tiny_models["flux"] / "diffusion_pytorch_model.safetensors"), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if k != dropped}, str(path))
    with pytest.raises(XDiTModelError, match=needle):
        load_model(path)


@pytest.mark.parametrize("stem", sorted(REAL_FACTS))
def test_shipped_configs_are_inferred_from_diffusers_weight_shapes(stem, tmp_path):
    """A real model's diffusers weight file alone (its saved tensors' shapes, on the meta device) gets its real
    config back: heads from the q/k norms or the family's head rule, Flux dev/schnell, PixArt alpha/Sigma."""
    config = shipped_configs()[stem]
    family = CLASS_NAMES[config["_class_name"]]
    with torch.device("meta"):
        saved = model_class(family).from_config(config).state_dict()  # PixArt's sin-cos table is not saved
    assert diffusers_file_config(tmp_path / "x.safetensors", family, {k: tuple(t.shape) for k, t in saved.items()}) \
        == config


# --- bad input: one clear error each ---------------------------------------------------------------------

def test_truncated_file_is_refused(single_files, tmp_path):
    data = single_files["flux"]["bare"].read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    for call in (read_model_config, load_model):
        with pytest.raises(XDiTModelError, match="is not a readable safetensors file"):
            call(path)


def test_unknown_layout_lists_the_supported_ones(tmp_path):
    path = tmp_path / "unet.safetensors"
    save_file({"input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(path))
    with pytest.raises(XDiTModelError) as e:
        load_model(path)
    message = str(e.value)
    assert "no diffusion transformer in a known layout" in message and "\n" not in message
    for name in ("Flux.1 dev/schnell", "SD3/SD3.5", "PixArt-alpha/Sigma", "model.diffusion_model.", "diffusers"):
        assert name in message


@pytest.mark.parametrize("suffix", [".ckpt", ".bin"])
def test_pickle_checkpoints_are_refused_with_a_conversion(suffix, tmp_path):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"never unpickled")
    with pytest.raises(XDiTModelError, match="is a pickle checkpoint; only safetensors .* Convert it once"):
        load_model(path)


@pytest.mark.parametrize("change,needle", [
    ({"joint_attention_dim": 48}, r"1 of another shape \(e.g. context_embedder.weight: \[64, 32\] in the file, "
                                  r"\[64, 48\] for the config\)"),
    ({"num_layers": 3}, r"28 unexpected \(e.g. transformer_blocks.2.attn.to_add_out.bias\)"),
])
def test_folder_whose_weights_do_not_match_its_config(change, needle, tiny_models, tmp_path):
    folder = tmp_path / "sd3"
    shutil.copytree(tiny_models["sd3"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(XDiTModelError, match="the weights do not match the sd3 model config: .*" + needle):
        load_model(folder)


def test_single_file_missing_a_tensor_or_forced_to_another_family(single_files, tmp_path):
    path = tmp_path / "partial.safetensors"
    with safe_open(str(single_files["sd3"]["bare"]), "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys() if k != "final_layer.linear.bias"}, str(path))
    with pytest.raises(XDiTModelError, match=r"1 missing \(e.g. final_layer.linear.bias\)"):
        load_model(path)
    for call in (describe_model, load_model):
        with pytest.raises(XDiTConfigError, match="family 'flux' contradicts the model: its config names "
                                                  "SD3Transformer2DModel, a sd3 model; pass 'sd3'"):
            call(str(single_files["sd3"]["bare"]), family="flux")


DROP = object()  # a key to take out of the config
# (model, its config: replaced by this text or updated with these keys, family, variant, error, message).
# Every case fails before anything is built or read beyond the file headers.
BAD_MODELS = {
    "list": ("flux", "[1, 2]", None, None, XDiTModelError, "config.json is a JSON list, not an object"),
    "number": ("flux", "3", None, None, XDiTModelError, "config.json is a JSON number, not an object"),
    "invalid json": ("flux", "{nope", None, None, XDiTModelError, "config.json is not valid JSON: Expecting property"),
    "no class": ("flux", {"_class_name": DROP}, None, None, XDiTModelError,
                 "config.json: the model config names no _class_name; supported: FluxTransformer2DModel"),
    "foreign class": ("flux", {"_class_name": "UNet2DConditionModel"}, "flux", None, XDiTModelError,
                      "config.json: unknown model class 'UNet2DConditionModel'; supported: FluxTransformer2DModel"),
    "no text width": ("flux", {"joint_attention_dim": DROP}, None, None, XDiTModelError,
                      "config.json lacks joint_attention_dim, which a FluxTransformer2DModel config must state"),
    "no depth": ("pixart", {"num_layers": DROP, "caption_channels": None}, None, None, XDiTModelError,
                 "config.json lacks num_layers, caption_channels, which a PixArtTransformer2DModel config must"),
    "zero layers": ("sd3", {"num_layers": 0}, None, None, XDiTModelError,
                    "config.json: num_layers is 0; it must be a positive integer"),
    "negative layers": ("flux", {"num_single_layers": -2}, None, None, XDiTModelError,
                        "config.json: num_single_layers is -2; it must be a positive integer"),
    "fractional layers": ("sd3", {"num_layers": 2.5}, None, None, XDiTModelError, "num_layers is 2.5; it must be"),
    "layers as text": ("sd3", {"num_layers": "4"}, None, None, XDiTModelError, 'num_layers is "4"; it must be'),
    "heads as boolean": ("flux", {"num_attention_heads": True}, None, None, XDiTModelError,
                         "num_attention_heads is true; it must be a positive integer"),
    "zero head dim": ("pixart", {"attention_head_dim": 0}, None, None, XDiTModelError,
                      "attention_head_dim is 0; it must be a positive integer"),
    "projection not the width": ("sd3", {"caption_projection_dim": 60}, None, None, XDiTModelError,
                                 "caption_projection_dim is 60 but the transformer is num_attention_heads × "
                                 "attention_head_dim = 4 × 16 = 64 wide; they must be equal"),
    "width not in thirds": ("pixart", {"attention_head_dim": 16, "cross_attention_dim": 64}, None, None,
                            XDiTModelError, "the width 64 (num_attention_heads × attention_head_dim) is not a "
                                            "multiple of 3, which PixArt's size conditioning"),
    "rotary axes": ("flux", {"axes_dims_rope": [4, 4, 4]}, None, None, XDiTModelError,
                    "axes_dims_rope [4, 4, 4] must be three positive even sizes summing to attention_head_dim 16"),
    "absurd depth": ("flux", {"num_layers": 10**9}, None, None, XDiTModelError,
                     "1000000004 blocks 64 wide make a model of at least 4.9e+13 parameters, over the 1e+12"),
    "absurd heads": ("sd3", {"num_attention_heads": 10**7, "caption_projection_dim": 16 * 10**7}, None, None,
                     XDiTModelError, "4 blocks 160000000 wide make a model of at least 1.2e+18 parameters"),
    "family of another class": ("flux", None, "sd3", None, XDiTConfigError,
                                "family 'sd3' contradicts the model: its config names FluxTransformer2DModel, a "
                                "flux model; pass 'flux' or leave the family to detection"),
    "family of a weight file": ("pixart", "file", "flux", None, XDiTConfigError,
                                "family 'flux' contradicts the model: its config names PixArtTransformer2DModel"),
    "unknown family": ("sd3", None, "sdxl", None, XDiTConfigError, "unknown family 'sdxl'; valid families: flux, sd3"),
    "variant of another family": ("sd3", None, None, "dev", XDiTConfigError,
                                  "unknown variant 'dev' for sd3; valid variants: sd3"),
    "schnell for dev": ("flux", "file", None, "schnell", XDiTConfigError,
                        "variant 'schnell' contradicts the model: it has a guidance embedder (guidance_embeds), so it "
                        "is Flux dev; pass 'dev'"),
    "dev for schnell": ("flux_schnell", None, "flux", "dev", XDiTConfigError,
                        "variant 'dev' contradicts the model: it has no guidance embedder"),
    "sigma with size conditioning": ("pixart", None, None, "sigma", XDiTConfigError,
                                     "variant 'sigma' contradicts the model: it takes size conditioning"),
}


@pytest.mark.parametrize("case", list(BAD_MODELS))
def test_models_that_cannot_be_described_get_one_line(case, tiny_models, tmp_path):
    name, config, family, variant, error, needle = BAD_MODELS[case]
    path = tiny_models[name]
    if config == "file":
        path = lone_weight_file(path, tmp_path, name)
    elif config is not None:
        path = tmp_path / name
        shutil.copytree(tiny_models[name], path)
        if isinstance(config, dict):
            stated = json.loads((path / "config.json").read_text())
            config = json.dumps({k: v for k, v in {**stated, **config}.items() if v is not DROP})
        (path / "config.json").write_text(config)
    for call in (describe_model, load_model):
        with pytest.raises(error) as e:
            call(str(path), family=family, variant=variant)
        assert needle in str(e.value) and "\n" not in str(e.value)
