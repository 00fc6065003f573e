"""run_script: under torchrun a finished rank leaves by os._exit after the exit handlers, so a crash in the
interpreter's teardown (gloo's C++ threads on a rank whose peers still run) cannot fail a run that wrote everything."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = """
import atexit, os, sys
from opendit.parallel.process import run_script


class AbortsInTeardown:
    def __del__(self):  # collected while the interpreter tears down, like a native object whose destructor aborts
        os.abort()


teardown_bomb = AbortsInTeardown()


def main():
    atexit.register(lambda: open(sys.argv[1], "w").write("exit handlers ran"))
    print("output before the exit", flush=False)
    if sys.argv[2] != "return":
        sys.exit(int(sys.argv[2]))


run_script(main)
"""


def run(tmp_path, world_size: int, status: str) -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, WORLD_SIZE=str(world_size))
    return subprocess.run([sys.executable, str(script), str(tmp_path / "handlers"), status], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("status", ["return", "0", "2"])
def test_torchrun_worker_skips_teardown_after_exit_handlers(tmp_path, status):
    result = run(tmp_path, world_size=2, status=status)
    assert result.returncode == (0 if status == "return" else int(status)), result.stderr
    assert (tmp_path / "handlers").read_text() == "exit handlers ran"
    assert result.stdout == "output before the exit\n"


def test_single_process_keeps_the_normal_exit(tmp_path):
    """Without torchrun nothing changes: here the teardown runs (and the planted destructor aborts)."""
    result = run(tmp_path, world_size=1, status="return")
    assert result.returncode == -6 and (tmp_path / "handlers").read_text() == "exit handlers ran"
