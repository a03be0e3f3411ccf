"""The embedded default: align a diffusion model to a preference with SIPO on a laptop CPU, and show it worked.

    python toy.py                # minutes on a laptop's CPU (docs/performance.md); a rerun reuses what exists
    python toy.py --train-base   # the same from a base trained here by the shipped base's recipe

The task: coloured circles and squares on dark, noisy backgrounds, 16x16 RGB, prompts "a red circle", ...; the
colour's vividness varies from drawing to drawing. The base (toy-base/, shipped: a v-prediction UNet trained on 4096
drawings by `--train-base`'s recipe) draws what it is asked for. Then:
1. pairs are sampled from the base and labelled by a known reward, `named_colour` (evaluate.py): how strongly an
   image leans toward the colour its prompt names -- a preference a person can check by eye;
2. SIPO aligns the base on 2 ranks (launcher.py starts them as torchrun would);
3. tuned and base are compared on held-out seeds; the headline, the grid, the report and the curves are in --out.
"""
import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import evaluate
import launcher
import models
from common import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, ArgumentParser, check_numbers, check_output, error_line,
                    write_text_atomically)
from rundir import RunDir, comparable

COLOURS = {"red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.25, 1.0), "yellow": (1.0, 0.9, 0.1)}
SHAPES = ("circle", "square")
PROMPTS = [f"a {colour} {shape}" for colour in COLOURS for shape in SHAPES]
SIZE = 16
STYLES = ("base", "foreign", "hard")


def draw(prompt, generator, vividness=None, style="base"):
    """One 16x16 image of the prompt's shape in its colour, mixed with grey by a random vividness (or the one
    given), on a dark noisy background. Returns uint8 (16, 16, 3).

    Two other generators' styles (the off-policy pairs of docs/method.md §8), both with vivid shapes (vividness 0.9
    to 1):
      "foreign"  on a background of horizontal stripes two pixels high, 0.0 and 0.35, whose mean is the base
                 background's mean;
      "hard"     the base's background, and over the whole image a one-pixel checkerboard of random phase, each
                 channel +-min(0.25, p, 1 - p) around its value p: fine texture the base never saw and reconstructs
                 worse than its own samples, which lowers the importance weight.
    named_colour is linear in the pixels, so stripes and checkerboard (zero mean, never clipped) are worth nothing
    to it: styles a person sees in the grid, measured by evaluate.horizontal_stripes and evaluate.checker_texture,
    that the reward does not ask for."""
    if style not in STYLES:
        raise ValueError(f"draw: style {style!r}; expected one of {', '.join(STYLES)}")
    _, colour, shape = prompt.split()
    u = torch.rand(6, generator=generator)
    if vividness is None:
        vividness = 0.25 + 0.75 * u[0] if style == "base" else 0.9 + 0.1 * u[0]
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
    if style == "hard":
        checker = (((y + x).long() + (u[5] < 0.5).long()) % 2 * 2 - 1).unsqueeze(-1)
        image = image + checker * torch.minimum(torch.minimum(image, 1 - image), torch.tensor(0.25))
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


def write_pairs(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / "pairs.jsonl", "\n".join(json.dumps(row) for row in rows) + "\n")
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
    """Pairs labelled by named_colour, the higher-scoring image first, from one of the off-policy study's sources:
    "on" two samples of the base; "data" two draws of the base's training distribution (draw); "foreign" or "hard"
    a draw of that generator (draw(style=source)) against a sample of the base ("mixed": mix_pairs).
    Made `chunk` per prompt at a time (64 images a call), fewer in the last; the seeds of training and held-out pairs
    never overlap."""
    if (folder / "pairs.jsonl").exists():
        return folder / "pairs.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    backbone = models.load_backbone("toy", pretrained=str(base)) if source != "data" else None
    generator = torch.Generator().manual_seed(first_seed)
    rows = []
    origin = "the base" if source == "on" else f"{source} images"
    for k in tqdm(range(0, per_prompt, chunk), desc=f"making {folder.name}/ from {origin}"):
        prompts = PROMPTS * min(chunk, per_prompt - k)

        def drawn(style):
            return torch.stack([torch.from_numpy(draw(p, generator, style=style)).permute(2, 0, 1).float() / 255
                                for p in prompts])
        a = drawn(source) if source in STYLES else drawn("base") if source == "data" else \
            backbone.sample(prompts, first_seed + 2 * k, steps, guidance)
        b = drawn("base") if source == "data" else backbone.sample(prompts, first_seed + 2 * k + 1, steps, guidance)
        score_a, score_b = evaluate.named_colour(a, prompts), evaluate.named_colour(b, prompts)
        for i, prompt in enumerate(prompts):
            names = [save_image(folder, f"{k:04d}-{i:03d}-{label}.png", image)
                     for label, image in (("a", a[i]), ("b", b[i]))]
            better = score_a[i] >= score_b[i]
            rows.append({"prompt": prompt, "chosen": names[0 if better else 1], "rejected": names[1 if better else 0],
                         "score_chosen": float(max(score_a[i], score_b[i])),
                         "score_rejected": float(min(score_a[i], score_b[i]))})
    return write_pairs(folder, rows)


def mix_pairs(folder, manifests):
    """The off-policy study's "mixed" source: row k of the j-th manifest where k % len(manifests) == j, as many pairs as
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
    """train.py on `ranks` processes (launcher.py: as torchrun starts them, without an interpreter each); no
    activation checkpointing: the toy fits without it, and recomputing costs time. A failure has been said by
    train.py."""
    if launcher.finish(launcher.launch([*args_list, "--no-gradient-checkpointing"], ranks)):
        sys.exit(1)


BASE = Path(__file__).with_name("toy-base")  # the shipped base; `python toy.py --train-base` is its recipe
BASE_RECIPE = {"images": 4096, "steps": 3200, "batch": 64, "lr": 1e-3, "warmup": 20}
SAMPLE_STEPS, GUIDANCE = 20, 1.0  # no classifier-free guidance: the base never saw an empty prompt
PHASES = {"pairs": "sample {pairs} training and {heldout} held-out pairs from the base, label them by named_colour",
          "align": "align the base with {loss}, {steps} steps on {ranks} rank(s), into {out}/{label}/",
          "compare": "compare tuned and base on 8 prompts x {samples} held-out seeds"}


@contextlib.contextmanager
def timed(seconds, phase):
    """seconds[phase] = the wall clock the block took."""
    started = time.perf_counter()
    yield
    seconds[phase] = time.perf_counter() - started


def train_base(out, steps, ranks, seed):
    """The shipped base's recipe: SFT of the toy backbone on 4096 drawn images (BASE_RECIPE). Writes
    base/model/recipe.json: the flags, the first losses (test_toy.py checks the recipe against the shipped base's),
    the base's named_shape score and the minutes it took."""
    run = RunDir(out / "base")
    base = run.model
    if not run.has_model():
        took = {}
        with timed(took, "base"):
            manifest = make_base_data(out / "data" / "base", BASE_RECIPE["images"], seed)
            shutil.rmtree(out / "base", ignore_errors=True)
            train(["--model", "toy", "--data", manifest, "--loss", "sft", "--out", out / "base", "--steps", steps,
                   "--batch-size", BASE_RECIPE["batch"] // ranks, "--lr", BASE_RECIPE["lr"],
                   "--warmup", BASE_RECIPE["warmup"], "--checkpoint-every", 400, "--seed", seed], ranks)
        log = run.read_log()
        recipe = {"command": f"python toy.py --train-base --base-steps {steps} --ranks {ranks} --seed {seed}",
                  **BASE_RECIPE, "steps": steps, "ranks": ranks, "seed": seed,
                  "first_losses": [r["loss"] for r in log[:20]], "named_shape": base_quality(base),
                  "minutes": round(took["base"] / 60, 1)}
        (base / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    return base


def base_quality(base, per_prompt=8, seed=3_000_000):
    """The fraction of a base's samples at fixed seeds (prompt i, sample k: seed + k * 8 + i) whose colour and
    shape named_shape recognises: does it draw what it is asked for."""
    backbone = models.load_backbone("toy", pretrained=str(base))
    prompts = PROMPTS * per_prompt
    with torch.no_grad():
        images = backbone.sample(prompts, [seed + i for i in range(len(prompts))], SAMPLE_STEPS, GUIDANCE)
    return float(evaluate.named_shape(images, prompts).mean())


TRAINING_FLAGS = ("pairs_per_prompt", "steps", "beta", "lr", "seed", "ranks")


def run_label(args, parser):
    """The aligned run's name, under --out: the loss, then each flag that changes training and is not its default
    (sipo, dpo-cm-steps150-lr0.0003, ...). A rerun with the same flags reuses the model; with others it trains its
    own, so a model is never reported under flags it was not trained with, and each has its own evaluation."""
    changed = [f"{name.replace('_', '-')}{getattr(args, name):g}" for name in TRAINING_FLAGS
               if getattr(args, name) != parser.get_default(name)]
    return "-".join([args.loss, *changed])


def check_trained_as(run, args, pairs):
    """A reused model was trained with this loss, these steps, lr, seed and pairs (and beta where given): else one
    line, rather than a report of another model (a directory trained by hand, or by an older toy.py)."""
    trained = run.read_args()
    wanted = {"loss": args.loss, "steps": args.steps, "lr": args.lr, "seed": args.seed, "data": pairs,
              **({"beta": args.beta} if args.beta is not None else {})}
    differ = [f"--{key} {trained.get(key)} (not {value})" for key, value in wanted.items()
              if trained.get(key) != comparable(value)]
    if differ:
        sys.exit(f"error: {run.path} was trained with {', '.join(differ)}; pass another --out or remove it")


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy", help="where everything goes (default runs/toy)")
    parser.add_argument("--loss", default="sipo", choices=("sipo", "dpo-cm", "dpo"))
    parser.add_argument("--ranks", type=int, default=2, help="training processes (default 2)")
    parser.add_argument("--train-base", action="store_true",
                        help=f"train the base by its recipe into OUT/base instead of using the shipped {BASE.name}/")
    parser.add_argument("--base-steps", type=int, default=BASE_RECIPE["steps"],
                        help=f"SFT steps of --train-base (default {BASE_RECIPE['steps']}: the shipped base's)")
    parser.add_argument("--pairs-per-prompt", type=int, default=32, help="training pairs per prompt")
    parser.add_argument("--heldout-per-prompt", type=int, default=8,
                        help="held-out pairs per prompt (the held-out accuracy during training)")
    parser.add_argument("--steps", type=int, default=100, help="preference-optimisation steps")
    parser.add_argument("--beta", type=float, default=None, help="default: train.py's for the loss")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--samples", type=int, default=16, help="evaluation samples per prompt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = ("ranks", "base_steps", "pairs_per_prompt", "heldout_per_prompt", "steps", "samples")
        check_numbers(args, {**dict.fromkeys(counts, AT_LEAST_1), "beta": POSITIVE, "lr": POSITIVE,
                             "seed": NON_NEGATIVE})
        check_output(args.out)
    except ValueError as error:
        sys.exit(error_line(error))
    out, label = Path(args.out), run_label(args, parser)
    base = RunDir(out / "base").model if args.train_base else BASE
    made_from = out / "base.txt"  # pairs and runs in OUT belong to one base
    if made_from.exists() and made_from.read_text().strip() != str(base.resolve()):
        sys.exit(f"error: {out} holds pairs and runs made from the base {made_from.read_text().strip()}, not {base}; "
                 f"pass another --out")
    out.mkdir(parents=True, exist_ok=True)
    made_from.write_text(f"{base.resolve()}\n")
    (out / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    sizes = {"pairs": args.pairs_per_prompt * len(PROMPTS), "heldout": args.heldout_per_prompt * len(PROMPTS)}
    print(f"{args.loss} on the toy task: 16x16 coloured shapes, {len(PROMPTS)} prompts (\"a red circle\", ...)\n"
          f"  the preference: named_colour, how strongly an image shows the colour its prompt names\n"
          f"  base: {f'trained by its recipe, {args.base_steps} SFT steps' if args.train_base else 'the shipped one'}"
          f" ({base})\n" +
          "".join(f"  {i}. {text.format(**sizes, **vars(args), label=label)}\n"
                  for i, text in enumerate(PHASES.values(), 1)) +
          "  (a rerun reuses what exists)", flush=True)
    seconds = {}

    if args.train_base:
        with timed(seconds, "base"):
            train_base(out, args.base_steps, args.ranks, args.seed)
    with timed(seconds, "pairs"):
        pairs = make_preference_pairs(out / "data" / f"pairs-{args.pairs_per_prompt}", base, args.pairs_per_prompt,
                                      10_000, SAMPLE_STEPS, GUIDANCE)
        heldout = make_preference_pairs(out / "data" / f"heldout-{args.heldout_per_prompt}", base,
                                        args.heldout_per_prompt, 20_000, SAMPLE_STEPS, GUIDANCE)

    run = RunDir(out / label)
    with timed(seconds, "align"):
        trained = not run.has_model()
        if not trained:
            check_trained_as(run, args, pairs)
        else:  # none, or one killed before its model: this label's flags, from the start
            shutil.rmtree(run.path, ignore_errors=True)
            beta = [] if args.beta is None else ["--beta", args.beta]
            train(["--model", "toy", "--pretrained", base, "--data", pairs, "--loss", args.loss, "--out", run,
                   "--steps", args.steps, "--batch-size", 8, "--lr", args.lr, "--warmup", 10, "--checkpoint-every",
                   50, "--eval-data", heldout, "--eval-prompts", out / "prompts.txt", "--eval-every", 25,
                   "--eval-guidance", GUIDANCE, "--seed", args.seed, *beta], args.ranks)

    with timed(seconds, "compare"):
        report = evaluate.run(["compare", "--model", "toy", "--base", str(base), "--tuned", str(run), "--prompts",
                                str(out / "prompts.txt"), "--reward", "named_colour,named_shape", "--samples",
                                str(args.samples), "--steps", str(SAMPLE_STEPS), "--guidance", str(GUIDANCE),
                                "--seed", "1000000", "--out", str(out / "eval" / label)])
        evaluate.run(["curves", str(run), "--out", str(out / "eval" / label / "curves.png")])
    print(result_block(report, args, out / "eval" / label, seconds, label, trained))
    return report


def result_block(report, args, evaluation, seconds, label, trained):
    reward, shape = report["rewards"]["named_colour"], report["rewards"]["named_shape"]

    def interval(bounds, sign=""):
        return f"[{bounds[0]:{sign}.4f}, {bounds[1]:{sign}.4f}]"

    by_prompt = ", ".join(f"{p.removeprefix('a ')} {g:+.3f}" for p, g in zip(PROMPTS, reward["improvement_by_prompt"]))
    took = ", ".join(f"{phase} {s:.0f} s" for phase, s in seconds.items())
    origin = "trained now" if trained else "trained by an earlier run with these flags, reused"
    return (f"\n{label} ({origin}) on the toy task, {report['prompts']} prompts x {args.samples} held-out seeds, "
            f"the same seeds for both models:\n"
            f"  named_colour   base  {reward['base_mean']:.4f} {interval(reward['base_ci'])}   "
            f"tuned {reward['tuned_mean']:.4f} {interval(reward['tuned_ci'])}\n"
            f"  improvement    {reward['improvement']:+.4f} {interval(reward['improvement_ci'], '+')} (95% CI), "
            f"paired p = {reward['p_value']:.4f}, {evaluate.prompt_counts(reward)}\n"
            f"  by prompt      {by_prompt}\n"
            f"  draws what it is asked for (named_shape: colour and shape recognised): base "
            f"{shape['base_mean']:.0%}, tuned {shape['tuned_mean']:.0%}\n"
            f"  grid    {evaluation / 'grid.png'} (base above tuned, 3 seeds)\n"
            f"  report  {evaluation / 'report.md'}; training curves {evaluation / 'curves.png'}\n"
            f"  took    {took}")


if __name__ == "__main__":
    main()
