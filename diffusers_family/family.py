"""The diffusers family's adapter to the core (`neon.family.Family`): Neon on a diffusers pipeline.

Checkpoints are pipeline folders (`model_index.json` and one folder a component, as
`DiffusionPipeline.save_pretrained` writes them) or hub ids (`google/ddpm-cifar10-32`), fetched once
through `huggingface_hub` into its cache (configs and `.safetensors` weights; a pickled `.bin` only
where a component has no safetensors, read with `weights_only`). Two kinds are read:
* pixel-space `UNet2DModel` pipelines (DDPM, DDIM; unconditional, or class-conditional through the
  UNet's class embedding), and
* latent DiT pipelines (`DiTTransformer2DModel`, or the `Transformer2DModel` older folders name;
  class labels with a null class, classifier-free guidance `cfg`, the pipeline's `AutoencoderKL` as
  the frozen codec).
θ is the UNet's or transformer's state dict. The scheduler is the one the folder names, built from
its config; the sampler settings are `num_steps`, `cfg` and `eta`. Fine-tune snapshots and merges
are whole pipeline folders (the core's folder checkpoints, `neon.io.folder.write`): the
base's other files linked, θ as `<component>/diffusion_pytorch_model.safetensors`, loadable with
`DiffusionPipeline.from_pretrained`. The folder a net was read from is recorded where diffusers
records it, `net.config._name_or_path`.
"""

import dataclasses
import json
import os
import re

import diffusers
import torch

from diffusers_family import loss as losses
from diffusers_family import sampler as sampling
from neon.errors import NeonError
from neon.family import Model, check_finite, load_built, read_checkpoint
from neon.io import checkpoint

WEIGHTS = "diffusion_pytorch_model"
COMPONENTS = ("unet", "transformer")  # where θ sits, whichever the pipeline has
NETS = ("UNet2DModel", "DiTTransformer2DModel", "Transformer2DModel")
FORMAT = checkpoint.Format(
    weight_keys=((),),
    folder_weights=tuple(
        f"{component}/{WEIGHTS}{suffix}" for suffix in (".safetensors", ".bin") for component in COMPONENTS
    ),
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_MODEL_INDEX = "model_index.json"

# The tiny pipeline of the contract tests: a DiT on 4×4 latents of an 8×8 VAE, 1000 classes and a
# null class (DiTPipeline's null label is 1000), DDIM.
TINY = {
    "pipeline": {
        "_class_name": "DiTPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "transformer": ["diffusers", "DiTTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    },
    "net": {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "in_channels": 4,
        "out_channels": 8,
        "num_layers": 1,
        "sample_size": 4,
        "patch_size": 2,
        "num_embeds_ada_norm": 1000,
        "norm_num_groups": 1,
    },
    "scheduler": {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "clip_sample": False},
    "vae": {
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 8,
    },
}


@dataclasses.dataclass(frozen=True)
class DiffusersSampler:
    """The pipeline call's settings: steps of the folder's scheduler, guidance, DDIM's eta."""

    num_steps: int = 50
    """Scheduler steps (num_inference_steps; DDIMPipeline's and DiTPipeline's default)."""
    cfg: float | None = None
    """Classifier-free guidance scale of a DiT (None or 1: none); UNets take none."""
    eta: float = 0.0
    """DDIM's η (0: deterministic DDIM, 1: DDPM-like); only for schedulers that have it."""

    def __post_init__(self):
        if self.num_steps < 1 or self.eta < 0:
            raise NeonError("sampler: need num_steps >= 1 and eta >= 0")


def _class(name, base: type, what: str, path: str) -> type:
    """The diffusers class `name` (a model or scheduler class a folder names), checked to be one."""
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise NeonError(f"{path}: {what} {name!r} is not a diffusers {base.__name__} class")
    return cls


def _config(obj) -> dict:
    """The JSON-able config of a diffusers model or scheduler: `_class_name` and its init arguments."""
    values = {k: v for k, v in obj.config.items() if not k.startswith("_")}
    return json.loads(json.dumps({"_class_name": type(obj).__name__, **values}))


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise NeonError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise NeonError(f"cannot read {path}: not a JSON object")
    return data


def _scheduler(config: dict, kind=None):
    """A fresh scheduler of `config` (of the class it names, or of `kind`)."""
    cls = kind or _class(config.get("_class_name"), diffusers.SchedulerMixin, "scheduler", "the arch")
    return cls.from_config({k: v for k, v in config.items() if k != "_class_name"})


class DiffusersFamily:
    name = "diffusers"
    Sampler = DiffusersSampler
    format = FORMAT

    def tiny(self, seed: int) -> Model:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self._model(
                TINY["pipeline"], "transformer", TINY["net"], TINY["scheduler"], TINY["vae"], "tiny"
            )
        model.net.eval().requires_grad_(False)  # as `load` gives it: a DiT in training mode drops labels
        return model

    def locate(self, path: str) -> str:
        """The local pipeline folder of `path`: a folder as it is, a hub id fetched once into the
        huggingface_hub cache (configs and safetensors weights; a component's `.bin` only where it
        has no safetensors)."""
        if os.path.isdir(path):
            return path
        if os.path.exists(path) or not _HUB_ID.fullmatch(path):
            raise NeonError(f"{path}: not a pipeline folder (model_index.json) or a hub id (owner/name)")
        from huggingface_hub import snapshot_download

        try:
            folder = snapshot_download(path, allow_patterns=["*.json", "*.txt", f"*/{WEIGHTS}.safetensors"])
            if not any(os.path.isfile(os.path.join(folder, rel)) for rel in FORMAT.folder_weights[:2]):
                folder = snapshot_download(
                    path, allow_patterns=["*.json", "*.txt", f"*/{WEIGHTS}.safetensors", f"*/{WEIGHTS}.bin"]
                )
        except Exception as e:  # offline, unknown repo, refused: huggingface_hub has a dozen error types
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise NeonError(
                f"cannot fetch {path} from the Hugging Face hub ({type(e).__name__}: {reason[:200]})"
            ) from None
        return folder

    def load(
        self, path: str, arch: str | None = None, device: torch.device | str = "cpu", codec: str | None = None
    ) -> Model:
        folder = self.locate(path)
        index = _read_json(os.path.join(folder, _MODEL_INDEX))
        component = next((c for c in COMPONENTS if c in index), None)
        if component is None:
            raise NeonError(f"{path}: the pipeline has no {' or '.join(COMPONENTS)} (model_index.json)")
        net_config = _read_json(os.path.join(folder, component, "config.json"))
        scheduler_config = _read_json(os.path.join(folder, "scheduler", "scheduler_config.json"))
        vae_config = _read_json(os.path.join(folder, "vae", "config.json")) if index.get("vae") else None
        pipeline = {k: v for k, v in index.items() if k not in ("_diffusers_version", "_name_or_path")}
        model = self._model(pipeline, component, net_config, scheduler_config, vae_config, path)
        load_built(model.net, read_checkpoint(self, folder).weights, path, net_config["_class_name"], device)
        if model.codec is not None:
            files = [os.path.join(folder, "vae", WEIGHTS + s) for s in (".safetensors", ".bin")]
            found = [f for f in files if os.path.isfile(f)]
            if not found:
                raise NeonError(f"{path}: no VAE weights (vae/{WEIGHTS}.safetensors)")
            load_built(model.codec, checkpoint.read(found[0]).weights, found[0], "AutoencoderKL", device)
        model.net.register_to_config(_name_or_path=folder)  # where diffusers' from_pretrained records it
        return model

    def sample(
        self, model: Model, labels: torch.Tensor, seeds: torch.Tensor, sampler: DiffusersSampler
    ) -> torch.Tensor:
        net = model.net
        param = next(net.parameters())
        generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds.tolist()]
        config = model.arch["net"]
        scheduler = _scheduler(model.arch["scheduler"])
        with torch.inference_mode():
            if model.arch["component"] == "transformer":
                channels, size = config["in_channels"], config["sample_size"]
                size = [size, size] if isinstance(size, int) else size
                predict = sampling.dit_predictor(
                    net,
                    self._labels(model, labels, param.device),
                    config["num_embeds_ada_norm"],
                    sampler.cfg,
                    channels,
                )
            else:
                if sampler.cfg is not None and sampler.cfg != 1:
                    raise NeonError(
                        f"sampler.cfg={sampler.cfg}: a UNet2DModel pipeline has no guidance (use 1 or null)"
                    )
                channels, size = config["in_channels"], config["sample_size"]
                size = [size, size] if isinstance(size, int) else size
                cond = self._labels(model, labels, param.device) if model.num_classes else None
                predict = sampling.unet_predictor(net, cond)
            x = sampling.normal(generators, [channels, *size], param.dtype, param.device)
            x = sampling.denoise(predict, scheduler, x, sampler.num_steps, sampler.eta, generators)
            if model.codec is not None:
                x = sampling.decode(model.codec, x)
            return sampling.to_uint8(
                check_finite(x, f"{model.arch['pipeline'].get('_class_name', 'diffusers')} sampler")
            )

    def loss(
        self, model: Model, samples: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """The diffusers objective (`diffusers_family.loss`). Dropout, and a DiT's label dropout to
        its null class (its `LabelEmbedding` in training mode, p = 0.1, as DiT trains), draw from
        the global RNG, which the fine-tune loop reseeds per step. `model.net` may be DDP-wrapped:
        settings come from `model.arch`."""
        net, config = model.net, model.arch["net"]
        images = samples.to(torch.float32) / 127.5 - 1
        noise_scheduler = _scheduler(model.arch["scheduler"], diffusers.DDPMScheduler)
        if model.arch["component"] == "transformer":
            x0 = losses.encode(model.codec, images, generator)
            channels = config["in_channels"]
            cond = self._labels(model, labels, images.device)
            return losses.diffusion_loss(
                lambda x, t: net(x, timestep=t, class_labels=cond).sample[:, :channels],
                noise_scheduler,
                x0,
                generator,
            )
        cond = self._labels(model, labels, images.device) if model.num_classes else None
        extra = {} if cond is None else {"class_labels": cond}
        return losses.diffusion_loss(
            lambda x, t: net(x, t, **extra).sample, noise_scheduler, images, generator
        )

    def container(self, model: Model, state_dict: dict[str, torch.Tensor]) -> checkpoint.Container:
        """A pipeline folder holding θ: the base's folder with θ replaced where the net was read
        from one, else (a tiny model) every file written from `model.arch` and the codec."""
        rel = f"{model.arch['component']}/{WEIGHTS}.safetensors"
        source = model.net.config.get("_name_or_path")
        if isinstance(source, str) and os.path.isfile(os.path.join(source, _MODEL_INDEX)):
            return checkpoint.Container(
                source, "folder", {rel: state_dict}, (rel,), replaces=FORMAT.folder_weights
            )
        version = {"_diffusers_version": diffusers.__version__}

        def text(config):
            return json.dumps({**config, **version} if "_class_name" in config else config, indent=2) + "\n"

        files = {
            _MODEL_INDEX: text(model.arch["pipeline"]),
            f"{model.arch['component']}/config.json": text(model.arch["net"]),
            "scheduler/scheduler_config.json": text(model.arch["scheduler"]),
        }
        if model.codec is not None:
            files["vae/config.json"] = text(model.arch["vae"])
            files[f"vae/{WEIGHTS}.safetensors"] = {
                k: v.detach().cpu() for k, v in model.codec.state_dict().items()
            }
        return checkpoint.Container(None, "folder", {rel: state_dict}, (rel,), files=files)

    @staticmethod
    def _labels(model: Model, labels: torch.Tensor, device) -> torch.Tensor:
        """Class labels on `device`; for a DiT, −1 (unlabelled) becomes the null class."""
        labels = labels.to(device=device, dtype=torch.int64)
        if model.arch["component"] == "transformer":
            labels = torch.where(labels < 0, torch.full_like(labels, model.num_classes), labels)
            if (labels > model.num_classes).any():
                raise NeonError(
                    f"class labels must be in [0, {model.num_classes}) for this DiT (−1: unconditional)"
                )
            return labels
        if (labels < 0).any() or (labels >= model.num_classes).any():
            raise NeonError(
                f"class labels must be in [0, {model.num_classes}) for this class-conditional UNet"
            )
        return labels

    @staticmethod
    def _model(
        pipeline: dict,
        component: str,
        net_config: dict,
        scheduler_config: dict,
        vae_config: dict | None,
        path: str,
    ) -> Model:
        net_class = net_config.get("_class_name")
        if net_class not in NETS:
            raise NeonError(
                f"{path}: the {component} is a {net_class!r}; this family reads {', '.join(NETS)}"
            )
        net = _class(net_class, diffusers.ModelMixin, component, path).from_config(
            {k: v for k, v in net_config.items() if not k.startswith("_")}
        )
        scheduler = _scheduler(scheduler_config) if "_class_name" in scheduler_config else None
        if scheduler is None:
            raise NeonError(f"{path}: scheduler_config.json names no scheduler class")
        vae = None
        if component == "transformer":
            if vae_config is None:
                raise NeonError(f"{path}: a DiT pipeline needs its vae")
            vae = _class(vae_config.get("_class_name"), diffusers.ModelMixin, "vae", path).from_config(
                {k: v for k, v in vae_config.items() if not k.startswith("_")}
            )
            num_classes = net.config.num_embeds_ada_norm
            scale = 2 ** (len(vae.config.block_out_channels) - 1)
            image_size = net.config.sample_size * scale
        else:
            num_classes = net.config.num_class_embeds or 0
            size = net.config.sample_size
            image_size = size if isinstance(size, int) else size[0]
        arch = {
            "pipeline": pipeline,
            "component": component,
            "net": _config(net),
            "scheduler": _config(scheduler),
            "vae": _config(vae) if vae is not None else None,
        }
        return Model(
            net=net,
            codec=vae.eval().requires_grad_(False) if vae is not None else None,
            image_size=image_size,
            num_classes=num_classes,
            arch=arch,
        )


family = DiffusersFamily()
