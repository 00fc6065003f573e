"""One training step: noise and timesteps, the diffusion loss, backward, clipping, AdamW, the LR schedule and the EMA."""
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch

from opendit.builders import PRECISIONS
from opendit.diffusion import create_diffusion
from opendit.parallel.mesh import ParallelMesh
from opendit.training.bf16_weights import Bf16Weights
from opendit.training.ema import ShardedEMA
from opendit.training.guard import DivergenceGuard, any_rank
from opendit.training.optim import ShardedAdamW, clip_and_check, grad_norm_and_divisor, lr_factor


@dataclass
class StepResult:
    """What one step reports: the loss terms (per sample), the gradient norm, whether fp16 overflow skipped it, its LR."""

    loss_dict: dict
    grad_norm: torch.Tensor
    skipped: bool
    lr: float


@dataclass
class TrainStep:
    """Everything a step touches; calling it trains on one batch of latents."""

    model: torch.nn.Module  # the parallelized module (DDP wrapper, FSDP2 or the model itself)
    diffusion: object
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scheduler: torch.optim.lr_scheduler.LRScheduler
    ema: ShardedEMA
    mesh: ParallelMesh
    amp_dtype: torch.dtype
    use_autocast: bool
    grad_clip: float
    ema_decay: float
    guard: DivergenceGuard
    weights: Optional[Bf16Weights] = None  # bf16 copies of the matmul weights and biases, run in their place (the CUDA-graph step)

    def __post_init__(self):
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.skipped_steps = 0
        self.on_device_skip = all(group.get("fused") for group in self.optimizer.param_groups)  # see guard.py
        self.clip_divisor = None  # fused AdamW (bf16 / fp32): the step's max(1, |g| / grad_clip), which AdamW divides by

    def __call__(self, x: torch.Tensor, model_kwargs: dict) -> StepResult:
        t, noise = self.draw(x)
        self.mesh.share_sample(x, t, noise, *model_kwargs.values())  # sequence-parallel peers denoise one sample
        loss_dict, grad_norm, skipped = self.update(x, t, noise, model_kwargs)
        return self.finish(loss_dict, grad_norm, skipped)

    def draw(self, x: torch.Tensor) -> tuple:
        """Random timesteps (N,) and noise shaped like x."""
        return torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device), torch.randn_like(x)

    def update(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, model_kwargs: dict) -> tuple:
        """The device work of a step: loss, backward, clipping, AdamW and the EMA. Returns (loss_dict, grad_norm, skipped)."""
        self.ema.begin()  # a deferred EMA update (the CUDA-graph step's) runs beside the forward and backward
        model = self.model if self.weights is None else self.weights.bind(self.model)
        with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=self.use_autocast):
            loss_dict = self.diffusion.training_losses(model, x, t, model_kwargs, noise=noise)
        self.optimizer.zero_grad(set_to_none=True)
        if self.weights is not None:
            self.weights.zero_grad()
        loss = loss_dict["loss"].mean()
        self.scaler.scale(self.mesh.gradient_loss(loss)).backward()
        if self.on_device_skip and not self.scaler.is_enabled():  # fused AdamW clips: it divides the gradients by the divisor
            grads = [p.grad for p in self.params if p.grad is not None] + (self.weights.grads() if self.weights is not None else [])
            grad_norm, self.clip_divisor = grad_norm_and_divisor(grads, self.grad_clip)
        else:
            grad_norm, self.clip_divisor = clip_and_check(self.optimizer, self.scaler, self.params, self.grad_clip), None
        bad = any_rank(~torch.isfinite(loss.detach()))  # the same decision on every rank (guard.py)
        if not self.scaler.is_enabled():  # fp16: GradScaler skips overflowing gradients itself
            bad = bad | ~torch.isfinite(grad_norm)
        self.guard.record(bad)
        skipped = self._step(bad)
        return loss_dict, grad_norm, skipped

    def finish(self, loss_dict: dict, grad_norm: torch.Tensor, skipped: bool) -> StepResult:
        """The host side of a step: advance the LR schedule."""
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        return StepResult(loss_dict, grad_norm, skipped, lr)

    def _step(self, bad: torch.Tensor) -> bool:
        """AdamW and the EMA unless `bad` (or an fp16 overflow); returns whether fp16 overflow skipped the step."""
        self.ema.join()  # AdamW writes the parameters that a deferred EMA update reads
        if self.scaler.is_enabled():
            scale, is_bad = self.scaler.get_scale(), bool(bad.item())  # fp16 synchronises in GradScaler anyway
            if not is_bad:
                self.scaler.step(self.optimizer)
            self.scaler.update()
            skipped = self.scaler.get_scale() < scale
            self.skipped_steps += skipped
            if not (skipped or is_bad):
                self.ema.update(self.ema_decay)
            return skipped
        if self.on_device_skip:  # no host sync: the fused kernel skips on found_inf, the EMA weight is zeroed
            self.optimizer.found_inf, self.optimizer.grad_scale = bad.float(), self.clip_divisor
            self.optimizer.step()
            self.optimizer.found_inf = self.optimizer.grad_scale = None
            if self.weights is not None:
                self.weights.step(self.clip_divisor, bad.float())
            self.ema.update(self.ema_decay, keep=bad)
        elif not bad.item():  # CPU: reading the flag is free
            self.optimizer.step()
            self.ema.update(self.ema_decay)
        return False

    def state_dict(self) -> dict:
        """The step's state outside DCP's model / optimizer / EMA shards: the LR schedule and the fp16 loss scale."""
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict, lr: float, weight_decay: float) -> None:
        """Restore the LR schedule and loss scale; this run's --lr, --weight_decay and schedule (warmup, max_steps)
        take effect over the checkpoint's."""
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["weight_decay"] = lr, weight_decay
        self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)
        factors = [fn(self.scheduler.last_epoch) for fn in self.scheduler.lr_lambdas]  # LambdaLR: the new schedule's
        for group, factor in zip(self.optimizer.param_groups, factors):
            group["lr"] = lr * factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def scaler_metrics(self) -> dict:
        """fp16: the loss scale and the overflow steps skipped so far; nothing otherwise."""
        return {"loss_scale": self.scaler.get_scale(), "skipped_steps": self.skipped_steps} if self.scaler.is_enabled() else {}


def build_train_step(args, model: torch.nn.Module, train_model: torch.nn.Module, mesh: ParallelMesh, max_steps: int) -> TrainStep:
    """AdamW over the trainable parameters, the loss scaler (fp16), the EMA, DiT's diffusion and the LR schedule."""
    device = next(model.parameters()).device
    amp_dtype = PRECISIONS[args.mixed_precision]
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = ShardedAdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, fused=device.type == "cuda", foreach=device.type != "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    ema = ShardedEMA(model)  # fp32, laid out like the (sharded) parameters; starts equal to the model
    diffusion = create_diffusion(timestep_respacing="", noise_schedule=args.noise_schedule, snr_gamma=args.snr_gamma)  # 1000 steps, learned-range sigma
    if args.compile:
        diffusion.compile_losses()  # the VB term's dozens of small kernels as a few
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, args.lr_schedule, args.lr_warmup_steps, max_steps))
    use_autocast = amp_dtype != torch.float32 and not (mesh.device_mesh is not None and args.plugin != "ddp")  # FSDP2 casts parameters itself
    guard = DivergenceGuard(device, getattr(args, "max_bad_steps", 5))
    return TrainStep(train_model, diffusion, optimizer, scaler, scheduler, ema, mesh, amp_dtype, use_autocast, args.grad_clip, args.ema_decay, guard)
