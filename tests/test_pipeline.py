"""tools/pipeline.py and tools/experiment.py on a tiny fake Fashion-MNIST: options checked before
any stage runs, finished stages reused only with the options they were made with."""
import json

import pytest

from glag.errors import UsageError
from test_faults import make_fake_fmnist
from tools import experiment, pipeline

S1 = ("--n-max 30 --imbalance-factor 10 --val-per-class 5 --arch resnet20 --batch-size 16 --eval-batch-size 64 "
      "--epochs 1 --threads 1")
S2 = "--epochs 1 --head-threshold 15 --omega-init 0.6"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_fake_fmnist(tmp_path_factory.mktemp("fm") / "fmnist")


def run_pipeline(root, out, *extra, s1=S1, s2=S2):
    return pipeline.main(["--out", str(out), "--data-root", str(root), "--stage2-methods", "crt", "--no-progress",
                          "--stage1-args", s1, "--stage2-args", s2, *extra])


def test_pipeline_reuses_finished_stages_only_with_their_options(root, tmp_path, capsys):
    out = tmp_path / "p"
    assert run_pipeline(root, out) == 0
    first = json.loads((out / "crt" / "metrics.json").read_text())
    stamp = (out / "stage1" / "metrics.json").stat().st_mtime_ns
    assert run_pipeline(root, out) == 0  # all finished: nothing runs again, the same table
    assert (out / "stage1" / "metrics.json").stat().st_mtime_ns == stamp
    assert json.loads((out / "crt" / "metrics.json").read_text()) == first
    for extra, s1, s2, named in [(("--seed", "1"), S1, S2, "--seed: 0 in the run, 1 now"),
                                 (("--loss", "ce"), S1, S2, "--loss: 'graloss' in the run, 'ce' now"),
                                 ((), S1.replace("--epochs 1", "--epochs 3"), S2, "--epochs: 1 in the run, 3 now"),
                                 ((), S1, S2 + " --lr 0.2", "--lr: 0.05 in the run, 0.2 now")]:
        with pytest.raises(UsageError, match=named):
            run_pipeline(root, out, *extra, s1=s1, s2=s2)
    assert (out / "stage1" / "metrics.json").stat().st_mtime_ns == stamp


def test_pipeline_refuses_features_of_a_redone_stage_one(root, tmp_path):
    """Stage one redone (its folder deleted, as the pipeline's message advises, then run with other
    options): the kept feats.h5 and the stage-two runs made from it are the old model's and are
    refused, each naming what to delete; deleting them redoes them from the new checkpoint."""
    import shutil

    out = tmp_path / "p"
    assert run_pipeline(root, out) == 0
    old = json.loads((out / "crt" / "metrics.json").read_text())
    shutil.rmtree(out / "stage1")
    s1 = S1.replace("--epochs 1", "--epochs 2")
    with pytest.raises(UsageError, match=r"feats\.h5 was extracted from another stage-one checkpoint .* Delete "
                                         r".*feats\.h5 and .*crt to redo them"):
        run_pipeline(root, out, s1=s1)
    (out / "feats.h5").unlink()
    with pytest.raises(UsageError, match=r"crt was trained on other features .* Delete .*crt to redo it"):
        run_pipeline(root, out, s1=s1)
    shutil.rmtree(out / "crt")
    assert run_pipeline(root, out, s1=s1) == 0
    new = json.loads((out / "crt" / "metrics.json").read_text())
    assert new["stage1"] != old["stage1"]  # the table now reports the new stage one


@pytest.mark.parametrize("s1,s2,match", [
    (S1 + " --out elsewhere", S2, "--stage1-args may not set --out"),
    (S1 + " --seed=5", S2, "--stage1-args may not set --seed=5"),
    (S1, S2 + " --method dc", "--stage2-args may not set --method"),
    ("--lr '0.1", S2, "--stage1-args .*No closing quotation"),
    (S1, "--epochs 0", "--epochs must be an integer >= 1, got 0"),  # stage two's, refused before stage one runs
    (S1 + " --warmup-epochs 1", S2, "--warmup-epochs 1 must be below --epochs 1: .*lower --warmup-epochs"),
])
def test_pipeline_refuses_bad_stage_options_before_any_stage_runs(root, tmp_path, s1, s2, match):
    out = tmp_path / "p"
    with pytest.raises(UsageError, match=match):
        run_pipeline(root, out, s1=s1, s2=s2)
    assert not out.exists()


def test_experiment_statistics_need_distinct_seeds():
    """One seed: no spread (n/a, not ± 0.00); a seed given twice is refused."""
    table = {"ce (stage one)": {c: (50.0, None, 1) for c in experiment.COLUMNS}}
    assert "50.00 ± n/a" in experiment.to_markdown(table, "t")
    with pytest.raises(UsageError, match="--seeds 0 0: a seed may appear once"):
        experiment.main(["--seeds", "0", "0", "--out", "unused"])
