"""run_script: a finished script leaves by os._exit after the exit handlers, so the interpreter's teardown (slow, and
under torchrun a crash in gloo's C++ threads on a rank whose peers still run) cannot delay or fail a run that wrote
everything."""
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


if sys.argv[3] == "run_script":
    run_script(main)
else:  # the control: a plain script, whose teardown runs (and aborts)
    main()
"""


def run(tmp_path, world_size: int, status: str, how: str = "run_script") -> subprocess.CompletedProcess:
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, WORLD_SIZE=str(world_size))
    return subprocess.run([sys.executable, str(script), str(tmp_path / "handlers"), status, how], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("status", ["return", "0", "2"])
def test_script_skips_teardown_after_exit_handlers(tmp_path, status, world_size):
    result = run(tmp_path, world_size, status)
    assert result.returncode == (0 if status == "return" else int(status)), result.stderr
    assert (tmp_path / "handlers").read_text() == "exit handlers ran"
    assert result.stdout == "output before the exit\n"


def test_plain_script_dies_in_the_teardown(tmp_path):
    """The control: without run_script the teardown runs and the planted destructor aborts."""
    result = run(tmp_path, world_size=1, status="return", how="plain")
    assert result.returncode == -6 and (tmp_path / "handlers").read_text() == "exit handlers ran"


def test_device_cuda_without_a_gpu_is_a_usage_error(monkeypatch):
    import torch

    from opendit.errors import UsageError
    from opendit.parallel.process import setup_distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match=r"^--device cuda: no CUDA GPU is available here \(use --device cpu or auto\)$"):
        setup_distributed("cuda")
