"""Network architectures, built from the plain-dict arguments a bundle's ``model.json`` records.

MONAI provides the blocks (``AutoencoderKL``'s ``Decoder``, ``DiffusionModelUNet``, ``VoxelMorphUNet``);
written here is only the glue MONAI lacks: the condition embedding with a learned "missing" token per
condition, and the deformation decoder's extra condition input.
"""
from __future__ import annotations

import torch
from torch import nn

from . import fields

DEFAULT_ARCH = {
    "autoencoder": {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [16, 32, 64],
                    "latent_channels": 3, "num_res_blocks": [1, 1, 1], "attention_levels": [False, False, False],
                    "with_encoder_nonlocal_attn": False, "with_decoder_nonlocal_attn": False, "norm_num_groups": 16},
    "diffusion": {"spatial_dims": 3, "in_channels": 3, "out_channels": 3, "channels": [32, 64],
                  "attention_levels": [False, True], "num_res_blocks": 1, "num_head_channels": [0, 32],
                  "with_conditioning": True, "cross_attention_dim": 64, "norm_num_groups": 16},
    "condition_embedding": {"dim": 64},
    "registration": {"spatial_dims": 3, "in_channels": 2, "unet_out_channels": 32, "channels": [16, 32, 32, 32],
                     "final_conv_channels": [16, 16]},
    "scheduler": {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0015,
                  "beta_end": 0.0205, "prediction_type": "v_prediction", "clip_sample": False},
}


class ConditionEmbedding(nn.Module):
    """Conditions ``(B, K)`` (normalised values, NaN = missing) -> tokens ``(B, K, dim)`` for cross-attention.

    Each condition has its own small MLP for its value and a learned "missing" token used where the value is
    NaN, so a missing age is not confused with a normalised age of 0."""

    def __init__(self, num_conditions: int, dim: int = 64):
        super().__init__()
        self.value_mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim)) for _ in range(num_conditions))
        self.missing = nn.Parameter(torch.randn(num_conditions, dim) * 0.02)
        self.identity = nn.Parameter(torch.randn(num_conditions, dim) * 0.02)

    def forward(self, conditions: torch.Tensor) -> torch.Tensor:
        missing = torch.isnan(conditions)
        values = torch.nan_to_num(conditions, nan=0.0)
        tokens = []
        for k, mlp in enumerate(self.value_mlps):
            present = mlp(values[:, k : k + 1])
            tokens.append(torch.where(missing[:, k : k + 1], self.missing[k].expand_as(present), present))
        return torch.stack(tokens, dim=1) + self.identity


def condition_channels(conditions: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """``(B, K)`` normalised conditions (NaN = missing) -> ``(B, 2K, *spatial)``: values (0 where missing) and
    missing flags, broadcast over space."""
    missing = torch.isnan(conditions)
    feats = torch.cat([torch.nan_to_num(conditions, nan=0.0), missing.float()], dim=1)
    return feats[(...,) + (None,) * len(spatial)].expand(*feats.shape, *spatial)


class DeformationDecoder(nn.Module):
    """Latent ``(B, C, ...)`` + conditions ``(B, K)`` -> stationary velocity field ``(B, 3, i, j, k)`` on the
    working grid, in working-grid voxels. MONAI's AutoencoderKL ``Decoder`` with ``2K`` extra input channels
    (the condition, see :func:`condition_channels`) and a 3-channel output, initialised from the trained
    image decoder by :meth:`init_from_autoencoder` (as the Diff-Def authors do).

    ``velocity_smoothing``: sigma (working-grid voxels) of a fixed Gaussian filter on the output, 0 = none. The
    image decoder's upsampling leaves a fine-scale field of its own in the velocity that the MP loss, seen through
    a registration network that recovers part of each displacement, does not remove: smoothing the shipped
    decoder's output by 1 voxel (4 mm) after training cut its error against the synthetic law's displacement by
    a quarter (0.52 -> 0.40 mm at 55 y, 0.97 -> 0.75 mm at 75 y). Trained with the filter in place, the other
    terms see the smoothed field (:func:`diffdef.fields.smooth`)."""

    def __init__(self, autoencoder_args: dict, num_conditions: int, velocity_smoothing: float = 0.0):
        super().__init__()
        from monai.networks.nets.autoencoderkl import Decoder

        a = autoencoder_args
        self.num_conditions = num_conditions
        self.decoder = Decoder(
            spatial_dims=a["spatial_dims"], channels=a["channels"], in_channels=a["latent_channels"] + 2 * num_conditions,
            out_channels=3, num_res_blocks=a["num_res_blocks"], norm_num_groups=a["norm_num_groups"], norm_eps=1e-6,
            attention_levels=a["attention_levels"], with_nonlocal_attn=a["with_decoder_nonlocal_attn"])
        last = self.decoder.blocks[-1].conv
        nn.init.zeros_(last.weight)  # start from the identity map
        nn.init.zeros_(last.bias)
        self.velocity_smoothing = float(velocity_smoothing)  # fixed: not a weight of the bundle

    def init_from_autoencoder(self, autoencoder: nn.Module) -> None:
        """Copy the image decoder's weights; the condition input channels and the velocity output start at 0."""
        source = autoencoder.decoder.state_dict()
        target = self.decoder.state_dict()
        for name, w in source.items():
            t = target[name]
            if t.shape == w.shape and name not in (f"blocks.{len(self.decoder.blocks) - 1}.conv.weight",
                                                  f"blocks.{len(self.decoder.blocks) - 1}.conv.bias"):
                target[name] = w.clone()
            elif name == "blocks.0.conv.weight":  # first conv: latent channels copied, condition channels 0
                t = torch.zeros_like(t)
                t[:, : w.shape[1]] = w
                target[name] = t
        self.decoder.load_state_dict(target)

    def forward(self, latent: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        velocity = self.decoder(torch.cat([latent, condition_channels(conditions, latent.shape[2:])], dim=1))
        return fields.smooth(velocity, self.velocity_smoothing)


class RegistrationNet(nn.Module):
    """VoxelMorph-style U-Net (MONAI ``VoxelMorphUNet``): (moving, fixed) ``(B, 1, ...)`` each -> stationary
    velocity ``(B, 3, ...)`` in voxels; integrate with :func:`diffdef.fields.integrate_velocity`.

    ``antisymmetric``: the velocity is (f(moving, fixed) - f(fixed, moving)) / 2, so an image registered to
    itself gives exactly 0 and swapping the images negates the velocity (exp(-v) is the inverse map). A plain
    U-Net adds a field of its own that does not depend on the pair (registering an image to itself gave 0.55 mm
    RMS over the brain for the shipped network, 0.77-0.92 mm after 4x longer training), which the MP loss would
    then cancel by moving the atlas off the truth. MONAI's VoxelMorph has no such option, hence the wrapper;
    the two directions share one batched forward pass (twice the compute)."""

    def __init__(self, antisymmetric: bool = False, **args):
        super().__init__()
        from monai.networks.nets import VoxelMorphUNet

        self.antisymmetric = bool(antisymmetric)
        self.unet = VoxelMorphUNet(**args)

    def forward(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        if not self.antisymmetric:
            return self.unet(torch.cat([moving, fixed], dim=1))
        both = self.unet(torch.cat([torch.cat([moving, fixed], dim=1), torch.cat([fixed, moving], dim=1)]))
        forward, backward = both.chunk(2)
        return (forward - backward) / 2


def channels_last_on_cpu(module: nn.Module, device) -> nn.Module:
    """``module`` (in place) with its 3-D convolution weights stored channels-last (``torch.channels_last_3d``)
    when ``device`` is a CPU; unchanged elsewhere. The values stay the same, only the memory layout changes, and
    the convolutions then take oneDNN's channels-last path, their outputs following the weights' layout.

    Why: on this project's 2-core Xeon (``python benchmarks/bench_layout.py``, 2026-11-28, medians of 5), the
    registration U-Net's passes take 1.2x less time (a decoder step's symmetric centrality, its main cost, 3.15
    against 3.85 s; a registration training step 0.60 against 0.72 s), an autoencoder training step 1.1x less
    and the deformation decoder's generation forward 1.2x less; the diffusion U-Net's passes are unchanged (0.98-
    1.04x). GPUs keep the default layout: not measured there."""
    if torch.device(device).type == "cpu":
        module.to(memory_format=torch.channels_last_3d)
    return module


def build_autoencoder(args: dict):
    from monai.networks.nets import AutoencoderKL

    return AutoencoderKL(**args)


def build_diffusion(args: dict):
    from monai.networks.nets import DiffusionModelUNet

    return DiffusionModelUNet(**args)


def build_scheduler(args: dict, kind: str = "ddim"):
    """MONAI DDPM (training) or DDIM (sampling) scheduler with the recorded arguments."""
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    return (DDIMScheduler if kind == "ddim" else DDPMScheduler)(**args)
