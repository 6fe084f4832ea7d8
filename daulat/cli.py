"""`daulat <command>`: the one entry point of the toolkit.

Each command lives in its own module and exposes `add_arguments(parser)` and `run(args) -> int`.
Modules are imported only when their command runs, so `daulat --help` stays fast and a command's
heavy dependencies (fastapi, matplotlib, gguf) are needed only by that command.

Errors: whatever `daulat.errors.FORESEEN` covers (bad input, a missing or unreadable file, a full disk,
out of memory) is one line on stderr and exit code 2; any other exception is a bug in daulat and says so
in one line with its type, exit code 1; `--debug` shows the traceback of either. Output into a closed
pipe (`daulat card --json | head`) ends quietly, as `head` expects.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys

from daulat import __version__
from daulat.errors import FORESEEN, describe

# name -> (module, one-line help). The order is the order of the pipeline.
COMMANDS: dict[str, tuple[str, str]] = {
    "speedrun": ("daulat.speedrun", "run the whole pipeline: tokenizer, pretrain, SFT, GRPO, distill, eval, report"),
    "corpus": ("daulat.data.pipeline", "turn documents (PDF, Office, HTML, e-mail, code...) into clean, deduplicated JSONL"),
    "tokenizer": ("daulat.tokenizer", "train a byte-level BPE tokenizer on your files"),
    "pretrain": ("daulat.train.pretrain", "pretrain an MLA + MoE model on your files"),
    "sft": ("daulat.train.sft", "supervised fine-tuning on conversations or a built-in task"),
    "grpo": ("daulat.train.grpo", "reinforcement learning with verifiable rewards (GRPO)"),
    "distill": ("daulat.train.distill", "distill a teacher into a smaller student"),
    "tasks": ("daulat.data.tasks", "list the built-in verifiable tasks"),
    "eval": ("daulat.eval", "task accuracy, pass@k and perplexity of a checkpoint"),
    "chat": ("daulat.infer.chat", "chat with a checkpoint in the terminal"),
    "serve": ("daulat.infer.server", "serve a checkpoint over an OpenAI-compatible API with a web chat page"),
    "export": ("daulat.export", "export a checkpoint to GGUF (llama.cpp) or a clean transformers directory"),
    "init": ("daulat.initialize", "write a freshly initialised checkpoint from a preset"),
    "inspect": ("daulat.inspect", "print a checkpoint's architecture, parameter counts and KV-cache size"),
    "card": ("daulat.report", "print a checkpoint's model card"),
}


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*\.[A-Za-z_]\w*=")


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only `command`'s module is imported (to add its arguments)."""
    parser = argparse.ArgumentParser(
        prog="daulat",
        description="Build your own DeepSeek-style language model, end to end, on your own data and hardware.",
    )
    parser.add_argument("--version", action="version", version=f"daulat {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (module_name, help_text) in COMMANDS.items():
        if not _available(module_name):
            continue
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show the full traceback on errors")
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(command)
    args, extra = parser.parse_known_args(argv)
    # `section.key=value` overrides may stand anywhere, e.g. between a command's options
    if extra and hasattr(args, "overrides") and all(_OVERRIDE.match(e) for e in extra):
        args.overrides = list(args.overrides or []) + extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        parser.print_help()
        return 0
    return _run(args)


def _run(args) -> int:
    """The command's exit code, with its errors turned into one line (see the module's docstring)."""
    debug = getattr(args, "debug", False)
    try:
        code = int(args._module.run(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler, not at exit
        return code
    except KeyboardInterrupt:
        print("daulat: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`| head`): silence the rest of the output, as other command-line tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by the closed pipe
    except FORESEEN as e:
        if debug:
            raise
        print(f"daulat {args.command}: error: {describe(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if debug:
            raise
        message = " ".join(str(e).split())[:300]
        print(f"daulat {args.command}: internal error (a bug in daulat; please report it, with the output of "
              f"--debug): {type(e).__name__}{': ' + message if message else ''}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
