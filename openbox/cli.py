"""The ``openbox`` command line: train, explain, verify, segment, plane, census, equivalent,
compare, demo.

Exit codes (scripts may rely on them):

* 0 -- done (and, for ``verify`` and ``demo``, every check passed);
* 1 -- a verification failed: the local linear classifier or the compiled program
  does not reproduce the model within the working dtype's tolerance;
* 2 -- bad usage or input: unknown option, missing or tampered checkpoint, missing
  data, index out of range, an unusable output path or device. Arguments are checked
  before any training or explaining starts. The reason goes to stderr as
  ``openbox: error: ...``.

Progress bars (tqdm) go to stderr; results go to stdout. torch's thread count
follows ``OMP_NUM_THREADS`` as torch itself reads it. This module parses arguments
and prints; the record it writes is :mod:`openbox.record`, its figures
:mod:`openbox.plotting`, and a user's own model and image files are read by
:mod:`openbox.loading`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from openbox import loading, record
from openbox.engine import OpenBox
from openbox.features import REST, decision_features
from openbox.fmnist import data as obdata
from openbox.fmnist.checkpoints import CheckpointError, save_checkpoint
from openbox.fmnist.data import CLASSES, DatasetError, load_fashion_mnist, load_sample
from openbox.fmnist.demo import DEMO_CHECKPOINT, DEMO_CLASSES, demo_checkpoint, demo_indices
from openbox.fmnist.models import MODEL_NAMES, build_model, count_parameters, describe_models
from openbox.loading import ImageError, LoadedModel, ModelLoadError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROG = "openbox"
DISTRIBUTION = "openbox"
DTYPES = {"float64": torch.float64, "float32": torch.float32}
DOMAIN = (0.0, 1.0)  # pixels in [0, 1]: the input box attached to every polytope
DEMO_OUT = "openbox-demo"
DEMO_FIGURE = "decision-features.png"
DEMO_SUMMARY = "summary.txt"
EXPLAIN_FILES = ("input.png", "features.png", "explanation.json")
VERIFY_DEFAULT_N = 100
VERIFY_BATCH = 25  # images per ob.verify call (one progress step)
FIG_DPI = 100
SAMPLE_NOTE = "pass --data DIR for the full test split"
NPZ_SUFFIX = ".npz"
TRAIN_DEVICES = ("cpu", "cuda", "mps")


class UsageError(Exception):
    """An expected problem with the user's arguments or files: printed, exit code 2."""


def _version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


# --- shared helpers --------------------------------------------------------------------


def _say(*parts: Any) -> None:
    """A line of results on stdout, printed past any tqdm bar."""
    tqdm.write(" ".join(str(p) for p in parts), file=sys.stdout)


def _warn(message: str) -> None:
    tqdm.write(f"{PROG}: warning: {message}", file=sys.stderr)


def _progress(iterable=None, **kwargs):
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


def _test_images(data_dir: str | None, download: bool) -> tuple[obdata.Dataset, str]:
    """The test split from ``data_dir``, or the packaged sample; and a phrase saying which."""
    if data_dir is None:
        ds = load_sample()
        return ds, f"the packaged {len(ds):,}-image sample of the test split ({SAMPLE_NOTE})"
    ds = load_fashion_mnist("test", data_dir, download=download, progress=True)
    if len(ds) == 0:
        raise UsageError(f"the test split in {data_dir} holds no images")
    return ds, f"the test split in {data_dir} ({len(ds):,} images)"


def _class_names(m: LoadedModel, ds: obdata.Dataset | None = None) -> list[str] | None:
    """The model's own class names, else the data set's, else Fashion-MNIST's for a
    10-class model; None when none fits."""
    if m.class_names is not None:
        return list(m.class_names)
    if ds is not None and ds.num_classes == m.num_classes:
        return list(ds.classes)
    return list(CLASSES) if m.num_classes == len(CLASSES) else None


def _name(c: int, names: Sequence[str] | None) -> str:
    return names[c] if names is not None and 0 <= c < len(names) else f"class {c}"


def _normal(name: str) -> str:
    """A class name as typed or stored, for matching: lower case, letters and digits
    only ('T-shirt/top' -> 'tshirttop', so 'tshirt' and 't-shirt' both find it)."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _resolve_class(value: str | None, flag: str, num_classes: int,
                   names: Sequence[str] | None) -> int | None:
    """``--target`` / ``--versus`` value (an index or a class name, case-insensitive, a
    unique prefix will do) -> class index; None stays None."""
    if value is None:
        return None
    text = value.strip()
    if re.fullmatch(r"[+-]?\d+", text):
        c = int(text)
        if not 0 <= c < num_classes:
            raise UsageError(f"{flag} {c} is out of range: the model has {num_classes} classes "
                             f"(0..{num_classes - 1})")
        return c
    if names is None:
        raise UsageError(f"{flag} {value!r}: this model's classes have no names; give an "
                         f"index 0..{num_classes - 1}")
    key = _normal(text)
    exact = [i for i, n in enumerate(names) if _normal(n) == key]
    hits = exact or ([i for i, n in enumerate(names) if _normal(n).startswith(key)] if key
                     else [])
    if len(hits) == 1:
        return hits[0]
    listed = ", ".join(f"{i} {n!r}" for i, n in enumerate(names))
    if hits:
        raise UsageError(f"{flag} {value!r} is ambiguous: it matches "
                         f"{', '.join(repr(names[i]) for i in hits)}; classes: {listed}")
    raise UsageError(f"{flag} {value!r} is not a class of this model; classes: {listed}")


def _check_index(index: int, n: int, where: str) -> None:
    if not 0 <= index < n:
        raise UsageError(f"--index {index} is out of range: {where} holds {n:,} images "
                         f"(indices 0..{n - 1})")


def _writable_folder(folder: Path, flag: str, shown: str | Path) -> None:
    """Raise UsageError unless files can be created in ``folder`` (or, if it does not exist
    yet, in the nearest existing folder above it). A probe file is created and removed:
    permission bits do not tell (root, read-only mounts, ACLs)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{flag} {shown}: {probe} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {shown}: cannot write in {probe} "
                         f"({exc.strerror or exc})") from exc


def _check_out_dir(path: str, flag: str = "--out") -> Path:
    """An output folder that can be created and written, checked without creating it."""
    if not path.strip():
        raise UsageError(f"{flag} is empty; it names the output folder")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; {flag} names the output folder")
    _writable_folder(out, flag, path)
    return out


def _check_out_file(path: str, flag: str, suffix: str | None = None) -> Path:
    """An output file whose folder can be written, checked without writing it."""
    if not path.strip():
        raise UsageError(f"{flag} is empty; it names the file to write")
    out = Path(path)
    if out.is_dir() or path.endswith(("/", os.sep)):
        raise UsageError(f"{flag} {path} is a folder; it names the file to write")
    if suffix is not None and out.suffix.lower() != suffix:
        raise UsageError(f"{flag} {path}: the file name must end in {suffix}")
    _writable_folder(out.parent, flag, path)
    return out


def _make_dir(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a race with another process, or a folder that went away
        raise UsageError(f"cannot use {out} as the output folder ({exc.strerror or exc})") from exc
    return out


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=FIG_DPI)
    return path


def _fmt(value: float | None) -> str:
    return "inf" if value is None else f"{value:.3g}"


def _train_device(value: str) -> torch.device:
    """``--device`` as a torch device that can train here; UsageError naming what can."""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {value!r} is not a torch device ({exc})") from exc
    available = ["cpu"]
    if torch.cuda.is_available():
        available += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        available.append("mps")
    here = f"devices available here: {', '.join(available)}"
    if device.type not in TRAIN_DEVICES:
        raise UsageError(f"--device {value}: openbox trains on {', '.join(TRAIN_DEVICES)}, "
                         f"not on {device.type!r}; {here}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {value}: this torch build or machine has no CUDA; "
                             f"{here}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {value}: there are {torch.cuda.device_count()} CUDA "
                             f"devices; {here}")
    if device.type == "mps" and "mps" not in available:
        raise UsageError(f"--device {value}: MPS is not available; {here}")
    return device


def _expected_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad usage or input (exit 2), not a bug."""
    from openbox.fmnist import training

    # raised by train() when the loss goes non-finite (added to openbox.fmnist.training
    # by its owner; absent from older versions)
    diverged = getattr(training, "TrainingDivergedError", None)
    extra = (diverged,) if isinstance(diverged, type) else ()
    return (UsageError, CheckpointError, DatasetError, ModelLoadError, ImageError, OSError,
            *extra)


# --- train -------------------------------------------------------------------------------


MMR_DEFAULTS = {"gamma": 0.05, "k": 20, "ramp_epochs": 1.0, "probes": 4, "max_examples": 16}
MMR_FLAGS = {"gamma": "mmr_gamma", "k": "mmr_k", "ramp_epochs": "mmr_ramp_epochs",
             "probes": "mmr_probes", "max_examples": "mmr_examples"}
"""mmr_penalty option -> the argparse dest of its ``--mmr-*`` flag (None: the default)."""


def _mmr(args: argparse.Namespace):
    """The MMR-style penalty of ``--mmr WEIGHT`` and its options, or (None, None)."""
    given = {key: getattr(args, dest) for key, dest in MMR_FLAGS.items()
             if getattr(args, dest) is not None}
    if args.mmr is None:
        if given:
            flag = MMR_FLAGS[next(iter(given))].replace("_", "-")
            raise UsageError(f"--{flag} needs --mmr WEIGHT")
        return None, None
    from openbox.fmnist.regularisers import mmr_penalty

    options = {"weight": args.mmr, **MMR_DEFAULTS, **given}
    try:
        penalty = mmr_penalty(options["weight"], options["gamma"], options["k"],
                              options["ramp_epochs"], probes=options["probes"],
                              max_examples=options["max_examples"])
    except ValueError as exc:
        raise UsageError(f"--mmr: {exc}") from exc
    return penalty, options


def cmd_train(args: argparse.Namespace) -> int:
    from openbox.fmnist import training
    from openbox.fmnist.tasks import binary_task, get_task

    kwargs: dict[str, Any] = {}
    if args.channels is not None:
        kwargs["channels"] = list(args.channels)
    if args.hidden is not None:
        kwargs["hidden"] = list(args.hidden)
    if args.pool is not None:
        kwargs["pool"] = args.pool
    if args.no_batch_norm:
        kwargs["batch_norm"] = False
    # every argument is checked before the data are read and long before training
    out = _check_out_file(args.out, "--out")
    if args.epochs < 1 or args.batch_size < 1 or not (args.lr > 0 and math.isfinite(args.lr)):
        raise UsageError("--epochs and --batch-size must be >= 1 and --lr finite and > 0, got "
                         f"{args.epochs}, {args.batch_size} and {args.lr}")
    if not (args.l1 >= 0 and math.isfinite(args.l1)):
        raise UsageError(f"--l1 must be a finite number >= 0, got {args.l1}")
    try:
        task = None if args.task is None else get_task(args.task)
    except ValueError as exc:
        raise UsageError(f"--task: {exc}") from exc
    num_classes = len(CLASSES) if task is None else len(task.classes)
    device = _train_device(args.device)
    try:
        model = build_model(args.model, num_classes, seed=args.seed, **kwargs)
    except ValueError as exc:
        raise UsageError(f"cannot build model {args.model!r} with {kwargs}: {exc}") from exc
    nonnegative = _nonnegative_layers(args.nonnegative, model, args.model)
    if args.l1 > 0 and not nonnegative:
        raise UsageError(f"--l1 {args.l1:g} penalises the weights of the --nonnegative layers; "
                         "give --nonnegative all-but-first (the paper's PLNN-NS) or "
                         "--nonnegative NAME[,NAME]")
    try:
        training.check_constraints(model, l1=args.l1, nonnegative=nonnegative)
    except ValueError as exc:
        raise UsageError(f"--nonnegative {args.nonnegative}: {exc}") from exc
    penalty, mmr = _mmr(args)
    train_set = load_fashion_mnist("train", args.data, download=args.download)
    test_set = load_fashion_mnist("test", args.data, download=args.download)
    folder = train_set.source.rsplit(" (", 1)[0]
    if task is not None:
        train_set, test_set = binary_task(train_set, task), binary_task(test_set, task)
    for split, ds in (("training", train_set), ("test", test_set)):
        if len(ds) == 0:
            raise UsageError(f"the {split} split ({ds.source}) holds no images")
    on_task = "" if task is None else f" of task {task.name} ({task.description})"
    constrained = ""
    if nonnegative:
        constrained = f"; weights >= 0 in {', '.join(nonnegative)}"
        constrained += f", L1 {args.l1:g} on them" if args.l1 > 0 else ""
    if mmr is not None:
        constrained += (f"; MMR penalty weight {mmr['weight']:g}, gamma {mmr['gamma']:g}, "
                        f"k {mmr['k']}, ramped over {mmr['ramp_epochs']:g} epoch(s)")
    _say(f"{args.model} {kwargs or '(default options)'}: {count_parameters(model):,} parameters;"
         f" {len(train_set):,} training / {len(test_set):,} test images{on_task} from "
         f"{folder}{constrained}")
    started = time.perf_counter()
    result = training.train(model, train_set, test_set, epochs=args.epochs,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            device=device, progress=True, l1=args.l1, nonnegative=nonnegative,
                            penalty=penalty)
    seconds = time.perf_counter() - started
    written = save_checkpoint(
        out, model.to("cpu"), arch=args.model, arch_kwargs=kwargs,
        num_classes=num_classes,
        metadata={
            "dataset": train_set.source,
            "classes": list(train_set.classes),
            "task": None if task is None else task.name,
            "task_classes": None if task is None else list(task.classes),
            "train_images": len(train_set),
            "test_images": len(test_set),
            "train_accuracy": result.train_accuracy[-1],
            "test_accuracy": result.final_test_accuracy,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "optimizer": "Adam",
            "l1": float(args.l1),
            "l1_layers": [] if args.l1 == 0 else list(nonnegative),
            "nonnegative": list(nonnegative),
            "mmr": mmr,
            "seed": args.seed,
            "seconds": seconds,
            "threads": torch.get_num_threads(),
            "command": "openbox train",
        },
    )
    _say(f"train accuracy {result.train_accuracy[-1]:.4f}, test accuracy "
         f"{result.final_test_accuracy:.4f} after {args.epochs} epoch(s) in {seconds:.1f} s")
    _say(f"wrote {written}")
    return EXIT_OK


ALL_BUT_FIRST = "all-but-first"  # --nonnegative: the paper's PLNN-NS layers


def _nonnegative_layers(value: str | None, model: torch.nn.Module, arch: str) -> tuple[str, ...]:
    """``--nonnegative`` as module names: ``all-but-first`` (every weight layer but the
    first, :func:`openbox.fmnist.training.plnn_ns_layers`) or ``NAME[,NAME]``."""
    from openbox.fmnist import training

    if value is None:
        return ()
    if value.strip() == ALL_BUT_FIRST:
        try:
            return training.plnn_ns_layers(model)
        except ValueError as exc:
            raise UsageError(f"--nonnegative {ALL_BUT_FIRST} with --model {arch}: {exc}") \
                from exc
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise UsageError(f"--nonnegative {value!r}: expected {ALL_BUT_FIRST} or module names "
                         "separated by commas (e.g. fc2,fc3,fc), found an empty name")
    return tuple(names)


# --- explain and verify: the model ---------------------------------------------------------


def _load_model(args: argparse.Namespace) -> LoadedModel:
    """The positional checkpoint, or ``--model MODULE:FACTORY --weights FILE``."""
    if args.model is not None:
        if args.checkpoint is not None:
            raise UsageError(f"give either a checkpoint ({args.checkpoint}) or --model and "
                             "--weights, not both")
        if args.weights is None:
            raise UsageError(f"--model {args.model} needs --weights FILE (the model's state "
                             "dict, saved with torch.save(model.state_dict(), FILE))")
        return loading.load_model_factory(args.model, args.weights)
    if args.weights is not None:
        raise UsageError(f"--weights {args.weights} needs --model MODULE:FACTORY (the code "
                         "that builds the model)")
    if args.checkpoint is None:
        raise UsageError("expected a checkpoint CKPT (written by 'openbox train'), or "
                         "--model MODULE:FACTORY --weights FILE")
    return loading.load_checkpoint_model(args.checkpoint)


def _check_input_shape(m: LoadedModel, shape: tuple[int, ...], where: str) -> None:
    if tuple(m.input_shape) != tuple(shape):
        raise UsageError(f"the model takes inputs of shape {tuple(m.input_shape)}, but {where} "
                         f"holds {tuple(shape)} images")


# --- explain -----------------------------------------------------------------------------


def cmd_explain(args: argparse.Namespace) -> int:
    from openbox.plotting import plot_decision_features, plot_input, verification_title

    dtype = DTYPES[args.dtype]
    out = _check_out_dir(args.out)
    save = None if args.save is None else _check_out_file(args.save, "--save", NPZ_SUFFIX)
    if args.image is not None and (args.data is not None or args.download):
        raise UsageError("--data and --download choose the test split for --index; "
                         "--image FILE needs neither")
    m = _load_model(args)
    ds = None
    if args.image is None:
        ds, where = _test_images(args.data, args.download)
        _check_index(args.index, len(ds), where)
    names = _class_names(m, ds)
    target = _resolve_class(args.target, "--target", m.num_classes, names)
    versus = _resolve_class(None if args.versus == REST else args.versus, "--versus",
                            m.num_classes, names)
    if target is not None and target == versus:
        raise UsageError(f"--target and --versus are both class {target} "
                         f"({_name(target, names)}); a class is contrasted with another one "
                         "or with the rest")
    if args.image is not None:
        x1 = loading.load_image(args.image)
        _check_input_shape(m, tuple(x1.shape), f"--image {args.image}")
        if loading.looks_inverted(x1):
            _warn(f"{args.image} has a light border; Fashion-MNIST images are light objects "
                  "on black, so a dark-on-light image may need inverting (1 - x)")
        label, source = None, {"image": str(args.image)}
        where, title = f"image file {args.image}", Path(args.image).name
    else:
        assert ds is not None
        _check_input_shape(m, tuple(ds.images.shape[1:]), where)
        x1, label = ds.images[args.index], int(ds.labels[args.index])
        source = {"data": where, "data_dir": args.data, "index": args.index}
        title = f"test image {args.index}"

    steps = ["compile", "explain", "verify", "radius", "polytope"] + (
        ["inscribed"] if args.inscribed else []) + ["figures"]
    bar = _progress(total=len(steps), desc="explain", unit="step")

    def step(name: str) -> None:
        bar.set_description(name)

    step("compile")
    ob = OpenBox(m.model, m.input_shape, dtype=dtype, domain=DOMAIN)
    x = x1.unsqueeze(0).to(dtype)
    if versus is not None and target is None:  # the class to explain is the prediction
        with torch.no_grad():
            predicted = int(ob.program(x).argmax(dim=1)[0])
        if predicted == versus:
            bar.close()
            raise UsageError(f"--versus {args.versus}: the model predicts "
                             f"{_name(predicted, names)} here, and a class is not contrasted "
                             "with itself; give --target too, or another --versus")
    bar.update()
    step("explain")
    e = ob.explain(x)
    bar.update()
    step("verify")
    report = ob.verify(x)
    bar.update()
    step("radius")
    radii = ob.radius_pair(x)
    r2, rinf = float(radii.l2[0]), float(radii.linf[0])
    bar.update()
    step("polytope")
    poly = ob.polytope(x[0])
    bar.update()
    if args.inscribed:
        step("inscribed")
        started = time.perf_counter()
        value = poly.inscribed_radius()
        inscribed = (value, f"Chebyshev-ball LP over {poly.n_constraints:,} constraints, "
                            f"{time.perf_counter() - started:.1f} s")
        bar.update()
    else:
        inscribed = (None, "not computed: an LP over all constraints (seconds to minutes on "
                           "a small machine); pass --inscribed to compute it")
    step("figures")
    try:
        features = decision_features(e, 0, target=target,
                                     versus=REST if versus is None else versus)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    out = _make_dir(out)
    input_png, features_png, json_path = (out / name for name in EXPLAIN_FILES)
    predicted = int(e.prediction[0])
    _save(plot_input(x[0], prediction=predicted, label=label, class_names=names, name=title),
          input_png)
    suptitle = verification_title(m.description, dtype, float(report.max_abs_error), report.ok)
    _save(plot_decision_features(features, class_names=names, label=label,
                                 title=f"{title}: {suptitle}"), features_png)
    bar.update()
    bar.close()

    rec = record.explanation_record(
        model={"description": m.description, **m.provenance}, input=source, label=label,
        class_names=names, explanation=e, report=report, features=features, polytope=poly,
        radii=(r2, rinf), inscribed=inscribed, tolerances=ob.tol, dtype=dtype,
    )
    json_path.write_text(json.dumps(rec, indent=2) + "\n")
    if save is not None:
        record.save_npz(save, explanation=e, features=features, radii=(r2, rinf),
                        report=report, label=label, class_names=names)

    conf = rec["explanation"]["configuration"]
    radius = rec["certified_radius"]
    _say(f"{where}, explained with {m.description}")
    truth = "" if label is None else f"label {rec['label_name']}, "
    _say(f"  {truth}predicted {rec['predicted_name']} (logit {max(e.logits[0].tolist()):.4f}); "
         f"region {rec['region_key']}")
    _say(f"  on {rec['explanation']['n_tight']} facets ({conf['n_tight_relu']} tied ReLU "
         f"inputs, {conf['n_tight_pool']} max-pool ties); certified radius L2 "
         f"{_fmt(radius['l2'])}, L-inf {_fmt(radius['linf'])}")
    if args.inscribed:
        _say(f"  inscribed (Chebyshev) radius of the region: "
             f"{_fmt(rec['inscribed_radius']['value'])}")
    _say(f"  polytope: {poly.n_constraints:,} constraints "
         f"({rec['polytope']['n_zero_rows_dropped']:,} identically zero rows dropped)")
    v = rec["verification"]
    _say(f"  verification {'passed' if v['ok'] else 'FAILED'} in {args.dtype}: "
         f"max |LLC - model| {v['llc_error']:.2e}, max |program - model| "
         f"{v['program_error']:.2e} (tolerance {v['atol']:g} + {v['rtol']:g} |f(x)|)")
    f = rec["decision_features"]
    _say(f"  decision features of {f['target_name']} vs {f['versus_name']}: "
         f"logit gap {features.logit_gap:.6f} (LLC) vs {features.model_gap:.6f} (model)")
    written = [input_png, features_png, json_path] + ([save] if save is not None else [])
    _say(f"wrote {', '.join(map(str, written))}")
    return EXIT_OK if v["ok"] else EXIT_FAILED


# --- verify ------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype]
    if args.n < 1 or args.start < 0:
        raise UsageError(f"--n must be >= 1 and --start >= 0, got {args.n} and {args.start}")
    m = _load_model(args)
    ds, where = _test_images(args.data, args.download)
    if args.start + args.n > len(ds):
        raise UsageError(f"--start {args.start} --n {args.n} asks for images up to "
                         f"{args.start + args.n - 1}, but {where} holds {len(ds):,} images")
    _check_input_shape(m, tuple(ds.images.shape[1:]), where)
    names = _class_names(m, ds)
    ob = OpenBox(m.model, m.input_shape, dtype=dtype, domain=DOMAIN)
    _say(f"verifying {m.description} on images {args.start}..{args.start + args.n - 1} of "
         f"{where} in {args.dtype}")
    header = (f"{'index':>6}  {'label':<12} {'predicted':<12} {'|LLC-model|':>11}  "
              f"{'|prog-model|':>12}  {'tight':>5}  pass")
    _say(header)
    n_pass, worst, n_facet = 0, 0.0, 0
    with _progress(total=args.n, desc="verify", unit="image") as bar:
        for start in range(args.start, args.start + args.n, VERIFY_BATCH):
            stop = min(start + VERIFY_BATCH, args.start + args.n)
            x = ds.images[start:stop].to(dtype)
            report = ob.verify(x)
            predicted = report.logits.argmax(dim=1)
            for j in range(stop - start):
                ok = bool(report.passed[j])
                n_pass += ok
                n_facet += int(report.n_tight[j]) > 0
                label = int(ds.labels[start + j])
                _say(f"{start + j:>6}  {_name(label, names)[:12]:<12} "
                     f"{_name(int(predicted[j]), names)[:12]:<12} "
                     f"{float(report.llc_error[j]):>11.2e}  {float(report.program_error[j]):>12.2e}"
                     f"  {int(report.n_tight[j]):>5}  {'ok' if ok else 'FAIL'}")
            worst = max(worst, float(report.max_abs_error))
            bar.update(stop - start)
    tol = ob.tol
    _say(f"{n_pass}/{args.n} pass in {args.dtype} (max abs error {worst:.2e}; tolerance "
         f"{tol.verify_atol:g} + {tol.verify_rtol:g} |f(x)|; {n_facet} of {args.n} images lie on "
         "a facet, where the tie-broken LLC is still exact)")
    return EXIT_OK if n_pass == args.n else EXIT_FAILED


# --- segment and plane ------------------------------------------------------------------


SEGMENT_SAMPLES = 801  # points where the segment figure evaluates the model's own logits


def _two_images(args, m):
    ds, where = _test_images(args.data, args.download)
    _check_input_shape(m, tuple(ds.images.shape[1:]), where)
    return ds, where


def cmd_segment(args: argparse.Namespace) -> int:
    from openbox.plotting import plot_segment

    out = _check_out_dir(args.out)
    m = _load_model(args)
    ds, where = _two_images(args, m)
    for i in (args.start, args.end):
        _check_index(i, len(ds), where)
    if args.start == args.end:
        raise UsageError("--from and --to are the same image; a segment needs two")
    names = _class_names(m, ds)
    ob = OpenBox(m.model, m.input_shape, dtype=DTYPES[args.dtype], domain=DOMAIN)
    x0, x1 = ds.images[args.start], ds.images[args.end]
    started = time.perf_counter()
    pieces = openbox_regions().segment(ob, x0, x1, progress=True)
    seconds = time.perf_counter() - started
    t = np.linspace(0.0, 1.0, SEGMENT_SAMPLES)
    xs = x0.to(ob.dtype) + torch.as_tensor(t, dtype=ob.dtype).reshape(-1, 1, 1, 1) * (
        x1 - x0).to(ob.dtype)
    with torch.no_grad():
        logits = ob.reference(xs).double().numpy()
    _make_dir(out)
    title = (f"test images {args.start} -> {args.end}: {len(pieces):,} linear pieces "
             f"({m.description}, {args.dtype}); rug: breakpoints, dashed: class changes")
    figure = _save(plot_segment(pieces, t, logits, class_names=names, title=title),
                   out / "segment.png")
    table = out / "segment.csv"
    with table.open("w") as fh:
        fh.write("t_start,t_end,region,prediction\n")
        for p in pieces:
            fh.write(f"{p.t_start!r},{p.t_end!r},{p.region_key.digest},{p.prediction}\n")
    changes = sum(a.prediction != b.prediction for a, b in zip(pieces, pieces[1:]))
    _say(f"segment from test image {args.start} ({_name(int(ds.labels[args.start]), names)}) "
         f"to {args.end} ({_name(int(ds.labels[args.end]), names)}) of {where}: "
         f"{len(pieces):,} linear pieces ({len({p.region_key for p in pieces}):,} distinct "
         f"regions), {changes} change(s) of the predicted class, in {seconds:.1f} s")
    _say(f"wrote {figure} and {table}")
    return EXIT_OK


def openbox_regions():
    import openbox.regions as regions

    return regions


def _plane_directions(spec: str, ds, index: int, ob) -> tuple[torch.Tensor, torch.Tensor, str]:
    x0 = ds.images[index].to(ob.dtype)
    g = torch.Generator().manual_seed(PLANE_SEED)
    if spec == "random":
        u, v = torch.randn((2, *x0.shape), generator=g, dtype=ob.dtype)
        return u / u.norm(), v / v.norm(), "two seeded random unit directions"
    if spec == "pca":
        flat = ds.images.reshape(len(ds), -1).to(ob.dtype)
        flat = flat - flat.mean(0)
        _, _, vt = torch.linalg.svd(flat[:PCA_IMAGES], full_matrices=False)
        u, v = (vt[k].reshape(x0.shape) for k in (0, 1))
        return u, v, f"the first two principal components of {min(len(ds), PCA_IMAGES)} images"
    if spec.startswith("towards:"):
        parts = spec[len("towards:"):].split(",")
        try:
            idx = [int(p) for p in parts]
        except ValueError:
            raise UsageError(f"--directions {spec}: expected towards:J or towards:J,K with "
                             "image indices") from None
        if not 1 <= len(idx) <= 2:
            raise UsageError(f"--directions {spec}: expected towards:J or towards:J,K")
        for j in idx:
            _check_index(j, len(ds), "the test split")
            if j == index:
                raise UsageError(f"--directions {spec}: image {j} is --index itself")
        u = ds.images[idx[0]].to(ob.dtype) - x0
        if len(idx) == 2:
            v = ds.images[idx[1]].to(ob.dtype) - x0
            return u, v, f"towards test images {idx[0]} (a = 1) and {idx[1]} (b = 1)"
        r = torch.randn(x0.shape, generator=g, dtype=ob.dtype)
        r = r - (r * u).sum() / (u * u).sum() * u
        return u, r * (u.norm() / r.norm()), (f"towards test image {idx[0]} (a = 1) and a "
                                              "seeded random direction of the same length")
    raise UsageError(f"--directions {spec!r}: expected random, pca, towards:J or towards:J,K")


PLANE_SEED = 0
PCA_IMAGES = 2000


def cmd_plane(args: argparse.Namespace) -> int:
    out = _check_out_dir(args.out)
    if not args.extent > 0:
        raise UsageError(f"--extent must be > 0, got {args.extent}")
    if args.starts < 1:
        raise UsageError(f"--starts must be >= 1, got {args.starts}")
    if DTYPES[args.dtype] != torch.float64:
        raise UsageError(f"plane maps need --dtype float64, got {args.dtype} (the walk's "
                         "geometric tolerances hold only above float64 rounding)")
    m = _load_model(args)
    ds, where = _two_images(args, m)
    _check_index(args.index, len(ds), where)
    names = _class_names(m, ds)
    ob = OpenBox(m.model, m.input_shape, dtype=DTYPES[args.dtype], domain=DOMAIN)
    u, v, said = _plane_directions(args.directions, ds, args.index, ob)
    e = args.extent
    started = time.perf_counter()
    pm = openbox_regions().plane(ob, ds.images[args.index], u, v, (-e, e, -e, e),
                                 max_regions=args.max_regions, starts=args.starts,
                                 progress=True)
    seconds = time.perf_counter() - started
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 7), layout="constrained")
    pm.plot(ax, class_names=names)
    ax.set_title(f"test image {args.index} (star): {len(pm):,} linear regions"
                 f"{'' if pm.complete else ' (stopped at --max-regions)'}\n{said}",
                 fontsize=9)
    _make_dir(out)
    figure = _save(fig, out / "plane.png")
    boundary = sum(d["decision_boundary"] for _, _, d in pm.graph.edges(data=True))
    _say(f"plane through test image {args.index} of {where}, {said}, extent +-{e:g}: "
         f"{len(pm):,} regions ({pm.graph.number_of_edges():,} shared edges, {boundary} on a "
         f"decision boundary), coverage {pm.coverage:.12f}, "
         f"{'complete' if pm.complete else 'INCOMPLETE'}, in {seconds:.1f} s")
    _say(f"wrote {figure}")
    return EXIT_OK


# --- census -----------------------------------------------------------------------------

CENSUS_FIGURE = "census.png"
CENSUS_TOP = 20


def cmd_census(args: argparse.Namespace) -> int:
    from openbox.regions.census import census

    dtype = DTYPES[args.dtype]
    if args.n is not None and args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    if args.top < 0:
        raise UsageError(f"--top must be >= 0, got {args.top}")
    figure = _check_out_file(args.plot, "--plot", ".png")
    table = None if args.csv is None else _check_out_file(args.csv, "--csv", ".csv")
    m = _load_model(args)
    ds, where = _test_images(args.data, args.download)
    n = len(ds) if args.n is None else args.n
    if n > len(ds):
        raise UsageError(f"--n {n} asks for more images than {where} holds ({len(ds):,})")
    _check_input_shape(m, tuple(ds.images.shape[1:]), where)
    names = _class_names(m, ds)
    ob = OpenBox(m.model, m.input_shape, dtype=dtype, domain=DOMAIN)
    _say(f"census of {m.description} over {n:,} images of {where} in {args.dtype}")
    c = census(ob, ds.images[:n], ds.labels[:n], progress=True)
    _say(c.to_markdown(top=args.top, classes=names))
    _say("")
    _say(c.layer_table())
    ax = c.plot()
    _make_dir(figure.parent)
    _save(ax.figure, figure)
    written = [str(figure)]
    if table is not None:
        _make_dir(table.parent)
        c.to_csv(table, classes=names)
        written.append(str(table))
    _say(f"wrote {' and '.join(written)}")
    return EXIT_OK


# --- equivalent -------------------------------------------------------------------------


def cmd_equivalent(args: argparse.Namespace) -> int:
    from openbox.regions.equivalence import equivalent, equivalent_on_segment

    dtype = DTYPES[args.dtype]
    if not (math.isfinite(args.eps) and args.eps > 0):
        raise UsageError(f"--eps must be finite and > 0, got {args.eps}")
    if args.max_cells < 1:
        raise UsageError(f"--max-cells must be >= 1, got {args.max_cells}")
    a = loading.load_checkpoint_model(args.checkpoint_a)
    b = loading.load_checkpoint_model(args.checkpoint_b)
    if tuple(a.input_shape) != tuple(b.input_shape) or a.num_classes != b.num_classes:
        raise UsageError(
            f"{args.checkpoint_a} takes {tuple(a.input_shape)} inputs with {a.num_classes} "
            f"classes but {args.checkpoint_b} {tuple(b.input_shape)} with {b.num_classes}; "
            "only models with the same inputs and outputs can be compared")
    ds, where = _test_images(args.data, args.download)
    _check_index(args.index, len(ds), where)
    if args.to is not None:
        _check_index(args.to, len(ds), where)
    _check_input_shape(a, tuple(ds.images.shape[1:]), where)
    ob_a = OpenBox(a.model, a.input_shape, dtype=dtype, domain=DOMAIN)
    ob_b = OpenBox(b.model, b.input_shape, dtype=dtype, domain=DOMAIN)
    x0 = ds.images[args.index].to(dtype)
    if args.to is None:
        what = (f"the L-inf box of radius {args.eps:g} around test image {args.index} "
                "(clipped to [0, 1])")
        _say(f"{a.description} vs {b.description} on {what} of {where}, in {args.dtype}")
        result = equivalent(ob_a, ob_b, x0, args.eps, max_cells=args.max_cells, progress=True)
    else:
        what = f"the segment from test image {args.index} to test image {args.to}"
        _say(f"{a.description} vs {b.description} on {what} of {where}, in {args.dtype}")
        result = equivalent_on_segment(ob_a, ob_b, x0, ds.images[args.to].to(dtype),
                                       progress=True)
    _say(str(result))
    if result.counterexample is not None:
        fa, fb = result.outputs
        _say(f"  counterexample: max |f_a - f_b| = {result.difference:.3e} (tolerance "
             f"{ob_a.tol.verify_atol:g} + {ob_a.tol.verify_rtol:g} |f_a|); predicted "
             f"{int(fa.argmax())} by CKPT_A, {int(fb.argmax())} by CKPT_B")
    return EXIT_OK if result else EXIT_FAILED


# --- demo --------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from openbox.plotting import plot_grid, verification_title

    started = time.perf_counter()
    out = _check_out_dir(args.out)
    m = loading.load_checkpoint_model(demo_checkpoint())
    ds = load_sample()
    names = _class_names(m, ds)
    indices = demo_indices(ds.labels)
    ob = OpenBox(m.model, m.input_shape, dtype=torch.float64, domain=DOMAIN)
    accuracy = m.provenance["metadata"].get("test_accuracy")
    accuracy = f", test accuracy {accuracy:.3f}" if isinstance(accuracy, float) else ""
    _say(f"demo: {m.description}{accuracy}; explaining {len(indices)} images of the packaged "
         "sample in float64")
    rows, feats, all_ok = [], [], True
    for i in _progress(indices, desc="demo", unit="image"):
        x = ds.images[i : i + 1].double()
        e = ob.explain(x)
        report = ob.verify(x)
        radii = ob.radius_pair(x)
        r2, rinf = float(radii.l2[0]), float(radii.linf[0])
        f = decision_features(e, 0)
        feats.append(f)
        all_ok &= report.ok
        label, pred = int(ds.labels[i]), int(e.prediction[0])
        rows.append({
            "index": i, "label": _name(label, names), "label_id": label,
            "predicted": _name(pred, names), "error": float(report.max_abs_error),
            "passed": report.ok, "n_tight": int(e.n_tight[0]),
            "n_tight_relu": int(e.configuration.n_tight_relu[0]),
            "n_tight_pool": int(e.configuration.n_tight_pool[0]),
            "r2": r2, "rinf": rinf, "region": str(e.region_key[0]), "gap": f.logit_gap,
            "delta": f.delta,
        })
    title = verification_title(m.description, torch.float64, max(r["error"] for r in rows),
                               all_ok)
    fig = plot_grid(feats, class_names=names, labels=[r["label_id"] for r in rows],
                    row_titles=[f"sample image {r['index']}" for r in rows], title=title)
    figure = _save(fig, _make_dir(out) / DEMO_FIGURE)

    lines = [
        f"openbox demo: {m.description} from the packaged {DEMO_CHECKPOINT}, "
        f"on {len(rows)} images of the packaged Fashion-MNIST test sample, in float64.",
        "error = max |W_x x + b_x - model(x)| and |program(x) - model(x)| over the 10 logits "
        f"(tolerance {ob.tol.verify_atol:g} + {ob.tol.verify_rtol:g} |f(x)|); tight = facets "
        "x lies on (tied ReLU inputs + max-pool ties); radius = largest ball around x inside "
        "its region (0 on a facet); gap = logit of the predicted class minus the mean of the "
        "others, from the LLC (delta = LLC - model).",
        "",
        f"{'index':>5}  {'label':<12} {'predicted':<12} {'error':>8}  {'pass':<4}  "
        f"{'tight':>5}  {'relu+pool':>10}  {'radius L2':>9}  {'radius Linf':>11}  {'gap':>8}  "
        f"{'delta':>8}  region",
    ]
    for r in rows:
        split = f"{r['n_tight_relu']}+{r['n_tight_pool']}"
        lines.append(
            f"{r['index']:>5}  {r['label'][:12]:<12} {r['predicted'][:12]:<12} "
            f"{r['error']:>8.1e}  {'ok' if r['passed'] else 'FAIL':<4}  {r['n_tight']:>5}  "
            f"{split:>10}  {r['r2']:>9.3g}  {r['rinf']:>11.3g}  {r['gap']:>8.3f}  "
            f"{r['delta']:>8.1e}  {r['region']}"
        )
    n_ok = sum(r["passed"] for r in rows)
    lines += ["", f"{n_ok}/{len(rows)} explanations verified exact; "
                  f"{sum(r['n_tight'] > 0 for r in rows)} of {len(rows)} images lie on facets."]
    summary = out / DEMO_SUMMARY
    summary.write_text("\n".join(lines) + "\n")
    for line in lines[3:]:
        _say(line)
    _say(f"wrote {figure} and {summary} in {time.perf_counter() - started:.1f} s")
    return EXIT_OK if all_ok else EXIT_FAILED


# --- compare ------------------------------------------------------------------------------

COMPARE_OUT = "openbox-compare"
COMPARE_FILES = ("compare.png", "compare.md", "compare.csv")
COMPARE_DEFAULT_N = 4


def _methods(spec: str) -> list[str]:
    from openbox import explainers

    if spec == "all":
        return list(explainers.names())
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in explainers.names()]
    if unknown or not names:
        raise UsageError(f"--methods: unknown method(s) {', '.join(unknown) or '(none given)'}; "
                         f"the methods are: all, {', '.join(explainers.names())}")
    return names


def _measures(spec: str) -> list[str]:
    from openbox.comparison import MEASURES

    if spec == "all":
        return list(MEASURES)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [n for n in names if n not in MEASURES]
    if unknown:
        raise UsageError(f"--measures: unknown measure(s) {', '.join(unknown)}; the measures "
                         f"are: all, {', '.join(MEASURES)}")
    return names


def cmd_compare(args: argparse.Namespace) -> int:
    from openbox.comparison import compare

    methods = _methods(args.methods)
    measures = _measures(args.measures)
    out = _check_out_dir(args.out)
    if args.n is not None and args.n < 1:
        raise UsageError(f"--n must be >= 1, got {args.n}")
    m = _load_model(args)
    ds, where = _test_images(args.data, args.download)
    _check_input_shape(m, tuple(ds.images.shape[1:]), where)
    if args.index is not None:
        _check_index(args.index, len(ds), where)
        index = [args.index]
    else:
        n = COMPARE_DEFAULT_N if args.n is None else args.n
        if n > len(ds):
            raise UsageError(f"--n {n} asks for more images than {where} holds ({len(ds):,})")
        g = torch.Generator().manual_seed(args.seed)
        index = sorted(torch.randperm(len(ds), generator=g)[:n].tolist())
    names = _class_names(m, ds)
    x = ds.images[index].float()
    _say(f"comparing {len(methods)} methods on {m.description}: {len(index)} image"
         f"{'s' * (len(index) != 1)} of {where} (indices {index[:10]}"
         f"{' ...' if len(index) > 10 else ''}; seed {args.seed}); measures: "
         f"{', '.join(measures)}")

    def done(report):
        extra = f", {len(report.errors)} measure(s) not applicable" if report.errors else ""
        tqdm.write(f"  {report.name}: {report.seconds:.4g} s per explanation{extra}",
                   file=sys.stderr)

    c = compare(m.model, x, input_shape=m.input_shape, methods=methods, measures=measures,
                reference=ds.images.float() if "consistency" in measures else None,
                index=index, seed=args.seed, progress=True, on_method=done,
                skip_unsupported=args.methods == "all")
    _make_dir(out)
    figure = _save(c.plot(class_names=names, title=f"{m.description}: attributions of the "
                          "target class (each map scaled by its max |value|)"),
                   out / COMPARE_FILES[0])
    table = c.to_markdown()
    (out / COMPARE_FILES[1]).write_text(table + "\n")
    c.to_csv(out / COMPARE_FILES[2])
    _say(table)
    _say(f"wrote {figure}, {out / COMPARE_FILES[1]} and {out / COMPARE_FILES[2]}")
    return EXIT_OK


# --- parser ------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and ``(default: X)`` after an option's help, unless the
    option is required, has no default (None or False), or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.required or default is None or default is False
                or default is argparse.SUPPRESS or "default" in text.lower()
                or (not action.option_strings and action.nargs not in ("?", "*"))):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def _add_data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="DIR", default=None,
                   help="folder with the Fashion-MNIST IDX files; use its test split "
                        "(default: the 1,000-image sample shipped in the package)")
    _add_download(p)


def _add_download(p: argparse.ArgumentParser) -> None:
    p.add_argument("--download", action="store_true",
                   help="download the official Fashion-MNIST files into the data folder "
                        "if they are missing (needs internet access)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT", nargs="?", default=None,
                   help="checkpoint written by 'openbox train' (or give --model and --weights)")
    p.add_argument("--model", metavar="MODULE:FACTORY", default=None,
                   help="your own model instead of a checkpoint: FACTORY() in MODULE (a module "
                        "name, searched from the current folder, or a .py file) returns the "
                        "torch.nn.Module; needs --weights")
    p.add_argument("--weights", metavar="FILE", default=None,
                   help="the state dict for --model, saved with torch.save(model.state_dict(), "
                        "FILE); read with torch.load(weights_only=True)")


CLASS_HELP = "an index or a class name (case-insensitive; a unique prefix will do)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Exact explanations of piecewise-linear CNNs: the network's own local "
                    "linear classifier at an input, and the polytope on which it is the "
                    "network.",
        epilog="exit codes: 0 ok, 1 verification failed, 2 bad usage or input. "
               "Run 'openbox demo' for a first look (offline, under a minute).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    from openbox.fmnist.tasks import TASK_NAMES, TASKS

    p = sub.add_parser(
        "train", help="train a reference model on Fashion-MNIST and save a checkpoint",
        formatter_class=_Formatter,
        description="Train a model from openbox.fmnist.models on the full Fashion-MNIST training "
                    "split (seeded Adam), report train and test accuracy, save a checked "
                    "checkpoint.\n\nData folder: --data DIR, else $OPENBOX_DATA_DIR, else the "
                    "user cache (~/.cache/openbox/fashion-mnist).\n\nThe paper's PLNN-NS on "
                    "FMNIST-1 (784-256-128-100-2, Adam): --model plnn --task fmnist-1 --epochs "
                    "10 --batch-size 1000 --nonnegative all-but-first --l1 X.\n\nModels:\n"
                    + describe_models(),
    )
    p.add_argument("--model", choices=MODEL_NAMES, default="cnn", help="architecture")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="folder with the four Fashion-MNIST IDX files "
                        "(default: $OPENBOX_DATA_DIR, then the user cache)")
    _add_download(p)
    p.add_argument("--epochs", type=int, default=5, help="passes over the training split")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file to write (.pt)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights and shuffling")
    p.add_argument("--batch-size", type=int, default=128, help="images per Adam step")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--channels", type=int, nargs="+", default=None, metavar="C",
                   help="convolution widths (cnn, lenet: two; gap: any number; default: the "
                        "architecture's own)")
    p.add_argument("--hidden", type=int, nargs="+", default=None, metavar="H",
                   help="hidden widths of the fully connected layers (plnn, lenet; default: "
                        "the architecture's own)")
    p.add_argument("--pool", choices=("max", "avg"), default=None,
                   help="pooling (cnn only; default: max)")
    p.add_argument("--no-batch-norm", action="store_true", help="leave out BatchNorm (cnn, gap)")
    p.add_argument("--device", default="cpu",
                   help="torch device to train on (cpu, cuda, cuda:1, mps)")
    p.add_argument("--task", choices=TASK_NAMES, default=None,
                   help="train a 2-class model on one of the OpenBox paper's binary tasks "
                        "(train and test splits alike): "
                        + "; ".join(f"{t.name}: {t.description}" for t in TASKS.values()))
    p.add_argument("--l1", type=float, default=0.0, metavar="X",
                   help="add X * sum |w| over the weights (not biases) of the --nonnegative "
                        "layers to the loss (sparsity; needs --nonnegative)")
    p.add_argument("--nonnegative", default=None, metavar="all-but-first|NAME[,NAME]",
                   help="keep these layers' weights >= 0 (projected after every Adam step): "
                        "all-but-first = every Linear/Conv layer but the first (the paper's "
                        "PLNN-NS: fc2,fc3,fc for plnn), or module names, e.g. fc3,fc")
    p.add_argument("--mmr", type=float, default=None, metavar="WEIGHT",
                   help="add an MMR-style region-enlarging penalty (Croce et al. 2019) of this "
                        "weight: a hinge on the distances of each image to its k nearest gate "
                        "hyperplanes, gradient norms estimated with Gaussian probes (see "
                        "openbox.fmnist.regularisers)")
    p.add_argument("--mmr-gamma", type=float, default=None, metavar="G",
                   help=f"target distance in pixel units (default {MMR_DEFAULTS['gamma']})")
    p.add_argument("--mmr-k", type=int, default=None, metavar="K",
                   help=f"nearest hyperplanes per image (default {MMR_DEFAULTS['k']})")
    p.add_argument("--mmr-ramp-epochs", type=float, default=None, metavar="E",
                   help="epochs over which the weight rises from 0 (whole epochs: 0 during "
                        f"epoch 1 with E >= 1; default {MMR_DEFAULTS['ramp_epochs']:g})")
    p.add_argument("--mmr-probes", type=int, default=None, metavar="M",
                   help=f"Gaussian probes per image, >= 3 (default {MMR_DEFAULTS['probes']})")
    p.add_argument("--mmr-examples", type=int, default=None, metavar="N",
                   help="images of each batch the penalty is computed on (default "
                        f"{MMR_DEFAULTS['max_examples']})")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser(
        "explain", help="explain one image: LLC, decision features, region, radius",
        formatter_class=_Formatter,
        description="Explain test image --index (or your own --image) with the checkpoint's "
                    "model (or your own --model): write input.png, features.png (decision "
                    "features of the predicted class) and explanation.json (logits, region key, "
                    "certified radii, tight facets, verification, polytope size) into --out; "
                    "with --save, also the arrays (W_x, b_x, contrast, region key, radii) as "
                    "an .npz file.",
    )
    _add_model(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--index", type=int, help="image index in the test split")
    which.add_argument("--image", metavar="FILE",
                       help="your own image: a 28 x 28 greyscale PNG, or a .npy array of "
                            "shape (28, 28) or (1, 28, 28) with values in [0, 1]")
    _add_data(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--save", metavar="FILE.npz", default=None,
                   help="also write the explanation's arrays to FILE.npz (numpy.load reads it)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float64",
                   help="working dtype (float64: exact to ~1e-10)")
    p.add_argument("--target", metavar="CLASS", default=None,
                   help=f"class whose decision features to draw: {CLASS_HELP} "
                        "(default: the predicted class)")
    p.add_argument("--versus", metavar="rest|CLASS", default=REST,
                   help="contrast against the mean of the other classes (rest), or against "
                        f"one class: {CLASS_HELP}")
    p.add_argument("--inscribed", action="store_true",
                   help="also solve the LP for the region's inscribed-ball (Chebyshev) radius "
                        "(slow: one LP over all ~10^4 constraints)")
    p.set_defaults(run=cmd_explain)

    p = sub.add_parser(
        "verify", help="check program == model and LLC == model on test images",
        formatter_class=_Formatter,
        description="Check, image by image, that the compiled program and the local linear "
                    "classifier reproduce the model's logits within the dtype's tolerance. "
                    "Exit code 0 when all pass, 1 when any fails.",
    )
    _add_model(p)
    _add_data(p)
    p.add_argument("--n", type=int, default=VERIFY_DEFAULT_N, help="number of images")
    p.add_argument("--start", type=int, default=0, help="first image index")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float64", help="working dtype")
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser(
        "segment", help="the exact linear pieces between two test images",
        formatter_class=_Formatter,
        description="Walk the straight segment from test image --from to test image --to and "
                    "list its exact linear pieces (the regions it crosses): segment.png "
                    "(the model's logits along the segment with every breakpoint) and "
                    "segment.csv (one row per piece) in --out.",
    )
    _add_model(p)
    p.add_argument("--from", dest="start", type=int, required=True, metavar="I",
                   help="index of the first image in the test split")
    p.add_argument("--to", dest="end", type=int, required=True, metavar="J",
                   help="index of the second image")
    _add_data(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float64", help="working dtype")
    p.set_defaults(run=cmd_segment)

    p = sub.add_parser(
        "plane", help="the exact linear regions of a 2-D slice through a test image",
        formatter_class=_Formatter,
        description="Map the plane x0 + a u + b v (|a|, |b| <= --extent, inside [0, 1]^n) "
                    "through test image --index into its exact linear regions: plane.png "
                    "(regions filled by predicted class, decision boundaries thick) in --out.",
    )
    _add_model(p)
    p.add_argument("--index", type=int, required=True, help="image index in the test split")
    p.add_argument("--directions", default="random", metavar="random|pca|towards:J[,K]",
                   help="u and v: seeded random unit directions, the first two principal "
                        "components of the images, or the differences to test images J (and K)")
    p.add_argument("--extent", type=float, default=0.05,
                   help="half-width of the square extent in (a, b)")
    p.add_argument("--max-regions", type=int, default=5000,
                   help="stop after this many regions (the map is then marked incomplete)")
    p.add_argument("--starts", type=int, default=6,
                   help="the walk starts from the image and an N x N grid over the extent "
                        "(faster); 1: from the image alone, so that a map stopped by "
                        "--max-regions shows the image's surroundings")
    _add_data(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float64", help="working dtype")
    p.set_defaults(run=cmd_plane)

    p = sub.add_parser(
        "census", help="count the linear regions test images fall into",
        formatter_class=_Formatter,
        description="Push test images through the model once and count the linear regions "
                    "they fall into: the largest regions (size, majority class, purity, "
                    "inputs on a facet), the per-layer structure (distinct activation "
                    "patterns, Hamming distance to the nearest neighbour's pattern), and a "
                    f"histogram of region sizes (--plot, default {CENSUS_FIGURE}).",
    )
    _add_model(p)
    _add_data(p)
    p.add_argument("--n", type=int, default=None,
                   help="number of images, from the first (default: all)")
    p.add_argument("--top", type=int, default=CENSUS_TOP, help="largest regions to list")
    p.add_argument("--plot", metavar="FILE.png", default=CENSUS_FIGURE,
                   help="histogram of region sizes to write")
    p.add_argument("--csv", metavar="FILE.csv", default=None,
                   help="also write every region (digest, inputs, majority, purity) as CSV")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float64", help="working dtype")
    p.set_defaults(run=cmd_census)

    p = sub.add_parser(
        "equivalent", help="decide whether two checkpoints compute the same function near "
                           "a test image", formatter_class=_Formatter,
        description="Walk the common refinement of both models' linear regions inside the "
                    "L-inf box of radius --eps around test image --index (clipped to [0, 1]) "
                    "and compare their local linear classifiers on every cell, exactly. Exit "
                    "code 0 when the two are equivalent there, 1 when not (a counterexample "
                    "verified by both models' own forward is printed) or when --max-cells "
                    "stops the search undecided. Boxes around 28 x 28 images hold thousands "
                    "of regions even at eps = 1e-5; with --to J the models are compared "
                    "along the segment from image --index to image J instead (seconds).")
    p.add_argument("checkpoint_a", metavar="CKPT_A", help="the reference checkpoint")
    p.add_argument("checkpoint_b", metavar="CKPT_B", help="the checkpoint compared with it")
    p.add_argument("--index", type=int, required=True, help="test image at the box's centre")
    p.add_argument("--eps", type=float, default=1e-5, help="half-width of the L-inf box")
    p.add_argument("--to", type=int, default=None, metavar="J",
                   help="compare along the segment from image --index to test image J "
                        "instead of on the box")
    p.add_argument("--max-cells", type=int, default=10_000,
                   help="cells of the box walked before giving up undecided")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float64", help="working dtype")
    _add_data(p)
    p.set_defaults(run=cmd_equivalent)

    shown = ", ".join(CLASSES[c] for c in DEMO_CLASSES)
    p = sub.add_parser(
        "compare", formatter_class=_Formatter,
        help="every explainer side by side on test images: a grid figure and a metric table",
        description="Explain test images with openbox's exact methods and the approximate "
                    "ones (LIME, SHAP, gradients, CAMs, LRP, ...) and measure each: "
                    "exactness, local fidelity, seed stability, consistency, faithfulness, "
                    "randomisation and sensitivity, with the time per explanation. Writes "
                    + ", ".join(COMPARE_FILES) + " to --out.",
    )
    _add_model(p)
    _add_data(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--index", type=int, help="one image index in the test split")
    which.add_argument("--n", type=int, default=None,
                       help=f"number of images, drawn at random with --seed (default "
                            f"{COMPARE_DEFAULT_N})")
    p.add_argument("--methods", default="all", metavar="all|NAME[,NAME...]",
                   help="methods to compare")
    p.add_argument("--measures", default="all", metavar="all|NAME[,NAME...]",
                   help="measures to compute")
    p.add_argument("--seed", type=int, default=0, help="seeds the image draw, every sampling "
                   "method and every measure")
    p.add_argument("--out", default=COMPARE_OUT, metavar="DIR", help="output folder (created)")
    p.set_defaults(run=cmd_compare)

    p = sub.add_parser(
        "demo", help="offline demo on the packaged model and sample images",
        formatter_class=_Formatter,
        description=f"Explain {len(DEMO_CLASSES)} packaged test images, one of each of these "
                    f"{len(DEMO_CLASSES)} classes: {shown}, with the packaged "
                    f"{DEMO_CHECKPOINT}; verify them, and write a figure of their decision "
                    f"features ({DEMO_FIGURE}) and a text summary ({DEMO_SUMMARY}). Needs no "
                    "data folder and no network.",
    )
    p.add_argument("--out", default=DEMO_OUT, metavar="DIR", help="output folder (created)")
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``openbox`` command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help / --version (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except BrokenPipeError:  # e.g. `openbox verify ... | head`: stop quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except _expected_errors() as exc:
        message = str(exc) if not isinstance(exc, OSError) or exc.filename is None else \
            f"{exc.filename}: {exc.strerror or exc}"
        if isinstance(exc, DatasetError):  # the loader's advice, in the CLI's terms
            message = message.replace("(download=True)", "(--download)")
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
