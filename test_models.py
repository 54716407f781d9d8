"""models.py against the benchmark zoo's published facts (RepDistiller's models, as CRD released them) and independent
re-computations."""
import functools

import pytest
import torch
import torch.nn.functional as F

from models import MODEL_NAMES, build_model, load_weights
from test_data import RunsAShellCommand  # a pickle that runs a shell command when loaded

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The zoo's published figures, num_classes=100: name -> (parameters, pooled feature width).
PUBLISHED = {
    "resnet8": (83_892, 64), "resnet14": (181_108, 64), "resnet20": (278_324, 64), "resnet32": (472_756, 64),
    "resnet44": (667_188, 64), "resnet56": (861_620, 64), "resnet110": (1_736_564, 64),
    "resnet8x4": (1_233_540, 256), "resnet32x4": (7_433_860, 256),
    "wrn_16_1": (180_916, 64), "wrn_16_2": (703_284, 128), "wrn_40_1": (569_780, 64), "wrn_40_2": (2_255_156, 128),
    "vgg8": (3_965_028, 512), "vgg11": (9_277_284, 512), "vgg13": (9_462_180, 512), "vgg16": (14_774_436, 512),
    "vgg19": (20_086_692, 512), "MobileNetV2": (812_836, 1280), "ShuffleV1": (949_258, 960),
    "ShuffleV2": (1_355_528, 1024), "ResNet50": (23_705_252, 2048),
}
GRADIENT_CHECKED = [n for n in MODEL_NAMES if n.startswith(("resnet", "wrn"))] + [
    "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2", "ResNet50"]


@functools.lru_cache(maxsize=None)
def built(name):
    """One seeded instance per name, shared by the read-only tests (building all 22 takes seconds)."""
    torch.manual_seed(0)
    return build_model(name)


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def randomized(model, seed=0):
    """Random weights and BN statistics, so an eval-mode forward exercises every tensor of the state_dict."""
    generator = torch.Generator().manual_seed(seed)
    state = {k: (torch.rand(v.shape, generator=generator) + 0.5 if k.endswith("running_var")
                 else torch.randn(v.shape, generator=generator) * 0.2 if v.is_floating_point() else v)
             for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model.eval()


def test_names_are_the_zoo():
    assert sorted(MODEL_NAMES) == sorted(PUBLISHED) and len(MODEL_NAMES) == 22


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_parameters_shapes_and_features(name):
    model = built(name).eval()
    params, feature_dim = PUBLISHED[name]
    assert sum(p.numel() for p in model.parameters()) == params
    assert model.feature_dim == feature_dim
    with torch.no_grad():
        logits, features = model(images(), return_features=True)
        assert logits.shape == (2, 100) and features.shape == (2, feature_dim)
        assert torch.equal(model(images()), logits)
        # the features are exactly what the classifier reads
        torch.testing.assert_close(model.head(features), logits, rtol=0, atol=0)


def test_state_dict_sizes_and_key_names():
    assert len(built("resnet8x4").state_dict()) == 62
    assert len(built("resnet32x4").state_dict()) == 206
    expected = {
        "resnet8x4": ["conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight",
                      "layer1.0.downsample.1.weight", "layer3.0.conv2.weight", "fc.weight", "fc.bias"],
        "resnet56": ["layer2.0.downsample.0.weight", "layer3.8.bn2.bias"],
        "wrn_40_2": ["conv1.weight", "block1.layer.0.bn1.weight", "block1.layer.0.convShortcut.weight",
                     "block3.layer.5.conv2.weight", "bn1.weight", "fc.weight"],
        "vgg13": ["block0.0.weight", "block0.0.bias", "block0.1.running_var", "block0.3.weight",
                  "block4.4.weight", "classifier.weight"],
        "MobileNetV2": ["conv1.0.weight", "blocks.0.0.conv.0.weight", "blocks.6.0.conv.7.weight",
                        "conv2.0.weight", "classifier.0.weight"],
        "ShuffleV1": ["layer1.0.conv1.weight", "layer3.3.bn3.weight", "linear.weight"],
        "ShuffleV2": ["layer1.0.conv5.weight", "layer2.7.conv3.weight", "conv2.weight", "linear.weight"],
        "ResNet50": ["layer1.0.shortcut.0.weight", "layer4.2.conv3.weight", "linear.weight"],
    }
    for name, keys in expected.items():
        state = built(name).state_dict()
        assert [k for k in keys if k not in state] == [], name
    absent = {"resnet8": ["layer1.0.downsample.0.weight"], "wrn_16_1": ["block1.layer.0.convShortcut.weight"],
              "wrn_40_2": ["block1.layer.1.convShortcut.weight"], "ResNet50": ["layer1.1.shortcut.0.weight"]}
    for name, keys in absent.items():
        assert not set(keys) & set(built(name).state_dict()), name


def _bn(state, prefix, x):
    return F.batch_norm(x, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                        state[f"{prefix}.weight"], state[f"{prefix}.bias"], training=False, eps=1e-5)


def _conv(state, prefix, x, stride=1):
    weight = state[f"{prefix}.weight"]  # groups follow from the shapes: depthwise and grouped convs alike
    return F.conv2d(x, weight, state.get(f"{prefix}.bias"), stride, weight.shape[-1] // 2,
                    groups=x.shape[1] // weight.shape[1])


def _zoo_shuffle(x, groups):
    n, c, h, w = x.shape  # the zoo's shuffle: [N, g, C/g, H, W] -> [N, C/g, g, H, W] -> [N, C, H, W]
    return x.view(n, groups, c // groups, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


def reference_cifar_resnet(state, x):
    """The zoo's CIFAR ResNet as plain ops over its state_dict keys: post-activation blocks, 8x8 average pool."""
    x = F.relu(_bn(state, "bn1", _conv(state, "conv1", x)))
    for stage in (1, 2, 3):
        i = 0
        while f"layer{stage}.{i}.conv1.weight" in state:
            p, stride = f"layer{stage}.{i}", 2 if stage > 1 and i == 0 else 1
            out = F.relu(_bn(state, f"{p}.bn1", _conv(state, f"{p}.conv1", x, stride)))
            out = _bn(state, f"{p}.bn2", _conv(state, f"{p}.conv2", out))
            has_projection = f"{p}.downsample.0.weight" in state
            shortcut = _bn(state, f"{p}.downsample.1", _conv(state, f"{p}.downsample.0", x, stride)) if has_projection else x
            x, i = F.relu(out + shortcut), i + 1
    return F.linear(F.avg_pool2d(x, 8).flatten(1), state["fc.weight"], state["fc.bias"])


def reference_wide_resnet(state, x):
    """The zoo's WRN: pre-activation blocks whose projection shortcut reads the activated input; final BN+ReLU."""
    x = _conv(state, "conv1", x)
    for stage in (1, 2, 3):
        i = 0
        while f"block{stage}.layer.{i}.conv1.weight" in state:
            p, stride = f"block{stage}.layer.{i}", 2 if stage > 1 and i == 0 else 1
            activated = F.relu(_bn(state, f"{p}.bn1", x))
            out = F.relu(_bn(state, f"{p}.bn2", _conv(state, f"{p}.conv1", activated, stride)))
            out = _conv(state, f"{p}.conv2", out)
            projected = f"{p}.convShortcut.weight" in state
            x, i = out + (_conv(state, f"{p}.convShortcut", activated, stride) if projected else x), i + 1
    x = F.relu(_bn(state, "bn1", x))
    return F.linear(F.avg_pool2d(x, 8).flatten(1), state["fc.weight"], state["fc.bias"])


def reference_vgg(state, x):
    """The zoo's VGG: conv(+bias)-BN-ReLU blocks; 2x2 max-pools after blocks 0-2 only (at 32 px), mean pool."""
    for block in range(5):
        j = 0
        while f"block{block}.{3 * j}.weight" in state:
            x = F.relu(_bn(state, f"block{block}.{3 * j + 1}", _conv(state, f"block{block}.{3 * j}", x)))
            j += 1
        x = F.max_pool2d(x, 2) if block < 3 else x
    return F.linear(F.adaptive_avg_pool2d(x, 1).flatten(1), state["classifier.weight"], state["classifier.bias"])


def reference_shufflenet_v1(state, x):
    """The zoo's ShuffleNet v1: stride-2 blocks concatenate a 3x3 average-pooled input, others add it."""
    x = F.relu(_bn(state, "bn1", _conv(state, "conv1", x)))
    for stage in (1, 2, 3):
        i = 0
        while f"layer{stage}.{i}.conv1.weight" in state:
            p, stride = f"layer{stage}.{i}", 2 if i == 0 else 1
            first_groups = x.shape[1] // state[f"{p}.conv1.weight"].shape[1]
            out = _zoo_shuffle(F.relu(_bn(state, f"{p}.bn1", _conv(state, f"{p}.conv1", x))), first_groups)
            out = F.relu(_bn(state, f"{p}.bn2", _conv(state, f"{p}.conv2", out, stride)))
            out = _bn(state, f"{p}.bn3", _conv(state, f"{p}.conv3", out))
            shortcut = F.avg_pool2d(x, 3, 2, 1) if stride == 2 else x
            x, i = F.relu(torch.cat([out, shortcut], 1) if stride == 2 else out + shortcut), i + 1
    return F.linear(F.avg_pool2d(x, 4).flatten(1), state["linear.weight"], state["linear.bias"])


def reference_shufflenet_v2(state, x):
    """The zoo's ShuffleNet v2: a two-branch down block, then split-transform-concat-shuffle blocks."""
    bn_conv = lambda p, k, x, stride=1: _bn(state, f"{p}.bn{k}", _conv(state, f"{p}.conv{k}", x, stride))
    x = F.relu(_bn(state, "bn1", _conv(state, "conv1", x)))
    for stage in (1, 2, 3):
        p = f"layer{stage}.0"
        left = F.relu(bn_conv(p, 2, bn_conv(p, 1, x, 2)))
        right = F.relu(bn_conv(p, 5, bn_conv(p, 4, F.relu(bn_conv(p, 3, x)), 2)))
        x, i = _zoo_shuffle(torch.cat([left, right], 1), 2), 1
        while f"layer{stage}.{i}.conv1.weight" in state:
            p, half = f"layer{stage}.{i}", x.shape[1] // 2
            out = F.relu(bn_conv(p, 3, bn_conv(p, 2, F.relu(bn_conv(p, 1, x[:, half:])))))
            x, i = _zoo_shuffle(torch.cat([x[:, :half], out], 1), 2), i + 1
    x = F.relu(_bn(state, "bn2", _conv(state, "conv2", x)))
    return F.linear(F.avg_pool2d(x, 4).flatten(1), state["linear.weight"], state["linear.bias"])


@pytest.mark.parametrize("name, reference", [
    ("resnet8x4", reference_cifar_resnet), ("resnet20", reference_cifar_resnet), ("wrn_16_1", reference_wide_resnet),
    ("wrn_16_2", reference_wide_resnet), ("vgg8", reference_vgg), ("vgg13", reference_vgg),
    ("ShuffleV1", reference_shufflenet_v1), ("ShuffleV2", reference_shufflenet_v2)])
def test_forward_matches_an_independent_reference(name, reference):
    model = randomized(build_model(name))
    with torch.no_grad():
        torch.testing.assert_close(model(images()), reference(model.state_dict(), images()))


@pytest.mark.parametrize("name", ["MobileNetV2", "ShuffleV1", "ShuffleV2", "vgg8"])
def test_channels_last_gives_the_same_logits(name):
    model = randomized(build_model(name))
    with torch.no_grad():
        expected = model(images())
        model = model.to(memory_format=torch.channels_last)
        actual = model(images().to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", GRADIENT_CHECKED)
def test_gradients_reach_every_parameter(name):
    torch.manual_seed(0)
    model = build_model(name).train()
    F.cross_entropy(model(images()), torch.tensor([3, 7])).backward()
    unreached = [k for k, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert unreached == []


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="resnet32x4.*ShuffleV2"):
        build_model("resnet33")


def save_published_format(model, path):
    """A checkpoint shaped like the zoo's teachers: model, epoch, tensor accuracy, optimizer state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    F.cross_entropy(model(images()), torch.tensor([1, 2])).backward()
    optimizer.step()
    torch.save({"model": model.state_dict(), "epoch": 240, "accuracy": torch.tensor(72.34),
                "optimizer": optimizer.state_dict()}, path)


def test_published_checkpoint_loads(tmp_path):
    source = build_model("resnet8")
    save_published_format(source, tmp_path / "ckpt_epoch_240.pth")
    target = build_model("resnet8").eval()
    checkpoint = load_weights(target, tmp_path / "ckpt_epoch_240.pth")
    assert checkpoint["epoch"] == 240 and float(checkpoint["accuracy"]) == pytest.approx(72.34)
    with torch.no_grad():
        assert torch.equal(target(images()), source.eval()(images()))


def test_own_and_bare_checkpoints_load(tmp_path):
    source = randomized(build_model("wrn_16_1"))
    torch.save({"model": source.state_dict(), "projector": {"weight": torch.zeros(3)}, "epoch": 5}, tmp_path / "own.pt")
    torch.save(source.state_dict(), tmp_path / "bare.pt")
    for file in ("own.pt", "bare.pt"):
        target = build_model("wrn_16_1").eval()
        assert "model" in load_weights(target, tmp_path / file)
        assert torch.equal(target.state_dict()["block3.layer.1.conv2.weight"],
                           source.state_dict()["block3.layer.1.conv2.weight"])


def test_another_architecture_fails_naming_keys(tmp_path):
    save_published_format(build_model("resnet8"), tmp_path / "resnet8.pth")
    with pytest.raises(ValueError, match="missing keys") as error:
        load_weights(build_model("wrn_16_1"), tmp_path / "resnet8.pth")
    message = str(error.value)
    assert "unexpected keys" in message and "block1.layer.0.bn1.weight" in message and "layer1.0.conv1.weight" in message
    assert "more)" in message and len(message) < 1000  # long key lists are abbreviated
    with pytest.raises(ValueError, match=r"fc.weight \(100, 64\) vs \(10, 64\)"):
        load_weights(build_model("resnet8", num_classes=10), tmp_path / "resnet8.pth")


def test_missing_or_corrupt_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_weights(build_model("resnet8"), tmp_path / "absent.pth")
    (tmp_path / "random.pth").write_bytes(bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()))
    (tmp_path / "notes.pth").write_text("epoch 240, accuracy 72.34\n")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save({"epoch": 3}, tmp_path / "no_model.pth")
    torch.save(build_model("resnet8").state_dict(), tmp_path / "whole.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:5000])
    for file in ("random.pth", "notes.pth", "truncated.pth"):
        with pytest.raises(ValueError, match="is not a readable checkpoint"):
            load_weights(build_model("resnet8"), tmp_path / file)
    for file in ("list.pth", "no_model.pth"):
        with pytest.raises(ValueError, match="holds no model weights"):
            load_weights(build_model("resnet8"), tmp_path / file)


def test_checkpoint_that_would_run_code_is_refused_without_the_unsafe_advice(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"model": build_model("resnet8").state_dict(), "hook": RunsAShellCommand(f"touch {marker}")},
               tmp_path / "malicious.pth")
    with pytest.raises(ValueError) as error:
        load_weights(build_model("resnet8"), tmp_path / "malicious.pth")
    message = str(error.value)
    assert "holds code or objects a checkpoint should not" in message and "system" in message
    assert "not loaded" in message and "weights_only" not in message and "False" not in message
    assert not marker.exists()
