"""Make a BottleFit head fully int8-friendly before export, exactly.

Rewrites, all exact in real arithmetic (float32 rounding leaves ~1e-6):
- Conv2d followed by BatchNorm2d → one Conv2d with the BN folded into weight and bias;
- a stand-alone BatchNorm2d (the one after the max-pool, which no conv precedes) → a 1x1 depthwise Conv2d with
  ``weight = gamma / sqrt(var + eps)`` and ``bias = beta - mean * weight``. Quantizers and converters take a
  conv; a bare BN is left as a float island (litert-torch) or runs slower than fp32 (ORT), see docs/tensorrt.md;
- optional (``space_to_depth=True``): the stem, a stride-2 conv over few input channels (7x7 over RGB), → a 2x2
  space-to-depth of its input and a stride-1 conv over 4x the channels (4x4 over 12: the 7x7 kernel zero-padded
  to 8x8 and regrouped; ``SpaceToDepthConv``). It trades MACs (192 taps instead of 147) for kernel shape: XNNPACK's
  int8 igemm pads each tap's 3 channels to its 8-channel block, and over 12 channels its Cortex-A72 cost halved,
  while the MAC-bound kernels (ONNX Runtime, TFLite built-in) cost more (bottlefit/targets/rpi/profiles.py has
  the figures). So it is a switch, used where a target measured it cheaper.

The rewritten head is an ``nn.Sequential`` whose children are named "0", "1", …; ``origin`` maps each child
name to the original PyTorch module paths it came from, so reports can name the layer the user knows.
"""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RewrittenHead:
    module: nn.Sequential  # eval mode, no in-place ops
    origin: dict[str, list[str]]  # child name -> original module paths, e.g. {"0": ["bottleneck.encoder.0", ...]}
    changes: list[str] = field(default_factory=list)  # what was rewritten, in words
    max_abs_error: float | None = None  # |rewritten(x) - original(x)| on the proof batch

    def origin_of(self, child: str) -> list[str]:
        return self.origin.get(child, [])

    def origin_of_tensor(self, tensor_name: str) -> list[str]:
        """Original module paths for a converter tensor name.

        litert-torch names tensors by module path, e.g. ``…Sequential/torch.nn.modules.conv.Conv2d_3;1``:
        the class name, an underscore and the child name. Fused tensors list several, separated by ';'.
        """
        found: list[str] = []
        for part in tensor_name.split(";"):
            last = part.rsplit("/", 1)[-1]
            comps = part.split("/")
            # the child of the rewritten Sequential; a nested module (SpaceToDepthConv's conv) is named after it
            roots = [i for i, c in enumerate(comps[:-1]) if c.endswith("Sequential")]
            m = re.search(r"_(\d+)$", comps[roots[-1] + 1] if roots else last)
            if m and "/" in part:
                for p in self.origin_of(m.group(1)):
                    if p not in found:
                        found.append(p)
        return found


def batchnorm_affine(gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray,
                     eps: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (scale, shift) of an inference BatchNorm, ``scale = gamma / sqrt(var + eps)``, ``shift = beta -
    mean * scale``, in float64 so a fold adds no rounding. The one formula of every BatchNorm rewrite: the PyTorch
    modules' here, the ONNX graph's in qdq.rewrite_standalone_batchnorm."""
    gamma, beta, mean, var = (np.asarray(a, np.float64) for a in (gamma, beta, mean, var))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``batchnorm_affine`` of an eval-mode BN module, as float64 tensors."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm2d without running statistics cannot be folded")
    var = bn.running_var.detach().double().numpy()
    mean = bn.running_mean.detach().double().numpy()
    gamma = bn.weight.detach().double().numpy() if bn.weight is not None else np.ones_like(var)
    beta = bn.bias.detach().double().numpy() if bn.bias is not None else np.zeros_like(var)
    scale, shift = batchnorm_affine(gamma, beta, mean, var, bn.eps)
    return torch.from_numpy(scale), torch.from_numpy(shift)


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale, shift = bn_affine(bn)
    out = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
    )  # fmt: skip
    w = conv.weight.detach().double() * scale.view(-1, 1, 1, 1)
    b0 = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(scale)
    with torch.no_grad():
        out.weight.copy_(w.float())
        out.bias.copy_((b0 * scale + shift).float())
    return out.eval()


def bn_as_depthwise(bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale, shift = bn_affine(bn)
    c = bn.num_features
    out = nn.Conv2d(c, c, kernel_size=1, groups=c, bias=True)
    with torch.no_grad():
        out.weight.copy_(scale.view(c, 1, 1, 1).float())
        out.bias.copy_(shift.float())
    return out.eval()


def fold_pool_batchnorm(encoder: nn.Module, prefix: str = "") -> tuple[nn.Sequential, list[str]] | None:
    """Conv → [BN] → ReLU → MaxPool → BN → ReLU as Conv' → ReLU → MaxPool, exactly, when the second BN's scale
    ``a`` is > 0 and its shift ``b`` is <= 0 on every channel; None when the pattern or the condition is absent.

    Why it is exact: ``u ↦ ReLU(a·u + b)`` is non-decreasing for ``a > 0``, so it commutes with max-pooling (which
    pads with -inf); and for ``b <= 0``, ``ReLU(a·ReLU(z) + b) = ReLU(a·z + b)``. So the BN and both ReLUs fold into
    the stem conv, whose output the max-pool then reads. Why: the stand-alone BN was a layer of its own in every
    int8 head (one more requantization, one more op on the device; it is the identity in an untrained model). It
    holds for BottleFit's encoders with identity or trained BNs whose shifts are <= 0 (the trained demo's is).

    Child names are kept ("0", "2", "3", "6"), so module paths (``encoder.6``) still name the model's modules; the
    folded conv is named after the stem conv."""
    if not isinstance(encoder, nn.Sequential):
        return None
    items = list(encoder.named_children())
    for i, (name, conv) in enumerate(items):
        if not isinstance(conv, nn.Conv2d):
            continue
        j = i + 1
        bn1 = items[j][1] if j < len(items) and isinstance(items[j][1], nn.BatchNorm2d) else None
        j += bn1 is not None
        kinds = (nn.ReLU, nn.MaxPool2d, nn.BatchNorm2d, nn.ReLU)
        rest = items[j:j + 4]
        if len(rest) < 4 or not all(isinstance(m, k) for (_, m), k in zip(rest, kinds, strict=True)):
            return None  # only the stem is considered
        pool, bn2 = rest[1][1], rest[2][1]
        if getattr(pool, "return_indices", False):
            return None
        a, b = bn_affine(bn2)  # type: ignore[arg-type]
        if not (bool((a > 0).all()) and bool((b <= 0).all())):
            return None
        s1, t1 = bn_affine(bn1) if bn1 is not None else (torch.ones_like(a), torch.zeros_like(a))
        b0 = conv.bias.detach().double() if conv.bias is not None else torch.zeros_like(a)
        new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode)
        with torch.no_grad():
            new.weight.copy_((conv.weight.detach().double() * (s1 * a).view(-1, 1, 1, 1)).float())
            new.bias.copy_(((b0 * s1 + t1) * a + b).float())
        relu = nn.ReLU()
        children: list[tuple[str, nn.Module]] = [(n, copy.deepcopy(m)) for n, m in items[:i]]
        children += [(name, new.eval()), (rest[0][0], relu), (rest[1][0], copy.deepcopy(pool))]
        children += [(n, copy.deepcopy(m)) for n, m in items[j + 4:]]
        out = nn.Sequential(OrderedDict(children)).eval()
        for p in out.parameters():
            p.requires_grad_(False)
        def path(n: str) -> str:
            return f"{prefix}.{n}" if prefix else n

        folded = [path(n) for n in ([items[i + 1][0]] if bn1 is not None else []) + [rest[2][0], rest[3][0]]]
        return out, [f"folded {', '.join(folded)} into {path(name)} (ahead of the max-pool {path(rest[1][0])}: "
                     f"exact, the BN's scales > 0 and shifts <= 0)"]
    return None


class SpaceToDepthConv(nn.Module):
    """A stride-2 Conv2d (groups 1, zero padding) as the exact stride-1 conv over a 2x2 space-to-depth of its input.

    With ``out[y] = sum_k w[k] in[2y + k - p]``: front-pad the kernel with ``f = p % 2`` zeros and round its length
    up to even (``2A``), so the tap ``k' = k + f = 2a + b`` reads space-to-depth row ``y - P + a``, phase ``b``,
    with ``P = (p + f) / 2``. The space-to-depth is ``F.pixel_unshuffle(x, 2)`` (channel ``c*4 + by*2 + bx``); the
    new conv has ``4C`` input channels, an ``A x A`` kernel and ``P`` rows of zeros before; the rows after follow
    from the input size (one for a 224 input and a 7x7, pad 3 conv), so a pad precedes the conv when they differ.
    Needs an even input height and width (checked when called).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not space_to_depth_applies(conv):
            raise ValueError(f"SpaceToDepthConv takes a stride-2, groups-1, zero-padded Conv2d, not {conv}")
        w = conv.weight.detach().double()
        o, c, kh, kw = w.shape
        ph, pw = conv.padding  # type: ignore[misc]
        fh, fw = ph % 2, pw % 2
        ah, aw = (kh + fh + 1) // 2, (kw + fw + 1) // 2
        w2 = torch.zeros(o, c, 2 * ah, 2 * aw, dtype=torch.float64)
        w2[:, :, fh : fh + kh, fw : fw + kw] = w
        w4 = w2.view(o, c, ah, 2, aw, 2).permute(0, 1, 3, 5, 2, 4).reshape(o, 4 * c, ah, aw)
        self.before = ((ph + fh) // 2, (pw + fw) // 2)
        self.geometry = (conv.kernel_size, conv.padding)  # the original's: its output size is reproduced
        self.conv = nn.Conv2d(4 * c, o, (ah, aw), 1, 0, bias=conv.bias is not None)
        with torch.no_grad():
            self.conv.weight.copy_(w4.float())
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias.detach())
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if h % 2 or w % 2:
            raise ValueError(f"SpaceToDepthConv needs an even input height and width, got {h}x{w}")
        (kh, kw), (ph, pw) = self.geometry
        ah, aw = self.conv.kernel_size
        pads = []
        for size, k, p, a, before in ((w, kw, pw, aw, self.before[1]), (h, kh, ph, ah, self.before[0])):
            out = (size + 2 * p - k) // 2 + 1  # the original conv's output size
            pads += [before, out - 1 - before + a - 1 - (size // 2 - 1)]  # rows after: may be <= 0 (F.pad crops)
        x = F.pixel_unshuffle(x, 2)
        if pads[0] == pads[1] == pads[2] == pads[3] and pads[0] >= 0:
            return F.conv2d(x, self.conv.weight, self.conv.bias, 1, pads[0])
        return self.conv(F.pad(x, pads))


def space_to_depth_applies(conv: nn.Module, max_in_channels: int = 4) -> bool:
    """Whether ``conv`` is a stem SpaceToDepthConv can take: stride 2, groups 1, zero padding, dilation 1, and few
    input channels (the case where per-tap channel blocks waste lanes)."""
    return (isinstance(conv, nn.Conv2d) and conv.stride == (2, 2) and conv.groups == 1 and conv.dilation == (1, 1)
            and conv.padding_mode == "zeros" and isinstance(conv.padding, tuple)
            and conv.in_channels <= max_in_channels)


def rewrite_head(head: nn.Module, prefix: str, proof_input: torch.Tensor | None = None, *,
                 space_to_depth: bool = False) -> RewrittenHead:
    """The rewritten copy of ``head`` (the original is not touched).

    ``prefix`` is the head's module path in the full model (``card.bottleneck.module``). With ``proof_input``
    the result records the max abs error of rewritten vs original on it. ``space_to_depth``: the first conv, when
    ``space_to_depth_applies``, becomes a ``SpaceToDepthConv`` (after its BatchNorm is folded).
    """
    if not isinstance(head, nn.Sequential):
        raise TypeError(f"expected the head as nn.Sequential, got {type(head).__name__}")
    items = list(head.named_children())
    layers: list[nn.Module] = []
    origin: dict[str, list[str]] = {}
    changes: list[str] = []
    i = 0
    while i < len(items):
        name, mod = items[i]
        path = f"{prefix}.{name}" if prefix else name
        nxt = items[i + 1] if i + 1 < len(items) else None
        if isinstance(mod, nn.Conv2d) and nxt is not None and isinstance(nxt[1], nn.BatchNorm2d):
            new: nn.Module = fold_conv_bn(mod, nxt[1])
            paths = [path, f"{prefix}.{nxt[0]}" if prefix else nxt[0]]
            changes.append(f"folded {paths[1]} into {paths[0]}")
            i += 2
        elif isinstance(mod, nn.BatchNorm2d):
            new, paths = bn_as_depthwise(mod), [path]
            changes.append(f"{path}: stand-alone BatchNorm2d -> 1x1 depthwise Conv2d")
            i += 1
        else:
            new = copy.deepcopy(mod)
            if isinstance(new, nn.ReLU):
                new.inplace = False  # in-place ops complicate export graphs and would mutate a caller's tensor
            paths = [path]
            i += 1
        if space_to_depth and not layers and isinstance(new, nn.Conv2d) and space_to_depth_applies(new):
            k, c = new.kernel_size, new.in_channels
            new = SpaceToDepthConv(new)
            a = new.conv.kernel_size
            changes.append(f"{paths[0]}: {k[0]}x{k[1]} stride-2 conv over {c} channels -> 2x2 space-to-depth "
                           f"+ {a[0]}x{a[1]} stride-1 conv over {4 * c} channels")
        origin[str(len(layers))] = paths
        layers.append(new)
    out = nn.Sequential(*layers).eval()
    for p in out.parameters():
        p.requires_grad_(False)
    result = RewrittenHead(out, origin, changes)
    if proof_input is not None:
        result.max_abs_error = equivalence_error(head, out, proof_input)
    return result


@torch.no_grad()
def equivalence_error(original: nn.Module, rewritten: nn.Module, x: torch.Tensor) -> float:
    was_training = original.training
    original.eval()
    try:
        # clone: the original head may hold in-place ReLUs
        ref = original(x.clone())
        got = rewritten(x.clone())
    finally:
        original.train(was_training)
    return float((ref - got).abs().max())
