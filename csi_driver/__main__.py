"""Entry point: `python -m csi_driver` / `thinloop-csi`."""

from __future__ import annotations

import sys

from .logsetup import setup_logging
from .serving.flags import parse_settings
from .settings import SettingsError


def main(argv: list[str] | None = None) -> int:
    try:
        settings = parse_settings(sys.argv[1:] if argv is None else argv)
    except SettingsError as exc:
        print(f"thinloop-csi: {exc}", file=sys.stderr)
        return 2
    from .serving.preflight import StartupError, check
    try:
        check(settings)  # before anything starts: nothing made, forked or changed yet
    except StartupError as exc:
        print(f"thinloop-csi: {exc}", file=sys.stderr)
        return 1
    setup_logging(settings.log_level, settings.log_format)
    from .serving.server import serve
    try:
        return serve(settings)
    except StartupError as exc:
        print(f"thinloop-csi: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
