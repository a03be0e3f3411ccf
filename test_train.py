"""train.py on CPU (gloo): multi-rank runs (launcher.py; torchrun itself for two nodes), exact resume, SIGKILL and
SIGTERM, LoRA, bad flags."""
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image
from safetensors.torch import load_file

import bench
import data
import evaluate
import models
import launcher
import online
import train
import rundir
from rundir import RunDir
from test_bad_inputs import in_process, ranks_run

ROOT = Path(__file__).parent


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """16 image pairs: a saturated colour preferred to a grey version of it."""
    folder = tmp_path_factory.mktemp("pairs")
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(16):
        colour = tuple(int(c) for c in torch.randint(0, 256, (3,), generator=generator))
        grey = (sum(colour) // 3,) * 3
        Image.new("RGB", (32, 32), colour).save(folder / f"w{i}.png")
        Image.new("RGB", (32, 32), grey).save(folder / f"l{i}.png")
        rows.append({"prompt": f"colour {i % 4}", "chosen": f"w{i}.png", "rejected": f"l{i}.png"})
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder / "pairs.jsonl"


@pytest.fixture(scope="module")
def video_pairs(tmp_path_factory):
    import imageio.v3 as iio
    import numpy as np
    folder = tmp_path_factory.mktemp("videos")
    rows = []
    for i in range(4):
        frames = np.stack([np.full((32, 32, 3), 25 * k + 10 * i, np.uint8) for k in range(9)])  # CogVideoX: 9
        iio.imwrite(folder / f"w{i}.mp4", frames, fps=8, codec="libx264", macro_block_size=8)
        iio.imwrite(folder / f"l{i}.mp4", frames[::-1].copy(), fps=8, codec="libx264", macro_block_size=8)
        rows.append({"prompt": "rising light", "chosen": f"w{i}.mp4", "rejected": f"l{i}.mp4"})
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder / "pairs.jsonl"


def run(ranks, *args, check=True):
    """train.py on `ranks` ranks (launcher.py: torchrun's variables; torchrun itself runs in two_nodes, 4 s of
    imports a rank), or with 0 as `python train.py` does, in this process."""
    result = ranks_run(ranks, args) if ranks else in_process(train.main, args)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def weights(out):
    folder = Path(out) / "model"
    name = "unet" if (folder / "unet").exists() else "transformer"
    return load_file(next((folder / name).glob("*.safetensors")))


COMMON = ["--warmup", "0", "--lr", "1e-4", "--checkpoint-every", "2", "--tau", "0.3", "--temperature", "0.2"]


@pytest.fixture(scope="module")
def straight(pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    run(2, "--model", "tiny-sd1.5", "--data", pairs, "--out", out, "--steps", 6, "--batch-size", 2, *COMMON)
    return out


def test_two_ranks_train_and_export_a_loadable_pipeline(straight):
    records = log(straight)
    assert [r["step"] for r in records] == list(range(1, 7))
    for record in records:
        assert all(math.isfinite(v) for v in record.values())
        assert 0 <= record["accuracy"] <= 1 and record["pairs_per_s"] > 0 and record["peak_memory_gb"] > 0
    assert any(0 < r["mask_fraction"] < 1 for r in records), "the test must exercise a partial mask"
    assert records[-1]["grad_norm"] > 0
    backbone = models.load_backbone("tiny-sd1.5", pretrained=str(straight / "model"))
    sample = backbone.sample(["colour 1"], steps=2)
    assert torch.isfinite(sample).all()
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step-000004", "step-000006"]


@pytest.mark.parametrize("name", ["tiny-wan2.1-1.3b", "tiny-cogvideox-2b", "tiny-flux.1-dev"])
def test_transformer_backbones_on_two_ranks_match_one_process(pairs, video_pairs, tmp_path, name):
    """Full fine-tuning under FSDP2: the video transformers return a view (their unpatchify reshape), on which
    FSDP2 warns that an in-place op would drop its pre-backward hook. Nothing modifies it in place, so the gradients
    are one process's (the loss, the gradient norm and the weights after a step); train.py silences the warning.
    FLUX shards its double- and single-stream blocks."""
    data = pairs if "flux" in name else video_pairs
    common = ["--model", name, "--data", data, "--steps", 1, "--loss", "dpo", "--beta", 50, "--warmup", 0]
    run(0, *common, "--out", tmp_path / "one", "--batch-size", 4)
    result = run(2, *common, "--out", tmp_path / "two", "--batch-size", 2)
    assert "returned a view tensor" not in result.stderr
    one, two = log(tmp_path / "one")[0], log(tmp_path / "two")[0]
    assert math.isfinite(one["loss"]) and one["grad_norm"] > 0
    for key in ("loss", "grad_norm", "err_policy_w", "err_policy_l"):
        assert two[key] == pytest.approx(one[key], rel=3e-5, abs=1e-7), key
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-4 + 1e-6
    if name.startswith("tiny-wan"):
        backbone = models.load_backbone(name, pretrained=str(tmp_path / "two" / "model"))
        assert backbone.sample(["rising light"], steps=2).shape == (1, 5, 3, 32, 32)


def test_resume_is_bit_exact(pairs, straight, tmp_path):
    """The straight run as it was after step 4's checkpoint, resumed: the same weights and losses, bit for bit."""
    out = tmp_path / "run"
    shutil.copytree(straight, out, ignore=shutil.ignore_patterns("step-000006", "model"))
    run(2, "--model", "tiny-sd1.5", "--data", pairs, "--out", out, "--batch-size", 2, *COMMON, "--steps", 6, "--resume")
    resumed, reference = weights(out), weights(straight)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert [r["loss"] for r in log(out)] == [r["loss"] for r in log(straight)]


def test_sigkill_mid_run_resumes_from_the_last_complete_checkpoint(pairs, straight, tmp_path):
    out = tmp_path / "run"
    args = ["--model", "tiny-sd1.5", "--data", pairs, "--out", out, "--batch-size", 2, *COMMON]
    ranks = launcher.launch([*args, "--steps", 400], 2, log=tmp_path / "log")
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-000004").exists() and time.time() < deadline:
        time.sleep(0.05)
    for pid in ranks.pids():  # as the OOM killer or a lost node would: every rank at once
        os.kill(pid, signal.SIGKILL)
    assert launcher.finish(ranks) == -signal.SIGKILL
    done = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.endswith(".tmp"))
    assert done and done[-1] >= "step-000004" and len(log(out)) < 400
    steps = 6 if done[-1] <= "step-000006" else int(done[-1][5:]) + 2
    run(2, *args, "--steps", steps, "--resume")
    assert [r["step"] for r in log(out)] == list(range(1, steps + 1)), "each step logged once, none lost"
    if done[-1] <= "step-000006":
        assert all(torch.equal(a, b) for a, b in zip(weights(out).values(), weights(straight).values()))


def two_nodes(*args):
    """train.py on two torchrun 'nodes' of one process each, meeting through c10d rendezvous on 127.0.0.1."""
    endpoint = f"127.0.0.1:{launcher.free_port()}"
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                               "--node_rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                               "--rdzv-id", "sipo-test", str(ROOT / "train.py"), *map(str, args)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # as torchrun sets for 2 ranks a node
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), outputs[0][1][-3000:] + outputs[1][1][-3000:]


def test_two_nodes_train_and_resume_exactly_like_one_node(pairs, tmp_path):
    """Two nodes of one rank each use hybrid sharding by default (replicate over the nodes, shard within): the same
    mesh and global batch as one node of two ranks with --replicate 2, so bit-exact. What the two nodes saved at step
    2 (their shards meet in one checkpoint on the shared filesystem) resumes on one node, which then computes steps 3
    and 4 bit for bit as the nodes did."""
    args = ["--model", "tiny-sd1.5", "--data", pairs, "--batch-size", 2, *COMMON]
    nodes, one_node = tmp_path / "two-nodes", tmp_path / "one-node"
    two_nodes(*args, "--out", nodes, "--steps", 4)
    assert json.loads((nodes / "args.json").read_text())["world_size"] == 2
    shutil.copytree(nodes, one_node, ignore=shutil.ignore_patterns("step-000004", "model"))
    run(2, *args, "--out", one_node, "--steps", 4, "--replicate", 2, "--resume")
    assert [r["step"] for r in log(one_node)] == [1, 2, 3, 4]
    assert [r["loss"] for r in log(one_node)][2:] == [r["loss"] for r in log(nodes)][2:]
    assert all(torch.equal(a, b) for a, b in zip(weights(one_node).values(), weights(nodes).values()))


def test_checkpoints_reshard_between_hybrid_sharding_and_one_process(pairs, tmp_path):
    """4 ranks saved as 2 x 2 (--replicate 2: each weight sharded in 2 and the halves replicated twice) resume in
    one process, and that run's checkpoint resumes as 2 x 2 again: DCP reshards the model and optimizer both ways (and
    from plain FSDP: test_checkpoints_move_between_placements). The first step after resuming starts from the saved
    state, so its loss equals the one the saving layout computed at that step, to the float noise of 4 ranks against
    1 process (2.9e-5 measured; another state moves it by 2% to 10%); later steps differ only by reduction order."""
    args = ["--model", "tiny-sd1.5", "--data", pairs, *COMMON, "--no-export"]
    hybrid, alone, back = tmp_path / "hybrid", tmp_path / "alone", tmp_path / "back"
    run(4, *args, "--out", hybrid, "--steps", 4, "--batch-size", 1, "--replicate", 2)
    shutil.copytree(hybrid, alone, ignore=shutil.ignore_patterns("step-000004"))
    run(0, *args, "--out", alone, "--steps", 6, "--batch-size", 4, "--resume")
    shutil.copytree(alone, back, ignore=shutil.ignore_patterns("step-000006"))
    run(4, *args, "--out", back, "--steps", 6, "--batch-size", 1, "--replicate", 2, "--resume")
    for saved, resumed, first in ((log(hybrid), log(alone), 3), (log(alone), log(back), 5)):
        assert [r["step"] for r in resumed][:first - 1] == list(range(1, first))
        assert resumed[:first - 1] == saved[:first - 1], "the log lines before the checkpoint are kept as written"
        assert resumed[first - 1]["loss"] == pytest.approx(saved[first - 1]["loss"], rel=1e-4)
        assert resumed[first]["loss"] == pytest.approx(saved[first]["loss"], rel=1e-3)
    assert json.loads((back / "args.json").read_text())["parallel"] == "fsdp"


@pytest.mark.parametrize("flags", [["--weight", "step", "--normalise", "after-mask"],
                                   ["--weight", "path", "--normalise", "before-mask"],
                                   ["--lora", 4]], ids=["step-after-mask", "path-before-mask", "lora"])
def test_two_ranks_match_one_rank_on_the_same_global_batch(pairs, tmp_path, flags):
    """One process (no sharding) against two ranks (FSDP2, or for LoRA a replicated base with the adapters'
    gradients averaged) on the same global batch."""
    common = ["--model", "tiny-sd1.5", "--data", pairs, "--steps", 1, *COMMON, *flags]
    run(0, *common, "--out", tmp_path / "one", "--batch-size", 4)
    run(2, *common, "--out", tmp_path / "two", "--batch-size", 2)
    placements = [json.loads((tmp_path / n / "args.json").read_text())["parallel"] for n in ("one", "two")]
    assert placements == ["none", "replicate" if "--lora" in flags else "fsdp"]
    one, two = log(tmp_path / "one")[0], log(tmp_path / "two")[0]
    assert 0 < one["mask_fraction"] < 1, "the global mean weight and count must matter here"
    for key in ("loss", "grad_norm", "accuracy", "mask_fraction", "weight_mean", "err_policy_w"):
        # one process runs 2 threads, each rank 1: the thread count alone moves LoRA's grad norm by 1e-5 (measured)
        assert two[key] == pytest.approx(one[key], rel=3e-5 if key == "grad_norm" else 1e-5, abs=1e-7), key
    # loss and grad_norm above are the strict check: they scale with a wrong world-size factor, while Adam's
    # first step (about lr * sign(g)) does not. Parameters feeding a GroupNorm have a true gradient of 0 whose
    # float noise depends on the reduction order, so Adam moves them by +-lr at random: allow those, and only those.
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max().item() <= 2e-4 + 1e-6 and (diff > 1e-6).float().mean().item() < 0.03


def test_checkpoints_move_between_placements(pairs, straight, tmp_path):
    """DCP checkpoints are placement-free: a full fine-tuning run sharded on 2 ranks resumes in one process
    (DTensor shards into plain tensors), and so does a LoRA run replicated on 2 ranks (each rank's identical copy
    saved once). The first resumed step starts from the saved state, so its loss is the one the saving run logged, to
    the placements' float noise (one process of 2 threads against 2 ranks of 1 thread: 1.4e-5 measured); resuming
    from another state moves it by far more (consecutive steps' losses here differ by 2% to 10%)."""
    args = ["--model", "tiny-sd1.5", "--data", pairs, *COMMON, "--no-export"]
    alone = tmp_path / "alone"
    shutil.copytree(straight, alone, ignore=shutil.ignore_patterns("step-000006", "model"))
    run(0, *args, "--out", alone, "--steps", 5, "--batch-size", 4, "--resume")
    assert log(alone)[4]["loss"] == pytest.approx(log(straight)[4]["loss"], rel=1e-4)
    lora, lora_alone = tmp_path / "lora", tmp_path / "lora-alone"
    args += ["--lora", 4, "--lr", "1e-2"]
    run(2, *args, "--out", lora, "--steps", 3, "--batch-size", 2)
    shutil.copytree(lora, lora_alone, ignore=shutil.ignore_patterns("step-000003"))
    run(0, *args, "--out", lora_alone, "--steps", 3, "--batch-size", 4, "--resume")
    saved, resumed = log(lora), log(lora_alone)
    assert resumed[2]["loss"] == pytest.approx(saved[2]["loss"], rel=1e-4)
    assert abs(saved[2]["loss"] - math.log(2)) > 1e-3, "the adapters have moved: the check has teeth"


def test_lora_reference_is_the_adapter_free_policy_and_exports_merged(pairs, tmp_path):
    out = tmp_path / "lora"
    run(0, "--model", "tiny-sd1.5", "--data", pairs, "--out", out, "--steps", 3, "--loss", "dpo", "--lora", 4,
        "--lr", "1e-2", "--warmup", 0, "--batch-size", 4)
    records = log(out)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6), "LoRA starts as the reference"
    assert records[-1]["loss"] != pytest.approx(math.log(2), abs=1e-6)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()
    merged = models.load_backbone("tiny-sd1.5", pretrained=str(out / "model"))
    assert not any("lora" in name for name, _ in merged.denoiser.named_parameters())
    torch.manual_seed(0)
    base = models.load_backbone("tiny-sd1.5")
    changed = [k for k, v in merged.denoiser.state_dict().items() if not torch.equal(v, base.denoiser.state_dict()[k])]
    assert changed and all(any(p in k for p in ("to_q", "to_k", "to_v", "to_out")) for k in changed)


@pytest.mark.parametrize("name", ["tiny-sd1.5", "tiny-sdxl", "tiny-cogvideox-2b", "tiny-wan2.1-1.3b",
                                  "tiny-flux.1-dev"])
def test_lora_loads_with_diffusers_load_lora_weights_and_matches_the_merged_export(name, pairs, video_pairs,
                                                                                  tmp_path):
    torch.manual_seed(0)
    models.load_backbone(name).pipe.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    run(0, "--model", name, "--pretrained", tmp_path / "base", "--data", video_pairs if "video" in name or "wan" in name
        else pairs, "--out", out, "--steps", 1, "--loss", "dpo", "--lora", 4, "--lr", "1e-2", "--warmup", 0,
        "--batch-size", 2, "--no-gradient-checkpointing")
    assert sorted(p.name for p in (out / "lora").iterdir()) == ["pytorch_lora_weights.safetensors"]
    with_adapter = models.load_backbone(name, pretrained=str(tmp_path / "base"))
    with_adapter.pipe.load_lora_weights(out / "lora")
    part = "unet" if "sd" in name else "transformer"
    assert list(with_adapter.pipe.get_list_adapters()) == [part], "diffusers selects the denoiser's keys"
    merged = models.load_backbone(name, pretrained=str(out / "model"))
    base = models.load_backbone(name, pretrained=str(tmp_path / "base"))
    generator = torch.Generator().manual_seed(1)
    height, width = base.resolution
    frames = (base.num_frames,) if base.is_video else ()
    x0 = base.encode_pixels(torch.rand(2, 3, *frames, height, width, generator=generator) * 2 - 1)
    cond = base.encode_prompts(["a red circle", "a blue square"])
    levels = base.sample_noise_levels(2, generator)
    with torch.no_grad():
        outputs = [b.predict(b.denoiser, x0, levels, cond) for b in (with_adapter, merged, base)]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
    assert (outputs[0] - outputs[2]).abs().max() > 1e-4, "the adapter changes the output"
    if name == "tiny-sd1.5":  # evaluate.py compare takes the LoRA directory: base + adapter = the merged export
        (tmp_path / "prompts.txt").write_text("a red circle\n")
        common = ["compare", "--model", name, "--base", str(tmp_path / "base"), "--prompts",
                  str(tmp_path / "prompts.txt"), "--reward", "named_colour", "--samples", "2", "--steps", "2"]
        via_lora = evaluate.main([*common, "--tuned", str(out / "lora"), "--out", str(tmp_path / "eval-lora")])
        merged = evaluate.main([*common, "--tuned", str(out), "--out", str(tmp_path / "eval-merged")])
        lora_reward, merged_reward = (r["rewards"]["named_colour"]["tuned_mean"] for r in (via_lora, merged))
        assert lora_reward == pytest.approx(merged_reward, abs=1e-4) and via_lora["tuned"] == str(out / "lora")


def test_sigterm_saves_and_exits_cleanly(pairs, tmp_path):
    out = tmp_path / "run"
    args = ["--model", "tiny-sd1.5", "--data", pairs, "--out", out, "--steps", 500, "--checkpoint-every", 1000,
            "--warmup", 0]
    process = launcher.launch(args, log=tmp_path / "stderr")  # `python train.py ARGS`, forked
    deadline = time.time() + 120
    while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text()) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pids()[0], signal.SIGTERM)
    status, stderr = launcher.finish(process), (tmp_path / "stderr").read_text()
    assert status == 0 and "SIGTERM: saved step" in stderr, stderr[-2000:]
    saved = RunDir(out).latest_checkpoint()
    assert saved is not None and int(saved.name[5:]) == len(log(out)) < 500


def test_sigterm_mid_step_gives_the_step_up_and_saves_the_last_one(pairs, tmp_path):
    """A scheduler's SIGKILL follows its SIGTERM within about 30 s, less than one optimizer step of a video model
    with accumulation: the stop is seen before the next micro-batch. Step 2 (200 micro-batches) is under way when
    SIGTERM comes: it is given up, step 1 is saved with the data position at its end, and a resume takes step 2
    whole."""
    out = tmp_path / "run"
    args = ["--model", "tiny-sd1.5", "--data", pairs, "--out", out, "--steps", 3, "--grad-accum", 200,
            "--checkpoint-every", 1000, "--warmup", 0, "--loss", "sft"]
    process = launcher.launch(args, log=tmp_path / "stderr")
    deadline = time.time() + 900  # a step is seconds here, minutes on a machine busy with other tests
    while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text()) and time.time() < deadline:
        time.sleep(0.02)
    os.kill(process.pids()[0], signal.SIGTERM)
    status, stderr = launcher.finish(process), (tmp_path / "stderr").read_text()
    assert status == 0 and "SIGTERM: saved step 1; continue with --resume" in stderr, stderr[-2000:]
    saved = json.loads((RunDir(out).checkpoint(1) / rundir.CHECKPOINT_META).read_text())
    assert len(log(out)) == 1 and saved["pairs_read"] == 200


def test_non_finite_losses_are_skipped_then_stop_the_run(pairs, tmp_path):
    # an absurd learning rate: step 1 is finite, after it the weights (and so every loss) overflow
    result = run(0, "--model", "tiny-sd1.5", "--data", pairs, "--out", tmp_path / "r", "--steps", 5, "--loss", "dpo",
                 "--lr", "1e30", "--warmup", 0, "--max-nonfinite", 2, check=False)
    assert result.returncode == 1
    assert "error: 2 non-finite steps in a row at step 1" in result.stderr


@pytest.mark.parametrize("flags,message", [
    (["--model", "sd2"], "argument --model: invalid choice: 'sd2'"),
    (["--loss", "ppo"], "argument --loss: invalid choice: 'ppo'"),
    (["--global-batch-size", "5", "--batch-size", "2"], "--global-batch-size 5 is not divisible by --batch-size 2 x 2"),
    (["--data", "nowhere.jsonl"], "--data nowhere.jsonl: does not exist"),
    (["--resume"], "holds no run"),
    (["--lora", "0"], "--lora 0: a LoRA rank is at least 1; leave --lora out for full fine-tuning"),
])
def test_bad_flags_fail_before_any_model_is_built(pairs, tmp_path, flags, message, capsys):
    argv = ["--model", "tiny-sd1.5", "--data", str(pairs), "--out", str(tmp_path / "r"), *flags]
    with pytest.raises((SystemExit, ValueError)) as info:
        args = train.parse_args(argv)
        train.check_args(args, world_size=2)
        rundir.check_run_directory(args)
    assert message in (str(info.value) + capsys.readouterr().err)


def test_full_size_model_defaults_to_its_hub_id_and_offline_says_so_in_one_line(pairs, tmp_path):
    result = run(0, "--model", "sd1.5", "--data", pairs, "--out", tmp_path / "r", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "error: stable-diffusion-v1-5/stable-diffusion-v1-5: not a local directory, and the hub id cannot be loaded "
        "(offline, or not cached in full); download it where there is a network (hf download "
        "stable-diffusion-v1-5/stable-diffusion-v1-5 --local-dir DIR) and pass DIR instead of the id"]


def test_cache_of_another_backbone_is_refused_in_one_line(pairs, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cache.json").write_text(json.dumps({"model": "tiny-sdxl", "format": data.CACHE_FORMAT}))
    result = run(0, "--model", "tiny-sd1.5", "--data", tmp_path / "cache", "--out", tmp_path / "r", check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (f"error: --data {tmp_path / 'cache'}: cache was made with "
                                                      "model='tiny-sdxl', not --model tiny-sd1.5")
    assert not (tmp_path / "r").exists(), "nothing is written for a bad flag"


@pytest.fixture
def one_rank_group():
    """A process group of one, in this process (what torchrun --nproc_per_node 1 gives a rank)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{launcher.free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("parallel", ["none", "fsdp"])
@pytest.mark.parametrize("name", ["tiny-sd1.5", "tiny-wan2.1-1.3b"])
def test_bf16_holds_frozen_parts_in_bf16_keeps_fp32_master_weights_and_samples(pairs, video_pairs, name, parallel,
                                                                               tmp_path, request, monkeypatch):
    """bf16 compute over fp32 master weights, in both placements, under autocast. FSDP2: the modules the model
    keeps in fp32 (Wan's time embedder and affine norms) hold fp32 in groups of their own, and the reference holds
    in bf16 exactly the parameters the policy gathers in bf16 (buffers such as Wan's rope tables stay fp32: a
    wholesale cast rounded them, and the reference's errors differed from the policy's at step 0). One process: the
    reference's Linear and Conv weights in bf16, the rest fp32. Either way the time embedder computes in fp32 and
    the reference's per-sample errors at step 0 are the policy's, bit for bit."""
    pairs = video_pairs if "wan" in name else pairs
    if parallel == "fsdp":
        request.getfixturevalue("one_rank_group")
    monkeypatch.setattr(train, "parallelism", lambda args, world_size: parallel)
    (tmp_path / "prompts.txt").write_text("a red circle\na green square\n")
    args = train.parse_args(["--model", name, "--data", str(pairs), "--precision", "bf16", "--beta", "1000",
                             "--tau", "0.3", "--temperature", "0.2", "--eval-prompts", str(tmp_path / "prompts.txt"),
                             "--eval-sample-steps", "2"])
    trainer = train.make_trainer(train.load_backbone(args), args, torch.device("cpu"))
    backbone, policy, reference = trainer.backbone, trainer.policy, trainer.reference
    assert {p.dtype for p in policy.parameters()} == {torch.float32}
    keep = models.fp32_names(reference)
    assert bool(keep) == ("wan" in name)
    linear_or_conv = {id(p) for m in reference.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d,
                                                                           torch.nn.Conv3d)) for p in m.parameters()}
    for key, parameter in reference.named_parameters():
        in_bf16 = not keep.intersection(key.split(".")) and (parallel == "fsdp" or id(parameter) in linear_or_conv)
        assert parameter.dtype == (torch.bfloat16 if in_bf16 else torch.float32), key
    assert {b.dtype for b in reference.buffers() if b.is_floating_point()} <= {torch.float32}
    parts = backbone.frozen_parts()
    assert {p.dtype for p in parts["text_encoder"].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in parts["vae"].parameters()} == {torch.float32 if "wan" in name else torch.bfloat16}
    computed = {}
    if "wan" in name:  # the dtype each layer computes in
        for part, layer in (("time embedder", policy.condition_embedder.time_embedder.linear_1),
                            ("attention", policy.blocks[0].attn1.to_q), ("norm", policy.blocks[0].norm2)):
            layer.register_forward_hook(lambda m, inputs, output, part=part: computed.update({part: output.dtype}))
    dataset, _ = data.open_dataset(pairs, backbone)
    batch = data.collate([dataset[0], dataset[1]])
    with train.mixed_precision(args):
        model_error, ref_error, _ = train.pair_errors(backbone, policy, reference, dict(batch), 0, args)
    assert torch.equal(model_error.detach(), ref_error), "policy = reference in bf16 compute"
    if "wan" in name:  # the time embedder in fp32 under autocast too (models.compute_fp32_under_autocast)
        assert computed == {"time embedder": torch.float32, "attention": torch.bfloat16, "norm": torch.float32}
    loss, stats = train.preference_loss(backbone, policy, reference, batch, 0, args, 1)
    loss.backward()
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert all(torch.isfinite(getattr(p.grad, "full_tensor", lambda: p.grad)()).all() for p in policy.parameters())
    prompts = ["a red circle", "a green square"]
    metrics, samples = train.heldout_metrics(backbone, policy, reference, None, prompts, evaluate.named_colour, args,
                                             0, 1)
    assert math.isfinite(metrics["heldout_reward"]), "samples decode with a bf16 policy and text encoder"
    assert len(samples) == 2
    images = []

    class Writer:  # TensorBoard's SummaryWriter.add_image, recorded
        def add_image(self, tag, array, step, dataformats):
            images.append((tag, array.shape, step, dataformats))

    train.save_samples(tmp_path, 7, samples, prompts, Writer())
    grid = Image.open(tmp_path / "samples" / "step-000007" / "grid.png")
    assert images == [("samples", (grid.height, grid.width, 3), 7, "HWC")]
    rows = min(8, backbone.num_frames) if backbone.is_video else 1  # a row per frame for videos
    assert grid.height == rows * 128 + 52 and grid.width > 2 * 128


def test_sipo_drop_in_in_a_diffusers_style_loop_matches_the_training_step(pairs):
    """docs/method.md §11's drop-in: the loss block of diffusers' DPO example (scheduler.add_noise, the UNet,
    per-sample MSE, winners first) replaced by sipo.preference_objective gives train.py's loss on the same pairs, t
    and noise."""
    import copy
    import sipo
    torch.manual_seed(0)
    backbone = models.load_backbone("tiny-sd1.5")
    policy = backbone.denoiser
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():  # a policy that differs from its reference, so that every term matters
        for parameter in policy.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    dataset, _ = data.open_dataset(pairs, backbone)
    batch = data.collate([dataset[i] for i in range(8)])
    for loss in ("sipo", "dpo-cm", "dpo"):
        args = train.parse_args(["--model", "tiny-sd1.5", "--data", str(pairs), "--loss", loss, "--beta", "1000",
                                 "--tau", "0.88"])
        expected, _ = train.preference_loss(backbone, policy, reference, dict(batch), 0, args, 1)

        encoded = data.encode_batch(backbone, {k: v for k, v in batch.items() if k != "index"})
        latents = torch.cat([encoded["latents_w"], encoded["latents_l"]])
        timesteps, noise, _ = train.pair_noise(backbone, batch["index"], 0, latents.shape[1:], args, "cpu")
        timesteps, noise = timesteps.repeat(2), noise.repeat(2, 1, 1, 1)
        scheduler = backbone.pipe.scheduler
        noisy = scheduler.add_noise(latents, noise, timesteps)
        embeds = encoded["cond.prompt_embeds"].repeat(2, 1, 1)
        # the example's names and its loss block as they are: its beta_dpo has no factor 1/2, so ours is twice it
        beta_dpo = 500.0
        model_losses = (policy(noisy, timesteps, embeds).sample - noise).pow(2).mean(dim=[1, 2, 3])
        model_losses_w, model_losses_l = model_losses.chunk(2)
        model_diff = model_losses_w - model_losses_l
        with torch.no_grad():
            ref_loss = (reference(noisy, timesteps, embeds).sample - noise).pow(2).mean(dim=[1, 2, 3])
            ref_losses_w, ref_losses_l = ref_loss.chunk(2)
            ref_diff = ref_losses_w - ref_losses_l
        logits = ref_diff - model_diff
        example = -1 * torch.nn.functional.logsigmoid(beta_dpo * logits).mean()
        got, stats = sipo.preference_objective(model_losses, ref_loss, timesteps, 2 * beta_dpo, loss,
                                               scheduler.alphas_cumprod, scheduler.config.prediction_type, tau=0.88)
        assert got.item() == pytest.approx(expected.item(), rel=1e-5), loss
        if loss == "dpo":
            assert got.item() == pytest.approx(example.item(), rel=1e-5)
        if loss != "dpo":
            assert 0 < stats["mask_fraction"] < 1, "a partial mask: the weights matter here"


def test_flux_caches_trains_every_loss_resumes_and_evaluates(pairs, tmp_path):
    """tiny-flux.1-dev through every path the other backbones take: data.py cache, SIPO / DPO-C&M / Diffusion-DPO
    steps on the cache, an exact resume, evaluate.py timesteps and compare."""
    torch.manual_seed(0)
    models.load_backbone("tiny-flux.1-dev").pipe.save_pretrained(tmp_path / "base")
    base = ["--model", "tiny-flux.1-dev", "--pretrained", tmp_path / "base"]
    made = in_process(data.main, ["cache", *base, "--data", pairs, "--out", tmp_path / "cache"])
    assert made.returncode == 0 and "16 pairs" in made.stdout, made.stderr[-2000:]
    common = [*base, "--data", tmp_path / "cache", "--steps", 2, "--batch-size", 4, "--tau", 0.3, "--warmup", 0,
              "--checkpoint-every", 1, "--no-export"]
    for loss in ("sipo", "dpo-cm", "dpo"):
        run(0, *common, "--loss", loss, "--out", tmp_path / loss)
        assert all(math.isfinite(r["loss"]) for r in log(tmp_path / loss)), loss
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "sipo", resumed, ignore=shutil.ignore_patterns("step-000002"))
    run(0, *common, "--out", resumed, "--resume")
    timing = ("step_time", "pairs_per_s", "peak_memory_gb")
    assert [{k: v for k, v in r.items() if k not in timing} for r in log(resumed)] == \
        [{k: v for k, v in r.items() if k not in timing} for r in log(tmp_path / "sipo")], "bit for bit"
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    rows = evaluate.run(["timesteps", "--model", "tiny-flux.1-dev", "--pretrained", str(tmp_path / "base"),
                         "--data", str(tmp_path / "cache"), "--pairs", "2", "--buckets", "3", "--draws", "2",
                         "--out", str(tmp_path / "timesteps")])
    assert len(rows) == 3 and all(0 <= row["mask_fraction"] <= 1 for row in rows)
    report = evaluate.run(["compare", "--model", "tiny-flux.1-dev", "--base", str(tmp_path / "base"), "--tuned",
                           str(tmp_path / "base"), "--prompts", str(tmp_path / "prompts.txt"), "--reward",
                           "named_colour", "--samples", "2", "--steps", "2", "--guidance", "3.5", "--out",
                           str(tmp_path / "compare")])
    assert report["rewards"]["named_colour"]["improvement"] == 0.0


def test_a_cache_at_another_size_trains_at_it_and_random_weights_hold_only_what_the_run_needs(video_pairs, tmp_path):
    """issue 28: data.py cache --frames/--resolution/--precision makes a cache at that size, which train.py adopts
    (and refuses another size for, in one line); --random-weights on a cache builds no VAE or text encoder (the
    native-size failure: Wan's UMT5 and CogVideoX's T5-XXL are 11 GB and 9.5 GB in bf16) and a LoRA base directly
    in bf16, with its norms raised to fp32 as hold_for_autocast holds them."""
    cache = tmp_path / "cache"
    made = in_process(data.main, ["cache", "--model", "tiny-wan2.1-1.3b", "--data", video_pairs, "--out", cache,
                                  "--frames", 9, "--resolution", "48x32", "--precision", "bf16"])
    assert made.returncode == 0, made.stderr[-2000:]
    index = json.loads((cache / data.CACHE_INDEX).read_text())
    assert (index["num_frames"], index["resolution"], index["encoder_dtype"]) == (9, [48, 32], "bfloat16")
    args = train.parse_args(["--model", "tiny-wan2.1-1.3b", "--random-weights", "--data", str(cache), "--lora", "4",
                             "--precision", "bf16", "--out", str(tmp_path / "run")])
    backbone = train.load_backbone(args)
    assert (backbone.resolution, backbone.num_frames, args.no_export) == ((48, 32), 9, True)
    assert {p.device.type for m in backbone.frozen_modules() for p in m.parameters()} == {"meta"}
    base = train.hold_for_autocast(backbone.denoiser, torch.bfloat16)
    norms = [m for m in base.modules() if isinstance(m, torch.nn.LayerNorm) and m.weight is not None]
    assert norms and all(m.weight.dtype == torch.float32 for m in norms)
    kept = {id(p) for name, m in base.named_modules() if models.fp32_names(base) & set(name.split("."))
            for p in m.parameters()}  # Wan's time embedder: fp32 whole, as it computes
    assert all(m.weight.dtype == (torch.float32 if id(m.weight) in kept else torch.bfloat16)
               for m in base.modules() if isinstance(m, torch.nn.Linear))
    result = run(0, *argv_of(args), "--steps", 1)
    assert "builds no VAE or text encoder: nothing is exported" in result.stdout and len(log(args.out)) == 1
    refused = run(0, *argv_of(args), "--steps", 1, "--frames", 5, "--out", tmp_path / "other", check=False)
    assert refused.returncode == 1 and "cache was made with num_frames=9, but this run has num_frames=5" in \
        refused.stderr


def argv_of(args):
    return ["--model", args.model, "--random-weights", "--data", args.data, "--lora", args.lora, "--precision",
            args.precision, "--out", args.out]


ONLINE = ["--pairs", "online", "--refresh-every", 2, "--samples-per-prompt", 3, "--online-sample-steps", 4,
          "--no-export"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("".join(f"a {colour} {shape}\n" for colour in ("red", "green", "blue", "yellow")
                            for shape in ("circle", "square")))
    return path


def test_online_pairs_match_on_one_and_two_ranks_and_resume_on_the_same_pairs(prompt_file, tmp_path):
    """issue 30: pairs sampled from the policy every 2 steps, on 1 process and on 2 FSDP2 ranks (sampling is
    collective there): the same refreshes, pairs and losses; a run resumed from step 2 samples the refresh of step
    2 again from the restored policy (bit for bit the stored pairs) and trains steps 3 and 4 as the straight run."""
    common = ["--model", "tiny-sd1.5", "--data", prompt_file, "--steps", 4, *COMMON, *ONLINE]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the thread count alone moves a 4-step sample by 1e-6 (measured)
    try:
        run(0, *common, "--out", tmp_path / "one", "--batch-size", 4)
    finally:
        torch.set_num_threads(threads)
    run(2, *common, "--out", tmp_path / "two", "--batch-size", 2)
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    assert [r.get("refresh_pairs") for r in two] == [8, None, 8, None], "a refresh is logged with the next step"
    first = (tmp_path / "one" / "online" / "pairs-000000.safetensors", tmp_path / "two" / "online" /
             "pairs-000000.safetensors")
    assert first[0].read_bytes() == first[1].read_bytes(), "the first refresh: the same pairs, bit for bit"
    for key in ("loss", "refresh_reward_mean", "refresh_reward_std"):
        assert two[0][key] == pytest.approx(one[0][key], rel=1e-5, abs=1e-7), key
    # after a step the two placements' weights differ by float noise (Adam's first step moves a parameter whose true
    # gradient is 0 by +-lr: test_two_ranks_match_one_rank_on_the_same_global_batch), which later steps carry
    for a, b in zip(one[1:], two[1:]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4) and a.get("refresh_pairs") == b.get("refresh_pairs")
    stored = sorted(p.name for p in (tmp_path / "two" / "online").iterdir())
    assert stored == ["pairs-000000.safetensors", "pairs-000002.safetensors"]
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed, ignore=shutil.ignore_patterns("step-000004", "pairs-000002*"))
    run(2, *common, "--out", resumed, "--batch-size", 2, "--resume")
    assert [r["loss"] for r in log(resumed)] == [r["loss"] for r in two]
    again, straight = (load_file(path / "online" / "pairs-000002.safetensors") for path in (resumed, tmp_path / "two"))
    assert all(torch.equal(again[k], straight[k]) for k in straight)


def test_online_pairs_come_from_the_current_policy_and_a_refresh_without_pairs_keeps_the_last(prompt_file,
                                                                                            tmp_path):
    args = train.parse_args(["--model", "tiny-sd1.5", "--data", str(prompt_file), "--out", str(tmp_path / "run"),
                             "--batch-size", "2", *map(str, ONLINE)])
    args.precision = "fp32"
    trainer = train.make_trainer(train.load_backbone(args), args, torch.device("cpu"))
    train.open_data(trainer)
    batches = train.online_pairs(trainer, None)
    first = trainer.dataset.tensors
    assert trainer.refresh_record["refresh_pairs"] == len(first["latents_w"]) == 8
    prompts, cond, reward = trainer.online
    again = online.sample_pairs(trainer.backbone, prompts, cond, reward, args, 0, 0, 1, contextlib.nullcontext)[0]
    assert all(torch.equal(again.tensors[k], first[k]) for k in first), "a refresh is a function of policy and step"
    with torch.no_grad():
        for parameter in trainer.policy.parameters():
            parameter.mul_(1.5)  # a policy changed by hand
    changed = online.sample_pairs(trainer.backbone, prompts, cond, reward, args, 0, 0, 1, contextlib.nullcontext)[0]
    assert not torch.allclose(changed.tensors["latents_w"], first["latents_w"])
    args.online_margin, trainer.counters["step"] = 1e9, 2  # the next refresh: no pair clears the margin
    assert train.online_pairs(trainer, batches) is batches and trainer.dataset.tensors is first
    assert trainer.refresh_record["refresh_note"] == "too few pairs above the margin: the pairs of step 0 stay"


@pytest.mark.parametrize("flags,message", [
    (["--reward", "pickscore"], "reward pickscore needs --pickscore-model PATH"),
    (["--online-margin", 1e9], "--pairs online: the refresh at step 0 kept 0 pairs above --online-margin 1e+09"),
    (["--samples-per-prompt", 1], "--samples-per-prompt 1: must be at least 2"),
    (["--loss", "sft"], "--pairs online: trains a preference loss, not --loss sft"),
])
def test_online_pairs_refuse_what_cannot_work_before_step_1_in_one_line(prompt_file, tmp_path, flags, message):
    result = run(0, "--model", "tiny-sd1.5", "--data", prompt_file, "--out", tmp_path / "run", "--steps", 1,
                 *ONLINE, *flags, check=False)
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert result.returncode == 1 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert not (tmp_path / "run" / "log.jsonl").exists() or not log(tmp_path / "run")


# ---------------------------------------------------------------------------------------------------------
# The GPU path, where a CPU can show it (issue 39)
# ---------------------------------------------------------------------------------------------------------

def test_gpu_runs_have_a_host_backend_beside_nccl():
    """Host-side control (the stop flag) is all-reduced as a CPU tensor: on GPUs the group must hold gloo for CPU
    tensors beside NCCL, which refuses them ("No backend type associated with device type cpu"). Parsed by torch."""
    from torch.distributed.distributed_c10d import BackendConfig
    import common
    assert BackendConfig(common.BACKENDS["cuda"]).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    assert BackendConfig(common.BACKENDS["cpu"]).get_device_backend_map()["cpu"] == "gloo"


@pytest.mark.parametrize("name", ["tiny-wan2.1-1.3b", "tiny-flux.1-dev", "tiny-cogvideox-5b"])
def test_time_conditioning_under_fsdp2_in_bf16_is_the_one_process_paths_bit_for_bit(name, pairs, video_pairs,
                                                                                     one_rank_group):
    """What the time embedding (diffusers' Timesteps: Wan's 1000 sigma, FLUX's 1000 sigma and its guidance) and
    CogVideoX-5B's blocks (its rotary tables) receive, under FSDP2 with bf16 parameters and in one process under
    autocast: the same values, bit for bit; Wan's exactly 1000 sigma in fp32 (FSDP2's default cast of the root's
    inputs gave 996 for 997.3). FLUX's transformer casts its timestep and guidance to its hidden states' dtype
    itself (diffusers: in a bf16 pipeline too), so there both paths and sampling see diffusers' bf16 values."""
    from diffusers.models.embeddings import Timesteps
    flow = "cogvideox" not in name
    seen = {}
    for parallel in ("none", "fsdp"):
        args = train.parse_args(["--model", name, "--data", str(pairs if "flux" in name else video_pairs),
                                 "--precision", "bf16", "--loss", "sft", "--no-gradient-checkpointing"] +
                                (["--fsdp"] if parallel == "fsdp" else []))
        backbone = train.load_backbone(args)
        policy, _ = train.prepare(backbone, args, torch.device("cpu"))
        assert args.parallel == parallel
        captured = seen[parallel] = []
        for module in policy.modules():
            if isinstance(module, Timesteps):
                module.register_forward_pre_hook(lambda m, inputs: captured.append(inputs[0].detach().clone()))
        if not flow:
            policy.transformer_blocks[0].register_forward_pre_hook(
                lambda m, inputs, kwargs: captured.extend(t.clone() for t in kwargs["image_rotary_emb"]),
                with_kwargs=True)
        dataset, _ = data.open_dataset(args.data, backbone)
        batch = data.encode_batch(backbone, data.collate([dataset[0], dataset[1]]))
        levels = torch.tensor([0.99730, 0.60110]) if flow else torch.tensor([997, 601])
        x_t, _ = backbone.noised(batch["latents_w"], torch.randn_like(batch["latents_w"]), levels)
        with torch.no_grad(), train.mixed_precision(args):
            backbone.predict(policy, x_t, levels, data.conditioning(batch))
        if "wan" in name:
            assert captured[0].dtype == torch.float32 and torch.equal(captured[0], levels * 1000), captured[0]
    # Wan: the timestep; FLUX: the timestep and the guidance; CogVideoX: the timestep and the rotary cos and sin
    assert len(seen["none"]) == len(seen["fsdp"]) == (1 if "wan" in name else 2 if flow else 3)
    for one, sharded in zip(seen["none"], seen["fsdp"]):
        assert one.dtype == sharded.dtype and torch.equal(one, sharded)
    if "cogvideox" in name:  # its t is DDPM's integer; the rotary tables stay fp32
        assert all(t.dtype == torch.float32 for t in seen["fsdp"][1:])


def train_with_an_inf_gradient_on_rank_1(argv):
    """train.main(argv), rank 1's second optimizer step given an inf gradient; every rank writes down whether the
    skipped step left its shard of the weights and optimizer state untouched."""
    original_loss, original_step = train.preference_loss, train.optimizer_step
    calls = {"steps": 0}

    def loss_with_inf(*args, **kwargs):
        loss, stats = original_loss(*args, **kwargs)
        return bench.InfGradient.apply(loss), stats

    def state(trainer):
        tensors = list(trainer.trainable) + [v for s in trainer.optimizer.state.values() for v in s.values()]
        return [getattr(t, "to_local", lambda t=t: t)().detach().clone() for t in tensors]

    def step(trainer, batches, stop):
        calls["steps"] += 1
        armed = calls["steps"] == 2 and trainer.rank == 1
        train.preference_loss = loss_with_inf if armed else original_loss
        before = state(trainer)
        record = original_step(trainer, batches, stop)
        if calls["steps"] == 2:
            unchanged = record is None and all(torch.equal(a, b) for a, b in zip(before, state(trainer)))
            (trainer.args.out / f"skip-rank-{trainer.rank}.json").write_text(json.dumps(unchanged))
        return record

    train.optimizer_step = step
    train.main(argv)


def test_an_inf_gradient_on_one_rank_skips_the_step_on_every_rank_unchanged(pairs, tmp_path):
    """The loss is finite, the gradient is not, on rank 1 only: every rank skips the step (one all-reduce after
    clipping), weights and AdamW state untouched; the checkpoint after it holds the weights of the step before."""
    out = tmp_path / "run"
    argv = ["--model", "tiny-sd1.5", "--data", pairs, "--out", out, "--steps", 2, "--batch-size", 2, "--warmup", 0,
            "--lr", "1e-3", "--loss", "dpo", "--checkpoint-every", 1]
    status = launcher.finish(launcher.launch([str(a) for a in argv], 2, log=tmp_path / "log",
                                             entry=train_with_an_inf_gradient_on_rank_1))
    assert status == 0, (tmp_path / "log").read_text()[-3000:]
    assert [json.loads((out / f"skip-rank-{rank}.json").read_text()) for rank in range(2)] == [True, True]
    records = log(out)
    assert [r["step"] for r in records] == [1, 2] and records[-1]["nonfinite_skipped"] == 1
    assert all(math.isfinite(r["grad_norm"]) for r in records)
    saved = json.loads((RunDir(out).checkpoint(2) / rundir.CHECKPOINT_META).read_text())
    assert saved["nonfinite_skipped"] == 1 and saved["pairs_read"] == 3 * 4, "the skipped step's pairs are read"


@pytest.mark.parametrize("before,after", [((1, ["--batch-size", 2, "--grad-accum", 2]),
                                           (2, ["--batch-size", 1, "--grad-accum", 2])),
                                          ((2, ["--batch-size", 1, "--grad-accum", 2]),
                                           (1, ["--batch-size", 4]))])
def test_a_resume_on_other_ranks_and_batches_trains_on_the_straight_runs_pairs(pairs, tmp_path, before, after):
    """The data position is counted in pairs of one stream (data.PairStream): resumed on 2 ranks from a 1-rank
    checkpoint, or on 1 rank with one micro-batch from 2 ranks with two, each step reads the pairs the straight run
    read (16 pairs, 4 a step, 6 steps: an epoch boundary after step 4). The errors match to float tolerance (the
    ranks' sums differ in order); other pairs (other colours) differ by percents."""
    (ranks, flags), (other_ranks, other_flags) = before, after
    common = ["--model", "tiny-sd1.5", "--data", pairs, "--steps", 6, "--loss", "dpo", "--beta", 5000, *COMMON]
    run(ranks, *common, *flags, "--out", tmp_path / "straight")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", resumed, ignore=shutil.ignore_patterns("step-000006", "model"))
    run(other_ranks, *common, *other_flags, "--out", resumed, "--resume")
    straight, again = log(tmp_path / "straight"), log(resumed)
    assert [r["step"] for r in again] == list(range(1, 7)) and again[-1]["epoch"] == straight[-1]["epoch"] == 1
    for one, other in zip(straight[4:], again[4:]):  # beta / 2 = 2500 amplifies the errors' rounding in the loss
        for key, rel in (("loss", 1e-3), ("err_policy_w", 1e-5), ("err_policy_l", 1e-5), ("err_ref_w", 1e-6)):
            assert other[key] == pytest.approx(one[key], rel=rel), key


def export_while_a_barrier_would_time_out(argv):
    """train.main(argv) on a process group whose collectives time out after 3 s, rank 0's pipeline written slowly
    (8 s, as a large one is)."""
    import datetime
    import common
    from diffusers import DiffusionPipeline
    setup, save = common.setup_distributed, DiffusionPipeline.save_pretrained
    train.setup_distributed = lambda timeout=None: setup(datetime.timedelta(seconds=3))
    DiffusionPipeline.save_pretrained = lambda *a, **k: (time.sleep(8), save(*a, **k))[1]
    train.main(argv)


def test_export_finishes_on_a_group_with_a_short_collective_timeout(pairs, tmp_path):
    out = tmp_path / "run"
    argv = ["--model", "tiny-sd1.5", "--data", pairs, "--out", out, "--steps", 1, "--warmup", 0]
    status = launcher.finish(launcher.launch([str(a) for a in argv], 2, log=tmp_path / "log",
                                             entry=export_while_a_barrier_would_time_out))
    assert status == 0, (tmp_path / "log").read_text()[-3000:]
    assert RunDir(out).has_model()
    models.load_backbone("tiny-sd1.5", pretrained=str(out / "model"))


def test_the_reference_of_a_full_size_policy_is_made_in_bf16_without_a_second_fp32_copy():
    """Wan2.1-1.3B's policy on the meta device (no memory): the bytes train.frozen_copy allocates at their peak are
    those of a bf16 copy (the fp32 modules Wan keeps aside), where deepcopy-then-cast needed the fp32 copy first."""
    policy = models.load_backbone("wan2.1-1.3b", device="meta", random_weights=True).denoiser
    count = sum(p.numel() for p in policy.parameters())
    with bench.LiveBytes() as counter:
        reference = train.frozen_copy(policy, train.sharded_dtypes(policy, torch.bfloat16))
    kept = sum(p.numel() for p in reference.parameters() if p.dtype == torch.float32)
    assert 0 < kept < 0.01 * count and not any(p.requires_grad for p in reference.parameters())
    assert counter.peak <= 2 * count + 2 * kept + 2 ** 20, (counter.peak, 4 * count)


def test_a_run_on_caches_reads_no_text_encoder_and_its_export_reads_them(pairs, tmp_path):
    """--pretrained on a latent cache: each rank reads the denoiser and the VAE (small; its config sets the
    latents' size) but no text encoder (what a video backbone's host memory is: UMT5-XXL is 11 GB in bf16); the
    export reads them from --pretrained and writes a whole pipeline."""
    torch.manual_seed(0)
    models.load_backbone("tiny-sd1.5").pipe.save_pretrained(tmp_path / "base")
    base = ["--model", "tiny-sd1.5", "--pretrained", tmp_path / "base"]
    made = in_process(data.main, ["cache", *base, "--data", pairs, "--out", tmp_path / "cache"])
    assert made.returncode == 0, made.stderr[-2000:]
    args = train.parse_args([*map(str, base), "--data", str(tmp_path / "cache"), "--out", str(tmp_path / "run")])
    args.precision = "fp32"
    backbone = train.load_backbone(args)
    assert set(backbone.frozen_parts()) == {"vae"} and backbone.pipe.tokenizer is not None
    run(0, *base, "--data", tmp_path / "cache", "--out", tmp_path / "run", "--steps", 1, "--warmup", 0)
    exported = models.load_backbone("tiny-sd1.5", pretrained=str(tmp_path / "run" / "model"))
    assert set(exported.frozen_parts()) == {"vae", "text_encoder"}
    assert torch.isfinite(exported.sample(["colour 1"], steps=2)).all()


def test_the_recipes_page_states_every_value_of_every_recipe_and_the_beta_mapping():
    """docs/recipes.md is checked against train.RECIPES, section by section (a stale row fails), and its beta
    table against train.PAPER_BETA x PAPER_BETA_UNIT."""
    page = (ROOT / "docs" / "recipes.md").read_text()
    sections = page.split("\n## ")
    for model, recipe in train.RECIPES.items():
        section = next(s for s in sections if f"--model {model} --recipe paper" in s)
        rows = [line for line in section.splitlines() if line.startswith("| `--")]
        assert rows == [f"| `--{flag.replace('_', '-')} {value}` | {source} |" for flag, (value, source)
                        in recipe.items()], model
    unit = train.PAPER_BETA_UNIT
    for modality, label in (("image", "images"), ("video", "video")):
        dpo, sipo = (train.PAPER_BETA[(modality, loss)] for loss in ("dpo", "sipo"))
        assert f"| {label} (the paper) | {dpo:g} | {sipo:g} |" in page
        assert f"| {label} (`--beta`) | {dpo * unit:g} | {sipo * unit:g} |" in page


@pytest.mark.parametrize("model", models.FULL)
def test_each_recipe_parses_and_plans_on_8_gpus_and_flags_given_win(model, pairs):
    recipe = {flag: value for flag, (value, _) in train.RECIPES[model].items()}
    args = train.parse_args(["--model", model, "--recipe", "paper", "--data", str(pairs)])
    train.check_args(args, 8)
    assert args.grad_accum * args.batch_size * 8 == recipe["global_batch_size"]
    assert (args.lr, args.steps, args.warmup, args.lora) == (recipe["lr"], recipe["steps"], recipe["warmup"],
                                                             recipe.get("lora", 0))
    mine = train.parse_args(["--model", model, "--recipe", "paper", "--data", str(pairs), "--steps", "7",
                             "--grad-accum", "3"])
    train.check_args(mine, 8)
    assert (mine.steps, mine.grad_accum, mine.lr) == (7, 3, recipe["lr"]), "given flags win; no batch to divide"
    backbone = models.load_backbone(model, device="meta", random_weights=True)
    video = "video" if backbone.is_video else "image"
    assert train.default_beta(args, backbone) == train.PAPER_BETA[(video, "sipo")] * train.PAPER_BETA_UNIT


@pytest.mark.parametrize("name", ["tiny-sd1.5", "tiny-wan2.1-1.3b"])
def test_a_recipes_commands_run_at_tiny_size(name, pairs, video_pairs, tmp_path):
    """docs/recipes.md's cache, train and evaluate commands, as written, on a tiny backbone of the same recipe (its
    batch and steps cut to a CPU's)."""
    source = video_pairs if "wan" in name else pairs
    cached = in_process(data.main, ["cache", "--model", name, "--data", source, "--out", tmp_path / "cache"])
    assert cached.returncode == 0, cached.stderr[-2000:]
    run(0, "--model", name, "--recipe", "paper", "--data", tmp_path / "cache", "--out", tmp_path / "run",
        "--global-batch-size", 2, "--steps", 2, "--warmup", 1)
    recorded = json.loads((tmp_path / "run" / "args.json").read_text())
    assert (recorded["lr"], recorded["recipe"]) == (train.RECIPES[name.removeprefix("tiny-")]["lr"][0], "paper")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    compared = in_process(evaluate.main, ["compare", "--model", name, "--base", tmp_path / "run" / "model", "--tuned",
                                          tmp_path / "run", "--prompts", tmp_path / "prompts.txt", "--reward",
                                          "named_colour", "--samples", 1, "--steps", 2, "--out", tmp_path / "eval"])
    assert compared.returncode == 0, compared.stderr[-2000:]


def test_a_path_that_is_not_there_is_no_hub_id_and_errors_name_the_model_as_given(tmp_path):
    with pytest.raises(models.ModelError, match="^/nope/sd: no such directory$"):
        models.load_backbone("tiny-sd1.5", pretrained="/nope/sd")
    with pytest.raises(models.ModelError, match="^./nope: no such directory$"):
        models.load_backbone("tiny-sd1.5", pretrained="./nope")
    toy = models.load_backbone("toy")
    toy.pipe.save_pretrained(tmp_path / "toy")
    with pytest.raises(models.ModelError, match="is not --model tiny-sd1.5$"):
        models.load_backbone("tiny-sd1.5", pretrained=str(tmp_path / "toy"))


def test_a_warm_up_longer_than_the_run_is_said(pairs, tmp_path):
    result = run(0, "--model", "tiny-sd1.5", "--data", pairs, "--out", tmp_path / "run", "--steps", 2, "--no-export")
    assert "note: --warmup 100 is not shorter than --steps 2: the learning rate peaks at 1.98e-07, not --lr 1e-05" \
        in result.stdout


@pytest.mark.parametrize("name,reward,media", [("tiny-sd1.5", "named_colour", ".png"),
                                               ("tiny-wan2.1-1.3b", "temporal_flicker", ".mp4")])
def test_a_preference_set_sampled_from_prompts_is_a_manifest_the_cache_and_training_read(name, reward, media,
                                                                                         prompt_file, tmp_path):
    """python online.py: per prompt the best and the worst of K samples of the base by the reward, written as media
    and pairs.jsonl; data.py cache encodes it and train.py trains on the cache."""
    made = in_process(online.main, ["--model", name, "--prompts", prompt_file, "--reward", reward, "--steps", 2,
                                    "--samples-per-prompt", 3, "--out", tmp_path / "pairs"])
    assert made.returncode == 0, made.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
    prompts = prompt_file.read_text().splitlines()
    assert [row["prompt"] for row in rows] == prompts and f"{len(prompts)} pairs from" in made.stdout
    assert all(row["score_chosen"] > row["score_rejected"] and row["chosen"].endswith(media) for row in rows)
    if media == ".png":  # the stored images score as their rows say, up to 8-bit rounding
        images = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / "pairs" / rows[0][k]))).permute(2, 0, 1)
                              for k in ("chosen", "rejected")]).float() / 255
        scores = evaluate.BUILTIN[reward](images, [prompts[0]] * 2)
        assert scores.tolist() == pytest.approx([rows[0]["score_chosen"], rows[0]["score_rejected"]], abs=1e-3)
    cached = in_process(data.main, ["cache", "--model", name, "--data", tmp_path / "pairs" / "pairs.jsonl", "--out",
                                    tmp_path / "cache"])
    assert cached.returncode == 0, cached.stderr[-2000:]
    run(0, "--model", name, "--data", tmp_path / "cache", "--out", tmp_path / "run", "--steps", 1, "--no-export")
    again = in_process(online.main, ["--model", name, "--prompts", prompt_file, "--reward", reward, "--out",
                                     tmp_path / "pairs"])
    assert again.returncode == 1 and "pairs: not empty; pass a new or empty directory" in again.stderr
