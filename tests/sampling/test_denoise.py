"""Where the denoising step runs as CUDA graphs: --compile / --cuda_graph on a CUDA device whenever the step has no
collectives, whatever the number of ranks (sample_ddp.py and sample.py's data-parallel ranks step alone); steps with
--cfg_parallel or sequence parallelism stay eager. On GPUs: a process group up does not stop the capture, and
sample_ddp.py on two GPUs captures on both ranks and writes one process's images."""
import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

from opendit.sampling.denoise import _ENGINES, denoise, get_engine, graph_on

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA = torch.device("cuda")


def _args(**kw):
    base = dict(sampler="ddim", num_sampling_steps=5, noise_schedule="linear", cfg_scale=4.0, cfg_channels="3", num_classes=10, vae="ema",
                mixed_precision="bf16", compile=False, cuda_graph=True, sequence_parallel_size=1)
    return argparse.Namespace(**{**base, **kw})


def test_graph_on_wherever_the_step_has_no_collectives():
    assert graph_on(_args(), CUDA) and graph_on(_args(cuda_graph=False, compile=True), CUDA)
    assert not graph_on(_args(cuda_graph=False), CUDA)  # not asked for
    assert not graph_on(_args(), torch.device("cpu"))
    assert not graph_on(_args(sequence_parallel_size=2), CUDA)  # the attention's collectives
    assert not graph_on(_args(), CUDA, cfg_group=object())  # the halves' all-gather
    assert graph_on(argparse.Namespace(**{k: v for k, v in vars(_args()).items() if k != "sequence_parallel_size"}), CUDA)  # sample_ddp.py's args


def _model(device):
    from opendit.models import DiT

    torch.manual_seed(0)
    model = DiT(depth=2, hidden_size=64, num_heads=4, in_channels=4, num_classes=10, input_size=8, patch_size=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    return model.to(device)


def _sample(args, model, z, y):
    _ENGINES.clear()
    with torch.no_grad():
        out = denoise(args, model, z, y)
    engine = get_engine(args, model, z.device)
    return out, engine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_capture_with_a_process_group_up(tmp_path):
    """The step captured while a process group is initialised (thread-local capture mode) gives the graph of a lone process."""
    model = _model(CUDA)
    z, y = torch.randn(3, 4, 8, 8, device=CUDA), torch.tensor([1, 5, 9], device=CUDA)
    alone, engine = _sample(_args(), model, z, y)
    assert engine.cuda_graph and engine.graphs
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        grouped, engine = _sample(_args(), model, z, y)
    finally:
        dist.destroy_process_group()
    assert engine.cuda_graph and engine.graphs
    assert grouped.isfinite().all() and torch.equal(grouped, alone)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_sample_ddp_captures_on_two_gpus_and_matches_one(tmp_path):
    from opendit.builders import build_model

    config = dict(model="DiT-S/2", input_size=16, in_channels=3, num_classes=8, depth=2, hidden_size=64, num_heads=2)
    torch.manual_seed(0)
    model = build_model(config)
    state = {k: 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    ckpt = tmp_path / "tiny.pt"
    torch.save({"ema": state, "config": {"model": config, "args": dict(model="DiT-S/2", vae="none", image_size=16, num_classes=8, noise_schedule="linear")}}, ckpt)
    flags = ["--ckpt", str(ckpt), "--num_fid_samples", "8", "--per_proc_batch_size", "2", "--num_sampling_steps", "5", "--sampler", "ddim", "--cuda_graph"]
    script = os.path.join(ROOT, "tests", "sampling", "ddp_graphs.py")
    runs = {"two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", script],
            "one": [sys.executable, script]}
    arrays = {}
    for name, cmd in runs.items():
        result = subprocess.run([*cmd, *flags, "--sample_dir", str(tmp_path / name)], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        assert result.stdout.count("captured: yes") == (2 if name == "two" else 1), result.stdout
        (npz,) = [f for f in os.listdir(tmp_path / name) if f.endswith(".npz")]
        arrays[name] = np.load(tmp_path / name / npz)["arr_0"]
    assert arrays["two"].shape == (8, 16, 16, 3) and np.array_equal(arrays["two"], arrays["one"])
