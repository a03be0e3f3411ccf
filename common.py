"""What every command shares: the one-line failure, flag ranges, the process group, atomic writes, file locks.

It imports torch and the standard library only, so that models.py, data.py, evaluate.py and train.py can all use
it without importing one another upwards.
"""
import argparse
import contextlib
import errno
import math
import os
import re
import resource
import shutil
import socket
import stat
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def fail(error, suffix=""):
    """error_line(error, suffix) on stderr."""
    print(error_line(error, suffix), file=sys.stderr)


def error_line(error, suffix=""):
    """One line for an error: a message that holds a line break (a file name with one) keeps all of it, the break
    written as \\n; a DataLoader worker's re-raised traceback is cut to its exception's message; a full disk says
    so."""
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        error = f"the disk is full: {error.filename or 'no space left on device'} could not be written"
    text = str(error).strip() or type(error).__name__
    if "Original Traceback (most recent call last):" in text:  # the worker's message starts at its exception line
        lines = text.splitlines()
        start = max(i for i, line in enumerate(lines) if re.match(r"^([A-Za-z_]+[.])*[A-Za-z_]*(Error|Exception)\b",
                                                                   line) or i == 0)
        text = re.sub(r"^([A-Za-z_]+[.])*[A-Za-z_]*(Error|Exception): ", "", "\n".join(lines[start:]))
    return f"error: {text.replace(chr(10), chr(92) + 'n').replace(chr(13), chr(92) + 'r')}{suffix}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad command line is one line and exit 1 as every other refusal here (argparse
    prints the whole usage first); --help still shows it all."""

    def error(self, message):
        self.exit(1, f"error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------------------
# Flag ranges: a value outside trains or measures something else than asked (a negative warm-up is a negative
# learning rate, beta <= 0 inverts the preference, tau > 1 masks every pair), so it is refused before any work
# ---------------------------------------------------------------------------------------------------------

def valid_range(doc, test):
    """`test` (value -> bool), described by `doc` in check_numbers' message ("must be <doc>")."""
    test.__doc__ = doc
    return test


AT_LEAST_1 = valid_range("at least 1", lambda v: v >= 1)
NON_NEGATIVE = valid_range("at least 0", lambda v: v >= 0)
POSITIVE = valid_range("a positive number", lambda v: v > 0)
UNIT_INTERVAL = valid_range("in [0, 1]", lambda v: 0 <= v <= 1)
BELOW_ONE = valid_range("in [0, 1)", lambda v: 0 <= v < 1)


def check_numbers(args, valid_ranges):
    """Raises ValueError naming the first numeric flag outside its valid range (NaN and inf never are in one)."""
    for flag, valid in valid_ranges.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool):  # a hand-edited args.json's "1e-4"
            raise ValueError(f"--{flag.replace('_', '-')} {value!r}: must be a number")
        if not (math.isfinite(value) and valid(value)):
            raise ValueError(f"--{flag.replace('_', '-')} {value}: must be {valid.__doc__}")


def check_regular_file(path, what):
    """`path` when it exists and is a regular file; else ValueError naming `what` and the path. A FIFO, a device or
    a socket where a file is expected would block its reader forever (and the signal handlers waiting behind it)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise ValueError(f"{what} {path}: {'does not exist' if not path.exists() else error.strerror}") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else \
            "a socket" if stat.S_ISSOCK(mode) else "a device"
        raise ValueError(f"{what} {path}: is {kind}, not a regular file")
    return path


def check_output(path, flag="--out", folder=True):
    """`path` as Path when it can be written: a folder (folder=True) or a file, where nothing on the way is a file
    and the nearest existing folder is writable; else ValueError naming `flag`. Asked before any work, so that a
    bad --out costs nothing."""
    text, path = str(path), Path(path)
    if os.path.lexists(path) and not path.exists():
        raise ValueError(f"{flag} {text}: is a link to nowhere (broken, or a loop)")
    if not folder and (text.endswith("/") or path.is_dir()):
        raise ValueError(f"{flag} {text}: is a directory; name the file to write ({path / 'NAME'})")
    start = path if folder else path.parent
    for above in (start, *start.parents):
        if above.exists():
            if not above.is_dir():
                raise ValueError(f"{flag} {text}: " + ("is" if above == path else f"{above} is") +
                                 " a file, not a directory")
            if not os.access(above, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {text}: {above} is not writable")
            break
    return path


def add_size_flags(parser):
    """--resolution and --frames, which data.py cache and train.py share (a cache is read at the size it was made)."""
    parser.add_argument("--resolution", type=resolution, metavar="HxW",
                        help="height x width in pixels, or one side for a square (default: the backbone's native)")
    parser.add_argument("--frames", type=int, help="video frames, 4k + 1 (default: the backbone's native count)")


def torch_device(text):
    """--device as an argparse type: a device torch knows and this machine has ("cuda:3" on a 2-GPU host is
    refused here, not by the first tensor moved there)."""
    try:
        chosen = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (cpu, cuda, cuda:N)") from None
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise argparse.ArgumentTypeError(f"{text}: this machine has {torch.cuda.device_count()} GPU(s)")
    if chosen.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text}: only cpu and cuda devices are supported")
    return chosen


def resolution(text):
    try:
        height, width = (int(side) for side in (text.lower().split("x") if "x" in text.lower() else (text, text)))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HxW (480x832) or one side (512)") from None
    return height, width


# ---------------------------------------------------------------------------------------------------------
# The process group: torchrun's, or none for one process (every collective below is then a no-op)
# ---------------------------------------------------------------------------------------------------------

# Host-side control (a stop flag, a count) travels over gloo beside NCCL on GPUs: NCCL refuses CPU tensors, and a
# flag moved to the GPU for its all-reduce would cost a host sync. Device tensors (losses, gradients) take NCCL.
BACKENDS = {"cuda": "cpu:gloo,cuda:nccl", "cpu": "gloo"}


def setup_distributed(timeout=None):
    """torchrun's process group (BACKENDS: NCCL for GPU tensors and gloo for CPU ones on GPUs, gloo on CPU):
    (device, rank, world size). Plain `python train.py` makes none: one process runs the same code with every
    collective a no-op. `timeout`: how long a collective waits for the slowest rank (data.py cache's last barrier
    may wait for a rank's last shard)."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" not in os.environ:
        return device, 0, 1
    dist.init_process_group(BACKENDS[device.type], timeout=timeout,
                            **({"device_id": device} if device.type == "cuda" else {}))
    return device, dist.get_rank(), dist.get_world_size()


def all_reduce(tensor, op=dist.ReduceOp.SUM):
    """dist.all_reduce in place, returning the tensor (sipo.py's all_reduce); one process: the tensor as it is."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op)
    return tensor


def rank_and_world():
    """(rank, world size) of the process group; (0, 1) without one."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def leave():
    if dist.is_initialized():
        dist.destroy_process_group()


def nodes():
    """How many nodes torchrun started (1 without torchrun)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    return world_size // int(os.environ.get("LOCAL_WORLD_SIZE", world_size))


# ---------------------------------------------------------------------------------------------------------
# Files: atomic swaps and locks
# ---------------------------------------------------------------------------------------------------------

FULL_BELOW = 64 * 2 ** 20  # free bytes under which a failed write is put down to a full disk


@contextlib.contextmanager
def writing(path):
    """Around a library's write into `path`: its own way of failing (torch's "unexpected pos", safetensors' error,
    DCP's gathered CheckpointException) becomes the one-line OSError of a full disk when the disk is (nearly) full,
    else a ValueError naming `path` and the library's first line."""
    try:
        yield
    except (OSError, ValueError, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 -- libraries raise their own types for a failed write
        if free_bytes(path) < FULL_BELOW:
            raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
        raise ValueError(f"{path}: could not be written ({(str(error).strip().splitlines() or ['?'])[0][:160]})") \
            from None


def free_bytes(path):
    """Free bytes on the file system of `path` (or of its nearest existing folder)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def write_atomically(folder, write):
    """write(tmp) into folder.tmp, then swap it in for `folder`: a reader never sees a half-written one."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with writing(tmp):
        write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def write_text_atomically(path, text):
    """`text` into path.tmp, then renamed to `path`: a reader sees the old file or the new one, never a part."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def take_lock(path, holder):
    """An exclusive lock on the file `path`, which then names `holder`, this pid and host: (handle, None); the lock
    lasts until the handle is closed or the process ends (the kernel drops it, so a killed holder leaves no stale
    lock). (None, whom the file names) when another process holds it. For the run directory and the cache."""
    import fcntl
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        named = handle.read().strip() or "another process"
        handle.close()
        return None, named
    handle.seek(0)
    handle.truncate()
    handle.write(f"{holder} pid {os.getpid()} on {socket.gethostname()}")
    handle.flush()
    return handle, None


# ---------------------------------------------------------------------------------------------------------
# Machine facts that measurements name
# ---------------------------------------------------------------------------------------------------------

def peak_memory_gb(device):
    """Peak GPU memory allocated, or on a CPU this process's peak RSS: VmHWM, not ru_maxrss, which a process
    started from a larger one inherits on Linux."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    status = Path("/proc/self/status")
    if status.is_file():
        kib = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("VmHWM"))
        return kib / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def cpu_name():
    """The CPU's model name and vector extension, from /proc/cpuinfo: timings differ several-fold between them."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    vector = 'AVX-512' if ' avx512f' in info else 'AVX2' if ' avx2' in info else 'no AVX2'
    return f"{model}, {vector}{' and AMX' if ' amx_bf16' in info else ''}"
