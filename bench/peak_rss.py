"""Run a command and report its peak RSS from ``wait4``.

Run this small script as the parent of the measured command: Linux carries a parent's RSS high-water mark
into a forked child's ``ru_maxrss``, so measuring from a big parent (a driver that loaded a model) would
report the parent's size. Usage: ``python bench/peak_rss.py OUT.json -- CMD ARGS...``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def main() -> int:
    out, sep, *cmd = sys.argv[1:]
    if sep != "--" or not cmd:
        raise SystemExit(__doc__)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    with open(out, "w") as handle:
        json.dump(
            {"exit_code": code, "wall_s": time.perf_counter() - started, "peak_rss_bytes": usage.ru_maxrss * 1024},
            handle,
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
