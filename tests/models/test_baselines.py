import pytest
import torch

from mer.models.htnet import HTNet, region_origins
from mer.models.registry import create_model, list_models
from mer.models.timm_backbone import TimmBackbone


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_new_models_are_registered():
    assert {"dpk_gat", "htnet", "timm"} <= set(list_models())


def test_htnet_published_configuration():
    net = create_model("htnet", num_classes=3)
    n = _count(net)
    print(f"\nHTNet parameters at 28x28 (published configuration): {n:,}")
    assert [len(level.layers) for level in net.levels] == [2, 2, 10]
    assert [level.blocks for level in net.levels] == [4, 2, 1]
    assert [level.layers[0].heads for level in net.levels] == [3, 6, 12]
    assert [level.position.shape[-1] for level in net.levels] == [256, 512, 1024]
    assert net.embed.kernel_size == (7, 7) and net.embed.stride == (7, 7)
    assert net(torch.rand(2, 3, 28, 28)).shape == (2, 3)


def test_htnet_small_config_and_region_mosaic():
    net = HTNet(num_classes=4, dim=16, heads=2, block_repeats=(1, 1, 1)).eval()
    x = torch.rand(2, 3, 28, 28)
    assert net(x).shape == (2, 4)
    mosaic = net.regions(x)
    assert mosaic.shape == (2, 3, 28, 28)
    (r0, c0), (r1, c1), (r2, c2), (r3, c3) = region_origins(28)
    torch.testing.assert_close(mosaic[..., :14, :14], x[..., r0:r0 + 14, c0:c0 + 14])
    torch.testing.assert_close(mosaic[..., :14, 14:], x[..., r1:r1 + 14, c1:c1 + 14])
    torch.testing.assert_close(mosaic[..., 14:, :14], x[..., r2:r2 + 14, c2:c2 + 14])
    torch.testing.assert_close(mosaic[..., 14:, 14:], x[..., r3:r3 + 14, c3:c3 + 14])
    # eyes above lips, left regions left of right ones, all inside the image
    assert r0 < r2 and r1 < r3 and c0 < c1 and c2 < c3
    assert all(0 <= v <= 14 for origin in region_origins(28) for v in origin)


def test_htnet_looks_only_at_the_regions():
    torch.manual_seed(0)
    net = HTNet(dim=16, heads=2, block_repeats=(1, 1, 1)).eval()
    x = torch.rand(1, 3, 28, 28)
    covered = torch.zeros(28, 28, dtype=torch.bool)
    for r, c in region_origins(28):
        covered[r:r + 14, c:c + 14] = True
    assert not covered.all()
    outside = x.clone()
    outside[..., ~covered] = 0.0
    torch.testing.assert_close(net(outside), net(x))
    whole = HTNet(dim=16, heads=2, block_repeats=(1, 1, 1), use_regions=False).eval()
    assert not torch.allclose(whole(outside), whole(x))


def test_htnet_rejects_incompatible_sizes():
    with pytest.raises(ValueError, match="patch_size"):
        HTNet(input_size=28, patch_size=5)
    with pytest.raises(ValueError, match="input_size"):
        HTNet(dim=16, heads=1, block_repeats=(1, 1, 1))(torch.rand(1, 3, 32, 32))


def test_timm_resnet18_forward_and_resize():
    net = create_model("timm", num_classes=5, in_channels=3, backbone="resnet18")
    print(f"\ntimm resnet18 parameters at 28x28: {_count(net):,}")
    assert net(torch.rand(2, 3, 28, 28)).shape == (2, 5)
    seen = []
    up = TimmBackbone(num_classes=3, in_channels=2, backbone="resnet18", resize=64)
    up.net.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    assert up(torch.rand(2, 2, 28, 28)).shape == (2, 3)
    assert seen == [(2, 2, 64, 64)]


def test_timm_refuses_pretrained_weights():
    with pytest.raises(ValueError, match="pretrained"):
        TimmBackbone(num_classes=3, pretrained=True)
