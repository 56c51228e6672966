"""The ``openbox`` command line: train, explain, verify, demo.

Exit codes (scripts may rely on them):

* 0 -- done (and, for ``verify`` and ``demo``, every check passed);
* 1 -- a verification failed: the local linear classifier or the compiled program
  does not reproduce the model within the working dtype's tolerance;
* 2 -- bad usage or input: unknown option, missing or tampered checkpoint, missing
  data, index out of range. The reason goes to stderr as ``openbox: error: ...``.

Progress bars (tqdm) go to stderr; results go to stdout. torch's thread count
follows ``OMP_NUM_THREADS`` as torch itself reads it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from openbox.engine import Explanation, OpenBox, VerificationReport
from openbox.features import REST, decision_features
from openbox.fmnist import data as obdata
from openbox.fmnist.checkpoints import (
    CheckpointError,
    CheckpointInfo,
    load_checkpoint,
    save_checkpoint,
)
from openbox.fmnist.data import CLASSES, DatasetError, load_fashion_mnist, load_sample
from openbox.fmnist.demo import DEMO_CHECKPOINT, DEMO_CLASSES, demo_checkpoint, demo_indices
from openbox.fmnist.models import MODEL_NAMES, build_model, count_parameters, describe_models

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

PROG = "openbox"
DTYPES = {"float64": torch.float64, "float32": torch.float32}
DOMAIN = (0.0, 1.0)  # pixels in [0, 1]: the input box attached to every polytope
DEMO_OUT = "openbox-demo"
DEMO_FIGURE = "decision-features.png"
DEMO_SUMMARY = "summary.txt"
VERIFY_DEFAULT_N = 100
VERIFY_BATCH = 25  # images per ob.verify call (one progress step)
FIG_DPI = 100
INPUT_FIG_INCHES = 2.6
SAMPLE_NOTE = "pass --data DIR for the full test split"


class UsageError(Exception):
    """An expected problem with the user's arguments or files: printed, exit code 2."""


# --- shared helpers --------------------------------------------------------------------


def _say(*parts: Any) -> None:
    """A line of results on stdout, printed past any tqdm bar."""
    tqdm.write(" ".join(str(p) for p in parts), file=sys.stdout)


def _progress(iterable=None, **kwargs):
    return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, leave=False, **kwargs)


def _load_model(path: str | Path) -> tuple[torch.nn.Module, CheckpointInfo]:
    """A checkpoint's model (eval mode, CPU); CheckpointError names the file and the fault."""
    return load_checkpoint(Path(path))


def _test_images(data_dir: str | None, download: bool) -> tuple[obdata.Dataset, str]:
    """The test split from ``data_dir``, or the packaged sample; and a phrase saying which."""
    if data_dir is None:
        ds = load_sample()
        return ds, f"the packaged {len(ds):,}-image sample of the test split ({SAMPLE_NOTE})"
    ds = load_fashion_mnist("test", data_dir, download=download, progress=True)
    return ds, f"the test split in {data_dir} ({len(ds):,} images)"


def _class_names(info: CheckpointInfo, ds: obdata.Dataset | None = None) -> list[str] | None:
    names = info.metadata.get("classes")
    if isinstance(names, list) and len(names) == info.num_classes:
        return [str(n) for n in names]
    if ds is not None and ds.num_classes == info.num_classes:
        return list(ds.classes)
    return list(CLASSES) if info.num_classes == len(CLASSES) else None


def _name(c: int, names: Sequence[str] | None) -> str:
    return names[c] if names is not None and 0 <= c < len(names) else f"class {c}"


def _check_index(index: int, n: int, where: str) -> None:
    if not 0 <= index < n:
        raise UsageError(f"--index {index} is out of range: {where} holds {n:,} images "
                         f"(indices 0..{n - 1})")


def _out_dir(path: str | Path) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a folder; --out names the output folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # FileExistsError for a file, PermissionError, ...
        raise UsageError(f"cannot use {out} as the output folder ({exc.strerror or exc})") from exc
    return out


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=FIG_DPI)
    return path


def _input_figure(x: torch.Tensor, title: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(INPUT_FIG_INCHES, INPUT_FIG_INCHES), layout="constrained")
    ax = fig.subplots()
    image = x.detach().to("cpu").double()
    ax.imshow(image.sum(0) if image.dim() == 3 else image, cmap="gray", vmin=0.0, vmax=1.0,
              interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def _fmt(value: float | None) -> str:
    return "inf" if value is None else f"{value:.3g}"


def _finite(value: float) -> float | None:
    """JSON has no inf/nan: a radius of inf (an unbounded region) becomes None."""
    return float(value) if math.isfinite(value) else None


# --- train -------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    from openbox.fmnist.training import train

    kwargs: dict[str, Any] = {}
    if args.channels is not None:
        kwargs["channels"] = list(args.channels)
    if args.hidden is not None:
        kwargs["hidden"] = list(args.hidden)
    if args.pool is not None:
        kwargs["pool"] = args.pool
    if args.no_batch_norm:
        kwargs["batch_norm"] = False
    if args.epochs < 1 or args.batch_size < 1 or not args.lr > 0:
        raise UsageError("--epochs and --batch-size must be >= 1 and --lr > 0, got "
                         f"{args.epochs}, {args.batch_size} and {args.lr}")
    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise UsageError(f"--device {args.device!r} is not a torch device ({exc})") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: this torch build or machine has no CUDA")
    try:
        model = build_model(args.model, len(CLASSES), seed=args.seed, **kwargs)
    except ValueError as exc:
        raise UsageError(f"cannot build model {args.model!r} with {kwargs}: {exc}") from exc
    train_set = load_fashion_mnist("train", args.data, download=args.download)
    test_set = load_fashion_mnist("test", args.data, download=args.download)
    _say(f"{args.model} {kwargs or '(default options)'}: {count_parameters(model):,} parameters;"
         f" {len(train_set):,} training / {len(test_set):,} test images from "
         f"{train_set.source.rsplit(' (', 1)[0]}")
    started = time.perf_counter()
    result = train(model, train_set, test_set, epochs=args.epochs, batch_size=args.batch_size,
                   lr=args.lr, seed=args.seed, device=device, progress=True)
    seconds = time.perf_counter() - started
    out = save_checkpoint(
        args.out, model.to("cpu"), arch=args.model, arch_kwargs=kwargs,
        num_classes=len(CLASSES),
        metadata={
            "dataset": train_set.source,
            "classes": list(train_set.classes),
            "train_images": len(train_set),
            "test_images": len(test_set),
            "train_accuracy": result.train_accuracy[-1],
            "test_accuracy": result.final_test_accuracy,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "optimizer": "Adam",
            "seed": args.seed,
            "seconds": seconds,
            "threads": torch.get_num_threads(),
            "command": "openbox train",
        },
    )
    _say(f"train accuracy {result.train_accuracy[-1]:.4f}, test accuracy "
         f"{result.final_test_accuracy:.4f} after {args.epochs} epoch(s) in {seconds:.1f} s")
    _say(f"wrote {out}")
    return EXIT_OK


# --- explain -----------------------------------------------------------------------------


def _explanation_record(
    *, info: CheckpointInfo, where: str, data_dir: str | None, index: int, label: int, names,
    e: Explanation, report: VerificationReport, poly, features, inscribed: dict[str, Any],
    ob: OpenBox,
) -> dict[str, Any]:
    config = e.configuration
    logits = e.logits[0].tolist()
    predicted = int(e.prediction[0])
    tol = ob.tol
    n_dropped = poly.n_dropped
    return {
        "checkpoint": str(info.path),
        "checkpoint_sha256": info.sha256,
        "arch": info.arch,
        "arch_kwargs": info.arch_kwargs,
        "data": where,
        "data_dir": data_dir,
        "index": index,
        "label": label,
        "label_name": _name(label, names),
        "predicted": predicted,
        "predicted_name": _name(predicted, names),
        "correct": predicted == label,
        "class_names": names,
        "logits": logits,
        "region_key": str(e.region_key[0]),
        "certified_radius": {"l2": _finite(poly.radius(norm=2)),
                             "linf": _finite(poly.radius(norm=float("inf")))},
        "certified_radius_note": "largest ball around x inside its region (the network's own "
                                 "constraints; the input domain is not one); 0 when x lies "
                                 "on a facet",
        "n_tight": int(e.n_tight[0]),
        "n_tight_relu": int(config.n_tight_relu[0]),
        "n_tight_pool": int(config.n_tight_pool[0]),
        "inscribed_radius": inscribed["value"],
        "inscribed_radius_note": inscribed["note"],
        "verification": {
            "passed": bool(report.passed[0]),
            "max_abs_error": float(report.max_abs_error),
            "llc_error": float(report.llc_error[0]),
            "program_error": float(report.program_error[0]),
            "rtol": report.rtol,
            "atol": report.atol,
        },
        "polytope": {
            "n_constraints": int(poly.n_constraints),
            "n_zero_rows_dropped": n_dropped,
            "n_inputs": int(poly.A.shape[1]),
            "domain": list(DOMAIN),
            "nbytes": int(poly.nbytes),
        },
        "decision_features": {
            "target": features.target,
            "target_name": _name(features.target, names),
            "versus": features.versus,
            "logit_gap": features.logit_gap,
            "model_gap": features.model_gap,
            "delta": features.delta,
        },
        "dtype": str(ob.dtype).removeprefix("torch."),
        "tolerances": {
            "verify_rtol": tol.verify_rtol,
            "verify_atol": tol.verify_atol,
            "tie": tol.tie,
            "same_function": tol.same_function,
            "feasibility": tol.feasibility,
            "lp": tol.lp,
        },
        "tie_break": "configuration at x + t u for small t > 0, u = "
                     "openbox.configuration.tie_break_direction",
    }


def cmd_explain(args: argparse.Namespace) -> int:
    from openbox.plotting import plot_decision_features

    dtype = DTYPES[args.dtype]
    model, info = _load_model(args.checkpoint)
    ds, where = _test_images(args.data, args.download)
    _check_index(args.index, len(ds), where)
    for flag, c in (("--target", args.target), ("--versus", args.versus)):
        if isinstance(c, int) and not 0 <= c < info.num_classes:
            raise UsageError(f"{flag} {c} is out of range: the model has {info.num_classes} "
                             f"classes (0..{info.num_classes - 1})")
    names = _class_names(info, ds)
    out = _out_dir(args.out)

    steps = ["compile", "explain", "verify", "polytope"] + (["inscribed"] if args.inscribed
                                                           else []) + ["figures"]
    bar = _progress(total=len(steps), desc="explain", unit="step")

    def step(name: str) -> None:
        bar.set_description(name)

    step("compile")
    ob = OpenBox(model, info.input_shape, dtype=dtype, domain=DOMAIN)
    x = ds.images[args.index : args.index + 1].to(dtype)
    label = int(ds.labels[args.index])
    bar.update()
    step("explain")
    e = ob.explain(x)
    bar.update()
    step("verify")
    report = ob.verify(x)
    bar.update()
    step("polytope")
    poly = ob.polytope(x[0])
    bar.update()
    if args.inscribed:
        step("inscribed")
        started = time.perf_counter()
        inscribed = {"value": _finite(poly.inscribed_radius()),
                     "note": f"Chebyshev-ball LP over {poly.n_constraints:,} constraints, "
                             f"{time.perf_counter() - started:.1f} s"}
        bar.update()
    else:
        inscribed = {"value": None,
                     "note": "not computed: an LP over all constraints (seconds to minutes on "
                             "a small machine); pass --inscribed to compute it"}
    step("figures")
    try:
        features = decision_features(e, 0, target=args.target, versus=args.versus)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    title = f"#{args.index}: {_name(label, names)}"
    input_png = _save(_input_figure(x[0], title), out / "input.png")
    features_png = _save(plot_decision_features(features, class_names=names, label=label),
                         out / "features.png")
    bar.update()
    bar.close()

    record = _explanation_record(
        info=info, where=where, data_dir=args.data, index=args.index, label=label, names=names,
        e=e, report=report, poly=poly, features=features, inscribed=inscribed, ob=ob,
    )
    json_path = out / "explanation.json"
    json_path.write_text(json.dumps(record, indent=2) + "\n")

    r = record["certified_radius"]
    _say(f"image {args.index} of {where}")
    _say(f"  label {record['label_name']}, predicted {record['predicted_name']} "
         f"(logit {max(record['logits']):.4f}); region {record['region_key']}")
    _say(f"  on {record['n_tight']} facets ({record['n_tight_relu']} tied ReLU inputs, "
         f"{record['n_tight_pool']} max-pool ties); certified radius L2 {_fmt(r['l2'])}, "
         f"L-inf {_fmt(r['linf'])}")
    if args.inscribed:
        _say(f"  inscribed (Chebyshev) radius of the region: "
             f"{_fmt(record['inscribed_radius'])}")
    _say(f"  polytope: {poly.n_constraints:,} constraints "
         f"({record['polytope']['n_zero_rows_dropped']:,} identically zero rows dropped)")
    v = record["verification"]
    _say(f"  verification {'passed' if v['passed'] else 'FAILED'} in {args.dtype}: "
         f"max |LLC - model| {v['llc_error']:.2e}, max |program - model| "
         f"{v['program_error']:.2e} (tolerance {v['atol']:g} + {v['rtol']:g} |f(x)|)")
    versus = REST if features.versus == REST else _name(features.versus, names)
    _say(f"  decision features of {_name(features.target, names)} vs {versus}: "
         f"logit gap {features.logit_gap:.6f} (LLC) vs {features.model_gap:.6f} (model)")
    _say(f"wrote {input_png}, {features_png}, {json_path}")
    return EXIT_OK if v["passed"] else EXIT_FAILED


# --- verify ------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace) -> int:
    dtype = DTYPES[args.dtype]
    model, info = _load_model(args.checkpoint)
    ds, where = _test_images(args.data, args.download)
    if args.n < 1 or args.start < 0:
        raise UsageError(f"--n must be >= 1 and --start >= 0, got {args.n} and {args.start}")
    if args.start + args.n > len(ds):
        raise UsageError(f"--start {args.start} --n {args.n} asks for images up to "
                         f"{args.start + args.n - 1}, but {where} holds {len(ds):,} images")
    names = _class_names(info, ds)
    ob = OpenBox(model, info.input_shape, dtype=dtype, domain=DOMAIN)
    _say(f"verifying {info.path} on images {args.start}..{args.start + args.n - 1} of {where} "
         f"in {args.dtype}")
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


# --- demo --------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    from openbox.plotting import plot_grid

    started = time.perf_counter()
    out = _out_dir(args.out)
    model, info = _load_model(demo_checkpoint())
    ds = load_sample()
    names = _class_names(info, ds)
    indices = demo_indices(ds.labels)
    ob = OpenBox(model, info.input_shape, dtype=torch.float64, domain=DOMAIN)
    accuracy = info.metadata.get("test_accuracy")
    accuracy = f", test accuracy {accuracy:.3f}" if isinstance(accuracy, float) else ""
    _say(f"demo: {info.arch} {info.arch_kwargs}{accuracy}; explaining {len(indices)} images "
         "of the packaged sample in float64")
    rows, feats, all_ok = [], [], True
    for i in _progress(indices, desc="demo", unit="image"):
        x = ds.images[i : i + 1].double()
        e = ob.explain(x)
        report = ob.verify(x)
        r2, rinf = (float(r[0]) for r in ob.radius_pair(x))
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
    fig = plot_grid(feats, class_names=names, labels=[r["label_id"] for r in rows],
                    row_titles=[f"sample image {r['index']}" for r in rows])
    figure = _save(fig, out / DEMO_FIGURE)

    lines = [
        f"openbox demo: {info.arch} {info.arch_kwargs} from the packaged {DEMO_CHECKPOINT}, "
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


# --- parser ------------------------------------------------------------------------------


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _add_common(p: argparse.ArgumentParser, *, sample: bool) -> None:
    if sample:
        p.add_argument("--data", metavar="DIR", default=None,
                       help="folder with the Fashion-MNIST IDX files; use its test split "
                            "(default: the 1,000-image sample shipped in the package)")
    p.add_argument("--download", action="store_true",
                   help="download the official Fashion-MNIST files into the data folder "
                        "if they are missing (needs internet access)")


def _versus(value: str) -> str | int:
    if value == REST:
        return REST
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'rest' or a class index, got {value!r}") \
            from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Exact explanations of piecewise-linear CNNs: the network's own local "
                    "linear classifier at an input, and the polytope on which it is the "
                    "network.",
        epilog="exit codes: 0 ok, 1 verification failed, 2 bad usage or input. "
               "Run 'openbox demo' for a first look (offline, under a minute).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "train", help="train a reference model on Fashion-MNIST and save a checkpoint",
        formatter_class=_Formatter,
        description="Train a model from openbox.fmnist.models on the full Fashion-MNIST training "
                    "split (seeded Adam), report train and test accuracy, save a checked "
                    "checkpoint.\n\nData folder: --data DIR, else $OPENBOX_DATA_DIR, else the "
                    "user cache (~/.cache/openbox/fashion-mnist).\n\nModels:\n"
                    + describe_models(),
    )
    p.add_argument("--model", choices=MODEL_NAMES, default="cnn", help="architecture")
    p.add_argument("--data", metavar="DIR", default=None,
                   help="folder with the four Fashion-MNIST IDX files "
                        "(default: $OPENBOX_DATA_DIR, then the user cache)")
    _add_common(p, sample=False)
    p.add_argument("--epochs", type=int, default=5, help="passes over the training split")
    p.add_argument("--out", required=True, metavar="CKPT", help="checkpoint file to write (.pt)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights and shuffling")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--channels", type=int, nargs="+", default=None, metavar="C",
                   help="convolution widths (cnn, lenet: two; gap: any number)")
    p.add_argument("--hidden", type=int, nargs="+", default=None, metavar="H",
                   help="hidden widths of the fully connected layers (plnn, lenet)")
    p.add_argument("--pool", choices=("max", "avg"), default=None, help="pooling (cnn only)")
    p.add_argument("--no-batch-norm", action="store_true", help="leave out BatchNorm (cnn, gap)")
    p.add_argument("--device", default="cpu", help="torch device to train on")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser(
        "explain", help="explain one test image: LLC, decision features, region, radius",
        formatter_class=_Formatter,
        description="Explain test image --index with the checkpoint's model: write input.png, "
                    "features.png (decision features of the predicted class) and "
                    "explanation.json (logits, region key, certified radii, tight facets, "
                    "verification, polytope size) into --out.",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint written by 'openbox train'")
    p.add_argument("--index", type=int, required=True, help="image index in the test split")
    _add_common(p, sample=True)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float64",
                   help="working dtype (float64: exact to ~1e-10)")
    p.add_argument("--target", type=int, default=None,
                   help="class whose decision features to draw (default: the predicted class)")
    p.add_argument("--versus", type=_versus, default=REST, metavar="rest|C",
                   help="contrast against the mean of the other classes, or one class C")
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
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint written by 'openbox train'")
    _add_common(p, sample=True)
    p.add_argument("--n", type=int, default=VERIFY_DEFAULT_N, help="number of images")
    p.add_argument("--start", type=int, default=0, help="first image index")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float64", help="working dtype")
    p.set_defaults(run=cmd_verify)

    p = sub.add_parser(
        "demo", help="offline demo on the packaged model and sample images",
        formatter_class=_Formatter,
        description=f"Explain {len(DEMO_CLASSES)} packaged test images (one per class) with the "
                    f"packaged {DEMO_CHECKPOINT}, verify them, and write a figure of their "
                    f"decision features ({DEMO_FIGURE}) and a text summary ({DEMO_SUMMARY}). "
                    "Needs no data folder and no network.",
    )
    p.add_argument("--out", default=DEMO_OUT, metavar="DIR", help="output folder (created)")
    p.set_defaults(run=cmd_demo)
    return parser


EXPECTED_ERRORS = (UsageError, CheckpointError, DatasetError, OSError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``openbox`` command line; returns the exit code (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
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
    except EXPECTED_ERRORS as exc:
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
