"""evaluate.py: compare, timesteps and curves on tiny backbones; rewards on hand-made images; statistics."""
import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import models

REPORT_KEYS = {"base_mean", "base_ci", "tuned_mean", "tuned_ci", "improvement", "improvement_ci", "win_rate",
               "p_value", "improvement_by_prompt"}
TIMESTEP_COLUMNS = ["level_low", "level_high", "weight_w_mean", "weight_l_mean", "weight_q10", "weight_q50",
                    "weight_q90", "mask_fraction", "error_gap", "grad_norm", "grad_variance"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny image and video pipelines saved in the diffusers layout, and a few pairs for each."""
    import imageio.v3 as iio
    root = tmp_path_factory.mktemp("saved")
    for name in ("tiny-sd1.5", "tiny-wan2.1-1.3b"):
        torch.manual_seed(0)
        models.load_backbone(name).pipe.save_pretrained(root / name)
    rows = []
    for i in range(4):
        Image.new("RGB", (32, 32), (200, 40 * i, 30)).save(root / f"w{i}.png")
        Image.new("RGB", (32, 32), (90, 90, 90)).save(root / f"l{i}.png")
        frames = np.stack([np.full((32, 32, 3), 30 * k + 20 * i, np.uint8) for k in range(5)])
        iio.imwrite(root / f"w{i}.mp4", frames, fps=8, codec="libx264", macro_block_size=8)
        iio.imwrite(root / f"l{i}.mp4", frames[::-1].copy(), fps=8, codec="libx264", macro_block_size=8)
        rows.append({"prompt": f"a red thing {i}", "chosen": f"w{i}.png", "rejected": f"l{i}.png"})
    (root / "images.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (root / "videos.jsonl").write_text("\n".join(json.dumps({**r, "chosen": f"w{i}.mp4", "rejected": f"l{i}.mp4"})
                                                 for i, r in enumerate(rows)))
    (root / "prompts.txt").write_text("a red circle\na blue square\n\na green circle\n")
    return root


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name,reward,picture", [("tiny-sd1.5", "jpeg_compressibility,named_colour", "grid.png"),
                                                 ("tiny-wan2.1-1.3b", "temporal_flicker", "side-by-side.gif")])
def test_a_model_compared_with_itself_ties(saved, tmp_path, name, reward, picture, precision):
    out = tmp_path / "eval"
    argv = ["compare", "--model", name, "--base", str(saved / name), "--tuned", str(saved / name), "--prompts",
            str(saved / "prompts.txt"), "--reward", reward, "--samples", "3", "--steps", "2", "--out", str(out),
            "--precision", precision]
    report = evaluate.main(argv)
    saved_report = json.loads((out / "report.json").read_text())
    assert saved_report == json.loads(json.dumps(report))
    assert saved_report["prompts"] == 3 and saved_report["samples_per_prompt"] == 3
    for result in saved_report["rewards"].values():
        assert set(result) == REPORT_KEYS
        assert result["win_rate"] == 0.5 and result["p_value"] == 1.0 and result["improvement"] == 0.0
        assert result["improvement_by_prompt"] == [0.0, 0.0, 0.0]
        assert result["base_ci"][0] <= result["base_mean"] <= result["base_ci"][1]
    assert "| reward |" in (out / "report.md").read_text() and (out / picture).stat().st_size > 0
    assert evaluate.main(argv) == report, "same seeds, same numbers"


def test_rewards_rank_hand_made_images():
    def flat(rgb):
        return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 16, 16)

    red, pinkish, grey, green = flat([1.0, 0.0, 0.0]), flat([0.8, 0.4, 0.4]), flat([0.5, 0.5, 0.5]), flat([0, 1, 0])
    images = torch.cat([grey, green, red, pinkish])
    scores = evaluate.named_colour(images, ["a red circle"] * 4)
    assert scores.argsort().tolist() == [1, 0, 3, 2]  # green < grey < pinkish < red
    assert scores[0].item() == pytest.approx(0.0, abs=1e-6)
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    smooth = torch.full((1, 3, 32, 32), 0.3)
    compressibility = evaluate.jpeg_compressibility(torch.cat([noisy, smooth]), ["x", "x"])
    assert compressibility[1] > compressibility[0]
    assert evaluate.jpeg_incompressibility(torch.cat([noisy, smooth]), ["x", "x"]).argmax().item() == 0
    steady = torch.full((1, 6, 3, 8, 8), 0.5)
    flicker = steady.clone()
    flicker[:, ::2] = 0.9
    scores = evaluate.temporal_flicker(torch.cat([flicker, steady]), ["x", "x"])
    assert scores.tolist() == pytest.approx([0.6, 1.0])
    with pytest.raises(ValueError, match="names none of"):
        evaluate.named_colour(grey, ["a circle"])


def test_statistics_against_known_answers():
    assert evaluate.paired_permutation_p(np.zeros(10)) == 1.0
    assert evaluate.paired_permutation_p(np.full(10, 0.3) + np.linspace(0, 0.01, 10)) < 0.01  # 2/2^10 exactly
    symmetric = np.array([1.0, -1.0] * 8)
    assert evaluate.paired_permutation_p(symmetric) == 1.0
    values = np.random.default_rng(0).normal(2.0, 1.0, 400)
    low, high = evaluate.bootstrap_ci(values)
    assert low < values.mean() < high and high - low == pytest.approx(2 * 1.96 / 20, rel=0.15)
    result = evaluate.compare_scores(np.zeros((4, 2)), np.array([[1, 1], [1, 1], [0, 0], [-1, -1.0]]))
    assert result["win_rate"] == pytest.approx((1 + 1 + 0.5 + 0) / 4) and result["improvement"] == 0.25


@pytest.mark.parametrize("name,data_file", [("tiny-sd1.5", "images.jsonl"), ("tiny-wan2.1-1.3b", "videos.jsonl")])
def test_timestep_analysis_writes_the_documented_csv_and_plot(saved, tmp_path, name, data_file):
    argv = ["timesteps", "--model", name, "--pretrained", str(saved / name), "--reference", str(saved / name),
            "--data", str(saved / data_file), "--pairs", "4", "--buckets", "5", "--draws", "2", "--out", str(tmp_path)]
    rows = evaluate.main(argv)
    with open(tmp_path / "timesteps.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == TIMESTEP_COLUMNS + ["margin_per_beta"] and len(table) == 5
    for row in rows:
        assert 0 <= row["weight_q10"] <= row["weight_q50"] <= row["weight_q90"] <= 1
        assert 0 <= row["mask_fraction"] <= 1 and row["grad_norm"] > 0 and row["grad_variance"] >= 0
        assert row["margin_per_beta"] == 0.0, "the model is its own reference"
    medians = [row["weight_q50"] for row in rows]
    assert medians[0] == min(medians), "the clean end, with the final step, has the lowest weights"
    assert (tmp_path / "timesteps.png").stat().st_size > 10_000


def test_curves_plot_one_or_several_runs(tmp_path):
    for name, slope in (("a", 1.0), ("b", 2.0)):
        run = tmp_path / name
        run.mkdir()
        records = [{"step": s, "loss": 0.7 - 0.001 * slope * s, "accuracy": 0.5, "mask_fraction": 0.1,
                    "err_policy_w": 1.0, "err_policy_l": 1.1, "err_ref_w": 1.0, "err_ref_l": 1.0,
                    **({"heldout_accuracy": 0.6} if s % 10 == 0 else {})} for s in range(1, 41)]
        (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    out = evaluate.main(["curves", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.png")])
    assert out.stat().st_size > 10_000
    with pytest.raises(SystemExit, match=f"error: {tmp_path}: no log.jsonl"):
        evaluate.main(["curves", str(tmp_path)])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP saved in the published layout (CLIPModel + CLIPProcessor), and an aesthetic MLP head."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor
    path = tmp_path_factory.mktemp("clip")
    tokenizer = models.clip_tokenizer()
    text = dict(models.TINY_CLIP, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(path)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                    crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(path)
    head = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, path / "head.pth")
    return path


def test_model_based_rewards_load_from_local_paths(tiny_clip):
    class Flags:
        pickscore_model = clip_model = aesthetic_model = str(tiny_clip)
        aesthetic_head = str(tiny_clip / "head.pth")

    rewards = evaluate.load_rewards("pickscore,clip,aesthetic", Flags)
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for name, reward in rewards.items():
        scores = reward(images, ["a red circle", "a cat", "a blue square"])
        assert scores.shape == (3,) and torch.isfinite(scores).all(), name
    video = torch.rand(2, 3, 3, 32, 32, generator=torch.Generator().manual_seed(2))  # (N, F, 3, H, W)
    prompts = ["a red circle", "a cat"]
    for name, reward in rewards.items():  # a video's score: the mean of its frames' scores with its prompt
        per_frame = torch.stack([reward(video[:, k], prompts) for k in range(3)], 1)
        torch.testing.assert_close(reward(video, prompts), per_frame.mean(1), rtol=1e-5, atol=1e-5)
    head = torch.load(tiny_clip / "head.pth", weights_only=True)
    embedding = rewards["aesthetic"].model.get_image_features(
        pixel_values=rewards["aesthetic"].processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt")[
            "pixel_values"])
    embedding = getattr(embedding, "pooler_output", embedding)
    embedding = embedding / embedding.norm(dim=-1, keepdim=True)
    expected = (embedding @ head["layers.0.weight"].T + head["layers.0.bias"]) @ head["layers.2.weight"].T \
        + head["layers.2.bias"]
    got = rewards["aesthetic"](torch.zeros(1, 3, 32, 32), ["x"])
    assert got.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("names,flags,message", [
    ("pickscore", {}, "reward pickscore needs --pickscore-model PATH"),
    ("clip", {"clip_model": "/nowhere"}, "--clip-model /nowhere: does not exist"),
    ("sharpness", {}, "unknown reward 'sharpness'"),
    ("hpsv2", {}, "reward hpsv2 needs open_clip"),
])
def test_reward_flags_fail_in_one_line(names, flags, message):
    class Flags:
        pickscore_model = clip_model = aesthetic_model = aesthetic_head = None

    for key, value in flags.items():
        setattr(Flags, key, value)
    with pytest.raises(ValueError, match=message):
        evaluate.load_rewards(names, Flags)


def test_identical_models_tie_on_every_prompt_rather_than_win_half():
    scores = np.arange(8.0).reshape(4, 2)
    result = evaluate.compare_scores(scores, scores.copy())
    assert (result["prompts_better"], result["prompts_worse"], result["prompts_tied"]) == (0, 0, 4)
    assert evaluate.prompt_counts(result) == "better on 0, worse on 0, tied on 4 of 4 prompts"
    better = evaluate.compare_scores(scores, scores + np.array([[1.0], [-1.0], [0.0], [2.0]]))
    assert evaluate.prompt_counts(better) == "better on 2, worse on 1, tied on 1 of 4 prompts"
