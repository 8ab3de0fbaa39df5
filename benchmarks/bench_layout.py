"""Benchmark: each network's hot pass in the default (contiguous) memory layout against channels-last
(``torch.channels_last_3d``, :func:`diffdef.networks.channels_last_on_cpu`), on the CPU, shipped model's shapes.

  python benchmarks/bench_layout.py                     # the shipped bundle, 5 timed repeats, 2 threads
  python benchmarks/bench_layout.py --repeats 9 --threads 2

The passes are what training and generation run, on random inputs of the shipped working grid (a pass costs the
same whatever the values):

* registration U-Net, frozen, forward + input gradient over 20 (atlas, neighbour) pairs: one decoder step's
  symmetric centrality (10 neighbours, both directions);
* registration U-Net, training step (forward + weight gradients, batch 4);
* autoencoder training step (forward + backward, batch 4);
* diffusion U-Net training step (batch 16 latents);
* deformation decoder forward + backward (batch 1); and the generation passes: diffusion U-Net forward on
  16 latents (8 draws x classifier-free guidance), deformation decoder forward on 8 latents, registration
  forward on one pair (``diffdef compare``).

Both layouts alternate repeat by repeat, so the machine's drift falls on both; the medians and their ratio
come from one run.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from diffdef.bundle import BundleError, load_bundle
from diffdef.networks import DeformationDecoder, build_autoencoder

SHIPPED = Path(__file__).resolve().parents[1] / "DiffDefSlicer" / "Resources" / "Models" / "default"


def passes(bundle) -> dict:
    """name -> (network, function(network) running the pass once)."""
    arch, grid = bundle.meta["architecture"], tuple(bundle.working_grid.shape)
    latent = tuple(bundle.meta["latent"]["shape"])
    k = len(bundle.spec)
    reg = bundle.nets["registration"].eval()
    for p in reg.parameters():
        p.requires_grad_(False)
    reg_train = copy.deepcopy(reg).train()
    for p in reg_train.parameters():
        p.requires_grad_(True)
    unet = bundle.nets["diffusion"]
    decoder = bundle.nets["decoder"]
    ae = build_autoencoder(arch["autoencoder"])
    image = lambda b: torch.rand(b, 1, *grid)  # noqa: E731

    def centrality(net):
        atlas = image(1).requires_grad_()
        neighbours, a = image(10), atlas.expand(10, -1, -1, -1, -1)
        (net(a, neighbours) - net(neighbours, a)).pow(2).mean().backward()

    def reg_step(net):
        net(image(4), image(4)).pow(2).mean().backward()
        net.zero_grad()

    def ae_step(net):
        recon, mu, sigma = net(image(4))
        (recon.abs().mean() + mu.pow(2).mean() + sigma.mean()).backward()
        net.zero_grad()

    def unet_step(net):
        ctx = torch.randn(16, k, arch["condition_embedding"]["dim"])
        net(torch.randn(16, *latent), torch.randint(0, 1000, (16,)), context=ctx).pow(2).mean().backward()
        net.zero_grad()

    def decoder_step(net):
        net(torch.randn(1, *latent), torch.zeros(1, k)).pow(2).mean().backward()
        net.zero_grad()

    @torch.no_grad()
    def unet_sample(net):
        net(torch.randn(16, *latent), torch.full((16,), 500), context=torch.randn(16, k, arch["condition_embedding"]["dim"]))

    @torch.no_grad()
    def decode(net):
        net(torch.randn(8, *latent), torch.zeros(8, k))

    @torch.no_grad()
    def register(net):
        net(image(1), image(1))

    return {"registration, decoder-step centrality (20 pairs, input grad)": (reg, centrality),
            "registration, training step (batch 4)": (reg_train, reg_step),
            "autoencoder, training step (batch 4)": (ae.train(), ae_step),
            "diffusion U-Net, training step (batch 16)": (unet.train(), unet_step),
            "deformation decoder, training fwd+bwd (batch 1)": (decoder.train(), decoder_step),
            "diffusion U-Net, sampling forward (16 latents)": (copy.deepcopy(unet).eval(), unet_sample),
            "deformation decoder, generation forward (8 latents)": (copy.deepcopy(decoder).eval(), decode),
            "registration, compare forward (1 pair)": (copy.deepcopy(reg), register)}


def timed(fn, net) -> float:
    t = time.perf_counter()
    fn(net)
    return time.perf_counter() - t


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(SHIPPED), help="model bundle whose networks and shapes are timed")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per layout (after one warm-up each)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    try:
        bundle = load_bundle(a.model)
    except BundleError as exc:
        raise SystemExit(f"bench_layout: {exc}") from None
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, working grid "
          f"{tuple(bundle.working_grid.shape)}; median of {a.repeats} repeats per layout, alternating")
    print(f"{'pass':56s} {'contiguous s':>13s} {'channels-last s':>16s} {'ratio':>6s}")
    for name, (net, fn) in passes(bundle).items():
        nets = {"contiguous": net, "channels_last": copy.deepcopy(net).to(memory_format=torch.channels_last_3d)}
        for layout in nets.values():
            timed(fn, layout)  # warm-up: oneDNN primitive creation
        times = {key: [] for key in nets}
        for _ in range(a.repeats):
            for key, layout in nets.items():
                times[key].append(timed(fn, layout))
        c, cl = (statistics.median(times[key]) for key in nets)
        print(f"{name:56s} {c:13.3f} {cl:16.3f} {c / cl:6.2f}", flush=True)


if __name__ == "__main__":
    main()
