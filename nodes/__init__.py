"""ComfyUI nodes of comfyui-xdit: the only package that knows ComfyUI (imported lazily inside the nodes)."""
from .comfy_model import XDiTSamplingModel
from .guider import XDiTGuider
from .loader import XDiTLoadModel
from .lora import XDiTLoRA
from .mesh import XDiTParallelMesh
from .sampler import XDiTSampler, XDiTSamplerAdvanced
from .unload import XDiTUnload

NODE_CLASS_MAPPINGS = {
    "XDiTLoadModel": XDiTLoadModel,
    "XDiTLoRA": XDiTLoRA,
    "XDiTParallelMesh": XDiTParallelMesh,
    "XDiTSampler": XDiTSampler,
    "XDiTSamplingModel": XDiTSamplingModel,
    "XDiTGuider": XDiTGuider,
    "XDiTSamplerAdvanced": XDiTSamplerAdvanced,
    "XDiTUnload": XDiTUnload,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "XDiTLoadModel": "xDiT Load Diffusion Model",
    "XDiTLoRA": "xDiT LoRA",
    "XDiTParallelMesh": "xDiT Parallel Mesh",
    "XDiTSampler": "xDiT Sampler",
    "XDiTSamplingModel": "xDiT Model for ComfyUI Samplers",
    "XDiTGuider": "xDiT Guider",
    "XDiTSamplerAdvanced": "xDiT Sampler (Advanced)",
    "XDiTUnload": "xDiT Unload",
}
