"""lm_eval's Hugging Face model wrapper around a model PrefFlow loaded, prompting through PrefFlow's chat rendering.

Imports lm_eval at module level: import this module only after ``steps.evaluate.harness.require_lm_eval``.
"""

from __future__ import annotations

from typing import Any

from lm_eval.models.huggingface import HFLM

from steps.chat import render_prompt


class PrefflowLM(HFLM):
    """HFLM over an already loaded model and tokenizer (one load path for every PrefFlow evaluation).

    Chat prompts that end with the assistant header are rendered by ``steps.chat.render_prompt``, as the
    AlpacaEval answers are: the tokenizer's template when it has one (what lm_eval would do too), and the Llama-3
    format for a Llama-3 base tokenizer without a template (where lm_eval alone would fail). A prompt that
    continues an assistant turn (a task's ``gen_prefix``) is lm_eval's own rendering.
    """

    def __init__(self, model: Any, tokenizer: Any, batch_size: int) -> None:
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if add_generation_prompt and not self.chat_template_args:
            return render_prompt(self.tokenizer, chat_history)
        return str(super().apply_chat_template(chat_history, add_generation_prompt))
