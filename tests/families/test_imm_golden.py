"""IMM against SinaAlemohammad/Neon:imm (lumalabs/imm @ c9473e9 plus the authors' loss): the golden vectors
in tests/golden/imm (upstream's code run on CPU in float32; see its README), the official DiT-XL/2,
SongUNet and SD-VAE manifests, and the batch independence of per-sample initial latents.

Every golden case is rebuilt as its entry says: IMMPrecond(**constructor), fill_(net, fill_seed) over the
whole preconditioner; the tolerances are the ones the README states for each kind.
"""

import json
from pathlib import Path

import pytest
import torch

import imm
from tests.golden.fill import fill_

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "imm"
CASES = json.loads((GOLDEN / "cases.json").read_text())
MANIFESTS = sorted((GOLDEN / "manifests").glob("*.json"))

# The README's tolerances, per kind.
FORWARD_TOL = dict(atol=1e-4, rtol=1e-4)
SCALAR_TOL = dict(atol=0, rtol=1e-6)  # c_in, c_noise, the VAE's constants and raw latents
EXACT = dict(atol=0, rtol=0)
LOSS_TOL = {
    "t": dict(atol=1e-12, rtol=0),
    "r": dict(atol=1e-12, rtol=0),
    "s": dict(atol=1e-12, rtol=0),
    "yt": dict(atol=1e-6, rtol=0),
    "yr": dict(atol=1e-6, rtol=0),
    "f_st": dict(atol=1e-4, rtol=0),
    "f_sr": dict(atol=1e-4, rtol=0),
    "w": dict(atol=0, rtol=1e-12),
    "wout": dict(atol=0, rtol=1e-12),
    **{
        k: dict(atol=2e-5, rtol=0)
        for k in ("K_st_st", "K_sr_sr", "K_st_sr", "inter_sample_sim", "inter_gt_sim", "cross_sim")
    },
    "loss": dict(atol=1e-6, rtol=1e-3),
    **{k: EXACT for k in ("u_t", "u_s", "u_drop", "z", "noise", "drop_mask", "labels_drop")},
}
GRAD_TOL = dict(atol=1e-6, rtol=1e-3)
STATE_TOL = dict(atol=1e-4, rtol=0)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.numerics]


def _cases(kind):
    return [pytest.param(case, id=Path(case["file"]).stem) for case in CASES if case["kind"] == kind]


def _case(name):
    return next(case for case in CASES if case["file"].startswith(name))


def _golden(case):
    return torch.load(GOLDEN / case["file"], weights_only=True)


def _build(case):
    kwargs = {k: v for k, v in case["constructor"].items() if k != "class_name"}
    return fill_(imm.IMMPrecond(**kwargs), case["fill_seed"]).eval().requires_grad_(False)


def _close(actual, expected, tol, what):
    torch.testing.assert_close(actual, expected, **tol, msg=lambda m: f"{what}: {m}")


def _first_output(store, key):
    """A forward hook keeping a module's first output in store[key] (and not replacing outputs)."""

    def hook(module, args, output):
        store.setdefault(key, output)

    return hook


def _vae(case):
    vae = (
        fill_(imm.build_autoencoder(case["vae_config"], device="cpu"), case["fill_seed"])
        .eval()
        .requires_grad_(False)
    )
    kw = case["encoder_kwargs"]
    return imm.StabilityVAEEncoder(
        vae, raw_mean=kw["raw_mean"], raw_std=kw["raw_std"], final_std=kw["final_std"]
    )


@pytest.mark.parametrize("case", _cases("forward"))
def test_forward(case):
    golden = _golden(case)
    net = _build(case)
    x, t, s, labels = golden["x"], golden["t"], golden["s"], golden["class_labels"]
    got = {}
    model = net.model
    hooks = [model.register_forward_hook(lambda m, args, F: got.update(model_in=args, F_raw=F))]
    for key, module in (
        ("emb_t", model.t_embedder),
        ("emb_s", model.s_embedder),
        ("emb_y", model.y_embedder),
        ("tokens_patch", model.x_embedder),
        ("final_layer_out", model.final_layer),
        *((f"block{i}_out", block) for i, block in enumerate(model.blocks)),
    ):
        hooks.append(module.register_forward_hook(_first_output(got, key)))
    with torch.no_grad():
        got["out"] = net(x, t, s, labels)
        for hook in hooks:
            hook.remove()
        got["out_t64"] = net(x, t.double(), s.double(), labels)
        train_out = net.train()(x, t, s, labels)
    # With autograd on, the MLP's GELU writes a new tensor instead of overwriting fc1's output.
    grad_out = net.eval()(x, t, s, labels)

    assert got["out"].dtype == torch.float32 and got["out_t64"].dtype == torch.float64
    x_in, c_noise_t, c_noise_s = got.pop("model_in")[:3]
    _close(x_in, golden["c_in"] * x, SCALAR_TOL, "c_in * x")
    _close(c_noise_t, golden["c_noise_t"], SCALAR_TOL, "c_noise_t")
    _close(c_noise_s, golden["c_noise_s"], SCALAR_TOL, "c_noise_s")
    expected = [key for key in golden if key in got]
    assert {"F_raw", "out", "out_t64"} <= set(expected)
    for key in expected:
        _close(got[key], golden[key], FORWARD_TOL, key)
    _close(train_out, got["out"], EXACT, "train mode")
    _close(grad_out, got["out"], EXACT, "autograd on")

    if "pos_embed_sincos_init" in golden:
        fresh = imm.IMMPrecond(**{k: v for k, v in case["constructor"].items() if k != "class_name"})
        _close(
            fresh.model.pos_embed.detach(),
            golden["pos_embed_sincos_init"],
            dict(atol=1e-7, rtol=0),
            "pos_embed",
        )


@pytest.mark.parametrize("case", _cases("cfg_forward"))
def test_cfg_forward(case):
    golden = _golden(case)
    net = _build(case)
    x, labels, t, s = golden["x"], golden["class_labels"], golden["t"], golden["s"]
    calls = []
    net.model.register_forward_hook(
        lambda m, args, kwargs, F: calls.append((args, kwargs, F)), with_kwargs=True
    )
    with torch.no_grad():
        out_f32 = net.cfg_forward(x, t.float(), s.float(), class_labels=labels, cfg_scale=case["cfg_scale"])
        out_f64 = net.cfg_forward(x.double(), t, s, class_labels=labels, cfg_scale=case["cfg_scale"])
        # Per-sample times give the same step as scalar ones.
        per_sample = net.cfg_forward(
            x,
            t.float().expand(3, 1, 1, 1),
            s.float().expand(3, 1, 1, 1),
            class_labels=labels,
            cfg_scale=case["cfg_scale"],
        )
    assert len(calls) == 3
    args, kwargs, F = calls[0]
    assert args[0].shape[0] == 2 * x.shape[0]
    _close(kwargs["class_labels"], torch.cat([torch.zeros_like(labels), labels]), EXACT, "doubled labels")
    F_uncond, F_cond = F.chunk(2)
    _close(F_uncond, golden["F_uncond"], FORWARD_TOL, "F_uncond")
    _close(F_cond, golden["F_cond"], FORWARD_TOL, "F_cond")
    assert out_f32.dtype == torch.float32 and out_f64.dtype == torch.float64
    _close(out_f32, golden["out_f32"], FORWARD_TOL, "out_f32")
    _close(out_f64, golden["out_f64path"], FORWARD_TOL, "out_f64path")
    _close(per_sample, out_f32, dict(atol=1e-6, rtol=0), "per-sample t, s")


def _check_loss_terms(out, golden, params):
    for key, tol in LOSS_TOL.items():
        _close(out[key], golden[key], tol, key)
    _close(out["loss"].mean(), golden["loss_mean"], LOSS_TOL["loss"], "loss_mean")
    grads = [key for key in golden if key.startswith("grad/")]
    assert grads
    for key in grads:
        _close(params[key[len("grad/") :]].grad, golden[key], GRAD_TOL, key)


@pytest.mark.parametrize("case", _cases("loss"))
def test_loss(case):
    golden = _golden(case)
    net = _build(case).train().requires_grad_(True)
    loss_fn = imm.IMMLoss(**case["loss_kwargs"])
    images, labels = golden["images"], golden["labels"]
    if case["mode"] == "seeded":
        torch.manual_seed(case["rng_seed"])
        out = loss_fn.terms(net, images, labels)
    else:
        out = loss_fn.terms(net, images, labels, draws={k: golden[k] for k in imm.loss.DRAWS})
    assert out["loss"].shape == (case["groups"],)
    out["loss"].mean().backward()
    _check_loss_terms(out, golden, dict(net.named_parameters()))

    # __call__ returns the same vector; a given generator replays the global one's stream.
    with torch.no_grad():
        if case["mode"] == "seeded":
            torch.manual_seed(123)
            again = loss_fn(net, images, labels, generator=torch.Generator().manual_seed(case["rng_seed"]))
        else:
            again = loss_fn(net, images, labels, draws={k: golden[k] for k in imm.loss.DRAWS})
    _close(again, out["loss"].detach(), EXACT, "loss via __call__")


def test_loss_label_dropout_in_target_is_a_flag():
    case = _case("b2_")
    golden = _golden(case)
    net = _build(case)
    draws = {k: golden[k] for k in imm.loss.DRAWS}
    with torch.no_grad():
        out = imm.IMMLoss(**case["loss_kwargs"], drop_labels_in_target=True).terms(
            net, golden["images"], golden["labels"], draws=draws
        )
        # The target branch, rebuilt by hand with the dropped labels.
        r = out["r"].repeat_interleave(4).reshape(-1, 1, 1, 1)
        s = out["s"].repeat_interleave(4).reshape(-1, 1, 1, 1)
        expected = net(out["yr"], r, s, golden["labels_drop"])
    dropped = golden["drop_mask"] & (golden["labels"].sum(1) > 0)
    assert dropped.any()
    _close(out["f_sr"], expected, EXACT, "f_sr with dropped labels")
    _close(out["f_sr"][~dropped], golden["f_sr"][~dropped], LOSS_TOL["f_sr"], "rows not dropped")
    assert (out["f_sr"][dropped] - golden["f_sr"][dropped]).abs().max() > 1e-3


@pytest.mark.parametrize("case", _cases("sampler"))
def test_sampler(case):
    golden = _golden(case)
    net = _build(case)
    for steps in case["steps"]:
        for variant, dtype in (("neon", torch.float32), ("luma", torch.float64)):
            what = f"T{steps}_{variant}"
            t_steps = imm.time_steps(net, case["discretization"], steps, dtype=dtype)
            _close(t_steps, golden[f"{what}_t_steps"], EXACT, f"{what}_t_steps")
            with torch.inference_mode():
                x, states = imm.pushforward_generator_fn(
                    net,
                    golden["z"].to(dtype),
                    golden["class_labels"],
                    discretization=case["discretization"],
                    num_steps=steps,
                    cfg_scale=case["cfg_scale"],
                    return_states=True,
                )
            assert x.dtype == dtype and torch.equal(states[-1], x)
            _close(states, golden[f"{what}_states"], STATE_TOL, f"{what}_states")

    if "decoded_uint8" in golden:
        encoder = _vae(_case("d1_"))
        final = golden["T8_neon_states"][-1]
        _close(encoder.raw_latents(final), golden["decoded_raw_latents"], SCALAR_TOL, "decoded_raw_latents")
        with torch.no_grad():
            vae_out = encoder.vae.decode(golden["decoded_raw_latents"]).sample
        _close(vae_out, golden["decoded_vae_out"], FORWARD_TOL, "decoded_vae_out")
        diff = (encoder.decode(final).int() - golden["decoded_uint8"].int()).abs()
        assert diff.max() <= 1


@pytest.mark.parametrize("case", _cases("vae"))
def test_vae(case):
    golden = _golden(case)
    encoder = _vae(case)
    _close(encoder.scale, golden["enc_scale"], SCALAR_TOL, "enc_scale")
    _close(encoder.bias, golden["enc_bias"], SCALAR_TOL, "enc_bias")
    _close(encoder.raw_latents(golden["latents"]), golden["raw_latents"], SCALAR_TOL, "raw_latents")
    with torch.no_grad():
        vae_out = encoder.vae.decode(golden["raw_latents"]).sample
    _close(vae_out, golden["vae_out"], FORWARD_TOL, "vae_out")
    pixels = encoder.decode(golden["latents"])
    assert pixels.dtype == torch.uint8 and (pixels.int() - golden["pixels_uint8"].int()).abs().max() <= 1

    mean_std = encoder.encode_pixels(golden["enc_pixels_uint8"])
    assert mean_std.shape[1] == 8
    _close(mean_std, golden["enc_mean_std"], FORWARD_TOL, "enc_mean_std")
    final = encoder.encode_latents(golden["enc_mean_std"], noise=golden["enc_noise"])
    _close(final, golden["enc_final_latents"], FORWARD_TOL, "enc_final_latents")
    # encode() of the 8-channel mean/std is encode_latents(); a generator replaces the global stream.
    torch.manual_seed(5)
    drawn = encoder.encode(golden["enc_mean_std"])
    _close(
        encoder.encode(golden["enc_mean_std"], generator=torch.Generator().manual_seed(5)),
        drawn,
        EXACT,
        "generator",
    )


@pytest.mark.parametrize("case", _cases("songunet"))
def test_songunet(case):
    golden = _golden(case)
    net = _build(case)
    got = {}
    net.model.register_forward_hook(_first_output(got, "F_raw"))
    with torch.inference_mode():
        got["out"] = net(golden["x"], golden["t"], golden["s"])
        z = golden["z"].double()
        got["sample_1step"] = imm.pushforward_generator_fn(net, z, discretization=None)
        got["sample_2step"], states = imm.pushforward_generator_fn(
            net, z, discretization=None, mid_nt=[1.4], return_states=True
        )
    got["sample_2step_mid"] = states[1]
    for key in ("F_raw", "out", "sample_1step", "sample_2step", "sample_2step_mid"):
        _close(got[key], golden[key], FORWARD_TOL, key)
    t_steps = imm.time_steps(net, None, mid_nt=[1.4], dtype=torch.float64)
    _close(t_steps, golden["sample_2step_t_steps"], dict(atol=1e-7, rtol=0), "sample_2step_t_steps")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_official_network_matches_manifest(path):
    """Same keys, order, shapes and dtypes as the official state dicts (built on the meta device)."""
    manifest = json.loads(path.read_text())
    config = manifest["config"]
    if "class_name" in config:
        assert config["class_name"] == "training.preconds.IMMPrecond"
        with torch.device("meta"):
            net = imm.IMMPrecond(**{k: v for k, v in config.items() if k != "class_name"})
    else:
        net = imm.build_autoencoder(config)
        assert config == {k: list(v) if isinstance(v, tuple) else v for k, v in imm.SD_VAE_CONFIG.items()}
    ours = [(key, list(t.shape), str(t.dtype).removeprefix("torch.")) for key, t in net.state_dict().items()]
    theirs = [(key, shape, dtype) for key, (shape, dtype) in manifest["state_dict"].items()]
    assert ours == theirs
    assert sum(p.numel() for p in net.parameters()) == manifest["n_params"]


def _tiny_net():
    return _build(_case("a1_"))


def test_initial_latents_do_not_depend_on_the_batch():
    seeds = [3, 11, 2**40 + 5, 7]
    shape = [4, 8, 8]
    batch = imm.initial_latents(imm.generators(seeds), shape)
    assert batch.shape == (4, *shape) and batch.dtype == torch.float32
    for i, seed in enumerate(seeds):
        alone = imm.initial_latents(imm.generators([seed]), shape)
        assert torch.equal(batch[i], alone[0])
    reordered = imm.initial_latents(imm.generators(seeds[::-1]), shape)
    assert torch.equal(reordered, batch.flip(0))
    assert torch.equal(batch[0], torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    assert not torch.equal(batch[0], batch[1])
    assert imm.initial_latents(imm.generators(seeds[:1]), shape, dtype=torch.float64).dtype == torch.float64

    # Samples of a batch and of the same seeds alone agree within float rounding (not bitwise).
    net = _tiny_net()
    labels = torch.eye(10)[[1, 4, 4, 9]]
    with torch.inference_mode():
        together = imm.pushforward_generator_fn(net, batch, labels, num_steps=2, cfg_scale=1.5)
        split = torch.cat(
            [
                imm.pushforward_generator_fn(
                    net, batch[i : i + 1], labels[i : i + 1], num_steps=2, cfg_scale=1.5
                )
                for i in range(4)
            ]
        )
    _close(split, together, dict(atol=1e-5, rtol=0), "batch composition")


def test_sampler_is_the_chain_of_maps():
    """The sampler is x_{i+1} = f_{t_{i+1}, t_i}(x_i) on the uniform grid, with one call per step."""
    net = _tiny_net()
    z = imm.initial_latents(imm.generators([0, 1]), [4, 8, 8])
    labels = torch.eye(10)[[2, 3]]
    calls = []
    net.model.register_forward_hook(
        lambda m, args, kwargs, F: calls.append(args[0].shape[0]), with_kwargs=True
    )
    with torch.inference_mode():
        x = imm.pushforward_generator_fn(net, z, labels, num_steps=4, cfg_scale=None)
        ref = z
        grid = torch.linspace(0.994, 0, 5)
        for t_cur, t_next in zip(grid[:-1], grid[1:]):
            ref = net(ref, t_cur, t_next, labels)
    assert calls == [2] * 8
    _close(x, ref, EXACT, "chain")
    assert imm.time_steps(net, "edm", 4, dtype=torch.float64)[[0, -1]].tolist() == pytest.approx([0.994, 0.0])


def test_vae_loads_from_a_local_folder(tmp_path):
    case = _case("d1_")
    golden = _golden(case)
    encoder = _vae(case)
    encoder.vae.save_pretrained(tmp_path)
    kw = case["encoder_kwargs"]
    loaded = imm.StabilityVAEEncoder.from_pretrained(tmp_path, raw_mean=kw["raw_mean"], raw_std=kw["raw_std"])
    assert not loaded.vae.training
    assert torch.equal(loaded.decode(golden["latents"]), encoder.decode(golden["latents"]))
