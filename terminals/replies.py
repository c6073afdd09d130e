"""The gateway's answers: a request's identifying fields echoed, fields 12/13 in campus time."""

from __future__ import annotations

import time
from datetime import datetime
from zoneinfo import ZoneInfo

import msgspec

from terminals.iso8583 import Message, ResponseCode, response_mti

__all__ = ["Replier", "Reply"]


class Reply(msgspec.Struct, frozen=True):
    """An answer to send: the message and the key to MAC it with (None: no MAC)."""

    message: Message
    mac_key: bytes | None


class Replier:
    """Builds answers in one campus time zone (fields 12/13 computed once a second)."""

    def __init__(self, zone: ZoneInfo) -> None:
        self._zone = zone
        self._local: tuple[int, str, str] = (-1, "", "")  # (unix second, field 12, field 13)

    def reply(
        self,
        msg: Message,
        code: ResponseCode,
        *,
        auth_id: str | None = None,
        amounts: str | None = None,
        timestamp: int | None = None,
    ) -> Message:
        """The answer to ``msg``: its identifying fields echoed, fields 12/13 in campus time."""
        second = (time.time_ns() if timestamp is None else timestamp) // 1_000_000_000
        if second != self._local[0]:  # fields 12/13 change once a second, not per answer
            local = datetime.fromtimestamp(second, self._zone)
            self._local = (second, local.strftime("%H%M%S"), local.strftime("%m%d"))
        _, local_time, local_date = self._local
        return Message(
            mti=response_mti(msg.mti),
            card_no=msg.card_no,
            processing_code=msg.processing_code,
            amount=msg.amount,
            transmission_dt=msg.transmission_dt,
            stan=msg.stan,
            local_time=local_time,
            local_date=local_date,
            auth_id=auth_id,
            response_code=code,
            terminal_id=msg.terminal_id,
            merchant_id=msg.merchant_id,
            additional_amounts=amounts,
            original_data=msg.original_data,
            room_id=msg.room_id,
        )
