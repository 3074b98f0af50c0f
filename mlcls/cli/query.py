"""`mlcls query`, `stats`, `compact` and `report`: argument parsing and presentation.

Each command turns its arguments into plain values, calls the library
(`mlcls.output.query`, `stats`, `compact`, `report`) and prints
the answer. `add_commands` is called once from `mlcls.cli.build_parser`.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
from typing import Any

import polars as pl

from mlcls.cli.options import add_storage_options
from mlcls.errors import OptionError

FORMATS = ("table", "csv", "json", "parquet")
TABLE_DEFAULT_ROWS = 20


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the four commands on the `mlcls` subparsers."""
    _add_query(sub)
    _add_stats(sub)
    _add_compact(sub)
    _add_report(sub)


def _add_query(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("query", help="find images by label and probability, or run SQL over the output",
                       description="Rows of the output at OUT (one per image: its newest row). With --label: "
                                   "images tagged with every --label and none of --not-label, sorted by the first "
                                   "label's probability. With --sql: DuckDB over the views tags and tags_all.")
    p.add_argument("out", metavar="OUT", help="output folder or URL that mlcls tag wrote")
    p.add_argument("--label", action="append", default=[], help="tagged with this class (repeat: all of them)")
    p.add_argument("--not-label", action="append", default=[], help="not tagged with this class (repeatable)")
    p.add_argument("--min-prob", type=float, default=None,
                   help="each --label's probability at least this (without --label: some class's)")
    p.add_argument("--sql", default=None, help="a DuckDB query over the view tags (one row per image)")
    p.add_argument("--limit", type=int, default=None, help=f"at most N rows (table: {TABLE_DEFAULT_ROWS} unless set)")
    p.add_argument("--format", choices=FORMATS, default="table", help="table (default), csv, json or parquet")
    p.add_argument("--out", dest="result", default=None, metavar="FILE",
                   help="write the result to FILE (path or URL) instead of standard output")
    _add_version(p)
    add_storage_options(p)
    p.set_defaults(handler=cmd_query)


def _add_stats(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stats", help="images, errors, per-label counts and probabilities, co-occurring labels")
    p.add_argument("out", metavar="OUT", help="output folder or URL that mlcls tag wrote")
    p.add_argument("--labels", type=int, default=30, help="labels to list, most frequent first (0: all)")
    p.add_argument("--pairs", type=int, default=10, help="co-occurring label pairs to list (default 10)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    _add_version(p)
    add_storage_options(p)
    p.set_defaults(handler=cmd_stats)


def _add_version(p: argparse.ArgumentParser) -> None:
    p.add_argument("--version", type=int, default=None, metavar="N",
                   help="read the table as of version N (time travel: e.g. the tags an earlier model gave)")


def _add_compact(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compact", help="the Delta table's maintenance: merge small files, vacuum, checkpoint",
                       description="Merge small files of OUT's Delta table (optimize), delete files no version "
                                   "within --retention-hours refers to (vacuum), and write a checkpoint. "
                                   "Readers see the same rows before, during and after. An output written "
                                   "before mlcls kept a Delta table becomes one first, its files as they are.")
    p.add_argument("out", metavar="OUT", help="output folder or URL that mlcls tag wrote")
    p.add_argument("--target-size", type=int, default=256, metavar="MB",
                   help="target size of merged files (default 256)")
    p.add_argument("--retention-hours", type=float, default=168,
                   help="keep files versions of the last H hours need, for time travel and running readers "
                        "(default 168, Delta's 7 days)")
    add_storage_options(p)
    p.set_defaults(handler=cmd_compact)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="a static HTML report: totals, charts, thumbnails per label, failed files")
    p.add_argument("out", metavar="OUT", help="output folder or URL that mlcls tag wrote")
    p.add_argument("--out", dest="report_dir", required=True, metavar="DIR", help="folder to write the report to")
    p.add_argument("--labels", type=int, default=100,
                   help="most frequent labels that get histograms and thumbnails (default 100)")
    p.add_argument("--thumbs", type=int, default=8, help="thumbnails per grid (default 8)")
    add_storage_options(p)
    p.set_defaults(handler=cmd_report)


def cmd_query(args: argparse.Namespace) -> int:
    from mlcls.output.query import LabelQuery, check_sql_args, count_matches, label_query, sql
    from mlcls.output.reader import OutputTable

    check_sql_args(args.sql, [args.label, args.not_label, args.min_prob is not None])
    if args.format == "parquet" and not args.result:
        raise OptionError("--format parquet needs --out FILE")
    q = LabelQuery(labels=tuple(args.label), not_labels=tuple(args.not_label), min_prob=args.min_prob,
                   limit=args.limit).validate()
    dataset = OutputTable.open(args.out, args.storage_options, version=args.version)
    table_default = args.format == "table" and args.limit is None and not args.result
    if args.sql is not None:
        limit = TABLE_DEFAULT_ROWS + 1 if table_default else args.limit
        result = pl.from_arrow(sql(dataset, args.sql, limit=limit))
        total = None
    else:
        if table_default:
            q = LabelQuery(**{**q.__dict__, "limit": TABLE_DEFAULT_ROWS})
        result = label_query(dataset, q)
        total = count_matches(dataset, q) if table_default else None
    assert isinstance(result, pl.DataFrame)
    emit(result, args.format, args.result, args.storage_options, total=total,
         shown=TABLE_DEFAULT_ROWS if table_default else None)
    return 0


def emit(df: pl.DataFrame, fmt: str, dest: str | None, storage_options: Any, *, total: int | None = None,
         shown: int | None = None) -> None:
    """Print or write a result in `fmt`."""
    if fmt == "table":
        more = shown is not None and (df.height > shown or (total is not None and total > shown))
        text = _table(df.head(shown) if shown is not None else df)
        if more and total is not None:
            text += f"\n{shown} of {total:,} rows shown; use --limit N or --format csv for more"
        elif more:
            text += f"\nthe first {shown} rows shown; use --limit N or --format csv for more"
        else:
            text += f"\n{df.height:,} rows"
        _write_text(text + "\n", dest, storage_options)
        return
    if fmt == "parquet":
        buf = io.BytesIO()
        df.write_parquet(buf, compression="zstd")
        _write_bytes(buf.getvalue(), dest, storage_options)
        return
    if fmt == "csv":
        _write_text(_flat(df).write_csv(), dest, storage_options)
        return
    _write_text(df.write_json() + "\n", dest, storage_options)


def _table(df: pl.DataFrame) -> str:
    width = shutil.get_terminal_size((160, 20)).columns
    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=120, fmt_table_cell_list_len=8, tbl_width_chars=width,
                   tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, tbl_formatting="ASCII_MARKDOWN"):
        return str(df)


def _flat(df: pl.DataFrame) -> pl.DataFrame:
    """CSV holds no lists or structs: label lists become `a;b`, other nested values JSON text."""
    exprs = []
    for name, dtype in df.schema.items():
        if isinstance(dtype, pl.List) and dtype.inner == pl.String:
            exprs.append(pl.col(name).list.join(";"))
        elif dtype.is_nested() or isinstance(dtype, pl.Map):
            exprs.append(pl.Series(name, [json.dumps(v, default=str) for v in df[name].to_list()]))
        else:
            exprs.append(pl.col(name))
    return df.select(exprs)


def _write_text(text: str, dest: str | None, storage_options: Any) -> None:
    if dest is None:
        sys.stdout.write(text)
    else:
        _write_bytes(text.encode(), dest, storage_options)


def _write_bytes(data: bytes, dest: str | None, storage_options: Any) -> None:
    from mlcls.errors import OutputError
    from mlcls.storage import describe_os_error, url_to_fs, write_atomic

    if dest is None:
        sys.stdout.buffer.write(data)
        return
    try:
        fs, path = url_to_fs(dest, storage_options)
        write_atomic(fs, path, data)
    except OSError as err:
        raise OutputError(f"cannot write {dest}: {describe_os_error(err)}") from err


def cmd_stats(args: argparse.Namespace) -> int:
    from mlcls.output.reader import OutputTable
    from mlcls.output.stats import compute_stats

    stats = compute_stats(OutputTable.open(args.out, args.storage_options, version=args.version), pairs=args.pairs)
    if args.format == "json":
        print(json.dumps(stats.to_dict(), indent=1))
        return 0
    print(format_stats(stats, labels=args.labels))
    return 0


def format_stats(stats: Any, *, labels: int) -> str:
    """The `mlcls stats` text: totals, error kinds, a label table, top pairs."""
    errors = sum(stats.errors.values())
    kinds = ", ".join(f"{k} {n:,}" for k, n in stats.errors.items())
    lines = [f"output     {stats.out}: Delta table version {stats.version}, {stats.parts} part files",
             "models     " + ", ".join(f"{m} ({n:,})" for m, n in stats.models.items()),
             f"images     {stats.images:,}: {stats.tagged:,} tagged, {errors:,} errors"
             + (f" ({kinds})" if kinds else ""),
             f"no label   {stats.unlabelled:,} of the tagged images (no class at or above its threshold)",
             f"labels     {sum(1 for x in stats.labels if x.images)} of {len(stats.labels)} classes in use"
             + (f" (probabilities {stats.probs}: means over the rows that kept one)" if stats.probs != "all" else "")]
    shown = stats.labels if labels == 0 else stats.labels[:labels]
    lines.append(f"  {'label':<24} {'images':>10} {'share':>7} {'mean p':>7} {'threshold':>9}")
    for x in shown:
        share = f"{x.images / stats.tagged:.1%}" if stats.tagged else "-"
        mean = f"{x.mean_prob:.3f}" if x.mean_prob is not None else "-"
        lines.append(f"  {x.label:<24} {x.images:>10,} {share:>7} {mean:>7} {x.threshold:>9.3f}")
    if len(shown) < len(stats.labels):
        lines.append(f"  ... {len(stats.labels) - len(shown)} more (--labels 0 lists all)")
    if stats.pairs:
        lines.append("pairs      labels that occur together most often")
        lines += [f"  {a + ' + ' + b:<35} {n:>10,}" for a, b, n in stats.pairs]
    lines.append(f"took {stats.seconds:.2f} s")
    return "\n".join(lines)


def cmd_compact(args: argparse.Namespace) -> int:
    from mlcls.output.compact import compact

    r = compact(args.out, args.storage_options, target_bytes=args.target_size * 2**20,
                retention_hours=args.retention_hours)
    if r.adopted:
        print(f"{r.out} is now a Delta table: {r.adopted} part files committed as they were")
    print(f"compacted {r.out}: {r.files_before} -> {r.files_after} files, {r.rows:,} rows, version {r.version}; "
          f"vacuumed {r.vacuumed} files older than {args.retention_hours:g} h; {r.seconds:.1f} s")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from mlcls.output.report import write_output_report

    data, pages = write_output_report(args.out, args.report_dir, args.storage_options, labels=args.labels,
                               thumbs=args.thumbs)
    made = sum(1 for v in data.thumbs.values() if v)
    n_pages = len(pages) - 2
    print(f"wrote {args.report_dir.rstrip('/')}/{pages[0]}: {data.stats.images:,} images, "
          f"{len(data.detailed)} labels in detail on {n_pages} page{'' if n_pages == 1 else 's'}, {made} thumbnails"
          + (f" ({len(data.thumbs) - made} sources unreadable)" if made < len(data.thumbs) else ""))
    return 0
