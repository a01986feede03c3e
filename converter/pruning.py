"""Pruning on Keras 3, without tensorflow-model-optimization (which needs legacy Keras 2).

Two kinds, for two goals:

* **Channel pruning** removes whole filters of Conv2D/Dense layers, together with the matching
  BatchNorm parameters, depthwise channels and input channels of the next Conv2D/Dense layers, and
  rebuilds the model from its config with fewer filters. The model really gets smaller and
  faster on a CPU. Channels are tracked as *spaces* through per-channel layers (BatchNorm,
  activations, pooling, padding, depthwise, flatten); residual ``Add`` layers join the spaces of
  their branches so all branches keep the same channels. Spaces that reach a model input or
  output, a ``Concatenate``/``Reshape`` or any layer we do not understand are left untouched and
  listed with the reason.
* **Magnitude pruning** zeroes the smallest blocks of weights of each kernel to a target sparsity.
  The model does not get faster, but its artifact compresses far better (OTA download size).

Both are followed by :func:`finetune`: distillation from the original model on the sample
inputs (no labels needed; labels are mixed in when given).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from converter._tf import keras
from converter.options import PRUNE_ALLOCATIONS
from edgefleet.errors import ConfigError, ConversionError

__all__ = [
    "ALLOCATIONS",
    "SPARSITY_ALLOCATIONS",
    "ChannelPlan",
    "PruneSummary",
    "apply_sparsity",
    "conv_macs",
    "finetune",
    "inbound_layers",
    "kernel_sparsity",
    "plan_channel_pruning",
    "prune_channels",
]

L = keras.layers
_PASS_THROUGH = (L.BatchNormalization, L.ReLU, L.Activation, L.Dropout, L.SpatialDropout2D, L.MaxPooling2D,
                 L.AveragePooling2D, L.ZeroPadding2D, L.LeakyReLU, L.ELU, L.DepthwiseConv2D, L.Flatten,
                 L.GlobalAveragePooling2D, L.GlobalMaxPooling2D)


def _is_prunable(layer: Any) -> bool:
    if isinstance(layer, L.DepthwiseConv2D) or not isinstance(layer, (L.Conv2D, L.Dense)):
        return False
    return type(layer) in (L.Conv2D, L.Dense) and getattr(layer, "groups", 1) == 1


@dataclass(frozen=True)
class ChannelPlan:
    """One channel space: the producers whose filters are pruned together (one producer, or
    several joined by residual ``Add`` layers), the per-channel layers in it and its consumers."""

    producers: tuple[str, ...]
    kept: tuple[int, ...]
    total: int
    members: tuple[str, ...]
    consumers: tuple[str, ...]

    @property
    def layer(self) -> str:
        return "+".join(self.producers)


@dataclass(frozen=True)
class PruneSummary:
    """What pruning did, for the report."""

    plans: tuple[ChannelPlan, ...] = ()
    skipped: tuple[str, ...] = ()
    params_before: int = 0
    params_after: int = 0
    sparsity: float | None = None
    finetune_epochs: int = 0
    finetune_loss: list[float] = field(default_factory=list)
    allocation: str | None = None
    macs_before: int | None = None
    macs_after: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"pruned_layers": {p.layer: f"{len(p.kept)}/{p.total}" for p in self.plans},
                "skipped": list(self.skipped), "params_before": self.params_before,
                "params_after": self.params_after, "sparsity": self.sparsity,
                "finetune_epochs": self.finetune_epochs, "finetune_loss": self.finetune_loss,
                "allocation": self.allocation, "channels_removed": self.channels_removed,
                "macs_before": self.macs_before, "macs_after": self.macs_after}

    @property
    def channels_removed(self) -> float | None:
        """Fraction of the prunable channels (of the spaces that were pruned) removed."""
        total = sum(p.total for p in self.plans)
        return round(1 - sum(len(p.kept) for p in self.plans) / total, 4) if total else None


def _n_keep(total: int, fraction: float) -> int:
    """Filters to keep: whole SIMD tiles of 8 (XNNPACK's int8 kernels work in channel tiles, so
    13 channels cost like 16), never fewer than one tile."""
    if total <= 8:  # one tile or less: pruning it saves no tile
        return total
    return int(max(8, min(total, round(total * (1.0 - fraction) / 8) * 8)))


ALLOCATIONS = PRUNE_ALLOCATIONS  # one list, so --prune-allocation is checked before TensorFlow loads


def _fractions(totals: Sequence[int], costs: Sequence[float], fraction: float, allocation: str,
               max_fraction: float = 0.6) -> list[float]:
    """Per-space fractions whose channel-weighted mean is ``fraction``.

    ``uniform`` prunes every space alike. ``width`` prunes a space in proportion to the square
    root of its width (the wide expansion spaces lose more). ``cost`` prunes in proportion to
    the square root of the multiply-accumulates one channel of the space costs (its filter, its
    depthwise channel, its share of the consumers), so channels of high-resolution layers go
    first. Capped at ``max_fraction`` per space.
    """
    if allocation not in ALLOCATIONS:
        raise ConfigError(f"channel allocation {allocation!r}: expected one of {', '.join(ALLOCATIONS)}")
    if allocation == "uniform" or not totals or fraction <= 0:
        return [fraction] * len(totals)
    n = np.asarray(totals, np.float64)
    weight = np.sqrt(n if allocation == "width" else np.maximum(np.asarray(costs, np.float64), 1.0))
    lo, hi = 0.0, fraction / max(float(weight.min()), 1e-9)
    for _ in range(60):  # bisection on the scale c: mean(min(cap, c * w)) weighted by width = fraction
        c = (lo + hi) / 2
        if float((np.minimum(max_fraction, c * weight) * n).sum() / n.sum()) < fraction:
            lo = c
        else:
            hi = c
    return [float(v) for v in np.minimum(max_fraction, hi * weight)]


def conv_macs(model: Any) -> int:
    """Multiply-accumulates of one inference through the Conv2D/DepthwiseConv2D/Dense layers."""
    return sum(_positions(layer) * int(np.prod(layer.kernel.shape)) for layer in model.layers
               if isinstance(layer, (L.Conv2D, L.Dense)) and hasattr(layer, "kernel"))


_MERGE = (L.Add, L.Subtract, L.Maximum, L.Minimum, L.Average)


class _Spaces:
    """Union-find over channel spaces: tensors whose channel axis must keep the same indices."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.pins: list[tuple[int, str]] = []

    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, ids: list[int]) -> int:
        roots = [self.find(i) for i in ids]
        for r in roots[1:]:
            self.parent[r] = roots[0]
        return roots[0]

    def pin(self, i: int, reason: str) -> None:
        self.pins.append((i, reason))

    def pinned(self) -> dict[int, str]:
        out: dict[int, str] = {}
        for i, reason in self.pins:
            out.setdefault(self.find(i), reason)
        return out


def inbound_layers(layer: Any) -> list[str]:
    """Names of the layers feeding ``layer`` (its first call site)."""
    nodes = layer._inbound_nodes[:1]
    return [t._keras_history.operation.name for node in nodes for t in node.input_tensors]


def _filter_score(layer: Any, bn: Any | None) -> np.ndarray:
    kernel = np.asarray(layer.kernel)
    score = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
    if bn is not None and bn.scale:
        score = score * np.abs(np.asarray(bn.gamma)) / np.sqrt(np.asarray(bn.moving_variance) + bn.epsilon)
    return score / max(float(score.sum()), 1e-12)


def _positions(layer: Any) -> int:
    return int(np.prod([d for d in layer.output.shape[1:-1] if d is not None] or [1]))


def _channel_macs(producers: Sequence[Any], members: Sequence[Any], consumers: Sequence[tuple[Any, int]],
                  total: int) -> float:
    """Multiply-accumulates that one channel of a space costs per inference."""
    macs = sum(_positions(p) * int(np.prod(p.kernel.shape[:-1])) for p in producers)
    macs += sum(_positions(m) * int(np.prod(m.kernel.shape[:2])) for m in members if isinstance(m, L.DepthwiseConv2D))
    macs += sum(_positions(c) * int(np.prod(c.kernel.shape)) / total for c, _ in consumers)
    return float(macs)


def plan_channel_pruning(model: Any, fraction: float,
                         allocation: str = "cost") -> tuple[list[ChannelPlan], list[str]]:
    """Decide which filters to keep, per channel space.

    A space starts at a Conv2D/Dense output and runs through per-channel layers to the next
    Conv2D/Dense inputs; residual ``Add`` layers join spaces, so every branch of a residual keeps
    the same channels. A space is pinned (left untouched) when it reaches a model input or output,
    a ``Concatenate``/``Reshape``/unknown layer, or a layer that mixes channels in another way.
    Filters are ranked by L1 norm (scaled by a directly following BatchNorm), summed over the
    producers of a space. ``allocation`` spreads ``fraction`` over the spaces (see
    :func:`_fractions`); kept counts are whole tiles of 8. Returns the plans and
    ``"layer: reason"`` for prunable layers left alone.
    """
    spaces = _Spaces()
    space_of: dict[str, int] = {}
    flat_hw: dict[str, int] = {}  # tensor -> spatial positions flattened into its channel axis
    producers: dict[int, list[Any]] = {}
    members: dict[int, list[Any]] = {}
    consumers: dict[int, list[tuple[Any, int]]] = {}
    bn_after: dict[str, Any] = {}
    for layer in model.layers:
        inbound = inbound_layers(layer)
        if isinstance(layer, L.InputLayer) or not inbound:
            space_of[layer.name] = spaces.new()
            spaces.pin(space_of[layer.name], f"reaches model input {layer.name!r}")
            continue
        for name in inbound:
            if name not in space_of:  # a Sequential model's implicit input layer
                space_of[name] = spaces.new()
                spaces.pin(space_of[name], f"reaches model input {name!r}")
        ins = [space_of[n] for n in inbound]
        if _is_prunable(layer) and len(ins) == 1:
            consumers.setdefault(ins[0], []).append((layer, flat_hw.get(inbound[0], 0)))
            space_of[layer.name] = spaces.new()
            producers[space_of[layer.name]] = [layer]
        elif isinstance(layer, _PASS_THROUGH) and len(ins) == 1:
            space_of[layer.name] = ins[0]
            members.setdefault(ins[0], []).append(layer)
            if isinstance(layer, L.DepthwiseConv2D) and layer.depth_multiplier != 1:
                spaces.pin(ins[0], f"reaches depthwise {layer.name!r} with depth_multiplier {layer.depth_multiplier}")
            if isinstance(layer, L.BatchNormalization):
                bn_after[inbound[0]] = layer
                if layer.axis not in (-1, [-1], len(layer.input.shape) - 1, [len(layer.input.shape) - 1]):
                    spaces.pin(ins[0], f"reaches {layer.name!r}, which normalizes another axis")
            if isinstance(layer, L.Flatten):
                flat_hw[layer.name] = int(np.prod(layer.input.shape[1:-1]))
            elif inbound[0] in flat_hw:
                if isinstance(layer, L.BatchNormalization):
                    spaces.pin(ins[0], f"reaches {layer.name!r} after a Flatten")
                flat_hw[layer.name] = flat_hw[inbound[0]]
        elif isinstance(layer, _MERGE) and len(ins) > 1:
            space_of[layer.name] = spaces.union(ins)
            if any(n in flat_hw for n in inbound):
                spaces.pin(space_of[layer.name], f"reaches {layer.name!r} after a Flatten")
        else:
            for i in ins:
                spaces.pin(i, f"feeds {type(layer).__name__} {layer.name!r}")
            space_of[layer.name] = spaces.new()
    for tensor in model.outputs:
        spaces.pin(space_of[tensor._keras_history.operation.name], "reaches a model output")

    def grouped(table: dict[int, list[Any]]) -> dict[int, list[Any]]:
        out: dict[int, list[Any]] = {}
        for i, items in table.items():
            out.setdefault(spaces.find(i), []).extend(items)
        return out

    pinned = spaces.pinned()
    g_producers, g_members, g_consumers = grouped(producers), grouped(members), grouped(consumers)
    skipped: list[str] = []
    candidates = []
    for root, prods in g_producers.items():
        if root in pinned:
            skipped += [f"{p.name}: {pinned[root]}" for p in prods]
            continue
        totals = {int(p.kernel.shape[-1]) for p in prods}
        if len(totals) != 1 or not g_consumers.get(root):
            skipped += [f"{p.name}: {'no Conv2D/Dense consumer' if len(totals) == 1 else 'channel counts differ'}"
                        for p in prods]
            continue
        candidates.append((root, prods, totals.pop()))
    costs = [_channel_macs(prods, g_members.get(root, []), g_consumers[root], total) for root, prods, total in candidates]
    plans = []
    fractions = _fractions([total for _, _, total in candidates], costs, fraction, allocation)
    for (root, prods, total), space_fraction in zip(candidates, fractions):
        score = sum(_filter_score(p, bn_after.get(p.name)) for p in prods)
        keep = np.sort(np.argsort(-score, kind="stable")[:_n_keep(total, space_fraction)])
        plans.append(ChannelPlan(tuple(p.name for p in prods), tuple(int(i) for i in keep), total,
                                 tuple(m.name for m in g_members.get(root, [])),
                                 tuple(f"{c.name}@{hw}" for c, hw in g_consumers[root])))
    return plans, skipped


def _slice(weights: list[np.ndarray], layer: Any, out_keep: np.ndarray | None,
           in_keep: np.ndarray | None) -> list[np.ndarray]:
    if out_keep is None and in_keep is None:
        return weights
    new = []
    for i, w in enumerate(weights):
        if isinstance(layer, L.DepthwiseConv2D):
            w = w[:, :, in_keep, :] if w.ndim == 4 else w[in_keep]
        elif isinstance(layer, L.BatchNormalization):
            w = w[in_keep]
        elif w.ndim >= 2:  # a kernel: input axis -2, output axis -1
            if in_keep is not None:
                w = np.take(w, in_keep, axis=-2)
            if out_keep is not None:
                w = w[..., out_keep]
        elif out_keep is not None and i > 0:  # bias
            w = w[out_keep]
        new.append(w)
    return new


def prune_channels(model: Any, fraction: float, allocation: str = "cost") -> tuple[Any, PruneSummary]:
    """A new, physically smaller model with ``fraction`` of the filters of each channel space removed.

    Raises:
        ConfigError: ``fraction`` is not in [0, 0.9].
        ConversionError: the model cannot be rebuilt from its config.
    """
    if not 0 <= fraction <= 0.9:
        raise ConfigError(f"--prune-channels {fraction}: expected a fraction between 0 and 0.9")
    plans, skipped = plan_channel_pruning(model, fraction, allocation)
    config = model.get_config()
    by_name = {lc["config"]["name"]: lc["config"] for lc in config["layers"]}
    for lc in config["layers"]:
        lc.pop("build_config", None)  # recorded input shapes would fight the new channel counts
    out_keep: dict[str, np.ndarray] = {}
    in_keep: dict[str, np.ndarray] = {}
    for plan in plans:
        keep = np.array(plan.kept)
        for name in plan.producers:
            key = "filters" if "filters" in by_name[name] else "units"
            by_name[name][key] = len(keep)
            out_keep[name] = keep
        for name in plan.members:
            in_keep[name] = keep
        for entry in plan.consumers:
            name, hw = entry.rsplit("@", 1)
            positions = max(int(hw), 1)
            in_keep[name] = (np.arange(positions)[:, None] * plan.total + keep[None, :]).ravel()
    try:
        new_model = model.__class__.from_config(config)
    except Exception as exc:  # keras raises several types for configs it cannot rebuild
        raise ConversionError(f"cannot rebuild the pruned model from its config: {exc}") from exc
    for layer in model.layers:
        weights = layer.get_weights()
        if not weights:
            continue
        sliced = _slice([np.asarray(w) for w in weights], layer, out_keep.get(layer.name),
                        in_keep.get(layer.name))
        new_model.get_layer(layer.name).set_weights(sliced)
    summary = PruneSummary(plans=tuple(plans), skipped=tuple(skipped), params_before=model.count_params(),
                           params_after=new_model.count_params(), allocation=allocation,
                           macs_before=conv_macs(model), macs_after=conv_macs(new_model))
    return new_model, summary


def _kernels(model: Any, depthwise: bool = True) -> list[Any]:
    kinds = (L.Conv2D, L.Dense) if not depthwise else (L.Conv2D, L.Dense, L.DepthwiseConv2D)
    return [layer for layer in model.layers
            if isinstance(layer, kinds) and hasattr(layer, "kernel")
            and (depthwise or not isinstance(layer, L.DepthwiseConv2D))]


def _input_axis(layer: Any, kernel: np.ndarray) -> int:
    """The kernel axis that TFLite stores innermost (OHWI conv, (out, in) dense, (1, h, w, c) depthwise)."""
    return kernel.ndim - 2 if not isinstance(layer, L.DepthwiseConv2D) else 2


def _block_size(n: int, wanted: int) -> int:
    for block in (wanted, 32, 16, 8, 4, 2):
        if block <= wanted and n % block == 0:
            return block
    return 1


def _layer_sparsities(sizes: Sequence[int], sparsity: float, allocation: str, cap: float = 0.85) -> list[float]:
    """Per-kernel sparsities whose weight-count-weighted mean is ``sparsity``.

    ``uniform``: every kernel alike. ``size``: in proportion to the square root of the kernel's
    size, so the large kernels, which hold the bytes and have the most redundancy, carry more of
    it and the small ones (first conv, narrow projections) keep more of their weights.
    """
    if allocation not in SPARSITY_ALLOCATIONS:
        raise ConfigError(f"sparsity allocation {allocation!r}: expected one of {', '.join(SPARSITY_ALLOCATIONS)}")
    if allocation == "uniform" or not sizes or sparsity <= 0:
        return [sparsity] * len(sizes)
    n = np.asarray(sizes, np.float64)
    weight = np.sqrt(n)
    lo, hi = 0.0, 1.0 / max(float(weight.min()), 1e-9)
    for _ in range(60):
        c = (lo + hi) / 2
        if float((np.minimum(cap, c * weight) * n).sum() / n.sum()) < sparsity:
            lo = c
        else:
            hi = c
    return [float(v) for v in np.minimum(cap, hi * weight)]


SPARSITY_ALLOCATIONS = ("uniform", "size")


def apply_sparsity(model: Any, sparsity: float, block: int = 16, allocation: str = "size") -> dict[str, np.ndarray]:
    """Zero the ``sparsity`` fraction of the Conv2D/Dense weights with the smallest magnitude, in place;
    return the masks.

    Weights are pruned in blocks of ``block`` consecutive input channels (smaller blocks when the
    channel count does not divide, single weights for 1-3 channel inputs), ranked by block L2 norm.
    TFLite stores the input channel innermost, so every pruned block becomes a run of zero bytes
    in the ``.tflite``; gzip compresses runs far better than the same number of scattered zeros.
    ``allocation`` spreads the sparsity over the kernels (:func:`_layer_sparsities`).

    Raises:
        ConfigError: ``sparsity`` is not in [0, 0.95] or the allocation is unknown.
    """
    if not 0 <= sparsity <= 0.95:
        raise ConfigError(f"--sparsity {sparsity}: expected a fraction between 0 and 0.95")
    masks = {}
    # Depthwise kernels are a few percent of the weights but each holds a whole channel's filter:
    # pruning them costs far more accuracy than it saves bytes.
    layers = _kernels(model, depthwise=False)
    per_layer = _layer_sparsities([int(np.prod(layer.kernel.shape)) for layer in layers], sparsity, allocation)
    for layer, layer_sparsity in zip(layers, per_layer):
        kernel = np.asarray(layer.kernel)
        axis = _input_axis(layer, kernel)
        size = _block_size(kernel.shape[axis], block)
        moved = np.moveaxis(kernel, axis, -1)
        blocks = moved.reshape(*moved.shape[:-1], moved.shape[-1] // size, size)
        norms = np.sqrt((blocks.astype(np.float64) ** 2).sum(axis=-1))
        k = round(norms.size * layer_sparsity)
        if k == 0:
            continue
        order = np.argsort(norms.ravel(), kind="stable")
        keep_blocks = np.ones(norms.size, bool)
        keep_blocks[order[:k]] = False
        keep = np.broadcast_to(keep_blocks.reshape(norms.shape)[..., None], blocks.shape).reshape(moved.shape)
        mask = np.moveaxis(keep, -1, axis).astype(kernel.dtype)
        layer.kernel.assign(kernel * mask)
        masks[layer.name] = mask
    return masks


def kernel_sparsity(model: Any) -> float:
    """Fraction of exact zeros over all Conv2D/Dense kernels (depthwise kernels are never pruned)."""
    total = zeros = 0
    for layer in _kernels(model, depthwise=False):
        kernel = np.asarray(layer.kernel)
        total += kernel.size
        zeros += int(np.sum(kernel == 0))
    return zeros / max(total, 1)


class _KeepMasks(keras.callbacks.Callback):
    """Re-apply the sparsity masks after every step, so fine-tuning cannot regrow pruned weights."""

    def __init__(self, masks: dict[str, np.ndarray]):
        super().__init__()
        self._masks = masks

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        for name, mask in self._masks.items():
            layer = self.model.get_layer(name)
            layer.kernel.assign(layer.kernel * mask)


class _Progress(keras.callbacks.Callback):
    def __init__(self, hook: Callable[[int], None]):
        super().__init__()
        self._hook = hook

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._hook(1)


def _is_probability(y: np.ndarray) -> bool:
    return y.ndim == 2 and y.shape[1] > 1 and float(y.min()) >= 0 and bool(np.allclose(y.sum(axis=1), 1, atol=1e-3))


def finetune(student: Any, teacher: Any, inputs: Sequence[np.ndarray], labels: np.ndarray | None,
             epochs: int, masks: dict[str, np.ndarray] | None = None,
             progress: Callable[[int], None] | None = None, seed: int = 0) -> list[float]:
    """Distil ``teacher`` into ``student`` on ``inputs``; return the loss per epoch.

    Probability outputs learn the teacher's soft targets with cross-entropy (half one-hot labels
    when labels are given); other outputs learn the teacher's values with MSE.
    """
    if epochs <= 0:
        return []
    keras.utils.set_random_seed(seed)
    x = list(inputs) if len(inputs) > 1 else inputs[0]
    targets = teacher.predict(x, batch_size=128, verbose=0)
    targets = list(targets) if isinstance(targets, (list, tuple)) else [targets]
    losses, ys = [], []
    for i, y in enumerate(targets):
        y = np.asarray(y, np.float32)
        if _is_probability(y):
            if labels is not None and i == 0:
                y = 0.5 * y + 0.5 * np.eye(y.shape[1], dtype=np.float32)[labels]
            losses.append(keras.losses.CategoricalCrossentropy())
        else:
            losses.append(keras.losses.MeanSquaredError())
        ys.append(y)
    frozen = [layer for layer in student.layers if isinstance(layer, L.BatchNormalization) and layer.trainable]
    for layer in frozen:  # few steps cannot re-estimate moving statistics; keep BN in inference mode
        layer.trainable = False
    student.compile(optimizer=keras.optimizers.Adam(1e-3), loss=losses if len(losses) > 1 else losses[0])
    callbacks: list[Any] = []
    if masks:
        callbacks.append(_KeepMasks(masks))
    if progress:
        callbacks.append(_Progress(progress))
    history = student.fit(x, ys if len(ys) > 1 else ys[0], epochs=epochs, batch_size=32, shuffle=True,
                          verbose=0, callbacks=callbacks)
    for layer in frozen:
        layer.trainable = True
    if masks:
        for name, mask in masks.items():
            layer = student.get_layer(name)
            layer.kernel.assign(np.asarray(layer.kernel) * mask)
    return [float(v) for v in history.history.get("loss", [])]
