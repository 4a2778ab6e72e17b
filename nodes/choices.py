"""Refusing, when a prompt is queued, values that are not in a choice list of the pack's nodes.

ComfyUI checks list-typed inputs of V1 nodes in ``execution.py``'s ``validate_inputs`` (a saved
workflow naming a file that is not there gets a "Value not in list" error at queue time, before
anything runs). On 0.3.64 a V3 ``io.Combo`` input is typed ``"COMBO"`` and not checked there;
the 0.38 line checks it against its ``options`` (Comfy-Org/ComfyUI ``execution.py`` 04e2a914)
unless the node's own ``validate_inputs`` takes that input. So each pack node with a file list
has a ``validate_inputs`` that takes exactly its file lists and calls :func:`refuse_unlisted`:
the same check on both lines, with a message that says where the files come from and what to
do. Linked inputs are not known at queue time (ComfyUI passes None): they are not checked.

Only file lists: ComfyUI reports a failed ``validate_inputs`` once per input it takes, each line
prefixed with that input's name, so taking the fixed lists too (scale, dtype, backend ...) would
repeat a missing file's message under their names. Those lists change only with the pack: the
0.38 line checks them itself, and on 0.3.64 the node refuses a value it does not know when it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from comfy_api.latest import io


def check_choices(node: type[io.ComfyNode], **values: object) -> None:
    """Raise ``ValueError`` with the reason when a fixed choice is not in its list (for the lists
    :func:`refuse_unlisted` leaves to the node itself)."""
    refused = refuse_unlisted(node, values)
    if refused is not True:
        raise ValueError(refused)


def refuse_unlisted(node: type[io.ComfyNode], values: Mapping[str, object],
                    hints: Mapping[str, str | Callable[[object], str]] | None = None) -> bool | str:
    """True when every value in ``values`` is in its choice list as the node lists it now, else
    the reason (``hints``: what to do about a missing value of an input, e.g. where its files come
    from; or a function of the value that says it)."""
    choices = {item.id: item for item in node.define_schema().inputs if isinstance(item, io.Combo.Input)}
    problems = []
    for name, value in values.items():
        item = choices[name]
        if value is None or value in item.options:
            continue
        label = item.display_name or name
        listed = ", ".join(map(str, item.options[:8])) + (", ..." if len(item.options) > 8 else "")
        hint = (hints or {}).get(name, "choose one of the list")
        hint = hint(value) if callable(hint) else hint
        problems.append(f"{label}: {value!r} is not in the list ({listed or 'empty'}); {hint}")
    return True if not problems else "; ".join(problems)
