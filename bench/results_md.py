"""Each benchmark owns one marked section of bench/RESULTS.md and rewrites only that."""

from __future__ import annotations

from pathlib import Path

RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"


def replace_section(name: str, text: str, path: Path = RESULTS_MD) -> None:
    """Put `text` between this section's markers, appending the section if it is new."""
    begin, end = f"<!-- begin:{name} -->", f"<!-- end:{name} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        tail = rest.split(end, 1)[1]
        path.write_text(head + block + tail)
    else:
        path.write_text(current.rstrip() + "\n\n" + block + "\n")
