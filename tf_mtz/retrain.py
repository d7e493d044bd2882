"""Retraining: light joint training of the zipped model, one batch of every task per step.

Each task's loss is computed on its own head and the losses are summed (weighted by `loss_weights`), so
the gradients of shared weights combine all tasks. Two losses: ``"distill"`` (no labels needed: match the
original model's logits, softened by a temperature) and ``"labels"``. Each head's loss follows its output
activation (softmax: KL divergence or cross-entropy; sigmoid: per-unit binary cross-entropy, e.g. a
per-pixel mask; linear: squared error) unless `Retrain.losses` names another.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from tf_mtz import data as data_lib
from tf_mtz import graph, keras_graph, registry
from tf_mtz.errors import ZipError

LOSSES = ("distill", "labels")
# Per-head losses `Retrain.losses` may name; the default is chosen from the head's activation.
HEAD_LOSSES = ("kl", "binary_cross_entropy", "mse", "relative_mse")
_HEAD_LOSS_OF_ACTIVATION = {"softmax": "kl", "sigmoid": "binary_cross_entropy"}


@dataclasses.dataclass
class Retrain:
    """How to retrain the zipped model while zipping (and with `fine_tune`).

    Args:
        data: per-task training data, `{task: x | (x, y) | tf.data.Dataset}`, or one value for all tasks.
            With `loss="distill"` inputs alone are enough; `None` then reuses the calibration data.
        steps_per_layer: joint steps after each zipped hidden layer.
        final_steps: extra joint steps after the last zipped layer.
        loss: "distill" (match the original models' logits, label-free) or "labels".
        optimizer: a Keras optimizer name ("adam", "sgd", ...) or instance used as a template; a fresh
            copy is made for every retraining phase.
        learning_rate: peak learning rate of each phase.
        schedule: "cosine" (decay to 0 over each phase) or "constant".
        batch_size: batch size per task.
        temperature: distillation temperature; the loss is scaled by its square.
        seed: shuffling seed.
        losses: `{task: loss}` overriding the loss chosen from a head's activation (keys "task", or
            "task/output" for models with several outputs): "kl" (softmax outputs; with labels,
            cross-entropy), "binary_cross_entropy" (sigmoid outputs, unit by unit: masks, attributes),
            "mse" (squared error of the logits, or of the labels for regression), "relative_mse" (the
            same over the target's variance in the batch: scale-free, so a regression in pixels does not
            outweigh a classifier), or a callable `(target, logits) -> scalar` where the target is the
            original model's logits (distillation) or the labels.
        loss_weights: `{task: weight}` (keys as for `losses`) scaling each head's loss in the sum;
            heads not named weigh 1.

    Example:

    ```python
    retrain = tf_mtz.Retrain(data={"a": (x_a, y_a), "b": (x_b, y_b)}, steps_per_layer=500, loss="labels")
    zipped = tf_mtz.zip_models({"a": model_a, "b": model_b}, calibration_data=x, retrain=retrain)
    ```
    """

    data: Any = None
    steps_per_layer: int = 300
    final_steps: int = 0
    loss: str = "distill"
    optimizer: Any = "adam"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    batch_size: int = 64
    temperature: float = 2.0
    seed: int = 0
    losses: dict | None = None
    loss_weights: dict | None = None

    def validate(self):
        if self.loss not in LOSSES:
            raise ZipError(f"Retrain.loss must be one of {LOSSES}, got {self.loss!r}.")
        if self.schedule not in ("cosine", "constant"):
            raise ZipError(f"Retrain.schedule must be 'cosine' or 'constant', got {self.schedule!r}.")
        for name in ("steps_per_layer", "final_steps"):
            if int(getattr(self, name)) < 0:
                raise ZipError(f"Retrain.{name} must be >= 0, got {getattr(self, name)}.")
        if self.batch_size < 1 or self.learning_rate <= 0 or self.temperature <= 0:
            raise ZipError("Retrain.batch_size, learning_rate and temperature must be positive.")
        for key, loss in (self.losses or {}).items():
            if not callable(loss) and loss not in HEAD_LOSSES:
                raise ZipError(f"Retrain.losses['{key}'] must be one of {HEAD_LOSSES} or a callable (target, "
                               f"logits) -> scalar, got {loss!r}.")
        for key, weight in (self.loss_weights or {}).items():
            if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight < 0:
                raise ZipError(f"Retrain.loss_weights['{key}'] must be a finite number >= 0, got {weight!r}.")

    def settings(self) -> dict:
        """The settings the zip report keeps: the numbers and names (no data, losses or optimizer objects)."""
        return {k: v for k, v in vars(self).items()
                if k != "data" and not callable(v) and isinstance(v, (int, float, str))}

    def check_keys(self, keys: list) -> None:
        """Raises ZipError where `losses` or `loss_weights` names a head that is not in `keys` (its task's
        name, or "task/output")."""
        tasks = {key.split("/")[0] for key in keys}
        for field in ("losses", "loss_weights"):
            unknown = sorted(k for k in (getattr(self, field) or {}) if k not in keys and k not in tasks)
            if unknown:
                raise ZipError(f"Retrain.{field} names {unknown}, which are not outputs of the zipped model "
                               f"({sorted(keys)}).")

    def head_setting(self, field: str, key: str, default=None):
        """The `losses` or `loss_weights` entry for output `key` ("task" or "task/output"), falling back
        to its task's entry, then to `default`."""
        table = getattr(self, field) or {}
        return table.get(key, table.get(key.split("/")[0], default))


def paper_retrain(data, steps_per_layer: int = 1000) -> Retrain:
    """The reference code's recipe: plain SGD at lr 0.01 on labels, constant rate."""
    return Retrain(data=data, steps_per_layer=steps_per_layer, loss="labels", optimizer="sgd",
                   learning_rate=0.01, schedule="constant", batch_size=32)


def _make_optimizer(retrain: Retrain, steps: int):
    rate = retrain.learning_rate
    if retrain.schedule == "cosine":
        rate = keras.optimizers.schedules.CosineDecay(rate, decay_steps=max(steps, 1))
    template = retrain.optimizer
    if isinstance(template, str):
        template = keras.optimizers.get(template)
    return type(template).from_config({**template.get_config(), "learning_rate": rate})


def logits_model(model: keras.Model, output) -> tuple[keras.Model, str]:
    """Returns a model from `model`'s input to the logits behind `output`, and the activation removed.

    The logits are the input of a trailing softmax/sigmoid (an Activation layer, a Softmax layer, or
    the activation of a Dense/Conv2D head); a linear output is its own logits.
    """
    op, node_index, _ = keras_graph.producer(output)
    if isinstance(op, keras.Model):
        # The head sits in a nested model: find its logits there and call that on the nested input.
        inner, activation = logits_model(op, op.outputs[0])
        return keras.Model(model.inputs, inner(keras_graph.call_inputs(op, node_index)[0])), activation
    squashed = squashing(op)
    layer_input = keras_graph.call_inputs(op, node_index)[0]
    if squashed:
        return keras.Model(model.inputs, layer_input), squashed
    handler = registry.handler_for(op)
    if isinstance(handler, registry.UnitLayerHandler):
        act = handler.activation(op)
        if act in ("softmax", "sigmoid"):
            linear = _linear_copy(handler, op, *handler.kernel_and_bias(op), name=f"{op.name}_logits")
            return keras.Model(model.inputs, linear(layer_input)), act
    return keras.Model(model.inputs, output), "linear"


def output_activation(handler, head, suffixes: list) -> str:
    """"softmax", "sigmoid" or "linear": what turns a head's pre-activation into its output: the last
    squashing layer among the weightless `suffixes` after it (`squashing`), else the head's own activation
    where it squashes."""
    for layer in reversed(suffixes):
        squashed = squashing(layer)
        if squashed:
            return squashed
    activation = handler.activation(head)
    return activation if activation in ("softmax", "sigmoid") else "linear"


def squashing(layer) -> str | None:
    """"softmax" or "sigmoid" for a Softmax layer or such an Activation layer, else None."""
    if isinstance(layer, keras.layers.Softmax):
        return "softmax"
    if isinstance(layer, keras.layers.Activation):
        name = keras.activations.serialize(layer.activation)
        return name if name in ("softmax", "sigmoid") else None
    return None


def _linear_copy(handler, layer, kernel, bias, name: str):
    """A built copy of a unit layer with the given weights and no activation: its pre-activation."""
    linear = handler.build_layer(layer, kernel.shape[-1], use_bias=True, activation=None, name=name)
    linear.build(tuple(layer.input.shape))
    linear.set_weights(handler.layer_weights(kernel, bias))
    return linear


class _ChainTeacher:
    """Original model's logits, computed by calling its own layers (no new graph nodes on them)."""

    def __init__(self, plan, task, head, linear_head):
        self.plan, self.task, self.head, self.linear_head = plan, task, head, linear_head

    def __call__(self, x, training=False):
        return self.linear_head(graph.run_prefix(self.plan, self.task, self.head, x))


def chain_teacher(plan, task, output=None) -> tuple:
    """`(teacher, activation)` for distillation of one output (the first if None): the original head's
    pre-activation (BatchNormalization after it folded in) and the activation that turns it into the
    output (softmax, sigmoid or linear)."""
    output = output or plan.outputs[0]
    position = plan.slots[output.slot].position
    head, handler = position.layers[task], position.handler
    linear = _linear_copy(handler, head, *position.weights[task], name=f"{head.name}_teacher_logits")
    return _ChainTeacher(plan, task, head, linear), output_activation(handler, head, output.suffixes[task])


def _loss_fn(kind: str, activation: str, temperature: float, labels_spec, head_loss=None):
    """The loss of one head: `(target, logits) -> scalar`, the target being the original's logits
    (distillation) or the labels. `head_loss` overrides the choice from the activation."""
    if callable(head_loss):
        return head_loss
    if head_loss is None and kind == "labels" and labels_spec.dtype.is_integer and activation != "sigmoid":
        head_loss = "kl"  # class ids: cross-entropy of the logits, whatever the head's activation
    head_loss = head_loss or _HEAD_LOSS_OF_ACTIVATION.get(activation, "mse")
    if kind == "distill":
        t = temperature
        if head_loss == "binary_cross_entropy":
            def loss(teacher, student):
                soft = tf.sigmoid(teacher / t)
                return t * t * tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(soft, student / t))
        elif head_loss == "kl":
            def loss(teacher, student):
                soft = tf.nn.softmax(teacher / t)
                log_student = tf.nn.log_softmax(student / t)
                kl = tf.reduce_sum(soft * (tf.math.log(soft + 1e-12) - log_student), axis=-1)
                return t * t * tf.reduce_mean(kl)
        else:
            loss = _squared_error(head_loss == "relative_mse")
        return loss
    if head_loss == "binary_cross_entropy":
        return lambda y, logits: tf.reduce_mean(
            tf.nn.sigmoid_cross_entropy_with_logits(tf.cast(tf.reshape(y, tf.shape(logits)), logits.dtype), logits))
    if head_loss == "kl":
        if labels_spec.dtype.is_integer:
            return lambda y, logits: tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(
                tf.reshape(tf.cast(y, tf.int32), [-1]), logits))
        return lambda y, logits: tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(
            tf.cast(y, logits.dtype), logits))
    squared = _squared_error(head_loss == "relative_mse")
    return lambda y, logits: squared(tf.cast(tf.reshape(y, tf.shape(logits)), logits.dtype), logits)


def _squared_error(relative: bool):
    """Mean squared error; relative: each output unit's over the target's variance in the batch, so that
    the loss does not depend on the target's units."""
    if not relative:
        return lambda target, prediction: tf.reduce_mean(tf.square(target - prediction))

    def loss(target, prediction):
        error = tf.reduce_mean(tf.square(target - prediction), axis=0)
        return tf.reduce_mean(error / (tf.stop_gradient(tf.math.reduce_variance(target, axis=0)) + 1e-6))
    return loss


class JointTrainer:
    """Runs joint steps on per-task logits models that share layers."""

    def __init__(self, students: dict, activations: dict, retrain: Retrain, datasets: dict,
                 teachers: dict | None, strategy=None):
        self.tasks = list(students)
        self.students = students
        self.teachers = teachers
        self.retrain = retrain
        self.strategy = strategy
        repeated = {t: datasets[t].repeat() for t in self.tasks}
        if strategy is not None:
            # Each replica gets a slice of every task's batch; students must be built in strategy.scope().
            repeated = {t: strategy.experimental_distribute_dataset(d) for t, d in repeated.items()}
        self.iterators = {t: iter(repeated[t]) for t in self.tasks}
        labels_specs = {t: (datasets[t].element_spec[1] if retrain.loss == "labels" else None)
                        for t in self.tasks}
        retrain.check_keys(self.tasks)
        self.losses = {t: _loss_fn(retrain.loss, activations[t], retrain.temperature, labels_specs[t],
                                   retrain.head_setting("losses", t)) for t in self.tasks}
        self.loss_weights = {t: float(retrain.head_setting("loss_weights", t, 1.0)) for t in self.tasks}
        seen, self.variables = set(), []
        for model in students.values():
            for v in model.trainable_variables:
                if id(v) not in seen:
                    seen.add(id(v))
                    self.variables.append(v)

    def run(self, steps: int, label: str = "retrain", verbose: int = 1) -> float:
        """Runs `steps` joint steps with a fresh optimizer; returns the last summed loss."""
        if steps <= 0:
            return float("nan")
        strategy = self.strategy or tf.distribute.get_strategy()
        with strategy.scope():
            optimizer = _make_optimizer(self.retrain, steps)
            optimizer.build(self.variables)
        distill = self.retrain.loss == "distill"
        replicas = strategy.num_replicas_in_sync

        def replica_step(batches):
            with tf.GradientTape() as tape:
                losses = {}
                for t in self.tasks:
                    x, target = batches[t]
                    if distill:
                        target = tf.stop_gradient(self.teachers[t](x, training=False))
                    losses[t] = self.loss_weights[t] * self.losses[t](target, self.students[t](x, training=True))
                # Each replica's mean is over its slice; dividing by the replica count makes the summed
                # gradients those of the whole batch.
                total = tf.add_n(list(losses.values())) / replicas
            grads = tape.gradient(total, self.variables)
            optimizer.apply_gradients(zip(grads, self.variables))
            return total

        @tf.function
        def step(batches):
            if self.strategy is None:
                return replica_step(batches)
            per_replica = self.strategy.run(replica_step, args=(batches,))
            return self.strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)

        bar = (keras.utils.Progbar(steps, verbose=verbose, unit_name="step", stateful_metrics=[f"{label} loss"])
               if verbose else None)
        total = None
        for i in range(steps):
            batches = {}
            for t in self.tasks:
                element = next(self.iterators[t])
                batches[t] = (element, element) if distill else element  # distillation data: x alone
            total = step(batches)
            if bar is not None and (i % 20 == 0 or i == steps - 1):
                bar.update(i + 1, values=[(f"{label} loss", float(total))])
        loss = float(total)
        if not np.isfinite(loss):
            raise FloatingPointError(f"Retraining diverged ({label}: loss {loss}); lower the learning rate.")
        return loss


def training_datasets(retrain: Retrain, tasks: list, inputs: list, fallback=None, phase: int = 0) -> dict:
    """Per-task shuffled, batched datasets for retraining ((x, y) for labels, x for distillation); arrays are
    read in an order set by `retrain.seed`, the task and the retraining `phase` alone."""
    source = retrain.data if retrain.data is not None else fallback
    if source is None:
        raise ZipError("Retrain needs data: give Retrain(data=...) (inputs alone are enough for distillation).")
    per_task = data_lib.per_task(source, tasks, "Retraining data", tuple(i.name for i in inputs))
    with_labels = retrain.loss == "labels"
    out = {}
    for i, t in enumerate(tasks):
        ds = data_lib.as_dataset(per_task[t], t, inputs, "Retraining data", retrain.batch_size,
                                 with_labels=with_labels, shuffle=True, seed=retrain.seed + i, phase=phase)
        # Each phase makes and drops its iterators: a user's dataset too goes without autotuning here.
        out[t] = data_lib.without_autotuning(ds.prefetch(2))
    return out


def fine_tune(model: keras.Model, retrain: Retrain, steps: int, teachers: dict | None = None,
              verbose: int = 1) -> keras.Model:
    """Jointly fine-tunes a finished zipped model in place, one batch of every task per step.

    Args:
        model: a model returned by `tf_mtz.zip_models` (dict outputs keyed by task).
        retrain: data, loss and optimizer settings; `retrain.steps_per_layer` is ignored.
        steps: number of joint steps.
        teachers: `{task: original keras.Model}`, required for `loss="distill"`.
        verbose: 1 shows a progress bar.

    Returns:
        The same model, trained.

    Raises:
        ZipError: missing data, labels or teachers.

    Example:

    ```python
    tf_mtz.fine_tune(zipped, tf_mtz.Retrain(data=train, loss="labels"), steps=500)
    ```
    """
    retrain.validate()
    keras_graph.check_graph_model(model, f"Model '{getattr(model, 'name', model)}'")
    outputs = keras_graph.output_structure(model)
    if not isinstance(outputs, dict):
        raise ZipError(f"Model '{model.name}' does not have dict outputs keyed by task; pass a zipped model.")
    tasks = list(outputs)
    if retrain.loss == "distill":
        if not teachers:
            raise ZipError("fine_tune with loss='distill' needs teachers={task: original model}.")
        missing = [t for t in tasks if t not in teachers]
        if missing:
            raise ZipError(f"fine_tune: no teacher model for task(s) {missing}.")
    students, activations = {}, {}
    for t in tasks:
        students[t], activations[t] = logits_model(model, outputs[t])
    teacher_logits = None
    if retrain.loss == "distill":
        for t in tasks:
            keras_graph.check_graph_model(teachers[t], f"Teacher model for task '{t}'")
        teacher_logits = {t: logits_model(teachers[t], teachers[t].outputs[0])[0] for t in tasks}
    datasets = training_datasets(retrain, tasks, graph.inputs_of(model))
    JointTrainer(students, activations, retrain, datasets, teacher_logits).run(steps, "fine-tune", verbose)
    return model
