"""A conversation as the model was trained to read it: earlier turns and the question rendered
through the run's own question/answer template (``QA_TEMPLATE``), and where an answer ends."""

from __future__ import annotations

from collections.abc import Sequence

from lmtrain.data.qa_format import QATemplate
from lmtrain.data.tokenizers import Tokenizer, document_separator


def chat_prompt(template: QATemplate, turns: Sequence[tuple[str, str]], question: str,
                tokenizer: Tokenizer) -> str:
    """The earlier ``(question, answer)`` turns, each followed by the end of text, then the
    question up to the answer (``QUESTION: ... ANSWER:``), as a training record renders."""
    return template.render(list(turns), document_separator(tokenizer)) + template.prompt(question)


def chat_stops(template: QATemplate, tokenizer: Tokenizer) -> list[str]:
    """Where an answer ends besides the end-of-text token: where the next record would start
    (``QUESTION:``), and a blank line for a vocabulary without an end-of-text token."""
    head = template.text.split("{question}", 1)[0].strip()
    stops = [head] if head else []
    if tokenizer.eot_id is None:
        stops.append(document_separator(tokenizer))
    return stops


def hold_whitespace(text: str, started: bool) -> tuple[str, str]:
    """What to show now of a streamed answer's next ``text`` (an answer is shown stripped):
    without leading whitespace until the answer has ``started``, and without the trailing
    whitespace, which is held back (second) until more text follows it."""
    if not started:
        text = text.lstrip()
    body = text.rstrip()
    return body, text[len(body):]
