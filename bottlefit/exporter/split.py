"""Cut a BottleFit model at the bottleneck into a head (device) and a tail (edge server)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import nn

from bottlefit.errors import VerificationError
from bottlefit.models.bottleneck import Dequantizer, Quantizer
from bottlefit.models.card import ModelCard


class Head(nn.Module):
    """The encoder. Its modules keep their position, so ``encoder.N`` is ``<card.bottleneck.module>.N``."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class Tail(nn.Module):
    """The rest of the model, fed with the (float) bottleneck."""

    def __init__(self, rest: nn.Module) -> None:
        super().__init__()
        self.rest = rest

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Decoders may begin with an in-place op; never mutate what the head (or the wire) handed over.
        return self.rest(z.clone())


@dataclass
class SplitModel:
    head: Head
    tail: Tail
    card: ModelCard
    model: nn.Module

    def transmit(self, z: torch.Tensor) -> torch.Tensor:
        """What the tail receives for a head output: the bq quantizer's round trip, or ``z`` itself."""
        if self.card.bottleneck.quantizer == "bq8":
            return Dequantizer(8)(Quantizer(8)(z))
        return z

    def head_module_path(self, local: str) -> str:
        """``encoder.4`` (a path inside ``head``) -> ``bottleneck.encoder.4`` (the model's own path)."""
        prefix = self.card.bottleneck.module
        return prefix + local.removeprefix("encoder") if local.startswith("encoder") else local


def _without(model: nn.Module, path: str) -> nn.Module:
    """A shallow copy of ``model`` whose module at ``path`` is an identity; parameters stay shared."""
    parts = path.split(".")
    root = copy.copy(model)
    root._modules = dict(model._modules)  # noqa: SLF001 — copy the child table, not the children
    node = root
    for name in parts[:-1]:
        child = copy.copy(node._modules[name])
        child._modules = dict(child._modules)
        node._modules[name] = child
        node = child
    node._modules[parts[-1]] = nn.Identity()
    # The bq processors run on the wire (SplitModel.transmit), not inside the tail.
    if hasattr(node, "compressor"):
        node.compressor = None
        node.decompressor = None
    return root


def split(model: nn.Module, card: ModelCard) -> SplitModel:
    model.eval()
    encoder = model.get_submodule(card.bottleneck.module)
    head = Head(encoder).eval()
    tail = Tail(_without(model, card.bottleneck.module)).eval()
    return SplitModel(head, tail, card, model)


def fold_head(sm: SplitModel) -> tuple[SplitModel, list[str]]:
    """``sm`` with its head's stand-alone BatchNorm folded through the max-pool into the stem conv when that is
    exact (``head_rewrite.fold_pool_batchnorm``), and what was folded; ``sm`` itself (and []) otherwise. The tail
    and the model are untouched; an equalization the head carries stays with it. Deterministic, data-free: verify
    re-applies it from the manifest."""
    from bottlefit.exporter.head_rewrite import fold_pool_batchnorm

    res = fold_pool_batchnorm(sm.head.encoder, sm.card.bottleneck.module)
    if res is None:
        return sm, []
    encoder, changes = res
    head = Head(encoder).eval()
    if getattr(sm.head, "equalization", None) is not None:
        head.equalization = sm.head.equalization  # type: ignore[assignment]
    return replace(sm, head=head), changes


@torch.no_grad()
def check_split(sm: SplitModel, x: torch.Tensor, atol: float = 1e-4) -> float:
    """Prove ``tail(transmit(head(x))) == model(x)``; returns the max abs logit difference."""
    full = sm.model(x.clone())
    z = sm.head(x.clone())
    if tuple(z.shape[1:]) != tuple(sm.card.bottleneck.shape):
        raise VerificationError(f"head output shape {tuple(z.shape[1:])} != card {sm.card.bottleneck.shape}")
    z_before = z.clone()
    out = sm.tail(sm.transmit(z))
    if not torch.equal(z, z_before):
        raise VerificationError("the tail mutated the head's output in place")
    err = float((out - full).abs().max())
    scale = float(full.abs().max()) or 1.0
    if err > atol * max(1.0, scale):
        raise VerificationError(f"split check failed: max |tail(head(x)) - model(x)| = {err:.3g}")
    return err
