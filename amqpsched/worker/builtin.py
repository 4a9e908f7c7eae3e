"""The capabilities shipped with amqpsched: ``echo``, ``sleep`` and ``resize``."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field, JsonValue, field_validator

from .app import InvalidPayload, WorkerApp

app = WorkerApp()

MAX_SIDE = 8192


@app.capability("echo", description="Answers its payload unchanged.")
async def echo(payload: JsonValue) -> JsonValue:
    return payload


class SleepPayload(BaseModel):
    seconds: float = Field(ge=0, le=24 * 3600, description="How long to sleep.")


@app.capability(
    "sleep", description="Sleeps for payload.seconds, then answers them.", payload=SleepPayload
)
async def sleep(payload: SleepPayload) -> dict[str, float]:
    await asyncio.sleep(payload.seconds)
    return {"slept": payload.seconds}


class ResizePayload(BaseModel):
    image: str = Field(description="The image file (PNG, JPEG, GIF, WebP...), base64-encoded.")
    width: int = Field(ge=1, le=MAX_SIDE, description="Width of the result in pixels.")
    height: int = Field(ge=1, le=MAX_SIDE, description="Height of the result in pixels.")

    @field_validator("image")
    @classmethod
    def _is_base64(cls, value: str) -> str:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"image is not valid base64: {exc}") from None
        return value


class ResizeResult(BaseModel):
    image: str = Field(description="The resized image as PNG, base64-encoded.")
    width: int
    height: int


@app.capability(
    "resize",
    description="Resizes an image to width x height; answers a PNG.",
    payload=ResizePayload,
)
def resize(payload: ResizePayload) -> ResizeResult:
    # Sync on purpose: Pillow releases the GIL, and the worker runs sync handlers in threads.
    raw = base64.b64decode(payload.image)
    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            out = img.convert("RGBA").resize(
                (payload.width, payload.height), Image.Resampling.LANCZOS
            )
    except (UnidentifiedImageError, OSError) as exc:
        raise InvalidPayload(f"image cannot be decoded: {exc}") from exc
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return ResizeResult(
        image=base64.b64encode(buf.getvalue()).decode(), width=out.width, height=out.height
    )
