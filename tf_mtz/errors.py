"""What tf_mtz raises and warns: one error type whose message names the model, layer or task at fault."""


class ZipError(ValueError):
    """Raised for inputs tf_mtz cannot zip or export; the message names the model, layer or task at fault."""


class RankDeficientWarning(UserWarning):
    """A layer's Hessian came from fewer calibration samples than the layer has inputs."""
