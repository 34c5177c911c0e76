"""Benchmark the calibrated sampler against its baselines, side by side, in one run (glag-bench).

    glag-bench --quick                                   # a few minutes on a 2-core CPU
    glag-bench --out bench_kernel.json --plot bench_kernel.png
    glag-bench --profiles imagenet-lt --dims 2048 --ks 3 --device cuda

For each long-tail profile (CIFAR-100-LT, ImageNet-LT, iNaturalist 2018 class counts), feature
dimension d and support size k, it builds one stage-two epoch's sampling job the way glag does
(every class topped up to n_max, quota spread over its real samples, k head-class supports per
seed, factors of rank min(n_j, d)), takes a random subset of the seed rows sized to a fixed
amount of work, and times on the same job:

* ``dc-numpy``      Free-Lunch DC style: per seed, the dense Sigma' (from precomputed class
                    covariances) and ``numpy.random.multivariate_normal`` (an SVD per seed);
                    on a few seeds, reported as samples/s;
* ``torch-mvn``     ``torch.distributions.MultivariateNormal`` with a batched Cholesky of the
                    dense Sigma' per seed (on a subset);
* ``torch-lowrank`` the same low-rank math as glag in plain torch: ``torch.randn`` + one matmul
                    per (slot, support class) group + ``index_add_``, eager, its bookkeeping
                    (grouping the samples by class) in every call;
* ``torch-lowrank-graph`` (GPU) the same draw captured once in a CUDA graph and replayed, the
                    bookkeeping done beforehand: torch's GPU work without the host's launch cost;
* ``glag-<backend>`` :func:`glag.sampling.sample_calibrated` with each available backend (the
                    ``torch`` reference on a subset: it is the slow oracle), writing into one
                    output buffer (``out=``, as stage two does, and as ``torch-lowrank`` and the
                    GEMMs do); ``glag-<backend>-fresh`` (CPU): the same with a new output every
                    call, whose pages the OS must map and zero each time; ``glag-cuda-<BMxBN>``
                    (GPU, d >= 256): the cuda backend with each block tile other than its default
                    (``GLAG_CUDA_TILE``, :func:`glag.kernels.cuda.slot_gemm_shape`; the
                    tensor-core tiles ``64x256tc*`` on compute capability 8.0 and later);
* ``gemm-*``        this machine's float32 GEMM rate on exactly the (rows x r_j) @ (r_j x d)
                    products of the job: whole groups in torch (``gemm-torch``; on a GPU also
                    replayed from a CUDA graph, ``gemm-torch-graph``) and numpy (``gemm-numpy``),
                    and the numba backend's own tiles with one single-threaded BLAS call per
                    thread (``gemm-tiles``); the best of them is the ceiling.

FLOPs are the useful ones, 2 r_j d per sample and slot. Every timing is the fastest call of
``--repeats`` rounds, the methods interleaved so they share the machine's load, with a short sleep
before each (``--settle``) so that no method pays for the idle-spinning threads of the one before.
The table gives samples/s, GFLOP/s, % of the GEMM ceiling and each glag backend's speed-up over each baseline;
the JSON has it all, plus the targets of DESIGN.md ("Performance targets") and the projected
time of an ImageNet-LT-sized epoch (d = 2048, k = 3).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

if __package__ in (None, ""):  # run as a script: tools/ is not a package then
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tools._common import cli_main, int_at_least, number_above
else:
    from ._common import cli_main, int_at_least, number_above

# ---------------------------------------------------------------- long-tail profiles
# Piecewise log-linear class counts through (rank, count) anchors. ImageNet-LT: 1000 classes,
# 1280..5 images, 385 / 479 / 136 Many / Medium / Few (113k images; the real split has 115.8k).
# iNaturalist 2018: 8142 classes, 1000..2 images, 842 / 4076 / 3224 (432k; the real one 437.5k).
_ANCHORS = {
    "imagenet-lt": (1000, [(0, 1280), (10, 500), (100, 250), (384, 101), (385, 100), (863, 20), (864, 19), (999, 5)]),
    "inat2018": (8142, [(0, 1000), (50, 400), (841, 101), (842, 100), (4917, 20), (4918, 19), (8141, 2)]),
}
PROFILES = ("cifar100-lt", "imagenet-lt", "inat2018")
HEAD_MIN = 100  # head = n_c > 100 (METHOD.md, step 3)


def profile_counts(name: str) -> np.ndarray:
    """(C,) training images per class of a long-tail profile, head first."""
    if name == "cifar100-lt":  # LDAM-DRW, imbalance factor 100: 10,847 images
        return np.array([int(500 * 0.01 ** (i / 99)) for i in range(100)], dtype=np.int64)
    n_cls, anchors = _ANCHORS[name]
    xs, ys = zip(*anchors)
    return np.floor(np.exp(np.interp(np.arange(n_cls), xs, np.log(ys))) + 0.5).astype(np.int64)


# ---------------------------------------------------------------- one sampling job
@dataclass
class Job:
    profile: str
    d: int
    k: int
    bank: object  # glag.sampling.FactorBank over the head classes
    mu: torch.Tensor
    support: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    labels: torch.Tensor
    n_epoch: int  # samples in a whole epoch of this profile
    m_epoch: int  # seed rows in a whole epoch
    alpha: float
    mode: str

    @property
    def n(self) -> int:
        return int(self.counts.sum())

    def flops(self, rows=None) -> float:
        """Useful FLOPs: 2 r_j d per sample and slot (of all seed rows, or of ``rows``)."""
        sup = self.support if rows is None else self.support[rows]
        cnt = self.counts if rows is None else self.counts[rows]
        ranks = self.bank.ranks.to(sup.device)
        return float(2 * self.d * (ranks[sup].sum(1) * cnt).sum())

    def subset(self, rows):
        return Job(self.profile, self.d, self.k, self.bank, self.mu[rows], self.support[rows],
                   self.weights[rows], self.counts[rows], self.labels[rows], self.n_epoch, self.m_epoch,
                   self.alpha, self.mode)


def build_job(profile: str, d: int, k: int, work_flops: float, rng: np.random.Generator, device,
              alpha: float, mode: str) -> Job:
    """An epoch of ``profile`` cut to about ``work_flops`` useful FLOPs (whole epoch if smaller)."""
    from glag.sampling import FactorBank

    n_c = profile_counts(profile)
    n_max = int(n_c.max())
    head = np.flatnonzero(n_c > HEAD_MIN)
    # seed rows: every real sample of a class below n_max; its quota spread evenly, rest at random
    seed_cls = np.repeat(np.arange(len(n_c)), np.where(n_c < n_max, n_c, 0))
    counts = np.zeros(len(seed_cls), np.int64)
    first = np.concatenate([[0], np.cumsum(np.where(n_c < n_max, n_c, 0))])
    for c in np.flatnonzero(n_c < n_max):
        quota, rows = n_max - n_c[c], np.arange(first[c], first[c + 1])
        counts[rows] = quota // len(rows)
        counts[rng.choice(rows, quota % len(rows), replace=False)] += 1
    n_epoch, m_epoch = int(counts.sum()), len(counts)
    ranks = np.minimum(n_c[head], d)  # F_j: d x n_j (n_j <= d) or d x d Cholesky
    per_sample = 2.0 * d * k * float(ranks.mean())
    order = rng.permutation(m_epoch)
    take = int(np.searchsorted(np.cumsum(counts[order]), work_flops / per_sample)) + 1
    rows = np.sort(order[:take])
    m = len(rows)
    support = np.stack([rng.choice(len(head), k, replace=False) for _ in range(m)])
    w = rng.random((m, k)).astype(np.float32) + 0.2
    w /= w.sum(1, keepdims=True)
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    # the bank, built transposed: F_j^T rows are contiguous, bank.data is a view
    f_t = torch.randn(int(ranks.sum()), d, generator=gen) * 0.3
    offsets = torch.zeros(len(head) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.as_tensor(ranks), 0)
    bank = FactorBank(f_t.to(device).t(), offsets)
    as_t = lambda a, dt: torch.as_tensor(a, dtype=dt).to(device)  # noqa: E731
    return Job(profile, d, k, bank, torch.randn(m, d, generator=gen).to(device), as_t(support, torch.int64),
               as_t(w, torch.float32), as_t(counts[rows], torch.int64), as_t(seed_cls[rows], torch.int64),
               n_epoch, m_epoch, alpha, mode)


def _rows_up_to(job: Job, n_samples: int) -> torch.Tensor:
    """The first seed rows (with samples) whose counts add up to about ``n_samples``."""
    nz = torch.nonzero(job.counts > 0).flatten()
    cum = torch.cumsum(job.counts[nz], 0)
    return nz[: max(int(torch.searchsorted(cum, torch.tensor(n_samples, device=cum.device))) + 1, 1)]


# ---------------------------------------------------------------- the methods
def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _dense_cov(job: Job, classes, dtype=torch.float64):
    """{class: Sigma_j = F_j F_j^T} for the given classes (precomputed, as DC does)."""
    out = {}
    for j in classes:
        f = job.bank.factor(int(j)).to(dtype)
        out[int(j)] = f @ f.T
    return out


def make_dc(job: Job, max_seconds: float, max_seeds: int):
    """DC style: per seed, dense Sigma' = sum_i w_i Sigma_i + alpha, ``np.random.multivariate_normal``."""
    rows = torch.nonzero(job.counts > 0).flatten()[:max_seeds].cpu()
    sub = job.subset(rows.to(job.counts.device))
    covs = {j: c.cpu().numpy() for j, c in _dense_cov(job, torch.unique(sub.support).tolist()).items()}
    mu, sup = sub.mu.cpu().double().numpy(), sub.support.cpu().numpy()
    w, cnt = sub.weights.cpu().double().numpy(), sub.counts.cpu().numpy()
    extra = np.ones((job.d, job.d)) if job.mode == "all" else np.eye(job.d)
    rs = np.random.RandomState(0)

    def run():
        t0, n_done = time.perf_counter(), 0
        for i in range(len(cnt)):
            cov = sum(w[i, s] * covs[sup[i, s]] for s in range(job.k)) + job.alpha * extra
            rs.multivariate_normal(mu[i], cov, size=int(cnt[i]))
            n_done += int(cnt[i])
            if time.perf_counter() - t0 > max_seconds:
                break
        return n_done
    return run


def make_mvn(job: Job, max_seeds: int):
    """``torch.distributions.MultivariateNormal``, dense Sigma' per seed, batched Cholesky."""
    device = job.mu.device
    rows = torch.nonzero(job.counts > 0).flatten()[:max_seeds]
    sub = job.subset(rows)
    classes = torch.unique(sub.support).tolist()
    covs = _dense_cov(job, classes, torch.float32)
    stack = torch.stack([covs[j] for j in classes])
    index = torch.full((job.bank.num_classes,), -1, dtype=torch.int64, device=device)
    index[torch.as_tensor(classes, device=device)] = torch.arange(len(classes), device=device)
    extra = (torch.ones(job.d, job.d) if job.mode == "all" else torch.eye(job.d)).to(device)
    batch = max(1, min(64, (256 << 20) // (4 * job.d * job.d)))
    cnt = sub.counts.tolist()

    def run():
        n_done = 0
        for a in range(0, len(cnt), batch):
            b = min(a + batch, len(cnt))
            cov = torch.einsum("bk,bkij->bij", sub.weights[a:b], stack[index[sub.support[a:b]]]) + job.alpha * extra
            dist = torch.distributions.MultivariateNormal(sub.mu[a:b], covariance_matrix=cov)  # batched Cholesky
            for i in range(b - a):
                one = torch.distributions.MultivariateNormal(sub.mu[a + i], scale_tril=dist.scale_tril[i])
                one.sample((cnt[a + i],))
                n_done += cnt[a + i]
        return n_done
    return run, sub.n


def lowrank_plan(job: Job):
    """The bookkeeping of the plain-torch low-rank baseline: (seed_of, groups).

    seed_of: (N,) int64, the seed row of every sample. groups: one (idx, sw, ft) per slot and
    support class with samples and rank > 0, in slot then class order: idx (n_g,) int64 the
    samples, sw (n_g, 1) float32 their sqrt(w), ft (r_j, d) the view F_j^T of the transposed bank.
    """
    device = job.mu.device
    bank_t = job.bank.transposed(device)
    off = job.bank.offsets.tolist()
    seed_of = torch.repeat_interleave(torch.arange(job.mu.shape[0], device=device), job.counts)
    groups = []
    for slot in range(job.k):
        cls = job.support[seed_of, slot]
        order = torch.argsort(cls, stable=True)
        ptr = [0] + torch.cumsum(torch.bincount(cls, minlength=job.bank.num_classes), 0).tolist()
        sw = job.weights[seed_of, slot].sqrt()
        for j in range(job.bank.num_classes):
            if ptr[j + 1] > ptr[j] and off[j + 1] > off[j]:
                idx = order[ptr[j]:ptr[j + 1]]
                groups.append((idx, sw[idx, None], bank_t[off[j]:off[j + 1]]))
    return seed_of, groups


def lowrank_draw(job: Job, out: torch.Tensor, seed_of: torch.Tensor, groups) -> torch.Tensor:
    """x = mu'[seed_of] + e + sum over groups of (randn(n_g, r_j) * sw) @ F_j^T, into ``out`` (N, d).

    METHOD.md, "Sampling without a Cholesky per sample", in plain torch: the normals are drawn by
    ``torch.randn`` and written to memory, one matmul and one ``index_add_`` per group.
    """
    x = torch.index_select(job.mu, 0, seed_of, out=out[: seed_of.numel()])
    if job.alpha > 0:
        x += math.sqrt(job.alpha) * torch.randn(x.shape[0], job.d if job.mode == "diag" else 1, device=x.device)
    for idx, sw, ft in groups:
        z = torch.randn(idx.numel(), ft.shape[0], device=x.device) * sw
        x.index_add_(0, idx, z @ ft)
    return x


def make_lowrank(job: Job, tf32: bool = False, graph: bool = False):
    """glag's low-rank math in plain torch: randn + one matmul per (slot, class) + index_add_.

    Eager (the default): each call does its own bookkeeping (:func:`lowrank_plan`, a few host
    syncs) and launches ~6 ops a group, as a user's loop would. ``graph`` (CUDA only): the
    bookkeeping is done once, outside the timing, and the draw (:func:`lowrank_draw`) is captured
    in a CUDA graph and replayed, fresh normals each replay: torch's GPU work with almost no host
    cost, the fastest way to run this formulation in torch (its lower bound on a GPU).
    ``tf32``: with TF32 tensor-core matmuls allowed (GPU; ~1e-3 relative error, shown for reference).
    """
    device = job.mu.device
    if tf32:
        inner = make_lowrank(job)

        def run_tf32():
            before = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return inner()
            finally:
                torch.backends.cuda.matmul.allow_tf32 = before
        return run_tf32

    buf = torch.empty((job.n, job.d), device=device)  # allocated once, as glag's out=
    if not graph:
        def run():
            seed_of, groups = lowrank_plan(job)
            return lowrank_draw(job, buf, seed_of, groups).shape[0]
        return run

    seed_of, groups = lowrank_plan(job)
    run_graph = graph_replay(lambda: lowrank_draw(job, buf, seed_of, groups).shape[0], device,
                             "make_lowrank(graph=True)")
    run_graph.out = buf[: seed_of.numel()]  # what each replay draws
    return run_graph


def graph_replay(fn, device, what: str):
    """``fn`` (CUDA work, no host sync) captured once in a CUDA graph: returns a function that
    replays it and returns what ``fn`` returned at the capture (a host value: samples a call).
    Warmed up twice first on the capture's own stream, as capture requires (cuBLAS sets itself
    up per stream, which it cannot do mid-capture). Random ops in ``fn`` draw new numbers at
    every replay."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"{what} needs a CUDA job, not {device}: CUDA graphs are GPU-only")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g, stream=side):
        result = fn()
    torch.cuda.current_stream(device).wait_stream(side)

    def replay():
        g.replay()
        return result
    return replay


def make_glag(job: Job, backend: str, fresh: bool = False, cuda_tile: str | None = None):
    """glag's sampler on the job, into one output buffer reused call after call (``out=``, as stage
    two samples into its epoch matrix), or with ``fresh`` a new output each call (the default
    ``sample_calibrated`` call: the OS maps and zeroes N x d new pages every time). ``cuda_tile``:
    the cuda backend's block tile, set through ``GLAG_CUDA_TILE`` for the call."""
    from glag.kernels.cuda import ENV_TILE
    from glag.sampling import sample_calibrated

    buf = None if fresh else torch.empty((job.n, job.d), device=job.mu.device)

    def run():
        saved = os.environ.get(ENV_TILE)
        if cuda_tile:  # set and restored around the call: a few microseconds
            os.environ[ENV_TILE] = cuda_tile
        try:
            x, _ = sample_calibrated(job.bank, job.mu, job.support, job.weights, job.counts, job.labels,
                                     alpha=job.alpha, mode=job.mode, seed=1234, backend=backend, out=buf)
        finally:
            if cuda_tile and saved is None:
                del os.environ[ENV_TILE]
            elif cuda_tile:
                os.environ[ENV_TILE] = saved
        return x.shape[0]
    return run


def make_gemm(job: Job, lib: str, graph: bool = False):
    """The job's GEMMs alone, (rows of group) x r_j @ r_j x d, in torch or numpy: the ceiling.

    ``graph`` (torch on a GPU): the matmuls replayed from a CUDA graph, so that the ceiling is
    the GPU's rate and not the rate at which the host launches a hundred or more matmuls."""
    device = job.mu.device
    bank_t = job.bank.transposed(device)
    off = job.bank.offsets.tolist()
    shapes = []
    for slot in range(job.k):
        per_class = torch.zeros(job.bank.num_classes, dtype=torch.int64, device=device)
        per_class.index_add_(0, job.support[:, slot], job.counts)
        for j in torch.nonzero(per_class).flatten().tolist():
            if off[j + 1] > off[j]:
                shapes.append((int(per_class[j]), j))
    max_rows = max((rows for rows, _ in shapes), default=0)
    max_r = max((off[j + 1] - off[j] for _, j in shapes), default=0)
    gen = torch.Generator(device=device).manual_seed(0)
    abuf = torch.randn(max_rows * max_r, device=device, generator=gen)  # one A and one Y buffer, viewed
    ybuf = torch.empty(max_rows * job.d, device=device)
    ops = []
    for rows, j in shapes:
        r = off[j + 1] - off[j]
        a, b, y = abuf[: rows * r].view(rows, r), bank_t[off[j]:off[j + 1]], ybuf[: rows * job.d].view(rows, job.d)
        ops.append((a, b, y) if lib == "torch" else (a.numpy(), b.numpy(), y.numpy()))

    def run():
        for a, b, y in ops:
            (torch.matmul if lib == "torch" else np.matmul)(a, b, out=y)
        return job.n
    return graph_replay(run, device, "make_gemm(graph=True)") if graph else run


def square_gemm_rate(device, n: int) -> float:
    """GFLOP/s of one n x n x n float32 matmul (best of 3), for reference."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(4):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


# ---------------------------------------------------------------- timing
# float32 FMA lanes per SM by compute capability (CUDA programming guide, arithmetic throughput)
_FP32_LANES = {(7, 0): 64, (7, 5): 64, (8, 0): 64, (8, 6): 128, (8, 7): 128, (8, 9): 128, (9, 0): 128,
               (10, 0): 128, (12, 0): 128}


def gpu_fp32_peak_gflops(device) -> float | None:
    """2 x FP32 lanes per SM x SMs x max SM clock, or None when a number is unknown."""
    props = torch.cuda.get_device_properties(device)
    lanes = _FP32_LANES.get((props.major, props.minor))
    mhz = None
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits",
                              "-i", str(device.index or 0)], capture_output=True, text=True, timeout=20)
        mhz = float(out.stdout.strip().splitlines()[0])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        pass
    if lanes is None or mhz is None:
        return None
    return 2.0 * lanes * props.multi_processor_count * mhz / 1e3


def _time(fn, device, min_seconds: float = 0.2):
    """(seconds of the fastest call, samples per call): calls ``fn`` until ``min_seconds`` pass.

    Each call is timed on its own (synchronised on a GPU), and the fastest kept, as for the
    repeats: on a shared machine the noise only ever adds time.
    """
    best, n_done = math.inf, 0
    _sync(device)
    t_end = time.perf_counter() + min_seconds
    while True:
        t0 = time.perf_counter()
        n_done = fn()
        _sync(device)
        t1 = time.perf_counter()
        best = min(best, t1 - t0)
        if t1 >= t_end:
            break
    return best, n_done


def settle(seconds: float) -> None:
    """Sleep, so the thread pools of the method timed before are idle when the next one starts.

    A multi-threaded OpenBLAS call (numpy's, in ``gemm-numpy`` and ``dc-numpy``) leaves its
    worker threads spinning for about 0.1 s afterwards (measured here: one core busy for
    0.1 s after the call returns); on a 2-core machine whatever runs next loses that core.
    """
    if seconds > 0:
        time.sleep(seconds)


def _add_graphed(methods: dict, name: str, make) -> None:
    """``methods[name] = make()``, a CUDA-graph method; if the capture fails, the method is left
    out with a warning and the rest of the run goes on (the GPU tests report the failure)."""
    try:
        methods[name] = make()
    except Exception as e:  # noqa: BLE001  (capture errors come as several types)
        print(f"warning: {name} left out of this run: the CUDA graph capture failed ({type(e).__name__}: {e})",
              file=sys.stderr)


def run_config(job: Job, args, backends, progress) -> dict:
    device = job.mu.device
    flops_per_sample = job.flops() / job.n
    methods = {}  # name -> (fn, flops per sample of what fn draws, repeats, note)
    # dense d x d covariances are precomputed for the dc seeds' classes: few seeds at large d
    methods["dc-numpy"] = make_dc(job, args.dc_seconds, args.dc_seeds if job.d <= 512 else min(args.dc_seeds, 2))
    mvn_seeds = args.mvn_seeds if job.d <= 512 else max(1, args.mvn_seeds // 8)
    methods["torch-mvn"], _ = make_mvn(job, mvn_seeds)
    methods["torch-lowrank"] = make_lowrank(job)
    if device.type == "cuda":
        _add_graphed(methods, "torch-lowrank-graph", lambda: make_lowrank(job, graph=True))
    for b in backends:
        if b == "torch":  # the float64 reference: slow, on a subset
            sub = job.subset(_rows_up_to(job, args.ref_samples))
            methods["glag-torch"] = make_glag(sub, "torch")
        else:
            methods[f"glag-{b}"] = make_glag(job, b)
            if device.type == "cpu":  # on a GPU torch's caching allocator hands the same memory back
                methods[f"glag-{b}-fresh"] = make_glag(job, b, fresh=True)
            if b == "cuda" and job.d >= 256:  # the other block tiles, beside the default
                from glag.kernels import cuda as kcuda

                capability = torch.cuda.get_device_capability(device)
                default = kcuda.slot_gemm_shape(job.d, capability=capability)
                has_tc = capability >= (8, 0)
                for tile, shape in kcuda.WIDE_SHAPES.items():
                    if shape != default and (has_tc or not shape.tensor_cores):
                        methods[f"glag-cuda-{tile}"] = make_glag(job, b, cuda_tile=tile)
    if device.type == "cuda":
        methods["torch-lowrank-tf32"] = make_lowrank(job, tf32=True)
    methods["gemm-torch"] = make_gemm(job, "torch")
    if device.type == "cuda":
        _add_graphed(methods, "gemm-torch-graph", lambda: make_gemm(job, "torch", graph=True))
    if device.type == "cpu":
        methods["gemm-numpy"] = make_gemm(job, "numpy")
        if "numba" in backends:  # the numba backend's own tiles, per-thread BLAS: its ceiling
            from glag.kernels import cpu

            bank4, offsets4 = job.bank.transposed_padded(device, 4)
            gemm_tiles = cpu.gemm_tiles(bank4.numpy(), offsets4.numpy(), job.support.numpy(), job.counts.numpy())
            methods["gemm-tiles"] = lambda: (gemm_tiles(), job.n)[1]
    once = {"dc-numpy", "torch-mvn", "glag-torch"}  # slow, subset: one timed run after a warm-up
    best: dict[str, tuple[float, int]] = {}
    for name, fn in methods.items():  # warm-up (compiles, caches, allocator)
        progress.set_postfix_str(f"{job.profile} d={job.d} k={job.k} warm {name}")
        if name != "dc-numpy":
            fn()
    for rep in range(args.repeats):  # interleaved, so all see the same load
        for name, fn in methods.items():
            if name in once and rep > 0:
                continue
            progress.set_postfix_str(f"{job.profile} d={job.d} k={job.k} {name} {rep + 1}/{args.repeats}")
            settle(args.settle)
            sec, n_done = _time(fn, device, 0.0 if name in once else args.min_seconds)
            if name not in best or sec < best[name][0]:
                best[name] = (sec, n_done)
    gemm_names = [n for n in best if n.startswith("gemm-")]
    ceiling_name = min(gemm_names, key=lambda n: best[n][0])
    ceiling = flops_per_sample * job.n / best[ceiling_name][0] / 1e9
    out = {"profile": job.profile, "d": job.d, "k": job.k, "samples": job.n, "seed_rows": int(job.mu.shape[0]),
           "epoch_samples": job.n_epoch, "epoch_seed_rows": job.m_epoch, "flops_per_sample": flops_per_sample,
           "gemm_ceiling_gflops": ceiling, "gemm_ceiling_lib": ceiling_name, "methods": {}}
    for name, (sec, n_done) in best.items():
        rate = n_done / sec
        # the subset methods draw other seed rows: their FLOPs differ a little; use this job's mean
        gflops = rate * flops_per_sample / 1e9
        out["methods"][name] = {"seconds": sec, "samples": n_done, "samples_per_s": rate, "gflops": gflops,
                                "pct_gemm": 100.0 * gflops / ceiling}
        if getattr(args, "fp32_peak_gflops", None):
            out["methods"][name]["pct_fp32_peak"] = 100.0 * gflops / args.fp32_peak_gflops
    base = {b: out["methods"][b]["samples_per_s"] for b in _BASELINES if b in out["methods"]}
    for name, m in out["methods"].items():
        if name.startswith("glag-"):
            m["speedup"] = {b: m["samples_per_s"] / r for b, r in base.items()}
    return out


# ---------------------------------------------------------------- report
def _fmt_rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:,.2f}"


# the baselines each glag backend's speed-up is given over, and their table headings
_BASELINES = {"dc-numpy": "x dc-numpy", "torch-mvn": "x torch-mvn", "torch-lowrank": "x lowrank",
              "torch-lowrank-graph": "x lr-graph"}


def format_table(res: dict) -> str:
    head = (f"{res['profile']}  d={res['d']}  k={res['k']}: {res['samples']:,} samples from {res['seed_rows']:,} seed "
            f"rows (epoch: {res['epoch_samples']:,}), {res['flops_per_sample'] / 1e6:.3g} MFLOP/sample, "
            f"GEMM ceiling {res['gemm_ceiling_gflops']:.1f} GFLOP/s ({res['gemm_ceiling_lib']})")
    cols = [(b, h, len(h) + 2) for b, h in _BASELINES.items() if b in res["methods"]]
    lines = [head, f"  {'method':<20}{'samples/s':>14}{'GFLOP/s':>10}{'%GEMM':>8}"
             + "".join(f"{h:>{w}}" for _, h, w in cols)]
    for name, m in res["methods"].items():
        sp = m.get("speedup")
        tail = "".join(f"{sp[b]:>{w}.3g}" for b, _, w in cols) if sp else ""
        lines.append(f"  {name:<20}{_fmt_rate(m['samples_per_s']):>14}{m['gflops']:>10.1f}{m['pct_gemm']:>8.1f}{tail}"
                     + (f"  ({m['pct_fp32_peak']:.1f}% of FP32 peak)" if name.startswith("glag-cuda")
                        and "pct_fp32_peak" in m else ""))
    return "\n".join(lines)


def check_targets(results: list[dict]) -> list[dict]:
    """DESIGN.md "Performance targets", evaluated on this run."""
    out = []
    for r in results:
        ms = r["methods"]
        tag = f"{r['profile']} d={r['d']} k={r['k']}"
        if "glag-numba" in ms:
            g = ms["glag-numba"]
            if r["d"] == 512:
                out.append({"target": "numba >= 100x dc-numpy at d=512", "config": tag,
                            "value": g["speedup"]["dc-numpy"], "pass": g["speedup"]["dc-numpy"] >= 100})
            if r["d"] >= 512:
                out.append({"target": "numba >= 1.5x torch-lowrank at d>=512", "config": tag,
                            "value": g["speedup"]["torch-lowrank"], "pass": g["speedup"]["torch-lowrank"] >= 1.5})
                out.append({"target": "numba >= 60% of the GEMM ceiling at d>=512", "config": tag,
                            "value": g["pct_gemm"], "pass": g["pct_gemm"] >= 60})
        cuda = [n for n in ms if n == "glag-cuda" or n.startswith("glag-cuda-")]  # the default tile, then others
        if cuda and r["d"] == 2048:  # float32-accurate torch baselines (TF32 is shown, not a target)
            fp32_torch = [b for b in ("torch-mvn", "torch-lowrank", "torch-lowrank-graph") if b in ms]
            best = max(fp32_torch, key=lambda b: ms[b]["samples_per_s"])
            for name in cuda:
                v = ms[name]["samples_per_s"] / ms[best]["samples_per_s"]
                out.append({"target": "cuda >= 2x best float32 torch at d=2048",
                            "config": tag + ("" if name == "glag-cuda" else f" {name[len('glag-cuda-'):]}"),
                            "value": v, "pass": v >= 2, "baseline": best})
    return out


def projection(results: list[dict]) -> dict | None:
    """Projected time of an ImageNet-LT-sized epoch (d = 2048, k = 3) for each method."""
    for r in results:
        if r["profile"] == "imagenet-lt" and r["d"] == 2048 and r["k"] == 3:
            n = r["epoch_samples"]
            return {"config": "imagenet-lt d=2048 k=3", "epoch_samples": n,
                    "seconds": {name: n / m["samples_per_s"] for name, m in r["methods"].items()
                                if not name.startswith("gemm-")}}
    return None


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = sorted({r["profile"] for r in results}, key=PROFILES.index)
    ks = sorted({r["k"] for r in results})
    fig, axes = plt.subplots(len(ks), len(profiles), figsize=(5 * len(profiles), 4 * len(ks)), squeeze=False)
    for row, k in enumerate(ks):
        for ax, prof in zip(axes[row], profiles):
            rs = sorted((r for r in results if r["profile"] == prof and r["k"] == k), key=lambda r: r["d"])
            if not rs:
                ax.set_visible(False)
                continue
            dims = [r["d"] for r in rs]
            for name in dict.fromkeys(n for r in rs for n in r["methods"] if not n.startswith("gemm-")):
                pts = [(r["d"], r["methods"][name]["samples_per_s"]) for r in rs if name in r["methods"]]
                ax.plot(*zip(*pts), "o-", label=name)  # a method timed only at some d: its points
            # the samples/s the GEMM ceiling would allow: the useful FLOPs at the best GEMM rate
            ax.plot(dims, [r["gemm_ceiling_gflops"] * 1e9 / r["flops_per_sample"] for r in rs], "k--",
                    label="GEMM ceiling")
            ax.set(xscale="log", yscale="log", xlabel="feature dimension d", ylabel="samples / s",
                   title=f"{prof}, k={k}")
            ax.set_xticks(dims, [str(d) for d in dims])
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glag-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--quick", action="store_true",
                   help="small run: cifar100-lt and imagenet-lt, d = 64/512/2048, k = 3, 40 GFLOP a config, 3 repeats")
    g.add_argument("--profiles", nargs="+", choices=PROFILES, default=None,
                   help="class-count profiles (default: all three)")
    g.add_argument("--dims", nargs="+", type=int_at_least(1), default=None,
                   help="feature dimensions d (default: 64 512 2048)")
    g.add_argument("--ks", nargs="+", type=int_at_least(1), default=None,
                   help="support sizes k (default: 2 3; quick: 3)")
    g.add_argument("--backend", choices=("cuda", "numba", "torch"), default=None,
                   help="time only this glag backend (default: every one available on the device)")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where the job lives (default auto: cuda when the cuda backend is available)")
    g = p.add_argument_group("how much")
    g.add_argument("--work", type=number_above(0), default=None,
                   help="useful GFLOP a config; the seed rows are subsampled to it, or the whole epoch "
                        "when smaller (default 200; quick 40)")
    g.add_argument("--repeats", type=int_at_least(1), default=None,
                   help="timed runs a method, the best kept (default 3)")
    g.add_argument("--min-seconds", type=number_above(0, inclusive=True), default=0.3,
                   help="a fast method is called again until a timed run lasts this long (default 0.3)")
    g.add_argument("--settle", type=number_above(0, inclusive=True), default=None,
                   help="seconds of sleep before each timed method, so the thread pools of the one before "
                        "have gone idle (default 0.3 on a CPU, 0 on a GPU)")
    g.add_argument("--dc-seeds", type=int_at_least(1), default=20,
                   help="at most this many seeds for dc-numpy (2 at d > 512) (default 20)")
    g.add_argument("--dc-seconds", type=number_above(0, inclusive=True), default=None,
                   help="dc-numpy stops after the seed that passes this time, >= 1 seed (default 8; quick 3)")
    g.add_argument("--mvn-seeds", type=int_at_least(1), default=64,
                   help="seeds for torch-mvn at d <= 512, 1/8 above (default 64)")
    g.add_argument("--ref-samples", type=int_at_least(1), default=4000,
                   help="samples for the glag torch reference (default 4000)")
    g = p.add_argument_group("the job")
    g.add_argument("--alpha", type=number_above(0, inclusive=True), default=0.1,
                   help="dispersion alpha, the same for every method (default 0.1)")
    g.add_argument("--mode", choices=("all", "diag"), default="diag",
                   help="alpha mode; diag keeps Sigma' positive definite for the Cholesky/SVD baselines (default diag)")
    g.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the synthetic job (default 0)")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="bench_kernel.json", help="JSON results (default bench_kernel.json)")
    g.add_argument("--plot", nargs="?", const="bench_kernel.png", default=None, metavar="PNG",
                   help="also plot samples/s against d (file default bench_kernel.png)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    from glag import sampling

    quick = args.quick
    args.profiles = args.profiles or (["cifar100-lt", "imagenet-lt"] if quick else list(PROFILES))
    args.dims = args.dims or [64, 512, 2048]
    args.ks = args.ks or ([3] if quick else [2, 3])
    work = (args.work or (40.0 if quick else 200.0)) * 1e9
    args.repeats = args.repeats or 3
    args.dc_seconds = args.dc_seconds if args.dc_seconds is not None else (3.0 if quick else 8.0)

    avail = sampling.available_backends()
    if args.device == "auto":
        args.device = "cuda" if "cuda" in avail else "cpu"
    device = torch.device(args.device)
    if args.settle is None:
        args.settle = 0.0 if device.type == "cuda" else 0.3
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch has no CUDA device here", file=sys.stderr)
        return 2
    on_device = {"cuda": ["cuda", "torch"], "cpu": ["numba", "torch"]}[device.type]
    backends = [b for b in on_device if b in avail and (args.backend is None or b == args.backend)]
    if args.backend and args.backend not in backends:
        print(f"--backend {args.backend}: not available on {device.type} here (available: {', '.join(avail)})",
              file=sys.stderr)
        return 2

    machine = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "torch": torch.__version__, "numpy": np.__version__,
               "torch_threads": torch.get_num_threads(), "device": str(device),
               "load_avg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
    args.fp32_peak_gflops = None
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
        args.fp32_peak_gflops = machine["fp32_peak_gflops"] = gpu_fp32_peak_gflops(device)
    try:
        import numba

        machine["numba"] = numba.__version__
        machine["numba_threads"] = numba.get_num_threads()
    except ImportError:
        pass
    machine["square_gemm_gflops"] = square_gemm_rate(device, 8192 if device.type == "cuda" else 2048)
    peak = f"FP32 peak {args.fp32_peak_gflops:,.0f} GFLOP/s; " if args.fp32_peak_gflops else ""
    print(f"glag-bench on {machine['processor']} ({machine['cpu_count']} cpus, device {device}); "
          f"backends {', '.join(backends)}; square float32 GEMM {machine['square_gemm_gflops']:.1f} GFLOP/s; "
          f"{peak}load average {machine['load_avg_start']}", flush=True)

    rng = np.random.default_rng(args.seed)
    configs = [(p, d, k) for p in args.profiles for d in args.dims for k in args.ks]
    results = []
    bar = tqdm(configs, desc="configs", disable=args.no_progress, file=sys.stderr)
    settings = {"alpha": args.alpha, "mode": args.mode, "work_gflops": work / 1e9, "repeats": args.repeats,
                "settle_s": args.settle,
                "dc_seeds": args.dc_seeds, "dc_seconds": args.dc_seconds, "mvn_seeds": args.mvn_seeds,
                "ref_samples": args.ref_samples, "seed": args.seed}

    def save(final: bool):
        """Write the JSON (after every config too: a killed run keeps what it measured)."""
        payload = {"argv": sys.argv[1:] if argv is None else list(argv), "machine": machine, "settings": settings,
                   "complete": final, "results": results, "targets": check_targets(results),
                   "imagenet_epoch_projection": projection(results)}
        tmp = args.out + ".partial"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, args.out)

    for prof, d, k in bar:
        job = build_job(prof, d, k, work, rng, device, args.alpha, args.mode)
        res = run_config(job, args, backends, bar)
        results.append(res)
        tqdm.write(format_table(res) + "\n", file=sys.stdout)
        save(final=False)
        del job
    machine["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    save(final=True)

    targets = check_targets(results)
    proj = projection(results)
    print("Targets (DESIGN.md, on this run):")
    for t in targets:
        print(f"  [{'PASS' if t['pass'] else 'FAIL'}] {t['target']:<45} {t['config']:<28} {t['value']:.3g}"
              + (f"  (over {t['baseline']})" if "baseline" in t else ""))
    if proj:
        s = proj["seconds"]
        parts = ", ".join(f"{name} {sec:,.1f} s" if sec < 1e5 else f"{name} {sec / 3600:,.1f} h"
                          for name, sec in s.items())
        print(f"Projected ImageNet-LT-sized epoch ({proj['epoch_samples']:,} samples, d=2048, k=3): {parts}")
    print(f"wrote {args.out}")
    if args.plot:
        plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 0


def cli(argv=None) -> int:
    """The ``glag-bench`` command: :func:`main` with user errors printed, not raised."""
    return cli_main(main, argv, "the JSON written so far holds the configs measured")


if __name__ == "__main__":
    raise SystemExit(cli())
