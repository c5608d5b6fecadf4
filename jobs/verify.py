"""`latentstore verify STORE`: read every part of a store and compare it with what was recorded
when it was written (see ``store.verify``). Exit status 0 when intact; 2 when damaged (the report
names each damaged part and how to repair it) or when there is no store; 3 when intact so far but
still being written (the report lists the parts still to come)."""

from __future__ import annotations

import argparse
import json

from store.errors import StoreCorruptError

VERIFY_HELP = """\
Check every part of a store: metadata files, every chunk of every array, the crc32
checksums recorded in each completion marker at write time, shapes, pointer arrays,
feature index ranges, the root's shard list and counts, and the feature-major index.
It reads the whole store once.

  latentstore verify demo.zarr
  latentstore verify s3://bucket/run.zarr --json

Exit status:
  0  every part is intact and the store is finished
  2  a part is damaged (each one is named, with how to repair it; following every
     fix leaves a store that verifies), or there is no store at the path
  3  every part written so far is intact, but the store is still being written: an
     extraction, index build or sweep is running, or stopped part-way (rerun the
     same command to finish it); the report lists the parts still to come
"""

IN_PROGRESS = 3  # the exit status of a store that is intact so far but still being written


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("verify", help="check every part of a store against its recorded checksums",
                                   description=VERIFY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("store", help="the store's path or URL")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(handler=verify_command)


def verify_command(args: argparse.Namespace) -> int:
    from store.verify import verify_store

    report = verify_store(args.store)
    if args.json:
        print(json.dumps({"location": report.location, "ok": report.ok, "status": report.status,
                          "n_shards": report.n_shards, "n_arrays": report.n_arrays,
                          "n_checksums": report.n_checksums, "notes": report.notes,
                          "in_progress": report.in_progress, "to_come": report.to_come, "fixes": report.fixes(),
                          "problems": [{"part": p.part, "message": p.message} for p in report.problems]}, indent=2))
    else:
        from jobs.terminal import terminal_text

        print(terminal_text(report.format(), keep_newlines=True))  # part names come from the store
    if not report.ok:
        raise StoreCorruptError(
            f"{len(report.damaged_parts)} damaged part(s) in {report.location}: {', '.join(report.damaged_parts[:5])}"
            + (", ..." if len(report.damaged_parts) > 5 else "") + " (the report above says how to repair them)."
        )
    return IN_PROGRESS if report.in_progress else 0
