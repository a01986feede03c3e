"""Load a trained model (Keras 3 ``.keras``, legacy ``.h5``, or a SavedModel directory).

Whatever the source, the result carries a batch-1 SavedModel with one ``serving_default``
signature whose input and output keys are the names the artifact will use. That one shape is what
the quantizer and the fidelity search work on, so they never care where the model came from.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converter._tf import keras, tf
from edgefleet.errors import ConversionError, ModelError

__all__ = ["LoadedModel", "TensorInfo", "export_keras", "load_model", "source_sha256"]

SourceFormat = Literal["keras", "h5", "saved_model"]
_NAME_OK = re.compile(r"[^A-Za-z0-9_]")


@dataclass(frozen=True)
class TensorInfo:
    """One model input or output as the float model sees it (batch fixed to 1)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to convert: the batch-1 SavedModel plus what we know about its source."""

    path: Path
    format: SourceFormat
    sha256: str
    saved_model_dir: Path
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    keras_model: Any | None = None  # keras.Model when the source is Keras (pruning needs it)


def source_sha256(path: Path) -> str:
    """Hash of a model file, or of every file of a SavedModel directory (relative names included)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def _clean(name: str, fallback: str) -> str:
    name = _NAME_OK.sub("_", name.split(":")[0]).strip("_")
    return name or fallback


def _fixed_shape(shape: Any, what: str) -> tuple[int, ...]:
    dims = list(shape)
    if dims and dims[0] is None:
        dims[0] = 1
    if any(d is None for d in dims):
        raise ConversionError(f"{what}: shape {tuple(shape)} has a dynamic dimension besides the batch; "
                              "expected a fixed input size")
    if dims and dims[0] != 1:
        raise ConversionError(f"{what}: batch dimension is {dims[0]}, expected 1 or dynamic")
    return tuple(int(d) for d in dims)


def _keras_output_names(model: Any) -> list[str]:
    names = []
    for i, tensor in enumerate(model.outputs):
        history = getattr(tensor, "_keras_history", None)
        layer_name = getattr(getattr(history, "operation", None), "name", None) if history else None
        names.append(_clean(layer_name or f"output_{i}", f"output_{i}"))
    if len(set(names)) != len(names):
        names = [f"output_{i}" for i in range(len(names))]
    return names


def export_keras(model: Any, out_dir: Path, names: tuple[list[str], list[str]] | None = None,
                 ) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """Write ``model`` as a batch-1 SavedModel with clean signature names; return its I/O info.

    ``names`` (inputs, outputs) forces the signature names, so a pruned rebuild of a model keeps
    the contract of the original even when Keras renamed its layers.

    Raises:
        ConversionError: the model has dynamic non-batch dimensions or cannot be traced.
    """
    in_names = [_clean(t.name, f"input_{i}") for i, t in enumerate(model.inputs)]
    if len(set(in_names)) != len(in_names):
        in_names = [f"input_{i}" for i in range(len(in_names))]
    out_names = _keras_output_names(model)
    if names is not None:
        if (len(names[0]), len(names[1])) != (len(in_names), len(out_names)):
            raise ConversionError(f"expected {len(names[0])} inputs and {len(names[1])} outputs, "
                                  f"got {len(in_names)} and {len(out_names)}")
        in_names, out_names = list(names[0]), list(names[1])
    specs = [tf.TensorSpec(_fixed_shape(t.shape, f"input {n!r}"), tf.as_dtype(t.dtype), name=n)
             for n, t in zip(in_names, model.inputs)]

    def serve(*xs: Any) -> dict[str, Any]:
        ys = model(list(xs) if len(xs) > 1 else xs[0], training=False)
        ys = list(ys) if isinstance(ys, (list, tuple)) else [ys]
        return dict(zip(out_names, ys))

    archive = keras.export.ExportArchive()
    archive.track(model)
    try:
        archive.add_endpoint("serving_default", serve, input_signature=specs)
        archive.write_out(str(out_dir), verbose=False)
    except (ValueError, TypeError, tf.errors.OpError) as exc:
        raise ConversionError(f"cannot trace the Keras model for export: {exc}") from exc
    inputs = tuple(TensorInfo(n, tuple(s.shape.as_list()), s.dtype.name) for n, s in zip(in_names, specs))
    probe = serve(*[np.zeros(s.shape, s.dtype.as_numpy_dtype) for s in specs])
    outputs = tuple(TensorInfo(n, tuple(int(d) for d in probe[n].shape), probe[n].dtype.name)
                    for n in out_names)
    return inputs, outputs


def _export_saved_model(src: Path, out_dir: Path) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    try:
        obj = tf.saved_model.load(str(src))
    except (OSError, ValueError, tf.errors.OpError) as exc:
        raise ModelError(f"{src}: not a loadable SavedModel ({str(exc).splitlines()[0]})") from exc
    sigs = dict(obj.signatures)
    if not sigs:
        raise ModelError(f"{src}: SavedModel has no signatures; expected a serving_default signature")
    sig = sigs.get("serving_default") or sigs[min(sigs)]
    _, kw = sig.structured_input_signature
    names = sorted(kw)
    specs = [tf.TensorSpec(_fixed_shape(kw[n].shape, f"input {n!r}"), kw[n].dtype, name=_clean(n, n))
             for n in names]

    def serve(*xs: Any) -> dict[str, Any]:
        return sig(**dict(zip(names, xs)))

    fn = tf.function(serve, input_signature=specs)
    holder = tf.Module()
    holder.obj = obj
    tf.saved_model.save(holder, str(out_dir), signatures={"serving_default": fn.get_concrete_function()})
    outs = fn.get_concrete_function().structured_outputs
    inputs = tuple(TensorInfo(s.name, tuple(s.shape.as_list()), s.dtype.name) for s in specs)
    outputs = tuple(TensorInfo(k, _fixed_shape(v.shape, f"output {k!r}"), v.dtype.name)
                    for k, v in sorted(outs.items()))
    return inputs, outputs


def _check_float_io(loaded: tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]], path: Path) -> None:
    for info in loaded[0]:
        if info.dtype not in ("float32", "float16"):
            raise ConversionError(f"{path}: input {info.name!r} is {info.dtype}; expected a float model input")


def load_model(path: Path | str, workdir: Path) -> LoadedModel:
    """Load a Keras or SavedModel model and export it to ``workdir`` as a batch-1 SavedModel.

    Raises:
        ModelError: the path is missing, the format unsupported, or the file does not load.
        ConversionError: the model cannot be exported with a fixed batch of 1.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: model not found")
    out_dir = workdir / "float_saved_model"
    keras_model = None
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise ModelError(f"{path}: directory is not a SavedModel (no saved_model.pb)")
        fmt: SourceFormat = "saved_model"
        io = _export_saved_model(path, out_dir)
    elif path.suffix.lower() in (".keras", ".h5", ".hdf5"):
        fmt = "keras" if path.suffix.lower() == ".keras" else "h5"
        try:
            keras_model = keras.models.load_model(str(path), compile=False)
        except Exception as exc:  # keras raises many kinds for a corrupt or foreign file
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
            raise ModelError(f"{path}: cannot load as a Keras model ({first})") from exc
        io = export_keras(keras_model, out_dir)
    else:
        raise ModelError(f"{path}: unsupported model format {path.suffix or '(no suffix)'!r}; "
                         "expected .keras, .h5/.hdf5 or a SavedModel directory")
    _check_float_io(io, path)
    return LoadedModel(path=path, format=fmt, sha256=source_sha256(path), saved_model_dir=out_dir,
                       inputs=io[0], outputs=io[1], keras_model=keras_model)
