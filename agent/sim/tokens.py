"""The SIMULATED engine's tokenizer: deterministic token IDs for prompts, a fixed chat template, and
the IDs of the tokens it generates.

- A prompt word becomes one ID, a stable hash of the word in [WORD_TOKEN_BASE_ID, GENERATED_TOKEN_BASE_ID).
- Generated token number k (text "tok{k}", with a leading space unless it starts the answer) has the
  ID GENERATED_TOKEN_BASE_ID + k; the word "tok{k}" in a prompt tokenizes to that same ID, so an
  answer fed back as text or as IDs is recognised alike. A word that ends with "tok{k}" ("Hi!tok0",
  an answer appended without a space) is two tokens.
- The chat template: per message `<role> content... <end_of_turn>`, then `<assistant>` when a
  generation prompt is added; with continue_final_message the final message stays open (no
  `<end_of_turn>`), so its content is where the answer continues.
- Greedy output is a pure function of the prompt IDs: if they end with tok0..tok{n-1} the answer
  continues at tok{n}, else it starts at tok0 (see `continuation_index`).
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence

EOS_TOKEN_ID = 2
END_OF_TURN_TOKEN_ID = 3
ROLE_TOKEN_IDS = {"system": 10, "user": 11, "assistant": 12, "tool": 13, "developer": 14, "function": 15}
WORD_TOKEN_BASE_ID = 1_000
GENERATED_TOKEN_BASE_ID = 100_000
GENERATED_TOKEN_SPAN = 1_000_000  # tok0 .. tok999999 have IDs of their own
VOCAB_SIZE_TOKENS = GENERATED_TOKEN_BASE_ID + GENERATED_TOKEN_SPAN
_WORD_ID_SPAN = GENERATED_TOKEN_BASE_ID - WORD_TOKEN_BASE_ID
_GENERATED_WORD = re.compile(r"(.*?)tok(\d+)", re.DOTALL)


def generated_token_id(index: int) -> int:
    return GENERATED_TOKEN_BASE_ID + index


def generated_index(token_id: int) -> int | None:
    """k when `token_id` is the ID of generated token tok{k}, else None."""
    k = token_id - GENERATED_TOKEN_BASE_ID
    return k if 0 <= k < GENERATED_TOKEN_SPAN else None


def generated_text(index: int, first: bool, leading_space: bool) -> str:
    """The text of generated token number `index`: "tok{k}", space-separated from what precedes it."""
    sep = " " if (not first or leading_space) else ""
    return f"{sep}tok{index}"


def _word_id(word: str) -> int:
    return WORD_TOKEN_BASE_ID + zlib.crc32(word.encode("utf-8", "surrogatepass")) % _WORD_ID_SPAN


def tokenize(text: str) -> list[int]:
    """The token IDs of a prompt text (whitespace-separated words)."""
    ids: list[int] = []
    for word in text.split():
        m = _GENERATED_WORD.fullmatch(word)
        if m is not None and int(m.group(2)) < GENERATED_TOKEN_SPAN:
            if m.group(1):
                ids.append(_word_id(m.group(1)))
            ids.append(generated_token_id(int(m.group(2))))
        else:
            ids.append(_word_id(word))
    if not ids and text:
        ids.append(_word_id(text))  # whitespace alone is one token, as with a real tokenizer
    return ids


def chat_prompt_ids(
    messages: Iterable[tuple[str, str]], add_generation_prompt: bool, continue_final_message: bool
) -> list[int]:
    """The fixed chat template over (role, text) messages."""
    turns = list(messages)
    ids: list[int] = []
    for i, (role, text) in enumerate(turns):
        ids.append(ROLE_TOKEN_IDS[role])
        ids.extend(tokenize(text))
        if not (continue_final_message and i == len(turns) - 1):
            ids.append(END_OF_TURN_TOKEN_ID)
    if add_generation_prompt:
        ids.append(ROLE_TOKEN_IDS["assistant"])
    return ids


def continuation_index(ids: Sequence[int]) -> int:
    """n when `ids` end with the IDs of tok0 tok1 ... tok{n-1} (an answer of ours fed back), else 0."""
    run: list[int] = []
    for token_id in reversed(ids):
        k = generated_index(token_id)
        if k is None:
            break
        run.append(k)
        if k == 0:
            break  # the start of an answer: enough to decide
    run.reverse()
    if not run:
        return 0
    n = run[-1] + 1  # the run must be a whole answer: tok0, tok1, ... consecutive up to the last token
    return n if run == list(range(n)) else 0
