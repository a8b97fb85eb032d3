"""Shared fixtures-by-function for the submit tests: generated images, competition files, a small
trained checkpoint (a few SGD steps, so logits are separated and int8/fp16 agreement is meaningful)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import torch

from imat.manifest import ClassMap
from imat.weights import save_weights

# Furniture-style label ids (not 0..K-1) so the mapping back to competition ids is exercised.
LABELS = [3, 7, 12, 20, 31]
SIZE = 32
COLOURS = [(230, 30, 30), (30, 230, 30), (30, 30, 230), (230, 230, 30), (30, 230, 230)]


def make_image(path: Path, cls: int, rng: np.random.Generator) -> None:
    img = np.zeros((40, 48, 3), np.uint8)
    img[:] = COLOURS[cls]
    img = np.clip(img.astype(int) + rng.integers(-25, 25, img.shape), 0, 255).astype(np.uint8)
    cv2.imwrite(str(path), img[..., ::-1])  # RGB -> BGR for OpenCV


def make_kit(root: Path, n_train: int = 40, n_test: int = 15, seed: int = 0) -> dict[str, Path]:
    """Furniture 2018 and Product 2019 style files over the same generated images."""
    rng = np.random.default_rng(seed)
    img = root / "images"
    img.mkdir(parents=True, exist_ok=True)
    train_classes = [i % 5 if i % 8 else 0 for i in range(n_train)]  # class index 0 is the most frequent
    test_classes = [i % 5 for i in range(n_test)]
    for i, c in enumerate(train_classes):
        make_image(img / f"{1000 + i}.jpg", c, rng)
    for i, c in enumerate(test_classes):
        make_image(img / f"{i + 1}.jpg", c, rng)
    furn_train = {
        "images": [{"url": [f"http://x/{1000 + i}.jpg"], "image_id": 1000 + i} for i in range(n_train)],
        "annotations": [{"image_id": 1000 + i, "label_id": LABELS[c]} for i, c in enumerate(train_classes)],
    }
    # the test file lists one id whose image was never downloaded (id 99) and the last one corrupt
    test_ids = [*range(1, n_test + 1), 99]
    (img / f"{n_test}.jpg").write_bytes(b"not a jpeg")
    furn_test = {"images": [{"url": [f"http://x/{i}.jpg"], "image_id": i} for i in test_ids]}
    prod_train = {
        "images": [
            {"id": f"{1000 + i}.jpg", "url": f"http://x/{i}", "class": LABELS[c]}
            for i, c in enumerate(train_classes)
        ]
    }
    prod_test = {"images": [{"id": f"{i}.jpg", "url": f"http://x/{i}"} for i in test_ids]}
    out = {"images": img}
    for name, doc in [
        ("furniture_train", furn_train),
        ("furniture_test", furn_test),
        ("product_train", prod_train),
        ("product_test", prod_test),
    ]:
        p = root / f"{name}.json"
        p.write_text(json.dumps(doc))
        out[name] = p
    truth = {i + 1: LABELS[c] for i, c in enumerate(test_classes)}
    truth[99] = LABELS[0]
    out["truth"] = truth  # type: ignore[assignment]
    out["train_classes"] = train_classes  # type: ignore[assignment]
    return out


def make_checkpoint(
    path: Path,
    images: Path,
    train_classes: list[int],
    steps: int = 100,
    size: int = SIZE,
    crop_pct: float = 1.0,
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5),
    std: tuple[float, float, float] = (0.25, 0.25, 0.25),
    seed: int = 0,
    kind: str | None = None,
) -> Path:
    """resnet10t, 5 classes at 32 px, its classifier trained ``steps`` Adam steps on the
    generated training images (features frozen)."""
    import timm

    from imat.data import build_eval_transform, decode_image

    torch.manual_seed(seed)
    model = timm.create_model("resnet10t", num_classes=5, pretrained=False)
    tf = build_eval_transform(size, mean, std, crop_pct)
    x = torch.stack(
        [tf(image=decode_image(images / f"{1000 + i}.jpg"))["image"] for i in range(len(train_classes))]
    )
    y = torch.tensor(train_classes)
    model.eval()
    with torch.no_grad():  # a linear probe on fixed random features: seconds, yet clearly separated logits
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
    head = model.get_classifier()
    opt = torch.optim.Adam(head.parameters(), lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(head(feats), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    classes = ClassMap.from_labels(LABELS)
    meta = {
        "arch": "resnet10t",
        "num_classes": 5,
        "input_size": size,
        "mean": list(mean),
        "std": list(std),
        "crop_pct": crop_pct,
        "model_kwargs": {},
        "classes": classes.to_dict(),
        **({"kind": kind} if kind else {}),
    }
    save_weights(path, model.state_dict(), meta)
    return path


def make_pool(root: Path, images: Path, train_classes: list[int]) -> Path:
    """A teacher pool folder of two linear-probe resnet10t teachers that prepare images differently
    (32 px, crop 1.0, mean 0.5/std 0.25; 24 px, crop 0.875, ImageNet mean/std), with pool.json."""
    pool = root / "teachers"
    specs = [
        ("a32", {"size": 32, "crop_pct": 1.0, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}),
        ("b24", {"size": 24, "crop_pct": 0.875, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}),
    ]
    entries = []
    for i, (name, spec) in enumerate(specs):
        (pool / name).mkdir(parents=True, exist_ok=True)
        make_checkpoint(
            pool / name / "best.safetensors", images, train_classes, seed=i, kind="teacher", **spec
        )
        entries.append(
            {
                "name": name,
                "arch": "resnet10t",
                "num_classes": 5,
                "input_size": spec["size"],
                "mean": list(spec["mean"]),
                "std": list(spec["std"]),
                "crop_pct": spec["crop_pct"],
                "weights": f"{name}/best.safetensors",
            }
        )
    (pool / "pool.json").write_text(
        json.dumps({"version": 1, "teachers": entries, "selected": {"teachers": ["b24"], "method": "mean"}})
    )
    return pool
