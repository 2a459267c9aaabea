"""Reading the CSV files users give redbike (schedules, capacities)."""

from __future__ import annotations

import csv


class CsvError(ValueError):
    """A CSV file that cannot be read; nothing of it was used."""


def read_rows(path: str, columns: str, optional: int = 0) -> list[tuple[int, list[str]]]:
    """The non-blank rows of a CSV file as (line, stripped fields), each
    checked to have the fields ``columns`` names (e.g. "JOBID,SCHEDULE"), the
    last ``optional`` of them may be left out. Rows are numbered by the line
    they start on, since a quoted field may span lines."""
    wanted = columns.count(",") + 1
    try:
        # utf-8-sig: a byte order mark (Excel writes one) is not part of the first field.
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            rows, line = [], 1
            for row in reader:
                rows.append((line, [field.strip() for field in row]))
                line = reader.line_num + 1
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CsvError(f"cannot read CSV {path!r}: {exc}") from None
    good = []
    for number, row in rows:
        if not any(row):
            continue
        if not wanted - optional <= len(row) <= wanted or not row[0]:
            raise CsvError(f"{path}:{number}: expected {columns}, got {','.join(row)!r}")
        good.append((number, row + [""] * (wanted - len(row))))
    return good
