"""GPU paths at LLM scale, checked without a GPU.

* Philox offsets near 2**31 and 2**32: every Triton mask kernel (plain, bitmask, multi-sample, structured, fused,
  LayerNorm whole-row and looped) produces exactly the reference's bits under the interpreter, which wraps int32
  arithmetic as a GPU does.
* Seeds in device memory: the kernels read (key, offset) from the seed tensor at run time, so rewriting it in
  place -- what a CUDA-graph replay does -- draws a fresh mask from the same launch arguments.
* Grids for huge shapes (2**32 dropout elements, T = 65536), computed on meta tensors by
  :func:`regops._core.launch.recording` without launching, stay within CUDA's limits.

(The hessian family's: tests/hessian/test_ops_scale.py.)
"""

from __future__ import annotations

import pytest
import torch

import regops
from regops._core import dispatch
from regops._core import rng as _rng
from regops.dropout import reference as ref
from regops.testing import prob
from regops.testing import seed as S

pytest.importorskip("triton")

from regops.kernels import dropout_fused as kf  # noqa: E402

from regops._core.launch import MAX_GRID, recording  # noqa: E402
from regops.dropout import triton as T  # noqa: E402
from regops.per_example import triton as kg  # noqa: E402

needs_interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the interpreter on CPU tensors")
OFFSETS = [2**31 - 2000, 2**32 - 3]
KEY = -1234567890123
P = 0.3
P_T = torch.tensor(P, dtype=torch.float64)  # the ops take p as a 0-dim tensor


def _x(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


# ------------------------------------------------------------------------------------------------ offsets
@needs_interpreter
@pytest.mark.parametrize("offset", OFFSETS)
def test_flat_mask_kernels_at_large_offsets(offset):
    x = _x(40_000)  # 10,000 counters: offset + i/4 crosses 2**31 (first offset) or 2**32 (second)
    assert torch.equal(T.dropout(x, P_T, S(KEY, offset)), ref.dropout(x, P_T, S(KEY, offset)))
    y, bits = T.dropout_bitmask(x, P_T, S(KEY, offset))
    y_ref, bits_ref = ref.dropout_bitmask(x, P_T, S(KEY, offset))
    assert torch.equal(y, y_ref) and torch.equal(bits, bits_ref)
    assert torch.equal(T.apply_bitmask(x, bits, prob(0.5)), ref.apply_bitmask(x, bits, prob(0.5)))
    # multi-sample: sample k starts at offset + k * step; 5 * step passes 2**31 from 2**31 - 2000
    got = T.multi_sample_dropout_mean(x[:4096], P_T, 5, S(KEY, offset))
    assert torch.equal(got, ref.multi_sample_dropout_mean(x[:4096], P_T, 5, S(KEY, offset)))


@needs_interpreter
@pytest.mark.parametrize("offset", OFFSETS)
def test_structured_masks_at_large_offsets(offset):
    seed = torch.tensor([KEY, offset])
    x = _x((6, 5, 8, 8))
    with regops.use_backend("triton"):
        shared = torch.ops.regops.shared_dropout(x, P_T, [6, 5, 1, 1], seed)
        drop_path = torch.ops.regops.drop_path(x, None, P_T, True, seed)
        multi = torch.ops.regops.multi_sample_dropout_mean(x, P_T, 3, seed)
    with regops.use_backend("torch"):
        assert torch.equal(shared, torch.ops.regops.shared_dropout(x, P_T, [6, 5, 1, 1], seed))
        assert torch.equal(drop_path, torch.ops.regops.drop_path(x, None, P_T, True, seed))
        assert torch.equal(multi, torch.ops.regops.multi_sample_dropout_mean(x, P_T, 3, seed))


@needs_interpreter
@pytest.mark.parametrize("offset", OFFSETS)
def test_fused_masks_at_large_offsets(offset):
    x, r, b = _x((300, 37)), _x((300, 37), seed=1), _x(37, seed=2)
    got = T.bias_dropout_add(x, b, r, P_T, S(KEY, offset))
    assert torch.equal(got, ref.bias_dropout_add(x, b, r, P_T, S(KEY, offset)))
    dx, db = T.bias_dropout_add_backward(r, True, P_T, S(KEY, offset))
    dx_ref, db_ref = ref.bias_dropout_add_backward(r, True, P_T, S(KEY, offset))
    assert torch.equal(dx, dx_ref)
    torch.testing.assert_close(db, db_ref.to(db.dtype), rtol=1e-5, atol=1e-5)


def _layer_norm_vs_reference(x, r, w, b, rms, offset):
    out = T.dropout_add_layer_norm(x, r, w, b, P_T, 1e-5, rms, False, S(KEY, offset))
    want = ref.dropout_add_layer_norm(x, r, w, b, P_T, 1e-5, rms, False, S(KEY, offset))
    assert torch.equal(out[1], want[1]), "the pre-norm sum (dropout mask) differs"
    for got, exp in zip(out, want, strict=True):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-5)
    dy, ds = _x(x.shape, seed=7), _x(x.shape, seed=8)
    got = T.dropout_add_layer_norm_backward(
        dy, ds, out[1], out[2], out[3], w, True, P_T, rms, S(KEY, offset), x.dtype, x.dtype
    )
    exp = ref.dropout_add_layer_norm_backward(
        dy, ds, out[1], out[2], out[3], w, True, P_T, rms, S(KEY, offset), x.dtype, x.dtype
    )
    for g, e in zip(got, exp, strict=True):
        torch.testing.assert_close(g, e.to(g.dtype), rtol=1e-5, atol=1e-4)
    # dx is the mask times dsum: where the reference's dx is exactly zero the kernel's must be too
    assert torch.equal(got[0] == 0, exp[0] == 0)


@needs_interpreter
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("looped", [False, True], ids=["whole_row", "looped"])
def test_layer_norm_masks_at_large_offsets(offset, looped, monkeypatch):
    if looped:  # force the chunked kernels on a small row: 3 chunks of 128 for 300 columns
        monkeypatch.setattr(kf, "WHOLE_ROW_MAX_COLS", 128)
        monkeypatch.setattr(kf, "LOOP_BLOCK_C", 128)
    assert kf.norm_config(300, "cpu").looped is looped
    x, r, w, b = _x((3, 300)), _x((3, 300), seed=1), _x(300, seed=2), _x(300, seed=3)
    _layer_norm_vs_reference(x * 3 + 1, r, w, b, False, offset)
    _layer_norm_vs_reference(x, None, w, None, True, offset)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_looped_layer_norm_matches_whole_row(dtype, monkeypatch):
    """The chunked statistics (Chan's merge of per-chunk mean and M2) agree with the whole-row kernel."""
    x, r, w, b = _x((3, 1000), dtype), _x((3, 1000), dtype, 1), _x(1000, dtype, 2), _x(1000, dtype, 3)
    x = x * 4 + 100  # a large mean: a naive sum-of-squares variance would lose digits
    whole = T.dropout_add_layer_norm(x, r, w, b, P_T, 1e-5, False, True, S(KEY, 7))
    dy = _x((3, 1000), dtype, 4)
    bwd_whole = T.dropout_add_layer_norm_backward(
        dy, None, whole[1], whole[2], whole[3], w, True, P_T, False, S(KEY, 7), dtype, dtype
    )
    monkeypatch.setattr(kf, "WHOLE_ROW_MAX_COLS", 128)
    monkeypatch.setattr(kf, "LOOP_BLOCK_C", 256)
    looped = T.dropout_add_layer_norm(x, r, w, b, P_T, 1e-5, False, True, S(KEY, 7))
    bwd_looped = T.dropout_add_layer_norm_backward(
        dy, None, looped[1], looped[2], looped[3], w, True, P_T, False, S(KEY, 7), dtype, dtype
    )
    assert torch.equal(whole[1], looped[1])
    tol = {"rtol": 1e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-5}
    for a, e in zip((*whole, *bwd_whole[:1], *bwd_whole[2:]), (*looped, *bwd_looped[:1], *bwd_looped[2:]), strict=True):
        torch.testing.assert_close(a.double(), e.double(), **tol)


# ------------------------------------------------------------------------------------------------ seeds on device
@needs_interpreter
def test_kernels_read_the_seed_from_memory_at_run_time():
    """What a CUDA-graph replay does: the same launch arguments (the same seed tensor), new contents."""
    x = _x(5000)
    seed = torch.tensor([KEY, 11])
    first = T.dropout(x, P_T, seed)
    seed.copy_(torch.tensor([KEY + 1, 2**40]))  # in place, as the captured RNG kernel rewrites it
    second = T.dropout(x, P_T, seed)
    assert not torch.equal(first, second)
    assert torch.equal(first, ref.dropout(x, P_T, S(KEY, 11)))
    assert torch.equal(second, ref.dropout(x, P_T, S(KEY + 1, 2**40)))
    rows = _x((7, 33))
    seed.copy_(torch.tensor([5, 6]))
    got = T.bias_dropout_add(rows, None, rows, P_T, seed)
    assert torch.equal(got, ref.bias_dropout_add(rows, None, rows, P_T, S(5, 6)))


def test_three_backends_share_the_stream_constant():
    """The reference, the Triton kernels and csrc/philox.cuh draw from the same subsequence c3 = STREAM_C3, whose
    top bit torch's own Philox users (thread index in (c2, c3), inductor's (offset, 0, 0)) never set: disjoint
    from torch's streams whatever key and offset the seed tensor holds."""
    import re
    from pathlib import Path

    from regops.kernels import philox as kp

    from regops._core.philox import STREAM_C3

    cuh = (Path(__file__).resolve().parents[1] / "csrc" / "common" / "philox.cuh").read_text()
    (value,) = re.findall(r"kStreamC3 = (0x[0-9A-Fa-f]+)u", cuh)
    assert int(value, 16) == STREAM_C3 == kp.STREAM_C3.value and STREAM_C3 >> 31 == 1


def test_seeds_are_drawn_on_the_tensor_device_and_passed_as_tensors():
    seed = _rng.philox_seed(torch.device("meta"), 1000)
    assert seed.device.type == "meta" and seed.shape == (2,) and seed.dtype == torch.int64
    g = torch.Generator().manual_seed(0)
    a = _rng.philox_seed(torch.device("cpu"), 10, g)
    g.manual_seed(0)
    assert torch.equal(a, _rng.philox_seed(torch.device("cpu"), 10, g))  # reproducible from the generator


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_replays_draw_fresh_masks(backend):
    if backend == "cuda" and (reason := dispatch.why_not("dropout", "cuda", torch.device("cuda"))):
        pytest.skip(reason)
    x = torch.randn(10_000, device="cuda")
    with regops.use_backend(backend):
        torch.manual_seed(0)
        for _ in range(2):  # warm-up (compiles) on a side stream, as torch.cuda.graph requires
            regops.dropout(x, P)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            seed = _rng.philox_seed(x.device, x.numel())
            y = torch.ops.regops.dropout(x, P_T, seed)
        outs = []
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            key, offset = seed.tolist()
            assert torch.equal(y.cpu(), ref.dropout(x.cpu(), P_T, S(key, offset)))
            outs.append(y.clone())
    assert not torch.equal(outs[0], outs[1]) and not torch.equal(outs[1], outs[2])


# ------------------------------------------------------------------------------------------------ grids
def _within_limits(launches) -> None:
    assert launches, "nothing was recorded"
    for launch in launches:
        assert all(g <= limit for g, limit in zip(launch.grid, MAX_GRID, strict=False)), launch


def test_dropout_grids_for_2_pow_32_elements():
    n = 2**32
    x = torch.empty(n, dtype=torch.bfloat16, device="meta")
    with recording() as launches:
        T.dropout(x, P_T, S(KEY, 5))
        _, bits = T.dropout_bitmask(x, P_T, S(KEY, 5))
        T.apply_bitmask(x, bits, prob(0.5))
        T.multi_sample_dropout_mean(x, P_T, 4, S(KEY, 5))
        T.scale_rows_add(x.view(2**16, -1), torch.empty(2**16, device="meta"), x.view(2**16, -1))
        rows = x.view(-1, 4096)
        T.bias_dropout_add(rows, rows[0], rows, P_T, S(KEY, 5))
        T.bias_dropout_add_backward(rows, True, P_T, S(KEY, 5))
        for cols in (4096, 65536, 1000):
            xs = torch.empty(n // cols, cols, dtype=torch.bfloat16, device="meta")
            y, s, mean, rstd = T.dropout_add_layer_norm(xs, xs, xs[0], xs[0], P_T, 1e-5, False, True, S(KEY, 5))
            bwd = (y, s, s, mean, rstd, xs[0], True, P_T, False, S(KEY, 5), xs.dtype, xs.dtype)
            T.dropout_add_layer_norm_backward(*bwd)
    _within_limits(launches)
    names = {launch.kernel for launch in launches}
    assert {"dropout_kernel", "dropout_add_layer_norm_fwd_looped_kernel", "multi_sample_mean_kernel"} <= names
    flat = [launch.grid for launch in launches if launch.kernel == "dropout_kernel"]
    assert flat == [(n // 2048,)]  # 2**21 blocks of 2048 elements on x


def test_grad_norm_grids_for_long_sequences():
    with recording() as launches:
        a = torch.empty(2, 65536, 64, dtype=torch.bfloat16, device="meta")
        kg.grad_norms_gram(a, a)
        kg.grad_norms_embedding_gram(torch.empty(2, 65536, dtype=torch.int64, device="meta"), a, -1)
        big = torch.empty(1, 8, 16384, dtype=torch.bfloat16, device="meta")  # one 16384 x 16384 Linear
        kg.grad_norms_instantiate(big, big)
        many = torch.empty(70_000, 3, 8, dtype=torch.bfloat16, device="meta")  # examples past grid y: chunked
        kg.grad_norms_gram(many, many)
    _within_limits(launches)
    assert launches[0].grid == (1024**2, 2)
    assert sum(launch.grid[1] for launch in launches if launch.grid[0] == 1) == 70_000


def test_sm_count_is_per_device(monkeypatch):
    """Grid sizing asks each device for its own SM count (a mixed machine: not the first GPU's, not 132)."""
    import types

    from regops._core import launch as kl

    counts = {0: 132, 1: 108}
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(multi_processor_count=counts[i])
    )
    kl._cuda_sm_count.cache_clear()
    try:
        assert kl.sm_count(torch.device("cuda", 0)) == 132
        assert kl.sm_count(torch.device("cuda", 1)) == 108
    finally:
        kl._cuda_sm_count.cache_clear()
    assert kl.sm_count(torch.device("meta")) == 132
