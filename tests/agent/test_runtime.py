"""The runtime adapter: which interpreter package is used, Edge TPU fallback and refusal, load errors.

There is no Edge TPU on this machine (and no libedgetpu): the delegate load genuinely fails here,
which is exactly the situation the coral-usb fallback and the coral-devboard refusal are about.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from agent import Engine
from agent.runtime import describe_load_error, get_runtime, load_edgetpu_delegate, open_interpreter
from edgefleet.errors import ConfigError, ModelError

pytestmark = pytest.mark.runtime


def test_runtime_is_litert_or_tflite_runtime_and_tensorflow_is_not_imported():
    code = ("import sys; from agent.runtime import get_runtime; print(get_runtime().name); "
            "print('tensorflow' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=60)
    name, tf_loaded = proc.stdout.split()
    assert name in ("ai-edge-litert", "tflite-runtime")
    assert tf_loaded == "False"


def test_edgetpu_delegate_missing_is_a_model_error_naming_the_library():
    with pytest.raises(ModelError, match="libedgetpu"):
        load_edgetpu_delegate(get_runtime())


def test_coral_usb_profile_falls_back_to_cpu_and_says_so(models):
    engine = Engine(models / "uint8.tflite", profile="coral-usb", autotune=False)
    assert engine.accelerator == "cpu-fallback"
    assert engine.stats()["accelerator"] == "cpu-fallback"
    assert "cpu-fallback" in repr(engine)
    assert engine.infer(np.zeros((1, 16, 16, 3), np.uint8)).shape == (1, 10)


def test_coral_devboard_profile_refuses_without_the_edge_tpu(models):
    with pytest.raises(ConfigError, match="requires the Edge TPU"):
        Engine(models / "uint8.tflite", profile="coral-devboard")


def test_unresolved_custom_op_error_names_the_op(models):
    with pytest.raises(ModelError, match="custom op 'EdgefleetSecretOp'"):
        Engine(models / "custom_op.tflite", profile="x86-dev")


def test_garbage_bytes_are_a_model_error_not_a_crash():
    with pytest.raises(ModelError, match="cannot be loaded"):
        open_interpreter(b"\x00" * 64, threads=1)


def test_load_error_text_is_one_line():
    msg = describe_load_error(RuntimeError("\nfirst line\nsecond line"))
    assert msg == "model cannot be loaded: first line"
