"""One training step: noise and timesteps, the diffusion loss, backward, clipping, AdamW, the LR schedule and the EMA."""
from dataclasses import dataclass
from functools import partial

import torch

from opendit.diffusion import create_diffusion
from opendit.parallel.mesh import ParallelMesh
from opendit.training.args import PRECISIONS
from opendit.training.ema import ShardedEMA
from opendit.training.optim import ShardedAdamW, lr_factor, optimizer_step


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

    def __post_init__(self):
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.skipped_steps = 0

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
        with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=self.use_autocast):
            loss_dict = self.diffusion.training_losses(self.model, x, t, model_kwargs, noise=noise)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(self.mesh.gradient_loss(loss_dict["loss"].mean())).backward()
        grad_norm, skipped = optimizer_step(self.optimizer, self.scaler, self.params, self.grad_clip)
        if not skipped:
            self.ema.update(self.ema_decay)
        return loss_dict, grad_norm, skipped

    def finish(self, loss_dict: dict, grad_norm: torch.Tensor, skipped: bool) -> StepResult:
        """The host side of a step: advance the LR schedule and count skipped steps."""
        lr = self.scheduler.get_last_lr()[0]  # the rate this step used
        self.scheduler.step()
        if skipped:
            self.skipped_steps += 1
        return StepResult(loss_dict, grad_norm, skipped, lr)

    def state_dict(self) -> dict:
        """The step's state outside DCP's model / optimizer / EMA shards: the LR schedule and the fp16 loss scale."""
        return {"scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])

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
    diffusion = create_diffusion(timestep_respacing="", noise_schedule=args.noise_schedule)  # 1000 steps, learned-range sigma
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, args.lr_schedule, args.lr_warmup_steps, max_steps))
    use_autocast = amp_dtype != torch.float32 and not (mesh.device_mesh is not None and args.plugin != "ddp")  # FSDP2 casts parameters itself
    return TrainStep(train_model, diffusion, optimizer, scaler, scheduler, ema, mesh, amp_dtype, use_autocast, args.grad_clip, args.ema_decay)
