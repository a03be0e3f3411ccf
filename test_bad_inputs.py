"""Hostile but realistic input to train.py: each class of issue 14 gets one line naming the culprit, a non-zero exit
and nothing already written lost or changed; a run directory stays usable after any failure."""
import contextlib
import fcntl
import io
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from PIL import Image

import launcher
import train as trainer

ROOT = Path(__file__).parent


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    rows = []
    for i in range(8):
        Image.new("RGB", (16, 16), (40 * i, 200, 30)).save(folder / f"w{i}.png")
        Image.new("RGB", (16, 16), (90, 90, 90)).save(folder / f"l{i}.png")
        rows.append({"prompt": f"a green circle {i}", "chosen": f"w{i}.png", "rejected": f"l{i}.png"})
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return folder / "pairs.jsonl"


def train(*args):
    return in_process(trainer.main, ["--model", "toy", *args])


def one_line_error(result, expected):
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    assert expected in lines[0], lines[0]


def snapshot(folder):
    """Every file under folder with its bytes: what 'nothing written before is lost or changed' compares."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


# class 3: every numeric flag is range-checked before any model is built (two invented: --path-draws 0, --eps 1)
@pytest.mark.parametrize("flag,value,message", [
    ("--warmup", -5, "--warmup -5: must be at least 0"),
    ("--max-grad-norm", -1, "--max-grad-norm -1.0: must be a positive number"),
    ("--beta", -100, "--beta -100.0: must be a positive number"),
    ("--beta", 0, "--beta 0.0: must be a positive number"),
    ("--tau", 1.5, "--tau 1.5: must be in [0, 1]"),
    ("--lr", "nan", "--lr nan: must be a positive number"),
    ("--path-draws", 0, "--path-draws 0: must be at least 1"),
    ("--eps", 1, "--eps 1.0: must be in [0, 1)"),
])
def test_numeric_flags_out_of_range_fail_before_anything_is_written(pairs, tmp_path, flag, value, message):
    argv = ["--model", "toy", "--data", str(pairs), "--out", str(tmp_path / "run"), flag, str(value)]
    args = trainer.parse_args(argv)
    with pytest.raises(ValueError) as error:
        trainer.check_args(args, world_size=1)
    assert str(error.value) == message
    assert not (tmp_path / "run").exists()


def test_a_bad_flag_is_one_line_and_exit_1_from_the_command_line(pairs, tmp_path):
    one_line_error(train("--data", pairs, "--out", tmp_path / "run", "--warmup", -5), "--warmup -5: must be at least 0")
    assert not (tmp_path / "run").exists()


# classes 1 and 2: what can be checked is checked before training; a run that died early does not block its directory
def test_reward_that_cannot_score_the_prompts_fails_before_step_1_and_the_directory_stays_usable(pairs, tmp_path):
    (tmp_path / "prompts.txt").write_text("a photo of a cat\n")
    out = tmp_path / "run"
    result = train("--data", pairs, "--out", out, "--eval-prompts", tmp_path / "prompts.txt", "--steps", 2)
    one_line_error(result, "reward named_colour: prompt 'a photo of a cat' names none of")
    assert not (out / "log.jsonl").exists() or not (out / "log.jsonl").read_text()
    for extra in ([], ["--resume"]):  # the dead run left args.json: both a rerun and --resume start again
        result = train("--data", pairs, "--out", out, "--steps", 1, "--batch-size", 4, "--no-export", *extra)
        assert result.returncode == 0, result.stderr[-2000:]
        shutil.rmtree(out / "checkpoints")


# class 5: never write into (or delete from) a directory this program did not make
@pytest.mark.parametrize("setup,message", [
    (lambda out: (out.mkdir(), (out / "model").mkdir(), (out / "model" / "mine.txt").write_text("keep")),
     "holds files train.py did not write"),
    (lambda out: out.write_text("a file"), "is a file, not a directory"),
])
def test_out_that_is_not_a_run_directory_is_refused_and_left_alone(pairs, tmp_path, setup, message):
    out = tmp_path / "out"
    setup(out)
    before = snapshot(tmp_path)
    one_line_error(train("--data", pairs, "--out", out), message)
    assert snapshot(tmp_path) == before


# class 6: two writers, one directory
def test_a_second_trainer_on_a_locked_run_directory_is_refused_naming_the_holder(pairs, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text(json.dumps({"model": "toy"}))
    with open(out / ".lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("train.py pid 12345 on somehost")
        lock.flush()
        one_line_error(train("--data", pairs, "--out", out), "is in use by train.py pid 12345 on somehost")


# class 7 and 8: damaged checkpoints fall back; --resume with another model is refused
def test_damaged_newest_checkpoint_falls_back_to_the_intact_one_and_another_model_is_refused(pairs, tmp_path):
    out = tmp_path / "run"
    result = train("--data", pairs, "--out", out, "--steps", 4, "--batch-size", 2, "--checkpoint-every", 2,
                   "--no-export")
    assert result.returncode == 0, result.stderr[-2000:]
    newest = out / "checkpoints" / "step-000004"
    for damage in ("shard", "trainer.json"):
        broken = tmp_path / f"broken-{damage}"
        shutil.copytree(out, broken)
        target = broken / "checkpoints" / "step-000004"
        if damage == "shard":
            shard = next(target.glob("*.distcp"))
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        else:
            (target / "trainer.json").unlink()
        result = train("--data", pairs, "--out", broken, "--steps", 6, "--batch-size", 2, "--checkpoint-every", 2,
                       "--no-export", "--resume")
        assert result.returncode == 0, result.stderr[-2000:]
        assert "step-000004 damaged" in result.stdout and "resuming from step-000002" in result.stdout
        steps = [json.loads(line)["step"] for line in (broken / "log.jsonl").read_text().splitlines()]
        assert steps == list(range(1, 7)), "steps 3 and 4 are trained again and logged once"
    assert newest.exists()
    one_line_error(in_process(trainer.main, ["--model", "tiny-sd1.5", "--data", pairs, "--out", out, "--resume"]),
                   "holds a run of --model toy, not --model tiny-sd1.5")


def in_process(main, argv):
    """main(argv) as `python script.py ARGV` runs it, without the 4 s of a new interpreter: its exit status, stdout
    and stderr (a SystemExit with a message prints it and exits 1, as the interpreter does)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            main([str(arg) for arg in argv])
            status = 0
        except SystemExit as exit:
            status = exit.code
    if isinstance(status, str):
        stderr.write(status + "\n")
        status = 1
    return subprocess.CompletedProcess(argv, status or 0, stdout.getvalue(), stderr.getvalue())


def ranks_run(ranks, argv):
    """train.py on `ranks` ranks (launcher.py: torchrun's variables, without an interpreter and imports per rank),
    as a CompletedProcess whose stderr is every rank's output."""
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        status = launcher.finish(launcher.launch(argv, ranks, log=log.name))
        return subprocess.CompletedProcess(argv, status, None, log.read())


def cache(*args):
    import data
    return in_process(data.main, ["cache", "--model", "toy", *args])


# classes 5 and 6 for the latent cache: its DIR.tmp and DIR.old are removed only when they are ours and idle
@pytest.mark.parametrize("name,setup,message", [
    ("cache.tmp", lambda d: (d.mkdir(), (d / "notes.txt").write_text("mine")), "was not made by data.py cache"),
    ("cache.old", lambda d: (d.mkdir(), (d / "notes.txt").write_text("mine")), "is not a cache of ours"),
    ("cache", lambda d: d.write_text("a file"), "cache: is a file, not a directory"),
])
def test_cache_never_deletes_what_it_did_not_write(pairs, tmp_path, name, setup, message):
    setup(tmp_path / name)
    before = snapshot(tmp_path)
    one_line_error(cache("--data", pairs, "--out", tmp_path / "cache"), message)
    assert snapshot(tmp_path) == before


def test_a_cache_being_written_is_refused_and_an_interrupted_one_is_replaced(pairs, tmp_path):
    tmp = tmp_path / "cache.tmp"
    tmp.mkdir()
    (tmp / "written-by.json").write_text(json.dumps({"by": "data.py cache", "cache": "0" * 32}))  # ours
    (tmp / "shard-00000.safetensors.partial").write_bytes(b"half")  # a shard cut off mid-write: nothing finished
    with open(tmp / "in-progress.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write("data.py cache pid 4242 on somehost")
        lock.flush()
        one_line_error(cache("--data", pairs, "--out", tmp_path / "cache"),
                       "being written by data.py cache pid 4242")
    result = cache("--data", pairs, "--out", tmp_path / "cache")  # the lock is free now: an interrupted run's
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "cache" / "cache.json").is_file() and not tmp.exists()
    assert not (tmp_path / "cache" / "in-progress.lock").exists()


def test_bad_rows_of_every_kind_fail_in_one_line(pairs, tmp_path):
    folder = pairs.parent
    for row, message in ((b'{"prompt": 7, "chosen": "w0.png", "rejected": "l0.png"}', "row 1: prompt is a number"),
                         (b'{"prompt": "caf\xe9", "chosen": "w0.png", "rejected": "l0.png"}', "row 1: not UTF-8 text")):
        manifest = tmp_path / "bad.jsonl"
        manifest.write_bytes(row.replace(b'"w0.png"', f'"{folder / "w0.png"}"'.encode())
                             .replace(b'"l0.png"', f'"{folder / "l0.png"}"'.encode()) + b"\n")
        one_line_error(train("--data", manifest, "--out", tmp_path / "run"), message)


# class 8 and 9 in evaluate.py and models.py
def evaluate(*args):
    import evaluate as evaluator
    return in_process(evaluator.main, args)


@pytest.mark.parametrize("args,message", [
    (["compare", "--model", "toy", "--base", ".", "--tuned", ".", "--prompts", "p.txt", "--reward", "named_colour",
      "--samples", 0], "--samples 0: must be at least 1"),
    (["timesteps", "--model", "toy", "--data", "pairs.jsonl", "--pairs", 0], "--pairs 0: must be at least 1"),
    (["timesteps", "--model", "toy", "--data", "pairs.jsonl", "--draws", 1], "--draws 1: must be at least 2"),
])
def test_evaluate_numeric_flags_fail_in_one_line(args, message):
    one_line_error(evaluate(*args), message)


def test_curves_plot_what_is_complete_and_name_the_cut_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": k, "loss": 0.69 - 0.01 * k}) for k in range(1, 6)]
    (run / "log.jsonl").write_text("\n".join(lines) + '\n{"step": 6, "lo')
    result = evaluate("curves", run, "--out", tmp_path / "curves.png")
    assert result.returncode == 0 and f"{run / 'log.jsonl'} line 6 is incomplete; skipped" in result.stderr
    assert (tmp_path / "curves.png").stat().st_size > 1000


def test_a_corrupt_model_index_is_one_line_naming_it(pairs, tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_index.json").write_text("{not json")
    one_line_error(train("--pretrained", tmp_path / "base", "--data", pairs, "--out", tmp_path / "run"),
                   f"{tmp_path / 'base' / 'model_index.json'}: not valid JSON")


def test_timesteps_reads_a_cache_made_with_the_same_pretrained_weights(pairs, tmp_path):
    import models
    models.load_backbone("toy").pipe.save_pretrained(tmp_path / "base")
    made = cache("--pretrained", tmp_path / "base", "--data", pairs, "--out", tmp_path / "cache")
    assert made.returncode == 0, made.stderr[-2000:]
    result = evaluate("timesteps", "--model", "toy", "--pretrained", tmp_path / "base", "--data",
                      tmp_path / "cache", "--pairs", 2, "--buckets", 2, "--draws", 2, "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_bad_pair_met_mid_run_is_one_line_and_the_run_goes_on_with_skip_bad(pairs, tmp_path):
    """A pair whose image cannot be decoded is found only when a batch reaches it (raw data is not decoded ahead):
    without --skip-bad one line names its row and the directory stays usable; with it the pair is passed over and
    counted in the log, and the run resumes as usual."""
    folder = pairs.parent
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    rows[5]["rejected"] = "corrupt.png"
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("\n".join(json.dumps({**r, "chosen": str(folder / r["chosen"]),
                                              "rejected": str(folder / r["rejected"])}) for r in rows))
    out = tmp_path / "run"
    args = ["--data", manifest, "--out", out, "--steps", 4, "--batch-size", 4, "--checkpoint-every", 2, "--no-export"]
    one_line_error(train(*args), f"{manifest} row 6: {folder / 'corrupt.png'} cannot be decoded")
    assert (out / "args.json").is_file()
    result = train(*args, "--skip-bad", "--resume")
    assert result.returncode == 0, result.stderr[-2000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and [r["epoch"] for r in log] == [0, 0, 1, 1]
    assert log[-1]["bad_pairs_skipped"] == 2, "met once in each of the two epochs"
    shutil.rmtree(out / "checkpoints" / "step-000004")
    resumed = train(*args, "--skip-bad", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    again = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert again[-1]["bad_pairs_skipped"] == 2 and [r["step"] for r in again] == [1, 2, 3, 4]


def test_a_parquet_caption_that_is_not_a_string_names_its_row(tmp_path):
    import io
    import pyarrow as pa
    import pyarrow.parquet as pq
    import data
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    jpg = buffer.getvalue()
    table = pa.table({"caption": [7, 8], "jpg_0": [jpg, jpg], "jpg_1": [jpg, jpg], "label_0": [1.0, 0.0]})
    pq.write_table(table, tmp_path / "train-0000.parquet")
    with pytest.raises(data.DataError, match=r"train-0000.parquet row 0: caption is a number, not a string"):
        data.read_pairs(tmp_path)


def test_study_refuses_a_base_that_is_not_a_model_in_one_line(tmp_path):
    import study
    result = in_process(study.main, ["--base", tmp_path / "nope", "--out", tmp_path / "runs"])
    one_line_error(result, f"--base {tmp_path / 'nope'}: not a model directory (no model_index.json)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flags, message", [
    (["--off-sources", "on,glossy"], "--off-sources: glossy unknown; choose from on, data, foreign, hard, mixed"),
    (["--off-sources", "hard"], "--off-sources: on is needed; got hard"),
    (["--off-configs", "dpo,ppo"], "--off-configs: ppo unknown; choose from dpo, dpo-cm, sipo step after-mask")])
def test_study_refuses_unknown_sources_and_configs_before_it_writes(tmp_path, flags, message):
    import study
    result = in_process(study.main, [*flags, "--out", tmp_path / "runs", "--results", tmp_path / "results"])
    one_line_error(result, message)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


# issue 26, class 1: data.py cache removes only what it can prove it wrote, never a directory with anything else
@pytest.mark.parametrize("name", ["cache", "cache.old"])
def test_a_cache_json_among_the_users_files_does_not_make_a_directory_ours(pairs, tmp_path, name):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "cache.json").write_text(json.dumps({"format": 2, "model": "toy"}))
    (folder / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    result = cache("--data", pairs, "--out", tmp_path / "cache")
    assert result.returncode == 1 and "error: --out" in result.stderr, result.stderr[-2000:]
    assert snapshot(tmp_path) == before


def test_rebuilding_our_cache_refuses_a_file_someone_added_and_a_finished_cache_is_not_rebuilt(pairs, tmp_path):
    out = tmp_path / "cache"
    assert cache("--data", pairs, "--out", out).returncode == 0
    before = snapshot(tmp_path)
    again = cache("--data", pairs, "--out", out)  # the same settings: complete, nothing to do
    assert again.returncode == 0 and f"cache {out} is complete (8 pairs" in again.stdout
    assert snapshot(tmp_path) == before
    (out / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    one_line_error(cache("--data", pairs, "--out", out, "--rebuild"), "holds notes.txt, which data.py cache did not")
    assert snapshot(tmp_path) == before
    (out / "notes.txt").unlink()
    rebuilt = cache("--data", pairs, "--out", out, "--rebuild")
    assert rebuilt.returncode == 0 and not (tmp_path / "cache.old").exists() and not (tmp_path / "cache.tmp").exists()


@pytest.fixture(scope="module")
def two_caches(pairs, tmp_path_factory):
    """Two caches of the same pairs by the toy backbone without --pretrained (random weights, seeded)."""
    folder = tmp_path_factory.mktemp("caches")
    for name in ("a", "b"):
        made = cache("--data", pairs, "--out", folder / name, "--shard-size", 4)
        assert made.returncode == 0, made.stderr[-2000:]
    return folder


def test_two_caches_without_pretrained_weights_encode_alike(two_caches):
    from safetensors.torch import load_file
    for shard in ("shard-00000.safetensors", "prompts-00000.safetensors"):
        a, b = (load_file(two_caches / name / shard) for name in ("a", "b"))
        assert all(torch_equal(a[k], b[k]) for k in a), shard


def torch_equal(a, b):
    import torch
    return torch.equal(a, b)


@pytest.mark.parametrize("damage,message", [
    (lambda c, other: shutil.copy(other / "shard-00001.safetensors", c / "shard-00001.safetensors"),
     "shard-00001.safetensors: a shard of another cache"),
    (lambda c, other: (c / "shard-00000.safetensors").write_bytes(
        (c / "shard-00000.safetensors").read_bytes()[:-100]), "(cut short or replaced)"),
    (lambda c, other: (c / "shard-00000.safetensors").write_bytes(b""), "shard-00000.safetensors: 0 bytes"),
    (lambda c, other: (c / "shard-00001.safetensors").unlink(), "shard-00001.safetensors: missing"),
    (lambda c, other: (c / "cache.json").write_text("[1, 2]"), "cache.json: a list, not a cache index"),
    (lambda c, other: (c / "cache.json").write_text(json.dumps(
        {k: v for k, v in json.loads((c / "cache.json").read_text()).items() if k != "shards"})),
     "'shards' is missing"),
    (lambda c, other: (c / "cache.json").write_text(json.dumps(
        {**json.loads((c / "cache.json").read_text()), "pairs": 80})), "states 80 pairs, but its shards hold 8"),
])
def test_a_damaged_or_foreign_cache_is_one_line_naming_the_file(two_caches, tmp_path, damage, message):
    damaged = tmp_path / "cache"
    shutil.copytree(two_caches / "a", damaged)
    damage(damaged, two_caches / "b")
    one_line_error(train("--data", damaged, "--out", tmp_path / "run", "--steps", 2, "--batch-size", 4,
                         "--no-export"), message)


def test_a_cache_of_random_full_architecture_weights_can_be_made_offline(pairs, tmp_path):
    made = cache("--data", pairs, "--out", tmp_path / "cache", "--random-weights")
    assert made.returncode == 0 and "8 pairs" in made.stdout, made.stderr[-2000:]


# issue 26, class 2: a resume trains with the run's own settings, or refuses a change that alters them
def test_a_resume_takes_the_runs_settings_refuses_other_ones_and_keeps_a_record_of_each_segment(pairs, tmp_path):
    out = tmp_path / "run"
    first = ["--data", pairs, "--out", out, "--batch-size", 4, "--lr", 3e-4, "--checkpoint-every", 1, "--no-export"]
    assert train(*first, "--steps", 1).returncode == 0
    before = snapshot(out)
    for flag, value in (("--lr", 1e-3), ("--loss", "dpo"), ("--beta", 7.0), ("--batch-size", 2)):
        refused = train("--data", pairs, "--out", out, "--steps", 2, "--resume", flag, value)
        one_line_error(refused, "--resume: ")
        assert snapshot(out) == before, f"a refused {flag} changed the run directory"
    resumed = train("--data", pairs, "--out", out, "--steps", 2, "--resume", "--no-export")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from step 1 of {out} with the run's own settings; changed: --steps 1 -> 2" in resumed.stdout
    recorded = json.loads((out / "args.json").read_text())
    assert recorded["lr"] == 3e-4 and recorded["batch_size"] == 4 and recorded["steps"] == 2
    assert [s["from_step"] for s in recorded["segments"]] == [0, 1]
    assert recorded["segments"][0]["given"]["lr"] == 3e-4 and "lr" not in recorded["segments"][1]["given"]


def test_checkpoints_are_ordered_by_step_number_past_a_million(tmp_path):
    from rundir import RunDir
    run = RunDir(tmp_path)
    for step in (999_999, 1_000_000, 20):
        run.checkpoint(step).mkdir(parents=True)
    (run.checkpoints / "step-1000001.tmp").mkdir()
    assert [p.name for p in run.checkpoint_steps()] == ["step-000020", "step-999999", "step-1000000"]


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_previous_one(pairs, tmp_path, monkeypatch):
    import errno
    calls = []

    def save(state, storage_writer):
        calls.append(Path(storage_writer.path))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(calls[-1] / "__0_0.distcp"))
        return real(state, storage_writer=storage_writer)
    real = trainer.dcp.save
    monkeypatch.setattr(trainer.dcp, "save", save)
    out = tmp_path / "run"
    result = train("--data", pairs, "--out", out, "--steps", 3, "--batch-size", 4, "--checkpoint-every", 1,
                   "--no-export")
    one_line_error(result, "the disk is full: ")
    assert "(" + f"{out} keeps step-000001: continue with --resume" in result.stderr
    monkeypatch.setattr(trainer.dcp, "save", real)
    resumed = train("--data", pairs, "--out", out, "--steps", 3, "--resume", "--no-export")
    assert resumed.returncode == 0 and "resuming from step 1" in resumed.stdout, resumed.stderr[-2000:]


# class 3: Ctrl-C saves as SIGTERM does; a bad held-out image does not end a --skip-bad run at its first evaluation
def test_ctrl_c_saves_a_checkpoint_and_says_how_to_continue(pairs, tmp_path):
    import os
    import signal
    import time
    out = tmp_path / "run"
    process = launcher.launch(["--model", "toy", "--data", pairs, "--out", out, "--steps", 500, "--batch-size", 4,
                               "--checkpoint-every", 1000, "--no-export"], log=tmp_path / "stderr")
    deadline = time.time() + 120
    while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text()) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(process.pids()[0], signal.SIGINT)
    status, stderr = launcher.finish(process), (tmp_path / "stderr").read_text()
    assert status == 0 and "SIGINT: saved step" in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_a_bad_held_out_image_is_skipped_with_skip_bad(pairs, tmp_path):
    folder = pairs.parent
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    rows[1]["rejected"] = "broken.png"
    heldout = folder / "heldout.jsonl"
    heldout.write_text("\n".join(json.dumps(r) for r in rows))
    result = train("--data", pairs, "--eval-data", heldout, "--out", tmp_path / "run", "--steps", 1, "--batch-size", 4,
                   "--skip-bad", "--no-export")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "heldout_accuracy" in json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[-1])


# class 5 and 6: a bad command line is one line; a missing optional package is found before any work
def test_an_unknown_model_is_one_line_not_the_usage(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "sd2", "--data", "x"],
                            capture_output=True, text=True)
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "error: argument --model: invalid choice: 'sd2'" in result.stderr


def test_tensorboard_missing_is_said_before_anything_is_written(pairs, tmp_path):
    import importlib.util
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    one_line_error(train("--data", pairs, "--out", tmp_path / "run", "--tensorboard"),
                   "--tensorboard: the tensorboard package is not installed")
    assert not (tmp_path / "run").exists()


# class 2, the rest: what is decoded is what the file shows; a LoRA is applied only to the backbone it was trained on
def test_an_exif_rotated_photo_is_trained_on_upright(tmp_path):
    import data
    photo = Image.new("RGB", (40, 20), (255, 0, 0))
    photo.paste((0, 0, 255), (0, 0, 20, 20))  # stored: blue left half, red right half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display": a phone held upright
    photo.save(tmp_path / "phone.jpg", exif=exif.tobytes(), quality=95)
    pixels = data.load_media(tmp_path / "phone.jpg", "a row", 40, 20)  # (3, H, W): displayed, 20 wide and 40 high
    top, bottom = pixels[:, :10].mean((1, 2)), pixels[:, 30:].mean((1, 2))
    assert top[2] > 0.5 > top[0] and bottom[0] > 0.5 > bottom[2], "the blue half is on top once rotated"


def test_pickapic_image_columns_of_strings_are_refused_not_opened_as_paths(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import data
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": ["/etc/passwd"], "jpg_1": ["x.jpg"], "label_0": [1.0]}),
                   tmp_path / "train-0000.parquet")
    with pytest.raises(data.DataError, match="column jpg_0 holds string, not image bytes"):
        data.read_pairs(tmp_path)


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    import models
    folder = tmp_path_factory.mktemp("models")
    for name in ("toy", "tiny-sd1.5"):
        models.load_backbone(name).pipe.save_pretrained(folder / name)
    (folder / "prompts.txt").write_text("a red circle\na blue square\n")
    return folder


def compare(saved_models, *args):
    return evaluate("compare", "--base", saved_models / "toy", "--prompts", saved_models / "prompts.txt",
                    "--samples", 1, "--steps", 1, *args)


def test_compare_refuses_a_lora_of_another_backbone_and_a_lora_that_is_not_safetensors(saved_models, tmp_path):
    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"model": "tiny-sd1.5"}))
    (run / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"PK\x03\x04 a pickle in disguise")
    one_line_error(compare(saved_models, "--model", "toy", "--tuned", run / "lora", "--reward", "named_colour",
                           "--out", tmp_path / "eval"), "trained as --model tiny-sd1.5, not --model toy")
    (run / "args.json").write_text(json.dumps({"model": "toy"}))
    one_line_error(compare(saved_models, "--model", "toy", "--tuned", run / "lora", "--reward", "named_colour",
                           "--out", tmp_path / "eval"), "pytorch_lora_weights.safetensors: not a safetensors file")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("tuned,reward,message", [
    ("nowhere", "named_colour", "--tuned nowhere: neither a run directory"),
    ("toy", "temporal_flicker", "reward temporal_flicker needs videos"),
])
def test_compare_checks_its_inputs_before_sampling(saved_models, tmp_path, tuned, reward, message):
    tuned = saved_models / tuned if tuned == "toy" else tuned
    result = compare(saved_models, "--model", "toy", "--tuned", tuned, "--reward", reward, "--out", tmp_path / "eval")
    one_line_error(result, message)
    assert "sampling" not in result.stderr


def test_compare_refuses_an_out_that_is_a_file(saved_models, tmp_path):
    (tmp_path / "eval").write_text("mine")
    one_line_error(compare(saved_models, "--model", "toy", "--tuned", saved_models / "toy", "--reward",
                           "named_colour", "--out", tmp_path / "eval"), "is a file, not a directory")
    assert (tmp_path / "eval").read_text() == "mine"


def test_a_pretrained_directory_of_another_backbone_is_refused_before_training(saved_models, pairs, tmp_path):
    one_line_error(train("--pretrained", saved_models / "tiny-sd1.5", "--data", pairs, "--out", tmp_path / "run"),
                   "holds a latent model, which is not --model toy")


# class 5: every message names its input; an editor's byte-order mark is accepted
def test_prompt_files_name_the_line_that_is_not_text_and_accept_a_byte_order_mark(saved_models, tmp_path):
    import evaluate as evaluator
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfa red circle\na caf\xe9\n")
    with pytest.raises(ValueError, match=r"p.txt line 2: not UTF-8 text"):
        evaluator.read_prompts(tmp_path / "p.txt")
    (tmp_path / "p.txt").write_bytes(b"\xef\xbb\xbfa red circle\n")
    assert evaluator.read_prompts(tmp_path / "p.txt") == ["a red circle"]


def test_a_manifest_with_a_byte_order_mark_is_read_and_one_rewritten_mid_run_is_named(pairs, tmp_path):
    import data
    manifest = tmp_path / "m.jsonl"
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    text = "\n".join(json.dumps({**r, "chosen": str(pairs.parent / r["chosen"]),
                                 "rejected": str(pairs.parent / r["rejected"])}) for r in rows)
    manifest.write_bytes(codecs_bom() + text.encode())
    index, _ = data.read_pairs(manifest)
    assert len(index) == 8 and index[0].prompt == "a green circle 0"
    manifest.write_text(text + "\n")  # rewritten while a run reads it: its offsets are stale
    with pytest.raises(data.DataError, match=r"m.jsonl row 2: the manifest changed after it was indexed"):
        index[1]


def codecs_bom():
    import codecs
    return codecs.BOM_UTF8


def test_a_path_too_long_for_the_filesystem_names_its_row(pairs, tmp_path):
    import data
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"prompt": "p", "chosen": "x" * 5000 + ".png", "rejected": "l.png"}) + "\n")
    with pytest.raises(data.DataError, match=r"m.jsonl row 1: chosen path cannot be used"):
        data.read_pairs(manifest)


def test_curves_skip_records_without_a_step_and_an_empty_log_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "log.jsonl").write_text("")
    one_line_error(evaluate("curves", run, "--out", tmp_path / "c.png"), "no step recorded yet")
    (run / "log.jsonl").write_text('{"loss": 0.7}\n{"step": 1, "loss": 0.69}\n{"step": 2, "loss": 0.68}\n')
    result = evaluate("curves", run, "--out", tmp_path / "c.png")
    assert result.returncode == 0 and "1 records without a step; skipped" in result.stderr


# class 7: prompts are sampled in batches, whatever their number
def test_compare_samples_many_prompts_in_batches_and_says_where_its_files_are(saved_models, tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"a {c} circle\n" for c in ["red", "green", "blue", "yellow"] * 5))
    result = evaluate("compare", "--base", saved_models / "toy", "--prompts", prompts, "--samples", 1, "--steps", 1,
                      "--model", "toy", "--tuned", saved_models / "toy", "--reward", "named_colour", "--batch-size",
                      8, "--out", tmp_path / "eval")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"report {tmp_path / 'eval' / 'report.md'}" in result.stdout and "named_colour: base" in result.stdout
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["prompts"] == 20


class RunsCode:
    """A pickle that, unpickled, makes the directory `marker`: what a shared checkpoint could carry."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.makedirs, (self.marker,)


def test_a_pickle_planted_in_a_run_directory_is_never_run(pairs, tmp_path):
    """Class 1: DCP pickles its metadata and non-tensor items; train.py writes its metadata as JSON, keeps the
    optimizer's hyperparameters in trainer.json, reads tensors only (torch.load with weights_only) and refuses an
    item stored as bytes. Planted: DCP's own pickled .metadata beside ours (a resume reads only ours), a checkpoint
    of the older format holding only the pickle (refused with and without --resume), and a tensor the metadata
    says is stored pickled (refused in one line). The pickle's code never runs."""
    import pickle
    out = tmp_path / "run"
    common = ["--data", pairs, "--out", out, "--batch-size", 2, "--checkpoint-every", 1, "--no-export"]
    assert train(*common, "--steps", 1).returncode == 0
    marker = tmp_path / "the pickle ran"
    planted = pickle.dumps(RunsCode(marker))
    checkpoints = out / "checkpoints"
    (checkpoints / "step-000001" / ".metadata").write_bytes(planted)
    assert train(*common, "--steps", 2, "--resume").returncode == 0 and not marker.exists()
    older = checkpoints / "step-000003"
    older.mkdir()
    (older / ".metadata").write_bytes(planted)
    (older / "trainer.json").write_text(json.dumps({"step": 3}))
    for resume in ((), ("--resume",)):
        one_line_error(train(*common, "--steps", 4, *resume), "step-000003 is a checkpoint of an older format")
    assert not marker.exists()
    shutil.rmtree(older)
    latest = checkpoints / "step-000002"
    (latest / "__planted.distcp").write_bytes(planted)
    metadata = json.loads((latest / "metadata.json").read_text())
    key = "model.conv_in.weight"
    metadata["state_dict_metadata"]["__dict__"][key] = {"__class__": "BytesStorageMetadata"}
    metadata["storage_data"]["__items__"].append([
        {"__class__": "MetadataIndex", "fqn": key, "offset": None, "index": None},
        {"__class__": "_StorageInfo", "relative_path": "__planted.distcp", "offset": 0, "length": len(planted),
         "transform_descriptors": None}])
    (latest / "metadata.json").write_text(json.dumps(metadata))
    one_line_error(train(*common, "--steps", 4, "--resume"), f"stores {key} as a pickled object, which is not read")
    assert not marker.exists()


def test_a_run_finished_while_a_trainer_waited_for_the_lock_is_not_trained_over(pairs, tmp_path, monkeypatch):
    """Class 2: --out is checked again once its lock is held. A finished run appears in the directory between
    the first check and the lock (another trainer held it until then): the waiting trainer refuses, the run
    unchanged."""
    import rundir
    finished = tmp_path / "finished"
    assert train("--data", pairs, "--out", finished, "--steps", 1, "--no-export").returncode == 0
    out = tmp_path / "run"
    take_lock = rundir.take_lock

    def lock_after_the_other_run_finished(path, holder):
        shutil.copytree(finished, out, dirs_exist_ok=True)
        return take_lock(path, holder)

    monkeypatch.setattr(rundir, "take_lock", lock_after_the_other_run_finished)
    before = snapshot(finished)
    one_line_error(train("--data", pairs, "--out", out, "--steps", 1, "--no-export"), "already holds a run")
    assert {k: v for k, v in snapshot(out).items() if k != ".lock"} == \
        {k: v for k, v in before.items() if k != ".lock"}


@pytest.mark.parametrize("edit,message", [({"beta": -1000}, "the run's recorded --beta -1000: must be a positive"),
                                          ({"lr": "1e-4"}, "the run's recorded --lr '1e-4': must be a number")])
def test_a_hand_edited_args_json_is_range_checked_on_resume(pairs, tmp_path, edit, message):
    out = tmp_path / "run"
    assert train("--data", pairs, "--out", out, "--steps", 1, "--checkpoint-every", 1, "--no-export").returncode == 0
    recorded = json.loads((out / "args.json").read_text())
    (out / "args.json").write_text(json.dumps({**recorded, **edit}))
    one_line_error(train("--data", pairs, "--out", out, "--steps", 2, "--resume"), f"args.json: {message}")


@pytest.mark.parametrize("flags,message", [
    (["--lr", "1e39", "--checkpoint-every", 1], "the weights are not finite after step 1 (the update overflowed"),
    (["--beta", "1e38", "--max-nonfinite", 2], "2 non-finite steps in a row at step"),
])
def test_non_finite_steps_are_never_kept(pairs, tmp_path, flags, message):
    """Class 3: an update that overflows the weights (finite gradients, an absurd --lr) is never checkpointed; an
    infinite gradient norm (clipping would turn it into zeros) skips the step, and steps skipped in a row stop the
    run: neither reports trained steps and exits 0."""
    out = tmp_path / "run"
    one_line_error(train("--data", pairs, "--out", out, "--steps", 3, "--warmup", 0, "--no-export", *flags), message)
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


def test_a_fifo_where_a_file_is_expected_is_refused_in_one_line_not_waited_on(pairs, tmp_path):
    """Class 4: a FIFO as --data, among a folder's parquet shards, as a row's image or as --eval-prompts would
    block its reader forever; each is refused in one line before anything is read from it."""
    import os
    fifo = tmp_path / "pairs.jsonl"
    os.mkfifo(fifo)
    shards = tmp_path / "shards"
    shards.mkdir()
    os.mkfifo(shards / "train-0000.parquet")
    rows = tmp_path / "rows"
    rows.mkdir()
    os.mkfifo(rows / "w0.png")
    Image.new("RGB", (16, 16), (90, 90, 90)).save(rows / "l0.png")
    (rows / "pairs.jsonl").write_text(json.dumps({"prompt": "a", "chosen": "w0.png", "rejected": "l0.png"}))
    cases = [(["--data", fifo], f"--data {fifo}: is a FIFO, not a regular file"),
             (["--data", shards], f"shard {shards / 'train-0000.parquet'}: is a FIFO, not a regular file"),
             (["--data", rows / "pairs.jsonl"], f"{rows / 'w0.png'}: is a FIFO, not a regular file"),
             (["--data", pairs, "--eval-prompts", fifo], f"--eval-prompts {fifo}: is a FIFO, not a regular file")]
    for number, (flags, message) in enumerate(cases):
        one_line_error(train(*flags, "--out", tmp_path / f"run{number}", "--steps", 1, "--no-export"), message)
    one_line_error(evaluate("compare", "--model", "toy", "--base", "toy", "--tuned", "toy", "--prompts", fifo,
                            "--reward", "named_colour", "--out", tmp_path / "eval"),
                   f"--prompts {fifo}: is a FIFO, not a regular file")


@pytest.mark.parametrize("flags,message", [
    (["--tau", 1], "--tau 1: masks every pair"),
    (["--weight-sampler-steps", 1], "--weight-sampler-steps 1: must be between 2 and 1000"),
    (["--weight-sampler-steps", 5000], "--weight-sampler-steps 5000: must be between 2 and 1000"),
    (["--global-batch-size", 4, "--grad-accum", 3], "--global-batch-size 4 sets --grad-accum: give one of them"),
    (["--random-weights", "--pretrained", "."], "--random-weights and --pretrained .: give one"),
    (["--model", "tiny-wan2.1-1.3b", "--frames", 4], "--frames 4: tiny-wan2.1-1.3b's VAE takes 4k + 1 frames"),
    (["--model", "tiny-sd1.5", "--resolution", "30"], "--resolution 30x30: tiny-sd1.5 needs sides in multiples of"),
])
def test_flags_that_would_train_nothing_or_something_else_are_refused_before_anything_is_written(
        pairs, tmp_path, flags, message):
    """Class 6: every flag and combination that cannot mean what it says, before a model is built or --out made."""
    out = tmp_path / "run"
    one_line_error(in_process(trainer.main, ["--model", "toy", "--data", pairs, "--out", out, *flags]), message)
    assert not out.exists()


def test_flip_on_a_latent_cache_is_refused(pairs, tmp_path):
    assert cache("--data", pairs, "--out", tmp_path / "cache").returncode == 0
    one_line_error(train("--data", tmp_path / "cache", "--out", tmp_path / "run", "--flip"),
                   "--flip: --data " + str(tmp_path / "cache") + " is a latent cache, encoded already")
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_whose_counters_are_not_numbers_is_passed_over_or_named(pairs, tmp_path):
    """Class 5: trainer.json with a string step is a damaged checkpoint (the intact one before it is resumed);
    another counter that is not a whole number is one line naming the file."""
    out = tmp_path / "run"
    common = ["--data", pairs, "--out", out, "--batch-size", 2, "--checkpoint-every", 1, "--no-export"]
    assert train(*common, "--steps", 2).returncode == 0
    meta = out / "checkpoints" / "step-000002" / "trainer.json"
    saved = json.loads(meta.read_text())
    meta.write_text(json.dumps({**saved, "step": "2"}))
    resumed = train(*common, "--steps", 2, "--resume")
    assert resumed.returncode == 0 and "resuming from step-000001" in resumed.stdout, resumed.stderr[-2000:]
    meta = out / "checkpoints" / "step-000002" / "trainer.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "pairs_read": "8"}))
    one_line_error(train(*common, "--steps", 3, "--resume"), f"{meta}: pairs_read is '8', not a whole number")


@pytest.mark.parametrize("where", ["checkpoint", "export"])
def test_a_library_that_fails_to_write_on_a_full_disk_is_one_line_saying_so(pairs, tmp_path, monkeypatch, where):
    """Class 5: torch's own failure inside DCP ("unexpected pos") and safetensors' inside an export are not
    OSErrors; on a full disk they are the full disk's one line, and the previous checkpoint stays."""
    import common
    from diffusers import DiffusionPipeline
    from safetensors import SafetensorError

    def fails(*args, **kwargs):
        monkeypatch.setattr(common, "free_bytes", lambda path: 0)
        if where == "checkpoint":
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1216 vs 1152")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28 })")

    if where == "checkpoint":
        real = trainer.dcp.save
        monkeypatch.setattr(trainer.dcp, "save", lambda state, storage_writer: (
            fails() if "000002" in str(storage_writer.path) else real(state, storage_writer=storage_writer)))
    else:
        monkeypatch.setattr(DiffusionPipeline, "save_pretrained", fails)
    out = tmp_path / "run"
    result = train("--data", pairs, "--out", out, "--steps", 2, "--batch-size", 4, "--checkpoint-every", 1)
    one_line_error(result, "the disk is full: ")
    assert (out / "checkpoints" / "step-000001").is_dir() and not (out / "model").exists()


def test_damaged_stored_online_pairs_are_one_line_naming_the_file(tmp_path):
    import online
    from rundir import RunDir
    path = RunDir(tmp_path).online_pairs(5)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=f"{path}: the stored pairs of the refresh at step 5 cannot be read"):
        online.load_pairs(tmp_path, 5)


@pytest.mark.parametrize("program", ["evaluate", "toy", "study", "bench"])
def test_an_out_under_a_file_is_one_line_before_any_work(pairs, tmp_path, program):
    """Class 5: --out below a path that is a file, for every program that writes one, refused before any work."""
    import bench
    import study
    import toy
    (tmp_path / "file").write_text("mine")
    out = tmp_path / "file" / "out"
    argv = {"evaluate": ["compare", "--model", "toy", "--base", "toy", "--tuned", "toy", "--prompts", pairs,
                         "--reward", "named_colour", "--out", out],
            "toy": ["--out", out], "study": ["--out", out], "bench": ["planner", "--out", out / "bench.json"]}
    main = {"evaluate": lambda a: __import__("evaluate").main(a), "toy": toy.main, "study": study.main,
            "bench": bench.main}[program]
    one_line_error(in_process(main, argv[program]), f"{tmp_path / 'file'} is a file, not a directory")
    assert (tmp_path / "file").read_text() == "mine"


def test_a_second_evaluation_into_a_folder_in_use_is_refused_and_curves_need_a_file(pairs, tmp_path):
    """Class 7: one writer a folder for compare and timesteps (the lock names its holder); curves --out DIR/ is
    refused instead of writing beside the folder."""
    from common import take_lock
    out = tmp_path / "eval"
    out.mkdir()
    held, _ = take_lock(out / ".lock", "evaluate.py compare")
    base = Path(__file__).parent / "toy-base"
    try:
        one_line_error(evaluate("compare", "--model", "toy", "--base", base, "--tuned", base, "--prompts", pairs,
                                "--reward", "named_colour", "--out", out), "is in use by evaluate.py compare pid")
    finally:
        held.close()
    one_line_error(evaluate("curves", str(tmp_path), "--out", f"{out}/"), f"--out {out}/: is a directory")


@pytest.mark.parametrize("value,message", [("bogus", "'bogus' is not a device (cpu, cuda, cuda:N)"),
                                           ("cuda:7", "cuda:7: this machine has")])
def test_an_unknown_device_or_a_gpu_that_is_not_there_is_one_line(pairs, tmp_path, value, message):
    one_line_error(cache("--data", pairs, "--out", tmp_path / "cache", "--device", value), message)
    one_line_error(evaluate("timesteps", "--model", "toy", "--data", pairs, "--device", value), message)
    assert not (tmp_path / "cache").exists()


def test_messages_name_what_is_wrong(pairs, tmp_path):
    """Class 8: a file name holding a line break keeps the manifest, the row and the whole name on the one line;
    --data that is a cache already, a looping --out, a --tuned of another backbone (before the base is
    sampled), --batch-size 0 of evaluate.py, each named as what they are."""
    import os
    import models
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "a", "chosen": "line\nbreak.png", "rejected": "l0.png"}))
    one_line_error(train("--data", rows, "--out", tmp_path / "run"), f"{rows} row 1: chosen file")
    assert "line\\nbreak.png does not exist" in train("--data", rows, "--out", tmp_path / "run").stderr
    assert cache("--data", pairs, "--out", tmp_path / "cache").returncode == 0
    one_line_error(cache("--data", tmp_path / "cache", "--out", tmp_path / "again"),
                   f"--data {tmp_path / 'cache'}: is a latent cache already")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    one_line_error(cache("--data", pairs, "--out", tmp_path / "loop"), "is a link to nowhere (broken, or a loop)")
    models.load_backbone("tiny-sd1.5").pipe.save_pretrained(tmp_path / "latent")
    result = evaluate("compare", "--model", "toy", "--base", Path(__file__).parent / "toy-base", "--tuned",
                      tmp_path / "latent", "--prompts", pairs, "--reward", "named_colour", "--out", tmp_path / "eval")
    one_line_error(result, f"{tmp_path / 'latent'}: holds a latent model, which is not --model toy")
    assert not list((tmp_path / "eval").glob("*.png")), "refused before the base was sampled"
    one_line_error(evaluate("compare", "--model", "toy", "--base", "toy", "--tuned", "toy", "--prompts", pairs,
                            "--reward", "named_colour", "--batch-size", 0), "--batch-size 0: must be at least 1")


def test_an_edited_cache_index_is_refused_against_what_its_shards_hold(pairs, tmp_path):
    assert cache("--data", pairs, "--out", tmp_path / "cache").returncode == 0
    index = tmp_path / "cache" / "cache.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "resolution": [8, 8]}))
    one_line_error(train("--data", tmp_path / "cache", "--out", tmp_path / "run"),
                   "(an edited or damaged index); rebuild the cache")


def test_random_weights_are_the_same_whatever_the_callers_seed():
    """Class 8: a tiny backbone's cache and a run on raw pairs with another --seed encode with the same random
    VAE and text encoder; the caller's random stream is left as it was."""
    import torch
    import models
    torch.manual_seed(5)
    first = models.load_backbone("tiny-sd1.5").pipe.vae.state_dict()
    after = torch.rand(1)
    torch.manual_seed(5)
    models.load_backbone("tiny-sd1.5")
    assert torch.equal(torch.rand(1), after), "the caller's stream is untouched"
    torch.manual_seed(6)
    second = models.load_backbone("tiny-sd1.5").pipe.vae.state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_reward_that_scores_nan_is_named_not_blamed_on_the_margin(tmp_path):
    import contextlib
    import torch
    import models
    import online
    backbone = models.load_backbone("toy")
    args = trainer.parse_args(["--model", "toy", "--data", "p.txt", "--pairs", "online", "--online-sample-steps", "1"])
    prompts = ["a red circle", "a blue square"]
    with pytest.raises(ValueError, match="--reward named_colour: scored 8 of 8 samples NaN or inf at the refresh of "
                                         "step 0"):
        online.sample_pairs(backbone, prompts, backbone.encode_prompts(prompts),
                            lambda images, texts: torch.full((len(images),), float("nan")), args, 0, 0, 1,
                            contextlib.nullcontext)


def test_a_lora_checkpoint_under_a_full_fine_tuning_run_is_one_line(pairs, tmp_path):
    common = ["--data", pairs, "--steps", 1, "--checkpoint-every", 1, "--no-export"]
    assert train(*common, "--out", tmp_path / "lora", "--lora", 4).returncode == 0
    assert train(*common, "--out", tmp_path / "full").returncode == 0
    checkpoint = tmp_path / "full" / "checkpoints" / "step-000001"
    shutil.rmtree(checkpoint)
    shutil.copytree(tmp_path / "lora" / "checkpoints" / "step-000001", checkpoint)
    result = train(*common[:2], "--steps", 2, "--out", tmp_path / "full", "--resume")
    one_line_error(result, "cannot be resumed by this run (Missing key in checkpoint state_dict")
    assert "continue with --resume" not in result.stderr
