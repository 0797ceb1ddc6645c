"""The feature networks behind LPIPS, FVD and FID-VID, real or tiny, and the image-encoder
appearance features of the identity-swap measure.

Legend: B batch, T frames, C channels, H x W pixels.

- :class:`LPIPS` (Zhang et al. 2018, "v0.1"): images in [-1, 1] are shifted and scaled per
  channel, passed through the backbone's five ReLU taps (AlexNet: conv1..conv5; VGG-16:
  relu1_2..relu5_3), unit-normalised along channels, squared differences weighted by learned
  non-negative 1x1 heads, averaged over space and summed over taps. Backbone weights are
  torchvision's ImageNet files, heads the lpips package's ``weights/v0.1/<net>.pth``.
- :class:`InceptionI3d` (Carreira & Zisserman 2017), the pytorch-i3d layout (parameter names
  as ``i3d_pretrained_400.pt``, the file DisCo's and VideoGPT's FVD code load): input
  ``[B, 3, T, 224, 224]`` in [-1, 1], output the 400 Kinetics logits averaged over the
  remaining time steps (the original FVD's feature; for 16 frames one time step remains).
- :class:`ResNet3D` (Hara et al. 2018, 3D-ResNets-PyTorch, ResNet-50, shortcut B): input
  ``[B, 3, T, 112, 112]`` in 0..255 minus the Kinetics mean, output the 2048 pooled features
  (``last_fc=False``). "FID-VID" in the animation papers (DisCo's ``FVD-3DRN50``) is the
  Frechet distance of these features.

Real weights load from local files only (``EvalNetworks``); a missing file stops with one
ValueError naming every missing file and where to get it. Without files, seeded tiny random
networks of the same classes (same input and output shapes, few channels) stand in, and
:meth:`EvalNets.describe` says so in every result.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from data_schemas.evaluation import EvalNetworks, Protocol

# LPIPS' ScalingLayer (inputs in [-1, 1])
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# Kinetics mean subtracted by 3D-ResNets-PyTorch (0..255 RGB)
R3D_MEAN = (114.7748, 107.7354, 99.4750)
# CLIP's image normalisation (the Wan image encoder's)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

WHERE = {
    "alex": "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth (torchvision AlexNet IMAGENET1K_V1)",
    "vgg": "https://download.pytorch.org/models/vgg16-397923af.pth (torchvision VGG16 IMAGENET1K_V1)",
    "heads": "the lpips package (pip download lpips; lpips/weights/v0.1/<alex|vgg>.pth) or "
    "github.com/richzhang/PerceptualSimilarity, lpips/weights/v0.1/",
    "i3d": "i3d_pretrained_400.pt: the Kinetics-400 I3D in pytorch-i3d layout shipped with DisCo's evaluation "
    "tools (github.com/Wangt-CN/DisCo, tool/metrics, eval_fvd/) and VideoGPT (github.com/wilson1yan/VideoGPT)",
    "r3d": "resnet-50-kinetics.pth: github.com/kenshohara/3D-ResNets-PyTorch (Kinetics-400 ResNet-50, shortcut B; "
    "also in DisCo's eval_fvd/)",
}


# ----------------------------------------------------------------------------------- LPIPS
ALEX_CHANNELS = (64, 192, 384, 256, 256)
VGG_CHANNELS = (64, 128, 256, 512, 512)
_ALEX_TAPS = (2, 5, 8, 10, 12)  # ends of LPIPS' five slices of torchvision's alexnet.features
_VGG_TAPS = (4, 9, 16, 23, 30)  # ... of vgg16.features


def _alex_features(c: Sequence[int]) -> nn.Sequential:
    # torchvision AlexNet.features, layer for layer (indices match its state dict)
    return nn.Sequential(
        nn.Conv2d(3, c[0], 11, 4, 2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(c[0], c[1], 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(c[1], c[2], 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c[2], c[3], 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c[3], c[4], 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
    )


def _vgg_features(c: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    cin = 3
    for stage, reps in enumerate((2, 2, 3, 3, 3)):
        for _ in range(reps):
            layers += [nn.Conv2d(cin, c[stage], 3, padding=1), nn.ReLU()]
            cin = c[stage]
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """LPIPS distance: forward(img0, img1) in [-1, 1], [B, 3, H, W] -> [B] (or the spatial map)."""

    def __init__(self, backbone: str = "alex", channels: Sequence[int] | None = None) -> None:
        super().__init__()
        if backbone not in ("alex", "vgg"):
            raise ValueError(f"lpips backbone must be 'alex' or 'vgg', got {backbone!r}")
        self.backbone = backbone
        channels = tuple(channels or (ALEX_CHANNELS if backbone == "alex" else VGG_CHANNELS))
        self.features = _alex_features(channels) if backbone == "alex" else _vgg_features(channels)
        self.taps = _ALEX_TAPS if backbone == "alex" else _VGG_TAPS
        self.lins = nn.ModuleList(nn.Conv2d(ch, 1, 1, bias=False) for ch in channels)
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, start = [], 0
        for end in self.taps:
            for layer in self.features[start:end]:
                x = layer(x)
            out.append(x)
            start = end
        return out

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, spatial: bool = False) -> torch.Tensor:
        f0 = self._taps((img0 - self.shift) / self.scale)
        f1 = self._taps((img1 - self.shift) / self.scale)
        total = 0.0
        for a, b, lin in zip(f0, f1, self.lins):
            a = a / (torch.sqrt((a * a).sum(1, keepdim=True)) + 1e-10)
            b = b / (torch.sqrt((b * b).sum(1, keepdim=True)) + 1e-10)
            d = lin((a - b) ** 2)
            if spatial:
                total = total + F.interpolate(d, size=img0.shape[-2:], mode="bilinear", align_corners=False)
            else:
                total = total + d.mean(dim=(2, 3), keepdim=True)
        return total if spatial else total.flatten()


# ------------------------------------------------------------------------------------- I3D
def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
    # TensorFlow's SAME padding, front gets the smaller half (pytorch-i3d's compute_pad)
    pad = max(k - s, 0) if size % s == 0 else max(k - size % s, 0)
    return pad // 2, pad - pad // 2


def _pad3d(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    t, h, w = x.shape[2:]
    pt, ph, pw = (_same_pad(n, k, s) for n, k, s in zip((t, h, w), kernel, stride))
    return F.pad(x, (*pw, *ph, *pt))


class Unit3D(nn.Module):
    """Conv3d (SAME padding, no bias) + BatchNorm3d + ReLU, as pytorch-i3d (names conv3d, bn)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel=(1, 1, 1),
        stride=(1, 1, 1),
        relu: bool = True,
        batch_norm: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.kernel, self.stride, self.relu = tuple(kernel), tuple(stride), relu
        self.conv3d = nn.Conv3d(cin, cout, self.kernel, self.stride, padding=0, bias=bias)
        self.bn = nn.BatchNorm3d(cout, eps=1e-3, momentum=0.01) if batch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv3d(_pad3d(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    def __init__(self, kernel: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # zero padding as pytorch-i3d (inputs are post-ReLU, so zeros never win against real values)
        return F.max_pool3d(_pad3d(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    def __init__(self, cin: int, c: Sequence[int]) -> None:
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1a, self.b1b = Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPool3dSame((3, 3, 3), (1, 1, 1)), Unit3D(cin, c[5])
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


_I3D_MIXED = {
    "Mixed_3b": (64, 96, 128, 16, 32, 32),
    "Mixed_3c": (128, 128, 192, 32, 96, 64),
    "Mixed_4b": (192, 96, 208, 16, 48, 64),
    "Mixed_4c": (160, 112, 224, 24, 64, 64),
    "Mixed_4d": (128, 128, 256, 24, 64, 64),
    "Mixed_4e": (112, 144, 288, 32, 64, 64),
    "Mixed_4f": (256, 160, 320, 32, 128, 128),
    "Mixed_5b": (256, 160, 320, 32, 128, 128),
    "Mixed_5c": (384, 192, 384, 48, 128, 128),
}
_I3D_POOLS = {
    "MaxPool3d_2a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_3a_3x3": ((1, 3, 3), (1, 2, 2)),
    "MaxPool3d_4a_3x3": ((3, 3, 3), (2, 2, 2)),
    "MaxPool3d_5a_2x2": ((2, 2, 2), (2, 2, 2)),
}
_I3D_ORDER = (
    "Conv3d_1a_7x7",
    "MaxPool3d_2a_3x3",
    "Conv3d_2b_1x1",
    "Conv3d_2c_3x3",
    "MaxPool3d_3a_3x3",
    "Mixed_3b",
    "Mixed_3c",
    "MaxPool3d_4a_3x3",
    "Mixed_4b",
    "Mixed_4c",
    "Mixed_4d",
    "Mixed_4e",
    "Mixed_4f",
    "MaxPool3d_5a_2x2",
    "Mixed_5b",
    "Mixed_5c",
)


class InceptionI3d(nn.Module):
    """I3D: [B, 3, T, 224, 224] in [-1, 1] -> [B, num_classes] logits (averaged over time).
    ``width`` < 1 scales every channel count (tiny networks); 1 is the real architecture."""

    def __init__(self, num_classes: int = 400, width: float = 1.0) -> None:
        super().__init__()

        def c(n: int) -> int:
            return n if width == 1.0 else max(2, round(n * width))

        self.Conv3d_1a_7x7 = Unit3D(3, c(64), (7, 7, 7), (2, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(c(64), c(64))
        self.Conv3d_2c_3x3 = Unit3D(c(64), c(192), (3, 3, 3))
        for name, (kernel, stride) in _I3D_POOLS.items():
            setattr(self, name, MaxPool3dSame(kernel, stride))
        cin = c(192)
        for name, chans in _I3D_MIXED.items():
            module = InceptionModule(cin, [c(n) for n in chans])
            setattr(self, name, module)
            cin = module.out_channels
        self.avg_pool = nn.AvgPool3d((2, 7, 7), stride=(1, 1, 1))
        self.dropout = nn.Dropout(0.5)
        self.logits = Unit3D(cin, num_classes, relu=False, batch_norm=False, bias=True)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        x = x_BCTHW
        for name in _I3D_ORDER:
            x = getattr(self, name)(x)
        x = self.logits(self.dropout(self.avg_pool(x)))
        return x.mean(dim=(2, 3, 4))


# ----------------------------------------------------------------------------- 3-D ResNet
class Bottleneck3D(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(cin, planes, 1, bias=False), nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.conv3, self.bn3 = nn.Conv3d(planes, planes * 4, 1, bias=False), nn.BatchNorm3d(planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet3D(nn.Module):
    """3-D ResNet (Bottleneck, shortcut B): [B, 3, T, 112, 112] (0..255 minus R3D_MEAN) -> [B, 4 * planes[-1]]
    pooled features. Names as 3D-ResNets-PyTorch's resnet.py (fc kept so its files load strictly)."""

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        planes: Sequence[int] = (64, 128, 256, 512),
        stem: int = 64,
        num_classes: int = 400,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, stem, 7, stride=(1, 2, 2), padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(stem)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        cin = stem
        for i, (num, p) in enumerate(zip(layers, planes)):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or cin != p * 4:
                down = nn.Sequential(nn.Conv3d(cin, p * 4, 1, stride=stride, bias=False), nn.BatchNorm3d(p * 4))
            blocks = [Bottleneck3D(cin, p, stride, down)] + [Bottleneck3D(p * 4, p) for _ in range(num - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            cin = p * 4
        self.fc = nn.Linear(cin, num_classes)  # unused: features are taken before it (last_fc=False)

    def forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x_BCTHW))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        # = the original AvgPool3d((ceil(T/16), ceil(S/32), ceil(S/32))) for 16 x 112 x 112 inputs
        return x.mean(dim=(2, 3, 4))


# --------------------------------------------------------------------------------- loading
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a checkpoint that pickles objects is code: refuse it
            raise ValueError(
                f"{path}: not a plain tensor checkpoint ({exc}); save its state dict as .safetensors"
            ) from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds {type(state).__name__}, not a state dict")  # noqa: TRY004 - bad file content, named
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _fit(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load every parameter and buffer of ``module`` from ``state`` or fail naming the keys (old
    files lack BatchNorm's num_batches_tracked, which is only a training counter)."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path}: does not fit {type(module).__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}"
        )
    module.load_state_dict({k: state[k] for k in own if k in state}, strict=False)


def _tiny_init(module: nn.Module) -> None:
    # He init keeps activations at a useful scale through the random stack (BatchNorm is identity in eval)
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def tiny_lpips(backbone: str = "alex", seed: int = 0) -> LPIPS:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = LPIPS(backbone, channels=(8, 8, 16, 16, 16))
        _tiny_init(net)
        for lin in net.lins:  # trained heads are non-negative (a distance)
            lin.weight.data.abs_()
    return net.eval()


def tiny_i3d(seed: int = 0) -> InceptionI3d:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        net = InceptionI3d(400, width=1 / 16)
        _tiny_init(net)
    return net.eval()


def tiny_resnet3d(seed: int = 0) -> ResNet3D:
    # one block per stage; the last stage keeps 512 planes so the features are 2048-d as the real ones
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 2)
        net = ResNet3D(layers=(1, 1, 1, 1), planes=(4, 8, 16, 512), stem=4)
        _tiny_init(net)
    return net.eval()


@dataclass
class EvalNets:
    """The three networks of a protocol and what they are (``describe()`` goes into every result)."""

    lpips: LPIPS
    fvd: InceptionI3d
    fid_vid: ResNet3D
    lpips_name: str
    fvd_name: str
    fid_vid_name: str
    tiny: bool

    def describe(self) -> str:
        return f"lpips: {self.lpips_name}; fvd: {self.fvd_name}; fid-vid: {self.fid_vid_name}"

    def to(self, device: str | torch.device) -> EvalNets:
        for net in (self.lpips, self.fvd, self.fid_vid):
            net.to(device)
        return self


def load_eval_networks(cfg: EvalNetworks, protocol: Protocol = Protocol()) -> EvalNets:
    """The protocol's networks from ``cfg``'s local files (None: tiny random, seeded by cfg.tiny_seed).
    Every missing file is named in one ValueError, with where to get it."""
    backbone = protocol.lpips_backbone
    wanted = [
        (cfg.lpips_backbone_path, "lpips_backbone_path", WHERE[backbone]),
        (cfg.lpips_heads_path, "lpips_heads_path", WHERE["heads"]),
        (cfg.fvd_path, "fvd_path", WHERE["i3d"]),
        (cfg.fid_vid_path, "fid_vid_path", WHERE["r3d"]),
    ]
    missing = [
        f"{key}={path} (get it from {where})"
        for path, key, where in wanted
        if path is not None and not Path(path).is_file()
    ]
    if missing:
        raise ValueError("evaluation network file(s) missing (nothing is downloaded): " + "; ".join(missing))
    seed = cfg.tiny_seed
    tiny_name = f"tiny random (seed {seed})"

    if cfg.lpips_backbone_path is None:
        lpips, lpips_name = tiny_lpips(backbone, seed), f"{backbone} {tiny_name}"
    else:
        lpips = LPIPS(backbone)
        b_path, h_path = Path(cfg.lpips_backbone_path), Path(cfg.lpips_heads_path)
        b_state = {k: v for k, v in _read_state(b_path).items() if k.startswith("features.")}
        _fit(lpips.features, {k.removeprefix("features."): v for k, v in b_state.items()}, b_path)
        # lpips' heads: linK.model.1.weight (model.0 is a Dropout)
        h_state = {f"{k[3]}.weight": v for k, v in _read_state(h_path).items() if k.startswith("lin")}
        _fit(lpips.lins, h_state, h_path)
        lpips_name = f"{backbone} sha256:{file_sha256(b_path)[:12]} heads sha256:{file_sha256(h_path)[:12]}"
    if cfg.fvd_path is None:
        fvd, fvd_name = tiny_i3d(seed), f"{protocol.fvd_network} {tiny_name}"
    else:
        fvd = InceptionI3d(400)
        _fit(fvd, _read_state(Path(cfg.fvd_path)), Path(cfg.fvd_path))
        fvd_name = f"{protocol.fvd_network} sha256:{file_sha256(Path(cfg.fvd_path))[:12]}"
    if cfg.fid_vid_path is None:
        fid_vid, fid_vid_name = tiny_resnet3d(seed), f"{protocol.fid_vid_network} {tiny_name}"
    else:
        fid_vid = ResNet3D()
        _fit(fid_vid, _read_state(Path(cfg.fid_vid_path)), Path(cfg.fid_vid_path))
        fid_vid_name = f"{protocol.fid_vid_network} sha256:{file_sha256(Path(cfg.fid_vid_path))[:12]}"
    return EvalNets(lpips.eval(), fvd.eval(), fid_vid.eval(), lpips_name, fvd_name, fid_vid_name, cfg.tiny)


# ------------------------------------------------------------------ appearance (swap rate)
class ImageEncoderAppearance:
    """Appearance features from the profile's image encoder (a transformers CLIPVisionModel, the
    Wan image encoder): crops uint8 [N, S, S, 3] -> unit-norm pooled features [N, D]."""

    def __init__(self, image_encoder: nn.Module, name: str | None = None, batch_size: int = 32) -> None:
        self.encoder = image_encoder.eval()
        cfg = getattr(image_encoder, "config", None)
        size = f"{getattr(cfg, 'hidden_size', '?')}d x {getattr(cfg, 'num_hidden_layers', '?')} layers"
        self.name = f"image-encoder: {name or 'clip-vision ' + size}"
        self.input_size = int(getattr(cfg, "image_size", 224))
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, crops_NHWC: np.ndarray) -> np.ndarray:
        param = next(self.encoder.parameters())
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        out = []
        for i in range(0, len(crops_NHWC), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(crops_NHWC[i : i + self.batch_size])).permute(0, 3, 1, 2)
            x = x.float() / 255.0
            if x.shape[-1] != self.input_size:
                x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
            x = ((x - mean) / std).to(device=param.device, dtype=param.dtype)
            feats = self.encoder(pixel_values=x).pooler_output.float()
            out.append(F.normalize(feats, dim=-1).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 1), np.float32)


def num_parameters(module: nn.Module) -> int:
    return sum(math.prod(p.shape) for p in module.parameters())
