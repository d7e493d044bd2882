"""keras-hub's layers, through the registry as a user's custom layers would come (keras-hub stays optional:
this module is imported by `registry.handler_for` only when it meets a keras-hub layer).

* `PositionEmbedding` returns its table broadcast to its input's shape: a `PositionEmbeddingHandler` with
  `adds_input=False`.
* `TokenAndPositionEmbedding` and `TransformerEncoder` are made of standard layers (an Embedding and a
  PositionEmbedding; a MultiHeadAttention, LayerNormalizations, Dense and Dropout layers): `CompositeHandler`s
  that call those sublayers as the keras-hub layer's own call does, so the graph reader zips them one by one.

The sublayers are keras-hub's private attributes (`_self_attention_layer`, ...), read here and only here.
"""

from __future__ import annotations

import keras
import keras_hub

from tf_mtz import registry
from tf_mtz.errors import ZipError


class TokenAndPositionEmbeddingHandler(registry.CompositeHandler):
    """Token embedding plus position embedding: `Add([token_embedding(ids), position_embedding(...)])`."""

    def check(self, layer, model_name):
        if getattr(layer.token_embedding, "mask_zero", False):
            raise ZipError(
                f"Layer '{layer.name}' (TokenAndPositionEmbedding) of model '{model_name}' has mask_zero=True; keras-hub "
                "hands that mask to the layers after it at run time only, where tf_mtz cannot see it. Build it with "
                "mask_zero=False and give the encoders the mask explicitly: padding_mask=keras.ops.not_equal(ids, 0).")

    def expand(self, layer, inputs, start_index=0, positions=None):
        if not isinstance(start_index, int) or start_index != 0 or positions is not None:
            raise ZipError(f"Layer '{layer.name}' (TokenAndPositionEmbedding) is called with start_index or positions; "
                           "tf_mtz zips position embeddings from position 0.")
        tokens = layer.token_embedding(inputs)
        return keras.layers.Add(name="sum")([tokens, layer.position_embedding(tokens)])


class TransformerEncoderHandler(registry.CompositeHandler):
    """keras-hub's encoder block, pre-LN (`normalize_first`) or post-LN, with its padding or attention mask."""

    def expand(self, layer, inputs, padding_mask=None, attention_mask=None, training=None,
               return_attention_scores=False):
        del training
        if return_attention_scores:
            raise ZipError(f"Layer '{layer.name}' (TransformerEncoder) returns its attention scores; tf_mtz zips "
                           "encoders that return their outputs only.")
        mask = None
        if padding_mask is not None:
            mask = keras.ops.expand_dims(padding_mask, axis=1)  # every query sees the same keys
        if attention_mask is not None:
            mask = attention_mask if mask is None else keras.ops.logical_and(
                keras.ops.cast(mask, "bool"), keras.ops.cast(attention_mask, "bool"))
        norm_first = layer.normalize_first
        x = inputs
        y = layer._self_attention_layer_norm(x) if norm_first else x  # keras-hub internals: its sublayers
        options = {} if mask is None else {"attention_mask": mask}
        y = layer._self_attention_layer(y, y, **options)
        x = keras.layers.Add(name="attention_residual")([layer._self_attention_dropout(y), x])
        if not norm_first:
            x = layer._self_attention_layer_norm(x)
        y = layer._feedforward_layer_norm(x) if norm_first else x
        y = layer._feedforward_output_dense(layer._feedforward_intermediate_dense(y))
        x = keras.layers.Add(name="feedforward_residual")([layer._feedforward_dropout(y), x])
        return x if norm_first else layer._feedforward_layer_norm(x)


registry.register_layer_handler(keras_hub.layers.PositionEmbedding,
                                registry.PositionEmbeddingHandler("position_embeddings", adds_input=False))
registry.register_layer_handler(keras_hub.layers.TokenAndPositionEmbedding, TokenAndPositionEmbeddingHandler())
registry.register_layer_handler(keras_hub.layers.TransformerEncoder, TransformerEncoderHandler())
