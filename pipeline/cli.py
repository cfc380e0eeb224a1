"""``pipeline``: label once with a teacher, train many students from the cached soft labels.

    pipeline label --teacher PATH --data FILE --out STORE      # stage one (teacher -> store)
    pipeline train --store STORE --student PATH --out RUN      # stage two (store -> student)
    pipeline inspect STORE [--json]                            # provenance, size, kept mass
    pipeline verify STORE                                      # checksums and counts
    pipeline merge OUT PART...                                 # the parts of --num-shards jobs, as one store
    pipeline export STORE OUT.parquet                          # one Parquet / Arrow file for other stacks
    pipeline init-student --num-layers N --out DIR             # a student cut from the teacher's blocks

The CLI is a thin adapter: misuse is a usage error (exit 2), an expected failure (bad store, bad data,
missing teacher) a one-line error (exit 1), never a traceback. Heavy imports (torch, transformers) happen
inside the commands so that ``pipeline --help`` is instant.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

__all__ = ["main"]

# Expected failures raised by the stages (bad config, bad data, a model that cannot load, an incompatible store):
# matched by name so that this module does not import the stages (and torch) before a command runs.
_EXPECTED_NAMES = {
    "LabelConfigError",
    "TrainConfigError",
    "DataError",
    "ModelLoadError",
    "DefaultTeacherError",
    "InitStudentError",
    "HealingScheduleError",
    "PlacementError",
    "TeacherOutputError",
}


@contextmanager
def _expected_errors() -> Iterator[None]:
    """Turn the project's typed errors into a one-line ClickException (exit 1)."""
    from ..data.errors import StoreError

    try:
        yield
    except StoreError as e:
        raise click.ClickException(str(e)) from None
    except Exception as e:
        if type(e).__name__ in _EXPECTED_NAMES:
            raise click.ClickException(str(e)) from None
        raise
    except KeyboardInterrupt:
        click.echo("interrupted; committed shards are kept, re-run the same command to resume", err=True)
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="kd-pipeline")
def cli() -> None:
    """Offline knowledge distillation with cached, verifiable soft-label stores."""


@cli.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def verify(store: str, as_json: bool) -> None:
    """Recompute every checksum and count of STORE; exit 1 naming each bad shard."""
    from ..data.verify import verify_store

    with _expected_errors():
        report = verify_store(store)
    if as_json:
        click.echo(json.dumps(report.to_dict()))
    else:
        for problem in report.problems:
            click.echo(f"BAD  {problem}", err=True)
        state = "intact" if report.ok else f"{len(report.problems)} problem(s)"
        click.echo(
            f"{store}: {report.shards_checked} shards, {report.files_checked} files, "
            f"{report.bytes_checked:,} bytes checked: {state}"
        )
    if not report.ok:
        sys.exit(1)


@cli.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.option(
    "--max-shards",
    type=click.IntRange(min=1),
    default=None,
    help="Read N shards, spread evenly over the store, for the distributions and bytes per column "
    "[default: 16]; counts, sizes and means come from the manifest.",
)
@click.option("--all-shards", is_flag=True, help="Read every shard for the distributions.")
def inspect(store: str, as_json: bool, max_shards: int | None, all_shards: bool) -> None:
    """Provenance, counts, bytes per token, and kept mass / entropy of STORE."""
    from ..data.inspect import DEFAULT_SHARDS, summarize
    from ..data.reader import open_store

    if all_shards and max_shards is not None:
        raise click.UsageError("give --max-shards N or --all-shards, not both")
    most = None if all_shards else max_shards or DEFAULT_SHARDS
    with _expected_errors():
        summary = summarize(open_store(store, allow_incomplete=True), max_shards=most)
    if as_json:
        click.echo(json.dumps(summary))
        return
    _print_summary(summary, click.echo)


def _print_summary(s: dict[str, Any], echo: Callable[[str], None]) -> None:
    t = s["targets"]
    unit = "position" if s["granularity"] == "token" else "example"  # what carries one distribution

    def fmt(x: float | None, spec: str = ".3f") -> str:
        return "n/a" if x is None else format(x, spec)

    teacher = s["teacher"]
    echo(
        f"store        {s['store']}  (format v{s['format_version']}, {s['backend']}, "
        f"{'complete' if s['complete'] else 'INCOMPLETE'})"
    )
    echo(f"task         {s['task']} ({s['granularity']}-level)")
    echo(
        f"teacher      {teacher.get('name_or_path', '?')}  {teacher.get('gguf_file') or ''}  "
        f"weights {str(teacher.get('weights_digest', '?'))[:16]}  dtype {teacher.get('dtype', '?')}  "
        f"logits {teacher.get('logit_dtype', teacher.get('dtype', '?'))}"
    )
    echo(f"tokenizer    digest {str(s['tokenizer'].get('digest', '?'))[:16]}  vocab {s['vocab_size']}")
    sampled = s.get("sampled")
    if sampled:
        echo(
            f"targets      sample N={sampled['num_samples']} {t.get('draws', 'multinomial')} draws per {unit} at "
            f"T={t['temperature']} over "
            f"{t['num_classes']} ids, stored as unique ids + counts (at most {t['k']} per {unit}), ids {t['id_dtype']}"
        )
    else:
        echo(
            f"targets      {t['method']} k={t['k']} T={t['temperature']} over {t['num_classes']} ids, "
            f"values {t['value_dtype']} (encoding {t.get('encoding', 'plain')}), ids {t['id_dtype']}"
            + (
                f", plus N={t['num_samples']} {t.get('draws', 'multinomial')} draws per {unit} from the tail"
                if s.get("hybrid")
                else ""
            )
        )
    ds = s["dataset"]
    echo(f"dataset      {ds.get('source', '?')}  fingerprint {str(ds.get('fingerprint', '?'))[:16]}")
    echo(
        f"counts       {s['shards']} shards, {s['rows']:,} examples, {s['tokens']:,} tokens, "
        f"{s['positions']:,} positions"
    )
    echo(
        f"size         {s['bytes']:,} bytes = {fmt(s['bytes_per_input_token'], '.1f')} bytes/token "
        f"({fmt(s[f'bytes_per_{unit}'], '.1f')} bytes/{unit})"
    )
    if s["summary_shards"] < s["shards"]:
        echo(f"read         {s['summary_shards']} of {s['shards']} shards, evenly spaced, for what follows")
    columns = s.get(f"column_bytes_per_{unit}")
    if columns:
        echo("columns      " + "  ".join(f"{name} {size:.1f}" for name, size in columns.items()) + f"  (bytes/{unit})")
    kl = s.get("encoding_kl")
    if kl:
        echo(
            f"values       {t['value_dtype']} (lossy): KL(exact || stored) mean {kl['mean']:.2g}, "
            f"max {kl['max']:.2g} nats per position"
        )
    km, be = s["kept_mass"], s["bin_entropy"]
    if sampled:
        uq = sampled["unique_per_position"]
        echo(
            f"unique ids   mean {fmt(uq['mean'], '.2f')}  p50 {fmt(uq['p50'], '.0f')}  "
            f"p95 {fmt(uq['p95'], '.0f')} per {unit}"
        )
        echo(f"kept mass    mean {fmt(sampled['teacher_mass_on_sampled_ids'])}  (the teacher's mass on the drawn ids)")
    else:
        hybrid = s.get("hybrid")
        if hybrid:
            uq = hybrid["unique_tail_ids_per_position"]
            echo(
                f"tail ids     mean {fmt(uq['mean'], '.2f')}  p50 {fmt(uq['p50'], '.0f')}  p95 {fmt(uq['p95'], '.0f')} "
                f"unique ids drawn from the tail per {unit}"
            )
        echo(f"kept mass    mean {fmt(km['mean'])}  p5 {fmt(km['p5'])}  p50 {fmt(km['p50'])}  (top-{t['k']} coverage)")
    bins = "the empirical counts" if sampled else "k+1 bins"
    echo(
        f"entropy      teacher mean {fmt(s['teacher_entropy_mean'])} nats; over {bins} mean {fmt(be['mean'])} "
        f"p5 {fmt(be['p5'])} p95 {fmt(be['p95'])}"
    )


@cli.command()
@click.argument("out")
@click.argument("parts", nargs=-1, required=True)
@click.option("--allow-partial", is_flag=True, help="Leave OUT incomplete instead of failing when units are missing.")
def merge(out: str, parts: tuple[str, ...], allow_partial: bool) -> None:
    """Merge the stores of `label --num-shards N --shard-index I` jobs (PARTS) into one store OUT."""
    from ..data.merge import merge_stores

    with _expected_errors():
        manifest = merge_stores(out, list(parts), allow_partial=allow_partial, log=click.echo)
    state = "complete" if manifest.complete else "INCOMPLETE"
    click.echo(f"{out}: {len(manifest.shards)} shards, {manifest.rows:,} examples, {state}")


@cli.command()
@click.argument("store")
@click.argument("out")
@click.option("--to", "to", type=click.Choice(["parquet", "arrow"]), help="Output format (default: OUT's suffix).")
@click.option("--compression", type=click.Choice(["zstd", "lz4", "none"]), default="zstd", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace an existing OUT (atomically).")
@click.option("--allow-incomplete", is_flag=True, help="Export the shards committed so far by an unfinished run.")
def export(store: str, out: str, to: str | None, compression: str, overwrite: bool, allow_incomplete: bool) -> None:
    """Write STORE (path or URL) to one Parquet or Arrow IPC file OUT, one row per example, for other stacks."""
    from ..data.export import export_store

    if to is None:
        to = {".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow"}.get(Path(out).suffix.lower())
        if to is None:
            raise click.UsageError(f"cannot tell the format from {out!r}: pass --to parquet|arrow")
    with _expected_errors():
        try:
            summary = export_store(
                store,
                to=to,  # type: ignore[arg-type]
                out=out,
                overwrite=overwrite,
                compression=None if compression == "none" else compression,
                allow_incomplete=allow_incomplete,
            )
        except ValueError as e:
            raise click.ClickException(str(e)) from None
    click.echo(
        f"{summary['path']}: {summary['format']}, {summary['rows']:,} examples, {summary['positions']:,} positions, "
        f"{summary['bytes']:,} bytes"
    )


def _label_options(f: Callable[..., Any]) -> Callable[..., Any]:
    from ..data.manifest import METHODS, TASKS, VALUE_DTYPES
    from ..stages.label import LabelConfig
    from ..stages.soft_targets import DRAW_SCHEMES, HEAD_DTYPES
    from .config import config_options

    choices = {
        "task": tuple(TASKS),
        "method": METHODS,
        "format": ("zarr", "arrow"),
        "dtype": ("auto", "float32", "bfloat16", "float16"),
        "head_dtype": HEAD_DTYPES,
        "value_dtype": VALUE_DTYPES,
        "draws": DRAW_SCHEMES,
    }
    return config_options(LabelConfig, choices, config_file=True)(f)


@cli.command()
@_label_options
@click.pass_context
def label(ctx: click.Context, /, **_: Any) -> None:
    """Stage one: run a teacher once and cache its soft labels (top-k, sampled ids, or both) in a store."""
    from ..stages.label import LabelConfig
    from .config import resolve_config

    cfg = resolve_config(LabelConfig, ctx, "label")
    with _expected_errors():
        from ..stages.label import run

        run(cfg)


def _train_options(f: Callable[..., Any]) -> Callable[..., Any]:
    from ..stages.losses import LOSS_KINDS, TAIL_MODES  # the options only: no torch
    from ..stages.sharding import FSDP_DTYPES
    from ..stages.train import VERIFY_MODES, TrainConfig
    from .config import config_options

    choices = {"loss": LOSS_KINDS, "tail": TAIL_MODES, "verify": VERIFY_MODES, "fsdp_dtype": FSDP_DTYPES}
    return config_options(TrainConfig, choices, config_file=True)(f)


@cli.command()
@_train_options
@click.pass_context
def train(ctx: click.Context, /, **_: Any) -> None:
    """Stage two: train a student from a store's cached soft labels (no teacher needed)."""
    from ..stages.train import TrainConfig
    from .config import resolve_config

    cfg = resolve_config(TrainConfig, ctx, "train")
    with _expected_errors():
        from ..stages.healing import student_schedule

        schedule = student_schedule(cfg.student)  # a student cut by init-student: its healing schedule
        if schedule:
            cfg = resolve_config(TrainConfig, ctx, "train", base=schedule)
            taken = [_flag(k, v) for k, v in schedule.items() if getattr(cfg, k) == v]
            click.echo(
                f"{cfg.student} was cut from its teacher by init-student: its healing schedule sets "
                f"{', '.join(taken) or 'nothing here (every value given explicitly)'}; options given override it",
                err=True,
            )
        from ..stages.train import run

        run(cfg)


def _flag(name: str, value: Any) -> str:
    """A config value as the command-line option that sets it: ``--lr 0.0001``, ``--freeze-embeddings``."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value:g}" if isinstance(value, float) else f"--{flag} {value}"


def _init_student_options(f: Callable[..., Any]) -> Callable[..., Any]:
    from ..stages.init_student import METHODS, InitStudentConfig  # the config only: no torch
    from .config import config_options

    choices = {"method": METHODS, "dtype": ("auto", "float32", "bfloat16", "float16")}
    return config_options(InitStudentConfig, choices, config_file=True)(f)


@cli.command("init-student")
@_init_student_options
@click.pass_context
def init_student(ctx: click.Context, /, **_: Any) -> None:
    """A student cut from the teacher: a subset of its blocks (chosen by measured importance, or --layers)."""
    from ..stages.init_student import InitStudentConfig
    from .config import resolve_config

    cfg = resolve_config(InitStudentConfig, ctx, "init-student")
    with _expected_errors():
        from ..stages.init_student import run

        result = run(cfg)
    metric = result.metric
    click.echo(f"kept blocks  {result.kept_layers} of {result.teacher_layers} ({result.method})")
    click.echo(
        f"{metric:<12} teacher {result.teacher_score:.4g}  student {result.student_score:.4g}  "
        f"({result.calibration_tokens:,} calibration tokens)"
    )
    click.echo(
        f"parameters   teacher {result.teacher_params:,}  student {result.student_params:,} "
        f"({result.student_params / result.teacher_params:.0%})"
    )
    click.echo(f"student      {result.out}  ({result.seconds['total']:.1f}s)")


def _demo_options(f: Callable[..., Any]) -> Callable[..., Any]:
    from .config import config_options
    from .demo import DemoConfig

    return config_options(DemoConfig, {}, config_file=False)(f)


@cli.command()
@_demo_options
@click.pass_context
def demo(ctx: click.Context, /, **_: Any) -> None:
    """Label + train end to end on the built-in default (SmolLM2-135M teacher, Python docs corpus)."""
    from .config import resolve_config
    from .demo import DemoConfig, run_demo

    cfg = resolve_config(DemoConfig, ctx, "demo")
    with _expected_errors():
        run_demo(cfg)


def main() -> None:
    """The ``pipeline`` command. Under torchrun (WORLD_SIZE > 1) a rank that finished its command successfully
    leaves without the interpreter's finalisation: torch's C++ teardown there killed a rank of a finished
    ``train --fsdp`` run with SIGABRT ("terminate called without an active exception") in CI, after everything was
    saved and the process group destroyed, turning a finished job into a failed one. Outputs are flushed first. A
    command that ends with an exit code (its one-line error printed) leaves the same way with that code (a rank
    stopped by another rank's error used to abort so at exit, code 134 instead of 1); an uncaught exception
    propagates as usual, with its traceback."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        cli(prog_name="pipeline")
        return
    code = 0
    try:
        cli(prog_name="pipeline")
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            raise
        code = e.code or 0
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
