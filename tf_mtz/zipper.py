"""`zip_models`: Multi-Task Zipping, layer by layer from the input.

For each layer: pair (costs from weights or Hessians in the current, partly zipped net, then a one-to-one
matching) -> permute -> merge -> refit the next layer to the originals' pre-activations (its inputs are
final now) -> optional joint retraining. Heads are never merged. Each layer's inputs come from the probe,
which carries them forward from layer to layer instead of replaying the network from its input.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
import zlib

import keras
from absl import logging
import numpy as np
import tensorflow as tf

from tf_mtz import auto_sharing
from tf_mtz import checkpoint as checkpoint_lib
from tf_mtz import config as config_lib
from tf_mtz import costs as costs_lib
from tf_mtz import data as data_lib
from tf_mtz import graph, group_pairing, keras_graph, matching, prefix, rebuild, registry, statistics
from tf_mtz import probe as probe_lib
from tf_mtz import report as report_lib
from tf_mtz import retrain as retrain_lib
from tf_mtz import synthesis
from tf_mtz import state as state_lib
from tf_mtz.errors import RankDeficientWarning, ZipError


def zip_models(models: dict, calibration_data, sharing=1.0, retrain=None, config=None, *, evaluation_data=None,
               strategy=None, alignment=None, checkpoint_dir=None, verbose: int = 1) -> keras.Model:
    """Zips several trained models into one network with a shared trunk and one head per task.

    Layers are zipped from the input. At each layer, units are paired one per task and each pair is merged
    into one unit; the next layer is then refit so that its pre-activations match the original models'
    on the calibration data. `config` says how units are paired and merged: the default pairs by weight
    matching (optimal assignment) and averages, the measured best; `tf_mtz.ZipConfig.paper()` is the
    published procedure (greedy pairs by ΔE = ½ dᵀ H_A (H_A+H_B)⁻¹ H_B d from each task's layer-wise
    Hessian in the partly zipped network, merged to (H_A+H_B)⁻¹(H_A w_A + H_B w_B), no refit). More than
    two tasks are zipped one at a time against the shared units. Output layers (heads) are never merged.

    Args:
        models: `{task_name: keras.Model}`, two or more Functional or Sequential models that take the
            same input and have the same layer types in the same order (widths may differ). They are
            not modified.
        calibration_data: inputs for the layer statistics: `{task: data}` or one value for every task,
            where data is a numpy array, a tensor, or a `tf.data.Dataset` of x or (x, y) (batched or not).
            None (or a `tf_mtz.SyntheticInputs`) makes inputs up from the models: matching their
            BatchNormalization statistics, or from an input Normalization, or from a given distribution;
            the report then says that no real data was used.
        sharing: fraction in [0, 1] of each hidden layer's units to share (of the narrowest task), or
            `{layer_name: fraction | count}` with names of the first model's layers; layers not named
            are not shared.
        retrain: a `tf_mtz.Retrain` for joint retraining after each zipped layer, or None.
        config: a `tf_mtz.ZipConfig` (None: `ZipConfig()`, the default recipe).
        evaluation_data: optional labelled data, `{task: (x, y) | dataset of (x, y)}` or one for all
            tasks: the report then holds each task's accuracy for the original models, after each layer
            is zipped, after its retraining, and for the result.
        strategy: a `tf.distribute.Strategy` for the layer statistics (the Hessians) and retraining, e.g.
            `MirroredStrategy`; defaults to the ambient one inside `with strategy.scope():`. Results equal
            the single-device ones up to rounding; the refit runs on the default device.
        alignment: where the zipped part of models that differ ends, when the longest common prefix is
            not wanted: `{layer of the first model: layer of the second}` (names or layers) zips the
            layers up to there, `{task: {layer of the first model: layer of that task's model}}` for
            more than two models. The layers must sit at the same place in both models.
        verbose: 0 silent, 1 per-layer log lines and progress bars.

    Returns:
        A plain Keras functional model with one input and outputs `{task: tensor}` (`{"task/output":
        tensor}` when the models have several outputs). Its `zip_report`
        attribute holds a `tf_mtz.ZipReport`.

    Raises:
        ValueError (`tf_mtz.ZipError`): mismatched or unsupported models, bad calibration data, bad
            sharing or config; the message names the model, layer or task at fault.

    Example:

    ```python
    zipped = tf_mtz.zip_models({"a": model_a, "b": model_b}, calibration_data=x_train[:10000])
    print(zipped.zip_report)
    probabilities = zipped.predict(x_test)["a"]
    paper = tf_mtz.zip_models({"a": model_a, "b": model_b}, x_train[:10000], config=tf_mtz.ZipConfig.paper())
    ```
    """
    started = time.perf_counter()
    config = _checked_config(config)
    if strategy is None and tf.distribute.has_strategy():
        strategy = tf.distribute.get_strategy()
    if retrain is not None:
        if not isinstance(retrain, retrain_lib.Retrain):
            raise ZipError(f"retrain must be a tf_mtz.Retrain or None, got {type(retrain).__name__}.")
        retrain.validate()

    graph.check_models_dict(models)
    split = prefix.split(models, alignment)
    if split is not None:
        return _zip_prefix(split, models, calibration_data, sharing, retrain, config, evaluation_data, strategy,
                           verbose, started, checkpoint_dir)
    plan = graph.read_models(models)
    tasks = plan.tasks
    input_names = tuple(i.name for i in plan.inputs)
    calibration_data = _read_streams(calibration_data, plan.tasks, plan.inputs, config.max_samples)
    calibration_data, synthetic = _real_or_synthetic(calibration_data, models, verbose)
    batch_size = _batch_size(models, config)
    group_orders = {}
    if plan.grouped and getattr(config, "group_matching", "blocks") == "blocks":
        # Rewritten copies: the user's models stay as they are (and are what the report measures).
        aligned, group_orders = group_pairing.align_groups(
            models, plan, _first_samples(calibration_data, plan, batch_size, GROUP_PAIRING_SAMPLES))
        if group_orders:
            plan = graph.read_models(aligned)
    search = None
    if isinstance(sharing, auto_sharing.AutoSharing):  # counts chosen layer by layer as the zip goes
        search = _sharing_search(sharing, models, plan, calibration_data)
        counts = [0] * len(plan.hidden_slots)
        search_inputs = {t: data_lib.as_dataset(x, t, plan.inputs, "AutoSharing data", batch_size)
                         for t, x in search.judge.inputs.items()}
    else:
        counts = resolve_sharing(sharing, plan)
    calibration = {t: data_lib.bounded(data_lib.as_dataset(d, t, plan.inputs, "Calibration data", batch_size),
                                       config.max_samples, batch_size, t, "Calibration data")
                   for t, d in data_lib.per_task(calibration_data, tasks, "Calibration data", input_names).items()}
    fingerprints = {t: _fingerprint(m) for t, m in models.items()}
    evaluation = None
    if evaluation_data is not None and not plan.single_output:
        raise ZipError(f"evaluation_data measures one accuracy per task, but the models have {plan.head_count} "
                       "outputs; evaluate the zipped model's outputs yourself.")
    if evaluation_data is not None:
        evaluation = _evaluation_datasets(evaluation_data, tasks, plan.inputs, batch_size)
    trainer_inputs = None if retrain is None else _trainer_inputs(plan, retrain, calibration_data, strategy)

    checkpoints = None
    if checkpoint_dir is not None:
        checkpoints = checkpoint_lib.Checkpoints(checkpoint_dir, checkpoint_lib.fingerprint(
            models, calibration=calibration_data, sharing=sharing, retrain=retrain, config=config,
            evaluation=evaluation_data))
    state = state_lib.ZipState.from_plan(plan)
    probe = probe_lib.Probe(plan, state, calibration, strategy,
                            memory_budget_bytes=int(config.activation_memory_gib * 2 ** 30))
    calibration_samples = {t: probe.sample_count(t) for t in tasks}
    if search is not None:  # the zipped network on the data that judges each layer's sharing
        search.probe = probe_lib.Probe(plan, state, search_inputs, strategy)
    try:
        layer_reports = _zip_layers(plan, state, probe, config, counts, retrain, trainer_inputs, evaluation, verbose,
                                    search, checkpoints)
    finally:
        probe.close()
        if search is not None:
            search.probe.close()
    if probe.spill.written:
        logging.info("tf_mtz: %.1f GiB of layer activations went to disk beyond activation_memory_gib=%g; a larger "
                     "budget keeps them in memory (faster).", probe.spill.written / 2 ** 30,
                     config.activation_memory_gib)

    zipped = rebuild.build_model(plan, state).model
    for t, m in models.items():
        if _fingerprint(m) != fingerprints[t]:
            raise AssertionError(f"Internal error: zipping modified the weights of model for task '{t}'.")
    zipped.zip_report = _zip_report(models, zipped, state, layer_reports, sharing, config, retrain, started)
    if search is not None:
        zipped.zip_report.auto_sharing = search.tried
    zipped.zip_report.settings["synthetic_calibration"] = synthetic
    zipped.zip_report.settings["calibration_samples"] = calibration_samples
    zipped.zip_report.settings["group_orders"] = group_orders
    if synthetic:
        logging.warning("tf_mtz: %s.", report_lib.SYNTHETIC_NOTE)
    if evaluation is not None:
        _report_accuracies(zipped.zip_report, models, zipped, evaluation)
    if verbose:
        keras_graph.print_message(f"tf_mtz: zipped {len(tasks)} models in {time.perf_counter() - started:.1f} s")
    return zipped


def _zip_prefix(split, models, calibration_data, sharing, retrain, config, evaluation_data, strategy, verbose,
                started, checkpoint_dir=None) -> keras.Model:
    """Models of different depths: their common prefix zipped (each cut read through a per-task linear
    layer), then joined with copies of each model's branch; the final retraining trains the whole model."""
    if isinstance(sharing, auto_sharing.AutoSharing):
        sharing = _judged_through_branches(sharing, split, models)
    if retrain is not None and retrain.steps_per_layer and retrain.loss != "distill":
        raise ZipError("Models of different depths retrain layer by layer by distillation only (their zipped "
                       "prefix ends in features, not labels): use Retrain(loss='distill'), or steps_per_layer=0 "
                       "with final_steps, which trains the whole model with labels.")
    logging.warning("tf_mtz: the models differ (%s): zipping the %d layers before that; the rest of each model "
                    "stays its own branch.", split.reason, split.length)
    # Made up once, from the whole models (every BatchNormalization's statistics), not from their prefixes.
    calibration_data, synthetic = _real_or_synthetic(calibration_data, models, verbose)
    calibration_data = _read_streams(calibration_data, split.tasks, graph.inputs_of(next(iter(models.values()))),
                                     config.max_samples)
    layer_retrain = None
    if retrain is not None and retrain.steps_per_layer:
        layer_retrain = dataclasses.replace(retrain, final_steps=0)
    zipped_prefix = zip_models(split.prefixes, calibration_data, sharing, layer_retrain, config, strategy=strategy,
                               checkpoint_dir=checkpoint_dir, verbose=verbose)
    zipped = prefix.assemble(split, zipped_prefix)
    if retrain is not None and retrain.final_steps:
        final = retrain if retrain.data is not None else dataclasses.replace(retrain, data=calibration_data)
        context = strategy.scope() if strategy is not None else contextlib.nullcontext()
        with context:
            retrain_lib.fine_tune(zipped, final, retrain.final_steps, teachers=models, verbose=verbose)
    report = zipped_prefix.zip_report
    report.params_original = int(sum(m.count_params() for m in models.values()))
    report.params_zipped = int(zipped.count_params())
    report.prefix = split.describe()
    report.settings.update({"sharing": dict(sharing) if isinstance(sharing, dict) else sharing,
                            "synthetic_calibration": synthetic, "seconds": time.perf_counter() - started,
                            "retrain": (None if retrain is None else retrain.settings())})
    zipped.zip_report = report
    if evaluation_data is not None:
        if any(len(split.outputs[t]) != 1 for t in split.tasks):
            raise ZipError("evaluation_data measures one accuracy per task; evaluate these models' outputs yourself.")
        evaluation = _evaluation_datasets(evaluation_data, split.tasks, graph.inputs_of(next(iter(models.values()))),
                                          _batch_size(models, config))
        _report_accuracies(report, models, zipped, evaluation)
    return zipped


class _BranchJudged(auto_sharing.AutoSharing):
    """An AutoSharing for the zipped prefix of models of different depths: each trial's prefix outputs go
    through copies of the task's branch, and the judge compares the whole models' outputs. The models
    and branches are attributes, not fields, so that a checkpoint's fingerprint reads the options alone."""

    models: dict  # task -> the whole model
    branches: dict  # task -> `prefix.branch_model`
    activations: dict  # task -> what its output ends in ("softmax", "sigmoid" or "linear")


def _judged_through_branches(auto, split, models) -> _BranchJudged:
    # The prefix has one output per cut, so `_sharing_search` checks the inputs alone; the outputs are these.
    for t, model in models.items():
        if len(model.outputs) != 1:
            raise ZipError(f"AutoSharing chooses the sharing for models with one input and one output so far; "
                           f"model '{model.name}' (task '{t}') has {len(model.outputs)} outputs: give `sharing` "
                           "as a fraction or a dict.")
    judged = _BranchJudged(**{f.name: getattr(auto, f.name) for f in dataclasses.fields(auto)})
    object.__setattr__(judged, "models", models)
    object.__setattr__(judged, "branches", {t: prefix.branch_model(split, t, models[t]) for t in split.tasks})
    object.__setattr__(judged, "activations", {t: _ops_activation(split.ops[t], split.outputs[t][0])
                                               for t in split.tasks})
    return judged


def _real_or_synthetic(calibration_data, models, verbose) -> tuple:
    """`(calibration data, whether it was made up)`: None or a `SyntheticInputs` makes inputs up from the
    models' own statistics (no real data)."""
    if calibration_data is None or isinstance(calibration_data, synthesis.SyntheticInputs):
        return synthesis.synthesize(models, calibration_data or synthesis.SyntheticInputs(), verbose), True
    return calibration_data, False


GROUP_PAIRING_SAMPLES = 128  # calibration samples on which grouped layers' blocks are compared


def _first_samples(calibration_data, plan, batch_size, count):
    """The first task's first `count` calibration samples, as one batch (a tuple of them for several model
    inputs)."""
    task = plan.tasks[0]
    data = data_lib.per_task(calibration_data, plan.tasks, "Calibration data", tuple(i.name for i in plan.inputs))
    batches, samples = [], 0
    for batch in data_lib.as_dataset(data[task], task, plan.inputs, "Calibration data", batch_size):
        batches.append(batch)
        samples += int(tf.nest.flatten(batch)[0].shape[0])
        if samples >= count:
            break
    return tf.nest.map_structure(lambda *parts: tf.concat(parts, axis=0)[:count], *batches)


def _evaluation_datasets(evaluation_data, tasks, inputs, batch_size) -> dict:
    """Per task, a labelled dataset of the evaluation data."""
    names = tuple(i.name for i in inputs)
    return {t: data_lib.as_dataset(d, t, inputs, "Evaluation data", batch_size, with_labels=True)
            for t, d in data_lib.per_task(evaluation_data, tasks, "Evaluation data", names).items()}


def _report_accuracies(report, models, zipped, evaluation) -> None:
    """Fills in the original models' and the zipped model's accuracy per task."""
    report.accuracy_original = {t: _accuracy(m, {t: evaluation[t]}, single_output=True)[t] for t, m in models.items()}
    report.accuracy_final = _accuracy(zipped, evaluation)


def _zip_layers(plan, state, probe, config, counts, retrain, trainer_inputs, evaluation, verbose,
                search=None, checkpoints=None) -> list:
    """The method's loop: each layer step (pair, permute, merge, refit) and its retraining; returns the
    layers' reports. With a `search` (AutoSharing), each unit group's count is chosen where it starts.
    With `checkpoints`, it resumes from the last one and writes one after every step."""
    steps = _LayerSteps(plan, state, probe, config, counts, verbose)
    layer_reports, start = [], 0
    snapshot = checkpoints.load() if checkpoints is not None else None
    if snapshot is not None:
        layer_reports, start = _resume(snapshot, state, steps, search, verbose)
        if snapshot.finished:
            return layer_reports

    def save(next_slot, finished=False):
        if checkpoints is not None:
            checkpoints.save(checkpoint_lib.Snapshot(
                checkpoints.fingerprint, next_slot, finished, state, layer_reports, steps.group_counts,
                steps.refit_mismatch, steps.input_hessians, list(steps.counts),
                list(search.tried) if search is not None else []))

    for index in range(start, len(plan.slots)):
        if search is not None and not plan.is_head(index) and plan.slots[index].group not in steps.group_counts:
            width = min(int(w[0].shape[-1]) for w in plan.slots[index].position.weights.values())
            search.probe.advance(index)  # what the layer reads stays valid across the trials
            steps.counts[index], trial = search.choose(
                plan.slots[index].position.name, width,
                lambda count: _trial_outputs(plan, state, probe, steps, index, count, search.probe, search.finish),
                least=1 if _feeds_shared_tied_layer(plan, steps, index) else 0)
        else:
            trial = None
        if trial is not None:
            layer_report = trial.accept(state, probe, search.probe, steps)  # the chosen count was tried
        else:
            layer_report = steps.zip_layer(index)
        if layer_report.shared and evaluation is not None:
            layer_report.accuracy_zipped = _accuracy(rebuild.build_model(plan, state).model, evaluation)
        if layer_report.shared and retrain is not None and retrain.steps_per_layer:
            layer_report.retrain_loss = _retrain(plan, state, retrain, trainer_inputs, retrain.steps_per_layer,
                                                 f"layer {index + 1}", verbose, phase=index + 1)
            probe.weights_changed()
            if search is not None:
                search.probe.weights_changed()
            steps.input_hessians.clear()  # measured on inputs that the retraining has changed
            if evaluation is not None:
                layer_report.accuracy_retrained = _accuracy(rebuild.build_model(plan, state).model, evaluation)
        layer_reports.append(layer_report)
        save(index + 1)
    if retrain is not None and retrain.final_steps:
        layer_reports[-1].retrain_loss = _retrain(plan, state, retrain, trainer_inputs, retrain.final_steps,
                                                  "final", verbose, phase=len(plan.slots) + 1)
    save(len(plan.slots), finished=True)
    return layer_reports


def _feeds_shared_tied_layer(plan, steps, index) -> bool:
    """Whether a layer reading slot `index`'s units belongs to a unit group that already shares units (a
    residual stream chosen earlier): its shared units need shared inputs, so this layer must share some."""
    group = plan.slots[index].group
    return any(plan.slots[c].group != group and steps.group_counts.get(plan.slots[c].group, 0) > 0
               for c in plan.groups[group].consumers)


def _resume(snapshot, state, steps, search, verbose) -> tuple[list, int]:
    """Puts the zip back where `snapshot` was taken: the state (in place: the probe reads it), the layer
    steps' carried values and AutoSharing's choices. Returns the layer reports so far and the next slot."""
    state.__dict__.update(copy.deepcopy(snapshot.state).__dict__)
    steps.group_counts, steps.refit_mismatch = dict(snapshot.group_counts), dict(snapshot.refit_mismatch)
    steps.input_hessians = dict(snapshot.input_hessians)
    steps.counts[:] = snapshot.counts
    if search is not None:
        search.tried[:] = snapshot.auto_sharing
    if verbose:
        keras_graph.print_message(f"tf_mtz: resuming from the checkpoint after {snapshot.next_slot} layer steps"
                                  + (" (finished)" if snapshot.finished else ""))
    return list(snapshot.layer_reports), snapshot.next_slot


def _read_streams(data, tasks, inputs, max_samples):
    """Generators in the calibration data read into arrays once, at most `max_samples` samples each (they
    can be read only once, and every task and the retraining read the calibration data)."""
    if isinstance(data, dict) and set(data) <= set(tasks):
        return {t: _read_streams(d, tasks, inputs, max_samples) for t, d in data.items()}
    if data_lib.is_stream(data):
        return data_lib.read_stream(data, inputs, max_samples, "Calibration data")
    return data


def _batch_size(models, config) -> int:
    """The calibration (and AutoSharing judging) batch size: `config.batch_size` where it is set; else 256,
    or more samples where every layer output of a batch stays within 16M values (64 MB), up to 2,048. For
    small networks the calls per batch, not the arithmetic, set the time (a LeNet-300-100 zip: 0.65 s in
    batches of 256, 0.42 s in one of 2,000); larger layers keep 256, which bounds their memory, and so do
    models whose outputs bound nothing (`keras_graph.widest_output`: attention, inputs of any length)."""
    if config.batch_size is not None:
        return config.batch_size
    widest = [keras_graph.widest_output(m) for m in models.values()]
    if any(w is None for w in widest):
        return _DEFAULT_BATCH
    return max(_DEFAULT_BATCH, min(_LARGEST_BATCH, _BATCH_VALUES // max(widest)))


_DEFAULT_BATCH, _LARGEST_BATCH, _BATCH_VALUES = 256, 2048, 2 ** 24


def _auto_settings(auto) -> dict:
    """An AutoSharing as the report's settings keep it (its data left out)."""
    return {"auto": True, "tolerance": auto.tolerance, "step": auto.step, "max_samples": auto.max_samples,
            "held_out_data": auto.data is not None}


def _trial_outputs(plan, state, probe, steps, index, count, judge_probe, finish=None) -> tuple:
    """The zipped network's outputs `{task: array}` on the AutoSharing data (`judge_probe`'s) with slot
    `index` zipped at `count` (and the next layer refit), everything after it as in the original models
    (through `finish[task]`, the task's branch, where the zip is a prefix), and the `_Trial` that takes
    this zip; the zip state, the probes and the layer steps are then put back as they were."""
    if count and index not in steps.input_hessians and state.slots[index].attention is None:
        # Every trial of the layer merges with the Hessians of the same inputs: measured once, for all of
        # them and for the zip that follows. (Attention layers merge without them.)
        probe.advance(index)
        steps.input_hessians[index] = _hessians(plan, [index], probe, config=steps.config)[index]
    saved_state, saved_probe, saved_judge = copy.deepcopy(state), probe.checkpoint(), judge_probe.checkpoint()
    saved_steps = (dict(steps.group_counts), dict(steps.refit_mismatch), dict(steps.input_hessians), steps.verbose)
    try:
        steps.counts[index], steps.verbose = count, 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RankDeficientWarning)
            layer_report = steps.zip_layer(index)
        if finish is None:
            outputs = {t: judge_probe.zipped_outputs(t) for t in plan.tasks}
        else:
            outputs = {t: finish[t]({output.name: judge_probe.zipped_outputs(t, k)
                                     for k, output in enumerate(plan.outputs)}) for t in plan.tasks}
        # Kept without a copy: restoring below puts the saved objects back into `state` and leaves these.
        trial = _Trial(index, count, dict(state.__dict__), probe.checkpoint(), judge_probe.checkpoint(),
                       (dict(steps.group_counts), dict(steps.refit_mismatch), dict(steps.input_hessians)),
                       layer_report, [w for w in caught if issubclass(w.category, RankDeficientWarning)])
        return outputs, trial
    finally:
        state.__dict__.update(saved_state.__dict__)
        probe.restore(saved_probe)
        judge_probe.restore(saved_judge)
        steps.group_counts, steps.refit_mismatch, steps.input_hessians, steps.verbose = saved_steps


@dataclasses.dataclass
class _Trial:
    """A layer zipped at one count by AutoSharing's search, kept so that where it is chosen the zip takes it
    instead of zipping the layer once more."""

    index: int
    count: int
    state: dict  # the zip state's attributes after the trial
    probe: tuple  # checkpoints of the calibration probe and of the judging probe after the trial
    judge_probe: tuple
    steps: tuple  # the layer steps' group counts, refit mismatches and input Hessians after the trial
    layer_report: object
    warnings: list

    def accept(self, state, probe, judge_probe, steps) -> report_lib.LayerReport:
        """Puts the zip where the trial left it, says what the zip would have said, returns its report."""
        state.__dict__.update(self.state)
        probe.restore(self.probe)
        judge_probe.restore(self.judge_probe)
        steps.group_counts, steps.refit_mismatch, steps.input_hessians = (dict(d) for d in self.steps)
        if self.count and steps.verbose:
            keras_graph.print_message(f"tf_mtz: zipping layer {self.index + 1}/{len(steps.plan.slots) - 1} "
                                      f"'{steps.plan.slots[self.index].position.name}': sharing {self.count} units "
                                      "(as tried)")
        for caught in self.warnings:
            warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
        return self.layer_report


def _sharing_search(auto, models, plan, calibration_data) -> auto_sharing.SharingSearch:
    """The search for `AutoSharing`, with its judge's data: at most `max_samples` inputs per task (labels
    where given) and the own models' outputs on them."""
    branched = isinstance(auto, _BranchJudged)
    if (not plan.single_output and not branched) or len(plan.inputs) > 1:
        raise ZipError("AutoSharing chooses the sharing for models with one input and one output so far; give "
                       "`sharing` as a fraction or a dict for these models.")
    source = auto.data if auto.data is not None else calibration_data
    per_task = data_lib.per_task(source, plan.tasks, "AutoSharing data", tuple(i.name for i in plan.inputs))
    inputs, labels = {}, {}
    for t, data in per_task.items():
        x, y = data if isinstance(data, tuple) and len(data) == 2 else (data, None)
        if not isinstance(x, np.ndarray) or (y is not None and not isinstance(y, np.ndarray)):
            raise ZipError(f"AutoSharing data for task '{t}' must be a numpy array of inputs or an (x, y) tuple "
                           f"of arrays, got {type(data).__name__}; give AutoSharing(data=...) as arrays.")
        inputs[t] = x[:auto.max_samples]
        labels[t] = None if y is None else y[:auto.max_samples]
    judged_models = auto.models if branched else models
    originals = {t: np.asarray(judged_models[t].predict(inputs[t], verbose=0, batch_size=1024)) for t in plan.tasks}
    activations = {t: (auto.activations[t] if branched else _output_activation(plan, t)) for t in plan.tasks}
    judge = auto_sharing.Judge(auto.tolerances(plan.tasks), inputs, labels, originals, activations)
    search = auto_sharing.SharingSearch(judge, auto.step)
    if branched:
        search.finish = {t: _branch_finish(auto.branches[t], inputs[t]) for t in plan.tasks}
    return search


def _branch_finish(branch, x):
    """`{cut name: prefix output}` on the judge's inputs `x` -> the task's output, through its branch."""
    cut_names = [i.name for i in branch.inputs[1:]]
    return lambda cuts: np.asarray(branch.predict([x] + [cuts[name] for name in cut_names], verbose=0,
                                                  batch_size=1024))


def _ops_activation(ops: list, index: int) -> str:
    """`retrain.output_activation` of op `index` of a model read as `ops`: the unit layer behind it and the
    weightless layers after that."""
    suffixes = []  # from the output back
    while not graph.is_input(index):
        layer = ops[index].layer
        handler = registry.handler_for(layer)
        if registry.has_units(handler):
            return retrain_lib.output_activation(handler, layer, suffixes[::-1])
        suffixes.append(layer)
        if len(ops[index].parents) != 1:
            break
        index = ops[index].parents[0]
    return next((squashed for squashed in map(retrain_lib.squashing, suffixes) if squashed), "linear")


def _output_activation(plan, task) -> str:
    """`retrain.output_activation` of a task's (first) output."""
    output = plan.outputs[0]
    position = plan.slots[output.slot].position
    return retrain_lib.output_activation(position.handler, position.layers[task], output.suffixes[task])


def _checked_config(config) -> config_lib.ZipConfig:
    if config is None:
        return config_lib.ZipConfig()
    if not isinstance(config, config_lib.ZipConfig):
        raise ZipError(f"config must be a tf_mtz.ZipConfig or None, got {type(config).__name__}.")
    return config


def _trainer_inputs(plan, retrain, calibration_data, strategy) -> tuple:
    """What joint retraining needs: teachers (the originals' logits, for distillation), each head's output
    activation (it picks the loss), the training datasets, and the strategy."""
    if retrain.loss != "distill" and not plan.single_output:
        raise ZipError(f"Retrain(loss='{retrain.loss}') trains on one label per task, but the models have "
                       f"{plan.head_count} outputs; use loss='distill' (label-free, every output).")
    # One trainer entry per task output ("task" or "task/output"), each with its task's data.
    keys = {plan.output_key(t, output): (t, output) for t in plan.tasks for output in plan.outputs}
    logits = {key: retrain_lib.chain_teacher(plan, t, output) for key, (t, output) in keys.items()}
    teachers = {key: logits[key][0] for key in keys} if retrain.loss == "distill" else None
    activations = {key: logits[key][1] for key in keys}
    fallback = calibration_data if retrain.loss == "distill" else None

    def datasets_for(phase: int) -> dict:
        """Each output's data for one retraining phase (its own order of the samples)."""
        datasets = retrain_lib.training_datasets(retrain, plan.tasks, plan.inputs, fallback, phase)
        return {key: datasets[t] for key, (t, _) in keys.items()}

    datasets_for(0)  # bad retraining data fails now, not after the first layers
    return teachers, activations, datasets_for, strategy


def _zip_report(models, zipped, state, layer_reports, sharing, config, retrain, started) -> report_lib.ZipReport:
    return report_lib.ZipReport(
        tasks=list(models), layers=layer_reports,
        params_original=int(sum(m.count_params() for m in models.values())),
        params_zipped=int(zipped.count_params()),
        params_shared=state_lib.count_shared_parameters(state),
        settings={"sharing": (dict(sharing) if isinstance(sharing, dict) else _auto_settings(sharing)
                              if isinstance(sharing, auto_sharing.AutoSharing) else sharing), **config.as_dict(),
                  "retrain": (None if retrain is None else retrain.settings()),
                  "seconds": time.perf_counter() - started})


class _LayerSteps:
    """The per-layer step of the method: pair (when a layer starts its unit group) -> permute -> merge ->
    refit the next layer, with what the report needs of each layer."""

    def __init__(self, plan, state, probe, config, counts, verbose):
        self.plan, self.state, self.probe, self.config = plan, state, probe, config
        self.counts, self.verbose = counts, verbose
        self.group_counts = {}  # group -> shared units, set by the group's first layer
        self.refit_mismatch = {}  # slot index -> what its refit left, reported with that layer
        # slot index -> {task: LayerHessian} of its input, from its refit's Gram where that is the Hessian
        self.input_hessians = {}

    def zip_layer(self, index) -> report_lib.LayerReport:
        plan, state, probe, config = self.plan, self.state, self.probe, self.config
        started = time.perf_counter()
        stages = _Stages()
        position = plan.slots[index].position
        is_head = plan.is_head(index)
        with stages("inputs"):
            probe.advance(index)
        count, pair_now = (0, False) if is_head else self._count(index)
        measured = self.input_hessians.pop(index, None)
        chosen, hessians = np.zeros(0), None
        if count:
            if pair_now:
                with stages("pair"):
                    hessians = _pair_group(plan, state, plan.slots[index].group, index, count, probe, config,
                                           measured)
            with stages("merge"):
                hessians = hessians or measured
                if state.slots[index].attention is not None:
                    chosen, hessians = _merge_attention(plan, state, index, config), {}
                else:
                    chosen, hessians = _merge_slot(plan, state, index, probe, config, hessians)
                # tf_mtz.experimental.ExperimentalConfig; a recurrent layer's pre-activations are its gates'
                if getattr(config, "repair", False) and state.slots[index].recurrent is None:
                    _repair(plan, state, index, probe)
            _warn_rank_deficient(position.name, hessians)
        hessians = hessians or {}
        if config.refit and index + 1 < len(plan.slots) and plan.slots[index + 1].position.handler.refits:
            # The next layer's inputs are final now: refit it before any retraining, which then starts from
            # the refit weights. (After the first head come only heads, whose inputs are final too.)
            with stages("inputs"):
                probe.advance(index + 1)
            if _zipped_producers(plan, state, index + 1):
                with stages("refit"):
                    self.refit_mismatch[index + 1], gram_hessians = _refit(plan, state, index + 1, probe, config)
                if len(gram_hessians) == len(plan.tasks):
                    self.input_hessians[index + 1] = gram_hessians
        layer_report = _layer_report(
            position, state.slots[index], is_head, plan.tasks, chosen,
            {t: hessians[t].samples if t in hessians else 0 for t in plan.tasks},
            [t for t, h in hessians.items() if h.rank_deficient], time.perf_counter() - started,
            {t: state.slots[index].column_order[t][:count].tolist() for t in plan.tasks} if count else {})
        layer_report.mismatch = self.refit_mismatch.pop(index, None)
        layer_report.stage_seconds = stages.seconds
        return layer_report

    def _count(self, index) -> tuple:
        """`(units to share, whether this layer pairs its group now)`, checked against its inputs."""
        plan, slot = self.plan, self.state.slots[index]
        name, group, last = plan.slots[index].position.name, plan.slots[index].group, len(plan.slots) - 1
        pair_now = group not in self.group_counts
        if pair_now:
            self.group_counts[group] = count = self.counts[index]
            if count and slot.shared_inputs == 0:
                raise ZipError(
                    f"Layer '{name}' is set to share {count} units but the layer before it shares none, so its "
                    "shared units would have no shared inputs; share some units of the previous layer.")
            _check_all_or_none(plan, self.state, index, count)
            if count and self.verbose:
                keras_graph.print_message(f"tf_mtz: zipping layer {index + 1}/{last} '{name}': sharing {count} units")
            return count, bool(count)
        count = self.group_counts[group]
        first = plan.slots[plan.groups[group].members[0]].position.name
        if count and slot.shared_inputs == 0:
            raise ZipError(
                f"Layer '{name}' is tied by a residual merge to '{first}', which shares {count} units, but its "
                "own input shares none; share units of the layer feeding it too.")
        _check_all_or_none(plan, self.state, index, count)
        if count and self.verbose:
            keras_graph.print_message(f"tf_mtz: zipping layer {index + 1}/{last} '{name}': {count} units paired "
                                      f"with '{first}'")
        return count, False


def _warn_rank_deficient(layer_name, hessians) -> None:
    deficient = [t for t, h in hessians.items() if h.rank_deficient]
    if deficient:
        warnings.warn(
            f"Layer '{layer_name}': fewer calibration samples than inputs for task(s) {deficient} "
            f"({min(hessians[t].samples for t in deficient)} < {hessians[deficient[0]].dim}); "
            "the Hessian is rank-deficient and damping decides the unseen directions. Give more "
            "calibration data.", RankDeficientWarning, stacklevel=3)


def _fingerprint(model) -> list:
    """Checksums of a model's weights: enough to prove they were not touched, without a copy of them."""
    return [zlib.crc32(np.ascontiguousarray(keras.ops.convert_to_numpy(w)).view(np.uint8)) for w in model.weights]


def resolve_sharing(sharing, plan: graph.ZipPlan) -> list:
    """Turns `sharing` into a number of shared units per hidden layer.

    Raises:
        ZipError: fractions outside [0, 1], counts above the narrowest task's width, unknown layer names.
    """
    hidden = plan.hidden_slots
    widths = [min(int(w[0].shape[-1]) for w in s.position.weights.values()) for s in hidden]

    def to_count(value, width, where):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ZipError(f"sharing{where} must be a fraction in [0, 1] or a unit count, got {value!r}.")
        if isinstance(value, (float, np.floating)):
            if not 0.0 <= value <= 1.0:
                raise ZipError(f"sharing{where} must be in [0, 1], got {value}.")
            return int(round(value * width))
        if not 0 <= value <= width:
            raise ZipError(f"sharing{where} asks for {value} shared units, but the narrowest model has {width}.")
        return int(value)

    if not isinstance(sharing, dict):
        if isinstance(sharing, (int, np.integer)) and not isinstance(sharing, bool) and sharing in (0, 1):
            sharing = float(sharing)
        if not isinstance(sharing, (float, np.floating)):
            raise ZipError(f"sharing must be a fraction in [0, 1] or a dict {{layer_name: fraction | count}}, "
                           f"got {sharing!r}.")
        counts = _whole_where_mixed([to_count(sharing, w, "") for w in widths], plan, float(sharing))
        return _whole_where_recurrent(counts, plan, float(sharing))

    # A model's layer name -> the hidden slots computing it: its own slot (the first, where models reuse a
    # name), or, for a layer tf_mtz computes in parts (a grouped convolution's groups, column blocks), all
    # of theirs.
    names, parts = {}, {}
    for i, slot in enumerate(hidden):
        names.setdefault(slot.position.name, [i])  # qualified inside composite layers: "encoder0/..."
        for layer in slot.position.layers.values():
            names.setdefault(layer.name, [i])
            owner = plan.grouped.get(id(layer), (plan.split_layers.get(id(layer)),))[0] or graph.split_from(layer)
            if owner is not None and i not in parts.setdefault(owner.name, []):
                parts[owner.name].append(i)
    names = {**parts, **names}
    heads = {layer.name for output in plan.outputs for layer in plan.slots[output.slot].position.layers.values()}
    counts = [0] * len(hidden)
    named = {}
    for name, value in sharing.items():
        if name in heads:
            raise ZipError(f"sharing names '{name}', an output layer; output layers are never shared.")
        if name not in names:
            raise ZipError(f"sharing names layer '{name}', which is not a hidden Dense/Conv layer of the "
                           f"models; hidden layers: {[s.position.name for s in hidden]}.")
        slots = names[name]
        if len(slots) > 1:
            # A layer tf_mtz computes in parts (the groups of a grouped convolution): the same share of
            # each part's units.
            total = sum(widths[i] for i in slots)
            to_count(value, total, f"['{name}']")
            value = value / total if isinstance(value, (int, np.integer)) else value
        for i in slots:
            counts[i] = to_count(value, widths[i], f"['{name}']")
            named[i] = name
    # Layers tied by a residual merge share one unit order, hence one count: naming any of them is enough.
    for group in plan.groups.values():
        members = [m for m in group.members if m < len(hidden)]
        given = {counts[m] for m in members if m in named}
        if len(given) > 1:
            raise ZipError(
                f"sharing gives different values to layers {[named[m] for m in members if m in named]}, which "
                "a residual merge ties together (they must share the same units); give one value.")
        value = next(iter(given), 0)
        for m in members:
            counts[m] = value
    return counts


def _whole_where_mixed(counts: list, plan: graph.ZipPlan, fraction: float) -> list:
    """A uniform sharing fraction, applied to unit groups that a layer mixing all their units reads
    (LayerNormalization over channels): those can be shared only all or none, so any fraction above 0
    shares them whole (rounding down would leave the layers after them without shared inputs), with a log
    line naming them. An explicit count per layer (a dict) for such a group is not rounded: it is refused
    when the layers are zipped."""
    counts = list(counts)
    for group_id, group in plan.groups.items():
        mixers = [plan.body[p] for p in group.channel_positions if not plan.body[p].handler.partial_sharing]
        members = [m for m in group.members if m < len(counts)]
        if not mixers or not members:
            continue
        widths = {graph.group_width(plan, group_id, t) for t in plan.tasks}
        if len(widths) > 1:
            continue  # unequal widths cannot be shared whole: `_pair_group` names the layer
        width = widths.pop()
        whole = width if counts[members[0]] > 0 else 0
        if whole != counts[members[0]]:
            logging.info("tf_mtz: sharing all units of '%s' instead of %g of them: '%s' (%s) mixes all its units, "
                         "so they are shared all or none.", plan.slots[members[0]].position.name, fraction,
                         mixers[0].name,
                         type(mixers[0].layers[plan.tasks[0]]).__name__)
        for m in members:
            counts[m] = whole
    return counts


def _whole_where_recurrent(counts: list, plan: graph.ZipPlan, fraction: float) -> list:
    """A uniform sharing fraction, applied to recurrent layers: they are shared all or none and only from a
    fully shared input, so any fraction above 0 shares them and the layers feeding them whole (log lines
    name them). Groups of unequal widths are left as they are: the zipper names the layer."""
    counts = list(counts)
    hidden = len(counts)

    def make_whole(group_id, reason):
        members = [m for m in plan.groups[group_id].members if m < hidden]
        widths = {graph.group_width(plan, group_id, t) for t in plan.tasks}
        if not members or len(widths) > 1 or counts[members[0]] == 0:
            return
        width = widths.pop()
        if counts[members[0]] != width:
            logging.info("tf_mtz: sharing all units of '%s' instead of %g of them: %s.",
                         plan.slots[members[0]].position.name, fraction, reason)
        for m in members:
            counts[m] = width

    for index in range(hidden):
        slot = plan.slots[index]
        if not slot.position.handler.all_or_none or counts[index] == 0:
            continue
        kind = type(slot.position.layers[plan.tasks[0]]).__name__
        make_whole(slot.group, f"{kind} layers share their units all or none")
        spaces = slot.input_space if isinstance(slot.input_space, tuple) else (slot.input_space,)
        spaces = spaces + ((slot.memory_space,) if slot.memory_space is not None else ())
        for space in spaces:
            if not graph.is_input(space):
                make_whole(space, f"'{slot.position.name}' ({kind}) is shared only from a fully shared input")
    return counts


def _check_all_or_none(plan, state, index, count) -> None:
    """Raises `ZipError` where a recurrent or attention layer would share some of its units, or share them
    from an input that is not fully shared: standard Keras layers cannot keep some units out of the others'
    recurrence or attention."""
    slot, position = state.slots[index], plan.slots[index].position
    if not position.handler.all_or_none or count == 0:
        return
    kind = type(position.layers[plan.tasks[0]]).__name__
    widths = [slot.units(t) for t in plan.tasks]
    if any(w != count for w in widths):
        raise ZipError(f"Layer '{position.name}' ({kind}) is set to share {count} of its units {widths}; recurrent "
                       "and attention layers share their units all or none (each unit reads all of them), so "
                       "share all of them, with the same width in every model, or none.")
    rows = {t: state_lib.input_width(slot, t) for t in plan.tasks}
    if any(r != slot.shared_rows for r in rows.values()):
        raise ZipError(f"Layer '{position.name}' ({kind}) is set to be shared, but only {slot.shared_rows} of its "
                       f"{max(rows.values())} inputs are shared; a shared recurrent or attention layer reads a "
                       "fully shared input, so share the layer feeding it fully too (a uniform sharing fraction "
                       "does this).")
    memory = plan.slots[index].memory_space
    if memory is not None and not graph.is_input(memory):
        shared = state.slots[plan.groups[memory].members[0]].shared
        if any(shared != graph.group_width(plan, memory, t) for t in plan.tasks):
            raise ZipError(f"Layer '{position.name}' ({kind}) is set to be shared, but only {shared} units of the "
                           "memory it attends to are shared; a shared cross-attention reads a fully shared memory, "
                           "so share the layers producing it fully too (a uniform sharing fraction does this).")


def _hessians(plan, indices, probe, config) -> dict:
    """`{slot index: {task: LayerHessian}}` of the shared inputs of unit layers, in the current network."""
    result = {}
    for index in indices:
        position = plan.slots[index].position
        handler = position.handler
        mode = _mode(handler, config)
        result[index] = {}
        for tasks in probe.input_groups(index):  # tasks reading one input have one Hessian
            template = position.layers[tasks[0]]
            vocabulary = handler.token_vocabulary(template)
            if vocabulary is not None:
                hessian = statistics.token_hessian(probe.shared_inputs(index, tasks[0]), vocabulary, task=tasks[0],
                                                   layer_name=position.name)
                result[index].update({t: hessian for t in tasks})
                continue
            hessian = statistics.hessian_of_inputs(
                probe.shared_inputs(index, tasks[0]),
                lambda x, template=template: handler.hessian_samples(template, x, mode), task=tasks[0],
                layer_name=position.name, is_first_layer=graph.is_input(plan.slots[index].input_space),
                strategy=probe.strategy)
            result[index].update({t: hessian for t in tasks})
    return result


def _mode(handler, config):
    return config.conv_hessian if config.conv_hessian in handler.hessian_modes else handler.hessian_modes[0]


HESSIAN_PAIRINGS = ("hessian", "correlation")  # the pairings whose costs read the Hessians


def _pair_group(plan, state, group, index, count, probe, config, measured=None):
    """Pairs `count` units of a group across tasks and puts every member, per-channel layer and consumer of
    the group into the paired order [paired, rest]. Merging happens per member, in `_merge_slot`.

    The pair costs add up over the group's members whose inputs are already shared (their costs are
    comparable); the others follow the pairing. `measured`: slot `index`'s Hessians where they are known
    already (from the previous refit, or measured once for all of AutoSharing's trials). Returns the
    Hessians of slot `index`.
    """
    tasks = plan.tasks
    members = plan.groups[group].members
    for position_index in plan.groups[group].channel_positions:
        position = plan.body[position_index]
        if not position.handler.partial_sharing and any(
                count != graph.group_width(plan, group, t) for t in tasks):
            raise ZipError(
                f"Layer '{position.name}' ({type(position.layers[tasks[0]]).__name__}) mixes all units of "
                f"'{plan.slots[members[0]].position.name}', so that layer's units must be shared all or none; "
                f"got {count} of {[graph.group_width(plan, group, t) for t in tasks]}.")
    ready = [m for m in members
             if state.slots[m].shared_inputs > 0 and plan.slots[m].input_space != group]
    # Weight matching pairs from the weights alone: the Hessians are then measured per layer at its merge,
    # not here for every member of the group.
    uses_hessians = config.pairing in HESSIAN_PAIRINGS or (len(tasks) > 2 and config.merge == "hessian")
    hessians = {}
    if uses_hessians:
        known = {index: measured} if measured is not None else {}
        hessians = {**known, **_hessians(plan, [m for m in ready if m not in known], probe, config)}
    blocks, damped, pooled = {}, {}, {}
    for m in ready:
        slot, handler = state.slots[m], plan.slots[m].position.handler
        mode = _mode(handler, config)
        rows = slot.shared_rows
        blocks[m] = {t: handler.to_blocks(slot.kernels[t][..., :rows, :], slot.biases[t], mode) for t in tasks}
        damped[m] = {t: statistics.damped(hessians[m][t], config.damping) if uses_hessians else None
                     for t in tasks}
        pooled[m] = None
        if config.pairing == "correlation":
            pooled[m] = _pooled(list(hessians[m].values()))

    first, second = tasks[0], tasks[1]
    recurrent = [m for m in ready if state.slots[m].recurrent is not None]

    def pair(merged, merged_hessian, t, reference):
        cost = sum(costs_lib.pairing_costs(config.pairing, merged[m], blocks[m][t], merged_hessian[m],
                                           damped[m][t], pooled[m], seed=config.seed + index)
                   for m in ready)
        if not recurrent:
            return matching.match(cost, count, config.matching)
        return _pair_recurrent(plan, state, recurrent, cost, count, config, t, reference)

    # The first two tasks pick `count` pairs; each further task is matched against those shared units,
    # whose Hessian is the sum of the merged tasks' (as in the reference code).
    pick_first, pick_second = pair({m: blocks[m][first] for m in ready}, {m: damped[m][first] for m in ready},
                                   second, np.arange(graph.group_width(plan, group, first)))
    orders = {first: pick_first, second: pick_second}
    if len(tasks) > 2:  # the merged units matter only for matching further tasks; `_merge_slot` merges
        merged = {m: costs_lib.merge_units(config.merge, blocks[m][first][:, :, pick_first],
                                           blocks[m][second][:, :, pick_second], damped[m][first],
                                           damped[m][second]) for m in ready}
        accumulated = {m: _summed(damped[m][first], damped[m][second]) for m in ready}
    for count_merged, t in enumerate(tasks[2:], start=2):
        shared_index, picks = pair(merged, accumulated, t, pick_first)
        order = np.empty(count, np.int64)
        order[shared_index] = picks
        orders[t] = order
        for m in ready:
            merged[m] = costs_lib.merge_units(config.merge, merged[m], blocks[m][t][:, :, order],
                                              accumulated[m], damped[m][t], tasks_in_a=count_merged)
            accumulated[m] = _summed(accumulated[m], damped[m][t])

    if recurrent:
        # In the first task's unit order: a Bidirectional layer's forward units then stay first.
        by_first = np.argsort(orders[first], kind="stable")
        orders = {t: np.asarray(order)[by_first] for t, order in orders.items()}
    permutations = {}
    for t in tasks:
        width = graph.group_width(plan, group, t)
        rest = np.setdiff1d(np.arange(width), orders[t], assume_unique=True)
        permutations[t] = np.concatenate([orders[t], rest]).astype(np.int64)
    state_lib.permute_group(plan, state, group, permutations, count, keep_first=config.merge == "first")
    return hessians.get(index)  # None when not measured: `_merge_slot` measures this layer's


def _pair_recurrent(plan, state, recurrent, cost, count, config, task, reference):
    """Pairs a group holding recurrent layers (all its units): no unit pairs across a Bidirectional layer's
    directions, and with weight matching the pairing alternates with the recurrent kernels, whose rows are
    the units being paired (each pass matches their incoming and outgoing recurrent weights under the
    previous pairing, as Git Re-Basin does for a permutation on both sides of a layer), until it settles.

    `reference`: the first task's unit at each row of `cost` (the units already paired, for a third task).
    """
    first = plan.tasks[0]
    cost = np.array(cost, np.float64)
    for m in recurrent:
        handler, layers = plan.slots[m].position.handler, plan.slots[m].position.layers
        blocks_a = _block_ids(handler.unit_blocks(layers[first]))[reference]
        blocks_b = _block_ids(handler.unit_blocks(layers[task]))
        apart = blocks_a[:, None] != blocks_b[None, :]
        if apart.any():
            # Larger than any difference of the costs of two complete pairings: none crosses directions.
            cost[apart] += (np.ptp(cost) + 1.0) * (cost.shape[0] + 1)
    rows, columns = matching.match(cost, count, config.matching)
    if config.pairing != "weights":
        return rows, columns
    recurrent_a = {m: state_lib.permuted_recurrent(state.slots[m].recurrent[first], reference) for m in recurrent}
    for _ in range(_RECURRENT_ROUNDS):
        partner = np.empty(cost.shape[0], np.int64)
        partner[rows] = columns
        total = cost + sum(costs_lib.recurrent_matching_costs(recurrent_a[m], state.slots[m].recurrent[task], partner)
                           for m in recurrent)
        new_rows, new_columns = matching.match(total, count, config.matching)
        if np.array_equal(new_rows, rows) and np.array_equal(new_columns, columns):
            break
        rows, columns = new_rows, new_columns
    return rows, columns


_RECURRENT_ROUNDS = 10  # a permuted copy settles in one or two; trained pairs in a few


def _block_ids(sizes: list) -> np.ndarray:
    return np.repeat(np.arange(len(sizes)), sizes)


def _summed(hessian_a, hessian_b):
    """The Hessian of merged units (their tasks' sum), or None where the Hessians were not measured."""
    return None if hessian_a is None else hessian_a + hessian_b


class _Stages:
    """Seconds spent per stage of one layer step, for the report."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started


def _pooled(hessians: list):
    """The undamped second moment of all tasks' calibration inputs together (for correlation pairing)."""
    total = sum(h.samples for h in hessians)
    if all(h.factor is not None for h in hessians):
        return statistics.LowRankHessian(
            np.concatenate([h.factor * np.sqrt(h.samples / total) for h in hessians]), 0.0)
    return sum(h.dense() * (h.samples / total) for h in hessians)


def _merge_slot(plan, state, index, probe, config, hessians=None):
    """Gives the paired units of one layer common weights; returns the ΔE each merged unit causes
    (Σ_t ½ δ_tᵀ H_t δ_t, which equals the paper's pair cost for its merge) and the Hessians."""
    tasks = plan.tasks
    slot = state.slots[index]
    handler = plan.slots[index].position.handler
    mode = _mode(handler, config)
    if hessians is None:
        hessians = _hessians(plan, [index], probe, config)[index]
    rows, count = slot.shared_rows, slot.shared
    blocks = {t: handler.to_blocks(slot.kernels[t][..., :rows, :count], slot.biases[t][:count], mode) for t in tasks}
    damped = {t: statistics.damped(hessians[t], config.damping) for t in tasks}
    first = tasks[0]
    merged, accumulated = blocks[first], damped[first]
    for count_merged, t in enumerate(tasks[1:], start=1):
        merged = costs_lib.merge_units(config.merge, merged, blocks[t], accumulated, damped[t],
                                       tasks_in_a=count_merged)
        accumulated = accumulated + damped[t]
    chosen = sum(costs_lib.merge_error(merged, blocks[t], damped[t]) for t in tasks)
    kernel_shape = slot.kernels[first][..., :rows, :count].shape
    merged_kernel, merged_bias = handler.from_blocks(merged, kernel_shape, mode)
    state_lib.merge_shared(state, index, merged_kernel, merged_bias, _merged_recurrent(plan, slot, config))
    return chosen, hessians


def _merged_recurrent(plan, slot, config):
    """The common recurrent weights of a recurrent layer's units (all paired, in one order): the tasks'
    average, whatever the merge of the input weights (the Hessian of [x_t; 1] says nothing of them), or the
    first task's for the "first" merge; None for other layers."""
    if slot.recurrent is None:
        return None
    if config.merge == "first":
        return slot.recurrent[plan.tasks[0]]
    return np.mean([slot.recurrent[t] for t in plan.tasks], axis=0)


def _merge_attention(plan, state, index, config) -> np.ndarray:
    """Zips an attention layer whose units (the stream's) are all paired: matches each further task's heads,
    and within them the query/key and value dims, to the first task's by weight matching (their inputs and
    outputs already in the shared order), reorders them, and gives every task the average (the first task's
    for the "first" merge). Returns per head the matching cost −aᵀb, summed over the tasks matched."""
    tasks, slot = plan.tasks, state.slots[index]
    handler = plan.slots[index].position.handler
    first = tasks[0]
    reference = handler.head_blocks(slot.kernels[first], slot.biases[first], slot.attention[first])
    chosen = np.zeros(reference[0].shape[0])
    for t in tasks[1:]:
        heads, key_dims, value_dims, head_costs = matching.match_heads(
            *reference, *handler.head_blocks(slot.kernels[t], slot.biases[t], slot.attention[t]))
        state_lib.permute_heads(state, index, t, heads, key_dims, value_dims)
        chosen += head_costs
    pick = (lambda values: values[0]) if config.merge == "first" else (lambda values: np.mean(values, axis=0))
    attention = {name: pick([slot.attention[t][name] for t in tasks]) for name in slot.attention[first]}
    state_lib.merge_attention(state, index, pick([slot.kernels[t] for t in tasks]),
                              pick([slot.biases[t] for t in tasks]), attention)
    return chosen


def _exact_mode(handler) -> str:
    """The refit and repair work with the exact (patch) inputs of a convolution, one block of weights."""
    return handler.refit_mode


def _layer_samples(plan, probe, index, t, mode):
    """Pairs of batches (zipped, original) of slot `index`'s augmented inputs (bias column last) for task `t`,
    as rows for that layer's blocks: in the zipped network and in the original model."""
    position = plan.slots[index].position
    handler, template = position.handler, position.layers[t]
    for zipped, original in zip(probe.zipped_inputs(index, t), probe.original_inputs(index, t)):
        yield (statistics.augment(handler.hessian_samples(template, zipped, mode)),
               statistics.augment(handler.hessian_samples(template, original, mode)))


def _original_blocks(plan, state, index, t, mode) -> np.ndarray:
    """The original layer's weights as one block, its units in the state's current column order."""
    position = plan.slots[index].position
    kernel, bias = position.weights[t]
    order = state.slots[index].column_order[t]
    if not np.array_equal(order, np.arange(order.size)):  # a layer not paired yet keeps its order
        kernel, bias = kernel[..., order], bias[order]  # (a copy: VGG-16's fc6 kernel is 0.4 GB)
    return position.handler.to_blocks(kernel, bias, mode)[0]


def _repair(plan, state, index, probe) -> None:
    """Rescales the merged units of slot `index` so their pre-activation mean and standard deviation on the
    calibration data match the average of the original paired units' (one affine map per unit, common to
    all tasks since the unit is shared)."""
    slot = state.slots[index]
    position = plan.slots[index].position
    handler = position.handler
    mode = _exact_mode(handler)
    count = slot.shared
    moments = []  # per task: (current mean, current std, target mean, target std), each (count,)
    for t in plan.tasks:
        current = handler.to_blocks(slot.kernels[t][..., :count], slot.biases[t][:count], mode)[0]
        original = _original_blocks(plan, state, index, t, mode)[:, :count]
        sums = np.zeros((4, count))
        total = 0
        for zipped_inputs, original_inputs in _layer_samples(plan, probe, index, t, mode):
            zipped = tf.matmul(zipped_inputs, current).numpy()
            target = tf.matmul(original_inputs, original).numpy()
            sums += [zipped.sum(0), (zipped.astype(np.float64) ** 2).sum(0), target.sum(0),
                     (target.astype(np.float64) ** 2).sum(0)]
            total += len(zipped)
        mean, square, target_mean, target_square = sums / total
        moments.append((mean, np.sqrt(np.maximum(square - mean ** 2, 0)), target_mean,
                        np.sqrt(np.maximum(target_square - target_mean ** 2, 0))))
    mean, std, target_mean, target_std = (np.mean(m, axis=0) for m in zip(*moments))
    scale = np.where(std > 1e-12, target_std / np.maximum(std, 1e-12), 1.0)
    shift = target_mean - scale * mean
    state_lib.rescale_shared(state, index, scale, shift)


def _zipped_producers(plan, state, index) -> bool:
    """Whether any unit layer feeding slot `index` (through weightless, per-channel and merge layers) has
    shared units: then the merges changed this layer's inputs, and the refit corrects for them."""
    return any(state.slots[j].shared for j in _producers(plan, index))


def _producers(plan, index) -> list:
    """Slot indices of the unit layers whose outputs reach slot `index`'s input through weightless layers,
    per-channel layers and merges: one walk back from the layer."""
    found, stack, seen = [], list(plan.slots[index].position.parents), set()
    while stack:
        p = stack.pop()
        if p in seen or graph.is_input(p):
            continue
        seen.add(p)
        if p in plan.slot_indices:
            found.append(plan.slot_indices[p])
        else:
            stack.extend(plan.body[p].parents)
    return sorted(found)


def _refit(plan, state, slot_index, probe, config, ridge: float = 1e-3) -> float:
    """Refits one unit layer, per task, by ridge least squares so that its pre-activations in the zipped
    network match the original model's on the calibration data (compensating the merges before it).

    The statistics come from every row: stride-1 convolutions and Dense layers sum them without forming
    their patches (`UnitLayerHandler.input_moments`). With `config.refit_rows_per_input`, a convolution's
    statistics use a random subset of its patches instead (at most that many rows per kernel input).
    Tasks that read the same zipped input (`Probe.input_groups`: a fully shared trunk) share its Gram
    matrix and its factorisation; only their targets differ.

    Returns the mismatch that is left, summed over tasks, each task's relative to the variance of its
    original pre-activations (on the rows used), and `{task: LayerHessian}` of the layer's shared input
    for the tasks whose Gram matrix is that Hessian (`hessian_is_refit_gram`; every row used).
    """
    slot = state.slots[slot_index]
    handler = plan.slots[slot_index].position.handler
    mode = _exact_mode(handler)
    mismatch, hessians = 0.0, {}
    template = plan.slots[slot_index].position.layers[plan.tasks[0]]
    reuse = handler.hessian_is_refit_gram(template, _mode(handler, config)) and slot.shared_rows > 0
    for tasks in probe.input_groups(slot_index):
        # Ridge towards the current weights, not towards zero: where the zipped inputs already reproduce
        # the original pre-activations, the refit changes nothing.
        currents = [handler.to_blocks(slot.kernels[t], slot.biases[t], mode)[0] for t in tasks]
        accumulated, task_sums, every_row = _refit_statistics(plan, state, probe, slot_index, tasks, mode, config,
                                                              currents)
        if reuse and every_row and not accumulated.low_rank:
            hessian = _shared_hessian(accumulated, slot.shared_rows)
            if hessian is not None:
                hessians.update({t: hessian for t in tasks})
        steps, shrink, residuals = _ridge_steps(accumulated, ridge)
        columns = np.cumsum([0] + [int(c.shape[1]) for c in currents])
        for t, current, (start, stop), (target_sum, target_square, residual_square) in zip(
                tasks, currents, zip(columns[:-1], columns[1:]), task_sums):
            step = steps[:, start:stop]
            if residuals is not None:
                left = float(np.sum(residuals[:, start:stop]))
            else:
                # ‖R − XΔ‖² from the statistics alone: ‖R‖² − 2⟨Δ, XᵀR⟩ + ⟨Δ, XᵀXΔ⟩, where (XᵀX + ρI)Δ = XᵀR
                # gives XᵀXΔ = XᵀR − ρΔ (no d×d product).
                left = (residual_square - float(np.sum(step * accumulated.cross[:, start:stop]))
                        - shrink * float(np.sum(step * step)))
            variance = max(target_square - float(np.sum(target_sum ** 2)) / max(accumulated.count, 1), 1e-12)
            mismatch += max(left, 0.0) / variance
            solution = (current + step).astype(np.float32, copy=False)
            kernel, bias = handler.from_blocks(solution[None], slot.kernels[t].shape, mode)
            state_lib.replace_task_weights(state, slot_index, t, kernel, bias)
    return mismatch, hessians


def _shared_hessian(accumulated, shared_rows: int):
    """The Hessian of the shared rows (and the bias) from a refit's Gram matrix, before its ridge is added;
    None where it is not finite (the Hessian measured anew then names the problem)."""
    gram = accumulated.gram
    kept = np.r_[0:shared_rows, gram.shape[0] - 1]
    matrix = gram[np.ix_(kept, kept)] / accumulated.count
    if not np.isfinite(matrix).all():
        return None
    return statistics.LayerHessian(matrix, accumulated.count)


def _ridge_steps(accumulated, ridge: float) -> tuple:
    """The ridge solution Δ = (XᵀX + ρI)⁻¹ XᵀR for every target column at once, ρ = ridge · mean diagonal.

    Returns `(Δ, ρ, None)` from a Gram matrix, or, from kept rows (fewer samples than inputs: fc6 of
    VGG-16 from 64 images), `(Δ, ρ, squared residuals R − XΔ per entry)` by Δ = Xᵀ (XXᵀ + ρI)⁻¹ R, an n×n
    system instead of d×d, with Δ formed in float32 (the weights' precision; those layers are large).
    """
    if accumulated.low_rank:
        rows, targets = accumulated.rows(), accumulated.targets()
        kernel_matrix = rows @ rows.T
        shrink = ridge * max(float(np.trace(kernel_matrix)) / rows.shape[1], 1e-12)
        coefficients = np.linalg.solve(kernel_matrix + shrink * np.eye(len(rows)), targets)
        step = rows.T.astype(np.float32) @ coefficients.astype(np.float32)
        return step, shrink, (targets - kernel_matrix @ coefficients) ** 2
    gram = accumulated.gram
    dim = gram.shape[0]
    shrink = ridge * max(np.trace(gram) / dim, 1e-12)
    gram[np.diag_indices(dim)] += shrink  # in place: the accumulator is not used again
    return costs_lib.solve_positive_definite(gram, accumulated.cross), shrink, None


def _refit_statistics(plan, state, probe, slot_index, tasks, mode, config, currents) -> tuple:
    """What the refit of slot `slot_index` needs for `tasks`, which read one zipped input X̃, streamed over
    the calibration batches: Σ X̃ᵀX̃ and Σ X̃ᵀR with the tasks' residuals R = T − X̃W side by side (T a
    task's original pre-activations, W its current weights), per task `(Σ T per unit, Σ T², Σ R²)`
    for the mismatch, and whether every row was used (no patch subset).

    Layers with a shortcut for these moments (stride-1 convolutions: `input_moments`) never form their
    patches; the others, a patch subset (`refit_rows_per_input`) and fewer rows than features (a low-rank
    Gram that keeps its rows) stream the rows.
    """
    position = plan.slots[slot_index].position
    handler, template = position.handler, position.layers[tasks[0]]
    features = int(currents[0].shape[0])
    # Wide layers' weights are large (VGG-16 fc6: 0.4 GB per copy in float32): one TF copy each, dropped
    # with this function's frame before the solve.
    originals = [tf.constant(_original_blocks(plan, state, slot_index, t, mode), tf.float32) for t in tasks]
    currents = [tf.constant(c, tf.float32) for c in currents]
    accumulated = statistics.StreamedGram()
    sums = [[0.0, 0.0, 0.0] for _ in tasks]
    samples = probe.samples(tasks[0])
    every_row = True
    key = (config.seed, slot_index, plan.tasks.index(tasks[0]))
    original_batches = [probe.original_inputs(slot_index, t) for t in tasks]
    for batch, zipped in enumerate(probe.zipped_inputs(slot_index, tasks[0])):
        originals_now = [batches[batch] for batches in original_batches]
        rows = handler.sample_count(template, zipped, mode)
        keep = _refit_share(config, features, rows / int(zipped.shape[0]) * samples)
        moments = None
        if keep >= 1.0 and rows / int(zipped.shape[0]) * samples >= features:
            targets = [handler.pre_activations(position.layers[t], x, w, mode)
                       for t, x, w in zip(tasks, originals_now, originals)]
            residuals = [target - handler.pre_activations(template, zipped, w, mode)
                         for target, w in zip(targets, currents)]
            moments = handler.input_moments(template, zipped, tf.concat(residuals, axis=-1), mode)
        if moments is not None:
            accumulated.add_moments(*moments, rows)
        else:
            chosen = _subsample(rows, keep, key + (batch,)) if keep < 1.0 else None
            every_row = every_row and chosen is None
            samples_of = (lambda layer, x: handler.hessian_rows(layer, x, mode, chosen)) if chosen is not None \
                else (lambda layer, x: handler.hessian_samples(layer, x, mode))
            zipped = statistics.augment(samples_of(template, zipped))
            targets = [tf.matmul(statistics.augment(samples_of(position.layers[t], x)), w)
                       for t, x, w in zip(tasks, originals_now, originals)]
            residuals = [target - tf.matmul(zipped, w) for target, w in zip(targets, currents)]
            accumulated.add(zipped, tf.concat(residuals, axis=-1))
        for task_sums, target, residual in zip(sums, targets, residuals):
            # Per-unit sums in float32 (TensorFlow reduces in blocks), totals in float64: these only scale
            # the reported mismatch, and a float64 copy of a 224x224 layer's targets costs as much as its
            # moments.
            task_sums[0] += tf.reduce_sum(target, axis=0).numpy().astype(np.float64)
            task_sums[1] += float(np.sum(tf.reduce_sum(tf.square(target), axis=0).numpy(), dtype=np.float64))
            task_sums[2] += float(np.sum(tf.reduce_sum(tf.square(residual), axis=0).numpy(), dtype=np.float64))
        del zipped, originals_now, targets, residuals, moments  # conv patches: up to a GB a batch
    return accumulated, [tuple(task_sums) for task_sums in sums], every_row


def _refit_share(config, features: int, rows: float) -> float:
    """The share of a layer's statistics rows the refit keeps: all, or `refit_rows_per_input` per feature."""
    if config.refit_rows_per_input is None or rows <= 0:
        return 1.0
    return min(1.0, config.refit_rows_per_input * features / rows)


def _subsample(rows: int, share: float, key: tuple) -> np.ndarray:
    """A fixed random subset of `rows` row indices (the same for the zipped and original inputs), sorted."""
    count = max(1, int(round(rows * share)))
    return np.sort(np.random.default_rng(list(key)).choice(rows, count, replace=False))


def _retrain(plan, state, retrain, trainer_inputs, steps, label, verbose, phase):
    teachers, activations, datasets_for, strategy = trainer_inputs
    datasets = datasets_for(phase)
    with (strategy.scope() if strategy is not None else contextlib.nullcontext()):
        built = rebuild.build_model(plan, state, name="retrain")
        students = {key: keras.Model(built.model.inputs, logits) for key, logits in built.logits.items()}
    trainer = retrain_lib.JointTrainer(students, activations, retrain, datasets, teachers, strategy)
    loss = trainer.run(steps, label, verbose)
    state_lib.absorb_trained(state, built.bindings)
    return loss


def _accuracy(model, evaluation: dict, single_output: bool = False) -> dict:
    """Per-task share of correct predictions (argmax; 0.5 threshold for one-unit outputs)."""
    result = {}
    for task, dataset in evaluation.items():
        correct = total = 0
        for x, y in dataset:
            out = model(x, training=False)
            out = np.asarray(out if single_output else out[task])
            y = np.asarray(y)
            if out.shape[-1] == 1:
                predicted, truth = (out[..., 0] > 0.5).astype(np.int64), y.reshape(-1).astype(np.int64)
            else:
                predicted = np.argmax(out, axis=-1)
                truth = np.argmax(y, axis=-1) if y.ndim == out.ndim else y.reshape(-1)
            correct += int(np.sum(predicted == truth))
            total += len(predicted)
        result[task] = correct / max(total, 1)
    return result


def _layer_report(position, slot, is_head, tasks, chosen, samples, deficient, seconds, shared_units):
    spatial = {t: int(np.prod(slot.kernels[t].shape[:-2])) for t in tasks}
    rows = {t: slot.kernels[t].shape[-2] for t in tasks}
    before = sum(spatial[t] * rows[t] * slot.units(t) + slot.units(t) for t in tasks)
    k, shared_rows = slot.shared, slot.shared_rows
    after = 0
    if k:
        t0 = tasks[0]
        after += spatial[t0] * shared_rows * k + k
        after += sum(spatial[t] * (rows[t] - shared_rows) * k for t in tasks)
    after += sum(spatial[t] * rows[t] * (slot.units(t) - k) + (slot.units(t) - k) for t in tasks)
    if slot.attention is not None:  # shared all or none
        size = {t: slot.kernels[t].size + slot.biases[t].size + sum(w.size for w in slot.attention[t].values())
                for t in tasks}
        before, after = sum(size.values()), (size[tasks[0]] if k else sum(size.values()))
    if slot.recurrent is not None:  # shared all or none
        recurrent = {t: slot.recurrent[t][:, :-1].size for t in tasks}
        before += sum(recurrent.values())
        after += recurrent[tasks[0]] if k else sum(recurrent.values())
    return report_lib.LayerReport(
        name=position.name, kind=type(position.layers[tasks[0]]).__name__, head=is_head,
        units={t: slot.units(t) for t in tasks}, shared=k,
        cost_sum=float(np.sum(chosen)) if len(chosen) else 0.0,
        cost_max=float(np.max(chosen)) if len(chosen) else 0.0,
        params_before=int(before), params_after=int(after), calibration_samples=samples,
        rank_deficient=deficient, seconds=seconds, shared_units=shared_units)
