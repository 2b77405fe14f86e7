"""The partition rule on hand-computed cases."""

import math

import pytest
import torch

from fastkd.errors import ConfigError
from fastkd.partition import (
    NO_TEACHER,
    PartitionMode,
    PartitionScore,
    best_member,
    logits_score,
    select_pool_teacher,
    select_teacher,
    true_class_logprob,
)


def test_true_class_logprob_matches_log_softmax():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([2, 1])
    expected = [3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3)), -math.log(3.0)]
    assert true_class_logprob(logits, labels).tolist() == pytest.approx(expected, abs=1e-6)


def test_best_member_first_of_ties_and_uniqueness():
    scores = torch.tensor([[0.1, 0.5, 0.5], [0.9, 0.2, 0.3], [0.4, 0.4, 0.1]])
    index, unique = best_member(scores)
    assert index.tolist() == [1, 0, 0]
    assert unique.tolist() == [False, True, False]
    index, unique = best_member(scores, exclude=0)
    assert index.tolist() == [1, 2, 1]
    assert unique.tolist() == [False, True, True]


# Pool of three members; member 1 is the student in fixed mode. Rows (log p(y)):
POOL = torch.log(torch.tensor([[0.2, 0.5, 0.6], [0.7, 0.9, 0.1], [0.3, 0.3, 0.3], [0.8, 0.1, 0.8]]))


def test_modes_by_name_and_the_old_name_all_reads_as_best():
    assert [m.value for m in PartitionMode] == ["live", "fixed", "best", "plain"]
    assert PartitionMode("all") is PartitionMode.BEST  # saved configs from before the rename
    assert PartitionMode("best") is PartitionMode.BEST
    with pytest.raises(ValueError):
        PartitionMode("every")


def test_best_mode_best_teacher_everywhere():
    assert select_teacher(POOL, "best").tolist() == [2, 1, 0, 0]
    assert select_teacher(POOL, PartitionMode.BEST, self_index=1).tolist() == [2, 0, 0, 0]


def test_fixed_mode_self_keeps_rows_where_no_teacher_is_strictly_better():
    # Teachers 0 and 2 vs self (1): row0 0.6 > 0.5 -> 2; row1 0.7 < 0.9 -> self;
    # row2 0.3 == 0.3 -> self (KL+DP's strict >); row3 0.8 > 0.1 -> 0 (first of tied best).
    assert select_teacher(POOL, "fixed", self_index=1).tolist() == [2, 1, 1, 0]


def test_live_mode_teaches_only_where_teacher_beats_current_student():
    student = torch.log(torch.tensor([0.55, 0.75, 0.3, 0.9]))
    chosen = select_teacher(POOL, "live", student_score=student, self_index=1)
    # best non-self teachers: 0.6 (2), 0.7 (0), 0.3 (0), 0.8 (0)
    assert chosen.tolist() == [2, NO_TEACHER, NO_TEACHER, NO_TEACHER]
    chosen = select_teacher(POOL, "live", student_score=torch.log(torch.full((4,), 0.25)))
    assert chosen.tolist() == [2, 1, 0, 0]


def test_plain_mode_reads_only_the_mixture_column():
    mixture = POOL[:, :1]  # the losses hand plain its one mixed column: it teaches every row
    assert select_teacher(mixture, "plain").tolist() == [0, 0, 0, 0]
    with pytest.raises(ConfigError, match="one column"):  # an unmixed pool is never "best"
        select_teacher(POOL, "plain")


def test_scores_of_logits_label_and_confidence():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 4.0, 0.0]])
    labels = torch.tensor([0, 1])
    lse = torch.logsumexp(logits, dim=-1)
    label = logits_score(logits, labels, "label")
    assert label.tolist() == pytest.approx((logits[[0, 1], [0, 1]] - lse).tolist(), abs=1e-6)
    confidence = logits_score(logits, labels, PartitionScore.CONFIDENCE)
    assert confidence.tolist() == pytest.approx((torch.tensor([3.0, 4.0]) - lse).tolist(), abs=1e-6)


def test_confidence_scores_choose_where_the_label_would_not():
    # Rows of [B, M] probabilities; member 1 is the student in fixed mode.
    p_label = torch.tensor([[0.30, 0.20, 0.10], [0.05, 0.50, 0.04]])  # p(y)
    p_top = torch.tensor([[0.40, 0.50, 0.90], [0.60, 0.55, 0.70]])  # max_c p(c)
    label, top = p_label.log(), p_top.log()
    assert select_teacher(label, "best").tolist() == [0, 1]
    assert select_teacher(top, "best").tolist() == [2, 2]
    # fixed: by label row 0 teacher 0 (0.30 > 0.20), row 1 self (0.05 < 0.50); by confidence
    # teacher 2 on both rows (0.90 > 0.50, 0.70 > 0.55).
    assert select_teacher(label, "fixed", self_index=1).tolist() == [0, 1]
    assert select_teacher(top, "fixed", self_index=1).tolist() == [2, 2]
    # live: the student's own score of the same kind; ties go to the student.
    student_label, student_top = torch.tensor([0.25, 0.01]).log(), torch.tensor([0.95, 0.70]).log()
    assert select_teacher(label, "live", student_score=student_label).tolist() == [0, 1]
    assert select_teacher(top, "live", student_score=student_top).tolist() == [
        NO_TEACHER,
        NO_TEACHER,
    ]


def test_bad_arguments_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="self_index"):
        select_teacher(POOL, "fixed")
    with pytest.raises(ValueError, match="current student"):
        select_teacher(POOL, "live")
    with pytest.raises(ValueError, match="outside the pool"):
        select_teacher(POOL, "best", self_index=3)
    with pytest.raises(ValueError, match="no teacher"):
        select_teacher(POOL[:, :1], "fixed", self_index=0)
    with pytest.raises(ValueError):
        select_teacher(POOL, "nonsense")


def test_pool_teacher_two_models_follow_bi_kd_ties_to_b():
    scores = torch.log(torch.tensor([[0.6, 0.4], [0.4, 0.6], [0.5, 0.5]]))
    assert select_pool_teacher(scores).tolist() == [0, 1, 1]


def test_pool_teacher_n_models_tie_gives_no_teacher():
    scores = torch.log(torch.tensor([[0.6, 0.4, 0.1], [0.3, 0.6, 0.6], [0.2, 0.3, 0.9]]))
    assert select_pool_teacher(scores).tolist() == [0, NO_TEACHER, 2]
