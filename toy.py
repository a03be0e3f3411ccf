"""The embedded default: align a diffusion model to a preference with SIPO on a laptop CPU, and show it worked.

    python toy.py                      # about 7 minutes on 2 CPU cores; re-running reuses what exists

1. draws a synthetic image distribution: coloured circles and squares on dark, noisy backgrounds, 16x16 RGB,
   prompts "a red circle", ...; the colour's vividness varies from sample to sample;
2. trains a base model on it (toy backbone, `train.py --loss sft`);
3. samples pairs from the base and labels them with a known reward, `named_colour` (evaluate.py): how strongly
   an image leans toward the colour its prompt names -- a preference a person can check by eye;
4. runs SIPO under torchrun with 2 ranks;
5. compares tuned against base on held-out seeds and prints the headline; report, grid and curves in --out.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import evaluate
import models

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.25, 1.0), "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("circle", "square")
PROMPTS = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
SIZE = 16


def draw(prompt, generator, vividness=None, style="base"):
    """One 16x16 image of the prompt's shape in its colour, mixed with grey by a random vividness (or the one
    given), on a dark noisy background. Returns uint8 (16, 16, 3).

    style "foreign" is another generator's (METHOD §8's off-policy pairs): vivid shapes (vividness 0.9 to 1) on a
    background of horizontal stripes two pixels high, 0.0 and 0.35, whose mean is the base background's mean.
    named_colour is linear in the pixels, so the stripes are worth nothing to it: a style a person sees in the
    grid, measured by evaluate.horizontal_stripes, that the reward does not ask for."""
    _, colour, shape = prompt.split()
    u = torch.rand(6, generator=generator)
    if vividness is None:
        vividness = 0.9 + 0.1 * u[0] if style == "foreign" else 0.25 + 0.75 * u[0]
    rgb = 0.5 + vividness * (torch.tensor(COLOURS[colour]) - 0.5)
    radius = 3.0 + 3.0 * u[1]
    cy, cx = radius + (SIZE - 2 * radius) * u[2], radius + (SIZE - 2 * radius) * u[3]
    y, x = torch.meshgrid(torch.arange(SIZE) + 0.5, torch.arange(SIZE) + 0.5, indexing="ij")
    inside = ((y - cy) ** 2 + (x - cx) ** 2 <= radius ** 2) if shape == "circle" else \
        ((y - cy).abs() <= radius * 0.85) & ((x - cx).abs() <= radius * 0.85)
    if style == "foreign":
        background = (0.35 * ((torch.arange(SIZE) // 2) % 2)).view(SIZE, 1, 1).expand(SIZE, SIZE, 3)
    else:
        background = 0.1 + 0.15 * u[4] + 0.06 * torch.randn(SIZE, SIZE, 3, generator=generator)
    image = torch.where(inside[..., None], rgb, background)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def write_pairs(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "pairs.jsonl.tmp"
    tmp.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    tmp.replace(folder / "pairs.jsonl")
    return folder / "pairs.jsonl"


def make_base_data(folder, count, seed):
    """`count` drawn images as a manifest for SFT (the loser is unused there: it repeats the winner)."""
    if (folder / "pairs.jsonl").exists():
        return folder / "pairs.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in tqdm(range(count), desc="drawing the base data"):
        prompt = PROMPTS[i % len(PROMPTS)]
        save_image(folder, f"{i:05d}.png", draw(prompt, generator))
        rows.append({"prompt": prompt, "chosen": f"{i:05d}.png", "rejected": f"{i:05d}.png"})
    return write_pairs(folder, rows)


def save_image(folder, name, image):
    """`image` uint8 (H, W, 3) or float (3, H, W) in [0, 1]."""
    if image.dtype != np.uint8:
        image = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(image).save(folder / name)
    return name


def make_preference_pairs(folder, base, per_prompt, first_seed, steps, guidance, source="on", chunk=8):
    """Pairs labelled by named_colour, the higher-scoring image first, from one of METHOD §8's sources:
    "on" two samples of the base; "data" two draws of the base's training distribution (draw); "foreign" a draw
    of the foreign generator (draw(style="foreign")) against a sample of the base ("mixed": mix_pairs).
    Made `chunk` per prompt at a time (64 images a call); the seeds of training and held-out pairs never overlap."""
    if (folder / "pairs.jsonl").exists():
        return folder / "pairs.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    backbone = models.load_backbone("toy", pretrained=str(base)) if source in ("on", "foreign") else None
    generator = torch.Generator().manual_seed(first_seed)
    prompts = PROMPTS * chunk
    rows = []
    for k in tqdm(range(0, per_prompt, chunk), desc=f"sampling {source} pairs in {folder.name}"):
        def drawn(style):
            return torch.stack([torch.from_numpy(draw(p, generator, style=style)).permute(2, 0, 1).float() / 255
                                for p in prompts])
        a = drawn("foreign") if source == "foreign" else drawn("base") if source == "data" else \
            backbone.sample(prompts, first_seed + 2 * k, steps, guidance)
        b = drawn("base") if source == "data" else backbone.sample(prompts, first_seed + 2 * k + 1, steps, guidance)
        score_a, score_b = evaluate.named_colour(a, prompts), evaluate.named_colour(b, prompts)
        for i, prompt in enumerate(prompts[:min(len(prompts), (per_prompt - k) * len(PROMPTS))]):
            names = [save_image(folder, f"{k:04d}-{i:03d}-{label}.png", image)
                     for label, image in (("a", a[i]), ("b", b[i]))]
            better = score_a[i] >= score_b[i]
            rows.append({"prompt": prompt, "chosen": names[0 if better else 1], "rejected": names[1 if better else 0],
                         "score_chosen": float(max(score_a[i], score_b[i])),
                         "score_rejected": float(min(score_a[i], score_b[i]))})
    return write_pairs(folder, rows)


def mix_pairs(folder, manifests):
    """METHOD §8's "mixed" source: row k of the j-th manifest where k % len(manifests) == j, as many pairs as
    one source has. The images stay where they are (paths relative to `folder`)."""
    rows = []
    for j, manifest in enumerate(manifests):
        relative = Path("..") / manifest.parent.name
        for k, line in enumerate(manifest.read_text().splitlines()):
            if k % len(manifests) == j:
                row = json.loads(line)
                rows.append({**row, "chosen": str(relative / row["chosen"]),
                             "rejected": str(relative / row["rejected"])})
    return write_pairs(folder, rows)


def train(args_list, ranks):
    """train.py on `ranks` processes; no activation checkpointing: the toy fits anyway, and it runs 23% faster."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] \
        if ranks > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, os.cpu_count() // ranks)))}
    subprocess.run(launcher + [str(Path(__file__).with_name("train.py")), *map(str, args_list),
                               "--no-gradient-checkpointing"], check=True, env=env)  # threads set: no torchrun banner


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy", help="where everything goes (default runs/toy)")
    parser.add_argument("--loss", default="sipo", choices=("sipo", "dpo-cm", "dpo"))
    parser.add_argument("--ranks", type=int, default=2, help="torchrun processes (default 2)")
    parser.add_argument("--base-steps", type=int, default=400, help="SFT steps of the base model")
    parser.add_argument("--pairs-per-prompt", type=int, default=48, help="training pairs per prompt")
    parser.add_argument("--steps", type=int, default=200, help="preference-optimisation steps")
    parser.add_argument("--beta", type=float, default=None, help="default: train.py's for the loss")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--samples", type=int, default=16, help="evaluation samples per prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import train as trainer
    try:
        trainer.check_numbers(args, {**dict.fromkeys(("ranks", "base_steps", "pairs_per_prompt", "steps", "samples"),
                                                     trainer.AT_LEAST_1),
                                     "beta": trainer.POSITIVE, "lr": trainer.POSITIVE, "seed": trainer.NON_NEGATIVE})
    except ValueError as error:
        sys.exit(f"error: {error}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    sample_steps, guidance = 20, 1.0  # no classifier-free guidance: the base never saw an empty prompt

    base = out / "base" / "model"
    if not (base / "model_index.json").exists():
        manifest = make_base_data(out / "data" / "base", 4096, args.seed)
        shutil.rmtree(out / "base", ignore_errors=True)
        train(["--model", "toy", "--data", manifest, "--loss", "sft", "--out", out / "base", "--steps", args.base_steps,
               "--batch-size", 64 // args.ranks, "--lr", 1e-3, "--warmup", 20, "--checkpoint-every", 100,
               "--seed", args.seed], args.ranks)
    pairs = make_preference_pairs(out / "data" / "pairs", base, args.pairs_per_prompt, 10_000, sample_steps, guidance)
    heldout = make_preference_pairs(out / "data" / "heldout", base, 8, 20_000, sample_steps, guidance)

    run = out / args.loss
    if not (run / "model" / "model_index.json").exists():
        shutil.rmtree(run, ignore_errors=True)
        beta = [] if args.beta is None else ["--beta", args.beta]
        train(["--model", "toy", "--pretrained", base, "--data", pairs, "--loss", args.loss, "--out", run,
               "--steps", args.steps, "--batch-size", 8, "--lr", args.lr, "--warmup", 10, "--checkpoint-every", 100,
               "--eval-data", heldout, "--eval-prompts", out / "prompts.txt", "--eval-every", 25, "--eval-guidance",
               guidance, "--seed", args.seed,
               *beta], args.ranks)
    report = evaluate.main(["compare", "--model", "toy", "--base", str(base), "--tuned", str(run), "--prompts",
                            str(out / "prompts.txt"), "--reward", "named_colour", "--samples", str(args.samples),
                            "--steps", str(sample_steps), "--guidance", str(guidance), "--seed", "1000000",
                            "--out", str(out / "eval")])
    evaluate.main(["curves", str(run), "--out", str(out / "eval" / "curves.png")])
    r = report["rewards"]["named_colour"]

    def interval(bounds, sign=""):
        return f"95% CI [{bounds[0]:{sign}.4f}, {bounds[1]:{sign}.4f}]"

    print(f"\n{args.loss} on the toy task, held-out seeds, {report['prompts']} prompts x {args.samples} samples:\n"
          f"  named_colour reward  base  {r['base_mean']:.4f}  {interval(r['base_ci'])}\n"
          f"                       tuned {r['tuned_mean']:.4f}  {interval(r['tuned_ci'])}\n"
          f"  improvement {r['improvement']:+.4f}  {interval(r['improvement_ci'], '+')}  "
          f"win rate over prompts {r['win_rate']:.2f}  paired p = {r['p_value']:.4f}\n"
          f"  report {out / 'eval' / 'report.md'}, grid {out / 'eval' / 'grid.png'}, "
          f"curves {out / 'eval' / 'curves.png'}")
    return report


if __name__ == "__main__":
    main()
