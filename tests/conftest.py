import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny diffusers folders of every family and variant, written once per session."""
    from xdit_core.cli.tiny import write_tiny

    root = tmp_path_factory.mktemp("models")
    specs = {"flux": ("flux", "dev"), "flux_schnell": ("flux", "schnell"), "sd3": ("sd3", None),
             "pixart": ("pixart", "alpha"), "pixart_sigma": ("pixart", "sigma")}
    return {name: write_tiny(fam, root / name, seed=1, variant=var) for name, (fam, var) in specs.items()}
