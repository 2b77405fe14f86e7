"""A CLI that answers at once: ``fastkd --help``, every command's ``--help`` and argument errors
import none of the heavy libraries (torch, timm, DALI, zarr, Triton, matplotlib, numpy, ...).

The commands import them when they run. What is checked is the set of imported modules, in a
fresh interpreter, not a time: a time depends on the machine and on its load.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

HEAVY = (
    "torch",
    "torchvision",
    "timm",
    "nvidia",  # nvidia.dali
    "zarr",
    "numcodecs",
    "triton",
    "matplotlib",
    "numpy",
    "sklearn",
    "PIL",
    "huggingface_hub",
)

# Run in a fresh interpreter: every --help and usage error the CLI answers without running a
# command, then the top-level packages of the heavy libraries that got imported.
_PROBE = textwrap.dedent(
    """
    import json, sys
    import typer
    from typer.testing import CliRunner
    from fastkd.cli.main import app

    heavy = set(json.loads(sys.argv[1]))
    root = typer.main.get_command(app)

    def paths(command, prefix):
        yield prefix
        for name, sub in getattr(command, "commands", {}).items():  # a group's commands
            yield from paths(sub, [*prefix, name])

    runs = []
    for path in paths(root, []):
        command = root
        for name in path:
            command = command.commands[name]
        if command.add_help_option:  # bench's benchmarks forward --help to their own parser
            runs.append(([*path, "--help"], 0))
    # Argument errors: a typo'd command, a missing required option, a bad choice, a bad number.
    runs += [
        (["dum"], 2),
        (["dump"], 2),
        (["dump", "--data", "d", "--model", "m", "--out", "o", "--tail", "wide"], 2),
        (["train", "--data", "d", "--mode", "nope"], 2),
        (["train", "--data", "d", "--epochs", "0"], 2),
        (["eval", "--data", "d"], 2),
        (["demo", "--folds", "x"], 2),
        (["inspect"], 2),
    ]
    runner = CliRunner()
    results = []
    for args, expected in runs:
        result = runner.invoke(app, args)
        results.append([args, result.exit_code, expected, len(result.output)])
    loaded = sorted({name.split(".")[0] for name in sys.modules} & heavy)
    print(json.dumps({"results": results, "loaded": loaded}))
    """
)


def test_help_and_usage_errors_import_no_heavy_library() -> None:
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    found = json.loads(probe.stdout.strip().splitlines()[-1])
    commands = {" ".join(args[:-1]) for args, *_ in found["results"] if args[-1] == "--help"}
    assert {"", "dump", "inspect", "train", "eval", "demo", "bench"} <= commands
    for args, code, expected, printed in found["results"]:
        assert code == expected, f"fastkd {' '.join(args)} exited {code}, not {expected}"
        assert printed, f"fastkd {' '.join(args)} printed nothing"
    assert found["loaded"] == [], f"imported at start-up: {found['loaded']}"
