"""models.py: full-size architectures, tiny backbones through the one interface, the real diffusers layout."""
import json
import math
import re

import pytest
import torch

import models
import sipo

# Denoiser parameter counts of the published checkpoints: SD1.5 860M, SDXL 2.6B, CogVideoX 1.69B / 5.57B,
# Wan2.1 "1.3B" (1.42B; its bf16 safetensors is 2.84 GB). The exact numbers are what the published configs build.
PUBLISHED = {
    "sd1.5": {"denoiser": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sdxl": {"denoiser": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
             "text_encoder_2": 694_659_840},
    "cogvideox-2b": {"denoiser": 1_693_783_872, "vae": 215_583_907, "text_encoder": 4_762_310_656},
    "cogvideox-5b": {"denoiser": 5_570_283_072, "vae": 215_583_907, "text_encoder": 4_762_310_656},
    "wan2.1-1.3b": {"denoiser": 1_418_996_800, "vae": 126_892_531, "text_encoder": 5_680_910_336},
    "flux.1-dev": {"denoiser": 11_901_408_320, "vae": 83_819_683, "text_encoder": 123_060_480,
                   "text_encoder_2": 4_762_310_656},
}
TINY = [f"tiny-{name}" for name in models.FULL] + ["toy"]


@pytest.mark.parametrize("name", models.FULL)
def test_full_size_architecture_on_meta_has_the_published_parameter_count(name):
    backbone = models.load_backbone(name, device="meta", random_weights=True)
    assert models.parameter_counts(backbone) == PUBLISHED[name]
    assert backbone.denoiser.device.type == "meta"


def dpo_step(backbone, pairs=2, seed=0):
    """One Diffusion-DPO step through the interface, the reference being a frozen copy of the denoiser."""
    generator = torch.Generator().manual_seed(seed)
    height, width = backbone.resolution
    frames = (backbone.num_frames,) if backbone.is_video else ()
    pixels = torch.rand(2 * pairs, 3, *frames, height, width, generator=generator) * 2 - 1
    x0 = backbone.encode_pixels(pixels)
    cond = backbone.encode_prompts(["a red circle", "a blue square"] * pairs)
    levels = backbone.sample_noise_levels(pairs, generator).repeat(2)
    noise = torch.randn(x0[:pairs].shape, generator=generator).repeat(2, *[1] * (x0.dim() - 1))
    (a, s), _ = backbone.coefficients(levels)
    x_t = sipo.add_noise(x0, noise, a, s)
    target = sipo.native_target(x0, noise, a, s, backbone.prediction)
    error = sipo.per_sample_error(backbone.predict(backbone.denoiser, x_t, levels, cond), target)
    with torch.no_grad():
        reference = type(backbone.denoiser).from_config(backbone.denoiser.config)
        reference.load_state_dict(backbone.denoiser.state_dict())
        ref_error = sipo.per_sample_error(backbone.predict(reference, x_t, levels, cond), target)
    loss, stats = sipo.diffusion_dpo_loss(*error.chunk(2), *ref_error.chunk(2), beta=1000.0)
    loss.backward()
    return loss, stats


@pytest.mark.parametrize("name", TINY)
def test_tiny_backbone_trains_one_dpo_step_with_gradient_checkpointing(name):
    torch.manual_seed(0)
    backbone = models.prepare_for_training(models.load_backbone(name), gradient_checkpointing=True)
    assert backbone.denoiser.is_gradient_checkpointing
    loss, stats = dpo_step(backbone)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-4), "policy = reference at initialisation"
    grads = [p.grad for p in backbone.denoiser.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    for module in backbone.frozen_modules():
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())


@pytest.mark.parametrize("name", TINY)
def test_saved_layout_loads_back_with_the_same_outputs_and_samples(name, tmp_path):
    torch.manual_seed(0)
    backbone = models.load_backbone(name)
    backbone.pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == models.SPECS[name.removeprefix("tiny-")][2].__name__
    assert list(tmp_path.glob("*/*.safetensors")), "weights are saved as safetensors"
    loaded = models.load_backbone(name, pretrained=str(tmp_path))
    # The weights round-trip bit for bit; the outputs of two separately loaded models only to a tolerance: kernels
    # differ with the CPU (AVX2 vs AVX-512) and with memory alignment.
    for part in ("denoiser", *backbone.frozen_parts()):
        saved, restored = getattr(backbone, part, None) or getattr(backbone.pipe, part), \
            getattr(loaded, part, None) or getattr(loaded.pipe, part)
        saved, restored = saved.state_dict(), restored.state_dict()
        assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved), part
    close = {"rtol": 1e-4, "atol": 1e-5}
    prompts = ["a red circle"]
    cond, cond_loaded = backbone.encode_prompts(prompts), loaded.encode_prompts(prompts)
    for k in cond:
        torch.testing.assert_close(cond[k], cond_loaded[k], **close)
    height, width = backbone.resolution
    frames = (backbone.num_frames,) if backbone.is_video else ()
    pixels = torch.rand(1, 3, *frames, height, width) * 2 - 1
    x0 = backbone.encode_pixels(pixels)
    torch.testing.assert_close(x0, loaded.encode_pixels(pixels), **close)
    levels = backbone.sample_noise_levels(1)
    with torch.no_grad():
        out = backbone.predict(backbone.denoiser, x0, levels, cond)
        torch.testing.assert_close(out, loaded.predict(loaded.denoiser, x0, levels, cond), **close)
    sample = loaded.sample(prompts, seed=1, steps=2)
    expected = (1, backbone.num_frames, 3, height, width) if backbone.is_video else (1, 3, height, width)
    assert tuple(sample.shape) == expected and torch.isfinite(sample).all()
    assert 0 <= sample.min() and sample.max() <= 1
    torch.testing.assert_close(sample, backbone.sample(prompts, seed=1, steps=2), **close)
    assert torch.equal(sample, loaded.sample(prompts, seed=1, steps=2)), "same seed, same sample"


def test_parameterisations_and_schedules_match_the_families():
    expected = {"tiny-sd1.5": "epsilon", "tiny-sdxl": "epsilon", "tiny-cogvideox-2b": "v", "tiny-cogvideox-5b": "v",
                "tiny-wan2.1-1.3b": "flow", "toy": "v"}
    for name, prediction in expected.items():
        backbone = models.load_backbone(name)
        assert backbone.prediction == prediction
        if name.startswith("tiny-cogvideox"):
            assert backbone.pipe.scheduler.alphas_cumprod[-1].item() == 0.0, "zero terminal SNR"
            (a, s), _ = backbone.coefficients(torch.tensor([999]))
            assert a.item() == 0.0 and s.item() == 1.0
    wan = models.load_backbone("tiny-wan2.1-1.3b")
    levels = wan.sample_noise_levels(10_000, torch.Generator().manual_seed(0))
    assert wan.flow_shift == 3.0
    assert levels.mean().item() == pytest.approx(0.75 * (2 - math.log(3)), abs=0.01)  # E[3u / (1 + 2u)]
    (_, s_t), (_, s_s) = wan.coefficients(torch.tensor([0.5]))
    assert s_t.item() - s_s.item() == pytest.approx(0.02)


def test_bad_names_and_paths_fail_with_one_line(tmp_path):
    with pytest.raises(models.ModelError, match="unknown model 'sd2'; choose one of: sd1.5"):
        models.load_backbone("sd2")
    with pytest.raises(models.ModelError, match="Wan-AI/Wan2.1-T2V-1.3B-Diffusers: not a local directory, and the hub "
                                                "id cannot be loaded .* pass DIR instead of the id"):
        models.load_backbone("wan2.1-1.3b")  # offline: the default is the official repository
    with pytest.raises(models.ModelError, match=f"{tmp_path}: not a diffusers layout"):
        models.load_backbone("sd1.5", pretrained=str(tmp_path))
    models.load_backbone("tiny-sd1.5").pipe.save_pretrained(tmp_path / "sd")
    with pytest.raises(models.ModelError, match="holds a StableDiffusionPipeline, but --model wan2.1-1.3b needs a "
                                                "WanPipeline"):
        models.load_backbone("wan2.1-1.3b", pretrained=str(tmp_path / "sd"))
    models.load_backbone("tiny-cogvideox-2b").pipe.save_pretrained(tmp_path / "cog")
    message = "without rotary embeddings does not match --model cogvideox-5b"
    with pytest.raises(models.ModelError, match=message) as info:
        models.load_backbone("cogvideox-5b", pretrained=str(tmp_path / "cog"))
    assert "\n" not in str(info.value)


def test_bf16_loading_keeps_wans_vae_and_the_modules_diffusers_marks_in_fp32(tmp_path):
    torch.manual_seed(0)
    models.load_backbone("tiny-wan2.1-1.3b").pipe.save_pretrained(tmp_path)
    for backbone in (models.load_backbone("tiny-wan2.1-1.3b", pretrained=str(tmp_path), dtype=torch.bfloat16),
                     models.load_backbone("tiny-wan2.1-1.3b", dtype=torch.bfloat16)):
        assert backbone.pipe.vae.dtype == torch.float32 and backbone.pipe.text_encoder.dtype == torch.bfloat16
        assert backbone.denoiser.dtype == torch.bfloat16
    loaded = models.load_backbone("tiny-wan2.1-1.3b", pretrained=str(tmp_path), dtype=torch.bfloat16)
    assert loaded.denoiser.scale_shift_table.dtype == torch.float32, "from_pretrained keeps Wan's fp32 modules"
    assert models.load_backbone("tiny-sd1.5", dtype=torch.bfloat16).pipe.vae.dtype == torch.bfloat16


def test_per_prompt_seeds_make_a_sample_independent_of_its_batch():
    torch.manual_seed(0)
    backbone = models.load_backbone("toy")
    pair = backbone.sample(["a red circle", "a blue square"], seed=[3, 4], steps=2)
    alone = backbone.sample(["a blue square"], seed=[4], steps=2)
    torch.testing.assert_close(pair[1], alone[0], rtol=1e-4, atol=1e-5)
    assert (pair[0] - backbone.sample(["a red circle"], seed=[4], steps=2)[0]).abs().max() > 1e-3


def test_flux_trains_and_samples_on_its_resolution_shifted_sigmas_and_the_weight_follows_them_by_hand():
    """FLUX's sampler steps through sigmas shifted by k = exp(mu), mu linear in the packed image's tokens; training
    draws its sigmas through the same shift, and the step weight is the closed form of docs/method.md §3 between
    sigma and the previous step of that shifted grid."""
    backbone = models.load_backbone("tiny-flux.1-dev")
    tokens = (32 // 2 // 2) ** 2  # 32 x 32 pixels, the tiny VAE's x2, 2 x 2 patches
    k = math.exp(0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256))
    assert backbone.flow_shift == pytest.approx(k, rel=1e-9)
    scheduler = backbone.pipe.scheduler
    scheduler.set_timesteps(sigmas=list(torch.linspace(1.0, 1 / 8, 8).tolist()), mu=math.log(k))
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), sipo.shift_sigma(torch.linspace(1.0, 1 / 8, 8), k)
                               .double(), rtol=1e-5, atol=1e-6)
    drawn = backbone.sample_noise_levels(20_000, torch.Generator().manual_seed(0))
    assert drawn.median().item() == pytest.approx(k * 0.5 / (1 + (k - 1) * 0.5), abs=0.01)

    def snr(x):
        return (1 - x) ** 2 / x ** 2
    for sigma in (0.2, 0.5, 0.9):
        uniform = sigma / (k - (k - 1) * sigma)
        earlier = k * (uniform - 1 / 50) / (1 + (k - 1) * (uniform - 1 / 50))
        error = 0.3  # the flow target's MSE; the x0 error is sigma^2 times it
        expected = -0.5 * (snr(earlier) - snr(sigma)) * sigma ** 2 * error
        got = backbone.step_log_weight(torch.tensor([error]), torch.tensor([sigma]), 50)
        assert got.item() == pytest.approx(expected, rel=1e-5), sigma


def test_flux_without_pretrained_weights_offline_names_its_hub_id():
    with pytest.raises(models.ModelError, match=r"^black-forest-labs/FLUX.1-dev: not a local directory"):
        models.load_backbone("flux.1-dev")


def test_resize_takes_the_sizes_a_backbone_can_make_and_refuses_others_in_one_line():
    """--resolution in multiples of one latent token's pixels (a UNet's deepest level), --frames 4k + 1; FLUX's
    sigma shift follows its resolution."""
    wan = models.load_backbone("wan2.1-1.3b", device="meta", random_weights=True)
    assert wan.resize((240, 416), 9) is wan and (wan.resolution, wan.num_frames) == ((240, 416), 9)
    for size, frames, message in (((240, 420), None, "--resolution 240x420: wan2.1-1.3b needs sides in multiples "
                                                     "of 16 pixels"),
                                  (None, 8, "--frames 8: wan2.1-1.3b's VAE takes 4k + 1 frames (1, 5, 9, ...)")):
        with pytest.raises(models.ModelError, match=re.escape(message)):
            wan.resize(size, frames)
    sd = models.load_backbone("sd1.5", device="meta", random_weights=True)
    with pytest.raises(models.ModelError, match="sd1.5 needs sides in multiples of 64 pixels"):
        sd.resize((480, 480))  # 8 x 2^3: the UNet halves the 64 x 64 latent three times
    with pytest.raises(models.ModelError, match="--frames 5: sd1.5 makes images"):
        sd.resize(None, 5)
    flux = models.load_backbone("flux.1-dev", device="meta", random_weights=True)
    native = flux.flow_shift
    assert flux.resize((512, 512)).flow_shift < native  # fewer tokens, less shift (calculate_shift)


def test_random_weights_are_built_in_place_with_only_the_parts_a_run_holds():
    """The native-size failure a tiny model can show: each part made directly in its dtype (no fp32 copy first) and,
    with `only`, the others on the meta device (a T5-XXL in fp32 is 19 GB before its cast)."""
    encoders = models.load_backbone("tiny-cogvideox-5b", dtype=torch.bfloat16, only="frozen")
    assert encoders.denoiser.device.type == "meta" and encoders.device.type == "cpu"
    assert encoders.pipe.text_encoder.dtype == encoders.pipe.vae.dtype == torch.bfloat16
    denoiser = models.load_backbone("tiny-wan2.1-1.3b", denoiser_dtype=torch.bfloat16, only="denoiser")
    assert {p.device.type for m in denoiser.frozen_modules() for p in m.parameters()} == {"meta"}
    assert denoiser.denoiser.dtype == torch.bfloat16 and denoiser.pipe.vae.dtype == torch.float32  # FP32_PARTS
    assert torch.get_default_dtype() == torch.float32, "building leaves the default dtype as it was"


def test_every_vae_encodes_one_sample_at_a_time():
    """At native size a video VAE's activations are gigabytes a sample (figure 10): data.py cache's batch of pairs
    goes through it one sample at a time (diffusers' slicing), with the same latents as batched up to float noise."""
    for name in models.FULL:
        backbone = models.load_backbone(f"tiny-{name}")
        assert backbone.pipe.vae.use_slicing, name
    backbone = models.load_backbone("tiny-sd1.5")
    pixels = torch.rand(3, 3, *backbone.resolution) * 2 - 1
    sliced = backbone.encode_pixels(pixels)
    backbone.pipe.vae.disable_slicing()
    assert torch.allclose(sliced, backbone.encode_pixels(pixels), atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-sd1.5", "tiny-wan2.1-1.3b", "tiny-flux.1-dev"])
def test_min_noise_cuts_off_the_cleanest_fraction_of_the_schedule_for_ddpm_and_flow(name):
    """train.py --min-noise F: DDPM's t uniform on ceil(F T)..T-1; flow's sigma = shift(u), u uniform on [F, 1)
    (checked by its quartiles against the inverse shift); F = 0 draws bit for bit what the default draws."""
    backbone = models.load_backbone(name)
    default = backbone.sample_noise_levels(5000, torch.Generator().manual_seed(1))
    assert torch.equal(backbone.sample_noise_levels(5000, torch.Generator().manual_seed(1), lowest=0.0), default)
    drawn = backbone.sample_noise_levels(20_000, torch.Generator().manual_seed(0), lowest=0.3)
    if backbone.prediction != "flow":
        assert drawn.min().item() == 300 and drawn.max().item() == 999
        assert drawn.float().mean().item() == pytest.approx((300 + 999) / 2, abs=5)
        return
    k = backbone.flow_shift
    uniform = drawn / (k - (k - 1) * drawn)  # models.unshift_sigma, written out
    assert uniform.min().item() >= 0.3 - 1e-6 and uniform.max().item() <= 1
    for q in (0.25, 0.5, 0.75):
        assert torch.quantile(uniform, q).item() == pytest.approx(0.3 + 0.7 * q, abs=0.01)
