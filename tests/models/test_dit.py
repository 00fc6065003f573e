"""DiT / VDiT: registry, shapes, parameter counts, adaLN-Zero init, Meta DiT key layout, CFG."""
import pytest
import torch

from opendit.models import DiT_image_models, DiT_models, VDiT_models, is_video_model

# Parameter counts at input_size 32 (256x256 images through an 8x VAE), 1000 classes, learn_sigma: these are
# the counts of Meta's DiT (DiT-XL/2: 675,129,632), pos_embed included.
EXPECTED_PARAMS = {"DiT-XL/2": 675_129_632, "DiT-L/2": 458_102_816, "DiT-B/2": 130_512_416, "DiT-S/2": 32_963_360}

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


def test_registry_has_all_models():
    assert sorted(DiT_image_models) == sorted(f"DiT-{s}/{p}" for s in SIZES for p in (2, 4, 8))
    assert sorted(VDiT_models) == sorted(f"VDiT-{s}/{p}" for s in SIZES for p in ("1x2x2", "2x2x2"))
    assert len(DiT_models) == 12 + 8 + 8 + 8  # + Latte-*/{1x2x2,2x2x2}, vDiT-*/222 and VDiT-*/222
    assert is_video_model("VDiT-XL/2x2x2") and not is_video_model("DiT-XL/2")


@pytest.mark.parametrize("name", sorted(DiT_image_models))
def test_every_image_model_builds_with_its_size(name):
    with torch.device("meta"):  # no memory, no init cost
        model = DiT_models[name](input_size=32)
    depth, hidden, heads = SIZES[name.split("-")[1].split("/")[0]]
    patch = int(name.split("/")[1])
    assert len(model.blocks) == depth and model.hidden_size == hidden and model.num_heads == heads
    assert model.patch_size == patch
    assert model.pos_embed.shape == (1, (32 // patch) ** 2, hidden)
    assert model.final_layer.linear.out_features == patch * patch * 8
    if name in EXPECTED_PARAMS:
        assert sum(p.numel() for p in model.parameters()) == EXPECTED_PARAMS[name]


def test_xl2_parameter_count_matches_meta_dit():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"]()
    assert sum(p.numel() for p in model.parameters()) == 675_129_632


def tiny(**kwargs):
    kw = dict(input_size=8, num_classes=10, depth=2, hidden_size=32, num_heads=4)
    kw.update(kwargs)
    return DiT_models["DiT-S/2"](**kw)


def test_forward_shapes_and_dtype():
    model = tiny()
    x, t, y = torch.randn(3, 4, 8, 8), torch.randint(0, 1000, (3,)), torch.randint(0, 10, (3,))
    out = model(x, t, y)
    assert out.shape == (3, 8, 8, 8) and out.dtype == torch.float32
    assert tiny(learn_sigma=False)(x, t, y).shape == (3, 4, 8, 8)


def test_zero_initialised_adaln_gives_zero_output_and_identity_blocks():
    """adaLN-Zero: at init every block is the identity and the final layer outputs exactly zero."""
    torch.manual_seed(0)
    model = tiny()
    x, t, y = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randint(0, 10, (2,))
    assert torch.equal(model(x, t, y), torch.zeros(2, 8, 8, 8))
    tokens = model.embed(x)
    c = model.condition(t, y, None)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert not model.pos_embed.requires_grad


def test_initialisation_statistics():
    torch.manual_seed(0)
    model = DiT_models["DiT-S/2"](input_size=16, num_classes=1000)
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.002
    assert abs(model.t_embedder.mlp[0].weight.std().item() - 0.02) < 0.002
    qkv = model.blocks[0].attn.qkv.weight  # Xavier uniform: bound sqrt(6 / (fan_in + fan_out))
    bound = (6 / (qkv.shape[0] + qkv.shape[1])) ** 0.5
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.9 * bound
    assert torch.count_nonzero(model.blocks[0].attn.qkv.bias) == 0


def test_pos_embed_is_2d_sincos():
    model = tiny(input_size=8)  # 4 x 4 grid, D = 32
    pe = model.pos_embed[0]  # (16, 32)
    # First half encodes the column (w goes first, as in MAE), second half the row; each half is [sin | cos].
    col, row = 1, 2
    token = row * 4 + col
    omega = 1.0 / 10000 ** (torch.arange(8, dtype=torch.float64) / 8)
    expected = torch.cat([torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)])
    torch.testing.assert_close(pe[token].double(), expected, rtol=0, atol=1e-6)


def official_dit_key_layout(depth: int) -> set:
    """The state-dict keys of Meta's DiT checkpoints, written out by hand."""
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight"}
    keys |= {f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    keys |= {f"final_layer.{m}.{p}" for m in ("linear", "adaLN_modulation.1") for p in ("weight", "bias")}
    for i in range(depth):
        for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{m}.weight", f"blocks.{i}.{m}.bias"}
    return keys


def test_state_dict_uses_official_key_layout_and_loads_strictly():
    model = tiny()
    assert set(model.state_dict()) == official_dit_key_layout(2)
    # A checkpoint in the official layout (here: random tensors of the right shapes) loads with strict=True.
    official = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    fresh = tiny()
    fresh.load_state_dict(official, strict=True)
    assert torch.equal(fresh.blocks[1].attn.qkv.weight, official["blocks.1.attn.qkv.weight"])
    assert fresh.y_embedder.embedding_table.weight.shape == (11, 32)  # 10 classes + the null class


def test_official_xl2_shapes():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
    sd = model.state_dict()
    assert sd["pos_embed"].shape == (1, 256, 1152)
    assert sd["x_embedder.proj.weight"].shape == (1152, 4, 2, 2)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 1152)
    assert sd["blocks.27.attn.qkv.weight"].shape == (3456, 1152)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (6912, 1152)
    assert sd["final_layer.linear.weight"].shape == (32, 1152)


def randomised(model):
    torch.manual_seed(3)
    for p in model.parameters():
        p.data.normal_(0, 0.1)
    return model.eval()


def test_label_dropout_only_in_training():
    model = randomised(tiny())
    x, t, y = torch.randn(64, 4, 8, 8), torch.randint(0, 1000, (64,)), torch.randint(0, 10, (64,))
    assert torch.equal(model(x, t, y), model(x, t, y))  # eval: no dropout
    model.train()
    torch.manual_seed(0)
    dropped = model.y_embedder.token_drop(y)
    assert 0 < (dropped == 10).sum() < 20  # about 10% replaced by the null class
    forced = model.y_embedder(y, train=False, force_drop_ids=torch.ones_like(y))
    assert torch.equal(forced, model.y_embedder.embedding_table.weight[10].expand(64, -1))


def test_forward_with_cfg_guides_first_three_channels():
    model = randomised(tiny())
    x = torch.randn(2, 4, 8, 8).repeat(2, 1, 1, 1)
    t = torch.tensor([500, 20]).repeat(2)
    y = torch.tensor([3, 7, 10, 10])
    out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    raw = model(x, t, y)
    cond, uncond = raw[:2], raw[2:]
    guided = uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3])
    torch.testing.assert_close(out[:2, :3], guided)
    torch.testing.assert_close(out[2:, :3], guided)
    torch.testing.assert_close(out[:2, 3:], raw[:2, 3:])  # 4th eps channel and the sigma channels: unguided
    out_all = model.forward_with_cfg(x, t, y, cfg_scale=4.0, cfg_channels=None)
    torch.testing.assert_close(out_all[:2, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]))
    torch.testing.assert_close(out_all[:2, 4:], raw[:2, 4:])
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, cfg_scale=1.0)[:2], cond)


def test_gradients_flow_to_all_trainable_parameters():
    model = randomised(tiny()).train()
    x, t, y = torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randint(0, 10, (2,))
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad and "embedding_table" not in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_model_files_do_not_import_torch_distributed():
    import pathlib

    import opendit.models as models_pkg

    for path in pathlib.Path(models_pkg.__file__).parent.glob("*.py"):
        assert "torch.distributed" not in path.read_text(), path.name


def test_size_overrides_and_bad_sizes():
    model = DiT_models["DiT-B/4"](input_size=16, depth=3, hidden_size=48, num_heads=4, num_classes=5)
    assert len(model.blocks) == 3 and model.hidden_size == 48
    with pytest.raises(ValueError):
        DiT_models["DiT-S/8"](input_size=12)


def test_low_precision_residual_only_changes_rounding_under_autocast():
    """KernelChoice.low_precision_residual: exact no-op without autocast; under bf16 autocast a bf16 residual stream
    gives the fp32-residual output to within bf16 rounding."""
    from opendit.models import DiT

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10).eval()
    for p in model.parameters():
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    ref = model(x, t, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_bf16 = model(x, t, y)
    model.kernels.low_precision_residual = True
    torch.testing.assert_close(model(x, t, y), ref, rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y)
    assert not torch.equal(out, ref_bf16)  # the flag did take effect
    assert (out - ref).norm() / ref.norm() < 3e-2
    assert (out - ref).norm() < 2 * (ref_bf16 - ref).norm() + 1e-3


def test_layer_modulations_are_the_per_layer_modules():
    """layer_modulations (the fused-boundaries path: one GEMM over the stacked adaLN weights) gives every block's and
    the final layer's adaLN_modulation(c), and the same gradients for c and every weight and bias, in float64."""
    torch.manual_seed(0)
    model = DiT_models["DiT-S/2"](input_size=8, num_classes=10, depth=3, hidden_size=32, num_heads=4).double()
    layers = [*model.blocks, model.final_layer]
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))  # adaLN-Zero would make every modulation and its weight gradient zero
    c = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    params = [c] + [p for layer in layers for p in layer.adaLN_modulation.parameters()]
    mods, refs = model.layer_modulations(c), [layer.adaLN_modulation(c) for layer in layers]
    assert [m.shape for m in mods] == [(2, 6 * 32)] * 3 + [(2, 2 * 32)]
    for m, r in zip(mods, refs):
        torch.testing.assert_close(m, r, rtol=1e-12, atol=1e-12)
    w = [torch.randn_like(r) for r in refs]  # a different weight per output: a swapped split would change the gradients
    got = torch.autograd.grad(sum((m * wi).sum() for m, wi in zip(mods, w)), params)
    want = torch.autograd.grad(sum((r * wi).sum() for r, wi in zip(refs, w)), params)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,shape", [("DiT-S/2", (2, 4, 8, 8)), ("VDiT-S/1x2x2", (2, 4, 2, 8, 8)), ("Latte-S/1x2x2", (2, 4, 2, 8, 8))])
def test_precomputed_modulation_replaces_the_conditions(name, shape):
    """forward(..., modulation=modulations(condition(t, y, text))) is forward(t, y, text) exactly; every block's and
    the final layer's adaLN output sits side by side (depth * 6D + 2D), and t, y, text are then not read."""
    kwargs = dict(input_size=8, in_channels=4, num_classes=10, depth=2, hidden_size=64, num_heads=4, text_dim=16)
    if name != "DiT-S/2":
        kwargs["num_frames"] = 2
    torch.manual_seed(0)
    model = DiT_models[name](**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.1 * torch.randn_like(p))  # adaLN-Zero would make every modulation zero
    x, t, y, text = torch.randn(shape), torch.tensor([10, 900]), torch.tensor([1, 10]), torch.randn(2, 16)
    with torch.no_grad():
        ref = model(x, t, y, text)
        mods = model.modulations(model.condition(t, y, text))
        assert model.modulation_widths() == [6 * 64, 6 * 64, 2 * 64] and mods.shape == (2, 2 * 6 * 64 + 2 * 64)
        assert torch.equal(mods[:, 6 * 64 : 12 * 64], model.blocks[1].adaLN_modulation(model.condition(t, y, text)))
        out = model(x, torch.zeros_like(t), None, None, modulation=mods)
    assert torch.equal(out, ref)
