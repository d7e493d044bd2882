"""Baselines and research switches: what the benchmarks compare the default recipe against.

None of these beat the default in the measurements (docs/design.md); they stay usable for comparisons and
experiments through one configuration class that widens `tf_mtz.ZipConfig`'s option values.
"""

from __future__ import annotations

import dataclasses

from tf_mtz import config as config_lib


@dataclasses.dataclass(frozen=True)
class ExperimentalConfig(config_lib.ZipConfig):
    """`tf_mtz.ZipConfig` with the baselines allowed.

    Args (besides those of `ZipConfig`):
        pairing: also "euclidean" (distance of incoming weights), "correlation" (of the units'
            pre-activations on the pooled calibration data, as ZipIt! pairs features) or "random".
        merge: also "first" (keep the first task's weights).
        conv_hessian: also "patch": the exact Hessian of a convolution's im2col patches.
        group_matching: "blocks" (the default, as in `ZipConfig`): the groups of grouped convolutions are
            lined up as blocks before zipping (`tf_mtz.group_pairing`); "in_order": group k with group k.
        repair: after merging a layer, rescale and shift each merged unit so that the mean and spread of
            its pre-activation on the calibration data are the average of its paired original units' (in
            the spirit of REPAIR, Jordan et al. 2023); the refit corrects the next layer instead.

    Example:

    ```python
    from tf_mtz.experimental import ExperimentalConfig
    random_pairs = tf_mtz.zip_models(models, x, config=ExperimentalConfig(pairing="random", refit=False))
    ```
    """

    repair: bool = False
    group_matching: str = "blocks"

    allowed = {"pairing": config_lib.PAIRINGS + ("euclidean", "correlation", "random"),
               "matching": config_lib.MATCHINGS, "merge": config_lib.MERGES + ("first",),
               "conv_hessian": config_lib.CONV_HESSIANS + ("patch",), "group_matching": ("blocks", "in_order")}
