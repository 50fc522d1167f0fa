"""ComfyUI nodes of comfyui-xdit: the only package that knows ComfyUI (imported lazily inside the nodes)."""
from .loader import XDiTLoadModel
from .mesh import XDiTParallelMesh
from .sampler import XDiTSampler, XDiTSamplerAdvanced
from .unload import XDiTUnload

NODE_CLASS_MAPPINGS = {
    "XDiTLoadModel": XDiTLoadModel,
    "XDiTParallelMesh": XDiTParallelMesh,
    "XDiTSampler": XDiTSampler,
    "XDiTSamplerAdvanced": XDiTSamplerAdvanced,
    "XDiTUnload": XDiTUnload,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "XDiTLoadModel": "xDiT Load Diffusion Model",
    "XDiTParallelMesh": "xDiT Parallel Mesh",
    "XDiTSampler": "xDiT Sampler",
    "XDiTSamplerAdvanced": "xDiT Sampler (Advanced)",
    "XDiTUnload": "xDiT Unload",
}
