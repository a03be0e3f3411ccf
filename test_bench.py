"""bench.py's code paths on tiny inputs (the figures themselves come from `python bench.py`, not from tests)."""
import json

import pytest
import torch

import bench
import models


def test_memory_planner_is_ordered_and_counts_the_published_sizes():
    """A UNet and a transformer (`python bench.py planner` plans all five: 10 s of meta-device forwards)."""
    plan = bench.memory_plan(gpus=(1, 8), names=("sd1.5", "wan2.1-1.3b"))
    assert plan["sd1.5"]["parameters"] == 859_520_964
    wan = plan["wan2.1-1.3b"]
    assert wan["parameters"] == 1_418_996_800
    rows = wan["per_gpu_gb"]
    assert rows["full, 8 GPUs, ckpt"] < rows["full, 1 GPU, ckpt"] < rows["full, 1 GPU, no ckpt"]
    assert rows["lora, 1 GPU, ckpt"] < rows["full, 1 GPU, ckpt"]
    # parameters, gradients, Adam and the bf16 reference on one GPU: (4 + 4 + 8 + 2) bytes a parameter
    states = 18 * wan["parameters"] / 2 ** 30
    assert rows["full, 1 GPU, ckpt"] == pytest.approx(states + wan["activations_gb"]["ckpt"], rel=1e-6)
    assert 0 < wan["activations_gb"]["ckpt"] < wan["activations_gb"]["no ckpt"]


def test_saved_bytes_are_linear_in_the_batch_and_checkpointing_saves_less():
    backbone = models.load_backbone("tiny-wan2.1-1.3b", device="meta")
    (one, one_blocks), (two, two_blocks), (three, _) = (bench.saved_bytes(backbone, b, False) for b in (1, 2, 3))
    assert two - one == three - two > 0, "activations grow linearly; the constant part is saved weights"
    assert 0 < sum(two_blocks) <= two, "what each block saves is part of the whole"
    activations = bench.activation_bytes(backbone, 2)
    largest = max(b - a for a, b in zip(one_blocks, two_blocks))
    assert activations[False] == 2 * (two - one) and 0 < activations[True] < activations[False]
    assert activations[True] == 2 * (bench.saved_bytes(backbone, 2, True)[0] - bench.saved_bytes(backbone, 1, True)[0]
                                     + largest)


def test_the_gpu_check_runs_at_tiny_size_and_reports_every_phase(tmp_path, capsys):
    """python bench.py gpu --tiny: the GPU check's script (torchrun, one rank with FSDP2 forced, DCP, a resume with
    an injected inf, the export) on this machine, so that its first GPU run is not its first run."""
    results = bench.main(["gpu", "--tiny", "--out", str(tmp_path / "gpu.json"), "--workdir", str(tmp_path / "w")])
    assert json.loads((tmp_path / "gpu.json").read_text())["runs"].keys() == results["runs"].keys() == \
        {"tiny-wan2.1-1.3b", "tiny-sd1.5"}
    for name, row in results["runs"].items():
        assert "error" not in row, row
        assert row["parallel"] == "fsdp" and row["seconds_per_step"] > 0 and row["checkpoint_s"] > 0
        assert row["resumed_from"] == 6 and row["nonfinite_skipped"] and row["steps_after_resume"] == [6, 7, 8]
        assert {"default", "cudnn", "flash"} <= row["attention"].keys()
        assert row["attention"]["flash"]["op"].startswith("aten::_scaled_dot_product_flash_attention")
    assert results["runs"]["tiny-wan2.1-1.3b"]["time_embedder_input"].startswith("float32")
    assert results["runs"]["tiny-sd1.5"]["exported"]
    printed = capsys.readouterr().out
    assert "resume, non-finite" in printed and "export" in printed


def test_tiny_step_times_cover_every_family(tmp_path):
    results = bench.tiny_step_times(1, tmp_path)
    assert set(results) == {f"tiny-{name}" for name in models.FULL}
    assert all(row["step_ms"] > 0 and 0 < row["parameters"] < 2_000_000 for row in results.values())


def test_communication_model_against_hand_counts():
    """1e9 parameters: FSDP moves 10 bytes a parameter times (n - 1) / n; hybrid keeps that inside the node and
    sends only the all-reduce of each GPU's fp32 gradient shard (2 x 4 bytes / 8 GPUs a parameter) across nodes."""
    one_node = bench.communication_bytes(1e9, 8)
    assert one_node["fsdp"] == {"nvlink": 10e9 * 7 / 8, "infiniband": 0.0} == one_node["hybrid"] | {"infiniband": 0.0}
    many = bench.communication_bytes(1e9, 64)
    assert many["fsdp"] == {"nvlink": 0.0, "infiniband": pytest.approx(10e9 * 63 / 64)}
    assert many["hybrid"] == {"nvlink": 10e9 * 7 / 8, "infiniband": pytest.approx(2 * 4e9 / 8 * 7 / 8)}


def test_scaling_model_rows_for_one_backbone():
    rows = bench.scaling_model(gpus=(8, 64), names=("sd1.5",))["sd1.5"]
    assert rows["fsdp, 8 GPUs"] == rows["hybrid, 8 GPUs"], "within one node the two layouts are the same"
    assert rows["hybrid, 64 GPUs"]["communication_s"] < rows["fsdp, 64 GPUs"]["communication_s"]
    assert rows["fsdp, 64 GPUs"]["compute_s"] > 0
    for row in rows.values():
        assert row["step_s_overlapped"] == max(row["communication_s"], row["compute_s"])


def test_cache_plan_counts_latents_per_pair_and_conditioning_per_distinct_prompt():
    row = bench.cache_plan(jobs=(("sd1.5", 1000, 10),))["sd1.5"]
    latents, prompt = 2 * 4 * 64 * 64, 77 * 768  # two 4 x 64 x 64 latents at 512^2; CLIP-L's 77 x 768 states
    assert row["gb_fp32"] == pytest.approx(4 * 1000 * (latents + prompt) / 1e9)
    assert row["gb_bf16_deduplicated"] == pytest.approx(2 * (1000 * latents + 10 * prompt) / 1e9)
    # the VAE encoder dominates: about 1.1 TFLOP an image at 512^2, CLIP-L about 13 GFLOP a prompt
    assert 1.5 < row["tflop_per_pair"] < 3 and 5 < row["gflop_per_prompt"] < 30 and row["gpu_hours"] > 0


def test_peer_comparison_without_a_local_copy_of_the_peer_is_skipped_in_one_line(tmp_path, capsys):
    for argv in (["peer"], ["peer", "--peer-script", str(tmp_path / "nowhere.py")]):
        assert bench.main([*argv, "--out", str(tmp_path / "bench.json")]) is None
        assert capsys.readouterr().out.strip().splitlines() == [
            f"peer: skipped: pass --peer-script PATH, a local copy of diffusers' {bench.PEER} (its imports installed: "
            "datasets, torchvision, wandb)"]
    assert not (tmp_path / "bench.json").exists(), "nothing is downloaded, nothing is written"


def test_live_bytes_counts_what_a_computation_holds_at_once_by_hand():
    """Fake tensors of 1000 fp32 values (4000 bytes): a * 2 and b + 1 held together (8000), then b let go before
    c * c (c and d: 8000); a view adds nothing; `a`, made before, is not counted."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        a = torch.zeros(1000)
        with bench.LiveBytes() as live:
            b = a * 2
            c = b + 1
            del b
            d = c * c
            view = d.view(10, 100)
        assert live.peak == 8000 and view.shape == (10, 100)


def test_host_plan_terms_by_hand_for_a_tiny_backbone():
    backbone = models.load_backbone("tiny-sd1.5", device="meta")
    count = sum(p.numel() for p in backbone.denoiser.parameters())
    lora = bench.host_plan(backbone, "lora", 0.5)
    assert lora["runtime"] == 0.5
    assert lora["adapters"] == 16 * bench.lora_parameter_count(backbone.denoiser, 64) / 2 ** 30
    assert 2 * count / 2 ** 30 < lora["base"] < 4 * count / 2 ** 30  # bf16 Linear and Conv weights, fp32 the rest
    full = bench.host_plan(backbone, "full", 0.5)
    # one of 2 ranks: half of the fp32 policy, gradients and Adam (16 bytes a parameter) and of the bf16 reference,
    # which with the gathered group outweighs building (the fp32 policy and its bf16 copy, 6 bytes a parameter)
    assert full["policy, gradients, Adam"] == 8 * count / 2 ** 30 and full["reference"] == count / 2 ** 30
    assert sum(full.values()) - full["runtime"] > 6 * count / 2 ** 30 and "building" not in full
    cache = bench.host_plan(backbone, "cache", 0.5)
    vae, text = (sum(p.numel() for p in m.parameters()) for m in (backbone.pipe.vae, backbone.pipe.text_encoder))
    assert cache["encoders"] >= 2 * (vae + text) / 2 ** 30 and cache["encoding"] > 0


def test_bench_json_names_each_figures_machine_and_says_which_targets_are_missed():
    xeon, epyc = {"cpu": "Xeon"}, {"cpu": "EPYC"}
    first = bench.merge_figures({}, {"machine": xeon, "1 loss overhead": {"sipo_over_dpo": 0.99}}, "aaa")
    second = bench.merge_figures(first, {"machine": epyc, "10 native": {}}, "bbb")
    assert second["measured_on"] == {"1 loss overhead": {"cpu": "Xeon", "commit": "aaa"},
                                     "10 native": {"cpu": "EPYC", "commit": "bbb"}}
    assert "machine" not in second and second["1 loss overhead"] == {"sipo_over_dpo": 0.99}
    lines = bench.target_verdicts({"1 loss overhead": {"sipo_over_dpo": 0.99, "dpo_cm_over_dpo": 1.041},
                                   "8 data": {"reading": {"peak_rss_8_over_1": 1.03}}})
    assert lines == ["  1 loss overhead: SIPO / DPO 0.990 <= 1.02: met",
                     "  1 loss overhead: DPO-C&M / DPO 1.041 <= 1.02: MISSED",
                     "  8 data: peak RSS reading 8 shards / 1 1.030 <= 1.15: met"]
    assert list(bench.flat({"a": {"b": 1.23456, "c": "x"}})) == [("a / b", "1.235"), ("a / c", "x")]
