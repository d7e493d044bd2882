"""One registry of per-layer handlers: how tf_mtz reads, merges and rebuilds each Keras layer type.

Every layer the zipper meets is looked up here, built-in layers included, so supporting a new layer type
means registering one handler rather than touching the zipper. Two kinds are public:

* ``UnitLayerHandler``: layers with output units that can be shared (Dense, Conv2D). The handler exposes
  the kernel as ``[..., inputs, units]`` plus a bias, turns a batch of layer inputs into Hessian samples,
  and builds fresh layers of the same kind with a chosen number of units.
* ``PassThroughHandler``: layers without weights that act on every unit on its own (pooling, dropout,
  activations) or only re-lay out units (Flatten, Reshape). They are applied to the shared and the
  task-specific parts of a feature separately.

Built-in kinds complete the set: ``ChannelUnitsHandler`` (per-unit weights that follow their input's
units: DepthwiseConv2D, LayerNormalization, position tables), ``MergeHandler`` (element-wise merges such as a
residual ``Add``, which tie their inputs' units), ``ConcatenateHandler``, and ``CompositeHandler`` (a layer
made of other layers, which the graph reader replaces by them: keras-hub's transformer blocks).

Each kind of handler dispatches by method: `handler.visit(visitor, *args)` calls the visitor's method for
its kind (`units`, `channel_units`, `merge`, `concatenate`, `passthrough`; see `PositionVisitor`). The
graph reader, the model builder and the probe are such visitors, so each says what it does per kind in one
method, and a new kind of layer is one handler base class plus one method in each visitor.
"""

from __future__ import annotations

import math
import zlib
import keras
import numpy as np
import tensorflow as tf

from tf_mtz import keras_graph, statistics
from tf_mtz.errors import ZipError


class PositionVisitor:
    """What a module does at one position of the zip plan, one method per kind of handler.

    `LayerHandler.visit` picks the method; the arguments are the visitor's own (typically the position
    and the values flowing into it). Visitors override the kinds they treat differently; the default of
    every kind is `passthrough`.
    """

    def units(self, *args):
        return self.passthrough(*args)

    def channel_units(self, *args):
        return self.passthrough(*args)

    def merge(self, *args):
        return self.passthrough(*args)

    def concatenate(self, *args):
        return self.passthrough(*args)

    def select(self, *args):
        return self.passthrough(*args)

    def recurrent_units(self, *args):
        return self.units(*args)

    def attention_units(self, *args):
        return self.units(*args)

    def passthrough(self, *args):
        raise NotImplementedError


class LayerHandler:
    """Base class of all handlers. Subclass `UnitLayerHandler` or `PassThroughHandler`, not this."""

    def visit(self, visitor: PositionVisitor, *args):
        """Calls the method of `visitor` for this handler's kind with `args`, and returns its result."""
        raise NotImplementedError

    def check(self, layer, model_name: str) -> None:
        """Raises `ZipError` when this particular layer's configuration is not supported."""


class UnitLayerHandler(LayerHandler):
    """Handler for a layer whose output units can be shared between tasks.

    The kernel is seen as an array whose last axis indexes output units and whose second-to-last axis
    indexes input units (channels); any leading axes are spatial kernel offsets.
    """

    #: Hessian modes this layer supports; the first is its default.
    hessian_modes = ("exact",)
    #: Whether the layer's units can only be shared all together, and only from a fully shared input.
    all_or_none = False
    #: Whether the refit can fit its weights by least squares on its inputs.
    refits = True

    def visit(self, visitor, *args):
        return visitor.units(*args)

    @property
    def refit_mode(self) -> str:
        """The mode of the refit's statistics: the exact rows of the layer's pre-activations, one block
        (a convolution's patches)."""
        return "patch" if "patch" in self.hessian_modes else self.hessian_modes[0]

    def kernel_and_bias(self, layer) -> tuple[np.ndarray, np.ndarray]:
        """Returns `(kernel, bias)` as float32 numpy arrays; a layer without bias gets zeros."""
        kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), np.float32)
        use_bias = getattr(layer, "use_bias", True) and getattr(layer, "bias", None) is not None
        bias = (np.asarray(keras.ops.convert_to_numpy(layer.bias), np.float32) if use_bias
                else np.zeros(kernel.shape[-1], np.float32))
        return kernel, bias

    def units(self, layer) -> int:
        return int(self.kernel_and_bias(layer)[0].shape[-1])

    def layer_weights(self, kernel: np.ndarray, bias: np.ndarray | None = None) -> list:
        """The `set_weights` list of a layer from `build_layer`, given a kernel in tf_mtz's layout (input
        units on axis -2, output units last) and a bias (None for a layer built without one)."""
        return [kernel] if bias is None else [kernel, bias]

    def layout_kernel(self, kernel: np.ndarray) -> np.ndarray:
        """A built layer's kernel in tf_mtz's layout (the inverse of `layer_weights` on the kernel)."""
        return kernel

    def trained_weights(self, layer) -> tuple:
        """`(kernel, bias or None, recurrent weights or None)` of a layer that `build_layer` made, in
        tf_mtz's layout: what retraining changed, read back into the zip state."""
        weights = layer.get_weights()
        return self.layout_kernel(weights[0]), (weights[1] if len(weights) > 1 else None), None

    def activation(self, layer) -> str | dict:
        return keras.activations.serialize(layer.activation)

    def build_layer(self, template, units: int, *, use_bias: bool, activation, name: str):
        """Returns a new, unbuilt layer like `template` with `units` outputs."""
        raise NotImplementedError

    def build_grouped(self, template, units: int, groups: int, *, activation, name: str):
        """A new, unbuilt layer like `template` computing `groups` such layers side by side, each reading
        its own 1/groups of the input channels and giving units/groups outputs (with a bias), or None
        where the kind has no such form. The rebuild uses it where every group of a grouped layer is
        fully shared; with None it builds the groups one by one."""
        del template, units, groups, activation, name
        return None

    def token_vocabulary(self, template) -> int | None:
        """The number of tokens, where the layer reads token ids (an Embedding): its Hessian is then the
        tokens' frequencies on the calibration data (`statistics.TokenHessian`), not a Gram matrix of
        `hessian_samples`. None for layers reading features."""
        del template
        return None

    def hessian_samples(self, template, x: tf.Tensor, mode: str) -> tf.Tensor:
        """Maps a batch of layer inputs to a `(samples, features)` matrix whose Gram matrix is the Hessian."""
        raise NotImplementedError

    def sample_count(self, template, x: tf.Tensor, mode: str) -> int:
        """How many rows `hessian_samples` gives for the batch `x` (override to avoid computing them)."""
        return int(self.hessian_samples(template, x, mode).shape[0])

    def hessian_rows(self, template, x: tf.Tensor, mode: str, rows: np.ndarray) -> tf.Tensor:
        """Rows `rows` of `hessian_samples(template, x, mode)` (override to compute only those)."""
        return tf.gather(self.hessian_samples(template, x, mode), rows)

    def pre_activations(self, template, x: tf.Tensor, block: tf.Tensor, mode: str) -> tf.Tensor:
        """The layer's pre-activations `(samples, units)` on the batch `x` with the weights `block`
        (`(features + 1, units)`, one block of `to_blocks`, bias last)."""
        return tf.matmul(statistics.augment(self.hessian_samples(template, x, mode)), block)

    def input_moments(self, template, x: tf.Tensor, targets: tf.Tensor, mode: str):
        """`(X̃ᵀX̃, X̃ᵀ targets)` of the augmented Hessian samples X̃ of the batch `x` computed without forming
        X̃, or None where the layer has no such shortcut (then X̃ is formed). `targets` is
        `(samples, units)`, in the order of `hessian_samples`."""
        return None

    def hessian_is_refit_gram(self, template, mode: str) -> bool:
        """Whether the Hessian samples in `mode` are the rows the refit sums in exact mode (a Dense layer's
        inputs, a 1x1 stride-1 convolution's pixels): the refit's Gram matrix is then the layer's Hessian
        and is not computed twice. False unless a handler knows better."""
        return False

    def to_blocks(self, kernel: np.ndarray, bias: np.ndarray, mode: str) -> np.ndarray:
        """Stacks kernel and bias as `(blocks, features + 1, units)`, bias last, one block per Hessian."""
        raise NotImplementedError

    def from_blocks(self, blocks: np.ndarray, kernel_shape, mode: str) -> tuple[np.ndarray, np.ndarray]:
        """Inverse of `to_blocks`: returns `(kernel, bias)`."""
        raise NotImplementedError


class CompositeHandler(LayerHandler):
    """Handler for a layer made of other layers (a transformer block, an embedding of tokens and positions):
    the graph reader replaces it by the standard layers it computes, as it inlines a nested model, and zips
    those. Subclasses write `expand`.
    """

    def visit(self, visitor, *args):
        raise AssertionError("Internal error: a composite layer reached the zipper; the graph reader expands it.")

    def expand(self, layer, *args, **kwargs):
        """Calls the layers `layer` is made of (its own sublayers, whose weights are its weights; standard
        Keras layers or layers with handlers of their own) on `args` and `kwargs`, symbolic tensors laid out
        as the layer's call in its model, and returns its output: what `layer(*args, **kwargs)` computes."""
        raise NotImplementedError


class PassThroughHandler(LayerHandler):
    """Handler for a weightless layer that maps units to units.

    `channelwise` layers act on each unit alone and can run on any subset of units. Layers that only
    re-lay out units (Flatten) override `apply_to_part`.
    """

    channelwise = True

    def visit(self, visitor, *args):
        return visitor.passthrough(*args)

    def check_between_units(self, layer, model_name: str) -> None:
        """Raises `ZipError` when the layer cannot run on shared and specific units separately."""

    def apply_to_part(self, layer, x: tf.Tensor, name: str) -> tf.Tensor:
        """Applies a copy of `layer` to `x`, a feature holding a subset of the layer's input units."""
        return copy_layer(layer, name)(x)


def copy_layer(layer, name: str):
    """A fresh copy of a weightless layer under a new name.

    Random layers (Dropout, noise) left unseeded get a seed derived from the name, so that zipping and
    retraining give bit-identical results run after run.
    """
    if isinstance(layer, keras_graph.OperationCall):
        return layer.copy(name)
    config = dict(layer.get_config())
    config["name"] = name
    if "seed" in config and config["seed"] is None:
        config["seed"] = zlib.crc32(name.encode()) % (2 ** 31)
    return type(layer).from_config(config)


def give_weights(copy, weights: list) -> None:
    """Sets a built copy's weights; a layer that derives state from them (Normalization: its mean and
    variance from the adapted statistics) derives it again."""
    copy.set_weights(weights)
    if hasattr(copy, "finalize_state"):
        copy.finalize_state()


def _activation_name(layer) -> str:
    act = keras.activations.serialize(layer.activation)
    return act if isinstance(act, str) else str(act.get("config", act))


class _LastAxisInputs:
    """Inputs read along their last axis, every other axis a sample (a Dense layer on a batch or a sequence,
    a recurrent layer's steps): the Hessian samples are the input vectors themselves."""

    def hessian_samples(self, template, x, mode):
        return tf.reshape(x, (-1, x.shape[-1]))

    def sample_count(self, template, x, mode):
        return prod(x.shape[:-1])

    def pre_activations(self, template, x, block, mode):
        return tf.matmul(tf.reshape(x, (-1, x.shape[-1])), block[:-1]) + block[-1]

    def input_moments(self, template, x, targets, mode):
        return statistics.vector_moments(tf.reshape(x, (-1, x.shape[-1])), targets)


class DenseHandler(_LastAxisInputs, UnitLayerHandler):
    def build_layer(self, template, units, *, use_bias, activation, name):
        return keras.layers.Dense(units, use_bias=use_bias, activation=activation, name=name,
                                  dtype=template.dtype_policy)

    def hessian_is_refit_gram(self, template, mode):
        return type(self) is DenseHandler  # a subclass may sample its inputs otherwise

    def to_blocks(self, kernel, bias, mode):
        return np.concatenate([kernel, bias[None, :]], axis=0)[None]

    def from_blocks(self, blocks, kernel_shape, mode):
        return blocks[0, :-1].reshape(kernel_shape), blocks[0, -1]


class EmbeddingHandler(UnitLayerHandler):
    """Embedding: its units are the embedding dimensions, a unit's incoming weights its column of the
    table (one row per token: the layer is a Dense layer on one-hot tokens, without bias). It reads the
    model's token ids, identical for every task, so tables of the same vocabulary zip; the Hessian is the
    tokens' frequencies. With `mask_zero`, the mask Keras derives from the ids (`ids != 0`) is an operation on
    the model input that the layers using it take explicitly (`keras_graph.call_arguments_for`), so the
    zipped model's Embeddings need no mask of their own."""

    hessian_modes = ("tokens",)

    def check(self, layer, model_name):
        if getattr(layer, "sparse", False):
            raise ZipError(f"Embedding '{layer.name}' of model '{model_name}' has sparse=True; tf_mtz zips dense "
                           "embeddings only.")

    def token_vocabulary(self, template):
        return int(template.input_dim)

    def kernel_and_bias(self, layer):
        table = np.asarray(keras.ops.convert_to_numpy(layer.embeddings), np.float32)
        return table, np.zeros(table.shape[-1], np.float32)

    def activation(self, layer):
        return "linear"

    def layer_weights(self, kernel, bias=None):
        if bias is not None and np.any(bias):
            raise AssertionError("Internal error: an Embedding was given a non-zero bias.")
        return [kernel]

    def build_layer(self, template, units, *, use_bias, activation, name):
        del use_bias, activation  # an embedding has neither
        return keras.layers.Embedding(template.input_dim, units, name=name, dtype=template.dtype_policy)

    def hessian_samples(self, template, x, mode):
        return tf.one_hot(tf.reshape(tf.cast(x, tf.int32), (-1,)), template.input_dim)

    def sample_count(self, template, x, mode):
        return prod(x.shape)

    def pre_activations(self, template, x, block, mode):
        ids = tf.reshape(tf.cast(x, tf.int32), (-1,))
        return tf.gather(block[:-1], ids) + block[-1]

    def to_blocks(self, kernel, bias, mode):
        return np.concatenate([kernel, bias[None, :]], axis=0)[None]

    def from_blocks(self, blocks, kernel_shape, mode):
        return blocks[0, :-1].reshape(kernel_shape), blocks[0, -1]


class RecurrentHandler(_LastAxisInputs, UnitLayerHandler):
    """SimpleRNN, LSTM and GRU (`return_sequences` either way), and `Bidirectional` of them.

    A unit is one hidden unit across the layer's G gates (1, 4, 3): in tf_mtz's layout the kernel is
    `(G, inputs, units)`, the gates on the leading axis as a convolution's kernel offsets, the bias
    `(units, G)`, and the recurrent weights `(G, units + 1, units)`: the recurrent kernel, whose rows are
    the layer's own units, so it is permuted on both axes, and below it the recurrent bias (a GRU with
    `reset_after`; zeros otherwise). A Bidirectional layer's units are its forward units, then its
    backward ones (`unit_blocks`), its recurrent weights block-diagonal.

    The Hessian is that of the inputs [x_t; 1] over every time step, shared by the G gate blocks; the refit
    fits the gate pre-activations' input part W x_t + b to the original layer's (as a Dense layer on the
    steps), keeping the recurrent kernel. Standard Keras layers cannot keep some units out of the others'
    recurrence, so the units are shared all or none, and only from a fully shared input.
    """

    hessian_modes = ("steps",)
    refit_mode = "stacked"
    all_or_none = True
    gates = {keras.layers.SimpleRNN: 1, keras.layers.LSTM: 4, keras.layers.GRU: 3}

    def visit(self, visitor, *args):
        return visitor.recurrent_units(*args)

    def check(self, layer, model_name):
        where = f"Layer '{layer.name}' ({type(layer).__name__}) of model '{model_name}'"
        if isinstance(layer, keras.layers.Bidirectional) and layer.merge_mode != "concat":
            raise ZipError(f"{where} merges its directions with merge_mode='{layer.merge_mode}'; tf_mtz zips "
                           "Bidirectional layers with merge_mode='concat' (the default), whose units stay apart.")
        for direction in self._directions(layer):
            if type(direction) not in self.gates:
                raise ZipError(f"{where} wraps a {type(direction).__name__}; tf_mtz zips Bidirectional "
                               "SimpleRNN, LSTM and GRU layers.")
            if direction.stateful or direction.return_state:
                raise ZipError(f"{where} has stateful=True or return_state=True; tf_mtz zips recurrent layers "
                               "that return their outputs only and start every sequence afresh.")

    @staticmethod
    def _directions(layer) -> list:
        if isinstance(layer, keras.layers.Bidirectional):
            return [layer.forward_layer, layer.backward_layer]
        return [layer]

    def _gate_count(self, layer) -> int:
        return self.gates[type(self._directions(layer)[0])]

    def unit_blocks(self, layer) -> list:
        """Unit counts of the runs of units that must stay apart (a Bidirectional's directions)."""
        return [int(direction.units) for direction in self._directions(layer)]

    def _read(self, rnn) -> tuple:
        gates, units = self._gate_count(rnn), int(rnn.units)
        cell = rnn.cell
        kernel = np.asarray(keras.ops.convert_to_numpy(cell.kernel), np.float32)
        recurrent = np.asarray(keras.ops.convert_to_numpy(cell.recurrent_kernel), np.float32)
        bias = (np.asarray(keras.ops.convert_to_numpy(cell.bias), np.float32) if cell.use_bias
                else np.zeros(gates * units, np.float32))
        recurrent_bias = np.zeros(gates * units, np.float32)
        if bias.ndim == 2:  # a GRU with reset_after: input and recurrent bias
            bias, recurrent_bias = bias[0], bias[1]
        by_gate = lambda w: np.moveaxis(w.reshape(w.shape[0], gates, units), 1, 0)  # noqa: E731
        return (by_gate(kernel), bias.reshape(gates, units).T.copy(),
                np.concatenate([by_gate(recurrent), recurrent_bias.reshape(gates, 1, units)], axis=1))

    def kernel_and_bias(self, layer):
        parts = [self._read(direction) for direction in self._directions(layer)]
        return np.concatenate([p[0] for p in parts], axis=-1), np.concatenate([p[1] for p in parts], axis=0)

    def recurrent_weights(self, layer) -> np.ndarray:
        """The recurrent kernel and bias `(G, units + 1, units)` (block-diagonal over directions)."""
        parts = [self._read(direction)[2] for direction in self._directions(layer)]
        if len(parts) == 1:
            return parts[0]
        gates, total = parts[0].shape[0], sum(p.shape[-1] for p in parts)
        recurrent = np.zeros((gates, total + 1, total), np.float32)
        start = 0
        for part in parts:
            width = part.shape[-1]
            recurrent[:, start:start + width, start:start + width] = part[:, :-1]
            recurrent[:, -1, start:start + width] = part[:, -1]
            start += width
        return recurrent

    def trained_weights(self, layer):
        kernel, bias = self.kernel_and_bias(layer)
        return kernel, bias, self.recurrent_weights(layer)

    def assign(self, layer, kernel: np.ndarray, bias: np.ndarray, recurrent: np.ndarray) -> None:
        """Sets a built layer's weights from tf_mtz's layout (`kernel_and_bias` and `recurrent_weights`)."""
        start = 0
        for direction in self._directions(layer):
            units = int(direction.units)
            columns = slice(start, start + units)
            gates = self._gate_count(direction)
            flat = lambda w: np.moveaxis(w, 0, 1).reshape(w.shape[1], gates * units)  # noqa: E731
            weights = [flat(kernel[..., columns]), flat(recurrent[:, :-1][:, columns, columns])]
            input_bias = bias[columns].T.reshape(-1)
            recurrent_bias = recurrent[:, -1, columns].reshape(-1)
            if getattr(direction.cell, "reset_after", False):
                weights.append(np.stack([input_bias, recurrent_bias]))
            else:
                if np.any(recurrent_bias):
                    raise AssertionError(f"Internal error: '{layer.name}' has no recurrent bias to hold one.")
                weights.append(input_bias)
            for variable, value in zip(direction.weights, weights):
                variable.assign(value.astype(np.float32))
            start += units

    def layer_weights(self, kernel, bias=None):
        raise NotImplementedError("A recurrent layer's weights are set with RecurrentHandler.assign.")

    def activation(self, layer):
        return keras.activations.serialize(self._directions(layer)[0].activation)

    def build_layer(self, template, units, *, use_bias, activation, name):
        del use_bias, activation  # always with a bias; the gates' activations are the template's
        def rebuilt(rnn, width, direction_name):
            config = dict(rnn.get_config(), units=width, use_bias=True, name=direction_name)
            return type(rnn).from_config(config)
        if not isinstance(template, keras.layers.Bidirectional):
            return rebuilt(template, units, name)
        forward, backward = self._directions(template)
        widths = self._split_units(template, units)
        return keras.layers.Bidirectional(
            rebuilt(forward, widths[0], f"{name}_forward"), backward_layer=rebuilt(backward, widths[1], f"{name}_backward"),
            merge_mode="concat", name=name, dtype=template.dtype_policy)

    def _split_units(self, template, units: int) -> list:
        blocks = self.unit_blocks(template)
        if units != sum(blocks):
            raise AssertionError(f"Internal error: '{template.name}' rebuilt with {units} of {sum(blocks)} units.")
        return blocks

    def hessian_is_refit_gram(self, template, mode):
        return True  # both are the Gram matrix of the steps' inputs [x_t; 1]

    def to_blocks(self, kernel, bias, mode):
        # "steps": one block per gate, each with the same Hessian; "stacked" (the refit): every gate's
        # columns side by side, gate-major, as one Dense layer on the steps.
        blocks = np.concatenate([kernel, bias.T[:, None, :]], axis=1)
        if mode == "stacked":
            return np.concatenate(list(blocks), axis=-1)[None]
        return blocks

    def from_blocks(self, blocks, kernel_shape, mode):
        if mode == "stacked":
            gates, units = kernel_shape[0], kernel_shape[-1]
            blocks = np.stack(np.split(blocks[0], gates, axis=-1))
            if blocks.shape[-1] != units:
                raise AssertionError("Internal error: a stacked recurrent block of the wrong width.")
        return blocks[:, :-1].reshape(kernel_shape), blocks[:, -1].T.copy()


class AttentionHandler(UnitLayerHandler):
    """MultiHeadAttention as self-attention (`mha(x, x)`) or cross-attention (`mha(x, memory)`): its units are
    its outputs, the residual stream's (the output projection's columns), and its heads are matched inside
    the layer. A cross-attention's key and value rows follow the memory's units.

    tf_mtz's layout: the kernel is the output projection `(heads · value_dim, outputs)`, rows head-major, its
    bias the output bias; `attention_weights` holds the query, key and value projections `(inputs, heads,
    dim)` with their biases `(heads, dim)`, whose rows follow the input's units. Zipping the layer pairs
    heads (a head's query/key dims, value dims and output-projection rows move together) and, inside each
    pair of heads, the query/key dims (one order for both) and the value dims, by weight matching, then
    averages. Shared all or none, from a fully shared input, as the LayerNormalizations on a transformer's
    stream are.
    """

    hessian_modes = ("none",)
    all_or_none = True
    refits = False  # its pre-activations are not linear in its inputs' units
    _PROJECTIONS = ("query", "key", "value")
    # Call arguments carried into the zipped model as the model passes them: masks (tensors computed from
    # the model inputs, the same for every task) and flags.
    _CALL_OPTIONS = ("value", "attention_mask", "query_mask", "value_mask", "key_mask", "use_causal_mask",
                     "training")

    def visit(self, visitor, *args):
        return visitor.attention_units(*args)

    def check(self, layer, model_name):
        where = f"Layer '{layer.name}' (MultiHeadAttention) of model '{model_name}'"
        config = layer.get_config()
        if config.get("use_gate"):
            raise ZipError(f"{where} has use_gate=True; tf_mtz zips MultiHeadAttention without the gate.")
        if config.get("output_shape") is not None:
            raise ZipError(f"{where} sets output_shape; tf_mtz zips attention whose outputs are the query's units.")
        for node in range(len(layer._inbound_nodes)):  # Keras internals: the layer's calls
            tensors, keywords = keras_graph.call_arguments(layer, node)
            query = tensors[0]
            key = keywords.get("key")
            value = keywords.get("value", tensors[1] if len(tensors) > 1 else None)
            if key is not None and key is not value:
                raise ZipError(f"{where} is called with a key other than its value; tf_mtz zips self-attention, "
                               "mha(x, x), and cross-attention, mha(x, memory), whose key is its value.")
            unsupported = sorted(k for k, v in keywords.items() if k not in self._CALL_OPTIONS
                                 and v is not None and v is not False)
            if unsupported:
                raise ZipError(f"{where} is called with {unsupported}; tf_mtz zips self-attention with the call "
                               f"options {sorted(self._CALL_OPTIONS)}.")

    @staticmethod
    def reads_memory(layer) -> bool:
        """Whether the layer is cross-attention, `mha(x, memory)`: its key and value read another tensor than
        its query (the graph reader's second parent of the layer)."""
        tensors, keywords = keras_graph.call_arguments(layer, 0)
        value = keywords.get("value", tensors[1] if len(tensors) > 1 else None)
        return value is not tensors[0]

    def _dense(self, layer, part: str):
        return getattr(layer, f"_{part}_dense")  # Keras internals: the projections of MultiHeadAttention

    def _read(self, dense) -> tuple:
        kernel = np.asarray(keras.ops.convert_to_numpy(dense.kernel), np.float32)
        bias = (np.asarray(keras.ops.convert_to_numpy(dense.bias), np.float32) if dense.bias is not None
                else np.zeros(kernel.shape[1:], np.float32))
        return kernel, bias

    def kernel_and_bias(self, layer):
        kernel, bias = self._read(self._dense(layer, "output"))
        heads, dim, outputs = kernel.shape
        return kernel.reshape(heads * dim, outputs), bias

    def attention_weights(self, layer) -> dict:
        """`{"query": (inputs, heads, key_dim), "query_bias": (heads, key_dim), ...}` for query, key, value."""
        weights = {}
        for part in self._PROJECTIONS:
            weights[part], weights[f"{part}_bias"] = self._read(self._dense(layer, part))
        return weights

    def trained_weights(self, layer):
        kernel, bias = self.kernel_and_bias(layer)
        return kernel, bias, self.attention_weights(layer)

    def assign(self, layer, kernel: np.ndarray, bias: np.ndarray, attention: dict) -> None:
        """Sets a built layer's weights from tf_mtz's layout (`kernel_and_bias`, `attention_weights`)."""
        for part in self._PROJECTIONS:
            dense = self._dense(layer, part)
            dense.kernel.assign(attention[part])
            dense.bias.assign(attention[f"{part}_bias"])
        output = self._dense(layer, "output")
        output.kernel.assign(kernel.reshape(tuple(output.kernel.shape)))
        output.bias.assign(bias)

    def layer_weights(self, kernel, bias=None):
        raise NotImplementedError("An attention layer's weights are set with AttentionHandler.assign.")

    def activation(self, layer):
        return "attention"  # not an activation: nothing folds into it or splits it off

    def build_layer(self, template, units, *, use_bias, activation, name):
        del units, use_bias, activation  # its outputs are its query's units; biases kept as they are
        config = dict(template.get_config(), name=name, use_bias=True)
        return type(template).from_config(config)

    def head_blocks(self, kernel: np.ndarray, bias: np.ndarray, attention: dict) -> tuple:
        """Per head and dim, the weights that move together, as columns: `(query/key (heads, features,
        key_dim), value/output (heads, features, value_dim))`: a query/key dim's query and key columns with
        their biases; a value dim's value column, its bias and its row of the output projection."""
        heads = attention["query"].shape[1]
        qk = np.concatenate([np.moveaxis(attention["query"], 0, 1), attention["query_bias"][:, None],
                             np.moveaxis(attention["key"], 0, 1), attention["key_bias"][:, None]], axis=1)
        output = kernel.reshape(heads, -1, kernel.shape[-1])
        vo = np.concatenate([np.moveaxis(attention["value"], 0, 1), attention["value_bias"][:, None],
                             np.moveaxis(output, 2, 1)], axis=1)
        return qk, vo


class Conv2DHandler(UnitLayerHandler):
    """Conv2D, channels last, ungrouped (the graph reader splits a grouped one into one per group).

    Hessian modes: ``"patch"``, the exact Hessian of im2col patches (kh*kw*C + 1 features), and
    ``"channel"``, the reference code's per-offset approximation ((C + 1) features shared by all kh*kw
    kernel offsets, merged bias averaged over offsets).
    """

    hessian_modes = ("channel", "patch")

    def check(self, layer, model_name):
        if layer.data_format != "channels_last":
            raise ZipError(f"Layer '{layer.name}' of model '{model_name}' uses data_format="
                           f"'{layer.data_format}'; tf_mtz supports channels_last convolutions only.")
        if getattr(layer, "groups", 1) != 1:
            # Built-in Conv1D/Conv2D layers are read group by group before any handler sees them; a
            # subclass registered with a handler of its own reaches this.
            raise ZipError(f"Layer '{layer.name}' ({type(layer).__name__}) of model '{model_name}' is a grouped "
                           f"convolution (groups={layer.groups}) with a custom handler; tf_mtz reads grouped "
                           "convolutions group by group only where the built-in Conv1D/Conv2D handler applies.")

    layer_class = keras.layers.Conv2D

    def build_layer(self, template, units, *, use_bias, activation, name):
        return self.layer_class(
            units, template.kernel_size, strides=template.strides, padding=template.padding,
            dilation_rate=template.dilation_rate, use_bias=use_bias, activation=activation, name=name,
            dtype=template.dtype_policy)

    def build_grouped(self, template, units, groups, *, activation, name):
        return self.layer_class(
            units, template.kernel_size, strides=template.strides, padding=template.padding,
            dilation_rate=template.dilation_rate, groups=groups, use_bias=True, activation=activation,
            name=name, dtype=template.dtype_policy)

    def hessian_samples(self, template, x, mode):
        if mode == "channel":
            return tf.reshape(x, (-1, x.shape[-1]))
        kh, kw = template.kernel_size
        patches = tf.image.extract_patches(
            x, sizes=[1, kh, kw, 1], strides=[1, *template.strides, 1],
            rates=[1, *template.dilation_rate, 1], padding=template.padding.upper())
        return tf.reshape(patches, (-1, kh * kw * x.shape[-1]))

    def sample_count(self, template, x, mode):
        if mode == "channel":
            return prod(x.shape[:-1])
        return int(x.shape[0]) * prod(_output_grid(x.shape[1:3], template.kernel_size, template.strides,
                                                     template.dilation_rate, template.padding)[0])

    def hessian_rows(self, template, x, mode, rows):
        if mode == "channel":
            return super().hessian_rows(template, x, mode, rows)
        return _patches_at(x, template.kernel_size, template.strides, template.dilation_rate, template.padding,
                           rows)

    def pre_activations(self, template, x, block, mode):
        if mode == "channel":
            return super().pre_activations(template, x, block, mode)
        kernel = tf.reshape(block[:-1], tuple(template.kernel_size) + (int(x.shape[-1]), int(block.shape[-1])))
        out = tf.nn.convolution(x, kernel, strides=template.strides, padding=template.padding.upper(),
                                dilations=template.dilation_rate) + block[-1]
        return tf.reshape(out, (-1, int(block.shape[-1])))

    def hessian_is_refit_gram(self, template, mode):
        pointwise = all(int(v) == 1 for v in tuple(template.kernel_size) + tuple(template.strides)
                        + tuple(template.dilation_rate))
        return type(self) in (Conv2DHandler, Conv1DHandler) and pointwise

    def input_moments(self, template, x, targets, mode):
        if mode == "channel":
            return None
        return _structured_moments(x, tuple(template.kernel_size), tuple(template.strides),
                                   tuple(template.dilation_rate), template.padding, targets)

    def to_blocks(self, kernel, bias, mode):
        kh, kw, c, n = kernel.shape
        if mode == "channel":
            per_offset = kernel.reshape(kh * kw, c, n)
            bias_rows = np.broadcast_to(bias, (kh * kw, 1, n))
            return np.concatenate([per_offset, bias_rows], axis=1)
        return np.concatenate([kernel.reshape(kh * kw * c, n), bias[None, :]], axis=0)[None]

    def from_blocks(self, blocks, kernel_shape, mode):
        if mode == "channel":
            return blocks[:, :-1].reshape(kernel_shape), blocks[:, -1].mean(axis=0)
        return blocks[0, :-1].reshape(kernel_shape), blocks[0, -1]


class Conv1DHandler(Conv2DHandler):
    """Conv1D, channels last, ungrouped, 'valid' or 'same' padding; same Hessian modes as Conv2D."""

    def check(self, layer, model_name):
        super().check(layer, model_name)
        if layer.padding == "causal":
            raise ZipError(f"Layer '{layer.name}' of model '{model_name}' uses causal padding, which tf_mtz "
                           "does not support yet.")

    layer_class = keras.layers.Conv1D

    def hessian_samples(self, template, x, mode):
        if mode == "channel":
            return super().hessian_samples(template, x, mode)
        (k,), (stride,), (rate,) = template.kernel_size, template.strides, template.dilation_rate
        patches = tf.image.extract_patches(
            x[:, None], sizes=[1, 1, k, 1], strides=[1, 1, stride, 1], rates=[1, 1, rate, 1],
            padding=template.padding.upper())
        return tf.reshape(patches, (-1, k * x.shape[-1]))

    def sample_count(self, template, x, mode):
        if mode == "channel":
            return prod(x.shape[:-1])
        (k,), (stride,), (rate,) = template.kernel_size, template.strides, template.dilation_rate
        return int(x.shape[0]) * prod(_output_grid((1, x.shape[1]), (1, k), (1, stride), (1, rate),
                                                     template.padding)[0])

    def hessian_rows(self, template, x, mode, rows):
        if mode == "channel":
            return tf.gather(tf.reshape(x, (-1, x.shape[-1])), rows)
        (k,), (stride,), (rate,) = template.kernel_size, template.strides, template.dilation_rate
        return _patches_at(x[:, None], (1, k), (1, stride), (1, rate), template.padding, rows)

    def pre_activations(self, template, x, block, mode):
        if mode == "channel":
            return super().pre_activations(template, x, block, mode)
        (k,), (stride,), (rate,) = template.kernel_size, template.strides, template.dilation_rate
        kernel = tf.reshape(block[:-1], (k, int(x.shape[-1]), int(block.shape[-1])))
        out = tf.nn.convolution(x, kernel, strides=stride, padding=template.padding.upper(), dilations=rate)
        return tf.reshape(out + block[-1], (-1, int(block.shape[-1])))

    def input_moments(self, template, x, targets, mode):
        if mode == "channel":
            return None
        (k,), (stride,), (rate,) = template.kernel_size, template.strides, template.dilation_rate
        return _structured_moments(x[:, None], (1, k), (1, stride), (1, rate), template.padding, targets)

    def to_blocks(self, kernel, bias, mode):
        return super().to_blocks(kernel[None], bias, mode)

    def from_blocks(self, blocks, kernel_shape, mode):
        kernel, bias = super().from_blocks(blocks, (1,) + tuple(kernel_shape), mode)
        return kernel[0], bias


class Conv2DTransposeHandler(Conv2DHandler):
    """Conv2DTranspose (decoders, U-Nets), channels last, no dilation or output padding.

    A transposed convolution is the stride-1 convolution, with the kernel flipped in space, of its input
    with (stride - 1) zeros inserted between pixels and the borders padded: its Hessians, moments and
    refit are Conv2D's on that dilated input. Keras keeps its kernel as (kh, kw, filters, inputs); tf_mtz's
    layout is (kh, kw, inputs, filters), converted at the layer boundary.
    """

    layer_class = keras.layers.Conv2DTranspose

    def check(self, layer, model_name):
        super().check(layer, model_name)
        if tuple(layer.dilation_rate) != (1, 1) or getattr(layer, "output_padding", None) is not None:
            raise ZipError(f"Conv2DTranspose '{layer.name}' of model '{model_name}' uses dilation or "
                           "output_padding; tf_mtz supports neither on transposed convolutions yet.")

    def kernel_and_bias(self, layer):
        kernel, bias = super().kernel_and_bias(layer)
        kernel = self.layout_kernel(kernel)
        if bias.shape[0] != kernel.shape[-1]:  # no bias: the zeros must count the filters, Keras' last axis
            bias = np.zeros(kernel.shape[-1], np.float32)  # is the inputs
        return kernel, bias

    def units(self, layer) -> int:
        return int(layer.filters)

    def layer_weights(self, kernel, bias=None):
        return super().layer_weights(np.swapaxes(kernel, -1, -2), bias)

    def layout_kernel(self, kernel):
        return np.swapaxes(kernel, -1, -2)

    def build_grouped(self, template, units, groups, *, activation, name):
        return None  # Keras has no grouped Conv2DTranspose

    def build_layer(self, template, units, *, use_bias, activation, name):
        return keras.layers.Conv2DTranspose(units, template.kernel_size, strides=template.strides,
                                            padding=template.padding, use_bias=use_bias, activation=activation,
                                            name=name, dtype=template.dtype_policy)

    def _equivalent(self, template, x):
        """`(dilated and padded input, stride-1 VALID Conv2D template)` computing the same outputs."""
        (sh, sw), (kh, kw) = template.strides, template.kernel_size
        n, height, width, channels = (int(v) for v in x.shape)
        out_h, out_w = template.compute_output_shape((n, height, width, channels))[1:3]
        dilated = x
        if (sh, sw) != (1, 1):
            spread = tf.pad(x[:, :, None, :, None, :],
                            [[0, 0], [0, 0], [0, sh - 1], [0, 0], [0, sw - 1], [0, 0]])
            dilated = tf.reshape(spread, (n, height * sh, width * sw, channels))[
                :, :(height - 1) * sh + 1, :(width - 1) * sw + 1]
        pads = []
        for size, out, stride, k in ((height, out_h, sh, kh), (width, out_w, sw, kw)):
            # The forward convolution this one transposes pads its input (of size `out`) at the front by
            # `front`; the dilated input is shifted by k - 1 - front to meet the flipped kernel.
            front = max((-(-out // stride) - 1) * stride + k - out, 0) // 2 if template.padding == "same" else 0
            before = k - 1 - front
            pads.append((before, out + k - 1 - before - ((size - 1) * stride + 1)))
        padded = tf.pad(dilated, [[0, 0], list(pads[0]), list(pads[1]), [0, 0]])
        forward = keras.layers.Conv2D(int(template.filters), template.kernel_size, padding="valid")
        return padded, forward

    @staticmethod
    def _flip(kernel: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(kernel[::-1, ::-1])

    def hessian_samples(self, template, x, mode):
        if mode == "channel":
            return super().hessian_samples(template, x, mode)
        padded, forward = self._equivalent(template, x)
        return super().hessian_samples(forward, padded, mode)

    def sample_count(self, template, x, mode):
        if mode == "channel":
            return super().sample_count(template, x, mode)
        return int(x.shape[0]) * prod(template.compute_output_shape(tuple(x.shape))[1:3])

    def hessian_rows(self, template, x, mode, rows):
        if mode == "channel":
            return super().hessian_rows(template, x, mode, rows)
        padded, forward = self._equivalent(template, x)
        return super().hessian_rows(forward, padded, mode, rows)

    def pre_activations(self, template, x, block, mode):
        if mode == "channel":
            return super().pre_activations(template, x, block, mode)
        padded, forward = self._equivalent(template, x)
        return super().pre_activations(forward, padded, block, mode)

    def input_moments(self, template, x, targets, mode):
        if mode == "channel":
            return None
        padded, forward = self._equivalent(template, x)
        return super().input_moments(forward, padded, targets, mode)

    def to_blocks(self, kernel, bias, mode):
        # Patch rows follow the equivalent convolution's flipped kernel; the channel mode has one block per
        # offset, in any order alike for all tasks.
        return super().to_blocks(self._flip(kernel) if mode == "patch" else kernel, bias, mode)

    def from_blocks(self, blocks, kernel_shape, mode):
        kernel, bias = super().from_blocks(blocks, kernel_shape, mode)
        return (self._flip(kernel) if mode == "patch" else kernel), bias


def _output_grid(size, kernel, strides, rates, padding) -> tuple:
    """`((out_h, out_w), (pad_top, pad_bottom), (pad_left, pad_right))` of a convolution, as TensorFlow pads."""
    grid, pads = [], []
    for length, k, stride, rate in zip(size, kernel, strides, rates):
        length, span = int(length), (int(k) - 1) * int(rate) + 1
        if padding == "same":
            out = -(-length // int(stride))
            total = max((out - 1) * int(stride) + span - length, 0)
            pads.append((total // 2, total - total // 2))
        else:
            out = (length - span) // int(stride) + 1
            pads.append((0, 0))
        grid.append(out)
    return tuple(grid), pads[0], pads[1]


def _structured_moments(x, kernel, strides, rates, padding, targets):
    """`(X̃ᵀX̃, X̃ᵀT)` of a channels-last batch's im2col patches by `statistics.patch_moments`, for stride-1
    undilated convolutions where that pays; None otherwise."""
    if tuple(int(k) for k in kernel) == (1, 1):
        # A 1x1 kernel's patches are the input vectors at the strided positions.
        pixels = x[:, ::int(strides[0]), ::int(strides[1])]
        return statistics.vector_moments(tf.reshape(pixels, (-1, int(x.shape[-1]))), targets)
    if any(int(v) != 1 for v in tuple(strides) + tuple(rates)):
        return None
    grid, (top, bottom), (left, right) = _output_grid(x.shape[1:3], kernel, strides, rates, padding)
    if not statistics.structured_patches_pay(grid, kernel):
        return None
    padded = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
    grid_targets = tf.reshape(targets, (int(x.shape[0]),) + tuple(grid) + (int(targets.shape[-1]),))
    return statistics.patch_moments(padded, kernel, grid_targets)


def _patches_at(x, kernel, strides, rates, padding, rows) -> tf.Tensor:
    """The im2col patches (`extract_patches` order: kernel row, kernel column, channel) of a channels-last
    batch at the flattened output positions `rows` only: one gather per kernel offset, so a subset of
    patches costs its own size rather than all of them."""
    (out_h, out_w), (top, bottom), (left, right) = _output_grid(x.shape[1:3], kernel, strides, rates, padding)
    padded = tf.pad(x, [[0, 0], [top, bottom], [left, right], [0, 0]])
    height, width, channels = int(padded.shape[1]), int(padded.shape[2]), int(padded.shape[3])
    flat = tf.reshape(padded, (-1, channels))
    image, position = np.divmod(np.asarray(rows, np.int64), out_h * out_w)
    row, column = np.divmod(position, out_w)
    origin = image * height * width + row * int(strides[0]) * width + column * int(strides[1])
    offsets = [i * int(rates[0]) * width + j * int(rates[1]) for i in range(kernel[0]) for j in range(kernel[1])]
    return tf.concat([tf.gather(flat, origin + offset) for offset in offsets], axis=1)


class ChannelUnitsHandler(LayerHandler):
    """Base of layers with per-unit weights that follow their input's units (one weight slice per unit).

    Paired units get one merged slice: the average of the tasks' (the first task's with merge="first").
    `channel_axis` is the kernel axis that indexes units; `partial_sharing` says whether the layer can run
    on the shared and the specific units separately.
    """

    channel_axis = -1
    partial_sharing = True

    def visit(self, visitor, *args):
        return visitor.channel_units(*args)

    def check_between_units(self, layer, model_name):
        pass

    def channel_index(self, units) -> tuple:
        """Index of `units` (a slice or index array) along the unit axis of the kernel."""
        return (Ellipsis, units) + (slice(None),) * (-1 - self.channel_axis)

    def kernel_and_bias(self, layer) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def activation(self, layer):
        return "linear"

    def build_layer(self, template, *, name: str):
        """A new layer like `template` whose weights are `layer_weights(kernel, bias)`."""
        raise NotImplementedError

    def layer_weights(self, template, kernel: np.ndarray, bias: np.ndarray) -> list:
        """The weights of a layer from `build_layer` holding these per-unit weights (kernel first, bias
        second: retraining reads them back in that order)."""
        return [kernel, bias]

    def permuted_weights(self, layer, weights: list, order: np.ndarray) -> list | None:
        """`weights` (the model layer's own, `layer.get_weights()`) with its units in `order`, or None where
        their layout is unknown: what `tf_mtz.testing.permuted_copy` sets. By default each weight is permuted
        along its last axis where that axis has one value per unit and no other axis as many (LayerScale's γ,
        a (2, units) scale and shift); override for other layouts."""
        units = order.size
        if not all(w.ndim >= 1 and w.shape[-1] == units and units not in w.shape[:-1] for w in weights):
            return None
        return [w[..., order] for w in weights]


class DepthwiseHandler(ChannelUnitsHandler):
    """DepthwiseConv2D (depth_multiplier 1): per-channel kernels; a BatchNormalization after it is folded
    in, so the rebuilt layer always has a bias."""

    channel_axis = -2

    def check(self, layer, model_name):
        if layer.depth_multiplier != 1:
            raise ZipError(f"DepthwiseConv2D '{layer.name}' of model '{model_name}' has depth_multiplier="
                           f"{layer.depth_multiplier}; tf_mtz supports depth_multiplier=1.")
        if layer.data_format != "channels_last":
            raise ZipError(f"Layer '{layer.name}' of model '{model_name}' uses data_format="
                           f"'{layer.data_format}'; tf_mtz supports channels_last convolutions only.")

    def kernel_and_bias(self, layer):
        kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel), np.float32)
        bias = (np.asarray(keras.ops.convert_to_numpy(layer.bias), np.float32) if layer.use_bias
                else np.zeros(kernel.shape[-2], np.float32))
        return kernel, bias

    def activation(self, layer):
        return keras.activations.serialize(layer.activation)

    def build_layer(self, template, *, name: str):
        return keras.layers.DepthwiseConv2D(
            template.kernel_size, strides=template.strides, padding=template.padding,
            dilation_rate=template.dilation_rate, use_bias=True, activation=template.activation, name=name,
            dtype=template.dtype_policy)


class GroupedDepthwiseHandler(DepthwiseHandler):
    """Conv2D(groups=C) on C channels with C filters (ConvNeXt's depthwise convolutions): one kernel per
    channel, exactly a DepthwiseConv2D, which the zipped model uses (a native TFLite operation).

    Keras keeps its kernel as (kh, kw, 1, C); as a depthwise kernel it is (kh, kw, C, 1)."""

    def check(self, layer, model_name):
        if layer.data_format != "channels_last":
            raise ZipError(f"Layer '{layer.name}' of model '{model_name}' uses data_format="
                           f"'{layer.data_format}'; tf_mtz supports channels_last convolutions only.")

    def kernel_and_bias(self, layer):
        kernel = np.swapaxes(np.asarray(keras.ops.convert_to_numpy(layer.kernel), np.float32), -1, -2)
        bias = (np.asarray(keras.ops.convert_to_numpy(layer.bias), np.float32) if layer.use_bias
                else np.zeros(kernel.shape[-2], np.float32))
        return kernel, bias


def is_depthwise_grouped(layer) -> bool:
    """A Conv2D whose groups each hold one input channel and one filter: a depthwise convolution."""
    if not isinstance(layer, keras.layers.Conv2D) or getattr(layer, "groups", 1) == 1:
        return False
    kernel_inputs = int(layer.kernel.shape[-2]) if getattr(layer, "kernel", None) is not None else None
    return kernel_inputs == 1 and int(layer.filters) == int(layer.groups)


class LayerNormalizationHandler(ChannelUnitsHandler):
    """LayerNormalization over the last axis: γ and β per unit, but the statistics mix all units, so a
    layer's units must be shared all or none."""

    partial_sharing = False

    def check(self, layer, model_name):
        if not normalises_last_axis(layer):
            axis = layer.axis if isinstance(layer.axis, int) else tuple(layer.axis)
            raise ZipError(f"LayerNormalization '{layer.name}' of model '{model_name}' normalises axis {axis}; "
                           "tf_mtz supports normalising the last axis only.")
        if getattr(layer, "rms_scaling", False):
            raise ZipError(f"LayerNormalization '{layer.name}' of model '{model_name}' uses rms_scaling, which "
                           "tf_mtz does not support.")

    def kernel_and_bias(self, layer):
        units = int(layer.input.shape[-1])
        gamma = (np.asarray(keras.ops.convert_to_numpy(layer.gamma), np.float32) if layer.scale
                 else np.ones(units, np.float32))
        beta = (np.asarray(keras.ops.convert_to_numpy(layer.beta), np.float32) if layer.center
                else np.zeros(units, np.float32))
        return gamma, beta

    def build_layer(self, template, *, name: str):
        return keras.layers.LayerNormalization(axis=-1, epsilon=template.epsilon, center=True, scale=True,
                                               name=name, dtype=template.dtype_policy)


class LayerScaleHandler(ChannelUnitsHandler):
    """ConvNeXt's LayerScale, y = γ·x per channel: a 1x1 DepthwiseConv2D (a standard layer) in the zipped
    model. The README shows it as the example of a handler for a layer tf_mtz does not know."""

    channel_axis = -2  # the depthwise kernel's channel axis: (1, 1, C, 1)

    def kernel_and_bias(self, layer):
        gamma = np.asarray(keras.ops.convert_to_numpy(layer.gamma), np.float32)
        return gamma.reshape(1, 1, -1, 1), np.zeros_like(gamma)

    def build_layer(self, template, *, name: str):
        return keras.layers.DepthwiseConv2D(1, use_bias=True, name=name, dtype=template.dtype_policy)


class PositionEmbeddingHandler(ChannelUnitsHandler):
    """A learnt table of one vector per sequence position, on a `(batch, positions, units)` stream: the layer
    returns `x + P` (`adds_input=True`, a ViT's or a Keras example's position embedding) or `P` broadcast to
    `x`'s shape (`adds_input=False`, keras-hub's `PositionEmbedding`, which the model then adds). Column u of
    the table belongs to unit u of the stream, so paired units get the average column.

    The zipped model computes it with standard layers (`PositionTable`: an `Embedding` of the positions
    0…T−1 read off the stream, added to it). A table longer than the model's sequence is cut to its length.

    Args:
        table: the name of the layer's weight holding the table, `(positions, units)`.
        adds_input: whether the layer adds the table to its input or returns the table alone.

    Example:

    ```python
    class PositionEmbedding(keras.layers.Layer):  # y = x + P
        def build(self, input_shape):
            self.table = self.add_weight(shape=tuple(input_shape[1:]), name="table")
        def call(self, x):
            return x + self.table

    tf_mtz.register_layer_handler(PositionEmbedding, tf_mtz.PositionEmbeddingHandler("table"))
    ```
    """

    def __init__(self, table: str = "position_embeddings", adds_input: bool = True):
        self.table, self.adds_input = table, bool(adds_input)

    def _where(self, layer, model_name) -> str:
        return f"Layer '{layer.name}' ({type(layer).__name__}) of model '{model_name}'"

    def check(self, layer, model_name):
        shape = tuple(layer.input.shape) if _has_input(layer) else None
        if shape is None or len(shape) != 3 or shape[1] is None:
            raise ZipError(f"{self._where(layer, model_name)} reads a tensor of shape {shape}; tf_mtz zips "
                           "position embeddings on (batch, positions, units) sequences of a fixed length.")
        table = getattr(layer, self.table, None)
        if table is None or len(table.shape) != 2:
            raise ZipError(f"{self._where(layer, model_name)} has no 2-D weight '{self.table}' holding its table; "
                           "give PositionEmbeddingHandler the name of the (positions, units) weight.")
        if int(table.shape[0]) < shape[1] or int(table.shape[1]) != shape[2]:
            raise ZipError(f"{self._where(layer, model_name)} holds a {tuple(table.shape)} table for a sequence "
                           f"of {shape[1]} positions and {shape[2]} units.")

    def kernel_and_bias(self, layer):
        positions = int(layer.input.shape[1])
        table = np.asarray(keras.ops.convert_to_numpy(getattr(layer, self.table)), np.float32)[:positions]
        return table, np.zeros(table.shape[-1], np.float32)

    def build_layer(self, template, *, name: str):
        return PositionTable(int(template.input.shape[1]), self.adds_input, name, template.dtype_policy)

    def layer_weights(self, template, kernel, bias):
        return [kernel]  # the table has no bias: `kernel_and_bias` gives zeros

    def permuted_weights(self, layer, weights, order):
        table = getattr(layer, self.table)
        return [w[..., order] if variable is table else w for variable, w in zip(layer.weights, weights)]


class ClassTokenHandler(PositionEmbeddingHandler):
    """A learnt vector put before a `(batch, positions, units)` sequence (a ViT's class token): `[c; x]`.

    The zipped model pads the sequence with one zero position and adds the table `[c; 0; …; 0]`
    (`PositionTable` with `prepend=1`), so it needs no custom layer; retraining may then move the zero rows,
    which act as a position embedding.

    Args:
        token: the name of the layer's weight holding the token (`(units,)`, `(1, units)` or `(1, 1, units)`).
    """

    def __init__(self, token: str = "token"):
        super().__init__(table=token, adds_input=True)

    def check(self, layer, model_name):
        shape = tuple(layer.input.shape) if _has_input(layer) else None
        if shape is None or len(shape) != 3 or shape[1] is None:
            raise ZipError(f"{self._where(layer, model_name)} reads a tensor of shape {shape}; tf_mtz zips class "
                           "tokens on (batch, positions, units) sequences of a fixed length.")
        token = getattr(layer, self.table, None)
        if token is None or int(np.prod(token.shape)) != shape[2]:
            raise ZipError(f"{self._where(layer, model_name)} has no weight '{self.table}' of {shape[2]} values "
                           "holding its token; give ClassTokenHandler the name of that weight.")

    def kernel_and_bias(self, layer):
        positions = int(layer.input.shape[1])
        token = np.asarray(keras.ops.convert_to_numpy(getattr(layer, self.table)), np.float32).reshape(1, -1)
        return np.concatenate([token, np.zeros((positions, token.shape[1]), np.float32)]), np.zeros(
            token.shape[1], np.float32)

    def build_layer(self, template, *, name: str):
        return PositionTable(int(template.input.shape[1]) + 1, True, name, template.dtype_policy, prepend=1)


class PositionTable:
    """`x + P` (or `P` alone, broadcast over the batch) for a `(batch, positions, units)` stream, written with
    standard Keras layers and operations: the positions 0…T−1 are counted off the stream (`cumsum` of ones),
    an `Embedding(T, units)` looks them up, an `Add` adds them. `prepend` zero positions are put before
    the sequence first (a class token's place). What a `PositionEmbeddingHandler` layer is in the zipped
    model; built on the first call, its weights are the table alone.

    Not a Keras layer itself, so that nothing custom reaches the zipped model (as `ChannelSlice`).
    """

    def __init__(self, positions: int, adds_input: bool, name: str, dtype=None, prepend: int = 0):
        self.positions, self.adds_input, self.name, self.prepend = int(positions), adds_input, name, int(prepend)
        self.dtype = dtype
        self.embedding = None
        self.calls = 0  # the shared part's table is called once per distinct input: its helpers need new names

    @property
    def weights(self) -> list:
        return [] if self.embedding is None else self.embedding.weights

    def build(self, input_shape) -> None:
        if self.embedding is None:
            self.embedding = keras.layers.Embedding(self.positions, int(input_shape[-1]), name=f"{self.name}_table",
                                                    dtype=self.dtype)
            self.embedding.build((None, self.positions))

    def __call__(self, x, training=None):
        del training
        self.build(tuple(x.shape))
        suffix = f"_{self.calls}" if self.calls else ""
        self.calls += 1
        if self.prepend:
            x = keras.layers.ZeroPadding1D((self.prepend, 0), name=f"{self.name}_pad{suffix}")(x)
        counted = keras.ops.cumsum(keras.ops.ones_like(x[:, :, 0], dtype="int32"), axis=1)
        table = self.embedding(counted - 1)
        return keras.layers.Add(name=f"{self.name}_add{suffix}")([x, table]) if self.adds_input else table

    def set_weights(self, weights: list) -> None:
        self.embedding.set_weights(weights)

    def get_weights(self) -> list:
        return self.embedding.get_weights()


class InferenceIdentityHandler(PassThroughHandler):
    """Layers that are the identity at inference (ConvNeXt's stochastic depth): left out of the zipped
    model, which therefore trains without them."""

    def apply_to_part(self, layer, x, name):
        return x


def normalises_last_axis(layer) -> bool:
    """Whether a normalisation layer normalises the channel (last) axis only."""
    axis = layer.axis if isinstance(layer.axis, int) else tuple(layer.axis)
    if isinstance(axis, tuple):
        if len(axis) != 1:
            return False
        axis = axis[0]
    rank = len(layer.input.shape) if _has_input(layer) else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def batch_norm_affine(layer) -> tuple[np.ndarray, np.ndarray]:
    """The per-unit `(scale, shift)` (float64) a BatchNormalization applies at inference:
    γ/√(σ²+ε) and β − μ·γ/√(σ²+ε)."""
    units = int(np.shape(keras.ops.convert_to_numpy(layer.moving_mean))[0])
    gamma = np.asarray(keras.ops.convert_to_numpy(layer.gamma), np.float64) if layer.scale else np.ones(units)
    beta = np.asarray(keras.ops.convert_to_numpy(layer.beta), np.float64) if layer.center else np.zeros(units)
    mean = np.asarray(keras.ops.convert_to_numpy(layer.moving_mean), np.float64)
    variance = np.asarray(keras.ops.convert_to_numpy(layer.moving_variance), np.float64)
    scale = gamma / np.sqrt(variance + layer.epsilon)
    return scale, beta - mean * scale


class BatchNormalizationHandler(ChannelUnitsHandler):
    """A BatchNormalization that cannot be folded into the layer before it (pre-activation networks, BN
    after a merge or a pooling): a per-unit affine map y = a·x + b, a = γ/√(σ²+ε), b = β − μ·a, whose
    paired units get the average map. The zipped model keeps it as a BatchNormalization with zero mean
    and unit variance (so it computes exactly a·x + b), frozen: it always runs in inference mode."""

    def check(self, layer, model_name):
        if not normalises_last_axis(layer):
            raise ZipError(f"BatchNormalization '{layer.name}' of model '{model_name}' normalises axis "
                           f"{layer.axis}; tf_mtz supports normalising the channel (last) axis only.")

    def kernel_and_bias(self, layer):
        scale, shift = batch_norm_affine(layer)
        return scale.astype(np.float32), shift.astype(np.float32)

    def build_layer(self, template, *, name: str):
        return keras.layers.BatchNormalization(axis=-1, epsilon=template.epsilon, center=True, scale=True,
                                               trainable=False, name=name, dtype=template.dtype_policy)

    def layer_weights(self, template, kernel, bias):
        # Mean 0 and variance 1 - ε make the normalisation divide by √1: the layer is a·x + b exactly.
        return [kernel, bias, np.zeros_like(kernel), np.full_like(kernel, 1.0 - template.epsilon)]


class MergeHandler(LayerHandler):
    """Element-wise merges of same-shaped features (Add, Subtract, Multiply, Average, Maximum, Minimum).

    Their inputs' units are tied together: one unit order for all of them, which the zipper pairs once.
    """

    def visit(self, visitor, *args):
        return visitor.merge(*args)

    def check_between_units(self, layer, model_name):
        pass

    def apply_to_parts(self, layer, xs: list, name: str):
        return copy_layer(layer, name)(xs)


class ConcatenateHandler(LayerHandler):
    """Concatenate along the channel (last) axis: the output's units are its inputs' units side by side.

    The zipped model concatenates the inputs' shared parts and, separately, their specific parts, so the
    next layer's rows are re-indexed to [every input's shared units, every input's specific units].
    """

    def visit(self, visitor, *args):
        return visitor.concatenate(*args)

    def check(self, layer, model_name):
        rank = len(layer.output.shape) if _has_input(layer) else None
        if layer.axis != -1 and (rank is None or layer.axis != rank - 1):
            raise ZipError(f"Concatenate '{layer.name}' of model '{model_name}' joins along axis {layer.axis}; "
                           "tf_mtz supports concatenating channels (the last axis) only.")

    def check_between_units(self, layer, model_name):
        pass

    def apply_to_parts(self, layer, xs: list, name: str):
        if len(xs) == 1:
            return xs[0]
        return keras.layers.Concatenate(axis=-1, name=name)(xs)


class ChannelSlice:
    """Channels `[start, stop)` of a feature: how tf_mtz reads one group of a grouped convolution, whose
    filters see only their group's input channels (`graph` writes such a convolution as one slice and one
    ungrouped convolution per group, side by side).

    Not a Keras layer, so that nothing custom reaches the zipped model: it slices tensors
    (`channel_slice`), which Keras records as a standard operation. `cuts` are the channel offsets of
    all the groups it was made with (0 first), so that the input's units can be cut at all of them at once.
    """

    def __init__(self, start: int, stop: int, cuts: tuple, name: str):
        self.start, self.stop, self.cuts, self.name = int(start), int(stop), tuple(int(c) for c in cuts), name
        self.weights = []

    def __call__(self, x, training=None):
        del training
        return channel_slice(x, self.start, self.stop)

    def get_config(self) -> dict:
        return {"name": self.name, "start": self.start, "stop": self.stop, "cuts": list(self.cuts)}

    @classmethod
    def from_config(cls, config: dict) -> "ChannelSlice":
        return cls(config["start"], config["stop"], tuple(config["cuts"]), config["name"])

    def get_weights(self) -> list:
        return []


def channel_slice(x, start: int, stop: int):
    """`x[..., start:stop]` written with one slice per axis: an Ellipsis does not survive tf_keras's
    serialisation of slices (tfmot's cloning turned it into new axes)."""
    return x[(slice(None),) * (len(x.shape) - 1) + (slice(start, stop),)]


class SliceHandler(LayerHandler):
    """A `ChannelSlice`: its units are a run of its input's units, which must be a whole number of that
    input's unit spaces (the graph reader cuts the layers producing them where they are not)."""

    def visit(self, visitor, *args):
        return visitor.select(*args)

    def check_between_units(self, layer, model_name):
        pass


class ChannelwiseHandler(PassThroughHandler):
    """Pooling, dropout and element-wise activations: safe on any subset of units."""


# keras.ops whose output unit depends on the same input unit alone (and on scalar constants), by the names
# of their Operation classes; softmax-like and reducing ops are not among them.
UNIT_WISE_OPERATIONS = frozenset({
    "Relu", "Relu6", "Sigmoid", "Softplus", "Softsign", "SoftShrink", "SparsePlus", "Silu", "Squareplus",
    "LogSigmoid", "LeakyRelu", "HardSigmoid", "HardSilu", "Elu", "Selu", "Gelu", "Celu", "TanhShrink",
    "HardTanh", "HardShrink", "Threshold", "Absolute", "Fabs", "Negative", "Square", "Sqrt", "Cbrt", "Exp",
    "Exp2", "Expm1", "Log", "Log1p", "Log2", "Log10", "Sign", "Clip", "Round", "Floor", "Ceil", "Trunc",
    "Tanh", "Sinh", "Cosh", "Sin", "Cos", "Arctan", "Reciprocal", "Copy", "NanToNum",
    "Add", "Subtract", "Multiply", "Divide", "TrueDivide", "DivideNoNan", "Power", "Maximum", "Minimum",
    "Fmax", "Fmin", "Mod", "FloorDivide"})


class OperationHandler(ChannelwiseHandler):
    """A keras.ops call on one tensor written in the graph (`x + 3.0`, `keras.ops.relu6(x)`, the pieces of
    hard-swish): applied unit by unit like an activation when the operation is unit-wise and its other
    arguments are scalars. On the model inputs alone (an attention mask from the token ids) any operation
    is replayed as it is."""

    def check_between_units(self, layer, model_name):
        _check_unit_wise(layer, model_name)


class OperationMergeHandler(MergeHandler):
    """A keras.ops call combining several tensors element-wise (`x * gate`, `a + b`): their units are tied,
    like a Multiply or Add layer's inputs; a gate of shape (1, 1, C) broadcasts over the feature map."""

    def check_between_units(self, layer, model_name):
        _check_unit_wise(layer, model_name)
        channels = {shape[-1] if shape else None for shape in layer.tensor_shapes()}
        if len(channels) != 1:
            raise ZipError(
                f"Operation '{layer.name}' ({layer.operation_name}) of model '{model_name}' combines tensors "
                f"with {sorted(map(str, channels))} channels; tf_mtz ties units of element-wise operations "
                "only where every tensor has the same last axis (broadcasting over the other axes).")


def keeps_last_axis(layer) -> bool:
    """Whether an indexing operation (`h[:, 0]`, a ViT's class-token readout) leaves the last axis whole:
    it then picks positions, never units, and is applied unit by unit."""
    if layer.operation_name != "GetItem" or layer.tensor_count != 1 or len(layer.arguments.args) != 2:
        return False
    key = layer.arguments.args[1]
    key = key if isinstance(key, tuple) else (key,)
    if any(isinstance(k, keras.KerasTensor) for k in key):
        return False
    if Ellipsis in key:
        return key.index(Ellipsis) == len(key) - 1
    entries = [k for k in key if k is not None]
    rank = len(layer.tensor_shapes()[0])
    return len(entries) < rank or (len(entries) == rank and entries[-1] == slice(None))


def _check_unit_wise(layer, model_name: str) -> None:
    if keeps_last_axis(layer):
        return
    if layer.operation_name not in UNIT_WISE_OPERATIONS:
        raise ZipError(
            f"Operation '{layer.name}' ({layer.operation_name}) of model '{model_name}' is a keras.ops call in the "
            "graph that tf_mtz cannot apply unit by unit; supported operations act on each unit alone "
            f"({', '.join(sorted(UNIT_WISE_OPERATIONS))}). Write the computation with Keras layers, or "
            "register a handler for a custom layer that performs it.")
    for value in layer.constants():
        if hasattr(value, "shape") and int(np.prod(np.shape(value))) > 1:
            raise ZipError(
                f"Operation '{layer.name}' ({layer.operation_name}) of model '{model_name}' uses a constant of "
                f"shape {tuple(np.shape(value))}; tf_mtz applies operations unit by unit with scalar constants "
                "only (a per-unit constant would need permuting): use a layer with weights instead.")


class InputOnlyHandler(PassThroughHandler):
    """Preprocessing (Rescaling, Normalization): allowed before the first Dense/Conv2D layer only, where
    every task sees the same input and the layer is replayed as it is, weights included."""

    channelwise = False

    def check_between_units(self, layer, model_name):
        raise ZipError(f"Layer '{layer.name}' ({type(layer).__name__}) of model '{model_name}' is supported "
                       "only before the first Dense/Conv2D layer.")


class SoftmaxHandler(PassThroughHandler):
    """Softmax mixes units: allowed after a head only (the zipper checks where it sits)."""

    channelwise = False


class FlattenHandler(PassThroughHandler):
    """Flatten keeps channels last, so unit c at position p lands on row p * C + c of the next kernel."""

    channelwise = False

    def apply_to_part(self, layer, x, name):
        return keras.layers.Flatten(name=name)(x)


class ReshapeHandler(PassThroughHandler):
    """Reshape that keeps the channel axis last, or flattens to one axis; anything else mixes units."""

    channelwise = False

    def check_between_units(self, layer, model_name):
        target = tuple(layer.target_shape)
        in_shape = tuple(layer.input.shape[1:]) if _has_input(layer) else None
        if in_shape is None or len(target) == 1 or target[-1] == in_shape[-1]:
            return
        raise ZipError(
            f"Layer '{layer.name}' of model '{model_name}' reshapes {in_shape} to {target}, which mixes "
            "channels; tf_mtz supports Reshape only when it keeps the last axis or flattens to one axis.")

    def apply_to_part(self, layer, x, name):
        target = tuple(layer.target_shape)
        if len(target) == 1:
            return keras.layers.Flatten(name=name)(x)
        return keras.layers.Reshape(target[:-1] + (x.shape[-1],), name=name)(x)


def _has_input(layer) -> bool:
    try:
        layer.input
        return True
    except (AttributeError, ValueError):
        return False


_REGISTRY: dict[type, LayerHandler] = {}


def register_layer_handler(layer_class: type, handler: LayerHandler) -> None:
    """Registers how tf_mtz treats a Keras layer class (built-in or custom).

    The most specific registered class wins, so a handler for a subclass overrides its parent's.

    Args:
        layer_class: a `keras.layers.Layer` subclass.
        handler: a `UnitLayerHandler` (layers with shareable output units) or `PassThroughHandler`
            (weightless layers applied to every unit alike).

    Raises:
        TypeError: if `layer_class` is not a Keras layer class or `handler` is not a `LayerHandler`.

    Example:

    ```python
    class MyDropout(keras.layers.Dropout):
        pass

    tf_mtz.register_layer_handler(MyDropout, tf_mtz.registry.ChannelwiseHandler())
    ```
    """
    if not (isinstance(layer_class, type) and issubclass(layer_class, keras.layers.Layer)):
        raise TypeError(f"register_layer_handler expects a keras.layers.Layer subclass, got {layer_class!r}.")
    if not isinstance(handler, LayerHandler) or type(handler).visit is LayerHandler.visit:
        raise TypeError(f"handler must be a UnitLayerHandler or PassThroughHandler, got {handler!r}.")
    _REGISTRY[layer_class] = handler


def unregister_layer_handler(layer_class: type) -> LayerHandler:
    """Removes the handler registered for `layer_class` (its subclasses fall back to their nearest base).

    Args:
        layer_class: a class given to `register_layer_handler` before.

    Returns:
        The handler that was registered.

    Raises:
        KeyError: nothing is registered for exactly that class.

    Example:

    ```python
    tf_mtz.register_layer_handler(MyDropout, tf_mtz.registry.ChannelwiseHandler())
    tf_mtz.unregister_layer_handler(MyDropout)
    ```
    """
    if layer_class not in _REGISTRY:
        raise KeyError(f"No handler is registered for {getattr(layer_class, '__name__', layer_class)!r}.")
    return _REGISTRY.pop(layer_class)


def handler_for(layer) -> LayerHandler | None:
    """Returns the handler registered for `layer`'s class or its nearest registered base class (for a
    keras.ops call in the graph, the handler of element-wise operations on one tensor or several). keras-hub's
    layers get theirs when keras-hub is in use (`tf_mtz.keras_hub_layers`)."""
    if type(layer).__module__.startswith("keras_hub"):
        from tf_mtz import keras_hub_layers  # noqa: F401  registers keras-hub's handlers on first use
    if isinstance(layer, keras_graph.OperationCall):
        return _OPERATION_MERGE if layer.tensor_count > 1 else _OPERATION
    if isinstance(layer, ChannelSlice):
        return _SLICE
    if is_depthwise_grouped(layer) and _REGISTRY.get(type(layer)) is _REGISTRY.get(keras.layers.Conv2D):
        return _GROUPED_DEPTHWISE
    for cls in type(layer).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def supported_layer_names() -> list[str]:
    # SeparableConv2D is read as its depthwise and pointwise parts, so it needs no handler of its own.
    return sorted([cls.__name__ for cls in _REGISTRY] + ["SeparableConv2D"])


_OPERATION, _OPERATION_MERGE = OperationHandler(), OperationMergeHandler()
_GROUPED_DEPTHWISE = GroupedDepthwiseHandler()
_SLICE = SliceHandler()
_LAYER_SCALE, _STOCHASTIC_DEPTH = keras_graph.convnext_layers()
if _LAYER_SCALE is not None:
    register_layer_handler(_LAYER_SCALE, LayerScaleHandler())
if _STOCHASTIC_DEPTH is not None:
    register_layer_handler(_STOCHASTIC_DEPTH, InferenceIdentityHandler())
_channelwise = ChannelwiseHandler()
for _cls in (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D, keras.layers.Dropout,
             keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU, keras.layers.SpatialDropout2D,
             keras.layers.GaussianNoise, keras.layers.GaussianDropout, keras.layers.AlphaDropout,
             keras.layers.Identity, keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D,
             keras.layers.ZeroPadding2D, keras.layers.Cropping2D, keras.layers.UpSampling2D,
             keras.layers.MaxPooling1D, keras.layers.AveragePooling1D, keras.layers.GlobalAveragePooling1D,
             keras.layers.GlobalMaxPooling1D, keras.layers.ZeroPadding1D):
    register_layer_handler(_cls, _channelwise)
register_layer_handler(keras.layers.Activation, ChannelwiseHandler())
register_layer_handler(keras.layers.Softmax, SoftmaxHandler())
for _cls in (keras.layers.Rescaling, keras.layers.Normalization):
    register_layer_handler(_cls, InputOnlyHandler())
register_layer_handler(keras.layers.Flatten, FlattenHandler())
register_layer_handler(keras.layers.Reshape, ReshapeHandler())
register_layer_handler(keras.layers.Dense, DenseHandler())
register_layer_handler(keras.layers.Embedding, EmbeddingHandler())
for _cls in (keras.layers.SimpleRNN, keras.layers.LSTM, keras.layers.GRU, keras.layers.Bidirectional):
    register_layer_handler(_cls, RecurrentHandler())
register_layer_handler(keras.layers.MultiHeadAttention, AttentionHandler())
register_layer_handler(keras.layers.Conv2D, Conv2DHandler())
register_layer_handler(keras.layers.Conv2DTranspose, Conv2DTransposeHandler())
register_layer_handler(keras.layers.Conv1D, Conv1DHandler())
register_layer_handler(keras.layers.DepthwiseConv2D, DepthwiseHandler())
register_layer_handler(keras.layers.LayerNormalization, LayerNormalizationHandler())
register_layer_handler(keras.layers.BatchNormalization, BatchNormalizationHandler())
for _cls in (keras.layers.Add, keras.layers.Subtract, keras.layers.Multiply, keras.layers.Average,
             keras.layers.Maximum, keras.layers.Minimum):
    register_layer_handler(_cls, MergeHandler())
register_layer_handler(keras.layers.Concatenate, ConcatenateHandler())


def has_units(handler: LayerHandler) -> bool:
    """Whether the handler's layers have output units of their own to share (Dense, Conv)."""
    return isinstance(handler, UnitLayerHandler)


def mixes_units(layer) -> bool:
    """True for layers that combine several units into one (softmax): allowed only after a head."""
    handler = handler_for(layer)
    if isinstance(handler, SoftmaxHandler):
        return True
    return isinstance(layer, keras.layers.Activation) and _activation_name(layer) == "softmax"


def prod(shape) -> int:
    return int(math.prod(int(s) for s in shape))

