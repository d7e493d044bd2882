"""Golden zips: the exact weights a fixed set of small zips produces, so that restructuring the core cannot
change a number unnoticed.

Each case's digest is the SHA-256 of its zipped model's weight arrays (float32 bytes, each array hashed on
its own and the digests sorted, so layer names and order do not count), with the pairing (the report's
shared units) and the norm of every weight stored beside it for a readable diff. The last bits depend on
the CPU's vector instructions and vendor (oneDNN picks other kernels with AVX-512, and Intel's and AMD's
AVX-512 CPUs differ too), so digests are kept per machine class (`machine()`); on a class with none
recorded, the pairing and the norms are still checked. A change
meant to alter numbers regenerates the file in a commit of its own that says why (dropping the digests
of other machine classes, which it makes stale):

    python tests/test_golden.py --update

and a new machine class, where the pairing and norms agree, adds its digests with `--add-machine`.
"""

import hashlib
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tflite_examples"))

from conftest import mlp, randomize_batch_norms, resnet  # noqa: E402

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden_zips.json")


def _lenet5(name, seed):
    import keras

    from models import lenet_5

    keras.utils.set_random_seed(seed)
    return lenet_5(name)


def _residual(name, seed):
    return randomize_batch_norms(resnet(name, depth=8, width=8, input_shape=(16, 16, 3), seed=seed), seed)


def _inputs(shape, count=192):
    return np.random.default_rng(7).normal(size=(count,) + shape).astype("float32")


# case -> (models factory, calibration shape, sharing)
ARCHITECTURES = {
    "mlp_pair": (lambda: {"a": mlp("a", seed=0), "b": mlp("b", widths=(28, 16), seed=1)}, (20,), 0.75),
    "lenet5_pair": (lambda: {"a": _lenet5("a", 0), "b": _lenet5("b", 1)}, (784,), 0.5),
    "residual_pair": (lambda: {"a": _residual("a", 0), "b": _residual("b", 1)}, (16, 16, 3), 0.75),
    "mlp_three": (lambda: {t: mlp(t, seed=s) for t, s in (("a", 0), ("b", 1), ("c", 2))}, (20,), 0.5),
}
CASES = [f"{arch}/{method}" for arch in ARCHITECTURES for method in ("default", "paper")]


def zip_case(case: str):
    import tf_mtz

    arch, method = case.split("/")
    make, shape, sharing = ARCHITECTURES[arch]
    config = tf_mtz.ZipConfig.paper() if method == "paper" else tf_mtz.ZipConfig()
    return tf_mtz.zip_models(make(), _inputs(shape), sharing=sharing, config=config, verbose=0)


def machine() -> str:
    """The TensorFlow version, the widest vector instructions and the vendor of this CPU: what the last bits
    depend on."""
    import tensorflow as tf

    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        flags = ""
    simd = "avx512" if " avx512f" in flags else "avx2" if " avx2" in flags else "other"
    # Intel and AMD CPUs with the same instructions still differ in the last bits (oneDNN's kernels).
    vendor = next((line.split(":")[1].strip() for line in flags.splitlines() if line.startswith("vendor_id")),
                  "unknown")
    return f"tf{tf.__version__}-{simd}-{vendor}"


def summary(zipped) -> dict:
    arrays = [np.ascontiguousarray(np.asarray(w, np.float32)) for w in zipped.get_weights()]
    digests = sorted(hashlib.sha256(a.tobytes() + str(a.shape).encode()).hexdigest() for a in arrays)
    return {
        "digests": {machine(): hashlib.sha256("".join(digests).encode()).hexdigest()},
        "shared_units": [{t: " ".join(map(str, units)) for t, units in layer.shared_units.items()}
                         for layer in zipped.zip_report.layers],
        "norms": sorted(round(float(np.linalg.norm(a)), 5) for a in arrays),
    }


@pytest.fixture(scope="module")
def golden():
    with open(GOLDEN) as f:
        return json.load(f)


@pytest.mark.parametrize("case", CASES)
def test_zipped_weights_match_the_golden_digest(case, golden):
    got, want = summary(zip_case(case)), golden[case]
    assert got["shared_units"] == want["shared_units"], "the pairing changed"
    assert got["norms"] == pytest.approx(want["norms"], rel=5e-4, abs=2e-5), "weights changed beyond rounding"
    if machine() in want["digests"]:
        assert got["digests"][machine()] == want["digests"][machine()], \
            "weights changed in the last bits (see the module docstring)"


if __name__ == "__main__" and ("--update" in sys.argv or "--add-machine" in sys.argv):
    with open(GOLDEN) as f:
        old = json.load(f)
    new = {}
    for case in CASES:
        new[case] = summary(zip_case(case))
        if "--add-machine" in sys.argv:
            assert new[case]["shared_units"] == old[case]["shared_units"], f"{case}: the pairing differs"
            assert new[case]["norms"] == pytest.approx(old[case]["norms"], rel=5e-4, abs=2e-5), f"{case}: the norms differ"
            new[case] = {**old[case], "digests": {**old[case]["digests"], **new[case]["digests"]}}
    with open(GOLDEN, "w") as f:
        json.dump(new, f, indent=1)
        f.write("\n")
    print(f"wrote {GOLDEN} ({machine()})")
