"""The training loop every stage shares: seeded determinism, DistributedDataParallel (torchrun; NCCL on GPU,
gloo on CPU), gradient accumulation, mixed precision on GPU, EMA, checkpoints with optimizer / scheduler /
EMA / RNG state and the seconds trained so far (a resumed stage's time is the sum of its runs), exact resume,
a progress bar, and rank-0 CSV + TensorBoard logs.

Determinism across process counts: the data order comes from a ``DistributedSampler`` seeded by the run seed
(rank r gets every world-th index of the epoch's permutation, so the ranks together see exactly the
single-process batch), and every per-sample random draw uses a generator seeded by (seed, step, sample index).
"""
from __future__ import annotations

import csv
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from diffdef.io import atomic_path
from diffdef.networks import channels_last_on_cpu

from .config import StageConfig, settings_key


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed with this configuration."""


@dataclass
class RunContext:
    rank: int
    world: int
    device: torch.device
    seed: int
    amp: bool = True  # bf16 autocast when on a GPU (the config's ``amp``)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> RunContext:
    """Set up torch.distributed when launched by torchrun (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but no GPU is available; use device: cpu or auto.")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    return RunContext(rank, world, dev, 0)


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator for one sample's random draws at one step: independent of batch split and process count."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 10_007 + int(index)) % (2**63 - 1))


class StepData:
    """Batches by step from a dataset through a ``DistributedSampler`` (also with one process)."""

    def __init__(self, dataset, global_batch: int, ctx: RunContext, seed: int):
        if global_batch % ctx.world:
            raise ValueError(f"batch_size {global_batch} is not divisible by the {ctx.world} processes.")
        if len(dataset) < global_batch:
            raise ValueError(f"The cohort has {len(dataset)} items, fewer than one batch ({global_batch}).")
        self.dataset, self.batch = dataset, global_batch // ctx.world
        self.sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True)
        self.per_epoch = len(self.sampler) // self.batch
        self._epoch, self._order = None, None

    def indices(self, step: int) -> list[int]:
        epoch, pos = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self.sampler.set_epoch(epoch)
            self._epoch, self._order = epoch, list(self.sampler)
        return self._order[pos * self.batch : (pos + 1) * self.batch]


def _lr_lambda(cfg: StageConfig):
    def f(step):
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def check_checkpoint(path: Path, name: str, model: nn.Module, cfg: StageConfig, device="cpu") -> dict:
    """Load a stage checkpoint and check that it fits ``model`` and ``cfg``; returns its state or raises
    :class:`CheckpointError` (also for a file that is not a readable checkpoint)."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable {name} checkpoint ({type(exc).__name__}: {exc}). "
                              "Use another output folder or start without --resume.") from exc
    keys = ("model", "optimizer", "scheduler", "ema", "rng", "step", "config")
    missing = [k for k in keys if k not in state] if isinstance(state, dict) else list(keys)
    if missing:
        raise CheckpointError(f"{path} is not a {name} checkpoint of this trainer (no {missing[0]!r} entry).")
    own = model.state_dict()
    bad = [k for k, v in state["model"].items() if k not in own or own[k].shape != v.shape]
    if bad or set(own) != set(state["model"]):
        raise CheckpointError(f"{path} does not fit the {name} network of this configuration "
                              f"(first mismatch: {(bad or sorted(set(own) ^ set(state['model'])))[0]}). "
                              "Use another output folder or start without --resume.")
    if state["config"] != settings_key(cfg):
        raise CheckpointError(f"{path} was written with another {name} configuration "
                              f"({state['config']}); resume needs the same settings ({settings_key(cfg)}).")
    return state


def _trim_log(log_file: Path, start: int) -> None:
    """Drop the rows of steps after ``start`` (all of them for a fresh start): a resumed run logs them again."""
    if not log_file.exists():
        return
    if start == 0:
        log_file.unlink()
        return
    with open(log_file, newline="") as f:
        rows = list(csv.reader(f))
    keep = [rows[0]] + [r for r in rows[1:] if r and int(float(r[0])) <= start]
    if len(keep) != len(rows):
        with atomic_path(log_file, overwrite=True) as tmp, open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(keep)


def _save(path: Path, state: dict) -> None:
    with atomic_path(path, overwrite=True) as tmp:
        torch.save(state, tmp)


def train(name: str, model: nn.Module, loss_fn: Callable, cfg: StageConfig, ctx: RunContext, out_dir: Path,
          resume: bool = False, progress: bool = True, stop_after: int | None = None) -> nn.Module:
    """Train ``model`` for ``cfg.steps`` steps. ``loss_fn(model, step, micro) -> (loss, {name: float})`` does this
    rank's part of micro-batch ``micro`` of ``step``. Returns the trained model (EMA weights when enabled).
    ``stop_after`` ends the run early after that many steps (used to test resume)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    channels_last_on_cpu(model.to(ctx.device), ctx.device)
    ddp = nn.parallel.DistributedDataParallel(model) if ctx.world > 1 else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    ema = None
    if cfg.ema > 0:
        ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema))
    start, spent = 0, 0.0  # spent: seconds of training before this run (a resumed run continues the count)
    latest = ckpt_dir / "latest.pt"
    t_run = time.perf_counter()
    if resume and latest.exists():
        state = check_checkpoint(latest, name, model, cfg, ctx.device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"].cpu())
        start = int(state["step"])
        spent = float(state.get("seconds", 0.0))  # checkpoints written before the count existed: 0
    log_file = out_dir / "log.csv"
    writer = None
    if ctx.is_main:
        _trim_log(log_file, start)
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start)
        except ImportError:  # tensorboard is optional
            writer = None
    bar = None
    if ctx.is_main and progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=name, unit="step", dynamic_ncols=True)
    use_amp = ctx.device.type == "cuda" and ctx.amp
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    model.train()
    for step in range(start, end):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        logs_sum: dict[str, float] = {}
        for micro in range(cfg.accumulate):
            sync = micro == cfg.accumulate - 1 or ctx.world == 1
            ctxm = ddp.no_sync() if not sync and hasattr(ddp, "no_sync") else _null()
            with ctxm, torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss, logs = loss_fn(ddp, step, micro)
                (loss / cfg.accumulate).backward()
            for k, v in {"loss": loss.item(), **logs}.items():  # the total optimised, then the stage's terms
                logs_sum[k] = logs_sum.get(k, 0.0) + v / cfg.accumulate
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(model)
        dt = time.perf_counter() - t0
        done = step + 1
        if ctx.is_main:
            if done % cfg.log_every == 0 or done == end:
                row = {"step": done, "lr": sched.get_last_lr()[0], "seconds_per_step": dt, **logs_sum}
                new = not log_file.exists()
                with open(log_file, "a", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=list(row))
                    if new:
                        w.writeheader()
                    w.writerow(row)
                if writer is not None:
                    for k, v in row.items():
                        if k != "step":
                            writer.add_scalar(f"{name}/{k}", v, done)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in logs_sum.items()}, refresh=False)
                bar.update(1)
            if done % cfg.checkpoint_every == 0 or done == end:
                state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "ema": ema.state_dict() if ema is not None else {}, "rng": torch.get_rng_state(),
                         "step": done, "config": settings_key(cfg), "seconds": spent + time.perf_counter() - t_run}
                _save(latest, state)
        if ctx.world > 1 and (done % cfg.checkpoint_every == 0 or done == end):
            dist.barrier()
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    model.eval()
    if ema is not None and end == cfg.steps:
        model.load_state_dict(ema.module.state_dict())
    return model


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
