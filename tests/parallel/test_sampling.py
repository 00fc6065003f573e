"""Sampling with sp = 2 (FastSeq and Ulysses) gives the same samples as one process."""
import copy

import torch
import torch.distributed as dist

from opendit.diffusion import create_diffusion
from opendit.parallel import apply_sequence_parallel


def _sample(model, z, y, seed):
    torch.manual_seed(seed)  # p_sample's fresh noise at every step
    kwargs = dict(y=torch.cat([y, torch.full_like(y, 10)]), cfg_scale=4.0)  # classifier-free guidance, as sample.py
    z = torch.cat([z, z])  # conditional half, unconditional half
    return create_diffusion("4").p_sample_loop(model.forward_with_cfg, z.shape, z, model_kwargs=kwargs, device=z.device)


def _check_sampling(rank, world_size, cases):
    for name, (model, z, y, ref) in cases.items():
        for kind in ("fastseq", "ulysses"):
            samples = _sample(apply_sequence_parallel(copy.deepcopy(model), dist.group.WORLD, kind), z, y, seed=3)
            torch.testing.assert_close(samples, ref, rtol=1e-9, atol=1e-9, msg=lambda m: f"{name} {kind}: {m}")


def test_sp2_sampling_matches_one_process(spawn, tiny_models):
    cases = {}
    for name, (model, sample_shape) in tiny_models.items():
        model.eval()
        gen = torch.Generator().manual_seed(4)
        z, y = torch.randn(2, *sample_shape, generator=gen, dtype=torch.float64), torch.tensor([1, 7])
        with torch.no_grad():
            cases[name] = (model, z, y, _sample(model, z, y, seed=3))
        assert cases[name][-1].isfinite().all() and cases[name][-1].std() > 0.1
    spawn(_check_sampling, 2, cases)
