"""Command line: ``ptqcal run``, ``compare-torch``, ``report`` and ``models``.

The options of ``run`` and ``compare-torch`` are generated from :class:`~ptqcal.config.RunConfig`:
a setting's default, help and parsing live there once. The command line wins over a config
file, which wins over the defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Sequence

from . import __version__
from .config import (DEFAULT_MODELS, RunConfig, default_cache_dir, default_of, flag_of, parse_value, read_config_file,
                     settings)
from .errors import InputError, UserError

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """Report a usage mistake as one line (not argparse's usage block) with exit code 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _shown_default(setting) -> str:
    default = DEFAULT_MODELS if setting.name == "model" else setting.metadata.get("shown", default_of(setting))
    if default is None or default is False or default is True or default == ():
        return ""
    if isinstance(default, Enum):
        default = default.value
    if isinstance(default, tuple):
        default = " ".join(str(v) for v in default)
    return f" (default: {default})"


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """One option per RunConfig setting; values stay strings here and are typed by parse_value."""
    parser.add_argument("--config", type=Path, help="TOML file with any of these options (the command line wins); "
                        "or the name of a shipped config")
    for setting in settings():
        meta = setting.metadata
        kwargs = {"dest": setting.name, "default": argparse.SUPPRESS, "help": meta["help"] + _shown_default(setting)}
        if meta["parse"] is None:
            kwargs["action"] = "store_false" if (meta.get("flag") or "").startswith("--no-") else "store_true"
        else:
            parse = meta["parse"]
            choices = meta.get("choices") or ([e.value for e in parse]
                                              if isinstance(parse, type) and issubclass(parse, Enum) else None)
            kwargs.update(metavar=meta["metavar"] or (None if choices else setting.name.upper()),
                          choices=None if meta.get("comma") else choices,
                          nargs="+" if meta["many"] and not meta.get("comma") else "?" if "const" in meta else None)
            if "const" in meta:
                kwargs["const"] = meta["const"]
        parser.add_argument(flag_of(setting.name), **kwargs)


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
                    "trained offline on scikit-learn's digits.")
    _add_run_options(run)
    compare = commands.add_parser(
        "compare-torch", help="quantize a registry model with ONNX Runtime and with torch.ao and report their agreement",
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


def run_config(args: argparse.Namespace) -> tuple[RunConfig, list[str]]:
    """The RunConfig of parsed arguments over a config file's values, and the models to run."""
    values = read_config_file(args.config) if args.config is not None else {}
    known = {s.name: s for s in settings()}
    for name, value in vars(args).items():
        if name in known:
            values[name] = value if isinstance(value, bool) else parse_value(known[name], value, flag_of(name))
    models = list(values.pop("model", DEFAULT_MODELS))
    return RunConfig(model=models[0], **values), models


def _explain(error: InputError) -> str:
    """A stage's message, led by the flag of the setting it names."""
    setting = getattr(error, "setting", None)
    if setting is None or isinstance(error, UserError):
        return str(error)
    flag = flag_of(setting) if setting in RunConfig.__dataclass_fields__ else setting
    return f"{flag}: {error}"


COMPARE_COLUMNS = (("config", "config", "s", 1), ("agree %", "top1_agreement", ".2f", 100),
                   ("max |Δlogit|", "max_abs_logit_diff", ".3f", 1), ("ORT err %", "onnx_top1_error", ".2f", 100),
                   ("torch err %", "torch_top1_error", ".2f", 100), ("ORT swapped %", "onnx_swapped", ".2f", 100),
                   ("torch swapped %", "torch_swapped", ".2f", 100),
                   ("disagree margin ≤", "disagreement_max_float_margin", ".3f", 1))


def _compare_torch(cfg: RunConfig, models: list[str]) -> int:
    from .compare import compare_torch, save_agreements

    if len(models) > 1:
        raise UserError("compare-torch takes one --model: a registry name")
    rows = compare_torch(cfg)
    print("  ".join(header for header, _, _, _ in COMPARE_COLUMNS))
    for row in rows:
        print("  ".join(f"{getattr(row, key) * scale if scale != 1 else getattr(row, key):>{len(header)}{fmt}}"
                        for header, key, fmt, scale in COMPARE_COLUMNS))
    print("swapped: predictions changed from the float model's; disagree margin: the largest float top-1 minus "
          "top-2 logit among the images ORT and PyTorch disagree on")
    if cfg.out is not None:
        print(f"written: {save_agreements(rows, cfg.out)}")
    return 0


def _report(folders: list[Path], out: Path | None) -> Path:
    """Rebuild the report of saved runs (a comparison folder stands for the runs it combines)."""
    from .reports import write_report
    from .runfolder import COMPARISON, REPORT, comparison_parts, marker_kind, restore, writing

    for folder in folders:  # a run killed mid-swap is put back before it is read
        restore(folder)
    runs = [part for folder in folders
            for part in (comparison_parts(folder) if marker_kind(folder) == COMPARISON else [folder])]
    if out is None:
        out = folders[0] if len(folders) == 1 and marker_kind(folders[0]) else Path("ptqcal_report")
    with writing(out, marker_kind(out) or REPORT):
        return write_report(runs, out)


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "models":
        from .models import get_model_entry, list_models

        for name in list_models():
            print(f"{name:18s} {get_model_entry(name).description}")
        return 0
    if args.command == "report":
        print(f"report: {_report(args.runs, args.out)}")
        return 0
    if args.command not in ("run", "compare-torch"):
        parser.print_help()
        return EXIT_USAGE
    cfg, models = run_config(args)
    if args.command == "compare-torch":
        return _compare_torch(cfg, models)
    from .pipeline import run_models

    print(f"report: {run_models(cfg, models)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # ptqcal leaves nothing in $TMPDIR and reports nothing anywhere; both variables are read when
    # the libraries are first imported, which happens below. ONNX Runtime's telemetry writes a
    # session file into $TMPDIR; importing torchvision creates torch's compile cache there.
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default_cache_dir() / "torchinductor"))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return int(exit_.code or 0)
    # Warnings (a skipped image, NumPy's RuntimeWarnings) are held until the command ends: a mistake
    # is one line on stderr, with nothing printed before it; otherwise each is said once, in one line.
    with warnings.catch_warnings(record=True) as caught:
        try:
            code = _dispatch(parser, args)
        except InputError as exc:
            print(f"ptqcal: error: {_explain(exc)}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            print("ptqcal: interrupted", file=sys.stderr)
            return 130
        except BaseException:  # an internal error: its traceback follows what was held
            _say_warnings(caught)
            raise
    _say_warnings(caught)
    return code


def _say_warnings(caught: list) -> None:
    """Each warning once, in one line (deprecations are for developers: not said)."""
    said = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    for message in dict.fromkeys(" ".join(str(w.message).split()) for w in said):
        print(f"ptqcal: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
