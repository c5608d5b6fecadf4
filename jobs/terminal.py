"""Text from a store or a dataset, made safe to print in a terminal. Every command that prints such
text goes through ``terminal_text`` (``jobs.cli`` and each command import it from here)."""

from __future__ import annotations

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
