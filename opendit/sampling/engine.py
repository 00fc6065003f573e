"""The fast denoising loop: each sampler's schedule constants on the device once (one row per step), one step function
(a single batched forward for the conditional and unconditional halves, the guidance combine, the sampler's update),
no host syncs inside the loop, and on a GPU the whole step captured as one CUDA graph (--compile, --cuda_graph); under
an attention broadcast one graph per compute/reuse pattern of the schedule, the step's pattern replayed.

GaussianDiffusion.p_sample_loop / ddim_sample_loop and the diffusers DPM-Solver++(2M) loop are the references: in fp32
the engine follows their arithmetic and, for DDPM, their random stream (tests/sampling/test_engine.py).
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from opendit.diffusion import create_diffusion


@dataclass
class Schedule:
    """Per step i: the model's timestep and the update's constants coefs[i] (float32, on the device)."""

    kind: str
    timesteps: torch.Tensor  # (S,) int64
    coefs: torch.Tensor  # (S, K) float32


def ddpm_schedule(num_steps: int, noise_schedule: str) -> tuple:
    """Columns: log beta, clipped posterior log-variance, sqrt(1/abar), sqrt(1/abar - 1), posterior mean coefs 1/2, t > 0."""
    d = create_diffusion(str(num_steps), noise_schedule=noise_schedule)
    cols = [d.log_betas, d.posterior_log_variance_clipped, d.sqrt_recip_alphas_cumprod, d.sqrt_recipm1_alphas_cumprod,
            d.posterior_mean_coef1, d.posterior_mean_coef2, (np.arange(d.num_timesteps) != 0).astype(np.float64)]
    return np.array(d.timestep_map)[::-1].copy(), np.stack(cols, 1)[::-1].copy()


def ddim_schedule(num_steps: int, noise_schedule: str) -> tuple:
    """Columns (eta = 0): sqrt(1/abar), sqrt(1/abar - 1), sqrt(abar_prev), sqrt(1 - abar_prev)."""
    d = create_diffusion(f"ddim{num_steps}", noise_schedule=noise_schedule)
    cols = [d.sqrt_recip_alphas_cumprod, d.sqrt_recipm1_alphas_cumprod, np.sqrt(d.alphas_cumprod_prev), np.sqrt(1 - d.alphas_cumprod_prev)]
    return np.array(d.timestep_map)[::-1].copy(), np.stack(cols, 1)[::-1].copy()


def dpm_solver_schedule(num_steps: int, noise_schedule: str) -> tuple:
    """DPM-Solver++(2M) as diffusers' DPMSolverMultistepScheduler (linspace timesteps, first order at the ends, final
    sigma 0). Columns: x0 = c0 x - c1 eps; x' = c2 x + c3 x0 + c4 (x0 - previous x0)."""
    betas = torch.tensor(create_diffusion("", noise_schedule=noise_schedule).base_betas, dtype=torch.float32)
    abar = torch.cumprod(1.0 - betas, 0)  # float32, as diffusers builds it
    ts = np.linspace(0, len(betas) - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    full = (((1 - abar) / abar) ** 0.5).numpy()
    sig = np.append(np.interp(ts, np.arange(len(full)), full), 0.0).astype(np.float32)
    sig = torch.from_numpy(sig)
    alpha = 1 / (sig**2 + 1) ** 0.5
    sigma = sig * alpha
    lam = torch.log(alpha) - torch.log(sigma)
    rows = []
    for i in range(num_steps):
        h = lam[i + 1] - lam[i]
        b = -alpha[i + 1] * (torch.exp(-h) - 1.0)
        second = 0 < i < num_steps - 1  # diffusers: first order at the first step and (final sigma 0) the last
        c4 = 0.5 * b / ((lam[i] - lam[i - 1]) / h) if second else torch.tensor(0.0)
        rows.append([1 / alpha[i], sigma[i] / alpha[i], sigma[i + 1] / sigma[i], b, c4])
    return ts, np.array([[float(v) for v in r] for r in rows], dtype=np.float64)


SCHEDULES = {"ddpm": ddpm_schedule, "ddim": ddim_schedule, "dpm-solver": dpm_solver_schedule}


def make_schedule(sampler: str, num_steps: int, noise_schedule: str, device: torch.device) -> Schedule:
    ts, coefs = SCHEDULES[sampler](num_steps, noise_schedule)
    return Schedule(sampler, torch.as_tensor(ts, device=device), torch.as_tensor(coefs, device=device).float())


def ddpm_update(x, out, c, noise, clip: bool):
    """Ancestral step with learned-range variance (GaussianDiffusion.p_sample). out: (B, 2C, ...) float32."""
    eps, var = out.split(x.shape[1], dim=1)
    x0 = c[2] * x - c[3] * eps
    x0 = x0.clamp(-1, 1) if clip else x0
    frac = (var + 1) / 2
    log_var = frac * c[0] + (1 - frac) * c[1]
    mean = c[4] * x0 + c[5] * x
    return mean + c[6] * torch.exp(0.5 * log_var) * noise


def ddim_update(x, out, c, clip: bool):
    """Deterministic DDIM step (eta = 0; GaussianDiffusion.ddim_sample)."""
    eps = out[:, : x.shape[1]]
    x0 = c[0] * x - c[1] * eps
    x0 = x0.clamp(-1, 1) if clip else x0
    eps = (c[0] * x - x0) / c[1]
    return x0 * c[2] + c[3] * eps


def dpm_update(x, out, c, x0_prev):
    """DPM-Solver++(2M) multistep update; returns (x', x0)."""
    x0 = c[0] * x - c[1] * out[:, : x.shape[1]]
    return c[2] * x + c[3] * x0 + c[4] * (x0 - x0_prev), x0


def modulation_budget(device: torch.device) -> int:
    """Bytes of precomputed adaLN outputs held at a time: 4 GiB, at most a tenth of the GPU's memory."""
    if device.type == "cuda":
        return min(4 << 30, torch.cuda.get_device_properties(device).total_memory // 10)
    return 1 << 30


class Guided:
    """The model's conditional and unconditional outputs (guide() combines them), from one batched forward of both
    halves' rows (or, with a cfg group of two ranks, each rank one half plus an all-gather).

    A DiT-family model's adaLN modulations depend only on (t, y, text), all known before the loop: they are computed
    for a chunk of the schedule's steps at once (one large GEMM per block instead of one weight-bound GEMM per block
    and step) and each step's rows are copied into a static buffer the model reads (forward's modulation=)."""

    def __init__(self, model: torch.nn.Module, cfg_scale: float, cfg_channels: Optional[int], amp_dtype: torch.dtype = torch.float32,
                 cfg_group: Optional[dist.ProcessGroup] = None):
        self.model, self.cfg_scale, self.cfg_channels, self.cfg_group = model, cfg_scale, cfg_channels, cfg_group
        self.amp_dtype, self.guided, self.kwargs = amp_dtype, cfg_scale > 1.0, None
        self.timesteps, self.chunk, self.n = None, 0, 0  # the schedule's timesteps, steps per precomputed table (0: off), rows
        self.table, self.table_start, self.mod = None, 0, None  # (chunk, rows, F) modulations from step table_start; the step's (rows, F)

    def set_condition(self, cond: dict, uncond: Optional[dict]) -> bool:
        """The conditions of the next batch (labels y, pooled prompts text; uncond: the null ones). Copied into the
        previous batch's tensors when the shapes match (a captured graph reads those); True when they did not."""
        if not self.guided:
            kwargs = cond
        elif self.cfg_group is not None:  # rank 0 of the pair runs the conditional half, rank 1 the unconditional
            kwargs = uncond if dist.get_rank(self.cfg_group) == 1 else cond
        else:  # conditional rows, then unconditional rows, in one batch
            kwargs = {k: None if cond[k] is None else torch.cat([cond[k], uncond[k]]) for k in cond}
        old = self.kwargs
        if old is not None and old.keys() == kwargs.keys() and all((a is None and b is None) or (a is not None and b is not None and a.shape == b.shape) for a, b in zip(old.values(), kwargs.values())):
            for k, v in kwargs.items():
                if v is not None:
                    old[k].copy_(v)
            return False
        self.kwargs = {k: None if v is None else v.clone() for k, v in kwargs.items()}
        return True

    @property
    def rows(self) -> int:
        return 2 if self.guided and self.cfg_group is None else 1

    def prepare_modulation(self, timesteps: torch.Tensor, batch: int) -> bool:
        """Precompute the modulations of the schedule's first steps for the current conditions (a batch of `batch`
        samples), when the model takes them and a step's fit the budget; True when the static buffer is new (a
        captured graph must be recaptured to read it)."""
        model = self.model
        if not hasattr(model, "modulations"):
            return False
        self.n = batch * self.rows  # the forward's rows (the conditions' length)
        per_step = self.n * sum(model.modulation_widths()) * (2 if self.amp_dtype != torch.float32 else 4)
        self.timesteps, self.chunk = timesteps, min(len(timesteps), modulation_budget(timesteps.device) // per_step)
        if self.chunk == 0:
            return False
        self.fill(0)
        new = self.mod is None or self.mod.shape != self.table.shape[1:] or self.mod.dtype != self.table.dtype
        if new:
            self.mod = torch.empty_like(self.table[0])
        self.mod.copy_(self.table[0])
        return new

    @torch.no_grad()
    def fill(self, start: int) -> None:
        """self.table = the modulations of steps start .. start + chunk - 1 for the current conditions: (k, n, F)."""
        ts, n = self.timesteps[start : start + self.chunk], self.n  # (k,)
        y, text = (None if v is None else v.repeat(len(ts), *[1] * (v.dim() - 1)) for v in (self.kwargs.get("y"), self.kwargs.get("text")))  # (k * n, ...)
        with torch.autocast(ts.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
            c = self.model.condition(ts.repeat_interleave(n), y, text)  # (k * n, D), step-major as y / text repeat
            self.table = self.model.modulations(c).view(len(ts), n, -1)  # (k, n, F)
        self.table_start = start

    def set_step(self, i: int) -> None:
        """Step i's modulations into the static buffer (refilling the table at the end of its chunk)."""
        if self.chunk == 0:
            return
        if not self.table_start <= i < self.table_start + len(self.table):
            self.fill(i)
        self.mod.copy_(self.table[i - self.table_start])

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        xx = torch.cat([x] * self.rows) if self.rows > 1 else x
        extra = {"modulation": self.mod} if self.chunk else {}
        with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype != torch.float32):
            out = self.model(xx, t.expand(len(xx)), **self.kwargs, **extra)
        return out.float()

    def halves(self, x: torch.Tensor, t: torch.Tensor) -> tuple:
        """The model's (conditional, unconditional) outputs for x (B, C, ...); (output, None) without guidance."""
        out = self.forward(x, t)  # (rows * B, C_out, ...)
        if not self.guided:
            return out, None
        if self.cfg_group is not None:
            halves = [torch.empty_like(out) for _ in range(2)]
            dist.all_gather(halves, out.contiguous(), group=self.cfg_group)
            return halves[0], halves[1]
        return out.chunk(2)


def guide(cond: torch.Tensor, uncond: Optional[torch.Tensor], cfg_scale: float, g: int) -> torch.Tensor:
    """Classifier-free guidance: eps = uncond + s (cond - uncond) on the first g channels, the rest (the learned
    sigma) from the conditional rows; cond itself without guidance (uncond None)."""
    if uncond is None:
        return cond
    eps = uncond[:, :g] + cfg_scale * (cond[:, :g] - uncond[:, :g])
    return torch.cat([eps, cond[:, g:]], dim=1)


def graph_key(state: Optional[dict]) -> Optional[tuple]:
    """A step's broadcast state (kind -> full / compute / reuse) as the key of its CUDA graph; None without a broadcast."""
    return None if state is None else tuple(state.values())


class Engine:
    """Runs a Schedule from noise: step(i) = guided forward + update; optionally the step as CUDA graphs (one, or with an
    attention broadcast one per compute/reuse pattern of the schedule)."""

    def __init__(self, schedule: Schedule, guided: Guided, clip: bool, cuda_graph: bool = False, broadcast=None, compile_tail: bool = False):
        self.s, self.guided, self.clip = schedule, guided, clip
        self.cuda_graph = cuda_graph
        # compile_tail (--compile): the guidance combine and the sampler's update, ~20 small elementwise kernels a
        # step eagerly, as one compiled (fused) function
        self.tail = torch.compile(self._tail, dynamic=False) if compile_tail else self._tail
        self.graphs: dict = {}  # pattern (None without a broadcast) -> (CUDAGraph, its outputs)
        self.broadcast = broadcast  # an AttentionBroadcast (broadcast.py) told each step's index
        self.kept: list = []  # the broadcast's wrappers while graphs read their cached outputs
        if broadcast is not None and cuda_graph:
            broadcast.static = True

    def step(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, noise: torch.Tensor, x0_prev: torch.Tensor) -> tuple:
        cond, uncond = self.guided.halves(x, t)
        return self.tail(x, cond, uncond, c, noise, x0_prev)

    def _tail(self, x, cond, uncond, c, noise, x0_prev) -> tuple:
        """Guidance, then the sampler's update: -> (x', x0 for DPM-Solver's next step)."""
        out = guide(cond, uncond, self.guided.cfg_scale, self.guided.cfg_channels or x.shape[1])
        if self.s.kind == "ddpm":
            return ddpm_update(x, out, c, noise, self.clip), x0_prev
        if self.s.kind == "ddim":
            return ddim_update(x, out, c, self.clip), x0_prev
        return dpm_update(x, out, c, x0_prev)

    def patterns(self) -> list:
        """The broadcast states of the schedule's steps, each distinct one once, in order of first use ([None] without)."""
        if self.broadcast is None:
            return [None]
        seen = {}
        for state in self.broadcast.plan(len(self.s.timesteps)):
            seen.setdefault(graph_key(state), state)
        return list(seen.values())

    def _capture(self, bufs: tuple) -> None:
        """Warm up on a side stream (compiles, cuDNN plans, the broadcast's buffers), then record one step per pattern
        into CUDA graphs over static buffers, sharing one memory pool (they replay one at a time)."""
        patterns = self.patterns()
        if self.broadcast is not None:
            self.broadcast.attach(self.guided.model)
            counts = self.broadcast.computed, self.broadcast.reused  # warm-up and capture are not sampling
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for state in patterns:  # in order of first use: a kind's buffers exist before a pattern reuses them
                    self._set_state(state)
                    for _ in range(2):
                        self.step(*bufs)
            torch.cuda.current_stream().wait_stream(stream)
            self.graphs, pool = {}, torch.cuda.graph_pool_handle()
            # with a process group up, its watchdog thread polls NCCL events during the capture: only this thread's
            # calls may invalidate it (as before for this thread; torch < 2.7 did not shield the watchdog's queries)
            mode = "thread_local" if dist.is_initialized() else "global"
            for state in patterns:
                self._set_state(state)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
                    outs = self.step(*bufs)
                self.graphs[graph_key(state)] = (graph, outs)
        finally:
            if self.broadcast is not None:
                self.kept = self.broadcast.detach()  # the graphs replay without the wrappers, reading their buffers
                self.broadcast.computed, self.broadcast.reused = counts

    def _set_state(self, state) -> None:
        if state is not None:
            self.broadcast.state = state

    def sample(self, z: torch.Tensor, cond: dict, uncond: Optional[dict] = None, progress: bool = False) -> torch.Tensor:
        """x_T = z (B, C, ...) -> x_0 under the conditions cond (and the null ones, uncond, for guidance). DDPM draws
        fresh noise for 2B rows per step under guidance and uses the first B, as the reference's doubled batch does."""
        changed = self.guided.set_condition(cond, uncond)
        changed = self.guided.prepare_modulation(self.s.timesteps, len(z)) or changed
        noise_rows = 2 * len(z) if self.guided.guided else len(z)
        if self.cuda_graph and (changed or not self.graphs or self.bufs[0].shape != z.shape):
            self.bufs = (z.float().clone(), self.s.timesteps[0].clone(), self.s.coefs[0].clone(), torch.zeros_like(z, dtype=torch.float32), torch.zeros_like(z, dtype=torch.float32))
            self._capture(self.bufs)
        if self.cuda_graph:
            x, t_buf, c_buf, n_buf, x0_prev = self.bufs
            x.copy_(z)
            x0_prev.zero_()
        else:
            x = z.float().clone()
            x0_prev = torch.zeros_like(x)
        noise = torch.zeros_like(x)
        if self.broadcast is None or self.cuda_graph:
            return self._loop(x, x0_prev, noise, noise_rows, progress)
        self.broadcast.attach(self.guided.model)
        try:
            return self._loop(x, x0_prev, noise, noise_rows, progress)
        finally:
            self.broadcast.detach()  # other engines on this model compute every attention

    def _loop(self, x: torch.Tensor, x0_prev: torch.Tensor, noise: torch.Tensor, noise_rows: int, progress: bool) -> torch.Tensor:
        if self.cuda_graph:
            _, t_buf, c_buf, n_buf, _ = self.bufs
        total = len(self.s.timesteps)
        steps = range(total)
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps)
        for i in steps:
            if self.s.kind == "ddpm":
                noise = torch.randn((noise_rows, *x.shape[1:]), device=x.device)[: len(x)]
            if self.broadcast is not None:
                self.broadcast.set_step(i, total)
            self.guided.set_step(i)
            if self.cuda_graph:
                t_buf.copy_(self.s.timesteps[i])
                c_buf.copy_(self.s.coefs[i])
                n_buf.copy_(noise)
                state = None if self.broadcast is None else self.broadcast.state
                graph, outs = self.graphs[graph_key(state)]
                graph.replay()
                if state is not None:
                    self.broadcast.tally(state, self.kept)
                x.copy_(outs[0])
                x0_prev.copy_(outs[1])
            else:
                x, x0_prev = self.step(x, self.s.timesteps[i], self.s.coefs[i], noise, x0_prev)
        return x.clone() if self.cuda_graph else x
