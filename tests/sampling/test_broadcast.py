"""Attention broadcast: off changes nothing, every=1 equals off, every=K really reuses outputs, and the drift is small."""
import argparse
import os

import pytest
import torch

from opendit.errors import UsageError
from opendit.models import Latte, VDiT
from opendit.models.attention import Attention
from opendit.sampling.denoise import _ENGINES, denoise
from opendit.sampling.sample import resolve_speed_flags


def _model(cls=Latte, std: float = 0.05):
    torch.manual_seed(0)
    model = cls(depth=2, hidden_size=32, num_heads=2, in_channels=4, num_classes=10, input_size=4, num_frames=4, patch_size=(1, 2, 2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(std * torch.randn_like(p))  # adaLN-Zero would zero every block's attention
    return model


def _args(**kw):
    base = dict(sampler="ddim", num_sampling_steps=10, noise_schedule="linear", cfg_scale=4.0, cfg_channels="3", num_classes=10, vae="ema",
                mixed_precision="fp32", compile=False, attention_broadcast=False, broadcast_range="0.2,0.8", broadcast_range_temporal="0.1,0.9",
                broadcast_every=2, broadcast_every_temporal=4, use_video=True)
    return argparse.Namespace(**{**base, **kw})


def _run(args, model, z, y):
    torch.manual_seed(7)
    with torch.no_grad():
        return denoise(args, model, z, y)


def _count_calls(model) -> list:
    """Wrap each block attention's attention_fn with a counter; returns the per-block counts (a list filled in place)."""
    counts = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        fn = block.attn.attention_fn

        def counted(q, k, v, i=i, fn=fn):
            counts[i] += 1
            return fn(q, k, v)

        block.attn.attention_fn = counted
    return counts


@pytest.fixture(autouse=True)
def _fresh_engines():
    _ENGINES.clear()
    yield
    _ENGINES.clear()


def test_off_is_bit_equal_and_leaves_no_wrapper():
    model, z, y = _model(), torch.randn(2, 4, 4, 4, 4), torch.tensor([1, 5])
    before = _run(_args(mixed_precision="bf16"), model, z, y)
    _run(_args(mixed_precision="bf16", attention_broadcast=True), model, z, y)  # a broadcast run in between
    assert all("forward" not in block.attn.__dict__ for block in model.blocks)  # detached after its loop
    _ENGINES.clear()
    after = _run(_args(mixed_precision="bf16"), model, z, y)
    assert torch.equal(before, after)


@pytest.mark.parametrize("cls", [Latte, VDiT])
def test_every_one_equals_off(cls):
    model, z, y = _model(cls), torch.randn(2, 4, 4, 4, 4), torch.tensor([1, 5])
    off = _run(_args(sampler="ddpm", mixed_precision="bf16"), model, z, y)
    on = _run(_args(sampler="ddpm", mixed_precision="bf16", attention_broadcast=True, broadcast_every=1, broadcast_every_temporal=1, broadcast_range="0,1", broadcast_range_temporal="0,1"), model, z, y)
    assert torch.equal(off, on)


def test_reuse_counts_latte():
    """10 DDIM steps: spatial range [2, 8) every 2 -> computed at 2, 4, 6; temporal [1, 9) every 4 -> at 1, 5."""
    model, z, y = _model(), torch.randn(2, 4, 4, 4, 4), torch.tensor([1, 5])
    counts = _count_calls(model)
    _run(_args(attention_broadcast=True), model, z, y)
    assert model.block_kinds == ["spatial", "temporal"]
    assert counts == [10 - 3, 10 - 6]
    counts[:] = [0, 0]
    _run(_args(attention_broadcast=True), model, z, y)  # the cached engine again: a new sample starts without a cache
    assert counts == [7, 4]


def test_reuse_counts_vdit_and_cfg_rows_cached_together():
    """VDiT's full attention follows the spatial range; cond + uncond rows are one batch, cached as one tensor."""
    model, z, y = _model(VDiT), torch.randn(3, 4, 4, 4, 4), torch.tensor([1, 5, 9])
    counts = _count_calls(model)
    seen = []
    for block in model.blocks:
        fn = block.attn.attention_fn
        block.attn.attention_fn = lambda q, k, v, fn=fn: (seen.append(q.shape[0]), fn(q, k, v))[1]
    _run(_args(attention_broadcast=True, broadcast_every=3), model, z, y)  # [2, 8) every 3 -> computed at 2, 5
    assert counts == [6, 6] and set(seen) == {6}


def test_drift_small_but_real():
    model, z, y = _model(), torch.randn(2, 4, 4, 4, 4), torch.tensor([1, 5])
    off = _run(_args(num_sampling_steps=20, attention_broadcast=False, mixed_precision="bf16"), model, z, y)
    on = _run(_args(num_sampling_steps=20, attention_broadcast=True, mixed_precision="bf16"), model, z, y)
    rel = ((on - off).norm() / off.norm()).item()
    assert 0 < rel < 0.05, rel


@pytest.mark.parametrize("kw,message", [
    (dict(compile=True), "--compile"),
    (dict(use_video=False), "video models"),
    (dict(broadcast_range="0.8,0.2"), "START <= END"),
    (dict(broadcast_range_temporal="half"), "START,END"),
    (dict(broadcast_every=0), "at least 1"),
    (dict(broadcast_mlp_every=0), "--broadcast_mlp_every"),
    (dict(broadcast_mlp_range="0.5"), "--broadcast_mlp_range"),
])
def test_bad_flags_one_line(kw, message):
    args = _args(attention_broadcast=True, enable_flashattn=False, **kw)
    with pytest.raises(UsageError, match=message):
        resolve_speed_flags(args, torch.device("cuda" if kw.get("compile") else "cpu"))


def test_attention_module_untouched():
    """The state dict and the Attention class are the model's own while and after broadcasting."""
    model = _model()
    keys = list(model.state_dict())
    _run(_args(attention_broadcast=True), model, torch.randn(1, 4, 4, 4, 4), torch.tensor([3]))
    assert list(model.state_dict()) == keys and all(type(b.attn) is Attention for b in model.blocks)


def test_sample_cli_with_broadcast(tmp_path, capsys):
    from opendit.sampling import sample as sample_cli
    from opendit.training import train as train_cli

    train_cli.main(["--model", "Latte-S/1x2x2", "--use_video", "--depth", "2", "--hidden_size", "32", "--num_heads", "2", "--image_size", "16", "--num_frames", "2",
                    "--vae", "none", "--num_classes", "8", "--dataset_size", "8", "--batch_size", "2", "--max_steps", "1", "--mixed_precision", "fp32",
                    "--num_workers", "0", "--outputs", str(tmp_path / "o")])
    experiment = os.path.join(tmp_path / "o", os.listdir(tmp_path / "o")[0])
    base = ["--ckpt", experiment, "--sampler", "ddim", "--num_sampling_steps", "4", "--labels", "1", "--output", str(tmp_path / "s")]
    sample_cli.main(base + ["--attention_broadcast", "--broadcast_range", "0,1", "--broadcast_mlp_range", "0.2,0.8", "--broadcast_mlp_every", "3"])
    assert os.listdir(tmp_path / "s") == ["0000-class1.mp4"]
    for bad, flag in ((["--broadcast_every", "0"], "--broadcast_every"), (["--broadcast_mlp_range", "0.9,0.1"], "--broadcast_mlp_range")):
        with pytest.raises(SystemExit) as e:
            sample_cli.main(base + ["--attention_broadcast", *bad, "--output", str(tmp_path / "bad")])  # "s" holds the run above
        err = capsys.readouterr().err
        assert e.value.code == 2 and flag in err and "Traceback" not in err


def test_reuse_when_attention_output_dtype_differs_from_its_input():
    """Under CUDA autocast an attention takes fp32 (LayerNorm output) and returns bf16 (its Linear): still reused."""
    from opendit.sampling.broadcast import AttentionBroadcast, BroadcastConfig

    block = torch.nn.Module()
    block.attn = torch.nn.Module()
    block.attn.forward = lambda x: x.to(torch.bfloat16)  # input fp32 -> output bf16, like autocast on CUDA
    model = torch.nn.Module()
    model.blocks = [block]
    b = AttentionBroadcast(BroadcastConfig(spatial_range=(0.0, 1.0), spatial_every=2)).attach(model)
    x = torch.ones(1, 4, 8)
    for step in range(4):
        b.set_step(step, 4)
        model.blocks[0].attn.forward(x)
    assert (b.computed, b.reused) == (2, 2)


def test_mlp_broadcast_off_by_default_and_counted_when_on():
    """No MLP is wrapped without --broadcast_mlp_range; with [0.3, 0.9) every 3 over 10 steps each MLP runs at
    0, 1, 2, 3, 6, 9 (6 of 10), attention as before, and the wrappers are gone after the loop."""
    model, z, y = _model(VDiT), torch.randn(2, 4, 4, 4, 4), torch.tensor([1, 5])
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        fn = block.mlp.fc2.forward
        block.mlp.fc2.forward = lambda x, i=i, fn=fn: (calls.__setitem__(i, calls[i] + 1), fn(x))[1]
    off = _run(_args(attention_broadcast=True), model, z, y)
    assert calls == [10, 10]
    calls[:] = [0, 0]
    on = _run(_args(attention_broadcast=True, broadcast_mlp_range="0.3,0.9", broadcast_mlp_every=3), model, z, y)
    assert calls == [6, 6]
    assert all("forward" not in b.mlp.__dict__ and "forward" not in b.attn.__dict__ for b in model.blocks)
    rel = ((on - off).norm() / off.norm()).item()
    assert 0 < rel < 0.1, rel


@pytest.mark.parametrize("cls", [Latte, VDiT])
def test_broadcast_through_compiled_blocks(cls):
    """Blocks compiled by the caller (the library's denoise; sample.py refuses --compile with the broadcast): the wrapper
    breaks the block's graph, so computing or reusing is still chosen at every step (same samples and counts as eager)."""
    import torch._dynamo

    model, z, y = _model(cls), torch.randn(2, 4, 4, 4, 4), torch.tensor([1, 5])
    args = _args(attention_broadcast=True, broadcast_mlp_range="0.2,0.8")
    eager = _run(args, model, z, y)
    eager_counts = (_ENGINES[next(iter(_ENGINES))].broadcast.computed, _ENGINES[next(iter(_ENGINES))].broadcast.reused)
    _ENGINES.clear()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for block in model.blocks:
        block.compile(backend="eager")  # dynamo's tracing and graph breaks without inductor (no C++ compiler needed)
    compiled = _run(args, model, z, y)
    b = _ENGINES[next(iter(_ENGINES))].broadcast
    assert torch.equal(compiled, eager) and (b.computed, b.reused) == eager_counts and b.reused > 0
    stats = torch._dynamo.utils.counters
    assert stats["graph_break"] and 0 < stats["stats"]["unique_graphs"] <= 6  # broken at the wrapper, not recompiled per step
    torch._dynamo.reset()


def test_plan_matches_the_eager_choices():
    """The per-step plan (what CUDA graphs are captured for) is what the wrappers do: [2, 8) every 3 over 10 steps."""
    from opendit.sampling.broadcast import COMPUTE, FULL, REUSE, AttentionBroadcast, BroadcastConfig

    plan = AttentionBroadcast(BroadcastConfig(spatial_range=(0.2, 0.8), spatial_every=3)).plan(10)
    assert [row["spatial"] for row in plan] == [FULL, FULL, COMPUTE, REUSE, REUSE, COMPUTE, REUSE, REUSE, FULL, FULL]
    assert all(row["mlp"] == FULL for row in plan)  # the MLP range is empty by default


@pytest.mark.parametrize("cls", [Latte, VDiT])
def test_static_buffers_equal_plain_caching(cls):
    """static=True (what CUDA graphs use: each cached output refilled in place, never dropped) gives the same samples and
    counts as plain caching, over two samples from the same engine."""
    model, z, y = _model(cls), torch.randn(2, 4, 4, 4, 4), torch.tensor([1, 5])
    args = _args(attention_broadcast=True, broadcast_mlp_range="0.2,0.8", mixed_precision="bf16")
    plain = [_run(args, model, z, y) for _ in range(2)]
    counts = (_ENGINES[next(iter(_ENGINES))].broadcast.computed, _ENGINES[next(iter(_ENGINES))].broadcast.reused)
    _ENGINES.clear()
    _run(args, model, z[:1], y[:1])  # build the engine, then switch it to static buffers
    engine = _ENGINES[next(iter(_ENGINES))]
    engine.broadcast.static, engine.broadcast.computed, engine.broadcast.reused = True, 0, 0
    static = [_run(args, model, z, y) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(plain, static))
    assert (engine.broadcast.computed, engine.broadcast.reused) == counts


def test_cuda_graph_flag_needs_a_gpu():
    with pytest.raises(UsageError, match="--cuda_graph"):
        resolve_speed_flags(_args(attention_broadcast=True, enable_flashattn=False, cuda_graph=True), torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("cls", [Latte, VDiT])
def test_broadcast_in_cuda_graphs_equals_eager(cls):
    """--cuda_graph with --attention_broadcast: one graph per compute/reuse pattern, replayed by step, gives the eager
    broadcast's samples and counts, twice from the same engine; no wrapper is left on the model."""
    model = _model(cls).cuda()
    z, y = torch.randn(2, 4, 4, 4, 4, device="cuda"), torch.tensor([1, 5], device="cuda")
    args = _args(attention_broadcast=True, broadcast_mlp_range="0.2,0.8", broadcast_range_temporal="0.1,0.9", mixed_precision="bf16", num_sampling_steps=20)
    eager = _run(args, model, z, y)
    b = _ENGINES[next(iter(_ENGINES))].broadcast
    counts = (b.computed, b.reused)
    _ENGINES.clear()
    graphed = [_run(_args(**{**vars(args), "cuda_graph": True}), model, z, y) for _ in range(2)]
    engine = _ENGINES[next(iter(_ENGINES))]
    assert engine.cuda_graph and len(engine.graphs) > 2
    assert all(torch.allclose(g, eager, rtol=1e-3, atol=1e-3) for g in graphed) and torch.equal(graphed[0], graphed[1])
    assert (engine.broadcast.computed, engine.broadcast.reused) == (2 * counts[0], 2 * counts[1])
    assert all("forward" not in blk.attn.__dict__ and "forward" not in blk.mlp.__dict__ for blk in model.blocks)
    off = _run(_args(**{**vars(args), "attention_broadcast": False, "cuda_graph": True}), model, z, y)
    assert not torch.allclose(off, eager, rtol=1e-4, atol=1e-4)  # the broadcast really reused something


def test_cuda_graph_flag_forms_and_cpu_refusal(tmp_path, capsys):
    """--cuda_graph alone or 'on' turns it on, 'off' (the default) leaves it off; on the CPU it exits with one line
    naming the flag and writes nothing; the broadcast's --compile refusal points to it."""
    from opendit.sampling import sample as sample_cli

    parse = lambda *a: sample_cli.get_parser().parse_args(["--ckpt", "x", *a]).cuda_graph  # noqa: E731
    assert (parse(), parse("--cuda_graph"), parse("--cuda_graph", "on"), parse("--cuda_graph", "off")) == ("off", "on", "on", "off")
    args = _args(enable_flashattn=False, cuda_graph="off")
    resolve_speed_flags(args, torch.device("cpu"))
    assert args.cuda_graph is False
    with pytest.raises(UsageError, match="--cuda_graph --enable_modulate_kernel"):
        resolve_speed_flags(_args(attention_broadcast=True, enable_flashattn=False, compile=True), torch.device("cuda"))
    from opendit.training import train as train_cli

    train_cli.main(["--model", "DiT-S/2", "--depth", "1", "--hidden_size", "32", "--num_heads", "2", "--image_size", "16", "--vae", "none", "--num_classes", "4",
                    "--dataset_size", "4", "--batch_size", "2", "--max_steps", "1", "--mixed_precision", "fp32", "--num_workers", "0", "--outputs", str(tmp_path / "o")])
    experiment = os.path.join(tmp_path / "o", os.listdir(tmp_path / "o")[0])
    with pytest.raises(SystemExit) as e:
        sample_cli.main(["--ckpt", experiment, "--device", "cpu", "--cuda_graph", "--output", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--cuda_graph" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists(tmp_path / "s")


@pytest.mark.parametrize("cls", [Latte, VDiT])
def test_broadcast_over_float8_blocks(cls):
    """--float8's blocks (float8 qkv, Float8Mlp) under the broadcast with MLPs: every step computed equals no broadcast
    bit for bit, every 3 steps reuses outputs, and the float8 modules are back in place afterwards."""
    from opendit.kernels.float8 import Float8Linear, Float8Mlp, to_float8

    model, z, y = _model(cls), torch.randn(2, 4, 4, 4, 4), torch.tensor([1, 5])
    assert to_float8(model) == 3 * len(model.blocks)
    off = _run(_args(mixed_precision="bf16"), model, z, y)
    every = _run(_args(mixed_precision="bf16", attention_broadcast=True, broadcast_every=1, broadcast_every_temporal=1, broadcast_range="0,1",
                       broadcast_range_temporal="0,1", broadcast_mlp_range="0,1", broadcast_mlp_every=1), model, z, y)
    assert torch.equal(off, every)
    on = _run(_args(mixed_precision="bf16", attention_broadcast=True, broadcast_every=3, broadcast_mlp_range="0.2,0.9", broadcast_mlp_every=3), model, z, y)
    engine = [e for e in _ENGINES.values() if e.broadcast is not None and e.broadcast.config.mlp_every == 3][0]
    assert engine.broadcast.reused > 0
    assert all(type(b.mlp) is Float8Mlp and type(b.attn.qkv) is Float8Linear for b in model.blocks)
    rel = ((on - off).norm() / off.norm()).item()
    assert on.isfinite().all() and 0 < rel < 0.2, rel
