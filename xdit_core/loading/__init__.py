"""Reading weights offline: diffusers folders, original single files and all-in-one checkpoints, fp8, partial (per-stage) loading."""
