"""ComfyUI nodes of comfyui-xdit: the only package that knows ComfyUI (imported lazily inside nodes).

The node classes (load model, parallel mesh, sample) arrive with the nodes issue; until then the
plugin registers none, so ComfyUI loads it cleanly and shows nothing half-built.
"""
NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}
