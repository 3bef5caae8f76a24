"""xAR and the KL-16 VAE against golden vectors recorded by running OliverRensu/xAR and LTH14/mar on CPU
(tests/golden/xar/README.md).

Each case builds the configuration it names, fills every parameter with `fill_`, runs one function and
compares every stored output with the tolerance the case suggests (cases.json). The manifest tests check
the official models key for key, shape for shape and dtype for dtype, built on the meta device.
"""

import fnmatch
import json
import os
import re

import pytest
import torch

from tests.conftest import REPO
from tests.golden.fill import fill_
from xAR.loss import draw_flow_inputs, encode_images, flow_loss, noisy_tokens, training_loss, uint8_to_pm1
from xAR.models import (
    LATENT_SCALE,
    AutoencoderKL,
    time_index,
    to_latent,
    to_tokens,
    vae_state_dict,
    xAR,
    xar_state_dict,
)
from xAR.models import xar as xar_module
from xAR.models.xar import Rope2D
from xAR.sampler import em_step, per_sample_randn, sample_tokens, time_grid, to_uint8

GOLDEN = os.path.join(REPO, "tests", "golden", "xar")
CASES = json.load(open(os.path.join(GOLDEN, "cases.json")))["cases"]

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


def case_of(kind):
    return next(c for c in CASES if c["kind"] == kind)


def cases(kind):
    return [pytest.param(c, id=c["file"].removesuffix(".pt")) for c in CASES if c["kind"] == kind]


def load(case):
    return torch.load(os.path.join(GOLDEN, case["file"]), weights_only=True)


def tolerance(case, name) -> dict:
    """atol/rtol of output `name` from the case's suggested_tolerance ('exact…', a dict, or keys such as
    'moments/mean/…', 'rope_*', 'sK_v' for s0_v, s1_v, …)."""
    generic = re.sub(r"^s\d+_", "sK_", name)
    for keys, tol in case["suggested_tolerance"].items():
        if any(fnmatch.fnmatchcase(generic, key) for key in keys.split("/")):
            if isinstance(tol, str):
                assert tol.startswith("exact"), tol
                return dict(atol=0.0, rtol=0.0)
            return dict(atol=tol["atol"], rtol=tol["rtol"])
    raise KeyError(f"{case['file']}: no tolerance for {name}")


def check(case, name, actual, expected):
    torch.testing.assert_close(actual, expected, **tolerance(case, name), msg=lambda m: f"{name}: {m}")


def build_xar(case, g):
    assert g["config"] == case["model"]["kwargs"]
    return fill_(xAR(**g["config"]), g["fill_seed"])


def test_token_order():
    latent = torch.arange(16 * 16).view(1, 1, 16, 16)  # value = 16·row + col
    tokens = to_tokens(latent)[0, :, 0]
    index = torch.arange(256)
    cell, row, col = index // 64, index % 64 // 8, index % 8
    assert torch.equal(tokens, 16 * (8 * (cell // 2) + row) + 8 * (cell % 2) + col)
    assert torch.equal(to_latent(to_tokens(latent)), latent)


@pytest.mark.parametrize("case", cases("xar_buffers"))
def test_buffers(case):
    g = load(case)
    net = xAR(**case_of("xar_forward_train")["model"]["kwargs"])
    check(case, "mask", net.mask, g["mask"])
    for head_dim in (16, 64, 80):
        rope = net.encoder_blocks[0].attn.rope if head_dim == 16 else Rope2D(head_dim)
        for buffer in ("freqs", "freqs_cos", "freqs_sin"):
            name = f"rope_hd{head_dim}_{buffer}"
            check(case, name, getattr(rope, buffer), g[name])


@pytest.mark.parametrize("case", cases("xar_forward_train"))
@torch.no_grad()
def test_forward_train(case):
    g = load(case)
    net = build_xar(case, g).train()
    index = time_index(g["t"])
    check(case, "time_index", index, g["time_index"])
    check(case, "cond", net.condition(g["labels"], index), g["cond"])
    v = net.velocity(g["model_input"], g["t"], g["labels"])
    check(case, "v_pred", v, g["v_pred"])
    assert torch.equal(net.eval().velocity(g["model_input"], g["t"], g["labels"]), v)


@pytest.mark.parametrize("case", cases("xar_training_loss"))
def test_training_loss(case):
    g = load(case)
    net = build_xar(case, g).train()
    x_t, target = noisy_tokens(g["x0"], g["t"], g["noise"])
    check(case, "model_input", x_t, g["model_input"])
    check(case, "target", target, g["target"])
    labels_eff = torch.where(g["drop"], 1000, g["labels"])
    check(case, "labels_eff", labels_eff, g["labels_eff"])
    check(case, "time_index", time_index(g["t"]), g["time_index"])
    with torch.no_grad():
        check(case, "v_pred", net.velocity(x_t, g["t"], labels_eff), g["v_pred"])
    loss = flow_loss(net, g["x0"], g["labels"], g["drop"], g["t"], g["noise"])
    check(case, "loss", loss.detach(), g["loss"])
    loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in net.parameters())
    seeded = flow_loss(net, g["x0"], g["labels"], g["seeded_drop"], g["seeded_t"], g["seeded_noise"])
    check(case, "loss_seeded", seeded.detach(), g["loss_seeded"])

    # Our generator draws the label-drop uniforms and the noise as upstream's torch draws (same stream);
    # only the logit-normal times come from it too instead of numpy's global RandomState.
    generator = torch.Generator().manual_seed(case["scalars"]["rng_seed"])
    drop, t, noise = draw_flow_inputs(3, net.label_drop_prob, generator)
    assert torch.equal(drop, g["seeded_drop"]) and torch.equal(noise, g["seeded_noise"])
    assert torch.equal(torch.sigmoid(g["seeded_normal"]).float(), g["seeded_t"])
    assert t.dtype == torch.float32 and t.shape == (12,) and ((0 < t) & (t < 1)).all()
    again = training_loss(net, g["x0"], g["labels"], torch.Generator().manual_seed(3))
    assert torch.equal(again, flow_loss(net, g["x0"], g["labels"], drop, t, noise))


def _record_calls(net):
    """Wrap net.cell_velocity so that every sampling call is logged."""
    calls, call = [], net.cell_velocity

    def recorded(x, labels, index, cell, extend):
        out = call(x, labels, index, cell, extend)
        calls.append(dict(x=x, y=labels, index=index, cell=cell, extend=extend, out=out))
        return out

    net.cell_velocity = recorded
    return calls


def _default_randn(shape, dtype):
    return torch.randn(shape, dtype=dtype)


def _recording(randn, log):
    def draw(shape, dtype):
        sample = randn(shape, dtype)
        log.append(sample)
        return sample

    return draw


@pytest.mark.parametrize("case", cases("xar_sample_tokens"))
def test_sample_tokens(case):
    g = load(case)
    net = build_xar(case, g).eval()
    B, steps = len(g["labels"]), g["num_steps"]
    calls, draws = _record_calls(net), []
    torch.manual_seed(g["rng_seed"])
    tokens = sample_tokens(net, g["labels"], steps, g["cfg"], randn=_recording(_default_randn, draws))
    check(case, "tokens", tokens, g["tokens"])
    check(case, "cells", to_tokens(tokens).view(B, 4, 64, 16).transpose(0, 1), g["cells"])
    assert torch.equal(time_grid(steps), g["t_steps"])
    assert [d.dtype for d in draws] == ([torch.float32] + [torch.float64] * (steps - 1)) * 4
    per_cell = [draws[i * steps : (i + 1) * steps] for i in range(4)]
    assert torch.equal(torch.stack([d[0] for d in per_cell]), g["latents"])
    assert torch.equal(torch.stack([torch.stack(d[1:]) for d in per_cell]), g["eps"])

    assert len(calls) == len(g["call_x"]) == 4 * steps
    for k, c in enumerate(calls):
        assert (c["cell"], c["extend"]) == (g["call_scale_index"][k], g["call_update_cache"][k])
        assert g["call_mask_len"][k] == (64 * (c["cell"] + 1) if c["extend"] else 0)
        torch.testing.assert_close(c["x"], g["call_x"][k], **tolerance(case, "states"))
        assert torch.equal(c["y"], g["call_y"][k])
        check(case, "call_time_index", c["index"], g["call_time_index"][k])
        check(case, "call_out", c["out"], g["call_out"][k])
        # The state the call saw is the float64 state before step k % steps of its cell.
        state = g["states"][c["cell"], k % steps]
        torch.testing.assert_close(c["x"][:B, -64:].double(), state, **tolerance(case, "states"))
    check(case, "states", g["states"][:, -1].float(), g["cells"])

    # Without randn the draws come from the default generator in the same order.
    del net.cell_velocity
    torch.manual_seed(g["rng_seed"])
    assert torch.equal(sample_tokens(net, g["labels"], steps, g["cfg"]), tokens)


@pytest.mark.parametrize("case", cases("xar_sample_tokens"))
@torch.no_grad()
def test_recorded_calls_replay_from_a_cleared_cache(case):
    g = load(case)
    net = build_xar(case, g).eval()
    net.clear_cache()
    for k in range(len(g["call_x"])):
        index = time_index(g["call_time"][k])
        check(case, "call_time_index", index, g["call_time_index"][k])
        out = net.cell_velocity(
            g["call_x"][k], g["call_y"][k], index, g["call_scale_index"][k], extend=g["call_update_cache"][k]
        )
        check(case, "call_out", out, g["call_out"][k])


@pytest.mark.parametrize("case", cases("xar_sampler_substeps"))
@torch.no_grad()
def test_sampler_substeps(case):
    g = load(case)
    net = build_xar(case, g).eval()
    net.clear_cache()
    y2 = torch.cat([g["labels"], torch.full_like(g["labels"], 1000)])
    for k in range(4):
        kind, cell, x = g[f"s{k}_kind"], g[f"s{k}_scale_index"], g[f"s{k}_x_cur"]
        t_cur, t_next = g[f"s{k}_t_cur"], g[f"s{k}_t_next"]
        inp = x.float()
        t = torch.full((2 * len(x),), t_cur, dtype=torch.float32)
        if kind == "first":
            t = t.double()
            if cell > 0:
                inp = torch.cat([g[f"s{k}_prev"], inp], dim=1)
                t = torch.cat([torch.zeros_like(t), t])
        v = net.cell_velocity(torch.cat([inp, inp]), y2, time_index(t), cell, extend=kind == "first")
        check(case, f"s{k}_v", v, g[f"s{k}_v"])
        drift, x_next = em_step(v, x, t_cur, t_next, g["cfg"], None if kind == "final" else g[f"s{k}_eps"])
        check(case, f"s{k}_drift", drift, g[f"s{k}_drift"])
        check(case, f"s{k}_x_next", x_next, g[f"s{k}_x_next"])


@pytest.mark.parametrize("case", cases("vae_encode_decode"))
@torch.no_grad()
def test_vae(case):
    g = load(case)
    assert g["config"] == case["model"]["kwargs"]
    with torch.device("meta"):  # skip the default init; fill_ sets every parameter
        vae = AutoencoderKL(**g["config"])
    vae = fill_(vae.to_empty(device="cpu"), g["fill_seed"]).eval()
    posterior = vae.encode(g["images"])
    for name in ("moments", "mean", "logvar", "std"):
        check(case, name, getattr(posterior, name), g[name])
    torch.manual_seed(g["rng_seed"])
    z = posterior.sample()
    check(case, "z_sample", z, g["z_sample"])
    assert torch.equal(posterior.sample(torch.Generator().manual_seed(g["rng_seed"])), z)
    check(case, "x_train", z * LATENT_SCALE, g["x_train"])
    check(case, "dec_mean", vae.decode(posterior.mean), g["dec_mean"])
    check(case, "dec_sample", vae.decode(z), g["dec_sample"])

    # The training-batch helper: flips first, then the posterior noise, from one generator.
    images = ((g["images"] + 1) * 127.5).round().to(torch.uint8)
    ours = encode_images(vae, images, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    flip = torch.rand(len(images), generator=gen) < 0.5
    x = uint8_to_pm1(images)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    assert torch.equal(ours, vae.encode(x).sample(gen) * LATENT_SCALE)


def _tiny_sampler_model():
    case = case_of("xar_sample_tokens")
    return fill_(xAR(**case["model"]["kwargs"]), 4).eval()


def test_per_sample_randn_makes_a_samples_draws_independent_of_its_batch():
    net = _tiny_sampler_model()
    labels, seeds = torch.tensor([3, 5, 3]), [11, 12, 11]

    def run(idx):
        draws = []
        randn = per_sample_randn([torch.Generator().manual_seed(seeds[i]) for i in idx])
        tokens = sample_tokens(net, labels[idx], 3, 2.0, randn=_recording(randn, draws))
        return tokens, draws

    batch, batch_draws = run([0, 1, 2])
    alone, alone_draws = run([1])
    assert len(batch_draws) == len(alone_draws) == 12
    for b, a in zip(batch_draws, alone_draws):
        assert torch.equal(b[1:2], a) and torch.equal(b[0], b[2]) and not torch.equal(b[0], b[1])
    # The network sees a different batch, so its outputs agree only to float precision.
    torch.testing.assert_close(batch[1:2], alone, atol=1e-4, rtol=1e-4)
    # One sample's generator draws what the default generator would after manual_seed.
    torch.manual_seed(seeds[1])
    default_draws = []
    sample_tokens(net, labels[1:2], 3, 2.0, randn=_recording(_default_randn, default_draws))
    assert all(torch.equal(a, d) for a, d in zip(alone_draws, default_draws))


@pytest.mark.parametrize("num_steps", [0, 1, 2])
def test_fewer_than_three_steps_are_refused(num_steps):
    with pytest.raises(ValueError, match="num_steps >= 3"):
        sample_tokens(_tiny_sampler_model(), torch.tensor([1]), num_steps, 1.5)


def test_sampling_leaves_no_cache_and_keeps_the_mode():
    net = _tiny_sampler_model().train()
    sample_tokens(net, torch.tensor([1, 2]), 3, 1.5)
    assert net.training
    assert all(
        b.attn.cache_k is None and b.attn.cache_v is None for b in [*net.encoder_blocks, *net.decoder_blocks]
    )


def test_to_uint8_truncates():
    images = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 3.0])
    assert to_uint8(images).tolist() == [0, 0, 127, 254, 255, 255]


def test_checkpoint_layouts():
    sd = {"pred.bias": torch.zeros(16)}
    assert xar_state_dict(sd) is sd
    assert xar_state_dict({"model_ema": sd, "epoch": 3}) is sd
    assert xar_state_dict({"state_dict": sd}) is sd
    assert vae_state_dict({"model": sd}) is sd and vae_state_dict(sd) is sd


def test_mask_is_the_only_non_finite_tensor():
    # Neon's merge must copy tensors holding -inf from the base; for xAR that is exactly `mask`.
    sd = _tiny_sampler_model().state_dict()
    assert [k for k, v in sd.items() if not v.isfinite().all()] == ["mask"]


MANIFESTS = sorted(f.removesuffix(".json") for f in os.listdir(os.path.join(GOLDEN, "manifests")))


@pytest.mark.parametrize("name", MANIFESTS)
def test_full_size_state_dict_matches_manifest(name):
    manifest = json.load(open(os.path.join(GOLDEN, "manifests", f"{name}.json")))
    config = manifest["config"]
    with torch.device("meta"):
        if name.startswith("vae"):
            net = AutoencoderKL(**config["kwargs"])
        else:
            net = getattr(xar_module, config["builder"].split(".")[-1])(**config["builder_kwargs"])
    ours = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in net.state_dict().items()]
    assert ours == [(k, shape, dtype) for k, (shape, dtype) in manifest["state_dict"].items()]
    assert len(ours) == manifest["n_state_dict_entries"]
    assert sum(p.numel() for p in net.parameters()) == manifest["n_params"]
    assert [k for k, _ in net.named_buffers()] == manifest["buffers"]
    if not name.startswith("vae"):
        resolved = config["resolved_xAR_kwargs"]
        hidden = config["derived"]["mlp_hidden (SwiGLU, GELU gate)"]
        assert all(b.mlp.fc1_g.out_features == hidden for b in [*net.encoder_blocks, *net.decoder_blocks])
        assert (net.label_drop_prob, net.diffusion_batch_mul) == (
            resolved["label_drop_prob"],
            resolved["diffusion_batch_mul"],
        )
