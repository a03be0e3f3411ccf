"""bench.py's code paths on tiny inputs (the figures themselves come from `python bench.py`, not from tests)."""
import pytest
import torch

import bench
import models


def test_memory_planner_is_ordered_and_counts_the_published_sizes():
    plan = bench.memory_plan(gpus=(1, 8))
    assert set(plan) == set(models.FULL)
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
    one, two, three = (bench.saved_bytes(backbone, b, False) for b in (1, 2, 3))
    assert two - one == three - two > 0, "activations grow linearly; the constant part is saved weights"
    activations = bench.activation_bytes(backbone, 2)
    assert activations[False] == 2 * (two - one) and 0 < activations[True] < activations[False]


def test_device_benchmark_path_runs_on_tiny_models():
    results = bench.device_benchmarks(torch.device("cpu"), (("tiny-wan2.1-1.3b", 1),))
    row = results["tiny-wan2.1-1.3b"]
    assert row["seconds_per_step"] > 0 and row["achieved_tflops"] > 0 and row["mfu"] is None


def test_tiny_step_times_cover_every_family(tmp_path):
    bench.init_single_process()
    results = bench.tiny_step_times(1, tmp_path)
    assert set(results) == {f"tiny-{name}" for name in models.FULL}
    assert all(row["step_ms"] > 0 and 0 < row["parameters"] < 2_000_000 for row in results.values())
