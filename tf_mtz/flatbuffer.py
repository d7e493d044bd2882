"""Edits of a converted TFLite flatbuffer: per-task signatures that read the all-tasks subgraph.

The converter writes one subgraph per signature. A task's own subgraph runs only that task's path, but it
repeats the operator and tensor tables of every layer on it: when the tasks share nearly everything (a
fully shared trunk, small heads), it saves next to no work and adds ~2–3% to the file per task. Such a
task's signature is pointed at the all-tasks subgraph instead, returning only its own outputs.
"""

from __future__ import annotations

import flatbuffers
import numpy as np
from tensorflow.lite.python import schema_py_generated as schema

# A task keeps a subgraph of its own only where that skips at least this share of the all-tasks work.
OWN_SUBGRAPH_MIN_SAVING = 0.05
_FILE_IDENTIFIER = b"TFL3"


def alias_task_signatures(content: bytes, default_key: str,
                          min_saving: float = OWN_SUBGRAPH_MIN_SAVING) -> tuple[bytes, list]:
    """Points each task signature whose own subgraph would skip less than `min_saving` of the
    `default_key` subgraph's work at that subgraph (its outputs: the task's), and drops the subgraphs no
    signature uses any more.

    Returns `(flatbuffer bytes, keys of the signatures now reading the default subgraph)`; the input
    unchanged (and no keys) when the file has subgraphs that are not a signature's (control flow) or
    weights stored outside the flatbuffer (files over 2 GB), which this edit does not renumber.
    """
    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(content, 0))
    signatures = {_text(s.signatureKey): s for s in model.signatureDefs}
    if default_key not in signatures or len(model.subgraphs) != len(signatures) or _has_offsets(model):
        return content, []
    default = signatures[default_key]
    full_work = _work(model, model.subgraphs[default.subgraphIndex])
    default_outputs = {_text(t.name): t for t in default.outputs}
    aliased = []
    for key, signature in signatures.items():
        if key == default_key:
            continue
        names = [_text(t.name) for t in signature.outputs]
        if not all(name in default_outputs for name in names):
            continue
        own_work = _work(model, model.subgraphs[signature.subgraphIndex])
        if full_work <= 0 or own_work < (1.0 - min_saving) * full_work:
            continue
        signature.subgraphIndex = default.subgraphIndex
        signature.inputs = default.inputs
        signature.outputs = [default_outputs[name] for name in names]
        aliased.append(key)
    if not aliased:
        return content, []
    _drop_unused_subgraphs(model)
    _drop_unused_buffers(model)
    builder = flatbuffers.Builder(len(content) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=_FILE_IDENTIFIER)
    return bytes(builder.Output()), aliased


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _has_offsets(model) -> bool:
    return any(getattr(b, "offset", 0) > 1 for b in model.buffers or [])


def _constant(model, tensor) -> bool:
    buffer = model.buffers[tensor.buffer] if tensor.buffer else None
    return buffer is not None and buffer.data is not None and len(buffer.data) > 0


def _work(model, subgraph) -> float:
    """Multiply-adds of a subgraph, roughly: per operator its output size times, for operators with
    weights (a constant input of rank 2 or more), the weights per output channel."""
    total = 0.0
    for op in subgraph.operators or []:
        outputs = [subgraph.tensors[i] for i in (op.outputs if op.outputs is not None else []) if i >= 0]
        size = float(sum(np.prod(t.shape) if t.shape is not None else 1 for t in outputs))
        weights = [subgraph.tensors[i] for i in (op.inputs if op.inputs is not None else [])
                   if i >= 0 and _constant(model, subgraph.tensors[i])]
        weights = [t for t in weights if t.shape is not None and len(t.shape) >= 2]
        per_output = 1.0
        if weights and outputs and outputs[0].shape is not None and len(outputs[0].shape):
            channels = max(int(outputs[0].shape[-1]), 1)
            per_output = max(float(np.prod(weights[0].shape)) / channels, 1.0)
        total += size * per_output
    return total


def _drop_unused_subgraphs(model) -> None:
    used = sorted({s.subgraphIndex for s in model.signatureDefs})
    renumber = {old: new for new, old in enumerate(used)}
    model.subgraphs = [model.subgraphs[i] for i in used]
    for signature in model.signatureDefs:
        signature.subgraphIndex = renumber[signature.subgraphIndex]


def _drop_unused_buffers(model) -> None:
    # Buffer 0 is the empty buffer by convention; metadata entries point at buffers too.
    used = {0}
    for subgraph in model.subgraphs:
        used.update(t.buffer for t in subgraph.tensors or [])
    used.update(m.buffer for m in model.metadata or [])
    used.update(int(i) for i in (model.metadataBuffer if model.metadataBuffer is not None else []))
    kept = sorted(used)
    renumber = {old: new for new, old in enumerate(kept)}
    model.buffers = [model.buffers[i] for i in kept]
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors or []:
            tensor.buffer = renumber[tensor.buffer]
    for entry in model.metadata or []:
        entry.buffer = renumber[entry.buffer]
    if model.metadataBuffer is not None:
        model.metadataBuffer = [renumber[int(i)] for i in model.metadataBuffer]
