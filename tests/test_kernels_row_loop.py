"""The kernels' row loop: program p takes rows p, p + G, ... of the B rows, with G from the
device's SMs and L2 (``kernels.row_grid``). The grid rule on the figures it is built from, and
the kernels under the Triton interpreter against fp64 torch at a G forced small: B not a
multiple of G, G = 1, ignored rows, every mode and teacher kind, both kernels.
"""

from __future__ import annotations

import pytest
import torch
from test_kernels_bidirectional import assert_matches_reference as assert_bidirectional_matches
from test_kernels_bidirectional import make_logits
from test_kernels_partitioned import TARGETS, assert_matches_reference, make_case

from fastkd.kernels import PartitionedKDConfig, row_grid
from fastkd.kernels.launch import capture_launches
from fastkd.kernels.partitioned_kernel import launch_partitioned_kd
from fastkd.kernels.row_grid import DeviceLimits, row_programs
from fastkd.kernels.tiling import Tiling
from fastkd.partition import NO_TEACHER

CPU = torch.device("cpu")
DENSE = Tiling(block=4096, num_warps=8, stages=3, max_registers=128)  # 2 blocks per SM


def test_the_grid_fills_the_gpu_at_small_c_and_keeps_long_rows_in_l2():
    # H100 SXM, the CPU default: 132 SMs x 2 blocks = 264 slots, 50 MiB of L2.
    assert row_grid.device_limits(CPU) == DeviceLimits(132, 50 * 2**20)
    # 8192 x 1000, bf16 student and teacher: 4 waves of the 264 slots, about 8 rows each.
    assert row_programs(8192, 1000 * 4, DENSE, CPU) == 4 * 264
    assert row_programs(256, 1000 * 4, DENSE, CPU) == 256  # fewer rows than that: one each
    # 8192 x 128256: a row's student and teacher take 513 KB; 102 of them fit in 50 MiB.
    assert row_programs(8192, 128256 * 4, DENSE, CPU) == 102
    assert row_programs(8192, 2**30, DENSE, CPU) == 1  # a row larger than L2: one program
    # top-k: 4 warps, no register cap: 16 blocks an SM by threads
    sparse = Tiling(block=1024, num_warps=4, stages=4, max_registers=None)
    assert row_programs(100_000, 1000 * 2, sparse, CPU) == 4 * 132 * 16


def test_the_launch_takes_its_grid_from_the_rule_and_its_rows_from_b(monkeypatch):
    monkeypatch.setattr(row_grid, "device_limits", lambda device: DeviceLimits(2, 2**20))
    student, labels, targets = make_case(40, 1000, dtype=torch.bfloat16)
    config = PartitionedKDConfig(mode="best")
    with capture_launches() as launches:
        launch_partitioned_kd(student, torch.empty_like(student), labels, targets, config)
    (launch,) = launches
    # 2 SMs x 2 blocks of 1000-column rows fit in 1 MiB: 4 waves of 4 programs
    assert launch.grid == (4 * 2 * 2,)
    assert dict(zip(launch.kernel.arg_names, launch.args, strict=False))["num_rows"] == 40  # it loops to B


@pytest.fixture(params=[3, 1], ids=["G=3", "G=1"])
def programs(request, monkeypatch) -> int:
    """The kernels' grid forced to G programs: an L2 that holds G rows of any size here."""
    g = request.param
    monkeypatch.setattr(
        row_grid, "row_programs", lambda rows, row_bytes, tiling, device: min(rows, g)
    )
    return g


@pytest.mark.parametrize("mode", ["live", "fixed", "best"])
@pytest.mark.parametrize("kind", TARGETS)
def test_partitioned_rows_beyond_the_grid_match_the_reference(programs, mode, kind):
    topk, tail = TARGETS[kind]
    # 8 rows over 3 programs (3, 3, 2 rows) or 1; row 1 ignored; two whole tiles a row
    student, labels, targets = make_case(8, 300, topk=topk, tail=tail, dtype=torch.bfloat16)
    stats = assert_matches_reference(
        student,
        labels,
        targets,
        mode=mode,
        self_index=1 if mode == "fixed" else None,
        temperature=2.0,
        max_block=128,
    )
    assert stats.chosen[1] == NO_TEACHER


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_partitioned_rows_beyond_the_grid_with_the_teachers_lse_given(programs, temperature):
    student, labels, targets = make_case(7, 257, members=2)
    targets = targets.with_lse(temperature)
    assert_matches_reference(student, labels, targets, temperature=temperature, max_block=64)


@pytest.mark.parametrize("models", [2, 3])
@pytest.mark.parametrize("stop_grad", [True, False], ids=["stop_grad", "reference_code"])
def test_bidirectional_rows_beyond_the_grid_match_the_reference(programs, models, stop_grad):
    logits, labels = make_logits(models, 8, 300, dtypes=(torch.float32, torch.bfloat16))
    stats = assert_bidirectional_matches(
        logits, labels, stop_grad=stop_grad, temperature=2.0, max_block=128
    )
    assert stats.chosen[1] == NO_TEACHER
