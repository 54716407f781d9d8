"""The CIFAR-100 model zoo of the knowledge-distillation benchmark.

The 22 networks of CRD (Tian, Krishnan & Isola, "Contrastive Representation Distillation", ICLR 2020) as
published in its code, RepDistiller, and re-used by mdistiller and later work. Module names, shapes and the
forward computation follow that zoo exactly, so its teachers (`<name>_vanilla/ckpt_epoch_240.pth`) load with
strict=True (the parameter counts in test_models.py are the zoo's published ones).

Every model maps a 32x32 image batch to logits; `model(x, return_features=True)` also returns the pooled
penultimate vector (B x model.feature_dim) that the classifier reads, which is what a projector distils.
"""
import re
import warnings
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


def conv_and_bn(in_ch, out_ch, kernel_size, stride=1, groups=1):
    """A conv (no bias: the BN shift replaces it) and its BN, for a block to name as the zoo does (`conv1`, `bn1`)."""
    return (nn.Conv2d(in_ch, out_ch, kernel_size, stride, kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_ch))


def conv_bn(in_ch, out_ch, kernel_size, stride=1, groups=1, relu=False):
    """conv_and_bn [+ ReLU] as a Sequential, so keys read `.0` and `.1`."""
    return nn.Sequential(*conv_and_bn(in_ch, out_ch, kernel_size, stride, groups), *([nn.ReLU()] if relu else []))


def make_stage(block, in_ch, out_ch, num_blocks, stride):
    """num_blocks blocks; only the first changes width and resolution."""
    return nn.Sequential(*[block(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1)
                           for i in range(num_blocks)])


def global_avg_pool(x):
    # The zoo pools with fixed kernels (8x8, 4x4, ...) equal to the final map at 32x32; a global mean gives the
    # same numbers there and no size arithmetic for torch.compile to trace.
    return F.adaptive_avg_pool2d(x, 1).flatten(1)


def channel_shuffle(x, groups):
    # Interleave channels across groups so the next grouped conv sees every group: (g, c) -> (c, g).
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


def init_weights(model, linear_std=None):
    """The zoo's init: He-normal convs (fan_out), unit BN; VGG and MobileNetV2 also draw the classifier N(0, 0.01)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


class ZooNet(nn.Module):
    """Shared forward: pooled features -> classifier. Subclasses name their classifier as the zoo does."""
    head_name = "fc"

    @property
    def head(self):
        return getattr(self, self.head_name)

    def forward(self, x, return_features=False):
        features = self.pooled_features(x)
        logits = self.head(features)
        return (logits, features) if return_features else logits


# ---- CIFAR ResNets (resnet8 ... resnet110, resnet8x4, resnet32x4) ----

class BasicBlock(nn.Module):
    """Post-activation residual block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))."""

    def __init__(self, in_ch, out_ch, stride):
        super().__init__()
        self.conv1, self.bn1 = conv_and_bn(in_ch, out_ch, 3, stride)
        self.conv2, self.bn2 = conv_and_bn(out_ch, out_ch, 3)
        # A 1x1 projection wherever the identity would not fit (also resnet*x4's first block, 32 -> 64).
        self.downsample = nn.Identity() if stride == 1 and in_ch == out_ch else conv_bn(in_ch, out_ch, 1, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.downsample(x))


class CifarResNet(ZooNet):
    """3x3 stem, three stages of (depth - 2) / 6 blocks at 32, 16 and 8 pixels, global pool, fc."""

    def __init__(self, depth, widths, num_classes):
        super().__init__()
        stem, *stage_widths = widths
        blocks_per_stage = (depth - 2) // 6
        self.conv1, self.bn1 = conv_and_bn(3, stem, 3)
        for i, (in_ch, out_ch) in enumerate(zip(widths, stage_widths)):
            setattr(self, f"layer{i + 1}", make_stage(BasicBlock, in_ch, out_ch, blocks_per_stage, 1 if i == 0 else 2))
        self.feature_dim = stage_widths[-1]
        self.fc = nn.Linear(self.feature_dim, num_classes)
        init_weights(self)

    def pooled_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return global_avg_pool(self.layer3(self.layer2(self.layer1(x))))


# ---- Wide ResNets (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2) ----

class WideBlock(nn.Module):
    """Pre-activation block: conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut."""

    def __init__(self, in_ch, out_ch, stride):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.convShortcut = nn.Conv2d(in_ch, out_ch, 1, stride, bias=False) if in_ch != out_ch else None

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        # The zoo's projection shortcut reads the pre-activated input; the identity shortcut the raw one.
        return out + (x if self.convShortcut is None else self.convShortcut(activated))


class WideResNet(ZooNet):
    """Stem conv, three stages of (depth - 4) / 6 pre-activation blocks of width 16k/32k/64k, final BN+ReLU."""

    def __init__(self, depth, widen, num_classes):
        super().__init__()
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        for i in range(3):
            stage = nn.Module()  # the zoo nests each stage's blocks one level deeper, as `block{k}.layer.{i}`
            stage.layer = make_stage(WideBlock, widths[i], widths[i + 1], (depth - 4) // 6, 1 if i == 0 else 2)
            setattr(self, f"block{i + 1}", stage)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.feature_dim = widths[3]
        self.fc = nn.Linear(self.feature_dim, num_classes)
        init_weights(self)

    def pooled_features(self, x):
        x = self.block3.layer(self.block2.layer(self.block1.layer(self.conv1(x))))
        return global_avg_pool(F.relu(self.bn1(x)))


# ---- VGG with BN (vgg8 ... vgg19) ----

class VGG(ZooNet):
    """Five blocks of 3x3 conv (with bias) + BN + ReLU at widths 64..512; 2x2 max-pools after blocks 0-2."""
    head_name = "classifier"

    def __init__(self, convs_per_block, num_classes):
        super().__init__()
        in_ch = 3
        for i, (num_convs, width) in enumerate(zip(convs_per_block, (64, 128, 256, 512, 512))):
            layers = []
            for _ in range(num_convs):
                layers += [nn.Conv2d(in_ch, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
                in_ch = width
            # The zoo drops each block's last ReLU and applies it in forward; a parameter-free trailing module
            # adds no state_dict key, so keeping it here gives the same keys (`block{i}.{3j}`, `.{3j+1}`).
            setattr(self, f"block{i}", nn.Sequential(*layers))
        self.feature_dim = 512
        self.classifier = nn.Linear(512, num_classes)
        init_weights(self, linear_std=0.01)

    def pooled_features(self, x):
        for block in (self.block0, self.block1, self.block2):
            x = F.max_pool2d(block(x), 2)
        # At 4x4 now: the zoo pools before block4 only for 64x64 inputs.
        return global_avg_pool(self.block4(self.block3(x)))


# ---- MobileNetV2 (width 0.5, expansion 6; the zoo's "mobile_half") ----

class InvertedResidual(nn.Module):
    """1x1 expand + ReLU, 3x3 depthwise + ReLU, linear 1x1 project; residual when shapes allow."""

    def __init__(self, in_ch, out_ch, stride, expansion):
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        # One flat Sequential (keys `conv.0` ... `conv.7`); the zoo keeps the 1x1 expand even at expansion 1.
        self.conv = nn.Sequential(*conv_bn(in_ch, hidden, 1, relu=True),
                                  *conv_bn(hidden, hidden, 3, stride, groups=hidden, relu=True),
                                  *conv_bn(hidden, out_ch, 1))

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(ZooNet):
    """Stride-2 stem (32 -> 16 px), seven inverted-residual stages down to 2x2, 1x1 conv to 1280."""
    head_name = "classifier"

    def __init__(self, num_classes, expansion=6, width=0.5):
        super().__init__()
        stages = [(1, 16, 1, 1), (expansion, 24, 2, 1), (expansion, 32, 3, 2), (expansion, 64, 4, 2),
                  (expansion, 96, 3, 1), (expansion, 160, 3, 2), (expansion, 320, 1, 1)]  # (t, c, n, stride)
        in_ch = int(32 * width)
        self.conv1 = conv_bn(3, in_ch, 3, stride=2, relu=True)
        self.blocks = nn.ModuleList()
        for t, channels, num_blocks, stride in stages:
            out_ch = int(channels * width)
            self.blocks.append(make_stage(partial(InvertedResidual, expansion=t), in_ch, out_ch, num_blocks, stride))
            in_ch = out_ch
        self.feature_dim = 1280  # not scaled by width < 1, as in the zoo
        self.conv2 = conv_bn(in_ch, self.feature_dim, 1, relu=True)
        self.classifier = nn.Sequential(nn.Linear(self.feature_dim, num_classes))
        init_weights(self, linear_std=0.01)

    def pooled_features(self, x):
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        return global_avg_pool(self.conv2(x))


# ---- ShuffleNet v1 (groups 3) ----

class ShuffleV1Block(nn.Module):
    """Grouped 1x1, shuffle, depthwise 3x3, grouped 1x1; stride 2 concatenates an avg-pooled input instead of adding."""

    def __init__(self, in_ch, out_ch, stride, groups):
        super().__init__()
        self.stride = stride
        branch_ch = out_ch - in_ch if stride == 2 else out_ch  # the concatenated input supplies the rest
        mid_ch = branch_ch // 4
        self.first_groups = 1 if in_ch == 24 else groups  # the stem's 24 channels are not grouped
        self.conv1, self.bn1 = conv_and_bn(in_ch, mid_ch, 1, groups=self.first_groups)
        self.conv2, self.bn2 = conv_and_bn(mid_ch, mid_ch, 3, stride, groups=mid_ch)
        self.conv3, self.bn3 = conv_and_bn(mid_ch, branch_ch, 1, groups=groups)

    def forward(self, x):
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.first_groups)
        out = F.relu(self.bn2(self.conv2(out)))  # the zoo keeps this ReLU after the depthwise conv
        out = self.bn3(self.conv3(out))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleV1(ZooNet):
    """1x1 stem to 24 channels (no stride, no max-pool at 32 px), stages of 4/8/4 blocks at 240/480/960."""
    head_name = "linear"

    def __init__(self, num_classes, groups=3):
        super().__init__()
        self.conv1, self.bn1 = conv_and_bn(3, 24, 1)
        block = partial(ShuffleV1Block, groups=groups)
        for i, (in_ch, out_ch, num_blocks) in enumerate([(24, 240, 4), (240, 480, 8), (480, 960, 4)]):
            setattr(self, f"layer{i + 1}", make_stage(block, in_ch, out_ch, num_blocks, stride=2))
        self.feature_dim = 960
        self.linear = nn.Linear(960, num_classes)  # the zoo keeps PyTorch's default init for ShuffleNets

    def pooled_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return global_avg_pool(self.layer3(self.layer2(self.layer1(x))))


# ---- ShuffleNet v2 (1.0x) ----

class ShuffleV2Block(nn.Module):
    """Keep half the channels; pass the other half through 1x1-BN-ReLU, dw3x3-BN, 1x1-BN-ReLU; concat, shuffle."""

    def __init__(self, channels):
        super().__init__()
        half = channels // 2
        self.conv1, self.bn1 = conv_and_bn(half, half, 1)
        self.conv2, self.bn2 = conv_and_bn(half, half, 3, groups=half)
        self.conv3, self.bn3 = conv_and_bn(half, half, 1)

    def forward(self, x):
        kept, transformed = x.chunk(2, dim=1)
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(transformed)))))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([kept, out], 1), 2)


class ShuffleV2DownBlock(nn.Module):
    """Two stride-2 branches of out/2 channels each: dw3x3-BN, 1x1-BN-ReLU | 1x1-BN-ReLU, dw3x3-BN, 1x1-BN-ReLU."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        mid = out_ch // 2
        self.conv1, self.bn1 = conv_and_bn(in_ch, in_ch, 3, 2, groups=in_ch)
        self.conv2, self.bn2 = conv_and_bn(in_ch, mid, 1)
        self.conv3, self.bn3 = conv_and_bn(in_ch, mid, 1)
        self.conv4, self.bn4 = conv_and_bn(mid, mid, 3, 2, groups=mid)
        self.conv5, self.bn5 = conv_and_bn(mid, mid, 1)

    def forward(self, x):
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleV2(ZooNet):
    """1x1 stem to 24, stages (down block + 3/7/3 blocks) at 116/232/464, 1x1 conv to 1024."""
    head_name = "linear"

    def __init__(self, num_classes):
        super().__init__()
        self.conv1, self.bn1 = conv_and_bn(3, 24, 1)
        in_ch = 24
        for i, (out_ch, num_blocks) in enumerate([(116, 3), (232, 7), (464, 3)]):
            stage = [ShuffleV2DownBlock(in_ch, out_ch)] + [ShuffleV2Block(out_ch) for _ in range(num_blocks)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            in_ch = out_ch
        self.feature_dim = 1024
        self.conv2, self.bn2 = conv_and_bn(464, 1024, 1)
        self.linear = nn.Linear(1024, num_classes)

    def pooled_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return global_avg_pool(F.relu(self.bn2(self.conv2(x))))


# ---- ResNet50 (ImageNet bottleneck ResNet with a 3x3 stride-1 stem and no max-pool) ----

class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand to out_ch = 4x the inner width; post-activation residual."""

    def __init__(self, in_ch, out_ch, stride):
        super().__init__()
        mid = out_ch // 4
        self.conv1, self.bn1 = conv_and_bn(in_ch, mid, 1)
        self.conv2, self.bn2 = conv_and_bn(mid, mid, 3, stride)
        self.conv3, self.bn3 = conv_and_bn(mid, out_ch, 1)
        self.shortcut = nn.Identity() if stride == 1 and in_ch == out_ch else conv_bn(in_ch, out_ch, 1, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class ResNet50(ZooNet):
    head_name = "linear"

    def __init__(self, num_classes):
        super().__init__()
        self.conv1, self.bn1 = conv_and_bn(3, 64, 3)
        in_ch = 64
        for i, (out_ch, num_blocks) in enumerate([(256, 3), (512, 4), (1024, 6), (2048, 3)]):
            setattr(self, f"layer{i + 1}", make_stage(Bottleneck, in_ch, out_ch, num_blocks, 1 if i == 0 else 2))
            in_ch = out_ch
        self.feature_dim = 2048
        self.linear = nn.Linear(2048, num_classes)
        init_weights(self)

    def pooled_features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return global_avg_pool(self.layer4(self.layer3(self.layer2(self.layer1(x)))))


# ---- registry and checkpoints ----

_SMALL, _X4 = (16, 16, 32, 64), (32, 64, 128, 256)
_VGG_CONVS = {8: (1, 1, 1, 1, 1), 11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
_BUILDERS = {
    **{f"resnet{d}": partial(CifarResNet, d, _SMALL) for d in (8, 14, 20, 32, 44, 56, 110)},
    **{f"resnet{d}x4": partial(CifarResNet, d, _X4) for d in (8, 32)},
    **{f"wrn_{d}_{k}": partial(WideResNet, d, k) for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))},
    **{f"vgg{d}": partial(VGG, convs) for d, convs in _VGG_CONVS.items()},
    **{model.__name__: model for model in (MobileNetV2, ShuffleV1, ShuffleV2, ResNet50)},
}
MODEL_NAMES = tuple(_BUILDERS)


def build_model(name, num_classes=100):
    """A freshly initialised zoo model, e.g. build_model("resnet32x4")."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
    return _BUILDERS[name](num_classes=num_classes)


def _is_state_dict(obj):
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def read_checkpoint(path):
    """torch.load(path, weights_only=True) onto the CPU (the zoo saved CUDA tensors), one message per way it fails;
    weights_only refuses pickled code (os.system, say), and torch's hint to retry unsafely is not passed on."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        with warnings.catch_warnings():  # torch warns of a plain pickle's protocol before refusing it: one message
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for a truncated or foreign file
        named = re.search(r"GLOBAL ([\w.]+)", str(error))  # the callable a pickle asked for
        if named:
            raise ValueError(f"{path} holds code or objects a checkpoint should not ({named.group(1)}), so it was not "
                             f"loaded: a checkpoint holds only tensors, numbers and strings") from None
        raise ValueError(f"{path} is not a readable checkpoint: truncated, corrupt or not a torch file "
                         f"({type(error).__name__}: {str(error).split('. ')[0][:200]})") from None


def load_weights(model, path):
    """Load a checkpoint's weights strictly into model and return the checkpoint: the zoo's {"model": state_dict,
    "epoch", "accuracy", "optimizer"}, this project's (the same and more), or a bare state_dict (as {"model": it})."""
    checkpoint = read_checkpoint(path)
    checkpoint = {"model": checkpoint} if _is_state_dict(checkpoint) else checkpoint
    load_state(model, checkpoint.get("model") if isinstance(checkpoint, Mapping) else None, path)
    return checkpoint


def load_state(model, state, source):
    """model.load_state_dict(state) strictly, or a ValueError naming the first missing, unexpected and mis-shaped keys
    (torch's own message lists them all, hundreds for a deep network)."""
    if not _is_state_dict(state):
        raise ValueError(f"{source} holds no model weights: expected a state_dict or a dict with a 'model' state_dict")
    expected = model.state_dict()
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    problems = {"missing keys": [k for k in expected if k not in state],
                "unexpected keys": [k for k in state if k not in expected],
                "shape mismatches, checkpoint vs model": shapes}
    listed = [f"{label} ({len(keys)}): {', '.join(keys[:6])}" + (f", ... ({len(keys) - 6} more)" if keys[6:] else "")
              for label, keys in problems.items() if keys]
    if listed:
        raise ValueError(f"{source} does not fit {type(model).__name__} (another architecture?); " + "; ".join(listed))
    model.load_state_dict(state)
