"""OpenAssistant (OASST1) message trees -> guanaco conversations.

Input is the nested tree export (`*.trees.jsonl`): one tree per line, `prompt` is the root `prompter` message and
every message has `role`, `text` and `replies`; ranked replies carry `rank` (0 = best). Guanaco was made by
following the best-ranked reply at each step from the root, so `best_thread` does exactly that; `all_threads`
returns every root-to-leaf thread instead.

Choices, so the output is predictable:
- A reply is eligible when its role alternates with its parent's and it is neither `deleted` nor failed review
  (`review_result` false). Wrong-role replies do not occur in the export; they would simply never be followed.
- Among eligible replies the lowest `rank` wins; unranked replies come after ranked ones; ties keep file order.
  Prompter follow-ups are ranked the same way when they carry a rank, else the first one is taken.
- A thread that ends on an unanswered prompter message drops that message (noted, as for guanaco rows).

Deliberately left out: the flat message export (`*.messages.jsonl`, messages linked by `parent_id`), language
filters, and quality filters beyond the two above.
"""

from __future__ import annotations

from .guanaco import ASSISTANT, HUMAN, TRAILING_HUMAN, BadRow, Turn, check_conversation

_ROLES = {"prompter": HUMAN, "assistant": ASSISTANT}


def is_tree(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("prompt"), dict)


def _eligible_replies(message: dict) -> list[dict]:
    want = "assistant" if message.get("role") == "prompter" else "prompter"
    replies = [r for r in (message.get("replies") or [])
               if isinstance(r, dict) and r.get("role") == want
               and not r.get("deleted", False) and r.get("review_result", True) is not False]
    # sorted() is stable, so equal keys keep file order.
    return sorted(replies, key=lambda r: (r.get("rank") is None, r.get("rank") or 0))


def _to_conversation(path: list[dict]) -> tuple[list[Turn], list[str]]:
    notes = []
    if path and path[-1].get("role") == "prompter" and len(path) > 1:
        path = path[:-1]
        notes.append(TRAILING_HUMAN)
    turns = []
    for m in path:
        text = m.get("text")
        if not isinstance(text, str):
            raise BadRow("missing text field", f"message {m.get('message_id', '?')} has no text")
        turns.append(Turn(_ROLES[m["role"]], text.strip()))
    check_conversation(turns)
    return turns, notes


def _root(tree) -> dict:
    if not is_tree(tree):
        raise BadRow("not a message tree", "no `prompt` object (expected the nested OASST trees export)")
    root = tree["prompt"]
    if root.get("role") != "prompter":
        raise BadRow("turns out of order", f"the root message has role {root.get('role')!r}, expected prompter")
    if root.get("deleted", False) or root.get("review_result", True) is False:
        raise BadRow("deleted or rejected root", "the root prompt is deleted or failed review")
    return root


def best_thread(tree: dict) -> tuple[list[Turn], list[str]]:
    """The conversation guanaco keeps from one tree: the best-ranked reply at every step. Raises BadRow."""
    message = _root(tree)
    path = [message]
    while replies := _eligible_replies(message):
        message = replies[0]
        path.append(message)
    return _to_conversation(path)


def all_threads(tree: dict) -> tuple[list[list[Turn]], list[str]]:
    """Every root-to-leaf thread of a tree, best-ranked first, exact duplicates removed.

    An unusable thread is skipped and noted; BadRow is raised only when no thread of the tree is usable.
    """
    root = _root(tree)
    paths, stack = [], [[root]]
    while stack:  # depth-first, best reply first, so the first thread is best_thread's
        path = stack.pop()
        replies = _eligible_replies(path[-1])
        if not replies:
            paths.append(path)
        stack.extend(path + [r] for r in reversed(replies))
    conversations, notes, first_error = [], [], None
    for path in paths:
        try:
            conv, n = _to_conversation(path)
        except BadRow as e:
            # A thread that ends right after the root prompt (no answer on that branch) is not a loss:
            # the other threads of the tree still count.
            first_error = first_error or e
            notes.append(f"thread skipped ({e.reason})")
            continue
        if conv not in conversations:
            conversations.append(conv)
            notes.extend(n)
    if not conversations:
        raise first_error
    return conversations, notes
