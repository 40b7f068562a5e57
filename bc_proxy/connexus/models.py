"""Connexus wire models for untrusted input: the `mo` and `dlr` webhook payloads.

Frozen pydantic models. Unknown fields are ignored (Connexus may add some); missing or
mistyped required fields fail validation. Ids may arrive as numbers and become strings.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _as_str(v: object) -> object:
    return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


Id = Annotated[str, BeforeValidator(_as_str), Field(min_length=1, max_length=100)]


class _Payload(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class DlrDetails(_Payload):
    smscid: Annotated[str | None, BeforeValidator(_as_str)] = Field(None, max_length=100)


class DlrPayload(_Payload):
    type: Literal["dlr"]
    message_id: Id = Field(alias="messageId")
    status_code: int = Field(alias="statusCode", ge=0, le=1_000_000)
    status: str = Field("", max_length=40)
    timestamp: int | None = None
    details: DlrDetails | None = None

    @property
    def event_key(self) -> str:
        """Timestamp and smscid: what tells two reports for one messageId and status apart."""
        smscid = self.details.smscid if self.details is not None else None
        return f"{self.timestamp or ''}:{smscid or ''}"


class MoPayload(_Payload):
    type: Literal["mo"]
    message_id: Id = Field(alias="messageId")
    sender: str = Field(alias="from", min_length=1, max_length=40)
    to: str = Field(min_length=1, max_length=40)
    body: str = Field("", max_length=10_000)
    related_message_id: Annotated[str | None, BeforeValidator(_as_str)] = Field(
        None, alias="relatedMessageId", max_length=100
    )
