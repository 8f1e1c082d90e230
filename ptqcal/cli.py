"""Command line: ``ptqcal run``, ``compare-torch``, ``report`` and ``models``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .config import CALIB_METHODS, DEFAULT_MODELS, RunConfig, default_cache_dir
from .errors import UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """Report a usage mistake as one line (not argparse's usage block) with exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME|FILE.onnx",
                        help="registry names (see 'ptqcal models') or .onnx classifiers; several are compared "
                             "in one report (the default compares plain and label-smoothed training)")
    parser.add_argument("--weights", type=Path, help="state dict (.pth) for a registry model")
    parser.add_argument("--config", type=Path, help="TOML file with any of these options (the command line wins)")
    parser.add_argument("--dataset", help="digits, cifar100, cifar10, imagenet, folder, csv, npz, or FILE.npz; "
                        "default: the model's own dataset")
    parser.add_argument("--data-dir", type=Path, help="the dataset's folder or file "
                        "($PTQCAL_CIFAR100_DIR, $PTQCAL_IMAGENET_DIR)")
    parser.add_argument("--labels", type=Path, help="labels file for a flat ImageNet val folder")
    parser.add_argument("--calib-data", type=Path, help="a separate calibration pool, of the same kind as "
                        "--dataset (default: the dataset's train split, or images held out of evaluation)")
    parser.add_argument("--download", action="store_true", help="download CIFAR with torchvision (online only)")
    parser.add_argument("--strict", action="store_true", help="stop at an image that fails to decode "
                        "(default: skip it, warn, and count it in the report)")
    parser.add_argument("--eval-size", type=int, metavar="N", help="evaluate a seeded subset of N images")
    parser.add_argument("--weight-bits", type=int, nargs="+", default=[8, 7, 6, 5, 4], metavar="B",
                        help="weight bit widths to sweep, 2..8 (per-channel symmetric; 4 is native int4)")
    parser.add_argument("--act-bits", type=int, nargs="+", default=[8], metavar="B",
                        help="activation bit widths, 2..8 (per-tensor asymmetric); several sweep activations too")
    parser.add_argument("--precisions", nargs="+", choices=["fp16"], default=[],
                        help="extra precisions: fp16 adds the float16 graph (float32 inputs/outputs)")
    parser.add_argument("--weight-scale", choices=["torch", "ort"], default="torch",
                        help="per-channel scale: PyTorch's max|w|/((qmax-qmin)/2) or ORT's max|w|/qmax")
    parser.add_argument("--skip-first-layer", action="store_true", help="keep the first Conv/Gemm in float")
    parser.add_argument("--skip-last-layer", action="store_true", help="keep the last Conv/Gemm/MatMul in float")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="NODE", help="ONNX node names to keep in float")
    parser.add_argument("--execution", choices=["deployed", "simulated"], default="deployed",
                        help="deployed: ORT fuses Q/DQ into integer kernels (QLinearConv); simulated: float ops "
                             "between Q/DQ. Both are compared on a subset in the report")
    parser.add_argument("--calib-size", type=int, default=256, metavar="N",
                        help="calibration images, drawn with --seed from the calibration pool")
    parser.add_argument("--calib-method", choices=CALIB_METHODS, default="mse",
                        help="activation range: min/max, the L2 search of PyTorch's HistogramObserver, "
                             "a percentile, or KL entropy")
    parser.add_argument("--calib-ranges", type=Path, metavar="FILE.json",
                        help="reuse the activation ranges a run saved (calibration_ranges_a8.json) instead of "
                             "calibrating")
    parser.add_argument("--batch-size", type=int, default=256, help="evaluation batch size")
    parser.add_argument("--out", type=Path, help="run folder (default: ptqcal_runs/<model>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration draw")
    parser.add_argument("--repeats", type=int, default=1, metavar="K",
                        help="re-draw the calibration images K times (seeds S..S+K-1): mean ± std and bands")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(),
                        help="where trained built-in models are cached ($PTQCAL_CACHE_DIR)")
    parser.add_argument("--mean", type=_floats, help="per-channel mean on [0,1] pixels, for an .onnx model")
    parser.add_argument("--std", type=_floats, help="per-channel std on [0,1] pixels, for an .onnx model")
    parser.add_argument("--pixel-max", type=float, help="raw pixel value that maps to 1.0, for an .onnx model")
    parser.add_argument("--resize", type=int, help="short side before the centre crop, for an .onnx model "
                        "(0: resize straight to the input size)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ptqcal", description="What post-training quantization does to a classifier's "
                     "predictions and calibration, measured on ONNX Runtime's real QDQ graphs.")
    parser.add_argument("--version", action="version", version=f"ptqcal {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser(
        "run", help="quantize a classifier, evaluate every precision and write the report",
        description="Export (PyTorch models) or load (.onnx) a float classifier, calibrate activation ranges "
                    "once, build a QDQ model per weight bit width, evaluate all of them on CPU and write "
                    "metrics, figures and report.md. With no arguments: the built-in digits ResNet, "
                    "trained offline on scikit-learn's digits.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_run_options(run)

    compare = commands.add_parser(
        "compare-torch", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="quantize a registry model with ONNX Runtime and with torch.ao and report their agreement",
        description="Cross-framework check: the same quantization (per-channel symmetric weights, "
                    "HistogramObserver MSE activation ranges, same calibration batches) built by ptqcal on ONNX "
                    "Runtime and by torch.ao FX; prints per precision the top-1 agreement, the max logit difference, "
                    "each side's error and swaps from float, and the largest float margin among disagreements "
                    "(--out DIR also writes DIR/compare_torch.csv).")
    _add_run_options(compare)
    report = commands.add_parser(
        "report", help="rebuild the report of one or several saved runs (no model is run)",
        description="Recompute every metric and figure from saved runs' logits and write report.md and "
                    "report.html; several runs are compared side by side. Needs neither onnxruntime nor torch.")
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="run folders written by 'ptqcal run'")
    report.add_argument("--out", type=Path, help="where to write (default: the run folder, or ./ptqcal_report)")
    commands.add_parser("models", help="list the registry's models")
    return parser


def _apply_config_file(parser: argparse.ArgumentParser, argv, args: argparse.Namespace) -> argparse.Namespace:
    """Re-parse with the config file's values as defaults, so the command line still wins."""
    from .config import read_config_file

    values = read_config_file(args.config)
    subparser = parser._subparsers._group_actions[0].choices[args.command]  # noqa: SLF001
    actions = {action.dest: action for action in subparser._actions}  # noqa: SLF001
    for name, value in values.items():
        action = actions[name]
        try:
            if action.type is _floats:
                value = tuple(float(v) for v in value) if isinstance(value, list) else _floats(str(value))
            elif action.nargs in ("+", "*"):
                value = [action.type(v) if action.type else v for v in (value if isinstance(value, list) else [value])]
            elif action.type is not None:
                value = action.type(value)
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise UserError(f"{args.config}: {name}: {exc}") from None
        values[name] = value
    subparser.set_defaults(**values)
    return parser.parse_args(argv)


def _report(runs: list[Path], out: Path | None) -> int:
    from .analysis import build_report

    target = out or (runs[0] if len(runs) == 1 else Path("ptqcal_report"))
    print(f"report: {build_report(runs, target)}")
    return 0


COMPARE_COLUMNS = (("config", "config", "s"), ("agree %", "top1_agreement_pct", ".2f"),
                   ("max |Δlogit|", "max_abs_logit_diff", ".3f"), ("ORT err %", "onnx_top1_error", ".2f"),
                   ("torch err %", "torch_top1_error", ".2f"), ("ORT swapped %", "onnx_swapped_pct", ".2f"),
                   ("torch swapped %", "torch_swapped_pct", ".2f"),
                   ("disagree margin ≤", "disagreement_max_float_margin", ".3f"))


def _compare_torch(cfg: RunConfig) -> int:
    from .compare import compare_torch, save_agreements

    rows = compare_torch(cfg)
    print("  ".join(f"{header:>{len(header)}s}" for header, _, _ in COMPARE_COLUMNS))
    for row in rows:
        print("  ".join(f"{getattr(row, field):>{len(header)}{fmt}}" for header, field, fmt in COMPARE_COLUMNS))
    print("swapped: predictions changed from the float model's; disagree margin: the largest float top-1 minus "
          "top-2 logit among the images ORT and PyTorch disagree on")
    if cfg.out is not None:
        print(f"written: {save_agreements(rows, cfg.out)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return int(exit_.code or 0)
    try:
        if args.command == "models":
            from .models import get_model_entry, list_models

            for name in list_models():
                print(f"{name:18s} {get_model_entry(name).description}")
            return 0
        if args.command == "report":
            return _report(args.runs, args.out)
        if args.command not in ("run", "compare-torch"):
            parser.print_help()
            return EXIT_USAGE
        if args.config is not None:
            args = _apply_config_file(parser, argv, args)
        cfg = RunConfig(model=args.model[0], weights=args.weights, dataset=args.dataset, data_dir=args.data_dir,
                        labels=args.labels, calib_data=args.calib_data, download=args.download, strict=args.strict,
                        eval_size=args.eval_size, resize=args.resize, calib_ranges=args.calib_ranges,
                        weight_bits=tuple(args.weight_bits), act_bits=tuple(args.act_bits),
                        fp16="fp16" in args.precisions, weight_scale=args.weight_scale,
                        skip_first_layer=args.skip_first_layer, skip_last_layer=args.skip_last_layer,
                        exclude=tuple(args.exclude), execution=args.execution, calib_size=args.calib_size,
                        calib_method=args.calib_method, out=args.out, seed=args.seed, batch_size=args.batch_size,
                        cache_dir=args.cache_dir, mean=args.mean, std=args.std, pixel_max=args.pixel_max,
                        repeats=args.repeats, progress=not args.no_progress)
        if args.command == "compare-torch":
            if len(args.model) > 1:
                raise UserError("compare-torch takes one --model: a registry name")
            return _compare_torch(cfg)
        from .pipeline import run_models

        report = run_models(cfg, list(args.model))
    except UserError as exc:
        print(f"ptqcal: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ptqcal: interrupted", file=sys.stderr)
        return 130
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
