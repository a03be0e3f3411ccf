"""The paper's five backbones (and a toy one) behind one small interface.

Three ways to get each: pretrained weights in the diffusers layout (a local directory or a hub id), the full-size
architecture with random weights (on the meta device for counting, or materialised), or a tiny version of the same
classes that runs on CPU in milliseconds. This is the only file that knows a backbone's classes, latent layouts,
scalings and conditioning quirks; the noising math comes from sipo.py.

    python models.py            # lists every name with its parameter counts (full-size ones on the meta device)
"""
import contextlib
import inspect
import json
import math
import string
import sys
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import transformers

# Our console shows our progress bars and results: the libraries' loading bars and notices (torchvision missing,
# modules kept in fp32, hub retries) are silenced at their source; their errors still raise.
diffusers.utils.logging.set_verbosity_error()
diffusers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

from diffusers import (AutoencoderKL, AutoencoderKLCogVideoX, AutoencoderKLWan, CogVideoXDDIMScheduler,
                       CogVideoXPipeline, CogVideoXTransformer3DModel, DDIMScheduler, FlowMatchEulerDiscreteScheduler,
                       FluxPipeline, FluxTransformer2DModel, StableDiffusionPipeline, StableDiffusionXLPipeline,
                       UNet2DConditionModel, WanPipeline, WanTransformer3DModel)  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config,
                          T5EncoderModel, T5Tokenizer, UMT5Config, UMT5EncoderModel)  # noqa: E402
from tokenizers.pre_tokenizers import ByteLevel  # noqa: E402

import sipo  # noqa: E402

FULL = ("sd1.5", "sdxl", "cogvideox-2b", "cogvideox-5b", "wan2.1-1.3b", "flux.1-dev")
# Wan's VAE stays fp32 whatever the compute dtype, as diffusers advises; its pipeline casts latents to the VAE's
# dtype before decoding (the others decode in the latents' dtype, so their VAEs follow the compute dtype).
FP32_PARTS = {"wan": ("vae",)}
NAMES = FULL + tuple(f"tiny-{name}" for name in FULL) + ("toy",)
# The official diffusers repositories of the full-size models: the default of --pretrained. (CogVideoX moved from
# THUDM/ to zai-org/; the hub redirects the old ids.)
HUB_IDS = {"sd1.5": "stable-diffusion-v1-5/stable-diffusion-v1-5", "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
           "cogvideox-2b": "zai-org/CogVideoX-2b", "cogvideox-5b": "zai-org/CogVideoX-5b",
           "wan2.1-1.3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "flux.1-dev": "black-forest-labs/FLUX.1-dev"}
# FLUX.1-dev is guidance-distilled: its transformer embeds a guidance value. Training feeds it the one diffusers'
# FLUX training examples default to (train_dreambooth_lora_flux.py: --guidance_scale 3.5); train.py's
# --flux-guidance sets it.
FLUX_TRAINING_GUIDANCE = 3.5


class ModelError(ValueError):
    """A bad model name, path or layout; its message is one line naming the culprit."""


# ---------------------------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Backbone:
    """One backbone: the diffusers pipeline (which owns every component) and what training needs to know.

    Latents are kept in the denoiser's own layout: (B, C, H, W) for images, (B, F, C, H, W) for CogVideoX,
    (B, C, F, H, W) for Wan. Conditioning is a dict of batch-first tensors, so it can be cached and concatenated.
    """
    name: str
    family: str                      # "sd", "sdxl", "cogvideox", "wan", "flux", "pixel"
    prediction: str                  # "epsilon", "v" or "flow" (sipo.PREDICTIONS)
    pipe: object                     # the diffusers pipeline
    resolution: tuple                # (height, width) in pixels
    num_frames: int = 0              # 0 for images
    flow_shift: float = 3.0          # Wan's timestep shift; FLUX's exp(mu) at its resolution (flux_shift)
    guidance: float = FLUX_TRAINING_GUIDANCE  # the guidance embedding's value in training (FLUX.1-dev only)

    @property
    def denoiser(self):
        return getattr(self.pipe, denoiser_part(self.family))

    @property
    def device(self):
        """The denoiser's device (or the VAE's where only the encoders were built), from its first parameter: diffusers'
        ModelMixin.device walks every module for offload hooks on each call, several times a step
        (docs/performance.md, figure 9)."""
        device = next(self.denoiser.parameters()).device
        if device.type == "meta" and self.pipe.vae is not None:  # making a cache builds no denoiser
            device = next(self.pipe.vae.parameters()).device
        return device

    @property
    def is_video(self):
        return self.num_frames > 0

    @property
    def num_train_timesteps(self):
        return self.pipe.scheduler.config.num_train_timesteps

    def frozen_parts(self):
        """{name: module} of the VAE and text encoder(s) the pipeline holds."""
        parts = {name: getattr(self.pipe, name, None) for name in ("vae", "text_encoder", "text_encoder_2")}
        return {name: module for name, module in parts.items() if module is not None}

    def frozen_modules(self):
        return list(self.frozen_parts().values())

    def to(self, device):
        self.pipe.to(device)
        return self

    def resize(self, resolution=None, frames=None):
        """Work at another size than the native one (--resolution, --frames): sides in multiples of what one latent
        token (or a UNet's deepest level) spans in pixels, video frames 4k + 1 (the causal VAEs' 4x time stride)."""
        if resolution is not None:
            stride = (getattr(self.pipe, "vae_scale_factor_spatial", None) or self.pipe.vae_scale_factor) \
                if self.family != "pixel" else 1
            stride *= 2 ** (len(self.denoiser.down_blocks) - 1) if hasattr(self.denoiser, "down_blocks") else 2
            if any(side < stride or side % stride for side in resolution):
                raise ModelError(f"--resolution {resolution[0]}x{resolution[1]}: {self.name} needs sides in multiples "
                                 f"of {stride} pixels")
            self.resolution = tuple(resolution)
            if self.family == "flux":
                self.flow_shift = flux_shift(self.pipe, self.resolution)
        if frames is not None:
            if not self.is_video:
                raise ModelError(f"--frames {frames}: {self.name} makes images, not videos")
            if frames < 1 or (frames - 1) % 4:
                raise ModelError(f"--frames {frames}: {self.name}'s VAE takes 4k + 1 frames (1, 5, 9, ...)")
            self.num_frames = frames
        return self

    def set_frozen_dtype(self, dtype):
        """Text encoders and VAE in `dtype` (bf16 on GPUs), but for the parts FP32_PARTS keeps in fp32."""
        for name, module in self.frozen_parts().items():
            cast(module, torch.float32 if name in FP32_PARTS.get(self.family, ()) else dtype)
        return self

    # -- conditioning --------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts):
        """Prompt conditioning, as the pipeline itself computes it (no classifier-free guidance)."""
        device = self.device
        prompts = list(prompts)
        if self.family in ("sd", "pixel"):
            embeds, _ = self.pipe.encode_prompt(prompts, device, 1, False)
            return {"prompt_embeds": embeds}
        if self.family == "sdxl":
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
            height, width = self.resolution
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=embeds.dtype)
            return {"prompt_embeds": embeds, "pooled_embeds": pooled, "time_ids": time_ids.repeat(len(prompts), 1)}
        if self.family == "flux":
            embeds, pooled, _ = self.pipe.encode_prompt(prompts, device=device,
                                                        max_sequence_length=self.pipe.tokenizer_2.model_max_length)
            return {"prompt_embeds": embeds, "pooled_embeds": pooled}
        max_length = self.pipe.tokenizer.model_max_length
        embeds, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=max_length,
                                            device=device)
        return {"prompt_embeds": embeds}

    def latent_shape(self):
        """One sample's latents at this size, in the denoiser's layout: what encode_pixels gives, from the configs
        alone (the planners' meta-device models; a cache's shards are checked against it)."""
        height, width = self.resolution
        channels = self.denoiser.config.in_channels
        if self.family == "pixel":
            return channels, height, width
        spatial = getattr(self.pipe, "vae_scale_factor_spatial", None) or self.pipe.vae_scale_factor
        height, width = height // spatial, width // spatial
        if self.family == "flux":  # the transformer takes 2x2 patches of the VAE's 16 channels
            return channels // 4, height, width
        if not self.is_video:
            return channels, height, width
        frames = (self.num_frames - 1) // self.pipe.vae_scale_factor_temporal + 1
        return (channels, frames, height, width) if self.family == "wan" else (frames, channels, height, width)

    def conditioning_shapes(self, batch):
        """The shapes encode_prompts returns, from the configs alone (for meta-device planning)."""
        length = self.pipe.tokenizer.model_max_length
        text = self.pipe.text_encoder.config
        if self.family == "sdxl":
            text_2 = self.pipe.text_encoder_2.config
            return {"prompt_embeds": (batch, length, text.hidden_size + text_2.hidden_size),
                    "pooled_embeds": (batch, text_2.projection_dim), "time_ids": (batch, 6)}
        if self.family == "flux":
            return {"prompt_embeds": (batch, self.pipe.tokenizer_2.model_max_length,
                                      self.pipe.text_encoder_2.config.d_model),
                    "pooled_embeds": (batch, text.hidden_size)}
        return {"prompt_embeds": (batch, length, getattr(text, "d_model", None) or text.hidden_size)}

    @torch.no_grad()
    def encode_pixels(self, pixels):
        """Pixels in [-1, 1], (B, 3, H, W) or video (B, 3, F, H, W), to normalised latents (the VAE's mean)."""
        if self.family == "pixel":
            return pixels
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.mode().float()  # the noising math runs in fp32
        if self.family == "wan":
            mean, std = wan_latent_stats(vae, latents.device)
            return ((latents - mean) / std).to(latents.dtype)
        if self.family == "flux":  # as FluxPipeline decodes: latents / scaling_factor + shift_factor
            return (latents - vae.config.shift_factor) * vae.config.scaling_factor
        latents = latents * vae.config.scaling_factor
        return latents.permute(0, 2, 1, 3, 4).contiguous() if self.family == "cogvideox" else latents

    # -- noising (sipo.py math) -----------------------------------------------------------------------------
    def sample_noise_levels(self, n, generator=None, device="cpu", lowest=0.0):
        """Uniform t in 0..T-1 (DDPM) or the shifted uniform sigma (flow), one per pair. `lowest` (train.py's
        --min-noise) cuts off the cleanest fraction of the uniform coordinate: t >= ceil(lowest T), or sigma =
        shift(u) with u ~ U(lowest, 1), for DDPM and flow alike; 0 draws exactly what it always drew."""
        if self.prediction == "flow":
            sigma = torch.rand(n, generator=generator, device=device)
            return sipo.shift_sigma(lowest + (1 - lowest) * sigma if lowest else sigma, self.flow_shift)
        return torch.randint(math.ceil(lowest * self.num_train_timesteps), self.num_train_timesteps, (n,),
                             generator=generator, device=device)

    def coefficients(self, levels, sample_steps=50):
        """(a_t, s_t) at the noise level and (a_s, s_s) one sampler stride (T / sample_steps) earlier. FLUX samples on
        a grid shifted by its resolution (sigma' = k sigma / (1 + (k - 1) sigma), k = exp(mu)): its earlier step is
        one stride down that grid, so that training and sampling see the same sigmas."""
        if self.family == "flux":
            earlier = sipo.shift_sigma(unshift_sigma(levels, self.flow_shift) - 1.0 / sample_steps, self.flow_shift)
            return sipo.flow_coefficients(levels), sipo.flow_coefficients(earlier)
        if self.prediction == "flow":
            return sipo.flow_coefficients(levels), sipo.flow_coefficients(levels - 1.0 / sample_steps)
        alphas_cumprod = self.alphas_cumprod_on(levels.device)
        stride = self.num_train_timesteps // sample_steps
        return sipo.ddpm_coefficients(alphas_cumprod, levels), sipo.ddpm_coefficients(alphas_cumprod, levels - stride)

    def alphas_cumprod_on(self, device):
        """The scheduler's alpha-bar in float64 on `device`, copied there once: indexing the CPU table with GPU levels
        would copy it to the GPU, a host sync, several times a micro-batch."""
        held = self.__dict__.setdefault("_alphas_cumprod", {})
        if device not in held:
            held[device] = self.pipe.scheduler.alphas_cumprod.to(device, torch.float64)
        return held[device]

    def noised(self, x0, noise, levels):
        """(x_t, target): x0 noised to `levels` and what the network regresses there (sipo.add_noise,
        sipo.native_target), for the policy and the reference alike."""
        (a, s), _ = self.coefficients(levels)
        return sipo.add_noise(x0, noise, a, s), sipo.native_target(x0, noise, a, s, self.prediction)

    def sampler_grid(self, sample_steps=50):
        """(stride, top) of the sampler's grid in noise levels: (T / n, T - 1) for DDPM, (1 / n, 1) for flow."""
        if self.prediction == "flow":
            return 1.0 / sample_steps, 1.0
        return self.num_train_timesteps // sample_steps, self.num_train_timesteps - 1

    def step_log_weight(self, error, levels, sample_steps=50, temperature=1.0):
        """The step importance log weight (sipo.importance_log_weight) of per-sample native errors at `levels`."""
        (a, s), (a_prev, s_prev) = self.coefficients(levels, sample_steps)
        return sipo.importance_log_weight(error * sipo.x0_error_scale(a, s, self.prediction), sipo.snr(a, s),
                                          sipo.snr(a_prev, s_prev), temperature)

    def model_timesteps(self, levels):
        """The timestep the denoiser takes: DDPM's integer t; Wan's 1000 sigma; FLUX's sigma itself (its pipeline
        passes timestep / 1000)."""
        return levels * 1000.0 if self.family == "wan" else levels

    # -- the denoiser ----------------------------------------------------------------------------------------
    def predict(self, denoiser, latents, levels, cond):
        """One denoiser call on a batch; `denoiser` is this backbone's (possibly wrapped) policy or reference."""
        timesteps = self.model_timesteps(levels)
        embeds = cond["prompt_embeds"]
        if self.family in ("sd", "pixel"):
            return denoiser(latents, timesteps, encoder_hidden_states=embeds, return_dict=False)[0]
        if self.family == "sdxl":
            added = {"text_embeds": cond["pooled_embeds"], "time_ids": cond["time_ids"]}
            return denoiser(latents, timesteps, encoder_hidden_states=embeds, added_cond_kwargs=added,
                            return_dict=False)[0]
        if self.family == "cogvideox":
            rotary = None
            if self.denoiser.config.use_rotary_positional_embeddings:
                frames, height, width = latents.shape[1], latents.shape[3], latents.shape[4]
                scale = self.pipe.vae_scale_factor_spatial
                rotary = self.pipe._prepare_rotary_positional_embeddings(height * scale, width * scale, frames,
                                                                         latents.device)
            return denoiser(hidden_states=latents, encoder_hidden_states=embeds, timestep=timesteps,
                            image_rotary_emb=rotary, return_dict=False)[0]
        if self.family == "flux":
            return self.predict_flux(denoiser, latents, timesteps, cond)
        return denoiser(hidden_states=latents, timestep=timesteps, encoder_hidden_states=embeds, return_dict=False)[0]

    def predict_flux(self, denoiser, latents, sigmas, cond):
        """FLUX's transformer on latents (B, 16, h, w): packed into 2x2 patches with their image position ids (text
        ids are zeros), the guidance embedding fed the training guidance, the output unpacked to the latents' layout."""
        batch, channels, height, width = latents.shape
        pipe = self.pipe
        packed = pipe._pack_latents(latents, batch, channels, height, width)
        image_ids = pipe._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype)
        text_ids = torch.zeros(cond["prompt_embeds"].shape[1], 3, device=latents.device, dtype=latents.dtype)
        guidance = torch.full((batch,), self.guidance, device=latents.device) \
            if self.denoiser.config.guidance_embeds else None
        out = denoiser(hidden_states=packed, timestep=sigmas, guidance=guidance,
                       pooled_projections=cond["pooled_embeds"], encoder_hidden_states=cond["prompt_embeds"],
                       txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(out, height * scale, width * scale, scale)

    # -- sampling -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompts, seed=0, steps=20, guidance=5.0):
        """Images (B, 3, H, W) or videos (B, F, 3, H, W) in [0, 1] from the diffusers pipeline, one per prompt;
        `seed` one seed for the batch, or one per prompt (then a prompt's sample does not depend on its batch)."""
        return self.decode_latents(self.sample_latents(prompts, seed, steps, guidance))

    def sample_latents(self, prompts, seed=0, steps=20, guidance=5.0):
        """What sample() draws, before the VAE: latents in the training layout (encode_pixels')."""
        device = self.device
        generator = [torch.Generator(device).manual_seed(s) for s in seed] if isinstance(seed, (list, tuple)) else \
            torch.Generator(device).manual_seed(seed)
        height, width = self.resolution
        kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="latent")
        if self.family == "pixel":
            scale = self.pipe.vae_scale_factor  # no VAE: the pipeline's latents are the pixels
            return self.pipe(list(prompts), height=height * scale, width=width * scale, **kwargs).images.float()
        if self.is_video:
            return self.pipe(list(prompts), height=height, width=width, num_frames=self.num_frames,
                             max_sequence_length=self.pipe.tokenizer.model_max_length, **kwargs).frames.float()
        if self.family == "flux":  # guidance-distilled: `guidance` is the embedding's value, not classifier-free
            packed = self.pipe(list(prompts), height=height, width=width,
                               max_sequence_length=self.pipe.tokenizer_2.model_max_length, **kwargs).images
            return self.pipe._unpack_latents(packed, height, width, self.pipe.vae_scale_factor).float()
        return self.pipe(list(prompts), height=height, width=width, **kwargs).images.float()

    @torch.no_grad()
    def decode_latents(self, latents):
        """Latents in the training layout to images (B, 3, H, W) or videos (B, F, 3, H, W) in [0, 1]: encode_pixels
        undone, then the VAE's decoder, as each pipeline decodes."""
        if self.family == "pixel":
            return (latents.float().clamp(-1, 1) + 1) / 2
        vae = self.pipe.vae
        latents = latents.to(vae.dtype)
        if self.family == "wan":
            mean, std = wan_latent_stats(vae, latents.device)
            latents = (latents * std + mean).to(vae.dtype)
        elif self.family == "flux":
            latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        elif self.family == "cogvideox":
            latents = latents.permute(0, 2, 1, 3, 4) / vae.config.scaling_factor
        else:
            latents = latents / vae.config.scaling_factor
        pixels = (vae.decode(latents, return_dict=False)[0].float().clamp(-1, 1) + 1) / 2
        return pixels.permute(0, 2, 1, 3, 4) if self.is_video else pixels


# ---------------------------------------------------------------------------------------------------------
# Configurations: full size (docs/models.md) and tiny (same classes)
# ---------------------------------------------------------------------------------------------------------

CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              feed_forward_proj="gated-gelu", relative_attention_num_buckets=32, dropout_rate=0.0)
UMT5_XXL = dict(T5_XXL, vocab_size=256384)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
SD_UNET = dict(sample_size=64, cross_attention_dim=768)
SDXL_UNET = dict(sample_size=128, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
COGVIDEOX_2B = dict(num_attention_heads=30, attention_head_dim=64, num_layers=30, sample_height=60, sample_width=90,
                    sample_frames=49, use_rotary_positional_embeddings=False)
COGVIDEOX_5B = dict(COGVIDEOX_2B, num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True)
WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)
FLUX_DEV = dict(guidance_embeds=True)  # the class defaults are FLUX.1's 19 double- and 38 single-stream blocks
FLUX_LATENTS = dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                    use_post_quant_conv=False)  # what FLUX's VAE changes in SD's, at full and tiny size alike
FLUX_VAE = dict(SD_VAE, **FLUX_LATENTS)
# FLUX.1-dev's scheduler: the sampling grid shifted by exp(mu), mu linear in the image's sequence length
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                      max_image_seq_len=4096)

TINY_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=5, num_attention_heads=4,
                 max_position_embeddings=77, projection_dim=32)
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
               dropout_rate=0.0)
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=32,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
                 norm_num_groups=32)
TINY_SDXL_UNET = dict(TINY_UNET, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                      use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                      transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
                      cross_attention_dim=64)
TINY_COGVIDEOX = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=2,
                      text_embed_dim=32, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                      max_text_seq_length=32, use_rotary_positional_embeddings=False)
TINY_COGVIDEOX_VAE = dict(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2)
TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
TINY_WAN_VAE = dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
TINY_FLUX = dict(in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
TINY_FLUX_VAE = dict(TINY_VAE, **FLUX_LATENTS)
TOY_UNET = dict(TINY_UNET, in_channels=3, out_channels=3, attention_head_dim=2)  # 2 heads: faster than 8 on a CPU

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
# v-prediction: with epsilon, the cosine schedule's first sampling steps divide the noise estimate's error by
# sqrt(alpha_bar), which is small there, and the base learned to draw its shapes far more slowly (docs/toy.md)
TOY_SCHEDULER = dict(SD_SCHEDULER, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
COGVIDEOX_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                           prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True,
                           timestep_spacing="trailing")

# name: (family, prediction, pipeline class, (height, width) in pixels, frames)
SPECS = {
    "toy": ("pixel", "v", StableDiffusionPipeline, (16, 16), 0),
    "sd1.5": ("sd", "epsilon", StableDiffusionPipeline, (512, 512), 0),
    "sdxl": ("sdxl", "epsilon", StableDiffusionXLPipeline, (1024, 1024), 0),
    "cogvideox-2b": ("cogvideox", "v", CogVideoXPipeline, (480, 720), 49),
    "cogvideox-5b": ("cogvideox", "v", CogVideoXPipeline, (480, 720), 49),
    "wan2.1-1.3b": ("wan", "flow", WanPipeline, (480, 832), 81),
    "flux.1-dev": ("flux", "flow", FluxPipeline, (1024, 1024), 0),
}
TINY_SIZES = {"sd1.5": ((32, 32), 0), "sdxl": ((32, 32), 0), "cogvideox-2b": ((64, 64), 9),
              "cogvideox-5b": ((64, 64), 9), "wan2.1-1.3b": ((32, 32), 5), "flux.1-dev": ((32, 32), 0)}


# ---------------------------------------------------------------------------------------------------------
# Offline tokenizers: character-level vocabularies, so nothing is downloaded
# ---------------------------------------------------------------------------------------------------------

def clip_tokenizer():
    """CLIP BPE over single byte-characters (no merges): 256 characters, the same with </w>, bos, eos."""
    chars = sorted(ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def t5_tokenizer(max_length):
    """A T5 unigram tokenizer over characters, words split on spaces; built in memory."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.printable.strip()] + [("\u2581" + c, -2.5) for c in string.printable.strip()]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _clip_text(config, tokenizer, with_projection=False):
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(CLIPTextConfig(**{"vocab_size": len(tokenizer), **config, **ids}))


# ---------------------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def building(device, dtype):
    """Modules constructed inside are made on `device` directly in `dtype`: a full-size part built in fp32 and then
    cast would need its fp32 copy first (T5-XXL: 19 GB), and one on the meta device needs no memory at all."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(before)


def _build_pipeline(name, tiny, frozen, denoiser):
    """The full-size or tiny pipeline of `name` with random weights: the VAE and text encoders built inside the
    context `frozen()` gives, the denoiser inside `denoiser()`'s (building(...) of a device and dtype each)."""
    family = SPECS[name][0]
    if family in ("sd", "sdxl"):
        tokenizer = clip_tokenizer()
        text_config = TINY_CLIP if tiny else CLIP_L
        with frozen():
            vae = AutoencoderKL(**(TINY_VAE if tiny else SD_VAE), scaling_factor=0.18215 if family == "sd" else 0.13025)
            text = _clip_text(text_config, tokenizer)
            text_2 = _clip_text(TINY_CLIP if tiny else CLIP_BIGG, tokenizer, with_projection=True) \
                if family == "sdxl" else None
        with denoiser():
            unet = UNet2DConditionModel(**(TINY_UNET if tiny else SD_UNET) if family == "sd" else
                                        (TINY_SDXL_UNET if tiny else SDXL_UNET))
        scheduler = DDIMScheduler(**SD_SCHEDULER)
        if family == "sd":
            return StableDiffusionPipeline(vae, text, tokenizer, unet, scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
        return StableDiffusionXLPipeline(vae, text, text_2, tokenizer, clip_tokenizer(), unet, scheduler)
    if family == "cogvideox":
        five_b = name == "cogvideox-5b"
        tokenizer = t5_tokenizer(32 if tiny else 226)
        if tiny:
            config = dict(TINY_COGVIDEOX, attention_head_dim=16, use_rotary_positional_embeddings=True) if five_b \
                else TINY_COGVIDEOX
        else:
            config = COGVIDEOX_5B if five_b else COGVIDEOX_2B
        with frozen():
            vae = AutoencoderKLCogVideoX(**TINY_COGVIDEOX_VAE) if tiny else \
                AutoencoderKLCogVideoX(scaling_factor=0.7 if five_b else 1.15258426)
            text = T5EncoderModel(T5Config(**(dict(TINY_T5, vocab_size=len(tokenizer)) if tiny else T5_XXL)))
        with denoiser():
            transformer = CogVideoXTransformer3DModel(**config)
        scheduler = CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER, snr_shift_scale=1.0 if five_b else 3.0)
        return CogVideoXPipeline(tokenizer, text, vae, transformer, scheduler)
    if family == "flux":
        t5_tokens = t5_tokenizer(32 if tiny else 512)
        with frozen():
            clip = _clip_text(TINY_CLIP if tiny else CLIP_L, clip_tokenizer())
            t5 = T5EncoderModel(T5Config(**(dict(TINY_T5, vocab_size=len(t5_tokens)) if tiny else T5_XXL)))
            vae = AutoencoderKL(**(TINY_FLUX_VAE if tiny else FLUX_VAE))
        with denoiser():
            transformer = FluxTransformer2DModel(**(TINY_FLUX if tiny else FLUX_DEV))
        return FluxPipeline(FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER), vae, clip, clip_tokenizer(), t5,
                            t5_tokens, transformer)
    tokenizer = t5_tokenizer(32 if tiny else 512)
    with frozen():
        text = UMT5EncoderModel(UMT5Config(**(dict(TINY_T5, vocab_size=len(tokenizer)) if tiny else UMT5_XXL)))
        vae = AutoencoderKLWan(**TINY_WAN_VAE) if tiny else AutoencoderKLWan()
    with denoiser():
        transformer = WanTransformer3DModel(**(TINY_WAN if tiny else WAN_1_3B))
    return WanPipeline(tokenizer, text, vae, FlowMatchEulerDiscreteScheduler(shift=3.0), transformer)


def _build_toy():
    """A text-conditioned UNet on 16x16 RGB pixels (no VAE), conditioned by a tiny frozen CLIP text encoder."""
    tokenizer = clip_tokenizer()
    return StableDiffusionPipeline(None, _clip_text(TINY_CLIP, tokenizer), tokenizer, UNet2DConditionModel(**TOY_UNET),
                                   DDIMScheduler(**TOY_SCHEDULER),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


# What a run on latent caches does not read of a pretrained pipeline: the text encoders (T5-XXL, UMT5-XXL: 10 to
# 11 GB in bf16 a rank). The VAE is read: small, and its config sets the latents' size (Backbone.latent_shape).
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def denoiser_part(family):
    return "unet" if family in ("sd", "sdxl", "pixel") else "transformer"


def check_layout(name, path):
    """The local diffusers directory `path` holds the pipeline `name` (with or without tiny-) needs; ModelError
    naming what it holds otherwise. Reads model_index.json alone: asked before any work."""
    family, _, pipeline_cls, _, _ = SPECS[name.removeprefix("tiny-")]
    index = Path(path) / "model_index.json"
    if not index.is_file():
        raise ModelError(f"{path}: not a diffusers layout (no model_index.json)")
    try:
        layout = json.loads(index.read_text())
        found, vae = layout.get("_class_name"), (layout.get("vae") or [None])[-1]
    except (ValueError, AttributeError, TypeError):
        raise ModelError(f"{index}: not valid JSON (a damaged download?)") from None
    if found != pipeline_cls.__name__:
        raise ModelError(f"{path}: holds a {found}, but --model {name} needs a {pipeline_cls.__name__}")
    if (vae is None) != (family == "pixel"):  # the toy and SD1.5 share a pipeline class; only the toy has no VAE
        raise ModelError(f"{path}: holds a {'pixel-space model (no VAE)' if vae is None else 'latent model'}, "
                         f"which is not --model {name}")


def looks_like_a_path(text):
    """A hub id is "owner/name"; what starts with /, ., ~ or a drive is meant as a directory."""
    return str(text).startswith(("/", ".", "~")) or Path(str(text)).is_absolute()


def _load_pretrained(name, path, dtype, denoiser_dtype=None, skip=()):
    """The pipeline at `path` with its parts in `dtype` (the denoiser in `denoiser_dtype`, FP32_PARTS in fp32), read
    once in their dtype; the parts named in `skip` are not read at all (None). `name` is the model as the user gave
    it (tiny- or not), for the messages."""
    family, _, pipeline_cls, _, _ = SPECS[name.removeprefix("tiny-")]
    local = Path(path).expanduser()
    if local.exists():
        check_layout(name, local)
        path = local
    elif looks_like_a_path(path):
        raise ModelError(f"{path}: no such directory")
    kwargs = dict(safety_checker=None, requires_safety_checker=False) if family in ("sd", "pixel") else {}
    if family == "pixel":
        kwargs["vae"] = None
    kwargs.update({part: None for part in skip if part in inspect.signature(pipeline_cls.__init__).parameters})
    try:
        dtypes = {"default": dtype, denoiser_part(family): denoiser_dtype or dtype,
                  **{part: torch.float32 for part in FP32_PARTS.get(family, ())}}
        pipe = pipeline_cls.from_pretrained(path, dtype=dtypes, use_safetensors=True, **kwargs)
    except (OSError, ValueError, EnvironmentError) as error:
        if not local.exists():
            raise ModelError(f"{path}: not a local directory, and the hub id cannot be loaded (offline, or not cached "
                             f"in full); download it where there is a network (hf download {path} --local-dir DIR) "
                             f"and pass DIR instead of the id") from None
        raise ModelError(f"{path}: cannot load as {name}: {str(error).splitlines()[0]}") from None
    if family == "cogvideox":
        rotary = pipe.transformer.config.use_rotary_positional_embeddings
        if rotary != (name.removeprefix("tiny-") == "cogvideox-5b"):
            raise ModelError(f"{path}: a CogVideoX transformer {'with' if rotary else 'without'} rotary embeddings "
                             f"does not match --model {name}")
    return pipe


def load_backbone(name, pretrained=None, device="cpu", dtype=torch.float32, random_weights=False,
                  denoiser_dtype=None, only=None):
    """The backbone `name` (see NAMES) from `pretrained` (a diffusers directory or hub id; for full-size names
    HUB_IDS by default), from its config with random weights (random_weights=True; device="meta" builds it without
    memory), or tiny.
    `dtype` is every part's but FP32_PARTS' and the denoiser's, `denoiser_dtype` (default `dtype`); each part is
    read or made in its dtype, never in fp32 first; from_pretrained also keeps the modules a model marks fp32. With
    `only` ("denoiser", or "frozen": the VAE and text encoders) the other parts are not held, where a run does not
    need them (training on a latent cache, or making one): random weights put them on the meta device; of
    pretrained ones only="denoiser" reads no text encoder (None: frozen_pipeline reads them for the export)."""
    if name not in NAMES:
        raise ModelError(f"unknown model {name!r}; choose one of: {', '.join(NAMES)}")
    base = name.removeprefix("tiny-")
    built = pretrained is None and (name == "toy" or name.startswith("tiny-") or random_weights)
    if not built:
        pipe = _load_pretrained(name, pretrained or HUB_IDS[base], dtype, denoiser_dtype,
                                skip=TEXT_ENCODERS if only == "denoiser" else ())
    else:  # random weights from one seed, whatever the caller's: a cache and a run of any --seed share encoders
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if name == "toy":
                with building(device, dtype):
                    pipe = _build_toy()
            else:
                pipe = _build_pipeline(base, name.startswith("tiny-"),
                                       lambda: building("meta" if only == "denoiser" else device, dtype),
                                       lambda: building("meta" if only == "frozen" else device,
                                                        denoiser_dtype or dtype))
    pipe.set_progress_bar_config(disable=True)
    backbone = _backbone(name, pipe)
    if built:
        backbone.set_frozen_dtype(dtype)  # FP32_PARTS built in `dtype` go back to fp32
    elif device != "meta":
        pipe.to(device)
    return backbone


def frozen_pipeline(name, pretrained, dtype):
    """The pretrained pipeline of `name` without its denoiser (None): the parts an export adds to a trained denoiser
    when the run did not hold them."""
    base = name.removeprefix("tiny-")
    return _load_pretrained(name, pretrained or HUB_IDS[base], dtype, skip=(denoiser_part(SPECS[base][0]),))


def _backbone(name, pipe):
    base = name.removeprefix("tiny-")
    family, prediction, _, resolution, frames = SPECS[base]
    if name.startswith("tiny-"):
        resolution, frames = TINY_SIZES[base]
    shift = pipe.scheduler.config.get("shift", pipe.scheduler.config.get("flow_shift", 3.0)) or 3.0
    if family == "flux":
        shift = flux_shift(pipe, resolution)
    if getattr(pipe, "vae", None) is not None:  # one sample at a time: a video VAE's activations are GBs a sample
        pipe.vae.enable_slicing()
    return Backbone(name, family, prediction, pipe, resolution, frames, flow_shift=float(shift))


def wan_latent_stats(vae, device):
    """Wan's per-channel latent mean and std, shaped to broadcast over (B, C, F, H, W): what encode_pixels
    normalises by and decode_latents undoes."""
    return tuple(torch.tensor(values, device=device).view(1, -1, 1, 1, 1)
                 for values in (vae.config.latents_mean, vae.config.latents_std))


def flux_shift(pipe, resolution):
    """FLUX's sigma shift k = exp(mu) at `resolution`: FluxPipeline's mu (calculate_shift) of the packed image's
    sequence length, from the scheduler's own config, so that training draws the sigmas its sampler steps through."""
    config, scale = pipe.scheduler.config, pipe.vae_scale_factor * 2
    tokens = (resolution[0] // scale) * (resolution[1] // scale)
    mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    return math.exp(mu)


def unshift_sigma(sigma, shift):
    """The inverse of sipo.shift_sigma: the uniform grid's sigma that k sigma / (1 + (k - 1) sigma) maps to `sigma`."""
    return sigma / (shift - (shift - 1) * sigma)


def cast(module, dtype):
    """module.to(dtype), skipped where it is already in it (diffusers warns on every cast)."""
    return module if module.dtype == dtype else module.to(dtype)


def fp32_names(denoiser):
    """The names the denoiser's class keeps in fp32 (diffusers' `_keep_in_fp32_modules`; Wan: rope, time embedder,
    scale-shift tables, norms). diffusers' loader applies them to a parameter when one is a part of its dotted name."""
    return set(getattr(denoiser, "_keep_in_fp32_modules", None) or ())


def compute_fp32_under_autocast(denoiser):
    """The modules the class keeps in fp32 (fp32_names: Wan's time embedder) compute in fp32 under autocast too, with
    their floating inputs in fp32, as the model's own recipe computes them (Wan runs its time embedding under an
    fp32 autocast; diffusers keeps these parameters fp32 in a bf16 model): autocast would run their Linear layers in
    bf16. Forward hooks, so that a deep copy (the reference) and every placement keep them."""
    keep = fp32_names(denoiser)
    for name, module in denoiser.named_modules():
        hooked = _autocast_off in module._forward_pre_hooks.values()  # prepared once already
        if name.rsplit(".", 1)[-1] in keep and next(module.parameters(), None) is not None and not hooked:
            module.register_forward_pre_hook(_autocast_off, with_kwargs=True)
            module.register_forward_hook(_autocast_back, always_call=True)
    return denoiser


def _autocast_off(module, args, kwargs):
    devices = [device for device in ("cuda", "cpu") if torch.is_autocast_enabled(device)]
    if not devices:
        return None
    module.__dict__["_autocast_off"] = [torch.autocast(device, enabled=False) for device in devices]
    for context in module.__dict__["_autocast_off"]:
        context.__enter__()
    raised = [x.float() if torch.is_tensor(x) and x.is_floating_point() else x for x in args]
    return tuple(raised), {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
                           for k, v in kwargs.items()}


def _autocast_back(module, args, output):
    for context in reversed(module.__dict__.pop("_autocast_off", [])):
        context.__exit__(None, None, None)


def freeze(module):
    """Frozen parts carry no gradient and stay in eval mode."""
    return module.requires_grad_(False).eval()


def prepare_for_training(backbone, gradient_checkpointing=False):
    """Freezes the VAE and text encoders, makes the denoiser trainable, optionally with checkpointing."""
    for module in backbone.frozen_modules():
        freeze(module)
    denoiser = compute_fp32_under_autocast(backbone.denoiser.requires_grad_(True).train())
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    return backbone


def denoiser_blocks(denoiser):
    """The units FSDP shards one by one: a UNet's down, mid and up blocks; a transformer's blocks."""
    if hasattr(denoiser, "down_blocks"):
        return [*denoiser.down_blocks, denoiser.mid_block, *denoiser.up_blocks]
    if hasattr(denoiser, "single_transformer_blocks"):  # FLUX: double-stream blocks, then single-stream ones
        return [*denoiser.transformer_blocks, *denoiser.single_transformer_blocks]
    return list(denoiser.transformer_blocks if hasattr(denoiser, "transformer_blocks") else denoiser.blocks)


def parameter_counts(backbone):
    pipe = backbone.pipe
    parts = {"denoiser": backbone.denoiser, "vae": getattr(pipe, "vae", None),
             "text_encoder": getattr(pipe, "text_encoder", None),
             "text_encoder_2": getattr(pipe, "text_encoder_2", None)}
    return {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if m is not None}


def main():
    print(f"{'name':20s} {'denoiser':>15s} {'vae':>13s} {'text encoder(s)':>17s}")
    for name in NAMES:
        backbone = load_backbone(name, device="meta" if name in FULL else "cpu", random_weights=True)
        counts = parameter_counts(backbone)
        text = counts.get("text_encoder", 0) + counts.get("text_encoder_2", 0)
        print(f"{name:20s} {counts['denoiser']:>15,d} {counts.get('vae', 0):>13,d} {text:>17,d}")


if __name__ == "__main__":
    try:
        main()
    except ModelError as error:
        sys.exit(f"error: {error}")
