"""A TrainStep whose device work (forward, backward, clipping, AdamW, EMA) is one CUDA graph, replayed every step.

Small models at small batches wait on the host: a DiT-B/2 step at batch 64 launches thousands of kernels from
Python. Captured once, a step costs one graph launch. The first `warmup` steps run eagerly on a side stream (lazy
initialisation, torch.compile and autotuning happen there), the next one captures the graph, and every step after
that copies the batch into static inputs and replays it. Timesteps and noise are drawn outside the graph, as the eager
step draws them; the LR reaches the fused AdamW kernel through a device tensor, so the schedule keeps working.
The EMA update is deferred (ema.py): it overlaps the next step's forward and backward on a second stream. Under bf16
autocast the forward and backward run on bf16 copies of the matmul weights and biases that AdamW keeps current
(bf16_weights.py); their masters' EMA moves inside that AdamW pass (it has the new weights in registers), the rest
beside the next step.
One process, CUDA, bf16/fp32 (no fp16 loss scaler), no sequence parallelism: check_graph_step refuses the rest.
"""
from typing import Optional

import torch

from opendit.errors import UsageError
from opendit.training.bf16_weights import Bf16Weights


def graph_step_refusal(world_size: int, cuda: bool, precision: str, sequence_parallel_size: int, grad_checkpoint: bool) -> Optional[str]:
    """Why a run with these settings cannot capture its step in a CUDA graph, or None when it can."""
    if not cuda:
        return "needs a CUDA GPU"
    if world_size > 1:
        return "one process only (DDP / FSDP2 hooks and collectives are not captured)"
    if precision == "fp16":
        return "not with --mixed_precision fp16 (the loss scaler skips steps from the host); use bf16"
    if sequence_parallel_size > 1:
        return "not with sequence parallelism"
    if grad_checkpoint:
        return "not with --grad_checkpoint"
    return None


def maybe_graph_step(args, step, world_size: int, device: torch.device):
    """train.py's --cuda_graph: the step as a CudaGraphStep when asked (on) or possible (auto), else unchanged."""
    why = graph_step_refusal(world_size, device.type == "cuda", args.mixed_precision, args.sequence_parallel_size, args.grad_checkpoint)
    if args.cuda_graph == "on" and why:
        raise UsageError(f"--cuda_graph on: {why}")
    return CudaGraphStep(step) if args.cuda_graph != "off" and why is None else step


class CudaGraphStep:
    """Calls like a TrainStep (and forwards everything else to it); its device work is a CUDA graph after warm-up."""

    def __init__(self, step, warmup: int = 3, overlap_ema: bool = True, bf16_weights: bool = True, fused_ema: bool = True):
        if step.scaler.is_enabled():
            raise UsageError("--cuda_graph: not with --mixed_precision fp16 (the loss scaler skips steps from the host)")
        if bf16_weights and step.use_autocast and step.amp_dtype == torch.bfloat16 and step.on_device_skip:
            step.weights = Bf16Weights(step.model, step.optimizer)  # no weight casts in the graph (bf16_weights.py)
            if fused_ema:  # the copies' masters' EMA in the AdamW pass; the rest keeps ShardedEMA's update
                step.weights.fuse_ema(step.ema, step.ema_decay)
        self.step, self.warmup, self.calls = step, warmup, 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static: dict = {}  # inputs the graph reads: x, t, noise and the model kwargs
        self.outputs: tuple = ()  # (loss_dict, grad_norm) the graph writes
        for group in step.optimizer.param_groups:
            group["capturable"] = True  # AdamW's step counters stay on the device
        self.lr = None  # one device tensor per param group, read by the fused AdamW kernel inside the graph
        self.side = None  # the warm-up stream
        if overlap_ema:  # each step's EMA update runs during the next step's forward and backward, on a side stream
            step.ema.defer()

    def __getattr__(self, name: str):
        return getattr(self.__dict__["step"], name)

    def __call__(self, x: torch.Tensor, model_kwargs: dict):  # -> StepResult
        t, noise = self.step.draw(x)
        if self.calls < self.warmup:
            loss_dict, grad_norm = self.eager(x, t, noise, model_kwargs)
        else:
            if self.graph is None:
                self.capture(x, t, noise, model_kwargs)
            self.feed(x, t, noise, model_kwargs)
            self.graph.replay()
            # The graph rewrites its outputs at every replay: hand out copies, as an eager step's are its own.
            loss_dict, grad_norm = {k: v.clone() for k, v in self.outputs[0].items()}, self.outputs[1].clone()
        self.calls += 1
        return self.step.finish(loss_dict, grad_norm, False)

    def eager(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, model_kwargs: dict) -> tuple:
        """One ordinary step on a side stream (CUDA graphs want their warm-up off the default stream)."""
        self.side = self.side or torch.cuda.Stream()
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            if self.step.weights is not None:
                self.step.weights.refresh()  # the masters may have changed since (a checkpoint loaded)
            loss_dict, grad_norm, _ = self.step.update(x, t, noise, model_kwargs)
        torch.cuda.current_stream().wait_stream(self.side)
        # Detached, so no caller keeps this step's autograd graph (and its side-stream AccumulateGrad nodes) alive
        # into the capture: the captured backward would accumulate on the wrong stream.
        return {k: v.detach() for k, v in loss_dict.items()}, grad_norm

    def feed(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, model_kwargs: dict) -> None:
        """Copy this step's inputs and LR into the tensors the graph reads."""
        given = {"x": x, "t": t, "noise": noise, **model_kwargs}
        if given.keys() != self.static.keys() or any(v.shape != self.static[k].shape for k, v in given.items()):
            raise ValueError(f"--cuda_graph: the step was captured for {self._shapes(self.static)}, got {self._shapes(given)}")
        for k, v in given.items():
            self.static[k].copy_(v, non_blocking=True)
        for lr, group in zip(self.lr, self.step.optimizer.param_groups):
            lr.fill_(group["lr"])  # a float from the scheduler: no host synchronisation

    def capture(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, model_kwargs: dict) -> None:
        """Record one step's device work into self.graph (nothing runs until replay)."""
        self.static = {k: v.clone() for k, v in {"x": x, "t": t, "noise": noise, **model_kwargs}.items()}
        groups = self.step.optimizer.param_groups
        self.lr = [torch.tensor(float(g["lr"]), device=x.device) for g in groups]
        floats = [g["lr"] for g in groups]
        for g, lr in zip(groups, self.lr):
            g["lr"] = lr  # captured by pointer; the schedule's floats are restored below and copied in by feed()
        self.step.optimizer.zero_grad(set_to_none=True)  # gradients are allocated inside the graph's pool
        if self.step.weights is not None:
            self.step.weights.zero_grad()
            self.step.weights.refresh()  # outside the graph: inside it, AdamW keeps the copies current
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                s = self.static
                kwargs = {k: v for k, v in s.items() if k not in ("x", "t", "noise")}
                loss_dict, grad_norm, _ = self.step.update(s["x"], s["t"], s["noise"], kwargs)
        finally:
            for g, lr in zip(groups, floats):
                g["lr"] = lr
        if self.step.weights is not None:
            self.step.weights.commit()  # the addresses the captured AdamW launch reads when the graph replays
        self.outputs = ({k: v.detach() for k, v in loss_dict.items()}, grad_norm)

    @staticmethod
    def _shapes(tensors: dict) -> str:
        return ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items())
