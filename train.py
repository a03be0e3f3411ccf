"""Preference fine-tuning of diffusion models: SIPO, DPO-C&M, Diffusion-DPO, or SFT.

    torchrun --nproc_per_node N train.py --model wan2.1-1.3b --pretrained PATH --data PAIRS --loss sipo
    python train.py --model tiny-sd1.5 --data pairs.jsonl --steps 10          # one process works too

torch.distributed (NCCL on GPUs, gloo on CPU) with FSDP2 per block, activation checkpointing, DCP checkpoints.
The run directory --out holds: args.json, log.jsonl (one line per step), checkpoints/step-NNNNNN (DCP, complete
ones only), model/ (the final pipeline in the diffusers layout) and, with --lora, lora/.
"""
import argparse
import contextlib
import copy
import functools
import json
import math
import multiprocessing.forkserver
import os
import re
import resource
import shutil
import signal
import socket
import sys
import threading
import time
import warnings
from multiprocessing.resource_sharer import DupFd
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from tqdm import tqdm

import data
import models
import sipo

# DCP's note on every save and load of a one-process run, which runs without a process group on purpose
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

LOSSES = ("sipo", "dpo-cm", "dpo", "sft")
# beta convention of METHOD §2 (the 1/2 included). Diffusion-DPO's 5000 for images [baseline]; DPO-C&M and SIPO
# use 1/5 of it for images and 1/100 for video [paper, Table A1 ratio], applied to the same base.
DPO_BETA = 5000.0
RATIO = {"image": 0.2, "video": 0.01}


def parse_args(argv=None):
    # prog: a rank that train.launch forked for toy.py or study.py has their name in sys.argv[0]
    p = argparse.ArgumentParser(prog="train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=models.NAMES, metavar="MODEL",
                   help=f"backbone: {', '.join(models.NAMES)}")
    p.add_argument("--pretrained", help="diffusers directory or hub id of the base weights (default for full-size "
                                        "models: the official repository, models.HUB_IDS)")
    p.add_argument("--random-weights", action="store_true", help="full-size architecture, random weights (benchmarks)")
    p.add_argument("--data", required=True, help="a .jsonl manifest, Pick-a-Pic .parquet shard(s), or a latent cache")
    p.add_argument("--out", help="run directory (default: runs/MODEL-LOSS)")
    p.add_argument("--loss", default="sipo", choices=LOSSES, help="objective (default: sipo)")
    p.add_argument("--beta", type=float, help="DPO temperature, METHOD §2 convention (default: 5000 for dpo; "
                                              "1000 for images and 50 for video with sipo and dpo-cm)")
    p.add_argument("--tau", type=float, default=0.9, help="mask pairs whose step weight is below tau (default 0.9)")
    p.add_argument("--eps", type=float, default=0.1, help="clip weights to [1-eps, 1+eps] (default 0.1)")
    p.add_argument("--weight", default="step", choices=sipo.WEIGHTS,
                   help="importance weight: the step's own ratio, or the path's product from pure noise down to t "
                        "(METHOD §8; costs --path-draws extra no-grad policy forwards)")
    p.add_argument("--normalise", default="after-mask", choices=sipo.NORMALISATIONS,
                   help="self-normalise the weights over the unmasked pairs (after-mask) or over the whole global "
                        "batch before masking relative weights below tau (before-mask; METHOD §8)")
    p.add_argument("--path-draws", type=int, default=2, help="K, sampler steps drawn per pair for --weight path")
    p.add_argument("--sample-steps", type=int, default=50, help="sampler steps that set the weight's stride T/n")
    p.add_argument("--temperature", type=float, default=1.0, help="lambda, the scale of the log weight")
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
    p.add_argument("--shard-frozen", action="store_true",
                   help="LoRA on several ranks: shard the frozen base with FSDP2 too, for a base one GPU cannot hold "
                        "(default: every rank holds it in the compute dtype; only the adapters' gradients are "
                        "all-reduced)")
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
    p.add_argument("--eval-every", type=int, default=100, help="held-out evaluation every N steps (default 100)")
    p.add_argument("--eval-sample-steps", type=int, default=20, help="sampling steps for --eval-prompts")
    p.add_argument("--eval-guidance", type=float, default=5.0, help="guidance scale for --eval-prompts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars (needs tensorboard)")
    p.add_argument("--no-export", action="store_true", help="skip exporting the final pipeline")
    args = p.parse_args(argv)
    args.out = Path(args.out or f"runs/{args.model}-{args.loss}")
    return args


def check_args(args, world_size):
    """Every flag error that can be found before a model is built; raises ValueError with one line."""
    if args.global_batch_size is not None:
        per_step = args.batch_size * world_size
        if args.global_batch_size % per_step:
            raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by --batch-size "
                             f"{args.batch_size} x {world_size} ranks")
        args.grad_accum = args.global_batch_size // per_step
    if args.replicate is not None and args.replicate >= 1 and world_size % args.replicate:
        raise ValueError(f"--replicate {args.replicate} does not divide the {world_size} ranks")
    check_numbers(args, NUMERIC_FLAGS)
    for flag in ("data", "eval_data", "eval_prompts"):
        path = getattr(args, flag)
        if path is not None and not Path(path).exists():
            raise ValueError(f"--{flag.replace('_', '-')} {path}: does not exist")
    cache = data.read_cache_index(args.data)
    if cache is not None and cache.get("model") != args.model:
        raise ValueError(f"--data {args.data}: cache was made with model={cache.get('model')!r}, "
                         f"not --model {args.model}")


def valid_range(doc, test):
    """`test` (value -> bool), described by `doc` in check_numbers' message ("must be <doc>")."""
    test.__doc__ = doc
    return test


# Every numeric flag and its valid range: a value outside trains something else than asked (a negative warm-up is
# a negative learning rate, a negative --max-grad-norm flips the gradients, beta <= 0 inverts or drops the
# preference, tau > 1 masks every pair), so it is refused before any model is built.
AT_LEAST_1 = valid_range("at least 1", lambda v: v >= 1)
NON_NEGATIVE = valid_range("at least 0", lambda v: v >= 0)
POSITIVE = valid_range("a positive number", lambda v: v > 0)
UNIT_INTERVAL = valid_range("in [0, 1]", lambda v: 0 <= v <= 1)
NUMERIC_FLAGS = {
    **dict.fromkeys(("steps", "batch_size", "grad_accum", "global_batch_size", "replicate", "sample_steps",
                     "path_draws", "checkpoint_every", "keep", "eval_every", "eval_sample_steps", "frame_stride",
                     "max_nonfinite"), AT_LEAST_1),
    **dict.fromkeys(("warmup", "weight_decay", "lora", "workers", "seed", "eval_guidance"), NON_NEGATIVE),
    **dict.fromkeys(("beta", "lr", "max_grad_norm", "temperature"), POSITIVE),
    "tau": UNIT_INTERVAL,
    "eps": valid_range("in [0, 1)", lambda v: 0 <= v < 1),
}


def check_numbers(args, valid_ranges):
    """Raises ValueError naming the first numeric flag outside its valid range (NaN and inf never are in one)."""
    for flag, valid in valid_ranges.items():
        value = getattr(args, flag, None)
        if value is not None and not (math.isfinite(value) and valid(value)):
            raise ValueError(f"--{flag.replace('_', '-')} {value}: must be {valid.__doc__}")


def check_run_directory(args):
    """--out is new, empty, or a run directory of ours (args.json) for the same --model. A complete checkpoint
    there is continued with --resume and never overwritten without it; a run that died before its first
    checkpoint leaves nothing to lose, so a rerun (or --resume) starts it again from step 0."""
    out = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: is a file, not a directory")
    ours = (out / "args.json").is_file()
    if not ours:
        if out.is_dir() and any(out.iterdir()):
            raise ValueError(f"--out {out}: holds files train.py did not write (no args.json); pass a new or empty "
                             f"directory")
        if args.resume:
            raise ValueError(f"--resume: {out} holds no run")
        return
    try:
        previous = json.loads((out / "args.json").read_text())["model"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"--out {out}: args.json is unreadable; pass another --out") from None
    if previous != args.model:
        raise ValueError(f"--out {out} holds a run of --model {previous}, not --model {args.model}")
    checkpoint = latest_checkpoint(out)
    if checkpoint is not None and not args.resume:
        raise ValueError(f"--out {out} already holds a run ({checkpoint.name}); pass --resume to continue it, or "
                         f"another --out")


def claim_run_directory(args):
    """Rank 0: create --out, take its lock (held until this process ends; a second trainer, or an orphaned rank of
    a killed one, is refused in one line naming the holder) and write args.json before any model is built."""
    args.out.mkdir(parents=True, exist_ok=True)
    lock, holder = data.take_lock(args.out / ".lock", "train.py")
    if lock is None:
        raise ValueError(f"--out {args.out} is in use by {holder}; wait for it to end, or pass another --out")
    write_args(args, 1, "not read yet")
    return lock


def write_args(args, world_size, summary):
    (args.out / "args.json").write_text(json.dumps({**vars(args), "out": str(args.out), "world_size": world_size,
                                                    "data_summary": str(summary)}, indent=1))


def default_beta(args, backbone):
    if args.beta is not None:
        return args.beta
    return DPO_BETA if args.loss == "dpo" else DPO_BETA * RATIO["video" if backbone.is_video else "image"]


# ---------------------------------------------------------------------------------------------------------
# Distribution: FSDP2 per block, then the root (Wan2.1's recipe)
# ---------------------------------------------------------------------------------------------------------

def setup_distributed(timeout=None):
    """torchrun's process group (NCCL on GPUs, gloo on CPU). Plain `python train.py` makes none: one process runs
    the same code with every collective below a no-op and no sharding (parallelism). `timeout`: how long a
    collective waits for the slowest rank (data.py cache's last barrier may wait for a rank's last shard)."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:
        return device, 0, 1
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout,
                            **({"device_id": device} if device.type == "cuda" else {}))
    return device, dist.get_rank(), dist.get_world_size()


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    """dist.all_reduce in place, returning the tensor (sipo.py's all_reduce); one process: the tensor as it is."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op)
    return tensor


def barrier():
    if dist.is_initialized():
        dist.barrier()


def leave():
    if dist.is_initialized():
        dist.destroy_process_group()


def launch(argv, ranks=1, threads=None, log=None, entry=None):
    """entry(argv) (default: main, `python train.py ARGV`; data.main for data.py) on `ranks` processes with the
    variables `torchrun --standalone --nproc_per_node RANKS` gives them (one process: none, as `python train.py`),
    `threads` each (default: its share of the cores), forked by torch.multiprocessing from a server that imported
    this module once. For a program that runs many short trainings (toy.py, study.py, the tests), this saves an
    interpreter and 4 s of imports a process. `log`: a file the processes append their stdout and stderr to
    (default: this process's, as they are now). Returns torch's ProcessContext (pids, join); finish(context) waits."""
    start_launcher()
    port = free_port()
    threads = threads or max(1, os.cpu_count() // ranks)
    # the server's stdout and stderr are the ones it started with (under pytest, another test's capture)
    outputs = None if log else [(DupFd(1), DupFd(2)) for _ in range(ranks)]
    return torch.multiprocessing.start_processes(
        _launched, (entry or main, [str(arg) for arg in argv], ranks, threads, port, log, outputs), nprocs=ranks,
        join=False, start_method="forkserver")


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous on this machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_launcher():
    """launch()'s server, a process that imports this module once and forks the training processes. Starting it
    early overlaps its imports with other work; launch() starts it if need be."""
    multiprocessing.set_forkserver_preload(["train"])
    multiprocessing.forkserver.ensure_running()


def _launched(rank, entry, argv, ranks, threads, port, log, outputs):
    if ranks > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
                          GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    tqdm.set_lock(threading.RLock())  # not tqdm's multiprocessing lock, whose semaphore a killed process would leak
    if log is not None:
        stdout = stderr = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    else:
        stdout, stderr = (fd.detach() for fd in outputs[rank])
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    entry(argv)


def finish(context):
    """Waits for launch()'s processes: 0, or the first failing one's exit status (-N: killed by signal N)."""
    try:
        while not context.join():
            pass
    except torch.multiprocessing.ProcessExitedException as error:
        return error.exit_code
    except torch.multiprocessing.ProcessRaisedException as error:
        print(error, file=sys.stderr)
        return 1
    return 0


def parallelism(args, world_size):
    """"none" for one process: a plain module, no DTensors, no all-gathers. "replicate" for LoRA on several ranks:
    every rank holds the frozen base and only the adapters' gradients are averaged (average_gradients), unless
    --shard-frozen asks for FSDP2 because one replica does not fit. "fsdp" for full fine-tuning on several ranks."""
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
    """bf16 compute over fp32 weights where FSDP2's MixedPrecisionPolicy does not provide it (one process,
    replicated LoRA): torch.autocast, around forwards only."""
    enabled = args.precision == "bf16" and args.parallel != "fsdp"
    return torch.autocast("cuda" if torch.cuda.is_available() else "cpu", torch.bfloat16, enabled=enabled)


def hold_for_autocast(module, dtype):
    """A frozen copy for autocast: the Linear and Conv weights (the ones autocast computes in bf16 anyway) held in
    `dtype`, the rest (norms, bare parameters such as Wan's scale-shift table) in fp32, so that it computes exactly
    what the fp32 policy does under autocast, at about half its memory."""
    for layer in module.modules():
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            layer.to(dtype)
    return module


def nodes():
    """How many nodes torchrun started (1 without torchrun)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return world_size // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


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
    """fully_shard each block, then the root, on `mesh`; bf16 compute with fp32 reductions when param_dtype is bf16.
    Modules the model keeps in fp32 (models.fp32_names: Wan's time embedder and affine norms) get groups of their
    own with an fp32 policy first, so that they compute in fp32 as the model's own recipe does. FSDP2 groups are
    modules: Wan's bare scale-shift tables are gathered in bf16 with their block (diffusers adds them to an fp32
    temb, so the modulation's arithmetic is fp32; the tables' values are rounded to bf16)."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if param_dtype is not None:
        keep, fp32 = models.fp32_names(denoiser), MixedPrecisionPolicy(param_dtype=torch.float32)
        for name, module in denoiser.named_modules():
            if name.rsplit(".", 1)[-1] in keep and next(module.parameters(), None) is not None:
                fully_shard(module, mesh=mesh, mp_policy=fp32)
    for block in models.denoiser_blocks(denoiser):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(denoiser, mesh=mesh, mp_policy=policy)
    return denoiser


def cast_as_the_policy_computes(reference, dtype):
    """The reference for FSDP2: its parameters in `dtype` but those its class keeps in fp32 (diffusers' rule, the
    groups shard() gives an fp32 policy), its buffers (Wan's rope tables) as they are, as FSDP2 leaves the policy's:
    at step 0 it computes exactly what the policy does."""
    keep = models.fp32_names(reference)
    for name, parameter in reference.named_parameters():
        if not keep.intersection(name.split(".")):
            parameter.data = parameter.data.to(dtype)
    return reference


def build(args, device):
    """The backbone named by --model, with its policy and reference placed by prepare()."""
    torch.manual_seed(args.seed)  # random weights: the same on every rank
    backbone = models.load_backbone(args.model, args.pretrained, random_weights=args.random_weights)
    return (backbone, *prepare(backbone, args, device))


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
    args.parallel = parallelism(args, dist.get_world_size() if dist.is_initialized() else 1)
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
        reference = models.freeze(copy.deepcopy(policy))
        # FSDP2 computes each group in its param_dtype; autocast only the Linear and Conv weights
        reference = (cast_as_the_policy_computes(reference, frozen_dtype) if sharded else
                     hold_for_autocast(reference, frozen_dtype)).to(device)  # cast, then move
    cached = [source is None or data.read_cache_index(source) is not None for source in (args.data, args.eval_data)]
    if all(cached) and not args.eval_prompts:
        policy.to(device)
    else:
        backbone.to(device)
    if sharded:
        param_dtype = torch.bfloat16 if args.precision == "bf16" else None
        mesh = device_mesh(device, args.replicate or nodes())
        shard(policy, param_dtype, mesh)
        if reference is not None:
            shard(reference, param_dtype, mesh)
    return policy, reference


# ---------------------------------------------------------------------------------------------------------
# The training step: the whole algorithm
# ---------------------------------------------------------------------------------------------------------

def pair_noise(backbone, indices, epoch, shape, args, device):
    """One noise level and one noise tensor per pair, seeded by (seed, epoch, pair): independent of ranks and
    resumes, so 1 and N ranks, and straight and resumed runs, draw the same. With --weight path, also each pair's
    K later sampler steps and their noise (METHOD §8), drawn after the rest so that t and eps do not change."""
    draws = args.path_draws if args.weight == "path" and args.loss in ("sipo", "dpo-cm") else 0
    stride, top = backbone.sampler_grid(args.sample_steps)
    levels, noises, n_later, later, later_noises = [], [], [], [], []
    for index in indices.tolist():
        generator = torch.Generator(device).manual_seed(hash((args.seed, epoch, index)) % 2 ** 62)
        levels.append(backbone.sample_noise_levels(1, generator, device))
        noises.append(torch.randn(shape, generator=generator, device=device))
        if draws:
            n, k = sipo.later_steps(levels[-1], stride, top, draws, generator)
            n_later.append(n)
            later.append(k)
            later_noises.append(torch.randn((draws, *shape), generator=generator, device=device))
    path = (torch.cat(n_later), torch.cat(later, 1), torch.stack(later_noises, 1)) if draws else None
    return torch.cat(levels), torch.stack(noises), path


def make_optimizer(trainable, args):
    """AdamW, fused: on FSDP's DTensors the default per-parameter loop is 13x slower on CPU (bench.py)."""
    return torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay, fused=True)


def clip_gradients(trainable, max_norm):
    """The global gradient norm (all ranks), clipped; foreach: the per-tensor loop is 50x slower on DTensors."""
    norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm, foreach=True)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


@functools.lru_cache(maxsize=1)
def adapter_layers(policy):
    """peft's LoRA layers of the policy, found once: diffusers' disable_adapters() and enable_adapters() walk every
    module to find them (536 in tiny-sd1.5's UNet: 1.8 ms a step of its 85)."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    return [layer for layer in policy.modules() if isinstance(layer, BaseTunerLayer)]


def reference_errors(backbone, reference, policy, x_t, levels, cond, target):
    """The reference's per-sample errors, in inference mode where it can be (no autograd bookkeeping at all, which
    no_grad still does: 0.8 ms of tiny-sd1.5's step); FSDP2 cannot unshard in it ("Inference tensors do not track
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
    2B importance log weights (--weight step or path)."""
    indices = batch.pop("index")
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
    log_w = backbone.step_log_weight(model_error, levels, args.sample_steps, args.temperature)
    if path is not None:
        n_later, later, later_noise = (torch.cat([x, x], 1 if x.dim() > 1 else 0) for x in path)
        log_w = sipo.path_log_weight(log_w, later_log_weights(backbone, policy, x0, cond, later, later_noise, args),
                                     n_later)
    return model_error, ref_error, log_w


@torch.no_grad()
def later_log_weights(backbone, policy, x0, cond, later, later_noise, args):
    """The path weight's K extra policy forwards (METHOD §8): the step log weight at each drawn later step k, at a
    fresh x_k ~ q(x_k | x0). One forward of the 2B samples per draw: the memory of the training forward."""
    terms = []
    for levels, noise in zip(later, later_noise):
        x_k, target = backbone.noised(x0, noise, levels)
        error = sipo.per_sample_error(backbone.predict(policy, x_k, levels, cond), target)
        terms.append(backbone.step_log_weight(error, levels, args.sample_steps, args.temperature))
    return torch.stack(terms)


def sft_step(backbone, policy, batch, epoch, args):
    """The plain denoising loss on winners only: no loser, no reference."""
    indices = batch.pop("index")
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
                          all_reduce=all_reduce)  # METHOD §4-5: statistics over the global batch
    return loss * world_size, stats  # gradients are averaged over ranks; the loss is a global sum / count


@torch.no_grad()
def heldout_metrics(backbone, policy, reference, heldout, prompts, reward, args, rank, world_size):
    """Implicit accuracy on held-out pairs with fixed noise (epoch -1), and the mean reward of samples of fixed
    prompts and seeds. Every rank takes an equal share: the sharded policy's forwards are collective."""
    totals = torch.zeros(4, dtype=torch.float64)  # correct, pairs, reward sum, samples
    if heldout is not None and args.loss != "sft":
        for indices in data.rank_batches(len(heldout), args.batch_size, rank, world_size, args.seed, 0):
            with mixed_precision(args):
                model_error, ref_error, _ = pair_errors(backbone, policy, reference,
                                                        data.collate([heldout[i] for i in indices]), -1, args)
            e_w, e_l = model_error.chunk(2)
            r_w, r_l = ref_error.chunk(2)
            totals[0] += (((e_l - r_l) - (e_w - r_w)) > 0).sum().item()
            totals[1] += len(indices)
    samples = None
    if prompts:
        share = -(-len(prompts) // world_size)
        indices = (list(range(rank, len(prompts), world_size)) + list(range(share)))[:share]
        mine, real = [prompts[i] for i in indices], len(prompts[rank::world_size])
        # prompt i is sampled with seed + i: the same image on any number of ranks
        with mixed_precision(args):
            samples = backbone.sample(mine, seed=[args.seed + i for i in indices], steps=args.eval_sample_steps,
                                      guidance=args.eval_guidance).float()
        scores = reward(samples.cpu(), mine)[:real]
        totals[2:] += torch.tensor([scores.sum().item(), real], dtype=torch.float64)
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
    import evaluate
    folder = out / "samples" / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    grid = evaluate.labelled_grid(evaluate.sample_rows(samples, f"step {step}"), prompts)
    grid.save(folder / "grid.png")
    if writer:
        import numpy as np
        writer.add_image("samples", np.asarray(grid), step, dataformats="HWC")


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: DCP into checkpoints/step-N.tmp, renamed when complete
# ---------------------------------------------------------------------------------------------------------

STATE_OPTIONS = StateDictOptions(ignore_frozen_params=True)
# loading: the trainable keys only (what get_model_state_dict gave and dcp.load filled, all of them or it raises);
# a plain module's strict load_state_dict would count the frozen base as missing
LOAD_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


def latest_checkpoint(out, say=None):
    """The newest intact checkpoint; `say` is told which newer ones were damaged and passed over."""
    steps = sorted(Path(out, "checkpoints").glob("step-[0-9]*[0-9]"), reverse=True)
    for newer, path in enumerate(steps):
        if intact(path):
            if newer and say:
                say(f"note: {', '.join(p.name for p in steps[:newer])} damaged (a shard, .metadata or trainer.json "
                    f"missing or cut); resuming from {path.name}")
            return path
    return None


def intact(path):
    """trainer.json parses and every shard DCP's .metadata names is there at full length."""
    try:
        json.loads((path / "trainer.json").read_text())["step"]
        storage = dcp.FileSystemReader(path).read_metadata().storage_data
    except Exception:  # noqa: BLE001 -- any unreadable file means the checkpoint cannot be resumed from
        return False
    ends = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    return all((path / name).is_file() and (path / name).stat().st_size >= end for name, end in ends.items())


def save_checkpoint(out, counters, policy, optimizer, scheduler, keep, rank):
    """`counters`: step, micro-batches read and non-finite steps skipped, so that a resumed run reads on from the
    same data position even after skipped steps."""
    step = counters["step"]
    final = Path(out, "checkpoints", f"step-{step:06d}")
    tmp = final.with_name(final.name + ".tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    state = {"model": get_model_state_dict(policy, options=STATE_OPTIONS),
             "optimizer": get_optimizer_state_dict(policy, optimizer, options=STATE_OPTIONS)}
    dcp.save(state, checkpoint_id=tmp)
    if rank == 0:
        (tmp / "trainer.json").write_text(json.dumps({**counters, "scheduler": scheduler.state_dict()}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(final.parent.glob("step-[0-9]*[0-9]"))[:-keep]:
            shutil.rmtree(old)
    barrier()


def load_checkpoint(path, policy, optimizer, scheduler):
    state = {"model": get_model_state_dict(policy, options=STATE_OPTIONS),
             "optimizer": get_optimizer_state_dict(policy, optimizer, options=STATE_OPTIONS)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(policy, state["model"], options=LOAD_OPTIONS)
    set_optimizer_state_dict(policy, optimizer, state["optimizer"], options=LOAD_OPTIONS)
    trainer = json.loads((path / "trainer.json").read_text())
    scheduler.load_state_dict(trainer.pop("scheduler"))
    return trainer


def truncate_log(log, step):
    """Drops the lines a killed run wrote after its last checkpoint (and a line cut off mid-write): the resumed
    run writes those steps again."""
    if not log.exists():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError):
            pass
    tmp = log.with_name(log.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, log)


def export(out, backbone, policy, lora_rank, rank):
    """The final pipeline in the diffusers layout (safetensors): `from_pretrained(out / "model")` loads it. With
    LoRA, model/ holds the merged weights and lora/ the adapter in diffusers' own format, written by the pipeline
    class's save_lora_weights: `pipe.load_lora_weights(out / "lora")` on the base pipeline loads it."""
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        name = "unet" if hasattr(backbone.pipe, "unet") else "transformer"
        denoiser = type(backbone.denoiser).from_config(backbone.denoiser.config)
        if lora_rank:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft import get_peft_model_state_dict
            denoiser.add_adapter(lora_config(lora_rank))
            denoiser.load_state_dict(full)
            layers = get_peft_model_state_dict(denoiser)
            if name == "unet":  # the UNet loaders expect diffusers' key names; the transformers' take peft's
                layers = convert_state_dict_to_diffusers(layers)
            write_atomically(out / "lora", lambda tmp: type(backbone.pipe).save_lora_weights(
                tmp, **{f"{name}_lora_layers": layers,
                        f"{name}_lora_adapter_metadata": denoiser.peft_config["default"].to_dict()}))
            denoiser.fuse_lora()
            denoiser.unload_lora()
        else:
            denoiser.load_state_dict(full)
        sharded = getattr(backbone.pipe, name)
        backbone.pipe.register_modules(**{name: denoiser})
        write_atomically(out / "model", lambda tmp: backbone.pipe.save_pretrained(tmp, safe_serialization=True))
        backbone.pipe.register_modules(**{name: sharded})
    barrier()


def write_atomically(folder, write):
    """write(tmp) into folder.tmp, then swap it in for `folder`: a reader never sees a half-written one."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


# ---------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------

def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    # this process's peak RSS: VmHWM, not ru_maxrss, which a process started from a larger one inherits on Linux
    status = Path("/proc/self/status")
    if status.is_file():
        kib = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM"))
        return kib / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def reduce_stats(stats, world_size):
    """Mean of each statistic over ranks, in one all-reduce."""
    keys = sorted(stats)
    values = all_reduce(torch.stack([stats[k].float().reshape(()) for k in keys]))
    return dict(zip(keys, (values / world_size).tolist()))


# ---------------------------------------------------------------------------------------------------------
# Main loop
# ---------------------------------------------------------------------------------------------------------

def fail(error, suffix=""):
    """One line for an error; a DataLoader worker's re-raised traceback is cut to its message."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    print(f"error: {re.sub(r'^([A-Za-z_]+[.])*[A-Za-z_]*Error: ', '', lines[-1])}{suffix}", file=sys.stderr)


def train(args, cleanup):
    """The run; `cleanup` (an ExitStack) releases what it holds however it ends: the process group, the run
    directory's lock, the SIGTERM handler, the log."""
    device, rank, world_size = setup_distributed()
    cleanup.callback(leave)
    try:
        check_args(args, world_size)
        refusal = [None]
        if rank == 0:  # alone: the other ranks would see the directory half-claimed
            try:
                check_run_directory(args)
                cleanup.callback(claim_run_directory(args).close)
            except (ValueError, OSError) as error:
                refusal = [f"--out {args.out}: {error.strerror}" if isinstance(error, OSError) else str(error)]
        if dist.is_initialized():
            dist.broadcast_object_list(refusal)
        if refusal[0]:
            raise ValueError(refusal[0])
        if args.precision is None:
            args.precision = "bf16" if device.type == "cuda" else "fp32"
        backbone, policy, reference = build(args, device)
        args.beta = default_beta(args, backbone)
        dataset, summary = data.open_dataset(args.data, backbone, args.pretrained, args.skip_bad, args.flip,
                                             args.seed, args.frame_stride)
        if len(data.rank_batches(len(dataset), args.batch_size, rank, world_size, args.seed, 0)) == 0:
            raise ValueError(f"--data {args.data}: {len(dataset)} pairs give no full batch of {args.batch_size} "
                             f"pairs on each of {world_size} ranks")
        heldout = data.open_dataset(args.eval_data, backbone, args.pretrained)[0] if args.eval_data else None
        prompts, reward = [], None
        if args.eval_prompts:
            import evaluate
            prompts = evaluate.read_prompts(args.eval_prompts)
            reward = evaluate.load_rewards(args.eval_reward, args)[args.eval_reward]
            shape = (len(prompts), backbone.num_frames, 3, 8, 8) if backbone.is_video else (len(prompts), 3, 8, 8)
            reward(torch.full(shape, 0.5), prompts)  # the reward takes these prompts: fail now, not at step 100
    except ValueError as error:  # models.ModelError and data.DataError are ValueErrors
        if rank == 0:
            fail(error)
        sys.exit(1)

    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, args)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (args.warmup + 1)))
    counters = {"step": 0, "micro_batches": 0, "nonfinite_skipped": 0, "bad_pairs_skipped": 0}
    checkpoint = latest_checkpoint(args.out, say=print if rank == 0 else None) if args.resume else None
    if checkpoint is not None:
        counters = load_checkpoint(checkpoint, policy, optimizer, scheduler)
    elif args.resume and rank == 0:
        print(f"note: no complete checkpoint in {args.out}; starting from step 0")
    step, micro_batches, nonfinite_total = (counters[k] for k in ("step", "micro_batches", "nonfinite_skipped"))
    bad_pairs_before, bad_pairs_here = counters.get("bad_pairs_skipped", 0), 0  # all ranks' before; this rank's
    if rank == 0:
        truncate_log(args.out / "log.jsonl", step)
        write_args(args, world_size, summary)
        print(f"{args.model}: {sum(p.numel() for p in trainable):,} trainable parameters; data: {summary}; "
              f"{world_size} rank(s); loss {args.loss}" + ("" if args.loss == "sft" else f", beta {args.beta:g}"))
    log = cleanup.enter_context(open(args.out / "log.jsonl", "a")) if rank == 0 else None
    writer = None
    if args.tensorboard and rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(args.out / "tensorboard")

    stop = {"signal": False}
    cleanup.callback(signal.signal, signal.SIGTERM, signal.signal(signal.SIGTERM, lambda *_: stop.update(signal=True)))
    # a context: an error or SIGTERM mid-run ends the bar's line before the one line that says what happened
    with tqdm(total=args.steps, initial=step, disable=rank != 0, desc=args.loss, unit="step") as progress:
        batches = data.pair_batches(dataset, args.batch_size, rank, world_size, args.seed, micro_batches, args.workers)
        nonfinite_in_a_row = 0
        while step < args.steps:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            step_stats, skipped = [], False
            for _ in range(args.grad_accum):
                epoch, batch = next(batches)
                micro_batches += 1
                bad_pairs_here += int(batch.pop("skipped", torch.zeros(1)).sum())  # --skip-bad's substitutes
                loss, stats = preference_loss(backbone, policy, reference, batch, epoch, args, world_size)
                finite = all_reduce(torch.isfinite(loss.detach()).float(), dist.ReduceOp.MIN)  # all ranks skip, or none
                if finite.item() < 1:
                    skipped = True
                    break
                (loss / args.grad_accum).backward()
                step_stats.append({"loss": loss.detach(), **stats})  # its mean over ranks is the global loss
            if skipped:
                nonfinite_in_a_row += 1
                nonfinite_total += 1
                optimizer.zero_grad(set_to_none=True)
                if nonfinite_in_a_row >= args.max_nonfinite:
                    if rank == 0:
                        print(f"error: {nonfinite_in_a_row} non-finite losses in a row at step {step}; stopping "
                              f"(lower --lr or --beta)", file=sys.stderr)
                    sys.exit(1)
                continue
            nonfinite_in_a_row = 0
            if args.parallel == "replicate":
                average_gradients(trainable, world_size)
            grad_norm = clip_gradients(trainable, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1

            stats = {k: torch.stack([s[k] for s in step_stats]).mean() for k in step_stats[0]}
            bad_pairs = torch.tensor(float(bad_pairs_here), device=device)
            record = reduce_stats({**stats, "grad_norm": grad_norm, "bad_pairs": bad_pairs}, world_size)
            bad_pairs_total = bad_pairs_before + round(record.pop("bad_pairs") * world_size)
            elapsed = time.perf_counter() - start
            if (heldout is not None or prompts) and (step % args.eval_every == 0 or step == args.steps):
                metrics, samples = heldout_metrics(backbone, policy, reference, heldout, prompts, reward, args, rank,
                                                   world_size)
                record.update(metrics)
                if samples is not None and rank == 0:
                    save_samples(args.out, step, samples, prompts, writer)
            stop_now = all_reduce(torch.tensor(float(stop["signal"])), dist.ReduceOp.MAX)
            if rank == 0:
                pairs = args.batch_size * args.grad_accum * world_size
                record.update(step=step, lr=scheduler.get_last_lr()[0], step_time=elapsed, pairs_per_s=pairs / elapsed,
                              peak_memory_gb=peak_memory_gb(device), nonfinite_skipped=nonfinite_total, epoch=epoch,
                              **({"bad_pairs_skipped": bad_pairs_total} if args.skip_bad else {}))
                log.write(json.dumps(record) + "\n")
                log.flush()
                if writer:
                    for key, value in record.items():
                        writer.add_scalar(key, value, step)
                shown = {"loss": "loss", "acc": "accuracy", "masked": "mask_fraction", "heldout": "heldout_accuracy"}
                progress.set_postfix({k: f"{record[v]:.4f}" for k, v in shown.items() if v in record}, refresh=False)
                progress.update(1)
            if step % args.checkpoint_every == 0 or step == args.steps or stop_now.item():
                counters = {"step": step, "micro_batches": micro_batches, "nonfinite_skipped": nonfinite_total,
                            "bad_pairs_skipped": bad_pairs_total}
                save_checkpoint(args.out, counters, policy, optimizer, scheduler, args.keep, rank)
            if stop_now.item():
                if rank == 0:
                    print(f"SIGTERM: saved step {step}; continue with --resume", file=sys.stderr)
                return
    if not args.no_export:
        export(args.out, backbone, policy, args.lora, rank)
    if rank == 0:
        print(f"done: {args.out}" + ("" if args.no_export else f"; pipeline in {args.out / 'model'}"))


def main(argv=None):
    """train(), and for an error met mid-run (a bad pair without --skip-bad, a full disk) one line saying what the
    run directory keeps. With several ranks the others may wait in a collective: this one exits at once and
    torchrun ends them. One process can call main(argv) in-process (the tests do): it raises SystemExit."""
    args = parse_args(argv)
    with contextlib.ExitStack() as cleanup:
        try:
            train(args, cleanup)
        except (ValueError, OSError) as error:
            kept = latest_checkpoint(args.out)
            fail(error, f" ({args.out} keeps {kept.name}: continue with --resume)" if kept else
                 f" ({args.out} has no checkpoint yet: a rerun starts again)")
            sys.stderr.flush()
            if dist.is_initialized() and dist.get_world_size() > 1:
                os._exit(1)
            sys.exit(1)


if __name__ == "__main__":
    main()
