"""Bridge to the TF Model Optimization Toolkit: a zipped Keras 3 model rebuilt as a tf_keras model.

tfmot 0.8.1 (quantization-aware training, pruning, clustering) accepts only tf_keras models, while
tf_mtz builds Keras 3 models. The zipped model uses standard layers only, so it can be rebuilt layer by
layer in tf_keras with the same graph (shared layers stay shared) and the same weights.
"""

from __future__ import annotations

import inspect

import keras

from tf_mtz import keras_graph
from tf_mtz.errors import ZipError


def _tf_keras():
    try:
        import tf_keras
    except ImportError as exc:  # pragma: no cover - set-up problem
        raise ImportError("to_tf_keras needs the tf_keras package: pip install tf_keras") from exc
    return tf_keras


def _plain_config(layer, target_class) -> dict:
    """The layer's config restricted to what the tf_keras class accepts, without Keras 3-only entries."""
    accepted = set(inspect.signature(target_class.__init__).parameters) | {"name", "trainable"}
    config = {}
    for key, value in layer.get_config().items():
        if key == "dtype" or isinstance(value, dict) or key not in accepted:
            continue  # weights are copied afterwards, so initializers and the like do not matter
        config[key] = value
    return config


def to_tf_keras(model: keras.Model):
    """Rebuilds a Keras 3 functional model (e.g. from `zip_models`) as a tf_keras model, weights included.

    Args:
        model: a Keras 3 Functional or Sequential model built from standard layers (built in the process
            or loaded from a file).

    Returns:
        A `tf_keras.Model` with the same inputs, outputs (a dict for zipped models), layer sharing and
        weights, ready for `tensorflow_model_optimization` (e.g. `quantize_model`).

    Raises:
        ZipError: a layer type tf_keras does not know, or a subclassed or unbuilt model.

    Example:

    ```python
    import tensorflow_model_optimization as tfmot
    legacy = tf_mtz.to_tf_keras(zipped)
    qat = tfmot.quantization.keras.quantize_model(legacy)
    ```
    """
    keras_graph.check_graph_model(model, f"Model '{getattr(model, 'name', model)}'")
    tf_keras = _tf_keras()
    clones, values = {}, {}

    def clone_layer(layer):
        if id(layer) not in clones:
            name = type(layer).__name__
            target_class = getattr(tf_keras.layers, name, None)
            if target_class is None:
                raise ZipError(f"Layer '{layer.name}' ({name}) has no tf_keras counterpart.")
            try:
                clone = target_class(**_plain_config(layer, target_class))
            except (ValueError, TypeError) as exc:
                raise ZipError(f"Layer '{layer.name}' ({name}) cannot be rebuilt in tf_keras: {exc}") from exc
            clones[id(layer)] = (layer, clone)
        return clones[id(layer)][1]

    def convert_operation(op, node_index):
        # The zipped model slices a grouped convolution's input per group (`registry.channel_slice`);
        # tf_keras writes the same slice as its own slicing layer.
        call = keras_graph.OperationCall.of_node(op, node_index)
        if call.operation_name == "GetItem" and call.tensor_count == 1:
            source, key = call.arguments.args
            return convert(source)[key]
        raise ZipError(f"Operation '{op.name}' ({call.operation_name}) has no tf_keras counterpart; to_tf_keras "
                       "rebuilds layers and channel slices only.")

    def convert(tensor):
        op, node_index, tensor_index = keras_graph.producer(tensor)
        key = (id(op), node_index, tensor_index)
        if key in values:
            return values[key]
        if isinstance(op, keras.layers.InputLayer):
            spec = model.inputs[0] if len(model.inputs) == 1 else tensor
            values[key] = tf_keras.Input(shape=tuple(spec.shape[1:]), dtype=spec.dtype, name=op.name)
            return values[key]
        if not isinstance(op, keras.layers.Layer):  # a keras.ops call in the graph
            output = convert_operation(op, node_index)
        else:
            inputs = [convert(t) for t in keras_graph.call_inputs(op, node_index)]
            output = clone_layer(op)(inputs if len(inputs) > 1 else inputs[0])
        values[key] = output
        return output

    outputs = keras_graph.output_structure(model)
    if isinstance(outputs, dict):
        rebuilt_outputs = {name: convert(t) for name, t in outputs.items()}
    elif isinstance(outputs, (list, tuple)):
        rebuilt_outputs = [convert(t) for t in outputs]
    else:
        rebuilt_outputs = convert(outputs)
    inputs = [convert(t) for t in model.inputs]
    rebuilt = tf_keras.Model(inputs if len(inputs) > 1 else inputs[0], rebuilt_outputs, name=model.name)
    for layer, clone in clones.values():
        weights = layer.get_weights()
        if weights:
            clone.set_weights(weights)
    return rebuilt
