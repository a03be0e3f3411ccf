"""Preference pairs (prompt, chosen, rejected) for images and video, and a latent cache.

Sources `--data` may name:
  *.parquet or a directory of them   Pick-a-Pic v2 shards: caption, jpg_0, jpg_1, label_0 in {1, 0, 0.5}
  *.jsonl                            a manifest: {"prompt", "chosen", "rejected", ...}, paths relative to it
  a directory with cache.json        a latent cache written by `python data.py cache`

    python data.py cache --model NAME [--pretrained PATH] --data SRC --out DIR [--skip-bad] [--resume]
    torchrun --nproc_per_node N data.py cache ...     every rank encodes its share of the shards

This is the only file that knows file formats.
"""
import argparse
import codecs
import datetime
import io
import json
import os
import re
import shutil
import signal
import sys
import time
import uuid
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import models
from common import (AT_LEAST_1, NON_NEGATIVE, ArgumentParser, add_size_flags, check_numbers, check_output,
                    check_regular_file, fail, leave, rank_and_world, setup_distributed, take_lock, torch_device,
                    write_text_atomically, writing)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
VIDEO_SUFFIXES = {".mp4", ".webm", ".gif"}
CACHE_INDEX = "cache.json"


class DataError(ValueError):
    """Bad input; the message is one line naming the row and the file."""


class ShardError(DataError):
    """A bad pair met while a rank encodes its shards: only that rank knows it (the other errors every rank meets)."""


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

    def reasons(self):
        return ", ".join(f"{n} {why}" for why, n in self.skipped.most_common()) or "none"

    def __str__(self):
        return f"{self.read} pairs read; skipped: {self.reasons()}"


# ---------------------------------------------------------------------------------------------------------
# Readers: an index of the pairs (numpy columns plus the distinct prompts); media are read when a pair is accessed
# ---------------------------------------------------------------------------------------------------------

class PairIndex:
    """Pairs as a few numpy columns and the distinct prompts, one Pair built on access: memory is a few bytes a
    pair plus the prompts, whatever the size of the data (docs/data.md, figure 8).
    `prompt_ids[i]` indexes `prompts`, the de-duplicated table the latent cache stores once."""

    def __init__(self, files, columns, prompts):
        self.files, self.prompts = files, prompts
        self.columns = {key: np.asarray(values) for key, values in columns.items()}
        self.prompt_ids = self.columns["prompt"]

    def __len__(self):
        return len(self.prompt_ids)


class PickapicIndex(PairIndex):
    """Pick-a-Pic v2 rows: (shard, row group, row) and the label; the two images' bytes are read on access, one row
    group at a time, and that row group is kept until a pair of another is asked for (a sequential reader reads each
    once; memory is one row group per DataLoader worker, not the shards)."""

    def __init__(self, files, columns, prompts):
        super().__init__(files, columns, prompts)
        self.loaded = {}  # the row group read last: {"key": (shard, group), "images": its two image columns}

    def __getstate__(self):  # DataLoader workers read row groups of their own
        return {**self.__dict__, "loaded": {}}

    def __getitem__(self, i):
        shard, group, row, file_row = (int(self.columns[key][i]) for key in ("shard", "group", "row", "file_row"))
        where = f"{self.files[shard]} row {file_row}"
        if self.loaded.get("key") != (shard, group):
            self.loaded.clear()  # the previous row group's bytes go before the next is read
            try:
                parquet = pq.ParquetFile(self.files[shard])
                self.loaded["images"] = parquet.read_row_group(group, columns=["jpg_0", "jpg_1"])
            except Exception as error:  # pyarrow raises several types for truncated and corrupt files
                raise DataError(f"{where}: image bytes cannot be read ({str(error).splitlines()[0][:120]})") from None
            self.loaded["key"] = (shard, group)
        jpg_0, jpg_1 = (self.loaded["images"].column(name)[row].as_py() for name in ("jpg_0", "jpg_1"))
        for name, image in (("jpg_0", jpg_0), ("jpg_1", jpg_1)):
            if not isinstance(image, bytes):
                raise DataError(f"{where}: {name} is {_json_type(image)}, not image bytes")
        label = float(self.columns["label"][i])
        chosen, rejected = (jpg_1, jpg_0) if label == 0 else (jpg_0, jpg_1)  # a kept tie: jpg_0 first
        return Pair(self.prompts[self.prompt_ids[i]], chosen, rejected, where, {"label_0": label})


class ManifestIndex(PairIndex):
    """JSONL rows: the byte offset of each valid line; the line is read again and parsed on access (the file is
    opened each time: a handle shared with forked DataLoader workers would share its position)."""

    def __init__(self, files, columns, prompts):
        super().__init__(files, columns, prompts)
        self.indexed = _identity(files[0])

    def __getitem__(self, i):
        offset, line = int(self.columns["offset"][i]), int(self.columns["line"][i])
        path = self.files[0]
        if _identity(path) != self.indexed:  # a stat: the offsets are only good for the file they were read from
            raise DataError(f"{path} row {line}: the manifest changed after it was indexed; restart the run (or "
                            f"--resume) to index it again")
        with open(path, "rb") as manifest:
            manifest.seek(offset)
            row = json.loads(manifest.readline())
        extra = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
        return Pair(row["prompt"], path.parent / row["chosen"], path.parent / row["rejected"], f"{path} row {line}",
                    extra)


def read_pickapic(paths, summary, keep_ties=False, skip_bad=False):
    """Pick-a-Pic v2 shards indexed from their captions and labels alone (the image columns are not read); ties
    (label_0 = 0.5) dropped and counted unless keep_ties; winners first on access."""
    columns = {key: array("i") for key in ("shard", "group", "row", "file_row", "prompt")}
    columns["label"] = array("f")
    prompts = {}
    for shard, path in enumerate(tqdm(paths, desc="indexing parquet", disable=len(paths) < 2)):
        try:
            parquet = pq.ParquetFile(path)
            missing = {"caption", "jpg_0", "jpg_1", "label_0"} - set(parquet.schema_arrow.names)
            if missing:
                raise ValueError(f"no column {sorted(missing)[0]}")
            for name in ("jpg_0", "jpg_1"):  # Pick-a-Pic stores the images' bytes; strings would be opened as paths
                kind = parquet.schema_arrow.field(name).type
                if not (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
                    raise ValueError(f"column {name} holds {kind}, not image bytes")
            groups = [parquet.read_row_group(g, columns=["caption", "label_0"]) for g in range(parquet.num_row_groups)]
        except Exception as error:  # pyarrow raises several types for missing columns and corrupt files
            raise DataError(f"{path}: not a Pick-a-Pic v2 parquet shard ({str(error).splitlines()[0]})") from None
        group_start = 0
        for group, table in enumerate(groups):
            captions, labels = table.column("caption").to_pylist(), table.column("label_0").to_pylist()
            for row, (caption, label) in enumerate(zip(captions, labels)):
                where = f"{path} row {group_start + row}"
                try:
                    if label not in (0, 0.5, 1):
                        raise DataError(f"{where}: label_0 is {label!r}, expected 1, 0 or 0.5")
                    if not isinstance(caption, str):
                        raise DataError(f"{where}: caption is {_json_type(caption)}, not a string")
                except DataError as error:
                    if not skip_bad:
                        raise
                    summary.skipped[_reason(error)] += 1
                    continue
                if label == 0.5 and not keep_ties:
                    summary.skipped["ties"] += 1
                    continue
                values = (shard, group, row, group_start + row, prompts.setdefault(caption, len(prompts)), label)
                for column, value in zip(columns.values(), values):
                    column.append(value)
            group_start += len(captions)
    return PickapicIndex([Path(p) for p in paths], columns, list(prompts))


def _identity(path):
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def read_manifest(path, summary, skip_bad=False):
    """JSON Lines rows {"prompt", "chosen", "rejected", ...}, streamed; missing fields or files fail or are counted.
    Only the offsets of the valid lines and the distinct prompts are kept."""
    path = Path(path)
    columns, prompts, offset = {"offset": array("q"), "line": array("i"), "prompt": array("i")}, {}, 0
    with open(path, "rb") as manifest:
        for number, raw in enumerate(manifest, start=1):
            start, offset = offset, offset + len(raw)
            if number == 1 and raw.startswith(codecs.BOM_UTF8):  # editors write one; it is not part of the row
                start, raw = start + len(codecs.BOM_UTF8), raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                continue
            try:
                row = _check_row(raw, path, f"{path} row {number}")
            except DataError as error:
                if not skip_bad:
                    raise
                summary.skipped[_reason(error)] += 1
                continue
            for key, value in zip(columns, (start, number, prompts.setdefault(row["prompt"], len(prompts)))):
                columns[key].append(value)
    return ManifestIndex([path], columns, list(prompts))


def _check_row(raw, path, where):
    """A manifest line parsed and checked: a JSON object whose prompt, chosen and rejected are strings naming
    existing image or video files (relative to the manifest)."""
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
    for key in ("chosen", "rejected"):
        file = path.parent / row[key]
        try:
            exists = file.is_file()
        except OSError as error:  # a name too long for the filesystem, a path through a file, ...
            raise DataError(f"{where}: {key} path cannot be used ({error.strerror})") from None
        if not exists and file.exists():  # a FIFO, a device, a folder: is_file() is False for them too
            regular(file, f"{where}: {key} file")
        if not exists:
            raise DataError(f"{where}: {key} file {file} does not exist")
        if file.suffix.lower() not in IMAGE_SUFFIXES | VIDEO_SUFFIXES:
            raise DataError(f"{where}: {key} file {file} is not an image or video "
                            f"({', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))})")
    return row


def _json_type(value):
    return "null" if value is None else {bool: "a boolean", int: "a number", float: "a number", list: "a list",
                                          dict: "an object"}.get(type(value), type(value).__name__)


def _reason(error):
    text = str(error)
    for reason in ("missing required field", "does not exist", "not an image or video", "not valid JSON",
                   "not UTF-8", "not a string", "cannot be decoded", "cannot be read", "cannot be used",
                   "too few frames", "is an image", "differ in size"):
        if reason in text:
            return reason
    return "bad input"


def regular(path, what):
    """common.check_regular_file as a DataError: `what` (a shard, a manifest, a row's file) is a regular file."""
    try:
        return check_regular_file(path, what)
    except ValueError as error:
        raise DataError(str(error)) from None


def read_pairs(source, skip_bad=False, keep_ties=False):
    """The pairs in `source` (a manifest or Pick-a-Pic parquet) as a PairIndex, and a Summary of what was read and
    skipped. Rows are checked here as far as that needs no decoding; media are decoded when a pair is accessed."""
    source = Path(source)
    summary = Summary()
    if source.is_dir():
        shards = sorted(source.glob("*.parquet"))
        if not shards:
            raise DataError(f"{source}: no *.parquet shards and no {CACHE_INDEX} in this directory")
        pairs = read_pickapic([regular(shard, "shard") for shard in shards], summary, keep_ties, skip_bad)
    elif source.suffix == ".parquet":
        pairs = read_pickapic([regular(source, "shard")], summary, keep_ties, skip_bad)
    elif source.suffix == ".jsonl":
        pairs = read_manifest(regular(source, "manifest"), summary, skip_bad)
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


def save_media(folder, name, sample):
    """An image (3, H, W) as PNG, or a video (F, 3, H, W) as MP4 (8 fps), from [0, 1]: the file name."""
    pixels = (sample.clamp(0, 1) * 255).round().to(torch.uint8)
    if sample.dim() == 3:
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"{name}.png")
        return f"{name}.png"
    iio.imwrite(folder / f"{name}.mp4", pixels.permute(0, 2, 3, 1).numpy(), fps=8, codec="libx264",
                macro_block_size=8)
    return f"{name}.mp4"



def load_media(source, where, height, width, num_frames=0, frame_stride=1):
    """An image (3, H, W) or, for video backbones, a video (3, F, H, W), in [-1, 1]."""
    is_video = isinstance(source, Path) and source.suffix.lower() in VIDEO_SUFFIXES
    try:
        if not is_video:
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            image.load()
            image = ImageOps.exif_transpose(image)  # a phone's photo is stored sideways with an EXIF orientation
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
    """Decodes pairs on access; the random flip is the same for both members of a pair. Under skip_bad a pair that
    cannot be decoded is passed over for the next good one and counted in the item's "skipped": batches keep their
    size, and a resumed run meets the same substitutes."""

    def __init__(self, pairs, height, width, num_frames=0, frame_stride=1, flip=False, seed=0, skip_bad=False):
        self.pairs, self.size, self.num_frames, self.frame_stride = pairs, (height, width), num_frames, frame_stride
        self.flip, self.seed, self.epoch, self.skip_bad = flip, seed, 0, skip_bad

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        for skipped in range(len(self)):
            try:
                return {**self.decode((index + skipped) % len(self)), "skipped": torch.tensor(skipped)}
            except DataError:
                if not self.skip_bad:
                    raise
        raise DataError(f"no pair of the {len(self)} can be decoded")

    def decode(self, index):
        """The pair at `index` as pixels; a bad one raises DataError naming its row."""
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


# ---------------------------------------------------------------------------------------------------------
# The latent cache: safetensors shards plus cache.json, written into DIR.tmp and renamed to DIR when finished.
# Pair shard k holds pairs [k S, (k + 1) S): two latents and a prompt id each; prompt shard j holds the
# conditioning of distinct prompts [j S, (j + 1) S). Shard k of either kind is written by rank k % world_size.
# ---------------------------------------------------------------------------------------------------------

CACHE_FORMAT = 2  # format 1 stored the conditioning again with every pair
IN_PROGRESS, SETTINGS, OWNER = "in-progress.lock", "settings.json", "written-by.json"
CACHE_FILE = re.compile(r"(shard|prompts)-\d{5}\.safetensors(\.partial)?")


class CacheComplete(Exception):
    """--out already holds this very cache, finished: nothing to do unless asked to rebuild it."""


def owner_record(directory):
    """The cache id that data.py cache wrote into DIR/written-by.json when it made DIR, or None."""
    try:
        record = json.loads((Path(directory) / OWNER).read_text())
    except (OSError, ValueError):
        return None
    return record.get("cache") if isinstance(record, dict) and record.get("by") == "data.py cache" else None


def foreign_entry(directory):
    """The first entry of `directory` that data.py cache does not write (None: every entry is one of its own)."""
    ours = {CACHE_INDEX, SETTINGS, IN_PROGRESS, OWNER}
    return next((p.name for p in sorted(Path(directory).iterdir())
                 if not (p.is_file() and (p.name.removesuffix(".tmp") in ours or CACHE_FILE.fullmatch(p.name)))), None)


def provably_ours(directory):
    """True only for a directory this program made (its written-by.json names a cache) that holds nothing else:
    the one kind of directory data.py cache ever removes."""
    directory = Path(directory)
    return directory.is_dir() and owner_record(directory) is not None and foreign_entry(directory) is None


def remove_ours(directory):
    if not provably_ours(directory):
        raise DataError(f"{directory}: holds files data.py cache did not write; it is left as it is")
    shutil.rmtree(directory)


def cache_identity(backbone, pretrained):
    if pretrained is not None and Path(pretrained).exists():
        pretrained = str(Path(pretrained).resolve())
    return {"model": backbone.name, "pretrained": pretrained, "resolution": list(backbone.resolution),
            "num_frames": backbone.num_frames}


def default_shard_size(backbone):
    """Pairs (or prompts) per shard: shards of a few hundred MB at native size (an SDXL pair is 0.5 MB, a Wan pair
    17 MB), so that a shard in the making fits in host memory on every rank."""
    return 32 if backbone.is_video else 1024


def distinct_prompts(pairs):
    """(prompts, prompt id of each pair): a PairIndex has them; a plain list of Pairs is de-duplicated here."""
    if isinstance(pairs, PairIndex):
        return pairs.prompts, pairs.prompt_ids
    ids = {}
    prompt_ids = np.array([ids.setdefault(pair.prompt, len(ids)) for pair in pairs])
    return list(ids), prompt_ids


@torch.no_grad()
def write_cache(backbone, dataset, out, pretrained=None, batch_size=8, shard_size=None, skip_bad=False,
                latent_dtype=torch.float32, resume=False, workers=0, summary=None, rebuild=False):
    """Encodes every pair's two latents with the backbone's VAE and every distinct prompt once with its text
    encoder(s), and returns the cache's index (None on ranks other than 0). Shards are written into `out`.tmp, each
    complete or not at all; `out`.tmp replaces `out` when all are written, so an interrupted run leaves no cache that
    a reader would take as complete, and an older cache in `out` stays readable until then. `resume` keeps the
    shards an interrupted run with the same settings finished; a finished cache of the same settings in `out` is
    left alone (CacheComplete) unless `rebuild`. Under torchrun every rank writes its share."""
    started = time.perf_counter()
    rank, world_size = rank_and_world()
    final = Path(out)
    tmp = final.with_name(final.name + ".tmp")
    prompts, prompt_ids = distinct_prompts(dataset.pairs)
    shard_size = shard_size or default_shard_size(backbone)
    settings = {**cache_identity(backbone, pretrained), "format": CACHE_FORMAT,
                "source": [str(Path(f).resolve()) for f in getattr(dataset.pairs, "files", [])],
                "source_pairs": len(dataset), "prompts": len(prompts), "shard_size": shard_size,
                "latent_dtype": str(latent_dtype).removeprefix("torch."), "frame_stride": dataset.frame_stride,
                "encoder_dtype": str(backbone.pipe.text_encoder.dtype).removeprefix("torch.")}
    shards = {"prompts": -(-len(prompts) // shard_size), "shard": -(-len(dataset) // shard_size)}  # how many
    names = [shard_file(kind, number) for kind, count in shards.items() for number in range(count)]
    plan, lock = [None, None], None
    if rank == 0:  # alone: the other ranks would see DIR.tmp half-claimed
        try:
            lock, cache_id = claim_cache_tmp(tmp, final, settings, resume, rebuild)
            plan = [{kind: [n for n in range(count) if not (tmp / shard_file(kind, n)).is_file()]
                     for kind, count in shards.items()}, cache_id]
        except (DataError, CacheComplete) as error:
            plan = [error, None]
    if dist.is_initialized():
        dist.broadcast_object_list(plan)
    if isinstance(plan[0], Exception):
        raise plan[0]
    cache_id = plan[1]
    mine = {kind: numbers[rank::world_size] for kind, numbers in plan[0].items()}  # each kind spread over the ranks

    def span(number):  # the pairs of pair shard `number`
        return range(number * shard_size, min((number + 1) * shard_size, len(dataset)))

    # a context: an error ends the bar's line first
    with tqdm(total=sum(len(span(n)) for n in mine["shard"]), unit="pair", disable=rank != 0,
              desc=f"caching {backbone.name}" + (f" (rank 0 of {world_size})" if world_size > 1 else "")) as progress:
        for kind, number in [(kind, n) for kind, numbers in mine.items() for n in numbers]:
            if kind == "prompts":
                first = number * shard_size
                tensors, metadata = encode_prompts(backbone, prompts[first:first + shard_size], batch_size,
                                                   latent_dtype), {}
            else:
                try:
                    tensors, metadata = encode_pairs(backbone, dataset, prompt_ids, span(number), batch_size,
                                                     skip_bad, latent_dtype, workers, progress)
                except DataError as error:
                    raise ShardError(str(error)) from None
            name = shard_file(kind, number)
            with writing(tmp / f"{name}.partial"):
                save_file(tensors, tmp / f"{name}.partial", {**metadata, "cache": cache_id, "file": name})
            os.replace(tmp / f"{name}.partial", tmp / name)  # a shard that exists is complete
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        return None
    index = finish_cache(tmp, final, {**settings, "id": cache_id}, names, summary or Summary(),
                         {"seconds": time.perf_counter() - started, "ranks": world_size})
    lock.close()
    return index


def shard_file(kind, number):
    return f"{kind}-{number:05d}.safetensors"


def encode_prompts(backbone, prompts, batch_size, dtype):
    """The conditioning of `prompts`, stacked; embeddings in `dtype`, exact small vectors (SDXL's time ids) fp32."""
    parts = [backbone.encode_prompts(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    return {f"cond.{key}": torch.cat([part[key] for part in parts]).to(dtype if key.endswith("embeds") else
                                                                       torch.float32).cpu().contiguous()
            for key in parts[0]}


class _Decoded(torch.utils.data.Dataset):
    """The cache writer's view of a PairDataset: under skip_bad a bad pair comes back as the reason it is bad, so
    that a DataLoader worker hands it on instead of raising, and the shard leaves it out."""

    def __init__(self, dataset, skip_bad):
        self.dataset, self.skip_bad = dataset, skip_bad

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset.decode(index)
        except DataError as error:
            if not self.skip_bad:
                raise
            return _reason(error)


def encode_pairs(backbone, dataset, prompt_ids, span, batch_size, skip_bad, dtype, workers, progress):
    """One pair shard: the latents of the pairs in `span` (winners and losers encoded together) and their prompt
    ids; metadata counts the bad pairs left out."""
    loader = torch.utils.data.DataLoader(_Decoded(dataset, skip_bad), batch_size=batch_size, sampler=span,
                                         collate_fn=list, num_workers=workers)
    parts, skipped = [], Counter()
    for items in loader:
        good = [item for item in items if isinstance(item, dict)]
        skipped.update(item for item in items if isinstance(item, str))
        if good:
            batch = collate(good)
            latents_w, latents_l = (latents.to(dtype).cpu() for latents in encode_latents(backbone, batch))
            parts.append({"latents_w": latents_w, "latents_l": latents_l,
                          "prompt": torch.from_numpy(prompt_ids[batch["index"].numpy()]).long()})
        progress.update(len(items))
    tensors = {key: torch.cat([part[key] for part in parts]).contiguous() for key in parts[0]} if parts else {}
    return tensors, {"skipped": json.dumps(skipped)}


def finish_cache(tmp, final, settings, names, summary, run):
    """Writes the index of the finished shards into DIR.tmp and swaps DIR.tmp in as DIR."""
    shards, prompt_shards, skipped = [], [], Counter(summary.skipped)
    for name in names:
        with safe_open(tmp / name, framework="pt") as handle:
            count = handle.get_slice(next(iter(handle.keys()))).get_shape()[0] if handle.keys() else 0
            size = (tmp / name).stat().st_size
            if name.startswith("prompts-"):
                prompt_shards.append({"file": name, "prompts": count, "bytes": size})
                continue
            skipped.update(json.loads(handle.metadata()["skipped"]))
        if count:
            shards.append({"file": name, "pairs": count, "bytes": size})
    pairs = sum(shard["pairs"] for shard in shards)
    summary.skipped, summary.read = skipped, pairs
    if not pairs:
        raise DataError(f"empty dataset after skipping bad pairs ({summary})")
    index = {**settings, "pairs": pairs, "shards": shards, "prompt_shards": prompt_shards, "skipped": dict(skipped),
             "bytes": sum((tmp / name).stat().st_size for name in names), "this_run": run}
    write_text_atomically(tmp / CACHE_INDEX, json.dumps(index, indent=1))
    old = final.with_name(final.name + ".old")
    if old.exists():  # a cache of ours, left by a swap that was interrupted (claim_cache_tmp checked it)
        remove_ours(old)
    if final.exists() and any(final.iterdir()):
        os.replace(final, old)  # provably ours: claim_cache_tmp refused anything else
    (tmp / IN_PROGRESS).unlink()
    os.replace(tmp, final)
    if old.exists():
        remove_ours(old)
    return index


def claim_cache_tmp(tmp, final, settings, resume, rebuild=False):
    """Makes DIR.tmp, marked as ours (written-by.json) and locked while this process writes: (lock, cache id). An
    interrupted run's DIR.tmp (ours, nobody holding its lock) is continued under `resume` if it was made with the
    same settings, refused if it holds finished shards and neither `resume` nor `rebuild` is on, and otherwise
    replaced. DIR and DIR.old
    must be new, empty or caches of ours; a finished cache of the same settings in DIR is CacheComplete unless
    `rebuild`. Anything data.py cache did not write is refused in one line, never deleted."""
    if final.exists() and not final.is_dir():
        raise DataError(f"--out {final}: exists and is not a latent cache; choose an empty or new directory")
    if final.is_dir() and any(final.iterdir()):
        if owner_record(final) is None:
            raise DataError(f"--out {final}: exists and is not a latent cache written by data.py cache (no "
                            f"{OWNER}); choose an empty or new directory")
        foreign = foreign_entry(final)
        if foreign is not None:
            raise DataError(f"--out {final}: holds {foreign}, which data.py cache did not write; move it away or "
                            f"choose another --out")
    old = final.with_name(final.name + ".old")
    if old.exists() and not provably_ours(old):
        raise DataError(f"--out {final}: {old} exists and is not a cache of ours; move it away or choose another --out")
    if tmp.exists():
        if not provably_ours(tmp):
            raise DataError(f"--out {final}: {tmp} exists and was not made by data.py cache alone; move it away or "
                            f"choose another --out")
        lock, holder = take_lock(tmp / IN_PROGRESS, "data.py cache")
        if lock is None:
            raise DataError(f"--out {final}: being written by {holder}; wait for it to end")
        finished = list(tmp.glob("*.safetensors"))
        if finished and not resume and not rebuild:
            lock.close()
            raise DataError(f"--out {final}: {tmp} holds {len(finished)} finished shards of an interrupted run; "
                            f"continue it with --resume, or start again with --rebuild")
        if finished and resume:
            made_with = json.loads((tmp / SETTINGS).read_text()) if (tmp / SETTINGS).is_file() else {}
            for key, value in settings.items():
                if made_with.get(key) != value:
                    lock.close()
                    raise DataError(f"--resume: {tmp} was made with {key}={made_with.get(key)!r}, but this run has "
                                    f"{key}={value!r}; rerun with its settings, or start again with --rebuild")
            for partial in tmp.glob("*.partial"):  # a shard the interrupted run was writing
                partial.unlink()
            return lock, owner_record(tmp)
        lock.close()
        remove_ours(tmp)
    made = read_cache_index(final) if (final / CACHE_INDEX).is_file() else None
    if made is not None and not rebuild:
        changed = next((k for k, v in settings.items() if made.get(k) != v), None)
        if changed is None:
            raise CacheComplete(f"cache {final} is complete ({made['pairs']:,} pairs, the same settings); pass "
                                f"--rebuild to encode it again")
        raise DataError(f"--out {final}: holds a finished cache made with {changed}={made.get(changed)!r}, but this "
                        f"run has {changed}={settings[changed]!r}; pass --rebuild to replace it")
    cache_id = uuid.uuid4().hex
    tmp.mkdir(parents=True)
    write_text_atomically(tmp / OWNER, json.dumps({"by": "data.py cache", "cache": cache_id}))
    lock = take_lock(tmp / IN_PROGRESS, "data.py cache")[0]
    write_text_atomically(tmp / SETTINGS, json.dumps(settings, indent=1))
    return lock, cache_id


class CachedPairs(torch.utils.data.Dataset):
    """Reads a finished cache lazily (memory-mapped safetensors), as fp32 tensors whatever dtype it stores; refuses
    one made by another backbone."""

    def __init__(self, directory, backbone=None, pretrained=None):
        self.directory = Path(directory)
        self.index = read_cache_index(directory)
        if self.index is None:
            raise DataError(f"{directory}: not a finished latent cache (no {CACHE_INDEX})")
        if backbone is not None:
            check_cache_matches(self.index, directory, backbone, pretrained)
        check_index(self.index, self.directory / CACHE_INDEX)
        self.files = [shard["file"] for shard in self.index["shards"]]
        self.prompt_files = [shard["file"] for shard in self.index["prompt_shards"]]
        self.counts = {**{s["file"]: s["pairs"] for s in self.index["shards"]},
                       **{s["file"]: s["prompts"] for s in self.index["prompt_shards"]}}
        for shard in self.index["shards"] + self.index["prompt_shards"]:  # a stat each: cheap, at open
            path = self.directory / shard["file"]
            size = path.stat().st_size if path.is_file() else None
            if size is None or "bytes" in shard and size != shard["bytes"]:
                raise DataError(f"{path}: " + ("missing" if size is None else f"{size:,} bytes, but {CACHE_INDEX} "
                                f"says {shard['bytes']:,} (cut short or replaced)") + "; rebuild the cache")
        self.offsets = np.cumsum([0] + [shard["pairs"] for shard in self.index["shards"]])
        self.handles = {}
        self.epoch = 0
        if backbone is not None and self.files:  # the index's size against what its shards hold
            stored = tuple(self.handle(self.files[0]).get_slice("latents_w").get_shape()[1:])
            if stored != tuple(backbone.latent_shape()):
                raise DataError(f"{self.directory / CACHE_INDEX}: says {self.index.get('resolution')} pixels and "
                                f"{self.index.get('num_frames')} frames, but its latents are {list(stored)}, not "
                                f"{list(backbone.latent_shape())} (an edited or damaged index); rebuild the cache")

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, index):
        shard = int(np.searchsorted(self.offsets, index, side="right") - 1)
        pairs, row = self.handle(self.files[shard]), index - int(self.offsets[shard])
        prompt = int(pairs.get_slice("prompt")[row:row + 1][0])
        prompts, prompt_row = self.handle(self.prompt_files[prompt // self.index["shard_size"]]), \
            prompt % self.index["shard_size"]
        item = {key: pairs.get_slice(key)[row:row + 1][0].float() for key in ("latents_w", "latents_l")}
        item.update({key: prompts.get_slice(key)[prompt_row:prompt_row + 1][0].float() for key in prompts.keys()})
        return {**item, "index": torch.tensor(index)}

    def handle(self, name):
        """The shard, opened once and checked once: it must be this cache's own (its metadata names the cache's id,
        so a shard copied from another cache is refused) and hold as many rows as the index says."""
        if name not in self.handles:
            path = self.directory / name
            try:
                handle = safe_open(path, framework="pt")
                metadata, keys = handle.metadata() or {}, list(handle.keys())
                rows = handle.get_slice(keys[0]).get_shape()[0] if keys else 0
            except Exception as error:  # noqa: BLE001 -- safetensors raises several types for a damaged file
                raise DataError(f"{path}: not a readable safetensors shard ({str(error).splitlines()[0][:100]}); "
                                f"rebuild the cache") from None
            if "id" in self.index and (metadata.get("cache"), metadata.get("file")) != (self.index["id"], name):
                raise DataError(f"{path}: a shard of another cache (its metadata names cache {metadata.get('cache')!r} "
                                f"and file {metadata.get('file')!r}); rebuild the cache")
            if rows != self.counts[name]:
                raise DataError(f"{path}: {rows} rows, but {CACHE_INDEX} says {self.counts[name]}; rebuild the cache")
            self.handles[name] = handle
        return self.handles[name]

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
    """The index of a finished cache, or None when `directory` is not a cache (checked before building models);
    a cache of the older format is refused with the command that rebuilds it."""
    index = Path(directory) / CACHE_INDEX
    if not index.is_file():
        return None
    try:
        made = json.loads(index.read_text())
    except (ValueError, OSError):
        raise DataError(f"{index}: unreadable cache index; rebuild the cache with data.py cache") from None
    if not isinstance(made, dict):
        raise DataError(f"{index}: {_json_type(made)}, not a cache index; rebuild the cache with data.py cache")
    if made.get("format") != CACHE_FORMAT:
        raise DataError(f"{directory}: a latent cache of an older format (the conditioning stored with every pair); "
                        f"rebuild it: python data.py cache --model {made.get('model')} --data PAIRS --out {directory}")
    return made


def check_index(made, index):
    """The index's own consistency: its shard lists are lists of {file, count}, and the pairs it states are the
    pairs its shards hold."""
    for key, count in (("shards", "pairs"), ("prompt_shards", "prompts")):
        listed = made.get(key)
        if not isinstance(listed, list) or not all(isinstance(s, dict) and isinstance(s.get("file"), str) and
                                                    isinstance(s.get(count), int) for s in listed):
            raise DataError(f"{index}: '{key}' is missing or not a list of {{file, {count}}}; rebuild the cache")
    for key in ("pairs", "shard_size"):
        if not isinstance(made.get(key), int) or made[key] < 1:
            raise DataError(f"{index}: '{key}' is missing or not a positive number; rebuild the cache")
    held = sum(shard["pairs"] for shard in made["shards"])
    if held != made["pairs"]:
        raise DataError(f"{index}: states {made['pairs']:,} pairs, but its shards hold {held:,}; rebuild the cache")


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
    device = backbone.device
    if "latents_w" in batch:
        return {key: value.to(device, non_blocking=True) for key, value in batch.items()
                if key not in ("index", "skipped")}
    latents_w, latents_l = encode_latents(backbone, batch)
    cond = backbone.encode_prompts(batch["prompt"])
    return {"latents_w": latents_w, "latents_l": latents_l, **{f"cond.{k}": v for k, v in cond.items()}}


def encode_latents(backbone, batch):
    """The latents of a batch's winners and losers, encoded together."""
    pixels = torch.cat([batch["pixels_w"], batch["pixels_l"]]).to(backbone.device)
    return backbone.encode_pixels(pixels).chunk(2)


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


class PairStream(torch.utils.data.Dataset):
    """The pairs as one endless stream: position p is pair perm_e[p mod N] of epoch e = p // N, each epoch's order a
    permutation seeded by (seed, epoch) (DistributedSampler's). A run's data position is a position in it, counted
    in pairs, so that how the pairs are split (ranks, --batch-size, --grad-accum) does not change which pairs an
    optimizer step reads: a resume on other ranks reads what the straight run would. Items carry their epoch."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.order = dataset, seed, (None, None)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, position):
        epoch, offset = divmod(position, len(self.dataset))
        if self.order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self.order = epoch, torch.randperm(len(self.dataset), generator=generator).tolist()
        self.dataset.epoch = epoch  # PairDataset's flip is drawn per (seed, epoch, pair)
        return {**self.dataset[self.order[1][offset]], "epoch": torch.tensor(epoch)}


def pair_batches(dataset, batch_size, rank, world_size, seed, start=0, workers=0):
    """Endless batches of this rank from stream position `start` (pairs read by all ranks before) on: each global
    micro-batch is the next batch_size x world_size positions, rank r taking its r-th slice."""
    def positions():
        first = start
        while True:
            yield list(range(first + rank * batch_size, first + (rank + 1) * batch_size))
            first += batch_size * world_size
    yield from torch.utils.data.DataLoader(PairStream(dataset, seed), batch_sampler=positions(), collate_fn=collate,
                                           num_workers=workers, pin_memory=torch.cuda.is_available())


def open_dataset(source, backbone, pretrained=None, skip_bad=False, flip=False, seed=0, frame_stride=1):
    """A cache (if `source` is one) or the decoded pairs of a manifest or Pick-a-Pic shards, and a Summary."""
    if read_cache_index(source) is not None:
        dataset = CachedPairs(source, backbone, pretrained)
        return dataset, Summary(read=len(dataset))
    pairs, summary = read_pairs(source, skip_bad)
    return PairDataset(pairs, *backbone.resolution, backbone.num_frames, frame_stride, flip, seed, skip_bad), summary


def size(count):
    """Bytes as a person reads them: 8.6 kB, 17 MB, 126 GB."""
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000:
            return f"{count:.3g} {unit}"
        count /= 1000
    return f"{count:.3g} TB"


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    cache = commands.add_parser("cache", help="encode every pair once into a latent cache")
    cache.add_argument("--model", required=True, help="backbone name (python models.py lists them)")
    cache.add_argument("--pretrained", help="diffusers directory or hub id of the backbone's weights")
    cache.add_argument("--data", required=True, help="a .jsonl manifest or Pick-a-Pic .parquet shard(s)")
    cache.add_argument("--out", required=True, help="directory for the cache")
    cache.add_argument("--random-weights", action="store_true",
                       help="full-size architecture with random weights (benchmarks at native size, offline)")
    cache.add_argument("--resume", action="store_true", help="continue an interrupted cache from its finished shards")
    cache.add_argument("--rebuild", action="store_true", help="encode again a cache that --out already holds")
    cache.add_argument("--skip-bad", action="store_true", help="skip and count bad pairs instead of stopping")
    cache.add_argument("--frame-stride", type=int, default=1, help="take every k-th video frame")
    cache.add_argument("--batch-size", type=int, default=8, help="pairs encoded at once")
    cache.add_argument("--shard-size", type=int, help="pairs (and prompts) per shard (default 1024, videos 32)")
    add_size_flags(cache)
    cache.add_argument("--precision", choices=("bf16", "fp32"),
                       help="dtype the VAE and text encoders compute in (default: bf16 on GPU, fp32 on CPU)")
    cache.add_argument("--latent-dtype", choices=("fp32", "bf16"),
                       help="dtype of the stored latents and prompt embeddings (default bf16 on GPU, fp32 on CPU)")
    cache.add_argument("--workers", type=int, help="DataLoader workers decoding media (default 4 on GPU, 0 on CPU)")
    cache.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                       help="one process; under torchrun each rank takes its own GPU")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))  # torchrun's; one process is rank 0
    # SIGTERM (a scheduler's preemption) ends the run as Ctrl-C does: finished shards stay, --resume continues.
    # Both set here: a process forked by a server that ignores SIGINT would otherwise inherit that
    before = {signum: signal.signal(signum, signal.default_int_handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        check_numbers(args, {"frame_stride": AT_LEAST_1, "batch_size": AT_LEAST_1, "shard_size": AT_LEAST_1,
                             "workers": NON_NEGATIVE})
        check_output(args.out)  # before every pair is encoded
        if read_cache_index(args.data) is not None:
            raise DataError(f"--data {args.data}: is a latent cache already; data.py cache reads pairs (a .jsonl "
                            f"manifest or Pick-a-Pic .parquet shards)")
        device = setup_distributed(timeout=datetime.timedelta(hours=4))[0] if "RANK" in os.environ \
            else torch.device(args.device)
        gpu = device.type == "cuda"
        latent_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.latent_dtype or ("bf16" if gpu else "fp32")]
        pairs, summary = read_pairs(args.data, args.skip_bad)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision or ("bf16" if gpu else "fp32")]
        backbone = models.load_backbone(args.model, args.pretrained, device=device, dtype=dtype,
                                        random_weights=args.random_weights, only="frozen")
        backbone.resize(args.resolution, args.frames)
        dataset = PairDataset(pairs, *backbone.resolution, backbone.num_frames, args.frame_stride)
        index = write_cache(backbone, dataset, args.out, args.pretrained, args.batch_size, args.shard_size,
                            args.skip_bad, latent_dtype, args.resume, 4 if args.workers is None and gpu else
                            args.workers or 0, summary, args.rebuild)
    except CacheComplete as complete:
        if rank == 0:
            print(complete)
        return
    except KeyboardInterrupt:
        if rank == 0:
            fail(f"interrupted: {args.out}.tmp keeps the shards finished so far; continue with --resume")
        sys.exit(1)
    except (ValueError, OSError) as error:  # DataError and models.ModelError are ValueErrors; a full disk
        if rank == 0 or isinstance(error, (ShardError, OSError)):  # said once; torchrun then ends the other ranks
            fail(error, f" ({args.out}.tmp keeps the shards finished so far: continue with --resume)"
                 if isinstance(error, OSError) else "")
        sys.exit(1)
    except RuntimeError as error:  # a rank waiting in a collective when another failed, out of memory, ...
        fail(error)
        sys.exit(1)
    finally:
        leave()
        for signum, handler in before.items():  # main() may run inside another program (the tests do)
            signal.signal(signum, handler)
    if rank == 0:
        print(f"cache {args.out}: {index['pairs']:,} pairs, {index['prompts']:,} distinct prompts, "
              f"{size(index['bytes'] / index['pairs'])} per pair ({index['latent_dtype']}), "
              f"{size(index['bytes'])} in all; skipped: {Summary(skipped=Counter(index['skipped'])).reasons()}; "
              f"{index['this_run']['seconds']:.1f} s on {index['this_run']['ranks']} rank(s)")


if __name__ == "__main__":
    main()
