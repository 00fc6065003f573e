"""The fused adaLN kernel inside DiT: same outputs and gradients as the PyTorch blocks."""
import copy

import pytest
import torch

from opendit.models import DiT_models
from opendit.parallel.parallelize import parallelize

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_same_outputs_and_grads(ref, fused, x, t, y):
    out_ref, out_fused = ref.eval()(x, t, y), fused.eval()(x, t, y)
    torch.testing.assert_close(out_fused, out_ref, rtol=1e-5, atol=1e-5)
    out_ref.square().sum().backward()
    out_fused.square().sum().backward()
    for (n, a), (_, b) in zip(ref.named_parameters(), fused.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("name", ["DiT-S/2", "VDiT-S/2x2x2"])
def test_fused_adaln_model_matches_pytorch(name):
    torch.manual_seed(0)
    kwargs = dict(input_size=4, num_classes=5, depth=2, hidden_size=24, num_heads=3)
    if name.startswith("VDiT"):
        kwargs["num_frames"] = 2
    ref = DiT_models[name](**kwargs).to(DEVICE)
    for p in ref.parameters():
        p.data.normal_(0, 0.1)  # non-zero adaLN, so the modulation matters
    fused = parallelize(copy.deepcopy(ref), fused_adaln=True)
    assert all(b.kernels.fused_adaln for b in fused.blocks) and fused.final_layer.kernels.fused_adaln and not ref.kernels.fused_adaln
    shape = (3, 4, 2, 4, 4) if name.startswith("VDiT") else (3, 4, 4, 4)
    x = torch.randn(shape, device=DEVICE)
    t, y = torch.tensor([1, 500, 999], device=DEVICE), torch.tensor([0, 3, 4], device=DEVICE)
    assert_same_outputs_and_grads(ref, fused, x, t, y)


def test_fused_adaln_model_compiles_without_graph_breaks():
    """torch.compile traces the kernels as custom ops (fullgraph): same outputs and gradients as PyTorch."""
    torch.manual_seed(0)
    ref = DiT_models["DiT-S/2"](input_size=4, num_classes=5, depth=2, hidden_size=24, num_heads=3).to(DEVICE)
    for p in ref.parameters():
        p.data.normal_(0, 0.1)
    fused = parallelize(copy.deepcopy(ref), fused_adaln=True)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"  # CPU: trace only (kernels run in the interpreter)
    for block in fused.blocks:
        block.compile(backend=backend, fullgraph=True)
    x = torch.randn(3, 4, 4, 4, device=DEVICE)
    t, y = torch.tensor([1, 500, 999], device=DEVICE), torch.tensor([0, 3, 4], device=DEVICE)
    assert_same_outputs_and_grads(ref, fused, x, t, y)
    torch._dynamo.reset()


def test_fused_boundaries_match_the_separate_kernels(monkeypatch):
    """Each block's last gate + residual fused with the next layer's LayerNorm + modulate (the default of a training
    parallelize with the kernels): the same outputs and gradients as the separate kernels, and no separate gate +
    residual left."""
    import opendit.kernels

    torch.manual_seed(0)
    model = DiT_models["DiT-S/2"](input_size=4, num_classes=5, depth=3, hidden_size=24, num_heads=3).to(DEVICE)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    separate = parallelize(copy.deepcopy(model), fused_adaln=True)
    separate.kernels.fused_boundaries = False
    fused = parallelize(model, fused_adaln=True)
    assert fused.kernels.fused_boundaries and fused.kernels.fused_qkv_grad  # and the qkv gradient in one pass
    calls = []
    gate_residual = opendit.kernels.gate_residual
    monkeypatch.setattr(opendit.kernels, "gate_residual", lambda *a: calls.append(1) or gate_residual(*a))
    x = torch.randn(3, 4, 4, 4, device=DEVICE)
    t, y = torch.tensor([1, 500, 999], device=DEVICE), torch.tensor([0, 3, 4], device=DEVICE)
    separate(x, t, y)
    assert len(calls) == 3  # one per block
    calls.clear()
    fused(x, t, y)
    assert not calls
    assert_same_outputs_and_grads(separate, fused, x, t, y)


def test_parallelize_fuses_boundaries_only_where_the_model_runs_its_blocks_whole():
    """Sampling (plugin None), recomputation and sequence parallelism keep the blocks' own boundaries."""
    def flag(**kwargs):
        model = DiT_models["DiT-S/2"](input_size=4, num_classes=5, depth=1, hidden_size=24, num_heads=3)
        kernels = parallelize(model, **kwargs).kernels
        assert kernels.fused_qkv_grad == kernels.fused_boundaries
        return kernels.fused_boundaries

    assert flag(fused_adaln=True) and flag(fused_adaln=True, plugin="ddp")
    assert not flag() and not flag(fused_adaln=True, plugin=None) and not flag(fused_adaln=True, grad_checkpoint=True)


def ddp_with_fused_boundaries(rank, world_size, dt):
    from opendit.parallel.mesh import build_mesh

    dt.init()
    reference = parallelize(dt.tiny_model(), fused_adaln=True)  # one process, the separate kernels
    reference.kernels.fused_boundaries = False
    dt.loss_on(reference, 0).backward()
    model = dt.tiny_model()
    train_model = parallelize(model, mesh=build_mesh(world_size, 1, dt.device_type), plugin="ddp", fused_adaln=True)
    assert model.kernels.fused_boundaries
    dt.loss_on(train_model, 0, rank, world_size).backward()
    for (name, a), b in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_ddp_with_fused_boundaries_matches_one_process(dt):
    """DDP (gloo, 2 ranks, half the batch each) with the fused boundaries: the gradients of one process with the
    separate kernels, so DDP sees every parameter used once the modulations move before the blocks."""
    dt.run(ddp_with_fused_boundaries, 2, dt)
