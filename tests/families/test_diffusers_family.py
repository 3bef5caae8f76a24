"""The diffusers family against diffusers itself, on tiny random pipelines built from configs (no
download): sampling equals DDPMPipeline, DDIMPipeline and DiTPipeline (and a direct scheduler loop for
a class-conditional UNet), the loss equals the diffusers objective computed directly, merged folders
load with DiffusionPipeline.from_pretrained holding (1 + w)θ − wθ_s, the whole loop runs through the
CLI, and a hub id with no network is one error line."""

import json
import os
import subprocess
import sys

import diffusers
import pytest
import torch
import torch.nn.functional as F

from neon import cli
from neon import family as registry
from tests.conftest import REPO

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]

fam = registry.get("diffusers")
SEEDS = [7, 0, 123]


def _unet_folder(path, scheduler_class, num_class_embeds=None, **scheduler_kwargs):
    """A tiny UNet2DModel pipeline (8×8 RGB) saved with save_pretrained (safetensors)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
        num_class_embeds=num_class_embeds,
    )
    scheduler = scheduler_class(num_train_timesteps=1000, **scheduler_kwargs)
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path), safe_serialization=True)
    return str(path)


def _dit_folder(path, scheduler_class=None):
    """The family's tiny DiT pipeline written as a folder (optionally with another scheduler)."""
    model = fam.tiny(0)
    registry.write_checkpoint(fam, model.net.state_dict(), str(path), like=model)
    if scheduler_class is not None:
        config = scheduler_class.from_config(model.arch["scheduler"]).config
        scheduler_class.from_config(config).save_pretrained(os.path.join(path, "scheduler"))
        index = json.load(open(os.path.join(path, "model_index.json")))
        index["scheduler"] = ["diffusers", scheduler_class.__name__]
        json.dump(index, open(os.path.join(path, "model_index.json"), "w"))
    return str(path)


def _generators():
    return [torch.Generator().manual_seed(s) for s in SEEDS]


def _uint8(images_np):
    """A pipeline's output_type='np' images as our uint8 [B, 3, H, W] (numpy_to_pil's rounding)."""
    return torch.from_numpy((images_np * 255).round().astype("uint8")).permute(0, 3, 1, 2)


def _ours(folder, labels, **sampler):
    model = fam.load(folder, None, "cpu")
    return fam.sample(model, torch.tensor(labels), torch.tensor(SEEDS), fam.Sampler(**sampler))


def _close(a, b):
    assert a.shape == b.shape and (a.int() - b.int()).abs().max() <= 1


def test_sample_equals_ddpm_pipeline(tmp_path):
    folder = _unet_folder(tmp_path / "ddpm", diffusers.DDPMScheduler)
    pipe = diffusers.DDPMPipeline.from_pretrained(folder)
    theirs = pipe(batch_size=3, generator=_generators(), num_inference_steps=6, output_type="np").images
    _close(_ours(folder, [-1, -1, -1], num_steps=6), _uint8(theirs))


def test_sample_equals_ddim_pipeline_with_eta(tmp_path):
    folder = _unet_folder(tmp_path / "ddim", diffusers.DDIMScheduler)
    pipe = diffusers.DDIMPipeline.from_pretrained(folder)
    for eta in (0.0, 0.7):
        theirs = pipe(
            batch_size=3, generator=_generators(), eta=eta, num_inference_steps=5, output_type="np"
        ).images
        _close(_ours(folder, [-1, -1, -1], num_steps=5, eta=eta), _uint8(theirs))


def test_class_conditional_unet_equals_a_direct_scheduler_loop(tmp_path):
    """The pipelines take no class labels: the reference is diffusers' scheduler driven by hand."""
    folder = _unet_folder(tmp_path / "cond", diffusers.DDIMScheduler, num_class_embeds=5)
    unet = diffusers.UNet2DModel.from_pretrained(folder, subfolder="unet")
    scheduler = diffusers.DDIMScheduler.from_pretrained(folder, subfolder="scheduler")
    labels = torch.tensor([4, 0, 2])
    generators = _generators()
    x = torch.cat([torch.randn((1, 3, 8, 8), generator=g) for g in generators])
    scheduler.set_timesteps(4)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x, t, class_labels=labels).sample
            x = scheduler.step(out, t, x, eta=0.5, generator=generators).prev_sample
    theirs = _uint8((x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy())
    ours = _ours(folder, labels.tolist(), num_steps=4, eta=0.5)
    _close(ours, theirs)
    assert (
        ours.int() - _ours(folder, [0, 0, 0], num_steps=4, eta=0.5).int()
    ).abs().max() > 1  # labels matter
    with pytest.raises(Exception, match="no guidance"):
        _ours(folder, [0, 0, 0], num_steps=2, cfg=2.0)


@pytest.mark.parametrize(
    "scheduler_class", [None, diffusers.DPMSolverMultistepScheduler], ids=["ddim", "dpm"]
)
def test_sample_equals_dit_pipeline_with_guidance(tmp_path, scheduler_class):
    folder = _dit_folder(tmp_path / "dit", scheduler_class)
    pipe = diffusers.DiTPipeline.from_pretrained(folder)
    for cfg in (1.0, 3.0):
        theirs = pipe(
            class_labels=[3, 999, 42],
            guidance_scale=cfg,
            generator=_generators(),
            num_inference_steps=6,
            output_type="np",
        ).images
        _close(_ours(folder, [3, 999, 42], num_steps=6, cfg=cfg), _uint8(theirs))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_unet_loss_equals_the_diffusers_objective(tmp_path, prediction_type):
    folder = _unet_folder(tmp_path / "p", diffusers.DDPMScheduler, prediction_type=prediction_type)
    model = fam.load(folder, None, "cpu")
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    ours = fam.loss(model, images, torch.full((4,), -1), torch.Generator().manual_seed(3))
    # train_unconditional.py: noise, then timesteps, add_noise, the target of the prediction type
    scheduler = diffusers.DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    g = torch.Generator().manual_seed(3)
    x0 = images.float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    out = model.net(scheduler.add_noise(x0, noise, t), t).sample
    if prediction_type == "epsilon":
        direct = F.mse_loss(out, noise)
    elif prediction_type == "v_prediction":
        direct = F.mse_loss(out, scheduler.get_velocity(x0, noise, t))
    else:
        alpha = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        direct = (alpha / (1 - alpha) * F.mse_loss(out, x0, reduction="none")).mean()
    torch.testing.assert_close(ours, direct, rtol=1e-6, atol=0)


def test_dit_loss_equals_the_diffusers_objective_in_latent_space(tmp_path):
    model = fam.load(_dit_folder(tmp_path / "dit"), None, "cpu")
    model.net.train()
    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    labels = torch.tensor([1, 2, 3, 999])
    torch.manual_seed(11)  # the DiT's own label dropout draws from the global RNG
    ours = fam.loss(model, images, labels, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        posterior = model.codec.encode(images.float() / 127.5 - 1).latent_dist
    x0 = (
        posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
    ) * model.codec.config.scaling_factor
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    scheduler = diffusers.DDPMScheduler.from_config(model.arch["scheduler"])
    torch.manual_seed(11)
    out = model.net(scheduler.add_noise(x0, noise, t), timestep=t, class_labels=labels).sample[:, :4]
    torch.testing.assert_close(ours, F.mse_loss(out, noise), rtol=1e-6, atol=0)


def test_merged_folder_loads_with_from_pretrained_and_holds_the_extrapolation(tmp_path):
    base = _dit_folder(tmp_path / "base")
    model = fam.load(base, None, "cpu")
    self_sd = {k: v + 0.01 * torch.randn_like(v) for k, v in model.net.state_dict().items()}
    snapshot = str(tmp_path / "run" / "snapshot-0000000008")
    registry.write_checkpoint(fam, self_sd, snapshot, like=model, family="diffusers", images_seen=8)
    assert os.path.samefile(
        os.path.join(base, "vae", "diffusion_pytorch_model.safetensors"),
        os.path.join(snapshot, "vae", "diffusion_pytorch_model.safetensors"),
    )  # linked
    out = str(tmp_path / "neon")
    cli.main(
        ["merge", "--base", base, "--self", snapshot, "--w", "0.5", "--out", out]
    )  # the family is detected
    pipe = diffusers.DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, diffusers.DiTPipeline)
    merged = pipe.transformer.state_dict()
    base_sd = model.net.state_dict()
    assert all(torch.equal(merged[k], 1.5 * base_sd[k] - 0.5 * self_sd[k]) for k in base_sd)
    assert not os.path.exists(os.path.join(out, "neon.json")) or "images_seen" not in json.load(
        open(os.path.join(out, "neon.json"))
    )


def test_neon_loop_through_the_cli(tmp_path, capsys, inception_file):
    base = _unet_folder(tmp_path / "base", diffusers.DDIMScheduler)
    S, run, sweep_dir, ref = (str(tmp_path / n) for n in ("S", "run", "sweep", "ref.npz"))
    common = ["--family", "diffusers", "--sampler.num_steps", "3"]
    cli.main(
        [
            "sample",
            *common,
            "--ckpt",
            base,
            "--out",
            S,
            "--num",
            "8",
            "--batch-size",
            "4",
            "--shard-size",
            "8",
        ]
    )
    cli.main(
        [
            "finetune",
            "--family",
            "diffusers",
            "--ckpt",
            base,
            "--data",
            S,
            "--out",
            run,
            "--images",
            "8",
            "--batch-size",
            "4",
            "--lr",
            "1e-3",
        ]
    )
    snapshot = os.path.join(run, "snapshot-0000000008")
    assert os.path.isfile(os.path.join(snapshot, "unet", "diffusion_pytorch_model.safetensors"))
    assert isinstance(diffusers.DiffusionPipeline.from_pretrained(snapshot), diffusers.DDPMPipeline)
    fid_flags = ["--inception-weights", inception_file, "--batch-size", "8"]
    cli.main(["fid-stats", "--images", S, "--out", ref, *fid_flags])
    capsys.readouterr()
    cli.main(
        [
            "sweep",
            *common,
            "--base",
            base,
            "--self",
            run,
            "--w",
            "0,1",
            "--num",
            "4",
            "--ref",
            ref,
            "--out",
            sweep_dir,
            *fid_flags,
        ]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["snapshot"] in ("base", snapshot)
    merged = str(tmp_path / "neon")
    cli.main(
        ["merge", "--family", "diffusers", "--base", base, "--self", snapshot, "--w", "1", "--out", merged]
    )
    base_sd, self_sd = (fam.load(p, None, "cpu").net.state_dict() for p in (base, snapshot))
    merged_sd = diffusers.DiffusionPipeline.from_pretrained(merged).unet.state_dict()
    assert all(torch.equal(merged_sd[k], 2 * base_sd[k] - self_sd[k]) for k in base_sd)


def test_a_hub_id_without_network_is_one_error_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "neon.cli",
            "sample",
            "--family",
            "diffusers",
            "--ckpt",
            "google/ddpm-cifar10-32",
            "--out",
            str(tmp_path / "S"),
            "--num",
            "4",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert (
        done.returncode == 2
        and len(lines) == 1
        and lines[0].startswith("error: cannot fetch google/ddpm-cifar10-32")
    )
    assert not os.path.exists(tmp_path / "S")


def test_calculate_fid(tmp_path, capsys, inception_file):
    from diffusers_family import calculate_fid

    base = _unet_folder(tmp_path / "base", diffusers.DDIMScheduler)
    S, ref = str(tmp_path / "S"), str(tmp_path / "ref.npz")
    cli.main(
        [
            "sample",
            "--family",
            "diffusers",
            "--ckpt",
            base,
            "--out",
            S,
            "--num",
            "8",
            "--sampler.num_steps",
            "2",
        ]
    )
    cli.main(["fid-stats", "--images", S, "--out", ref, "--inception-weights", inception_file])
    capsys.readouterr()
    calculate_fid.main(
        [
            "--ckpt",
            base,
            "--num_images",
            "8",
            "--num_steps",
            "2",
            "--fid_stats",
            ref,
            "--batch_size",
            "8",
            "--inception_weights",
            inception_file,
        ]
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_images"] == 8 and result["fid"] >= 0
