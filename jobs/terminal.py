"""Text from a store or a dataset, made safe to print in a terminal. Every command that prints such
text goes through ``terminal_text`` (``jobs.cli`` and each command import it from here), and every
log record and warning, of the command and of its Ray workers, through ``TerminalLogFormatter``."""

from __future__ import annotations

import logging

# Control characters shown escaped: C0 (but the newline, shown as ⏎), DEL and C1. Printed raw, dataset
# text such as "\x1b[31m" or "\x1b]0;TITLE\x07" would recolour the terminal or retitle its window.
_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_CONTROL.update({ord("\t"): "\\t", ord("\r"): "\\r"})
# Bidirectional controls and invisible characters, shown escaped too: printed, U+202E would show text
# reversed from where it stands, and a zero-width space hides in a name (joiners stay: scripts need them)
_CONTROL.update({c: f"\\u{c:04x}" for c in [0x061C, 0x200B, 0x200E, 0x200F, *range(0x202A, 0x202F), 0x2060,
                                               *range(0x2066, 0x206A), 0xFEFF]})
_ESCAPED = str.maketrans({**_CONTROL, ord("\n"): "⏎"})
_ESCAPED_KEEP_LINES = str.maketrans({k: v for k, v in _CONTROL.items() if k != ord("\n")})


def terminal_text(text: str, keep_newlines: bool = False) -> str:
    """``text`` made safe to print: every control character (C0, DEL, C1) shown escaped, as ``\\x1b``,
    ``\\t``, ``\\r``, and bidirectional and zero-width ones as ``\\u202e``; a newline shown as ``⏎``, or kept with ``keep_newlines`` (for our own multi-line
    output that quotes names from a store or a dataset). Every output path that prints dataset or
    store text goes through it."""
    return text.translate(_ESCAPED_KEEP_LINES if keep_newlines else _ESCAPED)


class TerminalLogFormatter(logging.Formatter):
    """Log lines as a terminal may show them: URLs masked, control characters escaped (a message can
    quote a store's text, a request line or a URL given)."""

    def format(self, record: logging.LogRecord) -> str:
        from store.location import mask_urls

        return terminal_text(mask_urls(super().format(record)), keep_newlines=True)


def show_logs_masked(level: int = logging.WARNING) -> None:
    """Print this process's log records from ``level`` up, and its Python warnings (which quote URLs and
    store text too), on stderr through ``TerminalLogFormatter``. The command line does this, and so does
    each Ray worker process it starts (``jobs.ray_session``): Ray forwards a worker's stderr as it is."""
    handler = logging.StreamHandler()
    handler.setFormatter(TerminalLogFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    logging.captureWarnings(True)
