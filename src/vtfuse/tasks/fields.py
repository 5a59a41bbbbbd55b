"""Checks of the text fields tasks share: a caption or captions, a question, a label."""

from __future__ import annotations

from typing import Any

from vtfuse.data.jsonl import is_str_list


def check_captions(fields: dict[str, Any], labelled: bool) -> str | None:
    """A "caption" string or a "captions" list (required when `labelled`), none of them empty."""
    if "captions" in fields:
        if not is_str_list(fields["captions"]):
            return "field 'captions' must be a non-empty list of strings"
        if not all(c.strip() for c in fields["captions"]):
            return "field 'captions' holds an empty caption"
    elif "caption" in fields:
        return check_text(fields, "caption")
    elif labelled:
        return "missing field 'caption' (or 'captions')"
    return None


def check_text(fields: dict[str, Any], name: str) -> str | None:
    """A required, non-empty string field."""
    if not isinstance(fields.get(name), str):
        return (
            f"missing field '{name}'" if name not in fields else f"field '{name}' must be a string"
        )
    if not fields[name].strip():
        return f"field '{name}' is empty"
    return None


def check_label(fields: dict[str, Any], name: str, labelled: bool) -> str | None:
    """A string field holding the class to predict, required when `labelled`."""
    if labelled and not isinstance(fields.get(name), str):
        return (
            f"missing field '{name}'" if name not in fields else f"field '{name}' must be a string"
        )
    return None
