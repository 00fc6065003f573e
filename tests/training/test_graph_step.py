"""The CUDA-graph training step: the same losses, weights and EMA as the eager TrainStep; refused where it cannot run.
And the eager TrainStep with fused AdamW, which clips by dividing the gradients, as the in-place clipping path."""
import argparse

import pytest
import torch

from opendit.errors import UsageError
from opendit.training.args import check_flags, get_parser
from opendit.training.graph_step import CudaGraphStep, graph_step_refusal, maybe_graph_step
from opendit.training.optim import lr_factor
from tiny import run_steps as run, tiny_step  # tests/tiny.py


@pytest.mark.gpu
@pytest.mark.parametrize("overlap_ema", [True, False])
def test_graph_step_matches_eager_step(overlap_ema):
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device("cuda")
    eager = run(tiny_step(device))
    graph_step = CudaGraphStep(tiny_step(device), warmup=2, overlap_ema=overlap_ema)
    graph = run(graph_step)
    assert graph_step.graph is not None  # steps 3-7 were replays
    torch.testing.assert_close(graph[0], eager[0], rtol=1e-5, atol=1e-6)
    assert graph[1] == eager[1]
    for a, b in zip(graph[2] + graph[3], eager[2] + eager[3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_train_step_with_a_deferred_ema_matches_the_immediate_one():
    """The graph step's EMA wiring (begin before the forward, join before AdamW), run eagerly on the CPU."""
    immediate = run(tiny_step(torch.device("cpu")))
    step = tiny_step(torch.device("cpu"))
    step.ema.defer()
    deferred = run(step)
    for a, b in zip(deferred[2] + deferred[3], immediate[2] + immediate[3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.gpu
def test_graph_step_refuses_a_new_shape():
    graph_step = CudaGraphStep(tiny_step(torch.device("cuda")), warmup=1)
    run(graph_step, steps=2)
    with pytest.raises(ValueError, match="captured for"):
        graph_step(torch.randn(2, 4, 8, 8, device="cuda"), {"y": torch.zeros(2, dtype=torch.long, device="cuda")})


@pytest.mark.parametrize(
    "world, cuda, precision, sp, ckpt, why",
    [(1, True, "bf16", 1, False, None), (1, False, "bf16", 1, False, "CUDA"), (2, True, "bf16", 1, False, "one process"),
     (1, True, "fp16", 1, False, "fp16"), (1, True, "bf16", 2, False, "sequence"), (1, True, "fp32", 1, True, "grad_checkpoint")],
)
def test_graph_step_refusal(world, cuda, precision, sp, ckpt, why):
    got = graph_step_refusal(world, cuda, precision, sp, ckpt)
    assert got is None if why is None else why in got


def test_cuda_graph_flag_on_cpu_or_zero2_is_one_line_error_and_auto_falls_back():
    args = get_parser().parse_args(["--cuda_graph", "on", "--device", "cpu", "--model", "DiT-S/2", "--vae", "none", "--image_size", "32"])
    with pytest.raises(UsageError, match="--cuda_graph on: needs a CUDA GPU"):
        check_flags(args, 1)
    with pytest.raises(UsageError, match="--cuda_graph on: needs a CUDA GPU"):
        maybe_graph_step(args, None, 1, torch.device("cpu"))
    args = argparse.Namespace(cuda_graph="on", mixed_precision="bf16", sequence_parallel_size=1, grad_checkpoint=False)
    with pytest.raises(UsageError, match="one process only"):
        maybe_graph_step(args, None, 4, torch.device("cuda"))  # zero2 / zero3 / ddp on 4 processes
    step = tiny_step(torch.device("cpu"))
    args.cuda_graph = "auto"
    assert maybe_graph_step(args, step, 1, torch.device("cpu")) is step
    assert maybe_graph_step(args, step, 4, torch.device("cuda")) is step
    args.cuda_graph = "off"
    assert maybe_graph_step(args, step, 1, torch.device("cuda")) is step


def test_graph_step_refuses_the_fp16_scaler():
    step = tiny_step(torch.device("cpu"))
    step.scaler = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(UsageError, match="fp16"):
        CudaGraphStep(step)


def test_eager_step_split_keeps_the_schedule():
    """draw / update / finish: the LR each step reports follows the schedule, and the EMA moves towards the weights."""
    step = tiny_step(torch.device("cpu"))
    losses, lrs, params, ema = run(step, steps=4)
    assert lrs == [lr_factor("cosine", 2, 8, i) * 1e-3 for i in range(4)]
    assert torch.isfinite(losses).all()
    assert any(not torch.equal(p, e) for p, e in zip(params, ema))


def test_resume_keeps_this_runs_adamw_implementation():
    """A checkpoint from a foreach-AdamW run (the CPU's) resumed by a fused-AdamW run (the GPU's, here the CPU's fused
    one): its param groups name foreach, which takes no found_inf / grad_scale; load_state_dict keeps fused."""
    cpu = tiny_step(torch.device("cpu"))
    run(cpu, steps=2)
    fused = tiny_step(torch.device("cpu"), fused=True)
    assert fused.on_device_skip
    fused.optimizer.load_state_dict(cpu.optimizer.state_dict())
    fused.load_state_dict(cpu.state_dict(), lr=1e-3, weight_decay=0.0)
    assert fused.optimizer.param_groups[0]["fused"] and not fused.optimizer.param_groups[0]["foreach"]
    assert torch.isfinite(run(fused, steps=2)[0]).all()


def test_fused_adamw_clips_by_dividing_the_gradients():
    """With fused AdamW (the GPU's, here the CPU's) TrainStep leaves the gradients as they are and hands fused AdamW
    max(1, |g| / clip) to divide them by (one pass over the gradients less): the weights, EMA and norms of the in-place
    clipping path to fp32 rounding, with the clip engaged."""
    device = torch.device("cpu")
    clipped = tiny_step(device)  # foreach AdamW on the CPU: clip_grad_norm_ scales the gradients in place
    fused = tiny_step(device, fused=True)
    clipped.grad_clip = fused.grad_clip = 0.01  # below every step's gradient norm: each step is clipped
    a, b = run(clipped), run(fused)
    assert fused.clip_divisor > 1 and fused.optimizer.grad_scale is None  # the divisor path ran (and clipped), and was cleared
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-6)
    for x, y in zip(b[2] + b[3], a[2] + a[3]):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_graph_step_captures_after_loading_a_non_capturable_optimizer_state():
    """A checkpoint written without the graph step (capturable False in its param groups) replaces the groups when
    loaded after CudaGraphStep's __init__; the capture still runs."""
    graph_step = CudaGraphStep(tiny_step(torch.device("cuda")), warmup=1)
    plain = tiny_step(torch.device("cuda"))
    run(plain, steps=1)
    assert not plain.optimizer.param_groups[0]["capturable"]
    graph_step.optimizer.load_state_dict(plain.optimizer.state_dict())
    losses = run(graph_step, steps=3)[0]
    assert graph_step.graph is not None and torch.isfinite(losses).all()
