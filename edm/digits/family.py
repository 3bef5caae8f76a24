"""The `digits` family: the EDM family on the 16×16 digits, scored by the digits classifier.

Sampling, the loss, checkpoints and θ are the EDM family's (`edm.family.family`), unchanged; this
adapter adds what the core's optional hooks ask for (`neon.family.Family`): `features` (the
classifier's penultimate layer whitened by the reference images' covariance, float64 [B, D]),
`reference` (the statistics of those features on the split's `reference` images: mean 0, covariance
the identity) and `real` (the `generator` images, for `neon diagnose --real digits:N`); the roles
are `edm.digits.data.split`'s. So the sweep, `neon fid` and `generate_and_score` score digits
through the core's one scoring path.

Why whitened (issue 27): the penultimate layer's units have no natural scale (their variances on
the reference images span 0.2 to 875, and some units are dead on every digit), so the raw Fréchet
distance is dominated by the few loudest directions, and its unit is an accident of training.
Whitening by the reference's own covariance (PCA whitening; directions of no reference variance,
the dead units, dropped) is an invertible linear map of the live features, so it changes no ranking
a perfect estimate would give; it expresses every distance in units of the reference's spread and
weighs every live direction alike. On the same 25 × 200 samples of the same base and Neon, the
paired Neon − base difference was 14.6 of its own standard errors' worth per range with whitening,
against 4.9 raw (README).

Images are uint8 [B, 3, 16, 16] with three equal channels (grey), as every image family's; the
networks are trained without augmentation (`augment_pipe` None: flipped or rotated digits are other
digits), which `load` keeps.

The classifier is the one given to `DigitsFamily(net)` (the demo passes the one it trained and
saved), else one trained here in memory on first use on the `features` images with the default
settings (seconds; the same network on the same machine and thread count). `split` (a
`data.split()` result; default the recipe's) says which images play which role.
"""

import torch

from edm import networks
from edm.digits import classifier, data
from edm.family import EDMSampler
from edm.family import family as edm
from neon.family import Model
from neon.metrics import fid

WHITEN_TOLERANCE = 1e-6
"""Directions of the reference features' covariance below this share of its largest eigenvalue (dead
units: exactly 0 on every digit) are dropped before whitening."""

# A model of 46k parameters that runs every code path of the real one (tests).
TINY = {
    "class_name": "EDMPrecond",
    "model_type": "SongUNet",
    "embedding_type": "positional",
    "encoder_type": "standard",
    "decoder_type": "standard",
    "channel_mult_noise": 1,
    "resample_filter": [1, 1],
    "model_channels": 8,
    "channel_mult": [1, 2],
    "num_blocks": 1,
    "attn_resolutions": [],
    "dropout": 0.0,
    "augment_dim": 0,
    "use_fp16": False,
    "img_channels": 3,
    "img_resolution": data.SIZE,
    "label_dim": data.NUM_CLASSES,
}


class DigitsFamily:
    name = "digits"
    Sampler = EDMSampler
    format = edm.format

    def __init__(self, net: classifier.Classifier | None = None, split: dict | None = None):
        self._classifier = net
        self._split = split
        self._whitening = None
        self._reference = None

    def split(self) -> dict:
        """The data split whose roles this family uses (`data.split()` unless one was given)."""
        if self._split is None:
            self._split = data.split()
        return self._split

    def init(self, arch: dict) -> Model:
        """A fresh network of `arch` (EDM preconditioner kwargs with `class_name`), drawn from
        torch's global generator, without augmentation."""
        kwargs = dict(arch)
        net = {"EDMPrecond": networks.EDMPrecond}[kwargs.pop("class_name", "EDMPrecond")](**kwargs)
        return Model(
            net=net,
            image_size=net.img_resolution,
            num_classes=net.label_dim,
            arch=dict(arch),
            extras={"augment_pipe": None},
        )

    def tiny(self, seed: int) -> Model:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.init(TINY)

    def load(
        self, path: str, arch: str | None = None, device: torch.device | str = "cpu", codec: str | None = None
    ) -> Model:
        return edm.load(path, arch, device, codec)

    def sample(
        self, model: Model, labels: torch.Tensor, seeds: torch.Tensor, sampler: EDMSampler
    ) -> torch.Tensor:
        return edm.sample(model, labels, seeds, sampler)

    def loss(
        self, model: Model, samples: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        return edm.loss(model, samples, labels, generator)

    def container(self, model: Model, state_dict: dict[str, torch.Tensor]) -> dict:
        return edm.container(model, state_dict)

    def classifier(self) -> classifier.Classifier:
        """The feature network (trained here on first use when none was given)."""
        if self._classifier is None:
            self._classifier = classifier.train(*self.split()["features"][:2])
        return self._classifier

    def raw_features(self, samples: torch.Tensor) -> torch.Tensor:
        """float64 [B, classifier.FEATURES]: the classifier's penultimate layer on uint8 images
        [B, 3, 16, 16]."""
        net = self.classifier()
        with torch.no_grad():
            return net.features(samples.cpu()).double()

    def whitening(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean float64 [F], project float64 [F, D]): raw features x map to (x − mean) @ project,
        whose covariance on the reference images is the identity; D counts the directions of the
        reference covariance with eigenvalues above `WHITEN_TOLERANCE` × the largest."""
        if self._whitening is None:
            raw = self.raw_features(self.split()["reference"][0])
            values, vectors = torch.linalg.eigh(torch.cov(raw.T))
            keep = values > WHITEN_TOLERANCE * values.max()
            self._whitening = raw.mean(0), vectors[:, keep] / values[keep].sqrt()
        return self._whitening

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        """float64 [B, D]: the whitened features (`whitening`) of uint8 images [B, 3, 16, 16]."""
        mean, project = self.whitening()
        return (self.raw_features(samples) - mean) @ project

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """float32 [B, 10]: the classifier's head on whitened features [B, D] mapped back to the
        penultimate layer (exact for images with no activity outside the reference's directions:
        every digit and sample measured)."""
        mean, project = self.whitening()
        back = torch.linalg.pinv(project)  # [D, F]: the inverse map on the kept directions
        with torch.no_grad():
            return self.classifier().head((features.double() @ back + mean).float())

    def reference(self) -> tuple:
        """(mu float64 [D], sigma float64 [D, D]) of the `reference` images' features (0 and the
        identity, up to rounding)."""
        if self._reference is None:
            self._reference = fid.statistics(self.features(self.split()["reference"][0]))
        return self._reference

    def real(self, num: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`num` generator images (uint8 [num, 3, 16, 16]) and labels (int64 [num]), chosen by `seed`."""
        images, labels, _ = self.split()["generator"]
        pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:num]
        return images[pick], labels[pick]


family = DigitsFamily()
