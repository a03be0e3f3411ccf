"""The run directory: what train.py writes into --out, named once, and how its readers find their way in it.

    RUN/args.json                       the run's flags, its world size, placement and data summary
    RUN/log.jsonl                       one JSON record per optimizer step (keys: docs/run-directory.md)
    RUN/checkpoints/step-NNNNNN/        DCP shards and trainer.json (counters, LR schedule); complete ones only
    RUN/model/                          the final pipeline in the diffusers layout (`from_pretrained`)
    RUN/lora/                           with --lora: the adapter in diffusers' LoRA format (`load_lora_weights`)
    RUN/samples/step-NNNNNN/grid.png    samples of --eval-prompts at each evaluation
    RUN/tensorboard/                    with --tensorboard
    RUN/.lock                           held by the trainer writing the run

train.py writes it; evaluate.py, study.py, toy.py and the tests read it, through RunDir alone. It imports torch
(DCP's metadata reader, to tell an intact checkpoint from a cut one) and the standard library.
"""
import json
from pathlib import Path

import torch.distributed.checkpoint as dcp

LORA_FILE = "pytorch_lora_weights.safetensors"  # the file name diffusers' save_lora_weights writes
CHECKPOINT_META = "trainer.json"


class RunDir:
    """The parts of one run directory. Paths only: nothing is created or read until a method is called."""

    def __init__(self, path):
        self.path = Path(path)
        self.args_file = self.path / "args.json"
        self.log_file = self.path / "log.jsonl"
        self.checkpoints = self.path / "checkpoints"
        self.model = self.path / "model"
        self.lora = self.path / "lora"
        self.samples = self.path / "samples"
        self.tensorboard = self.path / "tensorboard"
        self.lock = self.path / ".lock"

    def __str__(self):
        return str(self.path)

    def is_run(self):
        """Written by train.py: it writes args.json before anything else."""
        return self.args_file.is_file()

    def has_model(self):
        return (self.model / "model_index.json").is_file()

    def read_args(self):
        """args.json as a dict; ValueError naming the file when it cannot be read."""
        try:
            recorded = json.loads(self.args_file.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"{self.args_file}: unreadable ({error})") from None
        if not isinstance(recorded, dict):
            raise ValueError(f"{self.args_file}: not a JSON object")
        return recorded

    def read_log(self, say=None):
        """log.jsonl's records; a line a live or killed run left cut is passed over (and told to `say`)."""
        records = []
        for number, line in enumerate(self.log_file.read_text().splitlines(), start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if say:
                    say(f"note: {self.log_file} line {number} is incomplete; skipped")
        return records

    def checkpoint(self, step):
        return self.checkpoints / f"step-{step:06d}"

    def sample_folder(self, step):
        return self.samples / f"step-{step:06d}"

    def checkpoint_steps(self):
        """The checkpoints' folders, oldest first, ordered by their step number (not by name)."""
        found = [p for p in self.checkpoints.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
        return sorted(found, key=lambda p: int(p.name[5:]))

    def latest_checkpoint(self, say=None):
        """The newest intact checkpoint, or None; `say` is told which newer ones were damaged and passed over."""
        steps = self.checkpoint_steps()[::-1]
        for newer, path in enumerate(steps):
            if intact(path):
                if newer and say:
                    say(f"note: {', '.join(p.name for p in steps[:newer])} damaged (a shard, .metadata or "
                        f"{CHECKPOINT_META} missing or cut); resuming from {path.name}")
                return path
        return None


def intact(path):
    """trainer.json parses and every shard DCP's .metadata names is there at full length."""
    try:
        json.loads((path / CHECKPOINT_META).read_text())["step"]
        storage = dcp.FileSystemReader(path).read_metadata().storage_data
    except Exception:  # noqa: BLE001 -- any unreadable file means the checkpoint cannot be resumed from
        return False
    ends = {}
    for info in storage.values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    return all((path / name).is_file() and (path / name).stat().st_size >= end for name, end in ends.items())


def model_dir(path):
    """A run directory's exported pipeline, or the path itself (a diffusers directory, a LoRA folder or a hub id)."""
    run = RunDir(path)
    return str(run.model) if run.has_model() else str(path)
