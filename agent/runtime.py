"""Pick the TFLite interpreter package and open interpreters, with or without the Edge TPU.

Order of preference: ``ai_edge_litert`` (LiteRT), ``tflite_runtime`` (legacy, 32-bit Pi OS and
Coral stacks), and only as a last resort on development machines ``tensorflow.lite``. TensorFlow
is imported lazily and only when neither runtime is installed, so a device never loads it.

Runtime exceptions (``ValueError``/``RuntimeError`` from the native wrapper, ``OSError`` from
delegate loading) are translated here into :class:`~edgefleet.errors.ModelError`, naming the
unresolved custom op when that is the cause.
"""

from __future__ import annotations

import ctypes
import importlib
import re
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

from edgefleet.errors import ConfigError, ModelError

__all__ = [
    "EDGETPU_LIBRARY",
    "RUNTIME_MODULES",
    "Runtime",
    "describe_load_error",
    "get_runtime",
    "load_edgetpu_delegate",
    "open_interpreter",
]

# (name reported in stats, module to import); first importable wins.
RUNTIME_MODULES: tuple[tuple[str, str], ...] = (
    ("ai-edge-litert", "ai_edge_litert.interpreter"),
    ("tflite-runtime", "tflite_runtime.interpreter"),
    ("tensorflow", "tensorflow.lite"),
)
EDGETPU_LIBRARY = "libedgetpu.so.1"

_CUSTOM_OP = re.compile(r"unresolved custom op:\s*([^\s.]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Runtime:
    """The interpreter package in use: its stats name and its ``Interpreter``/``load_delegate``."""

    name: str
    interpreter_class: Any
    load_delegate: Any


@lru_cache(maxsize=1)
def get_runtime() -> Runtime:
    """The first available interpreter package (cached for the process).

    Raises:
        ModelError: none of ai-edge-litert, tflite-runtime or tensorflow is installed.
    """
    for name, module_name in RUNTIME_MODULES:
        try:
            module: ModuleType = importlib.import_module(module_name)
        except ImportError:
            continue
        if name == "tensorflow":
            module = module.lite  # type: ignore[attr-defined]  # tf.lite.Interpreter
            load = module.experimental.load_delegate
        else:
            load = module.load_delegate
        return Runtime(name=name, interpreter_class=module.Interpreter, load_delegate=load)
    raise ModelError("no TFLite runtime installed: expected ai-edge-litert or tflite-runtime "
                     "(pip install 'edgefleet[agent]')")


def describe_load_error(exc: BaseException) -> str:
    """One line for a failure to load or allocate a model; names an unresolved custom op."""
    text = str(exc)
    match = _CUSTOM_OP.search(text)
    if match:
        return (f"model uses custom op {match.group(1)!r}, which this runtime does not provide "
                "(rebuild the model with builtin ops only)")
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    return f"model cannot be loaded: {first}"


def load_edgetpu_delegate(runtime: Runtime, library: str = EDGETPU_LIBRARY) -> Any:
    """Load the Edge TPU delegate.

    The shared library is probed with ctypes first: when it is missing the runtime's own
    ``load_delegate`` would leave a half-built object that complains when garbage-collected.

    Raises:
        ModelError: the library is not installed or no Edge TPU answers.
    """
    try:
        ctypes.CDLL(library)
    except OSError as exc:
        raise ModelError(f"Edge TPU runtime {library} not found ({exc}); "
                         "install libedgetpu1-std and plug in the accelerator") from exc
    try:
        return runtime.load_delegate(library)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"Edge TPU delegate failed to load: {exc}; is the accelerator plugged in?") from exc


def open_interpreter(model_content: bytes, *, threads: int | None, accelerator: str = "none",
                     accelerator_required: bool = False, runtime: Runtime | None = None) -> tuple[Any, str]:
    """Create and allocate one interpreter for ``model_content``.

    Returns the interpreter and the accelerator actually in use: ``"cpu"``, ``"edgetpu"`` or
    ``"cpu-fallback"`` (an Edge TPU was asked for, is not required, and could not be loaded).

    Raises:
        ConfigError: the Edge TPU is required but cannot be loaded.
        ModelError: the model cannot be parsed, has unresolved custom ops, or cannot be allocated.
    """
    runtime = runtime or get_runtime()
    delegates: list[Any] = []
    used = "cpu"
    if accelerator == "edgetpu":
        try:
            delegates.append(load_edgetpu_delegate(runtime))
            used = "edgetpu"
        except ModelError as exc:
            if accelerator_required:
                raise ConfigError(f"the profile requires the Edge TPU and it is unavailable: {exc}") from exc
            used = "cpu-fallback"
    elif accelerator not in ("none", "cpu"):
        raise ConfigError(f"unknown accelerator {accelerator!r}: expected 'none' or 'edgetpu'")
    kwargs: dict[str, Any] = {"model_content": model_content}
    if threads is not None:
        kwargs["num_threads"] = int(threads)
    if delegates:
        kwargs["experimental_delegates"] = delegates
    try:
        interpreter = runtime.interpreter_class(**kwargs)
        interpreter.allocate_tensors()
    except (ValueError, RuntimeError, TypeError) as exc:
        raise ModelError(describe_load_error(exc)) from exc
    return interpreter, used
