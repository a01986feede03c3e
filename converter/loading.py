"""Load a trained model (Keras 3 ``.keras``, legacy ``.h5``, or a SavedModel directory).

Whatever the source, the result carries a batch-1 SavedModel with one ``serving_default``
signature whose input and output keys are the names the artifact will use. That one shape is what
the quantizer and the fidelity search work on, so they never care where the model came from.

Models from the wild break in known ways, each turned into one line naming the file here, where
TensorFlow raises: SavedModels written by TF 2.x / Keras 2 with an optimizer (TF 2.16+'s loader
cannot restore the optimizer's slot variables; they are not part of inference, so they are
stripped from a copy of the object graph), several signatures (``serving_default`` or
``signature``), dynamic non-batch dimensions (``input_shapes``), Keras custom and Lambda layers
(named; ``custom_objects`` loads them), TF1-style SavedModels (their signatures convert).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from converter._tf import keras, tf
from edgefleet.errors import ConfigError, ConversionError, ModelError

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


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


def _fixed_shape(shape: Any, what: str, override: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The batch-1 static shape of an input: ``override`` (``--input-shape``) where given, checked
    against the dimensions the model fixes.

    Raises:
        ConfigError: a dynamic dimension besides the batch and no override, or an override that
            contradicts the model.
    """
    dims = list(shape)
    if override is not None:
        if len(override) != len(dims) or any(d is not None and d != o for d, o in zip(dims[1:], override[1:])):
            raise ConfigError(f"{what}: --input-shape {override} does not fit the model's shape {tuple(dims)}")
        dims = list(override)
    if dims and dims[0] is None:
        dims[0] = 1
    if any(d is None for d in dims):
        name = what.split("'")[1] if "'" in what else what
        hint = ",".join("1" if i == 0 else ("D" if d is None else str(d)) for i, d in enumerate(dims))
        raise ConfigError(f"{what}: shape {tuple(shape)} has a dynamic dimension besides the batch; "
                          f"expected a fixed input size: pass --input-shape {name}={hint}")
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
                 input_shapes: dict[str, tuple[int, ...]] | None = None, source: Path | None = None,
                 ) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    """Write ``model`` as a batch-1 SavedModel with clean signature names; return its I/O info.

    ``input_shapes`` fixes dynamic dimensions by input name; ``source`` names the file in errors.

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
    shapes = _check_shape_names(input_shapes, in_names)
    where = f"{source}: " if source else ""
    specs = [tf.TensorSpec(_fixed_shape(t.shape, f"{where}input {n!r}", shapes.get(n)), tf.as_dtype(t.dtype), name=n)
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
    except Exception as exc:  # tracing runs the user's layers: any error is the model's
        raise ConversionError(f"cannot trace the Keras model for export: {_first_line(exc)}") from exc
    inputs = tuple(TensorInfo(n, tuple(s.shape.as_list()), s.dtype.name) for n, s in zip(in_names, specs))
    probe = serve(*[np.zeros(s.shape, s.dtype.as_numpy_dtype) for s in specs])
    outputs = tuple(TensorInfo(n, tuple(int(d) for d in probe[n].shape), probe[n].dtype.name)
                    for n in out_names)
    return inputs, outputs


def _check_shape_names(input_shapes: dict[str, tuple[int, ...]] | None, names: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = dict(input_shapes or {})
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise ConfigError(f"--input-shape {unknown[0]}: the model has no such input; expected one of "
                          f"{', '.join(names)}")
    return shapes


def _without_optimizer_slots(src: Path, workdir: Path) -> Path | None:
    """A copy of ``src`` whose object graph no longer links optimizer slot variables to their
    optimizer; None when it has none. The variables stay (plain variables nothing reads): only the
    links make TF 2.16+'s loader call ``add_slot`` on a Keras 2 optimizer it cannot rebuild."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((src / "saved_model.pb").read_bytes())
    changed = False
    for meta in proto.meta_graphs:
        for node in meta.object_graph_def.nodes:
            if len(node.slot_variables):
                del node.slot_variables[:]
                changed = True
    if not changed:
        return None
    copy = workdir / "source_without_optimizer_slots"
    copy.mkdir()
    (copy / "saved_model.pb").write_bytes(proto.SerializeToString())
    for part in src.iterdir():
        if part.name != "saved_model.pb":
            (copy / part.name).symlink_to(part.resolve(), target_is_directory=part.is_dir())
    return copy


def _load_saved_model(src: Path, workdir: Path) -> Any:
    """``tf.saved_model.load``, retried without optimizer slots when those are what fails.

    Raises:
        ModelError: not a SavedModel TensorFlow can read.
    """
    try:
        return tf.saved_model.load(str(src))
    except Exception as exc:  # noqa: BLE001 (AttributeError, ValueError, KeyError, OpError...: retried, then raised)
        first = exc
    try:
        stripped = _without_optimizer_slots(src, workdir)
    except Exception:  # noqa: BLE001 (not even a parsable saved_model.pb: the loader's own error is raised)
        stripped = None
    if stripped is not None:
        try:
            return tf.saved_model.load(str(stripped))
        except Exception as exc:  # noqa: BLE001 (raised below as a ModelError)
            first = exc
    raise ModelError(f"{src}: cannot load as a TensorFlow SavedModel ({type(first).__name__}: "
                     f"{_first_line(first)}); expected a SavedModel written by tf.saved_model.save, "
                     "Keras model.export or a TF1 SavedModelBuilder") from first


def _pick_signature(src: Path, sigs: dict[str, Any], wanted: str | None) -> Any:
    names = ", ".join(sorted(sigs)) or "none"
    if wanted is not None:
        if wanted not in sigs:
            raise ConfigError(f"--signature {wanted}: {src} has no such signature; expected one of {names}")
        return sigs[wanted]
    if "serving_default" in sigs:
        return sigs["serving_default"]
    if len(sigs) == 1:
        return next(iter(sigs.values()))
    if not sigs:
        raise ModelError(f"{src}: SavedModel has no signatures; expected a serving_default signature")
    raise ConfigError(f"{src}: SavedModel has several signatures ({names}) and no serving_default; "
                      "pass --signature NAME")


def _export_saved_model(src: Path, out_dir: Path, signature: str | None = None,
                        input_shapes: dict[str, tuple[int, ...]] | None = None,
                        ) -> tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]]:
    obj = _load_saved_model(src, out_dir.parent)
    sig = _pick_signature(src, dict(getattr(obj, "signatures", {}) or {}), signature)
    _, kw = sig.structured_input_signature
    names = sorted(kw)
    shapes = _check_shape_names(input_shapes, [_clean(n, n) for n in names])
    specs = [tf.TensorSpec(_fixed_shape(kw[n].shape, f"{src}: input {_clean(n, n)!r}", shapes.get(_clean(n, n))),
                           kw[n].dtype, name=_clean(n, n)) for n in names]

    def serve(*xs: Any) -> dict[str, Any]:
        return sig(**dict(zip(names, xs)))

    try:
        fn = tf.function(serve, input_signature=specs)
        concrete = fn.get_concrete_function()
        holder = tf.Module()
        holder.obj = obj
        tf.saved_model.save(holder, str(out_dir), signatures={"serving_default": concrete})
    except Exception as exc:  # tracing or saving the loaded graph: the model's fault, name the file
        raise ConversionError(f"{src}: cannot re-export the signature with batch 1 ({type(exc).__name__}: "
                              f"{_first_line(exc)}); expected a signature that runs on fixed-shape inputs") from exc
    outs = concrete.structured_outputs
    if not isinstance(outs, dict):
        raise ConversionError(f"{src}: the signature returns {type(outs).__name__}; expected a dict of named outputs")
    inputs = tuple(TensorInfo(s.name, tuple(s.shape.as_list()), s.dtype.name) for s in specs)
    outputs = tuple(TensorInfo(k, _fixed_shape(v.shape, f"output {k!r}"), v.dtype.name)
                    for k, v in sorted(outs.items()))
    return inputs, outputs


def _custom_objects(module_file: Path) -> dict[str, Any]:
    """The classes and functions a ``--custom-objects`` file defines (or its ``CUSTOM_OBJECTS`` dict).

    Raises:
        ConfigError: the file does not import.
    """
    name = f"_edge_convert_custom_{abs(hash(str(module_file.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, module_file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"--custom-objects {module_file}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code
        raise ConfigError(f"--custom-objects {module_file}: import failed ({type(exc).__name__}: "
                          f"{_first_line(exc)})") from exc
    given = getattr(module, "CUSTOM_OBJECTS", None)
    if isinstance(given, dict):
        return dict(given)
    return {k: v for k, v in vars(module).items()
            if not k.startswith("_") and callable(v) and getattr(v, "__module__", None) == name}


def _layer_configs(path: Path) -> list[dict[str, Any]]:
    """Every layer config stored in a Keras file (nested models included); empty if unreadable."""
    try:
        if path.suffix.lower() == ".keras":
            with zipfile.ZipFile(path) as archive:
                config = json.loads(archive.read("config.json"))
        else:
            import h5py
            with h5py.File(path, "r") as h5:
                raw = h5.attrs.get("model_config")
                config = json.loads(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else {}
    except Exception:  # noqa: BLE001 (only used to improve an error message)
        return []
    found: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "class_name" in node and isinstance(node.get("config"), dict) and "name" in node["config"]:
                found.append(node)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(config.get("config", config))
    return found


def _keras_load_error(path: Path, exc: BaseException, custom: bool) -> ModelError:
    """Name the layer Keras could not rebuild, and say what would load it."""
    text = str(exc)
    layers = _layer_configs(path)
    if "Lambda" in text and not custom:
        names = [c["config"]["name"] for c in layers if c.get("class_name") == "Lambda"]
        return ModelError(f"{path}: Lambda layer {', '.join(map(repr, names)) or '(unnamed)'} stores Python code "
                          "that Keras will not run from a file by default; expected standard layers, or pass "
                          "--custom-objects module.py (which also allows the file's code to run)")
    match = re.search(r"(?:Could not locate (?:class|function)|Unknown (?:layer|object|class)(?: name)?):? "
                      r"['\"]?([A-Za-z_][\w.>]*)", text)
    if match:
        cls = match.group(1).split(">")[-1]
        names = [c["config"]["name"] for c in layers if c.get("class_name") == cls]
        where = f"layer {', '.join(map(repr, names))} of class {cls!r}" if names else f"custom object {cls!r}"
        return ModelError(f"{path}: {where} is not a Keras built-in; expected --custom-objects module.py "
                          f"defining {cls}")
    return ModelError(f"{path}: cannot load as a Keras model ({type(exc).__name__}: {_first_line(exc)})")


def _load_keras(path: Path, custom_objects: Path | None) -> Any:
    custom = _custom_objects(custom_objects) if custom_objects is not None else None
    try:
        if custom is not None:  # the user vouches for the file and its code
            return keras.models.load_model(str(path), compile=False, custom_objects=custom, safe_mode=False)
        return keras.models.load_model(str(path), compile=False)
    except Exception as exc:  # keras raises many kinds for a corrupt or foreign file
        raise _keras_load_error(path, exc, custom is not None) from exc


def _check_float_io(loaded: tuple[tuple[TensorInfo, ...], tuple[TensorInfo, ...]], path: Path) -> None:
    for info in loaded[0]:
        if info.dtype not in ("float32", "float16"):
            raise ConversionError(f"{path}: input {info.name!r} is {info.dtype}; expected a float model input")


def load_model(path: Path | str, workdir: Path, *, signature: str | None = None,
               input_shapes: dict[str, tuple[int, ...]] | None = None,
               custom_objects: Path | None = None) -> LoadedModel:
    """Load a Keras or SavedModel model and export it to ``workdir`` as a batch-1 SavedModel.

    ``signature`` picks a SavedModel signature (default ``serving_default``, or the only one);
    ``input_shapes`` fixes dynamic dimensions by input name; ``custom_objects`` is a Python file
    whose classes and functions Keras may use (and whose Lambda code it may run).

    Raises:
        ModelError: the path is missing, the format unsupported, or the file does not load.
        ConfigError: a signature or input shape is needed, or the one given does not fit.
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
        io = _export_saved_model(path, out_dir, signature, input_shapes)
    elif path.suffix.lower() in (".keras", ".h5", ".hdf5"):
        fmt = "keras" if path.suffix.lower() == ".keras" else "h5"
        if signature is not None:
            raise ConfigError(f"--signature {signature}: only SavedModel directories have signatures, "
                              f"{path} is a Keras file")
        keras_model = _load_keras(path, custom_objects)
        io = export_keras(keras_model, out_dir, input_shapes=input_shapes, source=path)
    else:
        raise ModelError(f"{path}: unsupported model format {path.suffix or '(no suffix)'!r}; "
                         "expected .keras, .h5/.hdf5 or a SavedModel directory")
    _check_float_io(io, path)
    return LoadedModel(path=path, format=fmt, sha256=source_sha256(path), saved_model_dir=out_dir,
                       inputs=io[0], outputs=io[1], keras_model=keras_model)
