"""Campus time: the one place that knows the campus time zone, engine nanoseconds and the
campus-local days and months that limits, snapshots, exports and statements count in.

Engine timestamps are integer nanoseconds since the Unix epoch (UTC); business days are
campus-local days in ``ONECARD_TZ`` (default Asia/Shanghai, contract §2). Conversions are
exact: datetimes carry microseconds, so nanoseconds are truncated to the microsecond.
"""

from __future__ import annotations

import os
from datetime import UTC, date, datetime, time, timedelta
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DEFAULT_TZ: Final = "Asia/Shanghai"
TZ_ENV: Final = "ONECARD_TZ"
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_NS_PER_US: Final = 1000


def campus_tz_name(name: str | None = None) -> str:
    """The campus time zone's name: ``name``, else ``$ONECARD_TZ``, else Asia/Shanghai."""
    return name or os.environ.get(TZ_ENV) or DEFAULT_TZ


def campus_tz(name: str | None = None) -> ZoneInfo:
    """The campus time zone (see ``campus_tz_name``); ValueError for an unknown zone name."""
    key = campus_tz_name(name)
    try:
        return ZoneInfo(key)
    except (ZoneInfoNotFoundError, ValueError) as e:
        raise ValueError(f"unknown time zone {key!r}") from e


def to_ns(dt: datetime) -> int:
    """An aware datetime as engine nanoseconds (exact: integer microseconds)."""
    if dt.tzinfo is None:
        raise ValueError("naive datetime: a time zone is required")
    return ((dt - EPOCH) // timedelta(microseconds=1)) * _NS_PER_US


def from_ns(ns: int, tz: ZoneInfo) -> datetime:
    """Engine nanoseconds as an aware local datetime (truncated to the microsecond)."""
    return (EPOCH + timedelta(microseconds=ns // _NS_PER_US)).astimezone(tz)


def utc_from_ns(ns: int) -> datetime:
    """Engine nanoseconds as an aware UTC datetime (truncated to the microsecond)."""
    return EPOCH + timedelta(microseconds=ns // _NS_PER_US)


def local_date(ns: int, tz: ZoneInfo) -> date:
    """The campus-local calendar day of an engine timestamp."""
    return from_ns(ns, tz).date()


def day_window(day: date, tz: ZoneInfo) -> tuple[int, int]:
    """``[start, end)`` in engine nanoseconds of the campus-local day ``day``."""
    start = datetime.combine(day, time(0), tzinfo=tz)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=tz)
    return to_ns(start), to_ns(end)


def day_window_at(ns: int, tz: ZoneInfo) -> tuple[int, int]:
    """``[start, end)`` of the campus-local day that contains engine timestamp ``ns``."""
    return day_window(local_date(ns, tz), tz)


def month_window(month: date, tz: ZoneInfo) -> tuple[int, int]:
    """``[start, end)`` in engine ns of the campus-local month starting at ``month``."""
    nxt = date(month.year + month.month // 12, month.month % 12 + 1, 1)
    return day_window(month, tz)[0], day_window(nxt, tz)[0]


def parse_day(value: str) -> date:
    """``YYYY-MM-DD`` as a date; ValueError with a readable message otherwise."""
    try:
        if len(value) != 10:
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise ValueError(f"expected a date YYYY-MM-DD, got {value!r}") from None


def parse_month(value: str) -> date:
    """``YYYY-MM`` as the first day of that month; ValueError otherwise."""
    try:
        if len(value) != 7 or value[4] != "-" or not (value[:4] + value[5:]).isascii():
            raise ValueError
        return date(int(value[:4]), int(value[5:]), 1)
    except ValueError:
        raise ValueError(f"expected a month YYYY-MM, got {value!r}") from None


def parse_instant(value: str) -> datetime:
    """An RFC 3339 instant (``2026-11-25T12:03:00+08:00``, ``...Z``, fractions allowed);
    ValueError otherwise, also for one without an offset, which names no moment at all."""
    try:
        dt = datetime.fromisoformat(value.strip())
    except ValueError:
        raise ValueError(f"expected an RFC 3339 time, got {value!r}") from None
    if dt.tzinfo is None:
        raise ValueError(f"{value!r} has no UTC offset (add Z or +08:00)")
    return dt
