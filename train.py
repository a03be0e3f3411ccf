"""Preference fine-tuning of diffusion models: SIPO, DPO-C&M, Diffusion-DPO, or SFT.

    torchrun --nproc_per_node N train.py --model wan2.1-1.3b --data PAIRS --loss sipo
    python train.py --model tiny-sd1.5 --data pairs.jsonl --steps 10          # one process works too
    python train.py --model sd1.5 --data prompts.txt --pairs online --reward pickscore ...  # pairs from the policy

torch.distributed (NCCL on GPUs, gloo on CPU) with FSDP2 per block, activation checkpointing, DCP checkpoints.
What --out holds, how a run claims it and what a resume may change are rundir.py's. The file reads top to bottom:
flags, placement, the training step (preference_loss, optimizer_step), held-out evaluation, checkpoints and export,
the loop (train).
"""
import argparse
import contextlib
import copy
import functools
import importlib.util
import json
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.autograd.profiler import record_function
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import data
import evaluate
import models
import online
import sipo
from common import (AT_LEAST_1, BELOW_ONE, NON_NEGATIVE, POSITIVE, UNIT_INTERVAL, ArgumentParser, add_size_flags,
                    all_reduce, barrier, check_numbers, check_regular_file, fail, leave, nodes, peak_memory_gb,
                    rank_and_world, setup_distributed, valid_range, write_atomically, writing)
from rundir import (CHECKPOINT_META, CheckpointReader, CheckpointWriter, RunDir, TensorsOnly, claim_run_directory,
                    comparable, truncate_log, write_args)

SILENCED = (  # notes that are not faults here, each with its reason
    # DCP's note on every save and load of a one-process run, which runs without a process group on purpose
    "torch.distributed is disabled, unavailable or uninitialized",
    # FSDP2's warning that the Wan and CogVideoX transformers return a view (their unpatchify reshape): an in-place
    # op on it would drop the pre-backward hook, but nothing here or in diffusers modifies the output in place (the
    # loss reads it out of place); test_transformer_backbones_on_two_ranks_match_one_process checks the gradients
    r"FSDP2-wrapped module \(FSDP\w+\) returned a view tensor",
    # torch's note that an RMSNorm with fp32 weights on bf16 input (Wan keeps its norms fp32, as its recipe does)
    # cannot use the fused kernel: a choice, not a fault
    "Mismatch dtype between input and weight",
)
for message in SILENCED:
    warnings.filterwarnings("ignore", message=message)

LOSSES = ("sipo", "dpo-cm", "dpo", "sft")
# beta in the convention of docs/method.md (the 1/2 included). The paper's Table A1 states it in units of 1000 of
# ours: its image Diffusion-DPO 5 is Diffusion-DPO's own 5000 on SD1.5 and SDXL [baseline, launchers/sd15.sh].
PAPER_BETA_UNIT = 1000.0
PAPER_BETA = {("image", "dpo"): 5.0, ("image", "sipo"): 1.0, ("video", "dpo"): 2.0, ("video", "sipo"): 0.02}

# --recipe paper: per backbone, each value with its source (docs/recipes.md); every recipe trains at the backbone's
# native size (the default). Flags given on the command line win. Diffusion-DPO's launchers: 2048 pairs a step, lr
# 1e-8 scaled by them (--scale_lr), constant after warm-up.
NO_SOURCE = "ours: no published value"


def image_recipe(launcher, warmup):
    source = f"Diffusion-DPO, launchers/{launcher}.sh"
    return {"global_batch_size": (2048, source), "lr": (2.048e-5, source), "steps": (2000, source),
            "warmup": (warmup, source), "max_grad_norm": (1.0, source)}


VIDEO_RECIPE = {"global_batch_size": (64, NO_SOURCE), "lr": (5e-6, NO_SOURCE), "steps": (1000, NO_SOURCE),
                "warmup": (100, NO_SOURCE), "max_grad_norm": (1.0, NO_SOURCE)}
RECIPES = {"sd1.5": image_recipe("sd15", 500), "sdxl": image_recipe("sdxl", 200),
           "flux.1-dev": {"lora": (64, NO_SOURCE), "lr": (1e-4, "diffusers' FLUX LoRA examples"),
                          "global_batch_size": (64, NO_SOURCE), "steps": (1000, NO_SOURCE), "warmup": (100, NO_SOURCE),
                          "max_grad_norm": (1.0, NO_SOURCE)},
           "cogvideox-2b": VIDEO_RECIPE, "cogvideox-5b": VIDEO_RECIPE, "wan2.1-1.3b": VIDEO_RECIPE}


# ---------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=models.NAMES, metavar="MODEL",
                   help=f"backbone: {', '.join(models.NAMES)}")
    p.add_argument("--pretrained", help="diffusers directory or hub id of the base weights (default for full-size "
                                        "models: the official repository, models.HUB_IDS)")
    p.add_argument("--random-weights", action="store_true", help="full-size architecture, random weights (benchmarks)")
    p.add_argument("--data", required=True, help="a .jsonl manifest, Pick-a-Pic .parquet shard(s), or a latent cache; "
                                              "with --pairs online, a prompt file (one a line)")
    p.add_argument("--pairs", default="offline", choices=("offline", "online"),
                   help="offline: the pairs --data holds; online: pairs sampled from the current policy every "
                        "--refresh-every steps, best against worst of --samples-per-prompt by --reward (online.py)")
    p.add_argument("--reward", default="named_colour", help="online: the reward that labels the pairs (evaluate.py's "
                                                            "names)")
    p.add_argument("--refresh-every", type=int, default=50, help="online: optimizer steps between refreshes")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="online: samples a prompt at each refresh")
    p.add_argument("--online-margin", type=float, default=0.0,
                   help="online: a pair is kept when its winner's reward exceeds its loser's by more than this")
    p.add_argument("--online-sample-steps", type=int, default=20, help="online: sampler steps a sample")
    p.add_argument("--online-guidance", type=float, default=5.0, help="online: the sampler's guidance scale")
    p.add_argument("--out", help="run directory (default: runs/MODEL-LOSS)")
    p.add_argument("--loss", default="sipo", choices=LOSSES, help="objective (default: sipo)")
    p.add_argument("--recipe", choices=("paper",),
                   help="paper: the backbone's recipe of docs/recipes.md (pairs a step, lr, steps, warm-up); flags "
                        "given win")
    p.add_argument("--beta", type=float, help="the DPO temperature in docs/method.md's convention, 1000 times the "
                                              "paper's (default, the paper's Table A1: dpo 5000 for images and 2000 "
                                              "for video; sipo and dpo-cm 1000 and 20)")
    p.add_argument("--tau", type=float, default=0.9, help="the paper's mask threshold tau: a pair whose step weight "
                                                          "is below it is masked (default 0.9)")
    p.add_argument("--eps", type=float, default=0.1, help="the paper's clip range epsilon: weights are clipped to "
                                                          "[1-eps, 1+eps] (default 0.1)")
    p.add_argument("--weight", default="step", choices=sipo.WEIGHTS,
                   help="importance weight (ours, docs/method.md): the step's own ratio, or the path's product from "
                        "pure noise down to t (costs --path-draws extra no-grad policy forwards)")
    p.add_argument("--normalise", default="after-mask", choices=sipo.NORMALISATIONS,
                   help="self-normalise the weights over the unmasked pairs (after-mask) or over the whole global "
                        "batch before masking relative weights below tau (before-mask; ours, docs/method.md)")
    p.add_argument("--path-draws", type=int, default=2, help="K, later sampler steps drawn per pair for --weight path")
    p.add_argument("--min-noise", type=float, default=0.0,
                   help="draw no training noise level below this fraction of the schedule: t >= ceil(F T) for DDPM, "
                        "sigma = shift(u) with u >= F for flow (default 0: the whole schedule)")
    p.add_argument("--weight-sampler-steps", type=int, default=50,
                   help="n: the weight is that of one reverse step of an n-step sampler, stride T/n (default 50)")
    p.add_argument("--temperature", type=float, default=1.0, help="lambda (ours), the scale of the log weight")
    p.add_argument("--flux-guidance", type=float, default=models.FLUX_TRAINING_GUIDANCE,
                   help="FLUX.1-dev: the guidance embedding's value in training (default 3.5, as diffusers' FLUX "
                        "training examples)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps in all (default 1000)")
    p.add_argument("--batch-size", type=int, default=1, help="pairs per rank per micro-batch (default 1)")
    p.add_argument("--global-batch-size", type=int, help="pairs per optimizer step; sets --grad-accum")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate (default 1e-5)")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default 100)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default 1.0)")
    p.add_argument("--lora", type=int, default=0, metavar="RANK", help="train LoRA adapters of this rank (peft)")
    p.add_argument("--replicate", type=int, help="hybrid sharding: shard each block within groups of world / R ranks "
                                                 "and replicate across the R groups (default: R = the number of "
                                                 "nodes; 1 is plain FSDP over every rank)")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 even on one rank, as several ranks do "
                                                       "(torchrun --nproc_per_node 1: checks of the sharded path)")
    p.add_argument("--shard-frozen", action="store_true",
                   help="LoRA on several ranks: shard the frozen base with FSDP2 too, for a base one GPU cannot hold "
                        "(default: every rank holds it in the compute dtype; only the adapters' gradients are "
                        "all-reduced)")
    add_size_flags(p)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--precision", choices=("bf16", "fp32"), help="compute dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--checkpoint-every", type=int, default=250, help="DCP checkpoint every N steps (default 250)")
    p.add_argument("--keep", type=int, default=2, help="complete checkpoints kept (default 2)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--max-nonfinite", type=int, default=5, help="stop after this many non-finite losses in a row")
    p.add_argument("--skip-bad", action="store_true", help="skip and count bad pairs instead of stopping")
    p.add_argument("--flip", action="store_true", help="random horizontal flip (raw data only)")
    p.add_argument("--frame-stride", type=int, default=1, help="take every k-th video frame (raw data only)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--eval-data", help="held-out pairs: implicit accuracy every --eval-every steps")
    p.add_argument("--eval-prompts", help="held-out prompts (one a line): mean --eval-reward of samples")
    p.add_argument("--eval-reward", default="named_colour", help="reward for --eval-prompts (evaluate.py's names)")
    evaluate.add_reward_model_flags(p)
    p.add_argument("--eval-every", type=int, default=100, help="held-out evaluation every N steps (default 100)")
    p.add_argument("--eval-sample-steps", type=int, default=20, help="sampling steps for --eval-prompts' images")
    p.add_argument("--eval-guidance", type=float, default=5.0, help="guidance scale for --eval-prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars (needs tensorboard)")
    p.add_argument("--no-export", action="store_true", help="skip exporting the final pipeline")
    args = p.parse_args(argv)
    args.out = Path(args.out or f"runs/{args.model}-{args.loss}")
    for action in p._actions:  # parsed again without defaults: the flags this command line gives
        action.default = argparse.SUPPRESS
    args.given = sorted(vars(p.parse_args(argv)))
    if args.recipe:
        apply_recipe(args)
    return args


# Every numeric flag and its valid range (common.py says why one outside is refused before any model is built)
NUMERIC_FLAGS = {
    **dict.fromkeys(("steps", "batch_size", "grad_accum", "global_batch_size", "replicate",
                     "path_draws", "checkpoint_every", "keep", "eval_every", "eval_sample_steps", "frame_stride",
                     "max_nonfinite", "refresh_every", "online_sample_steps"), AT_LEAST_1),
    **dict.fromkeys(("warmup", "weight_decay", "lora", "workers", "seed", "eval_guidance", "flux_guidance",
                     "online_margin", "online_guidance"), NON_NEGATIVE),
    "samples_per_prompt": online.SAMPLES_PER_PROMPT,
    **dict.fromkeys(("beta", "lr", "max_grad_norm", "temperature"), POSITIVE),
    "tau": UNIT_INTERVAL,
    "min_noise": BELOW_ONE,
    # n = 1 makes every step the sampler's last (weight 0: every pair masked); n > T = 1000 a stride of 0 timesteps
    # (weight 1: Diffusion-DPO under another name)
    "weight_sampler_steps": valid_range("between 2 and 1000", lambda v: 2 <= v <= 1000),
    "eps": BELOW_ONE,
}


def check_args(args, world_size):
    """Every flag error that can be found before a model is built, and every combination of flags that cannot mean
    what it says; raises ValueError with one line."""
    if args.global_batch_size is not None and "grad_accum" in args.given:
        raise ValueError(f"--global-batch-size {args.global_batch_size} sets --grad-accum: give one of them")
    if args.global_batch_size is not None:
        per_step = args.batch_size * world_size
        if args.global_batch_size % per_step:
            raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by --batch-size "
                             f"{args.batch_size} x {world_size} ranks")
        args.grad_accum = args.global_batch_size // per_step
    if args.replicate is not None and args.replicate >= 1 and world_size % args.replicate:
        raise ValueError(f"--replicate {args.replicate} does not divide the {world_size} ranks")
    check_numbers(args, NUMERIC_FLAGS)
    if "lora" in args.given and args.lora == 0 and not (args.recipe and "lora" in recipe_of(args.model)):
        raise ValueError("--lora 0: a LoRA rank is at least 1; leave --lora out for full fine-tuning")
    if args.tau >= 1 and args.loss in ("sipo", "dpo-cm") and args.normalise == "after-mask":
        raise ValueError(f"--tau {args.tau:g}: masks every pair (the step weight never exceeds 1; with --normalise "
                         f"before-mask relative weights can)")
    if args.random_weights and args.pretrained:
        raise ValueError(f"--random-weights and --pretrained {args.pretrained}: give one (random weights would "
                         f"replace the pretrained ones)")
    if args.fsdp and not dist.is_initialized():
        raise ValueError("--fsdp shards over a process group: run it under torchrun (--nproc_per_node 1 for one rank)")
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("--tensorboard: the tensorboard package is not installed (pip install tensorboard)")
    for flag in ("data", "eval_data", "eval_prompts"):
        path = getattr(args, flag)
        if path is not None and not os.path.isdir(path):  # a cache or a folder of shards, or a file
            check_regular_file(path, f"--{flag.replace('_', '-')}")
    cache = data.read_cache_index(args.data)
    for flag, given in (("flip", args.flip), ("frame_stride", args.frame_stride != 1)):  # how pixels are read:
        if cache is not None and given:                                                 # a cache holds latents
            raise ValueError(f"--{flag.replace('_', '-')}: --data {args.data} is a latent cache, encoded already; "
                             f"it applies to raw pairs only")
    if args.resolution or args.frames:  # what the architecture can take, before anything is built or written
        models.load_backbone(args.model, device="meta", random_weights=True).resize(args.resolution, args.frames)
    if args.pairs == "online" and (cache is not None or args.loss == "sft"):
        raise ValueError("--pairs online: " + ("trains a preference loss, not --loss sft" if args.loss == "sft" else
                                               f"--data {args.data} is a latent cache, not a prompt file"))
    if cache is not None and cache.get("model") != args.model:
        raise ValueError(f"--data {args.data}: cache was made with model={cache.get('model')!r}, "
                         f"not --model {args.model}")


def check_adopted(args):
    """A resume adopts the run's recorded settings from args.json: they pass the command line's range checks, or
    the file is named (a hand-edited `"beta": -1000` would train with an inverted preference)."""
    try:
        check_numbers(args, NUMERIC_FLAGS)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{RunDir(args.out).args_file}: the run's recorded {error}") from None


def default_beta(args, backbone):
    """--beta, else the paper's Table A1 value for the modality and loss (DPO-C&M takes SIPO's), in our units."""
    if args.beta is not None:
        return args.beta
    loss = "dpo" if args.loss == "dpo" else "sipo"
    return PAPER_BETA[("video" if backbone.is_video else "image", loss)] * PAPER_BETA_UNIT


def recipe_of(model):
    """The recipe of a backbone (a tiny one's is its full-size model's): {flag: (value, source)}."""
    return RECIPES.get(model.removeprefix("tiny-"), {})


def apply_recipe(args):
    """--recipe paper: each of the backbone's recipe values that the command line does not give."""
    for flag, (value, _) in recipe_of(args.model).items():
        if flag not in args.given and not (flag == "global_batch_size" and "grad_accum" in args.given):
            setattr(args, flag, value)


# ---------------------------------------------------------------------------------------------------------
# Placement: one process, replicated LoRA, or FSDP2 per block then the root (Wan2.1's recipe)
# ---------------------------------------------------------------------------------------------------------

def parallelism(args, world_size):
    """"none" for one process: a plain module, no DTensors, no all-gathers. "replicate" for LoRA on several ranks:
    every rank holds the frozen base and only the adapters' gradients are averaged (average_gradients), unless
    --shard-frozen asks for FSDP2 because one replica does not fit. "fsdp" for full fine-tuning on several ranks."""
    if args.fsdp:
        return "fsdp"
    if world_size == 1:
        return "none"
    return "replicate" if args.lora and not args.shard_frozen else "fsdp"


def average_gradients(trainable, world_size):
    """The replicated LoRA run's gradient sync: the adapters' gradients averaged over ranks in one all-reduce of one
    flat buffer, once per optimizer step (after the last micro-batch). This is DDP's reduction without its wrapper:
    adapters are megabytes, so bucketing and overlap with the backward buy nothing, and the module stays the one
    that switches its adapters off for the reference and exports."""
    grads = [p.grad for p in trainable]
    flat = all_reduce(torch.cat([g.flatten() for g in grads])).div_(world_size)
    for grad, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(chunk.view_as(grad))


def mixed_precision(args):
    """bf16 compute over fp32 weights: torch.autocast around forwards, in every placement. Under FSDP2 it runs over
    bf16 parameters that MixedPrecisionPolicy gathers but does not cast the inputs (shard): the timestep, FLUX's
    guidance and the rotary tables reach the model in fp32, as in one process and in the sampling pipelines."""
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16,
                          enabled=args.precision == "bf16")


AUTOCAST_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)  # bf16 under autocast


def autocast_dtypes(module, dtype):
    """{parameter: dtype} for a frozen module computed under autocast: the Linear and Conv weights (the ones
    autocast computes in bf16 anyway) in `dtype`, the rest (norms, bare parameters such as Wan's scale-shift table)
    in fp32, so that it computes exactly what the fp32 policy does under autocast, at about half its memory. The
    modules the class keeps in fp32 (models.compute_fp32_under_autocast) stay fp32 whole."""
    keep = models.fp32_names(module)
    return {parameter: dtype if isinstance(layer, AUTOCAST_LAYERS) and not keep.intersection(name.split("."))
            else torch.float32 for name, layer in module.named_modules() for parameter in layer.parameters(False)}


def hold_for_autocast(module, dtype):
    """`module` (a replicated LoRA base) cast in place as autocast_dtypes says: a base built in `dtype`
    (load_backbone) has its norms raised."""
    for parameter, held in autocast_dtypes(module, dtype).items():
        parameter.data = parameter.data.to(held)
    return module


def device_mesh(device, replicate):
    """FSDP2's mesh: (replicate, shard) for hybrid sharding, each block's parameters sharded within a group of
    world / replicate ranks (a node, by default) and replicated across groups, so that only the gradients' all-reduce
    crosses the slow network; a 1-D mesh over every rank (plain FSDP) when replicate is 1."""
    from torch.distributed.device_mesh import init_device_mesh
    world_size = dist.get_world_size()
    if replicate == 1:
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(device.type, (replicate, world_size // replicate), mesh_dim_names=("replicate", "shard"))


def shard(denoiser, param_dtype, mesh=None):
    """fully_shard each block, then the root, on `mesh`, from wherever the module is (the CPU): each group's
    parameters reach the mesh's device one group at a time, already sharded, so no GPU ever holds the whole model.
    bf16 parameters with fp32 reductions when param_dtype is bf16. The inputs are not cast (cast_forward_inputs off):
    the root's policy would round the timestep to bf16 (Wan's 997.3 to 996), FLUX's guidance and the rotary tables
    with it; autocast (mixed_precision) computes in bf16 instead. Modules the model keeps in fp32
    (models.fp32_names: Wan's time embedder and affine norms) get groups of their own with fp32 parameters first.
    FSDP2 groups are modules: Wan's bare scale-shift tables are gathered in bf16 with their block."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    if param_dtype is not None:
        keep = models.fp32_names(denoiser)
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, cast_forward_inputs=False)
        for name, module in denoiser.named_modules():
            if name.rsplit(".", 1)[-1] in keep and next(module.parameters(), None) is not None:
                fully_shard(module, mesh=mesh, mp_policy=fp32)
    for block in models.denoiser_blocks(denoiser):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(denoiser, mesh=mesh, mp_policy=policy)
    return denoiser


def sharded_dtypes(module, dtype):
    """{parameter: dtype} for the FSDP2 reference: `dtype` but for those its class keeps in fp32 (diffusers' rule, the
    groups shard() gives an fp32 policy); buffers (Wan's rope tables) stay as they are, as FSDP2 leaves the policy's:
    at step 0 it computes exactly what the policy does."""
    keep = models.fp32_names(module)
    return {parameter: torch.float32 if keep.intersection(name.split(".")) else dtype
            for name, parameter in module.named_parameters()}


def frozen_copy(module, dtypes):
    """A frozen deep copy of `module` whose parameters are made directly in `dtypes[parameter]`: the copy of a fp32
    policy in bf16 never holds a second fp32 model (deepcopy takes the cast parameters from its memo)."""
    with torch.no_grad():
        memo = {id(p): torch.nn.Parameter(p.to(dtypes[p], copy=True), requires_grad=False) for p in dtypes}
    return models.freeze(copy.deepcopy(module, memo))


def load_backbone(args):
    """The backbone --model names, from --pretrained (or its hub id), or with random weights the same on every rank,
    at --resolution and --frames (default: a cache's own size, else the native one), on the host. Each rank reads
    what the run holds and no more, in the dtype it is held in: the VAE and text encoders in the compute dtype, and
    for a run on latent caches without held-out prompts no text encoder (random weights: no VAE either, and nothing
    to export; pretrained: the export reads them then; a tiny model's random ones are built, for its export); the
    denoiser in fp32 (the master weights), a LoRA base in the compute dtype.
    Random weights are models.load_backbone's, from its own seed."""
    index = data.read_cache_index(args.data)
    encoders = index is None or args.eval_prompts or args.eval_data and data.read_cache_index(args.eval_data) is None
    tiny_random = args.model.startswith("tiny-") and not args.pretrained and not args.random_weights
    only = "denoiser" if not encoders and not tiny_random else None
    compute_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    backbone = models.load_backbone(args.model, args.pretrained, random_weights=args.random_weights,
                                    dtype=compute_dtype, denoiser_dtype=compute_dtype if args.lora else torch.float32,
                                    only=only)
    backbone.resize(args.resolution or index and tuple(index["resolution"]),
                    args.frames or index and index["num_frames"] or None)
    backbone.guidance = args.flux_guidance
    if only and args.random_weights and not args.no_export:
        args.no_export = True
        if rank_and_world()[0] == 0:
            print("note: --random-weights on latent caches builds no VAE or text encoder: nothing is exported")
    return backbone


def lora_config(rank):
    """LoRA on the attention projections, alpha = rank (scale 1), as diffusers' training examples do."""
    from peft import LoraConfig
    return LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                      target_modules=["to_q", "to_k", "to_v", "to_out.0"])


def prepare(backbone, args, device):
    """The trainable policy (fp32 master weights) and the frozen reference (None for SFT; for LoRA the adapter-free
    policy, so no second copy is held), placed as parallelism() says (recorded in args.parallel). The reference,
    text encoders and VAE are held in the compute dtype (bf16 on GPU halves them; see Backbone.set_frozen_dtype),
    and so is a replicated LoRA base. The VAE and text encoders stay on the CPU when nothing needs them: training
    and held-out pairs cached, no held-out prompts to sample."""
    from diffusers.training_utils import cast_training_params
    torch.manual_seed(args.seed)  # LoRA: the same adapter init on every rank
    args.parallel = parallelism(args, rank_and_world()[1])
    sharded = args.parallel == "fsdp"
    models.prepare_for_training(backbone, args.gradient_checkpointing)
    frozen_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    backbone.set_frozen_dtype(frozen_dtype)
    policy = backbone.denoiser
    reference = None
    if args.lora:
        policy.requires_grad_(False)
        if not sharded:  # FSDP2 casts the sharded base per block; a replica is held in bf16
            hold_for_autocast(policy, frozen_dtype)
        policy.add_adapter(lora_config(args.lora))
        cast_training_params(policy, torch.float32)
    elif args.loss != "sft":
        # FSDP2 gathers each group in its param_dtype; autocast computes only the Linear and Conv weights in bf16
        reference = frozen_copy(policy, (sharded_dtypes if sharded else autocast_dtypes)(policy, frozen_dtype))
    cached = [source is None or data.read_cache_index(source) is not None for source in (args.data, args.eval_data)]
    if not (all(cached) and not args.eval_prompts):
        for part in backbone.frozen_modules():
            part.to(device)
    if not sharded:  # FSDP2 moves each group to the device as it shards it
        for module in (policy, reference):
            if module is not None:
                module.to(device)
    else:
        param_dtype = torch.bfloat16 if args.precision == "bf16" else None
        mesh = device_mesh(device, args.replicate or nodes())
        shard(policy, param_dtype, mesh)
        if reference is not None:
            shard(reference, param_dtype, mesh)
    return policy, reference


# ---------------------------------------------------------------------------------------------------------
# The training step: the whole algorithm (preference_loss), then one optimizer step over its micro-batches
# ---------------------------------------------------------------------------------------------------------

def pair_noise(backbone, indices, epochs, shape, args, device):
    """One noise level and one noise tensor per pair, seeded by (seed, epoch, pair) (`epochs` one for all or one a
    pair): independent of ranks and resumes, so 1 and N ranks, and straight and resumed runs, draw the same. With
    --weight path, also each pair's K later sampler steps and their noise (docs/method.md §8), drawn after the rest
    so that t and eps do not change."""
    draws = args.path_draws if args.weight == "path" and args.loss in ("sipo", "dpo-cm") else 0
    stride, top = backbone.sampler_grid(args.weight_sampler_steps)
    levels, noises, n_later, later, later_noises = [], [], [], [], []
    epochs = epochs.tolist() if torch.is_tensor(epochs) else [epochs] * len(indices)
    for index, epoch in zip(indices.tolist(), epochs):
        generator = torch.Generator(device).manual_seed(hash((args.seed, epoch, index)) % 2 ** 62)
        levels.append(backbone.sample_noise_levels(1, generator, device, args.min_noise))
        noises.append(torch.randn(shape, generator=generator, device=device))
        if draws:
            n, k = sipo.later_steps(levels[-1], stride, top, draws, generator)
            n_later.append(n)
            later.append(k)
            later_noises.append(torch.randn((draws, *shape), generator=generator, device=device))
    path = (torch.cat(n_later), torch.cat(later, 1), torch.stack(later_noises, 1)) if draws else None
    return torch.cat(levels), torch.stack(noises), path


@functools.lru_cache(maxsize=1)
def adapter_layers(policy):
    """peft's LoRA layers of the policy, found once: diffusers' disable_adapters() and enable_adapters() walk every
    module to find them on each call (the cost: docs/performance.md, figure 9)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [layer for layer in policy.modules() if isinstance(layer, BaseTunerLayer)]


def reference_errors(backbone, reference, policy, x_t, levels, cond, target):
    """The reference's per-sample errors, in inference mode where it can be (no autograd bookkeeping at all, which
    no_grad still does); FSDP2 cannot unshard in it ("Inference tensors do not track
    version counter", torch 2.13)."""
    sharded = isinstance(policy if reference is None else reference, FSDPModule)
    with torch.no_grad() if sharded else torch.inference_mode():
        if reference is None:  # LoRA: the reference is the policy with its adapters off
            for layer in adapter_layers(policy):
                layer.enable_adapters(False)
            pred = backbone.predict(policy, x_t, levels, cond)
            for layer in adapter_layers(policy):
                layer.enable_adapters(True)
        else:
            pred = backbone.predict(reference, x_t, levels, cond)
        error = sipo.per_sample_error(pred, target)
    return error.clone()  # an ordinary tensor: an inference tensor may not enter the loss's autograd graph


def pair_errors(backbone, policy, reference, batch, epoch, args, with_weights=False):
    """Noise each pair (winner and loser share t and eps); one policy forward over winners and losers together,
    one reference forward without autograd. Returns the 2B policy and reference errors and, with_weights, the
    2B importance log weights (--weight step or path). The pairs' epochs are the batch's (data.PairStream's), else
    `epoch` (held-out pairs: -1)."""
    indices, epoch = batch.pop("index"), batch.pop("epoch", epoch)
    batch = data.encode_batch(backbone, batch)
    x0_w, x0_l, cond = batch["latents_w"], batch["latents_l"], data.conditioning(batch)
    levels, noise, path = pair_noise(backbone, indices, epoch, x0_w.shape[1:], args, x0_w.device)
    x0, noise, levels = torch.cat([x0_w, x0_l]), torch.cat([noise, noise]), torch.cat([levels, levels])
    cond = {key: torch.cat([value, value]) for key, value in cond.items()}
    x_t, target = backbone.noised(x0, noise, levels)
    model_error = sipo.per_sample_error(backbone.predict(policy, x_t, levels, cond), target)
    ref_error = reference_errors(backbone, reference, policy, x_t, levels, cond, target)
    if not with_weights:
        return model_error, ref_error, None
    log_w = backbone.step_log_weight(model_error, levels, args.weight_sampler_steps, args.temperature)
    if path is not None:
        n_later, later, later_noise = (torch.cat([x, x], 1 if x.dim() > 1 else 0) for x in path)
        log_w = sipo.path_log_weight(log_w, later_log_weights(backbone, policy, x0, cond, later, later_noise, args),
                                     n_later)
    return model_error, ref_error, log_w


@torch.no_grad()
def later_log_weights(backbone, policy, x0, cond, later, later_noise, args):
    """The path weight's K extra policy forwards (docs/method.md §8): the step log weight at each drawn later step k,
    at a fresh x_k ~ q(x_k | x0). One forward of the 2B samples per draw: the memory of the training forward."""
    terms = []
    for levels, noise in zip(later, later_noise):
        x_k, target = backbone.noised(x0, noise, levels)
        error = sipo.per_sample_error(backbone.predict(policy, x_k, levels, cond), target)
        terms.append(backbone.step_log_weight(error, levels, args.weight_sampler_steps, args.temperature))
    return torch.stack(terms)


def sft_step(backbone, policy, batch, epoch, args):
    """The plain denoising loss on winners only: no loser, no reference."""
    indices, epoch = batch.pop("index"), batch.pop("epoch", epoch)
    batch = data.encode_batch(backbone, batch)
    x0, cond = batch["latents_w"], data.conditioning(batch)
    levels, noise, _ = pair_noise(backbone, indices, epoch, x0.shape[1:], args, x0.device)
    x_t, target = backbone.noised(x0, noise, levels)
    return sipo.sft_loss(sipo.per_sample_error(backbone.predict(policy, x_t, levels, cond), target))


def preference_loss(backbone, policy, reference, batch, epoch, args, world_size):
    """The training objective of one micro-batch: (loss to backpropagate, statistics)."""
    with mixed_precision(args):
        if args.loss == "sft":
            return sft_step(backbone, policy, batch, epoch, args)
        weighted = args.loss in ("sipo", "dpo-cm")
        model_error, ref_error, log_w = pair_errors(backbone, policy, reference, batch, epoch, args, weighted)
    e_w, e_l = model_error.chunk(2)
    r_w, r_l = ref_error.chunk(2)
    if not weighted:
        return sipo.diffusion_dpo_loss(e_w, e_l, r_w, r_l, args.beta)
    log_w_w, log_w_l = log_w.chunk(2)
    loss_fn = sipo.sipo_loss if args.loss == "sipo" else sipo.dpo_cm_loss
    loss, stats = loss_fn(e_w, e_l, r_w, r_l, log_w_w, log_w_l, args.beta, args.tau, args.eps, args.normalise,
                          all_reduce=all_reduce)  # statistics over the global batch
    return loss * world_size, stats  # gradients are averaged over ranks; the loss is a global sum / count


def make_optimizer(trainable, args):
    """AdamW, fused: on FSDP's DTensors the default per-parameter loop is many times slower (docs/performance.md)."""
    return torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, fused=True)


def clip_gradients(trainable, max_norm):
    """The global gradient norm (all ranks), clipped; foreach: the per-tensor loop is far slower on DTensors."""
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm, foreach=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def new_counters():
    """What a checkpoint keeps besides the weights: optimizer steps taken, pairs read by all ranks (the data
    position in data.PairStream, which non-finite skips move too; in pairs, so that a resume may split them
    otherwise), non-finite steps skipped and bad pairs skipped by all ranks."""
    return {"step": 0, "pairs_read": 0, "nonfinite_skipped": 0, "bad_pairs_skipped": 0,
            # --pairs online: the refresh whose pairs are trained on, the pairs read before them, the last refresh
            # (a refresh that kept no pair leaves the pairs as they were)
            "pairs_from": -1, "pairs_read_before": 0, "refreshed": -1}


@dataclass
class Trainer:
    """What an optimizer step reads and changes: the models as placed, the optimizer and its schedule, the
    counters. train() adds what the loop needs around it (data, held-out sets, the log)."""
    args: argparse.Namespace
    backbone: models.Backbone
    policy: torch.nn.Module
    reference: torch.nn.Module | None
    trainable: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    rank: int = 0
    world_size: int = 1
    counters: dict = field(default_factory=new_counters)
    epoch: int = 0  # of the last pair read
    # the loop's, set by open_run: the pairs, the held-out pairs and prompts with their reward, the log
    dataset: torch.utils.data.Dataset | None = None
    summary: str = ""
    heldout: torch.utils.data.Dataset | None = None
    prompts: list = field(default_factory=list)
    reward: object = None
    online: tuple = ()  # --pairs online: (prompts, their conditioning, the reward)
    refresh_record: dict = field(default_factory=dict)  # the last refresh's, logged with the step after it
    log: object = None
    writer: object = None


def make_trainer(backbone, args, device, rank=0, world_size=1):
    """The policy and reference placed (prepare), AdamW over the trainable parameters, linear warm-up."""
    policy, reference = prepare(backbone, args, device)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (args.warmup + 1)))
    return Trainer(args, backbone, policy, reference, trainable, optimizer, scheduler, device, rank, world_size)


class Stopped(Exception):
    """A rank received SIGTERM or SIGINT: the step under way is given up, the last one is saved."""


def stop_agreed(stop):
    """Whether any rank was asked to stop: a host-side all-reduce (gloo beside NCCL, common.BACKENDS), which neither
    waits for the GPU nor slows it, so that it can be asked before every micro-batch."""
    flag = torch.tensor([float(stop["signal"] is not None)], device="cpu")
    return all_reduce(flag, dist.ReduceOp.MAX).item() > 0


def optimizer_step(trainer, batches, stop):
    """One optimizer step over --grad-accum micro-batches from `batches`: its record (the statistics averaged over
    micro-batches and ranks, the gradient norm), or None when a loss or the gradient norm was not finite on some
    rank: then every rank skips the step, weights and optimizer untouched. One device all-reduce and one host sync a
    step, after clipping. Raises Stopped before a micro-batch when a rank was asked to stop (stop_agreed): the data
    position goes back to the step's start, so that the resumed run takes this step whole."""
    args, optimizer, counters = trainer.args, trainer.optimizer, trainer.counters
    optimizer.zero_grad(set_to_none=True)
    micro_stats, bad_pairs, read_before = [], 0, counters["pairs_read"]
    for _ in range(args.grad_accum):
        if stop_agreed(stop):
            optimizer.zero_grad(set_to_none=True)
            counters["pairs_read"] = read_before
            raise Stopped
        with record_function("1 data"):
            batch = next(batches)
        counters["pairs_read"] += args.batch_size * trainer.world_size
        trainer.epoch = int(batch["epoch"].max())
        bad_pairs += int(batch.pop("skipped", torch.zeros(1)).sum())  # --skip-bad's substitutes
        with record_function("2 forward and loss"):
            loss, stats = preference_loss(trainer.backbone, trainer.policy, trainer.reference, batch, 0, args,
                                          trainer.world_size)
        with record_function("3 backward"):
            (loss / args.grad_accum).backward()
        micro_stats.append({"loss": loss.detach(), **stats})  # its mean over ranks is the global loss
    with record_function("4 clip and optimizer"):
        if args.parallel == "replicate":
            average_gradients(trainer.trainable, trainer.world_size)
        grad_norm = clip_gradients(trainer.trainable, args.max_grad_norm)
        stats = {k: torch.stack([s[k] for s in micro_stats]).mean() for k in micro_stats[0]}
        nonfinite = ~torch.isfinite(torch.stack([stats["loss"], grad_norm.to(stats["loss"].device)])).all()
        record = reduce_stats({**stats, "grad_norm": grad_norm, "nonfinite": nonfinite,
                               "bad_pairs": torch.tensor(float(bad_pairs), device=trainer.device)}, trainer.world_size)
        counters["bad_pairs_skipped"] += round(record.pop("bad_pairs") * trainer.world_size)
        if record.pop("nonfinite") > 0:
            optimizer.zero_grad(set_to_none=True)
            counters["nonfinite_skipped"] += 1
            return None
        optimizer.step()
        trainer.scheduler.step()
    counters["step"] += 1
    return record


# ---------------------------------------------------------------------------------------------------------
# Held-out evaluation: implicit accuracy on held-out pairs, the reward of samples of held-out prompts
# ---------------------------------------------------------------------------------------------------------

SAMPLE_BATCH = 16


@torch.no_grad()
def heldout_metrics(backbone, policy, reference, heldout, prompts, reward, args, rank, world_size):
    """Implicit accuracy on held-out pairs with fixed noise (epoch -1), and the mean reward of samples of fixed
    prompts and seeds. Every rank takes an equal share: the sharded policy's forwards are collective."""
    totals = torch.zeros(4, dtype=torch.float64, device=backbone.device)  # correct, pairs, reward sum, samples
    if heldout is not None and args.loss != "sft":
        for indices in data.rank_batches(len(heldout), args.batch_size, rank, world_size, args.seed, 0):
            with mixed_precision(args):
                model_error, ref_error, _ = pair_errors(backbone, policy, reference,
                                                        data.collate([heldout[i] for i in indices]), -1, args)
            e_w, e_l = model_error.chunk(2)
            r_w, r_l = ref_error.chunk(2)
            totals[0] += (((e_l - r_l) - (e_w - r_w)) > 0).sum()
            totals[1] += len(indices)
    samples = None
    if prompts:
        share = -(-len(prompts) // world_size)
        indices = (list(range(rank, len(prompts), world_size)) + list(range(share)))[:share]
        mine, real = [prompts[i] for i in indices], len(prompts[rank::world_size])
        # prompt i is sampled with seed + i: the same image on any number of ranks
        parts = []
        for i in range(0, len(mine), SAMPLE_BATCH):  # SAMPLE_BATCH prompts a call: memory is one batch's
            with mixed_precision(args):
                parts.append(backbone.sample(mine[i:i + SAMPLE_BATCH], seed=[args.seed + k for k in
                                                                             indices[i:i + SAMPLE_BATCH]],
                                             steps=args.eval_sample_steps, guidance=args.eval_guidance).float())
        samples = torch.cat(parts)
        scores = reward(samples.cpu(), mine)[:real]
        totals[2] += scores.sum().item()
        totals[3] += real
        if world_size > 1:
            gathered = [torch.empty_like(samples) for _ in range(world_size)]
            dist.all_gather(gathered, samples.contiguous())
            # rank r sampled prompts r, r + N, r + 2N, ...: back into the prompts' order
            samples = torch.stack([gathered[i % world_size][i // world_size] for i in range(len(prompts))])
        samples = samples.cpu()
    all_reduce(totals)
    metrics = {}
    if totals[1]:
        metrics["heldout_accuracy"] = (totals[0] / totals[1]).item()
    if totals[3]:
        metrics["heldout_reward"] = (totals[2] / totals[3]).item()
    return metrics, samples


def save_samples(out, step, samples, prompts, writer):
    """The held-out prompts' samples (fixed seeds) as RUN/samples/step-NNNNNN/grid.png, a prompt under each image
    (videos: a row per frame), and in TensorBoard with --tensorboard."""
    folder = RunDir(out).sample_folder(step)
    folder.mkdir(parents=True, exist_ok=True)
    grid = evaluate.labelled_grid(evaluate.sample_rows(samples, f"step {step}"), prompts)
    grid.save(folder / "grid.png")
    if writer:
        import numpy as np
        writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")


# ---------------------------------------------------------------------------------------------------------
# Checkpoints (DCP into checkpoints/step-N.tmp, renamed when complete) and the export
# ---------------------------------------------------------------------------------------------------------

STATE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# loading: the trainable keys only (what get_model_state_dict gave and dcp.load filled, all of them or it raises);
# a plain module's strict load_state_dict would count the frozen base as missing
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def save_checkpoint(trainer):
    """The trainable weights and the optimizer's tensors (DCP, every rank its shards, rundir.CheckpointWriter: no
    pickle), the optimizer's hyperparameters, the counters and the schedule (trainer.json); the oldest beyond
    --keep go. A reader only ever sees complete checkpoints (rundir.RunDir.latest_checkpoint), and no checkpoint
    holds non-finite weights: an update that overflowed them is refused here (optimizer_step skips non-finite
    gradients; finite ones times an absurd --lr can still overflow)."""
    run, rank, step = RunDir(trainer.args.out), trainer.rank, trainer.counters["step"]
    local = [getattr(p, "to_local", lambda p=p: p)().detach() for p in trainer.trainable]
    if all_reduce(torch.stack([t.isfinite().all() for t in local]).all().float(), dist.ReduceOp.MIN).item() < 1:
        raise ValueError(f"the weights are not finite after step {step} (the update overflowed: lower --lr); "
                         f"step {step} is not saved")
    final = run.checkpoint(step)
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that was interrupted
    barrier()
    state = state_dicts(trainer)
    param_groups = state["optimizer"].pop("param_groups")  # DCP would pickle its non-tensor values
    with writing(tmp):
        dcp.save(state, storage_writer=CheckpointWriter(tmp))
    if rank == 0:
        (tmp / CHECKPOINT_META).write_text(json.dumps({**trainer.counters, "param_groups": param_groups,
                                                       "scheduler": trainer.scheduler.state_dict()}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in run.checkpoint_steps()[:-trainer.args.keep]:
            shutil.rmtree(old)
        if trainer.args.pairs == "online":
            oldest = json.loads((run.checkpoint_steps()[0] / CHECKPOINT_META).read_text())
            online.prune(trainer.args.out, oldest["pairs_from"])
    barrier()


def state_dicts(trainer):
    return {"model": get_model_state_dict(trainer.policy, options=STATE_OPTIONS),
            "optimizer": get_optimizer_state_dict(trainer.policy, trainer.optimizer, options=STATE_OPTIONS)}


class UnusableCheckpoint(ValueError):
    """A checkpoint this run cannot resume from (its layout, its counters, its tensors): said without the note that
    --resume continues, which would only meet it again."""


def load_checkpoint(path, trainer):
    """Restores what save_checkpoint saved into the placed trainer, whatever placement saved it. Tensors only
    (rundir.TensorsOnly): nothing in the checkpoint is unpickled."""
    saved = json.loads((path / CHECKPOINT_META).read_text())
    if "pairs_read" not in saved or "param_groups" not in saved:
        raise UnusableCheckpoint(f"{path}: a checkpoint of an older layout (its data position counted in "
                                 f"micro-batches, which another number of ranks reads otherwise); start the run again")
    wrong = next((key for key in new_counters() if not isinstance(saved.get(key, 0), int)), None)
    if wrong:
        raise UnusableCheckpoint(f"{path / CHECKPOINT_META}: {wrong} is {saved[wrong]!r}, not a whole number")
    state = state_dicts(trainer)
    state["optimizer"].pop("param_groups")
    try:
        dcp.load(state, storage_reader=CheckpointReader(path), planner=TensorsOnly())
    except dcp.api.CheckpointException as error:  # what failed on each rank, gathered: the first rank's, in a line
        first = next(iter(error.failures.values()))  # (exception, its traceback's frames)
        reason = str(first[0] if isinstance(first, tuple) else first).strip().splitlines()[-1]
        raise UnusableCheckpoint(f"{path}: cannot be resumed by this run ({reason}; a checkpoint of another run, "
                                 f"LoRA against full fine-tuning or another model?)") from None
    state["optimizer"]["param_groups"] = saved.pop("param_groups")
    set_model_state_dict(trainer.policy, state["model"], options=LOAD_OPTIONS)
    set_optimizer_state_dict(trainer.policy, trainer.optimizer, state["optimizer"], options=LOAD_OPTIONS)
    trainer.scheduler.load_state_dict(saved.pop("scheduler"))
    trainer.counters = {**new_counters(), **saved}


def export(out, backbone, policy, lora_rank, rank, pretrained=None, frozen_dtype=torch.float32):
    """The final pipeline in the diffusers layout (safetensors): `from_pretrained(RUN/model)` loads it. With LoRA,
    model/ holds the merged weights and lora/ the adapter in diffusers' own format, written by the pipeline class's
    save_lora_weights: `pipe.load_lora_weights(RUN/lora)` on the base pipeline loads it. A run on caches did not
    read the text encoders: the pipeline is read from `pretrained` now, in `frozen_dtype`.
    Every rank takes part in gathering the weights to rank 0's CPU; rank 0 then writes alone and the others leave
    without waiting for it (torchrun waits for every rank): a barrier would time out the others' collectives while
    a large pipeline is written. The denoiser that takes the weights is made on the meta device: no random init,
    no second copy."""
    run = RunDir(out)
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        name = "unet" if hasattr(backbone.pipe, "unet") else "transformer"
        with torch.device("meta"):
            denoiser = type(backbone.denoiser).from_config(backbone.denoiser.config)
        if lora_rank:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft import get_peft_model_state_dict
            denoiser.add_adapter(lora_config(lora_rank))
            denoiser.load_state_dict(full, assign=True)
            layers = get_peft_model_state_dict(denoiser)
            if name == "unet":  # the UNet loaders expect diffusers' key names; the transformers' take peft's
                layers = convert_state_dict_to_diffusers(layers)
            write_atomically(run.lora, lambda tmp: type(backbone.pipe).save_lora_weights(
                tmp, **{f"{name}_lora_layers": layers,
                        f"{name}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict()}))
            denoiser.fuse_lora()
            denoiser.unload_lora()
        else:
            denoiser.load_state_dict(full, assign=True)
        pipe = backbone.pipe
        if pipe.text_encoder is None:  # trained on caches: the text encoders it did not read
            pipe = models.frozen_pipeline(backbone.name, pretrained, frozen_dtype)
        sharded = getattr(pipe, name)
        pipe.register_modules(**{name: denoiser})
        write_atomically(run.model, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
        pipe.register_modules(**{name: sharded})


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------

def open_run(args, cleanup):
    """Every rank: the process group, the flags, the run directory claimed, the models built and placed, the data
    and held-out sets opened, the checkpoint to resume from loaded, the log opened. A refusal is one ValueError
    line, said once, before any step (exit 1)."""
    device, rank, world_size = setup_distributed()
    cleanup.callback(leave)
    try:
        check_args(args, world_size)
        if rank == 0 and args.warmup >= args.steps:
            print(f"note: --warmup {args.warmup} is not shorter than --steps {args.steps}: the learning rate peaks at "
                  f"{args.lr * args.steps / (args.warmup + 1):.3g}, not --lr {args.lr:g}")
        claim_run_directory(args, rank, cleanup)
        check_adopted(args)
        if args.precision is None:
            args.precision = "bf16" if device.type == "cuda" else "fp32"
        trainer = make_trainer(load_backbone(args), args, device, rank, world_size)
        args.beta = default_beta(args, trainer.backbone)
        open_data(trainer)
    except ValueError as error:  # models.ModelError and data.DataError are ValueErrors
        if rank == 0:
            fail(error)
        sys.exit(1)
    run = RunDir(args.out)
    checkpoint = run.latest_checkpoint(say=print if rank == 0 else None) if args.resume else None
    if checkpoint is not None:
        load_checkpoint(checkpoint, trainer)
        if rank == 0:
            before = run.read_args()
            changed = [f"--{k.replace('_', '-')} {before[k]} -> {getattr(args, k)}" for k in args.given
                       if k in before and k not in ("out", "resume") and comparable(getattr(args, k)) != before[k]]
            print(f"resuming from step {trainer.counters['step']} of {run} with the run's own settings" +
                  (f"; changed: {', '.join(changed)}" if changed else ""))
    elif args.resume and rank == 0:
        print(f"note: no complete checkpoint in {run}; starting from step 0")
    if rank == 0:
        truncate_log(run.log_file, trainer.counters["step"])
        write_args(args, world_size, trainer.summary, trainer.counters["step"])
        print(f"{args.model}: {sum(p.numel() for p in trainer.trainable):,} trainable parameters; data: "
              f"{trainer.summary}; {world_size} rank(s); loss {args.loss}" +
              ("" if args.loss == "sft" else f", beta {args.beta:g}"))
        trainer.log = cleanup.enter_context(open(run.log_file, "a"))
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            trainer.writer = SummaryWriter(run.tensorboard)
    return trainer


def open_data(trainer):
    """The training pairs (at least one full batch on every rank), the held-out pairs, and the held-out prompts with
    a reward that has scored them once: a reward that cannot fails now, not at the first evaluation."""
    args, backbone = trainer.args, trainer.backbone
    if args.pairs == "online":
        prompts = evaluate.read_prompts(args.data, "--data")
        reward = evaluate.load_rewards(args.reward, args)
        evaluate.check_rewards_fit(reward, backbone, prompts)
        cond = [backbone.encode_prompts(prompts[i:i + 64]) for i in range(0, len(prompts), 64)]
        trainer.online = prompts, {key: torch.cat([c[key] for c in cond]) for key in cond[0]}, reward[args.reward]
        trainer.summary = f"online, {len(prompts)} prompts x {args.samples_per_prompt} samples every " \
                          f"{args.refresh_every} steps, by {args.reward}"
    else:
        trainer.dataset, trainer.summary = data.open_dataset(args.data, backbone, args.pretrained, args.skip_bad,
                                                             args.flip, args.seed, args.frame_stride)
    if args.pairs == "offline" and len(trainer.dataset) < args.batch_size * trainer.world_size:
        raise ValueError(f"--data {args.data}: {len(trainer.dataset)} pairs give no full batch of {args.batch_size} "
                         f"pairs on each of {trainer.world_size} ranks")
    trainer.heldout = data.open_dataset(args.eval_data, backbone, args.pretrained, args.skip_bad)[0] \
        if args.eval_data else None
    trainer.prompts, trainer.reward = [], None
    if args.eval_prompts:
        trainer.prompts = evaluate.read_prompts(args.eval_prompts, "--eval-prompts")
        rewards = evaluate.load_rewards(args.eval_reward, args)
        evaluate.check_rewards_fit(rewards, backbone, trainer.prompts)
        trainer.reward = rewards[args.eval_reward]


def record_step(trainer, record, seconds):
    """The step's record (optimizer_step's, averaged over ranks), the held-out metrics when due, and rank 0's line
    in log.jsonl (and TensorBoard)."""
    args, counters, step = trainer.args, trainer.counters, trainer.counters["step"]
    if (trainer.heldout is not None or trainer.prompts) and (step % args.eval_every == 0 or step == args.steps):
        metrics, samples = heldout_metrics(trainer.backbone, trainer.policy, trainer.reference, trainer.heldout,
                                           trainer.prompts, trainer.reward, args, trainer.rank, trainer.world_size)
        record.update(metrics)
        if samples is not None and trainer.rank == 0:
            save_samples(args.out, step, samples, trainer.prompts, trainer.writer)
    record.update(trainer.refresh_record)
    trainer.refresh_record = {}
    if trainer.rank == 0:
        pairs = args.batch_size * args.grad_accum * trainer.world_size
        record.update(step=step, lr=trainer.scheduler.get_last_lr()[0], step_time=seconds, pairs_per_s=pairs / seconds,
                      peak_memory_gb=peak_memory_gb(trainer.device), nonfinite_skipped=counters["nonfinite_skipped"],
                      epoch=trainer.epoch, **({"bad_pairs_skipped": counters["bad_pairs_skipped"]}
                                              if args.skip_bad else {}))
        trainer.log.write(json.dumps(record) + "\n")
        trainer.log.flush()
        if trainer.writer:
            for key, value in record.items():
                trainer.writer.add_scalar(key, value, step)
    return record


def reduce_stats(stats, world_size):
    """Mean of each statistic over ranks, in one all-reduce of the tensors on their device (NCCL on GPUs)."""
    keys = sorted(stats)
    values = all_reduce(torch.stack([stats[k].float().reshape(()) for k in keys]))
    return dict(zip(keys, (values / world_size).tolist()))


def pair_batches(trainer, start):
    args = trainer.args
    return data.pair_batches(trainer.dataset, args.batch_size, trainer.rank, trainer.world_size, args.seed, start,
                             args.workers)


def online_pairs(trainer, batches, show=lambda text: None):
    """--pairs online: the batches to train on. A resumed run first takes up the stored pairs it was training on,
    where it was in them; every --refresh-every steps new pairs are sampled from the policy (online.py) and stored,
    unless none clears the margin: then the log says so and the pairs stay as they were. `show` puts what is under
    way on the progress bar while the policy samples."""
    args, counters, step = trainer.args, trainer.counters, trainer.counters["step"]
    if batches is None and counters["pairs_from"] >= 0:
        trainer.dataset = online.load_pairs(args.out, counters["pairs_from"])
        batches = pair_batches(trainer, counters["pairs_read"] - counters["pairs_read_before"])
    if batches is not None and (step % args.refresh_every or counters["refreshed"] == step):
        return batches
    prompts, cond, reward = trainer.online
    show(f"{args.loss}: sampling pairs from the policy")
    pairs, trainer.refresh_record = online.sample_pairs(trainer.backbone, prompts, cond, reward, args, step,
                                                        trainer.rank, trainer.world_size, lambda: mixed_precision(args))
    counters["refreshed"] = step
    show(args.loss)
    if pairs is None or len(pairs) < args.batch_size * trainer.world_size:
        if batches is None:
            raise ValueError(f"--pairs online: the refresh at step {step} kept {len(pairs or ())} pairs above "
                             f"--online-margin {args.online_margin:g}, no full batch of {args.batch_size} on each of "
                             f"{trainer.world_size} ranks (more prompts or --samples-per-prompt, a lower margin)")
        trainer.refresh_record["refresh_note"] = f"too few pairs above the margin: the pairs of step " \
                                                 f"{counters['pairs_from']} stay"
        return batches
    if trainer.rank == 0:
        online.save_pairs(args.out, pairs)
    trainer.dataset, counters["pairs_from"], counters["pairs_read_before"] = pairs, step, counters["pairs_read"]
    return pair_batches(trainer, 0)


SHOWN = {"loss": "loss", "acc": "accuracy", "masked": "mask_fraction", "heldout": "heldout_accuracy"}


def train(args, cleanup):
    """The run; `cleanup` (an ExitStack) releases what it holds however it ends: the process group, the run
    directory's lock, the SIGTERM handler, the log."""
    trainer = open_run(args, cleanup)                                    # 1. directory, models, data, resume
    counters, rank = trainer.counters, trainer.rank
    stop = {"signal": None}  # SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C): save the last step, then stop
    for signum in (signal.SIGTERM, signal.SIGINT):
        cleanup.callback(signal.signal, signum, signal.signal(signum, lambda received, _: stop.update(signal=received)))
    # a context: an error or a stop mid-run ends the bar's line before the one line that says what happened
    with tqdm(total=args.steps, initial=counters["step"], disable=rank != 0, desc=args.loss, unit="step") as progress:
        batches = None if args.pairs == "online" else pair_batches(trainer, counters["pairs_read"])
        nonfinite_in_a_row = 0
        while counters["step"] < args.steps:
            if args.pairs == "online":
                batches = online_pairs(trainer, batches, progress.set_description)  # refresh when due
            start = time.perf_counter()
            try:
                record = optimizer_step(trainer, batches, stop)          # 2. one optimizer step, its micro-batches
            except Stopped:                                              #    a stop asked on some rank
                break
            if record is None:                                           #    not finite on some rank: all skipped
                nonfinite_in_a_row += 1
                if nonfinite_in_a_row >= args.max_nonfinite:
                    progress.close()
                    if rank == 0:
                        print(f"error: {nonfinite_in_a_row} non-finite steps in a row at step {counters['step']}; "
                              f"stopping (lower --lr or --beta)", file=sys.stderr)
                    sys.exit(1)
                continue
            nonfinite_in_a_row = 0
            record = record_step(trainer, record, time.perf_counter() - start)  # 3. held-out, the log line
            if rank == 0:
                progress.set_postfix({k: f"{record[v]:.4f}" for k, v in SHOWN.items() if v in record}, refresh=False)
                progress.update(1)
            step = counters["step"]
            if step % args.checkpoint_every == 0 or step == args.steps:
                save_checkpoint(trainer)                                 # 4. a DCP checkpoint
    if counters["step"] < args.steps:  # stopped: the last step taken is saved, the one under way given up
        step = counters["step"]
        if step and not RunDir(args.out).checkpoint(step).is_dir():
            save_checkpoint(trainer)
        if rank == 0:
            name = signal.Signals(stop["signal"]).name if stop["signal"] else "a signal to another rank"
            print(f"{name}: " + (f"saved step {step}; continue with --resume" if step else
                                 "stopped before step 1; nothing to save"), file=sys.stderr)
        return
    if not args.no_export:
        export(args.out, trainer.backbone, trainer.policy, args.lora, rank, args.pretrained,  # 5. the pipeline
               torch.bfloat16 if args.precision == "bf16" else torch.float32)
    if rank == 0:
        print(f"done: {args.out}" + ("" if args.no_export else f"; pipeline in {RunDir(args.out).model}"))


def main(argv=None):
    """train(), and for an error met mid-run (a bad pair without --skip-bad, a full disk) one line saying what the
    run directory keeps. With several ranks the others may wait in a collective: this one exits at once and
    torchrun ends them. One process can call main(argv) in-process (the tests do): it raises SystemExit."""
    args = parse_args(argv)
    with contextlib.ExitStack() as cleanup:
        try:
            train(args, cleanup)
        except (ValueError, OSError, KeyboardInterrupt) as error:  # Ctrl-C before the first step: nothing to save
            kept = RunDir(args.out).latest_checkpoint()
            error = "interrupted" if isinstance(error, KeyboardInterrupt) else error
            fail(error, "" if isinstance(error, UnusableCheckpoint) else
                 f" ({args.out} keeps {kept.name}: continue with --resume)" if kept else
                 f" ({args.out} has no checkpoint yet: a rerun starts again)")
            sys.stderr.flush()
            if dist.is_initialized() and dist.get_world_size() > 1:
                os._exit(1)
            sys.exit(1)


if __name__ == "__main__":
    main()
