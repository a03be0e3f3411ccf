"""Benchmarks: where the time and memory go. Medians after warm-up; ratios measured side by side, interleaved.

    python bench.py                    # all CPU figures (times: docs/performance.md)
    python bench.py data               # figure 8 alone: reading Pick-a-Pic shards, caching with 1 and 2 ranks
    python bench.py planner            # the models only: memory, scaling and cache (meta devices; Wan's encoders
                                       # are counted on the CPU at a small size)
    python bench.py gpu                # on a GPU: Wan2.1-1.3B full size at 81x480x832, SD1.5 at 512^2 (8 pairs)
    python bench.py native             # figures 10 and 11 on the CPU: every backbone at native size (about an hour)
    python bench.py peer --peer-script train_diffusion_dpo.py   # against diffusers' DPO example, a local copy

Figures: 0 the SIPO step time of each tiny backbone, 1 loss overhead (SIPO, DPO-C&M vs Diffusion-DPO), 2 step
time vs the bare compute floor with a breakdown, 3 latent-cache speed-up on a tiny video backbone, 4 FSDP memory
per rank with 1 and 2 ranks, 5 the memory planner for every full-size backbone on 1, 8 and 64 GPUs, 6 the
scaling model (communication per GPU, FSDP and hybrid), 7 the latent cache at the paper's data sizes, 8 data at
scale measured: peak memory of reading 1 and 8 Pick-a-Pic shards, caching throughput of 2 ranks over 1, bytes a pair,
9 seconds a step against diffusers' DPO example, 10 native size on the CPU: each backbone's full architecture
caches two pairs and trains (LoRA 64; full fine-tuning on 2 FSDP2 ranks where it fits), peak RSS measured against
the host-memory planner, 11 how a step's cost grows with frames (Wan2.1-1.3B) and resolution (SD1.5).
"""
import argparse
import contextlib
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel
from torch.utils._python_dispatch import TorchDispatchMode

import data
import models
import train
from common import (ArgumentParser, check_output, cpu_name, error_line, peak_memory_gb, rank_and_world,
                    setup_distributed, write_text_atomically)
from rundir import RunDir

# a medium CPU model: an SD1.5-shaped UNet, 3 levels, 2 layers per block (17.6M parameters) on 16x16 latents
MEDIUM_UNET = dict(models.TINY_UNET, sample_size=16, block_out_channels=(64, 128, 256), layers_per_block=2,
                   down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def timed(fn, sync):
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median_ms(values):
    return 1000 * statistics.median(values)


def make_args(**overrides):
    args = train.parse_args(["--model", "tiny-sd1.5", "--data", ".", "--warmup", "0", "--steps", "1000000",
                             "--lr", "1e-6"])
    args.precision = "bf16" if torch.cuda.is_available() else "fp32"
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def cpu_backbone(size):
    """tiny-sd1.5 as it is ("tiny"), or with the medium UNet ("medium")."""
    torch.manual_seed(0)
    backbone = models.load_backbone("tiny-sd1.5")
    if size == "medium":
        backbone.pipe.register_modules(unet=UNet2DConditionModel(**MEDIUM_UNET))
        backbone.resolution = (32, 32)
    return backbone


class StepTimer:
    """train.py's own optimizer step (train.make_trainer, train.optimizer_step: micro-batches, the non-finite check,
    the gradients' average, clipping, AdamW) on one backbone, so that the benchmark measures the path a run takes."""

    def __init__(self, backbone, batch_size, device, loss="sipo", gradient_checkpointing=False, data_path="."):
        """`data_path` a latent cache keeps the VAE and text encoders off the device, as in train.py."""
        self.args = make_args(batch_size=batch_size, loss=loss, beta=1000.0, data=str(data_path),
                              gradient_checkpointing=gradient_checkpointing)
        self.backbone, self.device = backbone, device
        self.trainer = train.make_trainer(backbone, self.args, device, *rank_and_world())
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def use(self, dataset):
        """Train on `dataset` from its first batch (this rank's share)."""
        self.dataset = dataset
        self.batches = data.pair_batches(dataset, self.args.batch_size, self.trainer.rank, self.trainer.world_size, 0)
        return self

    def step(self, variant=None):
        """One optimizer step; `variant` a loss name or a dict of train.py flags to set first
        ({"loss": "sipo", "weight": "path"})."""
        for key, value in ({"loss": variant} if isinstance(variant, str) else variant or {}).items():
            setattr(self.args, key, value)
        if train.optimizer_step(self.trainer, self.batches, {"signal": None}) is None:
            raise RuntimeError("a non-finite loss: the benchmark would time a skipped step")

    def floor(self, batch_size):
        """The bare compute floor: forward + backward of the denoiser on 2B samples plus a forward on the same 2B,
        nothing else. On the policy itself, a plain module in one process (train.parallelism): no second copy."""
        assert self.args.parallel == "none", "the floor is measured in one process"
        b, policy = self.backbone, self.trainer.policy
        x = torch.randn(2 * batch_size, *self.dataset[0]["latents_w"].shape, device=self.device)
        cond = {k: torch.cat([v, v]).to(self.device) for k, v in data.conditioning(
            data.collate([{k: v for k, v in self.dataset[i].items() if k != "index"} for i in range(batch_size)]))
            .items()}
        levels = torch.randint(0, 1000, (2 * batch_size,), device=self.device)

        def run():
            b.predict(policy, x, levels, cond).float().square().mean().backward()
            with torch.no_grad():
                b.predict(policy, x, levels, cond)
        return run


@contextlib.contextmanager
def native_stderr_silenced():
    """The profiler's C++ side (kineto) prints a line as it starts and stops, whatever its log level: the process's
    stderr file goes to /dev/null meanwhile (a Python error still raises)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def phase_breakdown(timer, repeats, variant="sipo"):
    """Where a step's time goes: the numbered ranges train.optimizer_step marks (record_function), under torch's
    profiler, in ms a step."""
    from torch.profiler import ProfilerActivity, profile
    with native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(repeats):
            timer.step(variant)
    return {event.key: event.cpu_time_total / 1000 / repeats for event in profiler.key_averages()
            if event.key[:1].isdigit() and event.key[1:2] == " "}


def tiny_step_times(repeats, workdir):
    """Figure 0: one full SIPO training step (2 pairs from a latent cache, fp32, one process) of each tiny backbone."""
    results = {}
    for name in [f"tiny-{name}" for name in models.FULL]:
        torch.manual_seed(0)
        backbone = models.load_backbone(name)
        cache = random_cache(backbone, workdir / name, 4)
        trainer = StepTimer(backbone, 2, torch.device("cpu"), data_path=cache.directory).use(cache)
        trainer.step()
        results[name] = {"parameters": sum(p.numel() for p in trainer.trainer.policy.parameters()),
                         "step_ms": median_ms([timed(trainer.step, trainer.sync) for _ in range(repeats)])}
    return results


def loss_overhead(trainer, repeats, variants=None):
    """Figure 1: interleaved steps of each loss (or each variant: name -> train.py flags, the first the baseline)
    on the same model and batch."""
    variants = variants or {"dpo": {"loss": "dpo"}, "dpo-cm": {"loss": "dpo-cm"}, "sipo": {"loss": "sipo"}}
    times = {name: [] for name in variants}
    for name in times:  # warm-up
        trainer.step(variants[name])
    for _ in range(repeats):
        for name in times:
            times[name].append(timed(lambda name=name: trainer.step(variants[name]), trainer.sync))
    medians = {k: median_ms(v) for k, v in times.items()}
    baseline = medians[next(iter(medians))]
    return {"median_ms": medians, **{f"{k}_over_{next(iter(medians))}".replace("-", "_"): v / baseline
                                     for k, v in list(medians.items())[1:]}}


def floor_distance(trainer, batch_size, repeats):
    """Figure 2: full step vs the bare compute floor, interleaved, then a breakdown of the full step."""
    floor = trainer.floor(batch_size)
    floor()
    trainer.step("sipo")
    steps, floors = [], []
    for _ in range(repeats):
        steps.append(timed(lambda: trainer.step("sipo"), trainer.sync))
        floors.append(timed(floor, trainer.sync))
    return {"step_ms": median_ms(steps), "floor_ms": median_ms(floors),
            "step_over_floor": statistics.median(steps) / statistics.median(floors),
            "breakdown_ms_under_profiler": phase_breakdown(trainer, max(3, repeats // 3))}


def cache_speedup(repeats, workdir):
    """Figure 3: tiny video backbone, training step with on-the-fly VAE + text encoding vs the latent cache."""
    import imageio.v3 as iio
    import numpy as np
    backbone = models.load_backbone("tiny-wan2.1-1.3b")
    rows = []
    for i in range(8):
        frames = np.stack([np.full((32, 32, 3), (20 * k + 7 * i) % 255, np.uint8) for k in range(5)])
        for side in ("w", "l"):
            iio.imwrite(workdir / f"{side}{i}.mp4", frames if side == "w" else frames[::-1].copy(), fps=8,
                        codec="libx264", macro_block_size=8)
        rows.append({"prompt": f"clip {i}", "chosen": f"w{i}.mp4", "rejected": f"l{i}.mp4"})
    (workdir / "v.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    raw, _ = data.open_dataset(workdir / "v.jsonl", backbone)
    data.write_cache(backbone, raw, workdir / "vcache")
    cached, _ = data.open_dataset(workdir / "vcache", backbone)
    trainer = StepTimer(backbone, 2, torch.device("cpu"), "dpo").use(raw)  # one model; only the batches differ
    times = {"on the fly": [], "cache": []}
    sources = {"on the fly": data.pair_batches(raw, 2, 0, 1, 0), "cache": data.pair_batches(cached, 2, 0, 1, 0)}
    for name in times:
        trainer.batches = sources[name]
        trainer.step()
    for _ in range(repeats):
        for name in times:
            trainer.batches = sources[name]
            times[name].append(timed(trainer.step, trainer.sync))
    medians = {k: median_ms(v) for k, v in times.items()}
    return {"median_ms": medians, "speedup": medians["on the fly"] / medians["cache"]}


def sharded_bytes(policy, optimizer):
    """Bytes this rank holds for parameters, gradients and optimizer state (local shards of the DTensors)."""
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    params = sum(local(p) for p in policy.parameters())
    grads = sum(local(p.grad) for p in policy.parameters() if p.grad is not None)
    state = sum(local(v) for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    return {"parameters": params, "gradients": grads, "optimizer": state, "total": params + grads + state}


def fsdp_memory_worker(size):
    """Run under torchrun: one SIPO step, then this rank's sharded bytes and peak RSS."""
    device, rank, _ = setup_distributed()
    backbone = cpu_backbone(size)
    with tempfile.TemporaryDirectory() as tmp:
        dataset = random_cache(backbone, Path(tmp), 8)  # each rank its own, identical (seeded)
        timer = StepTimer(backbone, 2, device, "sipo", data_path=dataset.directory).use(dataset)
        timer.step()
        result = {**sharded_bytes(timer.trainer.policy, timer.trainer.optimizer),
                  "peak_rss_gb": peak_memory_gb(torch.device("cpu"))}
        dist.barrier()
    if rank == 0:
        print("RESULT " + json.dumps(result))
    dist.destroy_process_group()


def worker_result(command):
    """The JSON a worker process (a figure measured in a fresh process) prints after "RESULT "."""
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    line = next((l for l in out.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(line[7:])


def fsdp_memory(size):
    """Figure 4: per-rank bytes of parameters, gradients and optimizer state with 1 and 2 ranks."""
    results = {ranks: worker_result([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                     f"--nproc_per_node={ranks}", __file__, "fsdp-memory-worker", "--size", size])
               for ranks in (1, 2)}
    return {"per_rank": results, "two_over_one": results[2]["total"] / results[1]["total"],
            "peak_rss_two_over_one": results[2]["peak_rss_gb"] / results[1]["peak_rss_gb"]}


def random_cache(backbone, folder, pairs, native=False, pretrained=None):
    """A latent cache of random latents (the benchmarks measure compute, not data): at the backbone's own size with
    real prompt embeddings, or (native) at the full-size native resolution and frame count with random embeddings
    of the right shapes, so that no text encoder or VAE runs."""
    from safetensors.torch import save_file
    if native:
        shape = backbone.latent_shape()
        cond = {k: torch.randn(v) for k, v in backbone.conditioning_shapes(pairs).items()}
    else:
        frames = (backbone.num_frames,) if backbone.is_video else ()
        shape = backbone.encode_pixels(torch.zeros(1, 3, *frames, *backbone.resolution)).shape[1:]
        cond = {k: v.cpu() for k, v in backbone.encode_prompts([f"prompt {i}" for i in range(pairs)]).items()}
    generator = torch.Generator().manual_seed(0)
    folder = folder / "cache"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"latents_w": torch.randn(pairs, *shape, generator=generator),
               "latents_l": torch.randn(pairs, *shape, generator=generator), "prompt": torch.arange(pairs)},
              folder / "shard-00000.safetensors")
    save_file({f"cond.{k}": v.contiguous() for k, v in cond.items()}, folder / "prompts-00000.safetensors")
    index = {**data.cache_identity(backbone, pretrained), "format": data.CACHE_FORMAT, "pairs": pairs, "prompts": pairs,
             "shard_size": pairs, "shards": [{"file": "shard-00000.safetensors", "pairs": pairs}],
             "prompt_shards": [{"file": "prompts-00000.safetensors", "prompts": pairs}]}
    (folder / data.CACHE_INDEX).write_text(json.dumps(index))
    return data.CachedPairs(folder, backbone, pretrained)


# ---------------------------------------------------------------------------------------------------------
# Figure 5: the memory planner, from meta-device models (no weights, no compute)
# ---------------------------------------------------------------------------------------------------------

def saved_bytes(backbone, batch, checkpointing, dtype=torch.bfloat16):
    """Bytes autograd saves for backward in one forward of the denoiser on `batch` samples at its size, in all and
    by block (models.denoiser_blocks), counted on the meta device (no memory, no compute). On meta, attention runs
    as math ops that save the (tokens x tokens) probabilities; flash and memory-efficient attention (on GPUs, and
    PyTorch's CPU flash kernel) keep only O(tokens) statistics, so square attention matrices of 1024 tokens or more
    are left out."""
    denoiser = backbone.denoiser.to(dtype).train()
    if checkpointing:
        denoiser.enable_gradient_checkpointing()
    else:
        denoiser.disable_gradient_checkpointing()
    with torch.device("meta"):
        latents = torch.zeros(batch, *backbone.latent_shape(), dtype=dtype)
        cond = {k: torch.zeros(shape, dtype=dtype) for k, shape in backbone.conditioning_shapes(batch).items()}
        levels = torch.full((batch,), 500, dtype=torch.long)
    from torch.multiprocessing.reductions import StorageWeakRef
    blocks = models.denoiser_blocks(denoiser)
    saved, by_block, inside, seen = [0], [0] * len(blocks), [None], set()

    def pack(tensor):
        attention_matrix = tensor.dim() >= 3 and tensor.shape[-1] == tensor.shape[-2] >= 1024
        storage = StorageWeakRef(tensor.untyped_storage()).cdata  # saved twice (two ops' input) is held once
        size = 0 if attention_matrix or storage in seen else tensor.untyped_storage().nbytes()
        seen.add(storage)
        saved[0] += size
        if inside[0] is not None:
            by_block[inside[0]] += size
        return tensor

    hooks = [hook for i, block in enumerate(blocks) for hook in (
        block.register_forward_pre_hook(lambda module, args, i=i: inside.__setitem__(0, i)),
        block.register_forward_hook(lambda module, args, out: inside.__setitem__(0, None)))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            backbone.predict(denoiser, latents, levels, cond)
    finally:
        for hook in hooks:
            hook.remove()
    return saved[0], by_block


def activation_bytes(backbone, batch):
    """Activation memory of `batch` samples without and with checkpointing: the part of the saved bytes that
    grows with the batch (autograd also saves weights, already counted as parameters). With checkpointing,
    backward recomputes one block at a time: add the largest block's own saved activations."""
    def per_sample(checkpointing):
        (one, one_blocks), (two, two_blocks) = (saved_bytes(backbone, b, checkpointing) for b in (1, 2))
        return two - one, [b - a for a, b in zip(one_blocks, two_blocks)]

    full, blocks = per_sample(False)
    return {False: batch * full, True: batch * (per_sample(True)[0] + max(blocks))}


def memory_plan(gpus=(1, 8, 64), names=tuple(models.FULL)):
    """Per-GPU gigabytes for full fine-tuning and LoRA (rank 64) of each full-size backbone, one pair per GPU:
    fp32 master weights, fp32 gradients and Adam state sharded over the GPUs (FSDP), a bf16 reference sharded
    the same way (none for LoRA: the adapter-free policy is the reference), bf16 activations of the 2 samples
    (winner and loser) with and without checkpointing. Frozen encoders are not counted (use the latent cache)."""
    plan = {}
    for name in names:
        backbone = models.load_backbone(name, device="meta", random_weights=True)
        count = sum(p.numel() for p in backbone.denoiser.parameters())
        lora = lora_parameter_count(backbone.denoiser, 64)
        act = activation_bytes(backbone, 2)
        rows = {}
        for n in gpus:
            full = {"parameters": 4 * count / n, "gradients": 4 * count / n, "optimizer": 8 * count / n,
                    "reference": 2 * count / n}
            low_rank = {"parameters": 2 * count / n + 4 * lora, "gradients": 4 * lora, "optimizer": 8 * lora}
            for label, parts in (("full", full), ("lora", low_rank)):
                for ckpt in (False, True):
                    total = sum(parts.values()) + act[ckpt]
                    rows[f"{label}, {n} GPU{'s' if n > 1 else ''}, {'ckpt' if ckpt else 'no ckpt'}"] = total / 2 ** 30
        plan[name] = {"parameters": count, "lora_parameters": lora,
                      "activations_gb": {"no ckpt": act[False] / 2 ** 30, "ckpt": act[True] / 2 ** 30},
                      "per_gpu_gb": rows}
    return plan


# Per-GPU link bandwidth, one direction: NVLink 4 on H100 SXM (900 GB/s both ways) and one 400 Gb/s InfiniBand
# adapter a GPU, the usual DGX/HGX layout. A model of a cluster, not a measurement of one.
LINKS = {"nvlink": 450e9, "infiniband": 50e9}


def communication_bytes(parameters, gpus, gpus_per_node=8):
    """Bytes one GPU sends per full fine-tuning step (ring collectives: (n - 1) / n of the data crosses each GPU),
    split by link. Plain FSDP over all GPUs: the policy's bf16 parameters all-gathered in forward and again in
    backward (2 x 2P), its fp32 gradients reduce-scattered (4P), the bf16 reference all-gathered once (2P): 10P,
    across nodes as soon as there is more than one, so over InfiniBand. Hybrid (shard within a node of g GPUs,
    replicate over the r = n / g nodes): the same 10P (g - 1) / g within the node over NVLink, plus the
    all-reduce of each GPU's fp32 gradient shard across nodes (2 x 4P / g (r - 1) / r) over InfiniBand."""
    within = min(gpus, gpus_per_node)
    nodes = gpus // within
    fsdp = 10 * parameters * (gpus - 1) / gpus
    hybrid_nvlink = 10 * parameters * (within - 1) / within
    hybrid_ib = 2 * 4 * parameters / within * (nodes - 1) / nodes
    return {"fsdp": {"nvlink": fsdp if nodes == 1 else 0.0, "infiniband": fsdp if nodes > 1 else 0.0},
            "hybrid": {"nvlink": hybrid_nvlink, "infiniband": hybrid_ib}}


def scaling_model(gpus=(8, 64, 256), mfu=0.4, peak=989e12, names=models.FULL):
    """Per backbone and GPU count: communication per GPU and step for FSDP and hybrid sharding, the time it takes
    at LINKS' speeds, and the compute time of one pair per GPU (training_flops, plus one forward recomputed by
    activation checkpointing) at `mfu` of an H100's dense bf16 peak. A model: overlap makes a step about the
    larger of the two, no overlap their sum."""
    table = {}
    for name in names:
        backbone = models.load_backbone(name, device="meta", random_weights=True)
        parameters = sum(p.numel() for p in backbone.denoiser.parameters())
        compute = training_flops(backbone, 1) * 5 / 4 / (peak * mfu)
        rows = {}
        for n in gpus:
            for layout, links in communication_bytes(parameters, n).items():
                seconds = sum(bytes_ / LINKS[link] for link, bytes_ in links.items())
                rows[f"{layout}, {n} GPUs"] = {"gb_nvlink": links["nvlink"] / 1e9,
                                               "gb_infiniband": links["infiniband"] / 1e9,
                                               "communication_s": seconds, "compute_s": compute,
                                               "step_s_overlapped": max(seconds, compute),
                                               "step_s_serial": seconds + compute}
        table[name] = rows
    return table


PICKAPIC_PAIRS, PICKAPIC_PROMPTS = 851_293, 58_960  # Pick-a-Pic v2 after ties (the paper), distinct captions


def encode_flops(backbone):
    """Model FLOPs of encoding one pair at native size (the VAE on winner and loser) and of one prompt, counted with
    torch's FLOP counter on the meta device. Wan's VAE and UMT5 cannot run on meta (they call .item()): the VAE's
    FLOPs are counted on the CPU with random weights at 9 and 17 frames of 64 x 64 and extrapolated, linear in frames
    and in pixels as its causal convolutions are (measured: 5.19 and 5.10 MFLOP a voxel at 9 and 17 frames, equal at
    64 x 64 and 96 x 128); UMT5's as one layer at the full 512 tokens times its layer count."""
    from torch.utils.flop_counter import FlopCounterMode
    height, width = backbone.resolution

    def counted(run):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            run()
        return counter.get_total_flops()

    if backbone.family == "wan":
        vae = type(backbone.pipe.vae)(**backbone.pipe.vae.config).eval()  # random weights on the CPU
        short, long = (counted(lambda: vae.encode(torch.zeros(1, 3, f, 64, 64))) for f in (9, 17))
        per_frame = (long - short) / 8
        video = (short + (backbone.num_frames - 9) * per_frame) * height * width / 64 ** 2
        # UMT5 calls .item() on meta as well: one layer of it on the CPU (a small vocabulary: a lookup costs no FLOPs)
        config = backbone.pipe.text_encoder.config
        layer = type(backbone.pipe.text_encoder)(type(config)(**{**config.to_dict(), "num_layers": 1,
                                                                  "vocab_size": 1024})).eval()
        ids = torch.zeros(1, backbone.pipe.tokenizer.model_max_length, dtype=torch.long)
        prompt = config.num_layers * counted(lambda: layer(ids, torch.ones_like(ids)))
    else:
        shape = (1, 3, backbone.num_frames, height, width) if backbone.is_video else (1, 3, height, width)
        video = counted(lambda: backbone.encode_pixels(torch.zeros(shape, device="meta")))
        prompt = counted(lambda: backbone.encode_prompts(["a photo of a cat"]))
    return 2 * video, prompt


def cache_plan(jobs=(("sd1.5", PICKAPIC_PAIRS, PICKAPIC_PROMPTS), ("sdxl", PICKAPIC_PAIRS, PICKAPIC_PROMPTS),
                     ("cogvideox-2b", 10_000, 10_000), ("cogvideox-5b", 10_000, 10_000),
                     ("wan2.1-1.3b", 10_000, 10_000), ("flux.1-dev", PICKAPIC_PAIRS, PICKAPIC_PROMPTS)), mfu=0.4,
               peak=989e12):
    """A model, not a measurement: the latent cache of `pairs` pairs with `prompts` distinct prompts at native size.
    Bytes: two latents per pair, and the prompt conditioning once per pair or once per distinct prompt (what a
    de-duplicating cache stores), in fp32 and bf16. Time: encode_flops at `mfu` of an H100's dense bf16 peak."""
    table = {}
    for name, pairs, prompts in jobs:
        backbone = models.load_backbone(name, device="meta", random_weights=True)
        latent = 2 * math.prod(backbone.latent_shape())
        conditioning = sum(math.prod(shape) for shape in backbone.conditioning_shapes(1).values())
        pair_flops, prompt_flops = encode_flops(backbone)
        table[name] = {
            "pairs": pairs, "distinct_prompts": prompts, "tflop_per_pair": pair_flops / 1e12,
            "gflop_per_prompt": prompt_flops / 1e9,
            **{f"gb_{dtype}{'_deduplicated' if dedup else ''}":
               size * (latent * pairs + conditioning * (prompts if dedup else pairs)) / 1e9
               for dtype, size in (("fp32", 4), ("bf16", 2)) for dedup in (False, True)},
            "gpu_hours": (pair_flops * pairs + prompt_flops * prompts) / (peak * mfu) / 3600}
    return table


def lora_parameter_count(denoiser, rank):
    count = 0
    for name, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v") or \
                name.endswith("to_out.0"):
            count += rank * (module.in_features + module.out_features)
    return count


GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s


# ---------------------------------------------------------------------------------------------------------
# The GPU check (python bench.py gpu): the path a real run takes, on one rank with FSDP2 forced
# ---------------------------------------------------------------------------------------------------------

GPU_RUNS = {  # name, pairs a step, whether the run loads a saved pipeline (and so exports one)
    False: (("wan2.1-1.3b", 1, False), ("sd1.5", 8, True)),
    True: (("tiny-wan2.1-1.3b", 1, False), ("tiny-sd1.5", 8, True))}
# the first run's steps: the default attention kernel, then each forced one; the first step of each is profiled
# (which SDPA op ran), the second timed
SDPA_STEPS = ("default", "default", "cudnn", "cudnn", "flash", "flash")


def gpu_check(out, tiny, workdir):
    """Each of GPU_RUNS through train.py as a user runs it (torchrun, one rank, --fsdp, bf16, random weights on a
    random latent cache at native size, or --tiny at tiny size on any device): six steps with DCP checkpoints at 3
    and 6, then a resume with a non-finite gradient injected at its first step, two more steps and the export. What
    each phase measured goes into `out` (JSON) and the console as it finishes, so a run cut short reports what it
    did."""
    results = {"machine": machine(), "commit": commit(), "tiny": tiny, "runs": {}}
    for name, pairs, pretrained in GPU_RUNS[tiny]:
        row = results["runs"][name] = {"pairs_per_step": pairs}
        try:
            gpu_run(name, pairs, pretrained, workdir / name, row, lambda: save_results(out, results))
        except (RuntimeError, subprocess.TimeoutExpired) as error:
            row["error"] = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            print(f"  {name}: error: {row['error']}")
        save_results(out, results)
    return results


def save_results(out, results):
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out, json.dumps(results, indent=1, default=str))


def gpu_run(name, pairs, pretrained, workdir, row, save):
    """One GPU_RUNS entry, its phases printed and saved as they finish."""
    def report(key, text):
        print(f"  {name:18s} {key:28s} {text}", flush=True)
        save()

    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    meta = models.load_backbone(name, device="meta", random_weights=True)
    start = time.perf_counter()
    base = None
    if pretrained:  # a full-size pipeline with random weights, saved once: the run reads it as a user's download
        base = workdir / "base"
        torch.manual_seed(0)
        models.load_backbone(name, random_weights=True).pipe.save_pretrained(base, safe_serialization=True)
    random_cache(meta, workdir, max(pairs, 8), native=True, pretrained=base)
    row["setup_s"] = time.perf_counter() - start
    report("setup", f"{row['setup_s']:.0f} s (random cache{', saved pipeline' if base else ''})")
    gpu = torch.cuda.is_available()
    argv = ["--model", name, "--data", workdir / "cache", "--out", workdir / "run", "--fsdp", "--precision", "bf16",
            "--batch-size", pairs, "--warmup", 0, "--lr", "1e-6", "--checkpoint-every", 3, "--loss", "sipo",
            *(["--pretrained", base] if base else ["--random-weights"])]
    first = gpu_worker_run(workdir / "first.json", [*argv, "--steps", len(SDPA_STEPS), "--no-export"], False)
    row.update(parallel=first.get("parallel"), time_embedder_input=first.get("time_embedder_input"))
    report("placement, time embedder", f"{row['parallel']}; receives {row['time_embedder_input']}")
    by_backend = {}
    for step in first.get("steps", []):
        by_backend.setdefault(step["backend"], {}).update(
            {"op": step["sdpa_op"]} if "sdpa_op" in step else {"seconds": step["seconds"]} if not step.get("failed")
            else {"failed": step["failed"]})
    row["attention"] = by_backend
    report("attention kernels", "; ".join(f"{k}: {v.get('op', '?')} " + (f"{v['seconds']:.3f} s" if "seconds" in v
                                          else v.get("failed", "")) for k, v in by_backend.items()))
    seconds = by_backend.get("default", {}).get("seconds")
    peak = next((v for k, v in GPU_PEAK_BF16.items() if gpu and k in torch.cuda.get_device_name(0)), None)
    plan = memory_plan(gpus=(1,), names=(name,))[name]
    planned = plan["per_gpu_gb"]["full, 1 GPU, ckpt"] + (pairs - 1) * plan["activations_gb"]["ckpt"]
    row.update(seconds_per_step=seconds, achieved_tflops=seconds and training_flops(meta, pairs) / seconds / 1e12,
               peak_allocated_gb=first.get("peak_allocated_gb"), peak_reserved_gb=first.get("peak_reserved_gb"),
               planned_gb=planned, host_peak_gb=first.get("host_peak_gb"), checkpoint_s=first.get("checkpoint_s"))
    row["mfu"] = row["achieved_tflops"] * 1e12 / peak if peak and seconds else None
    report("step", f"{seconds:.3f} s, {row['achieved_tflops']:.3g} TFLOP/s" +
           (f", MFU {row['mfu']:.2f}" if row["mfu"] else "") if seconds else "not measured")
    def gib(value):
        return "n/a" if value is None else f"{value:.2f} GiB"
    count = sum(p.numel() for p in meta.denoiser.parameters())
    row["host_load_gb"] = 6 * count / 2 ** 30  # the fp32 policy and its bf16 reference, before sharding
    report("memory", f"peak allocated {gib(row['peak_allocated_gb'])}, reserved {gib(row['peak_reserved_gb'])}, "
                     f"planned {gib(planned)}; host peak {gib(row['host_peak_gb'])} (fp32 policy and bf16 "
                     f"reference {gib(row['host_load_gb'])}, plus the libraries)")
    report("checkpoint", f"{row['checkpoint_s']:.1f} s a DCP save")
    second = gpu_worker_run(workdir / "second.json", [*argv, "--steps", len(SDPA_STEPS) + 2, "--resume",
                                                      *([] if base else ["--no-export"])], True)
    steps = second.get("steps", [])
    row.update(resumed_from=second.get("resumed_from"), nonfinite_skipped=bool(steps) and steps[0]["skipped"],
               steps_after_resume=[s["step"] for s in steps], export_s=second.get("export_s"))
    report("resume, non-finite", f"from step {row['resumed_from']}; injected inf skipped: "
                                 f"{row['nonfinite_skipped']}; steps {row['steps_after_resume']}")
    if base:
        exported = RunDir(workdir / "run").has_model()
        row["exported"] = exported
        report("export", f"{row['export_s']:.1f} s, loadable layout: {exported}" if row["export_s"] else "none")
    shutil.rmtree(workdir, ignore_errors=True)


def gpu_worker_run(record, train_argv, inject_inf):
    """train.py under torchrun (one rank) through gpu_worker; its record. RuntimeError with the run's last line
    when it fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__,
               "gpu-worker", "--record", str(record), *(["--inject-inf"] if inject_inf else []), "--",
               *map(str, train_argv)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if done.returncode:
        lines = [re.sub(r"^\[rank\d+\]: ", "", line) for line in done.stderr.splitlines()]  # torchrun's prefix
        said = [line for line in lines if line.startswith("error:")] or \
            [line for line in lines if re.match(r"^[\w.]*(Error|Exception): ", line) and "ChildFailedError" not in line]
        raise RuntimeError((said or ["failed: " + done.stderr.strip()[-300:]])[0])
    return json.loads(Path(record).read_text())


def gpu_worker(record_path, inject_inf, train_argv):
    """Under torchrun: train.main(train_argv), instrumented from outside (train.py is as a user runs it): what the
    time embedding receives, which SDPA op each forced backend runs (profiled) and its step time, each step's
    outcome, the DCP save and export times, peak memory. `inject_inf`: the first step's gradient made infinite."""
    from diffusers.models.embeddings import Timesteps
    from torch.nn.attention import SDPBackend, sdpa_kernel
    record = {"steps": []}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION if torch.cuda.is_available() else
                SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION}
    prepare, optimizer_step = train.prepare, train.optimizer_step
    save_checkpoint, export, load_checkpoint = train.save_checkpoint, train.export, train.load_checkpoint

    def save():
        record.update(peak_allocated_gb=peak_memory_gb(torch.device("cuda")) if torch.cuda.is_available() else None,
                      peak_reserved_gb=torch.cuda.max_memory_reserved() / 2 ** 30 if torch.cuda.is_available()
                      else None, host_peak_gb=peak_memory_gb(torch.device("cpu")))
        write_text_atomically(record_path, json.dumps(record))

    def prepared(backbone, args, device):
        policy, reference = prepare(backbone, args, device)
        record["parallel"] = args.parallel
        embedder = next(m for m in policy.modules() if isinstance(m, Timesteps))
        def seen(module, inputs):  # a pre-hook's return value would replace the inputs
            values = sorted(set(inputs[0].float().tolist()))[:3]  # winner and loser share theirs
            record.setdefault("time_embedder_input", f"{str(inputs[0].dtype).removeprefix('torch.')} "
                                                     f"{[round(v, 4) for v in values]}")
        embedder.register_forward_pre_hook(seen)
        return policy, reference

    def step(trainer, batches, stop):
        number = len(record["steps"])
        backend = SDPA_STEPS[number] if not inject_inf and number < len(SDPA_STEPS) else "default"
        profiled = backend != "default" and number == SDPA_STEPS.index(backend) or number == 0
        entry = {"backend": backend}
        if inject_inf and number == 0:  # the policy's output gives an infinite gradient: born in the backward
            injected = trainer.policy.register_forward_hook(lambda module, inputs, out: (
                InfGradient.apply(out[0]), *out[1:]))
        context = sdpa_kernel([backends[backend]]) if backends[backend] is not None else contextlib.nullcontext()
        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profiled else \
            contextlib.nullcontext()
        try:
            with native_stderr_silenced(), context, profiler:
                start = time.perf_counter()
                result = optimizer_step(trainer, batches, stop)
                sync()
        except RuntimeError as error:  # a kernel that cannot take these shapes or dtypes: the default runs the step
            entry["failed"] = str(error).strip().splitlines()[0][:120]
            result = optimizer_step(trainer, batches, stop)
        entry.update(seconds=time.perf_counter() - start, skipped=result is None, step=trainer.counters["step"])
        if inject_inf and number == 0:
            injected.remove()
        if profiled and "failed" not in entry:
            entry["sdpa_op"] = next((e.name for e in profiler.events() if "scaled_dot_product" in e.name and
                                     e.name != "aten::scaled_dot_product_attention"), "none")
        record["steps"].append(entry)
        save()
        return result

    def timed(key, fn):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            record[key] = time.perf_counter() - start
            save()
            return result
        return wrapped

    def loaded(path, trainer):
        load_checkpoint(path, trainer)
        record["resumed_from"] = trainer.counters["step"]

    train.prepare, train.optimizer_step, train.load_checkpoint = prepared, step, loaded
    train.save_checkpoint, train.export = timed("checkpoint_s", save_checkpoint), timed("export_s", export)
    train.main(train_argv)
    save()


class InfGradient(torch.autograd.Function):
    """The identity forward, an infinite gradient backward: a non-finite gradient born in the backward alone."""

    @staticmethod
    def forward(ctx, loss):
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def training_flops(backbone, pairs):
    """Model FLOPs of one SIPO step: policy forward + backward (3x) and reference forward (1x) on 2 x pairs
    samples, the forward counted on the meta device with torch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        meta = models.load_backbone(backbone.name, device="meta", random_weights=True)
        latents = torch.zeros(2 * pairs, *backbone.latent_shape())
        cond = {k: torch.zeros(v) for k, v in backbone.conditioning_shapes(2 * pairs).items()}
        levels = torch.full((2 * pairs,), 500)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            meta.predict(meta.denoiser, latents, levels, cond)
    return 4 * counter.get_total_flops()


# ---------------------------------------------------------------------------------------------------------
# Figure 8: data at the paper's scale, measured: reading Pick-a-Pic shards, caching with 1 and 2 ranks
# ---------------------------------------------------------------------------------------------------------

def synthetic_pickapic(folder, shards, rows=1000, prompts=70, kb=24):
    """Shards in Pick-a-Pic v2's schema, `rows` rows each (about 47 MB on disk as the real shards' rows are): each
    image a small JPEG padded to `kb` KB with random bytes after its end marker (decoders stop there; parquet can
    no more compress them than real JPEGs), one row group a shard (pyarrow's default: the largest a reader holds),
    one caption in `prompts` per row (Pick-a-Pic: 14 pairs a caption), 1 in 10 a tie."""
    import io
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    jpegs = []
    for colour in range(8):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) // 8 + 30 * colour).save(buffer, "JPEG")
        jpegs.append(buffer.getvalue())
    for shard in range(shards):
        images = [[jpegs[rng.integers(8)] + rng.bytes(kb * 1024 - len(jpegs[0])) for _ in range(rows)]
                  for _ in range(2)]
        labels = rng.choice([1.0, 0.0, 0.5], rows, p=[0.45, 0.45, 0.1])
        pq.write_table(pa.table({"caption": [f"prompt {rng.integers(prompts)}" for _ in range(rows)],
                                 "jpg_0": images[0], "jpg_1": images[1], "label_0": labels, "label_1": 1 - labels}),
                       folder / f"train-{shard:05d}.parquet")
    return folder


def reading_worker(source):
    """Index `source` and decode every pair once at 64x64 in this process; its peak RSS."""
    start = time.perf_counter()
    pairs, _ = data.read_pairs(source)
    dataset = data.PairDataset(pairs, 64, 64)
    for index in range(len(dataset)):
        dataset[index]
    print("RESULT " + json.dumps({"pairs": len(dataset), "seconds": time.perf_counter() - start,
                                  "peak_rss_gb": peak_memory_gb(torch.device("cpu"))}))


def reading_memory(workdir):
    """Peak RSS of reading 1 and 8 shards, each in a fresh process (target 8 / 1 <= 1.15)."""
    results = {}
    for shards in (1, 8):
        folder = synthetic_pickapic(workdir / f"pickapic-{shards}", shards)
        results[shards] = worker_result([sys.executable, __file__, "reading-worker", "--data", str(folder)])
        results[shards]["gb_on_disk"] = sum(f.stat().st_size for f in folder.iterdir()) / 1e9
    return {"per_shards": results, "peak_rss_8_over_1": results[8]["peak_rss_gb"] / results[1]["peak_rss_gb"]}


def caching_throughput(workdir, repeats, pairs=384, prompts=27):
    """`data.py cache` of tiny-sd1.5 on `pairs` image pairs with 1 process (2 threads) and 2 torchrun ranks (1
    thread each), interleaved; pairs per second from the time each run reports for its caching (model loading and
    interpreter start-up left out); and the bytes per pair with the conditioning stored once per prompt, as measured,
    against once per pair (what format 1 stored: the pair shards' bytes plus a prompt's bytes for every pair)."""
    from PIL import Image
    folder = workdir / "cache-pairs"
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    models.load_backbone("tiny-sd1.5").pipe.save_pretrained(folder / "base")
    rows = []
    for i in range(pairs):
        Image.new("RGB", (64, 64), (i % 256, 100, 50)).save(folder / f"w{i}.png")
        Image.new("RGB", (64, 64), (90, 90, i % 256)).save(folder / f"l{i}.png")
        rows.append(json.dumps({"prompt": f"a picture {i % prompts}", "chosen": f"w{i}.png", "rejected": f"l{i}.png"}))
    (folder / "pairs.jsonl").write_text("\n".join(rows))
    speed = {1: [], 2: []}
    for repeat in range(repeats):
        for ranks in (1, 2):
            out = workdir / f"cache-{ranks}-{repeat}"
            launcher = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
                                           if ranks == 2 else [])
            command = [str(Path(__file__).parent / "data.py"), "cache", "--model", "tiny-sd1.5", "--pretrained",
                       str(folder / "base"), "--data", str(folder / "pairs.jsonl"), "--out", str(out),
                       "--shard-size", "64"]
            run = subprocess.run(launcher + command, capture_output=True, text=True, timeout=600)
            if run.returncode:
                raise RuntimeError(run.stderr[-2000:])
            index = json.loads((out / data.CACHE_INDEX).read_text())
            speed[ranks].append(index["pairs"] / index["this_run"]["seconds"])
    size = {kind: sum(f.stat().st_size for f in out.glob(f"{kind}-*.safetensors")) for kind in ("shard", "prompts")}
    return {"pairs": pairs, "distinct_prompts": prompts,
            "pairs_per_s": {ranks: statistics.median(values) for ranks, values in speed.items()},
            "two_ranks_over_one": statistics.median(speed[2]) / statistics.median(speed[1]),
            "bytes_per_pair_conditioning_per_pair": (size["shard"] + size["prompts"] / prompts * pairs) / pairs,
            "bytes_per_pair_deduplicated": (size["shard"] + size["prompts"]) / pairs}


def data_figures(workdir, repeats):
    results = {"reading": reading_memory(workdir), "caching": caching_throughput(workdir, repeats)}
    reading, caching = results["reading"], results["caching"]
    print_table("8 data: peak RSS of indexing and decoding Pick-a-Pic shards (target 8 / 1 <= 1.15)",
                {f"{n} shard(s), {r['pairs']:,} pairs, {r['gb_on_disk']:.2f} GB on disk":
                 f"{r['peak_rss_gb']:.2f} GB peak RSS, {r['seconds']:.0f} s" for n, r in reading["per_shards"].items()}
                | {"8 / 1": f"{reading['peak_rss_8_over_1']:.2f}"})
    print_table(f"8 data: data.py cache, tiny-sd1.5, {caching['pairs']} pairs, {caching['distinct_prompts']} prompts",
                {"1 process (2 threads)": f"{caching['pairs_per_s'][1]:.0f} pairs/s",
                 "2 ranks (1 thread each)": f"{caching['pairs_per_s'][2]:.0f} pairs/s",
                 "2 ranks / 1 process": f"{caching['two_ranks_over_one']:.2f}",
                 "bytes per pair, conditioning per pair (format 1)":
                     f"{caching['bytes_per_pair_conditioning_per_pair']:,.0f}",
                 "bytes per pair, each prompt once": f"{caching['bytes_per_pair_deduplicated']:,.0f}"})
    return results


PEER = "examples/research_projects/diffusion_dpo/train_diffusion_dpo.py"


def peer_steps(script, workdir, repeats=3, sizes=(("tiny", 5, 45), ("medium", 2, 22))):
    """Figure 9: seconds per step of diffusers' DPO example (`script`, a local copy of PEER; never downloaded) and of
    train.py on its raw pairs and on a latent cache: the same saved pipeline (tiny-sd1.5, or with the medium UNet),
    the same Pick-a-Pic-schema shard, LoRA rank 4, 2 pairs a step, fp32, 1 process, no activation checkpointing,
    Diffusion-DPO's loss. Two measures from the same runs, each script run by step_times_worker: the difference of a
    long and a short run's wall clock over their difference in steps (start-up, data loading and saving cancel), and
    the long run's median interval between its progress bar's updates (a steady-state step). The runs interleaved,
    `repeats` times; medians."""
    pairs = synthetic_pickapic(workdir / "pairs", 1, rows=64)
    results = {}
    for size, short, long in sizes:
        model = workdir / size
        cpu_backbone(size).pipe.save_pretrained(model)
        cache = workdir / f"cache-{size}"
        cached = subprocess.run([sys.executable, str(Path(__file__).with_name("data.py")), "cache", "--model",
                                 "tiny-sd1.5", "--pretrained", str(model), "--data", str(pairs), "--out", str(cache)],
                                capture_output=True, text=True)
        if cached.returncode:
            raise RuntimeError(cached.stderr)  # data.py's one line
        peer = [script, "Steps", "--pretrained_model_name_or_path", model, "--dataset_name", pairs,
                "--dataset_split_name", "train", "--resolution", 32, "--train_batch_size", 2, "--rank", 4,
                "--checkpointing_steps", 10 ** 6, "--lr_warmup_steps", 0, "--seed", 0, "--report_to", "all",
                "--output_dir", workdir / "out", "--max_train_steps"]
        ours = [Path(__file__).with_name("train.py"), "dpo", "--model", "tiny-sd1.5", "--pretrained", model,
                "--lora", 4, "--batch-size", 2, "--loss", "dpo", "--warmup", 0, "--checkpoint-every", 10 ** 6,
                "--no-export", "--no-gradient-checkpointing", "--out", workdir / "out", "--data"]
        commands = {"peer": peer, "ours, raw pairs": ours + [pairs, "--steps"],
                    "ours, cache": ours + [cache, "--steps"]}
        differenced, steady = ({name: [] for name in commands} for _ in range(2))
        for _ in range(repeats):
            for name, command in commands.items():
                took = []
                for steps in (short, long):
                    shutil.rmtree(workdir / "out", ignore_errors=True)
                    start = time.perf_counter()
                    result = worker_result([sys.executable, __file__, "step-times-worker",
                                            *map(str, command + [steps])])
                    took.append(time.perf_counter() - start)
                differenced[name].append((took[1] - took[0]) / (long - short))
                steady[name].append(result["seconds_per_step"])
        results[size] = {}
        for measure, runs in (("differenced", differenced), ("steady", steady)):
            per_step = {name: statistics.median(values) for name, values in runs.items()}
            results[size][measure] = {"seconds_per_step": per_step, "runs": runs,
                                      "ours_over_peer": {name: per_step[name] / per_step["peer"]
                                                         for name in commands if name != "peer"}}
    return results


def step_times_worker(script, bar, argv):
    """`python SCRIPT ARGV` in this process, timing the updates of its progress bar named `bar` (both scripts update
    theirs once a step): prints the median interval after the first 5 updates."""
    import runpy
    import tqdm.std
    stamps, update = [], tqdm.std.tqdm.update

    def timed_update(progress, n=1):
        if progress.desc == bar:
            stamps.append(time.perf_counter())
        return update(progress, n)

    tqdm.std.tqdm.update = timed_update
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
    gaps = [later - earlier for earlier, later in zip(stamps[5:], stamps[6:])]
    print("RESULT " + json.dumps({"seconds_per_step": statistics.median(gaps) if gaps else None,
                                  "updates": len(stamps)}))


# ---------------------------------------------------------------------------------------------------------
# Figure 10: native size on the CPU. Every backbone's full architecture (random weights) caches two pairs and
# trains two steps, each phase in its own process as a user runs it, beside the host memory the planner predicts
# ---------------------------------------------------------------------------------------------------------

# (model, resolution or None for the native one, frames): videos at 5 frames (2 latent frames), the fewest that
# are still a video; then the growth curves: Wan at 9 and 17 frames, SD1.5 at 256 and 768
NATIVE_RUNS = (("sd1.5", None, 0), ("sdxl", None, 0), ("cogvideox-2b", None, 5), ("cogvideox-5b", None, 5),
               ("wan2.1-1.3b", None, 5))
GROWTH_RUNS = (("wan2.1-1.3b", None, 9), ("wan2.1-1.3b", None, 17), ("sd1.5", (256, 256), 0),
               ("sd1.5", (768, 768), 0))
HOST_GB = 24  # this project's machines; a full fine-tuning run is tried where its plan for both ranks fits in it


def sized_backbone(name, resolution, frames):
    """The full-size backbone on the meta device at a size (planning needs shapes only)."""
    backbone = models.load_backbone(name, device="meta", random_weights=True)
    return backbone.resize(resolution, frames or None)


def size_label(backbone):
    height, width = backbone.resolution
    return f"{height}x{width}" + (f"x{backbone.num_frames}" if backbone.is_video else "")


def native_media(folder, backbone, pairs=2):
    """`pairs` pairs of random pixels at the backbone's size (PNG images, H.264 videos) and their manifest."""
    import imageio.v3 as iio
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    rng, rows = np.random.default_rng(0), []
    frames = (backbone.num_frames,) if backbone.is_video else ()
    for i in range(pairs):
        names = [f"{i}{side}.{'mp4' if frames else 'png'}" for side in "wl"]
        for name in names:
            pixels = rng.integers(0, 256, (*frames, *backbone.resolution, 3), dtype=np.uint8)
            iio.imwrite(folder / name, pixels, **({"fps": 8, "codec": "libx264"} if frames else {}))
        rows.append({"prompt": f"a photo of thing {i}", "chosen": names[0], "rejected": names[1]})
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder / "pairs.jsonl"


def peak_gb(command):
    """Runs `command`; (its peak RSS in GiB, seconds). wait4's ru_maxrss: the child's peak, or a launcher's
    (torchrun) largest of its own and its ranks', the memory one rank needs. (A child also inherits its parent's
    peak at exec on Linux: this process stays far below what the phases measure, but not below the libraries
    alone, which "runtime" reads as the child's own VmHWM.)"""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{' '.join(map(str, command[:6]))} ...: exit {process.returncode}:\n{output[-3000:]}")
    return usage.ru_maxrss / 2 ** 20, time.perf_counter() - start


def native_phase(phase, backbone, workdir):
    """One phase in a fresh process: "runtime" (the libraries alone), "cache" (two pairs through the full VAE and
    text encoders, bf16), "lora" (two SIPO steps, LoRA rank 64, bf16 autocast) or "full" (two SIPO steps of full
    fine-tuning on 2 FSDP2 ranks over gloo, bf16 compute). Returns its peak RSS and seconds a pair or a step."""
    python = [sys.executable]
    if phase == "runtime":
        reading = "import torch, train, common; print(common.peak_memory_gb(torch.device('cpu')))"
        return {"peak_rss_gb": float(subprocess.run(python + ["-c", reading], capture_output=True, text=True,
                                                    check=True).stdout)}
    folder = workdir / f"{backbone.name}-{size_label(backbone)}"
    cache = folder / "cache"
    size = ["--resolution", "x".join(map(str, backbone.resolution)),
            *(["--frames", str(backbone.num_frames)] if backbone.is_video else [])]
    if phase == "cache":
        shutil.rmtree(cache, ignore_errors=True)
        manifest = native_media(folder / "media", backbone)
        peak, seconds = peak_gb(python + ["data.py", "cache", "--model", backbone.name, "--random-weights", "--data",
                                          str(manifest), "--out", str(cache), "--precision", "bf16",
                                          "--latent-dtype", "bf16", *size])
        made = json.loads((cache / data.CACHE_INDEX).read_text())
        return {"peak_rss_gb": peak, "wall_s": seconds, "seconds_per_pair": made["this_run"]["seconds"] / 2}
    if not (cache / data.CACHE_INDEX).is_file():  # a growth size: random latents (its cost is the step's)
        random_cache(backbone, folder, 2, native=True)
    run = folder / phase
    shutil.rmtree(run, ignore_errors=True)
    launcher = python + (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if phase == "full"
                         else [])
    peak, seconds = peak_gb(launcher + ["train.py", "--model", backbone.name, "--random-weights", "--data",
                                        str(cache), "--out", str(run), "--precision", "bf16", "--steps", "2",
                                        "--warmup", "0", *(["--lora", "64"] if phase == "lora" else [])])
    steps = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    shutil.rmtree(run, ignore_errors=True)  # a full run's checkpoint is GBs
    return {"peak_rss_gb": peak, "wall_s": seconds, "seconds_per_step": steps[-1]["step_time"],
            "first_step_s": steps[0]["step_time"]}


class LiveBytes(TorchDispatchMode):
    """The peak bytes of the tensors a computation holds at once, beyond what existed before it: run on fake tensors
    (FakeTensorMode), it needs no memory and no compute. Each op's outputs are counted once per storage, and a
    storage no tensor refers to any more is let go before the next op's outputs are added."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.multiprocessing.reductions import StorageWeakRef
        out = func(*args, **(kwargs or {}))
        for key in [key for key, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                ref = StorageWeakRef(tensor.untyped_storage())
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = ref, tensor.untyped_storage().nbytes()
                    self.now += self.live[ref.cdata][1]
        self.peak = max(self.peak, self.now)
        return out


def encoding_bytes(backbone):
    """Peak activation bytes of encoding one sample at the backbone's size through its VAE (data.py cache encodes
    one sample at a time: slicing) in the dtype it holds it in, counted on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    frames = (backbone.num_frames,) if backbone.is_video else ()
    dtype = torch.float32 if "vae" in models.FP32_PARTS.get(backbone.family, ()) else torch.bfloat16
    with FakeTensorMode(), models.building("cpu", dtype):
        vae = type(backbone.pipe.vae)(**backbone.pipe.vae.config)
        pixels = torch.zeros(1, 3, *frames, *backbone.resolution)
        with LiveBytes() as live, torch.no_grad():
            vae.encode(pixels)
    return live.peak


def held_bytes(module, low_precision=lambda layer: True, dtype=torch.bfloat16):
    """Bytes of a module's parameters and buffers held in `dtype` where `low_precision(layer)`, in fp32 elsewhere."""
    total = 0
    for layer in module.modules():
        size = 2 if dtype == torch.bfloat16 and low_precision(layer) else 4
        total += sum(t.numel() * size for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False)))
    return total


def host_plan(backbone, phase, runtime_gb):
    """The planner's host memory for a native phase, GiB by term (the largest process: one rank for "full").
    runtime: the libraries (measured: a process that imports train.py). cache: the VAE and text encoders in bf16
    (FP32_PARTS in fp32), the VAE's activations for one sample (encoding_bytes). lora: the frozen base as
    train.hold_for_autocast holds it (Linear and Conv weights bf16, the rest fp32), the adapters with their fp32
    gradients and Adam moments (16 bytes a parameter), activations as figure 5 counts them (activation_bytes, with
    checkpointing). full, 2 ranks: figure 5's terms per rank (fp32 policy, gradients and Adam, bf16 reference, all
    sharded) with the largest FSDP group gathered (bf16 parameters, fp32 gradients) and the activations; or, if
    larger, building: each rank holds the whole fp32 policy and its bf16 reference (train.frozen_copy casts as it
    copies) before sharding them."""
    terms = {"runtime": runtime_gb * 2 ** 30}
    if phase == "cache":
        fp32 = models.FP32_PARTS.get(backbone.family, ())
        terms["encoders"] = sum(held_bytes(module, dtype=torch.float32 if name in fp32 else torch.bfloat16)
                                for name, module in backbone.frozen_parts().items())
        terms["encoding"] = encoding_bytes(backbone)
    else:
        denoiser, ranks = backbone.denoiser, 2 if phase == "full" else 1
        count = sum(p.numel() for p in denoiser.parameters())
        if phase == "lora":
            terms["base"] = held_bytes(denoiser, lambda layer: isinstance(layer, train.AUTOCAST_LAYERS))
            terms["adapters"] = 16 * lora_parameter_count(denoiser, 64)
        else:
            terms["policy, gradients, Adam"] = 16 * count / ranks
            terms["reference"] = 2 * count / ranks
            groups = [sum(p.numel() for p in block.parameters()) for block in models.denoiser_blocks(denoiser)]
            terms["gathered group"] = 6 * max(groups)
        terms["activations"] = activation_bytes(backbone, 2)[True]
        if phase == "full" and 6 * count > sum(terms.values()) - terms["runtime"]:
            terms = {"runtime": terms["runtime"], "building": 6 * count}
    return {term: value / 2 ** 30 for term, value in terms.items()}


def native_figures(workdir, store, remeasure=False):
    """Figure 10 (each backbone: cache, LoRA step, full step where it fits; measured / planned peak RSS) and the
    growth table (seconds a step and peak RSS against planned FLOPs and bytes, fitted exponents). Each phase's
    measurement is kept in `store` as it finishes: a rerun measures only what is missing (--remeasure: all)."""
    measured = {} if remeasure or not store.is_file() else json.loads(store.read_text())

    def measure(key, phase, backbone):
        if key not in measured:
            print(f"  measuring {key} ...", flush=True)
            measured[key] = {**native_phase(phase, backbone, workdir), "commit": commit(), "cpu": cpu_name()}
            write_text_atomically(store, json.dumps(measured, indent=1))
        return measured[key]

    runtime = measure("runtime", "runtime", None)["peak_rss_gb"]
    table, growth = {}, {}
    for name, resolution, frames in NATIVE_RUNS + GROWTH_RUNS:
        backbone = sized_backbone(name, resolution, frames)
        phases = ("cache", "lora", "full") if (name, resolution, frames) in NATIVE_RUNS else ("lora",)
        for phase in phases:
            plan = host_plan(backbone, phase, runtime)
            key = f"{name} {size_label(backbone)} {phase}"
            if phase == "full" and 2 * sum(plan.values()) > HOST_GB:
                table[key] = {"planned_gb": sum(plan.values()), "skipped": f"2 ranks need {2 * sum(plan.values()):.0f}"
                              f" GiB by the plan, more than this machine's {HOST_GB}"}
                continue
            got = measure(key, phase, backbone)
            table[key] = {**got, "planned_gb": sum(plan.values()), "planned_terms": plan,
                          "measured_over_planned": got["peak_rss_gb"] / sum(plan.values())}
            if phase == "lora":
                growth[key] = {"seconds_per_step": got["seconds_per_step"], "peak_rss_gb": got["peak_rss_gb"],
                               "planned_tflop": training_flops(backbone, 1) * 5 / 4 / 1e12,
                               "planned_gb": sum(plan.values()), "size": backbone.num_frames or backbone.resolution[0]}
    return table, growth_exponents(growth)


def growth_exponents(growth):
    """Per backbone, the log-log slope of seconds a step and of planned FLOPs between its smallest and largest
    size (frames for Wan, side for SD1.5): what the work costs against what the planner says it should."""
    fits = {}
    for name in ("wan2.1-1.3b", "sd1.5"):
        rows = sorted((row for key, row in growth.items() if key.startswith(name + " ")), key=lambda r: r["size"])
        if len(rows) > 1:
            first, last = rows[0], rows[-1]
            span = math.log(last["size"] / first["size"])
            fits[name] = {k: math.log(last[v] / first[v]) / span for k, v in
                          (("seconds_exponent", "seconds_per_step"), ("flops_exponent", "planned_tflop"),
                           ("memory_exponent", "peak_rss_gb"), ("planned_memory_exponent", "planned_gb"))}
    return {"rows": growth, "exponents": fits}


def commit():
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           cwd=Path(__file__).parent)
    return found.stdout.strip() or None


def flat(rows, prefix=""):
    """A figure's nested results as "key / sub-key: value" lines, numbers to 4 significant digits."""
    for key, value in rows.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flat(value, f"{name} / ")
        else:
            yield name, f"{value:.4g}" if isinstance(value, float) else value


def print_table(title, rows):
    print(f"\n## {title}")
    for key, value in flat(rows):
        print(f"  {key:55s} {value}")


# Each figure's targets (docs/performance.md): (figure, what, the value's keys in its results, the limit)
TARGETS = [("1 loss overhead", "SIPO / DPO", ("sipo_over_dpo",), 1.02),
           ("1 loss overhead", "DPO-C&M / DPO", ("dpo_cm_over_dpo",), 1.02),
           ("2 distance to floor, medium", "step / floor", ("step_over_floor",), 1.10),
           ("2 distance to floor, tiny", "step / floor", ("step_over_floor",), 1.10),
           ("4 fsdp memory, medium", "2 ranks / 1 rank", ("two_over_one",), 0.6),
           ("4 fsdp memory, tiny", "2 ranks / 1 rank", ("two_over_one",), 0.6),
           ("8 data", "peak RSS reading 8 shards / 1", ("reading", "peak_rss_8_over_1"), 1.15)]


def target_verdicts(results):
    """A line per target whose figure this run measured: the value, the limit, met or MISSED."""
    lines = []
    for figure, what, keys, limit in TARGETS:
        value = results.get(figure)
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            lines.append(f"  {figure}: {what} {value:.3f} <= {limit}: {'met' if value <= limit else 'MISSED'}")
    return lines


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["step-times-worker"]:  # SCRIPT BAR ARGS: the rest are the script's flags, not ours
        return step_times_worker(*argv[1:3], argv[3:])
    if argv[:1] == ["gpu-worker"]:  # --record PATH [--inject-inf] -- TRAIN.PY'S FLAGS
        ours, train_argv = argv[1:argv.index("--")], argv[argv.index("--") + 1:]
        return gpu_worker(Path(ours[1]), "--inject-inf" in ours, train_argv)
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", default="cpu",
                        choices=("cpu", "data", "planner", "gpu", "native", "peer", "fsdp-memory-worker",
                                 "reading-worker"))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", default="results/bench.json", help="where the figures go as JSON")
    parser.add_argument("--size", default="medium", choices=("tiny", "medium"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--peer-script", type=Path, help=f"peer: a local copy of diffusers' {PEER}")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench-native"),
                        help="native: media, caches and each phase's measurement (a rerun measures what is missing)")
    parser.add_argument("--remeasure", action="store_true", help="native: measure every phase again")
    parser.add_argument("--tiny", action="store_true", help="gpu: the same check at tiny size, on any device")
    args = parser.parse_args(argv)
    if args.what == "fsdp-memory-worker":
        return fsdp_memory_worker(args.size)
    if args.what == "reading-worker":
        return reading_worker(args.data)
    results = {"machine": machine()}
    if args.what == "gpu" and args.out == "results/bench.json":  # the check's figures go in a file of their own
        args.out = f"results/gpu-check{'-tiny' if args.tiny else ''}.json"
    try:  # before any work: the planner alone is minutes
        check_output(args.out, folder=False)
        check_output(args.workdir, "--workdir")
    except ValueError as error:
        sys.exit(error_line(error))
    if args.what == "gpu":
        if not (args.tiny or torch.cuda.is_available()):
            sys.exit("error: bench.py gpu: no GPU here; --tiny runs the same check at tiny size on this machine")
        out = Path(args.out)
        print(f"GPU check ({machine().get('gpu', cpu_name())}, commit {commit()}): torchrun, 1 rank, FSDP2, bf16; "
              f"JSON in {out}")
        return gpu_check(out, args.tiny, args.workdir.with_name("bench-gpu"))
    elif args.what == "data":
        with tempfile.TemporaryDirectory() as tmp:
            results["8 data"] = data_figures(Path(tmp), repeats=3)
    elif args.what == "peer":
        if args.peer_script is None or not args.peer_script.is_file():
            print(f"peer: skipped: pass --peer-script PATH, a local copy of diffusers' {PEER} (its imports installed:"
                  " datasets, torchvision, wandb)")
            return None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                results["9 peer"] = peer_steps(args.peer_script, Path(tmp))
            except RuntimeError as error:  # a run that failed: its last line (the peer's missing import, say)
                sys.exit(f"error: peer comparison: {str(error).strip().splitlines()[-1]}")
        for size, measures in results["9 peer"].items():
            for measure, row in measures.items():
                print_table(f"9 ours / diffusers' DPO example, {size}, {measure}, LoRA 4, 2 pairs a step, 1 process "
                            "(target raw <= 1.00, cache <= 0.90)",
                            {name: f"{1000 * t:.0f} ms a step" for name, t in row["seconds_per_step"].items()}
                            | {f"{name} / peer": f"{ratio:.2f}" for name, ratio in row["ours_over_peer"].items()})
    elif args.what == "native":
        args.workdir.mkdir(parents=True, exist_ok=True)
        table, growth = native_figures(args.workdir, args.workdir / "measured.json", args.remeasure)
        results["10 native"], results["11 growth"] = table, growth
        print_table(f"10 native size on the CPU ({cpu_name()}, {os.cpu_count()} cores), random weights, bf16, "
                    "2 pairs: peak RSS measured / planned", {key: row["skipped"] if "skipped" in row else
                    f"{row['peak_rss_gb']:.1f} / {row['planned_gb']:.1f} GiB = {row['measured_over_planned']:.2f}; "
                    + (f"{row['seconds_per_pair']:.0f} s a pair" if "seconds_per_pair" in row else
                       f"{row['seconds_per_step']:.0f} s a step") for key, row in table.items()})
        print_table("11 growth: LoRA step", {key: f"{row['seconds_per_step']:.0f} s, {row['peak_rss_gb']:.1f} GiB; "
                    f"planned {row['planned_tflop']:.0f} TFLOP, {row['planned_gb']:.1f} GiB"
                    for key, row in growth["rows"].items()} |
                    {f"{name}: exponents": ", ".join(f"{k.removesuffix('_exponent')} {v:.2f}" for k, v in fit.items())
                     for name, fit in growth["exponents"].items()})
    elif args.what == "planner":
        results["planner"] = memory_plan()
        results["scaling model"] = scaling_model()
        results["cache plan"] = cache_plan()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results["0 tiny backbones"] = tiny_step_times(args.repeats, Path(tmp))
            print_table("0 tiny backbones: SIPO step, 2 pairs, 1 process", results["0 tiny backbones"])
            for size in ("medium", "tiny"):
                backbone = cpu_backbone(size)
                cache = random_cache(backbone, Path(tmp) / size, 16)
                trainer = StepTimer(backbone, 4, torch.device("cpu"), data_path=cache.directory).use(cache)
                if size == "medium":
                    results["1 loss overhead"] = loss_overhead(trainer, args.repeats)
                    print_table("1 loss overhead, medium (target SIPO / DPO <= 1.02)", results["1 loss overhead"])
                results[f"2 distance to floor, {size}"] = floor_distance(trainer, 4, args.repeats)
                print_table(f"2 step / floor, {size} (target <= 1.10)", results[f"2 distance to floor, {size}"])
            results["3 cache speed-up"] = cache_speedup(args.repeats, Path(tmp))
            print_table("3 latent cache speed-up, tiny-wan2.1-1.3b", results["3 cache speed-up"])
            results["8 data"] = data_figures(Path(tmp), repeats=3)
        for size in ("medium", "tiny"):
            results[f"4 fsdp memory, {size}"] = fsdp_memory(size)
            print_table(f"4 FSDP memory per rank, {size} (target 2 ranks <= 0.6 x 1 rank)",
                        results[f"4 fsdp memory, {size}"])
        results["5 planner"] = memory_plan()
        results["scaling model"] = scaling_model()
        results["cache plan"] = cache_plan()
    if "planner" in results or "5 planner" in results:
        for name, plan in results.get("planner", results.get("5 planner")).items():
            print_table(f"5 planner: {name} ({plan['parameters']:,} parameters)",
                        {k: f"{v:.1f} GB" for k, v in plan["per_gpu_gb"].items()})
    for name, rows in results.get("scaling model", {}).items():
        print_table(f"6 scaling model (a model, not a measurement): {name}, 1 pair a GPU, MFU 40% of H100 bf16",
                    {k: f"NVLink {v['gb_nvlink']:.1f} GB + IB {v['gb_infiniband']:.1f} GB = "
                        f"{v['communication_s']:.2f} s; compute {v['compute_s']:.2f} s; step "
                        f"{v['step_s_overlapped']:.2f}-{v['step_s_serial']:.2f} s" for k, v in rows.items()})
    for name, row in results.get("cache plan", {}).items():
        print_table(f"7 cache plan (a model, not a measurement): {name}, {row['pairs']:,} pairs, "
                    f"{row['distinct_prompts']:,} prompts, encoding at MFU 40% of H100 bf16",
                    {"encode a pair / a prompt":
                        f"{row['tflop_per_pair']:.2f} TFLOP / {row['gflop_per_prompt']:.1f} GFLOP",
                     "size fp32 / de-duplicated": f"{row['gb_fp32']:.0f} GB / {row['gb_fp32_deduplicated']:.0f} GB",
                     "size bf16 / de-duplicated": f"{row['gb_bf16']:.0f} GB / {row['gb_bf16_deduplicated']:.0f} GB",
                     "GPU-hours": f"{row['gpu_hours']:.2f}"})
    verdicts = target_verdicts(results)
    if verdicts:
        print("\n## targets\n" + "\n".join(verdicts))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(out.read_text()) if out.is_file() else {}
    write_text_atomically(out, json.dumps(merge_figures(earlier, results, commit()), indent=1, default=str))
    return results


def merge_figures(earlier, results, at_commit):
    """bench.json: the figures of this run over those of earlier ones (a figure run alone keeps the others), and
    under "measured_on" each figure's machine and commit."""
    results = dict(results)
    stamp = {**results.pop("machine"), "commit": at_commit}
    earlier = dict(earlier)
    measured_on = {**earlier.pop("measured_on", {}), **dict.fromkeys(results, stamp)}
    return {"measured_on": measured_on, **earlier, **results}


def machine():
    info = {"cpu": cpu_name(), "cpu_cores": os.cpu_count(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


if __name__ == "__main__":
    main()
