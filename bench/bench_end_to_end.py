"""Whole evaluations side by side, on a trained (non-robust) model, in one process.

1. Robust accuracy under PGD-10: ``robench.evaluate`` (any-iterate, early stop,
   only clean-correct samples attacked, continuous batching) against torchattacks'
   PGD-10 over the same data followed by a scoring forward pass; the same run
   without refill beside it. Each row prints the time ratio beside the
   gradient-work ratio (forward+backward passes): early stop removes work, and
   refilling the freed slots is what turns that into time.
2. A 5-eps PGD-10 sweep: one robench run with ``sweep_reuse`` against five
   separate robench runs, one per eps.

    python bench/bench_end_to_end.py --device cpu
    python bench/bench_end_to_end.py --device cuda --model cifar-resnet18 --images 10000

The default model is the digits CNN trained here for a few seconds on
scikit-learn's digits (real images, CPU-sized); ``--model cifar-resnet18`` trains a CIFAR
ResNet-18 for ``--epochs`` on CIFAR-10 from ``--data-root`` (GPU-sized).
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
import torchvision

import robench
from robench.examples import digits_cnn, train_classifier


def digits_split():
    """scikit-learn's digits, 70/30 stratified: (x_train, y_train, x_test, y_test), float images in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = torch.from_numpy(np.round(bunch.images * 255 / 16).astype(np.float32) / 255)[:, None]
    y = torch.from_numpy(bunch.target.astype(np.int64))
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=1, stratify=y)
    return x_tr, y_tr, x_te, y_te


def digits(args):
    x_tr, y_tr, x_te, y_te = digits_split()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = digits_cnn()
    train_classifier(model, x_tr, y_tr, epochs=25, seed=1)
    # 540 test digits are too few to time: tile them (each copy has its own index, so its own random start).
    x_te, y_te = x_te.repeat(args.tile, 1, 1, 1), y_te.repeat(args.tile)
    # eps 0.2 is where PGD-10 breaks this undefended model (robust accuracy < 1%), the
    # situation the early-stop comparison is about; CIFAR models get there at 8/255.
    return model, x_te, y_te, args.eps or 0.2


def cifar(args):
    from bench_attacks import cifar_resnet18

    tf = torchvision.transforms.ToTensor()
    train = torchvision.datasets.CIFAR10(args.data_root, train=True, download=args.download, transform=tf)
    test = torchvision.datasets.CIFAR10(args.data_root, train=False, download=args.download, transform=tf)
    x_tr = torch.stack([train[i][0] for i in range(len(train))])
    y_tr = torch.tensor(train.targets)
    x_te = torch.stack([test[i][0] for i in range(min(args.images, len(test)))])
    y_te = torch.tensor(test.targets[:len(x_te)])
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = cifar_resnet18()
    device = torch.device(args.device)
    model.to(device)
    train_classifier(model, x_tr.to(device), y_tr.to(device), epochs=args.epochs, seed=1, batch_size=256)
    return model.cpu(), x_te, y_te, args.eps or 8 / 255


def gradient_work(result) -> int:
    """Forward+backward image passes of a robench run (its entries' gradient_evals)."""
    return sum(a["gradient_evals"] for a in result.doc["attacks"])


def timed(fn) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="digits", choices=["digits", "cifar-resnet18"])
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--tile", type=int, default=10, help="digits: copies of the 540 test images")
    parser.add_argument("--eps", type=float, default=None, help="default 0.2 (digits), 8/255 (CIFAR)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each PGD-10 variant (fastest counts)")
    args = parser.parse_args()
    model, x, y, eps = (digits if args.model == "digits" else cifar)(args)
    device = torch.device(args.device)
    model.to(device).eval()
    step = 2.5 * eps / 10
    pgd = {"name": "pgd10", "attacks": [{"attack": "pgd", "eps": eps, "steps": 10, "step_size": step}]}
    common = dict(device=args.device, batch_size=args.batch_size, compile="off")
    robench.evaluate(model, (x[:64], y[:64]), pgd, **common)  # warm-up
    import torchattacks

    def reference():
        attack = torchattacks.PGD(model, eps=eps, alpha=step, steps=10, random_start=True)
        correct = 0
        for s in range(0, len(x), args.batch_size):
            xb, yb = x[s:s + args.batch_size].to(device), y[s:s + args.batch_size].to(device)
            adv = attack(xb, yb)
            with torch.no_grad():
                correct += int((model(adv).argmax(1) == yb).sum())
        return correct / len(x)

    def seeded_reference():
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return reference()

    # The three runs take turns, each --repeats times, and the fastest of each counts: on a shared
    # machine the load drifts, and interleaving keeps the drift out of the ratios.
    runs = {"ours": lambda: robench.evaluate(model, (x, y), pgd, **common),
            "plain": lambda: robench.evaluate(model, (x, y), pgd, refill=False, **common),
            "theirs": seeded_reference}
    best: dict[str, float] = {}
    results: dict[str, object] = {}
    for _ in range(args.repeats):
        for name, fn in runs.items():
            seconds, results[name] = timed(fn)
            best[name] = min(best.get(name, seconds), seconds)
    ours_s, refill_off_s, theirs_s = best["ours"], best["plain"], best["theirs"]
    ours, plain, theirs_acc = results["ours"], results["plain"], results["theirs"]

    eps_list = [eps * f for f in (0.25, 0.5, 0.75, 1.0, 1.5)]
    sweep = {"name": "sweep", "attacks": [{"attack": "pgd", "eps": eps_list, "steps": 10, "step_size": "2.5*eps/10"}]}
    sweep_s, swept = timed(lambda: robench.evaluate(model, (x, y), sweep, sweep_reuse=True, **common))
    separate_s, separate_work = 0.0, 0
    for e in eps_list:
        one = {"name": "one", "attacks": [{"attack": "pgd", "eps": e, "steps": 10, "step_size": "2.5*eps/10"}]}
        s, single = timed(lambda: robench.evaluate(model, (x, y), one, **common))
        separate_s += s
        separate_work += gradient_work(single)

    # Gradient work: forward+backward passes per image. torchattacks runs all 10 steps on every image.
    ours_work, theirs_work = gradient_work(ours), 10 * len(x)
    assert gradient_work(plain) == ours_work, "refill changes how the work is packed, never how much there is"
    work_ratio, time_ratio = theirs_work / ours_work, theirs_s / ours_s

    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.machine()
    print(f"{dev} · {args.model} · {len(x)} images · eps {eps:.4g} · batch {args.batch_size} · fp32 · "
          f"best of {args.repeats} · "
          f"robench {robench.__version__}, "
          f"torch {torch.__version__}, torchattacks {torchattacks.__version__}")
    print("| comparison | robench s | reference s | time ratio | gradient-work ratio | time / work | accuracies |")
    print("|---|---|---|---|---|---|---|")
    print(f"| PGD-10 robust accuracy, any-iterate + early stop + refill vs torchattacks PGD-10 | {ours_s:.2f} | "
          f"{theirs_s:.2f} | {time_ratio:.2f}x | {work_ratio:.2f}x | {time_ratio / work_ratio:.2f} | "
          f"robench {100 * ours.robust_accuracy:.2f}%, torchattacks {100 * theirs_acc:.2f}% "
          f"(clean {100 * ours.clean_accuracy:.2f}%) |")
    plain_ratio = theirs_s / refill_off_s
    print(f"| the same without refill (--no-refill) vs torchattacks PGD-10 | {refill_off_s:.2f} | {theirs_s:.2f} | "
          f"{plain_ratio:.2f}x | {work_ratio:.2f}x | {plain_ratio / work_ratio:.2f} | samples equal: "
          f"{plain.samples.equals(ours.samples)} |")
    accs = ", ".join(f"{100 * a['accuracy']:.1f}" for a in swept.doc["attacks"])
    sweep_work = separate_work / gradient_work(swept)
    print(f"| 5-eps PGD-10 sweep with sweep reuse vs 5 separate runs | {sweep_s:.2f} | {separate_s:.2f} | "
          f"{separate_s / sweep_s:.2f}x | {sweep_work:.2f}x | {separate_s / sweep_s / sweep_work:.2f} | "
          f"sweep accuracies {accs} % |")


if __name__ == "__main__":
    main()
