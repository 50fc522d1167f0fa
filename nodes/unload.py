"""xDiT Unload: frees the workers' GPUs; passes its input through so it can sit inside a graph."""
from __future__ import annotations


class XDiTUnload:
    CATEGORY = "xDiT"
    RETURN_TYPES = ("LATENT",)
    RETURN_NAMES = ("latent",)
    FUNCTION = "unload"
    OUTPUT_NODE = True
    DESCRIPTION = "Shut the xDiT worker pool down and free its GPU memory."

    @classmethod
    def INPUT_TYPES(cls):
        return {"optional": {"latent": ("LATENT", {"tooltip": "passed through unchanged"})}}

    @classmethod
    def IS_CHANGED(cls, **_):
        return float("nan")  # always run: unloading is a side effect, not a cached result

    def unload(self, latent=None):
        from xdit_core import api

        api.unload()
        return (latent,)
