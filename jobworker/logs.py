"""
Logging: a L{Logger} whose events carry every field as a JSON value, and
the JSON observer behind C{twistd jobworker --log-format json}.

Twisted's JSON observers (C{twist --log-format=json}, and ours) write each
event's fields as they are; a value that JSON has no type for (a C{UUID}, an
C{Enum}, an exception) becomes C{{"unpersistable": true}}, so a job's id
would be lost exactly where a log shipper needs it.  L{Logger} therefore
turns such values into text when the event is made, once, for every
observer: C{job_id} reads C{"0f1e2d3c-..."} in a JSON line and in a text
line alike.  Twisted's own keys (C{log_*}: the failure, the source, the
format) are left alone; the JSON writer knows how to keep those.
"""

from __future__ import annotations

import enum
import sys
from typing import IO, Any

from twisted.logger import ILogObserver, Logger as _TwistedLogger, LogLevel, jsonFileLogObserver
from zope.interface import provider

__all__ = ["Logger", "json_value", "json_observer"]

_JSON_TYPES = (str, int, float, bool, type(None))


def json_value(value: Any) -> Any:
    """
    C{value} as a JSON value: text, numbers, booleans and C{None} as they
    are, lists, tuples and dicts item by item, an C{Enum} by its name, and
    anything else as C{str(value)}.
    """
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, _JSON_TYPES):
        return value
    if isinstance(value, (list, tuple, frozenset, set)):
        return [json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): json_value(item) for key, item in value.items()}
    return str(value)


class Logger(_TwistedLogger):
    """
    A L{twisted.logger.Logger} whose fields are JSON values (see the module
    docstring).  Used exactly like Twisted's:
    C{log.info("job {job_id} exited with {code}", job_id=job.job_id, code=0)}.
    """

    def emit(self, level: LogLevel, format: str | None = None, **kwargs: object) -> None:
        fields = {
            key: value if key.startswith("log_") else json_value(value)
            for key, value in kwargs.items()
        }
        super().emit(level, format, **fields)


def json_observer(stream: IO[str] | None = None) -> ILogObserver:
    """
    An observer that writes each event as one JSON object per line (JSON
    Lines, as log shippers and C{jq} read them; Twisted's
    C{eventsFromJSONLogFile} reads them too).  C{twist --log-format=json}
    starts each line with an ASCII record separator instead (C{jq --seq}).

    Events from Twisted itself carry objects (a factory, a port) that JSON
    cannot hold; those fields are written as text here as well, the
    event's source as text and its C{log_logger} (the L{Logger} object, whose
    name is in C{log_namespace}) not at all, so every field of every line is
    a JSON value.

    @param stream: a text file; standard output by default (where systemd's
        journal and container runtimes collect a service's log).
    """
    inner = jsonFileLogObserver(stream if stream is not None else sys.stdout, recordSeparator="")

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        fields = {}
        for key, value in event.items():
            if key == "log_logger":
                continue  # the Logger object; its namespace is log_namespace
            if key == "log_source" and value is not None:
                value = str(value)
            elif not key.startswith("log_"):
                value = json_value(value)
            fields[key] = value
        inner(fields)

    return observe  # type: ignore[no-any-return]  # @provider's result is untyped
