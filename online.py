"""Online pairs (train.py --pairs online): preference pairs sampled from the current policy, labelled by a reward;
and, as a command, the same sampling from a base model written once as a manifest (images or videos) that data.py
cache and train.py read:

    python online.py --model wan2.1-1.3b --prompts prompts.txt --reward clip --clip-model DIR --out pairs/
    python online.py --model tiny-wan2.1-1.3b --prompts prompts.txt --reward temporal_flicker --out pairs/  # tiny

The direct alternative to correcting off-policy bias after the fact (SIPO's importance weight): remove it at its
source. Every --refresh-every optimizer steps each rank samples --samples-per-prompt latents for its share of the
prompts with the pipeline's own sampler, decodes them for the reward (any evaluate.py knows), and every rank gathers
every sample's latents and reward; per prompt the best and the worst sample become a pair when their rewards differ
by more than --online-margin. The policy's latents are latents already: no VAE encodes them. The pairs are trained
on until the next refresh, and stored in the run directory (online/pairs-STEP.safetensors, written atomically), so
that a resumed run trains on the very pairs a straight one does, without depending on sampling being bit-exact.
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
import evaluate
import models
from common import (AT_LEAST_1, NON_NEGATIVE, ArgumentParser, check_numbers, check_output, error_line,
                    valid_range, write_text_atomically, writing)
from rundir import RunDir


# --samples-per-prompt, here and in train.py and study.py: a pair is the best and the worst of them
SAMPLES_PER_PROMPT = valid_range("at least 2 (a pair is the best and the worst)", lambda v: v >= 2)
NOISE_SEEDS = 1_000_000  # a refresh's pairs are noised as pairs refresh_step * NOISE_SEEDS + i: never reused


class OnlinePairs(torch.utils.data.Dataset):
    """One refresh's pairs, read as CachedPairs' items: the latents of winner and loser, the conditioning of their
    prompt, and an index that seeds the pair's noise (unique across refreshes)."""

    def __init__(self, tensors, step):
        self.tensors, self.step = tensors, step
        self.cond_keys = [key for key in tensors if key.startswith("cond.")]

    def __len__(self):
        return len(self.tensors["latents_w"])

    def __getitem__(self, i):
        prompt = int(self.tensors["prompt"][i])
        return {"latents_w": self.tensors["latents_w"][i], "latents_l": self.tensors["latents_l"][i],
                **{key: self.tensors[key][prompt] for key in self.cond_keys},
                "index": torch.tensor(self.step * NOISE_SEEDS + i)}


def sample_pairs(backbone, prompts, cond, reward, args, step, rank, world_size, autocast):
    """(OnlinePairs or None, the refresh's record): --samples-per-prompt samples of every prompt from the current
    policy, one sampler call a prompt, each sample seeded by (seed, step, prompt, sample): any number of ranks draws
    the same, in the same batches. Prompts go to ranks in turn, in equal shares (the sharded policy's forwards are
    collective: a short share repeats prompts), and every rank gathers every sample."""
    start, count = time.perf_counter(), args.samples_per_prompt
    share = -(-len(prompts) // world_size)
    mine = (list(range(rank, len(prompts), world_size)) + list(range(share)))[:share]
    latents, scores = [], []
    for p in mine:
        with autocast():
            drawn = backbone.sample_latents([prompts[p]] * count, seed=[hash((args.seed, step, p, k)) % 2 ** 31
                                                                        for k in range(count)],
                                            steps=args.online_sample_steps, guidance=args.online_guidance).float()
        latents.append(drawn)
        scores.append(reward(backbone.decode_latents(drawn).cpu(), [prompts[p]] * count).float())
    latents = torch.stack(latents)  # (share, samples, ...)
    scores = torch.stack(scores).to(latents.device)
    if world_size > 1:  # rank r drew prompts r, r + N, ...: back into the prompts' order
        every = [[torch.empty_like(t) for _ in range(world_size)] for t in (latents, scores)]
        dist.all_gather(every[0], latents.contiguous())
        dist.all_gather(every[1], scores.contiguous())
        latents, scores = (torch.stack([part[p % world_size][p // world_size] for p in range(len(prompts))])
                           for part in every)
    if not torch.isfinite(scores).all():  # it would rank nothing: not a margin problem
        bad = int((~torch.isfinite(scores)).sum())
        raise ValueError(f"--reward {args.reward}: scored {bad} of {scores.numel()} samples NaN or inf at the "
                         f"refresh of step {step}")
    best, worst = scores.argmax(1), scores.argmin(1)
    kept = torch.nonzero(scores.max(1).values - scores.min(1).values > args.online_margin).flatten()
    record = {"refresh_reward_mean": scores.mean().item(), "refresh_reward_std": scores.std().item(),
              "refresh_pairs": len(kept), "refresh_seconds": time.perf_counter() - start}
    if len(kept) == 0:
        return None, record
    tensors = {"latents_w": latents[kept, best[kept]].cpu(), "latents_l": latents[kept, worst[kept]].cpu(),
               "prompt": kept.cpu(), **{f"cond.{key}": value.cpu() for key, value in cond.items()}}
    return OnlinePairs(tensors, step), record


def save_pairs(out, pairs):
    """Rank 0: the refresh's pairs, whole or not at all."""
    path = RunDir(out).online_pairs(pairs.step)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with writing(tmp):
        save_file({key: value.contiguous() for key, value in pairs.tensors.items()}, tmp)
    os.replace(tmp, path)


def load_pairs(out, step):
    """The pairs stored at refresh `step`; ValueError naming the file when it is missing or damaged."""
    path = RunDir(out).online_pairs(step)
    try:
        pairs = OnlinePairs(load_file(path), step)
        pairs[0]  # the keys and shapes a refresh stores
    except Exception as error:  # noqa: BLE001 -- safetensors raises its own types for a damaged file
        raise ValueError(f"{path}: the stored pairs of the refresh at step {step} cannot be read "
                         f"({(str(error).strip().splitlines() or ['?'])[0][:120]}); start the run again") from None
    return pairs


def prune(out, oldest_kept):
    """The stored pairs no kept checkpoint trains on any more (those of refreshes before `oldest_kept`)."""
    for path in sorted(RunDir(out).online.glob("pairs-*.safetensors")):
        if int(path.stem.split("-")[1]) < oldest_kept:
            path.unlink()


# ---------------------------------------------------------------------------------------------------------
# The command: a preference set from prompts, sampled from the base once and written as a manifest
# ---------------------------------------------------------------------------------------------------------

def make_manifest(backbone, prompts, reward, out, samples_per_prompt, steps, guidance, seed, margin):
    """Per prompt, `samples_per_prompt` samples of the backbone (sample k of prompt i seeded seed + i * K + k); the
    best and the worst by `reward` become a pair when their scores differ by more than `margin`. Writes the media
    and out/pairs.jsonl (prompt, chosen, rejected, their scores), the manifest last and atomically: (path, pairs,
    prompts passed over)."""
    rows, passed = [], 0
    for i, prompt in enumerate(tqdm(prompts, desc="sampling pairs", unit="prompt")):
        seeds = [seed + i * samples_per_prompt + k for k in range(samples_per_prompt)]
        samples = backbone.sample([prompt] * samples_per_prompt, seeds, steps, guidance).float().cpu()
        scores = reward(samples, [prompt] * samples_per_prompt).float()
        if not torch.isfinite(scores).all():
            raise ValueError(f"the reward scored a sample of prompt {i + 1} ({prompt!r}) NaN or inf")
        best, worst = int(scores.argmax()), int(scores.argmin())
        if scores[best] - scores[worst] <= margin:
            passed += 1
            continue
        rows.append({"prompt": prompt, "chosen": data.save_media(out, f"{i:05d}-{best}", samples[best]),
                     "rejected": data.save_media(out, f"{i:05d}-{worst}", samples[worst]),
                     "score_chosen": float(scores[best]), "score_rejected": float(scores[worst])})
    write_text_atomically(out / "pairs.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
    return out / "pairs.jsonl", len(rows), passed


def main(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=models.NAMES, metavar="MODEL")
    parser.add_argument("--pretrained", help="diffusers directory or hub id (default for full-size models: the "
                                             "official repository)")
    parser.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    parser.add_argument("--reward", required=True, help="what labels the pairs: one of evaluate.py's rewards")
    evaluate.add_reward_model_flags(parser)
    parser.add_argument("--samples-per-prompt", type=int, default=4, help="a pair is the best and the worst of these")
    parser.add_argument("--margin", type=float, default=0.0, help="keep a pair when its scores differ by more")
    parser.add_argument("--steps", type=int, help="sampler steps (default: the pipeline's own)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="a new or empty directory: the media and pairs.jsonl")
    args = parser.parse_args(argv)
    try:
        check_numbers(args, {"samples_per_prompt": SAMPLES_PER_PROMPT, "steps": AT_LEAST_1, "margin": NON_NEGATIVE,
                             "guidance": NON_NEGATIVE, "seed": NON_NEGATIVE})
        out = check_output(args.out)
        if out.exists() and any(out.iterdir()):
            raise ValueError(f"--out {out}: not empty; pass a new or empty directory")
        prompts = evaluate.read_prompts(args.prompts)
        reward = evaluate.load_rewards(args.reward, args)[args.reward]
        steps, guidance = evaluate.sampler_settings(args.model, args.steps, args.guidance)
        backbone = models.load_backbone(args.model, args.pretrained)
        out.mkdir(parents=True, exist_ok=True)
        manifest, kept, passed = make_manifest(backbone, prompts, reward, out, args.samples_per_prompt, steps,
                                               guidance, args.seed, args.margin)
    except ValueError as error:
        sys.exit(error_line(error))
    print(f"{manifest}: {kept} pairs from {len(prompts)} prompts x {args.samples_per_prompt} samples"
          + (f"; {passed} prompts passed over (best and worst within --margin {args.margin:g})" if passed else ""))


if __name__ == "__main__":
    main()
