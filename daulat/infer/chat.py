"""`daulat chat CKPT`: talk to a checkpoint in the terminal, the reply streamed as it is generated.

    daulat chat runs/sft                      # interactive: /clear starts over, /quit (or Ctrl-D) exits
    daulat chat runs/sft -p "What is 7*8?"    # one-shot: print the reply and exit

The conversation is rendered with the checkpoint's chat template each turn; when it outgrows the
context, the oldest turns are dropped (the system prompt is kept).
"""

from __future__ import annotations

import sys

from daulat.precision import HOLD_DTYPES, HOLD_HELP, hold
from daulat.threads import set_threads, threads_argument

HELP = "/clear starts a new conversation, /quit (or Ctrl-D) exits"


def add_arguments(p) -> None:
    p.add_argument("checkpoint", help="checkpoint directory (with its tokenizer)")
    p.add_argument("-p", "--prompt", help="one-shot: answer this message, print the reply and exit")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=0.95, help="(default: %(default)s)")
    p.add_argument("--top-k", type=int, default=0, help="0 is off (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=512, help="most new tokens per reply (default: %(default)s)")
    p.add_argument("--seed", type=int, help="seed for reproducible replies (default: random)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=list(HOLD_DTYPES), help=HOLD_HELP)
    p.add_argument("--threads", type=threads_argument, default="auto", metavar="N|auto",
                   help="torch CPU threads (default: auto, the cores not busy; see daulat.threads)")


class Chat:
    """A conversation with an engine: the history, and one streamed reply per user message."""

    def __init__(self, engine, params, system: str | None = None, out=None):
        # sys.stdout as it is when the chat starts, not when this module was first imported
        self.engine, self.params, self.system, self.out = engine, params, system, out or sys.stdout
        self.history: list[dict] = []

    def clear(self) -> None:
        self.history.clear()

    def _prompt(self) -> list[int]:
        """The rendered conversation, dropping the oldest turns until it leaves room to answer."""
        tokenizer = self.engine.tokenizer
        while True:
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            if len(ids) < self.engine.max_model_len or len(self.history) <= 1:
                return ids
            self.history = self.history[2:] if len(self.history) > 2 else self.history[1:]

    def reply(self, message: str) -> str:
        from daulat.infer.engine import InvalidParameter

        self.history.append({"role": "user", "content": message})
        try:
            prompt = self._prompt()
            self.engine.encode(prompt)
        except InvalidParameter as e:
            self.history.pop()
            raise InvalidParameter("prompt", f"the message is too long for this model: {e}") from None
        text = ""
        stream = self.engine.stream(prompt, self.params)
        try:
            for delta in stream:
                text += delta.text
                self.out.write(delta.text)
                self.out.flush()
        finally:  # Ctrl-C stops the reply; what was said so far stays in the conversation
            stream.close()
            self.out.write("\n")
            self.out.flush()
            self.history.append({"role": "assistant", "content": text})
        return text


def run(args) -> int:
    from daulat.checkpoint import load_checkpoint
    from daulat.errors import DaulatError
    from daulat.infer.engine import Engine, SamplingParams

    set_threads(args.threads)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_tokens=args.max_tokens, seed=args.seed)
    dtype, fp8_resident = hold(args.dtype)
    model, tokenizer, _ = load_checkpoint(args.checkpoint, device=args.device, dtype=dtype, need_tokenizer=True,
                                          fp8_resident=fp8_resident)
    chat = Chat(Engine(model, tokenizer, max_num_seqs=1), params, args.system)

    if args.prompt is not None:
        chat.reply(args.prompt)
        return 0

    print(f"daulat chat: {args.checkpoint} ({HELP})", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        command = line.strip()
        if not command:
            continue
        if command in ("/quit", "/exit"):
            return 0
        if command == "/clear":
            chat.clear()
            print("(new conversation)", file=sys.stderr)
            continue
        if command.startswith("/") and " " not in command:
            print(f"unknown command {command}: {HELP}", file=sys.stderr)
            continue
        try:
            chat.reply(line)
        except KeyboardInterrupt:
            print("(stopped)", file=sys.stderr)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
