"""The KD losses are ``torch.library`` custom ops (``fastkd::partitioned_kd``,
``fastkd::bidirectional_kd``): torch's own ``opcheck`` passes (schema, fake implementation,
autograd registration, AOT dispatch), and ``torch.compile(fullgraph=True)`` of a timm student plus
the loss traces with no graph break and gives eager's loss and gradients.

Run under ``TRITON_INTERPRET=1`` (as every kernel test): the op runs the Triton kernel in the
interpreter; fp64 logits take the torch reference inside the same op.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch.library import opcheck

from fastkd.kernels import (
    TARGET_FIELDS,
    PartitionedKDLoss,
    PoolTargets,
    bidirectional_kd_trusted,
    ops,
    partitioned_kd_trusted,
)
from fastkd.kernels.bidirectional_kd import BidirectionalKDConfig
from fastkd.kernels.partitioned_kd import PartitionedKDConfig

ROWS, MEMBERS, CLASSES = 5, 3, 24
# The interpreter's kernel is one fixed program: opcheck's dynamic-shape AOT test would retrace
# for nothing; test_aot_dispatch_static covers the traced backward.
TESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


def _targets(topk: int, seed: int = 0) -> tuple[torch.Tensor, PoolTargets]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    pool = torch.randn(ROWS, MEMBERS, CLASSES, generator=gen) * 3
    labels[1] = -100
    return labels, PoolTargets.from_logits(pool, labels, topk, "bucket")


def _partitioned_args(topk, dtype, **config):
    labels, targets = _targets(topk)
    config = PartitionedKDConfig.of(None, **config)
    logits = torch.randn(ROWS, CLASSES, dtype=dtype, requires_grad=True)
    tensors = [getattr(targets, name) for name in TARGET_FIELDS]
    return (logits, labels, tensors, ops._target_options(targets), ops._encode(config))


@pytest.mark.parametrize(
    ("topk", "dtype", "config"),
    [
        (0, torch.float32, {"mode": "live"}),
        (10, torch.float32, {"mode": "best", "temperature": 2.0, "reduction": "sum", "scale": 0.5}),
        (0, torch.float64, {"mode": "plain", "reduction": "none"}),
        (5, torch.float32, {"mode": "plain", "grad_output_is_one": True, "reduction": "sum"}),
    ],
    ids=["dense", "top-10", "reference", "plain-sparse"],
)
def test_opcheck_partitioned(topk, dtype, config):
    opcheck(torch.ops.fastkd.partitioned_kd.default, _partitioned_args(topk, dtype, **config),
            test_utils=TESTS)  # fmt: skip


@pytest.mark.parametrize(
    ("dtype", "config"),
    [
        (torch.float32, {"temperature": 2.0}),
        (torch.float32, {"stop_grad": False, "reduction": "sum", "scale": 3.0}),
        (torch.float64, {"reduction": "none"}),
    ],
    ids=["mean", "sum", "reference"],
)
def test_opcheck_bidirectional(dtype, config):
    labels, _ = _targets(0)
    encoded = ops._encode(BidirectionalKDConfig.of(None, **config))
    logits = [torch.randn(ROWS, CLASSES, dtype=dtype, requires_grad=True) for _ in range(3)]
    opcheck(torch.ops.fastkd.bidirectional_kd.default, (logits, labels, encoded), test_utils=TESTS)


def test_the_op_keeps_no_zero_gradients_for_its_statistics():
    """The statistics are not differentiable: backward through the loss alone works, and the
    op's gradient output is detached from the graph."""
    args = _partitioned_args(0, torch.float32)
    loss, stats, _chosen, grad = torch.ops.fastkd.partitioned_kd(*args)
    assert loss.requires_grad and not stats.requires_grad and not grad.requires_grad
    loss.backward()
    torch.testing.assert_close(args[0].grad, grad)


def _student() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=CLASSES).eval()


@pytest.mark.parametrize("call", ["partitioned", "joint", "module"])
def test_compile_fullgraph_of_a_timm_student_and_the_loss_matches_eager(call):
    """The training calls (configs made once, before the steps) and the public module form
    (its config made at construction; its input checks traced too)."""
    joint = call == "joint"
    labels, targets = _targets(10)
    images = torch.randn(ROWS, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    models = [_student(), _student()] if joint else [_student()]
    models[-1].fc.weight.data.mul_(1.5)  # two different models when joint

    if joint:  # the configs of a training run: made once, before its steps
        config = BidirectionalKDConfig.of(
            None, reduction="sum", scale=0.25, grad_output_is_one=True
        )
    else:
        config = PartitionedKDConfig.of(None, mode="live", temperature=2.0)
    criterion = PartitionedKDLoss(mode="live", temperature=2.0)

    def step(images):
        logits = [m(images) for m in models]
        if joint:
            return bidirectional_kd_trusted(logits, labels, config)
        if call == "module":
            return criterion(logits[0], labels, targets)
        return partitioned_kd_trusted(logits[0], labels, targets, config)

    def run(fn):
        for m in models:
            m.zero_grad(set_to_none=True)
        loss, stats = fn(images)
        loss.backward()
        grads = [p.grad.clone() for m in models for p in m.parameters()]
        return loss.detach(), stats.chosen, grads

    explanation = torch._dynamo.explain(step)(images)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss, chosen, grads = run(compiled)
    eager_loss, eager_chosen, eager_grads = run(step)
    torch.testing.assert_close(loss, eager_loss)
    torch.testing.assert_close(chosen, eager_chosen)
    for grad, eager in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(grad, eager)


def test_the_reference_inside_the_op_runs_under_inference_mode():
    """Evaluation loops on CPU (the torch reference backs the op there) run the loss under
    ``torch.inference_mode``: nothing to differentiate, the loss as outside it."""
    from fastkd.kernels import bidirectional_kd_loss, partitioned_kd_loss

    labels, targets = _targets(10)
    logits = torch.randn(ROWS, CLASSES, dtype=torch.float64)
    expected, _ = partitioned_kd_loss(logits, labels, targets, mode="live")
    joint = [logits, logits.flip(0)]
    expected_joint, _ = bidirectional_kd_loss(joint, labels)
    with torch.inference_mode():
        loss, stats = partitioned_kd_loss(logits.clone(), labels, targets, mode="live")
        joint_loss, _ = bidirectional_kd_loss([z.clone() for z in joint], labels)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(joint_loss, expected_joint)
    assert stats.chosen.shape == (ROWS,)
