"""FCN models: shapes, weight transplant, bilinear init, zero-init skips, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from fcn.models import ModelError, build_model, list_models
from fcn.models.fcn import bilinear_kernel, make_upsampler, transfer_weights
from fcn.models.vgg import VGG16Backbone

SMALL = {"fc_dim": 64, "width_mult": 0.125}  # demo-sized VGG: same topology, fast on CPU


@pytest.mark.parametrize("mode", ["aligned", "paper"])
@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
def test_output_is_input_size(name: str, mode: str) -> None:
    model = build_model(name, num_classes=5, mode=mode, **SMALL).eval()
    with torch.no_grad():
        for h, w in [(97, 131), (33, 65), (1, 7), (224, 224), (250, 313)]:
            out = model(torch.randn(3, 3, h, w))
            assert out.shape == (3, 5, h, w), (name, mode, h, w)


def test_return_features_has_fixed_keys_and_strides() -> None:
    model = build_model("fcn8s", num_classes=4, **SMALL).eval()
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 96, 130), return_features=True)
    assert set(feats) == {"out", "c3", "c4", "c5"}
    assert feats["out"].shape == (2, 4, 96, 130)
    # ceil-mode pooling: a map at stride s has ceil(H / s) cells
    assert feats["c3"].shape[-2:] == (12, 17)
    assert feats["c4"].shape[-2:] == (6, 9)
    assert feats["c5"].shape[-2:] == (3, 5)
    assert feats["c5"].shape[1] == 64


def test_full_size_parameter_count_matches_paper() -> None:
    model = build_model("fcn8s", num_classes=21)
    n = sum(p.numel() for p in model.parameters())
    assert 134e6 < n < 135e6  # the paper's FCN-8s VGG16: ~134M


def test_fc6_fc7_transplant_is_exact(tmp_path) -> None:
    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).eval()
    torch.save(vgg.state_dict(), tmp_path / "vgg16.pth")
    backbone = VGG16Backbone().eval()  # aligned paddings; 224x224 -> pool5 7x7
    backbone.load_imagenet(tmp_path / "vgg16.pth")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = vgg.classifier[:5](torch.flatten(vgg.avgpool(vgg.features(x)), 1))  # fc7 + ReLU
        fc7 = backbone(x)["c5"]  # (2, 4096, 7, 7); the centre cell sees exactly the 7x7 pool5
    assert fc7.shape == (2, 4096, 7, 7)
    torch.testing.assert_close(fc7[:, :, 3, 3], ref, atol=1e-5, rtol=1e-4)
    assert ref.abs().max() > 0  # not trivially zero


def test_weights_from_local_file(tmp_path) -> None:
    torch.manual_seed(1)
    vgg = torchvision.models.vgg16(weights=None)
    path = tmp_path / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    model = build_model("fcn32s", num_classes=3, weights=str(path))
    torch.testing.assert_close(model.backbone.features[0].weight, vgg.features[0].weight)
    torch.testing.assert_close(model.backbone.fc6.weight, vgg.classifier[0].weight.view(4096, 512, 7, 7))


def test_bad_weights_give_clear_errors(tmp_path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        build_model("fcn8s", num_classes=3, weights=tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"foo": torch.zeros(1)}, bad)
    with pytest.raises(ModelError, match="not a torchvision VGG16 state dict"):
        build_model("fcn8s", num_classes=3, weights=bad)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="could not read weights file"):
        build_model("fcn8s", num_classes=3, weights=junk)
    small = tmp_path / "vgg.pth"
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), small)
    with pytest.raises(ModelError, match="full-size backbone"):
        build_model("fcn8s", num_classes=3, weights=small, **SMALL)


def test_unknown_model_and_arguments() -> None:
    with pytest.raises(ModelError, match="known models: .*fcn8s"):
        build_model("fcn4s", num_classes=3)
    with pytest.raises(ModelError, match="takes no argument"):
        build_model("fcn8s", num_classes=3, colour="red")
    with pytest.raises(ModelError, match="num_classes"):
        build_model("fcn8s")
    with pytest.raises(ModelError, match="mode must be one of"):
        build_model("fcn8s", num_classes=3, mode="fast")
    assert {"fcn32s", "fcn16s", "fcn8s"} <= set(list_models())


def test_bilinear_kernel_reproduces_bilinear_interpolation() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 11)
    for factor in (2, 8, 16, 32):
        up = make_upsampler(3, factor, padding=factor // 2)
        with torch.no_grad():
            ours = up(x)
        ref = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
        assert ours.shape == ref.shape
        b = factor  # the outermost half cell on each side differs (zero padding vs clamping)
        torch.testing.assert_close(ours[..., b:-b, b:-b], ref[..., b:-b, b:-b], atol=1e-5, rtol=0)
    # channels are upsampled independently
    k = bilinear_kernel(3, 4)
    assert k[0, 1].abs().sum() == 0 and k[0, 0].sum() == pytest.approx(4.0)


def test_frozen_upsampling_option() -> None:
    model = build_model("fcn8s", num_classes=3, learnable_upsampling=False, **SMALL)
    assert not model.upscore.weight.requires_grad
    assert not model.upscore2.weight.requires_grad
    assert model.score_pool3.weight.requires_grad


@pytest.mark.parametrize("mode", ["aligned", "paper"])
def test_finer_net_from_coarser_starts_with_its_predictions(mode: str) -> None:
    torch.manual_seed(0)
    m32 = build_model("fcn32s", num_classes=6, mode=mode, fc_dim=128, width_mult=0.25).eval()
    torch.nn.init.normal_(m32.score_fr.weight, std=0.1)  # a "trained" coarse scorer
    m16 = build_model("fcn16s", num_classes=6, mode=mode, fc_dim=128, width_mult=0.25).eval()
    copied = transfer_weights(m32, m16)
    assert "score_fr.weight" in copied and "upscore.weight" not in copied
    x = torch.randn(2, 3, 161, 203)
    with torch.no_grad():
        a, b = m32(x), m16(x)
        skip = m16.score_pool4(m16.backbone(x)["c4"])
    assert skip.abs().max() == 0  # the zero-initialised skip contributes nothing
    # 2x-then-16x bilinear equals 32x bilinear up to the composition error of two
    # interpolations; away from the zero-padded border it is within 5% of the logit range.
    inner = (slice(None), slice(None), slice(48, -48), slice(48, -48))
    err = (a - b)[inner].abs().max()
    assert err < 0.05 * a.abs().max()
    assert (a.argmax(1) == b.argmax(1)).float().mean() > 0.99
    # control: a non-zero skip score moves the output far more than that
    torch.nn.init.normal_(m16.score_pool4.weight, std=1.0)
    with torch.no_grad():
        c = m16(x)
    assert (a - c)[inner].abs().max() > 5 * err

    m8 = build_model("fcn8s", num_classes=6, mode=mode, fc_dim=128, width_mult=0.25).eval()
    copied = transfer_weights(m16, m8)
    assert {"score_pool4.weight", "upscore2.weight"} <= set(copied)


def test_transfer_weights_rejects_other_backbone() -> None:
    a = build_model("fcn32s", num_classes=3, fc_dim=64, width_mult=0.125)
    b = build_model("fcn16s", num_classes=3, fc_dim=32, width_mult=0.25)
    with pytest.raises(ModelError, match="shares no backbone"):
        transfer_weights(a, b)


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
def test_gradients_are_finite_on_every_trainable_parameter(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, num_classes=4, skip_scaling=True, **SMALL).train()
    for layer in ("score_fr", "score_pool4", "score_pool3"):  # leave the zero init
        if hasattr(model, layer):
            torch.nn.init.normal_(getattr(model, layer).weight, std=0.05)
    x = torch.randn(2, 3, 67, 93)
    y = torch.randint(0, 4, (2, 67, 93))
    F.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert model.backbone.features[0].weight.grad.abs().sum() > 0


def test_student_contract_and_size() -> None:
    student = build_model("student", num_classes=11).eval()
    with torch.no_grad():
        out = student(torch.randn(2, 3, 97, 131))
        feats = student(torch.randn(1, 3, 96, 128), return_features=True)
    assert out.shape == (2, 11, 97, 131)
    assert set(feats) == {"out", "c3", "c4", "c5"}
    assert feats["c3"].shape[-2:] == (12, 16) and feats["c5"].shape[1] == 960
    n_student = sum(p.numel() for p in student.parameters())
    assert n_student * 10 < 134e6  # <= 1/10 of FCN-8s's parameters


def test_student_weights_from_local_file(tmp_path) -> None:
    ref = torchvision.models.mobilenet_v3_large(weights=None)
    path = tmp_path / "mbv3.pth"
    torch.save(ref.state_dict(), path)
    student = build_model("student", num_classes=3, weights=path)
    torch.testing.assert_close(student.backbone.features[0][0].weight, ref.features[0][0].weight)
    with pytest.raises(ModelError, match="does not exist"):
        build_model("student", num_classes=3, weights=tmp_path / "nope.pth")


@pytest.mark.parametrize(
    ("name", "kwargs", "pairs"),
    [("student", {}, 46), ("fcn8s", {"backbone": "vgg16_bn", "width_mult": 0.125, "fc_dim": 32}, 13)],
)
def test_fuse_conv_bn_keeps_outputs(name: str, kwargs: dict, pairs: int) -> None:
    from fcn.models.fuse import fuse_conv_bn

    torch.manual_seed(0)
    model = build_model(name, num_classes=5, **kwargs)
    for module in model.modules():  # non-trivial statistics and affine parameters everywhere
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            torch.nn.init.normal_(module.weight)
            torch.nn.init.normal_(module.bias)
    for pname, p in model.named_parameters():
        if "score" in pname:
            torch.nn.init.normal_(p, std=0.1)
    with pytest.raises(ModelError, match="eval mode"):
        fuse_conv_bn(model)
    model.eval()
    x = torch.randn(2, 3, 67, 91)
    with torch.no_grad():
        ref = model(x, return_features=True)
        assert fuse_conv_bn(model) == pairs
        out = model(x, return_features=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    for key in ("out", "c3", "c4", "c5"):
        assert ref[key].abs().max() > 0
        torch.testing.assert_close(out[key], ref[key], rtol=1e-4, atol=1e-4 * float(ref[key].abs().max()))
    assert fuse_conv_bn(model) == 0  # nothing left to fuse
