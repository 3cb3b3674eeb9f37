"""Make a BottleFit head fully int8-friendly before export, exactly.

Two rewrites, both exact in real arithmetic (float32 rounding leaves ~1e-6):
- Conv2d followed by BatchNorm2d → one Conv2d with the BN folded into weight and bias;
- a stand-alone BatchNorm2d (the one after the max-pool, which no conv precedes) → a 1x1 depthwise Conv2d with
  ``weight = gamma / sqrt(var + eps)`` and ``bias = beta - mean * weight``. Quantizers and converters take a
  conv; a bare BN is left as a float island (litert-torch) or runs slower than fp32 (ORT), see shared/STACK.md.

The rewritten head is an ``nn.Sequential`` whose children are named "0", "1", …; ``origin`` maps each child
name to the original PyTorch module paths it came from, so reports can name the layer the user knows.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

import torch
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
            m = re.search(r"_(\d+)$", last)
            if m and "/" in part:
                for p in self.origin_of(m.group(1)):
                    if p not in found:
                        found.append(p)
        return found


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) of an eval-mode BN, computed in float64 so the fold adds no rounding."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("BatchNorm2d without running statistics cannot be folded")
    var = bn.running_var.detach().double()
    mean = bn.running_mean.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    return scale, beta - mean * scale


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    scale, shift = _bn_affine(bn)
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
    scale, shift = _bn_affine(bn)
    c = bn.num_features
    out = nn.Conv2d(c, c, kernel_size=1, groups=c, bias=True)
    with torch.no_grad():
        out.weight.copy_(scale.view(c, 1, 1, 1).float())
        out.bias.copy_(shift.float())
    return out.eval()


def rewrite_head(head: nn.Module, prefix: str, proof_input: torch.Tensor | None = None) -> RewrittenHead:
    """The rewritten copy of ``head`` (the original is not touched).

    ``prefix`` is the head's module path in the full model (``card.bottleneck.module``). With ``proof_input``
    the result records the max abs error of rewritten vs original on it.
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
