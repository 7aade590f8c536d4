"""The texts calibrated thresholds are fitted on after training (and by `gateskip fit-fill`,
`gateskip calibrate`, scripts/recalibrate.py): one place, so that every fit uses the same set."""

from __future__ import annotations

from collections.abc import Callable

from gateskip_core.data import paragraphs, pydoc_texts
from gateskip_core.model import GatedModel
from gateskip_core.training.chat_data import chat_prompts, instruction_answers


def calibration_texts(gm: GatedModel, progress: Callable[[str], None] = lambda m: None) -> list[str]:
    """Calibration texts, each fitted as its own sequence: paragraphs of the pydoc calibration split
    and, for chat models, the model's own chat transcripts and chat prompts as users send them
    (rendered with the chat template), interleaved so every kind is in the fitted batch."""
    prose = [p for t in pydoc_texts("calibration") for p in paragraphs(t)]
    if not gm.tokenizer.chat_template:
        return prose
    transcripts = [t for i, t in enumerate(instruction_answers(gm, progress)) if i % 6 == 1]
    prompts = [
        gm.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in chat_prompts()[5::11]
    ]
    groups = list(zip(prose[::2], prose[1::2], transcripts, prompts))  # two paragraphs, a transcript, a prompt
    return [text for group in groups for text in group] + prose[2 * len(groups) :]
