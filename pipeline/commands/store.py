"""`pact store verify STORE` and `pact store repair STORE`: check a store against its
manifest, and repair it so that a `pact precompute` rerun fills exactly the gaps."""

from __future__ import annotations

import sys

import click

from pact.store.manifest import Store
from pact.store.verify import Report, repair, verify


def _print(report: Report) -> None:
    for finding in report.findings:
        click.echo(finding.line())


@click.group("store")
def store_group() -> None:
    """Check (verify) or repair a store."""


@store_group.command("verify")
@click.argument("store_dir", metavar="STORE", type=click.Path(file_okay=False, path_type=str))
def verify_command(store_dir: str) -> None:
    """Check every part the manifest lists (exists, regular file, schema, every page and
    its checksum, row, example and byte counts, steps, examples stored twice), the safety set,
    the files under metrics/ and evals/, and list unregistered parts, temporaries, symlinks
    and foreign files.

    Prints one line per finding and a summary; exit code 0 when the store is sound
    (warnings allowed), 1 when it has problems, 2 when it cannot be read at all.
    """
    store = Store(store_dir)
    report = verify(store)
    _print(report)
    problems = len(report.problems)
    summary = f"store {store.root}: {report.parts} parts, {report.examples} examples"
    if not problems:
        click.echo(f"{summary}; no problem")
        return
    repairable = sum(1 for finding in report.problems if finding.repairable)
    found = f"{summary}; {problems} problem{'s' if problems != 1 else ''}"
    if repairable == problems:
        click.echo(f"{found}: run `pact store repair {store.root}`")
    elif repairable:
        click.echo(f"{found}: `pact store repair {store.root}` fixes {repairable}, the others need what their line says")
    else:
        click.echo(f"{found}: repair cannot fix {'them' if problems != 1 else 'it'}; do what the line above says")
    sys.exit(1)


@store_group.command("repair")
@click.argument("store_dir", metavar="STORE", type=click.Path(file_okay=False, path_type=str))
def repair_command(store_dir: str) -> None:
    """Unregister every bad part (missing, unreadable, wrong schema or counts, registered
    twice, reached through a symlink), delete pact's own bad and unregistered part files,
    temporaries and symlinks inside the store (never what a link points to); foreign files
    stay. Holds the store's writer lock: refused while a pact process writes it.

    A `pact precompute` rerun then computes exactly the examples that lost their targets.
    """
    store = Store(store_dir)
    report = repair(store)
    _print(report)
    after = verify(store)
    left = len(after.problems)
    fixed = len(report.problems) - left
    click.echo(
        f"store {store.root}: repaired {fixed} problem{'s' if fixed != 1 else ''}; {after.parts} parts, "
        f"{after.examples} examples remain registered (rerun `pact precompute` to compute the missing ones)"
    )
    if left:
        for finding in after.problems:
            click.echo(f"left: {finding.line()}")
        sys.exit(1)
