"""Adding a task to a zipped model: the further models are matched against the units the zipped tasks
already share (the paper's procedure for more than two models), and those units keep their weights."""

from __future__ import annotations

import dataclasses

import keras

from tf_mtz import config as config_lib
from tf_mtz import experimental, graph, keras_graph, prefix
from tf_mtz.errors import ZipError
from tf_mtz.retrain import fine_tune


def task_models(zipped: keras.Model) -> dict:
    """`{task: keras.Model}`: each task of a zipped model as a model of its own (its input to that task's
    output), sharing the zipped model's layers, so that it can be zipped like any task model.

    Raises:
        ZipError: `zipped` does not have outputs keyed by task (a dict), or has several outputs per task.
    """
    return _renamed_parts(_task_parts(zipped))


def _renamed_parts(parts: dict) -> dict:
    """`task_models` from the zipped model's task parts (`_task_parts`)."""
    return {task: _renamed(part, task) for task, part in parts.items()}


def _task_parts(zipped: keras.Model) -> dict:
    """`{task: keras.Model}` from the zipped model's input to each task's output, on its own layers.

    Raises:
        ZipError: as `task_models`.
    """
    keras_graph.check_graph_model(zipped, f"Zipped model '{getattr(zipped, 'name', zipped)}'")
    outputs = keras_graph.output_structure(zipped)
    if not isinstance(outputs, dict):
        raise ZipError(f"Model '{zipped.name}' does not have its outputs keyed by task (a dict), as tf_mtz's zipped "
                       "models have; add_task takes a model that zip_models returned (saved and loaded is fine).")
    if any("/" in key for key in outputs):
        raise ZipError(f"Model '{zipped.name}' has several outputs per task ({sorted(outputs)}); add_task takes "
                       "zipped models of single-output tasks so far.")
    inputs = keras_graph.model_inputs(zipped)
    return {task: keras.Model(inputs[0] if len(inputs) == 1 else inputs, tensor, name=task)
            for task, tensor in keras_graph.output_structure(zipped).items()}


def _shared_layer_names(parts: dict) -> set:
    """The names, as the task models have them (`_task_model_names`), of the weighted layers that more than
    one of a zipped model's task parts (`_task_parts`) computes with."""
    users = {}
    for task, part in parts.items():
        names = _task_model_names(part, task)
        for layer in part.layers:
            if layer.weights:
                users.setdefault(id(layer), []).append(names[id(layer)])
    return {name for names in users.values() if len(names) > 1 for name in names}


def _model_name(name: str, task: str) -> str:
    """A zipped model's layer name as its task model had it: "fc1" for "fc1_shared", "head" for
    "<task>_head"."""
    name = name[len(task) + 1:] if name.startswith(f"{task}_") else name
    return name[:-len("_shared")] if name.endswith("_shared") else name


def _task_model_names(model: keras.Model, task: str) -> dict:
    """`{id(layer): name}` of one task's part of a zipped model as `task_models` names them: the models'
    names again (`_model_name`), or the zipped names where that would name two layers alike (partly shared
    layers: "fc1_shared" and "a_fc1")."""
    stripped = {id(layer): _model_name(layer.name, task) for layer in model.layers}
    if len(set(stripped.values())) != len(stripped):
        return {id(layer): layer.name for layer in model.layers}
    return stripped


def _renamed(model: keras.Model, task: str) -> keras.Model:
    """A copy of one task's part of a zipped model whose layers have their models' names again
    (`_task_model_names`), so that zipping it again names layers as before."""
    names = _task_model_names(model, task)
    if all(names[id(layer)] == layer.name for layer in model.layers):  # partly shared: kept as they are
        return model

    def clone(layer):
        return type(layer).from_config({**layer.get_config(), "name": names[id(layer)]})

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


_WHOLE_ONLY = ("add_task reads the zipped model '{name}' as one model per task, which matches the added models "
               "only where the zipped model shares its hidden layers whole and the added models have its layers; "
               "zip the original models together instead.")


def add_task(zipped: keras.Model, models: dict, calibration_data, sharing=1.0, retrain=None, config=None, *,
             teachers=None, checkpoint_dir=None, verbose: int = 1) -> keras.Model:
    """Zips one or more further models into a zipped model.

    The zipped model's tasks become task models again (`task_models`), and all are zipped together with
    the new ones first paired against the units the zipped tasks share; units shared before keep their
    weights (the zipped tasks' outputs stay the same where nothing else changes: with the refit off and no
    retraining, a new task that shares only already-shared units leaves them exactly as they were). The
    zipped model must share its hidden layers whole (a fully shared trunk); otherwise zip the original
    models together instead. An added model may be deeper (or differ after the zipped trunk): it is zipped
    over the common prefix (as `zip_models` does for models of different depths), as long as the layers
    the zipped tasks share all lie in that prefix.

    Args:
        zipped: a model `tf_mtz.zip_models` returned (or loaded from its file), outputs keyed by task.
        models: `{task: keras.Model}` to add, with new task names and the same inputs and layer types.
        calibration_data: as `zip_models` takes it, for every task, the zipped model's tasks included
            (one value for all, or a dict with every task).
        sharing: as in `zip_models`: the fraction (or per-layer counts) of each layer shared by all tasks.
        retrain: a `tf_mtz.Retrain`, or None. Retraining trains every task, the zipped model's too.
        config: a `tf_mtz.ZipConfig`; its `merge` is replaced by keeping the shared units' weights.
        teachers: `{task: original keras.Model}` for the zipped model's tasks: the final retraining
            (`retrain.final_steps`) then distils them from these, as zipping all at once would, instead of
            from the zipped model's own outputs (which keeps its errors). Per-layer steps still distil
            from the zipped model.
        checkpoint_dir: as in `zip_models`: a checkpoint after every layer step, resumed by a rerun.
        verbose: as in `zip_models`.

    Returns:
        A zipped model with outputs for the zipped model's tasks and the new ones, and its `zip_report`.

    Raises:
        ValueError (`tf_mtz.ZipError`): a task name already in the zipped model, a zipped model whose
            layers are not shared whole, teachers for unknown tasks, or what `zip_models` refuses.

    Example:

    ```python
    zipped = tf_mtz.zip_models({"digits": a, "parity": b}, x)
    zipped = tf_mtz.add_task(zipped, {"size": c}, x)
    zipped.predict(x)  # {"digits": ..., "parity": ..., "size": ...}
    ```
    """
    from tf_mtz.zipper import zip_models  # the zip loop; it does not import this module

    parts = _task_parts(zipped)
    existing = _renamed_parts(parts)
    clash = sorted(set(existing) & set(models))
    if clash:
        raise ZipError(f"Task name(s) {clash} are already in the zipped model '{zipped.name}'; give the added "
                       "models new names.")
    if not isinstance(models, dict) or not models:
        raise ZipError("add_task needs {task: keras.Model} of at least one model to add.")
    config = config or config_lib.ZipConfig()
    if not isinstance(config, config_lib.ZipConfig):
        raise ZipError(f"config must be a tf_mtz.ZipConfig or None, got {type(config).__name__}.")
    keep = experimental.ExperimentalConfig(**{**config.as_dict(), "merge": "first"})
    graph.check_models_dict({**existing, **models})
    split = prefix.split({**existing, **models})
    if split is not None:
        # A deeper added model zips over the common prefix; the zipped tasks' branches then hold only their
        # own layers. Where a branch would hold layers the zipped tasks share, their trunk would come apart.
        shared = _shared_layer_names(parts)
        cut = sorted({name for t in existing for name in split.branch_layers(t)} & shared)
        if cut:
            raise ZipError(f"The models differ ({split.reason}), and the zipped tasks share layers after that "
                           f"({cut}), which only a zip of their common prefix would keep apart. "
                           + _WHOLE_ONLY.format(name=zipped.name))
    teachers = dict(teachers or {})
    unknown = sorted(set(teachers) - set(existing))
    if unknown:
        raise ZipError(f"add_task's teachers name {unknown}, which are not tasks of the zipped model '{zipped.name}' "
                       f"({sorted(existing)}); the added models teach themselves.")
    final = None
    if teachers and retrain is not None and retrain.final_steps:
        final, retrain = retrain, (dataclasses.replace(retrain, final_steps=0) if retrain.steps_per_layer else None)
    try:
        grown = zip_models({**existing, **models}, calibration_data, sharing=sharing, retrain=retrain, config=keep,
                           checkpoint_dir=checkpoint_dir, verbose=verbose)
    except ZipError as error:
        if "same layer types" in str(error) or "wired to different" in str(error) or "same depth" in str(error):
            raise ZipError(f"{error} " + _WHOLE_ONLY.format(name=zipped.name)) from error
        raise
    if final is not None:
        data = final if final.data is not None else dataclasses.replace(final, data=calibration_data)
        fine_tune(grown, data, final.final_steps, teachers={**existing, **teachers, **models}, verbose=verbose)
        grown.zip_report.settings["retrain"] = {**final.settings(), "teachers": sorted(teachers)}
    return grown
