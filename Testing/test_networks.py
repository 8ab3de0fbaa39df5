"""Network options: the registration network's antisymmetric form (``RegistrationNet(antisymmetric=True)``) and
the deformation decoder's output smoothing (``DeformationDecoder(velocity_smoothing=)``)."""
import pytest
import torch

from diffdef.networks import DeformationDecoder, RegistrationNet

ARCH = {"spatial_dims": 3, "in_channels": 2, "unet_out_channels": 8, "channels": [8, 16, 16, 16], "final_conv_channels": [8, 8]}


def test_antisymmetric_registration_is_zero_on_itself_and_negated_by_a_swap():
    """An image registered to itself gives velocity 0 (a plain U-Net gives a field of its own); swapping the
    images negates the velocity, so the two integrated maps are inverses of each other (exp(-v) inverts exp(v):
    test_fields.test_integrated_map_is_invertible)."""
    torch.manual_seed(0)
    a, b = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)
    net = RegistrationNet(antisymmetric=True, **ARCH)
    plain = RegistrationNet(**ARCH)
    plain.load_state_dict(net.state_dict())  # the same weights: the option changes the forward, not the parameters
    with torch.no_grad():
        assert net(a, a).abs().max() == 0
        assert plain(a, a).abs().max() > 1e-6
        v = net(a, b)
        assert torch.allclose(net(b, a), -v, atol=1e-7)
        assert torch.allclose(v, (plain(a, b) - plain(b, a)) / 2, atol=1e-6)


SMALL_AE = {"spatial_dims": 3, "channels": [8, 16], "num_res_blocks": [1, 1], "attention_levels": [False, False],
            "norm_num_groups": 4, "latent_channels": 3, "with_decoder_nonlocal_attn": False}


def test_decoder_velocity_smoothing_is_a_fixed_gaussian_on_the_output():
    """The smoothed decoder computes the plain one's velocity filtered by a normalised Gaussian of the given sigma
    (voxels): constant fields pass unchanged, the filter has no weights (the bundle's files are the same), and the
    bundle's architecture entry rebuilds it."""
    from monai.networks.layers import gaussian_1d, separable_filtering

    from diffdef.bundle import build_network

    torch.manual_seed(0)
    smooth, plain = DeformationDecoder(SMALL_AE, 2, velocity_smoothing=1.5), DeformationDecoder(SMALL_AE, 2)
    assert set(smooth.state_dict()) == set(plain.state_dict())
    for p in plain.decoder.blocks[-1].conv.parameters():  # a non-zero output (the last conv starts at 0)
        torch.nn.init.normal_(p, std=0.1)
    smooth.load_state_dict(plain.state_dict())
    latent, cond = torch.randn(1, 3, 6, 6, 6), torch.tensor([[0.5, float("nan")]])
    with torch.no_grad():
        raw, out = plain(latent, cond), smooth(latent, cond)
    kernel = gaussian_1d(torch.tensor(1.5), truncated=3.0, approx="sampled", normalize=True)
    assert torch.allclose(out, separable_filtering(raw, [kernel] * 3, mode="replicate"), atol=1e-6)
    assert out.std() < raw.std()  # the fine scales are damped
    with torch.no_grad():
        constant = separable_filtering(torch.full_like(raw, 0.7), [smooth.smoothing_kernel] * 3, mode="replicate")
    assert torch.allclose(constant, torch.full_like(raw, 0.7), atol=1e-6)
    rebuilt = build_network("decoder", {"autoencoder": SMALL_AE, "decoder": {"velocity_smoothing": 1.5}}, 2)
    assert rebuilt.velocity_smoothing == pytest.approx(1.5)
    assert build_network("decoder", {"autoencoder": SMALL_AE, "decoder": {"uses": "autoencoder"}}, 2).velocity_smoothing == 0
