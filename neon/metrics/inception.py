"""Inception features: torch-fidelity's TF-ported InceptionV3, computed in memory on every rank.

The network is torch-fidelity's `FeatureExtractorInceptionV3` as it is (the TF 1.x bilinear resize
to 299 px, the TF pooling patches), so our features equal those of `torch_fidelity.calculate_metrics`
on the same images. It gives two features per uint8 [B,3,H,W] image: the 2048-d pool features (FID,
precision/recall) and the 1008 unbiased logits (Inception score).

Weights: a local file when given (`fid.inception_weights`, `--inception-weights`), else
`checkpoints/weights-inception-2015-12-05-6726825d.pth` when present, else torch-fidelity's own
download. Local files are read by `neon.io.checkpoint` with `weights_only=True`.

`shared(conf)` keeps one extractor per process for the weights of an explicit `FidConfig` (the
recipe's `fid` section); nothing here is set module-wide.
"""

import dataclasses
import logging
import os
from typing import Iterator

import torch

from neon import distributed, precision, synthetic
from neon.errors import NeonError
from neon.io import checkpoint
from neon.progress import Progress

logger = logging.getLogger(__name__)

NAME = "inception-v3-compat"  # torch-fidelity's registry name for this network
POOL, LOGITS = "2048", "logits_unbiased"  # torch-fidelity's names of the two features we use
# torch-fidelity's file name (the last part of its URL_INCEPTION_V3), so `download_models.sh` can
# fetch that URL into checkpoints/. torch-fidelity is imported only when a network is built: its
# import (torchvision) costs seconds that `neon sweep` on the toy family should not pay.
DEFAULT_WEIGHTS = os.path.join("checkpoints", "weights-inception-2015-12-05-6726825d.pth")


@dataclasses.dataclass(frozen=True)
class FidConfig:
    """The recipe's `fid` section: how Inception features are computed."""

    inception_weights: str | None = None
    """Weights file of torch-fidelity's InceptionV3 (default: checkpoints/ when present, else
    torch-fidelity downloads them)."""
    batch_size: int = 64
    """Images per Inception forward, per process. Features do not depend on the world size; like
    any float32 convolution they may differ in the last bits (~1e-6) with another batch size or
    another number of CPU threads per process."""

    def __post_init__(self):
        if self.batch_size <= 0:
            raise NeonError("fid.batch_size must be > 0")


def weights_path(weights: str | None) -> str | None:
    """The weights file to read: `weights` (which must exist), else DEFAULT_WEIGHTS when present,
    else None (torch-fidelity downloads them)."""
    if weights is not None:
        if not os.path.isfile(weights):
            raise NeonError(f"no such Inception weights file: {weights}")
        return weights
    return DEFAULT_WEIGHTS if os.path.isfile(DEFAULT_WEIGHTS) else None


def build(weights: str | None = None, device: torch.device | str = "cpu") -> torch.nn.Module:
    """torch-fidelity's InceptionV3 (`FeatureExtractorInceptionV3`) in eval mode on `device`, with
    the weights of `weights_path(weights)`. Not collective; wrap it in `distributed.main_first()`
    when it may download."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    path = weights_path(weights)
    if path is None:
        logger.info("no local Inception weights (%s); torch-fidelity downloads them", DEFAULT_WEIGHTS)
        buffer = None
    else:
        buffer = checkpoint.in_memory(checkpoint.read(path).weights)
    try:
        extractor = FeatureExtractorInceptionV3(NAME, [POOL, LOGITS], feature_extractor_weights_path=buffer)
    except RuntimeError as e:  # load_state_dict: missing, unexpected or misshapen keys
        raise NeonError(
            f"{path} is not a torch-fidelity InceptionV3 state dict: {str(e).splitlines()[0]}"
        ) from None
    return extractor.to(device)


def untrained() -> torch.nn.Module:
    """torch-fidelity's InceptionV3 with PyTorch's default initialisation, for tests and benchmarks
    that have no weights file (nothing is read or downloaded). Its constructor always loads a state
    dict, so it is handed an empty one and that one load is skipped."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Untrained(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, *args, **kwargs):
            if not state_dict:  # the constructor's load of the empty dict handed to it below
                return None
            return super().load_state_dict(state_dict, *args, **kwargs)

    return Untrained(NAME, [POOL, LOGITS], feature_extractor_weights_path=checkpoint.in_memory({}))


@torch.no_grad()
def calibrate_(extractor: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """Reset every batch-norm's running statistics to those of `images` (uint8 [B,3,H,W]; train mode
    with cumulative averaging), then return to eval mode. An untrained Inception collapses (every
    image gets the same features); after this its features tell images apart, which tests need."""
    for module in extractor.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average over the forward passes
    extractor.train()
    extractor(check(images))
    return extractor.eval()


def check(images: torch.Tensor) -> torch.Tensor:
    """`images` if it is uint8 [B,3,H,W]; NeonError naming what is wrong otherwise."""
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise NeonError(f"Inception features need uint8 images in 0..255, got {kind}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise NeonError(f"Inception features need images of shape [B,3,H,W], got {list(images.shape)}")
    return images


@torch.no_grad()
def forward(extractor: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool float32 [B,2048], logits float32 [B,1008]) of uint8 [B,3,H,W] `images`, on the CPU."""
    device = next(extractor.parameters()).device
    precision.apply("features")
    pool, logits = extractor(check(images).to(device))
    return pool.cpu(), logits.cpu()


def extract(extractor: torch.nn.Module, images, batch_size: int) -> Iterator[Progress]:
    """Collective: the features of every image of `images` (a `neon.metrics.images.Images`).

    The images are cut into batches of `batch_size` and the batches dealt round-robin to the ranks;
    each rank yields one record per round (the images of every rank so far, for a progress bar), then
    the features are gathered in index order, so they are the same for any world size. The last
    record's result is {'pool': float32 [N,2048], 'logits': float32 [N,1008]}.
    """
    batches = synthetic.batches(0, len(images), batch_size)
    world = distributed.world()
    mine = []
    for j, indices in enumerate(distributed.shard(batches)):
        mine.append((indices.start, *forward(extractor, images.read(indices))))
        yield Progress(sum(len(b) for b in batches[:(j + 1) * world]), len(images), "img")
    parts = sorted((part for rank in distributed.gather_objects(mine) for part in rank), key=lambda p: p[0])
    features = {"pool": torch.cat([p[1] for p in parts]), "logits": torch.cat([p[2] for p in parts])}
    yield Progress(len(images), len(images), "img", result=features)


_cached: dict = {}  # (weights path, device) -> the extractor, one at a time


def shared(conf: FidConfig) -> torch.nn.Module:
    """The process's extractor with the weights of `conf` on this rank's device, built on first use
    and kept. Not collective (torch-fidelity downloads to a temporary file and renames it, so ranks
    downloading at once do not clash)."""
    key = (weights_path(conf.inception_weights), str(distributed.device()))
    if key not in _cached:
        extractor = build(key[0], distributed.device())
        _cached.clear()
        _cached[key] = extractor
    return _cached[key]


def pool_and_logits(images: torch.Tensor, conf: FidConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(pool float64 [B,2048], logits float32 [B,1008]) of uint8 [B,3,H,W] `images`, from the
    extractor of `conf` in batches of `conf.batch_size`."""
    extractor = shared(conf)
    parts = [forward(extractor, part) for part in check(images).split(conf.batch_size)]
    return torch.cat([p[0] for p in parts]).double(), torch.cat([p[1] for p in parts])
