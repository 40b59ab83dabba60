"""The soak's entry point: parse, run, always clean up, print the report, exit 0 or 1."""

from __future__ import annotations

import shutil
import signal
import tempfile
import traceback
from pathlib import Path
from types import FrameType

from soak import report
from soak.harness import HarnessError, Soak
from soak.settings import parse_args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so that every `finally` stops the service and the threads


def main(argv: list[str] | None = None) -> int:
    settings = parse_args(argv)
    seed = (
        settings.seed
        if settings.seed is not None
        else int.from_bytes(__import__("os").urandom(4), "big")
    )
    signal.signal(signal.SIGTERM, _interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="pathwatch-soak-", dir=settings.workdir))
    print(f"soak: seed {seed} (repeat with --seed {seed}); work dir {workdir}", flush=True)
    soak = Soak(settings, seed, workdir)
    try:
        soak.run()
    except HarnessError as exc:
        print(f"soak: failed: {exc}")
        return 1
    except KeyboardInterrupt:
        print("soak: interrupted")
        return 130
    except Exception:
        traceback.print_exc()
        print("soak: failed: harness error (see the traceback above)")
        return 1
    finally:
        soak.close()
        if settings.keep:
            print(f"soak: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if report.print_report(soak) else 1
