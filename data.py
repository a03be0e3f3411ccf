"""Preference pairs (prompt, chosen, rejected) for images and video, and a latent cache.

Sources `--data` may name:
  *.parquet or a directory of them   Pick-a-Pic v2 shards: caption, jpg_0, jpg_1, label_0 in {1, 0, 0.5}
  *.jsonl                            a manifest: {"prompt", "chosen", "rejected", ...}, paths relative to it
  a directory with cache.json        a latent cache written by `python data.py cache`

    python data.py cache --model NAME [--pretrained PATH] --data SRC --out DIR [--skip-bad]

This is the only file that knows file formats.
"""
import argparse
import io
import json
import os
import shutil
import socket
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".gif"}
CACHE_INDEX = "cache.json"


class DataError(ValueError):
    """Bad input; the message is one line naming the row and the file."""


@dataclass
class Pair:
    prompt: str
    chosen: object       # a path, or encoded image bytes (Pick-a-Pic)
    rejected: object
    where: str           # "FILE row N", for messages
    extra: dict = field(default_factory=dict)


@dataclass
class Summary:
    read: int = 0
    skipped: Counter = field(default_factory=Counter)

    def __str__(self):
        reasons = ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()) or "none"
        return f"{self.read} pairs read; skipped: {reasons}"


# ---------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------

def read_pickapic(paths, summary, keep_ties=False):
    """Pick-a-Pic v2 rows as winner-first pairs; ties (label_0 = 0.5) dropped and counted unless keep_ties."""
    import pyarrow.parquet as pq
    pairs = []
    for path in tqdm(paths, desc="reading parquet", disable=len(paths) < 2):
        try:
            table = pq.read_table(path, columns=["caption", "jpg_0", "jpg_1", "label_0"])
        except Exception as error:  # pyarrow raises several types for missing columns and corrupt files
            raise DataError(f"{path}: not a Pick-a-Pic v2 parquet shard ({str(error).splitlines()[0]})") from None
        rows = table.to_pydict()
        for i, (caption, jpg_0, jpg_1, label) in enumerate(zip(rows["caption"], rows["jpg_0"], rows["jpg_1"],
                                                                 rows["label_0"])):
            where = f"{path} row {i}"
            if label == 0.5 and not keep_ties:
                summary.skipped["ties"] += 1
                continue
            if label not in (0, 0.5, 1):
                raise DataError(f"{where}: label_0 is {label!r}, expected 1, 0 or 0.5")
            if not isinstance(caption, str):
                raise DataError(f"{where}: caption is {_json_type(caption)}, not a string")
            chosen, rejected = (jpg_0, jpg_1) if label == 1 else (jpg_1, jpg_0)
            pairs.append(Pair(caption, chosen, rejected, where, {"label_0": label}))
    return pairs


def read_manifest(path, summary, skip_bad=False):
    """JSON Lines rows {"prompt", "chosen", "rejected", ...}; missing fields or files fail or are counted."""
    path = Path(path)
    pairs = []
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        if not raw.strip():
            continue
        where = f"{path} row {number}"
        try:
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{where}: not UTF-8 text") from None
            except json.JSONDecodeError:
                raise DataError(f"{where}: not valid JSON") from None
            missing = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row, dict) or k not in row]
            if missing:
                raise DataError(f"{where}: missing required field {missing[0]!r}")
            for key in ("prompt", "chosen", "rejected"):  # never train on the repr of a null, number or list
                if not isinstance(row[key], str):
                    raise DataError(f"{where}: {key} is {_json_type(row[key])}, not a string")
            files = {k: path.parent / row[k] for k in ("chosen", "rejected")}
            for key, file in files.items():
                if not file.is_file():
                    raise DataError(f"{where}: {key} file {file} does not exist")
                if file.suffix.lower() not in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
                    raise DataError(f"{where}: {key} file {file} is not an image or video "
                                    f"({', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))})")
        except DataError as error:
            if not skip_bad:
                raise
            summary.skipped[_reason(error)] += 1
            continue
        extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
        pairs.append(Pair(row["prompt"], files["chosen"], files["rejected"], where, extra))
    return pairs


def _json_type(value):
    return "null" if value is None else {bool: "a boolean", int: "a number", float: "a number", list: "a list",
                                          dict: "an object"}.get(type(value), type(value).__name__)


def _reason(error):
    text = str(error)
    for reason in ("missing required field", "does not exist", "not an image or video", "not valid JSON",
                   "not UTF-8", "not a string", "cannot be decoded", "too few frames", "is an image", "differ in size"):
        if reason in text:
            return reason
    return "bad input"


def read_pairs(source, skip_bad=False, keep_ties=False):
    """The pairs in `source` (a manifest or Pick-a-Pic parquet) and a Summary of what was read and skipped."""
    source = Path(source)
    summary = Summary()
    if source.is_dir():
        shards = sorted(source.glob("*.parquet"))
        if not shards:
            raise DataError(f"{source}: no *.parquet shards and no {CACHE_INDEX} in this directory")
        pairs = read_pickapic(shards, summary, keep_ties)
    elif source.suffix == ".parquet":
        pairs = read_pickapic([source], summary, keep_ties)
    elif source.suffix == ".jsonl":
        if not source.is_file():
            raise DataError(f"{source}: manifest does not exist")
        pairs = read_manifest(source, summary, skip_bad)
    else:
        raise DataError(f"{source}: expected a .jsonl manifest, .parquet shards or a cache directory")
    if not pairs:
        raise DataError(f"{source}: empty dataset ({summary})")
    summary.read = len(pairs)
    return pairs, summary


# ---------------------------------------------------------------------------------------------------------
# Decoding: resize, centre-crop, frames; pixels in [-1, 1], (3, H, W) or (3, F, H, W)
# ---------------------------------------------------------------------------------------------------------

def to_rgb(image):
    """Any PIL mode as 8-bit RGB. PIL's convert("RGB") clips integer modes at 255 (a 16-bit grey PNG, mode I;16 or
    I, comes out white) and float ones too: scale those to 8 bits first (16-bit: / 257; float: [0, 1] or [0, 255])."""
    if image.mode.startswith("I"):
        array = np.asarray(image).astype(np.float64)
        array = array / 257.0 if image.mode.startswith("I;16") or array.max() > 255 else array
        image = Image.fromarray(np.clip(array.round(), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        array = np.asarray(image).astype(np.float64)
        array = array * 255.0 if array.max() <= 1.0 else array
        image = Image.fromarray(np.clip(array.round(), 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def _resize_crop(image, height, width):
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = to_rgb(image).resize(size, Image.BICUBIC)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.asarray(image.crop((left, top, left + width, top + height)))


def load_media(source, where, height, width, num_frames=0, frame_stride=1):
    """An image (3, H, W) or, for video backbones, a video (3, F, H, W), in [-1, 1]."""
    is_video = isinstance(source, Path) and source.suffix.lower() in VIDEO_SUFFIXES
    try:
        if not is_video:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            image.load()
            frames = [_resize_crop(image, height, width)]
        else:
            needed = (max(num_frames, 1) - 1) * frame_stride + 1
            frames = []
            for index, frame in enumerate(iio.imiter(source)):
                if index % frame_stride == 0:
                    frames.append(_resize_crop(Image.fromarray(frame), height, width))
                if index + 1 >= needed:
                    break
    except Exception as error:  # PIL and ffmpeg raise many types for corrupt files
        name = source if isinstance(source, Path) else "image bytes"
        raise DataError(f"{where}: {name} cannot be decoded ({str(error).splitlines()[0][:120]})") from None
    if is_video and not num_frames:
        raise DataError(f"{where}: {source} is a video, but this backbone takes images")
    if num_frames and not is_video:
        raise DataError(f"{where}: {_name(source)} is an image, but this backbone takes videos of {num_frames} frames")
    if is_video and len(frames) < num_frames:
        raise DataError(f"{where}: {source} has too few frames ({len(frames)} at stride {frame_stride}, "
                        f"needs {num_frames})")
    pixels = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1  # (3, F, H, W)
    return pixels if num_frames else pixels[:, 0]


class PairDataset(torch.utils.data.Dataset):
    """Decodes pairs on access; the random flip is the same for both members of a pair."""

    def __init__(self, pairs, height, width, num_frames=0, frame_stride=1, flip=False, seed=0):
        self.pairs, self.size, self.num_frames, self.frame_stride = pairs, (height, width), num_frames, frame_stride
        self.flip, self.seed, self.epoch = flip, seed, 0

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        pair = self.pairs[index]
        chosen, rejected = (load_media(x, pair.where, *self.size, self.num_frames, self.frame_stride)
                            for x in (pair.chosen, pair.rejected))
        if chosen.shape != rejected.shape:
            raise DataError(f"{pair.where}: chosen {_name(pair.chosen)} and rejected {_name(pair.rejected)} differ "
                            f"in size after preprocessing ({tuple(chosen.shape)} vs {tuple(rejected.shape)})")
        if self.flip:
            generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % 2 ** 63)
            if torch.rand((), generator=generator) < 0.5:
                chosen, rejected = chosen.flip(-1), rejected.flip(-1)
        return {"prompt": pair.prompt, "pixels_w": chosen, "pixels_l": rejected, "index": torch.tensor(index)}


def _name(source):
    return source if isinstance(source, Path) else "image bytes"


def drop_bad_pairs(dataset, summary):
    """Decodes every pair once (a progress bar), keeps the good ones and counts the rest (--skip-bad)."""
    good = []
    for index in tqdm(range(len(dataset)), desc="checking pairs"):
        try:
            dataset[index]
            good.append(dataset.pairs[index])
        except DataError as error:
            summary.skipped[_reason(error)] += 1
    if not good:
        raise DataError(f"empty dataset after skipping bad pairs ({summary})")
    dataset.pairs = good
    summary.read = len(good)
    return dataset


# ---------------------------------------------------------------------------------------------------------
# The latent cache: safetensors shards plus cache.json, written into DIR.tmp and renamed to DIR when finished
# ---------------------------------------------------------------------------------------------------------

def cache_identity(backbone, pretrained):
    if pretrained is not None and Path(pretrained).exists():
        pretrained = str(Path(pretrained).resolve())
    return {"model": backbone.name, "pretrained": pretrained, "resolution": list(backbone.resolution),
            "num_frames": backbone.num_frames}


@torch.no_grad()
def write_cache(backbone, dataset, out, pretrained=None, batch_size=8, shard_size=1024, skip_bad=False, summary=None):
    """Encodes every pair once with the backbone's VAE and text encoder(s) into safetensors shards. They are
    written into `out`.tmp, which replaces `out` only when complete: an interrupted run leaves no cache that a reader
    would take as complete, and an older cache in `out` stays readable until then."""
    final = Path(out)
    if final.exists() and (not final.is_dir() or any(final.iterdir()) and not (final / CACHE_INDEX).is_file()):
        raise DataError(f"--out {final}: exists and is not a latent cache; choose an empty or new directory")
    out, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    if old.exists() and not (old / CACHE_INDEX).is_file():
        raise DataError(f"--out {final}: {old} exists and is not a cache of ours; move it away or choose another --out")
    lock = claim_cache_tmp(out, final)
    summary = summary or Summary(read=len(dataset))
    shards, buffer, total = [], [], 0
    progress = tqdm(total=len(dataset), desc=f"caching {backbone.name}", unit="pair")

    def flush():
        nonlocal buffer, total
        tensors = {key: torch.cat([b[key] for b in buffer]).contiguous() for key in buffer[0]}
        name = f"shard-{len(shards):05d}.safetensors"
        save_file(tensors, out / name)
        count = len(tensors["latents_w"])
        shards.append({"file": name, "pairs": count})
        total += count
        buffer = []

    items, pending = [], 0
    for index in range(len(dataset)):
        progress.update(1)
        try:
            items.append(dataset[index])
        except DataError as error:
            if not skip_bad:
                raise
            summary.skipped[_reason(error)] += 1
        if len(items) == batch_size or (index == len(dataset) - 1 and items):
            buffer.append(encode_batch(backbone, collate(items)))
            pending += len(items)
            items = []
            if pending >= shard_size:
                flush()
                pending = 0
    progress.close()
    if buffer:
        flush()
    if not total:
        raise DataError(f"empty dataset after skipping bad pairs ({summary})")
    index = {**cache_identity(backbone, pretrained), "pairs": total, "shards": shards, "skipped": dict(summary.skipped)}
    (out / CACHE_INDEX).write_text(json.dumps(index, indent=1))
    shutil.rmtree(old, ignore_errors=True)  # a cache of ours, left by a swap that was interrupted
    if final.exists():
        os.replace(final, old)
    (out / IN_PROGRESS).unlink()
    os.replace(out, final)
    lock.close()
    shutil.rmtree(old, ignore_errors=True)
    summary.read = total
    return summary


IN_PROGRESS = "in-progress.lock"


def take_lock(path, holder):
    """An exclusive lock on the file `path`, which then names `holder`, this pid and host: (handle, None); the lock
    lasts until the handle is closed or the process ends (the kernel drops it, so a killed holder leaves no stale
    lock). (None, whom the file names) when another process holds it. For the run directory and the cache."""
    import fcntl
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        named = handle.read().strip() or "another process"
        handle.close()
        return None, named
    handle.seek(0)
    handle.truncate()
    handle.write(f"{holder} pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle, None


def claim_cache_tmp(out, final):
    """Makes `out` (DIR.tmp) with a lock file that marks it as ours and is held while this process writes. An
    existing DIR.tmp is removed only if it carries that mark and nobody holds its lock (an interrupted run's);
    anything else there is refused in one line."""
    marker = out / IN_PROGRESS
    if out.exists():
        if not marker.is_file():
            raise DataError(f"--out {final}: {out} exists and was not made by data.py cache; move it away or choose "
                            f"another --out")
        stale, holder = take_lock(marker, "data.py cache")
        if stale is None:
            raise DataError(f"--out {final}: being written by {holder}; wait for it to end")
        stale.close()
        shutil.rmtree(out)
    out.mkdir(parents=True)
    return take_lock(marker, "data.py cache")[0]


class CachedPairs(torch.utils.data.Dataset):
    """Reads a finished cache lazily (memory-mapped safetensors); refuses one made by another backbone."""

    def __init__(self, directory, backbone=None, pretrained=None):
        self.directory = Path(directory)
        index_file = self.directory / CACHE_INDEX
        if not index_file.is_file():
            raise DataError(f"{directory}: not a finished latent cache (no {CACHE_INDEX})")
        self.index = json.loads(index_file.read_text())
        if backbone is not None:
            check_cache_matches(self.index, directory, backbone, pretrained)
        self.files = [self.directory / shard["file"] for shard in self.index["shards"]]
        self.offsets = np.cumsum([0] + [shard["pairs"] for shard in self.index["shards"]])
        self.handles = {}
        self.epoch = 0

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, index):
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        if shard not in self.handles:
            self.handles[shard] = safe_open(self.files[shard], framework="pt")
        handle, row = self.handles[shard], index - int(self.offsets[shard])
        item = {key: handle.get_slice(key)[row:row + 1][0] for key in handle.keys()}
        return {**item, "index": torch.tensor(index)}

    def __getstate__(self):  # DataLoader workers open their own handles
        return {**self.__dict__, "handles": {}}


def check_cache_matches(index, directory, backbone, pretrained):
    """A cache is only read by the backbone, weights, resolution and frame count that made it."""
    expected = cache_identity(backbone, pretrained)
    for key, value in expected.items():
        if index.get(key) != value:
            raise DataError(f"{directory}: cache was made with {key}={index.get(key)!r}, but this run has "
                            f"{key}={value!r}")


def read_cache_index(directory):
    """The identity a cache records, or None when `directory` is not a cache (checked before building models)."""
    index = Path(directory) / CACHE_INDEX
    if not index.is_file():
        return None
    try:
        return json.loads(index.read_text())
    except (ValueError, OSError):
        raise DataError(f"{index}: unreadable cache index; rebuild the cache with data.py cache") from None


# ---------------------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------------------

def collate(items):
    """Stacks tensors; keeps prompts as a list."""
    batch = {}
    for key in items[0]:
        values = [item[key] for item in items]
        batch[key] = values if isinstance(values[0], str) else torch.stack(values)
    return batch


def encode_batch(backbone, batch):
    """Latents and conditioning of a batch: read from the cache, or encoded now (winners and losers together)."""
    device = backbone.denoiser.device
    if "latents_w" in batch:
        return {key: value.to(device, non_blocking=True) for key, value in batch.items() if key != "index"}
    pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]]).to(device)
    latents_w, latents_l = backbone.encode_pixels(pixels).chunk(2)
    cond = backbone.encode_prompts(batch["prompt"])
    return {"latents_w": latents_w, "latents_l": latents_l, **{f"cond.{k}": v for k, v in cond.items()}}


def conditioning(batch):
    return {key.removeprefix("cond."): value for key, value in batch.items() if key.startswith("cond.")}


def rank_batches(num_pairs, batch_size, rank, world_size, seed, epoch):
    """This rank's batches of indices for one epoch: a DistributedSampler permutation, deterministic in (seed,
    epoch), every rank the same number of full batches."""
    sampler = torch.utils.data.DistributedSampler(range(num_pairs), world_size, rank, shuffle=True, seed=seed,
                                                  drop_last=True)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[i:i + batch_size] for i in range(0, len(indices) - batch_size + 1, batch_size)]


def pair_batches(dataset, batch_size, rank, world_size, seed, start=0, workers=0):
    """Endless (epoch, batch) of this rank from micro-batch number `start` on: a run resumed at step k reads
    exactly what a straight run reads after k."""
    batches_per_epoch = len(rank_batches(len(dataset), batch_size, rank, world_size, seed, 0))
    epoch, position = divmod(start, batches_per_epoch)
    while True:
        dataset.epoch = epoch  # before the loader starts, so that worker copies see it
        batches = rank_batches(len(dataset), batch_size, rank, world_size, seed, epoch)[position:]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=workers,
                                             pin_memory=torch.cuda.is_available())
        for batch in loader:
            yield epoch, batch
        epoch, position = epoch + 1, 0


def open_dataset(source, backbone, pretrained=None, skip_bad=False, flip=False, seed=0, frame_stride=1):
    """A cache (if `source` is one) or the decoded pairs of a manifest or Pick-a-Pic shards, and a Summary."""
    if read_cache_index(source) is not None:
        dataset = CachedPairs(source, backbone, pretrained)
        return dataset, Summary(read=len(dataset))
    pairs, summary = read_pairs(source, skip_bad)
    dataset = PairDataset(pairs, *backbone.resolution, backbone.num_frames, frame_stride, flip, seed)
    if skip_bad:
        drop_bad_pairs(dataset, summary)
    return dataset, summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cache = commands.add_parser("cache", help="encode every pair once into a latent cache")
    cache.add_argument("--model", required=True, help="backbone name (python models.py lists them)")
    cache.add_argument("--pretrained", help="diffusers directory or hub id of the backbone's weights")
    cache.add_argument("--data", required=True, help="a .jsonl manifest or Pick-a-Pic .parquet shard(s)")
    cache.add_argument("--out", required=True, help="directory for the cache")
    cache.add_argument("--skip-bad", action="store_true", help="skip and count bad pairs instead of stopping")
    cache.add_argument("--frame-stride", type=int, default=1, help="take every k-th video frame")
    cache.add_argument("--batch-size", type=int, default=8, help="pairs encoded at once")
    cache.add_argument("--shard-size", type=int, default=1024, help="pairs per safetensors shard")
    cache.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    import models
    import train
    try:
        train.check_numbers(args, dict.fromkeys(("frame_stride", "batch_size", "shard_size"), train.AT_LEAST_1))
        pairs, summary = read_pairs(args.data, args.skip_bad)
        backbone = models.load_backbone(args.model, args.pretrained, device=args.device)
        dataset = PairDataset(pairs, *backbone.resolution, backbone.num_frames, args.frame_stride)
        write_cache(backbone, dataset, args.out, args.pretrained, args.batch_size, args.shard_size, args.skip_bad,
                    summary)
    except ValueError as error:  # DataError and models.ModelError are ValueErrors
        sys.exit(f"error: {error}")
    print(f"cache {args.out}: {summary}")


if __name__ == "__main__":
    main()
