"""Turning the user's per-task data (numpy, tensors, tf.data) into batched tf.data pipelines."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tf_mtz.errors import ZipError


def per_task(data, tasks: list, what: str, input_names: tuple = ()) -> dict:
    """Expands `data` to one entry per task: a dict keyed by task, or one value for every task (a dict
    keyed by the models' `input_names` is one value, inputs by name)."""
    by_input = isinstance(data, dict) and data and set(data) <= set(input_names) and not set(data) & set(tasks)
    if isinstance(data, dict) and not by_input:
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


def _split_features(element, names: list, task: str, what: str):
    """(features, labels) of one element (or element spec) for models with inputs `names`: the features
    are one value for a single input, else a tuple in input order (from a list/tuple of one value per input
    or a dict keyed by input name; `(features, y)` adds labels)."""
    if len(names) == 1:
        if isinstance(element, dict) and set(element) == set(names):
            return element[names[0]], None
        return split_element(element)
    labels = None
    if isinstance(element, dict):
        features = element
    elif isinstance(element, (tuple, list)) and element and isinstance(element[0], (tuple, list, dict)):
        features, labels = split_element(element)
    else:
        features = element
    if isinstance(features, dict):
        missing = [n for n in names if n not in features]
        if missing:
            raise ZipError(f"{what} for task '{task}' has no values for input(s) {missing}; the models take "
                           f"inputs {names} (give a dict with these keys, or a list in this order).")
        features = [features[n] for n in names]
    if not isinstance(features, (tuple, list)) or len(features) != len(names):
        raise ZipError(f"{what} for task '{task}': the models take {len(names)} inputs {names}; give a list (in "
                       "that order) or a dict by input name of one value per input, and (features, labels) "
                       "for labelled data.")
    return tuple(features), labels


def as_dataset(data, task: str, inputs: list, what: str, batch_size: int,
               with_labels: bool = False, shuffle: bool = False, seed: int = 0, phase: int = 0) -> tf.data.Dataset:
    """Returns a batched dataset of x (or of (x, y) with `with_labels`) for one task; x is one tensor, or a
    tuple with one per model input.

    Args:
        inputs: the models' inputs, each with `.name` and `.shape` (without the batch axis).
        shuffle: arrays only (a dataset keeps its own order): an endless stream of batches, each pass over
            the samples in another order, a function of `seed`, `phase` and the pass alone (`shuffled`).

    Raises:
        ZipError: empty arrays, wrong feature shape, NaN/Inf in numpy input, labels missing.
    """
    names, shapes = [i.name for i in inputs], [tuple(i.shape) for i in inputs]
    if isinstance(data, tf.data.Dataset):
        return _batched_dataset(data, task, names, shapes, what, batch_size, with_labels)

    features, y = _split_features(data, names, task, what)
    xs = [_checked_array(x, task, name if len(names) > 1 else None, shape, what)
          for x, name, shape in zip(features if len(names) > 1 else (features,), names, shapes)]
    if len({len(x) for x in xs}) != 1:
        raise ZipError(f"{what} for task '{task}' has different sample counts per input: {[len(x) for x in xs]}.")
    x = xs[0] if len(xs) == 1 else tuple(xs)
    if with_labels:
        if y is None:
            raise ZipError(f"{what} for task '{task}' has no labels; give (x, y) or use label-free "
                           "distillation.")
        y = np.asarray(y)
        if len(y) != len(xs[0]):
            raise ZipError(f"{what} for task '{task}' has {len(xs[0])} inputs but {len(y)} labels.")
        dataset = tf.data.Dataset.from_tensor_slices((x, y))
    else:
        dataset = tf.data.Dataset.from_tensor_slices(x)
    if shuffle:
        return without_autotuning(shuffled((x, y) if with_labels else x, len(xs[0]), batch_size, seed, phase))
    return without_autotuning(dataset.batch(batch_size))


def without_autotuning(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """`dataset` without tf.data's autotuning. Its model thread sleeps on a timer that grows to seconds, and
    deleting an iterator waits for that thread to wake: every retraining phase's end stalled the process up
    to about 10 s per task (200 distillation steps took 7 s, or 21 to 80 s, at random). tf_mtz's pipelines
    are a slice, a gather and a fixed prefetch, with nothing to tune."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.with_options(options)


def shuffled(tensors, samples: int, batch_size: int, seed: int, phase: int) -> tf.data.Dataset:
    """An endless stream of batches of `tensors` (arrays with `samples` rows, nested), pass after pass, each
    pass in its own order: a stateless shuffle keyed by (`seed`, `phase`, pass), so that it depends neither
    on TensorFlow's global seed nor on how many streams were made before (a resumed zip reads the same
    batches as an uninterrupted one). Each pass ends with a smaller batch where `batch_size` does not
    divide `samples`, as `shuffle().batch()` would."""
    tensors = tf.nest.map_structure(tf.convert_to_tensor, tensors)
    per_pass = -(-samples // batch_size)
    last = tf.constant(samples - 1, tf.int64)

    def batch(counter):
        pass_index, position = counter // per_pass, counter % per_pass
        rows = tf.range(position * batch_size, tf.minimum((position + 1) * batch_size, samples))
        key = tf.stack([tf.constant(seed, tf.int64), tf.constant(phase, tf.int64) * 1_000_003 + pass_index])
        order = tf.random.experimental.index_shuffle(rows, seed=key, max_index=last)
        return tf.nest.map_structure(lambda t: tf.gather(t, order), tensors)

    return tf.data.Dataset.counter().map(batch)


def bounded(dataset: tf.data.Dataset, max_samples: int | None, batch_size: int, task: str,
            what: str) -> tf.data.Dataset:
    """The first `max_samples` samples of a batched dataset, batched again (all of it for None); an
    endless dataset needs a bound."""
    if max_samples is None:
        if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
            raise ZipError(f"{what} for task '{task}' is an endless stream; set ZipConfig(max_samples=...) to bound "
                           "how many samples tf_mtz reads from it.")
        return dataset
    return dataset.unbatch().take(max_samples).batch(batch_size)


def is_stream(data) -> bool:
    """A Python generator or other iterator of samples or batches (not an array, list, tuple or dict)."""
    return (not isinstance(data, (np.ndarray, list, tuple, dict, tf.data.Dataset, tf.Tensor))
            and (hasattr(data, "__next__") or (hasattr(data, "__iter__") and not hasattr(data, "__len__"))))


def read_stream(data, inputs: list, max_samples: int | None, what: str):
    """The first `max_samples` samples of a generator of inputs or `(x, y)` pairs (one sample or one batch at
    a time) as arrays, `x` or `(x, y)`: memory is that of the samples kept, whatever the stream's length.
    Every sample is read where `max_samples` is None (the stream must end)."""
    if len(inputs) > 1:
        raise ZipError(f"{what} is a generator; tf_mtz reads generators for models with one input (give a "
                       "tf.data.Dataset for several).")
    shape = tuple(inputs[0].shape)
    # With a bound the samples go straight into arrays of that size: no list of batches to join, which
    # would hold every sample twice at the end.
    xs, ys, count, x_buffer, y_buffer, labelled = [], [], 0, None, None, True
    for element in data:
        x, y = split_element(element) if isinstance(element, tuple) else (element, None)
        x = np.asarray(x)
        if tuple(x.shape) == shape:
            x, y = x[None], (None if y is None else np.asarray(y)[None])
        elif tuple(x.shape[1:]) != shape:
            raise ZipError(f"{what} yields inputs of shape {tuple(x.shape)}; the models take {shape} (one sample) "
                           f"or (batch,) + {shape}.")
        labelled = labelled and y is not None
        if max_samples is None:
            xs.append(np.asarray(x, np.float32))
            ys.append(y)
            count += len(x)
            continue
        x, y = x[:max_samples - count], (None if y is None else np.asarray(y)[:max_samples - count])
        if x_buffer is None:
            x_buffer = np.empty((max_samples,) + shape, np.float32)
        x_buffer[count:count + len(x)] = x
        if labelled:
            if y_buffer is None:
                y_buffer = np.empty((max_samples,) + y.shape[1:], y.dtype)
            y_buffer[count:count + len(x)] = y
        count += len(x)
        if count >= max_samples:
            break
    if count == 0:
        raise ZipError(f"{what} is an empty generator.")
    if max_samples is not None:
        x = x_buffer[:count]
        return x if not labelled else (x, y_buffer[:count])
    x = np.concatenate(xs)
    return x if not labelled else (x, np.concatenate(ys))


def _checked_array(x, task: str, input_name: str | None, shape: tuple, what: str) -> np.ndarray:
    where = f"{what} for task '{task}'" + (f" (input '{input_name}')" if input_name else "")
    x = np.asarray(x)
    if x.ndim == 0 or x.shape[0] == 0:
        raise ZipError(f"{where} is empty.")
    if tuple(x.shape[1:]) != tuple(shape):
        raise ZipError(f"{where} has samples of shape {tuple(x.shape[1:])}; the models take {tuple(shape)}.")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):  # bool: a mask input
        raise ZipError(f"{where} has dtype {x.dtype}; numeric or boolean data is required.")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ZipError(f"{where} contains NaN or Inf values.")
    return x


def _batched_dataset(data: tf.data.Dataset, task: str, names: list, shapes: list, what: str, batch_size: int,
                     with_labels: bool) -> tf.data.Dataset:
    dataset = _from_feature_dicts(data, task, what) if len(names) == 1 else data
    spec = dataset.element_spec
    x_spec, y_spec = _split_features(spec, names, task, what)
    x_specs = x_spec if len(names) > 1 else (x_spec,)
    if not all(isinstance(s, tf.TensorSpec) for s in x_specs):
        raise ZipError(f"{what} for task '{task}': expected a dataset of tensors or (x, y) tuples, "
                       f"got element spec {spec}.")
    if with_labels and y_spec is None:
        raise ZipError(f"{what} for task '{task}' has no labels; give (x, y) elements or use "
                       "label-free distillation.")

    def rearranged(*element):
        features, labels = _split_features(element[0] if len(element) == 1 else element, names, task, what)
        x = tf.nest.map_structure(lambda v: tf.cast(v, tf.float32), features)
        return (x, labels) if with_labels else x

    dataset = dataset.map(rearranged)
    if all(s.shape.rank == len(shape) for s, shape in zip(x_specs, shapes)):
        dataset = dataset.batch(batch_size)
    batched = dataset.element_spec[0] if with_labels else dataset.element_spec
    for s, shape, name in zip(batched if len(names) > 1 else (batched,), shapes, names):
        if not _compatible(tuple(s.shape[1:]), shape):
            where = f" (input '{name}')" if len(names) > 1 else ""
            raise ZipError(f"{what} for task '{task}'{where} has samples of shape {tuple(s.shape[1:])}; the "
                           f"models take {shape}.")
    return dataset


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
