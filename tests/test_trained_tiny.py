"""The tiny Flux trained on coloured shapes (xdit_core/assets, made by tools/train_tiny_flux.py, which never runs
here): it loads as shipped, has the expected layout, and has learned its classes, which random weights have not."""
import json

import pytest
import torch

from xdit_core.cli.demo import TRAINED_FLUX, load_shapes_classes
from xdit_core.cli.tiny import randomize
from xdit_core.loading.load import load_model
from xdit_core.models import make_adapter
from xdit_core.models.families import model_class
from xdit_core.runtime.job import run_request

STEPS = 4


@pytest.fixture(scope="module")
def classes():
    return load_shapes_classes()


def test_the_shipped_model_loads_with_its_layout(classes):
    model, spec = load_model(TRAINED_FLUX)
    assert (spec.family, spec.variant, spec.default_cfg) == ("flux", "schnell", 1.0)
    c = model.config
    assert (c.num_layers, c.num_single_layers, c.num_attention_heads, c.attention_head_dim) == (2, 4, 4, 24)
    assert (c.in_channels, c.joint_attention_dim, c.pooled_projection_dim, c.guidance_embeds) == (64, 32, 32, False)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    shards = sorted(TRAINED_FLUX.glob("*.safetensors"))
    assert len(shards) > 1 and all(f.stat().st_size < 5 * 10**6 for f in shards)  # no file over the repo's 5 MB
    assert sum(f.stat().st_size for f in shards) < 8 * 2**20  # a few MB in the repository
    assert len(classes.names) == 12 and classes.text.shape == (12, 4, 32) and classes.pooled.shape == (12, 32)
    assert classes.class_means.shape == (12, 3, classes.latent_size, classes.latent_size)
    # The basis is orthonormal: to_rgb inverts the training images' RGB -> latent map exactly.
    torch.testing.assert_close(classes.rgb_basis.T @ classes.rgb_basis, torch.eye(3), atol=1e-6, rtol=0)
    log = json.loads((TRAINED_FLUX.parent / "tiny_flux_shapes_training.json").read_text())
    stages = [log] + ([log["previous"]] if log.get("previous") else [])
    assert log["final_loss_ema"] < 0.05 * stages[-1]["first_loss"]  # from scratch (the first stage) to now


def _nearest_class_means(adapter, classes, labels):
    """Each sample's distance to every class's mean training image (RGB mean squared error), [B, classes]."""
    out = run_request(adapter, classes.request(adapter.spec, labels, STEPS, seed=0))
    rgb = classes.to_rgb(out)
    return ((rgb[:, None] - classes.class_means[None]) ** 2).mean(dim=(2, 3, 4))


def _colours(classes, labels):
    return [classes.names[k].split()[0] for k in labels]


def test_a_serial_sample_of_each_class_is_nearest_its_own_class_mean(classes):
    """Serial 4 euler steps, every class in one batch (seed 0): each image is closer to its own class's mean
    training image than to any other class's, but for at most two (a circle and a square of one colour are the
    closest means: the random positions blur both), and every image has its class's colour."""
    labels = list(range(len(classes.names)))
    nearest = _nearest_class_means(make_adapter(*load_model(TRAINED_FLUX)), classes, labels).argmin(dim=1).tolist()
    assert sum(n == k for n, k in zip(nearest, labels)) >= len(labels) - 2, nearest
    assert _colours(classes, nearest) == _colours(classes, labels), nearest


def test_random_weights_of_the_same_layout_are_not(classes):
    """Negative control: the same property fails for the architecture with random weights."""
    model, spec = load_model(TRAINED_FLUX)
    config = {k: v for k, v in model.config.items() if not k.startswith("_")}
    adapter = make_adapter(randomize(model_class("flux")(**config), seed=0), spec)
    labels = list(range(len(classes.names)))
    nearest = _nearest_class_means(adapter, classes, labels).argmin(dim=1).tolist()
    assert sum(n == k for n, k in zip(nearest, labels)) <= 3, nearest
    assert _colours(classes, nearest) != _colours(classes, labels)
