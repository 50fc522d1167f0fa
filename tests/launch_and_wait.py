"""A launcher for tests/test_liveness.py to SIGKILL: spawns 2 ranks that record their pids and wait."""
import sys

import liveness_world
from xdit_core.runtime.launch import spawn_world

if __name__ == "__main__":
    spawn_world(liveness_world.record_pid_and_wait, 2, sys.argv[1], threads=1)
