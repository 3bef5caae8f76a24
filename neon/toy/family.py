"""The toy family's adapter to the core (`neon.family.Family`).

Checkpoints are `{'family': 'toy', 'arch': {'model': 'diffusion'|'ar', ...}, 'model': state_dict}`
(fine-tune snapshots add `images_seen`; those of the first core also held 'ema', which is θ where
present); `arch` says which of the two generators the file holds.
Samples are float32 [B, 2] points; features are the points themselves, and the reference is the
target Gaussian, so the sweep's FID is the Fréchet distance of the appendix.
"""

import dataclasses

import numpy as np
import torch

from neon.errors import NeonError
from neon.family import Model, arch_kwargs, build_and_load, preset_of, read_checkpoint
from neon.io import checkpoint
from neon.toy import models

METHODS = ("ddim", "notebook")  # the diffusion samplers: a correct DDIM, the appendix notebook's


@dataclasses.dataclass(frozen=True)
class ToySampler:
    """Sampler settings of both toy models (each reads its own fields)."""

    zeta: float = 1.0
    """Diffusion: score scale; > 1 mode-seeking, < 1 diversity-seeking."""
    steps: int = 20
    """Diffusion: DDIM steps."""
    eta: float = 0.0
    """Diffusion: DDIM stochasticity (0 deterministic, 1 DDPM posterior variance)."""
    method: str = "ddim"
    """Diffusion: 'ddim' (correct DDIM) or 'notebook' (the appendix notebook's deterministic sampler,
    `EpsMLP.sample_notebook`; needs steps >= 2 and eta = 0)."""
    tau: float = 1.0
    """AR: temperature multiplying both standard deviations; < 1 mode-seeking."""

    def __post_init__(self):
        if self.steps < 1 or self.zeta <= 0 or self.tau <= 0 or self.eta < 0:
            raise NeonError("sampler: need steps >= 1, zeta > 0, tau > 0 and eta >= 0")
        if self.method not in METHODS:
            raise NeonError(
                f"sampler.method: expected {' or '.join(map(repr, METHODS))}, got {self.method!r}"
            )
        if self.method == "notebook" and (self.eta != 0 or self.steps < 2):
            raise NeonError("sampler: the notebook method is deterministic with steps >= 2; set eta 0")


PRESETS = {"diffusion": {"model": "diffusion", "hidden": 32, "depth": 4, "timesteps": 1000},
           "ar": {"model": "ar", "hidden": 64}}


class ToyFamily:
    name = "toy"
    Sampler = ToySampler
    format = checkpoint.Format(weight_keys=(("ema",), ("model",)))

    def tiny(self, seed: int, kind: str = "diffusion") -> Model:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._model(PRESETS[kind])

    def load(self, path: str, arch: str | None = None, device: torch.device | str = "cpu",
             codec: str | None = None) -> Model:
        container = read_checkpoint(self, path)
        kwargs = arch_kwargs(container, arch, PRESETS, "toy")
        if kwargs is None:
            raise NeonError(f"{path} does not say its arch; pass --model.arch diffusion|ar")
        if not isinstance(kwargs, dict) or kwargs.get("model") not in models.ARCHS:
            raise NeonError(f"{path}: arch must name the model, diffusion or ar, got {kwargs!r}")
        rest = {k: v for k, v in kwargs.items() if k != "model"}
        net = build_and_load(models.ARCHS[kwargs["model"]], rest, container.weights, path,
                             f"the toy {kwargs['model']} model", device)
        return Model(net=net, arch=dict(kwargs))

    def sample(
        self, model: Model, labels: torch.Tensor, seeds: torch.Tensor, sampler: ToySampler
    ) -> torch.Tensor:
        seeds = seeds.to(next(model.net.parameters()).device)
        with torch.inference_mode():
            if model.arch["model"] == "diffusion" and sampler.method == "notebook":
                return model.net.sample_notebook(seeds, zeta=sampler.zeta, steps=sampler.steps)
            if model.arch["model"] == "diffusion":
                return model.net.sample(seeds, zeta=sampler.zeta, steps=sampler.steps, eta=sampler.eta)
            return model.net.sample(seeds, tau=sampler.tau)

    def loss(self, model: Model, samples: torch.Tensor, labels: torch.Tensor,
             generator: torch.Generator) -> torch.Tensor:
        if model.arch["model"] == "diffusion":
            return models.diffusion_loss(model.net, samples, generator, model.arch.get("timesteps", 1000))
        return model.net(samples).mean()

    def full_size(self, ckpt: str | None, arch: str | None) -> Model:
        """The preset `arch`, else the demo's base of that file name (outputs/demo/ar-base.pt, …)."""
        files = {f"{kind}-base.pt": kind for kind in PRESETS}
        with torch.device("meta"):
            return self._model(preset_of(ckpt, arch, PRESETS, files, "toy"))

    def evaluations(self, sampler: ToySampler) -> float:
        return 1.0  # per step of the diffusion sampler, once for the AR model: both negligible

    def container(self, model: Model, state_dict: dict[str, torch.Tensor]) -> dict:
        return {"family": self.name, "arch": model.arch, "model": state_dict}

    def features(self, samples: torch.Tensor) -> torch.Tensor:
        return samples.double()

    def reference(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array(models.TRUE_MEAN), np.array(models.TRUE_COV)

    def real(self, num: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """`num` points of the true distribution (samples, labels −1): the `toy:N` real-data source."""
        return models.true_samples(num, seed), torch.full((num,), -1, dtype=torch.int64)

    @staticmethod
    def _model(kwargs: dict) -> Model:
        return Model(net=models.build(kwargs), arch=dict(kwargs))


family = ToyFamily()
