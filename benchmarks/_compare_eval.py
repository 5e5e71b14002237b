"""Tables of ``gpu_check.sh``: evaluation metrics on the device versus the CPU, or a quickstart run's metrics.

python benchmarks/_compare_eval.py OUT gpu                  # OUT/{gpu,cpu}/eval_*/version_*/metrics.json
python benchmarks/_compare_eval.py OUT/fsdp2 fsdp2 --quickstart
"""

from __future__ import annotations

import glob
import json
import sys


def _merged(pattern: str) -> dict[str, float]:
    merged: dict[str, float] = {}
    for path in sorted(glob.glob(pattern)):
        with open(path) as file:
            merged.update(json.load(file))
    return merged


def compare(out: str, device: str) -> None:
    """Print the device-versus-CPU table; exit non-zero when metrics are missing."""
    on_device = _merged(f"{out}/{device}/eval_*/version_*/metrics.json")
    on_cpu = _merged(f"{out}/cpu/eval_*/version_*/metrics.json")
    if not on_device or set(on_device) != set(on_cpu):
        sys.exit("evaluation metrics missing")
    print(f"\n| evaluation metric (quickstart checkpoint, demo sets) | {device} | cpu | equal |")
    print("|---|---|---|---|")
    worst = 0.0
    for key in sorted(on_device):
        diff = abs(on_device[key] - on_cpu[key])
        worst = max(worst, diff)
        print(f"| {key} | {on_device[key]:.4f} | {on_cpu[key]:.4f} | {'yes' if diff < 1e-6 else f'diff {diff:.2e}'} |")
    print(f"\nlargest difference {device} vs cpu: {worst:.2e} (ranks of near-ties may differ in float32)")


def quickstart(out: str, strategy: str) -> None:
    """Print the main metrics of a quickstart run."""
    metrics = _merged(f"{out}/quickstart/version_*/metrics.json")
    keys = ["train/loss", "val/loss", "val/demo/i2t_R@10", "val/demo_retrieval/i2t_R@10", "val/demo_zeroshot/top1"]
    missing = [key for key in keys if key not in metrics]
    if missing:
        sys.exit(f"quickstart under {strategy}: missing {missing}")
    print(f"quickstart under {strategy}: " + ", ".join(f"{key} {metrics[key]:.3f}" for key in keys))


if __name__ == "__main__":
    if "--quickstart" in sys.argv:
        quickstart(sys.argv[1], sys.argv[2])
    else:
        compare(sys.argv[1], sys.argv[2])
