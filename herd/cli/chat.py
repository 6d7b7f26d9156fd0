"""`herd chat`: an interactive conversation, with images for a Llama 3.2 Vision checkpoint."""

from __future__ import annotations

import json
import sys

from herd.cli.common import load, sampling


def cmd_chat(opts) -> None:
    from herd.model.mllama_io import is_mllama_dir

    if opts.image or is_mllama_dir(opts.path):
        from herd.generate.vision import VisionChatSession, load_vision_for_inference

        if opts.system is not None:
            raise ValueError("a Llama 3.2 Vision chat takes no system message (the released chat template refuses "
                             "one next to images); drop --system")
        lm = load_vision_for_inference(opts.path, tokenizer=opts.tokenizer, dtype=opts.dtype, device=opts.device)
        session = VisionChatSession(lm, sampling=sampling(opts), max_new_tokens=opts.max_new_tokens)
        if opts.image:
            session.attach(opts.image)
        _chat_loop(session, images=True)
        return
    from herd.generate.session import ChatSession

    lm = load(opts)
    session = ChatSession(lm.model, lm.tokenizer, chat=lm.chat, system=opts.system, sampling=sampling(opts),
                          max_new_tokens=opts.max_new_tokens)
    _chat_loop(session, images=False)


def _chat_loop(session, *, images: bool) -> None:
    extra = "; /image FILE attaches an image to your next message" if images else ""
    print(f"herd chat: type a message; /reset clears the history{extra}; Ctrl-D quits.", file=sys.stderr)
    if images and session.pending:
        print(f"({len(session.pending)} image(s) attached to your first message)", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return
        if not line.strip():
            continue
        if line.strip() == "/reset":
            session.reset()
            print("(history cleared)", file=sys.stderr)
            continue
        if images and line.strip().startswith("/image"):
            files = line.strip()[len("/image"):].split()
            try:
                if not files:
                    raise ValueError("/image needs a file: /image photo.png")
                n = session.attach(files)
            except (OSError, ValueError) as e:
                print(f"(error: {e})", file=sys.stderr)
                continue
            print(f"({n} image(s) attached to your next message)", file=sys.stderr)
            continue
        print("llama> ", end="", flush=True)
        try:
            for piece in session.send(line):
                print(piece, end="", flush=True)
        except ValueError as e:  # one bad turn (e.g. too long for the context) keeps the session
            print(f"\n(error: {e})", file=sys.stderr)
            continue
        print()
        if session.last_reply and session.last_reply.tool_calls:
            for call in session.last_reply.tool_calls:
                print(f"(tool call: {call.name}({json.dumps(call.arguments)}))", file=sys.stderr)
