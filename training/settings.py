"""A settings dataclass as a command line: one flag per field, typed as the field is, its help from the field's
metadata. `train.py` builds its command line from `TrainConfig` this way, and `bench.bench --variant` parses
settings with the same types."""

from __future__ import annotations

import argparse
import dataclasses
import shlex


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default, except None: those help texts say what the default is computed from."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def setting_type(cls, name: str):
    """The type of field `name` of dataclass `cls`: bool, int, float or str ("float | None" is a float whose
    None default the help explains)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    kind = f.type if isinstance(f.type, str) else f.type.__name__
    return {"bool": bool, "int": int, "float": float, "str": str}[kind.removesuffix(" | None")]


def parse_settings(cls, argv=None, description: str = ""):
    """An instance of `cls` from the command line: `--field-name VALUE`, or `--flag/--no-flag` for a bool."""
    parser = argparse.ArgumentParser(description=description, formatter_class=_HelpFormatter)
    for f in dataclasses.fields(cls):
        flag, help_, kind = "--" + f.name.replace("_", "-"), f.metadata.get("help", " "), setting_type(cls, f.name)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            parser.add_argument(flag, type=kind, default=f.default, help=help_)
    return cls(**vars(parser.parse_args(argv)))


def command_line(settings, program: str = "python train.py") -> str:
    """The command that gives `settings` (a dataclass instance): its program and a flag per non-default field, so
    a run's record (the adapter's model card) can be repeated exactly, whoever started it and however."""
    words = program.split()
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        if value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words += [flag, str(value)]
    return shlex.join(words)
