"""VAR against golden vectors recorded by running FoundationVision/VAR on CPU (tests/golden/var/README.md).

Each case builds the tiny configuration it names with `build_vae_var`, fills every parameter with `fill_`,
runs one function and compares every stored output with the tolerance stated in the case (cases.json).
The manifest tests check the official full-size models key for key, shape for shape and dtype for dtype,
built on the meta device.
"""

import fnmatch
import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO
from tests.golden.fill import fill_
from VAR.loss import teacher_forcing_loss, uint8_to_pm1
from VAR.models import build_vae_var
from VAR.models.blocks import DropPath

GOLDEN = os.path.join(REPO, "tests", "golden", "var")
CASES = json.load(open(os.path.join(GOLDEN, "cases.json")))["cases"]
# README §3 tolerances, for stored outputs a case's own table does not name.
README_TOLERANCE = {"fhat_*": "atol 1e-5"}


# The tiny models' ops are too small to gain from intra-op threads; on a busy 2-core machine a second
# thread makes them several times slower. The goldens hold for 1 and 2 threads (README §3).
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


def cases(kind):
    return [pytest.param(c, id=c["file"].removesuffix(".pt")) for c in CASES if c["kind"] == kind]


def load(case):
    return torch.load(os.path.join(GOLDEN, case["file"]), weights_only=True)


def build(case):
    vae, var = build_vae_var(device="cpu", **case["builder_kwargs"])
    fill_(vae, case["fill_seed"])
    fill_(var, case["fill_seed"])
    return vae.eval(), var


def tolerance(case, name) -> dict:
    """atol/rtol for output `name`, parsed from the case's table ("exact", "atol 1e-4, rtol 1e-4",
    "as var_forward")."""
    for table in (case["tolerance"], README_TOLERANCE):
        for keys, text in table.items():
            if not any(fnmatch.fnmatchcase(name, key.strip()) for key in re.split(r"[,/]", keys)):
                continue
            if text.startswith("as "):
                kind = text.split()[1]
                other = next(
                    c for c in CASES if c["kind"] == kind and c["config_name"] == case["config_name"]
                )
                return tolerance(other, name)
            if text.startswith("exact"):
                return dict(atol=0.0, rtol=0.0)
            atol, rtol = re.search(r"atol ([0-9.e+-]+)", text), re.search(r"rtol ([0-9.e+-]+)", text)
            return dict(atol=float(atol[1]) if atol else 0.0, rtol=float(rtol[1]) if rtol else 0.0)
    raise KeyError(f"{case['file']}: no tolerance for {name}")


def check(case, name, actual, expected):
    if isinstance(expected, list):
        assert len(actual) == len(expected), name
        for i, (a, e) in enumerate(zip(actual, expected)):
            torch.testing.assert_close(a, e, **tolerance(case, name), msg=lambda m: f"{name}[{i}]: {m}")
    else:
        torch.testing.assert_close(actual, expected, **tolerance(case, name), msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", cases("vqvae_encode"))
@torch.no_grad()
def test_vqvae_encode(case):
    g = load(case)
    vae, _ = build(case)
    img = uint8_to_pm1(g["img_u8"])
    assert torch.equal(img, g["img"])
    enc = vae.encoder(img)
    f = vae.quant_conv(enc)
    check(case, "enc", enc, g["enc"])
    check(case, "f", f, g["f"])
    check(case, "idx_Bl", vae.img_to_idxBl(img), g["idx_Bl"])
    check(case, "fhat_per_scale", vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True), g["fhat_per_scale"])


@pytest.mark.parametrize("case", cases("vqvae_decode"))
@torch.no_grad()
def test_vqvae_decode(case):
    g = load(case)
    vae, _ = build(case)
    idx_Bl = g["idx_Bl"]
    B, Cvae = idx_Bl[0].shape[0], vae.Cvae
    check(case, "img_last", vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=True), g["img_last"])
    ms_h = [
        vae.quantize.embedding(idx).transpose(1, 2).view(B, Cvae, pn, pn)
        for idx, pn in zip(idx_Bl, case["builder_kwargs"]["patch_nums"])
    ]
    check(
        case,
        "fhat_per_scale",
        vae.quantize.embed_to_fhat(ms_h, all_to_max_scale=True, last_one=False),
        g["fhat_per_scale"],
    )
    if "img_per_scale" in g:
        check(
            case,
            "img_per_scale",
            vae.idxBl_to_img(idx_Bl, same_shape=True, last_one=False),
            g["img_per_scale"],
        )
    if "img_from_encoder_fhat" in g:
        encode = next(
            c for c in CASES if c["kind"] == "vqvae_encode" and c["config_name"] == case["config_name"]
        )
        f = vae.quant_conv(vae.encoder(load(encode)["img"]))
        f_hat = vae.quantize.f_to_idxBl_or_fhat(f, to_fhat=True)[-1]
        check(case, "img_from_encoder_fhat", vae.fhat_to_img(f_hat), g["img_from_encoder_fhat"])


@pytest.mark.parametrize("case", cases("var_forward"))
@torch.no_grad()
def test_var_forward(case):
    g = load(case)
    vae, var = build(case)
    var.eval()
    x = vae.quantize.idxBl_to_var_input(g["idx_Bl"])
    check(case, "x_BLCv_wo_first_l", x, g["x_BLCv_wo_first_l"])
    gt_BL = torch.cat(g["idx_Bl"], dim=1)
    check(case, "gt_BL", gt_BL, g["gt_BL"])

    labels_seen = []
    hook = var.class_emb.register_forward_hook(lambda module, args, out: labels_seen.append(args[0]))
    torch.manual_seed(g["torch_manual_seed"])  # label dropout draws torch.rand(B) inside forward
    logits = var(g["label_B"], x)
    hook.remove()
    check(case, "label_B_effective", labels_seen[0], g["label_B_effective"])
    check(case, "logits", logits, g["logits"])
    B, L, V = logits.shape
    lse = logits.double().logsumexp(dim=-1)
    check(case, "logits_logsumexp", lse.to(g["logits_logsumexp"].dtype), g["logits_logsumexp"])
    ce = F.cross_entropy(logits.double().view(-1, V), gt_BL.view(-1), reduction="none").view(B, L)
    check(case, "ce_per_token_f64", ce.to(g["ce_per_token_f64"].dtype), g["ce_per_token_f64"])
    # The argmax is only defined to float32 accuracy where the top two logits are within 1e-4.
    top2 = logits.topk(2, dim=-1).values
    decided = (top2[..., 0] - top2[..., 1]) > 1e-4
    assert decided.float().mean() > 0.9
    assert torch.equal(logits.argmax(dim=-1)[decided], g["logits_argmax"][decided])


def _train_step(case, g, label_smooth):
    """The loss and its gradients on a fresh model, with the drop-path draws and the logits recorded."""
    vae, var = build(case)
    var.train()
    keep, logits = [], []
    for block in var.blocks:
        if isinstance(block.drop_path, DropPath):
            # A dropped branch is all zeros for that sample; a kept one is not.
            block.drop_path.register_forward_hook(
                lambda m, args, out: keep.append((out != 0).flatten(1).any(1))
            )
    var.register_forward_hook(lambda m, args, out: logits.append(out.detach()))
    torch.manual_seed(g["torch_manual_seed"])
    loss = teacher_forcing_loss(var, vae, g["img"], g["label_B"], label_smooth=label_smooth)
    loss.backward()
    grad_norms = {name: p.grad.double().norm() for name, p in var.named_parameters()}
    grad_norm = torch.nn.utils.clip_grad_norm_(
        var.parameters(), g["grad_clip"]
    )  # returns the norm before clipping
    return var, loss.detach(), logits[0], keep, grad_norms, grad_norm


@pytest.mark.parametrize("case", cases("train_loss"))
def test_train_loss(case):
    g = load(case)
    var, loss, logits, keep, grad_norms, grad_norm = _train_step(case, g, 0.0)
    probs = torch.tensor(
        [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in var.blocks]
    )
    torch.testing.assert_close(probs, g["drop_path_probs"].to(probs.dtype), atol=0, rtol=0)
    masks = g["drop_path_keep_masks"]
    check(case, "drop_path_keep_masks", torch.stack(keep).to(masks.dtype), masks)
    check(case, "logits", logits, g["logits"])
    check(case, "loss_ls0", loss, g["loss_ls0"])
    check(case, "grad_norm_ls0", grad_norm.double(), torch.tensor(g["grad_norm_ls0"], dtype=torch.float64))
    names = sorted(g["grad_norm_per_param_ls0"])
    assert set(names) == set(grad_norms)
    ours = torch.stack([grad_norms[n] for n in names])
    theirs = torch.tensor([g["grad_norm_per_param_ls0"][n] for n in names], dtype=torch.float64)
    check(case, "grad_norm_per_param_ls0", ours, theirs)

    _, loss, _, _, _, grad_norm = _train_step(case, g, 0.1)
    check(case, "loss_ls0p1", loss, g["loss_ls0p1"])
    check(
        case, "grad_norm_ls0p1", grad_norm.double(), torch.tensor(g["grad_norm_ls0p1"], dtype=torch.float64)
    )


@pytest.mark.parametrize("case", cases("ar_greedy_cfg") + cases("ar_sampled_topk_topp"))
def test_autoregressive_infer_cfg(case):
    g = load(case)
    _, var = build(case)
    var.eval()
    kwargs = dict(
        g_seed=g["g_seed"], cfg=g["cfg"], top_k=g["top_k"], top_p=g["top_p"], more_smooth=g["more_smooth"]
    )
    steps = list(var.autoregressive_steps(g["B"], g["label_B"], **kwargs))
    check(case, "idx_per_scale", [s.idx_Bl for s in steps], g["idx_per_scale"])
    check(case, "cfg_logits_per_scale", [s.logits_BlV for s in steps], g["cfg_logits_per_scale"])
    check(case, "fhat_after_each_scale", [s.f_hat for s in steps], g["fhat_after_each_scale"])
    check(case, "img", var.autoregressive_infer_cfg(g["B"], g["label_B"], **kwargs), g["img"])
    if case["kind"] == "ar_greedy_cfg":  # top_k = 1 leaves nothing to chance
        steps = var.autoregressive_steps(g["B"], g["label_B"], **{**kwargs, "g_seed": None})
        check(case, "idx_per_scale", [s.idx_Bl for s in steps], g["idx_per_scale"])


def _tiny():
    case = next(c for c in CASES if c["config_name"] == "pubB")
    _, var = build(case)
    return var.eval()


def test_one_generator_per_sample_draws_as_upstream_for_a_batch_of_one():
    """With one sample, its own generator draws exactly what upstream's single generator would: the
    same tokens bitwise (same batch, same kernels). Across batch compositions, see test_var_family."""
    var = _tiny()
    kw = dict(cfg=2.0, top_k=12, top_p=0.9)
    labels, seed = torch.tensor([5]), 12
    for extra in ({}, {"more_smooth": True}):
        own = list(
            var.autoregressive_steps(
                1, labels, generators=[torch.Generator().manual_seed(seed)], **kw, **extra
            )
        )
        single = list(var.autoregressive_steps(1, labels, g_seed=seed, **kw, **extra))
        assert torch.equal(
            torch.cat([s.idx_Bl for s in own], dim=1), torch.cat([s.idx_Bl for s in single], dim=1)
        )


def test_kv_cache_is_off_after_sampling_even_when_stopped_early():
    var = _tiny()
    steps = var.autoregressive_steps(2, 1, g_seed=0)
    next(steps)
    assert all(b.attn.caching for b in var.blocks)
    steps.close()
    assert not any(b.attn.caching or b.attn.cached_k is not None for b in var.blocks)


def test_vqvae_loads_a_codebook_usage_buffer_of_another_scale_count():
    vae, _ = build_vae_var(device="cpu", V=16, Cvae=4, ch=32, patch_nums=(1, 2, 3), num_classes=2, depth=1)
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    sd["quantize.ema_vocab_hit_SV"] = torch.ones(10, 16)
    vae.load_state_dict(sd, strict=True)
    assert vae.quantize.ema_vocab_hit_SV.shape == (3, 16)


def test_block_causal_mask_is_the_only_non_finite_tensor():
    # Neon's merge copies tensors holding -inf from the base; for VAR that must be exactly this mask.
    var = _tiny()
    sd = var.state_dict()
    assert [k for k, v in sd.items() if v.is_floating_point() and not v.isfinite().all()] == [
        "attn_bias_for_masking"
    ]
    level = var.lvl_1L[0]
    visible = sd["attn_bias_for_masking"][0, 0] == 0
    assert torch.equal(visible, level[:, None] >= level[None, :])
    assert torch.isneginf(sd["attn_bias_for_masking"][0, 0][~visible]).all()


MANIFESTS = sorted(f.removesuffix(".json") for f in os.listdir(os.path.join(GOLDEN, "manifests")))


@pytest.mark.parametrize("name", MANIFESTS)
def test_full_size_state_dict_matches_manifest(name):
    manifest = json.load(open(os.path.join(GOLDEN, "manifests", f"{name}.json")))
    kwargs = {k: v for k, v in manifest["config"]["builder_call"].items() if k != "fn"}
    vae, var = build_vae_var(device="meta", **kwargs)
    net = vae if name.startswith("vqvae") else var
    ours = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in net.state_dict().items()]
    assert ours == [(k, shape, dtype) for k, (shape, dtype) in manifest["state_dict"].items()]
    assert sum(p.numel() for p in net.parameters()) == manifest["n_params"]
    if name.startswith("vqvae"):  # the same VQ-VAE serves the 512 px models
        vae_512, _ = build_vae_var(
            device="meta", **{**kwargs, "patch_nums": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)}
        )
        assert [(k, list(v.shape)) for k, v in vae_512.state_dict().items()] == [(k, s) for k, s, _ in ours]
    if name.startswith("var"):
        derived = manifest["config"]["derived"]
        assert (var.L, var.first_l, 16 * var.patch_nums[-1]) == (
            derived["L"],
            derived["first_l"],
            derived["image_size"],
        )
