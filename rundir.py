"""The run directory: what train.py writes into --out, named once, and how its readers find their way in it.

    RUN/args.json                       the run's flags, its world size, placement and data summary
    RUN/log.jsonl                       one JSON record per optimizer step (keys: docs/run-directory.md)
    RUN/checkpoints/step-NNNNNN/        DCP shards and trainer.json (counters, LR schedule); complete ones only
    RUN/model/                          the final pipeline in the diffusers layout (`from_pretrained`)
    RUN/lora/                           with --lora: the adapter in diffusers' LoRA format (`load_lora_weights`)
    RUN/samples/step-NNNNNN/grid.png    samples of --eval-prompts at each evaluation
    RUN/tensorboard/                    with --tensorboard
    RUN/.lock                           held by the trainer writing the run

train.py writes it; evaluate.py, study.py, toy.py and the tests read it, through RunDir alone. Below the layout:
the checkpoint's storage (DCP with its metadata in JSON: nothing in a run directory is unpickled), how train.py
claims a directory (its own runs only, one writer at a time) and what a resume may change. It imports torch (the
process group, DCP) and the standard library.
"""
import dataclasses
import functools
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata

from common import rank_and_world, take_lock, write_text_atomically

LORA_FILE = "pytorch_lora_weights.safetensors"  # the file name diffusers' save_lora_weights writes
CHECKPOINT_META = "trainer.json"
DCP_METADATA = "metadata.json"  # DCP's own metadata (which tensor is where), in JSON instead of DCP's pickle


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
        self.online = self.path / "online"  # --pairs online: each refresh's pairs
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

    def online_pairs(self, step):
        return self.online / f"pairs-{step:06d}.safetensors"

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
    """trainer.json parses and every shard the metadata names is there at full length (JSON only: a checkpoint is
    judged without unpickling anything)."""
    try:
        if not isinstance(json.loads((path / CHECKPOINT_META).read_text())["step"], int):
            return False
        storage = json.loads((path / DCP_METADATA).read_text())["storage_data"]["__items__"]
        ends = {}
        for _, info in storage:
            ends[info["relative_path"]] = max(ends.get(info["relative_path"], 0), info["offset"] + info["length"])
    except Exception:  # noqa: BLE001 -- any unreadable file means the checkpoint cannot be resumed from
        return False
    return all((path / name).is_file() and (path / name).stat().st_size >= end for name, end in ends.items())


# ---------------------------------------------------------------------------------------------------------
# The checkpoint's storage: DCP's file-system shards, its metadata in JSON, tensors only
# ---------------------------------------------------------------------------------------------------------

class CheckpointWriter(dcp.FileSystemWriter):
    """DCP's file-system storage, but the metadata (which tensor chunk lies where) is written as JSON: DCP pickles
    it, and unpickling a checkpoint received from someone else runs whatever code it holds."""

    def finish(self, metadata, results):
        metadata.storage_data = {item.index: item.storage_data for written in results for item in written}
        metadata.storage_meta = None
        (Path(self.path) / DCP_METADATA).write_text(json.dumps(to_json(metadata)))


class CheckpointReader(dcp.FileSystemReader):
    """Reads what CheckpointWriter wrote: the metadata from JSON, through an allowlist of DCP's own classes."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / DCP_METADATA
        try:
            metadata = from_json(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise ValueError(f"{path}: not a checkpoint's metadata this trainer wrote ({error})") from None
        metadata.storage_meta = dcp_metadata.StorageMeta(load_id=getattr(self, "load_id", None))
        return metadata


class TensorsOnly(dcp.DefaultLoadPlanner):
    """DCP's load planner, refusing an item stored as bytes: DCP stores non-tensor values pickled and unpickles them
    as they load (train.py saves tensors only, and the optimizer's hyperparameters in trainer.json)."""

    def load_bytes(self, read_item, value):
        raise ValueError(f"the checkpoint stores {read_item.dest_index.fqn} as a pickled object, which is not read")


@functools.cache
def storage_classes():
    """DCP's metadata classes, the only ones from_json makes (the storage record's moved between torch versions)."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    return {cls.__name__: cls for cls in (dcp_metadata.Metadata, dcp_metadata.MetadataIndex, dcp_metadata.StorageMeta,
                                          dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata,
                                          dcp_metadata.ChunkStorageMetadata, dcp_metadata.TensorProperties,
                                          _StorageInfo)}


TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)


def to_json(value):
    """DCP's metadata as JSON: dataclasses by class name and fields, sizes, dtypes and layouts by name, tuples and
    dicts with non-string keys as tagged lists."""
    if dataclasses.is_dataclass(value):
        return {"__class__": type(value).__name__,
                **{f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, torch.Size):
        return {"__size__": list(value)}
    if isinstance(value, TORCH_VALUES):
        return {"__torch__": str(value).removeprefix("torch.")}
    if isinstance(value, dict):
        if all(isinstance(key, str) for key in value):
            return {"__dict__": {key: to_json(item) for key, item in value.items()}}
        return {"__items__": [[to_json(key), to_json(item)] for key, item in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"__tuple__" if isinstance(value, tuple) else "__list__": [to_json(item) for item in value]}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"{type(value).__name__} in a checkpoint's metadata")


def from_json(value):
    """to_json undone; only DCP's metadata classes and torch's dtypes, layouts and memory formats are made."""
    if not isinstance(value, dict):  # a number, a string, None: to_json tags every list
        return value
    if "__class__" in value:
        cls = storage_classes()[value["__class__"]]
        names = {f.name for f in dataclasses.fields(cls)}  # another torch's extra fields are dropped
        return cls(**{key: from_json(item) for key, item in value.items() if key in names})
    (tag, content), = value.items()
    if tag == "__size__":
        return torch.Size(content)
    if tag == "__torch__":
        made = getattr(torch, content)
        if not isinstance(made, TORCH_VALUES):
            raise TypeError(f"{content} is not a dtype, layout or memory format")
        return made
    if tag == "__items__":
        return {from_json(key): from_json(item) for key, item in content}
    if tag == "__dict__":
        return {key: from_json(item) for key, item in content.items()}
    return (tuple if tag == "__tuple__" else list)(from_json(item) for item in content)


def model_dir(path):
    """A run directory's exported pipeline, or the path itself (a diffusers directory, a LoRA folder or a hub id)."""
    run = RunDir(path)
    return str(run.model) if run.has_model() else str(path)


# ---------------------------------------------------------------------------------------------------------
# Claiming and resuming: what train.py may do with a directory, and what a resume may change
# ---------------------------------------------------------------------------------------------------------

# What a resumed run may not change: each alters what the steps already taken mean. A resume takes the run's own
# value for each of them that its command line does not give, and refuses one that differs (and the pairs a step:
# check_pairs_per_step).
RUN_SETTINGS = ("pretrained", "random_weights", "data", "loss", "beta", "tau", "eps", "weight", "normalise",
                "min_noise", "path_draws", "weight_sampler_steps", "temperature", "lr", "weight_decay", "warmup",
                "max_grad_norm", "lora", "seed", "flip", "frame_stride", "precision", "flux_guidance", "resolution",
                "frames", "pairs", "reward", "refresh_every", "samples_per_prompt", "online_margin",
                "online_sample_steps", "online_guidance")


def check_run_directory(args, world_size=1):
    """--out is new, empty, or a run directory of ours (args.json) for the same --model. A complete checkpoint
    there is continued with --resume and never overwritten without it; a run that died before its first
    checkpoint leaves nothing to lose, so a rerun (or --resume) starts it again from step 0. Returns the run's
    settings that a resume adopts ({} otherwise)."""
    run = RunDir(args.out)
    if run.path.exists() and not run.path.is_dir():
        raise ValueError(f"--out {run}: is a file, not a directory")
    if not run.is_run():
        if run.path.is_dir() and any(p != run.lock for p in run.path.iterdir()):  # the lock: this claim's own
            raise ValueError(f"--out {run}: holds files train.py did not write (no args.json); pass a new or empty "
                             f"directory")
        if args.resume:
            raise ValueError(f"--resume: {run} holds no run")
        return {}
    try:
        recorded = run.read_args()
        previous = recorded["model"]
    except (ValueError, KeyError):
        raise ValueError(f"--out {run}: args.json is unreadable; pass another --out") from None
    if previous != args.model:
        raise ValueError(f"--out {run} holds a run of --model {previous}, not --model {args.model}")
    older = [p.name for p in run.checkpoint_steps() if (p / ".metadata").exists() and not (p / DCP_METADATA).exists()]
    if older:  # DCP's own format: its metadata is a pickle, which is never read
        raise ValueError(f"--out {run}: {older[-1]} is a checkpoint of an older format (pickled metadata), which "
                         f"this trainer does not read; pass another --out")
    checkpoint = run.latest_checkpoint()
    if checkpoint is not None and not args.resume:
        raise ValueError(f"--out {run} already holds a run ({checkpoint.name}); pass --resume to continue it, or "
                         f"another --out")
    if checkpoint is None:
        return {}
    for key in RUN_SETTINGS:
        flag = "--" + key.replace("_", "-")
        if key in args.given and key in recorded and comparable(getattr(args, key)) != recorded[key]:
            raise ValueError(f"--resume: {run} was trained with {flag} {recorded[key]}, not {getattr(args, key)}; "
                             f"resume with the run's own settings (leave {flag} out), or pass another --out")
    adopted = {key: recorded[key] for key in RUN_SETTINGS if key in recorded and key not in args.given}
    return {**adopted, **check_pairs_per_step(args, recorded, world_size)}


def check_pairs_per_step(args, recorded, world_size):
    """A resume may run on another number of ranks, but each optimizer step must take as many pairs as before:
    the per-rank batch and accumulation it does not give are the run's own; refused when the product differs."""
    batching = ("batch_size", "grad_accum", "global_batch_size")
    adopted = {} if set(batching) & set(args.given) else {k: recorded[k] for k in batching if k in recorded}
    batch, accumulation = (adopted.get(k, getattr(args, k)) for k in ("batch_size", "grad_accum"))
    before = recorded.get("batch_size", batch) * recorded.get("grad_accum", accumulation) * \
        recorded.get("world_size", world_size)
    if batch * accumulation * world_size != before:
        raise ValueError(f"--resume: {args.out} took {before} pairs an optimizer step, this command "
                         f"{batch * accumulation * world_size} ({batch} x {accumulation} micro-batches x {world_size} "
                         f"ranks); pass --global-batch-size {before}")
    return adopted


def comparable(value):
    """A flag's value as args.json holds it."""
    return str(value) if isinstance(value, Path) else list(value) if isinstance(value, tuple) else value


def claim_run_directory(args, rank, cleanup):
    """Rank 0 alone (the other ranks would see the directory half-claimed) checks --out, creates it, takes its lock
    (held until this process ends; a second trainer, or an orphaned rank of a killed one, is refused in one line
    naming the holder) and, for a new run, writes args.json before any model is built; every rank raises its
    refusal, or takes the settings a resume adopts from the run. The directory is checked again once the lock is
    held, so that what another trainer left there while this one waited is seen."""
    outcome = [None, {}]  # the refusal, the adopted settings
    if rank == 0:
        try:
            check_run_directory(args, rank_and_world()[1])  # before anything is created
            run = RunDir(args.out)
            run.path.mkdir(parents=True, exist_ok=True)
            lock, holder = take_lock(run.lock, "train.py")
            if lock is None:
                raise ValueError(f"--out {run} is in use by {holder}; wait for it to end, or pass another --out")
            cleanup.callback(lock.close)
            # again under the lock: a trainer that held it until now may have finished a run here meanwhile
            outcome[1] = check_run_directory(args, rank_and_world()[1])
            if not run.is_run():  # marks the directory as a run's; a run's own record is rewritten only once resumed
                write_args(args, 1, "not read yet")
        except (ValueError, OSError) as error:
            outcome[0] = f"--out {args.out}: {error.strerror}" if isinstance(error, OSError) else str(error)
    if dist.is_initialized():
        dist.broadcast_object_list(outcome)
    if outcome[0]:
        raise ValueError(outcome[0])
    for key, value in outcome[1].items():
        setattr(args, key, value)


def write_args(args, world_size, summary, from_step=0):
    """args.json: the run's settings now, and one record per segment (a straight run has one; each resume adds
    one, with the step it resumed from and the flags its command line gave)."""
    run = RunDir(args.out)
    earlier = run.read_args().get("segments", []) if from_step and run.is_run() else []
    segment = {"from_step": from_step, "world_size": world_size, "given": {k: comparable(getattr(args, k))
                                                                             for k in args.given if k != "out"},
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    settings = {k: comparable(v) for k, v in vars(args).items() if k != "given"}
    write_text_atomically(run.args_file, json.dumps(
        {**settings, "world_size": world_size, "data_summary": str(summary), "segments": [*earlier, segment]},
        indent=1))


def truncate_log(log, step):
    """Drops the lines a killed run wrote after its last checkpoint (and a line cut off mid-write): the resumed
    run writes those steps again."""
    if not log.exists():
        return
    kept = []
    for line in log.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    write_text_atomically(log, "".join(kept))
