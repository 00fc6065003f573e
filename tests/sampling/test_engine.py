"""The sampling engine follows the reference loops of opendit.diffusion (fp32) and stays close under bf16 autocast."""
import argparse

import pytest
import torch

from opendit.models import DiT
from opendit.sampling import engine as engine_module
from opendit.sampling.denoise import _ENGINES, denoise, get_engine


def _model(std: float = 0.1):
    torch.manual_seed(0)
    model = DiT(depth=2, hidden_size=64, num_heads=4, in_channels=4, num_classes=10, input_size=8, patch_size=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(std * torch.randn_like(p))  # adaLN-Zero would make the output constant
    return model


def _args(**kw):
    base = dict(sampler="ddpm", num_sampling_steps=6, noise_schedule="linear", cfg_scale=4.0, cfg_channels="3", num_classes=10, vae="ema", mixed_precision="fp32", compile=False)
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def per_step_modulation(monkeypatch):
    """The engine's adaLN modulations computed in each step's forward, as the reference loops do (no precomputed
    table: its GEMM over many steps' rows rounds differently, which the samplers amplify past these tolerances)."""
    monkeypatch.setattr(engine_module, "modulation_budget", lambda device: 0)


def _run(args, model, z, y):
    torch.manual_seed(7)
    with torch.no_grad():
        return denoise(args, model, z, y)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver"])
@pytest.mark.parametrize("cfg_scale,cfg_channels,vae", [(4.0, "3", "ema"), (1.0, "3", "none"), (2.5, "all", "none")])
def test_engine_matches_reference_fp32(per_step_modulation, sampler, cfg_scale, cfg_channels, vae):
    model, z, y = _model(), torch.randn(3, 4, 8, 8), torch.tensor([1, 5, 9])
    args = _args(sampler=sampler, cfg_scale=cfg_scale, cfg_channels=cfg_channels, vae=vae)
    ref = _run(args, model, z, y)  # fp32 without --compile: the reference loop
    from opendit.sampling import denoise as dn

    engine = dn.get_engine(args, model, z.device)
    cond = dict(y=y, text=None)
    uncond = dict(y=torch.full_like(y, 10), text=None) if cfg_scale > 1 else None
    torch.manual_seed(7)
    with torch.no_grad():
        out = engine.sample(z, cond, uncond)
        again = engine.sample(z, cond, uncond) if sampler != "ddpm" else out  # reused engine: same result
    assert ref.isfinite().all() and ref.std() > 0.1
    tol = 1e-4 if sampler == "dpm-solver" else 1e-5  # diffusers rounds its coefficients to float32 step by step
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_bf16_close_to_fp32_on_cpu():
    """Random weights only (the trained-model PSNR check is test_quality.py): relative error within 5%."""
    model, z, y = _model(std=0.03), torch.randn(2, 4, 8, 8), torch.tensor([2, 3])
    ref = _run(_args(sampler="ddim", cfg_scale=1.0), model, z, y)
    out = _run(_args(sampler="ddim", cfg_scale=1.0, mixed_precision="bf16"), model, z, y)
    assert out.dtype == torch.float32 and (out - ref).norm() / ref.norm() < 0.05
    assert not torch.equal(out, ref)  # autocast did run in bf16


@pytest.mark.parametrize("cls,shape,kw", [("DiT", (2, 4, 8, 8), {}), ("Latte", (2, 4, 2, 8, 8), dict(num_frames=2, patch_size=(1, 2, 2), text_dim=16))])
def test_bf16_weights_cast_once_equal_autocast(cls, shape, kw):
    """sample.py stores Linear / Conv weights in bf16 when sampling in bf16: the same numbers as casting every step."""
    import copy

    from opendit import models
    from opendit.sampling.sample import cast_matmul_weights

    torch.manual_seed(0)
    model = getattr(models, cls)(depth=2, hidden_size=64, num_heads=4, in_channels=4, num_classes=10, input_size=8, **{"patch_size": 2, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    cast = cast_matmul_weights(copy.deepcopy(model), torch.bfloat16)
    assert cast.blocks[0].attn.qkv.weight.dtype == torch.bfloat16 and cast.y_embedder.embedding_table.weight.dtype == torch.float32
    assert cast_matmul_weights(model, torch.float32) is model and model.blocks[0].attn.qkv.weight.dtype == torch.float32
    z, y = torch.randn(*shape), torch.tensor([1, 5])
    text = torch.randn(2, 16) if kw.get("text_dim") else None
    for sampler in ("ddim", "ddpm"):
        args = _args(sampler=sampler, mixed_precision="bf16")
        from opendit.sampling.denoise import _ENGINES

        _ENGINES.clear()
        null = torch.zeros(1, 16) if text is not None else None
        torch.manual_seed(7)
        with torch.no_grad():
            ref = denoise(args, model, z, y, text, null)
            torch.manual_seed(7)
            out = denoise(args, cast, z, y, text, null)
        assert torch.equal(out, ref), sampler


def _engine_sample(args, model, z, y):
    _ENGINES.clear()
    engine = get_engine(args, model, z.device)
    torch.manual_seed(7)
    with torch.no_grad():
        out = engine.sample(z, dict(y=y, text=None), dict(y=torch.full_like(y, 10), text=None))
    return out, engine.guided


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver"])
def test_precomputed_modulations_follow_the_per_step_engine(monkeypatch, sampler):
    """The engine computes the steps' adaLN modulations before the loop (one GEMM per block over many steps' rows)
    and hands each step its rows: the per-step engine's samples up to that GEMM's rounding, amplified by the
    sampler; in chunks of two steps (a small budget) the table is refilled as the loop goes, with the same result."""
    model, z, y = _model(), torch.randn(3, 4, 8, 8), torch.tensor([1, 5, 9])
    args = _args(sampler=sampler)
    table, guided = _engine_sample(args, model, z, y)
    assert guided.chunk == 6 and guided.table.shape == (6, 6, 2 * 6 * 64 + 2 * 64)  # 6 steps of 3 + 3 rows
    per_step_bytes = 6 * (2 * 6 * 64 + 2 * 64) * 4
    monkeypatch.setattr(engine_module, "modulation_budget", lambda device: 2 * per_step_bytes)
    chunked, guided = _engine_sample(args, model, z, y)
    assert guided.chunk == 2 and guided.table_start == 4 and len(guided.table) == 2
    monkeypatch.setattr(engine_module, "modulation_budget", lambda device: 0)
    per_step, guided = _engine_sample(args, model, z, y)
    assert guided.chunk == 0 and per_step.isfinite().all() and per_step.std() > 0.1
    for out in (table, chunked):
        assert (out - per_step).norm() / per_step.norm() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile", [False, True])
def test_precomputed_modulations_in_cuda_graphs(monkeypatch, compile):
    """bf16 with the step captured as a CUDA graph (compiled or not): the graph reads each step's modulations from
    the static buffer the loop refills (chunks of two steps here), following the per-step engine to bf16 rounding."""
    model = _model().cuda()
    if compile:
        model.compile()
    z, y = torch.randn(3, 4, 8, 8, device="cuda"), torch.tensor([1, 5, 9], device="cuda")
    args = _args(sampler="ddim", mixed_precision="bf16", cuda_graph=True, compile=compile)
    monkeypatch.setattr(engine_module, "modulation_budget", lambda device: 2 * 6 * (2 * 6 * 64 + 2 * 64) * 2)
    table, guided = _engine_sample(args, model, z, y)
    again, _ = _engine_sample(args, model, z, y)
    assert guided.chunk == 2 and guided.table_start == 4 and next(iter(_ENGINES.values())).graphs
    monkeypatch.setattr(engine_module, "modulation_budget", lambda device: 0)
    per_step, guided = _engine_sample(args, model, z, y)
    assert guided.chunk == 0 and per_step.isfinite().all() and torch.equal(table, again)
    assert (table - per_step).norm() / per_step.norm() < 2e-2


def test_precomputed_modulations_of_a_text_model(monkeypatch):
    """Pooled-prompt conditioning (no class labels): the table repeats each row's prompt embedding for every step."""
    torch.manual_seed(0)
    model = DiT(depth=2, hidden_size=64, num_heads=4, in_channels=4, num_classes=0, text_dim=16, input_size=8, patch_size=2).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    z, text, null = torch.randn(2, 4, 8, 8), torch.randn(2, 16), torch.randn(1, 16)
    args, outs, chunks = _args(sampler="ddim", num_classes=0), [], []
    for budget in (engine_module.modulation_budget, lambda device: 0):
        monkeypatch.setattr(engine_module, "modulation_budget", budget)
        _ENGINES.clear()
        engine = get_engine(args, model, z.device)
        with torch.no_grad():
            outs.append(engine.sample(z, dict(y=None, text=text), dict(y=None, text=null.expand_as(text))))
        chunks.append(engine.guided.chunk)
    assert chunks == [6, 0] and outs[1].std() > 0.1
    assert (outs[0] - outs[1]).norm() / outs[1].norm() < 1e-5


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm-solver"])
def test_compiled_tail_follows_the_eager_one(sampler):
    """--compile also compiles the step's tail (guidance combine + the sampler's update: ~20 elementwise kernels a
    step eagerly) into one function: the same samples to float rounding, compiled once for every step."""
    from torch._dynamo.utils import counters

    model, z, y = _model(), torch.randn(3, 4, 8, 8), torch.tensor([1, 5, 9])
    eager, _ = _engine_sample(_args(sampler=sampler), model, z, y)
    counters.clear()
    compiled, _ = _engine_sample(_args(sampler=sampler, compile=True), model, z, y)
    engine = next(iter(_ENGINES.values()))
    assert engine.tail is not engine._tail and counters["stats"]["unique_graphs"] == 1  # the tail, traced once for all 6 steps
    assert (compiled - eager).norm() / eager.norm() < 1e-5
