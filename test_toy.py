"""toy.py and study.py in miniature: the shipped base, the base recipe, the embedded default end to end, a study."""
import json

import numpy as np
import pytest
import torch

import evaluate
import study
import toy


def test_the_reward_prefers_the_more_vivid_drawing_of_the_same_scene():
    def image(prompt, seed, vividness):
        pixels = toy.draw(prompt, torch.Generator().manual_seed(seed), vividness)
        return torch.from_numpy(pixels).permute(2, 0, 1).float()[None] / 255

    for prompt in toy.PROMPTS:
        for seed in range(5):
            dull, vivid = image(prompt, seed, 0.3), image(prompt, seed, 1.0)
            assert (evaluate.named_colour(vivid, [prompt]) > evaluate.named_colour(dull, [prompt])).all(), prompt


def test_exact_permutation_p_against_hand_counts():
    assert study.exact_permutation_p(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == pytest.approx(2 / 6)
    assert study.exact_permutation_p(np.arange(5.0), np.arange(5.0) + 100) == pytest.approx(2 / 252)


def test_paired_statistics_against_hand_values():
    """study.paired_test: d = (1, 2, 0.5): mean 7/6, sd sqrt(7/12), t(2) = 4.303; of the 8 sign patterns only the
    two of one sign reach |mean| 7/6. sign_test: 3 of 4 positive, 2 (1 + 4) / 16. holm: 3 x 0.01, then 2 x 0.03,
    then max(0.06, 1 x 0.04)."""
    test = study.paired_test([1.0, 2.0, 3.0], [2.0, 4.0, 3.5])
    half = 4.303 * (7 / 12) ** 0.5 / 3 ** 0.5
    assert test["difference"] == pytest.approx(7 / 6) and test["sd"] == pytest.approx((7 / 12) ** 0.5)
    assert test["ci"] == pytest.approx([7 / 6 - half, 7 / 6 + half]) and test["p"] == pytest.approx(2 / 8)
    assert test["positive"] == 3 and test["n"] == 3
    assert study.sign_test([1, 2, -1, 3, 0]) == pytest.approx(2 * 5 / 16)
    assert study.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    many = np.random.default_rng(1).normal(0.5, 1, 40)  # n > 16: sampled sign patterns, against the exact tail
    assert study.paired_test(np.zeros(40), many)["p"] < 0.05 < study.paired_test(np.zeros(40), many - 0.5)["p"]


def test_pooled_tests_pool_each_comparisons_seed_pairs_and_correct_over_the_comparisons():
    """a - b pools (1, 2) and (0.5): mean 7/6, sign-flip p 2/8, 3 of 3 positive (sign test 2/8); c - b: (-1, 1),
    mean 0, p 1. Holm: 2 x 0.25, then max(0.5, 1 x 1)."""
    rows = study.pooled_tests([{"comparison": "a - b", "differences": [1.0, 2.0]},
                               {"comparison": "c - b", "differences": [-1.0, 1.0]},
                               {"comparison": "a - b", "differences": [0.5]}])
    assert [row["comparison"] for row in rows] == ["a - b", "c - b"]
    assert rows[0]["difference"] == pytest.approx(7 / 6) and rows[0]["n"] == 3 and rows[0]["p"] == pytest.approx(0.25)
    assert rows[0]["sign_p"] == pytest.approx(0.25) and rows[1]["difference"] == 0 and rows[1]["p"] == 1
    assert [row["p_holm"] for row in rows] == pytest.approx([0.5, 1.0])


def test_named_shape_recognises_the_drawings_and_not_noise():
    generator = torch.Generator().manual_seed(5)
    prompts = toy.PROMPTS * 50
    drawn = torch.stack([torch.from_numpy(toy.draw(p, generator)).permute(2, 0, 1).float() / 255 for p in prompts])
    assert evaluate.named_shape(drawn, prompts).mean() >= 0.99
    swapped = [p.replace("circle", "x").replace("square", "circle").replace("x", "square") for p in prompts]
    assert evaluate.named_shape(drawn, swapped).mean() <= 0.05, "a circle is not a square"
    recoloured = [p.replace("red", "blue") if "red" in p else p.replace(p.split()[1], "red") for p in prompts]
    assert evaluate.named_shape(drawn, recoloured).mean() == 0
    assert evaluate.named_shape(torch.rand(64, 3, 16, 16, generator=generator), prompts[:64]).sum() == 0


def test_the_shipped_base_draws_what_it_is_asked_for():
    """The shipped base's shape and colour are recognised in at least 90% of samples at fixed seeds."""
    recipe = json.loads((toy.BASE / "recipe.json").read_text())
    quality = toy.base_quality(toy.BASE)
    assert quality >= 0.9
    assert quality == pytest.approx(recipe["named_shape"], abs=0.05), "the shipped recipe.json describes this base"


MINI = ["--train-base", "--base-steps", "5", "--pairs-per-prompt", "2", "--heldout-per-prompt", "2", "--steps", "2",
        "--samples", "2"]
MINI_RUN = "sipo-pairs-per-prompt2-steps2"  # the loss, then each training flag that is not toy.py's default


@pytest.fixture(scope="module")
def mini_toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return out, toy.main(["--out", str(out), *MINI])


def test_the_base_recipe_still_makes_the_shipped_base(mini_toy):
    """The first 5 SFT losses of `--train-base` equal the shipped base's (same data, seeds, batch and optimiser;
    the rank count and the CPU's kernels only move them in the last digits)."""
    out, _ = mini_toy
    shipped = json.loads((toy.BASE / "recipe.json").read_text())
    ours = [json.loads(line)["loss"] for line in (out / "base" / "log.jsonl").read_text().splitlines()]
    assert ours == pytest.approx(shipped["first_losses"][:5], rel=1e-3)


def test_toy_runs_end_to_end_and_reuses_what_exists(mini_toy):
    out, report = mini_toy
    assert set(report["rewards"]) == {"named_colour", "named_shape"}
    for path in ("base/model/model_index.json", "base/model/recipe.json", f"{MINI_RUN}/model/model_index.json",
                 f"eval/{MINI_RUN}/report.md", f"eval/{MINI_RUN}/grid.png", f"eval/{MINI_RUN}/curves.png",
                 "data/pairs-2/pairs.jsonl", "data/heldout-2/pairs.jsonl", f"{MINI_RUN}/samples/step-000002/grid.png"):
        assert (out / path).exists(), path
    rows = [json.loads(line) for line in (out / "data" / "pairs-2" / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and all(r["score_chosen"] >= r["score_rejected"] for r in rows)
    log = [json.loads(line) for line in (out / MINI_RUN / "log.jsonl").read_text().splitlines()]
    assert "heldout_accuracy" in log[-1] and "heldout_reward" in log[-1]
    assert "| a yellow square |" in (out / "eval" / MINI_RUN / "report.md").read_text(), "the report's table by prompt"
    stamp = (out / MINI_RUN / "model" / "model_index.json").stat().st_mtime
    assert toy.main(["--out", str(out), *MINI]) == report, "a rerun with the same flags reuses models and seeds"
    assert (out / MINI_RUN / "model" / "model_index.json").stat().st_mtime == stamp
    with pytest.raises(SystemExit, match="made from the base .* pass another --out"):
        toy.main(["--out", str(out)])  # the shipped base: its pairs and runs would be mixed with these


def test_a_rerun_with_other_flags_trains_its_own_model_and_evaluation(mini_toy, capsys):
    """After a run, --steps 3 (or another loss) trains a model of its own, reported under its own name; the first
    run's model and evaluation are untouched. A reused directory whose args.json says other flags is refused."""
    out, _ = mini_toy
    first = (out / "eval" / MINI_RUN / "report.json").read_text()
    toy.main(["--out", str(out), *MINI, "--steps", "3"])
    assert "sipo-pairs-per-prompt2-steps3 (trained now)" in capsys.readouterr().out
    assert len((out / "sipo-pairs-per-prompt2-steps3" / "log.jsonl").read_text().splitlines()) == 3
    toy.main(["--out", str(out), *MINI, "--loss", "dpo"])
    assert (out / "eval" / "dpo-pairs-per-prompt2-steps2" / "report.md").exists()
    assert (out / "eval" / MINI_RUN / "report.json").read_text() == first, "each loss's evaluation apart"
    args = out / MINI_RUN / "args.json"
    args.write_text(json.dumps({**json.loads(args.read_text()), "steps": 7}))
    with pytest.raises(SystemExit, match=f"{MINI_RUN} was trained with --steps 7 \\(not 2\\)"):
        toy.main(["--out", str(out), *MINI])


@pytest.fixture(scope="module")
def study_runs(tmp_path_factory):
    """One --out for both miniature parts, from the shipped base as `python study.py`: the off-policy part reuses the
    on-policy part's pairs, as a full study does."""
    return tmp_path_factory.mktemp("study")


def test_miniature_study_writes_its_tables(study_runs, tmp_path):
    summary = study.main(["--part", "onpolicy", "--out", str(study_runs), "--results", str(tmp_path),
                          "--pairs", "2", "--heldout-pairs", "2", "--betas", "1000", "--seeds", "2",
                          "--steps", "2", "--samples", "1", "--no-ablations", "--timestep-pairs", "2",
                          "--timestep-buckets", "4", "--timing-repeats", "1"])["onpolicy"]
    assert set(summary["table"]) == {f"{m} beta=1000" for m in study.METHODS}
    for row in summary["table"].values():
        assert len(row["finals"]) == 2 and 0 <= row["collapse_fraction"] <= 1 and row["step_time"] > 0
        assert 0 <= row["win_rate_mean"] <= 1
    assert set(summary["significance"]) == {f"{m} vs dpo, beta=1000" for m in ("dpo-cm", "sipo")}
    assert (tmp_path / "beta.png").stat().st_size > 10_000 and (tmp_path / "study.json").exists()
    for model in ("base", "sipo"):
        assert len((tmp_path / f"timesteps-{model}" / "timesteps.csv").read_text().splitlines()) == 1 + 4, model
    assert (tmp_path / "RESULTS.md").read_text().startswith("# Results")


def test_a_study_whose_runs_all_fail_says_so_in_one_line(study_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(study, "run_one", lambda *args: None)  # as when train.py exits 1 (e.g. a full disk)
    with pytest.raises(SystemExit, match=r"^error: all 3 training runs failed; the first one's log: .*_seed0\.log$"):
        study.main(["--part", "onpolicy", "--out", str(study_runs), "--results", str(tmp_path), "--pairs", "2",
                    "--heldout-pairs", "2", "--betas", "1000", "--seeds", "1", "--steps", "2", "--samples", "1",
                    "--no-ablations"])
    assert "sipo beta=1000 seed 0: failed, see " in capsys.readouterr().out
    assert not (tmp_path / "RESULTS.md").exists()


def test_miniature_gradient_control_and_degrade_parts_write_their_tables(study_runs, tmp_path):
    common = ["--out", str(study_runs), "--results", str(tmp_path), "--heldout-pairs", "2", "--off-pairs", "2",
              "--off-batch", "4", "--off-steps", "2", "--samples", "1"]
    gradient = study.main(["--part", "gradient", *common, "--gradient-batches", "1"])["gradient"]
    settings = gradient["sources"]["on"]["settings"]
    assert set(gradient["sources"]) == set(study.GRADIENT_SOURCES) and len(settings) == 2 * 2 * 3 * 3
    assert all(row["movement"] >= 0 and 0 <= row["mask_fraction"] <= 1 for row in settings.values())
    assert gradient["strongest"] in settings and gradient["sources"]["on"]["redraw"] > 0
    control = study.main(["--part", "control", *common, "--control-seeds", "1"])["control"]
    assert set(control["cutoffs"]) == set(study.GRADIENT_SOURCES) and len(control["tests"]) == 15
    assert {row["comparison"] for row in control["pooled"]} == {"dpo-cm - dpo", "dpo cutoff - dpo",
                                                                "dpo-cm - dpo cutoff", "sipo strongest - dpo-cm",
                                                                "sipo strongest - dpo-cm strongest"}
    degrade = study.main(["--part", "degrade", *common, "--degrade-seeds", "1", "--degrade-steps", "2",
                          "--degrade-lrs", "1e-4", "--degrade-betas", "1000"])["degrade"]
    assert set(degrade["table"]) == {f"degrade {m} lr=0.0001 beta=1000" for m in study.METHODS}
    assert len(degrade["tests"]) == 2 and set(degrade["sweep"]) == {"lr=0.0001 beta=1000"}
    text = (tmp_path / "RESULTS.md").read_text()
    for title in ("## How far re-weighting moves the gradient", "## The cutoff control",
                  "## Where Diffusion-DPO degrades"):
        assert title in text, title


def test_foreign_style_is_visible_to_the_drift_statistic_and_worth_nothing_to_the_reward():
    generator = torch.Generator().manual_seed(0)
    for prompt in toy.PROMPTS:
        base, foreign = (torch.stack([torch.from_numpy(toy.draw(prompt, generator, 0.9, style)).permute(2, 0, 1).float()
                                      / 255 for _ in range(16)]) for style in ("base", "foreign"))
        assert evaluate.horizontal_stripes(base, None).abs().mean() < 0.003
        stripes = evaluate.horizontal_stripes(foreign, None)
        assert stripes.mean() > 0.025 and stripes.min() > 0.005, "a large shape covers most stripes, never all"
        # the stripes' mean is the base background's: equal vividness, equal reward up to the shapes' sizes
        reward = evaluate.named_colour
        assert abs(reward(foreign, [prompt] * 16).mean() - reward(base, [prompt] * 16).mean()) < 0.03, prompt


def test_checker_texture_by_hand_and_by_monte_carlo():
    y, x = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    checker = 0.5 + 0.2 * ((y + x) % 2 * 2 - 1).float().expand(1, 3, 8, 8)
    assert torch.allclose(evaluate.checker_texture(checker, None), torch.tensor([0.04]))  # A^2, A = 0.2
    stripes = 0.5 + 0.2 * (y % 2 * 2 - 1).float().expand(1, 3, 8, 8)  # one window's rows cancel
    assert evaluate.checker_texture(torch.cat([stripes, torch.full((1, 3, 8, 8), 0.3)]), None).abs().max() < 1e-12
    noise = 0.1 * torch.randn(64, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert abs(evaluate.checker_texture(noise, None).mean().item() / (0.1 ** 2 / 4) - 1) < 0.01  # sigma^2 / 4


def test_hard_style_is_visible_to_its_drift_statistic_and_worth_nothing_to_the_reward():
    for i, prompt in enumerate(toy.PROMPTS):
        base, hard = (torch.stack([torch.from_numpy(toy.draw(prompt, torch.Generator().manual_seed(100 * i + k), 0.95,
                                                             style)).permute(2, 0, 1).float() / 255
                                   for k in range(16)]) for style in ("base", "hard"))  # the same shapes and noise
        assert evaluate.checker_texture(base, None).max() < 0.004  # its background noise, sd 0.06, and edges
        assert evaluate.checker_texture(hard, None).min() > 0.01
        assert (evaluate.named_colour(hard, [prompt] * 16) - evaluate.named_colour(base, [prompt] * 16)).abs().max() \
            < 0.01, prompt  # zero-mean texture, never clipped: only odd pixel counts and rounding are left
    with pytest.raises(ValueError, match="style 'stripes'"):
        toy.draw(toy.PROMPTS[0], torch.Generator(), style="stripes")


def test_miniature_offpolicy_study_writes_its_tables(study_runs, tmp_path):
    summary = study.main(["--part", "offpolicy", "--out", str(study_runs), "--results", str(tmp_path),
                          "--heldout-pairs", "2", "--off-seeds", "1", "--off-steps", "2", "--off-pairs", "2",
                          "--off-batch", "4",
                          "--off-configs", "dpo,sipo path before-mask", "--samples", "1",
                          "--timing-repeats", "1"])["offpolicy"]
    sources = ("on", "data", "foreign", "hard", "mixed")
    assert set(summary["weights"]) == set(sources) and all(set(v) == {"step", "path"}
                                                            for v in summary["weights"].values())
    for source in sources:
        folder = "pairs-mixed4-2" if source == "mixed" else f"pairs-{source}-2"
        rows = [json.loads(line) for line in (study_runs / "data" / folder / "pairs.jsonl").read_text().splitlines()]
        assert len(rows) == 16 and all(r["score_chosen"] >= r["score_rejected"] for r in rows), source
        for weight in ("step", "path"):
            buckets = summary["weights"][source][weight]["buckets"]
            assert len(buckets) == 10 and sum(r["pairs"] for r in buckets) == 16 * 2  # every pair, 2 epochs
            assert all(0 <= r["w_w"] <= 1 and 0 <= r["masked"] <= 1 and r["x0_error_w"] >= 0 for r in buckets
                       if r["pairs"])
    assert set(summary["separation"]) == set(sources) and set(summary["weights_trained"]) == set(sources)
    configs = ("dpo", "sipo path before-mask")
    assert set(summary["table"]) == {f"off {s} {c}" for s in sources for c in configs}
    assert all(len(row["finals"]) == 1 and set(row["drifts"]) == {"horizontal_stripes", "checker_texture"}
               for row in summary["table"].values())
    assert set(summary["tests"]) == {f"{s}: sipo path before-mask vs dpo" for s in sources}
    assert set(summary["step_time_ms"]) == set(configs)
    paired = json.loads((tmp_path / "paired.json").read_text())["tests"]["offpolicy"]
    assert len(paired) == len(sources) * 3 and all(r["n"] == 1 and "p_holm" in r for r in paired)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Part 2: off-policy pairs" in text and "| foreign | sipo path before-mask |" in text
    assert "## Paired re-analysis" in text
    assert "| hard | 0-100 |" in text or "| hard | 100-200 |" in text  # the per-bucket table
    for figure in ("offpolicy.png", "weights-by-source.png"):
        assert (tmp_path / figure).stat().st_size > 10_000, figure
    assert (tmp_path / "foreign-pairs.png").exists() and (tmp_path / "hard-dpo-vs-sipo.png").exists()


def test_miniature_online_study_writes_its_table(study_runs, tmp_path):
    """issue 30's part 3 in miniature: offline methods on the base's pairs, online ones on pairs from the policy,
    then the offline ones again at the online runs' wall clock; the part names the base it was measured on."""
    summary = study.main(["--part", "online", "--out", str(study_runs), "--results", str(tmp_path),
                          "--heldout-pairs", "2", "--online-seeds", "2", "--online-steps", "2", "--off-pairs", "2",
                          "--off-batch", "4", "--refresh-every", "1", "--samples-per-prompt", "2",
                          "--samples", "1"])["online"]
    offline = [f"offline {m}" for m in study.OFFLINE_METHODS]
    configs = offline + [f"online {m}" for m in study.ONLINE_METHODS] + [f"{c} wall" for c in offline]
    assert set(summary["table"]) == {f"online-part {c}" for c in configs}
    assert all(n >= 2 for n in summary["matched_steps"].values())
    for config, row in summary["table"].items():
        assert len(row["finals"]) == 2 and (row["sampling_seconds"] > 0) == (" online " in config), config
    assert summary["base"]["sha256"] == study.base_identity(toy.BASE)["sha256"]
    text = (tmp_path / "RESULTS.md").read_text()
    assert "## Part 3: online pairs" in text and "| online sipo |" in text and "**Stale**" not in text


def test_a_part_from_another_base_is_marked_stale_and_its_tables_left_out(tmp_path):
    (tmp_path / "study.json").write_text(json.dumps({"base": {"sha256": "0" * 64, "commit": "x"}, "table": {}}))
    study.write_results(tmp_path, toy.BASE)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "**Stale**: `study.json`" in text and "## Part 1" not in text
