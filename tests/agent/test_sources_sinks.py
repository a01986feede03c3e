"""Directory source and result sinks: file handling without a broker or a model."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agent.sinks import JsonlSink, result_record
from agent.sources import DirectoryWatcher, load_input
from edgefleet.errors import InputError
from edgefleet.testing.waiting import wait_for


def test_jsonl_sink_rotates_past_its_size_and_keeps_one_old_file(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path / "r.jsonl", max_bytes=1024)
    for i in range(40):
        sink.write(result_record("directory", f"f{i}.npy", np.zeros(3), 1.0, None, 0.0, 0, 0.5))
    sink.close()
    assert (tmp_path / "r.jsonl.1").exists() and (tmp_path / "r.jsonl").stat().st_size <= 1024
    last = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[-1])
    assert last["item"] == "f39.npy" and last["outputs"] == [0.0, 0.0, 0.0]


def test_images_are_resized_and_scaled_to_the_input_range(tmp_path: Path) -> None:
    Image.fromarray(np.full((40, 30, 3), 255, np.uint8)).save(tmp_path / "white.png")
    x = load_input(tmp_path / "white.png", (1, 16, 16, 3), (-1.0, 1.0))
    assert x.shape == (16, 16, 3) and np.allclose(x, 1.0)
    gray = load_input(tmp_path / "white.png", (1, 8, 8, 1))
    assert gray.shape == (8, 8, 1) and np.allclose(gray, 1.0)
    with pytest.raises(InputError, match="images need a model input"):
        load_input(tmp_path / "white.png", (1, 10))
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(InputError, match="not a readable image"):
        load_input(tmp_path / "bad.jpg", (1, 8, 8, 1))


def test_watcher_deletes_after_inference_skips_fresh_and_hidden_files_and_waits_for_a_model(tmp_path: Path) -> None:
    seen: list[str] = []
    shape: list[tuple[int, ...] | None] = [None]
    watcher = DirectoryWatcher(tmp_path / "in", lambda p, x: seen.append(p.name), input_shape=lambda: shape[0],
                               after="delete", poll_interval_s=0.02, settle_s=0.3)
    watcher.start()
    try:
        np.save(tmp_path / "in" / "a.npy", np.zeros(3))
        old = time.time() - 10
        os.utime(tmp_path / "in" / "a.npy", (old, old))
        np.save(tmp_path / "in" / ".hidden.npy", np.zeros(3))
        time.sleep(0.2)
        assert seen == []  # no model yet: files wait
        shape[0] = (1, 3)
        wait_for(lambda: seen == ["a.npy"], 5, what="a.npy processed")
        np.save(tmp_path / "in" / "b.npy", np.zeros(3))  # fresh: left alone for settle_s
        time.sleep(0.1)
        assert seen == ["a.npy"]
        wait_for(lambda: seen == ["a.npy", "b.npy"], 5, what="b.npy after settling")
        assert not (tmp_path / "in" / "a.npy").exists() and (tmp_path / "in" / ".hidden.npy").exists()
    finally:
        watcher.stop()


def test_an_unexpected_exception_on_one_file_or_one_scan_does_not_kill_the_source(tmp_path: Path) -> None:
    seen: list[str] = []
    shape_calls = [0]

    def process(path: Path, x: object) -> None:
        if path.name == "crash.npy":
            raise KeyError("a bug in a sink")  # not an EdgefleetError: the kind that used to kill the thread
        seen.append(path.name)

    def input_shape() -> tuple[int, ...]:
        shape_calls[0] += 1
        if shape_calls[0] == 1:
            raise RuntimeError("the model swapped underneath")
        return (1, 3)

    watcher = DirectoryWatcher(tmp_path / "in", process, input_shape=input_shape, poll_interval_s=0.02, settle_s=0)
    watcher.start()
    try:
        np.save(tmp_path / "in" / "crash.npy", np.zeros(3))
        wait_for(lambda: (tmp_path / "in" / "failed" / "crash.npy").exists(), 5, what="crash.npy in failed/")
        np.save(tmp_path / "in" / "ok.npy", np.zeros(3))
        wait_for(lambda: seen == ["ok.npy"], 5, what="the next file processed")
        assert watcher.errors == 2 and watcher.failed == 1 and watcher.processed == 1
    finally:
        watcher.stop()
