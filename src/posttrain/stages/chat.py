"""``posttrain chat``: talk to a model through the same rendering path as training.

One-shot with ``--prompt "..."``, otherwise an interactive loop on stdin (``/reset`` clears the history,
``/exit`` or end-of-input quits).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from posttrain.plumbing.config import chat_template_option, device_option, option


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


def run_chat(config: ChatConfig) -> None:
    from posttrain.models import load_causal_lm, load_tokenizer, resolve_device
    from posttrain.models.generation import generate

    if not config.model:
        from posttrain.stages.world import ensure_world

        config.model = str(ensure_world(base_model=True).base_model)
    tokenizer = load_tokenizer(config.model, config.chat_template or None)
    model = load_causal_lm(config.model, device=resolve_device(config.device))
    history: list[dict] = [{"role": "system", "content": config.system}] if config.system else []

    def reply(text: str) -> str:
        history.append({"role": "user", "content": text})
        completion = generate(model, tokenizer, [history], max_new_tokens=config.max_new_tokens,
                              temperature=config.temperature, top_p=config.top_p, seed=config.seed)[0]
        history.append({"role": "assistant", "content": completion.text})
        return completion.text

    if config.prompt:
        print(reply(config.prompt))
        return
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {config.model} (/reset clears the history, /exit quits)")
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            del history[1 if config.system else 0 :]
            continue
        if line.strip():
            print(("model> " if interactive else "") + reply(line.strip()), flush=True)
