"""zero2 / zero3 (FSDP2) and DDP on 2 and 4 CPU ranks reproduce one process's gradients, parameters and EMA; the
sharded EMA equals an unsharded one; an fp16 overflow on any rank skips the step on every rank."""
import pytest
import torch

from opendit.training.ema import ShardedEMA
from opendit.training.optim import ShardedAdamW
from opendit.parallel.mesh import build_mesh
from opendit.parallel.parallelize import parallelize
from opendit.training.optim import optimizer_step

STEPS, DECAY, CLIP = 2, 0.9, 0.05  # clipping at 0.05 is active: it tests the global norm across shards


def train(model, train_model, dt, rank=0, world_size=1, optimizer=ShardedAdamW):
    """STEPS optimizer steps on fixed batches; returns (first-step gradients, final parameters, final EMA, unsharded EMA)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params, lr=1e-2, weight_decay=0.01, foreach=True)
    scaler = torch.amp.GradScaler(dt.device_type, enabled=False)
    ema = ShardedEMA(model)
    unsharded = {name: dt.full(p) for name, p in model.named_parameters()}
    grads = None
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        dt.loss_on(train_model, step, rank, world_size).backward()
        if grads is None:
            grads = {name: dt.full(p.grad) for name, p in model.named_parameters() if p.grad is not None}
        optimizer_step(opt, scaler, params, CLIP)
        ema.update(DECAY)
        for name, p in model.named_parameters():
            if p.requires_grad:
                unsharded[name].lerp_(dt.full(p), 1 - DECAY)  # ShardedEMA's update, on the whole tensor
    weights = {name: dt.full(p) for name, p in model.named_parameters()}
    return grads, weights, {name: dt.full(t) for name, t in ema.state_dict().items()}, unsharded


def compare_plugins(rank, world_size, dt):
    dt.init()
    mesh = build_mesh(world_size, 1, dt.device_type)
    reference = dt.tiny_model()
    ref_grads, ref_weights, ref_ema, _ = train(reference, reference, dt, optimizer=torch.optim.AdamW)  # PyTorch's own
    for plugin, blocks_per_unit in (("zero2", 7), ("zero2", 1), ("zero3", 7), ("zero3", 1), ("ddp", 1)):  # 7: both blocks in one unit
        model = dt.tiny_model()
        train_model = parallelize(model, mesh=mesh, plugin=plugin, param_dtype=torch.float32, blocks_per_unit=blocks_per_unit)
        grads, weights, ema, unsharded = train(model, train_model, dt, rank, world_size)
        assert grads.keys() == ref_grads.keys()
        for name in ref_grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=f"{plugin}/{blocks_per_unit} gradient {name}")
        for name in ref_weights:
            # Adam divides by sqrt(v): roundoff in near-zero gradients moves weights by ~1e-3 of lr (a bug moves them by ~lr)
            torch.testing.assert_close(weights[name], ref_weights[name], rtol=1e-4, atol=3e-5, msg=f"{plugin}/{blocks_per_unit} weight {name}")
            torch.testing.assert_close(ema[name], ref_ema[name], rtol=1e-4, atol=3e-5, msg=f"{plugin}/{blocks_per_unit} EMA {name}")
            assert torch.equal(ema[name], unsharded[name]), f"{plugin}: sharded EMA {name} differs from the unsharded EMA"
        if plugin != "ddp":  # FSDP2 keeps 1/world of every parameter, optimizer moment and EMA tensor on each rank
            p = model.blocks[0].mlp.fc1.weight
            assert p._local_tensor.shape[0] == p.shape[0] // world_size
        assert not torch.equal(ema["blocks.0.attn.qkv.weight"], weights["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("world_size", [2, 4])
def test_plugins_match_one_process(dt, world_size):
    dt.run(compare_plugins, world_size, dt)


def overflow(rank, world_size, dt):
    dt.init()
    model = dt.tiny_model()
    parallelize(model, mesh=build_mesh(world_size, 1, dt.device_type), plugin="zero2")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = ShardedAdamW(params, lr=1e-2, foreach=True)
    scaler = torch.amp.GradScaler(dt.device_type, init_scale=16.0)
    for step, poison in enumerate([True, False]):
        opt.zero_grad(set_to_none=True)
        scaler.scale(dt.loss_on(model, step, rank, world_size)).backward()
        if poison and rank == world_size - 1:  # only the last rank's shard overflows
            model.blocks[1].mlp.fc2.weight.grad._local_tensor.view(-1)[0] = float("inf")
        before = [dt.full(p) for p in params]
        _, skipped = optimizer_step(opt, scaler, params, 1.0)
        changed = any(not torch.equal(b, dt.full(p)) for b, p in zip(before, params))
        assert skipped == poison and changed == (not poison), (step, skipped, changed)
    assert scaler.get_scale() == 8.0  # halved once, not yet grown

    # bf16 mixed precision: the forward runs on bf16 copies; the sharded master weights and their gradients stay fp32.
    model = dt.tiny_model()
    parallelize(model, mesh=build_mesh(world_size, 1, dt.device_type), plugin="zero2", param_dtype=torch.bfloat16)
    seen = []
    model.blocks[0].mlp.fc1.register_forward_hook(lambda module, args, out: seen.append((module.weight.dtype, out.dtype)))
    dt.loss_on(model, 0, rank, world_size).backward()
    assert seen == [(torch.bfloat16, torch.bfloat16)]
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_fp16_scaler_skips_overflow_on_every_rank_and_bf16_casts(dt):
    dt.run(overflow, 2, dt)


def test_fp16_scaler_skips_overflow_one_process(dt):
    model = dt.tiny_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale(dt.loss_on(model, 0)).backward()
    params[0].grad.view(-1)[0] = float("nan")
    before = [p.detach().clone() for p in params]
    grad_norm, skipped = optimizer_step(opt, scaler, params, 1.0)
    assert skipped and scaler.get_scale() == 2.0 and not torch.isfinite(grad_norm)
    assert all(torch.equal(b, p) for b, p in zip(before, params))
