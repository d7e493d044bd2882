"""Calibration inputs made up from the models themselves, for users who have the models but not the data.

Where a model has BatchNormalization layers, random inputs are optimised until the statistics they give at
every normalisation's input match the moving mean and variance the layer stored during training (as
DeepInversion does); a model whose input passes a `Normalization` layer gets Gaussian inputs with the mean
and variance that layer holds; otherwise the user gives the input distribution. Each task gets inputs made
from its own model.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from tf_mtz import keras_graph
from tf_mtz.errors import ZipError


@dataclasses.dataclass(frozen=True)
class SyntheticInputs:
    """Calibration data made up from the models (`calibration_data=None` means `SyntheticInputs()`).

    Args:
        samples: inputs made per task.
        steps: optimisation steps per batch of inputs, for models with BatchNormalization.
        learning_rate: Adam's step on the inputs.
        batch_size: inputs optimised together (the batch whose statistics are matched).
        distribution: a function `(rng, count) -> array of count inputs`, for models with neither
            BatchNormalization nor an input `Normalization` (and used as the starting point otherwise).
        seed: seeds the draws.

    Raises:
        ValueError (`tf_mtz.ZipError`): non-positive counts or learning rate.

    Example:

    ```python
    zipped = tf_mtz.zip_models(models, calibration_data=None)  # no real data: synthetic inputs
    uniform = tf_mtz.SyntheticInputs(distribution=lambda rng, n: rng.uniform(0, 1, (n, 784)))
    zipped = tf_mtz.zip_models(models, calibration_data=uniform)
    ```
    """

    samples: int = 2048
    steps: int = 200
    learning_rate: float = 0.1
    batch_size: int = 256
    distribution: object = None
    seed: int = 0

    def __post_init__(self):
        for name in ("samples", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ZipError(f"SyntheticInputs({name}=...) must be a positive integer, got {value!r}.")
        if not isinstance(self.learning_rate, (int, float)) or self.learning_rate <= 0:
            raise ZipError(f"SyntheticInputs(learning_rate=...) must be positive, got {self.learning_rate!r}.")
        if self.distribution is not None and not callable(self.distribution):
            raise ZipError("SyntheticInputs(distribution=...) must be a function (rng, count) -> inputs.")


def synthesize(models: dict, spec: SyntheticInputs, verbose: int = 0) -> dict:
    """`{task: inputs}` made from each task's model as `spec` says (see `SyntheticInputs`).

    Raises:
        ZipError: a model with several inputs, integer inputs (token ids) without a distribution, or a
            model with neither BatchNormalization nor an input Normalization and no distribution.
    """
    result = {}
    for k, (task, model) in enumerate(models.items()):
        inputs = keras_graph.model_inputs(model)
        where = f"Model '{model.name}' (task '{task}')"
        if len(inputs) != 1:
            raise ZipError(f"{where} takes {len(inputs)} inputs; tf_mtz makes up calibration inputs for models with "
                           "one input. Give calibration_data.")
        shape, dtype = tuple(inputs[0].shape[1:]), keras.backend.standardize_dtype(inputs[0].dtype)
        if None in shape:
            raise ZipError(f"{where} takes inputs of shape {shape}; tf_mtz makes up inputs of a fixed shape only.")
        rng = np.random.default_rng(spec.seed + k)
        if not dtype.startswith("float") and spec.distribution is None:
            raise ZipError(f"{where} takes {dtype} inputs (token ids?), which tf_mtz cannot optimise; give "
                           "SyntheticInputs(distribution=...) or calibration_data.")
        batch_norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        start = _start(model, spec, rng, shape, where)
        if batch_norms and dtype.startswith("float"):
            result[task] = _match_batch_norms(model, batch_norms, start, spec, where, verbose)
        else:
            result[task] = start
    return result


def _start(model, spec, rng, shape, where) -> np.ndarray:
    """The inputs the optimisation starts from, or the inputs themselves: the user's distribution, Gaussian
    inputs with an input Normalization's moments, or (with BatchNormalization to match) standard normal."""
    if spec.distribution is not None:
        drawn = np.asarray(spec.distribution(rng, spec.samples))
        if drawn.shape != (spec.samples,) + shape:
            raise ZipError(f"SyntheticInputs' distribution gave inputs of shape {drawn.shape}; {where} takes "
                           f"{(spec.samples,) + shape}.")
        return drawn
    normalization = next((layer for layer in model.layers if isinstance(layer, keras.layers.Normalization)), None)
    if normalization is not None:
        # Its moments keep a leading batch axis of 1: (1, C) or (1, 1, 1, C).
        mean, variance = (np.broadcast_to(np.asarray(keras.ops.convert_to_numpy(v), np.float32), (1,) + shape)[0]
                          for v in (normalization.mean, normalization.variance))
        return (mean + np.sqrt(variance) * rng.normal(size=(spec.samples,) + shape)).astype(np.float32)
    if not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers):
        raise ZipError(f"{where} has no BatchNormalization statistics and no input Normalization to make inputs "
                       "from; give calibration_data or SyntheticInputs(distribution=...).")
    return rng.normal(size=(spec.samples,) + shape).astype(np.float32)


def _match_batch_norms(model, batch_norms, start, spec, where, verbose) -> np.ndarray:
    """`start` optimised, batch by batch, until the mean and variance at every BatchNormalization's input
    match the layer's moving statistics (relative squared distances, summed over the layers)."""
    try:
        features = keras.Model(model.inputs, [layer.input for layer in batch_norms])
    except (ValueError, AttributeError) as exc:
        raise ZipError(f"{where}: tf_mtz could not read its BatchNormalization inputs ({exc}); give "
                       "calibration_data.") from exc
    targets = [(tf.constant(np.asarray(keras.ops.convert_to_numpy(layer.moving_mean), np.float32)),
                tf.constant(np.asarray(keras.ops.convert_to_numpy(layer.moving_variance), np.float32)))
               for layer in batch_norms]

    @tf.function(autograph=False)
    def loss_of(x):
        values = features(x, training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        total = 0.0
        for value, (mean, variance) in zip(values, targets):
            axes = list(range(len(value.shape) - 1))
            batch_mean, batch_variance = tf.nn.moments(value, axes)
            total += (tf.reduce_sum(tf.square(batch_mean - mean)) / (tf.reduce_sum(variance) + 1e-6)
                      + tf.reduce_sum(tf.square(batch_variance - variance)) / (tf.reduce_sum(tf.square(variance)) + 1e-6))
        return total

    @tf.function(autograph=False)
    def step(x, optimizer_state):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_of(x)
        gradient = tape.gradient(loss, x)
        m, v, t = optimizer_state
        t = t + 1.0
        m = 0.9 * m + 0.1 * gradient
        v = 0.999 * v + 0.001 * tf.square(gradient)
        update = spec.learning_rate * (m / (1 - 0.9 ** t)) / (tf.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
        return x - update, (m, v, t), loss

    made = []
    for begin in range(0, len(start), spec.batch_size):
        x = tf.constant(start[begin:begin + spec.batch_size], tf.float32)
        state = (tf.zeros_like(x), tf.zeros_like(x), tf.constant(0.0))
        for _ in range(spec.steps):
            x, state, loss = step(x, state)
        made.append(x.numpy())
        if verbose:
            keras_graph.print_message(f"tf_mtz: made {begin + len(made[-1])} calibration inputs from '{model.name}' "
                                      f"(statistics mismatch {float(loss):.4f})")
    return np.concatenate(made).astype(np.float32)
