"""DINOv2 ViT-L/14 features for FD-DINOv2 (Stein et al., NeurIPS 2023), computed in memory on every rank.

The features are dgm-eval's (`layer6ai-labs/dgm-eval`, `DINOv2Encoder`): each uint8 image is resized
to 224 × 224 with PIL's bicubic filter, scaled to [0, 1] and normalised with ImageNet's mean and std;
the feature is the 1024-d class token after the final norm. The network is timm's
`vit_large_patch14_dinov2.lvd142m` (the weights of `torch.hub`'s `dinov2_vitl14`) built at 224 px:
timm resamples the position embedding once at load time (bicubic), where the hub model interpolates it
at every call, so features can differ from dgm-eval's in the last digits.

Weights come from the Hugging Face hub at first use (rank 0 first, `distributed.main_first`); tests build
the same architecture with random weights (`untrained`). `extract` mirrors `neon.metrics.inception.extract`:
batches dealt to the ranks, features gathered in index order, the same for any world size.
"""

from typing import Iterator

import numpy as np
import torch

from neon import distributed, synthetic
from neon.metrics import inception
from neon.progress import Progress

NAME = "vit_large_patch14_dinov2.lvd142m"  # timm's name of torch.hub's dinov2_vitl14
SIZE = 224  # dgm-eval's input size
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet's, as dgm-eval normalises
DIM = 1024


def build(device: torch.device | str = "cpu", pretrained: bool = True, **overrides) -> torch.nn.Module:
    """timm's DINOv2 ViT-L/14 at 224 px without a head (features = the normed class token), eval mode on
    `device`. `pretrained` downloads the weights (hub cache) on first use; `overrides` change the
    architecture (tests: a small random one of the same kind). Not collective."""
    from timm import create_model

    model = create_model(NAME, pretrained=pretrained, num_classes=0, img_size=SIZE, **overrides)
    return model.eval().requires_grad_(False).to(device)


def untrained(**overrides) -> torch.nn.Module:
    """The same network with random weights (nothing is downloaded): for tests and benchmarks."""
    return build(pretrained=False, **overrides)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """float32 [B,3,224,224] network input of uint8 [B,3,H,W] images (module docstring)."""
    from PIL import Image

    resized = [np.asarray(Image.fromarray(x.permute(1, 2, 0).numpy()).resize((SIZE, SIZE), Image.BICUBIC))
               for x in inception.check(images).cpu()]
    x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@torch.no_grad()
def forward(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """float64 [B, D] features of uint8 [B,3,H,W] images, on the CPU."""
    device = next(model.parameters()).device
    return model(preprocess(images).to(device)).double().cpu()


_cached: dict = {}  # device -> the network, one at a time


def shared() -> torch.nn.Module:
    """The process's network on this rank's device, built (and its weights fetched, rank 0 first) on
    first use and kept. Collective on first use."""
    key = str(distributed.device())
    if key not in _cached:
        with distributed.main_first():
            model = build(distributed.device())
        _cached.clear()
        _cached[key] = model
    return _cached[key]


def features(images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """float64 [B, D] features of uint8 [B,3,H,W] images by the shared network, `batch_size` at a time."""
    model = shared()
    return torch.cat([forward(model, part) for part in inception.check(images).split(batch_size)])


def extract(images, batch_size: int) -> Iterator[Progress]:
    """Collective: the features of every image of `images` (a `neon.metrics.images.Images`), as
    `inception.extract`; the last record's result is {'dinov2': float64 [N, D]}."""
    batches = synthetic.batches(0, len(images), batch_size)
    world, mine = distributed.world(), []
    for j, indices in enumerate(distributed.shard(batches)):
        mine.append((indices.start, features(images.read(indices), batch_size)))
        yield Progress(sum(len(b) for b in batches[:(j + 1) * world]), len(images), "img")
    parts = sorted((part for rank in distributed.gather_objects(mine) for part in rank), key=lambda p: p[0])
    yield Progress(len(images), len(images), "img", result={"dinov2": torch.cat([p[1] for p in parts])})
