"""The papers' settings as ``fastkd train --preset``, and the one rule of what wins.

A value given on the command line wins over the preset, the preset over fastkd's default (the
``LossSettings`` or ``TrainConfig`` default): ``preset_settings`` makes the run's loss
settings and its optimiser's fields. Each setting keeps its source in the paper's code; ``docs/method.md``
("Presets") shows ``markdown_table()``. Light: the CLI builds its help from ``PRESETS``.

A run applies only what its way of teaching reads (``loss_settings.TEACHING_READS``): a preset's
setting it does not read is left at fastkd's default and named in the run's note (``--preset
bi-kd`` without ``--joint`` is offline Bi-KD: no teacher gets a gradient); a flag given explicitly
that it does not read is refused, as a flag is a request the run could not keep.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from fastkd.choices import DEFAULT_BATCH_SIZE, PartitionMode, PartitionScore, Teachers, option_flag
from fastkd.errors import ConfigError
from fastkd.loss_settings import (
    LOSS_FIELDS,
    TEACHING_READS,
    TEACHING_TEXT,
    LossSettings,
    teaching_way,
    unapplied,
)

FANTASTIC_GAINS = "ExplainableML/FantasticGains"
BI_KD = "Syd-J/Bi-KD"


class PresetName(str, Enum):
    """The papers ``--preset`` reproduces."""

    KL_DP = "kl-dp"  # Roth et al., ICLR 2024
    BI_KD = "bi-kd"  # Jain et al., TMLR 2025


@dataclass(frozen=True)
class Setting:
    """One value of a paper's code and where it is set."""

    value: Any
    source: str


@dataclass(frozen=True)
class Preset:
    """A paper's ``TrainConfig`` values; ``lr_batch``: lr is per that many images (scaled by
    batch_size / lr_batch, as the paper's code does), None: lr as given. ``one_way``: what a
    run without ``--joint`` is, for a paper whose code trains every model at once (None: the
    paper's code is one-way, and ``--joint`` is refused)."""

    name: PresetName
    method: str  # the method's short name, as messages say it
    paper: str
    settings: Mapping[str, Setting]  # TrainConfig field -> value
    lr_batch: int | None = None
    notes: tuple[str, ...] = field(default=())
    one_way: str | None = None


_FG_DIST = "config/distillation/distillation.yaml"
_FG_KLDP = "config/distillation/kl_dp_dist.yaml"
_FG_MAIN = "main_distillation.py, xe_kl_distill"
_BK = "src/train_bi_kd.py"

KL_DP = Preset(
    PresetName.KL_DP,
    "KL+DP",
    f"Roth et al., Fantastic Gains ({FANTASTIC_GAINS})",
    {
        "mode": Setting("fixed", f"{_FG_KLDP}:10,15 (loss xekl_dp, strat most-conf)"),
        "partition_score": Setting("label", f"{_FG_MAIN}: t_mask = sp_t[i][y] > sp_st[i][y]"),
        "kd_weight": Setting(1.0, f"{_FG_KLDP}:11 (alpha 1: loss = alpha KL + (1 - alpha) CE)"),
        "ce_weight": Setting(0.0, f"{_FG_KLDP}:11 (1 - alpha = 0)"),
        "temperature": Setting(1.0, f"{_FG_KLDP}:12 (kd_T)"),
        "optimizer": Setting("sgd", f"{_FG_DIST}:24 (optimizer.name)"),
        "lr": Setting(1e-4, f"{_FG_DIST}:26; x batch/256: distillation/dist_utils.py, parse_cfg"),
        "momentum": Setting(0.9, f"{_FG_DIST}:28"),
        "weight_decay": Setting(1e-4, f"{_FG_DIST}:27"),
        "lr_schedule": Setting("constant", f"{_FG_DIST}:31 (scheduler.name None)"),
        "epochs": Setting(20, f"{_FG_DIST}:45 (max_epochs)"),
        "stop_grad": Setting(True, f"{_FG_MAIN}: the teacher runs under torch.no_grad()"),
    },
    lr_batch=256,
    notes=(
        "batch size: 'auto' there (the largest that fits, dist_utils.get_batch_size); not set",
        "precision 16 (fp16) there; fastkd's --amp is bf16",
    ),
)

BI_KD_PRESET = Preset(
    PresetName.BI_KD,
    "Bi-KD",
    f"Jain et al., Bi-KD ({BI_KD})",
    {
        "mode": Setting("live", f"{_BK}: masks from the current models' p(y), every step"),
        "partition_score": Setting("label", f"{_BK}: gt_soft = softmax(pred)[y]"),
        "kd_weight": Setting(
            1.0, f"{_BK}: loss = ce_t + ce_s + (mask_t kl_t + mask_s kl_s).mean()"
        ),
        "ce_weight": Setting(1.0, f"{_BK}: the same loss line"),
        "temperature": Setting(1.0, f"{_BK}: F.softmax(pred) without a temperature"),
        "optimizer": Setting("adam", f"{_BK}: torch.optim.Adam per model"),
        "lr": Setting(1e-6, f"{_BK}:32-33 (args t_lr, s_lr: one per model)"),
        "weight_decay": Setting(1e-5, f"{_BK}:27"),
        "lr_schedule": Setting("constant", f"{_BK}: no scheduler"),
        "epochs": Setting(20, f"{_BK}:26 (args no_epochs)"),
        "batch_size": Setting(128, f"{_BK}:24"),
        "stop_grad": Setting(False, f"{_BK}: one loss.backward() through both models"),
    },
    notes=("with --joint: both models train at once, as there; without: offline Bi-KD",),
    one_way=(
        "Bi-KD one way (offline Bi-KD from a store): only the student learns, taught where a "
        "teacher beats it on p(y); the paper's code trains both models at once (--joint)"
    ),
)

PRESETS: dict[PresetName, Preset] = {p.name: p for p in (KL_DP, BI_KD_PRESET)}


def setting_text(preset: Preset, name: str) -> str:
    """A setting's value as help and docs show it (the lr with its batch scaling)."""
    value = preset.settings[name].value
    text = f"{value:g}" if isinstance(value, float) else str(value)
    if name == "lr" and preset.lr_batch is not None:
        text += f" x batch/{preset.lr_batch}"
    return text


def preset_help() -> str:
    """``--preset``'s help: what each preset sets, from ``PRESETS``."""
    parts = []
    for preset in PRESETS.values():
        values = ", ".join(_option_text(preset, name) for name in preset.settings)
        parts.append(f"{preset.name.value} ({preset.paper}): {values}")
    return (
        "The settings of a paper's code; a flag given explicitly wins over the preset. A "
        "preset's setting the run's way of teaching does not read is left out, and the run says "
        "which (bi-kd without --joint: offline Bi-KD, no --no-stop-grad); kl-dp is one-way, "
        "not with --joint. " + "; ".join(parts) + "."
    )


def _option_text(preset: Preset, name: str) -> str:
    """A preset's setting as a command line writes it: ``--lr 1e-06``, ``--no-stop-grad``."""
    return option_text(name, preset.settings[name].value, setting_text(preset, name))


def option_text(name: str, value: Any, text: str | None = None) -> str:
    """A value as a command line writes it (``text``: the value's own text, if not ``value``)."""
    if isinstance(value, bool):
        return option_flag(name) if value else option_flag("no_" + name)
    value = getattr(value, "value", value)
    shown = text if text is not None else f"{value:g}" if isinstance(value, float) else value
    return f"{option_flag(name)} {shown}"


def markdown_table() -> str:
    """The Presets table of docs/method.md: option, each preset's value, the sources."""
    names = list(dict.fromkeys(n for p in PRESETS.values() for n in p.settings))
    head = ["option", *(p.name.value for p in PRESETS.values()), "source"]
    rows = [head, ["---"] * len(head)]
    for name in names:
        cells, sources = [f"`{option_flag(name)}`"], []
        for preset in PRESETS.values():
            setting = preset.settings.get(name)
            cells.append("(not set)" if setting is None else setting_text(preset, name))
            if setting is not None:
                sources.append(f"{preset.name.value}: {setting.source}")
        rows.append([*cells, "; ".join(sources)])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def reads_table() -> str:
    """docs/method.md's table of the loss settings presets set, per way of teaching
    (``TEACHING_READS``): read, acted as one value (never read), or meaningless there ("-")."""
    names = dict.fromkeys(n for p in PRESETS.values() for n in p.settings if n in LOSS_FIELDS)
    head = ["option", *(TEACHING_TEXT[way].split(" (")[0] for way in TEACHING_READS)]
    rows = [head, ["---"] * len(head)]
    for name in names:
        cells = [f"`{option_flag(name)}`"]
        for reads, acts_as in TEACHING_READS.values():
            if name in reads:
                cells.append("reads")
            elif name in acts_as:  # a switch as its flag (--stop-grad), a value as its text
                value, flag = acts_as[name], option_text(name, acts_as[name])
                cells.append("acts as " + (flag if isinstance(value, bool) else flag.split()[1]))
            else:
                cells.append("-")
        rows.append(cells)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


@dataclass(frozen=True)
class RunSettings:
    """What the given options and a preset make: the run's loss settings, and the optimiser's
    ``TrainConfig`` fields that either sets (``TrainConfig``'s defaults apply to the others)."""

    loss: LossSettings
    optimiser: dict[str, Any]
    preset: PresetName | None = None
    not_applied: tuple[str, ...] = ()  # the preset's settings this way of teaching does not read
    note: str | None = None  # what of the preset this run does not apply, for its output


def preset_settings(
    preset: PresetName | None,
    *,
    joint: bool = False,
    teachers: Teachers = Teachers.OFFLINE,
    mode: PartitionMode | None = None,
    partition_score: PartitionScore | None = None,
    temperature: float | None = None,
    kd_weight: float | None = None,
    ce_weight: float | None = None,
    stop_grad: bool | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    optimizer: str | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    momentum: float | None = None,
    lr_schedule: str | None = None,
) -> RunSettings:
    """Each value given (not None) over the preset's, the preset's over the defaults, for the
    way of teaching ``joint`` / ``teachers``: a given value it does not apply is refused, a
    preset's is left out and named in the note. A preset's lr is scaled by the resolved batch
    size when the paper scales it and no lr is given."""
    given = {k: v for k, v in locals().items() if k not in ("preset", "joint", "teachers")}
    way = {"joint": joint, "teachers": Teachers(teachers)}
    _refuse_unapplied(given, **way)
    chosen = PRESETS[PresetName(preset)] if preset is not None else None
    if chosen is not None and joint and chosen.one_way is None:
        raise ConfigError(
            f"--preset {chosen.name.value} is one-way {chosen.method} from a store or live "
            "teachers; --joint trains every model both ways (Bi-KD): use --preset bi-kd with "
            "--joint, or leave out --joint"
        )
    values = _chosen(given, preset)
    not_applied: tuple[str, ...] = ()
    if chosen is not None:
        from_preset = {n: v for n, v in values.items() if given[n] is None}
        not_applied = tuple(unapplied(from_preset, **way))
        for name in not_applied:
            del values[name]  # fastkd's default: what this way of teaching does
    if chosen is not None and chosen.lr_batch is not None and lr is None:
        values["lr"] = (
            chosen.settings["lr"].value
            * values.get("batch_size", DEFAULT_BATCH_SIZE)
            / chosen.lr_batch
        )
    loss = LossSettings(**{name: values.pop(name) for name in LOSS_FIELDS if name in values})
    note = None if chosen is None else preset_note(chosen.name, not_applied, **way)
    return RunSettings(loss, values, None if chosen is None else chosen.name, not_applied, note)


def preset_note(
    preset: PresetName, not_applied: tuple[str, ...], joint: bool, teachers: Teachers
) -> str | None:
    """What a run of ``preset`` is, when it is not the paper's way (a joint paper without
    ``--joint``), and the preset's settings it leaves out; None when it applies them all."""
    chosen = PRESETS[PresetName(preset)]
    parts = []
    if chosen.one_way is not None and not joint and teachers != Teachers.NONE:
        parts.append(f"runs {chosen.one_way}")
    if not_applied:
        options = ", ".join(_option_text(chosen, name) for name in not_applied)
        way = TEACHING_TEXT[teaching_way(joint, teachers)]
        parts.append(f"not applied, as {way} does not read them: {options} (fastkd's defaults)")
    if not parts:
        return None
    return f"--preset {chosen.name.value}: " + "; ".join(parts)


def _refuse_unapplied(given: Mapping[str, Any], joint: bool, teachers: Teachers) -> None:
    """A flag given explicitly that the way of teaching does not apply: refused, naming it."""
    values = {name: value for name, value in given.items() if value is not None}
    names = unapplied(values, joint, teachers)
    if names:
        options = ", ".join(option_text(name, values[name]) for name in names)
        way = TEACHING_TEXT[teaching_way(joint, teachers)]
        it = "it" if len(names) == 1 else "them"
        hint = ""
        if "stop_grad" in names:
            hint = "; only --joint trains the teaching model, so only it sends it a KD gradient"
        raise ConfigError(f"{options}: {way} does not apply {it}; leave {it} out{hint}")


def _chosen(given: Mapping[str, Any], preset: PresetName | None) -> dict[str, Any]:
    """The given values (not None) over the preset's, for the fields of ``given``."""
    values = {name: value for name, value in given.items() if value is not None}
    if preset is not None:
        chosen = PRESETS[PresetName(preset)]
        unknown = sorted(set(chosen.settings) - set(given))
        if unknown:  # a bug: a preset must only set what preset_settings takes
            raise RuntimeError(f"preset {chosen.name.value} sets {unknown}, not taken here")
        for name, setting in chosen.settings.items():
            values.setdefault(name, setting.value)
    return values
