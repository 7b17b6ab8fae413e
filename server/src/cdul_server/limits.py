"""Per-request limits of the server, and the checks that name the limit and its flag."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from cdul_server.errors import invalid_argument, resource_exhausted

_logger = logging.getLogger(__name__)

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may ask for; each field has a command-line flag.

    Attributes:
        max_receive_message_bytes: Largest request message (--max-receive-message-bytes).
        max_send_message_bytes: Largest response message (--max-send-message-bytes).
        max_images_per_request: Images in one request message (--max-images-per-request).
        max_classes: Class names in one vocabulary (--max-classes).
        max_templates: Prompt templates in one vocabulary (--max-templates).
        max_prompt_chars: Characters of a class name, template, rendered prompt or search text
            (--max-prompt-chars).
        max_grid_size: Tiles per side of the pseudo-label grid (--max-grid-size).
        max_pixels: Decoded pixels (width * height) of one image (--max-pixels).
        max_search_k: Hits of one SearchCrops call (--max-search-k).
    """

    max_receive_message_bytes: int = 64 * MIB
    max_send_message_bytes: int = 64 * MIB
    max_images_per_request: int = 256
    max_classes: int = 1000
    max_templates: int = 32
    max_prompt_chars: int = 300
    max_grid_size: int = 8
    max_pixels: int = 40_000_000
    max_search_k: int = 1000

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")

    def check_image_count(self, count: int) -> None:
        if count > self.max_images_per_request:
            raise invalid_argument(
                f"the request has {count} images, more than the limit of "
                f"{self.max_images_per_request} images per request (--max-images-per-request): "
                "split it into smaller requests"
            )

    def check_class_count(self, count: int) -> None:
        if count > self.max_classes:
            raise invalid_argument(
                f"the vocabulary has {count} class names, more than the limit of "
                f"{self.max_classes} (--max-classes)"
            )

    def check_template_count(self, count: int) -> None:
        if count > self.max_templates:
            raise invalid_argument(
                f"the vocabulary has {count} templates, more than the limit of "
                f"{self.max_templates} (--max-templates)"
            )

    def check_prompt(self, text: str, what: str) -> None:
        if len(text) > self.max_prompt_chars:
            raise invalid_argument(
                f"{what} {text[:40]!r}... has {len(text)} characters, more than the prompt length "
                f"limit of {self.max_prompt_chars} characters (--max-prompt-chars)"
            )

    def check_grid_size(self, grid_size: int) -> None:
        if grid_size > self.max_grid_size:
            raise invalid_argument(
                f"grid_size {grid_size} is larger than the limit of {self.max_grid_size} tiles per "
                "side (--max-grid-size)"
            )

    def check_search_k(self, k: int) -> None:
        if k > self.max_search_k:
            raise invalid_argument(
                f"k {k} is larger than the limit of {self.max_search_k} hits (--max-search-k)"
            )

    def check_response_size(self, size: int) -> None:
        if size > self.max_send_message_bytes:
            raise resource_exhausted(
                f"the response would be {size} bytes, more than the limit of "
                f"{self.max_send_message_bytes} bytes (--max-send-message-bytes): send fewer "
                "images per request or stop asking for embeddings and tile scores"
            )

    def request_too_large_message(self, size: int) -> str:
        return (
            f"the request message is {size} bytes, more than the limit of "
            f"{self.max_receive_message_bytes} bytes (--max-receive-message-bytes): send fewer "
            "images per request"
        )
