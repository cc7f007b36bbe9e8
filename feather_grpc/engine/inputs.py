"""What a request's content needs from a provider's wire format: routing skips the formats that lack it."""

from __future__ import annotations

from feather_grpc.engine.types import ChatRequest, PartKind, Role

# Input kinds beyond text, each a thing some wire format cannot carry.
IMAGE = "image"  # an inline image
IMAGE_URL = "image_url"
DOCUMENT = "document"  # an inline PDF
DOCUMENT_URL = "document_url"
AUDIO = "audio"
TOOL_RESULT_MEDIA = "tool_result_media"  # an image or document returned by a tool

DESCRIPTIONS = {
    IMAGE: "an image",
    IMAGE_URL: "an image by URL",
    DOCUMENT: "a PDF document",
    DOCUMENT_URL: "a PDF document by URL",
    AUDIO: "audio",
    TOOL_RESULT_MEDIA: "an image or document in a tool result",
}


def needs(request: ChatRequest) -> dict[str, str]:
    """The input kinds the request uses, each with the field path of its first use."""
    found: dict[str, str] = {}
    for i, m in enumerate(request.messages):
        for j, p in enumerate(m.parts):
            if p.kind is PartKind.TEXT:
                continue
            if m.role is Role.TOOL:
                kind = TOOL_RESULT_MEDIA
            elif p.kind is PartKind.IMAGE:
                kind = IMAGE_URL if p.url else IMAGE
            elif p.kind is PartKind.DOCUMENT:
                kind = DOCUMENT_URL if p.url else DOCUMENT
            else:
                kind = AUDIO
            found.setdefault(kind, f"messages[{i}].parts[{j}]")
    return found
