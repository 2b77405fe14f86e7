"""The fused partitioned KD kernel, run for real under the Triton interpreter, against fp64 torch.

The reference (``partitioned_kd_reference``) is plain autograd math; it is itself checked against
``torch.nn.functional`` and against hand-computed tail probabilities below.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastkd.compression import tail_logmass
from fastkd.kernels import (
    PartitionedKDConfig,
    PartitionedKDLoss,
    PoolTargets,
    partitioned_kd_loss,
    partitioned_kd_reference,
)
from fastkd.partition import NO_TEACHER

IGNORE = -100
TAILS = ("uniform", "bucket", "sampled")
# (rtol, atol as a fraction of the largest reference gradient) of what the kernel writes.
GRAD_TOL = {torch.float32: (1e-4, 1e-5), torch.bfloat16: (2e-2, 1e-2), torch.float16: (2e-3, 2e-3)}


def make_case(
    rows: int,
    classes: int,
    *,
    members: int = 3,
    topk: int = 0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    tail: str = "bucket",
) -> tuple[torch.Tensor, torch.Tensor, PoolTargets]:
    """Student logits, labels (row 1 ignored when rows > 2) and pool targets of spread confidence
    (sparse with ``tail`` when ``topk`` > 0; the sampled tail draws 5 ids)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    pool = torch.randn(rows, members, classes, generator=gen) * 3
    # Members and the student lean on the label by different amounts, so every partition
    # outcome occurs.
    boost = torch.rand(rows, members, generator=gen) * 8
    pool[torch.arange(rows), :, labels] += boost
    student = torch.randn(rows, classes, generator=gen) * 2
    student[torch.arange(rows), labels] += torch.rand(rows, generator=gen) * 8
    if rows > 2:
        labels[1] = IGNORE
    draws = 5 if tail == "sampled" else 0
    targets = PoolTargets.from_logits(pool, labels, topk, tail, draws, generator=gen)
    return student.to(dtype), labels, targets


def run_kernel(student, labels, targets, grad_output=None, **options):
    """Loss, gradient and stats through autograd; the student tensor is left untouched."""
    logits = student.clone().requires_grad_()
    loss, stats = partitioned_kd_loss(logits, labels, targets, **options)
    loss.backward(grad_output)
    return loss.detach(), logits.grad, stats


def run_reference(student, labels, targets, grad_output=None, **options):
    options.pop("max_block", None)
    logits = student.double().requires_grad_()
    loss, stats = partitioned_kd_reference(logits, labels, targets, PartitionedKDConfig(**options))
    loss.backward(None if grad_output is None else grad_output.double())
    return loss.detach(), logits.grad, stats


def assert_matches_reference(student, labels, targets, grad_output=None, **options):
    loss, grad, stats = run_kernel(student, labels, targets, grad_output, **options)
    ref_loss, ref_grad, ref_stats = run_reference(student, labels, targets, grad_output, **options)
    assert grad.dtype == student.dtype
    rtol, atol = GRAD_TOL[student.dtype]
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(
        grad.double(), ref_grad, rtol=rtol, atol=atol * ref_grad.abs().max().item()
    )
    assert torch.equal(stats.chosen, ref_stats.chosen)
    torch.testing.assert_close(stats.kl.double(), ref_stats.kl.double(), rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(
        stats.p_student.double(), ref_stats.p_student.double(), rtol=1e-5, atol=1e-7
    )
    torch.testing.assert_close(
        stats.p_teacher.double(), ref_stats.p_teacher.double(), rtol=1e-5, atol=1e-7
    )
    return stats


TARGETS = {"dense": (0, "bucket"), **{f"top7-{t}": (7, t) for t in TAILS}}


@pytest.mark.parametrize("mode", ["live", "fixed", "best"])
@pytest.mark.parametrize("kind", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_every_mode_and_dtype_matches_fp64_reference(mode, kind, dtype):
    topk, tail = TARGETS[kind]
    student, labels, targets = make_case(6, 1000, topk=topk, dtype=dtype, tail=tail)
    self_index = 1 if mode == "fixed" else None
    stats = assert_matches_reference(
        student, labels, targets, mode=mode, self_index=self_index, temperature=2.5, max_block=256
    )
    assert stats.chosen[1] == NO_TEACHER  # the ignored row


@pytest.mark.parametrize(
    ("rows", "classes", "max_block"),
    [(5, 10, None), (4, 1001, None), (4, 1001, 64), (2, 32003, None)],
    ids=["C10", "C1001-one-tile", "C1001-16-tiles", "C32003-two-tiles"],
)
@pytest.mark.parametrize("kind", TARGETS)
def test_class_counts_and_tiling(rows, classes, max_block, kind):
    topk, tail = TARGETS[kind]
    student, labels, targets = make_case(rows, classes, topk=min(topk, 5), seed=classes, tail=tail)
    assert_matches_reference(
        student, labels, targets, mode="best", kd_weight=0.7, ce_weight=0.3, max_block=max_block
    )


def test_per_row_grad_output_with_reduction_none():
    student, labels, targets = make_case(5, 300, topk=4)
    grad_output = torch.tensor([0.5, 3.0, -2.0, 0.0, 1.25])
    loss, _, _ = run_kernel(student, labels, targets, grad_output, reduction="none")
    assert loss.shape == (5,) and loss[1] == 0  # row 1 is ignored
    assert_matches_reference(student, labels, targets, grad_output, reduction="none", temperature=3)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_scalar_grad_output_and_reductions(reduction):
    student, labels, targets = make_case(4, 100)
    assert_matches_reference(
        student, labels, targets, torch.tensor(-1.5), reduction=reduction, mode="best"
    )


def test_all_rows_ignored_give_zero_loss_and_gradient():
    student, _, targets = make_case(3, 50, topk=3)
    labels = torch.full((3,), IGNORE)
    loss, grad, stats = run_kernel(student, labels, targets, mode="best")
    assert loss.item() == 0.0
    assert torch.count_nonzero(grad) == 0
    assert stats.chosen.tolist() == [NO_TEACHER] * 3
    assert torch.count_nonzero(stats.kl) == 0


def test_labels_outside_topk_use_the_exact_true_class_logprob():
    student, labels, _ = make_case(4, 200, seed=3)
    pool = torch.randn(4, 2, 200, generator=torch.Generator().manual_seed(5))
    labels = pool[:, 0].argmin(dim=1)  # the label is the least likely class of member 0
    targets = PoolTargets.from_logits(pool, labels, topk=6, tail="bucket")
    assert not (targets.topk_ids == labels.view(-1, 1, 1)).any(dim=-1).all()
    stats = assert_matches_reference(student, labels, targets, mode="best", temperature=1.5)
    expected = torch.softmax(pool, dim=-1)[torch.arange(4), :, labels].max(dim=1).values
    torch.testing.assert_close(stats.p_teacher, expected)


def test_ties_pick_the_first_best_teacher_and_fixed_keeps_self_on_equal_confidence():
    student, labels, targets = make_case(3, 40, members=3)
    # Row 0: members 1 and 2 tie as best teacher. Row 2: the teacher ties with self (member 0).
    targets.true_logprob[0] = torch.tensor([-3.0, -0.5, -0.5])
    targets.true_logprob[2] = torch.tensor([-0.1, -0.1, -5.0])
    stats = assert_matches_reference(student, labels, targets, mode="best", self_index=0)
    assert stats.chosen[0] == 1
    stats = assert_matches_reference(student, labels, targets, mode="fixed", self_index=0)
    assert stats.chosen[2] == 0


def test_live_mode_teaches_only_rows_where_the_teacher_beats_the_student():
    student, labels, targets = make_case(8, 64, seed=11)
    stats = assert_matches_reference(student, labels, targets, mode="live", temperature=2.0)
    taught = stats.chosen != NO_TEACHER
    assert taught.any() and (~taught[labels != IGNORE]).any()
    assert torch.all(stats.p_teacher[taught] > stats.p_student[taught])
    assert torch.all(stats.kl[~taught] == 0)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("topk", [50, 49], ids=["k=C", "k=C-1"])
def test_sparse_targets_that_keep_every_class_equal_dense_targets(tail, topk):
    student, labels, _ = make_case(4, 50)
    labels[0] = 7  # row 0: the label outside the top-49, so every class is known
    pool = torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(2)) * 2
    pool[0, :, 7] = -20.0
    dense = PoolTargets.from_logits(pool, labels)
    sparse = PoolTargets.from_logits(pool, labels, topk, tail, 3)
    for options in ({"mode": "best", "temperature": 3.0}, {"mode": "fixed", "self_index": 2}):
        loss_dense, grad_dense, stats_dense = run_kernel(student, labels, dense, **options)
        loss_sparse, grad_sparse, stats_sparse = run_kernel(student, labels, sparse, **options)
        # Both hold the same fp16 log-probabilities; at T = 1 the dense row is used as stored,
        # the sparse one renormalised: they differ by fp16 rounding of the row's mass.
        torch.testing.assert_close(loss_sparse, loss_dense, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(grad_sparse, grad_dense, rtol=1e-3, atol=2e-4)
        torch.testing.assert_close(stats_sparse.kl, stats_dense.kl, rtol=1e-3, atol=2e-4)


def hand_case(tail: str) -> PoolTargets:
    """C = 5, label 4 with p = 0.1; top-2: class 3 (p 0.5) and class 0 (p 0.2); the tail is
    classes 1 and 2 with p 0.15 and 0.05; the sampled tail drew class 1 twice."""
    return PoolTargets(
        true_logprob=torch.tensor([[math.log(0.1)]]),
        topk_logprobs=torch.tensor([[[math.log(0.5), math.log(0.2)]]]),
        topk_ids=torch.tensor([[[3, 0]]]),
        log_tail=torch.tensor([[math.log(0.2)]]),
        log_tail_sqrt=torch.tensor([[math.log(0.15**0.5 + 0.05**0.5)]]),
        tail_ids=torch.tensor([[[1, 1]]]) if tail == "sampled" else None,
        tail=tail,
    )


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_tail_models_on_a_hand_computed_case(tail, temperature):
    targets = hand_case(tail)
    student = torch.tensor([[0.3, -1.0, 2.0, 0.5, 1.0]])
    # Unnormalised target at T: p^(1/T) on the known classes; the tail's mass at T is
    # sum_tail p^(1/T), exact at T = 1 and 2, split equally (uniform, and the bucket's target)
    # or by the draws (sampled: all on class 1).
    beta = 1 / temperature
    tail_mass = 0.15**beta + 0.05**beta
    spread = [tail_mass, 0.0] if tail == "sampled" else [tail_mass / 2, tail_mass / 2]
    target = torch.tensor([0.2**beta, *spread, 0.5**beta, 0.1**beta], dtype=torch.float64)
    target /= target.sum()
    log_q = F.log_softmax(student.double() / temperature, dim=-1)[0]
    terms = torch.where(target > 0, target * (target.log() - log_q), 0.0)
    if tail == "bucket":  # the tail (classes 1, 2) compared as one bucket
        p_tail, q_tail = target[1:3].sum(), log_q[1:3].exp().sum()
        expected = terms[[0, 3, 4]].sum() + p_tail * (p_tail.log() - q_tail.log())
    else:
        expected = terms.sum()
    members = torch.zeros(1, dtype=torch.long)
    torch.testing.assert_close(
        targets.target_logprobs(members, torch.tensor([4]), 5, temperature).exp().double(),
        target.view(1, 5).float().double(),
        rtol=1e-5,
        atol=1e-7,
    )
    options = {"mode": "best", "temperature": temperature}
    _, _, stats = run_kernel(student, torch.tensor([4]), targets, **options)
    torch.testing.assert_close(stats.kl.double(), expected.view(1), rtol=1e-5, atol=1e-7)
    assert_matches_reference(student, torch.tensor([4]), targets, **options)


def test_reference_equals_torch_functional_cross_entropy_plus_kl():
    student, labels, targets = make_case(5, 30, members=2)
    temperature = 2.0
    loss, stats = partitioned_kd_reference(
        student, labels, targets, PartitionedKDConfig(mode="best", temperature=temperature)
    )
    teacher = targets.logprobs[torch.arange(5), stats.chosen.clamp_min(0)].float()
    counted = labels != IGNORE
    kl = F.kl_div(
        F.log_softmax(student[counted] / temperature, dim=-1),
        F.log_softmax(teacher[counted] / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    expected = F.cross_entropy(student, labels, ignore_index=IGNORE) + temperature**2 * kl
    torch.testing.assert_close(loss, expected)


def test_inplace_grad_overwrites_the_logits_with_the_gradient():
    student, labels, targets = make_case(4, 120, topk=5, dtype=torch.bfloat16)
    _, grad, _ = run_kernel(student, labels, targets, mode="best")
    logits = student.clone().requires_grad_()
    loss, _ = partitioned_kd_loss(logits, labels, targets, mode="best", inplace_grad=True)
    loss.backward()
    assert torch.equal(logits.detach(), grad)
    assert torch.equal(logits.grad, grad)


def test_cpu_fallback_without_interpreter_equals_the_kernel(monkeypatch):
    student, labels, targets = make_case(4, 90, topk=6)
    options = {"mode": "live", "temperature": 1.7}
    loss, grad, stats = run_kernel(student, labels, targets, **options)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch_loss, torch_grad, torch_stats = run_kernel(student, labels, targets, **options)
    assert torch_loss.dtype == torch.float32 and torch_grad.dtype == torch.float32
    torch.testing.assert_close(loss, torch_loss)
    torch.testing.assert_close(grad, torch_grad)
    assert torch.equal(stats.chosen, torch_stats.chosen)


def test_module_wraps_the_function():
    student, labels, targets = make_case(3, 20, topk=2)
    criterion = PartitionedKDLoss(mode="fixed", self_index=0, temperature=2.0)
    assert "mode=PartitionMode.FIXED" in repr(criterion)
    loss, stats = criterion(student, labels, targets)
    expected, expected_stats = partitioned_kd_loss(
        student, labels, targets, mode="fixed", self_index=0, temperature=2.0
    )
    torch.testing.assert_close(loss, expected)
    assert torch.equal(stats.chosen, expected_stats.chosen)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": torch.tensor([0, 25, 1])}, "labels must lie in"),
        ({"labels": torch.tensor([0, 1])}, r"labels must be \[3\]"),
        ({"mode": "fixed"}, "needs the student's pool column"),
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"max_block": 100}, "max_block must be a power of two"),
        ({"student": torch.zeros(3, 20, 1)}, r"student_logits must be \[B, C\]"),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(change, message):
    student, labels, targets = make_case(3, 20)
    arguments = {"student": student, "labels": labels, "mode": "best"} | change
    with pytest.raises(ValueError, match=message):
        partitioned_kd_loss(arguments.pop("student"), arguments.pop("labels"), targets, **arguments)


def test_pool_targets_refuse_mismatched_tensors():
    with pytest.raises(ValueError, match="either topk_logprobs"):
        PoolTargets(true_logprob=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"logprobs must be \[B, M, C\]"):
        PoolTargets(true_logprob=torch.zeros(2, 3), logprobs=torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="needs topk_logprobs, topk_ids, log_tail"):
        PoolTargets(
            true_logprob=torch.zeros(2, 3),
            topk_logprobs=torch.zeros(2, 3, 4),
            topk_ids=torch.zeros(2, 3, 4, dtype=torch.long),
        )
    with pytest.raises(ValueError, match="tail_ids is given exactly when"):
        PoolTargets(**{**hand_case("bucket").__dict__, "tail": "sampled"})
    with pytest.raises(ValueError, match="unknown tail model 'wide'"):
        PoolTargets(**{**hand_case("bucket").__dict__, "tail": "wide"})
    sparse = PoolTargets.from_logits(torch.randn(2, 3, 10), torch.tensor([1, 2]), topk=4)
    with pytest.raises(ValueError, match="has 2 rows"):
        sparse.check(num_rows=5, num_classes=10)
    sparse.topk_ids[0, 0, 0] = 10
    with pytest.raises(ValueError, match="ids outside"):
        sparse.check(num_rows=2, num_classes=10)


def test_tail_logmass_is_exact_at_t_1_and_2_and_bounded_elsewhere():
    """The tail's mass at T: the stored values at T = 1 and 2; elsewhere an estimate that stays
    within the power-mean bounds of any tail, and close for Gaussian tail logits."""
    gen = torch.Generator().manual_seed(0)
    steep = -3.0 * torch.arange(1, 991, dtype=torch.float64).log()  # a ranked, fast-falling tail
    gaussian = torch.randn(990, generator=gen, dtype=torch.float64) * 1.5 - 9.0
    for logits in (steep, gaussian):
        log_p = logits - 5.0  # the tail's log-probabilities (its mass < 1)
        log_tail, log_tail_sqrt = log_p.logsumexp(0), (log_p / 2).logsumexp(0)
        count = torch.tensor(990)
        for beta in (1.0, 0.5, 0.8, 0.25, 1.5):
            estimate = tail_logmass(log_tail, log_tail_sqrt, count, beta)
            exact = (beta * log_p).logsumexp(0)
            if beta in (1.0, 0.5):
                assert estimate == exact
            chord = (1 - beta) * count.double().log() + beta * log_tail
            low, high = sorted((beta * log_tail.item(), chord.item()))
            assert low - 1e-12 <= estimate.item() <= high + 1e-12
            if logits is gaussian and beta < 1:  # between the stored points: close (the
                assert abs(estimate - exact) < 0.05  # parabola is exact for Gaussian logits)
    assert torch.isneginf(tail_logmass(log_tail, log_tail_sqrt, torch.tensor(0), 0.25))


def test_pool_targets_refuse_unsorted_draws_and_draws_from_the_top_k():
    targets = hand_case("sampled")
    targets.check(num_rows=1, num_classes=5)
    unsorted = PoolTargets(**{**targets.__dict__, "tail_ids": torch.tensor([[[2, 1]]])})
    with pytest.raises(ValueError, match="tail_ids must be sorted"):
        unsorted.check(num_rows=1, num_classes=5)
    known = PoolTargets(**{**targets.__dict__, "tail_ids": torch.tensor([[[1, 3]]])})
    with pytest.raises(ValueError, match="draws a top-k class"):
        known.check(num_rows=1, num_classes=5)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("boost", [10.0, 25.0, 40.0])
def test_bucket_tail_with_a_student_sure_of_the_known_classes(temperature, boost):
    """The student leaves less than 1e-9 of its mass in the tail (at boost 25 and T = 1): its
    tail mass must not come from 1 minus its known mass, which fp32 rounds to nothing."""
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(4, 2, 1000, generator=gen) * 3
    labels = torch.randint(0, 1000, (4,), generator=gen)
    pool[torch.arange(4), :, labels] += 10
    targets = PoolTargets.from_logits(pool, labels, 10, "bucket")
    student = torch.randn(4, 1000, generator=gen)
    student[torch.arange(4), labels] += boost
    for row in range(4):  # the student's runners-up are the teacher's top-k
        student[row, targets.topk_ids[row, 0]] += 8
    assert_matches_reference(student, labels, targets, mode="best", temperature=temperature)


# -- plain KD: the teachers' mixture ---------------------------------------------------------------


def independent_member_target(targets: PoolTargets, member: int, labels, classes, temperature):
    """[B, C] fp64 p_m,T from the stored values, without kernels.targets: dense softmax(lp / T);
    sparse: the known classes' p^(1/T) and the tail's stored mass at T (T = 1, 2) spread equally
    over the unknown classes (the uniform reading, also the bucket's in a mixture)."""
    if targets.logprobs is not None:
        return torch.softmax(targets.logprobs[:, member].double() / temperature, dim=-1)
    rows = targets.num_rows
    known = torch.full((rows, classes), -math.inf, dtype=torch.float64)
    safe = labels.clamp(0, classes - 1)
    known[torch.arange(rows), safe] = targets.true_logprob[:, member].double()
    for b in range(rows):
        known[b, targets.topk_ids[b, member].long()] = targets.topk_logprobs[b, member].double()
    unknown = torch.isneginf(known)
    stored_mass = targets.log_tail if temperature == 1.0 else targets.log_tail_sqrt
    tail_mass = stored_mass[:, member].double().exp().unsqueeze(1)
    spread = tail_mass / unknown.sum(1, keepdim=True).clamp_min(1)
    target = torch.where(unknown, spread, (known / temperature).exp())
    return target / target.sum(1, keepdim=True)


def independent_plain_loss(student, labels, targets, temperature, teachers, ce_weight=1.0):
    """fp64 mean over the counted rows of ce * CE + T^2 KL(mean_m p_m,T || q_T), and its
    gradient in the student's logits. One teacher with the bucket tail keeps its own reading:
    the KL of the known classes and the tail as one bucket."""
    classes = student.shape[1]
    z = student.double().requires_grad_()
    teachers = list(teachers)
    p = sum(
        independent_member_target(targets, m, labels, classes, temperature) for m in teachers
    ) / len(teachers)
    log_q = F.log_softmax(z / temperature, dim=-1)
    if len(teachers) == 1 and targets.is_sparse and targets.tail.value == "bucket":
        known = torch.zeros_like(p, dtype=torch.bool)
        known[torch.arange(len(labels)), labels.clamp(0, classes - 1)] = True
        known.scatter_(1, targets.topk_ids[:, teachers[0]].long(), True)
        q = log_q.exp()
        p_tail = torch.where(known, 0.0, p).sum(-1, keepdim=True)
        q_tail = torch.where(known, 0.0, q).sum(-1, keepdim=True)
        p = torch.cat([torch.where(known, p, 0.0), p_tail], dim=1)
        log_q = torch.cat([torch.where(known, log_q, 0.0), q_tail.log()], dim=1)
    kl = torch.where(p > 0, p * (p.log() - log_q), 0.0).sum(-1)
    counted = labels != IGNORE
    ce = F.cross_entropy(z, torch.where(counted, labels, 0), reduction="none")
    loss = torch.where(counted, ce_weight * ce + temperature**2 * kl, 0.0).sum() / counted.sum()
    loss.backward()
    return loss.detach(), z.grad


def dense_fp32_case(rows, classes, members, seed=0):
    """A student and dense targets stored in fp32 (normalised to fp32 rounding)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    labels[1] = IGNORE
    pool = torch.randn(rows, members, classes, generator=gen, dtype=torch.float64) * 3
    log_p = pool.log_softmax(-1)
    safe = labels.clamp_min(0).view(-1, 1, 1).expand(rows, members, 1)
    targets = PoolTargets(log_p.gather(2, safe).squeeze(2).float(), logprobs=log_p.float())
    return torch.randn(rows, classes, generator=gen) * 2, labels, targets


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("members", [1, 3])
@pytest.mark.parametrize("kind", ["dense", "top7-uniform", "top7-bucket"])
def test_plain_kd_is_kl_to_the_teachers_mean_distribution(kind, members, temperature):
    if kind == "dense":
        student, labels, targets = dense_fp32_case(5, 300, members)
    else:
        student, labels, targets = make_case(5, 300, members=members, topk=7, tail=kind[5:])
    options = {"mode": "plain", "temperature": temperature, "ce_weight": 0.5}
    expected, expected_grad = independent_plain_loss(
        student, labels, targets, temperature, range(members), ce_weight=0.5
    )
    loss, grad, stats = run_kernel(student, labels, targets, **options)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-5, atol=2e-5)
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-5 * scale)
    assert stats.chosen.tolist() == [0, NO_TEACHER, 0, 0, 0]  # the mixture, on every row
    ref_loss, ref_grad, _ = run_reference(student, labels, targets, **options)
    torch.testing.assert_close(ref_loss, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref_grad, expected_grad, rtol=1e-5, atol=1e-6 * scale)


def test_plain_kd_leaves_out_the_students_column_and_matches_the_reference_on_sampled_tails():
    student, labels, targets = make_case(6, 200, members=3, topk=5, tail="sampled")
    # Undrawn classes of every teacher have p = 0 in the mixture: no NaN in the kernel.
    assert_matches_reference(student, labels, targets, mode="plain", temperature=2.0)
    dense_student, dense_labels, dense = dense_fp32_case(4, 50, 3)
    with_self, _, _ = run_kernel(dense_student, dense_labels, dense, mode="plain", self_index=1)
    expected, _ = independent_plain_loss(dense_student, dense_labels, dense, 1.0, [0, 2])
    torch.testing.assert_close(with_self.double(), expected, rtol=2e-5, atol=2e-5)


def test_mixture_column_and_single_teacher():
    _, labels, sparse = make_case(4, 30, members=2, topk=3)
    one = sparse.select([1])
    assert one.mixture(2.0, labels, 30) is one  # one teacher: itself, sparse
    assert sparse.mixture(2.0, labels, 30, exclude=0).is_sparse
    mixed = sparse.mixture(2.0, labels, 30)
    assert mixed.logprobs.shape == (4, 1, 30) and mixed.logprobs.dtype == torch.float32
    # The column is T log p (normalised); true_logprob the mixture's log p(y) at T = 1.
    torch.testing.assert_close(
        (mixed.logprobs[:, 0] / 2.0).logsumexp(-1), torch.zeros(4), atol=1e-5, rtol=0
    )
    expected = sparse.true_logprob.exp().mean(1).log()
    torch.testing.assert_close(mixed.true_logprob[:, 0], expected)


# -- the label-free partition score ----------------------------------------------------------------


def test_partition_scores_of_dense_and_sparse_targets():
    gen = torch.Generator().manual_seed(4)
    pool = torch.randn(3, 2, 40, generator=gen) * 3
    labels = torch.tensor([0, 5, 39])
    expected = pool.log_softmax(-1).amax(-1)
    for topk in (0, 4):
        targets = PoolTargets.from_logits(pool, labels, topk)
        torch.testing.assert_close(targets.max_logprob(), expected, rtol=0, atol=2e-3)
        assert torch.equal(targets.partition_scores("label"), targets.logprob())
        assert torch.equal(targets.partition_scores("confidence"), targets.max_logprob())


@pytest.mark.parametrize("mode", ["live", "fixed", "best"])
@pytest.mark.parametrize("kind", ["dense", "top7-bucket", "top7-sampled"])
def test_every_mode_with_the_confidence_score_matches_the_reference(mode, kind):
    topk, tail = TARGETS[kind]
    student, labels, targets = make_case(6, 500, topk=topk, tail=tail, seed=7)
    self_index = 1 if mode == "fixed" else None
    for temperature in (1.0, 2.0):
        stats = assert_matches_reference(
            student, labels, targets, mode=mode, self_index=self_index,
            partition_score="confidence", temperature=temperature, max_block=128,
        )  # fmt: skip
    if mode == "live":  # what was compared: the top-class probabilities
        student_top = torch.softmax(student.float(), -1).amax(-1)
        counted = labels != IGNORE
        torch.testing.assert_close(stats.p_student[counted], student_top[counted])


def test_label_and_confidence_choose_differently():
    """Member 0 is right but unsure, member 1 sure of another class: the label picks 0, the
    confidence 1; a student sure of a wrong class is taught by label, not by confidence."""
    classes = 6
    labels = torch.tensor([2])
    pool = torch.zeros(1, 2, classes)
    pool[0, 0, 2] = 1.0  # member 0: p(y) about 0.35, its top class the label
    pool[0, 1, 4] = 5.0  # member 1: p(4) about 0.97, p(y) about 0.006
    targets = PoolTargets.from_logits(pool, labels)
    student = torch.zeros(1, classes)
    student[0, 5] = 4.0  # the student: p(5) about 0.92, p(y) about 0.015
    by_label = assert_matches_reference(student, labels, targets, mode="live")
    by_confidence = assert_matches_reference(
        student, labels, targets, mode="live", partition_score="confidence"
    )
    assert by_label.chosen.tolist() == [0]
    assert by_confidence.chosen.tolist() == [1]
    student[0, 5] = 6.0  # now the student is the surest: no teacher by confidence
    by_confidence = assert_matches_reference(
        student, labels, targets, mode="live", partition_score="confidence"
    )
    assert by_confidence.chosen.tolist() == [NO_TEACHER]
    fixed = assert_matches_reference(
        student, labels, targets, mode="fixed", self_index=0, partition_score="confidence"
    )
    assert fixed.chosen.tolist() == [1]  # member 1 sure of class 4 beats the stored self
