"""Turning the user's per-task data (numpy, tensors, tf.data) into batched tf.data pipelines."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_mtz.errors import ZipError


def per_task(data, tasks: list, what: str) -> dict:
    """Expands `data` to one entry per task: a dict keyed by task, or one value for every task."""
    if isinstance(data, dict):
        unknown = sorted(set(data) - set(tasks))
        if unknown:
            raise ZipError(f"{what} names unknown task(s) {unknown}; the tasks are {tasks}.")
        missing = [t for t in tasks if t not in data]
        if missing:
            raise ZipError(f"{what} has no data for task(s) {missing}.")
        return {t: data[t] for t in tasks}
    if data is None:
        raise ZipError(f"{what} is required.")
    return {t: data for t in tasks}


def split_element(element):
    """Returns (x, y) from an element that is x, (x,), (x, y) or (x, y, sample_weight)."""
    if isinstance(element, (tuple, list)):
        return element[0], (element[1] if len(element) > 1 else None)
    return element, None


def as_dataset(data, task: str, input_shape: tuple, what: str, batch_size: int,
               with_labels: bool = False, shuffle: bool = False, seed: int = 0) -> tf.data.Dataset:
    """Returns a batched dataset of x (or of (x, y) with `with_labels`) for one task.

    Raises:
        ZipError: empty arrays, wrong feature shape, NaN/Inf in numpy input, labels missing.
    """
    if isinstance(data, tf.data.Dataset):
        dataset = _from_feature_dicts(data, task, what)
        spec = dataset.element_spec
        x_spec, y_spec = split_element(spec)
        if not isinstance(x_spec, tf.TensorSpec):
            raise ZipError(f"{what} for task '{task}': expected a dataset of tensors or (x, y) tuples, "
                           f"got element spec {spec}.")
        if with_labels and y_spec is None:
            raise ZipError(f"{what} for task '{task}' has no labels; give (x, y) elements or use "
                           "label-free distillation.")
        if x_spec.shape.rank == len(input_shape):
            dataset = dataset.batch(batch_size)
            x_spec = split_element(dataset.element_spec)[0]
        feature_shape = tuple(x_spec.shape[1:])
        if not _compatible(feature_shape, input_shape):
            raise ZipError(f"{what} for task '{task}' has samples of shape {feature_shape}; the models "
                           f"take {input_shape}.")
        if with_labels:
            return dataset.map(lambda *e: (tf.cast(e[0], tf.float32), e[1]))
        return dataset.map(lambda *e: tf.cast(e[0], tf.float32))

    x, y = split_element(data)
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ZipError(f"{what} for task '{task}' is empty.")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise ZipError(f"{what} for task '{task}' has samples of shape {tuple(x.shape[1:])}; the models "
                       f"take {tuple(input_shape)}.")
    if not np.issubdtype(x.dtype, np.number):
        raise ZipError(f"{what} for task '{task}' has dtype {x.dtype}; numeric data is required.")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ZipError(f"{what} for task '{task}' contains NaN or Inf values.")
    if with_labels:
        if y is None:
            raise ZipError(f"{what} for task '{task}' has no labels; give (x, y) or use label-free "
                           "distillation.")
        y = np.asarray(y)
        if len(y) != len(x):
            raise ZipError(f"{what} for task '{task}' has {len(x)} inputs but {len(y)} labels.")
        dataset = tf.data.Dataset.from_tensor_slices((x, y))
    else:
        dataset = tf.data.Dataset.from_tensor_slices(x)
    if shuffle:
        dataset = dataset.shuffle(min(len(x), 50_000), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size)


_INPUT_KEYS = ("image", "x", "features", "input", "inputs")


def _from_feature_dicts(dataset: tf.data.Dataset, task: str, what: str) -> tf.data.Dataset:
    """Maps dict elements (what `tfds.load` gives without `as_supervised`) to x or (x, label)."""
    spec = dataset.element_spec
    if not isinstance(spec, dict):
        return dataset
    keys = list(spec)
    candidates = [k for k in _INPUT_KEYS if k in spec] or [k for k in keys if k != "label"]
    if len(candidates) != 1 and not any(k in spec for k in _INPUT_KEYS):
        raise ZipError(f"{what} for task '{task}' yields dicts with keys {keys}; tf_mtz cannot tell which is the "
                       "input. Map the dataset to x or (x, y) first.")
    x_key = candidates[0]
    if "label" in spec:
        return dataset.map(lambda e: (e[x_key], e["label"]))
    return dataset.map(lambda e: e[x_key])


def _compatible(shape: tuple, expected: tuple) -> bool:
    return len(shape) == len(expected) and all(a is None or b is None or a == b
                                               for a, b in zip(shape, expected))
