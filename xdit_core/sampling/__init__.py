"""ComfyUI-exact schedulers, samplers and noise, and the SampleRequest they run on."""
