"""The shared RNG: Philox4x32-10 known answers, and the float32 Box–Muller of the fast paths.

Every backend draws normals from Philox4x32-10 keyed by the seed, counter
(sample, stream, component // 4, 0), through Box–Muller (glag/kernels/reference.py).
"""
import numpy as np
import pytest

from glag.kernels import cpu, reference

# Random123's published known-answer vectors for philox4x32_10: (counter, key) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_reference_philox_known_answers(counter, key, expected):
    out = reference.philox4x32_10(counter, key)
    assert tuple(int(v) for v in out) == expected


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_numba_philox_known_answers(counter, key, expected):
    out = cpu.philox_words(np.array([counter], dtype=np.uint32), key)
    assert tuple(int(v) for v in out[0]) == expected


def test_numba_philox_matches_reference_bit_for_bit():
    rs = np.random.RandomState(0)
    counters = rs.randint(0, 2**32, size=(2000, 4), dtype=np.uint64)
    for key in [(0, 0), (0xFFFFFFFF, 1), (12345, 0x9E3779B9)]:
        ref = np.stack(reference.philox4x32_10(counters.T, key), axis=1)
        np.testing.assert_array_equal(cpu.philox_words(counters, key), ref)


def test_seed_key_splits_64_bits():
    assert reference.seed_key(2**40 + 7) == (7, 256)
    assert reference.seed_key(2**64 - 1) == (0xFFFFFFFF, 0xFFFFFFFF)
    with pytest.raises(ValueError):
        reference.seed_key(-1)
    with pytest.raises(ValueError):
        reference.seed_key(2**64)


def test_float32_box_muller_matches_float64_reference():
    """The fast paths' float32 Box–Muller (integer range reduction + polynomials) vs float64."""
    rs = np.random.RandomState(1)
    samples = rs.randint(0, 2**32, size=100_000, dtype=np.uint64)
    blocks = rs.randint(0, 2**32, size=100_000, dtype=np.uint64)
    seed = 2**63 + 12345
    got = cpu.block_normals_f32(seed, samples.astype(np.int64), 3, blocks.astype(np.int64))
    ref = reference.block_normals(seed, samples, 3, blocks)
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)


def test_box_muller_edge_words():
    """Uniform words at the ends and at the quadrant / half boundaries keep float32 accuracy.

    a = (u + 0.5) 2^-32 close to 1 (u near 2^32) gives a tiny radius that a naive float32
    ``log(a)`` would get wrong by ~1e-4; the reduction from ``~u`` keeps it exact.
    """
    words = np.array([0, 1, 2**29 - 1, 2**29, 2**30, 2**31 - 1, 2**31, 2**31 + 1, 3 * 2**30,
                      2**32 - 2**20, 2**32 - 256, 2**32 - 2, 2**32 - 1], dtype=np.uint64)
    u = np.array(np.meshgrid(words, words)).reshape(2, -1)
    a = (u[0] + 0.5) * 2.0**-32
    b = (u[1] + 0.5) * 2.0**-32
    r = np.sqrt(-2 * np.log(a))
    expected = np.stack([r * np.cos(2 * np.pi * b), r * np.sin(2 * np.pi * b)], 1)
    got = cpu.box_muller_words(u[0].astype(np.uint32), u[1].astype(np.uint32))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=5e-7)


def test_counter_layout_component_j_is_normal_j_mod_4_of_block_j_div_4():
    s = np.array([0, 5, 2**32 - 1])
    z9 = reference.normals(7, s, 2, 9)
    z5 = reference.normals(7, s, 2, 5)
    np.testing.assert_array_equal(z9[:, :5], z5)  # a prefix does not depend on the length
    blk = reference.block_normals(7, s[:, None], 2, np.array([[0, 1, 2]]))  # (3, 3, 4)
    np.testing.assert_array_equal(z9, blk.reshape(3, 12)[:, :9])
    # other streams and seeds are other numbers
    assert not np.allclose(reference.normals(7, s, 3, 9), z9)
    assert not np.allclose(reference.normals(8, s, 2, 9), z9)


def test_normals_are_standard_normal():
    z = reference.normals(2024, np.arange(25_000), 0, 8).ravel()  # 2e5 values
    n = z.size
    assert abs(z.mean()) < 5 / np.sqrt(n)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / n)
    # the fractions within 1 and 2 standard deviations (binomial standard errors)
    for q, p in [(1.0, 0.682689492), (2.0, 0.954499736)]:
        assert abs(np.mean(np.abs(z) < q) - p) < 5 * np.sqrt(p * (1 - p) / n)
    # consecutive components are uncorrelated (within a block and across blocks)
    zz = z.reshape(-1, 8)
    c = np.corrcoef(zz, rowvar=False)
    assert np.abs(c - np.eye(8)).max() < 5 / np.sqrt(zz.shape[0])
