"""LoRAs: files of every layout, read for every family and applied at run time, equal the same LoRA merged into
the weights of a plain model (tests/lora_files.py merges them on its own); strengths, stacking, removal, partial
models, and the files that are refused."""
import pytest
import torch
from safetensors.torch import save_file

from lora_files import LAYOUTS, TEXT_ENCODER_KEY, make_lora, save_lora, write_merged
from xdit_core.errors import XDiTConfigError, XDiTModelError
from xdit_core.loading.load import ModelParts, load_model
from xdit_core.loading.lora import load_lora
from xdit_core.models import BranchCond, make_adapter
from xdit_core.models.lora import apply_loras

FAMILIES = ("flux", "sd3", "pixart")  # tiny_models' names of one model per family
TOLERANCE = 1e-5  # fp32, relative L2 of the model output
LAYOUT_NAMES = {
    "peft": "diffusers/PEFT (diffusers names)", "diffusers": "diffusers/PEFT (diffusers names)",
    "onetrainer": "OneTrainer/LyCORIS (diffusers names with underscores)",
    "comfyui": "ComfyUI/BFL (original single-file names)", "bfl": "ComfyUI/BFL (original single-file names)",
    "kohya": "kohya/sd-scripts (lora_unet_ + original names with underscores)",
}


@pytest.fixture(scope="module")
def bases(tiny_models):
    return {family: load_model(tiny_models[family]) for family in FAMILIES}


def inputs(spec, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, spec.latent_channels, 8, 8, generator=gen).to(dtype)
    text = torch.randn(1, 5, spec.text_dim, generator=gen)
    pooled = torch.randn(1, spec.pooled_dim, generator=gen) if spec.pooled_dim else None
    t = torch.tensor([0.6]) if spec.family == "flux" else torch.tensor([600.0])
    return x, t, BranchCond(text, pooled), 3.5


def predict(model, spec):
    with torch.no_grad():
        return make_adapter(model, spec).predict(*inputs(spec, next(model.parameters()).dtype)).float()


def merged_model(tmp_path, family, base, loras):
    """The plain model (fp32) with `loras` merged into its weights: the reference."""
    return load_model(write_merged(tmp_path / "merged.safetensors", family, base, loras))[0]


def merged_output(tmp_path, family, base, spec, loras):
    return predict(merged_model(tmp_path, family, base, loras), spec)


def assert_layers_match(model, merged, names):
    """Layer by layer, the hooked layers compute what the merged ones do, and differ from the plain ones: the
    forward pass alone hardly sees some layers of a tiny model (SD3's text stream barely reaches its output)."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in names:
            ours, reference = model.get_submodule(name), merged.get_submodule(name)
            x = torch.randn(3, ours.in_features, generator=gen)
            assert relative_error(ours(x), reference(x)) <= TOLERANCE, name
            assert relative_error(torch.nn.functional.linear(x, ours.weight, ours.bias), reference(x)) > 1e-3, name


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def linear_names(model, held_only=False):
    return {n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and not (held_only and m.weight.is_meta)}


def read(lora, tmp_path, family, model, name="lora.safetensors"):
    return load_lora(save_lora(lora, tmp_path / name), family, model.state_dict())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_lora_at_run_time_equals_it_merged_into_the_weights(family, layout, bases, tmp_path):
    base, spec = bases[family]
    lora = make_lora(family, base, layout, seed=FAMILIES.index(family), text_encoder=layout == "kohya")
    weights = read(lora, tmp_path, family, base)
    assert weights.layout == LAYOUT_NAMES[layout] and weights.family == family
    assert set(weights.modules) == linear_names(base)  # every Linear, fused original layers split into all parts
    assert weights.ignored == ((f"{TEXT_ENCODER_KEY}.lora_down.weight", f"{TEXT_ENCODER_KEY}.lora_up.weight")
                               if layout == "kohya" else ())
    before = predict(base, spec)
    merged = merged_model(tmp_path, family, base, [(lora, 0.8)])
    reference = predict(merged, spec)
    with apply_loras(base, [(weights, 0.8)]) as handle:
        assert set(handle.modules) == set(weights.modules)
        ours = predict(base, spec)
        assert_layers_match(base, merged, weights.modules)
    assert relative_error(ours, reference) <= TOLERANCE
    assert relative_error(before, reference) > 0.1  # the LoRA changes the output: the comparison can fail
    assert torch.equal(predict(base, spec), before)  # removed: the base output, bit for bit


def test_strength_zero_is_the_base_and_strengths_change_without_reloading(bases, tmp_path):
    base, spec = bases["flux"]
    lora = make_lora("flux", base, "comfyui", seed=5)
    weights = read(lora, tmp_path, "flux", base)
    before = predict(base, spec)
    with apply_loras(base, [(weights, 0.0)]) as handle:
        assert torch.equal(predict(base, spec), before)
        handle.set_strengths([1.3])
        assert handle.strengths == (1.3,)
        assert relative_error(predict(base, spec), merged_output(tmp_path, "flux", base, spec, [(lora, 1.3)])) \
            <= TOLERANCE
        with pytest.raises(XDiTConfigError, match="2 LoRA strengths for 1 LoRAs"):
            handle.set_strengths([1.0, 1.0])
        with pytest.raises(XDiTConfigError, match="LoRA strength nan is not a finite number"):
            handle.set_strengths([float("nan")])
    assert torch.equal(predict(base, spec), before)


def test_two_loras_stack_in_one_call_and_in_two(bases, tmp_path):
    base, spec = bases["sd3"]
    first = make_lora("sd3", base, "peft", seed=6)
    second = make_lora("sd3", base, "kohya", seed=7, only=lambda name: name.startswith(("joint_blocks.1.",
                                                                                          "joint_blocks.3.")))
    a, b = read(first, tmp_path, "sd3", base, "a.safetensors"), read(second, tmp_path, "sd3", base, "b.safetensors")
    merged = merged_model(tmp_path, "sd3", base, [(first, 0.7), (second, -0.6)])
    reference = predict(merged, spec)
    before = predict(base, spec)
    with apply_loras(base, [(a, 0.7), (b, -0.6)]):
        assert relative_error(predict(base, spec), reference) <= TOLERANCE
        assert_layers_match(base, merged, a.modules)
    with apply_loras(base, [(a, 0.7)]), apply_loras(base, [(b, -0.6)]):
        assert relative_error(predict(base, spec), reference) <= TOLERANCE
    assert torch.equal(predict(base, spec), before)


def test_a_partial_model_applies_only_the_layers_it_holds(tiny_models, bases, tmp_path):
    """Two PipeFusion-like stages of Flux (blocks 0-2 with the embedder, 3-5 with the head), each converting the
    LoRA from its own partly-meta model, compute what the merged whole model computes."""
    base, spec = bases["flux"]
    lora = make_lora("flux", base, "kohya", seed=8)
    path = save_lora(lora, tmp_path / "lora.safetensors")
    stages = [load_model(tiny_models["flux"], parts=ModelParts(range(0, 3), embed=True, head=False))[0],
              load_model(tiny_models["flux"], parts=ModelParts(range(3, 6), embed=False, head=True))[0]]
    handles = []
    try:
        for stage in stages:
            weights = load_lora(path, "flux", stage.state_dict())
            assert set(weights.modules) == linear_names(base)
            handles.append(apply_loras(stage, [(weights, 0.9)]))
            assert set(handles[-1].modules) == linear_names(stage, held_only=True) < set(weights.modules)
        # Flat blocks 0-2 are the double blocks 0, 1 and the single block 0; 3-5 the single blocks 1-3.
        first, second = set(handles[0].modules), set(handles[1].modules)
        assert {"x_embedder", "transformer_blocks.1.attn.to_q", "single_transformer_blocks.0.proj_mlp"} <= first
        assert {"proj_out", "norm_out.linear", "single_transformer_blocks.1.proj_mlp"} <= second
        assert first & second == {n for n in first if n.startswith(("time_text_embed.", "context_embedder"))}
        a, b = make_adapter(stages[0], spec), make_adapter(stages[1], spec)
        with torch.no_grad():
            tokens = a.embed(*inputs(spec))
            for block, run in a.blocks()[:3] + b.blocks()[3:]:
                tokens = run(block, tokens)
            out = b.head(tokens)
    finally:
        for handle in handles:
            handle.remove()
    assert relative_error(out, merged_output(tmp_path, "flux", base, spec, [(lora, 0.9)])) <= TOLERANCE


FUSED_DIFF_LAYERS = {
    "flux": {"double_blocks.0.img_attn.qkv", "single_blocks.1.linear1", "final_layer.adaLN_modulation.1",
             "img_in"},
    "sd3": {"joint_blocks.3.context_block.adaLN_modulation.1", "joint_blocks.0.x_block.attn.qkv"},
    "pixart": {"blocks.1.cross_attn.kv_linear", "t_block.1"},
}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_weight_and_bias_diffs_equal_them_merged(family, bases, tmp_path):
    base, spec = bases[family]
    lora = make_lora(family, base, "comfyui", seed=9, full_diffs=True, only=FUSED_DIFF_LAYERS[family].__contains__)
    assert set(lora.layers) == FUSED_DIFF_LAYERS[family]
    weights = read(lora, tmp_path, family, base)
    assert all(d.diff is not None and d.bias is not None and d.down is None for d in weights.modules.values())
    merged = merged_model(tmp_path, family, base, [(lora, 1.5)])
    reference = predict(merged, spec)
    with apply_loras(base, [(weights, 1.5)]):
        ours = predict(base, spec)
        assert_layers_match(base, merged, weights.modules)
    assert relative_error(ours, reference) <= TOLERANCE
    assert relative_error(predict(base, spec), reference) > 1e-3


def test_flux_fused_layers_split_as_the_bfl_layout_stacks_them(bases, tmp_path):
    """Written out by hand, apart from key_mapping: qkv = q, k, v; linear1 = q, k, v, MLP in; the final adaLN is
    (shift, scale) in BFL's layout and (scale, shift) in diffusers'. One shared down-matrix, not copies."""
    base, _ = bases["flux"]
    fused = ("double_blocks.1.txt_attn.qkv", "single_blocks.2.linear1", "final_layer.adaLN_modulation.1")
    lora = make_lora("flux", base, "bfl", seed=10, only=fused.__contains__)
    weights = read(lora, tmp_path, "flux", base)
    hidden = base.config.num_attention_heads * base.config.attention_head_dim
    qkv, linear1 = lora.layers[fused[0]].up, lora.layers[fused[1]].up
    expected = {
        "transformer_blocks.1.attn.add_q_proj": qkv[:hidden],
        "transformer_blocks.1.attn.add_k_proj": qkv[hidden:2 * hidden],
        "transformer_blocks.1.attn.add_v_proj": qkv[2 * hidden:],
        "single_transformer_blocks.2.attn.to_q": linear1[:hidden],
        "single_transformer_blocks.2.attn.to_k": linear1[hidden:2 * hidden],
        "single_transformer_blocks.2.attn.to_v": linear1[2 * hidden:3 * hidden],
        "single_transformer_blocks.2.proj_mlp": linear1[3 * hidden:],
        "norm_out.linear": torch.cat([lora.layers[fused[2]].up[hidden:], lora.layers[fused[2]].up[:hidden]]),
    }
    assert set(weights.modules) == set(expected)
    for name, up in expected.items():
        assert torch.equal(weights.modules[name].up, up), name
        assert weights.modules[name].scale == 1.0  # BFL's files carry no alpha
    downs = {id(weights.modules[f"single_transformer_blocks.2.{m}"].down)
             for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
    assert len(downs) == 1


def test_kohya_flux_keys_map_as_diffusers_converter_maps_them(bases, tmp_path):
    """Our kohya mapping against diffusers' own converter, on every layer both handle alike. Left out: linear1,
    for which the converter hard-codes FLUX.1's widths, and the final layer, which diffusers gets wrong in
    versions we allow: 0.36 swaps the halves of its down-matrix rows as well as the up-matrix's, 0.39 drops its
    alpha (ComfyUI, and we, scale every layer by alpha / rank; the split is checked by hand above)."""
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    base, _ = bases["flux"]
    lora = make_lora("flux", base, "kohya", seed=11, text_encoder=True,
                     only=lambda name: not name.endswith(".linear1") and not name.startswith("final_layer."))
    weights = read(lora, tmp_path, "flux", base)
    theirs = conversion._convert_kohya_flux_lora_to_diffusers(dict(lora.tensors))
    theirs = {k.removeprefix("transformer."): v for k, v in theirs.items() if not k.startswith("text_encoder.")}
    assert {k.rsplit(".", 2)[0] for k in theirs} == set(weights.modules)
    for name, d in weights.modules.items():
        ours = (d.up.double() @ d.down.double()) * d.scale
        assert torch.allclose(theirs[f"{name}.lora_B.weight"].double() @ theirs[f"{name}.lora_A.weight"].double(),
                              ours, rtol=1e-6, atol=1e-7), name
        assert d.scale == 0.5  # alpha 2, rank 4


def test_bf16_model_runs_the_lora_in_bf16_as_accurately_as_merging(tiny_models, bases, tmp_path):
    """In bf16 the run-time LoRA is as far from the fp32 merge as a bf16 model with the LoRA merged in (ComfyUI's
    way) is: computing the delta in bf16 costs nothing measurable (tiny PixArt: 0.0054 both)."""
    base, spec = bases["pixart"]
    lora = make_lora("pixart", base, "kohya", seed=12)
    model, _ = load_model(tiny_models["pixart"], dtype="bf16")
    weights = read(lora, tmp_path, "pixart", model)
    with apply_loras(model, [(weights, 1.0)]) as handle:
        ours = predict(model, spec)
    factors = {id(t): t for d in weights.modules.values() for t in (d.down, d.up)}
    assert handle.nbytes == sum(t.numel() * 2 for t in factors.values())  # each cast once, to bf16
    path = write_merged(tmp_path / "merged.safetensors", "pixart", base, [(lora, 1.0)])
    reference = predict(load_model(path)[0], spec)
    merged_in_bf16 = predict(load_model(path, "bf16")[0], spec)
    assert relative_error(ours, reference) <= 1.2 * relative_error(merged_in_bf16, reference)
    assert relative_error(predict(base, spec), reference) > 0.1


def test_another_models_lora_or_layers_are_refused(bases, tmp_path):
    base, _ = bases["flux"]
    lora = make_lora("flux", base, "peft", seed=13)
    rank_4 = {"lora_A.weight": torch.zeros(4, 64), "lora_B.weight": torch.zeros(64, 4)}
    for layer, needle in (("transformer.transformer_blocks.7.attn.to_q",
                           r"; its names exist in the full-size flux models: a LoRA for another flux model \(more blocks"),
                          ("transformer.foo.bar", r"; a LoRA is applied whole or not at all")):
        path = tmp_path / "extra.safetensors"
        save_file({**lora.tensors, **{f"{layer}.{k}": v for k, v in rank_4.items()}}, str(path))
        with pytest.raises(XDiTModelError, match=r"1 of the LoRA's 63 layers match no layer of this flux model "
                                                 r"\(layout detected: diffusers/PEFT \(diffusers names\)\): "
                                                 + layer.replace(".", r"\.") + needle):
            load_lora(path, "flux", base.state_dict())


@pytest.mark.parametrize("made_for,layout,loaded_for,needle", [
    ("flux", "peft", "sd3", r"is a LoRA for flux \(diffusers/PEFT \(diffusers names\)\), not for this sd3 model"),
    ("sd3", "kohya", "flux", r"is a LoRA for sd3 \(kohya/sd-scripts .*\), not for this flux model"),
    ("pixart", "comfyui", "sd3", r"is a LoRA for pixart \(ComfyUI/BFL .*\), not for this sd3 model"),
    # SD3's diffusers names are all Flux's too (both are MMDiTs): the names cannot tell which.
    ("sd3", "diffusers", "pixart", r"is a LoRA for flux or sd3 \(diffusers/PEFT .*\), not for this pixart model"),
])
def test_another_familys_lora_is_refused(made_for, layout, loaded_for, needle, bases, tmp_path):
    path = save_lora(make_lora(made_for, bases[made_for][0], layout), tmp_path / "lora.safetensors")
    with pytest.raises(XDiTModelError, match=needle):
        load_lora(path, loaded_for, bases[loaded_for][0].state_dict())


BAD_FILES = {
    "dora": ({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64),
              "transformer.x_embedder.lora_B.weight": torch.zeros(64, 4),
              "transformer.x_embedder.dora_scale": torch.ones(1, 64)}, r"DoRA tensors \(e\.g\. transformer\.x_embed"),
    "loha": ({"lora_unet_img_in.hada_w1_a": torch.zeros(64, 4)}, "LyCORIS LoHa tensors"),
    "not a LoRA": ({"x_embedder.weight": torch.zeros(64, 64)}, "x_embedder.weight is not a LoRA tensor"),
    "up alone": ({"x_embedder.lora_B.weight": torch.zeros(64, 4)}, "x_embedder has a LoRA up-matrix without its "
                                                                   "down-matrix"),
    "ranks": ({"x_embedder.lora_A.weight": torch.zeros(4, 64), "x_embedder.lora_B.weight": torch.zeros(64, 8)},
              r"a down-matrix of rank 4 \(\[4, 64\]\) and an up-matrix of rank 8"),
    "size": ({"diffusion_model.img_in.lora_A.weight": torch.zeros(4, 3072),
              "diffusion_model.img_in.lora_B.weight": torch.zeros(3072, 4)},
             r"img_in \(down\) has shape \[4, 3072\], but the model's layer img_in.weight is \[64, 64\]: a LoRA "
             r"for another model \(size or family\)"),
    "twice": ({"x_embedder.lora_A.weight": torch.zeros(4, 64), "x_embedder.lora_B.weight": torch.zeros(64, 4),
               "img_in.lora_A.weight": torch.zeros(4, 64), "img_in.lora_B.weight": torch.zeros(64, 4)},
              "land on the model's x_embedder"),
    "text encoder only": ({f"{TEXT_ENCODER_KEY}.lora_down.weight": torch.zeros(4, 8)},
                          r"holds no LoRA tensors for the diffusion model \(only text-encoder keys\)"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_unsupported_or_broken_loras_are_refused(case, bases, tmp_path):
    tensors, needle = BAD_FILES[case]
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(XDiTModelError, match=needle):
        load_lora(path, "flux", bases["flux"][0].state_dict())


def test_conv_layers_pickles_and_missing_files_are_refused(bases, tmp_path):
    shapes = bases["sd3"][0].state_dict()
    path = tmp_path / "conv.safetensors"
    save_file({"transformer.pos_embed.proj.lora_A.weight": torch.zeros(4, 16, 2, 2),
               "transformer.pos_embed.proj.lora_B.weight": torch.zeros(64, 4, 1, 1)}, str(path))
    with pytest.raises(XDiTModelError, match=r"targets pos_embed.proj.weight of shape \[64, 16, 2, 2\], not a Linear "
                                             r"layer"):
        load_lora(path, "sd3", shapes)
    (tmp_path / "lora.ckpt").write_bytes(b"pickle")
    with pytest.raises(XDiTModelError, match="is a pickle checkpoint; only safetensors are loaded"):
        load_lora(tmp_path / "lora.ckpt", "sd3", shapes)
    with pytest.raises(XDiTModelError, match="LoRA file not found"):
        load_lora(tmp_path / "absent.safetensors", "sd3", shapes)


def test_apply_refuses_a_lora_read_for_another_family(bases, tmp_path):
    weights = read(make_lora("flux", bases["flux"][0], "peft"), tmp_path, "flux", bases["flux"][0])
    with pytest.raises(XDiTModelError, match=r"was read for a flux model; this model is SD3Transformer2DModel"):
        apply_loras(bases["sd3"][0], [(weights, 1.0)])
