"""PII redaction applied to a request before it leaves the gateway (card numbers, SSNs, e-mail, phones)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace

from feather_grpc.engine.types import ChatRequest

KINDS = ("card", "ssn", "email", "phone")

_EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b")
_SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
_CARD = re.compile(r"\b(?:\d[ -]?){12,18}\d\b")
_PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{2,4})[ .-]?\d{3,4}[ .-]?\d{3,4}(?!\w)")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card(match: re.Match[str]) -> str:
    digits = re.sub(r"\D", "", match.group())
    return "[REDACTED_CARD]" if 13 <= len(digits) <= 19 and _luhn(digits) else match.group()


class Redactor:
    def __init__(self, kinds: Iterable[str] = KINDS) -> None:
        self.kinds = frozenset(kinds)

    def text(self, text: str) -> str:
        # Order matters: cards and SSNs before phones, whose pattern would also match their digits.
        if "email" in self.kinds:
            text = _EMAIL.sub("[REDACTED_EMAIL]", text)
        if "card" in self.kinds:
            text = _CARD.sub(_card, text)
        if "ssn" in self.kinds:
            text = _SSN.sub("[REDACTED_SSN]", text)
        if "phone" in self.kinds:
            text = _PHONE.sub("[REDACTED_PHONE]", text)
        return text

    def request(self, request: ChatRequest) -> ChatRequest:
        messages = [
            replace(
                m,
                content=self.text(m.content),
                parts=tuple(replace(p, text=self.text(p.text)) if p.text else p for p in m.parts),
            )
            for m in request.messages
        ]
        return replace(request, messages=messages)
