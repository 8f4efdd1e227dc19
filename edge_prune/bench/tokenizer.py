"""Byte-level BPE tokenizer for the synthetic benchmark, in a format llama.cpp also loads.

Trained from the generator's own text (questions, answers, chat template strings), so
every answer word is a single token and the vocabulary stays small.
"""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from edge_prune.bench.generator import corpus_lines

BOS, EOS, PAD, UNK, IMAGE = "<s>", "</s>", "<pad>", "<unk>", "<image>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK, BOS, EOS, PAD, IMAGE)
USER, ASSISTANT = "USER:", "ASSISTANT:"

# LLaVA-1.5 layout: "USER: <image>\n{question} ASSISTANT: {answer}</s>USER: ..."
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>\n{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: {{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}</s>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def prompt(question: str, answer: str | None = None) -> str:
    """Single-turn prompt in the chat layout; with an answer it is a full training turn."""
    text = f"{USER} {IMAGE}\n{question} {ASSISTANT}"
    return text if answer is None else f"{text} {answer}{EOS}"


@functools.lru_cache(maxsize=4)
def _trained_json(vocab_size: int) -> str:
    """The trained tokenizer as JSON; cached because training walks the generator's corpus."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus_lines()
    chat = [f"{USER} {IMAGE}\n{line} {ASSISTANT}" for line in lines[:200]] + [f"{USER} {ASSISTANT}"] * 50
    tok.train_from_iterator(lines + chat, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)])
    return tok.to_str()


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on the benchmark corpus and wrap it for transformers."""
    if vocab_size < 300:
        raise ValueError(f"vocab_size must be >= 300 (256 bytes + specials + merges), got {vocab_size}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_trained_json(vocab_size)),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=4096,
        padding_side="left",
        chat_template=CHAT_TEMPLATE,
    )
    return fast
