"""Byte-level BPE tokenizer: training, loading, and the one chat format of daulat.

    daulat tokenizer --data books/ web.jsonl:licence=cc-by-4.0 --vocab-size 8192 --out runs/tok

The BPE itself is the Hugging Face `tokenizers` library (Rust, parallel), configured like GPT-2/DeepSeek:
byte-level, so any Unicode string round-trips exactly and nothing is ever <unk>; every digit is its own
pre-token, so numbers are read digit by digit (small models learn arithmetic far more easily that way).
What is saved (`tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`) loads unchanged in
`transformers.AutoTokenizer`, and its `apply_chat_template` gives exactly the ids of `Tokenizer.apply_chat_template`.

Special tokens, fixed here for the whole toolkit:

    <|bos|> = 0   starts every document and every conversation
    <|eos|> = 1   ends every document and every chat turn: the one stop token
    <|pad|> = 2   padding only; never trained on
    <|system|> <|user|> <|assistant|>   open a chat turn

A conversation renders as  <|bos|> <|user|>hi<|eos|> <|assistant|>hello<|eos|>  (without the spaces), and
the generation prompt is  <|assistant|>.

Content never becomes a control token. `encode` reads special-token text such as "<|eos|>" or
"<|assistant|>" inside a string as the plain characters it is (as OpenAI's API does), so neither a chat
message, an SFT conversation, a pretraining document nor the tokenizer trainer's input can forge a turn or
an end of sequence: role and control ids are placed only by `render_chat` (and the shard writer's
<|bos|>/<|eos|> around each document). `encode(text, allow_special=True)` is the explicit, opt-in way to
parse them, for callers that build raw prompts from trusted text.

transformers renders its chat template to a string first and tokenizes that, so it cannot tell the
template's role tokens from the same text inside a message: for conversations whose content holds no
special-token text (the normal case) its `apply_chat_template` gives exactly daulat's ids, and for content
that does, transformers parses it as control tokens where daulat does not. Code that renders untrusted
content through transformers should encode the content with `split_special_tokens=True` itself; daulat's
own paths (chat, serve, SFT, pretraining) never need to.

Stop strings are matched against decoded text; a stop string that is the text of a special token
("<|eos|>", "<|user|>") also stops on that token itself (`stop_token_ids_for`), since with
skip_special_tokens the token decodes to nothing and its text would otherwise never appear.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

from daulat.errors import DaulatError

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS.values()]  # ids 0..5, in this order
DEFAULT_MAX_LENGTH = 2048
TRAINING_PIECE_CHARS = 1024  # see _training_pieces

# Jinja for transformers (and servers that read it). Token strings are literals rather than `bos_token`
# variables so that every renderer gives the same text; no whitespace is emitted outside the messages.
CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + message['role'] + ': expected system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|eos|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


class Tokenizer:
    """A `tokenizers.Tokenizer` with daulat's special tokens and chat format.

    `encode` never adds special tokens: callers say where <|bos|>/<|eos|> go (shards, chat rendering).
    """

    def __init__(self, tokenizer, model_max_length: int = DEFAULT_MAX_LENGTH):
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise DaulatError(f"tokenizer lacks daulat's special tokens {missing}")
        tokenizer.encode_special_tokens = True  # special-token text in content is plain text (see the module doc)
        self.tokenizer = tokenizer
        self._parsing = None  # a copy that parses special-token text, built on first `allow_special=True`
        self.model_max_length = int(model_max_length)
        self.bos_id, self.eos_id, self.pad_id = (tokenizer.token_to_id(t) for t in (BOS, EOS, PAD))
        self.role_ids = {role: tokenizer.token_to_id(token) for role, token in ROLE_TOKENS.items()}

    @property
    def vocab_size(self) -> int:
        """Number of ids in use (special tokens included); a model's embedding needs at least this many rows."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def sha256(self) -> str:
        """Hash of the serialised tokenizer: token shards and checkpoints record it to catch mismatches."""
        return hashlib.sha256(self.to_str().encode()).hexdigest()

    def to_str(self, pretty: bool = False) -> str:
        """The tokenizer.json text. (`encode_special_tokens` is a setting of the loaded object, not part of
        the file: transformers reads the file with special tokens parsed, which its chat template needs.)"""
        return self.tokenizer.to_str(pretty=pretty)

    def _encoder(self, allow_special: bool):
        if not allow_special:
            return self.tokenizer
        if self._parsing is None:
            from tokenizers import Tokenizer as HFTokenizer

            self._parsing = HFTokenizer.from_str(self.to_str())  # parses special tokens, as loaded
        return self._parsing

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Ids of `text`, without <|bos|>/<|eos|> added. Special-token text inside it is plain text unless
        `allow_special` (opt-in, for trusted raw prompts only): then "<|eos|>" becomes the eos id."""
        return self._encoder(allow_special).encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], allow_special: bool = False) -> list[list[int]]:
        """Like `encode` for each text, in parallel over all cores (Rust threads)."""
        return [e.ids for e in self._encoder(allow_special).encode_batch(texts, add_special_tokens=False)]

    def stop_token_ids_for(self, stop: Iterable[str]) -> set[int]:
        """The ids of the special tokens whose text is one of the stop strings `stop`.

        Generated text is decoded with skip_special_tokens, so a model that emits <|user|> adds nothing to
        the text and a stop string "<|user|>" would never match; a generation engine adds these ids to its
        stop tokens. (Plain-text pieces that spell "<|user|>" still match as a string.)
        """
        return {self.tokenizer.token_to_id(s) for s in stop if s in SPECIAL_TOKENS}

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, id: int) -> str | None:
        return self.tokenizer.id_to_token(id)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """(ids, assistant_mask) of a conversation; both lists have the same length.

        The mask is 1 on what the model must learn to produce, the content of each assistant turn and its
        closing <|eos|> (so that it learns to stop), and 0 on everything it is given: <|bos|>, role tokens,
        system and user turns. SFT computes its loss where the mask is 1.
        """
        if not isinstance(messages, (list, tuple)):
            raise DaulatError(f"a conversation is a list of messages, got {type(messages).__name__}")
        ids, mask = [self.bos_id], [0]
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            content = message.get("content") if isinstance(message, dict) else None
            if role not in ROLES or not isinstance(content, str):
                raise DaulatError(f"message {i}: needs 'role' in {ROLES} and a string 'content', got {message!r:.100}")
            body = self.encode(content) + [self.eos_id]
            ids += [self.role_ids[role]] + body
            mask += [0] + [int(role == "assistant")] * len(body)
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return ids, mask

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> list[int]:
        """Ids of a conversation, identical to transformers' `apply_chat_template` with CHAT_TEMPLATE."""
        return self.render_chat(messages, add_generation_prompt)[0]

    def save(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into a directory, each atomically."""
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "extra_special_tokens": list(ROLE_TOKENS.values()),
            "add_bos_token": False, "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length,
            "chat_template": CHAT_TEMPLATE,
        }
        _write_atomic(directory / "tokenizer.json", self.to_str(pretty=True))
        _write_atomic(directory / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        _write_atomic(directory / "chat_template.jinja", CHAT_TEMPLATE)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The tokenizer of a tokenizer or checkpoint directory (or a tokenizer.json file itself)."""
    from tokenizers import Tokenizer as HFTokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise DaulatError(f"tokenizer not found: {file}")
    try:
        tokenizer = HFTokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
        raise DaulatError(f"cannot read tokenizer {file}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    max_length = DEFAULT_MAX_LENGTH
    config_file = file.with_name("tokenizer_config.json")
    if config_file.is_file():
        try:
            max_length = int(json.loads(config_file.read_text(encoding="utf-8")).get("model_max_length", max_length))
        except (ValueError, TypeError, AttributeError) as e:
            raise DaulatError(f"cannot read {config_file}: {e}") from None
    try:
        return Tokenizer(tokenizer, max_length)
    except DaulatError as e:
        raise DaulatError(f"{file}: {e}") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    model_max_length: int = DEFAULT_MAX_LENGTH, show_progress: bool = False) -> Tokenizer:
    """Train a byte-level BPE on an iterable of documents (one pass, streamed).

    `vocab_size` counts everything: 6 special tokens, 256 byte symbols, and the merges learned on top; a
    corpus too small to support that many merges gives a smaller vocabulary (see `Tokenizer.vocab_size`).
    """
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    minimum = len(SPECIAL_TOKENS) + 256
    if not isinstance(vocab_size, int) or not minimum <= vocab_size < 2**32:
        raise DaulatError(f"vocab size must be an integer of at least {minimum} (special tokens + 256 bytes), got {vocab_size}")
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),  # one pre-token per digit
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,  # given first, so they get ids 0..5 in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the data or not
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator(_training_pieces(texts), trainer=trainer)
    return Tokenizer(tokenizer, model_max_length)


_LONG_RUN = re.compile(r"\S{%d}" % TRAINING_PIECE_CHARS)


def _training_pieces(texts: Iterable[str]) -> Iterator[str]:
    """The documents, except that one holding a run of TRAINING_PIECE_CHARS characters without whitespace
    (base64, minified code, a 16 MB line of one letter) is given in pieces of that size: the BPE trainer's
    time grows much faster than linearly with the length of one pre-token (minutes for a 16 MB one), and no
    merge that long is ever useful. Ordinary text is given as it is."""
    for text in texts:
        if len(text) >= TRAINING_PIECE_CHARS and _LONG_RUN.search(text):
            yield from (text[i : i + TRAINING_PIECE_CHARS] for i in range(0, len(text), TRAINING_PIECE_CHARS))
        else:
            yield text


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("--data", nargs="+", metavar="PATH",
                        help="files or folders (.txt .md .jsonl .parquet, .gz of them); PATH:licence=ID sets a licence; "
                             "default: the built-in corpus of task examples")
    parser.add_argument("--vocab-size", type=int, default=8192, help="total vocabulary size (default: %(default)s)")
    parser.add_argument("--out", required=True, help="directory to write tokenizer.json and tokenizer_config.json to")
    parser.add_argument("--text-field", default="text", help="field of .jsonl/.parquet records holding the text (default: %(default)s)")
    parser.add_argument("--min-frequency", type=int, default=2, help="a merge needs at least this many occurrences (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH, help="model_max_length to record (default: %(default)s)")
    parser.add_argument("--builtin-docs", type=int, default=20000, help="documents of the built-in corpus when no --data (default: %(default)s)")
    parser.add_argument("--max-file-bytes", type=int, default=4 << 30,
                        help="skip a file that holds more bytes than this, decompressed (default: %(default)s)")
    parser.add_argument("--max-document-bytes", type=int, default=16 << 20,
                        help="skip a document (text file, JSONL line, Parquet value) larger than this (default: %(default)s)")
    parser.add_argument("--follow-links", action="store_true", help="follow symbolic links that leave a data folder")
    parser.add_argument("--report", action="store_true",
                        help="hold out 1%% of the documents (those the token shards hold out) and print bytes per token "
                             "by language on them (needs the documents extra)")
    from daulat.data.pipeline import add_selection_arguments

    add_selection_arguments(parser)


def run(args) -> int:
    import time

    start = time.time()
    if args.data:
        from types import SimpleNamespace

        from daulat.data.pipeline import training_corpus

        # the settings pretrain's [data] section gives, from this command's flags (cleaning as pretrain does)
        corpus = training_corpus(args.data, SimpleNamespace(**vars(args), clean=True, pii=True, near_duplicates=0.8))
        held_out: list[str] = []
        texts = _holding_out(corpus, held_out) if args.report else corpus
        tokenizer = train_tokenizer(texts, args.vocab_size, args.min_frequency, args.max_length)
        manifest, summary = corpus.manifest, corpus.summary()
    else:
        from daulat.data.tasks import default_corpus

        tokenizer = train_tokenizer(default_corpus(args.builtin_docs, seed=0), args.vocab_size, args.min_frequency, args.max_length)
        manifest = {"builtin": "daulat.data.tasks.default_corpus", "documents": args.builtin_docs, "seed": 0}
        summary = f"built-in corpus, {args.builtin_docs} documents"
    tokenizer.save(args.out)
    info = {"stage": "tokenizer", "vocab_size": tokenizer.vocab_size, "tokenizer_sha256": tokenizer.sha256, "data": manifest}
    _write_atomic(Path(args.out) / "daulat.json", json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    print(f"read {summary}")
    print(f"trained a {tokenizer.vocab_size}-token byte-level BPE in {time.time() - start:.1f}s -> {args.out}")
    if getattr(args, "report", False):
        _print_report(tokenizer, held_out if args.data else [])
    return 0


REPORT_FRACTION, REPORT_DOCUMENTS = 0.01, 2000


def _holding_out(corpus, held_out: list[str]) -> Iterator[str]:
    """The corpus less the documents the shards would hold out (the same hash rule), kept for the report."""
    from daulat.data.shards import is_val_document

    for text in corpus:
        if is_val_document(text, REPORT_FRACTION) and len(held_out) < REPORT_DOCUMENTS:
            held_out.append(text)
        else:
            yield text


def _print_report(tokenizer, held_out: list[str]) -> None:
    from daulat.data.language import bytes_per_token_by_language

    if not held_out:
        print("report: no held-out documents (the corpus is too small, or it is the built-in one)")
        return
    print(f"bytes per token by language, on {len(held_out)} held-out documents:")
    for language, entry in bytes_per_token_by_language(tokenizer, held_out).items():
        print(f"  {language:<8} {entry['bytes_per_token']:>6.2f} bytes/token  ({entry['documents']} documents, "
              f"{entry['bytes']:,} bytes, {entry['tokens']:,} tokens)")
