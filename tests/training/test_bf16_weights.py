"""bf16 working copies of the matmul weights and biases: the forward, loss and gradients autocast gives, and the same training
run (weights, moments, EMA) as the plain bf16 step; the CUDA-graph step uses them under bf16."""
import pytest
import torch

from opendit.models import DiT
from opendit.training.bf16_weights import Bf16Weights
from opendit.training.graph_step import CudaGraphStep
from opendit.training.optim import ShardedAdamW
from tiny import run_steps as run, tiny_step  # tests/tiny.py


def fused_step(device: torch.device, weights: bool):
    """tiny_step under bf16 autocast with fused AdamW (the CPU has one too), with or without the bf16 copies."""
    step = tiny_step(device, torch.bfloat16, fused=True)
    for group in step.optimizer.param_groups:
        group["weight_decay"] = 0.05
    step.grad_clip = 0.05  # below the first steps' gradient norms: the clip divisor is exercised
    if weights:
        step.weights = Bf16Weights(step.model, step.optimizer)
    return step


def test_copies_give_autocasts_loss_and_gradients_exactly():
    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10, class_dropout_prob=0.0)
    for p in model.parameters():
        p.data.add_(0.01 * torch.randn_like(p))
    opt = ShardedAdamW(list(model.parameters()), lr=1e-3, fused=True)
    weights = Bf16Weights(model, opt)
    assert {"blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "x_embedder.proj.weight", "x_embedder.proj.bias"} <= set(weights.names)  # Linear, Conv2d
    assert len(weights.names) == 2 * (2 * 5 + 5) and not any("embedding_table" in name for name in weights.names)  # 5 a block; patch, t, final
    x, t, y = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999]), torch.tensor([0, 3, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = model(x, t, y)
    plain.square().mean().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        copied = weights.bind(model)(x, t, y)
    masters = dict(model.named_parameters())
    plain_grads = {n: p.grad.clone() for n, p in masters.items() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    copied.square().mean().backward()
    assert torch.equal(copied, plain)
    for name, copy in zip(weights.names, weights.copies):
        assert masters[name].grad is None and copy.grad.dtype == torch.bfloat16
        assert torch.equal(copy.grad.float(), plain_grads[name]), name  # autocast's gradient is the bf16 one, widened
    for name, p in masters.items():
        if name not in weights.names and name in plain_grads:
            assert torch.equal(p.grad, plain_grads[name]), name


def test_training_with_copies_follows_the_plain_bf16_step():
    """Three steps (clipped, the LR changing): the losses, fp32 weights and EMA of the plain bf16 step to fp32 rounding
    of AdamW's maths, the copies equal to the weights rounded, the moments where torch AdamW keeps them. Further on, a
    last-bit difference flips some weight's bf16 rounding and the runs part within bf16 noise: losses over 7 steps."""
    device = torch.device("cpu")
    plain, copied = fused_step(device, False), fused_step(device, True)
    a, b = run(plain, steps=3), run(copied, steps=3)
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-7)
    for x, y in zip(b[2] + b[3], a[2] + a[3]):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    assert copied.clip_divisor > 1
    w = copied.weights
    for master, copy in zip(w.masters, w.copies):
        assert torch.equal(copy.detach(), master.detach().to(torch.bfloat16))
        state, plain_state = copied.optimizer.state[master], plain.optimizer.state[dict(zip(copied.params, plain.params))[master]]
        assert float(state["step"]) == float(plain_state["step"]) == 3
        torch.testing.assert_close(state["exp_avg_sq"], plain_state["exp_avg_sq"], rtol=1e-5, atol=1e-12)
    long_a, long_b = run(fused_step(device, False)), run(fused_step(device, True))
    torch.testing.assert_close(long_b[0], long_a[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("deferred", [True, False])
def test_the_ema_fused_into_adamw_is_the_ema(deferred):
    """fuse_ema: the copies' masters' EMA moves in AdamW's pass, the rest in ShardedEMA's own (deferred or not): the
    same EMA as ShardedEMA alone, to fp32 rounding, after seven steps."""
    device = torch.device("cpu")
    plain, fused = fused_step(device, True), fused_step(device, True)
    for step in (plain, fused):
        if deferred:
            step.ema.defer()
    fused.ema_decay = plain.ema_decay = 0.5  # a large step towards the weights: the EMA differs from its start clearly
    fused.weights.fuse_ema(fused.ema, fused.ema_decay)
    a, b = run(plain), run(fused)
    assert len(fused.ema._trainable) == len(a[2]) - len(fused.weights.masters) - 1  # the masters left; pos_embed is frozen
    for x, y in zip(b[2] + b[3], a[2] + a[3]):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    assert not all(torch.equal(e, p) for e, p in zip(b[3], b[2]))


def test_a_bad_step_leaves_masters_copies_moments_and_ema_alone():
    step = fused_step(torch.device("cpu"), True)
    run(step, steps=2)
    w = step.weights
    w.fuse_ema(step.ema, 0.5)
    before = [t.clone() for t in w.masters + w.copies + w.emas] + [step.optimizer.state[m]["exp_avg"].clone() for m in w.masters]
    w.step(torch.ones(()), torch.ones(()))  # found_inf
    after = [t for t in w.masters + w.copies + w.emas] + [step.optimizer.state[m]["exp_avg"] for m in w.masters]
    assert all(torch.equal(x, y) for x, y in zip(after, before))
    assert float(step.optimizer.state[w.masters[0]]["step"]) == 2


def test_resume_with_copies_continues_bit_for_bit(tmp_path):
    """Three steps, a DCP checkpoint, a fresh step that loads it and refreshes its copies, three more: the weights,
    moments and EMA of six uninterrupted steps, exactly (the moments AdamW created for the masters round-trip, and the
    update reads the optimizer's param groups as loaded, not the ones it was built with)."""
    from opendit.checkpoint.dcp import load_checkpoint, save_checkpoint

    device = torch.device("cpu")
    torch.manual_seed(1)
    data = [(torch.randn(4, 4, 8, 8), torch.randint(0, 10, (4,))) for _ in range(6)]

    def steps(step, batches):
        for x, y in batches:
            step(x, {"y": y})

    torch.manual_seed(2)
    whole = fused_step(device, True)
    steps(whole, data)
    torch.manual_seed(2)
    first = fused_step(device, True)
    steps(first, data[:3])
    rng = torch.get_rng_state()
    path = save_checkpoint(str(tmp_path), 3, first.model, first.optimizer, first.ema, {"step": 3, **first.state_dict()})
    second = fused_step(device, True)
    load_checkpoint(path, second.model, second.optimizer, second.ema)
    second.load_state_dict(first.state_dict(), lr=1e-3, weight_decay=0.05)
    second.weights.refresh()
    torch.set_rng_state(rng)
    steps(second, data[3:])
    for a, b in zip(second.model.parameters(), whole.model.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(second.ema.state_dict().values(), whole.ema.state_dict().values()):
        assert torch.equal(a, b)
    for w_a, w_b in zip(second.weights.masters, whole.weights.masters):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(second.optimizer.state[w_a][key], whole.optimizer.state[w_b][key]), key


def test_copies_need_fused_adamw():
    step = tiny_step(torch.device("cpu"), torch.bfloat16)  # foreach AdamW on the CPU
    with pytest.raises(ValueError, match="fused AdamW"):
        Bf16Weights(step.model, step.optimizer)


@pytest.mark.gpu
@pytest.mark.parametrize("bf16_weights", [True, False])
def test_bf16_graph_step_matches_the_eager_bf16_step(bf16_weights):
    """The CUDA graph (an eager step, a captured one, replays) against the eager step with the same weights path: with
    copies, the eager step with copies (the copies against autocast's casts: the CPU tests above)."""
    device = torch.device("cuda")
    eager_step = tiny_step(device, torch.bfloat16)
    if bf16_weights:
        eager_step.weights = Bf16Weights(eager_step.model, eager_step.optimizer)
    eager = run(eager_step)
    graph_step = CudaGraphStep(tiny_step(device, torch.bfloat16), warmup=2, bf16_weights=bf16_weights)
    assert (graph_step.weights is not None) == bf16_weights
    graph = run(graph_step)
    assert graph_step.graph is not None
    torch.testing.assert_close(graph[0], eager[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(graph[2] + graph[3], eager[2] + eager[3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("fused_ema", [True, False])
def test_graph_step_keeps_the_ema_fused_or_not(fused_ema):
    device = torch.device("cuda")
    eager_step = tiny_step(device, torch.bfloat16)
    eager_step.weights = Bf16Weights(eager_step.model, eager_step.optimizer)
    eager = run(eager_step)
    graph_step = CudaGraphStep(tiny_step(device, torch.bfloat16), warmup=2, fused_ema=fused_ema)
    assert (graph_step.weights.emas is not None) == fused_ema
    graph = run(graph_step)
    for a, b in zip(graph[2] + graph[3], eager[2] + eager[3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
