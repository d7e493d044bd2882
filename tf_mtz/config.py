"""How to zip: one frozen configuration, its two presets, and the option values the CLI's flags offer too.

`ZipConfig()` is the measured-best default recipe (weight matching with the optimal assignment, averaged
weights, least-squares refit of each next layer; docs/design.md has the numbers behind it);
`ZipConfig.paper()` is the published procedure (Hessian merge costs, greedy matching, Hessian-weighted
merge, no refit). The baselines the benchmarks compare against live in `tf_mtz.experimental`.
"""

from __future__ import annotations

import dataclasses
import math

from tf_mtz.errors import ZipError

PAIRINGS = ("weights", "hessian")
MATCHINGS = ("optimal", "greedy")
MERGES = ("average", "hessian")
CONV_HESSIANS = ("channel",)


@dataclasses.dataclass(frozen=True)
class ZipConfig:
    """Options of `tf_mtz.zip_models`, validated on construction.

    Args:
        pairing: how units are paired: "weights" (weight matching, as in Git Re-Basin: the default) or
            "hessian" (the paper's merge cost ΔE = ½ dᵀ H_A (H_A+H_B)⁻¹ H_B d).
        matching: "optimal" (least total cost, the default) or "greedy" (cheapest pairs first, the paper).
        merge: how a pair's weights become one: "average" (the default) or "hessian"
            ((H_A+H_B)⁻¹(H_A w_A + H_B w_B), the paper).
        refit: refit every layer whose inputs earlier merges changed, per task, by ridge least squares to
            the original model's pre-activations, once its inputs are final (the default; the paper has
            no refit).
        refit_rows_per_input: None (the default) refits from every row; a number makes a convolution's
            refit read a fixed random subset of its patches, at most that many rows per kernel input
            (for strided or dilated convolutions the Gram matrix of every patch costs many times the
            layer's forward pass; stride-1 ones sum it without patches). Faster, at a
            measured cost before retraining: 32 gave 4.03 / 5.84 % test error instead of 3.27 / 4.75 %
            on the residual MNIST pair of docs/benchmarks.md. Dense layers have one row per sample.
        conv_hessian: "channel": the reference code's per-offset Hessian of a convolution
            (`tf_mtz.experimental` also has the exact patch Hessian).
        damping: λ = damping · trace(H)/dim added to each Hessian, so singular Hessians stay solvable.
        batch_size: calibration batch size. None (the default): 256, or more samples for small networks
            (up to 2,048 while every layer output of a batch stays within 16M values), for which the calls
            per batch, not the arithmetic, set the time; models with attention layers or inputs of any
            length keep 256.
        activation_memory_gib: how much memory the layer activations of the calibration data may take;
            beyond it they are written to a temporary directory and read back batch by batch (slower,
            same results). Per task, the zipped and the original network's activations where a later
            layer still reads them are kept.
        max_samples: at most this many calibration samples per task are read (the first ones): calibration
            data may then be an endless `tf.data` stream or a generator, and memory does not grow with it.
            None reads all the data (an endless stream is then refused).
        seed: seed of any random choice (the experimental random pairing).

    Raises:
        ValueError (`tf_mtz.ZipError`): an unknown option value, naming the valid ones.

    Example:

    ```python
    zipped = tf_mtz.zip_models(models, x, config=tf_mtz.ZipConfig.paper())
    zipped = tf_mtz.zip_models(models, x, config=tf_mtz.ZipConfig(matching="greedy", damping=1e-3))
    ```
    """

    pairing: str = "weights"
    matching: str = "optimal"
    merge: str = "average"
    refit: bool = True
    refit_rows_per_input: int | None = None
    conv_hessian: str = "channel"
    damping: float = 1e-2
    batch_size: int | None = None
    activation_memory_gib: float = 4.0
    max_samples: int | None = None
    seed: int = 0

    #: The option values this class accepts (`tf_mtz.experimental.ExperimentalConfig` widens them).
    allowed = {"pairing": PAIRINGS, "matching": MATCHINGS, "merge": MERGES, "conv_hessian": CONV_HESSIANS}

    def __post_init__(self):
        for name, values in self.allowed.items():
            if getattr(self, name) not in values:
                hint = " (the baselines are in tf_mtz.experimental.ExperimentalConfig)" if type(self) is ZipConfig else ""
                raise ZipError(f"{name} must be one of {values}, got {getattr(self, name)!r}{hint}.")
        if not isinstance(self.refit, bool):
            raise ZipError(f"refit must be True or False, got {self.refit!r}.")
        rows = self.refit_rows_per_input
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ZipError(f"refit_rows_per_input must be a positive integer or None, got {rows!r}.")
        damping = self.damping
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) \
                or damping < 0:
            raise ZipError(f"damping must be a finite number >= 0, got {damping!r}.")
        size = self.batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ZipError(f"batch_size must be a positive integer or None, got {size!r}.")
        memory = self.activation_memory_gib
        if isinstance(memory, bool) or not isinstance(memory, (int, float)) or not memory >= 0 \
                or not math.isfinite(memory):
            raise ZipError(f"activation_memory_gib must be a finite number >= 0, got {memory!r}.")
        bound = self.max_samples
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int) or bound < 1):
            raise ZipError(f"max_samples must be a positive integer or None, got {bound!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ZipError(f"seed must be an integer, got {self.seed!r}.")

    @classmethod
    def paper(cls, **changes) -> "ZipConfig":
        """The published procedure: Hessian costs, greedy matching, Hessian-weighted merge, no refit.

        Args:
            **changes: fields to set differently, e.g. `damping=1e-3`.

        Returns:
            A configuration of this class.

        Example:

        ```python
        config = tf_mtz.ZipConfig.paper(batch_size=64)
        ```
        """
        return cls(**{"pairing": "hessian", "matching": "greedy", "merge": "hessian", "refit": False, **changes})

    def replace(self, **changes) -> "ZipConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        """The options as a plain dict (what the report's `settings` records)."""
        return dataclasses.asdict(self)
