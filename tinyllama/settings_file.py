"""A command's settings kept in a file: `--config FILE` (YAML or JSON) for any argparse command, and settings written
back as YAML (`train.py --print-config`).

    parse_with_file(parser, argv)   # the file's values become the flags' defaults, so flags on the line win

The keys are the flags' names, with `-` or `_` (`grad-accum`, `grad_accum`); a value has the flag's type (a bool
for a switch, an integer, a number, a string, one of its choices), or null where the flag's default is None. What
is wrong with a file is refused in one line naming the file (and the YAML line, or the closest valid key), before
the command does anything else. The parser decides what exists: a flag added to a command (or a field added to a
settings dataclass that generates its flags) can be set in a file with no change here.

Deliberately left out: files that include other files, environment variables inside values, and lists for the
comma-separated settings (`targets: q_proj,v_proj`, as on the command line).
"""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path

SUFFIXES = {".yaml": "YAML", ".yml": "YAML", ".json": "JSON"}
# The flags a file cannot set: its own, and what only makes sense typed by hand.
NOT_IN_FILES = ("help", "config", "print_config")


class SettingsFileError(ValueError):
    """What is wrong with a settings file, in one line naming it."""


def add_config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="settings from a YAML (.yaml, .yml) or JSON file, keyed "
                        "by these flags' names (- or _); flags given here override it")


def parse_with_file(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with `--config FILE`'s values as the defaults. A bad file ends the command as
    argparse ends it for a bad flag (status 2), with one line on stderr."""
    required = [a for a in parser._actions if a.required]
    for action in required:  # the file may give them: asked for once it is read
        action.required = False
    args = parser.parse_args(argv)
    for action in required:
        action.required = True
    if not getattr(args, "config", None):
        return parser.parse_args(argv) if required else args
    try:
        values = file_values(parser, read_settings_file(args.config), args.config)
    except SettingsFileError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    for action in parser._actions:  # a value from the file satisfies a required flag
        if action.dest in values:
            action.required = False
    parser.set_defaults(**values)
    return parser.parse_args(argv)


def read_settings_file(path: str | Path) -> dict:
    """The mapping a YAML or JSON file holds (an empty file holds none)."""
    path = Path(path)
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise SettingsFileError(f"--config {path}: expected a .yaml, .yml or .json file")
    try:
        text = path.read_text()
    except OSError as e:
        raise SettingsFileError(f"--config {path}: cannot be read ({e.strerror or e})") from None
    if kind == "JSON":
        try:
            found = json.loads(text) if text.strip() else {}
        except ValueError as e:
            line = getattr(e, "lineno", None)
            raise SettingsFileError(f"{path}{f' line {line}' if line else ''}: not valid JSON "
                                    f"({getattr(e, 'msg', e)})") from None
    else:
        import yaml  # huggingface_hub's dependency; imported only when a file is read

        try:
            found = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise SettingsFileError(f"{path}{where}: not valid YAML ({problem})") from None
    if found is None:
        return {}
    if not isinstance(found, dict):
        raise SettingsFileError(f"{path}: expected a mapping of setting names to values, found a "
                                f"{type(found).__name__}")
    return found


def settable(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's flags a file may set, by their names with `_`."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in NOT_IN_FILES}


def file_values(parser: argparse.ArgumentParser, found: dict, path) -> dict:
    """`found`'s values by flag name, each checked against its flag: the name exists, the type is the flag's."""
    actions, values = settable(parser), {}
    for key, value in found.items():
        name = str(key).replace("-", "_")
        if name not in actions:
            near = difflib.get_close_matches(name, list(actions), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; the settings are {', '.join(sorted(actions))}"
            raise SettingsFileError(f"{path}: unknown setting {key!r}{hint}")
        if name in values:
            raise SettingsFileError(f"{path}: {name!r} is set twice (as {name} and {name.replace('_', '-')})")
        values[name] = checked(actions[name], key, value, path)
    return values


def checked(action: argparse.Action, key, value, path):
    """`value` as the flag of `action` takes it, or a SettingsFileError naming the key and the expected type."""
    def wrong(expected: str):
        return SettingsFileError(f"{path}: {key} must be {expected}, got {value!r} ({type(value).__name__})")

    if value is None:
        if action.default is None and not action.required:
            return None
        raise wrong("given (null is not a value for it)")
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    kind = action.type
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
    elif kind is float:
        # YAML 1.1 (PyYAML's) reads `1e-4` as a string: it needs a dot (`1.0e-4`). The command line takes `1e-4`,
        # so a file does too.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise wrong("a number") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        value = float(value)
    elif kind is None or kind is str:
        if not isinstance(value, str):
            raise wrong("a string")
    else:  # a flag's own parser (a size such as 500MB): it reads what the command line would give it
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise wrong("a string or a number")
        try:
            value = kind(str(value))
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise SettingsFileError(f"{path}: {key}: {e}") from None
    if action.choices is not None and value not in action.choices:
        raise wrong(f"one of {', '.join(map(str, action.choices))}")
    return value


def to_yaml(values: dict, comment: str = "") -> str:
    """`values` as YAML in their order (a float written so that it reads back as the same float), after
    `comment`'s lines as YAML comments."""
    import yaml

    head = "".join(f"# {line}\n" if line else "#\n" for line in comment.splitlines())
    return head + yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=1000)
