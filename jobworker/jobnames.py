"""
Job names and labels: their syntax, their caps, and the list filters on them.

Pure: no I/O.  The server checks every name and label of a start request
and every filter of a list request with these functions; jobcli checks them
too, to say what is wrong before it connects.

Syntax (as docker's container names, and as Kubernetes label keys):

  - a name is 1 to L{MAX_NAME_BYTES} characters of C{[a-zA-Z0-9_.-]},
    the first a letter or digit;
  - a label key is 1 to L{MAX_LABEL_KEY_BYTES} characters of
    C{[a-zA-Z0-9_./-]}, the first a letter or digit (so never C{=}, which
    separates key and value in a filter);
  - a label value is any text of at most L{MAX_LABEL_VALUE_BYTES} UTF-8
    bytes without control characters (C0, DEL, C1), so that C{status} and
    C{list} print it on one line as it is;
  - at most L{MAX_LABELS} labels, keys distinct, at most
    L{MAX_LABELS_BYTES} bytes of keys and values together.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_LABELS",
    "MAX_LABEL_KEY_BYTES",
    "MAX_LABEL_VALUE_BYTES",
    "MAX_LABELS_BYTES",
    "MAX_LABEL_FILTERS",
    "NameError_",
    "check_name",
    "check_labels",
    "check_label_filter",
    "labels_match",
]

# Caps, and why: a name is typed and read by people, 128 is docker-like
# room; the labels travel in every status (and every list entry), so they
# are kept to 4 KiB in all, which with the rest of an abridged status (spec
# section 6.2, about 5.6 KB) still fits the smallest frame a peer may
# announce (16 KiB).
MAX_NAME_BYTES = 128
MAX_LABELS = 32
MAX_LABEL_KEY_BYTES = 128
MAX_LABEL_VALUE_BYTES = 1024
MAX_LABELS_BYTES = 4096
# Filters of one list request: as many as a job can have labels.
MAX_LABEL_FILTERS = MAX_LABELS

_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]*\Z")
_KEY = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_./-]*\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class NameError_(ValueError):
    """
    A name, label or label filter that breaks the rules above; the message
    says which rule.  (Not C{NameError}, Python's own.)
    """


def _shown(text: str) -> str:
    return repr(text[:40] + ("…" if len(text) > 40 else ""))


def _utf8_size(text: str, what: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise NameError_(f"{what} {_shown(text)} is not valid UTF-8") from None


def check_name(name: str) -> str:
    """
    C{name} if it is a valid job name; C{""} (no name) is valid too.

    @raise NameError_: it is not.
    """
    if name == "":
        return name
    size = _utf8_size(name, "job name")
    if size > MAX_NAME_BYTES:
        raise NameError_(f"job name of {size} bytes is longer than {MAX_NAME_BYTES}")
    if not _NAME.match(name):
        raise NameError_(
            f"job name {_shown(name)} is not allowed: use letters, digits, '_', '.' and '-', starting with a letter or digit"
        )
    return name


def _check_key(key: str) -> None:
    size = _utf8_size(key, "label key")
    if size > MAX_LABEL_KEY_BYTES:
        raise NameError_(f"label key of {size} bytes is longer than {MAX_LABEL_KEY_BYTES}")
    if not _KEY.match(key):
        raise NameError_(
            f"label key {_shown(key)} is not allowed: use letters, digits, '_', '.', '/' and '-', starting with a letter or digit"
        )


def _check_value(key: str, value: str) -> int:
    size = _utf8_size(value, f"value of label {key}")
    if size > MAX_LABEL_VALUE_BYTES:
        raise NameError_(f"value of label {key} is {size} bytes, longer than {MAX_LABEL_VALUE_BYTES}")
    if _CONTROL.search(value):
        raise NameError_(f"value of label {key} holds a control character")
    return size


def check_labels(labels: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """
    C{labels} as a tuple if they are valid (see the module docstring).

    @raise NameError_: they are not.
    """
    result = tuple(labels)
    if len(result) > MAX_LABELS:
        raise NameError_(f"{len(result)} labels; at most {MAX_LABELS}")
    seen: set[str] = set()
    total = 0
    for key, value in result:
        _check_key(key)
        if key in seen:
            raise NameError_(f"label {key} given twice")
        seen.add(key)
        total += len(key.encode("utf-8")) + _check_value(key, value)
    if total > MAX_LABELS_BYTES:
        raise NameError_(f"labels of {total} bytes in all; at most {MAX_LABELS_BYTES}")
    return result


def check_label_filter(text: str) -> tuple[str, str | None]:
    """
    A list filter C{KEY} or C{KEY=VALUE} as (key, value or None).

    @raise NameError_: the key or the value is not one a label may have.
    """
    key, sep, value = text.partition("=")
    _check_key(key)
    if sep:
        _check_value(key, value)
        return key, value
    return key, None


def labels_match(labels: Iterable[tuple[str, str]], filters: Iterable[str]) -> bool:
    """
    Whether a job with C{labels} matches every filter (C{KEY}: has the
    label; C{KEY=VALUE}: has it with this value).  Filters are taken as
    they are: check them first with L{check_label_filter}.
    """
    have = dict(labels)
    for text in filters:
        key, sep, value = text.partition("=")
        if key not in have or (sep and have[key] != value):
            return False
    return True
