"""`make bench`: run every benchmark side by side and write bench/report.md with tables and plots.

Each ``scripts/bench_*.py`` prints a markdown section on stdout, writes its figures as JSON to
``--out`` and, when it draws one, a PNG to ``--plot``. This script only runs them, describes the
machine at the top and stitches the sections together; the numbers are the scripts' own.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCHES = [
    ("converter", "Converter: size and fidelity per optimization recipe"),
    ("agent", "Agent: engine overhead and input-locality cache"),
    ("cache", "Agent: input-locality cache on hard streams, against the oracle and hindsight thresholds"),
    ("telemetry", "Agent service: telemetry cost on inference throughput"),
    ("ota", "OTA: activation, hot swap and rollback"),
    ("fleet", "Fleet tool: cost against fleet size"),
]


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    versions = []
    for pkg in ("tensorflow-cpu", "keras", "ai-edge-litert", "numpy", "paho-mqtt"):
        try:
            versions.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    return (f"- Machine: {cpu}, {os.cpu_count()} cores, {mem_gb:.0f} GB RAM, {platform.system()} "
            f"{platform.release()} {platform.machine()}\n"
            f"- Python {platform.python_version()}; {', '.join(versions)}\n"
            f"- Run: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC. All figures are host (x86-64) "
            f"figures measured in this one run; ratios compare runs made side by side.\n")


def run_bench(name: str, out_dir: Path) -> tuple[str, dict | None, float]:
    script = REPO / "scripts" / f"bench_{name}.py"
    if not script.is_file():
        return f"_not run: {script.name} does not exist_\n", None, 0.0
    json_path, plot_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    cmd = [sys.executable, str(script), "--out", str(json_path)]
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, check=False).stdout
    if "--plot" in help_text:
        cmd += ["--plot", str(plot_path)]
    print(f"== bench_{name} ...", flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=REPO)
    elapsed = time.monotonic() - start
    (out_dir / f"{name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        section = f"**bench_{name} failed (exit {proc.returncode})**; see `bench/{name}.log`:\n\n```\n{tail}\n```\n"
    else:
        lines = proc.stdout.strip().splitlines()
        if lines and lines[0].startswith("#"):  # the script's own title: this report has one already
            lines = lines[1:]
        section = "\n".join(lines) + "\n"
    if plot_path.is_file():
        section += f"\n![{name}]({plot_path.name})\n"
    data = json.loads(json_path.read_text()) if json_path.is_file() else None
    print(f"   done in {elapsed:.0f} s (exit {proc.returncode})", flush=True)
    return section, data, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=str(REPO / "bench"))
    parser.add_argument("--only", nargs="*", help="run only these benchmarks", choices=[b for b, _ in BENCHES])
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = ["# edgefleet benchmark report\n", machine_description()]
    for name, title in BENCHES:
        if args.only and name not in args.only:
            continue
        section, _, elapsed = run_bench(name, out_dir)
        parts.append(f"\n## {title}\n\n_{elapsed:.0f} s_\n\n{section.strip()}\n")
    report = out_dir / "report.md"
    report.write_text("\n".join(parts))
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
