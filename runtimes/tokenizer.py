"""Prompt formatting and tokenization on the device: `tokenizers` plus a pre-rendered chat template.

The checkpoint's Jinja chat template is rendered at convert time for a single user turn
(with and without an image) around a placeholder question, so the device needs no Jinja:
formatting is `prefix + question + suffix`. The template source is kept in the artifact too.
Tokenization mirrors the HF processor: the text with one `<image>` is tokenized with special
tokens added, then the single image token is expanded to the image's visual-token count.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edge_prune.errors import ArtifactError, InputError

TOKENIZER_FILE = "tokenizer.json"
CHAT_FILE = "chat_template.json"


@dataclass(frozen=True)
class ChatFormat:
    """A single user turn rendered by the checkpoint's chat template around a placeholder question."""

    image_token: str  # "<image>"
    image_prefix: str  # text before the question when an image is attached (holds image_token once)
    image_suffix: str
    text_prefix: str  # the same without an image
    text_suffix: str
    template: str | None = None  # the original Jinja source, for reference

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self, question: str, with_image: bool) -> str:
        """Wrap a plain question; a prompt that already holds the image token passes through unchanged."""
        if self.image_token in question:
            if not with_image:
                raise InputError(f"the prompt contains {self.image_token} but no image was given")
            return question
        if with_image:
            return f"{self.image_prefix}{question}{self.image_suffix}"
        return f"{self.text_prefix}{question}{self.text_suffix}"


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt split at its image: text ids without image tokens, and where the image sat."""

    text_ids: list[int]  # every non-image token, in order
    image_start: int | None  # index in text_ids before which the image's tokens sit; None = no image

    @property
    def text_after_image(self) -> int:
        return 0 if self.image_start is None else len(self.text_ids) - self.image_start


class PromptTokenizer:
    """tokenizer.json + chat_template.json from an artifact."""

    def __init__(self, tokenizer: Any, chat: ChatFormat, image_token_id: int):
        self.tokenizer = tokenizer
        self.chat = chat
        self.image_token_id = image_token_id

    @classmethod
    def load(cls, root: Path, image_token_id: int) -> PromptTokenizer:
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(root / TOKENIZER_FILE))
            chat = ChatFormat(**json.loads((root / CHAT_FILE).read_text()))
        except (OSError, ValueError, TypeError, Exception) as exc:  # tokenizers raises bare Exception
            raise ArtifactError(
                f"{root}: cannot load {TOKENIZER_FILE} / {CHAT_FILE} ({exc}); re-run `edge-prune convert`"
            ) from exc
        return cls(tokenizer, chat, image_token_id)

    def encode(self, prompt: str, with_image: bool) -> TokenizedPrompt:
        text = self.chat.format(prompt, with_image)
        count = text.count(self.chat.image_token)
        if with_image and count != 1:
            raise InputError(f"a prompt holds {count} {self.chat.image_token} placeholders; "
                             "edge-prune runs one image per prompt")
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        if not with_image:
            return TokenizedPrompt(text_ids=ids, image_start=None)
        where = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(where) != 1:
            raise InputError(f"the prompt tokenized to {len(where)} image tokens; expected exactly one")
        start = where[0]
        return TokenizedPrompt(text_ids=ids[:start] + ids[start + 1:], image_start=start)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
