"""ShardedEMA: the foreach-lerp update equals DiT's decay * ema + (1 - decay) * param up to float rounding, and keep=True is a no-op."""
import pytest
import torch
import torch.nn as nn

from opendit.training.ema import ShardedEMA

DECAY = 0.9999


def model_and_ema(lerp: bool, device: str = "cpu"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 3), nn.BatchNorm1d(3)).to(device)
    model[2].bias.requires_grad_(False)  # frozen: kept, never updated
    ema = ShardedEMA(model, lerp=lerp)
    with torch.no_grad():  # the weights move away from the EMA, as after some optimizer steps
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model, ema


def reference(model: nn.Module, before: dict, decay: float) -> dict:
    """DiT's update in float64 on the trainable weights; everything else as it was."""
    params = dict(model.named_parameters())
    return {k: (decay * v.double() + (1 - decay) * params[k].double()) if k in params and params[k].requires_grad else v.double() for k, v in before.items()}


@pytest.mark.parametrize("lerp", [True, False])
@pytest.mark.parametrize("keep", [None, False])
def test_update_is_dits_ema_up_to_float_rounding(lerp, keep):
    model, ema = model_and_ema(lerp)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    for _ in range(3):
        expected = reference(model, ema.state_dict(), DECAY)
        ema.update(DECAY, keep=None if keep is None else torch.tensor(keep))
        for k, v in ema.state_dict().items():
            assert v.dtype == before[k].dtype
            torch.testing.assert_close(v.double(), expected[k], rtol=0, atol=4 * torch.finfo(torch.float32).eps * (1 + expected[k].abs().max().item()))
    assert torch.equal(ema.state_dict()["2.bias"], before["2.bias"])  # the frozen weight
    assert not torch.equal(ema.state_dict()["0.weight"], before["0.weight"])


def test_lerp_and_mul_add_agree_and_keep_false_equals_no_keep():
    _, lerp = model_and_ema(True)
    _, mul_add = model_and_ema(False)
    _, masked = model_and_ema(True)
    for _ in range(5):
        lerp.update(0.9)
        mul_add.update(0.9)
        masked.update(0.9, keep=torch.tensor(False))
    for k in lerp.state_dict():
        torch.testing.assert_close(lerp.state_dict()[k], mul_add.state_dict()[k], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(masked.state_dict()[k], lerp.state_dict()[k], rtol=0, atol=1e-7)


@pytest.mark.parametrize("lerp", [True, False])
def test_keep_true_leaves_the_ema_bit_identical(lerp):
    _, ema = model_and_ema(lerp)
    ema.update(0.5, keep=torch.tensor(False))  # a normal step first (allocates the lerp weight buffer)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    ema.update(0.5, keep=torch.tensor(True))
    assert all(torch.equal(before[k], v) for k, v in ema.state_dict().items())
    ema.update(0.5, keep=torch.tensor(False))  # and the buffer is refilled for the next good step
    assert not torch.equal(before["0.weight"], ema.state_dict()["0.weight"])


@pytest.mark.gpu
def test_keep_path_replayed_in_a_cuda_graph():
    """What the CUDA-graph step does: the update with a device `keep` flag captured once, then replayed."""
    _, ema = model_and_ema(True, "cuda")
    _, reference = model_and_ema(False, "cuda")
    keep = torch.zeros((), dtype=torch.bool, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as CudaGraphStep does
        ema.update(0.9, keep=keep)
    torch.cuda.current_stream().wait_stream(side)
    reference.update(0.9, keep=keep)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ema.update(0.9, keep=keep)
    for flag in (False, True, False):
        keep.fill_(flag)
        before = {k: v.clone() for k, v in ema.state_dict().items()}
        graph.replay()
        reference.update(0.9, keep=keep)
        for k, v in ema.state_dict().items():
            torch.testing.assert_close(v, reference.state_dict()[k], rtol=1e-6, atol=1e-6)
        same = [torch.equal(v, before[k]) for k, v in ema.state_dict().items()]
        assert all(same) if flag else not torch.equal(ema.state_dict()["0.weight"], before["0.weight"])


@pytest.mark.parametrize("lerp", [True, False])
def test_deferred_updates_read_as_immediate_ones(lerp):
    """defer(): each update runs at the next begin(), and state_dict() / load_full() see the EMA of the last step."""
    model, now = model_and_ema(lerp)
    later = ShardedEMA(model, lerp=lerp)  # the same model's EMA, from the same start
    later.load_full(now.state_dict())
    later.defer()
    atol = 0 if lerp else 1e-7  # the mul + add's decay: a Python float, or (keep flag given) a float32 tensor
    for i, keep in enumerate([None, False, True, None, True, False]):  # good and skipped steps, in a device-flag order
        flag = None if keep is None else torch.tensor(keep)
        later.begin()  # the step's start: the previous step's update
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))  # AdamW, after join()
        later.join()
        now.update(0.9, keep=flag)
        later.update(0.9, keep=flag)
        if i % 2:  # read between steps: the pending update is applied once, not again at the next begin()
            for k, v in later.state_dict().items():
                torch.testing.assert_close(v, now.state_dict()[k], rtol=0, atol=atol)
    for k, v in later.state_dict().items():
        torch.testing.assert_close(v, now.state_dict()[k], rtol=0, atol=atol)
    read = {k: v.clone() for k, v in later.state_dict().items()}
    later.begin()  # nothing pending after the read: a no-op
    assert all(torch.equal(v, read[k]) for k, v in later.state_dict().items())


def test_deferred_update_is_dropped_by_load_full_and_skipped_steps_leave_nothing_pending():
    model, ema = model_and_ema(True)
    ema.defer()
    ema.update(0.5)  # pending
    loaded = {k: torch.full_like(v, 3.0) for k, v in ema.shadow.items()}
    ema.load_full(loaded)
    ema.begin()
    assert all(torch.equal(v, loaded[k]) for k, v in ema.state_dict().items())
    ema.update(0.5)
    ema.begin()  # applied here ...
    after = {k: v.clone() for k, v in ema.shadow.items()}
    ema.begin()  # ... and not again by a step that never called update() (CPU path of a bad step)
    assert all(torch.equal(v, after[k]) for k, v in ema.state_dict().items())
    assert not torch.equal(after["0.weight"], loaded["0.weight"])
