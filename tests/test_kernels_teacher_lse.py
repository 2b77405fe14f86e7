"""A dense teacher's log-sum-exp at T, computed outside the kernel (``PoolTargets.with_lse``,
the store adapter ``fastkd.targets.pool_targets``), so the partitioned kernel's first pass reads
only the student at every T: the kernel with and without it against the fp64 reference, and the
adapter's value against torch's logsumexp of the stored rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from test_kernels_partitioned import assert_matches_reference, make_case, run_kernel

from fastkd.kernels import PoolTargets
from fastkd.store import PoolArrays
from fastkd.targets import pool_targets


@pytest.mark.parametrize("temperature", [2.0, 4.0])
@pytest.mark.parametrize("given", [True, False], ids=["lse-given", "lse-summed"])
@pytest.mark.parametrize("mode", ["live", "fixed"])
def test_dense_targets_at_t_match_the_reference_with_the_lse_given_or_not(temperature, given, mode):
    student, labels, targets = make_case(6, 1001, dtype=torch.bfloat16, seed=3)
    if given:
        targets = targets.with_lse(temperature)
        assert targets.lse_temperature == temperature
    else:
        assert targets.logprobs_lse is None
    assert_matches_reference(
        student, labels, targets, mode=mode, self_index=1 if mode == "fixed" else None,
        temperature=temperature, max_block=128,
    )  # fmt: skip


def test_the_kernel_reads_the_given_lse_and_only_at_its_own_temperature():
    student, labels, targets = make_case(5, 300, seed=5)
    given = targets.with_lse(2.0)
    expected = torch.logsumexp(targets.logprobs.double() / 2.0, -1)
    torch.testing.assert_close(given.logprobs_lse.double(), expected, rtol=1e-6, atol=1e-6)
    # An lse off by log 2 halves the teacher's p in the kernel's KD gradient: the kernel read it
    # instead of summing the teacher in pass 1.
    shifted = dataclasses.replace(given, logprobs_lse=given.logprobs_lse + np.log(2.0))
    _, right, _ = run_kernel(student, labels, given, mode="best", temperature=2.0)
    _, wrong, _ = run_kernel(student, labels, shifted, mode="best", temperature=2.0)
    assert not torch.allclose(right, wrong, rtol=1e-3, atol=1e-5)
    # At another T (or at T = 1, where none is needed) the lse is not used: the reference holds.
    assert_matches_reference(student, labels, shifted, mode="best", temperature=4.0)
    assert_matches_reference(student, labels, shifted, mode="best", temperature=1.0)


def test_from_logits_at_t_carries_its_lse_and_pool_targets_refuse_a_stray_one():
    gen = torch.Generator().manual_seed(1)
    pool, labels = torch.randn(3, 2, 50, generator=gen), torch.tensor([0, 4, 49])
    live = PoolTargets.from_logits(pool, labels, temperature=3.0)
    expected = torch.logsumexp(live.logprobs.double() / 3.0, -1)
    torch.testing.assert_close(live.logprobs_lse.double(), expected, rtol=1e-6, atol=1e-6)
    assert PoolTargets.from_logits(pool, labels).logprobs_lse is None  # T = 1: none needed
    assert PoolTargets.from_logits(pool, labels, topk=4, temperature=3.0).logprobs_lse is None
    assert live.select([1]).logprobs_lse.shape == (3, 1)
    assert live.select([1]).lse_temperature == 3.0
    with pytest.raises(ValueError, match="lse_temperature"):
        PoolTargets(live.true_logprob, logprobs=live.logprobs, logprobs_lse=live.logprobs_lse)
    with pytest.raises(ValueError, match=r"logprobs_lse must be \[B, M\]"):
        dataclasses.replace(live, logprobs_lse=live.logprobs_lse[:2])


def test_the_store_adapter_computes_the_lse_of_the_stored_rows_at_the_runs_temperature():
    gen = np.random.default_rng(0)
    logits = gen.normal(size=(4, 2, 37)) * 3
    stored = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float16)
    arrays = PoolArrays(true_logprob=stored[..., 0].astype(np.float32), logprobs=stored)
    targets = pool_targets(arrays, temperature=2.0)
    expected = torch.logsumexp(torch.from_numpy(stored).double() / 2.0, -1)
    assert targets.logprobs_lse.dtype == torch.float32 and targets.lse_temperature == 2.0
    torch.testing.assert_close(targets.logprobs_lse.double(), expected, rtol=1e-6, atol=1e-6)
    assert pool_targets(arrays).logprobs_lse is None  # T = 1: the stored rows as they are
    assert pool_targets(arrays, temperature=1.0).logprobs_lse is None
