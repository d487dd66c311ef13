"""How good is the student: per-token cosine to the teacher on held-out tiles, and kNN / linear-probe accuracy of
its features on labelled images (single-object shapes images, labelled by the object's colour or shape), next to the
teacher's on the same images.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.nn import functional as F

from ivl.data.shapes import COLORS, SHAPES, make_sample
from ivl.distill.data import collate
from ivl.distill.losses import LossConfig, distill_loss, token_cosines
from ivl.distill.models import hidden_states
from ivl.distill.options import ProbeConfig
from ivl.image import image_to_tiles, normalize


def probe_set(split: str, count: int, tile_size: int, label: str, first_index: int = 0) -> tuple[Tensor, Tensor]:
    """(uint8 tiles [count, 3, S, S], labels [count]) from the first `count` single-object shapes images of `split`
    from sample `first_index` on.

    Each tile is the object's quadrant of a 2S x 2S image, so the object covers a good part of the tile (in a whole
    image it is a few percent of the pixels, and mean-pooled features mostly describe the background).
    """
    classes = list(COLORS) if label == "color" else list(SHAPES)
    tiles, labels, index = [], [], first_index
    while len(tiles) < count:
        sample = make_sample(split, index, 2 * tile_size, 2 * tile_size)
        index += 1
        if len(sample.objects) != 1:
            continue
        obj = sample.objects[0]
        left, top = (obj.quadrant % 2) * tile_size, (obj.quadrant // 2) * tile_size
        quadrant = sample.image.crop((left, top, left + tile_size, top + tile_size))
        tiles.append(image_to_tiles(quadrant, max_tiles=1, tile_size=tile_size)[0])
        labels.append(classes.index(getattr(obj, label)))
    return torch.stack(tiles), torch.tensor(labels)


@torch.no_grad()
def pooled_features(model: nn.Module, tiles: Tensor, layer: int, batch_size: int, device) -> Tensor:
    """Mean over patch tokens of `layer`'s hidden state: [n, width] (fp32, on the CPU)."""
    out = []
    for start in range(0, len(tiles), batch_size):
        pixels = normalize(tiles[start : start + batch_size].to(device))
        out.append(hidden_states(model, pixels, [layer])[layer][:, 1:].float().mean(dim=1).cpu())
    return torch.cat(out)


def knn_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, k: int) -> float:
    """Cosine kNN: each test point takes the class with the largest summed similarity among its k neighbours."""
    similarity = F.normalize(test_x, dim=-1) @ F.normalize(train_x, dim=-1).T  # [test, train]
    values, neighbours = similarity.topk(min(k, len(train_x)), dim=-1)
    votes = torch.zeros(len(test_x), int(train_y.max()) + 1).scatter_add_(1, train_y[neighbours], values)
    return (votes.argmax(dim=-1) == test_y).float().mean().item()


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, steps: int) -> float:
    """Logistic regression on standardised features (L-BFGS, weight decay 1e-3); deterministic."""
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(train_y.max()) + 1
    weight = torch.zeros(train_x.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(train_x @ weight + bias, train_y) + 1e-3 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return ((test_x @ weight + bias).argmax(dim=-1) == test_y).float().mean().item()


def probe_accuracies(features: dict[str, tuple[Tensor, Tensor]], labels: tuple[Tensor, Tensor], config: ProbeConfig):
    """{name_knn, name_linear_probe} for each name's (train, test) features."""
    results = {}
    for name, (train_x, test_x) in features.items():
        results[f"{name}_knn"] = knn_accuracy(train_x, labels[0], test_x, labels[1], config.k)
        results[f"{name}_linear_probe"] = linear_probe_accuracy(train_x, labels[0], test_x, labels[1],
                                                                config.probe_steps)  # fmt: skip
    return results


@torch.no_grad()
def heldout_cosine(model: nn.Module, dataset, targets_fn, loss: LossConfig, accelerator: Accelerator,
                   batch_size: int) -> dict[str, float]:  # fmt: skip
    """Held-out loss and mean per-token cosine (patch tokens, CLS) of the adapted student to the teacher, averaged
    over tiles and layer pairs. `model` is a `StudentWithAdaptors` (maybe DDP-wrapped); each process takes every
    num_processes-th tile and the sums are reduced."""
    device = accelerator.device
    sums = torch.zeros(5, device=device, dtype=torch.float64)  # loss, patch cos, patch tokens, cls cos, tiles
    indices = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    was_training = model.training
    model.eval()
    for start in range(0, len(indices), batch_size):
        batch = collate([dataset[i] for i in indices[start : start + batch_size]])
        pixels = normalize(batch["pixels"].to(device))
        targets, token_index = targets_fn(batch, pixels)
        with accelerator.autocast():
            states = model(pixels)
        sums[0] += distill_loss(states, targets, token_index, loss).sum()
        for student, target in zip(states, targets, strict=True):
            patch, cls = token_cosines(student, target["patch"], target["cls"], token_index)
            sums[1] += patch.sum() / len(states)
            sums[2] += target["patch"].shape[0] * target["patch"].shape[1] / len(states)
            sums[3] += cls.sum() / len(states)
        sums[4] += len(pixels)
    model.train(was_training)
    sums = accelerator.reduce(sums, "sum")
    return {
        "eval_loss": (sums[0] / sums[4]).item(),
        "eval_cosine_patch": (sums[1] / sums[2]).item(),
        "eval_cosine_cls": (sums[3] / sums[4]).item(),
    }
