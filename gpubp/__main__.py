"""Command line: python -m gpubp demo | info | bench (or the gpubp script).

demo   train 64-128-128-10 on the 8x8 digits, then fine-tune a frozen backbone to new classes
info   versions, the GPUs the driver sees, where NVRTC and the CUDA headers are, which backends run
       here and why the others don't
bench  time one training step per backend on a few shapes (a quick look; the source tree's bench/ has
       the pytest-benchmark suites)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import time

import numpy as np

import gpubp as gb
from gpubp import _toolkit, backends
from gpubp import finetune as ft


def _step_seconds(model, x, y, opt, repeats: int = 20) -> float:
    """Median seconds of one training step (forward, loss, backward, update) after warm-up."""
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        out = model.forward(x)
        _, dout = gb.losses.cross_entropy(out, y, backend=model.backend)
        model.backward(dout)
        opt.step()
        model.backend.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def _epoch_times(seconds: list[float], backend: str) -> str:
    """The median epoch after the first, and the first apart: it loads the kernels, which on a
    GPU's first run of gpubp means compiling them (CuPy caches them for later runs)."""
    first = f"{1e3 * seconds[0]:.0f} ms" + (", loading the kernels: NVRTC compiles them on a GPU's first run"
                                             if backend == "cupy" else "")
    if len(seconds) == 1:
        return f"one epoch of {first}"
    return f"{1e3 * float(np.median(seconds[1:])):.1f} ms per epoch after the first ({first})"


def demo(args, usage_error) -> int:
    """``usage_error(message)``: the demo parser's ``error``, for what only the data can check."""
    try:
        backend = backends.resolve(args.device, args.backend)
    except ValueError as exc:  # --backend runs on another device than --device names (or GPUBP_* say so)
        usage_error(str(exc))
    except RuntimeError as exc:  # the backend they name cannot run here
        usage_error(str(exc))
    try:
        x, y = gb.data.load_digits()
    except ImportError as exc:  # scikit-learn ships the digits: the demo extra, not a traceback
        usage_error(str(exc))
    x_train, x_test, y_train, y_test = gb.data.train_test_split(x, y, test_size=0.2, seed=args.seed, stratify=True)
    # The shots of each new class are drawn from its training images without replacement.
    images = {digit: int(np.count_nonzero(y_train == digit)) for digit in range(5, 10)}
    rarest = min(images, key=images.get)
    if args.shots > images[rarest]:
        usage_error(f"argument --shots: expected an int in [1, {images[rarest]}] (the training split holds "
                    f"{images[rarest]} images of digit {rarest}, the fewest of 5-9), got {args.shots}")
    device = backends.device_of(backend)  # the models' own: GPUBP_DEVICE has no say in them
    print(f"gpubp {gb.__version__}: device {device!r}, backend {backend!r}")
    gb.seed(args.seed)

    print("\n[1/2] train 64-128-128-10 (relu) on the 8x8 digits")
    model = gb.Sequential([
        gb.Dense(64, 128, activation="relu"),
        gb.Dense(128, 128, activation="relu"),
        gb.Dense(128, 10),
    ], device=device, backend=backend)
    history = model.fit(x_train, y_train, loss="cross_entropy", optimizer=gb.optim.Adam(model.parameters(), lr=2e-3),
                        epochs=args.epochs, batch_size=32, verbose=0 if args.quiet else 1)
    result = model.evaluate(x_test, y_test, metrics=["accuracy", "f1"])
    print(f"test accuracy {result['accuracy']:.2%} (macro F1 {result['f1']:.3f}) after {_count(len(history.epoch), 'epoch')}, "
          f"{_epoch_times(history.epoch_times, backend)}")

    print("\n[2/2] fine-tune: pretrain on digits 0-4, new head, frozen backbone, 5-9 from a few labels")
    gb.seed(args.seed)
    old_train, old_test = y_train < 5, y_test < 5
    pretrained = gb.Sequential([
        gb.Dense(64, 128, activation="relu"),
        gb.Dense(128, 128, activation="relu"),
        gb.Dense(128, 5),
    ], device=device, backend=backend)
    pretrained.fit(x_train[old_train], y_train[old_train], optimizer=gb.optim.Adam(pretrained.parameters(), lr=2e-3),
                   epochs=args.epochs, batch_size=64, verbose=0)
    pre_acc = pretrained.evaluate(x_test[old_test], y_test[old_test], loss="cross_entropy")["accuracy"]
    print(f"pretrained on 0-4: test accuracy {pre_acc:.2%}")

    model = ft.replace_head(pretrained, out_features=5)
    model.freeze_to(len(model) - 1)
    rng = np.random.default_rng(args.seed)
    few = np.concatenate([rng.choice(np.flatnonzero(y_train == c), args.shots, replace=False) for c in range(5, 10)])
    backbone_before = model.get_weights()[:-2]
    model.fit(x_train[few], y_train[few] - 5, optimizer=gb.optim.Adam(model.parameters(), lr=1e-2),
              epochs=60, batch_size=25, verbose=0)
    new_test = ~old_test
    acc = model.evaluate(x_test[new_test], y_test[new_test] - 5, loss="cross_entropy")["accuracy"]
    unchanged = all(np.array_equal(a, b) for a, b in zip(backbone_before, model.get_weights()[:-2]))
    print(f"fine-tuned on 5-9 with {args.shots} labels per class: test accuracy {acc:.2%}; "
          f"backbone unchanged: {unchanged}")
    print(model.backward_plan())

    batch = x_train[rng.choice(len(x_train), 256)]
    labels = rng.integers(0, 5, 256)
    frozen = _step_seconds(model, batch, labels, gb.optim.Adam(model.parameters()))
    frozen_bytes = model.activation_bytes()
    model.unfreeze()
    full = _step_seconds(model, batch, labels, gb.optim.Adam(model.parameters()))
    full_bytes = model.activation_bytes()
    print(f"step time at batch 256: frozen backbone {1e3 * frozen:.3f} ms, full {1e3 * full:.3f} ms "
          f"({frozen / full:.2f}x); activations kept for backward {frozen_bytes:,} B vs {full_bytes:,} B")
    return 0


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info(args) -> int:
    from gpubp._driver import cuda_device_count

    print(f"gpubp      {gb.__version__}")
    print(f"python     {platform.python_version()} ({platform.machine()}, {platform.system()})")
    for dist in ("numpy", "scipy", "cupy-cuda12x", "cupy-cuda13x", "numba", "numba-cuda", "torch"):
        print(f"{dist:<12} {_version(dist)}")
    count, reason = cuda_device_count()
    print(f"CUDA GPUs  {count}" + (f" ({reason})" if reason else ""))
    # What CuPy needs to compile kernels/*.cu when no CMake-built fatbin serves the GPU.
    for what, (path, how) in (("NVRTC", _toolkit.nvrtc_library()), ("CUDA headers", _toolkit.cuda_headers())):
        print(f"{what:<12} " + (f"{path} ({how})" if path else f"not found: {how}; {backends.INSTALL_HINT}"))
    print("backends:")
    available = backends.available()
    for name, why_not in available.items():
        print(f"  {name:<6} " + ("available" if why_not is None else f"unavailable: {' '.join(why_not.split())}"))
    if available.get("cupy") is None:
        print(f"cupy kernels {_cupy_kernels(backends.get('cupy'))}")
    try:
        chosen = backends.resolve("auto", "auto")
        print(f"device='auto' picks backend {chosen!r}")
    except (RuntimeError, ValueError) as exc:
        print(f"device='auto' fails: {exc}")
    return 0


def _cupy_kernels(cupy_backend) -> str:
    """Where the CuPy backend's kernels come from on the current GPU, and what a first step waits for."""
    why_not = cupy_backend._aot_mismatch(cupy_backend.cupy.cuda.Device().compute_capability)
    if why_not is None:
        return f"from the CMake fatbins in {cupy_backend.aot_dir()}: no compiling"
    try:
        whole = cupy_backend.act_modules() == "all"
    except ValueError as exc:  # a bad GPUBP_NVRTC_ACTIVATIONS: said here, raised at the first launch
        return f"not loadable: {exc}"
    activations = (f"with every activation it serves ({cupy_backend.NVRTC_ACTIVATIONS_ENV}=all)" if whole
                   else "for the activations it launches")
    return (f"compiled by NVRTC on first use, each GEMM kernel a model launches on its own, {activations}, and "
            f"cached by CuPy (no fatbins: {why_not}); gpubp.backends.get('cupy').preload() compiles them all at once")


def _check_available(name: str, usage_error) -> None:
    """A usage error, not a traceback, when the backend the arguments chose cannot run here."""
    why = backends.available()[name]
    if why is not None:
        usage_error(f"backend {name!r} is not available here: {why}")


def _why_not_timed(name: str) -> str | None:
    """Why ``bench`` skips a backend that runs here, or None: the CUDA simulator runs the Numba
    kernels in Python, so its times say nothing about the kernels."""
    if name == "numba" and os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return "it runs in the CUDA simulator here (NUMBA_ENABLE_CUDASIM=1), whose times say nothing"
    return None


def bench(args, usage_error) -> int:
    if args.backend != "auto":
        _check_available(args.backend, usage_error)
        why = _why_not_timed(args.backend)
        if why is not None:  # asked for by name: nothing timed is not a result
            usage_error(f"argument --backend: {args.backend!r} cannot be timed: {why}")
    names = [args.backend] if args.backend != "auto" else [n for n, why in backends.available().items() if why is None]
    shapes = [([784, 256, 256, 10], 256), ([1024] * 4, 512), ([64] * 5 + [10], 4096)]
    print(f"median ms per training step (forward, softmax-CE, backward, SGD momentum); {args.repeats} "
          + ("repeat" if args.repeats == 1 else "repeats"))
    rng = np.random.default_rng(0)
    for widths, batch in shapes:
        x = rng.standard_normal((batch, widths[0])).astype(np.float32)
        y = rng.integers(0, widths[-1], batch)
        cells = []
        for name in names:
            if _why_not_timed(name) is not None:
                cells.append(f"{name}: skipped (CUDA simulator)")
                continue
            layers = [gb.Dense(a, b, "relu" if i < len(widths) - 2 else None)
                      for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))]
            model = gb.Sequential(layers, device=backends.device_of(name), backend=name)
            opt = gb.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
            cells.append(f"{name}: {1e3 * _step_seconds(model, x, y, opt, args.repeats):.3f}")
        print(f"{str(widths):<28} batch {batch:<5} " + "  ".join(cells))
    return 0


def _int_at_least(low: int):
    """An argparse ``type``: an int >= ``low``; argparse names the option in the error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value
    return parse


def _prog() -> str:
    """How the user ran us, for usage and errors: ``gpubp`` from the console script (argv[0] is the
    script), else ``python -m gpubp`` (argv[0] is this file, or a caller's when main is imported)."""
    script = os.path.splitext(os.path.basename(sys.argv[0] if sys.argv else ""))[0]
    return "gpubp" if script == "gpubp" else "python -m gpubp"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def main(argv=None) -> int:
    """The command line (``python -m gpubp``, and the ``gpubp`` script); its exit status."""
    try:
        return _command(argv)
    except BrokenPipeError:  # the reader went away (gpubp demo | head): quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python flushes stdout at exit
        return 1


def _command(argv) -> int:
    parser = argparse.ArgumentParser(prog=_prog(), description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p_demo = sub.add_parser("demo", help="train on digits, then fine-tune a frozen backbone")
    p_demo.add_argument("--epochs", type=_int_at_least(1), default=40,
                        help="training epochs of the digits model and of the pretraining (default: %(default)s)")
    p_demo.add_argument("--shots", type=_int_at_least(1), default=20,
                        help="labelled examples per new class (default: %(default)s)")
    p_demo.add_argument("--seed", type=_int_at_least(0), default=0,
                        help="seed of the split, the weights and the shots (default: %(default)s)")
    p_demo.add_argument("--quiet", action="store_true", help="no progress bar")
    sub.add_parser("info", help="versions, GPUs and backends")
    p_bench = sub.add_parser("bench", help="quick training-step timings per backend")
    p_bench.add_argument("--repeats", type=_int_at_least(1), default=20,
                         help="timed steps per shape and backend, after 3 warm-up steps (default: %(default)s)")
    p_demo.add_argument("--device", default="auto", choices=backends.DEVICES,
                        help="auto: GPUBP_DEVICE if set, else the GPU when CuPy sees one, else the CPU "
                             "(default: %(default)s)")
    p_demo.add_argument("--backend", default="auto", choices=("auto",) + backends.BACKENDS,
                        help="auto: GPUBP_BACKEND if set, else the device's default (default: %(default)s)")
    p_bench.add_argument("--backend", default="auto", choices=("auto",) + backends.BACKENDS,
                         help="auto: every backend that runs here (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args, p_demo.error)
    if args.command == "bench":
        return bench(args, p_bench.error)
    return info(args)


if __name__ == "__main__":
    sys.exit(main())
