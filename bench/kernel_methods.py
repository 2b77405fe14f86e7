"""The methods ``fastkd bench kernels`` compares on a case, each a forward + backward step.

fastkd's kernel, the torch reference in eager mode and under torch.compile, Liger-Kernel's KL
path, and Liger's fused cross-entropy and JSD as bandwidth peers (other losses: ``PEERS``, timed
against their own ideal bytes, ``peer_bytes``). A method that cannot run here is the reason why,
a string, in place of its step. ``training_call`` is the loss as ``fastkd train`` calls it
(summed rows, the mean folded into ``scale``, ``grad_output_is_one``); ``training_methods`` puts
torch.compile of the reference and Liger's KL path beside it at one temperature
(``fastkd bench kernels --alone``, ``fastkd bench host``).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import torch

from fastkd.bench.kernel_cases import Case
from fastkd.kernels import (
    TARGET_FIELDS,
    BidirectionalKDConfig,
    PartitionedKDConfig,
    PoolTargets,
    Reduction,
    bidirectional_kd_loss,
    bidirectional_kd_reference,
    partitioned_kd_loss,
    partitioned_kd_reference,
    partitioned_kd_trusted,
)
from fastkd.loss_settings import LossSettings

# Methods that compute other losses than fastkd's (bandwidth peers): their own bytes, no speed-up.
PEERS = ("liger_ce_peer", "liger_jsd_peer")
PEER_NOTES = {
    "liger_ce_peer": "other loss (CE only): bandwidth peer; GB/s of its own B x C read + write",
    "liger_jsd_peer": "other loss (JSD on log-probs): bandwidth peer; GB/s of its 2 reads + write",
}


def methods(case: Case, inputs: dict, args: argparse.Namespace) -> dict[str, Callable | str]:
    """Name -> a forward + backward step, or the reason the method is unavailable."""
    temperature = args.temperature
    labels = inputs["labels"]
    if case.kernel == "bidirectional":
        leaves = [z.requires_grad_() for z in inputs["logits"]]
        config = BidirectionalKDConfig(temperature=temperature)

        def fastkd() -> None:
            bidirectional_kd_loss(leaves, labels, temperature=temperature)[0].backward()

        def reference(za: torch.Tensor, zb: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return bidirectional_kd_reference([za, zb], y, config)[0]

        tensors = (*leaves, labels)
        liger = "dense partitioned teachers only"
    else:
        student, targets = inputs["student"].requires_grad_(), inputs["targets"]
        options = {"mode": "live", "temperature": temperature, "self_index": 0}
        config = PartitionedKDConfig(**options)
        leaves = [student]

        def fastkd() -> None:
            partitioned_kd_loss(student, labels, targets, **options)[0].backward()

        def reference(z: torch.Tensor, y: torch.Tensor, *target_tensors) -> torch.Tensor:
            fields = dict(zip(TARGET_FIELDS, target_tensors, strict=True))
            pool = dataclasses.replace(targets, **fields)  # its tail, the T of its lse
            return partitioned_kd_reference(z, y, pool, config)[0]

        tensors = (student, labels, *(getattr(targets, name) for name in TARGET_FIELDS))
        liger = liger_step(student, targets, temperature) if not targets.is_sparse else ""
        if not liger:
            liger = "dense teachers only"

    def eager() -> None:
        reference(*tensors).backward()

    found: dict[str, Callable | str] = {"fastkd": fastkd, "torch_eager": eager}
    if args.no_compile:
        found["torch_compile"] = "disabled (--no-compile)"
    else:
        compiled = torch.compile(reference)
        found["torch_compile"] = lambda: compiled(*tensors).backward()
    found["liger_kl"] = liger
    found.update(liger_peers(case, inputs))
    for name, step in list(found.items()):
        if callable(step):
            found[name] = _clearing_grads(step, leaves)
    return found


def training_call(case: Case, inputs: dict, temperature: float) -> Callable:
    """The partitioned loss's forward + backward as ``fastkd train`` runs it on one batch
    (``training.strategy``'s call: ``partitioned_kd_trusted`` with a config made once, rows
    summed, the batch mean folded into ``scale``, ``grad_output_is_one``); the student is pool
    member 0 (``live``)."""
    student, labels, targets = inputs["student"], inputs["labels"], inputs["targets"]
    student.requires_grad_()
    settings = LossSettings(temperature=temperature, reduction=Reduction.SUM)
    # made once, as the strategy's cache makes it; the run checked labels and ids already
    config = PartitionedKDConfig.of(
        settings, self_index=0, scale=1.0 / case.rows, grad_output_is_one=True
    )

    def call() -> None:
        partitioned_kd_trusted(student, labels, targets, config)[0].backward()

    return _clearing_grads(call, [student])


def training_methods(
    case: Case, inputs: dict, temperature: float, compile_reference: bool
) -> dict[str, Callable | str]:
    """The training call (``fastkd``), torch.compile of the torch reference with the same
    settings and Liger's KL path (dense teachers), each a forward + backward step, or the reason
    it is unavailable."""
    student, labels, targets = inputs["student"], inputs["labels"], inputs["targets"]
    student.requires_grad_()
    config = PartitionedKDConfig(
        temperature=temperature, reduction=Reduction.SUM, self_index=0, scale=1.0 / case.rows
    )
    found: dict[str, Callable | str] = {"fastkd": training_call(case, inputs, temperature)}
    if compile_reference:

        def reference(z: torch.Tensor, y: torch.Tensor, *target_tensors) -> torch.Tensor:
            fields = dict(zip(TARGET_FIELDS, target_tensors, strict=True))
            pool = dataclasses.replace(targets, **fields)  # its tail, the T of its lse
            return partitioned_kd_reference(z, y, pool, config)[0]

        torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no dynamic shapes
        compiled = torch.compile(reference, dynamic=False)
        tensors = (student, labels, *(getattr(targets, name) for name in TARGET_FIELDS))
        found["torch_compile"] = _clearing_grads(lambda: compiled(*tensors).backward(), [student])
    else:
        found["torch_compile"] = "disabled (--no-compile)"
    liger = liger_step(student, targets, temperature) if not targets.is_sparse else ""
    liger = liger or "dense teachers only"
    found["liger_kl"] = _clearing_grads(liger, [student]) if callable(liger) else liger
    return found


def liger_step(student: torch.Tensor, targets: PoolTargets, temperature: float) -> Callable | str:
    """Liger's KL path on the best teacher's dense log-probabilities, or why it is unavailable."""
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except ImportError:
        return "liger-kernel not installed"
    if not student.is_cuda:
        return "needs CUDA"
    teacher = targets.logprobs[:, 1]
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)

    def step() -> None:
        log_q = torch.log_softmax(student.float() / temperature, dim=-1)
        log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
        (kl(log_q, log_p) * temperature**2).backward()

    return step


def liger_peers(case: Case, inputs: dict) -> dict[str, Callable | str]:
    """Liger's fused cross-entropy and JSD on this case's logits (module docstring: bandwidth
    peers, other losses), each a forward + backward step on its own leaf, or why unavailable.

    The CE kernel writes its gradient over its input, so it gets a copy of the student's logits;
    the JSD takes log-probabilities, made once here (outside the timed step) from the student
    and from a dense teacher: pool member 1 (the live-mode student is member 0), or model 1."""
    student = inputs["logits"][0] if case.kernel == "bidirectional" else inputs["student"]
    if not student.is_cuda:
        return dict.fromkeys(PEERS, "needs CUDA")
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
        from liger_kernel.transformers.jsd import LigerJSD
    except Exception as error:  # not installed, or an import that fails on this machine
        return dict.fromkeys(PEERS, f"liger-kernel not importable: {type(error).__name__}")
    labels = inputs["labels"]
    logits = student.detach().clone().requires_grad_()
    cross_entropy = LigerCrossEntropyLoss()

    def ce_step() -> None:
        _loss_of(cross_entropy(logits, labels)).backward()
        logits.grad = None

    peers: dict[str, Callable | str] = {"liger_ce_peer": ce_step}
    if case.kernel == "bidirectional":
        teacher = inputs["logits"][1]
    elif inputs["targets"].logprobs is not None:
        teacher = inputs["targets"].logprobs[:, 1]
    else:
        peers["liger_jsd_peer"] = "dense teachers only"
        return peers
    with torch.no_grad():
        log_q = torch.log_softmax(student.float(), dim=-1).to(student.dtype)
        log_p = torch.log_softmax(teacher.float(), dim=-1).to(student.dtype)
    log_q.requires_grad_()
    jsd = LigerJSD(beta=0.5)

    def jsd_step() -> None:
        _loss_of(jsd(log_q, log_p)).backward()
        log_q.grad = None

    peers["liger_jsd_peer"] = jsd_step
    return peers


def peer_bytes(method: str, case: Case) -> int:
    """Ideal bytes of a bandwidth peer: its B x C reads and its gradient write."""
    element = torch.tensor([], dtype=getattr(torch, case.dtype)).element_size()
    passes = {"liger_ce_peer": 2, "liger_jsd_peer": 3}[method]
    return passes * case.rows * case.classes * element


def _loss_of(output: object) -> torch.Tensor:
    """The loss tensor of a Liger module's output (a tensor, a tuple, or an object with .loss,
    depending on the version)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple):
        return output[0]
    return output.loss


def _clearing_grads(step: Callable, leaves: list[torch.Tensor]) -> Callable:
    def run() -> None:
        step()
        for leaf in leaves:
            leaf.grad = None

    return run
