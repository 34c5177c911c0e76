"""Stage two end to end on small synthetic feature files: methods, outputs, resume, bad input."""
import dataclasses
import json
import logging
import shutil

import h5py
import numpy as np
import pytest
import torch

from glag.stage2 import METHODS, Stage2Config, train_stage2
from glag.synthetic import write_synthetic_features

COUNTS = [300, 200, 120, 60, 30, 12, 6, 3]  # head (> 100): classes 0-2


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    path = tmp_path_factory.mktemp("s2") / "feats.h5"
    return write_synthetic_features(path, COUNTS, 16, val_per_class=20, test_per_class=40, seed=3)


def cfg(feats, out, **kw):
    # ω_init candidates in this process (tests patch and watch it); the process pool has its own test
    base = dict(features=str(feats), out=str(out), epochs=4, batch_size=128, backend="torch", progress=False,
                omega_workers=1)
    base.update(kw)
    return Stage2Config(**base)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_and_reports(feats, tmp_path, method):
    m = train_stage2(cfg(feats, tmp_path / method, method=method))
    assert set(m["stage2"]) == {"val", "test"} and set(m["stage1"]) == {"val", "test"}
    for split in ("val", "test"):
        for key in ("top1", "many", "medium", "few"):
            assert 0.0 <= m["stage2"][split][key] <= 100.0
    # far above chance (12.5 %) on this separable problem
    assert m["stage2"]["test"]["top1"] > 40.0
    assert m["selected_on"] == "val" and 1 <= m["best_epoch"] <= 4
    rows = (tmp_path / method / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4
    cfg_saved = json.loads((tmp_path / method / "config.json").read_text())
    assert cfg_saved["method"] == method and cfg_saved["n_max_resolved"] == 300
    assert cfg_saved["head_classes"] == [0, 1, 2]
    generated = [] if method == "crt" else [3, 4, 5, 6, 7]
    assert cfg_saved["generated_classes"] == generated
    assert cfg_saved["resampled_classes"] == [c for c in range(1, 8) if c not in generated]
    env = json.loads((tmp_path / method / "env.json").read_text())
    assert env["seed"] == 0 and "torch" in env["versions"]
    has_omega = (tmp_path / method / "omega.json").exists()
    assert has_omega == METHODS[method]["adaptive_omega"]


def test_presets_resolve_as_documented():
    dc = Stage2Config(method="dc", k=3).resolved()
    assert dc.omega_init == pytest.approx(3 / 4) and dc.weights == "uniform" and not dc.kd and dc.generate
    crt = Stage2Config(method="crt").resolved()
    assert not crt.generate and not crt.kd
    glag = Stage2Config(method="glag").resolved()
    assert glag.kd and glag.adaptive_omega and glag.weights == "size_over_distance" and glag.omega_init == "auto"
    assert glag.omega_grid == (0.6, 0.4, 0.2, 0.0)
    # ω is unused by cRT and fixed to k/(k+1) by DC: nothing to choose
    assert crt.omega_init == 0.6
    assert Stage2Config(method="glag", omega_init="0.4").resolved().omega_init == 0.4
    for bad, match in ((dict(omega_init="best"), "number in \\[0, 1\\] or 'auto'"),
                       (dict(omega_init=1.5), "must lie in \\[0, 1\\]"),
                       (dict(omega_grid=()), "one or more values"),
                       (dict(omega_grid=(0.2, -0.1)), "one or more values"),
                       (dict(weights="nearest"), "--weights must be one of size_over_distance, uniform, got 'nearest'"),
                       (dict(alpha_mode="full"), "--alpha-mode must be one of all, diag, got 'full'")):
        with pytest.raises(ValueError, match=match):
            Stage2Config(method="glag", **bad).resolved()
    # an explicit value beats the preset
    assert not Stage2Config(method="glag", kd=False).resolved().kd
    with pytest.raises(ValueError, match="unknown method"):
        Stage2Config(method="ldam").resolved()


def test_omega_init_auto_keeps_the_best_validation_run(feats, tmp_path):
    out = tmp_path / "auto"
    m = train_stage2(cfg(feats, out, epochs=3, omega_grid=(0.6, 0.0)))
    cand = {w: json.loads((out / "omega_init" / w / "metrics.json").read_text()) for w in ("0.6", "0")}
    val = {w: c["stage2"]["val"]["top1"] for w, c in cand.items()}
    chosen = "0.6" if val["0.6"] >= val["0"] else "0"
    assert f"{m['omega_init_selected']:g}" == chosen
    assert m["stage2"] == cand[chosen]["stage2"] and m["per_class"] == cand[chosen]["per_class"]
    # the selection record holds validation metrics only
    assert m["omega_selection"] == {w: c["stage2"]["val"] for w, c in cand.items()}
    assert (out / "best.pt").read_bytes() == (out / "omega_init" / chosen / "best.pt").read_bytes()
    om = json.loads((out / "omega.json").read_text())
    assert np.allclose(np.array(om["history"])[0, om["tail_classes"]], float(chosen))
    saved = json.loads((out / "config.json").read_text())
    assert saved["omega_init"] == "auto" and saved["omega_grid"] == [0.6, 0.0]
    assert saved["omega_init_selected"] == float(chosen) and saved["generated_classes"] == [3, 4, 5, 6, 7]
    # each candidate is a run with a numeric ω_init
    assert json.loads((out / "omega_init" / "0" / "config.json").read_text())["omega_init"] == 0.0


def test_omega_init_candidates_in_processes_equal_one_after_another(feats, tmp_path):
    seq = train_stage2(cfg(feats, tmp_path / "seq", epochs=3, omega_grid=(0.6, 0.2, 0.0)))
    par = train_stage2(cfg(feats, tmp_path / "par", epochs=3, omega_grid=(0.6, 0.2, 0.0), omega_workers=2))
    for key in ("stage2", "per_class", "omega_selection", "omega_init_selected", "best_epoch"):
        assert par[key] == seq[key], key
    for w in ("0.6", "0.2", "0"):  # each candidate wrote its own run folder, the same classifier
        a = torch.load(tmp_path / "par" / "omega_init" / w / "best.pt", weights_only=True)["head"]
        b = torch.load(tmp_path / "seq" / "omega_init" / w / "best.pt", weights_only=True)["head"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_candidate_processes_follow_the_cores_and_the_memory_budget(feats, monkeypatch):
    import glag.stage2 as s2

    monkeypatch.setattr(s2, "_cores", lambda: 8)
    small = Stage2Config(features=str(feats)).resolved()  # d·C = 16·8: one thread a run
    assert s2._candidate_workers(small) == 8
    assert s2._candidate_workers(dataclasses.replace(small, threads=4)) == 2
    assert s2._candidate_workers(dataclasses.replace(small, max_memory=2**30)) == 1  # a budget is per process


def test_closed_form_gradient_trains_as_autograd_does(feats, tmp_path):
    """The default closed-form step against the autograd step (the oracle): same classifier."""
    runs = {}
    for closed in (True, False):
        out = tmp_path / f"closed-{closed}"
        runs[closed] = train_stage2(cfg(feats, out, epochs=3, omega_init=0.6, closed_form_grad=closed))
        runs[closed]["head"] = torch.load(out / "last.pt", weights_only=True)["head"]
    for name in ("weight", "bias"):
        assert torch.allclose(runs[True]["head"][name], runs[False]["head"][name], rtol=1e-4, atol=1e-5)
    a = np.loadtxt(tmp_path / "closed-True" / "summary.csv", delimiter=",", skiprows=1, usecols=(3, 4))
    b = np.loadtxt(tmp_path / "closed-False" / "summary.csv", delimiter=",", skiprows=1, usecols=(3, 4))
    assert np.allclose(a, b, rtol=1e-4)  # the logged CE and KD per epoch


def test_pick_omega_init_breaks_ties_towards_the_earlier_value():
    from glag.stage2 import pick_omega_init

    assert pick_omega_init((0.6, 0.4, 0.2, 0.0), [70.0, 72.5, 72.5, 71.0]) == 0.4
    assert pick_omega_init((0.6, 0.0), [70.0, 70.0]) == 0.6
    assert pick_omega_init((0.6, 0.0), [69.5, 70.0]) == 0.0


def test_every_class_is_topped_up_to_n_max(feats, tmp_path):
    from glag.stage2 import EpochBuilder, load_splits

    ff, splits = load_splits(feats, 0.5)
    for method in ("crt", "glag"):
        c = Stage2Config(features=str(feats), method=method, backend="torch", omega_init=0.6).resolved()
        b = EpochBuilder(c, splits["train"], ff.class_counts)
        x, y, kd_mask = b.build(0, None)
        assert np.bincount(y.numpy()).tolist() == [300] * len(COUNTS)
        assert torch.isfinite(x).all()
        # KD only on real samples of head classes, which come first in file order
        n_real = len(splits["train"].y)
        assert not kd_mask[n_real:].any()
        assert kd_mask[:n_real].sum() == 300 + 200 + 120


def test_adaptive_omega_trajectory_is_saved(feats, tmp_path):
    out = tmp_path / "glag"
    train_stage2(cfg(feats, out, method="glag", epochs=5, omega_init=0.6))
    om = json.loads((out / "omega.json").read_text())
    hist = np.array(om["history"])
    assert hist.shape == (6, len(COUNTS))  # the initial ω plus one row per epoch
    assert np.allclose(hist[0, om["tail_classes"]], 0.6)
    assert ((hist >= 0) & (hist <= 1)).all()
    # steps are multiples of 0.05 away from the initial value
    delta = (hist[:, om["tail_classes"]] - 0.6) / 0.05
    assert np.allclose(delta, np.round(delta), atol=1e-4)


def test_resume_continues_to_the_same_result(feats, tmp_path):
    full = train_stage2(cfg(feats, tmp_path / "full", epochs=4))
    # run two epochs, then resume the same run to four
    first = cfg(feats, tmp_path / "part", epochs=4)
    _run_epochs(first, 2)
    resumed = train_stage2(first, resume=True)
    assert resumed["stage2"] == full["stage2"]
    rows = (tmp_path / "part" / "summary.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 4


def _run_epochs(c, n, builder=None, method="build"):
    """Run ``n`` epochs of a run configured for more, by stopping it after epoch ``n``: the
    builder's per-epoch ``method`` (``EpochBuilder.build``, or the streaming builder's
    ``plan_epoch``) raises KeyboardInterrupt when asked for epoch ``n``."""
    import glag.stage2 as s2

    builder = builder or s2.EpochBuilder
    calls = {"n": 0}
    real = getattr(builder, method)

    def interrupted(self, epoch, omega):
        if epoch >= n:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, epoch, omega)

    setattr(builder, method, interrupted)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_stage2(c)
    finally:
        setattr(builder, method, real)
    assert calls["n"] == n


def _plain_h5py_file(path, counts, d=8, with_val=True, with_logits=True, one_sample_class=False, seed=0,
                     per_class=None):
    """A feature file in DESIGN.md's schema, written by 'another program' with h5py only.
    ``per_class``: {split: images a class} for val and test (default 10 and 20)."""
    rng = np.random.default_rng(seed)
    C = len(counts)
    means = rng.standard_normal((C, d)) * 2
    with h5py.File(path, "w") as f:
        f.attrs["num_classes"] = C
        f.attrs["feature_dim"] = d
        sizes = {"val": 10, "test": 20, **(per_class or {})}
        for split, per in (("train", counts), ("val", [sizes["val"]] * C), ("test", [sizes["test"]] * C)):
            if split == "val" and not with_val:
                continue
            y = np.repeat(np.arange(C), per)
            x = np.maximum(means[y] + rng.standard_normal((len(y), d)), 0).astype(np.float32)
            g = f.create_group(split)
            g["features"] = x
            g["labels"] = y.astype(np.int64)
            g["index"] = np.arange(len(y))
            if with_logits:
                g["logits"] = (x @ means.T).astype(np.float32)
    return path


def test_file_from_another_program_trains(tmp_path):
    path = _plain_h5py_file(tmp_path / "other.h5", [200, 150, 40, 10, 4])
    m = train_stage2(cfg(path, tmp_path / "run", epochs=3))
    assert m["stage2"]["test"]["top1"] > 50.0
    assert m["class_counts"] == [200, 150, 40, 10, 4]


def test_missing_val_split_is_a_clear_error(tmp_path):
    path = _plain_h5py_file(tmp_path / "noval.h5", [200, 150, 40, 10, 4], with_val=False)
    with pytest.raises(ValueError, match="no /val split.*never on test"):
        train_stage2(cfg(path, tmp_path / "run"))


def test_missing_teacher_logits_turns_kd_off_with_a_warning(tmp_path, caplog):
    path = _plain_h5py_file(tmp_path / "nologits.h5", [200, 150, 40, 10, 4], with_logits=False)
    with caplog.at_level(logging.WARNING, logger="glag.stage2"):
        m = train_stage2(cfg(path, tmp_path / "run", epochs=3))
    assert any("KD is off" in r.message for r in caplog.records)
    assert m["stage1"] == {}  # no stage-one logits: nothing to report for stage one
    assert m["stage2"]["test"]["top1"] > 50.0


def test_class_with_one_sample_borrows_only_support_covariance(tmp_path):
    path = _plain_h5py_file(tmp_path / "one.h5", [200, 150, 40, 10, 1])
    m = train_stage2(cfg(path, tmp_path / "run", epochs=2))
    assert np.isfinite(m["stage2"]["test"]["top1"])
    from glag.stage2 import EpochBuilder, load_splits

    ff, splits = load_splits(path, 0.5)
    b = EpochBuilder(Stage2Config(features=str(path), backend="torch", omega_init=0.6).resolved(), splits["train"],
                     ff.class_counts)
    assert b.stats.bank.ranks[4] == 0  # no covariance of its own
    x, y, _ = b.build(0, None)
    gen = x[len(splits["train"].y):][y[len(splits["train"].y):] == 4]
    assert len(gen) == 199 and torch.isfinite(gen).all() and gen.std(0).sum() > 0


def test_nan_features_and_bad_labels_are_refused(tmp_path):
    from glag.features import FeatureFileError

    path = _plain_h5py_file(tmp_path / "nan.h5", [200, 150, 40, 10, 4])
    with h5py.File(path, "r+") as f:
        x = f["train/features"][...]
        x[7, 3] = np.nan
        f["train/features"][...] = x
    with pytest.raises(FeatureFileError, match="train"):
        train_stage2(cfg(path, tmp_path / "run"))
    path = _plain_h5py_file(tmp_path / "lab.h5", [200, 150, 40, 10, 4])
    with h5py.File(path, "r+") as f:
        y = f["test/labels"][...]
        y[0] = 9
        f["test/labels"][...] = y
    with pytest.raises(FeatureFileError, match="label"):
        train_stage2(cfg(path, tmp_path / "run2"))


def test_existing_run_is_not_overwritten(feats, tmp_path):
    train_stage2(cfg(feats, tmp_path / "run", epochs=1))
    with pytest.raises(FileExistsError, match="--resume"):
        train_stage2(cfg(feats, tmp_path / "run", epochs=1))


def test_command_line_run_and_its_replay_from_config_json(feats, tmp_path, capsys):
    """tools/afg_train.py as a user runs it: run folder, plots, the ω_init table; then
    ``--config <run>/config.json`` (which also names the feature file) replays it exactly."""
    from tools import afg_train

    out = tmp_path / "cli"
    assert afg_train.main(["--features", str(feats), "--out", str(out), "--epochs", "3", "--omega-grid", "0.6", "0",
                           "--backend", "torch", "--threads", "1", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["threads"] == 1  # the README's --threads
    printed = capsys.readouterr().out
    assert "ω_init chosen on val" in printed and "glag, test" in printed
    for name in ("config.json", "env.json", "metrics.json", "best.pt", "omega.json", "summary.csv",
                 "per_class_test.png", "omega.png", "omega_init.png", "omega_init/0.6/metrics.json",
                 "omega_init/0/metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "per_class_test.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    first = json.loads((out / "metrics.json").read_text())
    assert afg_train.main(["--config", str(out / "config.json"), "--out", str(tmp_path / "replay"),
                           "--no-plots", "--no-progress"]) == 0
    again = json.loads((tmp_path / "replay" / "metrics.json").read_text())
    assert again["stage2"] == first["stage2"] and again["omega_init_selected"] == first["omega_init_selected"]


def _stop_at_last_pt(monkeypatch, epoch):
    """Stop a run (KeyboardInterrupt) after it has written epoch ``epoch``'s summary row and
    before that epoch's last.pt: the window between the two writes."""
    import glag.stage2 as s2

    real = s2.atomic_torch_save

    def save(state, path):
        if path.name == "last.pt" and state["epoch"] == epoch:
            raise KeyboardInterrupt
        real(state, path)
    monkeypatch.setattr(s2, "atomic_torch_save", save)
    return real


@pytest.mark.parametrize("stop_epoch", [1, 3])
def test_stop_between_summary_row_and_checkpoint_resumes_with_one_row_per_epoch(feats, tmp_path, monkeypatch,
                                                                                  stop_epoch):
    """Epoch 1 (no last.pt yet: the resume starts over) and a later epoch: every epoch has one
    summary row after the resume, and the result is the uninterrupted run's."""
    import glag.stage2 as s2

    full = train_stage2(cfg(feats, tmp_path / "full", epochs=4, omega_init=0.6))
    c = cfg(feats, tmp_path / "part", epochs=4, omega_init=0.6)
    real = _stop_at_last_pt(monkeypatch, stop_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_stage2(c)
    monkeypatch.setattr(s2, "atomic_torch_save", real)
    summary = tmp_path / "part" / "summary.csv"
    assert [r.split(",")[0] for r in summary.read_text().splitlines()[1:]] == [str(e) for e in range(1, stop_epoch + 1)]
    resumed = train_stage2(c, resume=True)
    assert resumed["stage2"] == full["stage2"]
    assert [r.split(",")[0] for r in summary.read_text().splitlines()[1:]] == ["1", "2", "3", "4"]


def test_resume_refuses_other_features_or_options(feats, tmp_path):
    """A resumed run must be given the features and options it was started with: another file
    (even of the same shape) or another --lr is a clear error, and the run folder is unchanged."""
    c = cfg(feats, tmp_path / "run", epochs=4, omega_init=0.6)
    _run_epochs(c, 2)
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    other = write_synthetic_features(tmp_path / "other.h5", COUNTS, 16, val_per_class=20, test_per_class=40, seed=4)
    with pytest.raises(ValueError, match="trained on other features"):
        train_stage2(dataclasses.replace(c, features=str(other)), resume=True)
    narrow = write_synthetic_features(tmp_path / "narrow.h5", COUNTS, 8, val_per_class=20, test_per_class=40, seed=3)
    with pytest.raises(ValueError, match="d = 16.*d = 8"):
        train_stage2(dataclasses.replace(c, features=str(narrow)), resume=True)
    with pytest.raises(ValueError, match=r"--lr: 0\.05 in the run, 0\.5 now"):
        train_stage2(dataclasses.replace(c, lr=0.5), resume=True)
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    # the same file under another path, and another backend: allowed
    moved = tmp_path / "moved.h5"
    moved.write_bytes(feats.read_bytes())
    assert train_stage2(dataclasses.replace(c, features=str(moved), backend="numba"), resume=True)["stage2"]


def test_missing_features_leave_no_run_folder(tmp_path):
    """A wrong --features fails before any run folder exists (with --omega-init auto too), so the
    corrected command runs as is."""
    from glag.features import FeatureFileError

    for omega_init in ("auto", 0.6):
        out = tmp_path / f"run-{omega_init}"
        with pytest.raises(FeatureFileError, match="does not exist"):
            train_stage2(Stage2Config(features=str(tmp_path / "missing.h5"), out=str(out), omega_init=omega_init,
                                      progress=False))
        assert not out.exists()


def test_command_line_resume_alone_reads_the_run_options(feats, tmp_path, monkeypatch):
    """``afg_train.py --out <run> --resume``, no other flag: the run's config.json supplies the
    options (its feature file included) and the run finishes as the uninterrupted one."""
    import glag.stage2 as s2
    from tools import afg_train

    args = ["--features", str(feats), "--epochs", "4", "--omega-init", "0.6", "--lr", "0.02", "--batch-size", "64",
            "--backend", "torch", "--no-progress", "--no-plots"]
    assert afg_train.main(args + ["--out", str(tmp_path / "full")]) == 0
    real = s2.EpochBuilder.build

    def stop_at_epoch_2(self, epoch, omega):
        if epoch >= 2:
            raise KeyboardInterrupt
        return real(self, epoch, omega)
    monkeypatch.setattr(s2.EpochBuilder, "build", stop_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        afg_train.main(args + ["--out", str(tmp_path / "part")])
    monkeypatch.setattr(s2.EpochBuilder, "build", real)
    assert afg_train.main(["--out", str(tmp_path / "part"), "--resume", "--no-progress", "--no-plots"]) == 0
    full, part = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("full", "part"))
    assert part["stage2"] == full["stage2"]


@pytest.mark.parametrize("option,value,flag", [
    ("epochs", 0, "--epochs"), ("batch_size", -4, "--batch-size"), ("seed", -1, "--seed"),
    ("kd_beta", -1.0, "--kd-beta"),
    ("kd_temperature", 0.0, "--kd-temperature"), ("lr", -1.0, "--lr"), ("weight_decay", -1.0, "--weight-decay"),
    ("omega_step", -0.5, "--omega-step"), ("omega_margin", -1.0, "--omega-margin"), ("n_max", 0, "--n-max"),
    ("omega_workers", 0, "--omega-workers"), ("stream_block_rows", 0, "--stream-block-rows"),
    ("alpha", float("nan"), "--alpha"), ("omega_reference", "mean", "--omega-reference")])
def test_option_values_that_cannot_work_are_refused_before_any_folder(feats, tmp_path, option, value, flag):
    from glag.errors import UsageError

    out = tmp_path / "run"
    with pytest.raises(UsageError, match=f"^{flag} must be"):
        train_stage2(cfg(feats, out, **{option: value}))
    assert not out.exists()


def test_dc_keeps_a_given_omega_init():
    """--method dc: ω = k/(k+1) (DC's) by default, a number given with --omega-init wins."""
    assert Stage2Config(method="dc", k=2).resolved().omega_init == pytest.approx(2 / 3)
    assert Stage2Config(method="dc", k=2, omega_init=0.3).resolved().omega_init == 0.3


def test_unsuitable_feature_files_are_refused_before_any_folder(tmp_path):
    """Empty val, a class with no training sample, fewer head classes than --k: a clear error
    naming the fix, and no run folder (for --omega-init auto too, whose candidates run later)."""
    from glag.errors import UsageError

    empty_val = _plain_h5py_file(tmp_path / "empty_val.h5", [200, 150, 40, 10, 4], per_class={"val": 0})
    no_class = _plain_h5py_file(tmp_path / "no_class.h5", [200, 150, 40, 10, 0])
    two_heads = _plain_h5py_file(tmp_path / "two_heads.h5", [200, 150, 40, 10, 4])
    for path, kw, match in [(empty_val, {}, "the val split is empty"),
                            (no_class, {}, r"1 class\(es\) have no training sample \(ids \[4\]\)"),
                            (two_heads, dict(k=3), "--k 3: .* has 2 head class"),
                            (two_heads, dict(head_threshold=250), r"no head class: --head-threshold 250 .*"
                                                                   r"largest class has \(200\).* e\.g\. to 100"),
                            (empty_val, dict(omega_init="auto"), "the val split is empty")]:
        out = tmp_path / "run"
        with pytest.raises(UsageError, match=match):
            train_stage2(cfg(path, out, **kw))
        assert not out.exists()
    # features that are not post-ReLU meet the Tukey transform when first loaded: refused by name,
    # and nothing left behind, by a single run or by --omega-init auto's candidates
    negative = _plain_h5py_file(tmp_path / "negative.h5", [200, 150, 40, 10, 4])
    with h5py.File(negative, "r+") as f:
        f["train/features"][3, 2] = -0.5
    for kw in (dict(omega_init=0.6), dict(omega_init="auto", omega_grid=(0.6, 0.0))):
        out = tmp_path / "run"
        with pytest.raises(UsageError, match=r"1 of \d+ entries of x \+ eps are negative.*--tukey-lambda 1"):
            train_stage2(cfg(negative, out, **kw))
        assert not out.exists()


def test_empty_test_split_is_skipped_with_a_warning(tmp_path, caplog):
    path = _plain_h5py_file(tmp_path / "empty_test.h5", [200, 150, 40, 10, 4], per_class={"test": 0})
    with caplog.at_level(logging.WARNING, logger="glag.stage2"):
        m = train_stage2(cfg(path, tmp_path / "run", epochs=3))
    assert set(m["stage2"]) == {"val"} and m["stage2"]["val"]["top1"] > 50.0  # chance: 20 %
    assert any("test split is empty" in r.message for r in caplog.records)


def test_auto_resume_refuses_other_options(feats, tmp_path):
    """--omega-init auto, resumed: the options are compared as for a single run (here after the
    run finished; candidates trained with different options would be mixed otherwise)."""
    from glag.errors import UsageError

    c = cfg(feats, tmp_path / "auto", epochs=2, omega_grid=(0.6, 0.0))
    train_stage2(c)
    before = (tmp_path / "auto" / "config.json").read_text()
    with pytest.raises(UsageError, match=r"--lr: 0\.05 in the run, 0\.2 now"):
        train_stage2(dataclasses.replace(c, lr=0.2), resume=True)
    assert (tmp_path / "auto" / "config.json").read_text() == before


def test_auto_resume_checks_every_candidates_features_and_epochs(feats, tmp_path):
    """--omega-init auto, resumed with another feature file: refused (a selection across two files
    compared unrelated scores), for the finished run and for one stopped between candidates. With
    more --epochs, the finished candidates are continued too (they kept their old length)."""
    from glag.errors import UsageError

    other = write_synthetic_features(tmp_path / "other.h5", COUNTS, 16, val_per_class=20, test_per_class=40, seed=4)
    out = tmp_path / "auto"
    c = cfg(feats, out, epochs=2, omega_grid=(0.6, 0.0))
    train_stage2(c)
    for gone in ([], ["metrics.json", "omega_init/0"]):  # finished; stopped after candidate 0.6
        for name in gone:
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
        before = sorted(p.relative_to(out) for p in out.rglob("*"))
        with pytest.raises(UsageError, match=r"trained on other features \(fingerprint [0-9a-f]+\) than .*other\.h5"):
            train_stage2(dataclasses.replace(c, features=str(other)), resume=True)
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    train_stage2(c, resume=True)  # the same --features again: finishes candidate 0
    # fewer epochs than trained: refused before anything is written (it used to warn, then write
    # the new length into config.json, then refuse)
    snapshot = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(UsageError, match="has trained 2 epochs already; --epochs 1 is fewer"):
        train_stage2(dataclasses.replace(c, epochs=1), resume=True)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    # a continuation to 3 epochs stopped inside candidate 0.6 (its config already says 3, its
    # metrics.json is the 2-epoch one): the next resume continues it, it is not taken as finished
    import glag.stage2 as s2

    real = s2.EpochBuilder.build

    def stop_at_epoch_3(self, epoch, omega):
        if epoch >= 2:
            raise KeyboardInterrupt
        return real(self, epoch, omega)
    s2.EpochBuilder.build = stop_at_epoch_3
    try:
        with pytest.raises(KeyboardInterrupt):
            train_stage2(dataclasses.replace(c, epochs=3), resume=True)
    finally:
        s2.EpochBuilder.build = real
    assert json.loads((out / "omega_init" / "0.6" / "config.json").read_text())["epochs"] == 3
    m = train_stage2(dataclasses.replace(c, epochs=3), resume=True)
    for w in ("0.6", "0"):
        assert json.loads((out / "omega_init" / w / "config.json").read_text())["epochs"] == 3
        assert len((out / "omega_init" / w / "summary.csv").read_text().strip().splitlines()) == 1 + 3
        assert torch.load(out / "omega_init" / w / "last.pt", weights_only=True)["epoch"] == 3
    assert json.loads((out / "config.json").read_text())["epochs"] == 3 and m["best_epoch"] <= 3


def test_damaged_checkpoint_is_named_with_the_fix(feats, tmp_path):
    """A truncated last.pt (damaged outside glag: its writes are atomic) is refused by name with
    what to do, not a bare OSError; following the advice finishes the run."""
    from glag.errors import UsageError

    c = cfg(feats, tmp_path / "run", epochs=2, omega_init=0.6)
    _run_epochs(c, 1)
    last = tmp_path / "run" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(UsageError, match=r"last\.pt is not a readable checkpoint .* delete it and resume"):
        train_stage2(c, resume=True)
    last.unlink()
    assert train_stage2(c, resume=True)["best_epoch"] in (1, 2)


def test_resume_to_more_epochs_is_recorded_and_fewer_is_refused(feats, tmp_path):
    from glag.errors import UsageError

    c = cfg(feats, tmp_path / "run", epochs=2, omega_init=0.6)
    train_stage2(c)
    train_stage2(dataclasses.replace(c, epochs=4), resume=True)
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["epochs"] == 4
    assert len((run / "summary.csv").read_text().strip().splitlines()) == 1 + 4
    with pytest.raises(UsageError, match="has trained 4 epochs already; --epochs 3 is fewer"):
        train_stage2(dataclasses.replace(c, epochs=3), resume=True)


def test_resume_from_another_folder_finds_relative_features(feats, tmp_path, monkeypatch):
    """--features given relative to where the run started: the run stores it absolute, so
    ``--out <run> --resume`` from any folder finds it."""
    from tools import afg_train

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "feats.h5").write_bytes(feats.read_bytes())
    monkeypatch.chdir(tmp_path / "a")
    c = cfg("feats.h5", "run", epochs=3, omega_init=0.6)
    _run_epochs(c, 1)
    saved = json.loads((tmp_path / "a" / "run" / "config.json").read_text())
    assert saved["features"] == str(tmp_path / "a" / "feats.h5")
    monkeypatch.chdir(tmp_path)
    assert afg_train.main(["--out", "a/run", "--resume", "--no-progress", "--no-plots"]) == 0
    assert json.loads((tmp_path / "a" / "run" / "metrics.json").read_text())["best_epoch"] >= 1


def test_command_line_prints_user_errors_and_interrupts_without_a_traceback(feats, tmp_path, monkeypatch, capsys):
    import glag.stage2 as s2
    from tools import afg_train

    assert afg_train.cli(["--features", str(feats), "--out", str(tmp_path / "r"), "--epochs", "0"]) == 2
    err = capsys.readouterr().err
    assert "error: --epochs must be an integer >= 1, got 0" in err and "Traceback" not in err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(s2, "_fit", interrupted)
    assert afg_train.cli(["--features", str(feats), "--out", str(tmp_path / "r"), "--omega-init", "0.6",
                          "--no-progress", "--no-plots"]) == 130
    assert "interrupted; what was finished is kept: continue with --out" in capsys.readouterr().err
