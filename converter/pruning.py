"""Pruning on Keras 3, without tensorflow-model-optimization (which needs legacy Keras 2).

Two kinds, for two goals:

* **Channel pruning** removes whole filters of Conv2D/Dense layers, together with the matching
  BatchNorm parameters, depthwise channels and input channels of the next Conv2D/Dense, and
  rebuilds the model from its config with fewer filters. The model really gets smaller and
  faster on a CPU. A layer is only pruned when its output reaches exactly one Conv2D/Dense through
  per-channel layers (BatchNorm, activations, pooling, padding, depthwise, flatten); outputs that
  feed ``Add``/``Concatenate``, several consumers or a model output are left untouched and listed.
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

from agent.errors import ConfigError, ConversionError
from converter._tf import keras

__all__ = [
    "ChannelPlan",
    "PruneSummary",
    "apply_sparsity",
    "finetune",
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
    """Filters kept in ``layer`` and the layers whose channels follow it."""

    layer: str
    kept: tuple[int, ...]
    total: int
    chain: tuple[str, ...]   # per-channel layers between ``layer`` and ``consumer``
    consumer: str


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

    def to_dict(self) -> dict[str, Any]:
        return {"pruned_layers": {p.layer: f"{len(p.kept)}/{p.total}" for p in self.plans},
                "skipped": list(self.skipped), "params_before": self.params_before,
                "params_after": self.params_after, "sparsity": self.sparsity,
                "finetune_epochs": self.finetune_epochs, "finetune_loss": self.finetune_loss}


def _graph(model: Any) -> tuple[dict[str, list[Any]], set[str]]:
    consumers: dict[str, list[Any]] = {layer.name: [] for layer in model.layers}
    for layer in model.layers:
        for node in layer._inbound_nodes[:1]:
            for tensor in node.input_tensors:
                producer = tensor._keras_history.operation.name
                consumers.setdefault(producer, []).append(layer)
    outputs = {t._keras_history.operation.name for t in model.outputs}
    return consumers, outputs


def _n_keep(total: int, fraction: float) -> int:
    keep = total * (1.0 - fraction)
    if total >= 32:  # whole SIMD vectors: XNNPACK's int8 kernels measured faster at multiples of 8
        keep = round(keep / 8) * 8
    elif total >= 16:
        keep = round(keep / 4) * 4
    return int(max(1 if total < 16 else 4, min(total, round(keep))))


def _importance(layer: Any, first_in_chain: Any | None) -> np.ndarray:
    kernel = np.asarray(layer.kernel)
    score = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
    if isinstance(first_in_chain, L.BatchNormalization) and first_in_chain.scale:
        gamma = np.asarray(first_in_chain.gamma)
        var = np.asarray(first_in_chain.moving_variance)
        score = score * np.abs(gamma) / np.sqrt(var + first_in_chain.epsilon)
    return score


def plan_channel_pruning(model: Any, fraction: float) -> tuple[list[ChannelPlan], list[str]]:
    """Decide which filters each prunable layer keeps (L1 norm, scaled by a following BatchNorm).

    Returns the plans and a list of ``"layer: reason"`` for layers left untouched.
    """
    consumers, outputs = _graph(model)
    plans, skipped = [], []
    for layer in model.layers:
        if not _is_prunable(layer):
            continue
        if layer.name in outputs:
            skipped.append(f"{layer.name}: model output")
            continue
        chain, cur, reason, consumer = [], layer, None, None
        while reason is None and consumer is None:
            nxt = consumers.get(cur.name, [])
            if len(nxt) != 1:
                reason = f"output feeds {len(nxt)} layers"
                break
            c = nxt[0]
            if _is_prunable(c):
                consumer = c
            elif isinstance(c, _PASS_THROUGH):
                if isinstance(c, L.DepthwiseConv2D) and c.depth_multiplier != 1:
                    reason = f"depthwise {c.name} has depth_multiplier {c.depth_multiplier}"
                elif isinstance(c, L.BatchNormalization) and c.axis not in (-1, [-1], len(c.input.shape) - 1,
                                                                          [len(c.input.shape) - 1]):
                    reason = f"{c.name} normalizes axis {c.axis}, not channels"
                elif c.name in outputs:
                    reason = f"reaches model output {c.name}"
                chain.append(c)
                cur = c
            else:
                reason = f"output feeds {type(c).__name__} {c.name!r}"
        if reason:
            skipped.append(f"{layer.name}: {reason}")
            continue
        total = int(layer.kernel.shape[-1])
        score = _importance(layer, chain[0] if chain else None)
        keep = np.sort(np.argsort(-score, kind="stable")[:_n_keep(total, fraction)])
        plans.append(ChannelPlan(layer.name, tuple(int(i) for i in keep), total,
                                 tuple(c.name for c in chain), consumer.name))
    return plans, skipped


def _slice(weights: list[np.ndarray], layer: Any, out_keep: np.ndarray | None,
           in_keep: np.ndarray | None) -> list[np.ndarray]:
    if out_keep is None and in_keep is None:
        return weights
    new = []
    for i, w in enumerate(weights):
        if isinstance(layer, L.DepthwiseConv2D):
            keep = in_keep if in_keep is not None else out_keep
            w = w[:, :, keep, :] if w.ndim == 4 else w[keep]
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


def prune_channels(model: Any, fraction: float) -> tuple[Any, PruneSummary]:
    """A new, physically smaller model with ``fraction`` of the filters of each prunable layer removed.

    Raises:
        ConfigError: ``fraction`` is not in [0, 0.9].
        ConversionError: the model cannot be rebuilt from its config.
    """
    if not 0 <= fraction <= 0.9:
        raise ConfigError(f"--prune-channels {fraction}: expected a fraction between 0 and 0.9")
    plans, skipped = plan_channel_pruning(model, fraction)
    config = model.get_config()
    by_name = {lc["config"]["name"]: lc["config"] for lc in config["layers"]}
    for lc in config["layers"]:
        lc.pop("build_config", None)  # recorded input shapes would fight the new channel counts
    out_keep: dict[str, np.ndarray] = {}
    in_keep: dict[str, np.ndarray] = {}
    for plan in plans:
        keep = np.array(plan.kept)
        key = "filters" if "filters" in by_name[plan.layer] else "units"
        by_name[plan.layer][key] = len(keep)
        out_keep[plan.layer] = keep
        channel_keep = keep
        for name in plan.chain:
            layer = model.get_layer(name)
            if isinstance(layer, L.Flatten):
                h_w = int(np.prod(layer.input.shape[1:-1]))
                channel_keep = (np.arange(h_w)[:, None] * plan.total + channel_keep[None, :]).ravel()
            else:
                in_keep[name] = channel_keep
        in_keep[plan.consumer] = channel_keep
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
                           params_after=new_model.count_params())
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
    for block in (wanted, 8, 4, 2):
        if block <= wanted and n % block == 0:
            return block
    return 1


def apply_sparsity(model: Any, sparsity: float, block: int = 8) -> dict[str, np.ndarray]:
    """Zero the ``sparsity`` fraction of each kernel with the smallest magnitude, in place; return the masks.

    Weights are pruned in blocks of ``block`` consecutive input channels (smaller blocks when the
    channel count does not divide, single weights for 1-3 channel inputs), ranked by block L2 norm.
    TFLite stores the input channel innermost, so every pruned block becomes a run of zero bytes
    in the ``.tflite``; gzip compresses runs far better than the same number of scattered zeros.

    Raises:
        ConfigError: ``sparsity`` is not in [0, 0.95].
    """
    if not 0 <= sparsity <= 0.95:
        raise ConfigError(f"--sparsity {sparsity}: expected a fraction between 0 and 0.95")
    masks = {}
    # Depthwise kernels are a few percent of the weights but each holds a whole channel's filter:
    # pruning them costs far more accuracy than it saves bytes.
    for layer in _kernels(model, depthwise=False):
        kernel = np.asarray(layer.kernel)
        axis = _input_axis(layer, kernel)
        size = _block_size(kernel.shape[axis], block)
        moved = np.moveaxis(kernel, axis, -1)
        blocks = moved.reshape(*moved.shape[:-1], moved.shape[-1] // size, size)
        norms = np.sqrt((blocks.astype(np.float64) ** 2).sum(axis=-1))
        k = int(norms.size * sparsity)
        if k == 0:
            continue
        threshold = np.partition(norms.ravel(), k - 1)[k - 1]
        keep = np.broadcast_to((norms > threshold)[..., None], blocks.shape).reshape(moved.shape)
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
