"""``torch.compile`` of a timm student plus the KD loss on a GPU: inductor, ``fullgraph=True``.

On CPU ``tests/test_custom_op.py`` holds the trace (no graph break) with the aot_eager backend;
here inductor generates the student's code around the registered op, which runs the Triton
kernel, and the compiled step must give eager's loss, teacher choices and gradients.
``scripts/gpu-check`` (stage ``train-steps``) runs it with ``TRITON_INTERPRET`` unset.
"""

from __future__ import annotations

import os

import pytest
import timm
import torch

from fastkd.kernels import BidirectionalKDLoss, PartitionedKDLoss, PoolTargets

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs CUDA and TRITON_INTERPRET unset or 0 (scripts/gpu-check on a GPU machine)",
)
ROWS, MEMBERS, CLASSES = 32, 3, 1000


def _student(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=CLASSES).cuda()


@pytest.mark.parametrize(  # two inductor compiles: each takes tens of seconds
    ("joint", "temperature"), [(False, 2.0), (True, 1.0)], ids=["partitioned-T2", "joint-T1"]
)
def test_inductor_fullgraph_of_a_student_and_the_loss_matches_eager(joint, temperature):
    gen = torch.Generator(device="cuda").manual_seed(0)
    labels = torch.randint(0, CLASSES, (ROWS,), device="cuda", generator=gen)
    pool = torch.randn(ROWS, MEMBERS, CLASSES, device="cuda", generator=gen) * 3
    targets = PoolTargets.from_logits(pool, labels, temperature=temperature)
    images = torch.randn(ROWS, 3, 64, 64, device="cuda", generator=gen)
    models = [_student(0), _student(1)] if joint else [_student(0)]
    if joint:
        criterion = BidirectionalKDLoss(temperature=temperature, stop_grad=False)
    else:
        criterion = PartitionedKDLoss(mode="live", temperature=temperature)

    def step(images):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = [m(images) for m in models]
        if joint:
            return criterion(logits, labels)
        return criterion(logits[0], labels, targets)

    def run(fn):
        for m in models:
            m.zero_grad(set_to_none=True)
        loss, stats = fn(images)
        loss.backward()
        grads = [p.grad.float().clone() for m in models for p in m.parameters()]
        return loss.detach().float(), stats.chosen, grads

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)  # inductor
    loss, chosen, grads = run(compiled)
    eager_loss, eager_chosen, eager_grads = run(step)
    # bf16 logits: inductor's fused convolutions round differently from eager's
    torch.testing.assert_close(loss, eager_loss, rtol=2e-2, atol=2e-2)
    assert (chosen == eager_chosen).float().mean() > 0.9
    for grad, eager in zip(grads, eager_grads, strict=True):
        scale = eager.abs().max().clamp_min(1e-6)
        assert ((grad - eager).abs().max() / scale) < 0.1
