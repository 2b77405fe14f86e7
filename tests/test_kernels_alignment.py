"""The alignment the kernels promise the compiler (``tl.multiple_of``) holds for every row.

A wrong promise is a misaligned 16-byte access on a GPU, which the interpreter cannot show; so
the launchers' rule (``common.vector_width``, ``common.aligned_width``) is checked here by brute
force against the definition: at the column where the student's row meets a 16-byte boundary,
every promised tensor's offset is a multiple of the width promised for it.
"""

from __future__ import annotations

import itertools

import torch

from fastkd.kernels import common


def student_head(row: int, stride: int, vec: int) -> int:
    return (-(row * stride)) % vec


def test_vector_width_is_sixteen_bytes_of_an_aligned_tensor_and_one_otherwise():
    for dtype, width in ((torch.float32, 4), (torch.bfloat16, 8), (torch.float16, 8)):
        base = torch.empty(64, 33, dtype=dtype)
        assert base.data_ptr() % 16 == 0
        assert common.vector_width(base) == width
        assert common.vector_width(base[:, 1:]) == 1  # storage offset of one element


def test_aligned_width_promises_only_what_holds_for_every_row_and_member():
    promised = 0
    dtypes = (torch.float32, torch.bfloat16)
    for student_dtype, other_dtype, student_stride, row_stride, member_stride in itertools.product(
        dtypes,
        dtypes,
        (1000, 21841, 32000, 21843),
        (21841, 43682, 64000, 1000, 3),
        (0, 21841, 32000, 8),
    ):
        student = torch.empty(2, student_stride, dtype=student_dtype)
        other = torch.empty(2, dtype=other_dtype)
        vec = common.vector_width(student)
        width = common.aligned_width(other, student, vec, (row_stride, member_stride))
        if width == 1:
            continue
        promised += 1
        for row, member in itertools.product(range(64), range(4)):
            offset = (
                row * row_stride + member * member_stride + student_head(row, student_stride, vec)
            )
            assert offset % width == 0, (student_dtype, other_dtype, student_stride, row_stride)
            assert (row * student_stride + student_head(row, student_stride, vec)) % vec == 0
    assert promised > 10  # the rule is not vacuous: many layouts do get vector loads


def test_an_unaligned_layout_gets_no_promise():
    student = torch.empty(4, 21841, dtype=torch.bfloat16)
    teacher = torch.empty(4, 2, 21841, dtype=torch.bfloat16)  # member stride 21841: odd
    vec = common.vector_width(student)
    assert common.aligned_width(teacher, student, vec, teacher.stride()[:2]) == 1
    grad = torch.empty_like(student)
    assert common.aligned_width(grad, student, vec, (grad.stride(0),)) == 8
