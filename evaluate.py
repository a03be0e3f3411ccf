"""Did alignment work, and why: sampling with rewards, the paper's timestep analysis, training curves.

    python evaluate.py compare --model NAME --base PATH --tuned RUN_DIR --prompts FILE --reward R[,R...]
    python evaluate.py timesteps --model NAME [--pretrained PATH] --data PAIRS [--reference PATH]
    python evaluate.py curves RUN_DIR [RUN_DIR ...]

compare writes report.json, report.md and grid.png (or side-by-side.gif for video) into --out;
timesteps writes timesteps.csv and timesteps.png; curves writes curves.png. Same seeds, same numbers.
"""
import argparse
import codecs
import contextlib
import inspect
import io
import json
import re
import sys
import textwrap
from pathlib import Path

import matplotlib
import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

import data
import models
import sipo
from common import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, ArgumentParser, check_numbers, check_output,
                    check_regular_file, error_line, take_lock, torch_device, valid_range)
from rundir import LORA_FILE, RunDir, model_dir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# ---------------------------------------------------------------------------------------------------------
# Rewards: (images (N, 3, H, W) or videos (N, F, 3, H, W) in [0, 1], prompts) -> scores (N,), higher is better
# ---------------------------------------------------------------------------------------------------------

COLOURS = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "yellow": (1.0, 1.0, 0.0),
           "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}


def _frames(images):
    return images.flatten(0, 1) if images.dim() == 5 else images


def _jpeg_kb(images):
    sizes = []
    for image in _frames(images):
        buffer = io.BytesIO()
        Image.fromarray((image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(
            buffer, format="JPEG", quality=95)
        sizes.append(len(buffer.getvalue()) / 1000)
    return torch.tensor(sizes).view(len(images), -1).mean(1)


def jpeg_compressibility(images, prompts):
    """-(JPEG size in kB) at quality 95, as DDPO's compressibility reward (frames averaged for video)."""
    return -_jpeg_kb(images)


def jpeg_incompressibility(images, prompts):
    """+(JPEG size in kB), as DDPO's incompressibility reward."""
    return _jpeg_kb(images)


def temporal_flicker(images, prompts):
    """1 - mean |frame_k+1 - frame_k| (VBench temporal flickering, in [0, 1]; higher is steadier)."""
    if images.dim() != 5:
        raise ValueError("reward temporal_flicker needs videos")
    return 1 - (images[:, 1:] - images[:, :-1]).abs().flatten(1).mean(1)


def named_colour(images, prompts):
    """How strongly the image leans from grey toward the colour its prompt names: the mean over pixels of the
    projection of (pixel - 0.5) on the unit direction of (colour - 0.5). The toy task's preference."""
    scores = []
    for image, prompt in zip(_frames(images) if images.dim() == 4 else images.mean(1), prompts):
        name = next((c for c in COLOURS if re.search(rf"\b{c}\b", prompt.lower())), None)
        if name is None:
            raise ValueError(f"reward named_colour: prompt {prompt!r} names none of {', '.join(COLOURS)}")
        direction = torch.tensor(COLOURS[name]) - 0.5
        direction = direction / direction.norm()
        scores.append(((image - 0.5) * direction.view(3, 1, 1)).sum(0).mean())
    return torch.stack(scores)


SHAPES = ("circle", "square")


def otsu_threshold(values, bins=64):
    """The level that best splits `values` in [0, 1] in two classes (Otsu: the largest between-class variance)."""
    hist = torch.histc(values, bins, 0, 1)
    centres = (torch.arange(bins) + 0.5) / bins
    below, mass = hist.cumsum(0), (hist * centres).cumsum(0)
    above = hist.sum() - below
    between = below * above * (mass / below.clamp(min=1e-9) - (mass[-1] - mass) / above.clamp(min=1e-9)) ** 2
    return centres[between.argmax()] + 0.5 / bins


def recognise_shape(image):
    """What a template matcher sees in an image (3, H, W) in [0, 1]: (colour, shape, fit), or (None, None, 0).
    The shape is the pixels brighter than Otsu's threshold; its colour, the one of COLOURS nearest in direction
    from grey; its form, the circle or square of the same area at its centroid that overlaps it more (fit: that
    intersection over union)."""
    brightness = image.mean(0)
    shape = brightness > otsu_threshold(brightness.flatten())
    area = shape.sum()
    if not 0.04 <= area / shape.numel() <= 0.65:  # the toy's shapes cover 10% to 45% of the image
        return None, None, 0.0
    height, width = shape.shape
    y, x = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    cy, cx = y[shape].mean(), x[shape].mean()
    half = area.sqrt() / 2
    templates = {"circle": (y - cy) ** 2 + (x - cx) ** 2 <= area / torch.pi,
                 "square": ((y - cy).abs() <= half) & ((x - cx).abs() <= half)}
    fits = {name: float((shape & t).sum() / (shape | t).sum()) for name, t in templates.items()}
    rgb = image[:, shape].mean(1) - 0.5
    colour = max(COLOURS, key=lambda c: float(torch.cosine_similarity(rgb, torch.tensor(COLOURS[c]) - 0.5, 0)))
    form = max(fits, key=fits.get)
    return colour, form, fits[form]


def named_shape(images, prompts, min_fit=0.6):
    """1 where the template matcher (recognise_shape) sees the colour and the shape (circle or square) the prompt
    names, as a clean shape (fit >= min_fit), else 0: does the model draw what it is asked for. The toy's
    base-quality check; drawn toy images score 0.996."""
    scores = []
    for image, prompt in zip(_frames(images), prompts):
        words = re.findall(r"[a-z]+", prompt.lower())
        wanted = [next((w for w in words if w in names), None) for names in (COLOURS, SHAPES)]
        if None in wanted:
            raise ValueError(f"reward named_shape: prompt {prompt!r} names no colour and shape "
                             f"({', '.join(COLOURS)}; {', '.join(SHAPES)})")
        colour, form, fit = recognise_shape(image)
        scores.append(float([colour, form] == wanted and fit >= min_fit))
    return torch.tensor(scores)


def load_weights(path):
    """A weights file: safetensors, or a torch file read weights-only (tensors and containers, never code); a file
    that is neither, or that holds code, is a ValueError naming it."""
    try:
        return load_file(path) if str(path).endswith(".safetensors") else \
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 -- safetensors and torch.load raise their own types for such a file
        raise ValueError(f"{path}: not a weights file that loads without running code "
                         f"({str(error).strip().splitlines()[0]})") from None


# open_clip's CLIP (ViT towers) under transformers' CLIPModel names; the fused attention projection is split below
OPEN_CLIP_NAMES = [(r"^visual\.conv1\.", "vision_model.embeddings.patch_embedding."),
                   (r"^visual\.class_embedding$", "vision_model.embeddings.class_embedding"),
                   (r"^visual\.positional_embedding$", "vision_model.embeddings.position_embedding.weight"),
                   (r"^visual\.ln_pre\.", "vision_model.pre_layrnorm."),
                   (r"^visual\.ln_post\.", "vision_model.post_layernorm."),
                   (r"^visual\.transformer\.resblocks\.", "vision_model.encoder.layers."),
                   (r"^transformer\.resblocks\.", "text_model.encoder.layers."),
                   (r"^token_embedding\.", "text_model.embeddings.token_embedding."),
                   (r"^positional_embedding$", "text_model.embeddings.position_embedding.weight"),
                   (r"^ln_final\.", "text_model.final_layer_norm."), (r"^logit_scale$", "logit_scale"),
                   (r"\.ln_1\.", ".layer_norm1."), (r"\.ln_2\.", ".layer_norm2."),
                   (r"\.attn\.out_proj\.", ".self_attn.out_proj."), (r"\.mlp\.c_fc\.", ".mlp.fc1."),
                   (r"\.mlp\.c_proj\.", ".mlp.fc2.")]
OPEN_CLIP_PROJECTIONS = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}


def clip_state_from_open_clip(state):
    """An open_clip CLIP's state dict (HPSv2's checkpoint: ViT-H-14) as transformers' CLIPModel's: the same tensors
    renamed, each attention's fused in_proj split into q, k and v, and the two projections (x @ P in open_clip)
    transposed into Linear weights. A key of another architecture is a ValueError naming it."""
    converted = {}
    for key, tensor in state.items():
        key = key.removeprefix("module.")  # saved from DistributedDataParallel
        if key in OPEN_CLIP_PROJECTIONS:
            converted[OPEN_CLIP_PROJECTIONS[key]] = tensor.t().contiguous()
            continue
        if key == "attn_mask":
            continue
        name, renamed = key, 0
        for pattern, replacement in OPEN_CLIP_NAMES:
            name, count = re.subn(pattern, replacement, name)
            renamed += count
        if not renamed:
            raise ValueError(f"{key}: not a weight of open_clip's CLIP with ViT towers")
        fused = re.match(r"(.*)\.attn\.in_proj_(weight|bias)$", name)
        if fused:
            for part, chunk in zip("qkv", tensor.chunk(3)):
                converted[f"{fused[1]}.self_attn.{part}_proj.{fused[2]}"] = chunk.contiguous()
        else:
            converted[name] = tensor
    return converted


def pil_frames(images, prompts):
    """What a model-based reward scores: every frame as a PIL image (an image is one frame), each with its sample's
    prompt, and the frames a sample (its score is their mean)."""
    frames = _frames(images)
    repeat = len(frames) // len(images)
    pil = [Image.fromarray((f.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)) for f in frames]
    return pil, [prompt for prompt in prompts for _ in range(repeat)], repeat


class ClipReward:
    """CLIP-based rewards from a local directory in the published layout (CLIPModel + CLIPProcessor):
    PickScore (logit_scale x cosine, Kirstain et al. 2023), CLIP score (100 x cosine), with a head file the LAION
    aesthetic predictor (a chain of linear layers on the normalised image embedding), or HPSv2 (Wu et al. 2023: the
    cosine of an open_clip ViT-H-14 fine-tuned on human preferences, whose checkpoint `head` is converted onto the
    directory's CLIPModel config)."""

    def __init__(self, kind, path, head=None):
        from transformers import CLIPConfig, CLIPModel, CLIPProcessor
        self.kind = kind
        self.processor = CLIPProcessor.from_pretrained(path)
        self.head = None
        if kind == "hpsv2":
            self.model = CLIPModel(CLIPConfig.from_pretrained(path)).eval()
            checkpoint = load_weights(head)
            state = clip_state_from_open_clip(checkpoint.get("state_dict", checkpoint))
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing or unexpected:
                raise ValueError(f"{head}: not an HPSv2 checkpoint for the CLIP of {path} (missing "
                                 f"{(missing or ['nothing'])[0]}, unexpected {(unexpected or ['nothing'])[0]})")
            return
        self.model = CLIPModel.from_pretrained(path, use_safetensors=True).eval()
        if head is not None:
            state = load_weights(head)
            weights = [k for k in state if k.endswith("weight")]
            layers = [torch.nn.Linear(state[k].shape[1], state[k].shape[0]) for k in weights]
            for layer, key in zip(layers, weights):
                layer.weight.data, layer.bias.data = state[key].float(), state[key[:-6] + "bias"].float()
            self.head = torch.nn.Sequential(*layers).eval()

    @torch.no_grad()
    def __call__(self, images, prompts):
        """Scores (N,); a video scores each frame with its prompt and averages them (a mean frame is a blur no
        model was trained to score)."""
        pil, prompts, repeat = pil_frames(images, prompts)
        inputs = self.processor(text=list(prompts), images=pil, return_tensors="pt", padding=True, truncation=True)
        return self._score(inputs).view(len(images), repeat).mean(1)

    def _score(self, inputs):
        image = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        image = getattr(image, "pooler_output", image)
        image = image / image.norm(dim=-1, keepdim=True)
        if self.kind == "aesthetic":
            return self.head(image).squeeze(-1)
        text = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        text = getattr(text, "pooler_output", text)
        cosine = (image * text / text.norm(dim=-1, keepdim=True)).sum(-1)
        return cosine * {"pickscore": self.model.logit_scale.exp(), "clip": 100.0, "hpsv2": 1.0}[self.kind]


# ImageReward (Xu et al. 2023, THUDM/ImageReward): BLIP's ViT and its BERT with cross-attention to the image; the
# text's first token through a chain of linear layers, standardised by the training scores' mean and sd
IMAGEREWARD_MEAN, IMAGEREWARD_SD = 0.16717362830052426, 1.0333394966054072
# BLIP's timm-style ViT under transformers' BlipVisionModel names (transformers' convert_blip script's renames)
BLIP_VISION_NAMES = [(r"^blocks\.", "encoder.layers."), (r"\.attn\.qkv\.", ".self_attn.qkv."),
                     (r"\.attn\.proj\.", ".self_attn.projection."), (r"\.norm1\.", ".layer_norm1."),
                     (r"\.norm2\.", ".layer_norm2."), (r"^norm\.", "post_layernorm."),
                     (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
                     (r"^pos_embed$", "embeddings.position_embedding"), (r"^cls_token$", "embeddings.class_embedding")]


def part_of(state, prefix):
    """The entries of a state dict under `prefix`, the prefix removed (buffers of position ids left out)."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.endswith("position_ids")}


class ImageRewardModel:
    """ImageReward from its published files: a directory with ImageReward.pt (read weights-only) and med_config.json
    (the hub's THUDM/ImageReward), and BERT's tokenizer (google-bert/bert-base-uncased) with BLIP's two added tokens.
    The towers are transformers' BlipVisionModel and BlipTextModel; images are resized and cropped as CLIP's are."""

    def __init__(self, path, tokenizer_path):
        from transformers import (BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel,
                                  CLIPImageProcessorPil)
        folder = Path(path)
        med = json.loads(check_regular_file(folder / "med_config.json", "--imagereward-model").read_text())
        state = load_weights(check_regular_file(folder / "ImageReward.pt", "--imagereward-model"))
        state = state.get("state_dict", state)
        if not any(key.startswith("blip.visual_encoder.") for key in state):
            raise ValueError(f"{folder / 'ImageReward.pt'}: not an ImageReward checkpoint (no blip.visual_encoder)")
        vision = {}
        for key, tensor in part_of(state, "blip.visual_encoder.").items():
            for pattern, replacement in BLIP_VISION_NAMES:
                key = re.sub(pattern, replacement, key)
            vision[key] = tensor
        patches = vision["embeddings.patch_embedding.weight"]
        width, patch = patches.shape[0], patches.shape[-1]
        side = patch * round((vision["embeddings.position_embedding"].shape[1] - 1) ** 0.5)
        layers = 1 + max(int(k.split(".")[2]) for k in vision if k.startswith("encoder.layers."))
        self.vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=width, intermediate_size=vision["encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=layers, num_attention_heads=max(1, width // 64), image_size=side, patch_size=patch,
            layer_norm_eps=1e-6)).eval()  # BLIP's ViT: heads of 64, LayerNorm eps 1e-6
        self.text = BlipTextModel(BlipTextConfig(
            vocab_size=med["vocab_size"], hidden_size=med["hidden_size"], num_hidden_layers=med["num_hidden_layers"],
            num_attention_heads=med["num_attention_heads"], intermediate_size=med["intermediate_size"],
            max_position_embeddings=med["max_position_embeddings"], layer_norm_eps=med["layer_norm_eps"],
            encoder_hidden_size=med["encoder_width"], is_decoder=True), add_pooling_layer=False).eval()
        mlp = part_of(state, "mlp.layers.")
        self.mlp = []
        for index in sorted({int(k.split(".")[0]) for k in mlp}):  # Linear layers; the Dropouts between hold nothing
            self.mlp.append((mlp[f"{index}.weight"].float(), mlp[f"{index}.bias"].float()))
        for model, weights, name in ((self.vision, vision, "blip.visual_encoder"),
                                     (self.text, part_of(state, "blip.text_encoder."), "blip.text_encoder")):
            missing, _ = model.load_state_dict(weights, strict=False)
            missing = [k for k in missing if not k.endswith("position_ids")]
            if missing:
                raise ValueError(f"{folder / 'ImageReward.pt'}: not an ImageReward checkpoint ({name}.{missing[0]} "
                                 f"missing)")
        self.tokenizer = BertTokenizer.from_pretrained(tokenizer_path)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's init_tokenizer
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        if len(self.tokenizer) != med["vocab_size"]:
            raise ValueError(f"{tokenizer_path}: {len(self.tokenizer)} tokens with BLIP's two, but med_config.json "
                             f"says {med['vocab_size']}: not BERT's bert-base-uncased tokenizer")
        self.processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})

    @torch.no_grad()
    def __call__(self, images, prompts):
        pil, prompts, repeat = pil_frames(images, prompts)
        pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"]
        image = self.vision(pixel_values=pixels).last_hidden_state
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        first = self.text(input_ids=text["input_ids"], attention_mask=text["attention_mask"],
                          encoder_hidden_states=image,
                          encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long)).last_hidden_state[:, 0]
        for weight, bias in self.mlp:
            first = first.float() @ weight.T + bias
        return ((first.squeeze(-1) - IMAGEREWARD_MEAN) / IMAGEREWARD_SD).view(len(images), repeat).mean(1)


def horizontal_stripes(images, prompts):
    """Mean squared difference between neighbouring rows minus that between neighbouring columns: about 0 for
    an image without a preferred direction, 0.02 to 0.05 for the toy's foreign style (horizontal stripes). A style
    statistic, not a preference: the off-policy study's drift (study.py)."""
    x = _frames(images)
    rows = (x[..., 1:, :] - x[..., :-1, :]).square().flatten(1).mean(1)
    columns = (x[..., :, 1:] - x[..., :, :-1]).square().flatten(1).mean(1)
    return (rows - columns).view(len(images), -1).mean(1)


def checker_texture(images, prompts):
    """Mean over 2x2 windows of ((x00 - x01 - x10 + x11) / 4)^2: the energy of the one-pixel checkerboard, A^2 for
    a checkerboard of amplitude A, sigma^2 / 4 for white noise of sd sigma, 0 for a smooth image. A style
    statistic, not a preference: the drift toward the toy's hard style (study.py)."""
    x = _frames(images)
    windows = (x[..., :-1, :-1] - x[..., :-1, 1:] - x[..., 1:, :-1] + x[..., 1:, 1:]) / 4
    return windows.square().flatten(1).mean(1).view(len(images), -1).mean(1)


BUILTIN = {"jpeg_compressibility": jpeg_compressibility, "jpeg_incompressibility": jpeg_incompressibility,
           "temporal_flicker": temporal_flicker, "named_colour": named_colour, "named_shape": named_shape,
           "horizontal_stripes": horizontal_stripes, "checker_texture": checker_texture}
MODEL_BASED = {"pickscore": "--pickscore-model", "clip": "--clip-model", "aesthetic": "--aesthetic-model",
               "hpsv2": "--hpsv2-model", "imagereward": "--imagereward-model"}
HEADS = {"aesthetic": ("--aesthetic-head", "FILE", "the linear/MLP head weights"),
         "hpsv2": ("--hpsv2-checkpoint", "FILE", "HPS_v2.1_compressed.pt of the hub's xswu/HPSv2"),
         "imagereward": ("--imagereward-tokenizer", "DIR", "google-bert/bert-base-uncased's tokenizer")}


def load_rewards(names, args):
    """The reward functions for comma-separated `names`; model-based ones need their local path flags."""
    rewards = {}
    for name in names.split(","):
        if name in BUILTIN:
            rewards[name] = BUILTIN[name]
        elif name in MODEL_BASED:
            flag = MODEL_BASED[name]
            path = getattr(args, flag[2:].replace("-", "_"), None)
            if path is None or not Path(path).exists():
                raise ValueError(f"reward {name} needs {flag} PATH (a local model directory)" if path is None else
                                 f"{flag} {path}: does not exist")
            head = None
            if name in HEADS:
                head_flag, kind, what = HEADS[name]
                head = getattr(args, head_flag[2:].replace("-", "_"), None)
                if head is None or not (Path(head).is_file() if kind == "FILE" else Path(head).is_dir()):
                    raise ValueError(f"reward {name} needs {head_flag} {kind} ({what})")
            rewards[name] = ImageRewardModel(path, head) if name == "imagereward" else ClipReward(name, path, head)
        else:
            raise ValueError(f"unknown reward {name!r}; choose from {', '.join([*BUILTIN, *MODEL_BASED])}")
    return rewards


# ---------------------------------------------------------------------------------------------------------
# Statistics: bootstrap confidence intervals and a paired sign-flip permutation test
# ---------------------------------------------------------------------------------------------------------

def bootstrap_ci(values, seed=0, resamples=10_000):
    """95% percentile bootstrap interval of the mean."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (resamples, len(values)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def paired_permutation_p(differences, seed=0, resamples=20_000):
    """Two-sided p-value of mean(differences) = 0 by random sign flips (exact under the null of symmetry)."""
    differences = np.asarray(differences, dtype=np.float64)
    observed = abs(differences.mean())
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(resamples, len(differences)))
    return float(((np.abs((signs * differences).mean(1)) >= observed - 1e-12).sum() + 1) / (resamples + 1))


def compare_scores(base, tuned, seed=0):
    """base, tuned: (prompts, K) scores, sample k of each prompt drawn with the same seed for both models: the
    (prompt, seed) samples are the paired units of the intervals and the test; the win rate is over prompts."""
    differences = (tuned - base).ravel()
    by_prompt = tuned.mean(1) - base.mean(1)
    wins = (by_prompt > 0).astype(float) + 0.5 * (by_prompt == 0)  # the win rate counts a tie as half
    return {"base_mean": float(base.mean()), "base_ci": bootstrap_ci(base.ravel(), seed),
            "tuned_mean": float(tuned.mean()), "tuned_ci": bootstrap_ci(tuned.ravel(), seed),
            "improvement": float(differences.mean()), "improvement_ci": bootstrap_ci(differences, seed),
            "win_rate": float(wins.mean()), "p_value": paired_permutation_p(differences, seed),
            "improvement_by_prompt": by_prompt.tolist(), "prompts_better": int((by_prompt > 0).sum()),
            "prompts_worse": int((by_prompt < 0).sum()), "prompts_tied": int((by_prompt == 0).sum())}


def prompt_counts(result):
    """"better on 6, worse on 1, tied on 1 of 8 prompts": the win rate's counts, ties apart."""
    counts = f"better on {result['prompts_better']}, worse on {result['prompts_worse']}"
    tied = f", tied on {result['prompts_tied']}" if result["prompts_tied"] else ""
    return f"{counts}{tied} of {result['prompts_better'] + result['prompts_worse'] + result['prompts_tied']} prompts"


# ---------------------------------------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------------------------------------

def add_reward_model_flags(parser):
    """The local model directories MODEL_BASED rewards need (evaluate.py compare, train.py's rewards)."""
    parser.add_argument("--pickscore-model", help="local PickScore directory (CLIPModel + processor)")
    parser.add_argument("--clip-model", help="local CLIP directory for the CLIP score")
    parser.add_argument("--aesthetic-model", help="local CLIP ViT-L/14 directory for the LAION aesthetic predictor")
    parser.add_argument("--aesthetic-head", help="the aesthetic predictor's head weights (.pth or .safetensors)")
    parser.add_argument("--hpsv2-model", help="local laion/CLIP-ViT-H-14-laion2B-s32B-b79K directory (its config "
                                              "and processor) for HPSv2")
    parser.add_argument("--hpsv2-checkpoint", help="HPSv2's weights, HPS_v2.1_compressed.pt (hub: xswu/HPSv2)")
    parser.add_argument("--imagereward-model", help="local THUDM/ImageReward directory (ImageReward.pt, "
                                                    "med_config.json)")
    parser.add_argument("--imagereward-tokenizer", help="local google-bert/bert-base-uncased directory (its tokenizer)")


def read_prompts(path, flag="--prompts"):
    """One prompt a line (UTF-8; an editor's byte-order mark is dropped); a line that is not text is named."""
    path = check_regular_file(path, flag)
    prompts = []
    for number, raw in enumerate(path.read_bytes().removeprefix(codecs.BOM_UTF8).splitlines(), start=1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ValueError(f"{flag} {path} line {number}: not UTF-8 text") from None
        if line:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{flag} {path}: no prompts")
    return prompts


def load(args, path):
    """The backbone --model from `path` on --device, in --precision (bf16: every part but Wan's VAE)."""
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    return models.load_backbone(args.model, pretrained=path, device=args.device, dtype=dtype)


def sample_all(backbone, prompts, samples, seed, steps, guidance, desc=None, batch=16):
    """(prompts, K, ...) samples, `batch` prompts a call (memory is one batch's, whatever the prompts): sample k of
    every batch uses seed + k, for every model alike. A progress bar named `desc`, if given."""
    chunks = [prompts[i:i + batch] for i in range(0, len(prompts), batch)]
    rows = [[] for _ in range(samples)]
    with tqdm(total=samples * len(chunks), desc=desc, disable=desc is None, unit="batch") as progress:
        for k in range(samples):
            for chunk in chunks:
                rows[k].append(backbone.sample(chunk, seed + k, steps, guidance).cpu())
                progress.update(1)
    return torch.stack([torch.cat(row) for row in rows], 1)


def score(rewards, images, prompts):
    flat = images.flatten(0, 1)
    repeated = [p for p in prompts for _ in range(images.shape[1])]
    return {name: fn(flat, repeated).view(images.shape[:2]).double().numpy() for name, fn in rewards.items()}


def labelled_grid(rows, captions, cell=128):
    """A PIL image of labelled rows [(label, images (N, 3, H, W) in [0, 1])], the label left of each row, each
    column's caption (a prompt) under the last row; tiles are scaled to `cell` pixels high without smoothing."""
    from PIL import ImageDraw, ImageFont
    font = ImageFont.load_default(size=12)
    height, width = rows[0][1].shape[-2:]
    tile = (round(cell * width / height), cell)
    label_width = 12 + 7 * max(len(label) for label, _ in rows)
    wrapped = ["\n".join(textwrap.wrap(caption, max(8, tile[0] // 7))[:3]) for caption in captions]
    sheet = Image.new("RGB", (label_width + len(captions) * tile[0], len(rows) * cell + 52), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 7), label, fill="black", font=font)
        for c, image in enumerate(images[:len(captions)]):
            pixels = (image.permute(1, 2, 0).clamp(0, 1).float().numpy() * 255).round().astype(np.uint8)
            sheet.paste(Image.fromarray(pixels).resize(tile, Image.NEAREST), (label_width + c * tile[0], r * cell))
    for c, caption in enumerate(wrapped):
        draw.multiline_text((label_width + c * tile[0] + 3, len(rows) * cell + 4), caption, fill="black", font=font,
                            spacing=2)
    return sheet


def save_grid(path, rows, captions):
    """labelled_grid, saved as a PNG."""
    labelled_grid(rows, captions).save(path)


def sample_rows(samples, label, frames=8):
    """Grid rows of samples (N, 3, H, W): one row; of videos (N, F, 3, H, W): a row per frame, up to `frames`."""
    if samples.dim() == 4:
        return [(label, samples)]
    steps = torch.linspace(0, samples.shape[1] - 1, min(frames, samples.shape[1])).round().long().tolist()
    return [(f"{label} frame {k}", samples[:, k]) for k in steps]


def save_side_by_side(path, base, tuned, prompts, count=4):
    """A GIF of videos, each frame a labelled grid as the image grids are: base above tuned, a column per prompt
    (the first `count`, seed 0), each prompt under its column, tiles scaled up to be seen."""
    import imageio.v3 as iio
    frames = [np.asarray(labelled_grid([("base", base[:count, 0, f]), ("tuned", tuned[:count, 0, f])],
                                       prompts[:count])) for f in range(base.shape[2])]
    iio.imwrite(path, np.stack(frames), duration=125, loop=0)


def claim_folder(args):
    """--out made and locked for this command, once its inputs are checked: one writer a folder (a second report
    into it would silently replace the first); the lock goes when dispatch returns."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lock, holder = take_lock(out / ".lock", f"evaluate.py {args.command}")
    if lock is None:
        raise ValueError(f"--out {out} is in use by {holder}; wait for it to end, or pass another --out")
    args.held.callback(lock.close)
    return out


def check_tuned(args):
    """Before any sampling: --tuned is a pipeline or a LoRA in diffusers' format (safetensors only: never a pickle),
    and, where it comes from a run of train.py, a run of --model."""
    tuned = Path(model_dir(args.tuned))
    run = RunDir(tuned.parent) if tuned.name in ("model", "lora") else RunDir(args.tuned)
    trained_as = run.read_args().get("model") if run.is_run() else args.model
    if trained_as != args.model:
        raise ValueError(f"--tuned {args.tuned}: trained as --model {trained_as}, not --model {args.model}")
    if (tuned / LORA_FILE).is_file():
        try:
            with safe_open(tuned / LORA_FILE, framework="pt"):
                pass
        except Exception as error:  # noqa: BLE001 -- safetensors raises several types for a file that is not one
            raise ValueError(f"--tuned {tuned / LORA_FILE}: not a safetensors file ({str(error)[:80]})") from None
        return True
    if not (tuned / "model_index.json").is_file():
        raise ValueError(f"--tuned {args.tuned}: neither a run directory with model/, a diffusers directory, nor a "
                         f"LoRA folder ({LORA_FILE})")
    models.check_layout(args.model, tuned)  # another backbone's pipeline: refused before the base is sampled
    return False


def check_rewards_fit(rewards, backbone, prompts):
    """Each reward scores a blank sample of the backbone's kind (image or video) for every prompt first: one that
    cannot (a video reward on images, a prompt the reward does not understand) fails before any sampling."""
    shape = (len(prompts), backbone.num_frames, 3, 8, 8) if backbone.is_video else (len(prompts), 3, 8, 8)
    for fn in rewards.values():
        fn(torch.full(shape, 0.5), prompts)


def sampler_defaults(model):
    """(steps, guidance) of the backbone's diffusers pipeline, its __call__'s defaults: the protocol compare samples
    with unless told (50 and 7.5 for SD1.5, 50 and 5.0 for SDXL and Wan2.1, 50 and 6 for CogVideoX, 28 and 3.5 for
    FLUX.1-dev), so that every model is evaluated as its authors ship it."""
    parameters = inspect.signature(models.SPECS[model.removeprefix("tiny-")][2].__call__).parameters
    return parameters["num_inference_steps"].default, parameters["guidance_scale"].default


def sampler_settings(model, steps=None, guidance=None):
    """(steps, guidance): those given, else sampler_defaults' (--steps and --guidance of compare and online.py)."""
    default_steps, default_guidance = sampler_defaults(model)
    return (default_steps if steps is None else steps), (default_guidance if guidance is None else guidance)


def compare(args):
    args.steps, args.guidance = sampler_settings(args.model, args.steps, args.guidance)
    prompts = read_prompts(args.prompts)
    rewards = load_rewards(args.reward, args)
    lora = check_tuned(args)
    out = claim_folder(args)
    results = {}
    for label, path in (("base", args.base), ("tuned", model_dir(args.tuned))):
        backbone = load(args, args.base if label == "tuned" and lora else path)
        if label == "base":
            check_rewards_fit(rewards, backbone, prompts)
        if label == "tuned" and lora:  # a LoRA in diffusers' format (train.py's RUN/lora): the base with the adapter
            backbone.pipe.load_lora_weights(path, weight_name=LORA_FILE, use_safetensors=True)
        samples = sample_all(backbone, prompts, args.samples, args.seed, args.steps, args.guidance,
                             desc=f"sampling {label}", batch=args.batch_size)
        results[label] = (samples, score(rewards, samples, prompts))  # sample_all returns them on the CPU
    report = {"model": args.model, "base": str(args.base), "tuned": model_dir(args.tuned), "prompts": len(prompts),
              "video": results["base"][0].dim() == 6, "samples_per_prompt": args.samples, "seed": args.seed,
              "steps": args.steps, "guidance": args.guidance,
              "rewards": {name: compare_scores(results["base"][1][name], results["tuned"][1][name], args.seed)
                          for name in rewards}}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = [f"# {args.model}: tuned vs base", "",
             f"{len(prompts)} prompts x {args.samples} seeds, {args.steps} sampling steps, guidance {args.guidance}.",
             "", "| reward | base (95% CI) | tuned (95% CI) | improvement (95% CI) | win rate | p (paired) |",
             "|---|---|---|---|---|---|"]
    for name, r in report["rewards"].items():
        lines.append(f"| {name} | {r['base_mean']:.4f} [{r['base_ci'][0]:.4f}, {r['base_ci'][1]:.4f}] | "
                     f"{r['tuned_mean']:.4f} [{r['tuned_ci'][0]:.4f}, {r['tuned_ci'][1]:.4f}] | "
                     f"{r['improvement']:+.4f} [{r['improvement_ci'][0]:+.4f}, {r['improvement_ci'][1]:+.4f}] | "
                     f"{r['win_rate']:.2f} | {r['p_value']:.4f} |")
    names = list(report["rewards"])
    lines += ["", "Improvement by prompt (tuned - base, mean over seeds):", "",
              "| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, prompt in enumerate(prompts):
        lines.append(f"| {prompt} | " + " | ".join(f"{report['rewards'][n]['improvement_by_prompt'][i]:+.4f}"
                                                     for n in names) + " |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    base, tuned = results["base"][0], results["tuned"][0]
    if base.dim() == 6:
        save_side_by_side(out / "side-by-side.gif", base, tuned, prompts)
    else:  # up to 8 prompts, the first 3 seeds of each: base above tuned, seed by seed
        rows = [(f"{label}, seed {args.seed + k}", samples[:8, k])
                for k in range(min(3, args.samples)) for label, samples in (("base", base), ("tuned", tuned))]
        save_grid(out / "grid.png", rows, prompts[:8])
    return report


# ---------------------------------------------------------------------------------------------------------
# timesteps: the paper's analysis of the step weight over the schedule
# ---------------------------------------------------------------------------------------------------------

def fixed_batch(backbone, source, pairs, pretrained=None):
    dataset, _ = data.open_dataset(source, backbone, pretrained)
    items = [dataset[i] for i in range(min(pairs, len(dataset)))]
    for item in items:
        item.pop("index")
    return data.encode_batch(backbone, data.collate(items))


def bucket_levels(backbone, buckets):
    """Bucket edges over the whole schedule: t in [0, T) for DDPM, sigma in (0, 1] for flow."""
    if backbone.prediction == "flow":
        return np.linspace(0.0, 1.0, buckets + 1)
    return np.linspace(0, backbone.num_train_timesteps, buckets + 1)


def timestep_analysis(args):
    backbone = load(args, args.pretrained)
    reference = None
    if args.reference:
        reference = models.freeze(load(args, model_dir(args.reference)).denoiser)
    batch = fixed_batch(backbone, args.data, args.pairs, args.cache_pretrained)
    out = claim_folder(args)  # before the analysis: a second one into this folder is refused, not replaced
    x0 = torch.cat([batch["latents_w"], batch["latents_l"]])
    cond = {k: torch.cat([v, v]) for k, v in data.conditioning(batch).items()}
    pairs = len(batch["latents_w"])
    policy = backbone.denoiser
    trainable = [p for p in policy.parameters() if p.requires_grad]
    edges = bucket_levels(backbone, args.buckets)
    rows = []
    generator = torch.Generator().manual_seed(args.seed)

    def predict(model, x_t, levels):
        dtype = model.dtype  # a bf16 model takes bf16 inputs
        return backbone.predict(model, x_t.to(dtype), levels, {k: v.to(dtype) for k, v in cond.items()})

    for low, high in tqdm(list(zip(edges[:-1], edges[1:])), desc="timestep buckets", unit="bucket"):
        weights_w, weights_l, gaps, margins, grad_norms = [], [], [], [], []
        grad_mean, grad_m2 = 0.0, 0.0  # Welford over the draws: one parameter-sized vector, however many draws
        for draw in range(1, args.draws + 1):
            u = torch.rand(pairs, generator=generator)
            levels = low + u * (high - low)
            levels = levels.clamp(1e-4, 1.0) if backbone.prediction == "flow" else levels.long()
            levels = levels.repeat(2).to(x0.device)
            noise = torch.randn(x0[:pairs].shape, generator=generator).to(x0.device).repeat(
                2, *[1] * (x0.dim() - 1))
            x_t, target = backbone.noised(x0, noise, levels)
            error = sipo.per_sample_error(predict(policy, x_t, levels), target)
            log_w = backbone.step_log_weight(error, levels, args.weight_sampler_steps, args.temperature)
            w_w, w_l = log_w.exp().chunk(2)
            e_w, e_l = error.chunk(2)
            weights_w.append(w_w.detach())
            weights_l.append(w_l.detach())
            gaps.append((e_l - e_w).detach())
            if reference is not None:
                with torch.no_grad():
                    r_w, r_l = sipo.per_sample_error(predict(reference, x_t, levels), target).chunk(2)
                margins.append(-0.5 * ((e_w - r_w) - (e_l - r_l)).detach())
            # the preference gradient: d/dtheta mean(e_w - e_l), Diffusion-DPO's direction up to sigmoid factors
            grad = torch.cat([g.flatten().float() for g in torch.autograd.grad((e_w - e_l).mean(), trainable)])
            grad_norms.append(grad.norm().item())
            delta = grad - grad_mean
            grad_mean = grad_mean + delta / draw
            grad_m2 += (delta * (grad - grad_mean)).sum().item()
        w_w, w_l = torch.cat(weights_w), torch.cat(weights_l)
        both = torch.cat([w_w, w_l]).double()
        row = {"level_low": float(low), "level_high": float(high),
               "weight_w_mean": w_w.mean().item(), "weight_l_mean": w_l.mean().item(),
               "weight_q10": both.quantile(0.1).item(), "weight_q50": both.quantile(0.5).item(),
               "weight_q90": both.quantile(0.9).item(),
               "mask_fraction": (torch.minimum(w_w, w_l) < args.tau).float().mean().item(),
               "error_gap": torch.cat(gaps).mean().item(),
               "grad_norm": float(np.mean(grad_norms)), "grad_variance": grad_m2 / args.draws}
        if margins:
            row["margin_per_beta"] = torch.cat(margins).mean().item()
        rows.append(row)
    with open(out / "timesteps.csv", "w") as f:
        f.write(",".join(rows[0]) + "\n")
        for row in rows:
            f.write(",".join(f"{v:.6g}" for v in row.values()) + "\n")
    plot_timesteps(out / "timesteps.png", rows, backbone, args.tau)
    return rows


def plot_timesteps(path, rows, backbone, tau):
    centre = [(r["level_low"] + r["level_high"]) / 2 for r in rows]
    label = "sigma" if backbone.prediction == "flow" else "timestep t"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].plot(centre, [r["weight_w_mean"] for r in rows], "o-", label="winner, mean")
    axes[0].plot(centre, [r["weight_l_mean"] for r in rows], "s-", label="loser, mean")
    axes[0].fill_between(centre, [r["weight_q10"] for r in rows], [r["weight_q90"] for r in rows], alpha=0.2,
                         label="10-90% quantiles")
    axes[0].axhline(tau, color="grey", ls="--", label=f"tau = {tau}")
    axes[0].set(title="step importance weight w", xlabel=label, ylim=(-0.02, 1.02))
    axes[0].legend(fontsize=8)
    axes[1].plot(centre, [r["mask_fraction"] for r in rows], "o-", color="C3")
    axes[1].set(title=f"fraction masked at tau = {tau}", xlabel=label, ylim=(-0.02, 1.02))
    axes[2].plot(centre, [r["grad_variance"] for r in rows], "o-", color="C4", label="variance over noise draws")
    axes[2].plot(centre, [r["grad_norm"] ** 2 for r in rows], "^--", color="C5", label="squared norm")
    axes[2].set(title="preference gradient", xlabel=label, yscale="log")
    axes[2].legend(fontsize=8)
    fig.suptitle(f"{backbone.name}: timestep analysis")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------------
# curves
# ---------------------------------------------------------------------------------------------------------

CURVES = [("loss", "loss"), ("accuracy", "implicit accuracy"), ("mask_fraction", "mask fraction"),
          (("err_policy_w", "err_policy_l", "err_ref_w", "err_ref_l"), "errors"),
          ("heldout_accuracy", "held-out accuracy"), ("heldout_reward", "held-out reward")]


def smooth(values, window):
    values = np.asarray(values, dtype=float)
    if len(values) < window or window < 2:
        return values
    return np.convolve(values, np.ones(window) / window, mode="valid")


def curves(args):
    runs = {}
    for run in args.runs:
        run = RunDir(run)
        if not run.log_file.is_file():
            raise ValueError(f"{run}: no {run.log_file.name} (not a run directory)")
        # a line a live or killed run left cut is skipped: plot what is complete
        records = run.read_log(say=lambda note: print(note, file=sys.stderr))
        runs[run.path.name] = [r for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)]
        if len(runs[run.path.name]) < len(records):
            print(f"note: {run.log_file}: {len(records) - len(runs[run.path.name])} records without a step; skipped",
                  file=sys.stderr)
        if not runs[run.path.name]:
            raise ValueError(f"{run.log_file}: no step recorded yet; nothing to plot")
    panels = [(k, t) for k, t in CURVES if any(all(key in r for key in ((k,) if isinstance(k, str) else k))
                                                 for records in runs.values() for r in records)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (keys, title) in zip(axes[0], panels):
        for index, (name, records) in enumerate(runs.items()):
            for style, key in zip(("-", "--", ":", "-."), (keys,) if isinstance(keys, str) else keys):
                points = [(r["step"], r[key]) for r in records if key in r]
                if not points:
                    continue
                steps, values = zip(*points)
                window = args.smooth if key not in ("heldout_accuracy", "heldout_reward") else 1
                ax.plot(steps[len(steps) - len(smooth(values, window)):], smooth(values, window), style,
                        color=f"C{index}", label=f"{name} {key}" if not isinstance(keys, str) else name)
        ax.set(title=title, xlabel="step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


NUMERIC_FLAGS = {
    **dict.fromkeys(("samples", "steps", "pairs", "buckets", "weight_sampler_steps", "smooth", "batch_size"),
                    AT_LEAST_1),
    **dict.fromkeys(("guidance", "seed"), NON_NEGATIVE), "temperature": POSITIVE, "tau": UNIT_INTERVAL,
    "draws": valid_range("at least 2 (a variance needs two draws)", lambda v: v >= 2)}


def main(argv=None):
    """The command line: run(), then a line a result and where its files are."""
    args = parse_args(argv)
    result = dispatch(args)
    if args.command == "compare":
        for name, r in result["rewards"].items():
            print(f"{name}: base {r['base_mean']:.4f}, tuned {r['tuned_mean']:.4f}, improvement "
                  f"{r['improvement']:+.4f} [{r['improvement_ci'][0]:+.4f}, {r['improvement_ci'][1]:+.4f}] (95% CI), "
                  f"paired p = {r['p_value']:.4f}, {prompt_counts(r)}")
        picture = "side-by-side.gif" if result["video"] else "grid.png"
        print(f"report {Path(args.out) / 'report.md'}; samples {Path(args.out) / picture}")
    elif args.command == "timesteps":
        print("timesteps: fraction of pairs masked per bucket, clean to noisy: " +
              ", ".join(f"{row['mask_fraction']:.2f}" for row in result))
        print(f"table {Path(args.out) / 'timesteps.csv'}; plot {Path(args.out) / 'timesteps.png'}")
    else:
        print(f"curves {result}")
    return result


def run(argv=None):
    """compare, timesteps or curves, as `python evaluate.py ARGV` runs them but without printing: the result."""
    return dispatch(parse_args(argv))


def dispatch(args):
    """The command's result; a refusal is one line and exit 1."""
    try:
        check_numbers(args, NUMERIC_FLAGS)
        check_output(args.out, folder=args.command != "curves")
        if args.command == "timesteps":
            # a cache records the weights its VAE and text encoders came from; a run directory's are its base's
            source = RunDir(args.pretrained) if args.pretrained else None
            args.cache_pretrained = source.read_args().get("pretrained") if source and source.is_run() else \
                args.pretrained
            args.pretrained = model_dir(args.pretrained) if args.pretrained else None
        torch.manual_seed(args.seed if hasattr(args, "seed") else 0)
        with contextlib.ExitStack() as args.held:  # claim_folder's lock, until the command returns
            return {"compare": compare, "timesteps": timestep_analysis, "curves": curves}[args.command](args)
    except ValueError as error:  # models.ModelError and data.DataError are ValueErrors
        sys.exit(error_line(error))


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    c = commands.add_parser("compare", help="sample base and tuned with the same seeds, score, compare")
    c.add_argument("--model", required=True, choices=models.NAMES, metavar="MODEL")
    c.add_argument("--base", required=True, help="the base pipeline (diffusers directory or hub id)")
    c.add_argument("--tuned", required=True, help="a run directory of train.py, a diffusers directory, or a LoRA "
                                                  "directory in diffusers' format (RUN/lora: applied to --base)")
    c.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    c.add_argument("--reward", required=True, help=f"comma-separated: {', '.join([*BUILTIN, *MODEL_BASED])}")
    c.add_argument("--samples", type=int, default=4, help="samples per prompt (seeds seed..seed+K-1)")
    c.add_argument("--steps", type=int, help="sampling steps (default: the pipeline's own, sampler_defaults)")
    c.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's own)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=int, default=16, help="prompts sampled at once (memory: one batch)")
    c.add_argument("--out", default="runs/compare", help="output directory (default runs/compare)")
    add_reward_model_flags(c)
    c.add_argument("--device", type=torch_device, default=device)
    c.add_argument("--precision", choices=("bf16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")

    t = commands.add_parser("timesteps", help="importance weights, masking and gradient variance over the schedule")
    t.add_argument("--model", required=True, choices=models.NAMES, metavar="MODEL")
    t.add_argument("--pretrained", help="diffusers directory (or a run directory's model/)")
    t.add_argument("--reference", help="a reference pipeline: adds the DPO margin per bucket")
    t.add_argument("--data", required=True, help="pairs: manifest, parquet, or latent cache")
    t.add_argument("--pairs", type=int, default=16, help="pairs in the fixed batch (one forward; 1-2 for video)")
    t.add_argument("--buckets", type=int, default=20)
    t.add_argument("--draws", type=int, default=4, help="noise draws per bucket")
    t.add_argument("--tau", type=float, default=0.9)
    t.add_argument("--weight-sampler-steps", type=int, default=50,
                   help="n: the weight of one reverse step of an n-step sampler (train.py's flag)")
    t.add_argument("--temperature", type=float, default=1.0)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default="runs/timesteps", help="output directory (default runs/timesteps)")
    t.add_argument("--device", type=torch_device, default=device)
    t.add_argument("--precision", choices=("bf16", "fp32"), help="default: bf16 on GPU, fp32 on CPU")

    k = commands.add_parser("curves", help="loss, accuracy, mask fraction, errors, held-out metrics per step")
    k.add_argument("runs", nargs="+", help="run directories")
    k.add_argument("--smooth", type=int, default=5, help="moving-average window")
    k.add_argument("--out", default="runs/curves.png", help="the plot (default runs/curves.png)")
    args = parser.parse_args(argv)
    if getattr(args, "precision", "") is None:
        args.precision = "bf16" if args.device.type == "cuda" else "fp32"
    return args



if __name__ == "__main__":
    main()
