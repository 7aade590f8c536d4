"""One validation layer for the Python API and the command line.

Each check returns the cleaned value or raises a one-line `GateSkipError` that
names the argument; `cli_type` wraps a check as an argparse type, so a bad
command-line value exits 2 with the same sentence before anything is loaded.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

from gateskip_core.errors import GateSkipError


def whole_number(name: str, value, minimum: int = 1) -> int:
    """An int (not a bool, not 2.5) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise GateSkipError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise GateSkipError(f"{name} must be at least {minimum}, got {value}")
    return value


def rank_of(what: str, text: str) -> int:
    """The R of a 'kind:R' option (a LoRA, low-rank gate or stand-in rank): a whole number >= 1."""
    try:
        rank = int(text)
    except ValueError:
        raise GateSkipError(f"{what} rank must be a whole number, got {text!r}") from None
    if rank < 1:
        raise GateSkipError(f"{what} rank must be at least 1, got {rank}")
    return rank


def kind_and_rank(
    text: str, what: str, kinds: Sequence[str], ranked: str, rank_label: str, default_rank: int = 0
) -> tuple[str, int]:
    """The one parser of the 'kind' | 'kind:R' options (gate variant, adapter, skip fill): `kinds`
    allowed, only `ranked` takes ':R' (a whole number >= 1; `default_rank` when left out, if any).
    Returns (kind, rank), rank 0 for an unranked kind."""
    kind, colon, rank_text = str(text).strip().partition(":")
    if kind not in kinds or (colon and kind != ranked):
        shown = [f"'{k}:R'" if k == ranked else f"'{k}'" for k in kinds]
        raise GateSkipError(f"{what} must be {', '.join(shown[:-1])} or {shown[-1]}, got {text!r}")
    if kind != ranked:
        return kind, 0
    return kind, default_rank if default_rank and not colon else rank_of(rank_label, rank_text)


def positive_number(name: str, value) -> float:
    """A finite number > 0."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise GateSkipError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(number) or number <= 0:
        raise GateSkipError(f"{name} must be a positive finite number, got {value!r}")
    return number


def texts(value, what: str = "text") -> list[str]:
    """One string or a non-empty sequence of strings; anything else is named for what it is."""
    if isinstance(value, str):
        items = [value]
    elif isinstance(value, (bytes, bytearray)):
        raise GateSkipError(f"{what} must be a str, got bytes (decode it first)")
    elif isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        items = list(value)
        if not items:
            raise GateSkipError(f"no {what} given (an empty list)")
    else:
        raise GateSkipError(f"{what} must be a str or a list of str, got {type(value).__name__}")
    for item in items:
        if not isinstance(item, str):
            raise GateSkipError(f"{what} must be a str or a list of str, got an item of type {type(item).__name__}")
        if not item.strip():
            raise GateSkipError(f"{what} is empty")
    return items


def cli_type(check: Callable, flag: str, **kwargs) -> Callable[[str], object]:
    """An argparse type running `check` on the parsed number (int when it looks like one)."""

    def parse(text: str):
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{flag} must be a number, got {text!r}") from None
        try:
            return check(flag, value, **kwargs)
        except GateSkipError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def skip_args_of(args: argparse.Namespace) -> dict:
    """The `SkipArgs` of a call from the skip options every command declares (`cli._add_skip_args`)."""
    return dict(
        skip=args.skip,
        policy=args.policy,
        path=args.path,
        branches=args.branches,
        protect_bos=not args.no_protect_bos,
        seed=args.seed,
        allocation=args.allocation,
        adapter_scope=args.adapter_scope,
    )
