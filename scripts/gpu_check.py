"""Helpers of ``scripts/gpu-check``: the device, its short name, the checks of results, the summary.

``python scripts/gpu_check.py info --out FILE``: the device and the versions (torch, Triton,
CUDA, driver, liger-kernel, compute-sanitizer) as JSON; prints the device's short name (its
slug: ``NVIDIA H100 80GB HBM3`` -> ``h100``). Exit status 3 without a usable CUDA device.
``check-kernels FILE``: the kernel benchmark's JSON has a fastkd time for every case (exit 1 if
not); prints fastkd's GB/s and share of peak per case (``--alone``: with T, its share of the
copy and its host us), and Liger's peers beside them.
``check-train FILE`` / ``check-dump FILE``: the training and dump benchmarks' JSON, summarised.
``summary --stages TSV --info FILE --out FILE``: the stages' table on stdout and the run's JSON
(stages, device, versions) to ``--out``.

Only the standard library at import time: ``summary`` and ``slug`` work without torch.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

NO_GPU_EXIT = 3
VENDOR_WORDS = {"nvidia", "geforce", "tesla", "quadro"}


def device_slug(name: str) -> str:
    """A short file-name form of a GPU's name: the words up to the model number, and a form
    factor (pcie, nvl, sxm) if named: ``NVIDIA H100 80GB HBM3`` -> ``h100``, ``NVIDIA H100 PCIe``
    -> ``h100-pcie``, ``NVIDIA A100-SXM4-80GB`` -> ``a100-sxm4``, ``NVIDIA GeForce RTX 4090`` ->
    ``rtx-4090``."""
    words = [w for w in re.sub(r"[^a-z0-9]+", " ", name.lower()).split() if w not in VENDOR_WORDS]
    model: list[str] = []
    for word in words:
        model.append(word)
        if any(c.isdigit() for c in word):
            break
    rest = words[len(model) :]
    form = [w for w in rest if w in ("pcie", "nvl") or w.startswith("sxm")]
    return "-".join(model + form) or "gpu"


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(command: list[str]) -> str | None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def _last_line(text: str | None) -> str | None:
    lines = (text or "").splitlines()
    return lines[-1] if lines else None


def compute_sanitizer() -> str | None:
    """compute-sanitizer on PATH, else under /usr/local/cuda*/bin, else None."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for folder in sorted(Path("/usr/local").glob("cuda*/bin"), reverse=True):
        candidate = folder / "compute-sanitizer"
        if candidate.is_file():
            return str(candidate)
    return None


def info(out: Path | None) -> int:
    import torch

    if not torch.cuda.is_available():
        print(f"no usable CUDA device (torch {torch.__version__})", file=sys.stderr)
        return NO_GPU_EXIT
    properties = torch.cuda.get_device_properties(0)
    name = torch.cuda.get_device_name(0)
    sanitizer = compute_sanitizer()
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    data = {
        "device": name,
        "slug": device_slug(name),
        "compute_capability": f"{properties.major}.{properties.minor}",
        "memory_gib": round(properties.total_memory / 2**30, 1),
        "multiprocessors": properties.multi_processor_count,
        "driver": driver.splitlines()[0] if driver else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": triton_version,
        "liger_kernel": _version("liger-kernel"),
        "timm": _version("timm"),
        "zarr": _version("zarr"),
        "python": platform.python_version(),
        "host": platform.node(),
        "cpu_cores": os.cpu_count(),
        "compute_sanitizer": sanitizer,
        "compute_sanitizer_version": _last_line(_run([sanitizer, "--version"]))
        if sanitizer
        else None,
        "commit": _run(["git", "rev-parse", "HEAD"]),
    }
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(data, indent=2) + "\n")
    print(data["slug"])
    return 0


def check_kernels(path: Path) -> int:
    """Every case of the kernel benchmark has a fastkd time (a missing one is a failed run)."""
    report = json.loads(path.read_text())
    problems = []
    print(
        f"{'kernel':<14} {'BxC':<17} {'teacher':<7} {'fastkd ms':>9} {'GB/s':>7} {'% peak':>7}"
        f" {'% copy':>7} {'host us':>7}  peers"
    )
    for entry in report["cases"]:
        case = entry["case"]
        results = {m["method"]: m for m in entry["results"]}
        fastkd = results.get("fastkd", {})
        shape = f"{case['rows']}x{case['classes']}"
        if case.get("temperature") is not None:  # bench kernels --alone: a case per T
            shape += f" T={case['temperature']:g}"
        if fastkd.get("time_ms") is None:
            problems.append(f"{case['kernel']} {shape} {case['teacher']}: {fastkd.get('note')}")
            continue
        peers = ", ".join(
            f"{name} {m['gbps']:.0f} GB/s"
            for name, m in results.items()
            if name.startswith(("liger", "torch_compile")) and m.get("gbps") is not None
        )
        pct = fastkd.get("pct_peak")
        print(
            f"{case['kernel']:<14} {shape:<17} {case['teacher']:<7} {fastkd['time_ms']:>9.3f} "
            f"{fastkd['gbps']:>7.0f} {_or_dash(pct):>7} {_or_dash(fastkd.get('pct_copy')):>7}"
            f" {_or_dash(fastkd.get('host_us')):>7}  {peers or '-'}"
        )
    for line in problems:
        print(f"FAIL no fastkd time: {line}", file=sys.stderr)
    return 1 if problems else 0


def _or_dash(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def check_train(path: Path) -> int:
    """Print the training benchmark's headline: each variant's images/s over plain CE's."""
    report = json.loads(path.read_text())
    for name, entry in report["variants"].items():
        print(
            f"{name}: {entry['loader']['images_per_s']} images/s through the loader "
            f"({entry['loader_ratio_to_ce']:.3f} x CE), {entry['decoded']['images_per_s']} "
            f"decoded beforehand, peak {entry.get('peak_gpu_mib', '-')} MiB"
        )
    headline = report["headline"]
    print(f"offline >= {headline['target']} x CE: {headline['offline_within_target']}")
    return 0


def check_dump(path: Path) -> int:
    """Print the dump benchmark's headline: the whole dump over the pool's pure forward."""
    report = json.loads(path.read_text())
    print(f"ceiling (pool forward): {report['ceiling']['images_per_s']} images/s")
    for backend, entry in report["backends"].items():
        dumps = {k: v for k, v in entry.items() if k.startswith("dump_") and isinstance(v, dict)}
        rates = ", ".join(f"{k[5:]} {v['images_per_s']}" for k, v in dumps.items())
        print(
            f"{backend}: loader {entry['loader']['images_per_s']} images/s, dump {rates} "
            f"images/s; dump / ceiling {report['headline'][backend]}"
        )
    return 0


def summary(stages: Path, info_path: Path, out: Path, budget: float, started: float) -> int:
    rows = []
    for line in stages.read_text().splitlines():
        name, status, seconds, reason = [*line.split("\t"), "", "", ""][:4]
        rows.append({"stage": name, "status": status, "seconds": int(seconds or 0), "note": reason})
    device = json.loads(info_path.read_text()) if info_path.is_file() else {}
    failed = [r["stage"] for r in rows if r["status"] == "failed"]
    data = {
        "check": "scripts/gpu-check",
        "device": device.get("device"),
        "passed": not failed,
        "failed_stages": failed,
        "stages": rows,
        "versions": {
            k: device.get(k)
            for k in ("torch", "triton", "cuda", "driver", "liger_kernel", "python", "timm", "zarr")
        },
        "machine": device,
        "budget_seconds": budget,
        "wall_seconds": round(time.time() - started),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    width = max([len(r["stage"]) for r in rows] + [5])
    print(f"gpu-check on {device.get('device', '?')} ({data['wall_seconds']} s of {budget:g} s)")
    print(f"{'stage':<{width}}  {'status':<7} {'secs':>5}  note")
    for r in rows:
        print(f"{r['stage']:<{width}}  {r['status']:<7} {r['seconds']:>5}  {r['note']}")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.py", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("info")
    command.add_argument("--out", type=Path)
    command = commands.add_parser("slug")
    command.add_argument("name")
    for name in ("check-kernels", "check-train", "check-dump"):
        commands.add_parser(name).add_argument("path", type=Path)
    command = commands.add_parser("summary")
    command.add_argument("--stages", type=Path, required=True)
    command.add_argument("--info", type=Path, required=True)
    command.add_argument("--out", type=Path, required=True)
    command.add_argument("--budget", type=float, default=0)
    command.add_argument("--started", type=float, default=time.time())
    args = parser.parse_args(argv)
    if args.command == "info":
        return info(args.out)
    if args.command == "slug":
        print(device_slug(args.name))
        return 0
    if args.command == "summary":
        return summary(args.stages, args.info, args.out, args.budget, args.started)
    check = {"check-kernels": check_kernels, "check-train": check_train, "check-dump": check_dump}
    return check[args.command](args.path)


if __name__ == "__main__":
    sys.exit(main())
