"""The EDM family's adapter to the core (`neon.family.Family`).

θ is the `ema` network of an EDM checkpoint. Checkpoints read: official and Neon network pickles
(`edm-*.pkl`, `Neon_EDM_*.pkl`: NVlabs persistence pickles, read as data by the restricted unpickler
of `neon.io.unpickle` with the allowlist declared here, never running the source they embed), our
`.pt` files (`{'ema': state_dict, 'arch': kwargs, 'augment_pipe': kwargs}`, fine-tune snapshots,
merges) and plain `.safetensors` (the arch then comes from `--model.arch`). `arch` holds the
preconditioner's class name and its constructor kwargs. IMM's pickles share this format
(`NVLABS_PICKLE_GLOBALS`, `from_network_pickle`).

Sampling is upstream's `generate.py`: per-sample torch generators seeded with the sample's seed draw
the latents, a class index (discarded: the label comes from the synthetic set's balanced labels, but
the draw keeps each sample's noise stream aligned with upstream's) and the per-step churn noise of
`edm_sampler`. The generators are CPU generators whatever the model's device (upstream makes them on
the GPU), so a seed draws the same noise on the CPU and on CUDA; the draws are moved to the model.
Images are uint8 `(x · 127.5 + 128)` clipped, as upstream saves them.
"""

import dataclasses
import math

import torch

from edm import networks
from edm.loss import AugmentPipe, EDMLoss
from edm.sampler import StackedRandomGenerator, edm_sampler
from neon.errors import NeonError
from neon.family import Model, arch_kwargs, build_net, check_finite, load_built, preset_of, read_checkpoint
from neon.io import checkpoint, unpickle

# The paper's three networks (EDM's `vp` config: DDPM++ U-Net with EDM preconditioning).
_DDPMPP = {
    "class_name": "EDMPrecond",
    "model_type": "SongUNet",
    "embedding_type": "positional",
    "encoder_type": "standard",
    "decoder_type": "standard",
    "channel_mult_noise": 1,
    "resample_filter": [1, 1],
    "model_channels": 128,
    "augment_dim": 9,
    "use_fp16": False,
    "img_channels": 3,
}
PRESETS = {
    "cifar10-cond": {
        **_DDPMPP,
        "channel_mult": [2, 2, 2],
        "dropout": 0.13,
        "img_resolution": 32,
        "label_dim": 10,
    },
    "cifar10-uncond": {
        **_DDPMPP,
        "channel_mult": [2, 2, 2],
        "dropout": 0.13,
        "img_resolution": 32,
        "label_dim": 0,
    },
    "ffhq64": {
        **_DDPMPP,
        "channel_mult": [1, 2, 2, 2],
        "dropout": 0.05,
        "img_resolution": 64,
        "label_dim": 0,
    },
}
TINY = {
    **_DDPMPP,
    "model_channels": 16,
    "channel_mult": [1, 2],
    "num_blocks": 1,
    "attn_resolutions": [4],
    "dropout": 0.1,
    "img_resolution": 8,
    "label_dim": 10,
}
PAPER_FILES = {
    "edm-cifar10-32x32-cond-vp.pkl": "cifar10-cond",
    "edm-cifar10-32x32-uncond-vp.pkl": "cifar10-uncond",
    "edm-ffhq-64x64-uncond-vp.pkl": "ffhq64",
}
# EDM's train.py augmentation (non-leaking, 9 augment labels); p is the paper's 0.12 (CIFAR-10).
DEFAULT_AUGMENT = {
    "p": 0.12,
    "xflip": 1e8,
    "yflip": 1,
    "scale": 1,
    "rotate_frac": 1,
    "aniso": 1,
    "translate_frac": 1,
}
_CLASSES = {
    "EDMPrecond": networks.EDMPrecond,
    "VPPrecond": networks.VPPrecond,
    "VEPrecond": networks.VEPrecond,
}


def _persistent_object(meta) -> unpickle.Record:
    """What `torch_utils.persistence._reconstruct_persistent_obj(meta)` stands for in an NVlabs
    pickle, as data: the class name and the object's state. Upstream's loader would execute
    `meta['module_src']` here; nothing of it is run or kept."""
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise ValueError("malformed persistent object record")
    return unpickle.Record(str(meta.get("class_name", "")), meta["state"])


# The globals an NVlabs network pickle may name, beyond tensors (`neon.unpickle.TENSOR_GLOBALS`).
NVLABS_PICKLE_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent_object,
    **{
        ("torch.nn.modules.container", name): unpickle.record_class(name)
        for name in ("ModuleDict", "ModuleList", "Sequential")
    },
}


def from_network_pickle(raw) -> dict:
    """An unpickled NVlabs network pickle as plain data: each network (e.g. `ema`) becomes its state
    dict, and `arch` the class name and `_init_kwargs` of `ema` (or of the first network); other
    persistent objects (`augment_pipe`, `loss_fn`) become their `_init_kwargs`."""
    if not isinstance(raw, dict):
        raise ValueError(f"top level is a {type(raw).__name__}, not a dict")
    data, arch = {}, None
    for key, value in raw.items():
        if isinstance(value, unpickle.Record) and "_parameters" in value.state:
            data[key] = unpickle.module_state_dict(value)
            if arch is None or key == "ema":
                arch = {"class_name": value.class_name, **unpickle.plain(value.state.get("_init_kwargs", {}))}
        elif isinstance(value, unpickle.Record):
            data[key] = unpickle.plain(value.state.get("_init_kwargs", {}))
        else:
            data[key] = unpickle.plain(value)
    if arch is not None:
        data["arch"] = arch
    return data


FORMAT = checkpoint.Format(
    weight_keys=((), ("ema",), ("model",)),
    pickle_globals=NVLABS_PICKLE_GLOBALS,
    from_pickle=from_network_pickle,
)


@dataclasses.dataclass(frozen=True)
class EDMSampler:
    """`edm_sampler`'s settings (EDM Algorithm 2): Heun over the Karras ρ-schedule, optional churn."""

    num_steps: int = 18
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    S_churn: float = 0.0
    S_min: float = 0.0
    S_max: float = math.inf
    S_noise: float = 1.0

    def __post_init__(self):
        if self.num_steps < 1 or not 0 < self.sigma_min < self.sigma_max:
            raise NeonError("sampler: need num_steps >= 1 and 0 < sigma_min < sigma_max")


def _stored_augment(data: dict, arch: dict, path: str) -> dict | None:
    """The augment pipe a file trains with: its `augment_pipe` kwargs, or none where it stores None
    (EDM's `--augment=0` runs, such as ImageNet-64). A file without the entry (a bare state dict)
    gets EDM's default pipe when its network takes augment labels, as EDM sets `augment_dim` only
    with augmentation."""
    if "augment_pipe" not in data:
        return DEFAULT_AUGMENT if arch.get("augment_dim", 0) else None
    pipe = data["augment_pipe"]
    if pipe is not None and not isinstance(pipe, dict):
        raise NeonError(
            f"{path}: augment_pipe must be AugmentPipe's arguments or None, got {type(pipe).__name__}"
        )
    return pipe


class EDMFamily:
    name = "edm"
    Sampler = EDMSampler
    format = FORMAT

    def tiny(self, seed: int) -> Model:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self._model(TINY, DEFAULT_AUGMENT)

    def load(
        self, path: str, arch: str | None = None, device: torch.device | str = "cpu", codec: str | None = None
    ) -> Model:
        container = read_checkpoint(self, path)
        kwargs = arch_kwargs(container, arch, PRESETS, "EDM")
        if kwargs is None:
            raise NeonError(f"{path} does not say its arch; pass --model.arch {'|'.join(PRESETS)}")
        model = self._model(kwargs, _stored_augment(container.data, kwargs, path), path)
        load_built(model.net, container.weights, path, kwargs.get("class_name", "EDMPrecond"), device)
        return model

    def sample(
        self, model: Model, labels: torch.Tensor, seeds: torch.Tensor, sampler: EDMSampler
    ) -> torch.Tensor:
        net = model.net
        device = next(net.parameters()).device
        with torch.inference_mode():
            rnd = StackedRandomGenerator("cpu", seeds.tolist())  # the same draws on any device
            latents = rnd.randn(
                [len(seeds), net.img_channels, net.img_resolution, net.img_resolution], device=device
            )
            class_labels = None
            if net.label_dim:
                rnd.randint(net.label_dim, size=[len(seeds)], device=device)  # keeps upstream's stream order
                class_labels = self._one_hot(labels, net.label_dim, device)
            x = edm_sampler(
                net, latents, class_labels, randn_like=rnd.randn_like, **dataclasses.asdict(sampler)
            )
            return (check_finite(x, "EDM sampler") * 127.5 + 128).clip(0, 255).to(torch.uint8)

    def loss(
        self, model: Model, samples: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """EDMLoss with EDM's augmentation, summed per image and averaged over the batch (EDM's
        objective); dropout draws from the global RNG, which the fine-tune loop reseeds per step."""
        images = samples.to(torch.float32) / 127.5 - 1
        label_dim = model.arch.get("label_dim", 0)
        class_labels = self._one_hot(labels, label_dim, images.device) if label_dim else None
        pipe = AugmentPipe(**model.extras["augment_pipe"]) if model.extras.get("augment_pipe") else None
        per_element = EDMLoss()(model.net, images, class_labels, pipe, generator=generator)
        return per_element.sum() / images.shape[0]

    def container(self, model: Model, state_dict: dict[str, torch.Tensor]) -> dict:
        """`{'ema', 'arch', 'augment_pipe'}`: the augment pipe of the base travels with θ."""
        return {"ema": state_dict, "arch": model.arch, "augment_pipe": model.extras.get("augment_pipe")}

    def full_size(self, ckpt: str | None, arch: str | None) -> Model:
        with torch.device("meta"):
            return self._model(preset_of(ckpt, arch, PRESETS, PAPER_FILES, "EDM"), DEFAULT_AUGMENT)

    def evaluations(self, sampler: EDMSampler) -> float:
        """Heun: two network calls per step but the last (EDM Algorithm 2)."""
        return 2.0 * sampler.num_steps - 1

    @staticmethod
    def _one_hot(labels: torch.Tensor, label_dim: int, device) -> torch.Tensor:
        if (labels < 0).any() or (labels >= label_dim).any():
            raise NeonError(
                f"class labels must be in [0, {label_dim}) for this conditional model "
                f"(unlabelled images carry -1)"
            )
        return torch.eye(label_dim, device=device)[labels.to(device)]

    @staticmethod
    def _model(arch: dict, augment: dict | None, path: str = "the arch") -> Model:
        if not isinstance(arch, dict):
            raise NeonError(f"{path}: arch must be a mapping of EDMPrecond's arguments, got {arch!r}")
        kwargs = dict(arch)
        name = kwargs.pop("class_name", "EDMPrecond")
        if name not in _CLASSES:
            raise NeonError(f"{path}: unknown network class {name!r} (known: {', '.join(_CLASSES)})")
        net = build_net(_CLASSES[name], kwargs, path, name)
        return Model(
            net=net,
            image_size=net.img_resolution,
            num_classes=net.label_dim,
            arch=dict(arch),
            extras={"augment_pipe": dict(augment) if augment else None},
        )


family = EDMFamily()
