"""AutoAttack standard end to end: robench against the reference implementation and torchattacks.

Three implementations of the same composite on the same clean points, one after another in
this process:

* robench's ``autoattack`` entry, eager and with ``--compile on`` (the compiled run's first
  call, compilation included, is shown beside a second, compiled-already run);
* the reference, fra31/auto-attack's ``AutoAttack(version='standard')``, from a local checkout
  named by ``--reference PATH`` (it is on GitHub, not on PyPI; the column is left out without one);
* torchattacks' members at the reference hyper-parameters, chained as AutoAttack chains them
  (``MultiAttack``: each member attacks only the points still robust): APGD-CE (100 steps),
  APGD-T (100 steps, 9 targets), FAB-T (100 steps, 9 targets), Square (5,000 queries).
  torchattacks' own ``AutoAttack`` class runs APGD, APGD-T and FAB at 10 iterations.

Each side's adversarial examples are scored with one more forward pass; robust accuracy is
printed beside time. Every side first runs on 8 points (a warm-up; a compiled run compiles there, and
that time is printed), then the timed runs take turns, ``--repeats`` each; the fastest counts.
``--members`` adds a table per member run alone on the same points, eager and (with ``--compile on`` or
``both``) compiled: its time, its passes (robench counts them per sample), the floor those passes cost
(each call's batch size and kind logged, then made again through the same forward, in order and back to
back) and ``time / floor``, and beside it a lower bound: each size's fastest pass of five times its count;
run and floors take turns ``--repeats`` times, the fastest of each counts.

Models (``--model``): ``digits`` (the bundled ``example:digits`` CNN and test digits), ``digits-pgd-at``
(the ``digits-pgd-at`` recipe, trained here in about 20 s: most points stay robust, so every
member runs on most of them), ``resnet20`` (a CIFAR-shaped ResNet-20 on 32x32 three-channel
upscaled digits, trained here briefly: compute dominates) and ``cifar-resnet18`` (CIFAR-10 from
``--data-root``, GPU-sized).

    python bench/bench_autoattack.py --device cpu --threads 1 --reference ../auto-attack --members
    python bench/bench_autoattack.py --model digits-pgd-at --threads 1 --reference ../auto-attack
    python bench/bench_autoattack.py --device cuda --model cifar-resnet18 --images 1000 --precision bf16 \\
        --compile on
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

import robench
from bench_end_to_end import cifar, digits_split, timed
from robench.attacks.autoattack import AutoAttack
from robench.evaluation.speed import speed_up


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


def reference_autoattack(path: str, model, eps: float, norm: str, device: torch.device):
    """fra31/auto-attack's standard version, imported from the checkout at ``path``."""
    sys.path.insert(0, str(Path(path).resolve()))
    from autoattack import AutoAttack as Reference

    return Reference(model, norm=norm, eps=eps, version="standard", seed=0, verbose=False, device=str(device))


def bundled_digits():
    """``example:digits``: the bundled CNN and its 540 test digits (eps 0.1: about half the points survive)."""
    import numpy as np

    from robench.examples import example_data_path
    from robench.models.loading import load_example_model

    with np.load(example_data_path("digits")) as data:
        x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).float() / 255
        y = torch.from_numpy(data["y"]).long()
    return load_example_model("digits").model, x, y, 0.1


def pgd_trained_digits(args):
    """The digits-pgd-at recipe trained here (on example:digits' train split); the bundled test digits."""
    from robench.models.loading import load_model
    from robench.training.recipe import builtin_recipes, load_recipe
    from robench.training.trainer import train

    _, x, y, _ = bundled_digits()
    out = Path(tempfile.mkdtemp(prefix="bench-aa-")) / "digits-pgd-at"
    train(load_recipe(str(builtin_recipes()["digits-pgd-at"])), out)
    return load_model(str(out / "model.safetensors")).model, x, y, 0.1


def resnet20_digits(args):
    """A CIFAR-shaped ResNet-20 (3x3 stem, stages of 16/32/64 channels) on the digits upscaled to 32x32 RGB,
    trained here for ``--epochs``."""
    from robench.examples import train_classifier
    from robench.models.zoo import SmallImageResNet

    def rgb32(images):
        return F.interpolate(images, size=32, mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)

    x_tr, y_tr, x_te, y_te = digits_split()
    with torch.random.fork_rng():
        torch.manual_seed(1)
        net = SmallImageResNet([3, 3, 3], [16, 32, 64], num_classes=10, in_channels=3)
    train_classifier(net, rgb32(x_tr), y_tr, epochs=args.epochs, seed=1)
    return net, rgb32(x_te), y_te, 8 / 255


def load(args):
    if args.model == "digits":
        model, x, y, eps = bundled_digits()
    elif args.model == "digits-pgd-at":
        model, x, y, eps = pgd_trained_digits(args)
    elif args.model == "resnet20":
        model, x, y, eps = resnet20_digits(args)
    else:
        model, x, y, eps = cifar(args)
    model.eval()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    # The clean-correct points: every implementation attacks only those, so all sides do the same work.
    x, y = x[correct][:args.images], y[correct][:args.images]
    return model, x, y, args.eps or eps


def scored(model, adv, y, batch_size: int) -> float:
    with torch.no_grad():
        return sum(int((model(a).argmax(1) == b).sum()) for a, b in zip(adv.split(batch_size), y.split(batch_size))) \
            / len(y)


class PassLog(torch.nn.Module):
    """The model, logging its calls in order: (batch size, whether the call carries an input gradient)."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model
        self.order: list[tuple[int, bool]] = []

    def forward(self, x):
        self.order.append((len(x), torch.is_grad_enabled() and x.requires_grad))
        return self.model(x)


def corner_batches(x, y, eps: float, norm: str, sizes) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Per batch size, that many points moved by +-step per pixel (corners of the threat model's ball), as the
    attacks send them: some CPU kernels (PyTorch's NCHW max-pooling among them) branch on the values and
    run faster on clean images."""
    step = eps if norm == "linf" else eps / x[0].numel() ** 0.5  # on the L2 sphere
    generator = torch.Generator().manual_seed(0)
    batches = {}
    for size in sorted(sizes):
        rows = torch.arange(size) % len(x)
        corners = torch.where(torch.rand(x[rows].shape, generator=generator) < 0.5, -step, step).to(x.device)
        batches[size] = (x[rows] + corners).clamp(0, 1), y[rows]
    return batches


def one_pass(model, xb, yb, gradient: bool) -> None:
    """A forward pass, or one with the input gradient of the cross-entropy."""
    if gradient:
        xg = xb.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xg), yb), xg)
    else:
        with torch.no_grad():
            model(xb)


def fastest_pass_floor(model, batches, order: list[tuple[int, bool]], repeats: int = 5) -> float:
    """Each (size, kind) of pass timed alone ``repeats`` times after a warm-up; its fastest time times its count."""
    total = 0.0
    for (size, gradient), count in Counter(order).items():
        xb, yb = batches[size]
        one_pass(model, xb, yb, gradient)  # warm-up
        total += count * min(timed(lambda: one_pass(model, xb, yb, gradient))[0] for _ in range(repeats))
    return total


def replayed_floor(model, batches, order: list[tuple[int, bool]]) -> float:
    """The run's passes again, in its order and back to back, on the corner points: the cost of those passes
    sustained for as long as the run made them, measured as the run is (one long stretch of work)."""
    for size, gradient in set(order):  # warm-up
        one_pass(model, *batches[size], gradient)

    def replay():
        for size, gradient in order:
            one_pass(model, *batches[size], gradient)

    return timed(replay)[0]


def member_rows(model, x, y, eps: float, norm: str, batch_size: int, compiled: bool, repeats: int) -> list[str]:
    """Each standard member alone on the same points: time, passes, floors and time / floor.

    The members call the forward pass robench's engine runs them with (eager, or compiled as ``--compile on``
    compiles it on this device), and the floors are measured on that forward too. The replayed floor makes
    the run's passes again in its order (time / floor divides by it); the fastest-pass floor prices each pass
    at its size's fastest of five, a lower bound no sustained run reaches (a long run meets the machine's
    slower moments too). Run and floors take turns ``repeats`` times; the fastest of each counts (this
    machine's timings drift by 10-20% over minutes)."""
    forward, _ = speed_up(model, compile=compiled)
    rows = []
    for member in AutoAttack(norm=norm).members:
        best = replayed = fastest = float("inf")
        for _ in range(repeats):
            logged = PassLog(forward)
            seconds, result = timed(lambda: member(logged, x, y, eps, batch_size=batch_size))
            best = min(best, seconds)
            batches = corner_batches(x, y, eps, norm, {size for size, _ in logged.order})
            replayed = min(replayed, replayed_floor(forward, batches, logged.order))
            fastest = min(fastest, fastest_pass_floor(forward, batches, logged.order))
        rows.append(f"| {member.name} | {'compiled' if compiled else 'eager'} | {best:.2f} | "
                    f"{result.gradient_evals} | {result.forward_evals} | {replayed:.2f} | {best / replayed:.2f} | "
                    f"{fastest:.2f} | {best / fastest:.2f} |")
    return rows


def implementations(args, model, x, y, eps: float, suite: dict) -> dict:
    """Per side, a run on the first n points returning (robust accuracy, a note)."""
    device = torch.device(args.device)
    sides = {}
    modes = {"off": ["off"], "on": ["on"], "both": ["off", "on"]}[args.compile]
    for mode in modes:
        options = dict(device=args.device, batch_size=args.batch_size, precision=args.precision, compile=mode)

        def ours(n, options=options):
            doc = robench.evaluate(model, (x[:n], y[:n]), suite, **options).doc
            entry, speed = doc["attacks"][0], doc["env"]["speed"]
            log = ", ".join(f"{p['attack']} {100 * p['accuracy_after']:.2f}" for p in entry["parts"])
            if speed["compile"]:  # each run compiles afresh: its time includes the compilation, shown apart here
                log += f"; first pass {speed['first_call_seconds']:.2f} s with compilation ({speed['compile_backend']})"
            return entry["accuracy"], log

        sides["robench, compiled" if mode == "on" else "robench, eager"] = ours
    norm = "Linf" if args.norm == "linf" else "L2"
    if args.reference:
        reference = reference_autoattack(args.reference, model, eps, norm, device)

        def theirs(n):
            xs, ys = x[:n].to(device), y[:n].to(device)
            return scored(model, reference.run_standard_evaluation(xs, ys, bs=args.batch_size), ys, args.batch_size), ""

        sides["fra31/auto-attack, standard"] = theirs
    if not args.no_torchattacks:
        import torchattacks

        chained = torchattacks_autoattack(model, eps, norm, n_classes=10)

        def chained_members(n):
            xs, ys = x[:n].to(device), y[:n].to(device)
            advs = [chained(xb, yb) for xb, yb in zip(xs.split(args.batch_size), ys.split(args.batch_size))]
            return scored(model, torch.cat(advs), ys, args.batch_size), ""

        sides[f"torchattacks {torchattacks.__version__}, members chained"] = chained_members
    return sides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="digits", choices=["digits", "digits-pgd-at", "resnet20", "cifar-resnet18"])
    parser.add_argument("--images", type=int, default=300, help="clean-correct points attacked")
    parser.add_argument("--epochs", type=int, default=5, help="resnet20, cifar-resnet18: training epochs")
    parser.add_argument("--data-root", default="data")
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--batch-size", type=int, default=150)
    parser.add_argument("--eps", type=float, default=None, help="default 0.1 (digits), 8/255 (ResNets)")
    parser.add_argument("--norm", default="linf", choices=["linf", "l2"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--compile", default="off", choices=["off", "on", "both"])
    parser.add_argument("--reference", default=None, help="a checkout of github.com/fra31/auto-attack")
    parser.add_argument("--no-torchattacks", action="store_true")
    parser.add_argument("--members", action="store_true", help="also each member alone, with its floor")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each side, taking turns")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, x, y, eps = load(args)
    model.to(device).eval()
    suite = {"name": "autoattack", "attacks": [{"attack": "autoattack", "norm": args.norm, "eps": eps}]}
    dev = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{dev} · {args.model} · {len(x)} clean-correct points · {args.norm} eps {eps:.4g} · batch {args.batch_size}"
          f" · {args.precision} · {torch.get_num_threads()} threads · robench {robench.__version__}, "
          f"torch {torch.__version__}")
    print("| implementation | seconds | robust % | note |")
    print("|---|---|---|---|")
    sides = implementations(args, model, x, y, eps, suite)
    # Warm-up on a few points (and each compiled run's compilation, timed): then the timed runs take turns,
    # so that a slower minute of a shared machine does not fall on one side only. The fastest run counts.
    notes = {}
    for name, run in sides.items():
        seconds, (_, note) = timed(lambda: run(8))
        notes[name] = note
        if "compiled" in name:
            print(f"| {name}: first run, on 8 points, compilation included | {seconds:.1f} | | |")
    best: dict[str, tuple[float, float, str]] = {}
    for _ in range(args.repeats):
        for name, run in sides.items():
            seconds, (accuracy, note) = timed(lambda: run(len(x)))
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, accuracy, note)
    for name, (seconds, accuracy, note) in best.items():
        print(f"| {name} | {seconds:.1f} | {100 * accuracy:.2f} | {note} |")
    if args.members:
        print()
        print("| member alone | passes | seconds | gradient passes | forward passes | replayed floor s | "
              "time / floor | fastest-pass floor s | time / fastest-pass floor |")
        print("|---|---|---|---|---|---|---|---|---|")
        for compiled in {"off": [False], "on": [True], "both": [False, True]}[args.compile]:
            for row in member_rows(model, x.to(device), y.to(device), eps, args.norm, args.batch_size, compiled,
                                   args.repeats):
                print(row, flush=True)


if __name__ == "__main__":
    main()
