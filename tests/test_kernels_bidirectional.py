"""The fused N-model bidirectional KD kernel under the Triton interpreter, against fp64 torch.

The reference (``bidirectional_kd_reference``) is plain autograd math; it is itself checked against
the Bi-KD formula written with ``torch.nn.functional`` below.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastkd.kernels import (
    BidirectionalKDConfig,
    BidirectionalKDLoss,
    bidirectional_kd_loss,
    bidirectional_kd_reference,
)
from fastkd.partition import NO_TEACHER

IGNORE = -100
GRAD_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def make_logits(
    models: int, rows: int, classes: int, dtypes=(torch.float32,), seed: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Logits of ``models`` models (dtypes cycled) leaning on the label by random amounts."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    logits = []
    for m in range(models):
        z = torch.randn(rows, classes, generator=gen) * 2
        z[torch.arange(rows), labels] += torch.rand(rows, generator=gen) * 6
        logits.append(z.to(dtypes[m % len(dtypes)]))
    if rows > 2:
        labels[1] = IGNORE
    return logits, labels


def run(function, logits, labels, grad_output=None, **options):
    leaves = [z.clone().requires_grad_() for z in logits]
    loss, stats = function(leaves, labels, **options)
    loss.backward(grad_output)
    return loss.detach(), [z.grad for z in leaves], stats


def run_reference(logits, labels, grad_output=None, **options):
    options.pop("max_block", None)
    config = BidirectionalKDConfig(**options)
    leaves = [z.double().requires_grad_() for z in logits]
    loss, stats = bidirectional_kd_reference(leaves, labels, config)
    loss.backward(None if grad_output is None else grad_output.double())
    return loss.detach(), [z.grad for z in leaves], stats


def assert_matches_reference(logits, labels, grad_output=None, **options):
    loss, grads, stats = run(bidirectional_kd_loss, logits, labels, grad_output, **options)
    ref_loss, ref_grads, ref_stats = run_reference(logits, labels, grad_output, **options)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)
    for z, grad, ref_grad in zip(logits, grads, ref_grads, strict=True):
        assert grad.dtype == z.dtype
        rtol, atol = GRAD_TOL[z.dtype]
        scale = ref_grad.abs().max().item()
        torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol * scale)
    assert torch.equal(stats.chosen, ref_stats.chosen)
    for name in ("kl", "p_student", "p_teacher"):
        torch.testing.assert_close(
            getattr(stats, name).double(),
            getattr(ref_stats, name).double(),
            rtol=1e-4,
            atol=2e-5,
        )
    return stats


@pytest.mark.parametrize("stop_grad", [True, False], ids=["stop_grad", "reference_code"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_two_models_match_fp64_reference(dtype, stop_grad):
    logits, labels = make_logits(2, 6, 1000, (dtype,))
    stats = assert_matches_reference(
        logits, labels, temperature=2.0, stop_grad=stop_grad, max_block=256
    )
    assert stats.chosen[1] == NO_TEACHER  # ignored row
    assert set(stats.chosen.tolist()) == {NO_TEACHER, 0, 1}


@pytest.mark.parametrize("models", [3, 4])
@pytest.mark.parametrize("stop_grad", [True, False], ids=["stop_grad", "reference_code"])
def test_n_models_with_mixed_dtypes_match_fp64_reference(models, stop_grad):
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    logits, labels = make_logits(models, 5, 301, dtypes, seed=models)
    assert_matches_reference(
        logits, labels, temperature=1.5, stop_grad=stop_grad, kd_weight=0.5, max_block=64
    )


@pytest.mark.parametrize(
    ("rows", "classes", "max_block"),
    [(4, 10, None), (3, 1001, None), (3, 1001, 128), (2, 32003, None)],
    ids=["C10", "C1001-one-tile", "C1001-8-tiles", "C32003-two-tiles"],
)
def test_class_counts_and_tiling(rows, classes, max_block):
    logits, labels = make_logits(2, rows, classes, seed=classes)
    assert_matches_reference(logits, labels, stop_grad=False, max_block=max_block)


def test_ties_two_models_go_to_b_and_n_models_give_no_kd_term():
    logits, labels = make_logits(3, 3, 40)
    logits[1][0] = logits[0][0]  # row 0: models 0 and 1 tie for the best
    logits[2][0, labels[0]] = logits[0][0, labels[0]] - 5.0  # model 2 is less confident
    logits[1][2] = logits[0][2]  # row 2: A and B tie
    stats = assert_matches_reference(logits, labels)
    assert stats.chosen[0] == NO_TEACHER and stats.kl[0] == 0
    stats = assert_matches_reference(logits[:2], labels)
    assert stats.chosen[2] == 1


def test_per_row_grad_output_with_reduction_none_and_temperature():
    logits, labels = make_logits(3, 5, 200, (torch.float32, torch.bfloat16))
    grad_output = torch.tensor([2.0, 7.0, -1.0, 0.0, 0.5])
    loss, _, _ = run(bidirectional_kd_loss, logits, labels, grad_output, reduction="none")
    assert loss.shape == (5,) and loss[1] == 0
    assert_matches_reference(logits, labels, grad_output, reduction="none", temperature=4.0)


def test_all_rows_ignored_give_zero_loss_and_gradients():
    logits, _ = make_logits(2, 3, 30)
    labels = torch.full((3,), IGNORE)
    loss, grads, stats = run(bidirectional_kd_loss, logits, labels, reduction="sum")
    assert loss.item() == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads)
    assert stats.chosen.tolist() == [NO_TEACHER] * 3


def test_stop_grad_keeps_kl_gradient_off_the_teacher():
    logits, labels = make_logits(2, 4, 50, seed=4)
    _, grads, stats = run(bidirectional_kd_loss, logits, labels, ce_weight=0.0, stop_grad=True)
    for row, teacher in enumerate(stats.chosen.tolist()):
        if teacher != NO_TEACHER:
            assert torch.count_nonzero(grads[teacher][row]) == 0
            assert torch.count_nonzero(grads[1 - teacher][row]) > 0
    _, grads, _ = run(bidirectional_kd_loss, logits, labels, ce_weight=0.0, stop_grad=False)
    taught = stats.chosen[stats.chosen != NO_TEACHER]
    assert torch.count_nonzero(grads[taught[0].item()]) > 0


def test_reference_equals_bikd_formula_from_torch_functional():
    (za, zb), labels = make_logits(2, 6, 20)
    loss, _ = bidirectional_kd_reference([za, zb], labels, BidirectionalKDConfig())
    counted = labels != IGNORE
    za, zb, y = za[counted], zb[counted], labels[counted]
    log_pa, log_pb = F.log_softmax(za, -1), F.log_softmax(zb, -1)
    a_teaches = log_pa[torch.arange(len(y)), y] > log_pb[torch.arange(len(y)), y]
    kl_a_to_b = F.kl_div(log_pb, log_pa, log_target=True, reduction="none").sum(-1)
    kl_b_to_a = F.kl_div(log_pa, log_pb, log_target=True, reduction="none").sum(-1)
    expected = (
        F.cross_entropy(za, y)
        + F.cross_entropy(zb, y)
        + torch.where(a_teaches, kl_a_to_b, kl_b_to_a).mean()
    )
    torch.testing.assert_close(loss, expected)


def test_inplace_grad_and_cpu_fallback_equal_the_kernel(monkeypatch):
    logits, labels = make_logits(2, 4, 70, (torch.float16,))
    loss, grads, stats = run(bidirectional_kd_loss, logits, labels, temperature=2.0)
    leaves = [z.clone().requires_grad_() for z in logits]
    bidirectional_kd_loss(leaves, labels, temperature=2.0, inplace_grad=True)[0].backward()
    for leaf, grad in zip(leaves, grads, strict=True):
        assert torch.equal(leaf.detach(), grad) and torch.equal(leaf.grad, grad)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch_loss, torch_grads, torch_stats = run(
        bidirectional_kd_loss, logits, labels, temperature=2.0
    )
    torch.testing.assert_close(loss, torch_loss.float(), rtol=1e-5, atol=1e-6)
    for grad, torch_grad in zip(grads, torch_grads, strict=True):
        torch.testing.assert_close(grad.float(), torch_grad.float(), rtol=2e-3, atol=2e-5)
    assert torch.equal(stats.chosen, torch_stats.chosen)


def test_module_wraps_the_function():
    logits, labels = make_logits(2, 3, 15)
    criterion = BidirectionalKDLoss(temperature=2.0, stop_grad=False)
    loss, stats = criterion(logits, labels)
    expected, _ = bidirectional_kd_loss(logits, labels, temperature=2.0, stop_grad=False)
    torch.testing.assert_close(loss, expected)
    assert stats.chosen.shape == (3,)


def test_bad_input_is_refused_with_a_clear_error():
    logits, labels = make_logits(2, 3, 15)
    with pytest.raises(ValueError, match="at least 2 models"):
        bidirectional_kd_loss(logits[:1], labels)
    with pytest.raises(ValueError, match=r"logits\[1\] is \(3, 14\)"):
        bidirectional_kd_loss([logits[0], logits[1][:, :14]], labels)
    with pytest.raises(ValueError, match="labels must lie in"):
        bidirectional_kd_loss(logits, torch.tensor([0, 15, 2]))
