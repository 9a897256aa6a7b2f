"""Every model.arch with every weighting method: one epoch on tiny generated scenes (4 tasks, dense and pooled
heads), in each method's first allowed grad_on. Prints the seconds per architecture and every pair that failed;
GradDrop (representation only) is refused, by design, on the architectures without a shared representation.

    python benchmarks/arch_method_matrix.py            (about 15 minutes on 2 CPU cores)
"""

import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "workflows"))

from test_multitask import scenes_config  # noqa: E402

from mtl.models.architectures import arch_names  # noqa: E402
from mtl.weighting import WEIGHTINGS  # noqa: E402
from mtl.workflows.train import run  # noqa: E402


def main() -> None:
    failed = []
    for arch in arch_names():
        start = time.perf_counter()
        for name in WEIGHTINGS.names():
            method = WEIGHTINGS.get(name)
            grad_on = getattr(method, "grad_on_modes", ("params",))[0]
            options = [f"model.arch={arch}", f"weighting.name={name}", f"weighting.grad_on={grad_on}"]
            with tempfile.TemporaryDirectory() as d:
                try:
                    cfg = scenes_config(
                        Path(d), *options, "train.epochs=1", "data.batch_size=4", n=8 * method.samples, size=16
                    )
                    if not math.isfinite(run(cfg, quiet=True)["final"]["val"]["loss"]):
                        failed.append((arch, name, "non-finite validation loss"))
                except Exception as e:  # noqa: BLE001 - report every failure, go on
                    failed.append((arch, name, f"{type(e).__name__}: {e}"))
        print(f"{arch}: {time.perf_counter() - start:.0f} s", flush=True)
    print(f"{len(failed)} of {len(arch_names()) * len(WEIGHTINGS.names())} pairs failed")
    for arch, name, why in failed:
        print(f"  {arch} + {name}: {why}")


if __name__ == "__main__":
    main()
