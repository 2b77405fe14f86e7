"""The kernels' ``scale`` and ``grad_output_is_one`` options, under the Triton interpreter.

``scale`` multiplies the loss and the gradient the kernel writes (and the reference's loss, hence
its autograd gradient); ``grad_output_is_one`` makes backward return the written gradient as it
is, which is right exactly when the caller runs ``loss.backward()`` on that loss alone.
Training uses both: ``scale = world_size / global_rows``, ``reduction="sum"``.
"""

from __future__ import annotations

import pytest
import torch

from fastkd.errors import ConfigError
from fastkd.kernels import (
    BidirectionalKDConfig,
    PartitionedKDConfig,
    PoolTargets,
    bidirectional_kd_loss,
    bidirectional_kd_reference,
    partitioned_kd_loss,
    partitioned_kd_reference,
)
from fastkd.kernels.common import assert_all

ROWS, CLASSES = 6, 24


def _case(topk: int = 0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, PoolTargets]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    pool = torch.randn(ROWS, 3, CLASSES, generator=gen) * 3
    pool[torch.arange(ROWS), :, labels] += torch.rand(ROWS, 3, generator=gen) * 8
    student = torch.randn(ROWS, CLASSES, generator=gen) * 2
    labels[1] = -100
    return student, labels, PoolTargets.from_logits(pool, labels, topk, "bucket")


def _partitioned(student, labels, targets, grad_output=None, **options):
    """(loss, gradient) through the kernel (fp32) or, for fp64 logits, the torch reference."""
    logits = student.clone().requires_grad_()
    loss, _ = partitioned_kd_loss(logits, labels, targets, mode="live", **options)
    loss.backward(grad_output)
    return loss.detach().double(), logits.grad.double()


def _bidirectional(logits, labels, grad_output=None, **options):
    leaves = [z.clone().requires_grad_() for z in logits]
    loss, _ = bidirectional_kd_loss(leaves, labels, **options)
    loss.backward(grad_output)
    return loss.detach().double(), torch.stack([z.grad.double() for z in leaves])


def _close(actual, expected, rtol=2e-5):
    actual_loss, actual_grad = actual
    loss, grad = expected
    torch.testing.assert_close(actual_loss, loss, rtol=rtol, atol=rtol)
    torch.testing.assert_close(actual_grad, grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item())


@pytest.mark.parametrize("topk", [0, 5])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_grad_output_is_one_gives_the_reference_gradient_of_loss_backward(topk, reduction):
    student, labels, targets = _case(topk)
    options = {"reduction": reduction, "temperature": 2.0, "scale": 0.25}
    kernel = _partitioned(student, labels, targets, grad_output_is_one=True, **options)
    reference = _partitioned(student.double(), labels, targets, **options)
    _close(kernel, reference)


def test_grad_output_is_one_in_the_bidirectional_kernel():
    student, labels, _ = _case()
    logits = [student, torch.roll(student, 1, dims=1), student.flip(1)]
    options = {"reduction": "sum", "scale": 3.0}
    kernel = _bidirectional(logits, labels, grad_output_is_one=True, **options)
    reference = _bidirectional([z.double() for z in logits], labels, **options)
    _close(kernel, reference)


@pytest.mark.parametrize("double", [False, True], ids=["kernel", "reference"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_scale_multiplies_the_loss_and_the_gradient(double, reduction):
    student, labels, targets = _case(topk=4)
    student = student.double() if double else student
    grad_output = torch.linspace(0.5, 2.0, ROWS) if reduction == "none" else None
    if double and grad_output is not None:
        grad_output = grad_output.double()
    s = 0.37
    plain = _partitioned(student, labels, targets, grad_output, reduction=reduction)
    scaled = _partitioned(student, labels, targets, grad_output, reduction=reduction, scale=s)
    _close(scaled, (s * plain[0], s * plain[1]), rtol=1e-6)

    logits = [student, student.flip(1)]
    plain = _bidirectional(logits, labels, grad_output, reduction=reduction)
    scaled = _bidirectional(logits, labels, grad_output, reduction=reduction, scale=s)
    _close(scaled, (s * plain[0], s * plain[1]), rtol=1e-6)


def test_references_scale_their_loss():
    student, labels, targets = _case()
    config = PartitionedKDConfig(mode="live", reduction="sum")
    loss, _ = partitioned_kd_reference(student, labels, targets, config)
    scaled, _ = partitioned_kd_reference(
        student, labels, targets, PartitionedKDConfig(mode="live", reduction="sum", scale=2.0)
    )
    torch.testing.assert_close(scaled, 2.0 * loss)
    pair = [student, student.flip(1)]
    loss, _ = bidirectional_kd_reference(pair, labels, BidirectionalKDConfig())
    scaled, _ = bidirectional_kd_reference(pair, labels, BidirectionalKDConfig(scale=-0.5))
    torch.testing.assert_close(scaled, -0.5 * loss)


def test_bad_scale_options_are_refused():
    with pytest.raises(ConfigError, match="grad_output_is_one needs a reduced loss"):
        PartitionedKDConfig(reduction="none", grad_output_is_one=True)
    with pytest.raises(ConfigError, match="scale must be finite"):
        BidirectionalKDConfig(scale=float("inf"))


def test_value_checks_raise_config_error_on_cpu():
    assert_all(torch.tensor([True, True]), "never")
    assert_all(torch.zeros(0, dtype=torch.bool), "never")
    with pytest.raises(ConfigError, match="ids outside"):
        assert_all(torch.tensor([[True], [False]]), "ids outside [0, 3)")


# -- the backward's grad_output pass (kernels.grad_scale) ------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layout", ["scalar", "per-row", "row-strided"])
def test_grad_scale_kernel_rounds_once(dtype, layout):
    """The in-place scale is the fp32 product rounded once to the gradient's dtype: a scalar on
    a contiguous gradient of one whole block and a remainder (the flat kernel, twice), a factor
    per row read through a stride, and rows with a stride (the row kernel)."""
    from fastkd.choices import Reduction
    from fastkd.kernels import grad_scale
    from fastkd.kernels.common import scale_grad_
    from fastkd.kernels.launch import capture_launches

    gen = torch.Generator().manual_seed(3)
    rows, classes = 3, grad_scale.BLOCK // 2 + 7  # 3093 elements: one block and 1045 more
    grad = (torch.randn(rows, classes + 5, generator=gen) * 3).to(dtype)
    grad = grad[:, :classes] if layout == "row-strided" else grad[:, :classes].contiguous()
    before = grad.clone()
    if layout == "per-row":
        factor = torch.randn(rows, 2, generator=gen)[:, 1]  # stride 2
        product = before.float() * factor.unsqueeze(1)
        reduction, kernels = Reduction.NONE, [grad_scale._scale_rows_kernel]
    else:
        factor = torch.tensor(0.3217, dtype=torch.float32)
        product = before.float() * factor
        reduction = Reduction.SUM
        kernels = (
            [grad_scale._scale_rows_kernel]
            if layout == "row-strided"
            else [grad_scale._scale_flat_kernel, grad_scale._scale_flat_kernel]
        )
    with capture_launches() as launches:  # records the launches, runs nothing
        scale_grad_(grad, factor, reduction)
    assert [launch.kernel for launch in launches] == kernels
    assert torch.equal(grad, before)
    actual = scale_grad_(grad, factor, reduction)
    assert actual.data_ptr() == grad.data_ptr()  # in place
    expected = product.to(dtype)
    if dtype == torch.bfloat16:  # the interpreter casts fp32 -> bf16 by truncation (a GPU: rtne)
        truncated = (product.view(torch.int32) & -65536).view(torch.float32).to(dtype)
        assert ((actual == expected) | (actual == truncated)).all()
    else:
        assert torch.equal(actual, expected)


def test_grad_scale_of_a_gradient_strided_along_classes_falls_back_to_torch():
    """No kernel for a non-unit stride along C: torch, with the kernels' rounding."""
    from fastkd.choices import Reduction
    from fastkd.kernels.common import scale_grad_
    from fastkd.kernels.launch import capture_launches

    grad = torch.randn(4, 10).to(torch.bfloat16)[:, ::2]
    expected = (grad.float() * 0.3217).to(torch.bfloat16)
    with capture_launches() as launches:
        scale_grad_(grad, torch.tensor(0.3217), Reduction.MEAN)
    assert launches == []
    assert torch.equal(grad, expected)
