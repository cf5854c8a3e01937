"""AutoAttack standard end to end: robench's ``autoattack`` entry against torchattacks' AutoAttack members.

torchattacks' ``AutoAttack`` class runs APGD, APGD-T and FAB at 10 iterations; the reference
(and robench) runs 100. So the reference side here is torchattacks' own members at the
reference hyper-parameters, chained as AutoAttack chains them (``MultiAttack``: each member
attacks only the points still robust): APGD-CE (100 steps), APGD-T (100 steps, 9 targets),
FAB-T (100 steps, 9 targets), Square (5,000 queries). Both sides score their adversarial
examples with one more forward pass; robust accuracy is printed beside time.

    python bench/bench_autoattack.py --device cpu
    python bench/bench_autoattack.py --device cuda --model cifar-resnet18 --images 1000 --precision bf16 \\
        --compile on

The digits model (trained here in seconds) is the CPU row; ``--model cifar-resnet18`` trains
a CIFAR ResNet-18 for ``--epochs`` on CIFAR-10 from ``--data-root``.
"""

from __future__ import annotations

import argparse
import platform

import torch

import robench
from bench_end_to_end import cifar, digits, timed


def torchattacks_autoattack(model, eps: float, norm: str, n_classes: int):
    import torchattacks

    members = [
        torchattacks.APGD(model, norm=norm, eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
        torchattacks.APGDT(model, norm=norm, eps=eps, steps=100, n_restarts=1, n_classes=n_classes, seed=0),
        torchattacks.FAB(model, norm=norm, eps=eps, steps=100, n_restarts=1, multi_targeted=True,
                         n_classes=n_classes, seed=0),
        torchattacks.Square(model, norm=norm, eps=eps, n_queries=5000, n_restarts=1, seed=0),
    ]
    return torchattacks.MultiAttack(members)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="digits", choices=["digits", "cifar-resnet18"])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--tile", type=int, default=1, help="digits: copies of the 540 test images")
    parser.add_argument("--eps", type=float, default=None, help="default 0.1 (digits), 8/255 (CIFAR)")
    parser.add_argument("--norm", default="linf", choices=["linf", "l2"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", default="off", choices=["off", "on"])
    args = parser.parse_args()
    if args.model == "digits":
        model, x, y, eps = digits(args)
        eps = args.eps or 0.1  # digits: where about half the points survive PGD
    else:
        model, x, y, eps = cifar(args)
    device = torch.device(args.device)
    model.to(device).eval()
    suite = {"name": "autoattack", "attacks": [{"attack": "autoattack", "norm": args.norm, "eps": eps}]}
    options = dict(device=args.device, batch_size=args.batch_size, precision=args.precision, compile=args.compile)
    robench.evaluate(model, (x[:32], y[:32]), suite, **options)  # warm-up (and compilation, when asked)
    ours_s, ours = timed(lambda: robench.evaluate(model, (x, y), suite, **options))

    reference = torchattacks_autoattack(model, eps, "Linf" if args.norm == "linf" else "L2", n_classes=10)

    def theirs():
        correct = 0
        for s in range(0, len(x), args.batch_size):
            xb, yb = x[s:s + args.batch_size].to(device), y[s:s + args.batch_size].to(device)
            adv = reference(xb, yb)
            with torch.no_grad():
                correct += int((model(adv).argmax(1) == yb).sum())
        return correct / len(x)

    theirs_s, theirs_acc = timed(theirs)
    auto = ours.doc["attacks"][0]
    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.machine()
    import torchattacks

    print(f"{dev} · {args.model} · {len(x)} images · {args.norm} eps {eps:.4g} · batch {args.batch_size} · "
          f"{args.precision} · compile {args.compile} · robench {robench.__version__}, torch {torch.__version__}, "
          f"torchattacks {torchattacks.__version__}")
    print("| comparison | robench s | torchattacks s | time ratio | robench robust % | torchattacks robust % | "
          "robench log |")
    print("|---|---|---|---|---|---|---|")
    log = ", ".join(f"{p['attack']} {100 * p['accuracy_after']:.2f}" for p in auto["parts"])
    print(f"| AutoAttack standard (reference settings) | {ours_s:.1f} | {theirs_s:.1f} | {theirs_s / ours_s:.2f}x | "
          f"{100 * auto['accuracy']:.2f} | {100 * theirs_acc:.2f} | clean {100 * ours.clean_accuracy:.2f}, "
          f"{log} |")


if __name__ == "__main__":
    main()
