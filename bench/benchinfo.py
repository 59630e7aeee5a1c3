"""What every benchmark result records: the device it ran on and the commit it measured."""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short hash of HEAD, with -dirty when tracked files have uncommitted changes ('unknown' outside git)."""
    proc = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    commit = proc.stdout.strip()
    if not commit:
        return "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=REPO).stdout.strip()
    return commit + ("-dirty" if dirty else "")  # uncommitted changes to tracked files were measured too


def publish(report: str, out: str | Path | None) -> None:
    """Print the result table and, when ``out`` is given, write it there (parents created)."""
    print(report)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(report)


def torchrun_python(ranks: int, code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the Python ``code`` in ``ranks`` local gloo processes under torchrun (in the repository root)."""
    import sys

    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
            "--no-python", sys.executable, "-c", code]
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
