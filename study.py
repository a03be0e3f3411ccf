"""The study: Diffusion-DPO, DPO-C&M and SIPO on the toy task, over a beta grid and seeds, plus SIPO ablations.

    python study.py                     # the full study: 70 minutes on 2 CPU cores; writes results/RESULTS.md
    python study.py --betas 1000,10000 --seeds 2 --steps 20 --no-ablations --out runs/mini --results runs/mini

Every run trains from the same toy base on the same pairs for the same steps (toy.py builds them once), one
process per run, two runs at a time. Each run's final model is scored on held-out seeds with the known reward;
its log gives loss-curve roughness, held-out accuracy over training, and step time.
"""
import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import torch

import evaluate
import models
import toy

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("dpo", "dpo-cm", "sipo")
LOADING = threading.Lock()  # from_pretrained patches torch.nn globally (empty-weight init): one load at a time
EVAL_SEED, SAMPLE_STEPS, GUIDANCE = 2_000_000, 20, 1.0


def run_one(name, flags, common, out):
    """One train.py process (1 thread, so two share the 2 cores); returns its directory, or None on failure."""
    run = out / "runs" / name
    if (run / "model" / "model_index.json").exists():
        return run
    subprocess.run(["rm", "-rf", str(run)], check=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("train.py")), *map(str, common + flags),
                             "--out", str(run)], env=env, capture_output=True, text=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    (out / "runs" / f"{name}.stderr").write_text(result.stderr[-20_000:])
    return run if result.returncode == 0 else None


def final_scores(run, samples):
    """named_colour of the run's final model on held-out seeds: (prompts, samples)."""
    with LOADING:
        backbone = models.load_backbone("toy", pretrained=str(run / "model"))
    images = evaluate.sample_all(backbone, toy.PROMPTS, samples, EVAL_SEED, SAMPLE_STEPS, GUIDANCE)
    return evaluate.score({"r": evaluate.named_colour}, images, toy.PROMPTS)["r"]


def log_metrics(run):
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    loss = np.array([r["loss"] for r in records])
    heldout = [r["heldout_accuracy"] for r in records if "heldout_accuracy" in r]
    rewards = [r["heldout_reward"] for r in records if "heldout_reward" in r]
    return {"roughness": float(np.abs(np.diff(loss)).mean()) if len(loss) > 1 else 0.0,
            "nonfinite": records[-1]["nonfinite_skipped"] if records else 0,
            "step_time": float(np.median([r["step_time"] for r in records[1:]])) if len(records) > 1 else 0.0,
            "heldout_accuracy": heldout, "heldout_reward": rewards,
            "mask_fraction": float(np.mean([r.get("mask_fraction", 0.0) for r in records]))}


def method_step_times(base, pairs, repeats=10):
    """Wall-clock per step of each loss on the toy model and pairs, interleaved in this one process (1 thread)."""
    import bench
    import data
    bench.init_single_process()
    backbone = models.load_backbone("toy", pretrained=str(base))
    dataset, _ = data.open_dataset(pairs, backbone)
    trainer = bench.Trainer(backbone, 8, torch.device("cpu")).use(dataset)
    return bench.loss_overhead(trainer, repeats)


def exact_permutation_p(a, b):
    """Two-sided exact permutation test of mean(a) = mean(b), over every split of the pooled values."""
    pooled, n = np.concatenate([a, b]), len(a)
    observed = abs(np.mean(a) - np.mean(b))
    splits = [abs(pooled[list(i)].mean() - np.delete(pooled, list(i)).mean())
              for i in itertools.combinations(range(len(pooled)), n)]
    return float(np.mean(np.array(splits) >= observed - 1e-12))


def summarise(results, base_mean, collapse_margin):
    """Per configuration: final reward and win rate over the base (mean and sd over seeds), collapse fraction,
    roughness, late degradation."""
    table = {}
    for config, runs in results.items():
        finals = np.array([r["final"] for r in runs if r["final"] is not None])
        wins = np.array([r["win_rate"] for r in runs if r["final"] is not None])
        failed = sum(r["final"] is None for r in runs)
        collapsed = failed + int((finals < base_mean - collapse_margin).sum())
        late = [r["heldout_accuracy"][-1] < max(r["heldout_accuracy"]) - 0.05 for r in runs
                if r["final"] is not None and len(r["heldout_accuracy"]) > 2]
        table[config] = {"final_mean": float(finals.mean()) if len(finals) else float("nan"),
                         "final_sd": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
                         "finals": finals.tolist(), "collapse_fraction": collapsed / len(runs),
                         "win_rate_mean": float(wins.mean()) if len(wins) else float("nan"),
                         "win_rate_sd": float(wins.std(ddof=1)) if len(wins) > 1 else 0.0,
                         "roughness": float(np.mean([r["roughness"] for r in runs if r["final"] is not None])),
                         "late_degradation": float(np.mean(late)) if late else 0.0,
                         "step_time": float(np.median([r["step_time"] for r in runs if r["final"] is not None])),
                         "mask_fraction": float(np.mean([r["mask_fraction"] for r in runs if r["final"] is not None]))}
    return table


def plot_beta(path, table, betas, base_mean):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, method in enumerate(METHODS):
        means = [table[f"{method} beta={b:g}"]["final_mean"] for b in betas]
        sds = [table[f"{method} beta={b:g}"]["final_sd"] for b in betas]
        rough = [max(table[f"{method} beta={b:g}"]["roughness"], 1e-9) for b in betas]  # a log axis
        axes[0].errorbar(betas, means, yerr=sds, marker="os^"[i], capsize=3, label=method)
        axes[1].plot(betas, rough, marker="os^"[i], label=method)
    axes[0].axhline(base_mean, color="grey", ls="--", label="base")
    axes[0].set(xscale="log", xlabel="beta", ylabel="held-out named_colour (mean ± sd over seeds)",
                title="final reward vs beta")
    axes[1].set(xscale="log", yscale="log", xlabel="beta", ylabel="mean |loss(t+1) - loss(t)|",
                title="loss-curve roughness")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/study", help="the runs (train.py directories)")
    parser.add_argument("--results", default="results", help="RESULTS.md, study.json and the plots")
    parser.add_argument("--toy", default="runs/toy", help="toy.py's directory: base model and pairs (built if absent)")
    parser.add_argument("--betas", default="100,1000,10000", help="comma-separated beta grid")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--samples", type=int, default=8, help="held-out samples per prompt per run")
    parser.add_argument("--ablation-beta", type=float, default=1000.0)
    parser.add_argument("--ablation-seeds", type=int, default=3)
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--collapse-margin", type=float, default=0.02, help="reward drop below base = collapse")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--timestep-pairs", type=int, default=32, help="pairs in the timestep analysis")
    args = parser.parse_args(argv)
    out, toy_dir, report = Path(args.out), Path(args.toy), Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    report.mkdir(parents=True, exist_ok=True)
    started = time.time()

    base = toy_dir / "base" / "model"
    if not (base / "model_index.json").exists():
        toy.main(["--out", str(toy_dir)])
    pairs = toy.make_preference_pairs(toy_dir / "data" / "pairs", base, 48, 10_000, SAMPLE_STEPS, GUIDANCE)
    heldout = toy.make_preference_pairs(toy_dir / "data" / "heldout", base, 8, 20_000, SAMPLE_STEPS, GUIDANCE)
    common = ["--model", "toy", "--pretrained", base, "--data", pairs, "--steps", args.steps, "--batch-size", 8,
              "--lr", args.lr, "--warmup", 10, "--checkpoint-every", 10_000, "--eval-data", heldout,
              "--eval-every", max(1, args.steps // 6), "--no-gradient-checkpointing"]

    betas = [float(b) for b in args.betas.split(",")]
    configs = {f"{m} beta={b:g}": ["--loss", m, "--beta", b] for m in METHODS for b in betas}
    ablations = {}
    if not args.no_ablations:
        sipo = ["--loss", "sipo", "--beta", args.ablation_beta]
        for flag, values in (("--tau", (0.0, 0.5, 0.8, 0.95)), ("--eps", (0.0, 0.02, 0.3)),
                             ("--sample-steps", (10, 200)), ("--temperature", (0.3, 3.0))):
            for value in values:
                ablations[f"sipo beta={args.ablation_beta:g} {flag[2:]}={value:g}"] = sipo + [flag, value]
    jobs = [(config, flags, seed) for config, flags in configs.items() for seed in range(args.seeds)]
    jobs += [(config, flags, seed) for config, flags in ablations.items() for seed in range(args.ablation_seeds)]

    base_scores = final_scores(base.parent, args.samples)
    base_mean = float(base_scores.mean())
    results = {}

    def work(job):
        config, flags, seed = job
        run = run_one(run_name(config, seed), flags + ["--seed", seed], common, out)
        entry = {"seed": seed, "final": None, "win_rate": None, "heldout_accuracy": [], "heldout_reward": [],
                 "roughness": 0.0,
                 "step_time": 0.0, "mask_fraction": 0.0, "nonfinite": 0}
        if run is not None:
            scores = final_scores(run, args.samples)  # the same prompts and seeds as base_scores: paired
            entry.update(log_metrics(run), final=float(scores.mean()),
                         win_rate=evaluate.compare_scores(base_scores, scores)["win_rate"])
        return config, entry

    torch.set_num_threads(1)
    with ThreadPoolExecutor(args.parallel) as pool:
        for done, (config, entry) in enumerate(pool.map(work, jobs), start=1):
            results.setdefault(config, []).append(entry)
            print(f"[{done}/{len(jobs)}] {config} seed {entry['seed']}: final {entry['final']}", flush=True)

    table = summarise(results, base_mean, args.collapse_margin)
    significance = {}
    for beta in betas:
        dpo = np.array(table[f"dpo beta={beta:g}"]["finals"])
        for method in ("dpo-cm", "sipo"):
            other = np.array(table[f"{method} beta={beta:g}"]["finals"])
            if len(dpo) and len(other):
                significance[f"{method} vs dpo, beta={beta:g}"] = {
                    "difference": float(other.mean() - dpo.mean()), "p": exact_permutation_p(other, dpo)}
    sensitivity = {m: float(np.ptp([table[f"{m} beta={b:g}"]["final_mean"] for b in betas])) for m in METHODS}
    timing = method_step_times(base, pairs)
    summary = {"base_mean": base_mean, "table": table, "significance": significance, "beta_spread": sensitivity,
               "step_time_ms": timing["median_ms"],
               "runs": results, "minutes": (time.time() - started) / 60, "args": {k: str(v) for k, v in
                                                                                   vars(args).items()}}
    (report / "study.json").write_text(json.dumps(summary, indent=1))
    plot_beta(report / "beta.png", table, betas, base_mean)
    seed0 = {m: out / "runs" / run_name(f"{m} beta={betas[len(betas) // 2]:g}", 0) for m in METHODS}
    evaluate.main(["curves", *[str(run) for run in seed0.values() if (run / "log.jsonl").exists()],
                   "--out", str(report / "curves.png")])
    for label, model in (("base", base), ("sipo", seed0["sipo"] / "model")):
        if (model / "model_index.json").exists():
            evaluate.main(["timesteps", "--model", "toy", "--pretrained", str(model), "--reference", str(base),
                           "--data", str(heldout), "--pairs", str(args.timestep_pairs), "--out",
                           str(report / f"timesteps-{label}")])
    write_results(report / "RESULTS.md", summary, betas, ablations)
    print(f"study done in {summary['minutes']:.1f} min: {report / 'RESULTS.md'}")
    return summary


def run_name(config, seed):
    return config.replace(" ", "_").replace("=", "") + f"_seed{seed}"


def reward_cells(row, base_mean):
    """Table cells: final reward mean ± sd, its difference from the base, win rate over the base mean ± sd."""
    return (f"{row['final_mean']:.4f} ± {row['final_sd']:.4f} | {row['final_mean'] - base_mean:+.4f} | "
            f"{row['win_rate_mean']:.2f} ± {row['win_rate_sd']:.2f}")


def write_results(path, summary, betas, ablations):
    table, base_mean, args = summary["table"], summary["base_mean"], summary["args"]
    lines = ["# Results: Diffusion-DPO, DPO-C&M and SIPO on the toy task", "",
             f"Written by `python study.py` in {summary['minutes']:.0f} minutes on {os.cpu_count()} CPU cores "
             f"({args['seeds']} seeds per method and beta, {args['steps']} steps, lr {args['lr']}, 8 pairs per step; "
             f"reward `named_colour` of {args['samples']} held-out samples per prompt; base model "
             f"{base_mean:.4f}). Collapse: final reward below base - {args['collapse_margin']}, or a failed run.", "",
             "## Final reward over the beta grid", "",
             "| method | beta | final reward (mean ± sd) | vs base | win rate over base (mean ± sd) | collapsed | "
             "loss roughness | held-out acc. degrades late | mean mask fraction |", "|---" * 9 + "|"]
    for config in [f"{m} beta={b:g}" for m in METHODS for b in betas]:
        row = table[config]
        method, beta = config.split(" beta=")
        lines.append(f"| {method} | {beta} | {reward_cells(row, base_mean)} | {row['collapse_fraction']:.0%} | "
                     f"{row['roughness']:.4f} | {row['late_degradation']:.0%} | {row['mask_fraction']:.2f} |")
    lines += ["", "## Matched beta: each method against Diffusion-DPO (exact permutation test over seeds)", "",
              "| comparison | difference in final reward | p |", "|---|---|---|"]
    lines += [f"| {k} | {v['difference']:+.4f} | {v['p']:.3f} |" for k, v in summary["significance"].items()]
    times = summary["step_time_ms"]
    lines += ["", "## Wall-clock per training step (toy model, 8 pairs, 1 thread, the three losses interleaved)", "",
              "| method | ms per step | ratio to Diffusion-DPO |", "|---|---|---|"]
    lines += [f"| {m} | {times[m]:.1f} | {times[m] / times['dpo']:.3f} |" for m in METHODS]
    lines += ["", "## Beta sensitivity: spread (max - min) of the mean final reward across the grid", "",
              "| method | spread |", "|---|---|"]
    lines += [f"| {m} | {v:.4f} |" for m, v in summary["beta_spread"].items()]
    if ablations:
        lines += ["", "## SIPO ablations", "", "| setting | final reward (mean ± sd) | vs base | win rate over base | "
                  "mean mask fraction |", "|---|---|---|---|---|"]
        for config in ablations:
            row = table[config]
            lines.append(f"| {config} | {reward_cells(row, base_mean)} | {row['mask_fraction']:.2f} |")
    lines += ["", "## Plots", "", "![final reward and roughness against beta](beta.png)", "",
              "![training curves, seed 0, middle beta](curves.png)", "",
              "![timestep analysis of the base](timesteps-base/timesteps.png)", "",
              "![timestep analysis after SIPO](timesteps-sipo/timesteps.png)", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
