"""Tests of glag.afg (stage-two AFG math) against slow, obviously correct references."""
import numpy as np
import pytest
import torch

from glag import afg


def _sampling():
    try:
        from glag import sampling
    except ImportError as e:
        pytest.skip(f"glag.sampling not importable yet ({e}); FactorBank / sampler tests skipped")
    return sampling


def _blobs(rs, counts, d, spread=20.0, noise=1.0):
    """Well separated Gaussian classes: centres far apart relative to the noise."""
    centres = rs.randn(len(counts), d) * spread
    x = np.concatenate([centres[c] + noise * rs.randn(n, d) for c, n in enumerate(counts)])
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.int64))


# ---------------------------------------------------------------------------- tukey (step 1)
def test_tukey_values_numpy_and_torch():
    x = np.array([[0.0, 0.25, 1.0, 4.0]], dtype=np.float32)
    for lam, ref in [(0.5, [0, 0.5, 1, 2]), (1.0, [0, 0.25, 1, 4]), (2.0, [0, 0.0625, 1, 16])]:
        out = afg.tukey(x, lam)
        assert isinstance(out, np.ndarray) and out.dtype == np.float32
        np.testing.assert_allclose(out[0], ref, rtol=1e-6)
        tout = afg.tukey(torch.from_numpy(x), lam)
        assert isinstance(tout, torch.Tensor) and tout.dtype == torch.float32
        np.testing.assert_allclose(tout.numpy()[0], ref, rtol=1e-6)
    pos = np.array([0.5, 1.0, 3.0], dtype=np.float32)
    np.testing.assert_allclose(afg.tukey(pos, 0), np.log(pos), rtol=1e-6)
    np.testing.assert_allclose(afg.tukey(torch.from_numpy(pos), 0.0).numpy(), np.log(pos), rtol=1e-6)
    np.testing.assert_allclose(afg.tukey(x, 0, eps=1e-3)[0], np.log(x[0] + 1e-3), rtol=1e-5)


def test_tukey_errors():
    neg = np.array([-1.0, -0.5, 2.0], dtype=np.float32)
    with pytest.raises(ValueError, match=r"2 of 3.*min -1.*post-ReLU.*integer"):
        afg.tukey(neg, 0.5)
    with pytest.raises(ValueError, match="post-ReLU"):
        afg.tukey(torch.from_numpy(neg), 0.5)
    with pytest.raises(ValueError, match="negative"):
        afg.tukey(neg, 0)
    np.testing.assert_allclose(afg.tukey(neg, 2), neg ** 2)  # integer power is fine
    np.testing.assert_allclose(afg.tukey(neg, 1), neg)
    zeros = np.array([0.0, 1.0], dtype=np.float32)
    with pytest.raises(ValueError, match=r"log\(0\).*lam > 0.*eps"):
        afg.tukey(zeros, 0)
    with pytest.raises(ValueError, match="eps"):
        afg.tukey(torch.from_numpy(zeros), -0.5)


# ----------------------------------------------------------------- class statistics (step 2)
def _stats_data():
    rs = np.random.RandomState(0)
    d = 4
    counts = [1, 3, 9]  # n_c = 1 (zero covariance), n_c < d, n_c > d
    x = rs.rand(sum(counts), d).astype(np.float32)
    y = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    perm = rs.permutation(len(y))  # labels not sorted
    return torch.from_numpy(x[perm]), torch.from_numpy(y[perm]), counts, d


def test_class_statistics_means_counts():
    x, y, counts, d = _stats_data()
    st = afg.class_statistics(x, y, 3, build_bank=False)
    assert st.means.dtype == torch.float32 and st.means.shape == (3, d)
    assert st.counts.dtype == torch.int64 and st.counts.tolist() == counts
    for c in range(3):
        np.testing.assert_allclose(st.means[c].numpy(), x[y == c].numpy().astype(np.float64).mean(0),
                                   rtol=1e-6, atol=1e-7)
    assert st.bank is None


def test_class_statistics_covariance_vs_numpy():
    _sampling()
    x, y, counts, d = _stats_data()
    st = afg.class_statistics(x, y, 3)
    for c in range(3):
        xc = x[y == c].numpy().astype(np.float64)
        ref = np.zeros((d, d)) if len(xc) == 1 else np.cov(xc, rowvar=False, ddof=1)
        np.testing.assert_allclose(st.covariance(c).numpy(), ref, atol=1e-5)


def test_class_statistics_errors():
    x = torch.rand(5, 3)
    with pytest.raises(ValueError, match=r"no training sample.*\[2\]"):
        afg.class_statistics(x, torch.tensor([0, 0, 1, 1, 3]), 4, build_bank=False)
    with pytest.raises(ValueError, match="labels must lie"):
        afg.class_statistics(x, torch.tensor([0, 0, 1, 1, 5]), 4, build_bank=False)
    # a NaN in a class of one sample (n <= d) used to give a NaN mean silently; in a class of
    # n > d, a Cholesky failure that never named the input
    y = torch.tensor([0, 0, 0, 0, 1])
    for row in (4, 2):
        bad = x.clone()
        bad[row, 1] = float("nan") if row == 4 else float("inf")
        with pytest.raises(ValueError, match=rf"feature row {row} \(class {int(y[row])}\) is NaN or inf"):
            afg.class_statistics(bad, y, 2)
        with pytest.raises(ValueError, match=rf"row {row - 2} \(class {int(y[row])}\) is NaN or inf"):
            afg.streaming_class_statistics(iter([(x[:2], y[:2]), (bad[2:], y[2:])]), 2, np.array([4, 1]))


# --------------------------------------------------------------------- head / tail (step 3)
def test_split_head_tail():
    counts = torch.tensor([500, 299, 120, 100, 40, 5])
    head, tail = afg.split_head_tail(counts)
    assert head.tolist() == [0, 1, 2]  # n_c > 100
    assert tail.tolist() == [1, 2, 3, 4, 5]  # n_c < n_max; 1 and 2 are both
    head, tail = afg.split_head_tail(counts, head_threshold=200, augment_below=100)
    assert head.tolist() == [0, 1] and tail.tolist() == [4, 5]
    with pytest.raises(ValueError, match="Lower head_threshold"):
        afg.split_head_tail(torch.tensor([50, 20, 3]))


# -------------------------------------------------------------------- support set (step 4)
def test_find_support_matches_bruteforce_and_excludes_own_class():
    rs = np.random.RandomState(1)
    d, k = 16, 3
    head_ids = torch.tensor([0, 2, 3, 5, 6, 7, 9])
    means = torch.from_numpy((rs.randn(10, d) * 10).astype(np.float32))
    # queries: noisy copies of class means, some of head classes (own class must be dropped)
    ql = torch.from_numpy(rs.randint(0, 10, size=200))
    q = means[ql] + torch.from_numpy(rs.randn(200, d).astype(np.float32))
    sup, d2 = afg.find_support(q, means[head_ids], head_ids, k, ql)
    ref_sup, ref_d2 = afg.find_support_bruteforce(q, means[head_ids], head_ids, k, ql)
    assert sup.dtype == torch.int64 and d2.dtype == torch.float32 and sup.shape == (200, k)
    assert torch.equal(sup, ref_sup)
    np.testing.assert_allclose(d2.numpy(), ref_d2.numpy(), rtol=1e-4)
    assert not (sup == ql[:, None]).any()
    assert (d2[:, 1:] >= d2[:, :-1]).all()
    assert set(sup.flatten().tolist()) <= set(head_ids.tolist())
    # explicit squared distances
    np.testing.assert_allclose(d2.numpy(), ((q[:, None] - means[sup]) ** 2).sum(-1).numpy(), rtol=1e-4)
    # a head-class query is excluded; a non-head query keeps its nearest
    sup_nolab, _ = afg.find_support(q, means[head_ids], head_ids, k, None)
    own_head = torch.isin(ql, head_ids)
    assert (sup_nolab[own_head, 0] == ql[own_head]).all()


def test_find_support_k_too_large():
    means = torch.rand(3, 4)
    ids = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="only 2 are available"):
        afg.find_support(torch.rand(2, 4), means, ids, 3, torch.tensor([1, 5]))
    sup, _ = afg.find_support(torch.rand(2, 4), means, ids, 3, torch.tensor([7, 5]))  # no own class
    assert sup.shape == (2, 3)
    import faiss
    if faiss.get_num_gpus() == 0:  # forcing the GPU index without one fails clearly
        with pytest.raises(RuntimeError, match="GPU"):
            afg.find_support(torch.rand(2, 4), means, ids, 1, None, use_gpu=True)


@pytest.mark.parametrize("search", [afg.find_support, afg.find_support_bruteforce])
def test_find_support_refuses_repeated_ids_nonfinite_rows_and_1d(search):
    """Repeated head ids (the own class could come back, out of order) and NaN/inf rows (FAISS and
    the oracle disagree on them) are refused by both searches, naming the problem."""
    hm = torch.tensor([[0.0, 0], [0.1, 0], [5, 5], [9, 9]])
    q = torch.tensor([[0.05, 0.0], [3.0, 3.0], [1.0, 1.0]])
    with pytest.raises(ValueError, match="repeated class ids"):
        search(q, hm, torch.tensor([0, 0, 2, 3]), 2, torch.tensor([0, 0, 0]))
    ids = torch.tensor([0, 1, 2, 3])
    bad = q.clone()
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="queries row 1 is NaN or inf"):
        search(bad, hm, ids, 2, None)
    bad_hm = hm.clone()
    bad_hm[3, 0] = float("inf")
    with pytest.raises(ValueError, match="head_means row 3 is NaN or inf"):
        search(q, bad_hm, ids, 2, None)
    with pytest.raises(ValueError, match=r"expected queries \(m, d\).*\(2,\)"):
        search(q[0], hm, ids, 2, None)
    assert search(q[1:], hm, ids, 1, None)[0].tolist() == [[2], [1]]  # the same inputs, valid
    from glag.options import first_nonfinite_row

    assert first_nonfinite_row(torch.tensor([[1.0, 2.0], [3e38, 3e38], [1.0, float("nan")]])) == 2
    assert first_nonfinite_row(np.array([[1.0, np.inf], [2.0, 3.0]])[::-1]) == 1  # a numpy view, reversed


# ------------------------------------------------------------------------ weights (step 5)
def test_support_weights():
    counts = torch.tensor([100, 400, 100, 5])
    support = torch.tensor([[0, 1, 2], [0, 2, 1], [2, 0, 1]])
    dist2 = torch.tensor([[1.0, 1.0, 2.0], [1.0, 4.0, 4.0], [0.0, 1.0, 3.0]])
    w = afg.support_weights(dist2, support, counts)
    assert w.dtype == torch.float32 and w.shape == (3, 3)
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(w[0].numpy(), np.array([100, 400, 50]) / 550, rtol=1e-6)  # larger wins
    np.testing.assert_allclose(w[1].numpy(), np.array([100, 25, 100]) / 225, rtol=1e-6)  # nearer wins
    assert w[2, 0] > 0.999 and torch.isfinite(w).all()  # zero distance: guarded, dominates
    # scale invariance (the guard is relative)
    np.testing.assert_allclose(afg.support_weights(dist2 * 1e-9, support, counts).numpy(), w.numpy(), rtol=1e-5)
    # all-zero row: proportional to size
    wz = afg.support_weights(torch.zeros(1, 2), torch.tensor([[0, 1]]), counts)
    np.testing.assert_allclose(wz.numpy(), [[0.2, 0.8]], rtol=1e-6)
    wu = afg.support_weights(dist2, support, counts, mode="uniform")
    np.testing.assert_allclose(wu.numpy(), 1 / 3)
    with pytest.raises(ValueError, match="mode"):
        afg.support_weights(dist2, support, counts, mode="nope")
    for mode in afg.WEIGHT_MODES:  # k = 0 was an IndexError / ZeroDivisionError
        with pytest.raises(ValueError, match=r"k >= 1 head classes a row, got \(2, 0\)"):
            afg.support_weights(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.long), counts, mode=mode)
    with pytest.raises(ValueError, match="differ"):
        afg.support_weights(dist2[:, :1], support, counts, mode="uniform")
    zero = torch.as_tensor(counts).clone()
    zero[support[0, 0]] = 0  # was NaN weights
    with pytest.raises(ValueError, match="training count >= 1"):
        afg.support_weights(dist2, support, zero)


def test_calibrate_means_formula_and_omega_zero():
    rs = np.random.RandomState(2)
    means = torch.from_numpy(rs.randn(6, 5).astype(np.float32))
    x = torch.from_numpy(rs.randn(4, 5).astype(np.float32))
    support = torch.tensor([[0, 1], [2, 3], [4, 5], [1, 0]])
    w = torch.tensor([[0.25, 0.75], [0.5, 0.5], [1.0, 0.0], [0.1, 0.9]])
    om = torch.tensor([0.0, 0.3, 1.0, 0.6])
    mu = afg.calibrate_means(x, support, w, means, om)
    ref = (1 - om[:, None]) * x + om[:, None] * (w[:, :, None] * means[support]).sum(1)
    np.testing.assert_allclose(mu.numpy(), ref.numpy(), rtol=1e-6, atol=1e-6)
    assert torch.equal(mu[0], x[0])  # omega = 0 centres on the tail sample
    mu_s = afg.calibrate_means(x, support, w, means, 0.5)
    np.testing.assert_allclose(mu_s.numpy(), (0.5 * x + 0.5 * (w[:, :, None] * means[support]).sum(1)).numpy(),
                               rtol=1e-6, atol=1e-6)


def test_calibrate_means_integer_input_and_refusals():
    """Integer features are computed in float (not with w and omega truncated to 0); omega off
    [0, 1] or of the wrong shape, and k = 0, are refused."""
    x = torch.tensor([[10, 0]])
    means = torch.tensor([[0, 0], [20, 20]])
    mu = afg.calibrate_means(x, torch.tensor([[1]]), torch.tensor([[1.0]]), means, 0.5)
    assert mu.dtype == torch.float32 and mu.tolist() == [[15.0, 10.0]]  # METHOD.md step 5
    mu = afg.calibrate_means(x, torch.tensor([[0, 1]]), torch.tensor([[0.3, 0.7]]), means, torch.tensor([0.6]))
    np.testing.assert_allclose(mu.numpy(), [[0.4 * 10 + 0.6 * 14, 0.6 * 14]], rtol=1e-6)
    xf, sup, w = x.float(), torch.tensor([[1]]), torch.tensor([[1.0]])
    with pytest.raises(ValueError, match=r"omega must lie in \[0, 1\].*1\.5"):
        afg.calibrate_means(xf, sup, w, means, 1.5)
    with pytest.raises(ValueError, match=r"omega must be a scalar or \(1,\), got \(1, 2\)"):
        afg.calibrate_means(xf, sup, w, means, torch.full((1, 2), 0.5))
    with pytest.raises(ValueError, match="k = 0 columns"):
        afg.calibrate_means(xf, torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0), means, 0.5)


def test_calibrated_covariance_modes():
    covs = torch.stack([torch.eye(3), 2 * torch.eye(3)]).double()
    s = afg.calibrated_covariance([0, 1], [0.25, 0.75], covs, 0.1, "all", 3)
    np.testing.assert_allclose(s.numpy(), 1.75 * np.eye(3) + 0.1)
    s = afg.calibrated_covariance([0, 1], [0.25, 0.75], covs, 0.1, "diag", 3)
    np.testing.assert_allclose(s.numpy(), 1.85 * np.eye(3))


# --------------------------------------------------------- DC is a special case of step 5
def _dc_reference(query, base_means, base_cov, k, alpha):
    """Free-Lunch DC (Yang et al. 2021), written from the paper: the k nearest base classes
    by Euclidean distance; mean of (their means + the query); mean of their covariances + alpha."""
    dist = np.linalg.norm(base_means - query, axis=1)
    idx = np.argsort(dist)[:k]
    mean = np.concatenate([base_means[idx], query[None]]).mean(0)
    cov = base_cov[idx].mean(0) + alpha
    return idx, mean, cov


def test_dc_special_case():
    rs = np.random.RandomState(3)
    d, k, alpha = 6, 2, 0.21
    counts = [40, 60, 30, 80, 50]
    x, y = _blobs(rs, counts, d, spread=5.0)
    x = afg.tukey(x.abs(), 0.5)
    st = afg.class_statistics(x, y, 5, build_bank=False)
    covs = np.stack([np.cov(x[y == c].numpy().astype(np.float64), rowvar=False) for c in range(5)])
    queries = torch.from_numpy(rs.rand(7, d).astype(np.float32)) + st.means[4]
    qlab = torch.full((7,), 5)  # a novel class: not among the base classes
    head = torch.arange(5)
    sup, d2 = afg.find_support(queries, st.means[head], head, k, qlab)
    w = afg.support_weights(d2, sup, st.counts, mode="uniform")
    mu = afg.calibrate_means(queries, sup, w, st.means, afg.dc_omega(k))
    for i in range(7):
        idx, ref_mean, ref_cov = _dc_reference(queries[i].numpy().astype(np.float64),
                                               st.means.numpy().astype(np.float64), covs, k, alpha)
        assert sorted(sup[i].tolist()) == sorted(idx.tolist())
        np.testing.assert_allclose(mu[i].numpy(), ref_mean, rtol=1e-5, atol=1e-5)
        cov = afg.calibrated_covariance(sup[i], w[i], covs, alpha, "all", d)
        np.testing.assert_allclose(cov.numpy(), ref_cov, rtol=1e-6, atol=1e-7)
    assert afg.dc_omega(3) == 0.75


# -------------------------------------------------------------------- allocation (step 6)
def test_allocate_counts():
    class_counts = np.array([50, 7, 3, 10, 50])
    labels = np.concatenate([np.full(7, 1), np.full(3, 2), np.full(10, 3)])
    labels = np.random.RandomState(4).permutation(labels)
    out = afg.allocate_counts(labels, 50, class_counts, np.random.default_rng(0))
    assert out.dtype == np.int64 and out.shape == labels.shape
    for c in (1, 2, 3):
        q = 50 - class_counts[c]
        got = out[labels == c]
        assert got.sum() == q
        assert set(got.tolist()) <= {q // len(got), q // len(got) + 1}  # evenly spread
        assert (got == q // len(got) + 1).sum() == q % len(got)
    again = afg.allocate_counts(labels, 50, class_counts, np.random.default_rng(0))
    assert np.array_equal(out, again)
    other = [afg.allocate_counts(labels, 50, class_counts, np.random.default_rng(s)) for s in range(1, 6)]
    assert any(not np.array_equal(out, o) for o in other)  # the remainder goes to random samples
    # per-class targets; a class at/above its target gets 0
    tgt = np.array([50, 7, 10, 5, 50])
    out = afg.allocate_counts(labels, tgt, class_counts, np.random.default_rng(0))
    assert out[labels == 1].sum() == 0 and out[labels == 3].sum() == 0 and out[labels == 2].sum() == 7
    assert afg.allocate_counts(np.zeros(0, np.int64), 5, class_counts, np.random.default_rng(0)).shape == (0,)
    with pytest.raises(ValueError, match=r"class ids in \[0, 5\), got shape \(2,\), range \[1, 5\]"):
        afg.allocate_counts(np.array([1, 5]), 50, class_counts, np.random.default_rng(0))


# ------------------------------------------------------------------ adaptive omega (step 7)
def test_adaptive_omega_up_down_clip_and_zero():
    ao = afg.AdaptiveOmega(4, tail_ids=[1, 2, 3], reference="last")
    ao.update(np.array([0.5, 0.5, 0.5, 0.5]))  # first call: reference only
    assert np.allclose(ao.omega, 0.6)
    ao.update(np.array([0.9, 0.6, 0.4, 0.5]))
    np.testing.assert_allclose(ao.omega, [0.6, 0.65, 0.55, 0.6])  # class 0 is not a tail class
    # keep falling: class 2 reaches exactly 0 and stays there
    acc = 0.4
    for _ in range(20):
        acc -= 0.01
        ao.update(np.array([0.9, 0.6, acc, 0.5]))
    assert ao.omega[2] == 0.0 and ao.omega[3] == 0.6
    # rising: clipped at 1
    for i in range(20):
        ao.update(np.array([0.9, 0.6 + 0.01 * (i + 1), acc, 0.5]))
    assert ao.omega[1] == 1.0
    assert len(ao.history) == 1 + 2 + 20 + 20
    np.testing.assert_allclose(ao.history[0], 0.6)
    om = ao.omega_for(torch.tensor([2, 1, 2]))
    assert om.dtype == torch.float32 and om.tolist() == [0.0, 1.0, 0.0]


def test_adaptive_omega_zero_after_exactly_12_steps():
    ao = afg.AdaptiveOmega(1, tail_ids=[0], reference="last")
    for t in range(13):
        ao.update(np.array([1.0 - 0.01 * t]))
    assert ao.omega[0] == 0.0 and ao.history[12][0] == pytest.approx(0.05)


def test_adaptive_omega_reference_modes():
    seq = [0.5, 0.7, 0.6, 0.65, 0.6]
    expect = {
        # best: ref 0.5 -> up (ref 0.7) -> 0.6 down -> 0.65 down -> 0.6 down
        "best": [0.6, 0.65, 0.6, 0.55, 0.5],
        # last: up, down, up, down
        "last": [0.6, 0.65, 0.6, 0.65, 0.6],
        # ema m=0.5: ref 0.5; 0.7>0.5 up, ref .6; 0.6=0.6 same, ref .6; 0.65 up, ref .625; 0.6 down
        "ema": [0.6, 0.65, 0.65, 0.7, 0.65],
    }
    for mode, want in expect.items():
        ao = afg.AdaptiveOmega(1, tail_ids=[0], reference=mode)
        got = []
        for a in seq:
            ao.update(np.array([a]))
            got.append(ao.omega[0])
        np.testing.assert_allclose(got, want, err_msg=mode)
    # margin: one validation image (5 %) of noise is ignored with margin 0.05
    ao = afg.AdaptiveOmega(1, tail_ids=[0], reference="last", margin=0.05)
    for a in [0.5, 0.55, 0.5, 0.7, 0.6]:
        ao.update(np.array([a]))
    np.testing.assert_allclose([h[0] for h in ao.history], [0.6, 0.6, 0.6, 0.6, 0.65, 0.6])
    with pytest.raises(ValueError, match="reference"):
        afg.AdaptiveOmega(1, tail_ids=[0], reference="mean")


def test_adaptive_omega_nan_and_state_dict(tmp_path):
    ao = afg.AdaptiveOmega(3, tail_ids=[0, 2], reference="ema")
    ao.update(np.array([0.5, 0.1, np.nan]))
    ao.update(np.array([0.7, 0.1, 0.4]))  # class 2: first valid value only sets the reference
    np.testing.assert_allclose(ao.omega, [0.65, 0.6, 0.6])
    path = tmp_path / "omega.pt"
    torch.save(ao.state_dict(), path)
    bo = afg.AdaptiveOmega(3, tail_ids=[0, 2], reference="ema")
    bo.load_state_dict(torch.load(path, weights_only=True))
    for a in ([0.4, 0.0, 0.5], [0.9, 0.0, 0.1]):
        ao.update(np.array(a))
        bo.update(np.array(a))
    np.testing.assert_array_equal(ao.omega, bo.omega)
    np.testing.assert_array_equal(np.stack(ao.history), np.stack(bo.history))
    with pytest.raises(ValueError, match="tail_ids"):
        afg.AdaptiveOmega(3, tail_ids=[0]).load_state_dict(ao.state_dict())


# --------------------------------------------- end to end with the sampler (glag.sampling)
@pytest.mark.parametrize("mode", ["all", "diag"])
def test_sampler_moments_match_calibration(mode):
    sampling = _sampling()
    rs = np.random.RandomState(5)
    d, k, alpha = 5, 2, 0.1
    counts = [3, 30, 12, 40]  # class 0 tail; 1 has n > d, 2 has n > d, 3 n > d
    x, y = _blobs(rs, counts, d, spread=3.0)
    x = afg.tukey(x.abs(), 0.5)
    # give a support class fewer samples than d too, to exercise the d x (n-1) factor
    x = torch.cat([x, x[y == 2][:4] + 0.3])
    y = torch.cat([y, torch.full((4,), 4)])
    st = afg.class_statistics(x, y, 5)
    head = torch.tensor([1, 2, 3, 4])
    q = x[y == 0][:1]
    ql = torch.tensor([0])
    sup, d2 = afg.find_support(q, st.means[head], head, k, ql)
    w = afg.support_weights(d2, sup, st.counts)
    mu = afg.calibrate_means(q, sup, w, st.means, 0.6)
    n = 20000
    xs, ys = sampling.sample_calibrated(st.bank, mu, sup, w, torch.tensor([n]), ql,
                                        alpha=alpha, mode=mode, seed=0)
    assert xs.shape == (n, d) and xs.dtype == torch.float32 and (ys == 0).all()
    cov = afg.calibrated_covariance(sup[0], w[0], st.bank, alpha, mode, d).numpy()
    emp_mean = xs.double().mean(0).numpy()
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(emp_mean - mu[0].double().numpy()) < 5 * se + 1e-6)
    emp_cov = np.cov(xs.double().numpy(), rowvar=False)
    # sd of a sample covariance entry: sqrt((S_ii S_jj + S_ij^2) / n)
    sd = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov ** 2) / n)
    assert np.all(np.abs(emp_cov - cov) < 6 * sd + 1e-6)
