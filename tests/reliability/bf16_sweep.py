"""How far each bfloat16 result of a recurrent op is from its yardstick, over random tiny
cases: the distribution behind test_layer_op_bfloat16_error_within_twice_eager's 2x
bound (RELIABILITY.md quotes it). Not a test; run from the repository root:

    .venv/bin/python tests/reliability/bf16_sweep.py lstm [cases]     (or gru, rnn-tanh)

Prints, per output and gradient, the median, p99 and largest ratio error / max(yardstick,
floor), then the worst cases (ratio, tensor, T, B, I, H).
"""
import importlib
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]
tp = importlib.import_module("reliability.test_ops_properties")


def main(name: str, cases: int = 300) -> None:
    kind = next(k for k in tp.R_KINDS if k.name == name)
    rng = random.Random(0)
    ratios: dict[str, list[float]] = {}
    worst = []
    for i in range(cases):
        T, B = rng.randint(1, 8), rng.randint(1, 4)
        I, H = rng.choice([1, 2, 3, 8]), rng.choice([1, 2, 3, 8])
        case = dict(kind=name, T=T, B=B, I=I, H=H, D=1, biases=(rng.random() < .5,) * kind.n_biases,
                    lengths=None, random_states=rng.random() < .5, grad=(True, True, True),
                    loss_uses=(True,) * (1 + kind.n_states), weight_scale=rng.choice([0.5, 1.0]),
                    dtype="float32", threads=1, seed=i)
        try:
            rows = tp.bf16_errors(kind, case)
        except Exception as exc:  # noqa: BLE001  (hypothesis' assume() in relu kinks)
            if type(exc).__name__ != "UnsatisfiedAssumption":
                raise
            continue
        for what, err, yardstick, floor in rows:
            r = err / max(yardstick, floor, 1e-30)
            ratios.setdefault(what, []).append(r)
            worst.append((round(r, 3), what, T, B, I, H))
    for what, rs in ratios.items():
        rs.sort()
        print(f"{what:20s} n {len(rs):4d}  median {rs[len(rs) // 2]:.2f}  "
              f"p99 {rs[int(len(rs) * .99)]:.2f}  max {rs[-1]:.2f}")
    print("worst:", sorted(worst, reverse=True)[:5])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lstm", int(sys.argv[2]) if len(sys.argv) > 2 else 300)
