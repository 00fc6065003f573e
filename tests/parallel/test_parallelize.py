"""parallelize() wiring on one process: torch.compile per block (and around them) and activation checkpointing keep
parameter names."""
import pytest
import torch

from opendit.parallel.parallelize import parallelize


def test_compile_and_checkpointing_are_wired_per_block(dt):
    model = dt.tiny_model()
    names = [name for name, _ in model.named_parameters()]
    assert parallelize(model, grad_checkpoint=True, compile=True) is model  # one process: nothing wraps it
    assert all(block._compiled_call_impl is not None for block in model.blocks)  # nn.Module.compile, run lazily
    assert [name for name, _ in model.named_parameters()] == names and "_orig_mod" not in str(model.state_dict().keys())
    # One process: what runs around the blocks too (the patch + position embedding, timestep embedder, final layer).
    assert model.final_layer._compiled_call_impl is not None and model.t_embedder._compiled_call_impl is not None
    assert "embed" in vars(model) and hasattr(model.embed, "_torchdynamo_orig_callable")  # the method, compiled
    assert hasattr(model.layer_modulations, "_torchdynamo_orig_callable")  # read with fused block boundaries


def test_grad_checkpointing_gives_the_same_gradients(dt):
    plain, checkpointed = dt.tiny_model(), parallelize(dt.tiny_model(), grad_checkpoint=True)
    for model in (plain, checkpointed):
        dt.loss_on(model, 0).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (a.grad is None) == (b.grad is None) and (a.grad is None or torch.equal(a.grad, b.grad)), name


def test_unknown_plugin_is_refused(dt):
    with pytest.raises(ValueError, match="plugin 'zero1'"):
        parallelize(dt.tiny_model(), plugin="zero1")


def test_compile_mode_reaches_torch_compile_of_every_block(dt, monkeypatch):
    seen = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs.get("mode")) or real(fn, **kwargs))
    parallelize(dt.tiny_model(), compile=True)
    parallelize(dt.tiny_model(), compile=True, compile_mode="max-autotune-no-cudagraphs")
    compiled = len(dt.tiny_model().blocks) + 4  # the blocks, the embedding, the modulations, the timestep embedder, the final layer
    assert seen == [None] * compiled + ["max-autotune-no-cudagraphs"] * compiled


def test_unknown_compile_mode_is_refused(dt):
    with pytest.raises(RuntimeError, match="Unrecognized mode=fastest"):
        parallelize(dt.tiny_model(), compile=True, compile_mode="fastest")


def _latte_zero2_backward(rank, world_size, dt):
    import warnings

    from opendit.models import Latte
    from opendit.parallel import build_mesh

    dt.init()
    torch.manual_seed(0)
    model = Latte(input_size=8, num_frames=4, num_classes=10, depth=4, hidden_size=32, num_heads=4)
    parallelize(model, build_mesh(world_size, 1, "cpu"), plugin="zero2", param_dtype=torch.float32, blocks_per_unit=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(torch.randn(2, 4, 4, 8, 8), torch.tensor([1, 2]), torch.tensor([3, 4])).square().mean().backward()
    assert not [str(w.message) for w in caught if "view tensor" in str(w.message)]


def test_latte_under_zero2_returns_no_views(dt):
    """FSDP2's "returned a view tensor" warning (each Latte block and, in fp32, the model) on 2 gloo ranks."""
    dt.run(_latte_zero2_backward, 2, dt)
