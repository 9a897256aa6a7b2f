"""Accuracy of each gradient-balancing method against an exact reference, per spread of task-gradient norms.

    python benchmarks/solver_accuracy.py                  # T = 2..10, D = 100,000, spreads 1..1e4
    python benchmarks/solver_accuracy.py --dim 10000 --seeds 1
    python benchmarks/solver_accuracy.py --timing         # milliseconds per call, T = 3, 10, 40

For every case (T tasks, a kind of Jacobian: random / correlated / rank-deficient, a seed) the exact answer
is computed once by brute force in float64 (``tests/weighting/exact_references.py``: every support enumerated), and
the method is run on the gradients times each global scale (1e-8, 1, 1e8). The agreement is the cosine
between the method's direction and the reference (``exact_references.agreement``; a reference shorter than
1e-3 of the largest gradient, as when the origin is in the hull, has no direction to compare: 1 if the
method is within 1e-5 of the largest gradient of it, else -1). IMTL-G and Nash-MTL are undefined for
rank-deficient gradients (their systems are singular) and are measured on the other kinds only.
Nash-MTL has no closed form: its row is the worst residual ``max |a_i (M a)_i - 1|`` of the bargaining
equation (its weights are float32, so about 1e-7 is exact). Prints the worst value per method, kind and spread, at
scale 1 and over all three scales.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "weighting"))
import exact_references as ref  # noqa: E402

from mtl.weighting import build_weighting  # noqa: E402
from mtl.weighting import gradient as gw  # noqa: E402

SCALES = (1e-8, 1.0, 1e8)


def _agreement(d: torch.Tensor, reference: torch.Tensor, largest: float) -> float:
    return ref.agreement(d, reference, largest)


def _gradvac_adjust(t: int) -> Callable:
    phi_hat = torch.zeros(t, t, dtype=torch.float64)

    def vaccine(i: int, j: int, p: torch.Tensor, gj: torch.Tensor) -> torch.Tensor:
        phi, target = min(max(float(p @ gj / (p.norm() * gj.norm())), -1.0), 1.0), float(phi_hat[i, j])
        if phi < target:
            p = p + gj * p.norm() * (target * (1 - phi**2) ** 0.5 - phi * (1 - target**2) ** 0.5) / (
                gj.norm() * (1 - target**2) ** 0.5
            )
        phi_hat[i, j] = 0.5 * target + 0.5 * phi
        return p

    return vaccine


def references(grads: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Exact directions (float64) for the methods with a closed or brute-force answer."""
    t = grads.shape[0]
    m = ref.gram64(grads)
    alpha = torch.linalg.lstsq(m, m.diagonal().sqrt().unsqueeze(1), driver="gelsd").solution[:, 0]
    order = gw._other_tasks_in_random_order(t, grads.device, build_weighting("pcgrad", ["t"] * t).generator())
    return {
        "mgda": ref.min_norm_point(grads)[1],
        "cagrad": ref.cagrad_direction(grads, 0.4)[0] / 1.16,
        "upgrad": ref.upgrad_direction(grads),
        "aligned_mtl": ref.aligned_direction(grads),
        "imtl_g": (alpha / alpha.sum()) @ grads.double(),
        "pcgrad": ref.surgery_reference(grads, order, ref.pcgrad_projection),
        "gradvac": ref.surgery_reference(grads, order, _gradvac_adjust(t)),
    }


def nash_residual(grads: torch.Tensor) -> float:
    t = grads.shape[0]
    _, w = build_weighting("nash_mtl", [f"t{i}" for i in range(t)])(grads, torch.ones(t))
    a = w.double()
    return float((a * (ref.gram64(grads) @ a) - 1).abs().max())


def timing(dim: int, repeats: int = 20) -> None:
    """Median milliseconds per call of each method on (T, D) correlated gradients with a norm spread of 100."""
    methods = ["mgda", "cagrad", "upgrad", "aligned_mtl", "imtl_g", "nash_mtl", "pcgrad", "gradvac"]
    sizes = (3, 10, 40)
    print(
        f"`python benchmarks/solver_accuracy.py --timing --dim {dim}`, {time.strftime('%Y-%m-%d')}, "
        f"{torch.get_num_threads()} threads: median ms per call over {repeats} calls\n"
    )
    print("| method | " + " | ".join(f"T = {t}" for t in sizes) + " |\n|---|" + "---:|" * len(sizes))
    for name in methods:
        cells = []
        for t in sizes:
            grads = ref.random_jacobian(t, dim, 100.0, "correlated", 1.0, seed=t)
            method = build_weighting(name, [f"t{i}" for i in range(t)])
            method(grads, torch.ones(t))  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                method(grads, torch.ones(t))
                times.append(time.perf_counter() - start)
            cells.append(f"{1000 * sorted(times)[len(times) // 2]:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=100_000, help="D, the gradient length (default: %(default)s)")
    parser.add_argument("--tasks", default="2-10", help="range of T (default: %(default)s)")
    parser.add_argument("--spreads", default="1,10,100,1000,10000", help="norm spreads (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=2, help="Jacobians per (T, kind, spread) (default: %(default)s)")
    parser.add_argument("--timing", action="store_true", help="only the time per call (D = --dim)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.timing:
        timing(args.dim)
        return 0
    lo, hi = (int(x) for x in args.tasks.split("-"))
    spreads = [float(s) for s in args.spreads.split(",")]
    methods = ["mgda", "cagrad", "upgrad", "aligned_mtl", "imtl_g", "pcgrad", "gradvac"]
    rows = [(m, k) for m in methods + ["nash_mtl"] for k in ref.KINDS]
    worst: Dict[tuple, Dict[float, float]] = {r: {} for r in rows}  # over every scale
    unit: Dict[tuple, Dict[float, float]] = {r: {} for r in rows}  # at scale 1
    start = time.perf_counter()
    for spread in spreads:
        for t in range(lo, hi + 1):
            for kind in ref.KINDS:
                for seed in range(args.seeds):
                    base = ref.random_jacobian(t, args.dim, spread, kind, 1.0, seed)
                    exact = references(base)
                    largest = float(base.double().norm(dim=1).max())
                    for scale in SCALES:
                        grads = base * scale
                        for name in methods:
                            if name == "imtl_g" and kind == "rank-deficient":
                                continue
                            method = build_weighting(name, [f"t{i}" for i in range(t)])
                            d, _ = method(grads, torch.ones(t))
                            value = _agreement(d / scale, exact[name], largest)
                            for table in (worst, unit) if scale == 1.0 else (worst,):
                                table[name, kind][spread] = min(table[name, kind].get(spread, 1.0), value)
                        if kind != "rank-deficient":
                            res = nash_residual(grads)
                            for table in (worst, unit) if scale == 1.0 else (worst,):
                                table["nash_mtl", kind][spread] = max(table["nash_mtl", kind].get(spread, 0.0), res)
        print(f"spread {spread:g} done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    print(
        f"`python benchmarks/solver_accuracy.py {' '.join(argv if argv is not None else sys.argv[1:])}`, "
        f"{time.strftime('%Y-%m-%d')}: T = {lo}..{hi}, D = {args.dim:,}, kinds {', '.join(ref.KINDS)}, "
        f"{args.seeds} seeds, scales {', '.join(f'{s:g}' for s in SCALES)}\n"
    )
    for title, table in (("at scale 1", unit), ("over the scales " + ", ".join(f"{s:g}" for s in SCALES), worst)):
        print(f"\n{title} (worst cosine; Nash-MTL: worst residual):\n")
        print("| method | gradients | " + " | ".join(f"spread {s:g}" for s in spreads) + " |")
        print("|---|---|" + "---:|" * len(spreads))
        for name, kind in rows:
            if not table[name, kind]:
                continue  # undefined for this kind
            fmt = "{:.1e}" if name == "nash_mtl" else "{:.6f}"
            print(f"| {name} | {kind} | " + " | ".join(fmt.format(table[name, kind][s]) for s in spreads) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
