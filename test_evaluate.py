"""evaluate.py: compare, timesteps and curves on tiny backbones; rewards on hand-made images; statistics."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
import models

REPORT_KEYS = {"base_mean", "base_ci", "tuned_mean", "tuned_ci", "improvement", "improvement_ci", "win_rate",
               "p_value", "improvement_by_prompt", "prompts_better", "prompts_worse", "prompts_tied"}
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
    ("hpsv2", {}, "reward hpsv2 needs --hpsv2-model PATH"),
    ("hpsv2", {"hpsv2_model": "."}, "reward hpsv2 needs --hpsv2-checkpoint FILE"),
])
def test_reward_flags_fail_in_one_line(names, flags, message):
    class Flags:
        pickscore_model = clip_model = aesthetic_model = aesthetic_head = hpsv2_model = hpsv2_checkpoint = None

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


def open_clip_layout(model):
    """A CLIPModel's weights under open_clip's names (open_clip 3.3.0: transformer.py's VisionTransformer and
    ResidualAttentionBlock, model.py's CLIP), written out here independently of evaluate's converter: q, k and v
    fused into nn.MultiheadAttention's in_proj, the projections as the (width, embed) matrices open_clip multiplies
    by."""
    state, out = model.state_dict(), {}
    for tower, prefix, config in (("vision_model", "visual.", model.config.vision_config),
                                  ("text_model", "", model.config.text_config)):
        for i in range(config.num_hidden_layers):
            ours, theirs = f"{tower}.encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[f"{theirs}attn.in_proj_{kind}"] = torch.cat([state[f"{ours}self_attn.{x}_proj.{kind}"]
                                                                 for x in "qkv"])
                for mine, other in (("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
                                    ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                    out[f"{theirs}{other}.{kind}"] = state[f"{ours}{mine}.{kind}"]
    embeddings = "vision_model.embeddings."
    out.update({"visual.conv1.weight": state[embeddings + "patch_embedding.weight"],
                "visual.class_embedding": state[embeddings + "class_embedding"],
                "visual.positional_embedding": state[embeddings + "position_embedding.weight"],
                "visual.proj": state["visual_projection.weight"].t(),
                "token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
                "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
                "text_projection": state["text_projection.weight"].t(), "logit_scale": state["logit_scale"]})
    for mine, other in (("vision_model.pre_layrnorm", "visual.ln_pre"),
                        ("vision_model.post_layernorm", "visual.ln_post"), ("text_model.final_layer_norm", "ln_final")):
        for kind in ("weight", "bias"):
            out[f"{other}.{kind}"] = state[f"{mine}.{kind}"]
    return out


def test_hpsv2_loads_an_open_clip_checkpoint_and_scores_the_cosine(tiny_clip, tmp_path):
    """HPSv2's score is the cosine of the fine-tuned open_clip model's normalised image and text features (HPSv2's
    score.py: the diagonal of image_features @ text_features.T). A checkpoint in open_clip's layout, as HPSv2 saves
    it ({"state_dict": ...}), is read weights-only and scores what the CLIPModel it came from computes by hand."""
    from transformers import CLIPModel, CLIPProcessor
    torch.manual_seed(7)
    fine_tuned = CLIPModel(CLIPModel.config_class.from_pretrained(tiny_clip)).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in open_clip_layout(fine_tuned).items()}, "epoch": 3},
               tmp_path / "HPS_v2.1_compressed.pt")

    class Flags:
        hpsv2_model, hpsv2_checkpoint = str(tiny_clip), str(tmp_path / "HPS_v2.1_compressed.pt")

    reward = evaluate.load_rewards("hpsv2", Flags)["hpsv2"]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    prompts = ["a red circle", "a cat"]
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    pil = [Image.fromarray((i.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for i in images]
    inputs = processor(text=prompts, images=pil, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = fine_tuned(**inputs)
    expected = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    torch.testing.assert_close(reward(images, prompts), expected, rtol=1e-5, atol=1e-6)
    torch.save({"state_dict": {**open_clip_layout(fine_tuned), "visual.head.weight": torch.zeros(1)}},
               tmp_path / "other.pt")
    Flags.hpsv2_checkpoint = str(tmp_path / "other.pt")
    with pytest.raises(ValueError, match="^visual.head.weight: not a weight of open_clip's CLIP with ViT towers$"):
        evaluate.load_rewards("hpsv2", Flags)
    (tmp_path / "page.pt").write_text("<html>a download that went wrong</html>")
    Flags.hpsv2_checkpoint = str(tmp_path / "page.pt")
    with pytest.raises(ValueError, match="page.pt: not a weights file that loads without running code"):
        evaluate.load_rewards("hpsv2", Flags)


def write_imagereward(folder):
    """ImageReward's published files, in BLIP's own names (vit.py's blocks.N.attn.qkv ..., med.py's BERT), from tiny
    random towers, and BERT's tokenizer: returns the towers, the MLP and the tokenizer's folder."""
    from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "cat", "blue", "square"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder / "bert")
    torch.manual_seed(11)
    vision = BlipVisionModel(BlipVisionConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                              num_attention_heads=1, image_size=32, patch_size=16,
                                              layer_norm_eps=1e-6)).eval()
    med = {"vocab_size": len(words) + 2, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 48, "max_position_embeddings": 40, "layer_norm_eps": 1e-12, "encoder_width": 64}
    text = BlipTextModel(BlipTextConfig(**{k: v for k, v in med.items() if k != "encoder_width"},
                                        encoder_hidden_size=64, is_decoder=True), add_pooling_layer=False).eval()
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 8),
                              torch.nn.Dropout(0.2), torch.nn.Linear(8, 4), torch.nn.Dropout(0.1),
                              torch.nn.Linear(4, 2), torch.nn.Linear(2, 1)).eval()
    blip_names = [("embeddings.patch_embedding.", "patch_embed.proj."), ("embeddings.position_embedding", "pos_embed"),
                  ("embeddings.class_embedding", "cls_token"), ("encoder.layers.", "blocks."),
                  ("self_attn.qkv.", "attn.qkv."), ("self_attn.projection.", "attn.proj."),
                  ("layer_norm1.", "norm1."), ("layer_norm2.", "norm2."), ("post_layernorm.", "norm.")]
    state = {}
    for key, tensor in vision.state_dict().items():
        for ours, blips in blip_names:
            key = key.replace(ours, blips)
        state[f"blip.visual_encoder.{key}"] = tensor
    state.update({f"blip.text_encoder.{k}": v for k, v in text.state_dict().items()})
    state.update({f"mlp.layers.{k}": v for k, v in mlp.state_dict().items()})
    (folder / "ir").mkdir(exist_ok=True)
    torch.save(state, folder / "ir" / "ImageReward.pt")
    (folder / "ir" / "med_config.json").write_text(json.dumps(med))
    return vision, text, mlp, state


def test_imagereward_loads_its_published_files_and_scores_as_its_score_does(tmp_path):
    """ImageReward's score (ImageReward.py): BLIP's text encoder over the prompt (BERT's tokens, padded to 35) with
    cross-attention to the ViT's image tokens, its first token through the MLP's linear layers, minus
    0.16717362830052426, over 1.0333394966054072; the expected score computed here from the towers written."""
    from transformers import BertTokenizer, CLIPImageProcessorPil
    vision, text, mlp, state = write_imagereward(tmp_path)

    class Flags:
        imagereward_model, imagereward_tokenizer = str(tmp_path / "ir"), str(tmp_path / "bert")

    reward = evaluate.load_rewards("imagereward", Flags)["imagereward"]
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    prompts = ["a red circle", "a blue cat"]
    pil = [Image.fromarray((i.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for i in images]
    pixels = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
        images=pil, return_tensors="pt")["pixel_values"]
    tokenizer = BertTokenizer.from_pretrained(tmp_path / "bert")
    tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    tokens = tokenizer(prompts, padding="max_length", max_length=35, truncation=True, return_tensors="pt")
    with torch.no_grad():
        image = vision(pixel_values=pixels).last_hidden_state
        first = text(**tokens, encoder_hidden_states=image).last_hidden_state[:, 0]
        expected = (mlp(first).squeeze(-1) - 0.16717362830052426) / 1.0333394966054072
    torch.testing.assert_close(reward(images, prompts), expected, rtol=1e-4, atol=1e-5)
    Flags.imagereward_model = str(tmp_path)
    with pytest.raises(ValueError, match="--imagereward-model .*med_config.json: does not exist"):
        evaluate.load_rewards("imagereward", Flags)
    Flags.imagereward_model = str(tmp_path / "ir")
    del state["blip.text_encoder.encoder.layer.1.crossattention.self.key.weight"]
    torch.save(state, tmp_path / "ir" / "ImageReward.pt")
    with pytest.raises(ValueError, match="ImageReward.pt: not an ImageReward checkpoint \\(blip.text_encoder.encoder"
                                         ".layer.1.crossattention.self.key.weight missing\\)"):
        evaluate.load_rewards("imagereward", Flags)


def test_compare_scores_the_fields_five_rewards_from_their_published_layouts(tiny_clip, tmp_path):
    """evaluate.py compare --reward hpsv2,imagereward,pickscore,aesthetic,clip on a tiny model, each reward read
    from files in its published layout (tiny and random)."""
    from transformers import CLIPModel
    write_imagereward(tmp_path)
    torch.manual_seed(7)
    hps = open_clip_layout(CLIPModel(CLIPModel.config_class.from_pretrained(tiny_clip)))
    torch.save({"state_dict": hps}, tmp_path / "HPS_v2.1_compressed.pt")
    base = tmp_path / "base"
    models.load_backbone("tiny-sd1.5").pipe.save_pretrained(base)
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\n")
    report = evaluate.run(["compare", "--model", "tiny-sd1.5", "--base", str(base), "--tuned", str(base), "--prompts",
                           str(tmp_path / "prompts.txt"), "--reward", "hpsv2,imagereward,pickscore,aesthetic,clip",
                           "--samples", "1", "--steps", "2", "--out", str(tmp_path / "eval"),
                           "--hpsv2-model", str(tiny_clip), "--hpsv2-checkpoint",
                           str(tmp_path / "HPS_v2.1_compressed.pt"), "--imagereward-model", str(tmp_path / "ir"),
                           "--imagereward-tokenizer", str(tmp_path / "bert"),
                           "--pickscore-model", str(tiny_clip), "--clip-model", str(tiny_clip),
                           "--aesthetic-model", str(tiny_clip), "--aesthetic-head", str(tiny_clip / "head.pth")])
    assert list(report["rewards"]) == ["hpsv2", "imagereward", "pickscore", "aesthetic", "clip"]
    for name, result in report["rewards"].items():  # the same model as base and tuned: identical scores
        assert math.isfinite(result["base_mean"]) and result["base_mean"] == result["tuned_mean"], name
        assert result["prompts_tied"] == 2, name


def test_compare_samples_each_backbone_as_its_pipeline_ships_unless_told():
    expected = {"sd1.5": (50, 7.5), "sdxl": (50, 5.0), "cogvideox-2b": (50, 6), "cogvideox-5b": (50, 6),
                "wan2.1-1.3b": (50, 5.0), "flux.1-dev": (28, 3.5)}
    for name, defaults in expected.items():
        assert evaluate.sampler_defaults(name) == evaluate.sampler_defaults(f"tiny-{name}") == defaults, name
