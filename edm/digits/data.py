"""The digits of `sklearn.datasets.load_digits` (1,797 images, 8×8, 17 grey levels, 10 classes; shipped
with scikit-learn, no download) as 16×16 uint8 images, split once into four disjoint roles (`ROLES`):

* `generator` (1,000): the only images the base, θ_s's control and the diagnose train or read;
* `features` (300): the only images the feature network (the classifier) trains on;
* `reference` (297): the statistics every FID is measured against, and precision/recall's real side;
* `real` (200): the `real` row, scored like a model: images from the same distribution that no network
  trained on, at the report's n (so the report's n is at most this).

Nothing that is judged (samples, the real row, the reference) was seen by the feature network, and
neither the reference nor the real row by the generator: the real row is a floor that real data must
reach, not a set the features flatter. The generator keeps the largest share because its quality is
what the experiment is about; 300 images train a classifier of 97.7 % accuracy on unseen digits.

16×16 rather than 32×32: the source has 8×8 pixels, so 32×32 adds no information, and 16×16 is the
smallest size at which the U-Net keeps three resolution levels (16, 8, 4) while costing a quarter of
32×32's compute, which is what lets a base train from scratch on 2 CPU cores within the demo's budget.

`write_set` stores images in the synthetic-set layout (DESIGN.md "Synthetic set") so that
`neon.finetune.run` trains on real images exactly as it trains on S: the base from scratch and the
matched-compute controls.
"""

import os

import numpy as np
import torch
import torch.nn.functional as F

from neon import synthetic
from neon.errors import NeonError
from neon.io import files

SIZE = 16
SPLIT_SEED = 0
ROLES = ("generator", "features", "reference", "real")
SIZES = {"features": 300, "reference": 297, "real": 200}  # the generator's share is the rest: 1,000
NUM_CLASSES = 10


def load(size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images uint8 [N, 3, size, size] (bilinear upsampling of the 8×8 originals,
    ink bright on black; three equal channels, the format of every image family's samples), labels
    int64 [N] in [0, 10)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise NeonError("the digits experiment needs scikit-learn: pip install scikit-learn") from None
    digits = load_digits()
    x = torch.from_numpy(digits.images).to(torch.float32)[:, None] / 16  # [N, 1, 8, 8] in [0, 1]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    images = (x * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return images, torch.from_numpy(digits.target).to(torch.int64)


def split(
    size: int = SIZE,
    seed: int = SPLIT_SEED,
    features: int = SIZES["features"],
    reference: int = SIZES["reference"],
    real: int = SIZES["real"],
) -> dict:
    """{role: (images, labels, index)} for each of `ROLES`: a fixed permutation of the 1,797 digits by
    `seed` cut into `features`, `reference` and `real` images, the rest the generator's; `index` (int64)
    says which of `load`'s images a role holds, so the roles are disjoint by construction. Formats as
    in `load`."""
    images, labels = load(size)
    counts = [features, reference, real]
    if min(counts) < 1 or sum(counts) >= len(images):
        raise NeonError(
            f"digits split: features, reference and real need 1 image or more each and leave "
            f"some for the generator, got {counts} of {len(images)}"
        )
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    parts = order.split([features, reference, real, len(images) - sum(counts)])
    return {
        role: (images[index], labels[index], index)
        for role, index in zip(("features", "reference", "real", "generator"), parts)
    }


def split_of(section: dict) -> dict:
    """`split` by a recipe's `data` section (size, split_seed, features, reference, real)."""
    return split(
        section["size"], section["split_seed"], section["features"], section["reference"], section["real"]
    )


def write_set(out: str, images: torch.Tensor, labels: torch.Tensor, family_name: str) -> str:
    """Write real images uint8 [N, C, H, W] with labels int64 [N] as a one-shard set of the
    synthetic-set layout at `out` (seeds are the row numbers), unless a complete one is there.
    Returns `out`."""
    manifest_path = os.path.join(out, synthetic.MANIFEST)
    if os.path.exists(manifest_path):
        return out
    os.makedirs(out, exist_ok=True)
    name = "shard-00000.npz"
    samples = images.permute(0, 2, 3, 1).contiguous().numpy()  # stored channels-last, as S is
    with files.atomic(os.path.join(out, name)) as tmp:
        np.savez(tmp, samples=samples, labels=labels.numpy(), seeds=np.arange(len(images), dtype=np.int64))
    files.write_json(
        manifest_path,
        {
            "family": family_name,
            "base_sha256": None,
            "sampler": None,
            "num": len(images),
            "labels": "real",
            "num_classes": NUM_CLASSES,
            "seed_base": 0,
            "shard_size": len(images),
            "batch_size": len(images),
            "sample_shape": list(samples.shape[1:]),
            "shards": {name: files.sha256(os.path.join(out, name))},
        },
    )
    return out
