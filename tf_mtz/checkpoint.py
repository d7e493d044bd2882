"""Checkpoints of a running zip: after each layer step the zip state is written, so that a killed run resumes.

A checkpoint holds everything the rest of the zip depends on: the zip state (every task's weights and unit
orders), the layer reports so far, the layer steps' carried values (each group's shared count, the refit's
mismatch and the input Hessians it measured) and, with `AutoSharing`, the chosen counts and the record of
trials. Nothing else carries over between layer steps: the probe recomputes what a layer reads from the
state, and every retraining phase starts a fresh optimizer on a freshly seeded data order. So a resumed zip
computes exactly what the uninterrupted one would have.

The file is written whole to a temporary name and renamed (a kill while writing leaves the previous
checkpoint), with a checksum of its contents and a fingerprint of the zip's inputs (models, data, options):
a checkpoint of another zip, or a damaged one, is refused, never silently reused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import tempfile

import keras
import numpy as np
import tensorflow as tf

from tf_mtz.errors import ZipError

FILE_NAME = "tf_mtz_zip.ckpt"
_MAGIC = b"tf_mtz zip checkpoint v1\n"


@dataclasses.dataclass
class Snapshot:
    """The zip after its first `next_slot` layer steps (and the final retraining, if `finished`)."""

    fingerprint: str
    next_slot: int
    finished: bool
    state: object  # state.ZipState
    layer_reports: list
    group_counts: dict
    refit_mismatch: dict
    input_hessians: dict
    counts: list  # shared units per hidden slot (chosen so far, with AutoSharing)
    auto_sharing: list  # AutoSharing's record of trials so far


class Checkpoints:
    """Reads and writes the checkpoint of one zip in `directory`."""

    def __init__(self, directory: str, fingerprint: str):
        self.directory, self.fingerprint = str(directory), fingerprint
        self.path = os.path.join(self.directory, FILE_NAME)

    def load(self) -> Snapshot | None:
        """The last checkpoint of this zip, or None where there is none yet.

        Raises:
            ZipError: the file is damaged, or was written by a zip of other models, data or options.
        """
        if not os.path.exists(self.path):
            return None
        with open(self.path, "rb") as f:
            content = f.read()
        header, _, rest = content.partition(b"\n")
        digest, _, payload = rest.partition(b"\n")
        if header + b"\n" != _MAGIC or hashlib.sha256(payload).hexdigest().encode() != digest:
            raise ZipError(f"The checkpoint {self.path} is damaged (its checksum does not match its contents); "
                           "delete it to start the zip over.")
        try:
            snapshot = pickle.loads(payload)
        except Exception as error:  # a checksum-valid file from an incompatible tf_mtz version
            raise ZipError(f"The checkpoint {self.path} cannot be read by this version of tf_mtz ({error}); "
                           "delete it to start the zip over.") from error
        if not isinstance(snapshot, Snapshot) or snapshot.fingerprint != self.fingerprint:
            raise ZipError(f"The checkpoint in {self.directory} belongs to another zip (other models, data or "
                           "options); resume with the same arguments, or give another checkpoint_dir.")
        return snapshot

    def save(self, snapshot: Snapshot) -> None:
        """Writes `snapshot` atomically: a reader sees the previous checkpoint or this one, whole."""
        os.makedirs(self.directory, exist_ok=True)
        for name in os.listdir(self.directory):  # left by a run killed while writing
            if name.startswith(".tf_mtz_") and name.endswith(".ckpt"):
                os.remove(os.path.join(self.directory, name))
        payload = pickle.dumps(snapshot, protocol=pickle.HIGHEST_PROTOCOL)
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tf_mtz_", suffix=".ckpt")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(_MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n")
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            if os.path.exists(temporary):
                os.remove(temporary)
            raise


def fingerprint(models: dict, **inputs) -> str:
    """A digest of everything a zip's result depends on: the models (architecture and weights) and the
    other arguments (`inputs`: data, sharing, options), arrays by their bytes."""
    digest = hashlib.sha256()
    for task, model in models.items():
        digest.update(f"task {task}\n".encode())
        digest.update(_architecture(model).encode())
        for weight in model.weights:
            digest.update(np.ascontiguousarray(keras.ops.convert_to_numpy(weight)).tobytes())
    for name in sorted(inputs):
        digest.update(f"\n{name}\n".encode())
        _update(digest, inputs[name])
    return digest.hexdigest()


def _architecture(model) -> str:
    try:
        return json.dumps(model.get_config(), sort_keys=True, default=repr)
    except Exception:  # a layer without a serialisable config: its kind and name still tell models apart
        return "\n".join(f"{type(layer).__name__} {layer.name}" for layer in model.layers)


def _update(digest, value) -> None:
    """Feeds `value` into `digest`: arrays and tensors by dtype, shape and bytes; containers element by
    element; a dataset by its element spec and first element; anything else by its repr."""
    if isinstance(value, dict):
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _update(digest, value[key])
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _update(digest, item)
    elif isinstance(value, (np.ndarray, tf.Tensor, np.generic)):
        array = np.ascontiguousarray(np.asarray(value))
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(array.tobytes())
    elif isinstance(value, tf.data.Dataset):
        digest.update(repr(value.element_spec).encode())
        for element in value.take(1):
            _update(digest, element)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        digest.update(type(value).__name__.encode())
        _update(digest, {f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    elif hasattr(value, "get_config"):  # a Keras optimizer or loss object: its settings, not its address
        digest.update(type(value).__name__.encode())
        digest.update(json.dumps(value.get_config(), sort_keys=True, default=repr).encode())
    elif callable(value):  # a function: by its name (its repr holds a memory address, other in every run)
        digest.update(f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', type(value).__name__)}".encode())
    else:
        digest.update(repr(value).encode())
