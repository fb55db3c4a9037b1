"""argparse's private API: a parser's actions, its help sections and its option table.

Written against the standard library of Python 3.11. ``ArgumentParser`` keeps every action in
``_actions``, its help sections (argument groups, with ``title`` and ``description``) in
``_action_groups`` and every option string in ``_option_string_actions`` (option string ->
action); argparse has no public way to list them. The ``bayesq`` command's parser reads them to
rewrite help strings and to suggest the closest option.
"""

from __future__ import annotations

import argparse
from typing import Any

PACKAGE, VERSION = "argparse", "3.11"
ATTRIBUTES = (("ArgumentParser", "_actions"), ("ArgumentParser", "_action_groups"),
              ("ArgumentParser", "_option_string_actions"))
"""Private attributes of argparse's parser read here: class, name."""


def actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every action of ``parser``, in the order they were added (help included)."""
    return list(parser._actions)


def help_sections(parser: argparse.ArgumentParser) -> list[Any]:
    """The argument groups ``parser``'s help prints, each with ``title`` and ``description``."""
    return list(parser._action_groups)


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every option string ``parser`` accepts (``-h``, ``--help``, ``--config``, ...)."""
    return list(parser._option_string_actions)
