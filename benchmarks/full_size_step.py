"""One fine-tune step of each paper recipe's full-size network at the recipe's per-GPU batch, with its
peak GPU memory: does the recipe fit one GPU of this kind?

For each recipe (configs/<family>/<row>.yaml) the network and its codec are built at full size with
random weights (no checkpoint needed: memory and time do not depend on the values), then one step of
the family's own loss runs under the recipe's `finetune.precision` (autocast, a GradScaler for fp16)
with AdamW, on random uint8 images and labels of the batch `finetune.batch_size / --gpus`. One line
per recipe:

    full-size edm/cifar10_cond: 55.7M params, per-GPU batch 64, fp32, step 0.41 s, peak 7.12 GiB

or `... skipped: does not fit one GPU (...)` on out-of-memory. `--tiny` runs each family's `tiny()`
at batch 4 instead (the CPU smoke test, tests/core/test_gpu_checks.py).

    python benchmarks/full_size_step.py [--device cuda] [--gpus 8] [--tiny] [RECIPE ...]
"""

import argparse
import os
import time

import torch
import yaml

from neon import family as registry
from neon.family import Model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# recipe -> the family's arch preset (the recipes name checkpoints, whose arch is read from the file)
RECIPES = {
    "edm/cifar10_cond": "cifar10-cond",
    "edm/ffhq64": "ffhq64",
    "VAR/d16_in256": "d16",
    "VAR/d36_in512": "d36",
    "xAR/xar_b_in256": "xar_base",
    "xAR/xar_l_in256": "xar_large",
    "imm/in256_t8": "im256",
}
KL16 = {"embed_dim": 16, "ch_mult": [1, 1, 2, 2, 4], "ch": 128, "num_res_blocks": 2, "use_variational": True}


def full_size(name: str, arch: str, device) -> Model:
    """The family's full-size model of preset `arch`, random weights, built on `device` (meta: shapes
    only, nothing allocated)."""
    with torch.device(device):
        return _build(name, arch, device)


def _build(name: str, arch: str, device) -> Model:
    if name == "edm":
        from edm.family import DEFAULT_AUGMENT, PRESETS, family

        model = family._model(PRESETS[arch], DEFAULT_AUGMENT)
    elif name == "var":
        from VAR.family import PRESETS, family
        from VAR.models import build_vae_var

        vae, var = build_vae_var(str(device), **PRESETS[arch])
        model = family._model(vae, var, PRESETS[arch])
    elif name == "xar":
        from xAR.family import PRESETS, XARNet, _model, build_vae

        vae = build_vae(KL16).to_empty(device=device)
        for module in vae.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        model = _model(XARNet(**PRESETS[arch]), vae, PRESETS[arch])
    elif name == "imm":
        from imm.family import LATENTS, PRESETS, family
        from imm.vae import build_autoencoder

        model = family._model(
            family._network(PRESETS[arch], device),
            build_autoencoder(None, device),
            PRESETS[arch],
            {**LATENTS, "vae_config": None},
        )
    else:
        raise ValueError(f"no full-size builder for family {name!r}")
    model.net.to(device)
    model.codec is None or model.codec.to(device)
    return model


def step(fam, model: Model, batch: int, precision: str, device) -> float:
    """Seconds of one AdamW step of the family's loss on a random batch (synchronized)."""
    net = model.net.train().requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-6)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    generator = torch.Generator().manual_seed(0)
    size = model.image_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator).to(device)
    labels = (
        torch.randint(0, model.num_classes, (batch,), generator=generator)
        if model.num_classes
        else torch.full((batch,), -1)
    ).to(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = fam.loss(model, images, labels, generator)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="*", default=list(RECIPES), help="configs/<family>/<row> (all)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the recipe's global batch is split over")
    parser.add_argument("--tiny", action="store_true", help="each family's tiny() at batch 4 (smoke test)")
    args = parser.parse_args()
    device = torch.device(args.device)
    for recipe in args.recipes:
        with open(os.path.join(REPO, "configs", recipe + ".yaml")) as f:
            conf = yaml.safe_load(f)
        fam = registry.get(conf["family"])
        precision = conf["finetune"].get("precision", "fp32")
        batch = 4 if args.tiny else conf["finetune"]["batch_size"] // args.gpus
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            model = fam.tiny(0) if args.tiny else full_size(fam.name, RECIPES[recipe], device)
            model.net.to(device)
            model.codec is None or model.codec.to(device)
            params = sum(p.numel() for p in model.net.parameters())
            seconds = step(fam, model, batch, precision, device)
        except torch.OutOfMemoryError as e:
            print(f"full-size {recipe}: skipped: does not fit one GPU ({str(e).splitlines()[0]})", flush=True)
            continue
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        print(
            f"full-size {recipe}: {params / 1e6:.1f}M params, per-GPU batch {batch}, {precision}, "
            f"step {seconds:.2f} s, peak {peak:.2f} GiB",
            flush=True,
        )
        del model


if __name__ == "__main__":
    main()
