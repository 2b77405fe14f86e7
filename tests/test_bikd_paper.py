"""Joint Bi-KD (``--joint --preset bi-kd``, stop_grad off) against the Bi-KD code's gradient.

The reference is the training step of Syd-J/Bi-KD ``src/train_bi_kd.py`` (061b1de), written anew
in fp64 from its lines, not from fastkd's reference: masks from the current models' softmax(pred)
at the label (a tie teaches the student model, ``<=``), ``kl_t = F.kl_div(soft_s.log(), soft_t)``
with nothing detached, ``loss = ce_t + ce_s + (mask_t * kl_t + mask_s * kl_s).mean()`` and one
``loss.backward()`` through both models. fastkd's gradients of both models' logits are compared with
it: the loss function's (fp64: the torch path; fp32: the Triton kernel under the interpreter) and
the joint strategy's, built from the configuration the CLI makes.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import fastkd.training
from fastkd.cli.main import app
from fastkd.kernels import bidirectional_kd_loss
from fastkd.presets import preset_settings
from fastkd.training.strategy import JointBiKD, RunContext

ROWS, CLASSES = 24, 37


def paper_gradients(pred_t: torch.Tensor, pred_s: torch.Tensor, labels: torch.Tensor):
    """The Bi-KD code's loss and the gradients its ``loss.backward()`` gives both models' logits."""
    pred_t = pred_t.detach().double().requires_grad_()
    pred_s = pred_s.detach().double().requires_grad_()
    rows = torch.arange(len(labels))
    gt_soft_t = pred_t.softmax(dim=1)[rows, labels]
    gt_soft_s = pred_s.softmax(dim=1)[rows, labels]
    mask_t = (gt_soft_t > gt_soft_s).double()
    mask_s = (gt_soft_t <= gt_soft_s).double()
    soft_t = F.softmax(pred_t, dim=1)
    soft_s = F.softmax(pred_s, dim=1)
    ce_t = F.cross_entropy(pred_t, labels)
    ce_s = F.cross_entropy(pred_s, labels)
    kl_t = F.kl_div(soft_s.log(), soft_t, reduction="none").sum(dim=1)
    kl_s = F.kl_div(soft_t.log(), soft_s, reduction="none").sum(dim=1)
    loss = ce_t + ce_s + (mask_t * kl_t + mask_s * kl_s).mean()
    loss.backward()
    return loss.detach(), pred_t.grad, pred_s.grad


def logits_and_labels(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two models' fp32 logits, each model the more confident on the label on some rows."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (ROWS,), generator=gen)
    pred_t, pred_s = (torch.randn(ROWS, CLASSES, generator=gen) * 2 for _ in range(2))
    pred_t[torch.arange(ROWS), labels] += torch.rand(ROWS, generator=gen) * 5
    pred_s[torch.arange(ROWS), labels] += torch.rand(ROWS, generator=gen) * 5
    return pred_t, pred_s, labels


def fastkd_gradients(loss_of, pred_t, pred_s, labels, dtype):
    """``loss_of([z_t, z_s], labels)``'s loss and its gradients of both logits, in ``dtype``."""
    leaves = [z.detach().to(dtype).requires_grad_() for z in (pred_t, pred_s)]
    loss, _ = loss_of(leaves, labels)
    loss.backward()
    return loss.detach(), *(z.grad for z in leaves)


def assert_close_to_paper(got, paper, tolerance: float) -> None:
    for value, expected in zip(got, paper, strict=True):
        scale = expected.abs().max().item()
        torch.testing.assert_close(value.double(), expected, rtol=tolerance, atol=tolerance * scale)


def test_the_papers_masks_give_both_models_rows_to_teach():
    """The data exercise both directions of the KL, so each model gets a teacher's gradient."""
    pred_t, pred_s, labels = logits_and_labels()
    rows = torch.arange(ROWS)
    p_t, p_s = (z.double().softmax(1)[rows, labels] for z in (pred_t, pred_s))
    assert 4 <= int((p_t > p_s).sum()) <= ROWS - 4


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_joint_bikd_loss_matches_the_papers_gradients(dtype, tolerance):
    """The preset's joint loss settings: fp64 runs fastkd's torch path, fp32 the Triton kernel."""
    settings = preset_settings("bi-kd", joint=True).loss
    assert settings.stop_grad is False
    pred_t, pred_s, labels = logits_and_labels()
    paper = paper_gradients(pred_t, pred_s, labels)

    def loss_of(logits, labels):
        return bidirectional_kd_loss(logits, labels, settings)

    assert_close_to_paper(
        fastkd_gradients(loss_of, pred_t, pred_s, labels, dtype), paper, tolerance
    )

    def stopped(logits, labels):  # the check tells the two apart: stop_grad moves the teacher's
        return bidirectional_kd_loss(logits, labels, settings, stop_grad=True)

    _, grad_t, grad_s = fastkd_gradients(stopped, pred_t, pred_s, labels, dtype)
    for grad, expected in zip((grad_t, grad_s), paper[1:], strict=True):
        assert (grad.double() - expected).abs().max() > 100 * tolerance * expected.abs().max()


def _cli_config(monkeypatch, args: list[str]):
    """The TrainConfig `fastkd train ARGS` hands to training (training replaced), its output."""
    seen = {}
    monkeypatch.setattr(fastkd.training, "train", lambda cfg: seen.setdefault("cfg", cfg))
    result = CliRunner().invoke(app, ["train", *args])
    return seen.get("cfg"), result


def test_joint_preset_bikd_from_the_cli_trains_as_the_papers_code(monkeypatch, tmp_path):
    """``fastkd train --joint --preset bi-kd``: the strategy's kernel config has stop_grad off,
    and its training loss (a sum times 1/B, loss.backward() alone) gives the paper's gradients."""
    args = ["--data", str(tmp_path), "--joint", "--preset", "bi-kd", "--out", str(tmp_path / "o")]
    args += ["--model", "t:resnet10t=t.pt", "--model", "s:resnet10t=s.pt"]
    cfg, result = _cli_config(monkeypatch, args)
    assert cfg is not None, result.output
    assert cfg.preset == "bi-kd" and cfg.preset_not_applied == () and cfg.loss.stop_grad is False
    assert "not applied" not in result.output
    run = RunContext(cfg, torch.device("cpu"), None, None, {}, None)  # the loss reads cfg only
    strategy = JointBiKD(run, [])
    assert strategy.loss_config(1 / ROWS).stop_grad is False
    pred_t, pred_s, labels = logits_and_labels(seed=1)
    batch = SimpleNamespace(labels=labels)

    def loss_of(logits, labels):
        return strategy.loss(logits, batch, scale=1 / ROWS)

    got = fastkd_gradients(loss_of, pred_t, pred_s, labels, torch.float32)
    assert_close_to_paper(got, paper_gradients(pred_t, pred_s, labels), 2e-5)


def test_preset_bikd_reaches_the_strategy_as_offline_bikd_without_joint(monkeypatch, tmp_path):
    """Without --joint the strategy never reads stop_grad: the preset leaves it out and says so."""
    args = ["--data", str(tmp_path), "--store", str(tmp_path), "--student", "s:resnet10t=s.pt"]
    args += ["--preset", "bi-kd", "--out", str(tmp_path / "o")]
    cfg, result = _cli_config(monkeypatch, args)
    assert cfg is not None, result.output
    assert (cfg.preset, cfg.preset_not_applied, cfg.loss.stop_grad) == (
        "bi-kd",
        ("stop_grad",),
        True,
    )
    output = " ".join(result.output.split())
    assert "--preset bi-kd: runs Bi-KD one way (offline Bi-KD" in output
    assert "not applied, as --teachers offline" in output and "--no-stop-grad" in output
