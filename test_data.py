"""data.py: Pick-a-Pic and manifest readers, video frames, the latent cache, and every bad-input message."""
import io
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import data
import models
import launcher
from test_bad_inputs import in_process, ranks_run

ROOT = Path(__file__).parent

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230), "white": (240, 240, 240)}


def image_bytes(colour, size=(40, 24), fmt="JPEG"):
    buffer = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path, colour, size=(40, 24)):
    path.write_bytes(image_bytes(colour, size, "PNG"))
    return path.name


def write_video(path, frames=7, size=(32, 32)):
    """Frame k is uniformly grey at level 20 k, so the frames read back can be identified."""
    video = np.stack([np.full((*size, 3), 20 * k, np.uint8) for k in range(frames)])
    iio.imwrite(path, video, fps=8, codec="libx264", macro_block_size=8)
    return path.name


def mean_colour(pixels):
    return ((pixels.flatten(1).mean(1) + 1) * 127.5).round().tolist()


@pytest.fixture(scope="module")
def sd():
    torch.manual_seed(0)
    return models.load_backbone("tiny-sd1.5")


@pytest.fixture(scope="module")
def wan():
    torch.manual_seed(0)
    return models.load_backbone("tiny-wan2.1-1.3b")


def test_pickapic_is_indexed_from_captions_and_labels_and_read_by_row_group(tmp_path, monkeypatch):
    table = pa.table({
        "caption": ["a", "b", "tie", "a"],
        "jpg_0": [image_bytes("red"), image_bytes("green"), image_bytes("white"), image_bytes("blue")],
        "jpg_1": [image_bytes("blue"), image_bytes("red"), image_bytes("white"), image_bytes("green")],
        "label_0": [1.0, 0.0, 0.5, 1.0],
        "label_1": [0.0, 1.0, 0.5, 0.0],
        "best_image_uid": ["x", "y", "z", "w"],
    })
    pq.write_table(table, tmp_path / "train-0000.parquet", row_group_size=2)
    reads = []
    read_row_group = pq.ParquetFile.read_row_group
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, i, columns=None, **kw: reads.append((i, tuple(columns))) or
                        read_row_group(self, i, columns=columns, **kw))
    pairs, summary = data.read_pairs(tmp_path)
    assert reads == [(0, ("caption", "label_0")), (1, ("caption", "label_0"))], "no image bytes read to index"
    assert summary.read == 3 and summary.skipped == {"ties": 1} and "1 ties" in str(summary)
    assert pairs.prompts == ["a", "b"] and pairs.prompt_ids.tolist() == [0, 1, 0]
    assert [(p.prompt, p.where.split()[-1]) for p in pairs] == [("a", "0"), ("b", "1"), ("a", "3")]
    reads.clear()
    dataset = data.PairDataset(pairs, 16, 16)
    items = [dataset[i] for i in range(3)]
    assert reads == [(0, ("jpg_0", "jpg_1")), (1, ("jpg_0", "jpg_1"))], "one read per row group, in order"
    for item, winner, loser in zip(items, ["red", "red", "blue"], ["blue", "green", "green"]):
        assert np.allclose(mean_colour(item["pixels_w"]), COLOURS[winner], atol=3), winner
        assert np.allclose(mean_colour(item["pixels_l"]), COLOURS[loser], atol=3), loser
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=data.collate)
    from_workers = torch.cat([batch["pixels_w"] for batch in loader])  # each worker reads its own row groups
    assert torch.equal(from_workers, torch.stack([item["pixels_w"] for item in items]))
    assert len(data.read_pairs(tmp_path, keep_ties=True)[0]) == 4


def test_manifest_of_images_resizes_centre_crops_and_keeps_extra_fields(tmp_path):
    write_image(tmp_path / "a.png", "red")
    write_image(tmp_path / "b.png", "blue", size=(24, 40))
    (tmp_path / "sub").mkdir()
    write_image(tmp_path / "sub" / "c.png", "green")
    rows = [{"prompt": "p1", "chosen": "a.png", "rejected": "b.png", "score": 0.7},
            {"prompt": "p2", "chosen": "sub/c.png", "rejected": "a.png"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pairs, summary = data.read_pairs(tmp_path / "pairs.jsonl")
    assert [p.prompt for p in pairs] == ["p1", "p2"] and pairs[0].extra == {"score": 0.7}
    assert set(pairs.columns) == {"offset", "line", "prompt"}, "an index of the lines, not the rows"
    item = data.PairDataset(pairs, 32, 32)[1]
    assert item["pixels_w"].shape == (3, 32, 32) and -1 <= item["pixels_w"].min() <= item["pixels_w"].max() <= 1
    assert np.allclose(mean_colour(item["pixels_w"]), COLOURS["green"], atol=2)
    assert np.allclose(mean_colour(item["pixels_l"]), COLOURS["red"], atol=2)


def test_flip_is_identical_for_both_members_and_deterministic(tmp_path):
    left_white = np.zeros((16, 16, 3), np.uint8)
    left_white[:, :8] = 255
    Image.fromarray(left_white).save(tmp_path / "a.png")
    Image.fromarray(left_white).save(tmp_path / "b.png")
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"prompt": str(i), "chosen": "a.png",
                                                            "rejected": "b.png"}) for i in range(16)))
    pairs, _ = data.read_pairs(tmp_path / "m.jsonl")
    dataset = data.PairDataset(pairs, 16, 16, flip=True, seed=3)
    flipped = []
    for i in range(16):
        item = dataset[i]
        assert torch.equal(item["pixels_w"], item["pixels_l"])
        flipped.append(item["pixels_w"][0, 0, 0].item() < 0)
        assert torch.equal(item["pixels_w"], dataset[i]["pixels_w"])
    assert 0 < sum(flipped) < 16


def test_manifest_of_videos_takes_frames_at_the_stride(tmp_path, wan):
    write_video(tmp_path / "a.mp4", frames=12)
    write_video(tmp_path / "b.mp4", frames=12)
    (tmp_path / "v.jsonl").write_text(json.dumps({"prompt": "a video", "chosen": "a.mp4", "rejected": "b.mp4"}))
    pairs, _ = data.read_pairs(tmp_path / "v.jsonl")
    item = data.PairDataset(pairs, *wan.resolution, wan.num_frames, frame_stride=2)[0]
    assert item["pixels_w"].shape == (3, 5, 32, 32)
    levels = [(item["pixels_w"][:, f].mean().item() + 1) * 127.5 for f in range(5)]
    assert np.allclose(levels, [0, 40, 80, 120, 160], atol=6), levels


def test_cache_stores_each_prompt_once_and_round_trips_the_tensors_of_on_the_fly_encoding(tmp_path, sd, wan):
    for backbone, media in ((sd, "png"), (wan, "mp4")):
        folder = tmp_path / backbone.name
        folder.mkdir()
        rows = []
        for i, colour in enumerate(["red", "green", "blue", "red"]):
            if media == "png":
                names = write_image(folder / f"w{i}.png", colour), write_image(folder / f"l{i}.png", "white")
            else:
                names = write_video(folder / f"w{i}.mp4", 5 + i), write_video(folder / f"l{i}.mp4", 6)
            rows.append({"prompt": f"a {colour} thing", "chosen": names[0], "rejected": names[1]})
        (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        dataset, _ = data.open_dataset(folder / "m.jsonl", backbone)
        index = data.write_cache(backbone, dataset, folder / "cache", batch_size=3, shard_size=2)
        assert index["pairs"] == 4 and index["prompts"] == 3
        assert [s["prompts"] for s in index["prompt_shards"]] == [2, 1] and len(index["shards"]) == 2
        cached, _ = data.open_dataset(folder / "cache", backbone)
        on_the_fly = data.encode_batch(backbone, data.collate([dataset[i] for i in range(4)]))
        from_cache = data.encode_batch(backbone, data.collate([cached[i] for i in range(4)]))
        assert on_the_fly.keys() == from_cache.keys()
        for key in on_the_fly:
            assert from_cache[key].dtype == torch.float32
            assert torch.allclose(on_the_fly[key], from_cache[key], atol=1e-6), key
        assert torch.equal(from_cache["cond.prompt_embeds"][0], from_cache["cond.prompt_embeds"][3])
        files = sorted(p.name for p in (folder / "cache").iterdir())
        assert files == ["cache.json", "prompts-00000.safetensors", "prompts-00001.safetensors",
                         "settings.json", "shard-00000.safetensors", "shard-00001.safetensors", "written-by.json"]


def test_bf16_cache_holds_bf16_latents_and_embeddings_and_reads_them_as_fp32(tmp_path):
    sdxl = models.load_backbone("tiny-sdxl")
    write_image(tmp_path / "a.png", "red")
    (tmp_path / "m.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "a.png", "rejected": "a.png"}))
    dataset, _ = data.open_dataset(tmp_path / "m.jsonl", sdxl)
    data.write_cache(sdxl, dataset, tmp_path / "cache", latent_dtype=torch.bfloat16)
    with safe_open(tmp_path / "cache" / "shard-00000.safetensors", "pt") as shard:
        assert shard.get_tensor("latents_w").dtype == torch.bfloat16
    with safe_open(tmp_path / "cache" / "prompts-00000.safetensors", "pt") as prompts:
        dtypes = {key: prompts.get_tensor(key).dtype for key in prompts.keys()}
    assert dtypes == {"cond.prompt_embeds": torch.bfloat16, "cond.pooled_embeds": torch.bfloat16,
                      "cond.time_ids": torch.float32}, "time ids (32, 32, 0, 0, 32, 32) stay exact"
    on_the_fly = data.encode_batch(sdxl, data.collate([dataset[0]]))
    cached = data.CachedPairs(tmp_path / "cache", sdxl)[0]
    for key, value in on_the_fly.items():
        assert cached[key].dtype == torch.float32
        assert torch.allclose(cached[key], value[0], rtol=1e-2, atol=1e-2), key  # bf16: 8 bits of mantissa
    assert torch.equal(cached["cond.time_ids"], on_the_fly["cond.time_ids"][0])


def test_cache_refuses_another_backbone_an_unfinished_cache_and_an_older_format(tmp_path, sd):
    write_image(tmp_path / "a.png", "red")
    (tmp_path / "m.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "a.png", "rejected": "a.png"}) + "\n" +
                                      json.dumps({"prompt": "y", "chosen": "a.png", "rejected": "gone.png"}))
    with pytest.raises(data.DataError, match="row 2: rejected file .*gone.png does not exist"):
        data.read_pairs(tmp_path / "m.jsonl")
    pairs, _ = data.read_pairs(tmp_path / "m.jsonl", skip_bad=True)
    data.write_cache(sd, data.PairDataset(pairs, *sd.resolution), tmp_path / "cache")
    sdxl = models.load_backbone("tiny-sdxl")
    with pytest.raises(data.DataError, match="cache was made with model='tiny-sd1.5', but this run has "
                                             "model='tiny-sdxl'"):
        data.CachedPairs(tmp_path / "cache", sdxl)
    # an interrupted rerun: the first shards are written, then a pair fails; what it wrote is not a finished cache,
    # and the old cache is still whole
    before = data.CachedPairs(tmp_path / "cache", sd)[0]
    (tmp_path / "b.png").write_bytes(b"\x89PNG broken")
    broken = [pairs[0], pairs[0], data.Pair("z", tmp_path / "a.png", tmp_path / "b.png", "m.jsonl row 3")]
    with pytest.raises(data.DataError, match="row 3: .*b.png cannot be decoded"):
        data.write_cache(sd, data.PairDataset(broken, *sd.resolution), tmp_path / "cache", batch_size=1,
                         shard_size=1, rebuild=True)
    assert (tmp_path / "cache.tmp" / "shard-00001.safetensors").exists()
    with pytest.raises(data.DataError, match="not a finished latent cache"):
        data.CachedPairs(tmp_path / "cache.tmp", sd)
    after = data.CachedPairs(tmp_path / "cache", sd)
    assert len(after) == 1 and all(torch.equal(before[k], after[0][k]) for k in before)
    # its finished shards are kept: a rerun is refused, --resume with other settings too; a directory that is not a
    # cache is never written over
    with pytest.raises(data.DataError, match="cache.tmp holds 4 finished shards of an interrupted run; continue it "
                                             "with --resume"):
        data.write_cache(sd, data.PairDataset(broken[:2], *sd.resolution), tmp_path / "cache")
    with pytest.raises(data.DataError, match="--resume: .*cache.tmp was made with source_pairs=3, but this run has "
                                             "source_pairs=2"):
        data.write_cache(sd, data.PairDataset(broken[:2], *sd.resolution), tmp_path / "cache", resume=True)
    # the corrected pairs start again with --rebuild, which the interrupted run's shards no longer block
    data.write_cache(sd, data.PairDataset(broken[:2], *sd.resolution), tmp_path / "cache", rebuild=True)
    assert len(data.CachedPairs(tmp_path / "cache", sd)) == 2 and not (tmp_path / "cache.tmp").exists()
    with pytest.raises(data.DataError, match=f"--out {tmp_path}: exists and is not a latent cache"):
        data.write_cache(sd, data.PairDataset(broken[:2], *sd.resolution), tmp_path)
    # a cache of the format before prompt de-duplication is refused with the command that rebuilds it
    index = json.loads((tmp_path / "cache" / "cache.json").read_text())
    (tmp_path / "cache" / "cache.json").write_text(json.dumps({k: v for k, v in index.items() if k != "format"}))
    with pytest.raises(data.DataError, match=r"cache: a latent cache of an older format \(the conditioning stored "
                                             r"with every pair\); rebuild it: python data.py cache --model tiny-sd1.5 "
                                             r"--data PAIRS --out \S*cache$"):
        data.open_dataset(tmp_path / "cache", sd)


def cache_args(pairs, *args):
    return ["cache", "--model", "tiny-sd1.5", "--pretrained", pairs.parent / "base", "--data", pairs,
            "--shard-size", 2, "--batch-size", 2, *args]


def cache_signalled_at_third_shard(args, signum):
    """data.py cache that sends its own process `signum` as it starts the third pair shard."""
    encode, calls = data.encode_pairs, []

    def encode_pairs(*pairs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signum)
        return encode(*pairs)

    data.encode_pairs = encode_pairs
    data.main(args)


def cache_killed_at_third_shard(args):
    cache_signalled_at_third_shard(args, signal.SIGKILL)


def cache_interrupted_at_third_shard(args):  # Ctrl-C
    cache_signalled_at_third_shard(args, signal.SIGINT)


def test_a_killed_cache_resumes_from_its_finished_shards_without_encoding_them_again(tmp_path, cache_pairs):
    """SIGKILL while the third pair shard is being encoded; --resume encodes only what is missing, and the cache is
    the one a run that was never interrupted writes."""
    args = [str(arg) for arg in cache_args(cache_pairs, "--out", tmp_path / "cache")]
    killed = launcher.finish(launcher.launch(args, log=tmp_path / "log", entry=cache_killed_at_third_shard))
    assert killed == -signal.SIGKILL
    tmp = tmp_path / "cache.tmp"
    finished = {p.name: p.stat().st_mtime_ns for p in tmp.glob("*.safetensors")}
    assert sorted(finished) == ["prompts-00000.safetensors", "prompts-00001.safetensors", "shard-00000.safetensors",
                                "shard-00001.safetensors"] and not (tmp_path / "cache").exists()
    refused = in_process(data.main, args)
    assert refused.returncode == 1 and "holds 4 finished shards" in refused.stderr
    resumed = in_process(data.main, args + ["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert re.search(r"caching tiny-sd1.5: 100%\S+ 2/2 ", resumed.stderr), "only shard 2's two pairs are encoded"
    assert {name: (tmp_path / "cache" / name).stat().st_mtime_ns for name in finished} == finished
    assert not list((tmp_path / "cache").glob("*.partial")) and not (tmp_path / "cache.tmp").exists()
    straight = in_process(data.main, cache_args(cache_pairs, "--out", tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert_same_cache(tmp_path / "cache", tmp_path / "straight")


def assert_same_cache(one, other):
    first, second = data.CachedPairs(one), data.CachedPairs(other)
    assert len(first) == len(second) == 6
    for i in range(6):
        a, b = first[i], second[i]
        assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6) for k in a), i


@pytest.fixture(scope="module")
def cache_pairs(tmp_path_factory, sd):
    """6 pairs, 3 distinct prompts, in a folder with the weights of tiny-sd1.5 (base/): every process that caches
    them encodes with the same VAE and text encoder."""
    folder = tmp_path_factory.mktemp("cache_pairs")
    sd.pipe.save_pretrained(folder / "base")
    rows = [{"prompt": f"a {colour} thing", "chosen": write_image(folder / f"w{i}.png", colour),
             "rejected": write_image(folder / f"l{i}.png", "white")}
            for i, colour in enumerate(["red", "green", "blue", "red", "green", "blue"])]
    (folder / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder / "m.jsonl"


def test_two_ranks_cache_what_one_process_caches_and_train_on_it(tmp_path, cache_pairs):
    """torchrun --nproc_per_node 2 data.py cache (gloo), then 2 ranks of train.py on that cache."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cache = cache_args(cache_pairs, "--out", tmp_path / "two")
    two = subprocess.run(torchrun + [str(ROOT / "data.py"), *map(str, cache)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("cache ") == 1 and "6 pairs, 3 distinct prompts" in two.stdout
    one = in_process(data.main, cache_args(cache_pairs, "--out", tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    assert_same_cache(tmp_path / "two", tmp_path / "one")
    train = ["--model", "tiny-sd1.5", "--pretrained", cache_pairs.parent / "base", "--data", tmp_path / "two",
             "--out", tmp_path / "run", "--steps", 2, "--batch-size", 1, "--no-export"]
    trained = ranks_run(2, train)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2


def bad_manifest(tmp_path, wan_backbone):
    """One good pair and one pair for each kind of bad input."""
    write_image(tmp_path / "ok.png", "red")
    write_video(tmp_path / "ok.mp4", 8)
    write_video(tmp_path / "short.mp4", 3)
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all")
    rows = [
        {"prompt": "good", "chosen": "ok.mp4", "rejected": "ok.mp4"},
        {"prompt": "missing file", "chosen": "ok.mp4", "rejected": "nowhere.mp4"},
        {"prompt": "no rejected", "chosen": "ok.mp4"},
        {"prompt": "corrupt image", "chosen": "corrupt.png", "rejected": "ok.png"},
        {"prompt": "corrupt video", "chosen": "ok.mp4", "rejected": "corrupt.mp4"},
        {"prompt": "short video", "chosen": "short.mp4", "rejected": "ok.mp4"},
        {"prompt": "sizes differ", "chosen": "ok.png", "rejected": "ok.mp4"},
    ]
    text = "\n".join(json.dumps(r) for r in rows) + "\n{not json\n"
    text += json.dumps({"prompt": None, "chosen": "ok.mp4", "rejected": "ok.mp4"}) + "\n"
    text += json.dumps({"prompt": "a list", "chosen": ["ok.mp4"], "rejected": "ok.mp4"}) + "\n"
    (tmp_path / "bad.jsonl").write_bytes(text.encode() + b'{"prompt": "caf\xe9", "chosen": "ok.mp4"}\n')
    return tmp_path / "bad.jsonl"


@pytest.mark.parametrize("row,message", [
    (2, r"row 2: rejected file \S*nowhere.mp4 does not exist"),
    (3, r"row 3: missing required field 'rejected'"),
    (4, r"row 4: \S*corrupt.png cannot be decoded"),
    (5, r"row 5: \S*corrupt.mp4 cannot be decoded"),
    (6, r"row 6: \S*short.mp4 has too few frames \(3 at stride 1, needs 5\)"),
    (7, r"row 7: \S*ok.png is an image, but this backbone takes videos of 5 frames"),
    (8, r"row 8: not valid JSON"),
    (9, r"row 9: prompt is null, not a string"),
    (10, r"row 10: chosen is a list, not a string"),
    (11, r"row 11: not UTF-8 text"),
])
def test_each_bad_input_names_its_row_and_file(tmp_path, wan, row, message):
    manifest = bad_manifest(tmp_path, wan)
    lines = manifest.read_bytes().splitlines()
    manifest.write_bytes(lines[0] + b"\n" + b"\n" * (row - 2) + lines[row - 1] + b"\n")
    with pytest.raises(data.DataError, match=message) as info:
        dataset, _ = data.open_dataset(manifest, wan)
        dataset[1]
    assert "\n" not in str(info.value) and str(manifest) in str(info.value)


def test_skip_bad_counts_bad_rows_when_indexing_and_passes_over_bad_media_when_reached(tmp_path, wan):
    dataset, summary = data.open_dataset(bad_manifest(tmp_path, wan), wan, skip_bad=True)
    assert summary.skipped == {"does not exist": 1, "missing required field": 1, "not valid JSON": 1,
                               "not a string": 2, "not UTF-8": 1}
    assert len(dataset) == 5 and summary.read == 5  # rows 1, 4, 5, 6, 7: their media are decoded when reached
    items = [dataset[i] for i in range(5)]
    assert [int(item["index"]) for item in items] == [0, 0, 0, 0, 0], "each bad pair gives way to the next good one"
    assert [int(item["skipped"]) for item in items] == [0, 4, 3, 2, 1]


def test_empty_dataset_and_unknown_sources_fail_clearly(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(data.DataError, match="empty.jsonl: empty dataset"):
        data.read_pairs(tmp_path / "empty.jsonl")
    with pytest.raises(data.DataError, match="no \\*.parquet shards and no cache.json"):
        data.read_pairs(tmp_path)
    with pytest.raises(data.DataError, match="pairs.csv: expected a .jsonl manifest"):
        data.read_pairs(tmp_path / "pairs.csv")
    (tmp_path / "x.parquet").write_bytes(b"PAR1 nonsense")
    with pytest.raises(data.DataError, match="x.parquet: not a Pick-a-Pic v2 parquet shard"):
        data.read_pairs(tmp_path / "x.parquet")


def test_rank_batches_are_deterministic_disjoint_and_equal_in_number():
    epoch0 = [data.rank_batches(23, 4, rank, 2, seed=5, epoch=0) for rank in range(2)]
    assert epoch0 == [data.rank_batches(23, 4, rank, 2, seed=5, epoch=0) for rank in range(2)]
    assert len(epoch0[0]) == len(epoch0[1]) == 2
    flat = [i for batches in epoch0 for batch in batches for i in batch]
    assert len(flat) == len(set(flat)) == 16
    assert data.rank_batches(23, 4, 0, 2, seed=5, epoch=1) != epoch0[0]


def test_cache_command_line(tmp_path, capsys):
    write_image(tmp_path / "a.png", "red")
    (tmp_path / "m.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "a.png", "rejected": "a.png"}) + "\n" +
                                      json.dumps({"prompt": "y", "chosen": "a.png"}))
    argv = ["cache", "--model", "tiny-sd1.5", "--data", str(tmp_path / "m.jsonl"), "--out", str(tmp_path / "c")]
    with pytest.raises(SystemExit, match="1"):
        data.main(argv)
    assert re.fullmatch(r"error: \S*m.jsonl row 2: missing required field 'rejected'\n", capsys.readouterr().err)
    data.main(argv + ["--skip-bad"])
    assert re.fullmatch(r"cache \S+: 1 pairs, 1 distinct prompts, [0-9.]+ kB per pair \(float32\), "
                        r"[0-9.]+ kB in all; skipped: 1 missing required field; [0-9.]+ s on 1 rank\(s\)\n",
                        capsys.readouterr().out)
    assert json.loads((tmp_path / "c" / "cache.json").read_text())["pairs"] == 1


@pytest.mark.parametrize("mode,fmt", [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGB", "JPEG"),
                                      ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("I", "TIFF"),
                                      ("F", "TIFF")])
def test_every_pil_mode_decodes_to_its_grey_level(mode, fmt):
    """A mid-grey image (black for mode 1, which has no grey) in each mode decodes to that grey, not clipped: a
    16-bit PNG read through convert("RGB") alone comes out white."""
    import io
    if mode in ("I;16", "I", "F"):  # 16-bit and float greys, built directly in the mode
        image = Image.new(mode, (8, 8), {"I;16": 32768, "I": 32768, "F": 0.5}[mode])
    else:
        image = Image.new("L", (8, 8), 0 if mode == "1" else 128).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    pixels = data.load_media(buffer.getvalue(), "row 1", 8, 8)
    expected = -1.0 if mode == "1" else 0.0
    assert pixels.shape == (3, 8, 8)
    assert abs(pixels.mean().item() - expected) < 0.03, (mode, pixels.mean().item())


def test_ctrl_c_ends_a_cache_in_one_line_and_resume_continues_it(tmp_path, cache_pairs):
    args = [str(arg) for arg in cache_args(cache_pairs, "--out", tmp_path / "cache")]
    status = launcher.finish(launcher.launch(args, log=tmp_path / "log", entry=cache_interrupted_at_third_shard))
    lines = [line for line in (tmp_path / "log").read_text().splitlines() if line.strip() and "%|" not in line]
    assert status == 1 and lines == [f"error: interrupted: {tmp_path / 'cache'}.tmp keeps the shards finished so "
                                     f"far; continue with --resume"], lines
    resumed = in_process(data.main, args + ["--resume"])
    assert resumed.returncode == 0 and "6 pairs" in resumed.stdout, resumed.stderr[-2000:]
