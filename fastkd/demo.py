"""``fastkd demo``: the main job on its embedded default, end to end on real data.

Five stages, each the library code a ``fastkd`` command runs; the demo only picks the settings,
runs every arm for every seed and aggregates the reports:

1. data: scikit-learn's digits as a 32 px image folder with fixed train / val / test splits
   (``fastkd.digits``);
2. pool: three timm architectures trained from scratch with cross-entropy (``training.train``
   with ``teachers="none"``, as ``fastkd train --teachers none --from-scratch``);
3. dump: every member's outputs on ``views`` augmented views of every training image into one
   store (``dump.run_dump``, as ``fastkd dump``);
4. transfer: for each seed and arm, every member in turn learns from the others' stored targets
   for the same number of steps on the same stored views (``training.train_all``, as ``fastkd
   train --all``), selecting its weights on the val split. Arms: ``live`` (Bi-KD partition) and
   ``fixed`` (KL+DP), and the controls ``all`` (plain KD: the best teacher on every sample) and
   ``ce`` (cross-entropy fine-tuning);
5. report: ``train_all`` evaluates each arm on the test split (``metrics.transfer_from_checkpoints``,
   as ``fastkd eval --before``); the demo gives mean and spread over the seeds, compares every
   transfer arm with each control on the same (seed, member) pairs, and says from those numbers
   whether transfer helps on this data.

What a seed changes: the transfer stage only (sample order, which stored view a sample shows in
an epoch, dropout). The pool, its pretraining and the store are shared by all seeds, so the
spread is that of the transfer stage, the part the arms differ in; for the same reason the
(seed, member) pairs of a comparison are not independent, and its standard error is a yardstick,
not a significance test.

Reuse across runs: the digits folder (marked once complete); the pool and its store, in a folder
keyed by a hash of every setting that shapes them, reused or resumed through ``train``'s and
``run_dump``'s own resume (which refuse any other configuration); and each finished transfer run
(seed, arm), in a folder keyed likewise, recognised by the report ``train_all`` writes last. A
second ``fastkd demo`` with the same settings trains nothing and rewrites the report.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

import fastkd
from fastkd.digits import DIGITS_POOL, PoolMember, write_digits_folder
from fastkd.dump import DumpConfig, run_dump
from fastkd.files import write_json
from fastkd.metrics import TransferReport
from fastkd.partition import PartitionMode
from fastkd.training import REPORT_STEM as TRAIN_REPORT_STEM
from fastkd.training import Teachers, TrainConfig, train, train_all
from fastkd.views import AugmentConfig

IMAGE_SIZE = 32  # the digits folder; the pool's models take this input size
REPORT_STEM = "report"  # report.json, report.png, report.txt in the output folder
_KEY_CHARS = 12  # hex digits of a cache folder's hash


@dataclass(frozen=True)
class Arm:
    """One way of training every pool member: the same steps, views and learning rate."""

    name: str
    teachers: Teachers
    mode: PartitionMode  # ignored without teachers
    control: bool
    description: str


ARMS: tuple[Arm, ...] = (
    Arm(
        "live",
        Teachers.OFFLINE,
        PartitionMode.LIVE,
        False,
        "Bi-KD partition: the most confident other member teaches where it beats the student",
    ),
    Arm(
        "fixed",
        Teachers.OFFLINE,
        PartitionMode.FIXED,
        False,
        "KL+DP: the best of the others and the student's own stored initial outputs",
    ),
    Arm(
        "all",
        Teachers.OFFLINE,
        PartitionMode.ALL,
        True,
        "control, plain KD: the most confident other member teaches on every sample",
    ),
    Arm(
        "ce",
        Teachers.NONE,
        PartitionMode.LIVE,
        True,
        "control: cross-entropy fine-tuning, no teacher",
    ),
)
ARMS_BY_NAME = {arm.name: arm for arm in ARMS}


def _digits_augment() -> AugmentConfig:
    """Crops of at least a third of the image, no flips (a mirrored digit is another glyph), and
    the whole image as the eval view (the pool's data configs use crop_pct 1)."""
    return AugmentConfig(scale=(0.35, 1.0), hflip=0.0, eval_crop_pct=1.0)


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo depends on. The defaults are the full demo (at most 10 minutes on two
    CPU cores); ``DemoConfig.quick()`` runs the same stages, arms and seeds with far fewer steps.
    """

    out_dir: Path = Path("runs/demo")
    seeds: tuple[int, ...] = (0, 1, 2)  # transfer stage seeds
    pool: tuple[PoolMember, ...] = DIGITS_POOL
    pool_seed: int = 0  # pretraining (init, order, views) and the store's views
    views: int = 8  # stored views per training image; view 0 is the eval view
    transfer_epochs: int = 8  # <= views: no stored target is seen twice
    transfer_lr: float = 1e-4  # Adam, constant, every arm: fine-tuning (3e-4 and 1e-3 drift)
    batch_size: int = 128
    augment: AugmentConfig = field(default_factory=_digits_augment)
    device: str = "auto"  # cuda when there is one
    backend: str = "auto"  # image pipeline: DALI when installed
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        problems = []
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            problems.append(f"seeds must be distinct and at least one, got {self.seeds}")
        if len(self.pool) < 2:
            problems.append(f"the pool needs at least 2 members, got {len(self.pool)}")
        if min(self.views, self.transfer_epochs, self.batch_size) < 1:
            problems.append(
                f"views, transfer_epochs and batch_size must be >= 1, got "
                f"{self.views}, {self.transfer_epochs}, {self.batch_size}"
            )
        if self.transfer_epochs > self.views:
            problems.append(
                f"transfer_epochs ({self.transfer_epochs}) must not exceed the stored views "
                f"({self.views}): a student would see the same targets again"
            )
        if problems:
            raise ValueError("invalid demo configuration: " + "; ".join(problems))

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """About a minute on two CPU cores: a sixth of the pretraining epochs, 2 stored views,
        1 transfer epoch. The pipeline, arms, seeds and report are the full demo's."""
        pool = tuple(replace(m, epochs=max(1, m.epochs // 6)) for m in DIGITS_POOL)
        settings: dict[str, Any] = {"pool": pool, "views": 2, "transfer_epochs": 1}
        return cls(**{**settings, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(asdict(self), default=str))


def _key(*parts: Any) -> str:
    """Short hash of JSON-able settings: the name of a cache folder they fully determine."""
    text = json.dumps([fastkd.__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:_KEY_CHARS]


@dataclass(frozen=True)
class DemoLayout:
    """Where every artifact of a demo configuration lives under ``out_dir``."""

    out_dir: Path
    pool_key: str
    store_key: str
    transfer_key: str

    @classmethod
    def of(cls, cfg: DemoConfig) -> DemoLayout:
        pretraining = [
            [asdict(m) for m in cfg.pool],
            cfg.pool_seed,
            cfg.batch_size,
            asdict(cfg.augment),
        ]
        pool_key = _key("pool", IMAGE_SIZE, pretraining)
        store_key = _key("store", pool_key, cfg.views, cfg.pool_seed, asdict(cfg.augment))
        transfer_key = _key("transfer", store_key, cfg.transfer_epochs, cfg.transfer_lr)
        return cls(cfg.out_dir, pool_key, store_key, transfer_key)

    @property
    def data(self) -> Path:
        return self.out_dir / "digits"

    @property
    def pool(self) -> Path:
        return self.out_dir / "pool" / self.pool_key

    @property
    def store(self) -> Path:
        return self.pool / f"store-{self.store_key}"

    def pretraining(self, member: str) -> Path:
        return self.pool / member

    def transfer(self, seed: int, arm: str) -> Path:
        return self.out_dir / "transfer" / self.transfer_key / f"seed-{seed}" / arm

    def relative(self, path: Path) -> str:
        return Path(os.path.relpath(path, self.out_dir)).as_posix()


# ----------------------------------------------------------------------------------------------
# The report


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; NaN for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return {"mean": float(array.mean()), "std": std}


@dataclass(frozen=True)
class Comparison:
    """A transfer arm against a control on the same (seed, member) pairs: after - after.

    Both arms start from the same checkpoint, so this is also the difference of their deltas.
    ``verdict``: "better" / "worse" when mean -/+ 2 standard errors excludes 0, else "no clear
    difference".
    """

    arm: str
    control: str
    mean: float
    std: float
    sem: float
    pairs: int
    verdict: str

    @classmethod
    def of(cls, arm: str, control: str, differences: Sequence[float]) -> Comparison:
        stat = _mean_std(differences)
        mean, std = stat["mean"], stat["std"]
        sem = std / math.sqrt(len(differences))  # NaN for a single pair
        margin = 2.0 * sem
        if math.isnan(margin):
            verdict = "too few pairs to tell"
        elif mean - margin > 0:
            verdict = "better"
        elif mean + margin < 0:
            verdict = "worse"
        else:
            verdict = "no clear difference"
        return cls(arm, control, mean, std, sem, len(differences), verdict)


@dataclass
class DemoReport:
    """Every arm's transfer report per seed (test split), the pool, and their aggregates."""

    config: dict[str, Any]
    pool: list[dict[str, Any]]  # name, arch, checkpoint (relative to out_dir), val_top1
    test_data: str  # relative to out_dir
    store: str  # relative to out_dir
    runs: dict[str, dict[int, TransferReport]]  # arm -> seed -> report
    run_dirs: dict[str, dict[int, str]]  # arm -> seed -> train_all's folder (relative)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def arms(self) -> list[str]:
        return list(self.runs)

    @property
    def seeds(self) -> list[int]:
        return sorted({seed for runs in self.runs.values() for seed in runs})

    @property
    def members(self) -> list[str]:
        return [member["name"] for member in self.pool]

    @property
    def num_samples(self) -> int:
        return next(iter(next(iter(self.runs.values())).values())).num_samples

    def figure(self, arm: str, seed: int, member: str, name: str) -> float:
        """One ``ModelTransfer`` field of ``member`` in the report of (``arm``, ``seed``)."""
        for model in self.runs[arm][seed].models:
            if model.name == member:
                return float(getattr(model, name))
        raise KeyError(f"no model {member!r} in the {arm!r} report of seed {seed}")

    def top1_before(self, member: str) -> float:
        """The pool member's test top-1 before transfer (the same checkpoint in every run)."""
        return self.figure(self.arms[0], self.seeds[0], member, "top1_before")

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per arm: each member's figures and the pool's mean delta, mean and std over seeds."""
        out: dict[str, dict[str, Any]] = {}
        for arm, by_seed in self.runs.items():
            members = {
                member: {
                    "top1_before": self.top1_before(member),
                    **{
                        name: _mean_std([self.figure(arm, s, member, name) for s in by_seed])
                        for name in ("top1_after", "delta", "knowledge_gain", "knowledge_loss")
                    },
                }
                for member in self.members
            }
            pool_delta = [
                float(np.mean([self.figure(arm, s, m, "delta") for m in self.members]))
                for s in by_seed
            ]
            out[arm] = {
                "members": members,
                "pool_delta": _mean_std(pool_delta),
                "success_rate": _mean_std([report.success_rate for report in by_seed.values()]),
            }
        return out

    def comparisons(self) -> list[Comparison]:
        """Every transfer arm against every control, paired by (seed, member)."""
        compared = []
        for arm in (a for a in self.arms if not ARMS_BY_NAME[a].control):
            for control in (a for a in self.arms if ARMS_BY_NAME[a].control):
                differences = [
                    self.figure(arm, s, m, "top1_after") - self.figure(control, s, m, "top1_after")
                    for s in self.seeds
                    for m in self.members
                ]
                compared.append(Comparison.of(arm, control, differences))
        return compared

    def conclusion(self) -> list[str]:
        """What the numbers say, in sentences computed from them."""
        summary = self.summary()
        lines = []
        for arm in self.arms:
            pool = summary[arm]["pool_delta"]
            lines.append(
                f"{arm}: the pool's mean test top-1 changes by {pool['mean']:+.2f} points "
                f"(std {_fmt(pool['std'])} over {len(self.seeds)} seeds); "
                f"{summary[arm]['success_rate']['mean']:.0f}% of members improve on average."
            )
        comparisons = self.comparisons()
        for c in comparisons:
            lines.append(
                f"{c.arm} vs {c.control}: {c.mean:+.2f} points per member "
                f"(+/- {_fmt(2 * c.sem)}, 2 s.e. over {c.pairs} seed x member pairs): {c.verdict}."
            )
        against_ce = [c for c in comparisons if c.control == "ce"]
        if not against_ce:
            return lines
        better = [c.arm for c in against_ce if c.verdict == "better"]
        if better:
            verdict = (
                f"Verdict: transfer helps on this data: {', '.join(better)} beat"
                f"{'s' if len(better) == 1 else ''} cross-entropy fine-tuning for the same steps"
            )
        else:
            worse = [c.arm for c in against_ce if c.verdict == "worse"]
            how = f"{', '.join(worse)} did worse" if worse else "no clear difference"
            verdict = (
                "Verdict: transfer does not help on this data: no transfer arm beats "
                f"cross-entropy fine-tuning for the same steps ({how})"
            )
        against_kd = [c for c in comparisons if c.control == "all"]
        if against_kd:
            verdict += "; against plain KD, the partition gives: " + ", ".join(
                f"{c.arm} {c.verdict}" for c in against_kd
            )
        lines.append(verdict + ".")
        return lines

    # -- output -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "pool": self.pool,
            "test_data": self.test_data,
            "store": self.store,
            "num_test_samples": self.num_samples,
            "arms": {
                arm: {
                    "description": ARMS_BY_NAME[arm].description,
                    "control": ARMS_BY_NAME[arm].control,
                }
                for arm in self.arms
            },
            "runs": {
                arm: {
                    str(seed): {"dir": self.run_dirs[arm][seed], **report.to_dict()}
                    for seed, report in by_seed.items()
                }
                for arm, by_seed in self.runs.items()
            },
            "summary": self.summary(),
            "comparisons": [asdict(c) for c in self.comparisons()],
            "conclusion": self.conclusion(),
            "seconds": self.seconds,
        }

    def tables(self) -> list[Table]:
        """Per-member deltas of every arm (mean +/- std over seeds), then the comparisons."""
        summary = self.summary()
        deltas = Table(
            title=f"Transfer on the digits test split ({self.num_samples} images): change in "
            f"top-1 (points), mean +/- std over {len(self.seeds)} seeds",
            caption="; ".join(f"{a}: {ARMS_BY_NAME[a].description}" for a in self.arms),
        )
        deltas.add_column("member")
        deltas.add_column("top-1 before", justify="right")
        for arm in self.arms:
            deltas.add_column(
                arm + (" (control)" if ARMS_BY_NAME[arm].control else ""), justify="right"
            )
        for member in self.members:
            cells = [_delta_cell(summary[arm]["members"][member]["delta"]) for arm in self.arms]
            deltas.add_row(member, f"{self.top1_before(member):.2f}", *cells)
        deltas.add_section()
        deltas.add_row("pool mean", "", *(_delta_cell(summary[a]["pool_delta"]) for a in self.arms))
        deltas.add_row(
            "members improved",
            "",
            *(f"{summary[a]['success_rate']['mean']:.0f}%" for a in self.arms),
        )

        compared = Table(title="Transfer arms against the controls, paired by seed and member")
        for column in ("arm", "control", "arm - control", "2 s.e.", "pairs", "verdict"):
            compared.add_column(
                column, justify="left" if column in ("arm", "control", "verdict") else "right"
            )
        for c in self.comparisons():
            colour = {"better": "green", "worse": "red"}.get(c.verdict, "white")
            compared.add_row(
                c.arm,
                c.control,
                f"{c.mean:+.2f}",
                _fmt(2 * c.sem),
                str(c.pairs),
                f"[{colour}]{c.verdict}[/{colour}]",
            )
        return [deltas, compared]

    def print(self, console: Console) -> None:
        for table in self.tables():
            console.print(table)
        for line in self.conclusion():
            console.print(line)

    def plot(self, path: str | os.PathLike) -> Path:
        """Two panels: each member's delta per arm (mean, std over seeds as error bars); each
        transfer arm minus each control (mean, 2 standard errors)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        summary = self.summary()
        groups = [f"{m}\n(before {self.top1_before(m):.1f}%)" for m in self.members]
        groups.append("pool mean")
        x = np.arange(len(groups))
        width = 0.8 / len(self.arms)
        fig, (left, right) = plt.subplots(
            1, 2, figsize=(12.0, 4.5), constrained_layout=True, width_ratios=(3, 2)
        )
        fig.suptitle(
            f"fastkd demo: transfer on the digits test split ({self.num_samples} images), "
            f"{len(self.seeds)} seeds"
        )
        for i, arm in enumerate(self.arms):
            stats = [summary[arm]["members"][m]["delta"] for m in self.members]
            stats.append(summary[arm]["pool_delta"])
            left.bar(
                x + (i - (len(self.arms) - 1) / 2) * width,
                [s["mean"] for s in stats],
                width,
                yerr=[0.0 if math.isnan(s["std"]) else s["std"] for s in stats],
                capsize=3,
                label=arm + (" (control)" if ARMS_BY_NAME[arm].control else ""),
                hatch="//" if ARMS_BY_NAME[arm].control else None,
            )
        left.axhline(0.0, color="black", linewidth=0.8)
        left.set_xticks(x, groups)
        left.set_ylabel("change in test top-1 (points)")
        left.set_title("Delta per member (error bar: std over seeds)")
        left.legend(fontsize=8)

        comparisons = self.comparisons()
        labels = [f"{c.arm} - {c.control}" for c in comparisons]
        colours = [
            {"better": "#2e8b57", "worse": "#c0392b"}.get(c.verdict, "#777777") for c in comparisons
        ]
        y = np.arange(len(comparisons))
        right.barh(
            y,
            [c.mean for c in comparisons],
            xerr=[0.0 if math.isnan(c.sem) else 2 * c.sem for c in comparisons],
            color=colours,
            capsize=3,
        )
        right.axvline(0.0, color="black", linewidth=0.8)
        right.set_yticks(y, labels)
        right.invert_yaxis()
        right.set_xlabel("top-1 difference per member (points)")
        right.set_title("Transfer arm minus control (error bar: 2 s.e.)")

        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path

    def save(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """``report.json``, ``report.png`` and ``report.txt`` (the printed tables) in ``out_dir``."""
        stem = Path(out_dir) / REPORT_STEM
        json_path, png_path, txt_path = (stem.with_suffix(s) for s in (".json", ".png", ".txt"))
        write_json(json_path, self.to_dict())
        self.plot(png_path)
        console = Console(record=True, width=140, file=io.StringIO())
        self.print(console)
        txt_path.write_text(console.export_text())
        return {"json": json_path, "plot": png_path, "table": txt_path}


def _fmt(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}"


def _delta_cell(stat: Mapping[str, float]) -> str:
    colour = "green" if stat["mean"] > 0 else "red" if stat["mean"] < 0 else "white"
    spread = "" if math.isnan(stat["std"]) else f" +/- {stat['std']:.2f}"
    return f"[{colour}]{stat['mean']:+.2f}[/{colour}]{spread}"


# ----------------------------------------------------------------------------------------------
# The stages


@contextmanager
def _stage(console: Console, title: str, seconds: dict[str, float], key: str) -> Iterator[None]:
    console.rule(f"[bold]{title}")
    start = time.perf_counter()
    yield
    seconds[key] = round(time.perf_counter() - start, 2)


def _pretrain_config(cfg: DemoConfig, layout: DemoLayout, member: PoolMember) -> TrainConfig:
    """Cross-entropy from a random init, a fresh view per epoch, weights selected on val."""
    return TrainConfig(
        data=layout.data / "train",
        student=member.spec,
        teachers=Teachers.NONE,
        pretrained=False,
        model_kwargs=dict(member.model_kwargs),
        epochs=member.epochs,
        views=member.epochs,  # every epoch shows each image in a view it has not shown yet
        augment=cfg.augment,
        lr=member.lr,
        lr_schedule="cosine",
        batch_size=cfg.batch_size,
        seed=cfg.pool_seed,
        val_data=layout.data / "val",
        report=False,
        out_dir=layout.pretraining(member.name),
        resume=True,
        device=cfg.device,
        backend=cfg.backend,
        progress=cfg.progress,
    )


def _transfer_config(
    cfg: DemoConfig, layout: DemoLayout, pool_specs: Sequence[str], arm: Arm, seed: int
) -> TrainConfig:
    """Every member taught by the others' stored targets (or CE only), test-split report."""
    return TrainConfig(
        data=layout.data / "train",
        store=layout.store,
        models=tuple(pool_specs),
        teachers=arm.teachers,
        mode=arm.mode,
        epochs=cfg.transfer_epochs,
        lr=cfg.transfer_lr,
        batch_size=cfg.batch_size,
        seed=seed,
        val_data=layout.data / "val",
        eval_data=layout.data / "test",
        out_dir=layout.transfer(seed, arm.name),
        resume=True,
        device=cfg.device,
        backend=cfg.backend,
        progress=cfg.progress,
    )


def _transfer(cfg: TrainConfig) -> TransferReport:
    """``train_all``, or the report of its finished run: ``train_all`` writes the report last.

    A finished run keeps its selected weights and report, not its resumable state (three times
    the weights: the optimiser's moments); an interrupted one resumes from that state.
    """
    finished = cfg.out_dir / f"{TRAIN_REPORT_STEM}.json"
    if finished.is_file():
        return TransferReport.from_dict(json.loads(finished.read_text()))
    result = train_all(cfg)
    if result.report is None:
        raise RuntimeError(f"train_all wrote no transfer report in {cfg.out_dir}")
    for run in result.runs.values():
        run.state.unlink(missing_ok=True)
    return result.report


def run_demo(cfg: DemoConfig | None = None, console: Console | None = None) -> DemoReport:
    """Run (or reuse) every stage and write the report under ``cfg.out_dir``."""
    cfg = cfg or DemoConfig()
    console = console or Console()
    layout = DemoLayout.of(cfg)
    seconds: dict[str, float] = {}
    start = time.perf_counter()

    with _stage(console, "1/4 data: scikit-learn digits, 32 px, train/val/test", seconds, "data"):
        write_digits_folder(layout.data, image_size=IMAGE_SIZE)

    pool_info, pool_specs = [], []
    with _stage(console, "2/4 pool: three architectures trained from scratch", seconds, "pool"):
        for member in cfg.pool:
            console.print(f"[bold]{member.name}[/bold]: {member.arch}, {member.epochs} epochs")
            run = train(_pretrain_config(cfg, layout, member))
            checkpoint = run.checkpoints[member.name]
            best = max((r.val_top1[member.name] for r in run.history), default=math.nan)
            pool_specs.append(f"{member.spec}={checkpoint}")
            pool_info.append(
                {
                    "name": member.name,
                    "arch": member.arch,
                    "model_kwargs": dict(member.model_kwargs),
                    "epochs": member.epochs,
                    "lr": member.lr,
                    "checkpoint": layout.relative(checkpoint),
                    "val_top1": best,
                }
            )

    with _stage(console, f"3/4 dump: {cfg.views} views per training image", seconds, "dump"):
        run_dump(
            DumpConfig(
                data=layout.data / "train",
                models=pool_specs,
                out=layout.store,
                views=cfg.views,
                seed=cfg.pool_seed,
                augment=cfg.augment,
                backend=cfg.backend,
                device=None if cfg.device == "auto" else cfg.device,
                progress=cfg.progress,
            )
        )

    runs: dict[str, dict[int, TransferReport]] = {arm.name: {} for arm in ARMS}
    run_dirs: dict[str, dict[int, str]] = {arm.name: {} for arm in ARMS}
    title = f"4/4 transfer: {len(ARMS)} arms x {len(cfg.seeds)} seeds x {len(cfg.pool)} members"
    with _stage(console, title, seconds, "transfer"):
        for seed in cfg.seeds:
            for arm in ARMS:
                console.print(f"[bold]seed {seed}, {arm.name}[/bold]: {arm.description}")
                runs[arm.name][seed] = _transfer(
                    _transfer_config(cfg, layout, pool_specs, arm, seed)
                )
                run_dirs[arm.name][seed] = layout.relative(layout.transfer(seed, arm.name))
    seconds["total"] = round(time.perf_counter() - start, 2)

    report = DemoReport(
        config=cfg.to_dict(),
        pool=pool_info,
        test_data=layout.relative(layout.data / "test"),
        store=layout.relative(layout.store),
        runs=runs,
        run_dirs=run_dirs,
        seconds=seconds,
    )
    console.rule("[bold]report")
    report.print(console)
    paths = report.save(cfg.out_dir)
    console.print(f"report: {paths['json']}, {paths['plot']}, {paths['table']}")
    return report
