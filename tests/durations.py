"""Record each test file's total time from a `pytest -q --durations=0` log into tests/durations.json, which
conftest.py uses to hand the longest files out first (scheduling only: no test reads it).

    .venv/bin/python -m pytest -q --durations=0 > /tmp/log; .venv/bin/python tests/durations.py /tmp/log
"""

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

LINE = re.compile(r"^([\d.]+)s (?:call|setup|teardown)\s+(tests/[^:]+\.py)::")


def main(log: str) -> None:
    totals: dict[str, float] = defaultdict(float)
    for line in Path(log).read_text().splitlines():
        if match := LINE.match(line):
            totals[match.group(2)] += float(match.group(1))
    out = Path(__file__).with_name("durations.json")
    out.write_text(json.dumps({k: round(v) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])}, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
