"""torchrun's own entry point (`python -m herd.parallel.torchrun ...` = `torchrun ...`), quiet when
the job is stopped on purpose.

On Ctrl-C or SIGTERM torchrun's agent passes the signal to every rank and then raises a
SignalException that ends in a 25-line traceback through its own code, after the ranks have
already said "interrupted". That traceback is noise to someone who pressed Ctrl-C: this entry
point ends with the shell's 128 + signal exit status instead. Every other failure (a rank that
crashed, a bad flag) keeps torchrun's own report.
"""

from __future__ import annotations

import sys


def main() -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main()
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
