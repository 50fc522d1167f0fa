"""Running ranks: the per-rank job, the local and torchrun launchers, the Ray worker pool, reports."""
