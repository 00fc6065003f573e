"""bf16 working copies of the matmul weights and biases: the CUDA-graph step's forward and backward run on them.

Under bf16 autocast every Linear / Conv weight and bias is cast from its fp32 master to bf16 at each step, and its
bf16 gradient is cast back to fp32 for AdamW: 12 bytes a weight a step that move nothing new, and two small kernels
a bias that wait on their launches. Here the step calls the model with bf16 copies in place of those parameters
(torch.func.functional_call); the copies hold exactly what autocast's cast would (round to nearest even), so the
forward, the loss and the gradients are the same. fc1's bias, which the Triton bias + GELU kernel reads (fp32 maths
inside), then comes in bf16 too, as autocast gives every other bias. AdamW (kernels/adamw.py) updates each fp32
master from its copy's bf16 gradient and rewrites the copy in the same pass, one launch over all the copies of a
param group. Everything else reads the masters (model.parameters()): checkpoints, the EMA, previews; the moments
live in the optimizer's state in torch AdamW's layout, so checkpoints are the plain step's. Embeddings and other
parameters keep the plain path (fused AdamW updates them).
"""
import torch
import torch.nn as nn

from opendit.kernels.adamw import MultiTensorAdamW, adamw_each_, adamw_scalars

_MATMULS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
COPIED = ("weight", "bias")  # which of a matmul module's parameters get copies (bench/train_step.py +fp32-biases: weights only)


class Bf16Weights:
    """bf16 copies of a model's trainable Linear / Conv weights and biases, used by bind(); step() is their AdamW."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, dtype: torch.dtype = torch.bfloat16):
        if not all(group.get("fused") for group in optimizer.param_groups):
            raise ValueError("Bf16Weights needs fused AdamW (it takes the clip divisor and found_inf as fused AdamW does)")
        group_of = {id(p): i for i, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self.names, self.masters, self.groups = [], [], []  # groups: indices (load_state_dict replaces the group dicts)
        for prefix, module in model.named_modules():
            for attr in COPIED if isinstance(module, _MATMULS) else ():
                w = getattr(module, attr)
                if isinstance(w, nn.Parameter) and id(w) in group_of and type(w.data) is torch.Tensor and w.dtype == torch.float32:
                    self.names.append(f"{prefix}.{attr}" if prefix else attr)
                    self.masters.append(w)
                    self.groups.append(group_of[id(w)])
        self.copies = [w.detach().to(dtype).requires_grad_() for w in self.masters]
        self.optimizer = optimizer
        self.emas, self.ema_weight = None, 0.0  # fuse_ema(): the masters' EMA, updated in the AdamW pass
        self.launches = {}  # (param group index, the weights with gradients) -> its one-launch AdamW
        self.one_launch = True  # False: one launch per weight (for comparison, bench/train_step.py +per-weight-adamw)

    def fuse_ema(self, ema, decay: float) -> None:
        """Update the masters' EMA in AdamW's pass (it reads the new weights there), not in ema's own update."""
        self.emas, self.ema_weight = ema.take(self.masters), 1 - decay

    @torch.no_grad()
    def refresh(self) -> None:
        """Copies := masters (after anything but step() changed them: a checkpoint load, the first steps)."""
        if self.copies:
            torch._foreach_copy_([c.detach() for c in self.copies], self.masters)

    def bind(self, model: nn.Module):
        """model, called with the copies in place of the fp32 weights (as model(*args, **kwargs))."""
        weights = dict(zip(self.names, self.copies))
        return lambda *args, **kwargs: torch.func.functional_call(model, weights, args, kwargs, strict=False)

    def zero_grad(self) -> None:
        for c in self.copies:
            c.grad = None

    def grads(self) -> list:
        return [c.grad for c in self.copies if c.grad is not None]

    @torch.no_grad()
    def step(self, grad_scale: torch.Tensor, found_inf: torch.Tensor) -> None:
        """AdamW on the masters from the copies' gradients (divided by grad_scale; nothing when found_inf), rewriting
        the copies; its state is optimizer.state[master] (step, exp_avg, exp_avg_sq) as torch AdamW keeps it."""
        states = [self._state(w) for w in self.masters]
        if not states:
            return
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1)
        torch._foreach_sub_(steps, [found_inf] * len(steps))  # a skipped step does not count (as torch AdamW counts)
        emas = self.emas or [None] * len(self.masters)
        updates = {}  # param group index -> the indices of the weights with a gradient, and their tensors
        for i, (w, c, index, state, ema) in enumerate(zip(self.masters, self.copies, self.groups, states, emas)):
            if c.grad is not None:
                members, tensors = updates.setdefault(index, ([], []))
                members.append(i)
                tensors.append((w.detach(), c.grad, state["exp_avg"], state["exp_avg_sq"], c.detach(), ema))
        for index, (members, tensors) in updates.items():  # one launch per param group (same lr, betas and step count)
            group = self.optimizer.param_groups[index]  # the current dict: lr (a device tensor in the CUDA graph), betas, ...
            beta1, beta2 = group["betas"]
            scalars = adamw_scalars(group["lr"], states[members[0]]["step"], beta1, beta2, grad_scale, found_inf)
            key = (index, tuple(members))
            if self.one_launch and key not in self.launches:
                self.launches[key] = MultiTensorAdamW([t[0].numel() for t in tensors], self.masters[members[0]].device)
            update = self.launches[key] if self.one_launch else adamw_each_
            update(tensors, scalars, beta1, beta2, group["weight_decay"], group["eps"], self.ema_weight)

    def commit(self) -> None:
        """After a CUDA-graph capture of step(): the captured launches' addresses into the tables they read."""
        for launch in self.launches.values():
            launch.commit()

    def _state(self, w: torch.Tensor) -> dict:
        """The optimizer's state of w, created as fused, capturable torch AdamW creates it when missing."""
        state = self.optimizer.state[w]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=w.device)
            state["exp_avg"] = torch.zeros_like(w, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(w, memory_format=torch.preserve_format)
        return state
