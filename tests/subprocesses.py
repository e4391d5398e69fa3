"""Running a test's Python script in a fresh interpreter (accelerate's state is a process-wide singleton)."""

import os
import subprocess
import sys


def run_two_process_script(script: str, *, timeout: int = 180) -> str:
    """Run ``script`` (which launches its own processes and prints ``OK`` in each) and return its stdout;
    fails the test with the script's output unless it exits 0 with two ``OK`` lines."""
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=environment
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("OK") == 2, result.stdout + result.stderr
    return result.stdout
