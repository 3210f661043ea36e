"""``posttrain chat``: talk to a model through the same rendering path as training.

One-shot with ``--prompt "..."``, otherwise an interactive loop on stdin (``/reset`` clears the history,
``/exit`` or end-of-input quits).

A harmony model (``--chat_template harmony``) replies in channels: its final answer is printed as the reply (on
stdout), its reasoning as ``thinking: ...`` and its tool calls as ``tool call: NAME({...})`` on stderr (dimmed on a
terminal), and the history keeps the reply as posttrain's assistant message (content, reasoning, tool calls), so the
renderer drops earlier turns' reasoning as harmony prescribes. ``/tool RESULT`` answers the model's pending tool call
with RESULT and lets it go on.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from posttrain.plumbing.config import chat_template_option, device_option, option

DIM, RESET = "\033[2m", "\033[0m"


@dataclass
class ChatConfig:
    model: str = option("", "local model directory; empty = the tiny world's base model")
    prompt: str = option("", "one-shot: reply to this message and exit; empty = interactive")
    system: str = option("", "optional system message")
    chat_template: str = chat_template_option()
    max_new_tokens: int = option(128, "reply length budget in tokens", minimum=1)
    temperature: float = option(0.0, "0 = greedy")
    top_p: float = option(1.0, "nucleus sampling threshold (with temperature > 0)", above=0, maximum=1)
    seed: int = option(0, "sampling seed")
    device: str = device_option()


def _pending_call(history: list[dict]) -> dict | None:
    """The first tool call of the last assistant message that no tool message after it answers yet."""
    last = max((i for i, m in enumerate(history) if m["role"] == "assistant"), default=None)
    if last is None:
        return None
    calls = history[last].get("tool_calls") or []
    answered = sum(m["role"] == "tool" for m in history[last + 1:])
    return calls[answered] if answered < len(calls) else None


def _aside(text: str) -> None:
    """What the model thought or called, beside its reply: on stderr, dimmed on a terminal."""
    print(f"{DIM}{text}{RESET}" if sys.stderr.isatty() else text, file=sys.stderr, flush=True)


def run_chat(config: ChatConfig) -> None:
    from posttrain.data.harmony import parse_completion, parsed_message
    from posttrain.data.render import uses_harmony
    from posttrain.models import load_causal_lm, load_tokenizer, resolve_device
    from posttrain.models.generation import generate

    if not config.model:
        from posttrain.stages.world import ensure_world

        config.model = str(ensure_world(base_model=True).base_model)
    tokenizer = load_tokenizer(config.model, config.chat_template or None)
    model = load_causal_lm(config.model, device=resolve_device(config.device))
    harmony = uses_harmony(tokenizer)
    history: list[dict] = [{"role": "system", "content": config.system}] if config.system else []

    def reply(message: dict) -> str | None:
        """The model's reply to ``message`` (its final answer for harmony; None when it only called a tool)."""
        history.append(message)
        completion = generate(model, tokenizer, [history], max_new_tokens=config.max_new_tokens,
                              temperature=config.temperature, top_p=config.top_p, seed=config.seed)[0]
        parsed = parse_completion(tokenizer, completion) if harmony else None
        if parsed is None:
            history.append({"role": "assistant", "content": completion.text})
            return completion.text
        history.append(parsed_message(parsed))
        if parsed["analysis"]:
            _aside(f"thinking: {parsed['analysis']}")
        for call in parsed["tool_calls"]:
            arguments = call["function"]["arguments"]
            shown = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            _aside(f"tool call: {call['function']['name']}({shown})")
        if parsed["called"]:
            _aside("(answer it with /tool RESULT)")
            return parsed["final"]
        if parsed["final"] is None:
            cut = completion.finish_reason == "length"
            _aside("(no final answer: " + ("cut at --max_new_tokens)" if cut else "the reply ended without one)"))
        return parsed["final"] or ""

    if config.prompt:
        if (text := reply({"role": "user", "content": config.prompt})) is not None:
            print(text)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {config.model} (/reset clears the history, /exit quits"
              + (", /tool RESULT answers a tool call)" if harmony else ")"))
    while True:
        try:
            line = input("you> " if interactive else "").strip()
        except EOFError:
            break
        if line == "/exit":
            break
        if line == "/reset":
            del history[1 if config.system else 0 :]
            continue
        if line == "/tool" or line.startswith("/tool "):
            call = _pending_call(history)
            if call is None:
                _aside("no tool call is waiting for a result")
                continue
            message = {"role": "tool", "name": call["function"]["name"], "content": line.removeprefix("/tool").strip()}
        elif line:
            message = {"role": "user", "content": line}
        else:
            continue
        if (text := reply(message)) is not None:
            print(("model> " if interactive else "") + text, flush=True)
