"""Network options: the registration network's antisymmetric form (``RegistrationNet(antisymmetric=True)``), the
deformation decoder's output smoothing (``DeformationDecoder(velocity_smoothing=)``) and the channels-last layout on
a CPU (``channels_last_on_cpu``)."""
import pytest
import torch

from diffdef import fields
from diffdef.networks import DeformationDecoder, RegistrationNet, channels_last_on_cpu

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
    constant = torch.full_like(raw, 0.7)
    assert torch.allclose(fields.smooth(constant, 1.5), constant, atol=1e-6)
    assert fields.smooth(raw, 0.0) is raw
    rebuilt = build_network("decoder", {"autoencoder": SMALL_AE, "decoder": {"velocity_smoothing": 1.5}}, 2)
    assert rebuilt.velocity_smoothing == pytest.approx(1.5)
    assert build_network("decoder", {"autoencoder": SMALL_AE, "decoder": {"uses": "autoencoder"}}, 2).velocity_smoothing == 0


def test_channels_last_on_cpu_changes_the_layout_not_the_values():
    """On a CPU the 3-D convolution weights become channels-last and the networks compute the same outputs and
    input gradients (to float rounding); a non-CPU device leaves the module as it is (nothing is moved)."""
    torch.manual_seed(0)
    a, b = torch.rand(2, 1, 16, 16, 16), torch.rand(2, 1, 16, 16, 16)
    reg = RegistrationNet(**ARCH)
    fast = channels_last_on_cpu(RegistrationNet(**ARCH), "cpu")
    fast.load_state_dict(reg.state_dict())
    convs = [p for p in fast.parameters() if p.ndim == 5]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last_3d) and not p.is_contiguous() for p in convs)
    outputs, grads = [], []
    for net in (reg, fast):
        moving = a.clone().requires_grad_()
        v = net(moving, b)
        v.pow(2).sum().backward()
        outputs.append(v.detach())
        grads.append(moving.grad)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    decoder = DeformationDecoder(SMALL_AE, 2)
    assert channels_last_on_cpu(decoder, "cuda") is decoder
    assert all(p.is_contiguous() for p in decoder.parameters())


def test_a_bundle_on_cpu_is_channels_last_and_trained_weights_are_written_plain(tiny_run, tiny_generator):
    """A bundle moved to the CPU runs channels-last; the weights the (channels-last) training wrote are plain
    contiguous tensors (all safetensors holds), the same in the stage folder and the exported bundle."""
    from safetensors.torch import load_file

    reg = tiny_generator.bundle.nets["registration"]
    assert any(p.ndim == 5 for p in reg.parameters())
    assert all(p.is_contiguous(memory_format=torch.channels_last_3d) for p in reg.parameters() if p.ndim == 5)
    saved = load_file(str(tiny_run / "registration" / "registration.safetensors"))
    assert all(t.is_contiguous() for t in saved.values())
    bundled = load_file(str(tiny_run / "bundle" / "registration.safetensors"))
    assert saved.keys() == bundled.keys() and all(torch.equal(saved[k], bundled[k]) for k in saved)
