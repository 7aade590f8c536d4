"""Training text: pydoc prose and, for chat models, the model's own answers to fixed chat prompts.

The prompts (`chat_prompts`: fixed instructions plus topic x template prompts) also serve the
calibration texts and the benchmarks; the answers are generated once per model and cached.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from gateskip_core.backbone.registry import cache_root
from gateskip_core.data import pydoc_texts
from gateskip_core.files import atomic_write
from gateskip_core.model import GatedModel

INSTRUCTIONS = [
    "Explain what a hash table is in two sentences.",
    "Write a short poem about autumn leaves.",
    "Give three tips for learning a new language.",
    "What is the difference between weather and climate?",
    "Summarise the plot of Romeo and Juliet briefly.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Suggest a name for a friendly robot and explain it.",
    "List the planets of the solar system in order.",
    "What are the benefits of regular exercise?",
    "Describe how a bicycle works.",
    "Translate 'good morning, how are you?' into French.",
    "What is 17 times 23? Show your steps.",
    "Write a polite email declining a meeting invitation.",
    "Explain photosynthesis to a ten-year-old.",
    "What should I pack for a weekend hiking trip?",
    "Give an example of a metaphor and explain it.",
    "How does a binary search work?",
    "What causes earthquakes?",
    "Write a haiku about the sea.",
    "Compare cats and dogs as pets.",
    "What is the capital of Australia, and why is it not Sydney?",
    "Describe the water cycle.",
    "Give me a recipe for a simple tomato sauce.",
]

# Varied prompts for the model's own answers (training data that looks like what chat users see).
TOPICS = [
    "volcanoes",
    "the French Revolution",
    "black holes",
    "compound interest",
    "sourdough bread",
    "honeybees",
    "the stock market",
    "recursion in programming",
    "the immune system",
    "jazz music",
    "electric cars",
    "the Roman Empire",
    "machine learning",
    "coral reefs",
    "chess openings",
    "the human heart",
    "sleep",
    "public speaking",
    "renewable energy",
    "the printing press",
    "octopuses",
    "time management",
    "rainbows",
    "the Moon landing",
    "vaccines",
    "gardening tomatoes",
    "the internet",
    "Shakespeare",
    "glaciers",
    "coffee",
    "a job interview",
    "saving money",
    "the Olympic Games",
    "photosynthesis in algae",
    "dinosaurs",
    "writing a résumé",
    "the speed of light",
    "origami",
    "democracy",
    "friendship",
]

TEMPLATES = [
    "Explain {t} to a beginner.",
    "Write a short story that involves {t}.",
    "What are three surprising facts about {t}?",
    "Give me practical advice related to {t}.",
    "Write a short dialogue between two friends about {t}.",
    "What are the pros and cons of {t}?",
]

ANSWERS_VERSION = "v2"


def chat_prompts() -> list[str]:
    """The 24 fixed instructions plus topic x template prompts (264 in all), in a fixed order."""
    return INSTRUCTIONS + [template.format(t=topic) for topic in TOPICS for template in TEMPLATES]


def builtin_texts(gm: GatedModel, split: str, progress: Callable[[str], None], chat_share: float = 0.0) -> list[str]:
    """pydoc prose, plus (instruction-tuned models) the model's own chat answers, cached. With
    `chat_share`, the answers repeat until they are at least that share of the characters."""
    texts = pydoc_texts(split)
    if gm.tokenizer.chat_template and split in ("train", "validation"):
        answers = [
            t for i, t in enumerate(instruction_answers(gm, progress)) if (i % 6 == 0) == (split == "validation")
        ]
        if chat_share > 0:
            prose, chat = sum(map(len, texts)), sum(map(len, answers))
            repeats = max(1, math.ceil(chat_share * prose / ((1 - chat_share) * max(1, chat))))
            answers = answers * repeats
            share = repeats * chat / (repeats * chat + prose)
            progress(f"chat answers: {share:.0%} of the {split} text ({repeats} pass(es) over {chat:,} characters)")
        # Interleave, so that every stretch of training blocks mixes prose and chat.
        mixed, step = [], max(1, len(texts) // max(1, len(answers)))
        for i, answer in enumerate(answers):
            mixed.extend(texts[i * step : (i + 1) * step])
            mixed.append(answer)
        texts = mixed + texts[len(answers) * step :]
    return texts


def instruction_answers(
    gm: GatedModel, progress: Callable[[str], None], max_new_tokens: int = 96, batch_size: int = 16
) -> list[str]:
    """The model's own answers to `chat_prompts()`, formatted with its chat template (generated once, cached)."""
    path = cache_root() / "data" / f"{Path(gm.name).name}-answers-{ANSWERS_VERSION}.json"
    if path.is_file():
        return json.loads(path.read_text())
    prompts = chat_prompts()
    progress(f"generating the model's answers to {len(prompts)} prompts (one time)")
    plain = gm.view()
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        answers += plain.generate(prompts[start : start + batch_size], max_new_tokens=max_new_tokens, chat=True).text
    texts = []
    for instruction, answer in zip(prompts, answers):
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": answer.strip()}]
        texts.append(gm.tokenizer.apply_chat_template(messages, tokenize=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(texts)))
    return texts
