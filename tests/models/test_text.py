"""Text conditioning of DiT / VDiT: the pooled-text embedder, its place in c, and CFG against the null prompt."""
import pytest
import torch

from opendit.models import DiT_models

TEXT_DIM = 12


def randomised(model):
    torch.manual_seed(3)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model.eval()


def tiny(**kwargs):
    kw = dict(input_size=8, num_classes=0, depth=2, hidden_size=32, num_heads=4, text_dim=TEXT_DIM)
    kw.update(kwargs)
    return DiT_models["DiT-S/2"](**kw)


def tiny_vdit(**kwargs):
    kw = dict(input_size=8, num_frames=4, num_classes=0, depth=1, hidden_size=32, num_heads=4, text_dim=TEXT_DIM)
    kw.update(kwargs)
    return DiT_models["VDiT-S/1x2x2"](**kw)


def test_text_embedder_shape_init_and_names():
    torch.manual_seed(0)
    model = tiny()
    assert model.text_embedder.weight.shape == (32, TEXT_DIM) and torch.equal(model.text_embedder.bias, torch.zeros(32))
    assert set(model.state_dict()) - set(tiny(text_dim=0).state_dict()) == {"text_embedder.weight", "text_embedder.bias"}
    assert tiny(text_dim=0).text_embedder is None and "text_embedder.weight" not in DiT_models["DiT-S/2"](input_size=8, depth=1).state_dict()


def test_forward_shapes_and_text_changes_output():
    model = randomised(tiny())
    x, t = torch.randn(3, 4, 8, 8), torch.tensor([1, 500, 999])
    a, b = torch.randn(3, TEXT_DIM), torch.randn(3, TEXT_DIM)
    out = model(x, t, text=a)
    assert out.shape == (3, 8, 8, 8) and out.dtype == torch.float32
    assert not torch.allclose(out, model(x, t, text=b))
    torch.testing.assert_close(model(x[:1], t[:1], text=a[:1]), out[:1])  # per-sample: batching does not mix


def test_c_is_timestep_plus_label_plus_text():
    model = randomised(tiny(num_classes=10))
    t, y, text = torch.tensor([3, 700]), torch.tensor([2, 10]), torch.randn(2, TEXT_DIM)
    expected = model.t_embedder(t) + model.y_embedder(y, False) + model.text_embedder(text)
    torch.testing.assert_close(model.condition(t, y, text), expected)
    torch.testing.assert_close(model.condition(t, None, text), model.t_embedder(t) + model.text_embedder(text))


def test_text_to_a_model_without_text_is_an_error():
    with pytest.raises(ValueError, match="text_dim=0"):
        tiny(text_dim=0, num_classes=10)(torch.randn(1, 4, 8, 8), torch.tensor([1]), text=torch.randn(1, TEXT_DIM))
    with pytest.raises(ValueError, match="num_classes=0"):
        tiny()(torch.randn(1, 4, 8, 8), torch.tensor([1]), y=torch.tensor([0]))


@pytest.mark.parametrize("build", [tiny, tiny_vdit], ids=["DiT", "VDiT"])
def test_cfg_uses_the_null_prompt_branch(build):
    """Second half = null prompt: output is uncond + s * (cond - uncond), and the scale matters."""
    model = randomised(build())
    n = 2
    x = torch.randn(n, 4, *((4, 8, 8) if build is tiny_vdit else (8, 8)))
    t = torch.tensor([400, 30])
    prompt, null = torch.randn(n, TEXT_DIM), torch.randn(1, TEXT_DIM)
    text = torch.cat([prompt, null.expand(n, -1)])
    x2, t2 = torch.cat([x, x]), torch.cat([t, t])
    cond, uncond = model(x, t, text=prompt), model(x, t, text=null.expand(n, -1))
    for scale in (1.0, 4.0):
        out = model.forward_with_cfg(x2, t2, cfg_scale=scale, text=text, cfg_channels=None)
        torch.testing.assert_close(out[:n, :4], uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4]))
        torch.testing.assert_close(out[n:, :4], out[:n, :4])
        torch.testing.assert_close(out[:n, 4:], cond[:, 4:])  # sigma channels: unguided, from the conditional half
    guided = model.forward_with_cfg(x2, t2, cfg_scale=4.0, text=text)
    unguided = model.forward_with_cfg(x2, t2, cfg_scale=1.0, text=text)
    assert not torch.allclose(guided[:n, :3], unguided[:n, :3])
    # OpenDiT's bug: the same prompt in both halves makes guidance a no-op; a real null branch does not.
    same = torch.cat([prompt, prompt])
    torch.testing.assert_close(model.forward_with_cfg(x2, t2, cfg_scale=4.0, text=same)[:n], cond)


def test_text_and_labels_together_and_gradients():
    model = randomised(tiny(num_classes=10)).train()
    x, t, y, text = torch.randn(2, 4, 8, 8), torch.tensor([5, 50]), torch.tensor([1, 2]), torch.randn(2, TEXT_DIM)
    model(x, t, y, text).square().mean().backward()
    assert model.text_embedder.weight.grad.abs().sum() > 0 and model.y_embedder.embedding_table.weight.grad.abs().sum() > 0
