"""Run folders (glag.runs): what a new run may be written into, and the files' permissions."""
import json
import os
import stat

import pytest

from glag.errors import RunExistsError, UsageError
from glag.runs import RunDir, atomic_write_json, continue_epochs


def test_new_run_needs_a_new_or_empty_folder(tmp_path):
    """Someone else's files are never overwritten: a folder with files but no run is refused,
    so is a path that is a file; an empty folder, or one holding only hidden files (a killed
    atomic write's temporary), is fine."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "summary.csv").write_text("run,notes\n1,keep me\n")
    with pytest.raises(RunExistsError, match=r"is not empty \(summary.csv\) and holds no run"):
        RunDir(foreign)
    with pytest.raises(RunExistsError):
        RunDir(foreign, resume=True)  # nothing to resume either
    assert (foreign / "summary.csv").read_text() == "run,notes\n1,keep me\n"
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file; a run needs a folder"):
        RunDir(tmp_path / "file")
    with pytest.raises(UsageError, match="cannot write the run folder"):
        RunDir(tmp_path / "file" / "sub")
    (tmp_path / "empty").mkdir()
    RunDir(tmp_path / "empty").write_config({"a": 1})
    with pytest.raises(RunExistsError, match="already holds a run; pass --resume"):
        RunDir(tmp_path / "empty")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / ".config.json.abc.tmp").write_text("{")
    RunDir(hidden)


def test_resume_needs_a_run_and_clears_what_a_killed_write_left(tmp_path, monkeypatch):
    """--resume on a folder with no run (a mistyped --out) is refused instead of starting a new
    run with default options; resuming removes the temporary files of atomic writes a SIGKILL
    interrupted. A folder that cannot be written is refused before any work."""
    with pytest.raises(UsageError, match="holds no run to continue"):
        RunDir(tmp_path / "typo", resume=True)
    assert not (tmp_path / "typo").exists()
    run = RunDir(tmp_path / "run")
    run.write_config({"epochs": 1})
    (tmp_path / "run" / ".last.pt.x1y2.tmp").write_bytes(b"half a checkpoint")
    RunDir(tmp_path / "run", resume=True)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "env.json"]

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("glag.runs.tempfile.mkstemp", read_only)
    with pytest.raises(UsageError, match="cannot write the run folder --out .*Permission denied"):
        RunDir(tmp_path / "ro")


def test_atomic_files_get_the_mode_of_the_umask(tmp_path):
    """Files written atomically are as readable as open() would make them (mkstemp's 0600 is not kept)."""
    umask = os.umask(0o022)
    os.umask(umask)
    atomic_write_json(tmp_path / "metrics.json", {"top1": 1.0})
    mode = stat.S_IMODE((tmp_path / "metrics.json").stat().st_mode)
    assert mode == 0o666 & ~umask
    plain = tmp_path / "plain"
    plain.write_text("x")
    assert mode == stat.S_IMODE(plain.stat().st_mode)


def test_continue_epochs_records_more_and_refuses_fewer(tmp_path, caplog):
    """More epochs: recorded, with one warning; fewer than done: refused, with no warning first
    (it used to warn that the schedules would follow the new value, then refuse it)."""
    from glag.runs import check_resume_options

    run = RunDir(tmp_path / "run")
    run.write_config({"epochs": 3, "lr": 0.1})
    with caplog.at_level("WARNING", logger="glag.runs"):
        continue_epochs(run, 5, done=3)
    assert [r.getMessage() for r in caplog.records if "--epochs 5 (it was started with 3)" in r.getMessage()]
    assert json.loads((run / "config.json").read_text()) == {"epochs": 5, "lr": 0.1}
    continue_epochs(run, 7, done=3, write=False)
    assert json.loads((run / "config.json").read_text())["epochs"] == 5
    caplog.clear()
    with caplog.at_level("WARNING", logger="glag.runs"):
        check_resume_options({"epochs": 5, "lr": 0.1}, {"epochs": 3, "lr": 0.1}, run.path)
        with pytest.raises(UsageError, match="has trained 4 epochs already; --epochs 3 is fewer"):
            continue_epochs(run, 3, done=4)
    assert caplog.records == []


def test_one_writer_per_run_folder(tmp_path):
    """A run folder is written by one process at a time: a second process (a resume started while
    the run, or a worker it left, still writes) is refused, saying what to do; the kernel frees
    the lock when the holder dies, even by SIGKILL. Within one process the lock is re-entrant
    (a notebook resuming a run it interrupted), and released by release()."""
    import signal
    import subprocess
    import sys
    import time

    run = RunDir(tmp_path / "run")
    run.write_config({"a": 1})
    again = RunDir(tmp_path / "run", resume=True)  # same process: fine
    again.release()
    run.release()
    code = ("import sys, time; from glag.runs import RunDir; r = RunDir(sys.argv[1], resume=True); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "run")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=r"another process is writing the run folder .*run now \(the run, or a "
                                             r"resume of it, is still going\); wait for it to finish, or stop it"):
            RunDir(tmp_path / "run", resume=True)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    deadline = time.time() + 10
    while True:  # the lock goes with the process
        try:
            RunDir(tmp_path / "run", resume=True).release()
            break
        except UsageError:
            assert time.time() < deadline
            time.sleep(0.05)


def test_a_failed_write_names_the_file_and_the_space_left(tmp_path, monkeypatch):
    """A write that fails (torch.save reports a full disk as a RuntimeError, plain writes as
    OSError ENOSPC) is a usage error naming the file, the cause, the space left and how to go on;
    no temporary file is left and the old file is kept."""
    import errno

    import torch

    from glag.runs import atomic_torch_save

    run = RunDir(tmp_path / "run")
    atomic_torch_save({"epoch": 1}, run / "last.pt")
    before = (run / "last.pt").read_bytes()

    def full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1996736 vs 1996624")
    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UsageError, match=r"could not write .*last\.pt \(RuntimeError: \[enforce fail.*\); "
                                         r"[\d.,]+ MiB free on its file system\. If the disk is full, free space .* "
                                         r"--resume"):
        atomic_torch_save({"epoch": 2}, run / "last.pt")
    assert (run / "last.pt").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["last.pt"]

    def cuda_fault(obj, path):  # a bug met while saving is not a full disk: raised as it is
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    monkeypatch.setattr(torch, "save", cuda_fault)
    with pytest.raises(RuntimeError, match="illegal memory access") as e:
        atomic_torch_save({"epoch": 2}, run / "last.pt")
    assert not isinstance(e.value, UsageError)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("builtins.open", no_space)
    with pytest.raises(UsageError, match=r"could not write .*summary\.csv \(OSError: \[Errno 28\] No space left"):
        run.append_summary({"epoch": 1})


def test_a_run_of_the_other_stage_is_never_written_into(tmp_path):
    """A stage-two run resumed (or started) in a stage-one folder, as "already holds a run; pass
    --resume" used to invite, would overwrite its best.pt; the reverse read stage two's options
    as stage one's. Both are refused, the kind recorded in config.json or told from old ones."""
    from glag.runs import run_kind_of

    one = RunDir(tmp_path / "s1", kind="stage1")
    one.write_config({"arch": "resnet32", "epochs": 3})
    one.release()
    saved = json.loads((tmp_path / "s1" / "config.json").read_text())
    assert saved["run_kind"] == "stage1"
    for resume in (False, True):
        with pytest.raises(RunExistsError, match=r"s1 is a stage-one \(tools/train_stage1\.py\) run, not a stage-two "
                                                 r"\(tools/afg_train\.py\) one: .* Give this run its own --out"):
            RunDir(tmp_path / "s1", resume=resume, kind="stage2")
    assert json.loads((tmp_path / "s1" / "config.json").read_text()) == saved
    assert run_kind_of({"features": "f.h5", "epochs": 3}) == "stage2"  # written before run_kind was
    assert run_kind_of({"arch": "resnet32"}) == "stage1" and run_kind_of({"a": 1}) is None
    RunDir(tmp_path / "s1", resume=True, kind="stage1").release()


def test_a_file_that_is_no_checkpoint_is_named_without_torchs_advice(tmp_path):
    """torch's weights-only error suggests weights_only=False (unsafe for a file one cannot vouch
    for) and filing an issue; the message keeps only the unpickler's reason and our fix."""
    from glag.runs import torch_load_checked

    path = tmp_path / "config.json"
    path.write_text('{"a": 1}')
    with pytest.raises(UsageError) as e:
        torch_load_checked(path, "give best.pt")
    msg = str(e.value)
    assert "config.json is not a readable checkpoint (UnpicklingError: Unsupported operand 123)" in msg
    assert msg.endswith("give best.pt") and "weights_only" not in msg and "file an issue" not in msg


def test_json_files_hold_null_not_nan(tmp_path):
    """A metric of an empty group is NaN in memory; metrics.json must stay valid JSON for other
    readers (Python's json wrote a bare NaN), so it is written as null, and shown as nan."""
    import numpy as np

    from glag.metrics import format_table

    m = {"test": {"top1": 50.0, "many": float("nan"), "few": np.float32("inf")}, "per_class": np.array([0.5, np.nan])}
    atomic_write_json(tmp_path / "metrics.json", m)
    text = (tmp_path / "metrics.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert back == {"test": {"top1": 50.0, "many": None, "few": None}, "per_class": [0.5, None]}
    assert "nan" in format_table({"run": back["test"]}, columns=("top1", "many"))


def test_a_folder_taken_while_a_run_read_its_data_is_checked_again(tmp_path, monkeypatch, caplog):
    """Two new runs given one --out both pass the check made before their data load; the second to
    create the folder used to write over the first's run. The check is made again under the lock,
    and a refused run removes nothing it did not write. A file system without locks warns."""
    import errno
    import fcntl

    a = RunDir(tmp_path / "run", create=False)
    b = RunDir(tmp_path / "run", create=False)
    a.create()
    a.write_config({"who": "a"})
    a.release()
    with pytest.raises(RunExistsError, match="already holds a run"):
        b.create()
    b.discard_new()  # it created nothing: nothing to remove
    assert json.loads((tmp_path / "run" / "config.json").read_text())["who"] == "a"

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level("WARNING", logger="glag.runs"):
        RunDir(tmp_path / "nfs").release()
    assert any("cannot lock the run folder" in r.getMessage() for r in caplog.records)


def test_the_interrupt_hint_names_the_runs_out(tmp_path):
    """How to continue names the run's --out: the command line's, else --config's (it named the
    tool's default folder when --out came from --config)."""
    from tools import afg_train
    from tools._common import resume_hint

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"out": str(tmp_path / "myrun"), "epochs": 3}))
    hint = resume_hint(afg_train.build_parser)
    assert hint(["--config", str(cfg)]) == f"continue with --out {tmp_path / 'myrun'} --resume"
    assert hint(["--config", str(cfg), "--out", "y"]) == "continue with --out y --resume"
    assert hint(["--features", "f.h5"]) == f"continue with --out {afg_train.build_parser().get_default('out')} --resume"
