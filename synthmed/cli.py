"""The ``synthmed`` command line: demo, fit, sample, evaluate, benchmark, share.

Every subcommand has ``--help``. A user mistake (a missing file, an unknown model or column, a
bad ``--shard``) prints one line, ``synthmed: error: ...``, on stderr and exits with status 2;
an interruption exits with 130. Progress bars and messages go to stderr, the paths written to
stdout; ``--quiet`` silences everything but errors.

Run it as ``synthmed ...`` (the console script) or ``python -m synthmed.cli ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import textwrap
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from synthmed.errors import DataError, SynthmedError

if TYPE_CHECKING:
    from synthmed.cohort import Cohort
    from synthmed.models.base import Synthesizer

PROG = "synthmed"
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
MODEL_CHOICES = ("lstm", "cgan", "par", "gaussian-copula")
#: Above this many patients ``synthmed sample`` writes a Parquet dataset folder, not one file.
SINGLE_FILE_MAX = 200_000
DEFAULT_CHUNK_SIZE = 10_000
_PHYSIONET_RECORD = re.compile(r"\d+\.txt")
_ARCHIVE = re.compile(r".*\.(tar\.gz|tgz|tar)")
_PARQUET_SUFFIXES = (".parquet", ".pq")

logger = logging.getLogger("synthmed")


class UsageError(SynthmedError, ValueError):
    """A command-line mistake: bad arguments, or arguments that do not fit together."""


# -- output helpers --------------------------------------------------------------------------------


def _is_main_process() -> bool:
    """Rank 0 under torchrun (read from the environment: no torch import for ``--help``)."""
    return os.environ.get("RANK", "0") == "0"


def _say(args: argparse.Namespace, message: str) -> None:
    """A result line (a path written, a summary) on stdout, unless ``--quiet``."""
    if not args.quiet and _is_main_process():
        print(message, flush=True)


def _note(args: argparse.Namespace, message: str) -> None:
    """A progress message on stderr, unless ``--quiet``."""
    if not args.quiet and _is_main_process():
        print(message, file=sys.stderr, flush=True)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        text = f"{exc.strerror}: {exc.filename!s}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _configure_output(quiet: bool) -> None:
    """Logging to stderr in the ``synthmed: ...`` style; library warnings quietened."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(message)s"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.ERROR if quiet else logging.WARNING)
    logger.propagate = False
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    if quiet:
        warnings.filterwarnings("ignore")


# -- argument parsing ------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised, then printed by :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _Formatter(argparse.HelpFormatter):
    """Wraps each paragraph of a description on its own and shows meaningful defaults."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(
            textwrap.fill(
                " ".join(p.split()), width, initial_indent=indent, subsequent_indent=indent
            )
            for p in text.split("\n\n")
        )

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "%(default)" not in text
            and action.option_strings
            and action.default not in (None, False, argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


def _count(text: str) -> int:
    """A positive patient count; accepts ``1000``, ``1_000`` and ``1e6``."""
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value != int(value) or value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


#: Help of ``--max-time`` (the observation window).
MAX_TIME_HELP = (
    "end of the observation window in the data's time unit, e.g. 48 for PhysioNet 2012's first "
    "48 hours (the LSTM's max_time, the CGAN's config.max_time; default: the latest time in "
    "the data, and none under DP, where the data may not be read: give the window when it is "
    "public)"
)
MAX_LENGTH_HELP = (
    "steps per stay (the LSTM's max_length, the CGAN's config.max_steps; default: the longest "
    "stay in the data, and 256 under DP, where the data may not be read: set it near your "
    "stays' length)"
)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number")
    return value


def _fraction(text: str) -> float:
    value = _positive_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction in (0, 1)")
    return value


def _shard(text: str) -> str:
    from synthmed.models.base import parse_shard

    try:
        parse_shard(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _names(values: Sequence[str] | None) -> list[str]:
    """Column names given space- or comma-separated (``--static Age Gender`` or ``Age,Gender``)."""
    return [name for value in values or () for name in value.split(",") if name]


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS,
        help="print nothing but errors (no progress bars, no result lines)",
    )


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "reading data",
        "A PhysioNet 2012 set (a folder of <RecordID>.txt files or set-a.tar.gz, with "
        "Outcomes-a.txt beside it) is detected by its layout; a Parquet file or folder written "
        "by synthmed carries its own schema; any other long CSV/Parquet table (one row per "
        "patient and time, static columns repeated) needs --id and --time, or --schema.",
    )
    group.add_argument("--id", metavar="COL", help="patient id column of a long table")
    group.add_argument("--time", metavar="COL", help="time column of a long table")
    group.add_argument(
        "--static",
        nargs="+",
        metavar="COL",
        default=None,
        help="static columns of a long table (one value per patient)",
    )
    group.add_argument(
        "--outcomes",
        nargs="+",
        metavar="COL",
        default=None,
        help="static columns that are outcomes (e.g. In-hospital_death)",
    )
    group.add_argument(
        "--schema", metavar="JSON", help="schema file (Schema.to_json) for a long table"
    )
    group.add_argument(
        "--variables",
        nargs="+",
        metavar="VAR",
        default=None,
        help="keep only these temporal variables (default: all)",
    )
    group.add_argument(
        "--outcomes-file",
        metavar="PATH",
        help="PhysioNet outcomes file, when it is not Outcomes-<set>.txt beside the set",
    )
    group.add_argument(
        "--resample",
        metavar="WIDTH",
        help="PhysioNet: average the raw times into bins such as 1h or 30min",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``synthmed`` argument parser, with one subparser per command."""
    from synthmed import __version__

    parser = _Parser(
        prog=PROG,
        formatter_class=_Formatter,
        description=(
            "Learn from longitudinal patient records and generate synthetic cohorts.\n\n"
            "Start with 'synthmed demo'; then 'synthmed COMMAND --help' for each command."
        ),
        epilog=(
            "exit status: 0 on success, 2 for a usage or data error (one line on stderr), "
            "130 when interrupted."
        ),
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=False,
        help="print nothing but errors (no progress bars, no result lines)",
    )
    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser
    )

    def command(name: str, summary: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name,
            help=summary,
            description=f"{summary}\n\n{description}",
            formatter_class=_Formatter,
        )
        _add_common(sub)
        return sub

    # demo ----------------------------------------------------------------------------------------
    demo = command(
        "demo",
        "simulate a cohort, fit an LSTM, sample and write an HTML report",
        "Runs the whole pipeline on a simulated ICU cohort (written from physiology, no real "
        "record): split by patient, fit a small LSTMSynthesizer, sample as many synthetic "
        "patients as the holdout, evaluate. DIR then holds model.synthmed, synthetic.parquet "
        "and report.html. About a minute on a laptop.",
    )
    demo.add_argument("--out", metavar="DIR", default="synthmed-demo", help="output folder")
    demo.add_argument(
        "--patients",
        type=_count,
        default=None,
        metavar="N",
        help="simulated patients (default: the demo's own setting)",
    )
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        default=None,
        metavar="N",
        help="training epochs (default: the demo's own setting)",
    )
    demo.add_argument("--seed", type=int, default=0, metavar="S", help="seed of everything")
    demo.add_argument(
        "--fast", action="store_true", help="skip the recurrent discriminator in the evaluation"
    )
    demo.set_defaults(handler=_demo)

    # fit -----------------------------------------------------------------------------------------
    fit = command(
        "fit",
        "fit a generator to real data and save it",
        "DATA is a PhysioNet 2012 set or a long CSV/Parquet table (see 'reading data').\n"
        "The model is saved to one file (JSON settings and tensors, no pickle) that "
        "'synthmed sample' reads. Under 'torchrun --nproc_per_node=K' the same command trains "
        "with DistributedDataParallel (gloo on CPU, nccl on GPU); only rank 0 writes.",
    )
    fit.add_argument("data", metavar="DATA", help="PhysioNet set, or long CSV/Parquet table")
    fit.add_argument(
        "--model",
        required=True,
        choices=MODEL_CHOICES,
        help="generator (par and gaussian-copula need synthmed[sdv])",
    )
    fit.add_argument("--out", required=True, metavar="MODEL", help="model file to write")
    settings = fit.add_argument_group("generator settings (default: the model's own)")
    settings.add_argument("--epochs", type=_positive_int, metavar="N")
    settings.add_argument("--batch-size", type=_positive_int, metavar="N")
    settings.add_argument(
        "--seed",
        type=int,
        metavar="S",
        help="seed: same data, seed and settings give the same model on CPU",
    )
    settings.add_argument(
        "--epsilon",
        type=_positive_float,
        metavar="E",
        help="train with differential privacy (DP-SGD) to this epsilon",
    )
    settings.add_argument(
        "--delta", type=_fraction, metavar="D", help="DP delta (default: 1 / n_patients**1.1)"
    )
    settings.add_argument(
        "--max-grad-norm",
        type=_positive_float,
        metavar="C",
        help="per-patient gradient clipping bound under DP",
    )
    settings.add_argument(
        "--rejection-sampling",
        type=_fraction,
        metavar="SHARE",
        help="keep about this share of drafted patients, those a classifier finds most like "
        "the training patients (discriminator rejection sampling; slower sampling, not with "
        "--epsilon)",
    )
    settings.add_argument(
        "--rejection-stages",
        type=_positive_int,
        metavar="K",
        help="with --rejection-sampling: filters applied in turn, each fitted on what the ones "
        "before it keep (about SHARE**K of the drafts are kept)",
    )
    settings.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train")
    settings.add_argument(
        "--max-time",
        type=_positive_float,
        metavar="T",
        help=MAX_TIME_HELP,
    )
    settings.add_argument("--max-length", type=_positive_int, metavar="N", help=MAX_LENGTH_HELP)
    fit.add_argument(
        "--holdout",
        type=_fraction,
        metavar="FRACTION",
        help="hold out this share of patients (split by patient, seeded by --seed): fit on the "
        "rest and write MODEL's name + .train.parquet / .holdout.parquet for 'evaluate' "
        "and 'share'",
    )
    fit.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="save the training state (weights, optimizer, RNG, epoch, DP accountant) there, so "
        "a killed run can continue with --resume (LSTM and CGAN)",
    )
    fit.add_argument(
        "--resume", action="store_true", help="continue the run checkpointed in --checkpoint-dir"
    )
    fit.add_argument(
        "--checkpoint-every", type=int, default=1, metavar="N", help="epochs between checkpoints"
    )
    _add_data_options(fit)
    fit.set_defaults(handler=_fit)

    # sample --------------------------------------------------------------------------------------
    sample = command(
        "sample",
        "generate synthetic patients from a saved model",
        "Writes a long table (one row per patient and time, static columns repeated). PATH "
        "ending in .csv gives one CSV file; ending in .parquet gives one Parquet file (with the "
        "schema inside) up to "
        f"{SINGLE_FILE_MAX:,} patients. With --shard or --chunk-size, above that size, or "
        "for a PATH without a suffix, a Parquet dataset folder is written in bounded memory: "
        "one part per chunk and a manifest. Patients are made in chunks seeded from (seed, "
        "chunk), so every output of one seed and chunk size holds the same patients, and "
        "'--shard i/k' on k workers writes disjoint parts whose union is the whole run.",
    )
    sample.add_argument("model", metavar="MODEL", help="model file written by 'synthmed fit'")
    sample.add_argument(
        "-n",
        "--n",
        type=_count,
        metavar="N",
        help="number of patients (may be omitted with --conditions)",
    )
    sample.add_argument(
        "--out",
        required=True,
        metavar="PATH",
        help=".parquet, .csv, or a folder for a Parquet dataset",
    )
    sample.add_argument(
        "--seed", type=int, metavar="S", help="seed (default: the model's training seed)"
    )
    sample.add_argument(
        "--condition",
        action="append",
        metavar="NAME=VALUE",
        default=None,
        help="fix a static column for every patient, e.g. In-hospital_death=1 (repeatable)",
    )
    sample.add_argument(
        "--conditions",
        metavar="CSV",
        help="a table of static rows, one synthetic patient per row (empty cells drawn freely)",
    )
    sample.add_argument(
        "--shard",
        type=_shard,
        metavar="i/k",
        help="write only the chunks c with c %% k == i (0-based)",
    )
    sample.add_argument(
        "--chunk-size",
        type=_positive_int,
        metavar="C",
        help=f"patients per chunk (default {DEFAULT_CHUNK_SIZE:,})",
    )
    sample.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to sample")
    sample.add_argument("--overwrite", action="store_true", help="replace an existing output")
    sample.set_defaults(handler=_sample)

    # evaluate ------------------------------------------------------------------------------------
    evaluate = command(
        "evaluate",
        "score a synthetic cohort against real patients and write the report",
        "Fidelity, utility (train on synthetic, test on real) and, with --train, privacy and "
        "the real-vs-real ceiling of each metric. --real must be patients the generator never "
        "saw. Inputs: Parquet written by synthmed, PhysioNet sets, or long tables (see "
        "'reading data'); real data are reduced to the synthetic cohort's variables.",
    )
    evaluate.add_argument("--real", required=True, metavar="R", help="real holdout patients")
    evaluate.add_argument("--synthetic", required=True, metavar="S", help="synthetic cohort")
    evaluate.add_argument("--train", metavar="T", help="the generator's training patients")
    evaluate.add_argument("--out", required=True, metavar="HTML", help="report file to write")
    evaluate.add_argument("--json", metavar="JSON", help="also write the scores as JSON")
    evaluate.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="seed of the metrics' subsamples and classifiers",
    )
    evaluate.add_argument(
        "--fast", action="store_true", help="skip the recurrent discriminator (the slowest metric)"
    )
    _add_data_options(evaluate)
    evaluate.set_defaults(handler=_evaluate)

    # benchmark -----------------------------------------------------------------------------------
    benchmark = command(
        "benchmark",
        "compare the generators side by side on PhysioNet 2012",
        "Runs synthmed.benchmark.run_benchmark: each generator is fitted on set-a, samples as "
        "many patients as set-b holds, and is timed and evaluated against set-b (vitals "
        "panel). Writes results.md, results.json and one report-<generator>.html per "
        "generator to DIR. A generator whose code or extra is missing is skipped with a note.",
    )
    benchmark.add_argument(
        "data",
        metavar="DATA_DIR",
        nargs="?",
        default=os.environ.get("SYNTHMED_PHYSIONET_DIR"),
        help="folder holding set-a, set-b and Outcomes-a/b.txt (default: $SYNTHMED_PHYSIONET_DIR)",
    )
    benchmark.add_argument(
        "--generators",
        nargs="+",
        metavar="NAME",
        default=None,
        help=f"among {', '.join((*MODEL_CHOICES, 'dgan'))} (default: all)",
    )
    benchmark.add_argument("--out", default="benchmarks/out", metavar="DIR", help="output folder")
    benchmark.add_argument(
        "--patients", type=_count, metavar="N", help="first N patients of each set (quick run)"
    )
    benchmark.add_argument(
        "--epochs", type=_positive_int, metavar="N", help="epochs of every generator that has them"
    )
    benchmark.add_argument("--seed", type=int, default=0, metavar="S")
    benchmark.add_argument(
        "--timeout", type=_positive_float, metavar="SECONDS", help="limit per generator"
    )
    benchmark.add_argument(
        "--jobs",
        type=_positive_int,
        default=1,
        metavar="N",
        help="generators fitted at once, each with cpu_count/N threads (default: 1)",
    )
    benchmark.add_argument(
        "--results-md",
        metavar="PATH",
        help="also replace the benchmark section of this Markdown file (e.g. the README)",
    )
    benchmark.set_defaults(handler=_benchmark)

    # share ---------------------------------------------------------------------------------------
    share = command(
        "share",
        "write a shareable bundle: synthetic cohort, schema, report and datasheet",
        "Samples N patients and writes, in one new folder DIR: synthetic.parquet, "
        "synthetic.csv, schema.json, report.html, report.json and a README.md datasheet "
        "(generator and settings, seed, training size, (epsilon, delta) under DP, the summary "
        "scores with their real-vs-real ceilings, intended use and known limits), ready for a "
        "privacy officer. The folder appears complete or not at all.",
    )
    share.add_argument("model", metavar="MODEL", help="model file written by 'synthmed fit'")
    share.add_argument(
        "-n", "--n", type=_count, required=True, metavar="N", help="number of synthetic patients"
    )
    share.add_argument(
        "--train", required=True, metavar="T", help="the patients the model was fitted on"
    )
    share.add_argument(
        "--holdout", required=True, metavar="H", help="real patients the model never saw"
    )
    share.add_argument("--out", required=True, metavar="DIR", help="bundle folder to create")
    share.add_argument(
        "--seed", type=int, metavar="S", help="sampling seed (default: the model's training seed)"
    )
    share.add_argument(
        "--fast", action="store_true", help="skip the recurrent discriminator in the evaluation"
    )
    share.add_argument("--overwrite", action="store_true", help="replace an existing DIR")
    _add_data_options(share)
    share.set_defaults(handler=_share)

    if _privacy_sweep_available():
        sweep = command(
            "privacy-sweep",
            "fit with several privacy budgets and compare the trade-off",
            "Splits DATA by patient, fits the generator once per epsilon (DP-SGD; 'inf' trains "
            "without DP) on the same training patients and scores each synthetic cohort "
            "against the same holdout. DIR receives privacy_sweep.csv, frontier.png and, per "
            "budget, eps-<value>/ with the model, the synthetic cohort and report.json.",
        )
        sweep.add_argument("data", metavar="DATA", help="PhysioNet set, or long table")
        sweep.add_argument("--model", default="lstm", choices=("lstm", "cgan"))
        sweep.add_argument(
            "--epsilons",
            nargs="+",
            type=_epsilon,
            default=[1.0, 3.0, 10.0, None],
            metavar="E",
            help="budgets to train at; 'inf' for a non-private reference (default: 1 3 10 inf)",
        )
        sweep.add_argument("--out", required=True, metavar="DIR", help="output folder")
        sweep.add_argument("--holdout", type=_fraction, default=0.3, metavar="FRACTION")
        sweep.add_argument("--epochs", type=_positive_int, metavar="N")
        sweep.add_argument("--max-time", type=_positive_float, metavar="T", help=MAX_TIME_HELP)
        sweep.add_argument("--max-length", type=_positive_int, metavar="N", help=MAX_LENGTH_HELP)
        sweep.add_argument("--seed", type=int, default=0, metavar="S")
        sweep.add_argument("--fast", action="store_true", help="skip the recurrent discriminator")
        _add_data_options(sweep)
        sweep.set_defaults(handler=_privacy_sweep)
    return parser


def _privacy_sweep_available() -> bool:
    """The DP module (with ``privacy_sweep``) is part of this installation."""
    import importlib.util

    try:
        return importlib.util.find_spec("synthmed.models.privacy") is not None
    except (ImportError, ValueError):
        return False


def _epsilon(text: str) -> float | None:
    if text.lower() in ("inf", "none"):
        return None
    return _positive_float(text)


# -- reading cohorts -------------------------------------------------------------------------------


def _physionet_kind(path: Path) -> str | None:
    """``"set"`` for a PhysioNet set (folder of records or archive), ``"root"`` for a folder
    holding several sets, None otherwise."""
    if path.is_file():
        return "set" if _ARCHIVE.fullmatch(path.name) else None
    if not path.is_dir():
        return None
    has_sets = False
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file() and _PHYSIONET_RECORD.fullmatch(entry.name):
                return "set"
            if entry.name.startswith("set-"):
                has_sets = True
    return "root" if has_sets else None


def load_cohort(
    path: str | Path,
    *,
    id: str | None = None,
    time: str | None = None,
    static: Sequence[str] = (),
    outcomes: Sequence[str] = (),
    schema: str | Path | None = None,
    variables: Sequence[str] | None = None,
    outcomes_file: str | Path | None = None,
    resample: str | None = None,
) -> Cohort:
    """Read a cohort the way the command line does.

    ``path`` may be a PhysioNet 2012 set (a folder of ``<RecordID>.txt`` files or a
    ``set-*.tar.gz`` archive), a Parquet file or folder written by synthmed (its schema is
    inside), or a long CSV/Parquet table read with ``id``, ``time``, ``static`` and ``outcomes``
    (or a ``schema`` file). ``variables`` keeps only those temporal variables.

    Raises:
        FileNotFoundError: nothing at ``path``.
        SynthmedError: a layout that cannot be read, or a column that is not in the data.
    """
    from synthmed.cohort import Cohort

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no data at {str(path)!r}")
    kind = _physionet_kind(path)
    if kind == "root":
        sets = sorted(p.name for p in path.iterdir() if p.name.startswith("set-"))
        raise UsageError(
            f"{str(path)!r} holds PhysioNet sets ({', '.join(sets)}), not records; pass one "
            f"set, e.g. {str(path / sets[0])!r}"
        )
    if kind == "set":
        from synthmed.datasets import load_physionet2012

        return load_physionet2012(
            path,
            outcomes=outcomes_file,
            variables=list(variables) if variables else None,
            resample=resample,
        )
    is_parquet = path.is_dir() or path.name.lower().endswith(_PARQUET_SUFFIXES)
    if is_parquet and id is None and schema is None:
        try:
            cohort = Cohort.read_parquet(path)
        except DataError as exc:
            if "not written by synthmed" not in str(exc):
                raise
            raise UsageError(
                f"{str(path)!r} is a Parquet table without a synthmed schema; name its columns "
                "with --id and --time (and --static, --outcomes) or give --schema"
            ) from None
    else:
        if id is None or time is None:
            if schema is None:
                raise UsageError(
                    f"reading the long table {str(path)!r} needs --id and --time (and "
                    "--static, --outcomes for the static columns), or --schema"
                )
            from synthmed.schema import Schema

            parsed = Schema.from_json(Path(schema))
            id, time = id or parsed.id_column, time or parsed.time_column
        from synthmed.datasets import read_long_table

        cohort = read_long_table(
            path, id=id, time=time, static=list(static), outcomes=list(outcomes), schema=schema
        )
    return select_variables(cohort, variables) if variables else cohort


def select_variables(cohort: Cohort, variables: Sequence[str]) -> Cohort:
    """The cohort with only ``variables`` as temporal columns (static columns kept)."""
    from synthmed.cohort import Cohort
    from synthmed.schema import Schema

    wanted = list(dict.fromkeys(variables))
    unknown = [name for name in wanted if name not in cohort.variables]
    if unknown:
        raise DataError(
            f"unknown variable {unknown[0]!r}; the cohort's temporal variables are "
            f"{', '.join(cohort.variables)}"
        )
    if wanted == list(cohort.variables):
        return cohort
    schema = cohort.schema
    columns = [c for c in schema.columns.values() if c.role != "temporal" or c.name in wanted]
    reduced = Schema(columns, schema.id_column, schema.time_column, schema.time_unit)
    events = cohort.events[[schema.id_column, schema.time_column, *reduced.temporal_columns]]
    return Cohort(cohort.static, events, reduced, cohort.metadata)


def _data_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "id": args.id,
        "time": args.time,
        "static": _names(args.static),
        "outcomes": _names(args.outcomes),
        "schema": args.schema,
        "variables": _names(args.variables) or None,
        "outcomes_file": args.outcomes_file,
        "resample": args.resample,
    }


def _require(*paths: str | Path | None) -> None:
    """Fail on the first missing input before any work (and any progress message) starts."""
    for path in paths:
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"no data at {str(path)!r}")


def _load_like(args: argparse.Namespace, path: str, like: Cohort, label: str) -> Cohort:
    """Read real data to compare with ``like``: same temporal variables when they are a subset."""
    options = _data_kwargs(args)
    if options["variables"] is None and _physionet_kind(Path(path)) == "set":
        options["variables"] = list(like.variables)
    cohort = load_cohort(path, **options)
    _note(args, f"read the {label} patients from {path}: {cohort!r}")
    if set(like.variables) < set(cohort.variables) and options["variables"] is None:
        cohort = select_variables(cohort, like.variables)
    return cohort


# -- commands --------------------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from synthmed.demo import run_demo

    options = {"seed": args.seed, "verbose": not args.quiet, "gru": not args.fast}
    if args.patients is not None:
        options["n_patients"] = args.patients
    if args.epochs is not None:
        options["epochs"] = args.epochs
    result = run_demo(args.out, log=lambda message: _note(args, message), **options)
    _say(args, f"report: {result.report}")
    _say(args, f"model: {result.model}")
    _say(args, f"synthetic cohort: {result.synthetic}")
    return 0


def _make_model(name: str, settings: dict[str, Any], verbose: bool) -> Synthesizer:
    """An unfitted generator of type ``name`` with the settings given on the command line."""
    import importlib
    import inspect

    from synthmed.models.base import Synthesizer
    from synthmed.models.persistence import MODEL_MODULES

    module = MODEL_MODULES[name]
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith("synthmed"):
            raise UsageError(
                f"the {name} model is not available in this installation ({module} is missing)"
            ) from None
        raise
    cls = Synthesizer.registry()[name]
    accepted = inspect.signature(cls).parameters
    for key in settings:
        if key not in accepted:
            raise UsageError(f"--{key.replace('_', '-')} does not apply to the {name} model")
    if "verbose" in accepted:
        settings = {**settings, "verbose": verbose}
    return cls(**settings)


def _fit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The constructor settings ``fit`` gives the model."""
    names = (
        "epochs",
        "batch_size",
        "seed",
        "epsilon",
        "delta",
        "max_grad_norm",
        "rejection_sampling",
        "rejection_stages",
        "device",
    )
    settings = {key: getattr(args, key) for key in names if getattr(args, key) is not None}
    return {**settings, **_stay_settings(args)}


def _stay_settings(args: argparse.Namespace) -> dict[str, Any]:
    """``--max-length`` and ``--max-time``: the LSTM's ``max_length`` and ``max_time``, the
    CGAN's ``config.max_steps`` and ``config.max_time``; other models take neither
    (``_make_model`` then names the option)."""
    given = {"max_length": args.max_length, "max_time": args.max_time}
    given = {key: value for key, value in given.items() if value is not None}
    if args.model == "cgan" and given:
        from synthmed.models.cgan import CGANConfig

        return {
            "config": CGANConfig(max_steps=given.get("max_length"), max_time=given.get("max_time"))
        }
    return given


def _fit(args: argparse.Namespace) -> int:
    settings = _fit_settings(args)
    verbose = not args.quiet and _is_main_process()
    model = _make_model(args.model, settings, verbose)
    cohort = load_cohort(args.data, **_data_kwargs(args))
    _note(args, f"read {args.data}: {cohort!r}")
    out = Path(args.out)
    train = cohort
    if args.holdout is not None:
        train, holdout = cohort.split(test_size=args.holdout, seed=args.seed or 0)
        if _is_main_process():
            stem = out.with_suffix("") if out.suffix else out
            for part, label in ((train, "train"), (holdout, "holdout")):
                written = part.to_parquet(stem.with_name(f"{stem.name}.{label}.parquet"))
                _say(args, f"{label} patients ({part.n_patients}): {written}")
    checkpointing = {}
    if args.checkpoint_dir is not None or args.resume:
        checkpointing = {
            "checkpoint_dir": args.checkpoint_dir,
            "resume": args.resume,
            "checkpoint_every": args.checkpoint_every,
        }
    model.fit(train, **checkpointing)
    path = model.save(out)
    spent = model.privacy_spent
    privacy = f", epsilon={spent[0]:.3g}, delta={spent[1]:.3g}" if spent else ""
    _note(
        args,
        f"fitted {type(model).__name__} on {train.n_patients} patients in "
        f"{model.fit_seconds_:.1f} s{privacy}",
    )
    _say(args, f"model: {path}")
    return 0


def _parse_value(text: str) -> Any:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def _fixed_conditions(items: Sequence[str] | None) -> dict[str, Any] | None:
    if not items:
        return None
    conditions = {}
    for item in items:
        name, equals, value = item.partition("=")
        if not equals or not name:
            raise UsageError(f"--condition {item!r} must look like NAME=VALUE")
        conditions[name] = _parse_value(value)
    return conditions


def _output_kind(out: Path) -> str:
    name = out.name.lower()
    if name.endswith(".csv"):
        return "csv"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    if out.suffix:
        raise UsageError(
            f"--out {str(out)!r}: write .parquet or .csv, or give a folder name for a Parquet "
            "dataset"
        )
    return "folder"


def _clear_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing output unless ``overwrite``; then remove it (folders only if ours)."""
    if not out.exists():
        return
    if not overwrite:
        raise UsageError(f"{str(out)!r} exists already; pass --overwrite to replace it")
    if out.is_dir():
        if not any(out.glob("_manifest*.json")) and any(out.iterdir()):
            raise UsageError(
                f"{str(out)!r} is a folder that is not a synthmed dataset; refusing to replace it"
            )
        shutil.rmtree(out)
    else:
        out.unlink()


def _sample(args: argparse.Namespace) -> int:
    from synthmed.models.persistence import load_synthesizer

    out = Path(args.out)
    kind = _output_kind(out)
    fixed = _fixed_conditions(args.condition)
    if args.conditions and fixed:
        raise UsageError("give either --conditions (a table) or --condition NAME=VALUE, not both")
    if args.conditions and (args.shard or args.chunk_size):
        raise UsageError(
            "--conditions (a table, one patient per row) cannot be streamed with --shard or "
            "--chunk-size; use --condition NAME=VALUE for conditions shared by all patients"
        )
    if args.n is None and not args.conditions:
        raise UsageError("give the number of patients with -n N (or a --conditions table)")
    table = None
    if args.conditions:
        import pandas as pd

        path = Path(args.conditions)
        if not path.is_file():
            raise FileNotFoundError(f"no conditions table at {str(path)!r}")
        try:
            table = pd.read_csv(path)
        except (ValueError, OSError) as exc:
            raise DataError(f"cannot read the conditions table {str(path)!r}: {exc}") from None
        if args.n is not None and args.n != len(table):
            raise UsageError(
                f"-n {args.n} but the conditions table has {len(table)} rows; omit -n to make "
                "one patient per row"
            )
    streamed = table is None and (
        kind == "folder"
        or args.shard is not None
        or args.chunk_size is not None
        or args.n > SINGLE_FILE_MAX
    )
    if kind == "csv" or not streamed or args.shard is None:
        _clear_output(out, args.overwrite)
    elif out.exists() and not out.is_dir():
        raise UsageError(f"{str(out)!r} exists and is not a folder")

    model = load_synthesizer(args.model, device=args.device)
    model.verbose = not args.quiet and _is_main_process()
    if fixed:
        model._conditions_frame(1, fixed)  # check names and values before any progress bar
    out.parent.mkdir(parents=True, exist_ok=True)
    chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE
    if table is not None:
        cohort = model.sample(conditions=table, seed=args.seed)
        if kind == "csv":
            _write_csv_atomic(cohort.to_long(), out)
        else:
            cohort.to_parquet(out)
        _say(args, f"{cohort.n_patients} synthetic patients: {out}")
        return 0
    if kind != "csv" and streamed:
        if kind == "parquet" and args.shard is None and args.n > SINGLE_FILE_MAX:
            _note(args, f"{args.n:,} patients: writing a Parquet dataset folder at {out}")
        model.sample_to(
            out, args.n, chunk_size=chunk_size, seed=args.seed, shard=args.shard, conditions=fixed
        )
        what = f"shard {args.shard} of " if args.shard else ""
        _say(args, f"{what}{args.n} synthetic patients (Parquet dataset): {out}")
        return 0
    # One file: stream chunks into a hidden folder beside it, then merge or convert.
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
        parts = Path(scratch) / "parts"
        model.sample_to(
            parts, args.n, chunk_size=chunk_size, seed=args.seed, shard=args.shard, conditions=fixed
        )
        if kind == "csv":
            _parts_to_csv(parts, out)
        else:
            _parts_to_parquet(parts, out)
    _say(
        args,
        f"{args.n if args.shard is None else 'a shard of ' + str(args.n)} "
        f"synthetic patients: {out}",
    )
    return 0


def _part_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("part-*.parquet"))


def _write_csv_atomic(frame: Any, out: Path) -> None:
    temporary = out.with_name(f".{out.name}.tmp")
    frame.to_csv(temporary, index=False)
    temporary.replace(out)


def _parts_to_csv(folder: Path, out: Path) -> None:
    """Append the dataset's parts to one CSV, one part in memory at a time."""
    import pyarrow.parquet as pq

    temporary = out.with_name(f".{out.name}.tmp")
    with open(temporary, "w", newline="") as handle:
        for i, part in enumerate(_part_files(folder)):
            pq.read_table(part).to_pandas().to_csv(handle, header=i == 0, index=False)
    temporary.replace(out)


def _parts_to_parquet(folder: Path, out: Path) -> None:
    """Merge the dataset's parts into one Parquet file that keeps synthmed's schema inside."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from synthmed.cohort import PARQUET_METADATA_KEY

    manifest = json.loads(next(folder.glob("_manifest*.json")).read_text())
    tables = [pq.read_table(part) for part in _part_files(folder)]
    table = pa.concat_tables(tables, promote_options="permissive")
    stored = json.loads(tables[0].schema.metadata[PARQUET_METADATA_KEY])
    stored.setdefault("metadata", {}).update(
        seed=manifest["seed"], chunk_size=manifest["chunk_size"]
    )
    metadata = {**(table.schema.metadata or {}), PARQUET_METADATA_KEY: json.dumps(stored).encode()}
    temporary = out.with_name(f".{out.name}.tmp")
    pq.write_table(table.replace_schema_metadata(metadata), temporary)
    temporary.replace(out)


def _summary_line(summary: dict[str, float]) -> str:
    return "  ".join(
        f"{name} {value:.2f}" if not math.isnan(value) else f"{name} n/a"
        for name, value in summary.items()
    )


def _evaluate(args: argparse.Namespace) -> int:
    from synthmed.evaluation import evaluate

    out = Path(args.out)
    _require(args.synthetic, args.real, args.train)
    synthetic = load_cohort(args.synthetic, **{**_data_kwargs(args), "variables": None})
    _note(args, f"read the synthetic patients from {args.synthetic}: {synthetic!r}")
    real = _load_like(args, args.real, synthetic, "real holdout")
    train = _load_like(args, args.train, synthetic, "training") if args.train else None
    _note(args, "scoring (fidelity, utility" + (", privacy)" if train is not None else ")"))
    report = evaluate(real, synthetic, train, seed=args.seed, gru=not args.fast)
    out.parent.mkdir(parents=True, exist_ok=True)
    report.to_html(out)
    _say(args, f"summary: {_summary_line(report.summary())}")
    _say(args, f"report: {out}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        report.to_json(args.json)
        _say(args, f"scores: {args.json}")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from synthmed import benchmark

    if args.data is None:
        raise UsageError("give the PhysioNet folder (DATA_DIR) or set SYNTHMED_PHYSIONET_DIR")
    data = Path(args.data)
    if not data.is_dir():
        raise FileNotFoundError(f"no PhysioNet folder at {str(data)!r}")
    generators = args.generators or list(benchmark.DEFAULT_GENERATORS)
    known = (*benchmark.GENERATORS, "dgan")
    unknown = [name for name in generators if name not in known]
    if unknown:
        raise UsageError(f"unknown generator {unknown[0]!r}; choose from {', '.join(known)}")
    settings = {}
    if args.epochs is not None:
        settings = {name: {"epochs": args.epochs} for name in ("lstm", "cgan", "par")}
    table = benchmark.run_benchmark(
        data,
        patients=args.patients,
        generators=generators,
        out_dir=args.out,
        results_path=args.results_md,
        settings=settings,
        seed=args.seed,
        timeout=args.timeout,
        jobs=args.jobs,
        command="synthmed " + " ".join(sys.argv[1:]) if sys.argv[1:] else None,
        verbose=not args.quiet,
    )
    _say(args, f"results: {Path(args.out) / 'results.md'}")
    shown = [
        c
        for c in ("generator", "fit_s", "discriminative_score", "tstr_auroc", "note")
        if c in table.columns
    ]
    _say(args, table[shown].to_string(index=False))
    return 0


def _share(args: argparse.Namespace) -> int:
    from synthmed.models.persistence import load_synthesizer
    from synthmed.sharing import share

    _require(args.train, args.holdout)
    model = load_synthesizer(args.model)
    model.verbose = not args.quiet
    holdout = load_cohort(args.holdout, **_data_kwargs(args))
    train = _load_like(args, args.train, holdout, "training")
    if set(holdout.variables) != set(model.schema_.temporal_columns):
        holdout = select_variables(holdout, model.schema_.temporal_columns)
        train = select_variables(train, model.schema_.temporal_columns)
    _note(args, f"sampling {args.n} patients and evaluating them")
    folder = share(
        model,
        args.n,
        train,
        holdout,
        args.out,
        seed=args.seed,
        overwrite=args.overwrite,
        gru=not args.fast,
        model_path=args.model,
    )
    _say(args, f"bundle: {folder}")
    _say(args, f"datasheet: {folder / 'README.md'}")
    return 0


def _sweep_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The constructor settings ``privacy-sweep`` gives every fit."""
    settings = {"epochs": args.epochs} if args.epochs is not None else {}
    return {**settings, **_stay_settings(args)}


def _privacy_sweep(args: argparse.Namespace) -> int:
    from synthmed.models.privacy import plot_privacy_frontier, privacy_sweep

    settings = _sweep_settings(args)
    cohort = load_cohort(args.data, **_data_kwargs(args))
    train, holdout = cohort.split(test_size=args.holdout, seed=args.seed)
    out = Path(args.out)
    frame = privacy_sweep(
        train,
        holdout,
        model=args.model,
        epsilons=args.epsilons,
        settings=settings,
        seed=args.seed,
        out_dir=out,
        evaluate_kwargs={"gru": not args.fast},
        verbose=not args.quiet,
    )
    plot_privacy_frontier(frame, out / "frontier.png")
    _say(args, frame.to_string(index=False))
    _say(args, f"privacy sweep: {out / 'privacy_sweep.csv'}")
    return 0


# -- entry point -----------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``synthmed`` command; returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        _configure_output(args.quiet)
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (SynthmedError, OSError, ValueError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
