"""MPFNet: CA-I3D shapes at both sizes, coordinate attention, -P against -C, the progressive
stages, gradients, and its frame inputs."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mer.data.inputs import InputError, InputRequest, InputSource, compute, frame_numbers
from mer.models.components.ca_i3d import CAI3D, CoordinateAttention3d
from mer.models.registry import create_model


def _video(b=2, t=8, s=32):
    return torch.rand(b, 1, t, s, s)


def test_coordinate_attention_gates_each_axis():
    torch.manual_seed(0)
    ca = CoordinateAttention3d(8, reduction=2).eval()
    x = torch.randn(2, 8, 4, 6, 5)
    gt, gh, gw = ca.gates(x)
    assert gt.shape == (2, 8, 4, 1, 1) and gh.shape == (2, 8, 1, 6, 1) and \
        gw.shape == (2, 8, 1, 1, 5)
    torch.testing.assert_close(ca(x), x * gt * gh * gw)
    # a gate along H changes when only the H profile of the input changes
    y = x.clone()
    y[:, :, :, 0] += 3.0
    assert not torch.allclose(ca.gates(y)[1], gh) and ca(y).shape == x.shape


def test_ca_i3d_shapes_small():
    enc = CAI3D(1, "small").eval()
    maps = enc.stages_out(_video(2, 8, 32))
    assert [m.shape for m in maps] == [(2, 56, 8, 8, 8), (2, 80, 4, 4, 4)]
    assert enc(_video(2, 8, 32)).shape == (2, 80) and enc.out_channels == 80


def test_ca_i3d_shapes_published():
    enc = CAI3D(1, "published").eval()
    assert enc.stage_channels == [480, 832, 1024]  # I3D's Mixed_3c, 4f, 5c
    n_params = sum(p.numel() for p in enc.parameters())
    assert 12e6 < n_params < 16e6  # I3D's ~12.3M plus the coordinate attentions
    with torch.no_grad():
        maps = enc.stages_out(torch.rand(1, 1, 16, 64, 64))
    # temporal stride 2 (stem) x 2 x 2, spatial 2 x 2 x 2 x 2 x 2
    assert [tuple(m.shape) for m in maps] == [(1, 480, 8, 8, 8), (1, 832, 4, 4, 4),
                                              (1, 1024, 2, 2, 2)]


def test_published_mpfnet_asks_for_16_frames_of_112_px():
    net = create_model("mpfnet_c", num_classes=3, size="published")
    assert net.input_spec()["frames"] == {"size": 112, "length": 16}
    assert net.classifier[-1].in_features == 1024


def test_p_and_c_differ_as_described():
    torch.manual_seed(0)
    p = create_model("mpfnet_p", num_classes=3).eval()
    c = create_model("mpfnet_c", num_classes=3).eval()
    frames, other, mag = _video(), _video(), _video()
    # -P: the classifier sees both encoders side by side; the advanced features do not depend
    # on the generic encoder's input
    assert p.classifier[-1].in_features == 2 * p.generic.out_channels
    g1, a1 = p.features(frames, mag)
    g2, a2 = p.features(other, mag)
    torch.testing.assert_close(a1, a2)
    assert not torch.allclose(g1, g2)
    # -C: the advanced encoder builds on the generic one's features; the classifier sees the
    # advanced features only
    assert c.classifier[-1].in_features == c.advanced.out_channels
    assert not torch.allclose(c.features(frames, mag)[1], c.features(other, mag)[1])
    assert not hasattr(p, "bridges") and len(c.bridges) == len(c.generic.stages)


def _grads(net, stage_progress: float) -> set[str]:
    net.zero_grad(set_to_none=True)
    net.set_progress(stage_progress)
    F.cross_entropy(net(None, _video(4), _video(4)), torch.tensor([0, 1, 2, 0])).backward()
    return {n for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum()}


@pytest.mark.parametrize("name", ["mpfnet_p", "mpfnet_c"])
def test_progressive_stages_and_every_parameter_receives_a_gradient(name):
    torch.manual_seed(0)
    net = create_model(name, num_classes=3, stage1_fraction=0.5).train()
    everything = {n for n, _ in net.named_parameters()}
    generic = {n for n in everything if n.startswith(("generic.", "generic_head."))}
    stage1 = _grads(net, 0.2)
    assert net.stage == 1 and stage1 == generic  # stage 1: the generic encoder alone
    running = [b.running_mean.clone() for b in net.generic.modules()
               if isinstance(b, torch.nn.BatchNorm3d)]
    stage2 = _grads(net, 0.7)
    assert net.stage == 2 and stage2 == everything - generic  # generic frozen
    after = [b.running_mean for b in net.generic.modules() if isinstance(b, torch.nn.BatchNorm3d)]
    assert all(torch.equal(a, b) for a, b in zip(running, after))  # its statistics too
    assert stage1 | stage2 == everything
    net.eval()
    assert net.stage == 2  # evaluation always uses the whole network


def _clip(tmp_path, n: int) -> dict:
    import cv2

    folder = tmp_path / "frames"
    folder.mkdir(exist_ok=True)
    for k in range(10, 10 + n):
        cv2.imwrite(str(folder / f"img{k}.jpg"), np.full((40, 36), 10 * (k - 9), np.uint8))
    return {"database": "db", "subject": "s2", "clip": "EP01", "onset": 10, "apex": 12,
            "offset": 9 + n, "onset_path": str(folder / "img10.jpg"), "fps": 100.0, "row": 7}


def test_frames_are_the_onset_to_offset_span_resampled(tmp_path):
    row = _clip(tmp_path, 9)  # frames 10..18
    req = InputRequest("frames", 16, length=5)
    assert frame_numbers(row, req) == [10, 12, 14, 16, 18]
    arr = compute(InputSource([row]), req)
    assert arr.shape == (1, 1, 5, 16, 16)
    # frame k is painted 10 * (k - 9) grey: the stack holds those frames, in order
    np.testing.assert_allclose(arr[0, 0, :, 0, 0] * 255, [10, 30, 50, 70, 90], atol=2)


def test_too_few_frames_names_the_sample_and_the_fix(tmp_path):
    row = _clip(tmp_path, 4)
    with pytest.raises(InputError, match=r"db/s2/EP01 \(sheet row 7\).*takes 8 frames but the "
                                         r"clip has 4.*model\.kwargs\.frames to 4"):
        compute(InputSource([row]), InputRequest("frames", 16, length=8))
