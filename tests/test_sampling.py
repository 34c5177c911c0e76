"""The calibrated sampler (glag.sampling): factors, moments, RNG agreement, modes, backends.

METHOD.md, "Sampling without a Cholesky per sample": x = mu' + sum_i sqrt(w_i) F_i z_i + e has
covariance Sigma' = sum_i w_i Sigma_i + alpha (1 1^T, mode "all" | I, mode "diag").
"""
import logging
import os
import sys

import numpy as np
import pytest
import torch

from glag import sampling
from glag.sampling import FactorBank, class_factor, sample_calibrated

CPU_BACKENDS = ["numba", "torch"]


def _problem(d=7, ns=(1, 4, 12, 30), m=5, k=3, seed=0, counts=None):
    """A small bank (class sizes ``ns``: r = 0, n <= d and n > d factors) and seed rows."""
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(n, d, generator=g) * (0.5 + j) for j, n in enumerate(ns)]
    bank = FactorBank.from_factors([class_factor(x) for x in feats])
    mu = torch.randn(m, d, generator=g) * 3
    support = torch.stack([torch.randperm(len(ns), generator=g)[:k] for _ in range(m)])
    w = torch.rand(m, k, generator=g) + 0.1
    w = w / w.sum(1, keepdim=True)
    if counts is None:
        counts = torch.randint(0, 40, (m,), generator=g)
    labels = torch.arange(m) * 10 + 3
    return bank, mu, support, w, torch.as_tensor(counts), labels, feats


def _dense_cov(bank, support_row, w_row, alpha, mode, d):
    """Sigma' = sum_i w_i F_i F_i^T + alpha (1 1^T or I), float64 (METHOD.md, Calibration)."""
    cov = torch.zeros(d, d, dtype=torch.float64)
    for j, wj in zip(support_row.tolist(), w_row.tolist()):
        f = bank.factor(j).double()
        cov += wj * f @ f.T
    extra = torch.ones(d, d) if mode == "all" else torch.eye(d)
    return cov + alpha * extra.double()


# ------------------------------------------------------------------ factors and the bank
def test_class_factor_n_le_d_is_centered_data():
    x = torch.randn(5, 9, dtype=torch.float64)
    f = class_factor(x)
    assert f.shape == (9, 5) and f.dtype == torch.float32
    torch.testing.assert_close((f.double() @ f.double().T), torch.cov(x.T), rtol=1e-5, atol=1e-6)


def test_class_factor_n_gt_d_is_lower_cholesky():
    x = torch.randn(50, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    f = class_factor(x)
    assert f.shape == (6, 6)
    assert torch.equal(f, torch.tril(f))
    torch.testing.assert_close(f.double() @ f.double().T, torch.cov(x.T), rtol=1e-5, atol=1e-5)


def test_class_factor_single_sample_has_rank_zero():
    f = class_factor(torch.randn(1, 4))
    assert f.shape == (4, 0)


def test_class_factor_singular_covariance_gets_logged_jitter(caplog):
    x = torch.randn(40, 5, dtype=torch.float64)
    x[:, 2] = 0.0  # a dead ReLU unit: zero variance
    with caplog.at_level(logging.WARNING, logger="glag.sampling"):
        f = class_factor(x)
    assert "jitter" in caplog.text
    assert torch.isfinite(f).all()
    torch.testing.assert_close(f.double() @ f.double().T, torch.cov(x.T), rtol=1e-4, atol=1e-6)


def test_factor_bank_packs_factors():
    fs = [torch.randn(4, 3), torch.zeros(4, 0), torch.randn(4, 4)]
    bank = FactorBank.from_factors(fs)
    assert bank.data.shape == (4, 7) and bank.data.dtype == torch.float32
    assert bank.offsets.tolist() == [0, 3, 3, 7]
    assert bank.ranks.tolist() == [3, 0, 4] and bank.num_classes == 3 and bank.dim == 4
    torch.testing.assert_close(bank.factor(2), fs[2])
    torch.testing.assert_close(bank.transposed("cpu"), bank.data.T)
    t4, o4 = bank.transposed_padded("cpu", 4)
    assert o4.tolist() == [0, 4, 4, 8] and t4.shape == (8, 4)
    torch.testing.assert_close(t4[[0, 1, 2, 4, 5, 6, 7]], bank.data.T)
    assert (t4[3] == 0).all()
    with pytest.raises(ValueError):
        FactorBank.from_factors([torch.randn(4, 2), torch.randn(5, 2)])


# ------------------------------------------------------------------ moments (10^5 samples)
def bench_lowrank(bank, mu, support, w, counts, labels, alpha, mode, graph=False):
    """The benchmark's plain-torch low-rank baseline (glag-bench ``torch-lowrank``, or with
    ``graph`` its CUDA-graph replay) on these inputs: (x, its run function)."""
    from glag.tools import bench_kernel

    job = bench_kernel.Job("test", mu.shape[1], support.shape[1], bank, mu, support, w, counts, labels,
                           int(counts.sum()), len(counts), alpha, mode)
    run = bench_kernel.make_lowrank(job, graph=graph)
    if graph:
        run()
        return run.out, run
    seed_of, groups = bench_kernel.lowrank_plan(job)
    out = torch.empty(job.n, job.d, device=mu.device)
    return bench_kernel.lowrank_draw(job, out, seed_of, groups), run


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["bench-lowrank"])
@pytest.mark.parametrize("mode,alpha", [("all", 0.0), ("all", 0.1), ("diag", 0.1)])
def test_moments_match_calibrated_mean_and_covariance(backend, mode, alpha):
    """1e5 samples of one seed row: mean -> mu', covariance -> Sigma', within statistical error.

    Support: one class with n_c > d (Cholesky factor), one with n_c <= d (centred data).
    ``bench-lowrank``: the benchmark's plain-torch baseline draws from the same distribution.
    """
    d, n = 6, 100_000
    bank, mu, _, _, _, _, _ = _problem(d=d, ns=(40, 4), m=1)
    support = torch.tensor([[0, 1]])
    w = torch.tensor([[0.7, 0.3]])
    if backend == "bench-lowrank":
        torch.manual_seed(0)
        x, run = bench_lowrank(bank, mu, support, w, torch.tensor([n]), torch.tensor([9]), alpha, mode)
        assert run() == n
    else:
        x, y = sample_calibrated(bank, mu, support, w, torch.tensor([n]), torch.tensor([9]),
                                 alpha=alpha, mode=mode, seed=123, backend=backend)
        assert (y == 9).all()
    assert x.shape == (n, d)
    cov = _dense_cov(bank, support[0], w[0], alpha, mode, d).numpy()
    xs = x.double().numpy()
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(xs.mean(0) - mu[0].double().numpy()) < 5 * se)
    emp = np.cov(xs, rowvar=False)
    sd = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)  # sd of a covariance entry
    assert np.all(np.abs(emp - cov) < 5 * sd)


def test_alpha_modes_shape_the_noise():
    """With no factors, x - mu' is alpha's noise alone: one shared scalar ("all") or i.i.d. ("diag")."""
    d, n, alpha = 5, 20_000, 0.25
    bank = FactorBank.from_factors([torch.zeros(d, 0)])
    mu = torch.zeros(1, d)
    args = (bank, mu, torch.tensor([[0]]), torch.tensor([[1.0]]), torch.tensor([n]), torch.tensor([0]))
    e_all, _ = sample_calibrated(*args, alpha=alpha, mode="all", seed=5, backend="numba")
    e_diag, _ = sample_calibrated(*args, alpha=alpha, mode="diag", seed=5, backend="numba")
    assert torch.equal(e_all, e_all[:, :1].expand(n, d))  # the same scalar on every component
    assert abs(e_all[:, 0].var().item() - alpha) < 5 * alpha * np.sqrt(2 / n)
    c = np.cov(e_diag.double().numpy(), rowvar=False)
    assert np.abs(c - alpha * np.eye(d)).max() < 5 * alpha * np.sqrt(2 / n)
    zero, _ = sample_calibrated(*args, alpha=0.0, mode="diag", seed=5, backend="numba")
    assert torch.equal(zero, torch.zeros(n, d))


# ------------------------------------------------------------------ exact RNG agreement
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode,alpha", [("all", 0.0), ("all", 0.1), ("diag", 0.2)])
def test_numba_matches_reference(k, mode, alpha):
    """Same seed -> same samples on numba and the float64 reference, to float32 rounding.

    The bank has r = 0 (n_c = 1), n_c <= d (r not a multiple of 4) and n_c > d factors.
    """
    bank, mu, support, w, counts, labels, _ = _problem(d=13, ns=(1, 6, 13, 40, 9), m=9, k=k)
    counts[2] = 0  # a seed row that draws nothing
    seed = 2**40 + 17
    xr, yr = sample_calibrated(bank, mu, support, w, counts, labels, alpha, mode, seed, backend="torch")
    xn, yn = sample_calibrated(bank, mu, support, w, counts, labels, alpha, mode, seed, backend="numba")
    assert torch.equal(yr, yn)
    assert xn.dtype == torch.float32 and xn.shape == xr.shape == (int(counts.sum()), 13)
    rel = (xn - xr).abs().max() / xr.abs().max()
    assert rel <= 1e-5, rel


@pytest.mark.parametrize("mode,alpha", [("all", 0.3), ("diag", 0.2), ("diag", 0.0)])
def test_numba_rows_the_first_slot_does_not_write(mode, alpha):
    """mu' + e_s is written by the first slot's tasks; rows whose first support has rank 0
    (n_c = 1), and every row when k = 0, are written apart. Both must match the reference."""
    bank, mu, support, w, counts, labels, _ = _problem(d=9, ns=(1, 6, 13, 40), m=6, k=2, counts=[5, 3, 0, 7, 2, 4])
    support[:, 0] = torch.tensor([0, 2, 0, 0, 3, 0])  # class 0 has rank 0: rows of seeds 0, 3, 5 uncovered
    support[:, 1] = torch.tensor([1, 3, 1, 2, 1, 3])
    assert bank.ranks[0] == 0
    for sup, ww in ((support, w), (support[:, :0], w[:, :0])):
        xr, _ = sample_calibrated(bank, mu, sup, ww, counts, labels, alpha, mode, 21, backend="torch")
        xn, _ = sample_calibrated(bank, mu, sup, ww, counts, labels, alpha, mode, 21, backend="numba")
        rel = (xn - xr).abs().max() / xr.abs().max()
        assert rel <= 1e-5, (sup.shape, rel)
    # k = 0 is the mean plus the dispersion alone
    x0, _ = sample_calibrated(bank, mu, support[:, :0], w[:, :0], counts, labels, 0.0, mode, 21, backend="numba")
    assert torch.equal(x0, torch.repeat_interleave(mu, counts, 0))


def test_numba_matches_reference_larger_d_and_tiles():
    """d = 70, class sizes around d, several GEMM tiles per group (tile = 256 rows)."""
    bank, mu, support, w, counts, labels, _ = _problem(d=70, ns=(50, 70, 71, 200), m=6, k=2,
                                                       counts=[300, 5, 0, 600, 1, 77])
    xr, _ = sample_calibrated(bank, mu, support, w, counts, labels, 0.1, "diag", 3, backend="torch")
    from glag.kernels import cpu

    out = np.empty(tuple(xr.shape), np.float32)
    bank4, offsets4 = bank.transposed_padded("cpu", 4)
    cpu.sample_numba(bank4.numpy(), offsets4.numpy(), mu.numpy(), support.numpy(),
                     w.numpy(), counts.numpy(), out, alpha=0.1, mode="diag", seed=3, tile=256)
    rel = (torch.from_numpy(out) - xr).abs().max() / xr.abs().max()
    assert rel <= 1e-5, rel


def test_layout_labels_and_determinism():
    bank, mu, support, w, counts, labels, _ = _problem(counts=[3, 0, 2, 4, 1])
    x, y = sample_calibrated(bank, mu, support, w, counts, labels, 0.1, "all", seed=11)
    assert y.tolist() == [3] * 3 + [23] * 2 + [33] * 4 + [43]  # seed rows contiguous, in order
    x2, _ = sample_calibrated(bank, mu, support, w, counts, labels, 0.1, "all", seed=11)
    x3, _ = sample_calibrated(bank, mu, support, w, counts, labels, 0.1, "all", seed=12)
    assert torch.equal(x, x2) and not torch.allclose(x, x3)
    # the samples of a row depend on their global index, not on the rest of the call
    x4, _ = sample_calibrated(bank, mu[:1], support[:1], w[:1], counts[:1], labels[:1], 0.1, "all", seed=11)
    assert torch.equal(x4, x[:3])


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``address`` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_numba_fresh_output_does_not_ask_for_huge_pages():
    """A large fresh output is a private mapping of its own without MADV_HUGEPAGE (numpy's large
    arrays carry it, and with THP defrag = madvise it makes the kernel compact memory on the spot:
    cpu.empty_output); small ones are plain arrays. Both work as torch tensors, written in place."""
    from glag.kernels import cpu

    mid = 8 << 20  # numpy advises the 2 MiB-aligned part of the array: look inside it
    big = np.empty((4096, 1024), np.float32)  # 16 MiB: numpy asks for huge pages
    if "hg" not in _vm_flags(big.ctypes.data + mid):
        pytest.skip("this numpy does not madvise huge pages: nothing to compare against")
    out = cpu.empty_output(4096, 1024)
    assert out.shape == (4096, 1024) and out.dtype == np.float32 and out.flags.c_contiguous and out.flags.writeable
    for at in (0, mid, out.nbytes - 4):
        flags = _vm_flags(out.ctypes.data + at)
        assert "hg" not in flags and "sh" not in flags, (at, flags)  # private, no huge-page request
    t = torch.from_numpy(out)
    t[-1, -1] = 2.5
    assert out[-1, -1] == 2.5
    small = cpu.empty_output(3, 5)  # below 4 MiB: a plain array
    assert small.shape == (3, 5) and small.dtype == np.float32


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_call(backend):
    bank, mu, support, w, _, labels, _ = _problem()
    x, y = sample_calibrated(bank, mu, support, w, torch.zeros(5, dtype=torch.int64), labels, backend=backend)
    assert x.shape == (0, 7) and y.shape == (0,)


def test_input_validation():
    bank, mu, support, w, counts, labels, _ = _problem()
    with pytest.raises(ValueError, match="mode"):
        sample_calibrated(bank, mu, support, w, counts, labels, mode="full")
    with pytest.raises(ValueError, match="alpha"):
        sample_calibrated(bank, mu, support, w, counts, labels, alpha=-1.0)
    with pytest.raises(ValueError, match="support"):
        sample_calibrated(bank, mu, support + 10, w, counts, labels)
    with pytest.raises(ValueError, match="weights"):
        sample_calibrated(bank, mu, support, -w, counts, labels)
    with pytest.raises(ValueError, match="d ="):
        sample_calibrated(bank, mu[:, :3], support, w, counts, labels)
    # numpy inputs, and floats where integers belong (counts were truncated, float support ran
    # on numba but crashed the reference), are refused by name
    with pytest.raises(TypeError, match=r"mu must be a torch.Tensor, got ndarray \(torch.as_tensor\(mu\)"):
        sample_calibrated(bank, mu.numpy(), support, w, counts, labels)
    for name, args in (("counts", (support, counts + 0.9, labels)), ("support", (support.double(), counts, labels)),
                       ("labels", (support, counts, labels.float()))):
        with pytest.raises(TypeError, match=rf"{name} must hold integers \(int64\), got torch.float"):
            sample_calibrated(bank, mu, args[0], w, *args[1:])
    with pytest.raises(TypeError, match="seed must be an integer, got 1.7"):
        sample_calibrated(bank, mu, support, w, counts, labels, seed=1.7)
    with pytest.raises(TypeError, match="class_factor needs a torch.Tensor, got ndarray"):
        class_factor(np.ones((3, 2)))
    with pytest.raises(ValueError, match="NaN or inf"):
        class_factor(torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [0.0, 1.0]]))
    with pytest.raises(TypeError, match="bank must be a FactorBank"):
        sample_calibrated(bank.data, mu, support, w, counts, labels)
    x, _ = sample_calibrated(bank, mu, support.int(), w, counts.int(), labels.int(), seed=np.uint64(3))
    assert torch.equal(x, sample_calibrated(bank, mu, support, w, counts, labels, seed=3)[0])


def test_numba_follows_the_bank_after_edits():
    """The numba backend's cached transposed bank follows in-place torch edits by itself, and
    edits made through numpy (invisible to torch's version counter) after clear_cache()."""
    bank, mu, support, w, counts, labels, _ = _problem(d=9, ns=(3, 10, 40))

    def both():
        return [sample_calibrated(bank, mu, support, w, counts, labels, 0.1, "diag", 4, backend=b)[0]
                for b in CPU_BACKENDS]

    x0, _ = both()
    bank.data.mul_(10.0)
    xn, xt = both()
    assert torch.allclose(xn, xt, rtol=1e-5, atol=1e-4) and not torch.allclose(xn, x0, atol=1.0)
    bank.data.numpy()[:] *= 0.5
    bank.clear_cache()
    xn, xt = both()
    assert torch.allclose(xn, xt, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_buffer_gets_the_samples_in_place(backend):
    """``out=``: the same samples, written into the given rows of a bigger buffer, nothing else touched."""
    bank, mu, support, w, counts, labels, _ = _problem(d=9, ns=(1, 6, 13, 40), m=6, k=2, counts=[5, 3, 0, 7, 2, 4])
    x, y = sample_calibrated(bank, mu, support, w, counts, labels, 0.2, "diag", 5, backend=backend)
    n = int(counts.sum())
    buf = torch.full((n + 7, 9), -123.0)
    xo, yo = sample_calibrated(bank, mu, support, w, counts, labels, 0.2, "diag", 5, backend=backend,
                               out=buf[3:3 + n])
    assert xo.data_ptr() == buf[3:3 + n].data_ptr()  # out itself, no copy made
    assert torch.equal(xo, x) and torch.equal(yo, y)
    assert (buf[:3] == -123.0).all() and (buf[3 + n:] == -123.0).all()
    # an empty call leaves an empty out as it is
    xe, _ = sample_calibrated(bank, mu, support, w, torch.zeros(6, dtype=torch.int64), labels, backend=backend,
                              out=buf[:0])
    assert xe.shape == (0, 9)


def test_out_buffer_validation():
    bank, mu, support, w, counts, labels, _ = _problem()
    n = int(counts.sum())
    cases = [
        (torch.empty(n + 1, 7), r"out must be \(N=%d, d=7\)" % n),
        (torch.empty(n, 7, dtype=torch.float64), "out must be float32"),
        (torch.empty(7, n).t(), "C-contiguous"),
        (torch.empty(n, 7, requires_grad=True), "grad"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            sample_calibrated(bank, mu, support, w, counts, labels, out=bad)
    with pytest.raises(TypeError, match="torch.Tensor"):
        sample_calibrated(bank, mu, support, w, counts, labels, out=np.empty((n, 7), np.float32))


# ------------------------------------------------------------------ backend choice
@pytest.fixture
def fresh_backends(monkeypatch):
    """Forget the probed availability and the once-only log messages."""
    monkeypatch.setattr(sampling, "_availability", {})
    monkeypatch.setattr(sampling, "_logged", set())
    monkeypatch.delenv(sampling.ENV_BACKEND, raising=False)
    return monkeypatch


def test_fallback_when_cupy_is_missing(fresh_backends, caplog):
    fresh_backends.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    fresh_backends.setenv(sampling.ENV_BACKEND, "cuda")
    assert "cuda" not in sampling.available_backends()
    with caplog.at_level(logging.INFO, logger="glag.sampling"):
        assert sampling.resolve_backend() == "numba"
        assert sampling.resolve_backend() == "numba"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # logged once, not silent
    assert "falling back to 'numba'" in warnings[0].getMessage() and "CuPy" in warnings[0].getMessage()
    # and a full call with the forced backend still samples
    bank, mu, support, w, counts, labels, _ = _problem()
    x, _ = sample_calibrated(bank, mu, support, w, counts, labels, seed=1)
    xr, _ = sample_calibrated(bank, mu, support, w, counts, labels, seed=1, backend="torch")
    assert (x - xr).abs().max() / xr.abs().max() <= 1e-5


def test_fallback_to_torch_when_numba_is_missing(fresh_backends, caplog):
    fresh_backends.setitem(sys.modules, "cupy", None)
    fresh_backends.setitem(sys.modules, "glag.kernels.cpu", None)
    with caplog.at_level(logging.INFO, logger="glag.sampling"):
        assert sampling.available_backends() == ["torch"]
        assert sampling.resolve_backend("numba") == "torch"
        assert sampling.resolve_backend(None) == "torch"
    assert "falling back to 'torch'" in caplog.text
    assert "backend: torch (auto" in caplog.text


def test_env_forces_backend_and_bad_names_fail(fresh_backends, caplog):
    fresh_backends.setenv(sampling.ENV_BACKEND, "torch")
    with caplog.at_level(logging.INFO, logger="glag.sampling"):
        assert sampling.resolve_backend() == "torch"
    assert "torch (requested)" in caplog.text
    assert sampling.resolve_backend("numba") == "numba"  # an explicit argument wins over the env
    fresh_backends.setenv(sampling.ENV_BACKEND, "fortran")
    with pytest.raises(ValueError, match="fortran"):
        sampling.resolve_backend()
    fresh_backends.setenv(sampling.ENV_BACKEND, " ")  # named as given, not as ''
    with pytest.raises(ValueError, match=r"unknown sampler backend ' ' \(from GLAG_SAMPLER_BACKEND\)"):
        sampling.resolve_backend()


def test_numba_without_scipy_blas_uses_loops(monkeypatch):
    """Without scipy (numba's np.dot needs it) the products run in plain loops: same numbers."""
    from glag.kernels import cpu

    monkeypatch.setitem(cpu._BLAS, "probed", True)
    monkeypatch.setitem(cpu._BLAS, "have_dot", False)
    monkeypatch.setitem(cpu._BLAS, "threads", None)
    bank, mu, support, w, counts, labels, _ = _problem(d=9, ns=(3, 9, 20), m=4, k=2, counts=[5, 0, 7, 2])
    x, _ = sample_calibrated(bank, mu, support, w, counts, labels, 0.1, "all", 5, backend="numba")
    xr, _ = sample_calibrated(bank, mu, support, w, counts, labels, 0.1, "all", 5, backend="torch")
    assert (x - xr).abs().max() / xr.abs().max() <= 1e-5


def test_blas_threads_pinned_during_the_call_and_restored():
    from glag.kernels import cpu

    threads = cpu._blas()["threads"]
    if threads is None:
        pytest.skip("no scipy OpenBLAS to pin here")
    get, put = threads
    before = get()
    with cpu._single_threaded_blas():
        assert get() == 1
    assert get() == before


@pytest.mark.parametrize("tool,args,named", [
    ("bench_kernel", ["--dims", "0"], "--dims: must be 1 or more, got 0"),
    ("bench_kernel", ["--work", "-5"], "--work: must be a finite number > 0, got -5"),
    ("bench_kernel", ["--alpha", "-1"], "--alpha: must be a finite number >= 0, got -1"),
    ("bench_kernel", ["--repeats", "0"], "--repeats: must be 1 or more, got 0"),
    ("bench_stage2", ["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),  # ran 40 epochs
    ("bench_stage2", ["--max-memory", "4Q"], "cannot read '4Q' as a memory size"),
    ("bench_stage2", ["--path", "."], "--path . is a folder"),
])
def test_benchmarks_refuse_bad_options_by_name(tool, args, named, tmp_path, monkeypatch, capsys):
    """The benchmark tools refuse values that cannot work with a message and exit status 2 (they
    raised ZeroDivisionError, ran forever or ran another value), before writing anything."""
    import importlib

    monkeypatch.chdir(tmp_path)
    mod = importlib.import_module(f"glag.tools.{tool}")
    with pytest.raises(SystemExit) as e:  # argparse's refusals exit 2 themselves
        rc = mod.cli(args)
        raise SystemExit(rc)
    assert e.value.code == 2 and named in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bench_kernel_tiny_run(tmp_path):
    """glag-bench end to end on a tiny job: table, JSON (every method, targets), plot."""
    import json

    from glag.tools import bench_kernel

    out = tmp_path / "bench.json"
    rc = bench_kernel.main(["--profiles", "cifar100-lt", "--dims", "16", "--ks", "2", "--work", "0.02",
                            "--repeats", "1", "--min-seconds", "0", "--dc-seconds", "0", "--dc-seeds", "2",
                            "--mvn-seeds", "4", "--ref-samples", "50", "--device", "cpu", "--no-progress",
                            "--settle", "0.01",
                            "--out", str(out), "--plot", str(tmp_path / "bench.png")])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["complete"] and len(res["results"]) == 1
    methods = res["results"][0]["methods"]
    assert {"dc-numpy", "torch-mvn", "torch-lowrank", "glag-numba", "glag-numba-fresh", "glag-torch",
            "gemm-numpy"} <= set(methods)
    assert res["settings"]["settle_s"] == 0.01
    assert methods["glag-numba"]["samples_per_s"] > 0 and "speedup" in methods["glag-numba"]
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_bench_cuda_target_for_every_tile_against_the_best_float32_torch():
    """The GPU target line is given for the default tile and for each other one timed, each over
    the fastest float32 torch method of the run (TF32 and d != 2048 not counted)."""
    from glag.tools import bench_kernel

    def res(d, rates):
        return {"profile": "imagenet-lt", "d": d, "k": 3,
                "methods": {n: {"samples_per_s": v} for n, v in rates.items()}}

    results = [res(512, {"glag-cuda": 9.0, "glag-cuda-128x256": 9.0, "torch-lowrank": 1.0}),
               res(2048, {"glag-cuda": 6.0, "glag-cuda-128x256": 9.0, "torch-mvn": 0.1, "torch-lowrank": 2.0,
                          "torch-lowrank-graph": 4.0, "torch-lowrank-tf32": 8.0})]
    targets = bench_kernel.check_targets(results)
    assert [(t["config"], t["value"], t["pass"], t["baseline"]) for t in targets] == [
        ("imagenet-lt d=2048 k=3", 1.5, False, "torch-lowrank-graph"),
        ("imagenet-lt d=2048 k=3 128x256", 2.25, True, "torch-lowrank-graph")]


def test_bench_cuda_tile_is_set_for_the_call_and_restored(monkeypatch):
    """``make_glag(cuda_tile=...)`` sets GLAG_CUDA_TILE only while its call runs."""
    from glag.kernels import cuda as kcuda
    from glag.tools import bench_kernel

    seen = []

    def sample(*args, **kwargs):  # stands in for the sampler: records the tile it would see
        seen.append(os.environ.get(kcuda.ENV_TILE))
        return torch.empty(3, 2), None

    monkeypatch.setattr("glag.sampling.sample_calibrated", sample)
    job = bench_kernel.build_job("cifar100-lt", 8, 2, 1e5, np.random.default_rng(0), torch.device("cpu"), 0.1, "all")
    monkeypatch.delenv(kcuda.ENV_TILE, raising=False)
    assert bench_kernel.make_glag(job, "cuda", cuda_tile="128x256")() == 3
    assert kcuda.ENV_TILE not in os.environ
    monkeypatch.setenv(kcuda.ENV_TILE, "64x256")
    bench_kernel.make_glag(job, "cuda", cuda_tile="128x256")()
    bench_kernel.make_glag(job, "cuda")()
    assert seen == ["128x256", "128x256", "64x256"] and os.environ[kcuda.ENV_TILE] == "64x256"


def test_bench_lowrank_graph_needs_cuda():
    bank, mu, support, w, counts, labels, _ = _problem()
    with pytest.raises(ValueError, match="CUDA graphs are GPU-only"):
        bench_lowrank(bank, mu, support, w, counts, labels, 0.1, "diag", graph=True)


def test_bench_leaves_out_a_graph_method_whose_capture_fails(capsys):
    """On the GPU, a failed CUDA-graph capture costs the run that method only, with a warning."""
    from glag.tools import bench_kernel

    def fails():
        raise RuntimeError("operation not permitted when stream is capturing")
    methods = {}
    bench_kernel._add_graphed(methods, "torch-lowrank-graph", fails)
    bench_kernel._add_graphed(methods, "gemm-torch-graph", lambda: "replay")
    assert methods == {"gemm-torch-graph": "replay"}
    assert "torch-lowrank-graph left out of this run" in capsys.readouterr().err
