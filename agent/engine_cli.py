"""``edge-agent infer | validate | bench``: the engine from the command line.

Each handler takes the parsed argparse namespace and returns an exit code; errors are raised as
:mod:`edgefleet.errors` types and turned into one ``error:`` line by :func:`edgefleet.cli.run_main`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet.errors import ConfigError, InputError
from edgefleet.profiles import default_profile

__all__ = ["cmd_bench", "cmd_infer", "cmd_validate", "load_array_file"]


def load_array_file(path: str) -> np.ndarray | dict[str, np.ndarray]:
    """Read a ``.npy`` array, or a ``.npz`` of named arrays (for multi-input models).

    Raises:
        InputError: the file is missing or not a numpy array file (pickles are refused).
    """
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{file}: input file not found")
    try:
        loaded = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{file}: not a .npy/.npz array file ({exc})") from exc
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            return {name: loaded[name] for name in loaded.files}
    return loaded


@contextlib.contextmanager
def _native_stderr_hidden(hide: bool) -> Iterator[None]:
    """Hide what the C++ runtime prints while it loads a model (no switch turns off LiteRT's
    "INFO: Created TensorFlow Lite XNNPACK delegate"), so the CLI's output stays one clean line.
    Only around model loading in this single-threaded CLI; ``--debug`` shows everything."""
    if not hide:
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _engine(args: argparse.Namespace, **kwargs: Any) -> Any:
    from agent.engine import Engine

    with _native_stderr_hidden(not getattr(args, "debug", False)):
        return Engine(args.model, profile=args.profile or default_profile(), **kwargs)


def _save(path: str, result: np.ndarray | dict[str, np.ndarray]) -> None:
    from edgefleet.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    if isinstance(result, dict):
        if not path.endswith(".npz"):
            raise ConfigError(f"--output {path}: the model has several outputs; use a .npz file name")
        np.savez(buffer, **result)
    else:
        np.save(buffer, result)
    atomic_write_bytes(Path(path), buffer.getvalue())


def cmd_infer(args: argparse.Namespace) -> int:
    """Run the model once on ``--input`` (one sample or a batch) and print or save the outputs."""
    engine = _engine(args, autotune=False, instances=1)
    x = load_array_file(args.input)
    result = engine.infer(x)
    if args.output:
        _save(args.output, result)
    named = result if isinstance(result, dict) else {engine.output_details[0].name: result}
    if args.json:
        body: dict[str, Any] = {"outputs": {k: v.tolist() for k, v in named.items()}}
        if engine._is_classifier():
            body["top1"] = np.atleast_1d(engine.top1(result)).tolist()
        print(json.dumps(body))
    elif not args.output:
        for name, value in named.items():
            print(f"{name} {list(value.shape)} {value.dtype}:")
            print(np.array2string(value, precision=5, threshold=64))
    engine.close()
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Exit 0 when the model loads and runs in a child process, 1 with a one-line reason otherwise."""
    from agent.validation import validate_model

    if not Path(args.model).exists():
        raise InputError(f"{args.model}: model file not found")
    report = validate_model(args.model, profile=args.profile or default_profile())
    if args.json:
        print(json.dumps(report.to_json()))
    elif report.ok:
        ins = ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in report.inputs)
        outs = ", ".join(f"{t['name']} {t['dtype']}{t['shape']}" for t in report.outputs)
        golden = report.golden.get("samples", 0)
        print(f"ok: {args.model} loads and runs ({report.latency_ms:.3f} ms median; inputs {ins}; "
              f"outputs {outs}; golden samples passed {report.golden.get('passed', 0)}/{golden})")
    if not report.ok:
        print(f"invalid: {report.reason}", file=sys.stderr)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Latency percentiles and throughput on this machine, with the cache on or off."""
    if args.iterations < 1:
        raise ConfigError(f"--iterations must be >= 1, got {args.iterations}")
    engine = _engine(args, cache=args.cache == "on")
    if args.stream:
        frames = load_array_file(args.stream)
        if isinstance(frames, dict):
            raise InputError(f"{args.stream}: --stream takes one .npy array of frames [T, ...]")
        feed = [frames[i] for i in range(len(frames))]
    else:
        if args.input:
            x = load_array_file(args.input)
        else:
            x = {t.name: np.zeros(t.shape, t.dtype) for t in engine.input_details}
        feed = [x] * args.iterations
    from agent.engine import last_latency_s

    engine.infer(feed[0])  # warm-up, not counted
    times = np.empty(len(feed))
    start = time.perf_counter()
    for i, sample in enumerate(feed):
        engine.infer(sample)
        times[i] = last_latency_s()  # the engine's own clock: the figure its stats and the service use
    total = time.perf_counter() - start
    stats = engine.stats()
    result = {
        "model": str(args.model), "calls": len(feed), "cache": args.cache,
        "latency_ms": {k: round(float(np.percentile(times, q)) * 1000, 4) for k, q in
                       (("p50", 50), ("p95", 95), ("p99", 99))},
        "throughput": round(len(feed) / total, 1),
        "runtime": stats["runtime"], "accelerator": stats["accelerator"], "layout": stats["layout"],
        "cache_stats": stats["cache"],
    }
    engine.close()
    if args.json:
        print(json.dumps(result))
        return 0
    lat = result["latency_ms"]
    print(f"{result['calls']} calls on {stats['runtime']} ({stats['accelerator']}, "
          f"{stats['layout']['threads']} threads x {stats['layout']['instances']}): "
          f"p50 {lat['p50']:.3f} ms, p95 {lat['p95']:.3f} ms, p99 {lat['p99']:.3f} ms, "
          f"{result['throughput']:.0f}/s")
    cache = stats["cache"]
    if cache.get("enabled"):
        print(f"cache: {cache['exact_hits']} exact + {cache['near_hits']} near hits, {cache['misses']} misses, "
              f"{cache['verified_hits']} verified (disagreement {cache['disagreement']}), "
              f"threshold {cache['threshold']}")
    return 0
