"""Start train.py (or data.py) on N local ranks from Python, as `torchrun --standalone --nproc_per_node N` would.

For the programs that run many short trainings (toy.py, study.py, the tests): the ranks are forked by
torch.multiprocessing from one server process that imported train.py once, instead of an interpreter and a fresh
import of torch, diffusers and transformers per rank. Each rank gets torchrun's environment variables, so the
trainer cannot tell the two apart. Users run `torchrun train.py ...` itself.
"""
import multiprocessing.forkserver
import os
import socket
import sys
import threading
from multiprocessing.resource_sharer import DupFd
from pathlib import Path

import torch
from tqdm import tqdm

import train


def launch(argv, ranks=1, threads=None, log=None, entry=None):
    """entry(argv) (default train.main: `python train.py ARGV`; data.main for data.py) on `ranks` processes with the
    variables torchrun gives them (one process: none, as `python train.py`), `threads` each (default: its share of
    the cores). `log`: a file the processes append their stdout and stderr to (default: this process's, as they
    are now). Returns torch's ProcessContext (pids, join); finish(context) waits for it."""
    start_server()
    port = free_port()
    threads = threads or max(1, os.cpu_count() // ranks)
    # the server's stdout and stderr are the ones it started with (under pytest, another test's capture)
    outputs = None if log else [(DupFd(1), DupFd(2)) for _ in range(ranks)]
    return torch.multiprocessing.start_processes(
        _rank_main, (entry or train.main, [str(arg) for arg in argv], ranks, threads, port, log, outputs),
        nprocs=ranks, join=False, start_method="forkserver")


def finish(context):
    """Waits for launch()'s processes: 0, or the first failing one's exit status (-N: killed by signal N)."""
    try:
        while not context.join():
            pass
    except torch.multiprocessing.ProcessExitedException as error:
        return error.exit_code
    except torch.multiprocessing.ProcessRaisedException as error:
        print(error, file=sys.stderr)
        return 1
    return 0


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous on this machine)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server():
    """launch()'s server, a process that imports train.py once and forks the ranks. Starting it early overlaps its
    imports with other work; launch() starts it if need be."""
    multiprocessing.set_forkserver_preload(["train"])
    multiprocessing.forkserver.ensure_running()


def _rank_main(rank, entry, argv, ranks, threads, port, log, outputs):
    if ranks > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_WORLD_SIZE=str(ranks),
                          GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    # argparse names the program from argv[0]: the script the entry belongs to, not the one that launched it
    sys.argv = [Path(sys.modules[entry.__module__].__file__).name, *argv]
    tqdm.set_lock(threading.RLock())  # not tqdm's multiprocessing lock, whose semaphore a killed process would leak
    if log is not None:
        stdout = stderr = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    else:
        stdout, stderr = (fd.detach() for fd in outputs[rank])
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    entry(argv)
