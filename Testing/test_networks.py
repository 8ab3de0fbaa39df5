"""The registration network's antisymmetric form (``RegistrationNet(antisymmetric=True)``)."""
import torch

from diffdef.networks import RegistrationNet

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
