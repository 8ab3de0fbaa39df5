"""DDIM sampling of diffusion latents with classifier-free guidance (MONAI scheduler)."""
from __future__ import annotations

from typing import Callable

import torch

from .networks import build_scheduler


class Cancelled(Exception):
    """Raised when the caller's ``cancel()`` returned True between steps."""


@torch.no_grad()
def sample_latents(diffusion, embedding, scheduler_args: dict, conditions: torch.Tensor, shape: tuple[int, ...],
                   steps: int = 20, guidance: float = 1.0, generator: torch.Generator | None = None,
                   progress: Callable[[int, int], None] | None = None, cancel: Callable[[], bool] | None = None,
                   noise: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise ``(B, *shape)`` latents for normalised ``conditions`` ``(B, K)`` (NaN = omitted) in ``steps``
    DDIM steps (eta 0). ``guidance`` > 1 mixes in the unconditional prediction (all conditions missing)."""
    device = conditions.device
    scheduler = build_scheduler(scheduler_args, "ddim")
    scheduler.set_timesteps(num_inference_steps=steps)
    if noise is None:
        noise = torch.randn((conditions.shape[0], *shape), generator=generator, dtype=torch.float32)
    x = noise.to(device)
    context = embedding(conditions)
    if guidance != 1.0:
        context = torch.cat([embedding(torch.full_like(conditions, float("nan"))), context])
    total = len(scheduler.timesteps)
    for n, t in enumerate(scheduler.timesteps):
        if cancel is not None and cancel():
            raise Cancelled("Sampling was cancelled.")
        ts = torch.full((x.shape[0] * (2 if guidance != 1.0 else 1),), int(t), device=device, dtype=torch.long)
        if guidance != 1.0:
            uncond, cond = diffusion(torch.cat([x, x]), ts, context=context).chunk(2)
            out = uncond + guidance * (cond - uncond)
        else:
            out = diffusion(x, ts, context=context)
        x, _ = scheduler.step(out, t, x)
        if progress is not None:
            progress(n + 1, total)
    return x
