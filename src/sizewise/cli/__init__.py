"""Command line: a thin layer over `sizewise.api`. Errors print one line and exit non-zero.

`import sizewise.cli` stays light (no torch): `main` installs its signal handling before any heavy
import, so a Ctrl-C at any moment is one line."""

from __future__ import annotations

import os

import click

from ..errors import Interrupted, SizewiseError
from . import compression, inspection  # noqa: F401  (the commands register on the group)
from .group import cli
from .options import EXIT_ERROR

__all__ = ["cli", "main"]


def _quiet_libraries() -> None:
    """transformers' own per-file progress bars and notices drown our per-layer progress."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def main(argv=None) -> int:
    """Run the CLI; every failure ends as one `error:` line and a non-zero exit, never a traceback
    (SIZEWISE_TRACEBACK=1 shows one for an unexpected error): 2 for errors, 130 after Ctrl-C
    (SIGINT), 143 after SIGTERM, both once every staging area is cleaned up."""
    import signal
    import warnings

    from ..atomic import handle_signals, restore_signals

    previous = handle_signals()
    # torch's weights-only unpickler warns about pickle protocols before refusing a file: noise here
    warnings.filterwarnings("ignore", module="torch._weights_only_unpickler")
    try:
        try:
            _quiet_libraries()
            rv = cli.main(args=argv, prog_name="sizewise", standalone_mode=False)
            return rv if isinstance(rv, int) else 0
        except SizewiseError as e:
            _say(f"error: {e}")
        except click.exceptions.Exit as e:
            return e.exit_code
        except click.ClickException as e:
            _say(f"error: {e.format_message()}")
        except click.exceptions.Abort:     # click's own prompt, interrupted
            _say("error: interrupted")
            return 128 + signal.SIGINT
        except (KeyboardInterrupt, Interrupted) as e:
            signum = getattr(e, "signum", signal.SIGINT)
            _say("error: interrupted" if signum == signal.SIGINT else "error: terminated")
            return 128 + signum
        except MemoryError:
            _say("error: out of memory")
        except Exception as e:               # a bug or an unforeseen input: still one line
            if os.environ.get("SIZEWISE_TRACEBACK"):
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            _say(f"error: unexpected {type(e).__name__}{': ' + first if first else ''} "
                 "(please report it; SIZEWISE_TRACEBACK=1 shows where)")
    except (KeyboardInterrupt, Interrupted) as e:   # a second signal while reporting the first
        return 128 + getattr(e, "signum", signal.SIGINT)
    finally:
        restore_signals(previous)   # main() called in-process (tests, scripts) leaves no handlers behind
    return EXIT_ERROR


def _say(line: str) -> None:
    try:
        click.echo(line, err=True)
    except OSError:           # stderr closed: the exit code still tells
        pass
