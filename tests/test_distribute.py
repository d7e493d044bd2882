"""tf.distribute: statistics under MirroredStrategy over two logical CPUs equal single-device ones.

Logical devices must be configured before TensorFlow starts, so the check runs in a fresh process."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    sys.path.insert(0, sys.argv[1])
    import tf_mtz
    from tf_mtz import statistics
    from conftest import small_cnn

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(203, 12, 12, 1)).astype("float32")  # an odd size: the last batch splits unevenly
    a, b = small_cnn("a", seed=0), small_cnn("b", seed=1)

    import keras
    probe = keras.Model(a.inputs, a.get_layer("conv2").input)
    layer = a.get_layer("conv2")
    handler = tf_mtz.registry.handler_for(layer)
    data = tf.data.Dataset.from_tensor_slices(x).batch(32)
    fn = lambda f: handler.hessian_samples(layer, f, "patch")
    single = statistics.layer_hessian(probe, data, fn, task="a", layer_name="conv2", is_first_layer=False)
    mirrored = statistics.layer_hessian(probe, data, fn, task="a", layer_name="conv2", is_first_layer=False,
                                        strategy=strategy)
    assert single.samples == mirrored.samples, (single.samples, mirrored.samples)
    np.testing.assert_allclose(mirrored.matrix, single.matrix, rtol=1e-5, atol=1e-6)

    plain = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0)
    explicit = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0, strategy=strategy)
    with strategy.scope():
        ambient = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0)
    assert ambient.zip_report.layers[0].cost_sum > 0
    for other in (explicit, ambient):
        for u, v in zip(plain.get_weights(), other.get_weights()):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)
    # Retraining: a dropout-free pair, so both runs see the same arithmetic.
    from conftest import mlp
    a, b = mlp("a", seed=0), mlp("b", seed=1)
    x = rng.normal(size=(203, 20)).astype("float32")
    retrain = tf_mtz.Retrain(steps_per_layer=15, seed=1, batch_size=32)
    single = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0, retrain=retrain, sharing=0.5)
    mirrored = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0, retrain=retrain, sharing=0.5, strategy=strategy)
    untrained = tf_mtz.zip_models({"a": a, "b": b}, x, verbose=0, sharing=0.5)
    moved = max(np.abs(u - v).max() for u, v in zip(single.get_weights(), untrained.get_weights()))
    apart = max(np.abs(u - v).max() for u, v in zip(single.get_weights(), mirrored.get_weights()))
    # Retraining moved the weights, and the same way on one device and on two (Adam amplifies the
    # rounding of near-zero gradients a little, hence a relative bound).
    assert moved > 1e-3 and apart < 0.02 * moved, (moved, apart)
    print("DISTRIBUTED OK")
""")


def test_mirrored_statistics_equal_single_device():
    tests = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run([sys.executable, "-c", SCRIPT, tests], capture_output=True, text=True, timeout=600,
                            cwd=os.path.dirname(tests))
    assert result.returncode == 0 and "DISTRIBUTED OK" in result.stdout, result.stderr[-4000:]
