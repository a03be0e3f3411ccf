"""The study: Diffusion-DPO, DPO-C&M and SIPO on the toy task, over a beta grid and seeds, plus SIPO ablations;
their readings on off-policy pair sources; offline pairs against online ones.

    python study.py                     # both parts; writes results/RESULTS.md (times: docs/performance.md)
    python study.py --part offpolicy    # one part; runs that finished are reused, so a killed study resumes
    python study.py --part online       # offline pairs against pairs sampled from the policy (train.py --pairs online)
    python study.py --betas 1000,10000 --seeds 2 --steps 20 --no-ablations --out runs/mini --results runs/mini

Every run trains from the same toy base (toy.py's shipped one by default) on the same pairs for the same steps, one
process per run (launcher.py), two runs at a time (--concurrent-runs). Each run's final model is scored on held-out
seeds with the known reward; its log gives loss-curve roughness, held-out accuracy over training, and step time.
"""
import argparse
import copy
import hashlib
import itertools
import json
import math
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import matplotlib
import numpy as np
import torch

import bench
import data
import evaluate
import launcher
import models
import online
import sipo
import toy
import train
from common import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, ArgumentParser, check_numbers, check_output, cpu_name,
                    error_line)
from rundir import RunDir

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("dpo", "dpo-cm", "sipo")
LOADING = threading.Lock()  # from_pretrained patches torch.nn globally (empty-weight init): one load at a time
EVAL_SEED, SAMPLE_STEPS, GUIDANCE = 2_000_000, toy.SAMPLE_STEPS, toy.GUIDANCE


def run_one(name, flags, common, out):
    """One train.py run in a process of its own (1 thread, so two share the 2 cores); returns its RunDir, or None
    on failure. Its stdout and stderr are in runs/NAME.log."""
    run = RunDir(out / "runs" / name)
    if run.has_model():
        return run
    shutil.rmtree(run.path, ignore_errors=True)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    log = out / "runs" / f"{name}.log"
    log.unlink(missing_ok=True)
    status = launcher.finish(launcher.launch([*common, *flags, "--out", run], threads=1, log=log))
    return run if status == 0 else None


def final_scores(model, samples, rewards=("named_colour",)):
    """Each reward of a model (a run's final one, or the base) on held-out seeds: {name: (prompts, samples)}, and
    the images."""
    with LOADING:
        backbone = models.load_backbone("toy", pretrained=str(model))
    images = evaluate.sample_all(backbone, toy.PROMPTS, samples, EVAL_SEED, SAMPLE_STEPS, GUIDANCE)
    return evaluate.score({name: evaluate.BUILTIN[name] for name in rewards}, images, toy.PROMPTS), images


def log_metrics(run):
    records = run.read_log()
    loss = np.array([r["loss"] for r in records])
    heldout = [r["heldout_accuracy"] for r in records if "heldout_accuracy" in r]
    rewards = [r["heldout_reward"] for r in records if "heldout_reward" in r]
    def mean_of(key, part=slice(None)):
        values = [r[key] for r in records[part] if key in r]
        return float(np.mean(values)) if values else 0.0

    third = max(1, len(records) // 3)

    return {"roughness": float(np.abs(np.diff(loss)).mean()) if len(loss) > 1 else 0.0,
            "nonfinite": records[-1]["nonfinite_skipped"] if records else 0,
            "step_time": float(np.median([r["step_time"] for r in records[1:]])) if len(records) > 1 else 0.0,
            "heldout_accuracy": heldout, "heldout_reward": rewards,
            "mask_fraction": mean_of("mask_fraction"), "clip_fraction_branch": mean_of("clip_fraction_branch"),
            "clip_fraction_pair": mean_of("clip_fraction_pair"),
            # training seconds, --pairs online's sampling counted; the mean step weight early and late in training
            "train_seconds": float(sum(r["step_time"] + r.get("refresh_seconds", 0.0) for r in records)),
            "sampling_seconds": float(sum(r.get("refresh_seconds", 0.0) for r in records)),
            "weight_early": mean_of("weight_mean", slice(0, third)), "weight_late": mean_of("weight_mean",
                                                                                            slice(-third, None))}


def method_step_times(base, pairs, repeats=10, variants=None):
    """Wall-clock per step of each loss (or variant: name -> train.py flags) on the toy model and pairs,
    interleaved in this one process (1 thread): bench.py's figure 1 on the toy."""
    print(f"timing a step of each method, {repeats} interleaved steps each ...", flush=True)
    backbone = models.load_backbone("toy", pretrained=str(base))
    dataset, _ = data.open_dataset(pairs, backbone)
    return bench.loss_overhead(bench.StepTimer(backbone, 8, torch.device("cpu"), data_path=pairs).use(dataset),
                               repeats, variants)


def exact_permutation_p(a, b):
    """Two-sided exact permutation test of mean(a) = mean(b), over every split of the pooled values."""
    pooled, n = np.concatenate([a, b]), len(a)
    observed = abs(np.mean(a) - np.mean(b))
    splits = [abs(pooled[list(i)].mean() - np.delete(pooled, list(i)).mean())
              for i in itertools.combinations(range(len(pooled)), n)]
    return float(np.mean(np.array(splits) >= observed - 1e-12))


def difference_test(a, b):
    """mean(a) - mean(b) over seeds, and its exact permutation p."""
    a, b = np.asarray(a), np.asarray(b)
    return {"difference": float(a.mean() - b.mean()), "p": exact_permutation_p(a, b)}


# Paired statistics: every method at a given seed shares the pairs, their order, t and noise (train.pair_noise),
# so runs are compared seed against seed. Student's t at 97.5% for the intervals (a table: no scipy here); a df
# between rows takes the row below, which is wider.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
EQUIVALENCE_MARGIN = 0.005  # named_colour: a twelfth of what SIPO gains over the base on the toy (+0.06)


def paired_test(a, b):
    """b - a paired by seed: the mean difference, its sd, a 95% t interval, the two-sided sign-flip p (exact over
    the 2^n sign patterns of the differences up to n = 16, else from 100,000 of them), and how many differences are
    positive."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    n, mean = len(d), float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    half = float(T_975[max(k for k in T_975 if k <= max(n - 1, 1))] * sd / np.sqrt(n))
    if n <= 16:  # every sign pattern
        flips = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        p = float(np.mean(np.abs((flips * d).mean(1)) >= abs(mean) - 1e-12))
    else:  # 2^n is too many: 100,000 random patterns, the observed one counted in
        flips = np.random.default_rng(0).choice((1.0, -1.0), size=(100_000, n))
        p = float((np.sum(np.abs((flips * d).mean(1)) >= abs(mean) - 1e-12) + 1) / 100_001)
    return {"difference": mean, "sd": sd, "ci": [mean - half, mean + half], "p": p, "n": n,
            "positive": int((d > 0).sum())}


def sign_test(differences):
    """Two-sided exact binomial p that positive and negative differences are equally likely (zeros dropped)."""
    signs = [x > 0 for x in differences if x != 0]
    m, k = len(signs), sum(signs)
    tail = sum(math.comb(m, i) for i in range(min(k, m - k) + 1)) / 2 ** m if m else 1.0
    return min(1.0, 2 * tail)


def holm(pvalues):
    """Holm's step-down adjusted p-values, in the order given: the family-wise error over all of them."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


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
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", default="all", choices=("all", *PARTS, "paired"),
                        help="onpolicy: the beta grid and ablations on the base's own pairs; offpolicy: the four "
                             "pair sources and weight readings of docs/method.md; online: offline pairs against "
                             "pairs from the policy (default: all). Finished runs are reused. paired: no runs, the "
                             "paired re-analysis of the parts in --results (paired.json)")
    parser.add_argument("--out", default="runs/study", help="the runs (train.py directories)")
    parser.add_argument("--results", default="results", help="RESULTS.md, study.json and the plots")
    parser.add_argument("--base", default=str(toy.BASE), help=f"the base model (default toy.py's, {toy.BASE.name}/)")
    parser.add_argument("--pairs", type=int, default=48, help="training pairs per prompt of the on-policy part")
    parser.add_argument("--betas", default="100,1000,10000", help="comma-separated beta grid")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--samples", type=int, default=8, help="held-out samples per prompt per run")
    parser.add_argument("--ablation-beta", type=float, default=1000.0)
    parser.add_argument("--ablation-seeds", type=int, default=3)
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--off-beta", type=float, default=1000.0, help="the off-policy part's matched beta")
    parser.add_argument("--off-seeds", type=int, default=5)
    parser.add_argument("--off-steps", type=int, default=60)
    parser.add_argument("--off-batch", type=int, default=8, help="pairs per step in the off-policy part")
    parser.add_argument("--off-pairs", type=int, default=48, help="pairs per prompt of each off-policy source")
    parser.add_argument("--off-sources", default=",".join(SOURCES),
                        help=f"comma-separated, of: {', '.join(SOURCES)} (default: all; on is needed)")
    parser.add_argument("--off-configs", default=",".join(OFF_CONFIGS),
                        help=f"comma-separated, of: {', '.join(OFF_CONFIGS)} (default: all)")
    parser.add_argument("--online-steps", type=int, default=40,
                        help="online part: optimizer steps at matched steps (40, not 60: the study's time budget)")
    parser.add_argument("--online-seeds", type=int, default=5)
    parser.add_argument("--refresh-every", type=int, default=5, help="online part: steps between refreshes")
    parser.add_argument("--samples-per-prompt", type=int, default=8, help="online part: samples a prompt a refresh")
    parser.add_argument("--gradient-batches", type=int, default=16,
                        help="gradient part: batches of --off-batch pairs over which each setting's movement is taken")
    parser.add_argument("--control-seeds", type=int, default=8, help="control part: seeds per configuration")
    parser.add_argument("--degrade-lrs", default="1e-3,2e-3,3e-3", help="degrade part: the sweep's learning rates")
    parser.add_argument("--degrade-betas", default="1000,10000", help="degrade part: the sweep's betas")
    parser.add_argument("--degrade-steps", type=int, default=60)
    parser.add_argument("--degrade-seeds", type=int, default=8)
    parser.add_argument("--collapse-margin", type=float, default=0.02, help="reward drop below base = collapse")
    parser.add_argument("--concurrent-runs", type=int, default=2, help="training runs at a time, 1 thread each")
    parser.add_argument("--timing-repeats", type=int, default=10, help="interleaved steps per method when timing")
    parser.add_argument("--heldout-pairs", type=int, default=8, help="held-out pairs per prompt (accuracy in training)")
    parser.add_argument("--timestep-pairs", type=int, default=32, help="pairs in the timestep analysis")
    parser.add_argument("--timestep-buckets", type=int, default=20, help="timestep buckets in the timestep analysis")
    args = parser.parse_args(argv)
    try:
        check_numbers(args, {
            **dict.fromkeys(("seeds", "steps", "samples", "pairs", "ablation_seeds", "off_seeds", "off_steps",
                             "off_batch", "off_pairs", "concurrent_runs", "heldout_pairs", "timestep_pairs",
                             "timestep_buckets", "timing_repeats", "online_steps", "online_seeds", "refresh_every",
                             "gradient_batches", "control_seeds", "degrade_steps", "degrade_seeds"),
                            AT_LEAST_1), "samples_per_prompt": online.SAMPLES_PER_PROMPT,
            **dict.fromkeys(("lr", "ablation_beta", "off_beta"), POSITIVE), "collapse_margin": NON_NEGATIVE})
        check_output(args.out)
        check_output(args.results, "--results")
    except ValueError as error:
        sys.exit(error_line(error))
    for flag, chosen, known in (("--off-configs", args.off_configs, OFF_CONFIGS),
                                ("--off-sources", args.off_sources, SOURCES)):
        unknown = sorted(set(chosen.split(",")) - set(known))
        if unknown:
            sys.exit(f"error: {flag}: {', '.join(unknown)} unknown; choose from {', '.join(known)}")
    if "on" not in args.off_sources.split(","):  # the separation bar is measured against the on-policy gap
        sys.exit(f"error: --off-sources: on is needed; got {args.off_sources}")
    out, base, report = Path(args.out), Path(args.base), Path(args.results)
    if not (base / "model_index.json").is_file():
        sys.exit(f"error: --base {base}: not a model directory (no model_index.json)")
    out.mkdir(parents=True, exist_ok=True)
    report.mkdir(parents=True, exist_ok=True)
    if args.part == "paired":
        summary = paired_part(report)
        write_results(report, base)
        print(f"paired re-analysis written: {report / 'paired.json'}, {report / 'RESULTS.md'}")
        return {"paired": summary}

    heldout = toy.make_preference_pairs(out / "data" / f"heldout-{args.heldout_pairs}", base, args.heldout_pairs,
                                        20_000, SAMPLE_STEPS, GUIDANCE)
    torch.set_num_threads(1)
    summaries = {}
    if args.part in ("all", "onpolicy"):
        pairs = toy.make_preference_pairs(out / "data" / f"pairs-on-{args.pairs}", base, args.pairs, 10_000,
                                          SAMPLE_STEPS, GUIDANCE)
        summaries["onpolicy"] = onpolicy(args, out, report, base, pairs, heldout)
    if args.part in ("all", "offpolicy"):
        summaries["offpolicy"] = offpolicy(args, out, report, base, heldout)
    if args.part in ("all", "online"):
        summaries["online"] = online_part(args, out, report, base, heldout)
    if args.part in ("all", "gradient"):
        summaries["gradient"] = gradient_part(args, out, report, base)
    if args.part in ("all", "control"):
        summaries["control"] = control_part(args, out, report, base, heldout)
    if args.part in ("all", "degrade"):
        summaries["degrade"] = degrade_part(args, out, report, base, heldout)
    summaries["paired"] = paired_part(report)
    write_results(report, base)
    print(f"study written: {report / 'RESULTS.md'}")
    return summaries


def run_jobs(jobs, common, out, args, rewards, base_scores):
    """Train and score every (config, flags, seed) job, `args.concurrent_runs` at a time: {config: [run entries]}."""
    results = {}

    def work(job):
        config, flags, seed = job
        run = run_one(run_name(config, seed), flags + ["--seed", seed], common, out)
        entry = {"seed": seed, "final": None, "win_rate": None, "heldout_accuracy": [], "heldout_reward": [],
                 "roughness": 0.0, "step_time": 0.0, "mask_fraction": 0.0, "nonfinite": 0}
        if run is not None:
            scores, _ = final_scores(run.model, args.samples, rewards)  # the same prompts and seeds as base_scores
            entry.update(log_metrics(run), final=float(scores[rewards[0]].mean()),
                         win_rate=evaluate.compare_scores(base_scores[rewards[0]], scores[rewards[0]])["win_rate"],
                         **{f"final_{name}": float(scores[name].mean()) for name in rewards[1:]})
        return config, entry

    failed = []
    with ThreadPoolExecutor(args.concurrent_runs) as pool:
        for done, (config, entry) in enumerate(pool.map(work, jobs), start=1):
            results.setdefault(config, []).append(entry)
            if entry["final"] is None:
                failed.append(out / "runs" / f"{run_name(config, entry['seed'])}.log")
            outcome = f"final {entry['final']:.4f}" if entry["final"] is not None else f"failed, see {failed[-1]}"
            print(f"[{done}/{len(jobs)}] {config} seed {entry['seed']}: {outcome}", flush=True)
    if len(failed) == len(jobs):  # nothing to summarise: the cause is not the method, and each log says it
        sys.exit(f"error: all {len(jobs)} training runs failed; the first one's log: {failed[0]}")
    return results


def onpolicy(args, out, report, base, pairs, heldout):
    """The beta grid and the ablations on the base's own pairs; writes study.json, beta.png, curves.png and the
    timestep analyses."""
    started = time.time()
    common = ["--model", "toy", "--pretrained", base, "--data", pairs, "--steps", args.steps, "--batch-size", 8,
              "--lr", args.lr, "--warmup", 10, "--checkpoint-every", 10_000, "--eval-data", heldout,
              "--eval-every", max(1, args.steps // 6), "--no-gradient-checkpointing"]
    betas = [float(b) for b in args.betas.split(",")]
    configs = {f"{m} beta={b:g}": ["--loss", m, "--beta", b] for m in METHODS for b in betas}
    ablations = {}
    if not args.no_ablations:
        sipo_flags = ["--loss", "sipo", "--beta", args.ablation_beta]
        for flag, values in (("--tau", (0.0, 0.5, 0.8, 0.95)), ("--eps", (0.0, 0.02, 0.3)),
                             ("--weight-sampler-steps", (10, 200)), ("--temperature", (0.3, 3.0))):
            for value in values:
                ablations[f"sipo beta={args.ablation_beta:g} {flag[2:]}={value:g}"] = sipo_flags + [flag, value]
    jobs = [(config, flags, seed) for config, flags in configs.items() for seed in range(args.seeds)]
    jobs += [(config, flags, seed) for config, flags in ablations.items() for seed in range(args.ablation_seeds)]
    base_scores, _ = final_scores(base, args.samples)
    base_mean = float(base_scores["named_colour"].mean())
    results = run_jobs(jobs, common, out, args, ("named_colour",), base_scores)

    table = summarise(results, base_mean, args.collapse_margin)
    significance = {}
    for beta in betas:
        dpo = np.array(table[f"dpo beta={beta:g}"]["finals"])
        for method in ("dpo-cm", "sipo"):
            other = np.array(table[f"{method} beta={beta:g}"]["finals"])
            if len(dpo) and len(other):
                significance[f"{method} vs dpo, beta={beta:g}"] = difference_test(other, dpo)
    sensitivity = {m: float(np.ptp([table[f"{m} beta={b:g}"]["final_mean"] for b in betas])) for m in METHODS}
    timing = method_step_times(base, pairs, args.timing_repeats)
    summary = {"base": base_identity(base), "cpu": cpu_name(), "base_mean": base_mean, "betas": betas,
               "ablations": list(ablations),
               "table": table,
               "significance": significance, "beta_spread": sensitivity, "step_time_ms": timing["median_ms"],
               "runs": results, "minutes": (time.time() - started) / 60,
               "args": {k: str(v) for k, v in vars(args).items()}}
    (report / "study.json").write_text(json.dumps(summary, indent=1))
    plot_beta(report / "beta.png", table, betas, base_mean)
    seed0 = {m: RunDir(out / "runs" / run_name(f"{m} beta={betas[len(betas) // 2]:g}", 0)) for m in METHODS}
    evaluate.run(["curves", *[str(run) for run in seed0.values() if run.log_file.exists()],
                   "--out", str(report / "curves.png")])
    for label, model in (("base", base), ("sipo", seed0["sipo"].model)):
        if (model / "model_index.json").exists():
            evaluate.run(["timesteps", "--model", "toy", "--pretrained", str(model), "--reference", str(base),
                           "--data", str(heldout), "--pairs", str(args.timestep_pairs),
                           "--buckets", str(args.timestep_buckets), "--out",
                           str(report / f"timesteps-{label}")])
    return summary


# ---------------------------------------------------------------------------------------------------------
# The off-policy part (docs/method.md): pair sources x weight readings
# ---------------------------------------------------------------------------------------------------------

PARTS = ("onpolicy", "offpolicy", "online", "gradient", "control", "degrade")
READINGS = [f"{weight} {normalise}" for weight in sipo.WEIGHTS for normalise in sipo.NORMALISATIONS]
OFF_CONFIGS = {"dpo": ["--loss", "dpo"], "dpo-cm": ["--loss", "dpo-cm"],
               **{f"sipo {r}": ["--loss", "sipo", "--weight", r.split()[0], "--normalise", r.split()[1]]
                  for r in READINGS}}
DRIFT = "horizontal_stripes"  # the online part's: its pairs hold no foreign style
DRIFTS = {"foreign": "horizontal_stripes", "hard": "checker_texture"}  # each generator's style the reward is blind to
SOURCES = ("on", "data", "foreign", "hard", "mixed")


def source_pairs(folder, base, per_prompt, sources=SOURCES):
    """{source: manifest}, `per_prompt` pairs per prompt each (in folders named by source and size: "on" is the
    on-policy part's pairs when the sizes agree); "mixed" is a quarter of each of the other four."""
    manifests = {"on": toy.make_preference_pairs(folder / f"pairs-on-{per_prompt}", base, per_prompt, 10_000,
                                                 SAMPLE_STEPS, GUIDANCE)}
    for source in ("data", "foreign", "hard"):
        if source in sources or "mixed" in sources:
            manifests[source] = toy.make_preference_pairs(folder / f"pairs-{source}-{per_prompt}", base, per_prompt,
                                                          30_000, SAMPLE_STEPS, GUIDANCE, source)
    if "mixed" in sources:
        mixed = folder / f"pairs-mixed4-{per_prompt}"
        if not (mixed / "pairs.jsonl").exists():
            toy.mix_pairs(mixed, [manifests[s] for s in ("on", "data", "foreign", "hard")])
        manifests["mixed"] = mixed / "pairs.jsonl"
    return {source: manifests[source] for source in sources}


@torch.no_grad()
def weights_by_bucket(model, manifest, buckets=10, epochs=2, tau=0.9, batch=64):
    """Under `model` (policy and reference alike): each pair's x0 errors and step and path weights, winner and loser
    at the same t and eps, t drawn as training draws it (seed 0, `epochs` epochs), grouped by timestep bucket.
    {weight: {"buckets": [per bucket: medians of winner and loser x0 error and w, the fraction of pairs whose
    winner's w is below the loser's, the median gap w_l - w_w, the fraction masked], "kept": the same over the
    buckets where the mask (min(w_w, w_l) < tau) keeps at least half the pairs, "all": over every pair}}."""
    print(f"the weights by timestep bucket: {Path(manifest).parent.name} under {Path(model).parent.name}/"
          f"{Path(model).name} ...", flush=True)
    backbone = models.load_backbone("toy", pretrained=str(model))
    dataset, _ = data.open_dataset(manifest, backbone)
    edges = evaluate.bucket_levels(backbone, buckets)
    table = {}
    for weight in sipo.WEIGHTS:
        args = train.parse_args(["--model", "toy", "--data", str(manifest), "--loss", "sipo", "--weight", weight])
        levels, errors, log_ws = [], [], []
        for epoch in range(epochs):
            for start in range(0, len(dataset), batch):
                items = data.collate([dataset[i] for i in range(start, min(start + batch, len(dataset)))])
                # pair_noise is seeded by (seed, epoch, pair): these are the levels pair_errors draws again inside
                level = train.pair_noise(backbone, items["index"], epoch, items["pixels_w"].shape[1:], args,
                                         backbone.device)[0]
                error, _, log_w = train.pair_errors(backbone, backbone.denoiser, backbone.denoiser, items, epoch,
                                                    args, True)
                (a, s), _ = backbone.coefficients(level)
                levels.append(level)
                errors.append(error.view(2, -1) * sipo.x0_error_scale(a, s, backbone.prediction))
                log_ws.append(log_w.view(2, -1))
        level, x0_error, w = torch.cat(levels).numpy(), torch.cat(errors, 1), torch.cat(log_ws, 1).exp()
        rows, kept = [], np.zeros(len(level), bool)
        for low, high in zip(edges[:-1], edges[1:]):
            inside = (level >= low) & (level < high)
            rows.append({"level_low": float(low), "level_high": float(high),
                         **separation(x0_error[:, inside], w[:, inside], tau)})
            if rows[-1].get("masked", 1.0) < 0.5:
                kept |= inside
        table[weight] = {"buckets": rows, "kept": separation(x0_error[:, kept], w[:, kept], tau),
                         "all": separation(x0_error, w, tau)}
    return table


def separation(x0_error, w, tau):
    """Winner (row 0) against loser (row 1), pair by pair: how the weight tells them apart."""
    if w.shape[1] == 0:
        return {"pairs": 0}
    return {"pairs": int(w.shape[1]), "x0_error_w": float(x0_error[0].median()),
            "x0_error_l": float(x0_error[1].median()), "w_w": float(w[0].median()), "w_l": float(w[1].median()),
            "winner_lower": float((w[0] < w[1]).float().mean()), "gap": float((w[1] - w[0]).median()),
            "masked": float((w.min(0).values < tau).float().mean())}


def separation_verdict(weights, source):
    """Is a source's separation fit for purpose (the study's bar): in the buckets the mask keeps, winners' step
    weight below the losers' in at least 80% of pairs, and a median gap at least ten times the on-policy one."""
    kept, on = weights[source]["step"]["kept"], weights["on"]["step"]["kept"]
    ratio = kept["gap"] / max(abs(on["gap"]), 1e-12)
    return {"winner_lower": kept["winner_lower"], "gap": kept["gap"], "gap_over_on": ratio,
            "fit": kept["winner_lower"] >= 0.8 and ratio >= 10}


def offpolicy(args, out, report, base, heldout):
    """Diffusion-DPO, DPO-C&M and SIPO in each weight x normalisation reading, on each pair source, at one
    beta; the weights per timestep bucket by source under the base and after training; writes offpolicy.json,
    offpolicy.png and weights-by-source.png."""
    started = time.time()
    configs, sources = args.off_configs.split(","), args.off_sources.split(",")
    manifests = source_pairs(out / "data", base, args.off_pairs, sources)
    weights = {source: weights_by_bucket(base, manifest) for source, manifest in manifests.items()}
    rewards = ("named_colour", *DRIFTS.values())
    base_scores, base_images = final_scores(base, args.samples, rewards)
    base_mean = float(base_scores["named_colour"].mean())
    base_drift = {name: float(base_scores[name].mean()) for name in DRIFTS.values()}
    results = {}
    for source, manifest in manifests.items():
        common = off_common(args, manifest, heldout, base, args.off_steps)
        jobs = [(f"off {source} {config}", OFF_CONFIGS[config], seed) for config in configs
                for seed in range(args.off_seeds)]
        results.update(run_jobs(jobs, common, out, args, rewards, base_scores))
    table = summarise(results, base_mean, args.collapse_margin)
    for config, runs in results.items():
        done = [r for r in runs if r["final"] is not None]
        drifts = {name: np.array([r[f"final_{name}"] for r in done]) for name in DRIFTS.values()}
        table[config].update(drifts={name: d.tolist() for name, d in drifts.items()},
                             drift_mean={name: float(d.mean()) for name, d in drifts.items()},
                             drift_sd={name: float(d.std(ddof=1)) if len(d) > 1 else 0.0 for name, d in drifts.items()},
                             clip_fraction_branch=float(np.mean([r.get("clip_fraction_branch", 0) for r in runs])),
                             clip_fraction_pair=float(np.mean([r.get("clip_fraction_pair", 0) for r in runs])),
                             heldout_final=float(np.mean([r["heldout_accuracy"][-1] for r in runs
                                                          if r["heldout_accuracy"]] or [float("nan")])))
    tests = {}
    for source in manifests:
        for config in configs:
            for other in ("dpo-cm", "dpo"):
                if not config.startswith("sipo") or other not in configs:
                    continue
                mine, versus = table[f"off {source} {config}"], table[f"off {source} {other}"]
                tests[f"{source}: {config} vs {other}"] = {
                    "finals": difference_test(mine["finals"], versus["finals"]),
                    **{name: difference_test(mine["drifts"][name], versus["drifts"][name]) for name in DRIFTS.values()}}
    trained = {source: RunDir(out / "runs" / run_name(f"off {source} {configs[-1]}", 0)) for source in manifests}
    weights_trained = {source: weights_by_bucket(run.model, manifests[source]) for source, run in trained.items()
                       if run.has_model()}
    variants = {"dpo": {"loss": "dpo", "weight": "step", "normalise": "after-mask"},
                "dpo-cm": {"loss": "dpo-cm", "weight": "step", "normalise": "after-mask"},
                **{f"sipo {r}": {"loss": "sipo", "weight": r.split()[0], "normalise": r.split()[1]}
                   for r in READINGS}}
    variants = {"dpo": variants["dpo"], **{c: variants[c] for c in configs}}  # Diffusion-DPO first: the baseline
    timing = method_step_times(base, manifests[sources[-1]], args.timing_repeats, variants)
    summary = {"base": base_identity(base), "cpu": cpu_name(), "base_mean": base_mean, "base_drift": base_drift,
               "configs": configs, "sources": sources, "weights": weights, "weights_trained": weights_trained,
               "trained_with": configs[-1],
               "separation": {source: separation_verdict(weights, source) for source in manifests},
               "table": table, "tests": tests,
               "step_time_ms": timing["median_ms"], "runs": results, "minutes": (time.time() - started) / 60,
               "args": {k: str(v) for k, v in vars(args).items()}}
    (report / "offpolicy.json").write_text(json.dumps(summary, indent=1))
    plot_offpolicy(report / "offpolicy.png", table, base_mean, base_drift, sources, configs)
    plot_weights(report / "weights-by-source.png", weights, weights_trained, configs[-1])
    for source in [s for s in DRIFTS if s in manifests]:  # in a fixed order, as RESULTS.md lists them
        lines = manifests[source].read_text().splitlines()[:8]
        save_pairs_grid(report / f"{source}-pairs.png", manifests[source].parent, lines)
        seed0 = [RunDir(out / "runs" / run_name(f"off {source} {m}", 0)) for m in (configs[0], configs[-1])]
        tuned = [final_scores(run.model, 1, rewards)[1] for run in seed0 if run.has_model()]
        if len(tuned) == 2:
            rows = [("base", base_images[:, 0]), (configs[0], tuned[0][:, 0]), (configs[-1], tuned[1][:, 0])]
            evaluate.save_grid(report / f"{source}-dpo-vs-sipo.png", rows, toy.PROMPTS)
    return summary


# ---------------------------------------------------------------------------------------------------------
# How far re-weighting can move the gradient (--part gradient): SIPO against DPO-C&M at the same mask and clip
# ---------------------------------------------------------------------------------------------------------

GRADIENT_SOURCES = ("on", "foreign", "hard")
GRADIENT_GRID = {"eps": (0.1, 0.3, 0.5), "temperature": (1.0, 3.0, 10.0)}
STRONG_ENOUGH = 0.05  # a reading that moves the gradient by less than this is not worth a training comparison


def flat_gradient(loss, params):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])


def gradient_movement(base, manifest, batches, batch):
    """Under the base as policy and reference, batch by batch as training draws them (`batch` pairs, epoch 0): for
    each weight, normalisation, eps and temperature, ||g_SIPO - g_DPO-C&M|| / ||g_DPO-C&M|| (the two losses at the
    same weights, mask and clip: what re-weighting alone changes) and the mask fraction, medians over `batches`
    batches; and, for scale, how far DPO-C&M's gradient moves when the same pairs draw another t and noise
    (epoch 1 against 0, default settings)."""
    backbone = models.load_backbone("toy", pretrained=str(base))
    policy = backbone.denoiser
    reference = copy.deepcopy(policy).requires_grad_(False)
    params = [p for p in policy.parameters() if p.requires_grad]
    dataset, _ = data.open_dataset(manifest, backbone)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[i * batch:(i + 1) * batch] for i in range(min(batches, len(dataset) // batch))]
    moved, redraw = {}, []
    for weight in sipo.WEIGHTS:
        for temperature in GRADIENT_GRID["temperature"]:
            args = train.parse_args(["--model", "toy", "--data", str(manifest), "--loss", "sipo", "--weight", weight,
                                     "--temperature", str(temperature), "--beta", "1000"])
            for chosen in batches:
                e, r, log_w = train.pair_errors(backbone, policy, reference, data.collate([dataset[i] for i in chosen]),
                                                0, args, True)
                terms = (*e.chunk(2), *r.chunk(2), *log_w.chunk(2), args.beta, args.tau)
                for normalise in sipo.NORMALISATIONS:
                    for eps in GRADIENT_GRID["eps"]:
                        cm, stats = sipo.dpo_cm_loss(*terms, eps, normalise)
                        g_cm = flat_gradient(cm, params)
                        g_sipo = flat_gradient(sipo.sipo_loss(*terms, eps, normalise)[0], params)
                        key = f"{weight} {normalise} eps={eps:g} temperature={temperature:g}"
                        moved.setdefault(key, []).append(
                            ((g_sipo - g_cm).norm() / g_cm.norm().clamp_min(1e-30)).item())
                        moved.setdefault(key + " masked", []).append(stats["mask_fraction"].item())
    args = train.parse_args(["--model", "toy", "--data", str(manifest), "--loss", "dpo-cm", "--beta", "1000"])
    for chosen in batches:
        g = []
        for epoch in (0, 1):
            e, r, log_w = train.pair_errors(backbone, policy, reference, data.collate([dataset[i] for i in chosen]),
                                            epoch, args, True)
            loss, _ = sipo.dpo_cm_loss(*e.chunk(2), *r.chunk(2), *log_w.chunk(2), args.beta, args.tau, args.eps,
                                       args.normalise)
            g.append(flat_gradient(loss, params))
        redraw.append(((g[1] - g[0]).norm() / g[0].norm()).item())
    settings = sorted({key for key in moved if not key.endswith(" masked")})
    return {"batches": len(batches), "batch": batch, "redraw": float(np.median(redraw)),
            "settings": {key: {"movement": float(np.median(moved[key])), "max": float(np.max(moved[key])),
                               "mask_fraction": float(np.mean(moved[key + " masked"]))} for key in settings}}


def gradient_part(args, out, report, base):
    """gradient_movement on each of GRADIENT_SOURCES, and the strongest setting over them; writes gradient.json."""
    started = time.time()
    manifests = source_pairs(out / "data", base, args.off_pairs, GRADIENT_SOURCES)
    by_source = {}
    for source, manifest in manifests.items():
        print(f"gradient movement on {source} pairs ...", flush=True)
        by_source[source] = gradient_movement(base, manifest, args.gradient_batches, args.off_batch)
    settings = by_source[GRADIENT_SOURCES[0]]["settings"]
    mean_movement = {key: float(np.mean([s["settings"][key]["movement"] for s in by_source.values()]))
                     for key in settings}
    strongest = max(mean_movement, key=mean_movement.get)
    summary = {"base": base_identity(base), "cpu": cpu_name(), "sources": by_source, "mean_movement": mean_movement,
               "strongest": strongest, "strong_enough": mean_movement[strongest] >= STRONG_ENOUGH,
               "threshold": STRONG_ENOUGH, "minutes": (time.time() - started) / 60}
    (report / "gradient.json").write_text(json.dumps(summary, indent=1))
    return summary


# ---------------------------------------------------------------------------------------------------------
# The cutoff control (--part control): is DPO-C&M's gain the weight's, or that of cutting off clean timesteps?
# ---------------------------------------------------------------------------------------------------------

def reading_flags(setting):
    """train.py flags of a gradient.json setting, "WEIGHT NORMALISE eps=E temperature=T"."""
    weight, normalise, *pairs = setting.split()
    values = dict(pair.split("=") for pair in pairs)
    return ["--weight", weight, "--normalise", normalise, "--eps", values["eps"], "--temperature",
            values["temperature"]]


def off_common(args, manifest, heldout, base, steps):
    """The off-policy part's training settings: every run of parts 2, control and degrade starts from these."""
    return ["--model", "toy", "--pretrained", base, "--data", manifest, "--steps", steps, "--batch-size",
            args.off_batch, "--lr", args.lr, "--beta", args.off_beta, "--warmup", 10, "--checkpoint-every", 10_000,
            "--eval-data", heldout, "--eval-every", max(1, steps // 6), "--no-gradient-checkpointing"]


def control_part(args, out, report, base, heldout):
    """Per source of GRADIENT_SOURCES, over --control-seeds seeds at the off-policy part's settings: Diffusion-DPO;
    DPO-C&M; Diffusion-DPO with t drawn above the fraction of the schedule that DPO-C&M's runs masked (--min-noise,
    matched per source); and SIPO in gradient.json's strongest reading beside DPO-C&M at the same settings (what
    re-weighting alone changes). Paired tests, Holm-corrected over the part; writes control.json."""
    started = time.time()
    gradient = json.loads((report / "gradient.json").read_text())
    strong = reading_flags(gradient["strongest"])
    manifests = source_pairs(out / "data", base, args.off_pairs, GRADIENT_SOURCES)
    rewards = ("named_colour", *DRIFTS.values())
    base_scores, _ = final_scores(base, args.samples, rewards)
    base_mean = float(base_scores["named_colour"].mean())
    seeds, results, cutoffs = range(args.control_seeds), {}, {}
    for source, manifest in manifests.items():
        common = off_common(args, manifest, heldout, base, args.off_steps)
        jobs = [(f"off {source} {m}", ["--loss", m], seed) for m in ("dpo", "dpo-cm") for seed in seeds]
        results.update(run_jobs(jobs, common, out, args, rewards, base_scores))
        masked = [r["mask_fraction"] for r in results[f"off {source} dpo-cm"] if r["final"] is not None]
        cutoffs[source] = round(float(np.mean(masked)), 3)
        jobs = [(f"off {source} dpo cutoff", ["--loss", "dpo", "--min-noise", cutoffs[source]], seed)
                for seed in seeds]
        jobs += [(f"off {source} {m} strongest", ["--loss", m, *strong], seed) for m in ("sipo", "dpo-cm")
                 for seed in seeds]
        results.update(run_jobs(jobs, common, out, args, rewards, base_scores))
    table = summarise(results, base_mean, args.collapse_margin)
    tests = []
    for source in manifests:
        for config, versus in (("dpo-cm", "dpo"), ("dpo cutoff", "dpo"), ("dpo-cm", "dpo cutoff"),
                               ("sipo strongest", "dpo-cm strongest"), ("sipo strongest", "dpo-cm")):
            tests.append({"condition": source, "comparison": f"{config} - {versus}", "metric": "final reward",
                          **seed_test(results, f"off {source} {config}", f"off {source} {versus}")})
    summary = {"base": base_identity(base), "cpu": cpu_name(), "base_mean": base_mean, "cutoffs": cutoffs,
               "strongest": gradient["strongest"], "table": table, "tests": corrected(tests),
               "pooled": pooled_tests(tests), "runs": results,
               "minutes": (time.time() - started) / 60, "args": {k: str(v) for k, v in vars(args).items()}}
    (report / "control.json").write_text(json.dumps(summary, indent=1))
    return summary


def pooled_tests(tests):
    """Each comparison over every condition's seed pairs at once (paired_test of the pooled differences, with the
    sign test), Holm-corrected over the comparisons."""
    pooled = {}
    for row in tests:
        pooled.setdefault(row["comparison"], []).extend(row["differences"])
    rows = [{"condition": "pooled", "comparison": name, **paired_test(np.zeros(len(d)), d), "sign_p": sign_test(d)}
            for name, d in pooled.items()]
    return corrected(rows)


# ---------------------------------------------------------------------------------------------------------
# Where Diffusion-DPO degrades (--part degrade): the paper's stability claim where something is unstable
# ---------------------------------------------------------------------------------------------------------

def degrade_part(args, out, report, base, heldout):
    """A sweep of Diffusion-DPO (seed 0) over --degrade-lrs x --degrade-betas on the base's own pairs; the first
    setting, in that order, whose final reward falls below the base is the regime, where Diffusion-DPO, DPO-C&M and
    SIPO then train over --degrade-seeds seeds: how often each ends below the base, collapses (below it by
    --collapse-margin) or ends below its own best held-out accuracy. Writes degrade.json."""
    started = time.time()
    manifest = source_pairs(out / "data", base, args.off_pairs, ("on",))["on"]
    base_scores, _ = final_scores(base, args.samples)
    base_mean = float(base_scores["named_colour"].mean())
    common = off_common(args, manifest, heldout, base, args.degrade_steps)
    grid = [(float(lr), float(beta)) for lr in args.degrade_lrs.split(",") for beta in args.degrade_betas.split(",")]
    name = "degrade {} lr={:g} beta={:g}".format
    sweep = run_jobs([(name("dpo", lr, beta), ["--loss", "dpo", "--lr", lr, "--beta", beta], 0) for lr, beta in grid],
                     common, out, args, ("named_colour",), base_scores)
    below = [(lr, beta) for lr, beta in grid if (sweep[name("dpo", lr, beta)][0]["final"] or -1.0) < base_mean]
    lr, beta = below[0] if below else grid[-1]
    jobs = [(name(m, lr, beta), ["--loss", m, "--lr", lr, "--beta", beta], seed) for m in METHODS
            for seed in range(args.degrade_seeds)]
    results = run_jobs(jobs, common, out, args, ("named_colour",), base_scores)
    table = summarise(results, base_mean, args.collapse_margin)
    for config, runs in results.items():
        finals = [r["final"] for r in runs]
        table[config]["below_base"] = sum(f is None or f < base_mean for f in finals) / len(finals)
    tests = corrected([{"condition": f"lr {lr:g}, beta {beta:g}", "comparison": f"{m} - dpo", "metric": "final reward",
                        **seed_test(results, name(m, lr, beta), name("dpo", lr, beta))} for m in ("dpo-cm", "sipo")])
    summary = {"base": base_identity(base), "cpu": cpu_name(), "base_mean": base_mean,
               "sweep": {f"lr={l:g} beta={b:g}": sweep[name("dpo", l, b)][0]["final"] for l, b in grid},
               "regime": {"lr": lr, "beta": beta, "degrades": bool(below)}, "table": table, "tests": tests,
               "runs": results, "minutes": (time.time() - started) / 60,
               "args": {k: str(v) for k, v in vars(args).items()}}
    (report / "degrade.json").write_text(json.dumps(summary, indent=1))
    return summary


# ---------------------------------------------------------------------------------------------------------
# The online part (train.py --pairs online): pairs from the current policy against the importance correction
# ---------------------------------------------------------------------------------------------------------

OFFLINE_METHODS = ("dpo", "dpo-cm", "sipo")
ONLINE_METHODS = ("dpo", "sipo")


def online_part(args, out, report, base, heldout):
    """Offline Diffusion-DPO, DPO-C&M and SIPO on the base's pairs against online Diffusion-DPO and SIPO (pairs
    sampled from the policy, labelled by named_colour), at matched optimizer steps, then the offline methods again
    at the online runs' mean wall clock (their sampling counted); writes online.json."""
    started = time.time()
    pairs = toy.make_preference_pairs(out / "data" / f"pairs-on-{args.off_pairs}", base, args.off_pairs, 10_000,
                                      SAMPLE_STEPS, GUIDANCE)
    prompts = out / "data" / "prompts.txt"
    prompts.write_text("".join(prompt + "\n" for prompt in toy.PROMPTS))
    rewards = ("named_colour", DRIFT)
    base_scores, _ = final_scores(base, args.samples, rewards)
    base_mean, base_drift = float(base_scores["named_colour"].mean()), float(base_scores[DRIFT].mean())
    common = off_common(args, pairs, heldout, base, args.online_steps)
    online = ["--data", prompts, "--pairs", "online", "--reward", "named_colour", "--refresh-every",
              args.refresh_every, "--samples-per-prompt", args.samples_per_prompt, "--online-sample-steps",
              SAMPLE_STEPS, "--online-guidance", GUIDANCE]
    jobs = [(f"online-part offline {m}", ["--loss", m], seed) for m in OFFLINE_METHODS
            for seed in range(args.online_seeds)]
    jobs += [(f"online-part online {m}", ["--loss", m, *online], seed) for m in ONLINE_METHODS
             for seed in range(args.online_seeds)]
    results = run_jobs(jobs, common, out, args, rewards, base_scores)
    wall = np.mean([r["train_seconds"] for m in ONLINE_METHODS for r in results[f"online-part online {m}"]])
    matched = {}
    for method in OFFLINE_METHODS:  # the steps an offline run takes in the online runs' time
        per_step = np.mean([r["train_seconds"] / args.online_steps for r in results[f"online-part offline {method}"]])
        matched[method] = max(args.online_steps, round(wall / per_step))
    jobs = [(f"online-part offline {m} wall", ["--loss", m, "--steps", matched[m],
                                               "--eval-every", max(1, matched[m] // 6)], seed)
            for m in OFFLINE_METHODS for seed in range(args.online_seeds)]
    results.update(run_jobs(jobs, common, out, args, rewards, base_scores))
    table = summarise(results, base_mean, args.collapse_margin)
    for config, runs in results.items():
        done = [r for r in runs if r["final"] is not None]
        drifts = np.array([r[f"final_{DRIFT}"] for r in done])
        table[config].update(
            drifts=drifts.tolist(), drift_mean=float(drifts.mean()), drift_sd=float(drifts.std(ddof=1)),
            **{key: float(np.mean([r[key] for r in done])) for key in ("train_seconds", "sampling_seconds",
                                                                        "weight_early", "weight_late")},
            heldout_final=float(np.mean([r["heldout_accuracy"][-1] for r in done if r["heldout_accuracy"]])))
    tests = {}
    for online_method in ONLINE_METHODS:
        for versus in [f"offline {m}" for m in OFFLINE_METHODS] + [f"offline {m} wall" for m in OFFLINE_METHODS]:
            a, b = table[f"online-part online {online_method}"], table[f"online-part {versus}"]
            tests[f"online {online_method} vs {versus}"] = {key: difference_test(a[key], b[key])
                                                             for key in ("finals", "drifts")}
    summary = {"base": base_identity(base), "base_mean": base_mean, "base_drift": base_drift, "table": table,
               "tests": tests, "matched_steps": matched, "online_wall_seconds": float(wall), "runs": results,
               "minutes": (time.time() - started) / 60, "cpu": cpu_name(),
               "args": {k: str(v) for k, v in vars(args).items()}}
    (report / "online.json").write_text(json.dumps(summary, indent=1))
    return summary


# ---------------------------------------------------------------------------------------------------------
# The paired re-analysis (--part paired): every verdict of parts 1 and 2 again, seed against seed
# ---------------------------------------------------------------------------------------------------------

def seed_test(runs, config, versus, metric="final"):
    """paired_test of `config` against `versus` over the seeds both finished (`runs`: {config: run entries}), on the
    runs' `metric`, with the seed differences themselves."""
    mine, other = ({r["seed"]: r[metric] for r in runs[c] if r["final"] is not None}
                   for c in (config, versus))
    seeds = sorted(set(mine) & set(other))
    return {**paired_test([other[k] for k in seeds], [mine[k] for k in seeds]),
            "differences": [mine[k] - other[k] for k in seeds]}


def corrected(rows):
    """Holm's correction over `rows` (one part's family of tests), into each row as p_holm."""
    for row, adjusted in zip(rows, holm([row["p"] for row in rows])):
        row["p_holm"] = adjusted
    return rows


def paired_part(report):
    """Parts 1 and 2 (study.json, offpolicy.json in `report`) re-analysed seed against seed: per condition paired
    tests, Holm-corrected within each part; DPO-C&M against Diffusion-DPO over every condition (sign test over
    conditions, the pooled paired difference); each SIPO reading against DPO-C&M as an equivalence within
    EQUIVALENCE_MARGIN. Written to paired.json; no runs."""
    parts = {name: json.loads((report / name).read_text()) for name in ("study.json", "offpolicy.json")
             if (report / name).exists()}
    if not parts:  # the online part alone: nothing to re-analyse
        return None
    rows = {"onpolicy": [], "offpolicy": []}
    if "study.json" in parts:
        onpolicy_summary = parts["study.json"]
        for beta in onpolicy_summary["betas"]:
            for config, versus in (("dpo-cm", "dpo"), ("sipo", "dpo"), ("sipo", "dpo-cm")):
                rows["onpolicy"].append({"condition": f"beta {beta:g}", "comparison": f"{config} - {versus}",
                                         "metric": "final reward", **seed_test(
                                             onpolicy_summary["runs"], f"{config} beta={beta:g}",
                                             f"{versus} beta={beta:g}")})
    if "offpolicy.json" in parts:
        offpolicy_summary = parts["offpolicy.json"]
        configs = offpolicy_summary["configs"]
        baseline = "dpo-cm" if "dpo-cm" in configs else "dpo"  # each SIPO reading against the strongest present
        comparisons = [*((("dpo-cm", "dpo"),) if {"dpo", "dpo-cm"} <= set(configs) else ()),
                       *((reading, baseline) for reading in configs if reading.startswith("sipo"))]
        for source in offpolicy_summary["sources"]:
            for config, versus in comparisons:
                for metric, name in (("final", "final reward"), *((f"final_{d}", d) for d in DRIFTS.values())):
                    rows["offpolicy"].append({"condition": source, "comparison": f"{config} - {versus}",
                                              "metric": name, **seed_test(offpolicy_summary["runs"],
                                                                          f"off {source} {config}",
                                                                          f"off {source} {versus}", metric)})
    for family in rows.values():
        corrected(family)
    masking = [row for family in rows.values() for row in family
               if row["comparison"] == "dpo-cm - dpo" and row["metric"] == "final reward"]
    differences = [d for row in masking for d in row["differences"]]
    pooled = paired_test(np.zeros(len(differences)), differences) if differences else None
    equivalence = {}
    for family in rows.values():
        for row in family:
            if row["comparison"].startswith("sipo") and row["comparison"].endswith("dpo-cm") and \
                    row["metric"] == "final reward":
                equivalence.setdefault(row["comparison"], []).append(row)
    equivalence = {name: {"conditions": len(found), "within_margin": sum(
        -EQUIVALENCE_MARGIN < r["ci"][0] and r["ci"][1] < EQUIVALENCE_MARGIN for r in found)}
        for name, found in equivalence.items()}
    summary = {"base": next(iter(parts.values()))["base"], "margin": EQUIVALENCE_MARGIN,
               "tests": rows, "masking": {"conditions": len(masking),
                                          "ahead": sum(row["difference"] > 0 for row in masking),
                                          "sign_test_p": sign_test([row["difference"] for row in masking]),
                                          "seed_pairs": len(differences),
                                          "seed_pairs_ahead": sum(d > 0 for d in differences), "pooled": pooled},
               "equivalence": equivalence}
    (report / "paired.json").write_text(json.dumps(summary, indent=1))
    return summary


def paired_lines(summary):
    masking, margin = summary["masking"], summary["margin"]
    pooled = masking["pooled"]
    lines = ["## Paired re-analysis (`python study.py --part paired`: no runs)", "",
             "Every method at a given seed shares its pairs, their order, t and noise, so each test compares runs "
             "seed against seed: the mean paired difference, a 95% t interval, and the exact sign-flip p over every "
             "sign pattern; p (Holm) is Holm's correction over the part's whole family of tests. With 5 seeds no "
             "single condition can reach a p below 2/32 = 0.0625, however consistent: until a part runs more seeds "
             "the verdicts rest on the pooled and sign tests. Part 1's `sipo` is its default reading, step "
             "after-mask.", ""]
    if pooled:
        lines += [f"DPO-C&M against Diffusion-DPO on the final reward: ahead in {masking['ahead']} of "
                  f"{masking['conditions']} conditions (sign test over conditions p = {masking['sign_test_p']:.3f}), "
                  f"in {masking['seed_pairs_ahead']} of {masking['seed_pairs']} seed pairs; pooled paired difference "
                  f"{pooled['difference']:+.4f} (95% CI {pooled['ci'][0]:+.4f} to {pooled['ci'][1]:+.4f}, the "
                  "seed pairs of every condition pooled).", ""]
    if summary["equivalence"]:
        lines += [f"Equivalence of SIPO's readings to DPO-C&M, a margin of ±{margin} in final reward: a condition "
                  "counts when its 95% interval lies inside the margin.", "", "| reading | conditions inside the "
                  "margin |", "|---|---|"]
        lines += [f"| {name} | {found['within_margin']} of {found['conditions']} |"
                  for name, found in summary["equivalence"].items()]
        lines.append("")
    for part, family in summary["tests"].items():
        if not family:
            continue
        lines += [f"### {'Part 1, on-policy' if part == 'onpolicy' else 'Part 2, off-policy'}: {len(family)} "
                  "tests, Holm-corrected together", "",
                  "| condition | comparison | metric | paired difference [95% CI] | positive | p | p (Holm) |",
                  "|---" * 7 + "|"]
        lines += [f"| {r['condition']} | {r['comparison']} | {r['metric']} | {r['difference']:+.5f} "
                  f"[{r['ci'][0]:+.5f}, {r['ci'][1]:+.5f}] | {r['positive']} of {r['n']} | {r['p']:.3f} | "
                  f"{r['p_holm']:.3f} |" for r in family]
        lines.append("")
    return lines


def base_identity(base):
    """The base a part was measured on: the SHA-256 of its weights' files, and the commit of this checkout."""
    digest = hashlib.sha256()
    for path in sorted(Path(base).rglob("*.safetensors")):
        digest.update(path.read_bytes())
    return {"sha256": digest.hexdigest(), "commit": bench.commit()}


def save_pairs_grid(path, folder, lines):
    """Winners above losers, one pair a column, as the training data holds them."""
    from PIL import Image
    rows = [json.loads(line) for line in lines]
    load = [[torch.from_numpy(np.array(Image.open(folder / row[k]).convert("RGB"))).permute(2, 0, 1).float() / 255
             for row in rows] for k in ("chosen", "rejected")]
    evaluate.save_grid(path, [("winner", torch.stack(load[0])), ("loser", torch.stack(load[1]))],
                       [row["prompt"] for row in rows])


def plot_offpolicy(path, table, base_mean, base_drift, sources, configs):
    fig, axes = plt.subplots(1, len(sources), figsize=(4 * len(sources), 3.8), sharey=True, squeeze=False)
    for ax, source in zip(axes[0], sources):
        drift = DRIFTS.get(source, DRIFTS["hard"])  # a source's own style; the others, the hard one
        for i, config in enumerate(configs):
            row = table[f"off {source} {config}"]
            ax.errorbar(row["drift_mean"][drift], row["final_mean"], xerr=row["drift_sd"][drift],
                        yerr=row["final_sd"], marker="os^vD<"[i], capsize=2, label=config)
        ax.axhline(base_mean, color="grey", ls="--")
        ax.axvline(base_drift[drift], color="grey", ls=":")
        ax.set(title=f"pairs: {source}", xlabel=f"drift ({drift})")
    axes[0, 0].set_ylabel("held-out named_colour (mean ± sd)")
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weights(path, weights, trained, trained_with):
    """Median winner and loser weight per timestep bucket, per source and weight: the base solid, after training
    (seed 0 of `trained_with` on that source) dashed."""
    sources = list(weights)
    fig, axes = plt.subplots(len(sipo.WEIGHTS), len(sources), figsize=(3.6 * len(sources), 6.4), sharex=True,
                             squeeze=False)
    for j, source in enumerate(sources):
        for i, weight in enumerate(sipo.WEIGHTS):
            ax = axes[i, j]
            for model, style in ((weights, "-"), (trained, "--")):
                if source not in model:
                    continue
                rows = [r for r in model[source][weight]["buckets"] if r["pairs"]]
                centre = [(r["level_low"] + r["level_high"]) / 2 for r in rows]
                label = "base" if style == "-" else "trained"
                ax.plot(centre, [r["w_w"] for r in rows], style, color="C0", label=f"winner, {label}")
                ax.plot(centre, [r["w_l"] for r in rows], style, color="C3", label=f"loser, {label}")
            ax.set(title=f"{source}: {weight} weight", ylim=(-0.02, 1.02), xlabel="timestep t" if i else None)
    axes[0, 0].set_ylabel("median w")
    axes[0, -1].legend(fontsize=7, title=f"trained: {trained_with}, seed 0", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_name(config, seed):
    return config.replace(" ", "_").replace("=", "") + f"_seed{seed}"


def reward_cells(row, base_mean):
    """Table cells: final reward mean ± sd, its difference from the base, win rate over the base mean ± sd."""
    return (f"{row['final_mean']:.4f} ± {row['final_sd']:.4f} | {row['final_mean'] - base_mean:+.4f} | "
            f"{row['win_rate_mean']:.2f} ± {row['win_rate_sd']:.2f}")


def write_results(report, base):
    """RESULTS.md from whichever parts have run (their JSON files in `report`), each marked stale where
    it was measured on another base than `base` (or before the base's checksum was recorded)."""
    lines = ["# Results: Diffusion-DPO, DPO-C&M and SIPO on the toy task", "",
             f"Written by `python study.py` on {os.cpu_count()} CPU cores ({cpu_name()}); each part names the "
             "machine that measured it. "
             "`python study.py --part NAME` re-runs one part (onpolicy, offpolicy, online, gradient, control, "
             "degrade); finished runs are reused.", ""]
    current = base_identity(base)["sha256"]
    for name, part, write in (("study.json", "onpolicy", onpolicy_lines), ("offpolicy.json", "offpolicy",
                                                                          offpolicy_lines),
                              ("online.json", "online", online_lines), ("paired.json", "paired", paired_lines),
                              ("gradient.json", "gradient", gradient_lines), ("control.json", "control", control_lines),
                              ("degrade.json", "degrade", degrade_lines)):
        if (report / name).exists():
            summary = json.loads((report / name).read_text())
            if (summary.get("base") or {}).get("sha256") != current:  # its tables would speak for another model
                lines += [f"**Stale**: `{name}` was measured on another base than {Path(base).name}/ (no checksum of "
                          f"it recorded, or another one), so its tables are left out; `python study.py --part {part}` "
                          "measures it again.", ""]
                continue
            lines += write(summary)
    (report / "RESULTS.md").write_text("\n".join(lines))


def onpolicy_lines(summary):
    table, base_mean, args = summary["table"], summary["base_mean"], summary["args"]
    betas = summary.get("betas") or [float(b) for b in args["betas"].split(",")]
    ablations = summary.get("ablations") or [c for c in table if " beta=" in c and len(c.split()) > 2]
    lines = ["## Part 1: on-policy pairs (the base's own samples)", "",
             f"`--part onpolicy`: {summary['minutes']:.0f} minutes on {summary.get('cpu', 'an unrecorded CPU')}, "
             f"base `{summary['base']['sha256'][:12]}`, commit {summary['base']['commit']} ({args['seeds']} seeds "
             f"per method and beta, "
             f"{args['steps']} steps, lr {args['lr']}, 8 pairs per step; reward `named_colour` of {args['samples']} "
             f"held-out samples per prompt; base model {base_mean:.4f}). Collapse: final reward below base - "
             f"{args['collapse_margin']}, or a failed run.", "",
             "### Final reward over the beta grid", "",
             "| method | beta | final reward (mean ± sd) | vs base | win rate over base (mean ± sd) | collapsed | "
             "loss roughness | held-out acc. degrades late | mean mask fraction |", "|---" * 9 + "|"]
    for config in [f"{m} beta={b:g}" for m in METHODS for b in betas]:
        row = table[config]
        method, beta = config.split(" beta=")
        lines.append(f"| {method} | {beta} | {reward_cells(row, base_mean)} | {row['collapse_fraction']:.0%} | "
                     f"{row['roughness']:.4f} | {row['late_degradation']:.0%} | {row['mask_fraction']:.2f} |")
    lines += ["", "### Matched beta: each method against Diffusion-DPO (exact permutation test over seeds)", "",
              "| comparison | difference in final reward | p |", "|---|---|---|"]
    lines += [f"| {k} | {v['difference']:+.4f} | {v['p']:.3f} |" for k, v in summary["significance"].items()]
    times = summary["step_time_ms"]
    lines += ["", "### Wall-clock per training step (toy model, 8 pairs, 1 thread, the three losses interleaved)", "",
              "| method | ms per step | ratio to Diffusion-DPO |", "|---|---|---|"]
    lines += [f"| {m} | {times[m]:.1f} | {times[m] / times['dpo']:.3f} |" for m in METHODS]
    lines += ["", "### Beta sensitivity: spread (max - min) of the mean final reward across the grid", "",
              "| method | spread |", "|---|---|"]
    lines += [f"| {m} | {v:.4f} |" for m, v in summary["beta_spread"].items()]
    if ablations:
        lines += ["", "### SIPO ablations", "",
                  "| setting | final reward (mean ± sd) | vs base | win rate over base | mean mask fraction |",
                  "|---|---|---|---|---|"]
        for config in ablations:
            row = table[config]
            lines.append(f"| {config} | {reward_cells(row, base_mean)} | {row['mask_fraction']:.2f} |")
    lines += ["", "### Plots", "", "![final reward and roughness against beta](beta.png)", "",
              "![training curves, seed 0, middle beta](curves.png)", "",
              "![timestep analysis of the base](timesteps-base/timesteps.png)", "",
              "![timestep analysis after SIPO](timesteps-sipo/timesteps.png)", ""]
    return lines


def offpolicy_lines(summary):
    table, args, base_mean, base_drift = summary["table"], summary["args"], summary["base_mean"], summary["base_drift"]
    sources, configs, stripes, texture = summary["sources"], summary["configs"], *DRIFTS.values()
    base = summary["base"]
    lines = ["## Part 2: off-policy pairs", "",
             f"`--part offpolicy`: {summary['minutes']:.0f} minutes on {summary['cpu']}, base `{base['sha256'][:12]}`"
             f", commit {base['commit']}. Sources of {args['off_pairs']} pairs per prompt, all labelled by "
             "`named_colour`: `on` two samples of the base; `data` two draws of the base's training distribution; "
             "`foreign` a vivid shape on horizontal stripes ([foreign-pairs.png](foreign-pairs.png), winners above "
             "losers) against a base sample; `hard` a vivid shape under a one-pixel checkerboard "
             "([hard-pairs.png](hard-pairs.png)) against a base sample; `mixed` a quarter of each. Every run: "
             f"{args['off_steps']} steps of {args['off_batch']} pairs, lr {args['lr']}, beta "
             f"{float(args['off_beta']):g} for every method, {args['off_seeds']} seeds. Drift: `{stripes}` (the "
             f"foreign style) and `{texture}` (the hard style) of the final samples; the reward is blind to both. "
             f"Base: reward {base_mean:.4f}, {stripes} {base_drift[stripes]:.5f}, {texture} "
             f"{base_drift[texture]:.5f}.", "",
             "### Does the weight see the source? Under the base, winner against loser at the same t and noise", "",
             "Over the timestep buckets where the mask keeps at least half the pairs (tau 0.9): the fraction of "
             "pairs whose winner's weight is below its loser's, and the median gap w_l - w_w. The bar: at least "
             "80%, and a gap at least ten times the on-policy one.", "",
             "| source | step: winner lower | step: median gap | gap / on-policy gap | fit | path: winner lower | "
             "path: median gap | pairs masked (step / path) |", "|---" * 8 + "|"]
    for source in sources:
        step, path = (summary["weights"][source][w]["kept"] for w in sipo.WEIGHTS)
        verdict = summary["separation"][source]
        masked = [summary["weights"][source][w]["all"]["masked"] for w in sipo.WEIGHTS]
        lines.append(f"| {source} | {step['winner_lower']:.0%} | {step['gap']:.5f} | {verdict['gap_over_on']:.1f} | "
                     f"{'yes' if verdict['fit'] else 'no'} | {path['winner_lower']:.0%} | {path['gap']:.5f} | "
                     f"{masked[0]:.0%} / {masked[1]:.0%} |")
    trained = summary["trained_with"]
    lines += ["", f"### Step weight per timestep bucket, under the base and after training ({trained}, seed 0, "
              "on the same source)", "",
              "| source | t | winner x0 error | loser x0 error | winner w | loser w | winner lower | masked | "
              "after training: winner w / loser w / winner lower |", "|---" * 9 + "|"]
    for source in sources:
        after = summary["weights_trained"].get(source, {}).get("step", {}).get("buckets", [])
        for i, row in enumerate(summary["weights"][source]["step"]["buckets"]):
            if not row["pairs"]:
                continue
            late = after[i] if i < len(after) and after[i]["pairs"] else None
            lines.append(f"| {source} | {row['level_low']:.0f}-{row['level_high']:.0f} | {row['x0_error_w']:.4f} | "
                         f"{row['x0_error_l']:.4f} | {row['w_w']:.4f} | {row['w_l']:.4f} | {row['winner_lower']:.0%} | "
                         f"{row['masked']:.0%} | " + (f"{late['w_w']:.4f} / {late['w_l']:.4f} / "
                                                       f"{late['winner_lower']:.0%}" if late else "") + " |")
    lines += ["", "![median weights per bucket by source](weights-by-source.png)", "",
              "### Final reward and drift per method, reading and source (mean ± sd over seeds)", "",
              f"| source | method | final reward | vs base | win rate | {stripes} | {texture} | collapsed | roughness | "
              "held-out acc. (final) | masked | clip binds (branch / pair) |", "|---" * 12 + "|"]
    for source in sources:
        for config in configs:
            row = table[f"off {source} {config}"]
            lines.append(f"| {source} | {config} | {row['final_mean']:.4f} ± {row['final_sd']:.4f} | "
                         f"{row['final_mean'] - base_mean:+.4f} | {row['win_rate_mean']:.2f} | " +
                         "".join(f"{row['drift_mean'][d]:.5f} ± {row['drift_sd'][d]:.5f} | " for d in DRIFTS.values())
                         + f"{row['collapse_fraction']:.0%} | {row['roughness']:.4f} | {row['heldout_final']:.3f} | "
                         f"{row['mask_fraction']:.2f} | {row['clip_fraction_branch']:.2f} / "
                         f"{row['clip_fraction_pair']:.2f} |")
    lines += ["", "### SIPO's readings against DPO-C&M and Diffusion-DPO (exact permutation test over seeds)", "",
              f"| comparison | reward difference | p | {stripes} difference | p | {texture} difference | p |",
              "|---" * 7 + "|"]
    for name, test in summary["tests"].items():
        lines.append(f"| {name} | " + " | ".join(f"{test[k]['difference']:+.5f} | {test[k]['p']:.3f}"
                                                  for k in ("finals", *DRIFTS.values())) + " |")
    times = summary["step_time_ms"]
    lines += ["", "### Wall-clock per training step (toy model, 8 pairs, 1 thread, interleaved in one process)", "",
              "| method | ms per step | ratio to Diffusion-DPO |", "|---|---|---|"]
    lines += [f"| {m} | {t:.1f} | {t / times['dpo']:.3f} |" for m, t in times.items()]
    lines += ["", "![final reward against drift, per source](offpolicy.png)", ""]
    for source in [s for s in DRIFTS if s in sources]:
        lines += [f"The base, and seed 0 of {configs[0]} and of {configs[-1]} on `{source}` pairs, the same "
                  "sampling seeds:", "", f"![{source} pairs: DPO vs SIPO samples]({source}-dpo-vs-sipo.png)", ""]
    return lines


def online_lines(summary):
    table, args, base_mean = summary["table"], summary["args"], summary["base_mean"]
    base = summary["base"]
    lines = ["## Part 3: online pairs against the importance correction", "",
             f"`--part online`: {summary['minutes']:.0f} minutes on {summary['cpu']}, base `{base['sha256'][:12]}` "
             f"(SHA-256 of its weights), commit {base['commit']}. Offline: the base's own pairs "
             f"({args['off_pairs']} a prompt); online: `train.py --pairs online`, every {args['refresh_every']} steps "
             f"{args['samples_per_prompt']} samples a prompt from the current policy, best against worst by "
             f"`named_colour` (8 pairs a refresh). {args['online_steps']} steps of {args['off_batch']} pairs, lr "
             f"{args['lr']}, beta {float(args['off_beta']):g}, {args['online_seeds']} seeds; `wall`: the offline "
             f"method for as many steps as fit in the online runs' mean training time, "
             f"{summary['online_wall_seconds']:.0f} s with sampling (steps: "
             + ", ".join(f"{m} {n}" for m, n in summary["matched_steps"].items()) + f"). Base reward {base_mean:.4f}.",
             "", "| run | final reward | vs base | win rate | drift | training s (sampling) | mean step weight, "
             "first / last third | masked | held-out acc. (final) |", "|---" * 9 + "|"]
    for config, row in table.items():
        lines.append(f"| {config.removeprefix('online-part ')} | {row['final_mean']:.4f} ± {row['final_sd']:.4f} | "
                     f"{row['final_mean'] - base_mean:+.4f} | {row['win_rate_mean']:.2f} | "
                     f"{row['drift_mean']:.5f} ± {row['drift_sd']:.5f} | {row['train_seconds']:.0f} "
                     f"({row['sampling_seconds']:.0f}) | " + (f"{row['weight_early']:.3f} / {row['weight_late']:.3f}"
                                                              if "dpo-cm" in config or "sipo" in config else
                                                              "(no weight)") + " | "
                     f"{row['mask_fraction']:.2f} | {row['heldout_final']:.3f} |")
    lines += ["", "| comparison (exact permutation test over seeds) | reward difference | p | drift difference | p |",
              "|---|---|---|---|---|"]
    for name, test in summary["tests"].items():
        lines.append(f"| {name} | {test['finals']['difference']:+.4f} | {test['finals']['p']:.3f} | "
                     f"{test['drifts']['difference']:+.5f} | {test['drifts']['p']:.3f} |")
    return lines + [""]



def test_rows(tests):
    """A table of paired tests: each row's difference with its interval, positive seeds, p and Holm's p."""
    lines = ["| condition | comparison | paired difference [95% CI] | positive | p | p (Holm) |", "|---" * 6 + "|"]
    return lines + [f"| {r['condition']} | {r['comparison']} | {r['difference']:+.5f} [{r['ci'][0]:+.5f}, "
                    f"{r['ci'][1]:+.5f}] | {r['positive']} of {r['n']} | {r['p']:.4f} | {r['p_holm']:.4f} |"
                    for r in tests]


def gradient_lines(summary):
    sources = list(summary["sources"])
    first = summary["sources"][sources[0]]
    lines = ["## How far re-weighting moves the gradient (`python study.py --part gradient`: no runs)", "",
             f"{summary['minutes']:.0f} minutes on {summary['cpu']}, base `{summary['base']['sha256'][:12]}` at "
             f"commit {summary['base']['commit']}. ||g_SIPO - g_DPO-C&M|| / ||g_DPO-C&M||, SIPO and DPO-C&M at the "
             f"same weights, mask and clip, under the base (policy = reference), median over {first['batches']} "
             f"batches of {first['batch']} pairs; for scale, redrawing t and noise for the same pairs moves "
             "DPO-C&M's gradient by " + ", ".join(f"{summary['sources'][s]['redraw']:.0%} ({s})" for s in sources)
             + ". The mask fraction is DPO-C&M's at that setting.", "",
             "| weight, normalisation, eps, temperature | " + " | ".join(sources) + " | mean | masked (mean) |",
             "|---" * (len(sources) + 3) + "|"]
    for key, mean in sorted(summary["mean_movement"].items(), key=lambda item: item[1]):
        masked = np.mean([summary["sources"][s]["settings"][key]["mask_fraction"] for s in sources])
        lines.append(f"| {key} | " + " | ".join(f"{summary['sources'][s]['settings'][key]['movement']:.2%}"
                                                  for s in sources) + f" | {mean:.2%} | {masked:.0%} |")
    verdict = "at least" if summary["strong_enough"] else "below"
    return lines + ["", f"Strongest: {summary['strongest']}, {summary['mean_movement'][summary['strongest']]:.1%} "
                        f"({verdict} the {summary['threshold']:.0%} bar for a training comparison).", ""]


def control_lines(summary):
    table, base_mean = summary["table"], summary["base_mean"]
    lines = ["## The cutoff control (`python study.py --part control`)", "",
             f"{summary['minutes']:.0f} minutes on {summary['cpu']}, base `{summary['base']['sha256'][:12]}` at commit "
             f"{summary['base']['commit']}; the off-policy part's settings, {summary['args']['control_seeds']} seeds "
             "each, every method at a seed on the same pairs, t and noise. `dpo cutoff`: Diffusion-DPO with t drawn "
             "above the fraction of the schedule DPO-C&M's runs masked on that source (`--min-noise`); `strongest`: "
             f"{summary['strongest']} (gradient part), SIPO and DPO-C&M alike.", "",
             "| source | configuration | final reward (mean ± sd) | vs base | win rate vs base | masked |",
             "|---|---|---|---|---|---|"]
    for config, row in table.items():
        source, name = config.split(" ", 2)[1:]
        cutoff = f" (--min-noise {summary['cutoffs'][source]:g})" if name == "dpo cutoff" else ""
        lines.append(f"| {source} | {name}{cutoff} | {reward_cells(row, base_mean)} | {row['mask_fraction']:.1%} |")
    return lines + ["", f"Paired tests, Holm-corrected over the part's {len(summary['tests'])}:", "",
                    *test_rows(summary["tests"]), "", "Each comparison over the three sources' seed pairs at once "
                    "(Holm-corrected over the comparisons):", "", *test_rows(summary["pooled"]), ""]


def degrade_lines(summary):
    table, base_mean, regime = summary["table"], summary["base_mean"], summary["regime"]
    lines = ["## Where Diffusion-DPO degrades (`python study.py --part degrade`)", "",
             f"{summary['minutes']:.0f} minutes on {summary['cpu']}, base `{summary['base']['sha256'][:12]}` "
             f"(mean {base_mean:.4f}) at commit {summary['base']['commit']}. The sweep (Diffusion-DPO, seed 0, "
             "final reward): " + ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} failed"
                                           for k, v in summary["sweep"].items()) + ". "
             + (f"The regime: lr {regime['lr']:g}, beta {regime['beta']:g}, the first setting below the base."
                if regime["degrades"] else f"No setting fell below the base; the last, lr {regime['lr']:g} and beta "
                                           f"{regime['beta']:g}, was run."), "",
             "| method | final reward (mean ± sd) | vs base | win rate vs base | below the base | collapsed | late "
             "degradation |", "|---|---|---|---|---|---|---|"]
    for config, row in table.items():
        lines.append(f"| {config.split()[1]} | {reward_cells(row, base_mean)} | {row['below_base']:.0%} | "
                     f"{row['collapse_fraction']:.0%} | {row['late_degradation']:.0%} |")
    return lines + ["", "Paired tests against Diffusion-DPO, Holm-corrected:", "", *test_rows(summary["tests"]), ""]


if __name__ == "__main__":
    main()
