"""The attribute reader of the embedded world: a small CNN with one head per attribute (colour,
shape, background, rare concept) trained on freshly rendered real images of the world.

It is trained on images from seeds that the training set never uses, with mild noise and blur so it
reads slightly imperfect generations too, and it is checked on another held-out seed; the accuracy on
held-out real images is stored with the weights and printed by the fidelity benchmark.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffusion_attribution.data.shapes import ShapesWorldConfig, generate_world

log = logging.getLogger(__name__)

NONE_CONCEPT = "none"


class AttributeReader(nn.Module):
    def __init__(self, heads: dict[str, list[str]]) -> None:
        super().__init__()
        self.heads = heads

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(3, 32), block(32, 32), nn.MaxPool2d(2), block(32, 64), block(64, 64), nn.MaxPool2d(2),
            block(64, 96), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
        )  # fmt: skip
        self.classifiers = nn.ModuleDict(
            {name: nn.Linear(96 * 4, len(labels)) for name, labels in heads.items()}
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images in [-1, 1], [B, 3, H, W] -> logits per head."""
        if images.shape[-1] != 32:
            images = nn.functional.interpolate(images, size=(32, 32), mode="bilinear", antialias=True)
        h = self.features(images)
        return {name: head(h) for name, head in self.classifiers.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor, batch_size: int = 256) -> list[dict[str, str]]:
        self.eval()
        out: list[dict[str, str]] = []
        for start in range(0, len(images), batch_size):
            logits = self(images[start : start + batch_size].float())
            preds = {name: logit.argmax(-1).tolist() for name, logit in logits.items()}
            for k in range(len(next(iter(preds.values())))):
                out.append({name: self.heads[name][preds[name][k]] for name in self.heads})
        return out


def _labels(records: list[dict], heads: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    def value(rec: dict, name: str) -> str:
        v = rec.get(name)
        return NONE_CONCEPT if (name == "concept" and not v) else v

    return {
        name: torch.tensor([labels.index(value(r, name)) for r in records]) for name, labels in heads.items()
    }


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise_scale = torch.rand(x.shape[0], 1, 1, 1, generator=generator) * 0.15
    x = x + noise_scale * torch.randn(x.shape, generator=generator)
    blur = torch.rand(x.shape[0], generator=generator) < 0.3
    if blur.any():
        kernel = torch.tensor([1.0, 2.0, 1.0]) / 4
        k2 = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
        x[blur] = nn.functional.conv2d(x[blur], k2, padding=1, groups=3)
    return x.clamp(-1.2, 1.2)


def reader_world(world: ShapesWorldConfig, seed: int, size: int) -> ShapesWorldConfig:
    """A world with the same vocabulary, other seed, and rare concepts as common as plain objects."""
    per_concept = max(1, size // (2 * max(1, len(world.rare_concepts))))
    return replace(world, seed=seed, num_common=size // 2, images_per_rare_concept=per_concept)


def train_attribute_reader(
    world: ShapesWorldConfig,
    train_size: int = 6000,
    test_size: int = 3000,
    epochs: int = 4,
    seed: int = 12345,
) -> tuple[AttributeReader, dict[str, float]]:
    torch.manual_seed(seed)
    heads = {
        "colour": list(world.colours),
        "shape": list(world.shapes),
        "background": list(world.backgrounds),
        "concept": [NONE_CONCEPT, *world.rare_concepts],
    }
    train_images, train_records = generate_world(reader_world(world, seed, train_size))
    test_images, test_records = generate_world(reader_world(world, seed + 1, test_size))
    x, y = _to_tensor(train_images), _labels(train_records, heads)
    reader = AttributeReader(heads)
    optimizer = torch.optim.AdamW(reader.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(x) // 128)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    reader.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - 127, 128):
            idx = order[start : start + 128]
            logits = reader(_augment(x[idx], generator))
            loss = sum(nn.functional.cross_entropy(logits[n], y[n][idx]) for n in heads)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    accuracy = evaluate_reader(reader, _to_tensor(test_images), _labels(test_records, heads))
    return reader, accuracy


@torch.no_grad()
def evaluate_reader(reader: AttributeReader, x: torch.Tensor, y: dict[str, torch.Tensor]) -> dict[str, float]:
    reader.eval()
    logits = {n: torch.cat([reader(x[s : s + 512])[n] for s in range(0, len(x), 512)]) for n in reader.heads}
    return {n: float((logits[n].argmax(-1) == y[n]).float().mean()) for n in reader.heads}


def load_or_train_reader(
    world: ShapesWorldConfig, cache_dir: str | Path
) -> tuple[AttributeReader, dict[str, float]]:
    """The reader for this world's vocabulary, trained once and cached (safetensors + JSON)."""
    vocab_key = replace(world, seed=0, num_common=0, images_per_rare_concept=0).fingerprint()
    recipe = inspect.signature(train_attribute_reader).parameters
    recipe_key = "-".join(str(recipe[k].default) for k in ("train_size", "test_size", "epochs", "seed"))
    root = Path(cache_dir) / f"attribute-reader-{vocab_key}-{recipe_key}"
    weights, meta = root / "reader.safetensors", root / "reader.json"
    if weights.is_file() and meta.is_file():
        info = json.loads(meta.read_text())
        reader = AttributeReader(info["heads"])
        reader.load_state_dict(load_file(weights))
        return reader.eval(), info["heldout_accuracy"]
    log.info("Training the attribute reader for this world (once; cached in %s)", root)
    reader, accuracy = train_attribute_reader(world)
    root.mkdir(parents=True, exist_ok=True)
    save_file(reader.state_dict(), weights)
    meta.write_text(json.dumps({"heads": reader.heads, "heldout_accuracy": accuracy}, indent=2))
    log.info("Attribute reader held-out accuracy: %s", accuracy)
    return reader.eval(), accuracy
