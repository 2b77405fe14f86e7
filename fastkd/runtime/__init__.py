"""Where a process runs and how it reports: device, ranks, autocast, progress bars, JSON form.

One home for each; dump, training, evaluation and the benchmarks use these, through the names
below. torch is imported inside the functions that need it, so the torch-free parts (the store,
``fastkd inspect``, ``fastkd --help``) can use the JSON form without loading torch.

Modules, in the order they import each other: ``job`` (the torchrun job: ``DistContext``, ranks,
work on the main rank), ``device`` (``resolve_device``, ``autocast``, ``fast_memory_format``,
``in_fast_layout``), ``determinism`` (``reproducible`` and what it pins), ``progress``
(progress bars, ``machine_name``); ``json_form`` (``json_default``, ``plain``) stands alone.
"""

from fastkd.runtime.determinism import CUBLAS_WORKSPACE, PINNED_CPU_PATHS, reproducible
from fastkd.runtime.device import autocast, fast_memory_format, in_fast_layout, resolve_device
from fastkd.runtime.job import DistContext, init_distributed, join_job, local_rank, on_main
from fastkd.runtime.json_form import json_default, plain
from fastkd.runtime.progress import RateColumn, machine_name, progress_bar

__all__ = [
    "CUBLAS_WORKSPACE",
    "PINNED_CPU_PATHS",
    "DistContext",
    "RateColumn",
    "autocast",
    "fast_memory_format",
    "in_fast_layout",
    "init_distributed",
    "join_job",
    "json_default",
    "local_rank",
    "machine_name",
    "on_main",
    "plain",
    "progress_bar",
    "reproducible",
    "resolve_device",
]
